//! `deploy/agent-daemonset.yaml`, the agent as a DaemonSet on any Kubernetes cluster: every
//! object parses as its upstream kind and says what the agent needs (RBAC for the feed's
//! reflectors, the README's conflist, the host mounts, `--cluster-kubeconfig in-cluster`), and
//! kubectl (the system's, and Debian's 1.20) takes the file with `apply --dry-run=client`
//! against a real supervisor. kubectl needs a server for that (discovery maps each kind to its
//! API); the supervisor serves the core kinds but not rbac.authorization.k8s.io or apps/v1
//! DaemonSets, so for those kinds the only error allowed is kubectl's "no matches for kind".
//! Unprivileged.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::api::rbac::v1::ClusterRole;
use serde::Deserialize as _;

fn manifest_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/agent-daemonset.yaml")
}

/// The documents of the manifest as JSON values.
fn documents() -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(manifest_path()).expect("the manifest");
    serde_saphyr::from_multiple::<serde_json::Value>(&text)
        .expect("YAML documents")
        .into_iter()
        .filter(|doc| !doc.is_null())
        .collect()
}

fn find(docs: &[serde_json::Value], kind: &str) -> serde_json::Value {
    docs.iter()
        .find(|d| d["kind"] == kind)
        .cloned()
        .unwrap_or_else(|| panic!("no {kind} in the manifest"))
}

/// The conflist of the README's "Installing the CNI on a node".
fn readme_conflist() -> serde_json::Value {
    let readme = include_str!("../../README.md");
    let marker = "<<'CONF'\n";
    let start = readme.find(marker).expect("the README writes a conflist") + marker.len();
    let end = readme[start..].find("\nCONF\n").expect("the conflist ends");
    serde_json::from_str(&readme[start..start + end]).expect("the README's conflist is JSON")
}

#[test]
fn the_daemonset_manifest_holds_what_the_agent_needs() {
    let docs = documents();
    let objects: Vec<String> = docs
        .iter()
        .map(|d| {
            format!(
                "{}/{}",
                d["kind"].as_str().unwrap_or("?"),
                d["metadata"]["name"].as_str().unwrap_or("?")
            )
        })
        .collect();
    assert_eq!(
        objects,
        [
            "Namespace/slipway-system",
            "ServiceAccount/slipway-agent",
            "ClusterRole/slipway-agent",
            "ClusterRoleBinding/slipway-agent",
            "ConfigMap/slipway-cni",
            "DaemonSet/slipway-agent",
        ]
    );

    // The feed's reflectors and the pod runner's status writes are allowed.
    let role = ClusterRole::deserialize(find(&docs, "ClusterRole")).expect("a ClusterRole");
    let allowed: BTreeSet<(String, String, String)> = role
        .rules
        .iter()
        .flatten()
        .flat_map(|r| {
            let groups = r.api_groups.clone().unwrap_or_default();
            let resources = r.resources.clone().unwrap_or_default();
            let verbs = r.verbs.clone();
            groups.into_iter().flat_map(move |g| {
                let verbs = verbs.clone();
                resources.clone().into_iter().flat_map(move |res| {
                    let g = g.clone();
                    verbs
                        .clone()
                        .into_iter()
                        .map(move |v| (g.clone(), res.clone(), v))
                })
            })
        })
        .collect();
    for (group, resource) in [
        ("", "nodes"),
        ("", "services"),
        ("", "namespaces"),
        ("", "pods"),
        ("discovery.k8s.io", "endpointslices"),
        ("networking.k8s.io", "networkpolicies"),
    ] {
        for verb in ["get", "list", "watch"] {
            assert!(
                allowed.contains(&(group.into(), resource.into(), verb.into())),
                "{verb} {group}/{resource} is not allowed: {allowed:?}"
            );
        }
    }
    assert!(allowed.contains(&("".into(), "pods/status".into(), "patch".into())));
    assert!(allowed.contains(&("".into(), "events".into(), "create".into())));

    // The ConfigMap holds the README's conflist.
    let config = ConfigMap::deserialize(find(&docs, "ConfigMap")).expect("a ConfigMap");
    let conflist = &config.data.expect("data")["10-slipway.conflist"];
    let conflist: serde_json::Value = serde_json::from_str(conflist).expect("JSON");
    assert_eq!(conflist, readme_conflist());

    let ds = DaemonSet::deserialize(find(&docs, "DaemonSet")).expect("a DaemonSet");
    let pod = ds.spec.expect("spec").template.spec.expect("pod spec");
    assert_eq!(pod.host_network, Some(true));
    assert_eq!(pod.service_account_name.as_deref(), Some("slipway-agent"));
    let init = &pod.init_containers.expect("an init container")[0];
    let script = init.command.clone().unwrap_or_default().join(" ");
    assert!(
        script.contains("/etc/cni/net.d/10-slipway.conflist"),
        "{script}"
    );
    let agent = &pod.containers[0];
    assert_eq!(
        agent.security_context.as_ref().and_then(|s| s.privileged),
        Some(true)
    );
    let command = agent.command.clone().unwrap_or_default().join(" ");
    assert!(
        command.contains("--cluster-kubeconfig in-cluster") && !command.contains("--host-block"),
        "every copy takes its block from its own Node: {command}"
    );
    let volumes = pod.volumes.unwrap_or_default();
    let host_path = |mount: &str| {
        let name = agent
            .volume_mounts
            .iter()
            .flatten()
            .find(|m| m.mount_path == mount)
            .map(|m| m.name.clone())
            .unwrap_or_else(|| panic!("{mount} is not mounted"));
        volumes
            .iter()
            .find(|v| v.name == name)
            .and_then(|v| v.host_path.as_ref())
            .map(|h| h.path.clone())
    };
    for path in [
        "/sys/fs/bpf",
        "/sys/fs/cgroup",
        "/opt/cni/bin",
        "/etc/cni/net.d",
        "/var/lib/slipway",
        "/run/slipway",
    ] {
        assert_eq!(host_path(path).as_deref(), Some(path), "the host's {path}");
    }
}

