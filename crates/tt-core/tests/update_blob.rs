//! The update blob (tt_core::update) on real compiled plans: it carries exactly the trained
//! values, reads back equal, applies into a fresh executor to the same predictions, refuses a
//! blob of another plan, and every truncation or damaged byte is a typed error that leaves the
//! learned state untouched.
mod common;

use common::{graph, words, Lcg};
use proptest::prelude::*;
use tt_core::compile::{compile, PlanSettings};
use tt_core::crc::crc32;
use tt_core::exec::{Executor, Target};
use tt_core::ir::{CompileOptions, LossKind, Precision};
use tt_core::plan::PlanView;
use tt_core::quant::Rounding;
use tt_core::sparse::{ChannelAxis, LayerUpdate, Scheme};
use tt_core::update::{self, DType, ParamKind, CRC_LEN, HEADER_LEN, SECTION_LEN};
use tt_core::Error;

fn upd(bias: bool, weight_ratio: f32, axis: ChannelAxis) -> LayerUpdate {
    LayerUpdate {
        bias,
        weight_ratio,
        axis,
    }
}

/// Every kind of trained parameter: half the output channels of a conv, a depthwise bias only,
/// a quarter of a pointwise conv's input channels, a whole fc.
fn scheme() -> Scheme {
    let mut layers = vec![LayerUpdate::default(); 7];
    layers[0] = upd(true, 0.5, ChannelAxis::Output);
    layers[1] = upd(true, 0.0, ChannelAxis::Output);
    layers[2] = upd(true, 0.25, ChannelAxis::Input);
    layers[6] = upd(true, 1.0, ChannelAxis::Output);
    Scheme { layers }
}

struct Compiled {
    plan: Vec<u8>,
    params: Vec<u32>,
    params_len: usize,
}

fn compiled(precision: Precision, accumulate: bool, lr: f32) -> Compiled {
    let settings = PlanSettings {
        options: CompileOptions {
            reorder: !accumulate,
            precision,
            momentum: false,
            loss: LossKind::CrossEntropy,
            accumulate,
        },
        seed: 3,
        lr,
        momentum: 0.0,
    };
    let c = compile(&graph(Rounding::default()), &scheme(), &settings, b"{}").unwrap();
    Compiled {
        plan: c.plan,
        params: words(&c.params),
        params_len: c.params.len(),
    }
}

fn bytes(w: &[u32], len: usize) -> &[u8] {
    // SAFETY: u32 storage viewed as bytes (alignment 1, every pattern valid), within its length.
    unsafe { core::slice::from_raw_parts(w.as_ptr() as *const u8, len.min(4 * w.len())) }
}

fn bytes_mut(w: &mut [u32]) -> &mut [u8] {
    // SAFETY: as `bytes`, exclusively borrowed.
    unsafe { core::slice::from_raw_parts_mut(w.as_mut_ptr() as *mut u8, 4 * w.len()) }
}

fn arena(c: &Compiled) -> Vec<u32> {
    vec![0u32; PlanView::parse(&c.plan).unwrap().arena_bytes.div_ceil(4)]
}

fn ex<'a>(c: &'a Compiled, arena: &'a mut [u32]) -> Executor<'a, 'a> {
    let mut e = Executor::new(&c.plan, bytes(&c.params, c.params_len), bytes_mut(arena)).unwrap();
    e.init().unwrap();
    e
}

fn sample(seed: u64) -> Vec<i8> {
    let mut r = Lcg(seed);
    (0..3 * 64).map(|_| r.i8(120)).collect()
}

fn train(e: &mut Executor<'_, '_>, steps: u64) {
    for s in 0..steps {
        let target = Target::Class((s % 4) as usize);
        if e.plan().globals.accumulate {
            e.accumulate(&sample(s), target).unwrap();
            e.apply_accumulated(1).unwrap();
        } else {
            e.step(&sample(s), target).unwrap();
        }
    }
}

fn blob_of(e: &Executor<'_, '_>, samples: u32) -> Vec<u8> {
    let mut out = vec![0u8; update::blob_len(e.plan()).unwrap()];
    let n = e.write_update(samples, &mut out).unwrap();
    assert_eq!(n, out.len());
    out
}

