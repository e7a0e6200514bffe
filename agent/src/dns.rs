//! Cluster DNS on the node: `<svc>.<ns>.svc.<domain>` (and the rest of the Kubernetes DNS
//! names, see [`zone`]) answered from the Services and EndpointSlices the agent watches, every
//! other name forwarded to the host's nameservers ([`forward`]). Served on UDP and TCP at
//! `--dns-listen` with hickory-server; pods reach it through the resolv.conf the pod runner
//! gives them (`pods::dns`).

pub mod forward;
pub mod resolv;
pub mod zone;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use futures_util::FutureExt as _;
use hickory_proto::op::{Edns, Metadata, OpCode, ResponseCode};
use hickory_proto::rr::{Name, Record};
use hickory_server::net::runtime::Time;
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::zone_handler::MessageResponseBuilder;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::reflector::Store;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use tokio::net::{TcpListener, UdpSocket};
use tracing::{debug, info};

use self::forward::Upstreams;
use self::zone::{Answer, Zone};

/// How `slipway agent` serves cluster DNS.
#[derive(Debug, Clone, clap::Args)]
pub struct DnsArgs {
    /// Where to answer DNS on UDP and TCP: an address of this host that its pods reach (its
    /// underlay address, or one added for it) and port 53, which pods with dnsPolicy
    /// ClusterFirst get as their nameserver. Default: off (no DNS server; such pods get the
    /// host's resolv.conf, as under kubelet without clusterDNS).
    #[arg(long = "dns-listen")]
    pub listen: Option<SocketAddr>,
    /// The cluster's DNS domain.
    #[arg(long = "cluster-domain", default_value = "cluster.local")]
    pub cluster_domain: String,
    /// The resolv.conf whose nameservers answer names outside the cluster domain.
    #[arg(long = "dns-resolv-conf", default_value = "/etc/resolv.conf")]
    pub resolv_conf: PathBuf,
    /// How long each upstream nameserver is given before the next is asked (SERVFAIL when
    /// none answers).
    #[arg(long = "dns-forward-timeout", default_value = "2s", value_parser = humantime::parse_duration)]
    pub forward_timeout: Duration,
}

impl DnsArgs {
    /// The server's configuration, if `--dns-listen` asks for one: the upstreams read from
    /// `--dns-resolv-conf` (the server's own address left out, so it never asks itself).
    pub fn config(&self) -> Result<Option<DnsConfig>, DnsError> {
        let Some(listen) = self.listen else {
            return Ok(None);
        };
        let conf =
            resolv::ResolvConf::read(&self.resolv_conf).map_err(|source| DnsError::ResolvConf {
                path: self.resolv_conf.clone(),
                source,
            })?;
        let upstreams = conf
            .upstreams()
            .into_iter()
            .filter(|u| *u != listen)
            .collect();
        Ok(Some(DnsConfig {
            listen,
            domain: self.cluster_domain.clone(),
            upstreams,
            forward_timeout: self.forward_timeout,
        }))
    }
}

impl DnsConfig {
    /// What pods with dnsPolicy ClusterFirst are pointed at: the listen address (`node_ip`
    /// when it is the wildcard). `None` when the port is not 53, which resolv.conf cannot say.
    pub fn pod_dns(&self, node_ip: std::net::IpAddr) -> Option<crate::pods::dns::ClusterDns> {
        if self.listen.port() != 53 {
            return None;
        }
        let ip = if self.listen.ip().is_unspecified() {
            node_ip
        } else {
            self.listen.ip()
        };
        Some(crate::pods::dns::ClusterDns {
            servers: vec![ip],
            domain: self.domain.clone(),
        })
    }
}

