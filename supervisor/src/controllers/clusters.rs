//! The Cluster reconciler: a Cluster's topology becomes Hosts (`slipway.dev/v1alpha1`, provider
//! `netns`), placed over zones, and the Hosts' readiness becomes the Cluster's status (phase,
//! conditions ControlPlaneReady / NodesReady / Ready, hosts) with an Event for each step.
//!
//! Level-triggered: every Cluster or Host event (and every period) it compares each Cluster's
//! topology with the Hosts that serve it and makes only the difference. Host names are derived
//! from the Cluster (`<namespace>-<cluster>-<pool>-<index>`), so a reconciler killed between a
//! create and its status write finds the Host again instead of making another. Scaling down
//! removes the newest (highest index) first. Deletion runs behind the `slipway.dev/cluster`
//! finalizer: every Host of the Cluster is deleted (the host reconciler tears each down behind
//! its own finalizer) before the Cluster goes.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;
use futures_util::StreamExt as _;
use k8s_openapi::api::core::v1::{Event, Secret};
use kube::api::{
    Api, ApiResource, DeleteParams, DynamicObject, GroupVersionKind, ListParams, Patch,
    PatchParams, PostParams,
};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::{WatchStreamExt as _, watcher};
use serde_json::{Value, json};
use slipway_api::slipway::{CONTROL_PLANE_POOL, ClusterSpec, GROUP, VERSION, api_authority};
use tracing::{info, warn};

use crate::api::meta::{now_secs, rfc3339};
use crate::tls::{Credential, Pki};

mod nodes;
use nodes::sync_nodes;

/// The finalizer on every Cluster the reconciler has seen.
pub const FINALIZER: &str = "slipway.dev/cluster";

/// The annotation naming the Host (by uid) a workload cluster's Node stands for.
pub const HOST_UID: &str = "slipway.dev/host-uid";

/// How often the reconciler looks when nothing changes.
pub const PERIOD: Duration = Duration::from_secs(2);

/// One Host a Cluster should have.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    pub name: String,
    pub pool: String,
    pub index: u32,
    pub zone: String,
    pub host_class: String,
}

/// The Host name of `index` in `pool` of Cluster `namespace/cluster`.
pub fn host_name(namespace: &str, cluster: &str, pool: &str, index: u32) -> String {
    format!("{namespace}-{cluster}-{pool}-{index}")
}

/// Where a Cluster's hosts go: the control plane spread over `zones` (in order), each node
/// pool in its `failureDomain` or, without one, spread likewise. Empty `zones` places nothing.
pub fn placements(
    namespace: &str,
    cluster: &str,
    spec: &ClusterSpec,
    zones: &[String],
) -> Vec<Placement> {
    let mut out = Vec::new();
    if zones.is_empty() {
        return out;
    }
    let cp = &spec.topology.control_plane;
    let pools = std::iter::once((CONTROL_PLANE_POOL, cp.replicas, &cp.host_class, None)).chain(
        spec.topology.node_pools.iter().map(|p| {
            (
                p.name.as_str(),
                p.replicas,
                &p.host_class,
                p.failure_domain.as_ref(),
            )
        }),
    );
    for (pool, replicas, class, domain) in pools {
        for index in 0..replicas {
            let zone = match domain {
                Some(z) => z.clone(),
                None => zones[index as usize % zones.len()].clone(),
            };
            out.push(Placement {
                name: host_name(namespace, cluster, pool, index),
                pool: pool.to_owned(),
                index,
                zone,
                host_class: class.clone(),
            });
        }
    }
    out
}

fn resource(kind: &str, plural: &str) -> ApiResource {
    ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk(GROUP, VERSION, kind), plural)
}

fn condition_true(obj: &DynamicObject, kind: &str) -> bool {
    obj.data["status"]["conditions"]
        .as_array()
        .is_some_and(|cs| {
            cs.iter()
                .any(|c| c["type"] == kind && c["status"] == "True")
        })
}

