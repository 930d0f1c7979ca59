//! QAS and the int8 SGD update: the mis-scaling QAS corrects, that a QAS int8 step is the fp32
//! step, and the behaviour of each update precision.
mod kernels_common;

use kernels_common::*;
use tt_core::ops::conv::{conv2d_backward_weight, Conv2dGeom};
use tt_core::ops::{ChannelSelection, WeightShape};
use tt_core::qas::*;
use tt_core::quant::{all_finite, QParams};
use tt_core::Error;

fn norm(v: impl Iterator<Item = f64>) -> f64 {
    v.map(|x| x * x).sum::<f64>().sqrt()
}

/// A real weight gradient of a 3x3 conv (8 -> 6 channels) from random data, and its weights.
fn layer() -> (Conv2dGeom, Vec<i8>, Vec<f32>, Vec<f32>) {
    let g = Conv2dGeom::new(6, 6, 8, 6, 3, 3, 1, 1, 1, 1, 1, 1, 1).unwrap();
    let mut rng = Seeded(7);
    let w = rng.i8s(g.weight_len(), -100, 100);
    // Per-channel scales spanning two orders of magnitude, as in a real BN-folded layer.
    let ws: Vec<f32> = (0..6).map(|o| 0.001 * 2.5f32.powi(o)).collect();
    let q = QParams::new(0.05, 3).unwrap();
    let x = rng.i8s(g.input_len(), -128, 127);
    let r = rng.f32s(g.output_len(), -1.0, 1.0);
    let mut gw = vec![0f32; g.weight_len()];
    conv2d_backward_weight(&g, &x, q, &r, ChannelSelection::output(6), &mut gw).unwrap();
    (g, w, ws, gw)
}

#[test]
fn qas_corrects_the_s_w_squared_mis_scaling() {
    let (g, w, ws, gw) = layer();
    let row = g.weight_len() / g.out_c;
    for o in 0..g.out_c {
        let gw_o = &gw[o * row..(o + 1) * row];
        let w_o = &w[o * row..(o + 1) * row];
        let s = ws[o] as f64;
        let g_real = norm(gw_o.iter().map(|&v| v as f64));
        let g_bar = norm(gw_o.iter().map(|&v| int8_weight_grad(v, ws[o]) as f64));
        let g_tilde = norm(gw_o.iter().map(|&v| update_grad(v, ws[o], true) as f64));
        let w_real = norm(w_o.iter().map(|&v| v as f64 * s));
        let w_bar = norm(w_o.iter().map(|&v| v as f64));
        // ||G_W̄|| / ||G_W|| = s_W while ||W̄|| / ||W|| = 1 / s_W: off by s_W² ...
        assert!((g_bar / g_real / s - 1.0).abs() < 1e-6, "channel {o}");
        assert!((w_bar / w_real * s - 1.0).abs() < 1e-6);
        // ... and QAS (G̃ = G_W̄ / s_W²) makes the gradient-to-weight ratio that of fp32.
        assert!(((g_tilde / w_bar) / (g_real / w_real) - 1.0).abs() < 1e-5);
        for &v in gw_o {
            let a = qas_scale_weight_grad(int8_weight_grad(v, ws[o]), ws[o]);
            assert!((a - update_grad(v, ws[o], true)).abs() <= 1e-6 * a.abs());
        }
    }
}

