//! Service addresses with Debian's kubectl: a ClusterIP from `--service-cluster-ip-range`, node
//! ports from `--service-node-port-range`; an address taken, out of range or changed is
//! refused naming the field and nothing is stored; a full range says so; a deleted Service's
//! addresses can be taken again. Also the workload kinds' tables and `kubectl scale` on a
//! Deployment.

mod common;

use common::{Supervisor, TempDir};

fn svc(name: &str, type_: &str, extra: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}}}\nspec:\n  type: {type_}\n  selector: {{app: {name}}}\n  ports: [{{port: 80{extra}}}]\n"
    )
}

fn get(sup: &Supervisor, name: &str, path: &str) -> String {
    sup.kubectl(&["get", "svc", name, "-o", &format!("jsonpath={{{path}}}")])
        .ok()
        .to_string()
}

#[test]
fn service_addresses_are_allocated_unique_and_released() {
    let dir = TempDir::new("services");
    let sup = Supervisor::start(
        dir.path(),
        "redb",
        &[
            "--service-cluster-ip-range",
            "10.97.0.0/29",
            "--service-node-port-range",
            "30000-30001",
        ],
    );
    let apply = |yaml: &str| sup.kubectl_stdin(&["apply", "-f", "-"], Some(yaml));

    apply(&svc("a", "ClusterIP", "")).ok();
    let a_ip = get(&sup, "a", ".spec.clusterIP");
    assert!(a_ip.starts_with("10.97.0."), "{a_ip}");
    assert_eq!(get(&sup, "a", ".spec.clusterIPs[0]"), a_ip);

    // Taken, out of range: refused naming the field, nothing stored.
    let err = apply(
        &svc("b", "ClusterIP", "").replace("spec:\n", &format!("spec:\n  clusterIP: {a_ip}\n")),
    )
    .err()
    .to_string();
    assert!(
        err.contains("spec.clusterIP") && err.contains("provided IP is already allocated"),
        "{err}"
    );
    assert!(sup.kubectl(&["get", "svc", "b"]).err().contains("NotFound"));
    let err =
        apply(&svc("c", "ClusterIP", "").replace("spec:\n", "spec:\n  clusterIP: 10.1.2.3\n"))
            .err()
            .to_string();
    assert!(
        err.contains("spec.clusterIP") && err.contains("10.97.0.0/29"),
        "{err}"
    );
    let err = apply(&svc("d", "NodePort", ", nodePort: 30005"))
        .err()
        .to_string();
    assert!(
        err.contains("spec.ports[0].nodePort") && err.contains("30000-30001"),
        "{err}"
    );
    let err = apply(&svc("d", "ClusterIP", ", nodePort: 30000"))
        .err()
        .to_string();
    assert!(err.contains("spec.ports[0].nodePort"), "{err}");

    // Headless: no address taken.
    apply(&svc("headless", "ClusterIP", "").replace("spec:\n", "spec:\n  clusterIP: None\n")).ok();
    assert_eq!(get(&sup, "headless", ".spec.clusterIP"), "None");

    // Node ports: asked for, taken, allocated, full, released.
    apply(&svc("e", "NodePort", ", nodePort: 30000")).ok();
    assert_eq!(get(&sup, "e", ".spec.ports[0].nodePort"), "30000");
    let err = apply(&svc("f", "NodePort", ", nodePort: 30000"))
        .err()
        .to_string();
    assert!(
        err.contains("spec.ports[0].nodePort")
            && err.contains("provided port is already allocated"),
        "{err}"
    );
    apply(&svc("g", "NodePort", "")).ok();
    assert_eq!(get(&sup, "g", ".spec.ports[0].nodePort"), "30001");
    let err = apply(&svc("h", "NodePort", "")).err().to_string();
    assert!(err.contains("range 30000-30001 is full"), "{err}");
    sup.kubectl(&["delete", "svc", "e"]).ok();
    apply(&svc("h", "NodePort", "")).ok();
    assert_eq!(get(&sup, "h", ".spec.ports[0].nodePort"), "30000");

    // Applying the same manifest again keeps the addresses: unchanged.
    let out = apply(&svc("h", "NodePort", "")).ok().to_string();
    assert!(out.contains("unchanged"), "{out}");
    assert_eq!(get(&sup, "h", ".spec.ports[0].nodePort"), "30000");

    // A ClusterIP does not change; a deleted Service's can be asked for again. (The address
    // asked for differs from a's, which the allocator picked anywhere in the /29.)
    let other = if a_ip == "10.97.0.6" {
        "10.97.0.5"
    } else {
        "10.97.0.6"
    };
    let err = sup
        .kubectl(&[
            "patch",
            "svc",
            "a",
            "-p",
            &format!(r#"{{"spec":{{"clusterIP":"{other}"}}}}"#),
        ])
        .err()
        .to_string();
    assert!(
        err.contains("spec.clusterIP") && err.contains("immutable"),
        "{err}"
    );
    sup.kubectl(&["delete", "svc", "a"]).ok();
    apply(&svc("b", "ClusterIP", "").replace("spec:\n", &format!("spec:\n  clusterIP: {a_ip}\n")))
        .ok();
    assert_eq!(get(&sup, "b", ".spec.clusterIP"), a_ip);

    // 6 addresses in a /29: b, g, h hold 3; 3 more fit, then the range is full.
    for n in ["i", "j", "k"] {
        apply(&svc(n, "ClusterIP", "")).ok();
    }
    let err = apply(&svc("l", "ClusterIP", "")).err().to_string();
    assert!(err.contains("range 10.97.0.0/29 is full"), "{err}");
    let ips: std::collections::BTreeSet<String> = ["b", "g", "h", "i", "j", "k"]
        .iter()
        .map(|n| get(&sup, n, ".spec.clusterIP"))
        .collect();
    assert_eq!(ips.len(), 6, "every ClusterIP is distinct: {ips:?}");
}

/// kube-apiserver's health-check node port: a LoadBalancer with externalTrafficPolicy Local
/// gets one from the node-port range beside its node port; switched to Cluster it loses it and
/// the port is free again; a LoadBalancer that allocates no node ports (the supervisor's mirrors)
/// keeps the one it is given, outside the range, taking nothing; other types may not set it.
#[test]
fn health_check_node_ports_are_allocated_for_local_load_balancers() {
    let dir = TempDir::new("health-ports");
    let sup = Supervisor::start(
        dir.path(),
        "redb",
        &["--service-node-port-range", "30000-30002"],
    );
    let apply = |yaml: &str| sup.kubectl_stdin(&["apply", "-f", "-"], Some(yaml));
    let local = |name: &str| {
        svc(name, "LoadBalancer", "").replace("spec:\n", "spec:\n  externalTrafficPolicy: Local\n")
    };

    apply(&local("lb")).ok();
    let node_port = get(&sup, "lb", ".spec.ports[0].nodePort");
    let health = get(&sup, "lb", ".spec.healthCheckNodePort");
    assert!(health.starts_with("3000"), "{health}");
    assert_ne!(node_port, health, "distinct ports");
    // Two of three ports held: a second Local LoadBalancer does not fit.
    let err = apply(&local("lb2")).err().to_string();
    assert!(err.contains("range 30000-30002 is full"), "{err}");

    // Cluster: the health-check port goes and is free for others.
    sup.kubectl(&[
        "patch",
        "svc",
        "lb",
        "-p",
        r#"{"spec":{"externalTrafficPolicy":"Cluster"}}"#,
    ])
    .ok();
    assert_eq!(get(&sup, "lb", ".spec.healthCheckNodePort"), "");
    apply(&svc("np", "NodePort", "")).ok();
    apply(&svc("np2", "NodePort", "")).ok();

    // A mirror's port is kept as given, though outside the range and with the range full.
    apply(&local("mirror").replace(
        "spec:\n",
        "spec:\n  allocateLoadBalancerNodePorts: false\n  healthCheckNodePort: 31500\n",
    ))
    .ok();
    assert_eq!(get(&sup, "mirror", ".spec.healthCheckNodePort"), "31500");
    assert_eq!(get(&sup, "mirror", ".spec.ports[0].nodePort"), "");

    let err = apply(
        &svc("cip", "ClusterIP", "").replace("spec:\n", "spec:\n  healthCheckNodePort: 30000\n"),
    )
    .err()
    .to_string();
    assert!(err.contains("spec.healthCheckNodePort"), "{err}");
}

const DEPLOYMENT: &str = r#"
apiVersion: apps/v1
kind: Deployment
metadata: {name: web}
spec:
  replicas: 3
  selector: {matchLabels: {app: web}}
  template:
    metadata: {labels: {app: web}}
    spec:
      containers: [{name: web, image: busybox}]
"#;

#[test]
fn workload_kinds_validate_print_and_scale() {
    let dir = TempDir::new("workloads");
    let sup = Supervisor::start(dir.path(), "redb", &[]);
    sup.kubectl_stdin(&["apply", "-f", "-"], Some(DEPLOYMENT))
        .ok();
    let yaml = sup
        .kubectl(&["get", "deployment", "web", "-o", "yaml"])
        .ok()
        .to_string();
    for default in [
        "maxSurge: 25%",
        "maxUnavailable: 25%",
        "revisionHistoryLimit: 10",
        "restartPolicy: Always",
    ] {
        assert!(yaml.contains(default), "{default} missing from {yaml}");
    }
    let table = sup.kubectl(&["get", "deployments"]).ok().to_string();
    let header: Vec<&str> = table
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    assert_eq!(header, ["NAME", "READY", "UP-TO-DATE", "AVAILABLE", "AGE"]);
    assert!(table.contains("0/3"), "{table}");
    sup.kubectl(&["scale", "deployment/web", "--replicas=5"])
        .ok();
    assert_eq!(
        sup.kubectl(&[
            "get",
            "deployment",
            "web",
            "-o",
            "jsonpath={.spec.replicas}"
        ])
        .ok(),
        "5"
    );
    // Bad input: every bad field named, nothing stored.
    let bad = DEPLOYMENT
        .replace("name: web}", "name: bad}")
        .replace("replicas: 3", "replicas: -1")
        .replace("labels: {app: web}", "labels: {app: other}")
        .replace(
            "image: busybox}",
            "image: busybox, resources: {requests: {cpu: \"-1\"}}}",
        );
    let err = sup
        .kubectl_stdin(&["apply", "-f", "-"], Some(&bad))
        .err()
        .to_string();
    for field in [
        "spec.replicas",
        "spec.template.metadata.labels",
        "spec.template.spec.containers[0].resources.requests[cpu]",
    ] {
        assert!(err.contains(field), "{field} missing from {err}");
    }
    assert!(
        sup.kubectl(&["get", "deployment", "bad"])
            .err()
            .contains("NotFound")
    );
    let all = sup.kubectl(&["get", "all"]).ok().to_string();
    assert!(all.contains("deployment.apps/web"), "{all}");

    // pods/binding: a Pod is bound once; binding it again is a conflict.
    let pod = "apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec: {containers: [{name: c, image: busybox}]}\n";
    sup.kubectl_stdin(&["apply", "-f", "-"], Some(pod)).ok();
    let binding = |node: &str| {
        sup.file(
            &format!("binding-{node}.json"),
            &format!(
                r#"{{"apiVersion":"v1","kind":"Binding","metadata":{{"name":"p"}},"target":{{"kind":"Node","name":"{node}"}}}}"#
            ),
        )
    };
    let raw = "/api/v1/namespaces/default/pods/p/binding";
    sup.kubectl(&["create", "--raw", raw, "-f", &binding("n1")])
        .ok();
    assert_eq!(
        sup.kubectl(&["get", "pod", "p", "-o", "jsonpath={.spec.nodeName}"])
            .ok(),
        "n1"
    );
    let err = sup
        .kubectl(&["create", "--raw", raw, "-f", &binding("n2")])
        .err()
        .to_string();
    assert!(err.contains("already assigned to node"), "{err}");

    let cm =
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: conf}\ndata: {a.txt: x, b: \"z\"}\n";
    sup.kubectl_stdin(&["apply", "-f", "-"], Some(cm)).ok();
    let table = sup.kubectl(&["get", "cm", "conf"]).ok().to_string();
    assert!(
        table.contains("DATA") && table.lines().nth(1).is_some_and(|l| l.contains(" 2 ")),
        "{table}"
    );
    let err = sup
        .kubectl_stdin(
            &["apply", "-f", "-"],
            Some(&cm.replace("conf}", "bad}").replace("a.txt", "a/b")),
        )
        .err()
        .to_string();
    assert!(err.contains("data[a/b]"), "{err}");
}
