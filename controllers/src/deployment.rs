//! Deployment (apps/v1): one ReplicaSet per Pod template (named and labelled by its
//! `pod-template-hash`), rolled by the strategy: RollingUpdate keeps at most
//! `replicas + maxSurge` Pods and at least `replicas - maxUnavailable` available ones (ints or
//! percentages, surge rounded up and unavailability down, as upstream); Recreate scales the
//! old ReplicaSets to zero and waits for their Pods to go before starting the new one. Status
//! carries what `kubectl rollout status` reads (observedGeneration, replicas, updated, ready,
//! available) and the Available and Progressing conditions. Availability is counted from the
//! Pods themselves, never from a ReplicaSet status that may lag.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use k8s_openapi::api::apps::v1::{
    Deployment, DeploymentCondition, DeploymentStatus, ReplicaSet, ReplicaSetSpec,
};
use k8s_openapi::api::core::v1::{Pod, PodTemplateSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::watcher;
use kube::{Client, ResourceExt};
use serde_json::json;
use tracing::{debug, info, warn};

use crate::events::{self, Type};
use crate::pods::{controller_ref, controller_uid, is_active, is_ready};
use crate::{Error, Options, api_err};

const NAME: &str = "deployment";
/// The label that tells a Deployment's ReplicaSets (and their Pods) apart.
pub const HASH_LABEL: &str = "pod-template-hash";
/// The revision annotation upstream puts on a Deployment's ReplicaSets.
pub const REVISION: &str = "deployment.kubernetes.io/revision";

struct Ctx {
    client: Client,
    options: Arc<Options>,
}

/// Runs the Deployment controller.
pub async fn run(client: Client, options: Arc<Options>) {
    let ctx = Arc::new(Ctx {
        client: client.clone(),
        options,
    });
    Controller::new(
        Api::<Deployment>::all(client.clone()),
        watcher::Config::default(),
    )
    .owns(Api::<ReplicaSet>::all(client), watcher::Config::default())
    .run(reconcile, error_policy, ctx)
    .for_each(|r| async move {
        if let Err(e) = r {
            debug!(controller = NAME, error = %e, "reconcile");
        }
    })
    .await;
}

fn error_policy(d: Arc<Deployment>, e: &Error, ctx: Arc<Ctx>) -> Action {
    ctx.options.metrics.failed(NAME);
    warn!(deployment = %d.name_any(), error = %e, "reconcile failed; retrying");
    Action::requeue(Duration::from_secs(1))
}

/// The hash of a Pod template (FNV-1a over its JSON), spelled in the letters upstream uses
/// for generated names (no vowels, so no words).
pub fn template_hash(template: &PodTemplateSpec) -> String {
    let mut t = template.clone();
    if let Some(labels) = t.metadata.as_mut().and_then(|m| m.labels.as_mut()) {
        labels.remove(HASH_LABEL);
    }
    let bytes = serde_json::to_vec(&t).unwrap_or_default();
    let mut h: u32 = 0x811c_9dc5;
    for b in bytes {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    h.to_string()
        .bytes()
        .map(|d| char::from(ALPHABET[usize::from(d - b'0') % ALPHABET.len()]))
        .collect()
}

/// An int-or-percent of `total`: percentages rounded up (`round_up`) or down.
pub fn resolve(v: Option<&IntOrString>, total: i32, round_up: bool) -> i32 {
    match v {
        Some(IntOrString::Int(n)) => *n,
        Some(IntOrString::String(s)) => {
            let pct: i64 = s.trim_end_matches('%').parse().unwrap_or(0);
            let scaled = pct * i64::from(total);
            let n = if round_up {
                (scaled + 99) / 100
            } else {
                scaled / 100
            };
            i32::try_from(n).unwrap_or(i32::MAX)
        }
        None => 0,
    }
}

/// (maxSurge, maxUnavailable) of a RollingUpdate Deployment; never both zero.
pub fn surge_and_unavailable(d: &Deployment, replicas: i32) -> (i32, i32) {
    let ru = d
        .spec
        .as_ref()
        .and_then(|s| s.strategy.as_ref())
        .and_then(|s| s.rolling_update.as_ref());
    let default = IntOrString::String("25%".into());
    let surge = resolve(
        Some(ru.and_then(|r| r.max_surge.as_ref()).unwrap_or(&default)),
        replicas,
        true,
    );
    let unavailable = resolve(
        Some(
            ru.and_then(|r| r.max_unavailable.as_ref())
                .unwrap_or(&default),
        ),
        replicas,
        false,
    )
    .min(replicas);
    if surge == 0 && unavailable == 0 {
        (0, 1)
    } else {
        (surge, unavailable)
    }
}

fn spec_replicas(rs: &ReplicaSet) -> i32 {
    rs.spec.as_ref().and_then(|s| s.replicas).unwrap_or(0)
}

fn revision(rs: &ReplicaSet) -> i64 {
    rs.annotations()
        .get(REVISION)
        .and_then(|r| r.parse().ok())
        .unwrap_or(0)
}

/// What the Pods of one ReplicaSet are doing.
#[derive(Debug, Default, Clone, Copy)]
struct Counts {
    active: i32,
    ready: i32,
}

/// The ReplicaSet `d` wants for its current template.
fn new_replicaset(d: &Deployment, hash: &str, replicas: i32, revision: i64) -> Option<ReplicaSet> {
    let spec = d.spec.as_ref()?;
    let mut template = spec.template.clone();
    let meta = template.metadata.get_or_insert_with(ObjectMeta::default);
    meta.labels
        .get_or_insert_with(BTreeMap::new)
        .insert(HASH_LABEL.into(), hash.into());
    let mut selector = spec.selector.clone();
    selector
        .match_labels
        .get_or_insert_with(BTreeMap::new)
        .insert(HASH_LABEL.into(), hash.into());
    Some(ReplicaSet {
        metadata: ObjectMeta {
            name: Some(format!("{}-{hash}", d.name_any())),
            namespace: d.namespace(),
            labels: meta.labels.clone(),
            annotations: Some(BTreeMap::from([(REVISION.into(), revision.to_string())])),
            owner_references: Some(vec![controller_ref(d)?]),
            ..ObjectMeta::default()
        },
        spec: Some(ReplicaSetSpec {
            replicas: Some(replicas),
            min_ready_seconds: spec.min_ready_seconds,
            selector,
            template: Some(template),
        }),
        status: None,
    })
}

async fn scale(
    client: &Client,
    d: &Deployment,
    api: &Api<ReplicaSet>,
    rs: &ReplicaSet,
    replicas: i32,
) -> Result<(), Error> {
    if spec_replicas(rs) == replicas {
        return Ok(());
    }
    let name = rs.name_any();
    api.patch(
        &name,
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"replicas": replicas}})),
    )
    .await
    .map_err(api_err("scale", format!("replicaset {name}")))?;
    info!(replicaset = %name, from = spec_replicas(rs), to = replicas, "scaled");
    let way = if replicas > spec_replicas(rs) {
        "up"
    } else {
        "down"
    };
    events::publish(
        client,
        d,
        Type::Normal,
        "ScalingReplicaSet",
        format!(
            "Scaled {way} replica set {name} from {} to {replicas}",
            spec_replicas(rs)
        ),
    )
    .await;
    Ok(())
}

