//! The admitted write: a Cluster's or claim's quota checked and the object written in one
//! store transaction with its namespace's usage record; a growing HostClass re-checked against
//! its users' namespaces; classes in use kept from deletion.

use std::collections::BTreeMap;

use serde_json::Value;

use super::{Classes, decode, get_typed, rt};
use crate::api::core::{Namespace, PersistentVolumeClaim};
use crate::api::registry::ResourceType;
use crate::api::slipway::{Cluster, GROUP, HostClass};
use crate::error::ApiError;
use crate::quota::{self, Usage, claim_usage, cluster_pools};
use crate::server::keys;
use crate::store::{AnyStore, Cas, Store, StoreError};

/// The store key of a namespace's usage record: what its counted objects used at the last
/// admitted increase. Every write that increases a namespace's usage replaces this record
/// with compare-and-swap, so two such writes cannot both be admitted against the same usage
/// (kube-apiserver serializes on its ResourceQuota status the same way).
pub fn usage_key(ns: &str) -> String {
    format!("/slipway/quota/{ns}")
}

/// Removes the usage record of a namespace whose objects are gone.
pub async fn forget_namespace(store: &AnyStore, ns: &str) -> Result<(), ApiError> {
    let key = usage_key(ns);
    if let Some(kv) = store.get(&key).await? {
        match store.delete(&key, kv.revision).await {
            // A concurrent delete of the namespace got there first.
            Ok(_) | Err(StoreError::NotFound(_)) | Err(StoreError::Conflict { .. }) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// How a write changes a stored object.
#[derive(Debug, Clone, Copy)]
pub enum Change<'a> {
    /// A new object.
    Create(&'a Value),
    /// A replacement of `old`, stored at `revision`.
    Update {
        /// The stored object.
        old: &'a Value,
        /// The object to store.
        new: &'a Value,
        /// Its revision.
        revision: u64,
    },
}

/// Most attempts of one write when concurrent writers keep winning the usage record.
const MAX_ATTEMPTS: usize = 100;

/// Writes an admitted object. A Cluster or claim that increases its namespace's usage is
/// checked against the limits and written in one store transaction with the namespace's usage
/// record; a HostClass that grows is checked against the limits of every namespace using it,
/// likewise. `extra` steps (a Service's address allocations) go in the same transaction.
/// Refusals are the outer error; the inner result is the store's answer for the object's own
/// key or an `extra` key (a stale revision, an existing name, an address just taken). With
/// `dry_run` nothing is written.
#[expect(
    clippy::too_many_arguments,
    reason = "one transaction's parts; a struct would only rename them"
)]
pub async fn write(
    store: &AnyStore,
    rtype: &ResourceType,
    ns: Option<&str>,
    key: &str,
    change: Change<'_>,
    bytes: Vec<u8>,
    extra: Vec<Cas>,
    dry_run: bool,
) -> Result<Result<u64, StoreError>, ApiError> {
    let step = match change {
        Change::Create(_) => Cas::create(key, bytes),
        Change::Update { revision, .. } => Cas::update(key, bytes, revision),
    };
    for _ in 0..MAX_ATTEMPTS {
        let guards = match (rtype.group, rtype.plural, ns) {
            (GROUP, "clusters", Some(ns)) | ("", "persistentvolumeclaims", Some(ns)) => {
                counted_guards(store, rtype, ns, key, change).await?
            }
            (GROUP, "hostclasses", _) => class_guards(store, change).await?,
            _ => Vec::new(),
        };
        if dry_run {
            return Ok(Ok(0));
        }
        let mut steps = vec![step.clone()];
        steps.extend(extra.iter().cloned());
        steps.extend(guards);
        match store.txn(steps).await {
            Ok(revs) => return Ok(Ok(revs.first().copied().unwrap_or(0))),
            Err(e) if e.refused_key() == Some(key) => return Ok(Err(e)),
            Err(e)
                if extra
                    .iter()
                    .any(|x| Some(x.key.as_str()) == e.refused_key()) =>
            {
                return Ok(Err(e));
            }
            // A concurrent write changed the usage record, a class or the namespace: decide
            // again on what the store holds now.
            Err(e) if e.refused_key().is_some() => {
                tracing::debug!(%key, error = %e, "admission raced a concurrent write; deciding again");
                continue;
            }
            Err(e) => return Err(e.into()),
        }
    }
    Err(ApiError::Conflict {
        resource: rtype.plural.into(),
        name: key.rsplit('/').next().unwrap_or_default().into(),
        stale: None,
    })
}

/// What `obj` (a Cluster or a claim) uses.
async fn usage_of(
    store: &AnyStore,
    rtype: &ResourceType,
    classes: &mut Classes,
    obj: &Value,
) -> Result<Usage, ApiError> {
    if rtype.plural == "clusters" {
        classes.cluster_usage(store, &decode::<Cluster>(obj)?).await
    } else {
        Ok(claim_usage(&decode::<PersistentVolumeClaim>(obj)?))
    }
}

/// The quota check of a Cluster or claim write, and the guards that make it hold at commit.
async fn counted_guards(
    store: &AnyStore,
    rtype: &ResourceType,
    ns: &str,
    key: &str,
    change: Change<'_>,
) -> Result<Vec<Cas>, ApiError> {
    let mut classes = Classes::default();
    let (old, new) = match change {
        Change::Create(new) => (None, new),
        Change::Update { old, new, .. } => (Some(old), new),
    };
    let after = usage_of(store, rtype, &mut classes, new).await?;
    let before = match old {
        Some(o) => usage_of(store, rtype, &mut classes, o).await?,
        None => Usage::default(),
    };
    // A write that increases nothing cannot take a namespace over its limits.
    if !after.grows_from(&before) {
        return Ok(Vec::new());
    }
    let ns_rt = rt("", "v1", "namespaces")?;
    let Some((namespace, ns_rev)) = get_typed::<Namespace>(store, ns_rt, None, ns).await? else {
        return Ok(Vec::new());
    };
    let Some(limits) = namespace.spec.limits else {
        return Ok(Vec::new());
    };
    // The record first: any increase committed after this read changes it, and fails ours.
    let record = store.get(&usage_key(ns)).await?;
    let mut used: Usage = record
        .as_ref()
        .and_then(|kv| serde_json::from_slice(&kv.value).ok())
        .unwrap_or_default();
    let (others, _) = store.list(&keys::prefix(rtype, Some(ns))).await?;
    let mut total = after;
    for kv in others.iter().filter(|kv| kv.key != key) {
        let obj: Value = serde_json::from_slice(&kv.value)
            .map_err(|e| ApiError::Internal(format!("corrupt object {}: {e}", kv.key)))?;
        total += usage_of(store, rtype, &mut classes, &obj).await?;
    }
    let name = meta_name(new);
    if let Some(message) = quota::over_limit(ns, &limits, &total, &before, &after) {
        return Err(ApiError::AdmissionDenied {
            resource: rtype.plural.into(),
            name,
            message,
        });
    }
    if rtype.plural == "clusters" {
        // Each zone's share: the Cluster reconciler places the namespace's clusters over the
        // zones there are; the limits split equally across the zones they use.
        let (zone_objs, _) = store
            .list(&keys::prefix(rt(GROUP, "v1alpha1", "zones")?, None))
            .await?;
        let mut zones: Vec<String> = zone_objs
            .iter()
            .filter_map(|kv| serde_json::from_slice::<Value>(&kv.value).ok())
            .filter_map(|z| z["metadata"]["name"].as_str().map(str::to_owned))
            .collect();
        zones.sort();
        let mut per_zone_before: BTreeMap<String, Usage> = BTreeMap::new();
        for kv in &others {
            let obj: Value = serde_json::from_slice(&kv.value)
                .map_err(|e| ApiError::Internal(format!("corrupt object {}: {e}", kv.key)))?;
            let c = decode::<Cluster>(&obj)?;
            for (zone, u) in classes.zone_usage(store, ns, &c, &zones).await? {
                *per_zone_before.entry(zone).or_default() += u;
            }
        }
        let mut per_zone_after = per_zone_before.clone();
        if let Some(o) = old {
            for (zone, u) in classes
                .zone_usage(store, ns, &decode::<Cluster>(o)?, &zones)
                .await?
            {
                *per_zone_before.entry(zone).or_default() += u;
            }
        }
        for (zone, u) in classes
            .zone_usage(store, ns, &decode::<Cluster>(new)?, &zones)
            .await?
        {
            *per_zone_after.entry(zone).or_default() += u;
        }
        if let Some(message) =
            quota::over_zone_share(ns, &limits, &per_zone_before, &per_zone_after)
        {
            return Err(ApiError::AdmissionDenied {
                resource: rtype.plural.into(),
                name,
                message,
            });
        }
    }
    let mut guards = Vec::new();
    if rtype.plural == "clusters" {
        (used.cpu, used.memory) = (total.cpu, total.memory);
        guards.extend(classes.guards(&decode::<Cluster>(new)?)?);
    } else {
        used.storage = total.storage;
    }
    let record_value = serde_json::to_vec(&used).map_err(|e| ApiError::Internal(e.to_string()))?;
    guards.push(Cas::put(
        &usage_key(ns),
        record_value,
        record.map(|kv| kv.revision),
    ));
    guards.push(Cas::unchanged(&keys::object(ns_rt, None, ns), Some(ns_rev)));
    Ok(guards)
}

fn quantity(q: &Option<crate::api::meta::Quantity>) -> String {
    q.as_ref().map_or_else(|| "0".into(), ToString::to_string)
}

fn meta_name(obj: &Value) -> String {
    obj.pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string()
}

/// A HostClass that grows re-checks the quota of every namespace whose clusters use it, and
/// takes each such namespace's usage record with it so no increase there commits in between.
async fn class_guards(store: &AnyStore, change: Change<'_>) -> Result<Vec<Cas>, ApiError> {
    let Change::Update { old, new, .. } = change else {
        return Ok(Vec::new());
    };
    let (old, new): (HostClass, HostClass) = (decode(old)?, decode(new)?);
    let grown = Usage {
        cpu: f64::from(new.spec.cpus),
        memory: new
            .spec
            .memory
            .as_ref()
            .and_then(|q| q.value())
            .unwrap_or(0.0),
        storage: 0.0,
    };
    let was = Usage {
        cpu: f64::from(old.spec.cpus),
        memory: old
            .spec
            .memory
            .as_ref()
            .and_then(|q| q.value())
            .unwrap_or(0.0),
        storage: 0.0,
    };
    if !grown.grows_from(&was) {
        return Ok(Vec::new());
    }
    let name = new.metadata.name.clone().unwrap_or_default();
    let cl_rt = rt(GROUP, "v1alpha1", "clusters")?;
    let ns_rt = rt("", "v1", "namespaces")?;
    let (all, _) = store.list(&keys::prefix(cl_rt, None)).await?;
    // Namespaces whose clusters use the class, each with all its clusters.
    let mut by_ns: BTreeMap<String, Vec<Cluster>> = BTreeMap::new();
    for kv in &all {
        let c: Cluster = serde_json::from_slice(&kv.value)
            .map_err(|e| ApiError::Internal(format!("corrupt object {}: {e}", kv.key)))?;
        let ns = c.metadata.namespace.clone().unwrap_or_default();
        by_ns.entry(ns).or_default().push(c);
    }
    let mut classes = Classes::default();
    classes.0.insert(name.clone(), Some((new.spec.clone(), 0)));
    let mut guards = Vec::new();
    for (ns, clusters) in by_ns {
        let uses = |c: &Cluster| cluster_pools(c).iter().any(|p| p.2 == name);
        if !clusters.iter().any(uses) {
            continue;
        }
        let Some((namespace, ns_rev)) = get_typed::<Namespace>(store, ns_rt, None, &ns).await?
        else {
            continue;
        };
        let record = store.get(&usage_key(&ns)).await?;
        let mut total = Usage::default();
        for c in &clusters {
            total += classes.cluster_usage(store, c).await?;
        }
        if let Some(limits) = &namespace.spec.limits
            && let Some(message) = quota::over_limit(&ns, limits, &total, &was, &grown)
        {
            return Err(ApiError::AdmissionDenied {
                resource: "hostclasses".into(),
                message: format!(
                    "growing HostClass {name:?} (cpus {} → {}, memory {} → {}) would exceed the quota of a namespace using it: {message}",
                    old.spec.cpus,
                    new.spec.cpus,
                    quantity(&old.spec.memory),
                    quantity(&new.spec.memory),
                ),
                name,
            });
        }
        let mut used: Usage = record
            .as_ref()
            .and_then(|kv| serde_json::from_slice(&kv.value).ok())
            .unwrap_or_default();
        (used.cpu, used.memory) = (total.cpu, total.memory);
        let value = serde_json::to_vec(&used).map_err(|e| ApiError::Internal(e.to_string()))?;
        guards.push(Cas::put(
            &usage_key(&ns),
            value,
            record.map(|kv| kv.revision),
        ));
        guards.push(Cas::unchanged(
            &keys::object(ns_rt, None, &ns),
            Some(ns_rev),
        ));
    }
    Ok(guards)
}

/// Refuses deleting a HostClass or StorageClass that objects still use, naming them; returns
/// guards for the delete that fail if a user appeared since (empty for other kinds).
pub async fn deletable(
    store: &AnyStore,
    rtype: &ResourceType,
    name: &str,
) -> Result<Vec<Cas>, ApiError> {
    let (hosts, storage) = match (rtype.group, rtype.plural) {
        (GROUP, "hostclasses") => (true, false),
        ("storage.k8s.io", "storageclasses") => (false, true),
        _ => return Ok(Vec::new()),
    };
    let mut users = Vec::new();
    let mut guards = Vec::new();
    let cl_rt = rt(GROUP, "v1alpha1", "clusters")?;
    let (clusters, rev) = store.list(&keys::prefix(cl_rt, None)).await?;
    guards.push(Cas::prefix_unchanged(&keys::prefix(cl_rt, None), rev));
    for kv in &clusters {
        let c: Cluster = serde_json::from_slice(&kv.value)
            .map_err(|e| ApiError::Internal(format!("corrupt object {}: {e}", kv.key)))?;
        let t = &c.spec.topology;
        let used = if hosts {
            cluster_pools(&c).iter().any(|p| p.2 == name)
        } else {
            t.control_plane.storage_class.as_deref() == Some(name)
                || t.node_pools
                    .iter()
                    .any(|p| p.storage_class.as_deref() == Some(name))
        };
        if used {
            users.push(format!(
                "Cluster {}/{}",
                c.metadata.namespace.unwrap_or_default(),
                c.metadata.name.unwrap_or_default()
            ));
        }
    }
    if storage {
        let pvc_rt = rt("", "v1", "persistentvolumeclaims")?;
        let (claims, rev) = store.list(&keys::prefix(pvc_rt, None)).await?;
        guards.push(Cas::prefix_unchanged(&keys::prefix(pvc_rt, None), rev));
        for kv in &claims {
            let p: PersistentVolumeClaim = serde_json::from_slice(&kv.value)
                .map_err(|e| ApiError::Internal(format!("corrupt object {}: {e}", kv.key)))?;
            if p.spec.storage_class_name.as_deref() == Some(name) {
                users.push(format!(
                    "PersistentVolumeClaim {}/{}",
                    p.metadata.namespace.unwrap_or_default(),
                    p.metadata.name.unwrap_or_default()
                ));
            }
        }
    }
    if users.is_empty() {
        return Ok(guards);
    }
    Err(ApiError::InUse {
        resource: rtype.plural.into(),
        name: name.into(),
        users,
    })
}
