/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* Parsing: the Ethernet, IPv4/IPv6 and TCP/UDP headers of a frame into struct lb_pkt, or the
 * verdict on what the LB does not place (fragments, extension headers, other protocols). */
#ifndef SLIPWAY_LB_PARSE_H
#define SLIPWAY_LB_PARSE_H

#include "lb_base.h"
#include "lb_neigh.h"

/* A packet whose ports the LB cannot see (an IP fragment, an IPv6 extension header): dropped
 * if it is for a VIP, which the LB cannot place, else the host stack's. */
static __always_inline enum lb_action lb_unplaceable(const struct lb_addr *dst, __u32 len)
{
	struct lb_vip_key vip_key = { .ip = *dst };

	if (bpf_map_lookup_elem(&lb_vips, &vip_key)) {
		lb_count(LB_REASON_DROP_MALFORMED, len);
		return LB_ACT_DROP;
	}
	lb_count(LB_REASON_PASS, len);
	return LB_ACT_PASS;
}

/* Reads the ports (and TCP flags) of the L4 header at pkt->l4_off into pkt. */
static __always_inline enum lb_action lb_parse_l4(void *data, void *data_end, __u32 len,
						  struct lb_pkt *pkt)
{
	__be16 *ports = data + pkt->l4_off;

	if ((void *)(ports + 2) > data_end) {
		lb_count(LB_REASON_DROP_MALFORMED, len);
		return LB_ACT_DROP;
	}
	pkt->key.sport = ports[0];
	pkt->key.dport = ports[1];
	pkt->tcp_flags = 0;
	if (pkt->key.proto == IPPROTO_TCP) {
		__u8 *flags = data + pkt->l4_off + 13;
		if ((void *)(flags + 1) > data_end) {
			lb_count(LB_REASON_DROP_MALFORMED, len);
			return LB_ACT_DROP;
		}
		pkt->tcp_flags = *flags;
	}
	return LB_ACT_CONTINUE;
}

/* IPv4: the tuple of a TCP/UDP packet (LB_ACT_CONTINUE), or the verdict on anything else. */
static __always_inline enum lb_action lb_parse4(void *data, void *data_end, __u32 len,
						struct lb_pkt *pkt)
{
	struct iphdr *ip4 = data + sizeof(struct ethhdr);

	if ((void *)(ip4 + 1) > data_end) {
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
	lb_addr4(&pkt->key.src, ip4->saddr);
	lb_addr4(&pkt->key.dst, ip4->daddr);
	pkt->key.proto = ip4->protocol;
	pkt->v6 = 0;
	/* A fragment carries no ports (or only the first does): the LB cannot place it. */
	if (ip4->frag_off & bpf_htons(0x3fff))
		return lb_unplaceable(&pkt->key.dst, len);
	pkt->l4_off = sizeof(struct ethhdr) + (ip4->ihl & 0xf) * 4;
	return lb_parse_l4(data, data_end, len, pkt);
}

/* IPv6: likewise; Neighbor Solicitations for VIPs become LB_ACT_NDP. Extension headers are
 * not walked: TCP or UDP must follow the fixed header (what every client sends unless it
 * fragments, and a VIP's flows are not fragmented: TCP segments to the path MTU). */
static __always_inline enum lb_action lb_parse6(void *data, void *data_end, __u32 len,
						struct lb_pkt *pkt, struct lb_ndp *ndp)
{
	struct ipv6hdr *ip6 = data + sizeof(struct ethhdr);

	if ((void *)(ip6 + 1) > data_end) {
		lb_count(LB_REASON_PASS, len);
		return LB_ACT_PASS;
	}
	if (ip6->version != 6) {
		lb_count(LB_REASON_DROP_MALFORMED, len);
		return LB_ACT_DROP;
	}
	__u8 nexthdr = ip6->nexthdr;
	if (nexthdr == IPPROTO_ICMPV6) {
		enum lb_action act = lb_ndp_solicit(data, data_end, len, ip6, ndp);
		if (act == LB_ACT_PASS)
			lb_count(LB_REASON_PASS, len);
		return act;
	}
	__builtin_memcpy(&pkt->key.src, &ip6->saddr, sizeof(pkt->key.src));
	__builtin_memcpy(&pkt->key.dst, &ip6->daddr, sizeof(pkt->key.dst));
	pkt->key.proto = nexthdr;
	pkt->v6 = 1;
	if (nexthdr != IPPROTO_TCP && nexthdr != IPPROTO_UDP) {
		/* Hop-by-hop (0), routing (43), fragment (44), destination options (60), ESP ...:
		 * the ports are not where the LB looks. */
		if (nexthdr == 0 || nexthdr == 43 || nexthdr == 44 || nexthdr == 60)
			return lb_unplaceable(&pkt->key.dst, len);
		lb_count(LB_REASON_PASS, len);
		return LB_ACT_PASS;
	}
	pkt->l4_off = sizeof(struct ethhdr) + sizeof(struct ipv6hdr);
	return lb_parse_l4(data, data_end, len, pkt);
}

#endif /* SLIPWAY_LB_PARSE_H */
