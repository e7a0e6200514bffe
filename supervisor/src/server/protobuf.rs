//! Kubernetes protobuf (`application/vnd.kubernetes.protobuf`), the little of it the API reads:
//! the envelope (`k8s\0` + runtime.Unknown{typeMeta, raw}) and the bodies current kubectl's
//! `create` generators send as protobuf — v1 Namespace, ConfigMap, Secret, ServiceAccount,
//! Service, apps/v1 Deployment and RoleBinding, with the fields those generators fill — turned into their
//! JSON form by field tables after k8s.io/api's `generated.proto`. Any other kind, or a field the tables do
//! not know (owner references, managed fields, ...), is refused with 415 and the media types
//! the API reads, never dropped silently.

use serde_json::{Map, Value, json};

use crate::error::ApiError;

/// Kubernetes' protobuf media type.
pub const PROTOBUF: &str = "application/vnd.kubernetes.protobuf";

/// One protobuf field's value.
pub(crate) enum PbValue<'a> {
    Varint(u64),
    Bytes(&'a [u8]),
    /// A fixed 32- or 64-bit value (no field read here has one).
    Fixed,
}

fn varint(b: &[u8], pos: &mut usize) -> Option<u64> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let byte = *b.get(*pos)?;
        *pos += 1;
        v |= u64::from(byte & 0x7f) << shift;
        if byte < 0x80 {
            return Some(v);
        }
    }
    None
}

/// The fields of one protobuf message, in order; None when it is malformed.
pub(crate) fn fields(b: &[u8]) -> Option<Vec<(u64, PbValue<'_>)>> {
    let mut out = Vec::new();
    let mut pos = 0;
    while pos < b.len() {
        let key = varint(b, &mut pos)?;
        let value = match key & 7 {
            0 => PbValue::Varint(varint(b, &mut pos)?),
            2 => {
                let len = usize::try_from(varint(b, &mut pos)?).ok()?;
                let end = pos.checked_add(len)?;
                let v = b.get(pos..end)?;
                pos = end;
                PbValue::Bytes(v)
            }
            1 => {
                pos = pos.checked_add(8).filter(|p| *p <= b.len())?;
                PbValue::Fixed
            }
            5 => {
                pos = pos.checked_add(4).filter(|p| *p <= b.len())?;
                PbValue::Fixed
            }
            _ => return None,
        };
        out.push((key >> 3, value));
    }
    Some(out)
}

/// The first length-delimited field `field` of a message.
pub(crate) fn message(b: &[u8], field: u64) -> Option<&[u8]> {
    fields(b)?.into_iter().find_map(|(n, v)| match v {
        PbValue::Bytes(x) if n == field => Some(x),
        _ => None,
    })
}

/// The string fields of a message, by name, as a JSON object.
pub(crate) fn strings(b: &[u8], names: &[(u64, &str)]) -> Option<Value> {
    let mut m = Map::new();
    for (n, v) in fields(b)? {
        if let (PbValue::Bytes(x), Some((_, name))) = (v, names.iter().find(|(f, _)| *f == n)) {
            m.insert((*name).into(), json!(String::from_utf8_lossy(x)));
        }
    }
    Some(Value::Object(m))
}

