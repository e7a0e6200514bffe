//! Per-packet service translation at a pod's veth and the tables' fill, in the real kernel
//! through `BPF_PROG_TEST_RUN` with smoltcp-built frames: a pod's packets to a ClusterIP that no
//! socket program translated go to a backend (checksums right), every packet of a flow to the
//! same one, replies come back as from the service, packets the socket path already translated
//! are left alone; a pod's flows to a node address send their local replies up the host stack
//! (which reverses a hostPort's DNAT); tables get the capacities asked at load, count their
//! entries, and count the inserts that found them full.
//! Privileged (root, BPF): run by scripts/test.sh with `--features privileged`.

mod common;

use std::collections::BTreeSet;
use std::net::Ipv4Addr;

use aya::programs::SchedClassifier;
use common::{
    B, Bpffs, POD_A, POD_B, TC_ACT_OK, TC_ACT_REDIRECT, TC_ACT_SHOT, TEST_RUN_IFINDEX,
    checked_tuple, tcp_frame, test_run, udp_frame,
};
use slipway_dataplane::abi::policy::{Direction, F_EGRESS};
use slipway_dataplane::abi::services::SvcEvent;
use slipway_dataplane::abi::{
    EndpointInfo, MAX_NAT_FLOWS, NodeConfig, Reason, RouteInfo, RouteMode, policy::MAX_CT,
};
use slipway_dataplane::node::{self, Installed, MapSizes, NodeMaps, Pins, TableFill};
use slipway_dataplane::policy::{PolicyMaps, PolicyTables, RuleEntry};
use slipway_dataplane::services::{Backend, ServiceDatapath, ServiceKey};
use slipway_dataplane::world::World;
use slipway_dataplane::{DataplaneError, netns};
use smoltcp::wire::IpProtocol;

const CLUSTER_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const POD_C: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 4);
const A: EndpointInfo = EndpointInfo {
    ifindex: 4243,
    pod_mac: [0x02, 0xaa, 0, 0, 0, 0x02],
    host_mac: [0x02, 0xcc, 0, 0, 0, 0x02],
};
const C: EndpointInfo = EndpointInfo {
    ifindex: 4244,
    pod_mac: [0x02, 0xdd, 0, 0, 0, 0x04],
    host_mac: [0x02, 0xcc, 0, 0, 0, 0x04],
};

/// A node datapath in a bpffs directory of its own, with pods A, B and C local.
struct Node {
    pins: Pins,
    prog: SchedClassifier,
    maps: NodeMaps,
    services: ServiceDatapath,
    _installed: Installed,
    _dir: Bpffs,
}

fn node(label: &str, sizes: &MapSizes) -> Node {
    let dir = Bpffs::new(label);
    let pins = Pins::new(&dir.0);
    let installed = node::install(&pins, sizes).expect("install the node datapath (root, BPF)");
    let prog = SchedClassifier::from_pin(pins.program("from_pod")).expect("from_pod pin");
    let mut maps = NodeMaps::open(&pins).expect("node maps");
    for (ip, info) in [(POD_A, A), (POD_B, B), (POD_C, C)] {
        maps.upsert_endpoint(ip, info).expect("endpoint");
    }
    let services =
        ServiceDatapath::load(Some(&pins.services_dir())).expect("service maps on the same pins");
    Node {
        pins,
        prog,
        maps,
        services,
        _installed: installed,
        _dir: dir,
    }
}

impl Node {
    fn fill(&self, map: &str) -> TableFill {
        self.maps
            .fills()
            .expect("fills")
            .into_iter()
            .find(|f| f.map == map)
            .unwrap_or_else(|| panic!("no fill for {map}"))
    }

    fn counted(&self, ifindex_out: u32, reason: Reason) -> u64 {
        common::counted(&self.maps, ifindex_out, reason)
    }

    fn service_event(&self, event: SvcEvent) -> u64 {
        self.services.counters().expect("svc counters")[&event]
    }
}

const SMALL: MapSizes = MapSizes {
    conntrack: 128,
    nat: 96,
    routes: 16,
};

