//! The LB controller: turns the services it is given (local API now, the supervisor later)
//! into datapath state. It allocates VIPs from the pools, gives each (VIP, port, protocol) a
//! service id and a Maglev ring built from the healthy, weighted backends, writes only the
//! ring slots that changed, keeps backend ids stable so tracked flows keep their backend,
//! enforces drain timeouts, and tells the announcer which VIPs to answer for. Pure logic over
//! the [`LbMaps`] seam, so it is unit-tested without a kernel.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use ipnetwork::IpNetwork;
use slipway_dataplane::abi::lb::{
    BACKEND_F_ACTIVE, FLOW_OPEN, LbBackend, LbFlowKey, LbService, LbServiceKey, MAGLEV_SIZE,
    SERVICE_F_AFFINITY, SERVICE_F_DSR, SERVICE_F_LOCAL, SERVICE_F_SOURCE_RANGES,
};
use tracing::{info, warn};

use crate::LbError;
use crate::announce::Announcer;
pub use crate::book::Limits;
use crate::book::{BackendKey, Book, Drain, PortState, ServiceState};
use crate::config::{HealthCheckSpec, Protocol, ServiceSpec, TrafficPolicy};
use crate::maglev::{self, Table, Weighted};
use crate::maps::LbMaps;
use crate::pool::{Pools, PortKey};
use crate::state::StateFile;
use crate::status::{BackendState, BackendStatus, PoolStatus, PortStatus, ServiceStatus, Status};

/// The least socket address: where a service id's backends start in `backend_ids`.
const MIN_ADDR: SocketAddr = SocketAddr::new(IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED), 0);

/// A TCP flow with no packet for this long no longer counts as active in the status.
const TCP_IDLE: Duration = Duration::from_secs(600);
/// Likewise for UDP.
const UDP_IDLE: Duration = Duration::from_secs(60);
/// How often at least the flows of draining backends are counted (a walk of the whole flow
/// table).
const DRAIN_SCAN: Duration = Duration::from_secs(2);

/// One health-check job: probe `addr` for `service`'s backend `ip`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct HealthTarget {
    pub service: String,
    pub ip: IpAddr,
    pub addr: SocketAddr,
    pub interval: Duration,
    pub timeout: Duration,
    pub http_path: Option<String>,
}

/// What applying a service did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    pub vip: IpAddr,
    /// VIPs newly announced: send gratuitous ARP or unsolicited NA for them.
    pub taken_over: Vec<IpAddr>,
}

/// The controller. Not thread-safe by itself: the daemon holds it behind a mutex.
pub struct Controller {
    maps: Box<dyn LbMaps>,
    announcer: Announcer,
    book: Book,
    /// Backend id per ring slot, as last written, per service id.
    rings: BTreeMap<u32, Vec<u32>>,
    /// Ring slots per backend address, per service id.
    shares: BTreeMap<u32, BTreeMap<IpAddr, u64>>,
    maglev_size: u32,
    limits: Limits,
    store: Option<StateFile>,
    last_drain_scan: Option<Instant>,
    drain_scan_every: Duration,
}

impl std::fmt::Debug for Controller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Controller")
            .field("services", &self.book.services.keys().collect::<Vec<_>>())
            .field("announced", self.announcer.announced())
            .finish_non_exhaustive()
    }
}

impl Controller {
    /// A controller with nothing saved: state lives in memory only.
    pub fn new(maps: Box<dyn LbMaps>, pools: Pools, announcer: Announcer) -> Self {
        Self::with_limits(maps, pools, announcer, Limits::default())
    }

    /// Likewise, handing out ids within `limits`.
    pub fn with_limits(
        maps: Box<dyn LbMaps>,
        pools: Pools,
        announcer: Announcer,
        limits: Limits,
    ) -> Self {
        Self {
            maps,
            announcer,
            book: Book::new(pools, limits),
            rings: BTreeMap::new(),
            shares: BTreeMap::new(),
            maglev_size: MAGLEV_SIZE,
            limits,
            store: None,
            last_drain_scan: None,
            drain_scan_every: DRAIN_SCAN,
        }
    }

