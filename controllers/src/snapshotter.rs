//! The snapshot controller and csi-snapshotter's job for `csi.slipway.dev`, in one loop: a
//! VolumeSnapshot (`snapshot.storage.k8s.io/v1`) whose source claim is bound to a PV of the
//! driver becomes a CreateSnapshot over the driver's socket, and its status `readyToUse`,
//! `restoreSize` and `creationTime`; a deleted VolumeSnapshot is DeleteSnapshot'd before its
//! finalizer goes, once no claim made from it remains. A snapshot that cannot be taken (source claim missing or not bound, the
//! driver refusing) gets `status.error` {message, time} and a Warning Event naming the reason.
//!
//! Leaner than upstream: no VolumeSnapshotContent objects are made (`boundVolumeSnapshotContentName`
//! stays empty); the CSI snapshot ID is kept in annotation [`SNAPSHOT_HANDLE_ANNOTATION`] on
//! the VolumeSnapshot itself, which is what restores ([`crate::provisioner`]) and deletion read.
//!
//! Level-triggered: every VolumeSnapshot event and every [`PERIOD`] one pass. The CSI snapshot
//! is named `snapshot-<VolumeSnapshot uid>` as upstream names it, and the finalizer is on the
//! VolumeSnapshot before CreateSnapshot is called, so a pass killed at any line finds the
//! snapshot again (CreateSnapshot is idempotent by name) and none is left behind.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim};
use k8s_openapi::jiff::Timestamp;
use kube::api::{
    Api, ApiResource, DynamicObject, GroupVersionKind, ListParams, Patch, PatchParams,
};
use kube::runtime::{WatchStreamExt as _, watcher};
use serde_json::json;
use slipway_api::volumes::{DRIVER, SNAPSHOT_HANDLE_ANNOTATION};
use slipway_csi::proto::{CreateSnapshotRequest, DeleteSnapshotRequest, Snapshot};
use tracing::{debug, info, warn};

use crate::events::{Told, Type};
use crate::pvcsi::{Csi, PERIOD, status_text};
use crate::wake::Wakeups;

/// The finalizer on the VolumeSnapshots whose snapshot this controller took (upstream's name
/// for the one that holds a VolumeSnapshot until its snapshot is deleted).
pub const FINALIZER: &str = "snapshot.storage.kubernetes.io/volumesnapshot-bound-protection";

/// The VolumeSnapshot kind.
pub fn resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("snapshot.storage.k8s.io", "v1", "VolumeSnapshot"),
        "volumesnapshots",
    )
}

/// The CSI snapshot name of VolumeSnapshot `uid`, as upstream's snapshotter names it.
pub fn snapshot_name(uid: &str) -> String {
    format!("snapshot-{uid}")
}

/// The CSI snapshot ID recorded on a VolumeSnapshot.
pub fn handle(vs: &DynamicObject) -> Option<&str> {
    vs.metadata
        .annotations
        .as_ref()?
        .get(SNAPSHOT_HANDLE_ANNOTATION)
        .map(String::as_str)
}

/// Whether a VolumeSnapshot's status says it can be restored from.
pub fn ready(vs: &DynamicObject) -> bool {
    vs.data["status"]["readyToUse"] == true
}

/// Why a VolumeSnapshot is not (yet) what it asks for: an Event reason and a message.
struct Failure {
    reason: &'static str,
    message: String,
}

impl Failure {
    fn new(reason: &'static str, message: impl Into<String>) -> Self {
        Self {
            reason,
            message: message.into(),
        }
    }
}

impl From<kube::Error> for Failure {
    fn from(e: kube::Error) -> Self {
        Self::new("SnapshotUpdateFailed", e.to_string())
    }
}

/// What a pass did with one VolumeSnapshot.
enum Done {
    /// Nothing to do (not the driver's, already ready, or gone).
    Nothing,
    /// The snapshot became ready to use.
    Ready,
}

