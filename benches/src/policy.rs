//! The NetworkPolicy suite (`slipway bench policy`, issue 4): what policy costs the datapath and
//! how fast a change takes effect, for Slipway beside the same rules as iptables on Debian's
//! `bridge` + `host-local` plugins, all in one run.
//!
//! - Traffic: pod↔pod TCP throughput (iperf3) and TCP request/response (sockperf ping-pong: the
//!   round-trip rate and the RTT p50) between two pods on one host, with 0, 1,000 and 10,000
//!   ingress rules selecting the server pod. Every rule is one that the measured flow does not
//!   match (an ipBlock /32 elsewhere, or the client on another port), spread over ten policies,
//!   plus one rule that allows the client. The bridge baseline gets the same rules as
//!   `-A FORWARD` rules ahead of the client's ACCEPT (bridged traffic crosses FORWARD with
//!   bridge-nf-call-iptables), loaded with one `iptables-restore`. Each run visits every rule
//!   count and measures Slipway and the bridge alternately at each. The suite pins itself, and
//!   so iperf3 and sockperf on both ends, to one CPU meanwhile (see [`Pinned`]).
//! - Apply→enforced: a probe loop in the client pod's namespace sends one UDP echo request a
//!   millisecond, each from a 4-tuple not used within [`TUPLE_REUSE_AFTER`] (so no
//!   connection-tracking entry from an earlier verdict can answer for it: the tuples rotate, and
//!   the loop waits when the oldest is not that old yet), while the allow rule is added and
//!   removed; a flip's
//!   latency is the time from sending `PUT /v1/networkpolicies` (for the baseline: starting
//!   `iptables-restore`) to the first probe that sees the new verdict. A baseline that fails
//!   (iptables-restore, its probes) is reported as failed in its records, and the suite goes on.
//!
//! The world, agents and pods come from the CNI suite's harness ([`crate::cni`]); everything
//! lives in the world's namespaces and is torn down on drop, also on error.

use std::collections::BTreeMap;
use std::io::{ErrorKind, Write as _};
use std::net::{Ipv4Addr, UdpSocket};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};
use serde_json::{Value, json};
use slipway_cni::policy::types::ObjectMeta;
use slipway_cni::policy::{
    IPBlock, IntOrString, LabelSelector, NetworkPolicy, NetworkPolicyIngressRule as IngressRule,
    NetworkPolicyPeer as Peer, NetworkPolicyPort, NetworkPolicySpec,
};
use slipway_dataplane::netns;
use slipway_dataplane::world::Netns;
use slipway_local::LocalClient;

use crate::cni::{
    BRIDGE_PLUGIN, Bench, Binaries, Pair, PingPong, PodRef, check_reference_plugins, percentile,
    percentile_record, sockperf_ping_pong,
};
use crate::report::{Metric, Record, Samples, median};

pub const SUITE: &str = "policy";
const STEPS: u32 = 6;

/// Rule counts of the traffic metrics, and those of the apply→enforced metrics.
const TRAFFIC_LEVELS: [usize; 3] = [0, 1_000, 10_000];
const LATENCY_LEVELS: [usize; 2] = [0, 10_000];
/// The background rules are spread over this many policies.
const POLICIES: usize = 10;
/// Every tenth background rule is a port rule (the client, on a port the flow does not use);
/// the others are ipBlock /32 rules for TCP port 80 from `172.16.0.0/12`.
const PORT_RULE_EVERY: usize = 10;
const PORT_RULE_BASE: u16 = 30_000;

const SLIPWAY_HOST: usize = 1;
const BRIDGE_HOST: usize = 2;
const NAMESPACE: &str = "bench";
const CLIENT: &str = "client";
const SERVER: &str = "server";
const NO_POLICY: &str = "slipway-no-policy";
/// Tags the rules this suite writes, so a leak into the root namespace is unambiguous.
const MARKER: &str = "slipway-bench-policy";

/// The probe loop: UDP echo to one of these ports on the server pod from a source port of
/// this range, which the rule counts of [`LATENCY_LEVELS`] split between them (8 x 20,000
/// four-tuples per rule count, used in turn, see [`Tuples`]).
const PROBE_PORTS: [u16; 8] = [7101, 7102, 7103, 7104, 7105, 7106, 7107, 7108];
const PROBE_SOURCE_PORTS: (u16, u16) = (20_000, 60_000);
const PROBE_INTERVAL: Duration = Duration::from_millis(1);
/// A four-tuple is used again only this long after its last use: longer than any connection
/// tracking entry of one echo lives on the baseline (Linux UDP: 30 s, 120 s for a stream), so
/// an old verdict cannot answer for a new probe. (Slipway's policy conntrack decides an entry
/// of an older policy generation again anyway.)
const TUPLE_REUSE_AFTER: Duration = Duration::from_secs(150);
/// A probe not answered within this is lost (an answer takes ~0.1 ms here).
const PROBE_WINDOW: Duration = Duration::from_millis(20);
/// Before each flip, the probes must show the old verdict: an echo (old allow), or this many
/// losses and no echo (old deny), within [`PRE_FLIP_TIMEOUT`].
const PRE_FLIP_LOSSES: usize = 3;
const PRE_FLIP_TIMEOUT: Duration = Duration::from_secs(2);
/// A deny is confirmed by this many lost probes in a row sent after the apply returned.
const DENY_CONFIRM: usize = 20;
const FLIP_TIMEOUT: Duration = Duration::from_secs(10);

/// How long and how often to measure.
#[derive(Debug, Clone, Copy)]
pub struct Options {
    /// Runs per side and rule count of the traffic metrics.
    pub runs: usize,
    /// Length of each iperf3 run.
    pub iperf_duration: Duration,
    /// Length of each sockperf ping-pong run (its first 400 ms are warm-up).
    pub sockperf_duration: Duration,
    /// Policy flips per side and rule count (alternately to allow and to deny); with 100,
    /// the nearest-rank p99 is the second worst, not the worst.
    pub flips: usize,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            runs: 3,
            iperf_duration: Duration::from_secs(2),
            sockperf_duration: Duration::from_secs(2),
            flips: 100,
        }
    }
}

