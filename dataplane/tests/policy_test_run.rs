//! NetworkPolicy in the pod-veth program, in the real kernel through `BPF_PROG_TEST_RUN` with
//! smoltcp-built frames: port-range prefixes on SCTP (which the live tests cannot reach),
//! ipBlock identities, later fragments, ICMP errors related to tracked connections (and ones
//! that are not, or that quote too little), a generation flip re-deciding a tracked flow, and
//! the verdict events with their rule ids.
//! Privileged (root, BPF): run by scripts/test.sh with `--features privileged`.

mod common;

use std::net::Ipv4Addr;
use std::path::PathBuf;

use aya::programs::SchedClassifier;
use common::{
    B, POD_A, POD_B, TC_ACT_OK, TC_ACT_REDIRECT, TC_ACT_SHOT, ipv4_frame, test_run, udp_frame,
};
use slipway_dataplane::abi::policy::{Direction, Event, F_INGRESS, Verdict};
use slipway_dataplane::node::{self, NodeMaps, Pins};
use slipway_dataplane::policy::{PolicyEvents, PolicyMaps, PolicyTables, RuleEntry};
use smoltcp::wire::IpProtocol;

const OUTSIDE: Ipv4Addr = Ipv4Addr::new(10, 9, 9, 9);
const BLOCK_PEER: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 7);
const SCTP: u8 = 132;

/// A bpffs directory of this test's own, removed on drop.
struct Bpffs(PathBuf);

