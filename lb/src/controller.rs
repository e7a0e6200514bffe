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
    FLOW_OPEN, LbBackend, LbFlowKey, LbService, LbServiceKey, MAGLEV_SIZE, MAX_BACKENDS,
    MAX_SERVICES, SERVICE_F_LOCAL, SERVICE_F_SOURCE_RANGES,
};
use tracing::{info, warn};

use crate::LbError;
use crate::announce::Announcer;
use crate::config::{HealthCheckSpec, Protocol, ServicePort, ServiceSpec, TrafficPolicy};
use crate::health::Health;
use crate::maglev::{self, Table, Weighted};
use crate::maps::LbMaps;
use crate::pool::{Pools, PortKey};
use crate::status::{BackendState, BackendStatus, PoolStatus, PortStatus, ServiceStatus, Status};

/// A TCP flow with no packet for this long no longer counts as active in the status.
const TCP_IDLE: Duration = Duration::from_secs(600);
/// Likewise for UDP.
const UDP_IDLE: Duration = Duration::from_secs(60);

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

#[derive(Debug)]
struct PortState {
    port: ServicePort,
    key: LbServiceKey,
    id: u32,
    /// Backend id per ring slot, as last written.
    ring: Option<Vec<u32>>,
    /// Slots per backend address.
    shares: BTreeMap<IpAddr, u64>,
}

#[derive(Debug)]
struct ServiceState {
    spec: ServiceSpec,
    vip: IpAddr,
    ports: Vec<PortState>,
    ranges: Vec<IpNetwork>,
    health: BTreeMap<IpAddr, Health>,
    drained_since: BTreeMap<IpAddr, Instant>,
}

impl ServiceState {
    fn backend_state(&self, ip: IpAddr, weight: u32, node_local: bool) -> BackendState {
        if self.spec.external_traffic_policy == TrafficPolicy::Local && !node_local {
            BackendState::NotLocal
        } else if !self.health.get(&ip).is_none_or(|h| h.healthy) {
            BackendState::Unhealthy
        } else if weight == 0 {
            BackendState::Draining
        } else {
            BackendState::Active
        }
    }
}

/// The controller. Not thread-safe by itself: the daemon holds it behind a mutex.
pub struct Controller {
    maps: Box<dyn LbMaps>,
    pools: Pools,
    announcer: Announcer,
    services: BTreeMap<String, ServiceState>,
    free_ids: BTreeSet<u32>,
    backend_ids: BTreeMap<SocketAddr, u32>,
    next_backend: u32,
    maglev_size: u32,
}

impl std::fmt::Debug for Controller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Controller")
            .field("services", &self.services.keys().collect::<Vec<_>>())
            .field("announced", self.announcer.announced())
            .finish_non_exhaustive()
    }
}

impl Controller {
    pub fn new(maps: Box<dyn LbMaps>, pools: Pools, announcer: Announcer) -> Self {
        Self {
            maps,
            pools,
            announcer,
            services: BTreeMap::new(),
            free_ids: (0..MAX_SERVICES).collect(),
            backend_ids: BTreeMap::new(),
            next_backend: 1,
            maglev_size: MAGLEV_SIZE,
        }
    }

