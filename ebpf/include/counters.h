/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* Per-CPU packet and byte counters keyed by (ifindex in, ifindex out, reason). */
#ifndef SLIPWAY_COUNTERS_H
#define SLIPWAY_COUNTERS_H

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

#include "abi.h"
#include "fill.h"

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_HASH);
	__uint(max_entries, SLIPWAY_MAX_COUNTERS);
	__type(key, struct counter_key);
	__type(value, struct counter_value);
} counters SEC(".maps");

/* Not inlined: as a BPF subprogram its signature, and with it enum slipway_reason, is in the
 * object's BTF, where userspace checks the enum's values against its mirror. */
static __noinline void count(__u32 ifindex_in, __u32 ifindex_out, enum slipway_reason reason,
				  __u32 bytes)
{
	struct counter_key key = {
		.ifindex_in = ifindex_in,
		.ifindex_out = ifindex_out,
		.reason = reason,
	};
	struct counter_value *value = bpf_map_lookup_elem(&counters, &key);

	if (value) {
		/* Per-CPU value: no other CPU writes it, a plain add is enough. */
		value->packets += 1;
		value->bytes += bytes;
		return;
	}
	struct counter_value first = { .packets = 1, .bytes = bytes };
	/* BPF_NOEXIST fails if another CPU created the key since our lookup; then the entry
	 * exists and this CPU's slot of it is ours to add to. */
	if (bpf_map_update_elem(&counters, &key, &first, BPF_NOEXIST) != 0) {
		value = bpf_map_lookup_elem(&counters, &key);
		if (value) {
			value->packets += 1;
			value->bytes += bytes;
		} else {
			/* Not created by another CPU either: the map is full, the packet uncounted. */
			fill_full(SLIPWAY_MAP_COUNTERS);
		}
	}
}

#endif /* SLIPWAY_COUNTERS_H */
