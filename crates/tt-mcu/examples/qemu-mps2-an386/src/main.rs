//! tinytrain on a Cortex-M4F (QEMU mps2-an386) inside the STM32F746 budget (256 KB SRAM, 1 MB
//! flash): trains the bundled plan on its shipped samples with tt-core's executor, checks every
//! step's loss against the host run of the same plan (bit for bit), checkpoints the learned
//! state through the A/B NOR-flash store and restores it into a fresh trainer, and exits 0 only
//! if accuracy rose and every check passed. Cost is counted in instructions (-icount shift=0).
#![no_std]
#![no_main]

#[macro_use]
mod board;
mod flash;

use cortex_m_rt::entry;
use tt_mcu::checkpoint::Checkpoints;
use tt_mcu::trainer::{Arena, Trainer};

use board::{clock_start, exit, instructions, stack_paint, stack_peak, stack_reserve};
use flash::MemFlash;

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
static HOST_UPDATE: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/host_update.bin"));

/// All of training's SRAM: the plan's arena, sized by the export. In .bss, so the linker
/// figure counts it and a plan that does not fit fails the link.
static mut ARENA: Arena<ARENA_BYTES> = Arena::new();

fn as_i8(b: &[u8]) -> &[i8] {
    // SAFETY: i8 and u8 have the same size, alignment and every bit pattern is valid.
    unsafe { core::slice::from_raw_parts(b.as_ptr() as *const i8, b.len()) }
}

fn host_loss(i: usize) -> Option<u32> {
    let b = HOST_LOSSES.0.get(4 * i..4 * i + 4)?;
    Some(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
}

/// Prints bytes as `update-hex <hex>` lines of 64 bytes, the form scripts/mcu-qemu.sh turns back
/// into a file: the semihosting console stands in for the radio a device would send them over.
struct HexLines {
    buf: [u8; 64],
    n: usize,
}

impl HexLines {
    fn push(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.buf[self.n] = b;
            self.n += 1;
            if self.n == self.buf.len() {
                self.flush();
            }
        }
    }

    fn flush(&mut self) {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let mut hex = [0u8; 128];
        for (i, &b) in self.buf[..self.n].iter().enumerate() {
            hex[2 * i] = HEX[(b >> 4) as usize];
            hex[2 * i + 1] = HEX[(b & 15) as usize];
        }
        if let Ok(line) = core::str::from_utf8(&hex[..2 * self.n]) {
            say!("update-hex {line}");
        }
        self.n = 0;
    }
}

fn accuracy(t: &mut Trainer) -> Result<usize, tt_core::Error> {
    t.count_correct(as_i8(TEST_X), TEST_Y)
}

