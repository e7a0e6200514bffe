//! The node around the pods: an agent restart under a running stream, chained plugins (Debian's
//! portmap after Slipway), pods reaching hostPorts and NodePorts through a node's address (on
//! their own node: the hairpin; and on another), egress masquerade to a machine outside the
//! cluster, and the agent's metrics, table sizes among them. Privileged (root, BPF, netns): run by scripts/test.sh.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::{Cluster, api, metric, serve_name};
use serde_json::{Value, json};
use slipway_dataplane::netns;
use slipway_dataplane::world::traffic::{iperf3_tcp, ping};

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
    // The stream never stopped: every reporting interval, the ones spanning the kill and the
    // restart included, moved data.
    assert!(
        report.interval_bytes.len() >= 12,
        "4 s in 0.25 s intervals: {report:?}"
    );
    assert!(
        report.interval_bytes.iter().all(|&bytes| bytes > 0),
        "an interval at zero: the stream stalled during the restart: {:?}",
        report.interval_bytes
    );
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

/// ADDs pod `name` on host `i` with Slipway then Debian's portmap publishing `host_port` -> 80,
/// as a libcni runtime does with the conflist [slipway, portmap]. Returns the pod and the
/// portmap configuration (for DEL).
fn add_published_pod(
    cluster: &Cluster,
    i: usize,
    name: &str,
    host_port: u16,
) -> (common::Pod, Value) {
    let sandbox = cluster.sandbox(name);
    let netns_path = netns::path(sandbox.name()).display().to_string();
    let id = format!("{name}-{}", cluster.world.name());
    let mut conf = cluster.conf(i);
    conf["cniVersion"] = json!("1.0.0");
    let first = cluster
        .cni(i, "ADD", &id, Some(&netns_path), &conf)
        .expect_ok("slipway ADD");
    let portmap_conf = json!({
        "cniVersion": "1.0.0",
        "name": common::NETWORK,
        "type": "portmap",
        "capabilities": { "portMappings": true },
        "runtimeConfig": { "portMappings": [{ "hostPort": host_port, "containerPort": 80, "protocol": "tcp" }] },
        "prevResult": first,
    });
    cluster
        .exec_plugin(
            i,
            std::path::Path::new("/usr/lib/cni/portmap"),
            "ADD",
            &id,
            Some(&netns_path),
            &portmap_conf,
        )
        .expect_ok("portmap ADD");
    let ip = first["ips"][0]["address"]
        .as_str()
        .and_then(|a| a.split('/').next()?.parse().ok())
        .expect("pod address");
    let pod = common::Pod {
        netns: sandbox,
        container_id: id,
        host: i,
        ip,
        result: first,
    };
    (pod, portmap_conf)
}

#[test]
#[cfg_attr(
    not(feature = "privileged"),
    ignore = "privileged: root + BPF + netns; run scripts/test.sh"
)]
fn pods_reach_hostports_and_nodeports_through_node_addresses_on_any_node() {
    let cluster = Cluster::new(2, "vxlan");
    let (web, _portmap) = add_published_pod(&cluster, 1, "web", 8080);
    let _web_server = serve_name(&web.netns, &cluster.dir, "web", 80);
    let backends: Vec<_> = (1..=2)
        .map(|i| cluster.add_pod(i, &format!("be{i}")))
        .collect();
    let _servers: Vec<_> = backends
        .iter()
        .enumerate()
        .map(|(i, pod)| serve_name(&pod.netns, &cluster.dir, &format!("be{}", i + 1), 8080))
        .collect();
    let services = json!([{
        "name": "np",
        "clusterIP": "10.96.0.20",
        "ports": [{ "port": 80, "protocol": "TCP", "targetPort": 8080, "nodePort": 30080 }],
        "endpoints": backends.iter().map(|b| b.ip.to_string()).collect::<Vec<_>>(),
    }]);
    for node in &cluster.nodes {
        let (code, body) = api(&node.socket, "PUT", "/v1/services", Some(&services)).expect("api");
        assert_eq!(code, 200, "{body}");
    }
    // Clients outside the agents' cgroups (a runtime's pods): on web's node, and on the other.
    let same = cluster.add_pod(1, "same");
    let other = cluster.add_pod(2, "other");
    let node1 = cluster.node(1).address;
    let node2 = cluster.node(2).address;
    let get = |client: &common::Pod, url: &str| {
        client
            .netns
            .run(&["curl", "-s", "-m", "3", url])
            .unwrap_or_else(|e| panic!("{url} from {}: {e}", client.ip))
            .trim()
            .to_owned()
    };

    // hostPort: DNATed by portmap in the node's netfilter; the reply goes back through it.
    let stack_before = metric(
        &cluster,
        1,
        "slipway_datapath_packets_total",
        "reason=\"pass_stack_flow\"",
    );
    for client in [&same, &other] {
        for _ in 0..5 {
            assert_eq!(get(client, &format!("http://{node1}:8080/")), "web");
        }
    }
    assert!(
        metric(
            &cluster,
            1,
            "slipway_datapath_packets_total",
            "reason=\"pass_stack_flow\""
        ) > stack_before,
        "web's replies to the pod on its node went through the stack"
    );

    // NodePort: of the client's own node (translated at its veth) and of the other node.
    let all = BTreeSet::from(["be1".to_owned(), "be2".to_owned()]);
    for client in [&same, &other] {
        for node in [node1, node2] {
            let url = format!("http://{node}:30080/");
            let seen: BTreeSet<String> = (0..20).map(|_| get(client, &url)).collect();
            assert_eq!(seen, all, "{url} from {} reaches every backend", client.ip);
        }
    }
}

