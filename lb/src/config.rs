//! What the load balancer is told: the daemon's configuration (interface, VIP pools) and the
//! services it balances (the fields of a Kubernetes `Service` of type LoadBalancer that an L4
//! LB needs, plus its backends). Serde types with `deny_unknown_fields`; `validate()` reports
//! every bad field at once. Pools, VIPs, backends and source ranges may be IPv4 or IPv6; a
//! service is of one family (no dual-stack VIP pairs), and everything in it must match.

use std::collections::BTreeSet;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::PathBuf;

use ipnetwork::IpNetwork;
use serde::{Deserialize, Serialize};
use slipway_api::{FieldError, FieldReason};
/// The `maps` section: capacities of the LB maps, as the datapath defines them.
pub use slipway_dataplane::lb::MapSizes;

use crate::LbError;

/// Collects field errors.
#[derive(Debug, Default)]
struct Problems(Vec<FieldError>);

impl Problems {
    fn add(&mut self, field: impl Into<String>, problem: impl Into<String>) {
        self.0
            .push(FieldError::new(field, FieldReason::Invalid, problem));
    }

    fn finish(self, what: &'static str) -> Result<(), LbError> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(LbError::Invalid {
                what,
                errors: self.0,
            })
        }
    }
}

/// The daemon's configuration (`slipway lb serve --config`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct LbConfig {
    /// The LB interface: the TC program attaches at its ingress, VIPs are announced on it.
    pub interface: String,
    /// Source address of SNATed IPv4 flows; default: the interface's first IPv4 address.
    #[serde(default)]
    pub snat_ip: Option<Ipv4Addr>,
    /// Source address of SNATed IPv6 flows; default: the interface's first global IPv6
    /// address.
    #[serde(default)]
    pub snat_ip6: Option<Ipv6Addr>,
    /// The VIP pools (the seeds' Ingress CIDR), IPv4 or IPv6.
    pub pools: Vec<PoolConfig>,
    /// Egress CIDRs: a pool may not overlap them.
    #[serde(default)]
    pub egress_cidrs: Vec<String>,
    /// When set, a pool smaller than this prefix (e.g. 27: fewer than 32 addresses) is
    /// rejected. Stated for IPv4; an IPv6 pool must hold as many addresses (a prefix of at
    /// most 96 + this).
    #[serde(default)]
    pub min_pool_prefix: Option<u8>,
    /// The local API's Unix socket.
    #[serde(default = "default_socket")]
    pub socket: PathBuf,
    /// Where the maps and the program's links are pinned on bpffs (kept across restarts:
    /// the datapath serves on while the daemon is down); none: not pinned, the datapath
    /// goes with the daemon.
    #[serde(default)]
    pub pin_dir: Option<PathBuf>,
    /// Where the daemon saves its services, VIPs and ids (`lb-state.json`) before it writes
    /// them to the maps; a restarted daemon starts from there.
    #[serde(default = "default_state_dir")]
    pub state_dir: PathBuf,
    /// Where Prometheus scrapes the metrics (`GET /metrics` over TCP, e.g. "0.0.0.0:9630");
    /// none: only on the local socket.
    #[serde(default)]
    pub metrics_address: Option<std::net::SocketAddr>,
    /// Capacities of the datapath's maps, set when the program is loaded.
    #[serde(default)]
    pub maps: MapSizes,
    /// Gratuitous ARPs (IPv4) or unsolicited Neighbor Advertisements (IPv6) sent when the LB
    /// takes a VIP over, and the gap between them.
    #[serde(default = "default_garp_count")]
    pub garp_count: u32,
    #[serde(default = "default_garp_interval_ms")]
    pub garp_interval_ms: u64,
}

/// The default local API socket.
pub const DEFAULT_SOCKET: &str = "/run/slipway/lb.sock";

fn default_socket() -> PathBuf {
    PathBuf::from(DEFAULT_SOCKET)
}
/// The default state directory.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/slipway/lb";

fn default_state_dir() -> PathBuf {
    PathBuf::from(DEFAULT_STATE_DIR)
}
fn default_garp_count() -> u32 {
    3
}
fn default_garp_interval_ms() -> u64 {
    500
}

