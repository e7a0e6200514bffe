/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * The L4 load balancer's packet logic, independent of the attach point: it parses a frame,
 * answers ARP for VIPs in place, and for TCP/UDP decides the translation (client -> VIP becomes
 * LB -> backend; backend -> LB becomes VIP -> client) with Maglev and connection tracking. It
 * reads packets through plain data/data_end pointers and writes only ARP replies, so both the TC
 * program (lb.c, which rewrites with the skb checksum helpers) and the XDP program (lb_xdp.c,
 * which rewrites by hand) share it.
 */
#ifndef SLIPWAY_LB_CORE_H
#define SLIPWAY_LB_CORE_H

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/tcp.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

#include "abi.h"
#include "lb_maps.h"

/* What the entry point does with the frame after lb_decide(). */
enum lb_action {
	LB_ACT_PASS = 0,
	LB_ACT_DROP = 1,
	/* The frame was rewritten in place (ARP reply): send it back out of the device. */
	LB_ACT_TX = 2,
	/* Apply `struct lb_nat` and send the packet out of lb_config.ifindex. */
	LB_ACT_NAT = 3,
};

/* A translation for the entry point to apply; fields in network byte order. */
struct lb_nat {
	__be32 old_src, new_src, old_dst, new_dst;
	__be16 old_sport, new_sport, old_dport, new_dport;
	/* Offset of the L4 header from the start of the frame. */
	__u32 l4_off;
	__u8 proto;
};

/* SNAT ports tried for a new flow: first the client's own port folded into the SNAT range
 * (one-to-one for any client's ephemeral range, so one client's flows never collide and a
 * reused client tuple gets its old port back, which is what the backend's TIME-WAIT state
 * expects), then ports derived from the flow hash. The range stays below the kernel's
 * ephemeral ports (ip_local_port_range, 32768-60999 by default): the LB host's own
 * connections to backends (health checks, a proxy beside the LB) use those, and a backend's
 * answer to them must never be taken for the reply to a translated flow. The daemon warns when
 * the host's range overlaps this one. */
#define LB_SNAT_TRIES 8
#define LB_SNAT_PORT_MIN 1024
#define LB_SNAT_PORT_END 32768
#define LB_SNAT_PORT_SPAN (LB_SNAT_PORT_END - LB_SNAT_PORT_MIN)

#define LB_ARP_REQUEST 1
#define LB_ARP_REPLY 2

/* An Ethernet/IPv4 ARP packet (RFC 826). */
struct lb_arp {
	__be16 htype;
	__be16 ptype;
	__u8 hlen;
	__u8 plen;
	__be16 op;
	__u8 sha[ETH_ALEN];
	__u8 spa[4];
	__u8 tha[ETH_ALEN];
	__u8 tpa[4];
} __attribute__((packed));

/* Not inlined, so that enum lb_reason is in the object's BTF for userspace to check. */
static __noinline void lb_count(enum lb_reason reason, __u32 bytes)
{
	__u32 key = reason;
	struct counter_value *value = bpf_map_lookup_elem(&lb_counters, &key);

	if (value) {
		/* Per-CPU: no other CPU writes this slot. */
		value->packets += 1;
		value->bytes += bytes;
	}
}

static __always_inline void lb_stat(void *map, __u32 index, __u32 bytes, __u32 new_flow)
{
	struct lb_stats *stats = bpf_map_lookup_elem(map, &index);

	if (stats) {
		stats->packets += 1;
		stats->bytes += bytes;
		stats->flows += new_flow;
	}
}

/* Bob Jenkins' lookup3 final mix of three words: the flow hash that picks a Maglev slot. */
#define LB_ROL32(x, k) (((x) << (k)) | ((x) >> (32 - (k))))
static __always_inline __u32 lb_hash(__u32 a, __u32 b, __u32 c)
{
	c ^= b; c -= LB_ROL32(b, 14);
	a ^= c; a -= LB_ROL32(c, 11);
	b ^= a; b -= LB_ROL32(a, 25);
	c ^= b; c -= LB_ROL32(b, 16);
	a ^= c; a -= LB_ROL32(c, 4);
	b ^= a; b -= LB_ROL32(a, 14);
	c ^= b; c -= LB_ROL32(b, 24);
	return c;
}

