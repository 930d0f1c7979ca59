//! General and pointwise conv paths: patches staged as int16 pairs, four pixels at a time,
//! `SMLAD` dot products against the OHWI weight rows.
use core::arch::asm;

use super::requant::*;
use crate::ops::geom::{tap_range, Conv2dGeom};
use crate::quant::Requant;

/// Elements (taps x input channels per group) of one staged patch of the general path: pixels
/// are staged interleaved as int16 pairs, four at a time up to half of this, else two
/// (`STAGED_WORDS`, 4 KB of stack).
pub(super) const PATCH_MAX: usize = 1024;


/// Words one group of staged pixels takes: four pixels' patches of up to `PATCH_MAX / 2`
/// elements, or two of up to `PATCH_MAX`.
const STAGED_WORDS: usize = PATCH_MAX;

/// Scratch of `conv_rows`: up to four pixels' staged words and one patch's bytes.
struct Stage {
    xs: [u32; STAGED_WORDS],
    pb: [i8; PATCH_MAX],
}

/// Stages output pixel `px`'s patch of group `grp` minus the zero point (padding taps as zeros,
/// which is what they contribute), whole quads in the lane order `SXTB16` gives the weights
/// (`x0 x2 | x1 x3`) at words `off, off + 1` of each `stride`-word quad of `xs`, the last `l % 4`
/// elements in `tail`. Same int16 truncation of `x - zp` as the portable path.
/// With an int8-range zero point the patch is first gathered as bytes into `pb` (padding as
/// the zero point, a kernel row inside the input in one copy) and widened by the word
/// (`stage_vec`); otherwise element by element.
#[allow(clippy::too_many_arguments)]
fn stage_patch(
    g: &Conv2dGeom,
    input: &[i8],
    in_zp: i32,
    grp: usize,
    px: usize,
    pb: &mut [i8; PATCH_MAX],
    xs: &mut [u32],
    stride: usize,
    off: usize,
    tail: &mut [i16; 3],
) {
    let (icg, kh, kw, ow) = (g.in_per_group(), g.kh, g.kw, g.out_w());
    let l4 = (kh * kw * icg) & !3;
    let (oy, ox) = (px / ow, px % ow);
    let (iy0, ky_lo, ky_hi) = tap_range(oy, g.stride_h, g.pad_top, kh, g.in_h);
    let (ix0, kx_lo, kx_hi) = tap_range(ox, g.stride_w, g.pad_left, kw, g.in_w);
    if (-128..=127).contains(&in_zp) {
        let (zb, row, c0) = (in_zp as i8, kw * icg, grp * icg);
        let whole_row = g.groups == 1 && kx_lo == 0 && kx_hi == kw;
        for (ky, dst) in pb[..kh * row].chunks_exact_mut(row).enumerate() {
            if ky < ky_lo || ky >= ky_hi {
                fill_bytes(dst, zb);
                continue;
            }
            let at = ((iy0 + ky as isize) as usize * g.in_w) as isize + ix0;
            if whole_row {
                copy_bytes(dst, &input[at as usize * g.in_c..][..row]);
                continue;
            }
            for (kx, d) in dst.chunks_exact_mut(icg).enumerate() {
                if kx >= kx_lo && kx < kx_hi {
                    let ix = (at + kx as isize) as usize;
                    copy_bytes(d, &input[ix * g.in_c + c0..][..icg]);
                } else {
                    fill_bytes(d, zb);
                }
            }
        }
        let zz = pack(in_zp as i16, in_zp as i16);
        stage_vec(&pb[..kh * row], zz, in_zp, xs, stride, off, tail);
        return;
    }
    let mut quad = [0i16; 4];
    let mut e = 0usize;
    let mut push = |v: i16| {
        if e < l4 {
            quad[e & 3] = v;
            if e & 3 == 3 {
                let at = (e >> 2) * stride + off;
                xs[at] = pack(quad[0], quad[2]);
                xs[at + 1] = pack(quad[1], quad[3]);
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

/// Stages one pixel's input vector minus the zero point as `stage_patch` does (words `off,
/// off + 1` of each `stride`-word quad): whole quads widened by `SXTB16` and shifted by `SSUB16`,
/// the last `len % 4` in `tail`. Exact for an int8-range zero point (`|x - zp| <= 255`).
#[inline(always)]
fn stage_vec(
    x: &[i8],
    zz: u32,
    in_zp: i32,
    xs: &mut [u32],
    stride: usize,
    off: usize,
    tail: &mut [i16; 3],
) {
    let l4 = x.len() & !3;
    for (q, d) in x[..l4].chunks_exact(4).zip(xs.chunks_exact_mut(stride)) {
        let v = word(q.try_into().unwrap());
        d[off] = ssub16(sxtb16(v), zz);
        d[off + 1] = ssub16(sxtb16_ror8(v), zz);
    }
    for (t, &v) in tail.iter_mut().zip(&x[l4..]) {
        *t = (v as i32 - in_zp) as i16;
    }
}

/// Weight rows of a conv (OHWI, `l` int8 each): rows below `k` from `lo`, the others from
/// `hi`. A layer whose first `k` output channels are trained keeps those rows compact in SRAM
/// (`lo`) while the frozen tensor stays whole in flash (`hi`); an untrained layer has `k == 0`.
/// The caller has checked `lo` holds `k` rows and `hi` all of them.
#[derive(Clone, Copy)]
pub(crate) struct Rows<'w> {
    pub lo: &'w [i8],
    pub hi: &'w [i8],
    pub k: usize,
}

impl<'w> Rows<'w> {
    pub(crate) fn whole(w: &'w [i8]) -> Rows<'w> {
        Rows { lo: w, hi: w, k: 0 }
    }
}

/// `P` pixels' staged patches: per quad of elements, pixel 0's two words, then pixel 1's, ...
/// (`x0 x2 | x1 x3` lanes, the weights' order after `SXTB16`; `2 * P` words a quad), so the dot
/// product walks one array; the last `len % 4` elements of pixel `k` in `t[k]`.
#[derive(Clone, Copy)]
struct Staged<'a, const P: usize> {
    xs: &'a [u32],
    t: [&'a [i16]; P],
}

/// `acc[k] + x_k . w`: one weight row against `P` staged patches, the weights widened once.
/// The quads run in assembly (`dot_quads`): the compiler spills accumulators in this loop.
#[inline(always)]
fn dot<const P: usize>(w: &[i8], x: Staged<'_, P>, mut acc: [i32; P]) -> [i32; P] {
    let (wq, wt) = w.split_at(x.xs.len() / P * 2);
    dot_quads(wq, x.xs, &mut acc);
    for (a, t) in acc.iter_mut().zip(x.t) {
        for (&w, &v) in wt.iter().zip(t) {
            *a = a.wrapping_add(v as i32 * w as i32);
        }
    }
    acc
}

/// The whole quads of `dot`: per quad one weight word (`LDR`, widened by two `SXTB16`), then
/// per pixel its two staged words (`LDRD`) into two `SMLAD`s: 17 instructions for 16 MACs at
/// four pixels. Sums as the portable loop's (wrapping), in `dot`'s order.
#[inline(always)]
fn dot_quads(wq: &[i8], xs: &[u32], acc: &mut [i32]) {
    let (n, p) = (wq.len() / 4, acc.len());
    if n == 0 || xs.len() < n * 2 * p {
        return;
    }
    let (pw, px) = (wq.as_ptr(), xs.as_ptr());
    // SAFETY: each loop reads n words from pw (wq holds 4n bytes; thumbv7em loads words
    // unaligned) and 2p words a quad from px (xs holds 2pn words, word-aligned for LDRD),
    // stopping at px + 2pn words; registers only otherwise.
    unsafe {
        let end = px.add(n * 2 * p);
        match acc {
            [a, b, c, d] => asm!(
                "2:",
                "ldr {w}, [{pw}], #4",
                "sxtb16 {v}, {w}, ror #8",
                "sxtb16 {w}, {w}",
                "ldrd {x0}, {x1}, [{px}], #8",
                "smlad {a}, {x0}, {w}, {a}",
                "smlad {a}, {x1}, {v}, {a}",
                "ldrd {x0}, {x1}, [{px}], #8",
                "smlad {b}, {x0}, {w}, {b}",
                "smlad {b}, {x1}, {v}, {b}",
                "ldrd {x0}, {x1}, [{px}], #8",
                "smlad {c}, {x0}, {w}, {c}",
                "smlad {c}, {x1}, {v}, {c}",
                "ldrd {x0}, {x1}, [{px}], #8",
                "smlad {d}, {x0}, {w}, {d}",
                "smlad {d}, {x1}, {v}, {d}",
                "cmp {px}, {end}",
                "bne 2b",
                w = out(reg) _, v = out(reg) _, x0 = out(reg) _, x1 = out(reg) _,
                a = inout(reg) *a, b = inout(reg) *b, c = inout(reg) *c, d = inout(reg) *d,
                pw = inout(reg) pw => _, px = inout(reg) px => _, end = in(reg) end,
                options(nostack, readonly)
            ),
            [a, b] => asm!(
                "2:",
                "ldr {w}, [{pw}], #4",
                "sxtb16 {v}, {w}, ror #8",
                "sxtb16 {w}, {w}",
                "ldrd {x0}, {x1}, [{px}], #8",
                "smlad {a}, {x0}, {w}, {a}",
                "smlad {a}, {x1}, {v}, {a}",
                "ldrd {x0}, {x1}, [{px}], #8",
                "smlad {b}, {x0}, {w}, {b}",
                "smlad {b}, {x1}, {v}, {b}",
                "cmp {px}, {end}",
                "bne 2b",
                w = out(reg) _, v = out(reg) _, x0 = out(reg) _, x1 = out(reg) _,
                a = inout(reg) *a, b = inout(reg) *b,
                pw = inout(reg) pw => _, px = inout(reg) px => _, end = in(reg) end,
                options(nostack, readonly)
            ),
            [a] => asm!(
                "2:",
                "ldr {w}, [{pw}], #4",
                "sxtb16 {v}, {w}, ror #8",
                "sxtb16 {w}, {w}",
                "ldrd {x0}, {x1}, [{px}], #8",
                "smlad {a}, {x0}, {w}, {a}",
                "smlad {a}, {x1}, {v}, {a}",
                "cmp {px}, {end}",
                "bne 2b",
                w = out(reg) _, v = out(reg) _, x0 = out(reg) _, x1 = out(reg) _,
                a = inout(reg) *a,
                pw = inout(reg) pw => _, px = inout(reg) px => _, end = in(reg) end,
                options(nostack, readonly)
            ),
            _ => {}
        }
    }
}

/// Ungrouped-or-grouped conv whose patch (`kh * kw * in_c / groups`) fits `PATCH_MAX`: four
/// output pixels at a time (then two, one) have their patches staged (`stage_patch`), then
/// each output channel takes one dot product per pixel over its contiguous OHWI weight row,
/// the weights widened once for all of them.
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
    conv_forward_rows(
        g,
        input,
        in_zp,
        Rows::whole(weight),
        bias,
        requant,
        out_zp,
        act_min,
        act_max,
        output,
    )
}

/// `conv_forward_patch` over weight rows from two places (see [`Rows`]).
#[inline(never)]
#[allow(clippy::too_many_arguments)]
pub(crate) fn conv_forward_rows(
    g: &Conv2dGeom,
    input: &[i8],
    in_zp: i32,
    weight: Rows<'_>,
    bias: &[i32],
    requant: &[Requant],
    out_zp: i32,
    act_min: i8,
    act_max: i8,
    output: &mut [i8],
) {
    let mode = Mode::of(requant, out_zp, act_min, act_max);
    with_out!(mode, e => conv_rows(g, input, in_zp, weight, bias, requant, e, output))
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn conv_rows<E: Out>(
    g: &Conv2dGeom,
    input: &[i8],
    in_zp: i32,
    weight: Rows<'_>,
    bias: &[i32],
    requant: &[Requant],
    e: E,
    output: &mut [i8],
) {
    let n_px = g.out_h() * g.out_w();
    let mut st = Stage {
        xs: [0; STAGED_WORDS],
        pb: [0; PATCH_MAX],
    };
    // Four pixels where their patches fit the staging buffer, else two.
    let four = 2 * (g.kh * g.kw * g.in_per_group()) <= STAGED_WORDS;
    let mut px = 0;
    while px < n_px {
        px += match n_px - px {
            1 => {
                let e = e.generic();
                conv_last_pixel(
                    g, input, in_zp, weight, bias, requant, e, &mut st, px, output,
                )
            }
            k if k < 4 || !four => conv_pixels::<2, E>(
                g, input, in_zp, weight, bias, requant, e, &mut st, px, output,
            ),
            _ => conv_pixels::<4, E>(
                g, input, in_zp, weight, bias, requant, e, &mut st, px, output,
            ),
        };
    }
}

/// A layer's last pixel when their number is odd: one copy in flash for every epilogue kind.
#[inline(never)]
#[allow(clippy::too_many_arguments)]
fn conv_last_pixel(
    g: &Conv2dGeom,
    input: &[i8],
    in_zp: i32,
    weight: Rows<'_>,
    bias: &[i32],
    requant: &[Requant],
    e: Generic,
    st: &mut Stage,
    px: usize,
    output: &mut [i8],
) -> usize {
    conv_pixels::<1, Generic>(g, input, in_zp, weight, bias, requant, e, st, px, output)
}

/// Output pixels `px..px + P` of `conv_rows`, every group; returns `P`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn conv_pixels<const P: usize, E: Out>(
    g: &Conv2dGeom,
    input: &[i8],
    in_zp: i32,
    weight: Rows<'_>,
    bias: &[i32],
    requant: &[Requant],
    e: E,
    st: &mut Stage,
    px: usize,
    output: &mut [i8],
) -> usize {
    let ocg = g.out_per_group();
    let l = g.kh * g.kw * g.in_per_group();
    let l4 = l & !3;
    let oc_n = g.out_c;
    let mut t = [[0i16; 3]; P];
    // A pointwise layer's patch is its input pixel: staged by the word.
    let pointwise = g.kh == 1
        && g.kw == 1
        && g.stride_h == 1
        && g.stride_w == 1
        && g.pad_top + g.pad_left + g.pad_bottom + g.pad_right == 0
        && g.groups == 1
        && (-128..=127).contains(&in_zp);
    let zz = pack(in_zp as i16, in_zp as i16);
    for grp in 0..g.groups {
        for (k, tk) in t.iter_mut().enumerate() {
            if pointwise {
                let x = &input[(px + k) * l..][..l];
                stage_vec(x, zz, in_zp, &mut st.xs[..], 2 * P, 2 * k, tk);
            } else {
                let (pb, xs) = (&mut st.pb, &mut st.xs[..]);
                stage_patch(g, input, in_zp, grp, px + k, pb, xs, 2 * P, 2 * k, tk);
            }
        }
        let x = Staged::<P> {
            xs: &st.xs[..l4 / 2 * P],
            t: core::array::from_fn(|k| &t[k][..l - l4]),
        };
        let ys = output[px * oc_n..][..P * oc_n].chunks_exact_mut(oc_n);
        channels(
            weight,
            l,
            grp * ocg..(grp + 1) * ocg,
            x,
            bias,
            requant,
            e,
            ys,
        );
    }
    P
}

/// Output channels `os` of `P` staged pixels (`ys`, one output pixel each): one weight row per
/// channel, widened once for all of them.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn channels<'y, const P: usize, E: Out>(
    weight: Rows<'_>,
    l: usize,
    os: core::ops::Range<usize>,
    x: Staged<'_, P>,
    bias: &[i32],
    requant: &[Requant],
    e: E,
    ys: impl Iterator<Item = &'y mut [i8]>,
) {
    let mut it = ys.map(|y| &mut y[os.clone()]);
    let mut ys: [&mut [i8]; P] = core::array::from_fn(|_| it.next().unwrap_or_default());
    let (bias, requant) = (&bias[os.clone()], &requant[os.clone()]);
    // Rows walked, not indexed: no index arithmetic or bounds check per channel.
    if weight.k == 0 {
        let rows = weight.hi.chunks_exact(l).skip(os.start);
        channel_rows(rows, x, bias, requant, e, &mut ys);
    } else {
        let rows = weight.lo[..weight.k * l]
            .chunks_exact(l)
            .chain(weight.hi.chunks_exact(l).skip(weight.k))
            .skip(os.start);
        channel_rows(rows, x, bias, requant, e, &mut ys);
    }
}

#[inline(always)]
fn channel_rows<'w, const P: usize, E: Out>(
    rows: impl Iterator<Item = &'w [i8]>,
    x: Staged<'_, P>,
    bias: &[i32],
    requant: &[Requant],
    e: E,
    ys: &mut [&mut [i8]; P],
) {
    // Never taken (every output slice is `os` long, as `bias` and `requant` are): it is what
    // makes the unchecked stores below sound.
    let n = bias.len().min(requant.len());
    if ys.iter().any(|y| y.len() < n) {
        return;
    }
    for (j, ((w, &b), rq)) in rows.zip(bias).zip(requant).enumerate() {
        let acc = dot(w, x, [b; P]);
        let ch = e.prep(rq);
        for (y, a) in ys.iter_mut().zip(acc) {
            // SAFETY: j < n <= y.len() (checked above).
            unsafe { *y.get_unchecked_mut(j) = e.out(ch, a) };
        }
    }
}

/// Pointwise conv (`ci -> co` channels over `pixels` pixels) whose output overwrites its input:
/// up to four neighbouring pixels' inputs are staged before any of their outputs is written.
/// Shrinking layers walk forward, expanding ones backward, so no write lands on an input pixel
/// still to be staged (output pixels `p..p + k` end at `(p + k) * co <= (p + k) * ci`;
/// backward, output pixel `p` starts at `p * co >= p * ci`). Same sums as the portable loop. The caller
/// has checked `buf` holds `pixels * max(ci, co)` bytes and `bias`/`requant` `co` entries.
#[inline(never)]
#[allow(clippy::too_many_arguments)]
pub(crate) fn pw_in_place(
    pixels: usize,
    ci: usize,
    co: usize,
    buf: &mut [i8],
    in_zp: i32,
    weight: Rows<'_>,
    bias: &[i32],
    requant: &[Requant],
    out_zp: i32,
    act_min: i8,
    act_max: i8,
) {
    let mode = Mode::of(requant, out_zp, act_min, act_max);
    with_out!(mode, e => pw_in_place_with(pixels, ci, co, buf, in_zp, weight, bias, requant, e))
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn pw_in_place_with<E: Out>(
    pixels: usize,
    ci: usize,
    co: usize,
    buf: &mut [i8],
    in_zp: i32,
    weight: Rows<'_>,
    bias: &[i32],
    requant: &[Requant],
    e: E,
) {
    let mut xs = [0u32; STAGED_WORDS];
    let mut step = 0;
    while step < pixels {
        let p = match pixels - step {
            1 => 1,
            k if k < 4 || 2 * ci > STAGED_WORDS => 2,
            _ => 4,
        };
        // The pixels [base, base + p): the next ones walking forward, or backward from the end.
        let base = if co > ci { pixels - step - p } else { step };
        let (b, x) = (base, &mut xs);
        match p {
            1 => pw_last_pixel(ci, co, buf, b, in_zp, weight, bias, requant, e.generic(), x),
            2 => pw_pixels::<2, E>(ci, co, buf, b, in_zp, weight, bias, requant, e, x),
            _ => pw_pixels::<4, E>(ci, co, buf, b, in_zp, weight, bias, requant, e, x),
        }
        step += p;
    }
}

/// The last pixel of an odd number: one copy in flash for every epilogue kind.
#[inline(never)]
#[allow(clippy::too_many_arguments)]
fn pw_last_pixel(
    ci: usize,
    co: usize,
    buf: &mut [i8],
    base: usize,
    in_zp: i32,
    weight: Rows<'_>,
    bias: &[i32],
    requant: &[Requant],
    e: Generic,
    xs: &mut [u32; STAGED_WORDS],
) {
    pw_pixels::<1, Generic>(ci, co, buf, base, in_zp, weight, bias, requant, e, xs)
}

/// Pixels `base..base + P` of `pw_in_place_with`: all staged, then all written.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn pw_pixels<const P: usize, E: Out>(
    ci: usize,
    co: usize,
    buf: &mut [i8],
    base: usize,
    in_zp: i32,
    weight: Rows<'_>,
    bias: &[i32],
    requant: &[Requant],
    e: E,
    xs: &mut [u32; STAGED_WORDS],
) {
    let l4 = ci & !3;
    let zz = pack(in_zp as i16, in_zp as i16);
    let mut t = [[0i16; 3]; P];
    for (k, tk) in t.iter_mut().enumerate() {
        stage_vec(
            &buf[(base + k) * ci..][..ci],
            zz,
            in_zp,
            &mut xs[..],
            2 * P,
            2 * k,
            tk,
        );
    }
    let x = Staged::<P> {
        xs: &xs[..l4 / 2 * P],
        t: core::array::from_fn(|k| &t[k][..ci - l4]),
    };
    let ys = buf[base * co..][..P * co].chunks_exact_mut(co);
    channels(weight, ci, 0..co, x, bias, requant, e, ys);
}
