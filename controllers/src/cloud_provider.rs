//! The cloud provider's load balancer half (upstream's service controller with Slipway's
//! supervisor as the cloud): each Service of type LoadBalancer in the workload cluster is
//! mirrored into the cluster's supervisor namespace through the [`SupervisorLink`], and the VIP
//! the supervisor gives the mirror is written back to the Service's `status.loadBalancer`.
//!
//! The mirror is a core Service named [`mirror_name`], labelled with the cluster
//! (`slipway.dev/cluster`) and annotated with the workload Service it stands for: selector-less,
//! `allocateLoadBalancerNodePorts: false`, each port's `targetPort` the workload Service's node
//! port, with its `loadBalancerIP`, `loadBalancerSourceRanges`, `externalTrafficPolicy`,
//! `healthCheckNodePort` and `ipFamilies`, and annotated `slipway.dev/direct-server-return:
//! "true"` unless the Service says `"false"`. Its backends are an EndpointSlice of the same name:
//! the cluster's Nodes' InternalIPs, ready as the Nodes are, with the node ports as its ports
//! (a Service without a selector and a slice written by hand, as upstream does for backends
//! outside the cluster). A refusal (condition `VIPAllocated=False`) becomes a Warning Event on
//! the workload Service.
//!
//! Level-triggered: every workload Service or Node event, every mirror event and every
//! [`PERIOD`] it lists the three and writes only the difference; a mirror whose Service is gone
//! (or no longer a LoadBalancer) is deleted, so a provider killed at any line converges.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt as _;
use k8s_openapi::api::core::v1::{Node, Service, ServicePort, ServiceSpec};
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::{WatchStreamExt as _, watcher};
use kube::{Client, Resource as _, ResourceExt};
use serde_json::json;
use slipway_api::networking::DSR_ANNOTATION;
use tracing::{info, warn};

use crate::endpointslice::{MANAGED_BY_LABEL, SERVICE_NAME_LABEL};
use crate::events::{self, Type};
use crate::placement::ZONE_LABEL;
use crate::wake::Wakeups;
use crate::{Error, Options, SupervisorLink, api_err};

const NAME: &str = "cloud-provider";

/// The label naming the Cluster a mirror belongs to (the supervisor's LB reconciler serves
/// Services that carry it).
pub const CLUSTER_LABEL: &str = "slipway.dev/cluster";
/// The annotation naming the workload Service (`namespace/name`) a mirror stands for.
pub const SOURCE_ANNOTATION: &str = "slipway.dev/service";
/// The managed-by value of the mirrors' EndpointSlices.
pub const MANAGED_BY: &str = "cloud-provider.slipway.dev";
/// The supervisor's condition on a mirror saying whether it holds a VIP.
pub const VIP_CONDITION: &str = "VIPAllocated";
/// The annotation MetalLB and the supervisor read to let Services share a VIP; copied.
pub const SHARE_ANNOTATION: &str = "slipway.dev/allow-shared-ip";
/// How often the provider looks when nothing changes.
pub const PERIOD: Duration = Duration::from_secs(5);

/// The mirror's name: `<cluster>-<namespace>-<name>`, or its first 54 characters and a hash of
/// the whole when that is longer than a DNS label allows.
pub fn mirror_name(cluster: &str, namespace: &str, name: &str) -> String {
    let full = format!("{cluster}-{namespace}-{name}");
    if full.len() <= 63 {
        return full;
    }
    // FNV-1a: stable across runs and builds (a restarted provider finds its mirrors again).
    let hash = full.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    let head = full[..54].trim_end_matches('-');
    format!("{head}-{:08x}", hash as u32)
}

fn is_lb(svc: &Service) -> bool {
    svc.meta().deletion_timestamp.is_none()
        && svc.spec.as_ref().and_then(|s| s.type_.as_deref()) == Some("LoadBalancer")
}

fn key(svc: &Service) -> String {
    format!("{}/{}", svc.namespace().unwrap_or_default(), svc.name_any())
}

