//! `slipway bench pods`: pod start latency on a provisioned cluster beside podman on the same
//! machine. A cluster of netns hosts (1 control plane, 2 workers, each host its own containerd,
//! Slipway's CNI, preloaded images) is made first; then, alternating, a Pod is created through
//! the workload cluster's API and timed until it is Running (scheduling, the kubelet's watch,
//! sandbox, CNI ADD through containerd, container start, status written back), and `podman run
//! -d` of the same busybox image with Debian's bridge plugin is timed until it returns (the
//! container started). p50 and p99 of each, and their ratio, go to `pods.jsonl`. Then
//! pod-to-pod TCP throughput (iperf3) and round trips (ping) between two pods on one worker,
//! alternated with the same tools over a raw veth pair. Last, Service updates at scale until
//! every node enforces them, beside kube-proxy's iptables programming ([`crate::services_bench`]).

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, DeleteParams, DynamicObject, ListParams, PostParams};
use slipway_bench::report::{Metric, Record, Samples};
use slipway_dataplane::world::World;
use slipway_dataplane::world::traffic::{iperf3_tcp, parse_iperf3, parse_ping};
use slipway_hosts::reconciler::ProviderArgs;

use crate::bench_pods::{latency_records, pod, remove, start};
use crate::up::{create, resource, seed, with_supervisor};

/// The suite's name (its JSONL file).
pub const SUITE: &str = "pods";

/// How long one pod may take to start before the run fails.
const START_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, clap::Args)]
pub struct PodsBenchArgs {
    /// Pods started on each side (Slipway and podman, alternated).
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u64).range(2..=1000))]
    pods: u64,
    /// The supervisor's state for the run (wiped before and after).
    #[arg(long, default_value = "/var/lib/slipway/bench-pods")]
    data_dir: PathBuf,
    /// Where the supervisor serves during the run.
    #[arg(long, default_value = "0.0.0.0:6445")]
    listen: SocketAddr,
    /// Pod-to-pod traffic runs on each side (Slipway's pods and the raw veth pair, alternated).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..=50))]
    runs: u64,
    /// Seconds of each iperf3 run.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..=600))]
    seconds: u64,
    /// Services made for the Service-update measurement (selector-less, each with one
    /// EndpointSlice).
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..=5000))]
    services: u64,
    /// Endpoints in each of those Services' slices.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=100))]
    endpoints: u64,
    /// Service updates timed until every node enforces them (alternated with the baseline).
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u64).range(1..=5000))]
    updates: u64,
    /// Where pods.jsonl is written.
    #[arg(long, default_value = slipway_bench::report::DEFAULT_OUT_DIR)]
    out_dir: PathBuf,
    #[command(flatten)]
    hosts: ProviderArgs,
}

/// The `q`-quantile of `values` (nearest rank).
pub(crate) fn quantile(values: &[f64], q: f64) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        return f64::NAN;
    }
    #[allow(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        clippy::cast_precision_loss,
        reason = "a rank among at most a thousand samples"
    )]
    let rank = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len());
    v[rank - 1]
}

impl PodsBenchArgs {
    pub fn run(self) -> anyhow::Result<()> {
        crate::bench_pods::as_root(
            "network namespaces, cgroups and containers",
            self.run_async(),
        )
    }

    async fn run_async(self) -> anyhow::Result<()> {
        let images = self.data_dir.with_extension("images");
        let mut hosts = self.hosts.clone();
        crate::bench_pods::node_images(SUITE, &images, &mut hosts)?;
        crate::bench_pods::long_leases(SUITE, &mut hosts);
        let podman_image = podman_load(&images.join("busybox.tar"))?;
        let loaded = podman_image.clone();
        let (tx, rx) = tokio::sync::oneshot::channel();
        let data_dir = self.data_dir.clone();
        let (zones, count) = (hosts.zones.clone(), self.pods as usize);
        let traffic = (self.runs as usize, self.seconds);
        let scale = crate::services_bench::Scale {
            services: self.services as usize,
            endpoints: self.endpoints as usize,
            updates: self.updates as usize,
        };
        let result = with_supervisor(&self.data_dir, self.listen, &hosts, move |_| async move {
            let records = measure(&data_dir, &zones, count, &podman_image, traffic, scale).await?;
            let _ = tx.send(records);
            Ok(())
        })
        .await;
        let _ = std::fs::remove_dir_all(&images);
        // The image podman was given goes too: the machine is left as found.
        let _ = Command::new("podman").args(["rmi", "-f", &loaded]).output();
        result?;
        let records = rx.await.context("the runs did not finish")?;
        let path = slipway_bench::report::write_jsonl(&self.out_dir, SUITE, &records)?;
        println!();
        print!("{}", slipway_bench::report::table(&records));
        println!("wrote {}", path.display());
        Ok(())
    }
}

