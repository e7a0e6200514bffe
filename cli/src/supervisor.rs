//! `slipway supervisor`: the API server, its controllers, and (with `--host-provider netns`)
//! the Host reconciler that provisions hosts on this machine.

use std::sync::Arc;

use anyhow::Context as _;
use slipway_hosts::reconciler::{HostReconciler, ProviderArgs};
use slipway_supervisor::cli::SupervisorArgs;

#[derive(Debug, clap::Args)]
pub struct SupervisorCommand {
    #[command(flatten)]
    server: SupervisorArgs,
    #[command(flatten)]
    hosts: ProviderArgs,
}

impl SupervisorCommand {
    pub fn run(self) -> anyhow::Result<()> {
        tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .context("tokio runtime")?
            .block_on(self.run_async())
    }

    async fn run_async(mut self) -> anyhow::Result<()> {
        let data_dir = self.server.data_dir.clone();
        let Some(provider) = self
            .hosts
            .provider(&data_dir)
            .context("--host-provider netns")?
        else {
            return self.server.run_async().await;
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
        let hosts = self.hosts.clone();
        self.server
            .run_async_with(move |listening| async move {
                let settings = hosts.join_settings(
                    &provider,
                    &data_dir,
                    listening.addr.port(),
                    listening.ca.clone(),
                )?;
                let config =
                    kube::config::Kubeconfig::read_from(&listening.controllers_kubeconfig)?;
                let config = kube::Config::from_custom_kubeconfig(
                    config,
                    &kube::config::KubeConfigOptions::default(),
                )
                .await?;
                let client = kube::Client::try_from(config)?;
                HostReconciler::new(client, Arc::new(provider), settings)
                    .run()
                    .await
            })
            .await
    }
}
