//! A cluster for the CNI tests: a world of hosts (network namespaces on an underlay bridge), a
//! `slipway agent` per host, and a runtime's-eye view of the plugin: exec it with CNI_* variables
//! and the configuration on stdin, read its stdout. Everything goes with the cluster's Drop.

#![allow(dead_code, reason = "each test binary uses part of the harness")]

pub mod probe;

use std::io::Write;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use slipway_dataplane::world::cgroup::Cgroup;
use slipway_dataplane::world::{Netns, Process, World};

pub const POD_CIDR: &str = "10.244.0.0/16";
pub const NETWORK: &str = "slipway-test";

/// The plugin binary: this crate's own when the harness is compiled into a `slipway-cni` test;
/// another crate's tests (the agent's pod tests) find it beside the test binary's directory,
/// where `cargo test --workspace` builds it.
pub fn plugin_binary() -> PathBuf {
    let path = match option_env!("CARGO_BIN_EXE_slipway-cni") {
        Some(path) => PathBuf::from(path),
        None => std::env::current_exe()
            .expect("test binary path")
            .parent()
            .and_then(Path::parent)
            .expect("target dir")
            .join("slipway-cni"),
    };
    assert!(
        path.exists(),
        "{} is missing: run the tests with `cargo test --workspace` (scripts/test.sh)",
        path.display()
    );
    path
}

/// The `slipway` binary (the agent); `cargo test --workspace` builds it beside the plugin.
pub fn slipway_binary() -> PathBuf {
    let path = plugin_binary().with_file_name("slipway");
    assert!(
        path.exists(),
        "{} is missing: run the tests with `cargo test --workspace` (scripts/test.sh)",
        path.display()
    );
    path
}

/// One host of the cluster and its agent.
#[derive(Debug)]
pub struct Node {
    pub netns: Netns,
    pub index: usize,
    pub address: Ipv4Addr,
    pub block: String,
    pub data_dir: PathBuf,
    pub bpffs: PathBuf,
    pub socket: PathBuf,
    /// The host's cgroup: processes in it (or below it) get socket-level service translation.
    pub cgroup: Cgroup,
    pub agent: Option<Process>,
    /// The agent's stdout and stderr.
    pub log: PathBuf,
}

/// What one plugin run printed.
#[derive(Debug)]
pub struct Outcome {
    pub success: bool,
    pub stdout: Value,
    pub stderr: String,
}

impl Outcome {
    pub fn code(&self) -> Option<u64> {
        self.stdout.get("code").and_then(Value::as_u64)
    }

    pub fn msg(&self) -> String {
        self.stdout
            .get("msg")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned()
    }

    pub fn expect_ok(self, what: &str) -> Value {
        assert!(
            self.success,
            "{what} failed: {} {}",
            self.stdout, self.stderr
        );
        self.stdout
    }
}

/// A pod made by ADD.
#[derive(Debug, Clone)]
pub struct Pod {
    pub netns: Netns,
    pub container_id: String,
    pub host: usize,
    pub ip: Ipv4Addr,
    pub result: Value,
}

