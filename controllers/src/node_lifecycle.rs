//! Node lifecycle: a Node whose heartbeat (its Ready condition's `lastHeartbeatTime`, or its
//! Lease in `kube-node-lease`) is older than the grace period, when one is set, gets
//! Ready=Unknown; a Node whose Ready condition is False gets the `node.kubernetes.io/not-ready`
//! NoSchedule and NoExecute taints, Unknown the `unreachable` ones, True none of them, and the
//! Pods of a Node that is not Ready are marked not ready. The Pods on a Node with a NoExecute
//! taint are deleted once their toleration of it runs out (`tolerationSeconds`, or the
//! configured default for a Pod without a toleration of its own), so their ReplicaSets
//! recreate them elsewhere.

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Node, NodeCondition, Pod, Taint};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::watcher;
use kube::{Client, ResourceExt};
use serde_json::json;
use tracing::{debug, info, warn};

use crate::events::{self, Type};
use crate::placement::{NOT_READY_TAINT, UNREACHABLE_TAINT, ready_status, toleration_of};
use crate::pods::is_active;
use crate::{Error, Options, api_err};

const NAME: &str = "node-lifecycle";

struct Ctx {
    client: Client,
    options: Arc<Options>,
}

/// Runs node lifecycle.
pub async fn run(client: Client, options: Arc<Options>) {
    let ctx = Arc::new(Ctx {
        client: client.clone(),
        options,
    });
    Controller::new(Api::<Node>::all(client), watcher::Config::default())
        .run(reconcile, error_policy, ctx)
        .for_each(|r| async move {
            if let Err(e) = r {
                debug!(controller = NAME, error = %e, "reconcile");
            }
        })
        .await;
}

fn error_policy(node: Arc<Node>, e: &Error, ctx: Arc<Ctx>) -> Action {
    ctx.options.metrics.failed(NAME);
    warn!(node = %node.name_any(), error = %e, "reconcile failed; retrying");
    Action::requeue(Duration::from_secs(1))
}

fn seconds(t: &Time) -> i64 {
    t.0.as_second()
}

/// The taints a Node should have for its Ready status, in place of the lifecycle taints it
/// has (times kept for taints already there).
pub fn wanted_taints(current: &[Taint], ready: &str, now: &Time) -> Vec<Taint> {
    let key = match ready {
        "True" => None,
        "False" => Some(NOT_READY_TAINT),
        _ => Some(UNREACHABLE_TAINT),
    };
    let mut out: Vec<Taint> = current
        .iter()
        .filter(|t| t.key != NOT_READY_TAINT && t.key != UNREACHABLE_TAINT)
        .cloned()
        .collect();
    if let Some(key) = key {
        for effect in ["NoSchedule", "NoExecute"] {
            let kept = current
                .iter()
                .find(|t| t.key == key && t.effect == effect)
                .cloned();
            out.push(kept.unwrap_or_else(|| Taint {
                key: key.into(),
                effect: effect.into(),
                time_added: (effect == "NoExecute").then(|| now.clone()),
                value: None,
            }));
        }
    }
    out
}

/// When a Pod must leave a Node with these NoExecute taints (seconds since the epoch, never
/// before `tolerationSeconds` have passed since the taint came), or `None` when it tolerates
/// them for ever.
pub fn eviction_time(pod: &Pod, taints: &[Taint], default_seconds: i64, now: i64) -> Option<i64> {
    taints
        .iter()
        .filter(|t| t.effect == "NoExecute")
        .filter_map(|t| {
            // timeAdded has whole seconds: the taint came at some point of that second,
            // so its end is the earliest deadline that is never early.
            let added = t.time_added.as_ref().map_or(now, |t| seconds(t) + 1);
            match toleration_of(pod, t) {
                Some(tol) => tol.toleration_seconds.map(|s| added + s.max(0)),
                None if t.key == NOT_READY_TAINT || t.key == UNREACHABLE_TAINT => {
                    Some(added + default_seconds)
                }
                None => Some(added),
            }
        })
        .min()
}

