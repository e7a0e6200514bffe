//! Prometheus metrics of the API server, served at `/metrics`.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Labels of a request counter.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// Kubernetes verb.
    pub verb: String,
    /// Resource plural or `nonresource`.
    pub resource: String,
    /// HTTP status code.
    pub code: u16,
}

/// The API server's metrics.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// Requests by verb, resource and code.
    pub requests: Family<RequestLabels, Counter>,
    /// Request latency in seconds (watches excluded).
    pub latency: Histogram,
    /// Open watches.
    pub watches: Gauge,
    /// Open client connections.
    pub connections: Gauge,
    /// Connections refused at a connection cap.
    pub connections_refused: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("slipway_apiserver");
        let requests = Family::<RequestLabels, Counter>::default();
        let latency = Histogram::new(exponential_buckets(0.0005, 2.0, 16));
        let watches = Gauge::default();
        registry.register(
            "requests",
            "API requests by verb, resource and code",
            requests.clone(),
        );
        registry.register(
            "request_duration_seconds",
            "API request latency (watches excluded)",
            latency.clone(),
        );
        registry.register("watches", "Open watch streams", watches.clone());
        let connections = Gauge::default();
        let connections_refused = Counter::default();
        registry.register(
            "connections",
            "Open client connections",
            connections.clone(),
        );
        registry.register(
            "connections_refused",
            "Connections refused at the connection caps",
            connections_refused.clone(),
        );
        Self {
            registry,
            requests,
            latency,
            watches,
            connections,
            connections_refused,
        }
    }
}

impl Metrics {
    /// Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}
