//! The LB daemon (`slipway lb serve`): loads and attaches the datapath on the LB interface,
//! serves the local API on a Unix socket, runs the health checks, sends gratuitous ARP (or
//! unsolicited Neighbor Advertisements, for IPv6) for VIPs it takes over, and ends drained
//! flows on time. [`DaemonHandle`] runs one on a thread
//! inside a named network namespace (tests, the benchmark, the demo).

use std::collections::BTreeMap;
use std::fs;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path as UrlPath, State};
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::{delete, get, put};
use slipway_dataplane::abi::lb::{LbAddr, LbConfig as ConfigValue, LbReason};
use slipway_dataplane::link::Netlink;
use tokio::sync::{Notify, oneshot, watch};
use tokio::task::AbortHandle;
use tracing::{info, warn};

use crate::LbError;
use crate::announce::{Announcer, Lease, StaticLease, announcement_frame};
use crate::api::{self, ApiError, Applied};
use crate::config::LbConfig;
use crate::controller::{Controller, HealthTarget, Limits, monotonic_ns};
use crate::datapath::{AttachPoint, LbDatapath};
use crate::feed::Desired;
use crate::health::probe;
use crate::metrics::Metrics;
use crate::packet::{SolicitedNodeGroups, send_frame};
use crate::pool::Pools;
use crate::state::StateFile;

/// The LB interface as the daemon found it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Interface {
    pub ifindex: u32,
    pub mac: [u8; 6],
    /// Its first IPv4 address.
    pub ip: Option<Ipv4Addr>,
    /// Its first global IPv6 address.
    pub ip6: Option<Ipv6Addr>,
}

/// Reads `ifname`'s index, MAC, first IPv4 and first global IPv6 addresses over netlink, in
/// the calling thread's network namespace.
pub async fn interface(ifname: &str) -> Result<Interface, LbError> {
    let bad = |what: &str| LbError::Invalid {
        what: "LB configuration",
        errors: vec![slipway_api::FieldError::new(
            "interface",
            slipway_api::FieldReason::Invalid,
            format!("{ifname}: {what}"),
        )],
    };
    let netlink = Netlink::current()?;
    let link = netlink
        .link(ifname)
        .await?
        .ok_or_else(|| bad("no such interface"))?;
    let mac = link.mac.ok_or_else(|| bad("no MAC address"))?;
    let addresses = netlink.link_addresses(link.index).await?;
    let ip = addresses.iter().find_map(|a| match a.ip {
        IpAddr::V4(ip) => Some(ip),
        IpAddr::V6(_) => None,
    });
    let ip6 = addresses.iter().find_map(|a| match a.ip {
        IpAddr::V6(ip) if a.global => Some(ip),
        _ => None,
    });
    Ok(Interface {
        ifindex: link.index,
        mac,
        ip,
        ip6,
    })
}

/// Warns when the host's ephemeral ports overlap the SNAT ports: a backend's answer to one of
/// the host's own connections could then be taken for a translated flow's.
fn warn_on_port_overlap() {
    let Ok(text) = fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range") else {
        return;
    };
    let mut parts = text
        .split_whitespace()
        .filter_map(|p| p.parse::<u16>().ok());
    if let (Some(lo), Some(hi)) = (parts.next(), parts.next())
        && lo < crate::datapath::SNAT_PORTS.end
        && hi >= crate::datapath::SNAT_PORTS.start
    {
        warn!(
            lo,
            hi,
            "ip_local_port_range overlaps the SNAT ports {}..{}: set it above them",
            crate::datapath::SNAT_PORTS.start,
            crate::datapath::SNAT_PORTS.end
        );
    }
}

struct Shared {
    controller: Mutex<Controller>,
    metrics: Metrics,
    config: LbConfig,
    iface: Interface,
    health: Mutex<BTreeMap<HealthTarget, AbortHandle>>,
    groups: Mutex<SolicitedNodeGroups>,
}

type AppState = Arc<Shared>;

