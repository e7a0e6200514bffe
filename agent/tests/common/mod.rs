//! What the agent's tests share: a real supervisor in a temporary directory, and waiting for a
//! condition with a deadline.
#![allow(dead_code, reason = "each test binary uses part of the harness")]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The `slipway` binary, built beside this test by `cargo test --workspace`.
pub fn slipway_binary() -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    let path = exe
        .parent()
        .and_then(Path::parent)
        .map(|dir| dir.join("slipway"))
        .expect("target dir");
    assert!(
        path.exists(),
        "{} is missing: run the tests with `cargo test --workspace` (scripts/test.sh)",
        path.display()
    );
    path
}

/// A supervisor in a temporary directory, killed and removed on drop (on panic too).
pub struct Supervisor {
    child: Child,
    pub dir: PathBuf,
    /// `https://127.0.0.1:PORT`.
    pub url: String,
}

impl Supervisor {
    /// Starts one whose data dir is named after `tag` (unique per test), with an audit log at
    /// `DIR/audit.log`.
    pub fn start(tag: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("slipway-agent-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("temp dir");
        let log = std::fs::File::create(dir.join("supervisor.log")).expect("log");
        let mut child = Command::new(slipway_binary())
            .args(["supervisor", "--data-dir"])
            .arg(&dir)
            .args(["--listen", "127.0.0.1:0", "--store", "redb", "--audit-log"])
            .arg(dir.join("audit.log"))
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .expect("spawn supervisor");
        let stdout = child.stdout.take().expect("stdout");
        let mut line = String::new();
        BufReader::new(stdout)
            .read_line(&mut line)
            .expect("supervisor output");
        let url = line
            .split_whitespace()
            .find(|w| w.starts_with("https://"))
            .map(str::to_owned);
        let sup = Self {
            child,
            dir,
            url: url.unwrap_or_default(),
        };
        assert!(
            !sup.url.is_empty(),
            "supervisor did not start: {line:?}; see {}",
            sup.dir.join("supervisor.log").display()
        );
        sup
    }

    pub fn kubeconfig(&self) -> PathBuf {
        self.dir.join("admin.kubeconfig")
    }

    /// The supervisor's CA certificate.
    pub fn ca(&self) -> PathBuf {
        self.dir.join("pki/ca.crt")
    }

    /// A client of the supervisor with the credentials in `kubeconfig`.
    pub async fn client_for(kubeconfig: &Path) -> kube::Client {
        let config = kube::Config::from_custom_kubeconfig(
            kube::config::Kubeconfig::read_from(kubeconfig).expect("kubeconfig"),
            &kube::config::KubeConfigOptions::default(),
        )
        .await
        .expect("config");
        kube::Client::try_from(config).expect("client")
    }

    /// An administrator's client.
    pub async fn admin(&self) -> kube::Client {
        Self::client_for(&self.kubeconfig()).await
    }
}

impl Drop for Supervisor {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
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
