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
    IpProtocol, Ipv4Packet, Ipv4Repr, TcpControl, TcpPacket, TcpRepr, TcpSeqNumber, UdpPacket,
    UdpRepr,
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

/// A TCP segment from `src`:`ports.0` to `dst`:`ports.1`: a SYN, or with `ack` a SYN-ACK.
pub fn tcp_frame(src: Ipv4Addr, dst: Ipv4Addr, ports: (u16, u16), ack: bool) -> Vec<u8> {
    let tcp = TcpRepr {
        src_port: ports.0,
        dst_port: ports.1,
        control: TcpControl::Syn,
        seq_number: TcpSeqNumber(1000),
        ack_number: ack.then_some(TcpSeqNumber(2000)),
        window_len: 64240,
        window_scale: None,
        max_seg_size: None,
        sack_permitted: false,
        sack_ranges: [None; 3],
        timestamp: None,
        payload: &[],
    };
    ipv4_frame(src, dst, IpProtocol::Tcp, tcp.buffer_len(), |l4, caps| {
        tcp.emit(
            &mut TcpPacket::new_unchecked(l4),
            &src.into(),
            &dst.into(),
            caps,
        );
    })
}

/// The (source, destination) addresses and ports of a TCP or UDP frame, after checking that its
/// IPv4 and L4 checksums are right.
pub fn checked_tuple(frame: &[u8]) -> ((Ipv4Addr, u16), (Ipv4Addr, u16)) {
    let eth = EthernetFrame::new_checked(frame).expect("ethernet frame");
    let ip = Ipv4Packet::new_checked(eth.payload()).expect("ipv4 packet");
    assert!(ip.verify_checksum(), "IPv4 checksum");
    let (src, dst) = (ip.src_addr(), ip.dst_addr());
    let ports = match ip.next_header() {
        IpProtocol::Tcp => {
            let tcp = TcpPacket::new_checked(ip.payload()).expect("tcp");
            assert!(
                tcp.verify_checksum(&src.into(), &dst.into()),
                "TCP checksum"
            );
            (tcp.src_port(), tcp.dst_port())
        }
        IpProtocol::Udp => {
            let udp = UdpPacket::new_checked(ip.payload()).expect("udp");
            assert!(
                udp.verify_checksum(&src.into(), &dst.into()),
                "UDP checksum"
            );
            (udp.src_port(), udp.dst_port())
        }
        other => panic!("not TCP or UDP: {other}"),
    };
    ((src, ports.0), (dst, ports.1))
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

/// A bpffs directory of one test's own (`/sys/fs/bpf/slipway-<label>-<pid>`), removed on drop,
/// also while unwinding from a failed assertion.
pub struct Bpffs(pub std::path::PathBuf);

impl Bpffs {
    pub fn new(label: &str) -> Self {
        Self(std::path::PathBuf::from(format!(
            "/sys/fs/bpf/slipway-{label}-{}",
            std::process::id()
        )))
    }
}

impl Drop for Bpffs {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Packets `maps`' counters hold for test runs sent to `ifindex_out` for `reason` (0 if none).
pub fn counted(
    maps: &slipway_dataplane::node::NodeMaps,
    ifindex_out: u32,
    reason: slipway_dataplane::abi::Reason,
) -> u64 {
    let key = slipway_dataplane::abi::CounterKey {
        ifindex_in: TEST_RUN_IFINDEX,
        ifindex_out,
        reason: reason as u32,
    };
    maps.counters()
        .expect("counters")
        .get(&key)
        .map_or(0, |v| v.packets)
}
