//! The on-device trainer: tt-core's executor over a plan and frozen parameters in flash and one
//! arena in SRAM, fed by a [`SampleSource`], its learned state checkpointed through [`Checkpoints`].
//!
//! ```text
//! static mut ARENA: Arena<{ ARENA_BYTES }> = Arena::new();   // size from the exported plan
//! let mut t = Trainer::new(PLAN, PARAMS, arena)?;            // checks plan, blob, arena size
//! t.restore(&mut store)?;                                    // newest checkpoint, if any
//! let loss = t.step(&x, label)?;
//! let class = t.predict(&x)?;
//! t.save(&mut store)?;                                       // power-loss safe
//! ```
use embedded_storage::nor_flash::NorFlash;
use tt_core::exec::{Executor, Target};
/// A plan's identity (the checkpoints' and the fleet updates' tag), defined with the format.
pub use tt_core::plan::plan_tag;
use tt_core::plan::PlanView;
use tt_core::Error;

use crate::checkpoint::{CheckpointError, Checkpoints};
use crate::source::SampleSource;

/// SRAM for the executor, 4-byte aligned as it requires. `N` comes from the plan
/// (`arena_bytes`), written by the export next to the plan, so a static of this type is the
/// whole training memory and the linker checks it fits.
#[repr(C, align(4))]
pub struct Arena<const N: usize>(pub [u8; N]);

impl<const N: usize> Arena<N> {
    pub const fn new() -> Self {
        Arena([0; N])
    }
}

impl<const N: usize> Default for Arena<N> {
    fn default() -> Self {
        Self::new()
    }
}

/// A failure of [`Trainer::step_from`]: the core (bad sample size, diverged step, ...) or the
/// sample source (sensor error).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TrainError<E> {
    Core(Error),
    Source(E),
}

pub struct Trainer<'p, 'a> {
    ex: Executor<'p, 'a>,
    tag: u32,
    skipped: u32,
}

impl<'p, 'a> Trainer<'p, 'a> {
    /// Validates the plan (CRC, every record), the parameter blob (length, CRC) and the arena
    /// (alignment, size: `Error::OutOfMemory` names the bytes needed), then loads the initial
    /// learned state from the blob.
    pub fn new(plan: &'p [u8], params: &'p [u8], arena: &'a mut [u8]) -> Result<Self, Error> {
        let tag = plan_tag(plan)?;
        let mut ex = Executor::new(plan, params, arena)?;
        ex.init()?;
        Ok(Trainer {
            ex,
            tag,
            skipped: 0,
        })
    }

    /// Arena bytes the plan needs (what [`Arena`] must hold), without building a trainer.
    pub fn arena_bytes(plan: &[u8]) -> Result<usize, Error> {
        Ok(PlanView::parse(plan)?.arena_bytes)
    }

