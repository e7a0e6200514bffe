//! Per-pod datapath counters go with their pods: DEL removes the counters map entries of the
//! pod's veth and so its metric series; GC removes those of devices that are gone; a full
//! counters map is reported in the metrics and the agent's log.
//! Privileged (root, BPF, netns): run by scripts/test.sh.

mod common;

use std::io::Write as _;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use common::{Cluster, Pod, api};
use serde_json::json;
use slipway_cni::spec::Attachment;
use slipway_dataplane::node::{NodeMaps, Pins};

fn maps(cluster: &Cluster) -> NodeMaps {
    NodeMaps::open(&Pins::new(&cluster.node(1).bpffs)).expect("maps")
}

fn metrics(cluster: &Cluster) -> String {
    let (code, text) = api(&cluster.node(1).socket, "GET", "/metrics", None).expect("metrics");
    assert_eq!(code, 200, "{text}");
    text
}

/// The packet series of the node datapath in the agent's metrics.
fn series(cluster: &Cluster) -> usize {
    metrics(cluster)
        .lines()
        .filter(|l| l.starts_with("slipway_datapath_packets_total{"))
        .count()
}

/// Pings `to` from `from` until one answer comes back.
fn ping(from: &Pod, to: Ipv4Addr) {
    let deadline = Instant::now() + Duration::from_secs(10);
    let to = to.to_string();
    while !from
        .netns
        .exec(&["ping", "-c", "1", "-W", "1", &to])
        .expect("ping")
        .status
        .success()
    {
        assert!(Instant::now() < deadline, "{} never reached {to}", from.ip);
    }
}

/// Adds a pod, has it talk to `peer`, deletes it; returns how many counters its veth had.
fn cycle(cluster: &Cluster, peer: &Pod, n: usize) -> usize {
    let pod = cluster.add_pod(1, &format!("c{n}"));
    ping(&pod, peer.ip);
    let veth = slipway_cni::plugin::host_ifname(&Attachment {
        container_id: pod.container_id.clone(),
        ifname: "eth0".into(),
    });
    let index = cluster.node(1).netns.link(&veth).expect("veth").ifindex;
    let own = maps(cluster)
        .counters()
        .expect("counters")
        .keys()
        .filter(|k| k.ifindex_in == index || k.ifindex_out == index)
        .count();
    cluster.del_pod(&pod).expect_ok("DEL");
    own
}

#[test]
#[cfg_attr(
    not(feature = "privileged"),
    ignore = "privileged: root + BPF + netns; run scripts/test.sh"
)]
fn counters_and_series_return_to_their_count_after_100_add_del_cycles() {
    let cluster = Cluster::new(1, "vxlan");
    let peer = cluster.add_pod(1, "peer");
    // A first cycle creates the series of the peer's own traffic, which stay.
    cycle(&cluster, &peer, 0);
    let entries = maps(&cluster).counters().expect("counters").len();
    let before = series(&cluster);
    for n in 1..=100 {
        let own = cycle(&cluster, &peer, n);
        assert!(own > 0, "cycle {n}: the pod's traffic was not counted");
    }
    assert_eq!(
        maps(&cluster).counters().expect("counters").len(),
        entries,
        "counters map entries after 100 ADD/DEL cycles"
    );
    assert_eq!(
        series(&cluster),
        before,
        "metric series after 100 ADD/DEL cycles"
    );
}

/// Polls `what` until it holds or 30 s pass.
fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !check() {
        assert!(Instant::now() < deadline, "never: {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
#[cfg_attr(
    not(feature = "privileged"),
    ignore = "privileged: root + BPF + netns; run scripts/test.sh"
)]
fn a_full_counters_map_is_reported_and_gc_makes_room() {
    let cluster = Cluster::new(1, "vxlan");
    let node = cluster.node(1);
    // The index of a device that existed and is gone.
    node.netns
        .ip(&[
            "link",
            "add",
            "slw-gone",
            "type",
            "veth",
            "peer",
            "name",
            "slw-gone-p",
        ])
        .expect("veth");
    let gone = node.netns.link("slw-gone").expect("veth").ifindex;
    node.netns
        .ip(&["link", "del", "slw-gone"])
        .expect("delete veth");
    let counters = maps(&cluster);
    let capacity = counters.counters_capacity().expect("capacity") as usize;
    let free = capacity - counters.counters().expect("counters").len();
    // Fill the map with series of the gone device, as its traffic would have.
    let batch = cluster.dir.join("fill-counters.batch");
    let pin = Pins::new(&node.bpffs).map("counters");
    let mut file = std::fs::File::create(&batch).expect("batch file");
    let hex = |bytes: &[u8]| {
        bytes
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<Vec<_>>()
            .join(" ")
    };
    for n in 0..free {
        let out = u32::try_from(n + 1).expect("u32");
        let key: Vec<u8> = [gone, out, 1]
            .iter()
            .flat_map(|v| v.to_ne_bytes())
            .collect();
        let value: Vec<u8> = [1u64, 100].iter().flat_map(|v| v.to_ne_bytes()).collect();
        writeln!(
            file,
            "map update pinned {} key hex {} value hex {}",
            pin.display(),
            hex(&key),
            hex(&value)
        )
        .expect("write batch");
    }
    drop(file);
    let out = std::process::Command::new("bpftool")
        .args(["batch", "file"])
        .arg(&batch)
        .output()
        .expect("bpftool (Debian package bpftool)");
    // Traffic may take the last free entries first; then bpftool's last updates fail, and the
    // map is full all the same.
    assert_eq!(
        maps(&cluster).counters().expect("counters").len(),
        capacity,
        "the map is not full: bpftool batch: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = metrics(&cluster);
    assert!(
        text.contains("slipway_datapath_counters_full 1")
            && text.contains(&format!("slipway_datapath_counter_entries {capacity}"))
            && text.contains(&format!("slipway_datapath_counter_capacity {capacity}")),
        "{text}"
    );
    eventually("the agent logs that the counters map is full", || {
        cluster.agent_log(1).contains("the counters map is full")
    });

    let mut gc = cluster.conf(1);
    gc["cni.dev/valid-attachments"] = json!([]);
    cluster.cni(1, "GC", "", None, &gc).expect_ok("GC");
    let left = maps(&cluster).counters().expect("counters");
    assert!(
        left.keys().all(|k| k.ifindex_in != gone),
        "GC left series of a device that is gone"
    );
    assert!(metrics(&cluster).contains("slipway_datapath_counters_full 0"));
    eventually("the agent logs that the map has room again", || {
        cluster
            .agent_log(1)
            .contains("the counters map has room again")
    });
}
