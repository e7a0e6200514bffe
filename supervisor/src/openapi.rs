//! `/openapi/v2`: the registry's schemas as a Swagger 2.0 document, in JSON and in the gnostic
//! protobuf form (`openapi_v2.Document`) that kubectl 1.20 requests with
//! `Accept: application/com.github.proto-openapi.spec.v2@v1.0+protobuf` and validates against.

use schemars::generate::SchemaSettings;
use serde_json::{Map, Value, json};

use crate::api::registry::{RESOURCES, ResourceType};

/// The protobuf media type kubectl asks for.
pub const PROTOBUF_MEDIA_TYPE: &str = "application/com.github.proto-openapi.spec.v2@v1.0+protobuf";

fn definition_name(r: &ResourceType) -> String {
    match r.group {
        "" => format!("io.k8s.api.core.{}.{}", r.version, r.kind),
        "slipway.dev" => format!("dev.slipway.{}.{}", r.version, r.kind),
        g => {
            let short = g.split('.').next().unwrap_or(g);
            format!("io.k8s.api.{short}.{}.{}", r.version, r.kind)
        }
    }
}

/// Normalizes a schemars (OpenAPI 3 flavoured, inlined) schema into Swagger 2.0 form and adds
/// the Kubernetes vendor extensions (patch strategies from the registry's merge keys).
fn swagger_schema(r: &ResourceType, s: &Value, path: &str) -> Value {
    let Some(obj) = s.as_object() else {
        return json!({});
    };
    // Option<Struct> comes as anyOf/allOf/oneOf of [T, null]: take the non-null branch.
    for comb in ["allOf", "anyOf", "oneOf"] {
        if let Some(branches) = obj.get(comb).and_then(Value::as_array)
            && let Some(b) = branches
                .iter()
                .find(|b| b.get("type") != Some(&json!("null")))
        {
            let mut merged = swagger_schema(r, b, path);
            if let (Some(d), Some(m)) = (obj.get("description"), merged.as_object_mut()) {
                m.entry("description").or_insert(d.clone());
            }
            return merged;
        }
    }
    let mut out = Map::new();
    if let Some(d) = obj.get("description") {
        out.insert("description".into(), d.clone());
    }
    let ty = match obj.get("type") {
        Some(Value::String(t)) => Some(t.clone()),
        Some(Value::Array(ts)) => ts
            .iter()
            .filter_map(Value::as_str)
            .find(|t| *t != "null")
            .map(String::from),
        _ => None,
    };
    if let Some(f) = obj.get("format").and_then(Value::as_str) {
        // Swagger 2 knows int32/int64/double; keep kubectl's integer checks happy.
        let f = match f {
            "uint32" | "uint" | "uint8" | "uint16" | "int8" | "int16" => "int32",
            "uint64" => "int64",
            other => other,
        };
        out.insert("format".into(), Value::String(f.into()));
    }
    if obj.get("x-kubernetes-int-or-string") == Some(&Value::Bool(true)) {
        out.insert("x-kubernetes-int-or-string".into(), Value::Bool(true));
    }
    if let Some(t) = ty {
        match t.as_str() {
            "object" => {
                out.insert("type".into(), Value::String(t.clone()));
                if let Some(props) = obj.get("properties").and_then(Value::as_object) {
                    let mut p = Map::new();
                    for (k, v) in props {
                        let child = if path.is_empty() {
                            k.clone()
                        } else {
                            format!("{path}.{k}")
                        };
                        p.insert(k.clone(), swagger_schema(r, v, &child));
                    }
                    out.insert("properties".into(), Value::Object(p));
                }
                if let Some(req) = obj.get("required") {
                    out.insert("required".into(), req.clone());
                }
                match obj.get("additionalProperties") {
                    Some(ap @ Value::Object(_)) => {
                        out.insert("additionalProperties".into(), swagger_schema(r, ap, path));
                    }
                    Some(Value::Bool(true)) => {
                        out.insert("additionalProperties".into(), json!({}));
                    }
                    _ => {}
                }
            }
            "array" => {
                out.insert("type".into(), Value::String(t.clone()));
                let items = obj
                    .get("items")
                    .map(|i| swagger_schema(r, i, path))
                    .unwrap_or(json!({}));
                out.insert("items".into(), items);
                if let Some(key) = r.merge_key(path) {
                    out.insert(
                        "x-kubernetes-patch-strategy".into(),
                        Value::String("merge".into()),
                    );
                    if !key.is_empty() {
                        out.insert(
                            "x-kubernetes-patch-merge-key".into(),
                            Value::String(key.into()),
                        );
                    }
                }
            }
            other => {
                out.insert("type".into(), Value::String(other.into()));
            }
        }
    }
    Value::Object(out)
}

