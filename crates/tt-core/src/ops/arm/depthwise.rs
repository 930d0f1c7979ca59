//! Depthwise conv paths: a channel plane at a time with the kernel unrolled, or blocks of
//! channels staged four lanes a word, also in place over the layer's input.
use core::arch::asm;

use super::requant::*;
use crate::ops::geom::{tap_range, Conv2dGeom};
use crate::quant::Requant;

/// Channels per pass of the depthwise paths, and the kernel that many channels may have
/// (`DW_STAGE`: 864 B of staged weights; larger kernels take fewer channels a pass).
const DW_BLOCK: usize = 48;
const DW_MAX_TAPS: usize = 9;

/// One channel `ch` of a depthwise conv over an HWC input of `g.in_c` channels, into the
/// planar `plane` (`out_h * out_w`). Interior pixels (every tap inside the input) run over the
/// kernel unrolled (`K x K`, weights in registers) with the zero point folded into the bias
/// (`sum (x - zp) w = sum x w - zp sum w`, equal in wrapping int32); border pixels skip their
/// padding taps as the portable loop does. The caller has checked `x` holds `g.input_len()`
/// bytes, `w` the channel's `kh * kw` weights and `plane` the output pixels.
#[inline(never)]
#[allow(clippy::too_many_arguments)]
pub(crate) fn dw_plane(
    g: &Conv2dGeom,
    x: &[i8],
    ch: usize,
    in_zp: i32,
    w: &[i8],
    bias: i32,
    rq: &Requant,
    out_zp: i32,
    act_min: i8,
    act_max: i8,
    plane: &mut [i8],
) {
    // The rare fallback of in-place depthwise (channels not in fours, a zero point outside
    // int8): the generic epilogue only, which keeps its four kernel sizes small in flash.
    let e = Generic {
        zp: out_zp,
        lo: act_min,
        hi: act_max,
    };
    let p = DwPlane {
        g,
        x,
        ch,
        in_zp,
        w,
        bias,
        e,
        rq: e.prep(rq),
    };
    match (g.kh, g.kw) {
        (3, 3) => p.run::<3>(plane),
        (5, 5) => p.run::<5>(plane),
        (7, 7) => p.run::<7>(plane),
        _ => p.run::<0>(plane),
    }
}

struct DwPlane<'a, E: Out> {
    g: &'a Conv2dGeom,
    x: &'a [i8],
    ch: usize,
    in_zp: i32,
    w: &'a [i8],
    bias: i32,
    e: E,
    rq: E::Ch,
}

