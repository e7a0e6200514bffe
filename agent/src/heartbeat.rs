//! Registration with the supervisor. The host agent creates its `Host` (`slipway.dev/v1alpha1`)
//! when it is not there, reports itself in the Host's status (phase Running, its address, its
//! version) and renews a `coordination.k8s.io/v1` Lease named after the host in
//! [`LEASE_NAMESPACE`] every interval; whoever watches the Leases reads one not renewed within
//! its duration as a dead host. Level-triggered: a round puts back whatever is missing (the
//! namespace, the Lease, the Host), so a restarted agent or supervisor converges.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use anyhow::Context as _;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Namespace;
use kube::api::{
    Api, ApiResource, DynamicObject, GroupVersionKind, Patch, PatchParams, PostParams,
};
use kube::config::{KubeConfigOptions, Kubeconfig};
use serde_json::json;
use tracing::{info, warn};

pub use slipway_api::slipway::HOST_LEASE_NAMESPACE as LEASE_NAMESPACE;

/// A Host's registration is checked again every this many rounds (the Lease every round).
const REGISTER_EVERY: u32 = 30;

/// How the agent registers with a supervisor (all optional: without `--supervisor-kubeconfig`
/// the agent runs standalone, driven by its local API).
#[derive(Debug, Clone, clap::Args)]
pub struct HeartbeatArgs {
    /// Kubeconfig of the supervisor this host registers with.
    #[arg(long = "supervisor-kubeconfig")]
    pub kubeconfig: Option<PathBuf>,
    /// The host's name: its Host and its Lease. Required with --supervisor-kubeconfig.
    #[arg(long = "host-name")]
    pub host_name: Option<String>,
    /// The Zone the host is in (set on the Host when the agent creates it).
    #[arg(long, default_value = "")]
    pub zone: String,
    /// The HostClass that sizes the host (set on the Host when the agent creates it).
    #[arg(long = "host-class", default_value = "")]
    pub host_class: String,
    /// How often the Lease is renewed.
    #[arg(long = "lease-interval", default_value = "1s", value_parser = humantime::parse_duration)]
    pub lease_interval: Duration,
    /// How long the Lease holds without a renewal (its leaseDurationSeconds, whole seconds, at
    /// least twice the interval).
    #[arg(long = "lease-duration", default_value = "4s", value_parser = humantime::parse_duration)]
    pub lease_duration: Duration,
}

/// Who the host is, as it registers.
#[derive(Debug, Clone)]
pub struct Registration {
    pub host: String,
    pub zone: String,
    pub host_class: String,
    pub address: String,
    pub interval: Duration,
    pub duration: Duration,
}

impl HeartbeatArgs {
    /// The registration the flags ask for, if any; every bad flag named.
    pub fn registration(&self, address: String) -> anyhow::Result<Option<(PathBuf, Registration)>> {
        let Some(kubeconfig) = &self.kubeconfig else {
            return Ok(None);
        };
        let mut problems = Vec::new();
        let host = self.host_name.clone().unwrap_or_default();
        if host.is_empty() {
            problems.push("--host-name: required with --supervisor-kubeconfig".to_owned());
        }
        if self.lease_interval.is_zero() {
            problems.push("--lease-interval: must be more than 0".to_owned());
        }
        if self.lease_duration.subsec_nanos() != 0 || self.lease_duration.as_secs() == 0 {
            problems.push(format!(
                "--lease-duration: {:?} must be a whole number of seconds (at least 1)",
                self.lease_duration
            ));
        }
        if self.lease_duration < self.lease_interval * 2 {
            problems.push(format!(
                "--lease-duration: {:?} must be at least twice --lease-interval ({:?})",
                self.lease_duration, self.lease_interval
            ));
        }
        anyhow::ensure!(problems.is_empty(), "{}", problems.join("; "));
        Ok(Some((
            kubeconfig.clone(),
            Registration {
                host,
                zone: self.zone.clone(),
                host_class: self.host_class.clone(),
                address,
                interval: self.lease_interval,
                duration: self.lease_duration,
            },
        )))
    }
}

/// A Lease's time: RFC 3339 with microseconds (metav1.MicroTime).
fn micro_time(t: SystemTime) -> String {
    humantime::format_rfc3339_micros(t).to_string()
}

fn is_not_found(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 404)
}

fn is_conflict(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 409)
}

/// The agent's side of the registration: [`Heartbeat::register`] and [`Heartbeat::renew`].
#[derive(Debug)]
pub struct Heartbeat {
    reg: Registration,
    hosts: Api<DynamicObject>,
    leases: Api<Lease>,
    namespaces: Api<Namespace>,
    host_resource: ApiResource,
}

impl Heartbeat {
    /// A client of the supervisor in `kubeconfig`.
    pub async fn connect(kubeconfig: &Path, reg: Registration) -> anyhow::Result<Self> {
        let config = Kubeconfig::read_from(kubeconfig).with_context(|| {
            format!("--supervisor-kubeconfig: reading {}", kubeconfig.display())
        })?;
        let config = kube::Config::from_custom_kubeconfig(config, &KubeConfigOptions::default())
            .await
            .with_context(|| format!("--supervisor-kubeconfig: {}", kubeconfig.display()))?;
        let client = kube::Client::try_from(config).context("supervisor client")?;
        let host_resource = ApiResource::from_gvk_with_plural(
            &GroupVersionKind::gvk(
                slipway_api::slipway::GROUP,
                slipway_api::slipway::VERSION,
                "Host",
            ),
            "hosts",
        );
        Ok(Self {
            reg,
            hosts: Api::all_with(client.clone(), &host_resource),
            leases: Api::namespaced(client.clone(), LEASE_NAMESPACE),
            namespaces: Api::all(client),
            host_resource,
        })
    }

