#!/usr/bin/env bash
# Sourced by demo.sh and test.sh. Gives them, on a fresh Debian machine as on a developer's:
#  - a Rust toolchain: the one on PATH, else Debian's (rustc-web, cargo-web: recent enough for PyO3
#    and the Cortex-M builds; rustup cannot fetch targets here);
#  - the project's own Python environment in .venv, made with whatever python3 is first on PATH
#    (Debian's own interpreter refuses `pip install` outside one: PEP 668), activated for the caller.
# Prints what it installs; installs nothing that is already there.
tt_apt_install() {
  echo "== installing Debian packages: $*"
  export DEBIAN_FRONTEND=noninteractive
  if [ "$(id -u)" -ne 0 ]; then
    echo "error: installing $* needs root (run as root, or install them first)" >&2
    return 1
  fi
  apt-get update -qq
  apt-get install -y -qq "$@" >/dev/null
}

tt_setup_env() {
  local root need=()
  root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
  command -v python3 >/dev/null || need+=(python3)
  command -v cargo >/dev/null || [ -x /usr/bin/cargo ] || need+=(rustc-web cargo-web)
  command -v cc >/dev/null || need+=(gcc libc6-dev)
  if [ ${#need[@]} -gt 0 ]; then tt_apt_install "${need[@]}"; fi
  # Debian's rustc-web installs /usr/bin/cargo; a rustup toolchain earlier on PATH wins.
  command -v cargo >/dev/null || export PATH="$PATH:/usr/bin"

  if [ ! -x "$root/.venv/bin/python" ]; then
    echo "== creating the project environment $root/.venv ($(python3 --version))"
    if ! python3 -m venv "$root/.venv" 2>/dev/null; then
      rm -rf "$root/.venv"
      # Debian splits venv and ensurepip out of python3.
      local minor
      minor="$(python3 -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')"
      tt_apt_install "python${minor}-venv"
      python3 -m venv "$root/.venv"
    fi
  fi
  # shellcheck disable=SC1091
  . "$root/.venv/bin/activate"
  export PIP_DISABLE_PIP_VERSION_CHECK=1
  python -m pip install -q --upgrade pip maturin
}