impl<E: Out> DwPlane<'_, E> {
    /// Output pixel `(oy, ox)` tap by tap, padding skipped: the portable loop.
    #[inline(never)]
    fn border(&self, oy: usize, ox: usize) -> i8 {
        let g = self.g;
        let c = g.in_c;
        let (iy0, ky_lo, ky_hi) = tap_range(oy, g.stride_h, g.pad_top, g.kh, g.in_h);
        let (ix0, kx_lo, kx_hi) = tap_range(ox, g.stride_w, g.pad_left, g.kw, g.in_w);
        let mut acc = self.bias;
        for ky in ky_lo..ky_hi {
            let iy = (iy0 + ky as isize) as usize;
            for kx in kx_lo..kx_hi {
                let ix = (ix0 + kx as isize) as usize;
                let xv = self.x[(iy * g.in_w + ix) * c + self.ch] as i32;
                let wv = self.w[ky * g.kw + kx] as i32;
                acc = acc.wrapping_add((xv - self.in_zp).wrapping_mul(wv));
            }
        }
        self.e.out(self.rq, acc)
    }

    /// `K` > 0: a square `K x K` kernel unrolled; `K == 0`: any kernel, taps looped.
    #[inline(always)]
    fn run<const K: usize>(&self, plane: &mut [i8]) {
        let g = self.g;
        let (c, ow, oh) = (g.in_c, g.out_w(), g.out_h());
        let (kh, kw) = (g.kh, g.kw);
        // Interior columns: [ox_a, ox_b).
        let full = |o: usize, s, p, k, n| {
            let (_, lo, hi) = tap_range(o, s, p, k, n);
            lo == 0 && hi == k
        };
        let ox_a = (0..ow)
            .find(|&ox| full(ox, g.stride_w, g.pad_left, kw, g.in_w))
            .unwrap_or(ow);
        let ox_b = (ox_a..ow)
            .find(|&ox| !full(ox, g.stride_w, g.pad_left, kw, g.in_w))
            .unwrap_or(ow);
        let mut sw = 0i32;
        for &v in self.w {
            sw = sw.wrapping_add(v as i32);
        }
        let bz = self.bias.wrapping_sub(self.in_zp.wrapping_mul(sw));
        // Taps in int16 pairs (tap 2j low, 2j + 1 high), read by SMLABB / SMLABT: half the
        // registers, so the unrolled kernel keeps them all.
        let mut wp = [0u32; 25];
        if K > 0 {
            for (j, p) in wp.iter_mut().enumerate().take((K * K).div_ceil(2)) {
                let hi = self.w.get(2 * j + 1).map_or(0, |&v| v as i16);
                *p = pack(self.w[2 * j] as i16, hi);
            }
        }
        let (row_step, col_step) = (g.in_w * c, g.stride_w * c);
        // Every interior tap lies inside the input, so each index read below is under
        // `input_len()` (the caller checked `x` holds that many bytes).
        let x = &self.x[..g.input_len()];
        for oy in 0..oh {
            let out = &mut plane[oy * ow..][..ow];
            let (iy0, ky_lo, ky_hi) = tap_range(oy, g.stride_h, g.pad_top, kh, g.in_h);
            if ky_lo != 0 || ky_hi != kh || ox_a >= ox_b {
                for (ox, o) in out.iter_mut().enumerate() {
                    *o = self.border(oy, ox);
                }
                continue;
            }
            for ox in (0..ox_a).chain(ox_b..ow) {
                out[ox] = self.border(oy, ox);
            }
            // The top-left tap of output column ox_a.
            let ix0 = ox_a * g.stride_w - g.pad_left;
            let mut base = (iy0 as usize * g.in_w + ix0) * c + self.ch;
            for o in &mut out[ox_a..ox_b] {
                let mut acc = bz;
                if K > 0 {
                    for ky in 0..K {
                        let r = base + ky * row_step;
                        for kx in 0..K {
                            let t = ky * K + kx;
                            // SAFETY: an interior tap, inside the input (see above).
                            let xv = unsafe { *x.get_unchecked(r + kx * c) } as i32 as u32;
                            acc = if t % 2 == 0 {
                                smlabb(xv, wp[t / 2], acc)
                            } else {
                                smlabt(xv, wp[t / 2], acc)
                            };
                        }
                    }
                } else {
                    for ky in 0..kh {
                        let r = base + ky * row_step;
                        for kx in 0..kw {
                            let xv = x[r + kx * c] as i32;
                            acc = acc.wrapping_add(xv * self.w[ky * kw + kx] as i32);
                        }
                    }
                }
                *o = self.e.out(self.rq, acc);
                base += col_step;
            }
        }
    }
}

