//! The pod-veth program in the real kernel, fed fixture packets built with smoltcp's wire module
//! through `BPF_PROG_TEST_RUN`: verdicts, rewritten frames, redirect targets and counters.
//! Privileged (root, BPF): run by scripts/test.sh with `--features privileged`.

use std::net::Ipv4Addr;

use aya::programs::{TestRun, TestRunOptions};
use slipway_dataplane::abi::{CounterKey, CounterValue, EndpointInfo, Reason};
use slipway_dataplane::pod::PodDatapath;
use smoltcp::phy::ChecksumCapabilities;
use smoltcp::wire::{
    EthernetAddress, EthernetFrame, EthernetProtocol, EthernetRepr, Icmpv4Packet, Icmpv4Repr,
    IpProtocol, Ipv4Packet, Ipv4Repr, UdpPacket, UdpRepr,
};

// linux/pkt_cls.h
const TC_ACT_OK: u32 = 0;
const TC_ACT_SHOT: u32 = 2;
const TC_ACT_REDIRECT: u32 = 7;

/// In `BPF_PROG_TEST_RUN` the skb's device is the loopback of the caller's namespace.
const TEST_RUN_IFINDEX: u32 = 1;

const POD_A: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 2);
const POD_B: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 3);
const SENDER_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0xa];
const GATEWAY_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0xfe];
const B: EndpointInfo = EndpointInfo {
    ifindex: 4242,
    pod_mac: [0x02, 0xbb, 0, 0, 0, 0x03],
    host_mac: [0x02, 0xcc, 0, 0, 0, 0x03],
};

fn eth(ethertype: EthernetProtocol, payload_len: usize) -> (EthernetRepr, Vec<u8>) {
    let repr = EthernetRepr {
        src_addr: EthernetAddress(SENDER_MAC),
        dst_addr: EthernetAddress(GATEWAY_MAC),
        ethertype,
    };
    let buf = vec![0u8; repr.buffer_len() + payload_len];
    (repr, buf)
}

/// An Ethernet + IPv4 frame from `src` to `dst` whose L4 part (`l4_len` bytes) `emit_l4` writes
/// into the IPv4 payload.
fn ipv4_frame(
    src: Ipv4Addr,
    dst: Ipv4Addr,
    protocol: IpProtocol,
    l4_len: usize,
    emit_l4: impl FnOnce(&mut [u8], &ChecksumCapabilities),
) -> Vec<u8> {
    let caps = ChecksumCapabilities::default();
    let ip = Ipv4Repr {
        src_addr: src,
        dst_addr: dst,
        next_header: protocol,
        payload_len: l4_len,
        hop_limit: 64,
    };
    let (eth_repr, mut buf) = eth(EthernetProtocol::Ipv4, ip.buffer_len() + ip.payload_len);
    let mut frame = EthernetFrame::new_unchecked(&mut buf[..]);
    eth_repr.emit(&mut frame);
    let mut packet = Ipv4Packet::new_unchecked(frame.payload_mut());
    ip.emit(&mut packet, &caps);
    emit_l4(packet.payload_mut(), &caps);
    buf
}

fn udp_frame(src: Ipv4Addr, dst: Ipv4Addr, payload: &[u8]) -> Vec<u8> {
    let udp = UdpRepr {
        src_port: 40000,
        dst_port: 5201,
    };
    ipv4_frame(
        src,
        dst,
        IpProtocol::Udp,
        udp.header_len() + payload.len(),
        |l4, caps| {
            udp.emit(
                &mut UdpPacket::new_unchecked(l4),
                &src.into(),
                &dst.into(),
                payload.len(),
                |b| b.copy_from_slice(payload),
                caps,
            );
        },
    )
}

fn icmp_echo_frame(src: Ipv4Addr, dst: Ipv4Addr) -> Vec<u8> {
    let icmp = Icmpv4Repr::EchoRequest {
        ident: 7,
        seq_no: 1,
        data: b"slipway",
    };
    ipv4_frame(src, dst, IpProtocol::Icmp, icmp.buffer_len(), |l4, caps| {
        icmp.emit(&mut Icmpv4Packet::new_unchecked(l4), caps);
    })
}

/// Runs the program `repeat` times on `frame`; returns the verdict and the frame it left.
fn run(dp: &mut PodDatapath, frame: &[u8], repeat: u32) -> (u32, Vec<u8>) {
    let mut out = vec![0u8; frame.len() + 64];
    let opts = TestRunOptions {
        data_in: Some(frame),
        data_out: Some(&mut out),
        repeat,
        ..TestRunOptions::default()
    };
    let result = dp
        .program()
        .expect("program")
        .test_run(opts)
        .expect("BPF_PROG_TEST_RUN");
    out.truncate(result.data_size_out as usize);
    (result.return_value, out)
}

fn counter(dp: &PodDatapath, ifindex_out: u32, reason: Reason) -> CounterValue {
    let key = CounterKey {
        ifindex_in: TEST_RUN_IFINDEX,
        ifindex_out,
        reason: reason as u32,
    };
    dp.counters()
        .expect("counters")
        .get(&key)
        .copied()
        .unwrap_or_default()
}

