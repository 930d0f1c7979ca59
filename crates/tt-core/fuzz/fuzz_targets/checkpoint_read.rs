//! The checkpoint slot reader over arbitrary flash contents: `newest` and `load` must return a
//! valid checkpoint or none, never panic; a `save` then must read back exactly what was saved.
//! Input: tag u32 | payload length u16 | flash image (two 1 KB slots, padded with erased bytes).
#![no_main]
use embedded_storage::nor_flash::{
    ErrorType, NorFlash, NorFlashError, NorFlashErrorKind, ReadNorFlash,
};
use libfuzzer_sys::fuzz_target;
use tt_mcu::checkpoint::Checkpoints;

const SECTOR: usize = 256;
const SLOT: u32 = 1024;

#[derive(Debug)]
struct OutOfBounds;

impl NorFlashError for OutOfBounds {
    fn kind(&self) -> NorFlashErrorKind {
        NorFlashErrorKind::OutOfBounds
    }
}

struct Ram(Vec<u8>);

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
        // NOR programming only clears bits.
        for (d, &b) in dst.iter_mut().zip(bytes) {
            *d &= b;
        }
        Ok(())
    }
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 6 {
        return;
    }
    let tag = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
    let len = u16::from_le_bytes([data[4], data[5]]) as usize % 2048;
    let mut mem = vec![0xFFu8; 2 * SLOT as usize];
    let image = &data[6..];
    let n = image.len().min(mem.len());
    mem[..n].copy_from_slice(&image[..n]);
    let mut c = Checkpoints::new(Ram(mem), 0, SLOT, tag).expect("a valid layout");
    let newest = c.newest(len).expect("RAM flash does not fail in bounds");
    let mut out = vec![0u8; len];
    let got = c
        .load(&mut [&mut out[..]])
        .expect("RAM flash does not fail in bounds");
    assert_eq!(got, newest.map(|s| s.seq));
    if len > c.max_len() {
        assert!(got.is_none());
        return;
    }
    let payload: Vec<u8> = out.iter().map(|b| b ^ 0x5A).collect();
    let seq = c
        .save(&[&payload])
        .expect("a save on working flash succeeds");
    let mut back = vec![0u8; len];
    assert_eq!(c.load(&mut [&mut back[..]]).unwrap(), Some(seq));
    assert_eq!(back, payload);
});
