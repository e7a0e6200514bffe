/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * NetworkPolicy enforcement, shared by the pod veth and host device programs. The agent
 * compiles policies into the maps below (see the Policy section of abi.h); a packet costs a
 * fixed number of lookups however many rules there are:
 *
 *   state -> connection tracking (forward, then reverse tuple) -> done for known connections
 *   (and ICMP errors about them);
 *   a new connection: for each local end, its flags, the peer's identity (ipcache) and two
 *   rule lookups (the peer's identity, then ANY).
 *
 * A connection is allowed when the source's egress and the destination's ingress allow it;
 * this host decides for the ends that are its pods. Allowed connections are tracked so that
 * their replies pass; a connection decided under an older policy generation is decided again
 * by its next packet, in its opening direction, so that a policy update that denies it stops
 * it in both directions.
 */
#ifndef SLIPWAY_POLICY_H
#define SLIPWAY_POLICY_H

#include <linux/bpf.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

#include "abi.h"
#include "fill.h"

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct policy_state);
} policy_state SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, POLICY_MAX_IPCACHE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct policy_ipcache_key);
	__type(value, struct policy_identity);
} policy_ipcache SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, POLICY_MAX_ENDPOINTS);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct policy_endpoint_key);
	__type(value, struct policy_endpoint);
} policy_endpoints SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, POLICY_MAX_RULES);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct policy_rule_key);
	__type(value, struct policy_rule);
} policy_rules SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, POLICY_MAX_CT);
	__type(key, struct nat_tuple);
	__type(value, struct policy_ct);
} policy_ct SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, POLICY_EVENTS_BYTES);
} policy_events SEC(".maps");

/* The packet's connection tuple: addresses, protocol, and for TCP, UDP and SCTP the ports
 * (0 for other protocols). The caller has let later fragments, which carry no ports, pass. */
static __always_inline void policy_tuple(struct __sk_buff *skb, struct iphdr *ip4,
					 struct nat_tuple *t)
{
	void *data_end = (void *)(long)skb->data_end;
	__u8 proto = ip4->protocol;

	t->saddr = ip4->saddr;
	t->daddr = ip4->daddr;
	t->proto = proto;
	t->sport = 0;
	t->dport = 0;
	if (proto != IPPROTO_TCP && proto != IPPROTO_UDP && proto != IPPROTO_SCTP)
		return;
	__be16 *ports = (void *)ip4 + ip4->ihl * 4;
	if ((void *)(ports + 2) > data_end)
		return;
	t->sport = ports[0];
	t->dport = ports[1];
}

/* Not inlined: one copy of the output call, and struct policy_event reaches BTF through the
 * function's prototype (userspace checks its layout there). A full ring drops the event, never
 * the packet. */
static __noinline int policy_emit(struct policy_event *ev)
{
	return bpf_ringbuf_output(&policy_events, ev, sizeof(*ev), 0);
}

static __always_inline void policy_event(const struct nat_tuple *t, __u32 generation,
					 enum policy_direction direction,
					 enum policy_verdict verdict, __u32 rule_id)
{
	struct policy_event ev = {
		.time_ns = bpf_ktime_get_ns(),
		.saddr = t->saddr,
		.daddr = t->daddr,
		.sport = t->sport,
		.dport = t->dport,
		.proto = t->proto,
		.direction = direction,
		.verdict = verdict,
		.rule_id = rule_id,
		.generation = generation,
	};
	policy_emit(&ev);
}

/* One end's verdict on connection `t`: the end is `ep` (a local pod), the peer `peer`.
 * Returns 1 when allowed; raises an event when the end is isolated in `direction`. */
static __always_inline int policy_end_allows(const struct nat_tuple *t, __u32 generation,
					     __be32 ep, __be32 peer,
					     enum policy_direction direction)
{
	__u8 slot = generation & 1;
	struct policy_endpoint_key ep_key = { .ip4 = ep, .slot = slot };
	struct policy_endpoint *flags = bpf_map_lookup_elem(&policy_endpoints, &ep_key);
	__u32 isolated = direction == POLICY_INGRESS ? POLICY_F_INGRESS : POLICY_F_EGRESS;
	__u32 failed = direction == POLICY_INGRESS ? POLICY_F_INGRESS_FAIL_CLOSED :
						     POLICY_F_EGRESS_FAIL_CLOSED;

	if (!flags)
		return 1;
	if (flags->flags & failed) {
		policy_event(t, generation, direction, POLICY_VERDICT_DENY_FAIL_CLOSED, 0);
		return 0;
	}
	if (!(flags->flags & isolated))
		return 1;

