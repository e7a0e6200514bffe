//! Services without kube-proxy: a pod reaches a ClusterIP through socket-level translation
//! (cgroup connect4 on the host's cgroup), or, outside that cgroup (a runtime's pods), through
//! per-packet translation at its veth; a client outside the cluster reaches a NodePort
//! through TC translation on the host's underlay device, connections spread over backends on
//! every host, and no iptables or nftables rule is created for any of it.
//! Privileged (root, BPF, netns, cgroups): run by scripts/test.sh.

mod common;

use std::collections::BTreeSet;

use std::net::{Ipv4Addr, UdpSocket};
use std::time::Duration;

use common::probe::{PodNs, Port, Servers};
use common::{Cluster, api, metric, serve_name};
use serde_json::json;

const CLUSTER_IP: &str = "10.96.0.10";

fn ruleset(cluster: &Cluster, i: usize) -> String {
    cluster
        .node(i)
        .netns
        // Stateless: the rules without their counters' values.
        .run(&["nft", "--stateless", "list", "ruleset"])
        .expect("nft")
}

#[test]
#[cfg_attr(
    not(feature = "privileged"),
    ignore = "privileged: root + BPF + netns; run scripts/test.sh"
)]
fn clusterip_from_pods_and_nodeport_from_outside_reach_every_backend() {
    let cluster = Cluster::new(3, "vxlan");
    let backends: Vec<_> = (1..=3)
        .map(|i| cluster.add_pod(i, &format!("be{i}")))
        .collect();
    let _servers: Vec<_> = backends
        .iter()
        .enumerate()
        .map(|(i, pod)| serve_name(&pod.netns, &cluster.dir, &format!("be{}", i + 1), 8080))
        .collect();
    let client = cluster.add_pod(1, "client");
    let outside = cluster.world.add_outside("internet", 250).expect("outside");
    let rules_before: Vec<String> = (1..=3).map(|i| ruleset(&cluster, i)).collect();

    let services = json!([{
        "name": "web",
        "clusterIP": CLUSTER_IP,
        "ports": [{ "port": 80, "protocol": "TCP", "targetPort": 8080, "nodePort": 30080 }],
        "endpoints": backends.iter().map(|b| b.ip.to_string()).collect::<Vec<_>>(),
    }]);
    for node in &cluster.nodes {
        let (code, body) = api(&node.socket, "PUT", "/v1/services", Some(&services)).expect("api");
        assert_eq!(code, 200, "{body}");
    }
    let all: BTreeSet<String> = ["be1", "be2", "be3"]
        .iter()
        .map(|s| s.to_string())
        .collect();

    // Pod -> ClusterIP: the client runs in host 1's cgroup, where connect() is translated.
    let url = format!("http://{CLUSTER_IP}/");
    let mut seen = BTreeSet::new();
    for n in 0..45 {
        let reply = cluster
            .node(1)
            .cgroup
            .run(&client.netns, &["curl", "-s", "-m", "3", &url])
            .unwrap_or_else(|e| panic!("connection {n} to the ClusterIP failed: {e}"));
        seen.insert(reply.trim().to_owned());
    }
    assert_eq!(seen, all, "45 connections spread over all three backends");

    // Outside -> NodePort on host 1 and on host 2: backends local and remote to each.
    for host in [1, 2] {
        let url = format!("http://{}:30080/", cluster.node(host).address);
        let mut seen = BTreeSet::new();
        for n in 0..45 {
            let reply = outside
                .run(&["curl", "-s", "-m", "3", &url])
                .unwrap_or_else(|e| panic!("connection {n} to host {host}'s NodePort failed: {e}"));
            seen.insert(reply.trim().to_owned());
        }
        assert_eq!(seen, all, "NodePort on host {host} reaches every backend");
    }

    let rules_after: Vec<String> = (1..=3).map(|i| ruleset(&cluster, i)).collect();
    assert_eq!(
        rules_after, rules_before,
        "services added iptables/nftables rules"
    );

    // Invalid service lists are refused whole, each bad field named.
    let bad = json!([{ "name": "bad", "clusterIP": "10.244.9.9", "ports": [{ "port": 0, "protocol": "SCTP", "targetPort": 80, "nodePort": 80 }], "endpoints": ["192.0.2.1"] }]);
    let (code, body) =
        api(&cluster.node(1).socket, "PUT", "/v1/services", Some(&bad)).expect("api");
    assert_eq!(code, 422, "{body}");
    for field in [
        "services[0].clusterIP",
        "ports[0].port",
        "ports[0].protocol",
        "ports[0].nodePort",
        "services[0].endpoints[0]",
    ] {
        assert!(body.contains(field), "{field} not named in {body}");
    }
    let reply = cluster
        .node(1)
        .cgroup
        .run(&client.netns, &["curl", "-s", "-m", "3", &url])
        .expect("still served");
    assert!(all.contains(reply.trim()));
}

const EVENTS: &str = "slipway_datapath_service_events_total";