impl Drop for Bpffs {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn sctp_frame(src: Ipv4Addr, dst: Ipv4Addr, sport: u16, dport: u16) -> Vec<u8> {
    ipv4_frame(src, dst, IpProtocol::Unknown(SCTP), 12, |l4, _| {
        l4[0..2].copy_from_slice(&sport.to_be_bytes());
        l4[2..4].copy_from_slice(&dport.to_be_bytes());
    })
}

/// An ICMP destination-unreachable (port) from `src` to `dst` quoting `quote_len` bytes of a UDP
/// datagram `dst`:`sport` -> `src`:`dport`.
fn icmp_unreachable(
    src: Ipv4Addr,
    dst: Ipv4Addr,
    sport: u16,
    dport: u16,
    quote_len: usize,
) -> Vec<u8> {
    let mut quote = vec![0u8; 28];
    quote[0] = 0x45;
    quote[8] = 64;
    quote[9] = 17;
    quote[12..16].copy_from_slice(&dst.octets());
    quote[16..20].copy_from_slice(&src.octets());
    quote[20..22].copy_from_slice(&sport.to_be_bytes());
    quote[22..24].copy_from_slice(&dport.to_be_bytes());
    quote.truncate(quote_len);
    ipv4_frame(src, dst, IpProtocol::Icmp, 8 + quote.len(), |l4, _| {
        l4[0] = 3;
        l4[1] = 3;
        l4[8..].copy_from_slice(&quote);
    })
}

fn rule(identity: u32, proto: u8, port: u16, port_bits: u8) -> RuleEntry {
    RuleEntry {
        ep: POD_B,
        direction: Direction::Ingress,
        identity,
        proto,
        port,
        port_bits,
    }
}

fn tables(with_sctp_rule: bool) -> PolicyTables {
    let mut t = PolicyTables::default();
    t.ipcache.insert((POD_A, 32), 100);
    t.ipcache.insert((Ipv4Addr::new(192, 0, 2, 0), 24), 200);
    t.endpoints.insert(POD_B, F_INGRESS);
    if with_sctp_rule {
        // SCTP 9000-9001 from A: one prefix of 15 bits.
        t.rules.insert(rule(100, SCTP, 9000, 15), 7);
    }
    // Anything from 192.0.2.0/24.
    t.rules.insert(rule(200, 0, 0, 0), 8);
    t
}

fn events(ring: &mut PolicyEvents) -> Vec<(Verdict, u32, u8, u16)> {
    ring.drain()
        .iter()
        .map(|e: &Event| {
            assert_eq!(Direction::from_raw(e.direction), Some(Direction::Ingress));
            assert_eq!(e.dst(), POD_B);
            (
                Verdict::from_raw(e.verdict).expect("verdict"),
                e.rule_id,
                e.proto,
                u16::from_be(e.dport),
            )
        })
        .collect()
}

#[test]
#[cfg_attr(
    not(feature = "privileged"),
    ignore = "privileged: root + BPF; run scripts/test.sh"
)]
fn policy_verdicts_on_crafted_packets() {
    let dir = Bpffs(PathBuf::from(format!(
        "/sys/fs/bpf/slipway-policy-test-run-{}",
        std::process::id()
    )));
    let pins = Pins::new(&dir.0);
    let _installed = node::install(&pins, &node::MapSizes::default())
        .expect("install the node datapath (root, BPF)");
    let prog = SchedClassifier::from_pin(pins.program("from_pod")).expect("from_pod pin");
    NodeMaps::open(&pins)
        .expect("node maps")
        .upsert_endpoint(POD_B, B)
        .expect("endpoint");
    let mut policy = PolicyMaps::open(&pins).expect("policy maps");
    let mut ring = PolicyEvents::open(&pins).expect("events");

    // Generation 0: no policy, nothing tracked or decided.
    let (verdict, _) = test_run(&prog, &sctp_frame(POD_A, POD_B, 5000, 9002), 1);
    assert_eq!(verdict, TC_ACT_REDIRECT);
    assert!(ring.drain().is_empty());

    let report = policy.install(&tables(true)).expect("install");
    assert_eq!(report.generation, 1);
    assert_eq!(policy.active().expect("read back"), tables(true));

    // SCTP: the 15-bit prefix holds 9000 and 9001, not 9002; UDP 9001 is another protocol.
    assert_eq!(
        test_run(&prog, &sctp_frame(POD_A, POD_B, 5000, 9001), 1).0,
        TC_ACT_REDIRECT
    );
    assert_eq!(
        test_run(&prog, &sctp_frame(POD_A, POD_B, 5001, 9000), 1).0,
        TC_ACT_REDIRECT
    );
    assert_eq!(
        test_run(&prog, &sctp_frame(POD_A, POD_B, 5000, 9002), 1).0,
        TC_ACT_SHOT
    );
    assert_eq!(
        test_run(&prog, &udp_frame(POD_A, POD_B, (5000, 9001), b"u"), 1).0,
        TC_ACT_SHOT
    );
    assert_eq!(
        events(&mut ring),
        vec![
            (Verdict::Allow, 7, SCTP, 9001),
            (Verdict::Allow, 7, SCTP, 9000),
            (Verdict::Deny, 0, SCTP, 9002),
            (Verdict::Deny, 0, 17, 9001),
        ]
    );
    // A tracked connection's next packets raise no event.
    assert_eq!(
        test_run(&prog, &sctp_frame(POD_A, POD_B, 5000, 9001), 10).0,
        TC_ACT_REDIRECT
    );
    assert!(ring.drain().is_empty());

    // ipBlock: any protocol and port from 192.0.2.0/24.
    assert_eq!(
        test_run(&prog, &udp_frame(BLOCK_PEER, POD_B, (1, 65535), b"u"), 1).0,
        TC_ACT_REDIRECT
    );
    assert_eq!(events(&mut ring), vec![(Verdict::Allow, 8, 17, 65535)]);

    // Fragments: the first of a denied datagram is dropped; later ones carry no ports and pass.
    let mut first = udp_frame(POD_A, POD_B, (5000, 7777), b"fragment");
    first[14 + 6] = 0x20; // more fragments, offset 0
    assert_eq!(test_run(&prog, &first, 1).0, TC_ACT_SHOT);
    let mut later = udp_frame(POD_A, POD_B, (5000, 7777), b"fragment");
    later[14 + 7] = 0x10; // offset 16 * 8 bytes
    assert_eq!(test_run(&prog, &later, 1).0, TC_ACT_REDIRECT);
    ring.drain();

    // ICMP errors: about a connection B opened (B -> outside, tracked when it left through the
    // host stack) they reach B; about nothing tracked, or quoting too little, they are denied.
    assert_eq!(
        test_run(&prog, &udp_frame(POD_B, OUTSIDE, (4444, 53), b"q"), 1).0,
        TC_ACT_OK
    );
    assert_eq!(
        test_run(&prog, &icmp_unreachable(OUTSIDE, POD_B, 4444, 53, 28), 1).0,
        TC_ACT_REDIRECT
    );
    assert_eq!(
        test_run(&prog, &icmp_unreachable(OUTSIDE, POD_B, 4445, 53, 28), 1).0,
        TC_ACT_SHOT
    );
    assert_eq!(
        test_run(&prog, &icmp_unreachable(OUTSIDE, POD_B, 4444, 53, 22), 1).0,
        TC_ACT_SHOT
    );
    assert_eq!(
        test_run(&prog, &icmp_unreachable(OUTSIDE, POD_B, 4444, 53, 10), 1).0,
        TC_ACT_SHOT
    );
    let icmp = events(&mut ring);
    assert_eq!(icmp.len(), 3, "{icmp:?}");
    assert!(
        icmp.iter()
            .all(|(v, _, proto, _)| *v == Verdict::Deny && *proto == 1)
    );

    // A new generation without the SCTP rule: the tracked SCTP flow is decided again, denied.
    let report = policy.install(&tables(false)).expect("install");
    assert_eq!(report.generation, 2);
    assert_eq!(
        report.writes, 4,
        "slot 0 was empty: 2 identities, 1 endpoint, 1 rule"
    );
    assert_eq!(
        test_run(&prog, &sctp_frame(POD_A, POD_B, 5000, 9001), 1).0,
        TC_ACT_SHOT
    );
    assert_eq!(events(&mut ring), vec![(Verdict::Deny, 0, SCTP, 9001)]);

    // The same state again goes to slot 1, which holds generation 1's: only the difference is
    // written (the SCTP rule deleted).
    let report = policy.install(&tables(false)).expect("install");
    assert_eq!((report.generation, report.writes), (3, 1));
    assert_eq!(policy.active().expect("read back"), tables(false));
    assert_eq!(
        test_run(&prog, &sctp_frame(POD_A, POD_B, 5000, 9001), 1).0,
        TC_ACT_SHOT
    );
}
