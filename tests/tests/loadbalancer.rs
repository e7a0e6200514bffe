//! LoadBalancer VIPs served by edge hosts: a supervisor provisioning netns hosts, two edge
//! hosts (HostClass `edge`, `spec.pool: edge`) on one zone's segment running `slipway lb serve`
//! fed from the supervisor's API, two backend hosts in the other zone answering at the port a
//! node port would be, and a client host beside the edge hosts. A mirrored Service (as the
//! workload cluster's cloud provider writes it; its own test is in slipway-controllers) gets a
//! VIP from its Cluster's ingress pool; the client's requests through the VIP reach both
//! backends; killing the edge host that holds the VIP's Lease moves the Lease and the VIP to the
//! other (gratuitous ARP) and the gap is measured; deleting the Service empties both edge hosts'
//! maps and releases the Lease. The second test runs the whole chain on a provisioned cluster:
//! kubectl creates a LoadBalancer Service in the workload cluster, its cloud provider mirrors it,
//! the supervisor gives it a VIP that `kubectl get svc` shows, the client's requests reach the
//! pods through the edge hosts with direct server return (IP-in-IP to the nodes, no reply
//! through the edge host); with externalTrafficPolicy Local and one pod only the pod's node is
//! used and the pod sees the client's address; connections half open through the VIP's owner
//! finish through the other edge host when the owner dies; deleting it leaves nothing.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use common::{World, gvk, wait_for};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Event, Namespace, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, DeleteParams, DynamicObject, ListParams, PostParams};
use serde_json::{Value, json};

const NS: &str = "team-lb";

/// The tests of this file take turns: each builds a world of its own, and the failover gap is
/// a timing that a second world on the same cores would blur.
static ONE_WORLD: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
const POOL: &str = "10.124.100.0/27";
const VIP: &str = "10.124.100.1";
const NODE_PORT: u16 = 30080;

/// nginx processes in the backend hosts' namespaces, killed on drop.
struct Backends(Vec<Child>);

