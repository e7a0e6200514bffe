//! The controllers against a real Slipway API server (started in-process, its own redb store in
//! a temporary directory) driven with Debian's kubectl: a Deployment spread over two zones,
//! `kubectl scale`, a rolling update watched for availability, an unschedulable Pod, the
//! EndpointSlice following readiness and a NotReady Node's Pods recreated elsewhere.
//!
//! The test plays the kubelet (the seam until the host agent runs Pods): it marks each bound
//! Pod Running and Ready with a Pod IP, unless the test holds that Pod not ready.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail, ensure};
use futures_util::{StreamExt, TryStreamExt};
use k8s_openapi::api::apps::v1::ReplicaSet;
use k8s_openapi::api::core::v1::{Node, Pod};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::watcher;
use kube::{Client, ResourceExt};
use serde_json::json;
use slipway_controllers::Options;

/// Debian's kubectl 1.20 (override with SLIPWAY_KUBECTL).
fn kubectl_path() -> PathBuf {
    std::env::var_os("SLIPWAY_KUBECTL")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/opt/slipway/kubernetes-client/usr/bin/kubectl"))
}

/// A workload cluster's API server and its controllers, on a temporary directory removed on
/// drop (the tasks end with the test's runtime).
struct Cluster {
    dir: tempfile::TempDir,
    client: Client,
    /// Pods the fake kubelet keeps not ready.
    held: Arc<Mutex<BTreeSet<String>>>,
    /// Nodes whose fake kubelet is down.
    down: Arc<Mutex<BTreeSet<String>>>,
    /// When the fake kubelet last took a Node's heartbeat time (before stamping it).
    beats: Arc<Mutex<BTreeMap<String, Instant>>>,
    /// The controllers' counters.
    metrics: Arc<slipway_controllers::Metrics>,
}

impl Cluster {
    /// Starts the server and the controllers; a Node without a heartbeat for `grace` (if set)
    /// goes Unknown.
    async fn start(grace: Option<Duration>) -> Result<Self> {
        let dir = tempfile::Builder::new().prefix("slipway-ctrl-").tempdir()?;
        let (client, _, _) = common::api_server(dir.path()).await?;
        let metrics = Arc::new(slipway_controllers::Metrics::default());
        tokio::spawn(slipway_controllers::run(
            client.clone(),
            Options {
                default_toleration_seconds: 2,
                node_monitor_grace_period: grace,
                node_monitor_period: Duration::from_millis(500),
                unschedulable_retry: Duration::from_millis(500),
                metrics: metrics.clone(),
                ..Options::default()
            },
        ));
        let cluster = Self {
            dir,
            client,
            held: Arc::default(),
            down: Arc::default(),
            beats: Arc::default(),
            metrics,
        };
        tokio::spawn(kubelet(
            cluster.client.clone(),
            cluster.held.clone(),
            cluster.down.clone(),
            cluster.beats.clone(),
        ));
        Ok(cluster)
    }

    fn kubeconfig(&self) -> PathBuf {
        self.dir.path().join("admin.kubeconfig")
    }

    /// Runs kubectl; returns stdout, or fails with its stderr.
    fn kubectl(&self, args: &[&str]) -> Result<String> {
        kubectl_in(self.dir.path(), &self.kubeconfig(), args, None)
    }

    fn kubectl_apply(&self, yaml: &str) -> Result<String> {
        kubectl_in(
            self.dir.path(),
            &self.kubeconfig(),
            &["apply", "-f", "-"],
            Some(yaml),
        )
    }

    async fn add_node(&self, name: &str, zone: &str) -> Result<()> {
        let nodes = Api::<Node>::all(self.client.clone());
        let node: Node = serde_json::from_value(json!({
            "metadata": {"name": name, "labels": {
                "topology.kubernetes.io/zone": zone, "kubernetes.io/hostname": name}},
            "spec": {},
        }))?;
        nodes.create(&PostParams::default(), &node).await?;
        set_node_ready(&self.client, name, "True").await
    }

