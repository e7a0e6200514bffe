/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * The Slipway datapath ABI: the one definition of every map key and value that userspace and
 * the BPF programs share. slipway-dataplane mirrors each struct in `#[repr(C)]` Rust
 * (dataplane/src/abi/mod.rs) and a test checks sizes and field offsets against this object's BTF.
 *
 * Rules: fixed-width types only (enums are 4 bytes on every target Slipway builds for), no
 * implicit padding (spell it out as `pad` fields so both
 * sides agree and the kernel never sees uninitialised key bytes), IPv4 addresses in network
 * byte order.
 */
#ifndef SLIPWAY_ABI_H
#define SLIPWAY_ABI_H

#include <linux/types.h>

#define SLIPWAY_ETH_ALEN 6

/* Capacity of the endpoint map: pods on one host. */
#define SLIPWAY_MAX_ENDPOINTS 65536
/* Capacity of the counter map: (ifindex in, ifindex out, reason) triples. */
#define SLIPWAY_MAX_COUNTERS 16384

/* Key of the `endpoints` map: a local pod's IPv4 address. */
struct endpoint_key {
	__be32 ip4;
};

/* Value of the `endpoints` map: where to deliver a packet for that pod. */
struct endpoint_info {
	/* ifindex of the host side of the pod's veth; bpf_redirect_peer() lands the packet on
	 * its peer, the pod's eth0, inside the pod's network namespace. */
	__u32 ifindex;
	/* The pod's eth0 MAC: destination MAC of delivered frames. */
	__u8 pod_mac[SLIPWAY_ETH_ALEN];
	/* The host-side veth MAC: source MAC of delivered frames (the pod's gateway). */
	__u8 host_mac[SLIPWAY_ETH_ALEN];
};

/* Why a packet got the verdict it got. Values are stable: they appear in metrics. */
enum slipway_reason {
	/* Redirected into the destination pod with bpf_redirect_peer(). */
	SLIPWAY_REASON_REDIRECT_PEER = 1,
	/* Not IPv4: left to the host stack. */
	SLIPWAY_REASON_PASS_NOT_IPV4 = 2,
	/* IPv4 to an address that is no local endpoint: left to the host stack. */
	SLIPWAY_REASON_PASS_NO_ENDPOINT = 3,
	/* Truncated or malformed header: dropped. */
	SLIPWAY_REASON_DROP_MALFORMED = 4,
	/* Sent to another host's pod inside VXLAN. */
	SLIPWAY_REASON_REDIRECT_VXLAN = 5,
	/* Sent to another host's pod natively on the underlay. */
	SLIPWAY_REASON_REDIRECT_NATIVE = 6,
	/* A route or device the packet needed is missing or failed: dropped. */
	SLIPWAY_REASON_DROP_NO_ROUTE = 7,
	/* A NodePort request from outside, translated to a backend (DNAT, SNAT when remote). */
	SLIPWAY_REASON_NODEPORT_REQUEST = 8,
	/* A reply of a NodePort flow, translated back and sent to the client. */
	SLIPWAY_REASON_NODEPORT_REPLY = 9,
	/* A NodePort request that could not be translated (no backend, rewrite failed): dropped. */
	SLIPWAY_REASON_DROP_NODEPORT = 10,
	/* Denied by NetworkPolicy (or an endpoint whose policy failed closed): dropped. */
	SLIPWAY_REASON_DROP_POLICY = 11,
	/* A pod's packet to a service (ClusterIP, or this node's address and a NodePort) that the
	 * socket programs did not translate, translated to a backend at the pod's veth. */
	SLIPWAY_REASON_SERVICE_REQUEST = 12,
	/* A reply of a flow translated at a pod's veth, translated back and delivered to the
	 * pod. */
	SLIPWAY_REASON_SERVICE_REPLY = 13,
	/* A pod's reply to a local pod sent up the host stack instead of into the pod: the flow
	 * went through the stack (a hostPort's DNAT), which must see the reply to reverse it. */
	SLIPWAY_REASON_PASS_STACK_FLOW = 14,
	/* A load balancer's IP-in-IP packet (direct server return), decapsulated: its request to
	 * a VIP is translated like a NodePort request and the reply goes to the client directly. */
	SLIPWAY_REASON_DSR_DECAP = 15,
	/* An IP-in-IP packet whose inner packet is no request to a service of this node (or
	 * could not be decapsulated): dropped. */
	SLIPWAY_REASON_DROP_DSR = 16,
};

