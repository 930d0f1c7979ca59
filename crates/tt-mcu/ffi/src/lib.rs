//! C ABI of tt-mcu (header: `include/tinytrain.h`, kept by hand and checked by the tests).
//!
//! Nothing allocates; the caller owns every buffer, including the trainer's storage
//! (`tt_trainer`, 8-byte aligned, [`TRAINER_WORDS`] words). Every pointer is checked for NULL and
//! alignment and every length against what the plan needs before anything is read; the result
//! is `TT_OK`, a positive status or a negative `TT_ERR_*` code.
#![no_std]
// The safety contract of every exported function is the header's (include/tinytrain.h).
#![allow(clippy::missing_safety_doc)]
// Host builds (the cffi test, host-side C programs) take std's panic runtime; firmware builds
// bring their own handler below. The core does not panic on bad data, so neither path is hit by it.
#[cfg(not(target_os = "none"))]
extern crate std;

use core::ffi::{c_char, c_void};
use core::mem::{align_of, size_of};
use core::ptr;

use embedded_storage::nor_flash::{
    ErrorType, NorFlash, NorFlashError, NorFlashErrorKind, ReadNorFlash,
};
use tt_core::Error;
use tt_mcu::checkpoint::{CheckpointError, Checkpoints};
use tt_mcu::trainer::Trainer;

pub const TT_OK: i32 = 0;
pub const TT_NO_CHECKPOINT: i32 = 1;
pub const TT_ERR_NULL: i32 = -1;
pub const TT_ERR_SIZE: i32 = -2;
pub const TT_ERR_ALIGN: i32 = -3;
pub const TT_ERR_OUT_OF_MEMORY: i32 = -4;
pub const TT_ERR_CORRUPT_PLAN: i32 = -5;
pub const TT_ERR_INVALID: i32 = -6;
pub const TT_ERR_NOT_REPRESENTABLE: i32 = -7;
pub const TT_ERR_NON_FINITE: i32 = -8;
pub const TT_ERR_FLASH: i32 = -9;
pub const TT_ERR_LAYOUT: i32 = -10;
pub const TT_ERR_TOO_LARGE: i32 = -11;
pub const TT_ERR_VERIFY: i32 = -12;
pub const TT_ERR_CORRUPT_UPDATE: i32 = -13;
pub const TT_ERR_UPDATE_PLAN: i32 = -14;

/// `tt_trainer` is this many `uint64_t`: room for the trainer and an initialization marker.
pub const TRAINER_WORDS: usize = 64;

#[repr(C)]
pub struct TtTrainer {
    opaque: [u64; TRAINER_WORDS],
}

/// What `tt_init` writes into a `tt_trainer`. The marker tells an initialized one from
/// zeroed or garbage storage.
#[repr(C)]
struct Slot {
    magic: u64,
    trainer: Trainer<'static, 'static>,
}

const MAGIC: u64 = 0x7474_7261_696e_6572; // "ttrainer"
const _: () = assert!(size_of::<Slot>() <= size_of::<TtTrainer>());
const _: () = assert!(align_of::<Slot>() <= align_of::<TtTrainer>());

#[repr(C)]
pub struct TtFlash {
    pub ctx: *mut c_void,
    pub capacity: u32,
    pub write_size: u32,
    pub erase_size: u32,
    pub read: Option<unsafe extern "C" fn(*mut c_void, u32, *mut u8, u32) -> i32>,
    pub write: Option<unsafe extern "C" fn(*mut c_void, u32, *const u8, u32) -> i32>,
    pub erase: Option<unsafe extern "C" fn(*mut c_void, u32, u32) -> i32>,
}

fn core_code(e: Error) -> i32 {
    match e {
        Error::ShapeMismatch { .. } => TT_ERR_SIZE,
        Error::InvalidParameter { .. } => TT_ERR_INVALID,
        Error::NotRepresentable { .. } => TT_ERR_NOT_REPRESENTABLE,
        Error::NonFinite { .. } => TT_ERR_NON_FINITE,
        Error::CorruptPlan { .. } => TT_ERR_CORRUPT_PLAN,
        Error::OutOfMemory { .. } => TT_ERR_OUT_OF_MEMORY,
        Error::CorruptUpdate { .. } => TT_ERR_CORRUPT_UPDATE,
        Error::UpdatePlanMismatch { .. } => TT_ERR_UPDATE_PLAN,
    }
}

