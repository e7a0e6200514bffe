//! The CNI suite (`slipway bench cni`, issue 3): pod↔pod TCP throughput (iperf3) and TCP
//! round-trip latency (sockperf ping-pong) on one host and across hosts, and CNI ADD/DEL latency
//! as a runtime sees it, for Slipway beside a raw veth pair and Debian's `bridge` + `host-local`
//! plugins with `ipMasq`, all in one run with the sides alternating (A B C A B C ...).
//!
//! Every host is a namespace of a test [`World`]: the agents, the bridge plugin's bridge and its
//! iptables rules, and every pod live inside the world's namespaces; the root namespace is only
//! read (to prove that nothing leaked into it).

use std::fs;
use std::io::Write as _;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};
use serde_json::{Value, json};
use slipway_dataplane::netns;
use slipway_dataplane::world::cgroup::Cgroup;
use slipway_dataplane::world::traffic::{iperf3_tcp, ping};
use slipway_dataplane::world::{Netns, World};
use slipway_local::LocalClient;

use crate::report::{Metric, Record, Samples};

pub const SUITE: &str = "cni";
const RAW_VETH: &str = "raw-veth";
pub(crate) const BRIDGE_PLUGIN: &str = "bridge-plugin";
/// Cross-host raw baseline: host to host over the underlay (each host's `eth0` is a veth into
/// the underlay bridge), the path every cross-host pod packet rides on.
const HOST_UNDERLAY: &str = "host-underlay";
/// Cross-host tunnel reference: the same two underlay hosts joined by a plain kernel VXLAN
/// device (no pod veth, no BPF, outer UDP checksum off as Slipway sends it), so the cost of
/// the encapsulation itself is told apart from what Slipway adds around it.
const KERNEL_VXLAN: &str = "kernel-vxlan";
/// The kernel VXLAN reference's VNI, UDP port (apart from the agents' 4789) and subnet.
const KERNEL_VXLAN_VNI: &str = "42";
const KERNEL_VXLAN_PORT: &str = "4790";
const KERNEL_VXLAN_NET: [u8; 3] = [10, 97, 0];

/// Where Debian's containernetworking-plugins live.
const REFERENCE_PLUGINS: &str = "/usr/lib/cni";
const SLIPWAY_NETWORK: &str = "slipway-bench";
const BRIDGE_NETWORK: &str = "slipway-bench-bridge";
/// Named apart from the usual `cni0`, so a leak into the root namespace is unambiguous.
const BRIDGE_DEVICE: &str = "slwbr0";
const SOCKPERF_PORT: u16 = 11111;
const STEPS: u32 = 9;

/// Hosts of the world and what runs on them.
const VXLAN_HOSTS: [usize; 2] = [1, 2];
const NATIVE_HOSTS: [usize; 2] = [3, 4];
const BRIDGE_HOSTS: [usize; 2] = [5, 6];
const UNDERLAY_HOSTS: [usize; 2] = [7, 8];

/// How long and how often to measure.
#[derive(Debug, Clone, Copy)]
pub struct Options {
    /// Runs per side of the traffic metrics (the sides alternate).
    pub runs: usize,
    /// Length of each iperf3 run.
    pub iperf_duration: Duration,
    /// Length of each sockperf ping-pong run (its first 400 ms are warm-up).
    pub sockperf_duration: Duration,
    /// Pods ADDed and DELeted per plugin for the CNI latency metrics.
    pub pods: usize,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            runs: 3,
            iperf_duration: Duration::from_secs(2),
            sockperf_duration: Duration::from_secs(2),
            pods: 200,
        }
    }
}

