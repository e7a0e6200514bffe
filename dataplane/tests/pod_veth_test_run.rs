//! The pod-veth program in the real kernel, fed fixture packets built with smoltcp's wire module
//! through `BPF_PROG_TEST_RUN`: verdicts, rewritten frames, redirect targets and counters.
//! Privileged (root, BPF): run by scripts/test.sh with `--features privileged`.

mod common;

use std::net::Ipv4Addr;

use common::{
    B, POD_A, POD_B, TC_ACT_OK, TC_ACT_REDIRECT, TC_ACT_SHOT, TEST_RUN_IFINDEX, eth,
    icmp_echo_frame, test_run,
};
use slipway_dataplane::abi::{CounterKey, CounterValue, Reason};
use slipway_dataplane::pod::PodDatapath;
use smoltcp::wire::{EthernetAddress, EthernetFrame, EthernetProtocol};

fn run(dp: &mut PodDatapath, frame: &[u8], repeat: u32) -> (u32, Vec<u8>) {
    test_run(dp.program().expect("program"), frame, repeat)
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
    let frame = common::udp_frame(POD_A, POD_B, (40000, 5201), b"hello pod b");
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
    let (verdict, _) = run(
        &mut dp,
        &common::udp_frame(POD_A, POD_B, (40000, 5201), b"x"),
        1,
    );
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
    let mut bad_version = common::udp_frame(POD_A, POD_B, (40000, 5201), b"payload");
    bad_version[14] = 0x65;
    let (verdict, _) = run(&mut dp, &bad_version, 1);
    assert_eq!(verdict, TC_ACT_SHOT);

    // A full-length header that claims an IHL below the minimum of 5 words.
    let mut bad_ihl = common::udp_frame(POD_A, POD_B, (40000, 5201), b"payload");
    bad_ihl[14] = 0x44;
    let (verdict, _) = run(&mut dp, &bad_ihl, 1);
    assert_eq!(verdict, TC_ACT_SHOT);
    assert_eq!(counter(&dp, 0, Reason::DropMalformed).packets, 2);
    assert_eq!(counter(&dp, B.ifindex, Reason::RedirectPeer).packets, 0);
}
