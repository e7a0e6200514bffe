//! Services as the local API takes them, their validation, and the datapath entries they make.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use ipnetwork::Ipv4Network;
use serde::{Deserialize, Serialize};
use slipway_api::networking::TrafficPolicy;
use slipway_api::{FieldError, FieldReason};
use slipway_dataplane::services::{Backend, ServiceKey};

use crate::Invalid;
use crate::args::NODE_PORTS;

/// A service as the local API takes it: a ClusterIP with ports, optionally a NodePort each, and
/// the pod addresses that back it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct LocalService {
    pub name: String,
    #[serde(rename = "clusterIP")]
    pub cluster_ip: Ipv4Addr,
    pub ports: Vec<LocalServicePort>,
    #[serde(default)]
    pub endpoints: Vec<Ipv4Addr>,
    /// Its load balancers' addresses (`status.loadBalancer.ingress`): served at each port like
    /// the node port, for a load balancer that sends the client's packets here as they are
    /// (direct server return, IP-in-IP) and for pods that connect to them.
    #[serde(
        default,
        rename = "loadBalancerIPs",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub load_balancer_ips: Vec<Ipv4Addr>,
    /// With Local, its node ports and load balancer addresses lead only to the endpoints on
    /// this node (the client's address kept), and none when it has none.
    #[serde(default, skip_serializing_if = "is_cluster")]
    pub external_traffic_policy: TrafficPolicy,
    /// Where this node answers whether it has an endpoint of the service (`GET` any path: 200,
    /// or 503 with none), as kube-proxy does; only with Local.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_check_node_port: Option<u16>,
}

fn is_cluster(p: &TrafficPolicy) -> bool {
    *p == TrafficPolicy::Cluster
}

impl LocalService {
    /// Its endpoints inside `block` (this node's).
    pub fn local_endpoints(&self, block: Ipv4Network) -> impl Iterator<Item = Ipv4Addr> + '_ {
        self.endpoints
            .iter()
            .copied()
            .filter(move |ip| block.contains(*ip))
    }
}

/// One port of a [`LocalService`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct LocalServicePort {
    pub port: u16,
    #[serde(default = "tcp")]
    pub protocol: String,
    pub target_port: u16,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_port: Option<u16>,
}

pub(crate) fn tcp() -> String {
    "TCP".to_owned()
}