/// Runs the suite, printing progress (and the bridge-nf-call-iptables setting) to stderr.
pub fn run(options: Options) -> anyhow::Result<Vec<Record>> {
    ensure!(options.runs > 0, "runs: must be at least 1");
    ensure!(options.pods > 0, "pods: must be at least 1");
    let step = |n: u32, what: &str| eprintln!("[{n}/{STEPS}] {what}");
    let binaries = Binaries::beside_current_exe()?;
    check_reference_plugins()?;

    step(
        1,
        "building an 8-host world (network namespaces, underlay bridge)",
    );
    let bench = Bench::new(binaries, 8)?;
    let nf = bench.bridge_nf_call_iptables(BRIDGE_HOSTS[0])?;
    eprintln!("      {nf}");

    step(
        2,
        "starting agents: VXLAN on hosts 1-2, native routing on 3-4",
    );
    let vxlan = bench.cluster("vxlan", "10.244", &VXLAN_HOSTS)?;
    let native = bench.cluster("native", "10.245", &NATIVE_HOSTS)?;

    step(
        3,
        "creating pods (plugins exec'd as a runtime does), raw pairs, underlay routes",
    );
    let sa = bench.slipway_pod(&vxlan, 0, "sa")?;
    let sb = bench.slipway_pod(&vxlan, 0, "sb")?;
    let sc = bench.slipway_pod(&vxlan, 1, "sc")?;
    let na = bench.slipway_pod(&native, 0, "na")?;
    let nc = bench.slipway_pod(&native, 1, "nc")?;
    for (host, peer) in [
        (BRIDGE_HOSTS[0], BRIDGE_HOSTS[1]),
        (BRIDGE_HOSTS[1], BRIDGE_HOSTS[0]),
    ] {
        // The bridge plugin knows nothing of other hosts: route the peer's pod subnet via it.
        let via = bench.world.host(peer).underlay_ip.to_string();
        bench
            .world
            .host(host)
            .netns
            .ip(&["route", "add", &bridge_subnet(peer), "via", &via])?;
    }
    let ba = bench.bridge_pod(BRIDGE_HOSTS[0], "ba")?;
    let bb = bench.bridge_pod(BRIDGE_HOSTS[0], "bb")?;
    let bc = bench.bridge_pod(BRIDGE_HOSTS[1], "bc")?;
    bench.check_root_namespace_untouched()?;
    let (raw_a, raw_b) = bench.world.add_raw_pair("raw")?;
    let raw_b_ip = Ipv4Addr::new(10, 98, 0, 2);
    let under_a = bench.world.host(UNDERLAY_HOSTS[0]).netns.clone();
    let under_b = bench.world.host(UNDERLAY_HOSTS[1]);
    let kernel_vxlan_b_ip = bench.kernel_vxlan(UNDERLAY_HOSTS)?;

    let same_host = [
        Pair::new("slipway", &sa.netns, &sb.netns, sb.ip),
        Pair::new(RAW_VETH, &raw_a, &raw_b, raw_b_ip),
        Pair::new(BRIDGE_PLUGIN, &ba.netns, &bb.netns, bb.ip),
    ];
    let cross_host = [
        Pair::new("slipway-vxlan", &sa.netns, &sc.netns, sc.ip),
        Pair::new("slipway-native", &na.netns, &nc.netns, nc.ip),
        Pair::new(HOST_UNDERLAY, &under_a, &under_b.netns, under_b.underlay_ip),
        Pair::new(BRIDGE_PLUGIN, &ba.netns, &bc.netns, bc.ip),
        Pair::new(KERNEL_VXLAN, &under_a, &under_b.netns, kernel_vxlan_b_ip),
    ];
    let mut mtus = Vec::new();
    for pair in same_host.iter().chain(&cross_host) {
        pair.check_reachable()?;
        mtus.push(format!("{} {}", pair.label, pair.client_mtu()?));
    }
    eprintln!("      client MTUs: {}", mtus.join(", "));

    let mut records = Vec::new();
    let throughput = |pair: &Pair<'_>| pair.throughput_gbps(options.iperf_duration);
    let rtt = |pair: &Pair<'_>| {
        sockperf_ping_pong(pair, options.sockperf_duration).map(|run| run.rtt_p50_us)
    };

    step(
        4,
        &format!(
            "throughput, same host: {} runs of slipway, raw veth, bridge",
            options.runs
        ),
    );
    let samples = alternate(options.runs, &same_host, throughput)?;
    records.extend(compare(
        &samples,
        "pod_to_pod_tcp_same_host",
        "Gbit/s",
        true,
    )?);

    step(
        5,
        &format!(
            "throughput, cross host: {} runs of vxlan, native, underlay, bridge, kernel vxlan",
            options.runs
        ),
    );
    let samples = alternate(options.runs, &cross_host, throughput)?;
    records.extend(compare_cross(
        &samples,
        "pod_to_pod_tcp_cross",
        "Gbit/s",
        true,
    )?);

    step(
        6,
        &format!(
            "TCP RTT p50 (sockperf ping-pong), same host: {} runs",
            options.runs
        ),
    );
    let samples = alternate(options.runs, &same_host, rtt)?;
    records.extend(compare(
        &samples,
        "pod_to_pod_rtt_p50_same_host",
        "µs",
        false,
    )?);

    step(
        7,
        &format!(
            "TCP RTT p50 (sockperf ping-pong), cross host: {} runs",
            options.runs
        ),
    );
    let samples = alternate(options.runs, &cross_host, rtt)?;
    records.extend(compare_cross(
        &samples,
        "pod_to_pod_rtt_p50_cross",
        "µs",
        false,
    )?);

    step(
        8,
        &format!(
            "CNI ADD then DEL of {} pods per plugin, alternating slipway and bridge",
            options.pods
        ),
    );
    records.extend(bench.add_del_latency(&vxlan, options.pods)?);
    bench.check_root_namespace_untouched()?;

    step(9, "tearing down (agents, namespaces, temp dirs)");
    drop(bench);
    eprintln!("{nf}");
    Ok(records)
}

/// Fails unless Debian's `bridge` and `host-local` plugins are installed.
pub(crate) fn check_reference_plugins() -> anyhow::Result<()> {
    ensure!(
        Path::new(REFERENCE_PLUGINS).join("bridge").exists()
            && Path::new(REFERENCE_PLUGINS).join("host-local").exists(),
        "{REFERENCE_PLUGINS}/bridge and host-local are missing: install Debian's \
         containernetworking-plugins (scripts/bootstrap.sh)"
    );
    Ok(())
}

