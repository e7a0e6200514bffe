//! Slipway's eBPF datapath in userspace: the BPF objects built from `ebpf/`, typed map handles
//! that mirror `ebpf/include/abi.h`, network namespaces, cgroups, underlay segments (the host
//! provider's and the test world's), and the test world of hosts in network namespaces that
//! tests, the demo and the benchmarks share.

pub mod abi;
pub mod btf;
pub mod cgroup;
pub mod error;
pub mod lb;
pub mod link;
pub mod mounts;
pub mod netns;
pub mod nft;
pub mod node;
pub mod objects;
pub mod packet;
pub mod pod;
pub mod policy;
pub mod services;
pub mod underlay;
pub mod world;

pub use error::DataplaneError;