fn loaded() -> PodDatapath {
    let mut dp = PodDatapath::load(None).expect("load pod_veth (needs root and BPF)");
    dp.upsert_endpoint(POD_B, B).expect("insert endpoint");
    dp
}

#[test]
#[cfg_attr(
    not(feature = "privileged"),
    ignore = "privileged: root + BPF; run scripts/test.sh"
)]
fn packet_to_a_local_endpoint_is_redirected_into_its_pod() {
    let mut dp = loaded();
    let frame = udp_frame(POD_A, POD_B, b"hello pod b");
    let (verdict, out) = run(&mut dp, &frame, 1);
    assert_eq!(verdict, TC_ACT_REDIRECT);

    let rewritten = EthernetFrame::new_checked(&out[..]).expect("ethernet frame");
    assert_eq!(
        rewritten.dst_addr(),
        EthernetAddress(B.pod_mac),
        "delivered to pod b's eth0"
    );
    assert_eq!(
        rewritten.src_addr(),
        EthernetAddress(B.host_mac),
        "from pod b's gateway"
    );
    assert_eq!(&out[14..], &frame[14..], "only the MACs change");

    assert_eq!(
        counter(&dp, B.ifindex, Reason::RedirectPeer),
        CounterValue {
            packets: 1,
            bytes: frame.len() as u64
        },
        "counted against the redirect target"
    );
}

#[test]
#[cfg_attr(
    not(feature = "privileged"),
    ignore = "privileged: root + BPF; run scripts/test.sh"
)]
fn counters_add_up_over_repeated_runs() {
    let mut dp = loaded();
    let frame = icmp_echo_frame(POD_A, POD_B);
    let (verdict, _) = run(&mut dp, &frame, 100);
    assert_eq!(verdict, TC_ACT_REDIRECT);
    let (verdict, _) = run(&mut dp, &frame, 23);
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert_eq!(
        counter(&dp, B.ifindex, Reason::RedirectPeer),
        CounterValue {
            packets: 123,
            bytes: 123 * frame.len() as u64
        }
    );
}

#[test]
#[cfg_attr(
    not(feature = "privileged"),
    ignore = "privileged: root + BPF; run scripts/test.sh"
)]
fn unknown_destination_goes_to_the_host_stack_unchanged() {
    let mut dp = loaded();
    let frame = icmp_echo_frame(POD_A, Ipv4Addr::new(10, 244, 2, 9));
    let (verdict, out) = run(&mut dp, &frame, 1);
    assert_eq!(verdict, TC_ACT_OK);
    assert_eq!(out, frame);
    assert_eq!(counter(&dp, 0, Reason::PassNoEndpoint).packets, 1);
    assert_eq!(counter(&dp, B.ifindex, Reason::RedirectPeer).packets, 0);

    // Removing the endpoint turns a redirect into a pass; removing it twice is fine.
    dp.remove_endpoint(POD_B).expect("remove");
    dp.remove_endpoint(POD_B).expect("remove again");
    assert_eq!(dp.endpoint(POD_B).expect("get"), None);
    let (verdict, _) = run(&mut dp, &udp_frame(POD_A, POD_B, b"x"), 1);
    assert_eq!(verdict, TC_ACT_OK);
    assert_eq!(counter(&dp, 0, Reason::PassNoEndpoint).packets, 2);
}

#[test]
#[cfg_attr(
    not(feature = "privileged"),
    ignore = "privileged: root + BPF; run scripts/test.sh"
)]
fn non_ipv4_passes_and_malformed_ipv4_is_dropped() {
    let mut dp = loaded();
    let (arp_repr, mut arp) = eth(EthernetProtocol::Arp, 28);
    arp_repr.emit(&mut EthernetFrame::new_unchecked(&mut arp[..]));
    let (verdict, _) = run(&mut dp, &arp, 1);
    assert_eq!(verdict, TC_ACT_OK);
    assert_eq!(counter(&dp, 0, Reason::PassNotIpv4).packets, 1);

    // An IPv4 ethertype carrying a version-6 header. (A header cut short of 20 bytes cannot be
    // fed this way: the kernel's test-run rejects it with EINVAL before the program runs.)
    let mut bad_version = udp_frame(POD_A, POD_B, b"payload");
    bad_version[14] = 0x65;
    let (verdict, _) = run(&mut dp, &bad_version, 1);
    assert_eq!(verdict, TC_ACT_SHOT);

    // A full-length header that claims an IHL below the minimum of 5 words.
    let mut bad_ihl = udp_frame(POD_A, POD_B, b"payload");
    bad_ihl[14] = 0x44;
    let (verdict, _) = run(&mut dp, &bad_ihl, 1);
    assert_eq!(verdict, TC_ACT_SHOT);
    assert_eq!(counter(&dp, 0, Reason::DropMalformed).packets, 2);
    assert_eq!(counter(&dp, B.ifindex, Reason::RedirectPeer).packets, 0);
}
