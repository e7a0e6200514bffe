//! Core (`v1`) kinds: Namespace with Slipway's limits, Service, Endpoints, Pod, Node, PVC, Event,
//! ConfigMap, ServiceAccount.

use std::collections::BTreeMap;
use std::net::IpAddr;

use ipnetwork::IpNetwork;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::meta::{ObjectMeta, Quantity, check_dns_label};
use super::{Validate, at, kind};
use crate::error::FieldError;

/// Resource limits of a namespace.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NamespaceLimits {
    /// Total CPU cores the namespace's clusters may use.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu: Option<Quantity>,
    /// Total memory the namespace's clusters may use.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<Quantity>,
    /// Total storage the namespace's volumes may use.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage: Option<Quantity>,
}

/// Namespace spec: upstream finalizers plus Slipway's limits and allowed classes.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NamespaceSpec {
    /// Upstream namespace finalizers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finalizers: Option<Vec<String>>,
    /// Resource limits; absent means unlimited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limits: Option<NamespaceLimits>,
    /// StorageClasses objects in this namespace may use; absent means all.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage_classes: Option<Vec<String>>,
    /// HostClasses clusters in this namespace may use; absent means all.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_classes: Option<Vec<String>>,
}

/// Namespace status.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NamespaceStatus {
    /// `Active` or `Terminating`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<String>,
    /// Conditions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conditions: Option<Vec<Value>>,
}

kind!(
    /// A tenant namespace (core/v1) with Slipway's resource limits.
    Namespace,
    NamespaceSpec,
    NamespaceStatus
);

fn check_quantity(field: &str, q: &Option<Quantity>, errs: &mut Vec<FieldError>) {
    if let Some(q) = q
        && q.value().is_none()
    {
        errs.push(FieldError::invalid(
            field,
            q,
            "must be a quantity such as 2, 500m or 4Gi",
        ));
    }
}

fn check_names(field: &str, names: &Option<Vec<String>>, errs: &mut Vec<FieldError>) {
    for (i, n) in names.iter().flatten().enumerate() {
        check_dns_label(&at(field, i), n, errs);
    }
}

impl Validate for Namespace {
    fn default_fields(&mut self) {
        let status = self.status.get_or_insert_with(Default::default);
        status.phase.get_or_insert_with(|| "Active".into());
    }
    fn validate(&self, errs: &mut Vec<FieldError>) {
        if let Some(l) = &self.spec.limits {
            check_quantity("spec.limits.cpu", &l.cpu, errs);
            check_quantity("spec.limits.memory", &l.memory, errs);
            check_quantity("spec.limits.storage", &l.storage, errs);
        }
        check_names("spec.storageClasses", &self.spec.storage_classes, errs);
        check_names("spec.hostClasses", &self.spec.host_classes, errs);
    }
}

/// A Service (core/v1), the upstream type: decoded as [`Pod`] is (unknown fields refused), with
/// the supervisor's defaults and checks on top.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(transparent)]
#[schemars(transparent)]
pub struct Service(pub k8s_openapi::api::core::v1::Service);

const SERVICE_TYPES: &[&str] = &["ClusterIP", "NodePort", "LoadBalancer", "ExternalName"];
const PROTOCOLS: &[&str] = &["TCP", "UDP", "SCTP"];

pub(crate) fn check_port(field: &str, p: i64, errs: &mut Vec<FieldError>) {
    if !(1..=65535).contains(&p) {
        errs.push(FieldError::invalid(
            field,
            p,
            "must be between 1 and 65535, inclusive",
        ));
    }
}

pub(crate) fn check_enum(
    field: &str,
    v: &Option<String>,
    allowed: &[&str],
    errs: &mut Vec<FieldError>,
) {
    if let Some(v) = v
        && !allowed.contains(&v.as_str())
    {
        errs.push(FieldError::not_supported(field, v, allowed));
    }
}

/// Checks a CIDR block (the API crate's check) and returns it as an `IpNetwork` for the
/// containment and overlap checks.
pub fn check_cidr(field: &str, v: &str, errs: &mut Vec<FieldError>) -> Option<IpNetwork> {
    slipway_api::meta::check_cidr(field, v, errs)
        .and_then(|c| IpNetwork::new(c.addr, c.prefix).ok())
}