    /// A controller that saves its state in `store` before every change to the maps, and
    /// starts from what is saved there: every saved service is programmed again with its VIP
    /// and ids (so tracked flows keep their backends), and whatever else the (pinned) maps
    /// hold is swept. Returns the VIPs announced.
    pub fn restore(
        maps: Box<dyn LbMaps>,
        pools: Pools,
        announcer: Announcer,
        limits: Limits,
        store: StateFile,
    ) -> Result<(Self, Vec<IpAddr>), LbError> {
        let saved = store.load()?;
        let mut c = Self::with_limits(maps, pools.clone(), announcer, limits);
        c.store = Some(store);
        let book = match saved {
            Some(saved) => Book::from_saved(saved, pools, limits)?,
            None => Book::new(pools, limits),
        };
        let empty = c.book.clone();
        c.book = book;
        let names: Vec<String> = c.book.services.keys().cloned().collect();
        // The counters in the (pinned) maps are the services' own: kept.
        let taken = c.write(&empty, &names, false)?;
        c.sweep()?;
        info!(services = names.len(), "state restored");
        Ok((c, taken))
    }

    /// Saves `book` and makes it the controller's; the maps are not touched yet.
    fn commit(&mut self, book: Book) -> Result<Book, LbError> {
        if let Some(store) = &self.store {
            store.save(&book.saved())?;
        }
        Ok(std::mem::replace(&mut self.book, book))
    }

    /// Creates or updates a service. Input is validated, the VIP and ids are reserved and the
    /// new state saved before anything is written, so a rejected request changes nothing.
    pub fn apply(&mut self, spec: ServiceSpec) -> Result<Applied, LbError> {
        spec.validate()?;
        let key = spec.key();
        let now = Instant::now();
        let mut book = self.book.clone();
        let ports: BTreeSet<PortKey> = spec.ports.iter().map(|p| (p.protocol, p.port)).collect();
        let vip = book
            .pools
            .allocate(&key, spec.family(), spec.load_balancer_ip, &ports)?;
        let old = book.services.remove(&key);
        let (mut old_ports, health, mut drained_since) = match old {
            Some(o) if o.vip == vip => (o.ports, o.health, o.drained_since),
            Some(o) => (Vec::new(), o.health, o.drained_since),
            None => Default::default(),
        };
        // Ports kept from before keep their ids; the rest go back first, then new ones take
        // theirs.
        let kept: Vec<Option<PortState>> = spec
            .ports
            .iter()
            .map(|port| {
                old_ports
                    .iter()
                    .position(|p| p.port.protocol == port.protocol && p.port.port == port.port)
                    .map(|i| old_ports.remove(i))
            })
            .collect();
        if let Some(o) = self.book.services.get(&key) {
            for p in o
                .ports
                .iter()
                .filter(|p| !kept.iter().flatten().any(|k| k.id == p.id))
            {
                book.free_ids.insert(p.id);
                book.backend_ids.retain(|(id, _), _| *id != p.id);
                book.draining.retain(|(id, _), _| *id != p.id);
            }
        }
        let mut new_ports = Vec::new();
        for (port, kept) in spec.ports.iter().zip(kept) {
            new_ports.push(match kept {
                Some(mut p) => {
                    p.port = port.clone();
                    p
                }
                None => PortState {
                    port: port.clone(),
                    key: LbServiceKey::new(vip, port.port, port.protocol.number()),
                    id: book.free_ids.pop_first().ok_or(LbError::Capacity(
                        "no free service id (raise --max-services)",
                    ))?,
                },
            });
        }
        drained_since.retain(|ip, _| spec.backends.iter().any(|b| b.ip == *ip && b.weight == 0));
        for b in spec.backends.iter().filter(|b| b.weight == 0) {
            drained_since.entry(b.ip).or_insert(now);
        }
        let state = ServiceState {
            health,
            drained_since,
            ranges: spec.source_ranges(),
            spec,
            vip,
            ports: new_ports,
        };
        // Backends a port no longer uses drain; those it uses (again) get (keep) their ids.
        for p in &state.ports {
            let used = state.used_addrs(p);
            let had: Vec<BackendKey> = book
                .backend_ids
                .keys()
                .filter(|(id, addr)| *id == p.id && !used.contains(addr))
                .copied()
                .collect();
            for k in had {
                book.draining.entry(k).or_insert_with(|| Drain {
                    service: key.clone(),
                    since: now,
                });
            }
            for addr in used {
                book.draining.remove(&(p.id, addr));
                book.backend_id((p.id, addr), self.limits.backends)?;
            }
        }
        if state.spec.external_traffic_policy == TrafficPolicy::Local {
            info!(
                service = %key,
                "externalTrafficPolicy Local: backends see client addresses, so they must route \
                 their replies to clients through this host"
            );
        }
        info!(service = %key, %vip, ports = state.ports.len(), "service applied");
        book.services.insert(key.clone(), state);
        book.track_health(&key);
        let old = self.commit(book)?;
        let taken_over = self.write(&old, &[key], true)?;
        Ok(Applied { vip, taken_over })
    }

