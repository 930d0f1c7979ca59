//! Activation masks on the DSP extension.
use core::arch::asm;


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
