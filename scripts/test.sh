#!/usr/bin/env bash
# Installs everything the tests need on a fresh Debian machine and runs every test:
# cargo tests, the thumbv7em (Cortex-M4F) build of the no_std crates, and pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/setup-env.sh
tt_setup_env
# the fuzz smoke's libFuzzer is C++
command -v c++ >/dev/null || tt_apt_install g++

bash scripts/install-arm-toolchain.sh

echo "== installing tinytrain (editable) with the test dependencies into .venv"
# The test build: the kernel bindings (cargo feature `kernels`) are compiled in for the Python
# kernel tests and the importers' node-by-node oracle; the shipped wheel (demo.sh) leaves them out.
python -m pip install -q -e ".[test,plot,fleet]" --config-settings=build-args=--features=kernels
python -c "import tinytrain._core as c; assert hasattr(c, 'conv2d_forward'), 'the test build lacks the kernels feature'"

echo "== cargo test"
cargo test --workspace --release

echo "== fuzz smoke: libFuzzer on the Rust readers, 3 s each (long runs: docs/reliability.md)"
# One sanitizer for every target: one instrumented build. Installs cargo-fuzz if missing.
FUZZ_SECONDS=3 FUZZ_SANITIZER=address bash scripts/fuzz-smoke.sh

echo "== no_std build for thumbv7em-none-eabihf (Debian toolchain)"
bash scripts/build-thumb.sh

echo "== tt-mcu firmware: QEMU mps2-an386 (trains, 256 KB / 1 MB budget) and STM32F746G-DISCO build"
bash scripts/mcu-qemu.sh
bash scripts/mcu-paper.sh
bash scripts/mcu-board.sh

echo "== stubs: tinytrain/_core.pyi against the built module"
python3 -m mypy.stubtest tinytrain._core --allowlist scripts/stubtest-allowlist.txt

echo "== pytest"
python3 -m pytest -q tests