fn check_ip(field: &str, v: &str, errs: &mut Vec<FieldError>) {
    if v != "None" && !v.is_empty() {
        slipway_api::meta::check_ip(field, v, errs);
    }
}

impl Validate for Service {
    fn default_fields(&mut self) {
        let s = self.0.spec.get_or_insert_with(Default::default);
        s.type_.get_or_insert_with(|| "ClusterIP".into());
        s.session_affinity.get_or_insert_with(|| "None".into());
        for p in s.ports.iter_mut().flatten() {
            p.protocol.get_or_insert_with(|| "TCP".into());
            p.target_port.get_or_insert(IntOrString::Int(p.port));
        }
        if matches!(s.type_.as_deref(), Some("NodePort" | "LoadBalancer")) {
            s.external_traffic_policy
                .get_or_insert_with(|| "Cluster".into());
        }
    }

    fn validate(&self, errs: &mut Vec<FieldError>) {
        let Some(s) = &self.0.spec else {
            errs.push(FieldError::required("spec"));
            return;
        };
        check_enum("spec.type", &s.type_, SERVICE_TYPES, errs);
        check_enum(
            "spec.sessionAffinity",
            &s.session_affinity,
            &["None", "ClientIP"],
            errs,
        );
        check_enum(
            "spec.externalTrafficPolicy",
            &s.external_traffic_policy,
            &["Cluster", "Local"],
            errs,
        );
        check_enum(
            "spec.internalTrafficPolicy",
            &s.internal_traffic_policy,
            &["Cluster", "Local"],
            errs,
        );
        let ports = s.ports.as_deref().unwrap_or_default();
        if ports.is_empty() && s.type_.as_deref() != Some("ExternalName") {
            errs.push(FieldError::required("spec.ports"));
        }
        let mut names = std::collections::BTreeSet::new();
        let mut keys = std::collections::BTreeSet::new();
        for (i, p) in ports.iter().enumerate() {
            let f = at("spec.ports", i);
            check_port(&format!("{f}.port"), i64::from(p.port), errs);
            check_enum(&format!("{f}.protocol"), &p.protocol, PROTOCOLS, errs);
            match &p.name {
                None if ports.len() > 1 => errs.push(FieldError::required(format!("{f}.name"))),
                Some(n) => {
                    check_dns_label(&format!("{f}.name"), n, errs);
                    if !names.insert(n.clone()) {
                        errs.push(FieldError::duplicate(format!("{f}.name"), format!("{n:?}")));
                    }
                }
                None => {}
            }
            if !keys.insert((p.port, p.protocol.clone())) {
                errs.push(FieldError::duplicate(
                    f.clone(),
                    format!("port {} {:?}", p.port, p.protocol),
                ));
            }
            if let Some(IntOrString::Int(t)) = p.target_port {
                check_port(&format!("{f}.targetPort"), i64::from(t), errs);
            }
            if let Some(np) = p.node_port {
                check_port(&format!("{f}.nodePort"), i64::from(np), errs);
            }
        }
        if let Some(ip) = &s.cluster_ip {
            check_ip("spec.clusterIP", ip, errs);
        }
        if let Some(ip) = &s.load_balancer_ip {
            check_ip("spec.loadBalancerIP", ip, errs);
            if s.type_.as_deref() != Some("LoadBalancer") {
                errs.push(FieldError::forbidden(
                    "spec.loadBalancerIP",
                    "may only be set for type LoadBalancer",
                ));
            }
        }
        for (i, ip) in s.external_ips.iter().flatten().enumerate() {
            check_ip(&at("spec.externalIPs", i), ip, errs);
        }
        for (i, r) in s.load_balancer_source_ranges.iter().flatten().enumerate() {
            check_cidr(&at("spec.loadBalancerSourceRanges", i), r, errs);
        }
        if s.external_traffic_policy.is_some()
            && !matches!(s.type_.as_deref(), Some("NodePort" | "LoadBalancer"))
        {
            errs.push(FieldError::forbidden(
                "spec.externalTrafficPolicy",
                "may only be set for type NodePort or LoadBalancer",
            ));
        }
        if let Some(port) = s.health_check_node_port {
            if s.type_.as_deref() != Some("LoadBalancer") {
                errs.push(FieldError::forbidden(
                    "spec.healthCheckNodePort",
                    "may only be set when `type` is 'LoadBalancer'",
                ));
            }
            check_port("spec.healthCheckNodePort", i64::from(port), errs);
        }
        if s.type_.as_deref() == Some("ExternalName") && s.external_name.is_none() {
            errs.push(FieldError::required("spec.externalName"));
        }
    }
}

