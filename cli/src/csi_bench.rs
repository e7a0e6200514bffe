//! `slipway bench csi`: volumes of a provisioned cluster, measured in the same run as their
//! limits on this machine. A cluster of netns hosts (1 control plane, 2 workers) with a storage
//! host per zone is made first. Then:
//!
//! - **Latency**: a claim is created and timed until Bound (the pvCSI controller, the
//!   supervisor's volume reconciler, the block store), then a Pod using it until Running (the
//!   attachment, NodeStage with mkfs, NodePublish, the container), alternated with a Pod
//!   without a volume (its baseline: what the volume adds).
//! - **fio** (4k random read and write at queue depth 32, 1 MiB sequential read and write;
//!   libaio, O_DIRECT) inside a Pod on a Slipway volume, beside the same fio on this machine on
//!   a loop device over a file (the baseline: what the Pod's volume is locally, a loop device)
//!   and on the raw file (the limit), alternated round by round.
//!
//! The attach path (kernel NBD or the userspace client through FUSE and a loop device) is
//! printed; the records go to `csi.jsonl`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::Context as _;
use k8s_openapi::api::core::v1::{Node, PersistentVolumeClaim, Pod};
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use serde_json::{Value, json};
use slipway_bench::report::{self, Metric, Record, Samples};
use slipway_hosts::reconciler::ProviderArgs;

use crate::bench_pods::{latency_records, pod, remove, start, until};
use crate::pods_bench::node_cluster;
use crate::up::{create, resource_in, with_supervisor};

/// The suite's name (its JSONL file).
pub const SUITE: &str = "csi";

#[derive(Debug, clap::Args)]
pub struct CsiBenchArgs {
    /// Claims created (each with a Pod using it, and a Pod without one beside it).
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(2..=200))]
    claims: u64,
    /// fio rounds: every workload on every side once per round.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..=20))]
    rounds: u64,
    /// Seconds of each fio run.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=600))]
    seconds: u64,
    /// The size of fio's file on each side, MiB.
    #[arg(long, default_value_t = 512, value_parser = clap::value_parser!(u64).range(16..=65536))]
    size_mib: u64,
    /// The supervisor's state for the run (wiped before and after).
    #[arg(long, default_value = "/var/lib/slipway/bench-csi")]
    data_dir: PathBuf,
    /// Where the supervisor serves during the run.
    #[arg(long, default_value = "0.0.0.0:6446")]
    listen: SocketAddr,
    /// Where csi.jsonl is written.
    #[arg(long, default_value = slipway_bench::report::DEFAULT_OUT_DIR)]
    out_dir: PathBuf,
    #[command(flatten)]
    hosts: ProviderArgs,
}

/// One fio workload.
#[derive(Debug, Clone, Copy)]
struct Workload {
    name: &'static str,
    rw: &'static str,
    bs: &'static str,
    depth: u32,
    /// IOPS for small blocks, MiB/s for large ones.
    iops: bool,
}

const WORKLOADS: [Workload; 4] = [
    Workload {
        name: "randread_4k_qd32",
        rw: "randread",
        bs: "4k",
        depth: 32,
        iops: true,
    },
    Workload {
        name: "randwrite_4k_qd32",
        rw: "randwrite",
        bs: "4k",
        depth: 32,
        iops: true,
    },
    Workload {
        name: "read_1m_qd4",
        rw: "read",
        bs: "1M",
        depth: 4,
        iops: false,
    },
    Workload {
        name: "write_1m_qd4",
        rw: "write",
        bs: "1M",
        depth: 4,
        iops: false,
    },
];

/// fio's arguments for `w` on `filename` (of `size_mib`), JSON on stdout; for `seconds`, or
/// once over the file.
fn fio_args(w: &Workload, filename: &str, size_mib: u64, seconds: Option<u64>) -> Vec<String> {
    let mut args = vec![
        "--name=bench".into(),
        format!("--filename={filename}"),
        format!("--size={size_mib}M"),
        format!("--rw={}", w.rw),
        format!("--bs={}", w.bs),
        format!("--iodepth={}", w.depth),
        "--ioengine=libaio".into(),
        "--direct=1".into(),
        "--output-format=json".into(),
    ];
    if let Some(s) = seconds {
        args.extend(["--time_based".into(), format!("--runtime={s}")]);
    }
    args
}

