//! Kernels whose output overwrites their input: the pointwise forward pixel by pixel, and the
//! depthwise input gradient plane by plane (with its per-plane scatter, which the fused block
//! backward also runs).
use super::geom::{Conv2dGeom, Weights};
use super::ConvQuant;
use crate::quant::Requant;
use crate::{Error, Result};

/// Depthwise taps staged as f32 for the input gradient (7x7 kernels and smaller).
const DW_STAGED_TAPS: usize = 49;
/// Pointwise conv whose output overwrites its input pixel by pixel: output pixel p only needs
/// input pixel p. Shrinking convs walk forward, expanding ones backward, so a write never lands
/// on an input pixel still to be read. `px` is one output pixel of scratch.
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
    check_pw_forward_in_place(g, buf, w, bias, rq, px)?;
    let q = ConvQuant::new(in_zp, rq, out_zp, amin, amax);
    let on_dsp = dsp_or_portable!(super::arm::pw_forward_in_place(g, buf, w, bias, q), false);
    if !on_dsp {
        pw_forward_in_place_portable(g, buf, w, bias, q, px);
    }
    Ok(())
}

#[inline(always)]
pub(super) fn check_pw_forward_in_place(
    g: &Conv2dGeom,
    buf: &[i8],
    w: Weights<'_>,
    bias: &[i32],
    rq: &[Requant],
    px: &[i8],
) -> Result<()> {
    g.validate()?;
    w.check(g)?;
    let co = g.out_c;
    if buf.len() < g.input_len()
        || buf.len() < g.output_len()
        || bias.len() != co
        || rq.len() != co
        || px.len() != co
    {
        return Err(Error::ShapeMismatch {
            what: "executor: in-place pointwise buffers",
            expected: g.output_len(),
            actual: buf.len(),
        });
    }
    Ok(())
}

/// The portable `pw_forward_in_place`, over checked buffers.
#[inline(always)]
pub(super) fn pw_forward_in_place_portable(
    g: &Conv2dGeom,
    buf: &mut [i8],
    w: Weights<'_>,
    bias: &[i32],
    q: ConvQuant<'_>,
    px: &mut [i8],
) {
    let (in_zp, rq, out_zp, amin, amax) = q.parts();
    let (ci, co) = (g.in_c, g.out_c);
    let pixels = g.in_h * g.in_w;
    for step in 0..pixels {
        let p = if co > ci { pixels - 1 - step } else { step };
        let x = &buf[p * ci..][..ci];
        for (o, d) in px.iter_mut().enumerate() {
            let mut acc = bias[o];
            for (i, &xv) in x.iter().enumerate() {
                acc =
                    acc.wrapping_add((xv as i32 - in_zp).wrapping_mul(w.at(o, 0, i, 1, ci) as i32));
            }
            let v = rq[o].apply(acc).saturating_add(out_zp);
            *d = v.clamp(amin as i32, amax as i32) as i8;
        }
        buf[p * co..][..co].copy_from_slice(px);
    }
}

