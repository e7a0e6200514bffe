/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * TC program for the host side of a pod's veth (attached with TCX at ingress, i.e. on packets
 * the pod sends). A packet for another local pod is handed straight into that pod's network
 * namespace with bpf_redirect_peer(); a packet for a pod on another host goes there in VXLAN
 * or natively, as the `routes` map says; a packet for a service the socket programs did not
 * translate (the pod is outside their cgroup) is translated here; everything else goes to the
 * host stack. NetworkPolicy is enforced first: this pod's egress, and the destination's
 * ingress when it is local.
 */
#include "nat.h"

SEC("classifier")
int from_pod(struct __sk_buff *skb)
{
	/* A local backend answering a translated flow. (First: a translation moves the packet,
	 * so nothing parsed before it would stay valid.) */
	int done = nat_reply(skb, 1);
	if (done >= 0)
		return done;

	struct parsed p;
	int verdict = parse_ipv4(skb, &p);

	if (!p.ip4)
		return verdict;

	struct endpoint_key key = { .ip4 = p.ip4->daddr };
	struct endpoint_info *ep = bpf_map_lookup_elem(&endpoints, &key);
	struct route_info *route = ep ? NULL : lookup_route(p.ip4->daddr);
	if (!ep && !route) {
		/* Service addresses are never pod addresses: only traffic bound for the host stack
		 * pays for the lookup. */
		done = service_request(skb, 1);
		if (done >= 0)
			return done;
		parse_ipv4(skb, &p);
		if (!p.ip4)
			return TC_ACT_SHOT;
	}
	if (ep && stack_flow_reply(skb, p.ip4)) {
		count(skb->ifindex, 0, SLIPWAY_REASON_PASS_STACK_FLOW, skb->len);
		return TC_ACT_OK;
	}
	if (!policy_allows(skb, p.ip4, 1, ep != NULL))
		return drop_policy(skb);
	if (ep)
		return deliver_local(skb, p.eth, ep);
	if (route)
		return forward_remote(skb, route);

	stack_flow_note(skb, p.ip4);
	count(skb->ifindex, 0, SLIPWAY_REASON_PASS_NO_ENDPOINT, skb->len);
	return TC_ACT_OK;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
