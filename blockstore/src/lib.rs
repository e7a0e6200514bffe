//! The Slipway block store: thin volumes, snapshots and clones, served over the NBD protocol.
#![forbid(unsafe_code)]
