//! 2-D convolution: int8 forward with fixed-point requantization, f32 backward.
//!
//! Layouts: input `[in_h][in_w][in_c]`, output `[out_h][out_w][out_c]`, weight OHWI
//! `[out_c][kh][kw][in_c / groups]`. Padding contributes the input zero point (real zero).
//! Depthwise layers (`groups == in_c == out_c`) take a channel-vectorized path.
pub use super::geom::Conv2dGeom;
use super::geom::DW_MAX_TAPS;
use super::{ChannelAxis, ChannelSelection, ConvQuant};
use crate::error::{Error, Result};
use crate::quant::{check_act, check_len, QParams, Requant};

/// Channels processed together by the depthwise paths (accumulators live on the stack).
const DW_CHUNK: usize = 16;
/// The wider block the depthwise forward uses for kernels up to 5x5.
const DW_WIDE: usize = 32;
const DW_WIDE_MAX_TAPS: usize = 25;
/// Largest kernel the depthwise input gradient stages (f32, 1.6 KB of stack).
const DW_BWD_MAX_TAPS: usize = 25;
/// Input channels per group the general forward stages as int16 (1 KB of stack); wider
/// groups take the unstaged path.
const XZ_MAX: usize = 512;
/// Output channels accumulated together by the general forward.
const OC_BLOCK: usize = 64;
/// Row length (taps x channels) from which the backward paths skip zero gradients.
const SKIP_ZERO_MIN: usize = 64;

#[inline]
fn idx(i0: isize, k: usize) -> usize {
    (i0 + k as isize) as usize
}

/// Int8 forward: `out = clamp(requant[o](bias[o] + sum (x - in_zp) * w) + out_zp)`.
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
    check_conv2d_forward(g, input, weight, bias, q, output)?;
    let on_dsp = dsp_or_portable!(
        super::arm::conv_forward(g, input, weight, bias, q, output),
        false
    );
    if !on_dsp {
        conv2d_forward_portable(g, input, weight, bias, q, output);
    }
    Ok(())
}

#[inline(always)]
pub(super) fn check_conv2d_forward(
    g: &Conv2dGeom,
    input: &[i8],
    weight: &[i8],
    bias: &[i32],
    q: ConvQuant<'_>,
    output: &[i8],
) -> Result<()> {
    let ConvQuant {
        requant,
        act_min,
        act_max,
        ..
    } = q;
    g.validate()?;
    check_len("conv2d_forward: input", g.input_len(), input.len())?;
    check_len("conv2d_forward: weight", g.weight_len(), weight.len())?;
    check_len("conv2d_forward: bias", g.out_c, bias.len())?;
    check_len("conv2d_forward: requant", g.out_c, requant.len())?;
    check_len("conv2d_forward: output", g.output_len(), output.len())?;
    check_act(act_min, act_max)
}