    /// The Host exists and its status says this agent runs it. A joined host's Host was made
    /// when it joined (its identity may only write its status); an agent given an
    /// administrator's kubeconfig makes it.
    pub async fn register(&self) -> Result<(), kube::Error> {
        let status = json!({"status": {
            "phase": "Running",
            "address": self.reg.address,
            "agentVersion": env!("CARGO_PKG_VERSION"),
        }});
        let (params, status) = (PatchParams::default(), Patch::Merge(&status));
        let patch = || self.hosts.patch_status(&self.reg.host, &params, &status);
        match patch().await {
            Ok(_) => return Ok(()),
            Err(e) if is_not_found(&e) => {}
            Err(e) => return Err(e),
        }
        let mut host = DynamicObject::new(&self.reg.host, &self.host_resource);
        host.data = json!({"spec": {
            "zone": self.reg.zone,
            "hostClass": self.reg.host_class,
        }});
        match self.hosts.create(&PostParams::default(), &host).await {
            Ok(_) => info!(host = %self.reg.host, "registered a new Host"),
            Err(e) if is_conflict(&e) => {}
            Err(e) => return Err(e),
        }
        patch().await.map(drop)
    }

    /// Renews the Lease, creating it (and its namespace) when it is not there.
    pub async fn renew(&self) -> Result<(), kube::Error> {
        let now = micro_time(SystemTime::now());
        let renewal = json!({"spec": {
            "holderIdentity": self.reg.host,
            "leaseDurationSeconds": self.reg.duration.as_secs(),
            "renewTime": now,
        }});
        match self
            .leases
            .patch(
                &self.reg.host,
                &PatchParams::default(),
                &Patch::Merge(&renewal),
            )
            .await
        {
            Ok(_) => return Ok(()),
            Err(e) if is_not_found(&e) => {}
            Err(e) => return Err(e),
        }
        let lease: Lease = serde_json::from_value(json!({
            "metadata": {"name": self.reg.host, "namespace": LEASE_NAMESPACE},
            "spec": {
                "holderIdentity": self.reg.host,
                "leaseDurationSeconds": self.reg.duration.as_secs(),
                "acquireTime": now,
                "renewTime": now,
            },
        }))
        .map_err(kube::Error::SerdeError)?;
        match self.leases.create(&PostParams::default(), &lease).await {
            Ok(_) => Ok(()),
            Err(e) if is_not_found(&e) => {
                let ns: Namespace =
                    serde_json::from_value(json!({"metadata": {"name": LEASE_NAMESPACE}}))
                        .map_err(kube::Error::SerdeError)?;
                match self.namespaces.create(&PostParams::default(), &ns).await {
                    Ok(_) | Err(kube::Error::Api(_)) => {}
                    Err(e) => return Err(e),
                }
                self.leases
                    .create(&PostParams::default(), &lease)
                    .await
                    .map(drop)
            }
            // Another round (or a restarted agent) made it meanwhile: renewed next round.
            Err(e) if is_conflict(&e) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Registers, then renews every interval, forever; a failing round is logged once per
    /// outage and retried at the next interval.
    pub async fn run(self) -> anyhow::Result<()> {
        let mut ticker = tokio::time::interval(self.reg.interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut round: u32 = 0;
        let mut registered = false;
        let mut failing = false;
        loop {
            ticker.tick().await;
            let result = async {
                if !registered || round.is_multiple_of(REGISTER_EVERY) {
                    self.register().await?;
                    registered = true;
                }
                self.renew().await
            }
            .await;
            round = round.wrapping_add(1);
            match result {
                Ok(()) if failing => {
                    info!(host = %self.reg.host, "supervisor reachable again: Lease renewed");
                    failing = false;
                }
                Ok(()) => {}
                Err(e) => {
                    registered = false;
                    if !failing {
                        warn!(host = %self.reg.host, error = %e, "cannot renew the host's Lease; retrying every interval");
                        failing = true;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args() -> HeartbeatArgs {
        HeartbeatArgs {
            kubeconfig: Some("/etc/slipway/supervisor.kubeconfig".into()),
            host_name: Some("h1".into()),
            zone: "a".into(),
            host_class: "small".into(),
            lease_interval: Duration::from_secs(1),
            lease_duration: Duration::from_secs(4),
        }
    }

    #[test]
    fn without_a_kubeconfig_the_agent_runs_standalone() {
        let standalone = HeartbeatArgs {
            kubeconfig: None,
            host_name: None,
            ..args()
        };
        assert!(
            standalone
                .registration("10.0.0.1".into())
                .expect("valid")
                .is_none()
        );
        let (_, reg) = args()
            .registration("10.0.0.1".into())
            .expect("valid")
            .expect("registers");
        assert_eq!(
            (reg.host.as_str(), reg.duration),
            ("h1", Duration::from_secs(4))
        );
    }

    #[test]
    fn bad_flags_are_named_all_at_once() {
        let bad = HeartbeatArgs {
            host_name: None,
            lease_interval: Duration::from_secs(3),
            lease_duration: Duration::from_millis(4500),
            ..args()
        };
        let err = bad
            .registration("10.0.0.1".into())
            .expect_err("refused")
            .to_string();
        for flag in [
            "--host-name",
            "--lease-duration: 4.5s must be a whole number",
        ] {
            assert!(err.contains(flag), "{err}");
        }
        assert!(err.contains("at least twice --lease-interval"), "{err}");
    }

    #[test]
    fn lease_times_carry_microseconds() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_micros(1_796_000_000_123_456);
        assert_eq!(micro_time(t), "2026-11-30T00:53:20.123456Z");
    }
}
