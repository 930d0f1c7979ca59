//! The C ABI with random bytes: `tt_arena_bytes`, `tt_init` (plan and parameter blob from the
//! input, arena sized from the plan's claim but capped), then `tt_input_len`, `tt_step`,
//! `tt_predict` with right and wrong lengths and NULLs (run for plans up to `MAX_MACS`), and `tt_restore` / `tt_save` /
//! `tt_checkpoint_load` through a `tt_flash` over RAM whose contents come from the input.
//! Input: control byte | `.ttp` image; the flash image is the tail of the parameter blob.
#![no_main]
#![allow(dead_code, unused_attributes, clippy::missing_safety_doc)]
use core::ffi::c_void;
use core::ptr;
use libfuzzer_sys::fuzz_target;

mod common;
use common::*;

// The FFI crate builds only as staticlib/cdylib; its source is compiled in here as a module so
// the fuzzer calls exactly the exported functions.
#[path = "../../../tt-mcu/ffi/src/lib.rs"]
mod ffi;
use ffi::*;

const CAPACITY: u32 = 4096;
const SLOT: u32 = 1024;

unsafe extern "C" fn read(ctx: *mut c_void, off: u32, buf: *mut u8, len: u32) -> i32 {
    let mem = unsafe { &*(ctx as *const Vec<u8>) };
    match mem.get(off as usize..(off as usize).saturating_add(len as usize)) {
        Some(src) => {
            unsafe { ptr::copy_nonoverlapping(src.as_ptr(), buf, src.len()) };
            0
        }
        None => -1,
    }
}

unsafe extern "C" fn write(ctx: *mut c_void, off: u32, buf: *const u8, len: u32) -> i32 {
    let mem = unsafe { &mut *(ctx as *mut Vec<u8>) };
    match mem.get_mut(off as usize..(off as usize).saturating_add(len as usize)) {
        Some(dst) => {
            let src = unsafe { core::slice::from_raw_parts(buf, dst.len()) };
            for (d, &s) in dst.iter_mut().zip(src) {
                *d &= s;
            }
            0
        }
        None => -1,
    }
}

unsafe extern "C" fn erase(ctx: *mut c_void, from: u32, to: u32) -> i32 {
    let mem = unsafe { &mut *(ctx as *mut Vec<u8>) };
    match mem.get_mut(from as usize..to as usize) {
        Some(d) => {
            d.fill(0xFF);
            0
        }
        None => -1,
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&ctl, rest)) = data.split_first() else {
        return;
    };
    let (plan, params) = split(rest);
    let fixed;
    let plan = if ctl & 1 != 0 {
        match with_crcs(plan, params) {
            Some(p) => {
                fixed = p;
                &fixed[..]
            }
            None => plan,
        }
    } else {
        plan
    };
    let params_w = words(params);
    let params = &as_bytes(&params_w)[..params.len()];

    let mut claimed = 0usize;
    let rc = unsafe { tt_arena_bytes(plan.as_ptr(), plan.len(), &mut claimed) };
    assert!(rc <= 0);
    assert_eq!(
        unsafe { tt_arena_bytes(plan.as_ptr(), plan.len(), ptr::null_mut()) },
        TT_ERR_NULL
    );
    if rc != TT_OK {
        return;
    }
    let arena_len = claimed.min(MAX_ARENA);
    let mut arena = vec![0u32; arena_len.div_ceil(4).max(1)];
    let mut storage = vec![0u64; TRAINER_WORDS];
    let tp = storage.as_mut_ptr() as *mut TtTrainer;
    // Uninitialized storage is refused, not trusted.
    let mut n = 0usize;
    assert_eq!(unsafe { tt_input_len(tp, &mut n) }, TT_ERR_INVALID);
    let arena_ptr = as_bytes_mut(&mut arena).as_mut_ptr();
    // A misaligned arena (ctl bit 1) is refused.
    let (aptr, alen) = if ctl & 2 != 0 {
        (unsafe { arena_ptr.add(1) }, arena_len.saturating_sub(1))
    } else {
        (arena_ptr, arena_len)
    };
    let rc = unsafe {
        tt_init(
            tp,
            plan.as_ptr(),
            plan.len(),
            params.as_ptr(),
            params.len(),
            aptr,
            alen,
        )
    };
    if ctl & 2 != 0 && alen > 0 {
        assert_eq!(rc, TT_ERR_ALIGN);
    }
    if rc != TT_OK {
        assert!(rc < 0);
        return;
    }
    assert_eq!(unsafe { tt_input_len(tp, &mut n) }, TT_OK);
    let x: Vec<i8> = (0..n.min(MAX_ARENA))
        .map(|i| (i as i8) ^ ctl as i8)
        .collect();
    let mut loss = 0f32;
    let mut class = 0u32;
    // Wrong length and NULLs are error codes.
    assert_eq!(
        unsafe { tt_step(tp, x.as_ptr(), n + 1, 0, &mut loss) },
        TT_ERR_SIZE
    );
    assert_eq!(
        unsafe { tt_step(tp, x.as_ptr(), x.len(), 0, ptr::null_mut()) },
        TT_ERR_NULL
    );
    if n > 0 && x.len() == n {
        assert_eq!(
            unsafe { tt_predict(tp, ptr::null(), n, &mut class) },
            TT_ERR_NULL
        );
    }
    // Work is bounded as in `plan_load`: a plan that `tt_init` accepted parses.
    if tt_core::plan::PlanView::parse(plan).is_ok_and(|pv| forward_macs(&pv) <= MAX_MACS) {
        let _ = unsafe { tt_step(tp, x.as_ptr(), x.len(), (ctl >> 4) as u32, &mut loss) };
        let _ = unsafe { tt_predict(tp, x.as_ptr(), x.len(), &mut class) };
    }

    let tail = &params[params.len().saturating_sub(CAPACITY as usize)..];
    let mut mem = vec![0xFFu8; CAPACITY as usize];
    mem[..tail.len()].copy_from_slice(tail);
    let flash = TtFlash {
        ctx: &mut mem as *mut Vec<u8> as *mut c_void,
        capacity: CAPACITY,
        write_size: 1 << (ctl >> 5 & 7),
        erase_size: 256,
        read: Some(read),
        write: Some(write),
        erase: Some(erase),
    };
    let mut seq = 0u32;
    let rc = unsafe { tt_restore(tp, &flash, 0, SLOT, &mut seq) };
    assert!(rc == TT_OK || rc == TT_NO_CHECKPOINT || rc < 0);
    let rc = unsafe { tt_save(tp, &flash, 0, SLOT, &mut seq) };
    assert!(rc <= 0);
    let mut buf = vec![0u8; (ctl as usize) * 4];
    let rc = unsafe {
        tt_checkpoint_load(
            &flash,
            SLOT * 2,
            SLOT,
            ctl as u32,
            buf.as_mut_ptr(),
            buf.len(),
            &mut seq,
        )
    };
    assert!(rc == TT_OK || rc == TT_NO_CHECKPOINT || rc < 0);
    assert_eq!(
        unsafe {
            tt_checkpoint_load(
                ptr::null(),
                0,
                SLOT,
                0,
                buf.as_mut_ptr(),
                buf.len(),
                &mut seq,
            )
        },
        TT_ERR_NULL
    );
});
