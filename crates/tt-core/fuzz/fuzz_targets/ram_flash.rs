// Shared by the checkpoint target and the seed generator: a NOR flash held in RAM, 256-byte
// sectors, programming that only clears bits, as the checkpoint code sees real flash.
use embedded_storage::nor_flash::{
    ErrorType, NorFlash, NorFlashError, NorFlashErrorKind, ReadNorFlash,
};

const SECTOR: usize = 256;

#[derive(Debug)]
pub struct OutOfBounds;

impl NorFlashError for OutOfBounds {
    fn kind(&self) -> NorFlashErrorKind {
        NorFlashErrorKind::OutOfBounds
    }
}

pub struct Ram(pub Vec<u8>);

impl ErrorType for Ram {
    type Error = OutOfBounds;
}

impl ReadNorFlash for Ram {
    const READ_SIZE: usize = 1;
    fn read(&mut self, offset: u32, bytes: &mut [u8]) -> Result<(), OutOfBounds> {
        let o = offset as usize;
        let src = self.0.get(o..o + bytes.len()).ok_or(OutOfBounds)?;
        bytes.copy_from_slice(src);
        Ok(())
    }
    fn capacity(&self) -> usize {
        self.0.len()
    }
}

impl NorFlash for Ram {
    const WRITE_SIZE: usize = 4;
    const ERASE_SIZE: usize = SECTOR;
    fn erase(&mut self, from: u32, to: u32) -> Result<(), OutOfBounds> {
        self.0
            .get_mut(from as usize..to as usize)
            .ok_or(OutOfBounds)?
            .fill(0xFF);
        Ok(())
    }
    fn write(&mut self, offset: u32, bytes: &[u8]) -> Result<(), OutOfBounds> {
        let o = offset as usize;
        let dst = self.0.get_mut(o..o + bytes.len()).ok_or(OutOfBounds)?;
        for (d, &b) in dst.iter_mut().zip(bytes) {
            *d &= b;
        }
        Ok(())
    }
}
