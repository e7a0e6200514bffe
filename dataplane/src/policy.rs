//! The NetworkPolicy maps of a node (`ebpf/include/policy.h`): what the agent writes after
//! compiling policies, and the ring buffer of verdict events it reads.
//!
//! [`PolicyTables`] is one complete state: identities of addresses, flags of local endpoints,
//! rules. [`PolicyMaps::install`] writes a state into the slot the datapath does not read — by
//! difference with what that slot held — and then flips the generation, so a packet sees the
//! old state or the new one, never a mix. What an older generation decided is decided again by
//! the connection's next packet.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use aya::maps::lpm_trie::{Key, LpmTrie};
use aya::maps::{Array, HashMap, Map, MapData, RingBuf};
use tracing::warn;

use crate::DataplaneError;
use crate::abi::policy::{
    Direction, EndpointFlags, EndpointKey, Identity, IpcacheData, PolicyState, RULE_ANY_PORT,
    RULE_ANY_PROTO, RULE_PORT_BASE, RuleData, RuleValue,
};
use crate::error::{is_not_found, map_error};
use crate::node::Pins;

/// The policy maps, by pin name.
pub const STATE_MAP: &str = "policy_state";
pub const IPCACHE_MAP: &str = "policy_ipcache";
pub const ENDPOINTS_MAP: &str = "policy_endpoints";
pub const RULES_MAP: &str = "policy_rules";
pub const CT_MAP: &str = "policy_ct";
pub const EVENTS_MAP: &str = "policy_events";

/// One rule entry: endpoint `ep` allows, in `direction`, peers of `identity` (or
/// [`crate::abi::policy::IDENTITY_ANY`]) on protocol `proto` (0: any protocol, then any port)
/// and the ports whose first `port_bits` bits equal `port`'s (0: any port).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RuleEntry {
    pub ep: Ipv4Addr,
    pub direction: Direction,
    pub identity: u32,
    pub proto: u8,
    pub port: u16,
    pub port_bits: u8,
}

impl RuleEntry {
    fn key(&self, slot: u8) -> Key<RuleData> {
        let prefix = match (self.proto, self.port_bits) {
            (0, _) => RULE_ANY_PROTO,
            (_, 0) => RULE_ANY_PORT,
            (_, bits) => RULE_PORT_BASE + u32::from(bits.min(16)),
        };
        let data = RuleData {
            slot,
            direction: self.direction as u8,
            ep_ip4: u32::from_ne_bytes(self.ep.octets()),
            identity: self.identity,
            proto: self.proto,
            dport: self.port.to_be(),
            ..RuleData::default()
        };
        Key::new(prefix, data)
    }

    fn from_key(key: &Key<RuleData>) -> Option<(u8, Self)> {
        let data = key.data();
        let prefix = key.prefix_len();
        let (proto, port_bits) = match prefix {
            RULE_ANY_PROTO => (0, 0),
            RULE_ANY_PORT => (data.proto, 0),
            p if (RULE_PORT_BASE + 1..=RULE_PORT_BASE + 16).contains(&p) => {
                (data.proto, u8::try_from(p - RULE_PORT_BASE).ok()?)
            }
            _ => return None,
        };
        Some((
            data.slot,
            Self {
                ep: Ipv4Addr::from(data.ep_ip4.to_ne_bytes()),
                direction: Direction::from_raw(data.direction)?,
                identity: data.identity,
                proto,
                port: if port_bits == 0 {
                    0
                } else {
                    u16::from_be(data.dport)
                },
                port_bits,
            },
        ))
    }
}

/// One complete policy state of a node.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PolicyTables {
    /// Address prefixes -> identity (longest prefix wins).
    pub ipcache: BTreeMap<(Ipv4Addr, u8), u32>,
    /// Local endpoints -> `F_*` flags. An endpoint without an entry is open both ways.
    pub endpoints: BTreeMap<Ipv4Addr, u32>,
    /// Rules -> the rule id reported in events.
    pub rules: BTreeMap<RuleEntry, u32>,
}