    /// Creates or updates a service. Input is validated and the VIP and ids are reserved
    /// before anything is written, so a rejected request changes nothing.
    pub fn apply(&mut self, spec: ServiceSpec) -> Result<Applied, LbError> {
        spec.validate()?;
        let key = spec.key();
        let ports: BTreeSet<PortKey> = spec.ports.iter().map(|p| (p.protocol, p.port)).collect();
        let old = self.services.get(&key);
        let reused = old.map_or(0, |o| {
            o.ports
                .iter()
                .filter(|p| ports.contains(&(p.port.protocol, p.port.port)))
                .count()
        });
        let freed = old.map_or(0, |o| o.ports.len()) - reused;
        if ports.len() - reused > self.free_ids.len() + freed {
            return Err(LbError::Capacity("no free service id (LB_MAX_SERVICES)"));
        }
        let vip = self
            .pools
            .allocate(&key, spec.family(), spec.load_balancer_ip, &ports)?;

        let old = self.services.remove(&key);
        let (mut old_ports, health, mut drained_since, old_ranges, old_vip) = match old {
            Some(o) => (o.ports, o.health, o.drained_since, o.ranges, Some(o.vip)),
            None => Default::default(),
        };
        let mut new_ports = Vec::new();
        for port in &spec.ports {
            let reuse = old_ports
                .iter()
                .position(|p| p.port.protocol == port.protocol && p.port.port == port.port)
                .filter(|_| old_vip == Some(vip));
            let state = match reuse {
                Some(i) => {
                    let mut p = old_ports.remove(i);
                    p.port = port.clone();
                    p
                }
                None => {
                    let id = self
                        .free_ids
                        .pop_first()
                        .ok_or(LbError::Capacity("no free service id (LB_MAX_SERVICES)"))?;
                    PortState {
                        port: port.clone(),
                        key: LbServiceKey::new(vip, port.port, port.protocol.number()),
                        id,
                        ring: None,
                        shares: BTreeMap::new(),
                    }
                }
            };
            new_ports.push(state);
        }
        for gone in old_ports {
            self.retire_port(&gone, &old_ranges)?;
        }
        let now = Instant::now();
        let health = spec
            .backends
            .iter()
            .map(|b| (b.ip, health.get(&b.ip).copied().unwrap_or_default()))
            .collect();
        drained_since.retain(|ip, _| spec.backends.iter().any(|b| b.ip == *ip && b.weight == 0));
        for b in spec.backends.iter().filter(|b| b.weight == 0) {
            drained_since.entry(b.ip).or_insert(now);
        }
        let ranges = spec.source_ranges();
        // Ports kept from before carry the old ranges in the map; ports new here carry none.
        let kept_ids: BTreeSet<u32> = new_ports
            .iter()
            .filter(|p| p.ring.is_some())
            .map(|p| p.id)
            .collect();
        for port in &new_ports {
            if kept_ids.contains(&port.id) {
                for net in old_ranges.iter().filter(|n| !ranges.contains(n)) {
                    self.maps.remove_source_range(port.id, *net)?;
                }
            }
            for net in &ranges {
                if !kept_ids.contains(&port.id) || !old_ranges.contains(net) {
                    self.maps.add_source_range(port.id, *net)?;
                }
            }
        }
        info!(service = %key, %vip, ports = new_ports.len(), "service applied");
        self.services.insert(
            key.clone(),
            ServiceState {
                spec,
                vip,
                ports: new_ports,
                ranges,
                health,
                drained_since,
            },
        );
        self.program(&key)?;
        self.collect_backends()?;
        let taken_over = self.announce()?;
        Ok(Applied { vip, taken_over })
    }

    /// Deletes a service; its VIP returns to the pool unless another service shares it.
    pub fn delete(&mut self, namespace: &str, name: &str) -> Result<(), LbError> {
        let key = crate::config::service_name(namespace, name);
        let state = self
            .services
            .remove(&key)
            .ok_or_else(|| LbError::NotFound(key.clone()))?;
        for port in &state.ports {
            self.retire_port(port, &state.ranges)?;
        }
        let released = self.pools.release(&key);
        info!(service = %key, vip = %state.vip, ?released, "service deleted");
        self.collect_backends()?;
        self.announce()?;
        Ok(())
    }

    /// Records a health-check result; rebuilds the service's rings when the backend's state
    /// changed. Returns the new state on a change.
    pub fn observe_health(
        &mut self,
        service: &str,
        ip: IpAddr,
        ok: bool,
    ) -> Result<Option<bool>, LbError> {
        let Some(state) = self.services.get_mut(service) else {
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
        }
        Ok(changed)
    }

    /// Every health check to run.
    pub fn health_targets(&self) -> Vec<HealthTarget> {
        let mut targets = Vec::new();
        for (name, s) in &self.services {
            let (Some(check), Some(port)) = (&s.spec.health_check, s.spec.health_port()) else {
                continue;
            };
            let HealthCheckSpec {
                interval_ms,
                timeout_ms,
                http_path,
                ..
            } = check;
            for b in &s.spec.backends {
                targets.push(HealthTarget {
                    service: name.clone(),
                    ip: b.ip,
                    addr: SocketAddr::new(b.ip, port),
                    interval: Duration::from_millis(*interval_ms),
                    timeout: Duration::from_millis(*timeout_ms),
                    http_path: http_path.clone(),
                });
            }
        }
        targets
    }

