//! VXLAN built by the pod-veth program itself, in the real kernel through `BPF_PROG_TEST_RUN`
//! with smoltcp-built frames: a packet for a pod on another host leaves with outer IPv4, UDP and
//! VXLAN headers around the pod's untouched frame (valid IPv4 checksum, lengths that cover the
//! whole packet, the cluster's VNI, a source port that follows the flow), bound for the underlay
//! device; without an underlay address configured the VXLAN device encapsulates instead. On the
//! receiving host the underlay's program lets the VXLAN packet through untouched, for the
//! VXLAN device to take out.
//! Privileged (root, BPF): run by scripts/test.sh with `--features privileged`.

mod common;

use std::collections::BTreeSet;
use std::net::Ipv4Addr;

use aya::programs::SchedClassifier;
use common::TC_ACT_OK;
use common::{Bpffs, POD_A, TC_ACT_REDIRECT, TEST_RUN_IFINDEX, test_run, udp_frame};
use slipway_dataplane::abi::{CounterKey, NodeConfig, Reason, RouteInfo, RouteMode};
use slipway_dataplane::node::{self, Installed, MapSizes, NodeMaps, Pins};
use smoltcp::wire::{EthernetFrame, EthernetProtocol, IpProtocol, Ipv4Packet, UdpPacket};

const REMOTE_POD: Ipv4Addr = Ipv4Addr::new(10, 244, 2, 5);
const THIS_HOST: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 1);
const REMOTE_HOST: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 2);
const VXLAN_IFINDEX: u32 = 77;
const UNDERLAY_IFINDEX: u32 = 88;
const VNI: u32 = 0x12_3456;
const VXLAN_PORT: u16 = 4789;
/// Outer IPv4 (20) + UDP (8) + VXLAN (8) in front of the pod's frame.
const OUTER: usize = 36;

struct Node {
    pins: Pins,
    prog: SchedClassifier,
    maps: NodeMaps,
    _installed: Installed,
    _dir: Bpffs,
}

fn node(label: &str, underlay_ip: Ipv4Addr) -> Node {
    let dir = Bpffs::new(label);
    let pins = Pins::new(&dir.0);
    let installed = node::install(&pins, &MapSizes::default()).expect("install (root, BPF)");
    let prog = SchedClassifier::from_pin(pins.program("from_pod")).expect("from_pod pin");
    let mut maps = NodeMaps::open(&pins).expect("node maps");
    maps.set_config(NodeConfig {
        vxlan_ifindex: VXLAN_IFINDEX,
        underlay_ifindex: UNDERLAY_IFINDEX,
        vni: VNI,
        underlay_ip4: u32::from_ne_bytes(underlay_ip.octets()),
        vxlan_port: u32::from(VXLAN_PORT),
        ..NodeConfig::default()
    })
    .expect("node config");
    maps.upsert_route(
        Ipv4Addr::new(10, 244, 2, 0),
        24,
        RouteInfo::new(REMOTE_HOST, RouteMode::Vxlan),
    )
    .expect("route");
    Node {
        pins,
        prog,
        maps,
        _installed: installed,
        _dir: dir,
    }
}

impl Node {
    fn underlay_program(&self) -> SchedClassifier {
        SchedClassifier::from_pin(self.pins.program("from_netdev")).expect("from_netdev pin")
    }

    fn counted(&self, ifindex_out: u32) -> u64 {
        let key = CounterKey {
            ifindex_in: TEST_RUN_IFINDEX,
            ifindex_out,
            reason: Reason::RedirectVxlan as u32,
        };
        self.maps
            .counters()
            .expect("counters")
            .get(&key)
            .map_or(0, |v| v.packets)
    }
}

/// Checks the outer headers of an encapsulated `frame` and returns its UDP source port.
fn outer_source_port(out: &[u8], frame: &[u8]) -> u16 {
    let eth = EthernetFrame::new_checked(out).expect("outer ethernet");
    assert_eq!(eth.ethertype(), EthernetProtocol::Ipv4);
    let ip = Ipv4Packet::new_checked(eth.payload()).expect("outer ipv4");
    assert!(ip.verify_checksum(), "outer IPv4 checksum");
    assert_eq!((ip.src_addr(), ip.dst_addr()), (THIS_HOST, REMOTE_HOST));
    assert_eq!(ip.next_header(), IpProtocol::Udp);
    assert_eq!(ip.hop_limit(), 64);
    assert_eq!(usize::from(ip.total_len()), out.len() - 14, "outer length");
    let udp = UdpPacket::new_checked(ip.payload()).expect("outer udp");
    assert_eq!(udp.dst_port(), VXLAN_PORT);
    assert_eq!(usize::from(udp.len()), out.len() - 14 - 20, "udp length");
    assert_eq!(
        udp.checksum(),
        0,
        "no outer UDP checksum, as the VXLAN device sends"
    );
    let vxlan = &udp.payload()[..8];
    assert_eq!(vxlan[0], 0x08, "VXLAN I flag");
    assert_eq!(
        u32::from_be_bytes([vxlan[4], vxlan[5], vxlan[6], vxlan[7]]) >> 8,
        VNI
    );
    assert_eq!(
        &out[14 + OUTER..],
        frame,
        "the pod's frame, untouched, inside"
    );
    let port = udp.src_port();
    assert!((32768..61000).contains(&port), "source port {port}");
    port
}

