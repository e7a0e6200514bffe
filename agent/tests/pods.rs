//! Pods through a real container runtime: the host agent's containerd (Debian's 1.6, its own
//! root, state, socket and CNI dirs) runs on a host of a CNI test cluster (a network namespace
//! with a `slipway agent`), images imported offline with `slipway image import`, and the pod
//! runner drives core/v1 Pods over CRI. containerd calls the README's conflist (Slipway's plugin
//! chained with portmap), so the pods get addresses of the host block from the plugin.
//! Privileged (root, BPF, netns, containerd): run by scripts/test.sh.

#[path = "../../cni/tests/common/mod.rs"]
mod common;
#[path = "common/mod.rs"]
mod sup;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::{Cluster, Leftovers};
use k8s_openapi::api::core::v1::{Pod, PodStatus};
use serde_json::{Value, json};
use slipway_agent::pods::containerd::{Containerd, ContainerdConfig};
use slipway_agent::pods::cri::Cri;
use slipway_agent::pods::runner::{PodRunner, RunnerConfig, SyncReport, remove_cgroup};
use slipway_agent::pods::status::Backoff;

const PAUSE: &str = "pause:local";

/// The conflist of the README's "Installing the CNI on a node".
fn readme_conflist() -> Value {
    let readme = include_str!("../../README.md");
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
struct PodHost {
    rt: tokio::runtime::Runtime,
    runner: Option<PodRunner>,
    containerd: Option<Containerd>,
    cgroup_parent: String,
    dir: PathBuf,
    network: String,
    cluster: Cluster,
}

impl PodHost {
    fn start(backoff: Backoff) -> Self {
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
            },
        ));
        host
    }

    fn socket(&self) -> PathBuf {
        self.containerd.as_ref().expect("containerd").socket()
    }

    /// busybox (`/bin/busybox` of busybox-static with its applet links) and a pause image
    /// from the same root filesystem, imported with `slipway image import`.
    fn import_images(&self) {
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

    fn sync(&mut self, pods: &[Pod]) -> SyncReport {
        let runner = self.runner.as_mut().expect("runner");
        self.rt.block_on(runner.sync(pods))
    }

    /// Syncs `pods` until `done` holds for `name`'s status; returns it. Fails at the deadline.
    fn wait(
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

    fn containerd_log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.dir.join("containerd.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().rev().take(15).collect();
        lines.into_iter().rev().collect::<Vec<_>>().join("\n")
    }

    /// The sandboxes containerd holds for the pod with `uid`.
    fn sandboxes(&self, uid: &str) -> Vec<k8s_cri::v1::PodSandbox> {
        let socket = self.socket();
        self.rt.block_on(async {
            let mut cri = Cri::connect(&socket).await.expect("cri");
            cri.list_pod_sandboxes([("io.kubernetes.pod.uid".to_owned(), uid.to_owned())].into())
                .await
                .expect("ListPodSandbox")
        })
    }

    fn pod_cgroup(&self, controller: &str, uid: &str) -> PathBuf {
        Path::new("/sys/fs/cgroup")
            .join(controller)
            .join(self.cgroup_parent.trim_start_matches('/'))
            .join(format!("pod{uid}"))
    }
}

impl Drop for PodHost {
    fn drop(&mut self) {
        if let Some(runner) = self.runner.as_mut() {
            let report = self.rt.block_on(runner.sync(&[]));
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

fn pod(name: &str, spec: Value) -> Pod {
    serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": "default",
                     "uid": format!("{name}-{}", std::process::id())},
        "spec": spec,
    }))
    .expect("pod")
}

fn uid(pod: &Pod) -> String {
    pod.metadata.uid.clone().expect("uid")
}

fn running(status: &PodStatus) -> bool {
    status.phase.as_deref() == Some("Running")
        && status.pod_ip.is_some()
        && status
            .conditions
            .iter()
            .flatten()
            .any(|c| c.type_ == "Ready" && c.status == "True")
}

