#!/usr/bin/env bash
# libFuzzer (atheris) on the Python readers of untrusted files, seeded from real files:
#   bash scripts/fuzz-python.sh                 # 1e5 executions of each target (FUZZ_RUNS)
#   FUZZ_TARGETS="npz scheme" FUZZ_RUNS=1000 FUZZ_SECONDS=60 bash scripts/fuzz-python.sh   # whichever ends first
# Needs `pip install atheris`. Targets: onnx tflite plan npz npy scheme (tests/test_fuzz_importers.py).
set -euo pipefail
cd "$(dirname "$0")/.."
for t in ${FUZZ_TARGETS:-onnx tflite plan npz npy scheme}; do
  echo "== $t"
  log=$(mktemp)
  limit=(-runs="${FUZZ_RUNS:-100000}")
  [[ -n "${FUZZ_SECONDS:-}" ]] && limit+=(-max_total_time="$FUZZ_SECONDS")
  if ! python3 tests/test_fuzz_importers.py "$t" "${limit[@]}" -timeout=20 -rss_limit_mb=2048 \
      -print_final_stats=1 >"$log" 2>&1; then
    tail -60 "$log"
    exit 1
  fi
  grep -E "^Done|stat::number_of_executed_units|stat::average_exec_per_sec" "$log"
  rm -f "$log"
done
