//! The external-provisioner's job for `csi.slipway.dev`: a PersistentVolumeClaim of a
//! StorageClass of the driver becomes a CreateVolume over the driver's socket and a
//! PersistentVolume bound to the claim; a claim that asks for more is expanded
//! (ControllerExpandVolume); a claim made from another claim or from a VolumeSnapshot
//! (`spec.dataSourceRef` or `spec.dataSource`) is created with that content (a clone, a
//! restore), once the source is ready; a claim of a WaitForFirstConsumer class waits for the
//! scheduler to choose its first Pod's Node and is provisioned in that Node's zone; a PV of the
//! driver whose claim is gone is deleted with its volume (reclaim policy Delete).
//!
//! Level-triggered: every claim event and every [`PERIOD`] one pass compares claims and PVs.
//! The PV is named `pvc-<claim uid>` and so is the CSI volume request, so a pass killed after
//! CreateVolume finds the volume again (CreateVolume is idempotent by name).

use std::collections::{BTreeMap, BTreeSet, HashMap};

use anyhow::Context as _;
use k8s_openapi::api::core::v1::{Node, PersistentVolume, PersistentVolumeClaim};
use k8s_openapi::api::storage::v1::StorageClass;
use kube::api::{Api, DeleteParams, DynamicObject, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::{WatchStreamExt as _, watcher};
use serde_json::json;
use slipway_api::volumes::{DRIVER, ZONE_TOPOLOGY_KEY};
use slipway_csi::proto::{
    CapacityRange, ControllerExpandVolumeRequest, CreateVolumeRequest, DeleteVolumeRequest,
    TopologyRequirement, VolumeContentSource, volume_content_source,
};
use tracing::{debug, info, warn};

use crate::events::{self, Told, Type};
use crate::pvcsi::{Csi, PERIOD, capability, driver_parameters, fs_type, status_text};
use crate::snapshotter;
use crate::wake::Wakeups;

const PROVISIONED_BY: &str = "pv.kubernetes.io/provisioned-by";

/// A StorageClass `volumeBindingMode` that provisions a claim only once a Pod using it is
/// scheduled, in the zone of the Pod's Node.
pub const WAIT_FOR_FIRST_CONSUMER: &str = "WaitForFirstConsumer";

/// The annotation the scheduler puts on a WaitForFirstConsumer claim: the Node it chose for
/// the claim's first Pod (upstream's name).
pub const SELECTED_NODE: &str = "volume.kubernetes.io/selected-node";

/// The Node the scheduler chose for the claim's first Pod, if any.
pub fn selected_node(claim: &PersistentVolumeClaim) -> Option<&str> {
    claim
        .metadata
        .annotations
        .as_ref()?
        .get(SELECTED_NODE)
        .map(String::as_str)
        .filter(|n| !n.is_empty())
}

/// The PV (and CSI volume request) name of a claim, as upstream's provisioner names it.
pub fn pv_name(claim_uid: &str) -> String {
    format!("pvc-{claim_uid}")
}

fn storage(c: &PersistentVolumeClaim) -> Option<u64> {
    let q = c
        .spec
        .as_ref()?
        .resources
        .as_ref()?
        .requests
        .as_ref()?
        .get("storage")?;
    let bytes = slipway_api::meta::parse_quantity(&q.0)?;
    #[allow(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        reason = "a validated claim's request is a positive byte count well inside u64"
    )]
    Some(bytes.ceil() as u64)
}

fn pv_size(pv: &PersistentVolume) -> Option<u64> {
    let q = pv.spec.as_ref()?.capacity.as_ref()?.get("storage")?;
    #[allow(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        reason = "a PV's capacity is a positive byte count well inside u64"
    )]
    slipway_api::meta::parse_quantity(&q.0).map(|b| b as u64)
}

fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// Why a claim is not provisioned yet that is no error: its data source is not ready.
#[derive(Debug)]
struct Waiting(String);

