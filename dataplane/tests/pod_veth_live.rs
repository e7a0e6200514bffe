//! The pod-veth program on live traffic: two pods on one host talk only because the program
//! redirects their packets (the host has no route to either pod and does not forward), and the
//! program's counters match what the pods' interfaces sent, packet for packet and byte for byte.
//! Privileged (root, BPF, netns): run by scripts/test.sh with `--features privileged`.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::time::Duration;

use slipway_dataplane::abi::{CounterKey, CounterValue, EndpointInfo, Reason};
use slipway_dataplane::netns;
use slipway_dataplane::pod::PodDatapath;
use slipway_dataplane::world::traffic::{iperf3_tcp, ping};
use slipway_dataplane::world::{LinkStats, Pod, World};

const IP_A: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 2);
const IP_B: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 3);

fn endpoint(pod: &Pod) -> EndpointInfo {
    EndpointInfo {
        ifindex: pod.host_ifindex,
        pod_mac: pod.pod_mac,
        host_mac: pod.host_mac,
    }
}

fn sent_since(pod: &Pod, before: LinkStats) -> CounterValue {
    let now = pod.netns.link_stats("eth0").expect("stats");
    CounterValue {
        packets: now.tx_packets - before.tx_packets,
        bytes: now.tx_bytes - before.tx_bytes,
    }
}

#[test]
#[cfg_attr(
    not(feature = "privileged"),
    ignore = "privileged: root + BPF + netns; run scripts/test.sh"
)]
fn pods_talk_only_through_the_redirect_and_counters_match() {
    let world = World::builder().hosts(1).build().expect("world");
    let host = world.host(1).netns.clone();
    let a = world.add_pod(1, "a", IP_A).expect("pod a");
    let b = world.add_pod(1, "b", IP_B).expect("pod b");

    let without = ping(&a.netns, IP_B, 3, Duration::from_millis(20)).expect("ping");
    assert_eq!(
        without.received, 0,
        "no datapath, no path: the host neither routes nor forwards"
    );

    let pin_dir = world.bpffs_dir().join("pod");
    let mut dp = PodDatapath::load(Some(&pin_dir)).expect("load");
    for pod in [&a, &b] {
        netns::run_in(host.name(), || dp.attach(&pod.host_ifname))
            .expect("setns")
            .expect("attach");
    }
    dp.upsert_endpoint(IP_A, endpoint(&a)).expect("endpoint a");
    dp.upsert_endpoint(IP_B, endpoint(&b)).expect("endpoint b");
    assert!(pin_dir.join("endpoints").exists() && pin_dir.join("counters").exists());

    let a_before = a.netns.link_stats("eth0").expect("stats a");
    let b_before = b.netns.link_stats("eth0").expect("stats b");

    let pinged = ping(&a.netns, IP_B, 10, Duration::from_millis(10)).expect("ping");
    assert_eq!((pinged.transmitted, pinged.received), (10, 10));
    let iperf = iperf3_tcp(&a.netns, &b.netns, IP_B, Duration::from_secs(1)).expect("iperf3");
    assert!(
        iperf.received_bps > 0.0 && iperf.received_bytes > 0,
        "{iperf:?}"
    );

    // Every frame a pod's eth0 transmitted reached its host-side veth's ingress, where the
    // program counted it against the other pod's veth as the redirect target.
    let expected = BTreeMap::from([
        (
            CounterKey {
                ifindex_in: a.host_ifindex,
                ifindex_out: b.host_ifindex,
                reason: Reason::RedirectPeer as u32,
            },
            sent_since(&a, a_before),
        ),
        (
            CounterKey {
                ifindex_in: b.host_ifindex,
                ifindex_out: a.host_ifindex,
                reason: Reason::RedirectPeer as u32,
            },
            sent_since(&b, b_before),
        ),
    ]);
    assert_eq!(dp.counters().expect("counters"), expected);
    let a_to_b = expected.values().next().copied().unwrap_or_default();
    // Every payload byte pod b received crossed the program (with its headers).
    assert!(
        a_to_b.bytes >= iperf.received_bytes,
        "counted {a_to_b:?}, iperf3 received {iperf:?}"
    );

    // Detaching the program (dropping it) cuts the pods apart again.
    drop(dp);
    let after = ping(&a.netns, IP_B, 3, Duration::from_millis(20)).expect("ping");
    assert_eq!(
        after.received, 0,
        "without the program nothing carries the packets"
    );
}
