//! The volume reconciler: PersistentVolumeClaims of a StorageClass whose provisioner is
//! `csi.slipway.dev` become volumes in the block store of their zone, each with a bound
//! PersistentVolume (`spec.csi`: driver, volumeHandle, volumeAttributes with the NBD address);
//! claims that grow grow their volume; a claim made from another (`spec.dataSource` kind
//! PersistentVolumeClaim) is a clone of it; a deleted claim takes its volume and PV with it
//! (behind the `slipway.dev/volume` finalizer). HostVolumeAttachments decide each export's
//! allow-list: exactly the hosts attached (their certificates' names), nobody otherwise.
//!
//! Level-triggered: at every claim or attachment event, and every [`PERIOD`], one pass lists
//! the claims, PVs, attachments, Hosts and each block store's volumes and closes the gap. Names
//! are derived (`pvc-<claim uid>`), so a pass killed at any line is finished by the next one.
//! Namespace storage limits and allowed StorageClasses are refused at admission, before a
//! claim exists.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::Duration;

use anyhow::Context as _;
use futures_util::StreamExt as _;
use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim};
use k8s_openapi::api::storage::v1::StorageClass;
use kube::api::{
    Api, ApiResource, DeleteParams, DynamicObject, GroupVersionKind, ListParams, Patch,
    PatchParams, PostParams,
};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::{WatchStreamExt as _, watcher};
use serde_json::{Value, json};
use slipway_api::slipway::{GROUP, VERSION};
use slipway_api::volumes::{
    CTX_NBD, DRIVER, NBD_ADDRESS_ANNOTATION, VOLUME_HANDLE_ANNOTATION, ZONE_ANNOTATION,
    ZONE_TOPOLOGY_KEY,
};
use slipway_blockstore::control::{self, ControlRequest};
use slipway_blockstore::store::VolumeInfo;
use tracing::{info, warn};

use super::volume_plan::{BlockStoreRef, HostFacts, aligned, allow_list, volume_name, zone_for};

mod attachments;
mod snapshots;

/// The finalizer on claims and attachments the reconciler serves.
pub const FINALIZER: &str = "slipway.dev/volume";

/// The label on the PVs the reconciler makes.
pub const MANAGED_BY: &str = "app.kubernetes.io/managed-by";

/// Its value.
pub const MANAGER: &str = "slipway-volumes";

/// Prefix of the hidden snapshot a clone is made from (`<source>@clone.<new volume>`), as the
/// CSI controller names it.
pub const CLONE_PREFIX: &str = "clone.";

/// How often the reconciler looks when nothing changes.
pub const PERIOD: Duration = Duration::from_secs(2);

fn hva_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk(GROUP, VERSION, "HostVolumeAttachment"),
        "hostvolumeattachments",
    )
}

fn host_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk(GROUP, VERSION, "Host"), "hosts")
}

fn is_status(e: &kube::Error, code: u16) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == code)
}

/// Everything one pass reads.
struct World {
    claims: Vec<PersistentVolumeClaim>,
    pvs: BTreeMap<String, PersistentVolume>,
    classes: BTreeMap<String, StorageClass>,
    attachments: Vec<DynamicObject>,
    snapshots: Vec<DynamicObject>,
    hosts: BTreeMap<String, HostFacts>,
    /// Per zone, the block store's volumes and snapshots by name.
    volumes: BTreeMap<String, BTreeMap<String, VolumeInfo>>,
}

/// A claim the reconciler serves, with what it was decided to be.
struct Served<'a> {
    claim: &'a PersistentVolumeClaim,
    ns: String,
    name: String,
    volume: String,
    zone: String,
    size: u64,
}

/// The reconciler, connected.
pub struct VolumeReconciler {
    stores: BTreeMap<String, BlockStoreRef>,
    claims: Api<PersistentVolumeClaim>,
    pvs: Api<PersistentVolume>,
    classes: Api<StorageClass>,
    attachments: Api<DynamicObject>,
    hosts: Api<DynamicObject>,
    client: kube::Client,
}

impl std::fmt::Debug for VolumeReconciler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VolumeReconciler")
            .field("stores", &self.stores)
            .finish_non_exhaustive()
    }
}

