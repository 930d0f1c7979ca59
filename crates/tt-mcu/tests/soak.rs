//! Soak: the demo plan trained through tt-mcu's Trainer (the executor the MCU runs) with a
//! checkpoint every `EVERY` steps on a simulated NOR flash, and power cut at random points, both
//! between training steps and at random erase/program operations of checkpoint writes. After
//! every cut the device boots, recovers the newest complete checkpoint
//! and replays the samples since it. Every step's loss, every recovered checkpoint and the final
//! state must equal an uninterrupted run bit for bit, and the arena high-water mark must stay
//! within the plan's arena.
//!
//! CI runs `soak_short` (2,000 steps, 10 cuts); `cargo test -p tt-mcu --release --test soak --
//! --ignored` runs the full 20,000 steps with 50 cuts and prints its figures.
use tt_mcu::bundle::Bundle;
use tt_mcu::checkpoint::{CheckpointError, Checkpoints};
use tt_mcu::trainer::Trainer;

#[path = "common/flash.rs"]
mod flash;
use flash::{xorshift, SimError, SimFlash, Torn};

#[path = "common/words.rs"]
mod words;
use words::{as_bytes, as_bytes_mut, words};

const EVERY: usize = 500;
const WRITE: usize = 4;
const SECTOR: usize = 1024;

/// The demo's flash geometry: 4-byte words (also the read unit), 1 KB sectors.
type Flash = SimFlash<WRITE, WRITE, SECTOR>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cut {
    /// Power goes while training step `n` runs (its result never reaches flash).
    Step(usize),
    /// Power goes at operation `op` of the checkpoint written after step `after`, leaving it
    /// `torn`.
    Save { after: usize, op: usize, torn: Torn },
}

struct Outcome {
    /// The loss of every step, by step index (replayed steps must agree with the first time).
    losses: Vec<f32>,
    /// The state written by each checkpoint, by the step it was taken after.
    checkpoints: Vec<(usize, Vec<u8>)>,
    final_state: Vec<u8>,
    correct: usize,
    boots: usize,
    steps_run: usize,
    high_water: usize,
    arena: usize,
    save_ops: usize,
}

/// Trains `total` steps (sample `i % n` at step `i`), checkpointing the state and the step count
/// every `EVERY` steps, with power cut at each of `cuts` the first time the device reaches it.
fn run(b: &Bundle, total: usize, cuts: &[Cut]) -> Outcome {
    let params_w = words(&b.params);
    let params = &as_bytes(&params_w)[..b.params.len()];
    let arena_bytes = Trainer::arena_bytes(&b.plan).unwrap();
    let n = b.input_len().unwrap();
    let samples = b.train_y.len();
    let state_len = {
        let mut a = vec![0u32; arena_bytes.div_ceil(4)];
        Trainer::new(&b.plan, params, as_bytes_mut(&mut a))
            .unwrap()
            .state()
            .len()
    };
    let slot = ((state_len + 8 + 64).div_ceil(SECTOR) * SECTOR) as u32;
    let mut flash = Flash::new(2 * slot as usize);

    let mut pending = cuts.to_vec();
    let mut out = Outcome {
        losses: vec![f32::NAN; total],
        checkpoints: Vec::new(),
        final_state: Vec::new(),
        correct: 0,
        boots: 0,
        steps_run: 0,
        high_water: 0,
        arena: arena_bytes,
        save_ops: 0,
    };
    // The newest checkpoint whose save returned Ok, and one whose save was cut after its commit
    // record went in (which may or may not have survived).
    let mut committed: Option<usize> = None;
    let mut in_flight: Option<usize> = None;
    'boot: loop {
        out.boots += 1;
        // After a power cut the SRAM holds garbage: recovery must not depend on it.
        let mut arena = vec![0xA5A5_A5A5u32; arena_bytes.div_ceil(4)];
        let mut t = Trainer::new(&b.plan, params, as_bytes_mut(&mut arena)).unwrap();
        let tag = t.tag();
        let mut store = Checkpoints::new(flash, 0, slot, tag).unwrap();
        let mut counter = [0u8; 8];
        let restored = store
            .load(&mut [t.executor().state_mut(), &mut counter])
            .unwrap();
        let mut step = match restored {
            Some(_) => u64::from_le_bytes(counter) as usize,
            None => 0,
        };
        let expected = restored.map(|_| step);
        assert!(
            expected == committed || (in_flight.is_some() && expected == in_flight),
            "boot {}: recovered the checkpoint after step {expected:?}, newest complete is {committed:?}",
            out.boots
        );
        if let Some(s) = expected {
            let reference = &out.checkpoints.iter().rev().find(|c| c.0 == s).unwrap().1;
            assert_eq!(t.state(), &reference[..], "recovered state after step {s}");
        }
        committed = expected;
        in_flight = None;

        while step < total {
            let i = step % samples;
            let loss = t.step(&b.train_x[i * n..(i + 1) * n], b.train_y[i] as u32);
            let loss = loss.unwrap();
            out.steps_run += 1;
            let hw = t.executor().high_water();
            assert!(
                hw <= arena_bytes,
                "step {step}: high water {hw} > {arena_bytes}"
            );
            out.high_water = out.high_water.max(hw);
            if let Some(k) = pending.iter().position(|&c| c == Cut::Step(step)) {
                pending.remove(k);
                flash = store.into_inner().reboot();
                continue 'boot;
            }
            let first = out.losses[step];
            assert!(
                first.is_nan() || first.to_bits() == loss.to_bits(),
                "step {step}: loss {loss} on replay, {first} the first time"
            );
            out.losses[step] = loss;
            step += 1;
            if step.is_multiple_of(EVERY) {
                let cut = pending
                    .iter()
                    .position(|c| matches!(c, Cut::Save { after, .. } if *after == step));
                // Operations are counted from this checkpoint's first.
                let mut f = store.into_inner().reboot();
                let mut cut_op = None;
                if let Some(k) = cut {
                    if let Cut::Save { op, torn, .. } = pending.remove(k) {
                        f = f.with_cut(op, torn);
                        cut_op = Some(op);
                    }
                }
                store = Checkpoints::new(f, 0, slot, tag).unwrap();
                let state = t.state().to_vec();
                let r = store.save(&[&state, &(step as u64).to_le_bytes()]);
                match (r, cut_op) {
                    (Ok(_), None) => {
                        let f = store.into_inner();
                        out.save_ops = out.save_ops.max(f.steps);
                        store = Checkpoints::new(f, 0, slot, tag).unwrap();
                        committed = Some(step);
                        out.checkpoints.push((step, state));
                    }
                    (Err(CheckpointError::Flash(SimError::PowerLost)), Some(op)) => {
                        // Before the commit record's word nothing new may survive.
                        out.checkpoints.push((step, state));
                        if op + 1 >= out.save_ops {
                            in_flight = Some(step);
                        }
                        flash = store.into_inner().reboot();
                        continue 'boot;
                    }
                    (r, c) => panic!("checkpoint after step {step} (cut {c:?}): {r:?}"),
                }
            }
        }
        out.final_state = t.state().to_vec();
        out.correct = t.count_correct(&b.test_x, &b.test_y).unwrap();
        assert!(pending.is_empty(), "cuts never reached: {pending:?}");
        return out;
    }
}