/// The portable `conv2d_forward`, over checked buffers.
#[inline(always)]
pub(super) fn conv2d_forward_portable(
    g: &Conv2dGeom,
    input: &[i8],
    weight: &[i8],
    bias: &[i32],
    q: ConvQuant<'_>,
    output: &mut [i8],
) {
    let (in_zp, requant, out_zp, act_min, act_max) = q.parts();
    if g.dw_fast() {
        dw_forward(
            g, input, in_zp, weight, bias, requant, out_zp, act_min, act_max, output,
        );
        return;
    }
    let (icg, ocg, kw) = (g.in_per_group(), g.out_per_group(), g.kw);
    let taps = g.kh * g.kw;
    let (ow, oc_n, in_c) = (g.out_w(), g.out_c, g.in_c);
    if icg <= XZ_MAX {
        // One tap's input slice minus the zero point, staged once and reused by a block of
        // output channels: the inner loop is then a single-accumulator int16 dot product.
        let mut xz = [0i16; XZ_MAX];
        let mut acc = [0i32; OC_BLOCK];
        for oy in 0..g.out_h() {
            let (iy0, ky_lo, ky_hi) = g.rows(oy);
            for ox in 0..ow {
                let (ix0, kx_lo, kx_hi) = g.cols(ox);
                let out_px = &mut output[(oy * ow + ox) * oc_n..][..oc_n];
                for grp in 0..g.groups {
                    let mut o0 = grp * ocg;
                    let o_end = o0 + ocg;
                    while o0 < o_end {
                        let nb = OC_BLOCK.min(o_end - o0);
                        acc[..nb].copy_from_slice(&bias[o0..o0 + nb]);
                        for ky in ky_lo..ky_hi {
                            let row = idx(iy0, ky) * g.in_w;
                            for kx in kx_lo..kx_hi {
                                let x = &input[(row + idx(ix0, kx)) * in_c + grp * icg..][..icg];
                                for (d, &v) in xz[..icg].iter_mut().zip(x) {
                                    *d = (v as i32).wrapping_sub(in_zp) as i16;
                                }
                                let t = ky * kw + kx;
                                for (j, a) in acc[..nb].iter_mut().enumerate() {
                                    let w = &weight[((o0 + j) * taps + t) * icg..][..icg];
                                    *a = a.wrapping_add(dot_i16(&xz[..icg], w));
                                }
                            }
                        }
                        for j in 0..nb {
                            out_px[o0 + j] =
                                requant[o0 + j].apply_clamp(acc[j], out_zp, act_min, act_max);
                        }
                        o0 += nb;
                    }
                }
            }
        }
        return;
    }
    for oy in 0..g.out_h() {
        let (iy0, ky_lo, ky_hi) = g.rows(oy);
        for ox in 0..ow {
            let (ix0, kx_lo, kx_hi) = g.cols(ox);
            let out_px = &mut output[(oy * ow + ox) * oc_n..][..oc_n];
            for (oc, out_v) in out_px.iter_mut().enumerate() {
                let grp = oc / ocg;
                let wrow = &weight[oc * taps * icg..][..taps * icg];
                let mut acc = bias[oc];
                for ky in ky_lo..ky_hi {
                    let row = idx(iy0, ky) * g.in_w;
                    for kx in kx_lo..kx_hi {
                        let x = &input[(row + idx(ix0, kx)) * in_c + grp * icg..][..icg];
                        let w = &wrow[(ky * kw + kx) * icg..][..icg];
                        acc = acc.wrapping_add(dot_zp(x, w, in_zp));
                    }
                }
                *out_v = requant[oc].apply_clamp(acc, out_zp, act_min, act_max);
            }
        }
    }
}

/// `sum (x - zp) * w`, as `sum x*w - zp * sum w` so the loop is a plain int dot product.
#[inline]
fn dot_zp(x: &[i8], w: &[i8], zp: i32) -> i32 {
    let mut s: i32 = 0;
    let mut sw: i32 = 0;
    for (&a, &b) in x.iter().zip(w) {
        s = s.wrapping_add(a as i32 * b as i32);
        sw = sw.wrapping_add(b as i32);
    }
    s.wrapping_sub(zp.wrapping_mul(sw))
}

/// `sum xz * w` with the zero point already subtracted (int16 lanes).
#[inline]
fn dot_i16(xz: &[i16], w: &[i8]) -> i32 {
    let mut s: i32 = 0;
    for (&a, &b) in xz.iter().zip(w) {
        s = s.wrapping_add(a as i32 * b as i32);
    }
    s
}

/// `acc[j] += (x[j] - zp) * w[j]` over a fixed number of lanes, multiplying in int16: with
/// `zp` in int8 range, `|x - zp| <= 255` and `|w| <= 128`, so the product fits (<= 32640).
#[inline(always)]
fn dw_mac16<const N: usize>(acc: &mut [i32], x: &[i8], w: &[i16], zp: i16) {
    let (acc, x, w) = (&mut acc[..N], &x[..N], &w[..N]);
    for j in 0..N {
        acc[j] = acc[j].wrapping_add(((x[j] as i16 - zp) * w[j]) as i32);
    }
}

