//! Hosts: where Slipway runs its host agent. A [`HostProvider`] creates, finds again, reports on
//! and deletes hosts; every provider ends in the same process, the host agent. The [`netns`]
//! provider makes hosts on this machine: network namespaces on per-zone underlay segments, with
//! cgroup limits and a data dir of their own.
#![forbid(unsafe_code)]

pub mod endpoints;
pub mod netns;
pub mod reconciler;
pub mod storage;

use std::fmt;
use std::net::Ipv4Addr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use slipway_dataplane::DataplaneError;

/// The smallest memory limit a host may have: less cannot run the agent.
pub const MIN_MEMORY_BYTES: u64 = 4 << 20;

/// The smallest cpu limit a host may have: the kernel's smallest CFS quota (1 ms per 100 ms).
pub const MIN_CPU_MILLIS: u64 = 10;

/// What a host is to be.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HostSpec {
    /// A DNS label, unique among the provider's hosts.
    pub name: String,
    /// The zone whose underlay segment the host joins.
    pub zone: String,
    /// CPU limit, thousandths of a CPU (the HostClass's cpu).
    pub cpu_millis: u64,
    /// Memory limit, bytes (the HostClass's memory).
    pub memory_bytes: u64,
    /// The host's data dir is `<data_root>/<name>`; absolute.
    pub data_root: PathBuf,
    /// The process started inside the host (the host agent, `slipway agent ...`), argv; empty
    /// starts none. `{name}`, `{zone}`, `{address}`, `{netns}`, `{data_dir}`, `{bpffs}` and
    /// `{cgroup}` (the host's cgroup v2 directory) in an argument are replaced by the host's.
    #[serde(default)]
    pub agent: Vec<String>,
}

/// One bad field of a request and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldProblem {
    pub field: &'static str,
    pub reason: String,
}

impl fmt::Display for FieldProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.reason)
    }
}

/// Everything a provider can fail with.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    /// The request was refused as given; nothing was made.
    #[error("invalid host: {}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
    Invalid(Vec<FieldProblem>),
    /// No host of that name.
    #[error("host {0}: not found")]
    NotFound(String),
    /// The kernel refused a step; `step` says which (everything the attempt made was removed).
    #[error("host {host}: {step}")]
    Kernel {
        host: String,
        step: String,
        #[source]
        source: DataplaneError,
    },
    /// The provider's state on disk could not be read or written.
    #[error("host state {}", path.display())]
    State {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl HostError {
    fn invalid(field: &'static str, reason: impl Into<String>) -> Self {
        Self::Invalid(vec![FieldProblem {
            field,
            reason: reason.into(),
        }])
    }
}

/// A host as its provider made it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HostHandle {
    pub spec: HostSpec,
    /// The host's underlay address and the prefix length of its zone's segment.
    pub address: Ipv4Addr,
    pub prefix: u8,
    /// The zone's gateway, the host's default route.
    pub gateway: Ipv4Addr,
    /// The host's network namespace (`/run/netns/<netns>`).
    pub netns: String,
    pub data_dir: PathBuf,
    /// The host's directory on bpffs, for the agent's pins.
    pub bpffs: PathBuf,
    /// The host's cgroup v2 directory (where socket programs attach), if the machine has one.
    pub cgroup: Option<PathBuf>,
    /// Every cgroup directory of the host (one per hierarchy).
    pub cgroups: Vec<PathBuf>,
}

/// Where a host is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum HostPhase {
    /// Being made, or left half-made by a provider that died; delete or create again converges.
    Creating,
    /// Made, and its process (if it has one) runs.
    Running,
    /// Made, but its process is gone.
    Exited,
    /// Recorded as made, but its namespace is gone.
    Lost,
}

/// What a host is doing, read from the kernel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostStatus {
    pub handle: HostHandle,
    pub phase: HostPhase,
    /// The processes in the host's cgroups.
    pub pids: Vec<i32>,
}

