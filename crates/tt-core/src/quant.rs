//! Quantization parameters and fixed-point requantization.
//!
//! Requantization uses the TFLite-Micro / CMSIS-NN representation: a real multiplier `m` is a
//! Q31 mantissa in `[2^30, 2^31)` and a power-of-two exponent. `apply` computes
//! `round(acc * m)` with ONE rounding, half away from zero, on the exact 64-bit product (what
//! CMSIS-NN's single-rounding mode and TFLite's `TFLITE_SINGLE_ROUNDING` do, except that those
//! round ties upwards). gemmlowp's default double rounding (high multiply, then rounding shift)
//! is deliberately not used: it rounds e.g. 1.25 to 2 for `m = 0.25`. Integer-only, so host and
//! MCU produce the same bits; on a Cortex-M4 it is one SMULL and a shift.
use crate::error::{Error, Result};

/// Affine quantization of a tensor: `real = scale * (q - zero_point)`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct QParams {
    pub scale: f32,
    pub zero_point: i32,
}

impl QParams {
    pub fn new(scale: f32, zero_point: i32) -> Result<QParams> {
        if !(scale.is_finite() && scale > 0.0) {
            return Err(Error::NotRepresentable {
                what: "quantization scale must be finite and > 0",
            });
        }
        Ok(QParams { scale, zero_point })
    }

    #[inline]
    pub fn dequantize(&self, q: i8) -> f32 {
        self.scale * (q as i64 - self.zero_point as i64) as f32
    }

    /// Round half away from zero, saturate to int8.
    pub fn quantize(&self, real: f32) -> i8 {
        let v = real / self.scale;
        let r = if v >= 0.0 {
            (v + 0.5) as i64
        } else {
            (v - 0.5) as i64
        };
        (r + self.zero_point as i64).clamp(-128, 127) as i8
    }
}

/// A real multiplier as Q31 mantissa and exponent: `real ~= multiplier * 2^(shift - 31)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Requant {
    pub multiplier: i32,
    pub shift: i32,
}

impl Requant {
    /// Encodes a non-negative real multiplier. Zero maps to a multiplier that yields zero.
    /// Multipliers too small to be represented (< 2^-32) also yield zero, as in TFLite;
    /// multipliers >= 2^30 are rejected: no layer needs one, and the shift stays in `[-31, 30]`.
    pub fn from_scale(real: f64) -> Result<Requant> {
        if !real.is_finite() || real < 0.0 {
            return Err(Error::NotRepresentable {
                what: "requantization scale must be finite and >= 0",
            });
        }
        if real == 0.0 {
            return Ok(Requant::default());
        }
        let (mantissa, mut shift) = frexp(real);
        let mut q = round_half_away_f64(mantissa * (1u64 << 31) as f64) as i64;
        if q == 1i64 << 31 {
            q /= 2;
            shift += 1;
        }
        if shift < -31 {
            return Ok(Requant::default());
        }
        if shift > 30 {
            return Err(Error::NotRepresentable {
                what: "requantization scale >= 2^30",
            });
        }
        Ok(Requant {
            multiplier: q as i32,
            shift,
        })
    }

    /// The real multiplier this encodes (for reports and tests).
    pub fn to_f64(&self) -> f64 {
        self.multiplier as f64 * pow2(self.shift - 31)
    }

    /// `round(acc * real)` in fixed point, half away from zero, saturated to int32.
    #[inline]
    pub fn apply(&self, acc: i32) -> i32 {
        self.apply_wide(acc).clamp(i32::MIN as i64, i32::MAX as i64) as i32
    }

    /// `round(acc * real)` before saturation. Branch-free: for a negative product, subtracting
    /// one before the flooring shift turns "ties up" into "ties away from zero".
    #[inline(always)]
    fn apply_wide(&self, acc: i32) -> i64 {
        // A shift outside what `from_scale` produces (a corrupted plan) is clamped, not trusted.
        let n = (31 - self.shift).clamp(1, 62);
        let p = acc as i64 * self.multiplier as i64;
        // |p| <= 2^62, so the rounding add cannot overflow.
        (p + (1i64 << (n - 1)) - (p < 0) as i64) >> n
    }

    /// Requantize, add the output zero point and clamp to `[act_min, act_max]`: the epilogue of
    /// every int8 layer. Same result as `finish(self.apply(acc), ..)`, without the intermediate
    /// int32 saturation (the clamp subsumes it).
    #[inline(always)]
    pub fn apply_clamp(&self, acc: i32, out_zp: i32, act_min: i8, act_max: i8) -> i8 {
        (self.apply_wide(acc) + out_zp as i64).clamp(act_min as i64, act_max as i64) as i8
    }
}

/// The clamp fused into a layer's requantization.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    None,
    Relu,
    Relu6,
}

/// The int8 interval `[act_min, act_max]` an activation clamps to, given the output's
/// quantization (TFLite `CalculateActivationRangeQuantized`).
pub fn activation_range(act: Activation, out: QParams) -> (i8, i8) {
    let zp = out.zero_point.clamp(-128, 127);
    match act {
        Activation::None => (-128, 127),
        Activation::Relu => (zp as i8, 127),
        Activation::Relu6 => {
            let six = if out.scale.is_finite() && out.scale > 0.0 {
                round_half_away_f64(6.0 / out.scale as f64)
            } else {
                0.0
            };
            let hi = (zp as f64 + six).clamp(-128.0, 127.0) as i8;
            (zp as i8, hi.max(zp as i8))
        }
    }
}