#[test]
#[cfg_attr(
    not(feature = "privileged"),
    ignore = "privileged: root + BPF + netns; run scripts/test.sh"
)]
fn table_sizes_come_from_agent_flags_and_show_in_metrics() {
    let mut cluster = Cluster::new(1, "native");
    let capacity = |c: &Cluster, table: &str| {
        metric(
            c,
            1,
            "slipway_datapath_table_capacity",
            &format!("table=\"{table}\""),
        )
    };
    assert!(
        capacity(&cluster, "policy_ct") >= 512 * 1024,
        "default conntrack"
    );
    // Flags take effect on maps the agent creates: a fresh bpffs directory.
    cluster.kill_agent(1);
    let bpffs = cluster.nodes[0].bpffs.clone();
    std::fs::remove_dir_all(&bpffs).expect("remove the node's pins");
    cluster.start_agent_with(
        1,
        &[
            "--ct-entries",
            "4096",
            "--nat-entries",
            "64",
            "--route-entries",
            "2",
        ],
    );
    assert_eq!(capacity(&cluster, "policy_ct"), 4096);
    for table in ["nat_flows", "nat_reverse", "stack_flows"] {
        assert_eq!(capacity(&cluster, table), 64, "{table}");
    }
    assert_eq!(capacity(&cluster, "routes"), 2);

    // 70 connections of a pod to a ClusterIP, each translated at its veth, each a new flow:
    // the NAT tables fill, and say so.
    let backend = cluster.add_pod(1, "be");
    let _server = serve_name(&backend.netns, &cluster.dir, "be", 8080);
    let client = cluster.add_pod(1, "client");
    let services = json!([{
        "name": "web", "clusterIP": "10.96.0.30",
        "ports": [{ "port": 80, "protocol": "TCP", "targetPort": 8080 }],
        "endpoints": [backend.ip.to_string()],
    }]);
    let (code, body) = api(
        &cluster.node(1).socket,
        "PUT",
        "/v1/services",
        Some(&services),
    )
    .expect("api");
    assert_eq!(code, 200, "{body}");
    for n in 0..70 {
        client
            .netns
            .run(&["curl", "-s", "-m", "3", "http://10.96.0.30/"])
            .unwrap_or_else(|e| panic!("connection {n}: {e}"));
    }
    let table = |name: &str, table: &str| metric(&cluster, 1, name, &format!("table=\"{table}\""));
    assert_eq!(table("slipway_datapath_table_entries", "nat_flows"), 64);
    assert_eq!(
        table("slipway_datapath_table_full_inserts_total", "nat_flows"),
        70 - 64
    );

    // Three other hosts do not fit two routes: refused, naming the table and the flag's value.
    let hosts: Vec<Value> = (1..=4)
        .map(|i| json!({ "name": format!("h{i}"), "address": format!("10.99.0.{i}"), "podBlock": format!("10.244.{i}.0/24") }))
        .collect();
    let (code, body) = api(
        &cluster.node(1).socket,
        "PUT",
        "/v1/hosts",
        Some(&Value::Array(hosts)),
    )
    .expect("api");
    assert_eq!(code, 500, "{body}");
    assert!(
        body.contains("table `routes` is full (2 entries)"),
        "{body}"
    );
    assert!(body.contains("--route-entries"), "{body}");
    let (_, status) = api(&cluster.node(1).socket, "GET", "/v1/status", None).expect("api");
    let status: Value = serde_json::from_str(&status).expect("json");
    assert_eq!(status["routes"], 0, "nothing half-written: {status}");

    // A bad flag is refused by name.
    let output = cluster
        .node(1)
        .netns
        .exec(&[
            common::slipway_binary().to_str().expect("utf-8"),
            "agent",
            "--pod-cidr",
            common::POD_CIDR,
            "--host-block",
            "10.244.1.0/24",
            "--ct-entries",
            "0",
        ])
        .expect("run agent");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("--ct-entries"), "{stderr}");
}
