//! The local API's handlers: services, hosts, the policy state, explain, flows, status, metrics.

use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use serde::Deserialize;
use slipway_dataplane::node::NodeMaps;
use tracing::warn;

use crate::hosts::{Host, sync_routes, validate_hosts};
use crate::metrics::render_metrics;
use crate::policy::{FlowFilter, List, ListKind};
use crate::run::{Agent, desired_path, write_atomically};
use crate::services::{LocalService, service_entries, validate_services};

pub(crate) async fn get_services(State(agent): State<Arc<Agent>>) -> Json<Vec<LocalService>> {
    Json(agent.services.lock().await.0.clone())
}

/// Replaces the service list (`PUT /v1/services`).
pub(crate) async fn put_services(
    State(agent): State<Arc<Agent>>,
    body: axum::body::Bytes,
) -> Reply {
    if let Some(refused) = refused_while_fed(&agent) {
        return refused;
    }
    let services: Vec<LocalService> = match serde_json::from_slice(&body) {
        Ok(services) => services,
        Err(e) => return errors(400, vec![format!("body: {e}")]),
    };
    apply_services(&agent, services).await
}

/// Replaces the service list, whoever asks (the local API or the cluster feed): it is written
/// to disk before the datapath changes, and the reply is made after both, so a 2xx means a
/// restarted agent knows the list too.
pub(crate) async fn apply_services(agent: &Agent, services: Vec<LocalService>) -> Reply {
    if let Err(invalid) = validate_services(&services, agent.args.pod_cidr) {
        return (
            StatusCode::UNPROCESSABLE_ENTITY,
            Json(serde_json::json!(invalid)),
        );
    }
    let mut current = agent.services.lock().await;
    let failed = |e: String| {
        warn!(error = %e, "applying services failed");
        errors(500, vec![e])
    };
    let body = match serde_json::to_vec_pretty(&services) {
        Ok(body) => body,
        Err(e) => return failed(e.to_string()),
    };
    if let Err(e) = write_atomically(&desired_path(&agent.args.data_dir, "services"), &body) {
        return failed(e.to_string());
    }
    let wanted = service_entries(&services, agent.node_ip, agent.host_block);
    let datapath = &mut current.1;
    for (key, backends) in &wanted {
        if let Err(e) = datapath.upsert_service(*key, backends) {
            return failed(e.to_string());
        }
    }
    match datapath.services() {
        Ok(existing) => {
            for key in existing.into_keys().filter(|k| !wanted.contains_key(k)) {
                if let Err(e) = datapath.remove_service(key) {
                    return failed(e.to_string());
                }
            }
        }
        Err(e) => return failed(e.to_string()),
    }
    agent.health_ports.update(&services, agent.host_block);
    current.0 = services;
    (
        StatusCode::OK,
        Json(serde_json::json!({ "services": current.0.len(), "entries": wanted.len() })),
    )
}

/// While the cluster feed drives the agent, the local API's PUTs would race it: they are
/// refused, naming where the state comes from.
fn refused_while_fed(agent: &Agent) -> Option<Reply> {
    agent.feed.as_ref().map(|feed| {
        errors(
            409,
            vec![format!(
                "the agent's state comes from the cluster API (--cluster-kubeconfig {}): \
                 change it there; the local API only reads",
                feed.source
            )],
        )
    })
}

pub(crate) type Reply = (StatusCode, Json<serde_json::Value>);

pub(crate) fn errors(status: u16, errors: Vec<String>) -> Reply {
    (
        StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        Json(serde_json::json!({ "errors": errors })),
    )
}

/// Replaces one list of the policy state from a PUT body.
pub(crate) async fn put_policy_state(agent: &Agent, kind: ListKind, body: &[u8]) -> Reply {
    if let Some(refused) = refused_while_fed(agent) {
        return refused;
    }
    let list = match List::parse(kind, body) {
        Ok(list) => list,
        Err(e) => return errors(400, e),
    };
    apply_policy_list(agent, list, Some(body)).await
}

/// Replaces one list of the policy state, whoever asks (`raw`: the body it was parsed from, to
/// persist as given); answers after the datapath enforces the result.
pub(crate) async fn apply_policy_list(agent: &Agent, list: List, raw: Option<&[u8]>) -> Reply {
    match agent.policy.replace(list, raw).await {
        // Enforced, but endpoints whose rules do not fit fail closed: the reply says which.
        Ok(generation) => {
            let status = agent.policy.status();
            (
                StatusCode::OK,
                Json(serde_json::json!({
                    "generation": generation,
                    "failClosed": status["failClosed"],
                    "failClosedErrors": status["errors"],
                })),
            )
        }
        Err(e) => {
            if e.status >= 500 {
                warn!(errors = ?e.errors, "installing policy state failed");
            }
            errors(e.status, e.errors)
        }
    }
}

