//! Stand-alone CSI driver binary, used by the crate's integration tests (which must kill a real
//! plugin process) and for manual runs; `slipway csi` embeds the same commands.

use clap::Parser;
use slipway_csi::cli::CsiCommand;
use tracing_subscriber::EnvFilter;

#[derive(Debug, Parser)]
#[command(name = "slipway-csi", about = "Slipway CSI driver (csi.slipway.dev)")]
struct Cli {
    #[command(subcommand)]
    command: CsiCommand,
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        // Attach processes and supervised plugins log to files: colour only on a terminal.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    Cli::parse().command.run(&[])
}
