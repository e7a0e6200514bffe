//! The paravirtual CSI in a workload cluster: the pvCSI controller (`slipway_csi::paravirtual`,
//! forwarding to the cluster's supervisor namespace) served on a Unix socket, and the two loops
//! that drive it over that socket as Kubernetes' external-provisioner, external-attacher and
//! snapshotter would ([`crate::provisioner`], [`crate::attacher`], [`crate::snapshotter`]).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use slipway_api::volumes::{FS_TYPES, FSTYPE_PARAMETER};
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
/// The prefix of the parameters that are the provisioner's, not the driver's.
const PROVISIONER_PARAMETERS: &str = "csi.storage.k8s.io/";

/// The filesystem a StorageClass's `parameters` ask for (ext4 when none), or why it is refused.
pub fn fs_type(
    parameters: Option<&std::collections::BTreeMap<String, String>>,
) -> anyhow::Result<String> {
    match parameters.and_then(|p| p.get(FSTYPE_PARAMETER)) {
        None => Ok("ext4".into()),
        Some(fs) if FS_TYPES.contains(&fs.as_str()) => Ok(fs.clone()),
        Some(fs) => anyhow::bail!(
            "parameters[{FSTYPE_PARAMETER:?}]: {fs:?} is not supported (one of {})",
            FS_TYPES.join(", ")
        ),
    }
}

/// A StorageClass's parameters for the driver: without the provisioner's own.
pub fn driver_parameters(
    parameters: Option<&std::collections::BTreeMap<String, String>>,
) -> std::collections::HashMap<String, String> {
    parameters
        .into_iter()
        .flatten()
        .filter(|(k, _)| !k.starts_with(PROVISIONER_PARAMETERS))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// The capability a volume is asked for with: raw block, or a filesystem of `fs_type`.
pub fn capability(
    volume_mode: Option<&str>,
    access_modes: &[String],
    fs_type: &str,
) -> VolumeCapability {
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
                fs_type: fs_type.into(),
                mount_flags: vec![],
            })
        }),
    }
}

/// A gRPC status as one line (`code: message`).
pub fn status_text(s: &tonic::Status) -> String {
    format!("{:?}: {}", s.code(), s.message())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    #[test]
    fn the_filesystem_comes_from_the_class_and_stays_with_the_provisioner() {
        let params = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
            pairs
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect()
        };
        assert_eq!(fs_type(None).ok().as_deref(), Some("ext4"));
        let xfs = params(&[("svStorageClass", "fast"), (FSTYPE_PARAMETER, "xfs")]);
        assert_eq!(fs_type(Some(&xfs)).ok().as_deref(), Some("xfs"));
        let err = fs_type(Some(&params(&[(FSTYPE_PARAMETER, "btrfs")])))
            .expect_err("btrfs refused")
            .to_string();
        assert!(
            err.contains(FSTYPE_PARAMETER) && err.contains("btrfs"),
            "{err}"
        );
        // The driver sees only its own parameters.
        assert_eq!(
            driver_parameters(Some(&xfs)),
            std::collections::HashMap::from([("svStorageClass".to_owned(), "fast".to_owned())])
        );
        let Some(AccessType::Mount(m)) =
            capability(None, &["ReadWriteOnce".into()], "xfs").access_type
        else {
            panic!("a filesystem capability")
        };
        assert_eq!(m.fs_type, "xfs");
    }
}
