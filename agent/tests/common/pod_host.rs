//! What the pod tests share: one cluster host running pods ([`PodHost`]: a CNI test cluster's
//! host with its own containerd, images imported offline, the pod runner), and the pods they
//! run. Included by path into each pod test binary, beside the CNI tests' `common`.
#![allow(dead_code, reason = "each test binary uses part of the harness")]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::common;
pub use crate::common::Cluster;
use k8s_openapi::api::core::v1::{Pod, PodStatus};
use serde_json::Value;
use slipway_agent::pods::containerd::{Containerd, ContainerdConfig};
pub use slipway_agent::pods::cri::Cri;
pub use slipway_agent::pods::runner::{PodRunner, RunnerConfig, SyncReport, remove_cgroup};
use slipway_agent::pods::volumes::Objects;

// What every pod test names, through `use pod_host::*`.
#[allow(unused_imports, reason = "each test binary uses part of the harness")]
pub use crate::common::Leftovers;
pub use serde_json::json;
pub use slipway_agent::pods::status::Backoff;

pub const PAUSE: &str = "pause:local";

/// The conflist of the README's "Installing the CNI on a node".
pub fn readme_conflist() -> Value {
    let readme = include_str!("../../../README.md");
    let marker = "<<'CONF'\n";
    let start = readme.find(marker).expect("the README writes a conflist") + marker.len();
    let end = readme[start..]
        .find("\nCONF\n")
        .expect("the README's conflist ends");
    serde_json::from_str(&readme[start..start + end]).expect("the README's conflist is JSON")
}

/// One cluster host running pods: the cluster (agent), the host's containerd, the runner.
/// Drop removes every pod (through the runner, as a deleted Pod is), stops containerd and
/// removes the pods' cgroup parent; the cluster then goes with its own Drop.
pub struct PodHost {
    pub rt: tokio::runtime::Runtime,
    pub runner: Option<PodRunner>,
    pub containerd: Option<Containerd>,
    pub cgroup_parent: String,
    pub dir: PathBuf,
    pub network: String,
    pub cluster: Cluster,
    /// The ConfigMaps and Secrets the pods' volumes project, handed to every sync.
    pub objects: Objects,
}

impl PodHost {
    pub fn start(backoff: Backoff) -> Self {
        let cluster = Cluster::new(1, "vxlan");
        let node = cluster.node(1);
        let dir = cluster.dir.join("containerd");
        let conf_dir = cluster.dir.join("net.d");
        std::fs::create_dir_all(&conf_dir).expect("net.d");
        let mut conflist = readme_conflist();
        conflist["plugins"][0]["dataDir"] = Value::String(node.data_dir.display().to_string());
        let network = conflist["name"].as_str().expect("name").to_owned();
        std::fs::write(conf_dir.join("10-slipway.conflist"), conflist.to_string())
            .expect("conflist");
        // containerd 1.6 takes one bin_dir: Slipway's plugin beside Debian's reference plugins
        // (portmap for the chain, loopback for the sandbox's lo).
        for entry in std::fs::read_dir("/usr/lib/cni")
            .expect("/usr/lib/cni (Debian package containernetworking-plugins)")
        {
            let entry = entry.expect("entry");
            let link = cluster.cni_path.join(entry.file_name());
            if !link.exists() {
                std::os::unix::fs::symlink(entry.path(), link).expect("symlink");
            }
        }
        let mut config = ContainerdConfig::new(
            &dir,
            &cluster.cni_path,
            &conf_dir,
            "docker.io/library/pause:local",
        );
        config.netns = Some(slipway_dataplane::netns::path(node.netns.name()));
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let containerd = rt
            .block_on(Containerd::start(config))
            .unwrap_or_else(|e| panic!("containerd: {}", slipway_agent::pods::error_chain(&e)));
        let cgroup_parent = format!("/{}-pods", cluster.world.name());
        let mut host = Self {
            rt,
            runner: None,
            containerd: Some(containerd),
            cgroup_parent: cgroup_parent.clone(),
            dir: dir.clone(),
            network,
            cluster,
            objects: Objects::default(),
        };
        host.import_images();
        let cri = host.rt.block_on(Cri::connect(&host.socket())).expect("cri");
        host.runner = Some(PodRunner::new(
            cri,
            RunnerConfig {
                log_root: dir.join("pods"),
                cgroup_parent,
                backoff,
                host_ip: Some(host.cluster.node(1).address.to_string()),
                probe_netns: Some(slipway_dataplane::netns::path(
                    host.cluster.node(1).netns.name(),
                )),
                dns: None,
                volume_root: dir.join("kubelet-pods"),
                csi: None,
            },
        ));
        host
    }

    pub fn socket(&self) -> PathBuf {
        self.containerd.as_ref().expect("containerd").socket()
    }