impl std::fmt::Display for Waiting {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Waiting {}

/// Runs until the task is dropped.
pub async fn run(client: kube::Client, csi: Csi) {
    let mut told = Told::default();
    let claims: Api<PersistentVolumeClaim> = Api::all(client.clone());
    let mut wake = Wakeups::new(
        watcher(claims, watcher::Config::default()).default_backoff(),
        PERIOD,
    );
    loop {
        wake.next().await;
        if let Err(e) = pass(&client, csi.clone(), &mut told).await {
            warn!(error = %format!("{e:#}"), "provisioner pass failed; retrying");
        }
    }
}

/// One pass over every claim and PV; `told` keeps the claims' last Events, so a condition that
/// lasts is told once.
pub async fn pass(client: &kube::Client, mut csi: Csi, told: &mut Told) -> anyhow::Result<()> {
    let lp = ListParams::default();
    let classes: BTreeMap<String, StorageClass> = Api::<StorageClass>::all(client.clone())
        .list(&lp)
        .await?
        .items
        .into_iter()
        .filter(|c| c.provisioner == DRIVER)
        .filter_map(|c| Some((c.metadata.name.clone()?, c)))
        .collect();
    let pvs_api: Api<PersistentVolume> = Api::all(client.clone());
    let pvs: BTreeMap<String, PersistentVolume> = pvs_api
        .list(&lp)
        .await?
        .items
        .into_iter()
        .filter_map(|p| Some((p.metadata.name.clone()?, p)))
        .collect();
    let claims = Api::<PersistentVolumeClaim>::all(client.clone())
        .list(&lp)
        .await?
        .items;
    for claim in &claims {
        let spec = claim.spec.clone().unwrap_or_default();
        let Some(class) = spec
            .storage_class_name
            .as_deref()
            .and_then(|c| classes.get(c))
        else {
            continue;
        };
        let Some(uid) = claim.metadata.uid.clone() else {
            continue;
        };
        if claim.metadata.deletion_timestamp.is_some() {
            continue;
        }
        let name = pv_name(&uid);
        if !pvs.contains_key(&name)
            && class.volume_binding_mode.as_deref() == Some(WAIT_FOR_FIRST_CONSUMER)
            && selected_node(claim).is_none()
        {
            // Provisioned once the scheduler has chosen its first Pod's Node.
            continue;
        }
        let result = match pvs.get(&name) {
            None => provision(client, &mut csi, claim, class, &claims, &pvs, &name).await,
            Some(pv) => keep(client, &mut csi, claim, class, pv).await,
        };
        let what = format!(
            "{}/{}",
            claim.metadata.namespace.as_deref().unwrap_or_default(),
            claim.metadata.name.as_deref().unwrap_or_default()
        );
        match result {
            Ok(()) => told.forget(&uid),
            Err(e) if e.downcast_ref::<Waiting>().is_some() => {
                let msg = e.to_string();
                if told
                    .publish(
                        client,
                        (claim, &()),
                        Type::Normal,
                        "WaitingForDataSource",
                        msg,
                    )
                    .await
                {
                    info!(claim = %what, reason = %e, "provisioning waits");
                }
            }
            Err(e) => {
                let msg = format!("{e:#}");
                if told
                    .publish(
                        client,
                        (claim, &()),
                        Type::Warning,
                        "ProvisioningFailed",
                        msg.clone(),
                    )
                    .await
                {
                    warn!(claim = %what, error = %msg, "provisioning failed");
                } else {
                    debug!(claim = %what, error = %msg, "provisioning still fails");
                }
            }
        }
    }
    told.retain(
        &claims
            .iter()
            .filter_map(|c| c.metadata.uid.as_deref())
            .collect::<BTreeSet<_>>(),
    );
    // PVs of the driver whose claim is gone: their volumes go (reclaim policy Delete).
    for (name, pv) in &pvs {
        let Some(spec) = &pv.spec else { continue };
        let ours = spec.csi.as_ref().is_some_and(|c| c.driver == DRIVER)
            && pv
                .metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(PROVISIONED_BY))
                .is_some_and(|p| p == DRIVER);
        if !ours || spec.persistent_volume_reclaim_policy.as_deref() != Some("Delete") {
            continue;
        }
        let claim_uid = spec.claim_ref.as_ref().and_then(|r| r.uid.clone());
        if claims.iter().any(|c| c.metadata.uid == claim_uid) {
            continue;
        }
        let handle = spec
            .csi
            .as_ref()
            .map(|c| c.volume_handle.clone())
            .unwrap_or_default();
        match csi
            .delete_volume(DeleteVolumeRequest {
                volume_id: handle.clone(),
                secrets: HashMap::new(),
            })
            .await
        {
            Ok(_) => {
                match pvs_api.delete(name, &DeleteParams::default()).await {
                    Ok(_) => {}
                    Err(kube::Error::Api(s)) if s.code == 404 => {}
                    Err(e) => return Err(e.into()),
                }
                info!(pv = %name, volume = %handle, "volume deleted with its claim");
            }
            Err(s) => warn!(pv = %name, error = %status_text(&s), "DeleteVolume failed"),
        }
    }
    Ok(())
}

