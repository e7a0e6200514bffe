//! `slipway supervisor` command-line arguments and entry point.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;

use crate::admission::AdmissionConfig;
use crate::server::{Server, ServerConfig, StoreConfig};

/// Arguments of `slipway supervisor`.
#[derive(Debug, Clone, clap::Args)]
pub struct SupervisorArgs {
    /// Data directory: PKI, admin.kubeconfig, the redb store and the audit log.
    #[arg(long, value_name = "DIR")]
    pub data_dir: PathBuf,
    /// Address to serve HTTPS on (port 0 picks a free port).
    #[arg(long, value_name = "ADDR:PORT", default_value = "127.0.0.1:6443")]
    pub listen: SocketAddr,
    /// Store backend: `redb` (embedded, DIR/store.redb) or `etcd://host:port,host:port,...`.
    #[arg(long, value_name = "redb|etcd://h1,h2,...", default_value = "redb", value_parser = parse_store)]
    pub store: StoreConfig,
    /// Bearer token file, one `token,user,uid,"group1,group2"` per line.
    #[arg(long, value_name = "FILE")]
    pub token_file: Option<PathBuf>,
    /// Audit log (JSON lines); defaults to DIR/audit.log.
    #[arg(long, value_name = "FILE")]
    pub audit_log: Option<PathBuf>,
    /// Events the redb store keeps for watches to resume from; older resourceVersions get 410.
    #[arg(long, default_value_t = crate::store::redb::DEFAULT_HISTORY)]
    pub watch_history: u64,
    /// Smallest pod CIDR a Cluster may ask for, as a prefix length.
    #[arg(long, default_value_t = 24)]
    pub min_pod_cidr_prefix: u8,
    /// Smallest service CIDR a Cluster may ask for, as a prefix length.
    #[arg(long, default_value_t = 16)]
    pub min_service_cidr_prefix: u8,
    /// Smallest ingress/egress CIDR a Cluster may ask for, as a prefix length.
    #[arg(long, default_value_t = 27)]
    pub min_edge_cidr_prefix: u8,
}

/// Parses `--store`.
pub fn parse_store(s: &str) -> Result<StoreConfig, String> {
    if s == "redb" {
        return Ok(StoreConfig::Redb);
    }
    let hosts = s
        .strip_prefix("etcd://")
        .ok_or_else(|| format!("store must be redb or etcd://h1,h2,...; got {s:?}"))?;
    let endpoints: Vec<String> = hosts
        .split(',')
        .map(str::trim)
        .filter(|h| !h.is_empty())
        .map(|h| {
            if h.contains("://") {
                h.to_string()
            } else {
                format!("http://{h}")
            }
        })
        .collect();
    if endpoints.is_empty() {
        return Err("etcd:// needs at least one host:port".into());
    }
    Ok(StoreConfig::Etcd(endpoints))
}

impl SupervisorArgs {
    fn config(&self) -> ServerConfig {
        ServerConfig {
            data_dir: self.data_dir.clone(),
            listen: self.listen,
            store: self.store.clone(),
            token_file: self.token_file.clone(),
            audit_log: Some(
                self.audit_log
                    .clone()
                    .unwrap_or_else(|| self.data_dir.join("audit.log")),
            ),
            watch_history: self.watch_history,
            admission: AdmissionConfig {
                pod_prefix_max: self.min_pod_cidr_prefix,
                service_prefix_max: self.min_service_cidr_prefix,
                edge_prefix_max: self.min_edge_cidr_prefix,
            },
        }
    }

    /// Serves until SIGINT/SIGTERM, inside the caller's tokio runtime. Prints
    /// `slipway supervisor listening on https://ADDR` on stdout once the port is bound.
    pub async fn run_async(self) -> anyhow::Result<()> {
        let server = Server::bind(self.config())
            .await
            .context("starting the supervisor API")?;
        println!(
            "slipway supervisor listening on https://{}",
            server.local_addr()
        );
        let shutdown = async {
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending().await } } => {}
            }
        };
        server.serve(shutdown).await;
        Ok(())
    }

    /// Builds a multi-threaded tokio runtime and serves (for a synchronous `main`).
    pub fn run(self) -> anyhow::Result<()> {
        tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .context("tokio runtime")?
            .block_on(self.run_async())
    }
}
