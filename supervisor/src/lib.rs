//! The Slipway supervisor: Kubernetes-style API server, auth and RBAC, store backends, reconcilers.
//!
//! # Wiring into the `slipway` CLI
//!
//! [`cli::SupervisorArgs`] is a `clap::Args`; flatten it into the `supervisor` subcommand and
//! call [`cli::SupervisorArgs::run`] (builds its own tokio runtime) or `.run_async().await` from
//! an existing runtime:
//!
//! ```text
//! #[derive(clap::Subcommand)]
//! enum Command {
//!     /// Run the supervisor API server.
//!     Supervisor(slipway_supervisor::cli::SupervisorArgs),
//! }
//! // ...
//! Command::Supervisor(args) => args.run()?,
//! ```
//!
//! The client commands are wired the same way, each a `clap::Args` with `run()` (own runtime,
//! prints to stdout) and `run_to(&mut writer)` (async):
//! `slipway apply` = [`cli::ApplyArgs`], `slipway get` = [`cli::GetArgs`] (`-w` follows),
//! `slipway describe` = [`cli::DescribeArgs`], `slipway delete` = [`cli::DeleteArgs`],
//! `slipway kubeconfig` = [`cli::KubeconfigArgs`] (issues a client certificate from the CA), and
//! `slipway bench api` = [`bench::BenchApiArgs`] (writes `target/slipway-bench/api.jsonl`).
//! They all go through [`client::Client`], the client the agents use.
//!
//! `slipway supervisor --data-dir DIR --listen 127.0.0.1:6443 [--store redb|etcd://h1,h2]
//! [--token-file FILE] [--audit-log FILE] [--handshake-timeout 10s] [--header-read-timeout 30s]
//! [--max-connections N] [--max-connections-per-client N] [--max-watches-per-user N]` creates `DIR/pki/` (CA, serving certificate) on
//! first start, writes `DIR/admin.kubeconfig` (cluster-admin client certificate) on every
//! start, and prints `slipway supervisor listening on https://ADDR` once bound. `/livez`,
//! `/readyz` and `/healthz` (with `?verbose`) are served without credentials.
//!
//! Layout: [`api`] (the kinds and their registry), [`server`] (HTTPS, routing, verbs, watch,
//! Table output), [`store`] (the `Store` trait, redb and etcd backends), [`auth`] (tokens,
//! client certificates, RBAC), [`admission`], [`quota`], [`audit`], [`openapi`], [`patch`],
//! [`selector`], [`ssa`] (field ownership), [`tls`], [`metrics`], [`error`] (the one place errors
//! become `metav1.Status`), [`controllers`] (the supervisor's own, e.g. host health).
#![forbid(unsafe_code)]

pub mod admission;
pub mod api;
pub mod audit;
pub mod auth;
pub mod bench;
pub mod cli;
pub mod client;
pub mod controllers;
pub mod error;
pub mod etcd_member;
pub mod metrics;
pub mod openapi;
pub mod patch;
pub mod quota;
pub mod selector;
pub mod server;
pub mod ssa;
pub mod store;
pub mod tls;
