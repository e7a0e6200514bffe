//! The LB program (`ebpf/lb.c`) in the real kernel, driven by the real controller and fed
//! fixture frames built with smoltcp through `BPF_PROG_TEST_RUN`: ARP answers, Neighbor
//! Advertisements for Neighbor Solicitations (bytes and checksum checked), DNAT+SNAT with valid
//! checksums over IPv4 and IPv6, the reverse translation, conntrack stickiness, source ranges,
//! eTP Local, and the verdict counters. Privileged (root, BPF): run by scripts/test.sh.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use slipway_dataplane::abi::lb::{LbAddr, LbConfig as ConfigValue, LbReason};
use slipway_lb::announce::{Announcer, StaticLease};
use slipway_lb::config::{
    BackendSpec, LbConfig, MapSizes, PoolConfig, Protocol, ServicePort, ServiceSpec, TrafficPolicy,
};
use slipway_lb::controller::Controller;
use slipway_lb::datapath::{AttachPoint, LbDatapath, LbProgram, XdpMode};
use slipway_lb::pool::Pools;
use smoltcp::phy::ChecksumCapabilities;
use smoltcp::wire::{
    ArpOperation, ArpPacket, ArpRepr, EthernetAddress, EthernetFrame, EthernetProtocol,
    EthernetRepr, Icmpv6Packet, Icmpv6Repr, IpAddress, IpProtocol, Ipv4Packet, Ipv4Repr,
    Ipv6Packet, Ipv6Repr, NdiscNeighborFlags, NdiscRepr, TcpControl, TcpPacket, TcpRepr,
    TcpSeqNumber, UdpPacket, UdpRepr,
};

// linux/pkt_cls.h
const TC_ACT_OK: u32 = 0;
const TC_ACT_SHOT: u32 = 2;
const TC_ACT_REDIRECT: u32 = 7;
// linux/bpf.h, enum xdp_action
const XDP_TX: u32 = 3;

const LB_MAC: [u8; 6] = [0x02, 0x1b, 0, 0, 0, 0x02];
const CLIENT_MAC: [u8; 6] = [0x02, 0xc1, 0, 0, 0, 0x01];
const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 1);
const OTHER_CLIENT: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 9);
const LB_IP: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 2);
const VIP: Ipv4Addr = Ipv4Addr::new(10, 99, 100, 10);
const BACKENDS: [Ipv4Addr; 3] = [
    Ipv4Addr::new(10, 99, 0, 3),
    Ipv4Addr::new(10, 99, 0, 4),
    Ipv4Addr::new(10, 99, 0, 5),
];
const CLIENT6: Ipv6Addr = Ipv6Addr::new(0xfd99, 0, 0, 0, 0, 0, 0, 1);
const OTHER_CLIENT6: Ipv6Addr = Ipv6Addr::new(0xfd98, 0, 0, 0, 0, 0, 0, 1);
const LB_IP6: Ipv6Addr = Ipv6Addr::new(0xfd99, 0, 0, 0, 0, 0, 0, 2);
const VIP6: Ipv6Addr = Ipv6Addr::new(0xfd99, 0x100, 0, 0, 0, 0, 0, 0x10);
const BACKENDS6: [Ipv6Addr; 3] = [
    Ipv6Addr::new(0xfd99, 0, 0, 0, 0, 0, 0, 3),
    Ipv6Addr::new(0xfd99, 0, 0, 0, 0, 0, 0, 4),
    Ipv6Addr::new(0xfd99, 0, 0, 0, 0, 0, 0, 5),
];

/// Map sizes for tests: small, so parallel tests do not each take the default 1M-flow tables.
fn small() -> MapSizes {
    MapSizes {
        services: 16,
        backends: 64,
        flows: 4096,
    }
}

struct Lb {
    datapath: Arc<Mutex<LbDatapath>>,
    controller: Controller,
}

fn lb() -> Lb {
    lb_sized(&small())
}

fn lb_sized(sizes: &MapSizes) -> Lb {
    let mut datapath =
        LbDatapath::load(AttachPoint::Tc, None, sizes).expect("load lb (needs root + BPF)");
    datapath
        .set_config(ConfigValue {
            snat_ip4: LB_IP.into(),
            snat_ip6: LB_IP6.into(),
            ifindex: 1,
            mac: LB_MAC,
            pad: [0; 2],
        })
        .expect("config");
    let datapath = Arc::new(Mutex::new(datapath));
    let pools = Pools::from_config(&LbConfig::new(
        "eth0",
        vec![
            PoolConfig {
                name: "ingress".into(),
                cidr: "10.99.100.0/24".into(),
            },
            PoolConfig {
                name: "ingress6".into(),
                cidr: "fd99:100::/120".into(),
            },
        ],
    ))
    .expect("pools");
    let controller = Controller::new(
        Box::new(datapath.clone()),
        pools,
        Announcer::new(Arc::new(StaticLease)),
    );
    Lb {
        datapath,
        controller,
    }
}

fn service<A: Into<IpAddr> + Copy>(
    name: &str,
    protocol: Protocol,
    port: u16,
    target: u16,
    backends: &[A],
) -> ServiceSpec {
    let family = backends.first().map(|b| (*b).into());
    ServiceSpec {
        namespace: "default".into(),
        name: name.into(),
        ip_families: Vec::new(),
        ports: vec![ServicePort {
            name: None,
            protocol,
            port,
            target_port: target,
        }],
        load_balancer_ip: Some(if family.is_some_and(|ip: IpAddr| ip.is_ipv6()) {
            IpAddr::V6(VIP6)
        } else {
            IpAddr::V4(VIP)
        }),
        load_balancer_source_ranges: Vec::new(),
        external_traffic_policy: TrafficPolicy::Cluster,
        backends: backends
            .iter()
            .map(|ip| BackendSpec {
                ip: (*ip).into(),
                weight: 1,
                node_local: false,
            })
            .collect(),
        health_check: None,
        drain_timeout_secs: None,
        session_affinity: Default::default(),
        session_affinity_config: None,
        direct_server_return: false,
    }
}

