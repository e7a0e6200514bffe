//! The API error type and the one place that turns it into a Kubernetes `metav1.Status` body.

use serde_json::{Value, json};

use crate::store::StoreError;

pub use slipway_api::{FieldError, FieldReason};

/// Every way an API request can fail.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The object (or the resource type) does not exist.
    #[error("{resource} {name:?} not found")]
    NotFound {
        /// Resource plural, or a path for unknown endpoints.
        resource: String,
        /// Object name.
        name: String,
    },
    /// Create of a name that exists.
    #[error("{resource} {name:?} already exists")]
    AlreadyExists {
        /// Resource plural.
        resource: String,
        /// Object name.
        name: String,
    },
    /// Optimistic concurrency failure.
    #[error(
        "Operation cannot be fulfilled on {resource} {name:?}: the object has been modified; please apply your changes to the latest version and try again{}",
        stale_suffix(.stale)
    )]
    Conflict {
        /// Resource plural.
        resource: String,
        /// Object name.
        name: String,
        /// (resourceVersion sent, resourceVersion stored), when known.
        stale: Option<(u64, u64)>,
    },
    /// A Pod binding for a Pod already bound to a Node.
    #[error(
        "Operation cannot be fulfilled on pods/binding {pod:?}: pod {pod} is already assigned to node {node:?}"
    )]
    AlreadyBound {
        /// The Pod.
        pod: String,
        /// The Node it is bound to.
        node: String,
    },
    /// The object failed validation; every bad field is listed.
    #[error("{}", slipway_api::invalid_message(.kind, .name, .causes))]
    Invalid {
        /// Kind of the object.
        kind: String,
        /// Object name.
        name: String,
        /// Bad fields.
        causes: Vec<FieldError>,
    },
    /// The body could not be decoded (syntax, wrong type, unknown field).
    #[error("{0}")]
    BadRequest(String),
    /// No or bad credentials.
    #[error("Unauthorized")]
    Unauthorized,
    /// RBAC denied the request.
    #[error("{resource} is forbidden: User {user:?} cannot {verb} resource {resource:?} in API group {group:?}{}", in_namespace(.namespace))]
    Forbidden {
        /// Authenticated user.
        user: String,
        /// Kubernetes verb.
        verb: String,
        /// Resource plural.
        resource: String,
        /// API group.
        group: String,
        /// Namespace, if namespaced.
        namespace: Option<String>,
    },
    /// Admission refused the object (quota, policy); the message names the limit.
    #[error("{resource} {name:?} is forbidden: {message}")]
    AdmissionDenied {
        /// Resource plural.
        resource: String,
        /// Object name.
        name: String,
        /// Why, naming the field and limit.
        message: String,
    },
    /// The object is still used by others (a class by clusters or claims).
    #[error("{resource} {name:?} is in use by {}: remove or move its users first", .users.join(", "))]
    InUse {
        /// Resource plural.
        resource: String,
        /// Object name.
        name: String,
        /// Who uses it (`Kind namespace/name`).
        users: Vec<String>,
    },
    /// Server-side apply would change fields other managers own (not forced).
    #[error("Apply failed with {} conflict{}: {}", .0.len(), if .0.len() == 1 { "" } else { "s" }, format_apply_conflicts(.0))]
    ApplyConflict(Vec<crate::ssa::Conflict>),
    /// The caller holds too much of something limited (watches); retry later.
    #[error("too many requests: {0}")]
    TooManyRequests(String),
    /// The HTTP method is not allowed on this path.
    #[error("the server does not allow this method on the requested resource")]
    MethodNotAllowed,
    /// The requested resourceVersion is no longer available.
    #[error("too old resource version: {requested} ({oldest})")]
    Gone {
        /// Requested revision.
        requested: u64,
        /// Oldest revision still available.
        oldest: u64,
    },
    /// The request body's content type is not supported for this verb.
    #[error("the body of the request was in an unknown format - accepted media types include: {0}")]
    UnsupportedMediaType(String),
    /// What the request needs is not there yet (a cluster's control plane); retry later.
    #[error("{0}")]
    Unavailable(String),
    /// The store failed.
    #[error("storage error")]
    Store(#[source] StoreError),
    /// Anything else that went wrong inside the server.
    #[error("internal error: {0}")]
    Internal(String),
    /// A kubelet refused a proxied request (its status and message), or could not be reached.
    #[error("{message}")]
    Kubelet {
        /// The kubelet's HTTP status (500 when it could not be reached).
        code: u16,
        /// What the kubelet said, or why it could not be reached.
        message: String,
    },
}

fn format_apply_conflicts(conflicts: &[crate::ssa::Conflict]) -> String {
    let parts: Vec<String> = conflicts
        .iter()
        .map(|c| format!("conflict with {:?}: {}", c.manager, c.field))
        .collect();
    parts.join("\n")
}