/// Tolerance: with an f32 master copy the int8-unit QAS step, scaled back by s_W, equals the
/// fp32 step to 1e-5 relative (1e-5 LSB absolute floor); the rounded int8 weight is within half an LSB of the fp32 weight;
/// the mean over 2000 stochastic-rounding seeds is within 0.06 LSB of it (> 5 standard errors), with direction cosine
/// > 0.999. Without QAS the step is s_W² times the fp32 step.
#[test]
fn qas_int8_step_is_the_fp32_step() {
    let (g, w, ws, gw) = layer();
    let shape = g.weight_shape();
    let sel = ChannelSelection::output(g.out_c);
    let row = g.weight_len() / g.out_c;
    // Learning rate giving steps of up to ~3 LSB in the channel with the largest step.
    let max_step = (0..gw.len())
        .map(|k| (gw[k] / ws[k / row]).abs())
        .fold(0f32, f32::max);
    let lr = 3.0 / max_step;
    let float_new: Vec<f64> = (0..gw.len())
        .map(|k| w[k] as f64 * ws[k / row] as f64 - lr as f64 * gw[k] as f64)
        .collect();
    let cfg = SgdConfig {
        lr,
        momentum: 0.0,
        qas: true,
    };

    let mut wm = w.clone();
    let mut master = vec![0f32; gw.len()];
    init_master(&wm, &shape, sel, &mut master).unwrap();
    sgd_update_weights(
        &mut wm,
        &shape,
        &ws,
        sel,
        &gw,
        &cfg,
        None,
        UpdateState::FpMaster(&mut master),
    )
    .unwrap();
    for k in 0..gw.len() {
        let s = ws[k / row] as f64;
        let step_int8 = (master[k] as f64 - w[k] as f64) * s;
        let step_fp32 = float_new[k] - w[k] as f64 * s;
        // f32 master copies near 127 carry ~4e-6 LSB of rounding: 1e-5 relative, 1e-5 LSB floor.
        assert!(
            (step_int8 - step_fp32).abs() <= 1e-5 * step_fp32.abs().max(s),
            "{k}"
        );
        assert!((wm[k] as f64 * s - float_new[k]).abs() <= 0.5 * s + 1e-9);
    }

    let reps = 2000;
    let mut mean = vec![0f64; gw.len()];
    for seed in 1..=reps {
        let mut ws8 = w.clone();
        let mut rng = XorShift32::new(seed);
        sgd_update_weights(
            &mut ws8,
            &shape,
            &ws,
            sel,
            &gw,
            &cfg,
            None,
            UpdateState::StochasticRounding(&mut rng),
        )
        .unwrap();
        for k in 0..gw.len() {
            mean[k] += ws8[k] as f64 / reps as f64;
        }
    }
    let (mut dot, mut n1, mut n2) = (0.0, 0.0, 0.0);
    for k in 0..gw.len() {
        let s = ws[k / row] as f64;
        let target = float_new[k] / s;
        assert!(
            (mean[k] - target).abs() < 0.06,
            "{k}: {} vs {}",
            mean[k],
            target
        );
        let (a, b) = (mean[k] - w[k] as f64, target - w[k] as f64);
        dot += a * b;
        n1 += a * a;
        n2 += b * b;
    }
    assert!(dot / (n1 * n2).sqrt() > 0.999);

    // The paper's baseline (no QAS) steps along G_W̄ = s_W G_W: s_W² times the fp32 step, per
    // channel. With s_W = 1e-3 that is ~3e-6 LSB: the int8 weights do not move at all.
    let mut g_qas = gw.clone();
    let mut g_raw = gw.clone();
    weight_grad_to_int8_units(&shape, sel, &ws, &mut g_qas, true).unwrap();
    weight_grad_to_int8_units(&shape, sel, &ws, &mut g_raw, false).unwrap();
    for o in 0..g.out_c {
        let s = ws[o] as f64;
        let raw = norm(g_raw[o * row..(o + 1) * row].iter().map(|&v| v as f64));
        let scaled = norm(g_qas[o * row..(o + 1) * row].iter().map(|&v| v as f64));
        assert!((raw / scaled / (s * s) - 1.0).abs() < 1e-5, "channel {o}");
    }
    let mut wb = w.clone();
    let mut rng = XorShift32::new(9);
    let base = SgdConfig { qas: false, ..cfg };
    sgd_update_weights(
        &mut wb,
        &shape,
        &ws,
        sel,
        &gw,
        &base,
        None,
        UpdateState::StochasticRounding(&mut rng),
    )
    .unwrap();
    let moved = (0..row).filter(|&k| wb[k] != w[k]).count();
    assert!(moved <= 2, "{moved} weights of channel 0 moved without QAS");
}

fn flat(n: usize) -> WeightShape {
    WeightShape {
        out_c: 1,
        taps: 1,
        in_per_group: n,
        groups: 1,
    }
}

