//! PersistentVolumeClaim volumes, as kubelet's CSI volume plugin mounts them: the claim's
//! volume is staged once per node (`NodeStageVolume` at a global mount under the staging root)
//! and published into each pod that uses it (`NodePublishVolume` at the pod's volume
//! directory), through the CSI node plugin's socket. What each call needs is recorded beside
//! its mount (`vol_data.json`) before the call, so teardown finds it again after a restart:
//! unpublish when the pod goes, unstage when no pod on the node uses the volume any more.
//!
//! Node expansion, as kubelet does it: when the claim's volume (its PV's capacity) is larger
//! than what the staged filesystem was last grown to (recorded in the staging `vol_data.json`),
//! `NodeExpandVolume` grows it online at the staging path, which every pod's bind mount shows.
//! A volume staged for the first time is expanded once too (a no-op when its filesystem
//! already fills it), so a volume grown while no node had it staged is grown on its next mount.
//! A failed expansion leaves the pod running on the filesystem as it is; it is logged and tried
//! again after [`EXPAND_RETRY`].
//!
//! The caller resolves each claim to a [`ClaimVolume`] (PVC → bound PV's `spec.csi` → this
//! node's VolumeAttachment's `attachmentMetadata`); the runner watches no API.

use std::collections::{HashMap, HashSet};
use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use slipway_csi::proto::node_client::NodeClient;
use slipway_csi::proto::{
    CapacityRange, NodeExpandVolumeRequest, NodePublishVolumeRequest, NodeStageVolumeRequest,
    NodeUnpublishVolumeRequest, NodeUnstageVolumeRequest, VolumeCapability, volume_capability,
};

/// What a bound claim's volume is, for this node.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClaimVolume {
    /// The CSI driver (the PV's `spec.csi.driver`).
    pub driver: String,
    /// The PV's `spec.csi.volumeHandle`.
    pub volume_id: String,
    /// The filesystem (`spec.csi.fsType`; ext4 when empty).
    pub fs_type: String,
    /// The PV's `spec.mountOptions`.
    pub mount_flags: Vec<String>,
    /// The PV's `spec.csi.volumeAttributes`.
    pub volume_context: HashMap<String, String>,
    /// This node's VolumeAttachment's `status.attachmentMetadata`.
    pub publish_context: HashMap<String, String>,
    /// The PV's `spec.csi.readOnly`.
    pub read_only: bool,
    /// The PV's `spec.volumeMode` is Block: published as a device, not a filesystem.
    pub block: bool,
    /// The PV's `spec.capacity.storage` in bytes (0: unknown, never expanded).
    pub capacity: u64,
}

/// What a stage or publish recorded beside its mount (kubelet's `vol_data.json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct VolData {
    driver: String,
    volume_id: String,
    staging: PathBuf,
    /// Published as a raw block device ([`target`]).
    #[serde(default)]
    block: bool,
    /// In the staging record: the size the staged filesystem was last grown to (0: not yet).
    #[serde(default)]
    capacity: u64,
    /// In the staging record: when (Unix seconds) an expansion last failed; the next waits
    /// [`EXPAND_RETRY`].
    #[serde(default)]
    expand_failed_at: u64,
}

/// Where a claim's volume is published in its pod volume directory `dir`: a directory
/// (`mount`), or for a raw block volume a file the device is bound onto (`dev`).
pub fn target(dir: &Path, block: bool) -> PathBuf {
    dir.join(if block { "dev" } else { "mount" })
}

/// How long a failed node expansion waits before it is tried again (kubelet backs off to about
/// two minutes): each try re-reads the export's size, which replaces its connections.
const EXPAND_RETRY: std::time::Duration = std::time::Duration::from_secs(120);

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

const VOL_DATA: &str = "vol_data.json";

/// The node's CSI plugin, as the runner reaches it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CsiNode {
    /// The node plugin's socket.
    pub socket: PathBuf,
    /// Volumes are staged under `<staging_root>/<driver>/<digest of the volume id>/globalmount`.
    pub staging_root: PathBuf,
}