#[allow(
    clippy::too_many_arguments,
    reason = "one pass's lists, passed down once"
)]
async fn provision(
    client: &kube::Client,
    csi: &mut Csi,
    claim: &PersistentVolumeClaim,
    class: &StorageClass,
    claims: &[PersistentVolumeClaim],
    pvs: &BTreeMap<String, PersistentVolume>,
    name: &str,
) -> anyhow::Result<()> {
    let spec = claim.spec.clone().unwrap_or_default();
    let ns = claim.metadata.namespace.clone().unwrap_or_default();
    let size = storage(claim)
        .ok_or_else(|| anyhow::anyhow!("spec.resources.requests.storage is missing"))?;
    let modes = spec.access_modes.clone().unwrap_or_default();
    let fs_type = fs_type(class.parameters.as_ref())?;
    let cap = capability(spec.volume_mode.as_deref(), &modes, &fs_type);
    let source = content_source(client, claim, size, claims, pvs).await?;
    let zone = |z: String| slipway_csi::proto::Topology {
        segments: HashMap::from([(ZONE_TOPOLOGY_KEY.to_owned(), z)]),
    };
    let allowed: Vec<_> = class
        .allowed_topologies
        .iter()
        .flatten()
        .flat_map(|t| t.match_label_expressions.iter().flatten())
        .filter(|e| e.key == ZONE_TOPOLOGY_KEY)
        .flat_map(|e| e.values.clone())
        .map(zone)
        .collect();
    // The zone of the Node the scheduler chose for the claim's first Pod (WaitForFirstConsumer).
    let selected = match selected_node(claim) {
        Some(node) => Some(
            Api::<Node>::all(client.clone())
                .get(node)
                .await
                .with_context(|| format!("the selected node {node:?}"))?
                .metadata
                .labels
                .and_then(|l| l.get(ZONE_TOPOLOGY_KEY).cloned())
                .with_context(|| {
                    format!("the selected node {node:?} has no {ZONE_TOPOLOGY_KEY} label")
                })?,
        ),
        None => None,
    };
    let topology = (!allowed.is_empty() || selected.is_some()).then(|| TopologyRequirement {
        requisite: if allowed.is_empty() {
            selected.clone().map(zone).into_iter().collect()
        } else {
            allowed
        },
        preferred: selected.map(zone).into_iter().collect(),
    });
    let resp = csi
        .create_volume(CreateVolumeRequest {
            name: name.to_owned(),
            capacity_range: Some(CapacityRange {
                required_bytes: to_i64(size),
                limit_bytes: 0,
            }),
            volume_capabilities: vec![cap],
            parameters: driver_parameters(class.parameters.as_ref()),
            secrets: HashMap::new(),
            volume_content_source: source,
            accessibility_requirements: topology,
        })
        .await
        .map_err(|s| anyhow::anyhow!("CreateVolume: {}", status_text(&s)))?
        .into_inner();
    let vol = resp
        .volume
        .ok_or_else(|| anyhow::anyhow!("CreateVolume answered no volume"))?;
    let zones: Vec<String> = vol
        .accessible_topology
        .iter()
        .filter_map(|t| t.segments.get(ZONE_TOPOLOGY_KEY).cloned())
        .collect();
    let mut pv = json!({
        "metadata": {"name": name, "annotations": {PROVISIONED_BY: DRIVER}},
        "spec": {
            "capacity": {"storage": vol.capacity_bytes.to_string()},
            "accessModes": modes,
            "volumeMode": spec.volume_mode.clone().unwrap_or_else(|| "Filesystem".into()),
            "persistentVolumeReclaimPolicy": class.reclaim_policy.clone().unwrap_or_else(|| "Delete".into()),
            "storageClassName": spec.storage_class_name,
            "claimRef": {
                "kind": "PersistentVolumeClaim", "apiVersion": "v1",
                "namespace": ns, "name": claim.metadata.name, "uid": claim.metadata.uid,
            },
            "csi": {
                "driver": DRIVER,
                "volumeHandle": vol.volume_id,
                "volumeAttributes": vol.volume_context,
                "fsType": if spec.volume_mode.as_deref() == Some("Block") { None } else { Some(fs_type) },
            },
        },
    });
    if !zones.is_empty() {
        pv["spec"]["nodeAffinity"] = json!({"required": {"nodeSelectorTerms": [{
            "matchExpressions": [{"key": ZONE_TOPOLOGY_KEY, "operator": "In", "values": zones}]
        }]}});
    }
    let pv: PersistentVolume = serde_json::from_value(pv)?;
    let pvs_api: Api<PersistentVolume> = Api::all(client.clone());
    match pvs_api.create(&PostParams::default(), &pv).await {
        Ok(_) => {}
        Err(kube::Error::Api(s)) if s.code == 409 => {}
        Err(e) => return Err(e.into()),
    }
    info!(claim = %format!("{ns}/{}", claim.metadata.name.as_deref().unwrap_or_default()), pv = %name, volume = %vol.volume_id, "provisioned");
    bind(
        client,
        claim,
        &pv,
        u64::try_from(vol.capacity_bytes).unwrap_or(0),
    )
    .await?;
    events::publish(
        client,
        claim,
        Type::Normal,
        "ProvisioningSucceeded",
        format!("Successfully provisioned volume {name}"),
    )
    .await;
    Ok(())
}

