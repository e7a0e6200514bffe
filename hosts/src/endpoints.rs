//! Control plane endpoints of the `netns` provider, as Cluster API's docker provider puts a load
//! balancer in front of its control plane: a Cluster with three control plane hosts and no
//! `spec.controlPlaneEndpoint` gets a VIP from the underlay's last /24 (the uplink's, which no
//! zone uses), written into its spec as Cluster API's infrastructure providers do. The core
//! namespace, which every host and this machine reach the underlay through, spreads new
//! connections to the VIP's API port and etcd client port over the control plane hosts that
//! accept a connection on that port (checked every [`PERIOD`]), in one nftables table replaced
//! whole. A host that stops answering is out within a period; conntrack keeps live connections
//! on the hosts that still answer.
//!
//! The Cluster's spec is the VIP's only record: a restarted controller finds every VIP there,
//! and a deleted Cluster's VIP leaves the table at the next pass.

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, SocketAddr};
use std::os::unix::fs::MetadataExt as _;
use std::sync::Arc;
use std::time::Duration;

use kube::api::{
    Api, ApiResource, DynamicObject, GroupVersionKind, ListParams, Patch, PatchParams,
};
use serde_json::json;
use slipway_api::slipway::{API_PORT, CONTROL_PLANE_POOL, GROUP, VERSION};
use slipway_dataplane::nft::{self, VipPort};
use tracing::{info, warn};

use crate::netns::NetnsProvider;

/// How often backends are checked and the table brought up to date.
pub const PERIOD: Duration = Duration::from_millis(500);

/// The longest a backend may take to accept a connection.
const CONNECT_TIMEOUT: Duration = Duration::from_millis(300);

/// The etcd client port, which joining etcd members reach through the VIP.
pub const ETCD_PORT: u16 = 2379;

fn resource(kind: &str, plural: &str) -> ApiResource {
    ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk(GROUP, VERSION, kind), plural)
}

/// Keeps the control plane endpoints of Clusters on netns hosts.
pub struct EndpointReconciler {
    provider: Arc<NetnsProvider>,
    client: kube::Client,
    clusters: Api<DynamicObject>,
    hosts: Api<DynamicObject>,
    /// The ruleset last installed, and in which core namespace (its inode: the core goes with
    /// the last host and a new one starts empty). None: install at the next pass.
    installed: Option<(u64, String)>,
}

impl std::fmt::Debug for EndpointReconciler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EndpointReconciler").finish_non_exhaustive()
    }
}

/// Whether something accepts a TCP connection at `ip:port` within [`CONNECT_TIMEOUT`].
async fn answers(ip: Ipv4Addr, port: u16) -> bool {
    matches!(
        tokio::time::timeout(
            CONNECT_TIMEOUT,
            tokio::net::TcpStream::connect(SocketAddr::from((ip, port)))
        )
        .await,
        Ok(Ok(_))
    )
}

fn endpoint_host(cluster: &DynamicObject) -> Option<Ipv4Addr> {
    cluster.data["spec"]["controlPlaneEndpoint"]["host"]
        .as_str()?
        .parse()
        .ok()
}

impl EndpointReconciler {
    pub fn new(client: kube::Client, provider: Arc<NetnsProvider>) -> Self {
        Self {
            provider,
            clusters: Api::all_with(client.clone(), &resource("Cluster", "clusters")),
            hosts: Api::all_with(client.clone(), &resource("Host", "hosts")),
            client,
            installed: None,
        }
    }

