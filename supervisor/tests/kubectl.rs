//! End-to-end tests: Debian's kubectl 1.20 against a supervisor started by the test, on the
//! redb store and on a real 3-member etcd cluster.

mod common;

use std::time::Duration;

use common::{Backend, Etcd, Supervisor, TempDir, wait_for};

const NAMESPACE: &str = r#"
apiVersion: v1
kind: Namespace
metadata:
  name: team-a
spec:
  limits:
    cpu: "8"
    memory: 16Gi
  hostClasses: [small]
---
apiVersion: slipway.dev/v1alpha1
kind: HostClass
metadata:
  name: small
spec:
  cpus: 2
  memory: 4Gi
---
apiVersion: slipway.dev/v1alpha1
kind: HostClass
metadata:
  name: large
spec:
  cpus: 16
  memory: 64Gi
"#;

const SERVICE: &str = r#"
apiVersion: v1
kind: Service
metadata:
  name: web
  namespace: team-a
  labels: {app: web}
spec:
  type: LoadBalancer
  selector: {app: web}
  ports:
  - name: http
    port: 80
    targetPort: 8080
"#;

fn cluster(name: &str, replicas: u32, pods: &str, extra_net: &str) -> String {
    format!(
        r#"
apiVersion: slipway.dev/v1alpha1
kind: Cluster
metadata:
  name: {name}
  namespace: team-a
spec:
  topology:
    controlPlane:
      replicas: 1
      hostClass: small
    nodePools:
    - name: workers
      replicas: {replicas}
      hostClass: small
  settings:
    network:
      pods:
        cidrBlocks: ["{pods}"]
      services:
        cidrBlocks: ["10.96.0.0/16"]
{extra_net}"#
    )
}

fn get_json(sup: &Supervisor, args: &[&str]) -> serde_json::Value {
    let mut a = vec!["get"];
    a.extend_from_slice(args);
    a.extend_from_slice(&["-o", "json"]);
    serde_json::from_str(sup.kubectl(&a).ok()).expect("kubectl json")
}

fn wait_file_contains(path: &std::path::Path, needle: &str) {
    wait_for(
        &format!("{needle:?} in {}", path.display()),
        Duration::from_secs(20),
        || {
            std::fs::read_to_string(path)
                .ok()
                .filter(|t| t.contains(needle))
                .map(|_| ())
        },
    );
}

