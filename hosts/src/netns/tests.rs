//! The netns provider against the real kernel: namespaces, veths, routes, cgroups, processes.
//! Each test's provider has a prefix of its own and is torn down by a guard, also on panic.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::os::unix::fs::MetadataExt as _;
use std::sync::Arc;
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use slipway_dataplane::world::{Netns, traffic};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use super::*;

/// A provider with a unique `slipway-t<id>-` prefix over temporary state and data dirs; on drop
/// it tears down everything named with its prefix.
struct Fixture {
    provider: Arc<NetnsProvider>,
    dir: tempfile::TempDir,
}

impl Fixture {
    fn new(zones: &[&str]) -> Self {
        let mut hasher = RandomState::new().build_hasher();
        hasher.write_u32(std::process::id());
        let dir = tempfile::Builder::new()
            .prefix("slipway-hosts-")
            .tempdir()
            .expect("temp dir");
        let prefix = format!("slipway-t{:06x}-", hasher.finish() as u32 & 0xff_ffff);
        let mut config = NetnsConfig::new(prefix, dir.path().join("state"), zones);
        config.stop_grace = Duration::from_secs(2);
        let provider = Arc::new(NetnsProvider::new(config).expect("provider"));
        Self { provider, dir }
    }

    /// Another provider over the same state, as after a restart.
    fn restarted(&self) -> NetnsProvider {
        NetnsProvider::new(self.provider.config().clone()).expect("provider")
    }

    fn spec(&self, name: &str, zone: &str) -> HostSpec {
        HostSpec {
            name: name.into(),
            zone: zone.into(),
            cpu_millis: 250,
            memory_bytes: 128 << 20,
            data_root: self.dir.path().join("data"),
            agent: vec!["sleep".into(), "infinity".into()],
        }
    }

    fn prefix(&self) -> &str {
        &self.provider.config().prefix
    }

    /// Everything named with the prefix that exists: namespaces, cgroups, bpffs entries, and
    /// files under the state and data dirs.
    fn leftovers(&self) -> Vec<String> {
        let mut found = Vec::new();
        let mut scan = |dir: &Path, all: bool| {
            for name in fs::read_dir(dir)
                .map(|e| {
                    e.flatten()
                        .filter_map(|e| e.file_name().into_string().ok())
                        .collect::<Vec<_>>()
                })
                .unwrap_or_default()
            {
                // The state dir's lock file stays, as lock files do.
                if (all && name != ".lock") || name.starts_with(self.prefix()) {
                    found.push(dir.join(name).display().to_string());
                }
            }
        };
        scan(Path::new(netns::NETNS_RUN_DIR), false);
        for root in ["cpu", "memory", "unified"] {
            scan(&Path::new("/sys/fs/cgroup").join(root), false);
        }
        scan(Path::new("/sys/fs/bpf"), false);
        scan(&self.dir.path().join("state"), true);
        scan(&self.dir.path().join("data"), true);
        found
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let provider = Arc::clone(&self.provider);
        // A runtime of its own on a thread of its own: drop may run inside the test's runtime.
        let joined = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            runtime.block_on(provider.teardown())
        })
        .join();
        if let Ok(Err(e)) = joined {
            eprintln!("teardown: {e}");
        }
    }
}

/// The (dev, inode) of a namespace, to find its processes after its name is gone.
fn netns_id(name: &str) -> (u64, u64) {
    let m = fs::metadata(netns::path(name)).expect("namespace exists");
    (m.dev(), m.ino())
}

fn field_of(err: &HostError) -> Vec<&'static str> {
    match err {
        HostError::Invalid(problems) => problems.iter().map(|p| p.field).collect(),
        other => panic!("expected a refusal, got {other}"),
    }
}