/// The `slipway` (agent) and `slipway-cni` (plugin) binaries.
#[derive(Debug)]
pub(crate) struct Binaries {
    slipway: PathBuf,
    plugin: PathBuf,
}

impl Binaries {
    /// Both binaries from the directory of the running executable (the target dir).
    pub(crate) fn beside_current_exe() -> anyhow::Result<Self> {
        let exe = std::env::current_exe().context("locating the running executable")?;
        let dir = exe
            .parent()
            .context("the running executable has no directory")?;
        let find = |name: &str| -> anyhow::Result<PathBuf> {
            let path = dir.join(name);
            ensure!(
                path.exists(),
                "{} is missing: build it with `cargo build --release -p slipway -p slipway-cni`",
                path.display()
            );
            Ok(path)
        };
        Ok(Self {
            slipway: find("slipway")?,
            plugin: find("slipway-cni")?,
        })
    }
}

/// The world and everything the suite started in it; torn down on drop.
#[derive(Debug)]
pub(crate) struct Bench {
    binaries: Binaries,
    /// Temp dir: the plugin symlink, agent data dirs, sockets and logs, host-local state.
    dir: PathBuf,
    cni_bin: PathBuf,
    agents: Mutex<Vec<Child>>,
    /// Each agent's cgroup (socket-level services attach there), removed after the agents.
    cgroups: Mutex<Vec<Cgroup>>,
    /// Sandbox namespaces (named `<world>-<label>`, so the world's leak check sees them).
    sandboxes: Mutex<Vec<Netns>>,
    pub(crate) world: World,
}

impl Drop for Bench {
    fn drop(&mut self) {
        for agent in self.agents.get_mut().unwrap_or_else(|p| p.into_inner()) {
            let _ = agent.kill();
            let _ = agent.wait();
        }
        self.cgroups
            .get_mut()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
        for sandbox in self
            .sandboxes
            .get_mut()
            .unwrap_or_else(|p| p.into_inner())
            .drain(..)
            .rev()
        {
            sandbox.kill_all();
            let _ = Command::new("ip")
                .args(["netns", "del", sandbox.name()])
                .output();
        }
        let _ = fs::remove_dir_all(&self.dir);
        // The world's own Drop (it is a field) deletes the hosts and the underlay.
    }
}

/// Slipway agents on a set of hosts, sharing a pod CIDR.
#[derive(Debug)]
pub(crate) struct Cluster {
    pub(crate) hosts: Vec<ClusterHost>,
}

#[derive(Debug)]
pub(crate) struct ClusterHost {
    netns: Netns,
    conf: Value,
    /// The agent's API socket.
    pub(crate) socket: PathBuf,
}

/// A pod made by a plugin's ADD.
#[derive(Debug)]
pub(crate) struct PodRef {
    pub(crate) netns: Netns,
    pub(crate) ip: Ipv4Addr,
}

impl Bench {
    /// A world of `hosts` hosts, with no agents and no pods yet.
    pub(crate) fn new(binaries: Binaries, hosts: usize) -> anyhow::Result<Self> {
        let world = World::builder()
            .hosts(hosts)
            .build()
            .context("building the world")?;
        let dir = std::env::temp_dir().join(world.name());
        let cni_bin = dir.join("cni-bin");
        let bench = Self {
            binaries,
            dir,
            cni_bin,
            agents: Mutex::new(Vec::new()),
            cgroups: Mutex::new(Vec::new()),
            sandboxes: Mutex::new(Vec::new()),
            world,
        };
        fs::create_dir_all(&bench.cni_bin)
            .with_context(|| format!("creating {}", bench.cni_bin.display()))?;
        // Runtimes find a plugin as <CNI_PATH>/<type>.
        std::os::unix::fs::symlink(&bench.binaries.plugin, bench.cni_bin.join("slipway"))
            .context("linking the plugin into CNI_PATH")?;
        Ok(bench)
    }

    /// bridge-nf-call-iptables in a bridge host's namespace (where the bridge plugin's traffic
    /// is bridged; the sysctl is per namespace) and in the root namespace.
    pub(crate) fn bridge_nf_call_iptables(&self, host: usize) -> anyhow::Result<String> {
        const KEY: &str = "/proc/sys/net/bridge/bridge-nf-call-iptables";
        let host = self.world.host(host).netns.exec(&["cat", KEY])?;
        let host = if host.status.success() {
            String::from_utf8_lossy(&host.stdout).trim().to_owned()
        } else {
            "absent (br_netfilter not loaded)".to_owned()
        };
        let root = fs::read_to_string(KEY)
            .map(|v| v.trim().to_owned())
            .unwrap_or_else(|_| "absent (br_netfilter not loaded)".to_owned());
        Ok(format!(
            "bridge-nf-call-iptables: {host} in the bridge plugin's host namespace, {root} in the \
             root namespace{}",
            if host == "1" {
                " (bridged pod traffic crosses the host's iptables FORWARD chain)"
            } else {
                ""
            }
        ))
    }

