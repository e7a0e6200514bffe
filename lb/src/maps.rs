//! The seam between the controller and the kernel: everything the controller does to the
//! datapath's maps, as a trait. [`crate::datapath::LbDatapath`] implements it on the real BPF
//! maps; unit tests implement it in memory.

use std::collections::BTreeMap;
use std::net::IpAddr;

use ipnetwork::IpNetwork;
use slipway_dataplane::abi::CounterValue;
use slipway_dataplane::abi::lb::{
    LbBackend, LbConfig, LbFlow, LbFlowKey, LbReason, LbService, LbServiceKey, LbStats,
};

pub use slipway_dataplane::lb::MapUsage;

use crate::LbError;

/// The datapath's maps as the controller sees them.
pub trait LbMaps: Send {
    fn set_config(&mut self, config: LbConfig) -> Result<(), LbError>;
    fn set_service(&mut self, key: LbServiceKey, value: LbService) -> Result<(), LbError>;
    fn remove_service(&mut self, key: &LbServiceKey) -> Result<(), LbError>;
    /// Writes backend `id` (an all-zero backend clears it).
    fn set_backend(&mut self, id: u32, backend: LbBackend) -> Result<(), LbError>;
    /// Writes (slot, backend id) pairs of service `service_id`'s Maglev ring.
    fn write_ring(&mut self, service_id: u32, slots: &[(u32, u32)]) -> Result<(), LbError>;
    fn add_source_range(&mut self, service_id: u32, net: IpNetwork) -> Result<(), LbError>;
    fn remove_source_range(&mut self, service_id: u32, net: IpNetwork) -> Result<(), LbError>;
    fn add_vip(&mut self, vip: IpAddr) -> Result<(), LbError>;
    fn remove_vip(&mut self, vip: IpAddr) -> Result<(), LbError>;
    /// Every tracked flow (client -> VIP direction).
    fn flows(&self) -> Result<Vec<(LbFlowKey, LbFlow)>, LbError>;
    /// Forgets a flow: its forward entry and the reverse entry `reverse`.
    fn remove_flow(&mut self, forward: &LbFlowKey, reverse: &LbFlowKey) -> Result<(), LbError>;
    /// Traffic of backend `id`, summed over CPUs.
    fn backend_stats(&self, id: u32) -> Result<LbStats, LbError>;
    /// Traffic of service `id`, summed over CPUs.
    fn service_stats(&self, id: u32) -> Result<LbStats, LbError>;
    /// Packets and bytes per verdict, summed over CPUs.
    fn counters(&self) -> Result<BTreeMap<LbReason, CounterValue>, LbError>;
    /// Zeroes the counters of service `id` (given to a new service port).
    fn reset_service_stats(&mut self, id: u32) -> Result<(), LbError>;
    /// Zeroes the counters of backend `id` (given to a new backend).
    fn reset_backend_stats(&mut self, id: u32) -> Result<(), LbError>;
    /// The keys of every service entry.
    fn service_keys(&self) -> Result<Vec<LbServiceKey>, LbError>;
    /// Every (service id, client range) entry.
    fn source_ranges(&self) -> Result<Vec<(u32, IpNetwork)>, LbError>;
    /// Ids of the backend entries that are set (not all-zero).
    fn backend_ids(&self) -> Result<Vec<u32>, LbError>;
    /// Every announced VIP.
    fn vips(&self) -> Result<Vec<IpAddr>, LbError>;
    /// Capacity and kernel memory of every map.
    fn map_usage(&self) -> Result<Vec<MapUsage>, LbError>;
}

/// Shared maps: the controller drives them while the owner keeps a handle (e.g. to run the
/// program with `BPF_PROG_TEST_RUN`).
impl<T: LbMaps> LbMaps for std::sync::Arc<std::sync::Mutex<T>> {
    fn set_config(&mut self, config: LbConfig) -> Result<(), LbError> {
        lock(self).set_config(config)
    }
    fn set_service(&mut self, key: LbServiceKey, value: LbService) -> Result<(), LbError> {
        lock(self).set_service(key, value)
    }
    fn remove_service(&mut self, key: &LbServiceKey) -> Result<(), LbError> {
        lock(self).remove_service(key)
    }
    fn set_backend(&mut self, id: u32, backend: LbBackend) -> Result<(), LbError> {
        lock(self).set_backend(id, backend)
    }
    fn write_ring(&mut self, service_id: u32, slots: &[(u32, u32)]) -> Result<(), LbError> {
        lock(self).write_ring(service_id, slots)
    }
    fn add_source_range(&mut self, service_id: u32, net: IpNetwork) -> Result<(), LbError> {
        lock(self).add_source_range(service_id, net)
    }
    fn remove_source_range(&mut self, service_id: u32, net: IpNetwork) -> Result<(), LbError> {
        lock(self).remove_source_range(service_id, net)
    }
    fn add_vip(&mut self, vip: IpAddr) -> Result<(), LbError> {
        lock(self).add_vip(vip)
    }
    fn remove_vip(&mut self, vip: IpAddr) -> Result<(), LbError> {
        lock(self).remove_vip(vip)
    }
    fn flows(&self) -> Result<Vec<(LbFlowKey, LbFlow)>, LbError> {
        lock(self).flows()
    }
    fn remove_flow(&mut self, forward: &LbFlowKey, reverse: &LbFlowKey) -> Result<(), LbError> {
        lock(self).remove_flow(forward, reverse)
    }
    fn backend_stats(&self, id: u32) -> Result<LbStats, LbError> {
        lock(self).backend_stats(id)
    }
    fn service_stats(&self, id: u32) -> Result<LbStats, LbError> {
        lock(self).service_stats(id)
    }
    fn counters(&self) -> Result<BTreeMap<LbReason, CounterValue>, LbError> {
        lock(self).counters()
    }
    fn reset_service_stats(&mut self, id: u32) -> Result<(), LbError> {
        lock(self).reset_service_stats(id)
    }
    fn reset_backend_stats(&mut self, id: u32) -> Result<(), LbError> {
        lock(self).reset_backend_stats(id)
    }
    fn service_keys(&self) -> Result<Vec<LbServiceKey>, LbError> {
        lock(self).service_keys()
    }
    fn source_ranges(&self) -> Result<Vec<(u32, IpNetwork)>, LbError> {
        lock(self).source_ranges()
    }
    fn backend_ids(&self) -> Result<Vec<u32>, LbError> {
        lock(self).backend_ids()
    }
    fn vips(&self) -> Result<Vec<IpAddr>, LbError> {
        lock(self).vips()
    }
    fn map_usage(&self) -> Result<Vec<MapUsage>, LbError> {
        lock(self).map_usage()
    }
}

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
