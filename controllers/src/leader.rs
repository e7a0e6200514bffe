//! Leader election over a `coordination.k8s.io/v1` Lease, as kube-controller-manager's: with
//! three control plane hosts, each runs the controllers only while it holds
//! `kube-system/slipway-controllers`.
//!
//! The holder renews the Lease every [`RENEW`]; another candidate takes it once it has seen
//! the same record unchanged for the Lease's duration by its own clock (never comparing its
//! clock with the holder's), with the record's resourceVersion as the guard, so two candidates
//! never both take it. A holder that cannot renew for the duration stops its controllers
//! before another may take over.

use std::future::Future;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::Api;
use kube::api::PostParams;
use tokio::time::Instant;
use tracing::{info, warn};

/// The Lease's namespace and name.
pub const NAMESPACE: &str = "kube-system";
pub const NAME: &str = "slipway-controllers";

/// How long a Lease holds without a renewal.
pub const DURATION: Duration = Duration::from_secs(4);
/// How often the holder renews, and how often a candidate looks.
pub const RENEW: Duration = Duration::from_secs(1);

/// Runs `work` whenever `identity` holds the Lease, until the task is dropped: `work` is
/// dropped when the Lease is lost and started afresh when it is taken again.
pub async fn run_elected<F, Fut>(client: kube::Client, identity: String, mut work: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = ()>,
{
    let leases: Api<Lease> = Api::namespaced(client, NAMESPACE);
    let mut seen: Option<(String, Instant)> = None;
    loop {
        match try_take(&leases, &identity, &mut seen).await {
            Ok(true) => {
                info!(%identity, "took the controllers' Lease: running the controllers");
                tokio::select! {
                    () = work() => {
                        warn!("the controllers stopped while leading");
                    }
                    () = hold(&leases, &identity) => {
                        warn!(%identity, "lost the controllers' Lease: the controllers stop");
                    }
                }
                seen = None;
            }
            Ok(false) => {}
            Err(e) => warn!(error = %e, "the controllers' Lease: cannot read or write it"),
        }
        tokio::time::sleep(RENEW).await;
    }
}

fn now() -> MicroTime {
    MicroTime(k8s_openapi::jiff::Timestamp::now())
}

fn record(lease: &Lease) -> String {
    let spec = lease.spec.clone().unwrap_or_default();
    format!(
        "{:?}/{:?}/{:?}",
        spec.holder_identity, spec.renew_time, lease.metadata.resource_version
    )
}

/// Takes the Lease if it is free, ours, or unchanged for its duration since `seen`.
async fn try_take(
    leases: &Api<Lease>,
    identity: &str,
    seen: &mut Option<(String, Instant)>,
) -> Result<bool, kube::Error> {
    let duration = i32::try_from(DURATION.as_secs()).unwrap_or(i32::MAX);
    let Some(mut lease) = leases.get_opt(NAME).await? else {
        let lease = Lease {
            metadata: ObjectMeta {
                name: Some(NAME.into()),
                namespace: Some(NAMESPACE.into()),
                ..ObjectMeta::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: Some(identity.into()),
                lease_duration_seconds: Some(duration),
                acquire_time: Some(now()),
                renew_time: Some(now()),
                lease_transitions: Some(0),
                ..LeaseSpec::default()
            }),
        };
        return match leases.create(&PostParams::default(), &lease).await {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
            Err(e) => Err(e),
        };
    };
    let spec = lease.spec.clone().unwrap_or_default();
    let ours = spec.holder_identity.as_deref() == Some(identity);
    let free = spec.holder_identity.as_deref().is_none_or(str::is_empty);
    let current = record(&lease);
    let expired = match seen {
        Some((r, at)) if *r == current => at.elapsed() >= DURATION,
        _ => {
            *seen = Some((current, Instant::now()));
            false
        }
    };
    if !(ours || free || expired) {
        return Ok(false);
    }
    let transitions = spec.lease_transitions.unwrap_or(0) + i32::from(!ours);
    lease.spec = Some(LeaseSpec {
        holder_identity: Some(identity.into()),
        lease_duration_seconds: Some(duration),
        acquire_time: if ours { spec.acquire_time } else { Some(now()) },
        renew_time: Some(now()),
        lease_transitions: Some(transitions),
        ..spec
    });
    match leases.replace(NAME, &PostParams::default(), &lease).await {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
        Err(e) => Err(e),
    }
}

/// Renews the Lease every [`RENEW`]; returns when it is lost (another holder) or could not be
/// renewed for [`DURATION`] (less a renewal, so this holder stops before another may start).
async fn hold(leases: &Api<Lease>, identity: &str) {
    let mut renewed = Instant::now();
    loop {
        tokio::time::sleep(RENEW).await;
        let mut seen = None;
        match try_take(leases, identity, &mut seen).await {
            Ok(true) => renewed = Instant::now(),
            Ok(false) => return,
            Err(e) => warn!(error = %e, "renewing the controllers' Lease"),
        }
        if renewed.elapsed() + RENEW >= DURATION {
            return;
        }
    }
}