/// The content a claim's `spec.dataSourceRef` (or else `spec.dataSource`) asks for: another
/// claim's volume (a clone; same namespace, bound by this provisioner) or a VolumeSnapshot's
/// snapshot (a restore; ready, and no larger than the claim). A source that is not ready yet
/// is a [`Waiting`].
async fn content_source(
    client: &kube::Client,
    claim: &PersistentVolumeClaim,
    size: u64,
    claims: &[PersistentVolumeClaim],
    pvs: &BTreeMap<String, PersistentVolume>,
) -> anyhow::Result<Option<VolumeContentSource>> {
    let ns = claim.metadata.namespace.clone().unwrap_or_default();
    let spec = claim.spec.as_ref();
    let (field, group, kind, name) = match (
        spec.and_then(|s| s.data_source_ref.as_ref()),
        spec.and_then(|s| s.data_source.as_ref()),
    ) {
        (Some(r), _) => {
            if r.namespace.as_deref().is_some_and(|n| n != ns) {
                anyhow::bail!(
                    "spec.dataSourceRef.namespace: a source in another namespace is not supported"
                );
            }
            (
                "spec.dataSourceRef",
                r.api_group.clone(),
                r.kind.as_str(),
                r.name.as_str(),
            )
        }
        (None, Some(d)) => (
            "spec.dataSource",
            d.api_group.clone(),
            d.kind.as_str(),
            d.name.as_str(),
        ),
        (None, None) => return Ok(None),
    };
    let group = group.unwrap_or_default();
    let source = match (group.as_str(), kind) {
        ("", "PersistentVolumeClaim") => {
            let src = claims
                .iter()
                .find(|c| {
                    c.metadata.namespace.as_deref() == Some(&ns)
                        && c.metadata.name.as_deref() == Some(name)
                })
                .ok_or_else(|| Waiting(format!("{field}: claim {name:?} not found")))?;
            let pv = src
                .spec
                .as_ref()
                .and_then(|s| s.volume_name.as_ref())
                .and_then(|v| pvs.get(v))
                .and_then(|p| p.spec.as_ref()?.csi.as_ref())
                .ok_or_else(|| Waiting(format!("{field}: claim {name:?} is not bound yet")))?;
            volume_content_source::Type::Volume(volume_content_source::VolumeSource {
                volume_id: pv.volume_handle.clone(),
            })
        }
        ("snapshot.storage.k8s.io", "VolumeSnapshot") => {
            let vs = Api::<DynamicObject>::namespaced_with(
                client.clone(),
                &ns,
                &snapshotter::resource(),
            )
            .get_opt(name)
            .await?
            .ok_or_else(|| Waiting(format!("{field}: VolumeSnapshot {name:?} not found")))?;
            let handle = snapshotter::handle(&vs)
                .filter(|_| snapshotter::ready(&vs))
                .ok_or_else(|| {
                    Waiting(format!(
                        "{field}: VolumeSnapshot {name:?} is not ready to use yet"
                    ))
                })?;
            let restore = vs.data["status"]["restoreSize"]
                .as_str()
                .and_then(slipway_api::meta::parse_quantity)
                .unwrap_or(0.0);
            #[allow(
                clippy::cast_precision_loss,
                reason = "a byte count compared with a parsed quantity"
            )]
            if (size as f64) < restore {
                anyhow::bail!(
                    "spec.resources.requests.storage: {size} bytes is less than VolumeSnapshot {name:?}'s restoreSize of {restore} bytes"
                );
            }
            volume_content_source::Type::Snapshot(volume_content_source::SnapshotSource {
                snapshot_id: handle.to_owned(),
            })
        }
        (g, k) => anyhow::bail!("{field}: kind {k:?} of apiGroup {g:?} is not supported"),
    };
    Ok(Some(VolumeContentSource {
        r#type: Some(source),
    }))
}