    /// Starts an agent on each of `hosts` (pod CIDR `<prefix>.0.0/16`, host `i` owning
    /// `<prefix>.<i>.0/24`) and tells each agent about all of them.
    pub(crate) fn cluster(
        &self,
        routing: &str,
        prefix: &str,
        hosts: &[usize],
    ) -> anyhow::Result<Cluster> {
        let pod_cidr = format!("{prefix}.0.0/16");
        let mut members = Vec::new();
        let mut table = Vec::new();
        for &index in hosts {
            let host = self.world.host(index);
            let block = format!("{prefix}.{index}.0/24");
            let data_dir = self.dir.join(format!("h{index}"));
            let socket = self.dir.join(format!("h{index}.sock"));
            let bpffs = self.world.bpffs_dir().join(format!("h{index}"));
            let log = self.dir.join(format!("agent-h{index}.log"));
            let cgroup = Cgroup::create(&self.world, &format!("h{index}"))?;
            let args: Vec<String> = vec![
                "agent".into(),
                "--pod-cidr".into(),
                pod_cidr.clone(),
                "--host-block".into(),
                block.clone(),
                "--routing".into(),
                routing.into(),
                "--bpffs".into(),
                path_str(&bpffs)?.into(),
                "--data-dir".into(),
                path_str(&data_dir)?.into(),
                "--socket".into(),
                path_str(&socket)?.into(),
                "--cgroup".into(),
                path_str(cgroup.path())?.into(),
            ];
            self.cgroups
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(cgroup);
            self.start_agent(&host.netns, &args, &socket, &log)?;
            table.push(json!({
                "name": format!("h{index}"),
                "address": host.underlay_ip,
                "podBlock": block,
            }));
            members.push(ClusterHost {
                netns: host.netns.clone(),
                conf: json!({
                    "cniVersion": "1.1.0",
                    "name": SLIPWAY_NETWORK,
                    "type": "slipway",
                    "podCIDR": pod_cidr,
                    "dataDir": data_dir,
                }),
                socket,
            });
        }
        for (index, member) in hosts.iter().zip(&members) {
            let hosts_body = serde_json::to_vec(&Value::Array(table.clone()))?;
            let answer = LocalClient::new(&member.socket)
                .request("PUT", "/v1/hosts", Some(&hosts_body))
                .with_context(|| format!("agent on host {index}: PUT /v1/hosts"))?;
            ensure!(
                answer.status == 200,
                "agent on host {index}: PUT /v1/hosts: {} {}",
                answer.status,
                answer.text()
            );
        }
        Ok(Cluster { hosts: members })
    }

    /// Joins the two underlay hosts `hosts` with a plain kernel VXLAN device `kvx0` each
    /// (unicast to the peer, outer UDP checksum off, MTU from `eth0` minus the encapsulation)
    /// at `10.97.0.<host>/24`; returns the second host's tunnel address.
    fn kernel_vxlan(&self, hosts: [usize; 2]) -> anyhow::Result<Ipv4Addr> {
        let ip_of = |host: usize| -> anyhow::Result<Ipv4Addr> {
            let octet = u8::try_from(host).context("kernel vxlan: host index above 255")?;
            let [a, b, c] = KERNEL_VXLAN_NET;
            Ok(Ipv4Addr::new(a, b, c, octet))
        };
        for (host, peer) in [(hosts[0], hosts[1]), (hosts[1], hosts[0])] {
            let netns = &self.world.host(host).netns;
            let local = self.world.host(host).underlay_ip.to_string();
            let remote = self.world.host(peer).underlay_ip.to_string();
            netns.ip(&[
                "link",
                "add",
                "kvx0",
                "type",
                "vxlan",
                "id",
                KERNEL_VXLAN_VNI,
                "remote",
                &remote,
                "local",
                &local,
                "dstport",
                KERNEL_VXLAN_PORT,
                "dev",
                "eth0",
                "noudpcsum",
            ])?;
            netns.ip(&[
                "addr",
                "add",
                &format!("{}/24", ip_of(host)?),
                "dev",
                "kvx0",
            ])?;
            netns.ip(&["link", "set", "kvx0", "up"])?;
        }
        ip_of(hosts[1])
    }

