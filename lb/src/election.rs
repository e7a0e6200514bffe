//! VIP ownership among edge hosts: one `coordination.k8s.io/v1` Lease per VIP (named
//! [`lease_name`]) in the supervisor. Every edge host serves every VIP in its maps (identical
//! Maglev tables), but only the Lease's holder announces it (answers ARP/NDP, sends gratuitous
//! ARP when it takes it). Each round ([`ROUND`]) a host renews the Leases it holds, takes a
//! free or expired one (its holder stopped renewing for `leaseDurationSeconds`), and drops the
//! VIPs it no longer serves. Every write carries the resourceVersion it read, so two hosts
//! racing for one Lease cannot both win.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease as KubeLease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::Client;
use kube::api::{Api, DeleteParams, PostParams};
use tokio::sync::watch;
use tracing::{info, warn};

use crate::announce::Lease;
use crate::feed::Desired;

/// How often a host renews and looks for Leases to take.
pub const ROUND: Duration = Duration::from_millis(200);
/// How long a Lease holds without renewal. `leaseDurationSeconds` counts whole seconds (it
/// says 1); the exact figure rides in [`DURATION_ANNOTATION`], which edge hosts read first, so
/// a VIP moves within a second of its owner's death.
pub const LEASE_DURATION: Duration = Duration::from_millis(600);
/// `leaseDurationSeconds`: [`LEASE_DURATION`] rounded up.
pub const LEASE_SECONDS: i32 = 1;
/// The annotation carrying a VIP Lease's duration in milliseconds.
pub const DURATION_ANNOTATION: &str = "slipway.dev/lease-duration-ms";

pub use slipway_api::slipway::vip_lease_name as lease_name;

/// The VIPs this host holds the Leases of, as the announcer asks.
#[derive(Debug, Default)]
pub struct VipLeases {
    held: Mutex<BTreeSet<IpAddr>>,
}

impl VipLeases {
    fn set(&self, held: BTreeSet<IpAddr>) -> bool {
        let mut now = self.held.lock().unwrap_or_else(|p| p.into_inner());
        let changed = *now != held;
        *now = held;
        changed
    }
}

impl Lease for VipLeases {
    fn holds(&self, vip: IpAddr) -> bool {
        self.held
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(&vip)
    }
}

/// What a host should do with a Lease it read: pure, for the unit tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Nobody holds it: create it.
    Create,
    /// Ours: renew it.
    Renew,
    /// Another's, expired: take it over.
    TakeOver,
    /// Another's, live: leave it.
    Leave,
}

/// The step for a Lease as read (`None`: absent) by `holder` at `now`.
pub fn step(lease: Option<&KubeLease>, holder: &str, now: Timestamp) -> Step {
    let Some(lease) = lease else {
        return Step::Create;
    };
    let spec = lease.spec.clone().unwrap_or_default();
    if spec.holder_identity.as_deref() == Some(holder) {
        return Step::Renew;
    }
    let millis = lease
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(DURATION_ANNOTATION))
        .and_then(|v| v.parse::<i64>().ok())
        .unwrap_or_else(|| 1000 * i64::from(spec.lease_duration_seconds.unwrap_or(LEASE_SECONDS)));
    let duration = SignedDuration::from_millis(millis);
    let expired = match spec.renew_time.or(spec.acquire_time) {
        Some(MicroTime(t)) => t.checked_add(duration).is_ok_and(|end| end < now),
        None => true,
    };
    if expired || spec.holder_identity.as_deref().is_none_or(str::is_empty) {
        Step::TakeOver
    } else {
        Step::Leave
    }
}

/// Holds the Leases of the VIPs `desired` names, as `holder`, until the task is dropped; calls
/// `changed` after a round that changed what this host holds.
pub async fn run(
    client: Client,
    namespace: String,
    holder: String,
    leases: Arc<VipLeases>,
    mut desired: watch::Receiver<Option<Desired>>,
    changed: impl Fn() + Send + 'static,
) {
    let api: Api<KubeLease> = Api::namespaced(client, &namespace);
    let mut every = tokio::time::interval(ROUND);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut mine: BTreeSet<IpAddr> = BTreeSet::new();
    loop {
        every.tick().await;
        let vips: BTreeSet<IpAddr> = desired
            .borrow_and_update()
            .iter()
            .flat_map(|d| d.values().filter_map(|s| s.load_balancer_ip))
            .collect();
        let now = Timestamp::now();
        let mut held = BTreeSet::new();
        for vip in &vips {
            match hold(&api, *vip, &holder, now).await {
                Ok(true) => {
                    if !mine.contains(vip) {
                        info!(%vip, %holder, "VIP lease taken: announcing");
                    }
                    held.insert(*vip);
                }
                Ok(false) => {
                    if mine.contains(vip) {
                        warn!(%vip, %holder, "VIP lease lost: withdrawing");
                    }
                }
                // A host that cannot reach the API stops announcing once its Leases would
                // have expired: keep what it held for this round only.
                Err(e) => {
                    warn!(%vip, error = %e, "VIP lease not renewed");
                }
            }
        }
        // VIPs no longer served: release their Leases so another host need not wait.
        for vip in mine.difference(&vips) {
            match api
                .delete(&lease_name(*vip), &DeleteParams::default())
                .await
            {
                Ok(_) => info!(%vip, "VIP lease released"),
                Err(kube::Error::Api(s)) if s.code == 404 => {}
                Err(e) => warn!(%vip, error = %e, "releasing a VIP lease"),
            }
        }
        mine.clone_from(&held);
        if leases.set(held) {
            changed();
        }
    }
}

