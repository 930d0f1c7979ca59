#!/usr/bin/env bash
# Builds the no_std crates for a Cortex-M4F with Debian's toolchain (see scripts/install-arm-toolchain.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
export RUSTC_BOOTSTRAP=1 RUSTC=/usr/bin/rustc
export CARGO_TARGET_DIR=target/thumb
/usr/bin/cargo build -q -Z build-std=core --target thumbv7em-none-eabihf --release \
  -p tt-core --no-default-features
/usr/bin/cargo build -q -Z build-std=core --target thumbv7em-none-eabihf --release -p tt-mcu \
  --no-default-features
echo "thumbv7em-none-eabihf: tt-core (no alloc, no std) and tt-mcu build"
