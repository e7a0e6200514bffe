//! ReplicaSet (apps/v1): keeps `spec.replicas` Pods from the template, each with a controller
//! reference to its ReplicaSet. Scaling down deletes the Pods least worth keeping first
//! (unscheduled, then not ready, then the newest), as upstream. Status reports replicas,
//! fullyLabeled, ready and available replicas and the observed generation.

use std::cmp::Reverse;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use k8s_openapi::api::apps::v1::{ReplicaSet, ReplicaSetStatus};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::watcher;
use kube::{Client, ResourceExt};
use serde_json::json;
use tracing::{debug, info, warn};

use crate::events::{self, Type};
use slipway_api::networking::selector_matches;

use crate::pods::{controller_ref, controller_uid, is_active, is_ready, node_of};
use crate::{Error, Options, api_err};

const NAME: &str = "replicaset";

struct Ctx {
    client: Client,
    options: Arc<Options>,
}

/// Runs the ReplicaSet controller.
pub async fn run(client: Client, options: Arc<Options>) {
    let ctx = Arc::new(Ctx {
        client: client.clone(),
        options,
    });
    Controller::new(
        Api::<ReplicaSet>::all(client.clone()),
        watcher::Config::default(),
    )
    .owns(Api::<Pod>::all(client), watcher::Config::default())
    .run(reconcile, error_policy, ctx)
    .for_each(|r| async move {
        if let Err(e) = r {
            debug!(controller = NAME, error = %e, "reconcile");
        }
    })
    .await;
}

fn error_policy(rs: Arc<ReplicaSet>, e: &Error, ctx: Arc<Ctx>) -> Action {
    ctx.options.metrics.failed(NAME);
    warn!(replicaset = %rs.name_any(), error = %e, "reconcile failed; retrying");
    Action::requeue(Duration::from_secs(1))
}

/// The order Pods go in on scale-down: unscheduled before scheduled, pending before running,
/// not ready before ready, newest first.
type Rank = (
    bool,
    bool,
    bool,
    Reverse<Option<k8s_openapi::jiff::Timestamp>>,
    String,
);

fn deletion_rank(pod: &Pod) -> Rank {
    let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
    (
        node_of(pod).is_some(),
        phase == Some("Running"),
        is_ready(pod),
        Reverse(pod.metadata.creation_timestamp.clone().map(|t| t.0)),
        pod.name_any(),
    )
}

/// The Pods of `rs`: those whose controller is `rs`.
pub async fn owned_pods(client: &Client, rs: &ReplicaSet) -> Result<Vec<Pod>, Error> {
    let ns = rs.namespace().unwrap_or_default();
    let uid = rs.uid().unwrap_or_default();
    let pods = Api::<Pod>::namespaced(client.clone(), &ns)
        .list(&ListParams::default())
        .await
        .map_err(api_err("list", format!("pods in {ns}")))?;
    Ok(pods
        .items
        .into_iter()
        .filter(|p| controller_uid(p) == Some(uid.as_str()))
        .collect())
}

fn new_pod(rs: &ReplicaSet) -> Option<Pod> {
    let template = rs.spec.as_ref()?.template.clone()?;
    let meta = template.metadata.unwrap_or_default();
    Some(Pod {
        metadata: ObjectMeta {
            generate_name: Some(format!("{}-", rs.name_any())),
            namespace: rs.namespace(),
            labels: meta.labels,
            annotations: meta.annotations,
            owner_references: Some(vec![controller_ref(rs)?]),
            ..ObjectMeta::default()
        },
        spec: template.spec,
        status: None,
    })
}

async fn reconcile(rs: Arc<ReplicaSet>, ctx: Arc<Ctx>) -> Result<Action, Error> {
    ctx.options.metrics.reconciled(NAME);
    if rs.metadata.deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    let name = rs.name_any();
    let ns = rs.namespace().unwrap_or_default();
    let pods_api = Api::<Pod>::namespaced(ctx.client.clone(), &ns);
    let want = rs
        .spec
        .as_ref()
        .and_then(|s| s.replicas)
        .unwrap_or(1)
        .max(0) as usize;
    let mut active: Vec<Pod> = owned_pods(&ctx.client, &rs)
        .await?
        .into_iter()
        .filter(is_active)
        .collect();
    let mut changed = false;
    if active.len() < want {
        let pod = new_pod(&rs).ok_or(Error::Missing {
            kind: "ReplicaSet",
            name: name.clone(),
            field: "spec.template or metadata.uid",
        })?;
        for _ in active.len()..want {
            let created = pods_api
                .create(&PostParams::default(), &pod)
                .await
                .map_err(api_err("create", format!("pod for replicaset {ns}/{name}")))?;
            info!(replicaset = %name, pod = %created.name_any(), "created pod");
            events::publish(
                &ctx.client,
                &*rs,
                Type::Normal,
                "SuccessfulCreate",
                format!("Created pod: {}", created.name_any()),
            )
            .await;
            active.push(created);
        }
        changed = true;
    } else if active.len() > want {
        active.sort_by_key(deletion_rank);
        let extra = active.len() - want;
        for pod in active.drain(..extra) {
            match pods_api
                .delete(&pod.name_any(), &DeleteParams::default())
                .await
            {
                Ok(_) => {
                    info!(replicaset = %name, pod = %pod.name_any(), "deleted pod");
                    events::publish(
                        &ctx.client,
                        &*rs,
                        Type::Normal,
                        "SuccessfulDelete",
                        format!("Deleted pod: {}", pod.name_any()),
                    )
                    .await;
                }
                Err(kube::Error::Api(e)) if e.code == 404 => {}
                Err(e) => return Err(api_err("delete", format!("pod {ns}/{}", pod.name_any()))(e)),
            }
        }
        changed = true;
    }
    let selector = rs
        .spec
        .as_ref()
        .map(|s| s.selector.clone())
        .unwrap_or_default();
    let ready = active.iter().filter(|p| is_ready(p)).count() as i32;
    let status = ReplicaSetStatus {
        replicas: active.len() as i32,
        fully_labeled_replicas: Some(
            active
                .iter()
                .filter(|p| selector_matches(&selector, p.labels()))
                .count() as i32,
        ),
        ready_replicas: Some(ready),
        available_replicas: Some(ready),
        observed_generation: rs.metadata.generation,
        conditions: None,
        terminating_replicas: None,
    };
    if rs.status.as_ref() != Some(&status) {
        Api::<ReplicaSet>::namespaced(ctx.client.clone(), &ns)
            .patch_status(
                &name,
                &PatchParams::default(),
                &Patch::Merge(json!({"status": status})),
            )
            .await
            .map_err(api_err("patch status", format!("replicaset {ns}/{name}")))?;
    }
    Ok(if changed {
        // The Pods' watch events bring the next look; this one is a safety net.
        Action::requeue(Duration::from_secs(5))
    } else {
        Action::await_change()
    })
}