fn web(name: &str) -> Pod {
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

#[test]
#[cfg_attr(
    not(feature = "privileged"),
    ignore = "privileged: root + BPF + netns + containerd; run scripts/test.sh"
)]
fn pods_run_through_containerd_get_addresses_from_the_plugin_and_reach_each_other() {
    let mut host = PodHost::start(Backoff::default());
    let block: ipnetwork::Ipv4Network = host.cluster.node(1).block.parse().expect("block");

    // Three web pods, one after another: create -> Running latency.
    let mut pods = Vec::new();
    let mut latencies = Vec::new();
    for i in 1..=3 {
        let p = web(&format!("web{i}"));
        pods.push(p);
        let started = Instant::now();
        let status = host.wait(&pods, &format!("web{i}"), Duration::from_secs(60), running);
        latencies.push(started.elapsed());
        let ip: std::net::Ipv4Addr = status
            .pod_ip
            .as_deref()
            .expect("podIP")
            .parse()
            .expect("ip");
        assert!(block.contains(ip), "web{i}'s {ip} is outside {block}");
        let c = &status
            .container_statuses
            .as_ref()
            .expect("containerStatuses")[0];
        assert_eq!(c.restart_count, 0);
        assert!(
            c.container_id
                .as_deref()
                .is_some_and(|id| id.starts_with("containerd://"))
        );
    }
    eprintln!(
        "pod create -> Running (containerd, CRI, Slipway CNI): {}",
        latencies
            .iter()
            .map(|d| format!("{} ms", d.as_millis()))
            .collect::<Vec<_>>()
            .join(", ")
    );

    // Five more at once (the runner syncs pods concurrently): each one's create -> Running.
    let burst: Vec<Pod> = (1..=5).map(|i| web(&format!("burst{i}"))).collect();
    let mut all = pods.clone();
    all.extend(burst.iter().cloned());
    let started = Instant::now();
    let mut ready_at: std::collections::BTreeMap<String, Duration> = Default::default();
    while ready_at.len() < burst.len() {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "burst: only {ready_at:?} Running"
        );
        let report = host.sync(&all);
        for p in &burst {
            let name = p.metadata.name.clone().expect("name");
            if let Some(Ok(status)) = report.statuses.get(&format!("default/{name}"))
                && running(status)
            {
                ready_at.entry(name).or_insert_with(|| started.elapsed());
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    eprintln!(
        "5 pods at once, create -> Running: {}",
        ready_at
            .values()
            .map(|d| format!("{} ms", d.as_millis()))
            .collect::<Vec<_>>()
            .join(", ")
    );
    // Back to the three web pods: the burst goes.
    let report = host.sync(&pods);
    assert_eq!(report.removed.len(), 5, "{:?}", report.errors);

    // containerd called the plugin: the IPAM record of the pod's address names the CRI
    // sandbox as CNI_CONTAINERID and the conflist's network.
    let status = host.wait(&pods, "web1", Duration::from_secs(10), running);
    let ip: std::net::Ipv4Addr = status.pod_ip.as_deref().expect("ip").parse().expect("ip");
    let sandboxes = host.sandboxes(&uid(&pods[0]));
    assert_eq!(sandboxes.len(), 1, "{sandboxes:?}");
    let node = host.cluster.node(1);
    let store = slipway_cni::ipam::Store::for_block(&node.data_dir, block).expect("ipam");
    let allocation = store
        .snapshot()
        .expect("allocations")
        .into_iter()
        .find(|a| a.ip == ip)
        .unwrap_or_else(|| panic!("no IPAM record for {ip}"));
    assert_eq!(allocation.container_id, sandboxes[0].id, "CNI_CONTAINERID");
    assert_eq!(allocation.network.as_deref(), Some(host.network.as_str()));
    assert_eq!(allocation.ifname, "eth0");

    // Resources became cgroup limits on the container (cgroupfs, v1 hierarchies).
    let container_id = status.container_statuses.as_ref().expect("statuses")[0]
        .container_id
        .clone()
        .expect("id")
        .trim_start_matches("containerd://")
        .to_owned();
    let memory = host
        .pod_cgroup("memory", &uid(&pods[0]))
        .join(&container_id);
    let limit = std::fs::read_to_string(memory.join("memory.limit_in_bytes"))
        .unwrap_or_else(|e| panic!("{}: {e}", memory.display()));
    assert_eq!(limit.trim(), (64u64 << 20).to_string());
    let cpu = host.pod_cgroup("cpu", &uid(&pods[0])).join(&container_id);
    let quota = std::fs::read_to_string(cpu.join("cpu.cfs_quota_us")).expect("cfs quota");
    assert_eq!(quota.trim(), "50000");
    let shares = std::fs::read_to_string(cpu.join("cpu.shares")).expect("shares");
    assert_eq!(shares.trim(), "102");

    // Another pod reaches web1 over the pod network; its log (CRI format) holds the answer.
    let client = pod(
        "client",
        json!({
            "restartPolicy": "Never",
            // nc, not wget: Debian's busybox-static 1.35 wget segfaults with -T (its
            // timeout); `timeout N wget` works.
            "containers": [{"name": "get", "image": "busybox",
                "command": ["sh", "-c", format!("printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 5 {ip} 8080")]}],
        }),
    );
    pods.push(client.clone());
    let status = host.wait(&pods, "client", Duration::from_secs(60), |s| {
        matches!(s.phase.as_deref(), Some("Succeeded" | "Failed"))
    });
    let log_dir = host
        .dir
        .join("pods")
        .join(format!("default_client_{}", uid(&client)));
    let log = std::fs::read_to_string(log_dir.join("get/0.log")).unwrap_or_default();
    assert_eq!(
        status.phase.as_deref(),
        Some("Succeeded"),
        "client: {log} {status:?}"
    );
    assert!(log.contains("hello from web1"), "client log: {log}");
    // A finished pod's sandbox is stopped: its address goes back (CNI DEL), it is not rerun.
    let client_ip: std::net::Ipv4Addr = status
        .pod_ip
        .as_deref()
        .expect("client podIP")
        .parse()
        .expect("ip");
    let end = Instant::now() + Duration::from_secs(10);
    loop {
        let report = host.sync(&pods);
        let phase = report.statuses["default/client"]
            .as_ref()
            .map(|s| s.phase.clone())
            .expect("status");
        assert_eq!(phase.as_deref(), Some("Succeeded"));
        let held = store
            .snapshot()
            .expect("allocations")
            .iter()
            .any(|a| a.ip == client_ip);
        if !held {
            break;
        }
        assert!(
            Instant::now() < end,
            "the finished client still holds {client_ip}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let sandboxes = host.sandboxes(&uid(&client));
    assert_eq!(sandboxes.len(), 1, "{sandboxes:?}");
    assert_eq!(
        sandboxes[0].state,
        k8s_cri::v1::PodSandboxState::SandboxNotready as i32
    );

    // Deleting the Pods (no longer desired) removes sandboxes, addresses, veths, map entries,
    // cgroups and logs.
    let report = host.sync(&[]);
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    assert_eq!(report.removed.len(), 4, "{:?}", report.removed);
    for p in &pods {
        assert!(host.sandboxes(&uid(p)).is_empty());
        assert!(!host.pod_cgroup("memory", &uid(p)).exists());
    }
    assert!(!log_dir.exists());
    assert_eq!(host.cluster.leftovers(1), Leftovers::default());
}

#[test]
#[cfg_attr(
    not(feature = "privileged"),
    ignore = "privileged: root + BPF + netns + containerd; run scripts/test.sh"
)]
fn a_crashing_container_is_restarted_with_back_off() {
    let backoff = Backoff {
        initial: Duration::from_millis(1000),
        max: Duration::from_millis(4000),
    };
    let mut host = PodHost::start(backoff);
    let crash = pod(
        "crash",
        json!({"containers": [{"name": "c", "image": "busybox",
                               "command": ["sh", "-c", "echo crashing; exit 1"]}]}),
    );
    let done = pod(
        "done",
        json!({"restartPolicy": "OnFailure",
               "containers": [{"name": "c", "image": "busybox", "command": ["true"]}]}),
    );
    let pods = vec![crash.clone(), done];
    // Each restart's start, and the end of the run before it.
    let mut starts: Vec<(i32, Duration)> = Vec::new();
    let mut saw_backoff = false;
    let status = host.wait(&pods, "crash", Duration::from_secs(60), |s| {
        let c = &s.container_statuses.as_ref().expect("statuses")[0];
        let state = c.state.clone().unwrap_or_default();
        if state
            .waiting
            .as_ref()
            .is_some_and(|w| w.reason.as_deref() == Some("CrashLoopBackOff"))
        {
            saw_backoff = true;
        }
        let started = state
            .running
            .as_ref()
            .and_then(|r| r.started_at.clone())
            .or_else(|| state.terminated.as_ref().and_then(|t| t.started_at.clone()));
        let before = c
            .last_state
            .as_ref()
            .and_then(|l| l.terminated.as_ref())
            .and_then(|t| t.finished_at.clone());
        if let (Some(started), Some(before)) = (started, before)
            && !starts.iter().any(|(n, _)| *n == c.restart_count)
        {
            let gap = started.0.duration_since(before.0);
            starts.push((c.restart_count, gap.unsigned_abs()));
        }
        c.restart_count >= 4
    });
    let c = &status.container_statuses.as_ref().expect("statuses")[0];
    assert_eq!(status.phase.as_deref(), Some("Running"), "{status:?}");
    let last = c
        .last_state
        .as_ref()
        .and_then(|l| l.terminated.as_ref())
        .expect("lastState");
    assert_eq!(last.exit_code, 1);
    assert!(saw_backoff, "never saw CrashLoopBackOff");
    // The gap before restart n is at least the back-off for n-1 restarts: 0, 1 s, 2 s, 4 s.
    starts.sort_by_key(|(n, _)| *n);
    eprintln!(
        "restart gaps (exit -> next start): {}",
        starts
            .iter()
            .map(|(n, gap)| format!("#{n}: {} ms", gap.as_millis()))
            .collect::<Vec<_>>()
            .join(", ")
    );
    for (n, gap) in &starts {
        let expected = backoff.delay(u32::try_from(*n - 1).expect("n"), Duration::ZERO);
        // CRI stamps are nanoseconds; 10 ms allows for the exit being stamped by the shim.
        assert!(
            *gap + Duration::from_millis(10) >= expected,
            "restart #{n} came {gap:?} after the last exit, before its back-off {expected:?}"
        );
    }
    assert!(starts.iter().any(|(n, _)| *n >= 3), "{starts:?}");
    // OnFailure and exit 0: Succeeded, never restarted.
    let done = host.wait(&pods, "done", Duration::from_secs(30), |s| {
        s.phase.as_deref() == Some("Succeeded")
    });
    assert_eq!(
        done.container_statuses.expect("statuses")[0].restart_count,
        0
    );
    // Finished, it stays finished: its sandbox stopped, never replaced.
    for _ in 0..3 {
        let report = host.sync(&pods);
        let status = report.statuses["default/done"].as_ref().expect("status");
        assert_eq!(status.phase.as_deref(), Some("Succeeded"));
    }
    let sandboxes = host.sandboxes(&uid(&pods[1]));
    assert_eq!(sandboxes.len(), 1, "{sandboxes:?}");
    assert_eq!(
        sandboxes[0].state,
        k8s_cri::v1::PodSandboxState::SandboxNotready as i32
    );

    let report = host.sync(&[]);
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    assert!(host.sandboxes(&uid(&crash)).is_empty());
    assert_eq!(host.cluster.leftovers(1), Leftovers::default());
}

#[test]
#[cfg_attr(
    not(feature = "privileged"),
    ignore = "privileged: root + BPF + netns + containerd; run scripts/test.sh"
)]
fn bad_pods_get_status_reasons_and_leave_nothing() {
    let mut host = PodHost::start(Backoff::default());
    let missing = pod(
        "missing",
        json!({"containers": [{"name": "c", "image": "example.com/does-not-exist:1",
                               "imagePullPolicy": "Never"}]}),
    );
    let invalid = pod(
        "invalid",
        json!({"containers": [{"name": "c", "image": "busybox",
                               "resources": {"limits": {"cpu": "-1"}}}]}),
    );
    let pods = vec![missing.clone(), invalid.clone()];
    let report = host.sync(&pods);
    let status = report.statuses["default/missing"].as_ref().expect("status");
    assert_eq!(status.phase.as_deref(), Some("Pending"));
    let waiting = status.container_statuses.as_ref().expect("statuses")[0]
        .state
        .as_ref()
        .and_then(|s| s.waiting.clone())
        .expect("waiting");
    assert_eq!(waiting.reason.as_deref(), Some("ErrImageNeverPull"));
    assert!(
        waiting
            .message
            .as_deref()
            .is_some_and(|m| m.contains("example.com/does-not-exist:1")),
        "{waiting:?}"
    );
    let status = report.statuses["default/invalid"].as_ref().expect("status");
    assert_eq!(status.phase.as_deref(), Some("Failed"));
    assert_eq!(status.reason.as_deref(), Some("Invalid"));
    assert!(
        status
            .message
            .as_deref()
            .is_some_and(|m| m.contains("spec.containers[0].resources.limits.cpu")),
        "{status:?}"
    );
    // Nothing was made for either: no sandbox, no address, no veth.
    for p in &pods {
        assert!(host.sandboxes(&uid(p)).is_empty());
    }
    assert_eq!(host.cluster.leftovers(1), Leftovers::default());

    // No network configuration: the sandbox cannot be made; the pod waits with the runtime's
    // reason, nothing is left, and it starts once the conflist is back.
    let conflist = host.cluster.dir.join("net.d/10-slipway.conflist");
    let saved = std::fs::read(&conflist).expect("conflist");
    std::fs::remove_file(&conflist).expect("remove the conflist");
    let waiting = vec![web("netless")];
    let status = host.wait(&waiting, "netless", Duration::from_secs(30), |s| {
        s.conditions.iter().flatten().any(|c| {
            c.type_ == "PodReadyToStartContainers"
                && c.reason.as_deref() == Some("FailedCreatePodSandBox")
        })
    });
    assert_eq!(status.phase.as_deref(), Some("Pending"));
    let message = status.container_statuses.as_ref().expect("statuses")[0]
        .state
        .as_ref()
        .and_then(|s| s.waiting.as_ref())
        .and_then(|w| w.message.clone())
        .unwrap_or_default();
    assert!(message.contains("cni"), "{message}");
    eprintln!("sandbox without a network: {message}");
    // No address, veth or endpoint; containerd keeps at most a NotReady record of the failed
    // sandbox (it cannot run CNI DEL without a conflist either).
    let left = host.sandboxes(&uid(&waiting[0]));
    assert!(
        left.iter()
            .all(|s| s.state == k8s_cri::v1::PodSandboxState::SandboxNotready as i32),
        "{left:?}"
    );
    assert_eq!(host.cluster.leftovers(1), Leftovers::default());
    std::fs::write(&conflist, &saved).expect("put the conflist back");
    host.wait(&waiting, "netless", Duration::from_secs(60), running);
    // The failed record went when the sandbox was made again.
    let left = host.sandboxes(&uid(&waiting[0]));
    assert_eq!(left.len(), 1, "{left:?}");
}

