//! A cgroup v2 directory for a test world's host (`/sys/fs/cgroup/unified/<world>-<label>`),
//! where socket-level service translation attaches, and running commands inside it in a given
//! network namespace. Removed on drop, after killing whatever still runs in it.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use tracing::warn;

use super::{Netns, World};
use crate::DataplaneError;

/// Where the cgroup v2 hierarchy is mounted on the development machines (hybrid mode).
pub const CGROUP2_ROOT: &str = "/sys/fs/cgroup/unified";

/// How long drop waits for killed processes to leave the cgroup before giving up on rmdir.
const REMOVE_TIMEOUT: Duration = Duration::from_secs(5);

/// A child cgroup of the v2 root, removed on drop.
#[derive(Debug)]
pub struct Cgroup {
    path: PathBuf,
}

impl Cgroup {
    /// Creates `<CGROUP2_ROOT>/<world name>-<label>`.
    pub fn create(world: &World, label: &str) -> Result<Self, DataplaneError> {
        let path = Path::new(CGROUP2_ROOT).join(format!("{}-{label}", world.name()));
        fs::create_dir(&path).map_err(|source| DataplaneError::Syscall {
            call: "mkdir(cgroup)",
            source,
        })?;
        Ok(Self { path })
    }

    /// Creates `<this cgroup>/<label>`, e.g. a pod's cgroup under its host's. Drop it before
    /// its parent: a cgroup with children cannot be removed.
    pub fn child(&self, label: &str) -> Result<Self, DataplaneError> {
        let path = self.path.join(label);
        fs::create_dir(&path).map_err(|source| DataplaneError::Syscall {
            call: "mkdir(cgroup)",
            source,
        })?;
        Ok(Self { path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The command that runs `argv` inside this cgroup and network namespace `netns`: a shell
    /// moves itself into the cgroup, then execs `ip netns exec`. The cgroup is joined first
    /// because `ip netns exec` mounts a fresh sysfs, which hides the cgroup v2 mount under
    /// `/sys`; the membership survives both execs, so every socket `argv` opens belongs to
    /// the cgroup.
    pub fn command(&self, netns: &Netns, argv: &[&str]) -> Command {
        let procs = self.path.join("cgroup.procs");
        let mut command = Command::new("sh");
        command
            .arg("-c")
            .arg(format!(
                "echo $$ > '{}' && exec ip netns exec \"$0\" \"$@\"",
                procs.display()
            ))
            .arg(netns.name())
            .args(argv);
        command
    }

    /// Runs `argv` inside this cgroup and `netns`; returns its output, whatever its status.
    pub fn exec(&self, netns: &Netns, argv: &[&str]) -> Result<Output, DataplaneError> {
        self.command(netns, argv)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| DataplaneError::Command {
                command: argv.join(" "),
                detail: e.to_string(),
            })
    }

    /// Runs `argv` inside this cgroup and `netns`; fails unless it exits 0. Returns stdout.
    pub fn run(&self, netns: &Netns, argv: &[&str]) -> Result<String, DataplaneError> {
        let output = self.exec(netns, argv)?;
        if output.status.success() {
            Ok(String::from_utf8_lossy(&output.stdout).into_owned())
        } else {
            Err(DataplaneError::Command {
                command: format!("{} (in cgroup {})", argv.join(" "), self.path.display()),
                detail: format!(
                    "{}: {}",
                    output.status,
                    String::from_utf8_lossy(&output.stderr).trim()
                ),
            })
        }
    }

    /// The processes in this cgroup (not its descendants).
    pub fn pids(&self) -> Vec<i32> {
        fs::read_to_string(self.path.join("cgroup.procs"))
            .map(|text| {
                text.split_whitespace()
                    .filter_map(|p| p.parse().ok())
                    .collect()
            })
            .unwrap_or_default()
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        let deadline = Instant::now() + REMOVE_TIMEOUT;
        loop {
            // Only processes this test started live here: the cgroup is the world's own.
            for pid in self.pids() {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
            match fs::remove_dir(&self.path) {
                Ok(()) => return,
                Err(err) if err.kind() == io::ErrorKind::NotFound => return,
                // EBUSY while killed processes are still on their way out.
                Err(err) if Instant::now() < deadline => {
                    let _ = err;
                    thread::sleep(Duration::from_millis(10));
                }
                Err(err) => {
                    warn!(cgroup = %self.path.display(), error = %err, "could not remove cgroup");
                    return;
                }
            }
        }
    }
}