async fn reconcile(d: Arc<Deployment>, ctx: Arc<Ctx>) -> Result<Action, Error> {
    ctx.options.metrics.reconciled(NAME);
    if d.metadata.deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    let Some(spec) = d.spec.as_ref() else {
        return Ok(Action::await_change());
    };
    let name = d.name_any();
    let ns = d.namespace().unwrap_or_default();
    let uid = d.uid().unwrap_or_default();
    let rs_api = Api::<ReplicaSet>::namespaced(ctx.client.clone(), &ns);
    let mut sets: Vec<ReplicaSet> = rs_api
        .list(&ListParams::default())
        .await
        .map_err(api_err("list", format!("replicasets in {ns}")))?
        .items
        .into_iter()
        .filter(|rs| controller_uid(rs) == Some(uid.as_str()))
        .collect();
    sets.sort_by_key(|rs| {
        (
            revision(rs),
            rs.metadata.creation_timestamp.clone().map(|t| t.0),
        )
    });
    let pods = Api::<Pod>::namespaced(ctx.client.clone(), &ns)
        .list(&ListParams::default())
        .await
        .map_err(api_err("list", format!("pods in {ns}")))?;
    let mut counts: BTreeMap<String, Counts> = BTreeMap::new();
    for p in pods.items.iter().filter(|p| is_active(p)) {
        if let Some(owner) = controller_uid(p) {
            let c = counts.entry(owner.to_string()).or_default();
            c.active += 1;
            c.ready += i32::from(is_ready(p));
        }
    }
    let count = |rs: &ReplicaSet| {
        counts
            .get(&rs.uid().unwrap_or_default())
            .copied()
            .unwrap_or_default()
    };
    // Pods a ReplicaSet keeps: its controller deletes the not-ready ones first.
    let available = |rs: &ReplicaSet| count(rs).ready.min(spec_replicas(rs));

    let replicas = spec.replicas.unwrap_or(1).max(0);
    let hash = template_hash(&spec.template);
    let (new_rs, old): (Vec<ReplicaSet>, Vec<ReplicaSet>) = sets
        .into_iter()
        .partition(|rs| rs.labels().get(HASH_LABEL) == Some(&hash));
    let mut new_rs = new_rs.into_iter().next();
    let recreate = spec.strategy.as_ref().and_then(|s| s.type_.as_deref()) == Some("Recreate");
    let old_total: i32 = old.iter().map(spec_replicas).sum();

    if recreate {
        for rs in &old {
            scale(&ctx.client, &d, &rs_api, rs, 0).await?;
        }
        let old_pods: i32 = old.iter().map(|rs| count(rs).active).sum();
        if old_pods == 0 {
            match &new_rs {
                Some(rs) => scale(&ctx.client, &d, &rs_api, rs, replicas).await?,
                None => {
                    new_rs = Some(create(&ctx.client, &rs_api, &d, &hash, replicas, &old).await?)
                }
            }
        }
    } else {
        let (surge, unavailable) = surge_and_unavailable(&d, replicas);
        // The new ReplicaSet grows as far as the surge allows.
        let new_spec = new_rs.as_ref().map(spec_replicas);
        let target = new_target(replicas, surge, new_spec, old_total);
        match &new_rs {
            None => {
                new_rs = Some(create(&ctx.client, &rs_api, &d, &hash, target, &old).await?);
            }
            Some(rs) => scale(&ctx.client, &d, &rs_api, rs, target).await?,
        }
        // The old ones shrink as far as availability allows.
        let new_now = (new_spec.unwrap_or(0), new_rs.as_ref().map_or(0, available));
        let old_now: Vec<(i32, i32)> = old
            .iter()
            .map(|rs| (spec_replicas(rs), available(rs)))
            .collect();
        let targets = old_targets(replicas, unavailable, new_now, &old_now);
        for (rs, n) in old.iter().zip(targets) {
            scale(&ctx.client, &d, &rs_api, rs, n).await?;
        }
    }
    cleanup(&rs_api, &d, &old, &count).await?;

    // Status, from the Pods.
    let all: Vec<&ReplicaSet> = old.iter().chain(new_rs.as_ref()).collect();
    let total = all.iter().map(|rs| count(rs).active).sum::<i32>();
    let ready = all.iter().map(|rs| count(rs).ready).sum::<i32>();
    let updated = new_rs.as_ref().map_or(0, |rs| count(rs).active);
    let new_ready = new_rs.as_ref().map_or(0, |rs| count(rs).ready);
    let (_, unavailable) = if recreate {
        (0, 0)
    } else {
        surge_and_unavailable(&d, replicas)
    };
    let complete = updated == replicas && total == replicas && new_ready == replicas;
    let available_ok = ready >= replicas - unavailable;
    let old_conditions = d
        .status
        .as_ref()
        .and_then(|s| s.conditions.clone())
        .unwrap_or_default();
    let new_rs_name = new_rs.as_ref().map(|rs| rs.name_any()).unwrap_or_default();
    // Progress: a new generation, or more updated or available Pods than last written.
    let progressed = d.status.as_ref().is_none_or(|s| {
        s.observed_generation != d.metadata.generation
            || s.updated_replicas.unwrap_or(0) < updated
            || s.available_replicas.unwrap_or(0) < ready
    });
    let conditions = vec![
        condition(
            &old_conditions,
            "Available",
            available_ok,
            if available_ok {
                "MinimumReplicasAvailable"
            } else {
                "MinimumReplicasUnavailable"
            },
            if available_ok {
                "Deployment has minimum availability.".to_string()
            } else {
                "Deployment does not have minimum availability.".to_string()
            },
        ),
        progressing(
            &old_conditions,
            Progress {
                complete,
                progressed,
                deadline: i64::from(spec.progress_deadline_seconds.unwrap_or(600)),
                now: Timestamp::now(),
            },
            &new_rs_name,
        ),
    ];
    let status = DeploymentStatus {
        observed_generation: d.metadata.generation,
        replicas: Some(total),
        updated_replicas: Some(updated),
        ready_replicas: Some(ready),
        available_replicas: Some(ready),
        unavailable_replicas: Some((replicas - ready).max(0)),
        conditions: Some(conditions),
        collision_count: None,
        terminating_replicas: None,
    };
    if d.status.as_ref() != Some(&status) {
        Api::<Deployment>::namespaced(ctx.client.clone(), &ns)
            .patch_status(
                &name,
                &PatchParams::default(),
                &Patch::Merge(json!({"status": status})),
            )
            .await
            .map_err(api_err("patch status", format!("deployment {ns}/{name}")))?;
    }
    Ok(if complete {
        Action::await_change()
    } else {
        Action::requeue(Duration::from_secs(2))
    })
}