    /// Periodic work: ends the flows of backends drained longer than their service's drain
    /// timeout, and re-checks the announcement lease. Returns VIPs newly taken over.
    pub fn tick(&mut self, now: Instant) -> Result<Vec<IpAddr>, LbError> {
        let mut expired: BTreeSet<(u32, u32)> = BTreeSet::new();
        for s in self.services.values() {
            let Some(limit) = s.spec.drain_timeout_secs.map(Duration::from_secs) else {
                continue;
            };
            for (ip, since) in &s.drained_since {
                if now.duration_since(*since) < limit {
                    continue;
                }
                for p in &s.ports {
                    if let Some(id) = self.backend_ids.get(&SocketAddr::new(*ip, p.port.target())) {
                        expired.insert((p.id, *id));
                    }
                }
            }
        }
        if !expired.is_empty() {
            let backends: BTreeMap<u32, SocketAddr> =
                self.backend_ids.iter().map(|(a, id)| (*id, *a)).collect();
            for (key, flow) in self.maps.flows()? {
                if !expired.contains(&(flow.service_id, flow.backend_id)) {
                    continue;
                }
                let Some(backend) = backends.get(&flow.backend_id) else {
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
        }
        self.announce()
    }

    /// The status of every service, backend and pool.
    pub fn status(&self, now_ns: u64) -> Result<Status, LbError> {
        // (service id, backend id) -> active flows.
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
        let mut services = Vec::new();
        for (name, s) in &self.services {
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
            let mut backends = Vec::new();
            for b in &s.spec.backends {
                let state = s.backend_state(b.ip, b.weight, b.node_local);
                let mut status = BackendStatus {
                    ip: b.ip,
                    weight: b.weight,
                    state,
                    healthy: s.health.get(&b.ip).is_none_or(|h| h.healthy),
                    slots: 0,
                    active_flows: 0,
                    flows_total: 0,
                    packets: 0,
                    bytes: 0,
                };
                let mut seen = BTreeSet::new();
                for p in &s.ports {
                    status.slots += p.shares.get(&b.ip).copied().unwrap_or(0);
                    let Some(id) = self
                        .backend_ids
                        .get(&SocketAddr::new(b.ip, p.port.target()))
                    else {
                        continue;
                    };
                    status.active_flows += active.get(&(p.id, *id)).copied().unwrap_or(0);
                    if seen.insert(*id) {
                        let stats = self.maps.backend_stats(*id)?;
                        status.flows_total += stats.flows;
                        status.packets += stats.packets;
                        status.bytes += stats.bytes;
                    }
                }
                backends.push(status);
            }
            services.push(ServiceStatus {
                name: name.clone(),
                vip: s.vip,
                external_traffic_policy: s.spec.external_traffic_policy,
                source_ranges: s.spec.load_balancer_source_ranges.clone(),
                ports,
                backends,
            });
        }
        let pools = self
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
        })
    }

    /// The VIPs announced now.
    pub fn announced(&self) -> &BTreeSet<IpAddr> {
        self.announcer.announced()
    }

    /// The maps, for callers that read or drive the datapath directly.
    pub fn maps(&mut self) -> &mut dyn LbMaps {
        self.maps.as_mut()
    }

