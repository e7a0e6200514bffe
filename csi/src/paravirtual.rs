//! The paravirtual Controller service (pvCSI): in a workload cluster, every volume request is
//! forwarded to the cluster's supervisor namespace, which owns the storage; the cluster holds
//! no block store credential, only its namespace-scoped identity.
//!
//! - CreateVolume makes a PersistentVolumeClaim `<cluster>-<name>` in the supervisor namespace
//!   (labelled with the cluster, of the supervisor StorageClass named by the `svStorageClass`
//!   parameter, in the zone the topology asks for) and waits for the supervisor to bind it; the
//!   volume ID is the supervisor's volume handle (the export name the node plugin opens).
//! - ControllerPublish makes a HostVolumeAttachment `<claim>-<node>` for the node's host and
//!   waits until the supervisor has authorised the host on the export; its attachment metadata
//!   is the publish context. Unpublish deletes it and waits until it is gone (the host is off
//!   the export's allow-list by then).
//! - Expansion raises the claim's request and waits for the supervisor to grow the volume.
//! - Snapshots are VolumeSnapshots there (`paravirtual/snapshots.rs`).
//!
//! Every RPC finds its objects by derived names and labels, so a repeated call answers as the
//! first did and a call after a restart finishes what an earlier one started.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::PersistentVolumeClaim;
use kube::api::{
    Api, ApiResource, DeleteParams, DynamicObject, GroupVersionKind, ListParams, Patch,
    PatchParams, PostParams,
};
use serde_json::{Value, json};
use slipway_api::slipway::{GROUP, VERSION};
use slipway_api::volumes::{
    CLUSTER_LABEL, CSI_NAME_ANNOTATION, NBD_ADDRESS_ANNOTATION, SV_STORAGE_CLASS,
    VOLUME_HANDLE_ANNOTATION, ZONE_ANNOTATION,
};
use tonic::{Request, Response, Status};

use crate::capability;
use crate::controller::{CTX_NBD, DEFAULT_SIZE, check_name, check_parameters, page, size_for};
use crate::error::CsiError;
use crate::identity::ZONE_KEY;
use crate::proto::controller_server::Controller;
use crate::proto::controller_service_capability::{self, rpc};
use crate::proto::volume_content_source;
use crate::proto::*;

mod snapshots;

/// Where the controller reaches its supervisor namespace.
#[derive(Clone)]
pub struct SupervisorNamespace {
    /// A client with the cluster's namespace-scoped identity.
    pub client: kube::Client,
    /// The cluster's supervisor namespace.
    pub namespace: String,
    /// The cluster's name (claims are named and labelled after it).
    pub cluster: String,
}

impl std::fmt::Debug for SupervisorNamespace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SupervisorNamespace")
            .field("namespace", &self.namespace)
            .field("cluster", &self.cluster)
            .finish_non_exhaustive()
    }
}

/// The paravirtual Controller service.
#[derive(Debug)]
pub struct ParavirtualController {
    sv: SupervisorNamespace,
    claims: Api<PersistentVolumeClaim>,
    attachments: Api<DynamicObject>,
    snapshots: Api<DynamicObject>,
    /// How long an RPC waits for the supervisor before answering DEADLINE_EXCEEDED.
    wait: Duration,
}

fn hva_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk(GROUP, VERSION, "HostVolumeAttachment"),
        "hostvolumeattachments",
    )
}

fn sv_err(what: impl Into<String>) -> impl FnOnce(kube::Error) -> CsiError {
    let what = what.into();
    move |source| CsiError::Supervisor { what, source }
}

