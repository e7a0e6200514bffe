//! What the LB controller owns, apart from the maps: its services with their VIPs, the ids
//! their ports and backends have in the maps, and the backends that drain; and the saved form
//! of all that ([`crate::state`]). The controller changes a copy, saves it, then swaps it in
//! and writes the difference to the maps, so a rejected change leaves nothing behind and the
//! maps never hold what the saved state does not know. Pure.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::time::Instant;

use ipnetwork::IpNetwork;
use slipway_dataplane::abi::lb::{LbServiceKey, MAX_BACKENDS, MAX_SERVICES};

use crate::LbError;
use crate::config::{ServicePort, ServiceSpec, TrafficPolicy};
use crate::health::Health;
use crate::pool::{Pools, PortKey};
use crate::state::{SavedBackend, SavedPort, SavedService, SavedState};
use crate::status::BackendState;

/// The id ranges the controller hands out: the sizes of the maps they index.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Service ports (`lb_services`, rings, service counters).
    pub services: u32,
    /// Backend ids, 0 excluded (`lb_backends`, backend counters).
    pub backends: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            services: MAX_SERVICES,
            backends: MAX_BACKENDS,
        }
    }
}

#[derive(Debug, Clone)]
pub(crate) struct PortState {
    pub(crate) port: ServicePort,
    pub(crate) key: LbServiceKey,
    pub(crate) id: u32,
}

#[derive(Debug, Clone)]
pub(crate) struct ServiceState {
    pub(crate) spec: ServiceSpec,
    pub(crate) vip: IpAddr,
    pub(crate) ports: Vec<PortState>,
    pub(crate) ranges: Vec<IpNetwork>,
    pub(crate) health: BTreeMap<IpAddr, Health>,
    pub(crate) drained_since: BTreeMap<IpAddr, Instant>,
}

impl ServiceState {
    pub(crate) fn backend_state(&self, ip: IpAddr, weight: u32, node_local: bool) -> BackendState {
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

    /// The backend addresses port `p` sends flows to (every backend but those eTP Local
    /// excludes).
    pub(crate) fn used_addrs(&self, p: &PortState) -> BTreeSet<SocketAddr> {
        self.spec
            .backends
            .iter()
            .filter(|b| self.backend_state(b.ip, b.weight, b.node_local) != BackendState::NotLocal)
            .map(|b| SocketAddr::new(b.ip, p.port.target()))
            .collect()
    }
}

/// A backend that left its service port but still carries flows (Katran and Cilium keep such
/// flows on their backend): its id stays in `lb_backends` until its flows end, its health
/// check fails or the service's drain timeout passes.
#[derive(Debug, Clone)]
pub(crate) struct Drain {
    pub(crate) service: String,
    pub(crate) since: Instant,
}

/// (service id, backend address): what a backend id is given for. Each service port has ids
/// of its own, so services sharing a backend address never share counters.
pub(crate) type BackendKey = (u32, SocketAddr);

/// What the controller owns: services, VIPs and ids. Changes are made on a copy, saved, then
/// swapped in and written to the maps (the controller's `commit` and `write`).
#[derive(Debug, Clone)]
pub(crate) struct Book {
    pub(crate) pools: Pools,
    pub(crate) services: BTreeMap<String, ServiceState>,
    pub(crate) free_ids: BTreeSet<u32>,
    pub(crate) backend_ids: BTreeMap<BackendKey, u32>,
    pub(crate) draining: BTreeMap<BackendKey, Drain>,
    pub(crate) next_backend: u32,
}

impl Book {
    pub(crate) fn new(pools: Pools, limits: Limits) -> Self {
        Self {
            pools,
            services: BTreeMap::new(),
            free_ids: (0..limits.services).collect(),
            backend_ids: BTreeMap::new(),
            draining: BTreeMap::new(),
            next_backend: 1,
        }
    }

    /// The id of backend `key`, assigned on first use. Ids are handed out round-robin so a
    /// freed id is reused as late as possible (a reply still in flight counts to its owner).
    pub(crate) fn backend_id(&mut self, key: BackendKey, limit: u32) -> Result<u32, LbError> {
        if let Some(id) = self.backend_ids.get(&key) {
            return Ok(*id);
        }
        let used: BTreeSet<u32> = self.backend_ids.values().copied().collect();
        for _ in 1..limit {
            let id = self.next_backend;
            self.next_backend = if id + 1 >= limit { 1 } else { id + 1 };
            if !used.contains(&id) {
                self.backend_ids.insert(key, id);
                return Ok(id);
            }
        }
        Err(LbError::Capacity(
            "no free backend id (raise --max-backends)",
        ))
    }

    /// Forgets draining backend `key` and its id.
    pub(crate) fn release(&mut self, key: &BackendKey) {
        if let Some(d) = self.draining.remove(key) {
            self.track_health(&d.service);
        }
        self.backend_ids.remove(key);
    }

