//! The LB fed from a Kubernetes API instead of its local socket (an edge host fed by the
//! supervisor, or MetalLB's role on any cluster): every Service of type LoadBalancer whose
//! status holds a VIP (`status.loadBalancer.ingress[0].ip`, written by whoever allocates VIPs:
//! the supervisor's LB reconciler) becomes a [`ServiceSpec`] with that VIP, its ports
//! (`targetPort` a number, or the port of that name in its EndpointSlices), its source ranges,
//! and as backends the ready addresses of its EndpointSlices (`kubernetes.io/service-name`).
//! A backend is health-checked by TCP connect to its first TCP target port, so a node that dies
//! leaves the ring within seconds even before its Node turns NotReady; with
//! `externalTrafficPolicy: Local` by an HTTP GET of its `healthCheckNodePort`, so only nodes
//! with a ready endpoint are in the ring. With the annotation
//! `slipway.dev/direct-server-return: "true"` (IPv4) the LB sends the client's packets to the
//! nodes inside IP-in-IP and the nodes answer the clients themselves.
//!
//! [`desired`] is pure; [`run`] lists and watches the two kinds and sends the whole desired set
//! after each change on a `watch` channel, which the daemon applies (`daemon::serve`): what the
//! daemon holds and the set lacks is deleted, so a feed is level-triggered like the rest.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::time::Duration;

use futures_util::StreamExt as _;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::api::{Api, ListParams};
use kube::runtime::{WatchStreamExt as _, watcher};
use kube::{Client, ResourceExt as _};
use slipway_api::networking::DSR_ANNOTATION;
use tokio::sync::watch;
use tracing::{debug, warn};

use crate::config::{
    BackendSpec, HealthCheckSpec, IpFamily, Protocol, ServicePort, ServiceSpec, SessionAffinity,
    TrafficPolicy,
};

/// The services the API wants served, by `namespace/name`.
pub type Desired = BTreeMap<String, ServiceSpec>;

/// The label that ties an EndpointSlice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// How often the feed lists again when nothing changes.
pub const PERIOD: Duration = Duration::from_secs(10);

/// The VIP a Service's status holds.
fn vip_of(svc: &Service) -> Option<IpAddr> {
    svc.status
        .as_ref()?
        .load_balancer
        .as_ref()?
        .ingress
        .as_ref()?
        .iter()
        .find_map(|i| i.ip.as_deref()?.parse().ok())
}

fn protocol(p: Option<&str>) -> Option<Protocol> {
    match p.unwrap_or("TCP") {
        "TCP" => Some(Protocol::Tcp),
        "UDP" => Some(Protocol::Udp),
        _ => None,
    }
}

