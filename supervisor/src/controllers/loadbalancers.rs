//! The LoadBalancer reconciler: every Service of type LoadBalancer in a supervisor namespace
//! that carries [`CLUSTER_LABEL`] (the mirrors a workload cluster's cloud provider writes) gets
//! a VIP from that Cluster's ingress pool (`spec.settings.network.ingress.cidrBlocks`), written
//! to `status.loadBalancer.ingress`, with condition [`CONDITION`] and an Event for each
//! allocation, refusal and release. The edge hosts serve what the statuses say.
//!
//! Level-triggered and restart-safe: the Services' statuses are the allocation table (as
//! MetalLB rebuilds its own from them), so a pass lists every Service and Cluster, assigns with
//! [`vips::assign`] in creation order (the oldest keeps a contested address) and writes only
//! what differs. A deleted Service's address is free as soon as the Service is gone; a Service
//! that stops being a labelled LoadBalancer has its status cleared.
//!
//! Standalone ([`Scope::Pools`], `slipway lb controller`, MetalLB's role on any Kubernetes
//! API): every Service of type LoadBalancer gets its VIP from a `LoadBalancerPool` (the one its
//! `slipway.dev/address-pool` annotation names, else the first by name), by the same rules.
//!
//! The mirror is a core Service, as the issue and the seeds have it: selector-less, its ports'
//! `targetPort` the workload cluster's node ports, its backends an EndpointSlice of the
//! cluster's nodes. It asks `allocateLoadBalancerNodePorts: false`, which the supervisor's
//! admission honours, so it takes none of the supervisor's node ports; the ClusterIP it gets from
//! the supervisor's service range is never routed anywhere (no node serves supervisor Services)
//! and costs one address of a /12.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::Path;
use std::time::Duration;

use anyhow::Context as _;
use futures_util::StreamExt as _;
use ipnetwork::IpNetwork;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Event, Service};
use kube::api::{
    Api, ApiResource, DynamicObject, GroupVersionKind, ListParams, Patch, PatchParams, PostParams,
};
use kube::runtime::{WatchStreamExt as _, watcher};
use kube::{Resource as _, ResourceExt as _};
use serde_json::{Value, json};
use slipway_api::slipway::{GROUP, POOL_ANNOTATION, VERSION, VIP_LEASE_NAMESPACE, vip_lease_name};
use tracing::{info, warn};

use super::vips::{self, Claim, Held, SHARE_ANNOTATION};
use crate::api::meta::{now_secs, rfc3339};

/// The label naming the Cluster (in the Service's namespace) a mirrored Service belongs to.
pub const CLUSTER_LABEL: &str = "slipway.dev/cluster";

/// The status condition saying whether the Service holds a VIP.
pub const CONDITION: &str = "VIPAllocated";

/// The status condition naming the edge host that announces the VIP (the holder of its Lease).
pub const ANNOUNCED: &str = "VIPAnnounced";

/// How often the reconciler looks when nothing changes.
pub const PERIOD: Duration = Duration::from_secs(5);

/// Who writes the Events.
const COMPONENT: &str = "slipway-lb-controller";

/// Which Services a reconciler serves, and where their VIPs come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// The supervisor's: the mirrors of workload clusters' Services ([`CLUSTER_LABEL`]), each
    /// from its Cluster's ingress pool.
    Clusters,
    /// Any Kubernetes API's: every LoadBalancer Service, from `LoadBalancerPool`s.
    Pools,
}

/// The reconciler, connected.
#[derive(Clone)]
pub struct LoadBalancerReconciler {
    client: kube::Client,
    scope: Scope,
    services: Api<Service>,
    /// Clusters ([`Scope::Clusters`]) or LoadBalancerPools ([`Scope::Pools`]).
    pools: Api<DynamicObject>,
    /// The VIPs' Leases, whose holders announce them.
    leases: Api<Lease>,
}

impl std::fmt::Debug for LoadBalancerReconciler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadBalancerReconciler")
            .finish_non_exhaustive()
    }
}

fn pools_resource(scope: Scope) -> ApiResource {
    let (kind, plural) = match scope {
        Scope::Clusters => ("Cluster", "clusters"),
        Scope::Pools => ("LoadBalancerPool", "loadbalancerpools"),
    };
    ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk(GROUP, VERSION, kind), plural)
}

