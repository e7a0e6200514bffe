//! The host's own containerd (Debian's 1.6), started and supervised by the host agent: its own
//! root, state, gRPC socket and config (version 2), the CRI plugin with runc on cgroupfs (this
//! machine's cgroups are hybrid v1, so `SystemdCgroup = false`), the host's CNI conf and bin
//! directories, and a sandbox image imported offline. A containerd that dies is started again
//! after a back-off; [`Containerd::stop`] (or drop) ends it with SIGTERM, then SIGKILL.
//!
//! Containers outlive a containerd restart (their shims keep them), as on any node.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::process::{Child, Command};
use tokio::sync::{Notify, watch};
use tracing::{info, warn};

use super::PodsError;
use super::cri::Cri;

/// The agent's flags for its containerd.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ContainerdArgs {
    /// Run the host's own containerd with its root, state, socket (`containerd.sock`) and log
    /// in this directory; without it the agent runs no pod runtime.
    #[arg(long = "containerd-dir")]
    pub dir: Option<PathBuf>,
    /// The directory of the host's CNI conflist (containerd's CRI `conf_dir`).
    #[arg(long = "cni-conf-dir", default_value = "/etc/cni/net.d")]
    pub cni_conf_dir: PathBuf,
    /// The CNI plugins' directory (Slipway's plugin and the reference plugins it chains).
    #[arg(long = "cni-bin-dir", default_value = "/opt/cni/bin")]
    pub cni_bin_dir: PathBuf,
    /// The pause image every pod sandbox runs; import it first (`slipway image import`).
    #[arg(long = "sandbox-image", default_value = "pause:local")]
    pub sandbox_image: String,
    /// containerd's snapshotter: `overlayfs`, or `native` where overlay mounts are refused.
    #[arg(long = "containerd-snapshotter", default_value = "overlayfs")]
    pub snapshotter: String,
}

impl ContainerdArgs {
    /// The containerd to run, if `--containerd-dir` was given; the sandbox image normalised.
    pub fn config(&self) -> Result<Option<ContainerdConfig>, PodsError> {
        let Some(dir) = self.dir.as_ref() else {
            return Ok(None);
        };
        let image = super::image::normalize(&self.sandbox_image).map_err(|e| match e {
            PodsError::Invalid { reason, .. } => PodsError::Invalid {
                field: "--sandbox-image".to_owned(),
                reason,
            },
            other => other,
        })?;
        if !["overlayfs", "native"].contains(&self.snapshotter.as_str()) {
            return Err(PodsError::Invalid {
                field: "--containerd-snapshotter".to_owned(),
                reason: format!(
                    "{:?}: supported values: overlayfs, native",
                    self.snapshotter
                ),
            });
        }
        let mut config = ContainerdConfig::new(dir, &self.cni_bin_dir, &self.cni_conf_dir, &image);
        config.snapshotter = self.snapshotter.clone();
        Ok(Some(config))
    }
}

/// Where and how the host's containerd runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerdConfig {
    /// Holds `root/`, `state/`, `config.toml`, `containerd.sock` and `containerd.log`.
    pub dir: PathBuf,
    /// The CNI plugins' directory (Slipway's plugin and the reference plugins it chains).
    pub cni_bin_dir: PathBuf,
    /// The directory of the host's conflist.
    pub cni_conf_dir: PathBuf,
    /// The pause image every sandbox runs, already imported (no registry is reachable).
    pub sandbox_image: String,
    /// A network namespace to run containerd (and so the CNI plugins it calls) in; `None` for
    /// the agent's own.
    pub netns: Option<PathBuf>,
    /// The snapshotter: `overlayfs`, or `native` where overlay mounts are refused.
    pub snapshotter: String,
}

impl ContainerdConfig {
    pub fn new(dir: &Path, cni_bin_dir: &Path, cni_conf_dir: &Path, sandbox_image: &str) -> Self {
        Self {
            dir: dir.to_owned(),
            cni_bin_dir: cni_bin_dir.to_owned(),
            cni_conf_dir: cni_conf_dir.to_owned(),
            sandbox_image: sandbox_image.to_owned(),
            netns: None,
            snapshotter: "overlayfs".to_owned(),
        }
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.join("containerd.sock")
    }

