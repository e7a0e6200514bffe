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
            && conflict.stderr.contains("the object has been modified"),
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
