//! `slipway bench pods`: pod start latency on a provisioned cluster beside podman on the same
//! machine. A cluster of netns hosts (1 control plane, 2 workers, each host its own containerd,
//! Slipway's CNI, preloaded images) is made first; then, alternating, a Pod is created through
//! the workload cluster's API and timed until it is Running (scheduling, the kubelet's watch,
//! sandbox, CNI ADD through containerd, container start, status written back), and `podman run
//! -d` of the same busybox image with Debian's bridge plugin is timed until it returns (the
//! container started). p50 and p99 of each, and their ratio, go to `pods.jsonl`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DeleteParams, DynamicObject, ListParams, PostParams};
use serde::Serialize;
use slipway_hosts::reconciler::ProviderArgs;

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
    /// Where pods.jsonl is written.
    #[arg(long, default_value = slipway_bench::report::DEFAULT_OUT_DIR)]
    out_dir: PathBuf,
    #[command(flatten)]
    hosts: ProviderArgs,
}

/// One side's start latencies.
#[derive(Debug, Clone, Serialize)]
struct Record {
    suite: &'static str,
    metric: &'static str,
    side: &'static str,
    unit: &'static str,
    p50: f64,
    p99: f64,
    samples: usize,
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
        anyhow::ensure!(
            nix::unistd::Uid::effective().is_root(),
            "this needs root: it creates network namespaces, cgroups and containers"
        );
        tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?
            .block_on(self.run_async())
    }

    async fn run_async(self) -> anyhow::Result<()> {
        let images = self.data_dir.with_extension("images");
        let _ = std::fs::remove_dir_all(&images);
        println!("bench pods: building the node images (busybox, pause, tools)");
        slipway_agent::pods::image::build_node_images(&images)
            .map_err(|e| anyhow::anyhow!(slipway_agent::pods::error_chain(&e)))?;
        let podman_image = podman_load(&images.join("busybox.tar"))?;
        let loaded = podman_image.clone();
        let mut hosts = self.hosts.clone();
        if hosts.agent_flags.is_empty() {
            hosts.agent_flags = slipway_hosts::reconciler::netns_node_flags(&images);
        }
        let (tx, rx) = tokio::sync::oneshot::channel();
        let data_dir = self.data_dir.clone();
        let (zones, count) = (hosts.zones.clone(), self.pods as usize);
        let result = with_supervisor(&self.data_dir, self.listen, &hosts, move |_| async move {
            let samples = measure(&data_dir, &zones, count, &podman_image).await?;
            let _ = tx.send(samples);
            Ok(())
        })
        .await;
        let _ = std::fs::remove_dir_all(&images);
        // The image podman was given goes too: the machine is left as found.
        let _ = Command::new("podman").args(["rmi", "-f", &loaded]).output();
        result?;
        let (slipway, podman) = rx.await.context("the runs did not finish")?;
        let records = [("slipway", &slipway), ("podman_bridge", &podman)].map(|(side, v)| Record {
            suite: SUITE,
            metric: "pod_start_latency",
            side,
            unit: "ms",
            p50: quantile(v, 0.5),
            p99: quantile(v, 0.99),
            samples: v.len(),
        });
        std::fs::create_dir_all(&self.out_dir)?;
        let path = self.out_dir.join(format!("{SUITE}.jsonl"));
        let mut out = String::new();
        for r in &records {
            out.push_str(&serde_json::to_string(r)?);
            out.push('\n');
        }
        std::fs::write(&path, out)?;
        println!(
            "\n{:<28} {:>10} {:>10}\n{:<28} {:>10.1} {:>10.1}\n{:<28} {:>10.1} {:>10.1}\n{:<28} {:>10.2} {:>10.2}\nwrote {}",
            "pod start (create→Running)",
            "p50 ms",
            "p99 ms",
            "slipway (cluster API + CRI)",
            records[0].p50,
            records[0].p99,
            "podman run -d (bridge)",
            records[1].p50,
            records[1].p99,
            "ratio slipway/podman",
            records[0].p50 / records[1].p50,
            records[0].p99 / records[1].p99,
            path.display()
        );
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
) -> anyhow::Result<(Vec<f64>, Vec<f64>)> {
    println!("bench pods: making a cluster of 1 control plane host and 2 workers");
    let workload = node_cluster(data_dir, zones, "2Gi").await?;
    let pods: Api<Pod> = Api::namespaced(workload, "default");

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
    result.map(|()| (slipway, podman))
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