    /// Deletes a service; its VIP returns to the pool unless another service shares it.
    pub fn delete(&mut self, namespace: &str, name: &str) -> Result<(), LbError> {
        let key = crate::config::service_name(namespace, name);
        let mut book = self.book.clone();
        let state = book
            .services
            .remove(&key)
            .ok_or_else(|| LbError::NotFound(key.clone()))?;
        for p in &state.ports {
            book.free_ids.insert(p.id);
            book.backend_ids.retain(|(id, _), _| *id != p.id);
        }
        book.draining.retain(|_, d| d.service != key);
        let released = book.pools.release(&key);
        let old = self.commit(book)?;
        self.write(&old, &[], true)?;
        info!(service = %key, vip = %state.vip, ?released, "service deleted");
        Ok(())
    }

    /// Records a health-check result; rebuilds the service's rings when the backend's state
    /// changed. A draining backend (one that left its service) that fails is released: its
    /// flows go to the live backends. Returns the new state on a change.
    pub fn observe_health(
        &mut self,
        service: &str,
        ip: IpAddr,
        ok: bool,
    ) -> Result<Option<bool>, LbError> {
        let Some(state) = self.book.services.get_mut(service) else {
            return Ok(None);
        };
        let Some(check) = state.spec.health_check.clone() else {
            return Ok(None);
        };
        let Some(health) = state.health.get_mut(&ip) else {
            return Ok(None);
        };
        let changed = health.observe(ok, check.rise, check.fall);
        if let Some(healthy) = changed {
            if healthy {
                info!(service, %ip, "backend healthy: back in the ring");
            } else {
                warn!(service, %ip, "backend unhealthy: out of the ring");
            }
            self.program(service)?;
            if !healthy {
                let gone: Vec<BackendKey> = self
                    .book
                    .draining
                    .iter()
                    .filter(|((_, a), d)| d.service == service && a.ip() == ip)
                    .map(|(k, _)| *k)
                    .collect();
                if !gone.is_empty() {
                    info!(service, %ip, "draining backend failed its health check: released");
                    self.release(&gone, false)?;
                }
            }
        }
        Ok(changed)
    }

    /// Every health check to run: the service's backends and its draining ones.
    pub fn health_targets(&self) -> Vec<HealthTarget> {
        let mut targets = Vec::new();
        for (name, s) in &self.book.services {
            let (Some(check), Some(port)) = (&s.spec.health_check, s.spec.health_port()) else {
                continue;
            };
            let HealthCheckSpec {
                interval_ms,
                timeout_ms,
                http_path,
                ..
            } = check;
            let ips: BTreeSet<IpAddr> = s.health.keys().copied().collect();
            for ip in ips {
                targets.push(HealthTarget {
                    service: name.clone(),
                    ip,
                    addr: SocketAddr::new(ip, port),
                    interval: Duration::from_millis(*interval_ms),
                    timeout: Duration::from_millis(*timeout_ms),
                    http_path: http_path.clone(),
                });
            }
        }
        targets
    }

