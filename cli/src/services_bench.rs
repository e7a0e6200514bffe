//! Part of `slipway bench pods`: how soon a Service update is enforced on every node at scale.
//! `--services` Services (no selector) with an EndpointSlice of `--endpoints` addresses each are
//! made through the workload cluster's API and awaited on every node's agent (its local API
//! says what its datapath holds: the reply to a change is made after the maps are written).
//! Then, `--updates` times, one Service's slice has an endpoint replaced, and the time from the
//! API's answer to the write until every node's agent holds the new endpoint is measured.
//!
//! Baseline, alternated with each update in the same run: kube-proxy's iptables mode, which on
//! a change writes the whole NAT ruleset of every Service (a `KUBE-SVC-*` chain per Service, a
//! `KUBE-SEP-*` chain per endpoint, picked by `statistic` rules) with one `iptables-restore`
//! (Debian's, nf_tables backend) in a network namespace of its own. The baseline is the
//! programming step alone, without kube-proxy's watch and its sync period; Slipway's figure is
//! the whole path (API write, watch, the agent's conversion, its state on disk, the maps).

use std::collections::BTreeSet;
use std::io::Write as _;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use futures_util::StreamExt as _;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use serde_json::{Value, json};
use slipway_bench::report::Record;
use slipway_local::LocalClient;

use crate::bench_pods::latency_records;

/// The scale and the number of updates.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Scale {
    pub services: usize,
    pub endpoints: usize,
    pub updates: usize,
}

/// How long one update may take to reach every node before the run fails.
const UPDATE_TIMEOUT: Duration = Duration::from_secs(60);

/// The label the benchmark's objects carry (and are deleted by).
const LABEL: &str = "slipway.dev/bench=services";

/// Endpoint `k` of the initial slices: addresses of the cluster's pod CIDR (192.168.0.0/16)
/// that no pod holds, from 192.168.200.1 up.
fn endpoint(k: usize) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(192, 168, 200, 1)) + k as u32)
}

/// The address update `u` brings in, from 192.168.180.1 up (none of the initial ones).
fn fresh(u: usize) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(192, 168, 180, 1)) + u as u32)
}

fn endpoints_of(service: usize, scale: Scale) -> Vec<Ipv4Addr> {
    (0..scale.endpoints)
        .map(|e| endpoint((service * scale.endpoints + e) % 4000))
        .collect()
}

fn slice_json(name: &str, addresses: &[Ipv4Addr]) -> Value {
    json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": format!("{name}-bench"), "namespace": "default", "labels": {
            "slipway.dev/bench": "services",
            "kubernetes.io/service-name": name,
            "endpointslice.kubernetes.io/managed-by": "slipway-bench",
        }},
        "addressType": "IPv4",
        "ports": [{"name": "", "port": 8080, "protocol": "TCP"}],
        "endpoints": addresses.iter().map(|a| json!({"addresses": [a.to_string()]})).collect::<Vec<_>>(),
    })
}

/// What one node's agent holds: Service name (`namespace/name`) → its endpoints.
fn node_services(
    socket: &PathBuf,
) -> anyhow::Result<std::collections::BTreeMap<String, Vec<String>>> {
    let answer = LocalClient::new(socket)
        .with_timeout(Duration::from_secs(5))
        .request("GET", "/v1/services", None)?;
    anyhow::ensure!(
        answer.is_success(),
        "{}: {}",
        socket.display(),
        answer.text()
    );
    let list: Vec<Value> = serde_json::from_slice(&answer.body)?;
    Ok(list
        .into_iter()
        .map(|s| {
            let endpoints = s["endpoints"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|e| e.as_str().map(str::to_owned))
                .collect();
            (s["name"].as_str().unwrap_or_default().to_owned(), endpoints)
        })
        .collect())
}

