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

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/tcp.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

#include "abi.h"
#include "lb_maps.h"

/* What the entry point does with the frame after lb_decide(). */
enum lb_action {
	LB_ACT_PASS = 0,
	LB_ACT_DROP = 1,
	/* The frame was rewritten in place (ARP reply): send it back out of the device. */
	LB_ACT_TX = 2,
	/* Apply `struct lb_nat` and send the packet out of lb_config.ifindex. */
	LB_ACT_NAT = 3,
	/* A Neighbor Solicitation for a VIP: resize the frame to LB_NA_FRAME_LEN, write the
	 * advertisement with lb_ndp_write() and send it back out of the device. */
	LB_ACT_NDP = 4,
	/* Internal to lb_decide(): the packet is TCP/UDP, parsed; go on to translate it. */
	LB_ACT_CONTINUE = 5,
};

/* A translation for the entry point to apply; fields in network byte order. */
struct lb_nat {
	struct lb_addr old_src, new_src, old_dst, new_dst;
	__be16 old_sport, new_sport, old_dport, new_dport;
	/* Offset of the L4 header from the start of the frame. */
	__u32 l4_off;
	__u8 proto;
	/* 1: IPv6 (addresses are the full 16 bytes), 0: IPv4 (only w[3] is on the wire). */
	__u8 v6;
};

/* A Neighbor Advertisement to send (RFC 4861 4.4), filled by lb_decide(). */
struct lb_ndp {
	/* The VIP solicited: the NA's target and source address. */
	struct lb_addr target;
	/* Where the NA goes: the solicitor, or all-nodes (ff02::1) for a DAD probe. */
	struct lb_addr dst;
	__u8 dst_mac[ETH_ALEN];
	/* The LB interface's MAC: Ethernet source and target link-layer address. */
	__u8 lb_mac[ETH_ALEN];
	/* The Solicited flag (clear in the answer to a DAD probe, RFC 4861 7.2.4). */
	__u8 solicited;
};

/* SNAT ports tried for a new flow: first the client's own port folded into the SNAT range
 * (one-to-one for any client's ephemeral range, so one client's flows never collide and a
 * reused client tuple gets its old port back, which is what the backend's TIME-WAIT state
 * expects), then ports derived from the flow hash. The range stays below the kernel's
 * ephemeral ports (ip_local_port_range, 32768-60999 by default): the LB host's own
 * connections to backends (health checks, a proxy beside the LB) use those, and a backend's
 * answer to them must never be taken for the reply to a translated flow. The daemon warns when
 * the host's range overlaps this one. */
#define LB_SNAT_TRIES 8
#define LB_SNAT_PORT_MIN 1024
#define LB_SNAT_PORT_END 32768
#define LB_SNAT_PORT_SPAN (LB_SNAT_PORT_END - LB_SNAT_PORT_MIN)

#define LB_ARP_REQUEST 1
#define LB_ARP_REPLY 2

/* w[2] of an IPv4-mapped address. */
#define LB_MAPPED_W2 bpf_htonl(0x0000ffff)

#ifndef IPPROTO_ICMPV6
#define IPPROTO_ICMPV6 58
#endif
/* ICMPv6 types (RFC 4861 4.3, 4.4) and options (4.6.1). */
#define LB_ICMP6_NS 135
#define LB_ICMP6_NA 136
#define LB_ND_OPT_SLLA 1
#define LB_ND_OPT_TLLA 2
/* NA flags, first byte of the flags word: Router, Solicited, Override. */
#define LB_NA_F_SOLICITED 0x40
#define LB_NA_F_OVERRIDE 0x20
/* An NS or NA body: type, code, checksum, flags/reserved, target (RFC 4861 4.3, 4.4). */
#define LB_ND_LEN 24
/* An NA with its target link-layer address option. */
#define LB_NA_LEN (LB_ND_LEN + 8)
/* The frame of an NA: Ethernet, IPv6, NA. */
#define LB_NA_FRAME_LEN (sizeof(struct ethhdr) + sizeof(struct ipv6hdr) + LB_NA_LEN)

/* An Ethernet/IPv4 ARP packet (RFC 826). */
struct lb_arp {
	__be16 htype;
	__be16 ptype;
	__u8 hlen;
	__u8 plen;
	__be16 op;
	__u8 sha[ETH_ALEN];
	__u8 spa[4];
	__u8 tha[ETH_ALEN];
	__u8 tpa[4];
} __attribute__((packed));

