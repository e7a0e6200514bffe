//! The node around the pods: an agent restart under a running stream, chained plugins (Debian's
//! portmap after Slipway), egress masquerade to a machine outside the cluster, and the agent's
//! metrics. Privileged (root, BPF, netns): run by scripts/test.sh.

mod common;

use std::time::Duration;

use common::{Cluster, api};
use serde_json::{Value, json};
use slipway_dataplane::netns;
use slipway_dataplane::testing::traffic::{iperf3_tcp, ping};

#[test]
#[cfg_attr(
    not(feature = "privileged"),
    ignore = "privileged: root + BPF + netns; run scripts/test.sh"
)]
fn restarting_agents_never_interrupts_an_established_stream() {
    let mut cluster = Cluster::new(2, "vxlan");
    let a = cluster.add_pod(1, "a");
    let c = cluster.add_pod(2, "c");
    let (client, server, ip) = (a.netns.clone(), c.netns.clone(), c.ip);
    let stream =
        std::thread::spawn(move || iperf3_tcp(&client, &server, ip, Duration::from_secs(4)));
    std::thread::sleep(Duration::from_millis(800));
    for i in [1, 2] {
        cluster.kill_agent(i);
    }
    std::thread::sleep(Duration::from_millis(300));
    for i in [1, 2] {
        cluster.start_agent(i);
    }
    let report = stream
        .join()
        .expect("iperf3 thread")
        .expect("the stream completed without error");
    assert!(report.received_bytes > 0, "{report:?}");
    // Restarted agents restored the host list they were given (names, their own entry), and
    // serve new pods.
    let hosts: Value = serde_json::from_str(
        &api(&cluster.node(1).socket, "GET", "/v1/hosts", None)
            .expect("api")
            .1,
    )
    .expect("json");
    let names: Vec<&str> = hosts
        .as_array()
        .expect("a list")
        .iter()
        .filter_map(|h| h["name"].as_str())
        .collect();
    assert_eq!(names, ["h1", "h2"], "the host list restored: {hosts}");
    let b = cluster.add_pod(1, "b");
    assert_eq!(
        ping(&b.netns, c.ip, 2, Duration::from_millis(20))
            .expect("ping")
            .received,
        2
    );
}

#[test]
#[cfg_attr(
    not(feature = "privileged"),
    ignore = "privileged: root + BPF + netns; run scripts/test.sh"
)]
fn portmap_chained_after_slipway_reaches_the_pod() {
    let cluster = Cluster::new(2, "vxlan");
    let sandbox = cluster.sandbox("web");
    let netns_path = netns::path(sandbox.name()).display().to_string();
    let id = format!("web-{}", cluster.world.name());
    // What a libcni runtime does with a conflist [slipway, portmap]: each plugin gets the list's
    // name and version (1.0.0: Debian's reference plugins speak no later one), and the previous
    // plugin's result as prevResult.
    let mut conf = cluster.conf(1);
    conf["cniVersion"] = json!("1.0.0");
    let first = cluster
        .cni(1, "ADD", &id, Some(&netns_path), &conf)
        .expect_ok("slipway ADD");
    assert_eq!(first["cniVersion"], "1.0.0");
    let portmap_conf = json!({
        "cniVersion": "1.0.0",
        "name": common::NETWORK,
        "type": "portmap",
        "capabilities": { "portMappings": true },
        "runtimeConfig": { "portMappings": [{ "hostPort": 8080, "containerPort": 80, "protocol": "tcp" }] },
        "prevResult": first,
    });
    let portmap = std::path::Path::new("/usr/lib/cni/portmap");
    let second = cluster
        .exec_plugin(1, portmap, "ADD", &id, Some(&netns_path), &portmap_conf)
        .expect_ok("portmap ADD");
    assert_eq!(
        second["ips"], first["ips"],
        "portmap passes Slipway's result through"
    );

    let _server = sandbox
        .spawn(&["sh", "-c", "echo slipway-pod | nc -N -l 80"])
        .expect("server");
    sandbox
        .wait_tcp_listen(80, Duration::from_secs(5))
        .expect("listening");
    let host1 = cluster.node(1).address.to_string();
    let reply = cluster
        .node(2)
        .netns
        .run(&["nc", "-N", "-w", "3", &host1, "8080"])
        .expect("nc to the host port");
    assert_eq!(reply.trim(), "slipway-pod");

    cluster
        .exec_plugin(1, portmap, "DEL", &id, Some(&netns_path), &portmap_conf)
        .expect_ok("portmap DEL");
    cluster
        .cni(1, "DEL", &id, Some(&netns_path), &conf)
        .expect_ok("slipway DEL");
}

#[test]
#[cfg_attr(
    not(feature = "privileged"),
    ignore = "privileged: root + BPF + netns; run scripts/test.sh"
)]
fn traffic_leaving_the_cluster_is_masqueraded_to_the_host_address() {
    let cluster = Cluster::new(1, "native");
    let outside = cluster
        .world
        .add_outside("internet", 250)
        .expect("outside host");
    let a = cluster.add_pod(1, "a");
    // nc -v reports the peer it accepted on stderr, which the shell sends to our stdout.
    let server = outside
        .spawn(&[
            "sh",
            "-c",
            "echo hello | nc -n -v -N -l 9000 2>&1 >/dev/null",
        ])
        .expect("server");
    outside
        .wait_tcp_listen(9000, Duration::from_secs(5))
        .expect("listening");
    let reply = a
        .netns
        .run(&["nc", "-N", "-w", "3", "10.99.0.250", "9000"])
        .expect("pod to outside");
    assert_eq!(reply.trim(), "hello");
    let peer = server.wait().expect("server log");
    let host = cluster.node(1).address;
    assert!(
        peer.contains(&format!("received on {host} ")),
        "outside saw {peer:?}, not the host address {host}"
    );
    assert!(
        !peer.contains(&a.ip.to_string()),
        "the pod address leaked: {peer:?}"
    );
}

#[test]
#[cfg_attr(
    not(feature = "privileged"),
    ignore = "privileged: root + BPF + netns; run scripts/test.sh"
)]
fn the_agent_exports_datapath_counters_as_prometheus_metrics() {
    let cluster = Cluster::new(1, "vxlan");
    let a = cluster.add_pod(1, "a");
    let b = cluster.add_pod(1, "b");
    assert_eq!(
        ping(&a.netns, b.ip, 5, Duration::from_millis(10))
            .expect("ping")
            .received,
        5
    );
    let (code, text) = api(&cluster.node(1).socket, "GET", "/metrics", None).expect("metrics");
    assert_eq!(code, 200);
    let forwarded: u64 = text
        .lines()
        .filter(|l| {
            l.starts_with("slipway_datapath_packets_total{")
                && l.contains("reason=\"redirect_peer\"")
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum();
    assert!(
        forwarded >= 10,
        "5 requests and 5 replies redirected, metrics say {forwarded}:\n{text}"
    );
    assert!(
        text.contains("# TYPE slipway_datapath_bytes counter"),
        "{text}"
    );
}