/* The tables whose fill the datapath reports: index of `map_full` and `map_fill`. Values are
 * stable: they appear in metrics. */
enum slipway_map {
	SLIPWAY_MAP_COUNTERS = 0,
	SLIPWAY_MAP_POLICY_CT = 1,
	SLIPWAY_MAP_NAT_FLOWS = 2,
	SLIPWAY_MAP_NAT_REVERSE = 3,
	SLIPWAY_MAP_STACK_FLOWS = 4,
};
#define SLIPWAY_MAP_MAX 5

/* Value of the `map_fill` array (indexed by enum slipway_map): how full a table the programs
 * insert into is. The per-CPU `map_full` array (__u64 values, same index) counts inserts that
 * found the table full: for a hash map the insert failed; for an LRU map the kernel evicted
 * the least recently used entry to make room, a connection's state lost. */
struct map_fill {
	/* Entries the programs inserted and did not delete, never above `capacity` (an LRU map
	 * makes room by eviction, which programs do not see: once full it stays full). */
	__s64 entries;
	/* The table's max_entries, written by the loader; 0: fill not tracked. */
	__u32 capacity;
	__u32 pad;
};

/* Key of the per-CPU `counters` map. */
struct counter_key {
	/* The device the program ran on (skb->ifindex). */
	__u32 ifindex_in;
	/* The redirect target's ifindex, 0 when the packet was not redirected. */
	__u32 ifindex_out;
	/* An enum slipway_reason value. */
	__u32 reason;
};

/* Value of the per-CPU `counters` map; userspace sums the CPUs. */
struct counter_value {
	__u64 packets;
	__u64 bytes;
};

/* ==== L4 load balancer (ebpf/lb.c, ebpf/lb_xdp.c; mirrored in dataplane/src/abi/lb.rs) ==== */

/* Capacities: what the object declares, and the daemon's defaults. The daemon sizes the
 * maps when it loads the program (--max-services, --max-backends, --max-flows), so these
 * are not compile-time walls. */
/* Services (VIP, port, protocol) the LB serves at once; each owns one Maglev ring. */
#define LB_MAX_SERVICES 4096
/* Slots of one service's Maglev ring: a prime (Maglev paper, section 3.4). */
#define LB_MAGLEV_SIZE 65537
/* Backend ids over all services (one per service port and backend address); id 0 means
 * "no backend". */
#define LB_MAX_BACKENDS 65536
/* Connection-tracking entries (LRU: the least recently used flows are evicted first). */
#define LB_MAX_FLOWS 1048576
/* Addresses the LB answers ARP and NDP for (sized like the services). */
#define LB_MAX_VIPS 4096
/* loadBalancerSourceRanges entries over all services. */
#define LB_MAX_SOURCE_RANGES 16384

/* lb_service.flags */
/* externalTrafficPolicy: Local: no SNAT, the backend sees the client's address. */
#define LB_SERVICE_F_LOCAL 0x1
/* The service has loadBalancerSourceRanges: a client outside them is dropped. */
#define LB_SERVICE_F_SOURCE_RANGES 0x2
/* sessionAffinity: ClientIP: a client's new flows go to its last backend while it is active
 * and the timeout has not passed. */
#define LB_SERVICE_F_AFFINITY 0x4
/* Direct server return (IPv4): the client's packet goes to the backend untranslated inside an
 * IPv4 header of the LB's (IP-in-IP); the backend, a node whose datapath serves the VIP,
 * answers the client itself. */
#define LB_SERVICE_F_DSR 0x8

