//! The demo suite: a 2-host world, two pods on host 1 joined only by the pod-veth datapath, and a
//! raw veth pair beside them as the baseline. Measures TCP throughput and ping round trips for
//! both, alternating, and reads the datapath's counters back against what the pods sent.

use std::net::Ipv4Addr;
use std::time::Duration;

use anyhow::{Context as _, ensure};
use slipway_dataplane::abi::{CounterKey, CounterValue, EndpointInfo, Reason};
use slipway_dataplane::netns;
use slipway_dataplane::pod::PodDatapath;
use slipway_dataplane::world::traffic::{iperf3_tcp, ping, wait_reachable};
use slipway_dataplane::world::{Netns, Pod, World};

use crate::report::{Metric, Record, Samples};

pub const SUITE: &str = "demo";
const BASELINE: &str = "raw-veth";
const IP_A: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 2);
const IP_B: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 3);
const RAW_B: Ipv4Addr = Ipv4Addr::new(10, 98, 0, 2);
const PINGS_PER_RUN: u32 = 50;

/// How long and how often to measure.
#[derive(Debug, Clone, Copy)]
pub struct Options {
    /// Runs per side (Slipway and baseline alternate).
    pub runs: usize,
    /// Length of each iperf3 run.
    pub iperf_duration: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            runs: 3,
            iperf_duration: Duration::from_secs(2),
        }
    }
}

/// What the demo measured.
#[derive(Debug)]
pub struct Outcome {
    pub records: Vec<Record>,
    /// Pod a -> pod b: what the datapath counted, and what pod a's eth0 sent.
    pub a_to_b: (CounterValue, CounterValue),
    /// Pod b -> pod a, likewise.
    pub b_to_a: (CounterValue, CounterValue),
    /// Mean underlay round trip host 1 -> host 2, milliseconds.
    pub underlay_rtt_ms: f64,
}

/// Runs the demo, printing progress to stderr.
pub fn run(options: Options) -> anyhow::Result<Outcome> {
    ensure!(options.runs > 0, "runs: must be at least 1");
    let step = |n: u32, what: &str| eprintln!("[{n}/5] {what}");

    step(
        1,
        "building a 2-host world (network namespaces, underlay bridge)",
    );
    let world = World::builder()
        .hosts(2)
        .build()
        .context("building the world")?;
    wait_reachable(
        &world.host(1).netns,
        world.host(2).underlay_ip,
        Duration::from_secs(5),
    )?;
    let underlay = ping(
        &world.host(1).netns,
        world.host(2).underlay_ip,
        5,
        Duration::from_millis(10),
    )?;
    ensure!(
        underlay.received == 5,
        "underlay: host 1 reached host 2 {} of 5 times",
        underlay.received
    );

    step(
        2,
        "creating pods a and b on host 1 and a raw veth pair for the baseline",
    );
    let a = world.add_pod(1, "a", IP_A)?;
    let b = world.add_pod(1, "b", IP_B)?;
    let (raw_a, raw_b) = world.add_raw_pair("raw")?;

    step(
        3,
        "loading the pod-veth datapath (TCX ingress, bpf_redirect_peer)",
    );
    let mut dp = PodDatapath::load(Some(&world.bpffs_dir().join("pod")))?;
    let host = world.host(1).netns.name().to_owned();
    for pod in [&a, &b] {
        netns::run_in(&host, || dp.attach(&pod.host_ifname))??;
        dp.upsert_endpoint(pod.ip, endpoint(pod))?;
    }
    let a_before = a.netns.link_stats("eth0")?;
    let b_before = b.netns.link_stats("eth0")?;

    step(
        4,
        &format!("measuring: {} alternating runs per side", options.runs),
    );
    let throughput = Samples::alternate(
        options.runs,
        |_| gbits(&a.netns, &b.netns, IP_B, options.iperf_duration),
        |_| gbits(&raw_a, &raw_b, RAW_B, options.iperf_duration),
    )?;
    let rtt = Samples::alternate(
        options.runs,
        |_| rtt_ms(&a.netns, IP_B),
        |_| rtt_ms(&raw_a, RAW_B),
    )?;

    step(
        5,
        "reading the datapath counters back and tearing the world down",
    );
    let counters = dp.counters()?;
    let counted = |from: &Pod, to: &Pod| {
        counters
            .get(&CounterKey {
                ifindex_in: from.host_ifindex,
                ifindex_out: to.host_ifindex,
                reason: Reason::RedirectPeer as u32,
            })
            .copied()
            .unwrap_or_default()
    };
    let sent =
        |pod: &Pod, before: slipway_dataplane::world::LinkStats| -> anyhow::Result<CounterValue> {
            let now = pod.netns.link_stats("eth0")?;
            Ok(CounterValue {
                packets: now.tx_packets - before.tx_packets,
                bytes: now.tx_bytes - before.tx_bytes,
            })
        };
    let outcome = Outcome {
        records: vec![
            throughput.record(Metric {
                suite: SUITE,
                name: "pod_to_pod_tcp_same_host",
                unit: "Gbit/s",
                higher_is_better: true,
                baseline: BASELINE,
            })?,
            rtt.record(Metric {
                suite: SUITE,
                name: "pod_to_pod_ping_rtt_same_host",
                unit: "ms",
                higher_is_better: false,
                baseline: BASELINE,
            })?,
        ],
        a_to_b: (counted(&a, &b), sent(&a, a_before)?),
        b_to_a: (counted(&b, &a), sent(&b, b_before)?),
        underlay_rtt_ms: underlay.rtt_avg_ms.unwrap_or_default(),
    };
    drop(dp);
    drop(world);
    Ok(outcome)
}

fn endpoint(pod: &Pod) -> EndpointInfo {
    EndpointInfo {
        ifindex: pod.host_ifindex,
        pod_mac: pod.pod_mac,
        host_mac: pod.host_mac,
    }
}

fn gbits(client: &Netns, server: &Netns, ip: Ipv4Addr, duration: Duration) -> anyhow::Result<f64> {
    Ok(iperf3_tcp(client, server, ip, duration)?.received_bps / 1e9)
}

fn rtt_ms(from: &Netns, to: Ipv4Addr) -> anyhow::Result<f64> {
    let report = ping(from, to, PINGS_PER_RUN, Duration::from_millis(5))?;
    ensure!(
        report.received == report.transmitted,
        "ping {to}: lost {} of {}",
        report.transmitted - report.received,
        report.transmitted
    );
    report.rtt_avg_ms.context("ping printed no round-trip time")
}
