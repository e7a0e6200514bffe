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