fn annotations() -> std::collections::BTreeMap<String, String> {
    std::collections::BTreeMap::from([(
        DURATION_ANNOTATION.to_owned(),
        LEASE_DURATION.as_millis().to_string(),
    )])
}

/// One round for one VIP: whether this host holds its Lease after it.
async fn hold(
    api: &Api<KubeLease>,
    vip: IpAddr,
    holder: &str,
    now: Timestamp,
) -> Result<bool, kube::Error> {
    let name = lease_name(vip);
    let current = api.get_opt(&name).await?;
    let micro = MicroTime(now);
    let result = match step(current.as_ref(), holder, now) {
        Step::Leave => return Ok(false),
        Step::Create => {
            let lease = KubeLease {
                metadata: ObjectMeta {
                    name: Some(name.clone()),
                    annotations: Some(annotations()),
                    ..ObjectMeta::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(holder.to_owned()),
                    lease_duration_seconds: Some(LEASE_SECONDS),
                    acquire_time: Some(micro.clone()),
                    renew_time: Some(micro),
                    lease_transitions: Some(0),
                    ..LeaseSpec::default()
                }),
            };
            api.create(&PostParams::default(), &lease).await.map(drop)
        }
        Step::Renew | Step::TakeOver => {
            let Some(mut lease) = current else {
                return Ok(false);
            };
            let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
            if spec.holder_identity.as_deref() != Some(holder) {
                spec.holder_identity = Some(holder.to_owned());
                spec.acquire_time = Some(micro.clone());
                spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
            }
            spec.lease_duration_seconds = Some(LEASE_SECONDS);
            spec.renew_time = Some(micro);
            lease
                .metadata
                .annotations
                .get_or_insert_with(Default::default)
                .extend(annotations());
            api.replace(&name, &PostParams::default(), &lease)
                .await
                .map(drop)
        }
    };
    match result {
        Ok(()) => Ok(true),
        // Another host wrote first: not ours this round.
        Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(holder: &str, renewed: Timestamp) -> KubeLease {
        KubeLease {
            metadata: ObjectMeta::default(),
            spec: Some(LeaseSpec {
                holder_identity: Some(holder.into()),
                lease_duration_seconds: Some(1),
                renew_time: Some(MicroTime(renewed)),
                ..LeaseSpec::default()
            }),
        }
    }

    #[test]
    fn a_live_lease_is_left_to_its_holder_and_an_expired_one_taken() {
        let now = Timestamp::now();
        let ms = |n: i64| SignedDuration::from_millis(n);
        assert_eq!(step(None, "a", now), Step::Create);
        let fresh = lease("b", now.checked_sub(ms(300)).unwrap_or(now));
        assert_eq!(step(Some(&fresh), "a", now), Step::Leave);
        assert_eq!(step(Some(&fresh), "b", now), Step::Renew);
        let stale = lease("b", now.checked_sub(ms(1500)).unwrap_or(now));
        assert_eq!(step(Some(&stale), "a", now), Step::TakeOver);
        let mut short = lease("b", now.checked_sub(ms(700)).unwrap_or(now));
        short.metadata.annotations = Some(annotations());
        assert_eq!(
            step(Some(&short), "a", now),
            Step::TakeOver,
            "the annotation's 600 ms rule over the whole-second field"
        );
    }

    #[test]
    fn lease_names_are_dns_labels() {
        assert_eq!(
            lease_name("10.99.100.1".parse().unwrap_or_else(|e| panic!("{e}"))),
            "vip-10-99-100-1"
        );
        assert_eq!(
            lease_name("fd99:100::1".parse().unwrap_or_else(|e| panic!("{e}"))),
            "vip-fd99-100--1"
        );
    }
}