/// The mirror's spec for workload Service `svc`: only ports that have a node port yet.
pub fn mirror_spec(svc: &Service) -> ServiceSpec {
    let spec = svc.spec.clone().unwrap_or_default();
    let ports = spec
        .ports
        .iter()
        .flatten()
        .enumerate()
        .filter_map(|(i, p)| {
            Some(ServicePort {
                name: Some(p.name.clone().unwrap_or_else(|| format!("port-{i}"))),
                protocol: Some(p.protocol.clone().unwrap_or_else(|| "TCP".into())),
                port: p.port,
                target_port: Some(IntOrString::Int(p.node_port?)),
                ..ServicePort::default()
            })
        })
        .collect();
    ServiceSpec {
        type_: Some("LoadBalancer".into()),
        allocate_load_balancer_node_ports: Some(false),
        ports: Some(ports),
        load_balancer_ip: spec.load_balancer_ip,
        load_balancer_source_ranges: spec.load_balancer_source_ranges,
        external_traffic_policy: spec.external_traffic_policy,
        health_check_node_port: spec.health_check_node_port,
        ip_families: spec.ip_families,
        ..ServiceSpec::default()
    }
}

fn node_ready(node: &Node) -> bool {
    node.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// The mirror's EndpointSlice: every Node with an InternalIP, ready as the Node is; the
/// mirror's ports (the node ports) by name.
pub fn mirror_slice(
    name: &str,
    link: &SupervisorLink,
    spec: &ServiceSpec,
    nodes: &[Node],
) -> EndpointSlice {
    let mut endpoints: Vec<Endpoint> = nodes
        .iter()
        .filter_map(|n| {
            let ip = n
                .status
                .as_ref()?
                .addresses
                .as_ref()?
                .iter()
                .find(|a| a.type_ == "InternalIP" && !a.address.contains(':'))?
                .address
                .clone();
            let ready = node_ready(n) && n.meta().deletion_timestamp.is_none();
            Some(Endpoint {
                addresses: vec![ip],
                conditions: Some(EndpointConditions {
                    ready: Some(ready),
                    serving: Some(ready),
                    terminating: Some(false),
                }),
                node_name: Some(n.name_any()),
                zone: n.labels().get(ZONE_LABEL).cloned(),
                ..Endpoint::default()
            })
        })
        .collect();
    endpoints.sort_by(|a, b| a.addresses.cmp(&b.addresses));
    let ports = spec
        .ports
        .iter()
        .flatten()
        .map(|p| EndpointPort {
            name: p.name.clone(),
            protocol: p.protocol.clone(),
            port: match p.target_port {
                Some(IntOrString::Int(n)) => Some(n),
                _ => None,
            },
            app_protocol: None,
        })
        .collect();
    EndpointSlice {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            namespace: Some(link.namespace.clone()),
            labels: Some(BTreeMap::from([
                (SERVICE_NAME_LABEL.to_owned(), name.to_owned()),
                (MANAGED_BY_LABEL.to_owned(), MANAGED_BY.to_owned()),
                (CLUSTER_LABEL.to_owned(), link.cluster.clone()),
            ])),
            ..ObjectMeta::default()
        },
        address_type: "IPv4".into(),
        endpoints,
        ports: Some(ports),
    }
}

/// The VIPs a Service's status holds, as written.
fn ingress_of(svc: &Service) -> Vec<String> {
    svc.status
        .as_ref()
        .and_then(|s| s.load_balancer.as_ref())
        .and_then(|l| l.ingress.as_ref())
        .into_iter()
        .flatten()
        .filter_map(|i| i.ip.clone())
        .collect()
}

/// The mirror's refusal, if the supervisor gave no VIP: (reason, message).
fn refusal(mirror: &Service) -> Option<(String, String)> {
    mirror
        .status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == VIP_CONDITION && c.status == "False")
        .map(|c| (c.reason.clone(), c.message.clone()))
}

struct Provider {
    workload: Client,
    link: SupervisorLink,
    options: Arc<Options>,
    /// The refusal last reported per workload Service (an Event per change, not per pass; a
    /// restart reports each once more).
    reported: std::sync::Mutex<BTreeMap<String, (String, String)>>,
}