    /// Writes service `name`'s rings, backends and service entries.
    fn program(&mut self, name: &str) -> Result<(), LbError> {
        let Some(state) = self.services.get(name) else {
            return Ok(());
        };
        let mut backends_in_use = Vec::new();
        let mut rings = Vec::new();
        for p in &state.ports {
            let target = p.port.target();
            let mut weighted = Vec::new();
            let mut ids = Vec::new();
            for b in &state.spec.backends {
                let st = state.backend_state(b.ip, b.weight, b.node_local);
                if st == BackendState::NotLocal {
                    continue;
                }
                let addr = SocketAddr::new(b.ip, target);
                backends_in_use.push(addr);
                weighted.push(Weighted {
                    name: addr.to_string(),
                    weight: if st == BackendState::Active {
                        b.weight
                    } else {
                        0
                    },
                });
                ids.push(addr);
            }
            let table = Table::build(&weighted, self.maglev_size)?;
            rings.push((p.id, table, ids));
        }
        for addr in &backends_in_use {
            self.backend_id(*addr)?;
        }
        let Some(state) = self.services.get_mut(name) else {
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
        };
        for (p, (id, table, addrs)) in state.ports.iter_mut().zip(rings) {
            debug_assert_eq!(p.id, id);
            let ring: Vec<u32> = table
                .slots()
                .iter()
                .map(|&i| {
                    if i == maglev::EMPTY {
                        0
                    } else {
                        addrs
                            .get(i as usize)
                            .and_then(|a| self.backend_ids.get(a))
                            .copied()
                            .unwrap_or(0)
                    }
                })
                .collect();
            let changed = maglev::changed_slots(p.ring.as_deref(), &ring);
            self.maps.write_ring(p.id, &changed)?;
            p.shares = table
                .shares(addrs.len())
                .into_iter()
                .zip(&addrs)
                .map(|(n, a)| (a.ip(), n as u64))
                .collect();
            p.ring = Some(ring);
            self.maps
                .set_service(p.key, LbService { id: p.id, flags })?;
        }
        Ok(())
    }

    /// The id of backend `addr`, assigned on first use. Ids are handed out round-robin so a
    /// freed id is reused as late as possible (a flow still pinned to it would follow).
    fn backend_id(&mut self, addr: SocketAddr) -> Result<u32, LbError> {
        if let Some(id) = self.backend_ids.get(&addr) {
            return Ok(*id);
        }
        let used: BTreeSet<u32> = self.backend_ids.values().copied().collect();
        for _ in 1..MAX_BACKENDS {
            let id = self.next_backend;
            self.next_backend = if id + 1 >= MAX_BACKENDS { 1 } else { id + 1 };
            if !used.contains(&id) {
                self.maps
                    .set_backend(id, LbBackend::new(addr.ip(), addr.port()))?;
                self.backend_ids.insert(addr, id);
                return Ok(id);
            }
        }
        Err(LbError::Capacity("no free backend id (LB_MAX_BACKENDS)"))
    }

    /// Clears backends no service uses any more.
    fn collect_backends(&mut self) -> Result<(), LbError> {
        let mut used = BTreeSet::new();
        for s in self.services.values() {
            for p in &s.ports {
                for b in &s.spec.backends {
                    if s.backend_state(b.ip, b.weight, b.node_local) != BackendState::NotLocal {
                        used.insert(SocketAddr::new(b.ip, p.port.target()));
                    }
                }
            }
        }
        let gone: Vec<(SocketAddr, u32)> = self
            .backend_ids
            .iter()
            .filter(|(a, _)| !used.contains(a))
            .map(|(a, id)| (*a, *id))
            .collect();
        for (addr, id) in gone {
            self.maps.set_backend(id, LbBackend::default())?;
            self.backend_ids.remove(&addr);
        }
        Ok(())
    }

    /// Removes a port's service entry and source ranges and frees its id. Its ring stays as
    /// it is: nothing reaches it without the service entry, and the next user rewrites it.
    fn retire_port(&mut self, port: &PortState, ranges: &[IpNetwork]) -> Result<(), LbError> {
        self.maps.remove_service(&port.key)?;
        for net in ranges {
            self.maps.remove_source_range(port.id, *net)?;
        }
        self.free_ids.insert(port.id);
        Ok(())
    }

