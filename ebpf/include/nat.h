/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Per-packet address translation, shared by the pod veth and host device programs:
 *
 * - services: a request to a service address (a ClusterIP, or this node's address with a
 *   NodePort) that no socket program translated is sent to a backend, and the flow is recorded
 *   both ways (`nat_flows`: request -> backend, so the flow keeps its backend; `nat_reverse`:
 *   the reply as the backend sends it -> what it is restored to);
 * - flows through the host stack: a pod's flow to one of this host's own addresses is handled
 *   by the stack, which may DNAT it to a local pod (a hostPort); that pod's replies must go back
 *   through the stack to be translated back, never straight into the client's namespace
 *   (`stack_flows`).
 */
#ifndef SLIPWAY_NAT_H
#define SLIPWAY_NAT_H

#include <linux/tcp.h>

#include "fill.h"
#include "node.h"
#include "services.h"

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

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, SLIPWAY_MAX_NAT_FLOWS);
	__type(key, struct stack_flow_key);
	__type(value, __u32);
} stack_flows SEC(".maps");

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

/* Translates a request to a service to a backend. The first packet of a flow picks one and
 * records the flow both ways; later packets follow the record. From a pod (`from_pod`) the
 * client is local, so the backend's reply comes back through this host by itself (unless the
 * pod is its own backend); from outside, a backend on another host also gets the request's
 * source rewritten to this host's router address so that its reply returns here. The translated packet is then policed and
 * delivered like any other. Returns -1 when the packet is no request to a service. */
static __always_inline int service_request(struct __sk_buff *skb, int from_pod)
{
	struct nat_tuple req = {};
	__u32 zero = 0;

	if (!read_tuple(skb, &req))
		return -1;
	struct nat_forward *fwd = bpf_map_lookup_elem(&nat_flows, &req);
	struct nat_forward fresh = {};
	if (!fwd) {
		struct svc_key key = { .ip4 = req.daddr, .port = req.dport, .proto = req.proto };
		struct svc_addr backend = {};
		enum svc_pick pick = svc_pick(&key, &backend);

		if (pick == SVC_PICK_NOT_SERVICE)
			return -1;
		if (pick != SVC_PICK_FOUND) {
			count(skb->ifindex, 0, SLIPWAY_REASON_DROP_NODEPORT, skb->len);
			return TC_ACT_SHOT;
		}
		struct endpoint_key local = { .ip4 = backend.ip4 };
		struct node_config *cfg = bpf_map_lookup_elem(&node_config, &zero);
		fresh.backend_ip4 = backend.ip4;
		fresh.backend_port = backend.port;
		/* From outside, a remote backend's reply must come back here. From a pod that is
		 * its own backend, the request must not arrive from the pod's own address (which it
		 * would drop as a martian), and the reply must come back through its veth to be
		 * translated: both as kube-proxy's hairpin masquerade does. */
		fresh.snat = from_pod ? backend.ip4 == req.saddr :
					!bpf_map_lookup_elem(&endpoints, &local);
		fresh.snat_ip4 = cfg ? cfg->router_ip4 : 0;
		if (fresh.snat && !fresh.snat_ip4) {
			count(skb->ifindex, 0, SLIPWAY_REASON_DROP_NODEPORT, skb->len);
			return TC_ACT_SHOT;
		}
		/* The reply as the backend will send it, and what it becomes. */
		struct nat_tuple reply_key = {
			.saddr = backend.ip4,
			.daddr = fresh.snat ? fresh.snat_ip4 : req.saddr,
			.sport = backend.port,
			.dport = req.sport,
			.proto = req.proto,
		};
		struct nat_reply restore = {
			.saddr = req.daddr,
			.daddr = req.saddr,
			.sport = req.dport,
			.dport = req.sport,
		};
		if (fill_update(&nat_reverse, SLIPWAY_MAP_NAT_REVERSE, &reply_key, &restore) ||
		    fill_update(&nat_flows, SLIPWAY_MAP_NAT_FLOWS, &req, &fresh)) {
			count(skb->ifindex, 0, SLIPWAY_REASON_DROP_NODEPORT, skb->len);
			return TC_ACT_SHOT;
		}
		if (from_pod)
			svc_count(req.proto == IPPROTO_TCP ? SVC_EVENT_PACKET_TCP :
							     SVC_EVENT_PACKET_UDP);
		fwd = &fresh;
	}
	struct nat_tuple out = {
		.saddr = fwd->snat ? fwd->snat_ip4 : req.saddr,
		.daddr = fwd->backend_ip4,
		.sport = req.sport,
		.dport = fwd->backend_port,
		.proto = req.proto,
	};
	__be32 backend_ip4 = fwd->backend_ip4;
	if (rewrite_tuple(skb, &req, &out)) {
		count(skb->ifindex, 0, SLIPWAY_REASON_DROP_NODEPORT, skb->len);
		return TC_ACT_SHOT;
	}
	count(skb->ifindex, 0,
	      from_pod ? SLIPWAY_REASON_SERVICE_REQUEST : SLIPWAY_REASON_NODEPORT_REQUEST,
	      skb->len);

	/* The rewrite moved the packet: parse it afresh before handing it on. */
	struct parsed p;
	parse_ipv4(skb, &p);
	if (!p.ip4)
		return TC_ACT_SHOT;
	struct endpoint_key key = { .ip4 = backend_ip4 };
	struct endpoint_info *ep = bpf_map_lookup_elem(&endpoints, &key);
	/* Decided on the translated packet: policies name pods, not service addresses. */
	if ((from_pod || ep) && !policy_allows(skb, p.ip4, from_pod, ep != NULL))
		return drop_policy(skb);
	if (ep)
		return deliver_local(skb, p.eth, ep);
	struct route_info *route = lookup_route(backend_ip4);
	if (route)
		return forward_remote(skb, route);
	count(skb->ifindex, 0, SLIPWAY_REASON_DROP_NO_ROUTE, skb->len);
	return TC_ACT_SHOT;
}