#[test]
fn stochastic_rounding_is_unbiased_and_deterministic() {
    let n = 20_000;
    let shape = flat(n);
    let sel = ChannelSelection::output(1);
    // Real gradient -0.3 with s_W = 1 and lr = 1: a +0.3 LSB step for every weight.
    let grad = vec![-0.3f32; n];
    let cfg = SgdConfig {
        lr: 1.0,
        momentum: 0.0,
        qas: true,
    };
    let mut w = vec![10i8; n];
    let mut rng = XorShift32::new(42);
    sgd_update_weights(
        &mut w,
        &shape,
        &[1.0],
        sel,
        &grad,
        &cfg,
        None,
        UpdateState::StochasticRounding(&mut rng),
    )
    .unwrap();
    let mean = w.iter().map(|&v| v as f64).sum::<f64>() / n as f64;
    assert!((mean - 10.3).abs() < 0.01, "mean {mean}");
    assert!(w.iter().all(|&v| v == 10 || v == 11));
    let mut w2 = vec![10i8; n];
    let mut rng2 = XorShift32::new(42);
    sgd_update_weights(
        &mut w2,
        &shape,
        &[1.0],
        sel,
        &grad,
        &cfg,
        None,
        UpdateState::StochasticRounding(&mut rng2),
    )
    .unwrap();
    assert_eq!(w, w2);
    assert_eq!(rng, rng2);
    let mut w3 = vec![10i8; n];
    let mut rng3 = XorShift32::new(43);
    sgd_update_weights(
        &mut w3,
        &shape,
        &[1.0],
        sel,
        &grad,
        &cfg,
        None,
        UpdateState::StochasticRounding(&mut rng3),
    )
    .unwrap();
    assert_ne!(w, w3);
}

#[test]
fn xorshift_sequence_is_pinned() {
    // Marsaglia's xorshift32 (13, 17, 5) from state 1: the MCU must draw the same numbers.
    let mut r = XorShift32 { state: 1 };
    assert_eq!(
        [r.next_u32(), r.next_u32(), r.next_u32()],
        [270_369, 67_634_689, 2_647_435_461]
    );
    // Seeding is pinned too, and nearby seeds start far apart.
    let firsts: Vec<u32> = (0..4).map(|s| XorShift32::new(s).next_u32()).collect();
    assert!(firsts.iter().all(|&v| v != 0));
    assert!(
        firsts.windows(2).all(|p| p[0].abs_diff(p[1]) > 1 << 20),
        "{firsts:?}"
    );
    assert_eq!(XorShift32::new(1), XorShift32::new(1));
}

#[test]
fn residual_keeps_small_steps_and_master_is_exact() {
    let shape = flat(1);
    let sel = ChannelSelection::output(1);
    let cfg = SgdConfig {
        lr: 1.0,
        momentum: 0.0,
        qas: true,
    };
    let grad = [-0.1f32]; // +0.1 LSB per step: lost entirely by round-to-nearest
    let mut w = [0i8];
    let mut res = [0i8];
    for _ in 0..10 {
        sgd_update_weights(
            &mut w,
            &shape,
            &[1.0],
            sel,
            &grad,
            &cfg,
            None,
            UpdateState::Residual(&mut res),
        )
        .unwrap();
    }
    // Each step is 25.6 -> 26 / 256 LSB; ten of them make 260 / 256.
    assert_eq!((w[0], res[0]), (1, 4));
    let mut wm = [0i8];
    let mut master = [0f32];
    for _ in 0..10 {
        sgd_update_weights(
            &mut wm,
            &shape,
            &[1.0],
            sel,
            &grad,
            &cfg,
            None,
            UpdateState::FpMaster(&mut master),
        )
        .unwrap();
    }
    assert!((master[0] - 1.0).abs() < 1e-6);
    assert_eq!(wm[0], 1);
    // Half-way rounding of the master is away from zero.
    let mut wh = [0i8];
    let mut mh = [0f32];
    sgd_update_weights(
        &mut wh,
        &shape,
        &[1.0],
        sel,
        &[0.5],
        &cfg,
        None,
        UpdateState::FpMaster(&mut mh),
    )
    .unwrap();
    assert_eq!(wh[0], -1);
}

#[test]
fn updates_saturate_to_symmetric_range() {
    let shape = flat(3);
    let sel = ChannelSelection::output(1);
    let cfg = SgdConfig {
        lr: 1.0,
        momentum: 0.0,
        qas: true,
    };
    let grad = [-1000.0f32, 1000.0, 1e30];
    for p in 0..3 {
        let mut w = [120i8, -120, 0];
        let mut rng = XorShift32::new(1);
        let mut res = [0i8; 3];
        let mut m = [120.0f32, -120.0, 0.0];
        let st = match p {
            0 => UpdateState::StochasticRounding(&mut rng),
            1 => UpdateState::Residual(&mut res),
            _ => UpdateState::FpMaster(&mut m),
        };
        sgd_update_weights(&mut w, &shape, &[1.0], sel, &grad, &cfg, None, st).unwrap();
        assert_eq!(w, [127, -127, -127], "precision {p}");
    }
}

