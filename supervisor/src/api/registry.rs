//! The resource registry: every served kind with its path names, scope, schema, defaults and
//! validation, Table columns and strategic-merge keys. Discovery, OpenAPI, routing and patching
//! all read this one table.

use schemars::{JsonSchema, Schema, SchemaGenerator};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

use super::Validate;
use super::apps::{Deployment, ReplicaSet};
use super::coordination::Lease;
use super::core::{
    ConfigMap, Endpoints, Event, Namespace, Node, PersistentVolumeClaim, Pod, Secret, Service,
    ServiceAccount,
};
use super::discovery::EndpointSlice;
use super::networking::NetworkPolicy;
use super::rbac::RoleBinding;
use super::slipway::{Cluster, Host, HostClass, LoadBalancerPool, Zone};
use super::storage::StorageClass;
use slipway_api::meta::decode_strict;

use crate::error::{ApiError, FieldError};

mod columns;
pub(crate) use columns::{access_modes, phase_or_pending};
use columns::{
    condition, count, endpoints, event_last_seen, event_object, host_cluster, int_col,
    label_selector, map_len, node_address, node_roles, node_status, pod_ready, pod_selector, role,
    selector, service_external, service_ports, slice_endpoints, slice_ports, subjects,
    template_containers, wide, workers, zone_hosts,
};

/// One Table column: header, OpenAPI type, and how to compute the cell.
#[derive(Debug)]
pub struct Column {
    /// Header.
    pub name: &'static str,
    /// `string`, `integer`, `date`.
    pub type_: &'static str,
    /// Help text.
    pub description: &'static str,
    /// 0 = default view, 1 = `-o wide`.
    pub priority: u8,
    /// Cell value from the object.
    pub cell: fn(&Value) -> Value,
}

/// Decodes, defaults and validates a body: the normalized object and its bad fields, or why
/// it does not decode.
type DecodeFn = fn(Value) -> Result<(Value, Vec<FieldError>), String>;

/// A served resource type.
#[derive(Debug)]
pub struct ResourceType {
    /// API group (`""` for core).
    pub group: &'static str,
    /// API version.
    pub version: &'static str,
    /// Kind.
    pub kind: &'static str,
    /// Plural resource name used in paths.
    pub plural: &'static str,
    /// Singular name.
    pub singular: &'static str,
    /// Namespaced or cluster-scoped.
    pub namespaced: bool,
    /// kubectl short names.
    pub short_names: &'static [&'static str],
    /// Whether the kind has a `status` field (and so a `status` subresource).
    pub has_status: bool,
    /// Strategic-merge-patch list keys: dotted path (no indices) -> merge key
    /// (`""` = merge a list of scalars as a set).
    pub merge_keys: &'static [(&'static str, &'static str)],
    /// Extra Table columns between Name and Age.
    pub columns: Vec<Column>,
    pub(super) decode: DecodeFn,
    pub(super) schema: fn(&mut SchemaGenerator) -> Schema,
}

impl ResourceType {
    /// `group/version`, or `version` for core.
    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.to_string()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    /// Decodes a body strictly into the kind's serde type, applies defaults and validates.
    /// Returns the normalized object and every bad field; a body that does not decode (syntax,
    /// wrong type, unknown field) is a 400 naming the field.
    pub fn decode(&self, body: Value) -> Result<(Value, Vec<FieldError>), ApiError> {
        (self.decode)(body).map_err(|e| {
            ApiError::BadRequest(format!(
                "{} in version {:?} cannot be handled as a {}: strict decoding error: {e}",
                self.kind, self.version, self.kind
            ))
        })
    }

    /// The kind's JSON schema (inlined).
    pub fn schema(&self, generator: &mut SchemaGenerator) -> Schema {
        (self.schema)(generator)
    }

    /// Strategic-merge key of the list at `path`, if the list merges.
    pub fn merge_key(&self, path: &str) -> Option<&'static str> {
        COMMON_MERGE_KEYS
            .iter()
            .chain(self.merge_keys)
            .find(|(p, _)| *p == path)
            .map(|(_, k)| *k)
    }
}

/// Merge keys every built-in kind shares (ObjectMeta's patch strategies).
pub const COMMON_MERGE_KEYS: &[(&str, &str)] = &[
    ("metadata.finalizers", ""),
    ("metadata.ownerReferences", "uid"),
];