/// Bounds of [`MapSizes`]: (field, least, most).
const MAP_SIZE_BOUNDS: [(&str, u32, u32); 3] = [
    ("maps.services", 1, 1 << 16),
    ("maps.backends", 2, 1 << 22),
    ("maps.flows", 1024, 1 << 27),
];

/// Checks every map size against [`MAP_SIZE_BOUNDS`].
fn check_map_sizes(sizes: &MapSizes, p: &mut Problems) {
    for ((field, least, most), value) in
        MAP_SIZE_BOUNDS
            .iter()
            .zip([sizes.services, sizes.backends, sizes.flows])
    {
        if !(*least..=*most).contains(&value) {
            p.add(*field, format!("{value} is outside {least}..={most}"));
        }
    }
}

/// A VIP pool.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PoolConfig {
    pub name: String,
    /// e.g. "10.99.100.0/24" or "fd99:100::/120".
    pub cidr: String,
}

impl LbConfig {
    /// A configuration with the defaults for everything but the interface and pools.
    pub fn new(interface: &str, pools: Vec<PoolConfig>) -> Self {
        Self {
            interface: interface.to_owned(),
            snat_ip: None,
            snat_ip6: None,
            pools,
            egress_cidrs: Vec::new(),
            min_pool_prefix: None,
            socket: default_socket(),
            pin_dir: None,
            state_dir: default_state_dir(),
            metrics_address: None,
            maps: MapSizes::default(),
            garp_count: default_garp_count(),
            garp_interval_ms: default_garp_interval_ms(),
        }
    }

    /// Checks every field; the error lists all bad ones.
    pub fn validate(&self) -> Result<(), LbError> {
        let mut p = Problems::default();
        if self.interface.is_empty() || self.interface.len() > 15 {
            p.add("interface", "must be an interface name of 1 to 15 bytes");
        }
        let mut egress = Vec::new();
        for (i, cidr) in self.egress_cidrs.iter().enumerate() {
            match cidr.parse::<IpNetwork>() {
                Ok(net) => egress.push(net),
                Err(e) => p.add(format!("egressCidrs[{i}]"), format!("{cidr:?}: {e}")),
            }
        }
        if let Some(min) = self.min_pool_prefix
            && min > 32
        {
            p.add("minPoolPrefix", "must be 0..=32");
        }
        if self.pools.is_empty() {
            p.add("pools", "at least one pool is needed");
        }
        let mut names = BTreeSet::new();
        let mut nets: Vec<(usize, IpNetwork)> = Vec::new();
        for (i, pool) in self.pools.iter().enumerate() {
            if pool.name.is_empty() {
                p.add(format!("pools[{i}].name"), "must not be empty");
            } else if !names.insert(pool.name.as_str()) {
                p.add(
                    format!("pools[{i}].name"),
                    format!("{:?} is used twice", pool.name),
                );
            }
            let net = match pool.cidr.parse::<IpNetwork>() {
                Ok(net) => net,
                Err(e) => {
                    p.add(format!("pools[{i}].cidr"), format!("{:?}: {e}", pool.cidr));
                    continue;
                }
            };
            if net.network() != net.ip() {
                p.add(
                    format!("pools[{i}].cidr"),
                    format!(
                        "{} has host bits set (network is {})",
                        pool.cidr,
                        net.network()
                    ),
                );
            }
            if let Some(min) = self.min_pool_prefix
                && min <= 32
            {
                let limit = match net {
                    IpNetwork::V4(_) => min,
                    IpNetwork::V6(_) => 96 + min,
                };
                if net.prefix() > limit {
                    p.add(
                        format!("pools[{i}].cidr"),
                        format!("{net} is smaller than the /{limit} minimum (minPoolPrefix {min})"),
                    );
                }
            }
            if let Some(problem) = unusable_pool(net) {
                p.add(format!("pools[{i}].cidr"), format!("{net}: {problem}"));
            }
            for e in &egress {
                if overlaps(*e, net) {
                    p.add(
                        format!("pools[{i}].cidr"),
                        format!("{net} overlaps the egress CIDR {e}"),
                    );
                }
            }
            for (j, other) in &nets {
                if overlaps(*other, net) {
                    p.add(
                        format!("pools[{i}].cidr"),
                        format!("{net} overlaps pools[{j}] ({other})"),
                    );
                }
            }
            nets.push((i, net));
        }
        if self.garp_count > 100 {
            p.add("garpCount", "at most 100");
        }
        check_map_sizes(&self.maps, &mut p);
        p.finish("LB configuration")
    }
}