/// The figure of `w` in fio's JSON report: IOPS, or MiB/s.
fn fio_figure(w: &Workload, json: &str) -> anyhow::Result<f64> {
    // fio may print notes before its JSON.
    let start = json.find('{').context("fio printed no JSON")?;
    let v: Value = serde_json::from_str(&json[start..]).context("fio's JSON")?;
    let side = if w.rw.contains("read") {
        "read"
    } else {
        "write"
    };
    let job = &v["jobs"][0][side];
    let figure = if w.iops {
        job["iops"].as_f64()
    } else {
        job["bw"].as_f64().map(|kib| kib / 1024.0)
    };
    let figure = figure.with_context(|| format!("fio's JSON has no {side} figure"))?;
    anyhow::ensure!(
        figure > 0.0 && v["jobs"][0]["error"].as_i64() == Some(0),
        "fio reported {figure} with error {}",
        v["jobs"][0]["error"]
    );
    Ok(figure)
}

/// Runs fio on this machine.
fn fio_here(
    w: &Workload,
    filename: &str,
    size_mib: u64,
    seconds: Option<u64>,
) -> anyhow::Result<f64> {
    let out = Command::new("fio")
        .args(fio_args(w, filename, size_mib, seconds))
        .output()
        .context("running fio (Debian package fio)")?;
    anyhow::ensure!(
        out.status.success(),
        "fio on {filename}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    fio_figure(w, &String::from_utf8_lossy(&out.stdout))
}

/// A loop device over a file, detached on drop.
struct Loop(String);

impl Loop {
    fn attach(file: &Path) -> anyhow::Result<Self> {
        let out = Command::new("losetup")
            .args(["--find", "--show", "--direct-io=on"])
            .arg(file)
            .output()
            .context("running losetup")?;
        anyhow::ensure!(
            out.status.success(),
            "losetup: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(Self(String::from_utf8_lossy(&out.stdout).trim().to_owned()))
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").args(["-d", &self.0]).output();
    }
}

impl CsiBenchArgs {
    pub fn run(self) -> anyhow::Result<()> {
        crate::bench_pods::as_root(
            "network namespaces, cgroups, containers and loop devices",
            self.run_async(),
        )
    }

    async fn run_async(self) -> anyhow::Result<()> {
        let images = self.data_dir.with_extension("images");
        let local = self.data_dir.with_extension("local");
        let _ = std::fs::remove_dir_all(&local);
        let mut hosts = self.hosts.clone();
        crate::bench_pods::node_images(SUITE, &images, &mut hosts)?;
        hosts.storage_hosts = true;
        crate::bench_pods::long_leases(SUITE, &mut hosts);
        let attach_path = if slipway_csi::kernel_nbd::available(Path::new("/")) {
            "kernel NBD (/dev/nbdN)"
        } else {
            "userspace NBD client over TLS, FUSE file, loop device (no /dev/nbd* here)"
        };
        println!("bench csi: attach path: {attach_path}");
        let (tx, rx) = tokio::sync::oneshot::channel();
        let (data_dir, zones) = (self.data_dir.clone(), hosts.zones.clone());
        let plan = Plan {
            claims: self.claims as usize,
            rounds: self.rounds as usize,
            seconds: self.seconds,
            size_mib: self.size_mib,
            local: local.clone(),
        };
        let result = with_supervisor(&self.data_dir, self.listen, &hosts, move |_| async move {
            let records = measure(&data_dir, &zones, &plan).await?;
            let _ = tx.send(records);
            Ok(())
        })
        .await;
        for dir in [&images, &local] {
            let _ = std::fs::remove_dir_all(dir);
        }
        result?;
        let records = rx.await.context("the runs did not finish")?;
        let path = report::write_jsonl(&self.out_dir, SUITE, &records)?;
        println!();
        print!("{}", report::table(&records));
        println!("attach path: {attach_path}\nwrote {}", path.display());
        Ok(())
    }
}

/// What one run measures.
#[derive(Debug, Clone)]
struct Plan {
    claims: usize,
    rounds: usize,
    seconds: u64,
    size_mib: u64,
    /// This machine's side: the raw file and the loop device's file.
    local: PathBuf,
}

async fn measure(data_dir: &Path, zones: &[String], plan: &Plan) -> anyhow::Result<Vec<Record>> {
    let supervisor = crate::client_for(&data_dir.join("admin.kubeconfig")).await?;
    let classes = resource_in("storage.k8s.io", "v1", "StorageClass", "storageclasses");
    create(
        &supervisor,
        &classes,
        None,
        json!({"apiVersion": "storage.k8s.io/v1", "kind": "StorageClass",
               "metadata": {"name": "fast"}, "provisioner": "csi.slipway.dev"}),
    )
    .await?;
    println!("bench csi: making a cluster of 1 control plane host and 2 workers");
    let workload = node_cluster(data_dir, zones, "2Gi").await?;
    // Claims land in the zone of the first worker (an Immediate class with that topology).
    let nodes = Api::<Node>::all(workload.clone())
        .list(&ListParams::default())
        .await?
        .items;
    let zone = nodes
        .iter()
        .filter(|n| {
            n.metadata
                .labels
                .as_ref()
                .is_none_or(|l| !l.contains_key("node-role.kubernetes.io/control-plane"))
        })
        .find_map(|n| {
            n.metadata
                .labels
                .as_ref()?
                .get(slipway_csi::identity::ZONE_KEY)
        })
        .cloned()
        .context("no worker Node with a zone")?;
    create(
        &workload,
        &classes,
        None,
        json!({"apiVersion": "storage.k8s.io/v1", "kind": "StorageClass",
               "metadata": {"name": "bench"}, "provisioner": "csi.slipway.dev",
               "parameters": {"svStorageClass": "fast"},
               "allowedTopologies": [{"matchLabelExpressions": [
                   {"key": slipway_csi::identity::ZONE_KEY, "values": [zone]}]}]}),
    )
    .await?;
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(workload.clone(), "default");
    let pods: Api<Pod> = Api::namespaced(workload, "default");
    let mut records = latency(&claims, &pods, plan.claims).await?;
    records.extend(fio(&claims, &pods, plan).await?);
    Ok(records)
}

fn claim(name: &str, size_mib: u64) -> anyhow::Result<PersistentVolumeClaim> {
    Ok(serde_json::from_value(json!({
        "metadata": {"name": name, "labels": {"app": "bench-csi"}},
        "spec": {"accessModes": ["ReadWriteOnce"], "storageClassName": "bench",
                 "resources": {"requests": {"storage": format!("{size_mib}Mi")}}},
    }))?)
}

/// Claims to Bound and Pods with them to Running, beside Pods without a volume.
async fn latency(
    claims: &Api<PersistentVolumeClaim>,
    pods: &Api<Pod>,
    count: usize,
) -> anyhow::Result<Vec<Record>> {
    let sleep = ["sleep".to_owned(), "3600".to_owned()];
    let (mut bound, mut with, mut without) = (Vec::new(), Vec::new(), Vec::new());
    let bar = progress(
        count as u64,
        "claims Bound, Pods with and without a volume Running",
    );
    for i in 0..count {
        let name = format!("lat-{i}");
        let t = Instant::now();
        claims
            .create(&PostParams::default(), &claim(&name, 64)?)
            .await
            .with_context(|| format!("creating claim {name}"))?;
        until(&format!("claim {name} Bound"), || async {
            let c = claims.get(&name).await.context("reading the claim")?;
            Ok((c.status.and_then(|s| s.phase).as_deref() == Some("Bound")).then_some(()))
        })
        .await?;
        bound.push(t.elapsed().as_secs_f64() * 1000.0);
        with.push(start(pods, &pod(&name, "busybox", &sleep, Some(&name))?, false).await?);
        let bare = format!("bare-{i}");
        without.push(start(pods, &pod(&bare, "busybox", &sleep, None)?, false).await?);
        for p in [&name, &bare] {
            remove(pods, p).await?;
        }
        claims.delete(&name, &DeleteParams::default()).await?;
        bar.inc(1);
    }
    bar.finish_and_clear();
    let mut records = latency_records(SUITE, "claim_bound", "pod-running", &bound, &without);
    records.extend(latency_records(
        SUITE,
        "pod_with_volume_running",
        "pod-without-volume",
        &with,
        &without,
    ));
    Ok(records)
}

fn progress(len: u64, what: &str) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(len);
    bar.set_style(
        indicatif::ProgressStyle::with_template(&format!(
            "{{spinner}} bench csi [{{bar:30}}] {{pos}}/{{len}} {what}"
        ))
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar
}

/// fio in a Pod on a claim, on a loop device and on a raw file here; alternated by round.
async fn fio(
    claims: &Api<PersistentVolumeClaim>,
    pods: &Api<Pod>,
    plan: &Plan,
) -> anyhow::Result<Vec<Record>> {
    let size = plan.size_mib;
    claims
        .create(&PostParams::default(), &claim("fio", size + size / 4 + 64)?)
        .await?;
    std::fs::create_dir_all(&plan.local)?;
    let file = plan.local.join("fio.dat");
    let image = plan.local.join("loop.img");
    let fill = Workload {
        name: "fill",
        rw: "write",
        bs: "1M",
        depth: 4,
        iops: false,
    };
    // Every side's data written once first, so reads read data, not holes.
    let mut runs = 0;
    let mut in_pod = |w: Vec<String>| {
        runs += 1;
        let name = format!("fio-{runs}");
        async move {
            let mut command = vec!["/usr/bin/fio".to_owned()];
            command.extend(w);
            crate::bench_pods::run(pods, &pod(&name, "tools", &command, Some("fio"))?).await
        }
    };
    fio_figure(
        &fill,
        &in_pod(fio_args(&fill, "/data/fio.dat", size, None)).await?,
    )
    .context("filling the Pod's volume")?;
    for f in [&file, &image] {
        fio_here(&fill, &f.display().to_string(), size, None)?;
    }
    let dev = Loop::attach(&image)?;
    let bar = progress(
        (plan.rounds * WORKLOADS.len() * 3) as u64,
        "fio runs (pod volume, loop device, raw file)",
    );
    let mut samples: Vec<(Samples, Samples)> = vec![Default::default(); WORKLOADS.len()];
    for _ in 0..plan.rounds {
        for (w, (vs_loop, vs_file)) in WORKLOADS.iter().zip(samples.iter_mut()) {
            let log = in_pod(fio_args(w, "/data/fio.dat", size, Some(plan.seconds))).await?;
            let ours = fio_figure(w, &log).with_context(|| format!("fio {} in the Pod", w.name))?;
            bar.inc(1);
            vs_loop.slipway.push(ours);
            vs_file.slipway.push(ours);
            vs_loop
                .baseline
                .push(fio_here(w, &dev.0, size, Some(plan.seconds))?);
            bar.inc(1);
            vs_file.baseline.push(fio_here(
                w,
                &file.display().to_string(),
                size,
                Some(plan.seconds),
            )?);
            bar.inc(1);
        }
    }
    bar.finish_and_clear();
    drop(dev);
    claims.delete("fio", &DeleteParams::default()).await?;
    let mut records = Vec::new();
    for (w, (vs_loop, vs_file)) in WORKLOADS.iter().zip(&samples) {
        let unit = if w.iops { "IOPS" } else { "MiB/s" };
        for (s, baseline) in [(vs_loop, "loop-device"), (vs_file, "host-file")] {
            records.push(s.record(Metric {
                suite: SUITE,
                name: w.name,
                unit,
                higher_is_better: true,
                baseline,
            })?);
        }
    }
    Ok(records)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fio_figures_come_from_its_json() {
        let json = r#"note: both iodepth >= 1 and synchronous I/O engine are selected
{"jobs": [{"error": 0, "read": {"iops": 1234.5, "bw": 4938}, "write": {"iops": 0.0, "bw": 0}}]}"#;
        assert_eq!(fio_figure(&WORKLOADS[0], json).ok(), Some(1234.5));
        // MiB/s from KiB/s.
        let seq = WORKLOADS[2];
        assert_eq!(fio_figure(&seq, json).ok(), Some(4938.0 / 1024.0));
        // A write workload with no writes, or an error, is no figure.
        assert!(fio_figure(&WORKLOADS[1], json).is_err());
        assert!(
            fio_figure(
                &WORKLOADS[0],
                r#"{"jobs": [{"error": 5, "read": {"iops": 9}}]}"#
            )
            .is_err()
        );
        assert!(fio_figure(&WORKLOADS[0], "no json").is_err());
    }
}
