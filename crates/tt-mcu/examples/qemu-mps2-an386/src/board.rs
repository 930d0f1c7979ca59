//! What the firmware needs from the mps2-an386 machine: an instruction clock, a console and an
//! exit status (semihosting), and a measure of the stack.
use core::fmt::Write;
use core::ptr::{read_volatile, write_volatile};

/// CMSDK APB timer 0: a 32-bit down-counter at the 25 MHz peripheral clock. Under
/// `-icount shift=0` QEMU's virtual clock advances 1 ns per instruction, so one tick is exactly
/// 40 instructions, the same from run to run.
const TIMER0: usize = 0x4000_0000;
pub const INSTRUCTIONS_PER_TICK: u64 = 40;

pub fn clock_start() {
    unsafe {
        write_volatile((TIMER0 + 0x0) as *mut u32, 0);
        write_volatile((TIMER0 + 0x8) as *mut u32, u32::MAX);
        write_volatile((TIMER0 + 0x4) as *mut u32, u32::MAX);
        write_volatile((TIMER0 + 0x0) as *mut u32, 1);
    }
}

/// Instructions retired since [`clock_start`] (to 40-instruction resolution; wraps after
/// 171 G instructions).
pub fn instructions() -> u64 {
    let v = unsafe { read_volatile((TIMER0 + 0x4) as *const u32) };
    (u32::MAX - v) as u64 * INSTRUCTIONS_PER_TICK
}

extern "C" {
    static __sheap: u32;
    static _stack_start: u32;
    static _stack_reserve: u32;
}

const PAINT: u32 = 0x5AC3_A55A;

/// Fills the free SRAM between the statics and the current stack pointer with a pattern, so
/// [`stack_peak`] can tell how deep the stack ever went.
pub fn stack_paint() {
    let lo = core::ptr::addr_of!(__sheap) as usize;
    // Leave the live frames (and some margin below them) alone.
    let sp = cortex_m::register::msp::read() as usize - 64;
    let mut a = lo;
    while a < sp {
        unsafe { write_volatile(a as *mut u32, PAINT) };
        a += 4;
    }
}

/// Deepest stack use since [`stack_paint`], in bytes.
pub fn stack_peak() -> usize {
    let lo = core::ptr::addr_of!(__sheap) as usize;
    let top = core::ptr::addr_of!(_stack_start) as usize;
    let mut a = lo;
    while a < top && unsafe { read_volatile(a as *const u32) } == PAINT {
        a += 4;
    }
    top - a
}

/// The stack the linker script reserves (`_stack_reserve` in memory.x, an absolute symbol).
pub fn stack_reserve() -> usize {
    core::ptr::addr_of!(_stack_reserve) as usize
}

/// A `core::fmt` sink on the semihosting console; output goes to QEMU's stdout.
pub struct Console;

impl Write for Console {
    fn write_str(&mut self, s: &str) -> core::fmt::Result {
        cortex_m_semihosting::hio::hstdout()
            .map_err(|_| core::fmt::Error)?
            .write_all(s.as_bytes())
            .map_err(|_| core::fmt::Error)
    }
}

#[macro_export]
macro_rules! say {
    ($($t:tt)*) => {{
        use core::fmt::Write as _;
        let _ = writeln!($crate::board::Console, $($t)*);
    }};
}

/// Ends QEMU with `code` as its exit status (SYS_EXIT_EXTENDED, ADP_Stopped_ApplicationExit).
pub fn exit(code: u32) -> ! {
    let block = [0x20026u32, code];
    loop {
        unsafe {
            cortex_m_semihosting::syscall(0x20, &block);
        }
    }
}
