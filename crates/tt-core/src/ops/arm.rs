//! Forward conv paths for Cortex-M4/M7 (thumbv7em, DSP extension): packed 16-bit
//! multiply-accumulates (`SMLAD`, two MACs per instruction) on int8 pairs widened with `SXTB16`.
//! The portable loops in `conv.rs` stay the reference: every result here is the same integer
//! sum (wrapping, as there), so outputs are bit-identical; `conv.rs` picks these paths only for
//! the geometries they handle and falls back to the portable ones otherwise.
use core::arch::asm;

use super::conv::{tap_range, Conv2dGeom};
use crate::quant::Requant;

/// Elements (taps x input channels per group) of one staged patch of the general path
/// (1 KB of stack each; two are staged).
pub(super) const PATCH_MAX: usize = 512;
/// Channels per pass of the depthwise path and the largest kernel it stages (864 B of weights).
const DW_BLOCK: usize = 48;
const DW_MAX_TAPS: usize = 9;

/// Lanes 0 and 2 of four int8, sign-extended to two int16.
#[inline(always)]
fn sxtb16(x: u32) -> u32 {
    let r: u32;
    // SAFETY: register-only arithmetic, available on every thumbv7em core (DSP extension).
    unsafe {
        asm!("sxtb16 {r}, {x}", r = lateout(reg) r, x = in(reg) x,
             options(pure, nomem, nostack, preserves_flags))
    };
    r
}

/// Lanes 1 and 3 of four int8, sign-extended to two int16.
#[inline(always)]
fn sxtb16_ror8(x: u32) -> u32 {
    let r: u32;
    // SAFETY: as `sxtb16`.
    unsafe {
        asm!("sxtb16 {r}, {x}, ror #8", r = lateout(reg) r, x = in(reg) x,
             options(pure, nomem, nostack, preserves_flags))
    };
    r
}

/// `acc + a.lo * b.lo + a.hi * b.hi` (int16 lanes), wrapping like the portable `wrapping_add`.
#[inline(always)]
fn smlad(a: u32, b: u32, acc: i32) -> i32 {
    let r: i32;
    // SAFETY: register-only arithmetic; it may set the sticky Q flag, which nothing reads.
    unsafe {
        asm!("smlad {r}, {a}, {b}, {c}", r = lateout(reg) r, a = in(reg) a, b = in(reg) b,
             c = in(reg) acc, options(pure, nomem, nostack))
    };
    r
}

/// `Requant::apply_clamp` for the multipliers below 1/2 that `Requant::from_scale` produces for
/// every layer scale under 1/2 (right shift `n` of 32..=62): the 64-bit product's high word
/// carries the result, so the flooring shift is one 32-bit shift instead of a variable 64-bit
/// one. Same value: `floor(q / 2^n) = floor(floor(q / 2^32) / 2^(n - 32))`, and the zero point
/// is added saturating before the clamp, which the clamp to int8 range makes exact. Any other
/// shift takes `apply_clamp` itself.
#[inline(always)]
fn requant_clamp(rq: &Requant, acc: i32, out_zp: i32, lo: i8, hi: i8) -> i8 {
    let n = 31i32.wrapping_sub(rq.shift);
    if !(32..=62).contains(&n) {
        return rq.apply_clamp(acc, out_zp, lo, hi);
    }
    let half = if n == 32 {
        1i64 << 31
    } else {
        ((1u32 << (n - 33)) as i64) << 32
    };
    let p = acc as i64 * rq.multiplier as i64;
    let q = p + half - (p < 0) as i64;
    let v = ((q >> 32) as i32) >> (n - 32);
    v.saturating_add(out_zp).clamp(lo as i32, hi as i32) as i8
}

/// `acc + a.lo * b.lo` (int16 lanes), wrapping.
#[inline(always)]
fn smlabb(a: u32, b: u32, acc: i32) -> i32 {
    let r: i32;
    // SAFETY: as `smlad`.
    unsafe {
        asm!("smlabb {r}, {a}, {b}, {c}", r = lateout(reg) r, a = in(reg) a, b = in(reg) b,
             c = in(reg) acc, options(pure, nomem, nostack))
    };
    r
}

/// `acc + a.hi * b.hi` (int16 lanes), wrapping.
#[inline(always)]
fn smlatt(a: u32, b: u32, acc: i32) -> i32 {
    let r: i32;
    // SAFETY: as `smlad`.
    unsafe {
        asm!("smlatt {r}, {a}, {b}, {c}", r = lateout(reg) r, a = in(reg) a, b = in(reg) b,
             c = in(reg) acc, options(pure, nomem, nostack))
    };
    r
}

#[inline(always)]
fn word(b: &[i8; 4]) -> u32 {
    u32::from_le_bytes([b[0] as u8, b[1] as u8, b[2] as u8, b[3] as u8])
}