/* If the packet is a reply of a translated flow, restores the addresses the client used (the
 * service it connected to) and delivers it: into the client's pod when the client is local
 * (after the pod's policy, decided on the packet as the backend sent it, the tuple the
 * connection was tracked under), else out of the underlay toward the client, past the host
 * stack, which would drop a forwarded packet carrying its own address as source. `from_pod`:
 * the packet comes from a local pod. Returns -1 when the packet is no such reply. */
static __always_inline int nat_reply(struct __sk_buff *skb, int from_pod)
{
	struct nat_tuple seen = {};
	__u32 zero = 0;

	if (!read_tuple(skb, &seen))
		return -1;
	struct nat_reply *reply = bpf_map_lookup_elem(&nat_reverse, &seen);
	if (!reply)
		return -1;
	struct nat_tuple restored = {
		.saddr = reply->saddr,
		.daddr = reply->daddr,
		.sport = reply->sport,
		.dport = reply->dport,
		.proto = seen.proto,
	};
	struct endpoint_key client = { .ip4 = restored.daddr };
	struct endpoint_info *ep = bpf_map_lookup_elem(&endpoints, &client);
	struct parsed p;
	if (ep) {
		parse_ipv4(skb, &p);
		if (!p.ip4)
			return TC_ACT_SHOT;
		if (!policy_allows(skb, p.ip4, from_pod, 1))
			return drop_policy(skb);
		if (rewrite_tuple(skb, &seen, &restored)) {
			count(skb->ifindex, 0, SLIPWAY_REASON_DROP_NODEPORT, skb->len);
			return TC_ACT_SHOT;
		}
		parse_ipv4(skb, &p);
		if (!p.ip4)
			return TC_ACT_SHOT;
		count(skb->ifindex, 0, SLIPWAY_REASON_SERVICE_REPLY, skb->len);
		return deliver_local(skb, p.eth, ep);
	}
	struct node_config *cfg = bpf_map_lookup_elem(&node_config, &zero);
	if (!cfg || rewrite_tuple(skb, &seen, &restored)) {
		count(skb->ifindex, 0, SLIPWAY_REASON_DROP_NODEPORT, skb->len);
		return TC_ACT_SHOT;
	}
	count(skb->ifindex, cfg->underlay_ifindex, SLIPWAY_REASON_NODEPORT_REPLY, skb->len);
	/* No next hop given: the kernel looks the client up in the FIB and resolves it. */
	return bpf_redirect_neigh(cfg->underlay_ifindex, NULL, 0, 0);
}

