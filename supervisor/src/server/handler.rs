//! Request dispatch: authentication, routing, authorization, the verbs, audit and metrics.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, header};
use serde_json::{Value, json};
use tracing::{debug, info_span};

use super::http::{self, Body};
use super::objects::{
    admit, carry_over, encode, finalized, meta_str, parse_body, present, sent_revision, set_meta,
    stamp_new,
};
use super::{State, discovery, keys, table, watch};
use crate::api::meta::{now_secs, rfc3339};
use crate::api::registry::{RESOURCES, ResourceType, lookup};
use crate::audit::AuditRecord;
use crate::auth::{UserInfo, authorize};
use crate::error::ApiError;
use crate::metrics::RequestLabels;
use crate::patch::{self, PatchType};
use crate::selector::{FieldSelector, LabelSelector, labels_of};
use crate::store::{Store, StoreError};

/// Largest request body accepted (Kubernetes' limit is 3 MiB).
const MAX_BODY: usize = 3 * 1024 * 1024;

/// A parsed resource path.
#[derive(Debug)]
struct Target {
    rt: &'static ResourceType,
    ns: Option<String>,
    name: Option<String>,
    sub: Option<String>,
}

enum Route {
    Health,
    Version,
    CoreVersions,
    Groups,
    Group(String),
    Resources(String, String),
    OpenApi,
    Metrics,
    Resource(Target),
    NotFound,
}

fn not_found_path() -> ApiError {
    ApiError::NotFound {
        resource: "the server could not find the requested resource".into(),
        name: String::new(),
    }
}

fn route(path: &str) -> Route {
    let segs: Vec<&str> = path
        .trim_matches('/')
        .split('/')
        .filter(|s| !s.is_empty())
        .collect();
    let (group, version, rest) = match segs.as_slice() {
        ["healthz" | "livez" | "readyz"] => return Route::Health,
        ["version"] => return Route::Version,
        ["metrics"] => return Route::Metrics,
        ["openapi", "v2"] => return Route::OpenApi,
        ["api"] => return Route::CoreVersions,
        ["apis"] => return Route::Groups,
        ["apis", g] => return Route::Group(g.to_string()),
        ["api", "v1"] => return Route::Resources(String::new(), "v1".into()),
        ["apis", g, v] => return Route::Resources(g.to_string(), v.to_string()),
        ["api", "v1", rest @ ..] => ("", "v1", rest),
        ["apis", g, v, rest @ ..] => (*g, *v, rest),
        _ => return Route::NotFound,
    };
    let target = |plural: &str, ns: Option<&str>, name: Option<&str>, sub: Option<&str>| {
        lookup(group, version, plural).map(|rt| Target {
            rt,
            ns: ns.map(String::from),
            name: name.map(String::from),
            sub: sub.map(String::from),
        })
    };
    let t = match rest {
        [plural] => target(plural, None, None, None),
        ["namespaces", ns, sub @ ("status" | "finalize")] if group.is_empty() => {
            target("namespaces", None, Some(ns), Some(sub))
        }
        ["namespaces", ns, plural] => {
            target(plural, Some(ns), None, None).filter(|t| t.rt.namespaced)
        }
        ["namespaces", ns, plural, name] => {
            target(plural, Some(ns), Some(name), None).filter(|t| t.rt.namespaced)
        }
        ["namespaces", ns, plural, name, sub] => {
            target(plural, Some(ns), Some(name), Some(sub)).filter(|t| t.rt.namespaced)
        }
        [plural, name] => target(plural, None, Some(name), None).filter(|t| !t.rt.namespaced),
        [plural, name, sub] => {
            target(plural, None, Some(name), Some(sub)).filter(|t| !t.rt.namespaced)
        }
        _ => None,
    };
    t.map_or(Route::NotFound, Route::Resource)
}

/// Everything a verb needs about its request.
struct Call<'a> {
    state: &'a State,
    t: &'a Target,
    query: HashMap<String, String>,
    accept: String,
    content_type: String,
    body: Bytes,
}

