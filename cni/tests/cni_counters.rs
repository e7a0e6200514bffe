//! Per-pod datapath counters go with their pods: DEL removes the counters map entries of the
//! pod's veth and so its metric series; GC removes those of devices that are gone; a full
//! counters map is reported in the metrics and the agent's log.
//! Privileged (root, BPF, netns): run by scripts/test.sh.

mod common;

use std::collections::BTreeSet;
use std::io::Write as _;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use common::{Cluster, Pod, api};
use serde_json::{Value, json};
use slipway_cni::spec::Attachment;
use slipway_dataplane::abi::CounterKey;
use slipway_dataplane::node::{NodeMaps, Pins};

fn maps(cluster: &Cluster) -> NodeMaps {
    NodeMaps::open(&Pins::new(&cluster.node(1).bpffs)).expect("maps")
}

fn metrics(cluster: &Cluster) -> String {
    let (code, text) = api(&cluster.node(1).socket, "GET", "/metrics", None).expect("metrics");
    assert_eq!(code, 200, "{text}");
    text
}

/// The interface indexes of the node's own devices (all but pod veths).
fn host_devices(cluster: &Cluster) -> BTreeSet<u32> {
    let links: Value = serde_json::from_str(
        &cluster
            .node(1)
            .netns
            .ip(&["-j", "link", "show"])
            .expect("ip link"),
    )
    .expect("json");
    links
        .as_array()
        .expect("links")
        .iter()
        .filter(|l| !l["ifname"].as_str().unwrap_or_default().starts_with("lxc"))
        .filter_map(|l| l["ifindex"].as_u64().and_then(|i| u32::try_from(i).ok()))
        .collect()
}

/// Whether a counter with these ends concerns a pod: it has a pod veth (present or gone) at an
/// end. The node's own devices count what reaches them from the world, whenever it comes.
fn of_pods(host: &BTreeSet<u32>, ifindex_in: u32, ifindex_out: u32) -> bool {
    !(host.contains(&ifindex_in) && (ifindex_out == 0 || host.contains(&ifindex_out)))
}

/// The counters map entries that concern pods.
fn pod_counters(cluster: &Cluster, host: &BTreeSet<u32>) -> BTreeSet<CounterKey> {
    maps(cluster)
        .counters()
        .expect("counters")
        .into_keys()
        .filter(|k| of_pods(host, k.ifindex_in, k.ifindex_out))
        .collect()
}

/// The packet series of the node datapath in the agent's metrics that concern pods.
fn pod_series(cluster: &Cluster, host: &BTreeSet<u32>) -> BTreeSet<String> {
    let label = |line: &str, name: &str| -> u32 {
        line.split(&format!("{name}=\""))
            .nth(1)
            .and_then(|rest| rest.split('"').next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in {line}"))
    };
    metrics(cluster)
        .lines()
        .filter(|l| l.starts_with("slipway_datapath_packets_total{"))
        .filter(|l| of_pods(host, label(l, "ifindex_in"), label(l, "ifindex_out")))
        .map(|l| l.split('}').next().unwrap_or_default().to_owned())
        .collect()
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

/// Adds a pod, has it talk to `peer`, deletes it; returns how many counters its veth had
/// before the DEL. After the DEL none is left.
fn cycle(cluster: &Cluster, peer: &Pod, n: usize) -> usize {
    let pod = cluster.add_pod(1, &format!("c{n}"));
    ping(&pod, peer.ip);
    let veth = slipway_cni::plugin::host_ifname(&Attachment {
        container_id: pod.container_id.clone(),
        ifname: "eth0".into(),
    });
    let index = cluster.node(1).netns.link(&veth).expect("veth").ifindex;
    let of_veth = || {
        maps(cluster)
            .counters()
            .expect("counters")
            .keys()
            .filter(|k| k.ifindex_in == index || k.ifindex_out == index)
            .count()
    };
    let own = of_veth();
    cluster.del_pod(&pod).expect_ok("DEL");
    assert_eq!(of_veth(), 0, "cycle {n}: DEL left the veth's counters");
    own
}

#[test]
#[cfg_attr(
    not(feature = "privileged"),
    ignore = "privileged: root + BPF + netns; run scripts/test.sh"
)]
fn counters_and_series_return_to_their_count_after_100_add_del_cycles() {
    let cluster = Cluster::new(1, "vxlan");
    // The peer sends nothing of its own accord (no IPv6 router solicitations), so what it
    // counts comes from the cycles alone.
    let sandbox = cluster.sandbox("peer");
    sandbox
        .sysctl(&[
            "net.ipv6.conf.all.disable_ipv6=1",
            "net.ipv6.conf.default.disable_ipv6=1",
        ])
        .expect("sysctl");
    let container_id = format!("peer-{}", cluster.world.name());
    let path = slipway_dataplane::netns::path(sandbox.name());
    let result = cluster
        .cni(1, "ADD", &container_id, path.to_str(), &cluster.conf(1))
        .expect_ok("ADD peer");
    let peer = Pod {
        netns: sandbox,
        container_id,
        host: 1,
        ip: result["ips"][0]["address"]
            .as_str()
            .and_then(|a| a.split('/').next())
            .and_then(|a| a.parse().ok())
            .expect("an address"),
        result,
    };
    let host = host_devices(&cluster);
    // The peer's own series (to its node), which stay.
    ping(&peer, cluster.node(1).address);
    cycle(&cluster, &peer, 0);
    let entries = pod_counters(&cluster, &host);
    let series = pod_series(&cluster, &host);
    assert!(
        !entries.is_empty() && !series.is_empty(),
        "the peer was counted"
    );
    for n in 1..=100 {
        let own = cycle(&cluster, &peer, n);
        assert!(own > 0, "cycle {n}: the pod's traffic was not counted");
    }
    assert_eq!(
        pod_counters(&cluster, &host),
        entries,
        "counters map entries after 100 ADD/DEL cycles"
    );
    assert_eq!(
        pod_series(&cluster, &host),
        series,
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
