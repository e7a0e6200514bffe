//! Service address allocation: each Service (but ExternalName and headless ones) gets a
//! ClusterIP from the configured services CIDR, and each port of a NodePort or LoadBalancer
//! Service a node port from the node-port range. An allocation is a store record
//! (`/slipway/alloc/...`) naming its Service, created, moved or deleted in the same
//! transaction as the Service itself, so two Services never hold the same address and a
//! deleted Service releases its own. A record whose Service is gone or no longer holds it (a
//! namespace deleted wholesale) is stale and may be taken over.

use std::collections::{BTreeMap, BTreeSet};
use std::hash::BuildHasher;
use std::net::IpAddr;

use ipnetwork::IpNetwork;
use serde_json::{Value, json};

use super::AdmissionConfig;
use crate::error::{ApiError, FieldError};
use crate::store::{AnyStore, Cas, Store};

/// Prefix of every allocation record.
pub const ALLOC_PREFIX: &str = "/slipway/alloc/";
const IP_PREFIX: &str = "/slipway/alloc/serviceips/";
const PORT_PREFIX: &str = "/slipway/alloc/nodeports/";

/// The services network of a server: where ClusterIPs and node ports come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServiceNetwork {
    /// ClusterIPs are allocated from this block (kube-apiserver's
    /// `--service-cluster-ip-range`).
    pub cidr: IpNetwork,
    /// Node ports are allocated from this inclusive range (`--service-node-port-range`).
    pub node_ports: (u16, u16),
}

impl Default for ServiceNetwork {
    fn default() -> Self {
        Self {
            cidr: IpNetwork::V4(
                ipnetwork::Ipv4Network::new(std::net::Ipv4Addr::new(10, 96, 0, 0), 12)
                    .unwrap_or_else(|_| unreachable!("10.96.0.0/12 is a valid block")),
            ),
            node_ports: (30000, 32767),
        }
    }
}

impl ServiceNetwork {
    /// How many addresses ClusterIPs are taken from (network and broadcast excluded).
    fn ip_slots(&self) -> u128 {
        let bits = match self.cidr {
            IpNetwork::V4(_) => 32,
            IpNetwork::V6(_) => 128,
        } - u32::from(self.cidr.prefix());
        if bits >= 127 {
            u128::MAX
        } else {
            (1u128 << bits).saturating_sub(2).max(1)
        }
    }

    /// The `n`th allocatable address (0-based, after the network address).
    fn ip_at(&self, n: u128) -> IpAddr {
        match self.cidr {
            IpNetwork::V4(net) => {
                let base = u32::from(net.network());
                IpAddr::V4(std::net::Ipv4Addr::from(
                    base.wrapping_add(1).wrapping_add(n as u32),
                ))
            }
            IpNetwork::V6(net) => {
                let base = u128::from(net.network());
                IpAddr::V6(std::net::Ipv6Addr::from(
                    base.wrapping_add(1).wrapping_add(n),
                ))
            }
        }
    }
}

/// Which Service a record belongs to.
fn owner(obj: &Value) -> Value {
    json!({
        "namespace": obj.pointer("/metadata/namespace"),
        "name": obj.pointer("/metadata/name"),
        "uid": obj.pointer("/metadata/uid"),
    })
}

fn record(obj: &Value) -> Result<Vec<u8>, ApiError> {
    serde_json::to_vec(&owner(obj)).map_err(|e| ApiError::Internal(e.to_string()))
}

fn ip_key(ip: &str) -> String {
    format!("{IP_PREFIX}{ip}")
}

fn port_key(port: i64) -> String {
    format!("{PORT_PREFIX}{port}")
}

fn str_at<'a>(v: &'a Value, pointer: &str) -> Option<&'a str> {
    v.pointer(pointer).and_then(Value::as_str)
}

/// The ClusterIP a Service holds (not `None`, not empty).
fn held_ip(svc: &Value) -> Option<&str> {
    str_at(svc, "/spec/clusterIP").filter(|ip| !ip.is_empty() && *ip != "None")
}

