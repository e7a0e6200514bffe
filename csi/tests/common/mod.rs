//! Shared fixtures for the CSI integration tests: temp dirs removed on drop, a real block store
//! daemon, a CSI server on a Unix socket and gRPC clients through it, a tool runner.
#![allow(dead_code, reason = "each test binary uses a different subset")]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

use slipway_blockstore::config::ServeConfig;
use slipway_blockstore::daemon::Daemon;
use slipway_csi::server;
use tonic::transport::Channel;

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A temp directory removed on drop (also on panic).
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let p = std::env::temp_dir().join(format!("slw-csi-{tag}-{}-{n}", std::process::id()));
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

/// Starts a real block store daemon serving `dir/data` on `dir/nbd.sock`, control `dir/ctl.sock`.
pub async fn blockstore(dir: &Path) -> Daemon {
    let cfg = ServeConfig {
        data_dir: dir.join("data"),
        listen: None,
        unix: Some(dir.join("nbd.sock")),
        control: dir.join("ctl.sock"),
        metrics: None,
        extent_size: slipway_blockstore::format::DEFAULT_EXTENT_SIZE,
        tls: None,
    };
    Daemon::start(&cfg).await.expect("block store daemon")
}

/// Serves `router` on `dir/<name>.sock` in a task; returns the socket path and a channel to it.
pub async fn serve(
    dir: &Path,
    name: &str,
    router: tonic::transport::server::Router,
) -> (PathBuf, Channel, tokio::task::JoinHandle<()>) {
    let path = dir.join(format!("{name}.sock"));
    let listener = server::bind(&path).expect("bind CSI socket");
    let p = path.clone();
    let task = tokio::spawn(async move {
        let _ = server::serve(router, listener, &p, std::future::pending()).await;
    });
    let channel = server::connect(&path).await.expect("connect to CSI socket");
    (path, channel, task)
}

/// Runs a tool, asserts it succeeded, returns stdout.
pub fn run(tool: &str, args: &[&str]) -> String {
    let out = Command::new(tool)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {tool}: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{tool} {args:?} failed ({}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// qemu-io commands against an export of the block store in `dir`; asserts no failure.
pub fn qemu_io(dir: &Path, export: &str, cmds: &[&str]) -> String {
    let uri = format!(
        "nbd+unix:///{export}?socket={}",
        dir.join("nbd.sock").display()
    );
    let mut args = vec!["-f", "raw"];
    for c in cmds {
        args.push("-c");
        args.push(c);
    }
    args.push(&uri);
    let out = run("qemu-io", &args);
    assert!(
        !out.contains("failed") && !out.contains("error") && !out.contains("Pattern verification"),
        "qemu-io {cmds:?} reported a failure:\n{out}"
    );
    out
}
