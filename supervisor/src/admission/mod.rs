//! Admission: the seed's network rules (pod/service CIDR minimum sizes, ingress/egress CIDRs
//! that never overlap), allowed classes, namespace quotas over HostClass sizes (checked and
//! written in one store transaction) and classes that cannot go while in use.

pub mod services;
mod write;

use std::collections::{BTreeMap, HashMap};

use ipnetwork::IpNetwork;
use serde_json::Value;

pub use write::{Change, deletable, forget_namespace, usage_key, write};

use crate::api::core::{Namespace, PersistentVolumeClaim};
use crate::api::meta::Quantity;
use crate::api::registry::{ResourceType, lookup};
use crate::api::slipway::{Cluster, GROUP, HostClass, HostClassSpec, Zone, cidr_fields};
use crate::error::{ApiError, FieldError};
use crate::quota::{self, Usage, cluster_pools};
use crate::server::keys;
use crate::store::{AnyStore, Cas, Store};

/// Configurable minimum block sizes (a block must be at least this big: prefix <= minimum), and
/// the networks the supervisor itself uses, which no Cluster may take.
#[derive(Debug, Clone)]
pub struct AdmissionConfig {
    /// The supervisor's own networks, by what they are (the hosts' underlay, ...).
    pub reserved: Vec<(String, IpNetwork)>,
    /// Largest allowed prefix length of a pod CIDR (default /24).
    pub pod_prefix_max: u8,
    /// Largest allowed prefix length of a service CIDR (default /16).
    pub service_prefix_max: u8,
    /// Largest allowed prefix length of an ingress or egress CIDR (default /27).
    pub edge_prefix_max: u8,
    /// Where Services' ClusterIPs and node ports come from.
    pub services: services::ServiceNetwork,
}