/// The pools by the key Services are grouped under: a Cluster's ingress pool by
/// `namespace/name`, a LoadBalancerPool's addresses by its name. Blocks that do not parse are
/// left out (admission refused them already).
fn pools(scope: Scope, objects: &[DynamicObject]) -> BTreeMap<String, Vec<IpNetwork>> {
    let blocks = |v: &Value| {
        v.as_array()
            .into_iter()
            .flatten()
            .filter_map(|b| b.as_str()?.parse().ok())
            .collect()
    };
    objects
        .iter()
        .map(|o| {
            let name = o.metadata.name.as_deref().unwrap_or_default();
            match scope {
                Scope::Clusters => (
                    format!(
                        "{}/{name}",
                        o.metadata.namespace.as_deref().unwrap_or_default()
                    ),
                    blocks(&o.data["spec"]["settings"]["network"]["ingress"]["cidrBlocks"]),
                ),
                Scope::Pools => (name.to_owned(), blocks(&o.data["spec"]["addresses"])),
            }
        })
        .collect()
}

/// `namespace/name`.
fn key(svc: &Service) -> String {
    format!("{}/{}", svc.namespace().unwrap_or_default(), svc.name_any())
}

/// Whether the reconciler serves `svc`: a LoadBalancer not being deleted (labelled, with
/// [`Scope::Clusters`]).
fn served(scope: Scope, svc: &Service) -> bool {
    (scope == Scope::Pools || svc.labels().contains_key(CLUSTER_LABEL))
        && svc.meta().deletion_timestamp.is_none()
        && svc.spec.as_ref().and_then(|s| s.type_.as_deref()) == Some("LoadBalancer")
}

/// The address `svc`'s status holds.
pub fn status_ip(svc: &Service) -> Option<IpAddr> {
    svc.status
        .as_ref()?
        .load_balancer
        .as_ref()?
        .ingress
        .as_ref()?
        .iter()
        .find_map(|i| i.ip.as_deref()?.parse().ok())
}

/// What `svc` occupies on its VIP.
fn claim(svc: &Service) -> Claim {
    let ports = svc
        .spec
        .as_ref()
        .and_then(|s| s.ports.as_ref())
        .into_iter()
        .flatten()
        .filter_map(|p| {
            Some((
                p.protocol.clone().unwrap_or_else(|| "TCP".into()),
                u16::try_from(p.port).ok()?,
            ))
        })
        .collect();
    Claim {
        service: key(svc),
        share: svc.annotations().get(SHARE_ANNOTATION).cloned(),
        ports,
    }
}

/// The [`CONDITION`] `svc` carries now, as (status, reason, message).
fn condition_of(svc: &Service) -> Option<(String, String, String)> {
    condition_named(svc, CONDITION)
}

/// The condition `type_` `svc` carries now, as (status, reason, message).
fn condition_named(svc: &Service, type_: &str) -> Option<(String, String, String)> {
    svc.status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == type_)
        .map(|c| (c.status.clone(), c.reason.clone(), c.message.clone()))
}

impl LoadBalancerReconciler {
    /// The supervisor's reconciler over `client` (the controllers' identity).
    pub fn new(client: kube::Client) -> Self {
        Self::with_scope(client, Scope::Clusters)
    }

    /// A reconciler of `scope` over `client`.
    pub fn with_scope(client: kube::Client, scope: Scope) -> Self {
        Self {
            scope,
            services: Api::all(client.clone()),
            pools: Api::all_with(client.clone(), &pools_resource(scope)),
            leases: Api::namespaced(client.clone(), VIP_LEASE_NAMESPACE),
            client,
        }
    }

    /// Connects with the controllers' `kubeconfig`.
    pub async fn connect(kubeconfig: &Path) -> anyhow::Result<Self> {
        let config = kube::config::Kubeconfig::read_from(kubeconfig)
            .with_context(|| format!("reading {}", kubeconfig.display()))?;
        let config = kube::Config::from_custom_kubeconfig(
            config,
            &kube::config::KubeConfigOptions::default(),
        )
        .await?;
        Ok(Self::new(kube::Client::try_from(config)?))
    }