/// Loads the busybox archive into podman's storage (removed again after the run); returns the
/// image's name there.
fn podman_load(archive: &Path) -> anyhow::Result<String> {
    let out = Command::new("podman")
        .args(["load", "-i"])
        .arg(archive)
        .output()
        .context("running podman (Debian package podman)")?;
    anyhow::ensure!(
        out.status.success(),
        "podman load: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // "Loaded image: docker.io/library/busybox:latest" (or "Loaded image(s): ...")
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find_map(|l| {
            l.strip_prefix("Loaded image: ")
                .or_else(|| l.strip_prefix("Loaded image(s): "))
        })
        .map(|s| s.trim().to_owned())
        .context("podman load named no image")
}

/// One `podman run -d` of `image` on podman's default bridge network, timed until it returns
/// (the container runs); the container is removed after.
fn podman_start(image: &str, name: &str) -> anyhow::Result<f64> {
    let t = Instant::now();
    let out = Command::new("podman")
        // Within this process's hard limits: podman's defaults for root (2^20 open files, 4M
        // processes) may be above them, and runc then fails to set them.
        .args([
            "run",
            "-d",
            "--ulimit",
            "nofile=1024:1024",
            "--ulimit",
            "nproc=512:512",
            "--name",
            name,
            image,
            "sleep",
            "3600",
        ])
        .output()
        .context("podman run")?;
    let took = t.elapsed().as_secs_f64() * 1000.0;
    anyhow::ensure!(
        out.status.success(),
        "podman run: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(took)
}

fn podman_remove(names: &[String]) {
    if names.is_empty() {
        return;
    }
    let _ = Command::new("podman")
        .args(["rm", "-f", "-t", "0"])
        .args(names)
        .output();
}

async fn measure(
    data_dir: &Path,
    zones: &[String],
    count: usize,
    podman_image: &str,
    (runs, seconds): (usize, u64),
    scale: crate::services_bench::Scale,
) -> anyhow::Result<Vec<Record>> {
    println!("bench pods: making a cluster of 1 control plane host and 2 workers");
    let workload = node_cluster(data_dir, zones, "2Gi").await?;
    let pods: Api<Pod> = Api::namespaced(workload.clone(), "default");

    let bar = indicatif::ProgressBar::new(count as u64 * 2);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{spinner} bench pods [{bar:30}] {pos}/{len} {msg}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let (mut slipway, mut podman, mut containers) = (Vec::new(), Vec::new(), Vec::new());
    let mut result = Ok(());
    for i in 0..count {
        let name = format!("bench-{i}");
        bar.set_message("slipway");
        match start_pod(&pods, &name).await {
            Ok(ms) => slipway.push(ms),
            Err(e) => {
                result = Err(e);
                break;
            }
        }
        bar.inc(1);
        bar.set_message("podman");
        let container = format!("slipway-bench-pods-{}-{i}", std::process::id());
        // Removed at the end whether it started or not (a failed run leaves it Created).
        containers.push(container.clone());
        match podman_start(podman_image, &container) {
            Ok(ms) => podman.push(ms),
            Err(e) => {
                result = Err(e);
                break;
            }
        }
        bar.inc(1);
    }
    bar.finish_and_clear();
    podman_remove(&containers);
    let _ = pods
        .delete_collection(
            &DeleteParams::default(),
            &ListParams::default().labels("app=bench"),
        )
        .await;
    result?;
    let mut records = latency_records(SUITE, "pod_start", "podman-bridge", &slipway, &podman);
    let nodes = Api::<Node>::all(workload.clone())
        .list(&ListParams::default())
        .await?
        .items;
    let sockets: Vec<PathBuf> = nodes
        .iter()
        .filter_map(|n| n.metadata.name.as_deref())
        .map(|n| data_dir.join("hosts/data").join(n).join("agent.sock"))
        .collect();
    let worker = nodes
        .into_iter()
        .filter(|n| {
            n.metadata
                .labels
                .as_ref()
                .is_none_or(|l| !l.contains_key("node-role.kubernetes.io/control-plane"))
        })
        .find_map(|n| n.metadata.name)
        .context("no worker Node")?;
    records.extend(traffic(&pods, &worker, runs, seconds).await?);
    records.extend(crate::services_bench::measure(&workload, &sockets, scale).await?);
    Ok(records)
}

/// The raw veth baseline's server address ([`World::add_raw_pair`]).
const RAW_B: Ipv4Addr = Ipv4Addr::new(10, 98, 0, 2);

/// Pod-to-pod TCP throughput (iperf3) and round trips (ping, adaptive) between two pods that
/// containerd made on `node` (the CNI's pod-veth datapath), alternated with the same tools
/// between two namespaces joined by a raw veth pair.
async fn traffic(
    pods: &Api<Pod>,
    node: &str,
    runs: usize,
    seconds: u64,
) -> anyhow::Result<Vec<Record>> {
    let world = World::builder().hosts(1).build()?;
    let (raw_a, raw_b) = world.add_raw_pair("raw")?;
    let on_node = |mut p: Pod| {
        if let Some(spec) = p.spec.as_mut() {
            spec.node_name = Some(node.to_owned());
        }
        p
    };
    let argv = |a: &[&str]| a.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
    let server = on_node(pod(
        "iperf-server",
        "tools",
        &argv(&["/usr/bin/iperf3", "-s"]),
        None,
    )?);
    start(pods, &server, false).await?;
    let ip = pods
        .get("iperf-server")
        .await?
        .status
        .and_then(|s| s.pod_ip)
        .context("the iperf3 server pod has no address")?;
    let (mut tcp, mut rtt) = (Samples::default(), Samples::default());
    let bar = indicatif::ProgressBar::new(runs as u64 * 2);
    for run in 0..runs {
        let secs = seconds.to_string();
        let client = on_node(pod(
            &format!("iperf-{run}"),
            "tools",
            &argv(&["/usr/bin/iperf3", "-c", &ip, "-t", &secs, "-J"]),
            None,
        )?);
        let report = parse_iperf3(&crate::bench_pods::run(pods, &client).await?)
            .context("iperf3 in the client pod printed no report")?;
        tcp.slipway.push(report.received_bps / 1e9);
        tcp.baseline.push(
            iperf3_tcp(&raw_a, &raw_b, RAW_B, Duration::from_secs(seconds))?.received_bps / 1e9,
        );
        bar.inc(1);
        let pinger = on_node(pod(
            &format!("ping-{run}"),
            "busybox",
            &argv(&["ping", "-q", "-A", "-c", "200", &ip]),
            None,
        )?);
        let ours = parse_ping(&crate::bench_pods::run(pods, &pinger).await?)
            .and_then(|r| r.rtt_avg_ms)
            .context("ping in a pod printed no round trip")?;
        // The same ping (busybox's) on both sides.
        let out = raw_a.exec(&[
            "/usr/bin/busybox",
            "ping",
            "-q",
            "-A",
            "-c",
            "200",
            &RAW_B.to_string(),
        ])?;
        let base = parse_ping(&String::from_utf8_lossy(&out.stdout))
            .and_then(|r| r.rtt_avg_ms)
            .context("ping over the raw veth printed no round trip")?;
        rtt.slipway.push(ours);
        rtt.baseline.push(base);
        bar.inc(1);
    }
    bar.finish_and_clear();
    remove(pods, "iperf-server").await?;
    Ok(vec![
        tcp.record(Metric {
            suite: SUITE,
            name: "pod_to_pod_tcp",
            unit: "Gbit/s",
            higher_is_better: true,
            baseline: "raw-veth",
        })?,
        rtt.record(Metric {
            suite: SUITE,
            name: "pod_to_pod_rtt",
            unit: "ms",
            higher_is_better: false,
            baseline: "raw-veth",
        })?,
    ])
}

/// Seeds a fresh supervisor for a benchmark (namespace `bench`, HostClass `node` of one cpu
/// and `memory`) and makes Cluster `p` of 1 control plane host and 2 workers of that class;
/// once it is Ready, a client of its API (its kubeconfig written to `<data_dir>/p.kubeconfig`).
pub(crate) async fn node_cluster(
    data_dir: &Path,
    zones: &[String],
    memory: &str,
) -> anyhow::Result<kube::Client> {
    let client = crate::client_for(&data_dir.join("admin.kubeconfig")).await?;
    seed(&client, zones, "bench").await?;
    create(
        &client,
        &resource("slipway.dev", "HostClass", "hostclasses"),
        None,
        serde_json::json!({
            "apiVersion": "slipway.dev/v1alpha1", "kind": "HostClass",
            "metadata": {"name": "node"}, "spec": {"cpus": 1, "memory": memory},
        }),
    )
    .await?;
    let mut cluster = crate::cluster_bench::cluster("p", 2);
    for p in ["controlPlane", "nodePools"] {
        let topology = &mut cluster["spec"]["topology"][p];
        match topology.as_array_mut() {
            Some(pools) => pools
                .iter_mut()
                .for_each(|pool| pool["hostClass"] = "node".into()),
            None => topology["hostClass"] = "node".into(),
        }
    }
    let clusters_rt = resource("slipway.dev", "Cluster", "clusters");
    create(&client, &clusters_rt, Some("bench"), cluster).await?;
    let clusters: Api<DynamicObject> = Api::namespaced_with(client.clone(), "bench", &clusters_rt);
    crate::cluster_bench::wait("cluster p Ready", || async {
        let c = clusters.get("p").await?;
        Ok(c.data["status"]["conditions"]
            .as_array()
            .is_some_and(|cs| {
                cs.iter()
                    .any(|x| x["type"] == "Ready" && x["status"] == "True")
            })
            .then_some(()))
    })
    .await?;
    let secrets: Api<DynamicObject> =
        Api::namespaced_with(client.clone(), "bench", &resource("", "Secret", "secrets"));
    let text = secrets.get("p-kubeconfig").await?.data["data"]["value"]
        .as_str()
        .and_then(slipway_supervisor::client::base64_decode)
        .context("Secret bench/p-kubeconfig has no value")?;
    let path = data_dir.join("p.kubeconfig");
    std::fs::write(&path, text)?;
    crate::client_for(&path).await
}

/// Creates Pod `name` (busybox sleeping) and times it until it is Running, ms.
async fn start_pod(pods: &Api<Pod>, name: &str) -> anyhow::Result<f64> {
    let pod: Pod = serde_json::from_value(serde_json::json!({
        "metadata": {"name": name, "labels": {"app": "bench"}},
        "spec": {"containers": [{"name": "sleep", "image": "busybox", "imagePullPolicy": "Never",
                                 "command": ["sleep", "3600"]}]},
    }))?;
    let t = Instant::now();
    pods.create(&PostParams::default(), &pod).await?;
    loop {
        let running = pods
            .get(name)
            .await?
            .status
            .and_then(|s| s.phase)
            .is_some_and(|p| p == "Running");
        if running {
            return Ok(t.elapsed().as_secs_f64() * 1000.0);
        }
        anyhow::ensure!(
            t.elapsed() < START_TIMEOUT,
            "Pod {name} not Running within {START_TIMEOUT:?}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::quantile;

    #[test]
    fn quantiles_are_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(quantile(&v, 0.5), 50.0);
        assert_eq!(quantile(&v, 0.99), 99.0);
        assert_eq!(quantile(&[3.0, 1.0, 2.0], 0.5), 2.0);
        assert!(quantile(&[], 0.5).is_nan());
    }
}
