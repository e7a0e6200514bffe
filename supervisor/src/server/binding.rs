//! The `binding` subresource of Pods (`POST pods/{name}/binding`, a core/v1 Binding): how a
//! scheduler assigns a Pod to a Node. It sets `spec.nodeName` once; binding a Pod that is
//! already bound elsewhere is a conflict, as upstream. The write goes through the Pod's own
//! patch path (validation, conflicts, watch events are the Pod's).

use std::collections::HashMap;

use hyper::{Method, Response};
use serde_json::{Value, json};

use super::handler::{Call, Target};
use super::http::Body;
use super::objects::{meta_str, parse_body, present};
use super::verbs;
use crate::api::registry::ResourceType;
use crate::error::{ApiError, FieldError};
use crate::store::Store;

/// Whether `rt` has a binding subresource.
pub fn bindable(rt: &ResourceType) -> bool {
    rt.group.is_empty() && rt.plural == "pods"
}

/// Serves POST on `pods/{name}/binding`.
pub(super) async fn serve(call: &Call<'_>, method: &Method) -> Result<Response<Body>, ApiError> {
    let (Some(name), &Method::POST) = (call.t.name.as_deref(), method) else {
        return Err(ApiError::MethodNotAllowed);
    };
    let binding = parse_body(&call.body, &call.content_type)?;
    let invalid = |cause| ApiError::Invalid {
        kind: "Binding".into(),
        name: name.into(),
        causes: vec![cause],
    };
    let node = match binding.pointer("/target/name").and_then(Value::as_str) {
        Some(n) if !n.is_empty() => n.to_string(),
        _ => return Err(invalid(FieldError::required("target.name"))),
    };
    if let Some(kind) = binding.pointer("/target/kind").and_then(Value::as_str)
        && !kind.is_empty()
        && kind != "Node"
    {
        return Err(invalid(FieldError::not_supported(
            "target.kind",
            kind,
            &["Node"],
        )));
    }
    if meta_str(&binding, "name").is_some_and(|n| n != name) {
        return Err(ApiError::BadRequest(format!(
            "the name of the Binding does not match the Pod {name}"
        )));
    }
    let kv = call
        .state
        .store
        .get(&call.key(name))
        .await?
        .ok_or_else(|| call.not_found(name))?;
    let pod = present(call.t.rt, &kv)?;
    match pod.pointer("/spec/nodeName").and_then(Value::as_str) {
        Some(bound) if !bound.is_empty() => {
            return Err(ApiError::AlreadyBound {
                pod: name.into(),
                node: bound.into(),
            });
        }
        _ => {}
    }
    let ops = json!([
        {"op": "test", "path": "/metadata/resourceVersion", "value": kv.revision.to_string()},
        {"op": "add", "path": "/spec/nodeName", "value": node},
    ]);
    let body = serde_json::to_vec(&ops).map_err(|e| ApiError::Internal(e.to_string()))?;
    let target = Target {
        rt: call.t.rt,
        ns: call.t.ns.clone(),
        name: Some(name.to_string()),
        sub: None,
    };
    let query: HashMap<String, String> = call
        .query
        .iter()
        .filter(|(k, _)| matches!(k.as_str(), "dryRun" | "fieldManager"))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let pod_call = Call {
        state: call.state,
        t: &target,
        query,
        accept: "application/json".into(),
        content_type: "application/json-patch+json".into(),
        body: body.into(),
    };
    verbs::patch_object(&pod_call, name, false).await?;
    Ok(super::http::json(
        201,
        &json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "code": 201}),
    ))
}