    /// Periodic work: ends the flows of backends drained (weight 0, or gone from the service)
    /// longer than their service's drain timeout, releases gone backends whose flows have
    /// ended, and re-checks the announcement lease. Returns VIPs newly taken over.
    pub fn tick(&mut self, now: Instant) -> Result<Vec<IpAddr>, LbError> {
        let mut expired: BTreeSet<BackendKey> = BTreeSet::new();
        for s in self.book.services.values() {
            let Some(limit) = s.spec.drain_timeout_secs.map(Duration::from_secs) else {
                continue;
            };
            for (ip, since) in &s.drained_since {
                if now.duration_since(*since) >= limit {
                    for p in &s.ports {
                        expired.insert((p.id, SocketAddr::new(*ip, p.port.target())));
                    }
                }
            }
        }
        let mut timed_out = Vec::new();
        for (k, d) in &self.book.draining {
            let limit = self
                .book
                .services
                .get(&d.service)
                .and_then(|s| s.spec.drain_timeout_secs)
                .map(Duration::from_secs);
            if limit.is_some_and(|l| now.duration_since(d.since) >= l) {
                expired.insert(*k);
                timed_out.push(*k);
            }
        }
        if !expired.is_empty() {
            self.end_flows(&expired)?;
        }
        if !timed_out.is_empty() {
            self.release(&timed_out, false)?;
        }
        let scan_due = self
            .last_drain_scan
            .is_none_or(|t| now.duration_since(t) >= self.drain_scan_every);
        if !self.book.draining.is_empty() && scan_due {
            self.last_drain_scan = Some(now);
            // The walk costs two syscalls per tracked flow: with a large table, walk less
            // often, so it never takes more than a twentieth of the daemon's time.
            let started = Instant::now();
            self.release(
                &self.book.draining.keys().copied().collect::<Vec<_>>(),
                true,
            )?;
            self.drain_scan_every = DRAIN_SCAN.max(started.elapsed() * 20);
        }
        self.announce()
    }

    /// Ends every tracked flow of the backends `keys`.
    fn end_flows(&mut self, keys: &BTreeSet<BackendKey>) -> Result<(), LbError> {
        let by_id: BTreeMap<(u32, u32), SocketAddr> = keys
            .iter()
            .filter_map(|k| Some(((k.0, *self.book.backend_ids.get(k)?), k.1)))
            .collect();
        for (key, flow) in self.maps.flows()? {
            let Some(backend) = by_id.get(&(flow.service_id, flow.backend_id)) else {
                continue;
            };
            let reverse = LbFlowKey {
                src: backend.ip().into(),
                dst: flow.nat_ip,
                sport: backend.port().to_be(),
                dport: flow.nat_port,
                proto: key.proto,
                pad: [0; 3],
            };
            self.maps.remove_flow(&key, &reverse)?;
            info!(backend = %backend, "drain timeout: flow ended");
        }
        Ok(())
    }

    /// Releases the draining backends `keys` (with `idle_only`, only those without an open,
    /// recently active flow): saved first, then their ids cleared in the maps.
    fn release(&mut self, keys: &[BackendKey], idle_only: bool) -> Result<(), LbError> {
        let mut keys = keys.to_vec();
        if idle_only {
            let active = self.active_flows(monotonic_ns())?;
            keys.retain(|k| {
                self.book
                    .backend_ids
                    .get(k)
                    .is_none_or(|id| !active.contains_key(&(k.0, *id)))
            });
        }
        if keys.is_empty() {
            return Ok(());
        }
        let mut book = self.book.clone();
        for k in &keys {
            info!(backend = %k.1, service_id = k.0, "draining backend released");
            book.release(k);
        }
        let old = self.commit(book)?;
        self.write(&old, &[], true)?;
        Ok(())
    }

