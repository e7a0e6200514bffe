//! Events (core/v1) for the steps a user reads in `kubectl describe`: a Pod scheduled or not,
//! a ReplicaSet's Pod created or deleted, a Deployment's ReplicaSet scaled, a Pod evicted, a
//! claim provisioned, a snapshot taken.
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
    publish_dyn(client, obj, &(), type_, reason, message).await;
}

/// [`publish`] for an object of any kind, `dt` telling its kind (a `DynamicObject`'s
/// `ApiResource`).
pub async fn publish_dyn<K: Resource>(
    client: &Client,
    obj: &K,
    dt: &K::DynamicType,
    type_: Type,
    reason: &str,
    message: String,
) {
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
            api_version: Some(K::api_version(dt).into_owned()),
            kind: Some(K::kind(dt).into_owned()),
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

/// What a level-triggered loop has already told about each object (by uid): the reason and
/// message of its last Event, so a condition that lasts many passes is told once, and told
/// again when it changes. In memory only: a restart tells each standing condition once more.
#[derive(Debug, Default)]
pub struct Told(std::collections::HashMap<String, (String, String)>);

impl Told {
    /// Publishes the Event (as [`publish_dyn`]) unless the same reason and message were the
    /// last told about `obj`; whether it did.
    pub async fn publish<K: Resource>(
        &mut self,
        client: &Client,
        (obj, dt): (&K, &K::DynamicType),
        type_: Type,
        reason: &str,
        message: String,
    ) -> bool {
        let uid = obj.meta().uid.clone().unwrap_or_default();
        let said = (reason.to_owned(), message);
        if self.0.get(&uid) == Some(&said) {
            return false;
        }
        publish_dyn(client, obj, dt, type_, reason, said.1.clone()).await;
        self.0.insert(uid, said);
        true
    }

    /// Forgets what was told about `uid` (its condition is over).
    pub fn forget(&mut self, uid: &str) {
        self.0.remove(uid);
    }

    /// Keeps only what was told about objects that still exist.
    pub fn retain(&mut self, live: &std::collections::BTreeSet<&str>) {
        self.0.retain(|uid, _| live.contains(uid.as_str()));
    }
}