/// The workload cluster's API endpoint (`https://host:port`): its `controlPlaneEndpoint`, or
/// its first control plane host's address once it has one ([`api_authority`]).
fn endpoint(cluster: &DynamicObject, owned: &[&DynamicObject]) -> Option<String> {
    let spec: ClusterSpec = serde_json::from_value(cluster.data["spec"].clone()).ok()?;
    let cp0 = host_name(
        cluster.metadata.namespace.as_deref().unwrap_or_default(),
        cluster.metadata.name.as_deref().unwrap_or_default(),
        CONTROL_PLANE_POOL,
        0,
    );
    let address = owned
        .iter()
        .find(|h| h.metadata.name.as_deref() == Some(cp0.as_str()))
        .and_then(|h| h.data["status"]["address"].as_str());
    api_authority(&spec, address).map(|a| format!("https://{a}"))
}

/// The Secret holding a cluster's CA (`tls.crt`, `tls.key`).
pub fn ca_secret(cluster: &str) -> String {
    format!("{cluster}-ca")
}

/// The Secret holding the CA of a cluster's etcd (`tls.crt`, `tls.key`), for three control
/// plane hosts: etcd trusts only certificates of its own CA, as kubeadm's etcd does.
pub fn etcd_ca_secret(cluster: &str) -> String {
    format!("{cluster}-etcd-ca")
}

/// The Secret holding a cluster's admin kubeconfig (key `value`, as Cluster API names it).
pub fn kubeconfig_secret(cluster: &str) -> String {
    format!("{cluster}-kubeconfig")
}

/// Whether the host's Ready condition says its Lease expired.
fn lease_expired(host: &DynamicObject) -> bool {
    host.data["status"]["conditions"]
        .as_array()
        .is_some_and(|cs| {
            cs.iter().any(|c| {
                c["type"] == "Ready" && c["status"] == "False" && c["reason"] == "LeaseExpired"
            })
        })
}

/// The controller, connected.
pub struct ClusterReconciler {
    client: kube::Client,
    clusters: Api<DynamicObject>,
    hosts: Api<DynamicObject>,
    zones: Api<DynamicObject>,
    classes: Api<DynamicObject>,
    /// Where each cluster's CA is kept while it is used (`<dir>/<namespace>/<cluster>/pki`);
    /// the Secret `<cluster>-ca` is the truth.
    work_dir: PathBuf,
}

impl std::fmt::Debug for ClusterReconciler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterReconciler").finish_non_exhaustive()
    }
}

impl ClusterReconciler {
    /// Connects with the controllers' `kubeconfig`; clusters' CAs are kept under `work_dir`.
    pub async fn connect(kubeconfig: &Path, work_dir: &Path) -> anyhow::Result<Self> {
        let config = Kubeconfig::read_from(kubeconfig)
            .with_context(|| format!("reading {}", kubeconfig.display()))?;
        let config =
            kube::Config::from_custom_kubeconfig(config, &KubeConfigOptions::default()).await?;
        let client = kube::Client::try_from(config)?;
        Ok(Self {
            clusters: Api::all_with(client.clone(), &resource("Cluster", "clusters")),
            hosts: Api::all_with(client.clone(), &resource("Host", "hosts")),
            zones: Api::all_with(client.clone(), &resource("Zone", "zones")),
            classes: Api::all_with(client.clone(), &resource("HostClass", "hostclasses")),
            work_dir: work_dir.to_owned(),
            client,
        })
    }

