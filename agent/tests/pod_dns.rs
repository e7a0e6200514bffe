//! Cluster DNS for pods: pods on a host with its own containerd resolve Services through the
//! node's DNS server and their search path, and the agent answers from its cluster API's
//! Services and EndpointSlices. Privileged (root, BPF, netns, containerd): run by
//! scripts/test.sh.

#[path = "../../cni/tests/common/mod.rs"]
mod common;
#[path = "common/pod_host.rs"]
mod pod_host;
#[path = "common/mod.rs"]
mod sup;

use std::time::{Duration, Instant};

use pod_host::*;

#[test]
#[cfg_attr(
    not(feature = "privileged"),
    ignore = "privileged: root + BPF + netns + containerd; run scripts/test.sh"
)]
fn pods_resolve_services_through_the_node_dns_and_its_search_path() {
    use kube::runtime::reflector;
    use kube::runtime::watcher::Event;
    use slipway_agent::dns::{DnsConfig, DnsServer};
    use slipway_agent::pods::dns::ClusterDns;

    let mut host = PodHost::start(Backoff::default());
    // The node's DNS server, as `slipway agent --dns-listen <underlay address>:53` runs it,
    // with its sockets bound in the host's network namespace; the Service store filled by hand.
    let node_ip = host.cluster.node(1).address;
    let netns = host.cluster.node(1).netns.name().to_owned();
    let listen = std::net::SocketAddr::new(node_ip.into(), 53);
    let (udp, tcp) = slipway_dataplane::netns::run_in(&netns, || {
        (
            std::net::UdpSocket::bind(listen),
            std::net::TcpListener::bind(listen),
        )
    })
    .expect("the host's netns");
    let (services, mut writer) = reflector::store();
    let web: k8s_openapi::api::core::v1::Service = serde_json::from_value(json!({
        "metadata": {"name": "web", "namespace": "default"},
        "spec": {"clusterIP": "10.96.0.10", "ports": [{"port": 80}]}
    }))
    .expect("service");
    writer.apply_watcher_event(&Event::Init);
    writer.apply_watcher_event(&Event::InitApply(web));
    writer.apply_watcher_event(&Event::InitDone);
    let config = DnsConfig {
        listen,
        domain: "cluster.local".into(),
        upstreams: Vec::new(),
        forward_timeout: Duration::from_secs(1),
    };
    let server = {
        let _runtime = host.rt.enter();
        DnsServer::from_std(
            config.clone(),
            udp.expect("bind udp"),
            tcp.expect("bind tcp"),
            services,
            None,
        )
        .expect("dns server")
    };
    let cri = host.rt.block_on(Cri::connect(&host.socket())).expect("cri");
    host.runner = Some(PodRunner::new(
        cri,
        RunnerConfig {
            log_root: host.dir.join("pods"),
            cgroup_parent: host.cgroup_parent.clone(),
            backoff: Backoff::default(),
            host_ip: None,
            probe_netns: None,
            dns: config.pod_dns(node_ip.into()),
            volume_root: host.dir.join("kubelet-pods"),
            csi: None,
        },
    ));
    assert_eq!(
        config.pod_dns(node_ip.into()),
        Some(ClusterDns {
            servers: vec![node_ip.into()],
            domain: "cluster.local".into()
        })
    );

    let client = pod(
        "lookup",
        json!({
            "restartPolicy": "Never",
            "containers": [{"name": "dns", "image": "busybox",
                "command": ["sh", "-c", "cat /etc/resolv.conf; echo FULL; \
                    nslookup -type=a web.default.svc.cluster.local; echo SHORT; \
                    nslookup -type=a web; echo END"]}],
        }),
    );
    let pods = vec![client.clone()];
    let status = host.wait(&pods, "lookup", Duration::from_secs(60), |s| {
        matches!(s.phase.as_deref(), Some("Succeeded" | "Failed"))
    });
    let log = std::fs::read_to_string(
        host.dir
            .join("pods")
            .join(format!("default_lookup_{}", uid(&client)))
            .join("dns/0.log"),
    )
    .unwrap_or_default();
    // CRI log lines: `<time> stdout F <text>`.
    let text: Vec<&str> = log
        .lines()
        .map(|l| l.splitn(4, ' ').nth(3).unwrap_or_default())
        .collect();
    let text = text.join("\n");
    assert_eq!(
        status.phase.as_deref(),
        Some("Succeeded"),
        "{text}\n{status:?}"
    );
    assert!(
        text.lines().any(|l| l
            .trim()
            .starts_with("search default.svc.cluster.local svc.cluster.local cluster.local")),
        "resolv.conf: {text}"
    );
    assert!(
        text.contains(&format!("nameserver {}", node_ip)),
        "resolv.conf: {text}"
    );
    assert!(text.contains("options ndots:5"), "resolv.conf: {text}");
    let (full, short) = text
        .split_once("SHORT")
        .expect("the script ran to its second lookup");
    assert!(
        full.contains("Address: 10.96.0.10"),
        "the full name: {full}"
    );
    assert!(
        short.contains("Address: 10.96.0.10"),
        "the short name through the search path: {short}"
    );
    let metrics = server.render_metrics();
    assert!(
        metrics.contains(r#"slipway_dns_queries_total{source="cluster",rcode="NOERROR"}"#),
        "{metrics}"
    );
    let _runtime = host.rt.enter();
    drop(server);
}

/// A blocking DNS question to `server` from the calling thread's network namespace.
fn dig(server: std::net::SocketAddr, name: &str) -> Option<hickory_proto::op::Message> {
    use hickory_proto::op::{Message, MessageType, OpCode, Query};
    use hickory_proto::rr::{Name, RecordType};
    use std::str::FromStr as _;
    let mut query = Message::new(0x5157, MessageType::Query, OpCode::Query);
    query.metadata.recursion_desired = true;
    query.add_query(Query::query(Name::from_str(name).ok()?, RecordType::A));
    let socket = std::net::UdpSocket::bind("0.0.0.0:0").ok()?;
    socket.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    socket.send_to(&query.to_vec().ok()?, server).ok()?;
    let mut buf = [0u8; 1500];
    let n = socket.recv(&mut buf).ok()?;
    Message::from_vec(&buf[..n]).ok()
}

/// `slipway agent --dns-listen` end to end: its reflectors over the cluster API (a supervisor
/// in the host's network namespace, where the agent reaches it), its server on the host's
/// address, names outside the zone forwarded (to a nameserver that is not there: SERVFAIL),
/// its counters on /metrics.
#[test]
#[cfg_attr(
    not(feature = "privileged"),
    ignore = "privileged: root + BPF + netns + containerd; run scripts/test.sh"
)]
fn the_agent_answers_cluster_dns_from_its_cluster_api() {
    use hickory_proto::op::ResponseCode;
    use hickory_proto::rr::RData;
    use k8s_openapi::api::core::v1::{Namespace, Service};
    use kube::api::{Api, PostParams};

    let mut cluster = Cluster::new(1, "vxlan");
    let dir = cluster.dir.join("containerd");
    let _reaper = ContainerdReaper(dir.clone());
    let netns = cluster.node(1).netns.name().to_owned();
    let node_ip = cluster.node(1).address;
    let sup = slipway_dataplane::netns::run_in(&netns, || sup::Supervisor::start("agent-dns"))
        .expect("the host's netns");
    // The host's resolv.conf of this test: a nameserver nobody answers at.
    let resolv = cluster.dir.join("resolv.conf");
    std::fs::write(&resolv, "nameserver 127.0.0.1\n").expect("resolv.conf");
    let listen = format!("{node_ip}:53");
    let conf_dir = cluster.dir.join("net.d");
    let bin_dir = cluster.cni_path.clone();
    let kubeconfig = sup.kubeconfig();
    let args = [
        "--containerd-dir",
        dir.to_str().expect("utf-8"),
        "--cni-conf-dir",
        conf_dir.to_str().expect("utf-8"),
        "--cni-bin-dir",
        bin_dir.to_str().expect("utf-8"),
        "--cluster-kubeconfig",
        kubeconfig.to_str().expect("utf-8"),
        "--node-name",
        "n1",
        "--dns-listen",
        &listen,
        "--dns-resolv-conf",
        resolv.to_str().expect("utf-8"),
        "--dns-forward-timeout",
        "200ms",
    ];
    cluster.kill_agent(1);
    cluster.start_agent_with(1, &args);

    let server: std::net::SocketAddr = listen.parse().expect("listen");
    let cluster_ip = slipway_dataplane::netns::run_in(&netns, || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async {
            let client = sup.admin().await;
            let namespace: Namespace =
                serde_json::from_value(json!({"metadata": {"name": "apps"}})).expect("ns");
            Api::<Namespace>::all(client.clone())
                .create(&PostParams::default(), &namespace)
                .await
                .expect("create the namespace");
            let web: Service = serde_json::from_value(json!({
                "metadata": {"name": "web", "namespace": "apps"},
                "spec": {"ports": [{"port": 80}]}
            }))
            .expect("service");
            Api::<Service>::namespaced(client, "apps")
                .create(&PostParams::default(), &web)
                .await
                .expect("create web")
                .spec
                .and_then(|s| s.cluster_ip)
                .expect("a ClusterIP")
        })
    })
    .expect("the host's netns");

    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let answer =
            slipway_dataplane::netns::run_in(&netns, || dig(server, "web.apps.svc.cluster.local."))
                .expect("the host's netns");
        let addresses: Vec<String> = answer
            .iter()
            .flat_map(|m| &m.answers)
            .filter_map(|r| match &r.data {
                RData::A(a) => Some(a.0.to_string()),
                _ => None,
            })
            .collect();
        if addresses == [cluster_ip.clone()] {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "web.apps is not {cluster_ip} in the agent's DNS: {answer:?}\n{}",
            cluster.agent_log(1)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let outside = slipway_dataplane::netns::run_in(&netns, || dig(server, "example.org."))
        .expect("the host's netns")
        .expect("an answer");
    assert_eq!(outside.metadata.response_code, ResponseCode::ServFail);

    let (code, metrics) =
        common::api(&cluster.node(1).socket, "GET", "/metrics", None).expect("/metrics");
    assert_eq!(code, 200, "{metrics}");
    for series in [
        r#"slipway_dns_queries_total{source="cluster",rcode="NOERROR"}"#,
        r#"slipway_dns_queries_total{source="forwarded",rcode="SERVFAIL"} 1"#,
        "slipway_datapath_packets",
    ] {
        assert!(metrics.contains(series), "{series} missing from\n{metrics}");
    }
    assert_eq!(metrics.matches("# EOF").count(), 1, "{metrics}");
    cluster.kill_agent(1);
}