/* Answers an ARP request for an announced VIP by turning the frame into the reply. */
static __always_inline enum lb_action lb_arp(void *data, void *data_end, __u32 len)
{
	struct ethhdr *eth = data;
	struct lb_arp *arp = data + sizeof(*eth);
	__u32 zero = 0;

	if ((void *)(arp + 1) > data_end)
		return LB_ACT_PASS;
	if (arp->htype != bpf_htons(1) || arp->ptype != bpf_htons(ETH_P_IP) ||
	    arp->hlen != ETH_ALEN || arp->plen != 4 || arp->op != bpf_htons(LB_ARP_REQUEST))
		return LB_ACT_PASS;

	struct lb_vip_key vip = {};
	__builtin_memcpy(&vip.ip, arp->tpa, 4);
	if (!bpf_map_lookup_elem(&lb_vips, &vip))
		return LB_ACT_PASS;
	struct lb_config *cfg = bpf_map_lookup_elem(&lb_config, &zero);
	if (!cfg)
		return LB_ACT_PASS;

	__builtin_memcpy(eth->h_dest, arp->sha, ETH_ALEN);
	__builtin_memcpy(eth->h_source, cfg->mac, ETH_ALEN);
	arp->op = bpf_htons(LB_ARP_REPLY);
	__builtin_memcpy(arp->tha, arp->sha, ETH_ALEN);
	__builtin_memcpy(arp->tpa, arp->spa, 4);
	__builtin_memcpy(arp->sha, cfg->mac, ETH_ALEN);
	__builtin_memcpy(arp->spa, &vip.ip, 4);
	lb_count(LB_REASON_ARP_REPLY, len);
	return LB_ACT_TX;
}

/* Is the client inside one of the service's source ranges? */
static __always_inline int lb_source_allowed(__u32 service_id, __be32 client)
{
	struct lb_source_range_key key = {
		.prefixlen = 64,
		.data = { .service_id = service_id, .ip = client },
	};
	return bpf_map_lookup_elem(&lb_source_ranges, &key) != NULL;
}

/* Whether a reverse entry's flow is over (FIN/RST seen) or forgotten: its port may be reused. */
static __always_inline int lb_reverse_stale(struct lb_reverse *old, __u8 proto)
{
	struct lb_flow_key fwd = {
		.src = old->client,
		.dst = old->vip,
		.sport = old->client_port,
		.dport = old->vip_port,
		.proto = proto,
	};
	struct lb_flow *flow = bpf_map_lookup_elem(&lb_flows, &fwd);
	return !flow || flow->state == LB_FLOW_CLOSING;
}

/* Picks the source port a new SNATed flow gets, and records the reverse translation under it.
 * A port is free if no reverse entry holds it or the entry is this same client flow again (a
 * reused tuple); failing that, a port whose flow is over is taken. Returns 0 when every
 * candidate is held by a live flow. */
static __always_inline __be16 lb_snat_port(struct lb_flow_key *rev_key, struct lb_reverse *rev,
					   __u32 hash)
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
			int same = old->client == rev->client && old->client_port == rev->client_port &&
				   old->vip == rev->vip && old->vip_port == rev->vip_port;
			if (same) {
				bpf_map_update_elem(&lb_reverse, rev_key, rev, BPF_ANY);
				return rev_key->dport;
			}
			/* An ended flow's port is the last resort: the backend may still hold its
			 * tuple in TIME-WAIT, and a new SYN from another client may not get through. */
			if (!stale_port && lb_reverse_stale(old, rev_key->proto))
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

/*
 * Decides what to do with the frame in [data, data_end) of `len` bytes. ARP replies are built
 * in place; a translation is returned in `nat` with LB_ACT_NAT, for the caller to apply.
 */
static __always_inline enum lb_action lb_decide(void *data, void *data_end, __u32 len,
						struct lb_nat *nat)
{
	struct ethhdr *eth = data;
	struct iphdr *ip4 = data + sizeof(*eth);
	__u32 zero = 0;