/// Checks a service list: every bad field named, with its index.
pub fn validate_services(services: &[LocalService], pod_cidr: Ipv4Network) -> Result<(), Invalid> {
    let mut errors = Vec::new();
    let mut names = BTreeMap::new();
    let mut keys = BTreeMap::new();
    let mut node_ports = BTreeMap::new();
    for (i, svc) in services.iter().enumerate() {
        if svc.name.is_empty() {
            errors.push(FieldError::required(format!("services[{i}].name")));
        } else if let Some(j) = names.insert(svc.name.clone(), i) {
            errors.push(FieldError::duplicate(
                format!("services[{i}].name"),
                format!("{:?} is also services[{j}]", svc.name),
            ));
        }
        if pod_cidr.contains(svc.cluster_ip) || svc.cluster_ip.is_unspecified() {
            errors.push(FieldError::invalid(
                format!("services[{i}].clusterIP"),
                svc.cluster_ip,
                format!("must be outside the pod CIDR {pod_cidr} and not 0.0.0.0"),
            ));
        }
        if svc.ports.is_empty() {
            errors.push(FieldError::new(
                format!("services[{i}].ports"),
                FieldReason::Required,
                "at least one port",
            ));
        }
        for (k, port) in svc.ports.iter().enumerate() {
            let at = format!("services[{i}].ports[{k}]");
            if port.port == 0 {
                errors.push(FieldError::invalid(
                    format!("{at}.port"),
                    0,
                    "must be 1-65535",
                ));
            }
            if port.target_port == 0 {
                errors.push(FieldError::invalid(
                    format!("{at}.targetPort"),
                    0,
                    "must be 1-65535",
                ));
            }
            if !matches!(port.protocol.as_str(), "TCP" | "UDP") {
                errors.push(FieldError::not_supported(
                    format!("{at}.protocol"),
                    &port.protocol,
                    &["TCP", "UDP"],
                ));
            }
            if let Some(previous) = keys.insert(
                (svc.cluster_ip, port.port, port.protocol.clone()),
                at.clone(),
            ) {
                errors.push(FieldError::duplicate(
                    at.clone(),
                    format!(
                        "{}:{}/{} is also {previous}",
                        svc.cluster_ip, port.port, port.protocol
                    ),
                ));
            }
            if let Some(node_port) = port.node_port {
                if !NODE_PORTS.contains(&node_port) {
                    errors.push(FieldError::invalid(
                        format!("{at}.nodePort"),
                        node_port,
                        format!("must be in {}-{}", NODE_PORTS.start(), NODE_PORTS.end()),
                    ));
                }
                if let Some(previous) =
                    node_ports.insert((node_port, port.protocol.clone()), at.clone())
                {
                    errors.push(FieldError::duplicate(
                        format!("{at}.nodePort"),
                        format!("{node_port}/{} is also {previous}", port.protocol),
                    ));
                }
            }
        }
        for (k, ip) in svc.load_balancer_ips.iter().enumerate() {
            let at = format!("services[{i}].loadBalancerIPs[{k}]");
            if pod_cidr.contains(*ip) || ip.is_unspecified() {
                errors.push(FieldError::invalid(
                    at.clone(),
                    ip,
                    format!("must be outside the pod CIDR {pod_cidr} and not 0.0.0.0"),
                ));
            }
            for port in &svc.ports {
                if let Some(previous) =
                    keys.insert((*ip, port.port, port.protocol.clone()), at.clone())
                {
                    errors.push(FieldError::duplicate(
                        at.clone(),
                        format!("{ip}:{}/{} is also {previous}", port.port, port.protocol),
                    ));
                }
            }
        }
        if let Some(port) = svc.health_check_node_port {
            let at = format!("services[{i}].healthCheckNodePort");
            if svc.external_traffic_policy != TrafficPolicy::Local {
                errors.push(FieldError::forbidden(
                    at.clone(),
                    "only with externalTrafficPolicy Local",
                ));
            }
            if !NODE_PORTS.contains(&port) {
                errors.push(FieldError::invalid(
                    at.clone(),
                    port,
                    format!("must be in {}-{}", NODE_PORTS.start(), NODE_PORTS.end()),
                ));
            }
            if let Some(previous) = node_ports.insert((port, tcp()), at.clone()) {
                errors.push(FieldError::duplicate(
                    at,
                    format!("{port}/TCP is also {previous}"),
                ));
            }
        }
        for (k, ep) in svc.endpoints.iter().enumerate() {
            if !pod_cidr.contains(*ep) {
                errors.push(FieldError::invalid(
                    format!("services[{i}].endpoints[{k}]"),
                    ep,
                    format!("must be inside the pod CIDR {pod_cidr}"),
                ));
            }
        }
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(Invalid { errors })
    }
}

/// The datapath entries a service list asks for on a node with address `node_ip` and pod block
/// `block`: each port's ClusterIP key to the endpoints at the target port and, for traffic from
/// outside, the node's key (with a NodePort) and each load balancer address's key, to the same
/// endpoints or with Local to those in `block` only.
pub fn service_entries(
    services: &[LocalService],
    node_ip: Ipv4Addr,
    block: Ipv4Network,
) -> BTreeMap<ServiceKey, Vec<Backend>> {
    let mut entries = BTreeMap::new();
    for svc in services {
        for port in &svc.ports {
            let at_target = |ip: Ipv4Addr| Backend::new(ip, port.target_port);
            let backends: Vec<Backend> = svc.endpoints.iter().copied().map(at_target).collect();
            let external = match svc.external_traffic_policy {
                TrafficPolicy::Cluster => backends.clone(),
                TrafficPolicy::Local => svc.local_endpoints(block).map(at_target).collect(),
            };
            let key = |ip, p| {
                if port.protocol == "UDP" {
                    ServiceKey::udp(ip, p)
                } else {
                    ServiceKey::tcp(ip, p)
                }
            };
            entries.insert(key(svc.cluster_ip, port.port), backends);
            if let Some(node_port) = port.node_port {
                entries.insert(key(node_ip, node_port), external.clone());
            }
            for ip in &svc.load_balancer_ips {
                entries.insert(key(*ip, port.port), external.clone());
            }
        }
    }
    entries
}