pub(crate) async fn get_namespaces(State(agent): State<Arc<Agent>>) -> Json<serde_json::Value> {
    Json(serde_json::json!(agent.policy.desired().await.namespaces))
}

pub(crate) async fn put_namespaces(
    State(agent): State<Arc<Agent>>,
    body: axum::body::Bytes,
) -> Reply {
    put_policy_state(&agent, ListKind::Namespaces, &body).await
}

pub(crate) async fn get_pods(State(agent): State<Arc<Agent>>) -> Json<serde_json::Value> {
    Json(serde_json::json!(agent.policy.desired().await.pods))
}

pub(crate) async fn put_pods(State(agent): State<Arc<Agent>>, body: axum::body::Bytes) -> Reply {
    put_policy_state(&agent, ListKind::Pods, &body).await
}

pub(crate) async fn get_policies(State(agent): State<Arc<Agent>>) -> Json<serde_json::Value> {
    Json(serde_json::json!(agent.policy.desired().await.policies))
}

pub(crate) async fn put_policies(
    State(agent): State<Arc<Agent>>,
    body: axum::body::Bytes,
) -> Reply {
    put_policy_state(&agent, ListKind::Policies, &body).await
}

#[derive(Debug, Deserialize)]
pub(crate) struct ExplainQuery {
    src: String,
    dst: String,
    port: u16,
    #[serde(default = "crate::services::tcp")]
    protocol: String,
}

pub(crate) async fn explain(
    State(agent): State<Arc<Agent>>,
    query: Result<axum::extract::Query<ExplainQuery>, axum::extract::rejection::QueryRejection>,
) -> Reply {
    let query = match query {
        Ok(q) => q.0,
        Err(e) => {
            return errors(
                400,
                vec![format!("query: {e} (want src, dst, port, protocol)")],
            );
        }
    };
    match agent.policy.explain(
        &query.src,
        &query.dst,
        query.port,
        &query.protocol.to_uppercase(),
    ) {
        Ok(json) => (StatusCode::OK, Json(json)),
        Err(e) => errors(e.status, e.errors),
    }
}

/// The query of `GET /v1/flows`: a [`FlowFilter`] and `follow` (not flattened: query strings
/// carry no types through serde's flatten).
#[derive(Debug, Deserialize)]
pub(crate) struct FlowQuery {
    namespace: Option<String>,
    pod: Option<String>,
    verdict: Option<String>,
    port: Option<u16>,
    #[serde(default)]
    follow: bool,
}

/// Verdict events as JSON lines: the recent ones, then (with `follow`) the ones to come.
pub(crate) async fn flows(
    State(agent): State<Arc<Agent>>,
    query: Result<axum::extract::Query<FlowQuery>, axum::extract::rejection::QueryRejection>,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    let query = match query {
        Ok(q) => q.0,
        Err(e) => return errors(400, vec![format!("query: {e}")]).into_response(),
    };
    let filter = FlowFilter {
        namespace: query.namespace,
        pod: query.pod,
        verdict: query.verdict,
        port: query.port,
    };
    let (recent, receiver) = agent.policy.flows(&filter);
    let line = |flow: &crate::policy::Flow| {
        let mut line = serde_json::to_string(flow).unwrap_or_default();
        line.push('\n');
        line
    };
    let head: String = recent.iter().map(|f| line(f)).collect();
    let head = futures_util::stream::once(async move { Ok::<_, std::io::Error>(head) });
    let body = if query.follow {
        let live = futures_util::stream::unfold(receiver, move |mut rx| {
            let filter = filter.clone();
            async move {
                loop {
                    match rx.recv().await {
                        Ok(flow) if filter.matches(&flow) => {
                            return Some((Ok(line(&flow)), rx));
                        }
                        Ok(_) => continue,
                        Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                            warn!(missed = n, "a flows follower lagged");
                            continue;
                        }
                        Err(tokio::sync::broadcast::error::RecvError::Closed) => return None,
                    }
                }
            }
        });
        axum::body::Body::from_stream(futures_util::StreamExt::chain(head, live))
    } else {
        axum::body::Body::from_stream(head)
    };
    (
        [(axum::http::header::CONTENT_TYPE, "application/x-ndjson")],
        body,
    )
        .into_response()
}