fn checkpoint_code<E>(e: CheckpointError<E>) -> i32 {
    match e {
        CheckpointError::Flash(_) => TT_ERR_FLASH,
        CheckpointError::BadLayout { .. } => TT_ERR_LAYOUT,
        CheckpointError::TooLarge { .. } => TT_ERR_TOO_LARGE,
        CheckpointError::VerifyFailed => TT_ERR_VERIFY,
    }
}

#[no_mangle]
pub extern "C" fn tt_status_str(status: i32) -> *const c_char {
    let s: &'static [u8] = match status {
        TT_OK => b"ok\0",
        TT_NO_CHECKPOINT => b"no valid checkpoint\0",
        TT_ERR_NULL => b"a required pointer is NULL\0",
        TT_ERR_SIZE => b"a length does not match what the plan or buffer needs\0",
        TT_ERR_ALIGN => b"params, arena or trainer storage is misaligned\0",
        TT_ERR_OUT_OF_MEMORY => b"arena smaller than the plan needs (tt_arena_bytes)\0",
        TT_ERR_CORRUPT_PLAN => b"plan or parameter blob damaged or not matching\0",
        TT_ERR_INVALID => b"invalid parameter\0",
        TT_ERR_NOT_REPRESENTABLE => b"value not representable\0",
        TT_ERR_NON_FINITE => b"training diverged (NaN or inf); step refused\0",
        TT_ERR_FLASH => b"a flash callback failed\0",
        TT_ERR_LAYOUT => b"checkpoint slots do not fit the flash geometry\0",
        TT_ERR_TOO_LARGE => b"learned state larger than a checkpoint slot\0",
        TT_ERR_VERIFY => b"checkpoint did not read back valid\0",
        TT_ERR_CORRUPT_UPDATE => b"update blob damaged or not matching the plan's parameters\0",
        TT_ERR_UPDATE_PLAN => b"update blob written for another plan\0",
        _ => b"unknown status\0",
    };
    s.as_ptr() as *const c_char
}

/// A byte slice from C: NULL is only allowed for an empty one.
unsafe fn bytes<'a>(p: *const u8, len: usize) -> Result<&'a [u8], i32> {
    if len == 0 {
        return Ok(&[]);
    }
    if p.is_null() {
        return Err(TT_ERR_NULL);
    }
    // SAFETY: the caller promises `len` readable bytes at a non-NULL `p` (header contract).
    Ok(unsafe { core::slice::from_raw_parts(p, len) })
}

unsafe fn bytes_mut<'a>(p: *mut u8, len: usize) -> Result<&'a mut [u8], i32> {
    if len == 0 {
        return Ok(&mut []);
    }
    if p.is_null() {
        return Err(TT_ERR_NULL);
    }
    // SAFETY: as in `bytes`, and the caller hands the bytes over exclusively for the call.
    Ok(unsafe { core::slice::from_raw_parts_mut(p, len) })
}

fn status(r: Result<(), i32>) -> i32 {
    match r {
        Ok(()) => TT_OK,
        Err(c) => c,
    }
}

unsafe fn trainer<'a>(t: *mut TtTrainer) -> Result<&'a mut Trainer<'static, 'static>, i32> {
    if t.is_null() {
        return Err(TT_ERR_NULL);
    }
    if !(t as usize).is_multiple_of(align_of::<TtTrainer>()) {
        return Err(TT_ERR_ALIGN);
    }
    let slot = t as *mut Slot;
    // SAFETY: non-NULL, aligned, and large enough for a Slot (const assertions above); the
    // marker is read as a plain u64 before anything else is trusted.
    unsafe {
        if ptr::read(ptr::addr_of!((*slot).magic)) != MAGIC {
            return Err(TT_ERR_INVALID);
        }
        Ok(&mut (*slot).trainer)
    }
}

#[no_mangle]
pub unsafe extern "C" fn tt_arena_bytes(plan: *const u8, plan_len: usize, out: *mut usize) -> i32 {
    status((|| {
        if out.is_null() {
            return Err(TT_ERR_NULL);
        }
        // SAFETY: header contract for `plan`; `out` checked above.
        let plan = unsafe { bytes(plan, plan_len)? };
        let n = Trainer::arena_bytes(plan).map_err(core_code)?;
        unsafe { out.write(n) };
        Ok(())
    })())
}

