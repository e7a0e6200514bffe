//! The LB program (`ebpf/lb.c`) in the real kernel, driven by the real controller and fed
//! fixture frames built with smoltcp through `BPF_PROG_TEST_RUN`: ARP answers, DNAT+SNAT with
//! valid checksums, the reverse translation, conntrack stickiness, source ranges, eTP Local,
//! and the verdict counters. Privileged (root, BPF): run by scripts/test.sh.

use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex};

use aya::programs::{TestRun, TestRunOptions};
use slipway_dataplane::abi::lb::{LbConfig as ConfigValue, LbReason, be32};
use slipway_lb::announce::{Announcer, StaticLease};
use slipway_lb::config::{
    BackendSpec, LbConfig, PoolConfig, Protocol, ServicePort, ServiceSpec, TrafficPolicy,
};
use slipway_lb::controller::Controller;
use slipway_lb::datapath::{AttachPoint, LbDatapath};
use slipway_lb::maps::LbMaps;
use slipway_lb::pool::Pools;
use smoltcp::phy::ChecksumCapabilities;
use smoltcp::wire::{
    ArpOperation, ArpPacket, ArpRepr, EthernetAddress, EthernetFrame, EthernetProtocol,
    EthernetRepr, IpAddress, IpProtocol, Ipv4Packet, Ipv4Repr, TcpControl, TcpPacket, TcpRepr,
    TcpSeqNumber, UdpPacket, UdpRepr,
};

// linux/pkt_cls.h
const TC_ACT_OK: u32 = 0;
const TC_ACT_SHOT: u32 = 2;
const TC_ACT_REDIRECT: u32 = 7;

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

struct Lb {
    datapath: Arc<Mutex<LbDatapath>>,
    controller: Controller,
}