#[test]
#[cfg_attr(
    not(feature = "privileged"),
    ignore = "privileged: root + BPF; run scripts/test.sh"
)]
fn tables_get_their_size_at_load_and_count_inserts_into_a_full_one() {
    let node = node("fill-test-run", &SMALL);
    for (map, capacity) in [
        ("policy_ct", 128),
        ("nat_flows", 96),
        ("nat_reverse", 96),
        ("stack_flows", 96),
        ("routes", 16),
    ] {
        let fill = node.fill(map);
        assert_eq!(
            (fill.capacity, fill.entries, fill.full_inserts),
            (capacity, 0, 0),
            "{map}"
        );
    }

    // With a policy generation installed, every new connection is tracked: 7 more than the
    // table holds. Each is counted once, as an entry or as an insert into a full table.
    PolicyMaps::open(&node.pins)
        .expect("policy maps")
        .install(&PolicyTables::default())
        .expect("policy generation 1");
    let flows = SMALL.conntrack + 7;
    for sport in 0..flows {
        let frame = udp_frame(POD_A, POD_B, (20000 + sport as u16, 53), b"q");
        assert_eq!(test_run(&node.prog, &frame, 1).0, TC_ACT_REDIRECT);
    }
    let ct = node.fill("policy_ct");
    assert_eq!(
        (ct.entries, ct.full_inserts),
        (u64::from(SMALL.conntrack), 7)
    );
    // Packets of a known connection insert nothing; the oldest connection was evicted for a
    // newer one: its next packet is a new insert into the full table.
    let newest = udp_frame(POD_A, POD_B, (20000 + flows as u16 - 1, 53), b"again");
    assert_eq!(test_run(&node.prog, &newest, 5).0, TC_ACT_REDIRECT);
    assert_eq!(node.fill("policy_ct").full_inserts, 7);
    let oldest = udp_frame(POD_A, POD_B, (20000, 53), b"again");
    assert_eq!(test_run(&node.prog, &oldest, 1).0, TC_ACT_REDIRECT);
    assert_eq!(node.fill("policy_ct").full_inserts, 8);

    // Routes, which userspace writes: the insert beyond the capacity is refused by name.
    let mut maps = NodeMaps::open(&node.pins).expect("maps");
    let owner = RouteInfo::new(Ipv4Addr::new(10, 99, 0, 2), RouteMode::Vxlan);
    for i in 0..16u8 {
        maps.upsert_route(Ipv4Addr::new(10, 245, i, 0), 24, owner)
            .expect("route within capacity");
    }
    let error = maps
        .upsert_route(Ipv4Addr::new(10, 245, 16, 0), 24, owner)
        .expect_err("17th route");
    assert!(
        matches!(
            error,
            DataplaneError::TableFull {
                map: "routes",
                capacity: 16
            }
        ),
        "{error}"
    );
    assert_eq!(node.fill("routes").entries, 16);

    // Installed again with other sizes (an agent restarted with other flags): the pinned maps
    // and their state stay, with the capacity they were created with.
    let _again = node::install(&node.pins, &MapSizes::default()).expect("reinstall");
    let ct = node.fill("policy_ct");
    assert_eq!(
        (ct.capacity, ct.entries),
        (SMALL.conntrack, u64::from(SMALL.conntrack))
    );
}

#[test]
#[cfg_attr(
    not(feature = "privileged"),
    ignore = "privileged: root + BPF; run scripts/test.sh"
)]
fn default_tables_fit_a_busy_node() {
    let node = node("default-sizes", &MapSizes::default());
    let conntrack = node.fill("policy_ct").capacity;
    assert!(conntrack >= 512 * 1024, "{conntrack}");
    assert_eq!(conntrack, MAX_CT);
    for map in ["nat_flows", "nat_reverse", "stack_flows"] {
        assert_eq!(node.fill(map).capacity, MAX_NAT_FLOWS, "{map}");
    }
}