fn lock(shared: &Shared) -> std::sync::MutexGuard<'_, Controller> {
    shared.controller.lock().unwrap_or_else(|p| p.into_inner())
}

/// What feeds a daemon from an API instead of its local socket.
#[derive(Debug, Clone)]
pub struct Feed {
    /// The services wanted ([`crate::feed::run`]).
    pub desired: watch::Receiver<Option<Desired>>,
    /// Notified when the VIP leases held change ([`crate::election::run`]): the announcements
    /// are brought up to date at once rather than at the next tick.
    pub leases_changed: Arc<Notify>,
}

/// Runs the daemon in the calling thread's network namespace until `shutdown` resolves. With a
/// `feed` ([`crate::feed`]), the services are those it sends: each set is applied as a whole
/// (changed specs applied, services it lacks deleted).
pub async fn serve(
    config: LbConfig,
    point: AttachPoint,
    lease: Arc<dyn Lease>,
    feed: Option<Feed>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), LbError> {
    config.validate()?;
    let pools = Pools::from_config(&config)?;
    let iface = interface(&config.interface).await?;
    let snat_ip = config.snat_ip.or(iface.ip);
    let snat_ip6 = config.snat_ip6.or(iface.ip6);
    if snat_ip.is_none() && snat_ip6.is_none() {
        return Err(LbError::Capacity(
            "the LB interface has no IPv4 or global IPv6 address for SNAT",
        ));
    }
    for (family, missing) in [("IPv4", snat_ip.is_none()), ("IPv6", snat_ip6.is_none())] {
        if missing {
            warn!(
                family,
                "no SNAT address of this family: its externalTrafficPolicy Cluster flows drop"
            );
        }
    }
    let mut datapath = LbDatapath::load(point, config.pin_dir.as_deref(), &config.maps)?;
    datapath.set_config(ConfigValue {
        snat_ip4: snat_ip.map_or(LbAddr::NONE, LbAddr::from),
        snat_ip6: snat_ip6.map_or(LbAddr::NONE, LbAddr::from),
        ifindex: iface.ifindex,
        mac: iface.mac,
        pad: [0; 2],
    })?;
    datapath.attach(&config.interface)?;
    warn_on_port_overlap();
    info!(interface = %config.interface, ?snat_ip, ?snat_ip6, ?point, "LB datapath attached");

    let (controller, restored) = Controller::restore(
        Box::new(datapath),
        pools,
        Announcer::new(lease),
        Limits {
            services: config.maps.services,
            backends: config.maps.backends,
        },
        StateFile::new(&config.state_dir),
    )?;
    let shared = Arc::new(Shared {
        controller: Mutex::new(controller),
        metrics: Metrics::new(),
        config: config.clone(),
        iface,
        health: Mutex::new(BTreeMap::new()),
        groups: Mutex::new(SolicitedNodeGroups::new(iface.ifindex)),
    });

    if let Some(dir) = config.socket.parent() {
        fs::create_dir_all(dir).map_err(|source| LbError::Syscall {
            call: "mkdir socket directory",
            source,
        })?;
    }
    let _ = fs::remove_file(&config.socket);
    let listener =
        tokio::net::UnixListener::bind(&config.socket).map_err(|source| LbError::Syscall {
            call: "bind local API socket",
            source,
        })?;
    // Prometheus over TCP: the metrics route only (the local API stays on the socket).
    let metrics_server = match config.metrics_address {
        Some(addr) => {
            let tcp = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|e| LbError::Invalid {
                    what: "LB configuration",
                    errors: vec![slipway_api::FieldError::new(
                        "metricsAddress",
                        slipway_api::FieldReason::Invalid,
                        format!("cannot listen on {addr}: {e}"),
                    )],
                })?;
            let router = Router::new()
                .route("/metrics", get(metrics))
                .with_state(shared.clone());
            info!(%addr, "metrics listening");
            Some(tokio::spawn(async move {
                if let Err(e) = axum::serve(tcp, router).await {
                    warn!(error = %e, "metrics endpoint stopped");
                }
            }))
        }
        None => None,
    };
    let router = Router::new()
        .route("/v1/services", put(apply))
        .route("/v1/services/{namespace}/{name}", delete(remove))
        .route("/v1/status", get(status))
        .route("/metrics", get(metrics))
        .with_state(shared.clone());
    info!(socket = %config.socket.display(), "local API listening");

    sync_groups(&shared);
    send_announcements(&shared, restored);
    sync_health(&shared);

    let leases_changed = feed.as_ref().map(|f| f.leases_changed.clone());
    let ticker = tokio::spawn({
        let shared = shared.clone();
        async move {
            let mut every = tokio::time::interval(Duration::from_millis(500));
            let mut full = FullTable::default();
            loop {
                match &leases_changed {
                    Some(notify) => tokio::select! {
                        _ = every.tick() => {}
                        () = notify.notified() => {}
                    },
                    None => {
                        every.tick().await;
                    }
                }
                full.check(&shared, Instant::now());
                let taken = lock(&shared).tick(Instant::now());
                sync_groups(&shared);
                match taken {
                    Ok(vips) => send_announcements(&shared, vips),
                    Err(e) => warn!(error = %e, "periodic work failed"),
                }
            }
        }
    });
    let fed = feed.map(
        |Feed {
             desired: mut rx, ..
         }| {
            let shared = shared.clone();
            tokio::spawn(async move {
                loop {
                    let want = rx.borrow_and_update().clone();
                    if let Some(want) = want {
                        apply_desired(&shared, &want);
                    }
                    if rx.changed().await.is_err() {
                        return;
                    }
                }
            })
        },
    );
    let served = axum::serve(listener, router)
        .with_graceful_shutdown(shutdown)
        .await;
    ticker.abort();
    if let Some(task) = fed {
        task.abort();
    }
    if let Some(task) = metrics_server {
        task.abort();
    }
    for (_, task) in std::mem::take(&mut *shared.health.lock().unwrap_or_else(|p| p.into_inner())) {
        task.abort();
    }
    let _ = fs::remove_file(&config.socket);
    served.map_err(|source| LbError::Syscall {
        call: "serve local API",
        source,
    })
}