impl Call<'_> {
    fn ns(&self) -> Option<&str> {
        self.t.ns.as_deref()
    }
    fn key(&self, name: &str) -> String {
        keys::object(self.t.rt, self.ns(), name)
    }
    fn dry_run(&self) -> bool {
        self.query.get("dryRun").is_some_and(|v| v == "All")
    }
    fn not_found(&self, name: &str) -> ApiError {
        ApiError::NotFound {
            resource: self.t.rt.plural.into(),
            name: name.into(),
        }
    }
    fn store_err(&self, name: &str, e: StoreError) -> ApiError {
        match e {
            StoreError::AlreadyExists(_) => ApiError::AlreadyExists {
                resource: self.t.rt.plural.into(),
                name: name.into(),
            },
            StoreError::NotFound(_) => self.not_found(name),
            StoreError::Conflict { .. } => ApiError::Conflict {
                resource: self.t.rt.plural.into(),
                name: name.into(),
            },
            other => other.into(),
        }
    }
    fn respond(&self, code: u16, obj: &Value) -> Response<Body> {
        if table::wants_table(&self.accept) && code < 300 {
            let rv = meta_str(obj, "resourceVersion")
                .unwrap_or_default()
                .to_string();
            let include = self
                .query
                .get("includeObject")
                .map(String::as_str)
                .unwrap_or("Metadata");
            return http::json(
                code,
                &table::table(
                    self.t.rt,
                    &self.accept,
                    std::slice::from_ref(obj),
                    &rv,
                    include,
                    true,
                ),
            );
        }
        http::json(code, obj)
    }
}

/// The verb of a request, as RBAC and audit name it.
fn verb_of(method: &Method, t: &Target, query: &HashMap<String, String>) -> &'static str {
    let watch = query.get("watch").is_some_and(|v| v == "true" || v == "1");
    match (method, t.name.is_some()) {
        (&Method::GET, true) if watch => "watch",
        (&Method::GET, true) => "get",
        (&Method::GET, false) if watch => "watch",
        (&Method::GET, false) => "list",
        (&Method::POST, _) => "create",
        (&Method::PUT, _) => "update",
        (&Method::PATCH, _) => "patch",
        (&Method::DELETE, true) => "delete",
        (&Method::DELETE, false) => "deletecollection",
        _ => "unknown",
    }
}

fn header_str(req: &Request<Incoming>, name: header::HeaderName) -> String {
    req.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string()
}

/// Serves one request.
pub async fn handle(
    state: Arc<State>,
    cert_user: Option<UserInfo>,
    req: Request<Incoming>,
) -> Response<Body> {
    let start = Instant::now();
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let query = http::parse_query(req.uri().query());
    let span = info_span!("request", %method, %path);
    let _enter = span.enter();
    let route = route(&path);
    if matches!(route, Route::Health) {
        return http::raw(200, "text/plain", "ok");
    }
    let auth_header = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .map(String::from);
    let (verb, resource, group) = match &route {
        Route::Resource(t) => (
            verb_of(&method, t, &query),
            t.rt.plural.to_string(),
            t.rt.group,
        ),
        _ => (
            if method == Method::GET {
                "get"
            } else {
                "unknown"
            },
            path.clone(),
            "",
        ),
    };
    let (ns, name) = match &route {
        Route::Resource(t) => (t.ns.clone(), t.name.clone()),
        _ => (None, None),
    };
    let audit = |user: &str, code: u16| {
        if let Some(log) = &state.audit {
            log.record(&AuditRecord {
                time: rfc3339(now_secs()),
                user,
                verb,
                resource: &resource,
                group,
                namespace: ns.as_deref(),
                name: name.as_deref(),
                code,
            });
        }
    };
    let user = match state
        .auth
        .authenticate(auth_header.as_deref(), cert_user.as_ref())
    {
        Ok(u) => u,
        Err(e) => {
            audit("system:anonymous", e.code());
            return http::error(&e);
        }
    };
    let accept = header_str(&req, header::ACCEPT);
    let content_type = header_str(&req, header::CONTENT_TYPE);
    let response = match route {
        Route::Health => http::raw(200, "text/plain", "ok"),
        Route::Version => http::json(200, &discovery::version()),
        Route::CoreVersions => http::json(200, &discovery::core_versions()),
        Route::Groups => http::json(200, &discovery::group_list()),
        Route::Group(g) => discovery::group(&g)
            .map_or_else(|| http::error(&not_found_path()), |v| http::json(200, &v)),
        Route::Resources(g, v) => discovery::resource_list(&g, &v)
            .map_or_else(|| http::error(&not_found_path()), |v| http::json(200, &v)),
        Route::OpenApi => {
            if accept.contains("protobuf") {
                http::raw(200, "application/octet-stream", state.openapi_pb.clone())
            } else {
                http::raw(200, "application/json", state.openapi_json.clone())
            }
        }
        Route::Metrics => http::raw(200, "text/plain; version=0.0.4", state.metrics.encode()),
        Route::NotFound => http::error(&not_found_path()),
        Route::Resource(t) => {
            let body = match read_body(req).await {
                Ok(b) => b,
                Err(e) => return http::error(&e),
            };
            let result = match authorize(&state.store, &user, verb, t.rt, t.ns.as_deref()).await {
                Err(e) => Err(e),
                Ok(()) => {
                    let call = Call {
                        state: &state,
                        t: &t,
                        query,
                        accept,
                        content_type,
                        body,
                    };
                    dispatch(&call, &method, verb, &user).await
                }
            };
            match result {
                Ok(r) => r,
                Err(e) => {
                    debug!(error = %e, "request failed");
                    http::error(&e)
                }
            }
        }
    };
    let code = response.status().as_u16();
    if !matches!(verb, "get" | "list" | "watch") || code == 401 || code == 403 {
        audit(&user.name, code);
    }
    state
        .metrics
        .requests
        .get_or_create(&RequestLabels {
            verb: verb.into(),
            resource,
            code,
        })
        .inc();
    if verb != "watch" {
        state.metrics.latency.observe(start.elapsed().as_secs_f64());
    }
    response
}

