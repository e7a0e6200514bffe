//! The resource schemas users write: serde types with defaults and a `validate()` that names
//! every bad field, plus the registry that maps them onto API paths.

pub mod core;
pub mod meta;
pub mod networking;
pub mod rbac;
pub mod registry;
pub mod slipway;
pub mod storage;

use crate::error::FieldError;

/// A kind's own checks beyond what its serde type enforces.
pub trait Validate {
    /// Fills in defaults the API promises (type ClusterIP, protocol TCP, ...).
    fn default_fields(&mut self) {}
    /// Appends one entry per bad field; never stops at the first.
    fn validate(&self, errs: &mut Vec<FieldError>);
}

/// Declares a top-level kind with `apiVersion`, `kind`, `metadata`, `spec` and `status`.
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
            pub metadata: crate::api::meta::ObjectMeta,
            /// Desired state.
            #[serde(default)]
            pub spec: $spec,
            /// Observed state, written through the `status` subresource.
            #[serde(default, skip_serializing_if = "Option::is_none")]
            pub status: Option<$status>,
        }
    };
}
pub(crate) use kind;

/// Appends `.index` path segments.
pub(crate) fn at(field: &str, i: usize) -> String {
    format!("{field}[{i}]")
}
