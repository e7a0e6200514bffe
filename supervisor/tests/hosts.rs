//! The kinds the hosts work builds on, with both kubectl binaries on the machine (Debian's 1.20
//! and the current one at /usr/bin/kubectl): Slipway's Host and the upstream Lease and Node are
//! created, read, listed and patched, and bad input is refused naming the field.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::{Kubectl, Supervisor, TempDir};

/// The current kubectl (Debian's 1.20 is `common::kubectl_path()`).
const CURRENT_KUBECTL: &str = "/usr/bin/kubectl";

const SETUP: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: slipway-hosts}
---
apiVersion: slipway.dev/v1alpha1
kind: Zone
metadata: {name: zone-a}
spec: {hosts: [h1]}
---
apiVersion: slipway.dev/v1alpha1
kind: HostClass
metadata: {name: small}
spec: {cpus: 2, memory: 4Gi}
"#;

const HOST: &str = r#"
apiVersion: slipway.dev/v1alpha1
kind: Host
metadata: {name: h1}
spec:
  zone: zone-a
  hostClass: small
  cluster: {namespace: team-a, name: c1}
  pool: workers
"#;

const LEASE: &str = r#"
apiVersion: coordination.k8s.io/v1
kind: Lease
metadata: {name: h1, namespace: slipway-hosts}
spec:
  holderIdentity: h1
  leaseDurationSeconds: 4
  renewTime: "2026-12-04T23:00:00.000000Z"
"#;

const NODE: &str = r#"
apiVersion: v1
kind: Node
metadata:
  name: h1
  labels:
    topology.kubernetes.io/zone: zone-a
    node.kubernetes.io/instance-type: small
    node-role.kubernetes.io/worker: ""
spec:
  podCIDR: 10.244.1.0/24
  podCIDRs: [10.244.1.0/24]
"#;

/// Column `header` of the row whose first cell is `name`, in `kubectl get` output.
fn cell(table: &str, name: &str, header: &str) -> String {
    let mut lines = table.lines();
    let head = lines.next().expect("a header line");
    let at = head
        .find(header)
        .unwrap_or_else(|| panic!("no {header} in {head}"));
    let row = lines
        .find(|l| l.split_whitespace().next() == Some(name))
        .unwrap_or_else(|| panic!("no row {name} in {table}"));
    row.get(at..)
        .and_then(|r| r.split_whitespace().next())
        .unwrap_or_default()
        .to_string()
}