/// Ethernet (client -> LB) and an IP header of `src`'s family for an L4 payload of `l4_len`
/// bytes; returns the frame (L4 bytes zero) and the L4 offset.
fn eth_ip(src: IpAddr, dst: IpAddr, proto: IpProtocol, l4_len: usize) -> (Vec<u8>, usize) {
    let v6 = src.is_ipv6();
    let eth = EthernetRepr {
        src_addr: EthernetAddress(CLIENT_MAC),
        dst_addr: EthernetAddress(LB_MAC),
        ethertype: if v6 {
            EthernetProtocol::Ipv6
        } else {
            EthernetProtocol::Ipv4
        },
    };
    let ip_len = if v6 { 40 } else { 20 };
    let mut buf = vec![0u8; eth.buffer_len() + ip_len + l4_len];
    eth.emit(&mut EthernetFrame::new_unchecked(&mut buf[..]));
    match (src, dst) {
        (IpAddr::V4(src), IpAddr::V4(dst)) => Ipv4Repr {
            src_addr: src,
            dst_addr: dst,
            next_header: proto,
            payload_len: l4_len,
            hop_limit: 64,
        }
        .emit(
            &mut Ipv4Packet::new_unchecked(&mut buf[14..]),
            &ChecksumCapabilities::default(),
        ),
        (IpAddr::V6(src), IpAddr::V6(dst)) => Ipv6Repr {
            src_addr: src,
            dst_addr: dst,
            next_header: proto,
            payload_len: l4_len,
            hop_limit: 64,
        }
        .emit(&mut Ipv6Packet::new_unchecked(&mut buf[14..])),
        _ => panic!("{src} and {dst} are of different families"),
    }
    (buf, 14 + ip_len)
}

fn tcp_frame<A: Into<IpAddr>>(
    src: (A, u16),
    dst: (A, u16),
    control: TcpControl,
    payload: &[u8],
) -> Vec<u8> {
    tcp_frame_mss(src, dst, control, payload, None)
}

/// [`tcp_frame`] with an MSS option.
fn tcp_frame_mss<A: Into<IpAddr>>(
    src: (A, u16),
    dst: (A, u16),
    control: TcpControl,
    payload: &[u8],
    max_seg_size: Option<u16>,
) -> Vec<u8> {
    let (src_ip, dst_ip) = (src.0.into(), dst.0.into());
    let tcp = TcpRepr {
        src_port: src.1,
        dst_port: dst.1,
        control,
        seq_number: TcpSeqNumber(1000),
        ack_number: (control != TcpControl::Syn).then_some(TcpSeqNumber(5000)),
        window_len: 64000,
        window_scale: None,
        max_seg_size,
        sack_permitted: false,
        sack_ranges: [None; 3],
        timestamp: None,
        payload,
    };
    let (mut buf, l4) = eth_ip(src_ip, dst_ip, IpProtocol::Tcp, tcp.buffer_len());
    tcp.emit(
        &mut TcpPacket::new_unchecked(&mut buf[l4..]),
        &IpAddress::from(src_ip),
        &IpAddress::from(dst_ip),
        &ChecksumCapabilities::default(),
    );
    buf
}

fn udp_frame<A: Into<IpAddr>>(src: (A, u16), dst: (A, u16), payload: &[u8]) -> Vec<u8> {
    let (src_ip, dst_ip) = (src.0.into(), dst.0.into());
    let udp = UdpRepr {
        src_port: src.1,
        dst_port: dst.1,
    };
    let (mut buf, l4) = eth_ip(
        src_ip,
        dst_ip,
        IpProtocol::Udp,
        udp.header_len() + payload.len(),
    );
    udp.emit(
        &mut UdpPacket::new_unchecked(&mut buf[l4..]),
        &IpAddress::from(src_ip),
        &IpAddress::from(dst_ip),
        payload.len(),
        |b| b.copy_from_slice(payload),
        &ChecksumCapabilities::default(),
    );
    buf
}

fn arp_request(target: Ipv4Addr) -> Vec<u8> {
    let arp = ArpRepr::EthernetIpv4 {
        operation: ArpOperation::Request,
        source_hardware_addr: EthernetAddress(CLIENT_MAC),
        source_protocol_addr: CLIENT,
        target_hardware_addr: EthernetAddress([0; 6]),
        target_protocol_addr: target,
    };
    let eth = EthernetRepr {
        src_addr: EthernetAddress(CLIENT_MAC),
        dst_addr: EthernetAddress::BROADCAST,
        ethertype: EthernetProtocol::Arp,
    };
    let mut buf = vec![0u8; eth.buffer_len() + arp.buffer_len()];
    eth.emit(&mut EthernetFrame::new_unchecked(&mut buf[..]));
    arp.emit(&mut ArpPacket::new_unchecked(&mut buf[14..]));
    buf
}

fn run(lb: &Lb, frame: &[u8]) -> (u32, Vec<u8>) {
    let mut dp = lb.datapath.lock().expect("lock");
    let result = dp
        .test_run(LbProgram::Tc, frame)
        .expect("BPF_PROG_TEST_RUN");
    (result.verdict, result.frame)
}

/// Runs the XDP program of `dp` (loaded with [`AttachPoint::Xdp`]) once on `frame`.
fn run_xdp(dp: &mut LbDatapath, frame: &[u8]) -> (u32, Vec<u8>) {
    let result = dp
        .test_run(LbProgram::Xdp, frame)
        .expect("BPF_PROG_TEST_RUN");
    (result.verdict, result.frame)
}

/// (src, sport, dst, dport) of an IPv4 frame whose IPv4 and L4 checksums must be valid.
fn tuple(frame: &[u8]) -> (Ipv4Addr, u16, Ipv4Addr, u16) {
    match tuple_any(frame) {
        (IpAddr::V4(src), sport, IpAddr::V4(dst), dport) => (src, sport, dst, dport),
        other => panic!("not IPv4: {other:?}"),
    }
}

/// (src, sport, dst, dport) of an IPv4 or IPv6 frame; the IPv4 header checksum, the IPv6
/// payload length and the L4 checksum must be valid.
fn tuple_any(frame: &[u8]) -> (IpAddr, u16, IpAddr, u16) {
    let eth = EthernetFrame::new_checked(frame).expect("ethernet");
    let (src, dst, proto, l4): (IpAddr, IpAddr, IpProtocol, &[u8]) = match eth.ethertype() {
        EthernetProtocol::Ipv4 => {
            let ip = Ipv4Packet::new_checked(eth.payload()).expect("ipv4");
            assert!(ip.verify_checksum(), "IPv4 header checksum");
            (
                ip.src_addr().into(),
                ip.dst_addr().into(),
                ip.next_header(),
                &eth.payload()[usize::from(ip.header_len())..usize::from(ip.total_len())],
            )
        }
        EthernetProtocol::Ipv6 => {
            let ip = Ipv6Packet::new_checked(eth.payload()).expect("ipv6");
            assert_eq!(
                40 + usize::from(ip.payload_len()),
                eth.payload().len(),
                "IPv6 payload length"
            );
            (
                ip.src_addr().into(),
                ip.dst_addr().into(),
                ip.next_header(),
                &eth.payload()[40..],
            )
        }
        other => panic!("unexpected ethertype {other}"),
    };
    let (sa, da) = (IpAddress::from(src), IpAddress::from(dst));
    match proto {
        IpProtocol::Tcp => {
            let tcp = TcpPacket::new_checked(l4).expect("tcp");
            assert!(tcp.verify_checksum(&sa, &da), "TCP checksum");
            (src, tcp.src_port(), dst, tcp.dst_port())
        }
        IpProtocol::Udp => {
            let udp = UdpPacket::new_checked(l4).expect("udp");
            assert!(udp.verify_checksum(&sa, &da), "UDP checksum");
            (src, udp.src_port(), dst, udp.dst_port())
        }
        other => panic!("unexpected protocol {other}"),
    }
}