impl Drop for Backends {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn netns_of(world: &World, host: &str) -> String {
    format!("{}h-{host}", world.prefix)
}

/// Runs `argv` in `host`'s namespace; its stdout when it succeeds.
fn run_in(world: &World, host: &str, argv: &[&str]) -> Option<String> {
    let out = Command::new("ip")
        .args(["netns", "exec", &netns_of(world, host)])
        .args(argv)
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// nginx on `host` at the node port, answering "<its address>".
fn nginx(world: &World, host: &str) -> Child {
    let dir = world.dir.path().join(format!("nginx-{host}"));
    std::fs::create_dir_all(&dir).expect("nginx dir");
    let d = dir.display();
    let conf = dir.join("nginx.conf");
    std::fs::write(
        &conf,
        format!(
            "daemon off;\nmaster_process off;\nworker_processes 1;\npid {d}/nginx.pid;\n\
             error_log stderr crit;\nevents {{ worker_connections 1024; }}\n\
             http {{\n  access_log off;\n  client_body_temp_path {d}/body;\n\
             proxy_temp_path {d}/proxy;\n  fastcgi_temp_path {d}/fastcgi;\n\
             uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n\
             server {{\n    listen {NODE_PORT};\n\
             location / {{ return 200 \"$server_addr\\n\"; }}\n  }}\n}}\n"
        ),
    )
    .expect("nginx.conf");
    Command::new("ip")
        .args(["netns", "exec", &netns_of(world, host), "nginx", "-c"])
        .arg(&conf)
        .args(["-e", "stderr"])
        .spawn()
        .expect("nginx")
}

async fn create(client: &kube::Client, kind: &str, plural: &str, name: &str, spec: Value) {
    let api: Api<DynamicObject> = Api::all_with(client.clone(), &gvk(kind, plural));
    let mut o = DynamicObject::new(name, &gvk(kind, plural));
    o.data = json!({"spec": spec});
    api.create(&PostParams::default(), &o)
        .await
        .unwrap_or_else(|e| panic!("create {kind} {name}: {e}"));
}

/// How many keep-alive connections [`Streams`] holds open through the VIP.
const STREAMS: usize = 5;

/// Keep-alive HTTP connections from the client host through the VIP (a python3 process in its
/// namespace, killed on drop): each made one request; [`Streams::survivors`] makes a second.
struct Streams(Child);

const STREAMS_SCRIPT: &str = r#"
import socket, sys
vip, n = sys.argv[1], int(sys.argv[2])
req = b"GET / HTTP/1.1\r\nHost: vip\r\n\r\n"
socks = []
for _ in range(n):
    s = socket.create_connection((vip, 80), timeout=2)
    s.sendall(req)
    s.recv(4096)
    socks.append(s)
print("open", flush=True)
sys.stdin.readline()
ok = 0
for s in socks:
    try:
        s.settimeout(2)
        s.sendall(req)
        ok += b" 200 " in s.recv(4096)
    except OSError:
        pass
print(ok, flush=True)
"#;

impl Streams {
    fn open(world: &World) -> Self {
        use std::io::BufRead as _;
        let mut child = Command::new("ip")
            .args(["netns", "exec", &netns_of(world, "client"), "python3", "-c"])
            .arg(STREAMS_SCRIPT)
            .args([VIP, &STREAMS.to_string()])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("python3");
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.as_mut().expect("stdout"))
            .read_line(&mut line)
            .expect("streams open");
        assert_eq!(
            line.trim(),
            "open",
            "keep-alive connections through the VIP"
        );
        Self(child)
    }

    /// How many of the connections answer a second request now.
    fn survivors(&mut self) -> usize {
        use std::io::{BufRead as _, Write as _};
        writeln!(self.0.stdin.as_mut().expect("stdin")).expect("signal");
        let mut line = String::new();
        std::io::BufReader::new(self.0.stdout.as_mut().expect("stdout"))
            .read_line(&mut line)
            .expect("survivors");
        line.trim().parse().expect("a count")
    }
}

impl Drop for Streams {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn address(hosts: &Api<DynamicObject>, name: &str) -> Option<String> {
    let h = hosts.get(name).await.ok()?;
    let ready = h.data["status"]["conditions"]
        .as_array()?
        .iter()
        .any(|c| c["type"] == "Ready" && c["status"] == "True");
    let a = h.data["status"]["address"].as_str()?.to_owned();
    ready.then_some(a)
}

/// One request from the client host through the VIP: the backend's answer.
fn request(world: &World, timeout: &str) -> Option<String> {
    request_path(world, "/", timeout)
}

/// `GET path` from the client host through the VIP: the answer, or curl's complaint.
fn request_or_why(world: &World, path: &str) -> Result<String, String> {
    let out = Command::new("ip")
        .args(["netns", "exec", &netns_of(world, "client")])
        .args(["curl", "-sS", "--connect-timeout", "1", "--max-time", "2"])
        .arg(format!("http://{VIP}{path}"))
        .output()
        .map_err(|e| e.to_string())?;
    let body = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    if out.status.success() && !body.is_empty() {
        Ok(body)
    } else {
        Err(format!(
            "GET {path}: {} {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// `GET path` from the client host through the VIP: the answer.
fn request_path(world: &World, path: &str, timeout: &str) -> Option<String> {
    run_in(
        world,
        "client",
        &[
            "curl",
            "-s",
            "--connect-timeout",
            timeout,
            "--max-time",
            "1",
            &format!("http://{VIP}{path}"),
        ],
    )
    .map(|s| s.trim().to_owned())
    .filter(|s| !s.is_empty())
}

async fn holder(leases: &Api<Lease>) -> Option<String> {
    leases
        .get(&format!("vip-{}", VIP.replace('.', "-")))
        .await
        .ok()?
        .spec?
        .holder_identity
}

/// Kills edge host `owner`'s load balancer, or with `whole_host` every process of the host
/// (kill -9) and its link, and measures how long until a request
/// through the VIP is answered again: (the gap, requests that failed meanwhile, the new
/// holder of the VIP's Lease).
async fn fail_over(
    world: &World,
    leases: &Api<Lease>,
    owner: &str,
    whole_host: bool,
) -> (Duration, usize, String) {
    // The owner's LB process (restarted by its host's join after an earlier kill) may still be
    // starting while its Lease is held: wait until it runs.
    let started = Instant::now();
    let pids = loop {
        let out = Command::new("ip")
            .args(["netns", "pids", &netns_of(world, owner)])
            .output()
            .expect("pids");
        let pids: Vec<String> = String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .filter(|pid| {
                whole_host
                    || std::fs::read(format!("/proc/{pid}/cmdline"))
                        .is_ok_and(|c| String::from_utf8_lossy(&c).contains("lb\0serve"))
            })
            .map(str::to_owned)
            .collect();
        if !pids.is_empty() {
            break pids;
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "{owner} runs no load balancer"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let killed_at = Instant::now();
    for pid in &pids {
        let _ = Command::new("kill").args(["-9", pid]).status();
    }
    if whole_host {
        // A machine that dies takes its network with it: its datapath (pinned, it outlives
        // the processes) must not go on answering for the VIP.
        run_in(world, owner, &["ip", "link", "set", "eth0", "down"]).expect("link down");
    }
    let mut failed = 0;
    let gap = loop {
        if request(world, "0.1").is_some() {
            break killed_at.elapsed();
        }
        failed += 1;
        assert!(
            killed_at.elapsed() < Duration::from_secs(30),
            "no answer through the VIP 30 s after its owner died"
        );
    };
    // A host's join restarts its load balancer at once; restarted before another host took
    // the Lease, it renews it as the same holder: only a dead host must lose it.
    let new_owner = wait_for("the Lease's holder", Duration::from_secs(10), || async {
        holder(leases).await.filter(|h| !whole_host || h != owner)
    })
    .await;
    (gap, failed, new_owner)
}

/// Requests (each on a connection of its own) the client host sends through the VIP.
const REQUESTS: usize = 900;

/// `count` requests for `/hostname` from the client host through the VIP, one connection
/// each: the answers by pod.
fn requests_from_client(world: &World, count: usize) -> BTreeMap<String, usize> {
    const SCRIPT: &str = r#"
import collections, json, socket, sys
vip, n = sys.argv[1], int(sys.argv[2])
seen = collections.Counter()
for _ in range(n):
    try:
        s = socket.create_connection((vip, 80), timeout=2)
        s.sendall(b"GET /hostname HTTP/1.0\r\n\r\n")
        data = b""
        while True:
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
        s.close()
        seen[data.split(b"\r\n\r\n", 1)[-1].decode().strip()] += 1
    except OSError as e:
        seen["error: " + str(e)] += 1
print(json.dumps(seen))
"#;
    let out = run_in(
        world,
        "client",
        &["python3", "-c", SCRIPT, VIP, &count.to_string()],
    )
    .expect("the requests");
    serde_json::from_str(&out).expect("counts")
}

/// An edge host's LB daemon's status (its local API's `GET /v1/status`).
fn edge_status(world: &World, host: &str) -> Option<Value> {
    let socket = world
        .dir
        .path()
        .join(format!("sup/hosts/data/{host}/lb/lb.sock"));
    let out = Command::new(common::slipway_binary())
        .args(["lb", "status", "--json", "--socket"])
        .arg(&socket)
        .output()
        .ok()?;
    serde_json::from_slice(&out.stdout).ok()
}

/// The edge host that is not `owner`, once it serves the Service.
async fn other_serving(world: &World, owner: &str) -> &'static str {
    let other = if owner == "edge-a" {
        "edge-b"
    } else {
        "edge-a"
    };
    wait_for(
        &format!("{other} serving"),
        Duration::from_secs(30),
        || async { (served(world, other) == Some(1)).then_some(()) },
    )
    .await;
    other
}

/// The services an edge host's LB daemon serves.
fn served(world: &World, host: &str) -> Option<usize> {
    Some(edge_status(world, host)?["services"].as_array()?.len())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "privileged: root + netns + cgroups + BPF; run scripts/test.sh"]
async fn edge_hosts_serve_a_vip_to_real_backends_and_fail_over() {
    let _turn = ONE_WORLD.lock().await;
    let world = World::new();
    let client = world.client().await;
    world.seed(&client).await;
    create(
        &client,
        "HostClass",
        "hostclasses",
        "edge",
        json!({"cpus": 1, "memory": "512Mi"}),
    )
    .await;
    for (name, zone, pool) in [
        ("edge-a", "za", Some("edge")),
        ("edge-b", "za", Some("edge")),
        ("be-1", "zb", None),
        ("be-2", "zb", None),
        ("client", "za", None),
    ] {
        let class = if pool.is_some() { "edge" } else { "small" };
        let mut spec = json!({"zone": zone, "hostClass": class, "provider": "netns"});
        if let Some(p) = pool {
            spec["pool"] = json!(p);
        }
        create(&client, "Host", "hosts", name, spec).await;
    }
    let hosts: Api<DynamicObject> = Api::all_with(client.clone(), &gvk("Host", "hosts"));
    let mut backend_ips = BTreeSet::new();
    for name in ["edge-a", "edge-b", "be-1", "be-2", "client"] {
        let a = wait_for(&format!("{name} Ready"), Duration::from_secs(60), || {
            address(&hosts, name)
        })
        .await;
        if name.starts_with("be-") {
            backend_ips.insert(a);
        }
    }
    let _backends = Backends(vec![nginx(&world, "be-1"), nginx(&world, "be-2")]);
    run_in(
        &world,
        "client",
        &["ip", "route", "add", POOL, "dev", "eth0"],
    )
    .expect("route");

    // The cluster's namespace and its ingress pool.
    Api::<Namespace>::all(client.clone())
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": NS}})).expect("ns"),
        )
        .await
        .expect("namespace");
    Api::<DynamicObject>::namespaced_with(client.clone(), NS, &gvk("Cluster", "clusters"))
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({
                "apiVersion": "slipway.dev/v1alpha1", "kind": "Cluster",
                "metadata": {"name": "c1", "namespace": NS},
                "spec": {
                    "topology": {"controlPlane": {"replicas": 1, "hostClass": "small"}},
                    "settings": {"network": {
                        "pods": {"cidrBlocks": ["192.168.0.0/16"]},
                        "services": {"cidrBlocks": ["10.96.0.0/16"]},
                        "ingress": {"cidrBlocks": [POOL]},
                    }},
                },
            }))
            .expect("cluster"),
        )
        .await
        .expect("create cluster");

    // The mirror, as the cloud provider writes it: the node port as the target, the nodes as
    // an EndpointSlice.
    let services: Api<Service> = Api::namespaced(client.clone(), NS);
    let name = "c1-default-web";
    services
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({
                "metadata": {"name": name, "labels": {"slipway.dev/cluster": "c1"}},
                "spec": {"type": "LoadBalancer", "allocateLoadBalancerNodePorts": false,
                         "ports": [{"name": "http", "port": 80, "targetPort": NODE_PORT}]},
            }))
            .expect("service"),
        )
        .await
        .expect("create service");
    let endpoints: Vec<Value> = backend_ips
        .iter()
        .map(|ip| json!({"addresses": [ip], "conditions": {"ready": true}}))
        .collect();
    Api::<EndpointSlice>::namespaced(client.clone(), NS)
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({
                "metadata": {"name": name, "labels": {"kubernetes.io/service-name": name}},
                "addressType": "IPv4",
                "endpoints": endpoints,
                "ports": [{"name": "http", "port": NODE_PORT, "protocol": "TCP"}],
            }))
            .expect("slice"),
        )
        .await
        .expect("create slice");
    let vip = wait_for("the VIP in the status", Duration::from_secs(20), || async {
        services
            .get(name)
            .await
            .ok()?
            .status?
            .load_balancer?
            .ingress?
            .first()?
            .ip
            .clone()
    })
    .await;
    assert_eq!(vip, VIP, "the first address of the pool");

