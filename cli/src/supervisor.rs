//! `slipway supervisor`: the API server, its controllers, and (with `--host-provider netns`)
//! the Host reconciler that provisions hosts on this machine.

use std::sync::Arc;

use anyhow::Context as _;
use slipway_hosts::netns::NetnsProvider;
use slipway_hosts::reconciler::{HostReconciler, ProviderArgs};
use slipway_hosts::storage::{StorageHosts, StorageSettings};
use slipway_supervisor::cli::{Listening, SupervisorArgs};
use slipway_supervisor::controllers::volume_plan::BlockStoreRef;
use slipway_supervisor::tls::Pki;

#[derive(Debug, clap::Args)]
pub struct SupervisorCommand {
    #[command(flatten)]
    pub server: SupervisorArgs,
    #[command(flatten)]
    pub hosts: ProviderArgs,
    /// Run a workload cluster's controllers (scheduler, ReplicaSet, Deployment, EndpointSlice,
    /// node lifecycle, garbage collector) beside the API server, as its administrator: what a
    /// control plane host runs.
    #[arg(long)]
    pub cluster_controllers: bool,
    /// With --cluster-controllers: a kubeconfig for the cluster's link to its supervisor
    /// namespace (`system:cluster:<namespace>:<cluster>`, handed to control plane hosts when
    /// they join), for the controllers that forward to the supervisor. Needs
    /// --supervisor-namespace and --cluster-name.
    #[arg(long, requires_all = ["supervisor_namespace", "cluster_name"])]
    pub supervisor_link: Option<std::path::PathBuf>,
    /// The cluster's namespace in the supervisor (with --supervisor-link).
    #[arg(long, requires = "supervisor_link")]
    pub supervisor_namespace: Option<String>,
    /// The cluster's name in the supervisor (with --supervisor-link).
    #[arg(long, requires = "supervisor_link")]
    pub cluster_name: Option<String>,
}

impl SupervisorCommand {
    pub fn run(self) -> anyhow::Result<()> {
        tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .context("tokio runtime")?
            .block_on(self.run_with(|_| async { std::future::pending().await }))
    }

    /// Serves until SIGINT/SIGTERM with the host reconciler (if a provider is configured) and
    /// `more` beside the API server; `more` ending with an error stops the supervisor.
    pub async fn run_with<F, Fut>(self, more: F) -> anyhow::Result<()>
    where
        F: FnOnce(Listening) -> Fut + Send + 'static,
        Fut: Future<Output = anyhow::Result<()>> + Send + 'static,
    {
        let admin = self.server.data_dir.join("admin.kubeconfig");
        let controllers = self.cluster_controllers;
        // A control plane host's candidacy for the controllers' Lease: its address (the
        // first it advertises) and this process.
        let identity = format!(
            "{}_{}",
            self.server
                .advertise_address
                .first()
                .copied()
                .unwrap_or(self.server.listen.ip()),
            std::process::id()
        );
        let link = match (
            self.supervisor_link.clone(),
            self.supervisor_namespace.clone(),
            self.cluster_name.clone(),
        ) {
            (Some(path), Some(namespace), Some(cluster)) => Some((path, namespace, cluster)),
            _ => None,
        };
        let more = move |listening: Listening| async move {
            if !controllers {
                return more(listening).await;
            }
            let client = crate::client_for(&admin).await?;
            let supervisor = match link {
                Some((path, namespace, cluster)) => Some(slipway_controllers::SupervisorLink {
                    client: crate::client_for(&path)
                        .await
                        .with_context(|| format!("--supervisor-link {}", path.display()))?,
                    namespace,
                    cluster,
                }),
                None => None,
            };
            let options = slipway_controllers::Options {
                supervisor,
                ..Default::default()
            };
            // With three control plane hosts, one runs the controllers at a time.
            let elected =
                slipway_controllers::leader::run_elected(client.clone(), identity, || {
                    slipway_controllers::run(client.clone(), options.clone())
                });
            tokio::select! {
                () = elected => anyhow::bail!("the workload cluster controllers stopped"),
                r = more(listening) => r,
            }
        };
        self.run_inner(more).await
    }