/// Whether `dw_forward` takes a depthwise geometry: kernels up to 7x7, channels in fours,
/// an int8-range input zero point.
pub(super) fn dw_applies(g: &Conv2dGeom, in_zp: i32) -> bool {
    g.kh * g.kw <= DW_TAPS && g.in_c % 4 == 0 && (-128..=127).contains(&in_zp)
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
    let mode = Mode::of(requant, out_zp, act_min, act_max);
    with_out!(mode, e => dw_forward_with(g, input, in_zp, weight, bias, requant, e, output))
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn dw_forward_with<E: Out>(
    g: &Conv2dGeom,
    input: &[i8],
    in_zp: i32,
    weight: &[i8],
    bias: &[i32],
    requant: &[Requant],
    e: E,
    output: &mut [i8],
) {
    let c = g.in_c;
    let cb = DW_BLOCK.min(DW_STAGE / (g.kh * g.kw)) & !3;
    let mut blk = DwBlock::new(g, e, in_zp);
    let mut c0 = 0;
    while c0 < c {
        let n = (c - c0).min(cb);
        blk.stage(weight, bias, requant, c0, n);
        // 3x3 kernels (nearly every depthwise layer) take a copy with the tap count a constant,
        // so the tap loops unroll: no counter and no pointer steps per tap. Only here: the
        // in-place path is rarer, and a copy there costs flash MCUNet's firmware does not have.
        if E::COPIES && blk.taps == 9 {
            dw_pixels::<9, E>(&mut blk, input, output);
        } else {
            dw_pixels::<0, E>(&mut blk, input, output);
        }
        c0 += n;
    }
}

/// Every output pixel of `blk`'s staged channel block (`DwBlock::pixel::<K>`).
#[inline(always)]
fn dw_pixels<const K: usize, E: Out>(blk: &mut DwBlock<'_, E>, input: &[i8], output: &mut [i8]) {
    let (g, c0, n) = (blk.g, blk.c0, blk.n);
    let (c, ow) = (g.in_c, g.out_w());
    for oy in 0..g.out_h() {
        let (iy0, ky_lo, ky_hi) = tap_range(oy, g.stride_h, g.pad_top, g.kh, g.in_h);
        // Only the copies for a kernel size run interior pixels apart: flash.
        let (a, b) = if K != 0 && ky_lo == 0 && ky_hi == g.kh && blk.ox_a < blk.ox_b {
            (blk.ox_a, blk.ox_b)
        } else {
            (ow, ow)
        };
        let row = &mut output[oy * ow * c..][..ow * c];
        for ox in (0..a).chain(b..ow) {
            blk.pixel::<K>(input, oy, ox, &mut row[ox * c + c0..][..n]);
        }
        if a < b {
            blk.interior::<K>(input, iy0 as usize, a, b, row);
        }
    }
}

/// Largest kernel the depthwise paths take (7x7) and the int8 taps x channels one block
/// stages (the weights: `DW_STAGE / 2` words: 48 channels of 3x3, 16 of 5x5, 8 of 7x7).
const DW_TAPS: usize = 49;
const DW_STAGE: usize = DW_MAX_TAPS * DW_BLOCK;
/// Stack bytes `dw_in_place` may hold pending output pixels in: 48 channels of a 3x3 layer's
/// pending pixels (a row and two) up to 40 pixels wide.
const DW_RING: usize = 2048;

/// Raster index of the last output pixel that may read input pixel `p`, the pixel output `p`
/// overwrites in place (an upper bound: the row and column of the last window starting at or
/// before it). The caller has checked the output is not empty.
#[inline(always)]
fn dw_last_reader(g: &Conv2dGeom, p: usize) -> usize {
    let (iy, ix) = (p / g.in_w, p % g.in_w);
    let r = ((iy + g.pad_top) / g.stride_h).min(g.out_h() - 1);
    let x = ((ix + g.pad_left) / g.stride_w).min(g.out_w() - 1);
    r * g.out_w() + x
}

/// Output pixels computed but not yet written back, at most, in `dw_in_place`'s order: output
/// pixel `q` is written back once the pixel about to be computed comes after its last reader.
fn dw_pending(g: &Conv2dGeom) -> usize {
    let (mut head, mut most) = (0, 0);
    for idx in 0..g.out_h() * g.out_w() {
        while head < idx && dw_last_reader(g, head) < idx {
            head += 1;
        }
        most = most.max(idx + 1 - head);
    }
    most
}

/// Depthwise conv whose output overwrites its HWC input `buf`, a block of channels at a time:
/// per output pixel, four channels keep their accumulators in registers over all taps (as
/// `dw_forward`), and each output pixel's block waits in a ring (`ring`, or `DW_RING` bytes of
/// stack if more) until the last pixel reading the input it overwrites is computed. Needs
/// channels in fours, kernels up to 7x7, an int8-range input zero point and a ring holding
/// four channels of `dw_pending` pixels;
/// returns false, having written nothing, otherwise. Padding taps read the zero point (they
/// contribute exactly zero, the zero point being folded into the bias). The caller has checked
/// `buf` holds `g.input_len()` and `g.output_len()` bytes, `weight` `in_c * kh * kw`, and
/// `bias`/`requant` `in_c` entries.
#[inline(never)]
#[allow(clippy::too_many_arguments)]
pub(crate) fn dw_in_place(
    g: &Conv2dGeom,
    buf: &mut [i8],
    in_zp: i32,
    weight: &[i8],
    bias: &[i32],
    requant: &[Requant],
    out_zp: i32,
    act_min: i8,
    act_max: i8,
    ring: &mut [i8],
) -> bool {
    let (c, taps) = (g.in_c, g.kh * g.kw);
    if c % 4 != 0
        || taps == 0
        || taps > DW_TAPS
        || !(-128..=127).contains(&in_zp)
        || g.out_h() * g.out_w() == 0
    {
        return false;
    }
    // The plane the plan gives, or a ring on the stack where that holds more of the block's
    // pending pixels (a small plane limits the block to four channels or none).
    let mut own = [0i8; DW_RING];
    let ring: &mut [i8] = if ring.len() >= DW_RING {
        ring
    } else {
        &mut own
    };
    let by_ring = ring.len() / dw_pending(g);
    let cb = c.min(DW_BLOCK).min(DW_STAGE / taps).min(by_ring) & !3;
    if cb == 0 {
        return false;
    }
    let mode = Mode::of(requant, out_zp, act_min, act_max);
    with_out!(mode, e => dw_in_place_with(g, buf, in_zp, weight, bias, requant, e, ring, cb));
    true
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn dw_in_place_with<E: Out>(
    g: &Conv2dGeom,
    buf: &mut [i8],
    in_zp: i32,
    weight: &[i8],
    bias: &[i32],
    requant: &[Requant],
    e: E,
    ring: &mut [i8],
    cb: usize,
) {
    let (c, ow, opix) = (g.in_c, g.out_w(), g.out_h() * g.out_w());
    let cap = ring.len() / cb;
    let mut blk = DwBlock::new(g, e, in_zp);
    let mut c0 = 0;
    while c0 < c {
        let n = (c - c0).min(cb);
        blk.stage(weight, bias, requant, c0, n);
        // Output pixels [head, idx) wait in the ring; `due` is the first pixel index at which
        // pixel `head` may be written back.
        let mut head = 0;
        let mut due = dw_last_reader(g, 0) + 1;
        for idx in 0..opix {
            while head < idx && due <= idx {
                let s = &ring[(head % cap) * cb..][..n];
                copy_words(&mut buf[head * c + c0..][..n], s);
                head += 1;
                due = dw_last_reader(g, head.min(opix - 1)) + 1;
            }
            let out = &mut ring[(idx % cap) * cb..][..n];
            blk.pixel::<0>(&buf[..g.input_len()], idx / ow, idx % ow, out);
        }
        while head < opix {
            let s = &ring[(head % cap) * cb..][..n];
            copy_words(&mut buf[head * c + c0..][..n], s);
            head += 1;
        }
        c0 += n;
    }
}

/// A depthwise layer's channel block `c0..c0 + n` (`n` in fours) staged for [`DwBlock::pixel`]:
/// weights per quad and tap as `(w0 | w2), (w1 | w3)` (the lanes `SXTB16` gives the inputs),
/// biases with the zero point folded in (`sum (x - zp) w = sum x w - zp sum w`), prepared
/// epilogue records; and the tap offsets of an interior pixel.
struct DwBlock<'g, E: Out> {
    g: &'g Conv2dGeom,
    e: E,
    in_zp: i32,
    taps: usize,
    c0: usize,
    n: usize,
    // Interior columns [ox_a, ox_b): every tap inside the input's width.
    ox_a: usize,
    ox_b: usize,
    offs: [usize; DW_TAPS],
    wq: [u32; DW_STAGE / 2],
    bz: [i32; DW_BLOCK],
    rp: [E::Ch; DW_BLOCK],
    // What a padding tap reads: the zero point, which then contributes exactly zero.
    zp_row: [i8; DW_BLOCK],
    // The current pixel's taps.
    ptrs: [*const i8; DW_TAPS],
}

impl<'g, E: Out> DwBlock<'g, E> {
    /// The caller has checked `taps <= DW_TAPS` and an int8-range `in_zp`.
    #[inline(always)]
    fn new(g: &'g Conv2dGeom, e: E, in_zp: i32) -> Self {
        let (kw, taps) = (g.kw, g.kh * g.kw);
        let full = |ox| {
            let (_, lo, hi) = tap_range(ox, g.stride_w, g.pad_left, kw, g.in_w);
            lo == 0 && hi == kw
        };
        let ox_a = (0..g.out_w()).find(|&ox| full(ox)).unwrap_or(g.out_w());
        let ox_b = (ox_a..g.out_w()).find(|&ox| !full(ox)).unwrap_or(g.out_w());
        let mut offs = [0usize; DW_TAPS];
        for (t, o) in offs.iter_mut().enumerate().take(taps) {
            *o = ((t / kw) * g.in_w + t % kw) * g.in_c;
        }
        DwBlock {
            g,
            e,
            in_zp,
            taps,
            c0: 0,
            n: 0,
            ox_a,
            ox_b,
            offs,
            wq: [0; DW_STAGE / 2],
            bz: [0; DW_BLOCK],
            rp: [e.prep(&Requant::default()); DW_BLOCK],
            zp_row: [in_zp as i8; DW_BLOCK],
            ptrs: [core::ptr::null(); DW_TAPS],
        }
    }

    /// Stages channels `c0..c0 + n` (`n` in fours, `n * taps <= DW_STAGE`, `n <= DW_BLOCK`).
    #[inline(always)]
    fn stage(&mut self, weight: &[i8], bias: &[i32], requant: &[Requant], c0: usize, n: usize) {
        let taps = self.taps;
        (self.c0, self.n) = (c0, n);
        for j in 0..n {
            let w = &weight[(c0 + j) * taps..][..taps];
            let mut sum = 0i32;
            for &v in w {
                sum = sum.wrapping_add(v as i32);
            }
            self.bz[j] = bias[c0 + j].wrapping_sub(self.in_zp.wrapping_mul(sum));
            self.rp[j] = self.e.prep(&requant[c0 + j]);
        }
        for q in 0..n / 4 {
            let w = |j: usize, t: usize| weight[(c0 + 4 * q + j) * taps + t] as i16;
            for t in 0..taps {
                self.wq[(q * taps + t) * 2] = pack(w(0, t), w(2, t));
                self.wq[(q * taps + t) * 2 + 1] = pack(w(1, t), w(3, t));
            }
        }
    }

    /// Output pixel `(oy, ox)` of the staged block from the HWC input `x` into `out` (`n`), for
    /// `K` taps (the layer's count), or any count if `K == 0`.
    #[inline(always)]
    fn pixel<const K: usize>(&mut self, x: &[i8], oy: usize, ox: usize, out: &mut [i8]) {
        let g = self.g;
        let taps = if K == 0 { self.taps } else { K };
        let (kh, kw, c, c0, n) = (g.kh, g.kw, g.in_c, self.c0, self.n);
        let (iy0, ky_lo, ky_hi) = tap_range(oy, g.stride_h, g.pad_top, kh, g.in_h);
        let ptrs = &mut self.ptrs[..taps];
        if ky_lo == 0 && ky_hi == kh && ox >= self.ox_a && ox < self.ox_b {
            let ix0 = ox * g.stride_w - g.pad_left;
            let base = (iy0 as usize * g.in_w + ix0) * c + c0;
            // One bounds check for the window: the offsets grow with the tap, and the window
            // ends `n` bytes after the last.
            let win = &x[base..base + self.offs[taps - 1] + n];
            for (p, &o) in ptrs.iter_mut().zip(&self.offs) {
                *p = win.as_ptr().wrapping_add(o);
            }
        } else {
            let (ix0, kx_lo, kx_hi) = tap_range(ox, g.stride_w, g.pad_left, kw, g.in_w);
            ptrs.fill(self.zp_row.as_ptr());
            if ky_lo < ky_hi && kx_lo < kx_hi {
                let at = |ky: usize, kx: usize| {
                    ((iy0 + ky as isize) as usize * g.in_w + (ix0 + kx as isize) as usize) * c + c0
                };
                // The inside taps lie from the first to the last: one bounds check for all.
                let first = at(ky_lo, kx_lo);
                let win = &x[first..at(ky_hi - 1, kx_hi - 1) + n];
                for ky in ky_lo..ky_hi {
                    let r = (ky - ky_lo) * g.in_w * c;
                    let row = &mut ptrs[ky * kw + kx_lo..ky * kw + kx_hi];
                    for (j, p) in row.iter_mut().enumerate() {
                        *p = win.as_ptr().wrapping_add(r + j * c);
                    }
                }
            }
        }
        let wq = &self.wq[..n / 4 * taps * 2];
        let taps = ptrs.iter().copied();
        dw_quads::<K, E>(taps, wq, &self.bz[..n], &self.rp[..n], self.e, out);
    }

    /// Output pixels `(oy, a..b)` of the staged block, all of their taps inside the input
    /// (`ox_a <= a < b <= ox_b`, a row whose windows are inside vertically, starting at input
    /// row `iy0`), into the output row `out` (`out_w * in_c`): one bounds check for the run, and
    /// each tap at the pixel's first plus the layer's offset, so no tap pointers per pixel.
    #[inline(always)]
    fn interior<const K: usize>(
        &mut self,
        x: &[i8],
        iy0: usize,
        a: usize,
        b: usize,
        out: &mut [i8],
    ) {
        let g = self.g;
        let taps = if K == 0 { self.taps } else { K };
        let (c, c0, n, step) = (g.in_c, self.c0, self.n, g.stride_w * g.in_c);
        let base = (iy0 * g.in_w + a * g.stride_w - g.pad_left) * c + c0;
        // The windows move right by `step`; the last one ends `n` bytes after its last tap.
        let win = &x[base..base + (b - 1 - a) * step + self.offs[taps - 1] + n];
        let offs = &self.offs[..taps];
        let wq = &self.wq[..n / 4 * taps * 2];
        for (i, o) in out[a * c + c0..].chunks_mut(c).take(b - a).enumerate() {
            let p = win.as_ptr().wrapping_add(i * step);
            let (bz, rp) = (&self.bz[..n], &self.rp[..n]);
            let taps = offs.iter().map(|&d| p.wrapping_add(d));
            dw_quads::<K, E>(taps, wq, bz, rp, self.e, &mut o[..n]);
        }
    }
}

/// One output pixel of a channel block: per quad of channels, the `nt` taps at `tap(t)` (each
/// pointing at `out.len()` readable bytes) against the staged weights (`wq`: per quad, per
/// tap, `(w0 | w2), (w1 | w3)`), from the zero-point-folded biases `bz`, through the epilogue
/// into `out`; `K` taps, or as many as `taps` yields if `K` is 0.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn dw_quads<const K: usize, E: Out>(
    taps: impl ExactSizeIterator<Item = *const i8> + Clone,
    wq: &[u32],
    bz: &[i32],
    rp: &[E::Ch],
    e: E,
    out: &mut [i8],
) {
    let nt = if K == 0 { taps.len() } else { K };
    for (q, (((o, b), rq), w)) in out
        .chunks_exact_mut(4)
        .zip(bz.chunks_exact(4))
        .zip(rp.chunks_exact(4))
        .zip(wq.chunks_exact(nt * 2))
        .enumerate()
    {
        let (mut a0, mut a1, mut a2, mut a3) = (b[0], b[1], b[2], b[3]);
        for (p, w) in taps.clone().zip(w.chunks_exact(2)) {
            // SAFETY: p points at out.len() readable bytes (`DwBlock::pixel` takes each
            // inside a bounds-checked window ending that many bytes past its last tap, or the
            // zero-point row; `DwBlock::interior` one window for a run of pixels, ending that
            // many bytes past the last pixel's last tap) and 4q + 4 <= out.len().
            let x = unsafe { word(&*(p.add(4 * q) as *const [i8; 4])) };
            // One block per tap: as separate pure instructions an unrolled tap loop gets
            // reordered accumulator by accumulator, which spills the widened inputs.
            // SAFETY: register-only arithmetic (DSP extension); `ev`/`od` are outputs written
            // before `x` is last read, so they take registers other than `x`'s.
            unsafe {
                asm!(
                    "sxtb16 {ev}, {x}",
                    "sxtb16 {od}, {x}, ror #8",
                    "smlabb {a0}, {ev}, {w0}, {a0}",
                    "smlatt {a2}, {ev}, {w0}, {a2}",
                    "smlabb {a1}, {od}, {w1}, {a1}",
                    "smlatt {a3}, {od}, {w1}, {a3}",
                    x = in(reg) x, w0 = in(reg) w[0], w1 = in(reg) w[1],
                    ev = out(reg) _, od = out(reg) _,
                    a0 = inout(reg) a0, a1 = inout(reg) a1, a2 = inout(reg) a2,
                    a3 = inout(reg) a3,
                    options(pure, nomem, nostack, preserves_flags)
                )
            };
        }
        o[0] = e.out(rq[0], a0);
        o[1] = e.out(rq[1], a1);
        o[2] = e.out(rq[2], a2);
        o[3] = e.out(rq[3], a3);
    }
}