    let leases: Api<Lease> = Api::namespaced(client.clone(), "slipway-lb");
    let owner = wait_for("the VIP's Lease", Duration::from_secs(60), || {
        holder(&leases)
    })
    .await;
    assert!(owner.starts_with("edge-"), "held by an edge host: {owner}");
    let first = wait_for(
        "a first answer through the VIP",
        Duration::from_secs(30),
        || async { request(&world, "1") },
    )
    .await;
    assert!(backend_ips.contains(&first), "a backend answered: {first}");
    let mut seen = BTreeSet::new();
    for _ in 0..40 {
        let answer = request(&world, "1").expect("a request through the VIP");
        assert!(backend_ips.contains(&answer), "{answer}");
        seen.insert(answer);
    }
    assert_eq!(
        seen, backend_ips,
        "new connections spread over both backends"
    );

    // The owner's load balancer dies (kill -9) four times, each time on the host holding the
    // VIP, once the other is serving: the gap's spread. Its join restarts it.
    let mut gaps = Vec::new();
    let mut owner = owner;
    for _ in 0..4 {
        other_serving(&world, &owner).await;
        let (gap, _, next) = fail_over(&world, &leases, &owner, false).await;
        gaps.push(gap);
        owner = next;
    }
    other_serving(&world, &owner).await;

