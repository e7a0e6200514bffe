//! NetworkPolicy on a node beyond the truth tables: verdict events (`slipway flows`, the API,
//! Prometheus), `slipway policy explain` through the binary, a policy map that overflows failing
//! closed (and staying so across an agent restart), and replies of connections opened before a
//! policy isolated their initiator.
//! Privileged (root, BPF, netns, cgroups): run by scripts/test.sh.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::probe::{OpenConnection, PodNs, Port, Probe, Servers, run_probes};
use common::{Cluster, Pod, api, slipway_binary};
use serde_json::{Value, json};

const TIMEOUT: Duration = Duration::from_millis(700);

fn put(cluster: &Cluster, what: &str, body: &Value) {
    for node in &cluster.nodes {
        let (code, reply) =
            api(&node.socket, "PUT", &format!("/v1/{what}"), Some(body)).expect("api");
        assert_eq!(code, 200, "PUT /v1/{what}: {reply}");
    }
}

/// Tells every agent about namespace x and the pods (all in x, labelled pod=<name>).
fn put_pods(cluster: &Cluster, pods: &[(&str, &Pod)]) {
    put(
        cluster,
        "namespaces",
        &json!([{ "name": "x", "labels": { "ns": "x" } }]),
    );
    let list: Vec<Value> = pods
        .iter()
        .map(|(name, pod)| json!({ "namespace": "x", "name": name, "ip": pod.ip, "labels": { "pod": name } }))
        .collect();
    put(cluster, "pods", &Value::Array(list));
}

fn reaches(src: &Pod, dst: &Pod, port: u16) -> bool {
    run_probes(
        &[Probe {
            src: PodNs::open(src.netns.name()),
            dst: dst.ip,
            port: Port::tcp(port),
        }],
        TIMEOUT,
    )[0]
}

fn slipway(args: &[&str]) -> (bool, String) {
    let out = Command::new(slipway_binary())
        .args(args)
        .output()
        .expect("slipway");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

fn flows(socket: &str, filters: &[&str]) -> Vec<Value> {
    let mut args = vec!["flows", "--socket", socket, "--json"];
    args.extend_from_slice(filters);
    let (ok, out) = slipway(&args);
    assert!(ok, "slipway flows: {out}");
    out.lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("flow line {l:?}: {e}")))
        .collect()
}