/* lb_flow.state */
#define LB_FLOW_OPEN 0
/* A FIN or RST went by: the flow is ending; a new SYN on its tuple picks a backend afresh. */
#define LB_FLOW_CLOSING 1

/* An address of either family in network byte order: an IPv6 address, or an IPv4 address as
 * an IPv4-mapped IPv6 address (::ffff:a.b.c.d, RFC 4291 2.5.5.2: w[2] = htonl(0xffff),
 * w[3] = the IPv4 address). One key layout serves both families, and an IPv4 key never
 * equals an IPv6 one. All zero means "none". */
struct lb_addr {
	__be32 w[4];
};

/* Key of `lb_services`: what a client connects to. */
struct lb_service_key {
	struct lb_addr vip;
	__be16 port;
	/* IPPROTO_TCP or IPPROTO_UDP. */
	__u8 proto;
	__u8 pad;
};

/* Value of `lb_services`. */
struct lb_service {
	/* Index of the service's ring in `lb_maglev` and its
	 * entry in `lb_service_stats`. */
	__u32 id;
	/* LB_SERVICE_F_* */
	__u32 flags;
	/* sessionAffinity ClientIP: seconds a client stays with its backend after its last new
	 * flow (sessionAffinityConfig.clientIP.timeoutSeconds). */
	__u32 affinity_timeout_s;
	__u32 pad;
};

/* Value of the `lb_backends` array, indexed by backend id; of the VIP's family. */
struct lb_backend {
	struct lb_addr ip;
	__be16 port;
	/* LB_BACKEND_F_* */
	__u16 flags;
};

/* lb_backend.flags */
/* In its service's ring (healthy, weight > 0): session affinity may send new flows to it. */
#define LB_BACKEND_F_ACTIVE 0x1

/* Key of `lb_affinity` (LRU): a client of a service with sessionAffinity ClientIP. */
struct lb_affinity_key {
	__u32 service_id;
	struct lb_addr client;
};

/* Value of `lb_affinity`: the client's backend and when it last opened a flow. */
struct lb_affinity {
	__u32 backend_id;
	__u32 pad;
	__u64 last_seen_ns;
};

/* A flow's 5-tuple as seen in one direction: key of `lb_flows` (client -> VIP) and of
 * `lb_reverse` (backend -> where the LB sent the flow from). */
struct lb_flow_key {
	struct lb_addr src;
	struct lb_addr dst;
	__be16 sport;
	__be16 dport;
	__u8 proto;
	__u8 pad[3];
};

/* Value of `lb_flows` (LRU): the backend a flow is pinned to, and its translated source. */
struct lb_flow {
	__u32 backend_id;
	__u32 service_id;
	/* Source address and port the backend sees: the LB's SNAT address and a port chosen for
	 * the flow, or the client's own with LB_SERVICE_F_LOCAL. */
	struct lb_addr nat_ip;
	__be16 nat_port;
	/* LB_FLOW_* */
	__u8 state;
	__u8 pad;
	__u32 pad2;
	/* bpf_ktime_get_ns() of the last packet in either direction. */
	__u64 last_seen_ns;
};

/* Value of `lb_reverse` (LRU): how to turn a backend's reply back into the VIP's. */
struct lb_reverse {
	struct lb_addr client;
	struct lb_addr vip;
	__be16 client_port;
	__be16 vip_port;
	__u32 backend_id;
	__u32 service_id;
};

/* The data of an `lb_source_ranges` LPM key: the service id is matched in full (32 bits of
 * the prefix), then the client address's first (prefixlen - 32) bits; an IPv4 range a.b.c.d/n
 * is the IPv4-mapped prefix ::ffff:a.b.c.d/(96 + n). */
struct lb_source_range {
	__u32 service_id;
	struct lb_addr ip;
};

struct lb_source_range_key {
	__u32 prefixlen;
	struct lb_source_range data;
};

/* Key and value of `lb_vips`: addresses the LB announces (answers ARP or NDP for). */
struct lb_vip_key {
	struct lb_addr ip;
};

