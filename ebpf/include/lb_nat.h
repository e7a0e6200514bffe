/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* Translation: source ranges, connection tracking, Maglev backend choice, SNAT port
 * allocation and the reverse entries that bring replies back to the client. */
#ifndef SLIPWAY_LB_NAT_H
#define SLIPWAY_LB_NAT_H

#include "lb_base.h"

/* Is the client inside one of the service's source ranges? */
static __always_inline int lb_source_allowed(__u32 service_id, const struct lb_addr *client)
{
	struct lb_source_range_key key = {
		.prefixlen = 32 + 128,
		.data = { .service_id = service_id, .ip = *client },
	};
	return bpf_map_lookup_elem(&lb_source_ranges, &key) != NULL;
}

/* Whether a reverse entry's flow is over (FIN/RST seen) or forgotten: its port may be reused.
 * `fwd` is room for the forward key. */
static __always_inline int lb_reverse_stale(struct lb_reverse *old, __u8 proto,
					    struct lb_flow_key *fwd)
{
	lb_key_set(fwd, &old->client, &old->vip, old->client_port, old->vip_port, proto);
	struct lb_flow *flow = bpf_map_lookup_elem(&lb_flows, fwd);
	return !flow || flow->state == LB_FLOW_CLOSING;
}

/* Picks the source port a new SNATed flow gets, and records the reverse translation under it.
 * A port is free if no reverse entry holds it or the entry is this same client flow again (a
 * reused tuple); failing that, a port whose flow is over is taken. Returns 0 when every
 * candidate is held by a live flow. Not inlined, for the stack (see lb_translate()). */
static __noinline __be16 lb_snat_port(struct lb_flow_key *rev_key, struct lb_reverse *rev,
				      struct lb_flow_key *stale, __u32 hash)
{
	__u32 client_port = bpf_ntohs(rev_key->dport);
	__be16 stale_port = 0;

	for (int i = 0; i < LB_SNAT_TRIES; i++) {
		__u32 port;
		if (i == 0 && client_port >= LB_SNAT_PORT_MIN)
			port = client_port - LB_SNAT_PORT_MIN;
		else
			port = hash + i * 7919;
		rev_key->dport = bpf_htons(LB_SNAT_PORT_MIN + port % LB_SNAT_PORT_SPAN);
		struct lb_reverse *old = bpf_map_lookup_elem(&lb_reverse, rev_key);
		if (old) {
			int same = lb_addr_eq(&old->client, &rev->client) &&
				   old->client_port == rev->client_port &&
				   lb_addr_eq(&old->vip, &rev->vip) && old->vip_port == rev->vip_port;
			if (same) {
				bpf_map_update_elem(&lb_reverse, rev_key, rev, BPF_ANY);
				return rev_key->dport;
			}
			/* An ended flow's port is the last resort: the backend may still hold its
			 * tuple in TIME-WAIT, and a new SYN from another client may not get through. */
			if (!stale_port && lb_reverse_stale(old, rev_key->proto, stale))
				stale_port = rev_key->dport;
			continue;
		}
		if (bpf_map_update_elem(&lb_reverse, rev_key, rev, BPF_NOEXIST) == 0)
			return rev_key->dport;
	}
	if (stale_port) {
		rev_key->dport = stale_port;
		bpf_map_update_elem(&lb_reverse, rev_key, rev, BPF_ANY);
	}
	return stale_port;
}


/* A client's packet to a backend: translated (LB_ACT_NAT), or with direct server return sent
 * as it is inside an IPv4 header to the backend (LB_ACT_ENCAP), which answers the client. The
 * flow table serves both: a flow keeps its backend either way. */
static __always_inline enum lb_action lb_forward(__u32 service_flags, __u32 len)
{
	if (service_flags & LB_SERVICE_F_DSR) {
		lb_count(LB_REASON_ENCAP, len);
		return LB_ACT_ENCAP;
	}
	lb_count(LB_REASON_FORWARD, len);
	return LB_ACT_NAT;
}

/* Decides the translation of a parsed TCP/UDP packet: a tracked backend reply, a tracked or
 * new client flow to a service (Maglev picks the backend of a new one), or not the LB's. A
 * function of its own (a BPF-to-BPF call), its larger keys in `lb_scratch`: with 16-byte
 * addresses they would not fit in one 512-byte stack with the entry point's. */
static __noinline enum lb_action lb_translate(struct lb_pkt *pkt, __u32 len,
						   struct lb_nat *nat)
{
	struct lb_flow_key *key = &pkt->key;
	__u32 zero = 0;
	struct lb_scratch *s = bpf_map_lookup_elem(&lb_scratch, &zero);

