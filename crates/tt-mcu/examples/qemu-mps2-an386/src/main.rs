//! tinytrain on a Cortex-M4F (QEMU mps2-an386), inside the STM32F746 budget: 256 KB SRAM, 1 MB
//! flash. Prints the cost of training kernels in instructions, checkpoints through the NOR-flash
//! A/B store and restores it, and exits 0 only if every check passed.
#![no_std]
#![no_main]

#[macro_use]
mod board;
mod kernels;

use cortex_m_rt::entry;
use tt_mcu::checkpoint::Checkpoints;

use board::{clock_start, exit, instructions, stack_paint, stack_peak, stack_reserve, MemFlash};

fn checkpoint_round_trip() -> Result<(), &'static str> {
    // Two slots of two 16 KB sectors; the tag stands for the plan's CRC.
    let tag = tt_core::crc::crc32(b"kernel-demo");
    let mut store = Checkpoints::new(MemFlash, 0, 32 * 1024, tag).map_err(|_| "layout")?;
    let mut params = [0u8; 6 * 1024];
    for (i, p) in params.iter_mut().enumerate() {
        *p = (i * 7 + 3) as u8;
    }
    let t0 = instructions();
    let first = store.save(&[&params]).map_err(|_| "first save")?;
    let t1 = instructions();
    params[100] ^= 0x55;
    let second = store.save(&[&params]).map_err(|_| "second save")?;
    let mut back = [0u8; 6 * 1024];
    let t2 = instructions();
    let seq = store.load(&mut [&mut back]).map_err(|_| "load")?;
    let t3 = instructions();
    say!(
        "checkpoint {} B: save {} instr, load {} instr (seq {first} then {second})",
        params.len(),
        t1 - t0,
        t3 - t2
    );
    if seq != Some(second) || second != first.wrapping_add(1) || back != params {
        return Err("restored checkpoint differs");
    }
    Ok(())
}

/// Checks the instruction clock against a loop of known length (2 instructions per iteration):
/// if QEMU was started without `-icount shift=0` the figures would be host time, not counts.
fn clock_is_instruction_exact() -> bool {
    let n: u32 = 500_000;
    let t0 = instructions();
    unsafe {
        core::arch::asm!("1:", "subs {0}, #1", "bne 1b", inout(reg) n => _, options(nomem, nostack));
    }
    let dt = instructions() - t0;
    let want = 2 * n as u64;
    say!("clock check: {dt} instructions counted for a {want}-instruction loop");
    dt >= want && dt <= want + 200
}

#[entry]
fn main() -> ! {
    stack_paint();
    clock_start();
    say!("tinytrain tt-mcu on mps2-an386 (Cortex-M4F), instructions counted under -icount shift=0");
    let mut ok = clock_is_instruction_exact();
    match kernels::run() {
        Ok(c) => {
            if c.step == 0 || c.macs == 0 {
                say!("FAIL: clock did not advance");
                ok = false;
            }
        }
        Err(e) => {
            say!("FAIL: kernel error: {e}");
            ok = false;
        }
    }
    if let Err(e) = checkpoint_round_trip() {
        say!("FAIL: checkpoint: {e}");
        ok = false;
    }
    let (peak, reserve) = (stack_peak(), stack_reserve());
    say!("stack peak {peak} B of {reserve} B reserved");
    if peak > reserve {
        say!("FAIL: stack exceeds its reservation");
        ok = false;
    }
    say!("{}", if ok { "PASS" } else { "FAIL" });
    exit(if ok { 0 } else { 1 })
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    say!("panic: {info}");
    exit(101)
}
