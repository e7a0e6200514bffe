//! `slipway agent`: the node agent. It installs the node datapath (programs and maps pinned on
//! bpffs, the VXLAN device, programs on the host devices), tells the CNI plugin about the node
//! (`<dataDir>/node.json`), takes the cluster's hosts from a local API on a Unix socket and keeps
//! the routes map in step with them, and exports the datapath counters as Prometheus metrics.
//!
//! Restarting it never interrupts traffic: maps, programs and links are pinned, a restart reuses
//! the maps and swaps programs into the pinned links atomically.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};
use ipnetwork::Ipv4Network;
use serde::{Deserialize, Serialize};
use slipway_api::{FieldError, FieldReason};
use slipway_dataplane::abi::policy::{MAX_CT, MAX_RULES};
use slipway_dataplane::abi::services::SvcEvent;
use slipway_dataplane::abi::{MAX_NAT_FLOWS, MAX_ROUTES, NodeConfig, Reason, RouteInfo, RouteMode};
use slipway_dataplane::link::Netlink;
use slipway_dataplane::node::{self, MapSizes, NodeMaps, Pins};
use slipway_dataplane::services::{Backend, ServiceDatapath, ServiceKey};
use tokio::sync::Mutex;
use tracing::{info, warn};

use crate::plugin::{NodeState, VXLAN_OVERHEAD};
use crate::policy::node::{FlowFilter, List, ListKind, PolicyNode};
use crate::spec::Routing;

/// The VXLAN device the agent creates.
pub const VXLAN_DEVICE: &str = "slipway_vxlan";
/// IANA's VXLAN port.
pub const VXLAN_PORT: u16 = 4789;

/// How the agent is started.
#[derive(Debug, Clone, clap::Args)]
pub struct AgentArgs {
    /// The cluster's pod CIDR.
    #[arg(long = "pod-cidr")]
    pub pod_cidr: Ipv4Network,
    /// This host's block of the pod CIDR.
    #[arg(long = "host-block")]
    pub host_block: Ipv4Network,
    /// How pods on other hosts are reached.
    #[arg(long, value_enum, default_value = "vxlan")]
    pub routing: RoutingArg,
    /// The device that connects the hosts.
    #[arg(long, default_value = "eth0")]
    pub underlay_device: String,
    /// Pod MTU; the underlay's MTU minus the encapsulation when not set.
    #[arg(long)]
    pub mtu: Option<u32>,
    /// VXLAN network identifier of the cluster.
    #[arg(long, default_value_t = 1)]
    pub vni: u32,
    /// bpffs directory of the node datapath.
    #[arg(long, default_value = node::DEFAULT_BPFFS_DIR)]
    pub bpffs: PathBuf,
    /// Where node state and IPAM live.
    #[arg(long, default_value = crate::plugin::DEFAULT_DATA_DIR)]
    pub data_dir: PathBuf,
    /// The local API's Unix socket.
    #[arg(long, default_value = "/run/slipway/agent.sock")]
    pub socket: PathBuf,
    /// Where to serve Prometheus metrics (`/metrics`), e.g. 127.0.0.1:9962.
    #[arg(long)]
    pub metrics: Option<SocketAddr>,
    /// The cgroup v2 directory whose processes (pods and host daemons) get socket-level service
    /// translation; created if missing. Never the cgroup v2 root.
    #[arg(long, default_value = "/sys/fs/cgroup/unified/slipway")]
    pub cgroup: PathBuf,
    /// Policy rule map entries this node may use (the map holds two generations of this). An
    /// endpoint whose rules do not fit fails closed.
    #[arg(long = "policy-entries", default_value_t = 65536,
          value_parser = clap::value_parser!(u32).range(1..=i64::from(MAX_RULES / 2)))]
    pub policy_entries: u32,
    /// Connections NetworkPolicy tracks (the `policy_ct` table). When it is full, each new
    /// connection evicts the least recently used one (logged, and counted in
    /// `slipway_datapath_table_full_inserts_total`).
    #[arg(long = "ct-entries", default_value_t = MAX_CT,
          value_parser = clap::value_parser!(u32).range(64..=crate::tables::TABLE_MAX))]
    pub ct_entries: u32,
    /// Flows translated per packet (NodePorts; ClusterIPs of pods outside --cgroup) and pods'
    /// flows through the host stack (hostPorts): the capacity of each of those tables.
    #[arg(long = "nat-entries", default_value_t = MAX_NAT_FLOWS,
          value_parser = clap::value_parser!(u32).range(64..=crate::tables::TABLE_MAX))]
    pub nat_entries: u32,
    /// Pod blocks of other hosts the routes table holds.
    #[arg(long = "route-entries", default_value_t = MAX_ROUTES,
          value_parser = clap::value_parser!(u32).range(1..=crate::tables::TABLE_MAX))]
    pub route_entries: u32,
}

