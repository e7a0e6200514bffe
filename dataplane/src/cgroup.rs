//! Cgroups that hold a set of processes under cpu and memory limits, on either layout a machine
//! may have, detected at start: hybrid (the cpu and memory controllers on v1 hierarchies,
//! `cpu.cfs_quota_us`/`memory.limit_in_bytes`, and a v2 hierarchy without controllers at
//! `unified` where BPF attaches) or pure v2 (`cpu.max`, `memory.max`). A group is one directory
//! per hierarchy, all named alike; [`spawn_in`] starts a process inside a group and a network
//! namespace.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd as _, RawFd};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::thread;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tracing::debug;

use crate::DataplaneError;

/// Where cgroup hierarchies are mounted.
pub const CGROUP_ROOT: &str = "/sys/fs/cgroup";

/// The CFS period the v1 and v2 cpu limits are written with, in microseconds.
pub const CPU_PERIOD_US: u64 = 100_000;

/// How long [`Layout::remove`] waits for killed processes to leave before giving up.
const KILL_TIMEOUT: Duration = Duration::from_secs(5);

/// Which cgroup hierarchies hold the cpu and memory controllers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Layout {
    /// cpu and memory on v1 hierarchies; `unified` is the v2 hierarchy (no controllers), if
    /// mounted, where socket programs attach.
    Hybrid {
        cpu: PathBuf,
        memory: PathBuf,
        unified: Option<PathBuf>,
    },
    /// One v2 hierarchy at `root` with the cpu and memory controllers.
    V2 { root: PathBuf },
}

/// The cpu and memory a group may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// CPU time per second, in thousandths of a CPU (1000 = one CPU).
    pub cpu_millis: u64,
    /// Memory, bytes.
    pub memory_bytes: u64,
}

fn io_error(call: &'static str) -> impl FnOnce(io::Error) -> DataplaneError {
    move |source| DataplaneError::Syscall { call, source }
}

impl Layout {
    /// The layout of this machine's [`CGROUP_ROOT`].
    pub fn detect() -> Result<Self, DataplaneError> {
        Self::detect_at(Path::new(CGROUP_ROOT))
    }

    /// The layout of the hierarchies mounted under `root`: pure v2 when `root` itself is a v2
    /// hierarchy offering cpu and memory, hybrid when `root/cpu` and `root/memory` are v1 ones.
    pub fn detect_at(root: &Path) -> Result<Self, DataplaneError> {
        if let Ok(controllers) = fs::read_to_string(root.join("cgroup.controllers")) {
            let has = |c: &str| controllers.split_whitespace().any(|x| x == c);
            if has("cpu") && has("memory") {
                return Ok(Self::V2 {
                    root: root.to_owned(),
                });
            }
            return Err(DataplaneError::Invalid {
                field: "cgroup",
                reason: "the cgroup v2 hierarchy does not offer the cpu and memory controllers",
            });
        }
        let cpu = root.join("cpu");
        let memory = root.join("memory");
        if cpu.join("cpu.cfs_quota_us").exists() && memory.join("memory.limit_in_bytes").exists() {
            let unified = root.join("unified");
            let unified = unified.join("cgroup.procs").exists().then_some(unified);
            return Ok(Self::Hybrid {
                cpu,
                memory,
                unified,
            });
        }
        Err(DataplaneError::Invalid {
            field: "cgroup",
            reason: "neither a cgroup v2 hierarchy with cpu and memory nor v1 cpu and memory \
                     hierarchies are mounted",
        })
    }

    /// Every directory of group `name`, one per hierarchy (the v2 one last).
    pub fn dirs(&self, name: &str) -> Vec<PathBuf> {
        match self {
            Self::Hybrid {
                cpu,
                memory,
                unified,
            } => [Some(cpu), Some(memory), unified.as_ref()]
                .into_iter()
                .flatten()
                .map(|root| root.join(name))
                .collect(),
            Self::V2 { root } => vec![root.join(name)],
        }
    }

    /// The v2 directory of group `name`, where socket-level BPF programs attach: `None` on a
    /// hybrid machine without a v2 hierarchy.
    pub fn v2_dir(&self, name: &str) -> Option<PathBuf> {
        match self {
            Self::Hybrid { unified, .. } => unified.as_ref().map(|u| u.join(name)),
            Self::V2 { root } => Some(root.join(name)),
        }
    }