/* A Neighbor Solicitation or Advertisement (RFC 4861 4.3, 4.4), then its first option. */
struct lb_nd {
	__u8 type;
	__u8 code;
	__sum16 csum;
	/* NA: R, S, O flags in the top bits of the first byte; NS: reserved. */
	__u8 flags[4];
	struct lb_addr target;
	/* The first option (type, length in units of 8 bytes, link-layer address). */
	__u8 opt_type;
	__u8 opt_len;
	__u8 opt_mac[ETH_ALEN];
} __attribute__((packed));

/* What lb_decide() learns of a TCP/UDP packet of either family. */
struct lb_pkt {
	struct lb_flow_key key;
	/* Offset of the L4 header from the start of the frame. */
	__u32 l4_off;
	__u8 v6;
	__u8 tcp_flags;
};

/* Room for the keys and values of a new flow, which do not fit on the BPF stack beside the
 * entry point's frame (512 bytes for the whole call chain, and every address is 16 bytes):
 * one entry per CPU. Each program (TC, XDP) has its own, never pinned and never read by
 * userspace; a program runs to completion on its CPU (softirq) before the next run there. */
struct lb_scratch {
	struct lb_affinity_key affinity;
	struct lb_flow_key fwd;
	struct lb_flow_key rev_key;
	struct lb_flow_key stale;
	struct lb_flow flow;
	struct lb_reverse rev;
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct lb_scratch);
} lb_scratch SEC(".maps");

/* Not inlined, so that enum lb_reason is in the object's BTF for userspace to check. */
static __noinline void lb_count(enum lb_reason reason, __u32 bytes)
{
	__u32 key = reason;
	struct counter_value *value = bpf_map_lookup_elem(&lb_counters, &key);

	if (value) {
		/* Per-CPU: no other CPU writes this slot. */
		value->packets += 1;
		value->bytes += bytes;
	}
}

static __always_inline void lb_stat(void *map, __u32 index, __u32 bytes, __u32 new_flow)
{
	struct lb_stats *stats = bpf_map_lookup_elem(map, &index);

	if (stats) {
		stats->packets += 1;
		stats->bytes += bytes;
		stats->flows += new_flow;
	}
}

static __always_inline void lb_addr4(struct lb_addr *a, __be32 ip4)
{
	a->w[0] = 0;
	a->w[1] = 0;
	a->w[2] = LB_MAPPED_W2;
	a->w[3] = ip4;
}

static __always_inline int lb_addr_eq(const struct lb_addr *a, const struct lb_addr *b)
{
	return ((a->w[0] ^ b->w[0]) | (a->w[1] ^ b->w[1]) | (a->w[2] ^ b->w[2]) |
		(a->w[3] ^ b->w[3])) == 0;
}

static __always_inline int lb_addr_is_zero(const struct lb_addr *a)
{
	return (a->w[0] | a->w[1] | a->w[2] | a->w[3]) == 0;
}

/* One word of an address for the flow hash: the IPv4 address itself for a mapped one (so
 * IPv4 flows hash as they always did), the XOR of the four words for IPv6. */
static __always_inline __u32 lb_addr_fold(const struct lb_addr *a)
{
	return a->w[0] ^ a->w[1] ^ (a->w[2] ^ LB_MAPPED_W2) ^ a->w[3];
}

/* Sets every byte of a flow key (padding too: keys are hashed whole). Field by field, not
 * from a compound literal, which clang would build on the stack first. */
static __always_inline void lb_key_set(struct lb_flow_key *k, const struct lb_addr *src,
				       const struct lb_addr *dst, __be16 sport, __be16 dport,
				       __u8 proto)
{
	k->src = *src;
	k->dst = *dst;
	k->sport = sport;
	k->dport = dport;
	k->proto = proto;
	k->pad[0] = 0;
	k->pad[1] = 0;
	k->pad[2] = 0;
}

/* Bob Jenkins' lookup3 final mix of three words: the flow hash that picks a Maglev slot. */
#define LB_ROL32(x, k) (((x) << (k)) | ((x) >> (32 - (k))))
static __always_inline __u32 lb_hash(__u32 a, __u32 b, __u32 c)
{
	c ^= b; c -= LB_ROL32(b, 14);
	a ^= c; a -= LB_ROL32(c, 11);
	b ^= a; b -= LB_ROL32(a, 25);
	c ^= b; c -= LB_ROL32(b, 16);
	a ^= c; a -= LB_ROL32(c, 4);
	b ^= a; b -= LB_ROL32(a, 14);
	c ^= b; c -= LB_ROL32(b, 24);
	return c;
}

