//! The portable twin of every kernel that has a DSP path, under the kernel's own name, compiled
//! on every target: the reference its dispatcher (`conv::conv2d_forward`, ...) must equal bit
//! for bit. On a build without the DSP paths the two are the same code; on thumbv7em the
//! equivalence firmware (`tt-mcu/examples/qemu-mps2-an386/src/bin/kernel_equivalence.rs`)
//! compares them. Each twin checks its buffers as its dispatcher does.
use super::add::{check_add_forward, requant_each_portable, AddParams, AddTerms};
use super::geom::{Conv2dGeom, Weights};
use super::{act, conv, inplace, split, ConvQuant};
use crate::error::Result;
use crate::quant::Requant;

/// `conv::conv2d_forward` without the DSP paths.
#[allow(clippy::too_many_arguments)]
pub fn conv2d_forward(
    g: &Conv2dGeom,
    input: &[i8],
    in_zp: i32,
    weight: &[i8],
    bias: &[i32],
    requant: &[Requant],
    out_zp: i32,
    act_min: i8,
    act_max: i8,
    output: &mut [i8],
) -> Result<()> {
    let q = ConvQuant::new(in_zp, requant, out_zp, act_min, act_max);
    conv::check_conv2d_forward(g, input, weight, bias, q, output)?;
    conv::conv2d_forward_portable(g, input, weight, bias, q, output);
    Ok(())
}

/// `conv::conv2d_depthwise_in_place_plane` without the DSP paths: one channel at a time.
#[allow(clippy::too_many_arguments)]
pub fn conv2d_depthwise_in_place_plane(
    g: &Conv2dGeom,
    buf: &mut [i8],
    in_zp: i32,
    w: &[i8],
    bias: &[i32],
    rq: &[Requant],
    out_zp: i32,
    amin: i8,
    amax: i8,
    plane: &mut [i8],
) -> Result<()> {
    let q = ConvQuant::new(in_zp, rq, out_zp, amin, amax);
    conv::check_depthwise_in_place_plane(g, buf, w, bias, q, plane)?;
    let kernel: conv::PlaneKernel = conv::dw_plane_forward;
    conv::plane_by_plane(g, buf, w, bias, q, plane, kernel);
    Ok(())
}

/// `act::clamp_mask_pack` without the DSP paths.
pub fn clamp_mask_pack(out_q: &[i8], act_min: i8, act_max: i8, bits: &mut [u8]) -> Result<()> {
    act::check_clamp_mask_pack(out_q, act_min, act_max, bits)?;
    act::clamp_mask_pack_portable(out_q, act_min, act_max, bits, false);
    Ok(())
}

/// `add::requant_each` without the DSP epilogue.
#[inline(always)]
pub fn requant_each(p: &AddParams, o: &mut [i8], sum: impl FnMut(usize, i8) -> i32) {
    requant_each_portable(p, o, sum)
}

/// `add::add_forward` without the DSP epilogue.
pub fn add_forward(p: &AddParams, a: &[i8], b: &[i8], output: &mut [i8]) -> Result<()> {
    check_add_forward(p, a, b, output)?;
    let t = AddTerms::new(p);
    requant_each(p, output, |i, _| t.a(a[i]).wrapping_add(t.b(b[i])));
    Ok(())
}

/// `split::split_forward` without the DSP paths.
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
    split::check_split_forward(g, x, w, bias, rq, y)?;
    let q = ConvQuant::new(in_zp, rq, out_zp, amin, amax);
    split::split_forward_portable(g, x, w, bias, q, y);
    Ok(())
}

/// `inplace::pw_forward_in_place` without the DSP paths.
#[allow(clippy::too_many_arguments)]
pub fn pw_forward_in_place(
    g: &Conv2dGeom,
    buf: &mut [i8],
    in_zp: i32,
    w: Weights<'_>,
    bias: &[i32],
    rq: &[Requant],
    out_zp: i32,
    amin: i8,
    amax: i8,
    px: &mut [i8],
) -> Result<()> {
    inplace::check_pw_forward_in_place(g, buf, w, bias, rq, px)?;
    let q = ConvQuant::new(in_zp, rq, out_zp, amin, amax);
    inplace::pw_forward_in_place_portable(g, buf, w, bias, q, px);
    Ok(())
}
