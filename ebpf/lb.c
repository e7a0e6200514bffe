/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * The L4 load balancer at TC (TCX ingress of the LB host's interface): the packet logic is in
 * lb_core.h; this entry point applies translations with the skb checksum helpers, which keep
 * CHECKSUM_PARTIAL and CHECKSUM_COMPLETE skbs right, and sends translated packets out with
 * bpf_redirect_neigh(), which resolves the next hop's MAC in the kernel's neighbour table
 * (ARP or NDP). TC, not XDP, because native XDP on a veth collapses TCP throughput.
 */
#include <linux/bpf.h>
#include <linux/pkt_cls.h>
#include <stddef.h>
#include <bpf/bpf_helpers.h>

#include "lb_core.h"

#define IP_OFF sizeof(struct ethhdr)
#define IP_CSUM_OFF (IP_OFF + offsetof(struct iphdr, check))
#define IP_SRC_OFF (IP_OFF + offsetof(struct iphdr, saddr))
#define IP_DST_OFF (IP_OFF + offsetof(struct iphdr, daddr))
#define IP6_SRC_OFF (IP_OFF + offsetof(struct ipv6hdr, saddr))
#define IP6_DST_OFF (IP_OFF + offsetof(struct ipv6hdr, daddr))

/* bpf_l4_csum_replace(): the pseudo-header change is IPv6's, so a CHECKSUM_COMPLETE skb's
 * csum stays as it is (there is no IPv6 header checksum to offset it). Kernels before 6.16 do
 * not know the flag (-EINVAL): lb_tc_rewrite6() retries without it. */
#ifndef BPF_F_IPV6
#define BPF_F_IPV6 (1ULL << 7)
#endif

static __always_inline int lb_tc_rewrite4(struct __sk_buff *skb, struct lb_nat *nat,
					  __u32 csum_off, __u64 mangled)
{
	__be32 old_src = nat->old_src.w[3], new_src = nat->new_src.w[3];
	__be32 old_dst = nat->old_dst.w[3], new_dst = nat->new_dst.w[3];
	int err = 0;

	err |= bpf_l4_csum_replace(skb, csum_off, old_src, new_src,
				   BPF_F_PSEUDO_HDR | mangled | sizeof(__be32));
	err |= bpf_l4_csum_replace(skb, csum_off, old_dst, new_dst,
				   BPF_F_PSEUDO_HDR | mangled | sizeof(__be32));
	err |= bpf_l3_csum_replace(skb, IP_CSUM_OFF, old_src, new_src, sizeof(__be32));
	err |= bpf_l3_csum_replace(skb, IP_CSUM_OFF, old_dst, new_dst, sizeof(__be32));
	err |= bpf_skb_store_bytes(skb, IP_SRC_OFF, &new_src, sizeof(__be32), 0);
	err |= bpf_skb_store_bytes(skb, IP_DST_OFF, &new_dst, sizeof(__be32), 0);
	return err;
}

static __always_inline int lb_tc_rewrite6(struct __sk_buff *skb, struct lb_nat *nat,
					  __u32 csum_off, __u64 mangled)
{
	/* The addresses' change to the L4 checksum (through the pseudo-header) as one diff. */
	__s64 diff = bpf_csum_diff(nat->old_src.w, sizeof(nat->old_src), nat->new_src.w,
				   sizeof(nat->new_src), 0);
	if (diff < 0)
		return -1;
	diff = bpf_csum_diff(nat->old_dst.w, sizeof(nat->old_dst), nat->new_dst.w,
			     sizeof(nat->new_dst), (__wsum)diff);
	if (diff < 0)
		return -1;
	int err = bpf_l4_csum_replace(skb, csum_off, 0, diff,
				      BPF_F_PSEUDO_HDR | BPF_F_IPV6 | mangled);
	if (err == -22 /* EINVAL: no BPF_F_IPV6 before 6.16 */)
		err = bpf_l4_csum_replace(skb, csum_off, 0, diff, BPF_F_PSEUDO_HDR | mangled);
	err |= bpf_skb_store_bytes(skb, IP6_SRC_OFF, nat->new_src.w, sizeof(nat->new_src), 0);
	err |= bpf_skb_store_bytes(skb, IP6_DST_OFF, nat->new_dst.w, sizeof(nat->new_dst), 0);
	return err;
}

static __always_inline int lb_tc_rewrite(struct __sk_buff *skb, struct lb_nat *nat)
{
	__u32 csum_off = nat->l4_off + (nat->proto == IPPROTO_TCP ? 16 : 6);
	/* A UDP checksum of 0 means "none" and must stay so; a computed 0 is sent as 0xffff.
	 * (IPv6 UDP always carries a checksum, RFC 8200 8.1, so the mark changes nothing.) */
	__u64 mangled = nat->proto == IPPROTO_UDP ? BPF_F_MARK_MANGLED_0 : 0;
	int err = nat->v6 ? lb_tc_rewrite6(skb, nat, csum_off, mangled)
			  : lb_tc_rewrite4(skb, nat, csum_off, mangled);

	err |= bpf_l4_csum_replace(skb, csum_off, nat->old_sport, nat->new_sport,
				   mangled | sizeof(__be16));
	err |= bpf_l4_csum_replace(skb, csum_off, nat->old_dport, nat->new_dport,
				   mangled | sizeof(__be16));
	err |= bpf_skb_store_bytes(skb, nat->l4_off, &nat->new_sport, sizeof(__be16), 0);
	err |= bpf_skb_store_bytes(skb, nat->l4_off + 2, &nat->new_dport, sizeof(__be16), 0);
	return err;
}

/* Lowers the MSS option of the TCP SYN at `l4_off` to `max`: the peer then never sends a
 * segment that the encapsulation header would push over the path's MTU. */
static __always_inline int lb_tc_clamp_mss(struct __sk_buff *skb, __u32 l4_off, __u16 max)
{
	__u8 doff;

	if (bpf_skb_load_bytes(skb, l4_off + 12, &doff, 1))
		return -1;
	__u32 end = l4_off + (doff >> 4) * 4;
	__u32 off = l4_off + sizeof(struct tcphdr);
	/* At most 40 bytes of options, each at least one byte long. */
	for (int i = 0; i < 40 && off + 2 <= end; i++) {
		__u8 opt[2];
		if (bpf_skb_load_bytes(skb, off, opt, sizeof(opt)))
			return -1;
		if (opt[0] == 0 /* end of options */)
			return 0;
		if (opt[0] == 1 /* no-operation */) {
			off++;
			continue;
		}
		if (opt[1] < 2)
			return 0;
		if (opt[0] == 2 /* MSS */ && opt[1] == 4 && off + 4 <= end) {
			__be16 mss, lower = bpf_htons(max);
			if (bpf_skb_load_bytes(skb, off + 2, &mss, sizeof(mss)))
				return -1;
			if (bpf_ntohs(mss) <= max)
				return 0;
			if (bpf_l4_csum_replace(skb, l4_off + offsetof(struct tcphdr, check), mss,
						lower, sizeof(lower)))
				return -1;
			return bpf_skb_store_bytes(skb, off + 2, &lower, sizeof(lower), 0);
		}
		off += opt[1];
	}
	return 0;
}

/* Direct server return: the client's packet, as it came, inside an IPv4 header from the LB's
 * address to the backend (IP-in-IP, which the backend's datapath takes off). */
static __always_inline int lb_tc_encap(struct __sk_buff *skb, const struct lb_nat *nat,
				       const struct lb_config *cfg)
{
	struct iphdr inner;
	__u32 mtu = 0;

	if (nat->v6 || lb_addr_is_zero(&cfg->snat_ip4))
		return -1;
	if (bpf_skb_load_bytes(skb, IP_OFF, &inner, sizeof(inner)))
		return -1;
	__u32 tot_len = bpf_ntohs(inner.tot_len) + sizeof(struct iphdr);
	if (tot_len > 0xffff)
		return -1;
	/* The device's MTU (bpf_check_mtu() reports it whatever its verdict). */
	if (nat->syn && bpf_check_mtu(skb, cfg->ifindex, &mtu, 0, 0) >= 0 &&
	    mtu >= 576 /* IPv4's least (RFC 791) */ &&
	    lb_tc_clamp_mss(skb, nat->l4_off,
			    mtu - 2 * sizeof(struct iphdr) - sizeof(struct tcphdr)))
		return -1;
	/* Room for the outer header after the Ethernet header; for a GSO packet the kernel
	 * lowers the segment size to match and marks it IP-in-IP. */
	if (bpf_skb_adjust_room(skb, sizeof(struct iphdr), BPF_ADJ_ROOM_MAC,
				BPF_F_ADJ_ROOM_ENCAP_L3_IPV4))
		return -1;
	struct iphdr outer = {
		.version = 4,
		.ihl = 5,
		.tos = inner.tos,
		.tot_len = bpf_htons(tot_len),
		.frag_off = inner.frag_off & bpf_htons(0x4000 /* DF */),
		.ttl = 64,
		.protocol = IPPROTO_IPIP,
		.saddr = cfg->snat_ip4.w[3],
		.daddr = nat->new_dst.w[3],
	};
	__s64 sum = bpf_csum_diff(NULL, 0, (__be32 *)&outer, sizeof(outer), 0);
	if (sum < 0)
		return -1;
	__u32 c = (__u32)sum;
	c = (c & 0xffff) + (c >> 16);
	c = (c & 0xffff) + (c >> 16);
	outer.check = (__u16)~c;
	return bpf_skb_store_bytes(skb, IP_OFF, &outer, sizeof(outer), 0);
}

SEC("classifier")
int lb_ingress(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	/* Never both: a union keeps the stack of the call chain under 512 bytes. */
	union {
		struct lb_nat nat;
		struct lb_ndp ndp;
	} out = {};
	__u32 zero = 0;

	switch (lb_decide(data, data_end, skb->len, &out.nat, &out.ndp)) {
	case LB_ACT_DROP:
		return TC_ACT_SHOT;
	case LB_ACT_TX:
		return bpf_redirect(skb->ifindex, 0);
	case LB_ACT_NDP:
		/* The NS becomes the NA: grown (an NS without options) or cut (options beyond the
		 * first) to the NA's size, then written whole. */
		if (bpf_skb_change_tail(skb, LB_NA_FRAME_LEN, 0) ||
		    bpf_skb_pull_data(skb, LB_NA_FRAME_LEN))
			return TC_ACT_SHOT;
		data = (void *)(long)skb->data;
		data_end = (void *)(long)skb->data_end;
		if (lb_ndp_write(data, data_end, &out.ndp))
			return TC_ACT_SHOT;
		return bpf_redirect(skb->ifindex, 0);
	case LB_ACT_NAT: {
		struct lb_config *cfg = bpf_map_lookup_elem(&lb_config, &zero);
		if (!cfg || lb_tc_rewrite(skb, &out.nat) != 0)
			return TC_ACT_SHOT;
		return bpf_redirect_neigh(cfg->ifindex ? cfg->ifindex : skb->ifindex, NULL, 0, 0);
	}
	case LB_ACT_ENCAP: {
		struct lb_config *cfg = bpf_map_lookup_elem(&lb_config, &zero);
		if (!cfg || lb_tc_encap(skb, &out.nat, cfg) != 0) {
			lb_count(LB_REASON_DROP_NO_ROUTE, skb->len);
			return TC_ACT_SHOT;
		}
		return bpf_redirect_neigh(cfg->ifindex ? cfg->ifindex : skb->ifindex, NULL, 0, 0);
	}
	default:
		return TC_ACT_OK;
	}
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