async fn read_body(req: Request<Incoming>) -> Result<Bytes, ApiError> {
    let limited = http_body_util::Limited::new(req.into_body(), MAX_BODY);
    limited
        .collect()
        .await
        .map(|c| c.to_bytes())
        .map_err(|e| ApiError::BadRequest(format!("reading body: {e}")))
}

async fn dispatch(
    call: &Call<'_>,
    method: &Method,
    verb: &str,
    user: &UserInfo,
) -> Result<Response<Body>, ApiError> {
    let sub = call.t.sub.as_deref();
    if let Some(s) = sub
        && !(s == "status" && call.t.rt.has_status)
    {
        return Err(not_found_path());
    }
    if call.t.rt.namespaced
        && let Some(ns) = call.ns()
        && matches!(verb, "create" | "update" | "patch")
    {
        ensure_namespace(call, ns).await?;
    }
    debug!(user = %user.name, verb, "dispatch");
    match (method, call.t.name.as_deref(), verb) {
        (_, _, "watch") => {
            watch::serve(
                call.state,
                call.t.rt,
                call.ns(),
                call.t.name.as_deref(),
                &call.query,
                &call.accept,
            )
            .await
        }
        (&Method::GET, Some(name), _) => get(call, name).await,
        (&Method::GET, None, _) => list(call).await,
        (&Method::POST, None, _) => create(call).await,
        (&Method::PUT, Some(name), _) => update(call, name, sub == Some("status")).await,
        (&Method::PATCH, Some(name), _) => patch_object(call, name, sub == Some("status")).await,
        (&Method::DELETE, Some(name), _) => delete(call, name).await,
        (&Method::DELETE, None, _) => delete_collection(call).await,
        _ => Err(ApiError::MethodNotAllowed),
    }
}

