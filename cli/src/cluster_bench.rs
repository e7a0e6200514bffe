//! `slipway bench cluster`: how fast the supervisor provisions clusters of netns hosts, from
//! `kubectl apply` (a create through the API) to Ready: a 1+2 cluster, scaling a pool by one host,
//! remediation (a worker's agent killed with kill -9 → its replacement Ready), deletion (until
//! every host is gone), a 3+3 cluster (three control plane hosts on one etcd); and the memory of a host agent and of a workload cluster's API server.
//! There is no peer to run beside it on this machine (Cluster API's docker provider and kind
//! need images from a registry), so the suite reports its own figures, median of the runs.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use kube::api::{Api, DeleteParams, DynamicObject, ListParams, Patch, PatchParams};
use serde::Serialize;
use serde_json::json;
use slipway_hosts::HostProvider as _;
use slipway_hosts::reconciler::ProviderArgs;

use crate::up::{create, ready_hosts, resource, seed, with_supervisor};

/// The suite's name (its JSONL file).
pub const SUITE: &str = "cluster";

/// How long one step may take before the run fails.
const STEP_TIMEOUT: Duration = Duration::from_secs(120);

#[derive(Debug, clap::Args)]
pub struct ClusterBenchArgs {
    /// Runs; the median of each figure is reported.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..=100))]
    runs: u64,
    /// The supervisor's state for the run (wiped before and after).
    #[arg(long, default_value = "/var/lib/slipway/bench-cluster")]
    data_dir: PathBuf,
    /// Where the supervisor serves during the run.
    #[arg(long, default_value = "0.0.0.0:6444")]
    listen: SocketAddr,
    /// Where cluster.jsonl is written.
    #[arg(long, default_value = slipway_bench::report::DEFAULT_OUT_DIR)]
    out_dir: PathBuf,
    #[command(flatten)]
    hosts: ProviderArgs,
}

/// One figure: the median of its runs.
#[derive(Debug, Clone, Serialize)]
struct Figure {
    suite: &'static str,
    metric: &'static str,
    unit: &'static str,
    median: f64,
    min: f64,
    max: f64,
    runs: usize,
}

#[derive(Debug, Default)]
struct Samples {
    apply_1_2: Vec<f64>,
    apply_3_3: Vec<f64>,
    scale_up: Vec<f64>,
    remediation: Vec<f64>,
    delete: Vec<f64>,
    agent_rss: Vec<f64>,
    api_rss: Vec<f64>,
}

impl ClusterBenchArgs {
    pub fn run(self) -> anyhow::Result<()> {
        crate::bench_pods::as_root("network namespaces and cgroups", self.run_async())
    }

    async fn run_async(self) -> anyhow::Result<()> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let data_dir = self.data_dir.clone();
        let runs = self.runs as usize;
        let hosts = self.hosts.clone();
        with_supervisor(
            &self.data_dir,
            self.listen,
            &self.hosts,
            move |_| async move {
                let samples = measure(data_dir, hosts, runs).await?;
                let _ = tx.send(samples);
                Ok(())
            },
        )
        .await?;
        let samples = rx.await.context("the runs did not finish")?;
        let figures = [
            ("apply_to_ready_1cp_2workers", "s", &samples.apply_1_2),
            ("apply_to_ready_3cp_3workers", "s", &samples.apply_3_3),
            ("scale_plus_1_host_to_ready", "s", &samples.scale_up),
            (
                "remediation_agent_killed_to_ready",
                "s",
                &samples.remediation,
            ),
            ("delete_to_all_hosts_gone", "s", &samples.delete),
            ("host_agent_rss", "MiB", &samples.agent_rss),
            ("workload_api_server_rss", "MiB", &samples.api_rss),
        ]
        .into_iter()
        .map(|(metric, unit, values)| {
            let median = slipway_bench::report::median(values).unwrap_or(f64::NAN);
            let min = values.iter().copied().fold(f64::INFINITY, f64::min);
            let max = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            Figure {
                suite: SUITE,
                metric,
                unit,
                median,
                min,
                max,
                runs: values.len(),
            }
        })
        .collect::<Vec<_>>();
        std::fs::create_dir_all(&self.out_dir)?;
        let path = self.out_dir.join(format!("{SUITE}.jsonl"));
        let mut out = String::new();
        let mut table = format!(
            "{:<36} {:>10} {:>18}  unit\n",
            "metric", "median", "min..max"
        );
        for f in &figures {
            out.push_str(&serde_json::to_string(f)?);
            out.push('\n');
            let _ = writeln!(
                table,
                "{:<36} {:>10.3} {:>18}  {}",
                f.metric,
                f.median,
                format!("{:.3}..{:.3}", f.min, f.max),
                f.unit
            );
        }
        std::fs::write(&path, out)?;
        println!("\n{table}wrote {}", path.display());
        Ok(())
    }
}