#[test]
#[cfg_attr(
    not(feature = "privileged"),
    ignore = "privileged: root + BPF + netns; run scripts/test.sh"
)]
fn verdicts_show_in_flows_explain_and_metrics() {
    let cluster = Cluster::new(2, "vxlan");
    let a = cluster.add_pod(1, "a");
    let b = cluster.add_pod(1, "b");
    let c = cluster.add_pod(2, "c");
    let _servers = Servers::start(
        &PodNs::open(b.netns.name()),
        &[Port::tcp(80), Port::tcp(81)],
    );
    put_pods(&cluster, &[("a", &a), ("b", &b), ("c", &c)]);
    assert!(
        reaches(&a, &b, 80) && reaches(&c, &b, 80),
        "open before any policy"
    );

    put(
        &cluster,
        "networkpolicies",
        &json!([{
            "metadata": { "name": "allow-a", "namespace": "x" },
            "spec": {
                "podSelector": { "matchLabels": { "pod": "b" } },
                "ingress": [{ "from": [{ "podSelector": { "matchLabels": { "pod": "a" } } }],
                              "ports": [{ "port": 80 }] }],
            },
        }]),
    );
    assert!(reaches(&a, &b, 80), "a -> b:80 is allowed");
    assert!(!reaches(&a, &b, 81), "a -> b:81 is denied (port)");
    assert!(
        !reaches(&c, &b, 80),
        "c -> b:80 is denied (peer, from another host)"
    );

    // Events: host 1 decided all three (b is its pod).
    let socket = cluster.node(1).socket.to_str().expect("utf-8").to_owned();
    let all = flows(&socket, &[]);
    let allowed: Vec<&Value> = all
        .iter()
        .filter(|f| f["verdict"] == "allow" && f["src"]["pod"] == "a" && f["dst"]["pod"] == "b")
        .collect();
    assert!(!allowed.is_empty(), "an allow event for a -> b: {all:#?}");
    assert_eq!(allowed[0]["policy"], "x/allow-a");
    assert_eq!(allowed[0]["rule"], "ingress[0]");
    assert_eq!(allowed[0]["direction"], "ingress");
    assert_eq!(allowed[0]["dport"], 80);
    let denied = flows(&socket, &["--verdict", "deny", "--pod", "x/c"]);
    assert!(!denied.is_empty(), "deny events for c -> b: {all:#?}");
    for f in &denied {
        assert_eq!(f["verdict"], "deny");
        assert_eq!(f["src"]["ip"], c.ip.to_string());
        assert_eq!(f["dst"]["pod"], "b");
        assert_eq!(f["reason"], "no-rule");
        assert_eq!(f["policies"], json!(["x/allow-a"]));
    }
    let port81 = flows(&socket, &["--verdict", "deny", "--port", "81"]);
    assert!(port81.iter().all(|f| f["dport"] == 81) && !port81.is_empty());
    assert!(flows(&socket, &["--namespace", "nowhere"]).is_empty());

    // Following: a new denied connection shows up on a running `slipway flows -f`.
    let mut follower = Command::new(slipway_binary())
        .args([
            "flows",
            "--socket",
            &socket,
            "--follow",
            "--verdict",
            "deny",
            "--port",
            "81",
        ])
        .stdout(Stdio::piped())
        .spawn()
        .expect("slipway flows -f");
    let mut lines = BufReader::new(follower.stdout.take().expect("stdout")).lines();
    // The recent ones first.
    for _ in 0..port81.len() {
        lines.next().expect("recent line").expect("read");
    }
    let started = Instant::now();
    assert!(!reaches(&c, &b, 81));
    let line = lines.next().expect("a followed line").expect("read");
    assert!(started.elapsed() < Duration::from_secs(10));
    assert!(
        line.contains("DENY") && line.contains("x/c(") && line.contains(":81"),
        "{line}"
    );
    let _ = follower.kill();
    let _ = follower.wait();

    // Explain through the binary, from the same state.
    let (ok, text) = slipway(&[
        "policy", "explain", "x/a", "x/b", "80/TCP", "--socket", &socket,
    ]);
    assert!(ok, "{text}");
    assert!(
        text.contains("ALLOWED") && text.contains("allowed by x/allow-a ingress[0]"),
        "{text}"
    );
    let (ok, text) = slipway(&[
        "policy", "explain", "x/c", "x/b", "80/tcp", "--socket", &socket,
    ]);
    assert!(ok, "{text}");
    assert!(
        text.contains("DENIED") && text.contains("isolated for ingress by x/allow-a"),
        "{text}"
    );
    let (ok, text) = slipway(&[
        "policy", "explain", "x/a", "x/b", "81/UDP", "--socket", &socket,
    ]);
    assert!(ok && text.contains("DENIED"), "{text}");
    let (ok, text) = slipway(&[
        "policy", "explain", "x/a", "x/nope", "80/TCP", "--socket", &socket,
    ]);
    assert!(
        !ok && text.contains("dst: \"x/nope\" is no known pod"),
        "{text}"
    );
    let (ok, text) = slipway(&[
        "policy", "explain", "x/a", "x/b", "80/ICMP", "--socket", &socket,
    ]);
    assert!(!ok && text.contains("protocol"), "{text}");

    // Prometheus counters per policy and verdict.
    let (code, metrics) = api(&cluster.node(1).socket, "GET", "/metrics", None).expect("metrics");
    assert_eq!(code, 200);
    let value = |verdict: &str| -> f64 {
        let prefix = format!(
            "slipway_policy_verdicts_total{{policy=\"x/allow-a\",direction=\"ingress\",verdict=\"{verdict}\"}} "
        );
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {prefix} in\n{metrics}"))
    };
    assert!(value("allow") >= 1.0 && value("deny") >= 2.0);
    assert_eq!(metrics.matches("# EOF").count(), 1, "one exposition");
    assert!(metrics.contains("slipway_datapath_packets_total"));
}