pub(crate) async fn get_hosts(State(agent): State<Arc<Agent>>) -> Json<Vec<Host>> {
    Json(agent.hosts.lock().await.clone())
}

/// Replaces the host list (`PUT /v1/hosts`).
pub(crate) async fn put_hosts(State(agent): State<Arc<Agent>>, body: axum::body::Bytes) -> Reply {
    if let Some(refused) = refused_while_fed(&agent) {
        return refused;
    }
    let hosts: Vec<Host> = match serde_json::from_slice(&body) {
        Ok(hosts) => hosts,
        Err(e) => return errors(400, vec![format!("body: {e}")]),
    };
    apply_hosts(&agent, hosts).await
}

/// Replaces the host list, whoever asks: it is persisted first, then routes for new and changed
/// hosts are written before stale ones are removed, so a block never goes unrouted while it
/// moves.
pub(crate) async fn apply_hosts(agent: &Agent, hosts: Vec<Host>) -> Reply {
    if let Err(invalid) = validate_hosts(&hosts, agent.args.pod_cidr) {
        return (
            StatusCode::UNPROCESSABLE_ENTITY,
            Json(serde_json::json!(invalid)),
        );
    }
    let mut current = agent.hosts.lock().await;
    let persisted = serde_json::to_vec_pretty(&hosts)
        .map_err(std::io::Error::other)
        .and_then(|body| write_atomically(&desired_path(&agent.args.data_dir, "hosts"), &body));
    if let Err(e) = persisted {
        warn!(error = %e, "persisting the host list failed");
        return errors(500, vec![format!("persisting the host list: {e}")]);
    }
    match sync_routes(agent, &hosts) {
        Ok(()) => {
            *current = hosts;
            (
                StatusCode::OK,
                Json(serde_json::json!({ "hosts": current.len() })),
            )
        }
        Err(e) => {
            let mut message = e.to_string();
            if matches!(e, slipway_dataplane::DataplaneError::TableFull { .. }) {
                message.push_str(&format!(
                    ": the hosts need {} routes, raise {}",
                    hosts.len().saturating_sub(1),
                    crate::tables::sizing_flag("routes")
                ));
            }
            warn!(error = %message, "syncing routes failed");
            errors(500, vec![message])
        }
    }
}

pub(crate) async fn status(
    State(agent): State<Arc<Agent>>,
) -> (StatusCode, Json<serde_json::Value>) {
    let maps = match NodeMaps::open(&agent.pins) {
        Ok(maps) => maps,
        Err(e) => {
            return (
                StatusCode::SERVICE_UNAVAILABLE,
                Json(serde_json::json!({ "ready": false, "error": e.to_string() })),
            );
        }
    };
    let endpoints = maps.endpoints().map(|e| e.len()).unwrap_or_default();
    let routes = maps.routes().map(|r| r.len()).unwrap_or_default();
    (
        StatusCode::OK,
        Json(serde_json::json!({
            "ready": agent.pins.is_ready(),
            "hostBlock": agent.host_block.to_string(),
            "endpoints": endpoints,
            "routes": routes,
            "hosts": agent.hosts.lock().await.len(),
            "policy": agent.policy.status(),
        })),
    )
}

/// Prometheus text: the datapath's per-CPU counters summed, by device, direction and reason.
pub(crate) async fn metrics(State(agent): State<Arc<Agent>>) -> (StatusCode, String) {
    let services = agent.services.lock().await.1.counters();
    let services = match services {
        Ok(counters) => counters,
        Err(e) => {
            return (
                StatusCode::SERVICE_UNAVAILABLE,
                format!("# service datapath unavailable: {e}\n"),
            );
        }
    };
    match render_metrics(&agent.pins, &services) {
        // Both registries end with "# EOF": keep only the last.
        Ok(text) => {
            let mut text = text.trim_end().trim_end_matches("# EOF").to_owned();
            if let Some(feed) = &agent.feed {
                let feed = feed.render_metrics();
                text.push_str(feed.trim_end().trim_end_matches("# EOF"));
            }
            (StatusCode::OK, text + &agent.policy.render_metrics())
        }
        Err(e) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("# datapath unavailable: {e}\n"),
        ),
    }
}
