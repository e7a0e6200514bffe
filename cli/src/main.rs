//! `slipway`: the one user-facing binary: the daemons (`slipway supervisor`, `slipway agent`,
//! `slipway blockstore`), the client (`apply`, `get`, `describe`, `delete`, `volume`), the demo
//! and the benchmark suites.
#![forbid(unsafe_code)]

mod bench;
mod bench_pods;
mod cluster_bench;
mod csi_bench;
mod lb_controller;
mod lb_edge_bench;
mod pods_bench;
mod services_bench;
mod supervisor;
mod up;

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
    /// Manage block store volumes (through the block store's control socket).
    #[command(subcommand)]
    Volume(slipway_blockstore::cli::VolumeCommand),
    /// Run the block store: volumes served over NBD (TCP and Unix socket).
    Blockstore(slipway_blockstore::cli::ServeArgs),
    /// The L4 load balancer: `serve` (the daemon), `status`, `apply`, `delete`, `metrics`, and
    /// `controller` (VIPs from LoadBalancerPools on any Kubernetes API).
    #[command(subcommand)]
    Lb(lb_controller::LbCli),
    /// Run the node agent: installs the eBPF datapath, serves the local API, exports metrics.
    Agent(Box<slipway_agent::AgentArgs>),
    /// Offline images for the host's containerd: `import NAME DIR|TAR`.
    #[command(subcommand)]
    Image(slipway_agent::pods::image::ImageCommand),
    /// Join this machine to a supervisor as a host (bootstrap token, as `kubeadm join`), then
    /// run its host agent (heartbeat; the node datapath with agent flags after `--`).
    Join(slipway_agent::join::JoinArgs),
    /// Stream the node's NetworkPolicy verdicts (allowed connections, denied packets).
    Flows(slipway_agent::cli::FlowsArgs),
    /// NetworkPolicy on this node: `explain` a verdict, `set` or `get` the agent's state.
    #[command(subcommand)]
    Policy(slipway_agent::cli::PolicyCommand),
    /// The CSI driver (csi.slipway.dev): `controller`, `node`, and the per-volume `attach`
    /// process the node plugin starts.
    #[command(subcommand)]
    Csi(slipway_csi::cli::CsiCommand),
    /// The main job: a supervisor provisioning hosts in network namespaces over three zones,
    /// with a demo cluster (one control plane host, two workers in two zones); progress until
    /// it is Ready, then the commands to try. Ctrl-C (or `slipway down`) tears everything down.
    Up(up::UpArgs),
    /// Stops a running `slipway up` (which then tears everything down).
    Down(up::DownArgs),
    /// One etcd member of a workload cluster on its control plane host: joins the members
    /// running (or starts the first), then becomes etcd. The host agent runs it.
    EtcdMember(slipway_supervisor::etcd_member::EtcdMemberArgs),
    /// Run the supervisor: the Kubernetes-style API server (HTTPS), on redb or etcd.
    Supervisor(Box<supervisor::SupervisorCommand>),
    /// Create or update the objects in YAML/JSON files through the supervisor's API.
    Apply(slipway_supervisor::cli::ApplyArgs),
    /// List or show objects.
    Get(slipway_supervisor::cli::GetArgs),
    /// Show an object in detail, with its events.
    Describe(slipway_supervisor::cli::DescribeArgs),
    /// Delete objects.
    Delete(slipway_supervisor::cli::DeleteArgs),
    /// Issue a kubeconfig for a user, signed by the supervisor's CA.
    Kubeconfig(slipway_supervisor::cli::KubeconfigArgs),
    /// Run a benchmark suite (use a release build): Slipway beside its baseline in the same run,
    /// written to <out-dir>/<suite>.jsonl.
    #[command(subcommand)]
    Bench(bench::BenchCommand),
}

/// A client with the credentials of `kubeconfig`.
async fn client_for(kubeconfig: &std::path::Path) -> anyhow::Result<kube::Client> {
    let config = kube::config::Kubeconfig::read_from(kubeconfig)?;
    let config =
        kube::Config::from_custom_kubeconfig(config, &kube::config::KubeConfigOptions::default())
            .await?;
    Ok(kube::Client::try_from(config)?)
}

/// The host agent's runtime: two workers, whatever the machine's size.
fn agent_runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // The block store and the CSI plugins say what they serve, who connects and what changes.
    let level = if matches!(cli.command, Command::Blockstore(_) | Command::Csi(_)) {
        "info"
    } else {
        "warn"
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(level)),
        )
        .with_writer(std::io::stderr)
        // Colour codes only for a terminal: a log file or journal gets plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match cli.command {
        Command::Demo(args) => bench::run(bench::Suite::Demo, args),
        Command::Bench(command) => bench::dispatch(command),
        Command::Supervisor(args) => args.run(),
        Command::Up(args) => args.run(),
        Command::Down(args) => args.run(),
        Command::Apply(args) => args.run(),
        Command::Get(args) => args.run(),
        Command::Describe(args) => args.run(),
        Command::Delete(args) => args.run(),
        Command::Kubeconfig(args) => args.run(),
        Command::Volume(command) => command.run(),
        Command::Lb(command) => command.run(),
        Command::Image(command) => command.run(),
        Command::Flows(args) => args.run(),
        Command::Policy(command) => command.run(),
        Command::Blockstore(args) => args.run(),
        Command::Csi(command) => command.run(&["csi"]),
        Command::Agent(args) => agent_runtime()?.block_on(slipway_agent::run(*args)),
        Command::Join(args) => agent_runtime()?.block_on(slipway_agent::join::run(args)),
        Command::EtcdMember(args) => {
            agent_runtime()?.block_on(slipway_supervisor::etcd_member::run(args))
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory as _;

    /// Every subcommand's flags are well formed (unique names, valid defaults): clap checks
    /// this only when a command is parsed, so a clash would otherwise surface at run time.
    #[test]
    fn every_command_line_is_well_formed() {
        super::Cli::command().debug_assert();
    }
}
