//! The external-attacher's job for `csi.slipway.dev`: a VolumeAttachment of the driver becomes
//! a ControllerPublishVolume for its node over the driver's socket, and its status
//! `attached: true` with the publish context as `attachmentMetadata` (what the node's agent
//! hands NodeStage, as kubelet does); a deleted VolumeAttachment is unpublished before its
//! finalizer goes. Level-triggered: every VolumeAttachment event and every [`PERIOD`].

use std::collections::HashMap;

use k8s_openapi::api::core::v1::PersistentVolume;
use k8s_openapi::api::storage::v1::VolumeAttachment;
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::runtime::{WatchStreamExt as _, watcher};
use serde_json::json;
use slipway_api::volumes::DRIVER;
use slipway_csi::proto::{ControllerPublishVolumeRequest, ControllerUnpublishVolumeRequest};
use tracing::{info, warn};

use crate::pvcsi::{Csi, PERIOD, capability, status_text};
use crate::wake::Wakeups;

/// The finalizer on the VolumeAttachments the attacher serves (upstream's name for it).
pub const FINALIZER: &str = "external-attacher/csi-slipway-dev";

/// Runs until the task is dropped.
pub async fn run(client: kube::Client, csi: Csi) {
    let api: Api<VolumeAttachment> = Api::all(client.clone());
    let mut wake = Wakeups::new(
        watcher(api, watcher::Config::default()).default_backoff(),
        PERIOD,
    );
    loop {
        wake.next().await;
        if let Err(e) = pass(&client, csi.clone()).await {
            warn!(error = %format!("{e:#}"), "attacher pass failed; retrying");
        }
    }
}

/// One pass over every VolumeAttachment of the driver.
pub async fn pass(client: &kube::Client, mut csi: Csi) -> anyhow::Result<()> {
    let api: Api<VolumeAttachment> = Api::all(client.clone());
    let pvs: Api<PersistentVolume> = Api::all(client.clone());
    for va in api.list(&ListParams::default()).await?.items {
        if va.spec.attacher != DRIVER {
            continue;
        }
        let name = va.metadata.name.clone().unwrap_or_default();
        let finalizers = va.metadata.finalizers.clone().unwrap_or_default();
        let ours = finalizers.iter().any(|f| f == FINALIZER);
        let pv = match va.spec.source.persistent_volume_name.as_deref() {
            Some(p) => pvs.get_opt(p).await?,
            None => None,
        };
        let csi_src = pv.as_ref().and_then(|p| p.spec.as_ref()?.csi.clone());
        if va.metadata.deletion_timestamp.is_some() {
            if !ours {
                continue;
            }
            if let Some(src) = &csi_src {
                csi.controller_unpublish_volume(ControllerUnpublishVolumeRequest {
                    volume_id: src.volume_handle.clone(),
                    node_id: va.spec.node_name.clone(),
                    secrets: HashMap::new(),
                })
                .await
                .map_err(|s| anyhow::anyhow!("ControllerUnpublishVolume: {}", status_text(&s)))?;
            }
            let rest: Vec<&String> = finalizers.iter().filter(|f| *f != FINALIZER).collect();
            api.patch(
                &name,
                &PatchParams::default(),
                &Patch::Merge(json!({"metadata": {"finalizers": rest}})),
            )
            .await?;
            info!(attachment = %name, node = %va.spec.node_name, "detached");
            continue;
        }
        if va.status.as_ref().is_some_and(|s| s.attached) {
            continue;
        }
        if !ours {
            let mut f = finalizers.clone();
            f.push(FINALIZER.to_owned());
            api.patch(
                &name,
                &PatchParams::default(),
                &Patch::Merge(json!({"metadata": {"finalizers": f}})),
            )
            .await?;
        }
        let (Some(src), Some(pv)) = (csi_src, pv) else {
            set_error(
                &api,
                &name,
                "spec.source.persistentVolumeName: no CSI PV of that name",
            )
            .await?;
            continue;
        };
        let spec = pv.spec.clone().unwrap_or_default();
        let result = csi
            .controller_publish_volume(ControllerPublishVolumeRequest {
                volume_id: src.volume_handle.clone(),
                node_id: va.spec.node_name.clone(),
                volume_capability: Some(capability(
                    spec.volume_mode.as_deref(),
                    &spec.access_modes.clone().unwrap_or_default(),
                    src.fs_type.as_deref().unwrap_or("ext4"),
                )),
                readonly: src.read_only.unwrap_or(false),
                secrets: HashMap::new(),
                volume_context: src
                    .volume_attributes
                    .clone()
                    .unwrap_or_default()
                    .into_iter()
                    .collect(),
            })
            .await;
        match result {
            Ok(resp) => {
                let ctx = resp.into_inner().publish_context;
                api.patch_status(
                    &name,
                    &PatchParams::default(),
                    &Patch::Merge(json!({"status": {
                        "attached": true,
                        "attachmentMetadata": ctx,
                        "attachError": null,
                    }})),
                )
                .await?;
                info!(attachment = %name, node = %va.spec.node_name, volume = %src.volume_handle, "attached");
            }
            Err(s) => {
                warn!(attachment = %name, error = %status_text(&s), "ControllerPublishVolume failed");
                set_error(&api, &name, &status_text(&s)).await?;
            }
        }
    }
    Ok(())
}

async fn set_error(api: &Api<VolumeAttachment>, name: &str, message: &str) -> anyhow::Result<()> {
    let now = k8s_openapi::jiff::Timestamp::now();
    api.patch_status(
        name,
        &PatchParams::default(),
        &Patch::Merge(json!({"status": {
            "attached": false,
            "attachError": {"message": message, "time": format!("{now:.0}")},
        }})),
    )
    .await?;
    Ok(())
}
