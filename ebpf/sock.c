/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Socket-level service translation (cgroup sock_addr programs, attached to a host's child
 * cgroup v2): a connect() or sendto() to a service address (ClusterIP, or a node IP with a
 * NodePort) is rewritten to one of the service's backends before the kernel routes it, so no
 * packet ever carries the service address and no NAT state exists on the path. UDP replies are
 * shown to the application as coming from the service address (recvmsg4), through a reverse
 * map keyed by the socket and the backend it sent to.
 */
#include <linux/bpf.h>
#include <linux/errno.h>
#include <linux/in.h>
#include <bpf/bpf_helpers.h>

#include "abi.h"

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, SVC_MAX_SERVICES);
	/* Allocated on demand: a node holds far fewer services than the map's capacity. */
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct svc_key);
	__type(value, struct svc_info);
} svc_services SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, SVC_MAX_SLOTS);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct svc_slot_key);
	__type(value, struct svc_addr);
} svc_slots SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, SVC_MAX_REVERSE);
	__type(key, struct svc_reverse_key);
	__type(value, struct svc_addr);
} svc_reverse SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, SVC_EVENT_MAX);
	__type(key, __u32);
	__type(value, __u64);
} svc_counters SEC(".maps");

/* A pick that finds a slot missing re-reads the service: userspace deletes an old revision's
 * slots right after publishing the new one, so a program that read the old revision can lose
 * the race once; more than a few lost races in a row means the list churns faster than
 * connects happen, and the connect is refused rather than sent somewhere wrong. */
#define SVC_PICK_ATTEMPTS 3

enum svc_pick {
	/* Not a service address: leave the socket alone. */
	SVC_PICK_NOT_SERVICE,
	SVC_PICK_FOUND,
	SVC_PICK_NO_BACKEND,
	SVC_PICK_RACE,
};

/* Not inlined: as a subprogram its signature, and with it enum svc_event, is in the object's
 * BTF, where userspace checks the enum's values against its mirror. */
static __noinline void svc_count(enum svc_event event)
{
	__u32 key = event;
	__u64 *value = bpf_map_lookup_elem(&svc_counters, &key);

	/* Per-CPU value: no other CPU writes it, a plain add is enough. */
	if (value)
		*value += 1;
}

/* Picks a backend of `key` at random: connections spread evenly over the backends without
 * per-connection state. */
static __always_inline enum svc_pick svc_pick(const struct svc_key *key, struct svc_addr *backend)
{
	for (int attempt = 0; attempt < SVC_PICK_ATTEMPTS; attempt++) {
		struct svc_info *info = bpf_map_lookup_elem(&svc_services, key);

		if (!info)
			return SVC_PICK_NOT_SERVICE;
		/* One read of each: the element may be replaced while we look at it. */
		__u32 count = *(volatile __u32 *)&info->count;
		__u32 revision = *(volatile __u32 *)&info->revision;

		if (count == 0)
			return SVC_PICK_NO_BACKEND;
		struct svc_slot_key slot = {
			.ip4 = key->ip4,
			.port = key->port,
			.proto = key->proto,
			.revision = revision,
			.slot = bpf_get_prandom_u32() % count,
		};
		struct svc_addr *found = bpf_map_lookup_elem(&svc_slots, &slot);

		if (found) {
			backend->ip4 = found->ip4;
			backend->port = found->port;
			return SVC_PICK_FOUND;
		}
	}
	return SVC_PICK_RACE;
}

/* Rewrites the destination of a connect or sendmsg to a service. Returns the program's
 * verdict: 1 lets the call proceed (translated or not), 0 fails it with ECONNREFUSED. */
static __always_inline int svc_translate(struct bpf_sock_addr *ctx, enum svc_event translated)
{
	__u32 proto = ctx->protocol;

	if (proto != IPPROTO_TCP && proto != IPPROTO_UDP)
		return 1;
	/* user_port holds the port in network byte order in its first two bytes. */
	__u32 user_port = ctx->user_port;
	struct svc_key key = {
		.ip4 = ctx->user_ip4,
		.port = (__be16)user_port,
		.proto = (__u8)proto,
	};
	struct svc_addr backend = {};

	switch (svc_pick(&key, &backend)) {
	case SVC_PICK_NOT_SERVICE:
		return 1;
	case SVC_PICK_FOUND:
		break;
	case SVC_PICK_NO_BACKEND:
		svc_count(SVC_EVENT_REFUSED_NO_BACKEND);
		/* What a client of a kube-proxy service without endpoints gets (its REJECT rule). */
		bpf_set_retval(-ECONNREFUSED);
		return 0;
	default:
		svc_count(SVC_EVENT_REFUSED_RACE);
		bpf_set_retval(-ECONNREFUSED);
		return 0;
	}

	if (proto == IPPROTO_UDP) {
		struct svc_reverse_key reverse = {
			.cookie = bpf_get_socket_cookie(ctx),
			.ip4 = backend.ip4,
			.port = backend.port,
		};
		struct svc_addr service = { .ip4 = key.ip4, .port = key.port };

		/* Best effort: the LRU map makes room by itself; without the entry the application
		 * would see the backend's address, which is the only harm. */
		bpf_map_update_elem(&svc_reverse, &reverse, &service, BPF_ANY);
	}
	ctx->user_ip4 = backend.ip4;
	ctx->user_port = backend.port;
	svc_count(translated);
	return 1;
}

SEC("cgroup/connect4")
int sock_connect4(struct bpf_sock_addr *ctx)
{
	if (ctx->protocol == IPPROTO_TCP)
		return svc_translate(ctx, SVC_EVENT_CONNECT_TCP);
	return svc_translate(ctx, SVC_EVENT_CONNECT_UDP);
}

SEC("cgroup/sendmsg4")
int sock_sendmsg4(struct bpf_sock_addr *ctx)
{
	return svc_translate(ctx, SVC_EVENT_SENDMSG_UDP);
}

SEC("cgroup/recvmsg4")
int sock_recvmsg4(struct bpf_sock_addr *ctx)
{
	__u32 user_port = ctx->user_port;
	struct svc_reverse_key reverse = {
		.cookie = bpf_get_socket_cookie(ctx),
		.ip4 = ctx->user_ip4,
		.port = (__be16)user_port,
	};
	struct svc_addr *service = bpf_map_lookup_elem(&svc_reverse, &reverse);

	if (!service)
		return 1;
	ctx->user_ip4 = service->ip4;
	ctx->user_port = service->port;
	svc_count(SVC_EVENT_RECVMSG_UDP);
	/* recvmsg4 programs must allow: the datagram is already received. */
	return 1;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