#[inline(always)]
fn pack(lo: i16, hi: i16) -> u32 {
    lo as u16 as u32 | (hi as u16 as u32) << 16
}

/// Stages output pixel `px`'s patch of group `grp` minus the zero point (padding taps as zeros,
/// which is what they contribute), whole quads in the lane order `SXTB16` gives the weights
/// (`x0 x2 | x1 x3`), the last `l % 4` elements in `tail`. Same int16 truncation of `x - zp` as
/// the portable path.
fn stage_patch(
    g: &Conv2dGeom,
    input: &[i8],
    in_zp: i32,
    grp: usize,
    px: usize,
    xs: &mut [u32; PATCH_MAX / 2],
    tail: &mut [i16; 3],
) {
    let (icg, kh, kw, ow) = (g.in_per_group(), g.kh, g.kw, g.out_w());
    let l4 = (kh * kw * icg) & !3;
    let (oy, ox) = (px / ow, px % ow);
    let (iy0, ky_lo, ky_hi) = tap_range(oy, g.stride_h, g.pad_top, kh, g.in_h);
    let (ix0, kx_lo, kx_hi) = tap_range(ox, g.stride_w, g.pad_left, kw, g.in_w);
    let mut quad = [0i16; 4];
    let mut e = 0usize;
    let mut push = |v: i16| {
        if e < l4 {
            quad[e & 3] = v;
            if e & 3 == 3 {
                xs[e / 2 - 1] = pack(quad[0], quad[2]);
                xs[e / 2] = pack(quad[1], quad[3]);
            }
        } else {
            tail[e - l4] = v;
        }
        e += 1;
    };
    for ky in 0..kh {
        let row_ok = ky >= ky_lo && ky < ky_hi;
        for kx in 0..kw {
            if row_ok && kx >= kx_lo && kx < kx_hi {
                let iy = (iy0 + ky as isize) as usize;
                let ix = (ix0 + kx as isize) as usize;
                let x = &input[(iy * g.in_w + ix) * g.in_c + grp * icg..][..icg];
                for &v in x {
                    push((v as i32).wrapping_sub(in_zp) as i16);
                }
            } else {
                for _ in 0..icg {
                    push(0);
                }
            }
        }
    }
}

/// Ungrouped-or-grouped conv whose patch (`kh * kw * in_c / groups`) fits `PATCH_MAX`: two
/// output pixels at a time have their patches staged (`stage_patch`), then each output channel
/// takes one dot product per pixel over its contiguous OHWI weight row, the weights widened
/// once for both pixels.
#[inline(never)]
#[allow(clippy::too_many_arguments)]
pub(super) fn conv_forward_patch(
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
    let ocg = g.out_per_group();
    let l = g.kh * g.kw * g.in_per_group();
    let l4 = l & !3;
    let (n_px, oc_n) = (g.out_h() * g.out_w(), g.out_c);
    let (mut xa, mut xb) = ([0u32; PATCH_MAX / 2], [0u32; PATCH_MAX / 2]);
    let (mut ta, mut tb) = ([0i16; 3], [0i16; 3]);
    let mut px = 0;
    while px < n_px {
        let two = px + 1 < n_px;
        for grp in 0..g.groups {
            stage_patch(g, input, in_zp, grp, px, &mut xa, &mut ta);
            if two {
                stage_patch(g, input, in_zp, grp, px + 1, &mut xb, &mut tb);
            }
            let (xa, ta) = (&xa[..l4 / 2], &ta[..l - l4]);
            let (xb, tb) = (&xb[..l4 / 2], &tb[..l - l4]);
            for o in grp * ocg..(grp + 1) * ocg {
                let (wq, wt) = weight[o * l..][..l].split_at(l4);
                let rq = &requant[o];
                if two {
                    let (mut a, mut b) = (bias[o], bias[o]);
                    for ((w, x), y) in wq
                        .chunks_exact(4)
                        .zip(xa.chunks_exact(2))
                        .zip(xb.chunks_exact(2))
                    {
                        let w = word(w.try_into().unwrap());
                        let (w02, w13) = (sxtb16(w), sxtb16_ror8(w));
                        a = smlad(x[0], w02, a);
                        a = smlad(x[1], w13, a);
                        b = smlad(y[0], w02, b);
                        b = smlad(y[1], w13, b);
                    }
                    for ((&w, &x), &y) in wt.iter().zip(ta).zip(tb) {
                        a = a.wrapping_add(x as i32 * w as i32);
                        b = b.wrapping_add(y as i32 * w as i32);
                    }
                    output[px * oc_n + o] = requant_clamp(rq, a, out_zp, act_min, act_max);
                    output[(px + 1) * oc_n + o] = requant_clamp(rq, b, out_zp, act_min, act_max);
                } else {
                    let mut a = bias[o];
                    for (w, x) in wq.chunks_exact(4).zip(xa.chunks_exact(2)) {
                        let w = word(w.try_into().unwrap());
                        a = smlad(x[0], sxtb16(w), a);
                        a = smlad(x[1], sxtb16_ror8(w), a);
                    }
                    for (&w, &x) in wt.iter().zip(ta) {
                        a = a.wrapping_add(x as i32 * w as i32);
                    }
                    output[px * oc_n + o] = requant_clamp(rq, a, out_zp, act_min, act_max);
                }
            }
        }
        px += if two { 2 } else { 1 };
    }
}

