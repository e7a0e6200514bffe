//! Garbage collection of dependents: a ReplicaSet owned by Deployments, a Pod owned by
//! ReplicaSets or an EndpointSlice owned by Services whose every owner (matched by uid, as
//! upstream's garbage collector matches them) is gone is deleted, so
//! deleting a Deployment takes its ReplicaSets and their Pods with it, and deleting a Service
//! its slices. A sweep over what it lists, every period: an owner deleted while the
//! controllers were down is found the same way. Pods bound to a Node that is gone are deleted
//! too (upstream's PodGC).

use std::collections::BTreeSet;
use std::fmt::Debug;
use std::sync::Arc;

use k8s_openapi::NamespaceResourceScope;
use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet};
use k8s_openapi::api::core::v1::{Node, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, DeleteParams, ListParams, PropagationPolicy};
use kube::{Client, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use tracing::{debug, info, warn};

use crate::{Error, Options, api_err};

const NAME: &str = "garbage-collector";

/// The uids of every object of kind `K`.
async fn uids<K>(client: &Client) -> Result<BTreeSet<String>, Error>
where
    K: Resource<Scope = NamespaceResourceScope, DynamicType = ()>
        + Clone
        + DeserializeOwned
        + Debug,
{
    Ok(Api::<K>::all(client.clone())
        .list(&ListParams::default())
        .await
        .map_err(api_err("list", K::plural(&()).into_owned()))?
        .items
        .into_iter()
        .filter_map(|o| o.meta().uid.clone())
        .collect())
}

/// Deletes the objects of kind `K` whose owners are all of kind `owner` and none of them in
/// `live` (an owner of a kind this collector does not list is never taken for gone).
async fn sweep<K>(
    client: &Client,
    owner: &str,
    live: &BTreeSet<String>,
    options: &Options,
) -> Result<(), Error>
where
    K: Resource<Scope = NamespaceResourceScope, DynamicType = ()>
        + Clone
        + DeserializeOwned
        + Debug,
{
    let objects = Api::<K>::all(client.clone())
        .list(&ListParams::default())
        .await
        .map_err(api_err("list", K::plural(&()).into_owned()))?
        .items;
    for o in objects {
        let owners = o.owner_references();
        if owners.is_empty()
            || owners
                .iter()
                .any(|r| r.kind != owner || live.contains(&r.uid))
        {
            continue;
        }
        let ns = o.namespace().unwrap_or_default();
        let name = o.name_any();
        let dp = DeleteParams {
            propagation_policy: Some(PropagationPolicy::Background),
            ..DeleteParams::default()
        };
        match Api::<K>::namespaced(client.clone(), &ns)
            .delete(&name, &dp)
            .await
        {
            Ok(_) => {
                options.metrics.reconciled(NAME);
                info!(kind = %K::kind(&()), object = %format!("{ns}/{name}"), "deleted: its owner is gone");
            }
            Err(kube::Error::Api(e)) if e.code == 404 => {}
            Err(e) => {
                return Err(api_err("delete", format!("{} {ns}/{name}", K::kind(&())))(
                    e,
                ));
            }
        }
    }
    Ok(())
}

/// Deletes Pods bound to a Node that does not exist (upstream's PodGC for orphaned Pods: a Node
/// removed with its host); each Node is looked up again before its Pods go, so a Node made
/// since the list is not taken for gone.
async fn orphaned_pods(client: &Client, options: &Options) -> Result<(), Error> {
    let nodes: Api<Node> = Api::all(client.clone());
    let known: BTreeSet<String> = nodes
        .list(&ListParams::default())
        .await
        .map_err(api_err("list", "nodes"))?
        .items
        .iter()
        .map(ResourceExt::name_any)
        .collect();
    let pods = Api::<Pod>::all(client.clone())
        .list(&ListParams::default())
        .await
        .map_err(api_err("list", "pods"))?
        .items;
    for pod in pods {
        let Some(node) = pod.spec.as_ref().and_then(|s| s.node_name.clone()) else {
            continue;
        };
        if known.contains(&node)
            || nodes
                .get_opt(&node)
                .await
                .map_err(api_err("get", format!("node {node}")))?
                .is_some()
        {
            continue;
        }
        let ns = pod.namespace().unwrap_or_default();
        let name = pod.name_any();
        let dp = DeleteParams {
            grace_period_seconds: Some(0),
            ..DeleteParams::default()
        };
        match Api::<Pod>::namespaced(client.clone(), &ns)
            .delete(&name, &dp)
            .await
        {
            Ok(_) => {
                options.metrics.reconciled(NAME);
                info!(pod = %format!("{ns}/{name}"), %node, "deleted: its Node is gone");
            }
            Err(kube::Error::Api(e)) if e.code == 404 => {}
            Err(e) => return Err(api_err("delete", format!("Pod {ns}/{name}"))(e)),
        }
    }
    Ok(())
}

/// One pass: owners first, so a ReplicaSet collected now has its Pods collected next pass.
async fn pass(client: &Client, options: &Options) -> Result<(), Error> {
    let deployments = uids::<Deployment>(client).await?;
    sweep::<ReplicaSet>(client, "Deployment", &deployments, options).await?;
    let sets = uids::<ReplicaSet>(client).await?;
    sweep::<Pod>(client, "ReplicaSet", &sets, options).await?;
    let services = uids::<Service>(client).await?;
    sweep::<EndpointSlice>(client, "Service", &services, options).await?;
    orphaned_pods(client, options).await
}

/// Runs the collector every `node_monitor_period`.
pub async fn run(client: Client, options: Arc<Options>) {
    let mut tick = tokio::time::interval(options.node_monitor_period);
    loop {
        tick.tick().await;
        if let Err(e) = pass(&client, &options).await {
            options.metrics.failed(NAME);
            warn!(error = %e, "garbage collection pass failed");
        } else {
            debug!("garbage collection pass");
        }
    }
}
