#!/usr/bin/env bash
# libFuzzer on every Rust reader of external bytes: the plan loader + executor (plan_load), the
# checkpoint slot reader (checkpoint_read), the C ABI (ffi) and the fleet update blob reader
# (update_read), each seeded from real files (the demo bundle, plans from `tinytrain compile`,
# real checkpoint images and update blobs).
#   bash scripts/fuzz-smoke.sh              # a few seconds each (FUZZ_SECONDS, default 5)
#   FUZZ_RUNS=1000000 bash scripts/fuzz-smoke.sh   # the long run: 1e6 executions each
#   FUZZ_SANITIZER=none|address ...               # one sanitizer for all (default: ASan for ffi only)
# Needs cargo-fuzz (installed here from crates.io if missing) and libFuzzer; stable rustc is run
# with RUSTC_BOOTSTRAP=1 for the sanitizer flags cargo-fuzz passes.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
export RUSTC_BOOTSTRAP=1
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$root/target/fuzz}
command -v cargo-fuzz >/dev/null || cargo install --locked cargo-fuzz
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
plans=()
if command -v tinytrain >/dev/null; then
  tinytrain compile python/tinytrain/models/demo_digits.onnx --scheme paper -o "$work/digits.ttp" >/dev/null 2>&1 \
    && plans+=("$work/digits.ttp")
  tinytrain compile tests/fixtures/tflite/ds_cnn.onnx --scheme last:2 --precision fp32 -o "$work/dscnn.ttp" >/dev/null 2>&1 \
    && plans+=("$work/dscnn.ttp")
  # The digits architecture at 8x8 (19k MACs, within the targets' work bound MAX_MACS): patch
  # stage, in-place depthwise and fused block backward seeds that run fast.
  python3 - "$work/tiny.onnx" <<'EOF' && for s in paper full; do
import sys, onnx
from tinytrain.models._builder import OnnxBuilder
b = OnnxBuilder("fuzz_seed", 1, 8, 0)
x = b.conv_bn("input", 1, 8, 3, 2)
x = b.mb_block(x, 8, 8, 3, 1, 8, residual=True)
x = b.mb_block(x, 8, 16, 3, 2, 24, residual=False)
x = b.mb_block(x, 16, 16, 3, 1, 48, residual=True)
onnx.save(b.classifier(b.conv_bn(x, 16, 32, 1), 32, 5), sys.argv[1])
EOF
    tinytrain compile "$work/tiny.onnx" --scheme $s -o "$work/tiny-$s.ttp" >/dev/null 2>&1 && plans+=("$work/tiny-$s.ttp")
  done
  tinytrain compile "$work/tiny.onnx" --scheme last:3 --stream-input --precision residual \
    -o "$work/tiny-stream.ttp" >/dev/null 2>&1 && plans+=("$work/tiny-stream.ttp")
fi
# Debian's rustc ships no sanitizer runtimes: there AddressSanitizer cannot link, and the targets
# run without it (still with debug assertions and overflow checks) rather than not at all.
asan_rt=$(ls "$(rustc --print sysroot)"/lib/rustlib/*/lib/*rt.asan.a 2>/dev/null | head -1 || true)
if [[ -z "$asan_rt" && "${FUZZ_SANITIZER:-}" == address ]]; then
  echo "fuzz smoke: this rustc has no AddressSanitizer runtime; running without a sanitizer"
  FUZZ_SANITIZER=none
fi
no_asan=$([[ -z "$asan_rt" ]] && echo 1 || true)
cd crates/tt-core/fuzz
cargo run -q --release --example make_seeds -- "$work/corpus" "${plans[@]}"
limit=(-max_total_time="${FUZZ_SECONDS:-5}")
[[ -n "${FUZZ_RUNS:-}" ]] && limit=(-runs="$FUZZ_RUNS")
for t in ${FUZZ_TARGETS:-plan_load checkpoint_read ffi update_read}; do
  echo "== $t"
  # -a: debug assertions and overflow checks on, so an arithmetic overflow is a crash.
  log="$work/$t.log"
  # AddressSanitizer where unsafe code meets the input (the C ABI's raw pointers); the safe-Rust
  # readers (their only unsafe is an alignment cast) run without it, several times faster.
  san=${FUZZ_SANITIZER:-$([[ $t == ffi && -z "$no_asan" ]] && echo address || echo none)}
  if ! cargo fuzz run -a -O -s "$san" "$t" "$work/corpus/$t" -- "${limit[@]}" \
      -rss_limit_mb=512 -malloc_limit_mb=256 -timeout=10 -print_final_stats=1 >"$log" 2>&1; then
    tail -60 "$log"
    echo "fuzz target $t failed (crash input under crates/tt-core/fuzz/artifacts/$t)" >&2
    exit 1
  fi
  grep -E "^Done|stat::number_of_executed_units|stat::average_exec_per_sec" "$log"
done
