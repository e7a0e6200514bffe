/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * TC program for the host side of a pod's veth (attached with TCX at ingress, i.e. on packets
 * the pod sends). A packet for another local pod is handed straight into that pod's network
 * namespace with bpf_redirect_peer(): no bridge, no routing table, no iptables. Everything else
 * goes to the host stack.
 */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/ip.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

#include "abi.h"
#include "counters.h"

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, SLIPWAY_MAX_ENDPOINTS);
	__type(key, struct endpoint_key);
	__type(value, struct endpoint_info);
} endpoints SEC(".maps");

SEC("classifier")
int from_pod(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	struct iphdr *ip4 = data + sizeof(*eth);

	if ((void *)(eth + 1) > data_end) {
		count(skb->ifindex, 0, SLIPWAY_REASON_DROP_MALFORMED, skb->len);
		return TC_ACT_SHOT;
	}
	if (eth->h_proto != bpf_htons(ETH_P_IP)) {
		count(skb->ifindex, 0, SLIPWAY_REASON_PASS_NOT_IPV4, skb->len);
		return TC_ACT_OK;
	}
	if ((void *)(ip4 + 1) > data_end || ip4->ihl < 5 || ip4->version != 4) {
		count(skb->ifindex, 0, SLIPWAY_REASON_DROP_MALFORMED, skb->len);
		return TC_ACT_SHOT;
	}

	struct endpoint_key key = { .ip4 = ip4->daddr };
	struct endpoint_info *ep = bpf_map_lookup_elem(&endpoints, &key);
	if (!ep) {
		count(skb->ifindex, 0, SLIPWAY_REASON_PASS_NO_ENDPOINT, skb->len);
		return TC_ACT_OK;
	}

	/* The destination pod accepts frames addressed to its eth0, and sees them come from its
	 * gateway, the host side of its own veth. */
	__builtin_memcpy(eth->h_dest, ep->pod_mac, ETH_ALEN);
	__builtin_memcpy(eth->h_source, ep->host_mac, ETH_ALEN);
	count(skb->ifindex, ep->ifindex, SLIPWAY_REASON_REDIRECT_PEER, skb->len);
	return bpf_redirect_peer(ep->ifindex, 0);
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