/// The blob's values per section as i64, in plan order.
fn values(pv: &PlanView<'_>, blob: &[u8]) -> Vec<(u16, ParamKind, Vec<i64>)> {
    let v = update::read(pv, blob).unwrap();
    let mut out = Vec::new();
    v.for_each(pv, |s, raw| {
        let vals = match s.dtype {
            DType::I8 => raw.iter().map(|&b| b as i8 as i64).collect(),
            DType::I32 => raw
                .chunks_exact(4)
                .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]) as i64)
                .collect(),
        };
        out.push((s.layer, s.kind, vals));
        Ok(())
    })
    .unwrap();
    out
}

/// The trained values of each section as the executor's full weights show them (`read_layer`):
/// OHWI weights cut to the trained slice, and the bias.
fn expected(e: &mut Executor<'_, '_>) -> Vec<(u16, ParamKind, Vec<i64>)> {
    let pv = *e.plan();
    let mut out = Vec::new();
    for s in update::sections(&pv) {
        let s = s.unwrap();
        let l = pv.layer(s.layer as usize).unwrap();
        let n = pv.node(l.node as usize).unwrap();
        let oc = pv.tensor(n.output as usize).unwrap().c as usize;
        let inp = pv.tensor(n.inputs[0] as usize).unwrap();
        let cols = s.shape[3];
        let (kh, kw, icg) = if s.fc {
            (1, 1, inp.numel())
        } else {
            (
                n.win[0] as usize,
                n.win[1] as usize,
                (inp.c / n.groups) as usize,
            )
        };
        let mut w = vec![0i8; oc * kh * kw * icg];
        let mut b = vec![0i32; oc];
        e.read_layer(s.layer as usize, &mut w, &mut b).unwrap();
        let vals: Vec<i64> = match s.kind {
            ParamKind::Bias => b.iter().map(|&v| v as i64).collect(),
            ParamKind::Weight => {
                let mut v = Vec::new();
                for o in 0..s.shape[0] {
                    for tap in 0..kh * kw {
                        for i in 0..cols {
                            v.push(w[(o * kh * kw + tap) * icg + i] as i64);
                        }
                    }
                }
                v
            }
        };
        out.push((s.layer, s.kind, vals));
    }
    out
}

/// Makes the trailing CRC match again, so a change reaches the field checks behind it.
fn recrc(b: &mut [u8]) {
    let end = b.len() - CRC_LEN;
    let crc = crc32(&b[..end]);
    b[end..].copy_from_slice(&crc.to_le_bytes());
}

const PRECISIONS: [(Precision, bool); 4] = [
    (Precision::StochasticRounding, false),
    (Precision::Residual, false),
    (Precision::FpMaster, false),
    (Precision::StochasticRounding, true),
];

#[test]
fn blob_carries_exactly_the_trained_values() {
    for (precision, accumulate) in PRECISIONS {
        let c = compiled(precision, accumulate, 0.05);
        let mut a = arena(&c);
        let mut e = ex(&c, &mut a);
        train(&mut e, 12);
        let blob = blob_of(&e, 12);
        let pv = *e.plan();
        let secs: Vec<_> = update::sections(&pv).map(Result::unwrap).collect();
        // conv0 weights + bias, dw1 bias, pw2 weights + bias, fc weights + bias.
        let kinds: Vec<(u16, ParamKind)> = secs.iter().map(|s| (s.layer, s.kind)).collect();
        use ParamKind::{Bias, Weight};
        assert_eq!(
            kinds,
            [
                (0, Weight),
                (0, Bias),
                (1, Bias),
                (2, Weight),
                (2, Bias),
                (3, Weight),
                (3, Bias)
            ]
        );
        assert_eq!(secs[0].shape, [4, 3, 3, 3]);
        assert_eq!(secs[3].shape, [8, 1, 1, 2]);
        assert_eq!(secs[5].shape, [4, 1, 1, 8]);
        assert!(secs[5].fc && !secs[3].fc);
        let payload: usize = secs.iter().map(|s| s.bytes()).sum();
        assert_eq!(
            blob.len(),
            HEADER_LEN + secs.len() * SECTION_LEN + payload + CRC_LEN
        );
        let v = update::read(&pv, &blob).unwrap();
        assert_eq!(
            (v.sample_count, v.plan_tag, v.n_sections),
            (12, pv.tag, secs.len())
        );
        assert_eq!(pv.tag, crc32(&c.plan[..40]));
        let got = values(&pv, &blob);
        assert_eq!(got, expected(&mut e), "{precision:?}");
        // Training moved something the blob carries (not only the frozen values).
        let mut fa = arena(&c);
        let mut fresh = ex(&c, &mut fa);
        assert_ne!(got, expected(&mut fresh));
    }
}