#[no_mangle]
pub unsafe extern "C" fn tt_init(
    t: *mut TtTrainer,
    plan: *const u8,
    plan_len: usize,
    params: *const u8,
    params_len: usize,
    arena: *mut u8,
    arena_len: usize,
) -> i32 {
    status((|| {
        if t.is_null() || plan.is_null() || params.is_null() || arena.is_null() {
            return Err(TT_ERR_NULL);
        }
        if !(t as usize).is_multiple_of(align_of::<TtTrainer>())
            || !(params as usize).is_multiple_of(4)
            || !(arena as usize).is_multiple_of(4)
        {
            return Err(TT_ERR_ALIGN);
        }
        // SAFETY: header contract: plan, params and arena stay valid and unmoved, and the arena
        // is not touched by the caller, for the trainer's life ('static from here on).
        let (plan, params, arena) = unsafe {
            (
                bytes(plan, plan_len)?,
                bytes(params, params_len)?,
                bytes_mut(arena, arena_len)?,
            )
        };
        let trainer = Trainer::new(plan, params, arena).map_err(core_code)?;
        // SAFETY: `t` is non-NULL, aligned and holds a Slot (const assertions); the old contents
        // are plain bytes that need no drop.
        unsafe {
            ptr::write(
                t as *mut Slot,
                Slot {
                    magic: MAGIC,
                    trainer,
                },
            )
        };
        Ok(())
    })())
}

#[no_mangle]
pub unsafe extern "C" fn tt_input_len(t: *const TtTrainer, out: *mut usize) -> i32 {
    status((|| {
        // SAFETY: checked by `trainer`; only read through the reference.
        let tr = unsafe { trainer(t as *mut TtTrainer)? };
        if out.is_null() {
            return Err(TT_ERR_NULL);
        }
        let n = tr.input_len().map_err(core_code)?;
        unsafe { out.write(n) };
        Ok(())
    })())
}

#[no_mangle]
pub unsafe extern "C" fn tt_skipped_steps(t: *const TtTrainer, out: *mut u32) -> i32 {
    status((|| {
        // SAFETY: checked by `trainer`; only read through the reference.
        let tr = unsafe { trainer(t as *mut TtTrainer)? };
        if out.is_null() {
            return Err(TT_ERR_NULL);
        }
        unsafe { out.write(tr.skipped_steps()) };
        Ok(())
    })())
}

#[no_mangle]
pub unsafe extern "C" fn tt_lr(t: *const TtTrainer, out: *mut f32) -> i32 {
    status((|| {
        // SAFETY: checked by `trainer`; only read through the reference.
        let tr = unsafe { trainer(t as *mut TtTrainer)? };
        if out.is_null() {
            return Err(TT_ERR_NULL);
        }
        unsafe { out.write(tr.lr()) };
        Ok(())
    })())
}

#[no_mangle]
pub unsafe extern "C" fn tt_set_lr(t: *mut TtTrainer, lr: f32) -> i32 {
    status((|| {
        let tr = unsafe { trainer(t)? };
        tr.set_lr(lr).map_err(core_code)
    })())
}

unsafe fn input<'a>(tr: &Trainer, p: *const i8, len: usize) -> Result<&'a [i8], i32> {
    if len != tr.input_len().map_err(core_code)? {
        return Err(TT_ERR_SIZE);
    }
    // SAFETY: `len` checked against the plan's input; header contract for the bytes.
    let b = unsafe { bytes(p as *const u8, len)? };
    // SAFETY: i8 and u8 share size, alignment and validity.
    Ok(unsafe { core::slice::from_raw_parts(b.as_ptr() as *const i8, b.len()) })
}

#[no_mangle]
pub unsafe extern "C" fn tt_step(
    t: *mut TtTrainer,
    x: *const i8,
    x_len: usize,
    label: u32,
    loss: *mut f32,
) -> i32 {
    status((|| {
        let tr = unsafe { trainer(t)? };
        if loss.is_null() {
            return Err(TT_ERR_NULL);
        }
        let x = unsafe { input(tr, x, x_len)? };
        let l = tr.step(x, label).map_err(core_code)?;
        unsafe { loss.write(l) };
        Ok(())
    })())
}

#[no_mangle]
pub unsafe extern "C" fn tt_predict(
    t: *mut TtTrainer,
    x: *const i8,
    x_len: usize,
    class_out: *mut u32,
) -> i32 {
    status((|| {
        let tr = unsafe { trainer(t)? };
        if class_out.is_null() {
            return Err(TT_ERR_NULL);
        }
        let x = unsafe { input(tr, x, x_len)? };
        let c = tr.predict(x).map_err(core_code)?;
        unsafe { class_out.write(c as u32) };
        Ok(())
    })())
}