/// Runs the provider until the runtime ends.
pub async fn run(workload: Client, link: SupervisorLink, options: Arc<Options>) {
    info!(namespace = %link.namespace, cluster = %link.cluster, "cloud provider starting");
    let provider = Provider {
        workload: workload.clone(),
        link: link.clone(),
        options,
        reported: std::sync::Mutex::default(),
    };
    let services = watcher(
        Api::<Service>::all(workload.clone()),
        watcher::Config::default(),
    )
    .default_backoff()
    .map(|_| ());
    let nodes = watcher(Api::<Node>::all(workload), watcher::Config::default())
        .default_backoff()
        .map(|_| ());
    let mirrors = watcher(
        Api::<Service>::namespaced(link.client.clone(), &link.namespace),
        watcher::Config::default().labels(&format!("{CLUSTER_LABEL}={}", link.cluster)),
    )
    .default_backoff()
    .map(|_| ());
    let events =
        futures_util::stream::select(services, futures_util::stream::select(nodes, mirrors));
    let mut wake = Wakeups::new(events, PERIOD);
    loop {
        wake.next().await;
        if let Err(e) = provider.pass().await {
            provider.options.metrics.failed(NAME);
            warn!(controller = NAME, error = %e, "pass failed; retrying");
        }
    }
}

impl Provider {
    async fn pass(&self) -> Result<(), Error> {
        let link = &self.link;
        let services = Api::<Service>::all(self.workload.clone())
            .list(&ListParams::default())
            .await
            .map_err(api_err("list", "services"))?
            .items;
        let nodes = Api::<Node>::all(self.workload.clone())
            .list(&ListParams::default())
            .await
            .map_err(api_err("list", "nodes"))?
            .items;
        let selector = format!("{CLUSTER_LABEL}={}", link.cluster);
        let mirrors_api: Api<Service> = Api::namespaced(link.client.clone(), &link.namespace);
        let mirrors: BTreeMap<String, Service> = mirrors_api
            .list(&ListParams::default().labels(&selector))
            .await
            .map_err(api_err("list", "supervisor services"))?
            .items
            .into_iter()
            // Only the mirrors this provider made: a Service labelled with the cluster by
            // someone else is not its to delete.
            .filter(|m| m.annotations().contains_key(SOURCE_ANNOTATION))
            .map(|m| (m.name_any(), m))
            .collect();
        let mut wanted = BTreeSet::new();
        for svc in services.iter().filter(|s| is_lb(s)) {
            let name = mirror_name(
                &link.cluster,
                &svc.namespace().unwrap_or_default(),
                &svc.name_any(),
            );
            wanted.insert(name.clone());
            let mirror = self
                .ensure_mirror(&mirrors_api, &name, svc, mirrors.get(&name))
                .await?;
            self.ensure_slice(&name, &mirror_spec(svc), &nodes).await?;
            self.write_back(svc, &mirror).await?;
        }
        for svc in services
            .iter()
            .filter(|s| !is_lb(s) && s.meta().deletion_timestamp.is_none())
        {
            if !ingress_of(svc).is_empty() {
                self.set_ingress(svc, &[]).await?;
            }
        }
        for (name, mirror) in &mirrors {
            if !wanted.contains(name) {
                self.delete_mirror(&mirrors_api, name, mirror).await?;
            }
        }
        Ok(())
    }