#[test]
fn applied_blob_gives_the_same_predictions_and_the_same_blob() {
    for (precision, accumulate) in PRECISIONS {
        let c = compiled(precision, accumulate, 0.05);
        let mut a = arena(&c);
        let mut e = ex(&c, &mut a);
        train(&mut e, 20);
        let blob = blob_of(&e, 20);
        let mut fa = arena(&c);
        let mut f = ex(&c, &mut fa);
        assert_eq!(f.apply_update(&blob).unwrap(), 20);
        assert_eq!(blob_of(&f, 20), blob);
        for s in 100..110 {
            let x = sample(s);
            let want = e.forward(&x).unwrap().to_vec();
            assert_eq!(f.forward(&x).unwrap(), &want[..], "{precision:?}");
        }
    }
}

#[test]
fn applying_its_own_blob_keeps_the_extra_precision() {
    for precision in [Precision::Residual, Precision::FpMaster] {
        let c = compiled(precision, false, 0.02);
        let mut a = arena(&c);
        let mut e = ex(&c, &mut a);
        train(&mut e, 15);
        let before = e.state().to_vec();
        let blob = blob_of(&e, 15);
        e.apply_update(&blob).unwrap();
        assert_eq!(e.state(), &before[..], "{precision:?}");
    }
}

#[test]
fn a_changed_weight_resets_its_extra_precision() {
    let c = compiled(Precision::FpMaster, false, 0.02);
    let mut a = arena(&c);
    let mut e = ex(&c, &mut a);
    train(&mut e, 15);
    let pv = *e.plan();
    let mut blob = blob_of(&e, 15);
    // First weight of the first section (conv0), moved by 3, CRC made valid again.
    let at = HEADER_LEN + SECTION_LEN;
    let old = blob[at] as i8;
    let new = old.wrapping_add(3);
    blob[at] = new as u8;
    recrc(&mut blob);
    let l = pv.layer(0).unwrap();
    let (w_at, p_at) = (
        pv.buffer(l.st_weight as usize).unwrap().offset as usize,
        pv.buffer(l.st_precision as usize).unwrap().offset as usize,
    );
    let master = |s: &[u8], j: usize| {
        f32::from_ne_bytes([
            s[p_at + 4 * j],
            s[p_at + 4 * j + 1],
            s[p_at + 4 * j + 2],
            s[p_at + 4 * j + 3],
        ])
    };
    let kept = master(e.state(), 1);
    e.apply_update(&blob).unwrap();
    let s = e.state();
    assert_eq!(s[w_at] as i8, new);
    assert_eq!(master(s, 0), new as f32);
    assert_eq!(master(s, 1), kept);
}

#[test]
fn a_blob_of_another_plan_is_refused() {
    let c = compiled(Precision::StochasticRounding, false, 0.05);
    let other = compiled(Precision::StochasticRounding, false, 0.07);
    let mut a = arena(&c);
    let e = ex(&c, &mut a);
    let blob = blob_of(&e, 1);
    let mut oa = arena(&other);
    let mut o = ex(&other, &mut oa);
    let before = o.state().to_vec();
    let (want, found) = (o.plan().tag, e.plan().tag);
    let err = o.apply_update(&blob).unwrap_err();
    assert_eq!(
        err,
        Error::UpdatePlanMismatch {
            expected: want,
            found
        }
    );
    assert!(err.to_string().contains("another plan"), "{err}");
    assert_eq!(o.state(), &before[..]);
}

