//! `slipway lb ...`: the LB's command-line surface, as a clap subcommand the `slipway` binary
//! mounts (see the crate docs for the wiring).

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context as _;
use clap::{Args, Subcommand};

use crate::announce::StaticLease;
use crate::api::Client;
use crate::config::{DEFAULT_SOCKET, LbConfig, ServiceSpec};
use crate::daemon::serve;
use crate::datapath::{AttachPoint, XdpMode};

/// `slipway lb <command>`.
#[derive(Debug, Subcommand)]
pub enum LbCommand {
    /// Run the load balancer daemon on this host (root: loads eBPF, attaches to the interface).
    Serve(ServeArgs),
    /// Show VIPs, services, backends with health, ring shares and flow counts, pools.
    Status {
        #[arg(long, default_value = DEFAULT_SOCKET)]
        socket: PathBuf,
        /// Print the JSON the API returns instead of the table.
        #[arg(long)]
        json: bool,
    },
    /// Create or update a service from a YAML or JSON file (a `ServiceSpec`).
    Apply {
        #[arg(short = 'f', long = "filename")]
        file: PathBuf,
        #[arg(long, default_value = DEFAULT_SOCKET)]
        socket: PathBuf,
    },
    /// Delete a service; its VIP returns to the pool.
    Delete {
        /// `namespace/name`.
        service: String,
        #[arg(long, default_value = DEFAULT_SOCKET)]
        socket: PathBuf,
    },
    /// Remove the datapath for good: detach the programs (their links are pinned and outlive
    /// the daemon), forget the pinned maps (every flow) and the saved state. Refused while
    /// the daemon answers on its socket.
    Teardown {
        /// The daemon configuration it ran with (pin directory, state directory, socket).
        #[arg(long)]
        config: PathBuf,
    },
    /// Print the Prometheus metrics.
    Metrics {
        #[arg(long, default_value = DEFAULT_SOCKET)]
        socket: PathBuf,
    },
}

/// `slipway lb serve`.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// The daemon configuration (YAML or JSON, an `LbConfig`).
    #[arg(long)]
    pub config: PathBuf,
    /// Attach at XDP (native mode) instead of TC: for NICs with native XDP, not veths.
    #[arg(long)]
    pub xdp: bool,
    /// Service ports served at once (overrides `maps.services`; default 4096).
    #[arg(long)]
    pub max_services: Option<u32>,
    /// Backend ids, one per service port and backend (overrides `maps.backends`; default
    /// 65536).
    #[arg(long)]
    pub max_backends: Option<u32>,
    /// Tracked flows (overrides `maps.flows`; default 1048576).
    #[arg(long)]
    pub max_flows: Option<u32>,
    /// Serve the Prometheus metrics over TCP here too, e.g. 0.0.0.0:9630 (overrides
    /// `metricsAddress`).
    #[arg(long)]
    pub metrics_address: Option<std::net::SocketAddr>,
    /// Take the services from this Kubernetes API (a kubeconfig: the supervisor's, for an
    /// edge host) instead of the local socket: every LoadBalancer Service whose status holds
    /// a VIP, with its EndpointSlices' ready addresses as backends.
    #[arg(long)]
    pub kubeconfig: Option<PathBuf>,
    /// With --kubeconfig: only Services with these labels (a label selector, e.g.
    /// `slipway.dev/cluster`).
    #[arg(long, requires = "kubeconfig")]
    pub service_labels: Option<String>,
    /// With --kubeconfig: announce only the VIPs whose `coordination.k8s.io/v1` Lease this
    /// host holds in this namespace (one per VIP, `vip-<address>`), taking over those whose
    /// holder stops renewing (edge hosts fail over to each other). Needs --holder.
    #[arg(long, requires_all = ["kubeconfig", "holder"])]
    pub vip_lease_namespace: Option<String>,
    /// This host's name in the VIP Leases (`holderIdentity`).
    #[arg(long, requires = "vip_lease_namespace")]
    pub holder: Option<String>,
}

async fn kube_client(path: &std::path::Path) -> anyhow::Result<kube::Client> {
    let config = kube::config::Kubeconfig::read_from(path)
        .with_context(|| format!("reading {}", path.display()))?;
    let config =
        kube::Config::from_custom_kubeconfig(config, &kube::config::KubeConfigOptions::default())
            .await?;
    Ok(kube::Client::try_from(config)?)
}

