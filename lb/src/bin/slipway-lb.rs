//! Stand-alone load balancer binary, used by the crate's integration tests (which must SIGKILL
//! and SIGTERM a real daemon process) and for manual runs; `slipway lb` embeds the same
//! commands.
#![forbid(unsafe_code)]

use clap::Parser;
use slipway_lb::cli::LbCommand;

#[derive(Debug, Parser)]
#[command(name = "slipway-lb", about = "Slipway L4 load balancer")]
struct Cli {
    #[command(subcommand)]
    command: LbCommand,
}

fn main() -> anyhow::Result<()> {
    Cli::parse().command.run()
}
