//! The NetworkPolicy truth table (issue 4), in the style of upstream's e2e suite (kubernetes
//! test/e2e/network/netpol): namespaces x, y, z with pods a, b, c each, spread over three hosts
//! so that same-host and cross-host pairs both occur. For each case the expected 9x9 matrix on
//! every probed port (TCP 80, 81 and UDP 80, 81) is written down from the NetworkPolicy
//! semantics, never computed by the project's evaluator nor recorded from a run; then every
//! pod probes every pod with real traffic through the datapath, and `GET /v1/policy/explain`
//! is asked about every pair (and, for chosen pairs, which policy and rule decided each end).
//! Also: labels changing under a fixed policy list, TCP and UDP flows kept open across a policy
//! update, and invalid policy lists refused whole without changing anything.
//! Privileged (root, BPF, netns): run by scripts/test.sh.
//!
//! The semantics the matrices follow (Kubernetes API reference, "NetworkPolicy"): a pod that no
//! policy selects in a direction is open in that direction; policies are additive; a connection
//! needs the source's egress and the destination's ingress; replies of allowed connections pass;
//! `policyTypes` defaults to Ingress, plus Egress when the policy has egress rules; a policy
//! selects pods of its own namespace only, and a peer's `podSelector` without a
//! `namespaceSelector` means pods of the policy's namespace; `ipBlock` matches pod addresses
//! too; a named port resolves against the destination pod's container ports; a pod always
//! reaches itself (loopback, upstream's `AllowLoopback`).

mod common;

use std::fmt::Write as _;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::thread;
use std::time::{Duration, Instant};

use common::probe::{
    ALL_PORTS, N, NAMESPACES, OpenConnection, PodNs, Port, Probe, Reachability, Seen, Servers,
    TCP_80, TCP_81, UDP_80, UDP_81, pod_index, pod_name, render, run_probes,
};
use common::{Cluster, POD_CIDR, Pod, api};
use serde_json::{Value, json};

/// How long a probe waits for each step (connect, echo): a denied probe costs this much.
const PROBE_TIMEOUT: Duration = Duration::from_millis(500);
/// How long a kept-open connection waits for an echo.
const ECHO_TIMEOUT: Duration = Duration::from_millis(1500);

/// The host of matrix pod `index`: h1 holds x/a y/b z/c, h2 x/b y/c z/a, h3 x/c y/a z/b, so
/// every namespace and every pod name is on every host.
fn host_of(index: usize) -> usize {
    let (ns, pod) = (index / 3, index % 3);
    1 + (pod + 3 - ns) % 3
}

/// A policy object as the API takes it.
fn policy(namespace: &str, name: &str, spec: Value) -> Value {
    json!({ "metadata": { "name": name, "namespace": namespace }, "spec": spec })
}

/// One case: the policy list, and the expected matrix for each probed port.
#[derive(Debug)]
struct Case {
    name: String,
    policies: Vec<Value>,
    expected: [Option<Reachability>; 4],
    /// Pairs whose explanation is checked in full: which policy and rule decided each end.
    attributions: Vec<Attribution>,
}

/// What `GET /v1/policy/explain` must say about one connection, end by end.
#[derive(Debug, Clone)]
struct Attribution {
    src: &'static str,
    dst: &'static str,
    port: Port,
    egress: End,
    ingress: End,
}

/// One end's verdict: "open" (no policy selects it in that direction), "allow" with the
/// policy and rule that allowed, or "deny" with a policy among those that select it.
#[derive(Debug, Clone, Copy)]
struct End {
    verdict: &'static str,
    policy: Option<&'static str>,
    rule: Option<&'static str>,
}

const OPEN: End = End {
    verdict: "open",
    policy: None,
    rule: None,
};

fn allowed_by(policy: &'static str, rule: &'static str) -> End {
    End {
        verdict: "allow",
        policy: Some(policy),
        rule: Some(rule),
    }
}

fn denied_by(policy: &'static str) -> End {
    End {
        verdict: "deny",
        policy: Some(policy),
        rule: None,
    }
}

impl End {
    /// The differences between this expectation and the explanation `got` of one end.
    fn check(&self, what: &str, got: &Value) -> Vec<String> {
        let mut wrong = Vec::new();
        if got["verdict"].as_str() != Some(self.verdict) {
            wrong.push(format!(
                "{what}: verdict {} instead of {:?}",
                got["verdict"], self.verdict
            ));
        }
        match self.verdict {
            "allow" => {
                if got["policy"].as_str() != self.policy || got["rule"].as_str() != self.rule {
                    wrong.push(format!(
                        "{what}: allowed by {} {} instead of {} {}",
                        got["policy"],
                        got["rule"],
                        json!(self.policy),
                        json!(self.rule)
                    ));
                }
            }
            "deny" => {
                let listed = got["policies"]
                    .as_array()
                    .is_some_and(|l| l.iter().any(|p| p.as_str() == self.policy));
                if !listed {
                    wrong.push(format!(
                        "{what}: {} not among the policies {}",
                        json!(self.policy),
                        got["policies"]
                    ));
                }
            }
            _ => {
                if !got["policy"].is_null() {
                    wrong.push(format!("{what}: open, yet policy {}", got["policy"]));
                }
            }
        }
        wrong
    }
}

impl Case {
    fn new(name: &str, policies: Vec<Value>) -> Self {
        Self {
            name: name.to_owned(),
            policies,
            expected: [None; 4],
            attributions: Vec::new(),
        }
    }

    /// Checks explain's attribution for `src` -> `dst` on `port`, end by end.
    fn explains(
        mut self,
        src: &'static str,
        dst: &'static str,
        port: Port,
        egress: End,
        ingress: End,
    ) -> Self {
        self.attributions.push(Attribution {
            src,
            dst,
            port,
            egress,
            ingress,
        });
        self
    }

    /// The matrix on `ports`.
    fn on(mut self, ports: &[Port], reachability: Reachability) -> Self {
        for port in ports {
            let i = port_slot(*port);
            assert!(
                self.expected[i].is_none(),
                "{}: {port} given twice",
                self.name
            );
            self.expected[i] = Some(reachability);
        }
        self
    }

    /// The same matrix on every port.
    fn everywhere(self, reachability: Reachability) -> Self {
        self.on(&ALL_PORTS, reachability)
    }

    fn expected(&self, slot: usize) -> &Reachability {
        self.expected[slot]
            .as_ref()
            .unwrap_or_else(|| panic!("{}: no matrix for {}", self.name, ALL_PORTS[slot]))
    }
}

fn port_slot(port: Port) -> usize {
    ALL_PORTS
        .iter()
        .position(|p| *p == port)
        .unwrap_or_else(|| panic!("{port} is not probed"))
}

/// The cluster, its nine pods and their servers. Fields drop in order: servers first.
struct Env {
    _servers: Vec<Servers>,
    ns: Vec<PodNs>,
    pods: Vec<Pod>,
    cluster: Cluster,
}

impl Env {
    fn new() -> Self {
        let cluster = Cluster::new(3, "vxlan");
        let pods: Vec<Pod> = (0..N)
            .map(|i| cluster.add_pod(host_of(i), &pod_name(i).replace('/', "-")))
            .collect();
        // The ipBlock cases name host blocks: each pod's address must come from its host's.
        for (i, p) in pods.iter().enumerate() {
            let block: ipnetwork::Ipv4Network =
                cluster.node(p.host).block.parse().expect("host block");
            assert!(
                block.contains(p.ip),
                "{} got {} outside host {}'s block {block}",
                pod_name(i),
                p.ip,
                p.host
            );
        }
        let ns: Vec<PodNs> = pods.iter().map(|p| PodNs::open(p.netns.name())).collect();
        let servers = ns.iter().map(|n| Servers::start(n, &ALL_PORTS)).collect();
        Self {
            _servers: servers,
            ns,
            pods,
            cluster,
        }
    }

