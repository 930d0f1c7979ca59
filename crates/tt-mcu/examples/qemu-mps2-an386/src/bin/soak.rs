//! Soak on the device image (QEMU mps2-an386): the bundled plan trained for `STEPS` steps with a
//! checkpoint (learned state + step count) every `EVERY` steps in the NOR-flash window, first
//! without interruption, then again with power cut at chosen points inside the same QEMU run:
//! while training steps run and at erase/program operations of checkpoint writes (the
//! interrupted word or sector left untouched or torn). A cut loses the SRAM: the arena is
//! overwritten with garbage, the trainer is built again from the plan in flash, the newest
//! checkpoint is recovered and the samples since it are replayed. Required, bit for bit: every
//! step's loss equal to the uninterrupted run's, every recovered checkpoint the newest committed
//! one (or the interrupted one only when the cut came at its commit record), the final learned
//! state (CRC) and test accuracy equal, and the arena high-water mark within the plan's arena.
//! The host soak (crates/tt-mcu/tests/soak.rs) runs the long version. Exits 0 on PASS.
#![no_std]
#![no_main]

#[path = "../board.rs"]
#[macro_use]
mod board;
#[path = "../flash.rs"]
mod flash;

use cortex_m_rt::entry;
use embedded_storage::nor_flash::{
    ErrorType, NorFlash, NorFlashError, NorFlashErrorKind, ReadNorFlash,
};
use tt_core::crc::crc32;
use tt_mcu::checkpoint::{CheckpointError, Checkpoints};
use tt_mcu::trainer::{Arena, Trainer};

use board::{clock_start, exit, instructions, stack_paint, stack_peak, stack_reserve};
use flash::{MemFlash, MemFlashError};

// The main firmware's constants; the soak needs only some of them.
#[allow(dead_code)]
mod bundle {
    include!(concat!(env!("OUT_DIR"), "/bundle.rs"));
}
use bundle::*;

const STEPS: usize = 2_000;
const EVERY: usize = 250;
const CHECKPOINTS: usize = STEPS / EVERY;

/// Which operation of a checkpoint write power goes at: resolved against the number of
/// operations a whole write takes, measured by the uninterrupted run.
#[derive(Clone, Copy, PartialEq, Eq)]
enum At {
    /// The slot's sector erase.
    Erase,
    /// A payload word half way through.
    Middle,
    /// The commit record's word (the last one programmed).
    Commit,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Cut {
    /// While training step `n` runs: its result never reaches flash.
    Step(usize),
    /// At an operation of the checkpoint after step `after`; `tear` 0 leaves it untouched,
    /// otherwise it seeds the random bits the torn word/sector gets.
    Save { after: usize, at: At, tear: u32 },
}

const CUTS: [Cut; 7] = [
    Cut::Step(137),
    Cut::Save {
        after: 500,
        at: At::Erase,
        tear: 0x9E37_79B9,
    },
    Cut::Step(811),
    Cut::Save {
        after: 1000,
        at: At::Middle,
        tear: 0,
    },
    Cut::Save {
        after: 1250,
        at: At::Middle,
        tear: 0xDEAD_BEEF,
    },
    Cut::Save {
        after: 1500,
        at: At::Commit,
        tear: 0x1234_5679,
    },
    Cut::Step(1999),
];

#[repr(C, align(4))]
struct Aligned<T: ?Sized>(T);

static PLAN: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/plan.bin"));
static PARAMS: &Aligned<[u8]> = &Aligned(*include_bytes!(concat!(env!("OUT_DIR"), "/params.bin")));
static TRAIN_X: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/train_x.bin"));
static TRAIN_Y: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/train_y.bin"));
static TEST_X: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/test_x.bin"));
static TEST_Y: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/test_y.bin"));

static mut ARENA: Arena<ARENA_BYTES> = Arena::new();

fn as_i8(b: &[u8]) -> &[i8] {
    // SAFETY: i8 and u8 have the same size, alignment and every bit pattern is valid.
    unsafe { core::slice::from_raw_parts(b.as_ptr() as *const i8, b.len()) }
}

fn xorshift(s: &mut u32) -> u32 {
    *s ^= *s << 13;
    *s ^= *s >> 17;
    *s ^= *s << 5;
    *s
}

fn fail(msg: core::fmt::Arguments) -> ! {
    say!("FAIL: {msg}");
    exit(1)
}

#[derive(Debug, Clone, Copy)]
enum CutError {
    Flash(MemFlashError),
    PowerLost,
}

impl NorFlashError for CutError {
    fn kind(&self) -> NorFlashErrorKind {
        match self {
            CutError::Flash(e) => e.kind(),
            CutError::PowerLost => NorFlashErrorKind::Other,
        }
    }
}

/// The flash window with a power switch: every programmed word and erased sector is one
/// operation; at the armed one the power goes, leaving it untouched or torn, and every later
/// call fails until the reboot.
struct CutFlash {
    ops: usize,
    cut: Option<(usize, u32)>,
    dead: bool,
}

impl CutFlash {
    fn op(&mut self) -> Result<Option<u32>, CutError> {
        if self.dead {
            return Err(CutError::PowerLost);
        }
        let now = self.ops;
        self.ops += 1;
        match self.cut {
            Some((at, tear)) if at == now => {
                self.dead = true;
                Ok(Some(tear))
            }
            _ => Ok(None),
        }
    }

