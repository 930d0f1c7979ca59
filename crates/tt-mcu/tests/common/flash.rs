//! The simulated NOR flash of the power-cut tests (tests/checkpoint.rs, tests/soak.rs): every
//! programmed word and erased sector is one step, and power can be cut at any step with the
//! interrupted word or sector left torn in one of several ways.
// Each test crate uses a part of it.
#![allow(dead_code)]
use embedded_storage::nor_flash::{
    ErrorType, NorFlash, NorFlashError, NorFlashErrorKind, ReadNorFlash,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SimError {
    NotAligned,
    OutOfBounds,
    PowerLost,
}

impl NorFlashError for SimError {
    fn kind(&self) -> NorFlashErrorKind {
        match self {
            SimError::NotAligned => NorFlashErrorKind::NotAligned,
            SimError::OutOfBounds => NorFlashErrorKind::OutOfBounds,
            SimError::PowerLost => NorFlashErrorKind::Other,
        }
    }
}

/// What an interrupted operation leaves in the word (write) or sector (erase) it was busy with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Torn {
    /// Nothing changed yet.
    Untouched,
    /// The first half of the bytes finished.
    Half,
    /// An arbitrary subset of bits (write: some 1->0 transitions; erase: random contents).
    Random(u64),
}

/// NOR flash: erase sets whole sectors to 0xFF; a write must be aligned to W, may only target
/// erased bytes (writing over programmed data is a bug in the caller and panics), and reads must
/// be aligned to R. Every word programmed and every sector erased is one step; power can be cut
/// at any step, after which the interrupted word/sector is left `Torn` and every call fails.
#[derive(Clone)]
pub struct SimFlash<const W: usize, const R: usize, const E: usize> {
    pub mem: Vec<u8>,
    pub steps: usize,
    cut_at: Option<(usize, Torn)>,
    dead: bool,
}

pub fn xorshift(s: &mut u64) -> u64 {
    *s ^= *s << 13;
    *s ^= *s >> 7;
    *s ^= *s << 17;
    *s
}

impl<const W: usize, const R: usize, const E: usize> SimFlash<W, R, E> {
    pub fn new(size: usize) -> Self {
        SimFlash {
            mem: vec![0xFF; size],
            steps: 0,
            cut_at: None,
            dead: false,
        }
    }

    /// Power comes back: the contents stay, the step counter and the cut are cleared.
    pub fn reboot(&self) -> Self {
        SimFlash {
            mem: self.mem.clone(),
            steps: 0,
            cut_at: None,
            dead: false,
        }
    }

    pub fn with_cut(&self, step: usize, torn: Torn) -> Self {
        let mut f = self.reboot();
        f.cut_at = Some((step, torn));
        f
    }

    /// Returns the damage to apply if this step is the one power is cut at.
    fn step(&mut self) -> Result<Option<Torn>, SimError> {
        if self.dead {
            return Err(SimError::PowerLost);
        }
        let now = self.steps;
        self.steps += 1;
        match self.cut_at {
            Some((at, torn)) if at == now => {
                self.dead = true;
                Ok(Some(torn))
            }
            _ => Ok(None),
        }
    }
}

impl<const W: usize, const R: usize, const E: usize> ErrorType for SimFlash<W, R, E> {
    type Error = SimError;
}

impl<const W: usize, const R: usize, const E: usize> ReadNorFlash for SimFlash<W, R, E> {
    const READ_SIZE: usize = R;

    fn read(&mut self, offset: u32, bytes: &mut [u8]) -> Result<(), SimError> {
        if self.dead {
            return Err(SimError::PowerLost);
        }
        let o = offset as usize;
        if !o.is_multiple_of(R) || !bytes.len().is_multiple_of(R) {
            return Err(SimError::NotAligned);
        }
        let src = self
            .mem
            .get(o..o + bytes.len())
            .ok_or(SimError::OutOfBounds)?;
        bytes.copy_from_slice(src);
        Ok(())
    }

    fn capacity(&self) -> usize {
        self.mem.len()
    }
}

impl<const W: usize, const R: usize, const E: usize> NorFlash for SimFlash<W, R, E> {
    const WRITE_SIZE: usize = W;
    const ERASE_SIZE: usize = E;

    fn erase(&mut self, from: u32, to: u32) -> Result<(), SimError> {
        let (from, to) = (from as usize, to as usize);
        if from % E != 0 || to % E != 0 || from > to {
            return Err(SimError::NotAligned);
        }
        if to > self.mem.len() {
            return Err(SimError::OutOfBounds);
        }
        for s in (from..to).step_by(E) {
            match self.step()? {
                None => self.mem[s..s + E].fill(0xFF),
                Some(Torn::Untouched) => return Err(SimError::PowerLost),
                Some(Torn::Half) => {
                    self.mem[s..s + E / 2].fill(0xFF);
                    return Err(SimError::PowerLost);
                }
                Some(Torn::Random(mut seed)) => {
                    for b in &mut self.mem[s..s + E] {
                        *b |= xorshift(&mut seed) as u8;
                    }
                    return Err(SimError::PowerLost);
                }
            }
        }
        Ok(())
    }

    fn write(&mut self, offset: u32, bytes: &[u8]) -> Result<(), SimError> {
        let o = offset as usize;
        if !o.is_multiple_of(W) || !bytes.len().is_multiple_of(W) {
            return Err(SimError::NotAligned);
        }
        if o + bytes.len() > self.mem.len() {
            return Err(SimError::OutOfBounds);
        }
        for (i, word) in bytes.chunks_exact(W).enumerate() {
            let at = o + i * W;
            assert!(
                self.mem[at..at + W].iter().all(|&b| b == 0xFF),
                "write to a non-erased word at {at:#x}"
            );
            let torn = self.step()?;
            let cell = &mut self.mem[at..at + W];
            match torn {
                None => cell.copy_from_slice(word),
                Some(Torn::Untouched) => return Err(SimError::PowerLost),
                Some(Torn::Half) => {
                    let h = W / 2;
                    // A one-byte word cut "half way" keeps only some of its bits.
                    if W == 1 {
                        cell[0] = word[0] | 0x0F;
                    } else {
                        cell[..h].copy_from_slice(&word[..h]);
                    }
                    return Err(SimError::PowerLost);
                }
                Some(Torn::Random(mut seed)) => {
                    // Programming only clears bits: a torn word has some of the zeros it should.
                    for (c, &w) in cell.iter_mut().zip(word) {
                        *c = w | xorshift(&mut seed) as u8;
                    }
                    return Err(SimError::PowerLost);
                }
            }
        }
        Ok(())
    }
}
