//! Pods fed by a cluster API as kubelet is: Pods bound to the node run and report their
//! status, and `kubectl logs` reads their containers' logs through the supervisor and the
//! kubelet endpoint. Privileged (root, BPF, netns, containerd): run by scripts/test.sh.

#[path = "../../cni/tests/common/mod.rs"]
mod common;
#[path = "common/pod_host.rs"]
mod pod_host;
#[path = "common/mod.rs"]
mod sup;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;
use pod_host::*;

/// The runner fed by a cluster API as kubelet is: a Pod bound to this host's Node through the
/// API runs, its status (Running, podIP of the host block) is written back to the Pod, and
/// deleting the Pod tears its sandbox down.
#[test]
#[cfg_attr(
    not(feature = "privileged"),
    ignore = "privileged: root + BPF + netns + containerd; run scripts/test.sh"
)]
fn pods_bound_to_the_node_through_the_api_run_and_report_their_status() {
    use kube::api::{Api, DeleteParams, PostParams};
    let mut host = PodHost::start(Backoff::default());
    let block: ipnetwork::Ipv4Network = host.cluster.node(1).block.parse().expect("block");
    let api = sup::Supervisor::start("kubelet");
    let client = host.rt.block_on(api.admin());
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let mut p = web("api-web");
    p.metadata.uid = None;
    p.spec.as_mut().expect("spec").node_name = Some("n1".into());
    let created = host
        .rt
        .block_on(pods.create(&PostParams::default(), &p))
        .expect("create the Pod");
    let uid = created.metadata.uid.clone().expect("uid");

    let runner = host.runner.take().expect("runner");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = host.rt.spawn(slipway_agent::pods::kubelet::run_until(
        client.clone(),
        "n1".into(),
        runner,
        async {
            let _ = stopped.await;
        },
    ));
    let status = host.rt.block_on(sup::wait_for(
        "the Pod Running in the API",
        Duration::from_secs(60),
        || async { pods.get("api-web").await.ok()?.status.filter(running) },
    ));
    let ip: std::net::Ipv4Addr = status
        .pod_ip
        .as_deref()
        .expect("podIP")
        .parse()
        .expect("ip");
    assert!(block.contains(ip), "{ip} is outside {block}");
    assert_eq!(host.sandboxes(&uid).len(), 1, "one sandbox for the Pod");

    host.rt
        .block_on(pods.delete("api-web", &DeleteParams::default()))
        .expect("delete the Pod");
    let deadline = Instant::now() + Duration::from_secs(60);
    while !host.sandboxes(&uid).is_empty() {
        assert!(
            Instant::now() < deadline,
            "the Pod's sandbox was not torn down"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = stop.send(());
    host.runner = Some(host.rt.block_on(task).expect("the loop ends"));
}

/// A kubectl run against `kubeconfig`: (succeeded, stdout, stderr).
fn kubectl(bin: &Path, kubeconfig: &Path, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(bin)
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running {}: {e}", bin.display()));
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `kubectl logs` as on Kubernetes: the Pod's containers (through the host's containerd) write
/// CRI log files; the kubelet endpoint serves them over mutual TLS; the supervisor finds the
/// Pod's Node and proxies `pods/log` to it. Both kubectls (the system's and Debian's 1.20) read
/// stdout and stderr, `--tail`, `--timestamps`, `--limit-bytes`, `-c`, `--previous` after a
/// restart, and `-f` gets a line written after it started; an unknown container is an error; a
/// client certificate of another CA, or of the cluster's CA with another name, is refused by
/// the kubelet endpoint.
#[test]
#[cfg_attr(
    not(feature = "privileged"),
    ignore = "privileged: root + BPF + netns + containerd; run scripts/test.sh"
)]
fn kubectl_logs_reads_container_logs_through_the_supervisor_and_the_kubelet_endpoint() {
    use k8s_openapi::api::core::v1::Node;
    use kube::api::{Api, LogParams, Patch, PatchParams, PostParams};
    use std::io::BufRead as _;
    let mut host = PodHost::start(Backoff {
        initial: Duration::from_millis(1000),
        max: Duration::from_millis(4000),
    });
    let api = sup::Supervisor::start("logs");
    let client = host.rt.block_on(api.admin());

    // The kubelet endpoint, as `slipway agent --kubelet-listen` starts it. The supervisor runs
    // in the root namespace: the endpoint listens there too, at the Node's InternalIP.
    let kubelet = host
        .rt
        .block_on(slipway_agent::kubelet_api::start(
            "127.0.0.1:0".parse().expect("addr"),
            &api.kubeconfig(),
            host.dir.join("pods"),
            vec!["n1".into(), "127.0.0.1".into()],
            &host.socket(),
        ))
        .unwrap_or_else(|e| panic!("kubelet endpoint: {}", slipway_agent::pods::error_chain(&e)));
    let port = kubelet.local_addr().expect("bound").port();
    host.rt.spawn(kubelet.serve());
    let nodes: Api<Node> = Api::all(client.clone());
    host.rt
        .block_on(nodes.create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": "n1"}})).expect("node"),
        ))
        .expect("create the Node");
    host.rt
        .block_on(nodes.patch_status(
            "n1",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {
                "addresses": [{"type": "InternalIP", "address": "127.0.0.1"}],
                "daemonEndpoints": {"kubeletEndpoint": {"Port": port}},
            }})),
        ))
        .expect("the Node's status");

    let long = "x".repeat(20000);
    let mut p = pod(
        "logs",
        json!({
            "terminationGracePeriodSeconds": 1,
            "nodeName": "n1",
            "restartPolicy": "OnFailure",
            "containers": [
                {"name": "main", "image": "busybox", "command": ["sh", "-c",
                 // A line longer than containerd's 16 KiB buffer is written as partial records.
                 "echo out-1; echo err-1 >&2; echo out-2; head -c 20000 /dev/zero | tr '\\0' x; echo; exec sleep 100000"]},
                {"name": "ticker", "image": "busybox", "command": ["sh", "-c",
                 "i=0; while true; do i=$((i+1)); echo tick-$i; sleep 1; done"]},
                {"name": "crash", "image": "busybox", "command": ["sh", "-c",
                 "echo crash-run-$(date +%s%N); exit 1"]},
                {"name": "done", "image": "busybox", "command": ["echo", "finished"]},
            ],
        }),
    );
    p.metadata.uid = None;
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let uid = host
        .rt
        .block_on(pods.create(&PostParams::default(), &p))
        .expect("create the Pod")
        .metadata
        .uid
        .expect("uid");
    let runner = host.runner.take().expect("runner");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = host.rt.spawn(slipway_agent::pods::kubelet::run_until(
        client.clone(),
        "n1".into(),
        runner,
        async {
            let _ = stopped.await;
        },
    ));

    // The API's own answers: the container must be named; an unknown one is refused.
    let err = host
        .rt
        .block_on(pods.logs("logs", &LogParams::default()))
        .expect_err("three containers");
    assert!(
        err.to_string().contains(
            "a container name must be specified for pod logs, choose one of: [main ticker crash done]"
        ),
        "{err}"
    );

    let kubeconfig = api.kubeconfig();
    let debian = PathBuf::from("/opt/slipway/kubernetes-client/usr/bin/kubectl");
    let kubectls: Vec<PathBuf> = [PathBuf::from("/usr/bin/kubectl"), debian]
        .into_iter()
        .filter(|k| k.exists())
        .collect();
    assert!(!kubectls.is_empty(), "no kubectl installed");
    let main_lines = ["out-1", "err-1", "out-2", long.as_str()];
    let whole = host.rt.block_on(sup::wait_for(
        "main's whole log through kubectl logs",
        Duration::from_secs(60),
        || async {
            let (ok, out, _) = kubectl(&kubectls[0], &kubeconfig, &["logs", "logs", "-c", "main"]);
            (ok && out.lines().count() == main_lines.len()).then_some(out)
        },
    ));
    for bin in &kubectls {
        let run = |args: &[&str]| {
            let (ok, out, err) = kubectl(bin, &kubeconfig, args);
            assert!(ok, "{} {args:?}: {err}", bin.display());
            out
        };
        let out = run(&["logs", "logs", "-c", "main"]);
        assert_eq!(out, whole, "{}", bin.display());
        let mut got: Vec<&str> = out.lines().collect();
        // stdout and stderr are separate pipes: their lines keep their order within a stream.
        let stdout: Vec<&str> = got.iter().copied().filter(|l| *l != "err-1").collect();
        assert_eq!(stdout, ["out-1", "out-2", long.as_str()]);
        got.sort_unstable();
        let mut want = main_lines.to_vec();
        want.sort_unstable();
        assert_eq!(got, want, "stdout and stderr, the long line joined");

        // The last line of the log, whichever stream wrote it last.
        let last = out.lines().last().expect("a log line").to_owned();
        assert_eq!(
            run(&["logs", "logs", "-c", "main", "--tail=1"]),
            format!("{last}\n")
        );
        assert_eq!(
            run(&["logs", "logs", "-c", "main", "--tail=1", "--limit-bytes=5"]),
            last.chars().take(5).collect::<String>()
        );
        let stamped = run(&["logs", "logs", "-c", "main", "--timestamps"]);
        assert_eq!(stamped.lines().count(), main_lines.len(), "{stamped}");
        for line in stamped.lines() {
            let (time, text) = line.split_once(' ').expect("a timestamp and the text");
            time.parse::<k8s_openapi::jiff::Timestamp>()
                .unwrap_or_else(|e| panic!("{time:?} is not RFC 3339: {e}"));
            assert!(main_lines.contains(&text), "{text:?}");
        }

        let (ok, _, err) = kubectl(bin, &kubeconfig, &["logs", "logs", "-c", "nope"]);
        assert!(!ok, "an unknown container must fail");
        assert!(
            err.contains("container nope is not valid for pod logs"),
            "{err}"
        );
        let (ok, _, err) = kubectl(
            bin,
            &kubeconfig,
            &["logs", "logs", "-c", "main", "--previous"],
        );
        assert!(!ok, "main never restarted");
        assert!(err.contains("previous terminated container"), "{err}");
    }
    // Debian's kubectl 1.20 asks the API to pick the container; later ones pick the first.
    if let Some(old) = kubectls.iter().find(|k| k.starts_with("/opt")) {
        let (ok, _, err) = kubectl(old, &kubeconfig, &["logs", "logs"]);
        assert!(!ok);
        assert!(
            err.contains("choose one of: [main ticker crash done]"),
            "{err}"
        );
    }

    // --previous: the instance before the running one, after the crashing container restarted.
    host.rt.block_on(sup::wait_for(
        "the crashing container restarted",
        Duration::from_secs(60),
        || async {
            let pod = pods.get("logs").await.ok()?;
            let statuses = pod.status?.container_statuses?;
            statuses
                .iter()
                .any(|c| c.name == "crash" && c.restart_count >= 1)
                .then_some(())
        },
    ));
    for bin in &kubectls {
        let (ok, out, err) = kubectl(
            bin,
            &kubeconfig,
            &["logs", "logs", "-c", "crash", "--previous"],
        );
        assert!(ok, "{err}");
        assert!(
            out.starts_with("crash-run-") && out.lines().count() == 1,
            "{out:?}"
        );
    }

    // -f: a line the ticker writes after kubectl started comes through while it runs.
    for bin in &kubectls {
        let (_, before, _) = kubectl(bin, &kubeconfig, &["logs", "logs", "-c", "ticker"]);
        let tick = |l: &str| l.strip_prefix("tick-").and_then(|n| n.parse::<u64>().ok());
        let last = before.lines().filter_map(tick).max().unwrap_or(0);
        let mut child = Command::new(bin)
            .arg("--kubeconfig")
            .arg(&kubeconfig)
            .args(["logs", "-f", "logs", "-c", "ticker"])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("kubectl logs -f");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let deadline = Instant::now() + Duration::from_secs(30);
        let newer = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) if tick(&line).is_some_and(|n| n > last) => break line,
                Ok(_) => {}
                Err(e) => panic!("{}: no tick after tick-{last} from -f: {e}", bin.display()),
            }
        };
        let _ = child.kill();
        let _ = child.wait();
        assert!(newer.starts_with("tick-"), "{newer}");
    }

    // -f of a container that exited for good (OnFailure, exit 0) ends by itself, as kubelet's.
    for bin in &kubectls {
        let mut child = Command::new(bin)
            .arg("--kubeconfig")
            .arg(&kubeconfig)
            .args(["logs", "-f", "logs", "-c", "done"])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("kubectl logs -f");
        let deadline = Instant::now() + Duration::from_secs(30);
        let status = loop {
            if let Some(status) = child.try_wait().expect("wait") {
                break status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("{}: -f of an exited container did not end", bin.display());
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let out = child.wait_with_output().expect("output");
        assert!(status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        assert_eq!(String::from_utf8_lossy(&out.stdout), "finished\n");
    }

    // The kubelet endpoint serves the API server's identity only.
    let url = format!("https://127.0.0.1:{port}/containerLogs/default/logs/main");
    let curl = |cert: &Path, key: &Path| {
        Command::new("curl")
            .args(["-sk", "-o", "/dev/null", "-w", "%{http_code}", "--cert"])
            .arg(cert)
            .arg("--key")
            .arg(key)
            .arg(&url)
            .output()
            .expect("curl")
    };
    // The cluster CA's admin certificate: authenticated, but not the API server.
    let out = curl(
        &api.dir.join("pki/admin.crt"),
        &api.dir.join("pki/admin.key"),
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "403");
    // A certificate of another CA: the handshake fails.
    let foreign =
        rcgen::generate_simple_self_signed(vec![slipway_api::logs::KUBELET_CLIENT_USER.to_owned()])
            .expect("foreign cert");
    let dir = host.cluster.dir.join("foreign");
    std::fs::create_dir_all(&dir).expect("dir");
    std::fs::write(dir.join("c.crt"), foreign.cert.pem()).expect("cert");
    std::fs::write(dir.join("c.key"), foreign.signing_key.serialize_pem()).expect("key");
    let out = curl(&dir.join("c.crt"), &dir.join("c.key"));
    assert!(
        !out.status.success() && String::from_utf8_lossy(&out.stdout) == "000",
        "a foreign certificate got {:?}",
        String::from_utf8_lossy(&out.stdout)
    );
    // No certificate at all: the handshake fails too.
    let out = Command::new("curl")
        .args(["-sk", "-o", "/dev/null", "-w", "%{http_code}"])
        .arg(&url)
        .output()
        .expect("curl");
    assert!(!out.status.success(), "no certificate was served");

    host.rt
        .block_on(pods.delete("logs", &Default::default()))
        .expect("delete the Pod");
    let deadline = Instant::now() + Duration::from_secs(60);
    while !host.sandboxes(&uid).is_empty() {
        assert!(
            Instant::now() < deadline,
            "the Pod's sandbox was not torn down"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = stop.send(());
    host.runner = Some(host.rt.block_on(task).expect("the loop ends"));
}
