//! The resource schemas users write: serde types with defaults and a `validate()` that names
//! every bad field, plus the registry that maps them onto API paths.

pub mod apps;
pub mod coordination;
pub mod core;
pub mod discovery;
pub mod meta;
pub mod networking;
pub mod rbac;
pub mod registry;
pub mod storage;
pub mod volumes;

/// Slipway's own kinds live in the API crate.
pub use slipway_api::slipway;
pub use slipway_api::{Validate, at, kind};