    pub fn log(&self) -> PathBuf {
        self.dir.join("containerd.log")
    }

    fn config_path(&self) -> PathBuf {
        self.dir.join("config.toml")
    }

    /// The running containerd's process id, so a restarted agent can end one its predecessor
    /// left behind (killed with SIGKILL, it could not stop it).
    pub fn pid_file(&self) -> PathBuf {
        self.dir.join("containerd.pid")
    }

    /// The containerd config (version 2) for this host.
    pub fn render(&self) -> String {
        let q = |p: &Path| toml_string(&p.display().to_string());
        let mut out = String::new();
        let _ = writeln!(
            out,
            "# Written by the Slipway host agent; rewritten at each start."
        );
        let _ = writeln!(out, "version = 2");
        let _ = writeln!(out, "root = {}", q(&self.dir.join("root")));
        let _ = writeln!(out, "state = {}", q(&self.dir.join("state")));
        // Plugins this host does not use and that would otherwise probe the machine.
        let _ = writeln!(
            out,
            "disabled_plugins = [\"io.containerd.internal.v1.opt\", \
             \"io.containerd.snapshotter.v1.btrfs\", \"io.containerd.snapshotter.v1.zfs\", \
             \"io.containerd.snapshotter.v1.devmapper\", \"io.containerd.snapshotter.v1.aufs\", \
             \"io.containerd.tracing.processor.v1.otlp\"]"
        );
        let _ = writeln!(out, "[grpc]\n  address = {}", q(&self.socket()));
        let _ = writeln!(
            out,
            "[ttrpc]\n  address = {}",
            q(&self.dir.join("containerd.sock.ttrpc"))
        );
        let _ = writeln!(out, "[metrics]\n  address = \"\"");
        let cri = "[plugins.\"io.containerd.grpc.v1.cri\"]";
        let _ = writeln!(out, "{cri}");
        let _ = writeln!(
            out,
            "  sandbox_image = {}",
            toml_string(&self.sandbox_image)
        );
        // Sandbox network namespaces under this containerd's state, not the machine's
        // /var/run/netns, so hosts on one machine never share a directory.
        let _ = writeln!(out, "  netns_mounts_under_state_dir = true");
        let _ = writeln!(out, "  enable_selinux = false");
        let _ = writeln!(out, "  disable_apparmor = true");
        let _ = writeln!(out, "  disable_tcp_service = true");
        // Never ask runc for an oom_score_adj below containerd's own: where the agent lacks
        // CAP_SYS_RESOURCE (a host in a container, as here) the sandbox's -998 makes runc's init
        // fail ("can't get final child's PID from pipe: EOF").
        let _ = writeln!(out, "  restrict_oom_score_adj = true");
        let _ = writeln!(out, "  stream_server_address = \"127.0.0.1\"");
        let _ = writeln!(out, "  stream_server_port = \"0\"");
        let _ = writeln!(out, "  [plugins.\"io.containerd.grpc.v1.cri\".containerd]");
        let _ = writeln!(out, "    snapshotter = {}", toml_string(&self.snapshotter));
        let _ = writeln!(out, "    default_runtime_name = \"runc\"");
        let _ = writeln!(
            out,
            "    [plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.runc]"
        );
        let _ = writeln!(out, "      runtime_type = \"io.containerd.runc.v2\"");
        let _ = writeln!(
            out,
            "      [plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.runc.options]"
        );
        let _ = writeln!(out, "        SystemdCgroup = false");
        let _ = writeln!(out, "  [plugins.\"io.containerd.grpc.v1.cri\".cni]");
        let _ = writeln!(out, "    bin_dir = {}", q(&self.cni_bin_dir));
        let _ = writeln!(out, "    conf_dir = {}", q(&self.cni_conf_dir));
        let _ = writeln!(out, "    max_conf_num = 1");
        out
    }
}