/* The local pod's end of the packet's flow: its source (`src`) or destination. 0 when the
 * packet carries no TCP or UDP ports. */
static __always_inline int stack_flow_end(struct __sk_buff *skb, struct iphdr *ip4, int src,
					  struct stack_flow_key *key)
{
	void *data_end = (void *)(long)skb->data_end;
	__be16 *ports = (void *)ip4 + ip4->ihl * 4;

	if (ip4->protocol != IPPROTO_TCP && ip4->protocol != IPPROTO_UDP)
		return 0;
	if (ip4->frag_off & bpf_htons(0x1fff))
		return 0;
	if ((void *)(ports + 2) > data_end)
		return 0;
	key->ip4 = src ? ip4->saddr : ip4->daddr;
	key->port = src ? ports[0] : ports[1];
	key->proto = ip4->protocol;
	return 1;
}

/* Records a pod's flow that leaves for the host stack when it is addressed to one of this
 * host's own addresses (where netfilter may DNAT it to a local pod: a hostPort). A TCP flow is
 * checked once, on its SYN; UDP has no such mark, so each datagram not to a recorded flow pays
 * a FIB lookup (datagrams bound for the stack only, which costs far more). */
static __always_inline void stack_flow_note(struct __sk_buff *skb, struct iphdr *ip4)
{
	struct stack_flow_key key = {};

	if (!stack_flow_end(skb, ip4, 1, &key))
		return;
	if (key.proto == IPPROTO_TCP) {
		void *data_end = (void *)(long)skb->data_end;
		struct tcphdr *tcp = (void *)ip4 + ip4->ihl * 4;
		if ((void *)(tcp + 1) > data_end || !tcp->syn || tcp->ack)
			return;
	} else if (bpf_map_lookup_elem(&stack_flows, &key)) {
		return;
	}
	struct bpf_fib_lookup fib = {
		.family = 2 /* AF_INET */,
		.l4_protocol = ip4->protocol,
		.tot_len = bpf_ntohs(ip4->tot_len),
		.ifindex = skb->ifindex,
		.ipv4_src = ip4->saddr,
		.ipv4_dst = ip4->daddr,
	};
	/* A local destination (RTN_LOCAL) is "not forwarded"; so is one without a route, which
	 * the stack drops: recording it costs nothing but the entry. */
	if (bpf_fib_lookup(skb, &fib, sizeof(fib), 0) != BPF_FIB_LKUP_RET_NOT_FWDED)
		return;
	__u32 one = 1;
	fill_update(&stack_flows, SLIPWAY_MAP_STACK_FLOWS, &key, &one);
}

/* Whether a packet to a local pod answers a flow that pod sent through the host stack: then the
 * stack must see it (to reverse its DNAT), and the caller passes it up instead of delivering it
 * into the pod. Keyed by the pod's end only (the DNAT's target is unknown when the flow is
 * recorded): a later direct flow that reuses the port also goes through the stack, which
 * delivers it too, at the stack's cost. */
static __always_inline int stack_flow_reply(struct __sk_buff *skb, struct iphdr *ip4)
{
	__u32 index = SLIPWAY_MAP_STACK_FLOWS;
	struct map_fill *fill = bpf_map_lookup_elem(&map_fill, &index);
	struct stack_flow_key key = {};

	/* Until a pod sends a flow to a node address, local traffic skips the hash lookup (an
	 * array lookup costs next to nothing; the hash lookup about 12 ns a packet). */
	if (fill && fill->capacity && !*(volatile __s64 *)&fill->entries)
		return 0;
	return stack_flow_end(skb, ip4, 0, &key) && bpf_map_lookup_elem(&stack_flows, &key);
}

#endif /* SLIPWAY_NAT_H */