async fn apply(State(shared): State<AppState>, body: Bytes) -> Result<impl IntoResponse, ApiError> {
    let spec = api::parse_spec(&body)?;
    let applied = lock(&shared).apply(spec)?;
    sync_groups(&shared);
    send_announcements(&shared, applied.taken_over);
    sync_health(&shared);
    Ok(axum::Json(Applied { vip: applied.vip }))
}

async fn remove(
    State(shared): State<AppState>,
    UrlPath((namespace, name)): UrlPath<(String, String)>,
) -> Result<impl IntoResponse, ApiError> {
    lock(&shared).delete(&namespace, &name)?;
    sync_groups(&shared);
    sync_health(&shared);
    Ok(StatusCode::NO_CONTENT)
}

async fn status(State(shared): State<AppState>) -> Result<impl IntoResponse, ApiError> {
    Ok(axum::Json(lock(&shared).status(monotonic_ns())?))
}

async fn metrics(State(shared): State<AppState>) -> Result<impl IntoResponse, ApiError> {
    let status = lock(&shared).status(monotonic_ns())?;
    let text = shared
        .metrics
        .render(status)
        .map_err(|_| ApiError(LbError::Api("encoding metrics".into())))?;
    Ok((
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        text,
    ))
}

/// Makes the services held equal `want`: a spec that differs from the one held is applied,
/// a service `want` lacks is deleted. A refused spec is logged and the others still applied.
fn apply_desired(shared: &AppState, want: &Desired) {
    let have = lock(shared).specs();
    let mut taken = Vec::new();
    for (key, spec) in want {
        if have.get(key) == Some(spec) {
            continue;
        }
        match lock(shared).apply(spec.clone()) {
            Ok(applied) => {
                info!(service = %key, vip = %applied.vip, backends = spec.backends.len(), "service applied from the feed");
                taken.extend(applied.taken_over);
            }
            Err(e) => warn!(service = %key, error = %e, "service from the feed refused"),
        }
    }
    for key in have.keys().filter(|k| !want.contains_key(*k)) {
        let Some((namespace, name)) = key.split_once('/') else {
            continue;
        };
        match lock(shared).delete(namespace, name) {
            Ok(()) => info!(service = %key, "service deleted: the feed no longer has it"),
            Err(e) => warn!(service = %key, error = %e, "deleting a service the feed dropped"),
        }
    }
    sync_groups(shared);
    send_announcements(shared, taken);
    sync_health(shared);
}