/// How a field's value becomes JSON.
#[derive(Clone, Copy)]
enum Shape {
    /// A string; empty is left out (Go writes every non-pointer string, JSON omits empty).
    Str,
    /// A flag behind a pointer: written only when set, so false is kept.
    Bool,
    /// A plain flag: false is left out.
    Flag,
    /// An integer behind a pointer: written only when set, so 0 is kept.
    Int,
    /// A plain integer: 0 is left out.
    Count,
    /// `IntOrString`: a number or a name.
    IntOrString,
    /// `repeated` messages, a JSON array.
    List(&'static [Field]),
    /// `map<string, string>`.
    MapStr,
    /// `map<string, bytes>`, base64 values.
    MapBytes,
    RepeatedStr,
    Message(&'static [Field]),
    /// Server-owned: not read from a write (uid, creation time, status, ...).
    Ignored,
}

struct Field(u64, &'static str, Shape);

const OBJECT_META: &[Field] = &[
    Field(1, "name", Shape::Str),
    Field(2, "generateName", Shape::Str),
    Field(3, "namespace", Shape::Str),
    Field(4, "selfLink", Shape::Ignored),
    Field(5, "uid", Shape::Ignored),
    Field(6, "resourceVersion", Shape::Str),
    Field(7, "generation", Shape::Ignored),
    Field(8, "creationTimestamp", Shape::Ignored),
    Field(9, "deletionTimestamp", Shape::Ignored),
    Field(10, "deletionGracePeriodSeconds", Shape::Ignored),
    Field(11, "labels", Shape::MapStr),
    Field(12, "annotations", Shape::MapStr),
    Field(14, "finalizers", Shape::RepeatedStr),
];

const NAMESPACE_SPEC: &[Field] = &[Field(1, "finalizers", Shape::RepeatedStr)];

const LABEL_SELECTOR: &[Field] = &[
    Field(1, "matchLabels", Shape::MapStr),
    Field(
        2,
        "matchExpressions",
        Shape::List(&[
            Field(1, "key", Shape::Str),
            Field(2, "operator", Shape::Str),
            Field(3, "values", Shape::RepeatedStr),
        ]),
    ),
];

/// `resources: {}` as kubectl's generators send it (limits and requests not read).
const RESOURCES: &[Field] = &[];

/// A container as `kubectl create deployment` makes it: name, image, command and the
/// non-pointer fields Go writes with their zero values.
const CONTAINER: &[Field] = &[
    Field(1, "name", Shape::Str),
    Field(2, "image", Shape::Str),
    Field(3, "command", Shape::RepeatedStr),
    Field(4, "args", Shape::RepeatedStr),
    Field(5, "workingDir", Shape::Str),
    Field(
        6,
        "ports",
        Shape::List(&[
            Field(1, "name", Shape::Str),
            Field(2, "hostPort", Shape::Count),
            Field(3, "containerPort", Shape::Count),
            Field(4, "protocol", Shape::Str),
            Field(5, "hostIP", Shape::Str),
        ]),
    ),
    Field(8, "resources", Shape::Message(RESOURCES)),
    Field(13, "terminationMessagePath", Shape::Str),
    Field(14, "imagePullPolicy", Shape::Str),
    Field(16, "stdin", Shape::Flag),
    Field(17, "stdinOnce", Shape::Flag),
    Field(18, "tty", Shape::Flag),
    Field(20, "terminationMessagePolicy", Shape::Str),
];

const POD_SPEC: &[Field] = &[
    Field(2, "containers", Shape::List(CONTAINER)),
    Field(3, "restartPolicy", Shape::Str),
    Field(6, "dnsPolicy", Shape::Str),
    Field(7, "nodeSelector", Shape::MapStr),
    Field(8, "serviceAccountName", Shape::Str),
    Field(9, "serviceAccount", Shape::Str),
    Field(10, "nodeName", Shape::Str),
    Field(11, "hostNetwork", Shape::Flag),
    Field(12, "hostPID", Shape::Flag),
    Field(13, "hostIPC", Shape::Flag),
    Field(16, "hostname", Shape::Str),
    Field(17, "subdomain", Shape::Str),
    Field(19, "schedulerName", Shape::Str),
    Field(24, "priorityClassName", Shape::Str),
];

const DEPLOYMENT_SPEC: &[Field] = &[
    Field(1, "replicas", Shape::Int),
    Field(2, "selector", Shape::Message(LABEL_SELECTOR)),
    Field(
        3,
        "template",
        Shape::Message(&[
            Field(1, "metadata", Shape::Message(OBJECT_META)),
            Field(2, "spec", Shape::Message(POD_SPEC)),
        ]),
    ),
    Field(
        4,
        "strategy",
        Shape::Message(&[Field(1, "type", Shape::Str)]),
    ),
    Field(5, "minReadySeconds", Shape::Count),
    Field(6, "revisionHistoryLimit", Shape::Int),
    Field(7, "paused", Shape::Flag),
    Field(9, "progressDeadlineSeconds", Shape::Int),
];

const SERVICE_SPEC: &[Field] = &[
    Field(
        1,
        "ports",
        Shape::List(&[
            Field(1, "name", Shape::Str),
            Field(2, "protocol", Shape::Str),
            Field(3, "port", Shape::Count),
            Field(4, "targetPort", Shape::IntOrString),
            Field(5, "nodePort", Shape::Count),
        ]),
    ),
    Field(2, "selector", Shape::MapStr),
    Field(3, "clusterIP", Shape::Str),
    Field(4, "type", Shape::Str),
    Field(5, "externalIPs", Shape::RepeatedStr),
    Field(7, "sessionAffinity", Shape::Str),
    Field(8, "loadBalancerIP", Shape::Str),
    Field(9, "loadBalancerSourceRanges", Shape::RepeatedStr),
    Field(10, "externalName", Shape::Str),
    Field(11, "externalTrafficPolicy", Shape::Str),
    Field(12, "healthCheckNodePort", Shape::Count),
    Field(13, "publishNotReadyAddresses", Shape::Flag),
    Field(18, "clusterIPs", Shape::RepeatedStr),
    Field(19, "ipFamilies", Shape::RepeatedStr),
];

/// The kinds read, by (apiVersion, kind).
const KINDS: &[(&str, &str, &[Field])] = &[
    (
        "v1",
        "Namespace",
        &[
            Field(1, "metadata", Shape::Message(OBJECT_META)),
            Field(2, "spec", Shape::Message(NAMESPACE_SPEC)),
            Field(3, "status", Shape::Ignored),
        ],
    ),
    (
        "v1",
        "ConfigMap",
        &[
            Field(1, "metadata", Shape::Message(OBJECT_META)),
            Field(2, "data", Shape::MapStr),
            Field(3, "binaryData", Shape::MapBytes),
            Field(4, "immutable", Shape::Bool),
        ],
    ),
    (
        "v1",
        "Secret",
        &[
            Field(1, "metadata", Shape::Message(OBJECT_META)),
            Field(2, "data", Shape::MapBytes),
            Field(3, "type", Shape::Str),
            Field(4, "stringData", Shape::MapStr),
            Field(5, "immutable", Shape::Bool),
        ],
    ),
    (
        "apps/v1",
        "Deployment",
        &[
            Field(1, "metadata", Shape::Message(OBJECT_META)),
            Field(2, "spec", Shape::Message(DEPLOYMENT_SPEC)),
            Field(3, "status", Shape::Ignored),
        ],
    ),
    (
        "v1",
        "Service",
        &[
            Field(1, "metadata", Shape::Message(OBJECT_META)),
            Field(2, "spec", Shape::Message(SERVICE_SPEC)),
            Field(3, "status", Shape::Ignored),
        ],
    ),
    (
        "rbac.authorization.k8s.io/v1",
        "RoleBinding",
        &[
            Field(1, "metadata", Shape::Message(OBJECT_META)),
            Field(
                2,
                "subjects",
                Shape::List(&[
                    Field(1, "kind", Shape::Str),
                    Field(2, "apiGroup", Shape::Str),
                    Field(3, "name", Shape::Str),
                    Field(4, "namespace", Shape::Str),
                ]),
            ),
            Field(
                3,
                "roleRef",
                Shape::Message(&[
                    Field(1, "apiGroup", Shape::Str),
                    Field(2, "kind", Shape::Str),
                    Field(3, "name", Shape::Str),
                ]),
            ),
        ],
    ),
    (
        "v1",
        "ServiceAccount",
        &[
            Field(1, "metadata", Shape::Message(OBJECT_META)),
            Field(4, "automountServiceAccountToken", Shape::Bool),
        ],
    ),
];

fn text(b: &[u8], at: &str) -> Result<String, String> {
    String::from_utf8(b.to_vec()).map_err(|_| format!("{at}: not UTF-8"))
}

/// A map entry (`{1: key, 2: value}`).
fn entry(b: &[u8], at: &str, bytes: bool) -> Result<(String, Value), String> {
    let (mut key, mut value) = (String::new(), json!(""));
    for (n, v) in fields(b).ok_or_else(|| format!("{at}: malformed"))? {
        match (n, v) {
            (1, PbValue::Bytes(k)) => key = text(k, at)?,
            (2, PbValue::Bytes(x)) if bytes => value = json!(crate::tls::base64(x)),
            (2, PbValue::Bytes(x)) => value = json!(text(x, at)?),
            _ => return Err(format!("{at}: malformed entry")),
        }
    }
    Ok((key, value))
}

/// An `IntOrString` (`{1: type, 2: intVal, 3: strVal}`): the number, or the name.
fn int_or_string(b: &[u8], at: &str) -> Result<Value, String> {
    let (mut kind, mut int, mut name) = (0, 0i64, String::new());
    for (n, v) in fields(b).ok_or_else(|| format!("{at}: malformed"))? {
        match (n, v) {
            #[allow(
                clippy::cast_possible_wrap,
                reason = "a varint is a two's-complement integer"
            )]
            (1, PbValue::Varint(x)) => kind = x as i64,
            #[allow(
                clippy::cast_possible_wrap,
                reason = "a varint is a two's-complement integer"
            )]
            (2, PbValue::Varint(x)) => int = x as i64,
            (3, PbValue::Bytes(x)) => name = text(x, at)?,
            _ => return Err(format!("{at}: malformed")),
        }
    }
    Ok(if kind == 1 { json!(name) } else { json!(int) })
}

