//! From upstream kinds (k8s-openapi types, as any kube-apiserver serves them) to the lists the
//! agent applies: Nodes to hosts, Services and EndpointSlices to services, Namespaces, Pods and
//! NetworkPolicies to the policy state. Pure: no I/O, so it is unit-tested without a cluster.
//! An object that cannot be converted is skipped with a reason naming it; the rest of its list
//! goes on.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::sync::Arc;

use ipnetwork::Ipv4Network;
use k8s_openapi::api::core::v1 as core;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use slipway_cni::policy::compile::{ContainerPort, Namespace, Pod};
use slipway_cni::policy::types::{NetworkPolicy, ObjectMeta, PolicyExt};

use crate::args::NODE_PORTS;
use crate::hosts::Host;
use crate::services::{LocalService, LocalServicePort};
use slipway_api::networking::TrafficPolicy;

/// The label that ties an EndpointSlice to its Service (discovery.k8s.io/v1).
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// A converted list, sorted by name, and why objects were left out of it.
#[derive(Debug, PartialEq, Eq)]
pub struct Converted<T> {
    pub items: Vec<T>,
    /// `<kind> <namespace/name>: <reason>`, one per object (or part of one) left out.
    pub skipped: Vec<String>,
}

impl<T> Default for Converted<T> {
    fn default() -> Self {
        Self {
            items: Vec::new(),
            skipped: Vec::new(),
        }
    }
}

fn name_of(meta: &ObjectMeta) -> String {
    match (&meta.namespace, &meta.name) {
        (Some(ns), Some(name)) => format!("{ns}/{name}"),
        (None, Some(name)) => name.clone(),
        _ => "(unnamed)".to_owned(),
    }
}

