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
    match authorize(&state.store, user, verb, rt, namespace).await {
        Ok(()) => Ok((true, String::new())),
        Err(ApiError::Forbidden { .. }) => Ok((false, String::new())),
        Err(e) => Err(e),
    }
}