/// Input gradient of one depthwise channel on planar (H x W) buffers: `gi` is overwritten with the
/// output gradient `go` scattered through the channel's `kh * kw` weights (dequantized by `scale`).
/// The caller has checked the plane sizes against `g`.
pub(crate) fn dw_plane_input_grad(
    g: &Conv2dGeom,
    go: &[f32],
    w: &[i8],
    scale: f32,
    gi: &mut [f32],
) {
    let (ow, kh, kw) = (g.out_w(), g.kh, g.kw);
    let (in_h, in_w) = (g.in_h as isize, g.in_w as isize);
    gi.fill(0.0);
    // The scaled taps once per plane instead of once per pixel and tap (the same products).
    let mut staged = [0f32; DW_STAGED_TAPS];
    let staged = staged.get_mut(..kh * kw).map(|s| {
        for (d, &wv) in s.iter_mut().zip(w) {
            *d = wv as f32 * scale;
        }
        &*s
    });
    let taps3: Option<[f32; 9]> = match (kh, kw, staged) {
        (3, 3, Some(s)) => s.try_into().ok(),
        _ => None,
    };
    let tap = |k: usize| match staged {
        Some(s) => s[k],
        None => w[k] as f32 * scale,
    };
    for oy in 0..g.out_h() {
        let iy0 = (oy * g.stride_h) as isize - g.pad_top as isize;
        // The taps inside the input, found once per row and pixel rather than tested per tap;
        // they run in the same order, so every sum is unchanged.
        let ky_lo = (-iy0).clamp(0, kh as isize) as usize;
        let ky_hi = (in_h - iy0).clamp(ky_lo as isize, kh as isize) as usize;
        for ox in 0..ow {
            let v = go[oy * ow + ox];
            if v == 0.0 {
                continue;
            }
            let ix0 = (ox * g.stride_w) as isize - g.pad_left as isize;
            let kx_lo = (-ix0).clamp(0, kw as isize) as usize;
            let kx_hi = (in_w - ix0).clamp(kx_lo as isize, kw as isize) as usize;
            if let (Some(t), true) = (taps3, ky_hi - ky_lo == 3 && kx_hi - kx_lo == 3) {
                // A 3x3 window wholly inside: the taps in registers, the rows unrolled.
                let (b, w) = ((iy0 * in_w + ix0) as usize, in_w as usize);
                let r = &mut gi[b..b + 2 * w + 3];
                for (ky, t) in t.chunks_exact(3).enumerate() {
                    let r = &mut r[ky * w..ky * w + 3];
                    r[0] += v * t[0];
                    r[1] += v * t[1];
                    r[2] += v * t[2];
                }
                continue;
            }
            if let Some(s) = staged {
                // Each tap row inside the input at once, unrolled: small planes (4x4 under a
                // 7x7 kernel) clip every window, and the per-tap loop was mostly overhead. A tap
                // of one pixel touches its own input, so any order within the pixel gives the
                // same sums.
                let n = kx_hi - kx_lo;
                for ky in ky_lo..ky_hi {
                    // In isize until the sum: a clipped window's ix0 is negative.
                    let base = ((iy0 + ky as isize) * in_w + ix0 + kx_lo as isize) as usize;
                    let k0 = ky * kw + kx_lo;
                    tap_row(&mut gi[base..base + n], &s[k0..k0 + n], v);
                }
                continue;
            }
            for ky in ky_lo..ky_hi {
                let base = (iy0 + ky as isize) * in_w + ix0;
                for kx in kx_lo..kx_hi {
                    gi[(base + kx as isize) as usize] += v * tap(ky * kw + kx);
                }
            }
        }
    }
}

/// `d += v * t`, entry by entry (`d` and `t` of one length): unrolled for the rows of kernels
/// up to 7 wide.
#[inline(always)]
fn tap_row(d: &mut [f32], t: &[f32], v: f32) {
    fn n<const N: usize>(d: &mut [f32], t: &[f32], v: f32) {
        if let (Ok(d), Ok(t)) = (<&mut [f32; N]>::try_from(d), <&[f32; N]>::try_from(t)) {
            for (d, &t) in d.iter_mut().zip(t) {
                *d += v * t;
            }
        }
    }
    match d.len() {
        1 => n::<1>(d, t, v),
        2 => n::<2>(d, t, v),
        3 => n::<3>(d, t, v),
        4 => n::<4>(d, t, v),
        5 => n::<5>(d, t, v),
        6 => n::<6>(d, t, v),
        7 => n::<7>(d, t, v),
        _ => {
            for (d, &t) in d.iter_mut().zip(t) {
                *d += v * t;
            }
        }
    }
}

/// Input gradient of a depthwise conv written over its output gradient, channel by channel.
pub fn dw_backward_in_place(
    g: &Conv2dGeom,
    buf: &mut [f32],
    w: &[i8],
    ws: &[f32],
    planes: &mut [f32],
) -> Result<()> {
    g.validate()?;
    let (c, taps, ow) = (g.in_c, g.kh * g.kw, g.out_w());
    let (ipix, opix) = (g.in_h * g.in_w, g.out_h() * ow);
    if buf.len() < g.input_len()
        || buf.len() < g.output_len()
        || w.len() != c * taps
        || ws.len() != c
        || planes.len() != ipix + opix
    {
        return Err(Error::ShapeMismatch {
            what: "executor: in-place depthwise gradient buffers",
            expected: g.input_len(),
            actual: buf.len(),
        });
    }
    let (gi, go) = planes.split_at_mut(ipix);
    for ch in 0..c {
        for (p, v) in go.iter_mut().enumerate() {
            *v = buf[p * c + ch];
        }
        dw_plane_input_grad(g, go, &w[ch * taps..(ch + 1) * taps], ws[ch], gi);
        for (p, &v) in gi.iter().enumerate() {
            buf[p * c + ch] = v;
        }
    }
    Ok(())
}