/// Waits until `holds` is true of every node's services; returns the time it took.
async fn on_every_node(
    sockets: &[PathBuf],
    what: &str,
    timeout: Duration,
    holds: impl Fn(&std::collections::BTreeMap<String, Vec<String>>) -> bool,
) -> anyhow::Result<Duration> {
    let start = Instant::now();
    let mut pending: BTreeSet<&PathBuf> = sockets.iter().collect();
    while !pending.is_empty() {
        let mut done = Vec::new();
        for socket in &pending {
            let path = (*socket).clone();
            let services = tokio::task::spawn_blocking(move || node_services(&path)).await??;
            if holds(&services) {
                done.push((*socket).clone());
            }
        }
        pending.retain(|s| !done.contains(s));
        anyhow::ensure!(
            start.elapsed() < timeout,
            "{what}: {} node(s) still without it after {timeout:?}",
            pending.len()
        );
        if !pending.is_empty() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    Ok(start.elapsed())
}

/// kube-proxy's iptables NAT ruleset for `slices` (service i's endpoints), as one
/// `iptables-restore` input replacing its chains.
fn kube_proxy_ruleset(cluster_ips: &[Ipv4Addr], slices: &[Vec<Ipv4Addr>]) -> String {
    let mut chains = String::from("*nat\n:KUBE-SERVICES - [0:0]\n");
    let mut rules = String::new();
    for (i, (ip, eps)) in cluster_ips.iter().zip(slices).enumerate() {
        chains.push_str(&format!(":KUBE-SVC-{i:08} - [0:0]\n"));
        rules.push_str(&format!(
            "-A KUBE-SERVICES -d {ip}/32 -p tcp -m tcp --dport 80 -j KUBE-SVC-{i:08}\n"
        ));
        let n = eps.len();
        for (k, ep) in eps.iter().enumerate() {
            chains.push_str(&format!(":KUBE-SEP-{i:08}-{k:03} - [0:0]\n"));
            let left = n - k;
            if left > 1 {
                rules.push_str(&format!(
                    "-A KUBE-SVC-{i:08} -m statistic --mode random --probability {:.11} -j KUBE-SEP-{i:08}-{k:03}\n",
                    1.0 / left as f64
                ));
            } else {
                rules.push_str(&format!("-A KUBE-SVC-{i:08} -j KUBE-SEP-{i:08}-{k:03}\n"));
            }
            rules.push_str(&format!(
                "-A KUBE-SEP-{i:08}-{k:03} -p tcp -m tcp -j DNAT --to-destination {ep}:8080\n"
            ));
        }
    }
    format!("{chains}{rules}COMMIT\n")
}

/// A network namespace of its own for the baseline, removed on drop.
struct Netns(String);

impl Netns {
    fn new() -> anyhow::Result<Self> {
        let name = format!("slipway-bench-ipt-{}", std::process::id());
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        let out = Command::new("ip").args(["netns", "add", &name]).output()?;
        anyhow::ensure!(
            out.status.success(),
            "ip netns add {name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(Self(name))
    }

    /// One `iptables-restore` of `ruleset` in the namespace; its time, ms.
    fn restore(&self, ruleset: &str) -> anyhow::Result<f64> {
        let start = Instant::now();
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.0, "iptables-restore", "-w"])
            .stdin(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("iptables-restore (Debian package iptables)")?;
        child
            .stdin
            .take()
            .context("iptables-restore's stdin")?
            .write_all(ruleset.as_bytes())?;
        let out = child.wait_with_output()?;
        anyhow::ensure!(
            out.status.success(),
            "iptables-restore: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(start.elapsed().as_secs_f64() * 1000.0)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).output();
    }
}

/// Runs the measurement against the workload cluster `client`, whose nodes' agents serve
/// their local API at `sockets`.
pub(crate) async fn measure(
    client: &kube::Client,
    sockets: &[PathBuf],
    scale: Scale,
) -> anyhow::Result<Vec<Record>> {
    let services: Api<Service> = Api::namespaced(client.clone(), "default");
    let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), "default");
    let result = run(&services, &slices, sockets, scale).await;
    // The objects go whatever happened.
    let all = ListParams::default().labels(LABEL);
    if let Err(e) = services
        .delete_collection(&DeleteParams::default(), &all)
        .await
    {
        eprintln!("bench pods: deleting the benchmark's Services: {e}");
    }
    if let Err(e) = slices
        .delete_collection(&DeleteParams::default(), &all)
        .await
    {
        eprintln!("bench pods: deleting the benchmark's EndpointSlices: {e}");
    }
    result
}