    /// The active Pods of the `app=web` Deployment.
    async fn web_pods(&self) -> Result<Vec<Pod>> {
        let pods = Api::<Pod>::namespaced(self.client.clone(), "default")
            .list(&ListParams::default().labels("app=web"))
            .await?;
        Ok(pods
            .items
            .into_iter()
            .filter(|p| p.metadata.deletion_timestamp.is_none())
            .collect())
    }
}

fn kubectl_in(dir: &Path, kubeconfig: &Path, args: &[&str], stdin: Option<&str>) -> Result<String> {
    use std::io::Write as _;
    let mut child = Command::new(kubectl_path())
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .arg("--cache-dir")
        .arg(dir.join("kubectl-cache"))
        .arg("--request-timeout=20s")
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .with_context(|| format!("running {}", kubectl_path().display()))?;
    if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(text.as_bytes())?;
    }
    drop(child.stdin.take());
    let out = child.wait_with_output()?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    eprintln!("$ kubectl {}\n{stdout}{stderr}", args.join(" "));
    ensure!(
        out.status.success(),
        "kubectl {} failed: {stderr}",
        args.join(" ")
    );
    Ok(stdout)
}

async fn set_node_ready(client: &Client, name: &str, status: &str) -> Result<()> {
    let now = k8s_openapi::jiff::Timestamp::now().to_string();
    Api::<Node>::all(client.clone())
        .patch_status(
            name,
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {
                "allocatable": {"cpu": "2", "memory": "4Gi", "pods": "110"},
                "capacity": {"cpu": "2", "memory": "4Gi", "pods": "110"},
                "conditions": [{"type": "Ready", "status": status, "reason": "KubeletReady",
                    "lastHeartbeatTime": now, "lastTransitionTime": now}],
            }})),
        )
        .await?;
    Ok(())
}