/// The spec of one Service given its slices; `None` when it has no VIP yet or none of its
/// ports can be served (SCTP, a named target port no slice names).
pub fn spec_of(svc: &Service, slices: &[&EndpointSlice]) -> Option<ServiceSpec> {
    let spec = svc.spec.as_ref()?;
    if spec.type_.as_deref() != Some("LoadBalancer") {
        return None;
    }
    let vip = vip_of(svc)?;
    let slice_port = |name: &str| {
        slices
            .iter()
            .flat_map(|s| s.ports.iter().flatten())
            .find(|p| p.name.as_deref() == Some(name))
            .and_then(|p| p.port)
    };
    let ports: Vec<ServicePort> = spec
        .ports
        .iter()
        .flatten()
        .filter_map(|p| {
            let target = match &p.target_port {
                None => p.port,
                Some(IntOrString::Int(n)) => *n,
                Some(IntOrString::String(_)) => slice_port(p.name.as_deref()?)?,
            };
            Some(ServicePort {
                name: p.name.clone(),
                protocol: protocol(p.protocol.as_deref())?,
                port: u16::try_from(p.port).ok()?,
                target_port: u16::try_from(target).ok()?,
            })
        })
        .collect();
    if ports.is_empty() {
        return None;
    }
    let mut backends: BTreeSet<IpAddr> = BTreeSet::new();
    for slice in slices {
        for e in &slice.endpoints {
            let ready = e.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true);
            if !ready {
                continue;
            }
            backends.extend(
                e.addresses
                    .iter()
                    .filter_map(|a| a.parse::<IpAddr>().ok())
                    .filter(|a| a.is_ipv6() == vip.is_ipv6()),
            );
        }
    }
    let check = |port, http_path| HealthCheckSpec {
        interval_ms: 1000,
        timeout_ms: 500,
        rise: 2,
        fall: 2,
        port: Some(port),
        http_path,
    };
    // externalTrafficPolicy Local: a node serves only if it has a ready endpoint, which its
    // health-check node port says (kube-proxy's answer: 200, or 503 with none).
    let local_health = u16::try_from(spec.health_check_node_port.unwrap_or(0))
        .ok()
        .filter(|p| {
            *p != 0
                && TrafficPolicy::of(spec.external_traffic_policy.as_deref())
                    == TrafficPolicy::Local
        });
    let health_check = match local_health {
        Some(port) => Some(check(port, Some("/healthz".to_owned()))),
        None => ports
            .iter()
            .find(|p| p.protocol == Protocol::Tcp)
            .map(|p| check(p.target(), None)),
    };
    let direct_server_return =
        vip.is_ipv4() && svc.annotations().get(DSR_ANNOTATION).map(String::as_str) == Some("true");
    Some(ServiceSpec {
        namespace: svc.namespace().unwrap_or_default(),
        name: svc.name_any(),
        ports,
        ip_families: vec![IpFamily::of(vip)],
        load_balancer_ip: Some(vip),
        load_balancer_source_ranges: spec.load_balancer_source_ranges.clone().unwrap_or_default(),
        // The backends are nodes, which forward to the pods (with Local, only to their own):
        // to the LB every node is a backend like any other. With direct server return the
        // node answers the client itself, keeping its address; without, the LB translates
        // the source.
        external_traffic_policy: TrafficPolicy::Cluster,
        backends: backends
            .into_iter()
            .map(|ip| BackendSpec {
                ip,
                weight: 1,
                node_local: false,
            })
            .collect(),
        health_check,
        drain_timeout_secs: None,
        session_affinity: match spec.session_affinity.as_deref() {
            Some("ClientIP") => SessionAffinity::ClientIp,
            _ => SessionAffinity::None,
        },
        session_affinity_config: None,
        direct_server_return,
    })
}

/// What `services` and `slices` ask to be served.
pub fn desired(services: &[Service], slices: &[EndpointSlice]) -> Desired {
    let mut by_service: BTreeMap<(String, String), Vec<&EndpointSlice>> = BTreeMap::new();
    for s in slices {
        if let Some(name) = s.labels().get(SERVICE_NAME_LABEL) {
            by_service
                .entry((s.namespace().unwrap_or_default(), name.clone()))
                .or_default()
                .push(s);
        }
    }
    services
        .iter()
        .filter_map(|svc| {
            let slices = by_service
                .get(&(svc.namespace().unwrap_or_default(), svc.name_any()))
                .map(Vec::as_slice)
                .unwrap_or_default();
            let spec = spec_of(svc, slices)?;
            Some((spec.key(), spec))
        })
        .collect()
}

