//! Quantization-Aware Scaling and the int8 SGD update.
//!
//! A layer computes with real weights `W = s_W * W̄` (`W̄` int8, `s_W` per output channel). The
//! gradient w.r.t. the int8 weights is `G_W̄ = s_W * G_W` (`G_W = dL/dW`, what the backward
//! kernels produce), so `||G_W̄|| / ||G_W|| = s_W`, while `||W̄|| / ||W|| = 1 / s_W`: an SGD step
//! in int8 units is mis-scaled by `s_W²`. QAS rescales `G̃_W̄ = G_W̄ * s_W⁻² = G_W / s_W`, which
//! makes `W̄ - α G̃_W̄` exactly the float step `W - α G_W` expressed in int8 units. Biases:
//! `b̄ = b / (s_W s_x)`, `G_b̄ = s_W s_x G_b`, `G̃_b̄ = G_b̄ (s_W s_x)⁻²`.
//!
//! Updated int8 weights must not lose small steps to rounding; three precisions are offered,
//! all deterministic (the stochastic one from a seeded xorshift generator, so host and MCU
//! produce the same weights).
use crate::error::{Error, Result};
use crate::ops::{ChannelSelection, WeightShape};
use crate::quant::{all_finite, check_len};

/// xorshift32 (Marsaglia 2003): tiny, no multiplications, identical on every target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct XorShift32 {
    pub state: u32,
}

impl XorShift32 {
    /// Any seed is accepted. The seed is first scrambled (murmur3's 32-bit finalizer) so that
    /// nearby seeds (1, 2, 3, ...) do not start with nearly identical, tiny draws, which plain
    /// xorshift does; 0, a fixed point of xorshift, maps to a fixed non-zero state.
    pub fn new(seed: u32) -> XorShift32 {
        let mut z = seed.wrapping_add(0x9E37_79B9);
        z = (z ^ (z >> 16)).wrapping_mul(0x85EB_CA6B);
        z = (z ^ (z >> 13)).wrapping_mul(0xC2B2_AE35);
        z ^= z >> 16;
        XorShift32 {
            state: if z == 0 { 0x9E37_79B9 } else { z },
        }
    }

    #[inline]
    pub fn next_u32(&mut self) -> u32 {
        let mut x = self.state;
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        self.state = x;
        x
    }

    /// Uniform in `[0, 1)` with 24 bits of resolution.
    #[inline]
    pub fn next_unit(&mut self) -> f32 {
        (self.next_u32() >> 8) as f32 * (1.0 / 16_777_216.0)
    }
}