    fn announce(&mut self) -> Result<Vec<IpAddr>, LbError> {
        let wanted: BTreeSet<IpAddr> = self.services.values().map(|s| s.vip).collect();
        self.announcer.sync(self.maps.as_mut(), &wanted)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use slipway_dataplane::abi::CounterValue;
    use std::net::{Ipv4Addr, Ipv6Addr};

    use slipway_dataplane::abi::lb::{LbAddr, LbConfig as ConfigValue, LbFlow, LbReason, LbStats};

    use super::*;
    use crate::announce::StaticLease;
    use crate::config::{BackendSpec, LbConfig, PoolConfig};

    /// The maps in memory, counting ring writes.
    #[derive(Debug, Default)]
    struct Fake {
        services: BTreeMap<(LbAddr, u16, u8), LbService>,
        backends: BTreeMap<u32, LbBackend>,
        rings: BTreeMap<u32, Vec<u32>>,
        ring_writes: usize,
        ranges: BTreeSet<(u32, IpNetwork)>,
        vips: BTreeSet<IpAddr>,
        flows: Vec<(LbFlowKey, LbFlow)>,
        removed_flows: Vec<LbFlowKey>,
    }

    impl LbMaps for Fake {
        fn set_config(&mut self, _: ConfigValue) -> Result<(), LbError> {
            Ok(())
        }
        fn set_service(&mut self, key: LbServiceKey, value: LbService) -> Result<(), LbError> {
            self.services.insert((key.vip, key.port, key.proto), value);
            Ok(())
        }
        fn remove_service(&mut self, key: &LbServiceKey) -> Result<(), LbError> {
            self.services.remove(&(key.vip, key.port, key.proto));
            Ok(())
        }
        fn set_backend(&mut self, id: u32, backend: LbBackend) -> Result<(), LbError> {
            self.backends.insert(id, backend);
            Ok(())
        }
        fn write_ring(&mut self, id: u32, slots: &[(u32, u32)]) -> Result<(), LbError> {
            let ring = self
                .rings
                .entry(id)
                .or_insert_with(|| vec![0; MAGLEV_SIZE as usize]);
            for (slot, backend) in slots {
                ring[*slot as usize] = *backend;
            }
            self.ring_writes += slots.len();
            Ok(())
        }
        fn add_source_range(&mut self, id: u32, net: IpNetwork) -> Result<(), LbError> {
            self.ranges.insert((id, net));
            Ok(())
        }
        fn remove_source_range(&mut self, id: u32, net: IpNetwork) -> Result<(), LbError> {
            self.ranges.remove(&(id, net));
            Ok(())
        }
        fn add_vip(&mut self, vip: IpAddr) -> Result<(), LbError> {
            self.vips.insert(vip);
            Ok(())
        }
        fn remove_vip(&mut self, vip: IpAddr) -> Result<(), LbError> {
            self.vips.remove(&vip);
            Ok(())
        }
        fn flows(&self) -> Result<Vec<(LbFlowKey, LbFlow)>, LbError> {
            Ok(self.flows.clone())
        }
        fn remove_flow(&mut self, forward: &LbFlowKey, _: &LbFlowKey) -> Result<(), LbError> {
            self.removed_flows.push(*forward);
            Ok(())
        }
        fn backend_stats(&self, _: u32) -> Result<LbStats, LbError> {
            Ok(LbStats::default())
        }
        fn service_stats(&self, _: u32) -> Result<LbStats, LbError> {
            Ok(LbStats::default())
        }
        fn counters(&self) -> Result<BTreeMap<LbReason, CounterValue>, LbError> {
            Ok(BTreeMap::new())
        }
    }

    fn controller() -> (Controller, Arc<Mutex<Fake>>) {
        let fake = Arc::new(Mutex::new(Fake::default()));
        let pools = Pools::from_config(&LbConfig::new(
            "eth0",
            vec![
                PoolConfig {
                    name: "p".into(),
                    cidr: "10.99.100.0/24".into(),
                },
                PoolConfig {
                    name: "p6".into(),
                    cidr: "fd99:100::/120".into(),
                },
            ],
        ))
        .expect("pools");
        let c = Controller::new(
            Box::new(fake.clone()),
            pools,
            Announcer::new(Arc::new(StaticLease)),
        );
        (c, fake)
    }

    fn spec(backends: &[(u8, u32)]) -> ServiceSpec {
        ServiceSpec {
            namespace: "default".into(),
            name: "web".into(),
            ip_families: Vec::new(),
            ports: vec![ServicePort {
                name: None,
                protocol: Protocol::Tcp,
                port: 80,
                target_port: 8080,
            }],
            load_balancer_ip: None,
            load_balancer_source_ranges: vec!["10.0.0.0/8".into()],
            external_traffic_policy: TrafficPolicy::Cluster,
            backends: backends
                .iter()
                .map(|(last, weight)| BackendSpec {
                    ip: Ipv4Addr::new(10, 99, 0, *last).into(),
                    weight: *weight,
                    node_local: false,
                })
                .collect(),
            health_check: None,
            drain_timeout_secs: None,
        }
    }

    fn fake(f: &Arc<Mutex<Fake>>) -> std::sync::MutexGuard<'_, Fake> {
        f.lock().unwrap_or_else(|p| p.into_inner())
    }