/// How often at most the daemon logs that the flow table is full.
const FULL_TABLE_LOG_EVERY: Duration = Duration::from_secs(10);

/// Watches the datapath's flow-table events (`flow_table_full`, `flow_untracked`) and logs
/// them, at most once per [`FULL_TABLE_LOG_EVERY`] (a client can cause them at will).
#[derive(Debug, Default)]
struct FullTable {
    logged: u64,
    last_log: Option<Instant>,
}

impl FullTable {
    /// The events to log now, given the running `total`: none within the rate limit.
    fn due(&mut self, total: u64, now: Instant) -> Option<u64> {
        let new = total.saturating_sub(self.logged);
        let quiet = self
            .last_log
            .is_none_or(|t| now.duration_since(t) >= FULL_TABLE_LOG_EVERY);
        if new == 0 || !quiet {
            return None;
        }
        self.logged = total;
        self.last_log = Some(now);
        Some(new)
    }

    fn check(&mut self, shared: &Shared, now: Instant) {
        let counters = match lock(shared).maps().counters() {
            Ok(counters) => counters,
            Err(e) => {
                warn!(error = %e, "reading the datapath counters failed");
                return;
            }
        };
        let of = |r| counters.get(&r).map_or(0, |c| c.packets);
        let (full, untracked) = (of(LbReason::FlowTableFull), of(LbReason::FlowUntracked));
        if let Some(new) = self.due(full + untracked, now) {
            warn!(
                new,
                flow_table_full = full,
                flow_untracked = untracked,
                max_flows = shared.config.maps.flows,
                "flow table full: flows were evicted or not tracked; raise --max-flows"
            );
        }
    }
}

/// Joins the solicited-node groups of the announced IPv6 VIPs and leaves those of withdrawn
/// ones ([`SolicitedNodeGroups`]). A failure is logged: the VIP is still answered wherever the
/// NIC and the switch pass its solicitations on.
fn sync_groups(shared: &AppState) {
    let announced = lock(shared).announced().clone();
    let mut groups = shared.groups.lock().unwrap_or_else(|p| p.into_inner());
    if let Err(e) = groups.sync(&announced) {
        warn!(error = %e, "solicited-node multicast groups not joined");
    }
}

/// Sends `garp_count` gratuitous ARPs (IPv4) or unsolicited Neighbor Advertisements (IPv6)
/// for each VIP, `garp_interval_ms` apart.
fn send_announcements(shared: &AppState, vips: Vec<IpAddr>) {
    if vips.is_empty() || shared.config.garp_count == 0 {
        return;
    }
    let (count, gap) = (
        shared.config.garp_count,
        Duration::from_millis(shared.config.garp_interval_ms),
    );
    let iface = shared.iface;
    tokio::spawn(async move {
        for round in 0..count {
            if round > 0 {
                tokio::time::sleep(gap).await;
            }
            for vip in &vips {
                if let Err(e) = send_frame(iface.ifindex, &announcement_frame(iface.mac, *vip)) {
                    warn!(%vip, error = %e, "announcement (gratuitous ARP / unsolicited NA) not sent");
                }
            }
        }
    });
}