fn count(lb: &Lb, reason: LbReason) -> u64 {
    lb.datapath
        .lock()
        .expect("lock")
        .counters()
        .expect("counters")
        .get(&reason)
        .map_or(0, |c| c.packets)
}

#[test]
#[cfg_attr(
    not(feature = "privileged"),
    ignore = "privileged: root + BPF; run scripts/test.sh"
)]
fn answers_arp_for_announced_vips_only() {
    let mut lb = lb();
    let (verdict, out) = run(&lb, &arp_request(VIP));
    assert_eq!(verdict, TC_ACT_OK, "not announced yet");
    assert_eq!(out, arp_request(VIP));

    lb.controller
        .apply(service("web", Protocol::Tcp, 80, 8080, &BACKENDS))
        .expect("apply");
    let (verdict, out) = run(&lb, &arp_request(VIP));
    assert_eq!(verdict, TC_ACT_REDIRECT, "sent back out of the device");
    let eth = EthernetFrame::new_checked(&out[..]).expect("frame");
    assert_eq!(eth.dst_addr(), EthernetAddress(CLIENT_MAC));
    assert_eq!(eth.src_addr(), EthernetAddress(LB_MAC));
    let reply = ArpRepr::parse(&ArpPacket::new_checked(eth.payload()).expect("arp")).expect("arp");
    assert_eq!(
        reply,
        ArpRepr::EthernetIpv4 {
            operation: ArpOperation::Reply,
            source_hardware_addr: EthernetAddress(LB_MAC),
            source_protocol_addr: VIP,
            target_hardware_addr: EthernetAddress(CLIENT_MAC),
            target_protocol_addr: CLIENT,
        }
    );
    assert_eq!(count(&lb, LbReason::ArpReply), 1);

    let (verdict, _) = run(&lb, &arp_request(Ipv4Addr::new(10, 99, 100, 11)));
    assert_eq!(
        verdict, TC_ACT_OK,
        "another address: the host stack's business"
    );
    lb.controller.delete("default", "web").expect("delete");
    let (verdict, _) = run(&lb, &arp_request(VIP));
    assert_eq!(verdict, TC_ACT_OK, "withdrawn with its service");
}

/// One address family's fixture: the translation and policy checks run over IPv4 and IPv6 alike.
struct Family {
    client: IpAddr,
    /// A client outside `source_range`.
    other_client: IpAddr,
    lb_ip: IpAddr,
    vip: IpAddr,
    backends: Vec<IpAddr>,
    /// Seven more backends, for the ring-change check.
    more: Vec<IpAddr>,
    /// A source range that holds `client`.
    source_range: &'static str,
    /// Ethernet and IP header bytes before the L4 header.
    l4_offset: usize,
}

fn v4() -> Family {
    Family {
        client: CLIENT.into(),
        other_client: OTHER_CLIENT.into(),
        lb_ip: LB_IP.into(),
        vip: VIP.into(),
        backends: BACKENDS.iter().map(|&b| b.into()).collect(),
        more: (6..=12)
            .map(|i| Ipv4Addr::new(10, 99, 0, i).into())
            .collect(),
        source_range: "10.99.0.0/29",
        l4_offset: 34,
    }
}

fn v6() -> Family {
    Family {
        client: CLIENT6.into(),
        other_client: OTHER_CLIENT6.into(),
        lb_ip: LB_IP6.into(),
        vip: VIP6.into(),
        backends: BACKENDS6.iter().map(|&b| b.into()).collect(),
        more: (6..=12)
            .map(|i| Ipv6Addr::new(0xfd99, 0, 0, 0, 0, 0, 0, i).into())
            .collect(),
        source_range: "fd99::/64",
        l4_offset: 54,
    }
}

/// Client -> VIP becomes LB -> backend and the backend's answer VIP -> client, with valid
/// checksums and the payload untouched; more backends change the ring, not an established
/// flow; new flows spread over every backend. Makes 406 forwards and one reply.
fn check_translation(lb: &mut Lb, f: &Family, name: &str) {
    lb.controller
        .apply(service(name, Protocol::Tcp, 80, 8080, &f.backends))
        .expect("apply");
    let syn = tcp_frame((f.client, 40001), (f.vip, 80), TcpControl::Syn, b"");
    let (verdict, out) = run(lb, &syn);
    assert_eq!(verdict, TC_ACT_REDIRECT);
    let (src, sport, backend, dport) = tuple_any(&out);
    assert_eq!(
        (src, dport),
        (f.lb_ip, 8080),
        "SNAT to the LB, DNAT to the target port"
    );
    assert!(f.backends.contains(&backend), "{backend}");
    let payload = f.l4_offset + 20;
    assert_eq!(&out[payload..], &syn[payload..], "payload untouched");

    let synack = tcp_frame((backend, 8080), (f.lb_ip, sport), TcpControl::Syn, b"");
    let (verdict, back) = run(lb, &synack);
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_eq!(tuple_any(&back), (f.vip, 80, f.client, 40001));

    let more: Vec<IpAddr> = f.backends.iter().chain(&f.more).copied().collect();
    lb.controller
        .apply(service(name, Protocol::Tcp, 80, 8080, &more))
        .expect("apply more");
    for _ in 0..5 {
        let data = tcp_frame(
            (f.client, 40001),
            (f.vip, 80),
            TcpControl::Psh,
            b"GET / HTTP/1.1\r\n\r\n",
        );
        let (verdict, out) = run(lb, &data);
        assert_eq!(verdict, TC_ACT_REDIRECT);
        assert_eq!(tuple_any(&out), (f.lb_ip, sport, backend, 8080));
    }
    let mut seen = BTreeSet::new();
    for port in 0..400u16 {
        let (_, out) = run(
            lb,
            &tcp_frame((f.client, 20000 + port), (f.vip, 80), TcpControl::Syn, b""),
        );
        seen.insert(tuple_any(&out).2);
    }
    assert_eq!(seen.len(), more.len(), "{seen:?}");
}

