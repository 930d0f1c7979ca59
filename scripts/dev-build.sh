#!/usr/bin/env bash
# Developer loop: rebuild the extension in release mode and drop it next to python/tinytrain,
# where the editable install (`pip install -e .`, done once) imports it from.
set -euo pipefail
cd "$(dirname "$0")/.."
target=${CARGO_TARGET_DIR:-target}
cargo build -q --release -p tt-py
# A new inode (copy, then rename): running processes keep their mapping of the old library
# instead of crashing on a file rewritten under them.
cp "$target/release/lib_core.so" python/tinytrain/.core.so.tmp
mv -f python/tinytrain/.core.so.tmp python/tinytrain/_core.abi3.so