/// A refusal of the supervisor's admission, as the CSI code the spec gives it: a namespace
/// limit is RESOURCE_EXHAUSTED, anything else the request's fault (INVALID_ARGUMENT); the
/// message (which names the limit or the field) is kept.
fn refusal(what: &str, e: kube::Error) -> CsiError {
    match &e {
        // The link's own rights fall short: not the request's fault.
        kube::Error::Api(s) if s.code == 403 && s.message.contains("is forbidden: User") => {
            CsiError::Supervisor {
                what: what.to_owned(),
                source: e,
            }
        }
        kube::Error::Api(s) if s.code == 403 && s.message.contains("exceeded quota") => {
            CsiError::ResourceExhausted(s.message.clone())
        }
        kube::Error::Api(s) if s.code == 403 || s.code == 422 => CsiError::InvalidArgument {
            field: "parameters",
            reason: s.message.clone(),
        },
        _ => CsiError::Supervisor {
            what: what.to_owned(),
            source: e,
        },
    }
}

fn is_code(e: &kube::Error, code: u16) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == code)
}

fn annotation<'a>(c: &'a PersistentVolumeClaim, key: &str) -> Option<&'a str> {
    c.metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(key))
        .map(String::as_str)
}

fn bound_size(c: &PersistentVolumeClaim) -> Option<u64> {
    let st = c.status.as_ref()?;
    if st.phase.as_deref() != Some("Bound") {
        return None;
    }
    st.capacity.as_ref()?.get("storage")?.0.parse().ok()
}

fn requested(c: &PersistentVolumeClaim) -> Option<u64> {
    let q = c
        .spec
        .as_ref()?
        .resources
        .as_ref()?
        .requests
        .as_ref()?
        .get("storage")?;
    q.0.parse().ok()
}

fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn rpc_cap(t: rpc::Type) -> ControllerServiceCapability {
    ControllerServiceCapability {
        r#type: Some(controller_service_capability::Type::Rpc(
            controller_service_capability::Rpc { r#type: t as i32 },
        )),
    }
}

/// The zone a request's topology asks for: the first preferred, else the first requisite.
fn wanted_zone(req: Option<&TopologyRequirement>) -> Option<String> {
    let r = req?;
    r.preferred
        .iter()
        .chain(&r.requisite)
        .find_map(|t| t.segments.get(ZONE_KEY).cloned())
}

impl ParavirtualController {
    /// A controller forwarding to `sv`.
    pub fn new(sv: SupervisorNamespace) -> Self {
        Self {
            claims: Api::namespaced(sv.client.clone(), &sv.namespace),
            attachments: Api::namespaced_with(sv.client.clone(), &sv.namespace, &hva_resource()),
            snapshots: Api::namespaced_with(
                sv.client.clone(),
                &sv.namespace,
                &snapshots::resource(),
            ),
            sv,
            wait: Duration::from_secs(60),
        }
    }

    /// The same, waiting at most `wait` for the supervisor in each RPC.
    pub fn with_wait(mut self, wait: Duration) -> Self {
        self.wait = wait;
        self
    }

    fn claim_name(&self, csi_name: &str) -> String {
        format!("{}-{csi_name}", self.sv.cluster)
    }

    /// The cluster's claims in the supervisor namespace.
    async fn cluster_claims(&self) -> Result<Vec<PersistentVolumeClaim>, CsiError> {
        Ok(self
            .claims
            .list(&ListParams::default().labels(&format!("{CLUSTER_LABEL}={}", self.sv.cluster)))
            .await
            .map_err(sv_err("listing claims"))?
            .items)
    }

    /// The claim whose volume is `volume_id`.
    async fn claim_of(&self, volume_id: &str) -> Result<Option<PersistentVolumeClaim>, CsiError> {
        Ok(self
            .cluster_claims()
            .await?
            .into_iter()
            .find(|c| annotation(c, VOLUME_HANDLE_ANNOTATION) == Some(volume_id)))
    }