impl AgentArgs {
    /// The table capacities the flags ask for.
    pub fn map_sizes(&self) -> MapSizes {
        MapSizes {
            conntrack: self.ct_entries,
            nat: self.nat_entries,
            routes: self.route_entries,
        }
    }
}

/// The NodePort range, as Kubernetes defaults it.
pub const NODE_PORTS: std::ops::RangeInclusive<u16> = 30000..=32767;

/// A service as the local API takes it: a ClusterIP with ports, optionally a NodePort each, and
/// the pod addresses that back it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Service {
    pub name: String,
    #[serde(rename = "clusterIP")]
    pub cluster_ip: Ipv4Addr,
    pub ports: Vec<ServicePort>,
    #[serde(default)]
    pub endpoints: Vec<Ipv4Addr>,
}

/// One port of a [`Service`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ServicePort {
    pub port: u16,
    #[serde(default = "tcp")]
    pub protocol: String,
    pub target_port: u16,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_port: Option<u16>,
}

fn tcp() -> String {
    "TCP".to_owned()
}

/// Checks a service list: every bad field named, with its index.
pub fn validate_services(services: &[Service], pod_cidr: Ipv4Network) -> Result<(), Invalid> {
    let mut errors = Vec::new();
    let mut names = BTreeMap::new();
    let mut keys = BTreeMap::new();
    let mut node_ports = BTreeMap::new();
    for (i, svc) in services.iter().enumerate() {
        if svc.name.is_empty() {
            errors.push(FieldError::required(format!("services[{i}].name")));
        } else if let Some(j) = names.insert(svc.name.clone(), i) {
            errors.push(FieldError::duplicate(
                format!("services[{i}].name"),
                format!("{:?} is also services[{j}]", svc.name),
            ));
        }
        if pod_cidr.contains(svc.cluster_ip) || svc.cluster_ip.is_unspecified() {
            errors.push(FieldError::invalid(
                format!("services[{i}].clusterIP"),
                svc.cluster_ip,
                format!("must be outside the pod CIDR {pod_cidr} and not 0.0.0.0"),
            ));
        }
        if svc.ports.is_empty() {
            errors.push(FieldError::new(
                format!("services[{i}].ports"),
                FieldReason::Required,
                "at least one port",
            ));
        }
        for (k, port) in svc.ports.iter().enumerate() {
            let at = format!("services[{i}].ports[{k}]");
            if port.port == 0 {
                errors.push(FieldError::invalid(
                    format!("{at}.port"),
                    0,
                    "must be 1-65535",
                ));
            }
            if port.target_port == 0 {
                errors.push(FieldError::invalid(
                    format!("{at}.targetPort"),
                    0,
                    "must be 1-65535",
                ));
            }
            if !matches!(port.protocol.as_str(), "TCP" | "UDP") {
                errors.push(FieldError::not_supported(
                    format!("{at}.protocol"),
                    &port.protocol,
                    &["TCP", "UDP"],
                ));
            }
            if let Some(previous) = keys.insert(
                (svc.cluster_ip, port.port, port.protocol.clone()),
                at.clone(),
            ) {
                errors.push(FieldError::duplicate(
                    at.clone(),
                    format!(
                        "{}:{}/{} is also {previous}",
                        svc.cluster_ip, port.port, port.protocol
                    ),
                ));
            }
            if let Some(node_port) = port.node_port {
                if !NODE_PORTS.contains(&node_port) {
                    errors.push(FieldError::invalid(
                        format!("{at}.nodePort"),
                        node_port,
                        format!("must be in {}-{}", NODE_PORTS.start(), NODE_PORTS.end()),
                    ));
                }
                if let Some(previous) =
                    node_ports.insert((node_port, port.protocol.clone()), at.clone())
                {
                    errors.push(FieldError::duplicate(
                        format!("{at}.nodePort"),
                        format!("{node_port}/{} is also {previous}", port.protocol),
                    ));
                }
            }
        }
        for (k, ep) in svc.endpoints.iter().enumerate() {
            if !pod_cidr.contains(*ep) {
                errors.push(FieldError::invalid(
                    format!("services[{i}].endpoints[{k}]"),
                    ep,
                    format!("must be inside the pod CIDR {pod_cidr}"),
                ));
            }
        }
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(Invalid { errors })
    }
}