    /// The names of the groups whose name starts with `prefix`, in any hierarchy.
    pub fn groups_with_prefix(&self, prefix: &str) -> Vec<String> {
        let roots = match self {
            Self::Hybrid {
                cpu,
                memory,
                unified,
            } => [Some(cpu), Some(memory), unified.as_ref()]
                .into_iter()
                .flatten()
                .cloned()
                .collect::<Vec<_>>(),
            Self::V2 { root } => vec![root.clone()],
        };
        let mut names: Vec<String> = roots
            .iter()
            .filter_map(|root| fs::read_dir(root).ok())
            .flat_map(|entries| entries.flatten())
            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|n| n.starts_with(prefix))
            .collect();
        names.sort();
        names.dedup();
        names
    }

    /// Creates group `name` (or finds it) with `limits`. On failure, what this call created is
    /// removed again.
    pub fn create(&self, name: &str, limits: Limits) -> Result<(), DataplaneError> {
        if limits.cpu_millis == 0 || limits.memory_bytes == 0 {
            return Err(DataplaneError::Invalid {
                field: "limits",
                reason: "cpu and memory must be above zero",
            });
        }
        let quota = limits.cpu_millis.saturating_mul(CPU_PERIOD_US) / 1000;
        let mut made = Vec::new();
        let result = (|| {
            if let Self::V2 { root } = self {
                // A child's controllers are those its parent delegates.
                fs::write(root.join("cgroup.subtree_control"), "+cpu +memory")
                    .map_err(io_error("enable cpu and memory controllers"))?;
            }
            for dir in self.dirs(name) {
                match fs::create_dir(&dir) {
                    Ok(()) => made.push(dir),
                    Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                    Err(e) => return Err(io_error("mkdir cgroup")(e)),
                }
            }
            match self {
                Self::Hybrid { cpu, memory, .. } => {
                    let cpu = cpu.join(name);
                    fs::write(cpu.join("cpu.cfs_period_us"), CPU_PERIOD_US.to_string())
                        .map_err(io_error("write cpu.cfs_period_us"))?;
                    fs::write(cpu.join("cpu.cfs_quota_us"), quota.to_string())
                        .map_err(io_error("write cpu.cfs_quota_us"))?;
                    fs::write(
                        memory.join(name).join("memory.limit_in_bytes"),
                        limits.memory_bytes.to_string(),
                    )
                    .map_err(io_error("write memory.limit_in_bytes"))?;
                }
                Self::V2 { root } => {
                    let dir = root.join(name);
                    fs::write(dir.join("cpu.max"), format!("{quota} {CPU_PERIOD_US}"))
                        .map_err(io_error("write cpu.max"))?;
                    fs::write(dir.join("memory.max"), limits.memory_bytes.to_string())
                        .map_err(io_error("write memory.max"))?;
                }
            }
            Ok(())
        })();
        if result.is_err() {
            for dir in made.iter().rev() {
                let _ = fs::remove_dir(dir);
            }
        }
        result
    }

    /// The limits of group `name`, read back from the kernel.
    pub fn limits(&self, name: &str) -> Result<Limits, DataplaneError> {
        let read = |path: PathBuf| -> Result<String, DataplaneError> {
            fs::read_to_string(&path)
                .map(|s| s.trim().to_owned())
                .map_err(io_error("read cgroup limit"))
        };
        let number = |text: &str, what: &str| -> Result<u64, DataplaneError> {
            text.parse().map_err(|_| DataplaneError::Parse {
                command: format!("read {what} of cgroup {name}"),
                detail: format!("{text:?} is not a limit"),
            })
        };
        let (quota, period, memory) = match self {
            Self::Hybrid { cpu, memory, .. } => {
                let quota = read(cpu.join(name).join("cpu.cfs_quota_us"))?;
                let period = read(cpu.join(name).join("cpu.cfs_period_us"))?;
                let memory = read(memory.join(name).join("memory.limit_in_bytes"))?;
                (
                    number(&quota, "cpu.cfs_quota_us")?,
                    number(&period, "cpu.cfs_period_us")?,
                    number(&memory, "memory.limit_in_bytes")?,
                )
            }
            Self::V2 { root } => {
                let max = read(root.join(name).join("cpu.max"))?;
                let mut parts = max.split_whitespace();
                let quota = number(parts.next().unwrap_or_default(), "cpu.max")?;
                let period = number(parts.next().unwrap_or_default(), "cpu.max")?;
                let memory = read(root.join(name).join("memory.max"))?;
                (quota, period, number(&memory, "memory.max")?)
            }
        };
        if period == 0 {
            return Err(DataplaneError::Parse {
                command: format!("read the cpu period of cgroup {name}"),
                detail: "period 0".into(),
            });
        }
        Ok(Limits {
            cpu_millis: quota * 1000 / period,
            memory_bytes: memory,
        })
    }

    /// The `cgroup.procs` files of group `name`, where a process is placed into it.
    pub fn procs_files(&self, name: &str) -> Vec<PathBuf> {
        self.dirs(name)
            .into_iter()
            .map(|d| d.join("cgroup.procs"))
            .collect()
    }

    /// The processes in group `name` or below it, in any hierarchy.
    pub fn pids(&self, name: &str) -> Vec<i32> {
        let mut pids = Vec::new();
        for dir in self.dirs(name) {
            collect_pids(&dir, &mut pids);
        }
        pids.sort_unstable();
        pids.dedup();
        pids
    }

    /// Stops the processes of group `name` (SIGTERM, then SIGKILL for those still there after
    /// `grace`) and removes its directories; an absent group is not an error.
    pub fn remove(&self, name: &str, grace: Duration) -> Result<(), DataplaneError> {
        let signal_all = |signal| {
            for pid in self.pids(name) {
                let _ = kill(Pid::from_raw(pid), signal);
            }
        };
        signal_all(Signal::SIGTERM);
        let gone = wait_until(grace, || self.pids(name).is_empty());
        if !gone {
            debug!(
                group = name,
                "processes outlived the grace period; killing them"
            );
            let deadline = Instant::now() + KILL_TIMEOUT;
            loop {
                signal_all(Signal::SIGKILL);
                if wait_until(Duration::from_millis(50), || self.pids(name).is_empty()) {
                    break;
                }
                if Instant::now() >= deadline {
                    return Err(DataplaneError::Command {
                        command: format!("kill the processes of cgroup {name}"),
                        detail: format!("{:?} still there after SIGKILL", self.pids(name)),
                    });
                }
            }
        }
        for dir in self.dirs(name) {
            remove_tree(&dir)?;
        }
        Ok(())
    }
}

