//! The API kubectl expects beyond CRUD, with both kubectl binaries on the machine (Debian's
//! 1.20 and the current one at /usr/bin/kubectl): `run`, `auth can-i`, `scale`, paging with
//! `--chunk-size`, server-side apply conflicts between field managers, `--dry-run=server`.

mod common;

use std::path::Path;

use common::{Kubectl, Supervisor, TempDir};

/// The current kubectl (Debian's 1.20 is `common::kubectl_path()`).
const CURRENT_KUBECTL: &str = "/usr/bin/kubectl";

const TOKENS: &str = "view-tok,viewer,1\n";

const SETUP: &str = r#"
apiVersion: v1
kind: Namespace
metadata:
  name: team-a
spec:
  limits: {cpu: "8", memory: 16Gi}
  hostClasses: [small]
---
apiVersion: slipway.dev/v1alpha1
kind: HostClass
metadata: {name: small}
spec: {cpus: 2, memory: 4Gi}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata: {name: viewers, namespace: team-a}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: view}
subjects: [{kind: User, name: viewer}]
---
apiVersion: slipway.dev/v1alpha1
kind: Cluster
metadata: {name: c1, namespace: team-a}
spec:
  topology:
    controlPlane: {replicas: 1, hostClass: small}
    nodePools: [{name: workers, replicas: 1, hostClass: small}]
  settings:
    network:
      pods: {cidrBlocks: ["10.244.0.0/16"]}
      services: {cidrBlocks: ["10.96.0.0/16"]}
"#;

fn service(name: &str, tier: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: team-a\n  labels: {{tier: {tier}}}\nspec:\n  ports: [{{port: 80}}]\n"
    )
}