    /// Open, recently active flows per (service id, backend id).
    fn active_flows(&self, now_ns: u64) -> Result<BTreeMap<(u32, u32), u64>, LbError> {
        let mut active: BTreeMap<(u32, u32), u64> = BTreeMap::new();
        for (key, flow) in self.maps.flows()? {
            let idle = if key.proto == Protocol::Tcp.number() {
                TCP_IDLE
            } else {
                UDP_IDLE
            };
            let recent = now_ns.saturating_sub(flow.last_seen_ns) < idle.as_nanos() as u64;
            if flow.state == FLOW_OPEN && recent {
                *active
                    .entry((flow.service_id, flow.backend_id))
                    .or_default() += 1;
            }
        }
        Ok(active)
    }

    /// The status of every service, backend and pool.
    pub fn status(&self, now_ns: u64) -> Result<Status, LbError> {
        let active = self.active_flows(now_ns)?;
        let mut services = Vec::new();
        for (name, s) in &self.book.services {
            let mut ports = Vec::new();
            for p in &s.ports {
                let stats = self.maps.service_stats(p.id)?;
                ports.push(PortStatus {
                    protocol: p.port.protocol,
                    port: p.port.port,
                    target_port: p.port.target(),
                    packets: stats.packets,
                    bytes: stats.bytes,
                    flows_total: stats.flows,
                });
            }
            let mut rows: Vec<(IpAddr, u32, BackendState)> = s
                .spec
                .backends
                .iter()
                .map(|b| {
                    (
                        b.ip,
                        b.weight,
                        s.backend_state(b.ip, b.weight, b.node_local),
                    )
                })
                .collect();
            for ((_, addr), d) in &self.book.draining {
                if d.service == *name && !rows.iter().any(|r| r.0 == addr.ip()) {
                    rows.push((addr.ip(), 0, BackendState::Draining));
                }
            }
            let mut backends = Vec::new();
            for (ip, weight, state) in rows {
                let mut status = BackendStatus {
                    ip,
                    weight,
                    state,
                    healthy: s.health.get(&ip).is_none_or(|h| h.healthy),
                    slots: 0,
                    active_flows: 0,
                    flows_total: 0,
                    packets: 0,
                    bytes: 0,
                };
                for p in &s.ports {
                    status.slots += self
                        .shares
                        .get(&p.id)
                        .and_then(|sh| sh.get(&ip))
                        .copied()
                        .unwrap_or(0);
                    let Some(id) = self
                        .book
                        .backend_ids
                        .get(&(p.id, SocketAddr::new(ip, p.port.target())))
                    else {
                        continue;
                    };
                    status.active_flows += active.get(&(p.id, *id)).copied().unwrap_or(0);
                    let stats = self.maps.backend_stats(*id)?;
                    status.flows_total += stats.flows;
                    status.packets += stats.packets;
                    status.bytes += stats.bytes;
                }
                backends.push(status);
            }
            services.push(ServiceStatus {
                name: name.clone(),
                vip: s.vip,
                external_traffic_policy: s.spec.external_traffic_policy,
                direct_server_return: s.spec.direct_server_return,
                source_ranges: s.spec.load_balancer_source_ranges.clone(),
                ports,
                backends,
            });
        }
        let pools = self
            .book
            .pools
            .usage()
            .into_iter()
            .map(|(name, cidr, used, size)| PoolStatus {
                name,
                cidr: cidr.to_string(),
                used,
                size,
            })
            .collect();
        let verdicts = self
            .maps
            .counters()?
            .into_iter()
            .map(|(reason, v)| (reason.as_str().to_owned(), v.packets))
            .collect();
        Ok(Status {
            services,
            pools,
            announced: self.announcer.announced().iter().copied().collect(),
            verdicts,
            maps: self.maps.map_usage()?,
        })
    }

