//! No kernel panics on any shape it is given: arbitrary geometry (zeros, overflowing sizes,
//! huge pads) and arbitrary buffer lengths give `Ok` or `Err`, and `Ok` only when every buffer
//! has exactly the size the geometry implies.
use proptest::prelude::*;
use tt_core::ops::act::clamp_mask_backward;
use tt_core::ops::add::{add_backward, add_forward, AddParams};
use tt_core::ops::conv::*;
use tt_core::ops::fc::*;
use tt_core::ops::loss::{mse, softmax_cross_entropy};
use tt_core::ops::pool::*;
use tt_core::ops::{ChannelSelection, WeightShape};
use tt_core::qas::{sgd_update_bias, sgd_update_weights, SgdConfig, UpdateState, XorShift32};
use tt_core::quant::{requantize, QParams, Requant, Rounding};

/// A requantization record from arbitrary bits, as a corrupted blob would hold: the i32 `s` is
/// the old (shift, rounding) word, and the multiplier's low bit picks the rounding mode.
fn wild_requant(multiplier: i32, s: i32) -> Requant {
    Requant {
        multiplier,
        shift: s as i16,
        rounding: if multiplier & 1 != 0 {
            1
        } else {
            (s >> 16) as i16
        },
    }
}

fn dim() -> impl Strategy<Value = usize> {
    prop_oneof![8 => 0usize..=5, 1 => Just(usize::MAX), 1 => Just(usize::MAX / 3), 1 => Just(1usize << 33)]
}