#[test]
fn every_truncation_and_every_damaged_byte_is_an_error_and_changes_nothing() {
    let c = compiled(Precision::FpMaster, false, 0.05);
    let mut a = arena(&c);
    let mut e = ex(&c, &mut a);
    train(&mut e, 5);
    let blob = blob_of(&e, 5);
    let mut fa = arena(&c);
    let mut f = ex(&c, &mut fa);
    let before = f.state().to_vec();
    for n in 0..blob.len() {
        let err = f.apply_update(&blob[..n]).unwrap_err();
        assert!(matches!(err, Error::CorruptUpdate { .. }), "len {n}: {err}");
    }
    let mut longer = blob.clone();
    longer.push(0);
    assert_eq!(
        f.apply_update(&longer),
        Err(Error::CorruptUpdate {
            field: "total_len (truncated or trailing bytes)"
        })
    );
    let mut bad = blob.clone();
    for i in 0..bad.len() {
        for bit in 0..8 {
            bad[i] ^= 1 << bit;
            let err = f.apply_update(&bad).unwrap_err();
            assert!(
                matches!(
                    err,
                    Error::CorruptUpdate { .. } | Error::UpdatePlanMismatch { .. }
                ),
                "byte {i} bit {bit}: {err}"
            );
            bad[i] ^= 1 << bit;
        }
    }
    assert_eq!(f.state(), &before[..]);
    assert_eq!(f.apply_update(&blob), Ok(5));
}

/// Header and section fields changed with the CRC made valid again: each is named.
#[test]
fn damaged_fields_behind_a_valid_crc_are_named() {
    let c = compiled(Precision::StochasticRounding, false, 0.05);
    let mut a = arena(&c);
    let e = ex(&c, &mut a);
    let pv = *e.plan();
    let blob = blob_of(&e, 9);
    let with = |at: usize, v: &[u8]| {
        let mut b = blob.clone();
        b[at..at + v.len()].copy_from_slice(v);
        recrc(&mut b);
        b
    };
    let field = |b: &[u8]| match update::read(&pv, b) {
        Err(Error::CorruptUpdate { field }) => field,
        other => panic!("{other:?}"),
    };
    assert_eq!(field(&with(0, b"TTPL")), "magic");
    assert_eq!(field(&with(4, &2u16.to_le_bytes())), "version");
    assert_eq!(field(&with(6, &28u16.to_le_bytes())), "header_len");
    assert_eq!(
        field(&with(20, &6u32.to_le_bytes())),
        "n_sections (fewer than the plan trains)"
    );
    assert_eq!(
        field(&with(20, &8u32.to_le_bytes())),
        "n_sections (more than the plan trains)"
    );
    let s = HEADER_LEN;
    assert_eq!(field(&with(s, &1u16.to_le_bytes())), "section.layer");
    assert_eq!(field(&with(s + 2, &[1])), "section.kind");
    assert_eq!(field(&with(s + 3, &[1])), "section.dtype");
    assert_eq!(field(&with(s + 4, &35u32.to_le_bytes())), "section.count");
    assert_eq!(
        update::read(&pv, &with(12, &0u32.to_le_bytes())).unwrap_err(),
        Error::UpdatePlanMismatch {
            expected: pv.tag,
            found: 0
        }
    );
    // A value byte is just a value: a valid blob with other numbers.
    let v = with(s + SECTION_LEN, &[0x7f]);
    assert_eq!(values(&pv, &v)[0].2[0], 127);
}

#[test]
fn short_output_and_wrong_state_are_errors() {
    let c = compiled(Precision::StochasticRounding, false, 0.05);
    let mut a = arena(&c);
    let e = ex(&c, &mut a);
    let pv = *e.plan();
    let len = update::blob_len(&pv).unwrap();
    let mut out = vec![0u8; len - 1];
    assert_eq!(
        e.write_update(1, &mut out),
        Err(Error::OutOfMemory {
            what: "update blob buffer",
            needed: len,
            available: len - 1
        })
    );
    let state = e.state().to_vec();
    let mut out = vec![0u8; len];
    assert!(matches!(
        update::write(&pv, &state[1..], 1, &mut out),
        Err(Error::ShapeMismatch { .. })
    ));
    let blob = blob_of(&e, 1);
    let mut short = state.clone();
    short.pop();
    assert!(matches!(
        update::apply(&pv, &blob, &mut short),
        Err(Error::ShapeMismatch { .. })
    ));
}