/// Decodes a message by its field table; the error names what could not be read.
fn decode(b: &[u8], table: &[Field], at: &str) -> Result<Map<String, Value>, String> {
    let mut out = Map::new();
    for (n, v) in fields(b).ok_or_else(|| format!("{at}: malformed"))? {
        let Some(Field(_, name, shape)) = table.iter().find(|f| f.0 == n) else {
            return Err(format!("{at}: field {n} is not read"));
        };
        let path = if at.is_empty() {
            (*name).to_owned()
        } else {
            format!("{at}.{name}")
        };
        let value = match (*shape, v) {
            (Shape::Ignored, _) => continue,
            (Shape::Str, PbValue::Bytes([])) => continue,
            (Shape::Str, PbValue::Bytes(x)) => json!(text(x, &path)?),
            (Shape::Flag, PbValue::Varint(0)) | (Shape::Count, PbValue::Varint(0)) => continue,
            (Shape::Flag, PbValue::Varint(_)) => json!(true),
            // int32 and int64 travel as two's-complement varints.
            #[allow(
                clippy::cast_possible_wrap,
                reason = "a varint is a two's-complement integer"
            )]
            (Shape::Int | Shape::Count, PbValue::Varint(x)) => json!(x as i64),
            (Shape::IntOrString, PbValue::Bytes(x)) => int_or_string(x, &path)?,
            (Shape::List(inner), PbValue::Bytes(x)) => {
                let item = Value::Object(decode(x, inner, &path)?);
                if let Some(a) = out.entry(*name).or_insert_with(|| json!([])).as_array_mut() {
                    a.push(item);
                }
                continue;
            }
            (Shape::Bool, PbValue::Varint(x)) => json!(x != 0),
            (Shape::MapStr | Shape::MapBytes, PbValue::Bytes(x)) => {
                let (k, val) = entry(x, &path, matches!(shape, Shape::MapBytes))?;
                if let Some(m) = out
                    .entry(*name)
                    .or_insert_with(|| json!({}))
                    .as_object_mut()
                {
                    m.insert(k, val);
                }
                continue;
            }
            (Shape::RepeatedStr, PbValue::Bytes(x)) => {
                let s = json!(text(x, &path)?);
                if let Some(a) = out.entry(*name).or_insert_with(|| json!([])).as_array_mut() {
                    a.push(s);
                }
                continue;
            }
            (Shape::Message(inner), PbValue::Bytes(x)) => Value::Object(decode(x, inner, &path)?),
            _ => return Err(format!("{path}: unexpected wire type")),
        };
        out.insert((*name).to_owned(), value);
    }
    Ok(out)
}

