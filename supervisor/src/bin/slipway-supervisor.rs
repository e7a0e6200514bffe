//! Standalone supervisor binary (the same entry point `slipway supervisor` wires in); used by
//! this crate's integration tests.
#![forbid(unsafe_code)]

use clap::Parser;
use slipway_supervisor::cli::SupervisorArgs;

#[derive(Debug, Parser)]
#[command(name = "slipway-supervisor", about = "Slipway supervisor API server")]
struct Cli {
    #[command(flatten)]
    args: SupervisorArgs,
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    Cli::parse().args.run()
}
