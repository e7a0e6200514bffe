//! The counters map, the tables' fill and the service programs' events as Prometheus metrics,
//! and the loop that watches the counters map fill.

use std::collections::BTreeMap;

use slipway_dataplane::abi::Reason;
use slipway_dataplane::abi::services::SvcEvent;
use slipway_dataplane::node::{NodeMaps, Pins};
use tracing::{info, warn};

/// Renders the counters map, the tables' fill and the service programs' events (`services`:
/// which path service flows took) in the Prometheus text format with prometheus-client.
pub fn render_metrics(
    pins: &Pins,
    services: &BTreeMap<SvcEvent, u64>,
) -> Result<String, slipway_dataplane::DataplaneError> {
    use prometheus_client::encoding::EncodeLabelSet;
    use prometheus_client::metrics::counter::Counter;
    use prometheus_client::metrics::family::Family;
    use prometheus_client::metrics::gauge::Gauge;
    use prometheus_client::registry::Registry;

    #[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
    struct Labels {
        verdict: &'static str,
        reason: &'static str,
        ifindex_in: u32,
        ifindex_out: u32,
    }
    let maps = NodeMaps::open(pins)?;
    let counters = maps.counters()?;
    let fill = (counters.len(), maps.counters_capacity()? as usize);
    let packets = Family::<Labels, Counter>::default();
    let bytes = Family::<Labels, Counter>::default();
    for (key, value) in counters {
        let Some(reason) = Reason::from_raw(key.reason) else {
            continue;
        };
        let verdict = if reason.is_drop() {
            "dropped"
        } else if matches!(
            reason,
            Reason::PassNotIpv4 | Reason::PassNoEndpoint | Reason::PassStackFlow
        ) {
            "passed"
        } else {
            "forwarded"
        };
        let labels = Labels {
            verdict,
            reason: reason.as_str(),
            ifindex_in: key.ifindex_in,
            ifindex_out: key.ifindex_out,
        };
        packets.get_or_create(&labels).inc_by(value.packets);
        bytes.get_or_create(&labels).inc_by(value.bytes);
    }
    let (entries, capacity) = fill;
    let mut registry = Registry::with_prefix("slipway_datapath");
    registry.register("packets", "Packets the node datapath handled", packets);
    registry.register("bytes", "Bytes the node datapath handled", bytes);
    crate::tables::register_metrics(&mut registry, &maps.fills()?, services);
    for (name, help, value) in [
        ("counter_entries", "Entries of the counters map", entries),
        ("counter_capacity", "Capacity of the counters map", capacity),
        (
            "counters_full",
            "1 when the counters map is full: new series are not counted",
            usize::from(entries >= capacity),
        ),
    ] {
        let gauge = Gauge::<i64>::default();
        gauge.set(i64::try_from(value).unwrap_or(i64::MAX));
        registry.register(name, help, gauge);
    }
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).map_err(|e| {
        slipway_dataplane::DataplaneError::Parse {
            command: "encode metrics".into(),
            detail: e.to_string(),
        }
    })?;
    Ok(text)
}

/// How often the agent looks whether the counters map is full.
pub(crate) const COUNTERS_CHECK: std::time::Duration = std::time::Duration::from_secs(5);

/// Logs when the counters map fills (the datapath then stops counting new series, as
/// `slipway_datapath_counters_full` also says) and when it has room again: once per change.
pub(crate) async fn watch_counters(pins: Pins) -> anyhow::Result<()> {
    let mut full = false;
    let mut failing = false;
    let mut tick = tokio::time::interval(COUNTERS_CHECK);
    loop {
        tick.tick().await;
        let fill = NodeMaps::open(&pins)
            .and_then(|maps| Ok((maps.counters()?.len(), maps.counters_capacity()? as usize)));
        let (entries, capacity) = match fill {
            Ok(fill) => {
                failing = false;
                fill
            }
            Err(error) => {
                // Once per failure, not every tick.
                if !failing {
                    warn!(%error, "reading the counters map failed");
                }
                failing = true;
                continue;
            }
        };
        match (full, entries >= capacity) {
            (false, true) => warn!(
                entries,
                capacity,
                "the counters map is full: packets of new (device, reason) series are not \
                 counted until pods are deleted or GC runs"
            ),
            (true, false) => info!(entries, capacity, "the counters map has room again"),
            _ => {}
        }
        full = entries >= capacity;
    }
}