#[no_mangle]
pub unsafe extern "C" fn tt_update_len(t: *const TtTrainer, out: *mut usize) -> i32 {
    status((|| {
        // SAFETY: checked by `trainer`; only read through the reference.
        let tr = unsafe { trainer(t as *mut TtTrainer)? };
        if out.is_null() {
            return Err(TT_ERR_NULL);
        }
        let n = tr.update_len().map_err(core_code)?;
        unsafe { out.write(n) };
        Ok(())
    })())
}

#[no_mangle]
pub unsafe extern "C" fn tt_write_update(
    t: *const TtTrainer,
    sample_count: u32,
    out: *mut u8,
    out_len: usize,
    written: *mut usize,
) -> i32 {
    status((|| {
        // SAFETY: checked by `trainer`; only read through the reference.
        let tr = unsafe { trainer(t as *mut TtTrainer)? };
        if written.is_null() {
            return Err(TT_ERR_NULL);
        }
        if out_len < tr.update_len().map_err(core_code)? {
            return Err(TT_ERR_SIZE);
        }
        // SAFETY: header contract: `out_len` writable bytes at `out`.
        let buf = unsafe { bytes_mut(out, out_len)? };
        let n = tr.write_update(sample_count, buf).map_err(core_code)?;
        unsafe { written.write(n) };
        Ok(())
    })())
}

#[no_mangle]
pub unsafe extern "C" fn tt_apply_update(
    t: *mut TtTrainer,
    blob: *const u8,
    blob_len: usize,
    sample_count: *mut u32,
) -> i32 {
    status((|| {
        let tr = unsafe { trainer(t)? };
        if sample_count.is_null() {
            return Err(TT_ERR_NULL);
        }
        // SAFETY: header contract for `blob`.
        let b = unsafe { bytes(blob, blob_len)? };
        let n = tr.apply_update(b).map_err(core_code)?;
        unsafe { sample_count.write(n) };
        Ok(())
    })())
}

/// A `tt_flash` as embedded-storage NOR flash. All checkpoint programming happens in whole
/// 32-byte units at 32-byte aligned offsets, which any write granularity dividing 32 accepts;
/// the sector size is the run-time `erase_size` (see `Checkpoints::with_sector_size`).
struct CFlash<'a>(&'a TtFlash);

#[derive(Debug)]
enum CFlashError {
    Callback,
    OutOfBounds,
}

impl NorFlashError for CFlashError {
    fn kind(&self) -> NorFlashErrorKind {
        match self {
            CFlashError::Callback => NorFlashErrorKind::Other,
            CFlashError::OutOfBounds => NorFlashErrorKind::OutOfBounds,
        }
    }
}

impl ErrorType for CFlash<'_> {
    type Error = CFlashError;
}

impl CFlash<'_> {
    fn bounds(&self, offset: u32, len: usize) -> Result<u32, CFlashError> {
        let len = u32::try_from(len).map_err(|_| CFlashError::OutOfBounds)?;
        match offset.checked_add(len) {
            Some(end) if end <= self.0.capacity => Ok(len),
            _ => Err(CFlashError::OutOfBounds),
        }
    }
}

fn ok(rc: i32) -> Result<(), CFlashError> {
    if rc == 0 {
        Ok(())
    } else {
        Err(CFlashError::Callback)
    }
}

impl ReadNorFlash for CFlash<'_> {
    const READ_SIZE: usize = 1;

    fn read(&mut self, offset: u32, bytes: &mut [u8]) -> Result<(), CFlashError> {
        let len = self.bounds(offset, bytes.len())?;
        let f = self.0.read.ok_or(CFlashError::Callback)?;
        // SAFETY: a C callback writing `len` bytes into our buffer, per the header contract.
        ok(unsafe { f(self.0.ctx, offset, bytes.as_mut_ptr(), len) })
    }

    fn capacity(&self) -> usize {
        self.0.capacity as usize
    }
}

impl NorFlash for CFlash<'_> {
    const WRITE_SIZE: usize = 32;
    const ERASE_SIZE: usize = 32;

    fn erase(&mut self, from: u32, to: u32) -> Result<(), CFlashError> {
        if to < from {
            return Err(CFlashError::OutOfBounds);
        }
        self.bounds(from, (to - from) as usize)?;
        let f = self.0.erase.ok_or(CFlashError::Callback)?;
        // SAFETY: a C callback, per the header contract.
        ok(unsafe { f(self.0.ctx, from, to) })
    }

    fn write(&mut self, offset: u32, bytes: &[u8]) -> Result<(), CFlashError> {
        let len = self.bounds(offset, bytes.len())?;
        let f = self.0.write.ok_or(CFlashError::Callback)?;
        // SAFETY: a C callback reading `len` bytes of our buffer, per the header contract.
        ok(unsafe { f(self.0.ctx, offset, bytes.as_ptr(), len) })
    }
}

