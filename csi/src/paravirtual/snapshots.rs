//! pvCSI snapshots: CreateSnapshot makes a VolumeSnapshot `<cluster>-<name>` of the source
//! volume's claim in the supervisor namespace (labelled with the cluster) and waits until the
//! supervisor has taken it; the snapshot ID is the handle the supervisor annotates it with.
//! DeleteSnapshot deletes it and waits until it is gone; ListSnapshots lists the cluster's.

use kube::api::{
    ApiResource, DeleteParams, DynamicObject, GroupVersionKind, ListParams, PostParams,
};
use serde_json::json;
use slipway_api::volumes::{
    CLUSTER_LABEL, CSI_NAME_ANNOTATION, SNAPSHOT_HANDLE_ANNOTATION, VOLUME_HANDLE_ANNOTATION,
};

use super::{ParavirtualController, annotation, is_code, refusal, sv_err};
use crate::controller::{check_name, check_parameters, page};
use crate::error::CsiError;
use crate::proto::{
    CreateSnapshotRequest, ListSnapshotsRequest, ListSnapshotsResponse, Snapshot,
    list_snapshots_response,
};

/// The served VolumeSnapshot kind.
pub(super) fn resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("snapshot.storage.k8s.io", "v1", "VolumeSnapshot"),
        "volumesnapshots",
    )
}

fn snapshot_handle(vs: &DynamicObject) -> Option<&str> {
    vs.metadata
        .annotations
        .as_ref()?
        .get(SNAPSHOT_HANDLE_ANNOTATION)
        .map(String::as_str)
}

/// The CSI snapshot of a VolumeSnapshot, once the supervisor has taken it.
fn snapshot_msg(vs: &DynamicObject, source: &str) -> Option<Snapshot> {
    let status = &vs.data["status"];
    if status["readyToUse"] != true {
        return None;
    }
    Some(Snapshot {
        size_bytes: status["restoreSize"]
            .as_str()
            .and_then(|s| s.parse().ok())
            .unwrap_or(0),
        snapshot_id: snapshot_handle(vs)?.to_owned(),
        source_volume_id: source.to_owned(),
        creation_time: status["creationTime"]
            .as_str()
            .and_then(|t| t.parse::<prost_types::Timestamp>().ok()),
        ready_to_use: true,
    })
}

impl ParavirtualController {
    /// The cluster's VolumeSnapshots in the supervisor namespace.
    async fn cluster_snapshots(&self) -> Result<Vec<DynamicObject>, CsiError> {
        Ok(self
            .snapshots
            .list(&ListParams::default().labels(&format!("{CLUSTER_LABEL}={}", self.sv.cluster)))
            .await
            .map_err(sv_err("listing snapshots"))?
            .items)
    }

    /// The VolumeSnapshot whose handle is `id`.
    pub(super) async fn snapshot_of(&self, id: &str) -> Result<Option<DynamicObject>, CsiError> {
        Ok(self
            .cluster_snapshots()
            .await?
            .into_iter()
            .find(|v| snapshot_handle(v) == Some(id)))
    }

    pub(super) async fn create_snapshot(
        &self,
        req: CreateSnapshotRequest,
    ) -> Result<Snapshot, CsiError> {
        check_name("name", &req.name)?;
        check_name("source_volume_id", &req.source_volume_id)?;
        check_parameters(&req.parameters, &[])?;
        let claim =
            self.claim_of(&req.source_volume_id)
                .await?
                .ok_or_else(|| CsiError::NotFound {
                    what: "volume",
                    id: req.source_volume_id.clone(),
                })?;
        let claim_name = claim.metadata.name.clone().unwrap_or_default();
        let name = self.claim_name(&req.name);
        let obj: DynamicObject = serde_json::from_value(json!({
            "apiVersion": "snapshot.storage.k8s.io/v1",
            "kind": "VolumeSnapshot",
            "metadata": {"name": name, "labels": {CLUSTER_LABEL: self.sv.cluster},
                         "annotations": {CSI_NAME_ANNOTATION: req.name}},
            "spec": {"source": {"persistentVolumeClaimName": claim_name}},
        }))
        .map_err(|e| CsiError::invalid("name", e.to_string()))?;
        match self.snapshots.create(&PostParams::default(), &obj).await {
            Ok(_) => {}
            Err(e) if is_code(&e, 409) => {
                let have = self
                    .snapshots
                    .get(&name)
                    .await
                    .map_err(sv_err(format!("reading snapshot {name}")))?;
                if have.data["spec"]["source"]["persistentVolumeClaimName"] != claim_name.as_str() {
                    return Err(CsiError::AlreadyExists(format!(
                        "snapshot {:?} exists of another volume",
                        req.name
                    )));
                }
            }
            Err(e) => return Err(refusal("creating the snapshot", e)),
        }
        let api = self.snapshots.clone();
        let source = req.source_volume_id.clone();
        self.until("taken the snapshot", || {
            let (api, name, source) = (api.clone(), name.clone(), source.clone());
            async move {
                let vs = api
                    .get(&name)
                    .await
                    .map_err(sv_err(format!("reading snapshot {name}")))?;
                Ok(snapshot_msg(&vs, &source))
            }
        })
        .await
    }

    pub(super) async fn delete_snapshot(&self, id: &str) -> Result<(), CsiError> {
        if id.is_empty() {
            return Err(CsiError::invalid("snapshot_id", "must not be empty"));
        }
        let Some(vs) = self.snapshot_of(id).await? else {
            return Ok(());
        };
        let name = vs.metadata.name.clone().unwrap_or_default();
        match self.snapshots.delete(&name, &DeleteParams::default()).await {
            Ok(_) => {}
            Err(e) if is_code(&e, 404) => return Ok(()),
            Err(e) => return Err(sv_err(format!("deleting snapshot {name}"))(e)),
        }
        let api = self.snapshots.clone();
        self.until("deleted the snapshot", || {
            let (api, name) = (api.clone(), name.clone());
            async move {
                match api.get_opt(&name).await {
                    Ok(None) => Ok(Some(())),
                    Ok(Some(_)) => Ok(None),
                    Err(e) => Err(sv_err(format!("reading snapshot {name}"))(e)),
                }
            }
        })
        .await
    }

    /// The cluster's snapshots that are ready, filtered and paged as `req` asks.
    pub(super) async fn list_snapshots(
        &self,
        req: ListSnapshotsRequest,
    ) -> Result<ListSnapshotsResponse, CsiError> {
        let claims = self.cluster_claims().await?;
        let mut entries: Vec<Snapshot> = self
            .cluster_snapshots()
            .await?
            .iter()
            .filter_map(|vs| {
                let claim = vs.data["spec"]["source"]["persistentVolumeClaimName"].as_str()?;
                let source = claims
                    .iter()
                    .find(|c| c.metadata.name.as_deref() == Some(claim))
                    .and_then(|c| annotation(c, VOLUME_HANDLE_ANNOTATION))
                    .unwrap_or_default();
                snapshot_msg(vs, source)
            })
            .filter(|s| req.snapshot_id.is_empty() || s.snapshot_id == req.snapshot_id)
            .filter(|s| {
                req.source_volume_id.is_empty() || s.source_volume_id == req.source_volume_id
            })
            .collect();
        entries.sort_by(|x, y| x.snapshot_id.cmp(&y.snapshot_id));
        let (entries, next_token) = page(entries, req.max_entries, &req.starting_token)?;
        Ok(ListSnapshotsResponse {
            entries: entries
                .into_iter()
                .map(|s| list_snapshots_response::Entry { snapshot: Some(s) })
                .collect(),
            next_token,
        })
    }
}
