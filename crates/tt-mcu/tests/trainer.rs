//! The on-device trainer on the host: same executor, same plan, same numbers.
#![cfg(feature = "host")]
use tt_core::Error;
use tt_mcu::bundle::Bundle;
use tt_mcu::checkpoint::Checkpoints;
use tt_mcu::source::{SampleSource, SliceSource};
use tt_mcu::trainer::{plan_tag, Arena, Trainer};

mod sim {
    // The NorFlash simulation of the checkpoint tests, without power cuts.
    use embedded_storage::nor_flash::{ErrorType, NorFlash, NorFlashErrorKind, ReadNorFlash};
    pub struct Ram(pub Vec<u8>);
    impl ErrorType for Ram {
        type Error = NorFlashErrorKind;
    }
    impl ReadNorFlash for Ram {
        const READ_SIZE: usize = 1;
        fn read(&mut self, o: u32, b: &mut [u8]) -> Result<(), Self::Error> {
            b.copy_from_slice(&self.0[o as usize..o as usize + b.len()]);
            Ok(())
        }
        fn capacity(&self) -> usize {
            self.0.len()
        }
    }
    impl NorFlash for Ram {
        const WRITE_SIZE: usize = 4;
        const ERASE_SIZE: usize = 4096;
        fn erase(&mut self, from: u32, to: u32) -> Result<(), Self::Error> {
            self.0[from as usize..to as usize].fill(0xFF);
            Ok(())
        }
        fn write(&mut self, o: u32, b: &[u8]) -> Result<(), Self::Error> {
            let cell = &mut self.0[o as usize..o as usize + b.len()];
            assert!(
                cell.iter().all(|&x| x == 0xFF),
                "write over programmed flash"
            );
            cell.copy_from_slice(b);
            Ok(())
        }
    }
}

const EPOCHS: usize = 3;

#[test]
fn demo_trains_and_accuracy_rises() {
    let b = Bundle::demo();
    let run = b.run(EPOCHS).unwrap();
    let n = b.train_y.len();
    let first: f32 = run.losses[..n].iter().sum::<f32>() / n as f32;
    let last: f32 = run.losses[(EPOCHS - 1) * n..].iter().sum::<f32>() / n as f32;
    assert!(last < first, "mean loss {first} -> {last}");
    assert!(
        run.correct_after > run.correct_before,
        "accuracy {} -> {} of {}",
        run.correct_before,
        run.correct_after,
        b.test_y.len()
    );
}

#[test]
fn trainer_matches_the_reference_run_bit_for_bit_and_checkpoints_its_state() {
    let b = Bundle::demo();
    let run = b.run(EPOCHS).unwrap();
    let n = b.input_len().unwrap();
    let mut words = aligned_params(&b);
    let params = &bytemuck_bytes(&mut words)[..b.params.len()];
    let mut arena = Box::new(Arena::<65536>::new());
    assert!(b.arena_bytes().unwrap() <= 65536);

    let mut t = Trainer::new(&b.plan, params, &mut arena.0).unwrap();
    assert_eq!(t.input_len().unwrap(), n);
    assert_eq!(t.tag(), plan_tag(&b.plan).unwrap());
    let mut src = SliceSource::new(&b.train_x, &b.train_y, n).unwrap();
    let mut x = vec![0i8; src.sample_len()];
    let mut losses = Vec::new();
    while src.epoch() < EPOCHS as u32 {
        losses.push(t.step_from(&mut src, &mut x).unwrap().unwrap());
    }
    let bits = |v: &[f32]| v.iter().map(|l| l.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(&losses), bits(&run.losses));
    assert_eq!(t.state(), &run.state[..]);

    // Checkpoint, then a fresh trainer (as after a reset) restores exactly this state.
    let mut store = Checkpoints::new(sim::Ram(vec![0xFF; 1 << 16]), 0, 1 << 15, t.tag()).unwrap();
    let seq = t.save(&mut store).unwrap();
    let preds: Vec<usize> = b
        .test_x
        .chunks_exact(n)
        .map(|x| t.predict(x).unwrap())
        .collect();
    let mut arena2 = Box::new(Arena::<65536>::new());
    let mut t2 = Trainer::new(&b.plan, params, &mut arena2.0).unwrap();
    assert_ne!(
        t2.state(),
        &run.state[..],
        "a fresh trainer starts from the blob"
    );
    assert_eq!(t2.restore(&mut store).unwrap(), Some(seq));
    assert_eq!(t2.state(), &run.state[..]);
    let preds2: Vec<usize> = b
        .test_x
        .chunks_exact(n)
        .map(|x| t2.predict(x).unwrap())
        .collect();
    assert_eq!(preds, preds2);

    // A checkpoint of another plan (other tag) is not restored.
    let f = store.into_inner();
    let mut other = Checkpoints::new(f, 0, 1 << 15, t2.tag() ^ 1).unwrap();
    assert_eq!(t2.restore(&mut other).unwrap(), None);
}