    fn ip(&self, pod: &str) -> Ipv4Addr {
        self.pods[pod_index(pod)].ip
    }

    /// `pod`'s address as a /32.
    fn cidr32(&self, pod: &str) -> String {
        format!("{}/32", self.ip(pod))
    }

    fn sockets(&self) -> Vec<PathBuf> {
        self.cluster
            .nodes
            .iter()
            .map(|n| n.socket.clone())
            .collect()
    }

    /// The same request to every agent: each one's status and body.
    fn every_agent(&self, method: &str, path: &str, body: Option<&Value>) -> Vec<(u16, String)> {
        self.cluster
            .nodes
            .iter()
            .map(|n| {
                api(&n.socket, method, path, body)
                    .unwrap_or_else(|| panic!("agent h{} does not answer", n.index))
            })
            .collect()
    }

    /// Waits until every pod reaches every pod on every port with no policy API involved: the
    /// world is up. Not a policy case, so it may take several rounds.
    fn wait_until_all_reachable(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let seen = self.probe_all();
            let missing: Vec<String> = seen
                .iter()
                .enumerate()
                .flat_map(|(slot, m)| {
                    (0..N).flat_map(move |f| {
                        (0..N).filter(move |&t| !m[f][t]).map(move |t| {
                            format!("{} -> {} {}", pod_name(f), pod_name(t), ALL_PORTS[slot])
                        })
                    })
                })
                .collect();
            if missing.is_empty() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "without any policy, {} probes still fail after 20 s: {missing:?}",
                missing.len()
            );
            thread::sleep(Duration::from_millis(200));
        }
    }

    /// Fails early, with a clear message, when the agents have no policy API yet.
    fn require_policy_api(&self) {
        for (i, (code, body)) in self
            .every_agent("GET", "/v1/networkpolicies", None)
            .into_iter()
            .enumerate()
        {
            assert_eq!(
                code,
                200,
                "agent h{}: GET /v1/networkpolicies answered {code} {body}: no NetworkPolicy API",
                i + 1
            );
        }
    }

    /// PUT /v1/namespaces (ns=<name>) and /v1/pods (pod=<name>, the named ports) to every
    /// agent, plus `extra` labels: ("z", "team", "blue") labels namespace z, ("y/b", ...) pod y/b.
    fn register(&self, extra: &[(&str, &str, &str)]) -> Result<(), String> {
        let labels = |base: Value, name: &str| {
            let mut labels = base;
            for (on, key, value) in extra {
                if *on == name {
                    labels[*key] = json!(value);
                }
            }
            labels
        };
        let namespaces: Vec<Value> = NAMESPACES
            .iter()
            .map(|n| json!({ "name": n, "labels": labels(json!({ "ns": n }), n) }))
            .collect();
        let pods: Vec<Value> = (0..N)
            .map(|i| {
                let name = pod_name(i);
                let (ns, pod) = name.split_once('/').expect("ns/pod");
                // "web" names port 80 on pods a and 81 on pods b and c: a named port that
                // resolves to different numbers on different destinations.
                let web = if pod == "a" { 80 } else { 81 };
                json!({
                    "namespace": ns,
                    "name": pod,
                    "ip": self.pods[i].ip.to_string(),
                    "labels": labels(json!({ "pod": pod }), &name),
                    "ports": [
                        { "name": "serve-80-tcp", "containerPort": 80, "protocol": "TCP" },
                        { "name": "serve-81-tcp", "containerPort": 81, "protocol": "TCP" },
                        { "name": "serve-80-udp", "containerPort": 80, "protocol": "UDP" },
                        { "name": "serve-81-udp", "containerPort": 81, "protocol": "UDP" },
                        { "name": "web", "containerPort": web, "protocol": "TCP" },
                    ],
                })
            })
            .collect();
        for (path, body) in [("/v1/namespaces", namespaces), ("/v1/pods", pods)] {
            for (i, (code, reply)) in self
                .every_agent("PUT", path, Some(&Value::Array(body)))
                .into_iter()
                .enumerate()
            {
                if code != 200 {
                    return Err(format!("agent h{}: PUT {path}: {code} {reply}", i + 1));
                }
            }
        }
        Ok(())
    }

    /// Replaces the policy list on every agent; each answers 200 once it enforces it.
    fn apply(&self, policies: &[Value]) -> Result<(), String> {
        let list = Value::Array(policies.to_vec());
        for (i, (code, body)) in self
            .every_agent("PUT", "/v1/networkpolicies", Some(&list))
            .into_iter()
            .enumerate()
        {
            if code != 200 {
                return Err(format!(
                    "agent h{}: PUT /v1/networkpolicies answered {code}: {body}",
                    i + 1
                ));
            }
        }
        Ok(())
    }

    /// Every pod to every pod on every port, once: [port slot][from][to].
    fn probe_all(&self) -> Vec<[[bool; N]; N]> {
        let mut order = Vec::new();
        let mut probes = Vec::new();
        for (slot, port) in ALL_PORTS.iter().enumerate() {
            for from in 0..N {
                for to in 0..N {
                    order.push((slot, from, to));
                    probes.push(Probe {
                        src: self.ns[from].clone(),
                        dst: self.pods[to].ip,
                        port: *port,
                    });
                }
            }
        }
        let mut seen = vec![[[false; N]; N]; ALL_PORTS.len()];
        for ((slot, from, to), ok) in order.into_iter().zip(run_probes(&probes, PROBE_TIMEOUT)) {
            seen[slot][from][to] = ok;
        }
        seen
    }

    /// Probes everything; probes that failed where the case expects them through are tried
    /// once more (a lost SYN is timing noise). A probe that got through where the case
    /// expects it denied is never retried: nothing but a policy leak lets it through.
    fn observe(&self, case: &Case, notes: &mut String) -> Vec<[[bool; N]; N]> {
        let mut seen = self.probe_all();
        let mut retry = Vec::new();
        for (slot, matrix) in seen.iter().enumerate() {
            for (from, row) in matrix.iter().enumerate() {
                for (to, ok) in row.iter().enumerate() {
                    if case.expected(slot).probe_allows(from, to) && !ok {
                        retry.push((slot, from, to));
                    }
                }
            }
        }
        if retry.is_empty() {
            return seen;
        }
        let probes: Vec<Probe> = retry
            .iter()
            .map(|&(slot, from, to)| Probe {
                src: self.ns[from].clone(),
                dst: self.pods[to].ip,
                port: ALL_PORTS[slot],
            })
            .collect();
        let again = run_probes(&probes, PROBE_TIMEOUT);
        let recovered = again.iter().filter(|ok| **ok).count();
        let _ = write!(
            notes,
            ", {} probes retried ({recovered} got through)",
            retry.len()
        );
        for (&(slot, from, to), ok) in retry.iter().zip(again) {
            seen[slot][from][to] = ok;
        }
        seen
    }

    /// `GET /v1/policy/explain` for every pair of distinct pods on every port, asked of the
    /// source's agent: [port slot][from][to]. A pod and itself are not asked about: loopback
    /// never meets policy.
    fn explain_all(&self, errors: &mut Vec<String>) -> Vec<[[Seen; N]; N]> {
        let sockets = self.sockets();
        let rows: Vec<(Vec<[Seen; N]>, Vec<String>)> = thread::scope(|scope| {
            let handles: Vec<_> = (0..N)
                .map(|from| {
                    let socket = &sockets[host_of(from) - 1];
                    scope.spawn(move || {
                        let mut row = vec![[Seen::NotChecked; N]; ALL_PORTS.len()];
                        let mut errors = Vec::new();
                        for (slot, port) in ALL_PORTS.iter().enumerate() {
                            for to in (0..N).filter(|&to| to != from) {
                                let path = format!(
                                    "/v1/policy/explain?src={}&dst={}&port={}&protocol={}",
                                    pod_name(from),
                                    pod_name(to),
                                    port.number,
                                    port.protocol_name()
                                );
                                row[slot][to] = match api(socket, "GET", &path, None) {
                                    Some((200, body)) => {
                                        match serde_json::from_str::<Value>(&body)
                                            .ok()
                                            .and_then(|v| v["allowed"].as_bool())
                                        {
                                            Some(allowed) => Seen::from(allowed),
                                            None => {
                                                errors.push(format!("{path}: {body}"));
                                                Seen::Unknown
                                            }
                                        }
                                    }
                                    Some((code, body)) => {
                                        errors.push(format!("{path}: {code} {body}"));
                                        Seen::Unknown
                                    }
                                    None => {
                                        errors.push(format!("{path}: no answer"));
                                        Seen::Unknown
                                    }
                                };
                            }
                        }
                        (row, errors)
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("explain thread"))
                .collect()
        });
        let mut out = vec![[[Seen::NotChecked; N]; N]; ALL_PORTS.len()];
        for (from, (row, errs)) in rows.into_iter().enumerate() {
            for (slot, cells) in row.into_iter().enumerate() {
                out[slot][from] = cells;
            }
            errors.extend(errs);
        }
        out
    }

    /// What explain gets wrong about `a`, asked by name of the source's agent and by address
    /// of the destination's (both must give the same answer).
    fn attribution(&self, a: &Attribution) -> Vec<String> {
        let (src, dst) = (pod_index(a.src), pod_index(a.dst));
        let query = |s: String, d: String| {
            format!(
                "/v1/policy/explain?src={s}&dst={d}&port={}&protocol={}",
                a.port.number,
                a.port.protocol_name()
            )
        };
        let mut wrong = Vec::new();
        for (host, path) in [
            (host_of(src), query(a.src.to_owned(), a.dst.to_owned())),
            (
                host_of(dst),
                query(self.ip(a.src).to_string(), self.ip(a.dst).to_string()),
            ),
        ] {
            let answer = api(&self.cluster.node(host).socket, "GET", &path, None);
            let Some((200, body)) = answer else {
                wrong.push(format!("h{host} {path}: {answer:?}"));
                continue;
            };
            let Ok(got) = serde_json::from_str::<Value>(&body) else {
                wrong.push(format!("h{host} {path}: not JSON: {body}"));
                continue;
            };
            let mut here = a.egress.check("egress", &got["egress"]);
            here.extend(a.ingress.check("ingress", &got["ingress"]));
            wrong.extend(here.into_iter().map(|w| format!("h{host} {path}: {w}")));
        }
        wrong
    }

    /// Probes and explains `case` (already applied): `Ok` with notes, or the grids that differ.
    fn verify(&self, case: &Case) -> Result<String, String> {
        let mut notes = String::new();
        let seen = self.observe(case, &mut notes);
        let mut explain_errors = Vec::new();
        let explained = self.explain_all(&mut explain_errors);
        // The grids that differ, each printed once for all the ports it holds on.
        let mut grids: Vec<Differing> = Vec::new();
        for (slot, port) in ALL_PORTS.iter().enumerate() {
            let expected = case.expected(slot);
            let probed = (
                "probes",
                grid(|f, t| expected.probe_allows(f, t)),
                grid(|f, t| Seen::from(seen[slot][f][t])),
            );
            let explain = (
                "explain",
                grid(|f, t| expected.policy_allows(f, t)),
                explained[slot],
            );
            for (kind, want, got) in [probed, explain] {
                let agrees = (0..N).all(|f| {
                    (0..N).all(|t| {
                        matches!(got[f][t], Seen::NotChecked) || got[f][t] == Seen::from(want[f][t])
                    })
                });
                if agrees {
                    continue;
                }
                match grids
                    .iter_mut()
                    .find(|d| d.kind == kind && d.want == want && d.got == got)
                {
                    Some(d) => d.ports.push(*port),
                    None => grids.push(Differing {
                        kind,
                        ports: vec![*port],
                        want,
                        got,
                    }),
                }
            }
        }
        let mut failure = String::new();
        for d in &grids {
            let ports: Vec<String> = d.ports.iter().map(Port::to_string).collect();
            failure.push_str(&render(
                &format!("{} -- {} on {}", case.name, d.kind, ports.join(" ")),
                |f, t| d.want[f][t],
                |f, t| d.got[f][t],
            ));
        }
        for a in &case.attributions {
            for wrong in self.attribution(a) {
                let _ = writeln!(
                    failure,
                    "  explain {} -> {} {}: {wrong}",
                    a.src, a.dst, a.port
                );
            }
        }
        if !failure.is_empty() && !notes.is_empty() {
            failure.insert_str(0, &format!("  ({})\n", notes.trim_start_matches(", ")));
        }
        for e in explain_errors.iter().take(5) {
            let _ = writeln!(failure, "  explain error: {e}");
        }
        if failure.is_empty() {
            Ok(notes)
        } else {
            Err(failure)
        }
    }
}

/// A 9x9 matrix, rows the sources.
type Grid<T> = [[T; N]; N];

/// A matrix seen (by probes or by explain) that differs from the expected one, on `ports`.
struct Differing {
    kind: &'static str,
    ports: Vec<Port>,
    want: Grid<bool>,
    got: Grid<Seen>,
}

fn grid<T: Copy + Default>(cell: impl Fn(usize, usize) -> T) -> Grid<T> {
    let mut g = [[T::default(); N]; N];
    for (f, row) in g.iter_mut().enumerate() {
        for (t, c) in row.iter_mut().enumerate() {
            *c = cell(f, t);
        }
    }
    g
}

/// A selector on the label `ns` (every namespace has ns=<name>).
fn ns(name: &str) -> Value {
    json!({ "matchLabels": { "ns": name } })
}

/// A selector on the label `pod` (every pod has pod=<name>).
fn pod(name: &str) -> Value {
    json!({ "matchLabels": { "pod": name } })
}

/// A selector of one expression; `values` left out when empty (Exists, DoesNotExist).
fn expr(key: &str, operator: &str, values: &[&str]) -> Value {
    let mut requirement = json!({ "key": key, "operator": operator });
    if !values.is_empty() {
        requirement["values"] = json!(values);
    }
    json!({ "matchExpressions": [requirement] })
}

/// A numeric TCP port of a rule.
fn tcp(port: u16) -> Value {
    json!({ "protocol": "TCP", "port": port })
}

/// A numeric UDP port of a rule.
fn udp(port: u16) -> Value {
    json!({ "protocol": "UDP", "port": port })
}

/// Matrices shorthand: everything allowed.
fn open() -> Reachability {
    Reachability::new(true)
}

/// The cases, in the order they are applied (each PUT replaces the previous list).
fn cases(env: &Env) -> Vec<Case> {
    let h1_block = env.cluster.node(1).block.clone();
    let h3_block = env.cluster.node(3).block.clone();
    let deny_ingress_x = policy("x", "deny-all-ingress", json!({ "podSelector": {} }));
    let deny_egress_x = policy(
        "x",
        "deny-all-egress",
        json!({ "podSelector": {}, "policyTypes": ["Egress"] }),
    );
    vec![
        Case::new("no policies: everything open", vec![]).everywhere(open()),
        // Default deny, each direction and both.
        Case::new(
            "deny-all ingress in x (no policyTypes: Ingress)",
            vec![deny_ingress_x.clone()],
        )
        .everywhere(open().expect("*", "x/*", false))
        .explains("y/a", "x/b", UDP_81, OPEN, denied_by("x/deny-all-ingress")),
        Case::new("deny-all egress in x", vec![deny_egress_x.clone()])
            .everywhere(open().expect("x/*", "*", false)),
        Case::new(
            "deny-all both in x (policyTypes Ingress+Egress, no rules)",
            vec![policy(
                "x",
                "deny-all",
                json!({ "podSelector": {}, "policyTypes": ["Ingress", "Egress"] }),
            )],
        )
        .everywhere(open().expect("x/*", "*", false).expect("*", "x/*", false)),
        // Allow-all beside deny-all: policies add up.
        Case::new(
            "allow-all ingress beside deny-all ingress in x",
            vec![
                deny_ingress_x.clone(),
                policy(
                    "x",
                    "allow-all-ingress",
                    json!({ "podSelector": {}, "ingress": [{}] }),
                ),
            ],
        )
        .everywhere(open()),
        Case::new(
            "allow-all egress beside deny-all egress in x",
            vec![
                deny_egress_x.clone(),
                policy(
                    "x",
                    "allow-all-egress",
                    json!({ "podSelector": {}, "egress": [{}], "policyTypes": ["Egress"] }),
                ),
            ],
        )
        .everywhere(open()),
        // Namespace selectors.
        Case::new(
            "x/a ingress from namespace y",
            vec![policy(
                "x",
                "a-from-y",
                json!({
                    "podSelector": pod("a"),
                    "ingress": [{ "from": [{ "namespaceSelector": ns("y") }] }],
                }),
            )],
        )
        .everywhere(
            open()
                .expect_all_ingress("x/a", false)
                .expect("y/*", "x/a", true),
        ),
        Case::new(
            "x/a egress to namespace y",
            vec![policy(
                "x",
                "a-to-y",
                json!({
                    "podSelector": pod("a"),
                    "policyTypes": ["Egress"],
                    "egress": [{ "to": [{ "namespaceSelector": ns("y") }] }],
                }),
            )],
        )
        .everywhere(
            open()
                .expect_all_egress("x/a", false)
                .expect("x/a", "y/*", true),
        ),
        // Pod and namespace selectors in one peer (AND) against two peers (OR).
        Case::new(
            "x/a ingress from pods b in namespace y (one peer: both selectors)",
            vec![policy(
                "x",
                "a-from-y-b",
                json!({
                    "podSelector": pod("a"),
                    "ingress": [{ "from": [{
                        "namespaceSelector": expr("ns", "In", &["y"]),
                        "podSelector": pod("b"),
                    }] }],
                }),
            )],
        )
        .everywhere(
            open()
                .expect_all_ingress("x/a", false)
                .expect("y/b", "x/a", true),
        ),
        Case::new(
            "x/a ingress from namespace y or pods b (two peers)",
            vec![policy(
                "x",
                "a-from-y-or-b",
                json!({
                    "podSelector": pod("a"),
                    "ingress": [{ "from": [
                        { "namespaceSelector": expr("ns", "In", &["y"]) },
                        { "podSelector": pod("b") },
                    ] }],
                }),
            )],
        )
        // A podSelector alone means pods of the policy's namespace: x/b, not y/b or z/b.
        .everywhere(
            open()
                .expect_all_ingress("x/a", false)
                .expect("y/*", "x/a", true)
                .expect("x/b", "x/a", true),
        ),
        Case::new(
            "x/a egress to pods c in namespace z (one peer: both selectors)",
            vec![policy(
                "x",
                "a-to-z-c",
                json!({
                    "podSelector": pod("a"),
                    "policyTypes": ["Egress"],
                    "egress": [{ "to": [{
                        "namespaceSelector": ns("z"),
                        "podSelector": pod("c"),
                    }] }],
                }),
            )],
        )
        .everywhere(
            open()
                .expect_all_egress("x/a", false)
                .expect("x/a", "z/c", true),
        ),
        Case::new(
            "x/a egress to namespace z or pods c (two peers)",
            vec![policy(
                "x",
                "a-to-z-or-c",
                json!({
                    "podSelector": pod("a"),
                    "policyTypes": ["Egress"],
                    "egress": [{ "to": [
                        { "namespaceSelector": ns("z") },
                        { "podSelector": pod("c") },
                    ] }],
                }),
            )],
        )
        .everywhere(
            open()
                .expect_all_egress("x/a", false)
                .expect("x/a", "z/*", true)
                .expect("x/a", "x/c", true),
        ),
        Case::new(
            "y/c ingress from every pod of its own namespace (podSelector {})",
            vec![policy(
                "y",
                "c-from-y",
                json!({
                    "podSelector": pod("c"),
                    "ingress": [{ "from": [{ "podSelector": {} }] }],
                }),
            )],
        )
        .everywhere(
            open()
                .expect_all_ingress("y/c", false)
                .expect("y/*", "y/c", true),
        ),
        Case::new(
            "a policy selects pods of its namespace only (x/a isolated, y/a and z/a open)",
            vec![policy(
                "x",
                "isolate-a",
                json!({ "podSelector": pod("a"), "policyTypes": ["Ingress", "Egress"] }),
            )],
        )
        .everywhere(
            open()
                .expect_all_ingress("x/a", false)
                .expect_all_egress("x/a", false),
        ),
        Case::new(
            "one policy, both directions without policyTypes: x/c from y, to y",
            vec![policy(
                "x",
                "c-with-y",
                json!({
                    "podSelector": pod("c"),
                    "ingress": [{ "from": [{ "namespaceSelector": ns("y") }] }],
                    "egress": [{ "to": [{ "namespaceSelector": ns("y") }] }],
                }),
            )],
        )
        .everywhere(
            open()
                .expect_all_ingress("x/c", false)
                .expect_all_egress("x/c", false)
                .expect("y/*", "x/c", true)
                .expect("x/c", "y/*", true),
        ),
        Case::new(
            "selector terms AND together: x/c from ns z (labels and In) pods In [a b] NotIn [b]",
            vec![policy(
                "x",
                "c-from-z-a",
                json!({
                    "podSelector": pod("c"),
                    "ingress": [{ "from": [{
                        "namespaceSelector": {
                            "matchLabels": { "ns": "z" },
                            "matchExpressions": [
                                { "key": "ns", "operator": "In", "values": ["y", "z"] },
                            ],
                        },
                        "podSelector": { "matchExpressions": [
                            { "key": "pod", "operator": "In", "values": ["a", "b"] },
                            { "key": "pod", "operator": "NotIn", "values": ["b"] },
                        ] },
                    }] }],
                }),
            )],
        )
        .everywhere(
            open()
                .expect_all_ingress("x/c", false)
                .expect("z/a", "x/c", true),
        ),
        // matchExpressions.
        Case::new(
            "NotIn: x pods other than a take ingress from namespaces other than x and y",
            vec![policy(
                "x",
                "not-a-from-not-xy",
                json!({
                    "podSelector": expr("pod", "NotIn", &["a"]),
                    "ingress": [{ "from": [{
                        "namespaceSelector": expr("ns", "NotIn", &["x", "y"]),
                    }] }],
                }),
            )],
        )
        .everywhere(
            open()
                .expect_all_ingress("x/b", false)
                .expect_all_ingress("x/c", false)
                .expect("z/*", "x/b", true)
                .expect("z/*", "x/c", true),
        ),
        Case::new(
            "Exists: y pods egress only to pods a of any namespace",
            vec![policy(
                "y",
                "to-any-a",
                json!({
                    "podSelector": expr("pod", "Exists", &[]),
                    "policyTypes": ["Egress"],
                    "egress": [{ "to": [{
                        "namespaceSelector": expr("ns", "Exists", &[]),
                        "podSelector": expr("pod", "In", &["a"]),
                    }] }],
                }),
            )],
        )
        .everywhere(open().expect("y/*", "*", false).expect("y/*", "*/a", true)),
        Case::new(
            "DoesNotExist: a selector no pod matches isolates nothing; one all match does",
            vec![
                // No pod lacks the label pod: this policy selects nobody.
                policy(
                    "z",
                    "selects-nobody",
                    json!({
                        "podSelector": expr("pod", "DoesNotExist", &[]),
                        "policyTypes": ["Ingress", "Egress"],
                    }),
                ),
                // No pod and no namespace has the label tier: every z pod, from pods c anywhere.
                policy(
                    "z",
                    "from-c",
                    json!({
                        "podSelector": expr("tier", "DoesNotExist", &[]),
                        "ingress": [{ "from": [{
                            "namespaceSelector": expr("tier", "DoesNotExist", &[]),
                            "podSelector": pod("c"),
                        }] }],
                    }),
                ),
            ],
        )
        .everywhere(open().expect("*", "z/*", false).expect("*/c", "z/*", true)),
        // ipBlock, with pod addresses and the pod CIDR.
        Case::new(
            "ipBlock: x/a ingress from the pod CIDR except y/b/32 and z/c/32",
            vec![policy(
                "x",
                "a-from-cidr",
                json!({
                    "podSelector": pod("a"),
                    "ingress": [{ "from": [{ "ipBlock": {
                        "cidr": POD_CIDR,
                        "except": [env.cidr32("y/b"), env.cidr32("z/c")],
                    } }] }],
                }),
            )],
        )
        .everywhere(
            open()
                .expect("y/b", "x/a", false)
                .expect("z/c", "x/a", false),
        ),
        Case::new(
            "ipBlock: x/b egress to y/a/32 and to host 3's block except z/b/32",
            vec![policy(
                "x",
                "b-to-blocks",
                json!({
                    "podSelector": pod("b"),
                    "policyTypes": ["Egress"],
                    "egress": [{ "to": [
                        { "ipBlock": { "cidr": env.cidr32("y/a") } },
                        { "ipBlock": { "cidr": h3_block, "except": [env.cidr32("z/b")] } },
                    ] }],
                }),
            )],
        )
        // Host 3 holds x/c, y/a and z/b.
        .everywhere(
            open()
                .expect_all_egress("x/b", false)
                .expect("x/b", "y/a", true)
                .expect("x/b", "x/c", true),
        ),
        Case::new(
            "ipBlock: y ingress from 0.0.0.0/0 except host 1's pod block",
            vec![policy(
                "y",
                "from-all-but-h1",
                json!({
                    "podSelector": {},
                    "ingress": [{ "from": [{
                        "ipBlock": { "cidr": "0.0.0.0/0", "except": [h1_block] },
                    }] }],
                }),
            )],
        )
        // Host 1 holds x/a, y/b and z/c.
        .everywhere(
            open()
                .expect("x/a", "y/*", false)
                .expect("y/b", "y/*", false)
                .expect("z/c", "y/*", false),
        ),
        Case::new(
            "ipBlock: z/b egress to the pod CIDR except the x pods' /32s",
            vec![policy(
                "z",
                "b-to-cidr",
                json!({
                    "podSelector": pod("b"),
                    "policyTypes": ["Egress"],
                    "egress": [{ "to": [{ "ipBlock": {
                        "cidr": POD_CIDR,
                        "except": [env.cidr32("x/a"), env.cidr32("x/b"), env.cidr32("x/c")],
                    } }] }],
                }),
            )],
        )
        .everywhere(open().expect("z/b", "x/*", false)),
        // Ports and protocols.
        Case::new(
            "x ingress on TCP 80 only, from anyone",
            vec![policy(
                "x",
                "tcp-80",
                json!({ "podSelector": {}, "ingress": [{ "ports": [tcp(80)] }] }),
            )],
        )
        .on(&[TCP_80], open())
        .on(&[TCP_81, UDP_80, UDP_81], open().expect("*", "x/*", false)),
        Case::new(
            "protocol mismatch: y/b ingress on UDP 80 does not open TCP 80",
            vec![policy(
                "y",
                "b-udp-80",
                json!({
                    "podSelector": pod("b"),
                    "ingress": [{ "ports": [udp(80)] }],
                }),
            )],
        )
        .on(&[UDP_80], open())
        .on(
            &[TCP_80, TCP_81, UDP_81],
            open().expect_all_ingress("y/b", false),
        ),
        Case::new(
            "protocol mismatch: z ingress on SCTP 80-81 opens neither TCP nor UDP",
            vec![policy(
                "z",
                "sctp-only",
                json!({
                    "podSelector": {},
                    "ingress": [{ "ports": [{ "protocol": "SCTP", "port": 80, "endPort": 81 }] }],
                }),
            )],
        )
        .everywhere(open().expect("*", "z/*", false)),
        Case::new(
            "named port: x/a ingress on serve-81-tcp from every namespace",
            vec![policy(
                "x",
                "a-named-81",
                json!({
                    "podSelector": pod("a"),
                    "ingress": [{
                        "from": [{ "namespaceSelector": {} }],
                        "ports": [{ "port": "serve-81-tcp" }],
                    }],
                }),
            )],
        )
        .on(&[TCP_81], open())
        .on(
            &[TCP_80, UDP_80, UDP_81],
            open().expect_all_ingress("x/a", false),
        ),
        Case::new(
            "named port: z/c ingress on serve-80-udp",
            vec![policy(
                "z",
                "c-named-udp",
                json!({
                    "podSelector": pod("c"),
                    "ingress": [{ "ports": [{ "protocol": "UDP", "port": "serve-80-udp" }] }],
                }),
            )],
        )
        .on(&[UDP_80], open())
        .on(
            &[TCP_80, TCP_81, UDP_81],
            open().expect_all_ingress("z/c", false),
        ),
        Case::new(
            "named port: y/b egress to serve-80-tcp (resolved on the destination)",
            vec![policy(
                "y",
                "b-to-named-80",
                json!({
                    "podSelector": pod("b"),
                    "policyTypes": ["Egress"],
                    "egress": [{ "ports": [{ "port": "serve-80-tcp" }] }],
                }),
            )],
        )
        .on(&[TCP_80], open())
        .on(
            &[TCP_81, UDP_80, UDP_81],
            open().expect_all_egress("y/b", false),
        ),
        Case::new(
            "named port resolved on each destination: x ingress on web from z (a: 80, b c: 81)",
            vec![policy(
                "x",
                "web-from-z",
                json!({
                    "podSelector": {},
                    "ingress": [{
                        "from": [{ "namespaceSelector": ns("z") }],
                        "ports": [{ "port": "web" }],
                    }],
                }),
            )],
        )
        .on(
            &[TCP_80],
            open().expect("*", "x/*", false).expect("z/*", "x/a", true),
        )
        .on(
            &[TCP_81],
            open()
                .expect("*", "x/*", false)
                .expect("z/*", "x/b", true)
                .expect("z/*", "x/c", true),
        )
        .on(&[UDP_80, UDP_81], open().expect("*", "x/*", false)),
        Case::new(
            "named port resolved on each destination: y/c egress to web (a: 80, b c: 81)",
            vec![policy(
                "y",
                "c-to-web",
                json!({
                    "podSelector": pod("c"),
                    "policyTypes": ["Egress"],
                    "egress": [{ "ports": [{ "port": "web" }] }],
                }),
            )],
        )
        .on(
            &[TCP_80],
            open()
                .expect_all_egress("y/c", false)
                .expect("y/c", "*/a", true),
        )
        .on(
            &[TCP_81],
            open()
                .expect_all_egress("y/c", false)
                .expect("y/c", "*/b", true)
                .expect("y/c", "*/c", true),
        )
        .on(&[UDP_80, UDP_81], open().expect_all_egress("y/c", false)),
        Case::new(
            "named port no pod declares opens nothing (x/b ingress on serve-82-tcp)",
            vec![policy(
                "x",
                "b-named-82",
                json!({
                    "podSelector": pod("b"),
                    "ingress": [{ "ports": [{ "port": "serve-82-tcp" }] }],
                }),
            )],
        )
        .everywhere(open().expect_all_ingress("x/b", false)),
        // Peers and ports combine within a rule, never across rules.
        Case::new(
            "two rules stay apart: x/a from y on TCP 80, from x/c on UDP 81",
            vec![policy(
                "x",
                "a-two-rules",
                json!({
                    "podSelector": pod("a"),
                    "ingress": [
                        { "from": [{ "namespaceSelector": ns("y") }], "ports": [tcp(80)] },
                        { "from": [{ "podSelector": pod("c") }], "ports": [udp(81)] },
                    ],
                }),
            )],
        )
        .on(
            &[TCP_80],
            open()
                .expect_all_ingress("x/a", false)
                .expect("y/*", "x/a", true),
        )
        .on(
            &[UDP_81],
            open()
                .expect_all_ingress("x/a", false)
                .expect("x/c", "x/a", true),
        )
        .on(&[TCP_81, UDP_80], open().expect_all_ingress("x/a", false))
        .explains(
            "y/a",
            "x/a",
            TCP_80,
            OPEN,
            allowed_by("x/a-two-rules", "ingress[0]"),
        )
        .explains(
            "x/c",
            "x/a",
            UDP_81,
            OPEN,
            allowed_by("x/a-two-rules", "ingress[1]"),
        )
        .explains("x/c", "x/a", TCP_80, OPEN, denied_by("x/a-two-rules"))
        .explains("z/a", "x/a", TCP_80, OPEN, denied_by("x/a-two-rules")),
        Case::new(
            "one rule: each peer on each port (z/b to x/a and z/c, on TCP 81 and UDP 80)",
            vec![policy(
                "z",
                "b-one-rule",
                json!({
                    "podSelector": pod("b"),
                    "policyTypes": ["Egress"],
                    "egress": [{
                        "to": [
                            { "namespaceSelector": ns("x"), "podSelector": pod("a") },
                            { "podSelector": pod("c") },
                        ],
                        "ports": [tcp(81), udp(80)],
                    }],
                }),
            )],
        )
        .on(
            &[TCP_81, UDP_80],
            open()
                .expect_all_egress("z/b", false)
                .expect("z/b", "x/a", true)
                .expect("z/b", "z/c", true),
        )
        .on(&[TCP_80, UDP_81], open().expect_all_egress("z/b", false)),
        Case::new(
            "endPort: x ingress on UDP 80-81",
            vec![policy(
                "x",
                "udp-80-81",
                json!({
                    "podSelector": {},
                    "ingress": [{ "ports": [{ "protocol": "UDP", "port": 80, "endPort": 81 }] }],
                }),
            )],
        )
        .on(&[UDP_80, UDP_81], open())
        .on(&[TCP_80, TCP_81], open().expect("*", "x/*", false)),
        Case::new(
            "endPort: z/a egress on TCP 81-1000",
            vec![policy(
                "z",
                "a-to-81-1000",
                json!({
                    "podSelector": pod("a"),
                    "policyTypes": ["Egress"],
                    "egress": [{ "ports": [{ "protocol": "TCP", "port": 81, "endPort": 1000 }] }],
                }),
            )],
        )
        .on(&[TCP_81], open())
        .on(
            &[TCP_80, UDP_80, UDP_81],
            open().expect_all_egress("z/a", false),
        ),
        Case::new(
            "endPort: y/c ingress on TCP 1-80 (81 just outside)",
            vec![policy(
                "y",
                "c-1-80",
                json!({
                    "podSelector": pod("c"),
                    "ingress": [{ "ports": [{ "protocol": "TCP", "port": 1, "endPort": 80 }] }],
                }),
            )],
        )
        .on(&[TCP_80], open())
        .on(
            &[TCP_81, UDP_80, UDP_81],
            open().expect_all_ingress("y/c", false),
        ),
        // policyTypes.
        Case::new(
            "egress rules without policyTypes isolate ingress too (y: UDP 80 out, nothing in)",
            vec![policy(
                "y",
                "udp-80-out",
                json!({ "podSelector": {}, "egress": [{ "ports": [udp(80)] }] }),
            )],
        )
        .on(&[UDP_80], open().expect("*", "y/*", false))
        .on(
            &[TCP_80, TCP_81, UDP_81],
            open().expect("*", "y/*", false).expect("y/*", "*", false),
        ),
        Case::new(
            "policyTypes Egress only leaves ingress open (y: UDP 80 out)",
            vec![policy(
                "y",
                "udp-80-out",
                json!({
                    "podSelector": {},
                    "policyTypes": ["Egress"],
                    "egress": [{ "ports": [udp(80)] }],
                }),
            )],
        )
        .on(&[UDP_80], open())
        .on(&[TCP_80, TCP_81, UDP_81], open().expect("y/*", "*", false)),
        Case::new(
            "policyTypes Ingress only ignores the egress rules (x: from x only)",
            vec![policy(
                "x",
                "from-x",
                json!({
                    "podSelector": {},
                    "policyTypes": ["Ingress"],
                    "ingress": [{ "from": [{ "namespaceSelector": ns("x") }] }],
                    "egress": [{ "to": [{ "namespaceSelector": ns("z") }] }],
                }),
            )],
        )
        .everywhere(open().expect("*", "x/*", false).expect("x/*", "x/*", true))
        .explains("x/a", "z/a", TCP_80, OPEN, OPEN)
        .explains("z/a", "x/a", TCP_80, OPEN, denied_by("x/from-x")),
        Case::new(
            "z denies all egress but allows egress to namespace y",
            vec![
                policy(
                    "z",
                    "deny-all-egress",
                    json!({ "podSelector": {}, "policyTypes": ["Egress"] }),
                ),
                policy(
                    "z",
                    "to-y",
                    json!({
                        "podSelector": {},
                        "policyTypes": ["Egress"],
                        "egress": [{ "to": [{ "namespaceSelector": ns("y") }] }],
                    }),
                ),
            ],
        )
        .everywhere(open().expect("z/*", "*", false).expect("z/*", "y/*", true))
        .explains(
            "z/a",
            "y/b",
            TCP_80,
            allowed_by("z/to-y", "egress[0]"),
            OPEN,
        )
        .explains("z/a", "x/b", TCP_80, denied_by("z/deny-all-egress"), OPEN),
        Case::new(
            "two policies on x/a add up: TCP 80 from y, TCP 81 from z/c (x/b too)",
            vec![
                policy(
                    "x",
                    "a-80-from-y",
                    json!({
                        "podSelector": pod("a"),
                        "ingress": [{
                            "from": [{ "namespaceSelector": ns("y") }],
                            "ports": [{ "port": 80 }],
                        }],
                    }),
                ),
                policy(
                    "x",
                    "ab-81-from-z-c",
                    json!({
                        "podSelector": expr("pod", "In", &["a", "b"]),
                        "ingress": [{
                            "from": [{
                                "namespaceSelector": ns("z"),
                                "podSelector": pod("c"),
                            }],
                            "ports": [tcp(81)],
                        }],
                    }),
                ),
            ],
        )
        .on(
            &[TCP_80],
            open()
                .expect_all_ingress("x/a", false)
                .expect_all_ingress("x/b", false)
                .expect("y/*", "x/a", true),
        )
        .on(
            &[TCP_81],
            open()
                .expect_all_ingress("x/a", false)
                .expect_all_ingress("x/b", false)
                .expect("z/c", "x/a", true)
                .expect("z/c", "x/b", true),
        )
        .on(
            &[UDP_80, UDP_81],
            open()
                .expect_all_ingress("x/a", false)
                .expect_all_ingress("x/b", false),
        )
        .explains(
            "y/c",
            "x/a",
            TCP_80,
            OPEN,
            allowed_by("x/a-80-from-y", "ingress[0]"),
        )
        .explains(
            "z/c",
            "x/a",
            TCP_81,
            OPEN,
            allowed_by("x/ab-81-from-z-c", "ingress[0]"),
        )
        .explains("z/c", "x/b", TCP_80, OPEN, denied_by("x/ab-81-from-z-c")),
        Case::new(
            "a connection needs both ends: x/a from y only, y to x only",
            vec![
                policy(
                    "x",
                    "a-from-y",
                    json!({
                        "podSelector": pod("a"),
                        "ingress": [{ "from": [{ "namespaceSelector": ns("y") }] }],
                    }),
                ),
                policy(
                    "y",
                    "to-x",
                    json!({
                        "podSelector": {},
                        "policyTypes": ["Egress"],
                        "egress": [{ "to": [{ "namespaceSelector": ns("x") }] }],
                    }),
                ),
            ],
        )
        .everywhere(
            open()
                .expect_all_ingress("x/a", false)
                .expect("y/*", "*", false)
                .expect("y/*", "x/*", true),
        )
        .explains(
            "y/a",
            "x/a",
            TCP_80,
            allowed_by("y/to-x", "egress[0]"),
            allowed_by("x/a-from-y", "ingress[0]"),
        )
        .explains("y/b", "z/a", UDP_80, denied_by("y/to-x"), OPEN)
        .explains("z/a", "x/a", TCP_81, OPEN, denied_by("x/a-from-y")),
        Case::new(
            "egress allowed everywhere does not beat the destination's ingress (y/b closed)",
            vec![
                policy(
                    "x",
                    "allow-all-egress",
                    json!({ "podSelector": {}, "policyTypes": ["Egress"], "egress": [{}] }),
                ),
                policy(
                    "y",
                    "b-closed",
                    json!({ "podSelector": pod("b"), "policyTypes": ["Ingress"] }),
                ),
            ],
        )
        .everywhere(open().expect_all_ingress("y/b", false)),
        Case::new("all policies deleted: everything open again", vec![]).everywhere(open()),
    ]
}

/// Labels added to the base ones: (namespace or ns/pod, key, value).
type ExtraLabels = &'static [(&'static str, &'static str, &'static str)];