/// Restarts host `i`'s agent with extra arguments.
fn restart_agent(cluster: &mut Cluster, i: usize, extra: &[&str]) {
    cluster.kill_agent(i);
    cluster.start_agent_with(i, extra);
}

fn status(cluster: &Cluster) -> Value {
    let (_, body) = api(&cluster.node(1).socket, "GET", "/v1/status", None).expect("status");
    serde_json::from_str(&body).expect("json")
}

#[test]
#[cfg_attr(
    not(feature = "privileged"),
    ignore = "privileged: root + BPF + netns; run scripts/test.sh"
)]
fn a_policy_map_overflow_fails_closed_and_says_so() {
    let mut cluster = Cluster::new(1, "vxlan");
    restart_agent(&mut cluster, 1, &["--policy-entries", "50"]);
    let a = cluster.add_pod(1, "a");
    let b = cluster.add_pod(1, "b");
    let c = cluster.add_pod(1, "c");
    let _servers: Vec<Servers> = [&b, &c]
        .iter()
        .map(|pod| Servers::start(&PodNs::open(pod.netns.name()), &[Port::tcp(80)]))
        .collect();
    put_pods(&cluster, &[("a", &a), ("b", &b), ("c", &c)]);
    let from_a = json!({ "from": [{ "podSelector": { "matchLabels": { "pod": "a" } } }] });
    // b: 60 rules allowing unrelated /32s, then one allowing a: 61 entries > 50.
    let mut rules: Vec<Value> = (0..60)
        .map(|i| json!({ "from": [{ "ipBlock": { "cidr": format!("192.0.2.{i}/32") } }] }))
        .collect();
    rules.push(from_a.clone());
    let big = |rules: Vec<Value>| {
        json!([
            { "metadata": { "name": "big", "namespace": "x" },
              "spec": { "podSelector": { "matchLabels": { "pod": "b" } }, "ingress": rules } },
            { "metadata": { "name": "small", "namespace": "x" },
              "spec": { "podSelector": { "matchLabels": { "pod": "c" } }, "ingress": [from_a] } },
        ])
    };
    put(&cluster, "networkpolicies", &big(rules.clone()));

    assert!(
        !reaches(&a, &b, 80),
        "b's rules overflowed: it fails closed, never open"
    );
    assert!(reaches(&a, &c, 80), "c's rules fit: a is allowed to c");
    assert!(!reaches(&b, &c, 80), "c is enforced: b is denied");
    let st = status(&cluster);
    let b_name = "x/b ingress";
    assert_eq!(st["policy"]["failClosed"], json!([b_name]), "{st:#}");
    let error = st["policy"]["errors"][0].as_str().expect("an error");
    assert!(
        error.contains("x/b") && error.contains("61 map entries") && error.contains("budget 50"),
        "{error}"
    );
    let socket = cluster.node(1).socket.to_str().expect("utf-8").to_owned();
    let (_, text) = slipway(&[
        "policy", "explain", "x/a", "x/b", "80/TCP", "--socket", &socket,
    ]);
    assert!(
        text.contains("DENIED") && text.contains("overflowed"),
        "{text}"
    );
    let failed = flows(&socket, &["--pod", "x/b", "--verdict", "deny"]);
    assert!(
        failed.iter().any(|f| f["reason"] == "fail-closed"),
        "{failed:#?}"
    );
    let (_, metrics) = api(&cluster.node(1).socket, "GET", "/metrics", None).expect("metrics");
    assert!(
        metrics.contains("slipway_policy_fail_closed_endpoints 1"),
        "{metrics}"
    );

    // A restart keeps the state, and the endpoint still fails closed.
    restart_agent(&mut cluster, 1, &["--policy-entries", "50"]);
    assert_eq!(status(&cluster)["policy"]["failClosed"], json!([b_name]));
    assert!(!reaches(&a, &b, 80) && reaches(&a, &c, 80));

    // Fitting again: enforced normally.
    rules.drain(0..20);
    put(&cluster, "networkpolicies", &big(rules));
    assert_eq!(status(&cluster)["policy"]["failClosed"], json!([]));
    assert!(reaches(&a, &b, 80), "41 entries fit: a is allowed to b");
    assert!(!reaches(&c, &b, 80), "and c is denied");
}

