//! `slipway.dev/v1alpha1` kinds: HostClass, Zone and Cluster (after TKC v1alpha3), and Host.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::meta::{Condition, Quantity, check_cidr, check_dns_label, check_ip};
use crate::{FieldError, Validate, at, kind};

/// The API group of Slipway's own kinds.
pub const GROUP: &str = "slipway.dev";

/// The version of Slipway's own kinds.
pub const VERSION: &str = "v1alpha1";

/// Where host agents renew their `coordination.k8s.io/v1` Leases (one per host, named after it),
/// as `kube-node-lease` holds Nodes' Leases.
pub const HOST_LEASE_NAMESPACE: &str = "slipway-system";

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

/// LoadBalancerPool spec: the addresses LoadBalancer Services get VIPs from when Slipway's LB
/// controller runs on its own against a Kubernetes API (`slipway lb controller`, MetalLB's
/// role; its `IPAddressPool`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LoadBalancerPoolSpec {
    /// The blocks VIPs are taken from (IPv4 or IPv6 CIDRs), in order.
    #[serde(default)]
    pub addresses: Vec<String>,
}

kind!(
    /// Addresses for LoadBalancer Services (cluster-scoped). A Service takes its VIP from the
    /// pool its [`POOL_ANNOTATION`] names, else from the first pool by name.
    LoadBalancerPool,
    LoadBalancerPoolSpec,
    CommonStatus
);

/// The annotation naming the LoadBalancerPool a Service takes its VIP from.
pub const POOL_ANNOTATION: &str = "slipway.dev/address-pool";

impl Validate for LoadBalancerPool {
    fn validate(&self, errs: &mut Vec<FieldError>) {
        if self.spec.addresses.is_empty() {
            errs.push(FieldError::required("spec.addresses"));
        }
        let mut blocks: Vec<(usize, crate::meta::Cidr)> = Vec::new();
        for (i, a) in self.spec.addresses.iter().enumerate() {
            let field = at("spec.addresses", i);
            let Some(cidr) = check_cidr(&field, a, errs) else {
                continue;
            };
            if let Some((j, _)) = blocks
                .iter()
                .find(|(_, b)| b.contains(&cidr) || cidr.contains(b))
            {
                errs.push(FieldError::invalid(
                    field,
                    format!("{a:?}"),
                    format!("overlaps spec.addresses[{j}]"),
                ));
            }
            blocks.push((i, cidr));
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
    /// Where clients reach the control plane (Cluster API's field of this name): set by the
    /// user (a load balancer of theirs in front of the control plane hosts) or, left empty, by
    /// the host provider when it makes one (the `netns` provider's VIP for three control plane
    /// hosts). Without one, a single control plane host is reached at its own address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub control_plane_endpoint: Option<ApiEndpoint>,
}

/// An API server's address.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ApiEndpoint {
    /// An IP address (named in the API servers' serving certificates).
    pub host: String,
    /// The port (default 6443).
    #[serde(default = "api_port")]
    pub port: u16,
}

/// The port a workload cluster's API server serves on.
pub const API_PORT: u16 = 6443;

fn api_port() -> u16 {
    API_PORT
}

/// Where a cluster's API is reached (`host:port`): its `controlPlaneEndpoint`, or else its
/// first control plane host's address (`cp0`, once it has one).
pub fn api_authority(spec: &ClusterSpec, cp0: Option<&str>) -> Option<String> {
    match &spec.control_plane_endpoint {
        Some(e) => Some(format!("{}:{}", e.host, e.port)),
        None => cp0
            .filter(|a| !a.is_empty())
            .map(|a| format!("{a}:{API_PORT}")),
    }
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
        if let Some(e) = &self.spec.control_plane_endpoint {
            check_ip("spec.controlPlaneEndpoint.host", &e.host, errs);
            if e.port == 0 {
                errs.push(FieldError::invalid(
                    "spec.controlPlaneEndpoint.port",
                    "0",
                    "must be between 1 and 65535",
                ));
            }
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

/// Who makes a host: a network namespace on this machine, or a machine that joined.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostProvider {
    /// A network namespace on its zone's underlay segment, with cgroups and the agent inside.
    Netns,
    /// A real machine that ran `slipway join`.
    Static,
}

impl HostProvider {
    /// Every provider, by the name the API spells it.
    pub const NAMES: [&'static str; 2] = ["netns", "static"];

    /// The provider named `name`.
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "netns" => Some(Self::Netns),
            "static" => Some(Self::Static),
            _ => None,
        }
    }

    /// The name the API spells it.
    pub fn name(self) -> &'static str {
        match self {
            Self::Netns => "netns",
            Self::Static => "static",
        }
    }
}