    /// Power back: the flash keeps its contents; operations count from zero again.
    fn reboot(self) -> Self {
        CutFlash {
            ops: 0,
            cut: None,
            dead: false,
        }
    }
}

impl ErrorType for CutFlash {
    type Error = CutError;
}

impl ReadNorFlash for CutFlash {
    const READ_SIZE: usize = MemFlash::READ_SIZE;

    fn read(&mut self, offset: u32, bytes: &mut [u8]) -> Result<(), CutError> {
        if self.dead {
            return Err(CutError::PowerLost);
        }
        MemFlash.read(offset, bytes).map_err(CutError::Flash)
    }

    fn capacity(&self) -> usize {
        MemFlash.capacity()
    }
}

impl NorFlash for CutFlash {
    const WRITE_SIZE: usize = MemFlash::WRITE_SIZE;
    const ERASE_SIZE: usize = MemFlash::ERASE_SIZE;

    fn erase(&mut self, from: u32, to: u32) -> Result<(), CutError> {
        let e = Self::ERASE_SIZE as u32;
        if from % e != 0 || to % e != 0 || from > to {
            return Err(CutError::Flash(MemFlashError::NotAligned));
        }
        for s in (from..to).step_by(Self::ERASE_SIZE) {
            match self.op()? {
                None => MemFlash.erase(s, s + e).map_err(CutError::Flash)?,
                Some(mut tear) => {
                    if tear != 0 {
                        // A sector cut while erasing holds anything: erased, then random words
                        // over a random part of it.
                        MemFlash.erase(s, s + e).map_err(CutError::Flash)?;
                        let words = xorshift(&mut tear) % (e / 4);
                        for k in 0..words {
                            let w = xorshift(&mut tear).to_le_bytes();
                            MemFlash.write(s + 4 * k, &w).map_err(CutError::Flash)?;
                        }
                    }
                    return Err(CutError::PowerLost);
                }
            }
        }
        Ok(())
    }