    #[test]
    fn only_changed_slots_are_written_and_backend_ids_stay() {
        let (mut c, f) = controller();
        let applied = c.apply(spec(&[(3, 1), (4, 1), (5, 1)])).expect("apply");
        assert_eq!(applied.vip, IpAddr::V4(Ipv4Addr::new(10, 99, 100, 1)));
        assert_eq!(applied.taken_over, vec![applied.vip]);
        let (writes, ids) = {
            let f = fake(&f);
            (f.ring_writes, f.backends.clone())
        };
        assert_eq!(writes, MAGLEV_SIZE as usize, "a new ring is written whole");
        assert_eq!(ids.len(), 3);

        // Applying the same spec again writes nothing.
        c.apply(spec(&[(3, 1), (4, 1), (5, 1)])).expect("again");
        assert_eq!(fake(&f).ring_writes, writes);

        // A fourth backend takes about a quarter of the ring: only those slots are written,
        // and the existing backends keep their ids.
        let applied = c
            .apply(spec(&[(3, 1), (4, 1), (5, 1), (6, 1)]))
            .expect("add");
        assert!(
            applied.taken_over.is_empty(),
            "the VIP was announced already"
        );
        let f = fake(&f);
        let written = f.ring_writes - writes;
        let quarter = MAGLEV_SIZE as usize / 4;
        assert!(
            written >= quarter && written <= quarter + MAGLEV_SIZE as usize / 100,
            "{written}"
        );
        for (id, backend) in &ids {
            assert_eq!(f.backends.get(id), Some(backend));
        }
        let ring = &f.rings[&0];
        assert!(
            ring.iter()
                .all(|id| *id != 0 && f.backends.contains_key(id))
        );
        assert!(f.ranges.contains(&(0, "10.0.0.0/8".parse().expect("net"))));
        let service = f.services.values().next().expect("service");
        assert_eq!(service.flags, SERVICE_F_SOURCE_RANGES);
    }

    #[test]
    fn drained_backends_keep_their_id_but_leave_the_ring_and_time_out() {
        let (mut c, f) = controller();
        let mut s = spec(&[(3, 1), (4, 0)]);
        s.drain_timeout_secs = Some(5);
        c.apply(s).expect("apply");
        let drained = LbBackend::new(Ipv4Addr::new(10, 99, 0, 4).into(), 8080);
        let id = {
            let f = fake(&f);
            let id = *f
                .backends
                .iter()
                .find(|(_, b)| **b == drained)
                .expect("id")
                .0;
            assert!(
                !f.rings[&0].contains(&id),
                "no slot for the drained backend"
            );
            id
        };
        let key = LbFlowKey {
            src: Ipv4Addr::new(10, 99, 0, 1).into(),
            dst: Ipv4Addr::new(10, 99, 100, 1).into(),
            sport: 40000u16.to_be(),
            dport: 80u16.to_be(),
            proto: 6,
            pad: [0; 3],
        };
        fake(&f).flows.push((
            key,
            LbFlow {
                backend_id: id,
                service_id: 0,
                nat_ip: LbAddr::NONE,
                nat_port: 0,
                state: FLOW_OPEN,
                pad: 0,
                pad2: 0,
                last_seen_ns: 0,
            },
        ));
        c.tick(Instant::now()).expect("tick");
        assert!(fake(&f).removed_flows.is_empty(), "within the timeout");
        c.tick(Instant::now() + Duration::from_secs(6))
            .expect("tick");
        assert_eq!(fake(&f).removed_flows, vec![key], "ended at the timeout");
    }