/// The datapath entries a service list asks for on a node with address `node_ip`: each port's
/// ClusterIP key and, with a NodePort, the node's key, both to the endpoints at the target port.
pub fn service_entries(
    services: &[Service],
    node_ip: Ipv4Addr,
) -> BTreeMap<ServiceKey, Vec<Backend>> {
    let mut entries = BTreeMap::new();
    for svc in services {
        for port in &svc.ports {
            let backends: Vec<Backend> = svc
                .endpoints
                .iter()
                .map(|ip| Backend::new(*ip, port.target_port))
                .collect();
            let key = |ip, p| {
                if port.protocol == "UDP" {
                    ServiceKey::udp(ip, p)
                } else {
                    ServiceKey::tcp(ip, p)
                }
            };
            entries.insert(key(svc.cluster_ip, port.port), backends.clone());
            if let Some(node_port) = port.node_port {
                entries.insert(key(node_ip, node_port), backends);
            }
        }
    }
    entries
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum RoutingArg {
    Vxlan,
    Native,
}

impl From<RoutingArg> for Routing {
    fn from(arg: RoutingArg) -> Self {
        match arg {
            RoutingArg::Vxlan => Routing::Vxlan,
            RoutingArg::Native => Routing::Native,
        }
    }
}

/// A host of the cluster, as the local API takes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Host {
    pub name: String,
    /// Its address on the underlay.
    pub address: Ipv4Addr,
    /// Its block of the pod CIDR.
    pub pod_block: Ipv4Network,
}

/// Why a desired state was refused: every bad field. On the wire each is one line,
/// `field: message` (`{"errors": ["hosts[1].name: Required value"]}`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Invalid {
    #[serde(serialize_with = "as_lines")]
    pub errors: Vec<FieldError>,
}

fn as_lines<S: serde::Serializer>(errors: &[FieldError], s: S) -> Result<S::Ok, S::Error> {
    s.collect_seq(errors.iter().map(ToString::to_string))
}

/// Checks a host list against the cluster: every field named on failure.
pub fn validate_hosts(hosts: &[Host], pod_cidr: Ipv4Network) -> Result<(), Invalid> {
    let mut errors = Vec::new();
    let mut names = BTreeMap::new();
    for (i, host) in hosts.iter().enumerate() {
        if host.name.is_empty() {
            errors.push(FieldError::required(format!("hosts[{i}].name")));
        }
        if let Some(j) = names.insert(host.name.clone(), i) {
            errors.push(FieldError::duplicate(
                format!("hosts[{i}].name"),
                format!("{:?} is also hosts[{j}]", host.name),
            ));
        }
        if !(pod_cidr.contains(host.pod_block.network())
            && pod_cidr.prefix() <= host.pod_block.prefix())
        {
            errors.push(FieldError::invalid(
                format!("hosts[{i}].podBlock"),
                host.pod_block,
                format!("must be inside the pod CIDR {pod_cidr}"),
            ));
        }
        for (j, other) in hosts.iter().enumerate().take(i) {
            if other.pod_block.overlaps(host.pod_block) {
                errors.push(FieldError::invalid(
                    format!("hosts[{i}].podBlock"),
                    host.pod_block,
                    format!("overlaps hosts[{j}].podBlock {}", other.pod_block),
                ));
            }
        }
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(Invalid { errors })
    }
}

struct Agent {
    args: AgentArgs,
    pins: Pins,
    node_ip: Ipv4Addr,
    hosts: Mutex<Vec<Host>>,
    services: Mutex<(Vec<Service>, ServiceDatapath)>,
    policy: Arc<PolicyNode>,
}

/// Desired state the agent was given, kept beside the node state so a restart knows it.
fn desired_path(data_dir: &Path, what: &str) -> PathBuf {
    data_dir.join(format!("{what}.json"))
}