    fn write(&mut self, offset: u32, bytes: &[u8]) -> Result<(), CutError> {
        if offset % 4 != 0 || bytes.len() % 4 != 0 {
            return Err(CutError::Flash(MemFlashError::NotAligned));
        }
        for (i, word) in bytes.chunks_exact(4).enumerate() {
            let at = offset + 4 * i as u32;
            match self.op()? {
                None => MemFlash.write(at, word).map_err(CutError::Flash)?,
                Some(mut tear) => {
                    if tear != 0 {
                        // Programming only clears bits: a torn word has some of its zeros.
                        let w = u32::from_le_bytes([word[0], word[1], word[2], word[3]]);
                        let torn = (w | xorshift(&mut tear)).to_le_bytes();
                        MemFlash.write(at, &torn).map_err(CutError::Flash)?;
                    }
                    return Err(CutError::PowerLost);
                }
            }
        }
        Ok(())
    }
}

/// What the uninterrupted run records and the interrupted one must reproduce.
struct Reference {
    losses: [u32; STEPS],
    checkpoints: [u32; CHECKPOINTS],
    save_ops: usize,
}

struct Outcome {
    final_crc: u32,
    correct: usize,
    boots: usize,
    steps_run: usize,
    high_water: usize,
}

fn slot_bytes(state: usize) -> u32 {
    // The state, the step counter and the checkpoint's 64-byte header, in whole sectors.
    (state + 8 + 64).div_ceil(MemFlash::ERASE_SIZE) as u32 * MemFlash::ERASE_SIZE as u32
}

/// Trains `STEPS` steps (sample `i % N_TRAIN` at step `i`) with power cut at each of `cuts`
/// the first time the device reaches it. Without cuts it fills `r`; with cuts it checks
/// against it.
fn run(arena: &mut [u8], cuts: &[Cut], r: &mut Reference) -> Outcome {
    let record = cuts.is_empty();
    let mut pending = [None; CUTS.len()];
    for (p, c) in pending.iter_mut().zip(cuts) {
        *p = Some(*c);
    }
    let mut flash = CutFlash {
        ops: 0,
        cut: None,
        dead: false,
    };
    // A fresh device: both slots erased.
    let state_len = match Trainer::new(PLAN, &PARAMS.0, &mut *arena) {
        Ok(t) => t.state().len(),
        Err(e) => fail(format_args!("trainer: {e}")),
    };
    let slot = slot_bytes(state_len);
    if flash.erase(0, 2 * slot).is_err() {
        fail(format_args!("erasing the checkpoint slots"));
    }
    let mut out = Outcome {
        final_crc: 0,
        correct: 0,
        boots: 0,
        steps_run: 0,
        high_water: 0,
    };
    let mut committed: Option<usize> = None;
    let mut in_flight: Option<usize> = None;
    let mut garbage = 0x2545_F491u32;
    'boot: loop {
        out.boots += 1;
        // After a power cut the SRAM holds garbage: recovery must not depend on it.
        for b in arena.iter_mut() {
            *b = xorshift(&mut garbage) as u8;
        }
        let mut t = match Trainer::new(PLAN, &PARAMS.0, &mut *arena) {
            Ok(t) => t,
            Err(e) => fail(format_args!("boot {}: trainer: {e}", out.boots)),
        };
        let tag = t.tag();
        let mut store = match Checkpoints::new(flash, 0, slot, tag) {
            Ok(s) => s,
            Err(_) => fail(format_args!("checkpoint layout")),
        };
        let mut counter = [0u8; 8];
        let restored = match store.load(&mut [t.executor().state_mut(), &mut counter]) {
            Ok(r) => r,
            Err(_) => fail(format_args!("boot {}: reading checkpoints", out.boots)),
        };
        let mut step = match restored {
            Some(_) => u64::from_le_bytes(counter) as usize,
            None => 0,
        };
        let got = restored.map(|_| step);
        if !(got == committed || (in_flight.is_some() && got == in_flight)) {
            fail(format_args!(
                "boot {}: recovered the checkpoint after step {got:?}, newest complete {committed:?}",
                out.boots
            ));
        }
        if let Some(s) = got {
            let k = s / EVERY - 1;
            if s % EVERY != 0 || k >= CHECKPOINTS || crc32(t.state()) != r.checkpoints[k] {
                fail(format_args!(
                    "boot {}: recovered state after step {s}",
                    out.boots
                ));
            }
        }
        committed = got;
        in_flight = None;

        while step < STEPS {
            let i = step % N_TRAIN;
            let x = as_i8(&TRAIN_X[i * INPUT_LEN..(i + 1) * INPUT_LEN]);
            let loss = match t.step(x, TRAIN_Y[i] as u32) {
                Ok(l) => l.to_bits(),
                Err(e) => fail(format_args!("step {step}: {e}")),
            };
            out.steps_run += 1;
            let hw = t.executor().high_water();
            if hw > ARENA_BYTES {
                fail(format_args!("step {step}: high water {hw} > {ARENA_BYTES}"));
            }
            out.high_water = out.high_water.max(hw);
            if let Some(p) = pending.iter_mut().find(|p| **p == Some(Cut::Step(step))) {
                *p = None;
                flash = store.into_inner().reboot();
                continue 'boot;
            }
            if record {
                r.losses[step] = loss;
            } else if r.losses[step] != loss {
                fail(format_args!(
                    "step {step}: loss differs from the uninterrupted run"
                ));
            }
            step += 1;
            if step % EVERY == 0 {
                let mut f = store.into_inner().reboot();
                let mut cut_op = None;
                let slot_cut = pending
                    .iter_mut()
                    .find(|p| matches!(p, Some(Cut::Save { after, .. }) if *after == step));
                if let Some(p) = slot_cut {
                    if let Some(Cut::Save { at, tear, .. }) = p.take() {
                        let op = match at {
                            At::Erase => 0,
                            At::Middle => r.save_ops / 2,
                            At::Commit => r.save_ops - 1,
                        };
                        f.cut = Some((op, tear));
                        cut_op = Some(op);
                    }
                }
                store = match Checkpoints::new(f, 0, slot, tag) {
                    Ok(s) => s,
                    Err(_) => fail(format_args!("checkpoint layout")),
                };
                let res = store.save(&[t.state(), &(step as u64).to_le_bytes()]);
                let k = step / EVERY - 1;
                match (res, cut_op) {
                    (Ok(_), None) => {
                        if record {
                            r.checkpoints[k] = crc32(t.state());
                            let f = store.into_inner();
                            r.save_ops = r.save_ops.max(f.ops);
                            store = match Checkpoints::new(f, 0, slot, tag) {
                                Ok(s) => s,
                                Err(_) => fail(format_args!("checkpoint layout")),
                            };
                        } else if r.checkpoints[k] != crc32(t.state()) {
                            fail(format_args!("checkpoint after step {step} differs"));
                        }
                        committed = Some(step);
                    }
                    (Err(CheckpointError::Flash(CutError::PowerLost)), Some(op)) => {
                        // Before the commit record's word nothing new may survive.
                        if op + 1 >= r.save_ops {
                            in_flight = Some(step);
                        }
                        flash = store.into_inner().reboot();
                        continue 'boot;
                    }
                    _ => fail(format_args!("checkpoint after step {step}")),
                }
            }
        }
        if pending.iter().any(|p| p.is_some()) {
            fail(format_args!("a cut was never reached"));
        }
        out.final_crc = crc32(t.state());
        out.correct = match t.count_correct(as_i8(TEST_X), TEST_Y) {
            Ok(c) => c,
            Err(e) => fail(format_args!("accuracy: {e}")),
        };
        return out;
    }
}