/// The new ReplicaSet's replicas for one RollingUpdate step (`new`: its replicas now, `None`
/// before it exists): all of `replicas` when nothing old is left, else grown as far as
/// `replicas + surge` Pods in all allow, never beyond `replicas`.
pub fn new_target(replicas: i32, surge: i32, new: Option<i32>, old_total: i32) -> i32 {
    let now = new.unwrap_or(0);
    if now > replicas {
        return replicas;
    }
    if new.is_none() && old_total == 0 {
        return replicas;
    }
    let room = replicas + surge - old_total - now;
    now + room.clamp(0, replicas - now)
}

/// Each old ReplicaSet's replicas (oldest first) for one RollingUpdate step, from
/// `(replicas, available)` of the new one and each old one: first the old Pods that are not
/// available anyway go, as far as keeping `replicas - unavailable` available allows counting
/// the new ones not yet available, then available old ones down to that minimum (upstream's
/// cleanupUnhealthyReplicas and scaleDownOldReplicaSetsForRollingUpdate).
pub fn old_targets(
    replicas: i32,
    unavailable: i32,
    new: (i32, i32),
    old: &[(i32, i32)],
) -> Vec<i32> {
    let mut out: Vec<i32> = old.iter().map(|(n, _)| *n).collect();
    let old_total: i32 = out.iter().sum();
    let min_available = replicas - unavailable;
    let max_down = old_total + new.0 - min_available - (new.0 - new.1).max(0);
    if max_down <= 0 || old_total == 0 {
        return out;
    }
    let mut cleaned = 0;
    for (n, (_, avail)) in out.iter_mut().zip(old) {
        let down = (*n - avail).max(0).min(max_down - cleaned);
        *n -= down;
        cleaned += down;
    }
    let total_available: i32 = out
        .iter()
        .zip(old)
        .map(|(n, (_, avail))| (*avail).min(*n))
        .sum::<i32>()
        + new.1;
    let mut budget = (total_available - min_available).max(0);
    for n in &mut out {
        let down = (*n).min(budget);
        *n -= down;
        budget -= down;
    }
    out
}