/// Starts health-check tasks for new targets and stops those of gone ones.
fn sync_health(shared: &AppState) {
    let targets = lock(shared).health_targets();
    let mut tasks = shared.health.lock().unwrap_or_else(|p| p.into_inner());
    tasks.retain(|target, task| {
        let keep = targets.contains(target);
        if !keep {
            task.abort();
        }
        keep
    });
    for target in targets {
        if tasks.contains_key(&target) {
            continue;
        }
        let shared = shared.clone();
        let t = target.clone();
        let task = tokio::spawn(async move {
            let mut every = tokio::time::interval(t.interval);
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                every.tick().await;
                let ok = probe(t.addr, t.http_path.as_deref(), t.timeout).await;
                if let Err(e) = lock(&shared).observe_health(&t.service, t.ip, ok) {
                    warn!(service = %t.service, backend = %t.addr, error = %e, "health update failed");
                }
            }
        });
        tasks.insert(target, task.abort_handle());
    }
}

/// A daemon running on its own thread inside a named network namespace; stopped (program
/// detached, socket removed) on drop.
#[derive(Debug)]
pub struct DaemonHandle {
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<Result<(), LbError>>>,
    socket: PathBuf,
}

impl DaemonHandle {
    /// Starts the daemon in network namespace `netns` (as named by `ip netns`) with a static
    /// lease, and waits until its API answers.
    pub fn start_in_netns(netns: &str, config: LbConfig) -> Result<Self, LbError> {
        Self::start_in_netns_at(netns, config, AttachPoint::Tc)
    }

    /// Like [`DaemonHandle::start_in_netns`], attaching at `point`.
    pub fn start_in_netns_at(
        netns: &str,
        config: LbConfig,
        point: AttachPoint,
    ) -> Result<Self, LbError> {
        let socket = config.socket.clone();
        let (stop, stopped) = oneshot::channel::<()>();
        let name = netns.to_owned();
        let thread = std::thread::Builder::new()
            .name(format!("lb-{netns}"))
            .spawn(move || -> Result<(), LbError> {
                slipway_dataplane::netns::enter(&name)?;
                // A current-thread runtime: every task runs on this thread, in this namespace.
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(|source| LbError::Syscall {
                        call: "build tokio runtime",
                        source,
                    })?;
                runtime.block_on(serve(
                    config,
                    point,
                    Arc::new(StaticLease),
                    None,
                    async move {
                        let _ = stopped.await;
                    },
                ))
            })
            .map_err(|source| LbError::Syscall {
                call: "spawn daemon thread",
                source,
            })?;
        let mut handle = Self {
            stop: Some(stop),
            thread: Some(thread),
            socket,
        };
        let client = api::Client::new(&handle.socket);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if client.status().is_ok() {
                return Ok(handle);
            }
            if handle.thread.as_ref().is_some_and(JoinHandle::is_finished) {
                return Err(handle
                    .join()
                    .err()
                    .unwrap_or(LbError::Api("daemon exited before serving".into())));
            }
            if Instant::now() > deadline {
                return Err(LbError::Api("daemon did not answer within 30 s".into()));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// A client of this daemon's API.
    pub fn client(&self) -> api::Client {
        api::Client::new(&self.socket)
    }

    fn join(&mut self) -> Result<(), LbError> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        match self.thread.take() {
            Some(thread) => thread
                .join()
                .unwrap_or_else(|_| Err(LbError::Api("daemon thread panicked".into()))),
            None => Ok(()),
        }
    }

    /// Stops the daemon and returns how it ended.
    pub fn stop(mut self) -> Result<(), LbError> {
        self.join()
    }
}

impl Drop for DaemonHandle {
    fn drop(&mut self) {
        if let Err(e) = self.join() {
            warn!(error = %e, "LB daemon ended with an error");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_table_events_are_logged_at_most_once_per_interval() {
        let mut full = FullTable::default();
        let t0 = Instant::now();
        assert_eq!(full.due(0, t0), None, "nothing happened");
        assert_eq!(full.due(5, t0), Some(5));
        assert_eq!(
            full.due(9, t0 + Duration::from_secs(1)),
            None,
            "rate-limited"
        );
        assert_eq!(
            full.due(12, t0 + FULL_TABLE_LOG_EVERY),
            Some(7),
            "what was held back is in the next line"
        );
        assert_eq!(full.due(12, t0 + 3 * FULL_TABLE_LOG_EVERY), None);
    }
}