/// UDP with externalTrafficPolicy Local (the backend sees the client's address, its answer goes
/// back from the VIP), a client outside the source ranges dropped, a port the VIP does not
/// serve dropped, and traffic for the LB's own address untouched.
fn check_udp_local_policy_and_source_ranges(lb: &mut Lb, f: &Family) {
    let mut dns = service("dns", Protocol::Udp, 53, 5353, &f.backends[..1]);
    dns.external_traffic_policy = TrafficPolicy::Local;
    dns.backends[0].node_local = true;
    dns.load_balancer_source_ranges = vec![f.source_range.into()];
    lb.controller.apply(dns).expect("apply");

    let query = udp_frame((f.client, 33333), (f.vip, 53), b"query");
    let (verdict, out) = run(lb, &query);
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_eq!(
        tuple_any(&out),
        (f.client, 33333, f.backends[0], 5353),
        "eTP Local: the backend sees the client's address"
    );
    let answer = udp_frame((f.backends[0], 5353), (f.client, 33333), b"answer");
    let (verdict, back) = run(lb, &answer);
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_eq!(tuple_any(&back), (f.vip, 53, f.client, 33333));

    let outsider = udp_frame((f.other_client, 33333), (f.vip, 53), b"query");
    let (verdict, _) = run(lb, &outsider);
    assert_eq!(
        verdict, TC_ACT_SHOT,
        "{} is outside {}",
        f.other_client, f.source_range
    );
    assert_eq!(count(lb, LbReason::DropSourceRange), 1);

    let (verdict, _) = run(lb, &udp_frame((f.client, 1), (f.vip, 54), b"x"));
    assert_eq!(verdict, TC_ACT_SHOT, "the VIP serves no port 54");
    assert_eq!(count(lb, LbReason::DropNoService), 1);

    let elsewhere = tcp_frame((f.client, 1), (f.lb_ip, 22), TcpControl::Syn, b"");
    let (verdict, out) = run(lb, &elsewhere);
    assert_eq!(
        (verdict, out),
        (TC_ACT_OK, elsewhere),
        "not for a VIP: untouched"
    );
}

#[test]
#[cfg_attr(
    not(feature = "privileged"),
    ignore = "privileged: root + BPF; run scripts/test.sh"
)]
fn translates_both_ways_with_valid_checksums_and_sticks_to_the_backend() {
    let mut lb = lb();
    check_translation(&mut lb, &v4(), "web");
    assert_eq!(count(&lb, LbReason::Forward), 1 + 5 + 400);
    assert_eq!(count(&lb, LbReason::Reply), 1);
}

#[test]
#[cfg_attr(
    not(feature = "privileged"),
    ignore = "privileged: root + BPF; run scripts/test.sh"
)]
fn udp_local_policy_source_ranges_and_unknown_ports() {
    let mut lb = lb();
    check_udp_local_policy_and_source_ranges(&mut lb, &v4());
}

#[test]
#[cfg_attr(
    not(feature = "privileged"),
    ignore = "privileged: root + BPF; run scripts/test.sh"
)]
fn a_service_without_backends_drops() {
    let mut lb = lb();
    lb.controller
        .apply(service("empty", Protocol::Tcp, 80, 80, &BACKENDS[..0]))
        .expect("apply");
    let (verdict, _) = run(
        &lb,
        &tcp_frame((CLIENT, 1234), (VIP, 80), TcpControl::Syn, b""),
    );
    assert_eq!(verdict, TC_ACT_SHOT);
    assert_eq!(count(&lb, LbReason::DropNoBackend), 1);
}

/// The inner frame of an IP-in-IP frame (its Ethernet header, then the inner IPv4 packet) and
/// the outer header's (source, destination); the outer checksum and length must be right.
fn decapsulate(frame: &[u8]) -> (Vec<u8>, Ipv4Addr, Ipv4Addr) {
    let eth = EthernetFrame::new_checked(frame).expect("ethernet");
    assert_eq!(eth.ethertype(), EthernetProtocol::Ipv4);
    let outer = Ipv4Packet::new_checked(eth.payload()).expect("outer ipv4");
    assert!(outer.verify_checksum(), "outer IPv4 header checksum");
    assert_eq!(u8::from(outer.next_header()), 4, "IP-in-IP");
    assert_eq!(usize::from(outer.total_len()), eth.payload().len());
    let mut inner = frame[..14].to_vec();
    inner.extend_from_slice(outer.payload());
    (inner, outer.src_addr(), outer.dst_addr())
}

/// Direct server return: a client's SYN to a DSR service leaves inside an IPv4 header from the
/// LB's address to the backend Maglev picked (IP-in-IP) with the client's tuple untouched and
/// its MSS lowered to fit the header on the device; the flow's next segment goes to the same
/// backend; a SYN already small enough keeps its MSS; nothing is translated.
#[test]
#[cfg_attr(
    not(feature = "privileged"),
    ignore = "privileged: root + BPF; run scripts/test.sh"
)]
fn direct_server_return_encapsulates_to_the_backend_and_lowers_the_mss() {
    let mut lb = lb();
    let mut spec = service("dsr", Protocol::Tcp, 80, 30080, &BACKENDS);
    spec.direct_server_return = true;
    lb.controller.apply(spec).expect("apply");
    // The test run's device is the loopback (the config's ifindex 1).
    let mtu: u32 = std::fs::read_to_string("/sys/class/net/lo/mtu")
        .expect("lo mtu")
        .trim()
        .parse()
        .expect("a number");
    // Less the outer and inner IPv4 headers and the TCP header.
    let clamped = u16::try_from(mtu - 60).expect("an MSS");

    let syn = tcp_frame_mss(
        (CLIENT, 40000),
        (VIP, 80),
        TcpControl::Syn,
        b"",
        Some(65535),
    );
    let (verdict, out) = run(&lb, &syn);
    assert_eq!(verdict, TC_ACT_REDIRECT);
    let (inner, from, to) = decapsulate(&out);
    assert_eq!(from, LB_IP, "from the LB's address");
    assert!(BACKENDS.contains(&to), "to a backend: {to}");
    assert_eq!(tuple(&inner), (CLIENT, 40000, VIP, 80), "untranslated");
    let ip = Ipv4Packet::new_checked(&inner[14..]).expect("inner");
    let tcp = TcpPacket::new_checked(ip.payload()).expect("tcp");
    let repr = TcpRepr::parse(
        &tcp,
        &IpAddress::from(CLIENT),
        &IpAddress::from(VIP),
        &ChecksumCapabilities::default(),
    )
    .expect("tcp repr");
    assert_eq!(
        repr.max_seg_size,
        Some(clamped),
        "MSS lowered by the header"
    );

    let ack = tcp_frame((CLIENT, 40000), (VIP, 80), TcpControl::None, b"GET /");
    let (verdict, out) = run(&lb, &ack);
    assert_eq!(verdict, TC_ACT_REDIRECT);
    let (inner, _, again) = decapsulate(&out);
    assert_eq!(again, to, "the flow keeps its backend");
    assert_eq!(inner, ack, "the inner packet is the client's");

    let small = tcp_frame_mss((CLIENT, 40001), (VIP, 80), TcpControl::Syn, b"", Some(1400));
    let (_, out) = run(&lb, &small);
    let (inner, _, _) = decapsulate(&out);
    assert_eq!(inner, small, "an MSS that fits is left alone");
    assert_eq!(count(&lb, LbReason::Encap), 3);
    assert_eq!(count(&lb, LbReason::Forward), 0);
}

