/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * The L4 load balancer at XDP, for NICs with native XDP (on veths use lb.c at TC).
 * Same packet logic (lb_core.h); translations are applied with incremental checksum updates
 * (RFC 1624) and the next hop comes from bpf_fib_lookup(), since XDP frames carry no skb.
 * Attached together with lb.c at TC, sharing its maps: a frame whose next hop has no
 * neighbour entry yet is passed on untouched and translated there.
 */
#include <linux/bpf.h>
#include <stddef.h>
#include <bpf/bpf_helpers.h>

#include "lb_core.h"

#ifndef AF_INET
#define AF_INET 2
#endif
#ifndef AF_INET6
#define AF_INET6 10
#endif

static __always_inline __u16 csum_fold32(__u32 sum)
{
	sum = (sum & 0xffff) + (sum >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	return (__u16)sum;
}

/* RFC 1624 eqn. 3: HC' = ~(~HC + ~m + m'), for a 32-bit field m (two 16-bit words). */
static __always_inline void csum_replace4(__u16 *sum, __u32 from, __u32 to)
{
	__u32 s = (__u16)~*sum;
	s += (__u16)~(from & 0xffff) + (__u16)~(from >> 16);
	s += (to & 0xffff) + (to >> 16);
	*sum = ~csum_fold32(s);
}

static __always_inline void csum_replace2(__u16 *sum, __u16 from, __u16 to)
{
	__u32 s = (__u16)~*sum;
	s += (__u16)~from + to;
	*sum = ~csum_fold32(s);
}

/* The same for a 128-bit field: four 32-bit steps. */
static __always_inline void csum_replace16(__u16 *sum, const struct lb_addr *from,
					   const struct lb_addr *to)
{
	for (int i = 0; i < 4; i++)
		csum_replace4(sum, from->w[i], to->w[i]);
}

/* Translates an IPv4 packet whose next hop `fib` found. */
static __always_inline void lb_xdp_rewrite4(struct iphdr *ip4, __u16 *l4_csum,
					     const struct lb_nat *nat)
{
	__be32 old_src = nat->old_src.w[3], new_src = nat->new_src.w[3];
	__be32 old_dst = nat->old_dst.w[3], new_dst = nat->new_dst.w[3];

	csum_replace4(&ip4->check, old_src, new_src);
	csum_replace4(&ip4->check, old_dst, new_dst);
	if (nat->proto == IPPROTO_TCP || *l4_csum != 0) {
		csum_replace4(l4_csum, old_src, new_src);
		csum_replace4(l4_csum, old_dst, new_dst);
		csum_replace2(l4_csum, nat->old_sport, nat->new_sport);
		csum_replace2(l4_csum, nat->old_dport, nat->new_dport);
		if (nat->proto == IPPROTO_UDP && *l4_csum == 0)
			*l4_csum = 0xffff;
	}
	ip4->saddr = new_src;
	ip4->daddr = new_dst;
}

/* Translates an IPv6 packet: no header checksum; the L4 checksum always covers the addresses
 * (RFC 8200 8.1), a UDP one that comes out 0 is sent as 0xffff. */
static __always_inline void lb_xdp_rewrite6(struct ipv6hdr *ip6, __u16 *l4_csum,
					     const struct lb_nat *nat)
{
	csum_replace16(l4_csum, &nat->old_src, &nat->new_src);
	csum_replace16(l4_csum, &nat->old_dst, &nat->new_dst);
	csum_replace2(l4_csum, nat->old_sport, nat->new_sport);
	csum_replace2(l4_csum, nat->old_dport, nat->new_dport);
	if (nat->proto == IPPROTO_UDP && *l4_csum == 0)
		*l4_csum = 0xffff;
	__builtin_memcpy(&ip6->saddr, &nat->new_src, sizeof(nat->new_src));
	__builtin_memcpy(&ip6->daddr, &nat->new_dst, sizeof(nat->new_dst));
}

SEC("xdp")
int lb_xdp(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	/* Never both: a union keeps the stack of the call chain under 512 bytes. */
	union {
		struct lb_nat nat;
		struct lb_ndp ndp;
	} out = {};
	__u32 zero = 0;

	switch (lb_decide(data, data_end, data_end - data, &out.nat, &out.ndp)) {
	case LB_ACT_DROP:
		return XDP_DROP;
	case LB_ACT_TX:
		return XDP_TX;
	case LB_ACT_NDP: {
		/* The NS becomes the NA, resized to it first (see lb.c). A driver without
		 * tailroom to grow an option-less NS into leaves the frame as it was: the TC
		 * program beside this one answers it. */
		int delta = (int)LB_NA_FRAME_LEN - (int)(data_end - data);
		if (delta && bpf_xdp_adjust_tail(ctx, delta))
			return XDP_PASS;
		data = (void *)(long)ctx->data;
		data_end = (void *)(long)ctx->data_end;
		if (lb_ndp_write(data, data_end, &out.ndp))
			return XDP_DROP;
		return XDP_TX;
	}
	case LB_ACT_NAT:
		break;
	case LB_ACT_ENCAP:
		/* The TC program beside this one encapsulates (it needs the skb helpers that grow
		 * the headroom and keep GSO right). */
		return XDP_PASS;
	default:
		return XDP_PASS;
	}

	struct lb_nat *nat = &out.nat;
	struct ethhdr *eth = data;
	struct iphdr *ip4 = data + sizeof(*eth);
	struct ipv6hdr *ip6 = data + sizeof(*eth);
	__u32 l4_off = nat->l4_off & 0x7f;
	__be16 *ports = data + l4_off;
	__u16 *l4_csum = data + l4_off + (nat->proto == IPPROTO_TCP ? 16 : 6);
	if ((void *)(ip6 + 1) > data_end || (void *)(ports + 2) > data_end ||
	    (void *)(l4_csum + 1) > data_end)
		return XDP_DROP;

	/* The next hop first: without its MAC (no neighbour entry yet) the frame goes on
	 * untouched to the TC program attached beside this one, which translates it and whose
	 * bpf_redirect_neigh() resolves the neighbour; the flow's later packets take this path. */
	struct lb_config *cfg = bpf_map_lookup_elem(&lb_config, &zero);
	struct bpf_fib_lookup fib = {
		.l4_protocol = nat->proto,
		.sport = nat->new_sport,
		.dport = nat->new_dport,
		.ifindex = cfg && cfg->ifindex ? cfg->ifindex : ctx->ingress_ifindex,
	};
	if (nat->v6) {
		fib.family = AF_INET6;
		fib.tot_len = bpf_ntohs(ip6->payload_len) + sizeof(*ip6);
		__builtin_memcpy(fib.ipv6_src, nat->new_src.w, sizeof(fib.ipv6_src));
		__builtin_memcpy(fib.ipv6_dst, nat->new_dst.w, sizeof(fib.ipv6_dst));
	} else {
		fib.family = AF_INET;
		fib.tot_len = bpf_ntohs(ip4->tot_len);
		fib.ipv4_src = nat->new_src.w[3];
		fib.ipv4_dst = nat->new_dst.w[3];
	}
	/* bpf_fib_lookup() wants forwarding enabled on the device (net.ipv4.conf.<dev>.forwarding,
	 * net.ipv6.conf.<dev>.forwarding) even for output lookups; without it, or without a
	 * neighbour, TC does the work. */
	if (bpf_fib_lookup(ctx, &fib, sizeof(fib), BPF_FIB_LOOKUP_OUTPUT) != BPF_FIB_LKUP_RET_SUCCESS)
		return XDP_PASS;

	if (nat->v6)
		lb_xdp_rewrite6(ip6, l4_csum, nat);
	else
		lb_xdp_rewrite4(ip4, l4_csum, nat);
	ports[0] = nat->new_sport;
	ports[1] = nat->new_dport;
	__builtin_memcpy(eth->h_dest, fib.dmac, ETH_ALEN);
	__builtin_memcpy(eth->h_source, fib.smac, ETH_ALEN);
	if (fib.ifindex == ctx->ingress_ifindex)
		return XDP_TX;
	return bpf_redirect(fib.ifindex, 0);
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