    /// busybox (`/bin/busybox` of busybox-static with its applet links) and a pause image
    /// from the same root filesystem, imported with `slipway image import`.
    pub fn import_images(&self) {
        let rootfs = self.cluster.dir.join("busybox-rootfs");
        slipway_agent::pods::image::busybox_rootfs(&rootfs).expect("busybox rootfs");
        let socket = self.socket();
        for (name, extra) in [
            ("busybox", vec!["--cmd", "sh"]),
            (
                PAUSE,
                vec!["--entrypoint", "/bin/sleep", "--cmd", "2147483647"],
            ),
        ] {
            let out = Command::new(common::slipway_binary())
                .args(["image", "import", name])
                .arg(&rootfs)
                .arg("--containerd-socket")
                .arg(&socket)
                .args(extra)
                .output()
                .expect("slipway image import");
            assert!(
                out.status.success(),
                "slipway image import {name}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }

    pub fn sync(&mut self, pods: &[Pod]) -> SyncReport {
        let runner = self.runner.as_mut().expect("runner");
        self.rt.block_on(runner.sync(pods, &self.objects))
    }

    /// Syncs `pods` until `done` holds for `name`'s status; returns it. Fails at the deadline.
    pub fn wait(
        &mut self,
        pods: &[Pod],
        name: &str,
        deadline: Duration,
        mut done: impl FnMut(&PodStatus) -> bool,
    ) -> PodStatus {
        let end = Instant::now() + deadline;
        loop {
            let report = self.sync(pods);
            let key = format!("default/{name}");
            match report.statuses.get(&key) {
                Some(Ok(status)) if done(status) => return status.clone(),
                Some(Ok(status)) => assert!(
                    Instant::now() < end,
                    "{name} did not get there in {deadline:?}: {}\ncontainerd log: {}",
                    serde_json::to_string_pretty(status).unwrap_or_default(),
                    self.containerd_log_tail()
                ),
                other => assert!(
                    Instant::now() < end,
                    "{name}: {other:?}\ncontainerd log: {}",
                    self.containerd_log_tail()
                ),
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn containerd_log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.dir.join("containerd.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().rev().take(15).collect();
        lines.into_iter().rev().collect::<Vec<_>>().join("\n")
    }

    /// The sandboxes containerd holds for the pod with `uid`.
    pub fn sandboxes(&self, uid: &str) -> Vec<k8s_cri::v1::PodSandbox> {
        let socket = self.socket();
        self.rt.block_on(async {
            let mut cri = Cri::connect(&socket).await.expect("cri");
            cri.list_pod_sandboxes([("io.kubernetes.pod.uid".to_owned(), uid.to_owned())].into())
                .await
                .expect("ListPodSandbox")
        })
    }

    pub fn pod_cgroup(&self, controller: &str, uid: &str) -> PathBuf {
        Path::new("/sys/fs/cgroup")
            .join(controller)
            .join(self.cgroup_parent.trim_start_matches('/'))
            .join(format!("pod{uid}"))
    }
}

impl Drop for PodHost {
    fn drop(&mut self) {
        if let Some(runner) = self.runner.as_mut() {
            let report = self.rt.block_on(runner.sync(&[], &Objects::default()));
            for error in &report.errors {
                eprintln!("teardown: {}", slipway_agent::pods::error_chain(error));
            }
        }
        if let Some(containerd) = self.containerd.take() {
            self.rt.block_on(containerd.stop());
        }
        remove_cgroup(Path::new("/sys/fs/cgroup"), &self.cgroup_parent);
        // What a failed teardown left mounted (sandbox netns, rootfs) would keep the cluster's
        // directory from going.
        let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
        let prefix = format!("{}/", self.dir.display());
        let mut points: Vec<&str> = mounts
            .lines()
            .filter_map(|l| l.split_whitespace().nth(1))
            .filter(|p| p.starts_with(&prefix))
            .collect();
        points.sort_by_key(|p| std::cmp::Reverse(p.len()));
        for point in points {
            eprintln!("teardown: unmounting leftover {point}");
            let _ = nix::mount::umount2(point, nix::mount::MntFlags::MNT_DETACH);
        }
    }
}

pub fn pod(name: &str, spec: Value) -> Pod {
    serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": "default",
                     "uid": format!("{name}-{}", std::process::id())},
        "spec": spec,
    }))
    .expect("pod")
}

pub fn uid(pod: &Pod) -> String {
    pod.metadata.uid.clone().expect("uid")
}

pub fn running(status: &PodStatus) -> bool {
    status.phase.as_deref() == Some("Running")
        && status.pod_ip.is_some()
        && status
            .conditions
            .iter()
            .flatten()
            .any(|c| c.type_ == "Ready" && c.status == "True")
}

pub fn web(name: &str) -> Pod {
    pod(
        name,
        json!({
            "terminationGracePeriodSeconds": 2,
            "containers": [{
                "name": "httpd",
                "image": "busybox",
                "imagePullPolicy": "Never",
                "command": ["sh", "-c"],
                "args": ["mkdir -p /www && echo \"hello from $POD\" > /www/index.html && exec httpd -f -p 8080 -h /www"],
                "env": [{"name": "POD", "value": name}],
                "workingDir": "/tmp",
                "resources": {"requests": {"cpu": "100m", "memory": "16Mi"},
                              "limits": {"cpu": "500m", "memory": "64Mi"}},
            }],
        }),
    )
}

/// Ends whatever containerd the pid file in `0` names when the test ends (on panic too): the
/// agent's containerd outlives an agent killed by the cluster's drop.
pub struct ContainerdReaper(pub PathBuf);

impl Drop for ContainerdReaper {
    fn drop(&mut self) {
        let pid = std::fs::read_to_string(self.0.join("containerd.pid"))
            .ok()
            .and_then(|p| p.trim().parse::<i32>().ok());
        // Only a live process running this directory's config (not a recycled pid).
        let config = self.0.join("config.toml").display().to_string();
        let ours = |pid: &i32| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| String::from_utf8_lossy(&c).contains(&config))
        };
        if let Some(pid) = pid.filter(|p| !gone(*p) && ours(p)) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

/// Whether process `pid` is gone (or a zombie).
pub fn gone(pid: i32) -> bool {
    // A zombie still has its /proc entry; its state says Z.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| s.split_whitespace().nth(2) == Some("Z"))
        .unwrap_or(true)
}

/// `slipway image import` on `args`; its exit status and stderr.
pub fn import(host: &PodHost, args: &[&str]) -> (bool, String) {
    let out = Command::new(common::slipway_binary())
        .args(["image", "import"])
        .args(args)
        .arg("--containerd-socket")
        .arg(host.socket())
        .output()
        .expect("slipway image import");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}
