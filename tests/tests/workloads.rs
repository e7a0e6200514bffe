//! Workloads on a provisioned cluster: every host of a Cluster runs the node agent with its own
//! containerd (CNI installed by the agent, images preloaded from a directory), joins as a Node
//! of the workload cluster with its own block of the pod CIDR and a node identity, and runs the
//! Pods the workload cluster's scheduler binds to it. A Deployment applied with kubectl against
//! the cluster's kubeconfig becomes Pods Running on the workers, spread over the zones, each
//! with an address of its node's block handed out by Slipway's plugin, which containerd called.
//! Privileged (root, netns, cgroups, BPF, containerd): run by scripts/test.sh.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use common::{World, client_for, gvk, pod_log, wait_for};
use ipnetwork::Ipv4Network;
use k8s_openapi::api::core::v1::{Node, Pod, Secret, Service};
use kube::api::{Api, DynamicObject, ListParams};
use slipway_agent::pods::image::build_node_images;
use slipway_hosts::reconciler::netns_node_flags;

const WEB: &str = "apiVersion: apps/v1
kind: Deployment
metadata:
  name: web
  namespace: default
spec:
  replicas: 3
  selector:
    matchLabels: {app: web}
  template:
    metadata:
      labels: {app: web}
    spec:
      containers:
      - name: httpd
        image: busybox
        imagePullPolicy: Never
        # On SIGTERM it keeps serving 2 s (the time the endpoints take to drop it), then goes.
        command: [\"sh\", \"-c\", \"trap 'sleep 2; exit 0' TERM; httpd -f -p 8080 -h /etc & wait\"]
        readinessProbe:
          tcpSocket: {port: 8080}
          periodSeconds: 1
        resources:
          requests: {cpu: 100m, memory: 16Mi}
      terminationGracePeriodSeconds: 5
      # Moved 2 s after their node stops answering (the default is 300 s).
      tolerations:
      - {key: node.kubernetes.io/unreachable, operator: Exists, effect: NoExecute, tolerationSeconds: 2}
      - {key: node.kubernetes.io/not-ready, operator: Exists, effect: NoExecute, tolerationSeconds: 2}
";

const SERVICE: &str = "apiVersion: v1
kind: Service
metadata:
  name: web
  namespace: default
spec:
  type: NodePort
  selector: {app: web}
  ports:
  - port: 80
    targetPort: 8080
";

const POLICY: &str = "apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: web-from-client
  namespace: default
spec:
  podSelector:
    matchLabels: {app: web}
  policyTypes: [Ingress]
  ingress:
  - from:
    - podSelector:
        matchLabels: {app: client}
    ports:
    - port: 8080
";

/// A ConfigMap, a Secret and a pod on a worker that checks their keys in its volumes.
const VOLUMES: &str = r#"
apiVersion: v1
kind: ConfigMap
metadata: {name: greeting}
data: {message: hello-from-a-configmap}
---
apiVersion: v1
kind: Secret
metadata: {name: creds}
stringData: {password: not-on-disk}
---
apiVersion: v1
kind: Pod
metadata: {name: mounts}
spec:
  nodeName: team-w-w1-workers-0
  restartPolicy: Never
  volumes:
  - {name: greeting, configMap: {name: greeting}}
  - {name: creds, secret: {secretName: creds, defaultMode: 0400}}
  - {name: scratch, emptyDir: {}}
  containers:
  - name: sh
    image: busybox
    imagePullPolicy: Never
    command: [sh, -c]
    args:
    - >-
      test "$(cat /etc/greeting/message)" = hello-from-a-configmap &&
      test "$(cat /etc/creds/password)" = not-on-disk &&
      test "$(stat -L -c %a /etc/creds/password)" = 400 &&
      echo ok > /scratch/x && test "$(cat /scratch/x)" = ok
    volumeMounts:
    - {name: greeting, mountPath: /etc/greeting}
    - {name: creds, mountPath: /etc/creds}
    - {name: scratch, mountPath: /scratch}
"#;

/// A container that crashes (exit 3, restartPolicy Always), a pod whose readiness probe fails
/// 15 s after it starts, behind Service `gate`, and a pod whose image no node holds.
const LIFECYCLE: &str = r#"
apiVersion: v1
kind: Pod
metadata: {name: crasher}
spec:
  nodeName: team-w-w1-workers-1
  containers:
  - {name: sh, image: busybox, imagePullPolicy: Never, command: [sh, -c, "echo crashing; exit 3"]}
---
apiVersion: v1
kind: Pod
metadata: {name: gate, labels: {app: gate}}
spec:
  nodeName: team-w-w1-workers-1
  containers:
  - name: sh
    image: busybox
    imagePullPolicy: Never
    command: [sh, -c, "touch /tmp/ready; sleep 15; rm /tmp/ready; sleep 3600"]
    readinessProbe:
      exec: {command: [test, -f, /tmp/ready]}
      periodSeconds: 1
      failureThreshold: 1
---
apiVersion: v1
kind: Service
metadata: {name: gate}
spec:
  selector: {app: gate}
  ports: [{port: 80}]
---
apiVersion: v1
kind: Pod
metadata: {name: no-image}
spec:
  nodeName: team-w-w1-workers-1
  containers:
  - {name: c, image: not-on-any-node, imagePullPolicy: Never}
"#;

/// Runs `script` in a busybox pod `name` labelled `app=<app>` on `node` (restartPolicy Never)
/// and returns the phase it ends in: Succeeded when the script exits 0.
async fn probe(pods: &Api<Pod>, name: &str, node: &str, app: &str, script: &str) -> String {
    start_script(pods, name, node, app, script).await;
    finished(pods, name, Duration::from_secs(60)).await
}

/// Creates the busybox pod `name` of [`probe`] without waiting for it.
async fn start_script(pods: &Api<Pod>, name: &str, node: &str, app: &str, script: &str) {
    let pod: Pod = serde_json::from_value(serde_json::json!({
        "metadata": {"name": name, "labels": {"app": app}},
        "spec": {
            "nodeName": node,
            "restartPolicy": "Never",
            "containers": [{"name": "sh", "image": "busybox", "imagePullPolicy": "Never",
                            "command": ["sh", "-c", script]}],
        },
    }))
    .expect("script pod");
    pods.create(&Default::default(), &pod)
        .await
        .unwrap_or_else(|e| panic!("create pod {name}: {e}"));
}

/// The phase pod `name` ends in (Succeeded or Failed), awaited for up to `deadline`.
async fn finished(pods: &Api<Pod>, name: &str, deadline: Duration) -> String {
    wait_for(&format!("pod {name} to finish"), deadline, || async {
        let p = pods.get(name).await.ok()?;
        p.status?
            .phase
            .filter(|ph| ph == "Succeeded" || ph == "Failed")
    })
    .await
}

/// The addresses of web's ready endpoints.
async fn ready_endpoints(workload: &kube::Client) -> Option<BTreeSet<String>> {
    let slices: Api<k8s_openapi::api::discovery::v1::EndpointSlice> =
        Api::namespaced(workload.clone(), "default");
    Some(
        slices
            .list(&ListParams::default().labels("kubernetes.io/service-name=web"))
            .await
            .ok()?
            .items
            .iter()
            .flat_map(|s| s.endpoints.iter())
            .filter(|e| e.conditions.as_ref().and_then(|c| c.ready) != Some(false))
            .flat_map(|e| e.addresses.iter().cloned())
            .collect(),
    )
}

/// A Host's address on the underlay.
async fn hosts_address(client: &kube::Client, host: &str) -> String {
    let hosts: Api<DynamicObject> = Api::all_with(client.clone(), &gvk("Host", "hosts"));
    hosts.get(host).await.expect("Host").data["status"]["address"]
        .as_str()
        .expect("address")
        .to_owned()
}

/// The body of `GET path` from `addr` (HTTP/1.0, 5 s timeout).
fn http_get(addr: &str, path: &str) -> String {
    use std::io::{Read as _, Write as _};
    let addr: std::net::SocketAddr = addr.parse().expect("address");
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    write!(s, "GET {path} HTTP/1.0\r\n\r\n").expect("request");
    let mut text = String::new();
    s.read_to_string(&mut text).expect("response");
    text.split_once("\r\n\r\n")
        .map(|(_, body)| body.trim().to_owned())
        .unwrap_or_default()
}

/// The pods of `app` once `count` are Running with an address.
async fn running_pods(pods: &Api<Pod>, app: &str, count: usize) -> Option<Vec<Pod>> {
    let list = pods
        .list(&ListParams::default().labels(&format!("app={app}")))
        .await
        .ok()?
        .items;
    // A pod being deleted (evicted from a dead node) is no longer one of the app's.
    let running: Vec<Pod> = list
        .into_iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .filter(|p| {
            p.status.as_ref().is_some_and(|s| {
                s.phase.as_deref() == Some("Running") && s.pod_ip.as_ref().is_some()
            })
        })
        .collect();
    (running.len() == count).then_some(running)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "privileged: root + netns + cgroups + BPF + containerd; run with --ignored"]
async fn a_deployment_applied_to_a_provisioned_cluster_runs_on_its_workers_through_containerd() {
    let scratch = tempfile::Builder::new()
        .prefix("slipway-e2e-images-")
        .tempdir()
        .expect("dir");
    build_node_images(scratch.path()).expect("images");
    let world = World::with_agent_flags(netns_node_flags(scratch.path()));
    let client = world.client().await;
    let path = world.workload_cluster(&client, "").await;
    let workload = client_for(&path).await;

    // Every host a Node with its own block of the pod CIDR.
    let nodes: Api<Node> = Api::all(workload.clone());
    let blocks: BTreeMap<String, (Ipv4Network, String)> = nodes
        .list(&ListParams::default())
        .await
        .expect("nodes")
        .items
        .into_iter()
        .map(|n| {
            let name = n.metadata.name.clone().unwrap_or_default();
            let cidr = n
                .spec
                .as_ref()
                .and_then(|s| s.pod_cidr.clone())
                .unwrap_or_else(|| panic!("Node {name} has no spec.podCIDR"));
            let zone = n
                .metadata
                .labels
                .as_ref()
                .and_then(|l| l.get("topology.kubernetes.io/zone").cloned())
                .unwrap_or_default();
            (name, (cidr.parse::<Ipv4Network>().expect("podCIDR"), zone))
        })
        .collect();
    assert_eq!(blocks.len(), 3, "{blocks:?}");
    let distinct: BTreeSet<_> = blocks.values().map(|(b, _)| b.to_string()).collect();
    assert_eq!(distinct.len(), 3, "blocks overlap: {blocks:?}");

    // A Deployment applied with kubectl runs on the workers (the control plane is tainted),
    // over both zones, each pod with an address of its node's block.
    let started = Instant::now();
    world.apply_with(&path, WEB);
    let pods: Api<Pod> = Api::namespaced(workload.clone(), "default");
    let web = wait_for("3 web pods Running", Duration::from_secs(90), || {
        running_pods(&pods, "web", 3)
    })
    .await;
    eprintln!(
        "Deployment of 3: kubectl apply → 3 Running in {:?}",
        started.elapsed()
    );
    let mut zones = BTreeSet::new();
    for p in &web {
        let name = p.metadata.name.clone().unwrap_or_default();
        let node = p
            .spec
            .as_ref()
            .and_then(|s| s.node_name.clone())
            .unwrap_or_default();
        assert!(
            node.contains("-workers-"),
            "pod {name} runs on {node}, not a worker"
        );
        let (block, zone) = blocks.get(&node).expect("the pod's node");
        let ip: Ipv4Addr = p
            .status
            .as_ref()
            .and_then(|s| s.pod_ip.as_deref())
            .and_then(|ip| ip.parse().ok())
            .expect("pod IP");
        assert!(
            block.contains(ip),
            "pod {name} on {node} has {ip}, outside its block {block}"
        );
        zones.insert(zone.clone());
    }
    assert_eq!(zones.len(), 2, "the pods stay in one zone: {zones:?}");

    // The datapath is fed by the cluster API: a pod reaches the web pods on the other worker
    // by their addresses, and the Service by its ClusterIP, from either worker.
    world.apply_with(&path, SERVICE);
    let services: Api<Service> = Api::namespaced(workload.clone(), "default");
    let svc = services.get("web").await.expect("Service web");
    let spec = svc.spec.expect("spec");
    let cluster_ip = spec.cluster_ip.expect("clusterIP");
    let node_port = spec.ports.expect("ports")[0].node_port.expect("nodePort");
    let ips: Vec<String> = web
        .iter()
        .filter_map(|p| p.status.as_ref()?.pod_ip.clone())
        .collect();
    let fetch_all = format!(
        "for ip in {} {cluster_ip}:80 web web.default.svc.cluster.local; do timeout 2 wget -q -O - http://$ip/hostname || {{ echo \"$ip: failed\"; exit 1; }}; done",
        ips.iter()
            .map(|ip| format!("{ip}:8080"))
            .collect::<Vec<_>>()
            .join(" ")
    );
    wait_for(
        "3 ready endpoints of web",
        Duration::from_secs(30),
        || async { (ready_endpoints(&workload).await?.len() == 3).then_some(()) },
    )
    .await;
    let started = Instant::now();
    for worker in ["team-w-w1-workers-0", "team-w-w1-workers-1"] {
        let phase = probe(
            &pods,
            &format!("probe-{worker}"),
            worker,
            "probe",
            &fetch_all,
        )
        .await;
        assert_eq!(
            phase,
            "Succeeded",
            "a pod on {worker} fetching {ips:?} and {cluster_ip}: {}",
            pod_log(&world, worker, &format!("probe-{worker}"))
        );
    }
    eprintln!(
        "pods on both workers reached every web pod, the ClusterIP and the Service by name in {:?}",
        started.elapsed()
    );

    // Volumes: the node reads the ConfigMap and Secret its pod mounts from the cluster API
    // (with its node identity) and the containers see their keys as files, beside an emptyDir.
    world.apply_with(&path, VOLUMES);
    let phase = finished(&pods, "mounts", Duration::from_secs(60)).await;
    assert_eq!(
        phase,
        "Succeeded",
        "a pod reading its configMap, secret and emptyDir volumes: {}",
        pod_log(&world, "team-w-w1-workers-0", "mounts")
    );
    // What they fetched, through `kubectl logs` (the API server asks the node's kubelet
    // endpoint): the names of the web pods.
    let fetched = world.kubectl_with(&path, &["logs", "probe-team-w-w1-workers-1"]);
    for p in &web {
        let name = p.metadata.name.clone().unwrap_or_default();
        assert!(
            fetched.contains(&name),
            "kubectl logs shows no {name}:\n{fetched}"
        );
    }
    // Pod lifecycle as kubectl shows it: a crashing container is restarted with back-off
    // (restarts and exit code), a pod whose readiness probe starts failing leaves its
    // Service's EndpointSlice, and an image the node does not hold is a waiting reason.
    world.apply_with(&path, LIFECYCLE);
    let jsonpath = |pod: &str, expr: &str| {
        world.kubectl_with(
            &path,
            &["get", "pod", pod, "-o", &format!("jsonpath={expr}")],
        )
    };
    let started = Instant::now();
    let gate_ready = |ready: bool| {
        let workload = workload.clone();
        async move {
            let slices: Api<k8s_openapi::api::discovery::v1::EndpointSlice> =
                Api::namespaced(workload, "default");
            let list = slices
                .list(&ListParams::default().labels("kubernetes.io/service-name=gate"))
                .await
                .ok()?;
            let mut endpoints = list.items.iter().flat_map(|s| s.endpoints.iter());
            endpoints
                .any(|e| e.conditions.as_ref().and_then(|c| c.ready) == Some(ready))
                .then_some(())
        }
    };
    wait_for(
        "gate ready in its EndpointSlice",
        Duration::from_secs(60),
        || gate_ready(true),
    )
    .await;
    wait_for(
        "crasher restarted after exiting 3",
        Duration::from_secs(90),
        || async {
            let restarts: u32 = jsonpath("crasher", "{.status.containerStatuses[0].restartCount}")
                .trim()
                .parse()
                .ok()?;
            let code = jsonpath(
                "crasher",
                "{.status.containerStatuses[0].lastState.terminated.exitCode}",
            );
            (restarts >= 1 && code.trim() == "3").then_some(())
        },
    )
    .await;
    let crashed = world.kubectl_with(&path, &["logs", "crasher"]);
    assert!(
        crashed.contains("crashing"),
        "kubectl logs crasher: {crashed}"
    );
    wait_for(
        "missing image reported",
        Duration::from_secs(60),
        || async {
            (jsonpath(
                "no-image",
                "{.status.containerStatuses[0].state.waiting.reason}",
            )
            .trim()
                == "ErrImageNeverPull")
                .then_some(())
        },
    )
    .await;
    wait_for(
        "gate not ready once its probe fails",
        Duration::from_secs(90),
        || gate_ready(false),
    )
    .await;
    eprintln!(
        "crash back-off, ErrImageNeverPull and a failing readiness probe seen in {:?}",
        started.elapsed()
    );
    world.kubectl_with(
        &path,
        &[
            "delete",
            "pod",
            "crasher",
            "no-image",
            "gate",
            "--wait=false",
        ],
    );

    // The NodePort answers from outside the cluster (this machine, over the hosts' uplink).
    let worker = hosts_address(&client, "team-w-w1-workers-1").await;
    let answer = http_get(&format!("{worker}:{node_port}"), "/hostname");
    assert!(
        answer.starts_with("web-"),
        "NodePort {worker}:{node_port} answered {answer:?}"
    );

    // A NetworkPolicy applied with kubectl: only pods labelled app=client reach the web pods.
    let started = Instant::now();
    world.apply_with(&path, POLICY);
    let to_web = format!("timeout 2 wget -q -O - http://{cluster_ip}/hostname");
    let denied = probe(
        &pods,
        "intruder",
        "team-w-w1-workers-0",
        "intruder",
        &to_web,
    )
    .await;
    eprintln!(
        "NetworkPolicy: kubectl apply → an intruder refused in {:?}",
        started.elapsed()
    );
    assert_eq!(denied, "Failed", "the policy let an intruder in");
    let allowed = probe(&pods, "client", "team-w-w1-workers-0", "client", &to_web).await;
    assert_eq!(allowed, "Succeeded", "the policy kept the client out");
    // `slipway flows` on the nodes names the policy kubectl made.
    let mut flows = String::new();
    for worker in ["team-w-w1-workers-0", "team-w-w1-workers-1"] {
        let socket = world
            .dir
            .path()
            .join(format!("sup/hosts/data/{worker}/agent.sock"));
        let out = std::process::Command::new(common::slipway_binary())
            .args(["flows", "--namespace", "default", "--socket"])
            .arg(&socket)
            .output()
            .expect("slipway flows");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        flows.push_str(&String::from_utf8_lossy(&out.stdout));
    }
    assert!(flows.contains("web-from-client"), "slipway flows:\n{flows}");

    // A rolling update while a client loops over the Service: not one request fails.
    let roll = "i=0; fails=0; while [ $i -lt 250 ]; do \
        timeout 2 wget -q -O /dev/null http://web/hostname || { fails=$((fails+1)); echo \"request $i failed\"; }; \
        i=$((i+1)); sleep 0.1; done; echo \"$fails of $i failed\"; [ $fails -eq 0 ]";
    start_script(&pods, "roller", "team-w-w1-workers-0", "client", roll).await;
    wait_for("the roller running", Duration::from_secs(30), || async {
        let p = pods.get("roller").await.ok()?;
        (p.status?.phase.as_deref() == Some("Running")).then_some(())
    })
    .await;
    let started = Instant::now();
    world.kubectl_with(&path, &["set", "env", "deployment/web", "ROLL=1"]);
    world.kubectl_with(
        &path,
        &["rollout", "status", "deployment/web", "--timeout=90s"],
    );
    eprintln!(
        "rolling update of 3: kubectl set env → rollout complete in {:?}",
        started.elapsed()
    );
    let rolled = finished(&pods, "roller", Duration::from_secs(90)).await;
    let log = world.kubectl_with(&path, &["logs", "roller"]);
    assert_eq!(
        rolled, "Succeeded",
        "requests failed during the roll:\n{log}"
    );
    let web = wait_for("3 new web pods", Duration::from_secs(30), || {
        running_pods(&pods, "web", 3)
    })
    .await;

    // A worker dies (every process of the host killed): its pods are recreated on the other
    // worker or on the host that replaces it, and the Service keeps answering.
    let victim = "team-w-w1-workers-1";
    let survivor = "team-w-w1-workers-0";
    let before: BTreeSet<String> = web.iter().filter_map(|p| p.metadata.name.clone()).collect();
    let on_victim: BTreeSet<String> = web
        .iter()
        .filter(|p| p.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(victim))
        .filter_map(|p| p.metadata.name.clone())
        .collect();
    assert!(!on_victim.is_empty(), "no web pod on {victim}");
    let killed = Instant::now();
    let cgroups = slipway_dataplane::cgroup::Layout::detect().expect("cgroup layout");
    let group = world.provider().host_netns(victim);
    common::kill9(&cgroups.pids(&group));
    let deadline = Instant::now() + Duration::from_secs(90);
    let moved = loop {
        let now = running_pods(&pods, "web", 3).await.unwrap_or_default();
        let ready = now.iter().all(|p| {
            p.status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
        });
        let names: BTreeSet<String> = now.iter().filter_map(|p| p.metadata.name.clone()).collect();
        if now.len() == 3 && ready && names.is_disjoint(&on_victim) {
            break now;
        }
        assert!(
            Instant::now() < deadline,
            "web's pods not recreated 90 s after {victim} died:\n{}\n{}\nsupervisor log:\n{}",
            world.kubectl_with(&path, &["get", "pods", "-o", "wide", "--show-labels"]),
            world.kubectl_with(&path, &["get", "nodes", "-o", "yaml"]),
            world
                .log()
                .lines()
                .rev()
                .take(60)
                .collect::<Vec<_>>()
                .join("\n"),
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    eprintln!(
        "worker killed: its {} web pod(s) recreated and Ready in {:?}",
        on_victim.len(),
        killed.elapsed()
    );
    let kept: BTreeSet<String> = moved
        .iter()
        .filter_map(|p| p.metadata.name.clone())
        .collect();
    assert!(
        before.difference(&on_victim).all(|n| kept.contains(n)),
        "pods on the surviving worker were disturbed: {before:?} → {kept:?}"
    );
    wait_for(
        "web's endpoints to follow",
        Duration::from_secs(30),
        || async {
            let ready = ready_endpoints(&workload).await?;
            let want: BTreeSet<String> = moved
                .iter()
                .filter_map(|p| p.status.as_ref()?.pod_ip.clone())
                .collect();
            (ready == want).then_some(())
        },
    )
    .await;
    let after = probe(
        &pods,
        "after-the-kill",
        survivor,
        "client",
        &format!("for i in 1 2 3 4 5 6; do timeout 2 wget -q -O - http://{cluster_ip}/hostname || exit 1; done"),
    )
    .await;
    assert_eq!(
        after,
        "Succeeded",
        "the Service after the kill: {}",
        pod_log(&world, survivor, "after-the-kill")
    );

    // Each node speaks to its cluster as `system:node:<host>`: it reads Pods and writes its own
    // Node's status, never another's, and makes no workloads.
    let node_kubeconfig = world
        .dir
        .path()
        .join("sup/hosts/data/team-w-w1-workers-0/cluster.kubeconfig");
    let node_client = client_for(&node_kubeconfig).await;
    let as_node: Api<Pod> = Api::all(node_client.clone());
    assert!(
        as_node
            .list(&ListParams::default())
            .await
            .expect("a node lists Pods")
            .items
            .len()
            >= 3
    );
    let forbidden = |r: Result<(), kube::Error>, what: &str| match r {
        Err(kube::Error::Api(s)) => assert_eq!(s.code, 403, "{what}: {s:?}"),
        other => panic!("{what}: {other:?}"),
    };
    // Secrets one at a time, and only those its own Pods use (the `mounts` pod on workers-0
    // uses `creds`); another node, and a list, are refused.
    let secrets_as_node: Api<Secret> = Api::namespaced(node_client.clone(), "default");
    secrets_as_node
        .get("creds")
        .await
        .expect("workers-0 reads the Secret its pod mounts");
    forbidden(
        secrets_as_node.list(&ListParams::default()).await.map(drop),
        "a node listing Secrets",
    );
    let other_node = client_for(
        &world
            .dir
            .path()
            .join("sup/hosts/data/team-w-w1-workers-1/cluster.kubeconfig"),
    )
    .await;
    forbidden(
        Api::<Secret>::namespaced(other_node, "default")
            .get("creds")
            .await
            .map(drop),
        "a Secret no pod of workers-1 uses",
    );
    let status = kube::api::Patch::Merge(serde_json::json!({"status": {"phase": "Running"}}));
    let nodes_as_node: Api<Node> = Api::all(node_client.clone());
    forbidden(
        nodes_as_node
            .patch_status("team-w-w1-workers-1", &Default::default(), &status)
            .await
            .map(drop),
        "another Node's status",
    );
    let deployments: Api<k8s_openapi::api::apps::v1::Deployment> =
        Api::namespaced(node_client, "default");
    forbidden(
        deployments
            .create(
                &Default::default(),
                &serde_json::from_value(serde_json::json!({
                    "metadata": {"name": "sneaky"},
                    "spec": {"selector": {"matchLabels": {"a": "b"}},
                             "template": {"metadata": {"labels": {"a": "b"}},
                                          "spec": {"containers": [{"name": "c", "image": "busybox"}]}}},
                }))
                .expect("deployment"),
            )
            .await
            .map(drop),
        "a Deployment",
    );

    // The control plane host holds the cluster's link to its supervisor namespace
    // (`system:cluster:team-w:w1`, for the cloud provider and paravirtual volumes): it reaches
    // Services and claims in team-w and nothing else.
    let link = client_for(
        &world
            .dir
            .path()
            .join("sup/hosts/data/team-w-w1-control-plane-0/supervisor-link.kubeconfig"),
    )
    .await;
    Api::<Service>::namespaced(link.clone(), "team-w")
        .list(&ListParams::default())
        .await
        .expect("the link lists its namespace's Services");
    forbidden(
        Api::<Secret>::namespaced(link.clone(), "team-w")
            .list(&ListParams::default())
            .await
            .map(drop),
        "the link reading Secrets",
    );
    forbidden(
        Api::<Service>::namespaced(link, "default")
            .list(&ListParams::default())
            .await
            .map(drop),
        "the link in another namespace",
    );

    // Deleting the Cluster takes its hosts down with their pods: no namespace, cgroup, bpffs
    // entry or mount (containerd's sandboxes and rootfs) is left.
    world.delete_workload_cluster(&client).await;
    // Nothing else ran in this world: no namespace, cgroup or bpffs entry is left either.
    assert_eq!(world.leftovers(), Vec::<String>::new());
}