/// A claim whose PV exists: bound, and grown when it asks for more.
async fn keep(
    client: &kube::Client,
    csi: &mut Csi,
    claim: &PersistentVolumeClaim,
    class: &StorageClass,
    pv: &PersistentVolume,
) -> anyhow::Result<()> {
    let mut size = pv_size(pv).unwrap_or(0);
    let want = storage(claim).unwrap_or(0);
    if want > size {
        if class.allow_volume_expansion != Some(true) {
            anyhow::bail!(
                "spec.resources.requests.storage: StorageClass does not allow volume expansion"
            );
        }
        let spec = claim.spec.clone().unwrap_or_default();
        let handle = pv
            .spec
            .as_ref()
            .and_then(|s| s.csi.as_ref())
            .map(|c| c.volume_handle.clone())
            .unwrap_or_default();
        let resp = csi
            .controller_expand_volume(ControllerExpandVolumeRequest {
                volume_id: handle,
                capacity_range: Some(CapacityRange {
                    required_bytes: to_i64(want),
                    limit_bytes: 0,
                }),
                secrets: HashMap::new(),
                volume_capability: Some(capability(
                    spec.volume_mode.as_deref(),
                    &spec.access_modes.clone().unwrap_or_default(),
                    pv.spec
                        .as_ref()
                        .and_then(|s| s.csi.as_ref()?.fs_type.as_deref())
                        .unwrap_or("ext4"),
                )),
            })
            .await
            .map_err(|s| anyhow::anyhow!("ControllerExpandVolume: {}", status_text(&s)))?
            .into_inner();
        size = u64::try_from(resp.capacity_bytes).unwrap_or(want);
        let name = pv.metadata.name.clone().unwrap_or_default();
        Api::<PersistentVolume>::all(client.clone())
            .patch(
                &name,
                &PatchParams::default(),
                &Patch::Merge(json!({"spec": {"capacity": {"storage": size.to_string()}}})),
            )
            .await?;
        info!(pv = %name, size, "volume expanded");
    }
    bind(client, claim, pv, size).await
}

/// Binds claim and PV (spec.volumeName, both phases Bound, the claim's capacity).
async fn bind(
    client: &kube::Client,
    claim: &PersistentVolumeClaim,
    pv: &PersistentVolume,
    size: u64,
) -> anyhow::Result<()> {
    let ns = claim.metadata.namespace.clone().unwrap_or_default();
    let name = claim.metadata.name.clone().unwrap_or_default();
    let pv_name = pv.metadata.name.clone().unwrap_or_default();
    let api: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), &ns);
    let spec = claim.spec.as_ref();
    if spec.and_then(|s| s.volume_name.as_deref()) != Some(pv_name.as_str()) {
        api.patch(
            &name,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"volumeName": pv_name}})),
        )
        .await?;
    }
    let status = claim.status.as_ref();
    let have = status
        .and_then(|s| s.capacity.as_ref())
        .and_then(|c| c.get("storage"))
        .map(|q| q.0.clone());
    if status.and_then(|s| s.phase.as_deref()) != Some("Bound")
        || have.as_deref() != Some(size.to_string().as_str())
    {
        api.patch_status(
            &name,
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {
                "phase": "Bound",
                "accessModes": spec.and_then(|s| s.access_modes.clone()),
                "capacity": {"storage": size.to_string()},
            }})),
        )
        .await?;
    }
    if pv.status.as_ref().and_then(|s| s.phase.as_deref()) != Some("Bound") {
        Api::<PersistentVolume>::all(client.clone())
            .patch_status(
                &pv_name,
                &PatchParams::default(),
                &Patch::Merge(json!({"status": {"phase": "Bound"}})),
            )
            .await?;
    }
    Ok(())
}