/// Whether two networks share an address (never across families).
pub fn overlaps(a: IpNetwork, b: IpNetwork) -> bool {
    match (a, b) {
        (IpNetwork::V4(a), IpNetwork::V4(b)) => a.overlaps(b),
        (IpNetwork::V6(a), IpNetwork::V6(b)) => a.overlaps(b),
        _ => false,
    }
}

/// Why a network cannot hold VIPs, if it cannot: addresses no host answers for on a link.
fn unusable_pool(net: IpNetwork) -> Option<&'static str> {
    match net {
        IpNetwork::V4(n) if n.network().is_multicast() || n.network().is_loopback() => {
            Some("multicast and loopback addresses cannot be VIPs")
        }
        IpNetwork::V4(_) => None,
        IpNetwork::V6(n) => ipv6_vip_problem(n.network()).or_else(|| {
            (n.prefix() < 96 && n.contains(Ipv4Addr::UNSPECIFIED.to_ipv6_mapped()))
                .then_some("holds the IPv4-mapped range ::ffff:0:0/96")
        }),
    }
}

/// Why an IPv6 address cannot be a VIP, if it cannot.
fn ipv6_vip_problem(ip: Ipv6Addr) -> Option<&'static str> {
    if ip.is_multicast() {
        Some("multicast addresses cannot be VIPs")
    } else if ip.is_loopback() || ip.is_unspecified() {
        Some("loopback and unspecified addresses cannot be VIPs")
    } else if ip.is_unicast_link_local() {
        Some("link-local addresses (fe80::/10) cannot be VIPs: they are not routed")
    } else if ip.to_ipv4_mapped().is_some() {
        Some("IPv4-mapped addresses (::ffff:0:0/96) are IPv4: write them as IPv4")
    } else {
        None
    }
}

/// An address family, as Kubernetes names it in `spec.ipFamilies`.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize,
)]
pub enum IpFamily {
    #[default]
    #[serde(rename = "IPv4")]
    Ipv4,
    #[serde(rename = "IPv6")]
    Ipv6,
}

impl IpFamily {
    pub fn of(ip: IpAddr) -> Self {
        match ip {
            IpAddr::V4(_) => IpFamily::Ipv4,
            IpAddr::V6(_) => IpFamily::Ipv6,
        }
    }

    pub fn of_net(net: IpNetwork) -> Self {
        Self::of(net.ip())
    }

    pub fn as_str(self) -> &'static str {
        match self {
            IpFamily::Ipv4 => "IPv4",
            IpFamily::Ipv6 => "IPv6",
        }
    }
}

impl fmt::Display for IpFamily {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The protocol of a service port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Protocol {
    #[serde(rename = "TCP")]
    Tcp,
    #[serde(rename = "UDP")]
    Udp,
}

impl Protocol {
    /// The IP protocol number.
    pub fn number(self) -> u8 {
        match self {
            Protocol::Tcp => 6,
            Protocol::Udp => 17,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
        }
    }
}

/// `externalTrafficPolicy`. To the LB, Cluster: any backend, which sees the LB's address
/// (SNAT); Local: node-local backends only (`nodeLocal`), which see the client's address (no
/// SNAT; their replies must route back through the LB host).
pub use slipway_api::networking::TrafficPolicy;

/// A Service of type LoadBalancer with its backends, as the local API takes it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ServiceSpec {
    pub namespace: String,
    pub name: String,
    pub ports: Vec<ServicePort>,
    /// The VIP's family (`spec.ipFamilies`, one entry: a service has one VIP). Default: the
    /// family of `loadBalancerIP`, else of the first backend, else IPv4.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ip_families: Vec<IpFamily>,
    /// Requests a specific VIP (`spec.loadBalancerIP`, Kubernetes' spelling, which the errors
    /// use too; `loadBalancerIp` is still read).
    #[serde(default, rename = "loadBalancerIP", alias = "loadBalancerIp")]
    pub load_balancer_ip: Option<IpAddr>,
    /// Clients allowed in (`spec.loadBalancerSourceRanges`); empty: everyone.
    #[serde(default)]
    pub load_balancer_source_ranges: Vec<String>,
    #[serde(default)]
    pub external_traffic_policy: TrafficPolicy,
    pub backends: Vec<BackendSpec>,
    #[serde(default)]
    pub health_check: Option<HealthCheckSpec>,
    /// How long a drained backend (weight 0, or removed from the service) keeps its existing
    /// flows; none: until they end (or its health check fails).
    #[serde(default)]
    pub drain_timeout_secs: Option<u64>,
    /// `spec.sessionAffinity`: with ClientIP, a client's new flows go to the backend of its
    /// last one (while that backend is in the ring and within the timeout).
    #[serde(default)]
    pub session_affinity: SessionAffinity,
    /// `spec.sessionAffinityConfig`; only with `sessionAffinity: ClientIP`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_affinity_config: Option<SessionAffinityConfig>,
    /// Direct server return (IPv4): each client packet goes to its backend untranslated,
    /// inside an IPv4 header from the LB's address (IP-in-IP), and the backend answers the
    /// client itself, so replies never cross the LB. The backends must take the header off and
    /// serve the VIP: nodes running Slipway's agent do. The LB lowers the MSS of each SYN by
    /// the header's 20 bytes.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub direct_server_return: bool,
}