impl ServeArgs {
    /// The configuration file with the flags applied.
    pub fn config(&self) -> anyhow::Result<LbConfig> {
        let mut config: LbConfig = read_yaml(&self.config)?;
        for (flag, field) in [
            (self.max_services, &mut config.maps.services),
            (self.max_backends, &mut config.maps.backends),
            (self.max_flows, &mut config.maps.flows),
        ] {
            if let Some(value) = flag {
                *field = value;
            }
        }
        if self.metrics_address.is_some() {
            config.metrics_address = self.metrics_address;
        }
        Ok(config)
    }
}

fn read_yaml<T: serde::de::DeserializeOwned>(path: &PathBuf) -> anyhow::Result<T> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    serde_saphyr::from_str(&text).with_context(|| format!("parsing {}", path.display()))
}

impl LbCommand {
    pub fn run(self) -> anyhow::Result<()> {
        match self {
            LbCommand::Serve(args) => {
                let config = args.config()?;
                let point = if args.xdp {
                    AttachPoint::Xdp(XdpMode::Driver)
                } else {
                    AttachPoint::Tc
                };
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?;
                let (lease, feed): (Arc<dyn crate::announce::Lease>, _) = match &args.kubeconfig {
                    Some(path) => {
                        let client = runtime.block_on(kube_client(path))?;
                        let (tx, rx) = tokio::sync::watch::channel(None);
                        runtime.spawn(crate::feed::run(
                            client.clone(),
                            args.service_labels.clone(),
                            tx,
                        ));
                        let notify = Arc::new(tokio::sync::Notify::new());
                        let lease: Arc<dyn crate::announce::Lease> =
                            match (&args.vip_lease_namespace, &args.holder) {
                                (Some(namespace), Some(holder)) => {
                                    let leases = Arc::new(crate::election::VipLeases::default());
                                    let wake = notify.clone();
                                    runtime.spawn(crate::election::run(
                                        client,
                                        namespace.clone(),
                                        holder.clone(),
                                        leases.clone(),
                                        rx.clone(),
                                        move || wake.notify_one(),
                                    ));
                                    leases
                                }
                                _ => Arc::new(StaticLease),
                            };
                        (
                            lease,
                            Some(crate::daemon::Feed {
                                desired: rx,
                                leases_changed: notify,
                            }),
                        )
                    }
                    None => (Arc::new(StaticLease), None),
                };
                runtime.block_on(serve(config, point, lease, feed, async {
                    let mut term = match tokio::signal::unix::signal(
                        tokio::signal::unix::SignalKind::terminate(),
                    ) {
                        Ok(term) => term,
                        Err(_) => {
                            let _ = tokio::signal::ctrl_c().await;
                            return;
                        }
                    };
                    tokio::select! {
                        _ = tokio::signal::ctrl_c() => {}
                        _ = term.recv() => {}
                    }
                }))?;
                Ok(())
            }
            LbCommand::Status { socket, json } => {
                let status = Client::new(&socket).status()?;
                if json {
                    println!("{}", serde_json::to_string_pretty(&status)?);
                } else {
                    print!("{}", status.table());
                }
                Ok(())
            }
            LbCommand::Apply { file, socket } => {
                let spec: ServiceSpec = read_yaml(&file)?;
                let vip = Client::new(&socket).apply(&spec)?;
                println!("service {} applied: VIP {vip}", spec.key());
                Ok(())
            }
            LbCommand::Delete { service, socket } => {
                let (namespace, name) = service
                    .split_once('/')
                    .context("the service is named namespace/name")?;
                Client::new(&socket).delete(namespace, name)?;
                println!("service {service} deleted");
                Ok(())
            }
            LbCommand::Teardown { config } => {
                let config: LbConfig = read_yaml(&config)?;
                if Client::new(&config.socket).status().is_ok() {
                    anyhow::bail!(
                        "the daemon still answers on {}: stop it first",
                        config.socket.display()
                    );
                }
                let mut removed = match &config.pin_dir {
                    Some(dir) => crate::datapath::remove_pins(dir)?,
                    None => Vec::new(),
                };
                removed.extend(crate::state::remove(&config.state_dir)?);
                for path in &removed {
                    println!("removed {}", path.display());
                }
                Ok(())
            }
            LbCommand::Metrics { socket } => {
                print!("{}", Client::new(&socket).metrics()?);
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(subcommand)]
        lb: LbCommand,
    }

    #[test]
    fn parses_the_subcommands() {
        let cli = Cli::try_parse_from(["lb", "status", "--json"]).expect("status");
        assert!(
            matches!(cli.lb, LbCommand::Status { json: true, ref socket } if socket.as_os_str() == DEFAULT_SOCKET)
        );
        let cli = Cli::try_parse_from(["lb", "apply", "-f", "svc.yaml", "--socket", "/tmp/s"])
            .expect("apply");
        assert!(
            matches!(cli.lb, LbCommand::Apply { ref file, .. } if file.as_os_str() == "svc.yaml")
        );
        let cli =
            Cli::try_parse_from(["lb", "serve", "--config", "lb.yaml", "--xdp"]).expect("serve");
        assert!(matches!(
            cli.lb,
            LbCommand::Serve(ServeArgs { xdp: true, .. })
        ));
        let cli = Cli::try_parse_from([
            "lb",
            "serve",
            "--config",
            "lb.yaml",
            "--max-services",
            "10000",
            "--max-flows",
            "4000000",
        ])
        .expect("sizes");
        assert!(matches!(
            cli.lb,
            LbCommand::Serve(ServeArgs {
                max_services: Some(10000),
                max_flows: Some(4_000_000),
                max_backends: None,
                ..
            })
        ));
        assert!(
            Cli::try_parse_from(["lb", "delete"]).is_err(),
            "delete needs a service"
        );
    }

    #[test]
    fn reads_yaml_config_and_service_files() {
        let config: LbConfig = serde_saphyr::from_str(
            "interface: eth0\npools:\n  - name: ingress\n    cidr: 10.99.100.0/24\n\
             egressCidrs: [10.99.200.0/24]\nminPoolPrefix: 27\n",
        )
        .expect("config");
        config.validate().expect("valid");
        assert_eq!(config.socket.as_os_str(), DEFAULT_SOCKET);
        assert!(
            serde_saphyr::from_str::<LbConfig>("interface: eth0\npools: []\nbogus: 1\n").is_err()
        );
        let spec: ServiceSpec = serde_saphyr::from_str(
            "namespace: default\nname: web\nports:\n  - port: 80\n    protocol: TCP\n\
             externalTrafficPolicy: Local\nloadBalancerSourceRanges: [10.0.0.0/8]\n\
             backends:\n  - ip: 10.99.0.3\n    nodeLocal: true\n",
        )
        .expect("service");
        spec.validate().expect("valid");
        assert_eq!(spec.backends[0].weight, 1);
    }

    #[test]
    fn reads_ipv6_pools_and_services_from_yaml() {
        let config: LbConfig = serde_saphyr::from_str(
            "interface: eth0
snatIp6: fd99::2
pools:
  - name: ingress
    cidr: 10.99.100.0/24
  - name: ingress6
    cidr: fd99:100::/120
egressCidrs:
  - fd99:200::/64
",
        )
        .expect("config");
        config.validate().expect("valid");
        assert_eq!(config.snat_ip6, Some("fd99::2".parse().expect("ip")));
        assert_eq!(config.pools[1].cidr, "fd99:100::/120");
        let spec: ServiceSpec = serde_saphyr::from_str(
            "namespace: default
name: web6
ipFamilies: [IPv6]
ports:
  - port: 80
loadBalancerIP: fd99:100::7
loadBalancerSourceRanges:
  - fd99::/64
backends:
  - ip: fd99::3
  - ip: fd99::4
    weight: 2
",
        )
        .expect("service");
        spec.validate().expect("valid");
        assert_eq!(spec.family(), crate::config::IpFamily::Ipv6);
        assert_eq!(
            spec.backends[1].ip,
            "fd99::4".parse::<std::net::IpAddr>().expect("ip")
        );
    }

    /// The YAML block of the README that starts with `# {name}`.
    fn readme_block(name: &str) -> String {
        let readme = include_str!("../../README.md");
        let start = readme
            .find(&format!("```yaml\n# {name}"))
            .unwrap_or_else(|| panic!("no {name} block in README.md"));
        let body = &readme[start + "```yaml\n".len()..];
        body[..body.find("```").expect("closed block")].to_owned()
    }

    #[test]
    fn the_readme_examples_parse_and_validate() {
        let config: LbConfig = serde_saphyr::from_str(&readme_block("lb.yaml")).expect("lb.yaml");
        config.validate().expect("valid config");
        assert_eq!(
            config.maps,
            crate::config::MapSizes::default(),
            "the defaults it shows"
        );
        let spec: ServiceSpec =
            serde_saphyr::from_str(&readme_block("service.yaml")).expect("service.yaml");
        spec.validate().expect("valid service");
        assert_eq!(spec.affinity_timeout_secs(), Some(10800));
    }
}