#[test]
#[cfg_attr(
    not(feature = "privileged"),
    ignore = "privileged: root + BPF + netns + containerd; run scripts/test.sh"
)]
fn a_killed_containerd_is_restarted_and_its_pods_keep_running() {
    let mut host = PodHost::start(Backoff::default());
    let pods = vec![web("survivor")];
    let before = host.wait(&pods, "survivor", Duration::from_secs(60), running);
    let containerd = host.containerd.as_ref().expect("containerd");
    let pid = containerd.pid().expect("pid");
    assert_eq!(containerd.starts(), 1);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(pid).expect("pid")),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill containerd");
    let end = Instant::now() + Duration::from_secs(30);
    while host
        .containerd
        .as_ref()
        .expect("containerd")
        .pid()
        .is_none_or(|p| p == pid)
    {
        assert!(Instant::now() < end, "containerd was not restarted");
        std::thread::sleep(Duration::from_millis(50));
    }
    host.rt
        .block_on(host.containerd.as_ref().expect("containerd").wait_ready())
        .expect("containerd answers again");
    assert_eq!(host.containerd.as_ref().expect("containerd").starts(), 2);
    // The runner reconnects through the same socket path; the pod was never restarted.
    let cri = host.rt.block_on(Cri::connect(&host.socket())).expect("cri");
    let config = RunnerConfig {
        log_root: host.dir.join("pods"),
        cgroup_parent: host.cgroup_parent.clone(),
        backoff: Backoff::default(),
        host_ip: None,
        probe_netns: None,
        dns: None,
    };
    host.runner = Some(PodRunner::new(cri, config));
    let after = host.wait(&pods, "survivor", Duration::from_secs(30), running);
    assert_eq!(after.pod_ip, before.pod_ip);
    let id = |s: &PodStatus| {
        s.container_statuses.as_ref().expect("statuses")[0]
            .container_id
            .clone()
    };
    assert_eq!(id(&after), id(&before));
    assert_eq!(
        after.container_statuses.expect("statuses")[0].restart_count,
        0
    );
}