    async fn ensure_mirror(
        &self,
        api: &Api<Service>,
        name: &str,
        svc: &Service,
        current: Option<&Service>,
    ) -> Result<Service, Error> {
        let spec = mirror_spec(svc);
        let mut annotations = BTreeMap::from([(SOURCE_ANNOTATION.to_owned(), key(svc))]);
        if let Some(share) = svc.annotations().get(SHARE_ANNOTATION) {
            annotations.insert(SHARE_ANNOTATION.to_owned(), share.clone());
        }
        // Direct server return unless the Service says no: its nodes run Slipway's agent.
        let dsr = svc.annotations().get(DSR_ANNOTATION).map(String::as_str) != Some("false");
        annotations.insert(DSR_ANNOTATION.to_owned(), dsr.to_string());
        let what = format!("{}/{name}", self.link.namespace);
        match current {
            None => {
                let mirror = Service {
                    metadata: ObjectMeta {
                        name: Some(name.to_owned()),
                        namespace: Some(self.link.namespace.clone()),
                        labels: Some(BTreeMap::from([(
                            CLUSTER_LABEL.to_owned(),
                            self.link.cluster.clone(),
                        )])),
                        annotations: Some(annotations),
                        ..ObjectMeta::default()
                    },
                    spec: Some(spec),
                    status: None,
                };
                let made = api
                    .create(&PostParams::default(), &mirror)
                    .await
                    .map_err(api_err("create", format!("supervisor service {what}")))?;
                info!(service = %key(svc), mirror = %what, "mirrored into the supervisor");
                Ok(made)
            }
            Some(m) => {
                let have = m.spec.clone().unwrap_or_default();
                let same = have.ports.as_ref().map(|ps| {
                    ps.iter()
                        .map(|p| {
                            (
                                p.name.clone(),
                                p.protocol.clone(),
                                p.port,
                                p.target_port.clone(),
                            )
                        })
                        .collect::<Vec<_>>()
                }) == spec.ports.as_ref().map(|ps| {
                    ps.iter()
                        .map(|p| {
                            (
                                p.name.clone(),
                                p.protocol.clone(),
                                p.port,
                                p.target_port.clone(),
                            )
                        })
                        .collect::<Vec<_>>()
                }) && have.load_balancer_ip == spec.load_balancer_ip
                    && have.load_balancer_source_ranges == spec.load_balancer_source_ranges
                    && have.external_traffic_policy == spec.external_traffic_policy
                    && have.health_check_node_port == spec.health_check_node_port
                    && [SHARE_ANNOTATION, DSR_ANNOTATION]
                        .iter()
                        .all(|a| m.annotations().get(*a) == annotations.get(*a));
                if same {
                    return Ok(m.clone());
                }
                let patch = json!({
                    "metadata": {"annotations": {
                        SHARE_ANNOTATION: annotations.get(SHARE_ANNOTATION),
                        DSR_ANNOTATION: annotations.get(DSR_ANNOTATION),
                    }},
                    "spec": {
                        "ports": spec.ports,
                        "loadBalancerIP": spec.load_balancer_ip,
                        "loadBalancerSourceRanges": spec.load_balancer_source_ranges,
                        "externalTrafficPolicy": spec.external_traffic_policy,
                        "healthCheckNodePort": spec.health_check_node_port,
                    },
                });
                let patched = api
                    .patch(name, &PatchParams::default(), &Patch::Merge(patch))
                    .await
                    .map_err(api_err("patch", format!("supervisor service {what}")))?;
                info!(service = %key(svc), mirror = %what, "mirror updated");
                Ok(patched)
            }
        }
    }

    async fn ensure_slice(
        &self,
        name: &str,
        spec: &ServiceSpec,
        nodes: &[Node],
    ) -> Result<(), Error> {
        let want = mirror_slice(name, &self.link, spec, nodes);
        let api: Api<EndpointSlice> =
            Api::namespaced(self.link.client.clone(), &self.link.namespace);
        let what = format!("supervisor endpointslice {}/{name}", self.link.namespace);
        match api
            .get_opt(name)
            .await
            .map_err(api_err("get", what.clone()))?
        {
            None => {
                api.create(&PostParams::default(), &want)
                    .await
                    .map_err(api_err("create", what))?;
            }
            Some(have) if have.endpoints != want.endpoints || have.ports != want.ports => {
                let mut next = want;
                next.metadata.resource_version = have.metadata.resource_version;
                api.replace(name, &PostParams::default(), &next)
                    .await
                    .map_err(api_err("replace", what))?;
            }
            Some(_) => {}
        }
        Ok(())
    }

