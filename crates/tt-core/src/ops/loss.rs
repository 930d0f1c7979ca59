//! Losses on the int8 model output, computed in f32 on the dequantized values; gradients are
//! returned in real units. `core` has no `exp`/`ln`, so both are implemented here (range
//! reduction + short polynomials, a few ULP from the std versions).
use crate::error::{Error, Result};
use crate::quant::{all_finite, check_len, QParams};

/// Softmax cross-entropy of one sample: returns `-log softmax(z)[label]` with
/// `z = s * (q - zp)`, and writes `dL/dz = softmax(z) - onehot(label)` into `grad_logits`.
pub fn softmax_cross_entropy(
    logits: &[i8],
    q: QParams,
    label: usize,
    grad_logits: &mut [f32],
) -> Result<f32> {
    QParams::new(q.scale, q.zero_point)?;
    if logits.is_empty() {
        return Err(Error::InvalidParameter {
            what: "softmax_cross_entropy: no logits",
        });
    }
    if label >= logits.len() {
        return Err(Error::InvalidParameter {
            what: "softmax_cross_entropy: label out of range",
        });
    }
    check_len(
        "softmax_cross_entropy: grad_logits",
        logits.len(),
        grad_logits.len(),
    )?;
    let max_q = logits.iter().copied().max().unwrap_or(0);
    let m = q.dequantize(max_q);
    let mut sum = 0.0f32;
    for (g, &l) in grad_logits.iter_mut().zip(logits) {
        let e = exp(q.dequantize(l) - m);
        *g = e;
        sum += e;
    }
    // sum >= 1 (the max term is exp(0)), so neither the division nor the log can blow up.
    let inv = 1.0 / sum;
    for g in grad_logits.iter_mut() {
        *g *= inv;
    }
    grad_logits[label] -= 1.0;
    Ok(ln(sum) - (q.dequantize(logits[label]) - m))
}

/// Mean squared error `mean((y - t)^2)` with `y = s * (q - zp)`; writes `2 (y - t) / n`.
pub fn mse(output: &[i8], q: QParams, target: &[f32], grad: &mut [f32]) -> Result<f32> {
    QParams::new(q.scale, q.zero_point)?;
    if output.is_empty() {
        return Err(Error::InvalidParameter {
            what: "mse: empty output",
        });
    }
    check_len("mse: target", output.len(), target.len())?;
    check_len("mse: grad", output.len(), grad.len())?;
    if !all_finite(target) {
        return Err(Error::NonFinite {
            what: "mse: target",
        });
    }
    let n = output.len() as f32;
    let mut loss = 0.0f32;
    for ((g, &o), &t) in grad.iter_mut().zip(output).zip(target) {
        let d = q.dequantize(o) - t;
        loss += d * d;
        *g = 2.0 * d / n;
    }
    Ok(loss / n)
}

const LN2_HI: f32 = 0.693_145_75;
const LN2_LO: f32 = 1.428_606_8e-6;

/// `e^x` for f32: `x = n ln2 + r`, `|r| <= ln2 / 2`, degree-7 Taylor polynomial for `e^r`.
pub fn exp(x: f32) -> f32 {
    if x.is_nan() {
        return x;
    }
    if x > 88.7 {
        return f32::INFINITY;
    }
    if x < -103.0 {
        return 0.0;
    }
    let n = (x * core::f32::consts::LOG2_E + if x >= 0.0 { 0.5 } else { -0.5 }) as i32;
    let nf = n as f32;
    let r = (x - nf * LN2_HI) - nf * LN2_LO;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0
                    + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0 + r / 5040.0))))));
    // Scale by 2^n in two steps so results in the subnormal range are not flushed early.
    let half = n / 2;
    p * pow2i(half) * pow2i(n - half)
}

fn pow2i(e: i32) -> f32 {
    f32::from_bits(((e.clamp(-126, 127) + 127) as u32) << 23)
}

/// Natural log for finite `x > 0`: `x = m 2^e` with `m` in `[sqrt(1/2), sqrt(2))`,
/// `ln m = 2 atanh((m - 1) / (m + 1))` as an odd series.
pub fn ln(x: f32) -> f32 {
    if x.is_nan() || x < 0.0 {
        return f32::NAN;
    }
    if x == 0.0 {
        return f32::NEG_INFINITY;
    }
    if x.is_infinite() {
        return x;
    }
    let (mut x, mut e) = (x, 0i32);
    if x < f32::MIN_POSITIVE {
        x *= 16_777_216.0; // 2^24: bring subnormals into the normal range
        e -= 24;
    }
    let bits = x.to_bits();
    e += ((bits >> 23) & 0xff) as i32 - 127;
    let mut m = f32::from_bits((bits & 0x007f_ffff) | (127 << 23));
    if m > core::f32::consts::SQRT_2 {
        m *= 0.5;
        e += 1;
    }
    let s = (m - 1.0) / (m + 1.0);
    let s2 = s * s;
    let series = 2.0 * s * (1.0 + s2 * (1.0 / 3.0 + s2 * (0.2 + s2 * (1.0 / 7.0 + s2 / 9.0))));
    e as f32 * LN2_HI + (series + e as f32 * LN2_LO)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_ln_match_std() {
        let mut x = -100.0f32;
        while x < 88.0 {
            let (a, b) = (exp(x), x.exp());
            assert!(
                (a - b).abs() <= 4.0 * f32::EPSILON * b,
                "exp({x}) {a} vs {b}"
            );
            x += 0.173;
        }
        let mut y = 1e-30f32;
        while y < 1e30 {
            let (a, b) = (ln(y), y.ln());
            assert!(
                (a - b).abs() <= 4.0 * f32::EPSILON * b.abs().max(1.0),
                "ln({y}) {a} vs {b}"
            );
            y *= 1.37;
        }
        assert_eq!(exp(-200.0), 0.0);
        assert!(ln(-1.0).is_nan());
    }

    #[test]
    fn cross_entropy_matches_direct_formula() {
        let q = QParams::new(0.1, -3).unwrap();
        let logits = [10i8, -20, 40, 7];
        let mut g = [0f32; 4];
        let loss = softmax_cross_entropy(&logits, q, 1, &mut g).unwrap();
        let z: [f64; 4] = core::array::from_fn(|i| 0.1 * (logits[i] as f64 + 3.0));
        let lse = z.iter().map(|v| v.exp()).sum::<f64>().ln();
        assert!((loss as f64 - (lse - z[1])).abs() < 1e-5);
        for i in 0..4 {
            let p = (z[i] - lse).exp() - if i == 1 { 1.0 } else { 0.0 };
            assert!((g[i] as f64 - p).abs() < 1e-6);
        }
        assert!(softmax_cross_entropy(&logits, q, 4, &mut g).is_err());
        assert!(softmax_cross_entropy(&logits, q, 0, &mut g[..3]).is_err());
        // Extreme logits stay finite.
        let big = QParams::new(100.0, 0).unwrap();
        let l = softmax_cross_entropy(&[127, -128], big, 1, &mut g[..2]).unwrap();
        assert!((l - 25500.0).abs() < 1.0);
        assert!(g.iter().all(|v| v.is_finite()));
    }

    #[test]
    fn mse_value_and_grad() {
        let q = QParams::new(0.5, 0).unwrap();
        let mut g = [0f32; 2];
        let l = mse(&[2, -2], q, &[0.0, 0.0], &mut g).unwrap();
        assert_eq!(l, 1.0);
        assert_eq!(g, [1.0, -1.0]);
        assert!(mse(&[2, -2], q, &[f32::NAN, 0.0], &mut g).is_err());
    }
}