/// What the DNS server serves.
#[derive(Debug, Clone)]
pub struct DnsConfig {
    /// UDP and TCP; port 0 picks one free on both.
    pub listen: SocketAddr,
    /// The cluster domain (`cluster.local`).
    pub domain: String,
    /// Nameservers for names outside the domain.
    pub upstreams: Vec<SocketAddr>,
    /// How long each upstream is given.
    pub forward_timeout: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum DnsError {
    #[error("--cluster-domain: {domain:?} is not a DNS name")]
    Domain {
        domain: String,
        #[source]
        source: hickory_proto::ProtoError,
    },
    #[error("--dns-resolv-conf: reading {}", path.display())]
    ResolvConf {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("--dns-listen: binding {protocol} {addr}")]
    Bind {
        protocol: &'static str,
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("serving DNS")]
    Serve(#[source] hickory_server::net::NetError),
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct QueryLabels {
    /// `cluster` (answered from the zone) or `forwarded`.
    source: &'static str,
    rcode: String,
}

/// The server's counters: queries answered, by where the answer came from and its rcode.
#[derive(Clone, Debug, Default)]
pub struct DnsMetrics {
    queries: Family<QueryLabels, Counter>,
}

impl DnsMetrics {
    fn count(&self, source: &'static str, rcode: ResponseCode) {
        let rcode = match rcode {
            ResponseCode::NoError => "NOERROR".to_owned(),
            ResponseCode::FormErr => "FORMERR".to_owned(),
            ResponseCode::ServFail => "SERVFAIL".to_owned(),
            ResponseCode::NXDomain => "NXDOMAIN".to_owned(),
            ResponseCode::NotImp => "NOTIMP".to_owned(),
            ResponseCode::Refused => "REFUSED".to_owned(),
            other => format!("RCODE{}", u16::from(other)),
        };
        self.queries
            .get_or_create(&QueryLabels { source, rcode })
            .inc();
    }

    /// The queries answered, by source and rcode, in the Prometheus text format
    /// (`slipway_dns_queries_total{source="cluster",rcode="NXDOMAIN"} 3`), to append to the
    /// agent's /metrics (it ends with `# EOF`, as the others do). Requests too malformed to
    /// parse get FORMERR from hickory-server before they reach the counters.
    pub fn render_metrics(&self) -> String {
        let mut registry = prometheus_client::registry::Registry::with_prefix("slipway_dns");
        registry.register(
            "queries",
            "DNS queries the node's cluster DNS answered, by source (cluster zone or forwarded) and rcode",
            self.queries.clone(),
        );
        let mut text = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut text, &registry);
        text
    }
}

/// Answers one request: the zone's names from the stores, the others from upstream.
struct Handler {
    zone: Zone,
    services: Store<Service>,
    slices: Option<Store<EndpointSlice>>,
    upstreams: Upstreams,
    metrics: DnsMetrics,
}

/// What goes back: rcode, flags and sections.
struct Reply {
    rcode: ResponseCode,
    authoritative: bool,
    recursion_available: bool,
    answers: Vec<Record>,
    authorities: Vec<Record>,
    additionals: Vec<Record>,
}

impl Reply {
    fn error(rcode: ResponseCode) -> Self {
        Self {
            rcode,
            authoritative: false,
            recursion_available: true,
            answers: Vec::new(),
            authorities: Vec::new(),
            additionals: Vec::new(),
        }
    }
}

fn ready<K>(store: &Store<K>) -> bool
where
    K: kube::Resource + Clone + 'static,
    K::DynamicType: Eq + std::hash::Hash + Clone,
{
    store
        .wait_until_ready()
        .now_or_never()
        .is_some_and(|r| r.is_ok())
}

impl Handler {
    fn zone_answer(&self, name: &Name, qtype: hickory_proto::rr::RecordType) -> Reply {
        // Until the first full list is in, an empty store would deny every Service.
        if !ready(&self.services) {
            return Reply::error(ResponseCode::ServFail);
        }
        let services = self.services.state();
        let slices = match &self.slices {
            Some(store) if ready(store) => store.state(),
            _ => Vec::new(),
        };
        let (rcode, answers, soa) = match self.zone.answer(name, qtype, &services, &slices) {
            Answer::Records(records) => (ResponseCode::NoError, records, Vec::new()),
            Answer::NoData => (
                ResponseCode::NoError,
                Vec::new(),
                vec![self.zone.soa().clone()],
            ),
            Answer::NxDomain => (
                ResponseCode::NXDomain,
                Vec::new(),
                vec![self.zone.soa().clone()],
            ),
        };
        Reply {
            rcode,
            authoritative: true,
            recursion_available: true,
            answers,
            authorities: soa,
            additionals: Vec::new(),
        }
    }

    async fn forwarded(&self, request: &Request, query: &hickory_proto::op::Query) -> Reply {
        match self
            .upstreams
            .exchange(query, request.metadata.recursion_desired)
            .await
        {
            Ok(answer) => Reply {
                rcode: answer.metadata.response_code,
                authoritative: false,
                recursion_available: answer.metadata.recursion_available,
                answers: answer.answers,
                authorities: answer.authorities,
                additionals: answer.additionals,
            },
            Err(error) => {
                debug!(name = %query.name(), %error, "forwarding failed");
                Reply::error(ResponseCode::ServFail)
            }
        }
    }
}

#[async_trait::async_trait]
impl RequestHandler for Handler {
    async fn handle_request<R: ResponseHandler, T: Time>(
        &self,
        request: &Request,
        mut response: R,
    ) -> ResponseInfo {
        let (source, reply) = if request.metadata.op_code != OpCode::Query {
            ("cluster", Reply::error(ResponseCode::NotImp))
        } else {
            match request.request_info() {
                Err(_) => ("cluster", Reply::error(ResponseCode::FormErr)),
                Ok(info) => {
                    let query = info.query.original().clone();
                    if self.zone.contains(query.name()) {
                        (
                            "cluster",
                            self.zone_answer(query.name(), query.query_type()),
                        )
                    } else {
                        ("forwarded", self.forwarded(request, &query).await)
                    }
                }
            }
        };
        self.metrics.count(source, reply.rcode);
        let mut metadata = Metadata::response_from_request(&request.metadata);
        metadata.response_code = reply.rcode;
        metadata.authoritative = reply.authoritative;
        metadata.recursion_available = reply.recursion_available;
        // EDNS answered with EDNS (RFC 6891 6.1.1); answers over UDP stay within the size the
        // client offered and 1232 bytes (DNS Flag Day 2020: no IP fragmentation), else TC.
        let edns = request.edns.as_ref().map(|asked| {
            let mut edns = Edns::new();
            edns.set_max_payload(asked.max_payload().clamp(512, 1232));
            edns
        });
        let mut builder = MessageResponseBuilder::new(&request.queries, None);
        if let Some(edns) = &edns {
            builder.edns(edns);
        }
        let message = builder.build(
            metadata,
            reply.answers.iter(),
            reply.authorities.iter(),
            std::iter::empty(),
            reply.additionals.iter(),
        );
        match response.send_response(message).await {
            Ok(info) => info,
            Err(error) => {
                debug!(%error, "sending a DNS response");
                let mut metadata = Metadata::response_from_request(&request.metadata);
                metadata.response_code = ResponseCode::ServFail;
                hickory_proto::op::Header {
                    metadata,
                    counts: hickory_proto::op::HeaderCounts::default(),
                }
                .into()
            }
        }
    }
}

/// The cluster DNS server, serving until it is dropped or [`DnsServer::run`] ends.
pub struct DnsServer {
    addr: SocketAddr,
    metrics: DnsMetrics,
    server: hickory_server::Server<Handler>,
}

impl std::fmt::Debug for DnsServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DnsServer")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

/// How long a TCP client may stay silent before its connection is closed.
const TCP_IDLE: Duration = Duration::from_secs(10);

impl DnsServer {
    /// Binds UDP and TCP at `config.listen` and serves the zone of `config.domain` from
    /// `services` (and `slices`, for headless Services). Until `services` has had its first
    /// full list, names in the zone get SERVFAIL.
    pub async fn start(
        config: DnsConfig,
        services: Store<Service>,
        slices: Option<Store<EndpointSlice>>,
    ) -> Result<Self, DnsError> {
        let (udp, tcp) = bind(config.listen).await?;
        Self::serve(config, udp, tcp, services, slices)
    }

    /// Like [`DnsServer::start`] on sockets bound already (`config.listen` is not used): for
    /// a server whose sockets were bound in another network namespace. Must be called inside
    /// a tokio runtime.
    pub fn from_std(
        config: DnsConfig,
        udp: std::net::UdpSocket,
        tcp: std::net::TcpListener,
        services: Store<Service>,
        slices: Option<Store<EndpointSlice>>,
    ) -> Result<Self, DnsError> {
        let bind_error = |protocol, source| DnsError::Bind {
            protocol,
            addr: config.listen,
            source,
        };
        udp.set_nonblocking(true)
            .map_err(|e| bind_error("udp", e))?;
        tcp.set_nonblocking(true)
            .map_err(|e| bind_error("tcp", e))?;
        let udp = UdpSocket::from_std(udp).map_err(|e| bind_error("udp", e))?;
        let tcp = TcpListener::from_std(tcp).map_err(|e| bind_error("tcp", e))?;
        Self::serve(config, udp, tcp, services, slices)
    }

    fn serve(
        config: DnsConfig,
        udp: UdpSocket,
        tcp: TcpListener,
        services: Store<Service>,
        slices: Option<Store<EndpointSlice>>,
    ) -> Result<Self, DnsError> {
        let zone = Zone::new(&config.domain).map_err(|source| DnsError::Domain {
            domain: config.domain.clone(),
            source,
        })?;
        let addr = udp.local_addr().map_err(|source| DnsError::Bind {
            protocol: "udp",
            addr: config.listen,
            source,
        })?;
        let metrics = DnsMetrics::default();
        let handler = Handler {
            zone,
            services,
            slices,
            upstreams: Upstreams {
                servers: config.upstreams.clone(),
                timeout: config.forward_timeout,
            },
            metrics: metrics.clone(),
        };
        let mut server = hickory_server::Server::new(handler);
        server.register_socket(udp);
        server.register_listener(tcp, TCP_IDLE, 64);
        info!(%addr, domain = %config.domain, upstreams = ?config.upstreams, "cluster DNS serving");
        Ok(Self {
            addr,
            metrics,
            server,
        })
    }

    /// Where it answers (UDP and TCP).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Its counters (shared: they keep counting after this call).
    pub fn metrics(&self) -> DnsMetrics {
        self.metrics.clone()
    }

    /// [`DnsMetrics::render_metrics`] of this server.
    pub fn render_metrics(&self) -> String {
        self.metrics.render_metrics()
    }

    /// Serves until a socket fails for good.
    pub async fn run(mut self) -> Result<(), DnsError> {
        self.server
            .block_until_done()
            .await
            .map_err(DnsError::Serve)
    }

    /// Stops accepting and waits for the requests in flight.
    pub async fn shutdown(mut self) -> Result<(), DnsError> {
        self.server
            .shutdown_gracefully()
            .await
            .map_err(DnsError::Serve)
    }
}

/// UDP and TCP on the same address; for port 0, a port free on both.
async fn bind(listen: SocketAddr) -> Result<(UdpSocket, TcpListener), DnsError> {
    let bind_error = |protocol, source| DnsError::Bind {
        protocol,
        addr: listen,
        source,
    };
    let mut attempts = 0;
    loop {
        let udp = UdpSocket::bind(listen)
            .await
            .map_err(|e| bind_error("udp", e))?;
        let port = udp.local_addr().map_err(|e| bind_error("udp", e))?.port();
        match TcpListener::bind(SocketAddr::new(listen.ip(), port)).await {
            Ok(tcp) => return Ok((udp, tcp)),
            // The port picked for UDP is taken for TCP: pick another.
            Err(e) if listen.port() == 0 && attempts < 16 => {
                attempts += 1;
                debug!(port, error = %e, "TCP port taken; trying another");
            }
            Err(e) => return Err(bind_error("tcp", e)),
        }
    }
}