/// The pool name of a cluster's control plane hosts.
pub const CONTROL_PLANE_POOL: &str = "control-plane";

/// The pool of edge hosts (`spec.pool: edge` and no cluster): hosts that run the L4 load
/// balancer for the VIPs the supervisor gives LoadBalancer Services, fed from its API.
pub const EDGE_POOL: &str = "edge";

/// Where edge hosts hold the `coordination.k8s.io/v1` Leases that say which of them announces
/// each VIP (one Lease per VIP).
pub const VIP_LEASE_NAMESPACE: &str = "slipway-lb";

/// The Lease (in [`VIP_LEASE_NAMESPACE`]) whose holder announces `vip`: `vip-10-99-100-1`,
/// `vip-fd99-100--1`.
pub fn vip_lease_name(vip: std::net::IpAddr) -> String {
    format!("vip-{}", vip.to_string().replace(['.', ':'], "-"))
}

/// The cluster a host serves (Clusters are namespaced, Hosts are not).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ClusterRef {
    /// The Cluster's namespace.
    pub namespace: String,
    /// The Cluster's name.
    pub name: String,
}

/// Host spec.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HostSpec {
    /// The Zone the host is in.
    #[serde(default)]
    pub zone: String,
    /// The HostClass that sizes it.
    #[serde(default)]
    pub host_class: String,
    /// Who makes it: `netns` (default) or `static`.
    #[serde(default)]
    #[schemars(extend("enum" = ["netns", "static"]))]
    pub provider: String,
    /// The cluster it serves; absent while the host is free.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<ClusterRef>,
    /// The cluster's node pool it serves, or `control-plane`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool: Option<String>,
    /// Its block of the cluster's pod CIDR (its Node's `spec.podCIDR`), given by the cluster
    /// reconciler when it makes the host.
    #[serde(default, rename = "podCIDR", skip_serializing_if = "Option::is_none")]
    pub pod_cidr: Option<String>,
}

impl HostSpec {
    /// The provider, once validated.
    pub fn provider(&self) -> Option<HostProvider> {
        HostProvider::from_name(&self.provider)
    }
}

/// The phases of a host's life.
pub const HOST_PHASES: [&str; 5] = ["Pending", "Provisioning", "Running", "Deleting", "Failed"];

/// Host status.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HostStatus {
    /// Pending, Provisioning, Running, Deleting or Failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("enum" = ["Pending", "Provisioning", "Running", "Deleting", "Failed"]))]
    pub phase: Option<String>,
    /// The host's address on its zone's underlay.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
    /// Conditions (`Ready`, from the host agent's Lease).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conditions: Option<Vec<Condition>>,
    /// Version of the host agent running on it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_version: Option<String>,
}

kind!(
    /// A host: a network namespace or a machine running the host agent (cluster-scoped).
    Host,
    HostSpec,
    HostStatus
);

impl Validate for Host {
    fn default_fields(&mut self) {
        if self.spec.provider.is_empty() {
            self.spec.provider = HostProvider::Netns.name().into();
        }
    }