/// The process id in containerd's pid file once it names a live containerd other than `not`
/// that answers CRI; fails at the deadline.
fn containerd_up(rt: &tokio::runtime::Runtime, dir: &Path, not: Option<i32>) -> i32 {
    let end = Instant::now() + Duration::from_secs(30);
    loop {
        let pid = std::fs::read_to_string(dir.join("containerd.pid"))
            .ok()
            .and_then(|p| p.trim().parse::<i32>().ok())
            .filter(|p| Some(*p) != not && Path::new(&format!("/proc/{p}")).exists());
        if let Some(pid) = pid {
            let answers = rt.block_on(async {
                match Cri::connect(&dir.join("containerd.sock")).await {
                    Ok(mut cri) => cri.version().await.is_ok(),
                    Err(_) => false,
                }
            });
            if answers {
                return pid;
            }
        }
        assert!(
            Instant::now() < end,
            "no containerd answered in {}",
            dir.display()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn gone(pid: i32) -> bool {
    // A zombie still has its /proc entry; its state says Z.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| s.split_whitespace().nth(2) == Some("Z"))
        .unwrap_or(true)
}

fn wait_gone(pid: i32, what: &str) {
    let end = Instant::now() + Duration::from_secs(20);
    while !gone(pid) {
        assert!(Instant::now() < end, "{what} (pid {pid}) is still running");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Ends whatever containerd the pid file in `0` names when the test ends (on panic too): the
/// agent's containerd outlives an agent killed by the cluster's drop.
struct ContainerdReaper(PathBuf);

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

#[test]
#[cfg_attr(
    not(feature = "privileged"),
    ignore = "privileged: root + BPF + netns + containerd; run scripts/test.sh"
)]
fn the_agent_runs_restarts_and_stops_its_containerd() {
    let mut cluster = Cluster::new(1, "vxlan");
    let dir = cluster.dir.join("containerd");
    // Declared after the cluster, so dropped before it (the directory is still there).
    let _reaper = ContainerdReaper(dir.clone());
    let conf_dir = cluster.dir.join("net.d");
    let bin_dir = cluster.cni_path.clone();
    let args = [
        "--containerd-dir",
        dir.to_str().expect("utf-8"),
        "--cni-conf-dir",
        conf_dir.to_str().expect("utf-8"),
        "--cni-bin-dir",
        bin_dir.to_str().expect("utf-8"),
    ];
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    cluster.kill_agent(1);
    cluster.start_agent_with(1, &args);
    let first = containerd_up(&rt, &dir, None);
    // A containerd that dies is started again by the agent.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(first),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill containerd");
    let second = containerd_up(&rt, &dir, Some(first));
    // An agent killed outright leaves its containerd; the next agent ends it and runs its own.
    cluster.kill_agent(1);
    assert!(!gone(second), "containerd went with a SIGKILLed agent");
    cluster.start_agent_with(1, &args);
    let third = containerd_up(&rt, &dir, Some(second));
    wait_gone(second, "the previous agent's containerd");
    // SIGTERM: the agent stops its containerd and exits 0.
    let agent = cluster.nodes[0].agent.take().expect("agent");
    let pid = i32::try_from(agent.id().expect("pid")).expect("pid");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGTERM,
    )
    .expect("SIGTERM agent");
    agent.wait().expect("the agent exits 0 on SIGTERM");
    wait_gone(third, "containerd after the agent's SIGTERM");
    let log = cluster.agent_log(1);
    assert!(log.contains("containerd stopped"), "{log}");
}

#[test]
#[cfg_attr(
    not(feature = "privileged"),
    ignore = "privileged: root + BPF + netns + containerd; run scripts/test.sh"
)]
fn deleted_pods_get_sigterm_then_sigkill_after_their_grace_period() {
    let mut host = PodHost::start(Backoff::default());
    let looping = "while true; do sleep 0.1; done";
    // Leaves at SIGTERM; a 30 s grace period it never needs.
    let polite = pod(
        "polite",
        json!({"terminationGracePeriodSeconds": 30, "containers": [{"name": "c",
            "image": "busybox", "command": ["sh", "-c", format!("trap 'exit 0' TERM; {looping}")]}]}),
    );
    // Ignores SIGTERM: SIGKILLed when its 2 s run out.
    let stubborn = pod(
        "stubborn",
        json!({"terminationGracePeriodSeconds": 2, "containers": [{"name": "c",
            "image": "busybox", "command": ["sh", "-c", format!("trap '' TERM; {looping}")]}]}),
    );
    // Spec says 30 s, but the Pod is being deleted with a 3 s grace period.
    let mut deleted = pod(
        "deleted",
        json!({"terminationGracePeriodSeconds": 30, "containers": [{"name": "c",
            "image": "busybox", "command": ["sh", "-c", format!("trap '' TERM; {looping}")]}]}),
    );
    let mut pods = vec![polite.clone(), stubborn.clone(), deleted.clone()];
    for p in &pods {
        let name = p.metadata.name.clone().expect("name");
        host.wait(&pods, &name, Duration::from_secs(60), running);
    }

    let started = Instant::now();
    let report = host.sync(&pods[1..]);
    let polite_took = started.elapsed();
    assert_eq!(report.removed, ["default/polite"], "{:?}", report.errors);
    assert!(
        polite_took < Duration::from_secs(10),
        "a container that exits at SIGTERM took {polite_took:?} to stop"
    );

    let started = Instant::now();
    let report = host.sync(&pods[2..]);
    let stubborn_took = started.elapsed();
    assert_eq!(report.removed, ["default/stubborn"], "{:?}", report.errors);
    assert!(
        stubborn_took >= Duration::from_secs(2) && stubborn_took < Duration::from_secs(10),
        "a container ignoring SIGTERM with a 2 s grace period took {stubborn_took:?}"
    );

    deleted.metadata.deletion_timestamp = Some(
        k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(k8s_openapi::jiff::Timestamp::now()),
    );
    deleted.metadata.deletion_grace_period_seconds = Some(3);
    pods = vec![deleted.clone()];
    let started = Instant::now();
    let report = host.sync(&pods);
    let deleted_took = started.elapsed();
    assert!(report.statuses.is_empty(), "a deleting Pod gets no status");
    assert_eq!(report.removed, ["default/deleted"], "{:?}", report.errors);
    assert!(
        deleted_took >= Duration::from_secs(3) && deleted_took < Duration::from_secs(12),
        "deletionGracePeriodSeconds 3 took {deleted_took:?}"
    );
    eprintln!(
        "termination: SIGTERM-handling {} ms; SIGTERM-ignoring, grace 2 s: {} ms; deletion grace 3 s: {} ms",
        polite_took.as_millis(),
        stubborn_took.as_millis(),
        deleted_took.as_millis()
    );
    for p in [&polite, &stubborn, &deleted] {
        assert!(host.sandboxes(&uid(p)).is_empty());
    }
    assert_eq!(host.cluster.leftovers(1), Leftovers::default());
}

/// `slipway image import` on `args`; its exit status and stderr.
fn import(host: &PodHost, args: &[&str]) -> (bool, String) {
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

#[test]
#[cfg_attr(
    not(feature = "privileged"),
    ignore = "privileged: root + BPF + netns + containerd; run scripts/test.sh"
)]
fn image_archives_oci_and_docker_are_imported_under_new_names_and_their_cmds_run() {
    let mut host = PodHost::start(Backoff::default());
    let rootfs = host.cluster.dir.join("busybox-rootfs");
    let archive = host.cluster.dir.join("tools.tar");
    slipway_agent::pods::image::build_archive(
        "tools:1",
        &rootfs,
        &slipway_agent::pods::image::ImageConfig {
            entrypoint: vec!["sh".into(), "-c".into()],
            cmd: vec!["echo \"from the archive, $GREETING\"; exec sleep 3600".into()],
            env: vec!["GREETING=hello".into()],
            working_dir: Some("/tmp".into()),
        },
        &archive,
    )
    .expect("archive");
    let (ok, stderr) = import(
        &host,
        &["example.com/tools:2", archive.to_str().expect("utf-8")],
    );
    assert!(ok, "{stderr}");
    // Bad input: a bad name, a missing source, image config flags with an archive.
    let (ok, stderr) = import(&host, &["Tools", archive.to_str().expect("utf-8")]);
    assert!(!ok && stderr.contains("NAME"), "{stderr}");
    let (ok, stderr) = import(&host, &["tools", "/nonexistent/rootfs"]);
    assert!(!ok && stderr.contains("DIR|TAR"), "{stderr}");
    let (ok, stderr) = import(
        &host,
        &["tools", archive.to_str().expect("utf-8"), "--env", "A=b"],
    );
    assert!(!ok && stderr.contains("--env"), "{stderr}");

    // The image's Entrypoint, Cmd and Env run when the Pod gives no command.
    let tools = pod(
        "tools",
        json!({"containers": [{"name": "t", "image": "example.com/tools:2"}]}),
    );
    let pods = vec![tools.clone()];
    host.wait(&pods, "tools", Duration::from_secs(60), running);
    let log = host
        .dir
        .join("pods")
        .join(format!("default_tools_{}", uid(&tools)))
        .join("t/0.log");
    let end = Instant::now() + Duration::from_secs(10);
    loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if text.contains("from the archive, hello") {
            break;
        }
        assert!(Instant::now() < end, "log {}: {text:?}", log.display());
        std::thread::sleep(Duration::from_millis(50));
    }

    // A docker archive (`podman save --format docker-archive` of a rootfs podman imported).
    let podman_dir = host.cluster.dir.join("podman");
    std::fs::create_dir_all(&podman_dir).expect("podman dir");
    let rootfs_tar = podman_dir.join("rootfs.tar");
    let status = Command::new("tar")
        .arg("-C")
        .arg(&rootfs)
        .arg("-cf")
        .arg(&rootfs_tar)
        .arg(".")
        .status()
        .expect("tar");
    assert!(status.success());
    let docker_tar = podman_dir.join("docker.tar");
    let podman = |args: &[&str]| {
        let out = Command::new("podman")
            .arg("--root")
            .arg(podman_dir.join("root"))
            .arg("--runroot")
            .arg(podman_dir.join("runroot"))
            .args(["--storage-driver", "vfs"])
            .args(args)
            .output()
            .expect("podman (Debian package podman)");
        assert!(
            out.status.success(),
            "podman {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    podman(&[
        "import",
        "--change",
        "CMD [\"/bin/busybox\", \"echo\", \"from a docker archive\"]",
        rootfs_tar.to_str().expect("utf-8"),
        "localhost/podman-made:1",
    ]);
    podman(&[
        "save",
        "--format",
        "docker-archive",
        "-o",
        docker_tar.to_str().expect("utf-8"),
        "localhost/podman-made:1",
    ]);
    let (ok, stderr) = import(
        &host,
        &["docker-made:1", docker_tar.to_str().expect("utf-8")],
    );
    assert!(ok, "{stderr}");
    let once = pod(
        "once",
        json!({"restartPolicy": "Never",
               "containers": [{"name": "o", "image": "docker-made:1"}]}),
    );
    let log = host
        .dir
        .join("pods")
        .join(format!("default_once_{}", uid(&once)))
        .join("o/0.log");
    let pods = vec![once];
    let status = host.wait(&pods, "once", Duration::from_secs(60), |s| {
        matches!(s.phase.as_deref(), Some("Succeeded" | "Failed"))
    });
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert_eq!(status.phase.as_deref(), Some("Succeeded"), "{text}");
    assert!(text.contains("from a docker archive"), "{text:?}");

    let report = host.sync(&[]);
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    assert_eq!(host.cluster.leftovers(1), Leftovers::default());
}