    // Connections open through the owner before it dies.
    let mut streams = Streams::open(&world);

    // The owner dies (every process of the host, kill -9): the other takes the Lease and the
    // VIP.
    let (gap, failed, new_owner) = fail_over(&world, &leases, &owner, true).await;
    gaps.push(gap);
    gaps.sort();
    eprintln!(
        "failover gap over {} owner deaths (4 of its LB process, then the whole host): p50 {:?}, max {:?}",
        gaps.len(),
        gaps[gaps.len() / 2],
        gaps[gaps.len() - 1]
    );
    eprintln!(
        "failover: {owner} killed; {new_owner} answers for {VIP} after {gap:?} ({failed} requests failed meanwhile)"
    );
    assert_ne!(new_owner, owner);
    // The new owner in the supervisor Service's status and Events.
    wait_for(
        "the new owner in the Service's status",
        Duration::from_secs(10),
        || async {
            let svc = services.get(name).await.ok()?;
            svc.status?
                .conditions?
                .into_iter()
                .any(|c| {
                    c.type_ == "VIPAnnounced"
                        && c.status == "True"
                        && c.message.contains(&new_owner)
                })
                .then_some(())
        },
    )
    .await;
    let changed = wait_for(
        "a VIPOwnerChanged Event",
        Duration::from_secs(10),
        || async {
            Api::<Event>::namespaced(client.clone(), NS)
                .list(&ListParams::default())
                .await
                .ok()?
                .items
                .into_iter()
                .find(|e| {
                    e.reason.as_deref() == Some("VIPOwnerChanged")
                        && e.message
                            .as_ref()
                            .is_some_and(|m| m.contains(&format!("was {owner}")))
                })
                .and_then(|e| e.message)
        },
    )
    .await;
    assert!(
        changed.contains(&new_owner) && changed.contains(&format!("was {owner}")),
        "{changed}"
    );
    let survived = streams.survivors();
    eprintln!(
        "established connections through the VIP that survived the failover: {survived}/{STREAMS} \
         (each edge host translates to its own address: the backend knows the old one's)"
    );