/// Labels change under a fixed policy list: the agents re-evaluate which namespaces and pods
/// the selectors match (peers and the selected pods alike) when PUT /v1/namespaces and
/// /v1/pods relabel them, and undo it when the labels go.
fn label_changes(env: &Env, log: &mut Vec<Outcome>) {
    let blue = json!({ "matchLabels": { "team": "blue" } });
    let policies = vec![
        policy(
            "x",
            "a-from-blue",
            json!({
                "podSelector": pod("a"),
                "ingress": [{ "from": [
                    { "namespaceSelector": blue },
                    { "namespaceSelector": {}, "podSelector": blue },
                ] }],
            }),
        ),
        policy(
            "y",
            "blue-only-to-x",
            json!({
                "podSelector": blue,
                "policyTypes": ["Egress"],
                "egress": [{ "to": [{ "namespaceSelector": ns("x") }] }],
            }),
        ),
    ];
    let closed = open().expect_all_ingress("x/a", false);
    let z_blue = closed.expect("z/*", "x/a", true);
    let steps: [(&str, ExtraLabels, Reachability); 4] = [
        ("labels: nothing is team=blue, x/a closed", &[], closed),
        (
            "labels: namespace z becomes team=blue, z reaches x/a",
            &[("z", "team", "blue")],
            z_blue,
        ),
        (
            "labels: pod y/b becomes team=blue too: reaches x/a, egress only to x",
            &[("z", "team", "blue"), ("y/b", "team", "blue")],
            z_blue
                .expect("y/b", "x/a", true)
                .expect("y/b", "*", false)
                .expect("y/b", "x/*", true),
        ),
        ("labels: back to none, x/a closed again", &[], closed),
    ];
    for (i, (name, extra, reachability)) in steps.into_iter().enumerate() {
        let case = Case::new(name, policies.clone()).everywhere(reachability);
        if i == 0 {
            run_case(env, &case, log);
            continue;
        }
        let started = Instant::now();
        let result = env.register(extra).and_then(|()| env.verify(&case));
        report(log, name, result, started.elapsed());
    }
}

