//! The `scale` subresource (`autoscaling/v1` Scale) of the kinds with replicas, which
//! `kubectl scale` reads and writes. A Cluster's scale is its worker replicas: reading sums its
//! node pools; writing needs exactly one pool (a cluster with several is scaled pool by pool
//! through its spec). A Deployment's or ReplicaSet's is its `spec.replicas`. A write goes through the object's own patch path, so validation,
//! admission (quota), dry-run and conflicts are the object's.

use std::collections::HashMap;

use http_body_util::BodyExt;
use hyper::{Method, Response};
use serde_json::{Value, json};

use super::handler::{Call, Target};
use super::http::Body;
use super::objects::{meta_str, parse_body, present};
use super::verbs;
use crate::api::registry::ResourceType;
use crate::error::{ApiError, FieldError};
use crate::patch::{self, PatchType};
use crate::store::Store;

/// Where a scalable kind keeps its replicas.
const POOLS: &str = "/spec/topology/nodePools";

/// Whether `rt` has a scale subresource.
pub fn scalable(rt: &ResourceType) -> bool {
    (rt.group == "slipway.dev" && rt.plural == "clusters") || is_workload(rt)
}

/// Deployments and ReplicaSets keep their replicas in `spec.replicas`, as upstream.
fn is_workload(rt: &ResourceType) -> bool {
    rt.group == "apps" && matches!(rt.plural, "deployments" | "replicasets")
}

fn pools(obj: &Value) -> &[Value] {
    obj.pointer(POOLS)
        .and_then(Value::as_array)
        .map_or(&[], Vec::as_slice)
}

/// The Scale view of an object.
fn to_scale(rt: &ResourceType, obj: &Value) -> Value {
    if is_workload(rt) {
        return workload_scale(obj);
    }
    let spec: u64 = pools(obj)
        .iter()
        .filter_map(|p| p.get("replicas").and_then(Value::as_u64))
        .sum();
    let control_plane = obj
        .pointer("/spec/topology/controlPlane/replicas")
        .and_then(Value::as_u64)
        .unwrap_or(0);
    let hosts = obj
        .pointer("/status/hosts")
        .and_then(Value::as_array)
        .map_or(0, |h| h.len() as u64);
    json!({
        "kind": "Scale",
        "apiVersion": "autoscaling/v1",
        "metadata": scale_meta(obj),
        "spec": {"replicas": spec},
        "status": {"replicas": hosts.saturating_sub(control_plane)},
    })
}

/// The Scale of a Deployment or ReplicaSet: its `spec.replicas`, `status.replicas` and the
/// selector in label-query form (what an autoscaler lists Pods with).
fn workload_scale(obj: &Value) -> Value {
    let selector: Vec<String> = obj
        .pointer("/spec/selector/matchLabels")
        .and_then(Value::as_object)
        .map(|m| {
            m.iter()
                .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or_default()))
                .collect()
        })
        .unwrap_or_default();
    json!({
        "kind": "Scale",
        "apiVersion": "autoscaling/v1",
        "metadata": scale_meta(obj),
        "spec": {"replicas": obj.pointer("/spec/replicas").and_then(Value::as_u64).unwrap_or(0)},
        "status": {
            "replicas": obj.pointer("/status/replicas").and_then(Value::as_u64).unwrap_or(0),
            "selector": selector.join(","),
        },
    })
}

fn scale_meta(obj: &Value) -> serde_json::Map<String, Value> {
    let mut meta = serde_json::Map::new();
    for f in [
        "name",
        "namespace",
        "uid",
        "resourceVersion",
        "creationTimestamp",
    ] {
        if let Some(v) = obj.get("metadata").and_then(|m| m.get(f)) {
            meta.insert(f.into(), v.clone());
        }
    }
    meta
}

fn invalid(name: &str, cause: FieldError) -> ApiError {
    ApiError::Invalid {
        kind: "Scale".into(),
        name: name.into(),
        causes: vec![cause],
    }
}

/// The replicas and resourceVersion precondition a Scale asks for.
fn wanted(name: &str, scale: &Value) -> Result<(u64, Option<String>), ApiError> {
    let replicas = match scale.pointer("/spec/replicas") {
        Some(v) => v.as_u64().ok_or_else(|| {
            invalid(
                name,
                FieldError::invalid("spec.replicas", v, "must be a non-negative integer"),
            )
        })?,
        None => return Err(invalid(name, FieldError::required("spec.replicas"))),
    };
    let rv = meta_str(scale, "resourceVersion")
        .filter(|s| !s.is_empty())
        .map(String::from);
    Ok((replicas, rv))
}

async fn current(call: &Call<'_>, name: &str) -> Result<Value, ApiError> {
    let kv = call
        .state
        .store
        .get(&call.key(name))
        .await?
        .ok_or_else(|| call.not_found(name))?;
    present(call.t.rt, &kv)
}

/// Serves GET, PUT and PATCH on `{object}/scale`.
pub(super) async fn serve(call: &Call<'_>, method: &Method) -> Result<Response<Body>, ApiError> {
    let Some(name) = call.t.name.as_deref() else {
        return Err(ApiError::MethodNotAllowed);
    };
    let obj = current(call, name).await?;
    let (replicas, precondition) = match *method {
        Method::GET => return Ok(super::http::json(200, &to_scale(call.t.rt, &obj))),
        Method::PUT => wanted(name, &parse_body(&call.body, &call.content_type)?)?,
        Method::PATCH => {
            let before = to_scale(call.t.rt, &obj);
            let mut scale = before.clone();
            let kind = PatchType::from_content_type(&call.content_type)?;
            if kind == PatchType::Apply {
                return Err(ApiError::UnsupportedMediaType(
                    "application/json-patch+json, application/merge-patch+json".into(),
                ));
            }
            patch::apply(call.t.rt, kind, &mut scale, &call.body)?;
            let (replicas, rv) = wanted(name, &scale)?;
            // The object's revision was copied in: only a patch that changed it sets one.
            (
                replicas,
                rv.filter(|rv| meta_str(&before, "resourceVersion") != Some(rv)),
            )
        }
        _ => return Err(ApiError::MethodNotAllowed),
    };
    let path = if is_workload(call.t.rt) {
        "/spec/replicas".to_string()
    } else {
        format!("{POOLS}/0/replicas")
    };
    let n = pools(&obj).len();
    if !is_workload(call.t.rt) && n != 1 {
        return Err(invalid(
            name,
            FieldError::invalid(
                "spec.topology.nodePools",
                format!("{n} pools"),
                "scale needs exactly one node pool; scale each pool through spec.topology.nodePools[i].replicas",
            ),
        ));
    }
    let mut ops = vec![json!({"op": "add", "path": path, "value": replicas})];
    if let Some(rv) = precondition {
        ops.push(json!({"op": "replace", "path": "/metadata/resourceVersion", "value": rv}));
    }
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
    let object_call = Call {
        state: call.state,
        t: &target,
        query,
        accept: "application/json".into(),
        content_type: "application/json-patch+json".into(),
        body: body.into(),
    };
    let response = verbs::patch_object(&object_call, name, false).await?;
    let code = response.status().as_u16();
    let bytes = match response.into_body().collect().await {
        Ok(c) => c.to_bytes(),
        Err(never) => match never {},
    };
    let updated: Value =
        serde_json::from_slice(&bytes).map_err(|e| ApiError::Internal(e.to_string()))?;
    Ok(super::http::json(code, &to_scale(call.t.rt, &updated)))
}