    // Delete: the edge host's maps are emptied and the Lease released.
    services
        .delete(name, &DeleteParams::default())
        .await
        .expect("delete");
    wait_for(
        "the edge host's maps emptied",
        Duration::from_secs(20),
        || async { (served(&world, &new_owner) == Some(0)).then_some(()) },
    )
    .await;
    wait_for("the Lease released", Duration::from_secs(10), || async {
        holder(&leases).await.is_none().then_some(())
    })
    .await;
    assert!(
        request(&world, "0.5").is_none(),
        "the VIP no longer answers"
    );
}

/// The edge hosts' class (the cluster is the harness's, with its ingress pool [`POOL`]).
const EDGE_CLASS: &str = "apiVersion: slipway.dev/v1alpha1
kind: HostClass
metadata:
  name: edge
spec:
  cpus: 1
  memory: 512Mi
";

/// busybox httpd serving its pod's name at `/hostname` and the address a request came from
/// at `/cgi-bin/addr`.
const WEB: &str = r#"apiVersion: apps/v1
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
        command:
        - sh
        - -c
        - |
          mkdir -p /w/cgi-bin && cp /etc/hostname /w/hostname
          printf '#!/bin/sh\necho Content-Type: text/plain\necho\necho $REMOTE_ADDR\n' > /w/cgi-bin/addr
          chmod +x /w/cgi-bin/addr
          exec httpd -f -p 8080 -h /w
        readinessProbe:
          tcpSocket: {port: 8080}
          periodSeconds: 1
        resources:
          requests: {cpu: 100m, memory: 16Mi}
