//! Events (core/v1) for the steps a user reads in `kubectl describe`: a Pod scheduled or not,
//! a ReplicaSet's Pod created or deleted, a Deployment's ReplicaSet scaled, a Pod evicted.
//! Best effort, as upstream's recorder: a failed write is logged, never fails a reconcile.

use std::sync::atomic::{AtomicU64, Ordering};

use k8s_openapi::api::core::v1::{Event, EventSource, ObjectReference};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, PostParams};
use kube::{Client, Resource, ResourceExt};
use tracing::debug;

use crate::MANAGER;

/// `Normal` or `Warning`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Type {
    /// A step as expected.
    Normal,
    /// Something a user should look at.
    Warning,
}

/// Records an Event about `obj` (in its namespace; `default` for cluster-scoped objects).
pub async fn publish<K>(client: &Client, obj: &K, type_: Type, reason: &str, message: String)
where
    K: Resource<DynamicType = ()>,
{
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let now = Timestamp::now();
    let ns = obj.namespace().unwrap_or_else(|| "default".into());
    let name = format!(
        "{}.{:x}{:x}",
        obj.name_any(),
        now.as_nanosecond(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    );
    let event = Event {
        metadata: ObjectMeta {
            name: Some(name),
            namespace: Some(ns.clone()),
            ..ObjectMeta::default()
        },
        involved_object: ObjectReference {
            api_version: Some(K::api_version(&()).into_owned()),
            kind: Some(K::kind(&()).into_owned()),
            name: obj.meta().name.clone(),
            namespace: obj.namespace(),
            uid: obj.meta().uid.clone(),
            ..ObjectReference::default()
        },
        reason: Some(reason.into()),
        message: Some(message),
        type_: Some(
            match type_ {
                Type::Normal => "Normal",
                Type::Warning => "Warning",
            }
            .into(),
        ),
        source: Some(EventSource {
            component: Some(MANAGER.into()),
            host: None,
        }),
        first_timestamp: Some(Time(now)),
        last_timestamp: Some(Time(now)),
        event_time: Some(MicroTime(now)),
        count: Some(1),
        reporting_component: Some(MANAGER.into()),
        reporting_instance: Some(MANAGER.into()),
        ..Event::default()
    };
    if let Err(e) = Api::<Event>::namespaced(client.clone(), &ns)
        .create(&PostParams::default(), &event)
        .await
    {
        debug!(%reason, error = %e, "recording an event");
    }
}
