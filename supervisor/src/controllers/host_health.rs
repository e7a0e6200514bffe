//! Host health: each Host's `Ready` condition follows its agent's Lease
//! (`coordination.k8s.io/v1`, named after the host, in `slipway-system`): True while the Lease
//! was renewed within its `leaseDurationSeconds`, False once it expired, Unknown while the host
//! has no Lease yet. Expiry is a matter of time passing, not of a change in the API, so the
//! controller looks every period (level-triggered: it compares what should be with what is and
//! writes only the difference).

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use k8s_openapi::api::coordination::v1::Lease;
use kube::api::{
    Api, ApiResource, DynamicObject, GroupVersionKind, ListParams, Patch, PatchParams,
};
use kube::config::{KubeConfigOptions, Kubeconfig};
use serde_json::{Value, json};
use slipway_api::slipway::{GROUP, HOST_LEASE_NAMESPACE as LEASE_NAMESPACE, VERSION};
use tracing::{info, warn};

use crate::api::meta::{parse_rfc3339, rfc3339};

/// How often the controller looks.
pub const PERIOD: Duration = Duration::from_millis(250);

/// What a host's Ready condition should say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Readiness {
    pub status: &'static str,
    pub reason: &'static str,
    pub message: String,
}

/// Seconds since the epoch of an RFC 3339 time with an optional fraction (metav1.MicroTime).
fn parse_micro_time(s: &str) -> Option<f64> {
    let whole = parse_rfc3339(s)?;
    let fraction = s
        .get(19..)
        .and_then(|rest| rest.strip_prefix('.'))
        .map(|rest| rest.trim_end_matches('Z'))
        .filter(|digits| !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()))
        .and_then(|digits| format!("0.{digits}").parse::<f64>().ok())
        .unwrap_or(0.0);
    #[allow(
        clippy::cast_precision_loss,
        reason = "whole seconds of a realistic date fit an f64 exactly"
    )]
    Some(whole as f64 + fraction)
}

/// What a Lease (or its absence) says about its host, made at `created` (seconds since the
/// epoch, whole), at `now`. A Lease last renewed before the host was made is an earlier host's
/// of the same name (one replaced): this one has not registered yet.
pub fn readiness(host: &str, lease: Option<&Lease>, created: Option<f64>, now: f64) -> Readiness {
    let Some(spec) = lease.and_then(|l| l.spec.as_ref()) else {
        return Readiness {
            status: "Unknown",
            reason: "NoLease",
            message: format!("no Lease {LEASE_NAMESPACE}/{host}: its agent has not registered"),
        };
    };
    let renewed = serde_json::to_value(spec).ok().and_then(|s| {
        s.get("renewTime")
            .and_then(Value::as_str)
            .map(str::to_owned)
    });
    let duration = spec.lease_duration_seconds.unwrap_or(0);
    let Some((renewed, at)) = renewed.and_then(|r| parse_micro_time(&r).map(|t| (r, t))) else {
        return Readiness {
            status: "Unknown",
            reason: "NoLease",
            message: format!("Lease {LEASE_NAMESPACE}/{host} was never renewed"),
        };
    };
    if created.is_some_and(|c| at < c) {
        return Readiness {
            status: "Unknown",
            reason: "NoLease",
            message: format!(
                "Lease {LEASE_NAMESPACE}/{host} was last renewed at {renewed}, before this host was made: its agent has not registered"
            ),
        };
    }
    if at + f64::from(duration) >= now {
        Readiness {
            status: "True",
            reason: "LeaseRenewed",
            message: format!("the agent renewed its Lease at {renewed} ({duration}s lease)"),
        }
    } else {
        Readiness {
            status: "False",
            reason: "LeaseExpired",
            message: format!(
                "the agent last renewed its Lease at {renewed}; it expired after {duration}s"
            ),
        }
    }
}

fn current_ready(host: &DynamicObject) -> Option<(String, String)> {
    host.data
        .pointer("/status/conditions")?
        .as_array()?
        .iter()
        .find(|c| c["type"] == "Ready")
        .map(|c| {
            (
                c["status"].as_str().unwrap_or_default().to_owned(),
                c["reason"].as_str().unwrap_or_default().to_owned(),
            )
        })
}

fn now_secs_f64() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// The controller, connected.
#[derive(Debug)]
pub struct HostHealth {
    hosts: Api<DynamicObject>,
    leases: Api<Lease>,
}