	if ((void *)(eth + 1) > data_end) {
		lb_count(LB_REASON_DROP_MALFORMED, len);
		return LB_ACT_DROP;
	}
	if (eth->h_proto == bpf_htons(ETH_P_ARP)) {
		enum lb_action act = lb_arp(data, data_end, len);
		if (act == LB_ACT_PASS)
			lb_count(LB_REASON_PASS, len);
		return act;
	}
	if (eth->h_proto != bpf_htons(ETH_P_IP) || (void *)(ip4 + 1) > data_end) {
		lb_count(LB_REASON_PASS, len);
		return LB_ACT_PASS;
	}
	if (ip4->ihl < 5 || ip4->version != 4) {
		lb_count(LB_REASON_DROP_MALFORMED, len);
		return LB_ACT_DROP;
	}
	if (ip4->protocol != IPPROTO_TCP && ip4->protocol != IPPROTO_UDP) {
		lb_count(LB_REASON_PASS, len);
		return LB_ACT_PASS;
	}

	struct lb_vip_key vip_key = { .ip = ip4->daddr };
	/* A fragment carries no ports (or only the first does): the LB cannot place it. */
	if (ip4->frag_off & bpf_htons(0x3fff)) {
		if (bpf_map_lookup_elem(&lb_vips, &vip_key)) {
			lb_count(LB_REASON_DROP_MALFORMED, len);
			return LB_ACT_DROP;
		}
		lb_count(LB_REASON_PASS, len);
		return LB_ACT_PASS;
	}

	__u32 l4_off = sizeof(*eth) + (ip4->ihl & 0xf) * 4;
	__be16 *ports = data + l4_off;
	if ((void *)(ports + 2) > data_end) {
		lb_count(LB_REASON_DROP_MALFORMED, len);
		return LB_ACT_DROP;
	}
	__u8 tcp_flags = 0;
	if (ip4->protocol == IPPROTO_TCP) {
		__u8 *flags = data + l4_off + 13;
		if ((void *)(flags + 1) > data_end) {
			lb_count(LB_REASON_DROP_MALFORMED, len);
			return LB_ACT_DROP;
		}
		tcp_flags = *flags;
	}
	/* TCP flag bits (RFC 9293 3.1). */
	int fin_or_rst = tcp_flags & (0x01 | 0x04);
	int syn_only = (tcp_flags & (0x02 | 0x10)) == 0x02;
	__u64 now = bpf_ktime_get_ns();

	nat->l4_off = l4_off;
	nat->proto = ip4->protocol;
	nat->old_src = ip4->saddr;
	nat->old_dst = ip4->daddr;
	nat->old_sport = ports[0];
	nat->old_dport = ports[1];

	struct lb_flow_key key = {
		.src = ip4->saddr,
		.dst = ip4->daddr,
		.sport = ports[0],
		.dport = ports[1],
		.proto = ip4->protocol,
	};

