//! The datapath fed by a real Kubernetes API: agents of a CNI test cluster (hosts in network
//! namespaces) run with `--cluster-kubeconfig` against a real `slipway supervisor`, and a kube
//! client writes upstream kinds to it. Nodes route pod blocks between hosts; a Service with an
//! EndpointSlice is reached at its ClusterIP and NodePort, and an endpoint marked not ready
//! leaves it; a NetworkPolicy is enforced and named in the flows; the local API refuses PUTs;
//! a restarted agent comes back to the same state. The time from each API write to the agent's
//! state and to traffic behaving is printed (no assertion on it; a probe that must fail waits
//! out curl's 1 s timeout, which the figure includes).
//! Privileged (root, BPF, netns): run by scripts/test.sh.

#[path = "../../cni/tests/common/mod.rs"]
mod common;
#[path = "common/mod.rs"]
mod sup;

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{Cluster, Pod, api, serve_name};
use k8s_openapi::api::core::v1::{Node, Pod as KubePod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use serde_json::{Value, json};
use slipway_dataplane::world::Netns;

const WAIT: Duration = Duration::from_secs(30);

/// Forwards `127.0.0.1:<port>` inside each host's namespace to the supervisor on the test's
/// loopback: the listening socket is made in the namespace, the connections to the supervisor
/// in the test's own, so the agents reach the API at an address its certificate names.
fn forward_into(rt: &tokio::runtime::Runtime, netns: &Netns, to: std::net::SocketAddr) -> u16 {
    let listener = slipway_dataplane::netns::run_in(netns.name(), || {
        std::net::TcpListener::bind("127.0.0.1:0")
    })
    .expect("enter the host's namespace")
    .expect("listen in the host's namespace");
    listener.set_nonblocking(true).expect("nonblocking");
    let port = listener.local_addr().expect("address").port();
    let _guard = rt.enter();
    let listener = tokio::net::TcpListener::from_std(listener).expect("tokio listener");
    rt.spawn(async move {
        while let Ok((mut inbound, _)) = listener.accept().await {
            tokio::spawn(async move {
                if let Ok(mut outbound) = tokio::net::TcpStream::connect(to).await {
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                }
            });
        }
    });
    port
}

/// The admin kubeconfig with its server moved to `127.0.0.1:<port>`.
fn kubeconfig_at(sup: &sup::Supervisor, port: u16, path: &Path) -> PathBuf {
    let text = std::fs::read_to_string(sup.kubeconfig()).expect("admin kubeconfig");
    assert!(text.contains(&sup.url), "the kubeconfig names {}", sup.url);
    std::fs::write(
        path,
        text.replace(&sup.url, &format!("https://127.0.0.1:{port}")),
    )
    .expect("write kubeconfig");
    path.to_path_buf()
}

/// What `pod` gets from `url` (trimmed), or `None` when the request fails.
fn get(pod: &Pod, url: &str) -> Option<String> {
    pod.netns
        .run(&["curl", "-s", "-m", "1", url])
        .ok()
        .map(|s| s.trim().to_owned())
}

/// Polls `f` until it holds; returns how long that took since `since`.
fn until(what: &str, since: Instant, mut f: impl FnMut() -> bool) -> Duration {
    let deadline = Instant::now() + WAIT;
    loop {
        if f() {
            return since.elapsed();
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn agent_get(cluster: &Cluster, i: usize, path: &str) -> Value {
    let (code, body) = api(&cluster.node(i).socket, "GET", path, None).expect("agent api");
    assert_eq!(code, 200, "GET {path}: {body}");
    serde_json::from_str(&body).expect("json")
}

fn node_object(name: &str, block: &str, address: Ipv4Addr) -> (Node, Value) {
    let node: Node = serde_json::from_value(json!({
        "metadata": {"name": name},
        "spec": {"podCIDR": block},
    }))
    .expect("node");
    let status = json!({"status": {"addresses": [
        {"type": "InternalIP", "address": address.to_string()},
        {"type": "Hostname", "address": name},
    ]}});
    (node, status)
}

/// A Pod object for a test pod: its name, labels and address (the status a kubelet writes).
fn pod_object(name: &str, app: &str, node: &str) -> KubePod {
    serde_json::from_value(json!({
        "metadata": {"name": name, "namespace": "default", "labels": {"app": app}},
        "spec": {"nodeName": node, "containers": [{"name": "c", "image": "none"}]},
    }))
    .expect("pod")
}

#[test]
#[cfg_attr(
    not(feature = "privileged"),
    ignore = "privileged: root + BPF + netns; run scripts/test.sh"
)]
fn the_datapath_follows_the_cluster_api() {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let sup = sup::Supervisor::start("feed");
    let client = rt.block_on(sup.admin());
    let to: std::net::SocketAddr = sup
        .url
        .trim_start_matches("https://")
        .parse()
        .expect("the supervisor's address");

    let mut cluster = Cluster::new(2, "vxlan");
    // The harness told the agents of every host over the local API: forget that, so what
    // routes below comes from the cluster API alone.
    for i in 1..=2 {
        let (code, body) = api(
            &cluster.node(i).socket,
            "PUT",
            "/v1/hosts",
            Some(&json!([])),
        )
        .expect("api");
        assert_eq!(code, 200, "{body}");
    }
    let mut flags: Vec<Vec<String>> = Vec::new();
    for i in 1..=2 {
        let port = forward_into(&rt, &cluster.node(i).netns, to);
        let kubeconfig = kubeconfig_at(&sup, port, &cluster.dir.join(format!("h{i}.kubeconfig")));
        flags.push(vec![
            "--cluster-kubeconfig".into(),
            kubeconfig.display().to_string(),
            "--node-name".into(),
            format!("h{i}"),
        ]);
    }
    let start_fed = |cluster: &mut Cluster, i: usize| {
        cluster.kill_agent(i);
        let args: Vec<&str> = flags[i - 1].iter().map(String::as_str).collect();
        cluster.start_agent_with(i, &args);
    };
    for i in 1..=2 {
        start_fed(&mut cluster, i);
    }
    let fed = |cluster: &Cluster, i: usize| {
        cluster
            .agent_log(i)
            .contains("every kind listed: the datapath follows the cluster API")
    };
    until("both agents fed", Instant::now(), || {
        fed(&cluster, 1) && fed(&cluster, 2)
    });
    assert_eq!(agent_get(&cluster, 1, "/v1/hosts"), json!([]));

    let a = cluster.add_pod(1, "a");
    let denied = cluster.add_pod(1, "d");
    let b = cluster.add_pod(2, "b");
    let c = cluster.add_pod(1, "c");
    let _servers = [
        serve_name(&b.netns, &cluster.dir, "b", 8080),
        serve_name(&c.netns, &cluster.dir, "c", 8080),
    ];
    let b_url = format!("http://{}:8080/", b.ip);

    // (4) The local API only reads while fed.
    let (code, body) = api(
        &cluster.node(1).socket,
        "PUT",
        "/v1/hosts",
        Some(&json!([])),
    )
    .expect("api");
    assert_eq!(code, 409, "{body}");
    assert!(body.contains("--cluster-kubeconfig"), "{body}");
    for path in [
        "/v1/services",
        "/v1/pods",
        "/v1/namespaces",
        "/v1/networkpolicies",
    ] {
        let (code, body) =
            api(&cluster.node(1).socket, "PUT", path, Some(&json!([]))).expect("api");
        assert_eq!(code, 409, "PUT {path}: {body}");
    }
    let (code, _) = api(&cluster.node(1).socket, "GET", "/v1/status", None).expect("api");
    assert_eq!(code, 200);

    // (1) Nodes with a podCIDR and an InternalIP: pod blocks route between the hosts.
    let nodes: Api<Node> = Api::all(client.clone());
    let written = Instant::now();
    for i in 1..=2 {
        let n = cluster.node(i);
        let (node, status) = node_object(&format!("h{i}"), &n.block, n.address);
        rt.block_on(nodes.create(&PostParams::default(), &node))
            .expect("create Node");
        rt.block_on(nodes.patch_status(
            &format!("h{i}"),
            &PatchParams::default(),
            &Patch::Merge(status),
        ))
        .expect("Node status");
    }
    let took = until("a pod on host 1 reaching a pod on host 2", written, || {
        get(&a, &b_url).as_deref() == Some("b")
    });
    println!("(1) Nodes written -> pods route across hosts: {took:?}");
    let hosts = agent_get(&cluster, 1, "/v1/hosts");
    assert_eq!(hosts.as_array().map(Vec::len), Some(1), "{hosts}");
    assert_eq!(hosts[0]["name"], "h2", "host 1 routes to h2 only: {hosts}");

    let deleted = Instant::now();
    rt.block_on(nodes.delete("h2", &DeleteParams::default()))
        .expect("delete Node h2");
    let took = until("host 1 forgetting h2", deleted, || {
        agent_get(&cluster, 1, "/v1/hosts") == json!([]) && get(&a, &b_url).is_none()
    });
    println!("(1) Node h2 deleted -> its pods unreachable: {took:?}");
    let (node, status) = node_object("h2", &cluster.node(2).block, cluster.node(2).address);
    rt.block_on(nodes.create(&PostParams::default(), &node))
        .expect("create Node h2 again");
    rt.block_on(nodes.patch_status("h2", &PatchParams::default(), &Patch::Merge(status)))
        .expect("Node status");
    until("h2 routed again", Instant::now(), || {
        get(&a, &b_url).as_deref() == Some("b")
    });
    // A Node the agent cannot route is left out, named in the log; the rest still routes.
    let (node, status) = node_object("h9", "10.245.0.0/24", Ipv4Addr::new(10, 99, 0, 9));
    rt.block_on(nodes.create(&PostParams::default(), &node))
        .expect("create Node h9");
    rt.block_on(nodes.patch_status("h9", &PatchParams::default(), &Patch::Merge(status)))
        .expect("Node status");
    until("h9 skipped with its reason", Instant::now(), || {
        cluster
            .agent_log(1)
            .contains("Node h9: spec.podCIDR 10.245.0.0/24 is not inside the pod CIDR")
    });
    let metrics = api(&cluster.node(1).socket, "GET", "/metrics", None)
        .expect("metrics")
        .1;
    assert!(
        metrics.contains("slipway_feed_skipped_objects{list=\"hosts\"} 1"),
        "{metrics}"
    );
    let hosts = agent_get(&cluster, 1, "/v1/hosts");
    assert_eq!(hosts.as_array().map(Vec::len), Some(1), "{hosts}");
    assert_eq!(get(&a, &b_url).as_deref(), Some("b"));

    // (2) A Service and its EndpointSlice: ClusterIP from a pod, NodePort from outside.
    let services: Api<Service> = Api::namespaced(client.clone(), "default");
    let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), "default");
    let outside = cluster.world.add_outside("client", 250).expect("outside");
    let svc: Service = serde_json::from_value(json!({
        "metadata": {"name": "web"},
        "spec": {"type": "NodePort", "ports": [
            {"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"}]},
    }))
    .expect("service");
    let written = Instant::now();
    let svc = rt
        .block_on(services.create(&PostParams::default(), &svc))
        .expect("create Service");
    let slice = |c_ready: bool| -> EndpointSlice {
        serde_json::from_value(json!({
            "metadata": {"name": "web-1", "labels": {"kubernetes.io/service-name": "web"}},
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
            "endpoints": [
                {"addresses": [b.ip.to_string()], "conditions": {"ready": true}},
                {"addresses": [c.ip.to_string()], "conditions": {"ready": c_ready}},
            ],
        }))
        .expect("slice")
    };
    rt.block_on(slices.create(&PostParams::default(), &slice(true)))
        .expect("create EndpointSlice");
    let spec = svc.spec.expect("spec");
    let cluster_ip = spec.cluster_ip.expect("a ClusterIP");
    let node_port = spec.ports.expect("ports")[0].node_port.expect("a nodePort");
    let ip_url = format!("http://{cluster_ip}/");
    let took = until("the Service in agent 1's list", written, || {
        agent_get(&cluster, 1, "/v1/services")[0]["endpoints"]
            .as_array()
            .is_some_and(|e| e.len() == 2)
    });
    println!("(2) Service + EndpointSlice written -> in the agent's service list: {took:?}");
    let took = until(
        "the ClusterIP answering from both backends",
        written,
        || {
            let mut seen = std::collections::BTreeSet::new();
            for _ in 0..12 {
                seen.extend(get(&a, &ip_url));
            }
            seen.len() == 2
        },
    );
    println!("(2) Service + EndpointSlice written -> ClusterIP serves both backends: {took:?}");
    let node_url = format!("http://{}:{node_port}/", cluster.node(1).address);
    until("the NodePort answering from outside", written, || {
        outside
            .run(&["curl", "-s", "-m", "1", &node_url])
            .is_ok_and(|r| matches!(r.trim(), "b" | "c"))
    });
    let agent_services = agent_get(&cluster, 1, "/v1/services");
    assert_eq!(agent_services[0]["name"], "default/web", "{agent_services}");
    assert_eq!(agent_services[0]["ports"][0]["targetPort"], 8080);

    let written = Instant::now();
    rt.block_on(slices.replace("web-1", &PostParams::default(), &{
        let mut s = slice(false);
        s.metadata.resource_version = rt
            .block_on(slices.get("web-1"))
            .expect("slice")
            .metadata
            .resource_version;
        s
    }))
    .expect("mark c not ready");
    let took = until("c leaving the service", written, || {
        agent_get(&cluster, 1, "/v1/services")[0]["endpoints"] == json!([b.ip.to_string()])
    });
    println!("(2) endpoint marked not ready -> out of the service: {took:?}");
    for n in 0..10 {
        assert_eq!(get(&a, &ip_url).as_deref(), Some("b"), "request {n}");
    }

    // (3) A NetworkPolicy: b takes connections from app=client only.
    let pods: Api<KubePod> = Api::namespaced(client.clone(), "default");
    for (name, app, pod) in [
        ("a", "client", &a),
        ("d", "other", &denied),
        ("b", "web", &b),
    ] {
        let node = format!("h{}", pod.host);
        rt.block_on(pods.create(&PostParams::default(), &pod_object(name, app, &node)))
            .expect("create Pod");
        rt.block_on(pods.patch_status(
            name,
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"phase": "Running", "podIP": pod.ip.to_string()}})),
        ))
        .expect("Pod status");
    }
    until("the Pods in the policy state", Instant::now(), || {
        agent_get(&cluster, 2, "/v1/pods").as_array().map(Vec::len) == Some(3)
    });
    let policies: Api<NetworkPolicy> = Api::namespaced(client.clone(), "default");
    let policy: NetworkPolicy = serde_json::from_value(json!({
        "metadata": {"name": "web-from-client"},
        "spec": {
            "podSelector": {"matchLabels": {"app": "web"}},
            "policyTypes": ["Ingress"],
            "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "client"}}}],
                         "ports": [{"port": 8080, "protocol": "TCP"}]}],
        },
    }))
    .expect("policy");
    assert_eq!(
        get(&denied, &b_url).as_deref(),
        Some("b"),
        "open before the policy"
    );
    let written = Instant::now();
    rt.block_on(policies.create(&PostParams::default(), &policy))
        .expect("create NetworkPolicy");
    let took = until("the policy in agent 2's state", written, || {
        agent_get(&cluster, 2, "/v1/networkpolicies")
            .as_array()
            .is_some_and(|p| p.len() == 1)
    });
    println!("(3) NetworkPolicy written -> in the agent's policy state: {took:?}");
    let took = until("d denied, a allowed", written, || {
        get(&denied, &b_url).is_none() && get(&a, &b_url).as_deref() == Some("b")
    });
    println!("(3) NetworkPolicy written -> enforced: {took:?}");
    let (code, flows) = api(&cluster.node(2).socket, "GET", "/v1/flows", None).expect("flows");
    assert_eq!(code, 200, "{flows}");
    let flows: Vec<Value> = flows
        .lines()
        .map(|l| serde_json::from_str(l).expect("a flow"))
        .collect();
    let named = |verdict: &str, src: Ipv4Addr| {
        flows.iter().any(|f| {
            f["verdict"] == verdict
                && f["src"]["ip"] == src.to_string()
                && f["dst"]["ip"] == b.ip.to_string()
                && (f["policy"] == "default/web-from-client"
                    || f["policies"]
                        .as_array()
                        .is_some_and(|p| p.iter().any(|p| p == "default/web-from-client")))
        })
    };
    assert!(
        named("allow", a.ip),
        "no allow flow names the policy: {flows:?}"
    );
    assert!(
        named("deny", denied.ip),
        "no deny flow names the policy: {flows:?}"
    );
    let metrics = api(&cluster.node(2).socket, "GET", "/metrics", None)
        .expect("metrics")
        .1;
    for line in [
        "slipway_feed_applies_total{list=\"networkpolicies\",result=\"ok\"}",
        "slipway_feed_objects{kind=\"pods\"} 3",
    ] {
        assert!(metrics.contains(line), "{line} missing:\n{metrics}");
    }

    // (5) A restarted agent comes back to the same state, and traffic behaves as before.
    let before: Vec<Value> = [
        "/v1/hosts",
        "/v1/services",
        "/v1/pods",
        "/v1/networkpolicies",
    ]
    .iter()
    .map(|p| agent_get(&cluster, 2, p))
    .collect();
    // Restarted without --host-block: it reads its Node's spec.podCIDR, as the DaemonSet's
    // agent on every node does.
    cluster.kill_agent(2);
    let args: Vec<&str> = flags[1].iter().map(String::as_str).collect();
    cluster.start_agent_from_node(2, &args);
    until("agent 2 fed again", Instant::now(), || fed(&cluster, 2));
    assert_eq!(
        agent_get(&cluster, 2, "/v1/status")["hostBlock"],
        json!(cluster.node(2).block)
    );
    let after: Vec<Value> = [
        "/v1/hosts",
        "/v1/services",
        "/v1/pods",
        "/v1/networkpolicies",
    ]
    .iter()
    .map(|p| agent_get(&cluster, 2, p))
    .collect();
    assert_eq!(after, before, "the restarted agent's state");
    assert_eq!(get(&a, &b_url).as_deref(), Some("b"));
    assert_eq!(get(&denied, &b_url), None);
    let log = cluster.agent_log(2);
    assert!(log.contains("applied from the cluster API"), "{log}");
    let restarted = log
        .rsplit("slipway agent: ready")
        .next()
        .unwrap_or_default();
    assert!(
        !restarted.contains("applied from the cluster API"),
        "the restarted agent re-applied an unchanged list:\n{restarted}"
    );

    // (6) The API goes away: the watches fail and retry, the datapath keeps its state.
    let state = |cluster: &Cluster| -> Vec<Value> {
        [
            "/v1/hosts",
            "/v1/services",
            "/v1/pods",
            "/v1/networkpolicies",
        ]
        .iter()
        .map(|p| agent_get(cluster, 1, p))
        .collect()
    };
    let before = state(&cluster);
    drop(sup);
    until("agent 1 noticing the API is gone", Instant::now(), || {
        cluster
            .agent_log(1)
            .contains("watching the cluster API failed")
    });
    assert_eq!(state(&cluster), before, "agent 1's state without the API");
    assert_eq!(get(&a, &b_url).as_deref(), Some("b"));
    assert_eq!(get(&a, &ip_url).as_deref(), Some("b"));
    assert_eq!(get(&denied, &b_url), None);
}
