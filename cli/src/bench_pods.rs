//! What the cluster benchmarks share: running as root on a runtime, the node images, and Pods
//! on a benchmark's workload cluster (made, timed until Running or done, read and removed).

use std::time::{Duration, Instant};

use anyhow::Context as _;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DeleteParams, LogParams, PostParams};
use serde_json::json;
use slipway_bench::report::{Metric, Record, Samples};

use crate::pods_bench::quantile;

/// Runs a benchmark's `main` on a multi-threaded runtime; it needs root for `needs`.
pub(crate) fn as_root(
    needs: &str,
    main: impl Future<Output = anyhow::Result<()>>,
) -> anyhow::Result<()> {
    anyhow::ensure!(
        nix::unistd::Uid::effective().is_root(),
        "this needs root: it creates {needs}"
    );
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(main)
}

/// The shortest host Lease during a benchmark that saturates this machine (iperf3, fio): a
/// renewal that comes late must not get a host replaced in the middle of a run.
const BENCH_LEASE_DURATION: Duration = Duration::from_secs(30);

/// Makes `hosts`' Leases last at least [`BENCH_LEASE_DURATION`], saying so.
pub(crate) fn long_leases(suite: &str, hosts: &mut slipway_hosts::reconciler::ProviderArgs) {
    if hosts.lease_duration < BENCH_LEASE_DURATION {
        println!("bench {suite}: host leases last {BENCH_LEASE_DURATION:?} during the run");
        hosts.lease_duration = BENCH_LEASE_DURATION;
    }
}

/// Builds the node images (busybox, pause, tools) afresh in `dir`, and the agent flags that
/// make every host of `hosts` a node with them (unless flags were given).
pub(crate) fn node_images(
    suite: &str,
    dir: &std::path::Path,
    hosts: &mut slipway_hosts::reconciler::ProviderArgs,
) -> anyhow::Result<()> {
    let _ = std::fs::remove_dir_all(dir);
    println!("bench {suite}: building the node images (busybox, pause, tools)");
    slipway_agent::pods::image::build_node_images(dir)
        .map_err(|e| anyhow::anyhow!(slipway_agent::pods::error_chain(&e)))?;
    if hosts.agent_flags.is_empty() {
        hosts.agent_flags = slipway_hosts::reconciler::netns_node_flags(dir);
    }
    Ok(())
}

/// How long one Pod (or claim) may take before the run fails.
pub(crate) const STEP_TIMEOUT: Duration = Duration::from_secs(180);

/// Polls `f` every 5 ms until it gives a value; fails after [`STEP_TIMEOUT`].
pub(crate) async fn until<T, F, Fut>(what: &str, mut f: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<Option<T>>>,
{
    let start = Instant::now();
    loop {
        if let Some(v) = f().await? {
            return Ok(v);
        }
        anyhow::ensure!(
            start.elapsed() < STEP_TIMEOUT,
            "{what}: not within {STEP_TIMEOUT:?}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// A Pod running `command` from `image`, with claim `claim` at /data when given.
pub(crate) fn pod(
    name: &str,
    image: &str,
    command: &[String],
    claim: Option<&str>,
) -> anyhow::Result<Pod> {
    let mut spec = json!({
        "restartPolicy": "Never",
        "terminationGracePeriodSeconds": 0,
        "containers": [{"name": "c", "image": image, "imagePullPolicy": "Never",
                        "command": command}],
    });
    if let Some(claim) = claim {
        spec["volumes"] = json!([{"name": "data", "persistentVolumeClaim": {"claimName": claim}}]);
        spec["containers"][0]["volumeMounts"] = json!([{"name": "data", "mountPath": "/data"}]);
    }
    Ok(serde_json::from_value(json!({
        "metadata": {"name": name, "labels": {"app": "bench-csi"}},
        "spec": spec,
    }))?)
}

fn phase(p: &Pod) -> Option<&str> {
    p.status.as_ref()?.phase.as_deref()
}

/// Creates `p` and times it until it is Running (or, with `done`, has Succeeded), ms.
pub(crate) async fn start(pods: &Api<Pod>, p: &Pod, done: bool) -> anyhow::Result<f64> {
    let name = p.metadata.name.clone().unwrap_or_default();
    let t = Instant::now();
    pods.create(&PostParams::default(), p)
        .await
        .with_context(|| format!("creating Pod {name}"))?;
    until(&format!("Pod {name}"), || async {
        let p = pods.get(&name).await.context("reading the Pod")?;
        match phase(&p) {
            Some("Failed") => anyhow::bail!("Pod {name} failed: {:?}", p.status),
            Some("Succeeded") => Ok(Some(())),
            Some("Running") if !done => Ok(Some(())),
            _ => Ok(None),
        }
    })
    .await?;
    Ok(t.elapsed().as_secs_f64() * 1000.0)
}

/// Deletes Pod `name` and waits until it is gone (its volume unpublished).
pub(crate) async fn remove(pods: &Api<Pod>, name: &str) -> anyhow::Result<()> {
    pods.delete(name, &DeleteParams::default()).await?;
    until(&format!("Pod {name} gone"), || async {
        Ok(pods.get_opt(name).await?.is_none().then_some(()))
    })
    .await
}

/// Runs `p` to completion; its log.
pub(crate) async fn run(pods: &Api<Pod>, p: &Pod) -> anyhow::Result<String> {
    let name = p.metadata.name.clone().unwrap_or_default();
    start(pods, p, true).await?;
    let log = pods
        .logs(&name, &LogParams::default())
        .await
        .with_context(|| format!("the log of Pod {name}"))?;
    remove(pods, &name).await?;
    Ok(log)
}

/// p50 and p99 records of `slipway` against `baseline` latencies (lower is better).
pub(crate) fn latency_records(
    suite: &str,
    name: &str,
    baseline: &str,
    slipway: &[f64],
    base: &[f64],
) -> Vec<Record> {
    [("p50", 0.5), ("p99", 0.99)]
        .into_iter()
        .filter_map(|(q, at)| {
            let samples = Samples {
                slipway: vec![quantile(slipway, at)],
                baseline: vec![quantile(base, at)],
            };
            let mut r = samples
                .record(Metric {
                    suite,
                    name: &format!("{name}_{q}"),
                    unit: "ms",
                    higher_is_better: false,
                    baseline,
                })
                .ok()?;
            r.runs = slipway.len();
            Some(r)
        })
        .collect()
}
