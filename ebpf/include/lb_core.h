/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * The L4 load balancer's packet logic, independent of the attach point: it parses a frame,
 * answers ARP for IPv4 VIPs in place, recognises Neighbor Solicitations for IPv6 VIPs (the
 * entry point sizes the frame, lb_ndp_write() turns it into the advertisement), and for TCP/UDP
 * over either family decides the translation (client -> VIP becomes LB -> backend; backend ->
 * LB becomes VIP -> client) with Maglev and connection tracking. Addresses of both families
 * travel as struct lb_addr (IPv4-mapped for IPv4), so one conntrack and one decision serve
 * both. It reads packets through plain data/data_end pointers and writes only ARP and NDP
 * answers, so both the TC program (lb.c, which rewrites with the skb checksum helpers) and the
 * XDP program (lb_xdp.c, which rewrites by hand) share it.
 */
#ifndef SLIPWAY_LB_CORE_H
#define SLIPWAY_LB_CORE_H

#include "lb_base.h"
#include "lb_neigh.h"
#include "lb_nat.h"
#include "lb_parse.h"

/*
 * Decides what to do with the frame in [data, data_end) of `len` bytes. ARP replies are built
 * in place; an NDP answer is returned in `ndp` with LB_ACT_NDP and a translation in `nat` with
 * LB_ACT_NAT, for the caller to apply.
 */
static __always_inline enum lb_action lb_decide(void *data, void *data_end, __u32 len,
						struct lb_nat *nat, struct lb_ndp *ndp)
{
	struct ethhdr *eth = data;
	struct lb_pkt pkt = {};
	enum lb_action act;

	if ((void *)(eth + 1) > data_end) {
		lb_count(LB_REASON_DROP_MALFORMED, len);
		return LB_ACT_DROP;
	}
	/* A unicast frame for another station (a bridge floods those when it has forgotten where
	 * the station is, e.g. a dead LB host's port went down): not ours to serve, as a NIC
	 * would have filtered it. */
	__u32 zero = 0;
	struct lb_config *cfg = bpf_map_lookup_elem(&lb_config, &zero);
	if (cfg && !(eth->h_dest[0] & 1) && lb_mac_set(cfg->mac) &&
	    !lb_mac_eq(eth->h_dest, cfg->mac)) {
		lb_count(LB_REASON_PASS, len);
		return LB_ACT_PASS;
	}
	if (eth->h_proto == bpf_htons(ETH_P_ARP)) {
		act = lb_arp(data, data_end, len);
		if (act == LB_ACT_PASS)
			lb_count(LB_REASON_PASS, len);
		return act;
	}
	if (eth->h_proto == bpf_htons(ETH_P_IP))
		act = lb_parse4(data, data_end, len, &pkt);
	else if (eth->h_proto == bpf_htons(ETH_P_IPV6))
		act = lb_parse6(data, data_end, len, &pkt, ndp);
	else {
		lb_count(LB_REASON_PASS, len);
		return LB_ACT_PASS;
	}
	if (act != LB_ACT_CONTINUE)
		return act;
	return lb_translate(&pkt, len, nat);
}

#endif /* SLIPWAY_LB_CORE_H */
