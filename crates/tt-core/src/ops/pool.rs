//! Pooling: global average pool (requantized int8 -> int8), k x k average pool and max pool.
//!
//! Average pool excludes padded positions from the count (ONNX's default
//! `count_include_pad = 0`, and TFLite's behaviour). Windowed average and max pool keep the
//! input's quantization for the output (as TFLite requires), so they work on raw int8 values.
use crate::error::{Error, Result};
use crate::quant::{check_len, QParams, Requant, Rounding};

/// Geometry of a windowed pool over an HWC tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pool2dGeom {
    pub in_h: usize,
    pub in_w: usize,
    pub c: usize,
    pub kh: usize,
    pub kw: usize,
    pub stride_h: usize,
    pub stride_w: usize,
    pub pad_top: usize,
    pub pad_left: usize,
    pub pad_bottom: usize,
    pub pad_right: usize,
}

impl Pool2dGeom {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        in_h: usize,
        in_w: usize,
        c: usize,
        kh: usize,
        kw: usize,
        stride_h: usize,
        stride_w: usize,
        pad_top: usize,
        pad_left: usize,
        pad_bottom: usize,
        pad_right: usize,
    ) -> Result<Pool2dGeom> {
        let g = Pool2dGeom {
            in_h,
            in_w,
            c,
            kh,
            kw,
            stride_h,
            stride_w,
            pad_top,
            pad_left,
            pad_bottom,
            pad_right,
        };
        g.validate()?;
        Ok(g)
    }

    pub fn validate(&self) -> Result<()> {
        let invalid = |what| Err(Error::InvalidParameter { what });
        if self.in_h == 0 || self.in_w == 0 || self.c == 0 || self.kh == 0 || self.kw == 0 {
            return invalid("pool: zero-sized dimension");
        }
        if self.stride_h == 0 || self.stride_w == 0 {
            return invalid("pool: zero stride");
        }
        // A pad as wide as the kernel would give windows with no input element in them.
        if self.pad_top >= self.kh
            || self.pad_bottom >= self.kh
            || self.pad_left >= self.kw
            || self.pad_right >= self.kw
        {
            return invalid("pool: padding must be smaller than the kernel");
        }
        let ph = self
            .pad_top
            .checked_add(self.pad_bottom)
            .and_then(|p| p.checked_add(self.in_h));
        let pw = self
            .pad_left
            .checked_add(self.pad_right)
            .and_then(|p| p.checked_add(self.in_w));
        match (ph, pw) {
            (Some(ph), Some(pw)) if ph >= self.kh && pw >= self.kw => {}
            _ => return invalid("pool: kernel larger than padded input"),
        }
        super::dims(&[self.in_h, self.in_w, self.c], "pool: size overflows")?;
        // Padding can make the output larger than the input.
        super::dims(
            &[self.out_h(), self.out_w(), self.c],
            "pool: output size overflows",
        )?;
        Ok(())
    }

    pub fn out_h(&self) -> usize {
        (self.in_h + self.pad_top + self.pad_bottom - self.kh) / self.stride_h + 1
    }

    pub fn out_w(&self) -> usize {
        (self.in_w + self.pad_left + self.pad_right - self.kw) / self.stride_w + 1
    }

    pub fn input_len(&self) -> usize {
        self.in_h * self.in_w * self.c
    }

    pub fn output_len(&self) -> usize {
        self.out_h() * self.out_w() * self.c
    }

    /// Input rows `[lo, hi)` and columns of the window of output `(oy, ox)`.
    fn window(&self, oy: usize, ox: usize) -> (usize, usize, usize, usize) {
        let r = |o: usize, s: usize, p: usize, k: usize, n: usize| {
            let start = (o * s) as isize - p as isize;
            let lo = start.max(0) as usize;
            let hi = ((start + k as isize).min(n as isize)).max(0) as usize;
            (lo, hi.max(lo))
        };
        let (y0, y1) = r(oy, self.stride_h, self.pad_top, self.kh, self.in_h);
        let (x0, x1) = r(ox, self.stride_w, self.pad_left, self.kw, self.in_w);
        (y0, y1, x0, x1)
    }
}

/// `out[c] = requant(sum_p (x[p][c] - in_zp), s_in / (s_out * h * w)) + out_zp`: one
/// multiply for the mean and the rescale, which with [`Rounding::Double`] is also what TFLite's
/// reference MEAN computes (bit-exact; measured against the LiteRT interpreter).
#[allow(clippy::too_many_arguments)]
pub fn global_avgpool_forward(
    h: usize,
    w: usize,
    c: usize,
    input: &[i8],
    in_q: QParams,
    out_q: QParams,
    rounding: Rounding,
    output: &mut [i8],
) -> Result<()> {
    let hw = super::dims(&[h, w], "global_avgpool: size overflows")?;
    if hw == 0 || c == 0 || hw > (1 << 23) {
        return Err(Error::InvalidParameter {
            what: "global_avgpool: empty input or more than 2^23 pixels",
        });
    }
    let n = super::dims(&[hw, c], "global_avgpool: size overflows")?;
    check_len("global_avgpool_forward: input", n, input.len())?;
    check_len("global_avgpool_forward: output", c, output.len())?;
    QParams::new(in_q.scale, in_q.zero_point)?;
    QParams::new(out_q.scale, out_q.zero_point)?;
    let rq = Requant::from_scale(in_q.scale as f64 / (out_q.scale as f64 * hw as f64))?
        .with_rounding(rounding);
    for (ch, o) in output.iter_mut().enumerate() {
        let mut acc: i32 = 0;
        for px in 0..hw {
            acc = acc.wrapping_add((input[px * c + ch] as i32).wrapping_sub(in_q.zero_point));
        }
        *o = rq.apply_clamp(acc, out_q.zero_point, -128, 127);
    }
    Ok(())
}

