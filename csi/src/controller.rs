//! The CSI Controller service over a [`VolumeBackend`]: create, delete, list, capacity,
//! snapshots, clones and expansion, each idempotent (CSI spec, "Controller Service RPC").
//!
//! Decisions are taken from what the backend lists, never from a memo or from error strings:
//! a repeated request finds its object and answers as the first one did.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use tonic::{Request, Response, Status};

use crate::backend::{BackendVolume, VolumeBackend};
use crate::capability;
use crate::error::CsiError;
use crate::identity::ZONE_KEY;
use crate::proto::controller_server::Controller;
use crate::proto::controller_service_capability::{self, rpc};
use crate::proto::volume_content_source::{self, SnapshotSource, VolumeSource};
use crate::proto::*;

/// Size of a volume when the request gives no capacity range.
pub const DEFAULT_SIZE: u64 = 1 << 30;
/// Volumes are sized in whole 4 KiB blocks (the filesystem block size).
pub const ALIGN: u64 = 4096;
/// Prefix of the hidden snapshot a volume clone is made from (`source@clone.<new volume>`).
pub const CLONE_PREFIX: &str = "clone.";
/// Longest CSI volume or snapshot name: the store allows 64 and a clone's hidden snapshot
/// adds [`CLONE_PREFIX`].
pub const MAX_NAME: usize = 64 - CLONE_PREFIX.len();
/// Volume context key: where the node plugin reaches the NBD export.
pub const CTX_NBD: &str = slipway_api::volumes::CTX_NBD;
/// Parameter prefix the Kubernetes sidecars add (PVC name and namespace); accepted, unused.
const SIDECAR_PREFIX: &str = "csi.storage.k8s.io/";

/// Settings of the controller.
#[derive(Debug, Clone)]
pub struct ControllerConfig {
    /// Where nodes reach the NBD exports (`unix:/path` or `tcp:host:port`).
    pub nbd_address: String,
    /// The zone of the block store.
    pub zone: String,
    /// Pool size in bytes: volume sizes may add up to this much. None: no accounting, and
    /// `GET_CAPACITY` is not advertised.
    pub capacity: Option<u64>,
}

/// The Controller service.
#[derive(Debug)]
pub struct ControllerService<B> {
    backend: B,
    cfg: ControllerConfig,
    inflight: Arc<Mutex<HashSet<String>>>,
}

/// Marks a name busy until dropped (CSI spec: concurrent operations on one volume get ABORTED).
#[derive(Debug)]
struct Busy {
    set: Arc<Mutex<HashSet<String>>>,
    keys: Vec<String>,
}

impl Drop for Busy {
    fn drop(&mut self) {
        let mut set = self.set.lock().unwrap_or_else(|p| p.into_inner());
        for k in &self.keys {
            set.remove(k);
        }
    }
}

/// Refuses parameters other than `known` and the Kubernetes sidecars' (PVC name and namespace),
/// naming the first unknown one.
pub fn check_parameters(params: &HashMap<String, String>, known: &[&str]) -> Result<(), CsiError> {
    match params
        .keys()
        .find(|k| !k.starts_with(SIDECAR_PREFIX) && !known.contains(&k.as_str()))
    {
        Some(k) => Err(CsiError::invalid(
            "parameters",
            if known.is_empty() {
                format!("unknown parameter {k:?} (this driver takes none)")
            } else {
                format!("unknown parameter {k:?} (this driver takes {known:?})")
            },
        )),
        None => Ok(()),
    }
}

/// Checks a CSI name or ID that becomes a block store name.
pub fn check_name(field: &'static str, name: &str) -> Result<(), CsiError> {
    if name.is_empty() {
        return Err(CsiError::invalid(field, "must not be empty"));
    }
    if name.len() > MAX_NAME {
        return Err(CsiError::invalid(
            field,
            format!("{name:?} is longer than {MAX_NAME} characters"),
        ));
    }
    slipway_blockstore::store::validate_name(name)
        .map_err(|e| CsiError::invalid(field, e.to_string()))
}