fn suite(bin: &Path) {
    assert!(
        bin.exists(),
        "{} is not installed; this test needs it",
        bin.display()
    );
    let dir = TempDir::new("kubectl-api");
    std::fs::write(dir.path().join("tokens.csv"), TOKENS).expect("token file");
    let tokens = dir.path().join("tokens.csv").display().to_string();
    let sup = Supervisor::start(dir.path(), "redb", &["--token-file", &tokens]);
    let k = Kubectl {
        bin: bin.to_path_buf(),
        sup: &sup,
    };
    k.run(&["apply", "-f", &sup.file("setup.yaml", SETUP)]).ok();

    // kubectl run: the upstream Pod fields it sends (dnsPolicy, resources: {}) are accepted,
    // unknown ones are still refused by the server.
    k.run(&[
        "run",
        "web",
        "--image=busybox",
        "--restart=Never",
        "-n",
        "team-a",
    ])
    .ok();
    assert_eq!(
        k.run(&[
            "get",
            "pod",
            "web",
            "-n",
            "team-a",
            "-o",
            "jsonpath={.spec.dnsPolicy}/{.spec.restartPolicy}"
        ])
        .ok(),
        "ClusterFirst/Never"
    );
    let bad = sup.file(
        "bad-pod.yaml",
        "apiVersion: v1\nkind: Pod\nmetadata: {name: bad, namespace: team-a}\nspec:\n  containers: [{name: c, image: busybox}]\n  bogus: 1\n",
    );
    let refused = k.run(&["create", "--validate=false", "-f", &bad]);
    assert!(
        refused.err().contains(r#"unknown field "spec.bogus""#),
        "{}",
        refused.stderr
    );

    // auth can-i: the RBAC decision of the verbs themselves.
    assert_eq!(
        k.run(&["auth", "can-i", "create", "pods", "-n", "team-a"])
            .ok()
            .trim(),
        "yes"
    );
    assert_eq!(
        k.run(&[
            "--token",
            "view-tok",
            "auth",
            "can-i",
            "get",
            "clusters.slipway.dev",
            "-n",
            "team-a"
        ])
        .ok()
        .trim(),
        "yes"
    );
    let no = k.run(&[
        "--token", "view-tok", "auth", "can-i", "delete", "pods", "-n", "team-a",
    ]);
    no.err();
    assert_eq!(no.stdout.trim(), "no");

    // scale: through the object's own path, so quota still applies.
    k.run(&["scale", "cluster/c1", "--replicas=3", "-n", "team-a"])
        .ok();
    assert_eq!(
        k.run(&[
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
    let scale = k.json(&[
        "get",
        "--raw",
        "/apis/slipway.dev/v1alpha1/namespaces/team-a/clusters/c1/scale",
    ]);
    assert_eq!(scale["kind"], "Scale");
    assert_eq!(scale["spec"]["replicas"], 3);
    // kubectl's own precondition reads the scale first.
    let stale = k.run(&[
        "scale",
        "cluster/c1",
        "--current-replicas=5",
        "--replicas=2",
        "-n",
        "team-a",
    ]);
    stale.err();
    k.run(&[
        "scale",
        "cluster/c1",
        "--current-replicas=3",
        "--replicas=2",
        "-n",
        "team-a",
    ])
    .ok();
    assert_eq!(
        k.json(&[
            "get",
            "--raw",
            "/apis/slipway.dev/v1alpha1/namespaces/team-a/clusters/c1/scale"
        ])["spec"]["replicas"],
        2
    );
    let over = k.run(&["scale", "cluster/c1", "--replicas=9", "-n", "team-a"]);
    assert!(over.err().contains("forbidden"), "{}", over.stderr);

    // Paging: --chunk-size lists everything in pages; the raw pages carry continue tokens.
    let names: Vec<String> = (0..7).map(|i| format!("page-{i}")).collect();
    let many: String = names
        .iter()
        .map(|n| format!("---\n{}", service(n, "web")))
        .collect();
    k.run(&["apply", "-f", &sup.file("many.yaml", &many)]).ok();
    let listed = k.run(&["get", "svc", "-n", "team-a", "--chunk-size=2", "-o", "name"]);
    let listed: Vec<&str> = listed.ok().lines().collect();
    for n in &names {
        assert!(
            listed.contains(&format!("service/{n}").as_str()),
            "{n} missing from {listed:?}"
        );
    }
    let mut seen = Vec::new();
    let mut path = "/api/v1/namespaces/team-a/services?limit=3".to_string();
    loop {
        let page = k.json(&["get", "--raw", &path]);
        let items = page["items"].as_array().expect("items");
        assert!(items.len() <= 3, "{page}");
        seen.extend(items.iter().map(|i| i["metadata"]["name"].clone()));
        match page["metadata"]["continue"].as_str() {
            Some(c) if !c.is_empty() => {
                path = format!("/api/v1/namespaces/team-a/services?limit=3&continue={c}")
            }
            _ => break,
        }
    }
    assert_eq!(seen.len(), names.len(), "{seen:?}");

    // Server-side apply: a second manager changing the first one's field gets a conflict,
    // --force-conflicts takes the field over.
    let svc = sup.file("ssa.yaml", &service("ssa", "web"));
    k.run(&[
        "apply",
        "--server-side",
        "--field-manager=alice",
        "-f",
        &svc,
    ])
    .ok();
    std::fs::write(&svc, service("ssa", "db")).expect("edit");
    let conflict = k.run(&["apply", "--server-side", "--field-manager=bob", "-f", &svc]);
    assert!(
        conflict.err().contains("conflict") && conflict.stderr.contains("alice"),
        "{}",
        conflict.stderr
    );
    k.run(&[
        "apply",
        "--server-side",
        "--field-manager=bob",
        "--force-conflicts",
        "-f",
        &svc,
    ])
    .ok();
    let live = k.json(&["get", "--raw", "/api/v1/namespaces/team-a/services/ssa"]);
    assert_eq!(live["metadata"]["labels"]["tier"], "db");
    let managers: Vec<&str> = live["metadata"]["managedFields"]
        .as_array()
        .expect("managedFields")
        .iter()
        .filter_map(|e| e["manager"].as_str())
        .collect();
    assert!(managers.contains(&"bob"), "{managers:?}");

    // kubectl's create generators (current kubectl sends these four as protobuf).
    k.run(&["create", "namespace", "gen-ns"]).ok();
    k.run(&[
        "create",
        "configmap",
        "gen-cm",
        "-n",
        "team-a",
        "--from-literal=greeting=héllo",
    ])
    .ok();
    k.run(&[
        "create",
        "secret",
        "generic",
        "gen-secret",
        "-n",
        "team-a",
        "--from-literal=token=s3cr3t",
    ])
    .ok();
    k.run(&["create", "serviceaccount", "gen-sa", "-n", "team-a"])
        .ok();
    k.run(&[
        "create",
        "deployment",
        "gen-deploy",
        "-n",
        "team-a",
        "--image=busybox",
        "--replicas=2",
        "--port=8080",
        "--",
        "sleep",
        "3600",
    ])
    .ok();
    k.run(&[
        "create",
        "service",
        "clusterip",
        "gen-svc",
        "-n",
        "team-a",
        "--tcp=80:http",
    ])
    .ok();
    let deploy = k.run(&[
        "get",
        "deployment",
        "gen-deploy",
        "-n",
        "team-a",
        "-o",
        "jsonpath={.spec.replicas} {.spec.selector.matchLabels.app} \
         {.spec.template.spec.containers[0].image} {.spec.template.spec.containers[0].command} \
         {.spec.template.spec.containers[0].ports[0].containerPort}",
    ]);
    assert_eq!(deploy.ok(), r#"2 gen-deploy busybox ["sleep","3600"] 8080"#);
    let svc = k.run(&[
        "get",
        "service",
        "gen-svc",
        "-n",
        "team-a",
        "-o",
        "jsonpath={.spec.ports[0].port} {.spec.ports[0].targetPort} {.spec.type}",
    ]);
    assert_eq!(svc.ok(), "80 http ClusterIP");
    k.run(&[
        "create",
        "rolebinding",
        "gen-rb",
        "-n",
        "team-a",
        "--clusterrole=view",
        "--user=bob",
        "--serviceaccount=team-a:gen-sa",
    ])
    .ok();
    let rb = k.run(&[
        "get",
        "rolebinding",
        "gen-rb",
        "-n",
        "team-a",
        "-o",
        "jsonpath={.roleRef.kind}/{.roleRef.name} {.subjects[*].kind} {.subjects[*].name}",
    ]);
    assert_eq!(rb.ok(), "ClusterRole/view User ServiceAccount bob gen-sa");
    let cm = k.run(&[
        "get",
        "configmap",
        "gen-cm",
        "-n",
        "team-a",
        "-o",
        "jsonpath={.data.greeting}",
    ]);
    assert_eq!(cm.ok(), "héllo");
    let secret = k.run(&[
        "get",
        "secret",
        "gen-secret",
        "-n",
        "team-a",
        "-o",
        "jsonpath={.data.token}",
    ]);
    assert_eq!(secret.ok(), "czNjcjN0", "base64 of s3cr3t");
    assert!(
        k.run(&["get", "namespace", "gen-ns", "-o", "name"])
            .ok()
            .contains("namespace/gen-ns")
    );
    assert!(
        k.run(&[
            "get",
            "serviceaccount",
            "gen-sa",
            "-n",
            "team-a",
            "-o",
            "name"
        ])
        .ok()
        .contains("gen-sa")
    );

    // --dry-run=server: validated and answered, nothing stored.
    let dry = sup.file("dry.yaml", &service("dry", "web"));
    let out = k.run(&["apply", "--dry-run=server", "-f", &dry]);
    assert!(out.ok().contains("server dry run"), "{}", out.stdout);
    assert!(
        k.run(&["get", "svc", "dry", "-n", "team-a"])
            .err()
            .contains("NotFound")
    );
}

#[test]
fn kubectl_api_with_debian_kubectl() {
    suite(&common::kubectl_path());
}

#[test]
fn kubectl_api_with_current_kubectl() {
    suite(Path::new(CURRENT_KUBECTL));
}
