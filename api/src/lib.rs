//! Slipway's API types: its own kinds (`slipway.dev/v1alpha1` HostClass, Zone, Cluster, Host) as
//! serde + schemars types with a `validate()` that names every bad field, the shared machinery
//! types they are made of (`ObjectMeta`, quantities, conditions), the workspace's one
//! [`FieldError`] type and the one conversion of validation errors into a Kubernetes
//! `metav1.Status` body ([`invalid_status`]).
//!
//! Upstream kinds (Service, Pod, Node, Lease, ...) are k8s-openapi's types; this crate stays
//! light (serde, schemars, k8s-openapi, thiserror) so every plane can depend on it.
#![forbid(unsafe_code)]

pub mod error;
pub mod logs;
pub mod meta;
pub mod networking;
pub mod slipway;
pub mod volumes;

pub use error::{FieldError, FieldReason, format_causes, invalid_message, invalid_status};

/// A kind's own checks beyond what its serde type enforces.
pub trait Validate {
    /// Fills in defaults the API promises (type ClusterIP, protocol TCP, ...).
    fn default_fields(&mut self) {}
    /// Appends one entry per bad field; never stops at the first.
    fn validate(&self, errs: &mut Vec<FieldError>);
}

/// Declares a top-level kind with `apiVersion`, `kind`, `metadata`, `spec` and `status`. The
/// calling crate needs `serde` and `schemars` as dependencies.
#[macro_export]
macro_rules! kind {
    ($(#[$doc:meta])* $name:ident, $spec:ty, $status:ty) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize, schemars::JsonSchema)]
        #[serde(rename_all = "camelCase", deny_unknown_fields)]
        pub struct $name {
            /// `group/version` of the schema.
            #[serde(default)]
            pub api_version: String,
            /// Kind name.
            #[serde(default)]
            pub kind: String,
            /// Standard object metadata.
            #[serde(default)]
            pub metadata: $crate::meta::ObjectMeta,
            /// Desired state.
            #[serde(default)]
            pub spec: $spec,
            /// Observed state, written through the `status` subresource.
            #[serde(default, skip_serializing_if = "Option::is_none")]
            pub status: Option<$status>,
        }
    };
}

/// Appends an `[index]` path segment (`spec.ports` → `spec.ports[0]`).
pub fn at(field: &str, i: usize) -> String {
    format!("{field}[{i}]")
}