#[allow(clippy::too_many_arguments)]
fn dw_forward(
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
) {
    let p = DwParams {
        g,
        input,
        in_zp,
        weight,
        bias,
        requant,
        out_zp,
        act_min,
        act_max,
    };
    let taps = g.kh * g.kw;
    // One staging buffer serves both block widths (2 KB of stack, as much as MCUs spare).
    const STAGE: usize = if DW_WIDE * DW_WIDE_MAX_TAPS > DW_CHUNK * DW_MAX_TAPS {
        DW_WIDE * DW_WIDE_MAX_TAPS
    } else {
        DW_CHUNK * DW_MAX_TAPS
    };
    let mut stage = [0i16; STAGE];
    let mut c0 = 0;
    while c0 < g.in_c {
        let rem = g.in_c - c0;
        // 32 channels per pass where they fit (fewer passes over the pixels), else 16.
        let n = if rem >= DW_WIDE && taps <= DW_WIDE_MAX_TAPS {
            dw_forward_block::<DW_WIDE>(&p, c0, DW_WIDE, &mut stage, output);
            DW_WIDE
        } else {
            let n = rem.min(DW_CHUNK);
            dw_forward_block::<DW_CHUNK>(&p, c0, n, &mut stage, output);
            n
        };
        c0 += n;
    }
}

struct DwParams<'a> {
    g: &'a Conv2dGeom,
    input: &'a [i8],
    in_zp: i32,
    weight: &'a [i8],
    bias: &'a [i32],
    requant: &'a [Requant],
    out_zp: i32,
    act_min: i8,
    act_max: i8,
}

/// Channels `c0..c0 + n` (`n <= N`) of a depthwise forward; full blocks (`n == N`) run on
/// fixed-width lanes. `wt` stages the block's weights tap-major (`N` per tap).
fn dw_forward_block<const N: usize>(
    p: &DwParams<'_>,
    c0: usize,
    n: usize,
    wt: &mut [i16],
    output: &mut [i8],
) {
    let g = p.g;
    let (c, kw, taps, ow) = (g.in_c, g.kw, g.kh * g.kw, g.out_w());
    // int16 products need an int8-range zero point; any other takes the int32 lanes.
    let narrow = (-128..=127).contains(&p.in_zp);
    for t in 0..taps {
        for j in 0..n {
            wt[t * N + j] = p.weight[(c0 + j) * taps + t] as i16;
        }
    }
    for oy in 0..g.out_h() {
        let (iy0, ky_lo, ky_hi) = g.rows(oy);
        for ox in 0..ow {
            let (ix0, kx_lo, kx_hi) = g.cols(ox);
            let mut acc = [0i32; N];
            acc[..n].copy_from_slice(&p.bias[c0..c0 + n]);
            for ky in ky_lo..ky_hi {
                let row = idx(iy0, ky) * g.in_w;
                for kx in kx_lo..kx_hi {
                    let x = &p.input[(row + idx(ix0, kx)) * c + c0..][..n];
                    let w = &wt[(ky * kw + kx) * N..][..n];
                    if narrow && n == N {
                        dw_mac16::<N>(&mut acc, x, w, p.in_zp as i16);
                    } else {
                        for j in 0..n {
                            acc[j] = acc[j].wrapping_add(
                                (x[j] as i32)
                                    .wrapping_sub(p.in_zp)
                                    .wrapping_mul(w[j] as i32),
                            );
                        }
                    }
                }
            }
            let out = &mut output[(oy * ow + ox) * c + c0..][..n];
            for j in 0..n {
                out[j] = p.requant[c0 + j].apply_clamp(acc[j], p.out_zp, p.act_min, p.act_max);
            }
        }
    }
}

