//! Server-side printing: the `meta.k8s.io/v1` Table that `kubectl get` asks for with
//! `Accept: application/json;as=Table;v=v1;g=meta.k8s.io`.

use serde_json::{Value, json};

use crate::api::meta::human_age;
use crate::api::registry::{ResourceType, jp};

/// Whether the Accept header asks for a Table.
pub fn wants_table(accept: &str) -> bool {
    accept.split(',').any(|part| {
        let p: Vec<&str> = part.split(';').map(str::trim).collect();
        p.contains(&"as=Table")
            && p.contains(&"g=meta.k8s.io")
            && (p.contains(&"v=v1") || p.contains(&"v=v1beta1"))
    })
}

fn table_api_version(accept: &str) -> &'static str {
    let v1 = accept.split(',').any(|part| {
        part.contains("as=Table") && part.contains("v=v1") && !part.contains("v=v1beta1")
    });
    if v1 {
        "meta.k8s.io/v1"
    } else {
        "meta.k8s.io/v1beta1"
    }
}

/// Column definitions of a kind: Name, the kind's columns, Age.
pub fn column_definitions(rt: &ResourceType) -> Vec<Value> {
    let mut cols = vec![
        json!({"name": "Name", "type": "string", "format": "name", "description": "Name must be unique within a namespace.", "priority": 0}),
    ];
    cols.extend(rt.columns.iter().map(|c| {
        json!({"name": c.name, "type": c.type_, "format": "", "description": c.description, "priority": c.priority})
    }));
    cols.push(json!({"name": "Age", "type": "string", "format": "", "description": "Time since creation.", "priority": 0}));
    cols
}

/// One row for an object; `include` is the `includeObject` query value.
pub fn row(rt: &ResourceType, obj: &Value, include: &str) -> Value {
    let mut cells = vec![jp(obj, "metadata.name").cloned().unwrap_or(Value::Null)];
    cells.extend(rt.columns.iter().map(|c| (c.cell)(obj)));
    cells.push(Value::String(human_age(
        jp(obj, "metadata.creationTimestamp").and_then(Value::as_str),
    )));
    let object = match include {
        "None" => Value::Null,
        "Object" => obj.clone(),
        _ => json!({
            "kind": "PartialObjectMetadata",
            "apiVersion": "meta.k8s.io/v1",
            "metadata": obj.get("metadata").cloned().unwrap_or(Value::Null),
        }),
    };
    let mut r = json!({"cells": cells});
    if !object.is_null()
        && let Some(m) = r.as_object_mut()
    {
        m.insert("object".into(), object);
    }
    r
}

/// A Table of objects.
pub fn table(
    rt: &ResourceType,
    accept: &str,
    objs: &[Value],
    resource_version: &str,
    include: &str,
    headers: bool,
) -> Value {
    let rows: Vec<Value> = objs.iter().map(|o| row(rt, o, include)).collect();
    let cols = if headers {
        column_definitions(rt)
    } else {
        Vec::new()
    };
    json!({
        "kind": "Table",
        "apiVersion": table_api_version(accept),
        "metadata": {"resourceVersion": resource_version},
        "columnDefinitions": cols,
        "rows": rows,
    })
}
