//! Kernels over a layer's weights split between flash and SRAM: a partial channel update keeps
//! its trained rows (output axis) or columns (input axis) in SRAM and the rest frozen in flash,
//! and these read each weight from where it lives, with the arithmetic of the whole-weight
//! kernels in `conv`.
use super::conv::Conv2dGeom;
use crate::quant::{QParams, Requant};
use crate::{Error, Result};

/// Weight access of one layer: frozen (flash), fully trained (SRAM), or split between both.
#[derive(Clone, Copy)]
pub enum Weights<'w> {
    Whole(&'w [i8]),
    Split {
        flash: &'w [i8],
        sram: &'w [i8],
        axis: u8,
        k: usize,
    },
}
impl Weights<'_> {
    /// Weight `(o, tap, i)` of a layer whose first `k` rows (axis 0) or columns (axis 1) are
    /// trained in SRAM; lengths are checked by the callers.
    #[inline]
    pub(crate) fn at(&self, o: usize, t: usize, i: usize, taps: usize, icg: usize) -> i8 {
        match *self {
            Weights::Whole(w) => w[(o * taps + t) * icg + i],
            Weights::Split {
                flash,
                sram,
                axis,
                k,
            } => {
                if axis == 0 && o < k {
                    sram[(o * taps + t) * icg + i]
                } else if axis == 1 && i < k {
                    sram[(o * taps + t) * k + i]
                } else {
                    flash[(o * taps + t) * icg + i]
                }
            }
        }
    }

    /// Column `i` of a 1x1 layer's weights (`[out_c, icg]`) for outputs `o0..o0 + out.len()`,
    /// as f32: the fused block backward stages pw2's columns this way, one strided walk per
    /// source instead of a lookup per weight (the same values as `at`). Lengths were checked by
    /// `check`.
    pub(crate) fn column_f32(&self, i: usize, icg: usize, o0: usize, out: &mut [f32]) {
        let walk = |w: &[i8], stride: usize, o0: usize, out: &mut [f32]| {
            // A chunk per output, its first entry: a pointer step per weight, where `step_by`
            // recomputed an index and its bound each time.
            for (d, ch) in out.iter_mut().zip(w[o0 * stride + i..].chunks(stride)) {
                *d = ch[0] as f32;
            }
        };
        match *self {
            Weights::Whole(w) => walk(w, icg, o0, out),
            Weights::Split {
                flash,
                sram,
                axis,
                k,
            } => {
                if axis == 0 {
                    // Outputs below k are trained (SRAM), the rest frozen (flash).
                    let s = k.clamp(o0, o0 + out.len()) - o0;
                    let (lo, hi) = out.split_at_mut(s);
                    if !lo.is_empty() {
                        walk(sram, icg, o0, lo);
                    }
                    if !hi.is_empty() {
                        walk(flash, icg, o0 + s, hi);
                    }
                } else if axis == 1 && i < k {
                    walk(sram, k, o0, out);
                } else {
                    walk(flash, icg, o0, out);
                }
            }
        }
    }

    /// The rows the DSP conv paths read: whole weights, or trained output channels below
    /// `k` (input-channel splits take the portable loops), for a patch that fits their staging
    /// and an int8-range zero point (so their int16 `x - zp` is the portable int32 one).
    /// Lengths were checked by `check`.
    #[cfg(all(target_arch = "arm", target_feature = "dsp", not(feature = "portable")))]
    pub(crate) fn dsp_rows(&self, g: &Conv2dGeom, in_zp: i32) -> Option<crate::ops::arm::Rows<'_>> {
        if g.kh * g.kw * g.in_per_group() > crate::ops::arm::PATCH_MAX
            || !(-128..=127).contains(&in_zp)
        {
            return None;
        }
        match *self {
            Weights::Whole(w) => Some(crate::ops::arm::Rows::whole(w)),
            Weights::Split {
                flash,
                sram,
                axis: 0,
                k,
            } => Some(crate::ops::arm::Rows {
                lo: sram,
                hi: flash,
                k,
            }),
            Weights::Split { .. } => None,
        }
    }

    pub fn check(&self, g: &Conv2dGeom) -> Result<()> {
        let full = g.weight_len();
        let (flash, sram, need) = match *self {
            Weights::Whole(w) => (w.len(), full, full),
            Weights::Split {
                flash,
                sram,
                axis,
                k,
            } => {
                let need = if axis == 0 {
                    k * g.kh * g.kw * g.in_per_group()
                } else {
                    g.out_c * g.kh * g.kw * k
                };
                (flash.len(), sram.len(), need)
            }
        };
        if flash != full || sram != need {
            return Err(Error::ShapeMismatch {
                what: "executor: split weights",
                expected: full,
                actual: flash,
            });
        }
        Ok(())
    }
}

/// Visits the valid (output pixel, tap, input pixel) triples of a conv.
fn for_each_tap(g: &Conv2dGeom, mut f: impl FnMut(usize, usize, usize)) {
    let (oh, ow) = (g.out_h(), g.out_w());
    for oy in 0..oh {
        for ox in 0..ow {
            for ky in 0..g.kh {
                let iy = (oy * g.stride_h + ky) as isize - g.pad_top as isize;
                if iy < 0 || iy >= g.in_h as isize {
                    continue;
                }
                for kx in 0..g.kw {
                    let ix = (ox * g.stride_w + kx) as isize - g.pad_left as isize;
                    if ix < 0 || ix >= g.in_w as isize {
                        continue;
                    }
                    f(
                        oy * ow + ox,
                        ky * g.kw + kx,
                        iy as usize * g.in_w + ix as usize,
                    );
                }
            }
        }
    }
}