/// Int32 accumulation for imported models whose weights are not symmetric:
/// `acc = bias[o] + sum (x - in_zp) * (w - weight_zp[o])`, written as int32 per output element
/// (ONNX ConvInteger / the accumulation half of QLinearConv). `weight_zp` has one entry per
/// output channel or a single per-tensor entry; `bias` may be empty (no bias).
#[allow(clippy::too_many_arguments)]
pub fn conv2d_accumulate(
    g: &Conv2dGeom,
    input: &[i8],
    in_zp: i32,
    weight: &[i8],
    weight_zp: &[i32],
    bias: &[i32],
    acc_out: &mut [i32],
) -> Result<()> {
    g.validate()?;
    check_len("conv2d_accumulate: input", g.input_len(), input.len())?;
    check_len("conv2d_accumulate: weight", g.weight_len(), weight.len())?;
    if weight_zp.len() != 1 && weight_zp.len() != g.out_c {
        return Err(Error::ShapeMismatch {
            what: "conv2d_accumulate: weight zero point (per tensor or per channel)",
            expected: g.out_c,
            actual: weight_zp.len(),
        });
    }
    if !bias.is_empty() {
        check_len("conv2d_accumulate: bias", g.out_c, bias.len())?;
    }
    check_len("conv2d_accumulate: output", g.output_len(), acc_out.len())?;
    let (icg, ocg, kw, taps) = (g.in_per_group(), g.out_per_group(), g.kw, g.kh * g.kw);
    let (ow, oc_n, in_c) = (g.out_w(), g.out_c, g.in_c);
    for oy in 0..g.out_h() {
        let (iy0, ky_lo, ky_hi) = g.rows(oy);
        for ox in 0..ow {
            let (ix0, kx_lo, kx_hi) = g.cols(ox);
            let out_px = &mut acc_out[(oy * ow + ox) * oc_n..][..oc_n];
            for (oc, out_v) in out_px.iter_mut().enumerate() {
                let grp = oc / ocg;
                let wzp = if weight_zp.len() == 1 {
                    weight_zp[0]
                } else {
                    weight_zp[oc]
                };
                let wrow = &weight[oc * taps * icg..][..taps * icg];
                let mut acc = if bias.is_empty() { 0 } else { bias[oc] };
                for ky in ky_lo..ky_hi {
                    let row = idx(iy0, ky) * g.in_w;
                    for kx in kx_lo..kx_hi {
                        let x = &input[(row + idx(ix0, kx)) * in_c + grp * icg..][..icg];
                        let w = &wrow[(ky * kw + kx) * icg..][..icg];
                        for (&a, &b) in x.iter().zip(w) {
                            acc = acc.wrapping_add(
                                (a as i32)
                                    .wrapping_sub(in_zp)
                                    .wrapping_mul((b as i32).wrapping_sub(wzp)),
                            );
                        }
                    }
                }
                *out_v = acc;
            }
        }
    }
    Ok(())
}

/// Gradient w.r.t. the (dequantized) input: `grad_in = conv_transpose(grad_out, s_w * w)`.
/// Overwrites `grad_in`. `grad_out` should already carry the output clamp mask
/// (see `act::clamp_mask_backward`).
pub fn conv2d_backward_input(
    g: &Conv2dGeom,
    grad_out: &[f32],
    weight: &[i8],
    weight_scale: &[f32],
    grad_in: &mut [f32],
) -> Result<()> {
    g.validate()?;
    check_len(
        "conv2d_backward_input: grad_out",
        g.output_len(),
        grad_out.len(),
    )?;
    check_len(
        "conv2d_backward_input: weight",
        g.weight_len(),
        weight.len(),
    )?;
    check_len(
        "conv2d_backward_input: weight_scale",
        g.out_c,
        weight_scale.len(),
    )?;
    check_len(
        "conv2d_backward_input: grad_in",
        g.input_len(),
        grad_in.len(),
    )?;
    grad_in.fill(0.0);
    if g.is_depthwise() && g.kh * g.kw <= DW_BWD_MAX_TAPS {
        dw_backward_input(g, grad_out, weight, weight_scale, grad_in);
        return Ok(());
    }
    let (icg, ocg, kw, taps) = (g.in_per_group(), g.out_per_group(), g.kw, g.kh * g.kw);
    let (ow, oc_n, in_c) = (g.out_w(), g.out_c, g.in_c);
    let skip_zero = icg * taps >= SKIP_ZERO_MIN;
    for oy in 0..g.out_h() {
        let (iy0, ky_lo, ky_hi) = g.rows(oy);
        for ox in 0..ow {
            let (ix0, kx_lo, kx_hi) = g.cols(ox);
            let go_px = &grad_out[(oy * ow + ox) * oc_n..][..oc_n];
            for (oc, &go) in go_px.iter().enumerate() {
                // Clamped outputs (masked to zero) are skipped when that saves more than the
                // mispredicted branch costs, i.e. for long rows.
                if go == 0.0 && skip_zero {
                    continue;
                }
                let gs = go * weight_scale[oc];
                let grp = oc / ocg;
                let wrow = &weight[oc * taps * icg..][..taps * icg];
                for ky in ky_lo..ky_hi {
                    let row = idx(iy0, ky) * g.in_w;
                    for kx in kx_lo..kx_hi {
                        let gi = &mut grad_in[(row + idx(ix0, kx)) * in_c + grp * icg..][..icg];
                        let w = &wrow[(ky * kw + kx) * icg..][..icg];
                        for (d, &wv) in gi.iter_mut().zip(w) {
                            *d += gs * wv as f32;
                        }
                    }
                }
            }
        }
    }
    Ok(())
}