/* Answers an ARP request for an announced VIP by turning the frame into the reply. */
static __always_inline enum lb_action lb_arp(void *data, void *data_end, __u32 len)
{
	struct ethhdr *eth = data;
	struct lb_arp *arp = data + sizeof(*eth);
	__u32 zero = 0;

	if ((void *)(arp + 1) > data_end)
		return LB_ACT_PASS;
	if (arp->htype != bpf_htons(1) || arp->ptype != bpf_htons(ETH_P_IP) ||
	    arp->hlen != ETH_ALEN || arp->plen != 4 || arp->op != bpf_htons(LB_ARP_REQUEST))
		return LB_ACT_PASS;

	__be32 tpa;
	__builtin_memcpy(&tpa, arp->tpa, 4);
	struct lb_vip_key vip = {};
	lb_addr4(&vip.ip, tpa);
	if (!bpf_map_lookup_elem(&lb_vips, &vip))
		return LB_ACT_PASS;
	struct lb_config *cfg = bpf_map_lookup_elem(&lb_config, &zero);
	if (!cfg)
		return LB_ACT_PASS;

	__builtin_memcpy(eth->h_dest, arp->sha, ETH_ALEN);
	__builtin_memcpy(eth->h_source, cfg->mac, ETH_ALEN);
	arp->op = bpf_htons(LB_ARP_REPLY);
	__builtin_memcpy(arp->tha, arp->sha, ETH_ALEN);
	__builtin_memcpy(arp->tpa, arp->spa, 4);
	__builtin_memcpy(arp->sha, cfg->mac, ETH_ALEN);
	__builtin_memcpy(arp->spa, &tpa, 4);
	lb_count(LB_REASON_ARP_REPLY, len);
	return LB_ACT_TX;
}

/*
 * A Neighbor Solicitation (ICMPv6 in `ip6`) for an announced VIP: fills `ndp` and returns
 * LB_ACT_NDP; anything else is the host stack's (LB_ACT_PASS). Checks the validity rules of
 * RFC 4861 7.1.1 that matter here (hop limit 255, code 0, length, no multicast target). The
 * answer goes to the solicitor at the MAC of its source link-layer address option (the frame's
 * source without one); a DAD probe (unspecified source) is answered to all-nodes, which
 * defends the VIP (RFC 4861 7.2.4).
 */
static __always_inline enum lb_action lb_ndp_solicit(void *data, void *data_end, __u32 len,
						     struct ipv6hdr *ip6, struct lb_ndp *ndp)
{
	struct ethhdr *eth = data;
	struct lb_nd *ns = (void *)(ip6 + 1);
	__u32 zero = 0;

	/* The fixed part of the NS; the option is looked at only if the payload holds it. */
	if ((void *)ns + LB_ND_LEN > data_end)
		return LB_ACT_PASS;
	__u32 payload = bpf_ntohs(ip6->payload_len);
	if (ip6->hop_limit != 255 || ns->type != LB_ICMP6_NS || ns->code != 0 ||
	    payload < LB_ND_LEN)
		return LB_ACT_PASS;

	struct lb_vip_key vip = {};
	__builtin_memcpy(&vip.ip, &ns->target, sizeof(vip.ip));
	/* Multicast targets and IPv4-mapped ones are never VIPs of this family. */
	if ((vip.ip.w[0] & bpf_htonl(0xff000000)) == bpf_htonl(0xff000000) ||
	    (vip.ip.w[0] == 0 && vip.ip.w[1] == 0 && vip.ip.w[2] == LB_MAPPED_W2))
		return LB_ACT_PASS;
	if (!bpf_map_lookup_elem(&lb_vips, &vip))
		return LB_ACT_PASS;
	struct lb_config *cfg = bpf_map_lookup_elem(&lb_config, &zero);
	if (!cfg)
		return LB_ACT_PASS;

