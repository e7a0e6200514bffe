//! The LB datapath as the controller drives it: the kernel side (loading `ebpf/lb.c` or
//! `ebpf/lb_xdp.c`, pins, links, typed maps) lives in [`slipway_dataplane::lb`]; this module
//! puts it behind the [`LbMaps`] seam.

use std::collections::BTreeMap;
use std::net::IpAddr;

use ipnetwork::IpNetwork;
use slipway_dataplane::abi::CounterValue;
use slipway_dataplane::abi::lb::{
    LbBackend, LbConfig, LbFlow, LbFlowKey, LbReason, LbService, LbServiceKey, LbStats,
};
pub use slipway_dataplane::lb::{
    AttachPoint, LbDatapath, LbProgram, SNAT_PORTS, TestRunResult, XdpMode, enable_run_time_stats,
    link_pin, remove_pins, run_time, run_time_of,
};

use crate::LbError;
use crate::maps::{LbMaps, MapUsage};

impl LbMaps for LbDatapath {
    fn set_config(&mut self, config: LbConfig) -> Result<(), LbError> {
        Ok(LbDatapath::set_config(self, config)?)
    }
    fn set_service(&mut self, key: LbServiceKey, value: LbService) -> Result<(), LbError> {
        Ok(LbDatapath::set_service(self, key, value)?)
    }
    fn remove_service(&mut self, key: &LbServiceKey) -> Result<(), LbError> {
        Ok(LbDatapath::remove_service(self, key)?)
    }
    fn set_backend(&mut self, id: u32, backend: LbBackend) -> Result<(), LbError> {
        Ok(LbDatapath::set_backend(self, id, backend)?)
    }
    fn write_ring(&mut self, service_id: u32, slots: &[(u32, u32)]) -> Result<(), LbError> {
        Ok(LbDatapath::write_ring(self, service_id, slots)?)
    }
    fn add_source_range(&mut self, service_id: u32, net: IpNetwork) -> Result<(), LbError> {
        Ok(LbDatapath::add_source_range(self, service_id, net)?)
    }
    fn remove_source_range(&mut self, service_id: u32, net: IpNetwork) -> Result<(), LbError> {
        Ok(LbDatapath::remove_source_range(self, service_id, net)?)
    }
    fn add_vip(&mut self, vip: IpAddr) -> Result<(), LbError> {
        Ok(LbDatapath::add_vip(self, vip)?)
    }
    fn remove_vip(&mut self, vip: IpAddr) -> Result<(), LbError> {
        Ok(LbDatapath::remove_vip(self, vip)?)
    }
    fn flows(&self) -> Result<Vec<(LbFlowKey, LbFlow)>, LbError> {
        Ok(LbDatapath::flows(self)?)
    }
    fn remove_flow(&mut self, forward: &LbFlowKey, reverse: &LbFlowKey) -> Result<(), LbError> {
        Ok(LbDatapath::remove_flow(self, forward, reverse)?)
    }
    fn backend_stats(&self, id: u32) -> Result<LbStats, LbError> {
        Ok(LbDatapath::backend_stats(self, id)?)
    }
    fn service_stats(&self, id: u32) -> Result<LbStats, LbError> {
        Ok(LbDatapath::service_stats(self, id)?)
    }
    fn counters(&self) -> Result<BTreeMap<LbReason, CounterValue>, LbError> {
        Ok(LbDatapath::counters(self)?)
    }
    fn reset_service_stats(&mut self, id: u32) -> Result<(), LbError> {
        Ok(LbDatapath::reset_service_stats(self, id)?)
    }
    fn reset_backend_stats(&mut self, id: u32) -> Result<(), LbError> {
        Ok(LbDatapath::reset_backend_stats(self, id)?)
    }
    fn service_keys(&self) -> Result<Vec<LbServiceKey>, LbError> {
        Ok(LbDatapath::service_keys(self)?)
    }
    fn source_ranges(&self) -> Result<Vec<(u32, IpNetwork)>, LbError> {
        Ok(LbDatapath::source_ranges(self)?)
    }
    fn backend_ids(&self) -> Result<Vec<u32>, LbError> {
        Ok(LbDatapath::backend_ids(self)?)
    }
    fn vips(&self) -> Result<Vec<IpAddr>, LbError> {
        Ok(LbDatapath::vips(self)?)
    }
    fn map_usage(&self) -> Result<Vec<MapUsage>, LbError> {
        Ok(LbDatapath::map_usage(self)?)
    }
}
