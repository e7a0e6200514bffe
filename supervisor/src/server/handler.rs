//! Request dispatch: authentication, routing, authorization, the verbs, audit and metrics.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::{Method, Request, Response, header};
use serde_json::Value;
use tracing::{Instrument, debug, info_span};

use super::early::RequestBody;
use super::http::{self, Body};
use super::objects::meta_str;
use super::{
    State, access_review, binding, discovery, health, join, keys, logs, scale, table, verbs, watch,
};
use crate::api::meta::{now_secs, rfc3339};
use crate::api::registry::{ResourceType, lookup};
use crate::audit::AuditRecord;
use crate::auth::{BOOTSTRAPPERS, UserInfo, authorize, bootstrap_token};
use crate::error::ApiError;
use crate::metrics::RequestLabels;
use crate::store::StoreError;

/// Largest request body accepted (Kubernetes' limit is 3 MiB).
const MAX_BODY: usize = 3 * 1024 * 1024;

/// A parsed resource path.
#[derive(Debug)]
pub(super) struct Target {
    pub(super) rt: &'static ResourceType,
    pub(super) ns: Option<String>,
    pub(super) name: Option<String>,
    pub(super) sub: Option<String>,
}

enum Route {
    Health(health::Endpoint, Option<String>),
    Version,
    CoreVersions,
    Groups,
    Group(String),
    Resources(String, String),
    OpenApi,
    Metrics,
    AccessReview,
    HostJoin,
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
        [ep @ ("healthz" | "livez" | "readyz"), check @ ..] if check.len() <= 1 => {
            let ep = match *ep {
                "livez" => health::Endpoint::Live,
                "readyz" => health::Endpoint::Ready,
                _ => health::Endpoint::Health,
            };
            return Route::Health(ep, check.first().map(|c| c.to_string()));
        }
        ["version"] => return Route::Version,
        ["metrics"] => return Route::Metrics,
        ["openapi", "v2"] => return Route::OpenApi,
        [
            "apis",
            access_review::GROUP,
            access_review::VERSION,
            access_review::PLURAL,
        ] => {
            return Route::AccessReview;
        }
        [
            "apis",
            slipway_api::slipway::GROUP,
            slipway_api::slipway::VERSION,
            join::PLURAL,
        ] => {
            return Route::HostJoin;
        }
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
pub(super) struct Call<'a> {
    pub(super) state: &'a State,
    pub(super) t: &'a Target,
    pub(super) query: HashMap<String, String>,
    pub(super) accept: String,
    pub(super) content_type: String,
    pub(super) body: Bytes,
}

