#!/usr/bin/env bash
# The paper's configuration on the microcontroller: MobileNetV2-w0.35 at 128x128 (random weights,
# a 10-class head as in the paper's transfer tasks) with the paper's kind of sparse scheme,
# compiled under a 256 KB budget, exported with two random training samples, built into the
# QEMU firmware and trained there. Prints SRAM, flash and instructions per training step;
# fails if it does not fit 256 KB / 1 MB or differs from the host run by one bit.
set -euo pipefail
cd "$(dirname "$0")/.."
bundle="${TT_MCU_PAPER_BUNDLE:-$PWD/target/mcu-paper-bundle}"
python3 - "$bundle" <<'PY'
import sys, warnings
import numpy as np
import tinytrain as tt

rng = np.random.default_rng(0)
img = rng.uniform(0, 1, size=(3, 3, 128, 128)).astype(np.float32)
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    q = tt.quantize(tt.load_onnx(tt.models.mobilenetv2(width=0.35, resolution=128, num_classes=10)), img)
plan = tt.compile(q, tt.schemes.paper_sparse(q), budget="256KB")
m = plan.export_mcu(sys.argv[1], img[:2], np.array([3, 7]), img[2:], np.array([3]))
print(f"paper configuration: MobileNetV2-w0.35 @128, paper_sparse scheme: arena {m['arena_bytes']} B, "
      f"learned state {m['state_bytes']} B, plan + params {m['flash_bytes']} B, "
      f"{m['forward_macs']} forward MACs")
PY
out=$(mktemp)
trap 'rm -f "$out"' EXIT
TT_MCU_BUNDLE="$bundle" TT_MCU_EPOCHS=1 TT_MCU_CHECK_LEARNING=0 bash scripts/mcu-qemu.sh | tee "$out"
python3 - "$bundle/manifest.json" "$out" <<'PY'
import json, re, sys
macs = json.load(open(sys.argv[1]))["forward_macs"]
text = open(sys.argv[2]).read()
fwd = int(re.search(r"predict (\d+) instr/sample", text).group(1))
step = int(re.search(r"(\d+) instructions per step", text).group(1))
print(f"paper configuration cost: forward {fwd / macs:.1f} instr/MAC ({fwd} instr, {macs} MACs); "
      f"training step {step} instr = {step / macs:.1f} instr per forward MAC "
      "(the paper's engine: ~81 M cycles per step on a Cortex-M7)")
PY