async fn reconcile(node: Arc<Node>, ctx: Arc<Ctx>) -> Result<Action, Error> {
    ctx.options.metrics.reconciled(NAME);
    let name = node.name_any();
    let nodes = Api::<Node>::all(ctx.client.clone());
    let now = Time(Timestamp::now());
    let now_s = seconds(&now);
    let period = ctx.options.node_monitor_period;
    let mut ready = ready_status(&node).to_string();

    // A heartbeat that stopped: Ready becomes Unknown.
    let conditions = node
        .status
        .as_ref()
        .and_then(|s| s.conditions.clone())
        .unwrap_or_default();
    if let Some(grace) = ctx.options.node_monitor_grace_period
        && let Some(cond) = conditions.iter().find(|c| c.type_ == "Ready")
        && cond.status != "Unknown"
    {
        let lease = Api::<Lease>::namespaced(ctx.client.clone(), "kube-node-lease")
            .get_opt(&name)
            .await
            .map_err(api_err("get", format!("lease kube-node-lease/{name}")))?;
        let lease_renewed = lease
            .and_then(|l| l.spec)
            .and_then(|s| s.renew_time)
            .map(|t| t.0.as_second());
        let heartbeat = cond
            .last_heartbeat_time
            .as_ref()
            .map(seconds)
            .max(lease_renewed);
        if let Some(beat) = heartbeat
            && now_s - beat > grace.as_secs() as i64
        {
            let mut next = conditions.clone();
            for c in next.iter_mut().filter(|c| c.type_ == "Ready") {
                *c = NodeCondition {
                    type_: "Ready".into(),
                    status: "Unknown".into(),
                    reason: Some("NodeStatusUnknown".into()),
                    message: Some("Kubelet stopped posting node status.".into()),
                    last_heartbeat_time: c.last_heartbeat_time.clone(),
                    last_transition_time: Some(now.clone()),
                };
            }
            nodes
                .patch_status(
                    &name,
                    &PatchParams::default(),
                    &Patch::Merge(json!({"status": {"conditions": next}})),
                )
                .await
                .map_err(api_err("patch status", format!("node {name}")))?;
            info!(node = %name, "no heartbeat within the grace period: Ready=Unknown");
            ready = "Unknown".into();
        }
    }

    // Taints follow Ready.
    let current = node
        .spec
        .as_ref()
        .and_then(|s| s.taints.clone())
        .unwrap_or_default();
    let taints = wanted_taints(&current, &ready, &now);
    if taints != current {
        nodes
            .patch(
                &name,
                &PatchParams::default(),
                &Patch::Merge(json!({"spec": {"taints": taints}})),
            )
            .await
            .map_err(api_err("patch", format!("node {name} taints")))?;
        info!(node = %name, %ready, "taints set");
    }

    // The Pods of a Node that is not Ready are not ready either (upstream's MarkPodsNotReady):
    // their endpoints leave the Services' slices before the Pods are evicted.
    if ready != "True" {
        mark_pods_not_ready(&ctx, &name).await?;
    }

    // Pods whose toleration ran out go.
    let mut next_look = if ready == "True" { None } else { Some(period) };
    if taints.iter().any(|t| t.effect == "NoExecute") {
        let pods = Api::<Pod>::all(ctx.client.clone())
            .list(&ListParams::default().fields(&format!("spec.nodeName={name}")))
            .await
            .map_err(api_err("list", format!("pods on {name}")))?
            .items;
        for pod in pods.iter().filter(|p| is_active(p)) {
            let Some(at) =
                eviction_time(pod, &taints, ctx.options.default_toleration_seconds, now_s)
            else {
                continue;
            };
            if at <= now_s {
                let ns = pod.namespace().unwrap_or_default();
                let api = Api::<Pod>::namespaced(ctx.client.clone(), &ns);
                match api.delete(&pod.name_any(), &DeleteParams::default()).await {
                    Ok(_) => {
                        ctx.options.metrics.evictions.inc();
                        events::publish(
                            &ctx.client,
                            pod,
                            Type::Normal,
                            "TaintManagerEviction",
                            format!("Marking for deletion Pod {ns}/{}", pod.name_any()),
                        )
                        .await;
                        info!(node = %name, pod = %format!("{ns}/{}", pod.name_any()), "evicted: toleration ran out");
                    }
                    Err(kube::Error::Api(e)) if e.code == 404 => {}
                    Err(e) => {
                        return Err(api_err("delete", format!("pod {ns}/{}", pod.name_any()))(e));
                    }
                }
            } else {
                let wait = Duration::from_secs((at - now_s) as u64).max(Duration::from_millis(200));
                next_look = Some(next_look.map_or(wait, |l| l.min(wait)));
            }
        }
    }
    // Heartbeats and tolerations run out with time, not with a change: look again.
    Ok(Action::requeue(next_look.unwrap_or(period).min(period)))
}