    /// Keeps health state (and so health checks) for `service`'s backends and its draining
    /// ones, and for no others.
    pub(crate) fn track_health(&mut self, service: &str) {
        let draining: BTreeSet<IpAddr> = self
            .draining
            .iter()
            .filter(|(_, d)| d.service == service)
            .map(|((_, a), _)| a.ip())
            .collect();
        let Some(state) = self.services.get_mut(service) else {
            return;
        };
        let listed: BTreeSet<IpAddr> = state.spec.backends.iter().map(|b| b.ip).collect();
        state
            .health
            .retain(|ip, _| listed.contains(ip) || draining.contains(ip));
        for ip in listed.into_iter().chain(draining) {
            state.health.entry(ip).or_default();
        }
    }

    pub(crate) fn port(&self, id: u32) -> Option<(&ServiceState, &PortState)> {
        self.services
            .values()
            .find_map(|s| s.ports.iter().find(|p| p.id == id).map(|p| (s, p)))
    }

    pub(crate) fn saved(&self) -> SavedState {
        SavedState {
            version: 0,
            services: self
                .services
                .values()
                .map(|s| SavedService {
                    spec: s.spec.clone(),
                    vip: s.vip,
                    ports: s
                        .ports
                        .iter()
                        .map(|p| SavedPort {
                            protocol: p.port.protocol,
                            port: p.port.port,
                            id: p.id,
                        })
                        .collect(),
                })
                .collect(),
            backends: self
                .backend_ids
                .iter()
                .map(|(key, id)| SavedBackend {
                    service_id: key.0,
                    addr: key.1,
                    id: *id,
                    draining: self.draining.contains_key(key),
                })
                .collect(),
            next_backend: self.next_backend,
        }
    }

    /// The book a saved state describes; refuses ids outside `limits` or used twice, and
    /// VIPs the pools no longer hold.
    pub(crate) fn from_saved(
        saved: SavedState,
        pools: Pools,
        limits: Limits,
    ) -> Result<Self, LbError> {
        let mut book = Self::new(pools, limits);
        let now = Instant::now();
        let bad = |problem: String| LbError::Invalid {
            what: "saved LB state",
            errors: vec![slipway_api::FieldError::new(
                "services",
                slipway_api::FieldReason::Invalid,
                problem,
            )],
        };
        for s in saved.services {
            s.spec.validate()?;
            let key = s.spec.key();
            let ports: BTreeSet<PortKey> =
                s.spec.ports.iter().map(|p| (p.protocol, p.port)).collect();
            book.pools
                .allocate(&key, s.spec.family(), Some(s.vip), &ports)?;
            let mut states = Vec::new();
            for sp in &s.ports {
                let port = s
                    .spec
                    .ports
                    .iter()
                    .find(|p| p.protocol == sp.protocol && p.port == sp.port)
                    .ok_or_else(|| bad(format!("{key}: no port {}", sp.port)))?;
                if !book.free_ids.remove(&sp.id) {
                    return Err(bad(format!(
                        "{key}: service id {} used twice or beyond --max-services {}",
                        sp.id, limits.services
                    )));
                }
                states.push(PortState {
                    port: port.clone(),
                    key: LbServiceKey::new(s.vip, port.port, port.protocol.number()),
                    id: sp.id,
                });
            }
            let state = ServiceState {
                health: s
                    .spec
                    .backends
                    .iter()
                    .map(|b| (b.ip, Health::default()))
                    .collect(),
                drained_since: s
                    .spec
                    .backends
                    .iter()
                    .filter(|b| b.weight == 0)
                    .map(|b| (b.ip, now))
                    .collect(),
                ranges: s.spec.source_ranges(),
                spec: s.spec,
                vip: s.vip,
                ports: states,
            };
            book.services.insert(key, state);
        }
        for b in saved.backends {
            let Some(service) = book
                .services
                .iter()
                .find(|(_, s)| s.ports.iter().any(|p| p.id == b.service_id))
                .map(|(name, _)| name.clone())
            else {
                continue;
            };
            if b.id == 0 || b.id >= limits.backends || book.backend_ids.values().any(|i| *i == b.id)
            {
                return Err(bad(format!(
                    "backend id {} used twice or beyond --max-backends {}",
                    b.id, limits.backends
                )));
            }
            let key = (b.service_id, b.addr);
            book.backend_ids.insert(key, b.id);
            if b.draining {
                book.draining.insert(
                    key,
                    Drain {
                        service,
                        since: now,
                    },
                );
            }
        }
        book.next_backend = saved.next_backend.clamp(1, limits.backends.max(2) - 1);
        let names: Vec<String> = book.services.keys().cloned().collect();
        for name in names {
            book.track_health(&name);
        }
        Ok(book)
    }
}