    /// Starts `slipway <args>` in `host` (its network namespace only, so bpffs stays visible)
    /// and waits until its API answers on `socket`.
    fn start_agent(
        &self,
        host: &Netns,
        args: &[String],
        socket: &Path,
        log: &Path,
    ) -> anyhow::Result<()> {
        let out = fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
        let err = out.try_clone()?;
        let slipway = self.binaries.slipway.clone();
        let child = netns::run_in(host.name(), move || {
            Command::new(slipway)
                .args(args)
                .env("RUST_BACKTRACE", "0")
                .stdin(Stdio::null())
                .stdout(out)
                .stderr(err)
                .spawn()
        })?
        .context("starting slipway agent")?;
        let mut agents = self.agents.lock().unwrap_or_else(|p| p.into_inner());
        agents.push(child);
        let child = agents.last_mut().context("agent just pushed")?;
        let deadline = Instant::now() + Duration::from_secs(30);
        let agent = LocalClient::new(socket).with_timeout(Duration::from_secs(10));
        while agent.request("GET", "/v1/status", None).is_err() {
            let log_text = || {
                let text = fs::read_to_string(log).unwrap_or_default();
                text.lines().take(20).collect::<Vec<_>>().join("\n")
            };
            if let Some(status) = child.try_wait()? {
                bail!(
                    "slipway agent in {} exited ({status}):\n{}",
                    host.name(),
                    log_text()
                );
            }
            ensure!(
                Instant::now() < deadline,
                "slipway agent in {} did not answer within 30 s:\n{}",
                host.name(),
                log_text()
            );
            std::thread::sleep(Duration::from_millis(25));
        }
        Ok(())
    }

    /// An empty sandbox namespace `<world>-<label>`, deleted with the bench.
    pub(crate) fn sandbox(&self, label: &str) -> anyhow::Result<Netns> {
        let ns = Netns::named(format!("{}-{label}", self.world.name()));
        let output = Command::new("ip")
            .args(["netns", "add", ns.name()])
            .output()
            .context("running ip netns add")?;
        ensure!(
            output.status.success(),
            "ip netns add {}: {}",
            ns.name(),
            String::from_utf8_lossy(&output.stderr).trim()
        );
        self.sandboxes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(ns.clone());
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    pub(crate) fn slipway_pod(
        &self,
        cluster: &Cluster,
        host: usize,
        label: &str,
    ) -> anyhow::Result<PodRef> {
        let member = &cluster.hosts[host];
        let netns = self.sandbox(label)?;
        let (_, result) = self.slipway_exec(member, "ADD", label, &netns)?;
        Ok(PodRef {
            ip: result_ip(&result).with_context(|| format!("slipway ADD {label}: {result}"))?,
            netns,
        })
    }

    pub(crate) fn bridge_pod(&self, host: usize, label: &str) -> anyhow::Result<PodRef> {
        let netns = self.sandbox(label)?;
        let (_, result) = self.bridge_exec(host, "ADD", label, &netns)?;
        Ok(PodRef {
            ip: result_ip(&result).with_context(|| format!("bridge ADD {label}: {result}"))?,
            netns,
        })
    }

    fn slipway_exec(
        &self,
        member: &ClusterHost,
        command: &str,
        label: &str,
        sandbox: &Netns,
    ) -> anyhow::Result<(Duration, Value)> {
        let cni_path = format!("{}:{REFERENCE_PLUGINS}", self.cni_bin.display());
        exec_plugin(&PluginRun {
            host: &member.netns,
            plugin: &self.cni_bin.join("slipway"),
            cni_path: &cni_path,
            command,
            container_id: &format!("{label}-{}", self.world.name()),
            sandbox,
            conf: &member.conf,
        })
    }

    fn bridge_exec(
        &self,
        host: usize,
        command: &str,
        label: &str,
        sandbox: &Netns,
    ) -> anyhow::Result<(Duration, Value)> {
        let conf = json!({
            "cniVersion": "1.0.0",
            "name": BRIDGE_NETWORK,
            "type": "bridge",
            "bridge": BRIDGE_DEVICE,
            "isGateway": true,
            "ipMasq": true,
            "ipam": {
                "type": "host-local",
                "ranges": [[{ "subnet": bridge_subnet(host) }]],
                "routes": [{ "dst": "0.0.0.0/0" }],
                "dataDir": self.dir.join(format!("host-local-h{host}")),
            },
        });
        exec_plugin(&PluginRun {
            host: &self.world.host(host).netns,
            plugin: &Path::new(REFERENCE_PLUGINS).join("bridge"),
            cni_path: REFERENCE_PLUGINS,
            command,
            container_id: &format!("{label}-{}", self.world.name()),
            sandbox,
            conf: &conf,
        })
    }

    /// ADDs `pods` pods with each plugin (Slipway on the VXLAN cluster's first host, the bridge
    /// plugin on the first bridge host), alternating, then DELs them all, alternating.
    fn add_del_latency(&self, cluster: &Cluster, pods: usize) -> anyhow::Result<Vec<Record>> {
        let member = &cluster.hosts[0];
        let bridge_host = BRIDGE_HOSTS[0];
        let mut sandboxes = Vec::with_capacity(pods);
        for i in 0..pods {
            sandboxes.push((
                self.sandbox(&format!("ls{i}"))?,
                self.sandbox(&format!("lb{i}"))?,
            ));
        }
        let mut add = Samples::default();
        for (i, (s, b)) in sandboxes.iter().enumerate() {
            add.slipway.push(ms(self
                .slipway_exec(member, "ADD", &format!("ls{i}"), s)?
                .0));
            add.baseline.push(ms(self
                .bridge_exec(bridge_host, "ADD", &format!("lb{i}"), b)?
                .0));
            if (i + 1) % 50 == 0 {
                eprintln!("      ADD {}/{pods}", i + 1);
            }
        }
        let mut del = Samples::default();
        for (i, (s, b)) in sandboxes.iter().enumerate() {
            del.slipway.push(ms(self
                .slipway_exec(member, "DEL", &format!("ls{i}"), s)?
                .0));
            del.baseline.push(ms(self
                .bridge_exec(bridge_host, "DEL", &format!("lb{i}"), b)?
                .0));
            if (i + 1) % 50 == 0 {
                eprintln!("      DEL {}/{pods}", i + 1);
            }
        }
        // The floor under ADD and DEL: exec'ing each plugin for VERSION, which touches nothing.
        let mut version = Samples::default();
        let (s, b) = &sandboxes[0];
        for _ in 0..50 {
            version
                .slipway
                .push(ms(self.slipway_exec(member, "VERSION", "ls0", s)?.0));
            version
                .baseline
                .push(ms(self.bridge_exec(bridge_host, "VERSION", "lb0", b)?.0));
        }
        let p50 = |v: &[f64]| crate::report::median(v).unwrap_or_default();
        eprintln!(
            "      exec floor (CNI VERSION, 50 each) p50: slipway {:.2} ms, bridge {:.2} ms",
            p50(&version.slipway),
            p50(&version.baseline)
        );
        let metric = |name| Metric {
            suite: SUITE,
            name,
            unit: "ms",
            higher_is_better: false,
            baseline: BRIDGE_PLUGIN,
        };
        Ok(vec![
            add.record(metric("cni_add_p50"))?,
            percentile_record(&add, 99.0, metric("cni_add_p99"))?,
            del.record(metric("cni_del_p50"))?,
            percentile_record(&del, 99.0, metric("cni_del_p99"))?,
        ])
    }

    /// Fails if the bridge plugin's bridge or iptables rules appeared in the root namespace.
    pub(crate) fn check_root_namespace_untouched(&self) -> anyhow::Result<()> {
        let link = Command::new("ip")
            .args(["-o", "link", "show", "dev", BRIDGE_DEVICE])
            .output()
            .context("running ip link show")?;
        ensure!(
            !link.status.success(),
            "{BRIDGE_DEVICE} exists in the root namespace: the bridge plugin ran outside its host"
        );
        if let Ok(rules) = Command::new("iptables-save").output() {
            ensure!(
                !String::from_utf8_lossy(&rules.stdout).contains(BRIDGE_NETWORK),
                "iptables rules of {BRIDGE_NETWORK} exist in the root namespace"
            );
        }
        Ok(())
    }
}

/// One plugin execution as a runtime does it: in the host's namespace, CNI_* in the
/// environment, the configuration on stdin.
struct PluginRun<'a> {
    host: &'a Netns,
    plugin: &'a Path,
    cni_path: &'a str,
    command: &'a str,
    container_id: &'a str,
    sandbox: &'a Netns,
    conf: &'a Value,
}

