//! EndpointSlices (discovery.k8s.io/v1): for each Service with a selector, one slice per
//! address family listing the Pods it selects that have an IP, each endpoint ready as its Pod's
//! Ready condition, with its Node and zone and a reference to the Pod. Slices carry
//! `kubernetes.io/service-name` and `endpointslice.kubernetes.io/managed-by`, and are owned by
//! their Service.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::{Node, ObjectReference, Pod, Service};
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use kube::{Client, ResourceExt};
use tracing::{debug, info, warn};

use crate::placement::ZONE_LABEL;
use slipway_api::networking::selector_matches;

use crate::pods::{controller_ref, is_active, is_ready, node_of};
use crate::{Error, Options, api_err};

const NAME: &str = "endpointslice";
/// The label naming a slice's Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// The label naming who manages a slice.
pub const MANAGED_BY_LABEL: &str = "endpointslice.kubernetes.io/managed-by";
/// This controller's value of the managed-by label.
pub const MANAGED_BY: &str = "endpointslice-controller.slipway.dev";

struct Ctx {
    client: Client,
    options: Arc<Options>,
}

/// Runs the EndpointSlice controller.
pub async fn run(client: Client, options: Arc<Options>) {
    let ctx = Arc::new(Ctx {
        client: client.clone(),
        options,
    });
    let controller = Controller::new(
        Api::<Service>::all(client.clone()),
        watcher::Config::default(),
    );
    let services = controller.store();
    controller
        .owns(
            Api::<EndpointSlice>::all(client.clone()),
            watcher::Config::default(),
        )
        // A Pod change concerns every Service of its namespace that selects it.
        .watches(
            Api::<Pod>::all(client),
            watcher::Config::default(),
            move |pod| {
                let labels = pod.labels().clone();
                let ns = pod.namespace();
                services
                    .state()
                    .into_iter()
                    .filter(|s| s.namespace() == ns && selects(s, &labels))
                    .map(|s| ObjectRef::from_obj(&*s))
                    .collect::<Vec<_>>()
            },
        )
        .run(reconcile, error_policy, ctx)
        .for_each(|r| async move {
            if let Err(e) = r {
                debug!(controller = NAME, error = %e, "reconcile");
            }
        })
        .await;
}

fn error_policy(svc: Arc<Service>, e: &Error, ctx: Arc<Ctx>) -> Action {
    ctx.options.metrics.failed(NAME);
    warn!(service = %svc.name_any(), error = %e, "reconcile failed; retrying");
    Action::requeue(Duration::from_secs(1))
}

fn selector_of(svc: &Service) -> Option<LabelSelector> {
    let sel = svc.spec.as_ref()?.selector.clone()?;
    (!sel.is_empty()).then_some(LabelSelector {
        match_labels: Some(sel),
        match_expressions: None,
    })
}

fn selects(svc: &Service, labels: &BTreeMap<String, String>) -> bool {
    selector_of(svc).is_some_and(|s| selector_matches(&s, labels))
}

/// A Service port's target on one Pod: the number, or the Pod's container port of that name.
fn target_port(port: &k8s_openapi::api::core::v1::ServicePort, pod: Option<&Pod>) -> Option<i32> {
    match &port.target_port {
        None => Some(port.port),
        Some(IntOrString::Int(n)) => Some(*n),
        Some(IntOrString::String(name)) => pod?
            .spec
            .as_ref()?
            .containers
            .iter()
            .flat_map(|c| c.ports.iter().flatten())
            .find(|p| p.name.as_deref() == Some(name.as_str()))
            .map(|p| p.container_port),
    }
}