/// The fake kubelet: Nodes whose kubelet is up heartbeat (Ready=True, a fresh
/// lastHeartbeatTime), and every bound Pod on them gets phase Running, an IP and Ready (False
/// while held).
async fn kubelet(
    client: Client,
    held: Arc<Mutex<BTreeSet<String>>>,
    down: Arc<Mutex<BTreeSet<String>>>,
    beats: Arc<Mutex<BTreeMap<String, Instant>>>,
) {
    let mut ips: BTreeMap<String, String> = BTreeMap::new();
    let mut beat = Instant::now();
    loop {
        // Heartbeats of the Nodes whose kubelet is up, every 500 ms.
        if beat.elapsed() > Duration::from_millis(500) {
            beat = Instant::now();
            if let Ok(nodes) = Api::<Node>::all(client.clone())
                .list(&ListParams::default())
                .await
            {
                for n in nodes.items {
                    let name = n.name_any();
                    let up = down.lock().map(|d| !d.contains(&name)).unwrap_or(false);
                    if up {
                        if let Ok(mut b) = beats.lock() {
                            b.insert(name.clone(), Instant::now());
                        }
                        let _ = set_node_ready(&client, &name, "True").await;
                    }
                }
            }
        }
        if let Ok(list) = Api::<Pod>::all(client.clone())
            .list(&ListParams::default())
            .await
        {
            for pod in list.items {
                let Some(node) = pod.spec.as_ref().and_then(|s| s.node_name.clone()) else {
                    continue;
                };
                if down.lock().map(|d| d.contains(&node)).unwrap_or(true) {
                    continue;
                }
                let name = pod.name_any();
                let ready = !held.lock().map(|h| h.contains(&name)).unwrap_or(true);
                let n = ips.len();
                let ip = ips
                    .entry(pod.uid().unwrap_or_default())
                    .or_insert_with(|| format!("10.244.{}.{}", n / 250, n % 250 + 2))
                    .clone();
                let is = pod.status.as_ref().is_some_and(|s| {
                    s.pod_ip.as_deref() == Some(ip.as_str())
                        && s.conditions.iter().flatten().any(|c| {
                            c.type_ == "Ready" && c.status == if ready { "True" } else { "False" }
                        })
                });
                if is {
                    continue;
                }
                let status = if ready { "True" } else { "False" };
                let patch = json!({"status": {
                    "phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}], "hostIP": "192.0.2.1",
                    "conditions": [
                        {"type": "PodScheduled", "status": "True"},
                        {"type": "Ready", "status": status},
                        {"type": "ContainersReady", "status": status},
                    ],
                    "containerStatuses": [{"name": "web", "image": "busybox", "imageID": "",
                        "ready": ready, "restartCount": 0, "started": true,
                        "state": {"running": {}}}],
                }});
                let api =
                    Api::<Pod>::namespaced(client.clone(), &pod.namespace().unwrap_or_default());
                let _ = api
                    .patch_status(&name, &PatchParams::default(), &Patch::Merge(patch))
                    .await;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Polls `f` until it returns `Some`, failing after `timeout` with what it last saw.
async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut f: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Option<T>>>,
{
    let start = Instant::now();
    let mut last = String::new();
    loop {
        match f().await {
            Ok(Some(v)) => return Ok(v),
            Ok(None) => {}
            Err(e) => last = format!("{e:#}"),
        }
        if start.elapsed() > timeout {
            bail!("timed out after {timeout:?} waiting for {what} {last}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn ready(p: &Pod) -> bool {
    p.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

fn node_of(p: &Pod) -> String {
    p.spec
        .as_ref()
        .and_then(|s| s.node_name.clone())
        .unwrap_or_default()
}

const WEB: &str = r#"
apiVersion: apps/v1
kind: Deployment
metadata:
  name: web
spec:
  replicas: 3
  selector:
    matchLabels: {app: web}
  strategy:
    type: RollingUpdate
    rollingUpdate: {maxSurge: 1, maxUnavailable: 1}
  template:
    metadata:
      labels: {app: web}
    spec:
      containers:
      - name: web
        image: busybox
        command: ["httpd", "-f", "-p", "80"]
        ports: [{containerPort: 80, name: http}]
        resources:
          requests: {cpu: 100m, memory: 64Mi}
---
apiVersion: v1
kind: Service
metadata:
  name: web
spec:
  type: NodePort
  selector: {app: web}
  ports: [{port: 80, targetPort: http}]
"#;

const BIG: &str = r#"
apiVersion: v1
kind: Pod
metadata:
  name: big
spec:
  containers:
  - name: big
    image: busybox
    resources:
      requests: {cpu: "64"}
"#;

/// Waits until the Deployment has `n` Pods, all Ready, checked with `kubectl rollout status`.
async fn rolled_out(c: &Cluster, n: usize) -> Result<Vec<Pod>> {
    c.kubectl(&["rollout", "status", "deployment/web", "--timeout=60s"])?;
    wait_for(
        &format!("{n} ready web pods"),
        Duration::from_secs(30),
        || async {
            let pods = c.web_pods().await?;
            Ok((pods.len() == n && pods.iter().all(ready)).then_some(pods))
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn deployments_scale_roll_and_survive_a_node() -> Result<()> {
    let c = Cluster::start(None).await?;
    c.add_node("node-a", "zone-a").await?;
    c.add_node("node-b", "zone-b").await?;
    c.kubectl_apply(WEB)?;

    // A Deployment of 3 spreads over both zones.
    let pods = rolled_out(&c, 3).await?;
    let per_node: BTreeMap<String, usize> = pods.iter().fold(BTreeMap::new(), |mut m, p| {
        *m.entry(node_of(p)).or_default() += 1;
        m
    });
    assert_eq!(
        per_node.len(),
        2,
        "3 pods spread over both nodes: {per_node:?}"
    );
    let table = c.kubectl(&["get", "deployment", "web"])?;
    assert!(
        table.contains("READY") && table.contains("UP-TO-DATE") && table.contains("AVAILABLE"),
        "{table}"
    );
    assert!(
        table.lines().nth(1).is_some_and(|l| l.contains("3/3")),
        "{table}"
    );

    // The Service got a ClusterIP and a node port; its slice lists the 3 ready Pods.
    let svc = c.kubectl(&[
        "get",
        "svc",
        "web",
        "-o",
        "jsonpath={.spec.clusterIP} {.spec.ports[0].nodePort}",
    ])?;
    let (ip, port) = svc.split_once(' ').context("clusterIP and nodePort")?;
    assert!(ip.starts_with("10."), "{svc}");
    let port: u16 = port.parse()?;
    assert!((30000..=32767).contains(&port), "{svc}");
    let slices = Api::<EndpointSlice>::namespaced(c.client.clone(), "default");
    let by_service = ListParams::default().labels("kubernetes.io/service-name=web");
    let ready_endpoints = |s: &[EndpointSlice]| -> usize {
        s.iter()
            .flat_map(|s| &s.endpoints)
            .filter(|e| e.conditions.as_ref().and_then(|c| c.ready) == Some(true))
            .count()
    };
    wait_for("3 ready endpoints", Duration::from_secs(20), || async {
        let s = slices.list(&by_service).await?.items;
        Ok((ready_endpoints(&s) == 3).then_some(()))
    })
    .await?;
    let slice = &slices.list(&by_service).await?.items[0];
    assert_eq!(
        slice
            .labels()
            .get("endpointslice.kubernetes.io/managed-by")
            .map(String::as_str),
        Some("endpointslice-controller.slipway.dev")
    );
    assert_eq!(slice.ports.as_ref().and_then(|p| p[0].port), Some(80));
    assert!(
        slice
            .endpoints
            .iter()
            .all(|e| e.zone.as_deref().is_some_and(|z| z.starts_with("zone-")))
    );

    // kubectl scale 3 -> 5 -> 2.
    c.kubectl(&["scale", "deployment/web", "--replicas=5"])?;
    rolled_out(&c, 5).await?;
    c.kubectl(&["scale", "deployment/web", "--replicas=2"])?;
    rolled_out(&c, 2).await?;

    // Readiness drives the slice: a Pod held not ready is listed not ready, then ready again.
    let pods = c.web_pods().await?;
    let held = pods[0].name_any();
    c.held
        .lock()
        .map_err(|_| anyhow::anyhow!("poisoned"))?
        .insert(held.clone());
    wait_for(
        "the held pod's endpoint not ready",
        Duration::from_secs(20),
        || async {
            let s = slices.list(&by_service).await?.items;
            let not_ready = s.iter().flat_map(|s| &s.endpoints).any(|e| {
                e.target_ref.as_ref().and_then(|t| t.name.as_deref()) == Some(held.as_str())
                    && e.conditions.as_ref().and_then(|c| c.ready) == Some(false)
            });
            Ok((not_ready && ready_endpoints(&s) == 1).then_some(()))
        },
    )
    .await?;
    c.held
        .lock()
        .map_err(|_| anyhow::anyhow!("poisoned"))?
        .clear();
    wait_for(
        "2 ready endpoints again",
        Duration::from_secs(20),
        || async {
            Ok((ready_endpoints(&slices.list(&by_service).await?.items) == 2).then_some(()))
        },
    )
    .await?;

    // A rolling update of 4 replicas (maxSurge 1, maxUnavailable 1) never has fewer than 3
    // ready Pods, watched event by event.
    c.kubectl(&["scale", "deployment/web", "--replicas=4"])?;
    rolled_out(&c, 4).await?;
    let min_ready = Arc::new(Mutex::new(usize::MAX));
    let watching = {
        let min_ready = min_ready.clone();
        let api = Api::<Pod>::namespaced(c.client.clone(), "default");
        tokio::spawn(async move {
            let mut live: BTreeMap<String, bool> = BTreeMap::new();
            let mut events = watcher(api, watcher::Config::default().labels("app=web")).boxed();
            // Counted from the end of the initial list on.
            let mut listed = false;
            while let Ok(Some(e)) = events.try_next().await {
                match e {
                    watcher::Event::InitDone => listed = true,
                    watcher::Event::Apply(p) | watcher::Event::InitApply(p) => {
                        live.insert(
                            p.name_any(),
                            ready(&p) && p.metadata.deletion_timestamp.is_none(),
                        );
                    }
                    watcher::Event::Delete(p) => {
                        live.remove(&p.name_any());
                    }
                    _ => {}
                }
                let n = live.values().filter(|r| **r).count();
                if !listed {
                    continue;
                }
                if let Ok(mut m) = min_ready.lock() {
                    *m = (*m).min(n);
                }
            }
        })
    };
    // The watch has seen the 4 ready Pods before the roll starts.
    wait_for(
        "the watch to see 4 ready pods",
        Duration::from_secs(10),
        || async {
            Ok(min_ready
                .lock()
                .map(|m| *m == 4)
                .unwrap_or(false)
                .then_some(()))
        },
    )
    .await?;
    c.kubectl(&["set", "image", "deployment/web", "web=busybox:v2"])?;
    let pods = rolled_out(&c, 4).await?;
    watching.abort();
    let seen = *min_ready.lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
    assert!(
        seen >= 3,
        "ready pods fell to {seen} during the roll (replicas 4, maxUnavailable 1)"
    );
    assert!(pods.iter().all(|p| {
        p.spec
            .as_ref()
            .is_some_and(|s| s.containers[0].image.as_deref() == Some("busybox:v2"))
    }));
    let sets = c.kubectl(&["get", "rs", "-l", "app=web", "-o", "name"])?;
    assert_eq!(
        sets.lines().count(),
        2,
        "the old ReplicaSet is kept, scaled to 0: {sets}"
    );

    // A rollout that cannot progress (its Pods never become ready) fails `kubectl rollout
    // status` once progressDeadlineSeconds pass.
    c.kubectl(&[
        "patch",
        "deployment",
        "web",
        "-p",
        r#"{"spec":{"progressDeadlineSeconds":2,"template":{"spec":{"containers":[{"name":"web","image":"busybox:v3","resources":{"requests":{"cpu":"64"}}}]}}}}"#,
    ])?;
    let err = c
        .kubectl(&["rollout", "status", "deployment/web", "--timeout=30s"])
        .err()
        .context("rollout status of a stuck rollout succeeded")?;
    assert!(
        format!("{err:#}").contains("exceeded its progress deadline"),
        "{err:#}"
    );
    c.kubectl(&["rollout", "undo", "deployment/web"])?;
    c.kubectl(&[
        "patch",
        "deployment",
        "web",
        "-p",
        r#"{"spec":{"progressDeadlineSeconds":600,"template":{"spec":{"containers":[{"name":"web","image":"busybox:v2","resources":{"requests":{"cpu":"100m"}}}]}}}}"#,
    ])?;
    rolled_out(&c, 4).await?;

    // A Pod too big for any Node stays Pending and says why.
    c.kubectl_apply(BIG)?;
    let message = wait_for(
        "big to be unschedulable",
        Duration::from_secs(20),
        || async {
            let pod = Api::<Pod>::namespaced(c.client.clone(), "default")
                .get("big")
                .await?;
            Ok(pod
                .status
                .and_then(|s| s.conditions)
                .into_iter()
                .flatten()
                .find(|c| c.type_ == "PodScheduled" && c.status == "False")
                .filter(|c| c.reason.as_deref() == Some("Unschedulable"))
                .and_then(|c| c.message))
        },
    )
    .await?;
    assert_eq!(message, "0/2 nodes are available: 2 Insufficient cpu.");
    let phase = c.kubectl(&["get", "pod", "big", "-o", "jsonpath={.status.phase}"])?;
    assert_eq!(phase, "Pending");
    let described = c.kubectl(&["describe", "pod", "big"])?;
    assert!(
        described.contains("FailedScheduling") && described.contains("Insufficient cpu"),
        "{described}"
    );
    let described = c.kubectl(&["describe", "deployment", "web"])?;
    assert!(described.contains("ScalingReplicaSet"), "{described}");

    // A NotReady Node: tainted, its Pods deleted after their tolerationSeconds (2 s by
    // default here) and recreated on the other Node.
    let pods = c.web_pods().await?;
    let victim = node_of(&pods[0]);
    let survivor = if victim == "node-a" {
        "node-b"
    } else {
        "node-a"
    };
    let evicted: BTreeSet<String> = pods
        .iter()
        .filter(|p| node_of(p) == victim)
        .map(|p| p.name_any())
        .collect();
    c.down
        .lock()
        .map_err(|_| anyhow::anyhow!("poisoned"))?
        .insert(victim.clone());
    let marked = Instant::now();
    set_node_ready(&c.client, &victim, "False").await?;
    wait_for(
        "the not-ready NoExecute taint",
        Duration::from_secs(10),
        || async {
            let node = Api::<Node>::all(c.client.clone()).get(&victim).await?;
            Ok(node
                .spec
                .and_then(|s| s.taints)
                .into_iter()
                .flatten()
                .any(|t| t.key == "node.kubernetes.io/not-ready" && t.effect == "NoExecute")
                .then_some(()))
        },
    )
    .await?;
    let pods = wait_for(
        "all web pods on the surviving node",
        Duration::from_secs(30),
        || async {
            let pods = c.web_pods().await?;
            Ok(
                (pods.len() == 4 && pods.iter().all(|p| node_of(p) == survivor && ready(p)))
                    .then_some(pods),
            )
        },
    )
    .await?;
    let took = marked.elapsed();
    assert!(
        took >= Duration::from_secs(2),
        "evicted before tolerationSeconds: {took:?}"
    );
    assert!(pods.iter().all(|p| !evicted.contains(&p.name_any())));
    eprintln!("NotReady node's pods recreated on {survivor} in {took:?}");
    let nodes = c.kubectl(&["get", "nodes"])?;
    assert!(nodes.contains("NotReady"), "{nodes}");
    // The Service's slice lists the 4 new Pods, ready, on the surviving Node only.
    wait_for(
        "the slice on the surviving node",
        Duration::from_secs(20),
        || async {
            let s = slices.list(&by_service).await?.items;
            let on_survivor = s
                .iter()
                .flat_map(|s| &s.endpoints)
                .all(|e| e.node_name.as_deref() == Some(survivor));
            Ok((on_survivor && ready_endpoints(&s) == 4).then_some(()))
        },
    )
    .await?;
    c.kubectl(&["rollout", "status", "deployment/web", "--timeout=30s"])?;

    // The counters saw it all.
    let text = c.metrics.encode();
    let value = |name: &str| -> f64 {
        text.lines()
            .filter(|l| l.starts_with(name))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    assert!(
        value("slipway_controllers_pods_scheduled_total") >= 10.0,
        "{text}"
    );
    assert!(
        value("slipway_controllers_pods_unschedulable_total") >= 1.0,
        "{text}"
    );
    assert!(
        value("slipway_controllers_pods_evicted_total") >= 1.0,
        "{text}"
    );
    assert!(
        value("slipway_controllers_reconciles_total{controller=\"deployment\"}") >= 1.0,
        "{text}"
    );
    Ok(())
}

const RECREATE: &str = r#"
apiVersion: apps/v1
kind: Deployment
metadata:
  name: web
spec:
  replicas: 2
  selector:
    matchLabels: {app: web}
  strategy: {type: Recreate}
  template:
    metadata:
      labels: {app: web}
    spec:
      containers:
      - name: web
        image: busybox
        resources:
          requests: {cpu: 100m}
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn recreate_a_silent_node_and_garbage_collection() -> Result<()> {
    let c = Cluster::start(Some(Duration::from_secs(2))).await?;
    c.add_node("node-a", "zone-a").await?;
    c.add_node("node-b", "zone-b").await?;
    c.kubectl_apply(RECREATE)?;
    rolled_out(&c, 2).await?;

    // Recreate: never a new Pod beside an old one, watched event by event.
    let mixed = Arc::new(Mutex::new(false));
    let watching = {
        let mixed = mixed.clone();
        let api = Api::<Pod>::namespaced(c.client.clone(), "default");
        tokio::spawn(async move {
            let mut live: BTreeMap<String, String> = BTreeMap::new();
            let mut events = watcher(api, watcher::Config::default().labels("app=web")).boxed();
            while let Ok(Some(e)) = events.try_next().await {
                match e {
                    watcher::Event::Apply(p) | watcher::Event::InitApply(p) => {
                        let image = p
                            .spec
                            .as_ref()
                            .and_then(|s| s.containers[0].image.clone())
                            .unwrap_or_default();
                        live.insert(p.name_any(), image);
                    }
                    watcher::Event::Delete(p) => {
                        live.remove(&p.name_any());
                    }
                    _ => {}
                }
                let images: BTreeSet<&String> = live.values().collect();
                if images.len() > 1
                    && let Ok(mut m) = mixed.lock()
                {
                    *m = true;
                }
            }
        })
    };
    c.kubectl(&["set", "image", "deployment/web", "web=busybox:v2"])?;
    let pods = rolled_out(&c, 2).await?;
    watching.abort();
    assert!(
        !*mixed.lock().map_err(|_| anyhow::anyhow!("poisoned"))?,
        "old and new Pods ran together"
    );
    assert!(pods.iter().all(|p| {
        p.spec
            .as_ref()
            .is_some_and(|s| s.containers[0].image.as_deref() == Some("busybox:v2"))
    }));

    // A Node whose kubelet goes silent: Ready Unknown after the grace period, the unreachable
    // taint, its Pods recreated on the other Node.
    let victim = node_of(&pods[0]);
    let survivor = if victim == "node-a" {
        "node-b"
    } else {
        "node-a"
    };
    c.down
        .lock()
        .map_err(|_| anyhow::anyhow!("poisoned"))?
        .insert(victim.clone());
    let reason = wait_for(
        "the silent node to go Unknown",
        Duration::from_secs(20),
        || async {
            let node = Api::<Node>::all(c.client.clone()).get(&victim).await?;
            Ok(node
                .status
                .and_then(|s| s.conditions)
                .into_iter()
                .flatten()
                .find(|c| c.type_ == "Ready" && c.status == "Unknown")
                .and_then(|c| c.reason))
        },
    )
    .await?;
    assert_eq!(reason, "NodeStatusUnknown");
    // The grace period runs from the last heartbeat, which may precede the silence by up to a
    // kubelet pass.
    let last_beat = c
        .beats
        .lock()
        .map_err(|_| anyhow::anyhow!("poisoned"))?
        .get(&victim)
        .copied()
        .ok_or_else(|| anyhow::anyhow!("no heartbeat recorded for {victim}"))?;
    let unknown_after = last_beat.elapsed();
    assert!(
        unknown_after >= Duration::from_secs(2),
        "Unknown before the grace period: {unknown_after:?} after the last heartbeat"
    );
    wait_for(
        "the unreachable NoExecute taint",
        Duration::from_secs(10),
        || async {
            let node = Api::<Node>::all(c.client.clone()).get(&victim).await?;
            Ok(node
                .spec
                .and_then(|s| s.taints)
                .into_iter()
                .flatten()
                .any(|t| t.key == "node.kubernetes.io/unreachable" && t.effect == "NoExecute")
                .then_some(()))
        },
    )
    .await?;
    wait_for(
        "both web pods on the surviving node",
        Duration::from_secs(30),
        || async {
            let pods = c.web_pods().await?;
            Ok(
                (pods.len() == 2 && pods.iter().all(|p| node_of(p) == survivor && ready(p)))
                    .then_some(()),
            )
        },
    )
    .await?;
    eprintln!(
        "silent node Unknown {unknown_after:?} after its last heartbeat, its pods moved {:?} after it",
        last_beat.elapsed()
    );

    // Deleting the Deployment takes its ReplicaSets and their Pods.
    c.kubectl(&["delete", "deployment", "web"])?;
    wait_for(
        "the ReplicaSets and Pods to go",
        Duration::from_secs(20),
        || async {
            let sets = Api::<ReplicaSet>::namespaced(c.client.clone(), "default")
                .list(&ListParams::default())
                .await?;
            let pods = Api::<Pod>::namespaced(c.client.clone(), "default")
                .list(&ListParams::default())
                .await?;
            Ok((sets.items.is_empty() && pods.items.is_empty()).then_some(()))
        },
    )
    .await?;

    // A Pod bound to a Node that is gone (its host removed) is collected; one bound to a
    // Node that exists stays.
    let pods = Api::<Pod>::namespaced(c.client.clone(), "default");
    for (name, node) in [("orphan", "node-gone"), ("kept", survivor)] {
        let pod: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": name},
            "spec": {"nodeName": node, "containers": [{"name": "c", "image": "busybox"}]},
        }))?;
        pods.create(&Default::default(), &pod).await?;
    }
    wait_for(
        "the orphaned Pod to go",
        Duration::from_secs(20),
        || async { Ok(pods.get_opt("orphan").await?.is_none().then_some(())) },
    )
    .await?;
    assert!(
        pods.get_opt("kept").await?.is_some(),
        "a bound Pod was collected"
    );
    Ok(())
}