static mut REFERENCE: Reference = Reference {
    losses: [0; STEPS],
    checkpoints: [0; CHECKPOINTS],
    save_ops: 0,
};

#[entry]
fn main() -> ! {
    stack_paint();
    clock_start();
    say!(
        "soak on mps2-an386: {STEPS} steps, checkpoint every {EVERY}, {} power cuts in one run",
        CUTS.len()
    );
    // SAFETY: the only references to ARENA and REFERENCE.
    let arena = unsafe { &mut *core::ptr::addr_of_mut!(ARENA.0) };
    let r = unsafe { &mut *core::ptr::addr_of_mut!(REFERENCE) };
    let t0 = instructions();
    let a = run(arena, &[], r);
    let per = (instructions() - t0) / a.steps_run as u64;
    if a.boots != 1 || r.save_ops < 4 {
        fail(format_args!("the uninterrupted run"));
    }
    let b = run(arena, &CUTS, r);
    if b.boots != CUTS.len() + 1 {
        fail(format_args!("{} boots for {} cuts", b.boots, CUTS.len()));
    }
    if b.final_crc != a.final_crc || b.correct != a.correct {
        fail(format_args!(
            "final state crc32 {:08x} vs {:08x}, accuracy {} vs {}",
            b.final_crc, a.final_crc, b.correct, a.correct
        ));
    }
    say!(
        "soak: {STEPS} steps, {} cuts ({} during steps, {} during checkpoint writes of {} flash ops), {} boots, {} steps run ({} replayed); every loss and checkpoint bit-exact, final state crc32 {:08x} both runs, test accuracy {}/{N_TEST} both runs, arena high water {} <= {ARENA_BYTES} B; {per} instr/step",
        CUTS.len(),
        CUTS.iter().filter(|c| matches!(c, Cut::Step(_))).count(),
        CUTS.iter().filter(|c| matches!(c, Cut::Save { .. })).count(),
        r.save_ops,
        b.boots,
        b.steps_run,
        b.steps_run - STEPS,
        b.final_crc,
        b.correct,
        b.high_water.max(a.high_water),
    );
    let (peak, reserve) = (stack_peak(), stack_reserve());
    say!("stack peak {peak} B of {reserve} B reserved");
    if peak > reserve {
        fail(format_args!("stack exceeds its reservation"));
    }
    say!("PASS");
    exit(0)
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    say!("panic: {info}");
    exit(101)
}
