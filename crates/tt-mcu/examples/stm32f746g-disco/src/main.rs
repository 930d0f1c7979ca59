//! tinytrain on the STM32F746G-DISCO: the QEMU firmware's loop on real hardware. Restores the
//! newest checkpoint from flash if there is one, trains the bundled plan on its shipped samples,
//! compares every loss with the host run (bit for bit), reports accuracy and cycles per step on
//! RTT (`cargo embed --release`), checkpoints the learned state to flash (power-loss safe), and
//! lights LD1 (PI1) when every check passed.
#![no_std]
#![no_main]

mod flash;

use cortex_m_rt::entry;
use rtt_target::{rprintln, rtt_init_print};
use stm32f7xx_hal::{
    flash::Flash,
    pac,
    prelude::*,
    rcc::{HSEClock, HSEClockMode},
};
use tt_mcu::checkpoint::Checkpoints;
use tt_mcu::source::{SampleSource, SliceSource};
use tt_mcu::trainer::{Arena, Trainer};

use flash::BoardFlash;

mod bundle {
    include!(concat!(env!("OUT_DIR"), "/bundle.rs"));
}
use bundle::*;

/// The executor reads parameters in place, as i32/f32: they must be 4-byte aligned in flash.
#[repr(C, align(4))]
struct Aligned<T: ?Sized>(T);

static PLAN: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/plan.bin"));
static PARAMS: &Aligned<[u8]> = &Aligned(*include_bytes!(concat!(env!("OUT_DIR"), "/params.bin")));
static TRAIN_X: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/train_x.bin"));
static TRAIN_Y: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/train_y.bin"));
static TEST_X: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/test_x.bin"));
static TEST_Y: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/test_y.bin"));
static HOST_LOSSES: &Aligned<[u8]> = &Aligned(*include_bytes!(concat!(
    env!("OUT_DIR"),
    "/host_losses.bin"
)));

static mut ARENA: Arena<ARENA_BYTES> = Arena::new();

fn as_i8(b: &[u8]) -> &[i8] {
    // SAFETY: i8 and u8 have the same size, alignment and every bit pattern is valid.
    unsafe { core::slice::from_raw_parts(b.as_ptr() as *const i8, b.len()) }
}

fn host_loss(i: usize) -> Option<u32> {
    let b = HOST_LOSSES.0.get(4 * i..4 * i + 4)?;
    Some(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
}

fn run(
    arena: &mut [u8],
    store: &mut Checkpoints<BoardFlash>,
    cycles: impl Fn() -> u32,
) -> Result<bool, tt_core::Error> {
    let mut ok = true;
    let mut t = Trainer::new(PLAN, &PARAMS.0, arena)?;
    // the bundle's rate (lr.bin), which the host reference run trains with too
    t.set_lr(f32::from_bits(LR_BITS))?;
    let fresh = match t.restore(store) {
        Ok(Some(seq)) => {
            rprintln!("restored checkpoint #{}", seq);
            false
        }
        Ok(None) => {
            rprintln!("no checkpoint yet: starting from the exported weights");
            true
        }
        Err(e) => {
            rprintln!(
                "checkpoint read failed ({:?}): starting from the exported weights",
                e
            );
            true
        }
    };
    let before = t.count_correct(as_i8(TEST_X), TEST_Y)?;
    rprintln!("accuracy before: {}/{}", before, N_TEST);

    let mut src = SliceSource::new(as_i8(TRAIN_X), TRAIN_Y, INPUT_LEN)?;
    let mut x = [0i8; INPUT_LEN];
    let mut step = 0usize;
    let mut mismatches = 0usize;
    let c0 = cycles();
    for epoch in 0..EPOCHS {
        let mut sum = 0.0f32;
        for _ in 0..N_TRAIN {
            let label = src.next_sample(&mut x)?.unwrap_or(0);
            let loss = t.step(&x, label)?;
            mismatches += (host_loss(step) != Some(loss.to_bits())) as usize;
            sum += loss;
            step += 1;
        }
        rprintln!("epoch {}: mean loss {}", epoch + 1, sum / N_TRAIN as f32);
    }
    let per = cycles().wrapping_sub(c0) / step.max(1) as u32;
    rprintln!("{} steps, {} cycles per step", step, per);
    let after = t.count_correct(as_i8(TEST_X), TEST_Y)?;
    rprintln!("accuracy after: {}/{}", after, N_TEST);
    // After a restored checkpoint the trajectory continues from there, not from the host run.
    if fresh {
        rprintln!(
            "loss trajectory vs host run: {} of {} steps differ",
            mismatches,
            step
        );
        ok &= mismatches == 0 && before == HOST_CORRECT_BEFORE && after == HOST_CORRECT_AFTER;
    }
    ok &= after > before || after == N_TEST;
    match t.save(store) {
        Ok(seq) => rprintln!("checkpoint #{} written", seq),
        Err(e) => {
            rprintln!("checkpoint failed: {:?}", e);
            ok = false;
        }
    }
    Ok(ok)
}

#[entry]
fn main() -> ! {
    rtt_init_print!();
    let dp = pac::Peripherals::take().unwrap();
    let mut cp = cortex_m::Peripherals::take().unwrap();
    let rcc = dp.RCC.constrain();
    // The DISCO's 25 MHz HSE comes from the ST-LINK's MCO: bypass mode.
    let clocks = rcc
        .cfgr
        .hse(HSEClock::new(25.MHz(), HSEClockMode::Bypass))
        .sysclk(216.MHz())
        .freeze();
    rprintln!(
        "tinytrain tt-mcu on STM32F746G-DISCO at {} Hz",
        clocks.sysclk().raw()
    );
    cp.DCB.enable_trace();
    cp.DWT.enable_cycle_counter();
    cp.SCB.enable_icache();

    let gpioi = dp.GPIOI.split();
    let mut led = gpioi.pi1.into_push_pull_output();

    let ok = match Checkpoints::new(BoardFlash(Flash::new(dp.FLASH)), 0, 256 * 1024, {
        tt_mcu::trainer::plan_tag(PLAN).unwrap_or(0)
    }) {
        Ok(mut store) => {
            // SAFETY: the only reference to ARENA.
            let arena = unsafe { &mut (*core::ptr::addr_of_mut!(ARENA)).0 };
            match run(arena, &mut store, cortex_m::peripheral::DWT::cycle_count) {
                Ok(ok) => ok,
                Err(e) => {
                    rprintln!("error: {}", e);
                    false
                }
            }
        }
        Err(e) => {
            rprintln!("checkpoint layout: {:?}", e);
            false
        }
    };
    rprintln!("{}", if ok { "PASS" } else { "FAIL" });
    if ok {
        led.set_high();
    }
    loop {
        cortex_m::asm::wfi();
    }
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    rprintln!("panic: {}", info);
    loop {
        cortex_m::asm::bkpt();
    }
}
