//! Power-loss-safe A/B checkpoint of the learned parameters in NOR flash.
//!
//! Two slots of whole erase sectors. A checkpoint always goes into the slot that does *not* hold
//! the newest valid checkpoint, so whatever a power cut leaves behind, the previous checkpoint is
//! untouched. A slot is, in flash order:
//!
//! ```text
//! unit 0   header  magic "TTCK" | version u16 | header length u16 | sequence u32 | length u32
//!                  | tag u32 | payload CRC-32 u32 | reserved u32 | header CRC-32 u32 (all LE)
//! unit 1   commit  "DONE" | !header CRC-32 (binds the record to this header), then 0xFF
//! unit 2.. payload
//! ```
//!
//! The slot is erased, the header and payload are programmed, and the commit record is
//! programmed last: until its word is complete the slot reads as empty. On boot every slot is
//! checked (magic, version, header CRC, commit record, tag, length, payload CRC) and the valid
//! one with the newest sequence number (serial-number order, so it may wrap) wins; a worn or
//! bit-flipped slot fails a CRC and is skipped.
//!
//! The `tag` identifies what the payload belongs to (the plan's CRC): a checkpoint written for
//! another plan or another parameter size is never loaded into this one.
//!
//! A "unit" is at least 32 bytes (and at least the flash's write and read size): every program
//! and read starts and ends on a unit boundary, so any flash whose write granularity divides 32
//! (1..32 bytes: STM32F4/F7 byte/word programming, F4 double words, H7 flash words) fits.
use embedded_storage::nor_flash::NorFlash;
use tt_core::crc::Crc32;

pub const MAGIC: [u8; 4] = *b"TTCK";
pub const COMMIT: [u8; 4] = *b"DONE";
pub const FORMAT_VERSION: u16 = 1;
const HEADER_LEN: usize = 32;
/// Staging buffer for programming and reading: the only RAM the checkpoint needs (on the stack).
const CHUNK: usize = 256;
const MIN_UNIT: usize = 32;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckpointError<E> {
    /// The flash driver reported an error (its own error value).
    Flash(E),
    /// The slot layout does not fit this flash; `what` names the violated rule.
    BadLayout { what: &'static str },
    /// The parameters do not fit in one slot.
    TooLarge { len: usize, max: usize },
    /// The checkpoint was programmed but did not read back valid (worn or failing flash).
    VerifyFailed,
}

/// Which slot holds a valid checkpoint, and its sequence number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SlotInfo {
    pub slot: u8,
    pub seq: u32,
}

/// Two checkpoint slots in one flash region: slot 0 at `base`, slot 1 at `base + slot_size`.
pub struct Checkpoints<F: NorFlash> {
    flash: F,
    base: u32,
    slot_size: u32,
    sector: u32,
    unit: usize,
    tag: u32,
}

fn newer(a: u32, b: u32) -> bool {
    (a.wrapping_sub(b) as i32) > 0
}

fn round_up(x: usize, to: usize) -> usize {
    x.div_ceil(to) * to
}

impl<F: NorFlash> Checkpoints<F> {
    /// Slots of `slot_size` bytes from `base`, erased in `F::ERASE_SIZE` sectors.
    pub fn new(
        flash: F,
        base: u32,
        slot_size: u32,
        tag: u32,
    ) -> Result<Self, CheckpointError<F::Error>> {
        Self::with_sector_size(flash, base, slot_size, tag, F::ERASE_SIZE)
    }

    /// As [`Checkpoints::new`] for a driver whose real sector is larger than (a multiple of) its
    /// declared `ERASE_SIZE`, e.g. a driver whose geometry is only known at run time.
    pub fn with_sector_size(
        flash: F,
        base: u32,
        slot_size: u32,
        tag: u32,
        sector: usize,
    ) -> Result<Self, CheckpointError<F::Error>> {
        let bad = |what| Err(CheckpointError::BadLayout { what });
        let unit = MIN_UNIT.max(F::WRITE_SIZE).max(F::READ_SIZE);
        if !unit.is_power_of_two() || unit > CHUNK {
            return bad("write/read size must be a power of two of at most 256 bytes");
        }
        if sector == 0
            || F::ERASE_SIZE == 0
            || !sector.is_multiple_of(F::ERASE_SIZE)
            || !sector.is_multiple_of(unit)
        {
            return bad(
                "sector size must be a non-zero multiple of the erase, write and read sizes",
            );
        }
        let Ok(sector) = u32::try_from(sector) else {
            return bad("sector size must fit in u32");
        };
        if !base.is_multiple_of(sector) || !slot_size.is_multiple_of(sector) || slot_size == 0 {
            return bad("base and slot size must be whole sectors");
        }
        let end = base as u64 + 2 * slot_size as u64;
        if end > flash.capacity() as u64 {
            return bad("two slots must fit in the flash capacity");
        }
        if (slot_size as usize) < 3 * unit {
            return bad("a slot must hold the header, the commit record and one payload unit");
        }
        Ok(Checkpoints {
            flash,
            base,
            slot_size,
            sector,
            unit,
            tag,
        })
    }

