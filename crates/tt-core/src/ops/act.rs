//! ReLU / ReLU6 are not separate ops: they are the clamp fused into requantization. Their
//! backward is a mask recovered from the saved int8 output alone: an output sitting on a clamp
//! bound got there by clamping (or exactly at the bound, where the subgradient 0 is as valid),
//! so its gradient is zero.
use crate::error::Result;
use crate::quant::{check_act, check_len};

/// Zeroes `grad[i]` where `out_q[i]` equals an *active* clamp bound. A bound equal to the int8
/// range limit (-128 or 127) is only treated as a clamp when it is narrower than the full range,
/// i.e. an op without activation (`act_min = -128, act_max = 127`) still masks its saturated
/// outputs, matching the derivative of the saturating requantization.
pub fn clamp_mask_backward(out_q: &[i8], act_min: i8, act_max: i8, grad: &mut [f32]) -> Result<()> {
    check_act(act_min, act_max)?;
    check_len("clamp_mask_backward: grad", out_q.len(), grad.len())?;
    for (g, &q) in grad.iter_mut().zip(out_q) {
        if q <= act_min || q >= act_max {
            *g = 0.0;
        }
    }
    Ok(())
}

/// The mask as bits (1 = gradient passes), 8 elements per byte, LSB first: what a plan stores
/// instead of the int8 output when only the mask is needed later.
pub fn clamp_mask_pack(out_q: &[i8], act_min: i8, act_max: i8, bits: &mut [u8]) -> Result<()> {
    check_clamp_mask_pack(out_q, act_min, act_max, bits)?;
    // The full bytes four lanes a comparison on the DSP build.
    let packed = dsp_or_portable!(
        super::arm::clamp_mask_bytes(out_q, act_min, act_max, bits),
        false
    );
    clamp_mask_pack_portable(out_q, act_min, act_max, bits, packed);
    Ok(())
}

#[inline(always)]
pub(super) fn check_clamp_mask_pack(
    out_q: &[i8],
    act_min: i8,
    act_max: i8,
    bits: &[u8],
) -> Result<()> {
    check_act(act_min, act_max)?;
    check_len("clamp_mask_pack: bits", out_q.len().div_ceil(8), bits.len())
}

/// The portable `clamp_mask_pack` over checked buffers; the full bytes only unless `packed`
/// says they are written already.
#[inline(always)]
pub(super) fn clamp_mask_pack_portable(
    out_q: &[i8],
    act_min: i8,
    act_max: i8,
    bits: &mut [u8],
    packed: bool,
) {
    // A byte built in a register per 8 elements, not a read-modify-write of memory per element.
    let inside = |q: i8| (q > act_min && q < act_max) as u8;
    let full = out_q.chunks_exact(8);
    let tail = full.remainder();
    if !packed {
        for (b, c) in bits.iter_mut().zip(full) {
            let mut v = 0u8;
            for (j, &q) in c.iter().enumerate() {
                v |= inside(q) << j;
            }
            *b = v;
        }
    }
    if let Some(b) = bits.last_mut().filter(|_| !tail.is_empty()) {
        *b = tail.iter().rev().fold(0, |v, &q| v << 1 | inside(q));
    }
}

/// Applies a packed mask (from `clamp_mask_pack`) to a gradient.
pub fn clamp_mask_apply_bits(bits: &[u8], grad: &mut [f32]) -> Result<()> {
    check_len(
        "clamp_mask_apply_bits: bits",
        grad.len().div_ceil(8),
        bits.len(),
    )?;
    for (&b, chunk) in bits.iter().zip(grad.chunks_mut(8)) {
        if b == u8::MAX {
            continue;
        }
        for (j, g) in chunk.iter_mut().enumerate() {
            if b & (1 << j) == 0 {
                *g = 0.0;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_bounds_only() {
        let q = [-5i8, -4, 0, 9, 10, 11];
        let mut g = [1.0f32; 6];
        clamp_mask_backward(&q, -4, 10, &mut g).unwrap();
        assert_eq!(g, [0.0, 0.0, 1.0, 1.0, 0.0, 0.0]);
        let mut bits = [0u8; 1];
        clamp_mask_pack(&q, -4, 10, &mut bits).unwrap();
        let mut g2 = [1.0f32; 6];
        clamp_mask_apply_bits(&bits, &mut g2).unwrap();
        assert_eq!(g, g2);
        assert!(clamp_mask_backward(&q, 3, 2, &mut g).is_err());
        assert!(clamp_mask_backward(&q, -4, 10, &mut g[..5]).is_err());
    }

    #[test]
    fn packed_masks_match_the_int8_mask_at_every_length() {
        // Whole bytes and a partial last byte, bits set and clear at every position.
        let q: std::vec::Vec<i8> = (0..40).map(|i| ((i * 37) % 23) as i8 - 8).collect();
        for n in 0..q.len() {
            let mut g = std::vec![1.0f32; n];
            clamp_mask_backward(&q[..n], -4, 10, &mut g).unwrap();
            let mut bits = std::vec![0xA5u8; n.div_ceil(8)];
            clamp_mask_pack(&q[..n], -4, 10, &mut bits).unwrap();
            let mut g2 = std::vec![1.0f32; n];
            clamp_mask_apply_bits(&bits, &mut g2).unwrap();
            assert_eq!(g, g2, "{n}");
            if n % 8 != 0 {
                assert_eq!(bits[n / 8] >> (n % 8), 0, "{n}: bits past the end");
            }
        }
    }
}