/// Before the update: x/a takes TCP and UDP 80 from the pods b of every namespace.
fn update_before() -> Case {
    Case::new(
        "update, before: x/a takes TCP and UDP 80 from pods b of every namespace",
        vec![policy(
            "x",
            "a-from-b",
            json!({
                "podSelector": pod("a"),
                "ingress": [{
                    "from": [{ "namespaceSelector": {}, "podSelector": pod("b") }],
                    "ports": [tcp(80), udp(80)],
                }],
            }),
        )],
    )
    .on(
        &[TCP_80, UDP_80],
        open()
            .expect_all_ingress("x/a", false)
            .expect("*/b", "x/a", true),
    )
    .on(&[TCP_81, UDP_81], open().expect_all_ingress("x/a", false))
}

/// After the update: x/a takes TCP and UDP 80 from pods b of x and z only (y/b's connections
/// are now denied by x/a's ingress), z loses all egress (z/b's are now denied by their
/// source's egress), and x/a loses all egress (x/b's stay allowed: x/a's replies are replies,
/// not x/a's egress).
fn update_after() -> Case {
    Case::new(
        "update, after: x/a from b in x and z only; z and x/a without egress",
        vec![
            policy(
                "x",
                "a-from-b",
                json!({
                    "podSelector": pod("a"),
                    "ingress": [{
                        "from": [{
                            "namespaceSelector": expr("ns", "In", &["x", "z"]),
                            "podSelector": pod("b"),
                        }],
                        "ports": [tcp(80), udp(80)],
                    }],
                }),
            ),
            policy(
                "x",
                "a-no-egress",
                json!({ "podSelector": pod("a"), "policyTypes": ["Egress"] }),
            ),
            policy(
                "z",
                "no-egress",
                json!({ "podSelector": {}, "policyTypes": ["Egress"] }),
            ),
        ],
    )
    .on(
        &[TCP_80, UDP_80],
        open()
            .expect_all_ingress("x/a", false)
            .expect("x/b", "x/a", true)
            .expect_all_egress("x/a", false)
            .expect("z/*", "*", false),
    )
    .on(
        &[TCP_81, UDP_81],
        open()
            .expect_all_ingress("x/a", false)
            .expect_all_egress("x/a", false)
            .expect("z/*", "*", false),
    )
}