/// One endpoint address.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EndpointAddress {
    /// Pod IP.
    pub ip: String,
    /// Hostname.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    /// Node hosting the pod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_name: Option<String>,
    /// The pod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_ref: Option<Value>,
}

/// One endpoint port.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EndpointPort {
    /// Matches a Service port name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Port number.
    pub port: i64,
    /// Protocol.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<String>,
    /// Application protocol.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub app_protocol: Option<String>,
}

/// A set of addresses sharing ports.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EndpointSubset {
    /// Ready addresses.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub addresses: Option<Vec<EndpointAddress>>,
    /// Addresses not ready.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_ready_addresses: Option<Vec<EndpointAddress>>,
    /// Ports.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ports: Option<Vec<EndpointPort>>,
}

/// The backends of a Service (core/v1 Endpoints; upstream has no spec or status).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Endpoints {
    /// `v1`.
    #[serde(default)]
    pub api_version: String,
    /// `Endpoints`.
    #[serde(default)]
    pub kind: String,
    /// Metadata; the name matches the Service.
    #[serde(default)]
    pub metadata: ObjectMeta,
    /// Address sets.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subsets: Option<Vec<EndpointSubset>>,
}

impl Validate for Endpoints {
    fn validate(&self, errs: &mut Vec<FieldError>) {
        for (i, s) in self.subsets.iter().flatten().enumerate() {
            let f = at("subsets", i);
            for (j, a) in s.addresses.iter().flatten().enumerate() {
                if a.ip.parse::<IpAddr>().is_err() {
                    errs.push(FieldError::invalid(
                        format!("{f}.addresses[{j}].ip"),
                        &a.ip,
                        "must be a valid IP address",
                    ));
                }
            }
            for (j, p) in s.ports.iter().flatten().enumerate() {
                check_port(&format!("{f}.ports[{j}].port"), p.port, errs);
            }
        }
    }
}

/// Requests and limits.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ResourceRequirements {
    /// Limits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limits: Option<BTreeMap<String, Quantity>>,
    /// Requests.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requests: Option<BTreeMap<String, Quantity>>,
}

/// A Pod (core/v1), the upstream type: whatever kubectl and kube-rs send decodes, and a
/// field the upstream schema does not have is refused (see `registry::decode_upstream`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(transparent)]
#[schemars(transparent)]
pub struct Pod(pub k8s_openapi::api::core::v1::Pod);

/// Defaults of a Pod spec (also a workload template's).
pub fn default_pod_spec(spec: &mut k8s_openapi::api::core::v1::PodSpec) {
    spec.restart_policy.get_or_insert_with(|| "Always".into());
    spec.dns_policy.get_or_insert_with(|| "ClusterFirst".into());
}

/// Checks a Pod spec (also a workload template's) whose fields sit under `prefix`
/// (`spec`, `spec.template.spec`).
pub fn check_pod_spec(
    prefix: &str,
    spec: &k8s_openapi::api::core::v1::PodSpec,
    errs: &mut Vec<FieldError>,
) {
    if spec.containers.is_empty() {
        errs.push(FieldError::required(format!("{prefix}.containers")));
    }
    let mut names = std::collections::BTreeSet::new();
    for (i, c) in spec.containers.iter().enumerate() {
        let f = at(&format!("{prefix}.containers"), i);
        check_dns_label(&format!("{f}.name"), &c.name, errs);
        if !names.insert(c.name.clone()) {
            errs.push(FieldError::duplicate(
                format!("{f}.name"),
                format!("{:?}", c.name),
            ));
        }
        if c.image.as_deref().is_none_or(|i| i.trim().is_empty()) {
            errs.push(FieldError::required(format!("{f}.image")));
        }
        check_enum(
            &format!("{f}.imagePullPolicy"),
            &c.image_pull_policy,
            &["Always", "IfNotPresent", "Never"],
            errs,
        );
        for (j, p) in c.ports.iter().flatten().enumerate() {
            check_port(
                &format!("{f}.ports[{j}].containerPort"),
                i64::from(p.container_port),
                errs,
            );
        }
        let resources = c.resources.as_ref();
        for (what, list) in [
            ("requests", resources.and_then(|r| r.requests.as_ref())),
            ("limits", resources.and_then(|r| r.limits.as_ref())),
        ] {
            for (k, q) in list.into_iter().flatten() {
                if super::meta::parse_quantity(&q.0).is_none_or(|v| v < 0.0) {
                    errs.push(FieldError::invalid(
                        format!("{f}.resources.{what}[{k}]"),
                        format!("{:?}", q.0),
                        "must be a non-negative quantity such as 2, 500m or 4Gi",
                    ));
                }
            }
        }
    }
    check_enum(
        &format!("{prefix}.restartPolicy"),
        &spec.restart_policy,
        &["Always", "OnFailure", "Never"],
        errs,
    );
    check_enum(
        &format!("{prefix}.dnsPolicy"),
        &spec.dns_policy,
        &["ClusterFirstWithHostNet", "ClusterFirst", "Default", "None"],
        errs,
    );
    for (i, t) in spec.tolerations.iter().flatten().enumerate() {
        let f = at(&format!("{prefix}.tolerations"), i);
        check_enum(
            &format!("{f}.operator"),
            &t.operator,
            &["Exists", "Equal"],
            errs,
        );
        check_enum(&format!("{f}.effect"), &t.effect, TAINT_EFFECTS, errs);
    }
}