fn dw_backward_input(
    g: &Conv2dGeom,
    grad_out: &[f32],
    weight: &[i8],
    weight_scale: &[f32],
    grad_in: &mut [f32],
) {
    let (c, kw, taps, ow) = (g.in_c, g.kw, g.kh * g.kw, g.out_w());
    let mut wt = [0f32; DW_CHUNK * DW_BWD_MAX_TAPS];
    let mut c0 = 0;
    while c0 < c {
        let n = DW_CHUNK.min(c - c0);
        for t in 0..taps {
            for j in 0..n {
                wt[t * DW_CHUNK + j] = weight[(c0 + j) * taps + t] as f32 * weight_scale[c0 + j];
            }
        }
        for oy in 0..g.out_h() {
            let (iy0, ky_lo, ky_hi) = g.rows(oy);
            for ox in 0..ow {
                let (ix0, kx_lo, kx_hi) = g.cols(ox);
                let go = &grad_out[(oy * ow + ox) * c + c0..][..n];
                for ky in ky_lo..ky_hi {
                    let row = idx(iy0, ky) * g.in_w;
                    for kx in kx_lo..kx_hi {
                        let gi = &mut grad_in[(row + idx(ix0, kx)) * c + c0..][..n];
                        let w = &wt[(ky * kw + kx) * DW_CHUNK..][..n];
                        for j in 0..n {
                            gi[j] += go[j] * w[j];
                        }
                    }
                }
            }
        }
        c0 += n;
    }
}

/// Gradient w.r.t. the real weights `W = s_w * w` for the selected channels, accumulated into
/// `grad_w` (`+=`), laid out as the selected block of OHWI: `[count][kh][kw][in_c/groups]` for an
/// output-axis selection, `[out_c][kh][kw][count]` for an input-axis one.
///
/// `input` is the saved layer input: all `in_c` channels per pixel for an output-axis selection;
/// for an input-axis selection only the first `count` channels per pixel (`[in_h][in_w][count]`,
/// see `ops::save_input_channels`).
pub fn conv2d_backward_weight(
    g: &Conv2dGeom,
    input: &[i8],
    in_q: QParams,
    grad_out: &[f32],
    sel: ChannelSelection,
    grad_w: &mut [f32],
) -> Result<()> {
    g.validate()?;
    let ws = g.weight_shape();
    sel.check(&ws)?;
    let xc = sel.saved_input_channels(g.in_c);
    check_len(
        "conv2d_backward_weight: saved input",
        g.in_h * g.in_w * xc,
        input.len(),
    )?;
    check_len(
        "conv2d_backward_weight: grad_out",
        g.output_len(),
        grad_out.len(),
    )?;
    check_len(
        "conv2d_backward_weight: grad_w",
        sel.selected_len(&ws),
        grad_w.len(),
    )?;
    if sel.count == 0 {
        return Ok(());
    }
    let s_in = in_q.scale;
    let zp = in_q.zero_point;
    if g.dw_fast() && sel.axis == ChannelAxis::Output {
        dw_backward_weight(g, input, s_in, zp, grad_out, sel.count, grad_w);
        return Ok(());
    }
    let (icg, ocg, kw, taps) = (g.in_per_group(), g.out_per_group(), g.kw, g.kh * g.kw);
    let (ow, oc_n) = (g.out_w(), g.out_c);
    let rows = sel.rows(&ws);
    let cols = sel.cols(&ws);
    let skip_zero = cols * taps >= SKIP_ZERO_MIN;
    for oy in 0..g.out_h() {
        let (iy0, ky_lo, ky_hi) = g.rows(oy);
        for ox in 0..ow {
            let (ix0, kx_lo, kx_hi) = g.cols(ox);
            let go_px = &grad_out[(oy * ow + ox) * oc_n..][..rows];
            for (oc, &go) in go_px.iter().enumerate() {
                if go == 0.0 && skip_zero {
                    continue;
                }
                let gs = go * s_in;
                let grp = oc / ocg;
                for ky in ky_lo..ky_hi {
                    let row = idx(iy0, ky) * g.in_w;
                    for kx in kx_lo..kx_hi {
                        let x = &input[(row + idx(ix0, kx)) * xc + grp * icg..][..cols];
                        let gw = &mut grad_w[(oc * taps + ky * kw + kx) * cols..][..cols];
                        for (d, &xv) in gw.iter_mut().zip(x) {
                            *d += gs * (xv as i32).wrapping_sub(zp) as f32;
                        }
                    }
                }
            }
        }
    }
    Ok(())
}

