//! The LB program (`ebpf/lb.c`) in the real kernel, driven by the real controller and fed
//! fixture frames built with smoltcp through `BPF_PROG_TEST_RUN`: ARP answers, DNAT+SNAT with
//! valid checksums, the reverse translation, conntrack stickiness, source ranges, eTP Local,
//! direct server return, the XDP variant, the tables and the verdict counters (IPv6 in
//! `lb_test_run_v6.rs`). Privileged (root, BPF): run by scripts/test.sh.

mod common;

use common::*;

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
    dp.set_config(lb_config()).expect("config");
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
