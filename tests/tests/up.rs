//! `slipway up`, the README's main job, and `slipway down`: the demo cluster is Ready with its
//! three hosts over two zones, `down` stops it and nothing is left; an `up` killed with kill -9
//! is cleaned up by the next `up`. Privileged (root, netns, cgroups): run by scripts/test.sh.

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use common::slipway_binary;

/// A `slipway up` with names of its own; killed and cleaned up on drop (panics too).
struct Up {
    child: Option<Child>,
    dir: tempfile::TempDir,
    prefix: String,
    uplink: String,
    lines: Option<mpsc::Receiver<String>>,
    /// Whether drop cleans up (a test that lets the next `up` clean up disarms it).
    armed: bool,
}

impl Up {
    fn start(dir: tempfile::TempDir, prefix: &str, uplink: &str, port: u16) -> Self {
        let mut child = Command::new(slipway_binary())
            .args(["up", "--data-dir"])
            .arg(dir.path().join("state"))
            .args(["--listen", &format!("0.0.0.0:{port}")])
            .args(["--netns-prefix", prefix, "--uplink-device", uplink])
            .args(["--underlay", "10.126.0.0/16"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn slipway up");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Self {
            child: Some(child),
            dir,
            prefix: prefix.to_owned(),
            uplink: uplink.to_owned(),
            lines: Some(rx),
            armed: true,
        }
    }

    /// Every line printed until the one containing `needle`.
    fn wait_for_line(&self, needle: &str, timeout: Duration) -> Vec<String> {
        let rx = self.lines.as_ref().expect("output");
        let deadline = std::time::Instant::now() + timeout;
        let mut seen = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) => {
                    let done = line.contains(needle);
                    seen.push(line);
                    if done {
                        return seen;
                    }
                }
                Err(_) => panic!("no line with {needle:?} within {timeout:?}; saw {seen:#?}"),
            }
        }
    }

    fn leftovers(&self) -> Vec<String> {
        let mut found = Vec::new();
        for dir in [
            "/run/netns",
            "/sys/fs/cgroup/cpu",
            "/sys/fs/cgroup/memory",
            "/sys/fs/cgroup/unified",
            "/sys/fs/bpf",
        ] {
            for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if name.starts_with(&self.prefix) {
                    found.push(format!("{dir}/{name}"));
                }
            }
        }
        if Path::new("/sys/class/net").join(&self.uplink).exists() {
            found.push(format!("link {}", self.uplink));
        }
        if self.dir.path().join("state").exists() {
            found.push("the data dir".into());
        }
        // What the hosts' containerds mounted (sandboxes, rootfs overlays).
        for m in slipway_dataplane::mounts::mounts().expect("mount table") {
            if m.target.starts_with(self.dir.path()) {
                found.push(format!("mount {}", m.target.display()));
            }
        }
        found
    }
}

impl Drop for Up {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if !self.armed {
            return;
        }
        // What a killed `up` leaves, the next one removes: run one that stops at once.
        let _ = Command::new(slipway_binary())
            .args(["down", "--data-dir"])
            .arg(self.dir.path().join("state"))
            .output();
        for name in self.leftovers() {
            if let Some(ns) = name.strip_prefix("/run/netns/") {
                let _ = Command::new("ip").args(["netns", "del", ns]).output();
            }
        }
        let _ = Command::new("ip")
            .args(["link", "del", &self.uplink])
            .output();
    }
}