	if (!s) {
		lb_count(LB_REASON_DROP_NO_ROUTE, len);
		return LB_ACT_DROP;
	}

	/* TCP flag bits (RFC 9293 3.1). */
	int fin_or_rst = pkt->tcp_flags & (0x01 | 0x04);
	int syn_only = (pkt->tcp_flags & (0x02 | 0x10)) == 0x02;
	__u64 now = bpf_ktime_get_ns();

	nat->l4_off = pkt->l4_off;
	nat->proto = key->proto;
	nat->v6 = pkt->v6;
	nat->old_src = key->src;
	nat->old_dst = key->dst;
	nat->old_sport = key->sport;
	nat->old_dport = key->dport;
	nat->syn = key->proto == IPPROTO_TCP && syn_only;

	/* The service first: a small map that stays in cache, and a packet to a service is a
	 * client's (a reply goes to the LB's SNAT address or, with eTP Local, to the client,
	 * never to a VIP's service port), so it never needs the LRU lookup below. */
	struct lb_service_key svc_key = {
		.vip = key->dst,
		.port = key->dport,
		.proto = key->proto,
	};
	struct lb_service *svc = bpf_map_lookup_elem(&lb_services, &svc_key);
	if (!svc) {
		/* A backend's reply? */
		struct lb_reverse *rev = bpf_map_lookup_elem(&lb_reverse, key);
		if (rev) {
			lb_key_set(&s->fwd, &rev->client, &rev->vip, rev->client_port,
				   rev->vip_port, key->proto);
			struct lb_flow *flow = bpf_map_lookup_elem(&lb_flows, &s->fwd);
			if (flow) {
				flow->last_seen_ns = now;
				if (fin_or_rst)
					flow->state = LB_FLOW_CLOSING;
			}
			nat->new_src = rev->vip;
			nat->new_sport = rev->vip_port;
			nat->new_dst = rev->client;
			nat->new_dport = rev->client_port;
			lb_stat(&lb_backend_stats, rev->backend_id, len, 0);
			lb_count(LB_REASON_REPLY, len);
			return LB_ACT_NAT;
		}
		struct lb_vip_key vip_key = { .ip = key->dst };
		if (bpf_map_lookup_elem(&lb_vips, &vip_key)) {
			lb_count(LB_REASON_DROP_NO_SERVICE, len);
			return LB_ACT_DROP;
		}
		lb_count(LB_REASON_PASS, len);
		return LB_ACT_PASS;
	}
	__u32 service_id = svc->id;
	__u32 service_flags = svc->flags;
	__u64 affinity_ns = (__u64)svc->affinity_timeout_s * 1000000000ULL;
	if ((service_flags & LB_SERVICE_F_SOURCE_RANGES) &&
	    !lb_source_allowed(service_id, &key->src)) {
		lb_count(LB_REASON_DROP_SOURCE_RANGE, len);
		return LB_ACT_DROP;
	}

	struct lb_flow *flow = bpf_map_lookup_elem(&lb_flows, key);
	if (flow && !(flow->state == LB_FLOW_CLOSING && syn_only) &&
	    flow->service_id == service_id) {
		__u32 bid = flow->backend_id;
		struct lb_backend *backend = bpf_map_lookup_elem(&lb_backends, &bid);
		/* A SYN opens its connection afresh: it keeps the tuple's backend only while that
		 * backend is in the ring (a client that reuses a port whose last connection went to
		 * a backend since drained or failed must not be sent there again). */
		int reopened = syn_only && backend && !(backend->flags & LB_BACKEND_F_ACTIVE);
		if (backend && !lb_addr_is_zero(&backend->ip) && !reopened) {
			flow->last_seen_ns = now;
			if (fin_or_rst)
				flow->state = LB_FLOW_CLOSING;
			nat->new_src = flow->nat_ip;
			nat->new_sport = flow->nat_port;
			nat->new_dst = backend->ip;
			nat->new_dport = backend->port;
			lb_stat(&lb_backend_stats, bid, len, 0);
			lb_stat(&lb_service_stats, service_id, len, 0);
			return lb_forward(service_flags, len);
		}
	}

