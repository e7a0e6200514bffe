//! Admission: the seed's network rules (pod/service CIDR minimum sizes, ingress/egress CIDRs
//! that never overlap), namespace quotas over HostClass sizes, and allowed classes.

use ipnetwork::IpNetwork;
use serde_json::Value;

use crate::api::core::{Namespace, PersistentVolumeClaim};
use crate::api::registry::{ResourceType, lookup};
use crate::api::slipway::{Cluster, HostClass, cidr_fields};
use crate::error::{ApiError, FieldError};
use crate::server::keys;
use crate::store::{AnyStore, Store};

/// Configurable minimum block sizes (a block must be at least this big: prefix <= minimum).
#[derive(Debug, Clone, Copy)]
pub struct AdmissionConfig {
    /// Largest allowed prefix length of a pod CIDR (default /24).
    pub pod_prefix_max: u8,
    /// Largest allowed prefix length of a service CIDR (default /16).
    pub service_prefix_max: u8,
    /// Largest allowed prefix length of an ingress or egress CIDR (default /27).
    pub edge_prefix_max: u8,
}

impl Default for AdmissionConfig {
    fn default() -> Self {
        Self {
            pod_prefix_max: 24,
            service_prefix_max: 16,
            edge_prefix_max: 27,
        }
    }
}

fn overlaps(a: &IpNetwork, b: &IpNetwork) -> bool {
    a.contains(b.network()) || b.contains(a.network())
}

/// Network rules of a Cluster; every violation is reported.
pub fn cluster_network(cfg: &AdmissionConfig, c: &Cluster) -> Vec<FieldError> {
    let mut errs = Vec::new();
    let mut all: Vec<(String, IpNetwork, bool)> = Vec::new();
    for (field, blocks) in cidr_fields(c) {
        let (max, edge) = if field.contains(".pods.") {
            (cfg.pod_prefix_max, false)
        } else if field.contains(".services.") {
            (cfg.service_prefix_max, false)
        } else {
            (cfg.edge_prefix_max, true)
        };
        for (i, b) in blocks.iter().enumerate() {
            let f = format!("{field}[{i}]");
            let Ok(net) = b.parse::<IpNetwork>() else {
                continue;
            };
            if net.prefix() > max {
                errs.push(FieldError::invalid(
                    &f,
                    format!("{b:?}"),
                    format!("must be /{max} or larger"),
                ));
            }
            all.push((f, net, edge));
        }
    }
    for (i, (fa, a, edge_a)) in all.iter().enumerate() {
        for (fb, b, edge_b) in &all[i + 1..] {
            // Ingress/egress blocks must not overlap anything; pods and services must not
            // overlap each other either.
            if (*edge_a || *edge_b || fa.contains(".pods.") != fb.contains(".pods."))
                && overlaps(a, b)
            {
                errs.push(FieldError::invalid(
                    fb.as_str(),
                    format!("{:?}", b.to_string()),
                    format!("overlaps {fa} ({a})"),
                ));
            }
        }
    }
    errs
}

async fn get_typed<T: serde::de::DeserializeOwned>(
    store: &AnyStore,
    rt: &ResourceType,
    ns: Option<&str>,
    name: &str,
) -> Result<Option<T>, ApiError> {
    match store.get(&keys::object(rt, ns, name)).await? {
        Some(kv) => serde_json::from_slice(&kv.value)
            .map(Some)
            .map_err(|e| ApiError::Internal(e.to_string())),
        None => Ok(None),
    }
}

fn rt(group: &str, version: &str, plural: &str) -> Result<&'static ResourceType, ApiError> {
    lookup(group, version, plural)
        .ok_or_else(|| ApiError::Internal(format!("{plural} not registered")))
}

fn allowed(list: &Option<Vec<String>>, name: &str) -> bool {
    list.as_ref().is_none_or(|l| l.iter().any(|x| x == name))
}