pub(super) fn decode<T: DeserializeOwned + Serialize + Validate>(
    body: Value,
) -> Result<(Value, Vec<FieldError>), String> {
    let mut obj: T = serde_path_to_error::deserialize(body).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner().to_string();
        if path == "." {
            inner
        } else {
            format!("{path}: {inner}")
        }
    })?;
    obj.default_fields();
    let mut errs = Vec::new();
    obj.validate(&mut errs);
    let value = serde_json::to_value(&obj).map_err(|e| e.to_string())?;
    Ok((value, errs))
}

/// Decodes an upstream kind (a k8s-openapi type). Those types pass over fields they do not
/// know, so a field that decoding and encoding again loses is unknown, and is refused as
/// kube-apiserver's strict decoding refuses it.
pub(super) fn decode_upstream<T: DeserializeOwned + Serialize + Validate>(
    body: Value,
) -> Result<(Value, Vec<FieldError>), String> {
    let (value, errs) = decode::<T>(body.clone())?;
    // Unknown fields are what the type does not keep, before defaulting moves any (a Secret's
    // stringData is folded into data).
    decode_strict::<T>(body)?;
    Ok((value, errs))
}

pub(super) fn schema<T: JsonSchema>(g: &mut SchemaGenerator) -> Schema {
    g.subschema_for::<T>()
}

/// Walks a dotted path (`spec.type`) into a JSON value.
pub fn jp<'a>(v: &'a Value, path: &str) -> Option<&'a Value> {
    path.split('.').try_fold(v, |cur, seg| cur.get(seg))
}

pub(super) fn s(v: &Value, path: &str) -> Value {
    match jp(v, path) {
        Some(Value::String(x)) if !x.is_empty() => Value::String(x.clone()),
        Some(Value::Number(n)) => Value::String(n.to_string()),
        Some(Value::Bool(b)) => Value::String(b.to_string()),
        _ => Value::String("<none>".into()),
    }
}

pub(super) fn col(
    name: &'static str,
    description: &'static str,
    cell: fn(&Value) -> Value,
) -> Column {
    Column {
        name,
        type_: "string",
        description,
        priority: 0,
        cell,
    }
}

const APPS_TEMPLATE_KEYS: &[(&str, &str)] = &[
    ("spec.template.spec.containers", "name"),
    ("spec.template.spec.containers.ports", "containerPort"),
    ("spec.template.spec.containers.env", "name"),
    ("spec.template.spec.volumes", "name"),
    ("status.conditions", "type"),
];

const CORE_POD_KEYS: &[(&str, &str)] = &[
    ("spec.containers", "name"),
    ("spec.containers.ports", "containerPort"),
    ("spec.containers.env", "name"),
    ("spec.volumes", "name"),
];