impl Validate for Pod {
    fn default_fields(&mut self) {
        default_pod_spec(self.0.spec.get_or_insert_with(Default::default));
    }
    fn validate(&self, errs: &mut Vec<FieldError>) {
        let Some(spec) = &self.0.spec else {
            errs.push(FieldError::required("spec"));
            return;
        };
        check_pod_spec("spec", spec, errs);
    }
}

/// A Node (core/v1), the upstream type (cluster-scoped): a host as a workload cluster sees it.
/// Decoded as [`Pod`] is: unknown fields are refused.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(transparent)]
#[schemars(transparent)]
pub struct Node(pub k8s_openapi::api::core::v1::Node);

pub(crate) const TAINT_EFFECTS: &[&str] = &["NoSchedule", "PreferNoSchedule", "NoExecute"];
const NODE_ADDRESS_TYPES: &[&str] = &[
    "Hostname",
    "InternalIP",
    "ExternalIP",
    "InternalDNS",
    "ExternalDNS",
];
const CONDITION_STATUSES: &[&str] = &["True", "False", "Unknown"];

impl Validate for Node {
    fn validate(&self, errs: &mut Vec<FieldError>) {
        if let Some(spec) = &self.0.spec {
            if let Some(c) = &spec.pod_cidr {
                check_cidr("spec.podCIDR", c, errs);
            }
            for (i, c) in spec.pod_cidrs.iter().flatten().enumerate() {
                check_cidr(&at("spec.podCIDRs", i), c, errs);
            }
            for (i, t) in spec.taints.iter().flatten().enumerate() {
                let f = at("spec.taints", i);
                if t.key.is_empty() {
                    errs.push(FieldError::required(format!("{f}.key")));
                }
                if !TAINT_EFFECTS.contains(&t.effect.as_str()) {
                    errs.push(FieldError::not_supported(
                        format!("{f}.effect"),
                        &t.effect,
                        TAINT_EFFECTS,
                    ));
                }
            }
        }
        let Some(status) = &self.0.status else { return };
        for (i, a) in status.addresses.iter().flatten().enumerate() {
            let f = at("status.addresses", i);
            if !NODE_ADDRESS_TYPES.contains(&a.type_.as_str()) {
                errs.push(FieldError::not_supported(
                    format!("{f}.type"),
                    &a.type_,
                    NODE_ADDRESS_TYPES,
                ));
            }
            if a.address.is_empty() {
                errs.push(FieldError::required(format!("{f}.address")));
            } else if matches!(a.type_.as_str(), "InternalIP" | "ExternalIP") {
                slipway_api::meta::check_ip(&format!("{f}.address"), &a.address, errs);
            }
        }
        for (field, list) in [
            ("status.capacity", &status.capacity),
            ("status.allocatable", &status.allocatable),
        ] {
            for (k, q) in list.iter().flatten() {
                if super::meta::parse_quantity(&q.0).is_none() {
                    errs.push(FieldError::invalid(
                        format!("{field}[{k}]"),
                        format!("{:?}", q.0),
                        "must be a quantity such as 2, 500m or 4Gi",
                    ));
                }
            }
        }
        for (i, c) in status.conditions.iter().flatten().enumerate() {
            let f = at("status.conditions", i);
            if c.type_.is_empty() {
                errs.push(FieldError::required(format!("{f}.type")));
            }
            if !CONDITION_STATUSES.contains(&c.status.as_str()) {
                errs.push(FieldError::not_supported(
                    format!("{f}.status"),
                    &c.status,
                    CONDITION_STATUSES,
                ));
            }
        }
    }
}