/// Polls `done` every 10 ms until it holds (true) or `timeout` passes (false).
fn wait_until(timeout: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if done() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        thread::sleep(Duration::from_millis(10));
    }
}

fn collect_pids(dir: &Path, pids: &mut Vec<i32>) {
    if let Ok(text) = fs::read_to_string(dir.join("cgroup.procs")) {
        pids.extend(
            text.split_whitespace()
                .filter_map(|p| p.parse::<i32>().ok()),
        );
    }
    if let Ok(entries) = fs::read_dir(dir) {
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                collect_pids(&entry.path(), pids);
            }
        }
    }
}

/// Removes cgroup directory `dir` and its child groups, deepest first (a cgroup's files are
/// not files to remove: rmdir takes them). Waits (bounded) while exiting processes leave.
fn remove_tree(dir: &Path) -> Result<(), DataplaneError> {
    if let Ok(entries) = fs::read_dir(dir) {
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                remove_tree(&entry.path())?;
            }
        }
    }
    let deadline = Instant::now() + KILL_TIMEOUT;
    loop {
        match fs::remove_dir(dir) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            // EBUSY while killed processes are on their way out.
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) && Instant::now() < deadline => {
                thread::sleep(Duration::from_millis(10));
            }
            Err(e) => return Err(io_error("rmdir cgroup")(e)),
        }
    }
}