struct lb_vip {
	__u32 flags;
};

/* The single entry of the `lb_config` array. */
struct lb_config {
	/* Source addresses of SNATed flows, one per family: the LB host's own addresses on the LB
	 * interface (IPv4-mapped for IPv4). All zero: no SNAT in that family (such flows drop). */
	struct lb_addr snat_ip4;
	struct lb_addr snat_ip6;
	/* Where translated packets leave (the LB is one-armed: usually its ingress device). */
	__u32 ifindex;
	/* MAC of the LB interface: the answer to ARP requests and Neighbor Solicitations for
	 * VIPs. */
	__u8 mac[SLIPWAY_ETH_ALEN];
	__u8 pad[2];
};

/* Per-CPU traffic of one backend (`lb_backend_stats`) or service (`lb_service_stats`). */
struct lb_stats {
	__u64 packets;
	__u64 bytes;
	/* New flows pinned to it. */
	__u64 flows;
};

/* Why the LB gave a packet its verdict: index of the per-CPU `lb_counters` array (values of
 * struct counter_value). Stable: they appear in metrics. */
enum lb_reason {
	/* Client -> VIP, translated and sent to a backend. */
	LB_REASON_FORWARD = 1,
	/* Backend -> client, translated back and sent to the client. */
	LB_REASON_REPLY = 2,
	/* Not for a VIP and no tracked reply: left to the host stack. */
	LB_REASON_PASS = 3,
	/* The service has no backend in its ring. */
	LB_REASON_DROP_NO_BACKEND = 4,
	/* The client is outside the service's loadBalancerSourceRanges. */
	LB_REASON_DROP_SOURCE_RANGE = 5,
	/* Truncated or malformed header, an IP fragment or an IPv6 extension header to a VIP. */
	LB_REASON_DROP_MALFORMED = 6,
	/* An ARP request for a VIP, answered. */
	LB_REASON_ARP_REPLY = 7,
	/* For a VIP, but no service on that port and protocol. */
	LB_REASON_DROP_NO_SERVICE = 8,
	/* No free SNAT port for the flow, or no SNAT address in its family. */
	LB_REASON_DROP_NO_PORT = 9,
	/* The translated packet could not be routed. */
	LB_REASON_DROP_NO_ROUTE = 10,
	/* A Neighbor Solicitation for a VIP, answered with a Neighbor Advertisement. */
	LB_REASON_NDP_REPLY = 11,
	/* Events counted beside the verdict: */
	/* A new flow's entry could not be stored (lb_flows or lb_reverse refused the insert). */
	LB_REASON_FLOW_TABLE_FULL = 12,
	/* A TCP segment other than a SYN with no tracked flow: its entry was evicted from a full
	 * flow table (or the flow began before the LB), so Maglev places it again. */
	LB_REASON_FLOW_UNTRACKED = 13,
	/* Client -> VIP of a direct-server-return service, encapsulated and sent to a backend. */
	LB_REASON_ENCAP = 14,
};
#define LB_REASON_MAX 15

/* ---- Node routing (the CNI datapath across hosts) ---------------------------------------- */

/* Capacity of the routes map: pod CIDR blocks of other hosts. The loader sets the real one
 * (agent flag --route-entries); this is its default. */
#define SLIPWAY_MAX_ROUTES 16384

/* Key of the `routes` LPM trie: an IPv4 prefix (the layout of struct bpf_lpm_trie_key_u8 with
 * four bytes of data). */
struct route_key {
	__u32 prefixlen;
	__be32 ip4;
};

/* How packets reach the host that owns a block. */
enum slipway_route_mode {
	/* Encapsulated in VXLAN to the host's underlay address (collect_md device). */
	SLIPWAY_ROUTE_VXLAN = 1,
	/* Forwarded unencapsulated on the underlay to the host's address as next hop. */
	SLIPWAY_ROUTE_NATIVE = 2,
};

