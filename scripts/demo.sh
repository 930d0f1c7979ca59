#!/usr/bin/env bash
# Installs tinytrain from this checkout and runs the main job.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/setup-env.sh
tt_setup_env
echo "== installing tinytrain and what the demo needs (numpy, onnx, rich, matplotlib, scikit-learn);"
echo "   the Rust core compiles in 1-3 minutes"
python -m pip install --progress-bar on ".[demo]"
echo "== tinytrain demo (afterwards: '. .venv/bin/activate' puts tinytrain on PATH)"
tinytrain demo "$@"
