//! `slipway lb controller`: Slipway's LoadBalancer VIP allocation on its own against any
//! Kubernetes API (MetalLB's controller): every Service of type LoadBalancer gets a VIP from a
//! `LoadBalancerPool` in its `status.loadBalancer.ingress`, with condition `VIPAllocated` and an
//! Event for each allocation, refusal and release. Edge hosts serve the VIPs with
//! `slipway lb serve --kubeconfig` against the same API.

use std::path::PathBuf;

use slipway_supervisor::controllers::loadbalancers::{LoadBalancerReconciler, Scope};

/// `slipway lb <command>`: the daemon's commands and the standalone controller.
#[derive(Debug, clap::Subcommand)]
pub enum LbCli {
    #[command(flatten)]
    Lb(slipway_lb::cli::LbCommand),
    /// Allocate VIPs to LoadBalancer Services of a Kubernetes API from its LoadBalancerPools
    /// (slipway.dev/v1alpha1), until SIGINT/SIGTERM.
    Controller(ControllerArgs),
}

#[derive(Debug, clap::Args)]
pub struct ControllerArgs {
    /// The Kubernetes API's kubeconfig (it must serve LoadBalancerPools: Slipway's API does, a
    /// cluster of yours needs the CRD in deploy/loadbalancerpool-crd.yaml).
    #[arg(long)]
    kubeconfig: PathBuf,
}

impl LbCli {
    pub fn run(self) -> anyhow::Result<()> {
        match self {
            Self::Lb(command) => command.run(),
            Self::Controller(args) => tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()?
                .block_on(async move {
                    let client = crate::client_for(&args.kubeconfig).await?;
                    let reconciler = LoadBalancerReconciler::with_scope(client, Scope::Pools);
                    println!("slipway lb controller: allocating VIPs from LoadBalancerPools");
                    tokio::select! {
                        () = reconciler.run() => Ok(()),
                        r = tokio::signal::ctrl_c() => r.map_err(Into::into),
                        () = terminate() => Ok(()),
                    }
                }),
        }
    }
}

async fn terminate() {
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(mut s) => {
            s.recv().await;
        }
        Err(_) => std::future::pending().await,
    }
}