/// Kinds the supervisor does not serve: kubectl cannot map them there.
const NOT_SERVED: [&str; 3] = ["ClusterRole", "ClusterRoleBinding", "DaemonSet"];

#[tokio::test]
async fn kubectl_takes_the_manifest_in_a_client_dry_run() {
    let sup = common::Supervisor::start("deploy");
    let mut ran = 0;
    for kubectl in [
        PathBuf::from("/usr/bin/kubectl"),
        PathBuf::from("/opt/slipway/kubernetes-client/usr/bin/kubectl"),
    ] {
        if !kubectl.exists() && kubectl.starts_with("/opt") {
            // Debian's 1.20 is optional; the system's kubectl is not.
            continue;
        }
        let out = Command::new(&kubectl)
            .arg("--kubeconfig")
            .arg(sup.kubeconfig())
            .args(["apply", "--dry-run=client", "-f"])
            .arg(manifest_path())
            .output()
            .expect("run kubectl");
        ran += 1;
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        println!("{}:\n{stdout}{stderr}", kubectl.display());
        for object in [
            "namespace/slipway-system",
            "serviceaccount/slipway-agent",
            "configmap/slipway-cni",
        ] {
            assert!(
                stdout.contains(&format!("{object} created (dry run)"))
                    || stdout.contains(&format!("{object} configured (dry run)")),
                "{}: {object} not taken:\n{stdout}{stderr}",
                kubectl.display()
            );
        }
        // Every error is one of a kind the supervisor does not serve.
        let errors: Vec<&str> = stderr
            .lines()
            .filter(|l| !l.trim().is_empty() && !l.starts_with('W') && !l.starts_with("E1"))
            // kubectl's hint after each unmapped kind.
            .filter(|l| l.trim() != "ensure CRDs are installed first")
            .collect();
        for line in &errors {
            assert!(
                NOT_SERVED
                    .iter()
                    .any(|k| line.contains(&format!("no matches for kind \"{k}\""))),
                "{}: unexpected error: {line}\n{stderr}",
                kubectl.display()
            );
        }
        assert_eq!(errors.len(), NOT_SERVED.len(), "{stderr}");
    }
    assert!(ran >= 1, "no kubectl ran");
}
