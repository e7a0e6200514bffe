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

/* ---- Services: socket-level translation (ebpf/sock.c; mirrored in dataplane/src/abi/services.rs) */

/* Capacity of `svc_services`: (address, port, protocol) triples, ClusterIPs and NodePorts. */
#define SVC_MAX_SERVICES 65536
/* Capacity of `svc_slots`: backends over all services, with room for a service's old and new
 * backend lists to coexist while it is updated. */
#define SVC_MAX_SLOTS 262144
/* Most backends one service may have. */
#define SVC_MAX_BACKENDS 4096
/* Capacity of the `svc_reverse` LRU: (socket, backend) pairs whose peer is shown as the
 * service address (UDP replies, getpeername). */
#define SVC_MAX_REVERSE 65536

/* Key of `svc_services`: what a client addresses, a ClusterIP or a node IP with a NodePort. */
struct svc_key {
	__be32 ip4;
	__be16 port;
	/* IPPROTO_TCP or IPPROTO_UDP. */
	__u8 proto;
	__u8 pad;
};

/* Value of `svc_services`. The backends of the service are the `svc_slots` entries
 * (key, revision, 0 .. count-1). Userspace writes a new list under a new revision, then
 * replaces this value, then deletes the old revision's slots: a program that read this value
 * sees one complete list, never a half-written one. count == 0: connects are refused. */
struct svc_info {
	__u32 count;
	__u32 revision;
};

/* Key of `svc_slots`: one backend of one revision of a service's backend list. */
struct svc_slot_key {
	__be32 ip4;
	__be16 port;
	__u8 proto;
	__u8 pad;
	__u32 revision;
	__u32 slot;
};

/* An IPv4 address and port: the value of `svc_slots` (a backend) and of `svc_reverse` (the
 * service address a backend's replies are shown as). */
struct svc_addr {
	__be32 ip4;
	__be16 port;
	__u16 pad;
};

/* Key of `svc_reverse`: a socket (its cookie) and the backend it was sent to. */
struct svc_reverse_key {
	__u64 cookie;
	__be32 ip4;
	__be16 port;
	__u16 pad;
};

/* What the socket programs did: index of the per-CPU `svc_counters` array (__u64 values).
 * Stable: they appear in metrics. */
enum svc_event {
	/* A TCP connect to a service was sent to a backend. */
	SVC_EVENT_CONNECT_TCP = 0,
	/* A UDP connect to a service was sent to a backend. */
	SVC_EVENT_CONNECT_UDP = 1,
	/* A UDP datagram sent to a service address (sendto) went to a backend. */
	SVC_EVENT_SENDMSG_UDP = 2,
	/* A UDP datagram from a backend was shown to the application as from the service. */
	SVC_EVENT_RECVMSG_UDP = 3,
	/* A connect or send to a service without backends was refused (ECONNREFUSED). */
	SVC_EVENT_REFUSED_NO_BACKEND = 4,
	/* The backend list changed under the program more than it retries: refused. */
	SVC_EVENT_REFUSED_RACE = 5,
	/* getpeername() on a translated socket showed the service, not the backend. */
	SVC_EVENT_GETPEERNAME = 6,
};
#define SVC_EVENT_MAX 7

#endif /* SLIPWAY_ABI_H */
