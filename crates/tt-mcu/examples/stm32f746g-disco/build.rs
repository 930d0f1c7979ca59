//! Links with cortex-m-rt's link.x and memory.x (for this binary only: as a rustflag it would
//! change the hash of every dependency, core included), and prepares what the firmware trains:
//! the plan bundle (`TT_MCU_BUNDLE=dir` as written by the export, else tt-mcu's demo bundle) and
//! the host reference run of the same plan on the same samples, which the firmware must
//! reproduce bit for bit.
use std::{env, fs, path::PathBuf};

use tt_mcu::bundle::Bundle;

fn main() {
    let out = PathBuf::from(env::var_os("OUT_DIR").unwrap());
    fs::write(out.join("memory.x"), include_bytes!("memory.x")).unwrap();
    println!("cargo:rustc-link-search={}", out.display());
    println!("cargo:rerun-if-changed=memory.x");
    println!("cargo:rustc-link-arg=-Tlink.x");

    println!("cargo:rerun-if-env-changed=TT_MCU_BUNDLE");
    println!("cargo:rerun-if-env-changed=TT_MCU_EPOCHS");
    let bundle = match env::var_os("TT_MCU_BUNDLE") {
        Some(dir) => {
            let dir = PathBuf::from(dir);
            for f in [
                "plan.bin",
                "params.bin",
                "train_x.bin",
                "train_y.bin",
                "test_x.bin",
                "test_y.bin",
                "lr.bin",
            ] {
                println!("cargo:rerun-if-changed={}", dir.join(f).display());
            }
            Bundle::read(&dir).unwrap_or_else(|e| panic!("TT_MCU_BUNDLE={}: {e}", dir.display()))
        }
        None => Bundle::demo(),
    };
    let epochs: usize = env::var("TT_MCU_EPOCHS")
        .ok()
        .map(|v| v.parse().expect("TT_MCU_EPOCHS: a number"))
        .unwrap_or(3);
    let run = bundle
        .run(epochs)
        .unwrap_or_else(|e| panic!("host reference run: {e}"));
    bundle.write(&out).unwrap();
    let losses: Vec<u8> = run.losses.iter().flat_map(|l| l.to_le_bytes()).collect();
    fs::write(out.join("host_losses.bin"), losses).unwrap();
    let consts = format!(
        "pub const ARENA_BYTES: usize = {};\n\
         pub const INPUT_LEN: usize = {};\n\
         pub const EPOCHS: usize = {epochs};\n\
         pub const N_TRAIN: usize = {};\n\
         pub const N_TEST: usize = {};\n\
         pub const HOST_CORRECT_BEFORE: usize = {};\n\
         pub const HOST_CORRECT_AFTER: usize = {};\n\
         pub const LR_BITS: u32 = {};\n",
        bundle.arena_bytes().unwrap(),
        bundle.input_len().unwrap(),
        bundle.train_y.len(),
        bundle.test_y.len(),
        run.correct_before,
        run.correct_after,
        bundle.lr.to_bits(),
    );
    fs::write(out.join("bundle.rs"), consts).unwrap();
}
