//! Every error value a device can see, forced on the demo plan: each comes back as its typed
//! variant with a message naming what was wrong, and leaves the trainer usable (docs/errors.md).
use embedded_storage::nor_flash::{
    ErrorType, NorFlash, NorFlashError, NorFlashErrorKind, ReadNorFlash,
};
use tt_core::quant::Requant;
use tt_core::Error;
use tt_mcu::bundle::Bundle;
use tt_mcu::checkpoint::{CheckpointError, Checkpoints};
use tt_mcu::source::SampleSource;
use tt_mcu::trainer::{TrainError, Trainer};

#[path = "common/words.rs"]
mod words;
use words::{as_bytes, as_bytes_mut, words};

#[test]
fn core_errors_name_what_was_wrong() {
    let b = Bundle::demo();
    let pw = words(&b.params);
    let params = &as_bytes(&pw)[..b.params.len()];
    let need = Trainer::arena_bytes(&b.plan).unwrap();

    // OutOfMemory: an arena one word short.
    let mut small = vec![0u32; need / 4 - 1];
    let e = Trainer::new(&b.plan, params, as_bytes_mut(&mut small))
        .err()
        .unwrap();
    assert!(
        matches!(e, Error::OutOfMemory { needed, available, .. } if needed == need && available == need - 4)
    );
    assert!(
        e.to_string()
            .contains(&format!("needs {need} bytes, {} available", need - 4)),
        "{e}"
    );

    // CorruptPlan: a flipped body byte fails the body CRC; a truncated plan its header.
    let mut bad = b.plan.clone();
    bad[60] ^= 1;
    let e = Trainer::arena_bytes(&bad).unwrap_err();
    assert_eq!(e, Error::CorruptPlan { field: "body_crc" });
    assert_eq!(e.to_string(), "corrupted or truncated plan: field body_crc");
    assert!(matches!(
        Trainer::arena_bytes(&b.plan[..20]),
        Err(Error::CorruptPlan { .. })
    ));
    // A parameter blob of another model.
    let mut other = b.params.clone();
    other[0] ^= 1;
    let ow = words(&other);
    let mut arena = vec![0u32; need / 4];
    let e = Trainer::new(
        &b.plan,
        &as_bytes(&ow)[..other.len()],
        as_bytes_mut(&mut arena),
    )
    .err()
    .unwrap();
    assert!(matches!(e, Error::CorruptPlan { .. }), "{e}");

    let mut arena = vec![0u32; need / 4];
    let mut t = Trainer::new(&b.plan, params, as_bytes_mut(&mut arena)).unwrap();
    let n = t.input_len().unwrap();
    let x = &b.train_x[..n];

    // ShapeMismatch: a sample of the wrong size.
    let e = t.step(&x[..n - 1], 0).unwrap_err();
    assert!(
        matches!(e, Error::ShapeMismatch { expected, actual, .. } if expected == n && actual == n - 1)
    );
    assert!(
        e.to_string()
            .contains(&format!("expected {n} elements, got {}", n - 1)),
        "{e}"
    );

    // InvalidParameter: a label past the classifier's classes.
    let e = t.step(x, 1000).unwrap_err();
    assert!(matches!(e, Error::InvalidParameter { .. }), "{e}");
    assert!(e.to_string().starts_with("invalid parameter: "), "{e}");

    // NonFinite: a NaN learning rate is refused before any weight moves.
    let before = t.state().to_vec();
    t.executor().lr = f32::NAN;
    let e = t.step(x, 0).unwrap_err();
    assert!(matches!(e, Error::NonFinite { .. }), "{e}");
    assert!(
        e.to_string().starts_with("non-finite value (NaN or inf): "),
        "{e}"
    );
    assert_eq!(t.state(), &before[..]);
    // The trainer stays usable.
    t.executor().lr = 0.1;
    assert!(t.step(x, 0).unwrap().is_finite());

    // NotRepresentable: a requantization scale no int32 multiplier can hold.
    let e = Requant::from_scale(-1.0).unwrap_err();
    assert!(matches!(e, Error::NotRepresentable { .. }), "{e}");
    assert!(e.to_string().starts_with("not representable: "), "{e}");
}

struct Broken;

impl SampleSource for Broken {
    type Error = &'static str;
    fn sample_len(&self) -> usize {
        0
    }
    fn next_sample(&mut self, _: &mut [i8]) -> Result<Option<u32>, &'static str> {
        Err("sensor unplugged")
    }
}

#[test]
fn a_failing_sample_source_is_its_own_error() {
    let b = Bundle::demo();
    let pw = words(&b.params);
    let mut arena = vec![0u32; Trainer::arena_bytes(&b.plan).unwrap() / 4];
    let mut t = Trainer::new(
        &b.plan,
        &as_bytes(&pw)[..b.params.len()],
        as_bytes_mut(&mut arena),
    )
    .unwrap();
    let mut buf = vec![0i8; t.input_len().unwrap()];
    assert_eq!(
        t.step_from(&mut Broken, &mut buf),
        Err(TrainError::Source("sensor unplugged"))
    );
}

#[derive(Debug, PartialEq)]
struct Never;

impl NorFlashError for Never {
    fn kind(&self) -> NorFlashErrorKind {
        NorFlashErrorKind::Other
    }
}

/// Worn flash: erases work, but every program silently leaves some bits set.
struct Worn(Vec<u8>);

impl ErrorType for Worn {
    type Error = Never;
}

impl ReadNorFlash for Worn {
    const READ_SIZE: usize = 1;
    fn read(&mut self, offset: u32, bytes: &mut [u8]) -> Result<(), Never> {
        bytes.copy_from_slice(&self.0[offset as usize..offset as usize + bytes.len()]);
        Ok(())
    }
    fn capacity(&self) -> usize {
        self.0.len()
    }
}

impl NorFlash for Worn {
    const WRITE_SIZE: usize = 4;
    const ERASE_SIZE: usize = 256;
    fn erase(&mut self, from: u32, to: u32) -> Result<(), Never> {
        self.0[from as usize..to as usize].fill(0xFF);
        Ok(())
    }
    fn write(&mut self, offset: u32, bytes: &[u8]) -> Result<(), Never> {
        for (d, &s) in self.0[offset as usize..].iter_mut().zip(bytes) {
            *d &= s | 0x01;
        }
        Ok(())
    }
}

#[test]
fn worn_flash_fails_verification_and_keeps_nothing() {
    let mut c = Checkpoints::new(Worn(vec![0xFF; 2048]), 0, 1024, 7).unwrap();
    let data: Vec<u8> = (0..100u8).map(|i| i.wrapping_mul(2)).collect();
    assert_eq!(c.save(&[&data]), Err(CheckpointError::VerifyFailed));
    let mut back = vec![0u8; data.len()];
    assert_eq!(c.load(&mut [&mut back[..]]), Ok(None));
}
