//! Forward conv paths for Cortex-M4/M7 (thumbv7em, DSP extension): packed 16-bit
//! multiply-accumulates (`SMLAD`, two MACs per instruction) on int8 pairs widened with `SXTB16`.
//! The portable loops in `conv.rs` stay the reference: every result here is the same integer
//! sum (wrapping, as there), so outputs are bit-identical; `conv.rs` picks these paths only for
//! the geometries they handle and falls back to the portable ones otherwise.
use core::arch::asm;

use super::conv::{tap_range, Conv2dGeom};
use crate::quant::{Requant, DOUBLE_ROUNDING};

/// Elements (taps x input channels per group) of one staged patch of the general path: pixels
/// are staged interleaved as int16 pairs, four at a time up to half of this, else two
/// (`STAGED_WORDS`, 4 KB of stack).
pub(crate) const PATCH_MAX: usize = 1024;
/// Channels per pass of the depthwise paths, and the kernel that many channels may have
/// (`DW_STAGE`: 864 B of staged weights; larger kernels take fewer channels a pass).
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

/// How a layer's int32 sums become its int8 outputs: `Requant::apply_clamp` (single rounding,
/// half away from zero, then `+ out_zp` and the clamp), checked once per layer by
/// [`Mode::of`] so the per-output epilogue carries no tests. `prep` turns a channel's record
/// into what `out` needs, once per channel and pixel group rather than per output.
trait Out: Copy {
    type Ch: Copy;
    /// Whether paths copy themselves per kernel size for this epilogue (not for the rare
    /// generic records: the flash those copies take is scarce).
    const COPIES: bool = true;
    fn prep(self, rq: &Requant) -> Self::Ch;
    fn out(self, ch: Self::Ch, acc: i32) -> i8;
    /// The same epilogue in its generic form (for paths too rare to copy per kind in flash).
    fn generic(self) -> Generic;
}

/// Any record (double rounding, shifts outside the fast range): `apply_clamp` itself.
#[derive(Clone, Copy)]
struct Generic {
    zp: i32,
    lo: i8,
    hi: i8,
}

impl Out for Generic {
    type Ch = Requant;
    const COPIES: bool = false;
    #[inline(always)]
    fn prep(self, rq: &Requant) -> Requant {
        *rq
    }
    #[inline(always)]
    fn out(self, rq: Requant, acc: i32) -> i8 {
        rq.apply_clamp(acc, self.zp, self.lo, self.hi)
    }
    fn generic(self) -> Generic {
        self
    }
}

/// A record of the form `Requant::from_scale` gives every scale under 1/2 (right shift
/// `n = 32 + s`, `s` in 0..=30, non-negative multiplier), single rounding, prepared so one
/// `SMLAL` does the rounding: `round(p / 2^n)` half away from zero is
/// `floor((p + 2^(n-1) - [acc < 0]) / 2^n)` for `p = acc * m` (`m >= 0`: `p < 0` only if
/// `acc < 0`, and `acc < 0` with `p == 0` floors to 0 either way), and the floor of a 64-bit
/// value over `2^(32+s)` is its high word shifted right by `s`. The accumulator starts at the
/// 64-bit constant `2^(n-1) - [acc < 0]` (`rlo`, `rhi` plus the sign word); `|p| < 2^62`, so
/// nothing overflows and the high word is exact.
#[derive(Clone, Copy)]
struct Fast {
    m: i32,
    rlo: u32,
    rhi: i32,
    s: u32,
}

impl Fast {
    #[inline(always)]
    fn new(rq: &Requant) -> Fast {
        // In 0..=30 for every record `Mode::of` lets through.
        let s = (-1i32).wrapping_sub(rq.shift as i32) as u32;
        // `2^(n-1)` split in words from one shift: its low word is `2^31` only when `s` is 0,
        // which `2^s << 31` gives without a compare (per row of a pointwise layer, that counts).
        let p = 1u32.wrapping_shl(s);
        Fast {
            m: rq.multiplier,
            rlo: p << 31,
            rhi: (p >> 1) as i32,
            s,
        }
    }

    /// `round(acc * real)`, before the zero point.
    #[inline(always)]
    fn apply(self, acc: i32) -> i32 {
        let sgn = acc >> 31;
        let (lo, carry) = self.rlo.overflowing_add(sgn as u32);
        let hi = self.rhi.wrapping_add(sgn).wrapping_add(carry as i32);
        asr(smlal(lo, hi, acc, self.m), self.s)
    }

    /// Whether `rq` takes this path (else the layer takes [`Generic`]).
    fn applies(rq: &Requant) -> bool {
        let s = (-1i32).wrapping_sub(rq.shift as i32);
        (0..=30).contains(&s) && rq.multiplier >= 0 && rq.rounding != DOUBLE_ROUNDING
    }
}

/// [`Fast`] records and the whole int8 range as the clamp: one `SSAT`.
#[derive(Clone, Copy)]
struct Sat {
    zp: i32,
}

