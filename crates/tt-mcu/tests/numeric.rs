//! Numeric faults on the device trainer (the demo plan): a step refused as non-finite is counted
//! and leaves the learned state bit-identical, so training continues exactly as if it never came;
//! int32 accumulator overflow is made impossible (sums bounded when a plan is read, biases kept
//! within +-2^30), and each bound is forced here.
use tt_core::crc::crc32;
use tt_core::ir::NONE;
use tt_core::ops::{BIAS_LIMIT, MAX_DOT_LEN};
use tt_core::plan::{PlanView, HEADER_LEN};
use tt_core::Error;
use tt_mcu::bundle::Bundle;
use tt_mcu::trainer::Trainer;

#[path = "common/words.rs"]
mod words;
use words::{as_bytes, as_bytes_mut, words};

/// Every layer's current bias (trained ones from SRAM).
fn biases(t: &mut Trainer) -> Vec<i32> {
    let pv = *t.plan();
    let mut all = Vec::new();
    for li in 0..pv.n_layers {
        let l = pv.layer(li).unwrap();
        let n = pv.node(l.node as usize).unwrap();
        let (inp, out) = (
            pv.tensor(n.inputs[0] as usize).unwrap(),
            pv.tensor(n.output as usize).unwrap(),
        );
        let per_out = if n.kind == tt_core::plan::NODE_CONV {
            n.win[0] as usize * n.win[1] as usize * (inp.c / n.groups) as usize
        } else {
            inp.numel()
        };
        let mut w = vec![0i8; out.c as usize * per_out];
        let mut b = vec![0i32; out.c as usize];
        t.executor().read_layer(li, &mut w, &mut b).unwrap();
        all.extend(b);
    }
    all
}

#[test]
fn non_finite_steps_are_counted_and_change_nothing() {
    let b = Bundle::demo();
    let pw = words(&b.params);
    let params = &as_bytes(&pw)[..b.params.len()];
    let need = Trainer::arena_bytes(&b.plan).unwrap();
    let n = b.input_len().unwrap();
    let samples: Vec<(&[i8], u32)> = b
        .train_x
        .chunks_exact(n)
        .zip(&b.train_y)
        .map(|(x, &y)| (x, y as u32))
        .collect();

    // Reference: every sample once, nothing refused.
    let mut ra = vec![0u32; need / 4];
    let mut r = Trainer::new(&b.plan, params, as_bytes_mut(&mut ra)).unwrap();
    let want: Vec<u32> = samples
        .iter()
        .map(|&(x, y)| r.step(x, y).unwrap().to_bits())
        .collect();
    assert_eq!(r.skipped_steps(), 0);

    // The same samples with refused steps in between: a NaN and an infinite learning rate
    // (on the device the learning rate is the only float a caller feeds a step; inputs and
    // labels are integers).
    let mut ta = vec![0u32; need / 4];
    let mut t = Trainer::new(&b.plan, params, as_bytes_mut(&mut ta)).unwrap();
    let lr = t.executor().lr;
    let mut got = Vec::new();
    for (i, &(x, y)) in samples.iter().enumerate() {
        if i % 3 == 1 {
            for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
                let before = t.state().to_vec();
                let skipped = t.skipped_steps();
                t.executor().lr = bad;
                let e = t.step(x, y).unwrap_err();
                assert!(matches!(e, Error::NonFinite { .. }), "{e}");
                assert_eq!(t.skipped_steps(), skipped + 1);
                assert_eq!(t.state(), &before[..], "a refused step moved the state");
            }
            t.executor().lr = lr;
        }
        got.push(t.step(x, y).unwrap().to_bits());
    }
    let refused = 3 * samples.iter().skip(1).step_by(3).count() as u32;
    assert_eq!(t.skipped_steps(), refused);
    // Training continued exactly as if the refused steps never came.
    assert_eq!(got, want);
    assert_eq!(t.state(), r.state());
    // Other errors are not counted as skipped steps.
    assert!(t.step(&samples[0].0[..n - 1], 0).is_err());
    assert_eq!(t.skipped_steps(), refused);
}

#[test]
fn a_huge_learning_rate_saturates_biases_within_the_exact_accumulator_range() {
    let b = Bundle::demo();
    let pw = words(&b.params);
    let params = &as_bytes(&pw)[..b.params.len()];
    let need = Trainer::arena_bytes(&b.plan).unwrap();
    let n = b.input_len().unwrap();
    let mut ta = vec![0u32; need / 4];
    let mut t = Trainer::new(&b.plan, params, as_bytes_mut(&mut ta)).unwrap();
    // Finite but absurd: every step is taken, the biases run to the bound and stay there.
    t.executor().lr = 1e30;
    for (x, &y) in b.train_x.chunks_exact(n).zip(&b.train_y).cycle().take(50) {
        assert!(t.step(x, y as u32).unwrap().is_finite());
    }
    assert_eq!(t.skipped_steps(), 0);
    let bs = biases(&mut t);
    assert!(bs.iter().all(|v| v.unsigned_abs() <= BIAS_LIMIT));
    assert!(
        bs.iter().any(|v| v.unsigned_abs() == BIAS_LIMIT),
        "lr 1e30 should drive some bias to the bound: {bs:?}"
    );
    // With the largest positive bias a class can have and the smallest for the others, the
    // forward sums exactly (a wrapped accumulator would turn +2^30 + sum negative): the
    // classifier picks that class for every sample.
    let pv = *t.plan();
    let fc = (0..pv.n_layers)
        .map(|li| pv.layer(li).unwrap())
        .find(|l| {
            l.st_bias != NONE && pv.node(l.node as usize).unwrap().output == pv.globals.output
        })
        .expect("the demo trains its classifier's bias");
    let buf = pv.buffer(fc.st_bias as usize).unwrap();
    for class in 0..buf.bytes as usize / 4 {
        for c in 0..buf.bytes as usize / 4 {
            let v: i32 = if c == class {
                BIAS_LIMIT as i32
            } else {
                -(BIAS_LIMIT as i32)
            };
            let at = buf.offset as usize + 4 * c;
            t.executor().state_mut()[at..at + 4].copy_from_slice(&v.to_le_bytes());
        }
        for x in b.test_x.chunks_exact(n) {
            assert_eq!(t.predict(x).unwrap(), class);
        }
    }
}