/// Runs until the task is dropped.
pub async fn run(client: kube::Client, csi: Csi) {
    let api: Api<DynamicObject> = Api::all_with(client.clone(), &resource());
    // Backed off: on an API server that does not serve VolumeSnapshots (a kube-apiserver
    // without the snapshot CRDs) the watch fails at once, and would otherwise spin the loop.
    let events = watcher(api, watcher::Config::default()).default_backoff();
    let mut wake = Wakeups::new(events, PERIOD);
    let mut told = Told::default();
    loop {
        wake.next().await;
        if let Err(e) = pass(&client, csi.clone(), &mut told).await {
            warn!(error = %format!("{e:#}"), "snapshotter pass failed; retrying");
        }
    }
}

/// One pass over every VolumeSnapshot.
pub async fn pass(client: &kube::Client, mut csi: Csi, told: &mut Told) -> anyhow::Result<()> {
    let lp = ListParams::default();
    let ar = resource();
    let snapshots = match Api::<DynamicObject>::all_with(client.clone(), &ar)
        .list(&lp)
        .await
    {
        Ok(list) => list.items,
        // The API server does not serve the kind: no snapshots to take.
        Err(kube::Error::Api(s)) if s.code == 404 => {
            debug!("VolumeSnapshots are not served here");
            return Ok(());
        }
        Err(e) => return Err(e.into()),
    };
    told.retain(
        &snapshots
            .iter()
            .filter_map(|s| s.metadata.uid.as_deref())
            .collect::<BTreeSet<_>>(),
    );
    if snapshots.is_empty() {
        return Ok(());
    }
    let claims = Api::<PersistentVolumeClaim>::all(client.clone())
        .list(&lp)
        .await?
        .items;
    let pvs: BTreeMap<String, PersistentVolume> = Api::<PersistentVolume>::all(client.clone())
        .list(&lp)
        .await?
        .items
        .into_iter()
        .filter_map(|p| Some((p.metadata.name.clone()?, p)))
        .collect();
    for vs in &snapshots {
        let ns = vs.metadata.namespace.clone().unwrap_or_default();
        let name = vs.metadata.name.clone().unwrap_or_default();
        match reconcile(client, &mut csi, vs, &claims, &pvs).await {
            Ok(Done::Nothing) => {}
            Ok(Done::Ready) => {
                told.publish(
                    client,
                    (vs, &ar),
                    Type::Normal,
                    "SnapshotReady",
                    format!("Snapshot {ns}/{name} is ready to use"),
                )
                .await;
            }
            Err(f) => {
                if let Err(e) = set_error(client, vs, &f.message).await {
                    warn!(snapshot = %format!("{ns}/{name}"), error = %e, "writing the snapshot's error");
                }
                let what = format!("{ns}/{name}");
                let (reason, message) = (f.reason, f.message);
                if told
                    .publish(client, (vs, &ar), Type::Warning, reason, message.clone())
                    .await
                {
                    warn!(snapshot = %what, reason, error = %message, "snapshot not taken");
                } else {
                    debug!(snapshot = %what, reason, error = %message, "snapshot still not taken");
                }
            }
        }
    }
    Ok(())
}

/// The PV of the driver that claim `name` in `ns` is bound to (`None`: another driver's).
fn source_volume<'a>(
    ns: &str,
    name: &str,
    claims: &[PersistentVolumeClaim],
    pvs: &'a BTreeMap<String, PersistentVolume>,
) -> Result<Option<&'a PersistentVolume>, Failure> {
    let field = "spec.source.persistentVolumeClaimName";
    let claim = claims
        .iter()
        .find(|c| {
            c.metadata.namespace.as_deref() == Some(ns) && c.metadata.name.as_deref() == Some(name)
        })
        .ok_or_else(|| {
            Failure::new(
                "SourceClaimNotFound",
                format!("{field}: claim {name:?} not found in namespace {ns:?}"),
            )
        })?;
    let bound = claim.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Bound");
    let pv = claim
        .spec
        .as_ref()
        .and_then(|s| s.volume_name.as_deref())
        .and_then(|v| pvs.get(v))
        .filter(|_| bound)
        .ok_or_else(|| {
            Failure::new(
                "SourceClaimNotBound",
                format!("{field}: claim {name:?} is not bound to a volume yet"),
            )
        })?;
    let ours = pv
        .spec
        .as_ref()
        .and_then(|s| s.csi.as_ref())
        .is_some_and(|c| c.driver == DRIVER);
    Ok(ours.then_some(pv))
}