/// Execs the plugin and returns the wall-clock time from spawn to exit, and its stdout. The
/// plugin is started from a thread inside the host's namespace (no nsenter in the timing).
fn exec_plugin(run: &PluginRun<'_>) -> anyhow::Result<(Duration, Value)> {
    let netns_path = netns::path(run.sandbox.name());
    let conf = run.conf.to_string();
    let output = netns::run_in(run.host.name(), || -> std::io::Result<_> {
        let start = Instant::now();
        let mut child = Command::new(run.plugin)
            .env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .env("CNI_COMMAND", run.command)
            .env("CNI_CONTAINERID", run.container_id)
            .env("CNI_NETNS", &netns_path)
            .env("CNI_IFNAME", "eth0")
            .env("CNI_PATH", run.cni_path)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        if let Some(mut stdin) = child.stdin.take() {
            // A plugin may exit without reading its configuration (VERSION does).
            match stdin.write_all(conf.as_bytes()) {
                Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => return Err(e),
                _ => {}
            }
        }
        let output = child.wait_with_output()?;
        Ok((start.elapsed(), output))
    })?
    .with_context(|| format!("running {}", run.plugin.display()))?;
    let (elapsed, output) = output;
    let text = String::from_utf8_lossy(&output.stdout);
    ensure!(
        output.status.success(),
        "{} {} {}: {} {}{}",
        run.plugin.display(),
        run.command,
        run.container_id,
        output.status,
        text.trim(),
        String::from_utf8_lossy(&output.stderr).trim()
    );
    let value = if text.trim().is_empty() {
        Value::Null
    } else {
        serde_json::from_str(&text).with_context(|| {
            format!(
                "{} {}: stdout is not JSON: {text}",
                run.plugin.display(),
                run.command
            )
        })?
    };
    Ok((elapsed, value))
}

/// The first address of a CNI result.
fn result_ip(result: &Value) -> Option<Ipv4Addr> {
    result["ips"][0]["address"]
        .as_str()?
        .split('/')
        .next()?
        .parse()
        .ok()
}

