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

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, SLIPWAY_MAX_NAT_FLOWS);
	__type(key, struct nat_tuple);
	__type(value, struct nat_forward);
} nat_flows SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, SLIPWAY_MAX_NAT_FLOWS);
	__type(key, struct nat_tuple);
	__type(value, struct nat_reply);
} nat_reverse SEC(".maps");

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

/* Offsets in a frame with an option-less IPv4 header (the NAT paths handle only those). */
#define ETH_HLEN_ 14
#define IP_CSUM_OFF (ETH_HLEN_ + 10)
#define IP_SADDR_OFF (ETH_HLEN_ + 12)
#define IP_DADDR_OFF (ETH_HLEN_ + 16)
#define L4_OFF (ETH_HLEN_ + 20)

/* The packet's TCP/UDP tuple; 0 if it has none we translate (other protocols, IP options,
 * fragments, truncation). */
static __always_inline int read_tuple(struct __sk_buff *skb, struct nat_tuple *t)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	struct iphdr *ip4 = data + ETH_HLEN_;
	__be16 *ports = data + L4_OFF;

	if ((void *)(ports + 2) > data_end || eth->h_proto != bpf_htons(ETH_P_IP) ||
	    ip4->version != 4 || ip4->ihl != 5)
		return 0;
	if (ip4->protocol != IPPROTO_TCP && ip4->protocol != IPPROTO_UDP)
		return 0;
	if (ip4->frag_off & bpf_htons(0x3fff))
		return 0;
	t->saddr = ip4->saddr;
	t->daddr = ip4->daddr;
	t->sport = ports[0];
	t->dport = ports[1];
	t->proto = ip4->protocol;
	return 1;
}

/* Rewrites the tuple's addresses and ports to `to`, keeping the IPv4 and L4 checksums right. */
static __always_inline int rewrite_tuple(struct __sk_buff *skb, const struct nat_tuple *from,
					 const struct nat_tuple *to)
{
	__u32 csum_off = L4_OFF + (from->proto == IPPROTO_TCP ? 16 : 6);
	/* A UDP checksum of 0 means "none": leave it so (BPF_F_MARK_MANGLED_0). */
	__u64 l4_flags = from->proto == IPPROTO_UDP ? BPF_F_MARK_MANGLED_0 : 0;

	if (from->saddr != to->saddr) {
		if (bpf_l4_csum_replace(skb, csum_off, from->saddr, to->saddr,
					l4_flags | BPF_F_PSEUDO_HDR | 4) ||
		    bpf_l3_csum_replace(skb, IP_CSUM_OFF, from->saddr, to->saddr, 4) ||
		    bpf_skb_store_bytes(skb, IP_SADDR_OFF, &to->saddr, 4, 0))
			return -1;
	}
	if (from->daddr != to->daddr) {
		if (bpf_l4_csum_replace(skb, csum_off, from->daddr, to->daddr,
					l4_flags | BPF_F_PSEUDO_HDR | 4) ||
		    bpf_l3_csum_replace(skb, IP_CSUM_OFF, from->daddr, to->daddr, 4) ||
		    bpf_skb_store_bytes(skb, IP_DADDR_OFF, &to->daddr, 4, 0))
			return -1;
	}
	if (from->sport != to->sport) {
		if (bpf_l4_csum_replace(skb, csum_off, from->sport, to->sport, l4_flags | 2) ||
		    bpf_skb_store_bytes(skb, L4_OFF, &to->sport, 2, 0))
			return -1;
	}
	if (from->dport != to->dport) {
		if (bpf_l4_csum_replace(skb, csum_off, from->dport, to->dport, l4_flags | 2) ||
		    bpf_skb_store_bytes(skb, L4_OFF + 2, &to->dport, 2, 0))
			return -1;
	}
	return 0;
}

/* If the packet is a reply of a translated NodePort flow, restores its addresses (the client
 * sees the node and NodePort it connected to) and sends it out of the underlay toward the
 * client, past the host stack, which would drop a forwarded packet carrying its own address as
 * source. Returns -1 when the packet is no such reply. */
static __always_inline int nodeport_reply(struct __sk_buff *skb)
{
	struct nat_tuple seen = {};
	__u32 zero = 0;

	if (!read_tuple(skb, &seen))
		return -1;
	struct nat_reply *reply = bpf_map_lookup_elem(&nat_reverse, &seen);
	if (!reply)
		return -1;
	struct node_config *cfg = bpf_map_lookup_elem(&node_config, &zero);
	struct nat_tuple restored = {
		.saddr = reply->saddr,
		.daddr = reply->daddr,
		.sport = reply->sport,
		.dport = reply->dport,
		.proto = seen.proto,
	};
	if (!cfg || rewrite_tuple(skb, &seen, &restored)) {
		count(skb->ifindex, 0, SLIPWAY_REASON_DROP_NODEPORT, skb->len);
		return TC_ACT_SHOT;
	}
	count(skb->ifindex, cfg->underlay_ifindex, SLIPWAY_REASON_NODEPORT_REPLY, skb->len);
	/* No next hop given: the kernel looks the client up in the FIB and resolves it. */
	return bpf_redirect_neigh(cfg->underlay_ifindex, NULL, 0, 0);
}

#endif /* SLIPWAY_NODE_H */