/// Creates, finds again, reports on and deletes hosts. Implementations keep their state where
/// a restarted caller finds it again (the kernel, a state dir), so `list` after a restart
/// returns the hosts made before it.
#[async_trait::async_trait]
pub trait HostProvider: Send + Sync {
    /// Makes the host, or returns it when a host of the same spec exists. A different host of
    /// the same name, an unknown zone or a bad limit is refused ([`HostError::Invalid`]); a
    /// failure midway removes what the attempt made.
    async fn create(&self, spec: &HostSpec) -> Result<HostHandle, HostError>;
    /// Removes everything the host is made of; an absent host is not an error.
    async fn delete(&self, name: &str) -> Result<(), HostError>;
    /// Every host the provider has (made or half-made), by name.
    async fn list(&self) -> Result<Vec<HostHandle>, HostError>;
    /// One host's status.
    async fn status(&self, name: &str) -> Result<HostStatus, HostError>;
}

/// Whether `s` is a DNS-1123 label (what Kubernetes names look like), with room for the
/// provider's prefixes.
fn is_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

impl HostSpec {
    /// Every problem with the spec itself, at once (the provider adds what it knows, such as
    /// its zones).
    pub fn problems(&self) -> Vec<FieldProblem> {
        let mut problems = Vec::new();
        let mut bad = |field, reason: String| problems.push(FieldProblem { field, reason });
        if !is_label(&self.name) {
            bad(
                "name",
                format!(
                    "{:?} is not a DNS label (lowercase letters, digits and '-', at most 63)",
                    self.name
                ),
            );
        }
        if self.zone.is_empty() {
            bad("zone", "must be set".into());
        }
        if self.cpu_millis < MIN_CPU_MILLIS {
            bad(
                "cpu",
                format!(
                    "{}m is below the smallest limit, {MIN_CPU_MILLIS}m",
                    self.cpu_millis
                ),
            );
        }
        if self.memory_bytes < MIN_MEMORY_BYTES {
            bad(
                "memory",
                format!(
                    "{} bytes is below the smallest limit, {MIN_MEMORY_BYTES} bytes",
                    self.memory_bytes
                ),
            );
        }
        if !self.data_root.is_absolute() {
            bad(
                "dataRoot",
                format!("{} is not an absolute path", self.data_root.display()),
            );
        }
        if self.agent.first().is_some_and(String::is_empty) {
            bad("agent", "the program (first argument) is empty".into());
        }
        problems
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> HostSpec {
        HostSpec {
            name: "h1".into(),
            zone: "a".into(),
            cpu_millis: 500,
            memory_bytes: 256 << 20,
            data_root: "/var/lib/slipway/hosts".into(),
            agent: vec!["sleep".into(), "infinity".into()],
        }
    }

    #[test]
    fn a_good_spec_has_no_problems() {
        assert_eq!(spec().problems(), vec![]);
    }

    #[test]
    fn every_bad_field_is_named_at_once() {
        let bad = HostSpec {
            name: "H_1".into(),
            zone: String::new(),
            cpu_millis: 0,
            memory_bytes: 0,
            data_root: "relative".into(),
            agent: vec![String::new()],
        };
        let fields: Vec<_> = bad.problems().iter().map(|p| p.field).collect();
        assert_eq!(
            fields,
            ["name", "zone", "cpu", "memory", "dataRoot", "agent"]
        );
        let err = HostError::Invalid(bad.problems());
        let text = err.to_string();
        assert!(text.contains("memory: 0 bytes is below"), "{text}");
        assert!(text.contains("name: \"H_1\""), "{text}");
    }

    #[test]
    fn specs_round_trip_and_refuse_unknown_fields() {
        let json = serde_json::to_string(&spec()).expect("serialize");
        assert!(json.contains("\"cpuMillis\":500"), "{json}");
        let back: HostSpec = serde_json::from_str(&json).expect("parse");
        assert_eq!(back, spec());
        let extra = json.replacen('{', "{\"cpu\":1,", 1);
        assert!(serde_json::from_str::<HostSpec>(&extra).is_err());
    }
}
