//! Prometheus metrics of the LB, per VIP (service port) and per backend, read from the
//! datapath's per-CPU counters at scrape time: a [`Collector`] over the latest [`Status`].

use std::sync::{Arc, Mutex};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;

use crate::status::Status;

/// The registry and the status snapshot its collector reads.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    snapshot: Arc<Mutex<Status>>,
}

#[derive(Debug)]
struct LbCollector {
    snapshot: Arc<Mutex<Status>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let snapshot = Arc::new(Mutex::new(Status::default()));
        let mut registry = Registry::default();
        registry.register_collector(Box::new(LbCollector {
            snapshot: snapshot.clone(),
        }));
        Self { registry, snapshot }
    }

    /// Encodes the metrics of `status` in the OpenMetrics text format.
    pub fn render(&self, status: Status) -> Result<String, std::fmt::Error> {
        *self.snapshot.lock().unwrap_or_else(|p| p.into_inner()) = status;
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)?;
        Ok(out)
    }
}

type Labels = Vec<(&'static str, String)>;

fn family<M: EncodeMetric>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    kind: MetricType,
    rows: Vec<(Labels, M)>,
) -> Result<(), std::fmt::Error> {
    let mut metric = encoder.encode_descriptor(name, help, None, kind)?;
    for (labels, value) in rows {
        value.encode(metric.encode_family(&labels)?)?;
    }
    Ok(())
}

impl Collector for LbCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let status = self
            .snapshot
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let mut vip_rows = (Vec::new(), Vec::new(), Vec::new());
        let mut backend_rows = (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for s in &status.services {
            for p in &s.ports {
                let labels: Labels = vec![
                    ("service", s.name.clone()),
                    ("vip", s.vip.to_string()),
                    ("port", p.port.to_string()),
                    ("protocol", p.protocol.as_str().to_owned()),
                ];
                vip_rows
                    .0
                    .push((labels.clone(), ConstCounter::new(p.packets)));
                vip_rows
                    .1
                    .push((labels.clone(), ConstCounter::new(p.bytes)));
                vip_rows.2.push((labels, ConstCounter::new(p.flows_total)));
            }
            for b in &s.backends {
                let labels: Labels = vec![
                    ("service", s.name.clone()),
                    ("vip", s.vip.to_string()),
                    ("backend", b.ip.to_string()),
                ];
                backend_rows
                    .0
                    .push((labels.clone(), ConstCounter::new(b.packets)));
                backend_rows
                    .1
                    .push((labels.clone(), ConstCounter::new(b.bytes)));
                backend_rows
                    .2
                    .push((labels.clone(), ConstCounter::new(b.flows_total)));
                backend_rows
                    .3
                    .push((labels.clone(), ConstGauge::new(b.active_flows as i64)));
                backend_rows.4.push((
                    labels,
                    ConstGauge::new(i64::from(b.state.as_str() == "active")),
                ));
            }
        }
        family(
            &mut encoder,
            "slipway_lb_vip_packets",
            "Packets to the VIP port, client to backend.",
            MetricType::Counter,
            vip_rows.0,
        )?;
        family(
            &mut encoder,
            "slipway_lb_vip_bytes",
            "Bytes to the VIP port, client to backend.",
            MetricType::Counter,
            vip_rows.1,
        )?;
        family(
            &mut encoder,
            "slipway_lb_vip_flows",
            "New flows to the VIP port.",
            MetricType::Counter,
            vip_rows.2,
        )?;
        family(
            &mut encoder,
            "slipway_lb_backend_packets",
            "Packets to and from the backend.",
            MetricType::Counter,
            backend_rows.0,
        )?;
        family(
            &mut encoder,
            "slipway_lb_backend_bytes",
            "Bytes to and from the backend.",
            MetricType::Counter,
            backend_rows.1,
        )?;
        family(
            &mut encoder,
            "slipway_lb_backend_flows",
            "New flows pinned to the backend.",
            MetricType::Counter,
            backend_rows.2,
        )?;
        family(
            &mut encoder,
            "slipway_lb_backend_active_flows",
            "Open, recently active flows of the backend.",
            MetricType::Gauge,
            backend_rows.3,
        )?;
        family(
            &mut encoder,
            "slipway_lb_backend_active",
            "1 if the backend takes new flows (healthy, weight > 0).",
            MetricType::Gauge,
            backend_rows.4,
        )?;
        let verdicts = status
            .verdicts
            .iter()
            .map(|(reason, n)| (vec![("reason", reason.clone())], ConstCounter::new(*n)))
            .collect();
        family(
            &mut encoder,
            "slipway_lb_datapath_packets",
            "Packets by datapath verdict, and the flow_table_full and flow_untracked events.",
            MetricType::Counter,
            verdicts,
        )?;
        let pools = status
            .pools
            .iter()
            .map(|p| {
                (
                    vec![("pool", p.name.clone()), ("cidr", p.cidr.clone())],
                    ConstGauge::new(p.used as i64),
                )
            })
            .collect();
        let maps = |value: fn(&crate::maps::MapUsage) -> i64| {
            status
                .maps
                .iter()
                .map(|m| (vec![("map", m.name.clone())], ConstGauge::new(value(m))))
                .collect()
        };
        family(
            &mut encoder,
            "slipway_lb_map_bytes",
            "Kernel memory of the datapath map (Maglev rings summed).",
            MetricType::Gauge,
            maps(|m| i64::try_from(m.bytes).unwrap_or(i64::MAX)),
        )?;
        family(
            &mut encoder,
            "slipway_lb_map_capacity",
            "Entries the datapath map holds at most (--max-services, --max-backends, --max-flows).",
            MetricType::Gauge,
            maps(|m| i64::from(m.max_entries)),
        )?;
        family(
            &mut encoder,
            "slipway_lb_pool_addresses_used",
            "VIPs allocated from the pool.",
            MetricType::Gauge,
            pools,
        )?;
        Ok(())
    }
}