#[test]
#[cfg_attr(
    not(feature = "privileged"),
    ignore = "privileged: root + BPF + netns + containerd; run scripts/test.sh"
)]
fn probes_gate_readiness_and_restart_unhealthy_containers() {
    let mut host = PodHost::start(Backoff {
        initial: Duration::from_millis(500),
        max: Duration::from_secs(2),
    });
    // Ready only once /ready exists (2 s after start); alive while port 8080 accepts.
    let web = pod(
        "web",
        json!({"containers": [{"name": "httpd", "image": "busybox",
            "ports": [{"name": "http", "containerPort": 8080}],
            "command": ["sh", "-c", "mkdir -p /www; echo ok > /www/index.html; \
                (sleep 2; echo ready > /www/ready) & exec httpd -f -p 8080 -h /www"],
            "readinessProbe": {"httpGet": {"path": "/ready", "port": "http"},
                               "periodSeconds": 1, "failureThreshold": 1},
            "livenessProbe": {"tcpSocket": {"port": 8080}, "periodSeconds": 1}}]}),
    );
    // Healthy for 3 s, then its exec liveness probe fails twice: killed and restarted.
    let sick = pod(
        "sick",
        json!({"terminationGracePeriodSeconds": 1,
            "containers": [{"name": "c", "image": "busybox",
            "command": ["sh", "-c", "touch /tmp/healthy; (sleep 3; rm /tmp/healthy) & exec sleep 3600"],
            "livenessProbe": {"exec": {"command": ["cat", "/tmp/healthy"]},
                              "periodSeconds": 1, "failureThreshold": 2}}]}),
    );
    let pods = vec![web.clone(), sick.clone()];
    let mut saw_unready = false;
    let started = Instant::now();
    let status = host.wait(&pods, "web", Duration::from_secs(60), |s| {
        let c = &s.container_statuses.as_ref().expect("statuses")[0];
        let running = c.state.as_ref().is_some_and(|s| s.running.is_some());
        if running && !c.ready {
            saw_unready = true;
        }
        running && c.ready
    });
    let became_ready = started.elapsed();
    assert!(saw_unready, "web was never seen running but not ready");
    assert!(running(&status), "{status:?}");
    assert!(
        became_ready >= Duration::from_secs(2),
        "ready after {became_ready:?}"
    );

    let status = host.wait(&pods, "sick", Duration::from_secs(60), |s| {
        s.container_statuses.as_ref().expect("statuses")[0].restart_count >= 1
    });
    let c = &status.container_statuses.as_ref().expect("statuses")[0];
    let last = c
        .last_state
        .as_ref()
        .and_then(|l| l.terminated.as_ref())
        .expect("lastState.terminated");
    // Ended by the runner's StopContainer (SIGTERM, SIGKILL after the 1 s grace period), not
    // by itself: 128 + the signal.
    assert!([128 + 15, 128 + 9].contains(&last.exit_code), "{last:?}");
    let web_status = host.wait(&pods, "web", Duration::from_secs(10), running);
    assert_eq!(
        web_status.container_statuses.expect("statuses")[0].restart_count,
        0,
        "the tcpSocket liveness probe kept web alive"
    );
    eprintln!(
        "probes: web ready after {} ms (its /ready appears at 2 s); sick restarted after its exec probe failed",
        became_ready.as_millis()
    );
    let report = host.sync(&[]);
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    assert_eq!(host.cluster.leftovers(1), Leftovers::default());
}

