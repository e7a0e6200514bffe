#!/usr/bin/env bash
# The main job (README): installs what is missing, builds the release binary and runs
# `slipway demo`, which builds a 2-host world in network namespaces, loads the eBPF datapath,
# moves traffic through it beside a raw veth baseline, prints what it measured, writes
# target/slipway-bench/demo.jsonl and tears the world down. Arguments go to `slipway demo`.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" -ne 0 ]; then
  echo "demo: must run as root: it creates network namespaces and loads BPF programs (sudo $0)" >&2
  exit 1
fi
./scripts/bootstrap.sh
if ! command -v cargo >/dev/null 2>&1 && [ -f "$HOME/.cargo/env" ]; then
  # shellcheck disable=SC1091
  . "$HOME/.cargo/env"
fi
echo "demo: building the release binary"
cargo build --release -p slipway
exec "${CARGO_TARGET_DIR:-target}/release/slipway" demo "$@"