/// The bridge plugin's pod subnet on host `host`.
fn bridge_subnet(host: usize) -> String {
    format!("10.88.{host}.0/24")
}

/// One measured path: a client namespace, a server namespace and the server's address.
pub(crate) struct Pair<'a> {
    pub(crate) label: &'static str,
    pub(crate) client: &'a Netns,
    pub(crate) server: &'a Netns,
    pub(crate) server_ip: Ipv4Addr,
}

impl<'a> Pair<'a> {
    pub(crate) fn new(
        label: &'static str,
        client: &'a Netns,
        server: &'a Netns,
        server_ip: Ipv4Addr,
    ) -> Self {
        Self {
            label,
            client,
            server,
            server_ip,
        }
    }

    /// TCP throughput client -> server over `duration` (iperf3), in Gbit/s.
    pub(crate) fn throughput_gbps(&self, duration: Duration) -> anyhow::Result<f64> {
        Ok(iperf3_tcp(self.client, self.server, self.server_ip, duration)?.received_bps / 1e9)
    }

    /// The MTU of the device the client's route to the server leaves by.
    fn client_mtu(&self) -> anyhow::Result<u64> {
        let server = self.server_ip.to_string();
        let text = self.client.ip(&["-j", "route", "get", &server])?;
        let routes: Value = serde_json::from_str(&text).context("parsing ip -j route get")?;
        let dev = routes[0]["dev"]
            .as_str()
            .with_context(|| format!("{}: no route to {server}: {text}", self.label))?;
        let text = self.client.ip(&["-j", "link", "show", "dev", dev])?;
        let links: Value = serde_json::from_str(&text).context("parsing ip -j link")?;
        links[0]["mtu"]
            .as_u64()
            .with_context(|| format!("{}: {dev} has no MTU: {text}", self.label))
    }

    pub(crate) fn check_reachable(&self) -> anyhow::Result<()> {
        let report = ping(self.client, self.server_ip, 3, Duration::from_millis(20))?;
        ensure!(
            report.received == report.transmitted,
            "{}: {} -> {} answered {} of {} pings",
            self.label,
            self.client.name(),
            self.server_ip,
            report.received,
            report.transmitted
        );
        Ok(())
    }
}

