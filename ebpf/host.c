/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * TC program for a host's devices that bring pod traffic in from other hosts (attached with
 * TCX at ingress): the underlay device (native routing) and the external VXLAN device (which
 * hands the program the decapsulated frame; the VXLAN packet itself passes the underlay's
 * program untouched on its way there). A request to a NodePort of this host is translated
 * to a backend (ebpf/include/nat.h), and a reply of a translated flow back; a load balancer's
 * IP-in-IP request (direct server return) is taken out and translated the same way; a packet
 * for a local pod goes straight into its namespace, if its ingress policy allows; everything
 * else goes to the host stack.
 */
#include <linux/udp.h>

#include "nat.h"

#ifndef IPPROTO_IPIP
#define IPPROTO_IPIP 4
#endif
/* BPF_F_ADJ_ROOM_DECAP_L3_IPV4 (kernel 6.3; older uapi headers lack it): the packet is IPv4
 * after the outer header goes. */
#define ADJ_ROOM_DECAP_L3_IPV4 (1ULL << 7)

/* A client's request that a load balancer sent here with direct server return: the packet as
 * the client sent it (to the VIP), inside an IPv4 header of the load balancer's (IP-in-IP).
 * Taken out, it is translated like a NodePort request; its backend's reply goes to the client
 * from this host (nat_reply()), never back through the load balancer. Only a request to a
 * service of this node is let in: the inner packet could carry any source. Returns -1 when the
 * packet is no IP-in-IP. */
static __always_inline int dsr_request(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	struct iphdr *outer = data + ETH_HLEN_;

	if ((void *)(outer + 1) > data_end || eth->h_proto != bpf_htons(ETH_P_IP) ||
	    outer->protocol != IPPROTO_IPIP)
		return -1;
	/* The segment size stays the inner packet's (FIXED_GSO): it is what the client sent. */
	if (outer->ihl != 5 || (outer->frag_off & bpf_htons(0x3fff)) ||
	    bpf_skb_adjust_room(skb, -(__s32)sizeof(struct iphdr), BPF_ADJ_ROOM_MAC,
				BPF_F_ADJ_ROOM_FIXED_GSO | ADJ_ROOM_DECAP_L3_IPV4)) {
		count(skb->ifindex, 0, SLIPWAY_REASON_DROP_DSR, skb->len);
		return TC_ACT_SHOT;
	}
	count(skb->ifindex, 0, SLIPWAY_REASON_DSR_DECAP, skb->len);
	int done = service_request(skb, 0);
	if (done >= 0)
		return done;
	count(skb->ifindex, 0, SLIPWAY_REASON_DROP_DSR, skb->len);
	return TC_ACT_SHOT;
}

/* Whether the packet is the cluster's VXLAN to this host: the VXLAN device takes it out, and
 * this program sees (and counts) the pod's packet inside there; nothing here is for the
 * outer packet. */
static __always_inline int vxlan_to_this_host(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	struct iphdr *ip4 = data + ETH_HLEN_;
	struct udphdr *udp = data + ETH_HLEN_ + sizeof(struct iphdr);
	__u32 zero = 0;

	if ((void *)(udp + 1) > data_end || eth->h_proto != bpf_htons(ETH_P_IP) ||
	    ip4->protocol != IPPROTO_UDP || ip4->ihl != 5)
		return 0;
	struct node_config *cfg = bpf_map_lookup_elem(&node_config, &zero);
	return cfg && cfg->underlay_ip4 && ip4->daddr == cfg->underlay_ip4 &&
	       udp->dest == bpf_htons(cfg->vxlan_port);
}

SEC("classifier")
int from_netdev(struct __sk_buff *skb)
{
	if (vxlan_to_this_host(skb))
		return TC_ACT_OK;
	/* NodePort translation first: it moves the packet, so nothing parsed before it would
	 * stay valid. */
	int done = nat_reply(skb, 0);
	if (done >= 0)
		return done;
	done = service_request(skb, 0);
	if (done >= 0)
		return done;
	done = dsr_request(skb);
	if (done >= 0)
		return done;

	struct parsed p;
	int verdict = parse_ipv4(skb, &p);

	if (!p.ip4)
		return verdict;

	struct endpoint_key key = { .ip4 = p.ip4->daddr };
	struct endpoint_info *ep = bpf_map_lookup_elem(&endpoints, &key);
	if (ep && !policy_allows(skb, p.ip4, 0, 1))
		return drop_policy(skb);
	if (ep)
		return deliver_local(skb, p.eth, ep);

	count(skb->ifindex, 0, SLIPWAY_REASON_PASS_NO_ENDPOINT, skb->len);
	return TC_ACT_OK;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