fn len() -> impl Strategy<Value = usize> {
    prop_oneof![0usize..=300, Just(1usize)]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(600))]

    #[test]
    fn conv_kernels_never_panic(
        d in proptest::collection::vec(dim(), 13),
        l in proptest::collection::vec(len(), 6),
        sel_in in any::<bool>(),
        count in 0usize..=6,
        act in (any::<i8>(), any::<i8>()),
        rq in (any::<i32>(), -40i32..=40),
    ) {
        let g = Conv2dGeom {
            in_h: d[0], in_w: d[1], in_c: d[2], out_c: d[3], kh: d[4], kw: d[5],
            stride_h: d[6], stride_w: d[7], pad_top: d[8], pad_left: d[9], pad_bottom: d[10],
            pad_right: d[11], groups: d[12],
        };
        let x = vec![1i8; l[0]];
        let w = vec![1i8; l[1]];
        let b = vec![1i32; l[2]];
        let r = vec![wild_requant(rq.0, rq.1); l[2]];
        let mut out = vec![0i8; l[3]];
        let res = conv2d_forward(&g, &x, 0, &w, &b, &r, 0, act.0, act.1, &mut out);
        if res.is_ok() {
            prop_assert!(g.validate().is_ok());
            prop_assert_eq!((x.len(), w.len(), out.len()), (g.input_len(), g.weight_len(), g.output_len()));
        }
        let mut acc = vec![0i32; l[3]];
        let _ = conv2d_accumulate(&g, &x, 0, &w, &[0], &b, &mut acc);
        let mut buf = vec![0i8; l[0]];
        let mut scratch = vec![0i8; l[5]];
        let _ = conv2d_depthwise_in_place(&g, &mut buf, 0, &w, &b, &r, 0, act.0, act.1, &mut scratch);
        let mut plane = vec![0i8; l[4]];
        let _ = conv2d_depthwise_in_place_plane(&g, &mut buf, 0, &w, &b, &r, 0, act.0, act.1, &mut plane);
        let go = vec![0.5f32; l[4]];
        let mut gi = vec![0f32; l[0]];
        let _ = conv2d_backward_input(&g, &go, &w, &vec![0.1; l[2]], &mut gi);
        let sel = if sel_in { ChannelSelection::input(count) } else { ChannelSelection::output(count) };
        let mut gw = vec![0f32; l[5]];
        let _ = conv2d_backward_weight(&g, &x, QParams { scale: 0.1, zero_point: 0 }, &go, sel, &mut gw);
        let mut gb = vec![0f32; l[2]];
        let _ = conv2d_backward_bias(&g, &go, &mut gb);
    }

    #[test]
    fn other_kernels_never_panic(
        d in proptest::collection::vec(dim(), 11),
        l in proptest::collection::vec(len(), 6),
        zp in (any::<i32>(), any::<i32>()),
        scale in prop_oneof![Just(0.0f32), Just(f32::NAN), Just(-1.0f32), Just(1e-30f32), Just(0.1f32), Just(1e30f32)],
        label in 0usize..=300,
        count in 0usize..=6,
    ) {
        let fg = FcGeom { in_features: d[0], out_features: d[1] };
        let x = vec![3i8; l[0]];
        let w = vec![-3i8; l[1]];
        let mut o = vec![0i8; l[2]];
        let _ = fc_forward(&fg, &x, zp.0, &w, &vec![0; l[2]], &vec![Requant::default(); l[2]], zp.1, -128, 127, &mut o);
        let mut acc = vec![0i32; l[2]];
        let _ = fc_accumulate(&fg, &x, zp.0, &w, &[zp.1], &[], &mut acc);
        let go = vec![1.0f32; l[3]];
        let mut gi = vec![0f32; l[0]];
        let _ = fc_backward_input(&fg, &go, &w, &vec![0.1; l[2]], &mut gi);
        let mut gw = vec![0f32; l[4]];
        let q = QParams { scale, zero_point: zp.0 };
        let _ = fc_backward_weight(&fg, &x, q, &go, ChannelSelection::output(count), &mut gw);
        let _ = fc_backward_bias(&fg, &go, &mut gw);

        let pg = Pool2dGeom {
            in_h: d[2], in_w: d[3], c: d[4], kh: d[5], kw: d[6], stride_h: d[7], stride_w: d[8],
            pad_top: d[9], pad_left: d[10], pad_bottom: d[9], pad_right: d[10],
        };
        let _ = avgpool_forward(&pg, &x, &mut o);
        let _ = maxpool_forward(&pg, &x, &mut o);
        let _ = avgpool_backward(&pg, &go, &mut gi);
        let _ = maxpool_backward(&pg, &x, &go, &mut gi);
        let _ = global_avgpool_forward(d[2], d[3], d[4], &x, q, QParams { scale: 0.1, zero_point: zp.1 }, Rounding::Double, &mut o);
        let _ = global_avgpool_backward(d[2], d[3], d[4], &go, &mut gi);

        let _ = requantize(&acc, d[4], &[wild_requant(zp.0, zp.1)], zp.0, 5, -5, &mut o);
        if let Ok(p) = AddParams::new(q, q, q, -128, 127, Rounding::Double) {
            let _ = add_forward(&p, &x, &w, &mut o);
        }
        // Corrupted parameters built field by field must not panic either.
        let wild = AddParams {
            a_zp: zp.0, b_zp: zp.1, out_zp: zp.0,
            a_mult: wild_requant(zp.1, zp.0),
            b_mult: wild_requant(zp.0, zp.1),
            out_mult: wild_requant(zp.1, zp.1),
            act_min: -128, act_max: 127,
        };
        let _ = add_forward(&wild, &x, &w, &mut o);
        let mut ga = vec![0f32; l[0]];
        let _ = add_backward(&x, -128, 127, &go, &mut ga, &mut gi);
        let _ = clamp_mask_backward(&x, 0, 10, &mut gi);
        let _ = softmax_cross_entropy(&x, q, label, &mut gi);
        let _ = mse(&x, q, &go, &mut gi);

        let shape = WeightShape { out_c: d[0], taps: d[1], in_per_group: d[2], groups: d[3] };
        let mut w8 = vec![0i8; l[1]];
        let cfg = SgdConfig { lr: scale, momentum: 0.0, qas: true };
        let mut rng = XorShift32::new(1);
        let _ = sgd_update_weights(&mut w8, &shape, &vec![scale; l[2]], ChannelSelection::output(count), &go, &cfg, None, UpdateState::StochasticRounding(&mut rng));
        let mut res = vec![0i8; l[3]];
        let _ = sgd_update_weights(&mut w8, &shape, &vec![0.1; l[2]], ChannelSelection::input(count), &go, &cfg, Some(&mut ga), UpdateState::Residual(&mut res));
        let mut b = vec![0i32; l[2]];
        let _ = sgd_update_bias(&mut b, &vec![0.1; l[2]], scale, &go, &cfg, None);
    }
}

fn extreme_i32() -> impl Strategy<Value = i32> {
    prop_oneof![any::<i32>(), Just(i32::MIN), Just(i32::MAX), -200i32..200]
}

