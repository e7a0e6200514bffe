//! The verbs on objects and collections: get, list, create, update, patch, delete and
//! deletecollection, with finalizers and optimistic concurrency.

use std::collections::HashMap;

use bytes::Bytes;
use hyper::Response;
use serde_json::{Value, json};

use super::handler::Call;
use super::http::{self, Body};
use super::objects::{
    admit, carry_over, encode, finalized, meta_str, parse_body, present, sent_revision, set_meta,
    stamp_new, with_status_of, without_status,
};
use super::{State, keys, paging, table};
use crate::admission::{self, Change, services};
use crate::api::meta::{now_secs, rfc3339};
use crate::api::registry::{RESOURCES, ResourceType, lookup};
use crate::error::ApiError;
use crate::patch::{self, PatchType};
use crate::selector::{FieldQuery, LabelQuery, labels_of};
use crate::ssa;
use crate::store::{Cas, Store, StoreError};

pub(super) async fn ensure_namespace(call: &Call<'_>, ns: &str) -> Result<(), ApiError> {
    let Some(nsrt) = lookup("", "v1", "namespaces") else {
        return Ok(());
    };
    let kv = call.state.store.get(&keys::object(nsrt, None, ns)).await?;
    match kv {
        None => Err(ApiError::NotFound {
            resource: "namespaces".into(),
            name: ns.into(),
        }),
        Some(kv) => {
            let obj = present(nsrt, &kv)?;
            if meta_str(&obj, "deletionTimestamp").is_some() {
                return Err(ApiError::AdmissionDenied {
                    resource: call.t.rt.plural.into(),
                    name: String::new(),
                    message: format!(
                        "unable to create new content in namespace {ns} because it is being terminated"
                    ),
                });
            }
            Ok(())
        }
    }
}

fn is_service(rt: &ResourceType) -> bool {
    rt.group.is_empty() && rt.plural == "services"
}

/// A Service keeps the addresses it holds when a write leaves them out (a manifest applied
/// or replaced again), so that alone is no change: generation and field ownership stay.
async fn keep_addresses(call: &Call<'_>, old: &Value, new: &mut Value) -> Result<(), ApiError> {
    if is_service(call.t.rt) {
        services::allocate(&call.state.store, &call.state.admission, Some(old), new).await?;
    }
    Ok(())
}

/// Most attempts of a Service write whose freshly allocated address a concurrent write took.
const ALLOCATION_ATTEMPTS: usize = 10;

/// Stores `new` (over `old` and its revision, if any) through admission's write (quota checked,
/// a Service's addresses allocated, in the same transaction); with dryRun, checks only.
async fn write(
    call: &Call<'_>,
    name: &str,
    old: Option<(&Value, u64)>,
    new: &mut Value,
) -> Result<u64, ApiError> {
    let key = call.key(name);
    let asked = new.clone();
    for _ in 0..ALLOCATION_ATTEMPTS {
        let extra = if is_service(call.t.rt) {
            *new = asked.clone();
            services::allocate(
                &call.state.store,
                &call.state.admission,
                old.map(|o| o.0),
                new,
            )
            .await?
        } else {
            Vec::new()
        };
        let change = match old {
            None => Change::Create(new),
            Some((old, revision)) => Change::Update { old, new, revision },
        };
        let result = admission::write(
            &call.state.store,
            call.t.rt,
            call.ns(),
            &key,
            change,
            encode(new)?,
            extra,
            call.dry_run(),
        )
        .await?;
        match result {
            Ok(rev) => return Ok(rev),
            Err(e)
                if e.refused_key()
                    .is_some_and(|k| k.starts_with(services::ALLOC_PREFIX)) =>
            {
                continue;
            }
            Err(e) => return Err(call.store_err(name, e)),
        }
    }
    Err(ApiError::Conflict {
        resource: call.t.rt.plural.into(),
        name: name.into(),
        stale: None,
    })
}

pub(super) async fn get(call: &Call<'_>, name: &str) -> Result<Response<Body>, ApiError> {
    let kv = call
        .state
        .store
        .get(&call.key(name))
        .await?
        .ok_or_else(|| call.not_found(name))?;
    Ok(call.respond(200, &present(call.t.rt, &kv)?))
}

