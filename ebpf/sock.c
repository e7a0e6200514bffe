/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * Socket-level service translation (cgroup sock_addr programs, attached to a host's child
 * cgroup v2): a connect() or sendto() to a service address (ClusterIP, or a node IP with a
 * NodePort) is rewritten to one of the service's backends before the kernel routes it, so no
 * packet ever carries the service address and no NAT state exists on the path. UDP replies are
 * shown to the application as coming from the service address (recvmsg4), through a reverse
 * map keyed by the socket and the backend it sent to; getpeername() on a translated socket
 * reports the service too. Dual-stack IPv6 sockets addressing an
 * IPv4-mapped service address get the same (connect6, sendmsg6, recvmsg6, getpeername6).
 */
#include <linux/bpf.h>
#include <linux/errno.h>
#include <linux/in.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

#include "abi.h"
#include "services.h"

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, SVC_MAX_REVERSE);
	__type(key, struct svc_reverse_key);
	__type(value, struct svc_addr);
} svc_reverse SEC(".maps");

/* What to do with a connect or sendmsg. */
enum svc_verdict {
	/* Not for a service: leave it alone. */
	SVC_PASS,
	/* For a service: the address now names a backend. */
	SVC_TRANSLATED,
	/* For a service that cannot take it: fail the call with ECONNREFUSED. */
	SVC_REFUSE,
};

/* Looks up (*ip4, *port, protocol) as a service and on a hit replaces them with a backend's
 * address. Both are in network byte order; *port as sock_addr keeps it, in the first two bytes
 * of a __u32. */
static __always_inline enum svc_verdict svc_translate(struct bpf_sock_addr *ctx, __be32 *ip4,
						      __u32 *port, enum svc_event translated)
{
	__u32 proto = ctx->protocol;

	if (proto != IPPROTO_TCP && proto != IPPROTO_UDP)
		return SVC_PASS;
	struct svc_key key = {
		.ip4 = *ip4,
		.port = (__be16)*port,
		.proto = (__u8)proto,
	};
	struct svc_addr backend = {};

	switch (svc_pick(&key, &backend)) {
	case SVC_PICK_NOT_SERVICE:
		return SVC_PASS;
	case SVC_PICK_FOUND:
		break;
	case SVC_PICK_NO_BACKEND:
		svc_count(SVC_EVENT_REFUSED_NO_BACKEND);
		return SVC_REFUSE;
	default:
		svc_count(SVC_EVENT_REFUSED_RACE);
		return SVC_REFUSE;
	}

	struct svc_reverse_key reverse = {
		.cookie = bpf_get_socket_cookie(ctx),
		.ip4 = backend.ip4,
		.port = backend.port,
	};
	struct svc_addr service = { .ip4 = key.ip4, .port = key.port };

	/* For UDP replies and getpeername(). Best effort: the LRU map makes room by itself;
	 * without the entry the application would see the backend's address, the only harm. */
	bpf_map_update_elem(&svc_reverse, &reverse, &service, BPF_ANY);
	*ip4 = backend.ip4;
	*port = backend.port;
	svc_count(translated);
	return SVC_TRANSLATED;
}

/* The program's return value for a verdict: 1 lets the call proceed, 0 fails it. */
static __always_inline int svc_verdict(enum svc_verdict verdict)
{
	if (verdict != SVC_REFUSE)
		return 1;
	/* What a client of a kube-proxy service without endpoints gets (its REJECT rule);
	 * without it the kernel would report EPERM. */
	bpf_set_retval(-ECONNREFUSED);
	return 0;
}

/* Shows a UDP peer that is a backend as the service it was reached through: the source of a
 * received datagram, or the peer of a connected socket. */
static __always_inline int svc_reverse_translate(struct bpf_sock_addr *ctx, __be32 *ip4,
						 __u32 *port, enum svc_event event)
{
	struct svc_reverse_key reverse = {
		.cookie = bpf_get_socket_cookie(ctx),
		.ip4 = *ip4,
		.port = (__be16)*port,
	};
	struct svc_addr *service = bpf_map_lookup_elem(&svc_reverse, &reverse);

	if (!service)
		return 0;
	*ip4 = service->ip4;
	*port = service->port;
	svc_count(event);
	return 1;
}