    /// Polls `f` every 100 ms until it gives an answer or [`Self::wait`] passes.
    async fn until<T, F, Fut>(&self, what: &str, mut f: F) -> Result<T, CsiError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<Option<T>, CsiError>>,
    {
        let deadline = Instant::now() + self.wait;
        loop {
            if let Some(v) = f().await? {
                return Ok(v);
            }
            if Instant::now() >= deadline {
                return Err(CsiError::NotYet(format!(
                    "the supervisor has not {what} within {:?}; retry",
                    self.wait
                )));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn volume_msg(&self, c: &PersistentVolumeClaim, size: u64) -> Option<Volume> {
        let id = annotation(c, VOLUME_HANDLE_ANNOTATION)?;
        let mut ctx = HashMap::new();
        if let Some(nbd) = annotation(c, NBD_ADDRESS_ANNOTATION) {
            ctx.insert(CTX_NBD.to_owned(), nbd.to_owned());
        }
        Some(Volume {
            capacity_bytes: to_i64(size),
            volume_id: id.to_owned(),
            volume_context: ctx,
            content_source: None,
            accessible_topology: annotation(c, ZONE_ANNOTATION)
                .map(|z| Topology {
                    segments: HashMap::from([(ZONE_KEY.to_owned(), z.to_owned())]),
                })
                .into_iter()
                .collect(),
        })
    }

    async fn create(&self, req: CreateVolumeRequest) -> Result<Volume, CsiError> {
        check_name("name", &req.name)?;
        capability::check_all(&req.volume_capabilities, "volume_capabilities")?;
        check_parameters(&req.parameters, &[SV_STORAGE_CLASS])?;
        let class = req.parameters.get(SV_STORAGE_CLASS).ok_or_else(|| {
            CsiError::invalid(
                "parameters",
                format!("{SV_STORAGE_CLASS:?} (the supervisor StorageClass) is required"),
            )
        })?;
        let size = size_for(req.capacity_range.as_ref(), DEFAULT_SIZE)?;
        let block = req.volume_capabilities.iter().any(|c| {
            capability::check(c, "volume_capabilities").ok() == Some(capability::Access::Block)
        });
        // A clone names its source volume; the supervisor clones the claim that holds it.
        let source = match req
            .volume_content_source
            .as_ref()
            .and_then(|s| s.r#type.as_ref())
        {
            None => None,
            Some(volume_content_source::Type::Snapshot(snap)) => {
                let vs = self.snapshot_of(&snap.snapshot_id).await?.ok_or_else(|| {
                    CsiError::NotFound {
                        what: "snapshot",
                        id: snap.snapshot_id.clone(),
                    }
                })?;
                Some(
                    json!({"kind": "VolumeSnapshot", "apiGroup": "snapshot.storage.k8s.io",
                    "name": vs.metadata.name}),
                )
            }
            Some(volume_content_source::Type::Volume(v)) => {
                let src = self
                    .claim_of(&v.volume_id)
                    .await?
                    .ok_or_else(|| CsiError::NotFound {
                        what: "volume",
                        id: v.volume_id.clone(),
                    })?;
                Some(json!({"kind": "PersistentVolumeClaim", "name": src.metadata.name}))
            }
        };
        let name = self.claim_name(&req.name);
        let mut annotations = BTreeMap::from([(CSI_NAME_ANNOTATION.to_owned(), req.name.clone())]);
        if let Some(z) = wanted_zone(req.accessibility_requirements.as_ref()) {
            annotations.insert(ZONE_ANNOTATION.to_owned(), z);
        }
        let claim: PersistentVolumeClaim = serde_json::from_value(json!({
            "metadata": {
                "name": name,
                "labels": {CLUSTER_LABEL: self.sv.cluster},
                "annotations": annotations,
            },
            "spec": {
                "accessModes": ["ReadWriteOnce"],
                "storageClassName": class,
                "volumeMode": if block { "Block" } else { "Filesystem" },
                "resources": {"requests": {"storage": size.to_string()}},
                "dataSource": source,
            },
        }))
        .map_err(|e| CsiError::invalid("name", e.to_string()))?;
        match self.claims.create(&PostParams::default(), &claim).await {
            Ok(_) => tracing::info!(claim = %name, size, "supervisor claim created"),
            Err(e) if is_code(&e, 409) => {
                let have = self
                    .claims
                    .get(&name)
                    .await
                    .map_err(sv_err(format!("reading claim {name}")))?;
                let same_class = have
                    .spec
                    .as_ref()
                    .and_then(|s| s.storage_class_name.as_deref())
                    == Some(class.as_str());
                if requested(&have) != Some(size) || !same_class {
                    return Err(CsiError::AlreadyExists(format!(
                        "volume {:?} exists with other parameters (claim {name}: {:?} bytes of class {:?})",
                        req.name,
                        requested(&have),
                        have.spec
                            .as_ref()
                            .and_then(|s| s.storage_class_name.clone())
                    )));
                }
            }
            Err(e) => return Err(refusal("creating the claim", e)),
        }
        let claims = self.claims.clone();
        let bound = self
            .until("bound the claim", || {
                let (claims, name) = (claims.clone(), name.clone());
                async move {
                    let c = claims
                        .get(&name)
                        .await
                        .map_err(sv_err(format!("reading claim {name}")))?;
                    Ok(bound_size(&c).map(|s| (c, s)))
                }
            })
            .await?;
        self.volume_msg(&bound.0, bound.1).ok_or_else(|| {
            CsiError::NotYet(format!(
                "claim {name} is bound but not yet annotated; retry"
            ))
        })
    }

    async fn delete(&self, id: &str) -> Result<(), CsiError> {
        check_name("volume_id", id)?;
        let Some(c) = self.claim_of(id).await? else {
            return Ok(());
        };
        let name = c.metadata.name.clone().unwrap_or_default();
        match self.claims.delete(&name, &DeleteParams::default()).await {
            Ok(_) => {}
            Err(e) if is_code(&e, 404) => return Ok(()),
            Err(e) => return Err(sv_err(format!("deleting claim {name}"))(e)),
        }
        let claims = self.claims.clone();
        self.until("deleted the volume", || {
            let (claims, name) = (claims.clone(), name.clone());
            async move {
                match claims.get_opt(&name).await {
                    Ok(None) => Ok(Some(())),
                    Ok(Some(_)) => Ok(None),
                    Err(e) => Err(sv_err(format!("reading claim {name}"))(e)),
                }
            }
        })
        .await?;
        tracing::info!(volume = %id, claim = %name, "volume deleted");
        Ok(())
    }

    fn attachment_name(claim: &str, node: &str) -> String {
        format!("{claim}-{node}")
    }

    async fn publish(
        &self,
        req: ControllerPublishVolumeRequest,
    ) -> Result<HashMap<String, String>, CsiError> {
        check_name("volume_id", &req.volume_id)?;
        if req.node_id.is_empty() {
            return Err(CsiError::invalid("node_id", "must not be empty"));
        }
        let cap = req
            .volume_capability
            .as_ref()
            .ok_or_else(|| CsiError::invalid("volume_capability", "is required"))?;
        capability::check(cap, "volume_capability")?;
        let claim = self
            .claim_of(&req.volume_id)
            .await?
            .ok_or_else(|| CsiError::NotFound {
                what: "volume",
                id: req.volume_id.clone(),
            })?;
        let claim_name = claim.metadata.name.clone().unwrap_or_default();
        let name = Self::attachment_name(&claim_name, &req.node_id);
        let obj: DynamicObject = serde_json::from_value(json!({
            "apiVersion": format!("{GROUP}/{VERSION}"),
            "kind": "HostVolumeAttachment",
            "metadata": {"name": name, "labels": {CLUSTER_LABEL: self.sv.cluster}},
            "spec": {"claim": claim_name, "host": req.node_id},
        }))
        .map_err(|e| CsiError::invalid("node_id", e.to_string()))?;
        match self.attachments.create(&PostParams::default(), &obj).await {
            Ok(_) => {}
            Err(e) if is_code(&e, 409) => {}
            Err(e) => return Err(refusal("creating the attachment", e)),
        }
        let api = self.attachments.clone();
        let verdict = self
            .until("attached the volume", || {
                let (api, name) = (api.clone(), name.clone());
                async move {
                    let a = api
                        .get(&name)
                        .await
                        .map_err(sv_err(format!("reading attachment {name}")))?;
                    let status = a.data.get("status").cloned().unwrap_or(Value::Null);
                    if status["attached"] == true {
                        let ctx: HashMap<String, String> =
                            serde_json::from_value(status["attachmentMetadata"].clone())
                                .unwrap_or_default();
                        return Ok(Some(Ok(ctx)));
                    }
                    Ok(status["error"].as_str().map(|e| Err(e.to_owned())))
                }
            })
            .await?;
        match verdict {
            Ok(ctx) => {
                tracing::info!(volume = %req.volume_id, node = %req.node_id, "published");
                Ok(ctx)
            }
            Err(why) => {
                // Nothing half-made: the refused attachment goes.
                let _ = self
                    .attachments
                    .delete(&name, &DeleteParams::default())
                    .await;
                if why.contains("not found") {
                    Err(CsiError::NotFound {
                        what: "node",
                        id: req.node_id,
                    })
                } else {
                    Err(CsiError::FailedPrecondition(why))
                }
            }
        }
    }

    async fn unpublish(&self, req: ControllerUnpublishVolumeRequest) -> Result<(), CsiError> {
        check_name("volume_id", &req.volume_id)?;
        let Some(claim) = self.claim_of(&req.volume_id).await? else {
            return Ok(());
        };
        let claim_name = claim.metadata.name.clone().unwrap_or_default();
        let all: Vec<String> = self
            .attachments
            .list(&ListParams::default().labels(&format!("{CLUSTER_LABEL}={}", self.sv.cluster)))
            .await
            .map_err(sv_err("listing attachments"))?
            .items
            .into_iter()
            .filter(|a| {
                a.data["spec"]["claim"] == claim_name.as_str()
                    && (req.node_id.is_empty() || a.data["spec"]["host"] == req.node_id.as_str())
            })
            .filter_map(|a| a.metadata.name)
            .collect();
        for name in &all {
            match self
                .attachments
                .delete(name, &DeleteParams::default())
                .await
            {
                Ok(_) => {}
                Err(e) if is_code(&e, 404) => {}
                Err(e) => return Err(sv_err(format!("deleting attachment {name}"))(e)),
            }
        }
        let api = self.attachments.clone();
        for name in all {
            self.until("detached the volume", || {
                let (api, name) = (api.clone(), name.clone());
                async move {
                    match api.get_opt(&name).await {
                        Ok(None) => Ok(Some(())),
                        Ok(Some(_)) => Ok(None),
                        Err(e) => Err(sv_err(format!("reading attachment {name}"))(e)),
                    }
                }
            })
            .await?;
        }
        tracing::info!(volume = %req.volume_id, node = %req.node_id, "unpublished");
        Ok(())
    }

    async fn expand(
        &self,
        req: ControllerExpandVolumeRequest,
    ) -> Result<ControllerExpandVolumeResponse, CsiError> {
        check_name("volume_id", &req.volume_id)?;
        let range = req
            .capacity_range
            .as_ref()
            .ok_or_else(|| CsiError::invalid("capacity_range", "is required"))?;
        let size = size_for(Some(range), 0)?;
        let block = match &req.volume_capability {
            Some(c) => capability::check(c, "volume_capability")? == capability::Access::Block,
            None => false,
        };
        let claim = self
            .claim_of(&req.volume_id)
            .await?
            .ok_or_else(|| CsiError::NotFound {
                what: "volume",
                id: req.volume_id.clone(),
            })?;
        let name = claim.metadata.name.clone().unwrap_or_default();
        if requested(&claim).is_none_or(|r| r < size) {
            self.claims
                .patch(
                    &name,
                    &PatchParams::default(),
                    &Patch::Merge(
                        json!({"spec": {"resources": {"requests": {"storage": size.to_string()}}}}),
                    ),
                )
                .await
                .map_err(|e| match refusal("growing the claim", e) {
                    CsiError::ResourceExhausted(m) => CsiError::OutOfRange(m),
                    other => other,
                })?;
        }
        let claims = self.claims.clone();
        let grown = self
            .until("grown the volume", || {
                let (claims, name) = (claims.clone(), name.clone());
                async move {
                    let c = claims
                        .get(&name)
                        .await
                        .map_err(sv_err(format!("reading claim {name}")))?;
                    Ok(bound_size(&c).filter(|s| *s >= size))
                }
            })
            .await?;
        Ok(ControllerExpandVolumeResponse {
            capacity_bytes: to_i64(grown),
            node_expansion_required: !block,
        })
    }
}

#[tonic::async_trait]
impl Controller for ParavirtualController {
    async fn create_volume(
        &self,
        req: Request<CreateVolumeRequest>,
    ) -> Result<Response<CreateVolumeResponse>, Status> {
        let volume = self.create(req.into_inner()).await?;
        Ok(Response::new(CreateVolumeResponse {
            volume: Some(volume),
        }))
    }

    async fn delete_volume(
        &self,
        req: Request<DeleteVolumeRequest>,
    ) -> Result<Response<DeleteVolumeResponse>, Status> {
        self.delete(&req.into_inner().volume_id).await?;
        Ok(Response::new(DeleteVolumeResponse {}))
    }

    async fn controller_publish_volume(
        &self,
        req: Request<ControllerPublishVolumeRequest>,
    ) -> Result<Response<ControllerPublishVolumeResponse>, Status> {
        let publish_context = self.publish(req.into_inner()).await?;
        Ok(Response::new(ControllerPublishVolumeResponse {
            publish_context,
        }))
    }

    async fn controller_unpublish_volume(
        &self,
        req: Request<ControllerUnpublishVolumeRequest>,
    ) -> Result<Response<ControllerUnpublishVolumeResponse>, Status> {
        self.unpublish(req.into_inner()).await?;
        Ok(Response::new(ControllerUnpublishVolumeResponse {}))
    }

    async fn validate_volume_capabilities(
        &self,
        req: Request<ValidateVolumeCapabilitiesRequest>,
    ) -> Result<Response<ValidateVolumeCapabilitiesResponse>, Status> {
        let req = req.into_inner();
        check_name("volume_id", &req.volume_id)?;
        if req.volume_capabilities.is_empty() {
            return Err(CsiError::invalid(
                "volume_capabilities",
                "at least one capability is required",
            )
            .into());
        }
        if self.claim_of(&req.volume_id).await?.is_none() {
            return Err(CsiError::NotFound {
                what: "volume",
                id: req.volume_id,
            }
            .into());
        }
        let bad = req
            .volume_capabilities
            .iter()
            .find_map(|c| capability::check(c, "volume_capabilities").err())
            .map(Err)
            .unwrap_or_else(|| check_parameters(&req.parameters, &[SV_STORAGE_CLASS]));
        Ok(Response::new(match bad {
            Ok(()) => ValidateVolumeCapabilitiesResponse {
                confirmed: Some(validate_volume_capabilities_response::Confirmed {
                    volume_context: req.volume_context,
                    volume_capabilities: req.volume_capabilities,
                    parameters: req.parameters,
                }),
                message: String::new(),
            },
            Err(e) => ValidateVolumeCapabilitiesResponse {
                confirmed: None,
                message: e.to_string(),
            },
        }))
    }

    async fn list_volumes(
        &self,
        req: Request<ListVolumesRequest>,
    ) -> Result<Response<ListVolumesResponse>, Status> {
        let req = req.into_inner();
        let mut vols: Vec<Volume> = self
            .cluster_claims()
            .await?
            .iter()
            .filter_map(|c| self.volume_msg(c, bound_size(c)?))
            .collect();
        vols.sort_by(|x, y| x.volume_id.cmp(&y.volume_id));
        let (vols, next_token) = page(vols, req.max_entries, &req.starting_token)?;
        Ok(Response::new(ListVolumesResponse {
            entries: vols
                .into_iter()
                .map(|v| list_volumes_response::Entry {
                    volume: Some(v),
                    status: None,
                })
                .collect(),
            next_token,
        }))
    }

    async fn get_capacity(
        &self,
        _req: Request<GetCapacityRequest>,
    ) -> Result<Response<GetCapacityResponse>, Status> {
        Err(CsiError::Unimplemented("GetCapacity (the supervisor owns the pools)").into())
    }

    async fn controller_get_capabilities(
        &self,
        _req: Request<ControllerGetCapabilitiesRequest>,
    ) -> Result<Response<ControllerGetCapabilitiesResponse>, Status> {
        let caps = [
            rpc::Type::CreateDeleteVolume,
            rpc::Type::PublishUnpublishVolume,
            rpc::Type::ListVolumes,
            rpc::Type::CloneVolume,
            rpc::Type::ExpandVolume,
            rpc::Type::GetVolume,
            rpc::Type::CreateDeleteSnapshot,
            rpc::Type::ListSnapshots,
        ];
        Ok(Response::new(ControllerGetCapabilitiesResponse {
            capabilities: caps.into_iter().map(rpc_cap).collect(),
        }))
    }

    async fn create_snapshot(
        &self,
        req: Request<CreateSnapshotRequest>,
    ) -> Result<Response<CreateSnapshotResponse>, Status> {
        let snapshot = self.create_snapshot(req.into_inner()).await?;
        Ok(Response::new(CreateSnapshotResponse {
            snapshot: Some(snapshot),
        }))
    }

    async fn delete_snapshot(
        &self,
        req: Request<DeleteSnapshotRequest>,
    ) -> Result<Response<DeleteSnapshotResponse>, Status> {
        self.delete_snapshot(&req.into_inner().snapshot_id).await?;
        Ok(Response::new(DeleteSnapshotResponse {}))
    }

    async fn list_snapshots(
        &self,
        req: Request<ListSnapshotsRequest>,
    ) -> Result<Response<ListSnapshotsResponse>, Status> {
        Ok(Response::new(self.list_snapshots(req.into_inner()).await?))
    }

    async fn controller_expand_volume(
        &self,
        req: Request<ControllerExpandVolumeRequest>,
    ) -> Result<Response<ControllerExpandVolumeResponse>, Status> {
        Ok(Response::new(self.expand(req.into_inner()).await?))
    }

    async fn controller_get_volume(
        &self,
        req: Request<ControllerGetVolumeRequest>,
    ) -> Result<Response<ControllerGetVolumeResponse>, Status> {
        let id = req.into_inner().volume_id;
        check_name("volume_id", &id)?;
        let found = self
            .claim_of(&id)
            .await?
            .and_then(|c| self.volume_msg(&c, bound_size(&c)?));
        let Some(volume) = found else {
            return Err(CsiError::NotFound { what: "volume", id }.into());
        };
        Ok(Response::new(ControllerGetVolumeResponse {
            volume: Some(volume),
            status: None,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_zone_comes_from_preferred_then_requisite() {
        let topo = |z: &str| Topology {
            segments: HashMap::from([(ZONE_KEY.to_owned(), z.to_owned())]),
        };
        let req = TopologyRequirement {
            requisite: vec![topo("b")],
            preferred: vec![topo("a")],
        };
        assert_eq!(wanted_zone(Some(&req)).as_deref(), Some("a"));
        let req = TopologyRequirement {
            requisite: vec![topo("b")],
            preferred: vec![],
        };
        assert_eq!(wanted_zone(Some(&req)).as_deref(), Some("b"));
        assert_eq!(wanted_zone(None), None);
    }
}