    /// The mirror's VIP into the workload Service's status; a refusal as a Warning Event.
    async fn write_back(&self, svc: &Service, mirror: &Service) -> Result<(), Error> {
        let vips = ingress_of(mirror);
        if ingress_of(svc) != vips {
            self.set_ingress(svc, &vips).await?;
            if let Some(vip) = vips.first() {
                events::publish(
                    &self.workload,
                    svc,
                    Type::Normal,
                    "EnsuredLoadBalancer",
                    format!("VIP {vip} from the supervisor"),
                )
                .await;
            }
        }
        let news = {
            let mut reported = self.reported.lock().unwrap_or_else(|p| p.into_inner());
            match refusal(mirror) {
                Some(r) if reported.get(&key(svc)) != Some(&r) => {
                    reported.insert(key(svc), r.clone());
                    Some(r)
                }
                Some(_) => None,
                None => {
                    reported.remove(&key(svc));
                    None
                }
            }
        };
        if let Some((reason, message)) = news {
            events::publish(
                &self.workload,
                svc,
                Type::Warning,
                "SyncLoadBalancerFailed",
                format!("{reason}: {message}"),
            )
            .await;
        }
        Ok(())
    }

    async fn set_ingress(&self, svc: &Service, vips: &[String]) -> Result<(), Error> {
        let ingress: Vec<serde_json::Value> = vips
            .iter()
            .map(|ip| json!({"ip": ip, "ipMode": "VIP"}))
            .collect();
        Api::<Service>::namespaced(self.workload.clone(), &svc.namespace().unwrap_or_default())
            .patch_status(
                &svc.name_any(),
                &PatchParams::default(),
                &Patch::Merge(json!({"status": {"loadBalancer": {"ingress": ingress}}})),
            )
            .await
            .map_err(api_err("patch status", format!("service {}", key(svc))))?;
        info!(service = %key(svc), ?vips, "load balancer status written");
        Ok(())
    }

    async fn delete_mirror(
        &self,
        api: &Api<Service>,
        name: &str,
        mirror: &Service,
    ) -> Result<(), Error> {
        let what = format!("{}/{name}", self.link.namespace);
        let slices: Api<EndpointSlice> =
            Api::namespaced(self.link.client.clone(), &self.link.namespace);
        for result in [
            slices
                .delete(name, &DeleteParams::default())
                .await
                .map(drop),
            api.delete(name, &DeleteParams::default()).await.map(drop),
        ] {
            match result {
                Ok(()) => {}
                Err(kube::Error::Api(s)) if s.code == 404 => {}
                Err(e) => return Err(api_err("delete", format!("supervisor {what}"))(e)),
            }
        }
        info!(mirror = %what, source = ?mirror.annotations().get(SOURCE_ANNOTATION), "mirror deleted: its Service is gone");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mirror_names_fit_a_dns_label_and_stay_apart() {
        assert_eq!(mirror_name("c1", "default", "web"), "c1-default-web");
        let long = "x".repeat(60);
        let a = mirror_name("c1", "default", &format!("{long}a"));
        let b = mirror_name("c1", "default", &format!("{long}b"));
        assert!(a.len() <= 63 && b.len() <= 63, "{a} {b}");
        assert_ne!(a, b, "a hash of the whole name keeps them apart");
        assert_eq!(
            a,
            mirror_name("c1", "default", &format!("{long}a")),
            "stable"
        );
    }

    #[test]
    fn the_mirror_targets_the_node_ports_and_takes_none_of_its_own() {
        let svc: Service = serde_json::from_value(json!({
            "metadata": {"name": "web", "namespace": "default"},
            "spec": {"type": "LoadBalancer", "loadBalancerIP": "10.99.100.7",
                     "loadBalancerSourceRanges": ["10.0.0.0/8"], "externalTrafficPolicy": "Cluster",
                     "ports": [{"name": "http", "port": 80, "targetPort": 8080, "nodePort": 30080},
                               {"port": 53, "protocol": "UDP"}]},
        }))
        .unwrap_or_else(|e| panic!("{e}"));
        let spec = mirror_spec(&svc);
        assert_eq!(spec.allocate_load_balancer_node_ports, Some(false));
        let ports = spec.ports.clone().unwrap_or_default();
        assert_eq!(ports.len(), 1, "a port without its node port yet waits");
        assert_eq!(ports[0].port, 80);
        assert_eq!(ports[0].target_port, Some(IntOrString::Int(30080)));
        assert_eq!(spec.load_balancer_ip.as_deref(), Some("10.99.100.7"));
        assert_eq!(
            spec.load_balancer_source_ranges,
            Some(vec!["10.0.0.0/8".to_owned()])
        );
    }
}