/// Usage (cpu cores, memory bytes) of a cluster, from its HostClasses.
async fn cluster_usage(
    store: &AnyStore,
    c: &Cluster,
    errs: &mut Vec<FieldError>,
) -> Result<(f64, f64), ApiError> {
    let hc_rt = rt("slipway.dev", "v1alpha1", "hostclasses")?;
    let t = &c.spec.topology;
    let mut pools: Vec<(String, u32, &str)> = vec![(
        "spec.topology.controlPlane.hostClass".into(),
        t.control_plane.replicas,
        t.control_plane.host_class.as_str(),
    )];
    for (i, p) in t.node_pools.iter().enumerate() {
        pools.push((
            format!("spec.topology.nodePools[{i}].hostClass"),
            p.replicas,
            p.host_class.as_str(),
        ));
    }
    let (mut cpu, mut mem) = (0.0, 0.0);
    for (field, replicas, class) in pools {
        match get_typed::<HostClass>(store, hc_rt, None, class).await? {
            Some(hc) => {
                cpu += f64::from(hc.spec.cpus) * f64::from(replicas);
                mem += hc.spec.memory.and_then(|m| m.value()).unwrap_or(0.0) * f64::from(replicas);
            }
            None => errs.push(FieldError::invalid(
                field,
                format!("{class:?}"),
                "HostClass not found",
            )),
        }
    }
    Ok((cpu, mem))
}

/// Admission of a Cluster: network rules, allowed classes and the namespace quota.
pub async fn admit_cluster(
    store: &AnyStore,
    cfg: &AdmissionConfig,
    ns: &str,
    obj: &Value,
) -> Result<(), ApiError> {
    let c: Cluster =
        serde_json::from_value(obj.clone()).map_err(|e| ApiError::Internal(e.to_string()))?;
    let name = c.metadata.name.clone().unwrap_or_default();
    let mut errs = cluster_network(cfg, &c);
    let namespace = get_typed::<Namespace>(store, rt("", "v1", "namespaces")?, None, ns).await?;
    let spec = namespace.map(|n| n.spec).unwrap_or_default();
    let denied = |message: String| ApiError::AdmissionDenied {
        resource: "clusters".into(),
        name: name.clone(),
        message,
    };
    let t = &c.spec.topology;
    let classes = std::iter::once((
        "spec.topology.controlPlane".to_string(),
        &t.control_plane.host_class,
        &t.control_plane.storage_class,
    ))
    .chain(t.node_pools.iter().enumerate().map(|(i, p)| {
        (
            format!("spec.topology.nodePools[{i}]"),
            &p.host_class,
            &p.storage_class,
        )
    }));
    for (field, hc, sc) in classes {
        if !allowed(&spec.host_classes, hc) {
            return Err(denied(format!(
                "{field}.hostClass: HostClass {hc:?} is not allowed in namespace {ns:?} (spec.hostClasses)"
            )));
        }
        if let Some(sc) = sc
            && !allowed(&spec.storage_classes, sc)
        {
            return Err(denied(format!(
                "{field}.storageClass: StorageClass {sc:?} is not allowed in namespace {ns:?} (spec.storageClasses)"
            )));
        }
    }
    let (mut cpu, mut mem) = cluster_usage(store, &c, &mut errs).await?;
    if !errs.is_empty() {
        return Err(ApiError::Invalid {
            kind: "Cluster".into(),
            name,
            causes: errs,
        });
    }
    let Some(limits) = spec.limits else {
        return Ok(());
    };
    // Add every other cluster of the namespace.
    let cl_rt = rt("slipway.dev", "v1alpha1", "clusters")?;
    let (others, _) = store.list(&keys::prefix(cl_rt, Some(ns))).await?;
    for kv in others {
        let Ok(other) = serde_json::from_slice::<Cluster>(&kv.value) else {
            continue;
        };
        if other.metadata.name.as_deref() == Some(name.as_str()) {
            continue;
        }
        let (c2, m2) = cluster_usage(store, &other, &mut Vec::new()).await?;
        cpu += c2;
        mem += m2;
    }
    if let Some(limit) = limits.cpu.as_ref().and_then(|q| q.value().map(|v| (q, v)))
        && cpu > limit.1
    {
        return Err(denied(format!(
            "exceeded quota: spec.limits.cpu of namespace {ns:?} is {}, the namespace's clusters would use {cpu} (HostClass cpus × replicas)",
            limit.0
        )));
    }
    if let Some(limit) = limits
        .memory
        .as_ref()
        .and_then(|q| q.value().map(|v| (q, v)))
        && mem > limit.1
    {
        return Err(denied(format!(
            "exceeded quota: spec.limits.memory of namespace {ns:?} is {}, the namespace's clusters would use {}Mi (HostClass memory × replicas)",
            limit.0,
            (mem / 1048576.0).round()
        )));
    }
    Ok(())
}