fn dw_backward_weight(
    g: &Conv2dGeom,
    input: &[i8],
    s_in: f32,
    zp: i32,
    grad_out: &[f32],
    count: usize,
    grad_w: &mut [f32],
) {
    let (c, kw, taps, ow) = (g.in_c, g.kw, g.kh * g.kw, g.out_w());
    let mut c0 = 0;
    while c0 < count {
        let n = DW_CHUNK.min(count - c0);
        for ky in 0..g.kh {
            for kx in 0..kw {
                let mut acc = [0f32; DW_CHUNK];
                for oy in 0..g.out_h() {
                    let (iy0, ky_lo, ky_hi) = g.rows(oy);
                    if ky < ky_lo || ky >= ky_hi {
                        continue;
                    }
                    let row = idx(iy0, ky) * g.in_w;
                    for ox in 0..ow {
                        let (ix0, kx_lo, kx_hi) = g.cols(ox);
                        if kx < kx_lo || kx >= kx_hi {
                            continue;
                        }
                        let x = &input[(row + idx(ix0, kx)) * c + c0..][..n];
                        let go = &grad_out[(oy * ow + ox) * c + c0..][..n];
                        for j in 0..n {
                            acc[j] += go[j] * (x[j] as i32).wrapping_sub(zp) as f32;
                        }
                    }
                }
                let t = ky * kw + kx;
                for j in 0..n {
                    grad_w[(c0 + j) * taps + t] += acc[j] * s_in;
                }
            }
        }
        c0 += n;
    }
}

/// Gradient w.r.t. the real bias: the sum of `grad_out` over pixels, accumulated (`+=`).
pub fn conv2d_backward_bias(g: &Conv2dGeom, grad_out: &[f32], grad_b: &mut [f32]) -> Result<()> {
    g.validate()?;
    check_len(
        "conv2d_backward_bias: grad_out",
        g.output_len(),
        grad_out.len(),
    )?;
    check_len("conv2d_backward_bias: grad_b", g.out_c, grad_b.len())?;
    for px in grad_out.chunks_exact(g.out_c) {
        for (b, &v) in grad_b.iter_mut().zip(px) {
            *b += v;
        }
    }
    Ok(())
}

/// Scratch bytes `conv2d_depthwise_in_place` needs: `kh` input rows.
pub fn depthwise_in_place_scratch_len(g: &Conv2dGeom) -> usize {
    g.kh.saturating_mul(g.in_w).saturating_mul(g.in_c)
}

