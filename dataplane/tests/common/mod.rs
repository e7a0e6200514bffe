//! Fixture frames for `BPF_PROG_TEST_RUN`, built with smoltcp's wire module, and the test run
//! itself. Shared by the test-run suites of the node programs.
#![allow(
    dead_code,
    reason = "each test file uses its own share of the fixtures"
)]

use std::net::Ipv4Addr;

use aya::programs::{SchedClassifier, TestRun, TestRunOptions};
use slipway_dataplane::abi::EndpointInfo;
use smoltcp::phy::ChecksumCapabilities;
use smoltcp::wire::{
    EthernetAddress, EthernetFrame, EthernetProtocol, EthernetRepr, Icmpv4Packet, Icmpv4Repr,
    IpProtocol, Ipv4Packet, Ipv4Repr, UdpPacket, UdpRepr,
};

// linux/pkt_cls.h
pub const TC_ACT_OK: u32 = 0;
pub const TC_ACT_SHOT: u32 = 2;
pub const TC_ACT_REDIRECT: u32 = 7;

/// In `BPF_PROG_TEST_RUN` the skb's device is the loopback of the caller's namespace.
pub const TEST_RUN_IFINDEX: u32 = 1;

pub const POD_A: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 2);
pub const POD_B: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 3);
/// Where the fixtures' local endpoint POD_B lives.
pub const B: EndpointInfo = EndpointInfo {
    ifindex: 4242,
    pod_mac: [0x02, 0xbb, 0, 0, 0, 0x03],
    host_mac: [0x02, 0xcc, 0, 0, 0, 0x03],
};

pub const SENDER_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0xa];
pub const GATEWAY_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0xfe];

/// An Ethernet header (sender -> gateway) and a zeroed frame with room for `payload_len`.
pub fn eth(ethertype: EthernetProtocol, payload_len: usize) -> (EthernetRepr, Vec<u8>) {
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
pub fn ipv4_frame(
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

/// A UDP datagram from `src`:`ports.0` to `dst`:`ports.1`.
pub fn udp_frame(src: Ipv4Addr, dst: Ipv4Addr, ports: (u16, u16), payload: &[u8]) -> Vec<u8> {
    let udp = UdpRepr {
        src_port: ports.0,
        dst_port: ports.1,
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

pub fn icmp_echo_frame(src: Ipv4Addr, dst: Ipv4Addr) -> Vec<u8> {
    let icmp = Icmpv4Repr::EchoRequest {
        ident: 7,
        seq_no: 1,
        data: b"slipway",
    };
    ipv4_frame(src, dst, IpProtocol::Icmp, icmp.buffer_len(), |l4, caps| {
        icmp.emit(&mut Icmpv4Packet::new_unchecked(l4), caps);
    })
}

/// Runs `program` `repeat` times on `frame`; returns the verdict and the frame it left.
pub fn test_run(program: &SchedClassifier, frame: &[u8], repeat: u32) -> (u32, Vec<u8>) {
    let mut out = vec![0u8; frame.len() + 64];
    let opts = TestRunOptions {
        data_in: Some(frame),
        data_out: Some(&mut out),
        repeat,
        ..TestRunOptions::default()
    };
    let result = program.test_run(opts).expect("BPF_PROG_TEST_RUN");
    out.truncate(result.data_size_out as usize);
    (result.return_value, out)
}
