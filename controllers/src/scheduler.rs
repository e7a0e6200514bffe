//! The scheduler: binds each Pod without `spec.nodeName` to the Node [`placement::place`]
//! chooses, through the Pod's `binding` subresource as upstream; a Pod's PersistentVolumes
//! narrow the Nodes to their node affinity (a zonal volume's zone); an unbound claim of a
//! WaitForFirstConsumer class gets the chosen Node (`volume.kubernetes.io/selected-node`) and
//! the Pod binds once the claim is bound; a Pod whose claim is missing or not bound waits. A
//! Pod no Node fits stays Pending with `PodScheduled=False`, reason `Unschedulable` and a
//! message that says why, and is tried again every `unschedulable_retry`. Decisions are made
//! one at a time, each on a fresh list of Nodes and Pods, so two Pods are never placed on the
//! same free room.

use std::sync::Arc;

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::{
    Node, NodeSelector, NodeSelectorRequirement, NodeSelectorTerm, PersistentVolume,
    PersistentVolumeClaim, Pod, PodCondition,
};
use k8s_openapi::api::storage::v1::StorageClass;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::watcher;
use kube::{Client, ResourceExt};
use serde_json::json;
use tokio::sync::Mutex;
use tracing::{debug, info, warn};

use crate::events::{self, Type};
use crate::placement::{self, Placement};
use crate::pods::{is_active, node_of};
use crate::provisioner::{SELECTED_NODE, WAIT_FOR_FIRST_CONSUMER, selected_node};
use crate::{Error, Options, api_err};

const NAME: &str = "scheduler";

struct Ctx {
    client: Client,
    options: Arc<Options>,
    /// One decision at a time.
    deciding: Mutex<()>,
}

/// Runs the scheduler.
pub async fn run(client: Client, options: Arc<Options>) {
    let ctx = Arc::new(Ctx {
        client: client.clone(),
        options,
        deciding: Mutex::new(()),
    });
    Controller::new(Api::<Pod>::all(client), watcher::Config::default())
        .run(reconcile, error_policy, ctx)
        .for_each(|r| async move {
            if let Err(e) = r {
                debug!(controller = NAME, error = %e, "reconcile");
            }
        })
        .await;
}

fn error_policy(pod: Arc<Pod>, e: &Error, ctx: Arc<Ctx>) -> Action {
    ctx.options.metrics.failed(NAME);
    warn!(pod = %pod.name_any(), error = %e, "scheduling failed; retrying");
    Action::requeue(std::time::Duration::from_secs(1))
}

async fn reconcile(pod: Arc<Pod>, ctx: Arc<Ctx>) -> Result<Action, Error> {
    if node_of(&pod).is_some() || !is_active(&pod) {
        return Ok(Action::await_change());
    }
    ctx.options.metrics.reconciled(NAME);
    let _one = ctx.deciding.lock().await;
    let name = pod.name_any();
    let ns = pod.namespace().unwrap_or_default();
    let api = Api::<Pod>::namespaced(ctx.client.clone(), &ns);
    // The cached copy may be stale: decide on what the API holds now.
    let Some(pod) = api
        .get_opt(&name)
        .await
        .map_err(api_err("get", format!("pod {ns}/{name}")))?
    else {
        return Ok(Action::await_change());
    };
    if node_of(&pod).is_some() || !is_active(&pod) {
        return Ok(Action::await_change());
    }
    let nodes = Api::<Node>::all(ctx.client.clone())
        .list(&ListParams::default())
        .await
        .map_err(api_err("list", "nodes"))?
        .items;
    let pods = Api::<Pod>::all(ctx.client.clone())
        .list(&ListParams::default())
        .await
        .map_err(api_err("list", "pods"))?
        .items;
    let (placement, delayed) = match claims_of(&ctx.client, &pod).await? {
        Ok(claims) => (
            placement::place(&pod, &nodes, &pods, &claims.affinities),
            claims.delayed,
        ),
        Err(why) => (Placement::Unschedulable(why), Vec::new()),
    };
    match placement {
        Placement::Node(node) if !delayed.is_empty() => {
            // Claims provisioned for their first consumer: the Pod binds once they are bound
            // (their PVs then hold it to the zone), so first say which Node was chosen.
            for claim in delayed {
                let claim_name = claim.name_any();
                Api::<PersistentVolumeClaim>::namespaced(ctx.client.clone(), &ns)
                    .patch(
                        &claim_name,
                        &PatchParams::default(),
                        &Patch::Merge(json!({"metadata": {"annotations": {SELECTED_NODE: node}}})),
                    )
                    .await
                    .map_err(api_err("annotate", format!("claim {ns}/{claim_name}")))?;
                info!(claim = %format!("{ns}/{claim_name}"), %node, "node selected for the claim's first consumer");
            }
            Ok(Action::requeue(std::time::Duration::from_secs(1)))
        }
        Placement::Node(node) => {
            let binding = json!({
                "apiVersion": "v1",
                "kind": "Binding",
                "metadata": {"name": name, "namespace": ns},
                "target": {"apiVersion": "v1", "kind": "Node", "name": node},
            });
            match api
                .create_subresource::<_, serde_json::Value>(
                    "binding",
                    &name,
                    &PostParams::default(),
                    &binding,
                )
                .await
            {
                Ok(_) => {}
                // Bound meanwhile (by another scheduler, or an earlier run of this one).
                Err(kube::Error::Api(e)) if e.code == 409 || e.code == 404 => {
                    return Ok(Action::await_change());
                }
                Err(e) => return Err(api_err("bind", format!("pod {ns}/{name} to {node}"))(e)),
            }
            ctx.options.metrics.scheduled.inc();
            info!(pod = %format!("{ns}/{name}"), %node, "bound");
            events::publish(
                &ctx.client,
                &pod,
                Type::Normal,
                "Scheduled",
                format!("Successfully assigned {ns}/{name} to {node}"),
            )
            .await;
            // No status write here: the Node's agent owns the bound Pod's status from now on,
            // and a write of ours could race with its first one.
            Ok(Action::await_change())
        }
        Placement::Unschedulable(message) => {
            ctx.options.metrics.unschedulable.inc();
            debug!(pod = %format!("{ns}/{name}"), %message, "unschedulable");
            let changed = set_scheduled(
                &api,
                &pod,
                "False",
                Some("Unschedulable"),
                Some(message.clone()),
            )
            .await?;
            if changed {
                events::publish(
                    &ctx.client,
                    &pod,
                    Type::Warning,
                    "FailedScheduling",
                    message,
                )
                .await;
            }
            Ok(Action::requeue(ctx.options.unschedulable_retry))
        }
    }
}