#[test]
fn non_finite_gradients_are_refused_without_writing() {
    let shape = flat(3);
    let sel = ChannelSelection::output(1);
    let cfg = SgdConfig {
        lr: 0.1,
        momentum: 0.9,
        qas: true,
    };
    for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
        let mut w = [1i8, 2, 3];
        let mut rng = XorShift32::new(5);
        let r = sgd_update_weights(
            &mut w,
            &shape,
            &[0.1],
            sel,
            &[0.1, bad, 0.2],
            &cfg,
            None,
            UpdateState::StochasticRounding(&mut rng),
        );
        assert!(matches!(r, Err(Error::NonFinite { .. })));
        assert_eq!(w, [1, 2, 3]);
        assert_eq!(rng, XorShift32::new(5));
        let mut b = [10i32, 20, 30];
        let rb = sgd_update_bias(&mut b, &[0.1; 3], 0.5, &[bad, 0.0, 0.0], &cfg, None);
        assert!(matches!(rb, Err(Error::NonFinite { .. })));
        assert_eq!(b, [10, 20, 30]);
    }
    assert!(all_finite(&[0.0, -1.0, 1e30]));
    assert!(!all_finite(&[0.0, f32::NAN]));
    let mut w = [1i8; 3];
    let mut v = [0.0, f32::NAN, 0.0];
    let mut rng = XorShift32::new(5);
    let r = sgd_update_weights(
        &mut w,
        &shape,
        &[0.1],
        sel,
        &[0.0; 3],
        &cfg,
        Some(&mut v),
        UpdateState::StochasticRounding(&mut rng),
    );
    assert!(matches!(r, Err(Error::NonFinite { .. })));
}

#[test]
fn momentum_follows_the_pytorch_convention() {
    let shape = flat(1);
    let sel = ChannelSelection::output(1);
    let cfg = SgdConfig {
        lr: 0.5,
        momentum: 0.9,
        qas: true,
    };
    let mut w = [0i8];
    let mut m = [0f32];
    let mut v = [0f32];
    sgd_update_weights(
        &mut w,
        &shape,
        &[2.0],
        sel,
        &[4.0],
        &cfg,
        Some(&mut v),
        UpdateState::FpMaster(&mut m),
    )
    .unwrap();
    // G̃ = G_W / s_W = 2; v = 2; master = -1.
    assert_eq!((v[0], m[0]), (2.0, -1.0));
    sgd_update_weights(
        &mut w,
        &shape,
        &[2.0],
        sel,
        &[2.0],
        &cfg,
        Some(&mut v),
        UpdateState::FpMaster(&mut m),
    )
    .unwrap();
    // v = 0.9 * 2 + 1 = 2.8; master = -1 - 1.4.
    assert!((v[0] - 2.8).abs() < 1e-6 && (m[0] + 2.4).abs() < 1e-6);
    assert_eq!(w[0], -2);
}