	/* A new flow: Maglev picks the backend. A TCP segment that is not a SYN belongs to a
	 * flow the table lost (evicted when full): counted, then placed again. */
	if (!flow && key->proto == IPPROTO_TCP && !syn_only)
		lb_count(LB_REASON_FLOW_UNTRACKED, len);
	__u32 hash = lb_hash(lb_addr_fold(&key->src), lb_addr_fold(&key->dst),
			     ((__u32)key->sport << 16 | key->dport) ^ key->proto);
	__u32 bid = 0;
	struct lb_backend *backend = NULL;
	int affinity = service_flags & LB_SERVICE_F_AFFINITY;
	if (affinity) {
		/* The client's backend, if it opened a flow within the timeout and the backend
		 * is still in the ring. */
		s->affinity.service_id = service_id;
		s->affinity.client = key->src;
		struct lb_affinity *aff = bpf_map_lookup_elem(&lb_affinity, &s->affinity);
		if (aff && now - aff->last_seen_ns < affinity_ns) {
			__u32 aid = aff->backend_id;
			backend = bpf_map_lookup_elem(&lb_backends, &aid);
			if (backend && (backend->flags & LB_BACKEND_F_ACTIVE))
				bid = aid;
			else
				backend = NULL;
		}
	}
	if (!bid) {
		__u32 slot = hash % LB_MAGLEV_SIZE;
		void *ring = bpf_map_lookup_elem(&lb_maglev, &service_id);
		__u32 *bid_p = ring ? bpf_map_lookup_elem(ring, &slot) : NULL;
		bid = bid_p ? *bid_p : 0;
		backend = bid ? bpf_map_lookup_elem(&lb_backends, &bid) : NULL;
	}
	if (!backend || lb_addr_is_zero(&backend->ip)) {
		lb_count(LB_REASON_DROP_NO_BACKEND, len);
		return LB_ACT_DROP;
	}
	struct lb_config *cfg = bpf_map_lookup_elem(&lb_config, &zero);
	if (!cfg) {
		lb_count(LB_REASON_DROP_NO_ROUTE, len);
		return LB_ACT_DROP;
	}

	struct lb_flow *new_flow = &s->flow;
	struct lb_reverse *new_rev = &s->rev;
	struct lb_flow_key *rev_key = &s->rev_key;
	new_flow->backend_id = bid;
	new_flow->service_id = service_id;
	new_flow->state = fin_or_rst ? LB_FLOW_CLOSING : LB_FLOW_OPEN;
	new_flow->pad = 0;
	new_flow->pad2 = 0;
	new_flow->last_seen_ns = now;
	new_rev->client = key->src;
	new_rev->vip = key->dst;
	new_rev->client_port = key->sport;
	new_rev->vip_port = key->dport;
	new_rev->backend_id = bid;
	new_rev->service_id = service_id;
	lb_key_set(rev_key, &backend->ip, &key->src, backend->port, key->sport, key->proto);
	if (service_flags & LB_SERVICE_F_DSR) {
		/* The backend answers the client itself: no reply comes back here to translate. */
		new_flow->nat_ip = key->src;
		new_flow->nat_port = key->sport;
	} else if (service_flags & LB_SERVICE_F_LOCAL) {
		/* externalTrafficPolicy: Local keeps the client's address. */
		new_flow->nat_ip = key->src;
		new_flow->nat_port = key->sport;
		if (bpf_map_update_elem(&lb_reverse, rev_key, new_rev, BPF_ANY))
			lb_count(LB_REASON_FLOW_TABLE_FULL, len);
	} else {
		struct lb_addr *snat = pkt->v6 ? &cfg->snat_ip6 : &cfg->snat_ip4;
		if (lb_addr_is_zero(snat)) {
			lb_count(LB_REASON_DROP_NO_PORT, len);
			return LB_ACT_DROP;
		}
		rev_key->dst = *snat;
		__be16 port = lb_snat_port(rev_key, new_rev, &s->stale, hash);
		if (!port) {
			lb_count(LB_REASON_DROP_NO_PORT, len);
			return LB_ACT_DROP;
		}
		new_flow->nat_ip = *snat;
		new_flow->nat_port = port;
	}
	if (bpf_map_update_elem(&lb_flows, key, new_flow, BPF_ANY))
		lb_count(LB_REASON_FLOW_TABLE_FULL, len);
	if (affinity) {
		struct lb_affinity aff = { .backend_id = bid, .last_seen_ns = now };
		bpf_map_update_elem(&lb_affinity, &s->affinity, &aff, BPF_ANY);
	}

	nat->new_src = new_flow->nat_ip;
	nat->new_sport = new_flow->nat_port;
	nat->new_dst = backend->ip;
	nat->new_dport = backend->port;
	lb_stat(&lb_backend_stats, bid, len, 1);
	lb_stat(&lb_service_stats, service_id, len, 1);
	return lb_forward(service_flags, len);
}

#endif /* SLIPWAY_LB_NAT_H */
