//! PATCH bodies: JSON merge patch (RFC 7386), JSON patch (RFC 6902), strategic merge patch for
//! the built-in kinds (list merge keys from the registry), and a simple server-side apply.

use serde_json::{Map, Value};

use crate::api::registry::ResourceType;
use crate::error::ApiError;

/// The patch flavours the API accepts, by Content-Type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PatchType {
    /// `application/merge-patch+json`.
    Merge,
    /// `application/json-patch+json`.
    Json,
    /// `application/strategic-merge-patch+json`.
    Strategic,
    /// `application/apply-patch+yaml` (server-side apply).
    Apply,
}

impl PatchType {
    /// Maps a Content-Type header onto a patch type.
    pub fn from_content_type(ct: &str) -> Result<Self, ApiError> {
        let base = ct.split(';').next().unwrap_or_default().trim();
        match base {
            "application/merge-patch+json" => Ok(Self::Merge),
            "application/json-patch+json" => Ok(Self::Json),
            "application/strategic-merge-patch+json" => Ok(Self::Strategic),
            "application/apply-patch+yaml" => Ok(Self::Apply),
            _ => Err(ApiError::UnsupportedMediaType(
                "application/json-patch+json, application/merge-patch+json, application/strategic-merge-patch+json, application/apply-patch+yaml".into(),
            )),
        }
    }
}

/// Applies a patch body to `target`.
pub fn apply(
    rt: &ResourceType,
    kind: PatchType,
    target: &mut Value,
    body: &[u8],
) -> Result<(), ApiError> {
    match kind {
        PatchType::Merge => {
            let patch: Value = parse_json(body)?;
            json_patch::merge(target, &patch);
        }
        PatchType::Json => {
            let patch: json_patch::Patch = serde_json::from_slice(body)
                .map_err(|e| ApiError::BadRequest(format!("invalid JSON patch: {e}")))?;
            json_patch::patch(target, &patch).map_err(|e| ApiError::Invalid {
                kind: rt.kind.to_string(),
                name: target
                    .pointer("/metadata/name")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_string(),
                causes: vec![crate::error::FieldError::invalid(
                    e.path.to_string(),
                    "patch",
                    e.to_string(),
                )],
            })?;
        }
        PatchType::Strategic => {
            if rt.group == "slipway.dev" {
                return Err(ApiError::UnsupportedMediaType(
                    "application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml (strategic merge patch is only for built-in kinds)".into(),
                ));
            }
            let patch: Value = parse_json(body)?;
            strategic(rt, target, &patch, "")?;
        }
        PatchType::Apply => {
            let applied = parse_apply(body)?;
            json_patch::merge(target, &applied);
        }
    }
    Ok(())
}

fn parse_json(body: &[u8]) -> Result<Value, ApiError> {
    serde_json::from_slice(body)
        .map_err(|e| ApiError::BadRequest(format!("invalid JSON patch body: {e}")))
}

/// Parses a server-side apply body (YAML or JSON).
pub fn parse_apply(body: &[u8]) -> Result<Value, ApiError> {
    if let Ok(v) = serde_json::from_slice::<Value>(body) {
        return Ok(v);
    }
    let text = std::str::from_utf8(body)
        .map_err(|_| ApiError::BadRequest("apply body is not UTF-8".into()))?;
    serde_saphyr::from_str(text)
        .map_err(|e| ApiError::BadRequest(format!("invalid apply YAML: {e}")))
}