#[test]
fn sums_an_int32_accumulator_cannot_hold_exactly_are_refused() {
    let b = Bundle::demo();
    let pv = PlanView::parse(&b.plan).unwrap();
    let need = pv.arena_bytes;

    // A plan whose first conv sums more than MAX_DOT_LEN products per output: the input tensor
    // claims more channels (record `c` at the start of the input's 16-byte tensor record).
    let mut plan = b.plan.clone();
    let at = HEADER_LEN + 24 + 36 + 16 * pv.globals.input as usize;
    let win = pv.node(0).unwrap().win;
    let c = (MAX_DOT_LEN / (win[0] as usize * win[1] as usize) + 1) as u32;
    plan[at..at + 4].copy_from_slice(&c.to_le_bytes());
    let crc = crc32(&plan[HEADER_LEN..]);
    plan[12..16].copy_from_slice(&crc.to_le_bytes());
    let e = PlanView::parse(&plan).unwrap_err();
    assert_eq!(
        e,
        Error::CorruptPlan {
            field: "nodes (more terms than an int32 accumulator holds exactly)"
        }
    );

    // A parameter blob (CRC made to match) with a frozen bias one past the bound.
    let l = pv.layer(0).unwrap();
    let mut blob = b.params.clone();
    let o = l.bias_off as usize;
    blob[o..o + 4].copy_from_slice(&(BIAS_LIMIT as i32 + 1).to_le_bytes());
    let mut plan = b.plan.clone();
    plan[20..24].copy_from_slice(&crc32(&blob).to_le_bytes());
    let bw = words(&blob);
    let mut arena = vec![0u32; need / 4];
    let e = Trainer::new(
        &plan,
        &as_bytes(&bw)[..blob.len()],
        as_bytes_mut(&mut arena),
    )
    .err()
    .unwrap();
    assert!(matches!(e, Error::NotRepresentable { .. }), "{e}");
    assert!(e.to_string().contains("int32 accumulator"), "{e}");
    // At the bound it is accepted.
    blob[o..o + 4].copy_from_slice(&(-(BIAS_LIMIT as i32)).to_le_bytes());
    plan[20..24].copy_from_slice(&crc32(&blob).to_le_bytes());
    let bw = words(&blob);
    assert!(Trainer::new(
        &plan,
        &as_bytes(&bw)[..blob.len()],
        as_bytes_mut(&mut arena)
    )
    .is_ok());
}

#[test]
fn an_update_blob_with_a_bias_beyond_the_bound_is_refused() {
    let b = Bundle::demo();
    let pw = words(&b.params);
    let params = &as_bytes(&pw)[..b.params.len()];
    let need = Trainer::arena_bytes(&b.plan).unwrap();
    let mut ta = vec![0u32; need / 4];
    let mut t = Trainer::new(&b.plan, params, as_bytes_mut(&mut ta)).unwrap();
    let mut blob = vec![0u8; t.update_len().unwrap()];
    t.write_update(7, &mut blob).unwrap();
    // The first bias value's offset in the blob.
    let pv = *t.plan();
    let view = tt_core::update::read(&pv, &blob).unwrap();
    let mut at = None;
    view.for_each(&pv, |s, values| {
        if at.is_none() && matches!(s.dtype, tt_core::update::DType::I32) {
            at = Some(values.as_ptr() as usize - blob.as_ptr() as usize);
        }
        Ok(())
    })
    .unwrap();
    let at = at.expect("the demo trains a bias");
    for (v, ok) in [(BIAS_LIMIT as i32, true), (-(BIAS_LIMIT as i32) - 1, false)] {
        let before = t.state().to_vec();
        let mut bad = blob.clone();
        bad[at..at + 4].copy_from_slice(&v.to_le_bytes());
        let end = bad.len() - 4;
        let crc = crc32(&bad[..end]);
        bad[end..].copy_from_slice(&crc.to_le_bytes());
        match t.apply_update(&bad) {
            Ok(n) => assert!(ok && n == 7),
            Err(e) => {
                assert!(!ok, "{e}");
                assert!(e.to_string().contains("a bias beyond"), "{e}");
                assert_eq!(t.state(), &before[..], "a refused blob changed the state");
            }
        }
    }
}