/// What [`PolicyMaps::install`] did.
#[derive(Debug, Default)]
pub struct InstallReport {
    pub generation: u32,
    /// Endpoints whose rules the map refused (full): they fail closed in that direction.
    pub failed: BTreeSet<(Ipv4Addr, Direction)>,
    /// Map operations the install made (deletes and inserts): its cost.
    pub writes: usize,
}

/// Handles on the pinned policy maps, and what each slot holds.
pub struct PolicyMaps {
    state: Array<MapData, PolicyState>,
    ipcache: LpmTrie<MapData, IpcacheData, Identity>,
    endpoints: HashMap<MapData, EndpointKey, EndpointFlags>,
    rules: LpmTrie<MapData, RuleData, RuleValue>,
    slots: [PolicyTables; 2],
}

impl std::fmt::Debug for PolicyMaps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PolicyMaps").finish_non_exhaustive()
    }
}

fn open_pin(pins: &Pins, name: &'static str) -> Result<MapData, DataplaneError> {
    MapData::from_pin(pins.map(name)).map_err(|source| map_error(name, "open pin", source))
}

impl PolicyMaps {
    /// Opens the maps pinned under `pins` and reads what both slots hold.
    pub fn open(pins: &Pins) -> Result<Self, DataplaneError> {
        let mut maps = Self {
            state: Array::try_from(Map::Array(open_pin(pins, STATE_MAP)?))
                .map_err(|source| map_error(STATE_MAP, "type", source))?,
            ipcache: LpmTrie::try_from(Map::LpmTrie(open_pin(pins, IPCACHE_MAP)?))
                .map_err(|source| map_error(IPCACHE_MAP, "type", source))?,
            endpoints: HashMap::try_from(Map::HashMap(open_pin(pins, ENDPOINTS_MAP)?))
                .map_err(|source| map_error(ENDPOINTS_MAP, "type", source))?,
            rules: LpmTrie::try_from(Map::LpmTrie(open_pin(pins, RULES_MAP)?))
                .map_err(|source| map_error(RULES_MAP, "type", source))?,
            slots: Default::default(),
        };
        maps.slots = maps.read_slots()?;
        Ok(maps)
    }

    /// The generation the datapath reads; 0 before the first install.
    pub fn generation(&self) -> Result<u32, DataplaneError> {
        self.state
            .get(&0, 0)
            .map(|s| s.generation)
            .map_err(|source| map_error(STATE_MAP, "get", source))
    }

    /// The state the datapath enforces now, as read back from the maps.
    pub fn active(&self) -> Result<PolicyTables, DataplaneError> {
        let generation = self.generation()?;
        let mut slots = self.read_slots()?;
        Ok(std::mem::take(&mut slots[(generation & 1) as usize]))
    }

    fn read_slots(&self) -> Result<[PolicyTables; 2], DataplaneError> {
        let mut slots: [PolicyTables; 2] = Default::default();
        for entry in self.ipcache.iter() {
            let (key, id) = entry.map_err(|source| map_error(IPCACHE_MAP, "iterate", source))?;
            let data = key.data();
            let prefix = key.prefix_len().saturating_sub(IpcacheData::SLOT_BITS);
            if let (Some(slot), Ok(prefix)) =
                (slots.get_mut(usize::from(data.slot)), u8::try_from(prefix))
            {
                slot.ipcache.insert((data.ip(), prefix), id.id);
            }
        }
        for entry in self.endpoints.iter() {
            let (key, flags) =
                entry.map_err(|source| map_error(ENDPOINTS_MAP, "iterate", source))?;
            if let Some(slot) = slots.get_mut(key.slot as usize) {
                slot.endpoints.insert(key.ip(), flags.flags);
            }
        }
        for entry in self.rules.iter() {
            let (key, value) = entry.map_err(|source| map_error(RULES_MAP, "iterate", source))?;
            match RuleEntry::from_key(&key) {
                Some((slot, rule)) if usize::from(slot) < 2 => {
                    slots[usize::from(slot)].rules.insert(rule, value.rule_id);
                }
                _ => warn!(prefix = key.prefix_len(), "unreadable policy rule key"),
            }
        }
        Ok(slots)
    }

