//! Pods through a real container runtime: the host agent's containerd (Debian's 1.6, its own
//! root, state, socket and CNI dirs) runs on a host of a CNI test cluster (a network namespace
//! with a `slipway agent`), images imported offline with `slipway image import`, and the pod
//! runner drives core/v1 Pods over CRI. containerd calls the README's conflist (Slipway's plugin
//! chained with portmap), so the pods get addresses of the host block from the plugin.
//! Privileged (root, BPF, netns, containerd): run by scripts/test.sh.

#[path = "../../cni/tests/common/mod.rs"]
mod common;
#[path = "common/pod_host.rs"]
mod pod_host;
#[path = "common/mod.rs"]
mod sup;

use std::path::Path;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Pod, PodStatus};
use pod_host::*;

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
        volume_root: host.dir.join("kubelet-pods"),
        csi: None,
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

fn wait_gone(pid: i32, what: &str) {
    let end = Instant::now() + Duration::from_secs(20);
    while !gone(pid) {
        assert!(Instant::now() < end, "{what} (pid {pid}) is still running");
        std::thread::sleep(Duration::from_millis(50));
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
    let nat = |netns: &slipway_dataplane::world::Netns| {
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
