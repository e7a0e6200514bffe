//! The paravirtual CSI in a workload cluster: the pvCSI controller (`slipway_csi::paravirtual`,
//! forwarding to the cluster's supervisor namespace) served on a Unix socket, and the two loops
//! that drive it over that socket as Kubernetes' external-provisioner, external-attacher and
//! snapshotter would ([`crate::provisioner`], [`crate::attacher`], [`crate::snapshotter`]).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use slipway_csi::paravirtual::{ParavirtualController, SupervisorNamespace};
use slipway_csi::proto::controller_client::ControllerClient;
use slipway_csi::proto::controller_server::ControllerServer;
use slipway_csi::proto::identity_server::IdentityServer;
use slipway_csi::proto::volume_capability::{AccessMode, AccessType, BlockVolume, MountVolume};
use slipway_csi::proto::{VolumeCapability, volume_capability::access_mode::Mode};
use tonic::transport::Channel;

use crate::{Options, SupervisorLink};

/// How often the provisioner and attacher look when nothing changes.
pub const PERIOD: Duration = Duration::from_secs(2);

/// A CSI Controller client on the driver's socket.
pub type Csi = ControllerClient<Channel>;

/// The socket the pvCSI controller serves on: the option's, or one per process under the
/// temporary directory.
pub fn socket(options: &Options) -> PathBuf {
    options.pvcsi_socket.clone().unwrap_or_else(|| {
        std::env::temp_dir().join(format!("slipway-pvcsi-{}.sock", std::process::id()))
    })
}

/// Serves the pvCSI controller on `path` until the task is dropped.
pub async fn serve(link: &SupervisorLink, path: &Path) -> anyhow::Result<()> {
    let listener = slipway_csi::server::bind(path)?;
    let controller = ParavirtualController::new(SupervisorNamespace {
        client: link.client.clone(),
        namespace: link.namespace.clone(),
        cluster: link.cluster.clone(),
    });
    let router = slipway_csi::server::builder()
        .add_service(IdentityServer::new(
            slipway_csi::identity::IdentityService { controller: true },
        ))
        .add_service(ControllerServer::new(controller));
    tracing::info!(socket = %path.display(), namespace = %link.namespace, "pvCSI controller serving");
    slipway_csi::server::serve(router, listener, path, std::future::pending())
        .await
        .map_err(Into::into)
}

/// Connects to the driver's socket, waiting for it to appear.
pub async fn connect(path: &Path) -> Csi {
    loop {
        match slipway_csi::server::connect(path).await {
            Ok(ch) => return ControllerClient::new(ch),
            Err(e) => {
                tracing::debug!(error = %e, socket = %path.display(), "CSI socket not ready");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Runs the pvCSI controller and the loops that drive it.
pub async fn run(client: kube::Client, options: Arc<Options>, link: SupervisorLink) {
    let path = socket(&options);
    let server = async {
        if let Err(e) = serve(&link, &path).await {
            tracing::error!(error = %format!("{e:#}"), "pvCSI controller stopped");
        }
    };
    let loops = async {
        let csi = connect(&path).await;
        tokio::join!(
            crate::provisioner::run(client.clone(), csi.clone()),
            crate::attacher::run(client.clone(), csi.clone()),
            crate::snapshotter::run(client.clone(), csi),
        );
    };
    tokio::join!(server, loops);
}

/// The CSI capability of a PV or claim: block or an ext4 mount, single-node writer (or
/// reader for ReadOnlyMany).
pub fn capability(volume_mode: Option<&str>, access_modes: &[String]) -> VolumeCapability {
    let mode = if access_modes.iter().all(|m| m == "ReadOnlyMany") && !access_modes.is_empty() {
        Mode::SingleNodeReaderOnly
    } else {
        Mode::SingleNodeWriter
    };
    VolumeCapability {
        access_mode: Some(AccessMode { mode: mode as i32 }),
        access_type: Some(if volume_mode == Some("Block") {
            AccessType::Block(BlockVolume {})
        } else {
            AccessType::Mount(MountVolume {
                fs_type: "ext4".into(),
                mount_flags: vec![],
            })
        }),
    }
}

/// A gRPC status as one line (`code: message`).
pub fn status_text(s: &tonic::Status) -> String {
    format!("{:?}: {}", s.code(), s.message())
}