/// Lists and watches Services (those matching `labels`, if given) and EndpointSlices through
/// `client`, sending the desired set after every change and every [`PERIOD`]. Nothing is sent
/// until a list succeeds: an API that cannot be reached never empties the LB.
pub async fn run(client: Client, labels: Option<String>, tx: watch::Sender<Option<Desired>>) {
    let services: Api<Service> = Api::all(client.clone());
    let slices: Api<EndpointSlice> = Api::all(client);
    let svc_config = match &labels {
        Some(l) => watcher::Config::default().labels(l),
        None => watcher::Config::default(),
    };
    let list_params = match &labels {
        Some(l) => ListParams::default().labels(l),
        None => ListParams::default(),
    };
    let a = watcher(services.clone(), svc_config)
        .default_backoff()
        .map(|_| ());
    let b = watcher(slices.clone(), watcher::Config::default())
        .default_backoff()
        .map(|_| ());
    let mut events = futures_util::stream::select(a, b).boxed();
    let mut tick = tokio::time::interval(PERIOD);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = events.next() => {}
        }
        let listed = async {
            let s = services.list(&list_params).await?.items;
            let e = slices.list(&ListParams::default()).await?.items;
            Ok::<_, kube::Error>(desired(&s, &e))
        }
        .await;
        match listed {
            Ok(want) => {
                let changed = tx.borrow().as_ref() != Some(&want);
                if changed {
                    debug!(services = want.len(), "feed: desired services changed");
                    if tx.send(Some(want)).is_err() {
                        return;
                    }
                }
            }
            Err(e) => warn!(error = %e, "feed: listing services failed; keeping what is served"),
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn svc(value: serde_json::Value) -> Service {
        serde_json::from_value(value).unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn a_mirror_becomes_a_spec_with_its_vip_and_ready_nodes() {
        let services = [
            svc(json!({
                "metadata": {"name": "c1-default-web", "namespace": "team-a"},
                "spec": {"type": "LoadBalancer", "loadBalancerSourceRanges": ["10.0.0.0/8"],
                         "ports": [{"name": "http", "port": 80, "targetPort": 30080},
                                   {"name": "dns", "port": 53, "protocol": "UDP", "targetPort": "dns"}]},
                "status": {"loadBalancer": {"ingress": [{"ip": "10.99.100.1"}]}},
            })),
            svc(json!({
                "metadata": {"name": "pending", "namespace": "team-a"},
                "spec": {"type": "LoadBalancer", "ports": [{"port": 80}]},
            })),
        ];
        let slice: EndpointSlice = serde_json::from_value(json!({
            "metadata": {"name": "c1-default-web", "namespace": "team-a",
                         "labels": {SERVICE_NAME_LABEL: "c1-default-web"}},
            "addressType": "IPv4",
            "endpoints": [
                {"addresses": ["10.100.1.11"], "conditions": {"ready": true}},
                {"addresses": ["10.100.2.12"], "conditions": {"ready": false}},
            ],
            "ports": [{"name": "http", "port": 30080}, {"name": "dns", "port": 31053, "protocol": "UDP"}],
        }))
        .unwrap_or_else(|e| panic!("{e}"));
        let want = desired(&services, &[slice]);
        assert_eq!(want.len(), 1, "a Service without a VIP is not served yet");
        let spec = &want["team-a/c1-default-web"];
        assert_eq!(
            spec.load_balancer_ip,
            Some("10.99.100.1".parse().unwrap_or_else(|e| panic!("{e}")))
        );
        assert_eq!(
            spec.ports
                .iter()
                .map(|p| (p.protocol, p.port, p.target()))
                .collect::<Vec<_>>(),
            [(Protocol::Tcp, 80, 30080), (Protocol::Udp, 53, 31053)],
            "a named target port is found in the slice"
        );
        assert_eq!(
            spec.backends
                .iter()
                .map(|b| b.ip.to_string())
                .collect::<Vec<_>>(),
            ["10.100.1.11"],
            "only ready endpoints"
        );
        assert_eq!(spec.load_balancer_source_ranges, ["10.0.0.0/8"]);
        assert_eq!(spec.health_check.as_ref().and_then(|h| h.port), Some(30080));
        assert!(!spec.direct_server_return, "translated unless annotated");
        assert!(spec.validate().is_ok(), "{:?}", spec.validate());
    }

    /// externalTrafficPolicy Local with direct server return: the nodes are checked at the
    /// health-check node port over HTTP, and the packets go to them encapsulated.
    #[test]
    fn a_local_mirror_is_checked_at_its_health_port_and_sent_directly() {
        let services = [svc(json!({
            "metadata": {"name": "c1-default-web", "namespace": "team-a",
                         "annotations": {DSR_ANNOTATION: "true"}},
            "spec": {"type": "LoadBalancer", "externalTrafficPolicy": "Local",
                     "healthCheckNodePort": 31500,
                     "ports": [{"name": "http", "port": 80, "targetPort": 30080}]},
            "status": {"loadBalancer": {"ingress": [{"ip": "10.99.100.1"}]}},
        }))];
        let want = desired(&services, &[]);
        let spec = &want["team-a/c1-default-web"];
        let check = spec.health_check.as_ref().expect("a health check");
        assert_eq!(check.port, Some(31500));
        assert_eq!(check.http_path.as_deref(), Some("/healthz"));
        assert!(spec.direct_server_return);
        assert!(spec.validate().is_ok(), "{:?}", spec.validate());
    }
}
