//! The Slipway block store: thin volumes, snapshots and clones, served over the NBD protocol.
//!
//! Layout: `proto` (NBD wire codec, no I/O) and `negotiate` (handshake state machine, no I/O)
//! are pure; `format`/`layer`/`volume`/`store` are the block store (on-disk format in
//! `format.rs`); `uring` is the only module with `unsafe` (the io_uring seam); `server` runs
//! NBD connections on tokio, `tls` is their STARTTLS and the client identities it proves;
//! `control` is the local JSON-lines API; `daemon` wires it all up.
//!
//! # Wiring into the `slipway` binary
//!
//! ```ignore
//! #[derive(clap::Subcommand)]
//! enum Cmd {
//!     /// Manage block store volumes.
//!     #[command(subcommand)]
//!     Volume(slipway_blockstore::cli::VolumeCommand),
//!     /// Run the block store daemon.
//!     Blockstore(slipway_blockstore::cli::ServeArgs),
//! }
//! // in main (synchronous; both build what they need):
//! match cmd {
//!     Cmd::Volume(c) => c.run()?,       // talks to --control (default /run/slipway/blockstore.sock)
//!     Cmd::Blockstore(a) => a.run()?,   // builds its own tokio runtime, blocks until SIGTERM
//! }
//! ```
//!
//! `ServeArgs::run` must not be called from inside a tokio runtime (it creates one); from async
//! code use [`daemon::Daemon::start`] with a [`config::ServeConfig`]. The CSI driver calls the
//! control API with [`control::call`] and a [`control::ControlRequest`].
#![deny(unsafe_code)]

pub mod cli;
pub mod config;
pub mod control;
pub mod daemon;
pub mod error;
pub mod format;
pub mod layer;
pub mod metrics;
pub mod negotiate;
pub mod proto;
pub mod server;
pub mod store;
pub mod tls;
#[allow(
    unsafe_code,
    reason = "the io_uring seam: raw buffers handed to the kernel"
)]
pub mod uring;
pub mod volume;

pub use error::StoreError;
