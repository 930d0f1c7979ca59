//! Quantization parameters and fixed-point requantization.
//!
//! Requantization uses the TFLite-Micro / CMSIS-NN representation: a real multiplier `m` is a
//! Q31 mantissa in `[2^30, 2^31)` and a power-of-two exponent. How `round(acc * m)` rounds is a
//! property of the model ([`Rounding`]): a model keeps the arithmetic of the runtime it was
//! quantized for, or every layer may drift by an LSB and the drift compounds along the chain.
//! Both modes are integer-only, so host and MCU produce the same bits.
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

/// How a requantization rounds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[repr(u8)]
pub enum Rounding {
    /// `round(acc * m)` rounded ONCE on the exact 64-bit product, half away from zero (CMSIS-NN's
    /// and TFLite's `TFLITE_SINGLE_ROUNDING` mode, except that those round ties upwards). The
    /// closest to exact, so tinytrain's own quantizer and onnxruntime-quantized files use it
    /// (onnxruntime requantizes in float, which single rounding agrees with best). On a
    /// Cortex-M4 it is one SMULL and a shift.
    #[default]
    Single = 0,
    /// gemmlowp's double rounding, what TFLite's reference kernels do by default:
    /// `SaturatingRoundingDoublingHighMul` (the high word of `2 * acc * m`, rounded), then
    /// `RoundingDivideByPOT` (rounded again, half away from zero). It rounds e.g. 1.25 to 2 for
    /// `m = 0.25`, but it is what a `.tflite` model was validated against, so a model imported
    /// from TFLite keeps it to run bit-exactly like the interpreter. As a model's mode it means
    /// "as TFLite's kernels": see [`Rounding::for_layer`] for the one op that rounds once.
    Double = 1,
}

impl Rounding {
    /// The rounding of a conv (`fully_connected == false`) or fc layer's multiplier in a model
    /// whose mode is `self`. TFLite's int8 FULLY_CONNECTED rounds once: against the LiteRT
    /// interpreter's reference kernels every fc layer of the converter fixtures agrees bit for
    /// bit with single rounding and differs by 1 LSB in 1-2 % of outputs with double rounding,
    /// while every conv, depthwise conv, ADD and MEAN agrees with double rounding only.
    pub fn for_layer(self, fully_connected: bool) -> Rounding {
        if fully_connected {
            Rounding::Single
        } else {
            self
        }
    }

    pub fn from_u8(v: u8) -> Option<Rounding> {
        match v {
            0 => Some(Rounding::Single),
            1 => Some(Rounding::Double),
            _ => None,
        }
    }
}

/// The value of [`Requant::rounding`] that selects [`Rounding::Double`].
pub const DOUBLE_ROUNDING: i16 = 1;

/// A real multiplier as Q31 mantissa and exponent: `real ~= multiplier * 2^(shift - 31)`.
///
/// Stored as is in the parameter blob (8 bytes). `shift` and `rounding` were one i32 `shift`
/// before there were rounding modes; single rounding keeps `rounding` the sign extension of
/// `shift` (0 or -1), so blobs of either age read the same, and [`DOUBLE_ROUNDING`] (which no
/// sign extension equals, so an older reader rejects it as an out-of-range shift) selects
/// double rounding.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[repr(C)]
pub struct Requant {
    pub multiplier: i32,
    pub shift: i16,
    pub rounding: i16,
}

