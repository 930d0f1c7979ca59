//! Int8 kernels, one file per op family: forward and backward side by side.
//!
//! Conventions shared by every kernel here:
//! - activations are one sample, channels last (HWC), int8 with a per-tensor scale and zero point;
//! - conv weights are OHWI (`[out_c][kh][kw][in_c / groups]`), FC weights `[out][in]`, int8
//!   symmetric per output channel; biases int32 with scale `s_in * s_w[o]`;
//! - gradients are f32 in real units (dL/dy of the dequantized value);
//! - backward kernels that produce an input gradient overwrite it, kernels that produce weight or
//!   bias gradients accumulate (`+=`) so a batch accumulates sample by sample;
//! - nothing allocates and nothing panics on a bad shape: it is an `Err`.
//!
//! A kernel with a DSP path for Cortex-M4/M7 (`arm/`) is a dispatcher: it checks its buffers,
//! then runs the DSP path where that path takes the geometry, else its portable twin. Every
//! twin is also callable by the kernel's own name in [`portable`] on every target, which is
//! what the equivalence suites (host tests and the QEMU firmware) compare the dispatchers with.

/// `dsp_or_portable!(dsp, portable)` is the expression `dsp` on a core with the DSP extension
/// (`thumbv7em`) unless the `portable` feature asks for the plain reference build, else
/// `portable`; `dsp_or_portable!(mod arm)` declares the DSP paths on those builds only. This
/// and the one `cfg` below are the only places the DSP-or-portable choice is written.
#[allow(unused_macros)] // shadowed by the DSP definition below on DSP builds
macro_rules! dsp_or_portable {
    (mod $m:ident) => {};
    ($dsp:expr, $portable:expr) => {
        $portable
    };
}
#[cfg(all(target_arch = "arm", target_feature = "dsp", not(feature = "portable")))]
macro_rules! dsp_or_portable {
    (mod $m:ident) => {
        mod $m;
    };
    ($dsp:expr, $portable:expr) => {
        $dsp
    };
}

pub mod act;
pub mod add;
dsp_or_portable!(mod arm);
pub mod conv;
pub mod fc;
pub mod geom;
pub mod inplace;
pub mod loss;
pub mod pool;
pub mod portable;
pub mod split;

use crate::error::{Error, Result};
use crate::quant::Requant;

/// Largest magnitude of a conv / fc int32 bias. With it and [`MAX_DOT_LEN`], the forward
/// accumulator `bias + Σ (x - zp)·w` (|x - zp| <= 255, |w| <= 128) stays below 2^31, so the
/// kernels' wrapping int32 arithmetic is exact: overflow cannot happen, instead of being
/// detected. Plans are refused past [`MAX_DOT_LEN`], blobs with larger biases are refused, and
/// bias updates saturate here.
pub const BIAS_LIMIT: u32 = 1 << 30;
/// Most products one conv / fc output sums (`kh·kw·in_c/groups`, or fc inputs): 32,896, far
/// above real layers (a 3x3 conv over 3,655 channels).
pub const MAX_DOT_LEN: usize = (BIAS_LIMIT as usize) / (255 * 128);
/// Most inputs a global average pool sums (|x - zp| <= 255 each) in its int32 accumulator.
pub const MAX_POOL_LEN: usize = i32::MAX as usize / 255;

/// How a conv's int32 sums become its int8 outputs, with the input zero point they are taken
/// around: `out = clamp(requant[o](bias[o] + sum (x - in_zp) * w) + out_zp, act_min, act_max)`.
/// What the kernels' internal paths pass on instead of five arguments.
#[derive(Clone, Copy)]
pub struct ConvQuant<'a> {
    pub in_zp: i32,
    pub requant: &'a [Requant],
    pub out_zp: i32,
    pub act_min: i8,
    pub act_max: i8,
}

impl<'a> ConvQuant<'a> {
    #[inline(always)]
    pub fn new(in_zp: i32, requant: &'a [Requant], out_zp: i32, act_min: i8, act_max: i8) -> Self {
        ConvQuant {
            in_zp,
            requant,
            out_zp,
            act_min,
            act_max,
        }
    }

    /// `(in_zp, requant, out_zp, act_min, act_max)`.
    #[inline(always)]
    pub fn parts(self) -> (i32, &'a [Requant], i32, i8, i8) {
        (
            self.in_zp,
            self.requant,
            self.out_zp,
            self.act_min,
            self.act_max,
        )
    }
}

/// Which axis of a weight tensor a channel selection runs along. The discriminants are the
/// plan's layer-record `axis` byte (written as `axis as u8`), so they are part of the format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum ChannelAxis {
    /// Rows `W[:k]`: fewer weights updated, but the whole layer input must be saved.
    Output = 0,
    /// Columns `W[:, :k]` (the paper's choice for 1x1 convs): backward needs only the first `k`
    /// input channels of the layer input saved. Only for ungrouped layers.
    Input = 1,
}

impl ChannelAxis {
    /// The axis of a plan's layer-record `axis` byte (0 = output, 1 = input channels).
    pub fn from_u8(v: u8) -> Option<ChannelAxis> {
        match v {
            0 => Some(ChannelAxis::Output),
            1 => Some(ChannelAxis::Input),
            _ => None,
        }
    }
}

