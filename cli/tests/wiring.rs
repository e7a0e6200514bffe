//! The daemons and clients the `slipway` binary carries, end to end through the binary itself:
//! `slipway blockstore` + `slipway volume` (served volumes read by qemu-img), and
//! `slipway supervisor` + `slipway apply/get/delete` over HTTPS with the generated kubeconfig.
//! The subsystems' own suites test them in depth; this proves the binary is wired to them.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// A daemon started from the binary, killed on drop, with its scratch directory.
struct Daemon {
    child: Child,
    dir: PathBuf,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Starts `slipway <args>` and waits (up to 30 s) for a stdout line containing `ready`.
fn start(dir: PathBuf, args: &[&str], ready: &str) -> (Daemon, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_slipway"))
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn slipway");
    let stdout = child.stdout.take().expect("stdout");
    let daemon = Daemon { child, dir };
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    loop {
        let line = rx
            .recv_timeout(Duration::from_secs(30))
            .unwrap_or_else(|_| panic!("no {ready:?} line from slipway {args:?}"));
        if line.contains(ready) {
            return (daemon, line);
        }
    }
}

/// Starts `slipway supervisor` on a free loopback port with its data in `dir/data`; the
/// daemon, its listening line and the data dir.
fn start_supervisor(dir: &Path) -> (Daemon, String, PathBuf) {
    let data = dir.join("data");
    let (daemon, line) = start(
        dir.to_owned(),
        &[
            "supervisor",
            "--data-dir",
            path(&data),
            "--listen",
            "127.0.0.1:0",
        ],
        "listening on https://",
    );
    (daemon, line, data)
}

fn slipway(args: &[&str]) -> String {
    let output = Command::new(env!("CARGO_BIN_EXE_slipway"))
        .args(args)
        .output()
        .expect("run slipway");
    assert!(
        output.status.success(),
        "slipway {args:?}: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("slipway-wiring-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("scratch dir");
    dir
}

fn path(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

#[test]
fn blockstore_and_volume_commands_serve_a_volume_over_nbd() {
    let dir = scratch("blockstore");
    let (data, nbd, control) = (dir.join("data"), dir.join("nbd.sock"), dir.join("ctl.sock"));
    let (_daemon, _) = start(
        dir.clone(),
        &[
            "blockstore",
            "--data-dir",
            path(&data),
            "--unix",
            path(&nbd),
            "--control",
            path(&control),
        ],
        "",
    );
    // The first line may come before the sockets; wait for the control socket.
    for _ in 0..300 {
        if control.exists() && nbd.exists() {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    slipway(&[
        "volume",
        "create",
        "vol1",
        "--size",
        "16M",
        "--control",
        path(&control),
    ]);
    assert!(slipway(&["volume", "list", "--control", path(&control)]).contains("vol1"));
    let info = Command::new("qemu-img")
        .args([
            "info",
            "--output=json",
            &format!("nbd+unix:///vol1?socket={}", path(&nbd)),
        ])
        .output()
        .expect("qemu-img");
    let info: serde_json::Value = serde_json::from_slice(&info.stdout).expect("qemu-img json");
    assert_eq!(info["virtual-size"], 16 * 1024 * 1024, "{info}");
}

#[test]
fn supervisor_and_client_commands_round_trip_an_object() {
    let dir = scratch("supervisor");
    let (_daemon, line, data) = start_supervisor(&dir);
    assert!(line.contains("127.0.0.1:"), "{line}");
    let kubeconfig = data.join("admin.kubeconfig");
    let manifest = dir.join("ns.yaml");
    std::fs::write(
        &manifest,
        "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: wiring-test\n",
    )
    .expect("manifest");
    slipway(&[
        "apply",
        "-f",
        path(&manifest),
        "--kubeconfig",
        path(&kubeconfig),
    ]);
    assert!(
        slipway(&["get", "namespaces", "--kubeconfig", path(&kubeconfig)]).contains("wiring-test")
    );
    slipway(&[
        "delete",
        "namespace",
        "wiring-test",
        "--kubeconfig",
        path(&kubeconfig),
    ]);
}

#[test]
fn lb_controller_gives_a_loadbalancer_service_a_vip_from_a_pool() {
    let dir = scratch("lb-controller");
    let (_daemon, _, data) = start_supervisor(&dir);
    let kubeconfig = data.join("admin.kubeconfig");
    let (_controller, _) = start(
        dir.join("controller"),
        &["lb", "controller", "--kubeconfig", path(&kubeconfig)],
        "allocating VIPs",
    );
    let manifest = dir.join("lb.yaml");
    std::fs::write(
        &manifest,
        "apiVersion: slipway.dev/v1alpha1\nkind: LoadBalancerPool\nmetadata:\n  name: public\n\
         spec:\n  addresses: [192.0.2.0/28]\n---\n\
         apiVersion: v1\nkind: Service\nmetadata:\n  name: web\n  namespace: default\n\
         spec:\n  type: LoadBalancer\n  ports: [{port: 80}]\n",
    )
    .expect("manifest");
    slipway(&[
        "apply",
        "-f",
        path(&manifest),
        "--kubeconfig",
        path(&kubeconfig),
    ]);
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let svc = slipway(&[
            "get",
            "service",
            "web",
            "-n",
            "default",
            "-o",
            "json",
            "--kubeconfig",
            path(&kubeconfig),
        ]);
        if svc.contains("\"ip\": \"192.0.2.") || svc.contains("\"ip\":\"192.0.2.") {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no VIP from the pool:\n{svc}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}
