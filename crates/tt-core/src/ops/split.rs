//! Kernels over a layer's weights split between flash and SRAM: a partial channel update keeps
//! its trained rows (output axis) or columns (input axis) in SRAM and the rest frozen in flash,
//! and these read each weight from where it lives, with the arithmetic of the whole-weight
//! kernels in `conv`.
use super::geom::{Conv2dGeom, Weights};
use super::ConvQuant;
use crate::quant::{QParams, Requant};
use crate::{Error, Result};

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
/// arithmetic as the conv kernel, reading each weight from where it lives. On the DSP build,
/// output-channel splits take the conv kernel's DSP path.
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
    check_split_forward(g, x, w, bias, rq, y)?;
    let q = ConvQuant::new(in_zp, rq, out_zp, amin, amax);
    let on_dsp = dsp_or_portable!(super::arm::split_forward(g, x, w, bias, q, y), false);
    if !on_dsp {
        split_forward_portable(g, x, w, bias, q, y);
    }
    Ok(())
}

#[inline(always)]
pub(super) fn check_split_forward(
    g: &Conv2dGeom,
    x: &[i8],
    w: Weights<'_>,
    bias: &[i32],
    rq: &[Requant],
    y: &[i8],
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
    Ok(())
}

/// The portable `split_forward`, over checked buffers.
#[inline(always)]
pub(super) fn split_forward_portable(
    g: &Conv2dGeom,
    x: &[i8],
    w: Weights<'_>,
    bias: &[i32],
    q: ConvQuant<'_>,
    y: &mut [i8],
) {
    let (in_zp, rq, out_zp, amin, amax) = q.parts();
    let (icg, ocg, taps, oc_n, in_c) = (
        g.in_per_group(),
        g.out_per_group(),
        g.kh * g.kw,
        g.out_c,
        g.in_c,
    );
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