    /// Runs until dropped: a pass every [`PERIOD`].
    pub async fn run(mut self) -> anyhow::Result<()> {
        let mut tick = tokio::time::interval(PERIOD);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if let Err(e) = self.pass().await {
                warn!(error = %format!("{e:#}"), "control plane endpoints: pass failed; retrying");
            }
        }
    }

    /// One pass: VIPs for the Clusters that need one, then the table from the hosts that
    /// answer.
    pub async fn pass(&mut self) -> anyhow::Result<()> {
        let Some(pool) = self.provider.endpoint_pool() else {
            return Ok(());
        };
        let clusters = self.clusters.list(&ListParams::default()).await?.items;
        let hosts = self.hosts.list(&ListParams::default()).await?.items;
        let mut taken: BTreeSet<Ipv4Addr> = clusters.iter().filter_map(endpoint_host).collect();
        for cluster in &clusters {
            let wants = cluster.data["spec"]["topology"]["controlPlane"]["replicas"]
                .as_u64()
                .is_some_and(|r| r > 1);
            if !wants
                || endpoint_host(cluster).is_some()
                || !cluster.data["spec"]["controlPlaneEndpoint"].is_null()
                || cluster.metadata.deletion_timestamp.is_some()
            {
                continue;
            }
            let ns = cluster.metadata.namespace.clone().unwrap_or_default();
            let name = cluster.metadata.name.clone().unwrap_or_default();
            let Some(vip) = pool.iter().copied().find(|a| !taken.contains(a)) else {
                warn!(cluster = %format!("{ns}/{name}"), "no free control plane VIP in the underlay's last /24");
                continue;
            };
            let api: Api<DynamicObject> =
                Api::namespaced_with(self.client.clone(), &ns, &resource("Cluster", "clusters"));
            api.patch(
                &name,
                &PatchParams::default(),
                &Patch::Merge(json!({
                    "metadata": {"resourceVersion": cluster.metadata.resource_version},
                    "spec": {"controlPlaneEndpoint": {"host": vip.to_string(), "port": API_PORT}},
                })),
            )
            .await?;
            taken.insert(vip);
            info!(cluster = %format!("{ns}/{name}"), %vip, "control plane endpoint");
        }
        let mut ports = Vec::new();
        for cluster in &clusters {
            let Some(vip) = endpoint_host(cluster).filter(|v| pool.contains(v)) else {
                continue;
            };
            let ns = cluster.metadata.namespace.as_deref().unwrap_or_default();
            let name = cluster.metadata.name.as_deref().unwrap_or_default();
            let addresses: Vec<Ipv4Addr> = hosts
                .iter()
                .filter(|h| {
                    let spec = &h.data["spec"];
                    spec["cluster"]["namespace"] == ns
                        && spec["cluster"]["name"] == name
                        && spec["pool"] == CONTROL_PLANE_POOL
                        && h.metadata.deletion_timestamp.is_none()
                })
                .filter_map(|h| h.data["status"]["address"].as_str()?.parse().ok())
                .collect();
            for port in [API_PORT, ETCD_PORT] {
                let checks = addresses.iter().map(|a| answers(*a, port));
                let alive = futures_util::future::join_all(checks).await;
                let backends = addresses
                    .iter()
                    .zip(alive)
                    .filter_map(|(a, up)| up.then_some(*a))
                    .collect();
                ports.push(VipPort {
                    vip,
                    port,
                    backends,
                });
            }
        }
        let keep = self.provider.uplink_addresses().0;
        let ruleset = nft::endpoints_ruleset(&ports, keep);
        let core = self.provider.core_netns();
        // No core: no host, so no endpoint to serve.
        let Ok(inode) = std::fs::metadata(slipway_dataplane::netns::path(&core)).map(|m| m.ino())
        else {
            return Ok(());
        };
        let current = (inode, ruleset);
        if self.installed.as_ref() != Some(&current) {
            slipway_dataplane::netns::run_in(&core, || nft::install_endpoints(&ports, keep))??;
            let summary: Vec<String> = ports
                .iter()
                .map(|p| format!("{}:{} -> {:?}", p.vip, p.port, p.backends))
                .collect();
            info!(endpoints = ?summary, "control plane endpoints updated");
            self.installed = Some(current);
        }
        Ok(())
    }
}
