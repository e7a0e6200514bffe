//! `slipway`: the one user-facing binary. For now it runs the demo and the benchmark suites;
//! the daemons (`slipway agent`, `slipway supervisor`, ...) join it as their issues land.
#![forbid(unsafe_code)]

mod bench;

use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;

#[derive(Debug, Parser)]
#[command(
    name = "slipway",
    version,
    about = "eBPF networking and NBD storage for Kubernetes-style clusters"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Build a 2-host world in network namespaces, load the datapath, move traffic through it
    /// beside a raw veth baseline, print what was measured, and tear the world down.
    Demo(bench::RunArgs),
    /// Run the node agent: installs the eBPF datapath, serves the local API, exports metrics.
    Agent(slipway_cni::agent::AgentArgs),
    /// Run a benchmark suite (use a release build): Slipway beside its baseline in the same run,
    /// written to <out-dir>/<suite>.jsonl.
    Bench {
        #[arg(value_enum)]
        suite: bench::Suite,
        #[command(flatten)]
        args: bench::RunArgs,
    },
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().command {
        Command::Demo(args) => bench::run(bench::Suite::Demo, args),
        Command::Bench { suite, args } => bench::run(suite, args),
        Command::Agent(args) => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?
            .block_on(slipway_cni::agent::run(args)),
    }
}
