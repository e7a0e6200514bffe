//! The controllers' Prometheus metrics: reconciles and failures per controller, scheduling
//! outcomes and evictions. The embedding process serves [`Metrics::encode`].

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

/// A controller's name as a label.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ControllerLabel {
    /// `replicaset`, `deployment`, `scheduler`, `endpointslice`, `node-lifecycle`.
    pub controller: &'static str,
}

/// Counters of every controller.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// Reconciles run.
    pub reconciles: Family<ControllerLabel, Counter>,
    /// Reconciles that failed (and were retried).
    pub failures: Family<ControllerLabel, Counter>,
    /// Pods bound to a Node.
    pub scheduled: Counter,
    /// Scheduling attempts that found no Node.
    pub unschedulable: Counter,
    /// Pods deleted from NotReady or unreachable Nodes.
    pub evictions: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("slipway_controllers");
        let reconciles = Family::<ControllerLabel, Counter>::default();
        let failures = Family::<ControllerLabel, Counter>::default();
        let scheduled = Counter::default();
        let unschedulable = Counter::default();
        let evictions = Counter::default();
        registry.register("reconciles", "Reconciles run", reconciles.clone());
        registry.register(
            "reconcile_failures",
            "Reconciles that failed",
            failures.clone(),
        );
        registry.register("pods_scheduled", "Pods bound to a Node", scheduled.clone());
        registry.register(
            "pods_unschedulable",
            "Scheduling attempts that found no Node",
            unschedulable.clone(),
        );
        registry.register(
            "pods_evicted",
            "Pods deleted from NotReady or unreachable Nodes",
            evictions.clone(),
        );
        Self {
            registry,
            reconciles,
            failures,
            scheduled,
            unschedulable,
            evictions,
        }
    }
}

impl Metrics {
    /// Counts one reconcile of `controller`.
    pub fn reconciled(&self, controller: &'static str) {
        self.reconciles
            .get_or_create(&ControllerLabel { controller })
            .inc();
    }

    /// Counts one failed reconcile of `controller`.
    pub fn failed(&self, controller: &'static str) {
        self.failures
            .get_or_create(&ControllerLabel { controller })
            .inc();
    }

    /// The OpenMetrics text of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            tracing::warn!(error = %e, "encoding metrics");
        }
        out
    }
}