/// The claims in `ns` made from VolumeSnapshot `name` (`spec.dataSourceRef` or
/// `spec.dataSource`): the block store keeps a snapshot while a volume made from it exists, so
/// its deletion waits for them (upstream's `volumesnapshot-as-source-protection`, held longer).
fn restored_from(ns: &str, name: &str, claims: &[PersistentVolumeClaim]) -> Vec<String> {
    claims
        .iter()
        .filter(|c| c.metadata.namespace.as_deref() == Some(ns))
        .filter(|c| {
            let Some(spec) = c.spec.as_ref() else {
                return false;
            };
            let by_ref = spec
                .data_source_ref
                .as_ref()
                .map(|r| (&r.api_group, &r.kind, &r.name));
            let by_source = spec
                .data_source
                .as_ref()
                .map(|d| (&d.api_group, &d.kind, &d.name));
            by_ref.or(by_source).is_some_and(|(group, kind, n)| {
                group.as_deref() == Some("snapshot.storage.k8s.io")
                    && kind == "VolumeSnapshot"
                    && n == name
            })
        })
        .filter_map(|c| c.metadata.name.clone())
        .collect()
}

fn volume_handle(pv: &PersistentVolume) -> String {
    pv.spec
        .as_ref()
        .and_then(|s| s.csi.as_ref())
        .map(|c| c.volume_handle.clone())
        .unwrap_or_default()
}

async fn create_snapshot(
    csi: &mut Csi,
    uid: &str,
    pv: &PersistentVolume,
) -> Result<Snapshot, Failure> {
    csi.create_snapshot(CreateSnapshotRequest {
        source_volume_id: volume_handle(pv),
        name: snapshot_name(uid),
        secrets: HashMap::new(),
        parameters: HashMap::new(),
    })
    .await
    .map_err(|s| {
        Failure::new(
            "CreateSnapshotFailed",
            format!("CreateSnapshot: {}", status_text(&s)),
        )
    })?
    .into_inner()
    .snapshot
    .ok_or_else(|| {
        Failure::new(
            "CreateSnapshotFailed",
            "CreateSnapshot answered no snapshot",
        )
    })
}

async fn set_finalizers(
    api: &Api<DynamicObject>,
    name: &str,
    finalizers: &[&str],
) -> Result<(), Failure> {
    api.patch(
        name,
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"finalizers": finalizers}})),
    )
    .await?;
    Ok(())
}

