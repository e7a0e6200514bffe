//! Object plumbing shared by the verbs: decoding, validation, server-set metadata, and the
//! conversion between stored bytes and API objects (resourceVersion = store revision).

use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, Ordering};

use serde_json::{Map, Value, json};

use super::State;
use crate::admission;
use crate::api::meta::{check_dns_label, check_dns_subdomain, check_labels, now_secs, rfc3339};
use crate::api::registry::{ResourceType, jp};
use crate::error::{ApiError, FieldError};
use crate::store::KeyValue;

fn random_u64() -> u64 {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    RandomState::new().hash_one((n, t))
}

/// A random RFC 4122-shaped (version 4) UID.
pub fn new_uid() -> String {
    let (a, b) = (random_u64(), random_u64());
    format!(
        "{:08x}-{:04x}-4{:03x}-{:04x}-{:012x}",
        a >> 32,
        (a >> 16) & 0xffff,
        a & 0xfff,
        0x8000 | (b >> 48) & 0x3fff,
        b & 0xffff_ffff_ffff
    )
}

fn random_suffix() -> String {
    const A: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    let mut r = random_u64();
    (0..5)
        .map(|_| {
            let c = A[(r % A.len() as u64) as usize];
            r /= A.len() as u64;
            char::from(c)
        })
        .collect()
}

/// Decodes stored bytes into the API object with its resourceVersion.
pub fn present(rt: &ResourceType, kv: &KeyValue) -> Result<Value, ApiError> {
    let mut v: Value = serde_json::from_slice(&kv.value)
        .map_err(|e| ApiError::Internal(format!("corrupt object {}: {e}", kv.key)))?;
    set_meta(&mut v, "resourceVersion", json!(kv.revision.to_string()));
    if let Some(m) = v.as_object_mut() {
        m.insert("apiVersion".into(), json!(rt.api_version()));
        m.insert("kind".into(), json!(rt.kind));
    }
    Ok(v)
}

/// Serializes an object for the store (the revision is the store's, not the object's).
pub fn encode(obj: &Value) -> Result<Vec<u8>, ApiError> {
    let mut v = obj.clone();
    if let Some(m) = v.get_mut("metadata").and_then(Value::as_object_mut) {
        m.remove("resourceVersion");
    }
    serde_json::to_vec(&v).map_err(|e| ApiError::Internal(e.to_string()))
}

/// Sets one `metadata` field.
pub fn set_meta(obj: &mut Value, field: &str, value: Value) {
    if let Some(m) = obj.as_object_mut() {
        let meta = m
            .entry("metadata")
            .or_insert_with(|| Value::Object(Map::new()));
        if let Some(meta) = meta.as_object_mut() {
            if value.is_null() {
                meta.remove(field);
            } else {
                meta.insert(field.into(), value);
            }
        }
    }
}

/// Reads one `metadata` string field.
pub fn meta_str<'a>(obj: &'a Value, field: &str) -> Option<&'a str> {
    obj.get("metadata")
        .and_then(|m| m.get(field))
        .and_then(Value::as_str)
}

/// The revision a client sent in `metadata.resourceVersion` (None when absent or empty).
pub fn sent_revision(rt: &ResourceType, obj: &Value) -> Result<Option<u64>, ApiError> {
    match meta_str(obj, "resourceVersion") {
        None | Some("") => Ok(None),
        Some(s) => s.parse().map(Some).map_err(|_| ApiError::Invalid {
            kind: rt.kind.to_string(),
            name: meta_str(obj, "name").unwrap_or_default().to_string(),
            causes: vec![FieldError::invalid(
                "metadata.resourceVersion",
                format!("{s:?}"),
                "must be a store revision",
            )],
        }),
    }
}

/// Parses a request body (JSON, or YAML when the client sends YAML).
pub fn parse_body(body: &[u8], content_type: &str) -> Result<Value, ApiError> {
    if content_type.contains("yaml") {
        let text = std::str::from_utf8(body)
            .map_err(|_| ApiError::BadRequest("body is not UTF-8".into()))?;
        return serde_saphyr::from_str(text)
            .map_err(|e| ApiError::BadRequest(format!("invalid YAML body: {e}")));
    }
    // Kubernetes protobuf (current kubectl's `create` generators send it): read for the
    // kinds `protobuf` knows, 415 otherwise; CBOR never.
    if content_type.starts_with(super::protobuf::PROTOBUF) {
        return super::protobuf::to_json(body);
    }
    if content_type.contains("cbor") {
        return Err(ApiError::UnsupportedMediaType(
            "application/json, application/yaml".into(),
        ));
    }
    serde_json::from_slice(body)
        .map_err(|e| ApiError::BadRequest(format!("invalid JSON body: {e}")))
}