#[test]
#[cfg_attr(
    not(feature = "privileged"),
    ignore = "privileged: root + BPF + netns + containerd; run scripts/test.sh"
)]
fn a_host_port_reaches_the_pod_through_the_chained_portmap() {
    let mut host = PodHost::start(Backoff::default());
    let mut web = web("hostport");
    let spec = web.spec.as_mut().expect("spec");
    spec.containers[0].ports = Some(vec![k8s_openapi::api::core::v1::ContainerPort {
        container_port: 8080,
        host_port: Some(18080),
        ..Default::default()
    }]);
    let pods = vec![web];
    host.wait(&pods, "hostport", Duration::from_secs(60), running);
    let node = host.cluster.node(1);
    let nat = |netns: &slipway_dataplane::testing::Netns| {
        let out = netns
            .exec(&["iptables", "-t", "nat", "-S"])
            .expect("iptables (Debian package iptables)");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let rules = nat(&node.netns);
    assert!(
        rules.contains("--dport 18080"),
        "portmap made no DNAT rule for hostPort 18080:\n{rules}"
    );
    // The node's own address and the hostPort reach the pod's httpd (portmap's OUTPUT DNAT).
    let request = format!(
        "printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 5 {} 18080",
        node.address
    );
    let end = Instant::now() + Duration::from_secs(15);
    loop {
        let out = node.netns.exec(&["sh", "-c", &request]).expect("nc");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        if text.contains("hello from hostport") {
            break;
        }
        assert!(
            Instant::now() < end,
            "{}:18080 answered {text:?} {}",
            node.address,
            String::from_utf8_lossy(&out.stderr)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let report = host.sync(&[]);
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    let rules = nat(&host.cluster.node(1).netns);
    assert!(
        !rules.contains("--dport 18080"),
        "portmap's rule outlived the pod:\n{rules}"
    );
    assert_eq!(host.cluster.leftovers(1), Leftovers::default());
}

#[test]
#[cfg_attr(
    not(feature = "privileged"),
    ignore = "privileged: root + BPF + netns + containerd; run scripts/test.sh"
)]
fn a_changed_image_replaces_the_container_and_a_dropped_container_goes() {
    let mut host = PodHost::start(Backoff::default());
    let rootfs = host.cluster.dir.join("busybox-rootfs");
    let (ok, stderr) = import(&host, &["busybox:2", rootfs.to_str().expect("utf-8")]);
    assert!(ok, "{stderr}");
    let looping = "trap 'exit 0' TERM; while true; do sleep 0.1; done";
    let mut p = pod(
        "change",
        json!({"terminationGracePeriodSeconds": 5, "containers": [
            {"name": "main", "image": "busybox", "command": ["sh", "-c", looping]},
            {"name": "side", "image": "busybox", "command": ["sh", "-c", looping]}]}),
    );
    let before = host.wait(&[p.clone()], "change", Duration::from_secs(60), running);
    let id = |s: &PodStatus, i: usize| {
        s.container_statuses.as_ref().expect("statuses")[i]
            .container_id
            .clone()
            .expect("id")
    };
    let spec = p.spec.as_mut().expect("spec");
    spec.containers[0].image = Some("busybox:2".into());
    spec.containers.truncate(1);
    let after = host.wait(&[p.clone()], "change", Duration::from_secs(60), |s| {
        let c = &s.container_statuses.as_ref().expect("statuses")[0];
        running(s) && c.image == "busybox:2"
    });
    let c = &after.container_statuses.as_ref().expect("statuses")[0];
    assert_eq!(c.restart_count, 1);
    assert_ne!(id(&after, 0), id(&before, 0));
    // It went by SIGTERM (exit 0 from its trap), not by SIGKILL.
    let last = c
        .last_state
        .as_ref()
        .and_then(|l| l.terminated.as_ref())
        .expect("lastState");
    assert_eq!(last.exit_code, 0, "{last:?}");
    // The sandbox holds the replaced instance (kept for lastState) and no "side".
    let sandbox = host.sandboxes(&uid(&p)).pop().expect("sandbox");
    let socket = host.socket();
    let names: Vec<String> = host.rt.block_on(async {
        let mut cri = Cri::connect(&socket).await.expect("cri");
        cri.list_containers(&sandbox.id)
            .await
            .expect("ListContainers")
            .into_iter()
            .filter_map(|c| c.metadata.map(|m| format!("{}/{}", m.name, m.attempt)))
            .collect()
    });
    let mut names = names;
    names.sort();
    assert_eq!(names, ["main/0", "main/1"]);
    let report = host.sync(&[]);
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    assert_eq!(host.cluster.leftovers(1), Leftovers::default());
}

/// The runner fed by a cluster API as kubelet is: a Pod bound to this host's Node through the
/// API runs, its status (Running, podIP of the host block) is written back to the Pod, and
/// deleting the Pod tears its sandbox down.
#[test]
#[cfg_attr(
    not(feature = "privileged"),
    ignore = "privileged: root + BPF + netns + containerd; run scripts/test.sh"
)]
fn pods_bound_to_the_node_through_the_api_run_and_report_their_status() {
    use kube::api::{Api, DeleteParams, PostParams};
    let mut host = PodHost::start(Backoff::default());
    let block: ipnetwork::Ipv4Network = host.cluster.node(1).block.parse().expect("block");
    let api = sup::Supervisor::start("kubelet");
    let client = host.rt.block_on(api.admin());
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let mut p = web("api-web");
    p.metadata.uid = None;
    p.spec.as_mut().expect("spec").node_name = Some("n1".into());
    let created = host
        .rt
        .block_on(pods.create(&PostParams::default(), &p))
        .expect("create the Pod");
    let uid = created.metadata.uid.clone().expect("uid");

    let runner = host.runner.take().expect("runner");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = host.rt.spawn(slipway_agent::pods::kubelet::run_until(
        client.clone(),
        "n1".into(),
        runner,
        async {
            let _ = stopped.await;
        },
    ));
    let status = host.rt.block_on(sup::wait_for(
        "the Pod Running in the API",
        Duration::from_secs(60),
        || async { pods.get("api-web").await.ok()?.status.filter(running) },
    ));
    let ip: std::net::Ipv4Addr = status
        .pod_ip
        .as_deref()
        .expect("podIP")
        .parse()
        .expect("ip");
    assert!(block.contains(ip), "{ip} is outside {block}");
    assert_eq!(host.sandboxes(&uid).len(), 1, "one sandbox for the Pod");

    host.rt
        .block_on(pods.delete("api-web", &DeleteParams::default()))
        .expect("delete the Pod");
    let deadline = Instant::now() + Duration::from_secs(60);
    while !host.sandboxes(&uid).is_empty() {
        assert!(
            Instant::now() < deadline,
            "the Pod's sandbox was not torn down"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = stop.send(());
    host.runner = Some(host.rt.block_on(task).expect("the loop ends"));
}

#[test]
#[cfg_attr(
    not(feature = "privileged"),
    ignore = "privileged: root + BPF + netns + containerd; run scripts/test.sh"
)]
fn pods_resolve_services_through_the_node_dns_and_its_search_path() {
    use kube::runtime::reflector;
    use kube::runtime::watcher::Event;
    use slipway_agent::dns::{DnsConfig, DnsServer};
    use slipway_agent::pods::dns::ClusterDns;

    let mut host = PodHost::start(Backoff::default());
    // The node's DNS server, as `slipway agent --dns-listen <underlay address>:53` runs it,
    // with its sockets bound in the host's network namespace; the Service store filled by hand.
    let node_ip = host.cluster.node(1).address;
    let netns = host.cluster.node(1).netns.name().to_owned();
    let listen = std::net::SocketAddr::new(node_ip.into(), 53);
    let (udp, tcp) = slipway_dataplane::netns::run_in(&netns, || {
        (
            std::net::UdpSocket::bind(listen),
            std::net::TcpListener::bind(listen),
        )
    })
    .expect("the host's netns");
    let (services, mut writer) = reflector::store();
    let web: k8s_openapi::api::core::v1::Service = serde_json::from_value(json!({
        "metadata": {"name": "web", "namespace": "default"},
        "spec": {"clusterIP": "10.96.0.10", "ports": [{"port": 80}]}
    }))
    .expect("service");
    writer.apply_watcher_event(&Event::Init);
    writer.apply_watcher_event(&Event::InitApply(web));
    writer.apply_watcher_event(&Event::InitDone);
    let config = DnsConfig {
        listen,
        domain: "cluster.local".into(),
        upstreams: Vec::new(),
        forward_timeout: Duration::from_secs(1),
    };
    let server = {
        let _runtime = host.rt.enter();
        DnsServer::from_std(
            config.clone(),
            udp.expect("bind udp"),
            tcp.expect("bind tcp"),
            services,
            None,
        )
        .expect("dns server")
    };
    let cri = host.rt.block_on(Cri::connect(&host.socket())).expect("cri");
    host.runner = Some(PodRunner::new(
        cri,
        RunnerConfig {
            log_root: host.dir.join("pods"),
            cgroup_parent: host.cgroup_parent.clone(),
            backoff: Backoff::default(),
            host_ip: None,
            probe_netns: None,
            dns: config.pod_dns(node_ip.into()),
        },
    ));
    assert_eq!(
        config.pod_dns(node_ip.into()),
        Some(ClusterDns {
            servers: vec![node_ip.into()],
            domain: "cluster.local".into()
        })
    );

    let client = pod(
        "lookup",
        json!({
            "restartPolicy": "Never",
            "containers": [{"name": "dns", "image": "busybox",
                "command": ["sh", "-c", "cat /etc/resolv.conf; echo FULL; \
                    nslookup -type=a web.default.svc.cluster.local; echo SHORT; \
                    nslookup -type=a web; echo END"]}],
        }),
    );
    let pods = vec![client.clone()];
    let status = host.wait(&pods, "lookup", Duration::from_secs(60), |s| {
        matches!(s.phase.as_deref(), Some("Succeeded" | "Failed"))
    });
    let log = std::fs::read_to_string(
        host.dir
            .join("pods")
            .join(format!("default_lookup_{}", uid(&client)))
            .join("dns/0.log"),
    )
    .unwrap_or_default();
    // CRI log lines: `<time> stdout F <text>`.
    let text: Vec<&str> = log
        .lines()
        .map(|l| l.splitn(4, ' ').nth(3).unwrap_or_default())
        .collect();
    let text = text.join("\n");
    assert_eq!(
        status.phase.as_deref(),
        Some("Succeeded"),
        "{text}\n{status:?}"
    );
    assert!(
        text.lines().any(|l| l
            .trim()
            .starts_with("search default.svc.cluster.local svc.cluster.local cluster.local")),
        "resolv.conf: {text}"
    );
    assert!(
        text.contains(&format!("nameserver {}", node_ip)),
        "resolv.conf: {text}"
    );
    assert!(text.contains("options ndots:5"), "resolv.conf: {text}");
    let (full, short) = text
        .split_once("SHORT")
        .expect("the script ran to its second lookup");
    assert!(
        full.contains("Address: 10.96.0.10"),
        "the full name: {full}"
    );
    assert!(
        short.contains("Address: 10.96.0.10"),
        "the short name through the search path: {short}"
    );
    let metrics = server.render_metrics();
    assert!(
        metrics.contains(r#"slipway_dns_queries_total{source="cluster",rcode="NOERROR"}"#),
        "{metrics}"
    );
    let _runtime = host.rt.enter();
    drop(server);
}

/// A blocking DNS question to `server` from the calling thread's network namespace.
fn dig(server: std::net::SocketAddr, name: &str) -> Option<hickory_proto::op::Message> {
    use hickory_proto::op::{Message, MessageType, OpCode, Query};
    use hickory_proto::rr::{Name, RecordType};
    use std::str::FromStr as _;
    let mut query = Message::new(0x5157, MessageType::Query, OpCode::Query);
    query.metadata.recursion_desired = true;
    query.add_query(Query::query(Name::from_str(name).ok()?, RecordType::A));
    let socket = std::net::UdpSocket::bind("0.0.0.0:0").ok()?;
    socket.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    socket.send_to(&query.to_vec().ok()?, server).ok()?;
    let mut buf = [0u8; 1500];
    let n = socket.recv(&mut buf).ok()?;
    Message::from_vec(&buf[..n]).ok()
}

/// `slipway agent --dns-listen` end to end: its reflectors over the cluster API (a supervisor
/// in the host's network namespace, where the agent reaches it), its server on the host's
/// address, names outside the zone forwarded (to a nameserver that is not there: SERVFAIL),
/// its counters on /metrics.
#[test]
#[cfg_attr(
    not(feature = "privileged"),
    ignore = "privileged: root + BPF + netns + containerd; run scripts/test.sh"
)]
fn the_agent_answers_cluster_dns_from_its_cluster_api() {
    use hickory_proto::op::ResponseCode;
    use hickory_proto::rr::RData;
    use k8s_openapi::api::core::v1::{Namespace, Service};
    use kube::api::{Api, PostParams};

    let mut cluster = Cluster::new(1, "vxlan");
    let dir = cluster.dir.join("containerd");
    let _reaper = ContainerdReaper(dir.clone());
    let netns = cluster.node(1).netns.name().to_owned();
    let node_ip = cluster.node(1).address;
    let sup = slipway_dataplane::netns::run_in(&netns, || sup::Supervisor::start("agent-dns"))
        .expect("the host's netns");
    // The host's resolv.conf of this test: a nameserver nobody answers at.
    let resolv = cluster.dir.join("resolv.conf");
    std::fs::write(&resolv, "nameserver 127.0.0.1\n").expect("resolv.conf");
    let listen = format!("{node_ip}:53");
    let conf_dir = cluster.dir.join("net.d");
    let bin_dir = cluster.cni_path.clone();
    let kubeconfig = sup.kubeconfig();
    let args = [
        "--containerd-dir",
        dir.to_str().expect("utf-8"),
        "--cni-conf-dir",
        conf_dir.to_str().expect("utf-8"),
        "--cni-bin-dir",
        bin_dir.to_str().expect("utf-8"),
        "--cluster-kubeconfig",
        kubeconfig.to_str().expect("utf-8"),
        "--node-name",
        "n1",
        "--dns-listen",
        &listen,
        "--dns-resolv-conf",
        resolv.to_str().expect("utf-8"),
        "--dns-forward-timeout",
        "200ms",
    ];
    cluster.kill_agent(1);
    cluster.start_agent_with(1, &args);

    let server: std::net::SocketAddr = listen.parse().expect("listen");
    let cluster_ip = slipway_dataplane::netns::run_in(&netns, || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async {
            let client = sup.admin().await;
            let namespace: Namespace =
                serde_json::from_value(json!({"metadata": {"name": "apps"}})).expect("ns");
            Api::<Namespace>::all(client.clone())
                .create(&PostParams::default(), &namespace)
                .await
                .expect("create the namespace");
            let web: Service = serde_json::from_value(json!({
                "metadata": {"name": "web", "namespace": "apps"},
                "spec": {"ports": [{"port": 80}]}
            }))
            .expect("service");
            Api::<Service>::namespaced(client, "apps")
                .create(&PostParams::default(), &web)
                .await
                .expect("create web")
                .spec
                .and_then(|s| s.cluster_ip)
                .expect("a ClusterIP")
        })
    })
    .expect("the host's netns");

    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let answer =
            slipway_dataplane::netns::run_in(&netns, || dig(server, "web.apps.svc.cluster.local."))
                .expect("the host's netns");
        let addresses: Vec<String> = answer
            .iter()
            .flat_map(|m| &m.answers)
            .filter_map(|r| match &r.data {
                RData::A(a) => Some(a.0.to_string()),
                _ => None,
            })
            .collect();
        if addresses == [cluster_ip.clone()] {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "web.apps is not {cluster_ip} in the agent's DNS: {answer:?}\n{}",
            cluster.agent_log(1)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let outside = slipway_dataplane::netns::run_in(&netns, || dig(server, "example.org."))
        .expect("the host's netns")
        .expect("an answer");
    assert_eq!(outside.metadata.response_code, ResponseCode::ServFail);

    let (code, metrics) =
        common::api(&cluster.node(1).socket, "GET", "/metrics", None).expect("/metrics");
    assert_eq!(code, 200, "{metrics}");
    for series in [
        r#"slipway_dns_queries_total{source="cluster",rcode="NOERROR"}"#,
        r#"slipway_dns_queries_total{source="forwarded",rcode="SERVFAIL"} 1"#,
        "slipway_datapath_packets",
    ] {
        assert!(metrics.contains(series), "{series} missing from\n{metrics}");
    }
    assert_eq!(metrics.matches("# EOF").count(), 1, "{metrics}");
    cluster.kill_agent(1);
}