#[tokio::test]
#[cfg_attr(
    not(feature = "privileged"),
    ignore = "privileged: root + netns + cgroups; run with --ignored"
)]
async fn three_zones_route_to_each_other_with_limits_and_delete_leaves_nothing() {
    let fx = Fixture::new(&["a", "b", "c"]);
    assert!(
        matches!(
            fx.provider.layout(),
            Layout::Hybrid {
                unified: Some(_),
                ..
            }
        ),
        "this machine's cgroups are hybrid: {:?}",
        fx.provider.layout()
    );
    let mut hosts = Vec::new();
    for (name, zone) in [("ha", "a"), ("hb", "b"), ("hc", "c")] {
        let started = Instant::now();
        let host = fx.provider.create(&fx.spec(name, zone)).await;
        hosts.push(host.expect("create"));
        eprintln!(
            "host {name} (and zone {zone}) created in {:?}",
            started.elapsed()
        );
    }
    let addresses: Vec<String> = hosts.iter().map(|h| h.address.to_string()).collect();
    assert_eq!(addresses, ["10.100.0.2", "10.100.1.2", "10.100.2.2"]);

    // Across zones, both ways, through the core.
    for from in &hosts {
        for to in &hosts {
            if from.spec.name == to.spec.name {
                continue;
            }
            let ns = Netns::named(from.netns.clone());
            traffic::wait_reachable(&ns, to.address, Duration::from_secs(10)).expect("reachable");
            let report =
                traffic::ping(&ns, to.address, 3, Duration::from_millis(50)).expect("ping");
            assert_eq!(
                report.received, 3,
                "{} -> {}: {report:?}",
                from.spec.name, to.address
            );
        }
    }

    let mut pids = Vec::new();
    let mut namespaces = Vec::new();
    for host in &hosts {
        // The limits, read back from the kernel, in v1's own files.
        let group = &host.netns;
        let read = |p: &str| fs::read_to_string(p).expect(p).trim().to_owned();
        assert_eq!(
            read(&format!("/sys/fs/cgroup/cpu/{group}/cpu.cfs_quota_us")),
            "25000"
        );
        assert_eq!(
            read(&format!("/sys/fs/cgroup/cpu/{group}/cpu.cfs_period_us")),
            "100000"
        );
        assert_eq!(
            read(&format!(
                "/sys/fs/cgroup/memory/{group}/memory.limit_in_bytes"
            )),
            (128u64 << 20).to_string()
        );
        assert_eq!(
            fx.provider.layout().limits(group).expect("limits"),
            Limits {
                cpu_millis: 250,
                memory_bytes: 128 << 20
            }
        );
        // The agent runs inside the host: its namespace, its cgroups.
        let status = fx.provider.status(&host.spec.name).await.expect("status");
        assert_eq!(status.phase, HostPhase::Running);
        assert_eq!(status.pids.len(), 1, "{status:?}");
        let pid = status.pids[0];
        let (dev, ino) = netns_id(&host.netns);
        assert_eq!(netns::pids_in_netns(dev, ino), vec![pid]);
        let cgroups = read(&format!("/proc/{pid}/cgroup"));
        for controller in ["cpu", "memory"] {
            assert!(
                cgroups
                    .lines()
                    .any(|l| l.contains(controller) && l.ends_with(&format!("/{group}"))),
                "{controller}: {cgroups}"
            );
        }
        assert!(host.data_dir.is_dir() && host.bpffs.is_dir(), "{host:?}");
        pids.push(pid);
        namespaces.push((dev, ino));
    }

    // Creating an existing host again returns it; another spec under its name is refused.
    let again = fx
        .provider
        .create(&fx.spec("ha", "a"))
        .await
        .expect("again");
    assert_eq!(again, hosts[0]);
    let mut other = fx.spec("ha", "a");
    other.cpu_millis = 500;
    let err = fx.provider.create(&other).await.expect_err("other spec");
    assert_eq!(field_of(&err), ["name"], "{err}");

    // A restarted provider finds the hosts, and deletes them.
    let restarted = fx.restarted();
    let listed = restarted.list().await.expect("list");
    assert_eq!(listed, hosts);
    let started = Instant::now();
    for host in &hosts {
        restarted.delete(&host.spec.name).await.expect("delete");
    }
    eprintln!(
        "three hosts, zones and the core deleted in {:?}",
        started.elapsed()
    );
    restarted
        .delete("ha")
        .await
        .expect("deleting again is not an error");
    assert_eq!(fx.leftovers(), Vec::<String>::new());
    for pid in pids {
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists(),
            "pid {pid} lives on"
        );
    }
    for (dev, ino) in namespaces {
        assert_eq!(netns::pids_in_netns(dev, ino), Vec::<i32>::new());
    }
    assert!(restarted.list().await.expect("list").is_empty());
    let err = restarted.status("ha").await.expect_err("gone");
    assert!(matches!(err, HostError::NotFound(_)), "{err}");
}

