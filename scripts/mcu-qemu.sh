#!/usr/bin/env bash
# Builds the tt-mcu QEMU firmware (Cortex-M4F, mps2-an386) with Debian's toolchain, runs it with
# an instruction-exact clock, prints its memory use and fails if it does not pass or does not
# fit the budget: SRAM (.data + .bss + .uninit + reserved stack) <= 256 KB, flash <= 1 MB.
# Before training it runs the kernel cost firmware and the kernel equivalence firmware (every
# DSP kernel against its portable twin on random geometries; fails on any mismatch).
# The firmware trains the plan bundle in $TT_MCU_BUNDLE (as `tinytrain export --mcu` writes it),
# or tt-mcu's built-in demo bundle, and must match the host run of the same plan bit for bit.
# The device's fleet update blob lands in $TT_MCU_UPDATE_OUT (default
# $CARGO_TARGET_DIR/update.ttu), decoded from the firmware's `update-hex` console lines.
set -euo pipefail
cd "$(dirname "$0")/.."
ex=crates/tt-mcu/examples/qemu-mps2-an386
export RUSTC_BOOTSTRAP=1 RUSTC=/usr/bin/rustc
export CARGO_TARGET_THUMBV7EM_NONE_EABIHF_LINKER=arm-none-eabi-ld
# Panic locations name files relative to the checkout and to the Rust sources, so the flash a
# firmware takes does not depend on where they live (MCUNet-5FPS's is within 1 KB of 1 MB).
sysroot_src="$(/usr/bin/rustc --print sysroot)/lib/rustlib/src/rust"
export CARGO_TARGET_THUMBV7EM_NONE_EABIHF_RUSTFLAGS="--remap-path-prefix=$PWD=. --remap-path-prefix=$sysroot_src=rust"
# One target dir for every firmware example, so `core` (build-std) is compiled once.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR_MCU:-$PWD/target/thumb-examples}"
# TT_MCU_FEATURES=portable builds the plain reference firmware (no DSP kernels). The soak runs
# on the built-in demo plan only (below), so a given bundle does not build it: its reference
# trajectory beside a full-size arena need not fit.
/usr/bin/cargo build -q -Z build-std=core --target thumbv7em-none-eabihf --release \
  --manifest-path "$ex/Cargo.toml" ${TT_MCU_FEATURES:+--features "$TT_MCU_FEATURES"} \
  ${TT_MCU_BUNDLE:+--bin tt-mcu-qemu-mps2-an386 --bin kernel_cost --bin kernel_equivalence}
bin="$CARGO_TARGET_DIR/thumbv7em-none-eabihf/release"
elf="$bin/tt-mcu-qemu-mps2-an386"
qemu() {
  timeout 600 qemu-system-arm -M mps2-an386 -nographic -monitor none \
    -semihosting-config enable=on,target=native -icount shift=0 -kernel "$1"
}

echo "== kernel cost (one layer's training step)"
qemu "$bin/kernel_cost"

echo "== kernel equivalence (the DSP kernels against their portable twins)"
qemu "$bin/kernel_equivalence"

# Power cuts inside one QEMU run (src/bin/soak.rs, ~3 s at 0.42 M instructions per step): on the
# built-in demo plan only; a given bundle's steps may cost 800x that (MobileNetV2 paper scheme).
if [[ -z "${TT_MCU_BUNDLE:-}" ]]; then
  echo "== soak: 2,000 steps, power cut during steps and checkpoint writes"
  qemu "$bin/soak"
fi

echo "== training the bundled plan"

out=$(mktemp)
trap 'rm -f "$out"' EXIT
set +e
# The firmware streams its fleet update blob as `update-hex` lines: kept in $out, not shown.
qemu "$elf" | tee "$out" | grep -v '^update-hex '
status=${PIPESTATUS[0]}
set -e

python3 - "$elf" "$status" "$out" "${TT_MCU_UPDATE_OUT:-$CARGO_TARGET_DIR/update.ttu}" <<'PY'
import os, subprocess, sys
elf, status, out, update_out = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
sec = {}
for line in subprocess.run(["arm-none-eabi-size", "-A", elf], check=True,
                           capture_output=True, text=True).stdout.splitlines():
    f = line.split()
    if len(f) == 3 and f[0].startswith("."):
        sec[f[0]] = int(f[1])
syms = {}
for line in subprocess.run(["arm-none-eabi-nm", elf], check=True,
                           capture_output=True, text=True).stdout.splitlines():
    f = line.split()
    if len(f) == 3:
        syms[f[2]] = int(f[0], 16)
g = lambda k: sec.get(k, 0)
stack = syms["_stack_reserve"]
flash = g(".vector_table") + g(".text") + g(".rodata") + g(".data")
sram = g(".data") + g(".bss") + g(".uninit") + stack
KB = 1024
print(f"memory: flash {flash} B ({flash / KB:.1f} KB of 1024 KB: .vector_table {g('.vector_table')}"
      f" .text {g('.text')} .rodata {g('.rodata')} .data {g('.data')})")
print(f"memory: SRAM {sram} B ({sram / KB:.1f} KB of 256 KB: .data {g('.data')} .bss {g('.bss')}"
      f" .uninit {g('.uninit')} stack reserved {stack})")
text = open(out).read()
bad = []
if status != 0:
    bad.append(f"firmware exit status {status}")
if "\nPASS" not in "\n" + text:
    bad.append("firmware did not print PASS")
if sram > 256 * KB:
    bad.append(f"SRAM {sram} B > 256 KB")
if flash > 1024 * KB:
    bad.append(f"flash {flash} B > 1 MB")
hexs = [line.split(" ", 1)[1] for line in text.splitlines() if line.startswith("update-hex ")]
if hexs:
    # The device's update blob as a file (TT_MCU_UPDATE_OUT), for tt.read_update on the host.
    tmp = update_out + ".tmp"
    with open(tmp, "wb") as f:
        f.write(bytes.fromhex("".join(hexs)))
    os.replace(tmp, update_out)
    print(f"update blob: {os.path.getsize(update_out)} B -> {update_out}")
else:
    bad.append("firmware wrote no update blob")
if bad:
    sys.exit("mcu-qemu: FAIL: " + "; ".join(bad))
print("mcu-qemu: OK")
PY
