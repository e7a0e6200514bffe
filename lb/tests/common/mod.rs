//! Fixtures of the LB program's test-run suites: a loaded datapath with its controller, frames
//! built with smoltcp, the test run itself, and the checks run over IPv4 and IPv6 alike.
#![allow(
    dead_code,
    unused_imports,
    reason = "each test file uses its own share of the fixtures"
)]

pub use std::collections::BTreeSet;
pub use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
pub use std::sync::{Arc, Mutex};
pub use std::time::Duration;

pub use slipway_dataplane::abi::lb::{LbAddr, LbConfig as ConfigValue, LbReason};
pub use slipway_lb::announce::{Announcer, StaticLease};
pub use slipway_lb::config::{
    BackendSpec, LbConfig, MapSizes, PoolConfig, Protocol, ServicePort, ServiceSpec, TrafficPolicy,
};
pub use slipway_lb::controller::Controller;
pub use slipway_lb::datapath::{AttachPoint, LbDatapath, LbProgram, XdpMode};
pub use slipway_lb::pool::Pools;
pub use smoltcp::phy::ChecksumCapabilities;
pub use smoltcp::wire::{
    ArpOperation, ArpPacket, ArpRepr, EthernetAddress, EthernetFrame, EthernetProtocol,
    EthernetRepr, Icmpv6Packet, Icmpv6Repr, IpAddress, IpProtocol, Ipv4Packet, Ipv4Repr,
    Ipv6Packet, Ipv6Repr, NdiscNeighborFlags, NdiscRepr, TcpControl, TcpPacket, TcpRepr,
    TcpSeqNumber, UdpPacket, UdpRepr,
};

// linux/pkt_cls.h
pub const TC_ACT_OK: u32 = 0;
pub const TC_ACT_SHOT: u32 = 2;
pub const TC_ACT_REDIRECT: u32 = 7;
// linux/bpf.h, enum xdp_action
pub const XDP_TX: u32 = 3;

pub const LB_MAC: [u8; 6] = [0x02, 0x1b, 0, 0, 0, 0x02];
pub const CLIENT_MAC: [u8; 6] = [0x02, 0xc1, 0, 0, 0, 0x01];
pub const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 1);
pub const OTHER_CLIENT: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 9);
pub const LB_IP: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 2);
pub const VIP: Ipv4Addr = Ipv4Addr::new(10, 99, 100, 10);
pub const BACKENDS: [Ipv4Addr; 3] = [
    Ipv4Addr::new(10, 99, 0, 3),
    Ipv4Addr::new(10, 99, 0, 4),
    Ipv4Addr::new(10, 99, 0, 5),
];
pub const CLIENT6: Ipv6Addr = Ipv6Addr::new(0xfd99, 0, 0, 0, 0, 0, 0, 1);
pub const OTHER_CLIENT6: Ipv6Addr = Ipv6Addr::new(0xfd98, 0, 0, 0, 0, 0, 0, 1);
pub const LB_IP6: Ipv6Addr = Ipv6Addr::new(0xfd99, 0, 0, 0, 0, 0, 0, 2);
pub const VIP6: Ipv6Addr = Ipv6Addr::new(0xfd99, 0x100, 0, 0, 0, 0, 0, 0x10);
pub const BACKENDS6: [Ipv6Addr; 3] = [
    Ipv6Addr::new(0xfd99, 0, 0, 0, 0, 0, 0, 3),
    Ipv6Addr::new(0xfd99, 0, 0, 0, 0, 0, 0, 4),
    Ipv6Addr::new(0xfd99, 0, 0, 0, 0, 0, 0, 5),
];

/// Map sizes for tests: small, so parallel tests do not each take the default 1M-flow tables.
pub fn small() -> MapSizes {
    MapSizes {
        services: 16,
        backends: 64,
        flows: 4096,
    }
}

pub struct Lb {
    pub datapath: Arc<Mutex<LbDatapath>>,
    pub controller: Controller,
}

pub fn lb() -> Lb {
    lb_sized(&small())
}

/// The LB's configuration in every test: its addresses and MAC on ifindex 1.
pub fn lb_config() -> ConfigValue {
    ConfigValue {
        snat_ip4: LB_IP.into(),
        snat_ip6: LB_IP6.into(),
        ifindex: 1,
        mac: LB_MAC,
        pad: [0; 2],
    }
}

