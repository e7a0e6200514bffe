//! The CSI node plugin (`csi.slipway.dev`), served by the host agent for the pods it runs, as a
//! kubelet's node has its CSI driver's node plugin beside it. The plugin's attachments live in
//! processes of their own (`slipway csi attach`, their own session), so an agent restarted or
//! upgraded never interrupts a volume's I/O: the new plugin finds them in its state dir.

use std::path::PathBuf;

use anyhow::Context as _;

use crate::pods::claims::CsiNode;

/// Where and how the agent serves the CSI node plugin.
#[derive(Debug, Clone, clap::Args)]
pub struct CsiNodeArgs {
    /// Serve the CSI node plugin for this host's pods: its socket at <DIR>/csi.sock,
    /// attachments' state in <DIR>/attachments, staged volumes under <DIR>/staging. Off when
    /// not set (pods with PersistentVolumeClaims then wait).
    #[arg(long = "csi-dir", value_name = "DIR")]
    pub csi_dir: Option<PathBuf>,
    /// TLS towards block stores over TCP: the CA of their certificates.
    #[arg(long = "csi-nbd-tls-ca", requires_all = ["csi_tls_cert", "csi_tls_key"])]
    pub csi_tls_ca: Option<PathBuf>,
    /// This node's client certificate for block stores (its DNS name is what exports allow).
    #[arg(long = "csi-nbd-tls-cert", requires_all = ["csi_tls_ca", "csi_tls_key"])]
    pub csi_tls_cert: Option<PathBuf>,
    /// This node's client key for block stores.
    #[arg(long = "csi-nbd-tls-key", requires_all = ["csi_tls_ca", "csi_tls_cert"])]
    pub csi_tls_key: Option<PathBuf>,
}

impl CsiNodeArgs {
    /// The plugin as the pod runner reaches it, if it is served.
    pub fn runner(&self) -> Option<CsiNode> {
        self.csi_dir.as_ref().map(|dir| CsiNode {
            socket: dir.join("csi.sock"),
            staging_root: dir.join("staging"),
        })
    }

    /// The plugin's server (node `node_id` in `zone`), for the agent to run, if asked.
    pub fn server(
        &self,
        node_id: &str,
        zone: &str,
    ) -> anyhow::Result<Option<impl Future<Output = anyhow::Result<()>> + Send + 'static>> {
        let Some(dir) = &self.csi_dir else {
            return Ok(None);
        };
        std::fs::create_dir_all(dir).with_context(|| format!("--csi-dir {}", dir.display()))?;
        let exe = std::env::current_exe().context("the slipway binary")?;
        let node = slipway_csi::cli::NodeArgs {
            endpoint: format!("unix://{}", dir.join("csi.sock").display()),
            node_id: node_id.to_owned(),
            zone: if zone.is_empty() {
                "default".into()
            } else {
                zone.to_owned()
            },
            state_dir: dir.join("attachments"),
            nbd_tls_ca: self.csi_tls_ca.clone(),
            nbd_tls_cert: self.csi_tls_cert.clone(),
            nbd_tls_key: self.csi_tls_key.clone(),
        };
        tracing::info!(dir = %dir.display(), node = %node_id, "serving the CSI node plugin");
        Ok(Some(node.run(vec![
            exe.into_os_string(),
            "csi".into(),
            "attach".into(),
        ])))
    }
}
