//! What the end-to-end tests share: a supervisor provisioning netns hosts (a World with a
//! prefix of its own, torn down on drop), and waiting with a deadline.
#![allow(dead_code, reason = "each test binary uses part of the harness")]

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind};
use slipway_hosts::netns::{NetnsConfig, NetnsProvider};

pub fn slipway_binary() -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    let path = exe
        .parent()
        .and_then(Path::parent)
        .map(|dir| dir.join("slipway"))
        .expect("target dir");
    assert!(
        path.exists(),
        "{} is missing: run with `cargo test --workspace`",
        path.display()
    );
    path
}

pub fn gvk(kind: &str, plural: &str) -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("slipway.dev", "v1alpha1", kind),
        plural,
    )
}

/// A supervisor provisioning netns hosts with a prefix of its own, over a temporary data dir;
/// on drop (panics too) it is killed and everything with its prefix is torn down.
pub struct World {
    pub dir: tempfile::TempDir,
    pub prefix: String,
    uplink: String,
    port: u16,
    child: Option<Child>,
    /// Node agent flags for every host (`--host-agent-flag`); none runs the heartbeat alone.
    agent_flags: Vec<String>,
    /// More flags for the supervisor.
    supervisor_flags: Vec<String>,
    /// The provider's zones.
    zones: Vec<String>,
}

impl World {
    pub fn new() -> Self {
        Self::with_agent_flags(Vec::new())
    }

    /// A world whose hosts run the node agent with `agent_flags` (placeholders as the netns
    /// provider substitutes them: `{data_dir}`, `{bpffs}`, `{cgroup}`, ...).
    pub fn with_agent_flags(agent_flags: Vec<String>) -> Self {
        Self::with_flags(agent_flags, Vec::new())
    }

    /// A world whose hosts run the node agent with `agent_flags` and whose supervisor gets
    /// `supervisor_flags` too.
    pub fn with_flags(agent_flags: Vec<String>, supervisor_flags: Vec<String>) -> Self {
        Self::with_zones(agent_flags, supervisor_flags, &["za", "zb"])
    }

    /// A world of `zones`, whose hosts run the node agent with `agent_flags` and whose
    /// supervisor gets `supervisor_flags` too.
    pub fn with_zones(
        agent_flags: Vec<String>,
        supervisor_flags: Vec<String>,
        zones: &[&str],
    ) -> Self {
        let mut hasher = RandomState::new().build_hasher();
        hasher.write_u32(std::process::id());
        let id = hasher.finish() as u32 & 0xff_ffff;
        let dir = tempfile::Builder::new()
            .prefix("slipway-e2e-hosts-")
            .tempdir()
            .expect("dir");
        // A port that is free now, kept across restarts (joined hosts' kubeconfigs name it).
        let port = std::net::TcpListener::bind("0.0.0.0:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        let mut w = Self {
            dir,
            prefix: format!("slipway-e{id:06x}-"),
            uplink: format!("slwu{id:06x}"),
            port,
            child: None,
            agent_flags,
            supervisor_flags,
            zones: zones.iter().map(|z| (*z).to_owned()).collect(),
        };
        w.start();
        w
    }

    pub fn start(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("supervisor.log"))
            .expect("log");
        let mut child = Command::new(slipway_binary())
            .args(["supervisor", "--data-dir"])
            .arg(self.dir.path().join("sup"))
            .args(["--listen", &format!("0.0.0.0:{}", self.port)])
            .args(["--host-provider", "netns", "--zones", &self.zones.join(",")])
            .args([
                "--underlay",
                "10.123.0.0/16",
                "--netns-prefix",
                &self.prefix,
            ])
            .args(["--uplink-device", &self.uplink])
            .args([
                "--host-lease-interval",
                "250ms",
                "--host-lease-duration",
                "1s",
            ])
            .args(
                self.agent_flags
                    .iter()
                    .map(|f| format!("--host-agent-flag={f}")),
            )
            .args(&self.supervisor_flags)
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .expect("spawn supervisor");
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("stdout"))
            .read_line(&mut line)
            .expect("supervisor output");
        self.child = Some(child);
        assert!(
            line.contains("https://"),
            "supervisor did not start: {line:?}\n{}",
            self.log()
        );
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("supervisor.log")).unwrap_or_default()
    }

    pub fn provider(&self) -> NetnsProvider {
        let zones: Vec<&str> = self.zones.iter().map(String::as_str).collect();
        let mut config = NetnsConfig::new(
            &self.prefix,
            self.dir.path().join("sup/hosts/state"),
            &zones,
        );
        config.underlay = "10.123.0.0/16".parse().expect("cidr");
        config.uplink_device = Some(self.uplink.clone());
        NetnsProvider::new(config).expect("provider")
    }

    pub async fn client(&self) -> kube::Client {
        client_for(&self.dir.path().join("sup/admin.kubeconfig")).await
    }

    /// Everything with the world's prefix the kernel still has.
    pub fn leftovers(&self) -> Vec<String> {
        let mut found = Vec::new();
        for dir in [
            "/run/netns",
            "/sys/fs/cgroup/cpu",
            "/sys/fs/cgroup/memory",
            "/sys/fs/cgroup/unified",
            "/sys/fs/bpf",
        ] {
            for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if name.starts_with(&self.prefix) {
                    found.push(format!("{dir}/{name}"));
                }
            }
        }
        if Path::new("/sys/class/net").join(&self.uplink).exists() {
            found.push(format!("link {}", self.uplink));
        }
        found
    }
}