#[test]
fn selections_touch_only_their_channels() {
    // OHWI [3][1][2][4]: output axis rows 0..2, input axis columns 0..1.
    let shape = WeightShape {
        out_c: 3,
        taps: 2,
        in_per_group: 4,
        groups: 1,
    };
    let cfg = SgdConfig {
        lr: 1.0,
        momentum: 0.0,
        qas: true,
    };
    let w0: Vec<i8> = (0..24).map(|v| v as i8).collect();
    let mut w = w0.clone();
    let sel = ChannelSelection::output(2);
    let mut m = vec![0f32; sel.selected_len(&shape)];
    init_master(&w, &shape, sel, &mut m).unwrap();
    sgd_update_weights(
        &mut w,
        &shape,
        &[1.0; 3],
        sel,
        &[-1.0; 16],
        &cfg,
        None,
        UpdateState::FpMaster(&mut m),
    )
    .unwrap();
    for k in 0..24 {
        assert_eq!(w[k], w0[k] + if k < 16 { 1 } else { 0 }, "{k}");
    }
    let mut w = w0.clone();
    let sel = ChannelSelection::input(1);
    let mut res = vec![0i8; sel.selected_len(&shape)];
    assert_eq!(res.len(), 6);
    sgd_update_weights(
        &mut w,
        &shape,
        &[1.0; 3],
        sel,
        &[-2.0; 6],
        &cfg,
        None,
        UpdateState::Residual(&mut res),
    )
    .unwrap();
    for k in 0..24 {
        assert_eq!(w[k], w0[k] + if k % 4 == 0 { 2 } else { 0 }, "{k}");
    }
    // Grouped layers cannot select along the input axis; counts are bounded.
    let grouped = WeightShape { groups: 2, ..shape };
    let mut rng = XorShift32::new(1);
    assert!(sgd_update_weights(
        &mut w,
        &grouped,
        &[1.0; 3],
        sel,
        &[0.0; 6],
        &cfg,
        None,
        UpdateState::StochasticRounding(&mut rng)
    )
    .is_err());
    assert!(sgd_update_weights(
        &mut w,
        &shape,
        &[1.0; 3],
        ChannelSelection::output(4),
        &[0.0; 32],
        &cfg,
        None,
        UpdateState::StochasticRounding(&mut rng)
    )
    .is_err());
    assert!(sgd_update_weights(
        &mut w,
        &shape,
        &[1.0; 3],
        sel,
        &[0.0; 5],
        &cfg,
        None,
        UpdateState::StochasticRounding(&mut rng)
    )
    .is_err());
}

#[test]
fn bias_update_is_the_fp32_step() {
    let ws = [0.01f32, 0.002];
    let s_x = 0.05f32;
    let g = [0.3f32, -0.7];
    let lr = 0.01;
    let mut b = [1000i32, -400];
    sgd_update_bias(
        &mut b,
        &ws,
        s_x,
        &g,
        &SgdConfig {
            lr,
            momentum: 0.0,
            qas: true,
        },
        None,
    )
    .unwrap();
    for o in 0..2 {
        let s = ws[o] as f64 * s_x as f64;
        let real_step = (b[o] as f64 - [1000.0, -400.0][o]) * s;
        assert!(
            (real_step + lr as f64 * g[o] as f64).abs() <= 0.5 * s,
            "{o}"
        );
    }
    // Without QAS the int32 step is (s_W s_x)² times smaller: here it rounds to nothing.
    let mut b2 = [1000i32, -400];
    sgd_update_bias(
        &mut b2,
        &ws,
        s_x,
        &g,
        &SgdConfig {
            lr,
            momentum: 0.0,
            qas: false,
        },
        None,
    )
    .unwrap();
    assert_eq!(b2, [1000, -400]);
    assert!(sgd_update_bias(
        &mut b2,
        &ws,
        s_x,
        &[0.0; 3],
        &SgdConfig {
            lr,
            momentum: 0.0,
            qas: true
        },
        None
    )
    .is_err());
    assert!(sgd_update_bias(
        &mut b2,
        &ws,
        0.0,
        &g,
        &SgdConfig {
            lr,
            momentum: 0.0,
            qas: true
        },
        None
    )
    .is_err());
}

#[test]
fn bias_momentum_and_prefix() {
    let cfg = SgdConfig {
        lr: 1.0,
        momentum: 0.5,
        qas: true,
    };
    // s_W s_x = 0.25: G̃ = G_b / 0.25 = 4 G_b (int32 units).
    let mut b = [0i32, 7];
    let mut v = [0f32];
    sgd_update_bias(&mut b, &[0.5, 0.5], 0.5, &[1.0], &cfg, Some(&mut v)).unwrap();
    assert_eq!((b, v), ([-4, 7], [4.0]));
    sgd_update_bias(&mut b, &[0.5, 0.5], 0.5, &[1.0], &cfg, Some(&mut v)).unwrap();
    // v = 0.5 * 4 + 4 = 6; only the prefix the gradient covers moves.
    assert_eq!((b, v), ([-10, 7], [6.0]));
    // Saturates at +-2^30 (tt_core::ops::BIAS_LIMIT: the forward's int32 accumulators stay
    // exact), never wraps.
    let mut big = [(1 << 30) - 1, 1 - (1 << 30)];
    sgd_update_bias(&mut big, &[0.5, 0.5], 0.5, &[-1e9, 1e9], &cfg, None).unwrap();
    assert_eq!(big, [1 << 30, -(1 << 30)]);
}