    async fn run_inner<F, Fut>(mut self, more: F) -> anyhow::Result<()>
    where
        F: FnOnce(Listening) -> Fut + Send + 'static,
        Fut: Future<Output = anyhow::Result<()>> + Send + 'static,
    {
        let data_dir = self.server.data_dir.clone();
        let Some(provider) = self
            .hosts
            .provider(&data_dir)
            .context("--host-provider netns")?
        else {
            return self.server.run_async_with(more).await;
        };
        anyhow::ensure!(
            self.server.listen.ip().is_unspecified(),
            "--listen: netns hosts reach the supervisor through the uplink ({}); listen on \
             0.0.0.0 (or [::]) with --host-provider netns",
            provider.uplink_addresses().0
        );
        // The hosts' URL names the uplink's address: the serving certificate must name it too.
        self.server
            .advertise_address
            .push(provider.uplink_addresses().0.into());
        // No Cluster may take the hosts' own network.
        self.server.reserved_network.push((
            "the hosts' underlay (--underlay)".into(),
            ipnetwork::IpNetwork::V4(provider.config().underlay),
        ));
        let provider = Arc::new(provider);
        let storage = if self.hosts.storage_hosts {
            let (storage, stores) = storage_hosts(&self.hosts, provider.clone(), &data_dir).await?;
            self.server.block_store.extend(stores);
            Some(storage)
        } else {
            None
        };
        let zones = self.hosts.zones.clone();
        let hosts = self.hosts.clone();
        self.server
            .run_async_with(move |listening| async move {
                let endpoints = slipway_hosts::endpoints::EndpointReconciler::new(
                    crate::client_for(&listening.controllers_kubeconfig).await?,
                    provider.clone(),
                );
                let reconciler = host_reconciler(&hosts, provider, &data_dir, &listening).await?;
                let storage = async move {
                    match storage {
                        Some(s) => s.run(zones).await,
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    r = reconciler.run() => r,
                    r = endpoints.run() => r,
                    () = storage => Ok(()),
                    r = more(listening) => r,
                }
            })
            .await
    }
}

/// Per zone, a storage host with its block store (TLS from the supervisor's CA, made here
/// before the API server so the volume reconciler starts with them).
async fn storage_hosts(
    hosts: &ProviderArgs,
    provider: Arc<NetnsProvider>,
    data_dir: &std::path::Path,
) -> anyhow::Result<(StorageHosts, Vec<BlockStoreRef>)> {
    let pki = Pki::new(data_dir);
    pki.ensure(&[]).context("the supervisor's CA")?;
    let issuer = pki.clone();
    let settings = StorageSettings {
        command: vec![
            std::env::current_exe()?.display().to_string(),
            "blockstore".into(),
        ],
        root: data_dir.join("storage"),
        client_ca: pki.ca_cert(),
        issue_server: Arc::new(move |names: &[String]| {
            issuer
                .issue_server(names, slipway_supervisor::tls::ADMIN_DAYS)
                .map_err(Into::into)
        }),
        cpu_millis: hosts.storage_cpu_millis,
        memory_bytes: hosts.storage_memory_bytes,
    };
    let storage = StorageHosts::new(provider, settings);
    let mut stores = Vec::new();
    for zone in &hosts.zones {
        let s = storage.ensure(zone).await?;
        stores.push(BlockStoreRef {
            zone: s.zone,
            control: s.control,
            nbd: s.nbd,
        });
    }
    Ok((storage, stores))
}

async fn host_reconciler(
    hosts: &ProviderArgs,
    provider: Arc<NetnsProvider>,
    data_dir: &std::path::Path,
    listening: &Listening,
) -> anyhow::Result<HostReconciler> {
    let settings = hosts.join_settings(
        &provider,
        data_dir,
        listening.addr.port(),
        listening.ca.clone(),
    )?;
    let client = crate::client_for(&listening.controllers_kubeconfig).await?;
    Ok(HostReconciler::new(client, provider, settings))
}
