#!/usr/bin/env bash
# Debian's Rust 1.96 carries the std sources for -Z build-std; rustup cannot fetch Cortex-M targets here.
set -euo pipefail
need=()
[ -x /usr/bin/cargo ] && [ -d /usr/lib/rustlib/src/rust/library ] || need+=(rustc-web cargo-web rust-web-src)
command -v qemu-system-arm >/dev/null || need+=(qemu-system-arm)
command -v arm-none-eabi-ld >/dev/null || need+=(binutils-arm-none-eabi)
if [ ${#need[@]} -gt 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${need[@]}" >/dev/null
fi