impl Drop for World {
    fn drop(&mut self) {
        self.kill9();
        let provider = self.provider();
        let _ = slipway_dataplane::underlay::block_on(provider.teardown());
    }
}

/// A client with the credentials of `kubeconfig`.
pub async fn client_for(kubeconfig: &Path) -> kube::Client {
    let config = kube::Config::from_custom_kubeconfig(
        kube::config::Kubeconfig::read_from(kubeconfig)
            .unwrap_or_else(|e| panic!("{}: {e}", kubeconfig.display())),
        &kube::config::KubeConfigOptions::default(),
    )
    .await
    .expect("config");
    kube::Client::try_from(config).expect("client")
}

pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

impl World {
    /// Zones `za` and `zb` (the world's provider's) and a HostClass `small` (1 cpu, 256Mi).
    pub async fn seed(&self, client: &kube::Client) {
        let zones = self
            .zones
            .iter()
            .map(|z| ("Zone", "zones", z.as_str(), serde_json::json!({})));
        let class = (
            "HostClass",
            "hostclasses",
            "small",
            serde_json::json!({"cpus": 1, "memory": "256Mi"}),
        );
        for (kind, plural, name, spec) in zones.chain([class]) {
            let api: Api<DynamicObject> = Api::all_with(client.clone(), &gvk(kind, plural));
            let mut o = DynamicObject::new(name, &gvk(kind, plural));
            o.data = serde_json::json!({"spec": spec});
            api.create(&kube::api::PostParams::default(), &o)
                .await
                .expect(name);
        }
    }

    /// Runs kubectl (the current one at /usr/bin/kubectl) with the admin's kubeconfig; its
    /// stdout, or a panic with its stderr.
    pub fn kubectl(&self, args: &[&str]) -> String {
        self.kubectl_with(&self.dir.path().join("sup/admin.kubeconfig"), args)
    }