	struct lb_addr src;
	__builtin_memcpy(&src, &ip6->saddr, sizeof(src));
	ndp->target = vip.ip;
	__builtin_memcpy(ndp->lb_mac, cfg->mac, ETH_ALEN);
	if (lb_addr_is_zero(&src)) {
		/* DAD: to all-nodes ff02::1, 33:33:00:00:00:01 (RFC 2464 7). */
		ndp->dst.w[0] = bpf_htonl(0xff020000);
		ndp->dst.w[1] = 0;
		ndp->dst.w[2] = 0;
		ndp->dst.w[3] = bpf_htonl(1);
		__u8 all_nodes[ETH_ALEN] = { 0x33, 0x33, 0, 0, 0, 1 };
		__builtin_memcpy(ndp->dst_mac, all_nodes, ETH_ALEN);
		ndp->solicited = 0;
	} else {
		ndp->dst = src;
		ndp->solicited = 1;
		if ((void *)(ns + 1) <= data_end && payload >= LB_NA_LEN &&
		    ns->opt_type == LB_ND_OPT_SLLA && ns->opt_len == 1)
			__builtin_memcpy(ndp->dst_mac, ns->opt_mac, ETH_ALEN);
		else
			__builtin_memcpy(ndp->dst_mac, eth->h_source, ETH_ALEN);
	}
	lb_count(LB_REASON_NDP_REPLY, len);
	return LB_ACT_NDP;
}

/* Adds the eight 16-bit words of `a` to a one's-complement sum. The Internet checksum is
 * independent of byte order (RFC 1071 2.B) as long as every word is read as it lies in
 * memory, which is what these sums do. */
static __always_inline __u32 lb_csum_addr(__u32 sum, const struct lb_addr *a)
{
	for (int i = 0; i < 4; i++)
		sum += (a->w[i] & 0xffff) + (a->w[i] >> 16);
	return sum;
}

static __always_inline __u32 lb_csum_mac(__u32 sum, const __u8 *mac)
{
	for (int i = 0; i < ETH_ALEN; i += 2) {
		__u16 word;
		__builtin_memcpy(&word, mac + i, 2);
		sum += word;
	}
	return sum;
}