/// A query parameter of the operations (Swagger 2.0 parameter object).
fn query_param(name: &str, description: &str) -> Value {
    json!({"name": name, "in": "query", "type": "string", "uniqueItems": true, "description": description})
}

/// One operation: its GVK and action (kubectl finds a kind's operations by these), its
/// parameters and a response.
fn operation(r: &ResourceType, action: &str, mutating: bool) -> Value {
    let mut params = Vec::new();
    if mutating {
        params.push(query_param(
            "dryRun",
            "When present, indicates that modifications should not be persisted: All.",
        ));
        params.push(query_param(
            "fieldManager",
            "A name associated with the actor or entity that is making these changes.",
        ));
    }
    json!({
        "operationId": format!("{action}{}", r.kind),
        "consumes": ["*/*"],
        "produces": ["application/json", "application/yaml"],
        "parameters": params,
        "responses": {"200": {"description": "OK"}},
        "x-kubernetes-action": action,
        "x-kubernetes-group-version-kind": {"group": r.group, "version": r.version, "kind": r.kind},
    })
}

/// The paths of one kind: the collection (list, create) and the item (get, replace, patch,
/// delete). kubectl 1.20 decides whether `--dry-run=server` is supported from the `dryRun`
/// parameter of the kind's patch operation.
fn paths_of(r: &ResourceType, paths: &mut Map<String, Value>) {
    let base = if r.group.is_empty() {
        format!("/api/{}", r.version)
    } else {
        format!("/apis/{}/{}", r.group, r.version)
    };
    let collection = if r.namespaced {
        format!("{base}/namespaces/{{namespace}}/{}", r.plural)
    } else {
        format!("{base}/{}", r.plural)
    };
    paths.insert(
        collection.clone(),
        json!({"get": operation(r, "list", false), "post": operation(r, "post", true)}),
    );
    paths.insert(
        format!("{collection}/{{name}}"),
        json!({
            "get": operation(r, "get", false),
            "put": operation(r, "put", true),
            "patch": operation(r, "patch", true),
            "delete": operation(r, "delete", true),
        }),
    );
}

/// The Swagger 2.0 document for every served kind.
pub fn document() -> Value {
    let mut settings = SchemaSettings::openapi3();
    settings.inline_subschemas = true;
    let mut generator = settings.into_generator();
    let mut defs = Map::new();
    let mut paths = Map::new();
    for r in RESOURCES.iter() {
        paths_of(r, &mut paths);
        let raw = r.schema(&mut generator).to_value();
        let mut schema = swagger_schema(r, &raw, "");
        if let Some(m) = schema.as_object_mut() {
            m.insert("type".into(), Value::String("object".into()));
            m.insert(
                "x-kubernetes-group-version-kind".into(),
                json!([{"group": r.group, "version": r.version, "kind": r.kind}]),
            );
        }
        defs.insert(definition_name(r), schema);
    }
    json!({
        "swagger": "2.0",
        "info": {"title": "Slipway", "version": env!("CARGO_PKG_VERSION")},
        "paths": paths,
        "definitions": defs,
    })
}

/// Minimal protobuf writer for the few wire types the gnostic messages use.
#[derive(Default)]
struct Pb(Vec<u8>);

