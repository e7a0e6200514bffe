/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* Neighbour answers for announced VIPs: ARP replies built in place (IPv4), Neighbor
 * Solicitations recognised and Neighbor Advertisements written with their checksum (IPv6). */
#ifndef SLIPWAY_LB_NEIGH_H
#define SLIPWAY_LB_NEIGH_H

#include "lb_base.h"

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

	__be32 tpa;
	__builtin_memcpy(&tpa, arp->tpa, 4);
	struct lb_vip_key vip = {};
	lb_addr4(&vip.ip, tpa);
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
	__builtin_memcpy(arp->spa, &tpa, 4);
	lb_count(LB_REASON_ARP_REPLY, len);
	return LB_ACT_TX;
}

/*
 * A Neighbor Solicitation (ICMPv6 in `ip6`) for an announced VIP: fills `ndp` and returns
 * LB_ACT_NDP; anything else is the host stack's (LB_ACT_PASS). Checks the validity rules of
 * RFC 4861 7.1.1 that matter here (hop limit 255, code 0, length, no multicast target). The
 * answer goes to the solicitor at the MAC of its source link-layer address option (the frame's
 * source without one); a DAD probe (unspecified source) is answered to all-nodes, which
 * defends the VIP (RFC 4861 7.2.4).
 */
static __always_inline enum lb_action lb_ndp_solicit(void *data, void *data_end, __u32 len,
						     struct ipv6hdr *ip6, struct lb_ndp *ndp)
{
	struct ethhdr *eth = data;
	struct lb_nd *ns = (void *)(ip6 + 1);
	__u32 zero = 0;

	/* The fixed part of the NS; the option is looked at only if the payload holds it. */
	if ((void *)ns + LB_ND_LEN > data_end)
		return LB_ACT_PASS;
	__u32 payload = bpf_ntohs(ip6->payload_len);
	if (ip6->hop_limit != 255 || ns->type != LB_ICMP6_NS || ns->code != 0 ||
	    payload < LB_ND_LEN)
		return LB_ACT_PASS;

	struct lb_vip_key vip = {};
	__builtin_memcpy(&vip.ip, &ns->target, sizeof(vip.ip));
	/* Multicast targets and IPv4-mapped ones are never VIPs of this family. */
	if ((vip.ip.w[0] & bpf_htonl(0xff000000)) == bpf_htonl(0xff000000) ||
	    (vip.ip.w[0] == 0 && vip.ip.w[1] == 0 && vip.ip.w[2] == LB_MAPPED_W2))
		return LB_ACT_PASS;
	if (!bpf_map_lookup_elem(&lb_vips, &vip))
		return LB_ACT_PASS;
	struct lb_config *cfg = bpf_map_lookup_elem(&lb_config, &zero);
	if (!cfg)
		return LB_ACT_PASS;

	struct lb_addr src;
	__builtin_memcpy(&src, &ip6->saddr, sizeof(src));
	ndp->target = vip.ip;
	__builtin_memcpy(ndp->lb_mac, cfg->mac, ETH_ALEN);
	if (lb_addr_is_zero(&src)) {
		/* DAD: to all-nodes ff02::1, 33:33:00:00:00:01 (RFC 2464 7). */
		ndp->dst.w[0] = bpf_htonl(0xff020000);
		ndp->dst.w[1] = 0;
		ndp->dst.w[2] = 0;
		ndp->dst.w[3] = bpf_htonl(1);
		__u8 all_nodes[ETH_ALEN] = { 0x33, 0x33, 0, 0, 0, 1 };
		__builtin_memcpy(ndp->dst_mac, all_nodes, ETH_ALEN);
		ndp->solicited = 0;
	} else {
		ndp->dst = src;
		ndp->solicited = 1;
		if ((void *)(ns + 1) <= data_end && payload >= LB_NA_LEN &&
		    ns->opt_type == LB_ND_OPT_SLLA && ns->opt_len == 1)
			__builtin_memcpy(ndp->dst_mac, ns->opt_mac, ETH_ALEN);
		else
			__builtin_memcpy(ndp->dst_mac, eth->h_source, ETH_ALEN);
	}
	lb_count(LB_REASON_NDP_REPLY, len);
	return LB_ACT_NDP;
}