    pub fn into_inner(self) -> F {
        self.flash
    }

    /// Largest parameter block one slot holds, in bytes.
    pub fn max_len(&self) -> usize {
        (self.slot_size as usize - 2 * self.unit) & !(self.unit - 1)
    }

    fn slot_base(&self, slot: u8) -> u32 {
        self.base + slot as u32 * self.slot_size
    }

    /// The newest slot holding a valid checkpoint of exactly `len` bytes under this tag.
    pub fn newest(&mut self, len: usize) -> Result<Option<SlotInfo>, CheckpointError<F::Error>> {
        let mut best: Option<SlotInfo> = None;
        for slot in 0..2u8 {
            if let Some(seq) = self.validate(slot, len)? {
                if best.is_none_or(|b| newer(seq, b.seq)) {
                    best = Some(SlotInfo { slot, seq });
                }
            }
        }
        Ok(best)
    }

    /// Copies the newest valid checkpoint into `parts` (concatenated, in order) and returns its
    /// sequence number; `Ok(None)` (and `parts` untouched) when no slot holds a valid one.
    pub fn load(
        &mut self,
        parts: &mut [&mut [u8]],
    ) -> Result<Option<u32>, CheckpointError<F::Error>> {
        let len = parts.iter().map(|p| p.len()).sum();
        let Some(info) = self.newest(len)? else {
            return Ok(None);
        };
        let mut addr = self.slot_base(info.slot) + 2 * self.unit as u32;
        let mut crc = Crc32::new();
        let mut buf = [0u8; CHUNK];
        // Parts may end inside a chunk, so read whole chunks and scatter them.
        let mut part = 0;
        let mut at = 0;
        let mut left = len;
        while left > 0 {
            let n = left.min(CHUNK);
            let rd = round_up(n, self.unit);
            self.flash
                .read(addr, &mut buf[..rd])
                .map_err(CheckpointError::Flash)?;
            crc.update(&buf[..n]);
            let mut src = &buf[..n];
            while !src.is_empty() {
                let dst = &mut parts[part][at..];
                let k = dst.len().min(src.len());
                dst[..k].copy_from_slice(&src[..k]);
                src = &src[k..];
                at += k;
                if at == parts[part].len() {
                    part += 1;
                    at = 0;
                }
            }
            addr += n as u32;
            left -= n;
        }
        // The slot was validated just before; a mismatch now means the flash changed under us.
        let header = self.read_header(info.slot)?;
        if header.map(|h| h.payload_crc) != Some(crc.finish()) {
            return Err(CheckpointError::VerifyFailed);
        }
        Ok(Some(info.seq))
    }

    /// Writes `parts` (concatenated) as a new checkpoint into the slot not holding the newest
    /// valid one, and returns its sequence number. If power is lost at any point, the next
    /// [`Checkpoints::load`] returns either the previous checkpoint or this one, never a mix.
    pub fn save(&mut self, parts: &[&[u8]]) -> Result<u32, CheckpointError<F::Error>> {
        let len: usize = parts.iter().map(|p| p.len()).sum();
        if len > self.max_len() {
            return Err(CheckpointError::TooLarge {
                len,
                max: self.max_len(),
            });
        }
        let (slot, seq) = match self.newest(len)? {
            Some(info) => (1 - info.slot, info.seq.wrapping_add(1)),
            None => (0, 1),
        };
        let base = self.slot_base(slot);
        let unit = self.unit;

        let used = round_up(2 * unit + len, self.sector as usize) as u32;
        self.flash
            .erase(base, base + used)
            .map_err(CheckpointError::Flash)?;

        let mut crc = Crc32::new();
        for p in parts {
            crc.update(p);
        }
        let header = Header {
            seq,
            len: len as u32,
            tag: self.tag,
            payload_crc: crc.finish(),
        }
        .encode();
        let mut buf = [0xFFu8; CHUNK];
        buf[..HEADER_LEN].copy_from_slice(&header);
        self.flash
            .write(base, &buf[..unit])
            .map_err(CheckpointError::Flash)?;

        let mut addr = base + 2 * unit as u32;
        let mut fill = 0;
        for p in parts {
            let mut src = *p;
            while !src.is_empty() {
                let k = (CHUNK - fill).min(src.len());
                buf[fill..fill + k].copy_from_slice(&src[..k]);
                fill += k;
                src = &src[k..];
                if fill == CHUNK {
                    self.flash
                        .write(addr, &buf)
                        .map_err(CheckpointError::Flash)?;
                    addr += CHUNK as u32;
                    fill = 0;
                }
            }
        }
        if fill > 0 {
            let n = round_up(fill, F::WRITE_SIZE);
            buf[fill..n].fill(0xFF);
            self.flash
                .write(addr, &buf[..n])
                .map_err(CheckpointError::Flash)?;
        }

        let hcrc = u32::from_le_bytes([header[28], header[29], header[30], header[31]]);
        buf[..unit].fill(0xFF);
        buf[..4].copy_from_slice(&COMMIT);
        buf[4..8].copy_from_slice(&(!hcrc).to_le_bytes());
        // Only the record's own words: the rest of the unit is already erased, and the record
        // must be the very last thing programmed.
        self.flash
            .write(base + unit as u32, &buf[..round_up(8, F::WRITE_SIZE)])
            .map_err(CheckpointError::Flash)?;

        if self.validate(slot, len)? != Some(seq) {
            return Err(CheckpointError::VerifyFailed);
        }
        Ok(seq)
    }