/// The weights a sparse update touches: the prefix `0..count` along `axis`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChannelSelection {
    pub axis: ChannelAxis,
    pub count: usize,
}

impl ChannelSelection {
    pub fn output(count: usize) -> ChannelSelection {
        ChannelSelection {
            axis: ChannelAxis::Output,
            count,
        }
    }

    pub fn input(count: usize) -> ChannelSelection {
        ChannelSelection {
            axis: ChannelAxis::Input,
            count,
        }
    }

    /// Validates the selection against a weight shape.
    pub fn check(&self, w: &WeightShape) -> Result<()> {
        dims(
            &[w.out_c, w.taps, w.in_per_group],
            "weight shape: size overflows",
        )?;
        match self.axis {
            ChannelAxis::Output if self.count <= w.out_c => Ok(()),
            ChannelAxis::Output => Err(Error::InvalidParameter {
                what: "channel selection: count exceeds output channels",
            }),
            ChannelAxis::Input if w.groups != 1 => Err(Error::InvalidParameter {
                what: "channel selection: input-axis selection needs groups == 1",
            }),
            ChannelAxis::Input if self.count <= w.in_per_group => Ok(()),
            ChannelAxis::Input => Err(Error::InvalidParameter {
                what: "channel selection: count exceeds input channels",
            }),
        }
    }

    /// Number of weights selected (the length of the matching gradient buffer). Saturates
    /// instead of overflowing, so an absurd shape can never match a real buffer.
    pub fn selected_len(&self, w: &WeightShape) -> usize {
        let (a, b) = match self.axis {
            ChannelAxis::Output => (self.count, w.in_per_group),
            ChannelAxis::Input => (w.out_c, self.count),
        };
        a.saturating_mul(w.taps).saturating_mul(b)
    }

    /// Output channels whose rows are (partly) selected.
    pub fn rows(&self, w: &WeightShape) -> usize {
        match self.axis {
            ChannelAxis::Output => self.count,
            ChannelAxis::Input => w.out_c,
        }
    }

    /// Input channels per pixel the weight-gradient kernel reads from the saved input:
    /// all of them for an output-axis selection, only the first `count` for an input-axis one.
    pub fn saved_input_channels(&self, in_c: usize) -> usize {
        match self.axis {
            ChannelAxis::Output => in_c,
            ChannelAxis::Input => self.count,
        }
    }

    /// Selected weights per selected row (the inner extent of the gradient layout).
    pub fn cols(&self, w: &WeightShape) -> usize {
        match self.axis {
            ChannelAxis::Output => w.in_per_group,
            ChannelAxis::Input => self.count,
        }
    }
}

/// The shape of an int8 weight tensor as the update sees it: `[out_c][taps][in_per_group]`
/// (`taps = kh * kw`, 1 for FC).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WeightShape {
    pub out_c: usize,
    pub taps: usize,
    pub in_per_group: usize,
    pub groups: usize,
}

impl WeightShape {
    /// Number of weights (saturating, so an absurd shape never matches a real buffer).
    pub fn len(&self) -> usize {
        self.out_c
            .saturating_mul(self.taps)
            .saturating_mul(self.in_per_group)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Visits every selected weight as `(index into the full weight, output channel)`, in the
    /// order of the gradient buffer.
    pub(crate) fn for_each_selected(
        &self,
        sel: &ChannelSelection,
        mut f: impl FnMut(usize, usize),
    ) {
        let cols = sel.cols(self);
        for o in 0..sel.rows(self) {
            for t in 0..self.taps {
                let base = (o * self.taps + t) * self.in_per_group;
                for i in 0..cols {
                    f(base + i, o);
                }
            }
        }
    }
}

/// Extracts the first `k` channels of an HWC int8 tensor: what a layer with an input-axis
/// selection saves for its backward pass.
pub fn save_input_channels(input: &[i8], in_c: usize, k: usize, saved: &mut [i8]) -> Result<()> {
    if in_c == 0 || input.len() % in_c != 0 || k > in_c {
        return Err(Error::InvalidParameter {
            what: "save_input_channels: input length / channel count",
        });
    }
    let pixels = input.len() / in_c;
    crate::quant::check_len("save_input_channels: saved", pixels * k, saved.len())?;
    if k == 0 {
        return Ok(());
    }
    for (src, dst) in input.chunks_exact(in_c).zip(saved.chunks_exact_mut(k)) {
        dst.copy_from_slice(&src[..k]);
    }
    Ok(())
}

/// Checked product of dimensions: a shape whose size overflows is an error, not a panic.
pub(crate) fn dims(parts: &[usize], what: &'static str) -> Result<usize> {
    let mut n: usize = 1;
    for &p in parts {
        n = n.checked_mul(p).ok_or(Error::InvalidParameter { what })?;
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::ChannelAxis;

    /// The plan stores `axis as u8` and readers decode 0 = output, 1 = input: the enum's order
    /// is part of the format.
    #[test]
    fn channel_axis_codes_are_the_plan_layer_axis_byte() {
        assert_eq!(ChannelAxis::Output as u8, 0);
        assert_eq!(ChannelAxis::Input as u8, 1);
        for a in [ChannelAxis::Output, ChannelAxis::Input] {
            assert_eq!(ChannelAxis::from_u8(a as u8), Some(a));
        }
        assert_eq!(ChannelAxis::from_u8(2), None);
    }
}
