//! The LB program over IPv6 in the real kernel, through `BPF_PROG_TEST_RUN` with smoltcp-built
//! frames: Neighbor Advertisements for Neighbor Solicitations (bytes and checksum checked), and
//! the forward path with valid checksums beside IPv4, eTP Local, source ranges and extension
//! headers. Privileged (root, BPF): run by scripts/test.sh.

mod common;

use common::*;

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