/// A TOML basic string.
fn toml_string(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => {
                let _ = write!(out, "\\u{:04X}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// A running, supervised containerd.
#[derive(Debug)]
pub struct Containerd {
    config: ContainerdConfig,
    stop: Arc<Notify>,
    /// The current process id (0 between runs) and how many times it was started.
    state: watch::Receiver<(u32, u32)>,
    task: Option<tokio::task::JoinHandle<()>>,
}

/// How long containerd gets to come up and answer CRI `Version`.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a stopped containerd gets between SIGTERM and SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(10);

impl Containerd {
    /// Writes the config, starts containerd, waits until its CRI answers, and keeps it running.
    pub async fn start(config: ContainerdConfig) -> Result<Self, PodsError> {
        let io_err = |what: &'static str| move |source| PodsError::Io { what, source };
        for dir in [&config.dir, &config.cni_conf_dir, &config.cni_bin_dir] {
            std::fs::create_dir_all(dir).map_err(io_err("create containerd's directories"))?;
        }
        stop_stale(&config).await;
        std::fs::write(config.config_path(), config.render())
            .map_err(io_err("write containerd's config"))?;
        let first = spawn(&config)?;
        let (tx, state) = watch::channel((first.id().unwrap_or(0), 1));
        let stop = Arc::new(Notify::new());
        let task = tokio::spawn(supervise(config.clone(), first, tx, stop.clone()));
        let containerd = Self {
            config,
            stop,
            state,
            task: Some(task),
        };
        containerd.wait_ready().await?;
        Ok(containerd)
    }

    pub fn config(&self) -> &ContainerdConfig {
        &self.config
    }

    pub fn socket(&self) -> PathBuf {
        self.config.socket()
    }

    /// The running containerd's process id, if one runs.
    pub fn pid(&self) -> Option<u32> {
        Some(self.state.borrow().0).filter(|p| *p != 0)
    }

    /// How many times containerd was started (1 until it first dies).
    pub fn starts(&self) -> u32 {
        self.state.borrow().1
    }

    /// Waits until containerd answers CRI `Version`.
    pub async fn wait_ready(&self) -> Result<(), PodsError> {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Ok(mut cri) = Cri::connect(&self.socket()).await
                && cri.version().await.is_ok()
            {
                return Ok(());
            }
            if Instant::now() >= deadline {
                let log = std::fs::read_to_string(self.config.log()).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(5).collect();
                return Err(PodsError::NotReady {
                    socket: self.socket().display().to_string(),
                    seconds: READY_TIMEOUT.as_secs(),
                    log: tail.into_iter().rev().collect::<Vec<_>>().join(" | "),
                });
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Stops containerd (SIGTERM, SIGKILL after a grace period) and its supervision.
    pub async fn stop(mut self) {
        self.stop.notify_one();
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            // Without a runtime to await on, end the process directly.
            task.abort();
            if let Some(pid) = self.pid() {
                terminate_blocking(pid);
            }
        }
    }
}

fn spawn(config: &ContainerdConfig) -> Result<Child, PodsError> {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(config.log())
        .map_err(|source| PodsError::Io {
            what: "open containerd's log",
            source,
        })?;
    let log_err = log.try_clone().map_err(|source| PodsError::Io {
        what: "open containerd's log",
        source,
    })?;
    let mut command = match &config.netns {
        Some(netns) => {
            let mut c = Command::new("nsenter");
            c.arg(format!("--net={}", netns.display()))
                .arg("containerd");
            c
        }
        None => Command::new("containerd"),
    };
    command
        .arg("--config")
        .arg(config.config_path())
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log_err)
        .kill_on_drop(false);
    let child = command.spawn().map_err(|source| PodsError::Spawn {
        program: "containerd (Debian package containerd)",
        source,
    })?;
    if let Some(pid) = child.id() {
        // Best effort: without it a restarted agent only finds the socket busy.
        let _ = std::fs::write(config.pid_file(), pid.to_string());
    }
    info!(pid = child.id(), socket = %config.socket().display(), "containerd started");
    Ok(child)
}

/// Restarts containerd whenever it exits, with a back-off of 1 s doubling to 30 s (reset after
/// a minute of running), until told to stop.
async fn supervise(
    config: ContainerdConfig,
    mut child: Child,
    state: watch::Sender<(u32, u32)>,
    stop: Arc<Notify>,
) {
    let mut backoff = Duration::from_secs(1);
    let mut started = Instant::now();
    let mut starts = 1u32;
    loop {
        tokio::select! {
            status = child.wait() => {
                state.send_replace((0, starts));
                warn!(?status, log = %config.log().display(), "containerd exited; restarting");
                if started.elapsed() > Duration::from_secs(60) {
                    backoff = Duration::from_secs(1);
                }
                tokio::select! {
                    () = tokio::time::sleep(backoff) => {}
                    () = stop.notified() => return,
                }
                backoff = (backoff * 2).min(Duration::from_secs(30));
                match spawn(&config) {
                    Ok(next) => {
                        child = next;
                        starts += 1;
                        started = Instant::now();
                        state.send_replace((child.id().unwrap_or(0), starts));
                    }
                    Err(error) => {
                        warn!(error = %crate::pods::error_chain(&error), "containerd did not start");
                    }
                }
            }
            () = stop.notified() => {
                if let Some(pid) = child.id() {
                    let _ = kill(Pid::from_raw(pid as i32), Signal::SIGTERM);
                    if tokio::time::timeout(STOP_GRACE, child.wait()).await.is_err() {
                        let _ = child.start_kill();
                        let _ = child.wait().await;
                    }
                }
                state.send_replace((0, starts));
                info!("containerd stopped");
                return;
            }
        }
    }
}

/// Ends a containerd a previous agent left running on this config (its pid file names a live
/// process whose command line carries this config's path).
async fn stop_stale(config: &ContainerdConfig) {
    let Some(pid) = std::fs::read_to_string(config.pid_file())
        .ok()
        .and_then(|p| p.trim().parse::<i32>().ok())
        .filter(|p| *p > 0)
    else {
        return;
    };
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let ours = String::from_utf8_lossy(&cmdline)
        .split('\0')
        .any(|arg| Path::new(arg) == config.config_path());
    if !ours {
        return;
    }
    warn!(pid, "ending the containerd a previous agent left running");
    let pid = Pid::from_raw(pid);
    let _ = kill(pid, Signal::SIGTERM);
    let deadline = Instant::now() + STOP_GRACE;
    while kill(pid, None).is_ok() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _ = kill(pid, Signal::SIGKILL);
}

/// SIGTERM, up to [`STOP_GRACE`] for the process to go, then SIGKILL.
fn terminate_blocking(pid: u32) {
    let pid = Pid::from_raw(pid as i32);
    let _ = kill(pid, Signal::SIGTERM);
    let deadline = Instant::now() + STOP_GRACE;
    while kill(pid, None).is_ok() && Instant::now() < deadline {
        // Reap it if it is our child; otherwise just watch for it to go.
        let _ = nix::sys::wait::waitpid(pid, Some(nix::sys::wait::WaitPidFlag::WNOHANG));
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = kill(pid, Signal::SIGKILL);
    let _ = nix::sys::wait::waitpid(pid, None);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_config_names_this_hosts_dirs_runc_on_cgroupfs_and_the_local_pause_image() {
        let mut config = ContainerdConfig::new(
            Path::new("/var/lib/slipway/containerd"),
            Path::new("/opt/cni/bin"),
            Path::new("/etc/cni/net.d"),
            "docker.io/library/pause:local",
        );
        config.snapshotter = "native".into();
        let text = config.render();
        for line in [
            "version = 2",
            "root = \"/var/lib/slipway/containerd/root\"",
            "state = \"/var/lib/slipway/containerd/state\"",
            "  address = \"/var/lib/slipway/containerd/containerd.sock\"",
            "  sandbox_image = \"docker.io/library/pause:local\"",
            "    snapshotter = \"native\"",
            "      runtime_type = \"io.containerd.runc.v2\"",
            "        SystemdCgroup = false",
            "  restrict_oom_score_adj = true",
            "    bin_dir = \"/opt/cni/bin\"",
            "    conf_dir = \"/etc/cni/net.d\"",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in\n{text}"
            );
        }
        assert_eq!(toml_string("a\"b\\c\n"), "\"a\\\"b\\\\c\\u000A\"");
    }
}