/// A condition, keeping its times when its status and reason did not change.
fn condition(
    old: &[DeploymentCondition],
    type_: &str,
    ok: bool,
    reason: &str,
    message: String,
) -> DeploymentCondition {
    let status = if ok { "True" } else { "False" };
    if let Some(c) = old.iter().find(|c| c.type_ == type_)
        && c.status == status
        && c.reason.as_deref() == Some(reason)
        && c.message.as_deref() == Some(message.as_str())
    {
        return c.clone();
    }
    let now = Some(Time(Timestamp::now()));
    let transition = old
        .iter()
        .find(|c| c.type_ == type_ && c.status == status)
        .and_then(|c| c.last_transition_time.clone())
        .or_else(|| now.clone());
    DeploymentCondition {
        type_: type_.into(),
        status: status.into(),
        reason: Some(reason.into()),
        message: Some(message),
        last_update_time: now,
        last_transition_time: transition,
    }
}

/// Where a rollout stands, for its Progressing condition.
#[derive(Debug, Clone, Copy)]
pub struct Progress {
    /// Every replica updated and available, no old Pod left.
    pub complete: bool,
    /// Something moved since the status was last written.
    pub progressed: bool,
    /// `spec.progressDeadlineSeconds`.
    pub deadline: i64,
    /// Now.
    pub now: Timestamp,
}