    /// Runs until dropped: a pass at every Cluster or Host event and every [`PERIOD`].
    pub async fn run(self) {
        let clusters = watcher(self.clusters.clone(), watcher::Config::default())
            .default_backoff()
            .map(|_| ());
        let hosts = watcher(self.hosts.clone(), watcher::Config::default())
            .default_backoff()
            .map(|_| ());
        let mut events = futures_util::stream::select(clusters, hosts).boxed();
        let mut tick = tokio::time::interval(PERIOD);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = events.next() => {}
            }
            if let Err(e) = self.reconcile_all().await {
                warn!(error = %format!("{e:#}"), "cluster reconciler pass failed; retrying");
            }
        }
    }

    /// One pass over every Cluster.
    pub async fn reconcile_all(&self) -> anyhow::Result<()> {
        let clusters = self.clusters.list(&ListParams::default()).await?.items;
        let hosts = self.hosts.list(&ListParams::default()).await?.items;
        let mut zones: Vec<String> = self
            .zones
            .list(&ListParams::default())
            .await?
            .items
            .into_iter()
            .filter_map(|z| z.metadata.name)
            .collect();
        zones.sort();
        let classes: BTreeMap<String, Value> = self
            .classes
            .list(&ListParams::default())
            .await?
            .items
            .into_iter()
            .filter_map(|c| Some((c.metadata.name?, c.data["spec"].clone())))
            .collect();
        for cluster in &clusters {
            let ns = cluster.metadata.namespace.clone().unwrap_or_default();
            let name = cluster.metadata.name.clone().unwrap_or_default();
            let owned: Vec<&DynamicObject> = hosts
                .iter()
                .filter(|h| {
                    h.data["spec"]["cluster"]["namespace"] == ns.as_str()
                        && h.data["spec"]["cluster"]["name"] == name.as_str()
                })
                .collect();
            if let Err(e) = self.reconcile(cluster, &owned, &zones, &classes).await
                && !e.chain().any(|c| {
                    matches!(c.downcast_ref::<kube::Error>(), Some(kube::Error::Api(s)) if s.code == 409)
                })
            {
                warn!(cluster = %format!("{ns}/{name}"), error = %format!("{e:#}"), "reconciling");
            }
        }
        Ok(())
    }

    async fn reconcile(
        &self,
        cluster: &DynamicObject,
        owned: &[&DynamicObject],
        zones: &[String],
        classes: &BTreeMap<String, Value>,
    ) -> anyhow::Result<()> {
        let ns = cluster.metadata.namespace.clone().unwrap_or_default();
        let name = cluster.metadata.name.clone().unwrap_or_default();
        let api: Api<DynamicObject> =
            Api::namespaced_with(self.client.clone(), &ns, &resource("Cluster", "clusters"));
        let finalizers = cluster.metadata.finalizers.clone().unwrap_or_default();
        let ours = finalizers.iter().any(|f| f == FINALIZER);
        if cluster.metadata.deletion_timestamp.is_some() {
            if !ours {
                return Ok(());
            }
            for host in owned {
                let host_name = host.metadata.name.clone().unwrap_or_default();
                if host.metadata.deletion_timestamp.is_none() {
                    self.delete_host(&host_name).await?;
                    self.event(
                        cluster,
                        "Normal",
                        "HostDeleted",
                        &format!("deleting host {host_name}"),
                    )
                    .await;
                }
            }
            if owned.is_empty() {
                let secrets: Api<Secret> = Api::namespaced(self.client.clone(), &ns);
                for secret in [
                    ca_secret(&name),
                    etcd_ca_secret(&name),
                    kubeconfig_secret(&name),
                ] {
                    match secrets.delete(&secret, &DeleteParams::default()).await {
                        Ok(_) => {}
                        Err(kube::Error::Api(s)) if s.code == 404 => {}
                        Err(e) => return Err(e.into()),
                    }
                }
                let _ = std::fs::remove_dir_all(self.work_dir.join(&ns).join(&name));
                let rest: Vec<&String> = finalizers.iter().filter(|f| *f != FINALIZER).collect();
                api.patch(
                    &name,
                    &PatchParams::default(),
                    &Patch::Merge(json!({"metadata": {"finalizers": rest}})),
                )
                .await?;
                info!(cluster = %format!("{ns}/{name}"), "cluster deleted: every host gone");
            } else {
                self.write_status(&api, cluster, "Deleting", owned, &[], false)
                    .await?;
            }
            return Ok(());
        }
        if !ours {
            let mut with = finalizers.clone();
            with.push(FINALIZER.to_owned());
            api.patch(
                &name,
                &PatchParams::default(),
                &Patch::Merge(json!({"metadata": {"finalizers": with}})),
            )
            .await?;
            // The write is an event: the next pass goes on from the new version.
            return Ok(());
        }
        let spec: ClusterSpec =
            serde_json::from_value(cluster.data["spec"].clone()).context("the Cluster's spec")?;
        // The CAs first: a control plane host gets them when it joins.
        let pki = self.ensure_ca(&ns, &name).await?;
        if spec.topology.control_plane.replicas > 1 {
            self.ca_pair(&ns, &name, &etcd_ca_secret(&name)).await?;
        }
        let want = placements(&ns, &name, &spec, zones);
        let wanted: BTreeSet<&str> = want.iter().map(|p| p.name.as_str()).collect();
        let have: BTreeMap<&str, &DynamicObject> = owned
            .iter()
            .filter_map(|h| h.metadata.name.as_deref().map(|n| (n, *h)))
            .collect();
        let pods: ipnetwork::Ipv4Network = spec
            .settings
            .network
            .pods
            .cidr_blocks
            .first()
            .and_then(|c| c.parse().ok())
            .context("spec.settings.network.pods.cidrBlocks[0]: not an IPv4 CIDR")?;
        let mut used: BTreeSet<ipnetwork::Ipv4Network> = owned
            .iter()
            .filter_map(|h| h.data["spec"]["podCIDR"].as_str()?.parse().ok())
            .collect();
        for p in &want {
            if !have.contains_key(p.name.as_str()) {
                let Some(block) = free_block(pods, &used) else {
                    let message = format!(
                        "no free block of the pod CIDR {pods} for host {} ({} in use)",
                        p.name,
                        used.len()
                    );
                    self.event(cluster, "Warning", "PodCIDRExhausted", &message)
                        .await;
                    anyhow::bail!(message);
                };
                used.insert(block);
                self.create_host(&ns, &name, p, block).await?;
                self.event(
                    cluster,
                    "Normal",
                    "HostCreated",
                    &format!("host {} for pool {} in zone {}", p.name, p.pool, p.zone),
                )
                .await;
            }
        }
        // Remediation: a host whose Lease expired is torn down; the next pass makes its
        // replacement, same name, same zone and pool (as a MachineHealthCheck would, without
        // the minutes of waiting: the Lease's duration is the timeout).
        for p in &want {
            if let Some(host) = have.get(p.name.as_str())
                && host.metadata.deletion_timestamp.is_none()
                && lease_expired(host)
            {
                self.delete_host(&p.name).await?;
                self.event(
                    cluster,
                    "Warning",
                    "HostReplaced",
                    &format!(
                        "host {}'s Lease expired: replacing it in zone {}",
                        p.name, p.zone
                    ),
                )
                .await;
            }
        }
        // Scale down: the newest (highest index) first.
        let mut extra: Vec<&&DynamicObject> = have
            .iter()
            .filter(|(n, h)| !wanted.contains(*n) && h.metadata.deletion_timestamp.is_none())
            .map(|(_, h)| h)
            .collect();
        extra.sort_by_key(|h| std::cmp::Reverse(h.metadata.name.clone()));
        for host in extra {
            let host_name = host.metadata.name.clone().unwrap_or_default();
            self.delete_host(&host_name).await?;
            self.event(
                cluster,
                "Normal",
                "HostDeleted",
                &format!("scaling down: host {host_name}"),
            )
            .await;
        }
        let complete = owned.len() == want.len()
            && owned
                .iter()
                .all(|h| wanted.contains(h.metadata.name.as_deref().unwrap_or_default()));
        let all_ready = complete && owned.iter().all(|h| condition_true(h, "Ready"));
        let was_up = matches!(
            cluster.data["status"]["phase"].as_str(),
            Some("Running" | "Scaling")
        );
        let api_ready = match self.workload(cluster, &pki, owned, classes).await {
            Ok(ready) => ready,
            Err(e) => {
                info!(cluster = %format!("{ns}/{name}"), error = %format!("{e:#}"), "workload cluster API not answering yet");
                false
            }
        };
        let all_ready = all_ready && api_ready;
        // A Running cluster with a host down stays Running; its conditions say which.
        let phase = match (complete, all_ready, was_up) {
            (true, true, _) | (true, false, true) => "Running",
            (false, _, true) => "Scaling",
            (_, _, false) => "Provisioning",
        };
        self.write_status(&api, cluster, phase, owned, &want, api_ready)
            .await
    }

    /// The cluster's CA, made once and kept in its Secret; returned as a Pki over the work dir.
    async fn ensure_ca(&self, ns: &str, name: &str) -> anyhow::Result<Pki> {
        let pki = Pki::new(&self.work_dir.join(ns).join(name));
        let (cert, key) = self.ca_pair(ns, name, &ca_secret(name)).await?;
        std::fs::create_dir_all(pki.ca_cert().parent().unwrap_or(&self.work_dir))?;
        if std::fs::read(pki.ca_cert()).ok().as_deref() != Some(cert.as_slice()) {
            std::fs::write(pki.ca_cert(), &cert)?;
            crate::tls::write_private(&pki.ca_key(), &String::from_utf8_lossy(&key))?;
        }
        Ok(pki)
    }

    /// A CA of Cluster `ns/name` (certificate, key PEM), made once and kept in Secret `secret`.
    async fn ca_pair(
        &self,
        ns: &str,
        name: &str,
        which: &str,
    ) -> anyhow::Result<(Vec<u8>, Vec<u8>)> {
        let secrets: Api<Secret> = Api::namespaced(self.client.clone(), ns);
        let read = |s: &Secret, k: &str| {
            s.data
                .as_ref()
                .and_then(|d| d.get(k))
                .map(|b| b.0.clone())
                .filter(|b| !b.is_empty())
        };
        let (cert, key) = match secrets.get_opt(which).await? {
            Some(s) => (
                read(&s, "tls.crt").context("the CA Secret has no tls.crt")?,
                read(&s, "tls.key").context("the CA Secret has no tls.key")?,
            ),
            None => {
                let scratch = self.work_dir.join(ns).join(format!("{which}.new"));
                let _ = std::fs::remove_dir_all(&scratch);
                let fresh = Pki::new(&scratch);
                fresh.ensure(&[])?;
                let cert = std::fs::read(fresh.ca_cert())?;
                let key = std::fs::read(fresh.ca_key())?;
                let _ = std::fs::remove_dir_all(&scratch);
                let secret: Secret = serde_json::from_value(json!({
                    "metadata": {"name": which, "namespace": ns,
                                 "labels": {"slipway.dev/cluster": name}},
                    "type": "kubernetes.io/tls",
                    "stringData": {
                        "tls.crt": String::from_utf8_lossy(&cert),
                        "tls.key": String::from_utf8_lossy(&key),
                    },
                }))?;
                match secrets.create(&PostParams::default(), &secret).await {
                    Ok(_) => {}
                    // Another pass made it first: use that one.
                    Err(kube::Error::Api(s)) if s.code == 409 => {
                        return Box::pin(self.ca_pair(ns, name, which)).await;
                    }
                    Err(e) => return Err(e.into()),
                }
                (cert, key)
            }
        };
        Ok((cert, key))
    }

    /// The workload cluster: its admin kubeconfig kept in a Secret, and each host a Node with
    /// its zone, class, capacity and readiness. Returns whether its API answered.
    async fn workload(
        &self,
        cluster: &DynamicObject,
        pki: &Pki,
        owned: &[&DynamicObject],
        classes: &BTreeMap<String, Value>,
    ) -> anyhow::Result<bool> {
        let ns = cluster.metadata.namespace.clone().unwrap_or_default();
        let name = cluster.metadata.name.clone().unwrap_or_default();
        let Some(endpoint) = endpoint(cluster, owned) else {
            return Ok(false);
        };
        let secrets: Api<Secret> = Api::namespaced(self.client.clone(), &ns);
        let existing = secrets.get_opt(&kubeconfig_secret(&name)).await?;
        let current = existing.as_ref().and_then(|s| {
            let bytes = s.data.as_ref()?.get("value")?;
            String::from_utf8(bytes.0.clone()).ok()
        });
        let text = match current.filter(|t| t.contains(&format!("server: {endpoint}\n"))) {
            Some(t) => t,
            None => {
                let (cert_pem, key_pem) =
                    pki.issue_client("admin", Some(crate::auth::MASTERS), crate::tls::ADMIN_DAYS)?;
                let authority = endpoint.trim_start_matches("https://");
                let text = pki.kubeconfig(
                    authority,
                    "admin",
                    &Credential::ClientCert { cert_pem, key_pem },
                )?;
                let secret: Secret = serde_json::from_value(json!({
                    "metadata": {"name": kubeconfig_secret(&name), "namespace": ns,
                                 "labels": {"slipway.dev/cluster": name}},
                    "type": "cluster.x-k8s.io/secret",
                    "stringData": {"value": text},
                }))?;
                if existing.is_some() {
                    secrets
                        .replace(&kubeconfig_secret(&name), &PostParams::default(), &secret)
                        .await?;
                } else {
                    secrets.create(&PostParams::default(), &secret).await?;
                }
                self.event(
                    cluster,
                    "Normal",
                    "KubeconfigReady",
                    &format!(
                        "admin kubeconfig in Secret {} for {endpoint}",
                        kubeconfig_secret(&name)
                    ),
                )
                .await;
                text
            }
        };
        let config = Kubeconfig::from_yaml(&text)?;
        let mut config =
            kube::Config::from_custom_kubeconfig(config, &KubeConfigOptions::default()).await?;
        config.connect_timeout = Some(Duration::from_secs(2));
        config.read_timeout = Some(Duration::from_secs(5));
        let workload = kube::Client::try_from(config)?;
        sync_nodes(&workload, owned, classes).await?;
        Ok(true)
    }

    async fn create_host(
        &self,
        ns: &str,
        cluster: &str,
        p: &Placement,
        block: ipnetwork::Ipv4Network,
    ) -> anyhow::Result<()> {
        let mut host = DynamicObject::new(&p.name, &resource("Host", "hosts"));
        host.metadata.labels = Some(BTreeMap::from([
            ("slipway.dev/cluster".to_owned(), cluster.to_owned()),
            ("slipway.dev/pool".to_owned(), p.pool.clone()),
        ]));
        host.data = json!({"spec": {
            "zone": p.zone,
            "hostClass": p.host_class,
            "provider": "netns",
            "cluster": {"namespace": ns, "name": cluster},
            "pool": p.pool,
            "podCIDR": block.to_string(),
        }});
        match self.hosts.create(&PostParams::default(), &host).await {
            Ok(_) => {
                info!(host = %p.name, zone = %p.zone, pool = %p.pool, "host created for {ns}/{cluster}");
                Ok(())
            }
            // Made by an earlier pass that died before noting it.
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(()),
            Err(e) => Err(e).with_context(|| format!("creating Host {}", p.name)),
        }
    }

    async fn delete_host(&self, name: &str) -> anyhow::Result<()> {
        match self.hosts.delete(name, &DeleteParams::default()).await {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
            Err(e) => Err(e).with_context(|| format!("deleting Host {name}")),
        }
    }

    /// Phase, conditions and hosts, written only when they change.
    async fn write_status(
        &self,
        api: &Api<DynamicObject>,
        cluster: &DynamicObject,
        phase: &str,
        owned: &[&DynamicObject],
        want: &[Placement],
        api_ready: bool,
    ) -> anyhow::Result<()> {
        let ready = |pool_is_cp: bool| {
            let of_kind = |n: &str| {
                want.iter()
                    .filter(|p| (p.pool == CONTROL_PLANE_POOL) == pool_is_cp && p.name == n)
                    .count()
                    > 0
            };
            let total = want
                .iter()
                .filter(|p| (p.pool == CONTROL_PLANE_POOL) == pool_is_cp)
                .count();
            let up = owned
                .iter()
                .filter(|h| of_kind(h.metadata.name.as_deref().unwrap_or_default()))
                .filter(|h| condition_true(h, "Ready"))
                .count();
            (up, total)
        };
        let (cp_up, cp_total) = ready(true);
        let (nodes_up, nodes_total) = ready(false);
        let cond = |kind: &str, ok: bool, reason_ok: &str, reason_not: &str, message: String| {
            json!({
                "type": kind,
                "status": if ok { "True" } else { "False" },
                "reason": if ok { reason_ok } else { reason_not },
                "message": message,
                "lastTransitionTime": rfc3339(now_secs()),
            })
        };
        let cp_ok = cp_total > 0 && cp_up == cp_total && api_ready;
        let nodes_ok = nodes_up == nodes_total;
        // Three control plane hosts wait for an endpoint to be reached at: say so.
        let (cp_reason, cp_message) = if cp_total > 1 && endpoint(cluster, owned).is_none() {
            (
                "WaitingForControlPlaneEndpoint",
                format!(
                    "{cp_up}/{cp_total} control plane hosts Ready; spec.controlPlaneEndpoint is \
                     not set (set it to a load balancer of the control plane hosts; the netns \
                     provider sets one itself)"
                ),
            )
        } else {
            (
                "HostsNotReady",
                format!("{cp_up}/{cp_total} control plane hosts Ready"),
            )
        };
        let mut conditions = cluster.data["status"]["conditions"].clone();
        for c in [
            cond(
                "ControlPlaneReady",
                cp_ok,
                "HostsReady",
                cp_reason,
                cp_message,
            ),
            cond(
                "NodesReady",
                nodes_ok,
                "HostsReady",
                "HostsNotReady",
                format!("{nodes_up}/{nodes_total} worker hosts Ready"),
            ),
            cond(
                "Ready",
                phase == "Running" && cp_ok && nodes_ok,
                "Running",
                phase,
                format!(
                    "phase {phase}: {} of {} hosts Ready",
                    cp_up + nodes_up,
                    cp_total + nodes_total
                ),
            ),
        ] {
            conditions = slipway_api::meta::set_condition(&conditions, c);
        }
        let mut hosts: Vec<&str> = owned
            .iter()
            .filter_map(|h| h.metadata.name.as_deref())
            .collect();
        hosts.sort_unstable();
        let mut status = json!({"phase": phase, "conditions": conditions, "hosts": hosts});
        if let Some(endpoint) = endpoint(cluster, owned) {
            status["apiEndpoint"] = json!(endpoint);
        }
        if status_equal(&cluster.data["status"], &status) {
            return Ok(());
        }
        let name = cluster.metadata.name.clone().unwrap_or_default();
        if cluster.data["status"]["phase"] != phase {
            info!(cluster = %name, phase, "cluster phase");
            self.event(cluster, "Normal", phase, &format!("cluster is {phase}"))
                .await;
        }
        api.patch_status(
            &name,
            &PatchParams::default(),
            &Patch::Merge(json!({
                "metadata": {"resourceVersion": cluster.metadata.resource_version},
                "status": status,
            })),
        )
        .await?;
        Ok(())
    }

    /// Records an Event on the Cluster (best effort: a lost Event is logged, not retried).
    async fn event(&self, cluster: &DynamicObject, type_: &str, reason: &str, message: &str) {
        let ns = cluster.metadata.namespace.clone().unwrap_or_default();
        let events: Api<Event> = Api::namespaced(self.client.clone(), &ns);
        let now = rfc3339(now_secs());
        let name = format!(
            "{}.{:x}",
            cluster.metadata.name.as_deref().unwrap_or_default(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or_default()
        );
        let event = serde_json::from_value::<Event>(json!({
            "metadata": {"name": name, "namespace": ns},
            "involvedObject": {
                "apiVersion": format!("{GROUP}/{VERSION}"),
                "kind": "Cluster",
                "namespace": ns,
                "name": cluster.metadata.name,
                "uid": cluster.metadata.uid,
            },
            "reason": reason,
            "message": message,
            "type": type_,
            "source": {"component": "slipway-cluster-controller"},
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
        }));
        let result = match event {
            Ok(e) => events.create(&PostParams::default(), &e).await.map(drop),
            Err(e) => Err(kube::Error::SerdeError(e)),
        };
        if let Err(e) = result {
            warn!(reason, error = %e, "could not record an Event");
        }
    }
}

