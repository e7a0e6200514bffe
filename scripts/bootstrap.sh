#!/usr/bin/env bash
# Install the Debian packages Slipway builds and tests with. Idempotent: packages already present
# are skipped, so a second run does nothing. Installs in small groups and retries each group once,
# because a hook on these machines can delete downloaded .debs between dpkg runs
# ("cannot access archive").
set -euo pipefail

if [ "$(id -u)" -ne 0 ]; then
  echo "bootstrap: must run as root to install Debian packages (apt-get)" >&2
  exit 1
fi

# One group per line; each group is installed by one apt-get call.
groups=(
  "clang-19 llvm-19"
  "libbpf-dev bpftool"
  "iproute2 iputils-ping"
  "iperf3 netcat-openbsd sockperf"
  "nftables iptables"
  "jq curl"
  "qemu-utils libnbd-bin nbdkit"
  "fio xfsprogs"
  "haproxy nginx-light wrk"
  "containernetworking-plugins"
  "podman runc busybox-static"
  "containerd"
  "protobuf-compiler libprotobuf-dev"
  "etcd-server etcd-client"
)

missing_in() {
  local pkg out=()
  for pkg in "$@"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed' || out+=("$pkg")
  done
  echo "${out[@]:-}"
}

updated=0
for group in "${groups[@]}"; do
  # shellcheck disable=SC2086 # word splitting of the group is intended
  missing=$(missing_in $group)
  [ -z "$missing" ] && continue
  if [ "$updated" -eq 0 ]; then
    echo "bootstrap: apt-get update"
    apt-get update -qq
    updated=1
  fi
  echo "bootstrap: installing $missing"
  for attempt in 1 2; do
    # shellcheck disable=SC2086
    if DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing >/dev/null; then
      break
    fi
    if [ "$attempt" -eq 2 ]; then
      echo "bootstrap: apt-get install $missing failed twice" >&2
      exit 1
    fi
    echo "bootstrap: retrying $missing once"
  done
done

# Debian's kubectl (kubernetes-client 1.20), the client the supervisor API is tested with. These
# machines carry another package that owns /usr/bin/kubectl, so Debian's is unpacked beside it
# instead of installed over it.
KUBECTL_DIR=/opt/slipway/kubernetes-client
if [ ! -x "$KUBECTL_DIR/usr/bin/kubectl" ]; then
  echo "bootstrap: unpacking Debian kubernetes-client into $KUBECTL_DIR"
  tmp=$(mktemp -d)
  for attempt in 1 2; do
    if (cd "$tmp" && apt-get download -qq kubernetes-client >/dev/null 2>&1) \
      && mkdir -p "$KUBECTL_DIR" && dpkg-deb -x "$tmp"/kubernetes-client_*.deb "$KUBECTL_DIR"; then
      break
    fi
    if [ "$attempt" -eq 2 ]; then
      echo "bootstrap: could not download kubernetes-client" >&2
      exit 1
    fi
    [ "$updated" -eq 0 ] && apt-get update -qq && updated=1
  done
  rm -rf "$tmp"
fi

# bpffs is where the datapath pins its maps.
if ! mountpoint -q /sys/fs/bpf; then
  mount -t bpf bpf /sys/fs/bpf
fi
echo "bootstrap: system packages ready"