/// The Progressing condition, as upstream: True `NewReplicaSetAvailable` when complete, True
/// `ReplicaSetUpdated` while it moves (its lastUpdateTime the last move), False
/// `ProgressDeadlineExceeded` once it has not moved for `progressDeadlineSeconds` (which
/// `kubectl rollout status` reports as a failure).
pub fn progressing(old: &[DeploymentCondition], p: Progress, new_rs: &str) -> DeploymentCondition {
    let current = old.iter().find(|c| c.type_ == "Progressing");
    if p.complete {
        return condition(
            old,
            "Progressing",
            true,
            "NewReplicaSetAvailable",
            format!("ReplicaSet {new_rs:?} has successfully progressed."),
        );
    }
    let since = current
        .and_then(|c| c.last_update_time.as_ref())
        .map_or(p.now.as_second(), |t| t.0.as_second());
    let stuck = current.is_some_and(|c| {
        c.reason.as_deref() == Some("ProgressDeadlineExceeded")
            || (c.reason.as_deref() == Some("ReplicaSetUpdated")
                && p.now.as_second() - since > p.deadline)
    });
    if stuck && !p.progressed {
        return condition(
            old,
            "Progressing",
            false,
            "ProgressDeadlineExceeded",
            format!("ReplicaSet {new_rs:?} has timed out progressing."),
        );
    }
    let mut c = condition(
        old,
        "Progressing",
        true,
        "ReplicaSetUpdated",
        format!("ReplicaSet {new_rs:?} is progressing."),
    );
    if p.progressed {
        c.last_update_time = Some(Time(p.now));
    }
    c
}

async fn create(
    client: &Client,
    api: &Api<ReplicaSet>,
    d: &Deployment,
    hash: &str,
    replicas: i32,
    old: &[ReplicaSet],
) -> Result<ReplicaSet, Error> {
    let rev = old.iter().map(revision).max().unwrap_or(0) + 1;
    let rs = new_replicaset(d, hash, replicas, rev).ok_or(Error::Missing {
        kind: "Deployment",
        name: d.name_any(),
        field: "spec or metadata.uid",
    })?;
    let name = rs.name_any();
    match api.create(&PostParams::default(), &rs).await {
        Ok(created) => {
            info!(deployment = %d.name_any(), replicaset = %name, replicas, "created replicaset");
            events::publish(
                client,
                d,
                Type::Normal,
                "ScalingReplicaSet",
                format!("Scaled up replica set {name} to {replicas}"),
            )
            .await;
            Ok(created)
        }
        // Created by an earlier run that stopped before it could see it: use it.
        Err(kube::Error::Api(e)) if e.code == 409 => api
            .get(&name)
            .await
            .map_err(api_err("get", format!("replicaset {name}"))),
        Err(e) => Err(api_err("create", format!("replicaset {name}"))(e)),
    }
}