/// Runs the agent until SIGTERM/SIGINT. The datapath stays in place when it exits.
pub async fn run(args: AgentArgs) -> anyhow::Result<()> {
    use anyhow::Context as _;
    let routing: Routing = args.routing.into();
    anyhow::ensure!(
        args.pod_cidr.contains(args.host_block.network())
            && args.pod_cidr.prefix() <= args.host_block.prefix(),
        "--host-block: {} is not inside --pod-cidr {}",
        args.host_block,
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

    let mut installed = node::install(&pins, &args.map_sizes())?;
    let mut service_dp = ServiceDatapath::load(Some(&pins.services_dir()))?;
    fs::create_dir_all(&args.cgroup)
        .with_context(|| format!("--cgroup: creating {}", args.cgroup.display()))?;
    service_dp.attach(&args.cgroup)?;
    let router = crate::ipam::router_ip(args.host_block).with_context(|| {
        format!(
            "--host-block: {} is too small to spare a router address (at most /29)",
            args.host_block
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
    }
    installed.attach_netdev(&args.underlay_device)?;
    let mut maps = NodeMaps::open(&pins)?;
    maps.set_config(config)?;
    // Traffic the datapath leaves to the host stack (to the outside, to host ports) is routed.
    fs::write("/proc/sys/net/ipv4/ip_forward", "1").context("enabling net.ipv4.ip_forward")?;
    install_masquerade(args.pod_cidr, &args.underlay_device)?;

    let state = NodeState {
        pod_cidr: args.pod_cidr.to_string(),
        host_block: args.host_block.to_string(),
        routing,
        mtu,
        underlay_device: args.underlay_device.clone(),
        bpffs: args.bpffs.display().to_string(),
    };
    write_atomically(
        &NodeState::path(&args.data_dir),
        &serde_json::to_vec_pretty(&state)?,
    )?;
    info!(block = %args.host_block, ?routing, mtu, "node datapath ready");

    let restored = restore_hosts(&args.data_dir, &maps)?;
    if !restored.is_empty() {
        info!(hosts = restored.len(), "restored the host list");
    }
    let services: Vec<Service> = fs::read(desired_path(&args.data_dir, "services"))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default();
    let policy = PolicyNode::start(
        &pins,
        args.host_block,
        args.policy_entries as usize,
        args.data_dir.join("policy"),
    )
    .await?;
    let agent = Arc::new(Agent {
        args: args.clone(),
        pins,
        node_ip,
        hosts: Mutex::new(restored),
        services: Mutex::new((services, service_dp)),
        policy: policy.clone(),
    });
    // The routes follow the restored list, whatever moment the previous agent stopped at.
    sync_routes(&agent, &agent.hosts.lock().await)?;

    if let Some(parent) = args.socket.parent() {
        fs::create_dir_all(parent)?;
    }
    let _ = fs::remove_file(&args.socket);
    let listener = tokio::net::UnixListener::bind(&args.socket)
        .with_context(|| format!("--socket: binding {}", args.socket.display()))?;
    let api = Router::new()
        .route("/v1/hosts", get(get_hosts).put(put_hosts))
        .route("/v1/services", get(get_services).put(put_services))
        .route("/v1/namespaces", get(get_namespaces).put(put_namespaces))
        .route("/v1/pods", get(get_pods).put(put_pods))
        .route("/v1/networkpolicies", get(get_policies).put(put_policies))
        .route("/v1/policy/explain", get(explain))
        .route("/v1/flows", get(flows))
        .route("/v1/status", get(status))
        .route("/metrics", get(metrics))
        .with_state(agent.clone());
    let mut tasks = tokio::task::JoinSet::new();
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
        args.host_block
    );
    let _ = std::io::stdout().flush();

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = term.recv() => info!("SIGTERM: exiting, the datapath stays"),
        _ = tokio::signal::ctrl_c() => info!("SIGINT: exiting, the datapath stays"),
        Some(done) = tasks.join_next() => done??,
    }
    Ok(())
}

async fn get_services(State(agent): State<Arc<Agent>>) -> Json<Vec<Service>> {
    Json(agent.services.lock().await.0.clone())
}

/// Replaces the service list: it is written to disk before the datapath changes, and the reply
/// is sent after both, so a 2xx means a restarted agent knows the list too.
async fn put_services(
    State(agent): State<Arc<Agent>>,
    body: axum::body::Bytes,
) -> (StatusCode, Json<serde_json::Value>) {
    let services: Vec<Service> = match serde_json::from_slice(&body) {
        Ok(services) => services,
        Err(e) => {
            return (
                StatusCode::BAD_REQUEST,
                Json(serde_json::json!({ "errors": [format!("body: {e}")] })),
            );
        }
    };
    if let Err(invalid) = validate_services(&services, agent.args.pod_cidr) {
        return (
            StatusCode::UNPROCESSABLE_ENTITY,
            Json(serde_json::json!(invalid)),
        );
    }
    let mut current = agent.services.lock().await;
    let failed = |e: String| {
        warn!(error = %e, "applying services failed");
        (
            StatusCode::INTERNAL_SERVER_ERROR,
            Json(serde_json::json!({ "errors": [e] })),
        )
    };
    let body = match serde_json::to_vec_pretty(&services) {
        Ok(body) => body,
        Err(e) => return failed(e.to_string()),
    };
    if let Err(e) = write_atomically(&desired_path(&agent.args.data_dir, "services"), &body) {
        return failed(e.to_string());
    }
    let wanted = service_entries(&services, agent.node_ip);
    let datapath = &mut current.1;
    for (key, backends) in &wanted {
        if let Err(e) = datapath.upsert_service(*key, backends) {
            return failed(e.to_string());
        }
    }
    match datapath.services() {
        Ok(existing) => {
            for key in existing.into_keys().filter(|k| !wanted.contains_key(k)) {
                if let Err(e) = datapath.remove_service(key) {
                    return failed(e.to_string());
                }
            }
        }
        Err(e) => return failed(e.to_string()),
    }
    current.0 = services;
    (
        StatusCode::OK,
        Json(serde_json::json!({ "services": current.0.len(), "entries": wanted.len() })),
    )
}

type Reply = (StatusCode, Json<serde_json::Value>);

fn errors(status: u16, errors: Vec<String>) -> Reply {
    (
        StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        Json(serde_json::json!({ "errors": errors })),
    )
}

/// Replaces one list of the policy state; answers after the datapath enforces the result.
async fn put_policy_state(agent: &Agent, kind: ListKind, body: &[u8]) -> Reply {
    let list = match List::parse(kind, body) {
        Ok(list) => list,
        Err(e) => return errors(400, e),
    };
    match agent.policy.replace(list, Some(body)).await {
        // Enforced, but endpoints whose rules do not fit fail closed: the reply says which.
        Ok(generation) => {
            let status = agent.policy.status();
            (
                StatusCode::OK,
                Json(serde_json::json!({
                    "generation": generation,
                    "failClosed": status["failClosed"],
                    "failClosedErrors": status["errors"],
                })),
            )
        }
        Err(e) => {
            if e.status >= 500 {
                warn!(errors = ?e.errors, "installing policy state failed");
            }
            errors(e.status, e.errors)
        }
    }
}

async fn get_namespaces(State(agent): State<Arc<Agent>>) -> Json<serde_json::Value> {
    Json(serde_json::json!(agent.policy.desired().await.namespaces))
}

async fn put_namespaces(State(agent): State<Arc<Agent>>, body: axum::body::Bytes) -> Reply {
    put_policy_state(&agent, ListKind::Namespaces, &body).await
}

async fn get_pods(State(agent): State<Arc<Agent>>) -> Json<serde_json::Value> {
    Json(serde_json::json!(agent.policy.desired().await.pods))
}

async fn put_pods(State(agent): State<Arc<Agent>>, body: axum::body::Bytes) -> Reply {
    put_policy_state(&agent, ListKind::Pods, &body).await
}

async fn get_policies(State(agent): State<Arc<Agent>>) -> Json<serde_json::Value> {
    Json(serde_json::json!(agent.policy.desired().await.policies))
}

async fn put_policies(State(agent): State<Arc<Agent>>, body: axum::body::Bytes) -> Reply {
    put_policy_state(&agent, ListKind::Policies, &body).await
}

#[derive(Debug, Deserialize)]
struct ExplainQuery {
    src: String,
    dst: String,
    port: u16,
    #[serde(default = "tcp")]
    protocol: String,
}

async fn explain(
    State(agent): State<Arc<Agent>>,
    query: Result<axum::extract::Query<ExplainQuery>, axum::extract::rejection::QueryRejection>,
) -> Reply {
    let query = match query {
        Ok(q) => q.0,
        Err(e) => {
            return errors(
                400,
                vec![format!("query: {e} (want src, dst, port, protocol)")],
            );
        }
    };
    match agent.policy.explain(
        &query.src,
        &query.dst,
        query.port,
        &query.protocol.to_uppercase(),
    ) {
        Ok(json) => (StatusCode::OK, Json(json)),
        Err(e) => errors(e.status, e.errors),
    }
}

/// The query of `GET /v1/flows`: a [`FlowFilter`] and `follow` (not flattened: query strings
/// carry no types through serde's flatten).
#[derive(Debug, Deserialize)]
struct FlowQuery {
    namespace: Option<String>,
    pod: Option<String>,
    verdict: Option<String>,
    port: Option<u16>,
    #[serde(default)]
    follow: bool,
}

/// Verdict events as JSON lines: the recent ones, then (with `follow`) the ones to come.
async fn flows(
    State(agent): State<Arc<Agent>>,
    query: Result<axum::extract::Query<FlowQuery>, axum::extract::rejection::QueryRejection>,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    let query = match query {
        Ok(q) => q.0,
        Err(e) => return errors(400, vec![format!("query: {e}")]).into_response(),
    };
    let filter = FlowFilter {
        namespace: query.namespace,
        pod: query.pod,
        verdict: query.verdict,
        port: query.port,
    };
    let (recent, receiver) = agent.policy.flows(&filter);
    let line = |flow: &crate::policy::node::Flow| {
        let mut line = serde_json::to_string(flow).unwrap_or_default();
        line.push('\n');
        line
    };
    let head: String = recent.iter().map(|f| line(f)).collect();
    let head = futures_util::stream::once(async move { Ok::<_, std::io::Error>(head) });
    let body = if query.follow {
        let live = futures_util::stream::unfold(receiver, move |mut rx| {
            let filter = filter.clone();
            async move {
                loop {
                    match rx.recv().await {
                        Ok(flow) if filter.matches(&flow) => {
                            return Some((Ok(line(&flow)), rx));
                        }
                        Ok(_) => continue,
                        Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                            warn!(missed = n, "a flows follower lagged");
                            continue;
                        }
                        Err(tokio::sync::broadcast::error::RecvError::Closed) => return None,
                    }
                }
            }
        });
        axum::body::Body::from_stream(futures_util::StreamExt::chain(head, live))
    } else {
        axum::body::Body::from_stream(head)
    };
    (
        [(axum::http::header::CONTENT_TYPE, "application/x-ndjson")],
        body,
    )
        .into_response()
}