/// Lists a collection filtered by the request's selectors; returns (objects, revision).
pub async fn select(
    state: &State,
    rt: &ResourceType,
    ns: Option<&str>,
    query: &HashMap<String, String>,
) -> Result<(Vec<Value>, u64), ApiError> {
    let labels = query
        .get("labelSelector")
        .map(|s| LabelQuery::parse(s))
        .transpose()?;
    let fields = query
        .get("fieldSelector")
        .map(|s| FieldQuery::parse(s))
        .transpose()?;
    let (items, rev) = state.store.list(&keys::prefix(rt, ns)).await?;
    let mut out = Vec::with_capacity(items.len());
    for kv in &items {
        let obj = present(rt, kv)?;
        if labels
            .as_ref()
            .is_some_and(|l| !l.matches(&labels_of(&obj)))
            || fields.as_ref().is_some_and(|f| !f.matches(&obj))
        {
            continue;
        }
        out.push(obj);
    }
    Ok((out, rev))
}

pub(super) async fn list(call: &Call<'_>) -> Result<Response<Body>, ApiError> {
    let (items, rev) = select(call.state, call.t.rt, call.ns(), &call.query).await?;
    let page = paging::page(items, rev, &call.query)?;
    let mut list = if table::wants_table(&call.accept) {
        let include = call
            .query
            .get("includeObject")
            .map(String::as_str)
            .unwrap_or("Metadata");
        table::table(
            call.t.rt,
            &call.accept,
            &page.items,
            &page.resource_version.to_string(),
            include,
            true,
        )
    } else {
        json!({
            "kind": format!("{}List", call.t.rt.kind),
            "apiVersion": call.t.rt.api_version(),
            "metadata": {"resourceVersion": page.resource_version.to_string()},
            "items": page.items,
        })
    };
    if let (Some(token), Some(meta)) = (
        page.continue_token,
        list.get_mut("metadata").and_then(Value::as_object_mut),
    ) {
        meta.insert("continue".into(), json!(token));
        meta.insert("remainingItemCount".into(), json!(page.remaining));
    }
    Ok(http::json(200, &list))
}

pub(super) async fn create(call: &Call<'_>) -> Result<Response<Body>, ApiError> {
    let body = without_status(call.t.rt, parse_body(&call.body, &call.content_type)?);
    let mut obj = admit(call.state, call.t.rt, call.ns(), None, body, true).await?;
    stamp_new(&mut obj);
    let name = meta_str(&obj, "name").unwrap_or_default().to_string();
    let rev = write(call, &name, None, &mut obj).await?;
    if call.dry_run() {
        return Ok(call.respond(201, &obj));
    }
    set_meta(&mut obj, "resourceVersion", json!(rev.to_string()));
    Ok(call.respond(201, &obj))
}

/// Writes `new` over the stored `old` (revision `rev`), finishing a deletion whose last
/// finalizer went. Returns the response.
async fn write_update(
    call: &Call<'_>,
    name: &str,
    rev: u64,
    old: &Value,
    mut new: Value,
) -> Result<Response<Body>, ApiError> {
    // A no-op write is not stored: the resourceVersion stays, and no watch event fires.
    set_meta(&mut new, "resourceVersion", json!(rev.to_string()));
    if &new == old {
        return Ok(call.respond(200, old));
    }
    let key = call.key(name);
    if finalized(&new) {
        if call.dry_run() {
            return Ok(call.respond(200, &new));
        }
        let mut steps = vec![Cas::delete(&key, rev)];
        if is_service(call.t.rt) {
            steps.extend(services::release(&call.state.store, old).await?);
        }
        let drev = call
            .state
            .store
            .txn(steps)
            .await
            .map(|revs| revs.first().copied().unwrap_or_default())
            .map_err(|e| call.store_err(name, e))?;
        set_meta(&mut new, "resourceVersion", json!(drev.to_string()));
        return Ok(call.respond(200, &new));
    }
    let nrev = write(call, name, Some((old, rev)), &mut new).await?;
    if call.dry_run() {
        return Ok(call.respond(200, &new));
    }
    set_meta(&mut new, "resourceVersion", json!(nrev.to_string()));
    Ok(call.respond(200, &new))
}

pub(super) async fn update(
    call: &Call<'_>,
    name: &str,
    status_only: bool,
) -> Result<Response<Body>, ApiError> {
    let body = parse_body(&call.body, &call.content_type)?;
    let sent = sent_revision(call.t.rt, &body)?;
    let kv = call
        .state
        .store
        .get(&call.key(name))
        .await?
        .ok_or_else(|| call.not_found(name))?;
    if let Some(s) = sent.filter(|s| *s != kv.revision) {
        return Err(ApiError::Conflict {
            resource: call.t.rt.plural.into(),
            name: name.into(),
            stale: Some((s, kv.revision)),
        });
    }
    let old = present(call.t.rt, &kv)?;
    // A status write keeps the stored spec: only the status is validated, and admission
    // (quotas over the spec) does not run again.
    let body = if status_only {
        with_status_of(&old, &body)
    } else {
        body
    };
    let mut new = admit(
        call.state,
        call.t.rt,
        call.ns(),
        Some(name),
        body,
        !status_only,
    )
    .await?;
    keep_addresses(call, &old, &mut new).await?;
    carry_over(call.t.rt, &old, &mut new, status_only);
    if !status_only {
        record_update(call, &old, &mut new);
    }
    write_update(call, name, kv.revision, &old, new).await
}

