//! The checkpoint slot reader over arbitrary flash contents: `newest` and `load` must return a
//! valid checkpoint or none, never panic; a `save` then must read back exactly what was saved.
//! Input: tag u32 | payload length u16 | flash image (two 1 KB slots, padded with erased bytes).
#![no_main]
use libfuzzer_sys::fuzz_target;
use tt_mcu::checkpoint::Checkpoints;

mod ram_flash;
use ram_flash::Ram;

const SLOT: u32 = 1024;

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