async fn get_hosts(State(agent): State<Arc<Agent>>) -> Json<Vec<Host>> {
    Json(agent.hosts.lock().await.clone())
}

/// Replaces the host list: routes for new and changed hosts are written before stale ones are
/// removed, so a block never goes unrouted while it moves.
async fn put_hosts(
    State(agent): State<Arc<Agent>>,
    body: axum::body::Bytes,
) -> (StatusCode, Json<serde_json::Value>) {
    let hosts: Vec<Host> = match serde_json::from_slice(&body) {
        Ok(hosts) => hosts,
        Err(e) => {
            return (
                StatusCode::BAD_REQUEST,
                Json(serde_json::json!({ "errors": [format!("body: {e}")] })),
            );
        }
    };
    if let Err(invalid) = validate_hosts(&hosts, agent.args.pod_cidr) {
        return (
            StatusCode::UNPROCESSABLE_ENTITY,
            Json(serde_json::json!(invalid)),
        );
    }
    let mut current = agent.hosts.lock().await;
    let persisted = serde_json::to_vec_pretty(&hosts)
        .map_err(std::io::Error::other)
        .and_then(|body| write_atomically(&desired_path(&agent.args.data_dir, "hosts"), &body));
    if let Err(e) = persisted {
        warn!(error = %e, "persisting the host list failed");
        return (
            StatusCode::INTERNAL_SERVER_ERROR,
            Json(serde_json::json!({ "errors": [format!("persisting the host list: {e}")] })),
        );
    }
    match sync_routes(&agent, &hosts) {
        Ok(()) => {
            *current = hosts;
            (
                StatusCode::OK,
                Json(serde_json::json!({ "hosts": current.len() })),
            )
        }
        Err(e) => {
            let mut message = e.to_string();
            if matches!(e, slipway_dataplane::DataplaneError::TableFull { .. }) {
                message.push_str(&format!(
                    ": the hosts need {} routes, raise {}",
                    hosts.len().saturating_sub(1),
                    crate::tables::sizing_flag("routes")
                ));
            }
            warn!(error = %message, "syncing routes failed");
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                Json(serde_json::json!({ "errors": [message] })),
            )
        }
    }
}