#[test]
#[cfg_attr(
    not(feature = "privileged"),
    ignore = "privileged: root + BPF + netns; run scripts/test.sh"
)]
fn clusterip_from_a_pod_outside_the_agents_cgroup_is_translated_per_packet() {
    let cluster = Cluster::new(2, "vxlan");
    // One backend on the client's host (replies come back through its veth), one on the
    // other host (replies come back through the VXLAN device).
    let backends: Vec<_> = (1..=2)
        .map(|i| cluster.add_pod(i, &format!("be{i}")))
        .collect();
    let _servers: Vec<_> = backends
        .iter()
        .enumerate()
        .map(|(i, pod)| serve_name(&pod.netns, &cluster.dir, &format!("be{}", i + 1), 8080))
        .collect();
    let client = cluster.add_pod(1, "client");
    let services = json!([{
        "name": "web",
        "clusterIP": CLUSTER_IP,
        "ports": [{ "port": 80, "protocol": "TCP", "targetPort": 8080 }],
        "endpoints": backends.iter().map(|b| b.ip.to_string()).collect::<Vec<_>>(),
    }, {
        "name": "dns",
        "clusterIP": CLUSTER_IP,
        "ports": [{ "port": 53, "protocol": "UDP", "targetPort": 5353 }],
        "endpoints": [backends[1].ip.to_string()],
    }, {
        "name": "self",
        "clusterIP": "10.96.0.11",
        "ports": [{ "port": 80, "protocol": "TCP", "targetPort": 8080 }],
        "endpoints": [backends[0].ip.to_string()],
    }]);
    for node in &cluster.nodes {
        let (code, body) = api(&node.socket, "PUT", "/v1/services", Some(&services)).expect("api");
        assert_eq!(code, 200, "{body}");
    }
    let url = format!("http://{CLUSTER_IP}/");
    let packet = |c: &Cluster| metric(c, 1, EVENTS, "event=\"packet_tcp\"");
    let socket = |c: &Cluster| metric(c, 1, EVENTS, "event=\"connect_tcp\"");

    // The test's own cgroup is not the agent's: what a runtime's pod is.
    let (packet_before, socket_before) = (packet(&cluster), socket(&cluster));
    let mut seen = BTreeSet::new();
    for n in 0..30 {
        let reply = client
            .netns
            .run(&["curl", "-s", "-m", "3", &url])
            .unwrap_or_else(|e| panic!("connection {n} from outside the cgroup failed: {e}"));
        seen.insert(reply.trim().to_owned());
    }
    assert_eq!(
        seen,
        BTreeSet::from(["be1".to_owned(), "be2".to_owned()]),
        "30 connections reach the local and the remote backend"
    );
    assert_eq!(
        packet(&cluster) - packet_before,
        30,
        "each connection translated per packet"
    );
    assert_eq!(socket(&cluster), socket_before, "no socket was translated");

    // UDP: the datagram reaches the backend on the other host; its answer comes back from
    // the service address the client sent to.
    let _echo = Servers::start(&PodNs::open(backends[1].netns.name()), &[Port::udp(5353)]);
    let udp_before = metric(&cluster, 1, EVENTS, "event=\"packet_udp\"");
    let (from, answer) = PodNs::open(client.netns.name()).run(|| {
        let socket = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).expect("bind");
        socket
            .set_read_timeout(Some(Duration::from_millis(500)))
            .expect("timeout");
        let mut buf = [0u8; 64];
        // Datagrams may be lost: a few tries, each waiting for its answer.
        for _ in 0..6 {
            socket
                .send_to(b"query", (CLUSTER_IP.parse::<Ipv4Addr>().expect("ip"), 53))
                .expect("send");
            if let Ok((n, from)) = socket.recv_from(&mut buf) {
                return (from, buf[..n].to_vec());
            }
        }
        panic!("no answer from the UDP service");
    });
    assert_eq!(answer, b"query");
    assert_eq!(from.to_string(), format!("{CLUSTER_IP}:53"));
    assert_eq!(
        metric(&cluster, 1, EVENTS, "event=\"packet_udp\"") - udp_before,
        1
    );

    // A pod that is the service's only backend reaches itself through it (hairpin).
    let reply = backends[0]
        .netns
        .run(&["curl", "-s", "-m", "3", "http://10.96.0.11/"])
        .expect("a backend reaches itself through its service");
    assert_eq!(reply.trim(), "be1");

    // Inside the agent's cgroup the socket path stays the one taken.
    let packet_before = packet(&cluster);
    for n in 0..10 {
        cluster
            .node(1)
            .cgroup
            .run(&client.netns, &["curl", "-s", "-m", "3", &url])
            .unwrap_or_else(|e| panic!("connection {n} from inside the cgroup failed: {e}"));
    }
    assert_eq!(
        socket(&cluster) - socket_before,
        10,
        "translated at connect()"
    );
    assert_eq!(
        packet(&cluster),
        packet_before,
        "nothing left for the veth to translate"
    );
}
