//! The agent's startup: the node datapath installed, the desired state restored, the local API
//! served; and the atomic file write the desired state is kept with.

use std::fs;
use std::io::Write;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum::Router;
use axum::routing::get;
use slipway_cni::plugin::{NodeState, VXLAN_OVERHEAD};
use slipway_cni::spec::Routing;
use slipway_dataplane::abi::NodeConfig;
use slipway_dataplane::link::Netlink;
use slipway_dataplane::node::{self, NodeMaps, Pins};
use slipway_dataplane::services::ServiceDatapath;
use tokio::sync::Mutex;
use tracing::info;

use crate::api::{
    explain, flows, get_hosts, get_namespaces, get_pods, get_policies, get_services, metrics,
    put_hosts, put_namespaces, put_pods, put_policies, put_services, status,
};
use crate::args::{AgentArgs, VXLAN_DEVICE, VXLAN_PORT};
use crate::heartbeat::Heartbeat;
use crate::hosts::{Host, restore_hosts, sync_routes};
use crate::metrics::watch_counters;
use crate::policy::PolicyNode;
use crate::services::LocalService;
use ipnetwork::Ipv4Network;

pub(crate) struct Agent {
    pub(crate) args: AgentArgs,
    pub(crate) pins: Pins,
    pub(crate) node_ip: Ipv4Addr,
    /// This host's block of the pod CIDR (`--host-block`, or its Node's `spec.podCIDR`).
    pub(crate) host_block: Ipv4Network,
    pub(crate) hosts: Mutex<Vec<Host>>,
    pub(crate) services: Mutex<(Vec<LocalService>, ServiceDatapath)>,
    /// The health-check node ports of the services with externalTrafficPolicy Local.
    pub(crate) health_ports: crate::health_ports::HealthPorts,
    pub(crate) policy: Arc<PolicyNode>,
    /// Set while the lists come from a cluster API (`--cluster-kubeconfig`): the local API's
    /// PUTs are refused.
    pub(crate) feed: Option<Arc<crate::feed::Feed>>,
}

/// Desired state the agent was given, kept beside the node state so a restart knows it.
pub(crate) fn desired_path(data_dir: &Path, what: &str) -> PathBuf {
    data_dir.join(format!("{what}.json"))
}