/// A SYN on a tracked tuple whose backend left the ring (drained: weight 0) is placed afresh,
/// while the tuple's other segments stay with the drained backend until the flow ends.
#[test]
#[cfg_attr(
    not(feature = "privileged"),
    ignore = "privileged: root + BPF; run scripts/test.sh"
)]
fn a_syn_reusing_a_drained_backends_tuple_is_placed_afresh() {
    let mut lb = lb();
    let spec = service("web", Protocol::Tcp, 80, 8080, &BACKENDS);
    lb.controller.apply(spec.clone()).expect("apply");
    let syn = tcp_frame((CLIENT, 40000), (VIP, 80), TcpControl::Syn, b"");
    let (_, out) = run(&lb, &syn);
    let first = tuple(&out).2;
    let mut drained = spec;
    for b in &mut drained.backends {
        if b.ip == IpAddr::V4(first) {
            b.weight = 0;
        }
    }
    lb.controller.apply(drained).expect("drain");
    let ack = tcp_frame((CLIENT, 40000), (VIP, 80), TcpControl::None, b"x");
    let (_, out) = run(&lb, &ack);
    assert_eq!(
        tuple(&out).2,
        first,
        "the flow stays on its draining backend"
    );
    let (_, out) = run(&lb, &syn);
    let again = tuple(&out).2;
    assert_ne!(again, first, "a new SYN goes to a backend in the ring");
    assert!(BACKENDS.contains(&again));
}

/// Removes a bpffs directory on drop.
struct PinDir(std::path::PathBuf);

impl Drop for PinDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
#[cfg_attr(
    not(feature = "privileged"),
    ignore = "privileged: root + BPF; run scripts/test.sh"
)]
fn the_xdp_variant_passes_the_verifier_and_shares_the_maps() {
    assert!(LbDatapath::load(AttachPoint::Xdp(XdpMode::Skb), None, &small()).is_err());
    let pins = PinDir(std::path::PathBuf::from(format!(
        "/sys/fs/bpf/slipway-lb-xdp-test-{}",
        std::process::id()
    )));
    let mut dp = LbDatapath::load(AttachPoint::Xdp(XdpMode::Skb), Some(&pins.0), &small())
        .expect("load lb and lb_xdp");
    assert!(dp.xdp().is_ok() && dp.classifier().is_ok());
    dp.add_vip(VIP.into()).expect("vip");
    dp.set_config(ConfigValue {
        snat_ip4: LB_IP.into(),
        snat_ip6: LB_IP6.into(),
        ifindex: 1,
        mac: LB_MAC,
        pad: [0; 2],
    })
    .expect("config");
    dp.add_vip(VIP6.into()).expect("vip6");
    // The XDP program answers Neighbor Solicitations too, resizing the frame with
    // bpf_xdp_adjust_tail() where it must.
    for lladdr in [Some(CLIENT_MAC), None] {
        let (verdict, out) = run_xdp(&mut dp, &neighbor_solicitation(CLIENT6, VIP6, lladdr));
        assert_eq!(verdict, XDP_TX, "{lladdr:?}");
        assert_advertisement(&out, CLIENT_MAC, CLIENT6, true);
    }
    drop(dp);
    assert!(
        pins.0.join("lb_vips").exists(),
        "the maps are pinned for both programs"
    );
}

// ---- IPv6: Neighbor Discovery and the IPv6 forward path ----------------------------------

/// `target`'s solicited-node multicast address, ff02::1:ffXX:XXXX (RFC 4291 2.7.1).
fn solicited_node(target: Ipv6Addr) -> Ipv6Addr {
    let t = target.octets();
    Ipv6Addr::from([
        0xff, 0x02, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0xff, t[13], t[14], t[15],
    ])
}

/// An Ethernet + IPv6 frame carrying ICMPv6 message `repr` from `src` to `dst`.
fn icmpv6_frame(
    eth_dst: [u8; 6],
    src: Ipv6Addr,
    dst: Ipv6Addr,
    hop_limit: u8,
    repr: &Icmpv6Repr,
) -> Vec<u8> {
    let eth = EthernetRepr {
        src_addr: EthernetAddress(CLIENT_MAC),
        dst_addr: EthernetAddress(eth_dst),
        ethertype: EthernetProtocol::Ipv6,
    };
    let ip = Ipv6Repr {
        src_addr: src,
        dst_addr: dst,
        next_header: IpProtocol::Icmpv6,
        payload_len: repr.buffer_len(),
        hop_limit,
    };
    let mut buf = vec![0u8; 14 + 40 + repr.buffer_len()];
    eth.emit(&mut EthernetFrame::new_unchecked(&mut buf[..]));
    ip.emit(&mut Ipv6Packet::new_unchecked(&mut buf[14..]));
    repr.emit(
        &src,
        &dst,
        &mut Icmpv6Packet::new_unchecked(&mut buf[54..]),
        &ChecksumCapabilities::default(),
    );
    buf
}

/// A Neighbor Solicitation for `target` from `src` to the solicited-node address, with a
/// source link-layer address option when `lladdr` is given (RFC 4861 4.3).
fn neighbor_solicitation(src: Ipv6Addr, target: Ipv6Addr, lladdr: Option<[u8; 6]>) -> Vec<u8> {
    let dst = solicited_node(target);
    let o = dst.octets();
    icmpv6_frame(
        [0x33, 0x33, o[12], o[13], o[14], o[15]],
        src,
        dst,
        255,
        &Icmpv6Repr::Ndisc(NdiscRepr::NeighborSolicit {
            target_addr: target,
            lladdr: lladdr.map(|mac| EthernetAddress(mac).into()),
        }),
    )
}

