//! The node datapath's tables as the agent sees them: the largest size a flag may ask for, the
//! loop that logs a table that filled (naming the flag that sizes it), and their metrics beside
//! the service programs' events (which path service flows took).

use std::collections::BTreeMap;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use slipway_dataplane::abi::services::SvcEvent;
use slipway_dataplane::node::{NodeMaps, Pins, TableFill};
use tracing::warn;

/// The largest table a flag may ask for (64 Mi entries: gigabytes of kernel memory).
pub const TABLE_MAX: i64 = 1 << 26;

/// How often the agent looks for tables that filled.
const FILL_CHECK_INTERVAL: Duration = Duration::from_secs(5);

/// The agent flag that sizes table `map`, for messages.
pub fn sizing_flag(map: &str) -> &'static str {
    match map {
        "policy_ct" => "--ct-entries",
        "routes" => "--route-entries",
        "counters" => "(fixed size)",
        _ => "--nat-entries",
    }
}

/// Logs every table whose inserts found it full since the last look: once per interval at
/// most, whatever the traffic.
pub async fn watch_fills(pins: Pins) -> anyhow::Result<()> {
    let mut seen: BTreeMap<&'static str, u64> = BTreeMap::new();
    let mut ticks = tokio::time::interval(FILL_CHECK_INTERVAL);
    loop {
        ticks.tick().await;
        let fills = match NodeMaps::open(&pins).and_then(|maps| maps.fills()) {
            Ok(fills) => fills,
            Err(e) => {
                warn!(error = %e, "reading table fill");
                continue;
            }
        };
        for (fill, new) in newly_full(&mut seen, &fills) {
            warn!(
                table = fill.map,
                capacity = fill.capacity,
                full_inserts = new,
                flag = sizing_flag(fill.map),
                "table full: inserts were refused or evicted older entries; raise the flag"
            );
        }
    }
}

/// The tables whose full-insert count rose since `seen` (updated), with how much.
fn newly_full<'a>(
    seen: &mut BTreeMap<&'static str, u64>,
    fills: &'a [TableFill],
) -> Vec<(&'a TableFill, u64)> {
    fills
        .iter()
        .filter_map(|fill| {
            let before = seen.insert(fill.map, fill.full_inserts).unwrap_or(0);
            (fill.full_inserts > before).then(|| (fill, fill.full_inserts - before))
        })
        .collect()
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TableLabels {
    table: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EventLabels {
    event: &'static str,
}

/// Registers `table_capacity`, `table_entries` and `table_full_inserts` (by table) and
/// `service_events` (by event) in `registry`.
pub fn register_metrics(
    registry: &mut Registry,
    fills: &[TableFill],
    services: &BTreeMap<SvcEvent, u64>,
) {
    let capacity = Family::<TableLabels, Gauge>::default();
    let entries = Family::<TableLabels, Gauge>::default();
    let full = Family::<TableLabels, Counter>::default();
    for fill in fills {
        let labels = TableLabels { table: fill.map };
        capacity
            .get_or_create(&labels)
            .set(i64::from(fill.capacity));
        entries
            .get_or_create(&labels)
            .set(i64::try_from(fill.entries).unwrap_or(i64::MAX));
        full.get_or_create(&labels).inc_by(fill.full_inserts);
    }
    let events = Family::<EventLabels, Counter>::default();
    for (event, count) in services {
        events
            .get_or_create(&EventLabels {
                event: event.as_str(),
            })
            .inc_by(*count);
    }
    registry.register(
        "table_capacity",
        "Entries a datapath table holds at most",
        capacity,
    );
    registry.register("table_entries", "Entries a datapath table holds", entries);
    registry.register(
        "table_full_inserts",
        "Inserts that found a datapath table full: refused, or evicting an older entry",
        full,
    );
    registry.register(
        "service_events",
        "What the service translation did: connect_* and *msg_* at sockets, packet_* per \
         packet at pod veths (flows of pods outside the socket programs' cgroup)",
        events,
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_table_is_reported_each_time_more_inserts_found_it_full() {
        let fill = |map, full_inserts| TableFill {
            map,
            capacity: 64,
            entries: 64,
            full_inserts,
        };
        let mut seen = BTreeMap::new();
        let report = |seen: &mut BTreeMap<_, _>, fills: &[TableFill]| -> Vec<(&str, u64)> {
            newly_full(seen, fills)
                .into_iter()
                .map(|(f, n)| (f.map, n))
                .collect()
        };
        assert!(report(&mut seen, &[fill("policy_ct", 0), fill("nat_flows", 0)]).is_empty());
        assert_eq!(
            report(&mut seen, &[fill("policy_ct", 5), fill("nat_flows", 0)]),
            [("policy_ct", 5)]
        );
        assert!(report(&mut seen, &[fill("policy_ct", 5), fill("nat_flows", 0)]).is_empty());
        assert_eq!(
            report(&mut seen, &[fill("policy_ct", 8), fill("nat_flows", 2)]),
            [("policy_ct", 3), ("nat_flows", 2)]
        );
        assert_eq!(sizing_flag("policy_ct"), "--ct-entries");
        assert_eq!(sizing_flag("stack_flows"), "--nat-entries");
    }
}