/// Connections opened under `update_before`, exchanging data across the update to
/// `update_after`: x/b's keeps going, y/b's and z/b's stop, new connections follow the new
/// matrix.
fn update_with_open_connections(env: &Env, log: &mut Vec<Outcome>) {
    let before = update_before();
    run_case(env, &before, log);
    let started = Instant::now();
    let mut problems = Vec::new();
    let x_a = env.ip("x/a");
    let mut conns: Vec<(OpenConnection, bool)> = Vec::new();
    for (src, stays) in [("x/b", true), ("y/b", false), ("z/b", false)] {
        for port in [TCP_80, UDP_80] {
            let ns = &env.ns[pod_index(src)];
            match OpenConnection::connect(ns, src, x_a, "x/a", port, ECHO_TIMEOUT) {
                Ok(mut c) => {
                    if c.exchange(ECHO_TIMEOUT) {
                        conns.push((c, stays));
                    } else {
                        problems.push(format!("{}: no echo before the update", c.label));
                    }
                }
                Err(e) => problems.push(format!("{src} -> x/a {port}: connect: {e}")),
            }
        }
    }
    let after = update_after();
    if let Err(e) = env.apply(&after.policies) {
        problems.push(e);
    }
    // Right after the update, then again after the new matrix has been probed.
    for round in ["right after the update", "after probing the new matrix"] {
        // Each flow on its own thread: a denied one costs a whole echo timeout.
        let found: Vec<Option<String>> = thread::scope(|scope| {
            let checks: Vec<_> = conns
                .iter_mut()
                .map(|(c, stays)| {
                    let stays = *stays;
                    scope.spawn(move || check_flow(c, stays, round))
                })
                .collect();
            checks
                .into_iter()
                .map(|h| h.join().expect("flow check"))
                .collect()
        });
        problems.extend(found.into_iter().flatten());
        if round == "right after the update" {
            match env.verify(&after) {
                Ok(_) => {}
                Err(grids) => problems.push(grids),
            }
        }
    }
    let result = if problems.is_empty() {
        Ok(String::from(
            ", x/b's TCP and UDP flows kept going, y/b's and z/b's stopped",
        ))
    } else {
        Err(problems.join("\n"))
    };
    report(log, &after.name, result, started.elapsed());
}