#[test]
fn streamed_blob_equals_the_written_one_and_a_sink_error_stops_it() {
    let c = compiled(Precision::Residual, false, 0.05);
    let mut a = arena(&c);
    let mut e = ex(&c, &mut a);
    train(&mut e, 4);
    let pv = *e.plan();
    let blob = blob_of(&e, 4);
    let mut pieces = Vec::new();
    let n = update::write_to(&pv, e.state(), 4, |b| {
        pieces.push(b.to_vec());
        Ok(())
    })
    .unwrap();
    assert_eq!(n, blob.len());
    assert!(pieces.len() > 10);
    assert_eq!(pieces.concat(), blob);
    let stop = Error::InvalidParameter { what: "radio down" };
    let mut sent = 0;
    let r = update::write_to(&pv, e.state(), 4, |b| {
        sent += b.len();
        if sent > 40 {
            Err(stop)
        } else {
            Ok(())
        }
    });
    assert_eq!(r, Err(stop));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Any values in the sections survive write -> read -> apply -> write unchanged.
    #[test]
    fn any_values_round_trip(
        seed in any::<u64>(),
        samples in any::<u32>(),
        which in 0usize..4,
    ) {
        let (precision, accumulate) = PRECISIONS[which];
        let c = compiled(precision, accumulate, 0.05);
        let mut a = arena(&c);
        let mut e = ex(&c, &mut a);
        let pv = *e.plan();
        let mut r = Lcg(seed);
        let mut state = e.state().to_vec();
        let mut want = Vec::new();
        for s in update::sections(&pv) {
            let s = s.unwrap();
            let l = pv.layer(s.layer as usize).unwrap();
            let buf = match s.kind {
                ParamKind::Weight => l.st_weight,
                ParamKind::Bias => l.st_bias,
            };
            let at = pv.buffer(buf as usize).unwrap().offset as usize;
            let mut vals = Vec::new();
            for j in 0..s.count {
                match s.dtype {
                    DType::I8 => {
                        let v = r.next() as u8;
                        state[at + j] = v;
                        vals.push(v as i8 as i64);
                    }
                    DType::I32 => {
                        // Trained biases stay within +-2^30 (ops::BIAS_LIMIT).
                        let v = (r.next() as i32) >> 1;
                        state[at + 4 * j..at + 4 * j + 4].copy_from_slice(&v.to_ne_bytes());
                        vals.push(v as i64);
                    }
                }
            }
            want.push((s.layer, s.kind, vals));
        }
        let mut blob = vec![0u8; update::blob_len(&pv).unwrap()];
        update::write(&pv, &state, samples, &mut blob).unwrap();
        prop_assert_eq!(update::read(&pv, &blob).unwrap().sample_count, samples);
        prop_assert_eq!(values(&pv, &blob), want);
        prop_assert_eq!(e.apply_update(&blob).unwrap(), samples);
        prop_assert_eq!(blob_of(&e, samples), blob);
    }

    /// Arbitrary damage behind a valid CRC: an error or a valid blob, never a panic, and a
    /// failed apply writes nothing.
    #[test]
    fn damage_behind_a_valid_crc_never_panics(
        edits in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..6),
        cut in any::<usize>(),
    ) {
        let c = compiled(Precision::Residual, false, 0.05);
        let mut a = arena(&c);
        let mut e = ex(&c, &mut a);
        train(&mut e, 3);
        let mut b = blob_of(&e, 3);
        for (i, v) in edits {
            let n = b.len();
            b[i % n] = v;
        }
        b.truncate(HEADER_LEN + CRC_LEN + cut % b.len());
        recrc(&mut b);
        let before = e.state().to_vec();
        if e.apply_update(&b).is_err() {
            prop_assert_eq!(e.state(), &before[..]);
        }
    }
}

/// Every trained value of the executor, in blob order (weights as i8, biases as i32, as i64).
fn trained(e: &Executor<'_, '_>) -> Vec<i64> {
    values(e.plan(), &blob_of(e, 1))
        .into_iter()
        .flat_map(|(_, _, v)| v)
        .collect()
}

/// Which trained values are int32 biases (blob order).
fn is_bias(pv: &PlanView<'_>) -> Vec<bool> {
    update::sections(pv)
        .flat_map(|s| {
            let s = s.unwrap();
            core::iter::repeat_n(s.dtype == DType::I32, s.count)
        })
        .collect()
}