/// Runs the suite, printing progress and a matrix of the medians to stderr.
pub fn run(options: Options) -> anyhow::Result<Vec<Record>> {
    ensure!(options.runs > 0, "runs: must be at least 1");
    ensure!(options.flips >= 2, "flips: must be at least 2");
    let step = |n: u32, what: &str| eprintln!("[{n}/{STEPS}] {what}");
    let binaries = Binaries::beside_current_exe()?;
    check_reference_plugins()?;
    eprintln!("      load average: {}", load_average());

    step(
        1,
        "building a 2-host world: Slipway agent on host 1, bridge plugin on host 2",
    );
    let bench = Bench::new(binaries, 2)?;
    let nf = bench.bridge_nf_call_iptables(BRIDGE_HOST)?;
    eprintln!("      {nf}");
    let cluster = bench.cluster("vxlan", "10.244", &[SLIPWAY_HOST])?;
    let agent = Agent {
        socket: &cluster.hosts[0].socket,
    };

    step(
        2,
        "creating pods (plugins exec'd as a runtime does), telling the agent about them",
    );
    let sa = bench.slipway_pod(&cluster, 0, "pa")?;
    let sb = bench.slipway_pod(&cluster, 0, "pb")?;
    let ba = bench.bridge_pod(BRIDGE_HOST, "ba")?;
    let bb = bench.bridge_pod(BRIDGE_HOST, "bb")?;
    bench.check_root_namespace_untouched()?;
    check_root_iptables()?;
    agent.announce_pods(&sa, &sb)?;
    let slipway = Pair::new("slipway", &sa.netns, &sb.netns, sb.ip);
    let bridge = Pair::new(BRIDGE_PLUGIN, &ba.netns, &bb.netns, bb.ip);
    slipway.check_reachable()?;
    bridge.check_reachable()?;
    let iptables = Iptables::new(&bench.world.host(BRIDGE_HOST).netns)?;
    eprintln!("      bridge host: {}", iptables.version);
    let iptables_label = format!("bridge-iptables-{}", iptables.backend());

    step(
        3,
        &format!(
            "traffic: {} runs; each visits 0, 1,000, 10,000 rules (Slipway PUT, \
             iptables-restore) and runs iperf3 and sockperf, slipway and bridge alternating",
            options.runs
        ),
    );
    let traffic = measure_traffic(&options, &agent, &iptables, (&slipway, &bridge), ba.ip)?;

    step(
        4,
        &format!(
            "apply->enforced: {} flips per side at 0 and 10,000 background rules, alternating",
            options.flips
        ),
    );
    let mut latency = Vec::new();
    for (slot, level) in LATENCY_LEVELS.into_iter().enumerate() {
        let flips = measure_flips(
            options.flips,
            (slot, level),
            &agent,
            &iptables,
            (&slipway, &bridge),
            ba.ip,
        )?;
        latency.push((level, flips));
    }

    step(5, "records");
    let mut records = traffic.records(&iptables_label)?;
    for (level, flips) in &latency {
        records.extend(flips.records(*level)?);
    }
    eprint!("{}", traffic.matrix(&iptables.version));
    for (level, flips) in &latency {
        eprint!("{}", flips.summary(*level));
    }
    eprintln!("      load average: {}", load_average());

    step(
        6,
        "tearing down (iptables, agents, namespaces, bpffs, cgroups)",
    );
    drop(iptables);
    bench.check_root_namespace_untouched()?;
    check_root_iptables()?;
    drop(bench);
    Ok(records)
}

/// The background rules: the same list becomes Slipway ingress rules and iptables rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Background {
    /// From this /32, TCP port 80.
    IpBlock(Ipv4Addr),
    /// From the client pod, this TCP port.
    Port(u16),
}

fn background(level: usize) -> Vec<Background> {
    (0..level)
        .map(|i| {
            if i % PORT_RULE_EVERY == PORT_RULE_EVERY - 1 {
                Background::Port(PORT_RULE_BASE + (i / PORT_RULE_EVERY) as u16)
            } else {
                // 172.16.0.1 and up: never a pod of this world.
                Background::IpBlock(Ipv4Addr::from(
                    u32::from(Ipv4Addr::new(172, 16, 0, 1)) + i as u32,
                ))
            }
        })
        .collect()
}

/// What the server pod is exposed to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// No policy selects the server (Slipway), no rules (iptables).
    Open,
    /// `level` background rules select the server and the client is allowed.
    Allow(usize),
    /// `level` background rules select the server and nothing allows the client.
    Deny(usize),
}

fn labels(app: &str) -> BTreeMap<String, String> {
    BTreeMap::from([("app".to_owned(), app.to_owned())])
}

fn selector(app: &str) -> LabelSelector {
    LabelSelector {
        match_labels: Some(labels(app)),
        ..LabelSelector::default()
    }
}

fn policy(name: &str, ingress: Vec<IngressRule>) -> NetworkPolicy {
    NetworkPolicy {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            namespace: Some(NAMESPACE.to_owned()),
            ..ObjectMeta::default()
        },
        spec: Some(NetworkPolicySpec {
            pod_selector: Some(selector(SERVER)),
            policy_types: Some(vec!["Ingress".to_owned()]),
            ingress: Some(ingress),
            egress: None,
        }),
    }
}

fn tcp_port(port: u16) -> NetworkPolicyPort {
    NetworkPolicyPort {
        protocol: Some("TCP".to_owned()),
        port: Some(IntOrString::Int(port.into())),
        end_port: None,
    }
}

/// The NetworkPolicy list of `state`: the background rules in [`POLICIES`] policies, a policy
/// with no rules that isolates the server (so a deny needs no background), and the client's
/// allow rule in a policy of its own.
fn policies(state: State) -> Vec<NetworkPolicy> {
    let (level, allow) = match state {
        State::Open => return Vec::new(),
        State::Allow(level) => (level, true),
        State::Deny(level) => (level, false),
    };
    let rules: Vec<IngressRule> = background(level)
        .into_iter()
        .map(|rule| match rule {
            Background::IpBlock(ip) => IngressRule {
                from: Some(vec![Peer {
                    ip_block: Some(IPBlock {
                        cidr: format!("{ip}/32"),
                        except: None,
                    }),
                    ..Peer::default()
                }]),
                ports: Some(vec![tcp_port(80)]),
            },
            Background::Port(port) => IngressRule {
                from: Some(vec![Peer {
                    pod_selector: Some(selector(CLIENT)),
                    ..Peer::default()
                }]),
                ports: Some(vec![tcp_port(port)]),
            },
        })
        .collect();
    let mut out: Vec<NetworkPolicy> = rules
        .chunks(level.div_ceil(POLICIES).max(1))
        .enumerate()
        .map(|(i, chunk)| policy(&format!("background-{i}"), chunk.to_vec()))
        .collect();
    out.push(policy("isolate-server", Vec::new()));
    if allow {
        out.push(policy(
            "allow-client",
            vec![IngressRule {
                from: Some(vec![Peer {
                    pod_selector: Some(selector(CLIENT)),
                    ..Peer::default()
                }]),
                ports: None,
            }],
        ));
    }
    out
}

/// The same state as `-A FORWARD` rules for the bridge pods: the background rules, the
/// client's ACCEPT, and a DROP of the rest towards the server (its isolation).
fn forward_rules(state: State, client: Ipv4Addr, server: Ipv4Addr) -> Vec<String> {
    let (level, allow) = match state {
        State::Open => return Vec::new(),
        State::Allow(level) => (level, true),
        State::Deny(level) => (level, false),
    };
    let mut rules: Vec<String> = background(level)
        .into_iter()
        .map(|rule| match rule {
            Background::IpBlock(ip) => {
                format!("-A FORWARD -s {ip}/32 -d {server}/32 -p tcp -m tcp --dport 80 -j ACCEPT")
            }
            Background::Port(port) => format!(
                "-A FORWARD -s {client}/32 -d {server}/32 -p tcp -m tcp --dport {port} -j ACCEPT"
            ),
        })
        .collect();
    if allow {
        rules.push(format!(
            "-A FORWARD -s {client}/32 -d {server}/32 -m comment --comment {MARKER} -j ACCEPT"
        ));
    }
    rules.push(format!(
        "-A FORWARD -d {server}/32 -m comment --comment {MARKER} -j DROP"
    ));
    rules
}

/// The Slipway agent's local API.
struct Agent<'a> {
    socket: &'a std::path::Path,
}

