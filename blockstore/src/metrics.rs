//! Prometheus metrics of the NBD server (per export and operation) and their HTTP endpoint.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// Labels of per-operation series.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OpLabels {
    /// Export name.
    pub export: String,
    /// `read`, `write`, `flush`, `trim`, `write_zeroes`, `cache`, `block_status`.
    pub op: &'static str,
}

/// Labels of the handshake counter.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HandshakeLabels {
    /// `served` (went into transmission), `closed` (by either side during negotiation),
    /// `tls_failed`, `error` (I/O), `timeout`.
    pub result: &'static str,
}

fn latency_histogram() -> Histogram {
    // 4 µs .. ~4 s.
    Histogram::new(exponential_buckets(4e-6, 2.0, 21))
}

/// The server's metric families.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    requests: Family<OpLabels, Counter>,
    errors: Family<OpLabels, Counter>,
    bytes: Family<OpLabels, Counter>,
    latency: Family<OpLabels, Histogram, fn() -> Histogram>,
    handshakes: Family<HandshakeLabels, Counter>,
    /// Open NBD connections in transmission.
    pub connections: Gauge,
}

/// Handles for one export and operation, resolved once per connection.
#[derive(Debug, Clone)]
pub struct OpMetrics {
    requests: Counter,
    errors: Counter,
    bytes: Counter,
    latency: Histogram,
}

impl OpMetrics {
    /// Records one completed request.
    pub fn record(&self, bytes: u64, elapsed: Duration, ok: bool) {
        self.requests.inc();
        self.bytes.inc_by(bytes);
        self.latency.observe(elapsed.as_secs_f64());
        if !ok {
            self.errors.inc();
        }
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Registers the families.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("slipway_nbd");
        let requests = Family::<OpLabels, Counter>::default();
        let errors = Family::<OpLabels, Counter>::default();
        let bytes = Family::<OpLabels, Counter>::default();
        let latency = Family::<OpLabels, Histogram, fn() -> Histogram>::new_with_constructor(
            latency_histogram as fn() -> Histogram,
        );
        let connections = Gauge::default();
        let handshakes = Family::<HandshakeLabels, Counter>::default();
        registry.register("requests", "NBD requests completed", requests.clone());
        registry.register(
            "errors",
            "NBD requests answered with an error",
            errors.clone(),
        );
        registry.register("bytes", "Bytes read or written", bytes.clone());
        registry.register(
            "request_duration_seconds",
            "Time from request decoded to reply queued",
            latency.clone(),
        );
        registry.register(
            "connections",
            "Connections in transmission",
            connections.clone(),
        );
        registry.register(
            "handshakes",
            "Connections by how their negotiation ended",
            handshakes.clone(),
        );
        Self {
            registry,
            requests,
            errors,
            bytes,
            latency,
            handshakes,
            connections,
        }
    }

    /// Counts one negotiation that ended with `result` (see [`HandshakeLabels`]).
    pub fn handshake(&self, result: &'static str) {
        self.handshakes
            .get_or_create(&HandshakeLabels { result })
            .inc();
    }

    /// Handles for `export` / `op`.
    pub fn op(&self, export: &str, op: &'static str) -> OpMetrics {
        let labels = OpLabels {
            export: export.to_owned(),
            op,
        };
        OpMetrics {
            requests: self.requests.get_or_create(&labels).clone(),
            errors: self.errors.get_or_create(&labels).clone(),
            bytes: self.bytes.get_or_create(&labels).clone(),
            latency: self.latency.get_or_create(&labels).clone(),
        }
    }

    /// The OpenMetrics text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

/// Serves `GET /metrics` (any path, in fact) on `listener` until the task is dropped.
pub async fn serve_http(listener: TcpListener, metrics: Arc<Metrics>) {
    loop {
        let Ok((mut sock, _)) = listener.accept().await else {
            // e.g. out of file descriptors: back off instead of spinning.
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let metrics = Arc::clone(&metrics);
        tokio::spawn(async move {
            let mut req = [0u8; 2048];
            // One read is enough for a scrape's request line; the body is ignored.
            let _ = tokio::time::timeout(Duration::from_secs(5), sock.read(&mut req)).await;
            let body = metrics.encode();
            let head = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: application/openmetrics-text; version=1.0.0; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            let _ = sock.write_all(head.as_bytes()).await;
            let _ = sock.write_all(body.as_bytes()).await;
            let _ = sock.shutdown().await;
        });
    }
}

/// Binds the metrics endpoint.
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_show_in_exposition() {
        let m = Metrics::new();
        m.op("vol", "read")
            .record(4096, Duration::from_micros(30), true);
        let text = m.encode();
        assert!(
            text.contains("slipway_nbd_requests_total{export=\"vol\",op=\"read\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("slipway_nbd_bytes_total{export=\"vol\",op=\"read\"} 4096"),
            "{text}"
        );
        assert!(
            text.contains("slipway_nbd_request_duration_seconds_bucket"),
            "{text}"
        );
    }
}