#[test]
fn shift_moves_whole_offsets_exactly_in_every_precision() {
    for (precision, accumulate) in PRECISIONS {
        let c = compiled(precision, accumulate, 0.05);
        let mut a = arena(&c);
        let mut e = ex(&c, &mut a);
        train(&mut e, 6);
        let pv = *e.plan();
        let n = update::trained_values(&pv).unwrap();
        let bias = is_bias(&pv);
        assert_eq!(bias.len(), n);
        let before = trained(&e);
        // whole LSBs (a weight's stochastic rounding of an integer step has nothing to round),
        // a fractional bias offset rounds to nearest
        let offsets: Vec<f32> = (0..n)
            .map(|k| if bias[k] { 1000.4 } else { [3.0, -2.0][k % 2] })
            .collect();
        e.shift_trained(&offsets, 1.0).unwrap();
        let after = trained(&e);
        for k in 0..n {
            let want = if bias[k] {
                before[k] + 1000
            } else {
                (before[k] + offsets[k] as i64).clamp(-127, 127)
            };
            assert_eq!(after[k], want, "{precision:?} value {k}");
        }
        // factor scales the offsets: -1 undoes the whole-LSB move where nothing saturated
        e.shift_trained(&offsets, -1.0).unwrap();
        let back = trained(&e);
        for k in 0..n {
            if bias[k] || (before[k] + offsets[k] as i64).abs() <= 127 {
                assert_eq!(back[k], before[k], "{precision:?} value {k}");
            }
        }
    }
}

#[test]
fn fractional_shifts_add_up_in_every_precision() {
    for (precision, accumulate) in PRECISIONS {
        let c = compiled(precision, accumulate, 0.05);
        let mut a = arena(&c);
        let mut e = ex(&c, &mut a);
        let pv = *e.plan();
        let n = update::trained_values(&pv).unwrap();
        let bias = is_bias(&pv);
        let before = trained(&e);
        let offsets = vec![0.3f32; n];
        for _ in 0..10 {
            e.shift_trained(&offsets, 1.0).unwrap();
        }
        let after = trained(&e);
        let moved: Vec<i64> = (0..n)
            .filter(|&k| !bias[k] && before[k].abs() < 120)
            .map(|k| after[k] - before[k])
            .collect();
        assert!(moved.len() > 50, "{precision:?}: {} weights", moved.len());
        let mean = moved.iter().sum::<i64>() as f64 / moved.len() as f64;
        match precision {
            // ten 0.3 steps kept in the residual / master copy: exactly 3 LSB
            Precision::Residual | Precision::FpMaster => {
                assert!(moved.iter().all(|&m| m == 3), "{precision:?}")
            }
            // stochastic rounding: 3 LSB in expectation (each weight a sum of ten Bernoulli(0.3))
            Precision::StochasticRounding => {
                let sd = (10.0 * 0.3 * 0.7 / moved.len() as f64).sqrt();
                assert!((mean - 3.0).abs() < 5.0 * sd, "mean move {mean}, sd {sd}");
                assert!(moved.iter().any(|&m| m != 3), "no rounding noise at all");
            }
        }
        for k in (0..n).filter(|&k| bias[k]) {
            assert_eq!(
                after[k] - before[k],
                0,
                "0.3 of a bias LSB rounds to nothing each time"
            );
        }
    }
}

#[test]
fn a_bad_shift_is_an_error_and_changes_nothing() {
    let c = compiled(Precision::StochasticRounding, false, 0.05);
    let mut a = arena(&c);
    let mut e = ex(&c, &mut a);
    train(&mut e, 3);
    let n = update::trained_values(e.plan()).unwrap();
    let state = e.state().to_vec();
    for (offsets, factor) in [
        (vec![0.5f32; n - 1], 1.0f32),
        (vec![0.5f32; n + 1], 1.0),
        ([vec![0.5f32; n - 1], vec![f32::NAN]].concat(), 1.0),
        (vec![f32::INFINITY; n], 1.0),
        (vec![0.5f32; n], f32::NAN),
    ] {
        let r = e.shift_trained(&offsets, factor);
        assert!(
            matches!(
                r,
                Err(Error::ShapeMismatch { .. }) | Err(Error::NonFinite { .. })
            ),
            "{r:?}"
        );
        assert_eq!(e.state(), &state[..]);
    }
    // huge finite offsets saturate instead of wrapping
    e.shift_trained(&vec![1e30f32; n], 1.0).unwrap();
    let pv = *e.plan();
    let bias = is_bias(&pv);
    for (k, v) in trained(&e).into_iter().enumerate() {
        assert_eq!(v, if bias[k] { 1 << 30 } else { 127 }, "value {k}");
    }
}
