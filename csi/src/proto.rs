//! The CSI v1 wire types and gRPC services, generated at build time from `proto/csi.proto`.
#![allow(
    missing_docs,
    missing_debug_implementations,
    unused_qualifications,
    clippy::all,
    clippy::pedantic,
    clippy::allow_attributes_without_reason,
    reason = "generated code"
)]

tonic::include_proto!("csi.v1");