/// `spec.sessionAffinity`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum SessionAffinity {
    #[default]
    None,
    #[serde(rename = "ClientIP")]
    ClientIp,
}

/// `spec.sessionAffinityConfig`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SessionAffinityConfig {
    #[serde(rename = "clientIP", default)]
    pub client_ip: Option<ClientIpConfig>,
}

/// `spec.sessionAffinityConfig.clientIP`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ClientIpConfig {
    /// Seconds a client stays with its backend after its last new flow; Kubernetes' default
    /// and range: 10800, 1..=86400.
    #[serde(default)]
    pub timeout_seconds: Option<u32>,
}

/// Kubernetes' default `sessionAffinityConfig.clientIP.timeoutSeconds` (3 hours).
pub const DEFAULT_AFFINITY_TIMEOUT_SECS: u32 = 10800;
/// Kubernetes' upper bound for it (one day).
pub const MAX_AFFINITY_TIMEOUT_SECS: u32 = 86400;

/// A service port.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ServicePort {
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default = "default_protocol")]
    pub protocol: Protocol,
    pub port: u16,
    /// The backends' port; 0 or absent: the same as `port`.
    #[serde(default)]
    pub target_port: u16,
}

fn default_protocol() -> Protocol {
    Protocol::Tcp
}

impl ServicePort {
    pub fn target(&self) -> u16 {
        if self.target_port == 0 {
            self.port
        } else {
            self.target_port
        }
    }
}

/// A backend (an endpoint of the service).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct BackendSpec {
    /// Of the service's family.
    pub ip: IpAddr,
    /// Relative share of new flows; 0 drains the backend (no new flows, existing ones stay).
    #[serde(default = "default_weight")]
    pub weight: u32,
    /// Whether the backend is local to the LB node: only these serve an
    /// `externalTrafficPolicy: Local` service.
    #[serde(default)]
    pub node_local: bool,
}

fn default_weight() -> u32 {
    1
}

/// Active health checks of a service's backends.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HealthCheckSpec {
    #[serde(default = "default_interval_ms")]
    pub interval_ms: u64,
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    /// Consecutive successes that bring a failed backend back.
    #[serde(default = "default_rise")]
    pub rise: u32,
    /// Consecutive failures that take a backend out.
    #[serde(default = "default_fall")]
    pub fall: u32,
    /// The backend port probed; default: the first TCP port's target port.
    #[serde(default)]
    pub port: Option<u16>,
    /// With a path, the probe is an HTTP GET that must answer 2xx or 3xx; else a TCP connect.
    #[serde(default)]
    pub http_path: Option<String>,
}

fn default_interval_ms() -> u64 {
    2000
}
fn default_timeout_ms() -> u64 {
    1000
}
fn default_rise() -> u32 {
    2
}
fn default_fall() -> u32 {
    3
}

/// A service's name, `namespace/name`.
pub fn service_name(namespace: &str, name: &str) -> String {
    format!("{namespace}/{name}")
}

