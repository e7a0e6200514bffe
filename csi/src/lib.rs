//! The Slipway paravirtual CSI driver: Identity, Controller and Node services, node attach and mount.
#![forbid(unsafe_code)]