/// Sets Ready=False on the Pods of `node` that still say True.
async fn mark_pods_not_ready(ctx: &Ctx, node: &str) -> Result<(), Error> {
    let pods = Api::<Pod>::all(ctx.client.clone())
        .list(&ListParams::default().fields(&format!("spec.nodeName={node}")))
        .await
        .map_err(api_err("list", format!("pods on {node}")))?
        .items;
    for pod in pods
        .iter()
        .filter(|p| is_active(p) && crate::pods::is_ready(p))
    {
        let mut conditions = pod
            .status
            .as_ref()
            .and_then(|s| s.conditions.clone())
            .unwrap_or_default();
        for c in conditions.iter_mut().filter(|c| c.type_ == "Ready") {
            c.status = "False".into();
            c.reason = Some("NodeNotReady".into());
            c.message = Some(format!("node {node} is not ready"));
            c.last_transition_time = Some(Time(Timestamp::now()));
        }
        let ns = pod.namespace().unwrap_or_default();
        let name = pod.name_any();
        match Api::<Pod>::namespaced(ctx.client.clone(), &ns)
            .patch_status(
                &name,
                &PatchParams::default(),
                &Patch::Merge(json!({"status": {"conditions": conditions}})),
            )
            .await
        {
            Ok(_) => debug!(%node, pod = %format!("{ns}/{name}"), "marked not ready"),
            Err(kube::Error::Api(e)) if e.code == 404 => {}
            Err(e) => return Err(api_err("patch status", format!("pod {ns}/{name}"))(e)),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{PodSpec, Toleration};

    #[test]
    fn taints_follow_ready() {
        let now = Time(Timestamp::from_second(1000).unwrap_or(Timestamp::UNIX_EPOCH));
        let other = Taint {
            key: "dedicated".into(),
            effect: "NoSchedule".into(),
            ..Taint::default()
        };
        let t = wanted_taints(std::slice::from_ref(&other), "False", &now);
        assert_eq!(t.len(), 3);
        assert!(
            t.iter()
                .any(|t| t.key == NOT_READY_TAINT && t.effect == "NoExecute")
        );
        assert_eq!(wanted_taints(&t, "True", &now), vec![other.clone()]);
        let u = wanted_taints(&t, "Unknown", &now);
        assert!(u.iter().all(|t| t.key != NOT_READY_TAINT));
        assert!(u.iter().any(|t| t.key == UNREACHABLE_TAINT));
    }

    #[test]
    fn eviction_after_toleration_seconds_or_default() {
        let taint = Taint {
            key: NOT_READY_TAINT.into(),
            effect: "NoExecute".into(),
            time_added: Some(Time(
                Timestamp::from_second(1000).unwrap_or(Timestamp::UNIX_EPOCH),
            )),
            value: None,
        };
        let bare = Pod::default();
        assert_eq!(
            eviction_time(&bare, std::slice::from_ref(&taint), 300, 1001),
            Some(1301)
        );
        let tolerant = Pod {
            spec: Some(PodSpec {
                tolerations: Some(vec![Toleration {
                    key: Some(NOT_READY_TAINT.into()),
                    operator: Some("Exists".into()),
                    effect: Some("NoExecute".into()),
                    toleration_seconds: Some(2),
                    value: None,
                }]),
                ..PodSpec::default()
            }),
            ..Pod::default()
        };
        assert_eq!(eviction_time(&tolerant, &[taint], 300, 1001), Some(1003));
    }
}