impl Agent<'_> {
    fn call(&self, method: &str, path: &str, body: Option<&Value>) -> anyhow::Result<Value> {
        let body = body.map(serde_json::to_vec).transpose()?;
        let answer = LocalClient::new(self.socket)
            .request(method, path, body.as_deref())
            .with_context(|| format!("agent: {method} {path}"))?;
        let (code, text) = (answer.status, answer.text());
        ensure!(code == 200, "agent: {method} {path}: {code} {text}");
        if text.trim().is_empty() {
            return Ok(Value::Null);
        }
        serde_json::from_str(&text).with_context(|| format!("agent: {method} {path}: {text}"))
    }

    /// The namespace and both pods, with the labels the policies select.
    fn announce_pods(&self, client: &PodRef, server: &PodRef) -> anyhow::Result<()> {
        self.call(
            "PUT",
            "/v1/namespaces",
            Some(&json!([{ "name": NAMESPACE, "labels": { "ns": NAMESPACE } }])),
        )?;
        let pod = |name: &str, ip: Ipv4Addr| {
            json!({ "namespace": NAMESPACE, "name": name, "ip": ip, "labels": labels(name),
                    "ports": [] })
        };
        self.call(
            "PUT",
            "/v1/pods",
            Some(&json!([pod(CLIENT, client.ip), pod(SERVER, server.ip)])),
        )?;
        Ok(())
    }

    /// PUTs `policies` (the agent answers once the datapath enforces them).
    fn apply(&self, policies: &Value) -> anyhow::Result<()> {
        self.call("PUT", "/v1/networkpolicies", Some(policies))
            .map(drop)
    }

    /// Checks, with the agent's explain, that `state` is what the agent enforces for the
    /// client's iperf3 connection, and that the agent reports no policy errors.
    fn check(&self, state: State) -> anyhow::Result<()> {
        let path = format!(
            "/v1/policy/explain?src={NAMESPACE}/{CLIENT}&dst={NAMESPACE}/{SERVER}&port=5201&protocol=TCP"
        );
        let explain = self.call("GET", &path, None)?;
        let (allowed, verdict) = match state {
            State::Open => (true, "open"),
            State::Allow(_) => (true, "allow"),
            State::Deny(_) => (false, "deny"),
        };
        ensure!(
            explain["allowed"] == allowed && explain["ingress"]["verdict"] == verdict,
            "agent explains {state:?} as {explain}"
        );
        let status = self.call("GET", "/v1/status", None)?;
        let policy = &status["policy"];
        let empty = |v: &Value| v.as_array().is_none_or(Vec::is_empty);
        ensure!(
            empty(&policy["failClosed"]) && empty(&policy["errors"]),
            "agent reports policy trouble at {state:?}: {policy}"
        );
        Ok(())
    }
}

/// The bridge host's filter table: its state before the suite, and loading it with rules in
/// FORWARD ahead of what was there. Restored on drop.
struct Iptables<'a> {
    netns: &'a Netns,
    /// `iptables-save -t filter` before the suite.
    snapshot: String,
    /// `iptables -V`, e.g. "iptables v1.8.9 (nf_tables)".
    version: String,
}

impl<'a> Iptables<'a> {
    fn new(netns: &'a Netns) -> anyhow::Result<Self> {
        let version = netns.run(&["iptables", "-V"])?.trim().to_owned();
        let snapshot = netns.run(&["iptables-save", "-t", "filter"])?;
        ensure!(
            snapshot.contains("*filter") && snapshot.contains("COMMIT"),
            "iptables-save -t filter in {}: no filter table:\n{snapshot}",
            netns.name()
        );
        Ok(Self {
            netns,
            snapshot,
            version,
        })
    }

    /// "nft" or "legacy".
    fn backend(&self) -> &'static str {
        if self.version.contains("nf_tables") {
            "nft"
        } else {
            "legacy"
        }
    }

    /// The `iptables-restore` input that replaces the filter table with the snapshot plus
    /// `rules` at the head of FORWARD.
    fn render(&self, rules: &[String]) -> String {
        with_forward_rules(&self.snapshot, rules)
    }

    /// Loads `text` (from [`Self::render`]) with one `iptables-restore`.
    fn restore(&self, text: &str) -> anyhow::Result<()> {
        let mut child = self
            .netns
            .command(&["iptables-restore"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting iptables-restore")?;
        child
            .stdin
            .take()
            .context("iptables-restore stdin")?
            .write_all(text.as_bytes())
            .context("writing to iptables-restore")?;
        let output = child.wait_with_output()?;
        ensure!(
            output.status.success(),
            "iptables-restore in {}: {}",
            self.netns.name(),
            String::from_utf8_lossy(&output.stderr).trim()
        );
        Ok(())
    }
}

impl Drop for Iptables<'_> {
    fn drop(&mut self) {
        let _ = self.restore(&self.snapshot.clone());
    }
}

