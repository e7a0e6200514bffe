//! `kubectl logs` against the API server, the paths that end before a kubelet answers, with
//! both kubectl binaries (Debian's 1.20 and the current one): the Pod missing, not yet
//! scheduled, on a Node that does not exist or whose kubelet does not listen, an unknown
//! container, and RBAC of `pods/log` (a viewer may, a user with no role may not). The
//! kubelet's side and the logs themselves are in the agent's privileged pods test.

mod common;

use std::path::Path;

use common::{Kubectl, Supervisor, TempDir};

const CURRENT_KUBECTL: &str = "/usr/bin/kubectl";

const TOKENS: &str = "view-tok,viewer,1\nnobody-tok,nobody,2\n";

const SETUP: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: team-a}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata: {name: viewers, namespace: team-a}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: view}
subjects: [{kind: User, name: viewer}]
---
apiVersion: v1
kind: Pod
metadata: {name: pending, namespace: team-a}
spec:
  containers: [{name: main, image: busybox}]
---
apiVersion: v1
kind: Pod
metadata: {name: lost, namespace: team-a}
spec:
  nodeName: gone
  containers: [{name: main, image: busybox}]
---
apiVersion: v1
kind: Pod
metadata: {name: two, namespace: team-a}
spec:
  nodeName: n1
  containers: [{name: a, image: busybox}, {name: b, image: busybox}]
---
apiVersion: v1
kind: Node
metadata: {name: n1}
"#;

fn suite(bin: &Path) {
    assert!(
        bin.exists(),
        "{} is not installed; this test needs it",
        bin.display()
    );
    let dir = TempDir::new("logs");
    std::fs::write(dir.path().join("tokens.csv"), TOKENS).expect("token file");
    let tokens = dir.path().join("tokens.csv").display().to_string();
    // Nothing listens at the kubelet port the Node names.
    let port = common::free_port();
    let sup = Supervisor::start(dir.path(), "redb", &["--token-file", &tokens]);
    let k = Kubectl {
        bin: bin.to_path_buf(),
        sup: &sup,
    };
    k.run(&["apply", "-f", &sup.file("setup.yaml", SETUP)]).ok();
    let status = format!(
        r#"{{"status": {{"addresses": [{{"type": "InternalIP", "address": "127.0.0.1"}}],
             "daemonEndpoints": {{"kubeletEndpoint": {{"Port": {port}}}}}}}}}"#
    );
    let patched = std::process::Command::new("curl")
        .args([
            "-sk",
            "-X",
            "PATCH",
            "-H",
            "Content-Type: application/merge-patch+json",
        ])
        .arg("--cacert")
        .arg(sup.dir.join("pki/ca.crt"))
        .arg("--cert")
        .arg(sup.dir.join("pki/admin.crt"))
        .arg("--key")
        .arg(sup.dir.join("pki/admin.key"))
        .args(["-d", &status])
        .arg(format!("https://{}/api/v1/nodes/n1/status", sup.addr))
        .output()
        .expect("curl");
    assert!(
        String::from_utf8_lossy(&patched.stdout).contains("kubeletEndpoint"),
        "{}",
        String::from_utf8_lossy(&patched.stdout)
    );

    // Discovery names the subresource, as kube-apiserver's does.
    let discovery = std::process::Command::new("curl")
        .args(["-s", "--cacert"])
        .arg(sup.dir.join("pki/ca.crt"))
        .arg("--cert")
        .arg(sup.dir.join("pki/admin.crt"))
        .arg("--key")
        .arg(sup.dir.join("pki/admin.key"))
        .arg(format!("https://{}/api/v1", sup.addr))
        .output()
        .expect("curl");
    let discovery: serde_json::Value =
        serde_json::from_slice(&discovery.stdout).expect("discovery JSON");
    let log = discovery["resources"]
        .as_array()
        .expect("resources")
        .iter()
        .find(|r| r["name"] == "pods/log")
        .expect("pods/log in /api/v1");
    assert_eq!(log["verbs"], serde_json::json!(["get"]));

    let err = |args: &[&str]| k.run(args).err().to_owned();
    let e = err(&["logs", "nope", "-n", "team-a"]);
    assert!(e.contains("NotFound") && e.contains("nope"), "{e}");
    let e = err(&["logs", "pending", "-n", "team-a"]);
    assert!(
        e.contains("pod pending has not been scheduled to a node yet"),
        "{e}"
    );
    let e = err(&["logs", "lost", "-n", "team-a"]);
    assert!(e.contains("nodes \"gone\" not found"), "{e}");
    let e = err(&["logs", "two", "-n", "team-a", "-c", "c"]);
    assert!(e.contains("container c is not valid for pod two"), "{e}");
    // The kubelet does not listen: the error says where the server tried.
    let e = err(&["logs", "two", "-n", "team-a", "-c", "a"]);
    assert!(
        e.contains(&format!("127.0.0.1:{port}/containerLogs/team-a/two/a")),
        "{e}"
    );
    let e = err(&[
        "logs",
        "two",
        "-n",
        "team-a",
        "-c",
        "a",
        "--tail=2",
        "--timestamps",
    ]);
    assert!(e.contains("?timestamps=true&tailLines=2"), "{e}");

    // RBAC: pods/log is read with `get`; a viewer passes (and meets the same kubelet), a user
    // with no role in the namespace does not.
    let e = err(&[
        "--token", "view-tok", "logs", "two", "-n", "team-a", "-c", "a",
    ]);
    assert!(e.contains("/containerLogs/"), "{e}");
    // kubectl reads the Pod first: the denial of pods/log itself is seen on the raw path.
    let denied = std::process::Command::new("curl")
        .args(["-s", "-H", "Authorization: Bearer nobody-tok", "--cacert"])
        .arg(sup.dir.join("pki/ca.crt"))
        .arg(format!(
            "https://{}/api/v1/namespaces/team-a/pods/two/log?container=a",
            sup.addr
        ))
        .output()
        .expect("curl");
    let denied = String::from_utf8_lossy(&denied.stdout);
    assert!(
        denied.contains("\"code\":403") && denied.contains("pods/log"),
        "{denied}"
    );
    for (token, want) in [("view-tok", "yes"), ("nobody-tok", "no")] {
        let out = k.run(&[
            "--token",
            token,
            "auth",
            "can-i",
            "get",
            "pods",
            "--subresource=log",
            "-n",
            "team-a",
        ]);
        assert_eq!(out.stdout.trim(), want, "{token}: {}", out.stderr);
    }
}

#[test]
fn kubectl_logs_api_paths_with_debian_kubectl() {
    suite(&common::kubectl_path());
}

#[test]
fn kubectl_logs_api_paths_with_current_kubectl() {
    suite(Path::new(CURRENT_KUBECTL));
}