    #[test]
    fn unhealthy_backends_leave_the_ring_and_deleting_releases_everything() {
        let (mut c, f) = controller();
        let mut s = spec(&[(3, 1), (4, 1)]);
        s.health_check = Some(HealthCheckSpec {
            interval_ms: 100,
            timeout_ms: 50,
            rise: 1,
            fall: 2,
            port: None,
            http_path: None,
        });
        c.apply(s).expect("apply");
        assert_eq!(c.health_targets().len(), 2);
        assert_eq!(c.health_targets()[0].addr.port(), 8080);
        let down = IpAddr::V4(Ipv4Addr::new(10, 99, 0, 4));
        assert_eq!(
            c.observe_health("default/web", down, false).expect("probe"),
            None
        );
        assert_eq!(
            c.observe_health("default/web", down, false).expect("probe"),
            Some(false)
        );
        {
            let f = fake(&f);
            let ids: BTreeSet<u32> = f.rings[&0].iter().copied().collect();
            assert_eq!(ids.len(), 1, "one backend left in the ring");
        }
        assert_eq!(
            c.observe_health("default/web", down, true).expect("probe"),
            Some(true)
        );
        assert_eq!(
            fake(&f).rings[&0]
                .iter()
                .copied()
                .collect::<BTreeSet<_>>()
                .len(),
            2
        );

        c.delete("default", "web").expect("delete");
        let f = fake(&f);
        assert!(f.services.is_empty() && f.vips.is_empty() && f.ranges.is_empty());
        assert!(f.backends.values().all(|b| *b == LbBackend::default()));
        assert!(matches!(
            c.delete("default", "web"),
            Err(LbError::NotFound(_))
        ));
    }

    #[test]
    fn an_ipv6_service_gets_an_ipv6_vip_backends_and_ranges() {
        let (mut c, f) = controller();
        let b6 = |last: u16| IpAddr::V6(Ipv6Addr::new(0xfd99, 0, 0, 0, 0, 0, 0, last));
        let mut s = spec(&[]);
        s.backends = [3, 4, 5]
            .into_iter()
            .map(|last| BackendSpec {
                ip: b6(last),
                weight: 1,
                node_local: false,
            })
            .collect();
        s.load_balancer_source_ranges = vec!["fd99::/64".into()];
        let applied = c.apply(s.clone()).expect("apply");
        let vip: IpAddr = "fd99:100::1".parse().expect("vip");
        assert_eq!(applied.vip, vip, "the family follows the backends");
        assert_eq!(applied.taken_over, vec![vip]);
        {
            let f = fake(&f);
            let (key, service) = f.services.iter().next().expect("service");
            assert_eq!(key.0, LbAddr::from(vip));
            assert_eq!(service.flags, SERVICE_F_SOURCE_RANGES);
            let ips: BTreeSet<IpAddr> = f.backends.values().map(|b| b.ip.ip()).collect();
            assert_eq!(ips, [b6(3), b6(4), b6(5)].into_iter().collect());
            assert!(f.ranges.contains(&(0, "fd99::/64".parse().expect("net"))));
            assert!(f.vips.contains(&vip));
        }
        let targets = {
            let mut s = s.clone();
            s.health_check = Some(HealthCheckSpec {
                interval_ms: 100,
                timeout_ms: 50,
                rise: 1,
                fall: 1,
                port: None,
                http_path: None,
            });
            c.apply(s).expect("with checks");
            c.health_targets()
        };
        assert_eq!(
            targets[0].addr,
            SocketAddr::new(b6(3), 8080),
            "health checks probe the IPv6 backends"
        );

        // An IPv4 service beside it takes an IPv4 address; the status shows both.
        let mut v4 = spec(&[(3, 1)]);
        v4.name = "web4".into();
        assert_eq!(
            c.apply(v4).expect("v4").vip,
            IpAddr::V4(Ipv4Addr::new(10, 99, 100, 1))
        );
        let status = c.status(0).expect("status");
        assert_eq!(status.announced.len(), 2);
        assert!(status.services.iter().any(|s| s.vip == vip));
        assert_eq!(status.pools[1].used, 1);

        // A backend of the other family is rejected naming its field, and nothing changes.
        let mut mixed = s.clone();
        mixed.backends[1].ip = IpAddr::V4(Ipv4Addr::new(10, 99, 0, 4));
        let err = c.apply(mixed).expect_err("mixed families");
        assert!(
            err.to_string()
                .contains("backends[1].ip: 10.99.0.4 is IPv4, the service is IPv6"),
            "{err}"
        );
        c.delete("default", "web").expect("delete");
        assert!(!fake(&f).vips.contains(&vip), "withdrawn");
    }
}