async fn ensure_namespace(call: &Call<'_>, ns: &str) -> Result<(), ApiError> {
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

async fn get(call: &Call<'_>, name: &str) -> Result<Response<Body>, ApiError> {
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
        .map(|s| LabelSelector::parse(s))
        .transpose()?;
    let fields = query
        .get("fieldSelector")
        .map(|s| FieldSelector::parse(s))
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

async fn list(call: &Call<'_>) -> Result<Response<Body>, ApiError> {
    let (items, rev) = select(call.state, call.t.rt, call.ns(), &call.query).await?;
    if table::wants_table(&call.accept) {
        let include = call
            .query
            .get("includeObject")
            .map(String::as_str)
            .unwrap_or("Metadata");
        return Ok(http::json(
            200,
            &table::table(
                call.t.rt,
                &call.accept,
                &items,
                &rev.to_string(),
                include,
                true,
            ),
        ));
    }
    Ok(http::json(
        200,
        &json!({
            "kind": format!("{}List", call.t.rt.kind),
            "apiVersion": call.t.rt.api_version(),
            "metadata": {"resourceVersion": rev.to_string()},
            "items": items,
        }),
    ))
}

async fn create(call: &Call<'_>) -> Result<Response<Body>, ApiError> {
    let body = parse_body(&call.body, &call.content_type)?;
    let mut obj = admit(call.state, call.t.rt, call.ns(), None, body).await?;
    stamp_new(&mut obj);
    let name = meta_str(&obj, "name").unwrap_or_default().to_string();
    if call.dry_run() {
        return Ok(call.respond(201, &obj));
    }
    let rev = call
        .state
        .store
        .create(&call.key(&name), encode(&obj)?)
        .await
        .map_err(|e| call.store_err(&name, e))?;
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
    if call.dry_run() {
        return Ok(call.respond(200, &new));
    }
    let key = call.key(name);
    if finalized(&new) {
        let drev = call
            .state
            .store
            .delete(&key, rev)
            .await
            .map_err(|e| call.store_err(name, e))?;
        set_meta(&mut new, "resourceVersion", json!(drev.to_string()));
        return Ok(call.respond(200, &new));
    }
    let nrev = call
        .state
        .store
        .update(&key, encode(&new)?, rev)
        .await
        .map_err(|e| call.store_err(name, e))?;
    set_meta(&mut new, "resourceVersion", json!(nrev.to_string()));
    Ok(call.respond(200, &new))
}

async fn update(
    call: &Call<'_>,
    name: &str,
    status_only: bool,
) -> Result<Response<Body>, ApiError> {
    let body = parse_body(&call.body, &call.content_type)?;
    let sent = sent_revision(&body)?;
    let kv = call
        .state
        .store
        .get(&call.key(name))
        .await?
        .ok_or_else(|| call.not_found(name))?;
    if sent.is_some_and(|s| s != kv.revision) {
        return Err(ApiError::Conflict {
            resource: call.t.rt.plural.into(),
            name: name.into(),
        });
    }
    let old = present(call.t.rt, &kv)?;
    let mut new = admit(call.state, call.t.rt, call.ns(), Some(name), body).await?;
    carry_over(call.t.rt, &old, &mut new, status_only);
    write_update(call, name, kv.revision, &old, new).await
}

async fn patch_object(
    call: &Call<'_>,
    name: &str,
    status_only: bool,
) -> Result<Response<Body>, ApiError> {
    let kind = PatchType::from_content_type(&call.content_type)?;
    // A patch carries no precondition of its own unless it sets resourceVersion, so a lost
    // race with another writer is retried on the new version.
    for _ in 0..5 {
        let Some(kv) = call.state.store.get(&call.key(name)).await? else {
            if kind == PatchType::Apply && !status_only {
                let body = patch::parse_apply(&call.body)?;
                let mut obj = admit(call.state, call.t.rt, call.ns(), Some(name), body).await?;
                stamp_new(&mut obj);
                if call.dry_run() {
                    return Ok(call.respond(201, &obj));
                }
                let rev = call
                    .state
                    .store
                    .create(&call.key(name), encode(&obj)?)
                    .await
                    .map_err(|e| call.store_err(name, e))?;
                set_meta(&mut obj, "resourceVersion", json!(rev.to_string()));
                return Ok(call.respond(201, &obj));
            }
            return Err(call.not_found(name));
        };
        let old = present(call.t.rt, &kv)?;
        let mut patched = old.clone();
        patch::apply(call.t.rt, kind, &mut patched, &call.body)?;
        let sent = sent_revision(&patched)?;
        if sent.is_some_and(|s| s != kv.revision) {
            return Err(ApiError::Conflict {
                resource: call.t.rt.plural.into(),
                name: name.into(),
            });
        }
        let mut new = admit(call.state, call.t.rt, call.ns(), Some(name), patched).await?;
        carry_over(call.t.rt, &old, &mut new, status_only);
        match write_update(call, name, kv.revision, &old, new).await {
            Err(ApiError::Conflict { .. }) if sent.is_none() => continue,
            other => return other,
        }
    }
    Err(ApiError::Conflict {
        resource: call.t.rt.plural.into(),
        name: name.into(),
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
        if precondition.is_some_and(|p| p != kv.revision) {
            return Err(ApiError::Conflict {
                resource: rt.plural.into(),
                name: name.into(),
            });
        }
        let mut obj = present(rt, &kv)?;
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
            call.state.store.delete(&key, kv.revision).await
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
    Ok(())
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

async fn delete(call: &Call<'_>, name: &str) -> Result<Response<Body>, ApiError> {
    let pre = delete_precondition(&call.body)?;
    let obj = delete_one(call, call.t.rt, call.ns(), name, pre).await?;
    Ok(call.respond(200, &obj))
}

async fn delete_collection(call: &Call<'_>) -> Result<Response<Body>, ApiError> {
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
