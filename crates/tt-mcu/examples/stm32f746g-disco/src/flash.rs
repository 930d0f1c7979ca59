//! The checkpoint slots in the STM32F746's own flash, through stm32f7xx-hal's driver: sectors 6
//! and 7 (256 KB each at 0x0808_0000), programmed a byte at a time (x8 parallelism, valid at any
//! supply voltage), read through the AXIM mapping. The firmware runs with the D-cache off, so
//! reads see what was just programmed.
use embedded_storage::nor_flash::{
    ErrorType, NorFlash, NorFlashError, NorFlashErrorKind, ReadNorFlash,
};
use stm32f7xx_hal::flash::{Error as HalError, Flash};

const REGION: u32 = 0x0808_0000;
const REGION_OFFSET: usize = 0x8_0000;
const FIRST_SECTOR: u8 = 6;
const SECTOR: u32 = 256 * 1024;
const SIZE: usize = 2 * SECTOR as usize;

pub struct BoardFlash(pub Flash);

#[derive(Debug)]
pub enum BoardFlashError {
    // Read only through `Debug` when the firmware reports a failed checkpoint.
    #[allow(dead_code)]
    Hal(HalError),
    NotAligned,
    OutOfBounds,
}

impl NorFlashError for BoardFlashError {
    fn kind(&self) -> NorFlashErrorKind {
        match self {
            BoardFlashError::Hal(_) => NorFlashErrorKind::Other,
            BoardFlashError::NotAligned => NorFlashErrorKind::NotAligned,
            BoardFlashError::OutOfBounds => NorFlashErrorKind::OutOfBounds,
        }
    }
}

impl ErrorType for BoardFlash {
    type Error = BoardFlashError;
}

fn check(offset: u32, len: usize) -> Result<(), BoardFlashError> {
    match (offset as usize).checked_add(len) {
        Some(end) if end <= SIZE => Ok(()),
        _ => Err(BoardFlashError::OutOfBounds),
    }
}

impl ReadNorFlash for BoardFlash {
    const READ_SIZE: usize = 1;

    fn read(&mut self, offset: u32, bytes: &mut [u8]) -> Result<(), BoardFlashError> {
        check(offset, bytes.len())?;
        let base = (REGION + offset) as *const u8;
        for (i, b) in bytes.iter_mut().enumerate() {
            // SAFETY: inside sectors 6-7 of the memory-mapped flash, checked above.
            *b = unsafe { core::ptr::read_volatile(base.add(i)) };
        }
        Ok(())
    }

    fn capacity(&self) -> usize {
        SIZE
    }
}

impl NorFlash for BoardFlash {
    const WRITE_SIZE: usize = 1;
    const ERASE_SIZE: usize = SECTOR as usize;

    fn erase(&mut self, from: u32, to: u32) -> Result<(), BoardFlashError> {
        if from % SECTOR != 0 || to % SECTOR != 0 || from > to {
            return Err(BoardFlashError::NotAligned);
        }
        check(from, (to - from) as usize)?;
        self.0.unlock();
        let mut r = Ok(());
        for s in from / SECTOR..to / SECTOR {
            r = self.0.blocking_erase_sector(FIRST_SECTOR + s as u8);
            if r.is_err() {
                break;
            }
        }
        self.0.lock();
        r.map_err(BoardFlashError::Hal)
    }

    fn write(&mut self, offset: u32, bytes: &[u8]) -> Result<(), BoardFlashError> {
        check(offset, bytes.len())?;
        self.0.unlock();
        let r = self
            .0
            .blocking_program(REGION_OFFSET + offset as usize, bytes);
        self.0.lock();
        r.map_err(BoardFlashError::Hal)
    }
}
