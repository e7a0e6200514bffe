//! `SelfSubjectAccessReview` (authorization.k8s.io/v1), which `kubectl auth can-i` posts: the
//! caller asks whether it may do a verb, and the answer comes from the same RBAC decision the
//! verbs themselves go through.

use serde_json::{Value, json};

use super::State;
use crate::api::registry::RESOURCES;
use crate::auth::{UserInfo, authorize};
use crate::error::{ApiError, FieldError};

/// The group, version and plural the review is served under.
pub const GROUP: &str = "authorization.k8s.io";
/// API version served.
pub const VERSION: &str = "v1";
/// Resource plural.
pub const PLURAL: &str = "selfsubjectaccessreviews";

/// Non-resource paths every authenticated user may read (kube-apiserver's
/// `system:discovery` and `system:public-info-viewer` roles).
const PUBLIC_PATHS: &[&str] = &[
    "/api", "/apis", "/healthz", "/livez", "/readyz", "/version", "/openapi",
];

/// Kubernetes' protobuf media type, which current kubectl sends this review in.
pub use super::protobuf::PROTOBUF;
use super::protobuf::{message, strings};

/// Decodes a review sent as Kubernetes protobuf (`k8s\0` + runtime.Unknown{raw}) into its
/// JSON form: only the spec matters.
pub fn from_protobuf(body: &[u8]) -> Result<Value, ApiError> {
    let bad = || ApiError::BadRequest("invalid protobuf SelfSubjectAccessReview".into());
    let unknown = body.strip_prefix(b"k8s\0").ok_or_else(bad)?;
    let raw = message(unknown, 2).ok_or_else(bad)?;
    let mut spec = serde_json::Map::new();
    if let Some(spec_pb) = message(raw, 2) {
        if let Some(ra) = message(spec_pb, 1) {
            let attrs = strings(
                ra,
                &[
                    (1, "namespace"),
                    (2, "verb"),
                    (3, "group"),
                    (4, "version"),
                    (5, "resource"),
                    (6, "subresource"),
                    (7, "name"),
                ],
            )
            .ok_or_else(bad)?;
            spec.insert("resourceAttributes".into(), attrs);
        }
        if let Some(nra) = message(spec_pb, 2) {
            let attrs = strings(nra, &[(1, "path"), (2, "verb")]).ok_or_else(bad)?;
            spec.insert("nonResourceAttributes".into(), attrs);
        }
    }
    Ok(json!({"spec": spec}))
}

fn invalid(causes: Vec<FieldError>) -> ApiError {
    ApiError::Invalid {
        kind: "SelfSubjectAccessReview".into(),
        name: String::new(),
        causes,
    }
}

fn str_at<'a>(v: &'a Value, field: &str) -> &'a str {
    v.get(field).and_then(Value::as_str).unwrap_or_default()
}

/// Decides one review and returns it with its `status`.
pub async fn review(state: &State, user: &UserInfo, body: &Value) -> Result<Value, ApiError> {
    let spec = body.get("spec").cloned().unwrap_or(Value::Null);
    let resource = spec.get("resourceAttributes").filter(|v| v.is_object());
    let non_resource = spec.get("nonResourceAttributes").filter(|v| v.is_object());
    let (allowed, reason) = match (resource, non_resource) {
        (Some(_), Some(_)) => {
            return Err(invalid(vec![FieldError::invalid(
                "spec.nonResourceAttributes",
                "set",
                "cannot be specified in combination with resourceAttributes",
            )]));
        }
        (None, None) => {
            return Err(invalid(vec![FieldError::required(
                "spec.resourceAttributes",
            )]));
        }
        (Some(attrs), None) => resource_decision(state, user, attrs).await?,
        (None, Some(attrs)) => {
            let path = str_at(attrs, "path");
            let verb = str_at(attrs, "verb");
            let public = verb == "get"
                && PUBLIC_PATHS
                    .iter()
                    .any(|p| path == *p || path.starts_with(&format!("{p}/")));
            (user.is_admin() || public, String::new())
        }
    };
    let mut status = json!({"allowed": allowed});
    if !reason.is_empty()
        && let Some(m) = status.as_object_mut()
    {
        m.insert("reason".into(), json!(reason));
    }
    Ok(json!({
        "kind": "SelfSubjectAccessReview",
        "apiVersion": format!("{GROUP}/{VERSION}"),
        "metadata": {"creationTimestamp": null},
        "spec": spec,
        "status": status,
    }))
}

async fn resource_decision(
    state: &State,
    user: &UserInfo,
    attrs: &Value,
) -> Result<(bool, String), ApiError> {
    let verb = str_at(attrs, "verb");
    let group = str_at(attrs, "group");
    let plural = str_at(attrs, "resource");
    let namespace = Some(str_at(attrs, "namespace")).filter(|n| !n.is_empty());
    let subresource = Some(str_at(attrs, "subresource")).filter(|s| !s.is_empty());
    let name = Some(str_at(attrs, "name")).filter(|n| !n.is_empty());
    if verb.is_empty() {
        return Err(invalid(vec![FieldError::required(
            "spec.resourceAttributes.verb",
        )]));
    }
    if user.is_admin() {
        return Ok((true, String::new()));
    }
    let Some(rt) = RESOURCES
        .iter()
        .find(|r| r.group == group && r.plural == plural)
    else {
        return Ok((false, format!("no resource {plural:?} in group {group:?}")));
    };
    match authorize(&state.store, user, verb, rt, subresource, namespace, name).await {
        Ok(()) => Ok((true, String::new())),
        Err(ApiError::Forbidden { .. }) => Ok((false, String::new())),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field(n: u64, bytes: &[u8]) -> Vec<u8> {
        let mut out = vec![u8::try_from((n << 3) | 2).unwrap_or(0)];
        out.push(u8::try_from(bytes.len()).unwrap_or(0));
        out.extend_from_slice(bytes);
        out
    }

    #[test]
    fn protobuf_review_decodes_its_attributes() -> Result<(), ApiError> {
        let attrs = [field(1, b"team-a"), field(2, b"get"), field(5, b"pods")].concat();
        let raw = field(2, &field(1, &attrs));
        let body = [b"k8s\0".as_slice(), &field(2, &raw)].concat();
        let v = from_protobuf(&body)?;
        assert_eq!(
            v["spec"]["resourceAttributes"],
            json!({"namespace": "team-a", "verb": "get", "resource": "pods"})
        );
        assert!(from_protobuf(b"k8s\0\x12\x05ab").is_err());
        Ok(())
    }

    proptest::proptest! {
        #[test]
        fn protobuf_decoding_never_panics(b in proptest::collection::vec(proptest::num::u8::ANY, 0..64)) {
            let body = [b"k8s\0".as_slice(), &b].concat();
            let _ = from_protobuf(&body);
        }
    }
}