/// The size of a host's block of a cluster's pod CIDR: /24 as kube-controller-manager's
/// default node CIDR mask, smaller for a pod CIDR narrower than /22 (4 blocks at least), /28 at
/// the smallest.
fn block_prefix(pods: ipnetwork::Ipv4Network) -> u8 {
    if pods.prefix() <= 22 {
        24
    } else {
        (pods.prefix() + 2).min(28)
    }
}

/// The lowest block of `pods` no host holds.
fn free_block(
    pods: ipnetwork::Ipv4Network,
    used: &BTreeSet<ipnetwork::Ipv4Network>,
) -> Option<ipnetwork::Ipv4Network> {
    let prefix = block_prefix(pods);
    if pods.prefix() > prefix {
        return None;
    }
    let size = 1u64 << (32 - u32::from(prefix));
    let count = 1u64 << u32::from(prefix - pods.prefix());
    let base = u64::from(u32::from(pods.network()));
    (0..count)
        .filter_map(|i| {
            let start = u32::try_from(base + i * size).ok()?;
            ipnetwork::Ipv4Network::new(start.into(), prefix).ok()
        })
        .find(|b| !used.iter().any(|u| u.overlaps(*b)))
}

/// Whether two statuses say the same, transition times aside.
fn status_equal(old: &Value, new: &Value) -> bool {
    let strip = |v: &Value| {
        let mut v = v.clone();
        if let Some(cs) = v.get_mut("conditions").and_then(Value::as_array_mut) {
            for c in cs {
                if let Some(m) = c.as_object_mut() {
                    m.remove("lastTransitionTime");
                }
            }
        }
        v
    };
    strip(old) == strip(new)
}