/* Adds the eight 16-bit words of `a` to a one's-complement sum. The Internet checksum is
 * independent of byte order (RFC 1071 2.B) as long as every word is read as it lies in
 * memory, which is what these sums do. */
static __always_inline __u32 lb_csum_addr(__u32 sum, const struct lb_addr *a)
{
	for (int i = 0; i < 4; i++)
		sum += (a->w[i] & 0xffff) + (a->w[i] >> 16);
	return sum;
}

static __always_inline __u32 lb_csum_mac(__u32 sum, const __u8 *mac)
{
	for (int i = 0; i < ETH_ALEN; i += 2) {
		__u16 word;
		__builtin_memcpy(&word, mac + i, 2);
		sum += word;
	}
	return sum;
}

static __always_inline __u16 lb_csum_fold(__u32 sum)
{
	sum = (sum & 0xffff) + (sum >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	return (__u16)~sum;
}

/*
 * Writes the Neighbor Advertisement `ndp` into the frame [data, data_end), which the entry
 * point has sized to LB_NA_FRAME_LEN: Ethernet to the solicitor from the LB's MAC, IPv6 from
 * the VIP with hop limit 255, the NA (Solicited as set, Override, the VIP as target, the LB's
 * MAC as target link-layer address) and its checksum over the pseudo-header (RFC 4443 2.3,
 * RFC 8200 8.1). Returns -1 if the frame is too short.
 */
static __always_inline int lb_ndp_write(void *data, void *data_end, const struct lb_ndp *ndp)
{
	struct ethhdr *eth = data;
	struct ipv6hdr *ip6 = (void *)(eth + 1);
	struct lb_nd *na = (void *)(ip6 + 1);

	if ((void *)(na + 1) > data_end)
		return -1;
	__builtin_memcpy(eth->h_dest, ndp->dst_mac, ETH_ALEN);
	__builtin_memcpy(eth->h_source, ndp->lb_mac, ETH_ALEN);
	eth->h_proto = bpf_htons(ETH_P_IPV6);

	/* Version 6, traffic class 0, flow label 0. */
	*(__be32 *)ip6 = bpf_htonl(0x60000000);
	ip6->payload_len = bpf_htons(LB_NA_LEN);
	ip6->nexthdr = IPPROTO_ICMPV6;
	ip6->hop_limit = 255;
	__builtin_memcpy(&ip6->saddr, &ndp->target, sizeof(ndp->target));
	__builtin_memcpy(&ip6->daddr, &ndp->dst, sizeof(ndp->dst));

	__u8 flags = LB_NA_F_OVERRIDE | (ndp->solicited ? LB_NA_F_SOLICITED : 0);
	na->type = LB_ICMP6_NA;
	na->code = 0;
	na->csum = 0;
	na->flags[0] = flags;
	na->flags[1] = 0;
	na->flags[2] = 0;
	na->flags[3] = 0;
	__builtin_memcpy(&na->target, &ndp->target, sizeof(ndp->target));
	na->opt_type = LB_ND_OPT_TLLA;
	na->opt_len = 1;
	__builtin_memcpy(na->opt_mac, ndp->lb_mac, ETH_ALEN);

	/* Each constant is the 16-bit word as it lies in memory (bpf_htons). */
	__u32 sum = 0;
	sum = lb_csum_addr(sum, &ndp->target);			/* pseudo-header: source */
	sum = lb_csum_addr(sum, &ndp->dst);			/* destination */
	sum += bpf_htons(LB_NA_LEN);				/* upper-layer length */
	sum += bpf_htons(IPPROTO_ICMPV6);			/* next header */
	sum += bpf_htons(LB_ICMP6_NA << 8);			/* type, code */
	sum += bpf_htons((__u16)flags << 8);			/* flags, reserved */
	sum = lb_csum_addr(sum, &ndp->target);			/* target */
	sum += bpf_htons((LB_ND_OPT_TLLA << 8) | 1);		/* option type, length */
	sum = lb_csum_mac(sum, ndp->lb_mac);			/* link-layer address */
	na->csum = lb_csum_fold(sum);
	return 0;
}

#endif /* SLIPWAY_LB_NEIGH_H */