/// Forward of a layer whose weights are partly in SRAM (a partial channel update): the same
/// arithmetic as the conv kernel, reading each weight from where it lives.
#[allow(clippy::too_many_arguments)]
pub fn split_forward(
    g: &Conv2dGeom,
    x: &[i8],
    in_zp: i32,
    w: Weights<'_>,
    bias: &[i32],
    rq: &[Requant],
    out_zp: i32,
    amin: i8,
    amax: i8,
    y: &mut [i8],
) -> Result<()> {
    g.validate()?;
    w.check(g)?;
    if x.len() != g.input_len()
        || y.len() != g.output_len()
        || bias.len() != g.out_c
        || rq.len() != g.out_c
    {
        return Err(Error::ShapeMismatch {
            what: "executor: split forward buffers",
            expected: g.output_len(),
            actual: y.len(),
        });
    }
    let (icg, ocg, taps, oc_n, in_c) = (
        g.in_per_group(),
        g.out_per_group(),
        g.kh * g.kw,
        g.out_c,
        g.in_c,
    );
    #[cfg(all(target_arch = "arm", target_feature = "dsp", not(feature = "portable")))]
    if let Some(rows) = w.dsp_rows(g, in_zp) {
        crate::ops::arm::conv_forward_rows(g, x, in_zp, rows, bias, rq, out_zp, amin, amax, y);
        return Ok(());
    }
    let ow = g.out_w();
    for oy in 0..g.out_h() {
        for ox in 0..ow {
            for o in 0..oc_n {
                let grp = o / ocg;
                let mut acc = bias[o];
                for ky in 0..g.kh {
                    let iy = (oy * g.stride_h + ky) as isize - g.pad_top as isize;
                    if iy < 0 || iy >= g.in_h as isize {
                        continue;
                    }
                    for kx in 0..g.kw {
                        let ix = (ox * g.stride_w + kx) as isize - g.pad_left as isize;
                        if ix < 0 || ix >= g.in_w as isize {
                            continue;
                        }
                        let ipx = iy as usize * g.in_w + ix as usize;
                        let xs = &x[ipx * in_c + grp * icg..][..icg];
                        for (i, &xv) in xs.iter().enumerate() {
                            let wv = w.at(o, ky * g.kw + kx, i, taps, icg) as i32;
                            acc = acc.wrapping_add((xv as i32 - in_zp).wrapping_mul(wv));
                        }
                    }
                }
                let v = rq[o].apply(acc).saturating_add(out_zp);
                y[(oy * ow + ox) * oc_n + o] = v.clamp(amin as i32, amax as i32) as i8;
            }
        }
    }
    Ok(())
}

pub fn split_backward_input(
    g: &Conv2dGeom,
    go: &[f32],
    w: Weights<'_>,
    ws: &[f32],
    gi: &mut [f32],
) -> Result<()> {
    g.validate()?;
    w.check(g)?;
    if go.len() != g.output_len() || gi.len() != g.input_len() || ws.len() != g.out_c {
        return Err(Error::ShapeMismatch {
            what: "executor: split backward buffers",
            expected: g.input_len(),
            actual: gi.len(),
        });
    }
    gi.fill(0.0);
    let (icg, ocg, taps, oc_n, in_c) = (
        g.in_per_group(),
        g.out_per_group(),
        g.kh * g.kw,
        g.out_c,
        g.in_c,
    );
    for_each_tap(g, |opx, t, ipx| {
        for o in 0..oc_n {
            let gs = go[opx * oc_n + o] * ws[o];
            if gs == 0.0 {
                continue;
            }
            let grp = o / ocg;
            let d = &mut gi[ipx * in_c + grp * icg..][..icg];
            for (i, dv) in d.iter_mut().enumerate() {
                *dv += gs * w.at(o, t, i, taps, icg) as f32;
            }
        }
    });
    Ok(())
}
/// Gradient of one trained weight row `o` (real units), for the fused weight step.
#[allow(clippy::too_many_arguments)]
pub(crate) fn weight_grad_row(
    g: &Conv2dGeom,
    axis: u8,
    o: usize,
    go: &[f32],
    x: &[i8],
    xc: usize,
    in_q: QParams,
    row: &mut [f32],
) {
    row.fill(0.0);
    let taps = g.kh * g.kw;
    let cols = row.len() / taps.max(1);
    let base = if axis == 0 {
        (o / g.out_per_group()) * g.in_per_group()
    } else {
        0
    };
    let (ow, oc) = (g.out_w(), g.out_c);
    let zp = in_q.zero_point;
    for oy in 0..g.out_h() {
        for ox in 0..ow {
            let v = go[(oy * ow + ox) * oc + o];
            if v == 0.0 {
                continue;
            }
            let v = v * in_q.scale;
            for ky in 0..g.kh {
                let iy = (oy * g.stride_h + ky) as isize - g.pad_top as isize;
                if iy < 0 || iy >= g.in_h as isize {
                    continue;
                }
                for kx in 0..g.kw {
                    let ix = (ox * g.stride_w + kx) as isize - g.pad_left as isize;
                    if ix < 0 || ix >= g.in_w as isize {
                        continue;
                    }
                    let xs = &x[(iy as usize * g.in_w + ix as usize) * xc + base..][..cols];
                    let r = &mut row[(ky * g.kw + kx) * cols..][..cols];
                    for (d, &xv) in r.iter_mut().zip(xs) {
                        *d += v * (xv as i32 - zp) as f32;
                    }
                }
            }
        }
    }
}