/// Asserts that `frame` is, byte for byte, the Neighbor Advertisement of VIP6 to `to` at
/// `to_mac` that RFC 4861 asks for (built independently with smoltcp), that its ICMPv6
/// checksum verifies, and that it parses back to the expected advertisement.
fn assert_advertisement(frame: &[u8], to_mac: [u8; 6], to: Ipv6Addr, solicited: bool) {
    let flags = if solicited {
        NdiscNeighborFlags::SOLICITED | NdiscNeighborFlags::OVERRIDE
    } else {
        NdiscNeighborFlags::OVERRIDE
    };
    let na = Icmpv6Repr::Ndisc(NdiscRepr::NeighborAdvert {
        flags,
        target_addr: VIP6,
        lladdr: Some(EthernetAddress(LB_MAC).into()),
    });
    let mut expected = icmpv6_frame(to_mac, VIP6, to, 255, &na);
    expected[6..12].copy_from_slice(&LB_MAC);
    assert_eq!(frame.len(), 86, "Ethernet + IPv6 + NA with its option");
    assert_eq!(frame, &expected[..], "the advertisement, byte for byte");

    let eth = EthernetFrame::new_checked(frame).expect("ethernet");
    let ip = Ipv6Packet::new_checked(eth.payload()).expect("ipv6");
    assert_eq!(ip.hop_limit(), 255, "RFC 4861 7.1.2");
    let icmp = Icmpv6Packet::new_checked(ip.payload()).expect("icmpv6");
    assert!(icmp.verify_checksum(&VIP6, &to), "ICMPv6 checksum");
    let repr = Icmpv6Repr::parse(&VIP6, &to, &icmp, &ChecksumCapabilities::default())
        .expect("a valid ICMPv6 message");
    assert_eq!(repr, na);
}

#[test]
#[cfg_attr(
    not(feature = "privileged"),
    ignore = "privileged: root + BPF; run scripts/test.sh"
)]
fn answers_neighbor_solicitations_for_announced_ipv6_vips_only() {
    let mut lb = lb();
    let slla_mac = [0x02, 0xc1, 0, 0, 0, 0x77];
    let ns = neighbor_solicitation(CLIENT6, VIP6, Some(slla_mac));
    let (verdict, out) = run(&lb, &ns);
    assert_eq!((verdict, &out), (TC_ACT_OK, &ns), "not announced yet");

    lb.controller
        .apply(service("web6", Protocol::Tcp, 80, 8080, &BACKENDS6))
        .expect("apply");

    // The usual solicitation (Linux always sends the option): answered to the MAC of the
    // source link-layer address option, Solicited and Override set.
    let (verdict, out) = run(&lb, &ns);
    assert_eq!(verdict, TC_ACT_REDIRECT, "sent back out of the device");
    assert_advertisement(&out, slla_mac, CLIENT6, true);

    // No option (a unicast reachability probe may omit it): the frame grows to the NA and
    // goes to the frame's source MAC.
    let mut probe = neighbor_solicitation(CLIENT6, VIP6, None);
    probe[0..6].copy_from_slice(&LB_MAC);
    assert_eq!(probe.len(), 78);
    let (verdict, out) = run(&lb, &probe);
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_advertisement(&out, CLIENT_MAC, CLIENT6, true);

    // Options beyond the first (here a nonce, RFC 3971 5.3.2): the frame is cut to the NA.
    let mut long = neighbor_solicitation(CLIENT6, VIP6, Some(CLIENT_MAC));
    long.extend_from_slice(&[14, 1, 1, 2, 3, 4, 5, 6]);
    long[18..20].copy_from_slice(&40u16.to_be_bytes());
    let (verdict, out) = run(&lb, &long);
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_advertisement(&out, CLIENT_MAC, CLIENT6, true);

    // Duplicate address detection for the VIP (unspecified source): defended with an
    // advertisement to all-nodes, Solicited clear (RFC 4861 7.2.4).
    let dad = neighbor_solicitation(Ipv6Addr::UNSPECIFIED, VIP6, None);
    let (verdict, out) = run(&lb, &dad);
    assert_eq!(verdict, TC_ACT_REDIRECT);
    let all_nodes: Ipv6Addr = "ff02::1".parse().expect("all-nodes");
    assert_advertisement(&out, [0x33, 0x33, 0, 0, 0, 1], all_nodes, false);
    assert_eq!(count(&lb, LbReason::NdpReply), 4);

    // Not for the LB: another address, an invalid hop limit (RFC 4861 7.1.1), an IPv4-mapped
    // target. The host stack gets them untouched.
    let other = neighbor_solicitation(CLIENT6, "fd99:100::11".parse().expect("ip"), None);
    let mut routed = ns.clone();
    routed[21] = 64;
    let mapped = neighbor_solicitation(CLIENT6, VIP.to_ipv6_mapped(), None);
    for frame in [other, routed, mapped] {
        let (verdict, out) = run(&lb, &frame);
        assert_eq!((verdict, out), (TC_ACT_OK, frame));
    }
    assert_eq!(count(&lb, LbReason::NdpReply), 4);

    lb.controller.delete("default", "web6").expect("delete");
    let (verdict, _) = run(&lb, &ns);
    assert_eq!(verdict, TC_ACT_OK, "withdrawn with its service");
}

#[test]
#[cfg_attr(
    not(feature = "privileged"),
    ignore = "privileged: root + BPF; run scripts/test.sh"
)]
fn translates_ipv6_both_ways_with_valid_checksums_beside_ipv4() {
    let mut lb = lb();
    lb.controller
        .apply(service("web4", Protocol::Tcp, 80, 8080, &BACKENDS))
        .expect("apply v4");
    check_translation(&mut lb, &v6(), "web6");

    // The IPv4 service on the same port keeps working beside it (IPv4-mapped keys never
    // meet IPv6 ones).
    let (verdict, out) = run(
        &lb,
        &tcp_frame((CLIENT, 40001), (VIP, 80), TcpControl::Syn, b""),
    );
    assert_eq!(verdict, TC_ACT_REDIRECT);
    let (src4, _, backend4, _) = tuple(&out);
    assert_eq!(src4, LB_IP);
    assert!(BACKENDS.contains(&backend4));
    assert_eq!(count(&lb, LbReason::Forward), 1 + 5 + 400 + 1);
    assert_eq!(count(&lb, LbReason::Reply), 1);
}