impl Out for Sat {
    type Ch = Fast;
    #[inline(always)]
    fn prep(self, rq: &Requant) -> Fast {
        Fast::new(rq)
    }
    #[inline(always)]
    fn out(self, f: Fast, acc: i32) -> i8 {
        // `qadd` is `saturating_add`; beyond the int32 range the int8 clamp decides alike.
        ssat8(qadd(f.apply(acc), self.zp)) as i8
    }
    fn generic(self) -> Generic {
        Generic {
            zp: self.zp,
            lo: i8::MIN,
            hi: i8::MAX,
        }
    }
}

/// [`Fast`] records and a narrower clamp (an activation's).
#[derive(Clone, Copy)]
struct Clamp {
    zp: i32,
    lo: i8,
    hi: i8,
}

impl Out for Clamp {
    type Ch = Fast;
    #[inline(always)]
    fn prep(self, rq: &Requant) -> Fast {
        Fast::new(rq)
    }
    #[inline(always)]
    fn out(self, f: Fast, acc: i32) -> i8 {
        // max/min, not clamp: no bounds assertion in the epilogue (lo <= hi was checked).
        qadd(f.apply(acc), self.zp)
            .max(self.lo as i32)
            .min(self.hi as i32) as i8
    }
    fn generic(self) -> Generic {
        Generic {
            zp: self.zp,
            lo: self.lo,
            hi: self.hi,
        }
    }
}

/// The epilogue a layer takes: [`Sat`] or [`Clamp`] when every channel's record is [`Fast`],
/// else [`Generic`].
enum Mode {
    Sat(Sat),
    Clamp(Clamp),
    Generic(Generic),
}

impl Mode {
    fn of(requant: &[Requant], zp: i32, lo: i8, hi: i8) -> Mode {
        if !requant.iter().all(Fast::applies) {
            Mode::Generic(Generic { zp, lo, hi })
        } else if (lo, hi) == (i8::MIN, i8::MAX) {
            Mode::Sat(Sat { zp })
        } else {
            Mode::Clamp(Clamp { zp, lo, hi })
        }
    }
}

/// Runs `$body` with `$e` bound to the layer's epilogue, one monomorphic copy per kind.
macro_rules! with_out {
    ($mode:expr, $e:ident => $body:expr) => {
        match $mode {
            Mode::Sat($e) => $body,
            Mode::Clamp($e) => $body,
            Mode::Generic($e) => $body,
        }
    };
}

/// `out[i]` = `rq`'s requantization of `sum(i, out[i])` plus `zp`, clamped to `[lo, hi]`
/// (`apply_clamp`), through one epilogue chosen for `rq`: the residual adds' output stage.
#[inline(always)]
pub(crate) fn requant_each(
    rq: &Requant,
    zp: i32,
    lo: i8,
    hi: i8,
    out: &mut [i8],
    mut sum: impl FnMut(usize, i8) -> i32,
) {
    let mode = Mode::of(core::slice::from_ref(rq), zp, lo, hi);
    with_out!(mode, e => {
        let ch = e.prep(rq);
        for (i, o) in out.iter_mut().enumerate() {
            *o = e.out(ch, sum(i, *o));
        }
    })
}

/// `(hi:lo) + a * b` as a 64-bit sum, its high word: one `SMLAL`.
#[inline(always)]
fn smlal(lo: u32, hi: i32, a: i32, b: i32) -> i32 {
    let mut hi = hi;
    // SAFETY: register-only arithmetic.
    unsafe {
        asm!("smlal {lo}, {hi}, {a}, {b}", lo = inout(reg) lo => _, hi = inout(reg) hi,
             a = in(reg) a, b = in(reg) b, options(pure, nomem, nostack, preserves_flags))
    };
    hi
}

/// `x >> s` (arithmetic) for `s` in 0..=31: one `ASR` by register (`>>` on a `u32` amount
/// would mask it with an extra `AND` first).
#[inline(always)]
fn asr(x: i32, s: u32) -> i32 {
    let r: i32;
    // SAFETY: register-only arithmetic.
    unsafe {
        asm!("asr {r}, {x}, {s}", r = lateout(reg) r, x = in(reg) x, s = in(reg) s,
             options(pure, nomem, nostack, preserves_flags))
    };
    r
}

/// `a + b` saturated to int32: one `QADD` (it may set the sticky Q flag, which nothing reads).
#[inline(always)]
fn qadd(a: i32, b: i32) -> i32 {
    let r: i32;
    // SAFETY: register-only arithmetic.
    unsafe {
        asm!("qadd {r}, {a}, {b}", r = lateout(reg) r, a = in(reg) a, b = in(reg) b,
             options(pure, nomem, nostack))
    };
    r
}