#[test]
#[cfg_attr(
    not(feature = "privileged"),
    ignore = "privileged: root + BPF; run scripts/test.sh"
)]
fn a_packet_for_another_host_leaves_in_vxlan_built_by_the_program() {
    let node = node("vxlan-test-run", THIS_HOST);
    let frame = udp_frame(POD_A, REMOTE_POD, (40000, 5201), b"to a pod elsewhere");
    let (verdict, out) = test_run(&node.prog, &frame, 1);
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_eq!(out.len(), frame.len() + OUTER + 14);
    let port = outer_source_port(&out, &frame);
    assert_eq!(node.counted(UNDERLAY_IFINDEX), 1, "sent by the underlay");
    assert_eq!(node.counted(VXLAN_IFINDEX), 0);

    // A flow keeps its source port (the outer flow a NIC hashes on); flows spread over ports.
    let (_, again) = test_run(&node.prog, &frame, 1);
    assert_eq!(outer_source_port(&again, &frame), port);
    let ports: BTreeSet<u16> = (0..16u16)
        .map(|i| {
            let frame = udp_frame(POD_A, REMOTE_POD, (41000 + i, 5201), b"x");
            let (verdict, out) = test_run(&node.prog, &frame, 1);
            assert_eq!(verdict, TC_ACT_REDIRECT);
            outer_source_port(&out, &frame)
        })
        .collect();
    assert!(ports.len() > 1, "16 flows on one source port: {ports:?}");
}

#[test]
#[cfg_attr(
    not(feature = "privileged"),
    ignore = "privileged: root + BPF; run scripts/test.sh"
)]
fn without_an_underlay_address_the_vxlan_device_encapsulates() {
    let node = node("vxlan-device-test-run", Ipv4Addr::UNSPECIFIED);
    let frame = udp_frame(POD_A, REMOTE_POD, (40000, 5201), b"to a pod elsewhere");
    let (verdict, out) = test_run(&node.prog, &frame, 1);
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_eq!(out, frame, "left for the device, with a tunnel key");
    assert_eq!(node.counted(VXLAN_IFINDEX), 1);
    assert_eq!(node.counted(UNDERLAY_IFINDEX), 0);
}

#[test]
#[cfg_attr(
    not(feature = "privileged"),
    ignore = "privileged: root + BPF; run scripts/test.sh"
)]
fn the_receiving_underlay_program_leaves_vxlan_to_the_device() {
    let sender = node("vxlan-tx-test-run", THIS_HOST);
    let receiver = node("vxlan-rx-test-run", REMOTE_HOST);
    let frame = udp_frame(POD_A, REMOTE_POD, (40000, 5201), b"to a pod elsewhere");
    let (_, vxlan) = test_run(&sender.prog, &frame, 1);
    outer_source_port(&vxlan, &frame);

    let (verdict, out) = test_run(&receiver.underlay_program(), &vxlan, 1);
    assert_eq!(verdict, TC_ACT_OK);
    assert_eq!(out, vxlan, "untouched");
    assert!(
        receiver.maps.counters().expect("counters").is_empty(),
        "the outer packet is not counted (the pod's packet is, on the VXLAN device)"
    );

    // UDP to another port of this host is no VXLAN: it goes the usual way, counted.
    let mut other = vxlan.clone();
    other[14 + 22..14 + 24].copy_from_slice(&4790u16.to_be_bytes());
    let (verdict, _) = test_run(&receiver.underlay_program(), &other, 1);
    assert_eq!(verdict, TC_ACT_OK);
    let key = CounterKey {
        ifindex_in: TEST_RUN_IFINDEX,
        ifindex_out: 0,
        reason: Reason::PassNoEndpoint as u32,
    };
    assert_eq!(
        receiver
            .maps
            .counters()
            .expect("counters")
            .get(&key)
            .map(|v| v.packets),
        Some(1)
    );
}
