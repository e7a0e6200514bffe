//! What `slipway lb status` shows: VIPs, their services and ports, every backend's health,
//! weight, share of the Maglev ring, flows and traffic; the pools; the datapath's verdicts.
//! Serde types (the local API's `GET /v1/status` body) and their table rendering.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use crate::config::{Protocol, TrafficPolicy};

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Status {
    pub services: Vec<ServiceStatus>,
    pub pools: Vec<PoolStatus>,
    /// Announced VIPs (answered by ARP, IPv6 ones by NDP).
    pub announced: Vec<IpAddr>,
    /// Packets per datapath verdict (`enum lb_reason`).
    pub verdicts: BTreeMap<String, u64>,
    /// Capacity and kernel memory of every map.
    #[serde(default)]
    pub maps: Vec<crate::maps::MapUsage>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceStatus {
    /// `namespace/name`.
    pub name: String,
    pub vip: IpAddr,
    pub external_traffic_policy: TrafficPolicy,
    /// Sent to the backends inside IP-in-IP, answered by them directly.
    #[serde(default)]
    pub direct_server_return: bool,
    pub source_ranges: Vec<String>,
    pub ports: Vec<PortStatus>,
    pub backends: Vec<BackendStatus>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PortStatus {
    pub protocol: Protocol,
    pub port: u16,
    pub target_port: u16,
    pub packets: u64,
    pub bytes: u64,
    /// New flows since the datapath was loaded.
    pub flows_total: u64,
}

/// A backend's health and whether it takes new flows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum BackendState {
    /// In the Maglev ring.
    Active,
    /// Weight 0: keeps its flows, gets no new ones.
    Draining,
    /// Failed its health checks: out of the ring.
    Unhealthy,
    /// Not node-local, so not used by an `externalTrafficPolicy: Local` service.
    NotLocal,
}

impl BackendState {
    pub fn as_str(self) -> &'static str {
        match self {
            BackendState::Active => "active",
            BackendState::Draining => "draining",
            BackendState::Unhealthy => "unhealthy",
            BackendState::NotLocal => "not-local",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BackendStatus {
    pub ip: IpAddr,
    pub weight: u32,
    pub state: BackendState,
    /// Health-check verdict (true without health checks).
    pub healthy: bool,
    /// Slots of the service's Maglev ring(s) it owns, summed over ports.
    pub slots: u64,
    /// Tracked flows that are open (no FIN/RST seen) and were active recently.
    pub active_flows: u64,
    /// New flows since the datapath was loaded (all services using this backend).
    pub flows_total: u64,
    pub packets: u64,
    pub bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PoolStatus {
    pub name: String,
    pub cidr: String,
    pub used: usize,
    pub size: usize,
}

impl Status {
    /// The human table of `slipway lb status`.
    pub fn table(&self) -> String {
        let mut out = String::new();
        if self.services.is_empty() {
            out.push_str("no services\n");
        }
        for s in &self.services {
            let ports: Vec<String> = s
                .ports
                .iter()
                .map(|p| format!("{}/{}->{}", p.port, p.protocol.as_str(), p.target_port))
                .collect();
            let _ = writeln!(
                out,
                "{}  VIP {}  ports {}  eTP {:?}{}{}",
                s.name,
                s.vip,
                ports.join(","),
                s.external_traffic_policy,
                if s.direct_server_return { "  DSR" } else { "" },
                if s.source_ranges.is_empty() {
                    String::new()
                } else {
                    format!("  from {}", s.source_ranges.join(","))
                }
            );
            // IPv6 backends widen the first column.
            let width = s
                .backends
                .iter()
                .map(|b| b.ip.to_string().len())
                .max()
                .unwrap_or(0)
                .max(16);
            let _ = writeln!(
                out,
                "  {:<width$} {:>6} {:<10} {:>7} {:>8} {:>10} {:>10} {:>12}",
                "BACKEND", "WEIGHT", "STATE", "SLOTS", "FLOWS", "FLOWS-ALL", "PACKETS", "BYTES"
            );
            for b in &s.backends {
                let _ = writeln!(
                    out,
                    "  {:<width$} {:>6} {:<10} {:>7} {:>8} {:>10} {:>10} {:>12}",
                    b.ip.to_string(),
                    b.weight,
                    b.state.as_str(),
                    b.slots,
                    b.active_flows,
                    b.flows_total,
                    b.packets,
                    b.bytes
                );
            }
        }
        for p in &self.pools {
            let _ = writeln!(
                out,
                "pool {} {}: {}/{} used",
                p.name, p.cidr, p.used, p.size
            );
        }
        let verdicts: Vec<String> = self
            .verdicts
            .iter()
            .filter(|(_, n)| **n > 0)
            .map(|(k, n)| format!("{k}={n}"))
            .collect();
        let _ = writeln!(out, "verdicts: {}", verdicts.join(" "));
        let maps: Vec<String> = self
            .maps
            .iter()
            .map(|m| {
                format!(
                    "{} {:.1} MiB/{}",
                    m.name,
                    m.bytes as f64 / f64::from(1 << 20),
                    m.max_entries
                )
            })
            .collect();
        if !maps.is_empty() {
            let _ = writeln!(out, "maps (memory/capacity): {}", maps.join(", "));
        }
        out
    }
}