    fn read_header(&mut self, slot: u8) -> Result<Option<Header>, CheckpointError<F::Error>> {
        let base = self.slot_base(slot);
        let unit = self.unit;
        let mut buf = [0u8; CHUNK];
        self.flash
            .read(base, &mut buf[..unit])
            .map_err(CheckpointError::Flash)?;
        let Some(h) = Header::decode(&buf[..HEADER_LEN]) else {
            return Ok(None);
        };
        self.flash
            .read(base + unit as u32, &mut buf[..unit])
            .map_err(CheckpointError::Flash)?;
        // The rest of the commit unit must still read erased: any programmed bit there means
        // the unit was disturbed, and the record is not trusted.
        let committed = buf[..4] == COMMIT
            && buf[4..8] == (!h.crc).to_le_bytes()
            && buf[8..unit].iter().all(|&b| b == 0xFF);
        Ok(committed.then_some(h.header))
    }

    /// The sequence number of `slot` if it holds a complete, intact checkpoint of `len` bytes.
    fn validate(&mut self, slot: u8, len: usize) -> Result<Option<u32>, CheckpointError<F::Error>> {
        let Some(h) = self.read_header(slot)? else {
            return Ok(None);
        };
        if h.tag != self.tag || h.len as usize != len || len > self.max_len() {
            return Ok(None);
        }
        let mut addr = self.slot_base(slot) + 2 * self.unit as u32;
        let mut crc = Crc32::new();
        let mut buf = [0u8; CHUNK];
        let mut left = len;
        while left > 0 {
            let n = left.min(CHUNK);
            self.flash
                .read(addr, &mut buf[..round_up(n, self.unit)])
                .map_err(CheckpointError::Flash)?;
            crc.update(&buf[..n]);
            addr += n as u32;
            left -= n;
        }
        Ok((crc.finish() == h.payload_crc).then_some(h.seq))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Header {
    seq: u32,
    len: u32,
    tag: u32,
    payload_crc: u32,
}

struct Decoded {
    header: Header,
    crc: u32,
}

impl Header {
    fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..4].copy_from_slice(&MAGIC);
        b[4..6].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
        b[6..8].copy_from_slice(&(HEADER_LEN as u16).to_le_bytes());
        b[8..12].copy_from_slice(&self.seq.to_le_bytes());
        b[12..16].copy_from_slice(&self.len.to_le_bytes());
        b[16..20].copy_from_slice(&self.tag.to_le_bytes());
        b[20..24].copy_from_slice(&self.payload_crc.to_le_bytes());
        let crc = tt_core::crc::crc32(&b[..28]);
        b[28..32].copy_from_slice(&crc.to_le_bytes());
        b
    }

    fn decode(b: &[u8]) -> Option<Decoded> {
        let word = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        if b.len() < HEADER_LEN || b[0..4] != MAGIC {
            return None;
        }
        if u16::from_le_bytes([b[4], b[5]]) != FORMAT_VERSION
            || u16::from_le_bytes([b[6], b[7]]) as usize != HEADER_LEN
        {
            return None;
        }
        let crc = word(28);
        if tt_core::crc::crc32(&b[..28]) != crc {
            return None;
        }
        Some(Decoded {
            header: Header {
                seq: word(8),
                len: word(12),
                tag: word(16),
                payload_crc: word(20),
            },
            crc,
        })
    }
}