impl Pb {
    fn varint(&mut self, mut v: u64) {
        while v >= 0x80 {
            self.0.push((v as u8) | 0x80);
            v >>= 7;
        }
        self.0.push(v as u8);
    }
    fn tag(&mut self, field: u32, wire: u8) {
        self.varint((u64::from(field) << 3) | u64::from(wire));
    }
    fn bytes(&mut self, field: u32, b: &[u8]) {
        self.tag(field, 2);
        self.varint(b.len() as u64);
        self.0.extend_from_slice(b);
    }
    fn string(&mut self, field: u32, s: &str) {
        if !s.is_empty() {
            self.bytes(field, s.as_bytes());
        }
    }
    fn message(&mut self, field: u32, m: Pb) {
        self.bytes(field, &m.0);
    }
}

/// YAML text for a vendor extension value (gnostic stores extensions as `Any{yaml}`).
fn yaml_of(v: &Value) -> String {
    match v {
        Value::Array(items) => items
            .iter()
            .map(|i| match i.as_object() {
                Some(m) => {
                    let mut lines = m.iter().map(|(k, v)| format!("{k}: {v}"));
                    let first = lines.next().unwrap_or_default();
                    let rest: Vec<String> = lines.map(|l| format!("  {l}")).collect();
                    let mut s = format!("- {first}\n");
                    for l in rest {
                        s.push_str(&l);
                        s.push('\n');
                    }
                    s
                }
                None => format!("- {i}\n"),
            })
            .collect(),
        // JSON scalars are valid YAML.
        other => format!("{other}\n"),
    }
}

fn named_any(name: &str, v: &Value) -> Pb {
    let mut any = Pb::default();
    any.string(2, &yaml_of(v));
    let mut named = Pb::default();
    named.string(1, name);
    named.message(2, any);
    named
}

/// Encodes one schema as `openapi.v2.Schema`.
fn schema_pb(s: &Value) -> Pb {
    let mut pb = Pb::default();
    let Some(obj) = s.as_object() else { return pb };
    if let Some(f) = obj.get("format").and_then(Value::as_str) {
        pb.string(2, f);
    }
    if let Some(d) = obj.get("description").and_then(Value::as_str) {
        pb.string(4, d);
    }
    for r in obj
        .get("required")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
    {
        pb.string(19, r);
    }
    if let Some(ap) = obj.get("additionalProperties") {
        let mut item = Pb::default();
        item.message(1, schema_pb(ap));
        pb.message(21, item);
    }
    if let Some(t) = obj.get("type").and_then(Value::as_str) {
        let mut ti = Pb::default();
        ti.string(1, t);
        pb.message(22, ti);
    }
    if let Some(items) = obj.get("items") {
        let mut ii = Pb::default();
        ii.message(1, schema_pb(items));
        pb.message(23, ii);
    }
    if let Some(props) = obj.get("properties").and_then(Value::as_object) {
        let mut pp = Pb::default();
        for (k, v) in props {
            let mut named = Pb::default();
            named.string(1, k);
            named.message(2, schema_pb(v));
            pp.message(1, named);
        }
        pb.message(25, pp);
    }
    extensions(&mut pb, 31, obj);
    pb
}

/// Encodes the vendor extensions (`x-...` keys) of an object as `NamedAny`s in `field`.
fn extensions(pb: &mut Pb, field: u32, obj: &Map<String, Value>) {
    for (k, v) in obj.iter().filter(|(k, _)| k.starts_with("x-")) {
        pb.message(field, named_any(k, v));
    }
}