/// Each Node other than `me` with a `spec.podCIDR` inside `pod_cidr` and an IPv4 `InternalIP`,
/// as a host whose pod block is routed to that address.
pub fn hosts(
    nodes: &[Arc<core::Node>],
    me: Option<&str>,
    pod_cidr: Ipv4Network,
) -> Converted<Host> {
    let mut out = Converted::default();
    for node in nodes {
        let name = node.metadata.name.clone().unwrap_or_default();
        if name.is_empty() || Some(name.as_str()) == me {
            continue;
        }
        // A Node without a podCIDR has no pods to route to yet: not an error.
        let Some(cidr) = node.spec.as_ref().and_then(|s| s.pod_cidr.as_deref()) else {
            continue;
        };
        let block = match cidr.parse::<Ipv4Network>() {
            Ok(block)
                if pod_cidr.contains(block.network()) && pod_cidr.prefix() <= block.prefix() =>
            {
                block
            }
            Ok(_) => {
                out.skipped.push(format!(
                    "Node {name}: spec.podCIDR {cidr} is not inside the pod CIDR {pod_cidr}"
                ));
                continue;
            }
            Err(_) => {
                out.skipped.push(format!(
                    "Node {name}: spec.podCIDR {cidr:?} is not an IPv4 CIDR"
                ));
                continue;
            }
        };
        let address = node
            .status
            .as_ref()
            .and_then(|s| s.addresses.as_ref())
            .into_iter()
            .flatten()
            .filter(|a| a.type_ == "InternalIP")
            .find_map(|a| a.address.parse::<Ipv4Addr>().ok());
        let Some(address) = address else {
            out.skipped.push(format!(
                "Node {name}: status.addresses has no IPv4 InternalIP"
            ));
            continue;
        };
        out.items.push(Host {
            name,
            address,
            pod_block: block,
        });
    }
    out.items.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

/// Each Service with an IPv4 ClusterIP (headless and ExternalName ones have none to translate)
/// as a service named `namespace/name`: its ports (with their NodePorts for types NodePort and
/// LoadBalancer), backed by the ready IPv4 endpoints of its EndpointSlices, at the target port
/// the slices name for each port.
pub fn services(
    services: &[Arc<core::Service>],
    slices: &[Arc<EndpointSlice>],
    pod_cidr: Ipv4Network,
) -> Converted<LocalService> {
    let mut out = Converted::default();
    let mut by_service: BTreeMap<(String, String), Vec<&EndpointSlice>> = BTreeMap::new();
    for slice in slices {
        if slice.address_type != "IPv4" {
            continue;
        }
        let labels = slice.metadata.labels.as_ref();
        let Some(owner) = labels.and_then(|l| l.get(SERVICE_NAME_LABEL)) else {
            continue;
        };
        let ns = slice.metadata.namespace.clone().unwrap_or_default();
        by_service
            .entry((ns, owner.clone()))
            .or_default()
            .push(slice);
    }
    for svc in services {
        let key = name_of(&svc.metadata);
        let Some(spec) = svc.spec.as_ref() else {
            continue;
        };
        let kind = spec.type_.as_deref().unwrap_or("ClusterIP");
        if kind == "ExternalName" {
            continue;
        }
        let cluster_ip = match spec.cluster_ip.as_deref() {
            // Headless, or not allocated yet.
            None | Some("") | Some("None") => continue,
            Some(ip) => match ip.parse::<Ipv4Addr>() {
                Ok(ip) => ip,
                // IPv6 services are not translated by this datapath.
                Err(_) if ip.contains(':') => continue,
                Err(_) => {
                    out.skipped.push(format!(
                        "Service {key}: spec.clusterIP {ip:?} is not an IP address"
                    ));
                    continue;
                }
            },
        };
        if pod_cidr.contains(cluster_ip) {
            out.skipped.push(format!(
                "Service {key}: spec.clusterIP {cluster_ip} is inside the pod CIDR {pod_cidr}"
            ));
            continue;
        }
        let ns = svc.metadata.namespace.clone().unwrap_or_default();
        let name = svc.metadata.name.clone().unwrap_or_default();
        let slices = by_service
            .get(&(ns, name))
            .map(Vec::as_slice)
            .unwrap_or(&[]);
        let mut ports = Vec::new();
        for (k, port) in spec.ports.iter().flatten().enumerate() {
            let at = format!("Service {key}: spec.ports[{k}]");
            let protocol = port.protocol.clone().unwrap_or_else(crate::services::tcp);
            if !matches!(protocol.as_str(), "TCP" | "UDP") {
                out.skipped
                    .push(format!("{at}: protocol {protocol} is not translated"));
                continue;
            }
            let Some(number) = u16::try_from(port.port).ok().filter(|p| *p != 0) else {
                out.skipped
                    .push(format!("{at}: port {} is not 1-65535", port.port));
                continue;
            };
            let port_name = port.name.clone().unwrap_or_default();
            // The slices say which port the endpoints listen on (a named targetPort resolves
            // per pod); without slices the Service's own number stands.
            let target = slices
                .iter()
                .flat_map(|s| s.ports.iter().flatten())
                .filter(|p| p.name.clone().unwrap_or_default() == port_name)
                .filter(|p| p.protocol.as_deref().unwrap_or("TCP") == protocol)
                .find_map(|p| {
                    p.port
                        .and_then(|n| u16::try_from(n).ok())
                        .filter(|n| *n != 0)
                })
                .or(match &port.target_port {
                    Some(IntOrString::Int(n)) => u16::try_from(*n).ok().filter(|n| *n != 0),
                    _ => None,
                })
                .unwrap_or(number);
            let node_port = if matches!(kind, "NodePort" | "LoadBalancer") {
                match port.node_port.map(u16::try_from) {
                    Some(Ok(p)) if NODE_PORTS.contains(&p) => Some(p),
                    Some(_) => {
                        out.skipped.push(format!(
                            "{at}: nodePort {:?} is outside {}-{}",
                            port.node_port,
                            NODE_PORTS.start(),
                            NODE_PORTS.end()
                        ));
                        None
                    }
                    None => None,
                }
            } else {
                None
            };
            ports.push(LocalServicePort {
                port: number,
                protocol,
                target_port: target,
                node_port,
            });
        }
        if ports.is_empty() {
            out.skipped
                .push(format!("Service {key}: no TCP or UDP port"));
            continue;
        }
        let mut endpoints = BTreeSet::new();
        for slice in slices {
            for ep in &slice.endpoints {
                // Ready unless the slice says it is not (discovery.k8s.io/v1: nil means ready).
                if ep.conditions.as_ref().and_then(|c| c.ready) == Some(false) {
                    continue;
                }
                for address in &ep.addresses {
                    match address.parse::<Ipv4Addr>() {
                        Ok(ip) if pod_cidr.contains(ip) => {
                            endpoints.insert(ip);
                        }
                        _ => out.skipped.push(format!(
                            "EndpointSlice {}: endpoint {address} is not an address of the pod \
                             CIDR {pod_cidr}",
                            name_of(&slice.metadata)
                        )),
                    }
                }
            }
        }
        let external = matches!(kind, "NodePort" | "LoadBalancer");
        let external_traffic_policy = if external {
            TrafficPolicy::of(spec.external_traffic_policy.as_deref())
        } else {
            TrafficPolicy::Cluster
        };
        let load_balancer_ips = svc
            .status
            .as_ref()
            .and_then(|s| s.load_balancer.as_ref())
            .and_then(|lb| lb.ingress.as_ref())
            .into_iter()
            .flatten()
            .filter_map(|i| i.ip.as_deref()?.parse::<Ipv4Addr>().ok())
            .filter(|_| kind == "LoadBalancer")
            .collect();
        let health_check_node_port = spec
            .health_check_node_port
            .filter(|_| external_traffic_policy == TrafficPolicy::Local)
            .and_then(|p| u16::try_from(p).ok())
            .filter(|p| NODE_PORTS.contains(p));
        out.items.push(LocalService {
            name: key,
            cluster_ip,
            ports,
            endpoints: endpoints.into_iter().collect(),
            load_balancer_ips,
            external_traffic_policy,
            health_check_node_port,
        });
    }
    out.items.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

/// Every Namespace with its labels.
pub fn namespaces(namespaces: &[Arc<core::Namespace>]) -> Converted<Namespace> {
    let mut items: Vec<Namespace> = namespaces
        .iter()
        .filter_map(|ns| {
            Some(Namespace {
                name: ns.metadata.name.clone()?,
                labels: ns.metadata.labels.clone().unwrap_or_default(),
            })
        })
        .collect();
    items.sort_by(|a, b| a.name.cmp(&b.name));
    Converted {
        items,
        skipped: Vec::new(),
    }
}

/// Every Pod with a podIP in `pod_cidr` that has not terminated: its namespace, name, labels
/// and named container ports. Host-network Pods (their IP is the node's) and Pods without an
/// address yet are not endpoints of policy.
pub fn pods(pods: &[Arc<core::Pod>], pod_cidr: Ipv4Network) -> Converted<Pod> {
    let mut out = Converted::default();
    for pod in pods {
        let status = pod.status.as_ref();
        // A terminated Pod's address may already be another's.
        if matches!(
            status.and_then(|s| s.phase.as_deref()),
            Some("Succeeded" | "Failed")
        ) {
            continue;
        }
        let Some(ip) = status
            .and_then(|s| s.pod_ip.as_deref())
            .and_then(|ip| ip.parse::<Ipv4Addr>().ok())
            .filter(|ip| pod_cidr.contains(*ip))
        else {
            continue;
        };
        let (Some(namespace), Some(name)) =
            (pod.metadata.namespace.clone(), pod.metadata.name.clone())
        else {
            continue;
        };
        let mut ports = Vec::new();
        let containers = pod
            .spec
            .as_ref()
            .map(|s| s.containers.as_slice())
            .unwrap_or(&[]);
        for port in containers.iter().flat_map(|c| c.ports.iter().flatten()) {
            let Some(port_name) = port.name.clone() else {
                continue;
            };
            match u16::try_from(port.container_port) {
                Ok(number) if number != 0 => ports.push(ContainerPort {
                    name: port_name,
                    container_port: number,
                    protocol: port.protocol.clone().unwrap_or_else(crate::services::tcp),
                }),
                _ => out.skipped.push(format!(
                    "Pod {namespace}/{name}: port {port_name}: containerPort {} is not 1-65535",
                    port.container_port
                )),
            }
        }
        out.items.push(Pod {
            namespace,
            name,
            ip,
            labels: pod.metadata.labels.clone().unwrap_or_default(),
            ports,
        });
    }
    out.items.sort_by_key(Pod::key);
    out
}

/// Every NetworkPolicy the policy compiler can take (its metadata reduced to namespace and
/// name); one it cannot take (a bad selector, an IPv6 block) is skipped with the reason.
pub fn policies(policies: &[Arc<NetworkPolicy>]) -> Converted<NetworkPolicy> {
    let mut out = Converted::default();
    for policy in policies {
        let key = name_of(&policy.metadata);
        let (Some(namespace), Some(name)) = (&policy.metadata.namespace, &policy.metadata.name)
        else {
            continue;
        };
        let converted = NetworkPolicy {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                namespace: Some(namespace.clone()),
                ..ObjectMeta::default()
            },
            spec: policy.spec.clone(),
        };
        let errors = converted.validate();
        if !errors.is_empty() {
            out.skipped
                .push(format!("NetworkPolicy {key}: {}", errors.join("; ")));
            continue;
        }
        out.items.push(converted);
    }
    out.items.sort_by_key(|p| p.key());
    out
}

/// Keeps the longest list whose items pass `valid` together: when the whole list does not (two
/// Services claim one NodePort, two Nodes one block), items are admitted one by one in order
/// and each one that breaks the list is skipped with the validator's reason.
pub fn admit<T>(
    converted: &mut Converted<T>,
    describe: impl Fn(&T) -> String,
    valid: impl Fn(&[T]) -> Result<(), Vec<String>>,
) {
    if valid(&converted.items).is_ok() {
        return;
    }
    let mut admitted: Vec<T> = Vec::with_capacity(converted.items.len());
    for item in std::mem::take(&mut converted.items) {
        admitted.push(item);
        if let Err(errors) = valid(&admitted) {
            let item = admitted.pop().map(|i| describe(&i)).unwrap_or_default();
            converted
                .skipped
                .push(format!("{item}: {}", errors.join("; ")));
        }
    }
    converted.items = admitted;
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn cidr() -> Ipv4Network {
        "10.244.0.0/16".parse().expect("cidr")
    }

    fn from<T: serde::de::DeserializeOwned>(value: serde_json::Value) -> Arc<T> {
        Arc::new(serde_json::from_value(value).expect("object"))
    }

    #[test]
    fn nodes_with_a_block_and_an_internal_ip_are_hosts_but_this_one() {
        let node = |name: &str, cidr: Option<&str>, ip: &str| {
            from::<core::Node>(json!({
                "metadata": {"name": name},
                "spec": {"podCIDR": cidr},
                "status": {"addresses": [
                    {"type": "Hostname", "address": name},
                    {"type": "InternalIP", "address": ip},
                ]},
            }))
        };
        let nodes = [
            node("n1", Some("10.244.1.0/24"), "10.99.0.1"),
            node("n2", Some("10.244.2.0/24"), "10.99.0.2"),
            node("n3", None, "10.99.0.3"),
            node("n4", Some("10.245.0.0/24"), "10.99.0.4"),
            node("n5", Some("10.244.5.0/24"), "fd00::5"),
        ];
        let out = hosts(&nodes, Some("n1"), cidr());
        assert_eq!(
            out.items,
            [Host {
                name: "n2".into(),
                address: Ipv4Addr::new(10, 99, 0, 2),
                pod_block: "10.244.2.0/24".parse().expect("block"),
            }]
        );
        assert_eq!(out.skipped.len(), 2, "{:?}", out.skipped);
        assert!(
            out.skipped[0].starts_with("Node n4: spec.podCIDR"),
            "{:?}",
            out.skipped
        );
        assert!(out.skipped[1].contains("n5") && out.skipped[1].contains("InternalIP"));
    }

    #[test]
    fn services_take_ready_endpoints_and_the_slices_target_port() {
        let svcs = [
            from::<core::Service>(json!({
                "metadata": {"name": "web", "namespace": "shop"},
                "spec": {"type": "NodePort", "clusterIP": "10.96.0.10", "ports": [
                    {"name": "http", "port": 80, "targetPort": "http", "nodePort": 30080},
                ]},
            })),
            from::<core::Service>(json!({
                "metadata": {"name": "db", "namespace": "shop"},
                "spec": {"clusterIP": "10.96.0.11", "ports": [{"port": 5432, "targetPort": 5433, "nodePort": 30001}]},
            })),
            from::<core::Service>(json!({
                "metadata": {"name": "headless", "namespace": "shop"},
                "spec": {"clusterIP": "None", "ports": [{"port": 80}]},
            })),
            from::<core::Service>(json!({
                "metadata": {"name": "v6", "namespace": "shop"},
                "spec": {"clusterIP": "fd00::10", "ports": [{"port": 80}]},
            })),
        ];
        let slices = [from::<EndpointSlice>(json!({
            "metadata": {"name": "web-abc", "namespace": "shop",
                         "labels": {"kubernetes.io/service-name": "web"}},
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
            "endpoints": [
                {"addresses": ["10.244.1.5"], "conditions": {"ready": true}},
                {"addresses": ["10.244.2.7"]},
                {"addresses": ["10.244.2.8"], "conditions": {"ready": false}},
            ],
        }))];
        let out = services(&svcs, &slices, cidr());
        assert!(out.skipped.is_empty(), "{:?}", out.skipped);
        let names: Vec<&str> = out.items.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["shop/db", "shop/web"]);
        let db = &out.items[0];
        // No slice: no backends, the Service's own targetPort, and no NodePort for a ClusterIP.
        assert!(db.endpoints.is_empty());
        assert_eq!(db.ports[0].target_port, 5433);
        assert_eq!(db.ports[0].node_port, None);
        let web = &out.items[1];
        assert_eq!(web.cluster_ip, Ipv4Addr::new(10, 96, 0, 10));
        assert_eq!(
            web.endpoints,
            [Ipv4Addr::new(10, 244, 1, 5), Ipv4Addr::new(10, 244, 2, 7)]
        );
        assert_eq!(
            web.ports,
            [LocalServicePort {
                port: 80,
                protocol: "TCP".into(),
                target_port: 8080,
                node_port: Some(30080),
            }]
        );
    }

    /// A LoadBalancer Service with externalTrafficPolicy Local: its VIP and health-check node
    /// port are taken; from outside (node port, VIP) only this node's endpoints serve, from a
    /// pod (ClusterIP) every endpoint.
    #[test]
    fn a_local_load_balancer_serves_its_vip_from_this_nodes_endpoints() {
        let svc = from::<core::Service>(json!({
            "metadata": {"name": "web", "namespace": "shop"},
            "spec": {"type": "LoadBalancer", "clusterIP": "10.96.0.10",
                     "externalTrafficPolicy": "Local", "healthCheckNodePort": 31000,
                     "ports": [{"port": 80, "targetPort": 8080, "nodePort": 30080}]},
            "status": {"loadBalancer": {"ingress": [{"ip": "10.124.100.1"}, {"ip": "fd00::1"}]}},
        }));
        let slice = from::<EndpointSlice>(json!({
            "metadata": {"name": "web-abc", "namespace": "shop",
                         "labels": {"kubernetes.io/service-name": "web"}},
            "addressType": "IPv4",
            "endpoints": [{"addresses": ["10.244.1.5"]}, {"addresses": ["10.244.2.7"]}],
        }));
        let out = services(&[svc], &[slice], cidr());
        let web = &out.items[0];
        assert_eq!(web.load_balancer_ips, [Ipv4Addr::new(10, 124, 100, 1)]);
        assert_eq!(web.external_traffic_policy, TrafficPolicy::Local);
        assert_eq!(web.health_check_node_port, Some(31000));
        crate::services::validate_services(&out.items, cidr()).expect("valid");
        let node = Ipv4Addr::new(10, 99, 0, 1);
        let block: Ipv4Network = "10.244.1.0/24".parse().expect("block");
        let entries = crate::services::service_entries(&out.items, node, block);
        let backends = |ip: [u8; 4], port| {
            let key = slipway_dataplane::services::ServiceKey::tcp(Ipv4Addr::from(ip), port);
            entries[&key].iter().map(|b| b.ip).collect::<Vec<_>>()
        };
        let local = [Ipv4Addr::new(10, 244, 1, 5)];
        assert_eq!(backends([10, 124, 100, 1], 80), local);
        assert_eq!(backends([10, 99, 0, 1], 30080), local);
        assert_eq!(backends([10, 96, 0, 10], 80).len(), 2);
    }

    #[test]
    fn pods_and_namespaces_become_the_policy_lists() {
        let pod = |name: &str, ip: Option<&str>, phase: &str| {
            from::<core::Pod>(json!({
                "metadata": {"name": name, "namespace": "shop", "labels": {"app": name}},
                "spec": {"containers": [{"name": "c", "ports": [
                    {"name": "http", "containerPort": 8080},
                    {"containerPort": 9090},
                ]}]},
                "status": {"phase": phase, "podIP": ip},
            }))
        };
        let out = pods(
            &[
                pod("a", Some("10.244.1.5"), "Running"),
                pod("pending", None, "Pending"),
                pod("host", Some("10.99.0.1"), "Running"),
                pod("done", Some("10.244.1.6"), "Succeeded"),
            ],
            cidr(),
        );
        assert!(out.skipped.is_empty(), "{:?}", out.skipped);
        assert_eq!(out.items.len(), 1);
        let a = &out.items[0];
        assert_eq!(
            (a.key(), a.ip),
            ("shop/a".into(), Ipv4Addr::new(10, 244, 1, 5))
        );
        assert_eq!(a.labels["app"], "a");
        assert_eq!(a.ports.len(), 1);
        assert_eq!(
            (a.ports[0].name.as_str(), a.ports[0].container_port),
            ("http", 8080)
        );
        let ns = namespaces(&[from(
            json!({"metadata": {"name": "shop", "labels": {"team": "x"}}}),
        )]);
        assert_eq!(ns.items[0].name, "shop");
        assert_eq!(ns.items[0].labels["team"], "x");
    }

    #[test]
    fn a_policy_the_compiler_cannot_take_is_skipped_by_name() {
        let good = from::<NetworkPolicy>(json!({
            "metadata": {"name": "allow-web", "namespace": "shop"},
            "spec": {"podSelector": {"matchLabels": {"app": "db"}},
                     "policyTypes": ["Ingress"],
                     "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "web"}}}],
                                  "ports": [{"port": 5432, "protocol": "TCP"}]}]},
        }));
        let bad = from::<NetworkPolicy>(json!({
            "metadata": {"name": "bad", "namespace": "shop"},
            "spec": {"podSelector": {"matchExpressions": [{"key": "app", "operator": "Near"}]}},
        }));
        let out = policies(&[good, bad]);
        assert_eq!(out.items.len(), 1);
        assert_eq!(out.items[0].name(), "allow-web");
        assert_eq!(out.items[0].ingress()[0].ports().len(), 1);
        assert_eq!(out.skipped.len(), 1);
        assert!(
            out.skipped[0].starts_with("NetworkPolicy shop/bad: ")
                && out.skipped[0].contains("operator"),
            "{:?}",
            out.skipped
        );
    }

    #[test]
    fn admit_drops_only_the_items_that_break_the_list() {
        let mut list = Converted {
            items: vec![1, 2, 2, 3, 3],
            skipped: vec![],
        };
        admit(
            &mut list,
            |i| format!("item {i}"),
            |items| {
                let unique: BTreeSet<_> = items.iter().collect();
                if unique.len() == items.len() {
                    Ok(())
                } else {
                    Err(vec!["listed twice".into()])
                }
            },
        );
        assert_eq!(list.items, [1, 2, 3]);
        assert_eq!(
            list.skipped,
            ["item 2: listed twice", "item 3: listed twice"]
        );
    }
}