#[tokio::test]
#[cfg_attr(
    not(feature = "privileged"),
    ignore = "privileged: root + netns + cgroups; run with --ignored"
)]
async fn bad_input_is_refused_naming_the_field_and_a_failed_create_leaves_nothing() {
    let fx = Fixture::new(&["a"]);
    let mut unknown_zone = fx.spec("h1", "nowhere");
    unknown_zone.memory_bytes = 0;
    let err = fx
        .provider
        .create(&unknown_zone)
        .await
        .expect_err("refused");
    assert_eq!(field_of(&err), ["memory", "zone"], "{err}");
    assert!(
        err.to_string().contains("unknown zone \"nowhere\""),
        "{err}"
    );
    assert_eq!(fx.leftovers(), Vec::<String>::new());

    // The agent cannot start: everything made before is removed again.
    let mut broken = fx.spec("h1", "a");
    broken.agent = vec!["/nonexistent/slipway-agent".into()];
    let err = fx
        .provider
        .create(&broken)
        .await
        .expect_err("no such program");
    assert!(
        err.to_string().contains("start /nonexistent/slipway-agent"),
        "{err}"
    );
    assert_eq!(fx.leftovers(), Vec::<String>::new());

    let err = fx
        .provider
        .delete("Not_A_Name")
        .await
        .expect_err("bad name");
    assert_eq!(field_of(&err), ["name"], "{err}");
}

#[tokio::test]
#[cfg_attr(
    not(feature = "privileged"),
    ignore = "privileged: root + netns + cgroups; run with --ignored"
)]
async fn a_half_made_host_is_deleted_or_made_again_by_a_restarted_provider() {
    let fx = Fixture::new(&["a", "b"]);
    for step in [Step::Namespace, Step::Link, Step::Cgroups] {
        let half = fx
            .provider
            .create_interrupted(&fx.spec("h1", "a"), step)
            .await
            .expect("half-made");
        assert!(netns::exists(&half.netns), "{step:?}");
        assert_eq!(
            fx.provider.status("h1").await.expect("status").phase,
            HostPhase::Creating
        );
        // The caller died; a new one deletes.
        fx.restarted().delete("h1").await.expect("delete");
        assert_eq!(fx.leftovers(), Vec::<String>::new(), "after {step:?}");
    }

    // Half-made, then made again: the result works.
    fx.provider
        .create_interrupted(&fx.spec("h1", "a"), Step::Link)
        .await
        .expect("half-made");
    let restarted = fx.restarted();
    let h1 = restarted.create(&fx.spec("h1", "a")).await.expect("create");
    let h2 = restarted.create(&fx.spec("h2", "b")).await.expect("create");
    assert_eq!(
        restarted.status("h1").await.expect("status").phase,
        HostPhase::Running
    );
    traffic::wait_reachable(
        &Netns::named(h1.netns.clone()),
        h2.address,
        Duration::from_secs(10),
    )
    .expect("h1 reaches h2");
    restarted.teardown().await.expect("teardown");
    assert_eq!(fx.leftovers(), Vec::<String>::new());
}

/// The `slipway` binary of this target dir (`cargo build -p slipway` first), or `$SLIPWAY_BIN`.
fn slipway_binary() -> PathBuf {
    if let Some(bin) = std::env::var_os("SLIPWAY_BIN") {
        return bin.into();
    }
    let exe = std::env::current_exe().expect("test binary path");
    // <target>/debug/deps/<test> -> <target>/debug/slipway
    let bin = exe
        .parent()
        .and_then(Path::parent)
        .map(|d| d.join("slipway"))
        .expect("target dir");
    assert!(
        bin.exists(),
        "{} is missing: run `cargo build -p slipway` first (or set SLIPWAY_BIN)",
        bin.display()
    );
    bin
}

/// `GET path` over the Unix socket `socket`; the status code, if anything answered.
async fn get(socket: &Path, path: &str) -> Option<u16> {
    let mut stream = tokio::net::UnixStream::connect(socket).await.ok()?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: agent\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.ok()?;
    let mut reply = String::new();
    stream.read_to_string(&mut reply).await.ok()?;
    reply.split_whitespace().nth(1)?.parse().ok()
}