pub fn lb_sized(sizes: &MapSizes) -> Lb {
    let mut datapath =
        LbDatapath::load(AttachPoint::Tc, None, sizes).expect("load lb (needs root + BPF)");
    datapath.set_config(lb_config()).expect("config");
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

pub fn service<A: Into<IpAddr> + Copy>(
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
pub fn eth_ip(src: IpAddr, dst: IpAddr, proto: IpProtocol, l4_len: usize) -> (Vec<u8>, usize) {
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

pub fn tcp_frame<A: Into<IpAddr>>(
    src: (A, u16),
    dst: (A, u16),
    control: TcpControl,
    payload: &[u8],
) -> Vec<u8> {
    tcp_frame_mss(src, dst, control, payload, None)
}

/// [`tcp_frame`] with an MSS option.
pub fn tcp_frame_mss<A: Into<IpAddr>>(
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

pub fn udp_frame<A: Into<IpAddr>>(src: (A, u16), dst: (A, u16), payload: &[u8]) -> Vec<u8> {
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

pub fn arp_request(target: Ipv4Addr) -> Vec<u8> {
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

pub fn run(lb: &Lb, frame: &[u8]) -> (u32, Vec<u8>) {
    let mut dp = lb.datapath.lock().expect("lock");
    let result = dp
        .test_run(LbProgram::Tc, frame)
        .expect("BPF_PROG_TEST_RUN");
    (result.verdict, result.frame)
}

/// Runs the XDP program of `dp` (loaded with [`AttachPoint::Xdp`]) once on `frame`.
pub fn run_xdp(dp: &mut LbDatapath, frame: &[u8]) -> (u32, Vec<u8>) {
    let result = dp
        .test_run(LbProgram::Xdp, frame)
        .expect("BPF_PROG_TEST_RUN");
    (result.verdict, result.frame)
}

/// (src, sport, dst, dport) of an IPv4 frame whose IPv4 and L4 checksums must be valid.
pub fn tuple(frame: &[u8]) -> (Ipv4Addr, u16, Ipv4Addr, u16) {
    match tuple_any(frame) {
        (IpAddr::V4(src), sport, IpAddr::V4(dst), dport) => (src, sport, dst, dport),
        other => panic!("not IPv4: {other:?}"),
    }
}

/// (src, sport, dst, dport) of an IPv4 or IPv6 frame; the IPv4 header checksum, the IPv6
/// payload length and the L4 checksum must be valid.
pub fn tuple_any(frame: &[u8]) -> (IpAddr, u16, IpAddr, u16) {
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

pub fn count(lb: &Lb, reason: LbReason) -> u64 {
    lb.datapath
        .lock()
        .expect("lock")
        .counters()
        .expect("counters")
        .get(&reason)
        .map_or(0, |c| c.packets)
}

/// One address family's fixture: the translation and policy checks run over IPv4 and IPv6 alike.
pub struct Family {
    pub client: IpAddr,
    /// A client outside `source_range`.
    pub other_client: IpAddr,
    pub lb_ip: IpAddr,
    pub vip: IpAddr,
    pub backends: Vec<IpAddr>,
    /// Seven more backends, for the ring-change check.
    pub more: Vec<IpAddr>,
    /// A source range that holds `client`.
    pub source_range: &'static str,
    /// Ethernet and IP header bytes before the L4 header.
    pub l4_offset: usize,
}

pub fn v4() -> Family {
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

pub fn v6() -> Family {
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
pub fn check_translation(lb: &mut Lb, f: &Family, name: &str) {
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
pub fn check_udp_local_policy_and_source_ranges(lb: &mut Lb, f: &Family) {
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

// ---- IPv6 Neighbor Discovery --------------------------------------------------------------

/// `target`'s solicited-node multicast address, ff02::1:ffXX:XXXX (RFC 4291 2.7.1).
pub fn solicited_node(target: Ipv6Addr) -> Ipv6Addr {
    let t = target.octets();
    Ipv6Addr::from([
        0xff, 0x02, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0xff, t[13], t[14], t[15],
    ])
}

/// An Ethernet + IPv6 frame carrying ICMPv6 message `repr` from `src` to `dst`.
pub fn icmpv6_frame(
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
pub fn neighbor_solicitation(src: Ipv6Addr, target: Ipv6Addr, lladdr: Option<[u8; 6]>) -> Vec<u8> {
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
pub fn assert_advertisement(frame: &[u8], to_mac: [u8; 6], to: Ipv6Addr, solicited: bool) {
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