#[cfg(test)]
mod tests {
    use super::*;
    use slipway_api::slipway::{ControlPlane, NodePool, Topology};

    #[test]
    fn host_blocks_are_the_lowest_free_ones_and_run_out() {
        let net = |s: &str| s.parse::<ipnetwork::Ipv4Network>().expect("cidr");
        let pods = net("192.168.0.0/16");
        let mut used = BTreeSet::new();
        assert_eq!(free_block(pods, &used), Some(net("192.168.0.0/24")));
        used.insert(net("192.168.0.0/24"));
        used.insert(net("192.168.2.0/24"));
        assert_eq!(free_block(pods, &used), Some(net("192.168.1.0/24")));
        // A narrow pod CIDR is cut in four; a fifth host finds no room.
        let small = net("10.1.0.0/26");
        let mut used = BTreeSet::new();
        for want in [
            "10.1.0.0/28",
            "10.1.0.16/28",
            "10.1.0.32/28",
            "10.1.0.48/28",
        ] {
            let b = free_block(small, &used).expect("a block");
            assert_eq!(b, net(want));
            used.insert(b);
        }
        assert_eq!(free_block(small, &used), None);
        assert_eq!(free_block(net("10.1.0.0/30"), &BTreeSet::new()), None);
    }

    #[test]
    fn control_planes_spread_over_zones_and_pools_follow_their_failure_domain() {
        let spec = ClusterSpec {
            topology: Topology {
                control_plane: ControlPlane {
                    replicas: 3,
                    host_class: "small".into(),
                    storage_class: None,
                },
                node_pools: vec![
                    NodePool {
                        name: "a".into(),
                        replicas: 2,
                        host_class: "big".into(),
                        storage_class: None,
                        failure_domain: Some("zb".into()),
                    },
                    NodePool {
                        name: "spread".into(),
                        replicas: 2,
                        host_class: "small".into(),
                        storage_class: None,
                        failure_domain: None,
                    },
                ],
            },
            ..ClusterSpec::default()
        };
        let zones = ["za".to_owned(), "zb".to_owned(), "zc".to_owned()];
        let got: Vec<(String, String)> = placements("ns", "c", &spec, &zones)
            .into_iter()
            .map(|p| (p.name, p.zone))
            .collect();
        let want = [
            ("ns-c-control-plane-0", "za"),
            ("ns-c-control-plane-1", "zb"),
            ("ns-c-control-plane-2", "zc"),
            ("ns-c-a-0", "zb"),
            ("ns-c-a-1", "zb"),
            ("ns-c-spread-0", "za"),
            ("ns-c-spread-1", "zb"),
        ];
        assert_eq!(
            got,
            want.map(|(n, z)| (n.to_owned(), z.to_owned())).to_vec()
        );
        assert!(placements("ns", "c", &spec, &[]).is_empty());
    }
}