static __always_inline enum svc_event svc_connect_event(struct bpf_sock_addr *ctx)
{
	return ctx->protocol == IPPROTO_TCP ? SVC_EVENT_CONNECT_TCP : SVC_EVENT_CONNECT_UDP;
}

/* IPv4 sockets. */

static __always_inline int svc_forward4(struct bpf_sock_addr *ctx, enum svc_event translated)
{
	__be32 ip4 = ctx->user_ip4;
	__u32 port = ctx->user_port;
	enum svc_verdict verdict = svc_translate(ctx, &ip4, &port, translated);

	if (verdict == SVC_TRANSLATED) {
		ctx->user_ip4 = ip4;
		ctx->user_port = port;
	}
	return svc_verdict(verdict);
}

SEC("cgroup/connect4")
int sock_connect4(struct bpf_sock_addr *ctx)
{
	return svc_forward4(ctx, svc_connect_event(ctx));
}

SEC("cgroup/sendmsg4")
int sock_sendmsg4(struct bpf_sock_addr *ctx)
{
	return svc_forward4(ctx, SVC_EVENT_SENDMSG_UDP);
}

static __always_inline int svc_reverse4(struct bpf_sock_addr *ctx, enum svc_event event)
{
	__be32 ip4 = ctx->user_ip4;
	__u32 port = ctx->user_port;

	if (svc_reverse_translate(ctx, &ip4, &port, event)) {
		ctx->user_ip4 = ip4;
		ctx->user_port = port;
	}
	/* recvmsg and getpeername programs must allow: they only rewrite what is reported. */
	return 1;
}

SEC("cgroup/recvmsg4")
int sock_recvmsg4(struct bpf_sock_addr *ctx)
{
	return svc_reverse4(ctx, SVC_EVENT_RECVMSG_UDP);
}

SEC("cgroup/getpeername4")
int sock_peer4(struct bpf_sock_addr *ctx)
{
	return svc_reverse4(ctx, SVC_EVENT_GETPEERNAME);
}

/* Dual-stack IPv6 sockets reach IPv4 services through IPv4-mapped addresses (::ffff:a.b.c.d),
 * which is how Java and others talk IPv4 by default: the same translation applies to the
 * address's last four bytes. Other IPv6 addresses are left alone (services are IPv4). */

static __always_inline int svc_is_v4_mapped(struct bpf_sock_addr *ctx)
{
	return ctx->user_ip6[0] == 0 && ctx->user_ip6[1] == 0 &&
	       ctx->user_ip6[2] == bpf_htonl(0x0000ffff);
}

static __always_inline int svc_forward6(struct bpf_sock_addr *ctx, enum svc_event translated)
{
	if (!svc_is_v4_mapped(ctx))
		return 1;
	__be32 ip4 = ctx->user_ip6[3];
	__u32 port = ctx->user_port;
	enum svc_verdict verdict = svc_translate(ctx, &ip4, &port, translated);

	if (verdict == SVC_TRANSLATED) {
		ctx->user_ip6[3] = ip4;
		ctx->user_port = port;
	}
	return svc_verdict(verdict);
}

SEC("cgroup/connect6")
int sock_connect6(struct bpf_sock_addr *ctx)
{
	return svc_forward6(ctx, svc_connect_event(ctx));
}

SEC("cgroup/sendmsg6")
int sock_sendmsg6(struct bpf_sock_addr *ctx)
{
	return svc_forward6(ctx, SVC_EVENT_SENDMSG_UDP);
}

static __always_inline int svc_reverse6(struct bpf_sock_addr *ctx, enum svc_event event)
{
	if (!svc_is_v4_mapped(ctx))
		return 1;
	__be32 ip4 = ctx->user_ip6[3];
	__u32 port = ctx->user_port;

	if (svc_reverse_translate(ctx, &ip4, &port, event)) {
		ctx->user_ip6[3] = ip4;
		ctx->user_port = port;
	}
	return 1;
}

SEC("cgroup/recvmsg6")
int sock_recvmsg6(struct bpf_sock_addr *ctx)
{
	return svc_reverse6(ctx, SVC_EVENT_RECVMSG_UDP);
}

SEC("cgroup/getpeername6")
int sock_peer6(struct bpf_sock_addr *ctx)
{
	return svc_reverse6(ctx, SVC_EVENT_GETPEERNAME);
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