fn extreme_f32() -> impl Strategy<Value = f32> {
    prop_oneof![
        Just(f32::NAN),
        Just(f32::INFINITY),
        Just(0.0f32),
        Just(-1.0f32),
        Just(f32::MAX),
        Just(1e-38f32),
        0.001f32..10.0
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    /// Buffers that match the geometry, so the arithmetic runs, with extreme zero points,
    /// multipliers, shifts, scales and data.
    #[test]
    fn extreme_parameters_never_panic(
        (h, w, c, k, s, p) in (1usize..=5, 1usize..=5, 1usize..=20, 1usize..=3, 1usize..=2, 0usize..=1),
        dw in any::<bool>(),
        zp in (extreme_i32(), extreme_i32()),
        rq in (any::<i32>(), -100i32..=100),
        scale in extreme_f32(),
        g_val in extreme_f32(),
        fill in any::<i8>(),
    ) {
        let (groups, out_c) = if dw { (c, c) } else { (1, 3) };
        let Ok(g) = Conv2dGeom::new(h, w, c, out_c, k, k, s, s, p, p, p, p, groups) else {
            return Ok(());
        };
        let x = vec![fill; g.input_len()];
        let wt = vec![fill.max(-127); g.weight_len()];
        let b = vec![zp.1; out_c];
        let r = vec![wild_requant(rq.0, rq.1); out_c];
        let mut out = vec![0i8; g.output_len()];
        let _ = conv2d_forward(&g, &x, zp.0, &wt, &b, &r, zp.1, -128, 127, &mut out);
        let mut acc = vec![0i32; g.output_len()];
        let _ = conv2d_accumulate(&g, &x, zp.0, &wt, &[zp.1], &b, &mut acc);
        let go = vec![g_val; g.output_len()];
        let mut gi = vec![0f32; g.input_len()];
        let _ = conv2d_backward_input(&g, &go, &wt, &vec![scale; out_c], &mut gi);
        let q = QParams { scale, zero_point: zp.0 };
        let sel = ChannelSelection::output(out_c);
        let mut gw = vec![0f32; g.weight_len()];
        let _ = conv2d_backward_weight(&g, &x, q, &go, sel, &mut gw);
        let mut buf = x.clone();
        let mut scratch = vec![0i8; depthwise_in_place_scratch_len(&g)];
        let _ = conv2d_depthwise_in_place(&g, &mut buf, zp.0, &wt, &b, &r, zp.1, -128, 127, &mut scratch);
        let mut plane = vec![0i8; g.out_h() * g.out_w()];
        let _ = conv2d_depthwise_in_place_plane(&g, &mut buf, zp.0, &wt, &b, &r, zp.1, -128, 127, &mut plane);

        let fg = FcGeom::new(c, out_c).unwrap();
        let mut fo = vec![0i8; out_c];
        let fw = vec![fill.max(-127); c * out_c];
        let _ = fc_forward(&fg, &x[..c], zp.0, &fw, &b, &r, zp.1, -128, 127, &mut fo);
        let mut fgw = vec![0f32; c * out_c];
        let _ = fc_backward_weight(&fg, &x[..c], q, &go[..out_c.min(go.len())], sel, &mut fgw);
        let _ = global_avgpool_forward(h, w, c, &x, q, q, Rounding::Single, &mut vec![0i8; c]);
        let _ = softmax_cross_entropy(&x[..c], q, 0, &mut gi[..c]);
        let _ = mse(&x[..c], q, &go[..c.min(go.len())], &mut gi[..c.min(go.len())]);
        let shape = g.weight_shape();
        let cfg = SgdConfig { lr: scale, momentum: 0.5, qas: zp.0 > 0 };
        let mut w8 = wt.clone();
        let mut rng = XorShift32::new(zp.0 as u32);
        let _ = sgd_update_weights(&mut w8, &shape, &vec![scale; out_c], sel, &gw, &cfg, None, UpdateState::StochasticRounding(&mut rng));
        let mut res = vec![fill; gw.len()];
        let mut mom = vec![g_val; gw.len()];
        let _ = sgd_update_weights(&mut w8, &shape, &vec![scale; out_c], sel, &gw, &cfg, Some(&mut mom), UpdateState::Residual(&mut res));
        let mut master = vec![g_val; gw.len()];
        let _ = sgd_update_weights(&mut w8, &shape, &vec![scale; out_c], sel, &gw, &cfg, None, UpdateState::FpMaster(&mut master));
        let mut bias = b.clone();
        let _ = sgd_update_bias(&mut bias, &vec![scale; out_c], scale, &go[..out_c.min(go.len())], &cfg, None);
    }
}