#[test]
fn arena_too_small_and_foreign_blob_are_clear_errors() {
    let b = Bundle::demo();
    let need = b.arena_bytes().unwrap();
    let mut words = aligned_params(&b);
    let params = &bytemuck_bytes(&mut words)[..b.params.len()];
    let mut arena = vec![0u32; need / 4];
    let short = &mut bytemuck_bytes(&mut arena)[..need - 4];
    match Trainer::new(&b.plan, params, short) {
        Err(Error::OutOfMemory {
            needed, available, ..
        }) => {
            assert_eq!((needed, available), (need, need - 4))
        }
        other => panic!("expected OutOfMemory, got {:?}", other.err()),
    }
    let mut arena = vec![0u32; need.div_ceil(4)];
    let mut foreign = params.to_vec();
    foreign[0] ^= 1;
    foreign.extend_from_slice(&[0; 4]);
    let fl = foreign.len() - 4;
    assert!(matches!(
        Trainer::new(&b.plan, &foreign[..fl], bytemuck_bytes(&mut arena)),
        Err(Error::CorruptPlan { .. }) | Err(Error::InvalidParameter { .. })
    ));
    assert!(Trainer::new(&b.plan[..10], params, bytemuck_bytes(&mut arena)).is_err());
}

#[test]
fn bundle_files_round_trip_and_mismatches_are_reported() {
    let b = Bundle::demo();
    let dir = std::env::temp_dir().join(format!("tt-mcu-bundle-{}", std::process::id()));
    b.write(&dir).unwrap();
    assert_eq!(Bundle::read(&dir).unwrap(), b);
    std::fs::write(dir.join("test_y.bin"), [0u8; 3]).unwrap();
    let e = Bundle::read(&dir).unwrap_err().to_string();
    assert!(e.contains("test_x.bin"), "{e}");
    std::fs::write(dir.join("params.bin"), [0u8; 8]).unwrap();
    let e = Bundle::read(&dir).unwrap_err().to_string();
    assert!(e.contains("params.bin"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn corrected_steps_are_steps_then_the_shift() {
    let b = Bundle::demo();
    let n = b.input_len().unwrap();
    let mut words = aligned_params(&b);
    let params = &bytemuck_bytes(&mut words)[..b.params.len()];
    let (mut a1, mut a2) = (
        Box::new(Arena::<65536>::new()),
        Box::new(Arena::<65536>::new()),
    );
    let mut corrected = Trainer::new(&b.plan, params, &mut a1.0).unwrap();
    let mut manual = Trainer::new(&b.plan, params, &mut a2.0).unwrap();
    let values = tt_core::update::trained_values(corrected.plan()).unwrap();
    let correction: Vec<f32> = (0..values).map(|k| (k % 7) as f32 * 40.0 - 120.0).collect();
    let before = corrected.state().to_vec();
    for s in 0..8 {
        let x = &b.train_x[s * n..(s + 1) * n];
        let y = b.train_y[s] as u32;
        let l1 = corrected.step_corrected(x, y, &correction).unwrap();
        let l2 = manual.step(x, y).unwrap();
        let lr = manual.executor().lr;
        manual.executor().shift_trained(&correction, -lr).unwrap();
        assert_eq!(l1.to_bits(), l2.to_bits());
        assert_eq!(corrected.state(), manual.state());
    }
    assert_ne!(corrected.state(), &before[..]);
    // a correction of the wrong length is refused before it moves anything
    let x = &b.train_x[..n];
    let kept = corrected.state().to_vec();
    assert!(matches!(
        corrected.executor().shift_trained(&correction[1..], -0.1),
        Err(Error::ShapeMismatch { .. })
    ));
    assert_eq!(corrected.state(), &kept[..]);
    assert!(corrected.step_corrected(x, 0, &correction).is_ok());
}

/// The bundle's parameter blob in 4-byte aligned memory, as it is in flash.
fn aligned_params(b: &Bundle) -> Vec<u32> {
    let mut words = vec![0u32; b.params.len().div_ceil(4)];
    bytemuck_bytes(&mut words)[..b.params.len()].copy_from_slice(&b.params);
    words
}

fn bytemuck_bytes(w: &mut [u32]) -> &mut [u8] {
    // SAFETY: any byte pattern is a valid u8, and u8 needs no alignment.
    unsafe { std::slice::from_raw_parts_mut(w.as_mut_ptr() as *mut u8, w.len() * 4) }
}

#[test]
fn the_rate_is_set_at_run_time_and_a_bad_one_is_refused() {
    let mut b = Bundle::demo();
    let n = b.input_len().unwrap();
    let mut words = aligned_params(&b);
    let params = &bytemuck_bytes(&mut words)[..b.params.len()];
    let mut arena = Box::new(Arena::<65536>::new());
    let mut t = Trainer::new(&b.plan, params, &mut arena.0).unwrap();
    assert_eq!(t.lr(), b.lr, "a new trainer trains at the plan's rate");
    for bad in [f32::NAN, f32::INFINITY, -0.5] {
        assert!(t.set_lr(bad).is_err(), "rate {bad} accepted");
        assert_eq!(t.lr(), b.lr, "a refused rate changes nothing");
    }
    // At rate 0 a step computes its loss and moves no trained parameter (the update blob).
    t.set_lr(0.0).unwrap();
    let mut before = vec![0u8; t.update_len().unwrap()];
    t.write_update(0, &mut before).unwrap();
    for (x, &y) in b.train_x.chunks_exact(n).zip(&b.train_y).take(8) {
        t.step(x, y as u32).unwrap();
    }
    let mut after = vec![0u8; before.len()];
    t.write_update(0, &mut after).unwrap();
    assert_eq!(after, before);
    t.set_lr(b.lr).unwrap();
    t.step(&b.train_x[..n], b.train_y[0] as u32).unwrap();
    t.write_update(0, &mut after).unwrap();
    assert_ne!(after, before, "back at the plan's rate the step trains");

    // The bundle's rate is what the reference run (and so the firmware) trains with; it
    // round-trips through lr.bin, and a bundle without lr.bin trains at the plan's rate.
    let plan_rate = b.run(1).unwrap();
    b.lr = 0.0;
    let frozen = b.run(1).unwrap();
    assert_eq!(frozen.correct_after, frozen.correct_before);
    assert_ne!(frozen.state, plan_rate.state);
    let dir = std::env::temp_dir().join(format!("tt-mcu-bundle-lr-{}", std::process::id()));
    b.write(&dir).unwrap();
    assert_eq!(Bundle::read(&dir).unwrap().lr, 0.0);
    std::fs::remove_file(dir.join("lr.bin")).unwrap();
    assert_eq!(Bundle::read(&dir).unwrap().lr, Bundle::demo().lr);
    std::fs::write(dir.join("lr.bin"), [0u8; 3]).unwrap();
    let e = Bundle::read(&dir).unwrap_err().to_string();
    assert!(e.contains("lr.bin"), "{e}");
    std::fs::write(dir.join("lr.bin"), f32::NAN.to_le_bytes()).unwrap();
    let e = Bundle::read(&dir).unwrap_err().to_string();
    assert!(e.contains("lr.bin"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}