    /// Runs until dropped: a pass at every Service or Cluster event and every [`PERIOD`].
    pub async fn run(self) {
        let served = match self.scope {
            Scope::Clusters => watcher::Config::default().labels(CLUSTER_LABEL),
            Scope::Pools => watcher::Config::default(),
        };
        let services = watcher(self.services.clone(), served)
            .default_backoff()
            .map(|_| ());
        let clusters = watcher(self.pools.clone(), watcher::Config::default())
            .default_backoff()
            .map(|_| ());
        // Leases are renewed five times a second: only a change of holder is an event.
        let mut holders: BTreeMap<String, Option<String>> = BTreeMap::new();
        let leases = watcher(self.leases.clone(), watcher::Config::default())
            .default_backoff()
            .filter_map(move |e| {
                let changed = match e {
                    Ok(watcher::Event::Apply(l) | watcher::Event::InitApply(l)) => {
                        let holder = l.spec.and_then(|s| s.holder_identity);
                        holders.insert(l.metadata.name.unwrap_or_default(), holder.clone())
                            != Some(holder)
                    }
                    Ok(watcher::Event::Delete(l)) => {
                        holders.remove(&l.metadata.name.unwrap_or_default());
                        true
                    }
                    _ => false,
                };
                std::future::ready(changed.then_some(()))
            });
        let mut events =
            futures_util::stream::select(futures_util::stream::select(services, clusters), leases)
                .boxed();
        let mut tick = tokio::time::interval(PERIOD);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = events.next() => {}
            }
            if let Err(e) = self.reconcile_all().await {
                warn!(error = %format!("{e:#}"), "load balancer reconciler pass failed; retrying");
            }
        }
    }

    /// One pass over every labelled Service.
    pub async fn reconcile_all(&self) -> anyhow::Result<()> {
        let pools = pools(
            self.scope,
            &self.pools.list(&ListParams::default()).await?.items,
        );
        let listed = match self.scope {
            Scope::Clusters => ListParams::default().labels(CLUSTER_LABEL),
            Scope::Pools => ListParams::default(),
        };
        let mut services = self.services.list(&listed).await?.items;
        services.sort_by(|a, b| {
            (a.meta().creation_timestamp.as_ref().map(|t| t.0), key(a))
                .cmp(&(b.meta().creation_timestamp.as_ref().map(|t| t.0), key(b)))
        });
        // Per cluster, what each Service's status holds now; updated as the pass assigns.
        let mut held: BTreeMap<String, Vec<Held>> = BTreeMap::new();
        for svc in services.iter().filter(|s| served(self.scope, s)) {
            if let Some(ip) = status_ip(svc) {
                held.entry(self.group_of(svc, &pools))
                    .or_default()
                    .push(Held {
                        ip,
                        claim: claim(svc),
                    });
            }
        }
        let announcers: BTreeMap<String, String> = self
            .leases
            .list(&ListParams::default())
            .await?
            .items
            .into_iter()
            .filter_map(|l| Some((l.metadata.name?, l.spec?.holder_identity?)))
            .collect();
        for svc in &services {
            if let Err(e) = self.reconcile(svc, &pools, &announcers, &mut held).await {
                warn!(service = %key(svc), error = %format!("{e:#}"), "reconciling");
            }
        }
        Ok(())
    }

    async fn reconcile(
        &self,
        svc: &Service,
        pools: &BTreeMap<String, Vec<IpNetwork>>,
        announcers: &BTreeMap<String, String>,
        held: &mut BTreeMap<String, Vec<Held>>,
    ) -> anyhow::Result<()> {
        let current = status_ip(svc);
        if !served(self.scope, svc) {
            // No longer a LoadBalancer (a deleted one needs nothing: its status goes with it).
            if current.is_some() && svc.meta().deletion_timestamp.is_none() {
                self.write(
                    svc,
                    None,
                    &[(
                        CONDITION,
                        "False",
                        "NotLoadBalancer",
                        "the Service is not of type LoadBalancer".into(),
                    )],
                )
                .await?;
                self.event(
                    svc,
                    "Normal",
                    "IPReleased",
                    &format!(
                        "released {}",
                        current.map(|i| i.to_string()).unwrap_or_default()
                    ),
                )
                .await;
            }
            return Ok(());
        }
        let cluster = self.group_of(svc, pools);
        let claim = claim(svc);
        let spec = svc.spec.clone().unwrap_or_default();
        let mut field_errors = Vec::new();
        let requested = match spec.load_balancer_ip.as_deref().filter(|s| !s.is_empty()) {
            Some(text) => match text.parse::<IpAddr>() {
                Ok(ip) => Some(ip),
                Err(_) => {
                    field_errors.push(format!(
                        "spec.loadBalancerIP: Invalid value: {text:?}: not an IP address"
                    ));
                    None
                }
            },
            None => None,
        };
        let ipv6 = match (requested, spec.ip_families.as_ref().and_then(|f| f.first())) {
            (Some(ip), _) => ip.is_ipv6(),
            (None, Some(f)) => f == "IPv6",
            (None, None) => false,
        };
        let mine = held.entry(cluster.clone()).or_default();
        mine.retain(|h| h.claim.service != claim.service);
        let result = match pools.get(&cluster) {
            _ if !field_errors.is_empty() => Err(("InvalidSpec", field_errors.join("; "))),
            None if self.scope == Scope::Pools && cluster.is_empty() => {
                Err(("NoPool", "no LoadBalancerPool: no VIP to give".to_owned()))
            }
            None if self.scope == Scope::Pools => Err((
                "PoolNotFound",
                format!(
                    "metadata.annotations[{POOL_ANNOTATION}]: LoadBalancerPool {cluster:?} not found"
                ),
            )),
            None => Err((
                "ClusterNotFound",
                format!(
                    "metadata.labels[{CLUSTER_LABEL}]: Cluster {cluster} not found: no ingress pool"
                ),
            )),
            Some(pool) if pool.is_empty() => Err((
                "NoIngressPool",
                format!(
                    "Cluster {cluster} has no spec.settings.network.ingress.cidrBlocks: no VIP to give"
                ),
            )),
            Some(pool) => vips::assign(pool, mine, &claim, requested, current, ipv6)
                .map_err(|r| (r.reason(), r.to_string())),
        };
        match result {
            Ok(ip) => {
                mine.push(Held {
                    ip,
                    claim: claim.clone(),
                });
                let from = match self.scope {
                    Scope::Clusters => format!("the ingress pool of Cluster {cluster}"),
                    Scope::Pools => format!("LoadBalancerPool {cluster}"),
                };
                let allocated = (
                    CONDITION,
                    "True",
                    "Allocated",
                    format!("VIP {ip} from {from}"),
                );
                let lease = vip_lease_name(ip);
                let announcer = announcers.get(&lease);
                let announced = match announcer {
                    Some(host) => (
                        ANNOUNCED,
                        "True",
                        "Announced",
                        format!("edge host {host} announces {ip}"),
                    ),
                    None => (
                        ANNOUNCED,
                        "False",
                        "NoEdgeHost",
                        format!("no edge host holds Lease {VIP_LEASE_NAMESPACE}/{lease}"),
                    ),
                };
                let was = condition_named(svc, ANNOUNCED);
                let fresh = current != Some(ip) || condition_of(svc).is_none_or(|c| c.0 != "True");
                if fresh || was.as_ref().map(|c| &c.2) != Some(&announced.3) {
                    self.write(svc, Some(ip), &[allocated, announced.clone()])
                        .await?;
                }
                if fresh {
                    info!(service = %claim.service, %ip, "VIP allocated");
                    self.event(
                        svc,
                        "Normal",
                        "IPAllocated",
                        &format!("Assigned IP [\"{ip}\"]"),
                    )
                    .await;
                }
                if let Some(host) = announcer
                    && was.as_ref().map(|c| &c.2) != Some(&announced.3)
                {
                    let before = was
                        .filter(|c| c.0 == "True")
                        .and_then(|c| c.2.split_whitespace().nth(2).map(str::to_owned));
                    let (reason, message) = match before {
                        Some(old) => (
                            "VIPOwnerChanged",
                            format!("edge host {host} announces {ip} (was {old})"),
                        ),
                        None => ("VIPAnnounced", format!("edge host {host} announces {ip}")),
                    };
                    info!(service = %claim.service, %ip, %host, "VIP announced");
                    self.event(svc, "Normal", reason, &message).await;
                }
            }
            Err((reason, message)) => {
                let unchanged = condition_of(svc)
                    .is_some_and(|c| c.0 == "False" && c.1 == reason && c.2 == message);
                if current.is_some() || !unchanged {
                    self.write(svc, None, &[(CONDITION, "False", reason, message.clone())])
                        .await?;
                    warn!(service = %claim.service, reason, %message, "no VIP");
                    self.event(svc, "Warning", "AllocationFailed", &message)
                        .await;
                }
            }
        }
        Ok(())
    }

    /// Writes the Service's ingress (`ip`, or none) and `conditions` (type, status, reason,
    /// message), in one write at the version read.
    async fn write(
        &self,
        svc: &Service,
        ip: Option<IpAddr>,
        conditions: &[(&str, &str, &str, String)],
    ) -> anyhow::Result<()> {
        let mut list = serde_json::to_value(
            svc.status
                .as_ref()
                .and_then(|s| s.conditions.clone())
                .unwrap_or_default(),
        )?;
        for (type_, status, reason, message) in conditions {
            list = slipway_api::meta::set_condition(
                &list,
                json!({
                    "type": type_,
                    "status": status,
                    "reason": reason,
                    "message": message,
                    "lastTransitionTime": rfc3339(now_secs()),
                    "observedGeneration": svc.meta().generation,
                }),
            );
        }
        let conditions = list;
        let ingress: Value = match ip {
            Some(ip) => json!([{"ip": ip.to_string(), "ipMode": "VIP"}]),
            None => json!([]),
        };
        let api: Api<Service> =
            Api::namespaced(self.client.clone(), &svc.namespace().unwrap_or_default());
        api.patch_status(
            &svc.name_any(),
            &PatchParams::default(),
            &Patch::Merge(json!({
                "metadata": {"resourceVersion": svc.meta().resource_version},
                "status": {"loadBalancer": {"ingress": ingress}, "conditions": conditions},
            })),
        )
        .await
        .with_context(|| format!("writing Service {}'s status", key(svc)))?;
        Ok(())
    }

    /// Records an Event on the Service (best effort, as upstream's recorder).
    async fn event(&self, svc: &Service, type_: &str, reason: &str, message: &str) {
        let ns = svc.namespace().unwrap_or_default();
        let now = rfc3339(now_secs());
        let name = format!(
            "{}.{:x}",
            svc.name_any(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or_default()
        );
        let event = serde_json::from_value::<Event>(json!({
            "metadata": {"name": name, "namespace": ns},
            "involvedObject": {
                "apiVersion": "v1",
                "kind": "Service",
                "namespace": ns,
                "name": svc.name_any(),
                "uid": svc.meta().uid,
            },
            "reason": reason,
            "message": message,
            "type": type_,
            "source": {"component": COMPONENT},
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
        }));
        let result = match event {
            Ok(e) => Api::<Event>::namespaced(self.client.clone(), &ns)
                .create(&PostParams::default(), &e)
                .await
                .map(drop),
            Err(e) => Err(kube::Error::SerdeError(e)),
        };
        if let Err(e) = result {
            warn!(reason, error = %e, "could not record an Event");
        }
    }
}

/// `namespace/cluster` of a labelled Service.
impl LoadBalancerReconciler {
    /// The key of the pool `svc` takes its VIP from: its Cluster (`namespace/name`), or the
    /// LoadBalancerPool its annotation names, else the first by name (empty: none).
    fn group_of(&self, svc: &Service, pools: &BTreeMap<String, Vec<IpNetwork>>) -> String {
        match self.scope {
            Scope::Clusters => format!(
                "{}/{}",
                svc.namespace().unwrap_or_default(),
                svc.labels().get(CLUSTER_LABEL).map_or("", String::as_str)
            ),
            Scope::Pools => svc
                .annotations()
                .get(POOL_ANNOTATION)
                .cloned()
                .or_else(|| pools.keys().next().cloned())
                .unwrap_or_default(),
        }
    }
}
