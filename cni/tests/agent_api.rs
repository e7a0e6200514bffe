//! The agent's local API and log as an operator meets them: the host list survives a restart,
//! the log written to a file carries no terminal colour codes, `slipway policy set` takes the
//! files users write (multi-document YAML, `kind: List`), names the item that is wrong, and says
//! when an update made endpoints fail closed.
//! Privileged (root, BPF, netns): run by scripts/test.sh.

mod common;

use std::process::Command;

use common::{Cluster, api, slipway_binary};
use serde_json::{Value, json};

fn get(cluster: &Cluster, path: &str) -> Value {
    let (code, body) = api(&cluster.node(1).socket, "GET", path, None).expect("agent api");
    assert_eq!(code, 200, "GET {path}: {body}");
    serde_json::from_str(&body).expect("json")
}

#[test]
#[cfg_attr(
    not(feature = "privileged"),
    ignore = "privileged: root + BPF + netns; run scripts/test.sh"
)]
fn the_host_list_is_the_same_after_an_agent_restart() {
    let mut cluster = Cluster::new(3, "vxlan");
    let before = get(&cluster, "/v1/hosts");
    assert_eq!(before.as_array().map(Vec::len), Some(3), "{before}");
    cluster.kill_agent(1);
    cluster.start_agent(1);
    let after = get(&cluster, "/v1/hosts");
    assert_eq!(after, before, "names and the host's own entry are kept");
    assert_eq!(get(&cluster, "/v1/status")["hosts"], 3);
}

#[test]
#[cfg_attr(
    not(feature = "privileged"),
    ignore = "privileged: root + BPF + netns; run scripts/test.sh"
)]
fn the_agent_log_in_a_file_has_no_colour_codes() {
    let cluster = Cluster::new(1, "vxlan");
    let log = cluster.agent_log(1);
    assert!(log.contains("node datapath ready"), "{log}");
    assert!(
        !log.contains('\u{1b}'),
        "terminal escape codes in a log file: {log:?}"
    );
}

/// `slipway policy set KIND FILE` against host 1's agent: success and what it printed.
fn policy_set(cluster: &Cluster, kind: &str, name: &str, text: &str) -> (bool, String, String) {
    let file = cluster.dir.join(name);
    std::fs::write(&file, text).expect("write file");
    let out = Command::new(slipway_binary())
        .args(["policy", "set", kind])
        .arg(&file)
        .arg("--socket")
        .arg(&cluster.node(1).socket)
        .output()
        .expect("slipway");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
        file.display().to_string(),
    )
}

fn names(cluster: &Cluster) -> Vec<String> {
    get(cluster, "/v1/networkpolicies")
        .as_array()
        .expect("list")
        .iter()
        .map(|p| {
            format!(
                "{}/{}",
                p["metadata"]["namespace"].as_str().unwrap_or("?"),
                p["metadata"]["name"].as_str().unwrap_or("?")
            )
        })
        .collect()
}

#[test]
#[cfg_attr(
    not(feature = "privileged"),
    ignore = "privileged: root + BPF + netns; run scripts/test.sh"
)]
fn policy_set_takes_users_files_names_bad_items_and_reports_fail_closed() {
    let mut cluster = Cluster::new(1, "vxlan");
    cluster.kill_agent(1);
    cluster.start_agent_with(1, &["--policy-entries", "50"]);
    let (code, body) = api(
        &cluster.node(1).socket,
        "PUT",
        "/v1/namespaces",
        Some(&json!([{ "name": "x" }])),
    )
    .expect("api");
    assert_eq!(code, 200, "{body}");
    let (code, body) = api(
        &cluster.node(1).socket,
        "PUT",
        "/v1/pods",
        Some(&json!([{ "namespace": "x", "name": "b", "ip": "10.244.1.20", "labels": { "pod": "b" } }])),
    )
    .expect("api");
    assert_eq!(code, 200, "{body}");

    // Multi-document YAML, one document a `kind: List` as `kubectl get -o yaml` writes.
    let multi = "\
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: one, namespace: x}
spec: {podSelector: {}}
---
apiVersion: v1
kind: List
items:
- apiVersion: networking.k8s.io/v1
  kind: NetworkPolicy
  metadata: {name: two, namespace: x}
  spec: {podSelector: {}}
";
    let (ok, out, _) = policy_set(&cluster, "networkpolicies", "multi.yaml", multi);
    assert!(ok, "{out}");
    assert_eq!(names(&cluster), ["x/one", "x/two"]);

    // An unknown field in the second policy: named by index and name, with the user's file.
    let bad = "\
- metadata: {name: fine, namespace: x}
  spec: {}
- metadata: {name: web, namespace: x}
  spec: {podSelectr: {}}
";
    let (ok, out, file) = policy_set(&cluster, "networkpolicies", "bad.yaml", bad);
    assert!(!ok, "accepted: {out}");
    assert!(
        out.contains("networkpolicies[1] (x/web): unknown field \"spec.podSelectr\"")
            && out.contains(&file),
        "{out}"
    );
    assert!(
        out.contains(&format!("{file}:4:")),
        "the misfit is located in the user's file (line 4): {out}"
    );
    assert!(
        !out.contains("line 1 column"),
        "a position in the one-line body the CLI sent, which the user never wrote: {out}"
    );

    // An empty namespace would select nothing: refused, naming the field.
    let empty = "- metadata: {name: p, namespace: \"\"}\n  spec: {}\n";
    let (ok, out, _) = policy_set(&cluster, "networkpolicies", "empty.yaml", empty);
    assert!(!ok, "accepted: {out}");
    assert!(
        out.contains("metadata.namespace: must not be empty"),
        "{out}"
    );
    assert_eq!(
        names(&cluster),
        ["x/one", "x/two"],
        "refusals change nothing"
    );

    // 60 rules for b do not fit 50 entries: enforced, b fails closed, and the CLI says so.
    let rules: Vec<Value> = (0..60)
        .map(|i| json!({ "from": [{ "ipBlock": { "cidr": format!("192.0.2.{i}/32") } }] }))
        .collect();
    let big = json!([{ "metadata": { "name": "big", "namespace": "x" },
        "spec": { "podSelector": { "matchLabels": { "pod": "b" } }, "ingress": rules } }]);
    let (ok, out, _) = policy_set(&cluster, "networkpolicies", "big.json", &big.to_string());
    assert!(
        !ok,
        "an update that made endpoints fail closed reported as plain success: {out}"
    );
    assert!(
        out.contains("FAIL CLOSED") && out.contains("x/b ingress"),
        "{out}"
    );
    assert_eq!(names(&cluster), ["x/big"], "the update itself was applied");
}
