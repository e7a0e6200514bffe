#!/usr/bin/env bash
# The test command (README): installs what is missing, checks formatting and lints, runs the unit
# tests, then the privileged tests (root, BPF, network namespaces), then checks that nothing was
# left behind. Fails, never skips, when it cannot run the privileged tests.
set -euo pipefail
cd "$(dirname "$0")/.."

fail() { echo "test: FAILED: $*" >&2; exit 1; }

[ "$(id -u)" -eq 0 ] || fail "must run as root: the privileged tests create network namespaces and load BPF programs (sudo $0)"
./scripts/bootstrap.sh

if ! command -v cargo >/dev/null 2>&1 && [ -f "$HOME/.cargo/env" ]; then
  # shellcheck disable=SC1091
  . "$HOME/.cargo/env"
fi
command -v cargo >/dev/null 2>&1 || fail "cargo not found: install the Rust toolchain (rustup)"
[ -e /sys/kernel/btf/vmlinux ] || fail "the kernel exposes no BTF (/sys/kernel/btf/vmlinux): BPF programs cannot be loaded"
bpftool prog show >/dev/null 2>&1 || fail "the bpf() syscall is unavailable (bpftool prog show failed): BPF is needed"
ip netns list >/dev/null 2>&1 || fail "network namespaces are unavailable (ip netns)"

echo "== format and lints"
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings

# Names of namespaces, bpffs entries and cgroups (v2, and v1 cpu and memory) that test worlds and
# hosts use; whatever is new after the suite was leaked by it.
leftovers() {
  { ls /run/netns 2>/dev/null; ls /sys/fs/bpf 2>/dev/null; ls /sys/fs/cgroup/unified 2>/dev/null
    ls /sys/fs/cgroup/cpu 2>/dev/null; ls /sys/fs/cgroup/memory 2>/dev/null; } \
    | grep '^slipway-' | sort -u || true
}
before=$(leftovers)

logs=$(mktemp -d)
trap 'rm -rf "$logs"' EXIT

# Sums "N passed" / "N ignored" over every "test result:" line of a cargo test log.
count() { grep -E '^test result:' "$1" | sed -E "s/.* ([0-9]+) $2.*/\1/" | awk '{s += $1} END {print s + 0}'; }

echo "== unit tests (privileged tests are ignored here)"
cargo test --workspace 2>&1 | tee "$logs/unit"
unit=$(count "$logs/unit" passed)
privileged_expected=$(count "$logs/unit" ignored)

echo "== privileged tests (root, BPF, network namespaces)"
cargo test --workspace -- --ignored 2>&1 | tee "$logs/privileged"
privileged=$(count "$logs/privileged" passed)

echo "== leak check"
leaked=$(comm -13 <(echo "$before") <(leftovers))
[ -z "$leaked" ] || fail "the suite left namespaces, bpffs entries or cgroups behind: $leaked"

echo
echo "test: $unit unit tests passed, $privileged privileged tests passed, nothing left behind"
[ "$unit" -gt 0 ] || fail "no unit test ran"
[ "$privileged" -gt 0 ] || fail "no privileged test ran"
[ "$privileged" -eq "$privileged_expected" ] \
  || fail "$privileged privileged tests passed but $privileged_expected were set aside by the unit run"
