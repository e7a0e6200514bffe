/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * The node datapath shared by the programs on pod veths and on host devices: the maps that say
 * where a pod lives (`endpoints` on this host, `routes` to other hosts) and the two ways out of
 * a program — into a local pod's namespace, or toward the host that owns the destination.
 * Every object that includes this declares the same maps; the loader pins them by name so that
 * all programs of a node share one copy.
 */
#ifndef SLIPWAY_NODE_H
#define SLIPWAY_NODE_H

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

#include "abi.h"
#include "counters.h"
#include "policy.h"

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, SLIPWAY_MAX_ENDPOINTS);
	__type(key, struct endpoint_key);
	__type(value, struct endpoint_info);
} endpoints SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, SLIPWAY_MAX_ROUTES);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct route_key);
	__type(value, struct route_info);
} routes SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct node_config);
} node_config SEC(".maps");

/* Where an IPv4 packet is headed after parsing; NULL ip4 means "not IPv4 we can handle". */
struct parsed {
	struct ethhdr *eth;
	struct iphdr *ip4;
};

/* Parses Ethernet + IPv4. Returns TC_ACT_OK with p->ip4 set, TC_ACT_OK with p->ip4 NULL for
 * non-IPv4 (counted), or TC_ACT_SHOT for malformed frames (counted). */
static __always_inline int parse_ipv4(struct __sk_buff *skb, struct parsed *p)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	struct iphdr *ip4 = data + sizeof(*eth);

	p->eth = eth;
	p->ip4 = NULL;
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
	p->ip4 = ip4;
	return TC_ACT_OK;
}

/* Drops a packet NetworkPolicy denies. */
static __always_inline int drop_policy(struct __sk_buff *skb)
{
	count(skb->ifindex, 0, SLIPWAY_REASON_DROP_POLICY, skb->len);
	return TC_ACT_SHOT;
}

/* Hands the frame to local pod `ep`: it arrives on the pod's eth0, from its gateway. */
static __always_inline int deliver_local(struct __sk_buff *skb, struct ethhdr *eth,
					 const struct endpoint_info *ep)
{
	__builtin_memcpy(eth->h_dest, ep->pod_mac, ETH_ALEN);
	__builtin_memcpy(eth->h_source, ep->host_mac, ETH_ALEN);
	count(skb->ifindex, ep->ifindex, SLIPWAY_REASON_REDIRECT_PEER, skb->len);
	return bpf_redirect_peer(ep->ifindex, 0);
}

/* Sends the packet toward the host that owns `route`. The caller has checked that daddr is no
 * local endpoint. */
static __always_inline int forward_remote(struct __sk_buff *skb, const struct route_info *route)
{
	__u32 zero = 0;
	struct node_config *cfg = bpf_map_lookup_elem(&node_config, &zero);

	if (!cfg) {
		count(skb->ifindex, 0, SLIPWAY_REASON_DROP_NO_ROUTE, skb->len);
		return TC_ACT_SHOT;
	}
	if (route->mode == SLIPWAY_ROUTE_VXLAN && cfg->vxlan_ifindex) {
		struct bpf_tunnel_key key = {
			.remote_ipv4 = bpf_ntohl(route->host_ip4),
			.tunnel_id = cfg->vni,
			.tunnel_ttl = 64,
		};
		if (bpf_skb_set_tunnel_key(skb, &key, sizeof(key), BPF_F_ZERO_CSUM_TX) < 0) {
			count(skb->ifindex, 0, SLIPWAY_REASON_DROP_NO_ROUTE, skb->len);
			return TC_ACT_SHOT;
		}
		count(skb->ifindex, cfg->vxlan_ifindex, SLIPWAY_REASON_REDIRECT_VXLAN, skb->len);
		return bpf_redirect(cfg->vxlan_ifindex, 0);
	}
	if (route->mode == SLIPWAY_ROUTE_NATIVE && cfg->underlay_ifindex) {
		struct bpf_redir_neigh nh = {
			.nh_family = 2 /* AF_INET */,
			.ipv4_nh = route->host_ip4,
		};
		count(skb->ifindex, cfg->underlay_ifindex, SLIPWAY_REASON_REDIRECT_NATIVE, skb->len);
		return bpf_redirect_neigh(cfg->underlay_ifindex, &nh, sizeof(nh), 0);
	}
	count(skb->ifindex, 0, SLIPWAY_REASON_DROP_NO_ROUTE, skb->len);
	return TC_ACT_SHOT;
}

/* The route to the host that owns `daddr`'s block, or NULL. */
static __always_inline struct route_info *lookup_route(__be32 daddr)
{
	struct route_key key = { .prefixlen = 32, .ip4 = daddr };

	return bpf_map_lookup_elem(&routes, &key);
}

#endif /* SLIPWAY_NODE_H */