/// Whether `dw_forward` takes a depthwise geometry: kernels up to 3x3, channels in fours,
/// an int8-range input zero point.
pub(super) fn dw_applies(g: &Conv2dGeom, in_zp: i32) -> bool {
    g.kh * g.kw <= DW_MAX_TAPS && g.in_c % 4 == 0 && (-128..=127).contains(&in_zp)
}

/// Depthwise forward: per output pixel, four channels at a time keep their accumulators in
/// registers over all taps; a tap's four int8 inputs are widened in pairs (`SXTB16`) and meet
/// weights staged in the same lane order (`SMLABB`/`SMLATT`). The zero point moves into the bias
/// (`sum (x - zp) w = sum x w - zp sum w`), and a padding tap reads the zero point itself, so
/// it still contributes exactly zero.
#[inline(never)]
#[allow(clippy::too_many_arguments)]
pub(super) fn dw_forward(
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
    let (c, kh, kw, ow) = (g.in_c, g.kh, g.kw, g.out_w());
    let taps = kh * kw;
    let zp_row = [in_zp as i8; DW_BLOCK];
    // Per quad of channels, per tap: (w0 | w2), (w1 | w3).
    let mut wq = [0u32; DW_MAX_TAPS * DW_BLOCK / 2];
    let mut bz = [0i32; DW_BLOCK];
    let mut c0 = 0;
    while c0 < c {
        let n = (c - c0).min(DW_BLOCK);
        for j in 0..n {
            let w = &weight[(c0 + j) * taps..][..taps];
            let mut sum = 0i32;
            for &v in w {
                sum = sum.wrapping_add(v as i32);
            }
            bz[j] = bias[c0 + j].wrapping_sub(in_zp.wrapping_mul(sum));
        }
        for q in 0..n / 4 {
            let w = |j: usize, t: usize| weight[(c0 + 4 * q + j) * taps + t] as i16;
            for t in 0..taps {
                wq[(q * DW_MAX_TAPS + t) * 2] = pack(w(0, t), w(2, t));
                wq[(q * DW_MAX_TAPS + t) * 2 + 1] = pack(w(1, t), w(3, t));
            }
        }
        for oy in 0..g.out_h() {
            let (iy0, ky_lo, ky_hi) = tap_range(oy, g.stride_h, g.pad_top, kh, g.in_h);
            for ox in 0..ow {
                let (ix0, kx_lo, kx_hi) = tap_range(ox, g.stride_w, g.pad_left, kw, g.in_w);
                let mut src: [&[i8]; DW_MAX_TAPS] = [&zp_row[..n]; DW_MAX_TAPS];
                for ky in ky_lo..ky_hi {
                    let iy = (iy0 + ky as isize) as usize;
                    for kx in kx_lo..kx_hi {
                        let ix = (ix0 + kx as isize) as usize;
                        src[ky * kw + kx] = &input[(iy * g.in_w + ix) * c + c0..][..n];
                    }
                }
                let src = &src[..taps];
                let out = &mut output[(oy * ow + ox) * c + c0..][..n];
                for (q, ((o, b), rq)) in out
                    .chunks_exact_mut(4)
                    .zip(bz[..n].chunks_exact(4))
                    .zip(requant[c0..c0 + n].chunks_exact(4))
                    .enumerate()
                {
                    let (mut a0, mut a1, mut a2, mut a3) = (b[0], b[1], b[2], b[3]);
                    let w = &wq[q * DW_MAX_TAPS * 2..][..taps * 2];
                    for (s, w) in src.iter().zip(w.chunks_exact(2)) {
                        let x = word(s[4 * q..4 * q + 4].try_into().unwrap());
                        let (e, od) = (sxtb16(x), sxtb16_ror8(x));
                        a0 = smlabb(e, w[0], a0);
                        a2 = smlatt(e, w[0], a2);
                        a1 = smlabb(od, w[1], a1);
                        a3 = smlatt(od, w[1], a3);
                    }
                    o[0] = requant_clamp(&rq[0], a0, out_zp, act_min, act_max);
                    o[1] = requant_clamp(&rq[1], a1, out_zp, act_min, act_max);
                    o[2] = requant_clamp(&rq[2], a2, out_zp, act_min, act_max);
                    o[3] = requant_clamp(&rq[3], a3, out_zp, act_min, act_max);
                }
            }
        }
        c0 += n;
    }
}
