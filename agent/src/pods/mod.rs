//! The pod runner: the host agent as a slim kubelet. It runs the host's own containerd
//! ([`containerd`]), imports images offline ([`image`]), speaks CRI to it ([`cri`]), turns a
//! core/v1 Pod into CRI sandbox and container configs ([`spec`], its resolv.conf: [`dns`], its
//! emptyDir, configMap and secret volumes: [`volumes`]), drives the Pods it is given
//! ([`runner`]) and reports their PodStatus ([`status`]). It watches no API: the caller hands it
//! the desired Pods and the objects their volumes project (from kube-rs, a file, a test) and
//! gets their statuses back.

pub mod atomic;
pub mod claims;
pub mod containerd;
pub mod cri;
pub mod dns;
pub mod image;
pub mod kubelet;
pub mod logs;
pub mod mounts;
pub mod probe;
pub mod runner;
pub mod spec;
pub mod status;
pub mod volumes;

use std::io;

/// Why a pod-runner operation failed.
#[derive(Debug, thiserror::Error)]
pub enum PodsError {
    #[error("{field}: {reason}")]
    Invalid { field: String, reason: String },
    #[error("failed to {what}")]
    Io {
        what: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("failed to run {program}")]
    Spawn {
        program: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("`{command}` failed: {stderr}")]
    Command { command: String, stderr: String },
    #[error("failed to encode JSON")]
    Json(#[source] serde_json::Error),
    #[error("failed to connect to containerd at {socket}")]
    Connect {
        socket: String,
        #[source]
        source: tonic::transport::Error,
    },
    #[error("CRI {call} failed")]
    Cri {
        call: &'static str,
        #[source]
        source: tonic::Status,
    },
    #[error("containerd did not answer on {socket} within {seconds} s; its log says: {log}")]
    NotReady {
        socket: String,
        seconds: u64,
        log: String,
    },
}

/// An error and its sources on one line, for logs and status messages.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut out = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        out.push_str(": ");
        out.push_str(&e.to_string());
        source = e.source();
    }
    out
}