impl ServiceSpec {
    /// A service with one TCP port (`targetPort` = `port`) over `backends` of weight 1, every
    /// other field at its default: what benchmarks and tests start from.
    pub fn tcp(namespace: &str, name: &str, port: u16, backends: &[IpAddr]) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
            ip_families: Vec::new(),
            ports: vec![ServicePort {
                name: None,
                protocol: Protocol::Tcp,
                port,
                target_port: 0,
            }],
            load_balancer_ip: None,
            load_balancer_source_ranges: Vec::new(),
            external_traffic_policy: TrafficPolicy::Cluster,
            backends: backends
                .iter()
                .map(|ip| BackendSpec {
                    ip: *ip,
                    weight: 1,
                    node_local: false,
                })
                .collect(),
            health_check: None,
            drain_timeout_secs: None,
            session_affinity: Default::default(),
            session_affinity_config: None,
            direct_server_return: false,
        }
    }

    pub fn key(&self) -> String {
        service_name(&self.namespace, &self.name)
    }

    /// The port the health checks probe, if there is one.
    pub fn health_port(&self) -> Option<u16> {
        let check = self.health_check.as_ref()?;
        check.port.or_else(|| {
            self.ports
                .iter()
                .find(|p| p.protocol == Protocol::Tcp)
                .map(ServicePort::target)
        })
    }

    /// The VIP's family: `ipFamilies[0]`, else that of `loadBalancerIP`, else of the first
    /// backend, else IPv4.
    pub fn family(&self) -> IpFamily {
        self.ip_families
            .first()
            .copied()
            .or(self.load_balancer_ip.map(IpFamily::of))
            .or(self.backends.first().map(|b| IpFamily::of(b.ip)))
            .unwrap_or_default()
    }

    /// The ClientIP affinity timeout in seconds, if the service has ClientIP affinity.
    pub fn affinity_timeout_secs(&self) -> Option<u32> {
        (self.session_affinity == SessionAffinity::ClientIp).then(|| {
            self.session_affinity_config
                .as_ref()
                .and_then(|c| c.client_ip.as_ref())
                .and_then(|c| c.timeout_seconds)
                .unwrap_or(DEFAULT_AFFINITY_TIMEOUT_SECS)
        })
    }

    /// The parsed source ranges (call after [`ServiceSpec::validate`]).
    pub fn source_ranges(&self) -> Vec<IpNetwork> {
        self.load_balancer_source_ranges
            .iter()
            .filter_map(|r| r.parse().ok())
            .collect()
    }

    /// Checks every field; the error lists all bad ones.
    pub fn validate(&self) -> Result<(), LbError> {
        let mut p = Problems::default();
        for (field, value) in [("namespace", &self.namespace), ("name", &self.name)] {
            if !is_dns_label(value) {
                p.add(
                    field,
                    format!("{value:?} is not a DNS label (a-z, 0-9, '-', 1..63)"),
                );
            }
        }
        if self.ports.is_empty() {
            p.add("ports", "at least one port is needed");
        }
        let mut seen = BTreeSet::new();
        for (i, port) in self.ports.iter().enumerate() {
            if port.port == 0 {
                p.add(format!("ports[{i}].port"), "must be 1..=65535");
            }
            if !seen.insert((port.protocol, port.port)) {
                p.add(
                    format!("ports[{i}]"),
                    format!("{}/{} is listed twice", port.port, port.protocol.as_str()),
                );
            }
        }
        if self.ip_families.len() > 1 {
            p.add(
                "ipFamilies",
                "one family only: a service has one VIP (no dual-stack pairs)",
            );
        }
        let family = self.family();
        if let Some(ip) = self.load_balancer_ip {
            let problem = match ip {
                IpAddr::V4(v4) if v4.is_unspecified() || v4.is_broadcast() || v4.is_multicast() => {
                    Some(format!("{ip} cannot be a VIP"))
                }
                IpAddr::V4(_) => None,
                IpAddr::V6(v6) => ipv6_vip_problem(v6).map(|problem| format!("{ip}: {problem}")),
            };
            if let Some(problem) = problem {
                p.add("loadBalancerIP", problem);
            } else if IpFamily::of(ip) != family {
                p.add(
                    "loadBalancerIP",
                    format!("{ip} is {}, the service is {family}", IpFamily::of(ip)),
                );
            }
        }
        for (i, range) in self.load_balancer_source_ranges.iter().enumerate() {
            match range.parse::<IpNetwork>() {
                Ok(net) if net.network() != net.ip() => p.add(
                    format!("loadBalancerSourceRanges[{i}]"),
                    format!("{range} has host bits set"),
                ),
                Ok(net) if IpFamily::of_net(net) != family => p.add(
                    format!("loadBalancerSourceRanges[{i}]"),
                    format!(
                        "{range} is {}, the service is {family}",
                        IpFamily::of_net(net)
                    ),
                ),
                Ok(_) => {}
                Err(e) => p.add(
                    format!("loadBalancerSourceRanges[{i}]"),
                    format!("{range:?}: {e}"),
                ),
            }
        }
        let mut ips = BTreeSet::new();
        for (i, backend) in self.backends.iter().enumerate() {
            let no_host = match backend.ip {
                IpAddr::V4(ip) => ip.is_unspecified() || ip.is_broadcast() || ip.is_multicast(),
                IpAddr::V6(ip) => ip.is_unspecified() || ip.is_multicast(),
            };
            if no_host {
                p.add(
                    format!("backends[{i}].ip"),
                    format!("{} is no host", backend.ip),
                );
            } else if IpFamily::of(backend.ip) != family {
                p.add(
                    format!("backends[{i}].ip"),
                    format!(
                        "{} is {}, the service is {family} (no translation between families)",
                        backend.ip,
                        IpFamily::of(backend.ip)
                    ),
                );
            }
            if !ips.insert(backend.ip) {
                p.add(
                    format!("backends[{i}].ip"),
                    format!("{} is listed twice", backend.ip),
                );
            }
            if backend.weight > 1000 {
                p.add(format!("backends[{i}].weight"), "must be 0..=1000");
            }
        }
        if self.direct_server_return {
            if family != IpFamily::Ipv4 {
                p.add(
                    "directServerReturn",
                    format!("IPv4 only (IP-in-IP); the service is {family}"),
                );
            }
            if self.external_traffic_policy == TrafficPolicy::Local {
                p.add(
                    "directServerReturn",
                    "not with externalTrafficPolicy Local: with direct server return the \
                     backends keep the client's address themselves",
                );
            }
        }
        match (self.session_affinity, &self.session_affinity_config) {
            (SessionAffinity::None, Some(_)) => p.add(
                "sessionAffinityConfig",
                "only with sessionAffinity: ClientIP",
            ),
            (SessionAffinity::ClientIp, Some(config)) => {
                if let Some(t) = config.client_ip.as_ref().and_then(|c| c.timeout_seconds)
                    && !(1..=MAX_AFFINITY_TIMEOUT_SECS).contains(&t)
                {
                    p.add(
                        "sessionAffinityConfig.clientIP.timeoutSeconds",
                        format!("{t} is outside 1..={MAX_AFFINITY_TIMEOUT_SECS}"),
                    );
                }
            }
            _ => {}
        }
        if let Some(check) = &self.health_check {
            if check.interval_ms < 10 {
                p.add("healthCheck.intervalMs", "must be at least 10");
            }
            if check.timeout_ms == 0 || check.timeout_ms > check.interval_ms.max(10) {
                p.add("healthCheck.timeoutMs", "must be 1..=intervalMs");
            }
            if check.rise == 0 {
                p.add("healthCheck.rise", "must be at least 1");
            }
            if check.fall == 0 {
                p.add("healthCheck.fall", "must be at least 1");
            }
            if check.port == Some(0) {
                p.add("healthCheck.port", "must be 1..=65535");
            }
            if self.health_port().is_none() {
                p.add(
                    "healthCheck.port",
                    "needed when the service has no TCP port",
                );
            }
            if let Some(path) = &check.http_path
                && (!path.starts_with('/')
                    || path.bytes().any(|b| b.is_ascii_control() || b == b' '))
            {
                p.add(
                    "healthCheck.httpPath",
                    "must start with '/' and hold no spaces or controls",
                );
            }
        }
        p.finish("service")
    }
}

fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

#[cfg(test)]
mod tests;