#[test]
#[ignore = "privileged: root + netns + cgroups; run with --ignored"]
fn slipway_up_brings_the_demo_cluster_up_and_down_leaves_nothing() {
    let id = std::process::id() & 0xffff;
    let port = std::net::TcpListener::bind("0.0.0.0:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let dir = tempfile::Builder::new()
        .prefix("slipway-e2e-up-")
        .tempdir()
        .expect("dir");
    let mut up = Up::start(
        dir,
        &format!("slipway-u{id:04x}-"),
        &format!("slwupu{id:04x}"),
        port,
    );
    let lines = up.wait_for_line("Ready in", Duration::from_secs(120));
    eprintln!("{}", lines.join("\n"));
    // Then examples/web.yaml runs on the cluster: 3 nginx pods Ready behind their Service.
    let table = up
        .wait_for_line("Ctrl-C", Duration::from_secs(120))
        .join("\n");
    assert!(table.contains("examples/web.yaml is Ready"), "{table}");
    for host in [
        "demo-demo-control-plane-0",
        "demo-demo-workers-0",
        "demo-demo-workers-1",
    ] {
        assert!(table.contains(host), "{host} not in:\n{table}");
    }
    assert!(
        table.contains("zone-a") && table.contains("zone-b"),
        "{table}"
    );
    assert!(table.contains("The workload cluster's API"), "{table}");
    // `slipway kubeconfig --cluster` gives the workload cluster's kubeconfig: its Nodes.
    let kc = Command::new(slipway_binary())
        .args([
            "kubeconfig",
            "--cluster",
            "demo",
            "-n",
            "demo",
            "--data-dir",
        ])
        .arg(up.dir.path().join("state"))
        .arg("--out")
        .arg(up.dir.path().join("demo-cluster.kubeconfig"))
        .output()
        .expect("slipway kubeconfig --cluster");
    assert!(
        kc.status.success(),
        "{}",
        String::from_utf8_lossy(&kc.stderr)
    );
    let nodes = Command::new("kubectl")
        .arg("--kubeconfig")
        .arg(up.dir.path().join("demo-cluster.kubeconfig"))
        .args(["get", "nodes", "-L", "topology.kubernetes.io/zone"])
        .output()
        .expect("kubectl get nodes");
    let nodes = String::from_utf8_lossy(&nodes.stdout);
    for host in [
        "demo-demo-control-plane-0",
        "demo-demo-workers-0",
        "demo-demo-workers-1",
    ] {
        assert!(
            nodes
                .lines()
                .any(|l| l.contains(host) && l.contains("Ready") && !l.contains("NotReady")),
            "{host} not Ready in:\n{nodes}"
        );
    }
    // The notebook's notes live on claim `notes` (provisioned by the supervisor in the zone
    // of its pod's node): a new pod after the first is deleted prints the first one's line.
    let workload = |args: &[&str]| {
        let out = Command::new("kubectl")
            .arg("--kubeconfig")
            .arg(up.dir.path().join("demo-cluster.kubeconfig"))
            .args(args)
            .output()
            .expect("kubectl");
        let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
        text.push_str(&String::from_utf8_lossy(&out.stderr));
        (out.status.success(), text)
    };
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let notebook = |not: &str| {
        runtime.block_on(common::wait_for("a Ready notebook pod", Duration::from_secs(120), || async {
            let (ok, text) = workload(&[
                "get",
                "pods",
                "-l",
                "app=notebook",
                "-o",
                "jsonpath={range .items[*]}{.metadata.name} {.status.conditions[?(@.type==\"Ready\")].status}{\"\\n\"}{end}",
            ]);
            let line = text.lines().find(|l| l.ends_with(" True") && !l.starts_with(&format!("{not} ")));
            ok.then_some(line?.split(' ').next()?.to_owned())
        }))
    };
    let first = notebook("");
    let (ok, claim) = workload(&["get", "pvc", "notes"]);
    assert!(ok && claim.contains("Bound"), "{claim}");
    let (ok, out) = workload(&["delete", "pod", &first, "--wait=false"]);
    assert!(ok, "{out}");
    let second = notebook(&first);
    let (ok, log) = workload(&["logs", &second]);
    assert!(
        ok && log.contains(&format!("{first} started"))
            && log.contains(&format!("{second} started")),
        "the notes of {first} are not in {second}'s log:\n{log}"
    );

    let kubeconfig = up.dir.path().join("state/admin.kubeconfig");
    let out = Command::new("kubectl")
        .arg("--kubeconfig")
        .arg(&kubeconfig)
        .args(["get", "clusters", "-n", "demo"])
        .output()
        .expect("kubectl");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("demo") && text.contains("Running"), "{text}");

    // The demo namespace's users: dev edits (sees the cluster), viewer reads but no Secrets.
    let as_user = |user: &str, args: &[&str]| {
        Command::new("kubectl")
            .arg("--kubeconfig")
            .arg(up.dir.path().join(format!("state/{user}.kubeconfig")))
            .args(args)
            .output()
            .expect("kubectl")
    };
    let dev = as_user("dev", &["get", "clusters", "-n", "demo"]);
    assert!(
        String::from_utf8_lossy(&dev.stdout).contains("demo"),
        "{}",
        String::from_utf8_lossy(&dev.stderr)
    );
    let viewer = as_user("viewer", &["get", "secrets", "-n", "demo"]);
    assert!(
        !viewer.status.success() && String::from_utf8_lossy(&viewer.stderr).contains("forbidden"),
        "the viewer read Secrets"
    );

    // kill -9: the next `up` removes what it left and comes up again; then `down`.
    if let Some(mut c) = up.child.take() {
        c.kill().expect("kill -9");
        c.wait().expect("reap");
    }
    assert!(!up.leftovers().is_empty(), "a killed up leaves its hosts");
    let dir = std::mem::replace(&mut up.dir, tempfile::tempdir().expect("dir"));
    let (prefix, uplink) = (up.prefix.clone(), up.uplink.clone());
    up.armed = false;
    drop(up);
    let mut up = Up::start(dir, &prefix, &uplink, port);
    up.wait_for_line("Ready in", Duration::from_secs(120));
    let down = Command::new(slipway_binary())
        .args(["down", "--data-dir"])
        .arg(up.dir.path().join("state"))
        .output()
        .expect("slipway down");
    assert!(
        down.status.success(),
        "{}",
        String::from_utf8_lossy(&down.stderr)
    );
    let status = up.child.take().expect("child").wait().expect("up exits");
    assert!(status.success(), "slipway up exited with {status}");
    assert_eq!(up.leftovers(), Vec::<String>::new());
}