#[tokio::test]
#[cfg_attr(
    not(feature = "privileged"),
    ignore = "privileged: root + netns + cgroups + BPF; run with --ignored"
)]
async fn slipway_agent_started_in_a_host_answers_on_its_socket() {
    let fx = Fixture::new(&["a"]);
    let bin = slipway_binary();
    let mut spec = fx.spec("agent1", "a");
    spec.cpu_millis = 1000;
    spec.memory_bytes = 512 << 20;
    spec.agent = [
        bin.to_str().expect("utf-8 path"),
        "agent",
        "--pod-cidr",
        "10.244.0.0/16",
        "--host-block",
        "10.244.1.0/24",
        "--bpffs",
        "{bpffs}",
        "--data-dir",
        "{data_dir}/agent",
        "--socket",
        "{data_dir}/agent.sock",
        "--cgroup",
        "{cgroup}",
    ]
    .map(String::from)
    .to_vec();
    let started = Instant::now();
    let host = fx.provider.create(&spec).await.expect("create");
    let socket = host.data_dir.join("agent.sock");
    let deadline = Instant::now() + Duration::from_secs(60);
    let code = loop {
        if let Some(code) = get(&socket, "/v1/status").await {
            break code;
        }
        let log = fs::read_to_string(host.data_dir.join("agent.log")).unwrap_or_default();
        assert!(
            Instant::now() < deadline,
            "the agent did not answer on {}; its log:\n{log}",
            socket.display()
        );
        assert_eq!(
            fx.provider.status("agent1").await.expect("status").phase,
            HostPhase::Running,
            "the agent exited; its log:\n{log}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(code, 200);
    eprintln!(
        "host created and agent answering in {:?}",
        started.elapsed()
    );
    let pids = fx.provider.status("agent1").await.expect("status").pids;
    assert!(!pids.is_empty());

    let stopping = Instant::now();
    fx.provider.delete("agent1").await.expect("delete");
    eprintln!("host with agent deleted in {:?}", stopping.elapsed());
    assert_eq!(fx.leftovers(), Vec::<String>::new());
    for pid in pids {
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists(),
            "pid {pid} lives on"
        );
    }
}

#[tokio::test]
#[cfg_attr(
    not(feature = "privileged"),
    ignore = "privileged: root + netns + cgroups; run with --ignored"
)]
async fn a_process_that_ignores_sigterm_is_killed_after_the_grace() {
    let mut fx = Fixture::new(&["a"]);
    let grace = Duration::from_millis(300);
    let mut config = fx.provider.config().clone();
    config.stop_grace = grace;
    fx.provider = Arc::new(NetnsProvider::new(config).expect("provider"));
    let mut spec = fx.spec("stubborn", "a");
    // The shell ignores SIGTERM (and says so) and keeps starting children: only SIGKILL ends it.
    spec.agent = [
        "sh",
        "-c",
        "trap '' TERM; touch {data_dir}/trapped; while :; do sleep 0.05; done",
    ]
    .map(String::from)
    .to_vec();
    let host = fx.provider.create(&spec).await.expect("create");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !host.data_dir.join("trapped").exists() {
        assert!(Instant::now() < deadline, "the shell never set its trap");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let pids = fx.provider.status("stubborn").await.expect("status").pids;
    assert!(!pids.is_empty());
    let started = Instant::now();
    fx.provider.delete("stubborn").await.expect("delete");
    let took = started.elapsed();
    eprintln!("a SIGTERM-ignoring host deleted in {took:?} (grace {grace:?})");
    assert!(
        took >= grace,
        "SIGKILL came before the grace ran out: {took:?}"
    );
    assert_eq!(fx.leftovers(), Vec::<String>::new());
    for pid in pids {
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists(),
            "pid {pid} lives on"
        );
    }
}