/// The size to create for `range`: `required_bytes` rounded up to [`ALIGN`] (or the default),
/// within `limit_bytes`.
pub fn size_for(range: Option<&CapacityRange>, default: u64) -> Result<u64, CsiError> {
    let Some(r) = range else { return Ok(default) };
    if r.required_bytes < 0 {
        return Err(CsiError::invalid(
            "capacity_range.required_bytes",
            "must not be negative",
        ));
    }
    if r.limit_bytes < 0 {
        return Err(CsiError::invalid(
            "capacity_range.limit_bytes",
            "must not be negative",
        ));
    }
    let (req, limit) = (r.required_bytes as u64, r.limit_bytes as u64);
    if limit != 0 && limit < req {
        return Err(CsiError::invalid(
            "capacity_range.limit_bytes",
            format!("{limit} is below required_bytes {req}"),
        ));
    }
    let want = if req == 0 { default.max(ALIGN) } else { req };
    let size = want.div_ceil(ALIGN) * ALIGN;
    let size = if limit != 0 && size > limit {
        // The default may not fit under a small limit: take the largest aligned size that does.
        let down = limit / ALIGN * ALIGN;
        if down >= req.max(1) { down } else { size }
    } else {
        size
    };
    if limit != 0 && size > limit {
        return Err(CsiError::OutOfRange(format!(
            "no size in whole {ALIGN}-byte blocks lies in [{req}, {limit}]"
        )));
    }
    if size > slipway_blockstore::store::MAX_VOLUME_SIZE {
        return Err(CsiError::OutOfRange(format!(
            "{size} bytes is more than the block store's largest volume ({} bytes)",
            slipway_blockstore::store::MAX_VOLUME_SIZE
        )));
    }
    Ok(size)
}

/// Whether an existing size satisfies `range`.
fn fits(size: u64, range: Option<&CapacityRange>) -> bool {
    range.is_none_or(|r| {
        size >= r.required_bytes.max(0) as u64
            && (r.limit_bytes <= 0 || size <= r.limit_bytes as u64)
    })
}

/// Pagination (CSI spec: `starting_token` is opaque; one we did not issue is ABORTED).
pub(crate) fn page<T>(items: Vec<T>, max: i32, token: &str) -> Result<(Vec<T>, String), CsiError> {
    if max < 0 {
        return Err(CsiError::invalid("max_entries", "must not be negative"));
    }
    let start = if token.is_empty() {
        0
    } else {
        token
            .parse::<usize>()
            .ok()
            .filter(|&n| n <= items.len())
            .ok_or_else(|| CsiError::BadToken(token.into()))?
    };
    let end = if max == 0 {
        items.len()
    } else {
        (start + max as usize).min(items.len())
    };
    let next = if end < items.len() {
        end.to_string()
    } else {
        String::new()
    };
    Ok((
        items.into_iter().skip(start).take(end - start).collect(),
        next,
    ))
}

fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// `volume@snap` → (`volume`, `snap`).
fn split_snapshot(id: &str) -> Option<(&str, &str)> {
    id.split_once('@')
}

impl<B: VolumeBackend> ControllerService<B> {
    /// A controller over `backend`.
    pub fn new(backend: B, cfg: ControllerConfig) -> Self {
        Self {
            backend,
            cfg,
            inflight: Arc::default(),
        }
    }

    fn busy(&self, keys: &[&str]) -> Result<Busy, CsiError> {
        let mut set = self.inflight.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(k) = keys.iter().find(|k| set.contains(**k)) {
            return Err(CsiError::Aborted((*k).to_owned()));
        }
        for k in keys {
            set.insert((*k).to_owned());
        }
        Ok(Busy {
            set: Arc::clone(&self.inflight),
            keys: keys.iter().map(|k| (*k).to_owned()).collect(),
        })
    }

    fn topology(&self) -> Vec<Topology> {
        vec![Topology {
            segments: HashMap::from([(ZONE_KEY.to_owned(), self.cfg.zone.clone())]),
        }]
    }

    fn in_zone(&self, t: &Topology) -> bool {
        t.segments.get(ZONE_KEY).is_none_or(|z| *z == self.cfg.zone)
    }

    fn volume_msg(&self, v: &BackendVolume, all: &[BackendVolume]) -> Volume {
        Volume {
            capacity_bytes: to_i64(v.size),
            volume_id: v.name.clone(),
            volume_context: HashMap::from([(CTX_NBD.to_owned(), self.cfg.nbd_address.clone())]),
            content_source: content_source(v, all),
            accessible_topology: self.topology(),
        }
    }