#[test]
#[cfg_attr(
    not(feature = "privileged"),
    ignore = "privileged: root + BPF + netns; run scripts/test.sh"
)]
fn replies_of_connections_opened_before_isolation_keep_flowing() {
    let cluster = Cluster::new(2, "vxlan");
    let a = cluster.add_pod(1, "a");
    let b = cluster.add_pod(2, "b");
    let local = cluster.add_pod(1, "l");
    let _servers: Vec<Servers> = [&a, &b, &local]
        .iter()
        .map(|pod| Servers::start(&PodNs::open(pod.netns.name()), &[Port::tcp(80)]))
        .collect();
    put_pods(&cluster, &[("a", &a), ("b", &b), ("l", &local)]);
    let a_ns = PodNs::open(a.netns.name());
    let mut to_remote =
        OpenConnection::connect(&a_ns, "x/a", b.ip, "x/b", Port::tcp(80), TIMEOUT).expect("a -> b");
    let mut to_local =
        OpenConnection::connect(&a_ns, "x/a", local.ip, "x/l", Port::tcp(80), TIMEOUT)
            .expect("a -> l");
    assert!(to_remote.exchange(TIMEOUT) && to_local.exchange(TIMEOUT));

    // Isolate a's ingress entirely: the replies of a's own connections still come in.
    put(
        &cluster,
        "networkpolicies",
        &json!([{ "metadata": { "name": "deny-a", "namespace": "x" },
                  "spec": { "podSelector": { "matchLabels": { "pod": "a" } } } }]),
    );
    for round in 0..5 {
        assert!(
            to_remote.exchange(TIMEOUT),
            "round {round}: a <- b replies (cross host)"
        );
        assert!(
            to_local.exchange(TIMEOUT),
            "round {round}: a <- l replies (same host)"
        );
    }
    assert!(
        !reaches(&b, &a, 80) && !reaches(&local, &a, 80),
        "new connections to a are denied"
    );
    assert!(
        reaches(&a, &b, 80) && reaches(&a, &local, 80),
        "a's new connections out still work"
    );
}