/// Requantizes int32 accumulators laid out as `[.., channels]` (channels last) with a
/// per-channel (`requant.len() == channels`) or per-tensor (`len == 1`) multiplier.
pub fn requantize(
    acc: &[i32],
    channels: usize,
    requant: &[Requant],
    out_zp: i32,
    act_min: i8,
    act_max: i8,
    output: &mut [i8],
) -> Result<()> {
    if channels == 0 || acc.len() % channels != 0 {
        return Err(Error::InvalidParameter {
            what: "requantize: accumulator length is not a multiple of channels",
        });
    }
    if requant.len() != channels && requant.len() != 1 {
        return Err(Error::ShapeMismatch {
            what: "requantize: requant (per channel or per tensor)",
            expected: channels,
            actual: requant.len(),
        });
    }
    check_len("requantize: output", acc.len(), output.len())?;
    check_act(act_min, act_max)?;
    for (a, o) in acc
        .chunks_exact(channels)
        .zip(output.chunks_exact_mut(channels))
    {
        for c in 0..channels {
            let rq = if requant.len() == 1 {
                requant[0]
            } else {
                requant[c]
            };
            o[c] = rq.apply_clamp(a[c], out_zp, act_min, act_max);
        }
    }
    Ok(())
}

/// Adds the output zero point and clamps to the activation range.
#[inline]
pub(crate) fn finish(v: i32, out_zp: i32, act_min: i8, act_max: i8) -> i8 {
    v.saturating_add(out_zp)
        .clamp(act_min as i32, act_max as i32) as i8
}

#[inline]
pub(crate) fn check_len(what: &'static str, expected: usize, actual: usize) -> Result<()> {
    if expected == actual {
        Ok(())
    } else {
        Err(Error::ShapeMismatch {
            what,
            expected,
            actual,
        })
    }
}

pub(crate) fn check_act(act_min: i8, act_max: i8) -> Result<()> {
    if act_min > act_max {
        return Err(Error::InvalidParameter {
            what: "act_min > act_max",
        });
    }
    Ok(())
}

/// Decomposes a finite positive `x` into `m * 2^e`, `m` in `[0.5, 1)`; core has no `frexp`.
fn frexp(x: f64) -> (f64, i32) {
    let bits = x.to_bits();
    let exp = ((bits >> 52) & 0x7ff) as i32;
    if exp == 0 {
        // Subnormal: scale into the normal range first.
        let (m, e) = frexp(x * pow2(64));
        return (m, e - 64);
    }
    let m = f64::from_bits((bits & !(0x7ffu64 << 52)) | (1022u64 << 52));
    (m, exp - 1022)
}

fn pow2(e: i32) -> f64 {
    let e = e.clamp(-1022, 1023);
    f64::from_bits(((e + 1023) as u64) << 52)
}

fn round_half_away_f64(x: f64) -> f64 {
    // Values here are bounded well below 2^62, so the integer cast is exact.
    if x >= 0.0 {
        (x + 0.5) as i64 as f64
    } else {
        (x - 0.5) as i64 as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn from_scale_round_trips() {
        for &s in &[
            1.0e-6,
            0.0031,
            0.25,
            0.5,
            0.75,
            0.999_999_9,
            1.0,
            3.7,
            1234.5,
        ] {
            let r = Requant::from_scale(s).unwrap();
            assert!((r.to_f64() - s).abs() <= s * 1e-9, "{s} -> {r:?}");
        }
        assert_eq!(Requant::from_scale(0.0).unwrap().apply(12345), 0);
        assert!(Requant::from_scale(-1.0).is_err());
        assert!(Requant::from_scale(f64::NAN).is_err());
        assert!(Requant::from_scale(f64::INFINITY).is_err());
        assert!(Requant::from_scale(1e12).is_err());
    }

    #[test]
    fn apply_rounds_half_away_from_zero() {
        let half = Requant::from_scale(0.5).unwrap();
        assert_eq!(half.apply(3), 2);
        assert_eq!(half.apply(-3), -2);
        assert_eq!(half.apply(5), 3);
        assert_eq!(half.apply(-5), -3);
        let quarter = Requant::from_scale(0.25).unwrap();
        assert_eq!(quarter.apply(6), 2);
        assert_eq!(quarter.apply(-6), -2);
        assert_eq!(quarter.apply(10), 3);
        assert_eq!(quarter.apply(-10), -3);
        // gemmlowp's double rounding would give 2 here.
        assert_eq!(quarter.apply(5), 1);
        assert_eq!(quarter.apply(-5), -1);
        assert_eq!(quarter.apply(i32::MIN), -(1 << 29));
        let two = Requant::from_scale(2.0).unwrap();
        assert_eq!(two.apply(i32::MAX), i32::MAX);
        assert_eq!(two.apply(i32::MIN), i32::MIN);
    }

    #[test]
    fn activation_ranges() {
        let q = QParams {
            scale: 0.05,
            zero_point: -10,
        };
        assert_eq!(activation_range(Activation::None, q), (-128, 127));
        assert_eq!(activation_range(Activation::Relu, q), (-10, 127));
        assert_eq!(activation_range(Activation::Relu6, q), (-10, 110));
        let wide = QParams {
            scale: 0.01,
            zero_point: 0,
        };
        assert_eq!(activation_range(Activation::Relu6, wide), (0, 127));
    }

    #[test]
    fn quantize_dequantize() {
        let q = QParams::new(0.1, 3).unwrap();
        assert_eq!(q.quantize(0.25), 6);
        assert_eq!(q.quantize(-0.25), 0);
        assert_eq!(q.quantize(1e9), 127);
        assert!((q.dequantize(13) - 1.0).abs() < 1e-6);
        assert!(QParams::new(0.0, 0).is_err());
    }
}