    fn available(&self, all: &[BackendVolume]) -> Option<u64> {
        let used: u64 = all.iter().filter(|v| !v.snapshot).map(|v| v.size).sum();
        self.cfg.capacity.map(|c| c.saturating_sub(used))
    }

    fn check_parameters(params: &HashMap<String, String>) -> Result<(), CsiError> {
        check_parameters(params, &[])
    }

    async fn create_volume(&self, req: CreateVolumeRequest) -> Result<Volume, CsiError> {
        check_name("name", &req.name)?;
        capability::check_all(&req.volume_capabilities, "volume_capabilities")?;
        Self::check_parameters(&req.parameters)?;
        let range = req.capacity_range.as_ref();
        let size = size_for(range, DEFAULT_SIZE)?;
        if let Some(t) = &req.accessibility_requirements
            && !t.requisite.is_empty()
            && !t.requisite.iter().any(|t| self.in_zone(t))
        {
            return Err(CsiError::ResourceExhausted(format!(
                "the block store is in zone {:?}, outside accessibility_requirements.requisite",
                self.cfg.zone
            )));
        }
        // What the volume is made from, as the block store records it in `origin`.
        let source = match req
            .volume_content_source
            .as_ref()
            .and_then(|s| s.r#type.as_ref())
        {
            None => None,
            Some(volume_content_source::Type::Snapshot(s)) => {
                Some(Source::Snapshot(s.snapshot_id.clone()))
            }
            Some(volume_content_source::Type::Volume(v)) => {
                Some(Source::Volume(v.volume_id.clone()))
            }
        };
        let _busy = self.busy(&[&req.name])?;
        let all = self.backend.list().await?;
        if let Some(v) = all.iter().find(|v| v.name == req.name) {
            let want_origin = source.as_ref().map(|s| s.origin(&req.name));
            if v.snapshot || !fits(v.size, range) || v.origin != want_origin {
                return Err(CsiError::AlreadyExists(format!(
                    "volume {:?} exists with other parameters (size {}, source {:?})",
                    v.name, v.size, v.origin
                )));
            }
            return Ok(self.volume_msg(v, &all));
        }
        if let Some(avail) = self.available(&all)
            && size > avail
        {
            return Err(CsiError::ResourceExhausted(format!(
                "{size} bytes asked, {avail} bytes left in the pool"
            )));
        }
        match &source {
            None => self.backend.create(&req.name, size).await?,
            Some(src) => self.create_from(src, &req.name, size, range, &all).await?,
        }
        let all = self.backend.list().await?;
        let v = all
            .iter()
            .find(|v| v.name == req.name)
            .ok_or_else(|| CsiError::Attach {
                volume: req.name.clone(),
                reason: "created but not listed by the block store".into(),
            })?;
        tracing::info!(volume = %v.name, size = v.size, origin = ?v.origin, "volume created");
        Ok(self.volume_msg(v, &all))
    }

    async fn create_from(
        &self,
        src: &Source,
        name: &str,
        size: u64,
        range: Option<&CapacityRange>,
        all: &[BackendVolume],
    ) -> Result<(), CsiError> {
        let (field, id) = match src {
            Source::Snapshot(id) => ("volume_content_source.snapshot.snapshot_id", id),
            Source::Volume(id) => ("volume_content_source.volume.volume_id", id),
        };
        let found = all
            .iter()
            .find(|v| v.name == *id && v.snapshot == matches!(src, Source::Snapshot(_)));
        let Some(from) = found else {
            return Err(CsiError::NotFound {
                what: if matches!(src, Source::Snapshot(_)) {
                    "snapshot"
                } else {
                    "volume"
                },
                id: id.clone(),
            });
        };
        // A clone starts at its source's size and grows to the size asked; it never shrinks.
        if range.is_some_and(|r| r.limit_bytes > 0 && (r.limit_bytes as u64) < from.size) {
            return Err(CsiError::OutOfRange(format!(
                "{field}: source is {} bytes, more than capacity_range.limit_bytes",
                from.size
            )));
        }
        let snapshot = match src {
            Source::Snapshot(id) => id.clone(),
            Source::Volume(id) => {
                let _src_busy = self.busy(&[id])?;
                let hidden = format!("{CLONE_PREFIX}{name}");
                let full = format!("{id}@{hidden}");
                if !all.iter().any(|v| v.name == full) {
                    self.backend.snapshot(id, &hidden).await?;
                }
                full
            }
        };
        self.backend.clone_snapshot(&snapshot, name).await?;
        if size > from.size && range.is_some() {
            self.backend.resize(name, size).await?;
        }
        Ok(())
    }

    async fn delete_volume(&self, id: &str) -> Result<(), CsiError> {
        check_name("volume_id", id)?;
        let _busy = self.busy(&[id])?;
        let all = self.backend.list().await?;
        let Some(v) = all.iter().find(|v| v.name == id && !v.snapshot) else {
            // CSI spec: deleting a volume that does not exist succeeds.
            return Ok(());
        };
        let prefix = format!("{id}@");
        let snaps: Vec<&str> = all
            .iter()
            .filter(|s| s.snapshot && s.name.starts_with(&prefix))
            .map(|s| s.name.as_str())
            .collect();
        if !snaps.is_empty() {
            let clones: Vec<&str> = all
                .iter()
                .filter(|c| !c.snapshot && c.origin.as_deref().is_some_and(|o| snaps.contains(&o)))
                .map(|c| c.name.as_str())
                .collect();
            let user: Vec<&&str> = snaps
                .iter()
                .filter(|s| !s[prefix.len()..].starts_with(CLONE_PREFIX))
                .collect();
            if !user.is_empty() || !clones.is_empty() {
                return Err(CsiError::FailedPrecondition(format!(
                    "volume {id:?} has snapshots {user:?} and clones {clones:?}; delete them first"
                )));
            }
        }
        let origin = v.origin.clone();
        self.backend.delete(id).await?;
        // A volume clone's hidden source snapshot goes with it.
        if let Some(o) = origin
            && split_snapshot(&o).is_some_and(|(_, s)| s == format!("{CLONE_PREFIX}{id}"))
            && all.iter().any(|v| v.name == o)
        {
            self.backend.delete(&o).await?;
        }
        tracing::info!(volume = %id, "volume deleted");
        Ok(())
    }

    async fn create_snapshot(&self, req: CreateSnapshotRequest) -> Result<Snapshot, CsiError> {
        check_name("name", &req.name)?;
        if req.name.starts_with(CLONE_PREFIX) {
            return Err(CsiError::invalid(
                "name",
                format!("names starting with {CLONE_PREFIX:?} are reserved for clones"),
            ));
        }
        check_name("source_volume_id", &req.source_volume_id)?;
        Self::check_parameters(&req.parameters)?;
        let _busy = self.busy(&[&req.source_volume_id])?;
        let all = self.backend.list().await?;
        let suffix = format!("@{}", req.name);
        if let Some(s) = all.iter().find(|s| s.snapshot && s.name.ends_with(&suffix)) {
            if s.origin.as_deref() != Some(req.source_volume_id.as_str()) {
                return Err(CsiError::AlreadyExists(format!(
                    "snapshot {:?} exists for volume {:?}",
                    req.name, s.origin
                )));
            }
            return Ok(snapshot_msg(s));
        }
        if !all
            .iter()
            .any(|v| !v.snapshot && v.name == req.source_volume_id)
        {
            return Err(CsiError::NotFound {
                what: "volume",
                id: req.source_volume_id,
            });
        }
        self.backend
            .snapshot(&req.source_volume_id, &req.name)
            .await?;
        let full = format!("{}{suffix}", req.source_volume_id);
        let all = self.backend.list().await?;
        let s = all
            .iter()
            .find(|s| s.name == full)
            .ok_or_else(|| CsiError::Attach {
                volume: full.clone(),
                reason: "snapshot taken but not listed by the block store".into(),
            })?;
        tracing::info!(snapshot = %full, "snapshot created");
        Ok(snapshot_msg(s))
    }

    async fn delete_snapshot(&self, id: &str) -> Result<(), CsiError> {
        if id.is_empty() {
            return Err(CsiError::invalid("snapshot_id", "must not be empty"));
        }
        let Some((vol, _)) = split_snapshot(id) else {
            // Not an ID this driver issues, so it names no snapshot: deleting it succeeds.
            return Ok(());
        };
        let _busy = self.busy(&[vol])?;
        let all = self.backend.list().await?;
        if !all.iter().any(|s| s.snapshot && s.name == id) {
            return Ok(());
        }
        let clones: Vec<&str> = all
            .iter()
            .filter(|c| c.origin.as_deref() == Some(id) && !c.snapshot)
            .map(|c| c.name.as_str())
            .collect();
        if !clones.is_empty() {
            return Err(CsiError::FailedPrecondition(format!(
                "snapshot {id:?} is the source of volumes {clones:?}; delete them first"
            )));
        }
        self.backend.delete(id).await?;
        tracing::info!(snapshot = %id, "snapshot deleted");
        Ok(())
    }

    async fn expand(
        &self,
        req: ControllerExpandVolumeRequest,
    ) -> Result<ControllerExpandVolumeResponse, CsiError> {
        check_name("volume_id", &req.volume_id)?;
        let Some(range) = req.capacity_range.as_ref() else {
            return Err(CsiError::invalid("capacity_range", "is required"));
        };
        let size = size_for(Some(range), 0)?;
        let block = match &req.volume_capability {
            Some(c) => capability::check(c, "volume_capability")? == capability::Access::Block,
            None => false,
        };
        let _busy = self.busy(&[&req.volume_id])?;
        let all = self.backend.list().await?;
        let Some(v) = all.iter().find(|v| !v.snapshot && v.name == req.volume_id) else {
            return Err(CsiError::NotFound {
                what: "volume",
                id: req.volume_id,
            });
        };
        if range.limit_bytes > 0 && (range.limit_bytes as u64) < v.size {
            return Err(CsiError::OutOfRange(format!(
                "volume is {} bytes, more than capacity_range.limit_bytes {}",
                v.size, range.limit_bytes
            )));
        }
        let mut current = v.size;
        if size > current {
            if let Some(avail) = self.available(&all)
                && size - current > avail
            {
                return Err(CsiError::OutOfRange(format!(
                    "growing by {} bytes, {avail} bytes left in the pool",
                    size - current
                )));
            }
            self.backend.resize(&req.volume_id, size).await?;
            tracing::info!(volume = %req.volume_id, from = current, to = size, "volume expanded");
            current = size;
        }
        Ok(ControllerExpandVolumeResponse {
            capacity_bytes: to_i64(current),
            node_expansion_required: !block,
        })
    }
}

/// The source a volume is created from.
#[derive(Debug)]
enum Source {
    Snapshot(String),
    Volume(String),
}

impl Source {
    /// The `origin` the block store records for volume `name` made from this source.
    fn origin(&self, name: &str) -> String {
        match self {
            Self::Snapshot(id) => id.clone(),
            Self::Volume(id) => format!("{id}@{CLONE_PREFIX}{name}"),
        }
    }
}

/// The content source reported for `v`, read back from its origin.
fn content_source(v: &BackendVolume, _all: &[BackendVolume]) -> Option<VolumeContentSource> {
    let origin = v.origin.as_deref()?;
    let (vol, snap) = split_snapshot(origin)?;
    let ty = if snap == format!("{CLONE_PREFIX}{}", v.name) {
        volume_content_source::Type::Volume(VolumeSource {
            volume_id: vol.to_owned(),
        })
    } else {
        volume_content_source::Type::Snapshot(SnapshotSource {
            snapshot_id: origin.to_owned(),
        })
    };
    Some(VolumeContentSource { r#type: Some(ty) })
}

fn snapshot_msg(s: &BackendVolume) -> Snapshot {
    Snapshot {
        size_bytes: to_i64(s.size),
        snapshot_id: s.name.clone(),
        source_volume_id: s.origin.clone().unwrap_or_default(),
        // The block store records no creation time; see the crate docs.
        creation_time: None,
        // Block store snapshots are complete when taken.
        ready_to_use: true,
    }
}

fn rpc_cap(t: rpc::Type) -> ControllerServiceCapability {
    ControllerServiceCapability {
        r#type: Some(controller_service_capability::Type::Rpc(
            controller_service_capability::Rpc { r#type: t as i32 },
        )),
    }
}

fn healthy() -> VolumeCondition {
    VolumeCondition {
        abnormal: false,
        message: "exported by the block store".into(),
    }
}

#[tonic::async_trait]
impl<B: VolumeBackend> Controller for ControllerService<B> {
    async fn create_volume(
        &self,
        req: Request<CreateVolumeRequest>,
    ) -> Result<Response<CreateVolumeResponse>, Status> {
        let volume = self.create_volume(req.into_inner()).await?;
        Ok(Response::new(CreateVolumeResponse {
            volume: Some(volume),
        }))
    }

    async fn delete_volume(
        &self,
        req: Request<DeleteVolumeRequest>,
    ) -> Result<Response<DeleteVolumeResponse>, Status> {
        self.delete_volume(&req.into_inner().volume_id).await?;
        Ok(Response::new(DeleteVolumeResponse {}))
    }

    async fn controller_publish_volume(
        &self,
        _req: Request<ControllerPublishVolumeRequest>,
    ) -> Result<Response<ControllerPublishVolumeResponse>, Status> {
        Err(CsiError::Unimplemented("ControllerPublishVolume").into())
    }

    async fn controller_unpublish_volume(
        &self,
        _req: Request<ControllerUnpublishVolumeRequest>,
    ) -> Result<Response<ControllerUnpublishVolumeResponse>, Status> {
        Err(CsiError::Unimplemented("ControllerUnpublishVolume").into())
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
        let all = self.backend.list().await?;
        if !all.iter().any(|v| !v.snapshot && v.name == req.volume_id) {
            return Err(CsiError::NotFound {
                what: "volume",
                id: req.volume_id,
            }
            .into());
        }
        let unsupported = req
            .volume_capabilities
            .iter()
            .find_map(|c| capability::check(c, "volume_capabilities").err());
        let checked_params = Self::check_parameters(&req.parameters);
        Ok(Response::new(
            match unsupported.map(Err).unwrap_or(checked_params) {
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
            },
        ))
    }

    async fn list_volumes(
        &self,
        req: Request<ListVolumesRequest>,
    ) -> Result<Response<ListVolumesResponse>, Status> {
        let req = req.into_inner();
        let all = self.backend.list().await?;
        let mut vols: Vec<&BackendVolume> = all.iter().filter(|v| !v.snapshot).collect();
        vols.sort_by(|a, b| a.name.cmp(&b.name));
        let (vols, next_token) = page(vols, req.max_entries, &req.starting_token)?;
        let entries = vols
            .into_iter()
            .map(|v| list_volumes_response::Entry {
                volume: Some(self.volume_msg(v, &all)),
                status: Some(list_volumes_response::VolumeStatus {
                    published_node_ids: vec![],
                    volume_condition: Some(healthy()),
                }),
            })
            .collect();
        Ok(Response::new(ListVolumesResponse {
            entries,
            next_token,
        }))
    }

    async fn get_capacity(
        &self,
        req: Request<GetCapacityRequest>,
    ) -> Result<Response<GetCapacityResponse>, Status> {
        let req = req.into_inner();
        let Some(_) = self.cfg.capacity else {
            return Err(CsiError::Unimplemented("GetCapacity (no --capacity given)").into());
        };
        for c in &req.volume_capabilities {
            capability::check(c, "volume_capabilities")?;
        }
        Self::check_parameters(&req.parameters)?;
        if req
            .accessible_topology
            .as_ref()
            .is_some_and(|t| !self.in_zone(t))
        {
            return Ok(Response::new(GetCapacityResponse {
                available_capacity: 0,
            }));
        }
        let all = self.backend.list().await?;
        Ok(Response::new(GetCapacityResponse {
            available_capacity: to_i64(self.available(&all).unwrap_or(0)),
        }))
    }

    async fn controller_get_capabilities(
        &self,
        _req: Request<ControllerGetCapabilitiesRequest>,
    ) -> Result<Response<ControllerGetCapabilitiesResponse>, Status> {
        let mut caps = vec![
            rpc::Type::CreateDeleteVolume,
            rpc::Type::ListVolumes,
            rpc::Type::CreateDeleteSnapshot,
            rpc::Type::ListSnapshots,
            rpc::Type::CloneVolume,
            rpc::Type::ExpandVolume,
            rpc::Type::VolumeCondition,
            rpc::Type::GetVolume,
        ];
        if self.cfg.capacity.is_some() {
            caps.push(rpc::Type::GetCapacity);
        }
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
        let req = req.into_inner();
        let all = self.backend.list().await?;
        let mut snaps: Vec<&BackendVolume> = all
            .iter()
            .filter(|s| s.snapshot)
            .filter(|s| split_snapshot(&s.name).is_some_and(|(_, n)| !n.starts_with(CLONE_PREFIX)))
            .filter(|s| req.snapshot_id.is_empty() || s.name == req.snapshot_id)
            .filter(|s| {
                req.source_volume_id.is_empty()
                    || s.origin.as_deref() == Some(req.source_volume_id.as_str())
            })
            .collect();
        snaps.sort_by(|a, b| a.name.cmp(&b.name));
        let (snaps, next_token) = page(snaps, req.max_entries, &req.starting_token)?;
        Ok(Response::new(ListSnapshotsResponse {
            entries: snaps
                .into_iter()
                .map(|s| list_snapshots_response::Entry {
                    snapshot: Some(snapshot_msg(s)),
                })
                .collect(),
            next_token,
        }))
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
        let all = self.backend.list().await?;
        let Some(v) = all.iter().find(|v| !v.snapshot && v.name == id) else {
            return Err(CsiError::NotFound { what: "volume", id }.into());
        };
        Ok(Response::new(ControllerGetVolumeResponse {
            volume: Some(self.volume_msg(v, &all)),
            status: Some(controller_get_volume_response::VolumeStatus {
                published_node_ids: vec![],
                volume_condition: Some(healthy()),
            }),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn range(req: i64, limit: i64) -> CapacityRange {
        CapacityRange {
            required_bytes: req,
            limit_bytes: limit,
        }
    }

    #[test]
    fn sizes_round_up_within_the_limit() {
        assert_eq!(size_for(None, DEFAULT_SIZE).ok(), Some(DEFAULT_SIZE));
        assert_eq!(size_for(Some(&range(1, 0)), DEFAULT_SIZE).ok(), Some(ALIGN));
        assert_eq!(
            size_for(Some(&range(0, 8192)), DEFAULT_SIZE).ok(),
            Some(8192)
        );
        assert!(matches!(
            size_for(Some(&range(4097, 5000)), DEFAULT_SIZE),
            Err(CsiError::OutOfRange(_))
        ));
        assert!(matches!(
            size_for(Some(&range(10, 5)), DEFAULT_SIZE),
            Err(CsiError::InvalidArgument {
                field: "capacity_range.limit_bytes",
                ..
            })
        ));
        assert!(matches!(
            size_for(Some(&range(-1, 0)), DEFAULT_SIZE),
            Err(CsiError::InvalidArgument {
                field: "capacity_range.required_bytes",
                ..
            })
        ));
    }

    #[test]
    fn pages_and_refuses_foreign_tokens() {
        let (p, next) = page(vec![1, 2, 3], 2, "").expect("page");
        assert_eq!((p, next.as_str()), (vec![1, 2], "2"));
        let (p, next) = page(vec![1, 2, 3], 2, "2").expect("page");
        assert_eq!((p, next.as_str()), (vec![3], ""));
        assert!(matches!(page(vec![1], 0, "x"), Err(CsiError::BadToken(_))));
        assert!(matches!(page(vec![1], 0, "5"), Err(CsiError::BadToken(_))));
    }

    #[test]
    fn names_are_checked_against_the_store_rules() {
        assert!(check_name("name", "pvc-0b6e1e6c-93c2-4f8e-9d1c-5a8c3c2f1e00").is_ok());
        assert!(matches!(
            check_name("name", &"a".repeat(MAX_NAME + 1)),
            Err(CsiError::InvalidArgument { field: "name", .. })
        ));
        assert!(matches!(
            check_name("volume_id", "a/b"),
            Err(CsiError::InvalidArgument {
                field: "volume_id",
                ..
            })
        ));
    }
}
