//! The geometry of a 2-D convolution and the valid-tap arithmetic every conv kernel stands on:
//! the portable kernels in `conv`, the kernels over split weights, and the DSP paths in `arm`.
use super::{dims, WeightShape};
use crate::error::{Error, Result};

/// Largest kernel (kh * kw) the portable depthwise paths stage on the stack; larger ones take
/// the general path.
pub(crate) const DW_MAX_TAPS: usize = 64;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Conv2dGeom {
    pub in_h: usize,
    pub in_w: usize,
    pub in_c: usize,
    pub out_c: usize,
    pub kh: usize,
    pub kw: usize,
    pub stride_h: usize,
    pub stride_w: usize,
    pub pad_top: usize,
    pub pad_left: usize,
    pub pad_bottom: usize,
    pub pad_right: usize,
    pub groups: usize,
}

impl Conv2dGeom {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        in_h: usize,
        in_w: usize,
        in_c: usize,
        out_c: usize,
        kh: usize,
        kw: usize,
        stride_h: usize,
        stride_w: usize,
        pad_top: usize,
        pad_left: usize,
        pad_bottom: usize,
        pad_right: usize,
        groups: usize,
    ) -> Result<Conv2dGeom> {
        let g = Conv2dGeom {
            in_h,
            in_w,
            in_c,
            out_c,
            kh,
            kw,
            stride_h,
            stride_w,
            pad_top,
            pad_left,
            pad_bottom,
            pad_right,
            groups,
        };
        g.validate()?;
        Ok(g)
    }

    /// Checks every invariant the kernels rely on; the kernels call it themselves, so a geometry
    /// built field by field cannot make them index out of bounds.
    pub fn validate(&self) -> Result<()> {
        let invalid = |what| Err(Error::InvalidParameter { what });
        if self.in_h == 0 || self.in_w == 0 || self.in_c == 0 || self.out_c == 0 {
            return invalid("conv2d: zero-sized input or output channels");
        }
        if self.kh == 0 || self.kw == 0 {
            return invalid("conv2d: zero-sized kernel");
        }
        if self.stride_h == 0 || self.stride_w == 0 {
            return invalid("conv2d: zero stride");
        }
        if self.groups == 0 || self.in_c % self.groups != 0 || self.out_c % self.groups != 0 {
            return invalid("conv2d: groups must divide in_c and out_c");
        }
        let ph = self
            .in_h
            .checked_add(self.pad_top)
            .and_then(|v| v.checked_add(self.pad_bottom));
        let pw = self
            .in_w
            .checked_add(self.pad_left)
            .and_then(|v| v.checked_add(self.pad_right));
        match (ph, pw) {
            (Some(ph), Some(pw)) if ph >= self.kh && pw >= self.kw => {}
            (Some(_), Some(_)) => return invalid("conv2d: kernel larger than padded input"),
            _ => return invalid("conv2d: padded size overflows"),
        }
        // Padding wider than the kernel would produce outputs that see only padding; ONNX allows
        // it, but indices computed as isize must stay in range.
        if self.pad_top >= isize::MAX as usize / 2 || self.pad_left >= isize::MAX as usize / 2 {
            return invalid("conv2d: padding too large");
        }
        dims(
            &[self.in_h, self.in_w, self.in_c],
            "conv2d: input size overflows",
        )?;
        dims(
            &[
                self.out_h(),
                self.out_w(),
                self.out_c,
                self.kh,
                self.kw,
                self.in_c,
            ],
            "conv2d: size overflows",
        )?;
        Ok(())
    }

    pub fn out_h(&self) -> usize {
        (self.in_h + self.pad_top + self.pad_bottom - self.kh) / self.stride_h + 1
    }

    pub fn out_w(&self) -> usize {
        (self.in_w + self.pad_left + self.pad_right - self.kw) / self.stride_w + 1
    }

    pub fn in_per_group(&self) -> usize {
        self.in_c / self.groups
    }

    pub fn out_per_group(&self) -> usize {
        self.out_c / self.groups
    }

    pub fn input_len(&self) -> usize {
        self.in_h * self.in_w * self.in_c
    }

    pub fn output_len(&self) -> usize {
        self.out_h() * self.out_w() * self.out_c
    }

    pub fn weight_len(&self) -> usize {
        self.out_c * self.kh * self.kw * self.in_per_group()
    }

    /// Multiply-accumulates of one forward pass (counting padded taps, as is customary).
    pub fn macs(&self) -> u64 {
        self.out_h() as u64
            * self.out_w() as u64
            * self.out_c as u64
            * (self.kh * self.kw * self.in_per_group()) as u64
    }

    pub fn weight_shape(&self) -> WeightShape {
        WeightShape {
            out_c: self.out_c,
            taps: self.kh * self.kw,
            in_per_group: self.in_per_group(),
            groups: self.groups,
        }
    }

    pub fn is_depthwise(&self) -> bool {
        self.groups == self.in_c && self.out_c == self.in_c
    }

    /// A 1x1, stride 1, unpadded, ungrouped conv: output pixel p reads input pixel p only.
    pub fn is_pointwise(&self) -> bool {
        self.kh == 1
            && self.kw == 1
            && self.stride_h == 1
            && self.stride_w == 1
            && self.pad_top + self.pad_left + self.pad_bottom + self.pad_right == 0
            && self.groups == 1
    }

    pub(crate) fn dw_fast(&self) -> bool {
        self.is_depthwise() && self.kh * self.kw <= DW_MAX_TAPS
    }

    /// Valid kernel rows for output row `oy`: `(iy0, ky_lo, ky_hi)` with input row `iy0 + ky`.
    #[inline]
    pub(crate) fn rows(&self, oy: usize) -> (isize, usize, usize) {
        tap_range(oy, self.stride_h, self.pad_top, self.kh, self.in_h)
    }

    #[inline]
    pub(crate) fn cols(&self, ox: usize) -> (isize, usize, usize) {
        tap_range(ox, self.stride_w, self.pad_left, self.kw, self.in_w)
    }
}

#[inline]
pub(crate) fn tap_range(
    o: usize,
    stride: usize,
    pad: usize,
    k: usize,
    n: usize,
) -> (isize, usize, usize) {
    let i0 = (o * stride) as isize - pad as isize;
    let lo = if i0 < 0 { (-i0) as usize } else { 0 };
    let hi_i = n as isize - i0;
    let hi = if hi_i <= 0 { 0 } else { (hi_i as usize).min(k) };
    (i0, lo.min(hi), hi)
}

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