/// Whether flow `c` behaves as the update says: a flow that `stays` allowed keeps echoing (five
/// bytes in a row), any other gets nothing through. What went wrong, if anything.
fn check_flow(c: &mut OpenConnection, stays: bool, round: &str) -> Option<String> {
    if stays {
        let got = (0..5).filter(|_| c.exchange(ECHO_TIMEOUT)).count();
        (got != 5).then(|| {
            format!(
                "{}: still allowed, but {got} of 5 echoes came back {round}",
                c.label
            )
        })
    } else {
        c.exchange(ECHO_TIMEOUT).then(|| {
            format!(
                "{}: denied by the update, yet data got through {round}",
                c.label
            )
        })
    }
}

/// Invalid lists are refused whole by every agent, naming the bad field, and change nothing:
/// neither the stored list nor reachability (`current` is applied and stays in force).
fn invalid_policies_change_nothing(env: &Env, current: &Case, log: &mut Vec<Outcome>) {
    run_case(env, current, log);
    let started = Instant::now();
    let mut problems = Vec::new();
    let stored_before = env.every_agent("GET", "/v1/networkpolicies", None);
    let status_before = policy_generations(env);
    let bad_operator = policy(
        "x",
        "bad-operator",
        json!({
            "podSelector": {},
            "ingress": [{ "from": [{ "namespaceSelector": expr("ns", "Has", &["y"]) }] }],
        }),
    );
    let bad_cidr = policy(
        "x",
        "bad-cidr",
        json!({
            "podSelector": {},
            "ingress": [{ "from": [{ "ipBlock": { "cidr": "10.244.0.0/33" } }] }],
        }),
    );
    let bad_range = policy(
        "y",
        "bad-range",
        json!({
            "podSelector": {},
            "ingress": [{ "ports": [{ "protocol": "TCP", "port": 81, "endPort": 80 }] }],
        }),
    );
    let bad_protocol = policy(
        "z",
        "bad-protocol",
        json!({
            "podSelector": {},
            "policyTypes": ["Egress"],
            "egress": [{ "ports": [{ "protocol": "ICMP", "port": 80 }] }],
        }),
    );
    let operator_field = "spec.ingress[0].from[0].namespaceSelector.matchExpressions[0].operator";
    let cidr_field = "spec.ingress[0].from[0].ipBlock.cidr";
    let range_field = "spec.ingress[0].ports[0].endPort";
    let protocol_field = "spec.egress[0].ports[0].protocol";
    // A valid policy that would isolate everything, so that applying any part shows.
    let valid = policy(
        "y",
        "deny-all",
        json!({ "podSelector": {}, "policyTypes": ["Ingress", "Egress"] }),
    );
    let lists: Vec<(&str, Vec<Value>, Vec<&str>)> = vec![
        (
            "bad selector operator",
            vec![bad_operator.clone()],
            vec![operator_field],
        ),
        ("bad CIDR", vec![bad_cidr.clone()], vec![cidr_field]),
        (
            "endPort below port",
            vec![bad_range.clone()],
            vec![range_field],
        ),
        (
            "protocol ICMP",
            vec![bad_protocol.clone()],
            vec![protocol_field],
        ),
        (
            "a valid policy beside all four",
            vec![valid, bad_operator, bad_cidr, bad_range, bad_protocol],
            vec![operator_field, cidr_field, range_field, protocol_field],
        ),
    ];
    for (what, list, fields) in lists {
        for (i, (code, body)) in env
            .every_agent(
                "PUT",
                "/v1/networkpolicies",
                Some(&Value::Array(list.clone())),
            )
            .into_iter()
            .enumerate()
        {
            if code != 400 {
                problems.push(format!("{what}: agent h{} answered {code}: {body}", i + 1));
            }
            for field in &fields {
                if !body.contains(field) {
                    problems.push(format!(
                        "{what}: agent h{}'s answer does not name {field}: {body}",
                        i + 1
                    ));
                }
            }
        }
    }
    if env.every_agent("GET", "/v1/networkpolicies", None) != stored_before {
        problems.push("the stored policy lists changed".to_owned());
    }
    if policy_generations(env) != status_before {
        problems.push(format!(
            "the policy generations changed: {status_before:?} -> {:?}",
            policy_generations(env)
        ));
    }
    match env.verify(current) {
        Ok(_) => {}
        Err(grids) => problems.push(format!("reachability changed:\n{grids}")),
    }
    let result = if problems.is_empty() {
        Ok(String::from(
            ", 5 invalid lists refused by every agent, fields named",
        ))
    } else {
        Err(problems.join("\n"))
    };
    report(
        log,
        &format!("invalid policies change nothing (under: {})", current.name),
        result,
        started.elapsed(),
    );
}