fn has_node_ports(svc: &Value) -> bool {
    matches!(str_at(svc, "/spec/type"), Some("NodePort" | "LoadBalancer"))
}

/// Whether node ports are given to the ports that ask for none: not for a LoadBalancer that
/// says `allocateLoadBalancerNodePorts: false` (upstream's field: load balancers that reach
/// their backends without node ports, such as the supervisor's mirrors of workload Services).
fn allocates_node_ports(svc: &Value) -> bool {
    !(str_at(svc, "/spec/type") == Some("LoadBalancer")
        && svc.pointer("/spec/allocateLoadBalancerNodePorts") == Some(&Value::Bool(false)))
}

/// The node ports a Service holds, by (port, protocol).
fn held_ports(svc: &Value) -> BTreeMap<(i64, String), i64> {
    let mut out = BTreeMap::new();
    for p in svc
        .pointer("/spec/ports")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        if let (Some(port), Some(np)) = (
            p.get("port").and_then(Value::as_i64),
            p.get("nodePort").and_then(Value::as_i64),
        ) {
            let proto = p.get("protocol").and_then(Value::as_str).unwrap_or("TCP");
            out.insert((port, proto.to_string()), np);
        }
    }
    out
}

/// Whether a Service gets a health-check node port: a LoadBalancer with externalTrafficPolicy
/// Local, as kube-apiserver gives one, unless it allocates no node ports (a mirror of the
/// supervisor's keeps the workload cluster's port as given: it names a port of that cluster's
/// nodes, not one of this server's).
fn allocates_health_port(svc: &Value) -> bool {
    str_at(svc, "/spec/type") == Some("LoadBalancer")
        && str_at(svc, "/spec/externalTrafficPolicy") == Some("Local")
        && allocates_node_ports(svc)
}

/// The health-check node port a Service holds.
fn held_health_port(svc: &Value) -> Option<i64> {
    svc.pointer("/spec/healthCheckNodePort")
        .and_then(Value::as_i64)
        .filter(|_| allocates_health_port(svc))
}

/// The store keys of everything a Service holds.
fn held_keys(svc: &Value) -> Vec<String> {
    let mut keys: Vec<String> = held_ip(svc).map(ip_key).into_iter().collect();
    keys.extend(held_ports(svc).values().map(|p| port_key(*p)));
    keys.extend(held_health_port(svc).map(port_key));
    keys
}

/// Whether the record at `key` (with value `record`) is still held by a live Service.
async fn live(store: &AnyStore, key: &str, record: &[u8]) -> Result<bool, ApiError> {
    let Ok(rec) = serde_json::from_slice::<Value>(record) else {
        return Ok(false);
    };
    let (Some(ns), Some(name)) = (str_at(&rec, "/namespace"), str_at(&rec, "/name")) else {
        return Ok(false);
    };
    let Some(kv) = store
        .get(&format!("/registry/core/services/{ns}/{name}"))
        .await?
    else {
        return Ok(false);
    };
    let Ok(svc) = serde_json::from_slice::<Value>(&kv.value) else {
        return Ok(false);
    };
    Ok(svc.pointer("/metadata/uid") == rec.get("uid") && held_keys(&svc).iter().any(|k| k == key))
}

/// What taking `key` for `obj` takes: a create when free, a takeover when stale, `None` when
/// a live Service holds it (or when `obj` itself holds it already: no step).
async fn take(store: &AnyStore, key: &str, obj: &Value) -> Result<Option<Option<Cas>>, ApiError> {
    let record = record(obj)?;
    match store.get(key).await? {
        None => Ok(Some(Some(Cas::create(key, record)))),
        Some(kv) => {
            let rec: Value = serde_json::from_slice(&kv.value).unwrap_or(Value::Null);
            if rec == owner(obj) {
                return Ok(Some(None));
            }
            if live(store, key, &kv.value).await? {
                Ok(None)
            } else {
                Ok(Some(Some(Cas::update(key, record, kv.revision))))
            }
        }
    }
}

fn invalid(obj: &Value, causes: Vec<FieldError>) -> ApiError {
    ApiError::Invalid {
        kind: "Service".into(),
        name: str_at(obj, "/metadata/name").unwrap_or_default().into(),
        causes,
    }
}

