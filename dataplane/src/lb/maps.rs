//! Typed operations on the LB's maps: what the LB's controller reads and writes, in the
//! datapath's terms (ids, keys, ABI values), with kernel errors mapped once.

use std::collections::BTreeMap;
use std::fs;
use std::net::IpAddr;

use aya::maps::lpm_trie::Key;
use aya::maps::{Array, IterableMap, MapData, PerCpuArray, PerCpuValues};
use ipnetwork::IpNetwork;

use super::LbDatapath;
use crate::DataplaneError;
use crate::abi::CounterValue;
use crate::abi::lb::{
    LbBackend, LbConfig, LbFlow, LbFlowKey, LbReason, LbReverse, LbService, LbServiceKey,
    LbSourceRange, LbStats, LbVip, LbVipKey, MAGLEV_SIZE,
};
use crate::error::{is_not_found, map_error};

/// One map's capacity and the memory the kernel charges for it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MapUsage {
    pub name: String,
    pub max_entries: u32,
    pub bytes: u64,
}

fn ignore_missing(
    result: Result<(), aya::maps::MapError>,
    map: &'static str,
    action: &str,
) -> Result<(), DataplaneError> {
    match result {
        Err(e) if !is_not_found(&e) => Err(map_error(map, action, e)),
        _ => Ok(()),
    }
}

/// The LPM key of a source range: the 32 bits of the service id, then the range's prefix of
/// the 128-bit address (an IPv4 /n is the IPv4-mapped /(96 + n)).
fn range_key(service_id: u32, net: IpNetwork) -> Key<LbSourceRange> {
    let bits = match net {
        IpNetwork::V4(n) => 96 + u32::from(n.prefix()),
        IpNetwork::V6(n) => u32::from(n.prefix()),
    };
    Key::new(
        32 + bits,
        LbSourceRange {
            service_id,
            ip: net.network().into(),
        },
    )
}

fn sum_stats(values: &[LbStats]) -> LbStats {
    let mut total = LbStats::default();
    for v in values {
        total += *v;
    }
    total
}

impl LbDatapath {
    pub fn set_config(&mut self, config: LbConfig) -> Result<(), DataplaneError> {
        self.config
            .set(0, config, 0)
            .map_err(|e| map_error("lb_config", "set", e))
    }

    pub fn set_service(
        &mut self,
        key: LbServiceKey,
        value: LbService,
    ) -> Result<(), DataplaneError> {
        self.services
            .insert(key, value, 0)
            .map_err(|e| map_error("lb_services", "insert", e))
    }

    /// Removes a service entry; a missing one is no error.
    pub fn remove_service(&mut self, key: &LbServiceKey) -> Result<(), DataplaneError> {
        ignore_missing(self.services.remove(key), "lb_services", "remove")
    }

    /// Writes backend `id` (an all-zero backend clears it).
    pub fn set_backend(&mut self, id: u32, backend: LbBackend) -> Result<(), DataplaneError> {
        self.backends
            .set(id, backend, 0)
            .map_err(|e| map_error("lb_backends", &format!("set {id}"), e))
    }

    /// Writes (slot, backend id) pairs of service `service_id`'s Maglev ring, creating the
    /// ring if the service has none yet.
    pub fn write_ring(
        &mut self,
        service_id: u32,
        slots: &[(u32, u32)],
    ) -> Result<(), DataplaneError> {
        let ring = match self.maglev.get(&service_id, 0) {
            Ok(ring) => Some(ring),
            Err(e) if is_not_found(&e) => None,
            Err(e) => return Err(map_error("lb_maglev", &format!("get ring {service_id}"), e)),
        };
        let fresh = ring.is_none();
        let mut ring = match ring {
            Some(ring) => ring,
            None => Array::<MapData, u32>::create(MAGLEV_SIZE, 0)
                .map_err(|e| map_error("lb_maglev", "create a ring", e))?,
        };
        for &(slot, backend) in slots {
            ring.set(slot, backend, 0)
                .map_err(|e| map_error("lb_maglev", &format!("set ring {service_id}"), e))?;
        }
        // A new ring goes in whole, once written: the program never sees it half-filled.
        if fresh {
            self.maglev
                .set(service_id, &ring, 0)
                .map_err(|e| map_error("lb_maglev", &format!("insert ring {service_id}"), e))?;
        }
        Ok(())
    }