    pub fn plan(&self) -> &PlanView<'p> {
        self.ex.plan()
    }

    /// Int8 elements of one input sample.
    pub fn input_len(&self) -> Result<usize, Error> {
        let pv = self.ex.plan();
        Ok(pv.tensor(pv.globals.input as usize)?.numel())
    }

    pub fn tag(&self) -> u32 {
        self.tag
    }

    /// The learning rate of the next steps: the plan's (`tt.compile(..., lr=)`, the range test's
    /// choice when the plan was compiled from data) until [`Self::set_lr`] changes it.
    pub fn lr(&self) -> f32 {
        self.ex.lr
    }

    /// Sets the learning rate of the next steps (the weights and the learned state are kept), so
    /// a device can lower a rate that makes its training collapse, or take one a host chose,
    /// without a new plan. A NaN, infinite or negative rate is refused (`Error::NonFinite` /
    /// `Error::InvalidParameter`) and the rate stays as it was. Not part of the checkpointed
    /// state: after a restart the plan's rate applies until set again.
    pub fn set_lr(&mut self, lr: f32) -> Result<(), Error> {
        if !lr.is_finite() {
            return Err(Error::NonFinite {
                what: "learning rate",
            });
        }
        if lr < 0.0 {
            return Err(Error::InvalidParameter {
                what: "learning rate (must be >= 0)",
            });
        }
        self.ex.lr = lr;
        Ok(())
    }

    /// The executor, for what this wrapper does not cover (high water, ...).
    pub fn executor(&mut self) -> &mut Executor<'p, 'a> {
        &mut self.ex
    }

    /// One training step on a labelled sample; returns the loss before the update. A step
    /// refused as `Error::NonFinite` (a NaN or infinite loss, gradient or learning rate) is
    /// counted in [`Self::skipped_steps`]; a non-finite loss or learning rate is refused before
    /// any weight moves.
    pub fn step(&mut self, input: &[i8], label: u32) -> Result<f32, Error> {
        let r = self.ex.step(input, Target::Class(label as usize));
        if let Err(Error::NonFinite { .. }) = r {
            self.skipped = self.skipped.saturating_add(1);
        }
        r
    }

    /// [`Self::step`], then a fleet's drift correction (SCAFFOLD's `c - c_i`, one value per
    /// trained value in update-blob order, LSB units): every trained value also moves by `-lr`
    /// times its entry (`tt_core::update::shift`, as the host's `Trainer.correction`). A refused
    /// step moves nothing.
    pub fn step_corrected(
        &mut self,
        input: &[i8],
        label: u32,
        correction: &[f32],
    ) -> Result<f32, Error> {
        let loss = self.step(input, label)?;
        let lr = self.ex.lr;
        self.ex.shift_trained(correction, -lr)?;
        Ok(loss)
    }

    /// Steps refused as non-finite since this trainer was created (the host's
    /// `Trainer.skipped_steps`); not part of the checkpointed state.
    pub fn skipped_steps(&self) -> u32 {
        self.skipped
    }

    pub fn predict(&mut self, input: &[i8]) -> Result<usize, Error> {
        self.ex.predict(input)
    }

    /// Correct predictions over labelled samples stored back to back (`ys.len()` inputs in `xs`).
    pub fn count_correct(&mut self, xs: &[i8], ys: &[u8]) -> Result<usize, Error> {
        let n = self.input_len()?;
        if xs.len() != ys.len() * n {
            return Err(Error::ShapeMismatch {
                what: "labelled samples (labels x input length)",
                expected: ys.len() * n,
                actual: xs.len(),
            });
        }
        let mut correct = 0;
        for (x, &y) in xs.chunks_exact(n).zip(ys) {
            correct += (self.predict(x)? == y as usize) as usize;
        }
        Ok(correct)
    }

    /// Reads the next sample from `source` into `buf` and trains on it if it carries a label
    /// (`Ok(Some(loss))`); an unlabelled sample is only predicted on and gives `Ok(None)`.
    pub fn step_from<S: SampleSource>(
        &mut self,
        source: &mut S,
        buf: &mut [i8],
    ) -> Result<Option<f32>, TrainError<S::Error>> {
        match source.next_sample(buf).map_err(TrainError::Source)? {
            Some(label) => self.step(buf, label).map(Some).map_err(TrainError::Core),
            None => self.predict(buf).map(|_| None).map_err(TrainError::Core),
        }
    }

    /// The learned state (updated weights, biases, update-precision state, PRNG).
    pub fn state(&self) -> &[u8] {
        self.ex.state()
    }

    /// Bytes of this plan's update blob (tt-core `update`): what [`Self::write_update`] needs.
    pub fn update_len(&self) -> Result<usize, Error> {
        tt_core::update::blob_len(self.ex.plan())
    }

    /// Writes the trained parameters (int8 weights of the trained channels, int32 biases) and
    /// `sample_count` as an update blob for the fleet; returns its length.
    pub fn write_update(&self, sample_count: u32, out: &mut [u8]) -> Result<usize, Error> {
        self.ex.write_update(sample_count, out)
    }

    /// Loads the trained parameters of an update blob of this plan (a fleet's global update),
    /// checked entirely before anything changes; returns its sample count.
    pub fn apply_update(&mut self, blob: &[u8]) -> Result<u32, Error> {
        self.ex.apply_update(blob)
    }

    /// Writes the learned state as a new checkpoint; returns its sequence number.
    pub fn save<F: NorFlash>(
        &self,
        store: &mut Checkpoints<F>,
    ) -> Result<u32, CheckpointError<F::Error>> {
        store.save(&[self.ex.state()])
    }

    /// Replaces the learned state with the newest valid checkpoint of this plan, if there is
    /// one (returns its sequence number); otherwise the state is left as it was.
    pub fn restore<F: NorFlash>(
        &mut self,
        store: &mut Checkpoints<F>,
    ) -> Result<Option<u32>, CheckpointError<F::Error>> {
        store.load(&mut [self.ex.state_mut()])
    }
}