    fn validate(&self, errs: &mut Vec<FieldError>) {
        let s = &self.spec;
        if s.zone.is_empty() {
            errs.push(FieldError::required("spec.zone"));
        } else {
            crate::meta::check_dns_subdomain("spec.zone", &s.zone, errs);
        }
        if s.host_class.is_empty() {
            errs.push(FieldError::required("spec.hostClass"));
        } else {
            crate::meta::check_dns_subdomain("spec.hostClass", &s.host_class, errs);
        }
        if s.provider().is_none() {
            errs.push(FieldError::not_supported(
                "spec.provider",
                &s.provider,
                &HostProvider::NAMES,
            ));
        }
        match (&s.cluster, &s.pool) {
            (Some(c), pool) => {
                if c.namespace.is_empty() {
                    errs.push(FieldError::required("spec.cluster.namespace"));
                } else {
                    check_dns_label("spec.cluster.namespace", &c.namespace, errs);
                }
                if c.name.is_empty() {
                    errs.push(FieldError::required("spec.cluster.name"));
                } else {
                    crate::meta::check_dns_subdomain("spec.cluster.name", &c.name, errs);
                }
                match pool {
                    None => errs.push(FieldError::required("spec.pool")),
                    Some(p) => check_dns_label("spec.pool", p, errs),
                }
            }
            (None, Some(p)) if p == EDGE_POOL => {}
            (None, Some(_)) => errs.push(FieldError::forbidden(
                "spec.pool",
                "may only be set with spec.cluster (or be `edge`, for an edge host)",
            )),
            (None, None) => {}
        }
        match (&s.pod_cidr, &s.cluster) {
            (Some(cidr), Some(_)) => {
                check_cidr("spec.podCIDR", cidr, errs);
            }
            (Some(_), None) => errs.push(FieldError::forbidden(
                "spec.podCIDR",
                "may only be set with spec.cluster",
            )),
            (None, _) => {}
        }
        let Some(st) = &self.status else { return };
        if let Some(p) = &st.phase
            && !HOST_PHASES.contains(&p.as_str())
        {
            errs.push(FieldError::not_supported("status.phase", p, &HOST_PHASES));
        }
        if let Some(a) = &st.address {
            check_ip("status.address", a, errs);
        }
        for (i, c) in st.conditions.iter().flatten().enumerate() {
            let f = at("status.conditions", i);
            if c.type_.is_empty() {
                errs.push(FieldError::required(format!("{f}.type")));
            }
            if !["True", "False", "Unknown"].contains(&c.status.as_str()) {
                errs.push(FieldError::not_supported(
                    format!("{f}.status"),
                    &c.status,
                    &["True", "False", "Unknown"],
                ));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn errors<T: Validate + serde::de::DeserializeOwned>(v: serde_json::Value) -> Vec<String> {
        let mut obj: T = serde_json::from_value(v).expect("decodes");
        obj.default_fields();
        let mut errs = Vec::new();
        obj.validate(&mut errs);
        errs.iter().map(ToString::to_string).collect()
    }

    #[test]
    fn host_defaults_to_netns_and_names_every_bad_field() {
        let mut h: Host = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "h1"},
            "spec": {"zone": "zone-a", "hostClass": "small",
                     "cluster": {"namespace": "team-a", "name": "c1"}, "pool": "workers"},
            "status": {"phase": "Running", "address": "10.1.0.2",
                       "conditions": [{"type": "Ready", "status": "True"}]},
        }))
        .expect("decodes");
        h.default_fields();
        assert_eq!(h.spec.provider(), Some(HostProvider::Netns));
        let mut errs = Vec::new();
        h.validate(&mut errs);
        assert!(errs.is_empty(), "{errs:?}");