#[test]
#[cfg_attr(
    not(feature = "privileged"),
    ignore = "privileged: root + BPF; run scripts/test.sh"
)]
fn a_pods_packets_to_a_clusterip_are_translated_at_its_veth() {
    let mut node = node("svc-test-run", &SMALL);
    node.services
        .upsert_service(
            ServiceKey::tcp(CLUSTER_IP, 80),
            &[Backend::new(POD_B, 8080), Backend::new(POD_C, 8080)],
        )
        .expect("tcp service");
    node.services
        .upsert_service(
            ServiceKey::udp(CLUSTER_IP, 53),
            &[Backend::new(POD_B, 5353)],
        )
        .expect("udp service");
    node.services
        .upsert_service(ServiceKey::tcp(CLUSTER_IP, 81), &[])
        .expect("service without backends");
    let ifindex_of = |ip: Ipv4Addr| if ip == POD_B { B.ifindex } else { C.ifindex };

    // Every packet of one flow goes to the backend its first packet got.
    let syn = tcp_frame(POD_A, CLUSTER_IP, (40000, 80), false);
    let (verdict, out) = test_run(&node.prog, &syn, 1);
    assert_eq!(verdict, TC_ACT_REDIRECT);
    let ((src, sport), (backend, dport)) = checked_tuple(&out);
    assert_eq!((src, sport, dport), (POD_A, 40000, 8080));
    assert!(backend == POD_B || backend == POD_C, "{backend}");
    for _ in 0..20 {
        let (verdict, out) = test_run(&node.prog, &syn, 1);
        assert_eq!(verdict, TC_ACT_REDIRECT);
        assert_eq!(
            checked_tuple(&out).1,
            (backend, 8080),
            "the flow kept its backend"
        );
    }
    assert_eq!(node.counted(ifindex_of(backend), Reason::RedirectPeer), 21);
    assert_eq!(node.counted(0, Reason::ServiceRequest), 21);
    assert_eq!(node.service_event(SvcEvent::PacketTcp), 1, "one new flow");

    // The backend's reply reaches A as from the service.
    let reply = tcp_frame(backend, POD_A, (8080, 40000), true);
    let (verdict, out) = test_run(&node.prog, &reply, 1);
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_eq!(checked_tuple(&out), ((CLUSTER_IP, 80), (POD_A, 40000)));
    assert_eq!(node.counted(0, Reason::ServiceReply), 1);
    assert_eq!(node.counted(A.ifindex, Reason::RedirectPeer), 1);

    // New flows spread over both backends.
    let mut seen = BTreeSet::new();
    for sport in 41000..41040 {
        let (verdict, out) = test_run(
            &node.prog,
            &tcp_frame(POD_A, CLUSTER_IP, (sport, 80), false),
            1,
        );
        assert_eq!(verdict, TC_ACT_REDIRECT);
        seen.insert(checked_tuple(&out).1.0);
    }
    assert_eq!(seen, BTreeSet::from([POD_B, POD_C]));
    assert_eq!(node.service_event(SvcEvent::PacketTcp), 41);

    // UDP too.
    let (verdict, out) = test_run(
        &node.prog,
        &udp_frame(POD_A, CLUSTER_IP, (5000, 53), b"q"),
        1,
    );
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_eq!(checked_tuple(&out), ((POD_A, 5000), (POD_B, 5353)));
    assert_eq!(node.service_event(SvcEvent::PacketUdp), 1);

    // A packet the socket path already translated carries the backend's address: left alone.
    let requests = node.counted(0, Reason::ServiceRequest);
    let direct = tcp_frame(POD_A, POD_B, (42000, 8080), false);
    let (verdict, out) = test_run(&node.prog, &direct, 1);
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_eq!(&out[14..], &direct[14..]);
    assert_eq!(node.counted(0, Reason::ServiceRequest), requests);
    assert_eq!(node.service_event(SvcEvent::PacketTcp), 41);

    // A service without backends drops (a socket would get ECONNREFUSED).
    let (verdict, _) = test_run(
        &node.prog,
        &tcp_frame(POD_A, CLUSTER_IP, (43000, 81), false),
        1,
    );
    assert_eq!(verdict, TC_ACT_SHOT);
    assert_eq!(node.counted(0, Reason::DropNodeport), 1);

    // 42 flows so far; fill the NAT tables past their 96 entries.
    for sport in 44000..44000 + 60 {
        test_run(
            &node.prog,
            &tcp_frame(POD_A, CLUSTER_IP, (sport, 80), false),
            1,
        );
    }
    let flows = node.fill("nat_flows");
    assert_eq!((flows.entries, flows.full_inserts), (96, 42 + 60 - 96));
}

#[test]
#[cfg_attr(
    not(feature = "privileged"),
    ignore = "privileged: root + BPF; run scripts/test.sh"
)]
fn policy_decides_a_translated_flow_by_its_backend_not_the_service_address() {
    let mut node = node("svc-policy-test-run", &SMALL);
    node.services
        .upsert_service(
            ServiceKey::tcp(CLUSTER_IP, 80),
            &[Backend::new(POD_B, 8080)],
        )
        .expect("service to B");
    node.services
        .upsert_service(
            ServiceKey::tcp(CLUSTER_IP, 81),
            &[Backend::new(POD_C, 8080)],
        )
        .expect("service to C");
    // A's egress is isolated: it may reach B (identity 100) on 8080, nothing else. No rule
    // names the ClusterIP.
    let mut tables = PolicyTables::default();
    tables.ipcache.insert((POD_B, 32), 100);
    tables.ipcache.insert((POD_C, 32), 101);
    tables.endpoints.insert(POD_A, F_EGRESS);
    tables.rules.insert(
        RuleEntry {
            ep: POD_A,
            direction: Direction::Egress,
            identity: 100,
            proto: 6,
            port: 8080,
            port_bits: 16,
        },
        1,
    );
    PolicyMaps::open(&node.pins)
        .expect("policy maps")
        .install(&tables)
        .expect("install");

    let (verdict, out) = test_run(
        &node.prog,
        &tcp_frame(POD_A, CLUSTER_IP, (40000, 80), false),
        1,
    );
    assert_eq!(verdict, TC_ACT_REDIRECT, "allowed: the backend is B");
    assert_eq!(checked_tuple(&out).1, (POD_B, 8080));
    let (verdict, out) = test_run(&node.prog, &tcp_frame(POD_B, POD_A, (8080, 40000), true), 1);
    assert_eq!(
        verdict, TC_ACT_REDIRECT,
        "the reply of the tracked connection"
    );
    assert_eq!(checked_tuple(&out).0, (CLUSTER_IP, 80));

    let (verdict, _) = test_run(
        &node.prog,
        &tcp_frame(POD_A, CLUSTER_IP, (40001, 81), false),
        1,
    );
    assert_eq!(verdict, TC_ACT_SHOT, "denied: the backend is C");
    assert_eq!(node.counted(0, Reason::DropPolicy), 1);
}

