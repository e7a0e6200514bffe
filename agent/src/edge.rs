//! An edge host (a Host of pool `edge`): besides its heartbeat it runs the L4 load balancer
//! (`slipway lb serve`, a process of its own, restarted with back-off when it exits) fed from
//! the supervisor's API with the host's own identity: every LoadBalancer Service the
//! supervisor gave a VIP, backed by its EndpointSlice (the cluster's nodes at their node ports),
//! each VIP announced by the one edge host holding its Lease.

use anyhow::Context as _;
use serde_json::Value;
use std::path::{Path, PathBuf};
use tracing::info;

/// Where the join keeps an edge host's settings, under its data dir.
pub fn settings_path(data_dir: &Path) -> PathBuf {
    data_dir.join("edge.json")
}

/// Keeps the HostJoin answer's `edge` settings (if any) for [`serve`].
pub fn keep_settings(data_dir: &Path, answer: &Value) -> anyhow::Result<()> {
    if let Some(edge) = answer.pointer("/status/edge").filter(|v| !v.is_null()) {
        crate::run::write_atomically(&settings_path(data_dir), edge.to_string().as_bytes())
            .context("writing the edge host's settings")?;
        info!("an edge host: it runs the load balancer");
    }
    Ok(())
}

/// The LB daemon's configuration on an edge host: the host's underlay device, every VIP the
/// supervisor hands out (it allocated them from the clusters' ingress pools; the edge serves
/// what the statuses say), state and socket in the data dir, maps pinned under `bpffs` when
/// the host has a bpffs dir of its own.
fn config(data_dir: &Path, bpffs: Option<&str>) -> String {
    let lb = data_dir.join("lb");
    let mut text = format!(
        "interface: eth0\n\
         pools:\n  - {{ name: supervisor, cidr: 0.0.0.0/0 }}\n\
         stateDir: {}\n\
         socket: {}\n\
         maps: {{ services: 1024, backends: 16384, flows: 131072 }}\n\
         garpIntervalMs: 100\n",
        lb.join("state").display(),
        lb.join("lb.sock").display(),
    );
    if let Some(dir) = bpffs {
        text.push_str(&format!("pinDir: {dir}/lb\n"));
    }
    text
}

/// Runs `slipway lb serve` for the edge host until the task is dropped. `agent_flags` are the
/// host's node agent flags (their `--bpffs=` names its bpffs dir); `kubeconfig` the host's.
pub async fn serve(
    data_dir: PathBuf,
    agent_flags: Vec<String>,
    kubeconfig: PathBuf,
    host: String,
) -> anyhow::Result<()> {
    let settings: Value = serde_json::from_slice(
        &std::fs::read(settings_path(&data_dir)).context("the edge host's settings")?,
    )
    .context("the edge host's settings")?;
    let lease_namespace = settings["leaseNamespace"]
        .as_str()
        .unwrap_or(slipway_api::slipway::VIP_LEASE_NAMESPACE)
        .to_owned();
    let bpffs = agent_flags
        .iter()
        .find_map(|f| f.strip_prefix("--bpffs="))
        .map(str::to_owned);
    let path = data_dir.join("lb.yaml");
    crate::run::write_atomically(&path, config(&data_dir, bpffs.as_deref()).as_bytes())
        .context("writing the LB's configuration")?;
    let exe = std::env::current_exe().context("the slipway binary")?;
    crate::supervise::supervise("the edge load balancer", &data_dir.join("lb.log"), || {
        let mut command = tokio::process::Command::new(&exe);
        command
            .args(["lb", "serve", "--config"])
            .arg(&path)
            .arg("--kubeconfig")
            .arg(&kubeconfig)
            .args([
                "--service-labels",
                "slipway.dev/cluster",
                "--vip-lease-namespace",
                &lease_namespace,
                "--holder",
                &host,
            ]);
        Ok(command)
    })
    .await
}