/// Admission of a PVC: allowed StorageClass and the namespace storage limit.
pub async fn admit_pvc(store: &AnyStore, ns: &str, obj: &Value) -> Result<(), ApiError> {
    let pvc: PersistentVolumeClaim =
        serde_json::from_value(obj.clone()).map_err(|e| ApiError::Internal(e.to_string()))?;
    let name = pvc.metadata.name.clone().unwrap_or_default();
    let namespace = get_typed::<Namespace>(store, rt("", "v1", "namespaces")?, None, ns).await?;
    let spec = namespace.map(|n| n.spec).unwrap_or_default();
    let denied = |message: String| ApiError::AdmissionDenied {
        resource: "persistentvolumeclaims".into(),
        name: name.clone(),
        message,
    };
    if let Some(sc) = &pvc.spec.storage_class_name
        && !allowed(&spec.storage_classes, sc)
    {
        return Err(denied(format!(
            "spec.storageClassName: StorageClass {sc:?} is not allowed in namespace {ns:?} (spec.storageClasses)"
        )));
    }
    let size = |p: &PersistentVolumeClaim| {
        p.spec
            .resources
            .as_ref()
            .and_then(|r| r.requests.as_ref())
            .and_then(|r| r.get("storage"))
            .and_then(|q| q.value())
            .unwrap_or(0.0)
    };
    if let Some((q, limit)) = spec
        .limits
        .as_ref()
        .and_then(|l| l.storage.as_ref())
        .and_then(|q| q.value().map(|v| (q, v)))
    {
        let pvc_rt = rt("", "v1", "persistentvolumeclaims")?;
        let (others, _) = store.list(&keys::prefix(pvc_rt, Some(ns))).await?;
        let mut total = size(&pvc);
        for kv in others {
            if let Ok(o) = serde_json::from_slice::<PersistentVolumeClaim>(&kv.value)
                && o.metadata.name.as_deref() != Some(name.as_str())
            {
                total += size(&o);
            }
        }
        if total > limit {
            return Err(denied(format!(
                "exceeded quota: spec.limits.storage of namespace {ns:?} is {q}, the namespace's claims would use {}Mi",
                (total / 1048576.0).round()
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::slipway::CidrBlocks;

    #[test]
    fn network_rules_name_the_field() {
        let mut c = Cluster::default();
        let net = &mut c.spec.settings.network;
        net.pods.cidr_blocks = vec!["10.0.0.0/25".into()];
        net.services.cidr_blocks = vec!["10.96.0.0/12".into()];
        net.ingress = Some(CidrBlocks {
            cidr_blocks: vec!["10.96.1.0/27".into()],
        });
        net.egress = Some(CidrBlocks {
            cidr_blocks: vec!["192.168.0.0/28".into()],
        });
        let errs = cluster_network(&AdmissionConfig::default(), &c);
        let fields: Vec<&str> = errs.iter().map(|e| e.field.as_str()).collect();
        assert!(
            fields.contains(&"spec.settings.network.pods.cidrBlocks[0]"),
            "{errs:?}"
        );
        assert!(
            fields.contains(&"spec.settings.network.egress.cidrBlocks[0]"),
            "{errs:?}"
        );
        assert!(
            fields.contains(&"spec.settings.network.ingress.cidrBlocks[0]"),
            "{errs:?}"
        );
        assert_eq!(errs.len(), 3, "{errs:?}");
    }
}