#[test]
#[cfg_attr(
    not(feature = "privileged"),
    ignore = "privileged: root + BPF; run scripts/test.sh"
)]
fn ipv6_udp_local_policy_source_ranges_and_extension_headers() {
    let mut lb = lb();
    check_udp_local_policy_and_source_ranges(&mut lb, &v6());

    // A fragment header to the VIP: its ports are not where the LB looks.
    let (mut fragment, l4) = eth_ip(CLIENT6.into(), VIP6.into(), IpProtocol::Ipv6Frag, 16);
    fragment[l4] = 17; // next header UDP
    let (verdict, _) = run(&lb, &fragment);
    assert_eq!(verdict, TC_ACT_SHOT);
    assert_eq!(count(&lb, LbReason::DropMalformed), 1);

    // An IPv6 service without an IPv6 SNAT address drops its Cluster flows.
    lb.datapath
        .lock()
        .expect("lock")
        .set_config(ConfigValue {
            snat_ip4: LB_IP.into(),
            snat_ip6: LbAddr::NONE,
            ifindex: 1,
            mac: LB_MAC,
            pad: [0; 2],
        })
        .expect("config");
    lb.controller
        .apply(service("web6", Protocol::Tcp, 80, 8080, &BACKENDS6))
        .expect("apply");
    let (verdict, _) = run(
        &lb,
        &tcp_frame((CLIENT6, 40001), (VIP6, 80), TcpControl::Syn, b""),
    );
    assert_eq!(verdict, TC_ACT_SHOT);
    assert_eq!(count(&lb, LbReason::DropNoPort), 1);
}

#[test]
#[cfg_attr(
    not(feature = "privileged"),
    ignore = "privileged: root + BPF; run scripts/test.sh"
)]
fn a_pinned_map_of_another_layout_is_refused() {
    let pins = PinDir(std::path::PathBuf::from(format!(
        "/sys/fs/bpf/slipway-lb-stale-test-{}",
        std::process::id()
    )));
    std::fs::create_dir_all(&pins.0).expect("pin dir");
    // lb_vips as the IPv4-only LB pinned it: 4-byte keys.
    let stale = pins.0.join("lb_vips");
    let status = std::process::Command::new("bpftool")
        .args(["map", "create"])
        .arg(&stale)
        .args([
            "type", "hash", "key", "4", "value", "4", "entries", "1024", "name", "lb_vips",
        ])
        .status()
        .expect("bpftool");
    assert!(status.success(), "bpftool map create");
    let err = LbDatapath::load(AttachPoint::Tc, Some(&pins.0), &small()).expect_err("stale pin");
    let text = err.to_string();
    assert!(
        text.contains("lb_vips") && text.contains("(4, 4)") && text.contains("(16, 4)"),
        "{text}"
    );
    std::fs::remove_file(&stale).expect("unpin");
    LbDatapath::load(AttachPoint::Tc, Some(&pins.0), &small())
        .expect("a fresh pin directory loads");
    LbDatapath::load(AttachPoint::Tc, Some(&pins.0), &small())
        .expect("and its own pins are reused");
    let bigger = MapSizes {
        flows: small().flows * 2,
        ..small()
    };
    let err = LbDatapath::load(AttachPoint::Tc, Some(&pins.0), &bigger).expect_err("resized");
    let text = err.to_string();
    assert!(
        text.contains(&format!("has {} entries", small().flows))
            && text.contains(&format!("needs {}", bigger.flows)),
        "a pinned map of another size is refused: {text}"
    );
}

#[test]
#[cfg_attr(
    not(feature = "privileged"),
    ignore = "privileged: root + BPF; run scripts/test.sh"
)]
fn services_sharing_a_backend_count_apart_and_a_new_service_starts_at_zero() {
    let mut lb = lb();
    let mut a = service("a", Protocol::Tcp, 80, 8080, &BACKENDS[..1]);
    a.load_balancer_ip = None;
    let mut b = service("b", Protocol::Tcp, 81, 8080, &BACKENDS[..1]);
    b.load_balancer_ip = None;
    let vip_a = lb.controller.apply(a).expect("a").vip;
    let vip_b = lb.controller.apply(b).expect("b").vip;
    let sent = 5u64;
    for i in 0..sent {
        let sport = 40000 + u16::try_from(i).expect("port");
        let (verdict, out) = run(
            &lb,
            &tcp_frame((CLIENT, sport), (ip4(vip_a), 80), TcpControl::Syn, &[]),
        );
        assert_eq!(verdict, TC_ACT_REDIRECT);
        assert_eq!(tuple(&out).2, BACKENDS[0]);
    }
    let backend_of = |lb: &Lb, name: &str| {
        let status = lb.controller.status(0).expect("status");
        let s = status
            .services
            .into_iter()
            .find(|s| s.name == name)
            .unwrap_or_else(|| panic!("{name} not in status"));
        (
            s.ports[0].flows_total,
            s.backends[0].flows_total,
            s.backends[0].packets,
        )
    };
    assert_eq!(
        backend_of(&lb, "default/a"),
        (sent, sent, sent),
        "a counts its flows"
    );
    assert_eq!(
        backend_of(&lb, "default/b"),
        (0, 0, 0),
        "b shares a's backend address and port but none of its traffic"
    );

    // b goes; c takes its service id (the lowest free) and a backend id of its own: it starts
    // at zero although b's counters were written.
    let (verdict, _) = run(
        &lb,
        &tcp_frame((CLIENT, 50000), (ip4(vip_b), 81), TcpControl::Syn, &[]),
    );
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_eq!(backend_of(&lb, "default/b").0, 1);
    lb.controller.delete("default", "b").expect("delete b");
    let mut c = service("c", Protocol::Tcp, 82, 8080, &BACKENDS[..1]);
    c.load_balancer_ip = None;
    lb.controller.apply(c).expect("c");
    assert_eq!(
        backend_of(&lb, "default/c"),
        (0, 0, 0),
        "a new service starts at zero"
    );
    assert_eq!(backend_of(&lb, "default/a"), (sent, sent, sent));
}

fn ip4(ip: IpAddr) -> Ipv4Addr {
    match ip {
        IpAddr::V4(ip) => ip,
        IpAddr::V6(ip) => panic!("{ip} is not IPv4"),
    }
}