#[test]
#[cfg_attr(
    not(feature = "privileged"),
    ignore = "privileged: root + BPF + netns; run scripts/test.sh"
)]
fn no_packet_sees_half_an_update() {
    // Two policy sets that both allow a -> b, by different means (a pod selector; an ipBlock
    // and a port range): a packet that saw the old rules removed before the new ones were in
    // place would be denied. New UDP flows (a fresh socket each) run while the sets alternate.
    let cluster = Cluster::new(1, "vxlan");
    let a = cluster.add_pod(1, "a");
    let b = cluster.add_pod(1, "b");
    let _servers = Servers::start(&PodNs::open(b.netns.name()), &[Port::udp(80)]);
    put_pods(&cluster, &[("a", &a), ("b", &b)]);
    let by_selector = json!([{ "metadata": { "name": "p", "namespace": "x" }, "spec": {
        "podSelector": { "matchLabels": { "pod": "b" } },
        "ingress": [{ "from": [{ "podSelector": { "matchLabels": { "pod": "a" } } }],
                      "ports": [{ "protocol": "UDP", "port": 80 }] }] } }]);
    let by_block = json!([{ "metadata": { "name": "q", "namespace": "x" }, "spec": {
        "podSelector": { "matchLabels": { "pod": "b" } },
        "ingress": [{ "from": [{ "ipBlock": { "cidr": format!("{}/32", a.ip) } }],
                      "ports": [{ "protocol": "UDP", "port": 64, "endPort": 127 }] }] } }]);
    put(&cluster, "networkpolicies", &by_selector);

    let stop = std::sync::atomic::AtomicBool::new(false);
    let a_ns = PodNs::open(a.netns.name());
    let (sent, lost) = std::thread::scope(|scope| {
        let prober = scope.spawn(|| {
            let (mut sent, mut lost) = (0u32, 0u32);
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let probes: Vec<Probe> = (0..16)
                    .map(|_| Probe {
                        src: a_ns.clone(),
                        dst: b.ip,
                        port: Port::udp(80),
                    })
                    .collect();
                let results = run_probes(&probes, Duration::from_secs(2));
                sent += results.len() as u32;
                lost += results.iter().filter(|ok| !**ok).count() as u32;
            }
            (sent, lost)
        });
        for flip in 0..40 {
            let set = if flip % 2 == 0 {
                &by_block
            } else {
                &by_selector
            };
            put(&cluster, "networkpolicies", set);
            std::thread::sleep(Duration::from_millis(25));
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        prober.join().expect("prober")
    });
    assert!(sent > 100, "only {sent} probes ran during the flips");
    assert_eq!(
        lost, 0,
        "{lost} of {sent} new flows were denied during 40 policy swaps"
    );
    let socket = cluster.node(1).socket.to_str().expect("utf-8").to_owned();
    assert!(
        flows(&socket, &["--verdict", "deny"]).is_empty(),
        "no deny event at all"
    );
    let st = status(&cluster);
    assert!(
        st["policy"]["generation"].as_u64().expect("generation") >= 41,
        "{st:#}"
    );
}

/// A UDP datagram from `src` to a port nobody listens on at `dst`: whether the ICMP port
/// unreachable came back (the connected socket's read fails with "connection refused").
fn refused(src: &Pod, dst: &Pod) -> bool {
    let dst = dst.ip;
    PodNs::open(src.netns.name()).run(move || {
        let socket = std::net::UdpSocket::bind(("0.0.0.0", 0)).expect("bind");
        socket.connect((dst, 9)).expect("connect");
        socket
            .set_read_timeout(Some(Duration::from_secs(1)))
            .expect("timeout");
        socket.send(b"anyone?").expect("send");
        let mut buf = [0u8; 16];
        matches!(socket.recv(&mut buf), Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused)
    })
}

#[test]
#[cfg_attr(
    not(feature = "privileged"),
    ignore = "privileged: root + BPF + netns; run scripts/test.sh"
)]
fn icmp_errors_about_allowed_connections_reach_an_isolated_pod() {
    let cluster = Cluster::new(2, "vxlan");
    let a = cluster.add_pod(1, "a");
    let near = cluster.add_pod(1, "near");
    let far = cluster.add_pod(2, "far");
    put_pods(&cluster, &[("a", &a), ("near", &near), ("far", &far)]);
    assert!(
        refused(&a, &near) && refused(&a, &far),
        "port unreachable before any policy"
    );
    // a accepts nothing: yet the errors about its own datagrams are related to its
    // connections, and come in (same host and across hosts).
    put(
        &cluster,
        "networkpolicies",
        &json!([{ "metadata": { "name": "deny-a", "namespace": "x" },
                  "spec": { "podSelector": { "matchLabels": { "pod": "a" } } } }]),
    );
    assert!(
        refused(&a, &near),
        "ICMP port unreachable from the same host"
    );
    assert!(refused(&a, &far), "ICMP port unreachable from another host");
    // The other way, nothing related: near's datagram to a is denied at a's ingress, so no
    // error can come back to near.
    assert!(!refused(&near, &a), "a's ingress denies near's datagram");
}