/// The host's block from its Node's `spec.podCIDR` in the cluster of `--cluster-kubeconfig`,
/// awaited (with back-off) until the cluster has set it.
async fn node_block(args: &AgentArgs) -> anyhow::Result<Ipv4Network> {
    use anyhow::Context as _;
    let (source, node) = args
        .kubelet
        .wanted(true, args.heartbeat.host_name.as_deref())?
        .context(
            "--host-block: required without --cluster-kubeconfig (the Node it could come from)",
        )?;
    let nodes: kube::Api<k8s_openapi::api::core::v1::Node> =
        kube::Api::all(crate::feed::client(&source).await?);
    let mut delay = std::time::Duration::from_millis(200);
    loop {
        match nodes.get_opt(&node).await {
            Ok(Some(n)) => {
                if let Some(cidr) = n.spec.and_then(|s| s.pod_cidr) {
                    let block = cidr.parse().with_context(|| {
                        format!("Node {node}: spec.podCIDR {cidr:?} is not a CIDR")
                    })?;
                    info!(%node, %block, "host block from the Node's spec.podCIDR");
                    return Ok(block);
                }
                info!(%node, retry_in = ?delay, "the Node has no spec.podCIDR yet");
            }
            Ok(None) => info!(%node, retry_in = ?delay, "the Node does not exist yet"),
            Err(e) => tracing::warn!(%node, error = %e, retry_in = ?delay, "reading the Node"),
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(std::time::Duration::from_secs(5));
    }
}

/// Runs the agent until SIGTERM/SIGINT. The datapath stays in place when it exits.
pub async fn run(args: AgentArgs) -> anyhow::Result<()> {
    use anyhow::Context as _;
    let routing: Routing = args.routing.into();
    let host_block = match args.host_block {
        Some(block) => block,
        None => node_block(&args).await?,
    };
    anyhow::ensure!(
        args.pod_cidr.contains(host_block.network())
            && args.pod_cidr.prefix() <= host_block.prefix(),
        "--host-block: {} is not inside --pod-cidr {}",
        host_block,
        args.pod_cidr
    );
    let pins = Pins::new(&args.bpffs);
    let netlink = Netlink::current()?;
    let underlay = netlink
        .link(&args.underlay_device)
        .await?
        .with_context(|| format!("--underlay-device: {} does not exist", args.underlay_device))?;
    let underlay_mtu = underlay.mtu.unwrap_or(1500);
    let mtu = args.mtu.unwrap_or(match routing {
        Routing::Vxlan => underlay_mtu - VXLAN_OVERHEAD,
        Routing::Native => underlay_mtu,
    });

    let node_ip = netlink
        .addresses(underlay.index)
        .await?
        .first()
        .map(|(ip, _)| *ip)
        .with_context(|| {
            format!(
                "--underlay-device: {} has no IPv4 address",
                args.underlay_device
            )
        })?;
    // Flags checked (and the supervisor's kubeconfig read) before the datapath is touched.
    let heartbeat = match args.heartbeat.registration(node_ip.to_string())? {
        Some((kubeconfig, reg)) => Some(Heartbeat::connect(&kubeconfig, reg).await?),
        None => None,
    };

    // The pod runtime comes up before the datapath is touched: a bad flag or a containerd that
    // cannot start stops the agent here.
    let containerd_config = args
        .containerd
        .config()
        .map_err(|e| anyhow::anyhow!(crate::pods::error_chain(&e)))?;
    // The cluster API feeds the datapath with or without a pod runtime; Pods run only where
    // there is one.
    let cluster = args
        .kubelet
        .wanted(true, args.heartbeat.host_name.as_deref())?;
    let kubelet = cluster
        .clone()
        .filter(|_| containerd_config.is_some())
        .map(|(_, node)| node);
    let cluster = match cluster {
        Some((source, node)) => {
            let client = crate::feed::client(&source).await?;
            let watch = crate::feed::ClusterWatch::start(&client);
            Some((client, source, watch, node))
        }
        None => None,
    };
    args.node_setup.check(containerd_config.is_some())?;
    // Cluster DNS answers from the cluster's Services: it needs the cluster API.
    anyhow::ensure!(
        args.dns.listen.is_none() || args.kubelet.cluster_kubeconfig.is_some(),
        "--dns-listen: needs --cluster-kubeconfig (the cluster whose Services it answers)"
    );
    let dns_config = args.dns.config()?;
    let pod_dns = dns_config
        .as_ref()
        .and_then(|c| c.pod_dns(std::net::IpAddr::V4(node_ip)));
    if let Some(config) = &dns_config
        && pod_dns.is_none()
    {
        tracing::warn!(listen = %config.listen,
            "--dns-listen: not port 53, so pods are not pointed at it (resolv.conf has no port)");
    }
    let containerd = match containerd_config {
        Some(config) => {
            args.node_setup.install_cni(
                args.pod_cidr,
                &args.data_dir,
                &args.containerd.cni_conf_dir,
                &args.containerd.cni_bin_dir,
            )?;
            let containerd = crate::pods::containerd::Containerd::start(config)
                .await
                .map_err(|e| anyhow::anyhow!(crate::pods::error_chain(&e)))
                .context("--containerd-dir: starting the host's containerd")?;
            args.node_setup.import_images(&containerd.socket())?;
            Some(containerd)
        }
        None => None,
    };

    // The CSI node plugin the pods' claims are staged and published through.
    let csi_node = args.csi.server(
        kubelet
            .as_deref()
            .or(args.heartbeat.host_name.as_deref())
            .unwrap_or_default(),
        &args.heartbeat.zone,
    )?;

    // The slim kubelet: the cluster's Pods bound to this node, through this host's containerd.
    let kubelet = match (kubelet, &containerd) {
        (Some(node), Some(containerd)) => {
            let client = cluster
                .as_ref()
                .map(|(client, _, _, _)| client.clone())
                .context("the cluster's client")?;
            let cri = crate::pods::cri::Cri::connect(&containerd.socket())
                .await
                .map_err(|e| anyhow::anyhow!(crate::pods::error_chain(&e)))?;
            let dir = args.containerd.dir.clone().unwrap_or_default();
            let runner = crate::pods::runner::PodRunner::new(
                cri,
                crate::pods::runner::RunnerConfig {
                    log_root: dir.join("pods"),
                    cgroup_parent: args.node_setup.pod_cgroup_parent(&node)?,
                    backoff: crate::pods::status::Backoff::default(),
                    host_ip: Some(node_ip.to_string()),
                    probe_netns: None,
                    dns: pod_dns,
                    volume_root: dir.join("kubelet-pods"),
                    csi: args.csi.runner(),
                },
            );
            Some((client, node, runner))
        }
        _ => None,
    };

    // Cluster DNS answers from the feed's reflectors.
    let dns = match (dns_config, &cluster) {
        (Some(config), Some((_, _, watch, _))) => Some(
            crate::dns::DnsServer::start(config, watch.services(), Some(watch.endpoint_slices()))
                .await?,
        ),
        _ => None,
    };

    // The kubelet's endpoint (container logs for the API server), beside the pods it reads.
    let kubelet_api = match (&kubelet, args.kubelet.kubelet_listen, &containerd) {
        (Some((_, node, _)), Some(addr), Some(containerd)) => Some(
            crate::kubelet_api::start(
                addr,
                args.kubelet
                    .cluster_kubeconfig
                    .as_deref()
                    .unwrap_or(Path::new("")),
                args.containerd.dir.clone().unwrap_or_default().join("pods"),
                vec![node.clone(), node_ip.to_string()],
                &containerd.socket(),
            )
            .await?,
        ),
        _ => None,
    };

    let mut installed = node::install(&pins, &args.map_sizes())?;
    let mut service_dp = ServiceDatapath::load(Some(&pins.services_dir()))?;
    fs::create_dir_all(&args.cgroup)
        .with_context(|| format!("--cgroup: creating {}", args.cgroup.display()))?;
    service_dp.attach(&args.cgroup)?;
    let router = slipway_cni::ipam::router_ip(host_block).with_context(|| {
        format!(
            "--host-block: {} is too small to spare a router address (at most /29)",
            host_block
        )
    })?;
    let mut config = NodeConfig {
        underlay_ifindex: underlay.index,
        vni: args.vni,
        router_ip4: u32::from_ne_bytes(router.octets()),
        ..NodeConfig::default()
    };
    if routing == Routing::Vxlan {
        let vxlan = netlink
            .ensure_vxlan_external(VXLAN_DEVICE, VXLAN_PORT)
            .await?;
        netlink.set_up(vxlan.index).await?;
        installed.attach_netdev(VXLAN_DEVICE)?;
        config.vxlan_ifindex = vxlan.index;
        // VXLAN to this host passes the underlay's program at once, for the device.
        config.underlay_ip4 = u32::from_ne_bytes(node_ip.octets());
        config.vxlan_port = u32::from(VXLAN_PORT);
    }
    installed.attach_netdev(&args.underlay_device)?;
    let mut maps = NodeMaps::open(&pins)?;
    maps.set_config(config)?;
    // Traffic the datapath leaves to the host stack (to the outside, to host ports) is routed.
    fs::write("/proc/sys/net/ipv4/ip_forward", "1").context("enabling net.ipv4.ip_forward")?;
    let vxlan_port = (routing == Routing::Vxlan).then_some(VXLAN_PORT);
    slipway_dataplane::nft::install_masquerade(args.pod_cidr, &args.underlay_device, vxlan_port)
        .context("installing the egress masquerade")?;

    let state = NodeState {
        pod_cidr: args.pod_cidr.to_string(),
        host_block: host_block.to_string(),
        routing,
        mtu,
        underlay_device: args.underlay_device.clone(),
        bpffs: args.bpffs.display().to_string(),
    };
    write_atomically(
        &NodeState::path(&args.data_dir),
        &serde_json::to_vec_pretty(&state)?,
    )?;
    info!(block = %host_block, ?routing, mtu, "node datapath ready");

    let restored = restore_hosts(&args.data_dir, &maps)?;
    if !restored.is_empty() {
        info!(hosts = restored.len(), "restored the host list");
    }
    let services: Vec<LocalService> = fs::read(desired_path(&args.data_dir, "services"))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default();
    let policy = PolicyNode::start(
        &pins,
        host_block,
        args.policy_entries as usize,
        args.data_dir.join("policy"),
    )
    .await?;
    let agent = Arc::new(Agent {
        args: args.clone(),
        pins,
        node_ip,
        host_block,
        hosts: Mutex::new(restored),
        health_ports: Default::default(),
        services: Mutex::new((services, service_dp)),
        policy: policy.clone(),
        feed: cluster
            .as_ref()
            .map(|(_, source, _, _)| Arc::new(crate::feed::Feed::new(source))),
    });
    // The routes follow the restored list, whatever moment the previous agent stopped at.
    sync_routes(&agent, &agent.hosts.lock().await)?;
    agent
        .health_ports
        .update(&agent.services.lock().await.0, host_block);

    if let Some(parent) = args.socket.parent() {
        fs::create_dir_all(parent)?;
    }
    let _ = fs::remove_file(&args.socket);
    let listener = tokio::net::UnixListener::bind(&args.socket)
        .with_context(|| format!("--socket: binding {}", args.socket.display()))?;
    // /metrics with the DNS server's counters after the datapath's.
    let dns_metrics = dns.as_ref().map(crate::dns::DnsServer::metrics);
    let metrics = move |state: axum::extract::State<Arc<Agent>>| {
        let dns = dns_metrics.clone();
        async move {
            let (code, text) = metrics(state).await;
            match dns {
                Some(dns) if code.is_success() => (
                    code,
                    text.trim_end().trim_end_matches("# EOF").to_owned() + &dns.render_metrics(),
                ),
                _ => (code, text),
            }
        }
    };
    let api = Router::new()
        .route("/v1/hosts", get(get_hosts).put(put_hosts))
        .route("/v1/services", get(get_services).put(put_services))
        .route("/v1/namespaces", get(get_namespaces).put(put_namespaces))
        .route("/v1/pods", get(get_pods).put(put_pods))
        .route("/v1/networkpolicies", get(get_policies).put(put_policies))
        .route("/v1/policy/explain", get(explain))
        .route("/v1/flows", get(flows))
        .route("/v1/status", get(status))
        .route("/metrics", get(metrics.clone()))
        .with_state(agent.clone());
    let mut tasks = tokio::task::JoinSet::new();
    if let Some(heartbeat) = heartbeat {
        tasks.spawn(heartbeat.run());
    }
    if let Some((client, node, runner)) = kubelet {
        tasks.spawn(async move {
            crate::pods::kubelet::run_until(client, node, runner, std::future::pending()).await;
            Ok(())
        });
    }
    if let (Some((_, _, watch, node)), Some(feed)) = (cluster, agent.feed.clone()) {
        tasks.spawn(crate::feed::run(agent.clone(), feed, watch, Some(node)));
    }
    if let Some(dns) = dns {
        tasks.spawn(async move { dns.run().await.map_err(anyhow::Error::from) });
    }
    if let Some(api) = kubelet_api {
        tasks.spawn(api.serve());
    }
    if let Some(csi) = csi_node {
        tasks.spawn(csi);
    }
    tasks.spawn(policy.pump_events());
    tasks.spawn(crate::tables::watch_fills(agent.pins.clone()));
    tasks.spawn(watch_counters(agent.pins.clone()));
    tasks.spawn(async move {
        axum::serve(listener, api)
            .await
            .map_err(anyhow::Error::from)
    });
    if let Some(addr) = args.metrics {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("--metrics: binding {addr}"))?;
        let router = Router::new()
            .route("/metrics", get(metrics))
            .with_state(agent.clone());
        tasks.spawn(async move {
            axum::serve(listener, router)
                .await
                .map_err(anyhow::Error::from)
        });
    }
    println!(
        "slipway agent: ready (api {}, block {}, {routing:?}, mtu {mtu})",
        args.socket.display(),
        host_block
    );
    let _ = std::io::stdout().flush();

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let outcome = tokio::select! {
        _ = term.recv() => {
            info!("SIGTERM: exiting, the datapath stays");
            Ok(())
        }
        _ = tokio::signal::ctrl_c() => {
            info!("SIGINT: exiting, the datapath stays");
            Ok(())
        }
        Some(done) = tasks.join_next() => done.map_err(anyhow::Error::from).and_then(|r| r),
    };
    // containerd goes with the agent; its containers stay with their shims, as on any node.
    if let Some(containerd) = containerd {
        containerd.stop().await;
    }
    outcome
}

pub(crate) fn write_atomically(path: &Path, body: &[u8]) -> std::io::Result<()> {
    write_atomically_with_mode(path, body, 0o644)
}

/// Writes `body` to `path` atomically (a crash leaves the old file or the new one), created
/// with permission bits `mode`.
pub(crate) fn write_atomically_with_mode(
    path: &Path,
    body: &[u8],
    mode: u32,
) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt as _;
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension("tmp");
    let _ = fs::remove_file(&tmp);
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)?;
    file.write_all(body)?;
    file.sync_all()?;
    fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}