fn train(arena: &mut [u8]) -> Result<bool, tt_core::Error> {
    let mut ok = true;
    let t0 = instructions();
    let mut t = Trainer::new(PLAN, &PARAMS.0, &mut *arena)?;
    // the bundle's rate (lr.bin), which the host reference run trains with too
    t.set_lr(f32::from_bits(LR_BITS))?;
    let t_init = instructions() - t0;
    say!(
        "plan {} B, frozen params {} B (flash); arena {} B (SRAM), learned state {} B; init {} instr",
        PLAN.len(),
        PARAMS.0.len(),
        ARENA_BYTES,
        t.state().len(),
        t_init
    );

    let t0 = instructions();
    let before = accuracy(&mut t)?;
    let t_pred = (instructions() - t0) / N_TEST as u64;
    say!("accuracy before: {before}/{N_TEST} (host {HOST_CORRECT_BEFORE}); predict {t_pred} instr/sample");
    ok &= before == HOST_CORRECT_BEFORE;

    // The samples are in flash: each is read where it lies (a plan that streams its input
    // never copies the image either), so no 48 KB sample buffer sits on the stack. A sensor
    // would fill one buffer through a `tt_mcu::source::SampleSource` instead.
    let xs = as_i8(TRAIN_X);
    let mut step = 0usize;
    let mut mismatches = 0usize;
    let mut trajectory = tt_core::crc::Crc32::new();
    let t_train = instructions();
    for epoch in 0..EPOCHS {
        let mut sum = 0.0f32;
        for (x, &label) in xs.chunks_exact(INPUT_LEN).zip(TRAIN_Y).take(N_TRAIN) {
            let loss = t.step(x, label as u32)?;
            trajectory.update(&loss.to_bits().to_le_bytes());
            if host_loss(step) != Some(loss.to_bits()) {
                mismatches += 1;
            }
            sum += loss;
            step += 1;
        }
        say!("epoch {}: mean loss {:.6}", epoch + 1, sum / N_TRAIN as f32);
    }
    let spent = instructions() - t_train;
    let per = spent / step.max(1) as u64;
    say!("training: {step} steps, {per} instructions per step ({:.1} ms at 216 MHz if 1 instr/cycle)", per as f32 / 216_000.0);
    say!(
        "loss trajectory vs host run: {} of {step} steps differ (bit-exact expected)",
        mismatches
    );
    // A host program (the Python Trainer, say) compares its own run with this one line.
    say!(
        "loss trajectory crc32 {:08x} over {step} steps",
        trajectory.finish()
    );
    ok &= mismatches == 0 && step == HOST_LOSSES.0.len() / 4;

    let after = accuracy(&mut t)?;
    say!("accuracy after: {after}/{N_TEST} (host {HOST_CORRECT_AFTER})");
    ok &= after == HOST_CORRECT_AFTER;
    if CHECK_LEARNING && after <= before {
        say!("FAIL: accuracy did not rise");
        ok = false;
    }

    // Checkpoint the learned state, then come back as after a reset.
    // Two slots, each the learned state plus the checkpoint's 64-byte header, in whole sectors.
    let sector = <MemFlash as embedded_storage::nor_flash::NorFlash>::ERASE_SIZE;
    let slot = (t.state().len() + 64).div_ceil(sector) * sector;
    let mut store = Checkpoints::new(MemFlash, 0, slot as u32, t.tag()).map_err(|_| {
        tt_core::Error::InvalidParameter {
            what: "checkpoint layout",
        }
    })?;
    let t0 = instructions();
    let seq = t.save(&mut store);
    let t_save = instructions() - t0;
    let mut t = Trainer::new(PLAN, &PARAMS.0, &mut *arena)?;
    // the bundle's rate (lr.bin), which the host reference run trains with too
    t.set_lr(f32::from_bits(LR_BITS))?;
    let fresh = accuracy(&mut t)?;
    let t0 = instructions();
    let restored = t.restore(&mut store);
    let t_load = instructions() - t0;
    let again = accuracy(&mut t)?;
    match (seq, restored) {
        (Ok(s), Ok(Some(r))) if s == r => say!(
            "checkpoint {} B: saved as #{s} in {t_save} instr, restored in {t_load} instr; accuracy fresh {fresh}, restored {again}/{N_TEST}",
            t.state().len()
        ),
        _ => {
            say!("FAIL: checkpoint save/restore");
            ok = false;
        }
    }
    ok &= again == after;

    // The fleet update blob: streamed out as it is made (no buffer), byte for byte the host
    // run's; and the host run's blob applied into a fresh trainer gives the trained accuracy.
    let mut hex = HexLines { buf: [0; 64], n: 0 };
    let mut sent = tt_core::crc::Crc32::new();
    let t0 = instructions();
    let n = tt_core::update::write_to(t.plan(), t.state(), step as u32, |b| {
        sent.update(b);
        hex.push(b);
        Ok(())
    })?;
    let t_blob = instructions() - t0;
    hex.flush();
    let same = n == HOST_UPDATE.len() && sent.finish() == tt_core::crc::crc32(HOST_UPDATE);
    say!(
        "update blob {n} B (sample count {step}, crc32 {:08x}): streamed in {t_blob} instr (with the console); equal to the host run's: {}",
        sent.finish(),
        if same { "yes" } else { "NO" }
    );
    ok &= same;
    let mut t = Trainer::new(PLAN, &PARAMS.0, &mut *arena)?;
    // the bundle's rate (lr.bin), which the host reference run trains with too
    t.set_lr(f32::from_bits(LR_BITS))?;
    let t0 = instructions();
    let count = t.apply_update(HOST_UPDATE)?;
    let t_apply = instructions() - t0;
    let via = accuracy(&mut t)?;
    say!("host update blob applied to a fresh trainer in {t_apply} instr (sample count {count}): accuracy {via}/{N_TEST}");
    ok &= via == after && count as usize == step;
    Ok(ok)
}

#[entry]
fn main() -> ! {
    stack_paint();
    clock_start();
    say!("tinytrain tt-mcu on mps2-an386 (Cortex-M4F), instructions counted under -icount shift=0");
    // SAFETY: the only reference to ARENA.
    let arena = unsafe { &mut *core::ptr::addr_of_mut!(ARENA.0) };
    let mut ok = match train(arena) {
        Ok(ok) => ok,
        Err(e) => {
            say!("FAIL: {e}");
            false
        }
    };
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
