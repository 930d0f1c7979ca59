//! Kernel paths for Cortex-M4/M7 (thumbv7em, DSP extension), one file per family like the
//! portable kernels: packed 16-bit multiply-accumulates (`SMLAD`, two MACs per instruction) on
//! int8 pairs widened with `SXTB16`, and the requantization epilogues they share.
//!
//! The portable kernels stay the reference: every result here is the same integer sum
//! (wrapping, as there), so outputs are bit-identical. The entry points below return `false`,
//! having written nothing, for a geometry they do not take; the dispatcher then runs the
//! portable twin. Compiled only on DSP builds (`dsp_or_portable!(mod arm)` in `ops`).
mod act;
mod conv;
mod depthwise;
mod requant;

use super::geom::{Conv2dGeom, Weights};
use super::ConvQuant;
use conv::{Rows, PATCH_MAX};

pub(super) use act::clamp_mask_bytes;
pub(super) use depthwise::{dw_in_place, dw_plane};
pub(super) use requant::requant_each;

/// `conv2d_forward` on a DSP path: the depthwise layers `dw_applies` takes, else (where the
/// portable depthwise path does not apply) every layer whose patch fits `PATCH_MAX`.
pub(super) fn conv_forward(
    g: &Conv2dGeom,
    input: &[i8],
    weight: &[i8],
    bias: &[i32],
    q: ConvQuant<'_>,
    output: &mut [i8],
) -> bool {
    let (in_zp, requant, out_zp, act_min, act_max) = q.parts();
    if g.is_depthwise() && depthwise::dw_applies(g, in_zp) {
        depthwise::dw_forward(
            g, input, in_zp, weight, bias, requant, out_zp, act_min, act_max, output,
        );
        return true;
    }
    if g.dw_fast() || g.kh * g.kw * g.in_per_group() > PATCH_MAX {
        return false;
    }
    conv::conv_forward_patch(
        g, input, in_zp, weight, bias, requant, out_zp, act_min, act_max, output,
    );
    true
}

/// `split::split_forward` on the conv DSP path, for the weights `dsp_rows` takes.
pub(super) fn split_forward(
    g: &Conv2dGeom,
    x: &[i8],
    w: Weights<'_>,
    bias: &[i32],
    q: ConvQuant<'_>,
    y: &mut [i8],
) -> bool {
    let Some(rows) = dsp_rows(&w, g, q.in_zp) else {
        return false;
    };
    let (rq, amin, amax) = (q.requant, q.act_min, q.act_max);
    conv::conv_forward_rows(g, x, q.in_zp, rows, bias, rq, q.out_zp, amin, amax, y);
    true
}

/// `inplace::pw_forward_in_place` on the DSP path, for the weights `dsp_rows` takes.
pub(super) fn pw_forward_in_place(
    g: &Conv2dGeom,
    buf: &mut [i8],
    w: Weights<'_>,
    bias: &[i32],
    q: ConvQuant<'_>,
) -> bool {
    let (in_zp, rq, out_zp, amin, amax) = q.parts();
    let Some(rows) = dsp_rows(&w, g, in_zp) else {
        return false;
    };
    let (pixels, ci, co) = (g.in_h * g.in_w, g.in_c, g.out_c);
    conv::pw_in_place(
        pixels, ci, co, buf, in_zp, rows, bias, rq, out_zp, amin, amax,
    );
    true
}

/// The rows the DSP conv paths read: whole weights, or trained output channels below `k`
/// (input-channel splits take the portable loops), for a patch that fits their staging and an
/// int8-range zero point (so their int16 `x - zp` is the portable int32 one). Lengths were
/// checked by `Weights::check`.
fn dsp_rows<'w>(w: &Weights<'w>, g: &Conv2dGeom, in_zp: i32) -> Option<Rows<'w>> {
    if g.kh * g.kw * g.in_per_group() > PATCH_MAX || !(-128..=127).contains(&in_zp) {
        return None;
    }
    match *w {
        Weights::Whole(w) => Some(Rows::whole(w)),
        Weights::Split {
            flash,
            sram,
            axis: 0,
            k,
        } => Some(Rows {
            lo: sram,
            hi: flash,
            k,
        }),
        Weights::Split { .. } => None,
    }
}