	struct policy_ipcache_key ip_key = { .prefixlen = 64, .data = { .slot = slot, .ip4 = peer } };
	struct policy_identity *id = bpf_map_lookup_elem(&policy_ipcache, &ip_key);
	struct policy_rule_key rule_key = {
		.prefixlen = POLICY_RULE_PORT_BASE + 16,
		.data = {
			.slot = slot,
			.direction = direction,
			.ep_ip4 = ep,
			.identity = id ? id->id : POLICY_IDENTITY_WORLD,
			.proto = t->proto,
			.dport = t->dport,
		},
	};
	struct policy_rule *rule = bpf_map_lookup_elem(&policy_rules, &rule_key);
	if (!rule) {
		rule_key.data.identity = POLICY_IDENTITY_ANY;
		rule = bpf_map_lookup_elem(&policy_rules, &rule_key);
	}
	if (!rule) {
		policy_event(t, generation, direction, POLICY_VERDICT_DENY, 0);
		return 0;
	}
	policy_event(t, generation, direction, POLICY_VERDICT_ALLOW, rule->rule_id);
	return 1;
}

/* Whether connection `t`, opened from its source, is allowed at the ends this host owns. */
static __always_inline int policy_decide(const struct nat_tuple *t, __u32 generation,
					 int src_local, int dst_local)
{
	if (src_local && !policy_end_allows(t, generation, t->saddr, t->daddr, POLICY_EGRESS))
		return 0;
	if (dst_local && !policy_end_allows(t, generation, t->daddr, t->saddr, POLICY_INGRESS))
		return 0;
	return 1;
}

/* An ICMP error (destination unreachable, time exceeded, parameter problem) about a packet of
 * a tracked connection: related traffic, which passes like a reply — path MTU discovery and
 * "connection refused" need it. Returns 1 when `ip4` is such an error. */
static __always_inline int policy_icmp_related(struct __sk_buff *skb, struct iphdr *ip4)
{
	void *data_end = (void *)(long)skb->data_end;
	__u8 *icmp = (void *)ip4 + ip4->ihl * 4;

	if (ip4->protocol != IPPROTO_ICMP || (void *)(icmp + 8) > data_end)
		return 0;
	if (icmp[0] != 3 && icmp[0] != 11 && icmp[0] != 12)
		return 0;
	struct iphdr *inner = (void *)(icmp + 8);
	if ((void *)(inner + 1) > data_end)
		return 0;
	/* The quoted packet went the other way: from this packet's destination to its source. */
	struct nat_tuple quoted = {
		.saddr = inner->saddr,
		.daddr = inner->daddr,
		.proto = inner->protocol,
	};
	if (inner->protocol == IPPROTO_TCP || inner->protocol == IPPROTO_UDP ||
	    inner->protocol == IPPROTO_SCTP) {
		__be16 *ports = (void *)inner + inner->ihl * 4;
		if ((void *)(ports + 2) > data_end)
			return 0;
		quoted.sport = ports[0];
		quoted.dport = ports[1];
	}
	if (bpf_map_lookup_elem(&policy_ct, &quoted))
		return 1;
	struct nat_tuple opened = {
		.saddr = quoted.daddr,
		.daddr = quoted.saddr,
		.sport = quoted.dport,
		.dport = quoted.sport,
		.proto = quoted.proto,
	};
	return bpf_map_lookup_elem(&policy_ct, &opened) != NULL;
}

/* Whether the packet may go on. src_local / dst_local: whether its source / destination is a
 * pod on this host. */
static __always_inline int policy_allows(struct __sk_buff *skb, struct iphdr *ip4, int src_local,
					 int dst_local)
{
	__u32 zero = 0;
	struct policy_state *state = bpf_map_lookup_elem(&policy_state, &zero);

	if (!state)
		return 1;
	__u32 generation = *(volatile __u32 *)&state->generation;
	if (!generation)
		return 1;

	/* A fragment after the first carries no ports to decide on. It passes: the destination
	 * reassembles nothing without the first fragment, which is decided like any packet. */
	if (ip4->frag_off & bpf_htons(0x1fff))
		return 1;

	struct nat_tuple t = {};
	policy_tuple(skb, ip4, &t);
	struct policy_ct *ct = bpf_map_lookup_elem(&policy_ct, &t);
	if (ct && ct->generation == generation)
		return 1;

	struct nat_tuple r = {
		.saddr = t.daddr,
		.daddr = t.saddr,
		.sport = t.dport,
		.dport = t.sport,
		.proto = t.proto,
	};
	struct policy_ct *reply = ct ? NULL : bpf_map_lookup_elem(&policy_ct, &r);
	if (reply && reply->generation == generation)
		return 1;

	if (!ct && !reply && policy_icmp_related(skb, ip4))
		return 1;

	/* A new connection, or one decided under an older generation: decide it, in the
	 * direction it was opened. */
	const struct nat_tuple *opened = reply ? &r : &t;
	int allowed = reply ? policy_decide(&r, generation, dst_local, src_local) :
			      policy_decide(&t, generation, src_local, dst_local);
	if (!allowed) {
		if (ct || reply)
			fill_delete(&policy_ct, SLIPWAY_MAP_POLICY_CT, opened);
		return 0;
	}
	struct policy_ct fresh = { .generation = generation };
	if (ct || reply)
		bpf_map_update_elem(&policy_ct, opened, &fresh, BPF_ANY);
	else
		fill_update(&policy_ct, SLIPWAY_MAP_POLICY_CT, opened, &fresh);
	return 1;
}

#endif /* SLIPWAY_POLICY_H */