/// The host list a previous agent was given: the one it persisted, or (from versions that did
/// not persist it) one host per route of the pinned map, named by its address.
fn restore_hosts(data_dir: &Path, maps: &NodeMaps) -> anyhow::Result<Vec<Host>> {
    use anyhow::Context as _;
    let path = desired_path(data_dir, "hosts");
    match fs::read(&path) {
        Ok(body) => {
            return serde_json::from_slice(&body)
                .with_context(|| format!("{}: not a host list", path.display()));
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    }
    Ok(maps
        .routes()?
        .into_iter()
        .filter_map(|((block, prefix), route)| {
            Some(Host {
                name: route.host().to_string(),
                address: route.host(),
                pod_block: Ipv4Network::new(block, prefix).ok()?,
            })
        })
        .collect())
}

fn sync_routes(agent: &Agent, hosts: &[Host]) -> Result<(), slipway_dataplane::DataplaneError> {
    let mode = match Routing::from(agent.args.routing) {
        Routing::Vxlan => RouteMode::Vxlan,
        Routing::Native => RouteMode::Native,
    };
    let mut maps = NodeMaps::open(&agent.pins)?;
    let mut wanted = BTreeMap::new();
    for host in hosts
        .iter()
        .filter(|h| h.pod_block != agent.args.host_block)
    {
        wanted.insert(
            (host.pod_block.network(), host.pod_block.prefix()),
            RouteInfo::new(host.address, mode),
        );
    }
    // A list that cannot fit is refused before anything is written.
    let capacity = maps.route_capacity()?;
    if wanted.len() > capacity as usize {
        return Err(slipway_dataplane::DataplaneError::TableFull {
            map: "routes",
            capacity,
        });
    }
    for ((block, prefix), info) in &wanted {
        maps.upsert_route(*block, *prefix, *info)?;
    }
    for key in maps.routes()?.into_keys() {
        if !wanted.contains_key(&key) {
            maps.remove_route(key.0, key.1)?;
        }
    }
    Ok(())
}

async fn status(State(agent): State<Arc<Agent>>) -> (StatusCode, Json<serde_json::Value>) {
    let maps = match NodeMaps::open(&agent.pins) {
        Ok(maps) => maps,
        Err(e) => {
            return (
                StatusCode::SERVICE_UNAVAILABLE,
                Json(serde_json::json!({ "ready": false, "error": e.to_string() })),
            );
        }
    };
    let endpoints = maps.endpoints().map(|e| e.len()).unwrap_or_default();
    let routes = maps.routes().map(|r| r.len()).unwrap_or_default();
    (
        StatusCode::OK,
        Json(serde_json::json!({
            "ready": agent.pins.is_ready(),
            "hostBlock": agent.args.host_block.to_string(),
            "endpoints": endpoints,
            "routes": routes,
            "hosts": agent.hosts.lock().await.len(),
            "policy": agent.policy.status(),
        })),
    )
}

/// Prometheus text: the datapath's per-CPU counters summed, by device, direction and reason.
async fn metrics(State(agent): State<Arc<Agent>>) -> (StatusCode, String) {
    let services = agent.services.lock().await.1.counters();
    let services = match services {
        Ok(counters) => counters,
        Err(e) => {
            return (
                StatusCode::SERVICE_UNAVAILABLE,
                format!("# service datapath unavailable: {e}\n"),
            );
        }
    };
    match render_metrics(&agent.pins, &services) {
        // Both registries end with "# EOF": keep only the last.
        Ok(text) => (
            StatusCode::OK,
            text.trim_end().trim_end_matches("# EOF").to_owned() + &agent.policy.render_metrics(),
        ),
        Err(e) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("# datapath unavailable: {e}\n"),
        ),
    }
}