/* Value of the `routes` map: the host that owns the block. */
struct route_info {
	/* The host's underlay address. */
	__be32 host_ip4;
	/* 4 bytes, like every enum of this ABI; typed so that the enum reaches BTF. */
	enum slipway_route_mode mode;
};

/* Capacity of the service translation maps (NodePort, and ClusterIP at the pod veth; LRU: the
 * oldest flows are evicted first). The loader sets the real one (--nat-entries); this is its
 * default. */
#define SLIPWAY_MAX_NAT_FLOWS 262144

/* A packet's addresses and ports as it carries them: key of `nat_flows` (a request as it
 * arrives from the client) and of `nat_reverse` (a reply as the backend sends it). */
struct nat_tuple {
	__be32 saddr;
	__be32 daddr;
	__be16 sport;
	__be16 dport;
	__u8 proto;
	__u8 pad[3];
};

/* Value of `nat_flows`: where a NodePort flow's requests go. */
struct nat_forward {
	__be32 backend_ip4;
	__be16 backend_port;
	/* 1 when the backend is on another host: the source becomes this host's address so that
	 * the reply comes back through here to be translated. */
	__u8 snat;
	__u8 pad;
	/* The source address when snat is set: this host's router address. */
	__be32 snat_ip4;
};

/* Value of `nat_reverse`: what a reply's addresses and ports are restored to. */
struct nat_reply {
	__be32 saddr;
	__be32 daddr;
	__be16 sport;
	__be16 dport;
};

/* Key of the `stack_flows` LRU: a local pod's end of a flow it sent to one of this host's own
 * addresses, which the host stack handled (and may have DNATed: a hostPort). Its replies
 * must go back through the stack, never straight into the pod. Capacity: SLIPWAY_MAX_NAT_FLOWS
 * (set with the NAT maps). */
struct stack_flow_key {
	__be32 ip4;
	__be16 port;
	/* IPPROTO_TCP or IPPROTO_UDP. */
	__u8 proto;
	__u8 pad;
};

/* The single entry (key 0) of the `node_config` array: this host's devices. */
struct node_config {
	/* The external (collect_md) VXLAN device; 0 when VXLAN is not set up. */
	__u32 vxlan_ifindex;
	/* The underlay device packets leave by in native mode. */
	__u32 underlay_ifindex;
	/* VXLAN network identifier of the cluster. */
	__u32 vni;
	/* The host's router address: the first address of its pod block, never given to a pod.
	 * NodePort requests sent to a backend on another host carry it as source, so the reply
	 * routes back here like any pod traffic (and escapes the egress masquerade). */
	__be32 router_ip4;
	/* The host's own underlay address and the UDP port of the cluster's VXLAN: VXLAN packets
	 * to them pass the underlay device's program at once, for the VXLAN device to take out
	 * (0: VXLAN is not set up). */
	__be32 underlay_ip4;
	__u32 vxlan_port;
};

/* ---- Services: socket-level translation (ebpf/sock.c; mirrored in dataplane/src/abi/services.rs) */

/* Capacity of `svc_services`: (address, port, protocol) triples, ClusterIPs and NodePorts. */
#define SVC_MAX_SERVICES 65536
/* Capacity of `svc_slots`: backends over all services, with room for a service's old and new
 * backend lists to coexist while it is updated. */
#define SVC_MAX_SLOTS 262144
/* Most backends one service may have. */
#define SVC_MAX_BACKENDS 4096
/* Capacity of the `svc_reverse` LRU: (socket, backend) pairs whose peer is shown as the
 * service address (UDP replies, getpeername). */
#define SVC_MAX_REVERSE 65536

/* Key of `svc_services`: what a client addresses, a ClusterIP or a node IP with a NodePort. */
struct svc_key {
	__be32 ip4;
	__be16 port;
	/* IPPROTO_TCP or IPPROTO_UDP. */
	__u8 proto;
	__u8 pad;
};

