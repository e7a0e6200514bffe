/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * The L4 load balancer at TC (TCX ingress of the LB host's interface): the packet logic is in
 * lb_core.h; this entry point applies translations with the skb checksum helpers, which keep
 * CHECKSUM_PARTIAL and CHECKSUM_COMPLETE skbs right, and sends translated packets out with
 * bpf_redirect_neigh(), which resolves the next hop's MAC in the kernel's neighbour table.
 * TC, not XDP, because native XDP on a veth collapses TCP throughput (DESIGN.md).
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

static __always_inline int lb_tc_rewrite(struct __sk_buff *skb, struct lb_nat *nat)
{
	__u32 csum_off = nat->l4_off + (nat->proto == IPPROTO_TCP ? 16 : 6);
	/* A UDP checksum of 0 means "none" and must stay so; a computed 0 is sent as 0xffff. */
	__u64 mangled = nat->proto == IPPROTO_UDP ? BPF_F_MARK_MANGLED_0 : 0;
	int err = 0;

	err |= bpf_l4_csum_replace(skb, csum_off, nat->old_src, nat->new_src,
				   BPF_F_PSEUDO_HDR | mangled | sizeof(__be32));
	err |= bpf_l4_csum_replace(skb, csum_off, nat->old_dst, nat->new_dst,
				   BPF_F_PSEUDO_HDR | mangled | sizeof(__be32));
	err |= bpf_l4_csum_replace(skb, csum_off, nat->old_sport, nat->new_sport,
				   mangled | sizeof(__be16));
	err |= bpf_l4_csum_replace(skb, csum_off, nat->old_dport, nat->new_dport,
				   mangled | sizeof(__be16));
	err |= bpf_l3_csum_replace(skb, IP_CSUM_OFF, nat->old_src, nat->new_src, sizeof(__be32));
	err |= bpf_l3_csum_replace(skb, IP_CSUM_OFF, nat->old_dst, nat->new_dst, sizeof(__be32));
	err |= bpf_skb_store_bytes(skb, IP_SRC_OFF, &nat->new_src, sizeof(__be32), 0);
	err |= bpf_skb_store_bytes(skb, IP_DST_OFF, &nat->new_dst, sizeof(__be32), 0);
	err |= bpf_skb_store_bytes(skb, nat->l4_off, &nat->new_sport, sizeof(__be16), 0);
	err |= bpf_skb_store_bytes(skb, nat->l4_off + 2, &nat->new_dport, sizeof(__be16), 0);
	return err;
}

SEC("classifier")
int lb_ingress(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct lb_nat nat = {};
	__u32 zero = 0;

	switch (lb_decide(data, data_end, skb->len, &nat)) {
	case LB_ACT_DROP:
		return TC_ACT_SHOT;
	case LB_ACT_TX:
		return bpf_redirect(skb->ifindex, 0);
	case LB_ACT_NAT: {
		struct lb_config *cfg = bpf_map_lookup_elem(&lb_config, &zero);
		if (!cfg || lb_tc_rewrite(skb, &nat) != 0)
			return TC_ACT_SHOT;
		return bpf_redirect_neigh(cfg->ifindex ? cfg->ifindex : skb->ifindex, NULL, 0, 0);
	}
	default:
		return TC_ACT_OK;
	}
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