    /// Every service held, with the spec it was last applied with, by `namespace/name`.
    pub fn specs(&self) -> BTreeMap<String, ServiceSpec> {
        self.book
            .services
            .iter()
            .map(|(k, s)| (k.clone(), s.spec.clone()))
            .collect()
    }

    /// The VIPs announced now.
    pub fn announced(&self) -> &BTreeSet<IpAddr> {
        self.announcer.announced()
    }

    /// The maps, for callers that read or drive the datapath directly.
    pub fn maps(&mut self) -> &mut dyn LbMaps {
        self.maps.as_mut()
    }

    /// Writes to the maps what changed from `old` to the current book: service entries and
    /// source ranges of ports gone, new and kept, backend entries of ids freed and given
    /// (with `zero_new`, counters of new ids start at zero), the rings of services `changed`,
    /// the VIPs.
    fn write(
        &mut self,
        old: &Book,
        changed: &[String],
        zero_new: bool,
    ) -> Result<Vec<IpAddr>, LbError> {
        for s in old.services.values() {
            for p in &s.ports {
                let kept = self.book.port(p.id).is_some_and(|(_, n)| n.key == p.key);
                if kept {
                    continue;
                }
                self.maps.remove_service(&p.key)?;
                for net in &s.ranges {
                    self.maps.remove_source_range(p.id, *net)?;
                }
                self.rings.remove(&p.id);
                self.shares.remove(&p.id);
            }
        }
        for name in changed {
            let Some(s) = self.book.services.get(name) else {
                continue;
            };
            for p in &s.ports {
                let before = old.port(p.id).filter(|(_, o)| o.key == p.key);
                let old_ranges: &[IpNetwork] = before.map_or(&[], |(o, _)| &o.ranges);
                if before.is_none() && zero_new {
                    self.maps.reset_service_stats(p.id)?;
                }
                for net in old_ranges.iter().filter(|n| !s.ranges.contains(n)) {
                    self.maps.remove_source_range(p.id, *net)?;
                }
                for net in s.ranges.iter().filter(|n| !old_ranges.contains(n)) {
                    self.maps.add_source_range(p.id, *net)?;
                }
            }
        }
        let old_ids: BTreeMap<u32, SocketAddr> =
            old.backend_ids.iter().map(|(k, id)| (*id, k.1)).collect();
        let new_ids: BTreeMap<u32, SocketAddr> = self
            .book
            .backend_ids
            .iter()
            .map(|(k, id)| (*id, k.1))
            .collect();
        for id in old_ids.keys().filter(|id| !new_ids.contains_key(id)) {
            self.maps.set_backend(*id, LbBackend::default())?;
        }
        for (id, addr) in &new_ids {
            if old_ids.get(id) != Some(addr) {
                if zero_new {
                    self.maps.reset_backend_stats(*id)?;
                }
                self.maps
                    .set_backend(*id, LbBackend::new(addr.ip(), addr.port()))?;
            }
        }
        for name in changed {
            self.program(name)?;
        }
        self.announce()
    }

    /// Removes from the (pinned) maps every service, source range, backend and VIP the book
    /// does not hold: what a daemon that crashed between saving and writing left behind.
    fn sweep(&mut self) -> Result<(), LbError> {
        let keys: Vec<LbServiceKey> = self
            .book
            .services
            .values()
            .flat_map(|s| s.ports.iter().map(|p| p.key))
            .collect();
        for key in self.maps.service_keys()? {
            if !keys.contains(&key) {
                warn!(vip = %key.vip.ip(), port = u16::from_be(key.port), "swept a service the state does not know");
                self.maps.remove_service(&key)?;
            }
        }
        for (id, net) in self.maps.source_ranges()? {
            let known = self
                .book
                .port(id)
                .is_some_and(|(s, _)| s.ranges.contains(&net));
            if !known {
                self.maps.remove_source_range(id, net)?;
            }
        }
        let ids: BTreeSet<u32> = self.book.backend_ids.values().copied().collect();
        for id in self.maps.backend_ids()? {
            if !ids.contains(&id) {
                self.maps.set_backend(id, LbBackend::default())?;
            }
        }
        let announced = self.announcer.announced().clone();
        for vip in self.maps.vips()? {
            if !announced.contains(&vip) {
                warn!(%vip, "swept a VIP the state does not know");
                self.maps.remove_vip(vip)?;
            }
        }
        Ok(())
    }

