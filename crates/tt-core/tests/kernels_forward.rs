//! Forward int8 kernels against integer references over random shapes, strides, paddings and
//! groups (incl. depthwise on both its fast path and, for kernels above 8x8, the general one).
//! Every comparison is exact (bit for bit).
mod kernels_common;

use kernels_common::*;
use proptest::prelude::*;
use tt_core::ops::add::{add_forward, AddParams, AddTerms};
use tt_core::ops::conv::{
    conv2d_accumulate, conv2d_depthwise_in_place, conv2d_depthwise_in_place_plane, conv2d_forward,
    depthwise_in_place_scratch_len, Conv2dGeom,
};
use tt_core::ops::fc::{fc_accumulate, fc_forward, FcGeom};
use tt_core::ops::pool::{avgpool_forward, global_avgpool_forward, maxpool_forward, Pool2dGeom};
use tt_core::quant::{requantize, QParams, Requant, Rounding};

fn requants(rng: &mut Seeded, n: usize) -> Vec<Requant> {
    (0..n)
        .map(|_| Requant::from_scale(1e-4 + 0.05 * rng.unit()).unwrap())
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(160))]

    #[test]
    fn conv_forward_matches_integer_reference(g in any_geom(), seed in any::<u64>()) {
        let mut rng = Seeded(seed);
        let x = rng.i8s(g.input_len(), -128, 127);
        let w = rng.i8s(g.weight_len(), -127, 127);
        let bias: Vec<i32> = (0..g.out_c).map(|_| rng.int(-3000, 3000)).collect();
        let rq = requants(&mut rng, g.out_c);
        let (in_zp, out_zp) = (rng.int(-128, 127), rng.int(-128, 127));
        let (lo, hi) = if rng.unit() < 0.5 { (-128i8, 127i8) } else { (out_zp.max(-128) as i8, 100) };
        let (lo, hi) = (lo.min(hi), hi);
        let mut out = vec![0i8; g.output_len()];
        conv2d_forward(&g, &x, in_zp, &w, &bias, &rq, out_zp, lo, hi, &mut out).unwrap();
        let acc = ref_conv_acc(&g, &x, in_zp, &w, &[0], &bias);
        for (i, (&o, &a)) in out.iter().zip(&acc).enumerate() {
            let oc = i % g.out_c;
            prop_assert_eq!(o, ref_finish(ref_requant(a, rq[oc]), out_zp, lo, hi), "element {} of {:?}", i, g);
        }
    }

    #[test]
    fn depthwise_in_place_equals_out_of_place(g in depthwise_geom(), seed in any::<u64>()) {
        let mut rng = Seeded(seed);
        let x = rng.i8s(g.input_len(), -128, 127);
        let w = rng.i8s(g.weight_len(), -127, 127);
        let bias: Vec<i32> = (0..g.out_c).map(|_| rng.int(-3000, 3000)).collect();
        let rq = requants(&mut rng, g.out_c);
        let in_zp = rng.int(-128, 127);
        let mut want = vec![0i8; g.output_len()];
        conv2d_forward(&g, &x, in_zp, &w, &bias, &rq, 4, -128, 127, &mut want).unwrap();
        let mut buf = x.clone();
        let mut scratch = vec![0i8; depthwise_in_place_scratch_len(&g)];
        let r = conv2d_depthwise_in_place(&g, &mut buf, in_zp, &w, &bias, &rq, 4, -128, 127, &mut scratch);
        if g.out_w() <= g.in_w && g.pad_top < g.kh && g.output_len() <= g.input_len() {
            // "Same" or shrinking geometries always fit in place.
            prop_assert!(r.is_ok(), "{:?}: {:?}", g, r);
        }
        match r {
            Ok(()) => prop_assert_eq!(&buf[..g.output_len()], &want[..]),
            // Refused before writing anything.
            Err(_) => prop_assert_eq!(&buf, &x),
        }
        // The executor's form: one output plane of scratch, any geometry.
        let mut buf = x.clone();
        buf.resize(g.input_len().max(g.output_len()), 0);
        let mut plane = vec![0i8; g.out_h() * g.out_w()];
        conv2d_depthwise_in_place_plane(&g, &mut buf, in_zp, &w, &bias, &rq, 4, -128, 127, &mut plane).unwrap();
        prop_assert_eq!(&buf[..g.output_len()], &want[..]);
    }

    #[test]
    fn conv_accumulate_with_weight_zero_points(g in any_geom(), seed in any::<u64>(), per_channel in any::<bool>()) {
        let mut rng = Seeded(seed);
        let x = rng.i8s(g.input_len(), -128, 127);
        let w = rng.i8s(g.weight_len(), -128, 127);
        let wzp: Vec<i32> = (0..if per_channel { g.out_c } else { 1 }).map(|_| rng.int(-128, 127)).collect();
        let bias: Vec<i32> = if rng.unit() < 0.5 { vec![] } else { (0..g.out_c).map(|_| rng.int(-3000, 3000)).collect() };
        let x_zp = rng.int(-128, 127);
        let mut out = vec![0i32; g.output_len()];
        conv2d_accumulate(&g, &x, x_zp, &w, &wzp, &bias, &mut out).unwrap();
        let acc = ref_conv_acc(&g, &x, x_zp, &w, &wzp, &bias);
        for (&o, &a) in out.iter().zip(&acc) {
            prop_assert_eq!(o as i64, a);
        }
    }

    #[test]
    fn fc_forward_matches_integer_reference(i in 1usize..=70, o in 1usize..=20, seed in any::<u64>()) {
        let mut rng = Seeded(seed);
        let g = FcGeom::new(i, o).unwrap();
        let x = rng.i8s(i, -128, 127);
        let w = rng.i8s(i * o, -127, 127);
        let bias: Vec<i32> = (0..o).map(|_| rng.int(-5000, 5000)).collect();
        let rq = requants(&mut rng, o);
        let (in_zp, out_zp) = (rng.int(-128, 127), rng.int(-128, 127));
        let mut out = vec![0i8; o];
        fc_forward(&g, &x, in_zp, &w, &bias, &rq, out_zp, -128, 127, &mut out).unwrap();
        let wzp = rng.int(-128, 127);
        let mut acc = vec![0i32; o];
        fc_accumulate(&g, &x, in_zp, &w, &[wzp], &[], &mut acc).unwrap();
        for k in 0..o {
            let mut a = bias[k] as i64;
            let mut a2 = 0i64;
            for j in 0..i {
                a += (x[j] as i64 - in_zp as i64) * w[k * i + j] as i64;
                a2 += (x[j] as i64 - in_zp as i64) * (w[k * i + j] as i64 - wzp as i64);
            }
            prop_assert_eq!(out[k], ref_finish(ref_requant(a, rq[k]), out_zp, -128, 127));
            prop_assert_eq!(acc[k] as i64, a2);
        }
    }

    #[test]
    fn requant_is_within_half_lsb_of_real_product(acc in any::<i32>(), s in 1e-6f64..4.0) {
        let rq = Requant::from_scale(s).unwrap();
        let exact = (acc as f64 * rq.to_f64()).clamp(i32::MIN as f64, i32::MAX as f64);
        let got = rq.apply(acc) as f64;
        // One rounding of the exact product: |got - exact| <= 1/2 (ties away from zero).
        prop_assert!((got - exact).abs() <= 0.5 + 1e-9 * exact.abs(), "{} * {} -> {}", acc, s, got);
        prop_assert_eq!(rq.apply(acc) as i64, ref_requant(acc as i64, rq).clamp(i32::MIN as i64, i32::MAX as i64));
    }

    #[test]
    fn double_rounding_requant_matches_gemmlowp(acc in any::<i32>(), s in 1e-10f64..8.0) {
        let rq = Requant::from_scale(s).unwrap().with_rounding(Rounding::Double);
        prop_assert_eq!(rq.apply(acc) as i64, ref_requant_gemmlowp(acc as i64, rq).clamp(i32::MIN as i64, i32::MAX as i64));
        // Two roundings: within one LSB of the exact product (where the left shift does not saturate).
        if (acc as i64).abs() << rq.shift.max(0) < 1 << 31 {
            let exact = acc as f64 * rq.to_f64();
            prop_assert!((rq.apply(acc) as f64 - exact).abs() <= 1.0, "{} * {}", acc, s);
        }
        for (zp, lo, hi) in [(0, -128, 127), (-7, -7, 100)] {
            prop_assert_eq!(rq.apply_clamp(acc, zp, lo, hi), ref_finish(ref_requant_gemmlowp(acc as i64, rq), zp, lo, hi));
        }
    }

    #[test]
    fn requantize_buffer(c in 1usize..=9, px in 0usize..=5, per_tensor in any::<bool>(), seed in any::<u64>()) {
        let mut rng = Seeded(seed);
        let acc: Vec<i32> = (0..c * px).map(|_| rng.int(-100_000, 100_000)).collect();
        let rq = requants(&mut rng, if per_tensor { 1 } else { c });
        let zp = rng.int(-128, 127);
        let mut out = vec![0i8; acc.len()];
        requantize(&acc, c, &rq, zp, -100, 120, &mut out).unwrap();
        for (k, (&o, &a)) in out.iter().zip(&acc).enumerate() {
            let r = if per_tensor { rq[0] } else { rq[k % c] };
            prop_assert_eq!(o, ref_finish(ref_requant(a as i64, r), zp, -100, 120));
        }
    }

    #[test]
    fn add_matches_reference(n in 1usize..=64, seed in any::<u64>(), relu in any::<bool>(), double in any::<bool>()) {
        let mut rng = Seeded(seed);
        let qa = QParams::new((0.001 + 0.2 * rng.unit()) as f32, rng.int(-128, 127)).unwrap();
        let qb = QParams::new((0.001 + 0.2 * rng.unit()) as f32, rng.int(-128, 127)).unwrap();
        let qo = QParams::new((0.002 + 0.3 * rng.unit()) as f32, rng.int(-128, 127)).unwrap();
        let (lo, hi) = if relu { (qo.zero_point as i8, 127) } else { (-128, 127) };
        let a = rng.i8s(n, -128, 127);
        let b = rng.i8s(n, -128, 127);
        let mode = if double { Rounding::Double } else { Rounding::Single };
        let p = AddParams::new(qa, qb, qo, lo, hi, mode).unwrap();
        prop_assert!([p.a_mult, p.b_mult, p.out_mult].iter().all(|r| r.mode() == mode));
        let mut out = vec![0i8; n];
        add_forward(&p, &a, &b, &mut out).unwrap();
        for k in 0..n {
            // The TFLite recipe, spelled out: inputs << 20, to the common scale, sum, to output.
            let sa = ref_requant((a[k] as i64 - qa.zero_point as i64) << 20, p.a_mult);
            let sb = ref_requant((b[k] as i64 - qb.zero_point as i64) << 20, p.b_mult);
            let want = ref_finish(ref_requant(sa + sb, p.out_mult), qo.zero_point, lo, hi);
            prop_assert_eq!(out[k], want);
            // And it is the real sum to within one output LSB.
            let real = qa.dequantize(a[k]) as f64 + qb.dequantize(b[k]) as f64;
            let ideal = (real / qo.scale as f64 + qo.zero_point as f64).clamp(lo as f64, hi as f64);
            prop_assert!((out[k] as f64 - ideal).abs() <= 1.0, "{} vs {}", out[k], ideal);
        }
    }

    #[test]
    fn global_avgpool_matches_reference(h in 1usize..=9, w in 1usize..=9, c in 1usize..=12, seed in any::<u64>(), double in any::<bool>()) {
        let mut rng = Seeded(seed);
        let x = rng.i8s(h * w * c, -128, 127);
        let qi = QParams::new((0.01 + 0.1 * rng.unit()) as f32, rng.int(-128, 127)).unwrap();
        let qo = QParams::new((0.01 + 0.1 * rng.unit()) as f32, rng.int(-128, 127)).unwrap();
        let mut out = vec![0i8; c];
        let mode = if double { Rounding::Double } else { Rounding::Single };
        global_avgpool_forward(h, w, c, &x, qi, qo, mode, &mut out).unwrap();
        let rq = Requant::from_scale(qi.scale as f64 / (qo.scale as f64 * (h * w) as f64)).unwrap().with_rounding(mode);
        for ch in 0..c {
            let s: i64 = (0..h * w).map(|p| x[p * c + ch] as i64 - qi.zero_point as i64).sum();
            prop_assert_eq!(out[ch], ref_finish(ref_requant(s, rq), qo.zero_point, -128, 127));
        }
    }

    #[test]
    fn windowed_pools_match_reference(
        (h, w, c) in (1usize..=9, 1usize..=9, 1usize..=6),
        (kh, kw, sh, sw) in (1usize..=4, 1usize..=4, 1usize..=3, 1usize..=3),
        (pt, pl, pb, pr) in (0usize..=3, 0usize..=3, 0usize..=3, 0usize..=3),
        seed in any::<u64>(),
    ) {
        let Ok(g) = Pool2dGeom::new(h, w, c, kh, kw, sh, sw, pt, pl, pb, pr) else {
            return Ok(());
        };
        let mut rng = Seeded(seed);
        let x = rng.i8s(h * w * c, -128, 127);
        let mut avg = vec![0i8; g.output_len()];
        let mut max = vec![0i8; g.output_len()];
        avgpool_forward(&g, &x, &mut avg).unwrap();
        maxpool_forward(&g, &x, &mut max).unwrap();
        for oy in 0..g.out_h() {
            for ox in 0..g.out_w() {
                for ch in 0..c {
                    let mut vals = vec![];
                    for ky in 0..kh {
                        for kx in 0..kw {
                            if let (Some(iy), Some(ix)) = (src(oy, ky, sh, pt, h), src(ox, kx, sw, pl, w)) {
                                vals.push(x[(iy * w + ix) * c + ch] as i64);
                            }
                        }
                    }
                    let k = (oy * g.out_w() + ox) * c + ch;
                    let (s, n) = (vals.iter().sum::<i64>(), vals.len() as i64);
                    // Exact rational rounding, half away from zero (pads excluded from n).
                    let r = (2 * s.abs() + n) / (2 * n) * s.signum();
                    prop_assert_eq!(avg[k] as i64, r);
                    prop_assert_eq!(max[k] as i64, *vals.iter().max().unwrap());
                }
            }
        }
    }
}

