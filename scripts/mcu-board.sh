#!/usr/bin/env bash
# Builds the STM32F746G-DISCO firmware (stm32f7xx-hal, thumbv7em-none-eabihf) with Debian's
# toolchain and reports its size; nothing can be flashed here (`cargo embed --release` in the
# example directory does it where a board is attached). Fails if the firmware does not fit:
# flash <= 512 KB (sectors 0-5; 6-7 hold the checkpoint slots), SRAM <= 256 KB.
set -euo pipefail
cd "$(dirname "$0")/.."
ex=crates/tt-mcu/examples/stm32f746g-disco
export RUSTC_BOOTSTRAP=1 RUSTC=/usr/bin/rustc
export CARGO_TARGET_THUMBV7EM_NONE_EABIHF_LINKER=arm-none-eabi-ld
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR_MCU:-$PWD/target/thumb-examples}"
start=$(date +%s)
/usr/bin/cargo build -q -Z build-std=core --target thumbv7em-none-eabihf --release \
  --manifest-path "$ex/Cargo.toml"
echo "stm32f746g-disco: built in $(( $(date +%s) - start )) s"
elf="$CARGO_TARGET_DIR/thumbv7em-none-eabihf/release/tt-mcu-stm32f746g-disco"
python3 - "$elf" <<'PY'
import subprocess, sys
elf = sys.argv[1]
sec = {}
for line in subprocess.run(["arm-none-eabi-size", "-A", elf], check=True,
                           capture_output=True, text=True).stdout.splitlines():
    f = line.split()
    if len(f) == 3 and f[0].startswith("."):
        sec[f[0]] = int(f[1])
stack = next(int(l.split()[0], 16) for l in subprocess.run(
    ["arm-none-eabi-nm", elf], check=True, capture_output=True, text=True).stdout.splitlines()
    if l.endswith(" _stack_reserve"))
g = lambda k: sec.get(k, 0)
flash = g(".vector_table") + g(".text") + g(".rodata") + g(".data")
sram = g(".data") + g(".bss") + g(".uninit") + stack
print(f"stm32f746g-disco: flash {flash} B ({flash / 1024:.1f} KB of 512 KB code sectors),"
      f" SRAM {sram} B ({sram / 1024:.1f} KB of 256 KB: .data {g('.data')} .bss {g('.bss')}"
      f" stack reserved {stack})")
if flash > 512 * 1024 or sram > 256 * 1024:
    sys.exit("mcu-board: FAIL: over budget")
PY

# The C ABI for C firmware: libtinytrain.a (include/tinytrain.h) for the same target, in
# build-thumb.sh's target dir (same workspace profile, so `core` is reused).
lib=target/thumb/thumbv7em-none-eabihf/release/libtinytrain.a
rm -f "$lib"
if ! log=$(CARGO_TARGET_DIR=target/thumb /usr/bin/cargo build -q -Z build-std=core \
    --target thumbv7em-none-eabihf --release -p tt-mcu-ffi 2>&1); then
  echo "$log"
  exit 1
fi
echo "$log" | grep -v "dropping unsupported crate type .cdylib." || true
echo "libtinytrain.a (thumbv7em-none-eabihf): $(stat -c %s "$lib") B archive"