impl Requant {
    /// Encodes a non-negative real multiplier (single rounding; see [`Self::with_rounding`]).
    /// Zero maps to a multiplier that yields zero. Multipliers too small to be represented
    /// (< 2^-32) also yield zero, as in TFLite; multipliers >= 2^30 are rejected: no layer needs
    /// one, and the shift stays in `[-31, 30]`. Same encoding as TFLite's `QuantizeMultiplier`.
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
            shift: shift as i16,
            rounding: if shift < 0 { -1 } else { 0 },
        })
    }

    /// The same multiplier, rounding as `mode`.
    pub fn with_rounding(self, mode: Rounding) -> Requant {
        let rounding = match mode {
            Rounding::Single if self.shift < 0 => -1,
            Rounding::Single => 0,
            Rounding::Double => DOUBLE_ROUNDING,
        };
        Requant { rounding, ..self }
    }

    /// The rounding mode `rounding` selects.
    pub fn mode(&self) -> Rounding {
        if self.rounding == DOUBLE_ROUNDING {
            Rounding::Double
        } else {
            Rounding::Single
        }
    }

    /// Whether this record is one `from_scale(..).with_rounding(mode)` can produce: the shift in
    /// the range `apply` is defined for and the rounding field exactly `mode`'s encoding (what
    /// an executor checks once on every record of a plan's parameter blob).
    pub fn is_valid(&self, mode: Rounding) -> bool {
        (-31..=30).contains(&self.shift) && self.with_rounding(mode).rounding == self.rounding
    }

    /// The real multiplier this encodes (for reports and tests).
    pub fn to_f64(&self) -> f64 {
        self.multiplier as f64 * pow2(self.shift as i32 - 31)
    }

    /// `round(acc * real)` in fixed point, in this record's rounding mode, saturated to int32.
    #[inline]
    pub fn apply(&self, acc: i32) -> i32 {
        self.apply_wide(acc).clamp(i32::MIN as i64, i32::MAX as i64) as i32
    }

    #[inline(always)]
    fn apply_wide(&self, acc: i32) -> i64 {
        if self.rounding == DOUBLE_ROUNDING {
            self.apply_double(acc)
        } else {
            self.apply_single(acc)
        }
    }

    /// `round(acc * real)` before saturation, half away from zero. Branch-free: for a negative
    /// product, subtracting one before the flooring shift turns "ties up" into "ties away".
    #[inline(always)]
    fn apply_single(&self, acc: i32) -> i64 {
        // A shift outside what `from_scale` produces (a corrupted plan) is clamped, not trusted.
        let n = (31 - self.shift as i32).clamp(1, 62);
        let p = acc as i64 * self.multiplier as i64;
        // |p| <= 2^62, so the rounding add cannot overflow.
        (p + (1i64 << (n - 1)) - (p < 0) as i64) >> n
    }

    /// gemmlowp's `RoundingDivideByPOT(SaturatingRoundingDoublingHighMul(acc << left, m), right)`
    /// as TFLite's `MultiplyByQuantizedMultiplier` composes them.
    #[inline(always)]
    fn apply_double(&self, acc: i32) -> i64 {
        let shift = (self.shift as i32).clamp(-31, 30);
        // TFLite shifts left in int32 (overflow is undefined there); saturating is the defined
        // choice and agrees wherever TFLite's result is defined.
        let x = ((acc as i64) << shift.max(0)).clamp(i32::MIN as i64, i32::MAX as i64);
        let m = self.multiplier as i64;
        // The high word of 2*x*m, rounded half away from zero (nudge, then C's truncating
        // division); the one product that overflows it, (-2^31)^2, saturates as in gemmlowp.
        let high = if x == i32::MIN as i64 && m == i32::MIN as i64 {
            i32::MAX as i64
        } else {
            let p = x * m;
            (p + if p >= 0 { 1 << 30 } else { 1 - (1 << 30) }) / (1i64 << 31)
        };
        // Rounding arithmetic right shift, ties away from zero.
        let right = -shift.min(0);
        let mask = (1i64 << right) - 1;
        let threshold = (mask >> 1) + (high < 0) as i64;
        (high >> right) + ((high & mask) > threshold) as i64
    }

    /// Requantize, add the output zero point and clamp to `[act_min, act_max]`: the epilogue of
    /// every int8 layer. Same result as `finish(self.apply(acc), ..)`, without the intermediate
    /// int32 saturation (the clamp subsumes it).
    #[inline(always)]
    pub fn apply_clamp(&self, acc: i32, out_zp: i32, act_min: i8, act_max: i8) -> i8 {
        (self.apply_wide(acc) + out_zp as i64).clamp(act_min as i64, act_max as i64) as i8
    }
}

/// The clamp fused into a layer's requantization; its code is the plan's node `act` byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Activation {
    None = 0,
    Relu = 1,
    Relu6 = 2,
}