/// Depthwise conv that writes its output over its own input, so a layer costs
/// `max(input, output) + kh input rows` of SRAM instead of `input + output` (DESIGN: the
/// early MobileNet stages do not fit otherwise). `buf` holds the input (`g.input_len()`
/// bytes); on return its first `g.output_len()` bytes hold the output, bit-identical to
/// `conv2d_forward`. Each output row is computed from copies of the input rows it needs, kept
/// in `scratch` (`depthwise_in_place_scratch_len(g)` bytes), taken before any output byte
/// lands on them; a geometry where an output row would overwrite input not yet copied (an
/// output wider than its input) is refused with an error before anything is written.
#[allow(clippy::too_many_arguments)]
pub fn conv2d_depthwise_in_place(
    g: &Conv2dGeom,
    buf: &mut [i8],
    in_zp: i32,
    weight: &[i8],
    bias: &[i32],
    requant: &[Requant],
    out_zp: i32,
    act_min: i8,
    act_max: i8,
    scratch: &mut [i8],
) -> Result<()> {
    g.validate()?;
    if !g.is_depthwise() {
        return Err(Error::InvalidParameter {
            what: "conv2d_depthwise_in_place: needs groups == in_c == out_c",
        });
    }
    check_len(
        "conv2d_depthwise_in_place: buffer",
        g.input_len(),
        buf.len(),
    )?;
    check_len(
        "conv2d_depthwise_in_place: scratch",
        depthwise_in_place_scratch_len(g),
        scratch.len(),
    )?;
    check_len(
        "conv2d_depthwise_in_place: weight",
        g.weight_len(),
        weight.len(),
    )?;
    check_len("conv2d_depthwise_in_place: bias", g.out_c, bias.len())?;
    check_len("conv2d_depthwise_in_place: requant", g.out_c, requant.len())?;
    check_act(act_min, act_max)?;
    if g.output_len() > g.input_len() {
        return Err(Error::InvalidParameter {
            what: "conv2d_depthwise_in_place: output larger than input",
        });
    }
    let row_in = g.in_w * g.in_c;
    let row_out = g.out_w() * g.out_c;
    // The input rows output row `oy` reads: `[a, b)`, possibly empty (all padding).
    let window = |oy: usize| {
        let (iy0, lo, hi) = g.rows(oy);
        (idx(iy0, lo), idx(iy0, hi).max(idx(iy0, lo)), lo, hi)
    };
    // Dry run of the copy schedule: a row is copied into scratch right before the first output
    // row that reads it, when the output rows before have written `oy * row_out` bytes.
    let mut copied_to = 0;
    for oy in 0..g.out_h() {
        let (a, b, _, _) = window(oy);
        let first_new = a.max(copied_to);
        if b > first_new {
            if oy * row_out > first_new * row_in {
                return Err(Error::InvalidParameter {
                    what: "conv2d_depthwise_in_place: output would overwrite input still needed",
                });
            }
            copied_to = b;
        }
    }
    // Scratch holds input rows [win_lo, win_hi), in order, from its start.
    let (mut win_lo, mut win_hi) = (0usize, 0usize);
    for oy in 0..g.out_h() {
        let (a, b, lo, hi) = window(oy);
        if b == a {
            // Padding only: every tap contributes zero, the output is the bias.
            for (i, o) in buf[oy * row_out..][..row_out].iter_mut().enumerate() {
                let c = i % g.out_c;
                *o = requant[c].apply_clamp(bias[c], out_zp, act_min, act_max);
            }
            continue;
        }
        let kept = win_hi.min(b).saturating_sub(a.max(win_lo));
        if kept > 0 {
            scratch.copy_within((a - win_lo) * row_in..(a - win_lo + kept) * row_in, 0);
        }
        (win_lo, win_hi) = (a, b);
        for r in (a + kept)..b {
            let dst = (r - a) * row_in;
            // Not yet overwritten: the dry run above checked `oy * row_out <= r * row_in`.
            let (src, dst_s) = (r * row_in, &mut scratch[dst..dst + row_in]);
            dst_s.copy_from_slice(&buf[src..src + row_in]);
        }
        let sub = Conv2dGeom {
            in_h: b - a,
            pad_top: lo,
            pad_bottom: g.kh - hi,
            stride_h: 1,
            ..*g
        };
        conv2d_forward(
            &sub,
            &scratch[..(b - a) * row_in],
            in_zp,
            weight,
            bias,
            requant,
            out_zp,
            act_min,
            act_max,
            &mut buf[oy * row_out..][..row_out],
        )?;
    }
    Ok(())
}