/// `save` (one `iptables-save -t filter`) with `rules` inserted before its first FORWARD rule,
/// or before COMMIT when FORWARD has none.
fn with_forward_rules(save: &str, rules: &[String]) -> String {
    let mut out = String::with_capacity(save.len() + rules.len() * 96);
    let mut inserted = false;
    for line in save.lines() {
        if !inserted && (line.starts_with("-A FORWARD ") || line == "COMMIT") {
            for rule in rules {
                out.push_str(rule);
                out.push('\n');
            }
            inserted = true;
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

/// Fails if a rule of this suite appears in the root namespace's iptables.
fn check_root_iptables() -> anyhow::Result<()> {
    if let Ok(out) = Command::new("iptables-save").output() {
        ensure!(
            !String::from_utf8_lossy(&out.stdout).contains(MARKER),
            "rules of {MARKER} exist in the root namespace's iptables"
        );
    }
    Ok(())
}

/// Medians-to-be of the traffic metrics, per rule count: slipway and bridge samples.
struct Traffic {
    levels: Vec<usize>,
    /// `[level][metric]` samples; metrics as in [`TRAFFIC_METRICS`].
    samples: Vec<[Samples; 3]>,
    /// Why the baseline stopped being measured, when it failed: reported, not fatal.
    bridge_failed: Option<String>,
}

/// (name prefix, unit, higher is better) of the traffic metrics.
const TRAFFIC_METRICS: [(&str, &str, bool); 3] = [
    ("tcp_throughput", "Gbit/s", true),
    ("tcp_rr_rate", "round trips/s", true),
    ("tcp_rtt_p50", "µs", false),
];

fn measure_traffic(
    options: &Options,
    agent: &Agent<'_>,
    iptables: &Iptables<'_>,
    (slipway, bridge): (&Pair<'_>, &Pair<'_>),
    bridge_client: Ipv4Addr,
) -> anyhow::Result<Traffic> {
    let mut traffic = Traffic {
        levels: TRAFFIC_LEVELS.to_vec(),
        samples: TRAFFIC_LEVELS.iter().map(|_| Default::default()).collect(),
        bridge_failed: None,
    };
    let states: Vec<State> = TRAFFIC_LEVELS
        .iter()
        .map(|&level| {
            if level == 0 {
                State::Open
            } else {
                State::Allow(level)
            }
        })
        .collect();
    let bodies: Vec<(Value, String)> = states
        .iter()
        .map(|&state| {
            Ok((
                serde_json::to_value(policies(state))?,
                iptables.render(&forward_rules(state, bridge_client, bridge.server_ip)),
            ))
        })
        .collect::<anyhow::Result<_>>()?;
    let pinned = Pinned::to_last_cpu()?;
    eprintln!(
        "      traffic pinned to CPU {} (was {})",
        pinned.cpu, pinned.previous
    );
    let throughput = |pair: &Pair<'_>| pair.throughput_gbps(options.iperf_duration);
    let mut bridge_failed = None;
    for run in 0..options.runs {
        for (i, (&state, (policy_body, restore_text))) in states.iter().zip(&bodies).enumerate() {
            let level = traffic.levels[i];
            let started = Instant::now();
            agent.apply(policy_body)?;
            let put = started.elapsed();
            agent.check(state)?;
            let context = |side: &str| format!("{side} at {level} rules, run {run}");
            let started = Instant::now();
            let restored = bridge_failed.is_none()
                && noted(&mut bridge_failed, iptables.restore(restore_text), || {
                    context("iptables-restore")
                })
                .is_some();
            eprintln!(
                "      run {run}, {level} rules: PUT {:.0} ms, iptables-restore {:.0} ms",
                ms(put),
                ms(started.elapsed())
            );
            let [tput, rate, rtt] = &mut traffic.samples[i];
            tput.slipway
                .push(throughput(slipway).with_context(|| context("slipway iperf3"))?);
            if restored
                && let Some(t) = noted(&mut bridge_failed, throughput(bridge), || {
                    context("bridge iperf3")
                })
            {
                tput.baseline.push(t);
            }
            let s: PingPong = sockperf_ping_pong(slipway, options.sockperf_duration)
                .with_context(|| context("slipway sockperf"))?;
            rate.slipway.push(s.round_trips_per_s);
            rtt.slipway.push(s.rtt_p50_us);
            if restored
                && bridge_failed.is_none()
                && let Some(b) = noted(
                    &mut bridge_failed,
                    sockperf_ping_pong(bridge, options.sockperf_duration),
                    || context("bridge sockperf"),
                )
            {
                rate.baseline.push(b.round_trips_per_s);
                rtt.baseline.push(b.rtt_p50_us);
            }
        }
    }
    traffic.bridge_failed = bridge_failed;
    drop(pinned);
    Ok(traffic)
}

/// This process, every thread of it, pinned to one CPU, and so every process it starts
/// meanwhile (both ends of iperf3 and sockperf; pod traffic is processed in the sender's
/// context, so on that CPU too); the previous CPU list is restored on drop. On this VM a
/// wakeup across CPUs costs tens of µs (an idle vCPU comes back through the hypervisor):
/// unpinned, each sockperf run measured 6 µs or 50-80 µs depending on where the scheduler put
/// the two ends, whatever the rules. On one CPU every side measures its own per-packet cost.
struct Pinned {
    pid: String,
    cpu: usize,
    /// The CPU list before, as taskset prints it ("0,1").
    previous: String,
}

impl Pinned {
    fn to_last_cpu() -> anyhow::Result<Self> {
        let pid = std::process::id().to_string();
        let out = taskset(&["-p", "-c", &pid])?;
        let previous = out
            .rsplit_once(": ")
            .map(|(_, list)| list.trim().to_owned())
            .with_context(|| format!("taskset -p printed {out}"))?;
        // The last CPU of the list ("0,1" -> 1, "0-3" -> 3).
        let cpu: usize = previous
            .rsplit([',', '-'])
            .next()
            .and_then(|last| last.parse().ok())
            .with_context(|| format!("taskset -p printed the CPU list {previous:?}"))?;
        taskset(&["-a", "-p", "-c", &cpu.to_string(), &pid])?;
        Ok(Self { pid, cpu, previous })
    }
}

impl Drop for Pinned {
    fn drop(&mut self) {
        let _ = taskset(&["-a", "-p", "-c", &self.previous, &self.pid]);
    }
}

fn taskset(args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new("taskset")
        .args(args)
        .output()
        .context("running taskset (util-linux)")?;
    ensure!(
        out.status.success(),
        "taskset {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

impl Traffic {
    /// The record of `samples` against the bridge-side baseline, or marked failed without it.
    fn bridge_record(&self, samples: &Samples, metric: Metric<'_>) -> anyhow::Result<Record> {
        match &self.bridge_failed {
            None => samples.record(metric),
            Some(reason) => Ok(baseline_failed(
                alone(&samples.slipway).record(metric)?,
                reason,
            )),
        }
    }

    /// Per metric: at 0 rules, Slipway against the bridge; at N rules, Slipway against Slipway
    /// with no policy, against the bridge with the same N rules, and the fraction of its
    /// 0-rule value each side keeps (per run, as the runs alternate).
    fn records(&self, iptables_label: &str) -> anyhow::Result<Vec<Record>> {
        let mut records = Vec::new();
        for (m, (prefix, unit, higher_is_better)) in TRAFFIC_METRICS.into_iter().enumerate() {
            fn metric<'a>(
                name: &'a str,
                unit: &'a str,
                higher_is_better: bool,
                baseline: &'a str,
            ) -> Metric<'a> {
                Metric {
                    suite: SUITE,
                    name,
                    unit,
                    higher_is_better,
                    baseline,
                }
            }
            let zero = &self.samples[0][m];
            let name = format!("{prefix}_0_rules");
            records.push(
                self.bridge_record(zero, metric(&name, unit, higher_is_better, BRIDGE_PLUGIN))?,
            );
            for (i, &level) in self.levels.iter().enumerate().skip(1) {
                let at = &self.samples[i][m];
                let name = format!("{prefix}_{level}_rules");
                records.push(
                    Samples {
                        slipway: at.slipway.clone(),
                        baseline: zero.slipway.clone(),
                    }
                    .record(metric(
                        &name,
                        unit,
                        higher_is_better,
                        NO_POLICY,
                    ))?,
                );
                records.push(
                    self.bridge_record(at, metric(&name, unit, higher_is_better, iptables_label))?,
                );
                // For a lower-is-better metric the fraction kept is 0-rule / N-rule value, so
                // that, like throughput, 1.0 means no cost and less means a cost.
                let kept = |with: &[f64], without: &[f64]| -> Vec<f64> {
                    with.iter()
                        .zip(without)
                        .map(|(w, o)| if higher_is_better { w / o } else { o / w })
                        .collect()
                };
                let name = format!("{prefix}_kept_{level}_rules");
                records.push(self.bridge_record(
                    &Samples {
                        slipway: kept(&at.slipway, &zero.slipway),
                        baseline: kept(&at.baseline, &zero.baseline),
                    },
                    metric(&name, "x of 0 rules", true, iptables_label),
                )?);
            }
        }
        Ok(records)
    }

    /// The medians of every side and rule count, as a matrix.
    fn matrix(&self, iptables_version: &str) -> String {
        let med = |v: &[f64]| median(v).unwrap_or(f64::NAN);
        let mut out = format!(
            "\nmedians, same-host pods: slipway | bridge + {iptables_version}\n{:>7}  {:>22}  \
             {:>26}  {:>20}\n",
            "rules", "TCP Gbit/s", "round trips/s", "RTT p50 µs"
        );
        if let Some(reason) = &self.bridge_failed {
            out.push_str(&format!("baseline FAILED: {reason}\n"));
        }
        for (i, level) in self.levels.iter().enumerate() {
            let [t, r, l] = &self.samples[i];
            out.push_str(&format!(
                "{level:>7}  {:>10.2} | {:>9.2}  {:>12.0} | {:>11.0}  {:>9.1} | {:>8.1}\n",
                med(&t.slipway),
                med(&t.baseline),
                med(&r.slipway),
                med(&r.baseline),
                med(&l.slipway),
                med(&l.baseline)
            ));
        }
        out
    }
}

/// The verdict a flip changes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    Allow,
    Deny,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Answer {
    Pending,
    Echoed,
    Lost,
}

#[derive(Debug, Clone, Copy)]
struct Probe {
    sent: Instant,
    answer: Answer,
}

/// What a probe loop has sent and heard, shared with the thread that flips the policy.
#[derive(Debug, Default)]
struct ProbeLog {
    probes: Mutex<Vec<Probe>>,
    /// Probe while set.
    active: AtomicBool,
    stop: AtomicBool,
    /// Why the probe loop ended early.
    failed: Mutex<Option<String>>,
}

impl ProbeLog {
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Probe>> {
        self.probes.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Fails if the probe loop has ended with an error.
    fn check(&self) -> anyhow::Result<()> {
        match &*self.failed.lock().unwrap_or_else(|p| p.into_inner()) {
            Some(reason) => bail!("{reason}"),
            None => Ok(()),
        }
    }
}

/// The probe loop's four-tuples (source port, destination port), used in turn: when all have
/// been used the first comes round again, once its last use is `reuse_after` old.
#[derive(Debug)]
struct Tuples {
    sources: (u16, u16),
    ports: &'static [u16],
    reuse_after: Duration,
    next: usize,
    /// When each tuple was last handed out.
    used: Vec<Option<Instant>>,
}

impl Tuples {
    fn new(sources: (u16, u16), ports: &'static [u16], reuse_after: Duration) -> Self {
        let count = usize::from(sources.1.saturating_sub(sources.0)) * ports.len();
        Self {
            sources,
            ports,
            reuse_after,
            next: 0,
            used: vec![None; count],
        }
    }

    /// The next tuple at `now`, or how long to wait until it may be used again.
    fn take(&mut self, now: Instant) -> Result<(u16, u16), Duration> {
        let n = self.next;
        if let Some(last) = self.used[n] {
            let age = now.saturating_duration_since(last);
            if age < self.reuse_after {
                return Err(self.reuse_after - age);
            }
        }
        self.used[n] = Some(now);
        self.next = (n + 1) % self.used.len();
        let source = self.sources.0 + (n / self.ports.len()) as u16;
        Ok((source, self.ports[n % self.ports.len()]))
    }
}

/// Sends one UDP echo request every [`PROBE_INTERVAL`] while `log.active`, each from a new
/// socket on the next (source port, destination port) of [`Tuples`], and records the answers.
/// Runs in the client's namespace until `log.stop`.
fn probe_loop(log: &ProbeLog, server: Ipv4Addr, sources: (u16, u16)) -> anyhow::Result<()> {
    let mut tuples = Tuples::new(sources, &PROBE_PORTS, TUPLE_REUSE_AFTER);
    ensure!(
        !tuples.used.is_empty(),
        "probe loop: no four-tuple in {sources:?}"
    );
    let mut sent_count = 0u64;
    let mut open: Vec<(usize, UdpSocket, Instant)> = Vec::new();
    let mut buf = [0u8; 64];
    let mut tick = Instant::now();
    while !log.stop.load(Ordering::Relaxed) {
        if log.active.load(Ordering::Relaxed) {
            let socket = loop {
                let (source, port) = match tuples.take(Instant::now()) {
                    Ok(tuple) => tuple,
                    Err(wait) => {
                        // Every tuple was used lately: wait out the oldest one's age (in short
                        // steps, so a stop is seen).
                        thread::sleep(wait.min(Duration::from_millis(100)));
                        if log.stop.load(Ordering::Relaxed) {
                            return Ok(());
                        }
                        continue;
                    }
                };
                match UdpSocket::bind((Ipv4Addr::UNSPECIFIED, source)) {
                    Ok(socket) => {
                        socket.connect((server, port))?;
                        socket.set_nonblocking(true)?;
                        break socket;
                    }
                    Err(e) if e.kind() == ErrorKind::AddrInUse => continue,
                    Err(e) => return Err(e).context("probe loop: binding a UDP socket"),
                }
            };
            let sent = Instant::now();
            sent_count += 1;
            socket.send(&sent_count.to_be_bytes())?;
            let index = {
                let mut probes = log.lock();
                probes.push(Probe {
                    sent,
                    answer: Answer::Pending,
                });
                probes.len() - 1
            };
            open.push((index, socket, sent));
        }
        let now = Instant::now();
        let mut probes = log.lock();
        open.retain(|(index, socket, sent)| {
            let answer = match socket.recv(&mut buf) {
                Ok(_) => Answer::Echoed,
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    if now.duration_since(*sent) < PROBE_WINDOW {
                        return true;
                    }
                    Answer::Lost
                }
                // An ICMP error (nothing listening, unreachable) is no echo either.
                Err(_) => Answer::Lost,
            };
            probes[*index].answer = answer;
            false
        });
        drop(probes);
        tick += PROBE_INTERVAL;
        let now = Instant::now();
        if tick > now {
            thread::sleep(tick - now);
        } else {
            tick = now;
        }
    }
    Ok(())
}

/// Echoes every datagram back to its sender until `stop`.
fn echo_loop(socket: &UdpSocket, stop: &AtomicBool) -> anyhow::Result<()> {
    socket.set_read_timeout(Some(Duration::from_millis(50)))?;
    let mut buf = [0u8; 64];
    while !stop.load(Ordering::Relaxed) {
        match socket.recv_from(&mut buf) {
            Ok((len, from)) => {
                socket.send_to(&buf[..len], from)?;
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(e) => return Err(e).context("echo server"),
        }
    }
    Ok(())
}

/// When the new verdict took effect: for an allow, the first probe sent at or after `start`
/// that was echoed; for a deny, the first probe of the run of lost probes that ends the log,
/// once that run holds [`DENY_CONFIRM`] probes sent after `applied` (when the apply returned).
/// `None` while undecided.
fn enforced_at(
    probes: &[Probe],
    start: Instant,
    applied: Instant,
    want: Verdict,
) -> Option<Instant> {
    let after: Vec<&Probe> = probes.iter().filter(|p| p.sent >= start).collect();
    match want {
        Verdict::Allow => after
            .iter()
            .find(|p| p.answer == Answer::Echoed)
            .map(|p| p.sent),
        Verdict::Deny => {
            let resolved = after
                .iter()
                .take_while(|p| p.answer != Answer::Pending)
                .count();
            let resolved = &after[..resolved];
            let tail = resolved
                .iter()
                .rposition(|p| p.answer == Answer::Echoed)
                .map_or(0, |i| i + 1);
            let tail = &resolved[tail..];
            let confirmed = tail.iter().filter(|p| p.sent >= applied).count();
            (confirmed >= DENY_CONFIRM).then(|| tail[0].sent)
        }
    }
}

/// Whether a probe sent after the apply returned still saw the old verdict.
fn old_verdict_after_apply(probes: &[Probe], applied: Instant, enforced: Instant) -> bool {
    probes
        .iter()
        .any(|p| p.sent >= applied && p.sent < enforced && p.answer != Answer::Pending)
}

/// One flip: the apply→enforced latency and how long the apply call took.
#[derive(Debug, Clone, Copy)]
struct Flip {
    want: Verdict,
    enforced_ms: f64,
    apply_ms: f64,
    /// A probe sent after the apply returned saw the old verdict.
    late: bool,
}

/// Waits until the probes from `first` on show the verdict before a flip to `want`.
fn old_verdict_seen(log: &ProbeLog, first: usize, want: Verdict) -> anyhow::Result<()> {
    let deadline = Instant::now() + PRE_FLIP_TIMEOUT;
    loop {
        log.check()?;
        let (echoed, lost) = log.lock()[first..]
            .iter()
            .fold((0, 0), |(e, l), p| match p.answer {
                Answer::Echoed => (e + 1, l),
                Answer::Lost => (e, l + 1),
                Answer::Pending => (e, l),
            });
        match want {
            Verdict::Allow => {
                ensure!(echoed == 0, "a probe was echoed before the flip to allow");
                if lost >= PRE_FLIP_LOSSES {
                    return Ok(());
                }
            }
            Verdict::Deny if echoed > 0 => return Ok(()),
            Verdict::Deny => {}
        }
        ensure!(
            Instant::now() < deadline,
            "the probes did not show the verdict before the flip to {want:?} within \
             {PRE_FLIP_TIMEOUT:?} ({echoed} echoed, {lost} lost)"
        );
        thread::sleep(Duration::from_millis(1));
    }
}

/// Flips the verdict for the probe loop's flow with `apply` and waits until the probes see it.
fn flip(
    log: &ProbeLog,
    want: Verdict,
    apply: impl FnOnce() -> anyhow::Result<()>,
) -> anyhow::Result<Flip> {
    let first = log.lock().len();
    log.active.store(true, Ordering::Relaxed);
    let outcome = old_verdict_seen(log, first, want).and_then(|()| {
        let start = Instant::now();
        apply()?;
        let applied_at = Instant::now();
        loop {
            log.check()?;
            let probes = log.lock()[first..].to_vec();
            if let Some(at) = enforced_at(&probes, start, applied_at, want) {
                let after: Vec<Probe> = probes.into_iter().filter(|p| p.sent >= start).collect();
                return Ok(Flip {
                    want,
                    enforced_ms: ms(at - start),
                    apply_ms: ms(applied_at - start),
                    late: old_verdict_after_apply(&after, applied_at, at),
                });
            }
            ensure!(
                start.elapsed() < FLIP_TIMEOUT,
                "no probe saw the flip to {want:?} within {FLIP_TIMEOUT:?}"
            );
            thread::sleep(Duration::from_millis(2));
        }
    });
    log.active.store(false, Ordering::Relaxed);
    // Let the last probes resolve, so the next flip starts from a quiet log.
    thread::sleep(PROBE_WINDOW);
    outcome
}

/// The flips of one rule count: Slipway and iptables alternating.
struct Flips {
    slipway: Vec<Flip>,
    bridge: Vec<Flip>,
    /// Why the baseline stopped flipping, when it failed: reported, not fatal.
    bridge_failed: Option<String>,
}

/// Sets every background rule of `level`, then flips the client's allow rule on and off
/// `flips` times on each side, alternating sides, with a probe loop in each client pod.
fn measure_flips(
    flips: usize,
    (slot, level): (usize, usize),
    agent: &Agent<'_>,
    iptables: &Iptables<'_>,
    (slipway, bridge): (&Pair<'_>, &Pair<'_>),
    bridge_client: Ipv4Addr,
) -> anyhow::Result<Flips> {
    let body = |state| serde_json::to_value(policies(state));
    let slipway_allow = body(State::Allow(level))?;
    let slipway_deny = body(State::Deny(level))?;
    let rules = |state| forward_rules(state, bridge_client, bridge.server_ip);
    let bridge_allow = iptables.render(&rules(State::Allow(level)));
    let bridge_deny = iptables.render(&rules(State::Deny(level)));
    agent.apply(&slipway_deny)?;
    agent.check(State::Deny(level))?;
    iptables.restore(&bridge_deny)?;

    let servers = [slipway, bridge].map(|pair| {
        netns::run_in(pair.server.name(), || -> anyhow::Result<Vec<UdpSocket>> {
            PROBE_PORTS
                .iter()
                .map(|&port| {
                    UdpSocket::bind((pair.server_ip, port))
                        .with_context(|| format!("binding the echo server on :{port}"))
                })
                .collect()
        })
    });
    let mut sockets = Vec::new();
    for server in servers {
        sockets.extend(server??);
    }
    let (low, high) = PROBE_SOURCE_PORTS;
    let span = (high - low) / LATENCY_LEVELS.len() as u16;
    let sources = (low + slot as u16 * span, low + (slot as u16 + 1) * span);
    let logs = [ProbeLog::default(), ProbeLog::default()];
    let stop = AtomicBool::new(false);
    thread::scope(|scope| -> anyhow::Result<Flips> {
        /// Stops the probe and echo threads when the flips end, also on error.
        struct StopOnDrop<'a>(&'a AtomicBool, &'a [ProbeLog; 2]);
        impl Drop for StopOnDrop<'_> {
            fn drop(&mut self) {
                self.0.store(true, Ordering::Relaxed);
                for log in self.1 {
                    log.stop.store(true, Ordering::Relaxed);
                }
            }
        }
        let _stop = StopOnDrop(&stop, &logs);
        for socket in &sockets {
            let stop = &stop;
            scope.spawn(move || echo_loop(socket, stop));
        }
        for (log, pair) in logs.iter().zip([slipway, bridge]) {
            scope.spawn(move || {
                let outcome = netns::run_in(pair.client.name(), || {
                    probe_loop(log, pair.server_ip, sources)
                })
                .map_err(anyhow::Error::from)
                .and_then(|r| r);
                if let Err(e) = outcome {
                    *log.failed.lock().unwrap_or_else(|p| p.into_inner()) =
                        Some(format!("probe loop in {}: {e:#}", pair.client.name()));
                }
            });
        }
        let mut out = Flips {
            slipway: Vec::with_capacity(flips),
            bridge: Vec::with_capacity(flips),
            bridge_failed: None,
        };
        for i in 0..flips {
            let (want, policies, restore) = if i % 2 == 0 {
                (Verdict::Allow, &slipway_allow, &bridge_allow)
            } else {
                (Verdict::Deny, &slipway_deny, &bridge_deny)
            };
            out.slipway.push(
                flip(&logs[0], want, || agent.apply(policies))
                    .with_context(|| format!("slipway flip {i} at {level} rules"))?,
            );
            if out.bridge_failed.is_none()
                && let Some(flip) = noted(
                    &mut out.bridge_failed,
                    flip(&logs[1], want, || iptables.restore(restore)),
                    || format!("iptables flip {i} at {level} rules"),
                )
            {
                out.bridge.push(flip);
            }
        }
        Ok(out)
    })
}

impl Flips {
    fn records(&self, level: usize) -> anyhow::Result<Vec<Record>> {
        let samples = Samples {
            slipway: self.slipway.iter().map(|f| f.enforced_ms).collect(),
            baseline: self.bridge.iter().map(|f| f.enforced_ms).collect(),
        };
        let metric = |name| Metric {
            suite: SUITE,
            name,
            unit: "ms",
            higher_is_better: false,
            baseline: "iptables-restore",
        };
        let (p50, p99) = match level {
            0 => ("apply_enforced_p50_0_rules", "apply_enforced_p99_0_rules"),
            _ => (
                "apply_enforced_p50_10000_rules",
                "apply_enforced_p99_10000_rules",
            ),
        };
        let mut records = Vec::new();
        for (p, name) in [(50.0, p50), (99.0, p99)] {
            records.push(match &self.bridge_failed {
                None => percentile_record(&samples, p, metric(name))?,
                Some(reason) => baseline_failed(
                    percentile_record(&alone(&samples.slipway), p, metric(name))?,
                    reason,
                ),
            });
        }
        Ok(records)
    }

    /// Per side and direction: p50/p99 of apply→enforced and of the apply call itself, and
    /// how many flips saw the old verdict after the apply returned.
    fn summary(&self, level: usize) -> String {
        let mut out = format!("apply->enforced at {level} background rules (ms, p50/p99):\n");
        if let Some(reason) = &self.bridge_failed {
            out.push_str(&format!("  baseline FAILED: {reason}\n"));
        }
        for (side, flips) in [
            ("slipway PUT", &self.slipway),
            ("iptables-restore", &self.bridge),
        ] {
            for want in [Verdict::Allow, Verdict::Deny] {
                let of = |f: fn(&Flip) -> f64| -> Vec<f64> {
                    flips.iter().filter(|x| x.want == want).map(f).collect()
                };
                let enforced = of(|f| f.enforced_ms);
                let apply = of(|f| f.apply_ms);
                let late = flips.iter().filter(|f| f.want == want && f.late).count();
                let p = |v: &[f64], q| percentile(v, q).unwrap_or(f64::NAN);
                out.push_str(&format!(
                    "  {side:<17} to {want:<5?}: enforced {:>7.1} / {:>7.1}, apply returned \
                     {:>7.1} / {:>7.1}, old verdict after return in {late} of {}\n",
                    p(&enforced, 50.0),
                    p(&enforced, 99.0),
                    p(&apply, 50.0),
                    p(&apply, 99.0),
                    enforced.len()
                ));
            }
        }
        out
    }
}

/// The value of a baseline's measurement, or `None` with the failure noted in `failed` (the
/// first failure ends the baseline's measurements; the suite goes on with Slipway alone).
fn noted<T>(
    failed: &mut Option<String>,
    outcome: anyhow::Result<T>,
    what: impl FnOnce() -> String,
) -> Option<T> {
    match outcome {
        Ok(value) => Some(value),
        Err(e) => {
            let reason = format!("{}: {e:#}", what());
            eprintln!("      baseline FAILED, Slipway goes on alone: {reason}");
            failed.get_or_insert(reason);
            None
        }
    }
}

/// `record` for a metric whose baseline failed: Slipway's figure stays, the baseline is named
/// as failed with the reason, and it has no value and no ratio (null in the JSON line).
fn baseline_failed(mut record: Record, reason: &str) -> Record {
    record.baseline = format!("{} FAILED: {reason}", record.baseline);
    record.baseline_value = f64::NAN;
    record.ratio = f64::NAN;
    record
}

/// Slipway's samples as both sides, for the record of a metric whose baseline failed.
fn alone(slipway: &[f64]) -> Samples {
    Samples {
        slipway: slipway.to_vec(),
        baseline: slipway.to_vec(),
    }
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".to_owned())
}

fn ms(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1e3
}

#[cfg(test)]
mod tests {
    use super::*;

    const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(10, 88, 2, 2);
    const SERVER_IP: Ipv4Addr = Ipv4Addr::new(10, 88, 2, 3);

    #[test]
    fn background_rules_are_distinct_and_spare_the_measured_flows() {
        let rules = background(10_000);
        assert_eq!(rules.len(), 10_000);
        let unique: std::collections::BTreeSet<String> =
            rules.iter().map(|r| format!("{r:?}")).collect();
        assert_eq!(unique.len(), rules.len());
        let ports = rules
            .iter()
            .filter(|r| matches!(r, Background::Port(_)))
            .count();
        assert_eq!(ports, 1_000);
        for rule in &rules {
            match *rule {
                Background::IpBlock(ip) => {
                    assert!(ip.octets()[0] == 172 && (16..32).contains(&ip.octets()[1]))
                }
                Background::Port(port) => assert!(
                    port >= PORT_RULE_BASE && ![5201, 11111].contains(&port),
                    "{port}"
                ),
            }
        }
    }

    #[test]
    fn policies_validate_and_carry_every_rule() {
        use slipway_cni::policy::PolicyExt as _;
        for state in [State::Allow(10_000), State::Deny(1_000), State::Deny(0)] {
            let list = policies(state);
            for p in &list {
                assert_eq!(p.validate(), Vec::<String>::new(), "{}", p.name());
            }
            let rules: usize = list.iter().map(|p| p.ingress().len()).sum();
            let (level, allow) = match state {
                State::Allow(l) => (l, 1),
                State::Deny(l) => (l, 0),
                State::Open => unreachable!(),
            };
            assert_eq!(rules, level + allow);
            let background = list
                .iter()
                .filter(|p| p.name().starts_with("background-"))
                .count();
            assert_eq!(background, if level == 0 { 0 } else { POLICIES });
        }
        assert!(policies(State::Open).is_empty());
    }

    #[test]
    fn the_reference_evaluator_gives_the_intended_verdicts() {
        use slipway_cni::policy::{Endpoint, evaluate};
        let endpoint = |name: &str, ip| Endpoint {
            namespace: NAMESPACE.to_owned(),
            name: name.to_owned(),
            ip,
            labels: labels(name),
            named_ports: BTreeMap::new(),
        };
        let (client, server) = (endpoint(CLIENT, CLIENT_IP), endpoint(SERVER, SERVER_IP));
        let outsider = endpoint("outsider", Ipv4Addr::new(172, 16, 0, 1));
        let namespaces = BTreeMap::from([(NAMESPACE.to_owned(), BTreeMap::new())]);
        let allowed = |state, src: &Endpoint, port, protocol| {
            evaluate(&policies(state), &namespaces, src, &server, port, protocol).allowed()
        };
        for (port, protocol) in [(5201, "TCP"), (11111, "TCP"), (PROBE_PORTS[0], "UDP")] {
            assert!(allowed(State::Open, &client, port, protocol));
            assert!(allowed(State::Allow(1_000), &client, port, protocol));
            assert!(!allowed(State::Deny(1_000), &client, port, protocol));
            assert!(!allowed(State::Deny(0), &client, port, protocol));
        }
        // The background rules do allow what they name, and nothing of the client's flows.
        assert!(allowed(State::Deny(1_000), &outsider, 80, "TCP"));
        assert!(allowed(State::Deny(1_000), &client, PORT_RULE_BASE, "TCP"));
        assert!(!allowed(State::Deny(1_000), &outsider, 81, "TCP"));
    }

    #[test]
    fn forward_rules_put_the_accept_after_the_background_and_the_drop_last() {
        let rules = forward_rules(State::Allow(20), CLIENT_IP, SERVER_IP);
        assert_eq!(rules.len(), 22);
        assert!(rules[0].starts_with("-A FORWARD -s 172.16.0.1/32 -d 10.88.2.3/32"));
        assert!(rules[20].contains("-s 10.88.2.2/32 -d 10.88.2.3/32 -m comment"));
        assert!(rules[20].ends_with("-j ACCEPT"));
        assert!(rules[21].ends_with("-j DROP"));
        assert_eq!(forward_rules(State::Deny(0), CLIENT_IP, SERVER_IP).len(), 1);
        assert!(forward_rules(State::Open, CLIENT_IP, SERVER_IP).is_empty());
    }

    #[test]
    fn rules_go_ahead_of_forward_or_before_commit() {
        let empty = "# Generated\n*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n\
                     :OUTPUT ACCEPT [0:0]\nCOMMIT\n# Completed\n";
        let rules = vec!["-A FORWARD -d 10.0.0.1/32 -j DROP".to_owned()];
        assert_eq!(
            with_forward_rules(empty, &rules),
            "# Generated\n*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n\
             :OUTPUT ACCEPT [0:0]\n-A FORWARD -d 10.0.0.1/32 -j DROP\nCOMMIT\n# Completed\n"
        );
        let busy = "*filter\n:FORWARD ACCEPT [0:0]\n-A INPUT -j ACCEPT\n-A FORWARD -j X\nCOMMIT\n";
        assert_eq!(
            with_forward_rules(busy, &rules),
            "*filter\n:FORWARD ACCEPT [0:0]\n-A INPUT -j ACCEPT\n\
             -A FORWARD -d 10.0.0.1/32 -j DROP\n-A FORWARD -j X\nCOMMIT\n"
        );
        assert_eq!(with_forward_rules(busy, &[]), busy);
    }

    #[test]
    fn tuples_rotate_and_wait_out_their_reuse_age() {
        static PORTS: [u16; 2] = [7, 9];
        let reuse = Duration::from_secs(150);
        let mut tuples = Tuples::new((100, 102), &PORTS, reuse);
        let t0 = Instant::now();
        let first: Vec<(u16, u16)> = (0..4)
            .map(|i| tuples.take(t0 + Duration::from_millis(i)).expect("unused"))
            .collect();
        assert_eq!(first, [(100, 7), (100, 9), (101, 7), (101, 9)]);
        // All four used: the oldest comes round once it is old enough, never before.
        let early = t0 + Duration::from_secs(100);
        assert_eq!(tuples.take(early), Err(Duration::from_secs(50)));
        assert_eq!(tuples.take(t0 + reuse), Ok((100, 7)));
        assert_eq!(
            tuples.take(t0 + reuse),
            Err(Duration::from_millis(1)),
            "the next one was used 1 ms later"
        );
        // A run as long as the one that ran out ("all 160000 four-tuples used" at flip 79):
        // with one probe a millisecond, every take succeeds or names a finite wait.
        let (low, high) = PROBE_SOURCE_PORTS;
        let span = (high - low) / LATENCY_LEVELS.len() as u16;
        let mut tuples = Tuples::new((low, low + span), &PROBE_PORTS, TUPLE_REUSE_AFTER);
        let mut now = t0;
        let mut waited = Duration::ZERO;
        for _ in 0..400_000 {
            match tuples.take(now) {
                Ok(_) => now += PROBE_INTERVAL,
                Err(wait) => {
                    assert!(wait <= TUPLE_REUSE_AFTER, "{wait:?}");
                    waited += wait;
                    now += wait;
                }
            }
        }
        assert!(waited <= TUPLE_REUSE_AFTER, "waited {waited:?} in all");
    }

    #[test]
    fn a_failed_flip_baseline_is_reported_as_failed() {
        let flips = Flips {
            slipway: [3.0, 5.0, 4.0]
                .into_iter()
                .map(|ms| Flip {
                    want: Verdict::Allow,
                    enforced_ms: ms,
                    apply_ms: 1.0,
                    late: false,
                })
                .collect(),
            bridge: Vec::new(),
            bridge_failed: Some("iptables flip 0 at 0 rules: boom".into()),
        };
        let records = flips
            .records(0)
            .expect("records despite the failed baseline");
        assert_eq!(records.len(), 2);
        assert_eq!(records[0].slipway, 4.0);
        assert!(
            records[0].baseline.contains("FAILED: iptables flip 0"),
            "{:?}",
            records[0]
        );
        assert!(records[0].ratio.is_nan() && records[0].baseline_value.is_nan());
        let line = serde_json::to_string(&records[0]).expect("json");
        assert!(line.contains("\"ratio\":null"), "{line}");
        assert!(flips.summary(0).contains("baseline FAILED"));
    }

    #[test]
    fn a_failed_traffic_baseline_is_reported_as_failed() {
        let side = |v: &[f64]| Samples {
            slipway: v.to_vec(),
            baseline: Vec::new(),
        };
        let traffic = Traffic {
            levels: TRAFFIC_LEVELS.to_vec(),
            samples: TRAFFIC_LEVELS
                .iter()
                .map(|_| {
                    [
                        side(&[9.0, 10.0]),
                        side(&[900.0, 1000.0]),
                        side(&[20.0, 22.0]),
                    ]
                })
                .collect(),
            bridge_failed: Some("iptables at 0 rules, run 0: boom".into()),
        };
        let records = traffic
            .records("bridge-iptables-nft")
            .expect("records despite the failed baseline");
        assert!(!records.is_empty());
        for record in &records {
            if record.baseline == NO_POLICY {
                assert!(record.ratio.is_finite(), "{record:?}");
            } else {
                assert!(
                    record.baseline.contains("FAILED: iptables at 0 rules"),
                    "{record:?}"
                );
                assert!(
                    record.ratio.is_nan() && record.slipway.is_finite(),
                    "{record:?}"
                );
            }
        }
    }

    fn log(start: Instant, answers: &[Answer]) -> Vec<Probe> {
        answers
            .iter()
            .enumerate()
            .map(|(i, &answer)| Probe {
                sent: start + Duration::from_millis(i as u64),
                answer,
            })
            .collect()
    }

    #[test]
    fn an_allow_is_the_first_echo_after_the_apply_started() {
        use Answer::*;
        let t = Instant::now();
        let probes = log(t, &[Echoed, Lost, Lost, Lost, Echoed, Echoed]);
        let start = t + Duration::from_millis(1);
        assert_eq!(
            enforced_at(&probes, start, start, Verdict::Allow),
            Some(t + Duration::from_millis(4))
        );
        let probes = log(t, &[Lost, Lost, Pending]);
        assert_eq!(enforced_at(&probes, t, t, Verdict::Allow), None);
    }

    #[test]
    fn a_deny_is_the_start_of_the_final_run_of_losses_once_confirmed() {
        use Answer::*;
        let t = Instant::now();
        let mut answers = vec![Echoed, Echoed, Lost, Echoed, Echoed];
        answers.extend([Lost; DENY_CONFIRM + 3]);
        answers.push(Pending);
        let probes = log(t, &answers);
        let applied = t + Duration::from_millis(8);
        // Losses from probe 5 on; probes 8.. (sent after the apply returned) confirm it.
        assert_eq!(
            enforced_at(&probes, t, applied, Verdict::Deny),
            Some(t + Duration::from_millis(5))
        );
        // Too few losses after the apply returned: undecided.
        let late = t + Duration::from_millis(10);
        assert_eq!(enforced_at(&probes, t, late, Verdict::Deny), None);
        assert!(old_verdict_after_apply(
            &probes,
            t + Duration::from_millis(4),
            t + Duration::from_millis(5)
        ));
        assert!(!old_verdict_after_apply(
            &probes,
            applied,
            t + Duration::from_millis(5)
        ));
    }
}