impl Default for AdmissionConfig {
    fn default() -> Self {
        Self {
            reserved: Vec::new(),
            pod_prefix_max: 24,
            service_prefix_max: 16,
            edge_prefix_max: 27,
            services: services::ServiceNetwork::default(),
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
            for (what, reserved) in &cfg.reserved {
                if overlaps(&net, reserved) {
                    errs.push(FieldError::invalid(
                        &f,
                        format!("{b:?}"),
                        format!("overlaps {what} ({reserved}), which the supervisor uses"),
                    ));
                }
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
) -> Result<Option<(T, u64)>, ApiError> {
    match store.get(&keys::object(rt, ns, name)).await? {
        Some(kv) => serde_json::from_slice(&kv.value)
            .map(|v| Some((v, kv.revision)))
            .map_err(|e| ApiError::Internal(format!("corrupt object {}: {e}", kv.key))),
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

fn decode<T: serde::de::DeserializeOwned>(obj: &Value) -> Result<T, ApiError> {
    serde_json::from_value(obj.clone()).map_err(|e| ApiError::Internal(e.to_string()))
}

/// Admission of a Cluster: network rules, allowed and existing classes. The namespace quota
/// is checked where the object is written ([`write`]).
pub async fn admit_cluster(
    store: &AnyStore,
    cfg: &AdmissionConfig,
    ns: &str,
    obj: &Value,
) -> Result<(), ApiError> {
    let c: Cluster = decode(obj)?;
    let name = c.metadata.name.clone().unwrap_or_default();
    let mut errs = cluster_network(cfg, &c);
    let spec = get_typed::<Namespace>(store, rt("", "v1", "namespaces")?, None, ns)
        .await?
        .map(|(n, _)| n.spec)
        .unwrap_or_default();
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
    let mut classes = Classes::default();
    for (field, _, class) in cluster_pools(&c) {
        if classes.get(store, class).await?.is_none() {
            errs.push(FieldError::invalid(
                field,
                format!("{class:?}"),
                "HostClass not found",
            ));
        }
    }
    // An etcd of three members cannot be grown from one or shrunk to one under the cluster,
    // and every kubeconfig and serving certificate names the endpoint: both are fixed (the
    // endpoint once set, as Cluster API's is).
    if let Some((old, _)) =
        get_typed::<Cluster>(store, rt(GROUP, "v1alpha1", "clusters")?, Some(ns), &name).await?
    {
        if old.spec.topology.control_plane.replicas != t.control_plane.replicas {
            errs.push(FieldError::invalid(
                "spec.topology.controlPlane.replicas",
                t.control_plane.replicas.to_string(),
                "field is immutable",
            ));
        }
        if old.spec.control_plane_endpoint.is_some()
            && old.spec.control_plane_endpoint != c.spec.control_plane_endpoint
        {
            errs.push(FieldError::invalid(
                "spec.controlPlaneEndpoint",
                serde_json::to_string(&c.spec.control_plane_endpoint).unwrap_or_default(),
                "field is immutable once set",
            ));
        }
    }
    for (i, pool) in t.node_pools.iter().enumerate() {
        if let Some(zone) = &pool.failure_domain
            && get_typed::<Zone>(store, rt(GROUP, "v1alpha1", "zones")?, None, zone)
                .await?
                .is_none()
        {
            errs.push(FieldError::invalid(
                format!("spec.topology.nodePools[{i}].failureDomain"),
                format!("{zone:?}"),
                "Zone not found",
            ));
        }
    }
    if !errs.is_empty() {
        return Err(ApiError::Invalid {
            kind: "Cluster".into(),
            name,
            causes: errs,
        });
    }
    Ok(())
}

/// Admission of a PVC: the allowed StorageClass. The namespace storage limit is checked where
/// the object is written ([`write`]).
pub async fn admit_pvc(store: &AnyStore, ns: &str, obj: &Value) -> Result<(), ApiError> {
    let pvc: PersistentVolumeClaim = decode(obj)?;
    let name = pvc.metadata.name.clone().unwrap_or_default();
    let spec = get_typed::<Namespace>(store, rt("", "v1", "namespaces")?, None, ns)
        .await?
        .map(|(n, _)| n.spec)
        .unwrap_or_default();
    if let Some(sc) = &pvc.spec.storage_class_name
        && !allowed(&spec.storage_classes, sc)
    {
        return Err(ApiError::AdmissionDenied {
            resource: "persistentvolumeclaims".into(),
            name,
            message: format!(
                "spec.storageClassName: StorageClass {sc:?} is not allowed in namespace {ns:?} (spec.storageClasses)"
            ),
        });
    }
    Ok(())
}

/// HostClasses read during one admission, with the revision each was read at.
#[derive(Debug, Default)]
struct Classes(HashMap<String, Option<(HostClassSpec, u64)>>);

impl Classes {
    async fn get(
        &mut self,
        store: &AnyStore,
        name: &str,
    ) -> Result<Option<&(HostClassSpec, u64)>, ApiError> {
        if !self.0.contains_key(name) {
            let hc =
                get_typed::<HostClass>(store, rt(GROUP, "v1alpha1", "hostclasses")?, None, name)
                    .await?
                    .map(|(hc, rev)| (hc.spec, rev));
            self.0.insert(name.to_string(), hc);
        }
        Ok(self.0.get(name).and_then(Option::as_ref))
    }

    /// Reads every class `c` uses, then its usage.
    async fn cluster_usage(&mut self, store: &AnyStore, c: &Cluster) -> Result<Usage, ApiError> {
        for (_, _, class) in cluster_pools(c) {
            self.get(store, class).await?;
        }
        Ok(quota::cluster_usage(c, |n| {
            self.0.get(n).and_then(Option::as_ref).map(|(s, _)| s)
        }))
    }

    /// What `c` places in each zone (as the Cluster reconciler places it over `zones`).
    pub(crate) async fn zone_usage(
        &mut self,
        store: &AnyStore,
        ns: &str,
        c: &Cluster,
        zones: &[String],
    ) -> Result<BTreeMap<String, Usage>, ApiError> {
        let name = c.metadata.name.clone().unwrap_or_default();
        let mut out: BTreeMap<String, Usage> = BTreeMap::new();
        for p in crate::controllers::clusters::placements(ns, &name, &c.spec, zones) {
            if let Some((hc, _)) = self.get(store, &p.host_class).await? {
                let u = out.entry(p.zone).or_default();
                u.cpu += f64::from(hc.cpus);
                u.memory += hc.memory.as_ref().and_then(Quantity::value).unwrap_or(0.0);
            }
        }
        Ok(out)
    }

    /// Guards on every class `c` uses still being as read.
    fn guards(&self, c: &Cluster) -> Result<Vec<Cas>, ApiError> {
        let hc_rt = rt(GROUP, "v1alpha1", "hostclasses")?;
        let mut names: Vec<&str> = cluster_pools(c).into_iter().map(|p| p.2).collect();
        names.sort_unstable();
        names.dedup();
        Ok(names
            .into_iter()
            .map(|n| {
                let read = self.0.get(n).and_then(Option::as_ref).map(|(_, r)| *r);
                Cas::unchanged(&keys::object(hc_rt, None, n), read)
            })
            .collect())
    }
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