/// The paths the random shapes above do not reach: groups wider than the int16 staging buffer
/// and depthwise inputs whose zero point is outside int8 range (int32 lanes).
#[test]
fn conv_forward_fallback_paths() {
    let cases = [
        (
            Conv2dGeom::new(2, 3, 600, 5, 1, 1, 1, 1, 0, 0, 0, 0, 1).unwrap(),
            17,
        ),
        (
            Conv2dGeom::new(3, 3, 1100, 4, 1, 1, 1, 1, 1, 0, 0, 1, 2).unwrap(),
            -9,
        ),
        (
            Conv2dGeom::new(5, 5, 32, 32, 3, 3, 1, 1, 1, 1, 1, 1, 32).unwrap(),
            200,
        ),
        (
            Conv2dGeom::new(5, 4, 20, 20, 3, 3, 2, 1, 1, 1, 1, 1, 20).unwrap(),
            -300,
        ),
    ];
    for (g, in_zp) in cases {
        let mut rng = Seeded(g.input_len() as u64);
        let x = rng.i8s(g.input_len(), -128, 127);
        let w = rng.i8s(g.weight_len(), -127, 127);
        let bias: Vec<i32> = (0..g.out_c).map(|_| rng.int(-3000, 3000)).collect();
        let rq: Vec<Requant> = (0..g.out_c)
            .map(|_| Requant::from_scale(1e-4 + 0.003 * rng.unit()).unwrap())
            .collect();
        let mut out = vec![0i8; g.output_len()];
        conv2d_forward(&g, &x, in_zp, &w, &bias, &rq, -3, -128, 127, &mut out).unwrap();
        let acc = ref_conv_acc(&g, &x, in_zp, &w, &[0], &bias);
        for (i, (&o, &a)) in out.iter().zip(&acc).enumerate() {
            assert_eq!(
                o,
                ref_finish(ref_requant(a, rq[i % g.out_c]), -3, -128, 127),
                "{g:?}"
            );
        }
    }
}

/// The add's per-input term tables give `AddParams::apply` for every pair of int8 inputs, in
/// both rounding modes and with and without a ReLU clamp.
#[test]
fn add_terms_equal_apply_on_every_input_pair() {
    let mut rng = Seeded(7);
    for case in 0..8 {
        let q = |rng: &mut Seeded, s: f64| {
            QParams::new((0.001 + s * rng.unit()) as f32, rng.int(-128, 127)).unwrap()
        };
        let (qa, qb, qo) = (q(&mut rng, 0.2), q(&mut rng, 0.2), q(&mut rng, 0.3));
        let (lo, hi) = if case % 2 == 0 {
            (qo.zero_point as i8, 127)
        } else {
            (-128, 127)
        };
        let mode = if case % 4 < 2 {
            Rounding::Single
        } else {
            Rounding::Double
        };
        let p = AddParams::new(qa, qb, qo, lo, hi, mode).unwrap();
        let t = AddTerms::new(&p);
        for a in i8::MIN..=i8::MAX {
            for b in i8::MIN..=i8::MAX {
                assert_eq!(t.apply(&p, a, b), p.apply(a, b), "{p:?} a {a} b {b}");
            }
        }
    }
}
