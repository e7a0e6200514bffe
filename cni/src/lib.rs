//! The Slipway CNI plugin (spec 1.1): ADD, DEL, CHECK, STATUS, GC, VERSION over the node's eBPF
//! datapath, host-local IPAM with crash-safe allocations, and (in `agent`) the node agent that
//! installs the datapath and takes the cluster's hosts from a local API.
#![forbid(unsafe_code)]

pub mod ipam;
pub mod plugin;
pub mod policy;
pub mod spec;