#[tokio::test]
#[cfg_attr(
    not(feature = "privileged"),
    ignore = "privileged: root + netns + cgroups; run with --ignored"
)]
async fn status_follows_the_kernel_and_create_brings_a_lost_host_back() {
    let fx = Fixture::new(&["a"]);
    let spec = fx.spec("h1", "a");
    let host = fx.provider.create(&spec).await.expect("create");
    let status = fx.provider.status("h1").await.expect("status");
    assert_eq!(status.phase, HostPhase::Running);

    // The agent dies: the host is Exited.
    for pid in &status.pids {
        kill(Pid::from_raw(*pid), Signal::SIGKILL).expect("kill");
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let phase = fx.provider.status("h1").await.expect("status").phase;
        if phase == HostPhase::Exited {
            break;
        }
        assert!(Instant::now() < deadline, "still {phase:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    // Its namespace goes: the host is Lost; creating it again makes it anew, at its address.
    netns::destroy(&host.netns).expect("destroy");
    assert_eq!(
        fx.provider.status("h1").await.expect("status").phase,
        HostPhase::Lost
    );
    let again = fx.provider.create(&spec).await.expect("create again");
    assert_eq!(again, host);
    assert_eq!(
        fx.provider.status("h1").await.expect("status").phase,
        HostPhase::Running
    );
    fx.provider.delete("h1").await.expect("delete");
    assert_eq!(fx.leftovers(), Vec::<String>::new());
}

/// Set in the child process of [`a_provider_killed_with_sigkill_leaves_hosts_that_converge`]:
/// `<prefix>\n<state dir>\n<data root>`.
const KILL9_ENV: &str = "SLIPWAY_HOSTS_KILL9_CHILD";

/// In the child (only when [`KILL9_ENV`] is set): creates hosts until killed.
#[tokio::test]
#[cfg_attr(
    not(feature = "privileged"),
    ignore = "privileged: root + netns + cgroups; run with --ignored"
)]
async fn kill9_child_creates_hosts_until_killed() {
    let Ok(setup) = std::env::var(KILL9_ENV) else {
        return;
    };
    let mut lines = setup.lines();
    let (Some(prefix), Some(state), Some(data)) = (lines.next(), lines.next(), lines.next()) else {
        panic!("{KILL9_ENV}: {setup:?}");
    };
    let provider =
        NetnsProvider::new(NetnsConfig::new(prefix, state, &["a", "b"])).expect("provider");
    for i in 0..200 {
        let spec = HostSpec {
            name: format!("h{i}"),
            zone: if i % 2 == 0 { "a" } else { "b" }.into(),
            cpu_millis: 100,
            memory_bytes: 64 << 20,
            data_root: data.into(),
            agent: vec!["sleep".into(), "infinity".into()],
        };
        provider.create(&spec).await.expect("create");
    }
}

