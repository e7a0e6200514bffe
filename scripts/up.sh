#!/usr/bin/env bash
# The main job (README): installs what is missing, builds the release binary and runs
# `slipway up`: a supervisor provisioning hosts in network namespaces over three zones and the
# demo cluster of examples/cluster.yaml (one control plane host, two workers in two zones),
# with progress until it is Ready and the kubectl commands to try. It stays in the foreground;
# Ctrl-C (or `slipway down` from another terminal) tears everything down. Arguments go to
# `slipway up`.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" -ne 0 ]; then
  echo "up: must run as root: it creates network namespaces and cgroups (sudo $0)" >&2
  exit 1
fi
./scripts/bootstrap.sh
if ! command -v cargo >/dev/null 2>&1 && [ -f "$HOME/.cargo/env" ]; then
  # shellcheck disable=SC1091
  . "$HOME/.cargo/env"
fi
echo "up: building the release binary"
cargo build --release -p slipway -p slipway-cni
exec "${CARGO_TARGET_DIR:-target}/release/slipway" up "$@"