#[test]
#[cfg_attr(
    not(feature = "privileged"),
    ignore = "privileged: root + BPF; run scripts/test.sh"
)]
fn a_pod_that_is_its_own_backend_gets_the_request_from_the_router_address() {
    let mut node = node("svc-hairpin-test-run", &SMALL);
    let router = Ipv4Addr::new(10, 244, 1, 1);
    node.maps
        .set_config(NodeConfig {
            router_ip4: u32::from_ne_bytes(router.octets()),
            ..NodeConfig::default()
        })
        .expect("node config");
    node.services
        .upsert_service(
            ServiceKey::tcp(CLUSTER_IP, 80),
            &[Backend::new(POD_A, 8080)],
        )
        .expect("service backed by A");

    let (verdict, out) = test_run(
        &node.prog,
        &tcp_frame(POD_A, CLUSTER_IP, (40000, 80), false),
        1,
    );
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_eq!(checked_tuple(&out), ((router, 40000), (POD_A, 8080)));
    assert_eq!(node.counted(A.ifindex, Reason::RedirectPeer), 1);

    let (verdict, out) = test_run(
        &node.prog,
        &tcp_frame(POD_A, router, (8080, 40000), true),
        1,
    );
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_eq!(checked_tuple(&out), ((CLUSTER_IP, 80), (POD_A, 40000)));
    assert_eq!(node.counted(A.ifindex, Reason::RedirectPeer), 2);
}

#[test]
#[cfg_attr(
    not(feature = "privileged"),
    ignore = "privileged: root + BPF + netns; run scripts/test.sh"
)]
fn replies_to_a_pods_flow_to_a_node_address_go_back_through_the_host_stack() {
    let node = node("stack-test-run", &SMALL);
    // The test run's packets arrive on the loopback of the caller's namespace: a host of a
    // world, forwarding as an agent makes it, with its underlay address local.
    let world = World::builder().hosts(1).build().expect("world");
    let host = world.host(1);
    host.netns
        .sysctl(&["net.ipv4.ip_forward=1"])
        .expect("forwarding");
    host.netns
        .ip(&["route", "add", "default", "via", "10.99.0.254"])
        .expect("default route");
    let node_ip = host.underlay_ip;
    let pin = node.pins.program("from_pod");
    let run = |frame: Vec<u8>| {
        netns::run_in(host.netns.name(), || {
            let prog = SchedClassifier::from_pin(&pin).expect("from_pod pin");
            test_run(&prog, &frame, 1).0
        })
        .expect("run in the host's namespace")
    };
    let reply = |sport: u16, dport: u16| tcp_frame(POD_B, POD_A, (sport, dport), true);

    // No pod has sent anything to a node address: local replies go straight into the pod.
    assert_eq!(run(reply(80, 40000)), TC_ACT_REDIRECT);

    // A's SYN to the node's address (a hostPort, DNATed by netfilter to B:80) goes up the
    // stack and is recorded; B's answer then goes up the stack too, to be translated back.
    assert_eq!(
        run(tcp_frame(POD_A, node_ip, (40000, 8080), false)),
        TC_ACT_OK
    );
    assert_eq!(node.fill("stack_flows").entries, 1);
    assert_eq!(run(reply(80, 40000)), TC_ACT_OK);
    assert_eq!(node.counted(0, Reason::PassStackFlow), 1);

    // A flow to an address that is not the host's (routed out) is not recorded: its port's
    // replies from a local pod are delivered directly.
    assert_eq!(
        run(tcp_frame(
            POD_A,
            Ipv4Addr::new(192, 0, 2, 1),
            (40001, 443),
            false
        )),
        TC_ACT_OK
    );
    assert_eq!(node.fill("stack_flows").entries, 1);
    assert_eq!(run(reply(80, 40001)), TC_ACT_REDIRECT);

    // UDP to the node's address: recorded on its first datagram.
    assert_eq!(run(udp_frame(POD_A, node_ip, (5000, 53), b"q")), TC_ACT_OK);
    assert_eq!(run(udp_frame(POD_A, node_ip, (5000, 53), b"q")), TC_ACT_OK);
    assert_eq!(node.fill("stack_flows").entries, 2);
    assert_eq!(run(udp_frame(POD_B, POD_A, (53, 5000), b"a")), TC_ACT_OK);
    assert_eq!(node.counted(0, Reason::PassStackFlow), 2);
}