    pub fn add_source_range(
        &mut self,
        service_id: u32,
        net: IpNetwork,
    ) -> Result<(), DataplaneError> {
        self.source_ranges
            .insert(&range_key(service_id, net), 1, 0)
            .map_err(|e| map_error("lb_source_ranges", &format!("insert {net}"), e))
    }

    pub fn remove_source_range(
        &mut self,
        service_id: u32,
        net: IpNetwork,
    ) -> Result<(), DataplaneError> {
        ignore_missing(
            self.source_ranges.remove(&range_key(service_id, net)),
            "lb_source_ranges",
            "remove",
        )
    }

    pub fn add_vip(&mut self, vip: IpAddr) -> Result<(), DataplaneError> {
        self.vips
            .insert(LbVipKey { ip: vip.into() }, LbVip::default(), 0)
            .map_err(|e| map_error("lb_vips", &format!("insert {vip}"), e))
    }

    pub fn remove_vip(&mut self, vip: IpAddr) -> Result<(), DataplaneError> {
        ignore_missing(
            self.vips.remove(&LbVipKey { ip: vip.into() }),
            "lb_vips",
            "remove",
        )
    }

    /// Every tracked flow (client -> VIP direction).
    pub fn flows(&self) -> Result<Vec<(LbFlowKey, LbFlow)>, DataplaneError> {
        self.flows
            .iter()
            .map(|e| e.map_err(|e| map_error("lb_flows", "iterate", e)))
            .collect()
    }

    /// The reverse translation entries (backend -> client direction).
    pub fn reverse_entries(&self) -> Result<Vec<(LbFlowKey, LbReverse)>, DataplaneError> {
        self.reverse
            .iter()
            .map(|e| e.map_err(|e| map_error("lb_reverse", "iterate", e)))
            .collect()
    }

    /// Forgets a flow: its forward entry and the reverse entry `reverse`.
    pub fn remove_flow(
        &mut self,
        forward: &LbFlowKey,
        reverse: &LbFlowKey,
    ) -> Result<(), DataplaneError> {
        ignore_missing(self.flows.remove(forward), "lb_flows", "remove")?;
        ignore_missing(self.reverse.remove(reverse), "lb_reverse", "remove")
    }

    /// Traffic of backend `id`, summed over CPUs.
    pub fn backend_stats(&self, id: u32) -> Result<LbStats, DataplaneError> {
        let values = self
            .backend_stats
            .get(&id, 0)
            .map_err(|e| map_error("lb_backend_stats", "get", e))?;
        Ok(sum_stats(&values))
    }

    /// Traffic of service `id`, summed over CPUs.
    pub fn service_stats(&self, id: u32) -> Result<LbStats, DataplaneError> {
        let values = self
            .service_stats
            .get(&id, 0)
            .map_err(|e| map_error("lb_service_stats", "get", e))?;
        Ok(sum_stats(&values))
    }

    /// Packets and bytes per verdict, summed over CPUs.
    pub fn counters(&self) -> Result<BTreeMap<LbReason, CounterValue>, DataplaneError> {
        let mut out = BTreeMap::new();
        for reason in LbReason::ALL {
            let values = self
                .counters
                .get(&(reason as u32), 0)
                .map_err(|e| map_error("lb_counters", "get", e))?;
            let mut total = CounterValue::default();
            for v in values.iter() {
                total += *v;
            }
            out.insert(reason, total);
        }
        Ok(out)
    }

    /// Zeroes the counters of service `id`.
    pub fn reset_service_stats(&mut self, id: u32) -> Result<(), DataplaneError> {
        zero_stats(&mut self.service_stats, "lb_service_stats", id)
    }

    /// Zeroes the counters of backend `id`.
    pub fn reset_backend_stats(&mut self, id: u32) -> Result<(), DataplaneError> {
        zero_stats(&mut self.backend_stats, "lb_backend_stats", id)
    }

    /// The keys of every service entry.
    pub fn service_keys(&self) -> Result<Vec<LbServiceKey>, DataplaneError> {
        self.services
            .keys()
            .map(|k| k.map_err(|e| map_error("lb_services", "iterate", e)))
            .collect()
    }