/// `grad_in[p][c] = grad_out[c] / (h * w)`; overwrites `grad_in`.
pub fn global_avgpool_backward(
    h: usize,
    w: usize,
    c: usize,
    grad_out: &[f32],
    grad_in: &mut [f32],
) -> Result<()> {
    let hw = super::dims(&[h, w], "global_avgpool: size overflows")?;
    if hw == 0 || c == 0 {
        return Err(Error::InvalidParameter {
            what: "global_avgpool: empty input",
        });
    }
    check_len("global_avgpool_backward: grad_out", c, grad_out.len())?;
    let n = super::dims(&[hw, c], "global_avgpool: size overflows")?;
    check_len("global_avgpool_backward: grad_in", n, grad_in.len())?;
    let inv = 1.0 / hw as f32;
    for px in grad_in.chunks_exact_mut(c) {
        for (d, &g) in px.iter_mut().zip(grad_out) {
            *d = g * inv;
        }
    }
    Ok(())
}

/// Average over the in-bounds part of each window, rounded half away from zero (TFLite).
pub fn avgpool_forward(g: &Pool2dGeom, input: &[i8], output: &mut [i8]) -> Result<()> {
    g.validate()?;
    check_len("avgpool_forward: input", g.input_len(), input.len())?;
    check_len("avgpool_forward: output", g.output_len(), output.len())?;
    let (c, ow) = (g.c, g.out_w());
    for oy in 0..g.out_h() {
        for ox in 0..ow {
            let (y0, y1, x0, x1) = g.window(oy, ox);
            let count = ((y1 - y0) * (x1 - x0)) as i64;
            let out = &mut output[(oy * ow + ox) * c..][..c];
            for (ch, o) in out.iter_mut().enumerate() {
                let mut acc: i64 = 0;
                for iy in y0..y1 {
                    for ix in x0..x1 {
                        acc += input[(iy * g.in_w + ix) * c + ch] as i64;
                    }
                }
                let r = if acc > 0 {
                    (acc + count / 2) / count
                } else {
                    (acc - count / 2) / count
                };
                *o = r.clamp(-128, 127) as i8;
            }
        }
    }
    Ok(())
}

/// Real-unit gradient of the average pool (pads excluded from the count); overwrites `grad_in`.
pub fn avgpool_backward(g: &Pool2dGeom, grad_out: &[f32], grad_in: &mut [f32]) -> Result<()> {
    g.validate()?;
    check_len("avgpool_backward: grad_out", g.output_len(), grad_out.len())?;
    check_len("avgpool_backward: grad_in", g.input_len(), grad_in.len())?;
    grad_in.fill(0.0);
    let (c, ow) = (g.c, g.out_w());
    for oy in 0..g.out_h() {
        for ox in 0..ow {
            let (y0, y1, x0, x1) = g.window(oy, ox);
            let inv = 1.0 / ((y1 - y0) * (x1 - x0)) as f32;
            let go = &grad_out[(oy * ow + ox) * c..][..c];
            for iy in y0..y1 {
                for ix in x0..x1 {
                    let gi = &mut grad_in[(iy * g.in_w + ix) * c..][..c];
                    for (d, &v) in gi.iter_mut().zip(go) {
                        *d += v * inv;
                    }
                }
            }
        }
    }
    Ok(())
}

/// Maximum over the in-bounds part of each window (padding never wins).
pub fn maxpool_forward(g: &Pool2dGeom, input: &[i8], output: &mut [i8]) -> Result<()> {
    g.validate()?;
    check_len("maxpool_forward: input", g.input_len(), input.len())?;
    check_len("maxpool_forward: output", g.output_len(), output.len())?;
    let (c, ow) = (g.c, g.out_w());
    for oy in 0..g.out_h() {
        for ox in 0..ow {
            let (y0, y1, x0, x1) = g.window(oy, ox);
            let out = &mut output[(oy * ow + ox) * c..][..c];
            out.fill(i8::MIN);
            for iy in y0..y1 {
                for ix in x0..x1 {
                    let x = &input[(iy * g.in_w + ix) * c..][..c];
                    for (o, &v) in out.iter_mut().zip(x) {
                        *o = (*o).max(v);
                    }
                }
            }
        }
    }
    Ok(())
}

/// Routes each output gradient to the first maximum of its window in the saved input
/// (row-major scan order); overwrites `grad_in`.
pub fn maxpool_backward(
    g: &Pool2dGeom,
    input: &[i8],
    grad_out: &[f32],
    grad_in: &mut [f32],
) -> Result<()> {
    g.validate()?;
    check_len("maxpool_backward: input", g.input_len(), input.len())?;
    check_len("maxpool_backward: grad_out", g.output_len(), grad_out.len())?;
    check_len("maxpool_backward: grad_in", g.input_len(), grad_in.len())?;
    grad_in.fill(0.0);
    let (c, ow) = (g.c, g.out_w());
    for oy in 0..g.out_h() {
        for ox in 0..ow {
            let (y0, y1, x0, x1) = g.window(oy, ox);
            for ch in 0..c {
                let mut best = (i32::MIN, 0usize);
                for iy in y0..y1 {
                    for ix in x0..x1 {
                        let i = (iy * g.in_w + ix) * c + ch;
                        if (input[i] as i32) > best.0 {
                            best = (input[i] as i32, i);
                        }
                    }
                }
                grad_in[best.1] += grad_out[(oy * ow + ox) * c + ch];
            }
        }
    }
    Ok(())
}