/// Measures every pair once per run, in order (A B C A B C ...); samples per pair.
fn alternate(
    runs: usize,
    pairs: &[Pair<'_>],
    measure: impl Fn(&Pair<'_>) -> anyhow::Result<f64>,
) -> anyhow::Result<Vec<Vec<f64>>> {
    let mut samples = vec![Vec::with_capacity(runs); pairs.len()];
    for run in 0..runs {
        for (pair, out) in pairs.iter().zip(&mut samples) {
            let value = measure(pair).with_context(|| format!("{} run {run}", pair.label))?;
            out.push(value);
        }
    }
    Ok(samples)
}

/// Same-host samples ordered [slipway, raw veth, bridge]: one record per baseline.
fn compare(
    samples: &[Vec<f64>],
    name: &str,
    unit: &str,
    higher_is_better: bool,
) -> anyhow::Result<Vec<Record>> {
    [(1, RAW_VETH), (2, BRIDGE_PLUGIN)]
        .into_iter()
        .map(|(i, baseline)| {
            Samples {
                slipway: samples[0].clone(),
                baseline: samples[i].clone(),
            }
            .record(Metric {
                suite: SUITE,
                name,
                unit,
                higher_is_better,
                baseline,
            })
        })
        .collect()
}

/// Cross-host samples ordered [vxlan, native, underlay, bridge, kernel vxlan]: each routing
/// mode against the underlay and the bridge plugin, as `<name>_vxlan` and `<name>_native`, and
/// VXLAN against the plain kernel VXLAN device.
fn compare_cross(
    samples: &[Vec<f64>],
    name: &str,
    unit: &str,
    higher_is_better: bool,
) -> anyhow::Result<Vec<Record>> {
    let mut records = Vec::new();
    for (s, mode) in [(0, "vxlan"), (1, "native")] {
        let metric_name = format!("{name}_{mode}");
        let baselines: &[(usize, &str)] = if mode == "vxlan" {
            &[(2, HOST_UNDERLAY), (3, BRIDGE_PLUGIN), (4, KERNEL_VXLAN)]
        } else {
            &[(2, HOST_UNDERLAY), (3, BRIDGE_PLUGIN)]
        };
        for &(b, baseline) in baselines {
            records.push(
                Samples {
                    slipway: samples[s].clone(),
                    baseline: samples[b].clone(),
                }
                .record(Metric {
                    suite: SUITE,
                    name: &metric_name,
                    unit,
                    higher_is_better,
                    baseline,
                })?,
            );
        }
    }
    Ok(records)
}

/// A record of the `p`th percentile (nearest rank) of each side; runs and spread describe all
/// the samples.
pub(crate) fn percentile_record(
    samples: &Samples,
    p: f64,
    metric: Metric<'_>,
) -> anyhow::Result<Record> {
    let of = |values: &[f64]| percentile(values, p).context("no samples");
    let mut record = Samples {
        slipway: vec![of(&samples.slipway)?],
        baseline: vec![of(&samples.baseline)?],
    }
    .record(metric)?;
    let all = samples.record(metric)?;
    record.runs = all.runs;
    record.spread = all.spread;
    Ok(record)
}

/// The `p`th percentile of `values` by nearest rank.
pub(crate) fn percentile(values: &[f64], p: f64) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

/// What one sockperf TCP ping-pong run measured (one message in flight, sockperf's default
/// 14-byte messages, as fast as the replies come).
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct PingPong {
    pub(crate) rtt_p50_us: f64,
    /// Request/response round trips per second over the run after warm-up.
    pub(crate) round_trips_per_s: f64,
}

/// One sockperf TCP ping-pong run from the pair's client to a sockperf server started for it.
pub(crate) fn sockperf_ping_pong(pair: &Pair<'_>, duration: Duration) -> anyhow::Result<PingPong> {
    let ip = pair.server_ip.to_string();
    let port = SOCKPERF_PORT.to_string();
    let server = pair
        .server
        .spawn(&["sockperf", "server", "--tcp", "-i", &ip, "-p", &port])?;
    pair.server
        .wait_tcp_listen(SOCKPERF_PORT, Duration::from_secs(5))?;
    let seconds = duration.as_secs().max(1);
    let limit = (seconds + 15).to_string();
    let seconds = seconds.to_string();
    let text = pair.client.run(&[
        "timeout",
        &limit,
        "sockperf",
        "ping-pong",
        "--tcp",
        "-i",
        &ip,
        "-p",
        &port,
        "-t",
        &seconds,
        "--full-rtt",
    ])?;
    drop(server);
    Ok(PingPong {
        rtt_p50_us: parse_sockperf_p50(&text)
            .with_context(|| format!("sockperf printed no 50th percentile:\n{text}"))?,
        round_trips_per_s: parse_sockperf_rate(&text)
            .with_context(|| format!("sockperf printed no valid-duration counts:\n{text}"))?,
    })
}

/// ReceivedMessages / RunTime of sockperf's `[Valid Duration]` line (the run after warm-up).
fn parse_sockperf_rate(text: &str) -> Option<f64> {
    let line = text
        .lines()
        .find_map(|line| line.split_once("[Valid Duration]"))?
        .1;
    let field = |name: &str| -> Option<f64> {
        line.split(';')
            .find_map(|part| part.trim().strip_prefix(name))?
            .trim_end_matches(" sec")
            .trim()
            .parse()
            .ok()
    };
    let seconds = field("RunTime=")?;
    (seconds > 0.0).then(|| field("ReceivedMessages=").map(|n| n / seconds))?
}

/// The value of `---> percentile 50.000 = <usec>` in sockperf's output.
fn parse_sockperf_p50(text: &str) -> Option<f64> {
    text.lines().find_map(|line| {
        line.split_once("percentile 50.000 =")?
            .1
            .trim()
            .parse()
            .ok()
    })
}

fn path_str(path: &Path) -> anyhow::Result<&str> {
    path.to_str()
        .with_context(|| format!("{} is not UTF-8", path.display()))
}

fn ms(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1e3
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_by_nearest_rank() {
        let values: Vec<f64> = (1..=200).map(f64::from).collect();
        assert_eq!(percentile(&values, 99.0), Some(198.0));
        assert_eq!(percentile(&values, 50.0), Some(100.0));
        assert_eq!(percentile(&[5.0], 99.0), Some(5.0));
        assert_eq!(percentile(&[], 99.0), None);
    }

    #[test]
    fn parses_sockperf_percentiles() {
        let text = "sockperf: ---> percentile 99.000 =   19.132\n\
                    sockperf: ---> percentile 50.000 =    4.989\n\
                    sockperf: ---> <MIN> observation =    4.685\n";
        assert_eq!(parse_sockperf_p50(text), Some(4.989));
        assert_eq!(parse_sockperf_p50("sockperf: Test ended\n"), None);
    }

    #[test]
    fn parses_the_sockperf_round_trip_rate() {
        let text = "sockperf: [Total Run] RunTime=1.001 sec; Warm up time=400 msec; \
                    SentMessages=24112; ReceivedMessages=24111\n\
                    sockperf: [Valid Duration] RunTime=0.500 sec; SentMessages=6954; \
                    ReceivedMessages=6875\n";
        assert_eq!(parse_sockperf_rate(text), Some(13_750.0));
        assert_eq!(parse_sockperf_rate("sockperf: Test ended\n"), None);
    }

    #[test]
    fn reads_the_address_of_a_cni_result() {
        let result = json!({"ips": [{"address": "10.244.1.7/24", "gateway": "10.244.1.1"}]});
        assert_eq!(result_ip(&result), Some(Ipv4Addr::new(10, 244, 1, 7)));
        assert_eq!(result_ip(&json!({})), None);
    }
}