    /// Runs kubectl with `kubeconfig`.
    pub fn kubectl_with(&self, kubeconfig: &Path, args: &[&str]) -> String {
        let out = Command::new("kubectl")
            .arg("--kubeconfig")
            .arg(kubeconfig)
            .args(args)
            .output()
            .expect("run kubectl");
        assert!(
            out.status.success(),
            "kubectl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Applies `yaml` with kubectl, expecting a refusal; its stderr.
    pub fn apply_refused(&self, yaml: &str) -> String {
        let path = self.dir.path().join("refused.yaml");
        std::fs::write(&path, yaml).expect("write yaml");
        let out = Command::new("kubectl")
            .arg("--kubeconfig")
            .arg(self.dir.path().join("sup/admin.kubeconfig"))
            .args(["apply", "-f"])
            .arg(&path)
            .output()
            .expect("run kubectl");
        assert!(!out.status.success(), "kubectl apply accepted:\n{yaml}");
        String::from_utf8_lossy(&out.stderr).into_owned()
    }

    /// Applies `yaml` with kubectl.
    pub fn apply(&self, yaml: &str) {
        self.apply_with(&self.dir.path().join("sup/admin.kubeconfig"), yaml);
    }

    /// Applies `yaml` with kubectl and `kubeconfig` (a workload cluster's).
    pub fn apply_with(&self, kubeconfig: &Path, yaml: &str) {
        let path = self.dir.path().join(format!(
            "apply-{}.yaml",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or_default()
        ));
        std::fs::write(&path, yaml).expect("write yaml");
        self.kubectl_with(kubeconfig, &["apply", "-f", &path.display().to_string()]);
    }
}

/// The Cluster [`World::workload_cluster`] makes: `w1` in namespace `team-w`, one control plane
/// host and two workers (spread over the zones), HostClass `node`, LoadBalancer VIPs from
/// 10.124.100.0/27.
pub const CLUSTER: &str = "apiVersion: slipway.dev/v1alpha1
kind: Cluster
metadata:
  name: w1
  namespace: team-w
spec:
  topology:
    controlPlane:
      replicas: 1
      hostClass: node
    nodePools:
    - name: workers
      replicas: 2
      hostClass: node
  settings:
    network:
      pods:
        cidrBlocks: [\"192.168.0.0/16\"]
      services:
        cidrBlocks: [\"10.96.0.0/16\"]
      ingress:
        cidrBlocks: [\"10.124.100.0/27\"]
";

impl World {
    /// Deletes the workload cluster [`CLUSTER`] and waits until its hosts are gone; then no
    /// mount (containerd's sandboxes and rootfs, volumes) of the world may be left.
    pub async fn delete_workload_cluster(&self, client: &kube::Client) {
        self.kubectl(&["delete", "cluster", "w1", "-n", "team-w", "--wait=false"]);
        let hosts: Api<DynamicObject> = Api::all_with(client.clone(), &gvk("Host", "hosts"));
        wait_for("every host gone", Duration::from_secs(60), || async {
            hosts
                .list(&kube::api::ListParams::default())
                .await
                .ok()
                .filter(|l| l.items.is_empty())
        })
        .await;
        let mounted: Vec<_> = slipway_dataplane::mounts::mounts()
            .expect("mounts")
            .into_iter()
            .filter(|m| m.target.starts_with(self.dir.path()))
            .map(|m| m.target)
            .collect();
        assert!(mounted.is_empty(), "mounts left behind: {mounted:?}");
    }

    /// Seeds the supervisor, makes namespace `team-w` (with `namespace_spec`, YAML of its
    /// `spec`, when not empty) and HostClass `node`, applies [`CLUSTER`] and waits until it is
    /// Running and Ready; returns the path of its admin kubeconfig.
    pub async fn workload_cluster(&self, client: &kube::Client, namespace_spec: &str) -> PathBuf {
        self.seed(client).await;
        let spec = if namespace_spec.is_empty() {
            String::new()
        } else {
            format!("spec: {namespace_spec}\n")
        };
        self.apply(&format!(
            "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: team-w\n{spec}---\n\
             apiVersion: slipway.dev/v1alpha1\nkind: HostClass\nmetadata:\n  name: node\n\
             spec:\n  cpus: 1\n  memory: 1Gi\n"
        ));
        let clusters: Api<DynamicObject> =
            Api::namespaced_with(client.clone(), "team-w", &gvk("Cluster", "clusters"));
        let started = Instant::now();
        self.apply(CLUSTER);
        wait_for("w1 Running", Duration::from_secs(120), || async {
            let c = clusters.get_opt("w1").await.ok()??;
            let ready = c.data["status"]["conditions"]
                .as_array()?
                .iter()
                .any(|x| x["type"] == "Ready" && x["status"] == "True");
            (c.data["status"]["phase"] == "Running" && ready).then_some(())
        })
        .await;
        eprintln!(
            "1+2 hosts with containerd: kubectl apply → Ready in {:?}",
            started.elapsed()
        );
        self.cluster_kubeconfig(client, "team-w", "w1").await
    }

    /// Writes Cluster `namespace/name`'s admin kubeconfig (its Secret `<name>-kubeconfig`) to
    /// `<dir>/<name>.kubeconfig`; returns the path.
    pub async fn cluster_kubeconfig(
        &self,
        client: &kube::Client,
        namespace: &str,
        name: &str,
    ) -> PathBuf {
        let secrets: Api<Secret> = Api::namespaced(client.clone(), namespace);
        let kubeconfig = secrets
            .get(&format!("{name}-kubeconfig"))
            .await
            .unwrap_or_else(|e| panic!("{name}-kubeconfig Secret: {e}"))
            .data
            .and_then(|d| d.get("value").cloned())
            .expect("value")
            .0;
        let path = self.dir.path().join(format!("{name}.kubeconfig"));
        std::fs::write(&path, kubeconfig).expect("write kubeconfig");
        path
    }
}

/// kill -9 each of `pids`.
pub fn kill9(pids: &[i32]) {
    for pid in pids {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(*pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
}

/// What pod `name`'s containers on `host` wrote (their CRI log files), for a failure's message.
pub fn pod_log(world: &World, host: &str, name: &str) -> String {
    let root = world
        .dir
        .path()
        .join(format!("sup/hosts/data/{host}/containerd/pods"));
    let mut out = String::new();
    for dir in std::fs::read_dir(&root).into_iter().flatten().flatten() {
        if !dir
            .file_name()
            .to_string_lossy()
            .contains(&format!("_{name}_"))
        {
            continue;
        }
        for c in std::fs::read_dir(dir.path())
            .into_iter()
            .flatten()
            .flatten()
        {
            for f in std::fs::read_dir(c.path()).into_iter().flatten().flatten() {
                out.push_str(&std::fs::read_to_string(f.path()).unwrap_or_default());
            }
        }
    }
    out
}