impl Call<'_> {
    pub(super) fn ns(&self) -> Option<&str> {
        self.t.ns.as_deref()
    }
    pub(super) fn key(&self, name: &str) -> String {
        keys::object(self.t.rt, self.ns(), name)
    }
    pub(super) fn dry_run(&self) -> bool {
        self.query.get("dryRun").is_some_and(|v| v == "All")
    }
    pub(super) fn not_found(&self, name: &str) -> ApiError {
        ApiError::NotFound {
            resource: self.t.rt.plural.into(),
            name: name.into(),
        }
    }
    pub(super) fn store_err(&self, name: &str, e: StoreError) -> ApiError {
        match e {
            StoreError::AlreadyExists(_) => ApiError::AlreadyExists {
                resource: self.t.rt.plural.into(),
                name: name.into(),
            },
            StoreError::NotFound(_) => self.not_found(name),
            StoreError::Conflict {
                expected, current, ..
            } => ApiError::Conflict {
                resource: self.t.rt.plural.into(),
                name: name.into(),
                stale: Some((expected, current)),
            },
            other => other.into(),
        }
    }
    pub(super) fn respond(&self, code: u16, obj: &Value) -> Response<Body> {
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

fn header_str(req: &Request<RequestBody>, name: header::HeaderName) -> String {
    req.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string()
}

/// Serves one request, inside a `request` span. The span is attached to the future, not
/// entered across its awaits: a guard held over an await leaves the span entered on whichever
/// thread polls next, and the registry then panics on a span it has already closed.
pub async fn handle(
    state: Arc<State>,
    cert_user: Option<UserInfo>,
    req: Request<RequestBody>,
) -> Response<Body> {
    let span = info_span!("request", method = %req.method(), path = %req.uri().path());
    serve(state, cert_user, req).instrument(span).await
}

async fn serve(
    state: Arc<State>,
    cert_user: Option<UserInfo>,
    req: Request<RequestBody>,
) -> Response<Body> {
    let start = Instant::now();
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let query = http::parse_query(req.uri().query());
    let route = route(&path);
    if let Route::Health(ep, check) = &route {
        return health::serve(&state, *ep, check.as_deref(), &query).await;
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
        Route::AccessReview => ("create", access_review::PLURAL.into(), access_review::GROUP),
        Route::HostJoin => ("create", join::PLURAL.into(), slipway_api::slipway::GROUP),
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
    let (ns, name, sub) = match &route {
        Route::Resource(t) => (t.ns.clone(), t.name.clone(), t.sub.clone()),
        _ => (None, None, None),
    };
    let audit = |user: &str, code: u16| {
        if let Some(log) = &state.audit {
            log.record(&AuditRecord {
                time: rfc3339(now_secs()),
                user,
                verb,
                resource: &resource,
                subresource: sub.as_deref(),
                group,
                namespace: ns.as_deref(),
                name: name.as_deref(),
                code,
            });
        }
    };
    let authenticated = match state
        .auth
        .authenticate(auth_header.as_deref(), cert_user.as_ref())
    {
        Ok(u) => Ok(u),
        // Not a token of the token file: perhaps a bootstrap token.
        Err(e) => match bootstrap_token(&state.store, auth_header.as_deref(), now_secs()).await {
            Ok(Some(t)) => Ok(UserInfo {
                name: format!("system:bootstrap:{}", t.id),
                groups: vec![BOOTSTRAPPERS.into()],
            }),
            Ok(None) => Err(e),
            Err(e) => Err(e),
        },
    };
    let user = match authenticated {
        Ok(u) => u,
        Err(e) => {
            audit("system:anonymous", e.code());
            return http::error(&e);
        }
    };
    let accept = header_str(&req, header::ACCEPT);
    let content_type = header_str(&req, header::CONTENT_TYPE);
    let response = match route {
        Route::Health(..) => http::error(&not_found_path()),
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
        Route::AccessReview if method != Method::POST => http::error(&ApiError::MethodNotAllowed),
        Route::AccessReview => {
            let result = match read_body(req).await {
                Ok(b) => {
                    let body = if content_type.starts_with(access_review::PROTOBUF) {
                        access_review::from_protobuf(&b)
                    } else {
                        super::objects::parse_body(&b, &content_type)
                    };
                    match body {
                        Ok(body) => access_review::review(&state, &user, &body).await,
                        Err(e) => Err(e),
                    }
                }
                Err(e) => Err(e),
            };
            match result {
                Ok(v) => http::json(201, &v),
                Err(e) => http::error(&e),
            }
        }
        Route::HostJoin if method != Method::POST => http::error(&ApiError::MethodNotAllowed),
        Route::HostJoin => {
            let authority = req
                .uri()
                .authority()
                .map(ToString::to_string)
                .unwrap_or_else(|| header_str(&req, header::HOST));
            let result = match read_body(req).await {
                Ok(b) => match super::objects::parse_body(&b, &content_type) {
                    Ok(body) => {
                        join::join(&state, &user, auth_header.as_deref(), &authority, &body).await
                    }
                    Err(e) => Err(e),
                },
                Err(e) => Err(e),
            };
            match result {
                Ok(v) => http::json(201, &v),
                Err(e) => http::error(&e),
            }
        }
        Route::Resource(t) => {
            let body = match read_body(req).await {
                Ok(b) => b,
                Err(e) => return http::error(&e),
            };
            let result = match authorize(
                &state.store,
                &user,
                verb,
                t.rt,
                t.sub.as_deref(),
                t.ns.as_deref(),
                t.name.as_deref(),
            )
            .await
            {
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

async fn read_body(req: Request<RequestBody>) -> Result<Bytes, ApiError> {
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
    if sub == Some("scale") && scale::scalable(call.t.rt) {
        return scale::serve(call, method).await;
    }
    if sub == Some("binding") && binding::bindable(call.t.rt) {
        return binding::serve(call, method).await;
    }
    if sub == Some("log") && logs::loggable(call.t.rt) {
        return logs::serve(call, method).await;
    }
    if let Some(s) = sub
        && !(s == "status" && call.t.rt.has_status)
    {
        return Err(not_found_path());
    }
    if call.t.rt.namespaced
        && let Some(ns) = call.ns()
        && matches!(verb, "create" | "update" | "patch")
    {
        verbs::ensure_namespace(call, ns).await?;
    }
    debug!(user = %user.name, verb, "dispatch");
    match (method, call.t.name.as_deref(), verb) {
        (_, _, "watch") => {
            let permit = call.state.limiter.watch(&user.name).map_err(|r| {
                ApiError::TooManyRequests(format!(
                    "user {:?} has too many open watches: {r}",
                    user.name
                ))
            })?;
            watch::serve(
                permit,
                call.state,
                call.t.rt,
                call.ns(),
                call.t.name.as_deref(),
                &call.query,
                &call.accept,
            )
            .await
        }
        (&Method::GET, Some(name), _) => verbs::get(call, name).await,
        (&Method::GET, None, _) => verbs::list(call).await,
        (&Method::POST, None, _) => verbs::create(call).await,
        (&Method::PUT, Some(name), _) => verbs::update(call, name, sub == Some("status")).await,
        (&Method::PATCH, Some(name), _) => {
            verbs::patch_object(call, name, sub == Some("status")).await
        }
        (&Method::DELETE, Some(name), _) => verbs::delete(call, name).await,
        (&Method::DELETE, None, _) => verbs::delete_collection(call).await,
        _ => Err(ApiError::MethodNotAllowed),
    }
}
