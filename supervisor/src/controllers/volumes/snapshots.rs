//! VolumeSnapshots: a snapshot of a claim served by the reconciler is a block store snapshot
//! `<volume>@snap-<snapshot uid>` in the volume's store; its status says ready with the restore
//! size, and annotation `csi.slipway.dev/snapshot-handle` names it (the CSI snapshot ID; one
//! that names another VolumeSnapshot's snapshot is not trusted, see [`own_handle`]). A claim
//! whose `dataSource` is a VolumeSnapshot is a clone of it. A deleted VolumeSnapshot
//! takes its block store snapshot along (finalizer), once no volume is made from it.

use anyhow::Context as _;
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind, Patch, PatchParams};
use serde_json::json;
use slipway_api::volumes::SNAPSHOT_HANDLE_ANNOTATION;
use slipway_blockstore::control::ControlRequest;
use tracing::{info, warn};

use super::{FINALIZER, Served, VolumeReconciler, World, str_at};

/// The served VolumeSnapshot kind.
pub(super) fn snapshot_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("snapshot.storage.k8s.io", "v1", "VolumeSnapshot"),
        "volumesnapshots",
    )
}

/// The block store snapshot of VolumeSnapshot `uid` of `volume`.
pub(super) fn snapshot_handle(volume: &str, uid: &str) -> String {
    format!("{volume}@snap-{uid}")
}

/// The handle annotated on `vs`, if it names the snapshot taken for `vs` itself. The
/// annotation is writable by whoever may edit the VolumeSnapshot (a cluster's link too), so a
/// handle naming another VolumeSnapshot's snapshot — another namespace's — is never trusted:
/// restoring from it would copy another tenant's data, deleting it would delete theirs. The
/// uid in the name is the server's and unique.
pub(super) fn own_handle(vs: &DynamicObject) -> Option<&str> {
    let uid = vs.metadata.uid.as_deref()?;
    vs.metadata
        .annotations
        .as_ref()?
        .get(SNAPSHOT_HANDLE_ANNOTATION)
        .map(String::as_str)
        .filter(|h| {
            h.strip_suffix(uid)
                .is_some_and(|rest| rest.ends_with("@snap-") && rest.len() > "@snap-".len())
        })
}

