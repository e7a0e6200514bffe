//! VXLAN in the node programs, in the real kernel through `BPF_PROG_TEST_RUN` with
//! smoltcp-built frames: a pod's packet for a pod on another host goes to the VXLAN device
//! (which encapsulates it with the tunnel key the program set), counted against it; on the
//! receiving host the underlay's program lets the cluster's VXLAN packets to this host through
//! untouched and uncounted, for the VXLAN device to take out, and handles other UDP as before.
//! Privileged (root, BPF): run by scripts/test.sh with `--features privileged`.

mod common;

use std::net::Ipv4Addr;

use aya::programs::SchedClassifier;
use common::{Bpffs, POD_A, TC_ACT_OK, TC_ACT_REDIRECT, test_run, udp_frame};
use slipway_dataplane::abi::{NodeConfig, Reason, RouteInfo, RouteMode};
use slipway_dataplane::node::{self, Installed, MapSizes, NodeMaps, Pins};

const REMOTE_POD: Ipv4Addr = Ipv4Addr::new(10, 244, 2, 5);
const THIS_HOST: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 1);
const REMOTE_HOST: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 2);
const VXLAN_IFINDEX: u32 = 77;
const UNDERLAY_IFINDEX: u32 = 88;
const VXLAN_PORT: u16 = 4789;

struct Node {
    pins: Pins,
    maps: NodeMaps,
    _installed: Installed,
    _dir: Bpffs,
}

fn node(label: &str) -> Node {
    let dir = Bpffs::new(label);
    let pins = Pins::new(&dir.0);
    let installed = node::install(&pins, &MapSizes::default()).expect("install (root, BPF)");
    let mut maps = NodeMaps::open(&pins).expect("node maps");
    maps.set_config(NodeConfig {
        vxlan_ifindex: VXLAN_IFINDEX,
        underlay_ifindex: UNDERLAY_IFINDEX,
        vni: 42,
        underlay_ip4: u32::from_ne_bytes(THIS_HOST.octets()),
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
        maps,
        _installed: installed,
        _dir: dir,
    }
}

impl Node {
    fn program(&self, name: &str) -> SchedClassifier {
        SchedClassifier::from_pin(self.pins.program(name)).expect("program pin")
    }

    fn counted(&self, ifindex_out: u32, reason: Reason) -> u64 {
        common::counted(&self.maps, ifindex_out, reason)
    }
}

#[test]
#[cfg_attr(
    not(feature = "privileged"),
    ignore = "privileged: root + BPF; run scripts/test.sh"
)]
fn a_packet_for_another_host_goes_to_the_vxlan_device() {
    let node = node("vxlan-test-run");
    let frame = udp_frame(POD_A, REMOTE_POD, (40000, 5201), b"to a pod elsewhere");
    let (verdict, out) = test_run(&node.program("from_pod"), &frame, 1);
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_eq!(out, frame, "left for the device, with a tunnel key");
    assert_eq!(node.counted(VXLAN_IFINDEX, Reason::RedirectVxlan), 1);
}

#[test]
#[cfg_attr(
    not(feature = "privileged"),
    ignore = "privileged: root + BPF; run scripts/test.sh"
)]
fn the_receiving_underlay_program_leaves_vxlan_to_the_device() {
    let node = node("vxlan-rx-test-run");
    let inner = udp_frame(POD_A, REMOTE_POD, (40000, 5201), b"to a pod here");
    let mut payload = vec![0x08, 0, 0, 0, 0, 0, 42, 0];
    payload.extend_from_slice(&inner);
    let vxlan = udp_frame(REMOTE_HOST, THIS_HOST, (50000, VXLAN_PORT), &payload);
    let underlay = node.program("from_netdev");

    let (verdict, out) = test_run(&underlay, &vxlan, 1);
    assert_eq!(verdict, TC_ACT_OK);
    assert_eq!(out, vxlan, "untouched");
    assert!(
        node.maps.counters().expect("counters").is_empty(),
        "the outer packet is not counted (the pod's packet is, on the VXLAN device)"
    );

    // UDP to another port of this host is no VXLAN: it goes the usual way, counted.
    let other = udp_frame(REMOTE_HOST, THIS_HOST, (50000, 4790), &payload);
    let (verdict, _) = test_run(&underlay, &other, 1);
    assert_eq!(verdict, TC_ACT_OK);
    assert_eq!(node.counted(0, Reason::PassNoEndpoint), 1);
}