#[derive(Debug)]
pub struct Cluster {
    pub nodes: Vec<Node>,
    pub routing: &'static str,
    pub dir: PathBuf,
    pub cni_path: PathBuf,
    pub world: World,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            node.agent.take();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Cluster {
    /// `hosts` hosts with agents, routing `vxlan` or `native`, each agent told of all hosts.
    pub fn new(hosts: usize, routing: &'static str) -> Self {
        let world = World::builder().hosts(hosts).build().expect("world");
        let dir = std::env::temp_dir().join(world.name());
        let cni_path = dir.join("cni-bin");
        std::fs::create_dir_all(&cni_path).expect("cni dir");
        std::os::unix::fs::symlink(plugin_binary(), cni_path.join("slipway")).expect("symlink");
        let nodes = world
            .hosts()
            .iter()
            .map(|h| Node {
                netns: h.netns.clone(),
                index: h.index,
                address: h.underlay_ip,
                block: format!("10.244.{}.0/24", h.index),
                data_dir: dir.join(format!("h{}", h.index)),
                bpffs: world.bpffs_dir().join(format!("h{}", h.index)),
                socket: dir.join(format!("h{}.sock", h.index)),
                cgroup: Cgroup::create(&world, &format!("h{}", h.index)).expect("cgroup"),
                agent: None,
                log: dir.join(format!("h{}-agent.log", h.index)),
            })
            .collect();
        let mut cluster = Self {
            nodes,
            routing,
            dir,
            cni_path,
            world,
        };
        for i in 1..=hosts {
            cluster.start_agent(i);
        }
        cluster.put_hosts();
        cluster
    }

    pub fn node(&self, i: usize) -> &Node {
        &self.nodes[i - 1]
    }

    /// Starts host `i`'s agent and waits until its API answers.
    pub fn start_agent(&mut self, i: usize) {
        self.start_agent_with(i, &[]);
    }

    /// Starts host `i`'s agent with `extra` arguments and waits until its API answers.
    pub fn start_agent_with(&mut self, i: usize, extra: &[&str]) {
        self.spawn_agent(i, extra, true);
    }

    /// Starts host `i`'s agent without `--host-block` (it reads its Node's, `extra` names the
    /// cluster) and waits until its API answers.
    pub fn start_agent_from_node(&mut self, i: usize, extra: &[&str]) {
        self.spawn_agent(i, extra, false);
    }

    fn spawn_agent(&mut self, i: usize, extra: &[&str], with_block: bool) {
        let slipway = slipway_binary();
        let node = &mut self.nodes[i - 1];
        let _ = std::fs::remove_file(&node.socket);
        let mut args = vec![
            slipway.to_str().expect("utf-8 path"),
            "agent",
            "--pod-cidr",
            POD_CIDR,
        ];
        if with_block {
            args.extend(["--host-block", node.block.as_str()]);
        }
        args.extend([
            "--routing",
            self.routing,
            "--bpffs",
            node.bpffs.to_str().expect("utf-8"),
            "--data-dir",
            node.data_dir.to_str().expect("utf-8"),
            "--socket",
            node.socket.to_str().expect("utf-8"),
            "--cgroup",
            node.cgroup.path().to_str().expect("utf-8"),
        ]);
        args.extend_from_slice(extra);
        // The agent logs (info and up) to a file of the cluster: no pipe to fill, and a test can
        // read what it said.
        let script = format!(
            "export RUST_LOG=\"${{RUST_LOG:-info}}\"; exec \"$0\" \"$@\" >>'{}' 2>&1",
            node.log.display()
        );
        let mut argv = vec!["sh", "-c", &script];
        argv.extend_from_slice(&args);
        node.agent = Some(node.netns.spawn(&argv).expect("spawn agent"));
        let deadline = Instant::now() + Duration::from_secs(20);
        while api(&node.socket, "GET", "/v1/status", None).is_none() {
            assert!(
                Instant::now() < deadline,
                "agent on host {i} did not come up"
            );
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    /// What host `i`'s agent has logged so far.
    pub fn agent_log(&self, i: usize) -> String {
        std::fs::read_to_string(&self.node(i).log).unwrap_or_default()
    }

    /// Kills host `i`'s agent with SIGKILL.
    pub fn kill_agent(&mut self, i: usize) {
        self.nodes[i - 1].agent.take();
    }

    /// Tells every agent about every host.
    pub fn put_hosts(&self) {
        let hosts: Vec<Value> = self
            .nodes
            .iter()
            .map(|n| json!({ "name": format!("h{}", n.index), "address": n.address, "podBlock": n.block }))
            .collect();
        for node in &self.nodes {
            let reply = api(
                &node.socket,
                "PUT",
                "/v1/hosts",
                Some(&Value::Array(hosts.clone())),
            )
            .expect("agent api");
            assert_eq!(reply.0, 200, "PUT /v1/hosts: {}", reply.1);
        }
    }

    /// The plugin configuration for host `i`, as a conflist entry with name and version.
    pub fn conf(&self, i: usize) -> Value {
        let node = self.node(i);
        json!({
            "cniVersion": "1.1.0",
            "name": NETWORK,
            "type": "slipway",
            "podCIDR": POD_CIDR,
            "dataDir": node.data_dir,
        })
    }

    /// Execs the plugin on host `i` as a runtime does.
    pub fn cni(
        &self,
        i: usize,
        command: &str,
        container_id: &str,
        netns: Option<&str>,
        conf: &Value,
    ) -> Outcome {
        self.exec_plugin(
            i,
            &self.cni_path.join("slipway"),
            command,
            container_id,
            netns,
            conf,
        )
    }

    /// Execs `plugin` on host `i` with CNI_PATH covering Slipway and the reference plugins.
    pub fn exec_plugin(
        &self,
        i: usize,
        plugin: &Path,
        command: &str,
        container_id: &str,
        netns: Option<&str>,
        conf: &Value,
    ) -> Outcome {
        let node = self.node(i);
        let mut cmd = node.netns.command(&[plugin.to_str().expect("utf-8")]);
        cmd.env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", container_id)
            .env("CNI_IFNAME", "eth0")
            .env(
                "CNI_PATH",
                format!("{}:/usr/lib/cni", self.cni_path.display()),
            )
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some(netns) = netns {
            cmd.env("CNI_NETNS", netns);
        }
        let mut child = cmd.spawn().expect("spawn plugin");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(conf.to_string().as_bytes())
            .expect("write stdin");
        let output = child.wait_with_output().expect("plugin output");
        let text = String::from_utf8_lossy(&output.stdout);
        Outcome {
            success: output.status.success(),
            stdout: if text.trim().is_empty() {
                Value::Null
            } else {
                serde_json::from_str(&text).unwrap_or(Value::String(text.into_owned()))
            },
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        }
    }

    /// A sandbox namespace for a pod on host `i` (empty until ADD).
    pub fn sandbox(&self, name: &str) -> Netns {
        self.world.add_netns(name).expect("sandbox")
    }

    /// Creates a sandbox and ADDs it on host `i`.
    pub fn add_pod(&self, i: usize, name: &str) -> Pod {
        let netns = self.sandbox(name);
        let container_id = format!("{name}-{}", self.world.name());
        let path = slipway_dataplane::netns::path(netns.name());
        let result = self
            .cni(i, "ADD", &container_id, path.to_str(), &self.conf(i))
            .expect_ok(&format!("ADD {name}"));
        let address = result["ips"][0]["address"]
            .as_str()
            .expect("address")
            .to_owned();
        let ip = address
            .split('/')
            .next()
            .and_then(|a| a.parse().ok())
            .expect("ip");
        Pod {
            netns,
            container_id,
            host: i,
            ip,
            result,
        }
    }

    pub fn del_pod(&self, pod: &Pod) -> Outcome {
        let path = slipway_dataplane::netns::path(pod.netns.name());
        self.cni(
            pod.host,
            "DEL",
            &pod.container_id,
            path.to_str(),
            &self.conf(pod.host),
        )
    }
}

/// Starts nginx in `netns` answering every request on `port` with `name`; stopped on drop.
pub fn serve_name(netns: &Netns, dir: &Path, name: &str, port: u16) -> Process {
    let prefix = dir.join(format!("nginx-{name}"));
    std::fs::create_dir_all(prefix.join("logs")).expect("nginx dir");
    let conf = prefix.join("nginx.conf");
    std::fs::write(
        &conf,
        format!(
            "worker_processes 1; pid {p}/nginx.pid; error_log {p}/logs/error.log;\n\
             events {{ worker_connections 64; }}\n\
             http {{ access_log off; client_body_temp_path {p}; proxy_temp_path {p};\n\
               fastcgi_temp_path {p}; uwsgi_temp_path {p}; scgi_temp_path {p};\n\
               server {{ listen {port}; location / {{ return 200 \"{name}\\n\"; }} }} }}\n",
            p = prefix.display()
        ),
    )
    .expect("nginx.conf");
    let process = netns
        .spawn(&[
            "nginx",
            "-p",
            prefix.to_str().expect("utf-8"),
            "-c",
            conf.to_str().expect("utf-8"),
            "-g",
            "daemon off;",
        ])
        .expect("nginx");
    netns
        .wait_tcp_listen(port, Duration::from_secs(10))
        .expect("nginx listening");
    process
}

/// A request to an agent's local API; `None` when nothing answers.
pub fn api(socket: &Path, method: &str, path: &str, body: Option<&Value>) -> Option<(u16, String)> {
    let body = body.map(Value::to_string);
    let answer = slipway_local::LocalClient::new(socket)
        .with_timeout(Duration::from_secs(10))
        .request(method, path, body.as_deref().map(str::as_bytes))
        .ok()?;
    Some((answer.status, answer.text()))
}

/// What an attachment can leave behind on a host.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Leftovers {
    pub veths: Vec<String>,
    pub allocations: Vec<String>,
    pub endpoints: Vec<Ipv4Addr>,
    pub pins: Vec<String>,
    pub routes: Vec<String>,
}

impl Cluster {
    /// Everything pod-related on host `i`: veths, IPAM files, endpoint entries, pinned links,
    /// host routes into the pod CIDR.
    pub fn leftovers(&self, i: usize) -> Leftovers {
        let node = self.node(i);
        let links: Vec<Value> =
            serde_json::from_str(&node.netns.ip(&["-j", "link", "show"]).expect("ip link"))
                .expect("json");
        let veths = links
            .iter()
            .filter_map(|l| l["ifname"].as_str())
            .filter(|n| n.starts_with("lxc"))
            .map(str::to_owned)
            .collect();
        let ipam_dir =
            slipway_cni::ipam::block_dir(&node.data_dir, node.block.parse().expect("block"));
        let mut allocations: Vec<String> = std::fs::read_dir(&ipam_dir)
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| n.parse::<Ipv4Addr>().is_ok() || n.ends_with(".tmp"))
                    .collect()
            })
            .unwrap_or_default();
        allocations.sort();
        let pins = slipway_dataplane::node::Pins::new(&node.bpffs);
        let endpoints = slipway_dataplane::node::NodeMaps::open(&pins)
            .expect("maps")
            .endpoints()
            .expect("endpoints")
            .into_keys()
            .collect();
        let pins = slipway_dataplane::node::attached(&pins)
            .expect("pins")
            .into_iter()
            .filter(|p| p.starts_with("lxc"))
            .collect();
        let routes: Vec<Value> =
            serde_json::from_str(&node.netns.ip(&["-j", "route", "show"]).expect("ip route"))
                .expect("json");
        let routes = routes
            .iter()
            .filter_map(|r| r["dst"].as_str())
            .filter(|d| d.starts_with("10.244."))
            .map(str::to_owned)
            .collect();
        Leftovers {
            veths,
            allocations,
            endpoints,
            pins,
            routes,
        }
    }
}

/// The value of the Prometheus sample `name{...}` whose labels include `label` on host `i`'s
/// agent (0 when the series is absent).
pub fn metric(cluster: &Cluster, i: usize, name: &str, label: &str) -> u64 {
    let (code, text) =
        api(&cluster.node(i).socket, "GET", "/metrics", None).expect("metrics answer");
    assert_eq!(code, 200, "{text}");
    text.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")) && l.contains(label))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}