"#;

const LB_SERVICE: &str = "apiVersion: v1
kind: Service
metadata:
  name: web
  namespace: default
spec:
  type: LoadBalancer
  selector: {app: web}
  ports:
  - port: 80
    targetPort: 8080
";

async fn ready_pods(pods: &Api<Pod>, count: usize) -> Option<BTreeSet<String>> {
    let names: BTreeSet<String> = pods
        .list(&ListParams::default().labels("app=web"))
        .await
        .ok()?
        .items
        .into_iter()
        .filter(|p| {
            p.status.as_ref().is_some_and(|s| {
                s.conditions
                    .iter()
                    .flatten()
                    .any(|c| c.type_ == "Ready" && c.status == "True")
            })
        })
        .filter_map(|p| p.metadata.name)
        .collect();
    (names.len() == count).then_some(names)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "privileged: root + netns + cgroups + BPF + containerd; run scripts/test.sh"]
async fn kubectl_creates_a_load_balancer_service_and_the_pods_answer_on_its_external_ip() {
    let _turn = ONE_WORLD.lock().await;
    let scratch = tempfile::Builder::new()
        .prefix("slipway-e2e-images-")
        .tempdir()
        .expect("dir");
    slipway_agent::pods::image::build_node_images(scratch.path()).expect("images");
    let world =
        World::with_agent_flags(slipway_hosts::reconciler::netns_node_flags(scratch.path()));
    let client = world.client().await;
    let path = world.workload_cluster(&client, "").await;
    world.apply(EDGE_CLASS);
    for (name, zone, class, pool) in [
        ("edge-a", "za", "edge", Some("edge")),
        ("edge-b", "za", "edge", Some("edge")),
        ("client", "za", "small", None),
    ] {
        let mut spec = json!({"zone": zone, "hostClass": class, "provider": "netns"});
        if let Some(p) = pool {
            spec["pool"] = json!(p);
        }
        create(&client, "Host", "hosts", name, spec).await;
    }
    let hosts: Api<DynamicObject> = Api::all_with(client.clone(), &gvk("Host", "hosts"));
    let mut client_ip = String::new();
    for name in ["edge-a", "edge-b", "client"] {
        client_ip = wait_for(&format!("{name} Ready"), Duration::from_secs(60), || {
            address(&hosts, name)
        })
        .await;
    }
    run_in(
        &world,
        "client",
        &["ip", "route", "add", POOL, "dev", "eth0"],
    )
    .expect("route");
    let workload = common::client_for(&path).await;
    world.apply_with(&path, WEB);
    let pods: Api<Pod> = Api::namespaced(workload.clone(), "default");
    let names = wait_for("3 web pods Ready", Duration::from_secs(120), || {
        ready_pods(&pods, 3)
    })
    .await;

    // kubectl creates the Service; the VIP comes back from the supervisor.
    let started = Instant::now();
    world.apply_with(&path, LB_SERVICE);
    let services: Api<Service> = Api::namespaced(workload.clone(), "default");
    let vip = wait_for("EXTERNAL-IP", Duration::from_secs(30), || async {
        services
            .get("web")
            .await
            .ok()?
            .status?
            .load_balancer?
            .ingress?
            .first()?
            .ip
            .clone()
    })
    .await;
    let allocated = started.elapsed();
    assert_eq!(
        vip, VIP,
        "the first address of the namespace's ingress pool"
    );
    let shown = world.kubectl_with(&path, &["get", "svc", "web"]);
    assert!(shown.contains(VIP), "kubectl get svc shows it: {shown}");

    // Requests from the client host reach every pod through the VIP.
    let first = wait_for(
        "an answer through the VIP",
        Duration::from_secs(30),
        || async { request_path(&world, "/hostname", "1") },
    )
    .await;
    let served_at = started.elapsed();
    assert!(names.contains(&first), "a web pod answered: {first}");
    let spread = requests_from_client(&world, REQUESTS);
    let answered: usize = spread.values().sum();
    assert_eq!(answered, REQUESTS, "every request answered: {spread:?}");
    assert_eq!(
        spread.keys().cloned().collect::<BTreeSet<_>>(),
        names,
        "the answers come from every web pod"
    );
    assert!(
        spread.values().all(|n| *n >= REQUESTS / 3 / 2),
        "spread over the pods: {spread:?}"
    );
    eprintln!(
        "kubectl apply of a LoadBalancer Service: EXTERNAL-IP {vip} after {allocated:?}, \
         first answer through it after {served_at:?}; {REQUESTS} requests, one connection each, \
         over the pods: {spread:?}"
    );

    // Source ranges: a client outside them is refused, inside them served.
    let ranges = |r: &str| format!(r#"{{"spec":{{"loadBalancerSourceRanges":[{r}]}}}}"#);
    world.kubectl_with(
        &path,
        &["patch", "svc", "web", "-p", &ranges("\"10.200.0.0/16\"")],
    );
    wait_for("the client refused", Duration::from_secs(20), || async {
        request_path(&world, "/hostname", "0.3")
            .is_none()
            .then_some(())
    })
    .await;
    world.kubectl_with(
        &path,
        &[
            "patch",
            "svc",
            "web",
            "-p",
            &ranges(&format!("\"{client_ip}/32\"")),
        ],
    );
    wait_for(
        "the client served again",
        Duration::from_secs(20),
        || async { request_path(&world, "/hostname", "0.5") },
    )
    .await;

    // Direct server return (the cloud provider's default): the VIP's owner sent the requests
    // to the nodes inside IP-in-IP and no reply came back through it.
    let leases: Api<Lease> = Api::namespaced(client.clone(), "slipway-lb");
    let owner = wait_for("the VIP's Lease", Duration::from_secs(10), || {
        holder(&leases)
    })
    .await;
    let status = edge_status(&world, &owner).expect("the owner's status");
    assert_eq!(
        status["services"][0]["directServerReturn"], true,
        "{status}"
    );
    let verdicts = &status["verdicts"];
    assert!(verdicts["encap"].as_u64() > Some(60), "{verdicts}");
    assert_eq!(
        verdicts.get("reply").and_then(Value::as_u64).unwrap_or(0),
        0,
        "{verdicts}"
    );

    // externalTrafficPolicy Local with one pod: the edge hosts check each node's health-check
    // node port and send only to the node with the pod, which sees the client's address.
    world.kubectl_with(
        &path,
        &[
            "patch",
            "svc",
            "web",
            "-p",
            r#"{"spec":{"externalTrafficPolicy":"Local"}}"#,
        ],
    );
    world.kubectl_with(&path, &["scale", "deployment", "web", "--replicas=1"]);
    let pod = wait_for("1 web pod", Duration::from_secs(60), || async {
        let names = ready_pods(&pods, 1).await?;
        let all = pods
            .list(&ListParams::default().labels("app=web"))
            .await
            .ok()?;
        (all.items.len() == 1).then(|| names.into_iter().next())?
    })
    .await;
    for edge in ["edge-a", "edge-b"] {
        wait_for(
            &format!("{edge}: one node healthy (the pod's), the others not"),
            Duration::from_secs(30),
            || async {
                let status = edge_status(&world, edge)?;
                let states: Vec<&str> = status["services"][0]["backends"]
                    .as_array()?
                    .iter()
                    .filter_map(|b| b["state"].as_str())
                    .collect();
                let count = |s: &str| states.iter().filter(|x| **x == s).count();
                (count("active") == 1 && count("unhealthy") == states.len() - 1).then_some(())
            },
        )
        .await;
    }
    for _ in 0..20 {
        let answer = request_or_why(&world, "/hostname").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(answer, pod, "only the node with the pod serves");
        let seen = request_or_why(&world, "/cgi-bin/addr").unwrap_or_else(|e| panic!("{e}"));
        let seen = seen.trim_matches(['[', ']']).trim_start_matches("::ffff:");
        assert_eq!(seen, client_ip, "the pod sees the client's address");
    }

    // The owner dies (every process of the host, kill -9) with requests half sent through it:
    // the other edge host sends their ends to the same node (the same Maglev table), which
    // finishes them.
    let other = other_serving(&world, &owner).await;
    let client_ns = slipway_dataplane::world::Netns::named(netns_of(&world, "client"));
    let vip_ip = VIP.parse().expect("the VIP");
    let half = slipway_lb::world::HalfRequests::open(&client_ns, vip_ip, "/hostname", STREAMS)
        .expect("requests half sent through the VIP");
    let (gap, failed, new_owner) = fail_over(&world, &leases, &owner, true).await;
    let survived = half.finish().expect("the requests' ends");
    eprintln!(
        "direct server return, eTP Local: {owner} killed; {new_owner} answers after {gap:?} \
         ({failed} requests failed meanwhile); {survived}/{STREAMS} connections opened through \
         {owner} finished through {new_owner}"
    );
    assert_eq!(new_owner, other);
    assert_eq!(
        survived, STREAMS,
        "established connections survive the failover"
    );

    // Delete: the mirror, the VIP, the edge hosts' services and the Lease go.
    world.kubectl_with(&path, &["delete", "svc", "web"]);
    let mirrors: Api<Service> = Api::namespaced(client.clone(), "team-w");
    wait_for("the mirror gone", Duration::from_secs(20), || async {
        let left = mirrors
            .list(&ListParams::default().labels("slipway.dev/cluster=w1"))
            .await
            .ok()?;
        left.items.is_empty().then_some(())
    })
    .await;
    for edge in [new_owner.as_str()] {
        wait_for(
            &format!("{edge}'s maps emptied"),
            Duration::from_secs(20),
            || async { (served(&world, edge) == Some(0)).then_some(()) },
        )
        .await;
    }
    wait_for("the Lease released", Duration::from_secs(10), || async {
        holder(&leases).await.is_none().then_some(())
    })
    .await;
    assert!(
        request_path(&world, "/hostname", "0.5").is_none(),
        "the VIP no longer answers"
    );
}
