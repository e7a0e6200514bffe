//! `slipway.dev/v1alpha1` kinds: HostClass, Zone and Cluster (after TKC v1alpha3).

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::core::check_cidr;
use super::meta::{Condition, Quantity, check_dns_label};
use super::{Validate, at, kind};
use crate::error::FieldError;

/// The API group of Slipway's own kinds.
pub const GROUP: &str = "slipway.dev";

/// HostClass spec: the size of a host (cgroup limits on netns hosts).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HostClassSpec {
    /// CPU cores per host.
    #[serde(default)]
    pub cpus: u32,
    /// Memory per host (`4Gi`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<Quantity>,
}

/// Generic status with conditions.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CommonStatus {
    /// Conditions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conditions: Option<Vec<Condition>>,
}

kind!(
    /// A host size (cluster-scoped).
    HostClass,
    HostClassSpec,
    CommonStatus
);

impl Validate for HostClass {
    fn validate(&self, errs: &mut Vec<FieldError>) {
        if self.spec.cpus == 0 {
            errs.push(FieldError::invalid(
                "spec.cpus",
                self.spec.cpus,
                "must be at least 1",
            ));
        }
        match &self.spec.memory {
            None => errs.push(FieldError::required("spec.memory")),
            Some(q) if q.value().is_none_or(|v| v <= 0.0) => errs.push(FieldError::invalid(
                "spec.memory",
                q,
                "must be a positive quantity such as 4Gi",
            )),
            Some(_) => {}
        }
    }
}

/// Capacity of a zone.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ZoneCapacity {
    /// CPU cores.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu: Option<Quantity>,
    /// Memory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<Quantity>,
    /// Storage.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage: Option<Quantity>,
}

/// Zone spec: a failure domain.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ZoneSpec {
    /// Hosts in this zone (netns names or machine addresses).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hosts: Option<Vec<String>>,
    /// Capacity offered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capacity: Option<ZoneCapacity>,
}

kind!(
    /// A failure domain and its hosts (cluster-scoped).
    Zone,
    ZoneSpec,
    CommonStatus
);

impl Validate for Zone {
    fn validate(&self, errs: &mut Vec<FieldError>) {
        if let Some(c) = &self.spec.capacity {
            for (f, q) in [
                ("cpu", &c.cpu),
                ("memory", &c.memory),
                ("storage", &c.storage),
            ] {
                if let Some(q) = q
                    && q.value().is_none()
                {
                    errs.push(FieldError::invalid(
                        format!("spec.capacity.{f}"),
                        q,
                        "must be a quantity",
                    ));
                }
            }
        }
    }
}

/// Control plane topology.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ControlPlane {
    /// 1 or 3.
    #[serde(default = "one")]
    pub replicas: u32,
    /// HostClass of control plane hosts.
    #[serde(default)]
    pub host_class: String,
    /// StorageClass of their disks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage_class: Option<String>,
}

fn one() -> u32 {
    1
}

/// A pool of worker hosts.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NodePool {
    /// Pool name, unique in the cluster.
    pub name: String,
    /// Hosts in the pool.
    #[serde(default)]
    pub replicas: u32,
    /// HostClass of the pool's hosts.
    #[serde(default)]
    pub host_class: String,
    /// StorageClass of their disks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage_class: Option<String>,
    /// Zone to place the pool in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure_domain: Option<String>,
}

/// Cluster topology.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Topology {
    /// Control plane.
    #[serde(default)]
    pub control_plane: ControlPlane,
    /// Worker pools.
    #[serde(default)]
    pub node_pools: Vec<NodePool>,
}

/// A list of CIDR blocks.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CidrBlocks {
    /// CIDRs.
    #[serde(default)]
    pub cidr_blocks: Vec<String>,
}

/// Cluster network settings.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ClusterNetwork {
    /// CNI name (`slipway`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cni: Option<String>,
    /// Pod CIDRs.
    #[serde(default)]
    pub pods: CidrBlocks,
    /// Service CIDRs.
    #[serde(default)]
    pub services: CidrBlocks,
    /// Ingress (LoadBalancer VIP) CIDRs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ingress: Option<CidrBlocks>,
    /// Egress (SNAT) CIDRs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub egress: Option<CidrBlocks>,
}

/// Cluster settings.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ClusterSettings {
    /// Network.
    #[serde(default)]
    pub network: ClusterNetwork,
}

/// Cluster spec.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ClusterSpec {
    /// Hosts.
    #[serde(default)]
    pub topology: Topology,
    /// Settings.
    #[serde(default)]
    pub settings: ClusterSettings,
}

/// Cluster status.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ClusterStatus {
    /// Pending, Provisioning, Running, Deleting, Failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<String>,
    /// Conditions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conditions: Option<Vec<Condition>>,
    /// Hosts provisioned for the cluster.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hosts: Option<Vec<String>>,
    /// API endpoint (`https://ip:port`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_endpoint: Option<String>,
}

kind!(
    /// A workload cluster (namespaced).
    Cluster,
    ClusterSpec,
    ClusterStatus
);

impl Validate for Cluster {
    fn default_fields(&mut self) {
        let net = &mut self.spec.settings.network;
        net.cni.get_or_insert_with(|| "slipway".into());
    }

    fn validate(&self, errs: &mut Vec<FieldError>) {
        let t = &self.spec.topology;
        if t.control_plane.replicas != 1 && t.control_plane.replicas != 3 {
            errs.push(FieldError::not_supported(
                "spec.topology.controlPlane.replicas",
                &t.control_plane.replicas.to_string(),
                &["1", "3"],
            ));
        }
        if t.control_plane.host_class.is_empty() {
            errs.push(FieldError::required("spec.topology.controlPlane.hostClass"));
        }
        let mut names = std::collections::BTreeSet::new();
        for (i, p) in t.node_pools.iter().enumerate() {
            let f = at("spec.topology.nodePools", i);
            check_dns_label(&format!("{f}.name"), &p.name, errs);
            if !names.insert(p.name.clone()) {
                errs.push(FieldError::duplicate(
                    format!("{f}.name"),
                    format!("{:?}", p.name),
                ));
            }
            if p.host_class.is_empty() {
                errs.push(FieldError::required(format!("{f}.hostClass")));
            }
        }
        let net = &self.spec.settings.network;
        if net.pods.cidr_blocks.is_empty() {
            errs.push(FieldError::required(
                "spec.settings.network.pods.cidrBlocks",
            ));
        }
        if net.services.cidr_blocks.is_empty() {
            errs.push(FieldError::required(
                "spec.settings.network.services.cidrBlocks",
            ));
        }
        for (field, blocks) in cidr_fields(self) {
            for (i, c) in blocks.iter().enumerate() {
                check_cidr(&at(&field, i), c, errs);
            }
        }
    }
}

/// Every CIDR list of a cluster with its field path.
pub fn cidr_fields(c: &Cluster) -> Vec<(String, &[String])> {
    let net = &c.spec.settings.network;
    let mut out: Vec<(String, &[String])> = vec![
        (
            "spec.settings.network.pods.cidrBlocks".into(),
            &net.pods.cidr_blocks,
        ),
        (
            "spec.settings.network.services.cidrBlocks".into(),
            &net.services.cidr_blocks,
        ),
    ];
    if let Some(i) = &net.ingress {
        out.push((
            "spec.settings.network.ingress.cidrBlocks".into(),
            &i.cidr_blocks,
        ));
    }
    if let Some(e) = &net.egress {
        out.push((
            "spec.settings.network.egress.cidrBlocks".into(),
            &e.cidr_blocks,
        ));
    }
    out
}