/// PVC spec.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PersistentVolumeClaimSpec {
    /// ReadWriteOnce, ReadOnlyMany, ReadWriteMany, ReadWriteOncePod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access_modes: Option<Vec<String>>,
    /// `requests.storage` is required.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    /// StorageClass to provision from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage_class_name: Option<String>,
    /// Filesystem (default) or Block.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume_mode: Option<String>,
    /// Bound volume.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume_name: Option<String>,
    /// Source snapshot or volume.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_source: Option<Value>,
}

kind!(
    /// A PersistentVolumeClaim (core/v1).
    PersistentVolumeClaim,
    PersistentVolumeClaimSpec,
    Value
);

const ACCESS_MODES: &[&str] = &[
    "ReadWriteOnce",
    "ReadOnlyMany",
    "ReadWriteMany",
    "ReadWriteOncePod",
];

impl Validate for PersistentVolumeClaim {
    fn default_fields(&mut self) {
        self.spec
            .volume_mode
            .get_or_insert_with(|| "Filesystem".into());
    }
    fn validate(&self, errs: &mut Vec<FieldError>) {
        let modes = self.spec.access_modes.as_deref().unwrap_or_default();
        if modes.is_empty() {
            errs.push(FieldError::required("spec.accessModes"));
        }
        for (i, m) in modes.iter().enumerate() {
            if !ACCESS_MODES.contains(&m.as_str()) {
                errs.push(FieldError::not_supported(
                    at("spec.accessModes", i),
                    m,
                    ACCESS_MODES,
                ));
            }
        }
        match self
            .spec
            .resources
            .as_ref()
            .and_then(|r| r.requests.as_ref())
            .and_then(|r| r.get("storage"))
        {
            None => errs.push(FieldError::required("spec.resources.requests.storage")),
            Some(q) if q.value().is_none_or(|v| v <= 0.0) => errs.push(FieldError::invalid(
                "spec.resources.requests.storage",
                q,
                "must be a positive quantity",
            )),
            Some(_) => {}
        }
        check_enum(
            "spec.volumeMode",
            &self.spec.volume_mode,
            &["Filesystem", "Block"],
            errs,
        );
    }
}

/// The object an Event is about.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ObjectReference {
    /// Kind.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    /// Namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// Name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// UID.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<String>,
    /// API version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_version: Option<String>,
    /// Resource version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource_version: Option<String>,
    /// Field path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field_path: Option<String>,
}

/// A core/v1 Event (upstream has no spec or status).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Event {
    /// `v1`.
    #[serde(default)]
    pub api_version: String,
    /// `Event`.
    #[serde(default)]
    pub kind: String,
    /// Metadata.
    #[serde(default)]
    pub metadata: ObjectMeta,
    /// The object this is about.
    #[serde(default)]
    pub involved_object: ObjectReference,
    /// Short machine reason.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Human message.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// Normal or Warning.
    #[serde(rename = "type", default, skip_serializing_if = "Option::is_none")]
    pub type_: Option<String>,
    /// Reporting component.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<Value>,
    /// First seen.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_timestamp: Option<String>,
    /// Last seen.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_timestamp: Option<String>,
    /// Occurrences.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub count: Option<i64>,
    /// Microsecond event time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event_time: Option<String>,
    /// Reporting controller.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reporting_component: Option<String>,
    /// Reporting instance.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reporting_instance: Option<String>,
    /// Action taken.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub action: Option<String>,
    /// Related object.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub related: Option<ObjectReference>,
    /// Series data.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub series: Option<Value>,
}

impl Validate for Event {
    fn validate(&self, errs: &mut Vec<FieldError>) {
        if self.involved_object.name.is_none() {
            errs.push(FieldError::required("involvedObject.name"));
        }
        check_enum("type", &self.type_, &["Normal", "Warning"], errs);
    }
}