impl VolumeReconciler {
    /// Takes, reports and deletes the snapshots of the served claims.
    pub(super) async fn snapshot_all(&self, served: &[Served<'_>], world: &World) {
        for vs in &world.snapshots {
            if let Err(e) = self.snapshot_one(vs, served, world).await {
                warn!(snapshot = ?vs.metadata.name, error = %format!("{e:#}"), "snapshot");
                let ns = vs.metadata.namespace.clone().unwrap_or_default();
                let name = vs.metadata.name.clone().unwrap_or_default();
                let api: Api<DynamicObject> =
                    Api::namespaced_with(self.client.clone(), &ns, &snapshot_resource());
                let patch = json!({"status": {"readyToUse": false,
                    "error": {"message": format!("{e:#}")}}});
                let _ = api
                    .patch_status(&name, &PatchParams::default(), &Patch::Merge(patch))
                    .await;
            }
        }
    }

    async fn snapshot_one(
        &self,
        vs: &DynamicObject,
        served: &[Served<'_>],
        world: &World,
    ) -> anyhow::Result<()> {
        let ns = vs.metadata.namespace.clone().unwrap_or_default();
        let name = vs.metadata.name.clone().unwrap_or_default();
        let uid = vs.metadata.uid.clone().unwrap_or_default();
        let api: Api<DynamicObject> =
            Api::namespaced_with(self.client.clone(), &ns, &snapshot_resource());
        let finalizers = vs.metadata.finalizers.clone().unwrap_or_default();
        let ours = finalizers.iter().any(|f| f == FINALIZER);
        let annotated = own_handle(vs).map(str::to_owned);
        if vs.metadata.deletion_timestamp.is_some() {
            if !ours {
                return Ok(());
            }
            if let Some(handle) = &annotated {
                for (zone, vols) in &world.volumes {
                    if vols.contains_key(handle) {
                        self.store_call(
                            zone,
                            ControlRequest::Delete {
                                name: handle.clone(),
                                cascade: false,
                            },
                        )
                        .await
                        .with_context(|| {
                            format!("deleting snapshot {handle} (a volume made from it remains?)")
                        })?;
                        info!(snapshot = %format!("{ns}/{name}"), handle, "snapshot deleted");
                    }
                }
            }
            let rest: Vec<&String> = finalizers.iter().filter(|f| *f != FINALIZER).collect();
            api.patch(
                &name,
                &PatchParams::default(),
                &Patch::Merge(json!({"metadata": {"finalizers": rest}})),
            )
            .await?;
            return Ok(());
        }
        let claim = str_at(&vs.data, "/spec/source/persistentVolumeClaimName");
        let Some(s) = served.iter().find(|s| s.ns == ns && s.name == claim) else {
            anyhow::bail!(
                "spec.source.persistentVolumeClaimName: claim {claim:?} has no volume of csi.slipway.dev (yet)"
            );
        };
        let Some(vols) = world.volumes.get(&s.zone) else {
            return Ok(());
        };
        let Some(volume) = vols.get(&s.volume) else {
            return Ok(()); // not made yet: the next pass
        };
        let handle = annotated.unwrap_or_else(|| snapshot_handle(&s.volume, &uid));
        if !ours || own_handle(vs).is_none() {
            let mut f = finalizers.clone();
            if !ours {
                f.push(FINALIZER.to_owned());
            }
            api.patch(
                &name,
                &PatchParams::default(),
                &Patch::Merge(json!({"metadata": {
                    "finalizers": f,
                    "annotations": {SNAPSHOT_HANDLE_ANNOTATION: handle},
                }})),
            )
            .await?;
        }
        let size = match vols.get(&handle) {
            Some(snap) => snap.size,
            None => {
                let snap = handle
                    .split_once('@')
                    .map(|(_, n)| n.to_owned())
                    .unwrap_or_default();
                self.store_call(
                    &s.zone,
                    ControlRequest::Snapshot {
                        volume: s.volume.clone(),
                        name: snap,
                    },
                )
                .await?;
                info!(snapshot = %format!("{ns}/{name}"), handle, "snapshot taken");
                volume.size
            }
        };
        let ready = vs.data["status"]["readyToUse"] == true
            && vs.data["status"]["restoreSize"] == size.to_string().as_str();
        if !ready {
            api.patch_status(
                &name,
                &PatchParams::default(),
                &Patch::Merge(json!({"status": {
                    "readyToUse": true,
                    "restoreSize": size.to_string(),
                    "creationTime": crate::api::meta::rfc3339(crate::api::meta::now_secs()),
                    "error": null,
                }})),
            )
            .await?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vs(uid: &str, handle: &str) -> DynamicObject {
        serde_json::from_value(json!({
            "apiVersion": "snapshot.storage.k8s.io/v1", "kind": "VolumeSnapshot",
            "metadata": {"name": "s", "namespace": "team", "uid": uid,
                         "annotations": {SNAPSHOT_HANDLE_ANNOTATION: handle}},
        }))
        .expect("a VolumeSnapshot")
    }

    #[test]
    fn only_a_handle_of_the_snapshot_itself_is_trusted() {
        let own = snapshot_handle("pvc-1", "u-1");
        assert_eq!(own_handle(&vs("u-1", &own)), Some(own.as_str()));
        // Another VolumeSnapshot's snapshot (another namespace's, say) is not.
        assert_eq!(
            own_handle(&vs("u-1", &snapshot_handle("pvc-2", "u-2"))),
            None
        );
        assert_eq!(own_handle(&vs("u-1", "u-1")), None);
        assert_eq!(own_handle(&vs("u-1", "@snap-u-1")), None);
        assert_eq!(own_handle(&vs("u-1", "pvc-2@clone.pvc-1")), None);
    }
}
