//! `slipway bench <suite>` and `slipway demo`: run a suite, print its table, write its JSONL.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, ensure};
use slipway_bench::{cni, demo, lb, nbd, policy, report};

/// `slipway bench <suite>`.
#[derive(Debug, clap::Subcommand)]
pub enum BenchCommand {
    /// Pod-to-pod through the pod-veth datapath against a raw veth pair.
    Demo(RunArgs),
    /// The CNI (agents + plugin) against a raw veth pair and the reference bridge plugin.
    Cni(RunArgs),
    /// The NBD server against nbdkit and qemu-nbd, with fio's nbd engine.
    Nbd(RunArgs),
    /// The L4 load balancer against HAProxy (TCP mode) and direct connections, standalone and
    /// on a provisioned cluster's edge hosts (direct server return, failover).
    Lb(crate::lb_edge_bench::LbBenchArgs),
    /// NetworkPolicy: 0/1,000/10,000 rules and apply->enforced latency, against iptables.
    Policy(RunArgs),
    /// The supervisor API on redb and etcd, beside `etcdctl check perf`.
    Api(slipway_supervisor::bench::BenchApiArgs),
    /// Clusters of netns hosts: apply → Ready, scale, remediation, delete, memory.
    Cluster(crate::cluster_bench::ClusterBenchArgs),
    /// Pod start latency on a provisioned cluster (create → Running) beside `podman run`.
    Pods(crate::pods_bench::PodsBenchArgs),
    /// Volumes of a provisioned cluster: claim → Bound, Pod with a volume → Running, fio in a
    /// Pod beside a loop device and the raw file.
    Csi(crate::csi_bench::CsiBenchArgs),
}

/// Runs one suite.
pub fn dispatch(command: BenchCommand) -> anyhow::Result<()> {
    match command {
        BenchCommand::Demo(args) => run(Suite::Demo, args),
        BenchCommand::Cni(args) => run(Suite::Cni, args),
        BenchCommand::Nbd(args) => run(Suite::Nbd, args),
        BenchCommand::Lb(args) => args.run(),
        BenchCommand::Policy(args) => run(Suite::Policy, args),
        BenchCommand::Api(args) => args.run(),
        BenchCommand::Cluster(args) => args.run(),
        BenchCommand::Pods(args) => args.run(),
        BenchCommand::Csi(args) => args.run(),
    }
}

/// The suites that take [`RunArgs`].
#[derive(Debug, Clone, Copy)]
pub enum Suite {
    /// Pod-to-pod through the pod-veth datapath against a raw veth pair.
    Demo,
    /// The CNI (agents + plugin) against a raw veth pair and the reference bridge plugin.
    Cni,
    /// The NBD server against nbdkit and qemu-nbd, with fio's nbd engine.
    Nbd,
    /// NetworkPolicy in the datapath against the same rules in iptables.
    Policy,
}

impl RunArgs {
    /// The load balancer suite's options from these.
    pub(crate) fn lb_options(&self) -> lb::Options {
        lb::Options {
            runs: self.runs as usize,
            duration: Duration::from_secs(self.seconds),
            ..lb::Options::default()
        }
    }

    pub(crate) fn print_and_write(
        &self,
        suite: &str,
        records: &[report::Record],
    ) -> anyhow::Result<()> {
        print_and_write(self, suite, records)
    }
}

#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// Runs per side; Slipway and the baseline alternate and the medians are reported.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..=1000))]
    runs: u64,
    /// Whole seconds of each throughput run.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u64).range(1..=3600))]
    seconds: u64,
    /// Where <suite>.jsonl is written.
    #[arg(long, default_value = report::DEFAULT_OUT_DIR)]
    out_dir: PathBuf,
}

pub fn run(suite: Suite, args: RunArgs) -> anyhow::Result<()> {
    if !nix::unistd::Uid::effective().is_root() {
        bail!("this needs root: it creates network namespaces and loads BPF programs");
    }
    match suite {
        Suite::Demo => {
            let options = demo::Options {
                runs: args.runs as usize,
                iperf_duration: Duration::from_secs(args.seconds),
            };
            let outcome = demo::run(options)?;
            let path = report::write_jsonl(&args.out_dir, demo::SUITE, &outcome.records)?;
            println!();
            print!("{}", report::table(&outcome.records));
            println!();
            println!(
                "datapath counters (packets / bytes redirected, against what the sending pod's eth0 sent):"
            );
            for (label, (counted, sent)) in [
                ("pod a -> pod b", outcome.a_to_b),
                ("pod b -> pod a", outcome.b_to_a),
            ] {
                let verdict = if counted == sent { "match" } else { "MISMATCH" };
                println!(
                    "  {label}: {} pkts / {} bytes counted, {} pkts / {} bytes sent: {verdict}",
                    counted.packets, counted.bytes, sent.packets, sent.bytes
                );
            }
            println!(
                "underlay round trip host 1 -> host 2: {:.3} ms",
                outcome.underlay_rtt_ms
            );
            println!("wrote {}", path.display());
            ensure!(
                outcome.a_to_b.0 == outcome.a_to_b.1 && outcome.b_to_a.0 == outcome.b_to_a.1,
                "the datapath's counters disagree with what the pods sent"
            );
        }
        Suite::Cni => {
            let options = cni::Options {
                runs: args.runs as usize,
                iperf_duration: Duration::from_secs(args.seconds),
                sockperf_duration: Duration::from_secs(args.seconds),
                ..cni::Options::default()
            };
            let records = cni::run(options)?;
            print_and_write(&args, cni::SUITE, &records)?;
        }
        Suite::Nbd => {
            let options = nbd::Options {
                runs: args.runs as usize,
                runtime: Duration::from_secs(args.seconds),
                ..nbd::Options::default()
            };
            let records = nbd::run(&options)?;
            print_and_write(&args, nbd::SUITE, &records)?;
        }
        Suite::Policy => {
            let options = policy::Options {
                runs: args.runs as usize,
                iperf_duration: Duration::from_secs(args.seconds),
                sockperf_duration: Duration::from_secs(args.seconds),
                ..policy::Options::default()
            };
            let records = policy::run(options)?;
            print_and_write(&args, policy::SUITE, &records)?;
        }
    }
    Ok(())
}

fn print_and_write(args: &RunArgs, suite: &str, records: &[report::Record]) -> anyhow::Result<()> {
    let path = report::write_jsonl(&args.out_dir, suite, records)?;
    println!();
    print!("{}", report::table(records));
    println!("wrote {}", path.display());
    Ok(())
}