/// What the claims a Pod mounts ask of its placement.
#[derive(Default)]
struct Claims {
    /// The node affinities of the bound claims' PersistentVolumes (a zonal volume's zone), and
    /// the Node already selected for an unbound claim's first consumer.
    affinities: Vec<NodeSelector>,
    /// Unbound claims of WaitForFirstConsumer classes with no Node selected yet.
    delayed: Vec<PersistentVolumeClaim>,
}

/// The claims `pod` mounts, or why it cannot be placed yet (a claim missing, or not bound and
/// not waiting for its first consumer; upstream's VolumeBinding filter says the same).
async fn claims_of(client: &Client, pod: &Pod) -> Result<Result<Claims, String>, Error> {
    let ns = pod.namespace().unwrap_or_default();
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), &ns);
    let pvs: Api<PersistentVolume> = Api::all(client.clone());
    let mut out = Claims::default();
    let volumes = pod.spec.iter().flat_map(|s| s.volumes.iter().flatten());
    for name in volumes.filter_map(|v| v.persistent_volume_claim.as_ref().map(|c| &c.claim_name)) {
        let Some(claim) = claims
            .get_opt(name)
            .await
            .map_err(api_err("get", format!("claim {ns}/{name}")))?
        else {
            return Ok(Err(format!("persistentvolumeclaim {name:?} not found")));
        };
        let bound = claim
            .spec
            .as_ref()
            .and_then(|s| s.volume_name.clone())
            .filter(|n| !n.is_empty());
        let Some(pv) = bound else {
            if let Some(node) = selected_node(&claim) {
                out.affinities.push(NodeSelector {
                    node_selector_terms: vec![NodeSelectorTerm {
                        match_fields: Some(vec![NodeSelectorRequirement {
                            key: "metadata.name".into(),
                            operator: "In".into(),
                            values: Some(vec![node.to_owned()]),
                        }]),
                        ..NodeSelectorTerm::default()
                    }],
                });
            } else if waits_for_first_consumer(client, &claim).await? {
                out.delayed.push(claim);
            } else {
                return Ok(Err(format!(
                    "pod has unbound immediate PersistentVolumeClaims ({name:?})"
                )));
            }
            continue;
        };
        let Some(pv) = pvs
            .get_opt(&pv)
            .await
            .map_err(api_err("get", format!("persistentvolume {pv}")))?
        else {
            return Ok(Err(format!("persistentvolume {pv:?} not found")));
        };
        out.affinities.extend(
            pv.spec
                .and_then(|s| s.node_affinity)
                .and_then(|a| a.required),
        );
    }
    Ok(Ok(out))
}

/// Whether the claim's StorageClass binds on first consumer.
async fn waits_for_first_consumer(
    client: &Client,
    claim: &PersistentVolumeClaim,
) -> Result<bool, Error> {
    let Some(class) = claim
        .spec
        .as_ref()
        .and_then(|s| s.storage_class_name.as_deref())
    else {
        return Ok(false);
    };
    let class = Api::<StorageClass>::all(client.clone())
        .get_opt(class)
        .await
        .map_err(api_err("get", format!("storageclass {class}")))?;
    Ok(class.and_then(|c| c.volume_binding_mode).as_deref() == Some(WAIT_FOR_FIRST_CONSUMER))
}

/// Writes the Pod's PodScheduled condition (and phase Pending while it has none) when it
/// differs from what is there; says whether it did.
async fn set_scheduled(
    api: &Api<Pod>,
    pod: &Pod,
    status: &str,
    reason: Option<&str>,
    message: Option<String>,
) -> Result<bool, Error> {
    let mut conditions = pod
        .status
        .as_ref()
        .and_then(|s| s.conditions.clone())
        .unwrap_or_default();
    let current = conditions.iter().find(|c| c.type_ == "PodScheduled");
    if current.is_some_and(|c| {
        c.status == status && c.reason.as_deref() == reason && c.message == message
    }) {
        return Ok(false);
    }
    conditions.retain(|c| c.type_ != "PodScheduled");
    conditions.push(PodCondition {
        type_: "PodScheduled".into(),
        status: status.into(),
        reason: reason.map(String::from),
        message,
        last_transition_time: Some(Time(Timestamp::now())),
        ..PodCondition::default()
    });
    let phase = pod
        .status
        .as_ref()
        .and_then(|s| s.phase.clone())
        .unwrap_or_else(|| "Pending".into());
    let name = pod.name_any();
    api.patch_status(
        &name,
        &PatchParams::default(),
        &Patch::Merge(json!({"status": {"phase": phase, "conditions": conditions}})),
    )
    .await
    .map_err(api_err("patch status", format!("pod {name}")))?;
    Ok(true)
}