impl Activation {
    pub fn from_u8(v: u8) -> Option<Activation> {
        match v {
            0 => Some(Activation::None),
            1 => Some(Activation::Relu),
            2 => Some(Activation::Relu6),
            _ => None,
        }
    }
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
/// True when no element is NaN or infinite.
pub fn all_finite(x: &[f32]) -> bool {
    x.iter().all(|v| v.is_finite())
}

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
    fn double_rounding_matches_gemmlowp() {
        let d = |real: f64| {
            Requant::from_scale(real)
                .unwrap()
                .with_rounding(Rounding::Double)
        };
        // m = 0.25 is (2^30, shift -1). 1.25: the high multiply rounds 2.5 up to 3, the shift
        // rounds 1.5 away to 2 (single rounding: 1). -1.25: the high multiply rounds -2.5
        // towards +inf to -2 (its nudge is 1 - 2^30), the shift gives exactly -1.
        let quarter = d(0.25);
        assert_eq!((quarter.multiplier, quarter.shift), (1 << 30, -1));
        assert_eq!(quarter.apply(5), 2);
        assert_eq!(quarter.apply(-5), -1);
        assert_eq!(quarter.apply(6), 2);
        assert_eq!(quarter.apply(-6), -2);
        // Shift 0: only the high multiply rounds, ties upwards: 1.5 -> 2, -1.5 -> -1.
        let half = d(0.5);
        assert_eq!(half.shift, 0);
        assert_eq!(half.apply(3), 2);
        assert_eq!(half.apply(-3), -1);
        // m = 0.125 (2^30, shift -2). +-1.5: an exact high word (+-6), the shift's ties go away
        // from zero: +-2. 1.375: the high word 5.5 rounds up to 6, then 1.5 away to 2 (single
        // rounding: 1); -1.375: -5.5 rounds up to -5, then -1.25 to -1.
        let eighth = d(0.125);
        assert_eq!(eighth.apply(12), 2);
        assert_eq!(eighth.apply(-12), -2);
        assert_eq!(eighth.apply(11), 2);
        assert_eq!(eighth.apply(-11), -1);
        assert_eq!(eighth.apply(10), 1);
        assert_eq!(eighth.apply(-10), -1);
        assert_eq!(eighth.apply(0), 0);
        // Positive shift (m = 3 = 0.75 * 2^2): the left shift comes first, exact here...
        let three = d(3.0);
        assert_eq!((three.multiplier, three.shift), (1_610_612_736, 2));
        assert_eq!(three.apply(7), 21);
        assert_eq!(three.apply(-7), -21);
        // ...and saturates at int32 where TFLite's overflows: 0.75 * (2^31 - 1) = ...735.25.
        assert_eq!(three.apply(i32::MAX), 1_610_612_735);
        assert_eq!(three.apply(i32::MIN), -1_610_612_736);
        // Shift -31, the smallest: 0.75 * 2^-31 * (2^31 - 1) ~ 0.75 -> 1, and -0.75 -> -1.
        let tiny = d(1.5 * 2f64.powi(-32));
        assert_eq!((tiny.multiplier, tiny.shift), (1_610_612_736, -31));
        assert_eq!(tiny.apply(i32::MAX), 1);
        assert_eq!(tiny.apply(i32::MIN), -1);
        assert_eq!(tiny.apply(1 << 30), 0);
        // A mantissa that rounds up to 2^31 is halved and the shift bumped (QuantizeMultiplier).
        let one = d(1.0 - 2f64.powi(-40));
        assert_eq!((one.multiplier, one.shift), (1 << 30, 1));
        assert_eq!(one.apply(5), 5);
        assert_eq!(one.apply(-5), -5);
        // The one saturating high multiply, (-2^31) * (-2^31), as gemmlowp: a corrupted record,
        // which must give a value, not a panic or an overflow.
        let corrupt = Requant {
            multiplier: i32::MIN,
            shift: 0,
            rounding: DOUBLE_ROUNDING,
        };
        assert_eq!(corrupt.apply(i32::MIN), i32::MAX);
        assert_eq!(corrupt.apply_clamp(i32::MIN, 0, -128, 127), 127);
        assert!(!corrupt.is_valid(Rounding::Single));
    }

    #[test]
    fn single_rounding_records_keep_the_old_i32_shift_bytes() {
        for s in [0.0, 1e-12, 0.003, 0.25, 0.5, 0.75, 3.0, 1e6] {
            let r = Requant::from_scale(s).unwrap();
            let old = (r.rounding as i32) << 16 | r.shift as u16 as i32;
            assert_eq!(old, r.shift as i32, "{s}");
            assert!(r.is_valid(Rounding::Single) && !r.is_valid(Rounding::Double));
            let d = r.with_rounding(Rounding::Double);
            assert!(d.is_valid(Rounding::Double) && !d.is_valid(Rounding::Single));
            assert_eq!(d.mode(), Rounding::Double);
            assert_eq!(d.with_rounding(Rounding::Single), r);
            // an older reader sees an out-of-range shift in a double-rounding record
            let old = (d.rounding as i32) << 16 | d.shift as u16 as i32;
            assert!(!(-31..=30).contains(&old));
        }
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
    fn activation_codes_are_the_plan_node_act_byte() {
        use Activation::*;
        assert_eq!([None, Relu, Relu6].map(|a| a as u8), [0, 1, 2]);
        for a in [None, Relu, Relu6] {
            assert_eq!(Activation::from_u8(a as u8), Some(a));
        }
        assert_eq!(Activation::from_u8(3), Option::None);
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