/// The object a server-side apply asks for over `live`, with its field ownership; a conflict
/// with another field manager is a 409 unless `force=true`.
fn applied(call: &Call<'_>, live: &Value) -> Result<Value, ApiError> {
    let config = patch::parse_apply(&call.body)?;
    let manager = call
        .query
        .get("fieldManager")
        .filter(|m| !m.is_empty())
        .ok_or_else(|| ApiError::Invalid {
            kind: call.t.rt.kind.into(),
            name: meta_str(&config, "name").unwrap_or_default().into(),
            causes: vec![crate::error::FieldError::required("fieldManager")],
        })?;
    let force = call.query.get("force").is_some_and(|f| f == "true");
    ssa::apply(
        live,
        &config,
        manager,
        force,
        &call.t.rt.api_version(),
        &rfc3339(now_secs()),
    )
    .map_err(ApiError::ApplyConflict)
}

/// Moves the fields a non-apply write changed to its field manager (kubectl names one with
/// `fieldManager`; others are `unknown`). A write that leaves out managedFields keeps them.
fn record_update(call: &Call<'_>, old: &Value, new: &mut Value) {
    if new.pointer("/metadata/managedFields").is_none()
        && let Some(m) = old.pointer("/metadata/managedFields")
    {
        set_meta(new, "managedFields", m.clone());
    }
    let manager = call
        .query
        .get("fieldManager")
        .map_or("unknown", String::as_str);
    ssa::record_update(
        old,
        new,
        manager,
        &call.t.rt.api_version(),
        &rfc3339(now_secs()),
    );
}

pub(super) async fn patch_object(
    call: &Call<'_>,
    name: &str,
    status_only: bool,
) -> Result<Response<Body>, ApiError> {
    let kind = PatchType::from_content_type(&call.content_type)?;
    // A patch carries no precondition of its own unless it sets resourceVersion, so a lost
    // race with another writer is retried on the new version (where a resourceVersion the
    // patch sets is checked, and refused when stale).
    for _ in 0..5 {
        let Some(kv) = call.state.store.get(&call.key(name)).await? else {
            if kind == PatchType::Apply && !status_only {
                let body = without_status(
                    call.t.rt,
                    applied(call, &Value::Object(Default::default()))?,
                );
                let mut obj =
                    admit(call.state, call.t.rt, call.ns(), Some(name), body, true).await?;
                stamp_new(&mut obj);
                let rev = write(call, name, None, &mut obj).await?;
                if call.dry_run() {
                    return Ok(call.respond(201, &obj));
                }
                set_meta(&mut obj, "resourceVersion", json!(rev.to_string()));
                return Ok(call.respond(201, &obj));
            }
            return Err(call.not_found(name));
        };
        let old = present(call.t.rt, &kv)?;
        let mut patched = old.clone();
        if kind == PatchType::Apply && !status_only {
            patched = applied(call, &old)?;
        } else {
            patch::apply(call.t.rt, kind, &mut patched, &call.body)?;
        }
        let sent = sent_revision(call.t.rt, &patched)?;
        if let Some(s) = sent.filter(|s| *s != kv.revision) {
            return Err(ApiError::Conflict {
                resource: call.t.rt.plural.into(),
                name: name.into(),
                stale: Some((s, kv.revision)),
            });
        }
        let patched = if status_only {
            with_status_of(&old, &patched)
        } else {
            patched
        };
        let mut new = admit(
            call.state,
            call.t.rt,
            call.ns(),
            Some(name),
            patched,
            !status_only,
        )
        .await?;
        keep_addresses(call, &old, &mut new).await?;
        carry_over(call.t.rt, &old, &mut new, status_only);
        if kind != PatchType::Apply && !status_only {
            record_update(call, &old, &mut new);
        }
        match write_update(call, name, kv.revision, &old, new).await {
            // Another writer got there first: patch what it wrote. A resourceVersion the patch
            // itself sets is checked against that on the next turn and refused there.
            Err(ApiError::Conflict { .. }) => continue,
            other => return other,
        }
    }
    Err(ApiError::Conflict {
        resource: call.t.rt.plural.into(),
        name: name.into(),
        stale: None,
    })
}