#[test]
#[cfg_attr(
    not(feature = "privileged"),
    ignore = "privileged: root + BPF; run scripts/test.sh"
)]
fn map_memory_follows_the_flow_capacity() {
    let usage = |flows: u32| {
        let dp =
            LbDatapath::load(AttachPoint::Tc, None, &MapSizes { flows, ..small() }).expect("load");
        let usage = dp.map_usage().expect("usage");
        let map = |name: &str| {
            usage
                .iter()
                .find(|m| m.name == name)
                .unwrap_or_else(|| panic!("{name} not reported"))
                .clone()
        };
        let maps = [map("lb_flows"), map("lb_reverse"), map("lb_affinity")];
        for m in &maps {
            assert_eq!(m.max_entries, flows, "{m:?}");
        }
        maps.iter().map(|m| m.bytes).sum::<u64>()
    };
    let (at_100k, at_200k) = (usage(100_000), usage(200_000));
    let per_100k = at_200k - at_100k;
    // At least the keys and values themselves.
    use slipway_dataplane::abi::lb::{LbAffinity, LbAffinityKey, LbFlow, LbFlowKey, LbReverse};
    let floor = 100_000
        * (2 * size_of::<LbFlowKey>()
            + size_of::<LbFlow>()
            + size_of::<LbReverse>()
            + size_of::<LbAffinityKey>()
            + size_of::<LbAffinity>()) as u64;
    assert!(per_100k >= floor, "{per_100k} bytes < {floor}");
    eprintln!(
        "map memory per 100k tracked flows: {per_100k} bytes (lb_flows + lb_reverse + \
         lb_affinity; {at_100k} bytes at 100k)"
    );
}

#[test]
#[cfg_attr(
    not(feature = "privileged"),
    ignore = "privileged: root + BPF; run scripts/test.sh"
)]
fn a_flow_evicted_from_a_full_table_is_counted_and_placed_again() {
    let sizes = MapSizes {
        flows: 1024,
        ..small()
    };
    let mut lb = lb_sized(&sizes);
    lb.controller
        .apply(service("web", Protocol::Tcp, 80, 8080, &BACKENDS))
        .expect("apply");
    let (verdict, out) = run(
        &lb,
        &tcp_frame((CLIENT, 1025), (VIP, 80), TcpControl::Syn, &[]),
    );
    assert_eq!(verdict, TC_ACT_REDIRECT);
    let backend = tuple(&out).2;
    let flows_of = |lb: &mut Lb| lb.controller.maps().flows().expect("flows");
    let first = flows_of(&mut lb)[0].0;
    // Four times the table in new flows from other ports: the first one is evicted.
    let mut sport = 2000u16;
    while flows_of(&mut lb).iter().any(|(k, _)| *k == first) {
        for _ in 0..sizes.flows {
            let (verdict, _) = run(
                &lb,
                &tcp_frame((CLIENT, sport), (VIP, 80), TcpControl::Syn, &[]),
            );
            assert_eq!(verdict, TC_ACT_REDIRECT);
            sport += 1;
        }
        assert!(sport < 2000 + 4 * sizes.flows as u16, "never evicted");
    }
    assert_eq!(count(&lb, LbReason::FlowUntracked), 0);
    let (verdict, out) = run(
        &lb,
        &tcp_frame((CLIENT, 1025), (VIP, 80), TcpControl::None, b"x"),
    );
    assert_eq!(verdict, TC_ACT_REDIRECT, "placed again, not dropped");
    assert_eq!(
        tuple(&out).2,
        backend,
        "Maglev places it on the same backend"
    );
    assert_eq!(count(&lb, LbReason::FlowUntracked), 1, "and counted");
}

/// The backends new connections from `client` on `ports` land on, in order.
fn placements(lb: &Lb, client: Ipv4Addr, ports: std::ops::Range<u16>) -> Vec<Ipv4Addr> {
    ports
        .map(|sport| {
            let (verdict, out) = run(
                lb,
                &tcp_frame((client, sport), (VIP, 80), TcpControl::Syn, &[]),
            );
            assert_eq!(verdict, TC_ACT_REDIRECT);
            tuple(&out).2
        })
        .collect()
}

#[test]
#[cfg_attr(
    not(feature = "privileged"),
    ignore = "privileged: root + BPF; run scripts/test.sh"
)]
fn client_ip_affinity_keeps_a_client_on_its_backend_until_it_leaves_or_the_timeout() {
    use slipway_lb::config::{ClientIpConfig, SessionAffinity, SessionAffinityConfig};
    let mut lb = lb();
    let mut web = service("web", Protocol::Tcp, 80, 8080, &BACKENDS);
    lb.controller.apply(web.clone()).expect("apply");
    let spread: BTreeSet<Ipv4Addr> = placements(&lb, CLIENT, 40000..40030).into_iter().collect();
    assert!(
        spread.len() > 1,
        "without affinity one client's connections spread"
    );

    let timeout = 1;
    web.session_affinity = SessionAffinity::ClientIp;
    web.session_affinity_config = Some(SessionAffinityConfig {
        client_ip: Some(ClientIpConfig {
            timeout_seconds: Some(timeout),
        }),
    });
    lb.controller.apply(web.clone()).expect("affinity");
    let same: BTreeSet<Ipv4Addr> = placements(&lb, CLIENT, 41000..41030).into_iter().collect();
    assert_eq!(
        same.len(),
        1,
        "with ClientIP every connection goes to one backend: {same:?}"
    );
    let pinned = *same.first().expect("one");
    let other: BTreeSet<Ipv4Addr> = placements(&lb, OTHER_CLIENT, 41000..41030)
        .into_iter()
        .collect();
    assert_eq!(other.len(), 1, "another client has its own: {other:?}");

    // The backend leaves the service: the client moves to another one and stays there.
    web.backends.retain(|b| b.ip != IpAddr::V4(pinned));
    lb.controller
        .apply(web.clone())
        .expect("remove the pinned backend");
    let moved: BTreeSet<Ipv4Addr> = placements(&lb, CLIENT, 42000..42030).into_iter().collect();
    assert_eq!(moved.len(), 1, "{moved:?}");
    let removed = pinned;
    let pinned = *moved.first().expect("one");
    assert_ne!(pinned, removed, "not to the backend that left");

    // Past the timeout without a new connection, Maglev places the client again: some new
    // connection lands elsewhere (each one does with probability 1/2 over two backends).
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let mut sport = 43000;
    loop {
        // The timeout runs from the last new connection: let it pass.
        std::thread::sleep(Duration::from_millis(u64::from(timeout) * 1000 + 200));
        let placed = placements(&lb, CLIENT, sport..sport + 1)[0];
        sport += 1;
        if placed != pinned {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the client never left {pinned} after the timeout"
        );
    }
}