/// `frame` (Ethernet + IPv4) inside an outer IPv4 header from `lb` to `node` (IP-in-IP), as a
/// load balancer sends a request with direct server return.
fn ip_in_ip(lb: Ipv4Addr, node: Ipv4Addr, frame: &[u8]) -> Vec<u8> {
    let inner = &frame[14..];
    let mut out = common::ipv4_frame(lb, node, IpProtocol::Unknown(4), inner.len(), |l4, _| {
        l4.copy_from_slice(inner)
    });
    out[..14].copy_from_slice(&frame[..14]);
    out
}

/// Direct server return at a node's device: a load balancer's IP-in-IP packet with a client's
/// SYN to a VIP the node serves is taken out and translated to the local backend, the client's
/// address kept; the flow's next packets go to the same backend; the backend's reply leaves as
/// from the VIP, straight to the client; IP-in-IP around anything but a request to a service of
/// this node is dropped (its inner source could be anyone's).
#[test]
#[cfg_attr(
    not(feature = "privileged"),
    ignore = "privileged: root + BPF; run scripts/test.sh"
)]
fn a_load_balancers_ip_in_ip_request_is_taken_out_and_answered_from_the_vip() {
    const VIP: Ipv4Addr = Ipv4Addr::new(10, 124, 100, 1);
    const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 123, 1, 50);
    const EDGE: Ipv4Addr = Ipv4Addr::new(10, 123, 1, 10);
    const NODE: Ipv4Addr = Ipv4Addr::new(10, 123, 2, 20);
    let mut node = node("dsr-test-run", &SMALL);
    node.maps
        .set_config(NodeConfig {
            router_ip4: u32::from_ne_bytes(Ipv4Addr::new(10, 244, 1, 1).octets()),
            underlay_ifindex: TEST_RUN_IFINDEX,
            ..NodeConfig::default()
        })
        .expect("node config");
    node.services
        .upsert_service(ServiceKey::tcp(VIP, 80), &[Backend::new(POD_B, 8080)])
        .expect("the VIP's entry");
    let host = SchedClassifier::from_pin(node.pins.program("from_netdev")).expect("from_netdev");

    let syn = tcp_frame(CLIENT, VIP, (40000, 80), false);
    for _ in 0..3 {
        let (verdict, out) = test_run(&host, &ip_in_ip(EDGE, NODE, &syn), 1);
        assert_eq!(verdict, TC_ACT_REDIRECT);
        assert_eq!(
            checked_tuple(&out),
            ((CLIENT, 40000), (POD_B, 8080)),
            "decapsulated, to the backend, the client's address kept"
        );
    }
    assert_eq!(node.counted(0, Reason::DsrDecap), 3);
    assert_eq!(node.counted(B.ifindex, Reason::RedirectPeer), 3);

    // The backend's reply, as it leaves its veth: from the VIP to the client.
    let pod = SchedClassifier::from_pin(node.pins.program("from_pod")).expect("from_pod");
    let reply = tcp_frame(POD_B, CLIENT, (8080, 40000), true);
    let (verdict, out) = test_run(&pod, &reply, 1);
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_eq!(checked_tuple(&out), ((VIP, 80), (CLIENT, 40000)));
    assert_eq!(node.counted(TEST_RUN_IFINDEX, Reason::NodeportReply), 1);

    // IP-in-IP to a pod, or to a port the VIP does not serve: dropped.
    for inner in [
        tcp_frame(CLIENT, POD_B, (40001, 8080), false),
        tcp_frame(CLIENT, VIP, (40002, 81), false),
    ] {
        let (verdict, _) = test_run(&host, &ip_in_ip(EDGE, NODE, &inner), 1);
        assert_eq!(verdict, TC_ACT_SHOT);
    }
    assert_eq!(node.counted(0, Reason::DropDsr), 2);
}