/// Deletes the oldest empty old ReplicaSets beyond `revisionHistoryLimit`.
async fn cleanup(
    api: &Api<ReplicaSet>,
    d: &Deployment,
    old: &[ReplicaSet],
    count: &impl Fn(&ReplicaSet) -> Counts,
) -> Result<(), Error> {
    let limit = d
        .spec
        .as_ref()
        .and_then(|s| s.revision_history_limit)
        .unwrap_or(10)
        .max(0) as usize;
    let empty: Vec<&ReplicaSet> = old
        .iter()
        .filter(|rs| spec_replicas(rs) == 0 && count(rs).active == 0)
        .collect();
    for rs in empty.iter().take(empty.len().saturating_sub(limit)) {
        match api.delete(&rs.name_any(), &DeleteParams::default()).await {
            Ok(_) | Err(kube::Error::Api(_)) => {}
            Err(e) => {
                return Err(api_err("delete", format!("replicaset {}", rs.name_any()))(
                    e,
                ));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rolling_update_step_by_step() {
        // 4 replicas, maxSurge 1, maxUnavailable 1; the old set has 4 available Pods.
        assert_eq!(new_target(4, 1, None, 4), 1);
        assert_eq!(old_targets(4, 1, (0, 0), &[(4, 4)]), vec![3]);
        // The new set (1, not yet available) and the old (3): one more new Pod fits.
        assert_eq!(new_target(4, 1, Some(1), 3), 2);
        // With nothing new available, 3 old available Pods stay.
        assert_eq!(old_targets(4, 1, (2, 0), &[(3, 3)]), vec![3]);
        // Two new ones available: two old ones may go.
        assert_eq!(old_targets(4, 1, (2, 2), &[(3, 3)]), vec![1]);
        // Old Pods that are not available go first, within the budget.
        // (6 Pods in all, 3 must stay available, 2 new ones may yet become so: 1 may go.)
        assert_eq!(old_targets(4, 1, (2, 0), &[(2, 0), (2, 2)]), vec![1, 2]);
        assert_eq!(old_targets(4, 1, (2, 2), &[(2, 0), (2, 2)]), vec![0, 1]);
        // Done: the new set holds all, nothing old is left.
        assert_eq!(new_target(4, 1, Some(4), 0), 4);
        assert_eq!(old_targets(4, 1, (4, 4), &[(0, 0)]), vec![0]);
        // Scaled down while rolling: the new set never holds more than replicas.
        assert_eq!(new_target(2, 1, Some(3), 0), 2);
    }

    #[test]
    fn progress_deadline() {
        let at = |s: i64| Timestamp::from_second(s).unwrap_or(Timestamp::UNIX_EPOCH);
        let p = |now: i64, progressed: bool| Progress {
            complete: false,
            progressed,
            deadline: 10,
            now: at(now),
        };
        let first = progressing(&[], p(100, true), "web-x");
        assert_eq!(first.reason.as_deref(), Some("ReplicaSetUpdated"));
        let waiting = progressing(std::slice::from_ref(&first), p(105, false), "web-x");
        assert_eq!(waiting.status, "True");
        let stuck = progressing(std::slice::from_ref(&waiting), p(111, false), "web-x");
        assert_eq!(
            (stuck.status.as_str(), stuck.reason.as_deref()),
            ("False", Some("ProgressDeadlineExceeded"))
        );
        let moving = progressing(std::slice::from_ref(&stuck), p(112, true), "web-x");
        assert_eq!(moving.status, "True");
        let done = progressing(
            &[moving],
            Progress {
                complete: true,
                ..p(113, true)
            },
            "web-x",
        );
        assert_eq!(done.reason.as_deref(), Some("NewReplicaSetAvailable"));
    }

    #[test]
    fn percentages_round_as_upstream() {
        let pct = IntOrString::String("25%".into());
        assert_eq!(resolve(Some(&pct), 3, true), 1);
        assert_eq!(resolve(Some(&pct), 3, false), 0);
        assert_eq!(resolve(Some(&pct), 4, false), 1);
        assert_eq!(resolve(Some(&IntOrString::Int(2)), 10, true), 2);
    }

    #[test]
    fn hash_ignores_its_own_label_and_changes_with_the_template() {
        let mut t = PodTemplateSpec::default();
        let h = template_hash(&t);
        t.metadata = Some(ObjectMeta {
            labels: Some(BTreeMap::from([(HASH_LABEL.into(), h.clone())])),
            ..ObjectMeta::default()
        });
        let with_label = template_hash(&t);
        t.metadata = Some(ObjectMeta {
            labels: Some(BTreeMap::new()),
            ..ObjectMeta::default()
        });
        assert_eq!(with_label, template_hash(&t));
        t.spec = Some(Default::default());
        assert_ne!(h, template_hash(&t));
        assert!(
            h.bytes()
                .all(|b| b"bcdfghjklmnpqrstvwxz2456789".contains(&b))
        );
    }
}