impl HostHealth {
    pub async fn connect(kubeconfig: &Path) -> anyhow::Result<Self> {
        let config = Kubeconfig::read_from(kubeconfig)
            .with_context(|| format!("reading {}", kubeconfig.display()))?;
        let config =
            kube::Config::from_custom_kubeconfig(config, &KubeConfigOptions::default()).await?;
        let client = kube::Client::try_from(config)?;
        let host_resource = ApiResource::from_gvk_with_plural(
            &GroupVersionKind::gvk(GROUP, VERSION, "Host"),
            "hosts",
        );
        Ok(Self {
            hosts: Api::all_with(client.clone(), &host_resource),
            leases: Api::namespaced(client, LEASE_NAMESPACE),
        })
    }

    /// One pass: every Host's Ready condition brought in line with its Lease. Returns how many
    /// Hosts changed.
    pub async fn reconcile(&self) -> Result<usize, kube::Error> {
        let hosts = self.hosts.list(&ListParams::default()).await?;
        let leases: BTreeMap<String, Lease> = match self.leases.list(&ListParams::default()).await {
            Ok(list) => list
                .items
                .into_iter()
                .filter_map(|l| l.metadata.name.clone().map(|n| (n, l)))
                .collect(),
            Err(kube::Error::Api(s)) if s.code == 404 => BTreeMap::new(),
            Err(e) => return Err(e),
        };
        let now = now_secs_f64();
        let mut changed = 0;
        for host in &hosts.items {
            let Some(name) = host.metadata.name.as_deref() else {
                continue;
            };
            #[allow(
                clippy::cast_precision_loss,
                reason = "whole seconds of a realistic date fit an f64 exactly"
            )]
            let created = host
                .metadata
                .creation_timestamp
                .as_ref()
                .map(|t| t.0.as_second() as f64);
            let want = readiness(name, leases.get(name), created, now);
            if current_ready(host) == Some((want.status.to_owned(), want.reason.to_owned())) {
                continue;
            }
            let condition = json!({
                "type": "Ready",
                "status": want.status,
                "reason": want.reason,
                "message": want.message,
                "lastTransitionTime": rfc3339(crate::api::meta::now_secs()),
            });
            // Custom kinds take no strategic merge: the list is written whole, other
            // conditions (the provider's Provisioned) kept, at the version it was read at.
            let conditions =
                slipway_api::meta::set_condition(&host.data["status"]["conditions"], condition);
            let patch = json!({
                "metadata": {"resourceVersion": host.metadata.resource_version},
                "status": {"conditions": conditions},
            });
            self.hosts
                .patch_status(name, &PatchParams::default(), &Patch::Merge(&patch))
                .await?;
            info!(
                host = name,
                ready = want.status,
                reason = want.reason,
                "host readiness changed"
            );
            changed += 1;
        }
        Ok(changed)
    }

    /// Reconciles every [`PERIOD`], forever; a failing pass is logged once per outage.
    pub async fn run(self) {
        let mut ticker = tokio::time::interval(PERIOD);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut failing = false;
        loop {
            ticker.tick().await;
            match self.reconcile().await {
                Ok(_) if failing => {
                    info!("host health: the API answers again");
                    failing = false;
                }
                Ok(_) => {}
                Err(e) => {
                    if !failing {
                        warn!(error = %e, "host health: a pass failed; retrying every period");
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

    fn lease(renew: &str, duration: i32) -> Lease {
        serde_json::from_value(json!({
            "metadata": {"name": "h1", "namespace": LEASE_NAMESPACE},
            "spec": {"holderIdentity": "h1", "leaseDurationSeconds": duration, "renewTime": renew},
        }))
        .expect("lease")
    }

    #[test]
    fn ready_follows_the_lease_to_the_fraction_of_a_second() {
        let renew = "2026-12-05T01:00:00.500000Z";
        let at = parse_micro_time(renew).expect("time");
        assert_eq!(parse_micro_time("2026-12-05T01:00:00Z"), Some(at - 0.5));
        let l = lease(renew, 4);
        let made = Some(at - 10.0);
        assert_eq!(readiness("h1", Some(&l), made, at + 3.9).status, "True");
        assert_eq!(readiness("h1", Some(&l), made, at + 4.0).status, "True");
        let expired = readiness("h1", Some(&l), made, at + 4.1);
        assert_eq!((expired.status, expired.reason), ("False", "LeaseExpired"));
        assert!(expired.message.contains(renew), "{}", expired.message);
        let none = readiness("h1", None, made, at);
        assert_eq!((none.status, none.reason), ("Unknown", "NoLease"));
        // A host replaced under the same name: the expired Lease of the one before it does not
        // make the new one expired before its agent registers.
        let replaced = readiness("h1", Some(&l), Some(at + 60.0), at + 61.0);
        assert_eq!((replaced.status, replaced.reason), ("Unknown", "NoLease"));
    }
}