    /// Writes service `name`'s rings and service entries.
    fn program(&mut self, name: &str) -> Result<(), LbError> {
        let Some(state) = self.book.services.get(name) else {
            return Ok(());
        };
        let flags = if state.spec.external_traffic_policy == TrafficPolicy::Local {
            SERVICE_F_LOCAL
        } else {
            0
        } | if state.ranges.is_empty() {
            0
        } else {
            SERVICE_F_SOURCE_RANGES
        } | if state.spec.affinity_timeout_secs().is_some() {
            SERVICE_F_AFFINITY
        } else {
            0
        } | if state.spec.direct_server_return {
            SERVICE_F_DSR
        } else {
            0
        };
        let affinity_timeout_s = state.spec.affinity_timeout_secs().unwrap_or(0);
        for p in &state.ports {
            let target = p.port.target();
            let mut weighted = Vec::new();
            let mut ids = Vec::new();
            let mut active = BTreeSet::new();
            for b in &state.spec.backends {
                let st = state.backend_state(b.ip, b.weight, b.node_local);
                if st == BackendState::NotLocal {
                    continue;
                }
                let addr = SocketAddr::new(b.ip, target);
                if st == BackendState::Active && b.weight > 0 {
                    active.insert(addr);
                }
                weighted.push(Weighted {
                    name: addr.to_string(),
                    weight: if st == BackendState::Active {
                        b.weight
                    } else {
                        0
                    },
                });
                ids.push((
                    b.ip,
                    self.book
                        .backend_ids
                        .get(&(p.id, addr))
                        .copied()
                        .unwrap_or(0),
                ));
            }
            let table = Table::build(&weighted, self.maglev_size)?;
            let ring: Vec<u32> = table
                .slots()
                .iter()
                .map(|&i| {
                    if i == maglev::EMPTY {
                        0
                    } else {
                        ids.get(i as usize).map_or(0, |(_, id)| *id)
                    }
                })
                .collect();
            let changed = maglev::changed_slots(self.rings.get(&p.id).map(Vec::as_slice), &ring);
            self.maps.write_ring(p.id, &changed)?;
            self.shares.insert(
                p.id,
                table
                    .shares(ids.len())
                    .into_iter()
                    .zip(&ids)
                    .map(|(n, (ip, _))| (*ip, n as u64))
                    .collect(),
            );
            self.rings.insert(p.id, ring);
            // Session affinity follows a client to its backend only while it is active.
            for ((sid, addr), id) in self.book.backend_ids.range((p.id, MIN_ADDR)..) {
                if *sid != p.id {
                    break;
                }
                let mut backend = LbBackend::new(addr.ip(), addr.port());
                if active.contains(addr) {
                    backend.flags = BACKEND_F_ACTIVE;
                }
                self.maps.set_backend(*id, backend)?;
            }
            self.maps.set_service(
                p.key,
                LbService {
                    id: p.id,
                    flags,
                    affinity_timeout_s,
                    pad: 0,
                },
            )?;
        }
        Ok(())
    }

    /// Announces the VIPs whose lease this host holds and withdraws the others; returns those
    /// newly taken over (send gratuitous ARP / unsolicited NA for them).
    pub fn announce(&mut self) -> Result<Vec<IpAddr>, LbError> {
        let wanted: BTreeSet<IpAddr> = self.book.services.values().map(|s| s.vip).collect();
        self.announcer.sync(self.maps.as_mut(), &wanted)
    }
}

/// `CLOCK_MONOTONIC` in nanoseconds: the clock of `bpf_ktime_get_ns()`.
pub fn monotonic_ns() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|t| t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests;