impl VolumeReconciler {
    /// A reconciler of `stores` (one per zone) with the identity of `kubeconfig`.
    pub async fn connect(kubeconfig: &Path, stores: Vec<BlockStoreRef>) -> anyhow::Result<Self> {
        let config = Kubeconfig::read_from(kubeconfig)
            .with_context(|| format!("reading {}", kubeconfig.display()))?;
        let config =
            kube::Config::from_custom_kubeconfig(config, &KubeConfigOptions::default()).await?;
        Ok(Self::new(kube::Client::try_from(config)?, stores))
    }

    /// A reconciler of `stores` over `client`.
    pub fn new(client: kube::Client, stores: Vec<BlockStoreRef>) -> Self {
        Self {
            stores: stores.into_iter().map(|s| (s.zone.clone(), s)).collect(),
            claims: Api::all(client.clone()),
            pvs: Api::all(client.clone()),
            classes: Api::all(client.clone()),
            attachments: Api::all_with(client.clone(), &hva_resource()),
            hosts: Api::all_with(client.clone(), &host_resource()),
            client,
        }
    }

    /// Runs until the task is dropped: a pass at every claim or attachment event and every
    /// [`PERIOD`].
    pub async fn run(self) -> anyhow::Result<()> {
        let claims = watcher(self.claims.clone(), watcher::Config::default()).default_backoff();
        let hvas = watcher(self.attachments.clone(), watcher::Config::default()).default_backoff();
        let mut events =
            futures_util::stream::select(claims.map(|_| ()).boxed(), hvas.map(|_| ()).boxed());
        let mut tick = tokio::time::interval(PERIOD);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        info!(zones = ?self.stores.keys().collect::<Vec<_>>(), "volume reconciler starting");
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = events.next() => {}
            }
            if let Err(e) = self.reconcile_all().await {
                warn!(error = %format!("{e:#}"), "volume reconciler pass failed; retrying");
            }
        }
    }

    async fn store_volumes(&self) -> BTreeMap<String, BTreeMap<String, VolumeInfo>> {
        let mut out = BTreeMap::new();
        for (zone, store) in &self.stores {
            match control::call(&store.control, &ControlRequest::List {}).await {
                Ok(resp) => {
                    out.insert(
                        zone.clone(),
                        resp.volumes
                            .into_iter()
                            .map(|v| (v.name.clone(), v))
                            .collect(),
                    );
                }
                // A store that does not answer is left alone this pass (its claims wait).
                Err(e) => warn!(zone = %zone, error = %format!("{e:#}"), "block store unreachable"),
            }
        }
        out
    }

    async fn read(&self) -> anyhow::Result<World> {
        let lp = ListParams::default();
        let hosts = self
            .hosts
            .list(&lp)
            .await
            .context("listing Hosts")?
            .items
            .into_iter()
            .filter_map(|h| {
                let name = h.metadata.name.clone()?;
                let facts = HostFacts {
                    zone: str_at(&h.data, "/spec/zone").to_owned(),
                    cluster_namespace: h
                        .data
                        .pointer("/spec/cluster/namespace")
                        .and_then(Value::as_str)
                        .map(str::to_owned),
                };
                Some((name, facts))
            })
            .collect();
        Ok(World {
            claims: self.claims.list(&lp).await.context("listing claims")?.items,
            pvs: self
                .pvs
                .list(&lp)
                .await
                .context("listing PVs")?
                .items
                .into_iter()
                .filter_map(|p| Some((p.metadata.name.clone()?, p)))
                .collect(),
            classes: self
                .classes
                .list(&lp)
                .await
                .context("listing StorageClasses")?
                .items
                .into_iter()
                .filter_map(|c| Some((c.metadata.name.clone()?, c)))
                .collect(),
            attachments: self
                .attachments
                .list(&lp)
                .await
                .context("listing HostVolumeAttachments")?
                .items,
            snapshots: Api::<DynamicObject>::all_with(
                self.client.clone(),
                &snapshots::snapshot_resource(),
            )
            .list(&lp)
            .await
            .context("listing VolumeSnapshots")?
            .items,
            hosts,
            volumes: self.store_volumes().await,
        })
    }

    /// One pass over every claim, PV and attachment.
    pub async fn reconcile_all(&self) -> anyhow::Result<()> {
        let world = self.read().await?;
        let zones: BTreeSet<String> = self.stores.keys().cloned().collect();
        let mut served = Vec::new();
        // A claim that cannot be released yet (its volume still has clones) holds up neither
        // the others nor the rest of the pass; the pass reports it at the end and is retried.
        let mut unreleased = None;
        for claim in &world.claims {
            let ns = claim.metadata.namespace.clone().unwrap_or_default();
            let name = claim.metadata.name.clone().unwrap_or_default();
            let Some(class) = claim
                .spec
                .as_ref()
                .and_then(|s| s.storage_class_name.as_deref())
                .and_then(|c| world.classes.get(c))
                .filter(|c| c.provisioner == DRIVER)
            else {
                continue;
            };
            let Some(uid) = claim.metadata.uid.clone() else {
                continue;
            };
            let volume = volume_name(&uid);
            if claim.metadata.deletion_timestamp.is_some() {
                if has_finalizer(&claim.metadata)
                    && let Err(e) = self.release(claim, &volume, &world, class).await
                {
                    warn!(claim = %format!("{ns}/{name}"), error = %format!("{e:#}"), "releasing the claim failed; retrying");
                    unreleased.get_or_insert(e);
                }
                continue;
            }
            // Before anything is made: a deletion from now on waits for the teardown.
            if !has_finalizer(&claim.metadata) {
                self.add_claim_finalizer(&ns, &name, &claim.metadata)
                    .await?;
            }
            let existing_zone = world
                .volumes
                .iter()
                .find(|(_, vols)| vols.contains_key(&volume))
                .map(|(z, _)| z.clone());
            let zone = match existing_zone {
                Some(z) => z,
                None => match zone_for(
                    claim.metadata.annotations.as_ref(),
                    class
                        .allowed_topologies
                        .as_ref()
                        .map(|t| {
                            t.iter()
                                .filter_map(|t| serde_json::to_value(t).ok())
                                .collect::<Vec<_>>()
                        })
                        .as_deref(),
                    &zones,
                ) {
                    Ok(z) => z,
                    Err(e) => {
                        self.claim_pending(&ns, &name, "ZoneUnavailable", &e)
                            .await?;
                        continue;
                    }
                },
            };
            let Some(size) = requested(claim) else {
                continue;
            };
            served.push(Served {
                claim,
                ns,
                name,
                volume,
                zone,
                size,
            });
        }
        for s in &served {
            if let Err(e) = self.provision(s, &world).await {
                warn!(claim = %format!("{}/{}", s.ns, s.name), error = %format!("{e:#}"), "provisioning failed");
                self.claim_pending(&s.ns, &s.name, "ProvisioningFailed", &format!("{e:#}"))
                    .await?;
            }
        }
        self.attach_all(&served, &world).await?;
        self.snapshot_all(&served, &world).await;
        self.sweep(&world).await?;
        unreleased.map_or(Ok(()), Err)
    }

    async fn store_call(
        &self,
        zone: &str,
        req: ControlRequest,
    ) -> anyhow::Result<control::ControlResponse> {
        let store = self
            .stores
            .get(zone)
            .with_context(|| format!("no block store in zone {zone:?}"))?;
        control::call(&store.control, &req)
            .await
            .with_context(|| format!("block store of zone {zone:?}: {req:?}"))
    }

    /// Makes (or grows) the claim's volume, its PV, and binds the claim.
    async fn provision(&self, s: &Served<'_>, world: &World) -> anyhow::Result<()> {
        let Some(vols) = world.volumes.get(&s.zone) else {
            return Ok(()); // unreachable this pass
        };
        let current = match vols.get(&s.volume) {
            Some(v) => v.size,
            None => {
                self.make_volume(s, vols, world).await?;
                // Nobody may open it until a host is attached.
                self.store_call(
                    &s.zone,
                    ControlRequest::Authorize {
                        name: s.volume.clone(),
                        clients: allow_list([]),
                    },
                )
                .await?;
                info!(claim = %format!("{}/{}", s.ns, s.name), volume = %s.volume, zone = %s.zone, size = s.size, "volume created");
                s.size
            }
        };
        let size = if s.size > current {
            self.store_call(
                &s.zone,
                ControlRequest::Resize {
                    name: s.volume.clone(),
                    size: s.size,
                },
            )
            .await?;
            info!(volume = %s.volume, from = current, to = s.size, "volume grown");
            s.size
        } else {
            current
        };
        self.ensure_pv(s, size, world).await?;
        self.bind(s, size).await
    }

    async fn make_volume(
        &self,
        s: &Served<'_>,
        vols: &BTreeMap<String, VolumeInfo>,
        world: &World,
    ) -> anyhow::Result<()> {
        let data_source = s.claim.spec.as_ref().and_then(|sp| sp.data_source.as_ref());
        if let Some(d) = data_source.filter(|d| d.kind == "VolumeSnapshot") {
            return self.restore(s, &d.name, vols, world).await;
        }
        let source = data_source.filter(|d| d.kind == "PersistentVolumeClaim");
        let Some(source) = source else {
            self.store_call(
                &s.zone,
                ControlRequest::Create {
                    name: s.volume.clone(),
                    size: s.size,
                },
            )
            .await?;
            return Ok(());
        };
        let src = world
            .claims
            .iter()
            .find(|c| {
                c.metadata.namespace.as_deref() == Some(&s.ns)
                    && c.metadata.name.as_deref() == Some(&source.name)
            })
            .with_context(|| {
                format!(
                    "spec.dataSource: PersistentVolumeClaim {:?} not found",
                    source.name
                )
            })?;
        let src_volume = volume_name(src.metadata.uid.as_deref().unwrap_or_default());
        let src_info = vols.get(&src_volume).with_context(|| {
            format!(
                "spec.dataSource: PersistentVolumeClaim {:?} has no volume in zone {:?}",
                source.name, s.zone
            )
        })?;
        if s.size < src_info.size {
            anyhow::bail!(
                "spec.resources.requests.storage: {} bytes is less than the source claim {:?}'s {} bytes",
                s.size,
                source.name,
                src_info.size
            );
        }
        let hidden = format!("{CLONE_PREFIX}{}", s.volume);
        let snapshot = format!("{src_volume}@{hidden}");
        if !vols.contains_key(&snapshot) {
            self.store_call(
                &s.zone,
                ControlRequest::Snapshot {
                    volume: src_volume.clone(),
                    name: hidden,
                },
            )
            .await?;
        }
        self.store_call(
            &s.zone,
            ControlRequest::Clone {
                snapshot,
                name: s.volume.clone(),
            },
        )
        .await?;
        if s.size > src_info.size {
            self.store_call(
                &s.zone,
                ControlRequest::Resize {
                    name: s.volume.clone(),
                    size: s.size,
                },
            )
            .await?;
        }
        Ok(())
    }

    /// A claim made from VolumeSnapshot `name` (same namespace): a clone of its snapshot.
    async fn restore(
        &self,
        s: &Served<'_>,
        name: &str,
        vols: &BTreeMap<String, VolumeInfo>,
        world: &World,
    ) -> anyhow::Result<()> {
        let vs = world
            .snapshots
            .iter()
            .find(|v| {
                v.metadata.namespace.as_deref() == Some(&s.ns)
                    && v.metadata.name.as_deref() == Some(name)
            })
            .with_context(|| format!("spec.dataSource: VolumeSnapshot {name:?} not found"))?;
        let handle = snapshots::own_handle(vs)
            .filter(|h| vols.contains_key(*h))
            .with_context(|| {
                format!(
                    "spec.dataSource: VolumeSnapshot {name:?} is not ready in zone {:?}",
                    s.zone
                )
            })?;
        let snap_size = vols.get(handle).map_or(0, |v| v.size);
        if s.size < snap_size {
            anyhow::bail!(
                "spec.resources.requests.storage: {} bytes is less than VolumeSnapshot {name:?}'s {snap_size} bytes",
                s.size
            );
        }
        self.store_call(
            &s.zone,
            ControlRequest::Clone {
                snapshot: handle.to_owned(),
                name: s.volume.clone(),
            },
        )
        .await?;
        if s.size > snap_size {
            self.store_call(
                &s.zone,
                ControlRequest::Resize {
                    name: s.volume.clone(),
                    size: s.size,
                },
            )
            .await?;
        }
        Ok(())
    }

    async fn ensure_pv(&self, s: &Served<'_>, size: u64, world: &World) -> anyhow::Result<()> {
        let nbd = self
            .stores
            .get(&s.zone)
            .map(|b| b.nbd.clone())
            .unwrap_or_default();
        let spec = s.claim.spec.clone().unwrap_or_default();
        let class = spec.storage_class_name.clone().unwrap_or_default();
        let reclaim = world
            .classes
            .get(&class)
            .and_then(|c| c.reclaim_policy.clone())
            .unwrap_or_else(|| "Delete".into());
        match world.pvs.get(&s.volume) {
            None => {
                let pv: PersistentVolume = serde_json::from_value(json!({
                    "metadata": {
                        "name": s.volume,
                        "labels": {MANAGED_BY: MANAGER},
                        "annotations": {"pv.kubernetes.io/provisioned-by": DRIVER},
                    },
                    "spec": {
                        "capacity": {"storage": size.to_string()},
                        "accessModes": spec.access_modes.clone().unwrap_or_default(),
                        "volumeMode": spec.volume_mode.clone().unwrap_or_else(|| "Filesystem".into()),
                        "persistentVolumeReclaimPolicy": reclaim,
                        "storageClassName": class,
                        "claimRef": {
                            "kind": "PersistentVolumeClaim",
                            "apiVersion": "v1",
                            "namespace": s.ns,
                            "name": s.name,
                            "uid": s.claim.metadata.uid,
                        },
                        "csi": {
                            "driver": DRIVER,
                            "volumeHandle": s.volume,
                            "volumeAttributes": {CTX_NBD: nbd},
                        },
                        "nodeAffinity": {"required": {"nodeSelectorTerms": [{
                            "matchExpressions": [{"key": ZONE_TOPOLOGY_KEY, "operator": "In", "values": [s.zone]}]
                        }]}},
                    },
                }))?;
                match self.pvs.create(&PostParams::default(), &pv).await {
                    Ok(_) => {}
                    Err(e) if is_status(&e, 409) => {}
                    Err(e) => return Err(e).context("creating the PV"),
                }
                self.pvs
                    .patch_status(
                        &s.volume,
                        &PatchParams::default(),
                        &Patch::Merge(json!({"status": {"phase": "Bound"}})),
                    )
                    .await
                    .context("writing the PV's status")?;
            }
            Some(pv) => {
                let have = pv
                    .spec
                    .as_ref()
                    .and_then(|s| s.capacity.as_ref())
                    .and_then(|c| c.get("storage"))
                    .map(|q| q.0.clone());
                if have.as_deref() != Some(size.to_string().as_str()) {
                    self.pvs
                        .patch(
                            &s.volume,
                            &PatchParams::default(),
                            &Patch::Merge(
                                json!({"spec": {"capacity": {"storage": size.to_string()}}}),
                            ),
                        )
                        .await
                        .context("growing the PV")?;
                }
                if pv.status.as_ref().and_then(|s| s.phase.as_deref()) != Some("Bound") {
                    self.pvs
                        .patch_status(
                            &s.volume,
                            &PatchParams::default(),
                            &Patch::Merge(json!({"status": {"phase": "Bound"}})),
                        )
                        .await
                        .context("writing the PV's status")?;
                }
            }
        }
        Ok(())
    }

    async fn bind(&self, s: &Served<'_>, size: u64) -> anyhow::Result<()> {
        let api: Api<PersistentVolumeClaim> = Api::namespaced(self.client.clone(), &s.ns);
        let spec = s.claim.spec.as_ref();
        let nbd = self
            .stores
            .get(&s.zone)
            .map(|b| b.nbd.clone())
            .unwrap_or_default();
        let ann = s.claim.metadata.annotations.clone().unwrap_or_default();
        let noted = ann.get(VOLUME_HANDLE_ANNOTATION) == Some(&s.volume)
            && ann.get(NBD_ADDRESS_ANNOTATION) == Some(&nbd)
            && ann.get(ZONE_ANNOTATION) == Some(&s.zone);
        if spec.and_then(|sp| sp.volume_name.as_deref()) != Some(s.volume.as_str()) || !noted {
            api.patch(
                &s.name,
                &PatchParams::default(),
                &Patch::Merge(json!({
                    "metadata": {"annotations": {
                        VOLUME_HANDLE_ANNOTATION: s.volume,
                        NBD_ADDRESS_ANNOTATION: nbd,
                        ZONE_ANNOTATION: s.zone,
                    }},
                    "spec": {"volumeName": s.volume},
                })),
            )
            .await
            .context("binding the claim")?;
        }
        let status = s.claim.status.as_ref();
        let capacity = status
            .and_then(|st| st.capacity.as_ref())
            .and_then(|c| c.get("storage"))
            .map(|q| q.0.clone());
        let phase = status.and_then(|st| st.phase.as_deref());
        if phase != Some("Bound") || capacity.as_deref() != Some(size.to_string().as_str()) {
            api.patch_status(
                &s.name,
                &PatchParams::default(),
                &Patch::Merge(json!({"status": {
                    "phase": "Bound",
                    "accessModes": spec.and_then(|sp| sp.access_modes.clone()),
                    "capacity": {"storage": size.to_string()},
                    "conditions": null,
                }})),
            )
            .await
            .context("writing the claim's status")?;
            info!(claim = %format!("{}/{}", s.ns, s.name), volume = %s.volume, size, "claim bound");
        }
        Ok(())
    }

    async fn claim_pending(
        &self,
        ns: &str,
        name: &str,
        reason: &str,
        message: &str,
    ) -> anyhow::Result<()> {
        let api: Api<PersistentVolumeClaim> = Api::namespaced(self.client.clone(), ns);
        let patch = json!({"status": {"phase": "Pending", "conditions": [{
            "type": "Provisioned", "status": "False", "reason": reason, "message": message,
        }]}});
        match api
            .patch_status(name, &PatchParams::default(), &Patch::Merge(patch))
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if is_status(&e, 404) => Ok(()),
            Err(e) => Err(e).context("writing the claim's status"),
        }
    }

    async fn add_claim_finalizer(
        &self,
        ns: &str,
        name: &str,
        meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
    ) -> anyhow::Result<()> {
        let mut f = meta.finalizers.clone().unwrap_or_default();
        f.push(FINALIZER.to_owned());
        let api: Api<PersistentVolumeClaim> = Api::namespaced(self.client.clone(), ns);
        api.patch(
            name,
            &PatchParams::default(),
            &Patch::Merge(
                json!({"metadata": {"finalizers": f, "resourceVersion": meta.resource_version}}),
            ),
        )
        .await
        .context("adding the claim's finalizer")?;
        Ok(())
    }

    /// A deleted claim: its volume (reclaim policy Delete) and PV go, then the claim.
    async fn release(
        &self,
        claim: &PersistentVolumeClaim,
        volume: &str,
        world: &World,
        class: &StorageClass,
    ) -> anyhow::Result<()> {
        let delete = class.reclaim_policy.as_deref().unwrap_or("Delete") == "Delete";
        if delete {
            self.delete_volume(volume, world).await?;
            match self.pvs.delete(volume, &DeleteParams::default()).await {
                Ok(_) => {}
                Err(e) if is_status(&e, 404) => {}
                Err(e) => return Err(e).context("deleting the PV"),
            }
        }
        let ns = claim.metadata.namespace.clone().unwrap_or_default();
        let name = claim.metadata.name.clone().unwrap_or_default();
        let rest: Vec<String> = claim
            .metadata
            .finalizers
            .iter()
            .flatten()
            .filter(|f| *f != FINALIZER)
            .cloned()
            .collect();
        let api: Api<PersistentVolumeClaim> = Api::namespaced(self.client.clone(), &ns);
        match api
            .patch(
                &name,
                &PatchParams::default(),
                &Patch::Merge(json!({"metadata": {"finalizers": rest}})),
            )
            .await
        {
            Ok(_) => {}
            Err(e) if is_status(&e, 404) => {}
            Err(e) => return Err(e).context("removing the claim's finalizer"),
        }
        info!(claim = %format!("{ns}/{name}"), volume, deleted = delete, "claim released");
        Ok(())
    }

    /// Deletes a volume (and, for a clone, the hidden snapshot it was made from) wherever it is.
    async fn delete_volume(&self, volume: &str, world: &World) -> anyhow::Result<()> {
        for (zone, vols) in &world.volumes {
            let Some(v) = vols.get(volume) else { continue };
            self.store_call(
                zone,
                ControlRequest::Delete {
                    name: volume.to_owned(),
                    cascade: false,
                },
            )
            .await?;
            if let Some(origin) = &v.origin
                && origin.ends_with(&format!("@{CLONE_PREFIX}{volume}"))
                && vols.contains_key(origin)
            {
                self.store_call(
                    zone,
                    ControlRequest::Delete {
                        name: origin.clone(),
                        cascade: false,
                    },
                )
                .await?;
            }
            info!(volume, zone = %zone, "volume deleted");
        }
        Ok(())
    }

    /// What a crash left: PVs of this reconciler whose claim is gone, and block store volumes
    /// named for claims that no longer exist and that no PV holds.
    async fn sweep(&self, world: &World) -> anyhow::Result<()> {
        let uids: BTreeSet<String> = world
            .claims
            .iter()
            .filter_map(|c| c.metadata.uid.clone())
            .collect();
        let mut failed = None;
        for (name, pv) in &world.pvs {
            let ours = pv
                .metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(MANAGED_BY))
                .is_some_and(|m| m == MANAGER);
            let claim_uid = pv
                .spec
                .as_ref()
                .and_then(|s| s.claim_ref.as_ref())
                .and_then(|r| r.uid.clone())
                .unwrap_or_default();
            if !ours || uids.contains(&claim_uid) {
                continue;
            }
            let reclaim = pv
                .spec
                .as_ref()
                .and_then(|s| s.persistent_volume_reclaim_policy.as_deref())
                .unwrap_or("Delete");
            if reclaim != "Delete" {
                continue;
            }
            info!(pv = %name, "removing a PV whose claim is gone");
            // A volume with clones waits for them; the others go on.
            if let Err(e) = self.delete_volume(name, world).await {
                failed.get_or_insert(e);
                continue;
            }
            match self.pvs.delete(name, &DeleteParams::default()).await {
                Ok(_) => {}
                Err(e) if is_status(&e, 404) => {}
                Err(e) => return Err(e).context("deleting an orphaned PV"),
            }
        }
        for vols in world.volumes.values() {
            for (name, v) in vols {
                let Some(uid) = name.strip_prefix("pvc-") else {
                    continue;
                };
                if v.kind == "snapshot" || uids.contains(uid) || world.pvs.contains_key(name) {
                    continue;
                }
                info!(volume = %name, "removing a volume whose claim is gone");
                if let Err(e) = self.delete_volume(name, world).await {
                    failed.get_or_insert(e);
                }
            }
        }
        failed.map_or(Ok(()), Err)
    }
}

fn has_finalizer(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> bool {
    meta.finalizers.iter().flatten().any(|f| f == FINALIZER)
}

fn str_at<'a>(v: &'a Value, pointer: &str) -> &'a str {
    v.pointer(pointer)
        .and_then(Value::as_str)
        .unwrap_or_default()
}

/// The claim's `requests.storage` in whole blocks.
fn requested(claim: &PersistentVolumeClaim) -> Option<u64> {
    let q = claim
        .spec
        .as_ref()?
        .resources
        .as_ref()?
        .requests
        .as_ref()?
        .get("storage")?;
    aligned(slipway_api::meta::parse_quantity(&q.0)?)
}
