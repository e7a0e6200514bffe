/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * TC program for a host's devices that bring pod traffic in from other hosts (attached with
 * TCX at ingress): the underlay device (native routing) and the external VXLAN device (which
 * hands the program the decapsulated frame). A packet for a local pod goes straight into its
 * namespace, if its ingress policy allows; everything else goes to the host stack.
 */
#include "node.h"
#include "services.h"

/* Translates a request to a NodePort (a service key on this host's address) to a backend:
 * the first packet of a flow picks one and records the flow both ways; later packets follow
 * the record. A backend on another host also gets the request's source rewritten to this
 * host's router address, so that its reply returns here (nodeport_reply). Returns -1 when the packet is no request to
 * a service. */
static __always_inline int nodeport_request(struct __sk_buff *skb)
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
		fresh.snat = bpf_map_lookup_elem(&endpoints, &local) ? 0 : 1;
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
		if (bpf_map_update_elem(&nat_reverse, &reply_key, &restore, BPF_ANY) ||
		    bpf_map_update_elem(&nat_flows, &req, &fresh, BPF_ANY)) {
			count(skb->ifindex, 0, SLIPWAY_REASON_DROP_NODEPORT, skb->len);
			return TC_ACT_SHOT;
		}
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
	count(skb->ifindex, 0, SLIPWAY_REASON_NODEPORT_REQUEST, skb->len);

	/* The rewrite moved the packet: parse it afresh before handing it on. */
	struct parsed p;
	parse_ipv4(skb, &p);
	if (!p.ip4)
		return TC_ACT_SHOT;
	struct endpoint_key key = { .ip4 = backend_ip4 };
	struct endpoint_info *ep = bpf_map_lookup_elem(&endpoints, &key);
	if (ep && !policy_allows(skb, p.ip4, 0, 1))
		return drop_policy(skb);
	if (ep)
		return deliver_local(skb, p.eth, ep);
	struct route_info *route = lookup_route(backend_ip4);
	if (route)
		return forward_remote(skb, route);
	count(skb->ifindex, 0, SLIPWAY_REASON_DROP_NO_ROUTE, skb->len);
	return TC_ACT_SHOT;
}

SEC("classifier")
int from_netdev(struct __sk_buff *skb)
{
	/* NodePort translation first: it moves the packet, so nothing parsed before it would
	 * stay valid. */
	int done = nodeport_reply(skb);
	if (done >= 0)
		return done;
	done = nodeport_request(skb);
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