/// Deletes one object: marks it when finalizers remain, removes it otherwise. Returns the
/// object as last stored.
async fn delete_one(
    call: &Call<'_>,
    rt: &ResourceType,
    ns: Option<&str>,
    name: &str,
    precondition: Option<u64>,
) -> Result<Value, ApiError> {
    let key = keys::object(rt, ns, name);
    loop {
        let kv = call
            .state
            .store
            .get(&key)
            .await?
            .ok_or_else(|| ApiError::NotFound {
                resource: rt.plural.into(),
                name: name.into(),
            })?;
        if let Some(p) = precondition.filter(|p| *p != kv.revision) {
            return Err(ApiError::Conflict {
                resource: rt.plural.into(),
                name: name.into(),
                stale: Some((p, kv.revision)),
            });
        }
        let mut obj = present(rt, &kv)?;
        let guards = admission::deletable(&call.state.store, rt, name).await?;
        let has_finalizers = obj
            .pointer("/metadata/finalizers")
            .and_then(Value::as_array)
            .is_some_and(|f| !f.is_empty());
        if call.dry_run() {
            return Ok(obj);
        }
        let result = if has_finalizers {
            if meta_str(&obj, "deletionTimestamp").is_some() {
                return Ok(obj);
            }
            set_meta(&mut obj, "deletionTimestamp", json!(rfc3339(now_secs())));
            set_meta(&mut obj, "deletionGracePeriodSeconds", json!(0));
            call.state
                .store
                .update(&key, encode(&obj)?, kv.revision)
                .await
        } else {
            if rt.plural == "namespaces" {
                delete_namespace_contents(call, name).await?;
            }
            let mut steps = vec![Cas::delete(&key, kv.revision)];
            steps.extend(guards);
            if is_service(rt) {
                steps.extend(services::release(&call.state.store, &obj).await?);
            }
            call.state
                .store
                .txn(steps)
                .await
                .map(|revs| revs.first().copied().unwrap_or_default())
        };
        match result {
            Ok(rev) => {
                set_meta(&mut obj, "resourceVersion", json!(rev.to_string()));
                return Ok(obj);
            }
            Err(StoreError::Conflict { .. }) if precondition.is_none() => continue,
            Err(e) => return Err(e.into()),
        }
    }
}

/// Removes every namespaced object of a namespace being deleted (finalizers are not waited on).
async fn delete_namespace_contents(call: &Call<'_>, ns: &str) -> Result<(), ApiError> {
    for rt in RESOURCES.iter().filter(|r| r.namespaced) {
        let (items, _) = call.state.store.list(&keys::prefix(rt, Some(ns))).await?;
        for kv in items {
            match call.state.store.delete(&kv.key, kv.revision).await {
                Ok(_) | Err(StoreError::NotFound(_)) => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
    admission::forget_namespace(&call.state.store, ns).await
}

fn delete_precondition(body: &Bytes) -> Result<Option<u64>, ApiError> {
    if body.is_empty() {
        return Ok(None);
    }
    let opts: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::BadRequest(format!("invalid DeleteOptions: {e}")))?;
    match opts
        .pointer("/preconditions/resourceVersion")
        .and_then(Value::as_str)
    {
        Some(rv) => rv.parse().map(Some).map_err(|_| {
            ApiError::BadRequest(format!("invalid precondition resourceVersion {rv:?}"))
        }),
        None => Ok(None),
    }
}

pub(super) async fn delete(call: &Call<'_>, name: &str) -> Result<Response<Body>, ApiError> {
    let pre = delete_precondition(&call.body)?;
    let obj = delete_one(call, call.t.rt, call.ns(), name, pre).await?;
    Ok(call.respond(200, &obj))
}

pub(super) async fn delete_collection(call: &Call<'_>) -> Result<Response<Body>, ApiError> {
    let (items, rev) = select(call.state, call.t.rt, call.ns(), &call.query).await?;
    let mut deleted = Vec::new();
    for obj in items {
        let name = meta_str(&obj, "name").unwrap_or_default().to_string();
        let ns = meta_str(&obj, "namespace").map(String::from);
        match delete_one(call, call.t.rt, ns.as_deref(), &name, None).await {
            Ok(o) => deleted.push(o),
            Err(ApiError::NotFound { .. }) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(http::json(
        200,
        &json!({
            "kind": format!("{}List", call.t.rt.kind),
            "apiVersion": call.t.rt.api_version(),
            "metadata": {"resourceVersion": rev.to_string()},
            "items": deleted,
        }),
    ))
}