/* Value of `svc_services`. The backends of the service are the `svc_slots` entries
 * (key, revision, 0 .. count-1). Userspace writes a new list under a new revision, then
 * replaces this value, then deletes the old revision's slots: a program that read this value
 * sees one complete list, never a half-written one. count == 0: connects are refused. */
struct svc_info {
	__u32 count;
	__u32 revision;
};

/* Key of `svc_slots`: one backend of one revision of a service's backend list. */
struct svc_slot_key {
	__be32 ip4;
	__be16 port;
	__u8 proto;
	__u8 pad;
	__u32 revision;
	__u32 slot;
};

/* An IPv4 address and port: the value of `svc_slots` (a backend) and of `svc_reverse` (the
 * service address a backend's replies are shown as). */
struct svc_addr {
	__be32 ip4;
	__be16 port;
	__u16 pad;
};

/* Key of `svc_reverse`: a socket (its cookie) and the backend it was sent to. */
struct svc_reverse_key {
	__u64 cookie;
	__be32 ip4;
	__be16 port;
	__u16 pad;
};

/* What the socket programs did: index of the per-CPU `svc_counters` array (__u64 values).
 * Stable: they appear in metrics. */
enum svc_event {
	/* A TCP connect to a service was sent to a backend. */
	SVC_EVENT_CONNECT_TCP = 0,
	/* A UDP connect to a service was sent to a backend. */
	SVC_EVENT_CONNECT_UDP = 1,
	/* A UDP datagram sent to a service address (sendto) went to a backend. */
	SVC_EVENT_SENDMSG_UDP = 2,
	/* A UDP datagram from a backend was shown to the application as from the service. */
	SVC_EVENT_RECVMSG_UDP = 3,
	/* A connect or send to a service without backends was refused (ECONNREFUSED). */
	SVC_EVENT_REFUSED_NO_BACKEND = 4,
	/* The backend list changed under the program more than it retries: refused. */
	SVC_EVENT_REFUSED_RACE = 5,
	/* getpeername() on a translated socket showed the service, not the backend. */
	SVC_EVENT_GETPEERNAME = 6,
	/* A pod's TCP flow to a service the socket programs did not translate (the pod is outside
	 * their cgroup), translated packet by packet at its veth. */
	SVC_EVENT_PACKET_TCP = 7,
	/* The same for a UDP flow. */
	SVC_EVENT_PACKET_UDP = 8,
};
#define SVC_EVENT_MAX 9

/* ---- NetworkPolicy (ebpf/include/policy.h; mirrored in dataplane/src/abi/policy.rs) ------ */

/*
 * The agent compiles policies into numbers the datapath looks up in constant time, however many
 * rules there are: every address gets an identity (`policy_ipcache`: pod addresses and ipBlock
 * prefixes, longest prefix wins); every local endpoint has flags saying which directions are
 * isolated (`policy_endpoints`); an isolated endpoint allows a peer if `policy_rules` holds a
 * prefix of (endpoint, direction, peer identity or ANY, protocol, port). All three maps hold
 * two slots: the agent fills the slot the datapath does not read, then flips
 * `policy_state.generation` (slot = generation & 1), so no packet sees half a policy.
 */

/* Capacity of `policy_rules`: both slots together. */
#define POLICY_MAX_RULES 262144
/* Capacity of `policy_ipcache`: both slots together. */
#define POLICY_MAX_IPCACHE 131072
/* Capacity of `policy_endpoints`: both slots together. */
#define POLICY_MAX_ENDPOINTS 131072
/* Capacity of the `policy_ct` LRU: connections of local pods. The loader sets the real one
 * (--ct-entries); this is its default, Cilium's for TCP. */
#define POLICY_MAX_CT 524288
/* Size of the `policy_events` ring buffer in bytes (a power of two, a multiple of the page). */
#define POLICY_EVENTS_BYTES (1 << 20)

/* Identities: 0 matches any peer in `policy_rules`; 1 is an address nothing else names. */
#define POLICY_IDENTITY_ANY 0
#define POLICY_IDENTITY_WORLD 1