/// Encodes one operation as `openapi.v2.Operation` (query parameters only).
fn operation_pb(op: &Value) -> Pb {
    let mut pb = Pb::default();
    let Some(obj) = op.as_object() else { return pb };
    if let Some(id) = obj.get("operationId").and_then(Value::as_str) {
        pb.string(5, id);
    }
    for (field, key) in [(6, "produces"), (7, "consumes")] {
        for m in obj
            .get(key)
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
        {
            pb.string(field, m);
        }
    }
    for p in obj
        .get("parameters")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        // QueryParameterSubSchema in NonBodyParameter in Parameter in ParametersItem.
        let mut q = Pb::default();
        q.string(2, "query");
        q.string(
            3,
            p.get("description")
                .and_then(Value::as_str)
                .unwrap_or_default(),
        );
        q.string(4, p.get("name").and_then(Value::as_str).unwrap_or_default());
        q.string(6, "string");
        q.tag(20, 0);
        q.varint(1);
        let mut non_body = Pb::default();
        non_body.message(3, q);
        let mut param = Pb::default();
        param.message(2, non_body);
        let mut item = Pb::default();
        item.message(1, param);
        pb.message(8, item);
    }
    let mut responses = Pb::default();
    for (code, r) in obj
        .get("responses")
        .and_then(Value::as_object)
        .into_iter()
        .flatten()
    {
        let mut resp = Pb::default();
        resp.string(
            1,
            r.get("description")
                .and_then(Value::as_str)
                .unwrap_or_default(),
        );
        let mut value = Pb::default();
        value.message(1, resp);
        let mut named = Pb::default();
        named.string(1, code);
        named.message(2, value);
        responses.message(1, named);
    }
    pb.message(9, responses);
    extensions(&mut pb, 13, obj);
    pb
}

/// Encodes the document's paths as `openapi.v2.Paths`.
fn paths_pb(doc: &Value) -> Pb {
    let mut pb = Pb::default();
    for (path, item) in doc
        .get("paths")
        .and_then(Value::as_object)
        .into_iter()
        .flatten()
    {
        let mut item_pb = Pb::default();
        for (field, method) in [
            (2, "get"),
            (3, "put"),
            (4, "post"),
            (5, "delete"),
            (8, "patch"),
        ] {
            if let Some(op) = item.get(method) {
                item_pb.message(field, operation_pb(op));
            }
        }
        let mut named = Pb::default();
        named.string(1, path);
        named.message(2, item_pb);
        pb.message(2, named);
    }
    pb
}

/// Encodes the document as `openapi.v2.Document` protobuf bytes.
pub fn document_protobuf(doc: &Value) -> Vec<u8> {
    let mut pb = Pb::default();
    pb.string(1, "2.0");
    let mut info = Pb::default();
    info.string(1, "Slipway");
    info.string(2, env!("CARGO_PKG_VERSION"));
    pb.message(2, info);
    pb.message(8, paths_pb(doc));
    let mut defs = Pb::default();
    for (name, schema) in doc
        .get("definitions")
        .and_then(Value::as_object)
        .into_iter()
        .flatten()
    {
        let mut named = Pb::default();
        named.string(1, name);
        named.message(2, schema_pb(schema));
        defs.message(1, named);
    }
    pb.message(9, defs);
    pb.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_schema_has_gvk_and_port_merge_key() {
        let doc = document();
        let svc = &doc["definitions"]["io.k8s.api.core.v1.Service"];
        assert_eq!(svc["x-kubernetes-group-version-kind"][0]["kind"], "Service");
        let ports = &svc["properties"]["spec"]["properties"]["ports"];
        assert_eq!(ports["type"], "array", "{ports}");
        assert_eq!(ports["x-kubernetes-patch-merge-key"], "port");
        assert_eq!(ports["items"]["properties"]["port"]["type"], "integer");
        assert!(
            ports["items"]["required"]
                .as_array()
                .is_some_and(|r| r.contains(&json!("port")))
        );
        let labels = &svc["properties"]["metadata"]["properties"]["labels"];
        assert_eq!(labels["additionalProperties"]["type"], "string", "{labels}");
        let target = &ports["items"]["properties"]["targetPort"];
        assert!(
            target.get("type").is_none(),
            "int-or-string must be untyped: {target}"
        );
        let patch = &doc["paths"]["/api/v1/namespaces/{namespace}/services/{name}"]["patch"];
        assert_eq!(patch["x-kubernetes-group-version-kind"]["kind"], "Service");
        assert!(
            patch["parameters"]
                .as_array()
                .is_some_and(|p| p.iter().any(|p| p["name"] == "dryRun")),
            "{patch}"
        );
        let pb = document_protobuf(&doc);
        assert!(pb.len() > 1000);
        assert_eq!(
            yaml_of(&json!([{"group": "", "kind": "Service", "version": "v1"}])),
            "- group: \"\"\n  kind: \"Service\"\n  version: \"v1\"\n"
        );
    }
}
