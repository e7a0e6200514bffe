/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* The load balancer's shared vocabulary: the verdicts, the translation and NDP answer an
 * entry point applies, the parsed packet, the per-CPU scratch map, the counters, and the
 * address and flow-hash helpers every other lb_*.h uses. */
#ifndef SLIPWAY_LB_BASE_H
#define SLIPWAY_LB_BASE_H

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
	/* Direct server return: put the packet, untranslated, inside an IPv4 header from
	 * lb_config.snat_ip4 to `nat.new_dst` (IP-in-IP) and send it out of lb_config.ifindex. */
	LB_ACT_ENCAP = 6,
};

static __always_inline int lb_mac_eq(const __u8 *a, const __u8 *b)
{
	return ((a[0] ^ b[0]) | (a[1] ^ b[1]) | (a[2] ^ b[2]) | (a[3] ^ b[3]) | (a[4] ^ b[4]) |
		(a[5] ^ b[5])) == 0;
}

static __always_inline int lb_mac_set(const __u8 *m)
{
	return (m[0] | m[1] | m[2] | m[3] | m[4] | m[5]) != 0;
}

/* A translation for the entry point to apply; fields in network byte order. */
struct lb_nat {
	struct lb_addr old_src, new_src, old_dst, new_dst;
	__be16 old_sport, new_sport, old_dport, new_dport;
	/* Offset of the L4 header from the start of the frame. */
	__u32 l4_off;
	__u8 proto;
	/* 1: IPv6 (addresses are the full 16 bytes), 0: IPv4 (only w[3] is on the wire). */
	__u8 v6;
	/* A TCP SYN (its MSS option is lowered to fit an encapsulation header). */
	__u8 syn;
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

#endif /* SLIPWAY_LB_BASE_H */