/// apply create/update, get (Table and yaml), get -w, describe, patch (merge, json,
/// strategic), stale update conflict, finalizers, delete, bad input, restart.
fn crud_suite(backend: &Backend) {
    let dir = TempDir::new("crud");
    let mut sup = Supervisor::start(dir.path(), &backend.store_arg(), &[]);

    // Discovery and the protobuf OpenAPI document kubectl validates with.
    let res = sup.kubectl(&["api-resources"]);
    for kind in [
        "Cluster",
        "HostClass",
        "Zone",
        "NetworkPolicy",
        "StorageClass",
        "RoleBinding",
        "PersistentVolumeClaim",
    ] {
        assert!(res.ok().contains(kind), "api-resources lacks {kind}");
    }
    let explain = sup.kubectl(&["explain", "clusters.spec.topology.nodePools"]);
    assert!(
        explain.ok().contains("replicas"),
        "explain: {}",
        explain.stdout
    );

    let ns = sup.file("ns.yaml", NAMESPACE);
    assert!(
        sup.kubectl(&["apply", "-f", &ns])
            .ok()
            .contains("namespace/team-a created")
    );
    let svc = sup.file("svc.yaml", SERVICE);
    assert!(
        sup.kubectl(&["apply", "-f", &svc])
            .ok()
            .contains("service/web created")
    );

    // Table columns.
    let table = sup.kubectl(&["get", "svc", "-n", "team-a"]);
    let lines: Vec<&str> = table.ok().lines().collect();
    assert!(
        lines[0].contains("NAME")
            && lines[0].contains("TYPE")
            && lines[0].contains("PORT(S)")
            && lines[0].contains("AGE"),
        "{lines:?}"
    );
    assert!(
        lines[1].contains("web")
            && lines[1].contains("LoadBalancer")
            && lines[1].contains("80/TCP"),
        "{lines:?}"
    );
    assert!(sup.kubectl(&["get", "hostclasses"]).ok().contains("CPUS"));

    // Watch sees the change made by the next apply.
    let (_watch, watch_file) = sup.kubectl_watch(
        &["get", "svc", "-n", "team-a", "-w", "--output-watch-events"],
        "svc",
    );
    wait_file_contains(&watch_file, "ADDED");

    // Update by applying the edited file: a second port.
    let edited = SERVICE.replace(
        "    targetPort: 8080\n",
        "    targetPort: 8080\n  - name: https\n    port: 443\n",
    );
    std::fs::write(&svc, &edited).expect("edit");
    assert!(
        sup.kubectl(&["apply", "-f", &svc])
            .ok()
            .contains("service/web configured")
    );
    wait_file_contains(&watch_file, "80/TCP,443/TCP");
    let body = std::fs::read_to_string(&watch_file).expect("watch file");
    assert!(body.contains("MODIFIED"), "{body}");
    // Removing a port from the file removes it from the object (strategic merge by port).
    std::fs::write(
        &svc,
        SERVICE.replace(
            "  - name: http\n    port: 80\n    targetPort: 8080\n",
            "  - name: https\n    port: 443\n",
        ),
    )
    .expect("edit");
    sup.kubectl(&["apply", "-f", &svc]).ok();
    let ports = sup.kubectl(&[
        "get",
        "svc",
        "web",
        "-n",
        "team-a",
        "-o",
        "jsonpath={.spec.ports[*].port}",
    ]);
    assert_eq!(ports.ok(), "443");

    let yaml = sup.kubectl(&["get", "svc", "web", "-n", "team-a", "-o", "yaml"]);
    for needle in [
        "resourceVersion:",
        "uid:",
        "creationTimestamp:",
        "kubectl.kubernetes.io/last-applied-configuration",
        "type: LoadBalancer",
    ] {
        assert!(yaml.ok().contains(needle), "yaml lacks {needle}");
    }
    let describe = sup.kubectl(&["describe", "svc", "web", "-n", "team-a"]);
    assert!(describe.ok().contains("Selector:") && describe.stdout.contains("443/TCP"));

    // Patches of every flavour.
    sup.kubectl(&[
        "patch",
        "svc",
        "web",
        "-n",
        "team-a",
        "--type",
        "merge",
        "-p",
        r#"{"spec":{"selector":{"tier":"fe"}}}"#,
    ])
    .ok();
    sup.kubectl(&[
        "patch",
        "svc",
        "web",
        "-n",
        "team-a",
        "--type",
        "json",
        "-p",
        r#"[{"op":"replace","path":"/spec/ports/0/port","value":8443}]"#,
    ])
    .ok();
    sup.kubectl(&[
        "patch",
        "svc",
        "web",
        "-n",
        "team-a",
        "--type",
        "strategic",
        "-p",
        r#"{"spec":{"ports":[{"name":"metrics","port":9100}]}}"#,
    ])
    .ok();
    let v = get_json(&sup, &["svc", "web", "-n", "team-a"]);
    assert_eq!(v["spec"]["selector"]["tier"], "fe");
    let ports: Vec<i64> = v["spec"]["ports"]
        .as_array()
        .expect("ports")
        .iter()
        .filter_map(|p| p["port"].as_i64())
        .collect();
    assert_eq!(ports, vec![8443, 9100]);

    // Edit-style update with a stale resourceVersion: 409.
    let stale = sup
        .kubectl(&["get", "svc", "web", "-n", "team-a", "-o", "json"])
        .ok()
        .to_string();
    sup.kubectl(&["label", "svc", "web", "-n", "team-a", "edited=yes"])
        .ok();
    let stale_file = sup.file("stale.json", &stale);
    let conflict = sup.kubectl(&["replace", "-f", &stale_file]);
    assert!(
        conflict.err().contains("Conflict")
            && conflict.stderr.contains("the object has been modified")
            && conflict.stderr.contains("metadata.resourceVersion: sent"),
        "{}",
        conflict.stderr
    );

    // Clusters: create, raise node pool replicas by applying the edited file.
    let c1 = sup.file("c1.yaml", &cluster("c1", 2, "192.168.0.0/16", ""));
    assert!(
        sup.kubectl(&["apply", "-f", &c1])
            .ok()
            .contains("cluster.slipway.dev/c1 created")
    );
    sup.file("c1.yaml", &cluster("c1", 3, "192.168.0.0/16", ""));
    assert!(
        sup.kubectl(&["apply", "-f", &c1])
            .ok()
            .contains("configured")
    );
    let replicas = sup.kubectl(&[
        "get",
        "cluster",
        "c1",
        "-n",
        "team-a",
        "-o",
        "jsonpath={.spec.topology.nodePools[0].replicas}",
    ]);
    assert_eq!(replicas.ok(), "3");
    let table = sup.kubectl(&["get", "clusters", "-n", "team-a"]);
    assert!(
        table.ok().contains("CONTROL PLANE") && table.stdout.contains("WORKERS"),
        "{}",
        table.stdout
    );
    // Status subresource: spec untouched, status written.
    sup.kubectl(&["get", "cluster", "c1", "-n", "team-a"]).ok();

    // Bad input: each answered with the right code and the field, nothing stored.
    let bad = |name: &str, text: &str, validate: bool, needles: &[&str]| {
        let f = sup.file(&format!("{name}.yaml"), text);
        let mut args = vec!["apply", "-f", f.as_str()];
        if !validate {
            args.push("--validate=false");
        }
        let out = sup.kubectl(&args);
        for n in needles {
            assert!(out.err().contains(n), "{name}: {n:?} not in {}", out.stderr);
        }
        let kind = if text.contains("kind: Cluster") {
            "clusters"
        } else {
            "services"
        };
        let get = sup.kubectl(&["get", kind, name, "-n", "team-a"]);
        assert!(get.err().contains("NotFound"), "{name} was stored");
    };
    bad(
        "unknown",
        &cluster("unknown", 1, "192.168.0.0/16", "      bogus: 1\n"),
        false,
        &["BadRequest", "spec.settings.network.bogus", "unknown field"],
    );
    bad(
        "nozone",
        &cluster("nozone", 1, "192.168.0.0/16", "").replace(
            "    - name: workers\n",
            "    - name: workers\n      failureDomain: nowhere\n",
        ),
        true,
        &[
            "spec.topology.nodePools[0].failureDomain",
            "nowhere",
            "Zone not found",
        ],
    );
    bad(
        "wrongtype",
        &SERVICE
            .replace("name: web", "name: wrongtype")
            .replace("port: 80", "port: eighty"),
        false,
        &["BadRequest", "spec.ports[0].port"],
    );
    // kubectl's own OpenAPI validation catches the same before sending.
    bad(
        "wrongtype2",
        &SERVICE
            .replace("name: web", "name: wrongtype2")
            .replace("port: 80", "port: eighty"),
        true,
        &["ValidationError", "port"],
    );
    bad(
        "badcidr",
        &cluster("badcidr", 1, "10.0.0.0/33", ""),
        true,
        &["Invalid", "spec.settings.network.pods.cidrBlocks[0]"],
    );
    bad(
        "smallpods",
        &cluster("smallpods", 1, "10.244.0.0/25", ""),
        true,
        &[
            "Invalid",
            "spec.settings.network.pods.cidrBlocks[0]",
            "must be /24 or larger",
        ],
    );
    bad(
        "overlap",
        &cluster(
            "overlap",
            1,
            "10.244.0.0/16",
            "      ingress:\n        cidrBlocks: [\"172.16.0.0/26\"]\n      egress:\n        cidrBlocks: [\"172.16.0.32/27\"]\n",
        ),
        true,
        &[
            "Invalid",
            "spec.settings.network.egress.cidrBlocks[0]",
            "overlaps spec.settings.network.ingress.cidrBlocks[0]",
        ],
    );
    bad(
        "quota",
        &cluster("quota", 9, "10.244.0.0/16", ""),
        true,
        &["Forbidden", "exceeded quota", "spec.limits.cpu"],
    );
    bad(
        "classes",
        &cluster("classes", 1, "10.244.0.0/16", "").replace(
            "      hostClass: small\n  settings",
            "      hostClass: large\n  settings",
        ),
        true,
        &["Forbidden", "HostClass \"large\" is not allowed"],
    );

    // Finalizers: delete marks, removing the last finalizer deletes.
    let zone = sup.file(
        "zone.yaml",
        "apiVersion: slipway.dev/v1alpha1\nkind: Zone\nmetadata:\n  name: z1\n  finalizers: [slipway.dev/test]\nspec:\n  hosts: [h1, h2]\n",
    );
    sup.kubectl(&["apply", "-f", &zone]).ok();
    sup.kubectl(&["delete", "zone", "z1", "--wait=false"]).ok();
    let z = get_json(&sup, &["zone", "z1"]);
    assert!(z["metadata"]["deletionTimestamp"].is_string(), "{z}");
    sup.kubectl(&[
        "patch",
        "zone",
        "z1",
        "--type",
        "merge",
        "-p",
        r#"{"metadata":{"finalizers":null}}"#,
    ])
    .ok();
    assert!(
        sup.kubectl(&["get", "zone", "z1"])
            .err()
            .contains("NotFound")
    );

    // Restart: everything acknowledged is still there, at the same resourceVersion.
    let before = get_json(&sup, &["svc", "web", "-n", "team-a"]);
    sup.restart();
    let after = get_json(&sup, &["svc", "web", "-n", "team-a"]);
    assert_eq!(
        before["metadata"]["resourceVersion"],
        after["metadata"]["resourceVersion"]
    );
    assert_eq!(before["spec"], after["spec"]);
    assert_eq!(
        sup.kubectl(&[
            "get",
            "cluster",
            "c1",
            "-n",
            "team-a",
            "-o",
            "jsonpath={.spec.topology.nodePools[0].replicas}"
        ])
        .ok(),
        "3"
    );

    // Delete.
    assert!(
        sup.kubectl(&["delete", "-f", &svc])
            .ok()
            .contains("service \"web\" deleted")
    );
    assert!(
        sup.kubectl(&["get", "svc", "web", "-n", "team-a"])
            .err()
            .contains("NotFound")
    );
    sup.kubectl(&["delete", "namespace", "team-a"]).ok();
    assert!(
        sup.kubectl(&["get", "cluster", "c1", "-n", "team-a"])
            .err()
            .contains("NotFound")
    );
}