#[tokio::test]
#[cfg_attr(
    not(feature = "privileged"),
    ignore = "privileged: root + netns + cgroups; run with --ignored"
)]
async fn a_provider_killed_with_sigkill_leaves_hosts_that_converge() {
    let fx = Fixture::new(&["a", "b"]);
    let state = fx.provider.config().state_dir.clone();
    let data = fx.dir.path().join("data");
    let mut child = Command::new(std::env::current_exe().expect("test binary"))
        .args([
            "--exact",
            "netns::tests::kill9_child_creates_hosts_until_killed",
            "--include-ignored",
            "--nocapture",
        ])
        .env(
            KILL9_ENV,
            format!("{}\n{}\n{}", fx.prefix(), state.display(), data.display()),
        )
        .stdout(Stdio::null())
        .spawn()
        .expect("start the child");
    // Kill it as soon as a few hosts are recorded: most likely in the middle of the next one.
    let wanted = 2 + (std::process::id() as usize % 4);
    let deadline = Instant::now() + Duration::from_secs(30);
    let recorded = || {
        fs::read_dir(&state)
            .map(|d| {
                d.flatten()
                    .filter(|e| e.file_name().to_string_lossy().ends_with(".json"))
                    .count()
            })
            .unwrap_or(0)
    };
    while recorded() < wanted {
        assert!(
            Instant::now() < deadline,
            "the child recorded no hosts: {:?}",
            child.try_wait()
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    child.kill().expect("SIGKILL");
    child.wait().expect("reap");

    // A new provider knows every host the dead one started, made or half-made.
    let listed = fx.provider.list().await.expect("list");
    let known: BTreeSet<String> = listed.iter().map(|h| h.netns.clone()).collect();
    let made: BTreeSet<String> = fs::read_dir(netns::NETNS_RUN_DIR)
        .expect("/run/netns")
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| n.starts_with(&format!("{}h-", fx.prefix())))
        .collect();
    assert!(made.is_subset(&known), "orphans: {made:?} vs {known:?}");
    assert!(listed.len() >= wanted, "{listed:?}");
    let half_made = listed.len() - count_running(&fx.provider, &listed).await;
    eprintln!(
        "killed after {} hosts; {half_made} of them half-made",
        listed.len()
    );

    // Creating them again converges: every one runs, once.
    for host in &listed {
        let again = fx.provider.create(&host.spec).await.expect("create again");
        assert_eq!(again.netns, host.netns);
        assert_eq!(
            fx.provider
                .status(&host.spec.name)
                .await
                .expect("status")
                .phase,
            HostPhase::Running
        );
    }
    let pinged = (&listed[0], &listed[1]);
    traffic::wait_reachable(
        &Netns::named(pinged.0.netns.clone()),
        pinged.1.address,
        Duration::from_secs(10),
    )
    .expect("across zones after the restart");
    for host in &listed {
        fx.provider.delete(&host.spec.name).await.expect("delete");
    }
    assert_eq!(fx.leftovers(), Vec::<String>::new());
}

/// How many of `hosts` are Running.
async fn count_running(provider: &NetnsProvider, hosts: &[HostHandle]) -> usize {
    let mut running = 0;
    for host in hosts {
        if provider
            .status(&host.spec.name)
            .await
            .expect("status")
            .phase
            == HostPhase::Running
        {
            running += 1;
        }
    }
    running
}

/// The OOM kills the kernel counted in cgroup `group` (v1 `memory.oom_control` or v2
/// `memory.events`).
fn oom_kills(layout: &Layout, group: &str) -> u64 {
    let (path, key) = match layout {
        Layout::Hybrid { memory, .. } => {
            (memory.join(group).join("memory.oom_control"), "oom_kill")
        }
        Layout::V2 { root } => (root.join(group).join("memory.events"), "oom_kill"),
    };
    fs::read_to_string(&path)
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(key)?.trim().parse().ok())
        .unwrap_or(0)
}

#[tokio::test]
#[cfg_attr(
    not(feature = "privileged"),
    ignore = "privileged: root + netns + cgroups; run with --ignored"
)]
async fn the_memory_limit_is_enforced_by_the_kernel() {
    let fx = Fixture::new(&["a"]);
    let mut spec = fx.spec("small", "a");
    spec.memory_bytes = 32 << 20;
    // `tail -c` keeps what it reads in memory: 256 MiB does not fit in 32.
    spec.agent = [
        "sh",
        "-c",
        "head -c 268435456 /dev/zero | tail -c 268435455 > /dev/null; sleep infinity",
    ]
    .map(String::from)
    .to_vec();
    let host = fx.provider.create(&spec).await.expect("create");
    let deadline = Instant::now() + Duration::from_secs(30);
    while oom_kills(fx.provider.layout(), &host.netns) == 0 {
        assert!(
            Instant::now() < deadline,
            "nothing was OOM-killed in 32 MiB"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The rest of the host lives on.
    assert_eq!(
        fx.provider.status("small").await.expect("status").phase,
        HostPhase::Running
    );
    fx.provider.delete("small").await.expect("delete");
    assert_eq!(fx.leftovers(), Vec::<String>::new());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(feature = "privileged"),
    ignore = "privileged: root + netns + cgroups; run with --ignored"
)]
async fn providers_sharing_a_state_dir_take_turns() {
    let fx = Fixture::new(&["a"]);
    let other = Arc::new(fx.restarted());
    let mut tasks = Vec::new();
    for i in 0..6 {
        let provider = if i % 2 == 0 {
            Arc::clone(&fx.provider)
        } else {
            Arc::clone(&other)
        };
        let spec = fx.spec(&format!("h{i}"), "a");
        tasks.push(tokio::spawn(async move { provider.create(&spec).await }));
    }
    let mut addresses = BTreeSet::new();
    for task in tasks {
        let host = task.await.expect("task").expect("create");
        assert!(
            addresses.insert(host.address),
            "{} given twice",
            host.address
        );
    }
    assert_eq!(fx.provider.list().await.expect("list").len(), 6);
    fx.provider.teardown().await.expect("teardown");
    assert_eq!(fx.leftovers(), Vec::<String>::new());
}
