//! Test harness: temp dirs, free ports, a supervisor child process, a real etcd cluster and
//! Debian's kubectl, each cleaned up in `Drop` (also when a test panics).
#![allow(
    dead_code,
    reason = "each integration test binary uses a different subset"
)]

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// Debian's kubectl 1.20 (override with SLIPWAY_KUBECTL).
pub fn kubectl_path() -> PathBuf {
    std::env::var_os("SLIPWAY_KUBECTL")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/opt/slipway/kubernetes-client/usr/bin/kubectl"))
}

/// A directory removed on drop.
#[derive(Debug)]
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(name: &str) -> Self {
        static N: AtomicU32 = AtomicU32::new(0);
        let p = std::env::temp_dir().join(format!(
            "slipway-sup-{}-{name}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("create temp dir");
        Self(p)
    }
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A free loopback port, bound then released. It is taken below the kernel's ephemeral range
/// (32768 and up), so an outgoing connection of a parallel test cannot take it between this
/// check and the server's own bind; each call moves on to the next port of a range spread by
/// process id.
pub fn free_port() -> u16 {
    const FIRST: u32 = 10_000;
    const COUNT: u32 = 22_000;
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let start = std::process::id().wrapping_mul(7_919) % COUNT;
    for _ in 0..COUNT {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = u16::try_from(FIRST + (start + n) % COUNT).expect("port below 32768");
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free loopback port in {FIRST}..{}", FIRST + COUNT);
}

/// A child process killed and reaped on drop.
#[derive(Debug)]
pub struct ChildGuard(pub Option<Child>);

impl ChildGuard {
    pub fn kill(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Polls `f` until it returns Some or the timeout passes.
pub fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            start.elapsed() < timeout,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A real etcd cluster on loopback ports.
#[derive(Debug)]
pub struct Etcd {
    pub members: Vec<ChildGuard>,
    pub client_urls: Vec<String>,
    dir: TempDir,
}

impl Etcd {
    /// Starts an `n`-member cluster and waits until every member is healthy. A member that
    /// exits while starting (its port was taken after all) starts the cluster again on new
    /// ports; a cluster that does not come up names each member's log in the failure.
    pub fn start(n: usize) -> Self {
        for attempt in 1..=3 {
            let mut etcd = Self::spawn(n);
            let endpoints = etcd.client_urls.join(",");
            let start = Instant::now();
            loop {
                if etcd.healthy(&endpoints) {
                    return etcd;
                }
                let exited = etcd.members.iter_mut().any(|m| {
                    m.0.as_mut()
                        .is_some_and(|c| matches!(c.try_wait(), Ok(Some(_))))
                });
                if exited && attempt < 3 {
                    eprintln!(
                        "etcd: a member exited while starting; attempt {attempt}:\n{}",
                        etcd.logs()
                    );
                    break;
                }
                assert!(
                    !exited && start.elapsed() < Duration::from_secs(60),
                    "etcd cluster not healthy after {:?} (a member exited: {exited}):\n{}",
                    start.elapsed(),
                    etcd.logs()
                );
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        unreachable!("the last attempt returns or panics")
    }

    fn healthy(&self, endpoints: &str) -> bool {
        Command::new("etcdctl")
            .env("ETCDCTL_API", "3")
            .args([
                "--endpoints",
                endpoints,
                "--command-timeout=2s",
                "endpoint",
                "health",
            ])
            .output()
            .is_ok_and(|out| out.status.success())
    }

    /// The last lines of each member's log.
    fn logs(&self) -> String {
        (0..self.members.len())
            .map(|i| {
                let log = std::fs::read_to_string(self.dir.path().join(format!("m{i}.log")))
                    .unwrap_or_default();
                let lines: Vec<&str> = log.lines().collect();
                format!(
                    "--- m{i}\n{}",
                    lines[lines.len().saturating_sub(15)..].join("\n")
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    fn spawn(n: usize) -> Self {
        let dir = TempDir::new("etcd");
        let ports: Vec<(u16, u16)> = (0..n).map(|_| (free_port(), free_port())).collect();
        let cluster: Vec<String> = ports
            .iter()
            .enumerate()
            .map(|(i, (_, peer))| format!("m{i}=http://127.0.0.1:{peer}"))
            .collect();
        let cluster = cluster.join(",");
        let mut members = Vec::new();
        let mut client_urls = Vec::new();
        for (i, (client, peer)) in ports.iter().enumerate() {
            let data = dir.path().join(format!("m{i}"));
            let log =
                std::fs::File::create(dir.path().join(format!("m{i}.log"))).expect("etcd log");
            let child = Command::new("etcd")
                .arg("--name")
                .arg(format!("m{i}"))
                .arg("--data-dir")
                .arg(&data)
                .arg("--listen-client-urls")
                .arg(format!("http://127.0.0.1:{client}"))
                .arg("--advertise-client-urls")
                .arg(format!("http://127.0.0.1:{client}"))
                .arg("--listen-peer-urls")
                .arg(format!("http://127.0.0.1:{peer}"))
                .arg("--initial-advertise-peer-urls")
                .arg(format!("http://127.0.0.1:{peer}"))
                .arg("--initial-cluster")
                .arg(&cluster)
                .arg("--initial-cluster-state")
                .arg("new")
                .arg("--initial-cluster-token")
                .arg(format!("slipway-test-{}", std::process::id()))
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .expect("spawn etcd");
            members.push(ChildGuard(Some(child)));
            client_urls.push(format!("127.0.0.1:{client}"));
        }
        Self {
            members,
            client_urls,
            dir,
        }
    }

    /// `--store` value for the supervisor.
    pub fn store_arg(&self) -> String {
        format!("etcd://{}", self.client_urls.join(","))
    }
}

/// Which backend a test runs on.
#[derive(Debug)]
pub enum Backend {
    Redb,
    Etcd(Etcd),
}

impl Backend {
    pub fn store_arg(&self) -> String {
        match self {
            Self::Redb => "redb".into(),
            Self::Etcd(e) => e.store_arg(),
        }
    }
}

/// A supervisor process on a free loopback port.
#[derive(Debug)]
pub struct Supervisor {
    pub child: ChildGuard,
    pub addr: String,
    pub dir: PathBuf,
    args: Vec<String>,
}

impl Supervisor {
    pub fn start(dir: &Path, store: &str, extra: &[&str]) -> Self {
        Self::start_at(dir, store, "127.0.0.1:0", extra)
    }

    /// Starts on a fixed address (so clients keep working across restarts).
    pub fn start_at(dir: &Path, store: &str, listen: &str, extra: &[&str]) -> Self {
        let mut args = vec![
            "--data-dir".to_string(),
            dir.display().to_string(),
            "--listen".into(),
            listen.into(),
            "--store".into(),
            store.into(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        let mut s = Self {
            child: ChildGuard(None),
            addr: String::new(),
            dir: dir.to_path_buf(),
            args,
        };
        s.spawn();
        s
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("supervisor.log"))
            .expect("supervisor log");
        let mut child = Command::new(env!("CARGO_BIN_EXE_slipway-supervisor"))
            .args(&self.args)
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .expect("spawn supervisor");
        let stdout = child.stdout.take().expect("stdout");
        self.child = ChildGuard(Some(child));
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let line = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("supervisor did not report its address");
        self.addr = line
            .trim()
            .rsplit("https://")
            .next()
            .filter(|a| a.contains(':'))
            .unwrap_or_else(|| {
                panic!(
                    "unexpected supervisor output {line:?}; see {}",
                    self.dir.join("supervisor.log").display()
                )
            })
            .to_string();
    }

    /// Kills the process and starts it again on the same data directory.
    pub fn restart(&mut self) {
        self.child.kill();
        self.spawn();
    }

    pub fn kubeconfig(&self) -> PathBuf {
        self.dir.join("admin.kubeconfig")
    }

    /// Runs kubectl against this supervisor (extra args after the subcommand).
    pub fn kubectl(&self, args: &[&str]) -> Out {
        self.kubectl_stdin(args, None)
    }

    pub fn kubectl_stdin(&self, args: &[&str], stdin: Option<&str>) -> Out {
        let mut cmd = Command::new(kubectl_path());
        cmd.arg("--kubeconfig")
            .arg(self.kubeconfig())
            .arg("--cache-dir")
            .arg(self.dir.join("kubectl-cache"))
            .arg("--request-timeout=20s")
            .args(args)
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("spawn kubectl");
        if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
            pipe.write_all(text.as_bytes()).expect("kubectl stdin");
        }
        let out = child.wait_with_output().expect("kubectl output");
        Out::from(out, args)
    }

    /// Starts `kubectl get ... -w` writing into a file; returns the guard and the file path.
    pub fn kubectl_watch(&self, args: &[&str], name: &str) -> (ChildGuard, PathBuf) {
        let path = self.dir.join(format!("{name}.watch"));
        let file = std::fs::File::create(&path).expect("watch file");
        let child = Command::new(kubectl_path())
            .arg("--kubeconfig")
            .arg(self.kubeconfig())
            .arg("--cache-dir")
            .arg(self.dir.join("kubectl-cache"))
            .args(args)
            .stdout(file)
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn kubectl watch");
        (ChildGuard(Some(child)), path)
    }

    /// Writes a file into the data dir and returns its path.
    pub fn file(&self, name: &str, text: &str) -> String {
        let p = self.dir.join(name);
        std::fs::write(&p, text).expect("write file");
        p.display().to_string()
    }

    /// HTTPS GET with curl and no credentials; returns (code, body).
    pub fn curl_anonymous(&self, path: &str) -> (u16, String) {
        let out = Command::new("curl")
            .args([
                "-sk",
                "-o",
                "-",
                "-w",
                "\n%{http_code}",
                &format!("https://{}{path}", self.addr),
            ])
            .output()
            .expect("curl");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
        (code.trim().parse().unwrap_or(0), body.to_string())
    }
}

impl Drop for Supervisor {
    fn drop(&mut self) {
        // A failing test shows what the server logged.
        if std::thread::panicking() {
            let log = std::fs::read_to_string(self.dir.join("supervisor.log")).unwrap_or_default();
            // Backtrace frames are left out: a panic's message is what explains it.
            let tail: Vec<&str> = log
                .lines()
                .filter(|l| !is_backtrace_frame(l))
                .rev()
                .take(40)
                .collect();
            eprintln!("--- supervisor.log (last 40 lines, backtrace frames left out) ---");
            for l in tail.iter().rev() {
                eprintln!("{l}");
            }
        }
    }
}

fn is_backtrace_frame(line: &str) -> bool {
    let t = line.trim_start();
    t.starts_with("at ")
        || t.split_once(": ")
            .is_some_and(|(n, _)| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

/// kubectl's result.
#[derive(Debug)]
pub struct Out {
    pub ok: bool,
    pub stdout: String,
    pub stderr: String,
}

impl Out {
    fn from(o: Output, args: &[&str]) -> Self {
        let out = Self {
            ok: o.status.success(),
            stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        };
        eprintln!("$ kubectl {}\n{}{}", args.join(" "), out.stdout, out.stderr);
        out
    }

    /// Asserts success and returns stdout.
    #[track_caller]
    pub fn ok(&self) -> &str {
        assert!(self.ok, "kubectl failed: {}{}", self.stdout, self.stderr);
        &self.stdout
    }

    /// Asserts failure and returns stderr.
    #[track_caller]
    pub fn err(&self) -> &str {
        assert!(!self.ok, "kubectl unexpectedly succeeded: {}", self.stdout);
        &self.stderr
    }
}

/// Runs one kubectl binary (Debian's 1.20 or the current one) against a supervisor.
pub struct Kubectl<'a> {
    pub bin: PathBuf,
    pub sup: &'a Supervisor,
}

impl Kubectl<'_> {
    pub fn run(&self, args: &[&str]) -> Out {
        let out = Command::new(&self.bin)
            .arg("--kubeconfig")
            .arg(self.sup.kubeconfig())
            .arg("--cache-dir")
            .arg(self.sup.dir.join("kubectl-cache"))
            .arg("--request-timeout=20s")
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run kubectl");
        let out = Out {
            ok: out.status.success(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        };
        eprintln!(
            "$ {} {}\n{}{}",
            self.bin.display(),
            args.join(" "),
            out.stdout,
            out.stderr
        );
        out
    }

    #[track_caller]
    pub fn json(&self, args: &[&str]) -> serde_json::Value {
        serde_json::from_str(self.run(args).ok()).expect("kubectl printed JSON")
    }
}