/// Decodes, defaults, validates and admits an object written to `rt` in `ns`. Returns the
/// normalized object (without server-set metadata) or an error naming every bad field.
pub async fn admit(
    state: &State,
    rt: &ResourceType,
    ns: Option<&str>,
    url_name: Option<&str>,
    mut body: Value,
    run_admission: bool,
) -> Result<Value, ApiError> {
    if !body.is_object() {
        return Err(ApiError::BadRequest(format!(
            "{} body must be a JSON object",
            rt.kind
        )));
    }
    let api_version = body
        .get("apiVersion")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    let kind = body
        .get("kind")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    if (!api_version.is_empty() && api_version != rt.api_version())
        || (!kind.is_empty() && kind != rt.kind)
    {
        return Err(ApiError::BadRequest(format!(
            "the API version in the data ({api_version}) and kind ({kind}) do not match the resource {}/{} of this endpoint",
            rt.api_version(),
            rt.kind
        )));
    }
    if let Some(m) = body.as_object_mut() {
        m.insert("apiVersion".into(), json!(rt.api_version()));
        m.insert("kind".into(), json!(rt.kind));
    }
    // Namespace from the URL; a different one in the body is a client error.
    if rt.namespaced {
        match (meta_str(&body, "namespace"), ns) {
            (Some(b), Some(u)) if b != u => {
                return Err(ApiError::BadRequest(
                    "the namespace of the provided object does not match the namespace sent on the request".into(),
                ));
            }
            (_, Some(u)) => set_meta(&mut body, "namespace", json!(u)),
            _ => {}
        }
    } else {
        set_meta(&mut body, "namespace", Value::Null);
    }
    if meta_str(&body, "name").is_none_or(str::is_empty)
        && let Some(prefix) = meta_str(&body, "generateName")
    {
        let name = format!("{prefix}{}", random_suffix());
        set_meta(&mut body, "name", json!(name));
    }
    if let (Some(u), Some(b)) = (url_name, meta_str(&body, "name"))
        && u != b
    {
        return Err(ApiError::BadRequest(format!(
            "the name of the object ({b}) does not match the name on the URL ({u})"
        )));
    }
    let (obj, mut errs) = rt.decode(body)?;
    let name = meta_str(&obj, "name").unwrap_or_default().to_string();
    if name.is_empty() {
        errs.insert(0, FieldError::required("metadata.name"));
    } else if matches!(rt.plural, "namespaces" | "services") {
        check_dns_label("metadata.name", &name, &mut errs);
    } else {
        check_dns_subdomain("metadata.name", &name, &mut errs);
    }
    if let Some(labels) =
        jp(&obj, "metadata.labels").and_then(|l| serde_json::from_value(l.clone()).ok())
    {
        check_labels("metadata.labels", &labels, &mut errs);
    }
    if !errs.is_empty() {
        return Err(ApiError::Invalid {
            kind: rt.kind.to_string(),
            name,
            causes: errs,
        });
    }
    if !run_admission {
        return Ok(obj);
    }
    match (rt.group, rt.plural, ns) {
        ("slipway.dev", "clusters", Some(ns)) => {
            admission::admit_cluster(&state.store, &state.admission, ns, &obj).await?
        }
        ("", "persistentvolumeclaims", Some(ns)) => {
            admission::admit_pvc(&state.store, ns, &obj).await?
        }
        _ => {}
    }
    Ok(obj)
}

/// The stored object with only its status taken from `body`: what a status-subresource write
/// asks for.
pub fn with_status_of(old: &Value, body: &Value) -> Value {
    let mut merged = old.clone();
    if let Some(m) = merged.as_object_mut() {
        match body.get("status") {
            Some(st) => m.insert("status".into(), st.clone()),
            None => m.remove("status"),
        };
    }
    merged
}

/// A create's body without its status: status is the controllers' to write, through the
/// status subresource (Kubernetes resets it on create too).
pub fn without_status(rt: &ResourceType, mut body: Value) -> Value {
    if rt.has_status
        && let Some(m) = body.as_object_mut()
    {
        m.remove("status");
    }
    body
}

/// Stamps the server-owned metadata of a new object.
pub fn stamp_new(obj: &mut Value) {
    set_meta(obj, "uid", json!(new_uid()));
    set_meta(obj, "creationTimestamp", json!(rfc3339(now_secs())));
    set_meta(obj, "generation", json!(1));
    set_meta(obj, "resourceVersion", Value::Null);
    set_meta(obj, "deletionTimestamp", Value::Null);
    set_meta(obj, "deletionGracePeriodSeconds", Value::Null);
}

/// Carries server-owned metadata (and, for the main resource, status) from the stored object
/// into an update; bumps generation when anything but metadata and status changed.
pub fn carry_over(rt: &ResourceType, old: &Value, new: &mut Value, status_only: bool) {
    if status_only {
        let status = new.get("status").cloned();
        let mut merged = old.clone();
        if let Some(m) = merged.as_object_mut() {
            match status {
                Some(s) => m.insert("status".into(), s),
                None => m.remove("status"),
            };
        }
        *new = merged;
        return;
    }
    for f in [
        "uid",
        "creationTimestamp",
        "deletionTimestamp",
        "deletionGracePeriodSeconds",
        "generation",
    ] {
        set_meta(
            new,
            f,
            old.get("metadata")
                .and_then(|m| m.get(f))
                .cloned()
                .unwrap_or(Value::Null),
        );
    }
    if rt.has_status
        && let Some(m) = new.as_object_mut()
    {
        match old.get("status") {
            Some(s) => m.insert("status".into(), s.clone()),
            None => m.remove("status"),
        };
    }
    let strip = |v: &Value| {
        let mut v = v.clone();
        if let Some(m) = v.as_object_mut() {
            m.remove("metadata");
            m.remove("status");
        }
        v
    };
    if strip(old) != strip(new) {
        let generation = jp(old, "metadata.generation")
            .and_then(Value::as_i64)
            .unwrap_or(1)
            + 1;
        set_meta(new, "generation", json!(generation));
    }
}

/// Whether an object waits only for its finalizers to go.
pub fn finalized(obj: &Value) -> bool {
    jp(obj, "metadata.deletionTimestamp").is_some()
        && jp(obj, "metadata.finalizers")
            .and_then(Value::as_array)
            .is_none_or(Vec::is_empty)
}
