//! The CNI plugin and agent end to end: pods made by exec'ing the plugin as a runtime does,
//! real traffic between them on one host and across hosts, in VXLAN (also to a host behind a
//! router) and in native routing.
//! Privileged (root, BPF, netns): run by scripts/test.sh.

mod common;

use std::time::Duration;

use common::Cluster;
use slipway_dataplane::world::traffic::{iperf3_tcp, ping};

fn reaches(from: &common::Pod, to: &common::Pod) {
    let report = ping(&from.netns, to.ip, 3, Duration::from_millis(20)).expect("ping");
    assert_eq!(
        report.received, 3,
        "{} (host {}) -> {} (host {})",
        from.ip, from.host, to.ip, to.host
    );
}

fn pods_talk_everywhere(routing: &'static str, expected_mtu: u64) {
    let cluster = Cluster::new(3, routing);
    let a = cluster.add_pod(1, "a");
    let b = cluster.add_pod(1, "b");
    let c = cluster.add_pod(2, "c");
    let d = cluster.add_pod(3, "d");
    assert_eq!(
        a.result["interfaces"][1]["mtu"].as_u64(),
        Some(expected_mtu),
        "{}",
        a.result
    );
    // The MTU the pod's interface really has, not only what the result says.
    let eth0 = a.netns.link("eth0").expect("eth0");
    assert_eq!(u64::from(eth0.mtu), expected_mtu, "pod a's eth0");
    for (from, to) in [(&a, &b), (&b, &a), (&a, &c), (&c, &a), (&c, &d), (&d, &a)] {
        reaches(from, to);
    }
    let stream =
        iperf3_tcp(&a.netns, &c.netns, c.ip, Duration::from_secs(1)).expect("iperf3 cross host");
    assert!(stream.received_bps > 0.0);
    if routing == "vxlan" {
        assert!(vxlan_sent_by(&cluster, 1) >= 6, "sent in VXLAN");
        // Host 2 received it untracked by netfilter (the notrack rule counted it).
        let chain = cluster
            .node(2)
            .netns
            .run(&["nft", "list", "chain", "ip", "slipway", "vxlan_untracked"])
            .expect("nft list chain");
        let untracked: u64 = chain
            .split_whitespace()
            .skip_while(|w| *w != "packets")
            .nth(1)
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no counter: {chain}"));
        assert!(untracked >= 6, "{chain}");
    }
}

/// Packets host `i`'s datapath sent to another host through its VXLAN device.
fn vxlan_sent_by(cluster: &Cluster, i: usize) -> u64 {
    let (code, metrics) =
        common::api(&cluster.node(i).socket, "GET", "/metrics", None).expect("metrics answer");
    assert_eq!(code, 200, "{metrics}");
    let index = cluster
        .node(i)
        .netns
        .link("slipway_vxlan")
        .expect("link")
        .ifindex;
    let out = format!("ifindex_out=\"{index}\"");
    metrics
        .lines()
        .filter(|l| l.starts_with("slipway_datapath_packets_total{"))
        .filter(|l| l.contains("reason=\"redirect_vxlan\"") && l.contains(&out))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

#[test]
#[cfg_attr(
    not(feature = "privileged"),
    ignore = "privileged: root + BPF + netns; run scripts/test.sh"
)]
fn pods_talk_on_one_host_and_across_hosts_in_vxlan() {
    pods_talk_everywhere("vxlan", 1450);
}

#[test]
#[cfg_attr(
    not(feature = "privileged"),
    ignore = "privileged: root + BPF + netns; run scripts/test.sh"
)]
fn pods_talk_on_one_host_and_across_hosts_with_native_routing() {
    pods_talk_everywhere("native", 1500);
}

#[test]
#[cfg_attr(
    not(feature = "privileged"),
    ignore = "privileged: root + BPF + netns; run scripts/test.sh"
)]
fn vxlan_to_a_host_behind_a_router_goes_by_the_route() {
    let cluster = Cluster::new(2, "vxlan");
    // Host 1 reaches host 2 only through a router (as another zone's subnet is).
    let router = cluster.world.add_outside("router", 250).expect("router");
    for setting in [
        "net.ipv4.ip_forward=1",
        "net.ipv4.conf.all.send_redirects=0",
        "net.ipv4.conf.eth0.send_redirects=0",
    ] {
        router.run(&["sysctl", "-qw", setting]).expect("sysctl");
    }
    let host2 = format!("{}/32", cluster.node(2).address);
    cluster
        .node(1)
        .netns
        .ip(&["route", "add", &host2, "via", "10.99.0.250", "dev", "eth0"])
        .expect("route via the router");
    let a = cluster.add_pod(1, "a");
    let c = cluster.add_pod(2, "c");
    let forwarded = || router.link_stats("eth0").expect("router stats").tx_packets;
    let before = forwarded();
    reaches(&a, &c);
    assert!(
        forwarded() - before >= 3,
        "the router forwarded the VXLAN packets"
    );
    assert!(vxlan_sent_by(&cluster, 1) >= 3, "sent in VXLAN");
}