/// The per-precision state the caller owns (nothing here allocates). `Residual` and `FpMaster`
/// hold one entry per selected weight, in the order of the gradient buffer.
#[derive(Debug)]
pub enum UpdateState<'a> {
    StochasticRounding(&'a mut XorShift32),
    Residual(&'a mut [i8]),
    FpMaster(&'a mut [f32]),
}

/// SGD hyper-parameters. `qas = false` runs the paper's baseline: int8 SGD with the raw `G_W̄`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SgdConfig {
    pub lr: f32,
    /// Momentum coefficient (PyTorch convention `v = μ v + g`); 0 disables it.
    pub momentum: f32,
    pub qas: bool,
}

impl SgdConfig {
    fn validate(&self) -> Result<()> {
        if !self.lr.is_finite() || !self.momentum.is_finite() {
            return Err(Error::NonFinite {
                what: "sgd: learning rate or momentum",
            });
        }
        if self.lr < 0.0 || !(0.0..1.0).contains(&self.momentum) {
            return Err(Error::InvalidParameter {
                what: "sgd: lr must be >= 0 and momentum in [0, 1)",
            });
        }
        Ok(())
    }
}

/// `G_W̄ = s_W * G_W`: the gradient w.r.t. the int8 weight, from the real-unit gradient.
#[inline]
pub fn int8_weight_grad(grad_real: f32, weight_scale: f32) -> f32 {
    grad_real * weight_scale
}

/// `G̃_W̄ = G_W̄ * s_W⁻²`.
#[inline]
pub fn qas_scale_weight_grad(g_wbar: f32, weight_scale: f32) -> f32 {
    g_wbar / (weight_scale * weight_scale)
}

/// `G̃_b̄ = G_b̄ * (s_W s_x)⁻²`.
#[inline]
pub fn qas_scale_bias_grad(g_bbar: f32, weight_scale: f32, input_scale: f32) -> f32 {
    let s = weight_scale * input_scale;
    g_bbar / (s * s)
}

/// The gradient the int8 update steps along, from a real-unit gradient: `G̃_W̄ = G_W / s_W` with
/// QAS, `G_W̄ = s_W G_W` without.
#[inline]
pub fn update_grad(grad_real: f32, scale: f32, qas: bool) -> f32 {
    let g_bar = int8_weight_grad(grad_real, scale);
    if qas {
        qas_scale_weight_grad(g_bar, scale)
    } else {
        g_bar
    }
}

/// Converts a selected real-unit weight gradient in place to the int8-unit gradient the update
/// uses (`update_grad` element-wise), e.g. to inspect or transmit it.
pub fn weight_grad_to_int8_units(
    shape: &WeightShape,
    sel: ChannelSelection,
    weight_scale: &[f32],
    grad_w: &mut [f32],
    qas: bool,
) -> Result<()> {
    sel.check(shape)?;
    check_len("qas: weight_scale", shape.out_c, weight_scale.len())?;
    check_len("qas: grad_w", sel.selected_len(shape), grad_w.len())?;
    let mut k = 0;
    shape.for_each_selected(&sel, |_, o| {
        grad_w[k] = update_grad(grad_w[k], weight_scale[o], qas);
        k += 1;
    });
    Ok(())
}

/// Copies the selected int8 weights into an f32 master copy (int8 units) before training.
pub fn init_master(
    weight: &[i8],
    shape: &WeightShape,
    sel: ChannelSelection,
    master: &mut [f32],
) -> Result<()> {
    sel.check(shape)?;
    check_len("init_master: weight", shape.len(), weight.len())?;
    check_len("init_master: master", sel.selected_len(shape), master.len())?;
    let mut k = 0;
    shape.for_each_selected(&sel, |i, _| {
        master[k] = weight[i] as f32;
        k += 1;
    });
    Ok(())
}

/// One SGD step on the selected int8 weights, in place: `W̄' = round(W̄ - α v)`, with
/// `v = μ v + g`, `g = G̃_W̄` (QAS) or `G_W̄` (no QAS), rounding by the precision in `state`,
/// saturating to `[-127, 127]` (symmetric weights never use -128).
///
/// `grad_w` is the real-unit gradient of the selected weights (as `conv2d_backward_weight`
/// produced it). Nothing is written unless the gradient, the momentum buffer and the master copy
/// are all finite: a diverged step is refused with `Error::NonFinite`.
#[allow(clippy::too_many_arguments)]
pub fn sgd_update_weights(
    weight: &mut [i8],
    shape: &WeightShape,
    weight_scale: &[f32],
    sel: ChannelSelection,
    grad_w: &[f32],
    cfg: &SgdConfig,
    momentum: Option<&mut [f32]>,
    state: UpdateState<'_>,
) -> Result<()> {
    cfg.validate()?;
    sel.check(shape)?;
    let n = sel.selected_len(shape);
    check_len("sgd_update_weights: weight", shape.len(), weight.len())?;
    check_len(
        "sgd_update_weights: weight_scale",
        shape.out_c,
        weight_scale.len(),
    )?;
    check_len("sgd_update_weights: grad_w", n, grad_w.len())?;
    if !all_finite(grad_w) {
        return Err(Error::NonFinite {
            what: "sgd_update_weights: gradient",
        });
    }
    if weight_scale
        .iter()
        .take(sel.rows(shape))
        .any(|s| !(s.is_finite() && *s > 0.0))
    {
        return Err(Error::NotRepresentable {
            what: "sgd_update_weights: weight scale must be finite and > 0",
        });
    }
    let mut momentum = momentum;
    if let Some(v) = momentum.as_deref() {
        check_len("sgd_update_weights: momentum buffer", n, v.len())?;
        if !all_finite(v) {
            return Err(Error::NonFinite {
                what: "sgd_update_weights: momentum buffer",
            });
        }
    }
    match &state {
        UpdateState::Residual(r) => check_len("sgd_update_weights: residual", n, r.len())?,
        UpdateState::FpMaster(m) => {
            check_len("sgd_update_weights: master", n, m.len())?;
            if !all_finite(m) {
                return Err(Error::NonFinite {
                    what: "sgd_update_weights: master copy",
                });
            }
        }
        UpdateState::StochasticRounding(_) => {}
    }
    let mut state = state;
    let moving = momentum.is_some() && cfg.momentum != 0.0;
    if let (UpdateState::StochasticRounding(rng), false) = (&mut state, moving) {
        // The on-device setting, in for_each_selected's order with no per-weight dispatch on
        // the precision or momentum (the same arithmetic, so the same bits).
        let (cols, taps, per_group) = (sel.cols(shape), shape.taps, shape.in_per_group);
        let mut grads = grad_w.iter();
        for (o, &ws) in weight_scale.iter().enumerate().take(sel.rows(shape)) {
            for t in 0..taps {
                let base = (o * taps + t) * per_group;
                let row = weight
                    .get_mut(base..base + cols)
                    .ok_or(Error::ShapeMismatch {
                        what: "sgd_update_weights: weight row",
                        expected: base + cols,
                        actual: shape.len(),
                    })?;
                for (w, &gr) in row.iter_mut().zip(grads.by_ref()) {
                    let delta = -cfg.lr * update_grad(gr, ws, cfg.qas);
                    *w = stochastic_round(*w, delta, rng);
                }
            }
        }
        return Ok(());
    }
    let mut k = 0;
    shape.for_each_selected(&sel, |i, o| {
        let mut g = update_grad(grad_w[k], weight_scale[o], cfg.qas);
        if let Some(v) = momentum.as_deref_mut() {
            if cfg.momentum != 0.0 {
                v[k] = cfg.momentum * v[k] + g;
                g = v[k];
            }
        }
        let delta = -cfg.lr * g;
        weight[i] = match &mut state {
            UpdateState::StochasticRounding(rng) => stochastic_round(weight[i], delta, rng),
            UpdateState::Residual(r) => residual_step(weight[i], &mut r[k], delta),
            UpdateState::FpMaster(m) => {
                m[k] = (m[k] + delta).clamp(-127.0, 127.0);
                round_half_away(m[k]) as i8
            }
        };
        k += 1;
    });
    Ok(())
}

#[inline]
pub(crate) fn stochastic_round(w: i8, delta: f32, rng: &mut XorShift32) -> i8 {
    // The random draw happens for every weight, so the generator state after a step depends
    // only on how many weights were updated (host and MCU stay in lockstep).
    // No clamp of `t` to [-128, 128] before rounding, and the sum clamped as an integer: beyond
    // that range either way ends at the ±127 clamp, and NaN rounds to 0 either way
    // (`stochastic_round_reference` in the tests is the clamped f32 form).
    let u = rng.next_unit();
    let t = w as f32 + delta;
    let mut whole = t as i32;
    let mut fl = whole as f32;
    if fl > t {
        whole = whole.saturating_sub(1);
        fl -= 1.0;
    }
    let up = (u < t - fl) as i32;
    whole.saturating_add(up).clamp(-127, 127) as i8
}

/// `w * 256 + r` is the weight in 1/256 LSB; `r` in `[-128, 127]` keeps `w` its rounding.
#[inline]
pub(crate) fn residual_step(w: i8, r: &mut i8, delta: f32) -> i8 {
    let d = round_half_away((delta * 256.0).clamp(-65_536.0, 65_536.0)) as i32;
    let full = (w as i32 * 256 + *r as i32 + d).clamp(-127 * 256, 127 * 256);
    let nw = (full + 128) >> 8;
    *r = (full - nw * 256) as i8;
    nw as i8
}

#[inline]
fn floor(x: f32) -> f32 {
    let t = x as i32 as f32;
    if t > x {
        t - 1.0
    } else {
        t
    }
}

#[inline]
pub(crate) fn round_half_away(x: f32) -> f32 {
    if x >= 0.0 {
        floor(x + 0.5)
    } else {
        -floor(-x + 0.5)
    }
}

/// One SGD step on int32 biases (the prefix `0..grad_b.len()`), in place, rounding to nearest
/// (an int32 bias LSB is far below any useful step). `grad_b` is the real-unit gradient;
/// the bias scale of channel `o` is `weight_scale[o] * input_scale`.
pub fn sgd_update_bias(
    bias: &mut [i32],
    weight_scale: &[f32],
    input_scale: f32,
    grad_b: &[f32],
    cfg: &SgdConfig,
    momentum: Option<&mut [f32]>,
) -> Result<()> {
    cfg.validate()?;
    if grad_b.len() > bias.len() {
        return Err(Error::ShapeMismatch {
            what: "sgd_update_bias: grad_b longer than bias",
            expected: bias.len(),
            actual: grad_b.len(),
        });
    }
    check_len(
        "sgd_update_bias: weight_scale",
        bias.len(),
        weight_scale.len(),
    )?;
    if !all_finite(grad_b) {
        return Err(Error::NonFinite {
            what: "sgd_update_bias: gradient",
        });
    }
    if !(input_scale.is_finite() && input_scale > 0.0)
        || weight_scale[..grad_b.len()]
            .iter()
            .any(|s| !(s.is_finite() && *s > 0.0))
    {
        return Err(Error::NotRepresentable {
            what: "sgd_update_bias: scales must be finite and > 0",
        });
    }
    let mut momentum = momentum;
    if let Some(v) = momentum.as_deref() {
        check_len("sgd_update_bias: momentum buffer", grad_b.len(), v.len())?;
        if !all_finite(v) {
            return Err(Error::NonFinite {
                what: "sgd_update_bias: momentum buffer",
            });
        }
    }
    // f64 is software floating point on the M4F (~800 instructions a bias): a zero gradient
    // without momentum leaves an in-range bias as it is (`b - lr * 0 = b`, rounded back to b),
    // so it is not computed.
    let moving = momentum.is_some() && cfg.momentum != 0.0;
    let limit = crate::ops::BIAS_LIMIT as i64;
    for (o, &gr) in grad_b.iter().enumerate() {
        if gr == 0.0 && !moving && (bias[o] as i64).abs() <= limit {
            continue;
        }
        if !moving {
            if let Some(step) = bias_step_f32(gr, weight_scale[o] * input_scale, cfg) {
                bias[o] = (bias[o] as i64 + step).clamp(-limit, limit) as i32;
                continue;
            }
        }
        let s = weight_scale[o] as f64 * input_scale as f64;
        let mut g = if cfg.qas {
            gr as f64 / s
        } else {
            gr as f64 * s
        };
        if let Some(v) = momentum.as_deref_mut() {
            if cfg.momentum != 0.0 {
                v[o] = cfg.momentum * v[o] + g as f32;
                g = v[o] as f64;
            }
        }
        let nb = bias[o] as f64 - cfg.lr as f64 * g;
        // Half away from zero, then saturating at the bound that keeps the forward's int32
        // accumulators exact (NaN is excluded above), with integer tests instead of f64
        // comparisons: -0.0 rounds to 0 either way, and truncating before the clamp gives the
        // clamp's result, the bound being an integer.
        let r = if nb.is_sign_negative() {
            nb - 0.5
        } else {
            nb + 0.5
        };
        bias[o] = (r as i64).clamp(-limit, limit) as i32;
    }
    Ok(())
}

/// The integer the f64 formula adds to a bias (`-lr * g` rounded to nearest), decided in f32
/// when that is provably the same: f32 is one instruction per operation on the M4F, f64 a
/// software routine. The f32 step is within `|t| 2^-21.9` of the exact value (three roundings of
/// normal numbers), the f64 formula's within `|t| 2^-51 + 2^-20` (its rounding of `bias - lr g`
/// and of `± 0.5` near |nb| < 2^32); when `t` is farther than the sum of both from any
/// half-integer, both round to the same integer, ties and the sign-dependent direction included.
/// `None` (near a half, huge steps, subnormal scales) leaves the bias to the f64 formula.
fn bias_step_f32(gr: f32, scale: f32, cfg: &SgdConfig) -> Option<i64> {
    if !(scale >= f32::MIN_POSITIVE) {
        return None;
    }
    let g = if cfg.qas { gr / scale } else { gr * scale };
    let t = -(cfg.lr * g);
    if !(t.abs() < (1u32 << 22) as f32) {
        return None;
    }
    let whole = t as i32;
    let frac = t - whole as f32;
    let margin = t.abs() * (1.0 / (1u32 << 20) as f32) + 1.0 / (1u32 << 18) as f32;
    if (frac.abs() - 0.5).abs() <= margin {
        return None;
    }
    let carry = if frac > 0.5 {
        1
    } else if frac < -0.5 {
        -1
    } else {
        0
    };
    Some(whole as i64 + carry)
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use std::vec::Vec;

    /// The update as first written (all in f64, f64 clamp): the fast paths must give its bits.
    fn reference(
        bias: i32,
        ws: f32,
        is: f32,
        gr: f32,
        cfg: &SgdConfig,
        v: Option<&mut f32>,
    ) -> i32 {
        let s = ws as f64 * is as f64;
        let mut g = if cfg.qas {
            gr as f64 / s
        } else {
            gr as f64 * s
        };
        if let Some(v) = v {
            if cfg.momentum != 0.0 {
                *v = cfg.momentum * *v + g as f32;
                g = *v as f64;
            }
        }
        let nb = bias as f64 - cfg.lr as f64 * g;
        let r = if nb >= 0.0 { nb + 0.5 } else { nb - 0.5 };
        let limit = crate::ops::BIAS_LIMIT as f64;
        r.clamp(-limit, limit) as i32
    }

    /// The stochastic rounding as first written: `t` clamped to [-128, 128] in f32, floor, draw,
    /// clamp to ±127 in f32.
    fn stochastic_round_reference(w: i8, delta: f32, rng: &mut XorShift32) -> i8 {
        let u = rng.next_unit();
        let t = (w as f32 + delta).clamp(-128.0, 128.0);
        let fl = floor(t);
        let up = if u < t - fl { 1.0 } else { 0.0 };
        (fl + up).clamp(-127.0, 127.0) as i8
    }

    #[test]
    fn stochastic_rounding_equals_the_clamped_f32_form() {
        let mut x = XorShift32::new(5);
        let (mut a, mut b) = (XorShift32::new(77), XorShift32::new(77));
        let specials = [
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
            0.0,
            -0.0,
            127.5,
            -127.5,
            128.0,
            -129.0,
            255.0,
            -255.0,
            1e10,
            -1e10,
            3e9,
            -3e9,
        ];
        for i in 0..200_000 {
            let w = x.next_u32() as u8 as i8;
            let delta = match i % 4 {
                0 => specials[(x.next_u32() % specials.len() as u32) as usize],
                1 => (x.next_u32() % 4001) as f32 / 8.0 - 250.0,
                2 => (x.next_u32() as i32) as f32 * 1e-9,
                _ => f32::from_bits(x.next_u32()),
            };
            let (want, got) = (
                stochastic_round_reference(w, delta, &mut a),
                stochastic_round(w, delta, &mut b),
            );
            assert_eq!(got, want, "w {w} delta {delta}");
        }
        assert_eq!(a.state, b.state);
    }

    /// The whole update against a per-weight walk with the reference rounding, on random shapes,
    /// selections on either axis, QAS on and off.
    #[test]
    fn weight_update_equals_the_per_weight_reference() {
        let mut x = XorShift32::new(13);
        let mut pick = |n: usize| x.next_u32() as usize % n;
        for case in 0..300 {
            let shape = WeightShape {
                out_c: 1 + pick(9),
                taps: [1, 9, 25][pick(3)],
                in_per_group: 1 + pick(7),
                groups: 1,
            };
            let sel = if pick(2) == 0 {
                ChannelSelection::output(pick(shape.out_c + 1))
            } else {
                ChannelSelection::input(pick(shape.in_per_group + 1))
            };
            let n = sel.selected_len(&shape);
            let weight: Vec<i8> = (0..shape.len()).map(|_| pick(256) as u8 as i8).collect();
            let scales: Vec<f32> = (0..shape.out_c)
                .map(|_| [1e-3, 0.02, 0.5][pick(3)])
                .collect();
            let grad: Vec<f32> = (0..n)
                .map(|_| (pick(20_001) as f32 - 10_000.0) * 1e-4)
                .collect();
            let cfg = SgdConfig {
                lr: [0.01, 0.5, 1e4][pick(3)],
                momentum: 0.0,
                qas: case % 2 == 0,
            };
            let mut want = weight.clone();
            let mut ra = XorShift32::new(case + 1);
            let mut k = 0;
            shape.for_each_selected(&sel, |i, o| {
                let delta = -cfg.lr * update_grad(grad[k], scales[o], cfg.qas);
                want[i] = stochastic_round_reference(want[i], delta, &mut ra);
                k += 1;
            });
            let mut got = weight.clone();
            let mut rb = XorShift32::new(case + 1);
            sgd_update_weights(
                &mut got,
                &shape,
                &scales,
                sel,
                &grad,
                &cfg,
                None,
                UpdateState::StochasticRounding(&mut rb),
            )
            .unwrap();
            assert_eq!(got, want, "case {case}: {shape:?} {sel:?} {cfg:?}");
            assert_eq!(ra.state, rb.state);
        }
    }

    /// Steps built to land within a few f32 ulps of a half-integer, where the f32 decision is
    /// closest to going wrong: both the f32 path and its fallback must give the formula's bits.
    #[test]
    fn bias_steps_near_half_integers_equal_the_f64_formula() {
        let mut x = XorShift32::new(21);
        let mut unit = || x.next_u32() as f64 / u32::MAX as f64;
        let (mut decided, mut fell_back) = (0, 0);
        for i in 0..50_000 {
            let cfg = SgdConfig {
                lr: [0.05, 0.3, 1.0, 7.5][i % 4],
                momentum: 0.0,
                qas: i % 3 != 0,
            };
            let (ws, is) = ((1e-4 + unit() * 0.1) as f32, (1e-3 + unit()) as f32);
            let half = (unit() * 2000.0).floor() - 1000.0 + 0.5;
            let target = half * (1.0 + (unit() - 0.5) * 1e-5);
            let s = ws as f64 * is as f64;
            let gr = if cfg.qas {
                -target / cfg.lr as f64 * s
            } else {
                -target / cfg.lr as f64 / s
            } as f32;
            let bias = (unit() * 2e6) as i32 - 1_000_000;
            match bias_step_f32(gr, ws * is, &cfg) {
                Some(_) => decided += 1,
                None => fell_back += 1,
            }
            let mut b = [bias];
            sgd_update_bias(&mut b, &[ws], is, &[gr], &cfg, None).unwrap();
            assert_eq!(
                b[0],
                reference(bias, ws, is, gr, &cfg, None),
                "bias {bias} grad {gr} scales {ws} {is} {cfg:?}"
            );
        }
        assert!(
            decided > 10_000 && fell_back > 1_000,
            "decided {decided}, fell back {fell_back}"
        );
    }

    #[test]
    fn bias_update_equals_the_f64_formula() {
        let mut x = XorShift32::new(9);
        let mut pick = |n: u32| x.next_u32() % n;
        let lim = crate::ops::BIAS_LIMIT as i32;
        for _ in 0..20_000 {
            let bias = match pick(5) {
                0 => 0,
                1 => lim - pick(3) as i32 + 1,
                2 => -lim + pick(3) as i32 - 1,
                3 => i32::MIN + pick(1000) as i32,
                _ => pick(20_001) as i32 - 10_000,
            };
            let gr = match pick(4) {
                0 => 0.0,
                1 => -0.0,
                2 => (pick(2001) as f32 - 1000.0) * 1e-3,
                _ => {
                    f32::from_bits(pick(u32::MAX) & 0x7f7f_ffff)
                        * if pick(2) == 0 { 1.0 } else { -1.0 }
                }
            };
            let ws = [1e-30, 1e-4, 0.02, 3.0][pick(4) as usize];
            let cfg = SgdConfig {
                lr: [0.0, 0.05, 1e6][pick(3) as usize],
                momentum: [0.0, 0.9][pick(2) as usize],
                qas: pick(2) == 0,
            };
            let with_m = pick(2) == 0;
            let v0 = (pick(201) as f32 - 100.0) * 0.01;
            let (mut va, mut vb) = (v0, v0);
            let want = reference(bias, ws, 0.5, gr, &cfg, with_m.then_some(&mut va));
            let mut b = [bias];
            let mut vs = [vb];
            let mom = if with_m { Some(&mut vs[..]) } else { None };
            sgd_update_bias(&mut b, &[ws], 0.5, &[gr], &cfg, mom).unwrap();
            vb = vs[0];
            assert_eq!(
                b[0], want,
                "bias {bias} grad {gr} scale {ws} {cfg:?} momentum {with_m}"
            );
            assert_eq!(va.to_bits(), vb.to_bits());
        }
    }
}