/// A kubectl run against `kubeconfig`: (succeeded, stdout, stderr).
fn kubectl(bin: &Path, kubeconfig: &Path, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(bin)
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running {}: {e}", bin.display()));
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `kubectl logs` as on Kubernetes: the Pod's containers (through the host's containerd) write
/// CRI log files; the kubelet endpoint serves them over mutual TLS; the supervisor finds the
/// Pod's Node and proxies `pods/log` to it. Both kubectls (the system's and Debian's 1.20) read
/// stdout and stderr, `--tail`, `--timestamps`, `--limit-bytes`, `-c`, `--previous` after a
/// restart, and `-f` gets a line written after it started; an unknown container is an error; a
/// client certificate of another CA, or of the cluster's CA with another name, is refused by
/// the kubelet endpoint.
#[test]
#[cfg_attr(
    not(feature = "privileged"),
    ignore = "privileged: root + BPF + netns + containerd; run scripts/test.sh"
)]
fn kubectl_logs_reads_container_logs_through_the_supervisor_and_the_kubelet_endpoint() {
    use k8s_openapi::api::core::v1::Node;
    use kube::api::{Api, LogParams, Patch, PatchParams, PostParams};
    use std::io::BufRead as _;
    let mut host = PodHost::start(Backoff {
        initial: Duration::from_millis(1000),
        max: Duration::from_millis(4000),
    });
    let api = sup::Supervisor::start("logs");
    let client = host.rt.block_on(api.admin());

    // The kubelet endpoint, as `slipway agent --kubelet-listen` starts it. The supervisor runs
    // in the root namespace: the endpoint listens there too, at the Node's InternalIP.
    let kubelet = host
        .rt
        .block_on(slipway_agent::kubelet_api::start(
            "127.0.0.1:0".parse().expect("addr"),
            &api.kubeconfig(),
            host.dir.join("pods"),
            vec!["n1".into(), "127.0.0.1".into()],
            &host.socket(),
        ))
        .unwrap_or_else(|e| panic!("kubelet endpoint: {}", slipway_agent::pods::error_chain(&e)));
    let port = kubelet.local_addr().expect("bound").port();
    host.rt.spawn(kubelet.serve());
    let nodes: Api<Node> = Api::all(client.clone());
    host.rt
        .block_on(nodes.create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": "n1"}})).expect("node"),
        ))
        .expect("create the Node");
    host.rt
        .block_on(nodes.patch_status(
            "n1",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {
                "addresses": [{"type": "InternalIP", "address": "127.0.0.1"}],
                "daemonEndpoints": {"kubeletEndpoint": {"Port": port}},
            }})),
        ))
        .expect("the Node's status");

    let long = "x".repeat(20000);
    let mut p = pod(
        "logs",
        json!({
            "terminationGracePeriodSeconds": 1,
            "nodeName": "n1",
            "restartPolicy": "OnFailure",
            "containers": [
                {"name": "main", "image": "busybox", "command": ["sh", "-c",
                 // A line longer than containerd's 16 KiB buffer is written as partial records.
                 "echo out-1; echo err-1 >&2; echo out-2; head -c 20000 /dev/zero | tr '\\0' x; echo; exec sleep 100000"]},
                {"name": "ticker", "image": "busybox", "command": ["sh", "-c",
                 "i=0; while true; do i=$((i+1)); echo tick-$i; sleep 1; done"]},
                {"name": "crash", "image": "busybox", "command": ["sh", "-c",
                 "echo crash-run-$(date +%s%N); exit 1"]},
                {"name": "done", "image": "busybox", "command": ["echo", "finished"]},
            ],
        }),
    );
    p.metadata.uid = None;
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let uid = host
        .rt
        .block_on(pods.create(&PostParams::default(), &p))
        .expect("create the Pod")
        .metadata
        .uid
        .expect("uid");
    let runner = host.runner.take().expect("runner");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = host.rt.spawn(slipway_agent::pods::kubelet::run_until(
        client.clone(),
        "n1".into(),
        runner,
        async {
            let _ = stopped.await;
        },
    ));

    // The API's own answers: the container must be named; an unknown one is refused.
    let err = host
        .rt
        .block_on(pods.logs("logs", &LogParams::default()))
        .expect_err("three containers");
    assert!(
        err.to_string().contains(
            "a container name must be specified for pod logs, choose one of: [main ticker crash done]"
        ),
        "{err}"
    );

    let kubeconfig = api.kubeconfig();
    let debian = PathBuf::from("/opt/slipway/kubernetes-client/usr/bin/kubectl");
    let kubectls: Vec<PathBuf> = [PathBuf::from("/usr/bin/kubectl"), debian]
        .into_iter()
        .filter(|k| k.exists())
        .collect();
    assert!(!kubectls.is_empty(), "no kubectl installed");
    let main_lines = ["out-1", "err-1", "out-2", long.as_str()];
    let whole = host.rt.block_on(sup::wait_for(
        "main's whole log through kubectl logs",
        Duration::from_secs(60),
        || async {
            let (ok, out, _) = kubectl(&kubectls[0], &kubeconfig, &["logs", "logs", "-c", "main"]);
            (ok && out.lines().count() == main_lines.len()).then_some(out)
        },
    ));
    for bin in &kubectls {
        let run = |args: &[&str]| {
            let (ok, out, err) = kubectl(bin, &kubeconfig, args);
            assert!(ok, "{} {args:?}: {err}", bin.display());
            out
        };
        let out = run(&["logs", "logs", "-c", "main"]);
        assert_eq!(out, whole, "{}", bin.display());
        let mut got: Vec<&str> = out.lines().collect();
        // stdout and stderr are separate pipes: their lines keep their order within a stream.
        let stdout: Vec<&str> = got.iter().copied().filter(|l| *l != "err-1").collect();
        assert_eq!(stdout, ["out-1", "out-2", long.as_str()]);
        got.sort_unstable();
        let mut want = main_lines.to_vec();
        want.sort_unstable();
        assert_eq!(got, want, "stdout and stderr, the long line joined");

        assert_eq!(
            run(&["logs", "logs", "-c", "main", "--tail=1"]),
            format!("{long}\n")
        );
        assert_eq!(
            run(&["logs", "logs", "-c", "main", "--tail=1", "--limit-bytes=5"]),
            "xxxxx"
        );
        let stamped = run(&["logs", "logs", "-c", "main", "--timestamps"]);
        assert_eq!(stamped.lines().count(), main_lines.len(), "{stamped}");
        for line in stamped.lines() {
            let (time, text) = line.split_once(' ').expect("a timestamp and the text");
            time.parse::<k8s_openapi::jiff::Timestamp>()
                .unwrap_or_else(|e| panic!("{time:?} is not RFC 3339: {e}"));
            assert!(main_lines.contains(&text), "{text:?}");
        }

        let (ok, _, err) = kubectl(bin, &kubeconfig, &["logs", "logs", "-c", "nope"]);
        assert!(!ok, "an unknown container must fail");
        assert!(
            err.contains("container nope is not valid for pod logs"),
            "{err}"
        );
        let (ok, _, err) = kubectl(
            bin,
            &kubeconfig,
            &["logs", "logs", "-c", "main", "--previous"],
        );
        assert!(!ok, "main never restarted");
        assert!(err.contains("previous terminated container"), "{err}");
    }
    // Debian's kubectl 1.20 asks the API to pick the container; later ones pick the first.
    if let Some(old) = kubectls.iter().find(|k| k.starts_with("/opt")) {
        let (ok, _, err) = kubectl(old, &kubeconfig, &["logs", "logs"]);
        assert!(!ok);
        assert!(
            err.contains("choose one of: [main ticker crash done]"),
            "{err}"
        );
    }

    // --previous: the instance before the running one, after the crashing container restarted.
    host.rt.block_on(sup::wait_for(
        "the crashing container restarted",
        Duration::from_secs(60),
        || async {
            let pod = pods.get("logs").await.ok()?;
            let statuses = pod.status?.container_statuses?;
            statuses
                .iter()
                .any(|c| c.name == "crash" && c.restart_count >= 1)
                .then_some(())
        },
    ));
    for bin in &kubectls {
        let (ok, out, err) = kubectl(
            bin,
            &kubeconfig,
            &["logs", "logs", "-c", "crash", "--previous"],
        );
        assert!(ok, "{err}");
        assert!(
            out.starts_with("crash-run-") && out.lines().count() == 1,
            "{out:?}"
        );
    }

    // -f: a line the ticker writes after kubectl started comes through while it runs.
    for bin in &kubectls {
        let (_, before, _) = kubectl(bin, &kubeconfig, &["logs", "logs", "-c", "ticker"]);
        let tick = |l: &str| l.strip_prefix("tick-").and_then(|n| n.parse::<u64>().ok());
        let last = before.lines().filter_map(tick).max().unwrap_or(0);
        let mut child = Command::new(bin)
            .arg("--kubeconfig")
            .arg(&kubeconfig)
            .args(["logs", "-f", "logs", "-c", "ticker"])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("kubectl logs -f");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let deadline = Instant::now() + Duration::from_secs(30);
        let newer = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) if tick(&line).is_some_and(|n| n > last) => break line,
                Ok(_) => {}
                Err(e) => panic!("{}: no tick after tick-{last} from -f: {e}", bin.display()),
            }
        };
        let _ = child.kill();
        let _ = child.wait();
        assert!(newer.starts_with("tick-"), "{newer}");
    }

    // -f of a container that exited for good (OnFailure, exit 0) ends by itself, as kubelet's.
    for bin in &kubectls {
        let mut child = Command::new(bin)
            .arg("--kubeconfig")
            .arg(&kubeconfig)
            .args(["logs", "-f", "logs", "-c", "done"])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("kubectl logs -f");
        let deadline = Instant::now() + Duration::from_secs(30);
        let status = loop {
            if let Some(status) = child.try_wait().expect("wait") {
                break status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("{}: -f of an exited container did not end", bin.display());
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let out = child.wait_with_output().expect("output");
        assert!(status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        assert_eq!(String::from_utf8_lossy(&out.stdout), "finished\n");
    }

    // The kubelet endpoint serves the API server's identity only.
    let url = format!("https://127.0.0.1:{port}/containerLogs/default/logs/main");
    let curl = |cert: &Path, key: &Path| {
        Command::new("curl")
            .args(["-sk", "-o", "/dev/null", "-w", "%{http_code}", "--cert"])
            .arg(cert)
            .arg("--key")
            .arg(key)
            .arg(&url)
            .output()
            .expect("curl")
    };
    // The cluster CA's admin certificate: authenticated, but not the API server.
    let out = curl(
        &api.dir.join("pki/admin.crt"),
        &api.dir.join("pki/admin.key"),
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "403");
    // A certificate of another CA: the handshake fails.
    let foreign =
        rcgen::generate_simple_self_signed(vec![slipway_api::logs::KUBELET_CLIENT_USER.to_owned()])
            .expect("foreign cert");
    let dir = host.cluster.dir.join("foreign");
    std::fs::create_dir_all(&dir).expect("dir");
    std::fs::write(dir.join("c.crt"), foreign.cert.pem()).expect("cert");
    std::fs::write(dir.join("c.key"), foreign.signing_key.serialize_pem()).expect("key");
    let out = curl(&dir.join("c.crt"), &dir.join("c.key"));
    assert!(
        !out.status.success() && String::from_utf8_lossy(&out.stdout) == "000",
        "a foreign certificate got {:?}",
        String::from_utf8_lossy(&out.stdout)
    );
    // No certificate at all: the handshake fails too.
    let out = Command::new("curl")
        .args(["-sk", "-o", "/dev/null", "-w", "%{http_code}"])
        .arg(&url)
        .output()
        .expect("curl");
    assert!(!out.status.success(), "no certificate was served");

    host.rt
        .block_on(pods.delete("logs", &Default::default()))
        .expect("delete the Pod");
    let deadline = Instant::now() + Duration::from_secs(60);
    while !host.sandboxes(&uid).is_empty() {
        assert!(
            Instant::now() < deadline,
            "the Pod's sandbox was not torn down"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = stop.send(());
    host.runner = Some(host.rt.block_on(task).expect("the loop ends"));
}