async fn reconcile(
    client: &kube::Client,
    csi: &mut Csi,
    vs: &DynamicObject,
    claims: &[PersistentVolumeClaim],
    pvs: &BTreeMap<String, PersistentVolume>,
) -> Result<Done, Failure> {
    let ns = vs.metadata.namespace.clone().unwrap_or_default();
    let name = vs.metadata.name.clone().unwrap_or_default();
    let uid = vs.metadata.uid.clone().unwrap_or_default();
    let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), &ns, &resource());
    let finalizers: Vec<&str> = vs
        .metadata
        .finalizers
        .iter()
        .flatten()
        .map(String::as_str)
        .collect();
    let ours = finalizers.contains(&FINALIZER);
    let source = vs.data["spec"]["source"]["persistentVolumeClaimName"]
        .as_str()
        .unwrap_or_default();
    if vs.metadata.deletion_timestamp.is_some() {
        if !ours {
            return Ok(Done::Nothing);
        }
        let id = match handle(vs) {
            Some(h) => Some(h.to_owned()),
            // Killed between CreateSnapshot and recording its ID: ask again by name, which
            // answers the snapshot taken (or takes it), so that it can be deleted.
            None => match source_volume(&ns, source, claims, pvs) {
                Ok(Some(pv)) => Some(create_snapshot(csi, &uid, pv).await?.snapshot_id),
                _ => {
                    warn!(snapshot = %format!("{ns}/{name}"), "deleted before its snapshot was recorded and its source is gone; nothing to delete");
                    None
                }
            },
        };
        let users = restored_from(&ns, &name, claims);
        if !users.is_empty() {
            return Err(Failure::new(
                "SnapshotInUse",
                format!(
                    "claims restored from it remain: {}; the snapshot is deleted once they are",
                    users.join(", ")
                ),
            ));
        }
        if let Some(id) = &id {
            csi.delete_snapshot(DeleteSnapshotRequest {
                snapshot_id: id.clone(),
                secrets: HashMap::new(),
            })
            .await
            .map_err(|s| {
                Failure::new(
                    "DeleteSnapshotFailed",
                    format!("DeleteSnapshot {id}: {}", status_text(&s)),
                )
            })?;
        }
        let rest: Vec<&str> = finalizers
            .iter()
            .copied()
            .filter(|f| *f != FINALIZER)
            .collect();
        match api
            .patch(
                &name,
                &PatchParams::default(),
                &Patch::Merge(json!({"metadata": {"finalizers": rest}})),
            )
            .await
        {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.code == 404 => {}
            Err(e) => return Err(e.into()),
        }
        info!(snapshot = %format!("{ns}/{name}"), id = ?id, "snapshot deleted");
        return Ok(Done::Nothing);
    }
    if ready(vs) && handle(vs).is_some() {
        return Ok(Done::Nothing);
    }
    let Some(pv) = source_volume(&ns, source, claims, pvs)? else {
        return Ok(Done::Nothing); // another driver's volume
    };
    if !ours {
        let mut with = finalizers.clone();
        with.push(FINALIZER);
        set_finalizers(&api, &name, &with).await?;
    }
    let snap = create_snapshot(csi, &uid, pv).await?;
    if handle(vs) != Some(snap.snapshot_id.as_str()) {
        api.patch(
            &name,
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"annotations": {
                SNAPSHOT_HANDLE_ANNOTATION: snap.snapshot_id,
            }}})),
        )
        .await?;
    }
    let created = snap
        .creation_time
        .map_or_else(|| format!("{:.0}", Timestamp::now()), |t| t.to_string());
    api.patch_status(
        &name,
        &PatchParams::default(),
        &Patch::Merge(json!({"status": {
            "readyToUse": snap.ready_to_use,
            "restoreSize": snap.size_bytes.to_string(),
            "creationTime": created,
            "error": null,
        }})),
    )
    .await?;
    info!(snapshot = %format!("{ns}/{name}"), id = %snap.snapshot_id, volume = %volume_handle(pv), ready = snap.ready_to_use, "snapshot taken");
    Ok(if snap.ready_to_use {
        Done::Ready
    } else {
        Done::Nothing
    })
}

/// Records why a VolumeSnapshot is not ready (`status.error`), unless it already says so.
async fn set_error(client: &kube::Client, vs: &DynamicObject, message: &str) -> kube::Result<()> {
    if vs.data["status"]["error"]["message"] == message {
        return Ok(());
    }
    let ns = vs.metadata.namespace.clone().unwrap_or_default();
    let name = vs.metadata.name.clone().unwrap_or_default();
    Api::<DynamicObject>::namespaced_with(client.clone(), &ns, &resource())
        .patch_status(
            &name,
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {
                "readyToUse": ready(vs) && handle(vs).is_some(),
                "error": {"message": message, "time": format!("{:.0}", Timestamp::now())},
            }})),
        )
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claim(ns: &str, name: &str, spec: serde_json::Value) -> PersistentVolumeClaim {
        serde_json::from_value(json!({"metadata": {"namespace": ns, "name": name}, "spec": spec}))
            .expect("a claim")
    }

    #[test]
    fn a_snapshot_is_held_by_the_claims_of_its_namespace_made_from_it() {
        let vs = |name: &str| json!({"apiGroup": "snapshot.storage.k8s.io", "kind": "VolumeSnapshot", "name": name});
        let claims = [
            claim("a", "by-source", json!({"dataSource": vs("snap")})),
            claim("a", "by-ref", json!({"dataSourceRef": vs("snap")})),
            claim("a", "other-snap", json!({"dataSource": vs("other")})),
            claim("b", "other-ns", json!({"dataSource": vs("snap")})),
            claim(
                "a",
                "clone",
                json!({"dataSource": {"kind": "PersistentVolumeClaim", "name": "snap"}}),
            ),
            claim("a", "plain", json!({})),
        ];
        assert_eq!(restored_from("a", "snap", &claims), ["by-source", "by-ref"]);
        assert!(restored_from("a", "nothing", &claims).is_empty());
        assert_eq!(snapshot_name("u-1"), "snapshot-u-1");
    }
}