/* Directions, as seen from the endpoint the policy selects. */
enum policy_direction {
	POLICY_INGRESS = 0,
	POLICY_EGRESS = 1,
};

/* policy_endpoint.flags */
/* Some policy selects the endpoint for ingress: what no rule allows is denied. */
#define POLICY_F_INGRESS 0x1
#define POLICY_F_EGRESS 0x2
/* The endpoint's ingress (egress) rules did not fit the map: all new traffic is denied. */
#define POLICY_F_INGRESS_FAIL_CLOSED 0x4
#define POLICY_F_EGRESS_FAIL_CLOSED 0x8

/* The single entry of the `policy_state` array. generation 0: no policy installed yet, the
 * datapath neither tracks nor enforces. */
struct policy_state {
	__u32 generation;
	__u32 pad;
};

/* The data of a `policy_ipcache` LPM key: the slot is matched in full (with the padding: 32
 * bits of the prefix), then the address's first (prefixlen - 32) bits. */
struct policy_ipcache_data {
	__u8 slot;
	__u8 pad[3];
	__be32 ip4;
};

struct policy_ipcache_key {
	__u32 prefixlen;
	struct policy_ipcache_data data;
};

struct policy_identity {
	__u32 id;
};

/* Key and value of `policy_endpoints` (hash): a local pod's flags in one slot. */
struct policy_endpoint_key {
	__be32 ip4;
	__u32 slot;
};

struct policy_endpoint {
	/* POLICY_F_* */
	__u32 flags;
};

/* The data of a `policy_rules` LPM key. The fields up to `identity` are always matched in full
 * (96 bits of the prefix); then a prefix of 96 allows any protocol and port, 104 any port of
 * `proto`, and 112 + k the ports whose first k bits equal dport's (a port range is a handful
 * of such prefixes). */
struct policy_rule_data {
	__u8 slot;
	/* enum policy_direction */
	__u8 direction;
	__u8 pad[2];
	/* The endpoint the rule belongs to: a local pod's address. */
	__be32 ep_ip4;
	/* The peer's identity, or POLICY_IDENTITY_ANY. */
	__u32 identity;
	/* IPPROTO_TCP, IPPROTO_UDP or IPPROTO_SCTP. */
	__u8 proto;
	__u8 pad2;
	/* The destination port, network byte order so that a prefix is a port range. */
	__be16 dport;
};

struct policy_rule_key {
	__u32 prefixlen;
	struct policy_rule_data data;
};

/* Prefix lengths of policy_rule_key. */
#define POLICY_RULE_ANY_PROTO 96
#define POLICY_RULE_ANY_PORT 104
#define POLICY_RULE_PORT_BASE 112

/* Value of `policy_rules`: which rule allows (the agent maps it to the policy and rule). */
struct policy_rule {
	__u32 rule_id;
};

/* Value of the `policy_ct` LRU, keyed by a connection's first packet's struct nat_tuple. */
struct policy_ct {
	/* The policy generation the connection was last decided under; a packet of a connection
	 * decided under an older one is decided again. */
	__u32 generation;
	__u32 pad;
};

/* Why a policy event was raised. */
enum policy_verdict {
	/* A new connection, allowed by rule `rule_id` (0: the endpoint is not isolated in this
	 * direction, but the other end is). */
	POLICY_VERDICT_ALLOW = 1,
	/* Denied: the endpoint is isolated and no rule allows. */
	POLICY_VERDICT_DENY = 2,
	/* Denied: the endpoint's rules overflowed the map; it fails closed. */
	POLICY_VERDICT_DENY_FAIL_CLOSED = 3,
};

/* A record of the `policy_events` ring buffer. */
struct policy_event {
	__u64 time_ns;
	__be32 saddr;
	__be32 daddr;
	__be16 sport;
	__be16 dport;
	__u8 proto;
	/* enum policy_direction of the end that decided. */
	__u8 direction;
	__u8 verdict;
	__u8 pad;
	__u32 rule_id;
	__u32 generation;
};

#endif /* SLIPWAY_ABI_H */