/// Fills `new`'s ClusterIP and node ports (kept from `old`, as asked, or allocated) and returns
/// the store steps that take what it newly holds and release what it no longer holds. Refuses
/// (422 naming the field) an address outside the range, taken by another Service, or a
/// changed ClusterIP.
pub async fn allocate(
    store: &AnyStore,
    cfg: &AdmissionConfig,
    old: Option<&Value>,
    new: &mut Value,
) -> Result<Vec<Cas>, ApiError> {
    let net = cfg.services;
    let mut errs = Vec::new();
    let mut steps = Vec::new();
    let external_name = str_at(new, "/spec/type") == Some("ExternalName");
    let old_ip = old.and_then(held_ip).map(String::from);
    let asked = str_at(new, "/spec/clusterIP").map(String::from);
    let ip: Option<String> = match (asked.as_deref(), old_ip.as_deref()) {
        _ if external_name => None,
        (Some("None"), None) => None,
        (Some(a), Some(o)) if !a.is_empty() && a != o => {
            errs.push(FieldError::invalid(
                "spec.clusterIP",
                format!("{a:?}"),
                "field is immutable",
            ));
            None
        }
        (_, Some(o)) => Some(o.to_string()),
        (Some(a), None) if !a.is_empty() => {
            match a.parse::<IpAddr>() {
                Ok(addr) if net.cidr.contains(addr) => match take(store, &ip_key(a), new).await? {
                    Some(step) => steps.extend(step),
                    None => errs.push(FieldError::invalid(
                        "spec.clusterIP",
                        format!("{a:?}"),
                        "provided IP is already allocated",
                    )),
                },
                // A malformed address was refused by validation already.
                _ => errs.push(FieldError::invalid(
                    "spec.clusterIP",
                    format!("{a:?}"),
                    format!(
                        "provided IP is not in the valid range. The range of valid IPs is {}",
                        net.cidr
                    ),
                )),
            }
            Some(a.to_string())
        }
        _ => {
            let (used, _) = store.list(IP_PREFIX).await?;
            let used: BTreeSet<&str> = used
                .iter()
                .filter_map(|kv| kv.key.strip_prefix(IP_PREFIX))
                .collect();
            let slots = net.ip_slots();
            let start = std::collections::hash_map::RandomState::new()
                .hash_one(owner(new).to_string()) as u128
                % slots;
            let found = (0..slots.min(used.len() as u128 + 1))
                .map(|i| net.ip_at((start + i) % slots).to_string())
                .find(|ip| !used.contains(ip.as_str()));
            match found {
                Some(ip) => {
                    // Free when listed: a concurrent taker makes the transaction fail on
                    // this key, and the write allocates again.
                    steps.push(Cas::create(&ip_key(&ip), record(new)?));
                    Some(ip)
                }
                None => {
                    return Err(ApiError::Internal(format!(
                        "failed to allocate a serviceIP: range {} is full",
                        net.cidr
                    )));
                }
            }
        }
    };
    if let Some(spec) = new.get_mut("spec").and_then(Value::as_object_mut) {
        match &ip {
            Some(ip) => {
                spec.insert("clusterIP".into(), json!(ip));
                spec.insert("clusterIPs".into(), json!([ip]));
            }
            None if !external_name => {
                spec.insert("clusterIP".into(), json!("None"));
                spec.insert("clusterIPs".into(), json!(["None"]));
            }
            None => {}
        }
    }
    if let Some(o) = old_ip.as_deref()
        && ip.as_deref() != Some(o)
        && let Some(kv) = store.get(&ip_key(o)).await?
    {
        steps.push(Cas::delete(&kv.key, kv.revision));
    }
    node_ports(store, net, old, new, &mut steps, &mut errs).await?;
    if !errs.is_empty() {
        return Err(invalid(new, errs));
    }
    Ok(steps)
}