/// A ConfigMap (core/v1), the upstream type: keys must be valid config keys, and a key may
/// not be in both `data` and `binaryData`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(transparent)]
#[schemars(transparent)]
pub struct ConfigMap(pub k8s_openapi::api::core::v1::ConfigMap);

/// Checks a ConfigMap or Secret key (`[-._a-zA-Z0-9]+`, at most 253 characters, not `.` or `..`).
pub fn check_config_key(field: &str, key: &str, errs: &mut Vec<FieldError>) {
    let ok = !key.is_empty()
        && key.len() <= 253
        && key != "."
        && key != ".."
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if !ok {
        errs.push(FieldError::invalid(
            field,
            format!("{key:?}"),
            "a valid config key must consist of alphanumeric characters, '-', '_' or '.'",
        ));
    }
}

impl Validate for ConfigMap {
    fn validate(&self, errs: &mut Vec<FieldError>) {
        let data = self.0.data.iter().flatten().map(|(k, _)| k);
        for k in data.clone() {
            check_config_key(&format!("data[{k}]"), k, errs);
        }
        for (k, _) in self.0.binary_data.iter().flatten() {
            check_config_key(&format!("binaryData[{k}]"), k, errs);
            if data.clone().any(|d| d == k) {
                errs.push(FieldError::invalid(
                    format!("binaryData[{k}]"),
                    format!("{k:?}"),
                    "duplicate of key present in data",
                ));
            }
        }
    }
}

/// A ServiceAccount (core/v1), the upstream type.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(transparent)]
#[schemars(transparent)]
pub struct ServiceAccount(pub k8s_openapi::api::core::v1::ServiceAccount);

impl Validate for ServiceAccount {
    fn validate(&self, _errs: &mut Vec<FieldError>) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_validation_reports_every_bad_field() {
        let svc: Service = serde_json::from_value(serde_json::json!({
            "spec": {
                "type": "Magic",
                "ports": [{"port": 0}, {"port": 70000, "protocol": "ICMP"}],
                "loadBalancerSourceRanges": ["10.0.0.0/33"],
            }
        }))
        .expect("decodes");
        let mut errs = Vec::new();
        svc.validate(&mut errs);
        let fields: Vec<&str> = errs.iter().map(|e| e.field.as_str()).collect();
        for f in [
            "spec.type",
            "spec.ports[0].port",
            "spec.ports[1].port",
            "spec.ports[1].protocol",
            "spec.ports[0].name",
            "spec.loadBalancerSourceRanges[0]",
        ] {
            assert!(fields.contains(&f), "{f} missing from {fields:?}");
        }
    }
}

/// A Secret (core/v1), the upstream type: `stringData` is folded into `data` on write, as
/// kube-apiserver does, so a stored Secret only ever holds `data`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(transparent)]
#[schemars(transparent)]
pub struct Secret(pub k8s_openapi::api::core::v1::Secret);

/// Whether `key` may name an entry of a Secret's or ConfigMap's data (`[-._a-zA-Z0-9]+`, at
/// most 253 characters, not `.` or `..`).
fn is_config_key(key: &str) -> bool {
    !key.is_empty()
        && key.len() <= 253
        && key != "."
        && key != ".."
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

impl Validate for Secret {
    fn default_fields(&mut self) {
        let s = &mut self.0;
        s.type_.get_or_insert_with(|| "Opaque".into());
        if let Some(strings) = s.string_data.take() {
            let data = s.data.get_or_insert_with(Default::default);
            for (k, v) in strings {
                data.insert(k, k8s_openapi::ByteString(v.into_bytes()));
            }
        }
    }

    fn validate(&self, errs: &mut Vec<FieldError>) {
        for k in self.0.data.iter().flat_map(BTreeMap::keys) {
            if !is_config_key(k) {
                errs.push(FieldError::invalid(
                    format!("data[{k}]"),
                    k,
                    "a valid config key must consist of alphanumeric characters, '-', '_' or '.'",
                ));
            }
        }
        let size: usize = self
            .0
            .data
            .iter()
            .flat_map(BTreeMap::values)
            .map(|v| v.0.len())
            .sum();
        if size > 1 << 20 {
            errs.push(FieldError::invalid(
                "data",
                format!("{size} bytes"),
                "a Secret holds at most 1048576 bytes",
            ));
        }
    }
}
