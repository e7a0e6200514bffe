//! Command-line types the `slipway` binary embeds: `slipway csi controller|node|attach`.

use std::path::PathBuf;

use anyhow::Context;

use crate::backend::BlockstoreBackend;
use crate::controller::{ControllerConfig, ControllerService};
use crate::identity::IdentityService;
use crate::nbd::TlsFiles;
use crate::node::{NodeConfig, NodeService};
use crate::proto::controller_server::ControllerServer;
use crate::proto::identity_server::IdentityServer;
use crate::proto::node_server::NodeServer;
use crate::server;

/// `slipway csi ...`.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum CsiCommand {
    /// Run the Controller plugin (Identity + Controller) against a block store daemon.
    Controller(ControllerArgs),
    /// Run the Node plugin (Identity + Node): attach, mount, publish on this node.
    Node(NodeArgs),
    /// One volume's attachment (started by the node plugin; outlives it).
    #[command(hide = true)]
    Attach(crate::attach::AttachArgs),
}

/// Flags of the Node plugin.
#[derive(Debug, Clone, clap::Args)]
pub struct NodeArgs {
    /// CSI endpoint, unix:///path.
    #[arg(long, default_value = "unix:///run/slipway/csi-node.sock")]
    pub endpoint: String,
    /// This node's ID.
    #[arg(long)]
    pub node_id: String,
    /// This node's zone (topology key topology.slipway.dev/zone).
    #[arg(long, default_value = "default")]
    pub zone: String,
    /// Where attachments keep their state.
    #[arg(long, default_value = "/var/lib/slipway/csi-node")]
    pub state_dir: PathBuf,
    /// TLS towards block stores over TCP (`NBD_OPT_STARTTLS`): the CA of their certificates.
    #[arg(long, requires_all = ["nbd_tls_cert", "nbd_tls_key"])]
    pub nbd_tls_ca: Option<PathBuf>,
    /// This node's client certificate; its DNS name is what export allow-lists hold.
    #[arg(long, requires_all = ["nbd_tls_ca", "nbd_tls_key"])]
    pub nbd_tls_cert: Option<PathBuf>,
    /// This node's client key.
    #[arg(long, requires_all = ["nbd_tls_ca", "nbd_tls_cert"])]
    pub nbd_tls_key: Option<PathBuf>,
}

impl NodeArgs {
    /// Serves until SIGTERM or ctrl-c; attachments keep running after it exits.
    pub async fn run(self, attach_command: Vec<std::ffi::OsString>) -> anyhow::Result<()> {
        let path = server::socket_path(&self.endpoint)?;
        if self.node_id.is_empty() {
            anyhow::bail!("node_id: must not be empty");
        }
        let listener = server::bind(&path)?;
        let node = std::sync::Arc::new(NodeService::new(NodeConfig {
            node_id: self.node_id.clone(),
            zone: self.zone.clone(),
            state_dir: self.state_dir.clone(),
            attach_command,
            tls: match (self.nbd_tls_ca, self.nbd_tls_cert, self.nbd_tls_key) {
                (Some(ca), Some(cert), Some(key)) => Some(TlsFiles { ca, cert, key }),
                _ => None,
            },
        }));
        let router = server::builder()
            .add_service(IdentityServer::new(IdentityService { controller: false }))
            .add_service(NodeServer::new(node));
        println!("slipway-csi node ready endpoint={}", path.display());
        tracing::info!(endpoint = %path.display(), node = %self.node_id, "CSI node serving");
        server::serve(router, listener, &path, shutdown_signal())
            .await
            .context("CSI node server")
    }
}

/// Flags of the Controller plugin.
#[derive(Debug, Clone, clap::Args)]
pub struct ControllerArgs {
    /// CSI endpoint, unix:///path.
    #[arg(long, default_value = "unix:///run/slipway/csi-controller.sock")]
    pub endpoint: String,
    /// Control socket of the block store daemon.
    #[arg(long, default_value = slipway_blockstore::cli::DEFAULT_CONTROL)]
    pub control: PathBuf,
    /// Where nodes reach the block store's NBD exports: unix:/path or tcp:HOST:PORT.
    #[arg(long)]
    pub nbd: String,
    /// Zone of the block store (topology key topology.slipway.dev/zone).
    #[arg(long, default_value = "default")]
    pub zone: String,
    /// Pool size in bytes; volume sizes may add up to this much (enables GetCapacity).
    #[arg(long)]
    pub capacity: Option<u64>,
}

impl ControllerArgs {
    /// Checks every flag and reports all problems at once.
    pub fn validate(&self) -> Result<(), crate::error::CsiError> {
        let mut bad = Vec::new();
        if let Err(e) = server::socket_path(&self.endpoint) {
            bad.push(e.to_string());
        }
        if let Err(e) = crate::nbd::Address::parse(&self.nbd) {
            bad.push(e.to_string());
        }
        if self.zone.is_empty() {
            bad.push("zone: must not be empty".into());
        }
        if bad.is_empty() {
            Ok(())
        } else {
            Err(crate::error::CsiError::invalid("flags", bad.join("; ")))
        }
    }

    /// Serves until SIGTERM or ctrl-c.
    pub async fn run(self) -> anyhow::Result<()> {
        self.validate()?;
        let path = server::socket_path(&self.endpoint)?;
        let listener = server::bind(&path)?;
        let controller = ControllerService::new(
            BlockstoreBackend::new(self.control.clone()),
            ControllerConfig {
                nbd_address: self.nbd.clone(),
                zone: self.zone.clone(),
                capacity: self.capacity,
            },
        );
        let router = server::builder()
            .add_service(IdentityServer::new(IdentityService { controller: true }))
            .add_service(ControllerServer::new(controller));
        println!("slipway-csi controller ready endpoint={}", path.display());
        tracing::info!(endpoint = %path.display(), control = %self.control.display(), "CSI controller serving");
        server::serve(router, listener, &path, shutdown_signal())
            .await
            .context("CSI controller server")
    }
}

impl CsiCommand {
    /// Runs the subcommand on a fresh tokio runtime. `attach_prefix` is the argument list that
    /// leads from this binary to `attach` (`["csi"]` for `slipway`).
    pub fn run(self, attach_prefix: &[&str]) -> anyhow::Result<()> {
        if let Self::Attach(args) = &self {
            return crate::attach::run(args).inspect_err(|e| {
                let code = match e.downcast_ref() {
                    Some(crate::nbd::NbdError::UnknownExport(_)) => {
                        crate::attach::EXIT_UNKNOWN_EXPORT
                    }
                    Some(crate::nbd::NbdError::Refused { .. }) => crate::attach::EXIT_REFUSED,
                    _ => return,
                };
                eprintln!("Error: {e:#}");
                std::process::exit(code);
            });
        }
        let exe = std::env::current_exe().context("find this binary")?;
        let mut attach_command = vec![exe.into_os_string()];
        attach_command.extend(attach_prefix.iter().map(std::ffi::OsString::from));
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .context("tokio runtime")?;
        match self {
            Self::Controller(args) => rt.block_on(args.run()),
            Self::Node(args) => rt.block_on(args.run(attach_command)),
            Self::Attach(_) => Ok(()),
        }
    }
}

/// Resolves on SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let Ok(mut term) = signal(SignalKind::terminate()) else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