fn lb() -> Lb {
    let mut datapath = LbDatapath::load(AttachPoint::Tc, None).expect("load lb (needs root + BPF)");
    datapath
        .set_config(ConfigValue {
            snat_ip: be32(LB_IP),
            ifindex: 1,
            mac: LB_MAC,
            pad: [0; 2],
        })
        .expect("config");
    let datapath = Arc::new(Mutex::new(datapath));
    let pools = Pools::from_config(&LbConfig::new(
        "eth0",
        vec![PoolConfig {
            name: "ingress".into(),
            cidr: "10.99.100.0/24".into(),
        }],
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

fn service(
    name: &str,
    protocol: Protocol,
    port: u16,
    target: u16,
    backends: &[Ipv4Addr],
) -> ServiceSpec {
    ServiceSpec {
        namespace: "default".into(),
        name: name.into(),
        ports: vec![ServicePort {
            name: None,
            protocol,
            port,
            target_port: target,
        }],
        load_balancer_ip: Some(VIP),
        load_balancer_source_ranges: Vec::new(),
        external_traffic_policy: TrafficPolicy::Cluster,
        backends: backends
            .iter()
            .map(|ip| BackendSpec {
                ip: *ip,
                weight: 1,
                node_local: false,
            })
            .collect(),
        health_check: None,
        drain_timeout_secs: None,
    }
}

fn eth_ipv4(src: Ipv4Addr, dst: Ipv4Addr, proto: IpProtocol, l4_len: usize) -> (Vec<u8>, Ipv4Repr) {
    let ip = Ipv4Repr {
        src_addr: src,
        dst_addr: dst,
        next_header: proto,
        payload_len: l4_len,
        hop_limit: 64,
    };
    let eth = EthernetRepr {
        src_addr: EthernetAddress(CLIENT_MAC),
        dst_addr: EthernetAddress(LB_MAC),
        ethertype: EthernetProtocol::Ipv4,
    };
    let mut buf = vec![0u8; eth.buffer_len() + ip.buffer_len() + l4_len];
    eth.emit(&mut EthernetFrame::new_unchecked(&mut buf[..]));
    ip.emit(
        &mut Ipv4Packet::new_unchecked(&mut buf[14..]),
        &ChecksumCapabilities::default(),
    );
    (buf, ip)
}

fn tcp_frame(
    src: (Ipv4Addr, u16),
    dst: (Ipv4Addr, u16),
    control: TcpControl,
    payload: &[u8],
) -> Vec<u8> {
    let tcp = TcpRepr {
        src_port: src.1,
        dst_port: dst.1,
        control,
        seq_number: TcpSeqNumber(1000),
        ack_number: (control != TcpControl::Syn).then_some(TcpSeqNumber(5000)),
        window_len: 64000,
        window_scale: None,
        max_seg_size: None,
        sack_permitted: false,
        sack_ranges: [None; 3],
        timestamp: None,
        payload,
    };
    let (mut buf, _) = eth_ipv4(src.0, dst.0, IpProtocol::Tcp, tcp.buffer_len());
    tcp.emit(
        &mut TcpPacket::new_unchecked(&mut buf[34..]),
        &IpAddress::Ipv4(src.0),
        &IpAddress::Ipv4(dst.0),
        &ChecksumCapabilities::default(),
    );
    buf
}

fn udp_frame(src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16), payload: &[u8]) -> Vec<u8> {
    let udp = UdpRepr {
        src_port: src.1,
        dst_port: dst.1,
    };
    let (mut buf, _) = eth_ipv4(
        src.0,
        dst.0,
        IpProtocol::Udp,
        udp.header_len() + payload.len(),
    );
    udp.emit(
        &mut UdpPacket::new_unchecked(&mut buf[34..]),
        &IpAddress::Ipv4(src.0),
        &IpAddress::Ipv4(dst.0),
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
    let mut out = vec![0u8; frame.len() + 64];
    let opts = TestRunOptions {
        data_in: Some(frame),
        data_out: Some(&mut out),
        repeat: 1,
        ..TestRunOptions::default()
    };
    let mut dp = lb.datapath.lock().expect("lock");
    let result = dp
        .classifier()
        .expect("program")
        .test_run(opts)
        .expect("BPF_PROG_TEST_RUN");
    out.truncate(result.data_size_out as usize);
    (result.return_value, out)
}

/// (src, sport, dst, dport) of a frame whose IPv4 and L4 checksums must be valid.
fn tuple(frame: &[u8]) -> (Ipv4Addr, u16, Ipv4Addr, u16) {
    let ip = Ipv4Packet::new_checked(&frame[14..]).expect("ipv4");
    assert!(ip.verify_checksum(), "IPv4 header checksum");
    let (src, dst) = (ip.src_addr(), ip.dst_addr());
    let (sa, da) = (IpAddress::Ipv4(src), IpAddress::Ipv4(dst));
    match ip.next_header() {
        IpProtocol::Tcp => {
            let tcp = TcpPacket::new_checked(ip.payload()).expect("tcp");
            assert!(tcp.verify_checksum(&sa, &da), "TCP checksum");
            (src, tcp.src_port(), dst, tcp.dst_port())
        }
        IpProtocol::Udp => {
            let udp = UdpPacket::new_checked(ip.payload()).expect("udp");
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

#[test]
#[cfg_attr(
    not(feature = "privileged"),
    ignore = "privileged: root + BPF; run scripts/test.sh"
)]
fn translates_both_ways_with_valid_checksums_and_sticks_to_the_backend() {
    let mut lb = lb();
    lb.controller
        .apply(service("web", Protocol::Tcp, 80, 8080, &BACKENDS))
        .expect("apply");

    let syn = tcp_frame((CLIENT, 40001), (VIP, 80), TcpControl::Syn, b"");
    let (verdict, out) = run(&lb, &syn);
    assert_eq!(verdict, TC_ACT_REDIRECT);
    let (src, sport, backend, dport) = tuple(&out);
    assert_eq!(
        (src, dport),
        (LB_IP, 8080),
        "SNAT to the LB, DNAT to the target port"
    );
    assert!(BACKENDS.contains(&backend), "{backend}");
    assert_eq!(&out[34 + 20..], &syn[34 + 20..], "payload untouched");

    // The backend's answer goes back as VIP -> client.
    let synack = tcp_frame((backend, 8080), (LB_IP, sport), TcpControl::Syn, b"");
    let (verdict, back) = run(&lb, &synack);
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_eq!(tuple(&back), (VIP, 80, CLIENT, 40001));

    // Adding backends changes the ring, not the established flow.
    let mut more = BACKENDS.to_vec();
    more.extend((6..=12).map(|i| Ipv4Addr::new(10, 99, 0, i)));
    lb.controller
        .apply(service("web", Protocol::Tcp, 80, 8080, &more))
        .expect("apply more");
    for _ in 0..5 {
        let data = tcp_frame(
            (CLIENT, 40001),
            (VIP, 80),
            TcpControl::Psh,
            b"GET / HTTP/1.1\r\n\r\n",
        );
        let (verdict, out) = run(&lb, &data);
        assert_eq!(verdict, TC_ACT_REDIRECT);
        assert_eq!(tuple(&out), (LB_IP, sport, backend, 8080));
    }
    // Many new flows spread over all ten backends.
    let mut seen = std::collections::BTreeSet::new();
    for port in 0..400u16 {
        let (_, out) = run(
            &lb,
            &tcp_frame((CLIENT, 20000 + port), (VIP, 80), TcpControl::Syn, b""),
        );
        seen.insert(tuple(&out).2);
    }
    assert_eq!(seen.len(), more.len(), "{seen:?}");
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
    let mut dns = service("dns", Protocol::Udp, 53, 5353, &BACKENDS[..1]);
    dns.external_traffic_policy = TrafficPolicy::Local;
    dns.backends[0].node_local = true;
    dns.load_balancer_source_ranges = vec!["10.99.0.0/29".into()];
    lb.controller.apply(dns).expect("apply");

    let query = udp_frame((CLIENT, 33333), (VIP, 53), b"query");
    let (verdict, out) = run(&lb, &query);
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_eq!(
        tuple(&out),
        (CLIENT, 33333, BACKENDS[0], 5353),
        "eTP Local: the backend sees the client's address"
    );
    let answer = udp_frame((BACKENDS[0], 5353), (CLIENT, 33333), b"answer");
    let (verdict, back) = run(&lb, &answer);
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_eq!(tuple(&back), (VIP, 53, CLIENT, 33333));

    let outsider = udp_frame((OTHER_CLIENT, 33333), (VIP, 53), b"query");
    let (verdict, _) = run(&lb, &outsider);
    assert_eq!(verdict, TC_ACT_SHOT, "10.99.0.9 is outside 10.99.0.0/29");
    assert_eq!(count(&lb, LbReason::DropSourceRange), 1);

    let (verdict, _) = run(&lb, &udp_frame((CLIENT, 1), (VIP, 54), b"x"));
    assert_eq!(verdict, TC_ACT_SHOT, "the VIP serves no port 54");
    assert_eq!(count(&lb, LbReason::DropNoService), 1);

    let elsewhere = tcp_frame(
        (CLIENT, 1),
        (Ipv4Addr::new(10, 99, 0, 2), 22),
        TcpControl::Syn,
        b"",
    );
    let (verdict, out) = run(&lb, &elsewhere);
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
fn a_service_without_backends_drops() {
    let mut lb = lb();
    lb.controller
        .apply(service("empty", Protocol::Tcp, 80, 80, &[]))
        .expect("apply");
    let (verdict, _) = run(
        &lb,
        &tcp_frame((CLIENT, 1234), (VIP, 80), TcpControl::Syn, b""),
    );
    assert_eq!(verdict, TC_ACT_SHOT);
    assert_eq!(count(&lb, LbReason::DropNoBackend), 1);
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
    assert!(LbDatapath::load(AttachPoint::Xdp(aya::programs::XdpMode::Skb), None).is_err());
    let pins = PinDir(std::path::PathBuf::from(format!(
        "/sys/fs/bpf/slipway-lb-xdp-test-{}",
        std::process::id()
    )));
    let mut dp = LbDatapath::load(AttachPoint::Xdp(aya::programs::XdpMode::Skb), Some(&pins.0))
        .expect("load lb and lb_xdp");
    assert!(dp.xdp().is_ok() && dp.classifier().is_ok());
    dp.add_vip(VIP).expect("vip");
    drop(dp);
    assert!(
        pins.0.join("lb_vips").exists(),
        "the maps are pinned for both programs"
    );
}
