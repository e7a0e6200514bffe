//! Stand-alone block store binary, used by the crate's integration tests (which must SIGKILL
//! a real process) and for manual runs; `slipway` embeds the same commands.

use clap::Parser;
use slipway_blockstore::cli::{ServeArgs, VolumeCommand};

#[derive(Debug, Parser)]
#[command(name = "slipway-nbd", about = "Slipway block store (NBD server)")]
enum Cli {
    /// Run the daemon.
    Serve(ServeArgs),
    /// Manage volumes.
    #[command(subcommand)]
    Volume(VolumeCommand),
}

fn main() -> anyhow::Result<()> {
    match Cli::parse() {
        Cli::Serve(args) => args.run(),
        Cli::Volume(cmd) => cmd.run(),
    }
}