/// Starts `command` as a process of its own session, inside the network namespace at `netns`
/// and the cgroups whose `cgroup.procs` files are `procs` (see [`Layout::procs_files`]): it is
/// placed before it runs a single instruction of its program, so all it starts stays inside.
pub fn spawn_in(
    command: &mut Command,
    netns: &Path,
    procs: &[PathBuf],
) -> Result<Child, DataplaneError> {
    let ns = File::open(netns).map_err(io_error("open netns"))?;
    let groups = procs
        .iter()
        .map(|p| OpenOptions::new().write(true).open(p))
        .collect::<Result<Vec<File>, _>>()
        .map_err(io_error("open cgroup.procs"))?;
    let ns_fd: RawFd = ns.as_raw_fd();
    let group_fds: Vec<RawFd> = groups.iter().map(|f| f.as_raw_fd()).collect();
    let hook = move || -> io::Result<()> {
        for fd in &group_fds {
            // SAFETY: write(2) on a descriptor opened before the fork and kept open by the
            // parent until spawn returns, from a static buffer: async-signal-safe, no
            // allocation. "0" moves the writing process.
            if unsafe { libc::write(*fd, b"0".as_ptr().cast(), 1) } < 0 {
                return Err(io::Error::last_os_error());
            }
        }
        // SAFETY: setns(2) on a descriptor opened before the fork; async-signal-safe.
        if unsafe { libc::setns(ns_fd, libc::CLONE_NEWNET) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: setsid(2) takes no pointers; async-signal-safe.
        if unsafe { libc::setsid() } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    };
    // SAFETY: the hook runs in the child between fork and exec and only makes the
    // async-signal-safe system calls above on descriptors that outlive `spawn`; it allocates
    // nothing and touches no lock.
    unsafe {
        command.pre_exec(hook);
    }
    let child = command
        .spawn()
        .map_err(io_error("spawn in netns and cgroup"));
    drop(groups);
    drop(ns);
    child
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "slipway-cgroup-{tag}-{}-{:?}",
            std::process::id(),
            thread::current().id()
        ));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).expect("temp dir");
        dir
    }

    #[test]
    fn detects_pure_v2_hybrid_and_neither() {
        let v2 = temp_dir("v2");
        fs::write(v2.join("cgroup.controllers"), "cpuset cpu io memory pids\n").expect("write");
        assert_eq!(
            Layout::detect_at(&v2).expect("v2"),
            Layout::V2 { root: v2.clone() }
        );
        fs::write(v2.join("cgroup.controllers"), "pids\n").expect("write");
        let err = Layout::detect_at(&v2).expect_err("no cpu, no memory");
        assert!(err.to_string().contains("cgroup"), "{err}");

        let hybrid = temp_dir("hybrid");
        for (dir, file) in [
            ("cpu", "cpu.cfs_quota_us"),
            ("memory", "memory.limit_in_bytes"),
            ("unified", "cgroup.procs"),
        ] {
            fs::create_dir_all(hybrid.join(dir)).expect("mkdir");
            fs::write(hybrid.join(dir).join(file), "").expect("write");
        }
        let layout = Layout::detect_at(&hybrid).expect("hybrid");
        assert_eq!(
            layout,
            Layout::Hybrid {
                cpu: hybrid.join("cpu"),
                memory: hybrid.join("memory"),
                unified: Some(hybrid.join("unified")),
            }
        );
        assert_eq!(layout.v2_dir("g"), Some(hybrid.join("unified/g")));
        assert_eq!(layout.dirs("g").len(), 3);

        let neither = temp_dir("neither");
        assert!(Layout::detect_at(&neither).is_err());
        for dir in [v2, hybrid, neither] {
            fs::remove_dir_all(dir).expect("clean up");
        }
    }

    /// The v2 path on a directory that stands in for the hierarchy: what is written is what
    /// the kernel's cpu.max and memory.max take.
    #[test]
    fn v2_limits_are_written_as_cpu_max_and_memory_max() {
        let root = temp_dir("v2limits");
        let layout = Layout::V2 { root: root.clone() };
        let limits = Limits {
            cpu_millis: 250,
            memory_bytes: 64 << 20,
        };
        layout.create("h1", limits).expect("create");
        assert_eq!(
            fs::read_to_string(root.join("h1/cpu.max")).expect("cpu.max"),
            "25000 100000"
        );
        assert_eq!(
            fs::read_to_string(root.join("h1/memory.max")).expect("memory.max"),
            (64u64 << 20).to_string()
        );
        assert_eq!(
            fs::read_to_string(root.join("cgroup.subtree_control")).expect("subtree_control"),
            "+cpu +memory"
        );
        assert_eq!(layout.limits("h1").expect("read back"), limits);
        assert_eq!(layout.procs_files("h1"), vec![root.join("h1/cgroup.procs")]);
        assert_eq!(layout.groups_with_prefix("h"), vec!["h1".to_owned()]);
        let err = layout
            .create(
                "h2",
                Limits {
                    cpu_millis: 0,
                    memory_bytes: 1,
                },
            )
            .expect_err("zero cpu");
        assert!(err.to_string().contains("limits"), "{err}");
        assert!(!root.join("h2").exists(), "nothing made on refusal");
        fs::remove_dir_all(root).expect("clean up");
    }
}