fn child(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

fn bad(msg: impl Into<String>) -> ApiError {
    ApiError::BadRequest(msg.into())
}

/// Strategic merge patch: maps merge recursively, lists with a registered merge key merge by
/// that key (honouring `$patch: delete`, `$setElementOrder/`, `$deleteFromPrimitiveList/`,
/// `$retainKeys`), all other lists are replaced.
fn strategic(
    rt: &ResourceType,
    target: &mut Value,
    patch: &Value,
    path: &str,
) -> Result<(), ApiError> {
    let Some(pmap) = patch.as_object() else {
        *target = patch.clone();
        return Ok(());
    };
    match pmap.get("$patch").and_then(Value::as_str) {
        Some("replace") => {
            let mut m = pmap.clone();
            m.remove("$patch");
            *target = Value::Object(m);
            return Ok(());
        }
        Some("delete") => {
            *target = Value::Object(Map::new());
            return Ok(());
        }
        Some(other) => return Err(bad(format!("unknown $patch directive {other:?} at {path}"))),
        None => {}
    }
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    let Some(tmap) = target.as_object_mut() else {
        return Ok(());
    };
    for (k, v) in pmap {
        if k.starts_with('$') {
            if let Some(field) = k.strip_prefix("$deleteFromPrimitiveList/")
                && let (Some(Value::Array(list)), Some(del)) = (tmap.get_mut(field), v.as_array())
            {
                list.retain(|x| !del.contains(x));
            }
            continue;
        }
        if v.is_null() {
            tmap.remove(k);
            continue;
        }
        let cpath = child(path, k);
        match (v, rt.merge_key(&cpath)) {
            (Value::Array(items), Some(key)) => {
                let entry = tmap
                    .entry(k.clone())
                    .or_insert_with(|| Value::Array(Vec::new()));
                if !entry.is_array() {
                    *entry = Value::Array(Vec::new());
                }
                if let Value::Array(list) = entry {
                    merge_list(rt, list, items, key, &cpath)?;
                }
            }
            (Value::Object(_), _) => {
                let entry = tmap.entry(k.clone()).or_insert(Value::Null);
                strategic(rt, entry, v, &cpath)?;
            }
            _ => {
                tmap.insert(k.clone(), strip_directives(v));
            }
        }
    }
    for (k, v) in pmap {
        if let Some(field) = k.strip_prefix("$setElementOrder/")
            && let (Some(Value::Array(list)), Some(order)) = (tmap.get_mut(field), v.as_array())
        {
            let key = rt.merge_key(&child(path, field)).unwrap_or_default();
            reorder(list, order, key);
        }
    }
    if let Some(Value::Array(keep)) = pmap.get("$retainKeys") {
        tmap.retain(|k, _| keep.iter().any(|x| x.as_str() == Some(k)));
    }
    Ok(())
}

fn strip_directives(v: &Value) -> Value {
    match v {
        Value::Object(m) => Value::Object(
            m.iter()
                .filter(|(k, _)| !k.starts_with('$'))
                .map(|(k, v)| (k.clone(), strip_directives(v)))
                .collect(),
        ),
        Value::Array(a) => Value::Array(a.iter().map(strip_directives).collect()),
        other => other.clone(),
    }
}

fn merge_list(
    rt: &ResourceType,
    list: &mut Vec<Value>,
    items: &[Value],
    key: &str,
    path: &str,
) -> Result<(), ApiError> {
    if key.is_empty() {
        for it in items {
            if !list.contains(it) {
                list.push(it.clone());
            }
        }
        return Ok(());
    }
    for it in items {
        let Some(id) = it.get(key) else {
            return Err(bad(format!("{path}: element has no merge key {key:?}")));
        };
        let pos = list.iter().position(|e| e.get(key) == Some(id));
        if it.get("$patch").and_then(Value::as_str) == Some("delete") {
            if let Some(p) = pos {
                list.remove(p);
            }
            continue;
        }
        match pos {
            Some(p) => strategic(rt, &mut list[p], it, path)?,
            None => list.push(strip_directives(it)),
        }
    }
    Ok(())
}

fn reorder(list: &mut Vec<Value>, order: &[Value], key: &str) {
    let id = |v: &Value| {
        if key.is_empty() {
            Some(v.clone())
        } else {
            v.get(key).cloned()
        }
    };
    let wanted: Vec<Value> = order.iter().filter_map(id).collect();
    let mut rest = std::mem::take(list);
    for w in &wanted {
        if let Some(p) = rest.iter().position(|e| id(e).as_ref() == Some(w)) {
            list.push(rest.remove(p));
        }
    }
    list.append(&mut rest);
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::api::registry::lookup;

    #[test]
    fn strategic_merges_service_ports_by_port() -> Result<(), ApiError> {
        let rt = lookup("", "v1", "services").ok_or(ApiError::Internal("no services".into()))?;
        let mut svc = json!({"spec": {"ports": [{"port": 80, "protocol": "TCP"}, {"port": 81}], "type": "ClusterIP"}});
        let patch = json!({"spec": {
            "$setElementOrder/ports": [{"port": 443}, {"port": 80}],
            "ports": [{"port": 443, "name": "https"}, {"port": 81, "$patch": "delete"}, {"port": 80, "name": "http"}]
        }});
        apply(
            rt,
            PatchType::Strategic,
            &mut svc,
            patch.to_string().as_bytes(),
        )?;
        assert_eq!(
            svc["spec"]["ports"],
            json!([{"port": 443, "name": "https"}, {"port": 80, "protocol": "TCP", "name": "http"}])
        );
        // Lists without a merge key are replaced.
        let mut np = json!({"spec": {"selector": {"a": "b"}, "externalIPs": ["1.1.1.1"]}});
        apply(
            rt,
            PatchType::Strategic,
            &mut np,
            br#"{"spec":{"externalIPs":["2.2.2.2"],"selector":{"a":null}}}"#,
        )?;
        assert_eq!(
            np,
            json!({"spec": {"selector": {}, "externalIPs": ["2.2.2.2"]}})
        );
        Ok(())
    }

    fn json_value() -> impl proptest::strategy::Strategy<Value = Value> {
        use proptest::prelude::*;
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i32>().prop_map(|i| json!(i)),
            "[a-z$/]{0,8}".prop_map(Value::String),
        ];
        leaf.prop_recursive(4, 32, 4, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                proptest::collection::btree_map(
                    "[a-z$/]{0,8}|port|name|ports|spec|\\$patch",
                    inner,
                    0..4
                )
                .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    proptest::proptest! {
        // Patch bodies are remote input: any JSON either applies or is refused, never panics.
        #[test]
        fn patches_never_panic(target in json_value(), patch in json_value()) {
            let rt = lookup("", "v1", "services").expect("services");
            let body = patch.to_string();
            for kind in [PatchType::Strategic, PatchType::Merge, PatchType::Json, PatchType::Apply] {
                let mut t = target.clone();
                let _ = apply(rt, kind, &mut t, body.as_bytes());
            }
        }
    }
}
