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
#include <linux/udp.h>
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

/* The headers put before a pod's frame to carry it to another host in VXLAN (RFC 7348): IPv4
 * and UDP to the host's VXLAN port, then the VXLAN header; the pod's Ethernet frame follows
 * as the inner frame. */
struct vxlan_outer {
	struct iphdr ip;
	struct udphdr udp;
	__be32 vx_flags;
	__be32 vx_vni;
	struct ethhdr inner;
};

/* What the encapsulation adds (the struct's tail padding aside). */
#define VXLAN_OUTER_LEN ((__u32)__builtin_offsetof(struct vxlan_outer, inner) + ETH_HLEN)
/* The VXLAN header's I flag: the VNI field is valid. */
#define VXLAN_FLAG_VNI 0x08000000
/* The source ports of the outer UDP, spread by the inner flow's hash as the kernel's VXLAN
 * device does (its default range, net.ipv4.ip_local_port_range's). */
#define VXLAN_SPORT_MIN 32768
#define VXLAN_SPORT_SPAN 28232

/* Puts the frame inside VXLAN to `remote` and sends it out of the underlay device, by the
 * kernel's route to `remote` and its neighbour table: the encapsulation the VXLAN device would
 * do, without its netfilter hooks and its transmit path. The segment size stays the
 * pod's, whose MTU leaves room for the outer headers; the kernel segments the result as any
 * UDP tunnel packet. Returns -1 when this cannot be done here (then the VXLAN device does it):
 * no underlay address configured, or a packet too long for one outer IPv4 header. */
static __always_inline int vxlan_encap(struct __sk_buff *skb, const struct node_config *cfg,
				       __be32 remote)
{
	struct vxlan_outer h = {};
	__u32 outer_len = skb->len - ETH_HLEN + VXLAN_OUTER_LEN;

	if (!cfg->underlay_ip4 || !cfg->underlay_ifindex || outer_len > 0xffff ||
	    bpf_skb_load_bytes(skb, 0, &h.inner, ETH_HLEN) < 0)
		return -1;
	__u32 span = ((__u64)bpf_get_hash_recalc(skb) * VXLAN_SPORT_SPAN) >> 32;
	h.ip.version = 4;
	h.ip.ihl = 5;
	h.ip.tot_len = bpf_htons(outer_len);
	h.ip.id = bpf_htons(bpf_get_prandom_u32() & 0xffff);
	h.ip.ttl = 64;
	h.ip.protocol = IPPROTO_UDP;
	h.ip.saddr = cfg->underlay_ip4;
	h.ip.daddr = remote;
	__s64 sum = bpf_csum_diff(NULL, 0, (__be32 *)&h.ip, sizeof(h.ip), 0);
	if (sum < 0)
		return -1;
	sum = (sum & 0xffff) + (sum >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	h.ip.check = ~(__u16)sum;
	h.udp.source = bpf_htons(VXLAN_SPORT_MIN + span);
	h.udp.dest = bpf_htons(cfg->vxlan_port);
	h.udp.len = bpf_htons(outer_len - sizeof(struct iphdr));
	/* Checksum 0: none (IPv4 allows it), as the VXLAN device sends it. */
	h.vx_flags = bpf_htonl(VXLAN_FLAG_VNI);
	h.vx_vni = bpf_htonl(cfg->vni << 8);
	if (bpf_skb_adjust_room(skb, VXLAN_OUTER_LEN, BPF_ADJ_ROOM_MAC,
				BPF_F_ADJ_ROOM_FIXED_GSO | BPF_F_ADJ_ROOM_ENCAP_L3_IPV4 |
					BPF_F_ADJ_ROOM_ENCAP_L4_UDP | BPF_F_ADJ_ROOM_ENCAP_L2_ETH |
					BPF_F_ADJ_ROOM_ENCAP_L2(ETH_HLEN)) < 0)
		return -1;
	if (bpf_skb_store_bytes(skb, ETH_HLEN, &h.ip, VXLAN_OUTER_LEN, 0) < 0) {
		count(skb->ifindex, 0, SLIPWAY_REASON_DROP_NO_ROUTE, skb->len);
		return TC_ACT_SHOT;
	}
	count(skb->ifindex, cfg->underlay_ifindex, SLIPWAY_REASON_REDIRECT_VXLAN, skb->len);
	/* No next hop given: the kernel routes the outer packet (out of the underlay device), so a
	 * remote host behind a router (another zone's subnet) is reached through that router. */
	return bpf_redirect_neigh(cfg->underlay_ifindex, NULL, 0, 0);
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
		int done = vxlan_encap(skb, cfg, route->host_ip4);
		if (done >= 0)
			return done;
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