static __always_inline __u16 lb_csum_fold(__u32 sum)
{
	sum = (sum & 0xffff) + (sum >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	return (__u16)~sum;
}

/*
 * Writes the Neighbor Advertisement `ndp` into the frame [data, data_end), which the entry
 * point has sized to LB_NA_FRAME_LEN: Ethernet to the solicitor from the LB's MAC, IPv6 from
 * the VIP with hop limit 255, the NA (Solicited as set, Override, the VIP as target, the LB's
 * MAC as target link-layer address) and its checksum over the pseudo-header (RFC 4443 2.3,
 * RFC 8200 8.1). Returns -1 if the frame is too short.
 */
static __always_inline int lb_ndp_write(void *data, void *data_end, const struct lb_ndp *ndp)
{
	struct ethhdr *eth = data;
	struct ipv6hdr *ip6 = (void *)(eth + 1);
	struct lb_nd *na = (void *)(ip6 + 1);

	if ((void *)(na + 1) > data_end)
		return -1;
	__builtin_memcpy(eth->h_dest, ndp->dst_mac, ETH_ALEN);
	__builtin_memcpy(eth->h_source, ndp->lb_mac, ETH_ALEN);
	eth->h_proto = bpf_htons(ETH_P_IPV6);

	/* Version 6, traffic class 0, flow label 0. */
	*(__be32 *)ip6 = bpf_htonl(0x60000000);
	ip6->payload_len = bpf_htons(LB_NA_LEN);
	ip6->nexthdr = IPPROTO_ICMPV6;
	ip6->hop_limit = 255;
	__builtin_memcpy(&ip6->saddr, &ndp->target, sizeof(ndp->target));
	__builtin_memcpy(&ip6->daddr, &ndp->dst, sizeof(ndp->dst));

	__u8 flags = LB_NA_F_OVERRIDE | (ndp->solicited ? LB_NA_F_SOLICITED : 0);
	na->type = LB_ICMP6_NA;
	na->code = 0;
	na->csum = 0;
	na->flags[0] = flags;
	na->flags[1] = 0;
	na->flags[2] = 0;
	na->flags[3] = 0;
	__builtin_memcpy(&na->target, &ndp->target, sizeof(ndp->target));
	na->opt_type = LB_ND_OPT_TLLA;
	na->opt_len = 1;
	__builtin_memcpy(na->opt_mac, ndp->lb_mac, ETH_ALEN);

	/* Each constant is the 16-bit word as it lies in memory (bpf_htons). */
	__u32 sum = 0;
	sum = lb_csum_addr(sum, &ndp->target);			/* pseudo-header: source */
	sum = lb_csum_addr(sum, &ndp->dst);			/* destination */
	sum += bpf_htons(LB_NA_LEN);				/* upper-layer length */
	sum += bpf_htons(IPPROTO_ICMPV6);			/* next header */
	sum += bpf_htons(LB_ICMP6_NA << 8);			/* type, code */
	sum += bpf_htons((__u16)flags << 8);			/* flags, reserved */
	sum = lb_csum_addr(sum, &ndp->target);			/* target */
	sum += bpf_htons((LB_ND_OPT_TLLA << 8) | 1);		/* option type, length */
	sum = lb_csum_mac(sum, ndp->lb_mac);			/* link-layer address */
	na->csum = lb_csum_fold(sum);
	return 0;
}

/* Is the client inside one of the service's source ranges? */
static __always_inline int lb_source_allowed(__u32 service_id, const struct lb_addr *client)
{
	struct lb_source_range_key key = {
		.prefixlen = 32 + 128,
		.data = { .service_id = service_id, .ip = *client },
	};
	return bpf_map_lookup_elem(&lb_source_ranges, &key) != NULL;
}

/* Whether a reverse entry's flow is over (FIN/RST seen) or forgotten: its port may be reused.
 * `fwd` is room for the forward key. */
static __always_inline int lb_reverse_stale(struct lb_reverse *old, __u8 proto,
					    struct lb_flow_key *fwd)
{
	lb_key_set(fwd, &old->client, &old->vip, old->client_port, old->vip_port, proto);
	struct lb_flow *flow = bpf_map_lookup_elem(&lb_flows, fwd);
	return !flow || flow->state == LB_FLOW_CLOSING;
}

/* Picks the source port a new SNATed flow gets, and records the reverse translation under it.
 * A port is free if no reverse entry holds it or the entry is this same client flow again (a
 * reused tuple); failing that, a port whose flow is over is taken. Returns 0 when every
 * candidate is held by a live flow. Not inlined, for the stack (see lb_translate()). */
static __noinline __be16 lb_snat_port(struct lb_flow_key *rev_key, struct lb_reverse *rev,
				      struct lb_flow_key *stale, __u32 hash)
{
	__u32 client_port = bpf_ntohs(rev_key->dport);
	__be16 stale_port = 0;

	for (int i = 0; i < LB_SNAT_TRIES; i++) {
		__u32 port;
		if (i == 0 && client_port >= LB_SNAT_PORT_MIN)
			port = client_port - LB_SNAT_PORT_MIN;
		else
			port = hash + i * 7919;
		rev_key->dport = bpf_htons(LB_SNAT_PORT_MIN + port % LB_SNAT_PORT_SPAN);
		struct lb_reverse *old = bpf_map_lookup_elem(&lb_reverse, rev_key);
		if (old) {
			int same = lb_addr_eq(&old->client, &rev->client) &&
				   old->client_port == rev->client_port &&
				   lb_addr_eq(&old->vip, &rev->vip) && old->vip_port == rev->vip_port;
			if (same) {
				bpf_map_update_elem(&lb_reverse, rev_key, rev, BPF_ANY);
				return rev_key->dport;
			}
			/* An ended flow's port is the last resort: the backend may still hold its
			 * tuple in TIME-WAIT, and a new SYN from another client may not get through. */
			if (!stale_port && lb_reverse_stale(old, rev_key->proto, stale))
				stale_port = rev_key->dport;
			continue;
		}
		if (bpf_map_update_elem(&lb_reverse, rev_key, rev, BPF_NOEXIST) == 0)
			return rev_key->dport;
	}
	if (stale_port) {
		rev_key->dport = stale_port;
		bpf_map_update_elem(&lb_reverse, rev_key, rev, BPF_ANY);
	}
	return stale_port;
}

/* A packet whose ports the LB cannot see (an IP fragment, an IPv6 extension header): dropped
 * if it is for a VIP, which the LB cannot place, else the host stack's. */
static __always_inline enum lb_action lb_unplaceable(const struct lb_addr *dst, __u32 len)
{
	struct lb_vip_key vip_key = { .ip = *dst };

	if (bpf_map_lookup_elem(&lb_vips, &vip_key)) {
		lb_count(LB_REASON_DROP_MALFORMED, len);
		return LB_ACT_DROP;
	}
	lb_count(LB_REASON_PASS, len);
	return LB_ACT_PASS;
}

/* Reads the ports (and TCP flags) of the L4 header at pkt->l4_off into pkt. */
static __always_inline enum lb_action lb_parse_l4(void *data, void *data_end, __u32 len,
						  struct lb_pkt *pkt)
{
	__be16 *ports = data + pkt->l4_off;

	if ((void *)(ports + 2) > data_end) {
		lb_count(LB_REASON_DROP_MALFORMED, len);
		return LB_ACT_DROP;
	}
	pkt->key.sport = ports[0];
	pkt->key.dport = ports[1];
	pkt->tcp_flags = 0;
	if (pkt->key.proto == IPPROTO_TCP) {
		__u8 *flags = data + pkt->l4_off + 13;
		if ((void *)(flags + 1) > data_end) {
			lb_count(LB_REASON_DROP_MALFORMED, len);
			return LB_ACT_DROP;
		}
		pkt->tcp_flags = *flags;
	}
	return LB_ACT_CONTINUE;
}

/* IPv4: the tuple of a TCP/UDP packet (LB_ACT_CONTINUE), or the verdict on anything else. */
static __always_inline enum lb_action lb_parse4(void *data, void *data_end, __u32 len,
						struct lb_pkt *pkt)
{
	struct iphdr *ip4 = data + sizeof(struct ethhdr);

	if ((void *)(ip4 + 1) > data_end) {
		lb_count(LB_REASON_PASS, len);
		return LB_ACT_PASS;
	}
	if (ip4->ihl < 5 || ip4->version != 4) {
		lb_count(LB_REASON_DROP_MALFORMED, len);
		return LB_ACT_DROP;
	}
	if (ip4->protocol != IPPROTO_TCP && ip4->protocol != IPPROTO_UDP) {
		lb_count(LB_REASON_PASS, len);
		return LB_ACT_PASS;
	}
	lb_addr4(&pkt->key.src, ip4->saddr);
	lb_addr4(&pkt->key.dst, ip4->daddr);
	pkt->key.proto = ip4->protocol;
	pkt->v6 = 0;
	/* A fragment carries no ports (or only the first does): the LB cannot place it. */
	if (ip4->frag_off & bpf_htons(0x3fff))
		return lb_unplaceable(&pkt->key.dst, len);
	pkt->l4_off = sizeof(struct ethhdr) + (ip4->ihl & 0xf) * 4;
	return lb_parse_l4(data, data_end, len, pkt);
}

/* IPv6: likewise; Neighbor Solicitations for VIPs become LB_ACT_NDP. Extension headers are
 * not walked: TCP or UDP must follow the fixed header (what every client sends unless it
 * fragments, and a VIP's flows are not fragmented: TCP segments to the path MTU). */
static __always_inline enum lb_action lb_parse6(void *data, void *data_end, __u32 len,
						struct lb_pkt *pkt, struct lb_ndp *ndp)
{
	struct ipv6hdr *ip6 = data + sizeof(struct ethhdr);

	if ((void *)(ip6 + 1) > data_end) {
		lb_count(LB_REASON_PASS, len);
		return LB_ACT_PASS;
	}
	if (ip6->version != 6) {
		lb_count(LB_REASON_DROP_MALFORMED, len);
		return LB_ACT_DROP;
	}
	__u8 nexthdr = ip6->nexthdr;
	if (nexthdr == IPPROTO_ICMPV6) {
		enum lb_action act = lb_ndp_solicit(data, data_end, len, ip6, ndp);
		if (act == LB_ACT_PASS)
			lb_count(LB_REASON_PASS, len);
		return act;
	}
	__builtin_memcpy(&pkt->key.src, &ip6->saddr, sizeof(pkt->key.src));
	__builtin_memcpy(&pkt->key.dst, &ip6->daddr, sizeof(pkt->key.dst));
	pkt->key.proto = nexthdr;
	pkt->v6 = 1;
	if (nexthdr != IPPROTO_TCP && nexthdr != IPPROTO_UDP) {
		/* Hop-by-hop (0), routing (43), fragment (44), destination options (60), ESP ...:
		 * the ports are not where the LB looks. */
		if (nexthdr == 0 || nexthdr == 43 || nexthdr == 44 || nexthdr == 60)
			return lb_unplaceable(&pkt->key.dst, len);
		lb_count(LB_REASON_PASS, len);
		return LB_ACT_PASS;
	}
	pkt->l4_off = sizeof(struct ethhdr) + sizeof(struct ipv6hdr);
	return lb_parse_l4(data, data_end, len, pkt);
}

/* Decides the translation of a parsed TCP/UDP packet: a tracked backend reply, a tracked or
 * new client flow to a service (Maglev picks the backend of a new one), or not the LB's. A
 * function of its own (a BPF-to-BPF call), its larger keys in `lb_scratch`: with 16-byte
 * addresses they would not fit in one 512-byte stack with the entry point's. */
static __noinline enum lb_action lb_translate(struct lb_pkt *pkt, __u32 len,
						   struct lb_nat *nat)
{
	struct lb_flow_key *key = &pkt->key;
	__u32 zero = 0;
	struct lb_scratch *s = bpf_map_lookup_elem(&lb_scratch, &zero);

	if (!s) {
		lb_count(LB_REASON_DROP_NO_ROUTE, len);
		return LB_ACT_DROP;
	}

	/* TCP flag bits (RFC 9293 3.1). */
	int fin_or_rst = pkt->tcp_flags & (0x01 | 0x04);
	int syn_only = (pkt->tcp_flags & (0x02 | 0x10)) == 0x02;
	__u64 now = bpf_ktime_get_ns();

	nat->l4_off = pkt->l4_off;
	nat->proto = key->proto;
	nat->v6 = pkt->v6;
	nat->old_src = key->src;
	nat->old_dst = key->dst;
	nat->old_sport = key->sport;
	nat->old_dport = key->dport;

	/* The service first: a small map that stays in cache, and a packet to a service is a
	 * client's (a reply goes to the LB's SNAT address or, with eTP Local, to the client,
	 * never to a VIP's service port), so it never needs the LRU lookup below. */
	struct lb_service_key svc_key = {
		.vip = key->dst,
		.port = key->dport,
		.proto = key->proto,
	};
	struct lb_service *svc = bpf_map_lookup_elem(&lb_services, &svc_key);
	if (!svc) {
		/* A backend's reply? */
		struct lb_reverse *rev = bpf_map_lookup_elem(&lb_reverse, key);
		if (rev) {
			lb_key_set(&s->fwd, &rev->client, &rev->vip, rev->client_port,
				   rev->vip_port, key->proto);
			struct lb_flow *flow = bpf_map_lookup_elem(&lb_flows, &s->fwd);
			if (flow) {
				flow->last_seen_ns = now;
				if (fin_or_rst)
					flow->state = LB_FLOW_CLOSING;
			}
			nat->new_src = rev->vip;
			nat->new_sport = rev->vip_port;
			nat->new_dst = rev->client;
			nat->new_dport = rev->client_port;
			lb_stat(&lb_backend_stats, rev->backend_id, len, 0);
			lb_count(LB_REASON_REPLY, len);
			return LB_ACT_NAT;
		}
		struct lb_vip_key vip_key = { .ip = key->dst };
		if (bpf_map_lookup_elem(&lb_vips, &vip_key)) {
			lb_count(LB_REASON_DROP_NO_SERVICE, len);
			return LB_ACT_DROP;
		}
		lb_count(LB_REASON_PASS, len);
		return LB_ACT_PASS;
	}
	__u32 service_id = svc->id;
	__u32 service_flags = svc->flags;
	__u64 affinity_ns = (__u64)svc->affinity_timeout_s * 1000000000ULL;
	if ((service_flags & LB_SERVICE_F_SOURCE_RANGES) &&
	    !lb_source_allowed(service_id, &key->src)) {
		lb_count(LB_REASON_DROP_SOURCE_RANGE, len);
		return LB_ACT_DROP;
	}

	struct lb_flow *flow = bpf_map_lookup_elem(&lb_flows, key);
	if (flow && !(flow->state == LB_FLOW_CLOSING && syn_only) &&
	    flow->service_id == service_id) {
		__u32 bid = flow->backend_id;
		struct lb_backend *backend = bpf_map_lookup_elem(&lb_backends, &bid);
		if (backend && !lb_addr_is_zero(&backend->ip)) {
			flow->last_seen_ns = now;
			if (fin_or_rst)
				flow->state = LB_FLOW_CLOSING;
			nat->new_src = flow->nat_ip;
			nat->new_sport = flow->nat_port;
			nat->new_dst = backend->ip;
			nat->new_dport = backend->port;
			lb_stat(&lb_backend_stats, bid, len, 0);
			lb_stat(&lb_service_stats, service_id, len, 0);
			lb_count(LB_REASON_FORWARD, len);
			return LB_ACT_NAT;
		}
	}

	/* A new flow: Maglev picks the backend. A TCP segment that is not a SYN belongs to a
	 * flow the table lost (evicted when full): counted, then placed again. */
	if (!flow && key->proto == IPPROTO_TCP && !syn_only)
		lb_count(LB_REASON_FLOW_UNTRACKED, len);
	__u32 hash = lb_hash(lb_addr_fold(&key->src), lb_addr_fold(&key->dst),
			     ((__u32)key->sport << 16 | key->dport) ^ key->proto);
	__u32 bid = 0;
	struct lb_backend *backend = NULL;
	int affinity = service_flags & LB_SERVICE_F_AFFINITY;
	if (affinity) {
		/* The client's backend, if it opened a flow within the timeout and the backend
		 * is still in the ring. */
		s->affinity.service_id = service_id;
		s->affinity.client = key->src;
		struct lb_affinity *aff = bpf_map_lookup_elem(&lb_affinity, &s->affinity);
		if (aff && now - aff->last_seen_ns < affinity_ns) {
			__u32 aid = aff->backend_id;
			backend = bpf_map_lookup_elem(&lb_backends, &aid);
			if (backend && (backend->flags & LB_BACKEND_F_ACTIVE))
				bid = aid;
			else
				backend = NULL;
		}
	}
	if (!bid) {
		__u32 slot = hash % LB_MAGLEV_SIZE;
		void *ring = bpf_map_lookup_elem(&lb_maglev, &service_id);
		__u32 *bid_p = ring ? bpf_map_lookup_elem(ring, &slot) : NULL;
		bid = bid_p ? *bid_p : 0;
		backend = bid ? bpf_map_lookup_elem(&lb_backends, &bid) : NULL;
	}
	if (!backend || lb_addr_is_zero(&backend->ip)) {
		lb_count(LB_REASON_DROP_NO_BACKEND, len);
		return LB_ACT_DROP;
	}
	struct lb_config *cfg = bpf_map_lookup_elem(&lb_config, &zero);
	if (!cfg) {
		lb_count(LB_REASON_DROP_NO_ROUTE, len);
		return LB_ACT_DROP;
	}

	struct lb_flow *new_flow = &s->flow;
	struct lb_reverse *new_rev = &s->rev;
	struct lb_flow_key *rev_key = &s->rev_key;
	new_flow->backend_id = bid;
	new_flow->service_id = service_id;
	new_flow->state = fin_or_rst ? LB_FLOW_CLOSING : LB_FLOW_OPEN;
	new_flow->pad = 0;
	new_flow->pad2 = 0;
	new_flow->last_seen_ns = now;
	new_rev->client = key->src;
	new_rev->vip = key->dst;
	new_rev->client_port = key->sport;
	new_rev->vip_port = key->dport;
	new_rev->backend_id = bid;
	new_rev->service_id = service_id;
	lb_key_set(rev_key, &backend->ip, &key->src, backend->port, key->sport, key->proto);
	if (service_flags & LB_SERVICE_F_LOCAL) {
		/* externalTrafficPolicy: Local keeps the client's address. */
		new_flow->nat_ip = key->src;
		new_flow->nat_port = key->sport;
		if (bpf_map_update_elem(&lb_reverse, rev_key, new_rev, BPF_ANY))
			lb_count(LB_REASON_FLOW_TABLE_FULL, len);
	} else {
		struct lb_addr *snat = pkt->v6 ? &cfg->snat_ip6 : &cfg->snat_ip4;
		if (lb_addr_is_zero(snat)) {
			lb_count(LB_REASON_DROP_NO_PORT, len);
			return LB_ACT_DROP;
		}
		rev_key->dst = *snat;
		__be16 port = lb_snat_port(rev_key, new_rev, &s->stale, hash);
		if (!port) {
			lb_count(LB_REASON_DROP_NO_PORT, len);
			return LB_ACT_DROP;
		}
		new_flow->nat_ip = *snat;
		new_flow->nat_port = port;
	}
	if (bpf_map_update_elem(&lb_flows, key, new_flow, BPF_ANY))
		lb_count(LB_REASON_FLOW_TABLE_FULL, len);
	if (affinity) {
		struct lb_affinity aff = { .backend_id = bid, .last_seen_ns = now };
		bpf_map_update_elem(&lb_affinity, &s->affinity, &aff, BPF_ANY);
	}

	nat->new_src = new_flow->nat_ip;
	nat->new_sport = new_flow->nat_port;
	nat->new_dst = backend->ip;
	nat->new_dport = backend->port;
	lb_stat(&lb_backend_stats, bid, len, 1);
	lb_stat(&lb_service_stats, service_id, len, 1);
	lb_count(LB_REASON_FORWARD, len);
	return LB_ACT_NAT;
}

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