/// The node-port half of [`allocate`].
async fn node_ports(
    store: &AnyStore,
    net: ServiceNetwork,
    old: Option<&Value>,
    new: &mut Value,
    steps: &mut Vec<Cas>,
    errs: &mut Vec<FieldError>,
) -> Result<(), ApiError> {
    let old_ports = old
        .filter(|o| has_node_ports(o))
        .map(held_ports)
        .unwrap_or_default();
    let wants = has_node_ports(new);
    let snapshot = new.clone();
    let Some(ports) = new.pointer_mut("/spec/ports").and_then(Value::as_array_mut) else {
        return release_ports(store, &old_ports, &BTreeSet::new(), steps).await;
    };
    let mut alloc = PortAlloc {
        store,
        net,
        svc: &snapshot,
        steps,
        errs,
        used: None,
        taken: BTreeSet::new(),
    };
    for (i, p) in ports.iter_mut().enumerate() {
        let field = format!("spec.ports[{i}].nodePort");
        let asked = p.get("nodePort").and_then(Value::as_i64);
        if !wants {
            if let Some(np) = asked {
                alloc.errs.push(FieldError::forbidden(
                    field,
                    format!(
                        "may not be used when `type` is {:?} (nodePort {np})",
                        str_at(&snapshot, "/spec/type").unwrap_or("ClusterIP")
                    ),
                ));
            }
            continue;
        }
        let port = p.get("port").and_then(Value::as_i64).unwrap_or(0);
        let proto = p
            .get("protocol")
            .and_then(Value::as_str)
            .unwrap_or("TCP")
            .to_string();
        let kept = old_ports.get(&(port, proto)).copied();
        if asked.or(kept).is_none() && !allocates_node_ports(&snapshot) {
            continue;
        }
        let held = old_ports.values().any(|o| Some(*o) == asked.or(kept));
        let Some(np) = alloc.port(&field, asked.or(kept), held, i).await? else {
            continue;
        };
        if let Some(m) = p.as_object_mut() {
            m.insert("nodePort".into(), json!(np));
        }
    }
    // The health-check node port, from the same range; a LoadBalancer that no longer asks for
    // one (externalTrafficPolicy Cluster) loses it, as kube-apiserver clears it.
    let old_health = old.and_then(held_health_port);
    if !allocates_health_port(&snapshot)
        && allocates_node_ports(&snapshot)
        && let Some(spec) = new.get_mut("spec").and_then(Value::as_object_mut)
    {
        spec.remove("healthCheckNodePort");
    }
    if allocates_health_port(&snapshot) {
        let asked = snapshot
            .pointer("/spec/healthCheckNodePort")
            .and_then(Value::as_i64)
            .or(old_health);
        let held = asked.is_some() && asked == old_health;
        if let Some(np) = alloc
            .port("spec.healthCheckNodePort", asked, held, usize::MAX)
            .await?
            && let Some(spec) = new.get_mut("spec").and_then(Value::as_object_mut)
        {
            spec.insert("healthCheckNodePort".into(), json!(np));
        }
    }
    let mut old_held = old_ports;
    if let Some(np) = old_health {
        old_held.insert((0, "healthCheckNodePort".into()), np);
    }
    release_ports(store, &old_held, &alloc.taken, alloc.steps).await
}

/// One node port of a Service being given: kept, taken as asked, or allocated.
struct PortAlloc<'a> {
    store: &'a AnyStore,
    net: ServiceNetwork,
    svc: &'a Value,
    steps: &'a mut Vec<Cas>,
    errs: &'a mut Vec<FieldError>,
    /// The ports every Service holds, listed once when the first one is allocated.
    used: Option<BTreeSet<i64>>,
    /// The ports this Service holds after this write.
    taken: BTreeSet<i64>,
}

