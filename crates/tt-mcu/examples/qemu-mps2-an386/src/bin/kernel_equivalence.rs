//! The DSP kernels against their portable twins on the Cortex-M4F (QEMU mps2-an386): every
//! dispatcher with a DSP path (`tt_core::ops::conv::conv2d_forward`, ...) must equal
//! `tt_core::ops::portable`'s kernel of the same name bit for bit on random geometries and
//! quantizations. Exits 0 when all agree, 1 on the first mismatch (named with its case), 101 on
//! a panic. The cases are tt-core's own equivalence suite, which its host test also runs.
#![no_std]
#![no_main]

#[path = "../board.rs"]
#[macro_use]
mod board;

#[path = "../../../../../tt-core/tests/kernels_equivalence/cases.rs"]
mod cases;

use board::{clock_start, exit, instructions, stack_paint, stack_peak, stack_reserve};
use cortex_m_rt::entry;

/// In .bss, so the linker's SRAM figure includes them.
static mut BUF: cases::Buffers = cases::Buffers::new();

#[entry]
fn main() -> ! {
    stack_paint();
    clock_start();
    // SAFETY: single-threaded firmware, the only reference to BUF.
    let b = unsafe { &mut *core::ptr::addr_of_mut!(BUF) };
    let t0 = instructions();
    let result = cases::run_all(b, 7, |kernel, n| {
        say!("  {kernel:<34} equals its portable twin on {n} cases");
    });
    match result {
        Ok(()) => {
            say!(
                "kernel equivalence: PASS ({} M instructions); stack peak {} B of {} B reserved",
                (instructions() - t0) / 1_000_000,
                stack_peak(),
                stack_reserve()
            );
            exit(if stack_peak() <= stack_reserve() {
                0
            } else {
                1
            })
        }
        Err(e) => {
            say!("FAIL: {e}");
            exit(1)
        }
    }
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    say!("panic: {info}");
    exit(101)
}
