//! CRC-32 (IEEE 802.3: reflected polynomial 0xEDB88320, initial value and final XOR 0xFFFFFFFF),
//! the same check value as zlib's `crc32`, so a Python writer can use `zlib.crc32` for files the
//! core verifies. One implementation for the whole project: plan files and flash checkpoints.
//!
//! A 16-entry (nibble) table keeps the flash cost at 64 bytes; two lookups per byte are fast
//! enough for checking a plan once at boot and a checkpoint of a few kilobytes.

const POLY: u32 = 0xEDB8_8320;

const TABLE: [u32; 16] = {
    let mut t = [0u32; 16];
    let mut i = 0;
    while i < 16 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 4 {
            c = if c & 1 != 0 { (c >> 1) ^ POLY } else { c >> 1 };
            k += 1;
        }
        t[i] = c;
        i += 1;
    }
    t
};

/// Incremental CRC-32: feeding the bytes in any number of pieces gives the same value as
/// [`crc32`] over their concatenation, so data can be checked as it streams from flash.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Crc32 {
    state: u32,
}

impl Default for Crc32 {
    fn default() -> Self {
        Self::new()
    }
}

impl Crc32 {
    pub const fn new() -> Self {
        Crc32 { state: !0 }
    }

    pub fn update(&mut self, bytes: &[u8]) {
        let mut c = self.state;
        for &b in bytes {
            c ^= b as u32;
            c = (c >> 4) ^ TABLE[(c & 0xF) as usize];
            c = (c >> 4) ^ TABLE[(c & 0xF) as usize];
        }
        self.state = c;
    }

    pub const fn finish(&self) -> u32 {
        !self.state
    }
}

/// CRC-32 of `bytes` in one call.
pub fn crc32(bytes: &[u8]) -> u32 {
    let mut c = Crc32::new();
    c.update(bytes);
    c.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Bit-at-a-time definition, the oracle for the table-driven form.
    fn crc32_bitwise(bytes: &[u8]) -> u32 {
        let mut c = !0u32;
        for &b in bytes {
            c ^= b as u32;
            for _ in 0..8 {
                c = if c & 1 != 0 { (c >> 1) ^ POLY } else { c >> 1 };
            }
        }
        !c
    }

    #[test]
    fn check_values() {
        // The catalogue check value of CRC-32/ISO-HDLC and zlib.crc32(b"") / (b"a").
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
        assert_eq!(crc32(b""), 0);
        assert_eq!(crc32(b"a"), 0xE8B7_BE43);
        assert_eq!(
            crc32(b"The quick brown fox jumps over the lazy dog"),
            0x414F_A339
        );
    }

    #[test]
    fn table_matches_bitwise_and_incremental_matches_one_shot() {
        let mut data = [0u8; 1031];
        let mut x = 0x1234_5678u32;
        for d in data.iter_mut() {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            *d = x as u8;
        }
        for len in [0, 1, 2, 7, 64, 255, 1031] {
            let whole = crc32(&data[..len]);
            assert_eq!(whole, crc32_bitwise(&data[..len]), "len {len}");
            for split in [0, 1.min(len), len / 3, len / 2, len] {
                let mut c = Crc32::new();
                c.update(&data[..split]);
                c.update(&data[split..len]);
                assert_eq!(c.finish(), whole, "len {len} split {split}");
            }
        }
    }

    #[test]
    fn single_bit_flips_are_detected() {
        let mut data = [0xA5u8; 300];
        let good = crc32(&data);
        for i in 0..data.len() * 8 {
            data[i / 8] ^= 1 << (i % 8);
            assert_ne!(crc32(&data), good, "flip of bit {i} undetected");
            data[i / 8] ^= 1 << (i % 8);
        }
    }
}