impl PortAlloc<'_> {
    /// The port for `field`: `asked` (already `held` by the Service, or taken now), else one
    /// allocated (its search starting from a hash of the Service and `salt`). `None` with an
    /// error recorded when the asked port is out of range, taken, or listed twice.
    async fn port(
        &mut self,
        field: &str,
        asked: Option<i64>,
        held: bool,
        salt: usize,
    ) -> Result<Option<i64>, ApiError> {
        let (lo, hi) = self.net.node_ports;
        let np = match asked {
            Some(np) if held => np,
            Some(np) => {
                if !(i64::from(lo)..=i64::from(hi)).contains(&np) {
                    self.errs.push(FieldError::invalid(
                        field,
                        np,
                        format!("provided port is not in the valid range. The range of valid ports is {lo}-{hi}"),
                    ));
                    return Ok(None);
                }
                match take(self.store, &port_key(np), self.svc).await? {
                    Some(step) => self.steps.extend(step),
                    None => {
                        self.errs.push(FieldError::invalid(
                            field,
                            np,
                            "provided port is already allocated",
                        ));
                        return Ok(None);
                    }
                }
                np
            }
            None => {
                if self.used.is_none() {
                    let (records, _) = self.store.list(PORT_PREFIX).await?;
                    self.used = Some(
                        records
                            .iter()
                            .filter_map(|kv| kv.key.strip_prefix(PORT_PREFIX)?.parse().ok())
                            .collect(),
                    );
                }
                let busy = self.used.as_ref().map_or(&self.taken, |u| u);
                let span = i64::from(hi) - i64::from(lo) + 1;
                let start = std::collections::hash_map::RandomState::new()
                    .hash_one((owner(self.svc).to_string(), salt))
                    as i64;
                let found = (0..span)
                    .map(|k| i64::from(lo) + (start.rem_euclid(span) + k) % span)
                    .find(|c| !busy.contains(c) && !self.taken.contains(c));
                let Some(np) = found else {
                    return Err(ApiError::Internal(format!(
                        "failed to allocate a nodePort: range {lo}-{hi} is full"
                    )));
                };
                self.steps
                    .push(Cas::create(&port_key(np), record(self.svc)?));
                np
            }
        };
        if !self.taken.insert(np) {
            self.errs.push(FieldError::duplicate(field, np));
            return Ok(None);
        }
        Ok(Some(np))
    }
}

/// Steps releasing the node ports of `old` no longer held.
async fn release_ports(
    store: &AnyStore,
    old: &BTreeMap<(i64, String), i64>,
    kept: &BTreeSet<i64>,
    steps: &mut Vec<Cas>,
) -> Result<(), ApiError> {
    for np in old.values().filter(|p| !kept.contains(p)) {
        if let Some(kv) = store.get(&port_key(*np)).await? {
            steps.push(Cas::delete(&kv.key, kv.revision));
        }
    }
    Ok(())
}

/// Steps releasing everything a deleted Service held (records it still owns).
pub async fn release(store: &AnyStore, svc: &Value) -> Result<Vec<Cas>, ApiError> {
    let mut steps = Vec::new();
    for key in held_keys(svc) {
        if let Some(kv) = store.get(&key).await?
            && serde_json::from_slice::<Value>(&kv.value).ok() == Some(owner(svc))
        {
            steps.push(Cas::delete(&key, kv.revision));
        }
    }
    Ok(steps)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_skip_the_network_address() {
        let net = ServiceNetwork {
            cidr: "10.0.0.0/30".parse().expect("cidr"),
            node_ports: (30000, 30001),
        };
        assert_eq!(net.ip_slots(), 2);
        assert_eq!(net.ip_at(0).to_string(), "10.0.0.1");
        assert_eq!(net.ip_at(1).to_string(), "10.0.0.2");
        let v6 = ServiceNetwork {
            cidr: "fd00::/120".parse().expect("cidr"),
            node_ports: (30000, 30001),
        };
        assert_eq!(v6.ip_at(0).to_string(), "fd00::1");
    }

    #[test]
    fn held_addresses_are_read_from_the_object() {
        let svc = json!({"spec": {"type": "NodePort", "clusterIP": "10.0.0.5",
            "ports": [{"port": 80, "protocol": "TCP", "nodePort": 30080}, {"port": 53, "protocol": "UDP"}]}});
        assert_eq!(
            held_keys(&svc),
            [
                "/slipway/alloc/serviceips/10.0.0.5",
                "/slipway/alloc/nodeports/30080"
            ]
        );
        assert!(held_ip(&json!({"spec": {"clusterIP": "None"}})).is_none());
    }
}