/// Why a claim's volume could not be staged, published or taken down.
#[derive(Debug, thiserror::Error)]
pub enum ClaimError {
    #[error("the CSI node plugin at {socket} cannot be reached")]
    Connect {
        socket: String,
        #[source]
        source: tonic::transport::Error,
    },
    #[error("{call} of volume {volume:?} failed: {}", .source.message())]
    Call {
        call: &'static str,
        volume: String,
        #[source]
        source: tonic::Status,
    },
    #[error("failed to {what} {}", .path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

fn io_err(what: &'static str, path: &Path) -> impl FnOnce(io::Error) -> ClaimError {
    let path = path.to_owned();
    move |source| ClaimError::Io { what, path, source }
}

fn digest(text: &str) -> String {
    use sha2::{Digest as _, Sha256};
    Sha256::digest(text.as_bytes())
        .iter()
        .take(16)
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn capability(v: &ClaimVolume) -> VolumeCapability {
    VolumeCapability {
        access_mode: Some(volume_capability::AccessMode {
            mode: volume_capability::access_mode::Mode::SingleNodeWriter as i32,
        }),
        access_type: Some(if v.block {
            volume_capability::AccessType::Block(volume_capability::BlockVolume {})
        } else {
            volume_capability::AccessType::Mount(volume_capability::MountVolume {
                fs_type: if v.fs_type.is_empty() {
                    "ext4".into()
                } else {
                    v.fs_type.clone()
                },
                mount_flags: v.mount_flags.clone(),
            })
        }),
    }
}

fn write_vol_data(dir: &Path, data: &VolData) -> Result<(), ClaimError> {
    std::fs::create_dir_all(dir).map_err(io_err("create", dir))?;
    let path = dir.join(VOL_DATA);
    let text = serde_json::to_vec(data).map_err(|e| io_err("encode", &path)(e.into()))?;
    crate::run::write_atomically(&path, &text).map_err(io_err("write", &path))
}

fn read_vol_data(dir: &Path) -> Option<VolData> {
    serde_json::from_slice(&std::fs::read(dir.join(VOL_DATA)).ok()?).ok()
}

impl CsiNode {
    async fn client(&self) -> Result<NodeClient<tonic::transport::Channel>, ClaimError> {
        slipway_csi::server::connect(&self.socket)
            .await
            .map(NodeClient::new)
            .map_err(|source| ClaimError::Connect {
                socket: self.socket.display().to_string(),
                source,
            })
    }

    fn staging_dir(&self, v: &ClaimVolume) -> PathBuf {
        self.staging_root.join(&v.driver).join(digest(&v.volume_id))
    }

    /// Stages `v` on the node (once) and publishes it at its [`target`] in `dir`; returns that
    /// path. Nothing is staged or published when it is already mounted there; a staged
    /// filesystem is grown when the PV is larger than it (see the module's doc).
    pub async fn publish(
        &self,
        dir: &Path,
        v: &ClaimVolume,
        read_only: bool,
    ) -> Result<PathBuf, ClaimError> {
        let target = target(dir, v.block);
        let published = slipway_dataplane::mounts::is_mount_point(&target)
            .map_err(io_err("read the mount table for", &target))?;
        if !published {
            self.stage_and_publish(dir, &target, v, read_only).await?;
        }
        // A filesystem that cannot be grown now is still usable at its size: the pod runs,
        // and the next sync tries again.
        if let Err(e) = self.expand(v).await {
            tracing::warn!(volume = %v.volume_id, error = %crate::pods::error_chain(&e), "node expansion failed; retrying at the next sync");
        }
        Ok(target)
    }

    /// Grows the staged filesystem of `v` when the volume is larger than what it was last
    /// grown to (NodeExpandVolume at the staging path), and records the new size.
    async fn expand(&self, v: &ClaimVolume) -> Result<(), ClaimError> {
        let staging_dir = self.staging_dir(v);
        let Some(mut data) = read_vol_data(&staging_dir) else {
            return Ok(());
        };
        // A raw block volume has no staging mount to expand at; its device shows the new size
        // when it is next staged.
        if v.block
            || v.capacity <= data.capacity
            || unix_now() < data.expand_failed_at + EXPAND_RETRY.as_secs()
        {
            return Ok(());
        }
        let result = self.node_expand(v, &data.staging).await;
        match result {
            Ok(grown) => {
                tracing::info!(volume = %v.volume_id, from = data.capacity, to = grown, "filesystem expanded");
                data.capacity = grown.max(v.capacity);
                data.expand_failed_at = 0;
                write_vol_data(&staging_dir, &data)
            }
            Err(e) => {
                data.expand_failed_at = unix_now();
                write_vol_data(&staging_dir, &data)?;
                Err(e)
            }
        }
    }

    /// NodeExpandVolume of `v` staged at `staging`; the size it reports.
    async fn node_expand(&self, v: &ClaimVolume, staging: &Path) -> Result<u64, ClaimError> {
        let resp = self
            .client()
            .await?
            .node_expand_volume(NodeExpandVolumeRequest {
                volume_id: v.volume_id.clone(),
                volume_path: staging.display().to_string(),
                capacity_range: Some(CapacityRange {
                    required_bytes: i64::try_from(v.capacity).unwrap_or(i64::MAX),
                    limit_bytes: 0,
                }),
                staging_target_path: staging.display().to_string(),
                volume_capability: Some(capability(v)),
            })
            .await
            .map_err(|source| ClaimError::Call {
                call: "NodeExpandVolume",
                volume: v.volume_id.clone(),
                source,
            })?
            .into_inner();
        Ok(u64::try_from(resp.capacity_bytes).unwrap_or(0))
    }

    async fn stage_and_publish(
        &self,
        dir: &Path,
        target: &Path,
        v: &ClaimVolume,
        read_only: bool,
    ) -> Result<(), ClaimError> {
        let staging_dir = self.staging_dir(v);
        let staging = staging_dir.join("globalmount");
        // A volume already staged keeps the size its filesystem was grown to.
        let had = read_vol_data(&staging_dir);
        let data = VolData {
            driver: v.driver.clone(),
            volume_id: v.volume_id.clone(),
            staging: staging.clone(),
            block: v.block,
            capacity: had.as_ref().map_or(0, |d| d.capacity),
            expand_failed_at: had.as_ref().map_or(0, |d| d.expand_failed_at),
        };
        write_vol_data(&staging_dir, &data)?;
        let call = |call, source| ClaimError::Call {
            call,
            volume: v.volume_id.clone(),
            source,
        };
        let mut client = self.client().await?;
        client
            .node_stage_volume(NodeStageVolumeRequest {
                volume_id: v.volume_id.clone(),
                publish_context: v.publish_context.clone(),
                staging_target_path: staging.display().to_string(),
                volume_capability: Some(capability(v)),
                volume_context: v.volume_context.clone(),
                ..Default::default()
            })
            .await
            .map_err(|s| call("NodeStageVolume", s))?;
        write_vol_data(dir, &data)?;
        client
            .node_publish_volume(NodePublishVolumeRequest {
                volume_id: v.volume_id.clone(),
                publish_context: v.publish_context.clone(),
                staging_target_path: staging.display().to_string(),
                target_path: target.display().to_string(),
                volume_capability: Some(capability(v)),
                readonly: read_only || v.read_only,
                volume_context: v.volume_context.clone(),
                ..Default::default()
            })
            .await
            .map_err(|s| call("NodePublishVolume", s))?;
        tracing::info!(volume = %v.volume_id, target = %target.display(), "volume published");
        Ok(())
    }

    /// Unpublishes the volume published in `dir`, if one was (its `vol_data.json`).
    pub async fn unpublish(&self, dir: &Path) -> Result<(), ClaimError> {
        let Some(data) = read_vol_data(dir) else {
            return Ok(());
        };
        let target = target(dir, data.block);
        self.client()
            .await?
            .node_unpublish_volume(NodeUnpublishVolumeRequest {
                volume_id: data.volume_id.clone(),
                target_path: target.display().to_string(),
            })
            .await
            .map_err(|source| ClaimError::Call {
                call: "NodeUnpublishVolume",
                volume: data.volume_id.clone(),
                source,
            })?;
        let _ = std::fs::remove_file(dir.join(VOL_DATA));
        tracing::info!(volume = %data.volume_id, target = %target.display(), "volume unpublished");
        Ok(())
    }

    /// Unstages every staged volume whose id is not in `in_use`.
    pub async fn unstage_unused(&self, in_use: &HashSet<String>) -> Result<(), ClaimError> {
        for driver in std::fs::read_dir(&self.staging_root)
            .into_iter()
            .flatten()
            .flatten()
        {
            for staged in std::fs::read_dir(driver.path())
                .into_iter()
                .flatten()
                .flatten()
            {
                let dir = staged.path();
                let Some(data) = read_vol_data(&dir) else {
                    // A stage that never recorded anything made nothing.
                    let _ = std::fs::remove_dir_all(&dir);
                    continue;
                };
                if in_use.contains(&data.volume_id) {
                    continue;
                }
                self.client()
                    .await?
                    .node_unstage_volume(NodeUnstageVolumeRequest {
                        volume_id: data.volume_id.clone(),
                        staging_target_path: data.staging.display().to_string(),
                    })
                    .await
                    .map_err(|source| ClaimError::Call {
                        call: "NodeUnstageVolume",
                        volume: data.volume_id.clone(),
                        source,
                    })?;
                std::fs::remove_dir_all(&dir).map_err(io_err("remove", &dir))?;
                tracing::info!(volume = %data.volume_id, "volume unstaged");
            }
            // The driver's directory goes with its last volume.
            let _ = std::fs::remove_dir(driver.path());
        }
        Ok(())
    }
}

/// The volume ids published under `pod_dirs` (each pod's `volumes/kubernetes.io~csi/*`).
pub fn published_ids<'a>(pod_dirs: impl IntoIterator<Item = &'a Path>) -> HashSet<String> {
    pod_dirs
        .into_iter()
        .flat_map(|pod| {
            std::fs::read_dir(pod.join("volumes").join(PLUGIN))
                .into_iter()
                .flatten()
                .flatten()
        })
        .filter_map(|v| read_vol_data(&v.path()).map(|d| d.volume_id))
        .collect()
}

/// kubelet's plugin directory name for CSI volumes.
pub const PLUGIN: &str = "kubernetes.io~csi";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vol_data_is_found_again_under_each_pod() {
        let root = std::env::temp_dir().join(format!("slipway-claims-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let data = |id: &str| VolData {
            driver: "csi.slipway.dev".into(),
            volume_id: id.into(),
            staging: root.join("staging"),
            block: id == "v2",
            capacity: 0,
            expand_failed_at: 0,
        };
        for (pod, vol, id) in [("p1", "a", "v1"), ("p1", "b", "v2"), ("p2", "a", "v1")] {
            write_vol_data(
                &root.join(pod).join("volumes").join(PLUGIN).join(vol),
                &data(id),
            )
            .expect("write");
        }
        let p1 = root.join("p1");
        let p2 = root.join("p2");
        assert_eq!(
            published_ids([p1.as_path(), p2.as_path()]),
            HashSet::from(["v1".to_owned(), "v2".to_owned()])
        );
        assert_eq!(
            published_ids([p2.as_path()]),
            HashSet::from(["v1".to_owned()])
        );
        assert_eq!(
            read_vol_data(&p1.join("volumes").join(PLUGIN).join("b")),
            Some(data("v2"))
        );
        std::fs::remove_dir_all(&root).expect("cleanup");
    }

    #[test]
    fn the_capability_defaults_to_ext4_single_node_writer() {
        let cap = capability(&ClaimVolume::default());
        let Some(volume_capability::AccessType::Mount(m)) = cap.access_type else {
            panic!("{cap:?}")
        };
        assert_eq!(m.fs_type, "ext4");
        assert_eq!(
            cap.access_mode.map(|a| a.mode),
            Some(volume_capability::access_mode::Mode::SingleNodeWriter as i32)
        );
    }
}
