//! `slipway agent`: the node agent. It installs the node datapath (programs and maps pinned on
//! bpffs, the VXLAN device, programs on the host devices), tells the CNI plugin about the node
//! (`<dataDir>/node.json`), takes the cluster's hosts, services and policy state from a local API
//! on a Unix socket and keeps the datapath in step with them, and exports the datapath counters
//! as Prometheus metrics.
//!
//! Restarting it never interrupts traffic: maps, programs and links are pinned, a restart reuses
//! the maps and swaps programs into the pinned links atomically.
//!
//! Layout: [`args`] (flags), [`run`] (startup), [`api`] (the local API's handlers), [`hosts`]
//! (hosts and routes), [`heartbeat`] (the Host and Lease in the supervisor), [`services`], [`policy`] (the policy node: compiled state installed in the
//! datapath, flows), [`metrics`] and [`tables`] (Prometheus), [`cli`] (`slipway flows`,
//! `slipway policy`), [`feed`] (the lists fed from a Kubernetes API), [`dns`] (cluster DNS), [`pods`] (the host's containerd, offline images, the pod runner over CRI),
//! [`kubelet_api`] (the kubelet's HTTPS endpoint: container logs for the API server).
#![forbid(unsafe_code)]

pub mod api;
pub mod args;
pub mod cli;
pub mod csi_node;
pub mod dns;
pub mod edge;
pub mod feed;
pub mod health_ports;
pub mod heartbeat;
pub mod hosts;
pub mod join;
pub mod kubelet_api;
pub mod metrics;
pub mod node_setup;
pub mod pods;
pub mod policy;
pub mod run;
pub mod services;
pub mod supervise;
pub mod tables;

use serde::Serialize;
use slipway_api::FieldError;

pub use args::{AgentArgs, RoutingArg, VXLAN_DEVICE, VXLAN_PORT};
pub use run::run;

/// Why a desired state was refused: every bad field. On the wire each is one line,
/// `field: message` (`{"errors": ["hosts[1].name: Required value"]}`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Invalid {
    #[serde(serialize_with = "as_lines")]
    pub errors: Vec<FieldError>,
}

fn as_lines<S: serde::Serializer>(errors: &[FieldError], s: S) -> Result<S::Ok, S::Error> {
    s.collect_seq(errors.iter().map(ToString::to_string))
}
