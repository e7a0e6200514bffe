/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * TC program for a host's devices that bring pod traffic in from other hosts (attached with
 * TCX at ingress): the underlay device (native routing) and the external VXLAN device (which
 * hands the program the decapsulated frame). A request to a NodePort of this host is translated
 * to a backend (ebpf/include/nat.h), and a reply of a translated flow back; a packet for a local
 * pod goes straight into its namespace, if its ingress policy allows; everything else goes to
 * the host stack.
 */
#include "nat.h"

SEC("classifier")
int from_netdev(struct __sk_buff *skb)
{
	/* NodePort translation first: it moves the packet, so nothing parsed before it would
	 * stay valid. */
	int done = nat_reply(skb, 0);
	if (done >= 0)
		return done;
	done = service_request(skb, 0);
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