/// Renders the counters map, the tables' fill and the service programs' events (`services`:
/// which path service flows took) in the Prometheus text format with prometheus-client.
pub fn render_metrics(
    pins: &Pins,
    services: &BTreeMap<SvcEvent, u64>,
) -> Result<String, slipway_dataplane::DataplaneError> {
    use prometheus_client::encoding::EncodeLabelSet;
    use prometheus_client::metrics::counter::Counter;
    use prometheus_client::metrics::family::Family;
    use prometheus_client::metrics::gauge::Gauge;
    use prometheus_client::registry::Registry;

    #[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
    struct Labels {
        verdict: &'static str,
        reason: &'static str,
        ifindex_in: u32,
        ifindex_out: u32,
    }
    let maps = NodeMaps::open(pins)?;
    let counters = maps.counters()?;
    let fill = (counters.len(), maps.counters_capacity()? as usize);
    let packets = Family::<Labels, Counter>::default();
    let bytes = Family::<Labels, Counter>::default();
    for (key, value) in counters {
        let Some(reason) = Reason::from_raw(key.reason) else {
            continue;
        };
        let verdict = if reason.is_drop() {
            "dropped"
        } else if matches!(
            reason,
            Reason::PassNotIpv4 | Reason::PassNoEndpoint | Reason::PassStackFlow
        ) {
            "passed"
        } else {
            "forwarded"
        };
        let labels = Labels {
            verdict,
            reason: reason.as_str(),
            ifindex_in: key.ifindex_in,
            ifindex_out: key.ifindex_out,
        };
        packets.get_or_create(&labels).inc_by(value.packets);
        bytes.get_or_create(&labels).inc_by(value.bytes);
    }
    let (entries, capacity) = fill;
    let mut registry = Registry::with_prefix("slipway_datapath");
    registry.register("packets", "Packets the node datapath handled", packets);
    registry.register("bytes", "Bytes the node datapath handled", bytes);
    crate::tables::register_metrics(&mut registry, &maps.fills()?, services);
    for (name, help, value) in [
        ("counter_entries", "Entries of the counters map", entries),
        ("counter_capacity", "Capacity of the counters map", capacity),
        (
            "counters_full",
            "1 when the counters map is full: new series are not counted",
            usize::from(entries >= capacity),
        ),
    ] {
        let gauge = Gauge::<i64>::default();
        gauge.set(i64::try_from(value).unwrap_or(i64::MAX));
        registry.register(name, help, gauge);
    }
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).map_err(|e| {
        slipway_dataplane::DataplaneError::Parse {
            command: "encode metrics".into(),
            detail: e.to_string(),
        }
    })?;
    Ok(text)
}

