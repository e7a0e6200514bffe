//! A workload cluster's controllers, beside its API server: the scheduler, ReplicaSet and
//! Deployment (apps/v1), EndpointSlices from ready Pods, node lifecycle (NotReady Nodes
//! tainted, their Pods evicted after their tolerationSeconds) and the garbage collector of
//! dependents whose owners are gone, and (with a [`SupervisorLink`]) the cloud provider that
//! mirrors LoadBalancer Services into the supervisor and the paravirtual CSI controller with the
//! loops that drive it (provisioner, attacher, snapshotter). Each is a kube-rs client of any
//! Kubernetes API, level-triggered: it compares what it lists with what should be and writes
//! only the difference, so it is safe to stop at any line and to run again.
#![forbid(unsafe_code)]

pub mod attach_detach;
pub mod attacher;
pub mod cloud_provider;
pub mod deployment;
pub mod endpointslice;
pub mod events;
pub mod garbage;
pub mod leader;
pub mod metrics;
pub mod node_lifecycle;
pub mod placement;
pub mod pods;
pub mod provisioner;
pub mod pvcsi;
pub mod replicaset;
pub mod scheduler;
pub mod snapshotter;
pub mod wake;

use std::sync::Arc;
use std::time::Duration;

pub use metrics::Metrics;

/// Who manages the objects these controllers write (the `managed-by` label and field manager).
pub const MANAGER: &str = "slipway-controllers";

/// Settings of the controllers.
#[derive(Debug, Clone)]
pub struct Options {
    /// How long a Pod stays on a NotReady or unreachable Node when it has no toleration of its
    /// own for the taint (kube-apiserver's DefaultTolerationSeconds: 300 s).
    pub default_toleration_seconds: i64,
    /// How long a Node may go without a heartbeat (its Ready condition's lastHeartbeatTime or
    /// its Lease in `kube-node-lease`) before its Ready condition is set to Unknown (upstream:
    /// 40 s, for kubelets that heartbeat). `None`: Ready is taken as written, for clusters
    /// whose Nodes' Ready is written by something that watches heartbeats itself (Slipway's
    /// supervisor writes it from each host's Lease).
    pub node_monitor_grace_period: Option<Duration>,
    /// How often node lifecycle looks at heartbeats and eviction deadlines (and how often the
    /// garbage collector sweeps).
    pub node_monitor_period: Duration,
    /// How soon the scheduler tries an unschedulable Pod again.
    pub unschedulable_retry: Duration,
    /// Counters the controllers keep.
    pub metrics: Arc<Metrics>,
    /// The cluster's link to its supervisor namespace, for the controllers that forward to the
    /// supervisor (cloud provider, paravirtual volumes); `None` on a cluster that has none.
    pub supervisor: Option<SupervisorLink>,
    /// Where the pvCSI controller serves CSI (None: a socket per process in the temporary
    /// directory).
    pub pvcsi_socket: Option<std::path::PathBuf>,
}

/// A workload cluster's link to the supervisor that made it: a client with the cluster's own,
/// namespace-scoped identity (`system:cluster:<namespace>:<cluster>`), the namespace, and the
/// cluster's name (what the mirrored objects are named and labelled after).
#[derive(Clone)]
pub struct SupervisorLink {
    /// A client of the supervisor's API.
    pub client: kube::Client,
    /// The cluster's namespace in the supervisor.
    pub namespace: String,
    /// The cluster's name there.
    pub cluster: String,
}

impl std::fmt::Debug for SupervisorLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SupervisorLink")
            .field("namespace", &self.namespace)
            .field("cluster", &self.cluster)
            .finish_non_exhaustive()
    }
}

impl Default for Options {
    fn default() -> Self {
        Self {
            default_toleration_seconds: 300,
            node_monitor_grace_period: None,
            node_monitor_period: Duration::from_secs(5),
            unschedulable_retry: Duration::from_secs(2),
            metrics: Arc::new(Metrics::default()),
            supervisor: None,
            pvcsi_socket: None,
        }
    }
}

/// What a reconcile can fail on.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A call to the API server failed.
    #[error("{verb} {what}")]
    Api {
        /// What the call did (`create`, `list`, `patch status`).
        verb: &'static str,
        /// What it did it to.
        what: String,
        /// The API's answer.
        #[source]
        source: kube::Error,
    },
    /// An object lacks a field the controller needs (the API server should have set it).
    #[error("{kind} {name} has no {field}")]
    Missing {
        /// Kind.
        kind: &'static str,
        /// Name.
        name: String,
        /// The missing field.
        field: &'static str,
    },
}

/// Shorthand for an API error.
pub(crate) fn api_err(
    verb: &'static str,
    what: impl Into<String>,
) -> impl FnOnce(kube::Error) -> Error {
    let what = what.into();
    move |source| Error::Api { verb, what, source }
}

/// Runs every controller against `client` until one of them stops (they do not, short of the
/// runtime shutting down).
pub async fn run(client: kube::Client, options: Options) {
    let options = Arc::new(options);
    tracing::info!("workload cluster controllers starting");
    let cloud = {
        let (client, options) = (client.clone(), options.clone());
        async move {
            match options.supervisor.clone() {
                Some(link) => cloud_provider::run(client, link, options).await,
                None => std::future::pending().await,
            }
        }
    };
    let pvcsi = {
        let (client, options) = (client.clone(), options.clone());
        async move {
            match options.supervisor.clone() {
                Some(link) => pvcsi::run(client, options, link).await,
                None => std::future::pending().await,
            }
        }
    };
    tokio::join!(
        cloud,
        pvcsi,
        attach_detach::run(client.clone()),
        replicaset::run(client.clone(), options.clone()),
        deployment::run(client.clone(), options.clone()),
        scheduler::run(client.clone(), options.clone()),
        endpointslice::run(client.clone(), options.clone()),
        garbage::run(client.clone(), options.clone()),
        node_lifecycle::run(client, options),
    );
}