	/* A backend's reply? */
	struct lb_reverse *rev = bpf_map_lookup_elem(&lb_reverse, &key);
	if (rev) {
		struct lb_flow_key fwd = {
			.src = rev->client,
			.dst = rev->vip,
			.sport = rev->client_port,
			.dport = rev->vip_port,
			.proto = key.proto,
		};
		struct lb_flow *flow = bpf_map_lookup_elem(&lb_flows, &fwd);
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

	struct lb_service_key svc_key = {
		.vip = ip4->daddr,
		.port = ports[1],
		.proto = ip4->protocol,
	};
	struct lb_service *svc = bpf_map_lookup_elem(&lb_services, &svc_key);
	if (!svc) {
		if (bpf_map_lookup_elem(&lb_vips, &vip_key)) {
			lb_count(LB_REASON_DROP_NO_SERVICE, len);
			return LB_ACT_DROP;
		}
		lb_count(LB_REASON_PASS, len);
		return LB_ACT_PASS;
	}
	__u32 service_id = svc->id;
	__u32 service_flags = svc->flags;
	if (service_id >= LB_MAX_SERVICES) {
		lb_count(LB_REASON_DROP_NO_BACKEND, len);
		return LB_ACT_DROP;
	}
	if ((service_flags & LB_SERVICE_F_SOURCE_RANGES) &&
	    !lb_source_allowed(service_id, ip4->saddr)) {
		lb_count(LB_REASON_DROP_SOURCE_RANGE, len);
		return LB_ACT_DROP;
	}

	struct lb_flow *flow = bpf_map_lookup_elem(&lb_flows, &key);
	if (flow && !(flow->state == LB_FLOW_CLOSING && syn_only) &&
	    flow->service_id == service_id) {
		__u32 bid = flow->backend_id;
		struct lb_backend *backend = bpf_map_lookup_elem(&lb_backends, &bid);
		if (backend && backend->ip) {
			flow->last_seen_ns = now;
			if (fin_or_rst)
				flow->state = LB_FLOW_CLOSING;
			nat->new_src = flow->nat_ip;
			nat->new_sport = flow->nat_port;
			nat->new_dst = backend->ip;
			nat->new_dport = backend->port;
			lb_stat(&lb_backend_stats, bid, len, 0);
			lb_stat(&lb_service_stats, service_id, len, 0);
			lb_count(LB_REASON_FORWARD, len);
			return LB_ACT_NAT;
		}
	}

	/* A new flow: Maglev picks the backend. */
	__u32 hash = lb_hash(key.src, key.dst, ((__u32)key.sport << 16 | key.dport) ^ key.proto);
	__u32 slot = service_id * LB_MAGLEV_SIZE + hash % LB_MAGLEV_SIZE;
	__u32 *bid_p = bpf_map_lookup_elem(&lb_maglev, &slot);
	__u32 bid = bid_p ? *bid_p : 0;
	struct lb_backend *backend = bid ? bpf_map_lookup_elem(&lb_backends, &bid) : NULL;
	if (!backend || !backend->ip) {
		lb_count(LB_REASON_DROP_NO_BACKEND, len);
		return LB_ACT_DROP;
	}
	struct lb_config *cfg = bpf_map_lookup_elem(&lb_config, &zero);
	if (!cfg) {
		lb_count(LB_REASON_DROP_NO_ROUTE, len);
		return LB_ACT_DROP;
	}

	struct lb_flow new_flow = {
		.backend_id = bid,
		.service_id = service_id,
		.state = fin_or_rst ? LB_FLOW_CLOSING : LB_FLOW_OPEN,
		.last_seen_ns = now,
	};
	struct lb_reverse new_rev = {
		.client = key.src,
		.vip = key.dst,
		.client_port = key.sport,
		.vip_port = key.dport,
		.backend_id = bid,
		.service_id = service_id,
	};
	struct lb_flow_key rev_key = {
		.src = backend->ip,
		.sport = backend->port,
		.dst = key.src,
		.dport = key.sport,
		.proto = key.proto,
	};
	if (service_flags & LB_SERVICE_F_LOCAL) {
		/* externalTrafficPolicy: Local keeps the client's address. */
		new_flow.nat_ip = key.src;
		new_flow.nat_port = key.sport;
		bpf_map_update_elem(&lb_reverse, &rev_key, &new_rev, BPF_ANY);
	} else {
		rev_key.dst = cfg->snat_ip;
		__be16 port = lb_snat_port(&rev_key, &new_rev, hash);
		if (!port) {
			lb_count(LB_REASON_DROP_NO_PORT, len);
			return LB_ACT_DROP;
		}
		new_flow.nat_ip = cfg->snat_ip;
		new_flow.nat_port = port;
	}
	bpf_map_update_elem(&lb_flows, &key, &new_flow, BPF_ANY);

	nat->new_src = new_flow.nat_ip;
	nat->new_sport = new_flow.nat_port;
	nat->new_dst = backend->ip;
	nat->new_dport = backend->port;
	lb_stat(&lb_backend_stats, bid, len, 1);
	lb_stat(&lb_service_stats, service_id, len, 1);
	lb_count(LB_REASON_FORWARD, len);
	return LB_ACT_NAT;
}

#endif /* SLIPWAY_LB_CORE_H */