    /// Writes `tables` into the inactive slot and makes it the active one. Rules the map
    /// refuses make their endpoint fail closed in that direction (reported); any other failure
    /// leaves the active state as it was.
    pub fn install(&mut self, tables: &PolicyTables) -> Result<InstallReport, DataplaneError> {
        let current = self.generation()?;
        // Skip 0 (no policy) on wrap-around, keeping the parity alternating.
        let next = match current.wrapping_add(1) {
            0 => 2,
            n => n,
        };
        let slot = (next & 1) as u8;
        let mut report = InstallReport {
            generation: next,
            ..InstallReport::default()
        };
        let mut old = std::mem::take(&mut self.slots[usize::from(slot)]);
        let result = self.write_slot(slot, &mut old, tables, &mut report);
        // Whatever happened, `old` now says what the slot holds.
        self.slots[usize::from(slot)] = old;
        result?;
        self.state
            .set(
                0,
                PolicyState {
                    generation: next,
                    pad: 0,
                },
                0,
            )
            .map_err(|source| map_error(STATE_MAP, "set", source))?;
        Ok(report)
    }

    /// Makes slot `slot` (whose content is `held`) equal to `want`, keeping `held` up to date.
    fn write_slot(
        &mut self,
        slot: u8,
        held: &mut PolicyTables,
        want: &PolicyTables,
        report: &mut InstallReport,
    ) -> Result<(), DataplaneError> {
        // Deletes first: they make room for the inserts.
        let stale: Vec<RuleEntry> = held
            .rules
            .keys()
            .filter(|r| !want.rules.contains_key(r))
            .copied()
            .collect();
        for rule in stale {
            remove_ok(self.rules.remove(&rule.key(slot)), RULES_MAP)?;
            held.rules.remove(&rule);
            report.writes += 1;
        }
        let stale: Vec<(Ipv4Addr, u8)> = held
            .ipcache
            .keys()
            .filter(|p| !want.ipcache.contains_key(p))
            .copied()
            .collect();
        for (ip, prefix) in stale {
            let key = ipcache_key(slot, ip, prefix);
            remove_ok(self.ipcache.remove(&key), IPCACHE_MAP)?;
            held.ipcache.remove(&(ip, prefix));
            report.writes += 1;
        }
        let stale: Vec<Ipv4Addr> = held
            .endpoints
            .keys()
            .filter(|ip| !want.endpoints.contains_key(ip))
            .copied()
            .collect();
        for ip in stale {
            remove_ok(
                self.endpoints.remove(&EndpointKey::new(slot, ip)),
                ENDPOINTS_MAP,
            )?;
            held.endpoints.remove(&ip);
            report.writes += 1;
        }

        for (&(ip, prefix), &id) in &want.ipcache {
            if held.ipcache.get(&(ip, prefix)) == Some(&id) {
                continue;
            }
            self.ipcache
                .insert(&ipcache_key(slot, ip, prefix), Identity { id }, 0)
                .map_err(|source| {
                    map_error(IPCACHE_MAP, &format!("insert {ip}/{prefix}"), source)
                })?;
            held.ipcache.insert((ip, prefix), id);
            report.writes += 1;
        }
        for (rule, &rule_id) in &want.rules {
            if held.rules.get(rule) == Some(&rule_id)
                || report.failed.contains(&(rule.ep, rule.direction))
            {
                continue;
            }
            match self.rules.insert(&rule.key(slot), RuleValue { rule_id }, 0) {
                Ok(()) => {
                    held.rules.insert(*rule, rule_id);
                    report.writes += 1;
                }
                Err(source) => {
                    warn!(ep = %rule.ep, direction = rule.direction.as_str(), error = %source,
                        "policy rule map refused an entry: the endpoint fails closed");
                    report.failed.insert((rule.ep, rule.direction));
                }
            }
        }
        for (&ip, &flags) in &want.endpoints {
            let flags = report
                .failed
                .iter()
                .filter(|(ep, _)| *ep == ip)
                .fold(flags, |f, (_, d)| f | d.fail_closed_flag());
            if held.endpoints.get(&ip) == Some(&flags) {
                continue;
            }
            self.endpoints
                .insert(EndpointKey::new(slot, ip), EndpointFlags { flags }, 0)
                .map_err(|source| map_error(ENDPOINTS_MAP, &format!("insert {ip}"), source))?;
            held.endpoints.insert(ip, flags);
            report.writes += 1;
        }
        Ok(())
    }
}