/// `x` saturated to the int8 range: one `SSAT`.
#[inline(always)]
fn ssat8(x: i32) -> i32 {
    let r: i32;
    // SAFETY: register-only arithmetic; it may set the sticky Q flag, which nothing reads.
    unsafe {
        asm!("ssat {r}, #8, {x}", r = lateout(reg) r, x = in(reg) x,
             options(pure, nomem, nostack))
    };
    r
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

/// `acc + a.lo * b.hi` (int16 lanes), wrapping.
#[inline(always)]
fn smlabt(a: u32, b: u32, acc: i32) -> i32 {
    let r: i32;
    // SAFETY: as `smlad`.
    unsafe {
        asm!("smlabt {r}, {a}, {b}, {c}", r = lateout(reg) r, a = in(reg) a, b = in(reg) b,
             c = in(reg) acc, options(pure, nomem, nostack))
    };
    r
}

/// Lane-wise `a - b` of two int16 pairs (exact here: both lanes stay in int16 range).
#[inline(always)]
fn ssub16(a: u32, b: u32) -> u32 {
    let r: u32;
    // SAFETY: register-only arithmetic; it sets the GE flags, which nothing reads.
    unsafe {
        asm!("ssub16 {r}, {a}, {b}", r = lateout(reg) r, a = in(reg) a, b = in(reg) b,
             options(pure, nomem, nostack))
    };
    r
}

#[inline(always)]
fn word(b: &[i8; 4]) -> u32 {
    u32::from_le_bytes([b[0] as u8, b[1] as u8, b[2] as u8, b[3] as u8])
}

/// `act::clamp_mask_pack`'s full bytes (eight outputs each, LSB first), four lanes at a time:
/// `SSUB8` sets a lane's GE flag when `q - (lo + 1) >= 0` and when `(hi - 1) - q >= 0` (signed,
/// exact), and the two `SEL`s keep 0xff only where both held. False, nothing written, when
/// `lo + 1` or `hi - 1` leaves the int8 range (no output can be inside then; the caller's
/// portable loop says so).
pub(crate) fn clamp_mask_bytes(out_q: &[i8], lo: i8, hi: i8, bits: &mut [u8]) -> bool {
    if lo == i8::MAX || hi == i8::MIN {
        return false;
    }
    let splat = |v: i8| u32::from_ne_bytes([v as u8; 4]);
    let (above, below) = (splat(lo + 1), splat(hi - 1));
    let inside = |x: u32| -> u32 {
        let m: u32;
        // SAFETY: register-only arithmetic; it sets the GE flags, which nothing else reads.
        unsafe {
            asm!(
                "ssub8 {t}, {x}, {above}",
                "sel {m}, {ones}, {zero}",
                "ssub8 {t}, {below}, {x}",
                "sel {m}, {m}, {zero}",
                t = out(reg) _, m = out(reg) m, x = in(reg) x, above = in(reg) above,
                below = in(reg) below, ones = in(reg) u32::MAX, zero = in(reg) 0u32,
                options(pure, nomem, nostack)
            )
        };
        m
    };
    for (b, c) in bits.iter_mut().zip(out_q.chunks_exact(8)) {
        let lanes =
            |k: usize| u32::from_le_bytes([c[k], c[k + 1], c[k + 2], c[k + 3]].map(|q| q as u8));
        // Lane j of the first word keeps bit j, of the second bit 4 + j; two folds bring the
        // four bytes' bits into one.
        let m = (inside(lanes(0)) & 0x0804_0201) | (inside(lanes(4)) & 0x8040_2010);
        let m = m | m >> 16;
        *b = (m | m >> 8) as u8;
    }
    true
}

#[inline(always)]
fn pack(lo: i16, hi: i16) -> u32 {
    lo as u16 as u32 | (hi as u16 as u32) << 16
}

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

/// `dst = src` for any length: `copy_words`, then the last `len % 4` bytes one by one (volatile,
/// so no `memcpy` call replaces the loop).
#[inline(always)]
fn copy_bytes(dst: &mut [i8], src: &[i8]) {
    let n4 = dst.len() & !3;
    copy_words(&mut dst[..n4], &src[..n4]);
    for (d, s) in dst[n4..].iter_mut().zip(&src[n4..]) {
        // SAFETY: both references are valid bytes.
        unsafe { core::ptr::write_volatile(d, *s) };
    }
}

/// `dst.fill(v)` as `copy_bytes` copies.
#[inline(always)]
fn fill_bytes(dst: &mut [i8], v: i8) {
    let w = [v; 4];
    let n4 = dst.len() & !3;
    for d in dst[..n4].chunks_exact_mut(4) {
        copy_words(d, &w);
    }
    for d in dst[n4..].iter_mut() {
        // SAFETY: a valid byte.
        unsafe { core::ptr::write_volatile(d, v) };
    }
}

/// `dst = src` by 4-byte words (both lengths multiples of 4), in `LDR`/`STR` pairs the
/// compiler cannot fold back into a `memcpy` call (a call per pixel costs more than the copy).
#[inline(always)]
fn copy_words(dst: &mut [i8], src: &[i8]) {
    for (d, s) in dst.chunks_exact_mut(4).zip(src.chunks_exact(4)) {
        // SAFETY: both chunks are 4 valid bytes; thumbv7em loads and stores words unaligned.
        unsafe {
            asm!("ldr {t}, [{s}]", "str {t}, [{d}]", t = out(reg) _, s = in(reg) s.as_ptr(),
                 d = in(reg) d.as_mut_ptr(), options(nostack, preserves_flags))
        };
    }
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
