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
    check_act(act_min, act_max)?;
    check_len("clamp_mask_pack: bits", out_q.len().div_ceil(8), bits.len())?;
    bits.fill(0);
    for (i, &q) in out_q.iter().enumerate() {
        if q > act_min && q < act_max {
            bits[i / 8] |= 1 << (i % 8);
        }
    }
    Ok(())
}

/// Applies a packed mask (from `clamp_mask_pack`) to a gradient.
pub fn clamp_mask_apply_bits(bits: &[u8], grad: &mut [f32]) -> Result<()> {
    check_len(
        "clamp_mask_apply_bits: bits",
        grad.len().div_ceil(8),
        bits.len(),
    )?;
    for (i, g) in grad.iter_mut().enumerate() {
        if bits[i / 8] & (1 << (i % 8)) == 0 {
            *g = 0.0;
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
}