/// The JSON form of a protobuf body, or 415 naming what the API reads.
pub fn to_json(body: &[u8]) -> Result<Value, ApiError> {
    let refuse = |why: String| {
        ApiError::UnsupportedMediaType(format!(
            "application/json, application/yaml (Kubernetes protobuf only for what kubectl's \
             create generators send: v1 Namespace, ConfigMap, Secret, ServiceAccount, Service, \
             apps/v1 Deployment and rbac.authorization.k8s.io/v1 RoleBinding: {why})"
        ))
    };
    let unknown = body
        .strip_prefix(b"k8s\0")
        .ok_or_else(|| refuse("no k8s envelope".into()))?;
    let type_meta = message(unknown, 1)
        .and_then(|t| strings(t, &[(1, "apiVersion"), (2, "kind")]))
        .ok_or_else(|| refuse("no type in the envelope".into()))?;
    let (api_version, kind) = (
        type_meta["apiVersion"].as_str().unwrap_or_default(),
        type_meta["kind"].as_str().unwrap_or_default(),
    );
    let Some((_, _, table)) = KINDS
        .iter()
        .find(|(v, k, _)| *v == api_version && *k == kind)
    else {
        return Err(refuse(format!("{api_version} {kind} is not read")));
    };
    let raw = message(unknown, 2).unwrap_or_default();
    let mut object = decode(raw, table, "").map_err(refuse)?;
    object.insert("apiVersion".into(), json!(api_version));
    object.insert("kind".into(), json!(kind));
    Ok(Value::Object(object))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field(n: u64, bytes: &[u8]) -> Vec<u8> {
        let mut out = vec![u8::try_from(n << 3 | 2).expect("small field")];
        out.push(u8::try_from(bytes.len()).expect("short"));
        out.extend_from_slice(bytes);
        out
    }

    fn envelope(api_version: &str, kind: &str, raw: &[u8]) -> Vec<u8> {
        let type_meta = [field(1, api_version.as_bytes()), field(2, kind.as_bytes())].concat();
        [b"k8s\0".to_vec(), field(1, &type_meta), field(2, raw)].concat()
    }

    #[test]
    fn a_secret_reads_as_its_json_and_an_unread_field_is_refused() {
        let meta = [
            field(1, b"s1"),
            field(3, b"team-a"),
            field(11, &[field(1, b"app"), field(2, b"web")].concat()),
        ]
        .concat();
        let raw = [
            field(1, &meta),
            field(2, &[field(1, b"k"), field(2, b"\x00\xff")].concat()),
            field(3, b"Opaque"),
            vec![5 << 3, 1],
        ]
        .concat();
        let v = to_json(&envelope("v1", "Secret", &raw)).expect("read");
        assert_eq!(
            v,
            json!({"apiVersion": "v1", "kind": "Secret",
                   "metadata": {"name": "s1", "namespace": "team-a", "labels": {"app": "web"}},
                   "data": {"k": "AP8="}, "type": "Opaque", "immutable": true})
        );
        // Owner references (metadata field 13) are not read: refused, not dropped.
        let meta = [field(1, b"s1"), field(13, b"x")].concat();
        let err = to_json(&envelope("v1", "Secret", &field(1, &meta))).expect_err("refused");
        assert!(
            err.to_string().contains("metadata: field 13 is not read"),
            "{err}"
        );
        let err = to_json(&envelope("batch/v1", "Job", &[])).expect_err("refused");
        assert!(err.to_string().contains("batch/v1 Job"), "{err}");
    }

    proptest::proptest! {
        #[test]
        fn any_body_is_read_or_refused_never_a_panic(
            b in proptest::collection::vec(proptest::num::u8::ANY, 0..96)
        ) {
            let _ = to_json(&envelope("v1", "ConfigMap", &b));
        }
    }
}