        let errs = errors::<Host>(serde_json::json!({
            "spec": {"provider": "vm", "pool": "workers"},
            "status": {"phase": "Up", "address": "10.1.0.300",
                       "conditions": [{"type": "Ready", "status": "Yes"}]},
        }));
        assert_eq!(
            errs,
            [
                "spec.zone: Required value",
                "spec.hostClass: Required value",
                r#"spec.provider: Unsupported value: "vm": supported values: "netns", "static""#,
                "spec.pool: Forbidden: may only be set with spec.cluster (or be `edge`, for an edge host)",
                r#"status.phase: Unsupported value: "Up": supported values: "Pending", "Provisioning", "Running", "Deleting", "Failed""#,
                r#"status.address: Invalid value: "10.1.0.300": must be a valid IP address"#,
                r#"status.conditions[0].status: Unsupported value: "Yes": supported values: "True", "False", "Unknown""#,
            ]
        );
        let errs = errors::<Host>(serde_json::json!({
            "spec": {"zone": "Zone_A", "hostClass": "small", "provider": "static",
                     "cluster": {"namespace": "", "name": "c1"}},
        }));
        assert_eq!(errs.len(), 3, "{errs:?}");
        assert!(errs[0].starts_with("spec.zone: Invalid value"), "{errs:?}");
        assert_eq!(errs[1], "spec.cluster.namespace: Required value");
        assert_eq!(errs[2], "spec.pool: Required value");
        assert!(
            serde_json::from_value::<Host>(serde_json::json!({"spec": {"zones": "a"}})).is_err(),
            "unknown fields are refused"
        );
    }

    #[test]
    fn cluster_names_bad_topology_and_cidrs() {
        let errs = errors::<Cluster>(serde_json::json!({
            "spec": {"topology": {"controlPlane": {"replicas": 2},
                                  "nodePools": [{"name": "w", "hostClass": "s"},
                                                {"name": "w", "hostClass": ""}]},
                     "settings": {"network": {"pods": {"cidrBlocks": ["10.0.0.1/16"]}}}},
        }));
        assert_eq!(
            errs,
            [
                r#"spec.topology.controlPlane.replicas: Unsupported value: "2": supported values: "1", "3""#,
                "spec.topology.controlPlane.hostClass: Required value",
                r#"spec.topology.nodePools[1].name: Duplicate value: "w""#,
                "spec.topology.nodePools[1].hostClass: Required value",
                "spec.settings.network.services.cidrBlocks: Required value",
                r#"spec.settings.network.pods.cidrBlocks[0]: Invalid value: "10.0.0.1/16": must be a network address (host bits zero)"#,
            ]
        );
    }

    #[test]
    fn a_control_plane_endpoint_is_an_ip_and_a_port_and_names_the_api() {
        let cluster = |endpoint: serde_json::Value| {
            serde_json::json!({"spec": {
                "topology": {"controlPlane": {"replicas": 3, "hostClass": "s"}},
                "settings": {"network": {"pods": {"cidrBlocks": ["10.0.0.0/16"]},
                                         "services": {"cidrBlocks": ["10.1.0.0/16"]}}},
                "controlPlaneEndpoint": endpoint,
            }})
        };
        let errs = errors::<Cluster>(cluster(
            serde_json::json!({"host": "api.example", "port": 0}),
        ));
        assert_eq!(
            errs,
            [
                r#"spec.controlPlaneEndpoint.host: Invalid value: "api.example": must be a valid IP address"#,
                "spec.controlPlaneEndpoint.port: Invalid value: 0: must be between 1 and 65535",
            ]
        );
        let ok: Cluster = serde_json::from_value(cluster(serde_json::json!({"host": "10.9.0.1"})))
            .expect("a cluster");
        assert!(errors::<Cluster>(serde_json::to_value(&ok).expect("json")).is_empty());
        assert_eq!(
            api_authority(&ok.spec, Some("10.0.0.2")).as_deref(),
            Some("10.9.0.1:6443"),
            "the endpoint wins over the first control plane host"
        );
        let mut single = ok.spec.clone();
        single.control_plane_endpoint = None;
        assert_eq!(
            api_authority(&single, Some("10.0.0.2")).as_deref(),
            Some("10.0.0.2:6443")
        );
        assert_eq!(api_authority(&single, None), None);
    }
}
