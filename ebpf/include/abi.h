/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * The Slipway datapath ABI: the one definition of every map key and value that userspace and
 * the BPF programs share. slipway-dataplane mirrors each struct in `#[repr(C)]` Rust
 * (dataplane/src/abi.rs) and a test checks sizes and field offsets against this object's BTF.
 *
 * Rules: fixed-width types only, no implicit padding (spell it out as `pad` fields so both
 * sides agree and the kernel never sees uninitialised key bytes), IPv4 addresses in network
 * byte order.
 */
#ifndef SLIPWAY_ABI_H
#define SLIPWAY_ABI_H

#include <linux/types.h>

#define SLIPWAY_ETH_ALEN 6

/* Capacity of the endpoint map: pods on one host. */
#define SLIPWAY_MAX_ENDPOINTS 65536
/* Capacity of the counter map: (ifindex in, ifindex out, reason) triples. */
#define SLIPWAY_MAX_COUNTERS 16384

/* Key of the `endpoints` map: a local pod's IPv4 address. */
struct endpoint_key {
	__be32 ip4;
};

/* Value of the `endpoints` map: where to deliver a packet for that pod. */
struct endpoint_info {
	/* ifindex of the host side of the pod's veth; bpf_redirect_peer() lands the packet on
	 * its peer, the pod's eth0, inside the pod's network namespace. */
	__u32 ifindex;
	/* The pod's eth0 MAC: destination MAC of delivered frames. */
	__u8 pod_mac[SLIPWAY_ETH_ALEN];
	/* The host-side veth MAC: source MAC of delivered frames (the pod's gateway). */
	__u8 host_mac[SLIPWAY_ETH_ALEN];
};

/* Why a packet got the verdict it got. Values are stable: they appear in metrics. */
enum slipway_reason {
	/* Redirected into the destination pod with bpf_redirect_peer(). */
	SLIPWAY_REASON_REDIRECT_PEER = 1,
	/* Not IPv4: left to the host stack. */
	SLIPWAY_REASON_PASS_NOT_IPV4 = 2,
	/* IPv4 to an address that is no local endpoint: left to the host stack. */
	SLIPWAY_REASON_PASS_NO_ENDPOINT = 3,
	/* Truncated or malformed header: dropped. */
	SLIPWAY_REASON_DROP_MALFORMED = 4,
};

/* Key of the per-CPU `counters` map. */
struct counter_key {
	/* The device the program ran on (skb->ifindex). */
	__u32 ifindex_in;
	/* The redirect target's ifindex, 0 when the packet was not redirected. */
	__u32 ifindex_out;
	/* An enum slipway_reason value. */
	__u32 reason;
};

/* Value of the per-CPU `counters` map; userspace sums the CPUs. */
struct counter_value {
	__u64 packets;
	__u64 bytes;
};

#endif /* SLIPWAY_ABI_H */