/// Every served resource type.
pub static RESOURCES: std::sync::LazyLock<Vec<ResourceType>> = std::sync::LazyLock::new(|| {
    vec![
        ResourceType {
            group: "",
            version: "v1",
            kind: "Namespace",
            plural: "namespaces",
            singular: "namespace",
            namespaced: false,
            short_names: &["ns"],
            has_status: true,
            merge_keys: &[],
            columns: vec![Column {
                name: "Status",
                type_: "string",
                description: "Phase",
                priority: 0,
                cell: |v| s(v, "status.phase"),
            }],
            decode: decode::<Namespace>,
            schema: schema::<Namespace>,
        },
        ResourceType {
            group: "",
            version: "v1",
            kind: "Service",
            plural: "services",
            singular: "service",
            namespaced: true,
            short_names: &["svc"],
            has_status: true,
            merge_keys: &[("spec.ports", "port")],
            columns: vec![
                Column {
                    name: "Type",
                    type_: "string",
                    description: "Service type",
                    priority: 0,
                    cell: |v| s(v, "spec.type"),
                },
                Column {
                    name: "Cluster-IP",
                    type_: "string",
                    description: "Virtual IP",
                    priority: 0,
                    cell: |v| s(v, "spec.clusterIP"),
                },
                Column {
                    name: "External-IP",
                    type_: "string",
                    description: "External IPs",
                    priority: 0,
                    cell: service_external,
                },
                Column {
                    name: "Port(s)",
                    type_: "string",
                    description: "Ports",
                    priority: 0,
                    cell: service_ports,
                },
                Column {
                    name: "Selector",
                    type_: "string",
                    description: "Pod selector",
                    priority: 1,
                    cell: selector,
                },
            ],
            decode: decode_upstream::<Service>,
            schema: schema::<Service>,
        },
        ResourceType {
            group: "",
            version: "v1",
            kind: "Endpoints",
            plural: "endpoints",
            singular: "endpoints",
            namespaced: true,
            short_names: &["ep"],
            has_status: false,
            merge_keys: &[],
            columns: vec![Column {
                name: "Endpoints",
                type_: "string",
                description: "Addresses",
                priority: 0,
                cell: endpoints,
            }],
            decode: decode::<Endpoints>,
            schema: schema::<Endpoints>,
        },
        ResourceType {
            group: "",
            version: "v1",
            kind: "Pod",
            plural: "pods",
            singular: "pod",
            namespaced: true,
            short_names: &["po"],
            has_status: true,
            merge_keys: CORE_POD_KEYS,
            columns: vec![
                Column {
                    name: "Ready",
                    type_: "string",
                    description: "Ready containers",
                    priority: 0,
                    cell: pod_ready,
                },
                Column {
                    name: "Status",
                    type_: "string",
                    description: "Phase",
                    priority: 0,
                    cell: phase_or_pending,
                },
                Column {
                    name: "IP",
                    type_: "string",
                    description: "Pod IP",
                    priority: 1,
                    cell: |v| s(v, "status.podIP"),
                },
                Column {
                    name: "Node",
                    type_: "string",
                    description: "Host",
                    priority: 1,
                    cell: |v| s(v, "spec.nodeName"),
                },
            ],
            decode: decode_upstream::<Pod>,
            schema: schema::<Pod>,
        },
        ResourceType {
            group: "",
            version: "v1",
            kind: "Node",
            plural: "nodes",
            singular: "node",
            namespaced: false,
            short_names: &["no"],
            has_status: true,
            merge_keys: &[
                ("spec.podCIDRs", ""),
                ("status.addresses", "type"),
                ("status.conditions", "type"),
            ],
            columns: vec![
                col("Status", "Ready condition", node_status),
                col("Roles", "node-role.kubernetes.io labels", node_roles),
                col("Version", "Kubelet version", |v| {
                    s(v, "status.nodeInfo.kubeletVersion")
                }),
                Column {
                    name: "Internal-IP",
                    type_: "string",
                    description: "InternalIP address",
                    priority: 1,
                    cell: |v| node_address(v, "InternalIP"),
                },
                Column {
                    name: "Zone",
                    type_: "string",
                    description: "topology.kubernetes.io/zone label",
                    priority: 1,
                    cell: |v| match jp(v, "metadata.labels")
                        .and_then(|l| l.get("topology.kubernetes.io/zone"))
                        .and_then(Value::as_str)
                    {
                        Some(z) => Value::String(z.into()),
                        None => Value::String("<none>".into()),
                    },
                },
            ],
            decode: decode_upstream::<Node>,
            schema: schema::<Node>,
        },
        ResourceType {
            group: "",
            version: "v1",
            kind: "ConfigMap",
            plural: "configmaps",
            singular: "configmap",
            namespaced: true,
            short_names: &["cm"],
            has_status: false,
            merge_keys: &[],
            columns: vec![int_col("Data", "Keys", |v| {
                Value::from(map_len(v, "data") + map_len(v, "binaryData"))
            })],
            decode: decode_upstream::<ConfigMap>,
            schema: schema::<ConfigMap>,
        },
        ResourceType {
            group: "",
            version: "v1",
            kind: "ServiceAccount",
            plural: "serviceaccounts",
            singular: "serviceaccount",
            namespaced: true,
            short_names: &["sa"],
            has_status: false,
            merge_keys: &[("secrets", "name")],
            columns: vec![int_col("Secrets", "Token secrets", |v| {
                Value::from(
                    v.get("secrets")
                        .and_then(Value::as_array)
                        .map_or(0, Vec::len),
                )
            })],
            decode: decode_upstream::<ServiceAccount>,
            schema: schema::<ServiceAccount>,
        },
        ResourceType {
            group: "apps",
            version: "v1",
            kind: "Deployment",
            plural: "deployments",
            singular: "deployment",
            namespaced: true,
            short_names: &["deploy"],
            has_status: true,
            merge_keys: APPS_TEMPLATE_KEYS,
            columns: vec![
                col("Ready", "Ready of desired replicas", |v| {
                    Value::String(format!(
                        "{}/{}",
                        count(v, "status.readyReplicas"),
                        count(v, "spec.replicas")
                    ))
                }),
                int_col("Up-to-date", "Replicas of the current template", |v| {
                    count(v, "status.updatedReplicas")
                }),
                int_col("Available", "Available replicas", |v| {
                    count(v, "status.availableReplicas")
                }),
                wide("Containers", "Container names", |v| {
                    template_containers(v, "name")
                }),
                wide("Images", "Container images", |v| {
                    template_containers(v, "image")
                }),
                wide("Selector", "Pod selector", label_selector),
            ],
            decode: decode_upstream::<Deployment>,
            schema: schema::<Deployment>,
        },
        ResourceType {
            group: "apps",
            version: "v1",
            kind: "ReplicaSet",
            plural: "replicasets",
            singular: "replicaset",
            namespaced: true,
            short_names: &["rs"],
            has_status: true,
            merge_keys: APPS_TEMPLATE_KEYS,
            columns: vec![
                int_col("Desired", "Desired replicas", |v| count(v, "spec.replicas")),
                int_col("Current", "Pods created", |v| count(v, "status.replicas")),
                int_col("Ready", "Ready pods", |v| count(v, "status.readyReplicas")),
                wide("Containers", "Container names", |v| {
                    template_containers(v, "name")
                }),
                wide("Images", "Container images", |v| {
                    template_containers(v, "image")
                }),
                wide("Selector", "Pod selector", label_selector),
            ],
            decode: decode_upstream::<ReplicaSet>,
            schema: schema::<ReplicaSet>,
        },
        ResourceType {
            group: "discovery.k8s.io",
            version: "v1",
            kind: "EndpointSlice",
            plural: "endpointslices",
            singular: "endpointslice",
            namespaced: true,
            short_names: &[],
            has_status: false,
            merge_keys: &[],
            columns: vec![
                col("AddressType", "IPv4, IPv6 or FQDN", |v| s(v, "addressType")),
                col("Ports", "Ports", slice_ports),
                col("Endpoints", "Addresses", slice_endpoints),
            ],
            decode: decode_upstream::<EndpointSlice>,
            schema: schema::<EndpointSlice>,
        },
        ResourceType {
            group: "",
            version: "v1",
            kind: "PersistentVolumeClaim",
            plural: "persistentvolumeclaims",
            singular: "persistentvolumeclaim",
            namespaced: true,
            short_names: &["pvc"],
            has_status: true,
            merge_keys: &[],
            columns: vec![
                Column {
                    name: "Status",
                    type_: "string",
                    description: "Phase",
                    priority: 0,
                    cell: phase_or_pending,
                },
                col("Volume", "Bound volume", |v| s(v, "spec.volumeName")),
                col("Capacity", "Capacity", |v| s(v, "status.capacity.storage")),
                col("Access Modes", "Access modes", access_modes),
                col("StorageClass", "StorageClass", |v| {
                    s(v, "spec.storageClassName")
                }),
            ],
            decode: decode::<PersistentVolumeClaim>,
            schema: schema::<PersistentVolumeClaim>,
        },
        ResourceType {
            group: "",
            version: "v1",
            kind: "Secret",
            plural: "secrets",
            singular: "secret",
            namespaced: true,
            short_names: &[],
            has_status: false,
            merge_keys: &[],
            columns: vec![
                col("Type", "Secret type", |v| s(v, "type")),
                Column {
                    name: "Data",
                    type_: "integer",
                    description: "Entries in data",
                    priority: 0,
                    cell: |v| {
                        Value::from(
                            jp(v, "data")
                                .and_then(Value::as_object)
                                .map_or(0, serde_json::Map::len),
                        )
                    },
                },
            ],
            decode: decode_upstream::<Secret>,
            schema: schema::<Secret>,
        },
        ResourceType {
            group: "",
            version: "v1",
            kind: "Event",
            plural: "events",
            singular: "event",
            namespaced: true,
            short_names: &["ev"],
            has_status: false,
            merge_keys: &[],
            columns: vec![
                col("Last Seen", "Last seen", event_last_seen),
                col("Type", "Normal or Warning", |v| s(v, "type")),
                col("Reason", "Reason", |v| s(v, "reason")),
                col("Object", "Involved object", event_object),
                col("Message", "Message", |v| s(v, "message")),
            ],
            decode: decode::<Event>,
            schema: schema::<Event>,
        },
        ResourceType {
            group: "networking.k8s.io",
            version: "v1",
            kind: "NetworkPolicy",
            plural: "networkpolicies",
            singular: "networkpolicy",
            namespaced: true,
            short_names: &["netpol"],
            has_status: false,
            merge_keys: &[],
            columns: vec![col("Pod-Selector", "Pods selected", pod_selector)],
            decode: decode_upstream::<NetworkPolicy>,
            schema: schema::<NetworkPolicy>,
        },
        ResourceType {
            group: "coordination.k8s.io",
            version: "v1",
            kind: "Lease",
            plural: "leases",
            singular: "lease",
            namespaced: true,
            short_names: &[],
            has_status: false,
            merge_keys: &[],
            columns: vec![col("Holder", "Holder identity", |v| {
                s(v, "spec.holderIdentity")
            })],
            decode: decode_upstream::<Lease>,
            schema: schema::<Lease>,
        },
        ResourceType {
            group: "storage.k8s.io",
            version: "v1",
            kind: "StorageClass",
            plural: "storageclasses",
            singular: "storageclass",
            namespaced: false,
            short_names: &["sc"],
            has_status: false,
            merge_keys: &[],
            columns: vec![
                col("Provisioner", "CSI driver", |v| s(v, "provisioner")),
                col("ReclaimPolicy", "Reclaim policy", |v| s(v, "reclaimPolicy")),
                col("VolumeBindingMode", "Binding mode", |v| {
                    s(v, "volumeBindingMode")
                }),
                col("AllowVolumeExpansion", "Expandable", |v| {
                    match jp(v, "allowVolumeExpansion") {
                        Some(Value::Bool(b)) => Value::String(b.to_string()),
                        _ => Value::String("false".into()),
                    }
                }),
            ],
            decode: decode::<StorageClass>,
            schema: schema::<StorageClass>,
        },
        ResourceType {
            group: "rbac.authorization.k8s.io",
            version: "v1",
            kind: "RoleBinding",
            plural: "rolebindings",
            singular: "rolebinding",
            namespaced: true,
            short_names: &[],
            has_status: false,
            merge_keys: &[],
            columns: vec![
                col("Role", "Role granted", role),
                Column {
                    name: "Users",
                    type_: "string",
                    description: "Users",
                    priority: 1,
                    cell: |v| subjects("User", v),
                },
                Column {
                    name: "Groups",
                    type_: "string",
                    description: "Groups",
                    priority: 1,
                    cell: |v| subjects("Group", v),
                },
            ],
            decode: decode::<RoleBinding>,
            schema: schema::<RoleBinding>,
        },
        ResourceType {
            group: "slipway.dev",
            version: "v1alpha1",
            kind: "HostClass",
            plural: "hostclasses",
            singular: "hostclass",
            namespaced: false,
            short_names: &["hc"],
            has_status: true,
            merge_keys: &[],
            columns: vec![
                Column {
                    name: "CPUs",
                    type_: "integer",
                    description: "Cores per host",
                    priority: 0,
                    cell: |v| jp(v, "spec.cpus").cloned().unwrap_or(Value::Null),
                },
                col("Memory", "Memory per host", |v| s(v, "spec.memory")),
            ],
            decode: decode::<HostClass>,
            schema: schema::<HostClass>,
        },
        ResourceType {
            group: "slipway.dev",
            version: "v1alpha1",
            kind: "Zone",
            plural: "zones",
            singular: "zone",
            namespaced: false,
            short_names: &["zn"],
            has_status: true,
            merge_keys: &[],
            columns: vec![
                Column {
                    name: "Hosts",
                    type_: "integer",
                    description: "Hosts in the zone",
                    priority: 0,
                    cell: zone_hosts,
                },
                col("CPU", "CPU capacity", |v| s(v, "spec.capacity.cpu")),
                col("Memory", "Memory capacity", |v| {
                    s(v, "spec.capacity.memory")
                }),
            ],
            decode: decode::<Zone>,
            schema: schema::<Zone>,
        },
        ResourceType {
            group: "slipway.dev",
            version: "v1alpha1",
            kind: "LoadBalancerPool",
            plural: "loadbalancerpools",
            singular: "loadbalancerpool",
            namespaced: false,
            short_names: &["lbpool"],
            has_status: true,
            merge_keys: &[],
            columns: vec![col("Addresses", "The blocks VIPs are taken from", |v| {
                jp(v, "spec.addresses")
                    .and_then(Value::as_array)
                    .map(|a| {
                        Value::String(
                            a.iter()
                                .filter_map(Value::as_str)
                                .collect::<Vec<_>>()
                                .join(","),
                        )
                    })
                    .unwrap_or(Value::Null)
            })],
            decode: decode::<LoadBalancerPool>,
            schema: schema::<LoadBalancerPool>,
        },
        ResourceType {
            group: "slipway.dev",
            version: "v1alpha1",
            kind: "Cluster",
            plural: "clusters",
            singular: "cluster",
            namespaced: true,
            short_names: &["cl"],
            has_status: true,
            merge_keys: &[],
            columns: vec![
                Column {
                    name: "Control Plane",
                    type_: "integer",
                    description: "Control plane replicas",
                    priority: 0,
                    cell: |v| {
                        jp(v, "spec.topology.controlPlane.replicas")
                            .cloned()
                            .unwrap_or(Value::Null)
                    },
                },
                Column {
                    name: "Workers",
                    type_: "integer",
                    description: "Worker replicas",
                    priority: 0,
                    cell: workers,
                },
                col("Phase", "Lifecycle phase", |v| s(v, "status.phase")),
                Column {
                    name: "Endpoint",
                    type_: "string",
                    description: "API endpoint",
                    priority: 1,
                    cell: |v| s(v, "status.apiEndpoint"),
                },
            ],
            decode: decode::<Cluster>,
            schema: schema::<Cluster>,
        },
        ResourceType {
            group: "slipway.dev",
            version: "v1alpha1",
            kind: "Host",
            plural: "hosts",
            singular: "host",
            namespaced: false,
            short_names: &[],
            has_status: true,
            merge_keys: &[("status.conditions", "type")],
            columns: vec![
                col("Zone", "Zone", |v| s(v, "spec.zone")),
                col("Class", "HostClass", |v| s(v, "spec.hostClass")),
                col("Provider", "netns or static", |v| s(v, "spec.provider")),
                col("Phase", "Lifecycle phase", |v| s(v, "status.phase")),
                col("Address", "Underlay address", |v| s(v, "status.address")),
                col("Ready", "Ready condition", |v| {
                    Value::String(condition(v, "Ready").unwrap_or("Unknown").into())
                }),
                Column {
                    name: "Cluster",
                    type_: "string",
                    description: "Cluster served (namespace/name)",
                    priority: 1,
                    cell: host_cluster,
                },
                Column {
                    name: "Pool",
                    type_: "string",
                    description: "Pool served",
                    priority: 1,
                    cell: |v| s(v, "spec.pool"),
                },
                Column {
                    name: "Agent",
                    type_: "string",
                    description: "Host agent version",
                    priority: 1,
                    cell: |v| s(v, "status.agentVersion"),
                },
            ],
            decode: decode::<Host>,
            schema: schema::<Host>,
        },
    ]
    .into_iter()
    .chain(super::volumes::resources())
    .collect()
});

/// Finds a resource type by group, version and plural.
pub fn lookup(group: &str, version: &str, plural: &str) -> Option<&'static ResourceType> {
    RESOURCES
        .iter()
        .find(|r| r.group == group && r.version == version && r.plural == plural)
}

/// Finds a resource type by kind.
pub fn by_kind(group: &str, kind: &str) -> Option<&'static ResourceType> {
    RESOURCES
        .iter()
        .find(|r| r.group == group && r.kind == kind)
}

#[cfg(test)]
mod tests;
