#!/usr/bin/env bash
# Optional: the peer frameworks `tinytrain bench` compares against, installed the way that works
# here (see ../shared/notes/peers-measured.md): Debian's CPU-only PyTorch for the system Python, and
# onnxruntime-training-cpu 1.19.2 (+ onnx 1.17, which it needs) in a venv that also sees that torch.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
/usr/bin/python3 -c "import torch" 2>/dev/null || { apt-get update -qq; apt-get install -y -qq python3-torch python3-venv >/dev/null; }
venv="${XDG_CACHE_HOME:-$HOME/.cache}/tinytrain/peers/venv-ort"
if ! "$venv/bin/python" -c "import onnxruntime.training.artifacts" 2>/dev/null; then
  /usr/bin/python3 -m venv --system-site-packages "$venv"
  "$venv/bin/pip" install -q onnxruntime-training-cpu==1.19.2 onnx==1.17.0
fi
echo "peers ready: PyTorch in /usr/bin/python3, onnxruntime-training in $venv"