/// RSS of `pid`, MiB.
fn rss_mib(pid: i32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kb / 1024.0)
}

/// Whether `pid` runs `slipway <sub>`.
fn is_slipway(pid: i32, sub: &str) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .ok()
        .is_some_and(|c| c.split(|b| *b == 0).nth(1) == Some(sub.as_bytes()))
}

pub(crate) async fn wait<T, F, Fut>(what: &str, mut f: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<Option<T>>>,
{
    let deadline = Instant::now() + STEP_TIMEOUT;
    loop {
        if let Some(v) = f().await? {
            return Ok(v);
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "{what}: not within {STEP_TIMEOUT:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Deletes Cluster `name` and waits until it and every host of the provider are gone.
async fn delete_all(
    clusters: &Api<DynamicObject>,
    provider: &slipway_hosts::netns::NetnsProvider,
    name: &str,
) -> anyhow::Result<()> {
    clusters.delete(name, &DeleteParams::default()).await?;
    wait("every host gone", || async {
        let gone = clusters.get_opt(name).await?.is_none();
        Ok((gone && provider.list().await?.is_empty()).then_some(()))
    })
    .await
}

pub(crate) fn cluster(name: &str, workers: u32) -> serde_json::Value {
    json!({
        "apiVersion": "slipway.dev/v1alpha1", "kind": "Cluster",
        "metadata": {"name": name, "namespace": "bench"},
        "spec": {
            "topology": {
                "controlPlane": {"replicas": 1, "hostClass": "small"},
                "nodePools": [{"name": "workers", "replicas": workers, "hostClass": "small"}],
            },
            "settings": {"network": {
                "pods": {"cidrBlocks": ["192.168.0.0/16"]},
                "services": {"cidrBlocks": ["10.96.0.0/16"]},
                "ingress": {"cidrBlocks": ["10.124.100.0/27"]},
            }},
        },
    })
}

async fn measure(data_dir: PathBuf, hosts: ProviderArgs, runs: usize) -> anyhow::Result<Samples> {
    let client = crate::client_for(&data_dir.join("admin.kubeconfig")).await?;
    seed(&client, &hosts.zones, "bench").await?;
    let mut provider_args = hosts.clone();
    provider_args.host_provider = "netns".into();
    let provider = provider_args
        .provider(&data_dir)?
        .context("the netns provider")?;
    let clusters_rt = resource("slipway.dev", "Cluster", "clusters");
    let clusters: Api<DynamicObject> = Api::namespaced_with(client.clone(), "bench", &clusters_rt);
    let hosts_api: Api<DynamicObject> =
        Api::all_with(client.clone(), &resource("slipway.dev", "Host", "hosts"));
    let ready = |name: String, count: usize| {
        let clusters = clusters.clone();
        let hosts_api = hosts_api.clone();
        async move {
            let c = clusters.get(&name).await?;
            let names: Vec<String> = c.data["status"]["hosts"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|v| v.as_str().map(str::to_owned))
                        .collect()
                })
                .unwrap_or_default();
            let is_ready = c.data["status"]["conditions"].as_array().is_some_and(|cs| {
                cs.iter()
                    .any(|x| x["type"] == "Ready" && x["status"] == "True")
            });
            let all = hosts_api.list(&ListParams::default()).await?.items;
            Ok::<_, anyhow::Error>(
                (is_ready && names.len() == count && ready_hosts(&all, &names) == count)
                    .then_some(()),
            )
        }
    };
    let bar = indicatif::ProgressBar::new(runs as u64 * 5);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{spinner} bench cluster [{bar:30}] {pos}/{len} {msg}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let mut s = Samples::default();
    for run in 0..runs {
        let name = format!("b{run}");
        bar.set_message(format!("run {}: apply 1+2", run + 1));
        let t = Instant::now();
        create(&client, &clusters_rt, Some("bench"), cluster(&name, 2)).await?;
        wait("1+2 Ready", || ready(name.clone(), 3)).await?;
        s.apply_1_2.push(t.elapsed().as_secs_f64());
        bar.inc(1);

        bar.set_message(format!("run {}: scale +1", run + 1));
        let t = Instant::now();
        clusters
            .patch(
                &name,
                &PatchParams::default(),
                &Patch::Merge(json!({"spec": {"topology": {"nodePools": [
                {"name": "workers", "replicas": 3, "hostClass": "small"}]}}})),
            )
            .await?;
        wait("scale +1 Ready", || ready(name.clone(), 4)).await?;
        s.scale_up.push(t.elapsed().as_secs_f64());
        bar.inc(1);

        // Memory, once everything is up: the worker's agent and the control plane's API server.
        let worker = format!("bench-{name}-workers-0");
        let cp = format!("bench-{name}-control-plane-0");
        let worker_pids = provider.status(&worker).await?.pids;
        if let Some(mib) = worker_pids
            .iter()
            .find(|p| is_slipway(**p, "join"))
            .and_then(|p| rss_mib(*p))
        {
            s.agent_rss.push(mib);
        }
        if let Some(mib) = provider
            .status(&cp)
            .await?
            .pids
            .iter()
            .find(|p| is_slipway(**p, "supervisor"))
            .and_then(|p| rss_mib(*p))
        {
            s.api_rss.push(mib);
        }

        bar.set_message(format!("run {}: remediation", run + 1));
        let old = hosts_api.get(&worker).await?.metadata.uid;
        let t = Instant::now();
        for pid in worker_pids {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        wait("the replacement Ready", || {
            let (hosts_api, old, worker, ready) =
                (hosts_api.clone(), old.clone(), worker.clone(), &ready);
            let name = name.clone();
            async move {
                let replaced = hosts_api
                    .get_opt(&worker)
                    .await?
                    .is_some_and(|h| h.metadata.uid != old);
                if !replaced {
                    return Ok(None);
                }
                ready(name, 4).await
            }
        })
        .await?;
        s.remediation.push(t.elapsed().as_secs_f64());
        bar.inc(1);

        bar.set_message(format!("run {}: delete", run + 1));
        let t = Instant::now();
        delete_all(&clusters, &provider, &name).await?;
        s.delete.push(t.elapsed().as_secs_f64());
        bar.inc(1);

        // Three control plane hosts (a 3-member etcd behind the provider's VIP) and three
        // workers; deleted again before the next run.
        bar.set_message(format!("run {}: apply 3+3", run + 1));
        let ha = format!("h{run}");
        let mut spec = cluster(&ha, 3);
        spec["spec"]["topology"]["controlPlane"]["replicas"] = 3.into();
        let t = Instant::now();
        create(&client, &clusters_rt, Some("bench"), spec).await?;
        wait("3+3 Ready", || ready(ha.clone(), 6)).await?;
        s.apply_3_3.push(t.elapsed().as_secs_f64());
        delete_all(&clusters, &provider, &ha).await?;
        bar.inc(1);
    }
    bar.finish_and_clear();
    Ok(s)
}
