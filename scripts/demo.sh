#!/usr/bin/env bash
# Installs tinytrain from this checkout and runs the main job.
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1
python3 -m pip install -q ".[test,plot]"
tinytrain demo "$@"