    /// Every (service id, client range) entry.
    pub fn source_ranges(&self) -> Result<Vec<(u32, IpNetwork)>, DataplaneError> {
        let mut out = Vec::new();
        for key in self.source_ranges.keys() {
            let key = key.map_err(|e| map_error("lb_source_ranges", "iterate", e))?;
            let data = key.data();
            let bits = key.prefix_len().saturating_sub(32);
            let net = match data.ip.ip() {
                IpAddr::V4(ip) => IpNetwork::new(ip.into(), bits.saturating_sub(96) as u8),
                ip @ IpAddr::V6(_) => IpNetwork::new(ip, bits as u8),
            };
            if let Ok(net) = net {
                out.push((data.service_id, net));
            }
        }
        Ok(out)
    }

    /// Ids of the backend entries that are set (not all-zero).
    pub fn backend_ids(&self) -> Result<Vec<u32>, DataplaneError> {
        let mut out = Vec::new();
        for (id, backend) in self.backends.iter().enumerate() {
            let backend = backend.map_err(|e| map_error("lb_backends", "iterate", e))?;
            if backend != LbBackend::default() {
                out.push(id as u32);
            }
        }
        Ok(out)
    }

    /// Every announced VIP.
    pub fn vips(&self) -> Result<Vec<IpAddr>, DataplaneError> {
        self.vips
            .keys()
            .map(|k| {
                k.map(|k| k.ip.ip())
                    .map_err(|e| map_error("lb_vips", "iterate", e))
            })
            .collect()
    }

    /// Capacity and kernel memory of every map.
    pub fn map_usage(&self) -> Result<Vec<MapUsage>, DataplaneError> {
        let mut out = vec![
            usage("lb_services", self.services.map())?,
            usage("lb_backends", self.backends.map())?,
            usage("lb_flows", self.flows.map())?,
            usage("lb_reverse", self.reverse.map())?,
            usage("lb_affinity", self.affinity.map())?,
            usage("lb_source_ranges", self.source_ranges.map())?,
            usage("lb_vips", self.vips.map())?,
            usage("lb_backend_stats", self.backend_stats.map())?,
            usage("lb_service_stats", self.service_stats.map())?,
        ];
        // The rings (the outer array of ids is small next to them).
        let mut rings = MapUsage {
            name: "lb_maglev".into(),
            max_entries: self.sizes.services,
            bytes: 0,
        };
        for id in 0..rings.max_entries {
            match self.maglev.get(&id, 0) {
                Ok(ring) => rings.bytes += memlock(ring.map())?,
                Err(e) if is_not_found(&e) => {}
                Err(e) => return Err(map_error("lb_maglev", "get ring", e)),
            }
        }
        out.push(rings);
        Ok(out)
    }
}

/// What the kernel charges for a map (`memlock` in its fdinfo, which `bpftool map show`
/// prints too).
fn memlock(map: &MapData) -> Result<u64, DataplaneError> {
    use std::os::fd::{AsFd as _, AsRawFd as _};
    let fd = map.fd().as_fd().as_raw_fd();
    let text = fs::read_to_string(format!("/proc/self/fdinfo/{fd}")).map_err(|source| {
        DataplaneError::Syscall {
            call: "read map fdinfo",
            source,
        }
    })?;
    Ok(text
        .lines()
        .find_map(|l| l.strip_prefix("memlock:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0))
}

fn usage(name: &'static str, map: &MapData) -> Result<MapUsage, DataplaneError> {
    let info = map.info().map_err(|e| map_error(name, "get info", e))?;
    Ok(MapUsage {
        name: name.to_owned(),
        max_entries: info.max_entries(),
        bytes: memlock(map)?,
    })
}

/// Sets entry `id` of a per-CPU counter array to zero on every CPU.
fn zero_stats(
    map: &mut PerCpuArray<MapData, LbStats>,
    name: &'static str,
    id: u32,
) -> Result<(), DataplaneError> {
    let cpus = aya::util::nr_cpus().map_err(|(_, source)| DataplaneError::Syscall {
        call: "read the possible CPUs",
        source,
    })?;
    let zeros = PerCpuValues::try_from(vec![LbStats::default(); cpus]).map_err(|source| {
        DataplaneError::Syscall {
            call: "build per-CPU values",
            source,
        }
    })?;
    map.set(id, zeros, 0)
        .map_err(|e| map_error(name, &format!("zero {id}"), e))
}