/// How often the agent looks whether the counters map is full.
const COUNTERS_CHECK: std::time::Duration = std::time::Duration::from_secs(5);

/// Logs when the counters map fills (the datapath then stops counting new series, as
/// `slipway_datapath_counters_full` also says) and when it has room again: once per change.
async fn watch_counters(pins: Pins) -> anyhow::Result<()> {
    let mut full = false;
    let mut failing = false;
    let mut tick = tokio::time::interval(COUNTERS_CHECK);
    loop {
        tick.tick().await;
        let fill = NodeMaps::open(&pins)
            .and_then(|maps| Ok((maps.counters()?.len(), maps.counters_capacity()? as usize)));
        let (entries, capacity) = match fill {
            Ok(fill) => {
                failing = false;
                fill
            }
            Err(error) => {
                // Once per failure, not every tick.
                if !failing {
                    warn!(%error, "reading the counters map failed");
                }
                failing = true;
                continue;
            }
        };
        match (full, entries >= capacity) {
            (false, true) => warn!(
                entries,
                capacity,
                "the counters map is full: packets of new (device, reason) series are not \
                 counted until pods are deleted or GC runs"
            ),
            (true, false) => info!(entries, capacity, "the counters map has room again"),
            _ => {}
        }
        full = entries >= capacity;
    }
}

/// The nftables table holding the egress masquerade rule; replaced whole on every start.
pub const NFT_TABLE: &str = "slipway";

/// Masquerades pod traffic that leaves the pod CIDR through the underlay device, so the outside
/// sees the host's address and replies find their way back.
fn install_masquerade(pod_cidr: Ipv4Network, underlay: &str) -> anyhow::Result<()> {
    use std::process::{Command, Stdio};
    let ruleset = format!(
        "table ip {NFT_TABLE}\ndelete table ip {NFT_TABLE}\n\
         table ip {NFT_TABLE} {{\n\
           chain postrouting {{\n\
             type nat hook postrouting priority srcnat; policy accept;\n\
             ip saddr {pod_cidr} ip daddr != {pod_cidr} oifname \"{underlay}\" masquerade\n\
           }}\n\
         }}\n"
    );
    let mut nft = Command::new("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| anyhow::anyhow!("running nft (Debian package nftables): {e}"))?;
    if let Some(mut stdin) = nft.stdin.take() {
        stdin.write_all(ruleset.as_bytes())?;
    }
    let output = nft.wait_with_output()?;
    anyhow::ensure!(
        output.status.success(),
        "installing the masquerade rule: {}",
        String::from_utf8_lossy(&output.stderr).trim()
    );
    Ok(())
}

pub(crate) fn write_atomically(path: &Path, body: &[u8]) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension("tmp");
    let mut file = fs::File::create(&tmp)?;
    file.write_all(body)?;
    file.sync_all()?;
    fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(name: &str, block: &str) -> Host {
        Host {
            name: name.into(),
            address: Ipv4Addr::new(10, 99, 0, 1),
            pod_block: block.parse().expect("cidr"),
        }
    }

    #[test]
    fn host_lists_are_validated_field_by_field() {
        let cidr: Ipv4Network = "10.244.0.0/16".parse().expect("cidr");
        assert!(
            validate_hosts(
                &[host("a", "10.244.1.0/24"), host("b", "10.244.2.0/24")],
                cidr
            )
            .is_ok()
        );
        let invalid = validate_hosts(
            &[
                host("a", "10.244.1.0/24"),
                host("a", "10.244.1.128/25"),
                host("", "10.245.0.0/24"),
            ],
            cidr,
        )
        .expect_err("invalid");
        let text: Vec<String> = invalid.errors.iter().map(ToString::to_string).collect();
        let text = text.join("\n");
        assert!(text.contains("hosts[1].name"), "{text}");
        assert!(
            text.contains(
                "hosts[1].podBlock: Invalid value: 10.244.1.128/25: overlaps hosts[0].podBlock"
            ),
            "{text}"
        );
        assert!(
            text.contains("hosts[2].podBlock: Invalid value: 10.245.0.0/24: must be inside"),
            "{text}"
        );
        assert!(text.contains("hosts[2].name: Required value"), "{text}");
        // On the wire each error stays one line.
        let wire = serde_json::to_value(&invalid).expect("serializes");
        assert_eq!(wire["errors"][2], "hosts[2].name: Required value", "{wire}");
    }
}