fn stale_suffix(stale: &Option<(u64, u64)>) -> String {
    match stale {
        Some((sent, current)) => {
            format!(" (metadata.resourceVersion: sent {sent}, current {current})")
        }
        None => String::new(),
    }
}

fn in_namespace(ns: &Option<String>) -> String {
    match ns {
        Some(ns) => format!(" in the namespace {ns:?}"),
        None => " at the cluster scope".to_string(),
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Compacted { requested, oldest } => Self::Gone { requested, oldest },
            other => Self::Store(other),
        }
    }
}

impl ApiError {
    /// The HTTP status code this error is answered with.
    pub fn code(&self) -> u16 {
        match self {
            Self::NotFound { .. } => 404,
            Self::AlreadyExists { .. }
            | Self::Conflict { .. }
            | Self::AlreadyBound { .. }
            | Self::InUse { .. }
            | Self::ApplyConflict(_) => 409,
            Self::Invalid { .. } => 422,
            Self::BadRequest(_) => 400,
            Self::Unauthorized => 401,
            Self::Forbidden { .. } | Self::AdmissionDenied { .. } => 403,
            Self::MethodNotAllowed => 405,
            Self::TooManyRequests(_) => 429,
            Self::Gone { .. } => 410,
            Self::UnsupportedMediaType(_) => 415,
            Self::Store(StoreError::Unavailable { .. }) | Self::Unavailable(_) => 503,
            Self::Store(_) | Self::Internal(_) => 500,
            Self::Kubelet { code, .. } if (400..=599).contains(code) => *code,
            Self::Kubelet { .. } => 500,
        }
    }

    /// The `metav1.Status.reason` for this error.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::NotFound { .. } => "NotFound",
            Self::AlreadyExists { .. } => "AlreadyExists",
            Self::Conflict { .. }
            | Self::AlreadyBound { .. }
            | Self::InUse { .. }
            | Self::ApplyConflict(_) => "Conflict",
            Self::Invalid { .. } => "Invalid",
            Self::BadRequest(_) => "BadRequest",
            Self::Unauthorized => "Unauthorized",
            Self::Forbidden { .. } | Self::AdmissionDenied { .. } => "Forbidden",
            Self::MethodNotAllowed => "MethodNotAllowed",
            Self::TooManyRequests(_) => "TooManyRequests",
            Self::Gone { .. } => "Expired",
            Self::UnsupportedMediaType(_) => "UnsupportedMediaType",
            Self::Store(StoreError::Unavailable { .. }) | Self::Unavailable(_) => {
                "ServiceUnavailable"
            }
            Self::Store(_) | Self::Internal(_) => "InternalError",
            Self::Kubelet { code, .. } => match code {
                400 => "BadRequest",
                401 => "Unauthorized",
                403 => "Forbidden",
                404 => "NotFound",
                503 => "ServiceUnavailable",
                _ => "InternalError",
            },
        }
    }

    /// The `metav1.Status` body: the single place errors are put on the wire.
    pub fn to_status(&self) -> Value {
        if let Self::Invalid { kind, name, causes } = self {
            // Validation errors become a Status in one place, the API crate's.
            let status = slipway_api::invalid_status(kind, name, causes);
            return serde_json::to_value(status)
                .unwrap_or_else(|e| Self::Internal(format!("encoding a Status: {e}")).to_status());
        }
        let mut message = self.to_string();
        if let Self::Store(e) = self {
            // The whole chain, so the client reads what the store said, not just "etcd".
            message = format!("{message}: {}", crate::server::health::error_chain(e));
        }
        let mut status = json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": message,
            "reason": self.reason(),
            "code": self.code(),
        });
        let details = match self {
            Self::Conflict {
                resource,
                name,
                stale: Some(_),
            } => Some(json!({
                "name": name,
                "kind": resource,
                "causes": [{
                    "reason": "FieldValueInvalid",
                    "message": "the object has been modified",
                    "field": "metadata.resourceVersion",
                }],
            })),
            Self::NotFound { resource, name }
            | Self::AlreadyExists { resource, name }
            | Self::Conflict { resource, name, .. }
            | Self::InUse { resource, name, .. }
            | Self::AdmissionDenied { resource, name, .. } => {
                Some(json!({"name": name, "kind": resource}))
            }
            Self::Forbidden {
                resource, group, ..
            } => Some(json!({"kind": resource, "group": group})),
            Self::ApplyConflict(conflicts) => Some(json!({
                "causes": conflicts.iter().map(|c| json!({
                    "reason": "FieldManagerConflict",
                    "message": format!("conflict with {:?}", c.manager),
                    "field": c.field,
                })).collect::<Vec<_>>(),
            })),
            _ => None,
        };
        if let (Some(d), Some(obj)) = (details, status.as_object_mut()) {
            obj.insert("details".into(), d);
        }
        status
    }
}