/// Each agent's `policy.generation` from `GET /v1/status`.
fn policy_generations(env: &Env) -> Vec<Option<u64>> {
    env.every_agent("GET", "/v1/status", None)
        .into_iter()
        .map(|(_, body)| {
            serde_json::from_str::<Value>(&body)
                .ok()
                .and_then(|v| v["policy"]["generation"].as_u64())
        })
        .collect()
}

/// What became of one case.
#[derive(Debug)]
struct Outcome {
    name: String,
    passed: bool,
}

fn report(log: &mut Vec<Outcome>, name: &str, result: Result<String, String>, took: Duration) {
    let n = log.len() + 1;
    match &result {
        Ok(notes) => println!(
            "[{n:>2}] ok     {name} ({:.1} s{notes})",
            took.as_secs_f64()
        ),
        Err(grids) => println!(
            "[{n:>2}] FAILED {name} ({:.1} s)\n{grids}",
            took.as_secs_f64()
        ),
    }
    log.push(Outcome {
        name: name.to_owned(),
        passed: result.is_ok(),
    });
}

/// Applies `case` on every agent, then probes and explains it.
fn run_case(env: &Env, case: &Case, log: &mut Vec<Outcome>) {
    let started = Instant::now();
    let result = env.apply(&case.policies).and_then(|()| env.verify(case));
    report(log, &case.name, result, started.elapsed());
}