/// The slices a Service should have, by name.
fn desired(svc: &Service, pods: &[Pod], zones: &BTreeMap<String, String>) -> Vec<EndpointSlice> {
    let Some(owner) = controller_ref(svc) else {
        return Vec::new();
    };
    let name = svc.name_any();
    let mut by_family: BTreeMap<&str, Vec<(&Pod, String)>> = BTreeMap::new();
    for p in pods
        .iter()
        .filter(|p| is_active(p) && selects(svc, p.labels()))
    {
        let Some(ip) = p.status.as_ref().and_then(|s| s.pod_ip.clone()) else {
            continue;
        };
        let family = if ip.contains(':') { "IPv6" } else { "IPv4" };
        by_family.entry(family).or_default().push((p, ip));
    }
    let ports = svc
        .spec
        .as_ref()
        .and_then(|s| s.ports.clone())
        .unwrap_or_default();
    let mut out = Vec::new();
    for (family, mut members) in by_family {
        members.sort_by_key(|a| a.0.name_any());
        let endpoints = members
            .iter()
            .map(|(p, ip)| {
                let ready = is_ready(p);
                let node = node_of(p).map(String::from);
                Endpoint {
                    addresses: vec![ip.clone()],
                    conditions: Some(EndpointConditions {
                        ready: Some(ready),
                        serving: Some(ready),
                        terminating: Some(false),
                    }),
                    zone: node.as_ref().and_then(|n| zones.get(n).cloned()),
                    node_name: node,
                    target_ref: Some(ObjectReference {
                        kind: Some("Pod".into()),
                        name: p.metadata.name.clone(),
                        namespace: p.metadata.namespace.clone(),
                        uid: p.metadata.uid.clone(),
                        ..ObjectReference::default()
                    }),
                    ..Endpoint::default()
                }
            })
            .collect();
        let first = members.first().map(|m| m.0);
        let slice_ports = ports
            .iter()
            .map(|p| EndpointPort {
                name: Some(p.name.clone().unwrap_or_default()),
                port: target_port(p, first),
                protocol: p.protocol.clone().or_else(|| Some("TCP".into())),
                app_protocol: p.app_protocol.clone(),
            })
            .collect();
        out.push(EndpointSlice {
            metadata: ObjectMeta {
                name: Some(format!("{name}-{}", family.to_lowercase())),
                namespace: svc.namespace(),
                labels: Some(BTreeMap::from([
                    (SERVICE_NAME_LABEL.into(), name.clone()),
                    (MANAGED_BY_LABEL.into(), MANAGED_BY.into()),
                ])),
                owner_references: Some(vec![owner.clone()]),
                ..ObjectMeta::default()
            },
            address_type: family.into(),
            endpoints,
            ports: Some(slice_ports),
        });
    }
    out
}

async fn reconcile(svc: Arc<Service>, ctx: Arc<Ctx>) -> Result<Action, Error> {
    ctx.options.metrics.reconciled(NAME);
    let name = svc.name_any();
    let ns = svc.namespace().unwrap_or_default();
    let api = Api::<EndpointSlice>::namespaced(ctx.client.clone(), &ns);
    let mine = ListParams::default().labels(&format!(
        "{SERVICE_NAME_LABEL}={name},{MANAGED_BY_LABEL}={MANAGED_BY}"
    ));
    let existing = api
        .list(&mine)
        .await
        .map_err(api_err("list", format!("endpointslices of {ns}/{name}")))?
        .items;
    let want = if svc.metadata.deletion_timestamp.is_some() || selector_of(&svc).is_none() {
        Vec::new()
    } else {
        let pods = Api::<Pod>::namespaced(ctx.client.clone(), &ns)
            .list(&ListParams::default())
            .await
            .map_err(api_err("list", format!("pods in {ns}")))?
            .items;
        let zones: BTreeMap<String, String> = Api::<Node>::all(ctx.client.clone())
            .list(&ListParams::default())
            .await
            .map_err(api_err("list", "nodes"))?
            .items
            .into_iter()
            .filter_map(|n| {
                let zone = n.labels().get(ZONE_LABEL).cloned()?;
                Some((n.name_any(), zone))
            })
            .collect();
        desired(&svc, &pods, &zones)
    };
    for slice in &want {
        let slice_name = slice.name_any();
        match existing.iter().find(|e| e.name_any() == slice_name) {
            Some(cur)
                if cur.endpoints == slice.endpoints
                    && cur.ports == slice.ports
                    && cur.address_type == slice.address_type => {}
            Some(cur) => {
                let mut next = slice.clone();
                next.metadata.resource_version = cur.metadata.resource_version.clone();
                api.replace(&slice_name, &PostParams::default(), &next)
                    .await
                    .map_err(api_err(
                        "replace",
                        format!("endpointslice {ns}/{slice_name}"),
                    ))?;
                debug!(service = %name, slice = %slice_name, endpoints = slice.endpoints.len(), "updated");
            }
            None => {
                api.create(&PostParams::default(), slice)
                    .await
                    .map_err(api_err(
                        "create",
                        format!("endpointslice {ns}/{slice_name}"),
                    ))?;
                info!(service = %name, slice = %slice_name, "created endpointslice");
            }
        }
    }
    for stale in existing
        .iter()
        .filter(|e| !want.iter().any(|w| w.name_any() == e.name_any()))
    {
        match api
            .delete(&stale.name_any(), &DeleteParams::default())
            .await
        {
            Ok(_) => {}
            Err(kube::Error::Api(e)) if e.code == 404 => {}
            Err(e) => {
                return Err(api_err(
                    "delete",
                    format!("endpointslice {ns}/{}", stale.name_any()),
                )(e));
            }
        }
    }
    Ok(Action::await_change())
}