/// Depthwise conv whose output overwrites its input (`buf`, HWC) with only `plane`
/// (`out_h * out_w` bytes) of scratch, the executor's in-place depthwise: channel `c` of the
/// output only needs channel `c` of the input, which is dead once its plane is computed, so
/// the portable path (the oracle) goes one channel at a time; the Arm DSP build takes four
/// channels at a time wherever the plane holds their pending pixels (`arm::dw_in_place`).
/// Output bit-identical to `conv2d_forward`.
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
    check_depthwise_in_place_plane(g, buf, w, bias, q, plane)?;
    // Four channels at a time where the plane holds their pending rows; else one at a time.
    if dsp_or_portable!(
        super::arm::dw_in_place(g, buf, in_zp, w, bias, rq, out_zp, amin, amax, plane),
        false
    ) {
        return Ok(());
    }
    let plane_kernel = dsp_or_portable!(super::arm::dw_plane, dw_plane_forward);
    plane_by_plane(g, buf, w, bias, q, plane, plane_kernel);
    Ok(())
}

#[inline(always)]
pub(super) fn check_depthwise_in_place_plane(
    g: &Conv2dGeom,
    buf: &[i8],
    w: &[i8],
    bias: &[i32],
    q: ConvQuant<'_>,
    plane: &[i8],
) -> Result<()> {
    let (rq, amin, amax) = (q.requant, q.act_min, q.act_max);
    g.validate()?;
    if !g.is_depthwise() {
        return Err(Error::InvalidParameter {
            what: "conv2d_depthwise_in_place_plane: needs groups == in_c == out_c",
        });
    }
    check_act(amin, amax)?;
    let (c, taps, ow) = (g.in_c, g.kh * g.kw, g.out_w());
    let opix = g.out_h() * ow;
    if buf.len() < g.input_len()
        || buf.len() < g.output_len()
        || w.len() != c * taps
        || bias.len() != c
        || rq.len() != c
        || plane.len() != opix
    {
        return Err(Error::ShapeMismatch {
            what: "conv2d_depthwise_in_place_plane: buffers",
            expected: g.input_len(),
            actual: buf.len(),
        });
    }
    Ok(())
}

/// One depthwise plane's kernel: channel `ch` of the HWC `buf` into the planar `plane`.
pub(super) type PlaneKernel =
    fn(&Conv2dGeom, &[i8], usize, i32, &[i8], i32, &Requant, i32, i8, i8, &mut [i8]);

/// The in-place depthwise one channel at a time over checked buffers: channel `c` of the
/// output only needs channel `c` of the input, which is dead once its plane is computed.
#[inline(always)]
pub(super) fn plane_by_plane(
    g: &Conv2dGeom,
    buf: &mut [i8],
    w: &[i8],
    bias: &[i32],
    q: ConvQuant<'_>,
    plane: &mut [i8],
    kernel: PlaneKernel,
) {
    let (in_zp, rq, out_zp, amin, amax) = q.parts();
    let (c, taps) = (g.in_c, g.kh * g.kw);
    for ch in 0..c {
        let wc = &w[ch * taps..][..taps];
        kernel(
            g, buf, ch, in_zp, wc, bias[ch], &rq[ch], out_zp, amin, amax, plane,
        );
        for (p, &v) in plane.iter().enumerate() {
            buf[p * c + ch] = v;
        }
    }
}

/// Channel `ch` of a depthwise conv over the HWC `buf` into the planar `plane`, tap by tap
/// (the portable loop, and the oracle of the DSP build's `arm::dw_plane`). Sizes were checked
/// by the caller.
#[allow(clippy::too_many_arguments)]
pub(super) fn dw_plane_forward(
    g: &Conv2dGeom,
    buf: &[i8],
    ch: usize,
    in_zp: i32,
    w: &[i8],
    bias: i32,
    rq: &Requant,
    out_zp: i32,
    amin: i8,
    amax: i8,
    plane: &mut [i8],
) {
    let (c, ow) = (g.in_c, g.out_w());
    for oy in 0..g.out_h() {
        for ox in 0..ow {
            let mut acc = bias;
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
                    let xv = buf[(iy as usize * g.in_w + ix as usize) * c + ch] as i32;
                    let wv = w[ky * g.kw + kx] as i32;
                    // Wrapping as the other paths: a zero point is external data.
                    acc = acc.wrapping_add(xv.wrapping_sub(in_zp).wrapping_mul(wv));
                }
            }
            plane[oy * ow + ox] = rq.apply_clamp(acc, out_zp, amin, amax);
        }
    }
}