#[test]
#[cfg_attr(
    not(feature = "privileged"),
    ignore = "privileged: needs root, BPF and network namespaces"
)]
fn network_policy_truth_table() {
    let started = Instant::now();
    let env = Env::new();
    env.wait_until_all_reachable();
    println!(
        "world up in {:.1} s: 3 hosts (vxlan), 9 pods, servers on {}",
        started.elapsed().as_secs_f64(),
        ALL_PORTS.map(|p| p.to_string()).join(" ")
    );
    env.require_policy_api();
    env.register(&[]).expect("registering namespaces and pods");

    let mut log = Vec::new();
    let cases = cases(&env);
    let (last, cases) = cases.split_last().expect("cases");
    for case in cases {
        run_case(&env, case, &mut log);
    }
    label_changes(&env, &mut log);
    update_with_open_connections(&env, &mut log);
    let additive = cases
        .iter()
        .find(|c| c.name.starts_with("two policies on x/a add up"))
        .expect("the additive case");
    invalid_policies_change_nothing(&env, additive, &mut log);
    // Deleting every policy restores reachability.
    run_case(&env, last, &mut log);

    let failed: Vec<&str> = log
        .iter()
        .filter(|o| !o.passed)
        .map(|o| o.name.as_str())
        .collect();
    println!(
        "policy truth table: {} of {} cases passed in {:.1} s",
        log.len() - failed.len(),
        log.len(),
        started.elapsed().as_secs_f64()
    );
    assert!(
        failed.is_empty(),
        "{} of {} cases failed (grids above): {failed:#?}",
        failed.len(),
        log.len()
    );
}
