//! The Slipway paravirtual CSI driver: Identity, Controller and Node services, node attach and mount.
//!
//! Layout: `proto` is generated from the CSI spec's proto; `capability` checks requests without
//! I/O; `identity`, `controller` and `node` are the three gRPC services; `backend` is the storage
//! behind the controller (a block store's control socket today, the supervisor later); `server`
//! serves them on a Unix socket; `cli` is what `slipway csi` runs.
#![forbid(unsafe_code)]

pub mod attach;
pub mod backend;
pub mod capability;
pub mod cli;
pub mod controller;
pub mod error;
pub mod identity;
pub mod kernel_nbd;
pub mod nbd;
pub mod node;
pub mod paravirtual;
pub mod proto;
pub mod server;
pub mod sys;

pub use error::CsiError;