fn ipcache_key(slot: u8, ip: Ipv4Addr, prefix: u8) -> Key<IpcacheData> {
    Key::new(
        IpcacheData::SLOT_BITS + u32::from(prefix.min(32)),
        IpcacheData::new(slot, ip),
    )
}

fn remove_ok(
    result: Result<(), aya::maps::MapError>,
    map: &'static str,
) -> Result<(), DataplaneError> {
    match result {
        Err(source) if !is_not_found(&source) => Err(map_error(map, "remove", source)),
        _ => Ok(()),
    }
}

/// The verdict events the datapath raises, read from the pinned ring buffer.
pub struct PolicyEvents {
    ring: RingBuf<MapData>,
}

impl std::fmt::Debug for PolicyEvents {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PolicyEvents").finish_non_exhaustive()
    }
}

impl PolicyEvents {
    pub fn open(pins: &Pins) -> Result<Self, DataplaneError> {
        let ring = RingBuf::try_from(Map::RingBuf(open_pin(pins, EVENTS_MAP)?))
            .map_err(|source| map_error(EVENTS_MAP, "type", source))?;
        Ok(Self { ring })
    }

    /// The events waiting now (none when the ring is empty).
    pub fn drain(&mut self) -> Vec<crate::abi::policy::Event> {
        let mut events = Vec::new();
        while let Some(item) = self.ring.next() {
            if let Some(event) = crate::abi::policy::Event::from_bytes(&item) {
                events.push(event);
            }
        }
        events
    }
}

impl std::os::fd::AsRawFd for PolicyEvents {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.ring.as_raw_fd()
    }
}

/// [`PolicyEvents`] on the tokio reactor: waits until the datapath has written events.
pub struct AsyncPolicyEvents {
    fd: tokio::io::unix::AsyncFd<PolicyEvents>,
}

impl std::fmt::Debug for AsyncPolicyEvents {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AsyncPolicyEvents").finish_non_exhaustive()
    }
}

impl AsyncPolicyEvents {
    /// Opens the pinned ring buffer; must be called inside a tokio runtime.
    pub fn open(pins: &Pins) -> Result<Self, DataplaneError> {
        let events = PolicyEvents::open(pins)?;
        // SAFETY: the ring buffer's fd belongs to `events`, which the AsyncFd owns: it stays
        // open and the same for as long as the AsyncFd lives, and as_raw_fd always returns it.
        let fd = unsafe {
            tokio::io::unix::AsyncFd::register_with_interest(events, tokio::io::Interest::READABLE)
        }
        .map_err(|e| DataplaneError::Syscall {
            call: "epoll_ctl(policy_events)",
            source: e.into(),
        })?;
        Ok(Self { fd })
    }

    /// The next events, waiting for some when the ring is empty.
    pub async fn next_batch(&mut self) -> Result<Vec<crate::abi::policy::Event>, DataplaneError> {
        loop {
            let mut ready =
                self.fd
                    .readable_mut()
                    .await
                    .map_err(|source| DataplaneError::Syscall {
                        call: "epoll_wait(policy_events)",
                        source,
                    })?;
            let batch = ready.get_inner_mut().drain();
            ready.clear_ready();
            if !batch.is_empty() {
                return Ok(batch);
            }
        }
    }
}