fn store<'a>(
    flash: *const TtFlash,
    base: u32,
    slot_size: u32,
    tag: u32,
) -> Result<Checkpoints<CFlash<'a>>, i32> {
    if flash.is_null() {
        return Err(TT_ERR_NULL);
    }
    // SAFETY: non-NULL; the header contract makes it a valid tt_flash for the call.
    let f = unsafe { &*flash };
    if f.read.is_none() || f.write.is_none() || f.erase.is_none() {
        return Err(TT_ERR_NULL);
    }
    let w = f.write_size;
    if w == 0 || !w.is_power_of_two() || w > 32 || f.erase_size == 0 || f.erase_size % 32 != 0 {
        return Err(TT_ERR_LAYOUT);
    }
    Checkpoints::with_sector_size(CFlash(f), base, slot_size, tag, f.erase_size as usize)
        .map_err(checkpoint_code)
}

unsafe fn write_seq(seq: *mut u32, v: u32) -> Result<(), i32> {
    if seq.is_null() {
        return Err(TT_ERR_NULL);
    }
    // SAFETY: non-NULL, a u32 the caller provides.
    unsafe { seq.write(v) };
    Ok(())
}

#[no_mangle]
pub unsafe extern "C" fn tt_save(
    t: *const TtTrainer,
    flash: *const TtFlash,
    base: u32,
    slot_size: u32,
    seq: *mut u32,
) -> i32 {
    status((|| {
        let tr = unsafe { trainer(t as *mut TtTrainer)? };
        if seq.is_null() {
            return Err(TT_ERR_NULL);
        }
        let mut s = store(flash, base, slot_size, tr.tag())?;
        let n = tr.save(&mut s).map_err(checkpoint_code)?;
        unsafe { write_seq(seq, n) }
    })())
}

#[no_mangle]
pub unsafe extern "C" fn tt_restore(
    t: *mut TtTrainer,
    flash: *const TtFlash,
    base: u32,
    slot_size: u32,
    seq: *mut u32,
) -> i32 {
    let r = (|| {
        let tr = unsafe { trainer(t)? };
        if seq.is_null() {
            return Err(TT_ERR_NULL);
        }
        let mut s = store(flash, base, slot_size, tr.tag())?;
        match tr.restore(&mut s).map_err(checkpoint_code)? {
            Some(n) => unsafe { write_seq(seq, n) }.map(|()| TT_OK),
            None => Ok(TT_NO_CHECKPOINT),
        }
    })();
    r.unwrap_or_else(|c| c)
}

#[no_mangle]
pub unsafe extern "C" fn tt_checkpoint_save(
    flash: *const TtFlash,
    base: u32,
    slot_size: u32,
    tag: u32,
    data: *const u8,
    len: usize,
    seq: *mut u32,
) -> i32 {
    status((|| {
        if seq.is_null() {
            return Err(TT_ERR_NULL);
        }
        let d = unsafe { bytes(data, len)? };
        let mut s = store(flash, base, slot_size, tag)?;
        let n = s.save(&[d]).map_err(checkpoint_code)?;
        unsafe { write_seq(seq, n) }
    })())
}

#[no_mangle]
pub unsafe extern "C" fn tt_checkpoint_load(
    flash: *const TtFlash,
    base: u32,
    slot_size: u32,
    tag: u32,
    data: *mut u8,
    len: usize,
    seq: *mut u32,
) -> i32 {
    let r = (|| {
        if seq.is_null() {
            return Err(TT_ERR_NULL);
        }
        let d = unsafe { bytes_mut(data, len)? };
        let mut s = store(flash, base, slot_size, tag)?;
        match s.load(&mut [d]).map_err(checkpoint_code)? {
            Some(n) => unsafe { write_seq(seq, n) }.map(|()| TT_OK),
            None => Ok(TT_NO_CHECKPOINT),
        }
    })();
    r.unwrap_or_else(|c| c)
}

#[cfg(target_os = "none")]
#[panic_handler]
fn panic(_: &core::panic::PanicInfo) -> ! {
    // Firmware linking this library gets a halt, not undefined behaviour; the core does not
    // panic on bad input, so reaching this is a bug.
    loop {
        core::hint::spin_loop();
    }
}

#[cfg(test)]
mod tests;
