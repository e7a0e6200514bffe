//! The Slipway CNI plugin (spec 1.1): ADD, DEL, CHECK, STATUS, GC, VERSION, its config and result types.
#![forbid(unsafe_code)]
