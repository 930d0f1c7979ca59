//! The requantization epilogues of the DSP paths (how a layer's int32 sums become its int8
//! outputs, chosen once per layer) and the single-instruction helpers (`SMLAL`, `SSAT`,
//! `SXTB16`, ...) and the word and byte moves every DSP kernel uses.
use core::arch::asm;

use crate::quant::{Requant, DOUBLE_ROUNDING};

/// Lanes 0 and 2 of four int8, sign-extended to two int16.
#[inline(always)]
pub(super) fn sxtb16(x: u32) -> u32 {
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
pub(super) fn sxtb16_ror8(x: u32) -> u32 {
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
pub(super) trait Out: Copy {
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
pub(super) struct Generic {
    pub(super) zp: i32,
    pub(super) lo: i8,
    pub(super) hi: i8,
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
pub(super) struct Fast {
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
pub(super) struct Sat {
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
pub(super) struct Clamp {
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
pub(super) enum Mode {
    Sat(Sat),
    Clamp(Clamp),
    Generic(Generic),
}

impl Mode {
    pub(super) fn of(requant: &[Requant], zp: i32, lo: i8, hi: i8) -> Mode {
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
pub(super) use with_out;

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
pub(super) fn smlal(lo: u32, hi: i32, a: i32, b: i32) -> i32 {
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
pub(super) fn asr(x: i32, s: u32) -> i32 {
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
pub(super) fn qadd(a: i32, b: i32) -> i32 {
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
pub(super) fn ssat8(x: i32) -> i32 {
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
pub(super) fn smlabb(a: u32, b: u32, acc: i32) -> i32 {
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
pub(super) fn smlabt(a: u32, b: u32, acc: i32) -> i32 {
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
pub(super) fn ssub16(a: u32, b: u32) -> u32 {
    let r: u32;
    // SAFETY: register-only arithmetic; it sets the GE flags, which nothing reads.
    unsafe {
        asm!("ssub16 {r}, {a}, {b}", r = lateout(reg) r, a = in(reg) a, b = in(reg) b,
             options(pure, nomem, nostack))
    };
    r
}

#[inline(always)]
pub(super) fn word(b: &[i8; 4]) -> u32 {
    u32::from_le_bytes([b[0] as u8, b[1] as u8, b[2] as u8, b[3] as u8])
}

#[inline(always)]
pub(super) fn pack(lo: i16, hi: i16) -> u32 {
    lo as u16 as u32 | (hi as u16 as u32) << 16
}

/// `dst = src` for any length: `copy_words`, then the last `len % 4` bytes one by one (volatile,
/// so no `memcpy` call replaces the loop).
#[inline(always)]
pub(super) fn copy_bytes(dst: &mut [i8], src: &[i8]) {
    let n4 = dst.len() & !3;
    copy_words(&mut dst[..n4], &src[..n4]);
    for (d, s) in dst[n4..].iter_mut().zip(&src[n4..]) {
        // SAFETY: both references are valid bytes.
        unsafe { core::ptr::write_volatile(d, *s) };
    }
}

/// `dst.fill(v)` as `copy_bytes` copies.
#[inline(always)]
pub(super) fn fill_bytes(dst: &mut [i8], v: i8) {
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
pub(super) fn copy_words(dst: &mut [i8], src: &[i8]) {
    for (d, s) in dst.chunks_exact_mut(4).zip(src.chunks_exact(4)) {
        // SAFETY: both chunks are 4 valid bytes; thumbv7em loads and stores words unaligned.
        unsafe {
            asm!("ldr {t}, [{s}]", "str {t}, [{d}]", t = out(reg) _, s = in(reg) s.as_ptr(),
                 d = in(reg) d.as_mut_ptr(), options(nostack, preserves_flags))
        };
    }
}
