//! Slipway's end-to-end benchmark suites, run by `slipway bench <suite>` in release builds. Each
//! suite measures Slipway beside a real baseline in the same run (see [`report`]).
#![forbid(unsafe_code)]

pub mod cni;
pub mod demo;
pub mod lb;
pub mod nbd;
pub mod policy;
pub mod report;
