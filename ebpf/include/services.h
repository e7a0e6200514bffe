/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * The service maps (`svc_services`, `svc_slots`, `svc_counters`) and backend selection, shared
 * by the socket programs (ebpf/sock.c, for traffic from the node's processes) and the node
 * programs (ebpf/host.c for NodePort traffic from outside, ebpf/pod_veth.c for pods whose
 * sockets the socket programs do not see). Both objects declare the maps identically
 * from here and the loaders pin them at the same paths, so one list of services serves both.
 */
#ifndef SLIPWAY_SERVICES_H
#define SLIPWAY_SERVICES_H

#include <linux/bpf.h>
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

/* What the service programs did: the socket programs (ebpf/sock.c) and the per-packet
 * translation at pod veths (ebpf/include/nat.h) count into the same array, so that which path a
 * service flow took shows. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, SVC_EVENT_MAX);
	__type(key, __u32);
	__type(value, __u64);
} svc_counters SEC(".maps");

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

#endif /* SLIPWAY_SERVICES_H */
