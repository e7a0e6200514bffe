//! Namespace quota arithmetic, without I/O: what a Cluster or a PersistentVolumeClaim uses, and
//! which limit a write would go over. Only resources a write increases are checked, as
//! Kubernetes' ResourceQuota admission does, so an over-quota namespace can still shrink.

use serde::{Deserialize, Serialize};

use crate::api::core::{NamespaceLimits, PersistentVolumeClaim};
use crate::api::meta::Quantity;
use crate::api::slipway::{Cluster, HostClassSpec};

/// Resources counted against `spec.limits` of a Namespace.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Usage {
    /// CPU cores (HostClass cpus × replicas).
    pub cpu: f64,
    /// Memory bytes (HostClass memory × replicas).
    pub memory: f64,
    /// Storage bytes (claims' `requests.storage`).
    pub storage: f64,
}

impl std::ops::AddAssign for Usage {
    fn add_assign(&mut self, o: Self) {
        self.cpu += o.cpu;
        self.memory += o.memory;
        self.storage += o.storage;
    }
}

impl Usage {
    /// Whether any resource is above `other`'s.
    pub fn grows_from(&self, other: &Usage) -> bool {
        self.cpu > other.cpu || self.memory > other.memory || self.storage > other.storage
    }
}

/// The (field, replicas, class) of every pool of a cluster, control plane first.
pub fn cluster_pools(c: &Cluster) -> Vec<(String, u32, &str)> {
    let t = &c.spec.topology;
    let mut pools = vec![(
        "spec.topology.controlPlane.hostClass".to_string(),
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
    pools
}

/// What a cluster uses given its classes' specs (`None`: the class does not exist, counted as
/// nothing).
pub fn cluster_usage<'c>(
    c: &'c Cluster,
    class: impl Fn(&str) -> Option<&'c HostClassSpec>,
) -> Usage {
    let mut u = Usage::default();
    for (_, replicas, name) in cluster_pools(c) {
        if let Some(hc) = class(name) {
            u.cpu += f64::from(hc.cpus) * f64::from(replicas);
            u.memory +=
                hc.memory.as_ref().and_then(Quantity::value).unwrap_or(0.0) * f64::from(replicas);
        }
    }
    u
}

/// What a claim uses: its `requests.storage`.
pub fn claim_usage(pvc: &PersistentVolumeClaim) -> Usage {
    let storage = pvc
        .spec
        .resources
        .as_ref()
        .and_then(|r| r.requests.as_ref())
        .and_then(|r| r.get("storage"))
        .and_then(Quantity::value)
        .unwrap_or(0.0);
    Usage {
        storage,
        ..Usage::default()
    }
}

fn mi(bytes: f64) -> f64 {
    (bytes / 1048576.0).round()
}

/// The first limit of namespace `ns` that `total` goes over in a resource the write increases
/// (`before` → `after` of the written object), as a message naming the limit; None when the
/// write fits.
pub fn over_limit(
    ns: &str,
    limits: &NamespaceLimits,
    total: &Usage,
    before: &Usage,
    after: &Usage,
) -> Option<String> {
    let limit = |q: &Option<Quantity>| q.as_ref().and_then(|q| q.value().map(|v| (q.clone(), v)));
    if after.cpu > before.cpu
        && let Some((q, v)) = limit(&limits.cpu)
        && total.cpu > v
    {
        return Some(format!(
            "exceeded quota: spec.limits.cpu of namespace {ns:?} is {q}, the namespace's clusters would use {} (HostClass cpus × replicas)",
            total.cpu
        ));
    }
    if after.memory > before.memory
        && let Some((q, v)) = limit(&limits.memory)
        && total.memory > v
    {
        return Some(format!(
            "exceeded quota: spec.limits.memory of namespace {ns:?} is {q}, the namespace's clusters would use {}Mi (HostClass memory × replicas)",
            mi(total.memory)
        ));
    }
    if after.storage > before.storage
        && let Some((q, v)) = limit(&limits.storage)
        && total.storage > v
    {
        return Some(format!(
            "exceeded quota: spec.limits.storage of namespace {ns:?} is {q}, the namespace's claims would use {}Mi",
            mi(total.storage)
        ));
    }
    None
}

/// The first zone whose share of namespace `ns`'s limits `after` (the namespace's usage per
/// zone once the write is made) goes over, in a zone the write grows (`before`): the limits
/// are split equally across the zones the namespace uses, as the seeds split 300 MHz over three
/// zones into 100 each. None when every zone fits.
pub fn over_zone_share(
    ns: &str,
    limits: &NamespaceLimits,
    before: &std::collections::BTreeMap<String, Usage>,
    after: &std::collections::BTreeMap<String, Usage>,
) -> Option<String> {
    let used = after
        .values()
        .filter(|u| u.cpu > 0.0 || u.memory > 0.0)
        .count();
    if used == 0 {
        return None;
    }
    #[allow(clippy::cast_precision_loss, reason = "a handful of zones")]
    let zones = used as f64;
    let limit = |q: &Option<Quantity>| q.as_ref().and_then(|q| q.value().map(|v| (q.clone(), v)));
    for (zone, u) in after {
        let was = before.get(zone).copied().unwrap_or_default();
        if u.cpu > was.cpu
            && let Some((q, v)) = limit(&limits.cpu)
            && u.cpu > v / zones
        {
            return Some(format!(
                "exceeded quota: zone {zone:?} would use {} cpu, over its share {:.3} (spec.limits.cpu of namespace {ns:?} is {q}, split over the {used} zones the namespace uses)",
                u.cpu,
                v / zones
            ));
        }
        if u.memory > was.memory
            && let Some((q, v)) = limit(&limits.memory)
            && u.memory > v / zones
        {
            return Some(format!(
                "exceeded quota: zone {zone:?} would use {}Mi of memory, over its share {}Mi (spec.limits.memory of namespace {ns:?} is {q}, split over the {used} zones the namespace uses)",
                mi(u.memory),
                mi(v / zones)
            ));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(cpu: &str, storage: &str) -> NamespaceLimits {
        NamespaceLimits {
            cpu: Some(Quantity::Str(cpu.into())),
            memory: None,
            storage: Some(Quantity::Str(storage.into())),
        }
    }

    fn usage(cpu: f64, storage: f64) -> Usage {
        Usage {
            cpu,
            memory: 0.0,
            storage,
        }
    }

    #[test]
    fn only_increased_resources_are_checked() {
        let l = limits("8", "100Gi");
        let gi = 1024.0 * 1024.0 * 1024.0;
        // 16 cpus against 8: a create is refused, naming the limit and the figure.
        let msg = over_limit(
            "a",
            &l,
            &usage(16.0, 0.0),
            &Usage::default(),
            &usage(4.0, 0.0),
        );
        let msg = msg.unwrap_or_default();
        assert!(msg.contains("spec.limits.cpu"), "{msg}");
        assert!(msg.contains("would use 16"), "{msg}");
        // Scaling 5 → 1 in the same over-quota namespace passes.
        assert_eq!(
            over_limit(
                "a",
                &l,
                &usage(12.0, 0.0),
                &usage(10.0, 0.0),
                &usage(2.0, 0.0)
            ),
            None
        );
        // An unchanged object (an annotation added) passes.
        assert_eq!(
            over_limit(
                "a",
                &l,
                &usage(16.0, 0.0),
                &usage(4.0, 0.0),
                &usage(4.0, 0.0)
            ),
            None
        );
        // Storage grows past the limit while cpu is over too: storage is named.
        let msg = over_limit(
            "a",
            &l,
            &usage(16.0, 120.0 * gi),
            &usage(4.0, 40.0 * gi),
            &usage(4.0, 60.0 * gi),
        )
        .unwrap_or_default();
        assert!(msg.contains("spec.limits.storage"), "{msg}");
        assert!(msg.contains("122880Mi"), "{msg}");
    }

    #[test]
    fn cluster_usage_multiplies_class_by_replicas() {
        let c: Cluster = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "c"},
            "spec": {"topology": {
                "controlPlane": {"replicas": 3, "hostClass": "small"},
                "nodePools": [{"name": "w", "replicas": 5, "hostClass": "gone"}]
            }}
        }))
        .unwrap_or_default();
        let small = HostClassSpec {
            cpus: 2,
            memory: Some(Quantity::Str("1Gi".into())),
        };
        let u = cluster_usage(&c, |n| (n == "small").then_some(&small));
        assert_eq!((u.cpu, u.memory), (6.0, 3.0 * 1073741824.0));
        assert!(u.grows_from(&Usage::default()));
        assert!(!Usage::default().grows_from(&u));
    }
}
