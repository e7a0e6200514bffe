//! The Slipway L4 load balancer for IPv4 and IPv6 VIPs: Maglev table, VIP pools, backend
//! health checks, ARP and NDP announcement, the controller and its local API, over the eBPF
//! datapath in `ebpf/lb.c`.
//!
//! Layout (datapath / control library / daemon, as Katran splits it):
//! - pure logic, no I/O: [`maglev`], [`pool`], [`config`], [`health::Health`], [`controller`]
//!   (over the [`maps::LbMaps`] seam; what it owns, services and ids, in `book.rs`),
//!   [`status`], [`state`] (what survives a restart: the state file);
//! - kernel: [`datapath`] (the BPF objects and maps of `slipway_dataplane::lb` behind
//!   [`maps::LbMaps`]), [`packet`] (gratuitous ARP and unsolicited Neighbor
//!   Advertisements through the dataplane's AF_PACKET seam, solicited-node groups);
//! - daemon: [`daemon`] (local API on a Unix socket, health-check tasks), [`api`] (routes'
//!   wire format and the blocking [`api::Client`]), [`metrics`], [`cli`].
//!
//! # Wiring into the `slipway` binary
//!
//! ```text
//! #[derive(clap::Subcommand)]
//! enum Command {
//!     /// The L4 load balancer.
//!     #[command(subcommand)]
//!     Lb(slipway_lb::cli::LbCommand),
//!     // ...
//! }
//! // in main: Command::Lb(cmd) => cmd.run()?,
//! ```
//!
//! `slipway lb serve --config lb.yaml` runs the daemon; `slipway lb status`, `apply -f`,
//! `delete ns/name` and `metrics` talk to it over its socket (default
//! [`config::DEFAULT_SOCKET`]).
#![forbid(unsafe_code)]

pub mod announce;
pub mod api;
mod book;
pub mod cli;
pub mod config;
pub mod controller;
pub mod daemon;
pub mod datapath;
pub mod election;
pub mod error;
pub mod feed;
pub mod health;
pub mod maglev;
pub mod maps;
pub mod metrics;
pub mod packet;
pub mod pool;
pub mod state;
pub mod status;
pub mod world;

pub use error::LbError;