fn suite(bin: &Path) {
    assert!(
        bin.exists(),
        "{} is not installed; this test needs it",
        bin.display()
    );
    let current = bin == Path::new(CURRENT_KUBECTL);
    let dir = TempDir::new("hosts");
    let sup = Supervisor::start(dir.path(), "redb", &[]);
    let k = Kubectl {
        bin: bin.to_path_buf(),
        sup: &sup,
    };
    k.run(&["apply", "-f", &sup.file("setup.yaml", SETUP)]).ok();

    // Host: created with the provider defaulted, read, listed with its columns, patched.
    k.run(&["apply", "-f", &sup.file("host.yaml", HOST)]).ok();
    let h = k.json(&["get", "host", "h1", "-o", "json"]);
    assert_eq!(h["apiVersion"], "slipway.dev/v1alpha1");
    assert_eq!(h["spec"]["provider"], "netns", "the default provider");
    assert_eq!(h["spec"]["cluster"]["namespace"], "team-a");
    let table = k.run(&["get", "hosts"]).ok().to_string();
    assert_eq!(cell(&table, "h1", "ZONE"), "zone-a", "{table}");
    assert_eq!(cell(&table, "h1", "CLASS"), "small", "{table}");
    assert_eq!(cell(&table, "h1", "PROVIDER"), "netns", "{table}");
    assert_eq!(cell(&table, "h1", "READY"), "Unknown", "{table}");
    let wide = k.run(&["get", "hosts", "-o", "wide"]).ok().to_string();
    assert_eq!(cell(&wide, "h1", "CLUSTER"), "team-a/c1", "{wide}");
    assert_eq!(cell(&wide, "h1", "POOL"), "workers", "{wide}");
    k.run(&[
        "patch",
        "host",
        "h1",
        "--type=merge",
        "-p",
        r#"{"spec":{"pool":"big"}}"#,
    ])
    .ok();
    assert_eq!(
        k.json(&["get", "host", "h1", "-o", "json"])["spec"]["pool"],
        "big"
    );
    // The schema is published: kubectl explain reads it from the OpenAPI document.
    let explain = k.run(&["explain", "host.spec"]).ok().to_string();
    assert!(
        explain.contains("provider") && explain.contains("hostClass"),
        "{explain}"
    );
    let explain = k.run(&["explain", "lease.spec"]).ok().to_string();
    assert!(explain.contains("holderIdentity"), "{explain}");
    let names = k.run(&["get", "hosts", "-o", "name"]).ok().to_string();
    assert_eq!(names.trim(), "host.slipway.dev/h1");
    if current {
        // Status goes through the status subresource (kubectl 1.24+ has --subresource).
        k.run(&[
            "patch",
            "host",
            "h1",
            "--subresource=status",
            "--type=merge",
            "-p",
            r#"{"status":{"phase":"Running","address":"10.1.0.2","agentVersion":"0.1.0"}}"#,
        ])
        .ok();
        let table = k.run(&["get", "hosts"]).ok().to_string();
        assert_eq!(cell(&table, "h1", "PHASE"), "Running", "{table}");
        assert_eq!(cell(&table, "h1", "ADDRESS"), "10.1.0.2", "{table}");
        // Ready is the host health controller's: Unknown, h1 has no Lease in slipway-system.
        common::wait_for("the READY column", Duration::from_secs(10), || {
            let table = k.run(&["get", "hosts"]).ok().to_string();
            (cell(&table, "h1", "READY") == "Unknown").then_some(())
        });
        let err = k
            .run(&[
                "patch",
                "host",
                "h1",
                "--subresource=status",
                "--type=merge",
                "-p",
                r#"{"status":{"address":"10.1.0.300"}}"#,
            ])
            .err()
            .to_string();
        assert!(
            err.contains(r#"status.address: Invalid value: "10.1.0.300""#),
            "{err}"
        );
    }

    // Bad Hosts are refused naming every bad field, and nothing is stored.
    let bad = "apiVersion: slipway.dev/v1alpha1\nkind: Host\nmetadata: {name: bad}\nspec: {hostClass: small, provider: vm}\n";
    let err = k
        .run(&["create", "-f", &sup.file("bad-host.yaml", bad)])
        .err()
        .to_string();
    assert!(err.contains(r#"Host "bad" is invalid"#), "{err}");
    assert!(err.contains("spec.zone: Required value"), "{err}");
    assert!(
        err.contains(
            r#"spec.provider: Unsupported value: "vm": supported values: "netns", "static""#
        ),
        "{err}"
    );
    assert!(!k.run(&["get", "host", "bad"]).ok, "nothing stored");

    // Lease: created, read, listed with its holder, renewed by a patch.
    k.run(&["apply", "-f", &sup.file("lease.yaml", LEASE)]).ok();
    let table = k
        .run(&["get", "leases", "-n", "slipway-hosts"])
        .ok()
        .to_string();
    assert_eq!(cell(&table, "h1", "HOLDER"), "h1", "{table}");
    k.run(&[
        "patch",
        "lease",
        "h1",
        "-n",
        "slipway-hosts",
        "--type=merge",
        "-p",
        r#"{"spec":{"renewTime":"2026-12-04T23:00:01.000000Z","leaseTransitions":1}}"#,
    ])
    .ok();
    let l = k.json(&["get", "lease", "h1", "-n", "slipway-hosts", "-o", "json"]);
    assert_eq!(l["spec"]["leaseTransitions"], 1);
    assert_eq!(l["spec"]["leaseDurationSeconds"], 4);
    assert!(
        l["spec"]["renewTime"]
            .as_str()
            .is_some_and(|t| t.starts_with("2026-12-04T23:00:01")),
        "{l}"
    );
    let err = k
        .run(&[
            "patch",
            "lease",
            "h1",
            "-n",
            "slipway-hosts",
            "--type=merge",
            "-p",
            r#"{"spec":{"leaseDurationSeconds":0}}"#,
        ])
        .err()
        .to_string();
    assert!(
        err.contains("spec.leaseDurationSeconds: Invalid value: 0: must be greater than 0"),
        "{err}"
    );

    // Node: created, listed with kubectl's columns, cordoned (a strategic merge patch).
    k.run(&["apply", "-f", &sup.file("node.yaml", NODE)]).ok();
    let table = k.run(&["get", "nodes"]).ok().to_string();
    assert_eq!(cell(&table, "h1", "STATUS"), "Unknown", "{table}");
    assert_eq!(cell(&table, "h1", "ROLES"), "worker", "{table}");
    let wide = k.run(&["get", "nodes", "-o", "wide"]).ok().to_string();
    assert_eq!(cell(&wide, "h1", "ZONE"), "zone-a", "{wide}");
    k.run(&["cordon", "h1"]).ok();
    let n = k.json(&["get", "node", "h1", "-o", "json"]);
    assert_eq!(n["spec"]["unschedulable"], true, "{n}");
    assert_eq!(n["spec"]["podCIDR"], "10.244.1.0/24");
    if current {
        k.run(&[
            "patch",
            "node",
            "h1",
            "--subresource=status",
            "--type=merge",
            "-p",
            r#"{"status":{"conditions":[{"type":"Ready","status":"True"}],
                "addresses":[{"type":"InternalIP","address":"10.1.0.2"}],
                "capacity":{"cpu":"2","memory":"4Gi"}}}"#,
        ])
        .ok();
        let wide = k.run(&["get", "nodes", "-o", "wide"]).ok().to_string();
        assert_eq!(
            cell(&wide, "h1", "STATUS"),
            "Ready,SchedulingDisabled",
            "{wide}"
        );
        assert_eq!(cell(&wide, "h1", "INTERNAL-IP"), "10.1.0.2", "{wide}");
    }
    let bad = "apiVersion: v1\nkind: Node\nmetadata: {name: bad}\nspec:\n  podCIDR: 10.244.1.1/24\n  taints: [{key: k, effect: Sometimes}]\n";
    let err = k
        .run(&["create", "-f", &sup.file("bad-node.yaml", bad)])
        .err()
        .to_string();
    assert!(
        err.contains(r#"spec.podCIDR: Invalid value: "10.244.1.1/24""#),
        "{err}"
    );
    assert!(
        err.contains(r#"spec.taints[0].effect: Unsupported value: "Sometimes""#),
        "{err}"
    );
    assert!(!k.run(&["get", "node", "bad"]).ok, "nothing stored");
}

#[test]
fn hosts_leases_and_nodes_with_debian_kubectl() {
    suite(&common::kubectl_path());
}

#[test]
fn hosts_leases_and_nodes_with_current_kubectl() {
    suite(Path::new(CURRENT_KUBECTL));
}

/// The Ready condition of Host h1.
fn ready_condition(k: &Kubectl) -> Option<serde_json::Value> {
    let h = k.json(&["get", "host", "h1", "-o", "json"]);
    h["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == "Ready")
        .cloned()
}

/// (status, reason) of Host h1's Ready condition.
fn host_ready(k: &Kubectl) -> Option<(String, String)> {
    ready_condition(k).map(|c| {
        (
            c["status"].as_str().unwrap_or_default().to_owned(),
            c["reason"].as_str().unwrap_or_default().to_owned(),
        )
    })
}

/// The host health controller: Ready is Unknown without a Lease, True while the agent renews
/// it, False once it is not renewed within its duration.
#[test]
fn a_hosts_ready_condition_follows_its_agents_lease() {
    use slipway_supervisor::api::meta::{now_secs, rfc3339};
    let dir = TempDir::new("host-health");
    let sup = Supervisor::start(dir.path(), "redb", &[]);
    let k = Kubectl {
        bin: common::kubectl_path(),
        sup: &sup,
    };
    k.run(&["apply", "-f", &sup.file("setup.yaml", SETUP)]).ok();
    k.run(&["apply", "-f", &sup.file("host.yaml", HOST)]).ok();
    let want = |status: &str, reason: &str| Some((status.to_owned(), reason.to_owned()));
    common::wait_for(
        "Ready Unknown without a Lease",
        Duration::from_secs(10),
        || (host_ready(&k) == want("Unknown", "NoLease")).then_some(()),
    );

    // The test renews the Lease as an agent would, until the controller says Ready.
    let renew = || {
        let now = rfc3339(now_secs()).replace('Z', ".000000Z");
        let lease = format!(
            "apiVersion: v1\nkind: Namespace\nmetadata: {{name: slipway-system}}\n---\n\
             apiVersion: coordination.k8s.io/v1\nkind: Lease\n\
             metadata: {{name: h1, namespace: slipway-system}}\n\
             spec: {{holderIdentity: h1, leaseDurationSeconds: 2, renewTime: \"{now}\"}}\n"
        );
        k.run(&["apply", "-f", &sup.file("agent-lease.yaml", &lease)])
            .ok();
    };
    common::wait_for("Ready True while renewed", Duration::from_secs(10), || {
        renew();
        (host_ready(&k) == want("True", "LeaseRenewed")).then_some(())
    });

    // The agent stops: the Lease expires after its 2 s.
    let stopped = Instant::now();
    common::wait_for("Ready False once expired", Duration::from_secs(10), || {
        (host_ready(&k) == want("False", "LeaseExpired")).then_some(())
    });
    let ready = ready_condition(&k).unwrap_or_default();
    assert!(
        ready["message"]
            .as_str()
            .is_some_and(|m| m.contains("expired after 2s")),
        "{ready}"
    );
    eprintln!(
        "host health: NotReady {:?} after the last renewal (2 s lease, 250 ms period)",
        stopped.elapsed()
    );
}