async fn run(
    services: &Api<Service>,
    slices: &Api<EndpointSlice>,
    sockets: &[PathBuf],
    scale: Scale,
) -> anyhow::Result<Vec<Record>> {
    println!(
        "bench pods: {} Services × {} endpoints on {} nodes",
        scale.services,
        scale.endpoints,
        sockets.len()
    );
    let bar = indicatif::ProgressBar::new(scale.services as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{spinner} services [{bar:30}] {pos}/{len} {msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let made = Instant::now();
    let creates = futures_util::stream::iter(0..scale.services)
        .map(|i| {
            let (services, slices) = (services.clone(), slices.clone());
            async move {
                let name = format!("bench-svc-{i}");
                let svc: Service = serde_json::from_value(json!({
                    "metadata": {"name": name, "labels": {"slipway.dev/bench": "services"}},
                    "spec": {"ports": [{"port": 80, "protocol": "TCP", "targetPort": 8080}]},
                }))?;
                let svc = services.create(&PostParams::default(), &svc).await?;
                let slice: EndpointSlice =
                    serde_json::from_value(slice_json(&name, &endpoints_of(i, scale)))?;
                slices.create(&PostParams::default(), &slice).await?;
                let ip = svc
                    .spec
                    .and_then(|s| s.cluster_ip)
                    .and_then(|ip| ip.parse::<Ipv4Addr>().ok())
                    .context("a Service without a ClusterIP")?;
                anyhow::Ok((i, ip))
            }
        })
        .buffer_unordered(8);
    futures_util::pin_mut!(creates);
    let mut cluster_ips = vec![Ipv4Addr::UNSPECIFIED; scale.services];
    while let Some(made) = creates.next().await {
        let (i, ip) = made?;
        cluster_ips[i] = ip;
        bar.inc(1);
    }
    bar.finish_and_clear();
    let want = scale.services;
    let synced = on_every_node(sockets, "every Service", Duration::from_secs(300), |s| {
        s.iter()
            .filter(|(n, e)| n.starts_with("default/bench-svc-") && e.len() == scale.endpoints)
            .count()
            == want
    })
    .await?;
    println!(
        "bench pods: {want} Services made in {:?}, on every node {:?} after the last",
        made.elapsed() - synced,
        synced
    );

    let netns = Netns::new()?;
    let mut current: Vec<Vec<Ipv4Addr>> = (0..scale.services)
        .map(|i| endpoints_of(i, scale))
        .collect();
    netns.restore(&kube_proxy_ruleset(&cluster_ips, &current))?;
    let bar = indicatif::ProgressBar::new(scale.updates as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{spinner} updates [{bar:30}] {pos}/{len} {msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let (mut slipway, mut baseline) = (Vec::new(), Vec::new());
    for u in 0..scale.updates {
        let i = (u * 7919) % scale.services;
        let name = format!("bench-svc-{i}");
        let ip = fresh(u);
        current[i][0] = ip;
        slices
            .patch(
                &format!("{name}-bench"),
                &PatchParams::default(),
                &Patch::Merge(json!({"endpoints": current[i]
                    .iter()
                    .map(|a| json!({"addresses": [a.to_string()]}))
                    .collect::<Vec<_>>()})),
            )
            .await?;
        let key = format!("default/{name}");
        let wanted = ip.to_string();
        let took = on_every_node(sockets, &format!("update {u}"), UPDATE_TIMEOUT, |s| {
            s.get(&key).is_some_and(|e| e.contains(&wanted))
        })
        .await?;
        slipway.push(took.as_secs_f64() * 1000.0);
        baseline.push(netns.restore(&kube_proxy_ruleset(&cluster_ips, &current))?);
        bar.inc(1);
    }
    bar.finish_and_clear();
    Ok(latency_records(
        crate::pods_bench::SUITE,
        &format!("service_update_{}x{}", scale.services, scale.endpoints),
        "iptables-restore",
        &slipway,
        &baseline,
    ))
}