fn soak(total: usize, cuts: usize, seed: u64) {
    let b = Bundle::demo();
    let reference = run(&b, total, &[]);
    assert_eq!(reference.boots, 1);
    assert!(reference.save_ops > 3);
    let mut rng = seed;
    let mut plan = Vec::new();
    for k in 0..cuts {
        let r = xorshift(&mut rng);
        if k % 2 == 0 {
            plan.push(Cut::Step((r % total as u64) as usize));
        } else {
            let after = EVERY * (1 + (r % (total / EVERY) as u64) as usize);
            let op = (xorshift(&mut rng) % reference.save_ops as u64) as usize;
            // A third of the tears leave the interrupted word/sector untouched.
            let torn = match xorshift(&mut rng) % 3 {
                0 => Torn::Untouched,
                _ => Torn::Random(xorshift(&mut rng) | 1),
            };
            plan.push(Cut::Save { after, op, torn });
        }
    }
    let cut = run(&b, total, &plan);
    assert_eq!(
        cut.boots,
        cuts + 1,
        "every cut fired once and was recovered from"
    );
    for (s, (a, b)) in reference.losses.iter().zip(&cut.losses).enumerate() {
        assert_eq!(a.to_bits(), b.to_bits(), "loss of step {s}");
    }
    for (s, st) in &cut.checkpoints {
        let r = &reference.checkpoints[s / EVERY - 1];
        assert_eq!(r.0, *s);
        assert_eq!(&r.1, st, "checkpoint after step {s}");
    }
    assert_eq!(
        reference.final_state, cut.final_state,
        "final learned state"
    );
    assert_eq!(reference.correct, cut.correct);
    assert!(cut.high_water <= cut.arena);
    println!(
        "soak: {total} steps, checkpoint every {EVERY}, {cuts} cuts ({} during steps, {} during \
         checkpoint writes of {} flash ops), {} boots, {} steps run ({} replayed), final state \
         bit-exact ({} bytes), test accuracy {}/{} both runs, arena high water {} <= {} bytes",
        plan.iter().filter(|c| matches!(c, Cut::Step(_))).count(),
        plan.iter()
            .filter(|c| matches!(c, Cut::Save { .. }))
            .count(),
        reference.save_ops,
        cut.boots,
        cut.steps_run,
        cut.steps_run - total,
        cut.final_state.len(),
        cut.correct,
        b.test_y.len(),
        cut.high_water,
        cut.arena,
    );
}

#[test]
fn soak_short() {
    soak(2_000, 10, 0x0123_4567_89AB_CDEF);
}

#[test]
#[ignore = "long soak (20,000 steps, 50 cuts): cargo test -p tt-mcu --release --test soak -- --ignored"]
fn soak_long() {
    soak(20_000, 50, 0xFEED_FACE_CAFE_BEEF);
}
