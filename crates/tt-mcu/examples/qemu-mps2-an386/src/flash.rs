//! A NOR-flash-like region of the mps2-an386 machine for checkpoints.
use core::ptr::{read_volatile, write_volatile};

use embedded_storage::nor_flash::{
    ErrorType, NorFlash, NorFlashError, NorFlashErrorKind, ReadNorFlash,
};

/// NOR flash semantics over a window of the machine's SSRAM (QEMU models no writable flash on
/// this board): erase sets 16 KB sectors to 0xFF, a program needs word alignment and an erased
/// target, as on the STM32F7's flash. Lies at 0x0030_0000, outside the 1 MB code region.
pub struct MemFlash;

pub const FLASH_BASE: usize = 0x0030_0000;
pub const FLASH_SIZE: usize = 512 * 1024;

#[derive(Debug, Clone, Copy)]
pub enum MemFlashError {
    NotAligned,
    OutOfBounds,
    NotErased,
}

impl NorFlashError for MemFlashError {
    fn kind(&self) -> NorFlashErrorKind {
        match self {
            MemFlashError::NotAligned => NorFlashErrorKind::NotAligned,
            MemFlashError::OutOfBounds => NorFlashErrorKind::OutOfBounds,
            MemFlashError::NotErased => NorFlashErrorKind::Other,
        }
    }
}

impl ErrorType for MemFlash {
    type Error = MemFlashError;
}

fn window(offset: u32, len: usize) -> Result<*mut u8, MemFlashError> {
    let end = (offset as usize)
        .checked_add(len)
        .ok_or(MemFlashError::OutOfBounds)?;
    if end > FLASH_SIZE {
        return Err(MemFlashError::OutOfBounds);
    }
    Ok((FLASH_BASE + offset as usize) as *mut u8)
}

impl ReadNorFlash for MemFlash {
    const READ_SIZE: usize = 1;

    fn read(&mut self, offset: u32, bytes: &mut [u8]) -> Result<(), MemFlashError> {
        let p = window(offset, bytes.len())?;
        for (i, b) in bytes.iter_mut().enumerate() {
            *b = unsafe { read_volatile(p.add(i)) };
        }
        Ok(())
    }

    fn capacity(&self) -> usize {
        FLASH_SIZE
    }
}

impl NorFlash for MemFlash {
    const WRITE_SIZE: usize = 4;
    const ERASE_SIZE: usize = 16 * 1024;

    fn erase(&mut self, from: u32, to: u32) -> Result<(), MemFlashError> {
        if from % Self::ERASE_SIZE as u32 != 0 || to % Self::ERASE_SIZE as u32 != 0 || from > to {
            return Err(MemFlashError::NotAligned);
        }
        let p = window(from, (to - from) as usize)? as *mut u32;
        for i in 0..(to - from) as usize / 4 {
            unsafe { write_volatile(p.add(i), u32::MAX) };
        }
        Ok(())
    }

    fn write(&mut self, offset: u32, bytes: &[u8]) -> Result<(), MemFlashError> {
        if offset % 4 != 0 || bytes.len() % 4 != 0 {
            return Err(MemFlashError::NotAligned);
        }
        let p = window(offset, bytes.len())? as *mut u32;
        for (i, w) in bytes.chunks_exact(4).enumerate() {
            let cell = unsafe { p.add(i) };
            if unsafe { read_volatile(cell) } != u32::MAX {
                return Err(MemFlashError::NotErased);
            }
            unsafe { write_volatile(cell, u32::from_le_bytes([w[0], w[1], w[2], w[3]])) };
        }
        Ok(())
    }
}