#[test]
fn kubectl_crud_on_redb() {
    crud_suite(&Backend::Redb);
}

#[test]
fn kubectl_crud_on_etcd() {
    crud_suite(&Backend::Etcd(Etcd::start(3)));
}

const TOKENS: &str = "# token,user,uid,groups\nview-tok,viewer,1\nedit-tok,editor,2,\"team-a-editors\"\nowner-tok,owner,3\n";

const BINDINGS: &str = r#"
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata: {name: viewers, namespace: team-a}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: view}
subjects: [{kind: User, name: viewer}]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata: {name: editors, namespace: team-a}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: edit}
subjects: [{kind: Group, name: team-a-editors}]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata: {name: owners, namespace: team-a}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: owner}
subjects: [{kind: User, name: owner}]
"#;

fn audit_lines(sup: &Supervisor) -> Vec<serde_json::Value> {
    std::fs::read_to_string(sup.dir.join("audit.log"))
        .expect("audit log")
        .lines()
        .map(|l| serde_json::from_str(l).expect("audit line is JSON"))
        .collect()
}

/// Tokens, client certificates, per-namespace roles on every verb, 401/403 and the audit log.
fn rbac_suite(backend: &Backend) {
    let dir = TempDir::new("rbac");
    let tokens = dir.path().join("tokens.csv");
    std::fs::write(&tokens, TOKENS).expect("token file");
    let tokens = tokens.display().to_string();
    let sup = Supervisor::start(dir.path(), &backend.store_arg(), &["--token-file", &tokens]);
    let ns = sup.file("ns.yaml", NAMESPACE);
    sup.kubectl(&["apply", "-f", &ns]).ok();
    let rb = sup.file("rb.yaml", BINDINGS);
    sup.kubectl(&["apply", "-f", &rb]).ok();
    assert!(
        sup.kubectl(&["get", "rolebindings", "-n", "team-a", "-o", "wide"])
            .ok()
            .contains("ClusterRole/view")
    );
    let svc = sup.file("svc.yaml", SERVICE);

    // view: reads allowed, create refused with a readable message.
    sup.kubectl(&["--token", "view-tok", "get", "svc", "-n", "team-a"])
        .ok();
    let denied = sup.kubectl(&["--token", "view-tok", "apply", "-f", &svc]);
    assert!(
        denied.err().contains(r#"services is forbidden: User "viewer" cannot create resource "services" in API group "" in the namespace "team-a""#),
        "{}",
        denied.stderr
    );
    assert!(
        sup.kubectl(&["get", "svc", "web", "-n", "team-a"])
            .err()
            .contains("NotFound")
    );
    // Watch is authorized too: no role in `default`.
    let watch = sup.kubectl(&[
        "--token",
        "view-tok",
        "get",
        "--raw",
        "/api/v1/namespaces/default/services?watch=true",
    ]);
    assert!(
        watch.err().contains("Forbidden") || watch.stderr.contains("forbidden"),
        "{}",
        watch.stderr
    );
    // All-namespace lists need cluster-admin.
    assert!(
        sup.kubectl(&["--token", "view-tok", "get", "svc", "-A"])
            .err()
            .contains("forbidden")
    );

    // edit (through a group): write services, not RoleBindings.
    assert!(
        sup.kubectl(&["--token", "edit-tok", "apply", "-f", &svc])
            .ok()
            .contains("created")
    );
    let rb_denied = sup.kubectl(&[
        "--token",
        "edit-tok",
        "delete",
        "rolebinding",
        "viewers",
        "-n",
        "team-a",
    ]);
    assert!(
        rb_denied.err().contains("forbidden"),
        "{}",
        rb_denied.stderr
    );
    // owner manages RoleBindings; cluster-scoped writes stay with cluster-admin.
    sup.kubectl(&[
        "--token",
        "owner-tok",
        "delete",
        "rolebinding",
        "viewers",
        "-n",
        "team-a",
    ])
    .ok();
    assert!(
        sup.kubectl(&["--token", "view-tok", "get", "svc", "-n", "team-a"])
            .err()
            .contains("forbidden")
    );
    let hc = sup.kubectl(&["--token", "owner-tok", "delete", "hostclass", "large"]);
    assert!(hc.err().contains("forbidden"), "{}", hc.stderr);

    // Anonymous and bad tokens: 401.
    let (code, body) = sup.curl_anonymous("/api/v1/namespaces/team-a/services");
    assert_eq!(code, 401, "{body}");
    let status: serde_json::Value = serde_json::from_str(&body).expect("Status body");
    assert_eq!(
        (status["kind"].as_str(), status["reason"].as_str()),
        (Some("Status"), Some("Unauthorized"))
    );
    assert!(
        sup.kubectl(&["--token", "nope", "get", "svc", "-n", "team-a"])
            .err()
            .contains("Unauthorized")
    );

    let audit = audit_lines(&sup);
    let has = |user: &str, verb: &str, code: u64| {
        audit.iter().any(|l| {
            l["user"] == user && l["verb"] == verb && l["code"] == code && l["time"].is_string()
        })
    };
    assert!(
        has("viewer", "create", 403),
        "viewer's denied create not audited: {audit:?}"
    );
    assert!(has("editor", "create", 201), "editor's create not audited");
    assert!(
        has("system:anonymous", "list", 401),
        "anonymous request not audited"
    );
    assert!(has("admin", "create", 201), "admin create not audited");
    assert!(
        audit.iter().all(
            |l| !(matches!(l["verb"].as_str(), Some("get" | "list" | "watch")) && l["code"] == 200)
        ),
        "successful reads must not be audited"
    );
    let denial = audit
        .iter()
        .find(|l| l["user"] == "viewer" && l["code"] == 403)
        .expect("denial");
    assert_eq!(
        (denial["resource"].as_str(), denial["namespace"].as_str()),
        (Some("services"), Some("team-a"))
    );
}

#[test]
fn rbac_and_audit_on_redb() {
    rbac_suite(&Backend::Redb);
}

#[test]
fn rbac_and_audit_on_etcd() {
    rbac_suite(&Backend::Etcd(Etcd::start(3)));
}

fn services(n: std::ops::Range<u32>) -> String {
    n.map(|i| format!("apiVersion: v1\nkind: Service\nmetadata: {{name: s{i}, namespace: default}}\nspec:\n  ports: [{{port: 80}}]\n"))
        .collect::<Vec<_>>()
        .join("---\n")
}

/// Kill one etcd member mid-test: the API keeps serving, no acknowledged write is lost, and a
/// restarted supervisor sees every object.
#[test]
fn etcd_member_loss_loses_no_acknowledged_write() {
    let mut etcd = Etcd::start(3);
    let dir = TempDir::new("ha");
    let mut sup = Supervisor::start(dir.path(), &etcd.store_arg(), &[]);
    let first = sup.file("first.yaml", &services(0..10));
    assert_eq!(
        sup.kubectl(&["apply", "-f", &first])
            .ok()
            .matches(" created")
            .count(),
        10
    );
    let (_watch, watch_file) =
        sup.kubectl_watch(&["get", "svc", "-w", "--output-watch-events"], "ha");
    wait_file_contains(&watch_file, "s9");
    etcd.members[0].kill();
    let second = sup.file("second.yaml", &services(10..20));
    let out = sup.kubectl(&["apply", "-f", &second]);
    let acked: Vec<String> = out
        .stdout
        .lines()
        .filter(|l| l.ends_with(" created"))
        .filter_map(|l| {
            l.strip_prefix("service/")
                .and_then(|l| l.strip_suffix(" created"))
                .map(String::from)
        })
        .collect();
    assert_eq!(
        acked.len(),
        10,
        "API stopped serving after losing one member: {}",
        out.stderr
    );
    // The open watch follows the new objects too.
    wait_file_contains(&watch_file, "s19");
    sup.restart();
    let names = sup.kubectl(&["get", "svc", "-o", "jsonpath={.items[*].metadata.name}"]);
    let names: Vec<&str> = names.ok().split_whitespace().collect();
    for i in 0..10 {
        assert!(names.contains(&format!("s{i}").as_str()), "s{i} lost");
    }
    for a in &acked {
        assert!(names.contains(&a.as_str()), "acknowledged {a} lost");
    }
}

/// Watch semantics: resume from a resourceVersion, 410 Gone once compacted, bookmarks,
/// selectors; server-side apply and list selectors through kubectl.
fn watch_suite(backend: &Backend) {
    let dir = TempDir::new("watch");
    let sup = Supervisor::start(dir.path(), &backend.store_arg(), &["--watch-history", "5"]);
    let first = sup.file("first.yaml", &services(0..8));
    sup.kubectl(&["apply", "-f", &first]).ok();
    let list: serde_json::Value = serde_json::from_str(
        sup.kubectl(&["get", "--raw", "/api/v1/namespaces/default/services"])
            .ok(),
    )
    .expect("list JSON");
    let rv = list["metadata"]["resourceVersion"]
        .as_str()
        .expect("list resourceVersion")
        .to_string();
    let rv_num: u64 = rv.parse().expect("list resourceVersion");
    if let Backend::Etcd(etcd) = backend {
        let out = std::process::Command::new("etcdctl")
            .env("ETCDCTL_API", "3")
            .args(["--endpoints", &etcd.client_urls.join(","), "compact", &rv])
            .output()
            .expect("etcdctl compact");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // A compacted resourceVersion: the stream carries one ERROR event with 410 Expired.
    let gone = sup.kubectl(&[
        "get",
        "--raw",
        "/api/v1/namespaces/default/services?watch=true&resourceVersion=1",
    ]);
    let line: serde_json::Value =
        serde_json::from_str(gone.ok().lines().next().expect("one event")).expect("event JSON");
    assert_eq!(line["type"], "ERROR", "{line}");
    assert_eq!(
        (
            line["object"]["code"].as_u64(),
            line["object"]["reason"].as_str()
        ),
        (Some(410), Some("Expired"))
    );

    // Resume from the list's resourceVersion: only newer events, with bookmarks.
    let path = format!(
        "/api/v1/namespaces/default/services?watch=true&resourceVersion={rv}&allowWatchBookmarks=true&labelSelector=app%3Dnew&timeoutSeconds=30"
    );
    let (_w, file) = sup.kubectl_watch(&["get", "--raw", &path], "raw");
    let newer = "apiVersion: v1\nkind: Service\nmetadata: {name: newer, labels: {app: new}}\nspec:\n  ports: [{port: 80}]\n---\napiVersion: v1\nkind: Service\nmetadata: {name: other, labels: {app: other}}\nspec:\n  ports: [{port: 80}]\n";
    let f = sup.file("newer.yaml", newer);
    sup.kubectl(&["apply", "-f", &f]).ok();
    wait_file_contains(&file, "\"BOOKMARK\"");
    let events: Vec<serde_json::Value> = std::fs::read_to_string(&file)
        .expect("watch file")
        .lines()
        .map(|l| serde_json::from_str(l).expect("event JSON"))
        .collect();
    let added: Vec<&str> = events
        .iter()
        .filter(|e| e["type"] == "ADDED")
        .filter_map(|e| e["object"]["metadata"]["name"].as_str())
        .collect();
    assert_eq!(added, vec!["newer"], "{events:?}");
    let bookmark = events
        .iter()
        .find(|e| e["type"] == "BOOKMARK")
        .expect("bookmark");
    let brv: u64 = bookmark["object"]["metadata"]["resourceVersion"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .expect("bookmark rv");
    assert!(brv > rv_num, "bookmark {brv} not past {rv_num}");

    // List selectors.
    let names = sup.kubectl(&[
        "get",
        "svc",
        "-l",
        "app in (new,other)",
        "-o",
        "jsonpath={.items[*].metadata.name}",
    ]);
    assert_eq!(names.ok(), "newer other");
    let names = sup.kubectl(&[
        "get",
        "svc",
        "--field-selector",
        "metadata.name=s3",
        "-o",
        "jsonpath={.items[*].metadata.name}",
    ]);
    assert_eq!(names.ok(), "s3");
    // kubectl's delete by label (a list, then one delete per object).
    sup.kubectl(&["delete", "svc", "-l", "app=other"]).ok();
    assert!(
        sup.kubectl(&["get", "svc", "other"])
            .err()
            .contains("NotFound")
    );

    // Server-side apply creates, then updates.
    let zone = "apiVersion: slipway.dev/v1alpha1\nkind: Zone\nmetadata:\n  name: z-ssa\nspec:\n  hosts: [h1]\n";
    let zf = sup.file("zone.yaml", zone);
    assert!(
        sup.kubectl(&["apply", "--server-side", "-f", &zf])
            .ok()
            .contains("serverside-applied")
    );
    sup.file("zone.yaml", &zone.replace("[h1]", "[h1, h2]"));
    sup.kubectl(&["apply", "--server-side", "-f", &zf]).ok();
    assert_eq!(
        sup.kubectl(&["get", "zone", "z-ssa", "-o", "jsonpath={.spec.hosts}"])
            .ok(),
        r#"["h1","h2"]"#
    );
}

#[test]
fn watch_semantics_on_redb() {
    watch_suite(&Backend::Redb);
}

#[test]
fn watch_semantics_on_etcd() {
    watch_suite(&Backend::Etcd(Etcd::start(3)));
}

/// A kube-rs watcher follows changes across a supervisor restart; status is written only
/// through the status subresource.
async fn kube_rs_suite(backend: &Backend) -> anyhow::Result<()> {
    use futures::StreamExt;
    use k8s_openapi::api::core::v1::Service;
    use kube::api::{Api, Patch, PatchParams, PostParams};
    use kube::runtime::{WatchStreamExt, watcher};

    let dir = TempDir::new("kube");
    let listen = format!("127.0.0.1:{}", common::free_port());
    let mut sup = Supervisor::start_at(dir.path(), &backend.store_arg(), &listen, &[]);
    let kubeconfig = kube::config::Kubeconfig::read_from(sup.kubeconfig())?;
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default()).await?;
    let client = kube::Client::try_from(config)?;
    let api: Api<Service> = Api::namespaced(client, "default");
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    let stream = watcher(api.clone(), watcher::Config::default().any_semantic())
        .default_backoff()
        .applied_objects();
    let task = tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        while let Some(item) = stream.next().await {
            if let Ok(svc) = item {
                let _ = tx.send(svc.metadata.name.unwrap_or_default());
            }
        }
    });
    let svc = |name: &str| -> anyhow::Result<Service> {
        Ok(serde_json::from_value(serde_json::json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name},
            "spec": {"ports": [{"port": 80}]},
        }))?)
    };
    let expect = async |rx: &mut tokio::sync::mpsc::UnboundedReceiver<String>,
                        name: &str|
           -> anyhow::Result<()> {
        tokio::time::timeout(Duration::from_secs(40), async {
            while let Some(n) = rx.recv().await {
                if n == name {
                    return Ok(());
                }
            }
            anyhow::bail!("watcher ended")
        })
        .await
        .map_err(|_| anyhow::anyhow!("watcher did not see {name}"))?
    };
    api.create(&PostParams::default(), &svc("before")?).await?;
    expect(&mut rx, "before").await?;

    tokio::task::block_in_place(|| sup.restart());
    // The first requests after the restart may race the listener.
    let mut created = false;
    for _ in 0..50 {
        if api
            .create(&PostParams::default(), &svc("after")?)
            .await
            .is_ok()
        {
            created = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    anyhow::ensure!(created, "could not create after restart");
    expect(&mut rx, "after").await?;

    // Status subresource: patch_status writes status; a main-resource replace cannot.
    let status = serde_json::json!({"status": {"loadBalancer": {"ingress": [{"ip": "10.0.0.1"}]}}});
    api.patch_status("after", &PatchParams::default(), &Patch::Merge(&status))
        .await?;
    let mut got = api.get("after").await?;
    let ip = |s: &Service| {
        s.status
            .as_ref()
            .and_then(|st| st.load_balancer.as_ref())
            .and_then(|lb| lb.ingress.as_ref())
            .and_then(|i| i.first())
            .and_then(|i| i.ip.clone())
    };
    anyhow::ensure!(
        ip(&got).as_deref() == Some("10.0.0.1"),
        "status not written: {:?}",
        got.status
    );
    got.status = None;
    let replaced = api.replace("after", &PostParams::default(), &got).await?;
    anyhow::ensure!(
        ip(&replaced).as_deref() == Some("10.0.0.1"),
        "main resource update changed status"
    );
    // deletecollection by label selector.
    for n in ["doomed-1", "doomed-2"] {
        let mut s = svc(n)?;
        s.metadata.labels = Some([("batch".to_string(), "x".to_string())].into());
        api.create(&PostParams::default(), &s).await?;
    }
    let by_label = kube::api::ListParams::default().labels("batch=x");
    anyhow::ensure!(api.list(&by_label).await?.items.len() == 2);
    api.delete_collection(&kube::api::DeleteParams::default(), &by_label)
        .await?;
    anyhow::ensure!(
        api.list(&by_label).await?.items.is_empty(),
        "deletecollection left objects"
    );
    anyhow::ensure!(
        api.get_opt("after").await?.is_some(),
        "deletecollection removed an unselected object"
    );
    task.abort();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kube_rs_watcher_across_restart_on_redb() -> anyhow::Result<()> {
    kube_rs_suite(&Backend::Redb).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kube_rs_watcher_across_restart_on_etcd() -> anyhow::Result<()> {
    let etcd = tokio::task::block_in_place(|| Etcd::start(3));
    kube_rs_suite(&Backend::Etcd(etcd)).await
}

const ALL_KINDS: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: team-b}
spec:
  limits: {storage: 10Gi}
  storageClasses: [fast]
---
apiVersion: storage.k8s.io/v1
kind: StorageClass
metadata: {name: fast}
provisioner: csi.slipway.dev
allowVolumeExpansion: true
---
apiVersion: v1
kind: PersistentVolumeClaim
metadata: {name: data, namespace: team-b}
spec:
  accessModes: [ReadWriteOnce]
  storageClassName: fast
  resources: {requests: {storage: 4Gi}}
---
apiVersion: v1
kind: Pod
metadata: {name: iperf, namespace: team-b, labels: {app: iperf}}
spec:
  containers:
  - name: server
    image: iperf3
    command: [iperf3, -s]
    ports: [{containerPort: 5201}]
---
apiVersion: v1
kind: Service
metadata: {name: iperf, namespace: team-b}
spec:
  selector: {app: iperf}
  ports: [{port: 5201}]
---
apiVersion: v1
kind: Endpoints
metadata: {name: iperf, namespace: team-b}
subsets:
- addresses: [{ip: 10.244.1.5}]
  ports: [{port: 5201}]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: only-iperf, namespace: team-b}
spec:
  podSelector: {matchLabels: {app: iperf}}
  ingress:
  - from: [{ipBlock: {cidr: 10.0.0.0/8, except: [10.1.0.0/16]}}]
    ports: [{port: 5201}]
"#;

/// Every kind through kubectl: create, Table columns, describe with events, PVC admission.
fn all_kinds_suite(backend: &Backend) {
    let dir = TempDir::new("kinds");
    let sup = Supervisor::start(dir.path(), &backend.store_arg(), &[]);
    let f = sup.file("all.yaml", ALL_KINDS);
    assert_eq!(
        sup.kubectl(&["apply", "-f", &f])
            .ok()
            .matches(" created")
            .count(),
        7
    );
    // Events name their object by uid, as controllers write them.
    let uid = sup
        .kubectl(&[
            "get",
            "svc",
            "iperf",
            "-n",
            "team-b",
            "-o",
            "jsonpath={.metadata.uid}",
        ])
        .ok()
        .to_string();
    let ev = sup.file(
        "event.yaml",
        &format!("apiVersion: v1\nkind: Event\nmetadata: {{name: iperf.1, namespace: team-b}}\ninvolvedObject: {{apiVersion: v1, kind: Service, name: iperf, namespace: team-b, uid: {uid}}}\nreason: Provisioned\nmessage: VIP assigned\ntype: Normal\n"),
    );
    sup.kubectl(&["apply", "-f", &ev]).ok();
    let expect_cols = |args: &[&str], cols: &[&str], cells: &[&str]| {
        let out = sup.kubectl(args);
        let text = out.ok();
        let header = text.lines().next().unwrap_or_default();
        for c in cols {
            assert!(
                header.contains(c),
                "{args:?}: column {c} missing in {header:?}"
            );
        }
        for c in cells {
            assert!(text.contains(c), "{args:?}: cell {c} missing in {text}");
        }
    };
    expect_cols(
        &["get", "pods", "-n", "team-b"],
        &["NAME", "READY", "STATUS", "AGE"],
        &["0/1", "Pending"],
    );
    expect_cols(
        &["get", "pvc", "-n", "team-b"],
        &[
            "STATUS",
            "VOLUME",
            "CAPACITY",
            "ACCESS MODES",
            "STORAGECLASS",
        ],
        &["RWO", "fast"],
    );
    expect_cols(
        &["get", "endpoints", "-n", "team-b"],
        &["ENDPOINTS"],
        &["10.244.1.5:5201"],
    );
    expect_cols(
        &["get", "events", "-n", "team-b"],
        &["LAST SEEN", "TYPE", "REASON", "OBJECT", "MESSAGE"],
        &["Provisioned", "service/iperf"],
    );
    expect_cols(
        &["get", "netpol", "-n", "team-b"],
        &["POD-SELECTOR"],
        &["app=iperf"],
    );
    expect_cols(
        &["get", "sc"],
        &["PROVISIONER", "RECLAIMPOLICY", "VOLUMEBINDINGMODE"],
        &["csi.slipway.dev", "Delete", "Immediate"],
    );
    expect_cols(
        &["get", "svc", "-n", "team-b", "-o", "wide"],
        &["SELECTOR"],
        &["app=iperf"],
    );
    // describe lists the Service's events through the involvedObject field selector.
    let d = sup.kubectl(&["describe", "svc", "iperf", "-n", "team-b"]);
    assert!(
        d.ok().contains("Provisioned") && d.stdout.contains("VIP assigned"),
        "{}",
        d.stdout
    );
    assert!(
        sup.kubectl(&["describe", "namespace", "team-b"])
            .ok()
            .contains("team-b")
    );
    assert!(
        sup.kubectl(&["describe", "pod", "iperf", "-n", "team-b"])
            .ok()
            .contains("iperf3")
    );
    // PVC admission: class not allowed, storage limit exceeded; nothing stored.
    let pvc = |name: &str, class: &str, size: &str| {
        format!(
            "apiVersion: v1\nkind: PersistentVolumeClaim\nmetadata: {{name: {name}, namespace: team-b}}\nspec:\n  accessModes: [ReadWriteOnce]\n  storageClassName: {class}\n  resources: {{requests: {{storage: {size}}}}}\n"
        )
    };
    let f = sup.file("slow.yaml", &pvc("slow", "slow", "1Gi"));
    assert!(
        sup.kubectl(&["apply", "-f", &f])
            .err()
            .contains(r#"StorageClass "slow" is not allowed in namespace "team-b""#)
    );
    let f = sup.file("big.yaml", &pvc("big", "fast", "7Gi"));
    assert!(
        sup.kubectl(&["apply", "-f", &f])
            .err()
            .contains("exceeded quota: spec.limits.storage")
    );
    let f = sup.file(
        "bad.yaml",
        &pvc("bad", "fast", "lots").replace("[ReadWriteOnce]", "[ReadWriteSometimes]"),
    );
    let bad = sup.kubectl(&["apply", "-f", &f]);
    // Every bad field at once.
    assert!(
        bad.err().contains("spec.accessModes[0]")
            && bad.stderr.contains("spec.resources.requests.storage"),
        "{}",
        bad.stderr
    );
    for name in ["slow", "big", "bad"] {
        assert!(
            sup.kubectl(&["get", "pvc", name, "-n", "team-b"])
                .err()
                .contains("NotFound")
        );
    }
    // Metrics count what was served.
    let metrics = sup.kubectl(&["get", "--raw", "/metrics"]);
    assert!(
        metrics.ok().contains("slipway_apiserver_requests_total{"),
        "{}",
        metrics.stdout
    );
    assert!(
        metrics
            .stdout
            .contains(r#"verb="create",resource="persistentvolumeclaims",code="403""#)
    );
}

#[test]
fn all_kinds_on_redb() {
    all_kinds_suite(&Backend::Redb);
}

#[test]
fn all_kinds_on_etcd() {
    all_kinds_suite(&Backend::Etcd(Etcd::start(3)));
}

/// A `Write` that several tasks can share.
#[derive(Clone, Default)]
struct SharedBuf(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for SharedBuf {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .map_err(|_| std::io::Error::other("poisoned"))?
            .extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl SharedBuf {
    fn text(&self) -> String {
        self.0
            .lock()
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }
}

/// The `slipway` client commands (apply, get, get -w, describe, delete, kubeconfig) through
/// the crate's own client.
async fn cli_suite(backend: &Backend) -> anyhow::Result<()> {
    use slipway_supervisor::cli::{
        ApplyArgs, ClientOpts, DeleteArgs, DescribeArgs, GetArgs, KubeconfigArgs,
    };

    let dir = TempDir::new("cli");
    let sup =
        tokio::task::block_in_place(|| Supervisor::start(dir.path(), &backend.store_arg(), &[]));
    let opts = ClientOpts {
        kubeconfig: Some(sup.kubeconfig()),
        namespace: Some("team-a".into()),
    };
    let run_apply = async |file: &str| -> anyhow::Result<String> {
        let mut out = Vec::new();
        ApplyArgs {
            file: file.into(),
            opts: opts.clone(),
        }
        .run_to(&mut out)
        .await?;
        Ok(String::from_utf8(out)?)
    };
    let ns = sup.file("ns.yaml", NAMESPACE);
    let out = run_apply(&ns).await?;
    anyhow::ensure!(
        out.contains("namespace/team-a created")
            && out.contains("hostclass.slipway.dev/small created"),
        "{out}"
    );
    let svc = sup.file("svc.yaml", SERVICE);
    anyhow::ensure!(run_apply(&svc).await?.contains("service/web created"));
    anyhow::ensure!(run_apply(&svc).await?.contains("service/web unchanged"));

    let get = |name: Option<&str>, output: Option<&str>, watch: bool| GetArgs {
        resource: "svc".into(),
        name: name.map(String::from),
        all_namespaces: false,
        selector: None,
        output: output.map(String::from),
        watch,
        opts: opts.clone(),
    };
    let mut out = Vec::new();
    get(None, None, false).run_to(&mut out).await?;
    let table = String::from_utf8(out)?;
    anyhow::ensure!(
        table.contains("PORT(S)") && table.contains("LoadBalancer") && table.contains("80/TCP"),
        "{table}"
    );
    let mut out = Vec::new();
    get(Some("web"), Some("yaml"), false)
        .run_to(&mut out)
        .await?;
    anyhow::ensure!(String::from_utf8(out)?.contains("resourceVersion:"));

    // get -w follows an update made through apply.
    let buf = SharedBuf::default();
    let watch = {
        let mut buf = buf.clone();
        let args = get(None, None, true);
        tokio::spawn(async move { args.run_to(&mut buf).await })
    };
    wait_async(|| buf.text().contains("80/TCP")).await?;
    std::fs::write(
        &svc,
        SERVICE.replace(
            "    targetPort: 8080\n",
            "    targetPort: 8080\n  - name: https\n    port: 443\n",
        ),
    )?;
    anyhow::ensure!(run_apply(&svc).await?.contains("service/web configured"));
    wait_async(|| buf.text().contains("80/TCP,443/TCP")).await?;
    watch.abort();

    let mut out = Vec::new();
    DescribeArgs {
        resource: "service".into(),
        name: "web".into(),
        opts: opts.clone(),
    }
    .run_to(&mut out)
    .await?;
    let text = String::from_utf8(out)?;
    anyhow::ensure!(
        text.contains("name: web") && text.contains("Events: <none>"),
        "{text}"
    );

    // kubeconfig for a new user: authenticated by certificate, authorized by nothing yet.
    let alice = dir.path().join("alice.kubeconfig");
    KubeconfigArgs {
        data_dir: dir.path().to_path_buf(),
        user: Some("alice".into()),
        cluster: None,
        namespace: "default".into(),
        group: None,
        token: None,
        days: slipway_supervisor::tls::USER_DAYS,
        out: Some(alice.clone()),
    }
    .run()?;
    let alice_opts = ClientOpts {
        kubeconfig: Some(alice),
        namespace: Some("team-a".into()),
    };
    let denied = GetArgs {
        opts: alice_opts,
        ..get(None, None, false)
    }
    .run_to(&mut Vec::new())
    .await;
    let msg = format!(
        "{:#}",
        denied
            .err()
            .ok_or_else(|| anyhow::anyhow!("alice could list services"))?
    );
    anyhow::ensure!(
        msg.contains(r#"User "alice" cannot list resource "services""#),
        "{msg}"
    );

    let mut out = Vec::new();
    DeleteArgs {
        resource: None,
        name: None,
        file: Some(svc.into()),
        opts: opts.clone(),
    }
    .run_to(&mut out)
    .await?;
    anyhow::ensure!(String::from_utf8(out)?.contains("service \"web\" deleted"));
    let gone = get(Some("web"), None, false).run_to(&mut Vec::new()).await;
    anyhow::ensure!(
        format!(
            "{:#}",
            gone.err()
                .ok_or_else(|| anyhow::anyhow!("web still there"))?
        )
        .contains("NotFound")
    );
    Ok(())
}

async fn wait_async(mut f: impl FnMut() -> bool) -> anyhow::Result<()> {
    for _ in 0..200 {
        if f() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    anyhow::bail!("timed out")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slipway_client_commands_on_redb() -> anyhow::Result<()> {
    cli_suite(&Backend::Redb).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slipway_client_commands_on_etcd() -> anyhow::Result<()> {
    let etcd = tokio::task::block_in_place(|| Etcd::start(3));
    cli_suite(&Backend::Etcd(etcd)).await
}

/// The API benchmark at smoke-test scale: every metric for both stores, as JSON lines.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_api_smoke() -> anyhow::Result<()> {
    let dir = TempDir::new("bench");
    let out = dir.path().join("api.jsonl");
    let args = slipway_supervisor::bench::BenchApiArgs {
        creates: 40,
        gets: 80,
        list_objects: 60,
        concurrency: 4,
        watchers: 5,
        watch_events: 10,
        skip_etcd: false,
        skip_check_perf: true,
        out: out.clone(),
    };
    let ms = args.run_async().await?;
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(&out)?
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()?;
    anyhow::ensure!(lines.len() == ms.len() && ms.len() == 10, "{lines:?}");
    for l in &lines {
        anyhow::ensure!(
            l["suite"] == "api" && l["slipway"].as_f64().is_some_and(|v| v > 0.0),
            "{l}"
        );
    }
    for metric in [
        "creates_per_s_redb",
        "gets_per_s_etcd",
        "list_60_ms_redb",
        "watch_latency_p99_5w_etcd",
    ] {
        anyhow::ensure!(
            lines.iter().any(|l| l["metric"] == metric),
            "missing {metric}"
        );
    }
    Ok(())
}

/// The full-scale API benchmark (10,000 objects, 100 watchers, etcdctl check perf), minutes
/// long, so behind a feature rather than `#[ignore]` (which scripts/test.sh reserves for the
/// privileged tests): `cargo test -p slipway-supervisor --features bench-full --test kubectl
/// bench_api_full -- --nocapture`.
#[cfg(feature = "bench-full")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_api_full() -> anyhow::Result<()> {
    let args = slipway_supervisor::bench::BenchApiArgs {
        creates: 2000,
        gets: 5000,
        list_objects: 10_000,
        concurrency: 16,
        watchers: 100,
        watch_events: 200,
        skip_etcd: false,
        skip_check_perf: false,
        out: std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../target/slipway-bench/api.jsonl"),
    };
    for m in args.run_async().await? {
        eprintln!(
            "{:<32} {:>12.2} {:<6} {:?}",
            m.metric, m.value, m.unit, m.baseline
        );
    }
    Ok(())
}
