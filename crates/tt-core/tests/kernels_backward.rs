//! Backward kernels against central-difference gradients of the float (dequantized) reference.
//! Tolerance: relative error ||kernel - numeric|| / ||numeric|| < 1e-4 (the kernels accumulate in
//! f32, the references in f64; the functions differentiated are linear or smooth in the
//! perturbed variable, so the numerical gradient itself is accurate to ~1e-10).
mod kernels_common;

use kernels_common::*;
use proptest::prelude::*;
use tt_core::ops::act::clamp_mask_backward;
use tt_core::ops::add::add_backward;
use tt_core::ops::conv::{
    conv2d_backward_bias, conv2d_backward_input, conv2d_backward_weight, Conv2dGeom,
};
use tt_core::ops::fc::{
    fc_backward_bias, fc_backward_input, fc_backward_weight, fc_forward, FcGeom,
};
use tt_core::ops::loss::{mse, softmax_cross_entropy};
use tt_core::ops::pool::{avgpool_backward, global_avgpool_backward, maxpool_backward, Pool2dGeom};
use tt_core::ops::{save_input_channels, ChannelAxis, ChannelSelection};
use tt_core::quant::{QParams, Requant};

const TOL: f64 = 1e-4;

fn selection(g: &Conv2dGeom, rng: &mut Seeded) -> ChannelSelection {
    if g.groups == 1 && rng.unit() < 0.5 {
        ChannelSelection::input(rng.int(0, g.in_c as i32) as usize)
    } else {
        ChannelSelection::output(rng.int(0, g.out_c as i32) as usize)
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn conv_input_grad_is_numerical_grad(g in any_geom(), seed in any::<u64>()) {
        let mut rng = Seeded(seed);
        let w = rng.i8s(g.weight_len(), -127, 127);
        let ws = rng.f32s(g.out_c, 0.002, 0.05);
        let w_real: Vec<f64> = (0..w.len()).map(|i| w[i] as f64 * ws[i / (g.weight_len() / g.out_c)] as f64).collect();
        let r = rng.f32s(g.output_len(), -1.0, 1.0);
        let r64: Vec<f64> = r.iter().map(|&v| v as f64).collect();
        let x: Vec<f64> = rng.f32s(g.input_len(), -2.0, 2.0).iter().map(|&v| v as f64).collect();
        let mut gi = vec![f32::NAN; g.input_len()];
        conv2d_backward_input(&g, &r, &w, &ws, &mut gi).unwrap();
        let idx: Vec<usize> = (0..x.len()).collect();
        let num = numeric_grad(&x, &idx, 0.25, |x| dot(&r64, &ref_conv_f64(&g, x, &w_real)));
        prop_assert!(rel_err(&gi, &num, 1e-6) < TOL, "{:?}: {}", g, rel_err(&gi, &num, 1e-6));
    }

    #[test]
    fn conv_weight_and_bias_grads_are_numerical_grads(g in any_geom(), seed in any::<u64>()) {
        let mut rng = Seeded(seed);
        let q = QParams::new((0.01 + 0.05 * rng.unit()) as f32, rng.int(-128, 127)).unwrap();
        let x = rng.i8s(g.input_len(), -128, 127);
        let x_real: Vec<f64> = x.iter().map(|&v| q.dequantize(v) as f64).collect();
        let w_real: Vec<f64> = rng.f32s(g.weight_len(), -1.0, 1.0).iter().map(|&v| v as f64).collect();
        let r = rng.f32s(g.output_len(), -1.0, 1.0);
        let r64: Vec<f64> = r.iter().map(|&v| v as f64).collect();
        let sel = selection(&g, &mut rng);
        let ws = g.weight_shape();
        let saved_c = sel.saved_input_channels(g.in_c);
        let mut saved = vec![0i8; g.in_h * g.in_w * saved_c];
        save_input_channels(&x, g.in_c, saved_c, &mut saved).unwrap();
        let mut gw = vec![0f32; sel.selected_len(&ws)];
        conv2d_backward_weight(&g, &saved, q, &r, sel, &mut gw).unwrap();
        // Selected coordinates of the full OHWI weight, in gradient-buffer order.
        let (taps, ipg) = (g.kh * g.kw, g.in_c / g.groups);
        let mut idx = vec![];
        for o in 0..sel.rows(&ws) {
            for t in 0..taps {
                for i in 0..sel.cols(&ws) {
                    idx.push((o * taps + t) * ipg + i);
                }
            }
        }
        prop_assert_eq!(idx.len(), gw.len());
        let num = numeric_grad(&w_real, &idx, 0.25, |w| dot(&r64, &ref_conv_f64(&g, &x_real, w)));
        prop_assert!(rel_err(&gw, &num, 1e-6) < TOL, "{:?} {:?}: {}", g, sel, rel_err(&gw, &num, 1e-6));
        // Accumulates: a second sample adds on top.
        let first = gw.clone();
        conv2d_backward_weight(&g, &saved, q, &r, sel, &mut gw).unwrap();
        for (a, b) in gw.iter().zip(&first) {
            prop_assert!((a - 2.0 * b).abs() <= 1e-5 * b.abs().max(1.0));
        }
        let mut gb = vec![0.5f32; g.out_c];
        conv2d_backward_bias(&g, &r, &mut gb).unwrap();
        for oc in 0..g.out_c {
            let s: f64 = (0..g.out_h() * g.out_w()).map(|p| r64[p * g.out_c + oc]).sum();
            prop_assert!((gb[oc] as f64 - 0.5 - s).abs() < 1e-4);
        }
    }

    #[test]
    fn fc_grads_with_clamp_mask(i in 1usize..=40, o in 1usize..=16, seed in any::<u64>()) {
        let mut rng = Seeded(seed);
        let g = FcGeom::new(i, o).unwrap();
        let qi = QParams::new((0.02 + 0.05 * rng.unit()) as f32, rng.int(-20, 20)).unwrap();
        let qo = QParams::new((0.05 + 0.1 * rng.unit()) as f32, rng.int(-30, 0)).unwrap();
        let w = rng.i8s(i * o, -127, 127);
        let ws = rng.f32s(o, 0.002, 0.02);
        let bias: Vec<i32> = (0..o).map(|_| rng.int(-2000, 2000)).collect();
        let x = rng.i8s(i, -128, 127);
        let rq: Vec<Requant> = (0..o)
            .map(|k| Requant::from_scale(qi.scale as f64 * ws[k] as f64 / qo.scale as f64).unwrap())
            .collect();
        // ReLU6-like clamp: [zp, zp + round(6 / s)] clipped to int8.
        let lo = qo.zero_point as i8;
        let hi = (qo.zero_point as f64 + (6.0 / qo.scale as f64).round()).min(127.0) as i8;
        let mut out = vec![0i8; o];
        fc_forward(&g, &x, qi.zero_point, &w, &bias, &rq, qo.zero_point, lo, hi, &mut out).unwrap();
        let x_real: Vec<f64> = x.iter().map(|&v| qi.dequantize(v) as f64).collect();
        let w_real: Vec<f64> = (0..i * o).map(|k| w[k] as f64 * ws[k / i] as f64).collect();
        let b_real: Vec<f64> = (0..o).map(|k| bias[k] as f64 * qi.scale as f64 * ws[k] as f64).collect();
        let (lo_r, hi_r) = (qo.scale as f64 * (lo as i32 - qo.zero_point) as f64, qo.scale as f64 * (hi as i32 - qo.zero_point) as f64);
        let pre = |x: &[f64], w: &[f64], k: usize| -> f64 { b_real[k] + (0..i).map(|j| x[j] * w[k * i + j]).sum::<f64>() };
        let r = rng.f32s(o, -1.0, 1.0);
        let mut masked = r.clone();
        clamp_mask_backward(&out, lo, hi, &mut masked).unwrap();
        // Outputs whose float pre-activation is within 1.5 LSB of a bound are ambiguous between
        // the int8 and the float model; everywhere else the int8 mask is the float derivative.
        let lsb = qo.scale as f64;
        let clear: Vec<bool> = (0..o).map(|k| {
            let p = pre(&x_real, &w_real, k);
            (p - lo_r).abs() > 1.5 * lsb && (p - hi_r).abs() > 1.5 * lsb
        }).collect();
        let mut rr = vec![0f64; o];
        for k in 0..o {
            let p = pre(&x_real, &w_real, k);
            let inside = p > lo_r && p < hi_r;
            if clear[k] {
                prop_assert_eq!(masked[k] != 0.0, inside && r[k] != 0.0, "output {}", k);
                rr[k] = r[k] as f64;
            } else {
                masked[k] = 0.0;
            }
        }
        let loss = |x: &[f64], w: &[f64]| -> f64 {
            (0..o).map(|k| rr[k] * pre(x, w, k).clamp(lo_r, hi_r)).sum()
        };
        let mut gi = vec![0f32; i];
        fc_backward_input(&g, &masked, &w, &ws, &mut gi).unwrap();
        let num = numeric_grad(&x_real, &(0..i).collect::<Vec<_>>(), 1e-6, |x| loss(x, &w_real));
        prop_assert!(rel_err(&gi, &num, 1e-6) < TOL, "input grad {}", rel_err(&gi, &num, 1e-6));
        let sel = if rng.unit() < 0.5 { ChannelSelection::output(rng.int(0, o as i32) as usize) } else { ChannelSelection::input(rng.int(0, i as i32) as usize) };
        let saved: Vec<i8> = x[..sel.saved_input_channels(i)].to_vec();
        let mut gw = vec![0f32; sel.selected_len(&g.weight_shape())];
        fc_backward_weight(&g, &saved, qi, &masked, sel, &mut gw).unwrap();
        let idx: Vec<usize> = match sel.axis {
            ChannelAxis::Output => (0..sel.count * i).collect(),
            ChannelAxis::Input => (0..o).flat_map(|k| (0..sel.count).map(move |j| k * i + j)).collect(),
        };
        let num_w = numeric_grad(&w_real, &idx, 1e-6, |w| loss(&x_real, w));
        prop_assert!(rel_err(&gw, &num_w, 1e-6) < TOL, "weight grad {}", rel_err(&gw, &num_w, 1e-6));
        let mut gb = vec![0f32; o];
        fc_backward_bias(&g, &masked, &mut gb).unwrap();
        for k in 0..o {
            prop_assert_eq!(gb[k], masked[k]);
        }
    }

    #[test]
    fn pool_grads_are_numerical_grads(
        (h, w, c) in (1usize..=7, 1usize..=7, 1usize..=4),
        (kh, kw, sh, sw) in (1usize..=3, 1usize..=3, 1usize..=2, 1usize..=2),
        (pt, pl, pb, pr) in (0usize..=2, 0usize..=2, 0usize..=2, 0usize..=2),
        seed in any::<u64>(),
    ) {
        let Ok(g) = Pool2dGeom::new(h, w, c, kh, kw, sh, sw, pt, pl, pb, pr) else {
            return Ok(());
        };
        let mut rng = Seeded(seed);
        let x = rng.i8s(h * w * c, -128, 127);
        let r = rng.f32s(g.output_len(), -1.0, 1.0);
        let r64: Vec<f64> = r.iter().map(|&v| v as f64).collect();
        // Earlier elements win ties, as in the kernel: a tiny decreasing offset breaks them.
        let xf: Vec<f64> = x.iter().enumerate().map(|(k, &v)| v as f64 - 1e-6 * k as f64 / x.len() as f64).collect();
        let pool = |x: &[f64], avg: bool| -> f64 {
            let mut l = 0.0;
            for oy in 0..g.out_h() {
                for ox in 0..g.out_w() {
                    for ch in 0..c {
                        let mut v = vec![];
                        for ky in 0..kh {
                            for kx in 0..kw {
                                if let (Some(iy), Some(ix)) = (src(oy, ky, sh, pt, h), src(ox, kx, sw, pl, w)) {
                                    v.push(x[(iy * w + ix) * c + ch]);
                                }
                            }
                        }
                        let y = if avg { v.iter().sum::<f64>() / v.len() as f64 } else { v.iter().cloned().fold(f64::MIN, f64::max) };
                        l += r64[(oy * g.out_w() + ox) * c + ch] * y;
                    }
                }
            }
            l
        };
        let idx: Vec<usize> = (0..x.len()).collect();
        let mut ga = vec![0f32; x.len()];
        avgpool_backward(&g, &r, &mut ga).unwrap();
        let num_a = numeric_grad(&xf, &idx, 0.25, |x| pool(x, true));
        prop_assert!(rel_err(&ga, &num_a, 1e-6) < TOL);
        let mut gm = vec![0f32; x.len()];
        maxpool_backward(&g, &x, &r, &mut gm).unwrap();
        let num_m = numeric_grad(&xf, &idx, 1e-8, |x| pool(x, false));
        prop_assert!(rel_err(&gm, &num_m, 1e-6) < TOL);
    }

    #[test]
    fn losses_are_numerical_grads(k in 1usize..=30, seed in any::<u64>()) {
        let mut rng = Seeded(seed);
        let q = QParams::new((0.01 + 0.3 * rng.unit()) as f32, rng.int(-128, 127)).unwrap();
        let logits = rng.i8s(k, -128, 127);
        let label = rng.int(0, k as i32 - 1) as usize;
        let z: Vec<f64> = logits.iter().map(|&v| q.dequantize(v) as f64).collect();
        let ce = |z: &[f64]| -> f64 {
            let m = z.iter().cloned().fold(f64::MIN, f64::max);
            m + z.iter().map(|v| (v - m).exp()).sum::<f64>().ln() - z[label]
        };
        let mut g = vec![0f32; k];
        let l = softmax_cross_entropy(&logits, q, label, &mut g).unwrap();
        prop_assert!((l as f64 - ce(&z)).abs() <= 1e-5 * ce(&z).max(1.0));
        let num = numeric_grad(&z, &(0..k).collect::<Vec<_>>(), 1e-5, ce);
        // A confident softmax has a gradient near 1e-5 whose f32 `p - 1` carries ~6e-8 of
        // absolute error: relative to max(||g||, 1e-2), i.e. an absolute 1e-6 floor.
        prop_assert!(rel_err(&g, &num, 1e-2) < TOL, "{}", rel_err(&g, &num, 1e-2));
        let t: Vec<f32> = rng.f32s(k, -3.0, 3.0);
        let sq = |z: &[f64]| -> f64 { z.iter().zip(&t).map(|(a, b)| (a - *b as f64).powi(2)).sum::<f64>() / k as f64 };
        let l2 = mse(&logits, q, &t, &mut g).unwrap();
        prop_assert!((l2 as f64 - sq(&z)).abs() <= 1e-5 * sq(&z).max(1.0));
        let num2 = numeric_grad(&z, &(0..k).collect::<Vec<_>>(), 1e-3, sq);
        prop_assert!(rel_err(&g, &num2, 1e-6) < TOL);
    }
}

#[test]
fn add_and_global_pool_backward() {
    let out = [-128i8, -5, 0, 126, 127, 3];
    let r = [1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0];
    let (mut ga, mut gb) = ([0f32; 6], [0f32; 6]);
    // ReLU on zp -5: -5 is the lower bound, 127 the upper.
    add_backward(&out, -5, 127, &r, &mut ga, &mut gb).unwrap();
    assert_eq!(ga, [0.0, 0.0, 3.0, 4.0, 0.0, 6.0]);
    assert_eq!(ga, gb);
    let mut gi = [0f32; 2 * 3 * 2];
    global_avgpool_backward(2, 3, 2, &[6.0, -12.0], &mut gi).unwrap();
    for p in 0..6 {
        assert_eq!((gi[2 * p], gi[2 * p + 1]), (1.0, -2.0));
    }
}
