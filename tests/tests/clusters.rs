//! Clusters that provision: a Cluster applied with kubectl becomes Hosts placed over zones by the
//! supervisor's Cluster reconciler, provisioned by its Host reconciler (netns), joined and Ready;
//! the Cluster goes Running with its conditions and Events; editing a pool's replicas scales it
//! (newest hosts removed first); a supervisor killed with kill -9 while a Cluster is being made
//! converges without a host made twice; deleting Clusters leaves nothing.
//! Privileged (root, netns, cgroups): run by scripts/test.sh.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::{World, gvk, wait_for};
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, DynamicObject, ListParams};
use slipway_hosts::HostProvider as _;

fn cluster_yaml(name: &str, workers: u32) -> String {
    format!(
        "apiVersion: slipway.dev/v1alpha1
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
      replicas: {workers}
      hostClass: small
  settings:
    network:
      pods:
        cidrBlocks: [\"192.168.0.0/16\"]
      services:
        cidrBlocks: [\"10.96.0.0/16\"]
"
    )
}

/// The Cluster once it is Running and Ready with `hosts` hosts, each Host Ready.
async fn running(
    clusters: &Api<DynamicObject>,
    hosts: &Api<DynamicObject>,
    name: &str,
    count: usize,
) -> Option<DynamicObject> {
    let c = clusters.get_opt(name).await.ok()??;
    let ready = c.data["status"]["conditions"]
        .as_array()?
        .iter()
        .any(|x| x["type"] == "Ready" && x["status"] == "True");
    let names: Vec<String> = c.data["status"]["hosts"]
        .as_array()?
        .iter()
        .filter_map(|h| h.as_str().map(str::to_owned))
        .collect();
    if c.data["status"]["phase"] != "Running" || !ready || names.len() != count {
        return None;
    }
    for h in &names {
        let host = hosts.get_opt(h).await.ok()??;
        let host_ready = host.data["status"]["conditions"]
            .as_array()?
            .iter()
            .any(|x| x["type"] == "Ready" && x["status"] == "True");
        if !host_ready {
            return None;
        }
    }
    Some(c)
}

fn zones_of(hosts: &[DynamicObject], cluster: &str) -> BTreeMap<String, String> {
    hosts
        .iter()
        .filter(|h| h.data["spec"]["cluster"]["name"] == cluster)
        .map(|h| {
            (
                h.metadata.name.clone().unwrap_or_default(),
                h.data["spec"]["zone"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "privileged: root + netns + cgroups; run with --ignored"]
async fn a_cluster_is_provisioned_over_zones_scales_survives_a_supervisor_kill_and_leaves_nothing()
{
    let mut world = World::new();
    let client = world.client().await;
    world.seed(&client).await;
    world.apply("apiVersion: v1\nkind: Namespace\nmetadata:\n  name: team-a\n");
    let clusters: Api<DynamicObject> =
        Api::namespaced_with(client.clone(), "team-a", &gvk("Cluster", "clusters"));
    let hosts: Api<DynamicObject> = Api::all_with(client.clone(), &gvk("Host", "hosts"));

    // A Cluster whose pods would take the hosts' own underlay is refused, naming the field.
    let err =
        world.apply_refused(&cluster_yaml("bad", 1).replace("192.168.0.0/16", "10.123.0.0/17"));
    assert!(
        err.contains("spec.settings.network.pods.cidrBlocks[0]") && err.contains("underlay"),
        "{err}"
    );

    // apply → Running: 1 control plane host and 2 workers spread over the two zones.
    let started = Instant::now();
    world.apply(&cluster_yaml("c1", 2));
    wait_for("c1 Running with 3 hosts", Duration::from_secs(60), || {
        running(&clusters, &hosts, "c1", 3)
    })
    .await;
    eprintln!(
        "1+2 hosts: kubectl apply → Ready in {:?}",
        started.elapsed()
    );
    let all = hosts
        .list(&ListParams::default())
        .await
        .expect("hosts")
        .items;
    assert_eq!(
        zones_of(&all, "c1"),
        BTreeMap::from([
            ("team-a-c1-control-plane-0".to_owned(), "za".to_owned()),
            ("team-a-c1-workers-0".to_owned(), "za".to_owned()),
            ("team-a-c1-workers-1".to_owned(), "zb".to_owned()),
        ])
    );
    // The workload cluster's own API, on its control plane host: every host a Node, Ready,
    // with its zone and class.
    let path = world.cluster_kubeconfig(&client, "team-a", "c1").await;
    let nodes: serde_json::Value =
        serde_json::from_str(&world.kubectl_with(&path, &["get", "nodes", "-o", "json"]))
            .expect("nodes json");
    let nodes: BTreeMap<String, (String, String)> = nodes["items"]
        .as_array()
        .expect("items")
        .iter()
        .map(|n| {
            let ready = n["status"]["conditions"]
                .as_array()
                .and_then(|cs| cs.iter().find(|c| c["type"] == "Ready"))
                .map(|c| c["status"].as_str().unwrap_or_default().to_owned())
                .unwrap_or_default();
            (
                n["metadata"]["name"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned(),
                (
                    n["metadata"]["labels"]["topology.kubernetes.io/zone"]
                        .as_str()
                        .unwrap_or_default()
                        .to_owned(),
                    ready,
                ),
            )
        })
        .collect();
    let pair = |z: &str| (z.to_owned(), "True".to_owned());
    assert_eq!(
        nodes,
        BTreeMap::from([
            ("team-a-c1-control-plane-0".to_owned(), pair("za")),
            ("team-a-c1-workers-0".to_owned(), pair("za")),
            ("team-a-c1-workers-1".to_owned(), pair("zb")),
        ])
    );
    // The cluster's controllers run beside its API server: a Deployment's Pods are made and
    // scheduled over both zones, and a Service gets a ClusterIP from the Cluster's services
    // block. (No kubelet runs them yet: the Pods stay bound and Pending.)
    let web = world.dir.path().join("web.yaml");
    std::fs::write(
        &web,
        "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: web, namespace: default}\n\
         spec:\n  replicas: 3\n  selector: {matchLabels: {app: web}}\n  template:\n    \
         metadata: {labels: {app: web}}\n    spec:\n      containers:\n      - {name: web, image: busybox}\n\
         ---\napiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: default}\n\
         spec:\n  selector: {app: web}\n  ports: [{port: 80}]\n",
    )
    .expect("web.yaml");
    world.kubectl_with(&path, &["apply", "-f", &web.display().to_string()]);
    let zones_of_pods = wait_for(
        "3 web Pods scheduled over 2 zones",
        Duration::from_secs(30),
        || async {
            let pods: serde_json::Value = serde_json::from_str(
                &world.kubectl_with(&path, &["get", "pods", "-l", "app=web", "-o", "json"]),
            )
            .ok()?;
            let items = pods["items"].as_array()?;
            let zones: std::collections::BTreeSet<String> = items
                .iter()
                .filter_map(|p| p["spec"]["nodeName"].as_str())
                .filter_map(|n| nodes.get(n).map(|(z, _)| z.clone()))
                .collect();
            let bound = items
                .iter()
                .filter(|p| p["spec"]["nodeName"].is_string())
                .count();
            (bound == 3 && zones.len() == 2).then_some(zones)
        },
    )
    .await;
    assert_eq!(zones_of_pods.len(), 2);
    let ip = world.kubectl_with(
        &path,
        &["get", "service", "web", "-o", "jsonpath={.spec.clusterIP}"],
    );
    assert!(
        ip.starts_with("10.96."),
        "ClusterIP {ip:?} is not from the Cluster's 10.96.0.0/16"
    );

    let described = world.kubectl(&["describe", "cluster", "c1", "-n", "team-a"]);
    for needle in [
        "HostCreated",
        "team-a-c1-workers-1",
        "Running",
        "KubeconfigReady",
    ] {
        assert!(described.contains(needle), "{needle} not in:\n{described}");
    }

    // Scale 2 → 4 → 1: the newest workers go first.
    for (workers, total) in [(4u32, 5usize), (1, 2)] {
        let started = Instant::now();
        world.apply(&cluster_yaml("c1", workers));
        wait_for(
            &format!("c1 with {total} hosts"),
            Duration::from_secs(60),
            || running(&clusters, &hosts, "c1", total),
        )
        .await;
        eprintln!(
            "scale to {workers} workers: Ready in {:?}",
            started.elapsed()
        );
    }
    let all = hosts
        .list(&ListParams::default())
        .await
        .expect("hosts")
        .items;
    assert_eq!(
        zones_of(&all, "c1").into_keys().collect::<Vec<_>>(),
        ["team-a-c1-control-plane-0", "team-a-c1-workers-0"]
    );

    // Remediation: the worker's agent killed with kill -9 → its Lease expires → the host is
    // replaced (a new Host of the same name, zone and pool) and Ready again.
    let provider = world.provider();
    let worker = "team-a-c1-workers-0";
    let old_uid = hosts.get(worker).await.expect("worker").metadata.uid;
    let pids = provider.status(worker).await.expect("worker status").pids;
    assert!(!pids.is_empty(), "the worker's agent runs");
    let killed = Instant::now();
    common::kill9(&pids);
    wait_for(
        "the worker replaced and Ready",
        Duration::from_secs(60),
        || async {
            let h = hosts.get_opt(worker).await.ok()??;
            (h.metadata.uid != old_uid).then_some(())?;
            running(&clusters, &hosts, "c1", 2).await
        },
    )
    .await;
    eprintln!(
        "remediation: agent killed → replacement Ready in {:?}",
        killed.elapsed()
    );
    let described = world.kubectl(&["describe", "cluster", "c1", "-n", "team-a"]);
    assert!(described.contains("HostReplaced"), "{described}");

    // kill -9 right after a Cluster is applied; the restarted supervisor makes it once.
    world.apply(&cluster_yaml("c2", 1));
    world.kill9();
    world.start();
    let client = world.client().await;
    let clusters: Api<DynamicObject> =
        Api::namespaced_with(client.clone(), "team-a", &gvk("Cluster", "clusters"));
    let hosts: Api<DynamicObject> = Api::all_with(client.clone(), &gvk("Host", "hosts"));
    for (name, count) in [("c1", 2), ("c2", 2)] {
        wait_for(
            &format!("{name} Running after the restart"),
            Duration::from_secs(60),
            || running(&clusters, &hosts, name, count),
        )
        .await;
    }
    let made: Vec<String> = provider
        .list()
        .await
        .expect("list")
        .into_iter()
        .map(|h| h.spec.name)
        .collect();
    assert_eq!(
        made,
        [
            "team-a-c1-control-plane-0",
            "team-a-c1-workers-0",
            "team-a-c2-control-plane-0",
            "team-a-c2-workers-0",
        ],
        "every host made once"
    );

    // Delete, with the supervisor killed (kill -9) right after: the restarted one finishes it,
    // and the Clusters go once every host is torn down.
    world.kubectl(&[
        "delete",
        "clusters",
        "--all",
        "-n",
        "team-a",
        "--wait=false",
    ]);
    world.kill9();
    world.start();
    let client = world.client().await;
    let clusters: Api<DynamicObject> =
        Api::namespaced_with(client.clone(), "team-a", &gvk("Cluster", "clusters"));
    let hosts: Api<DynamicObject> = Api::all_with(client.clone(), &gvk("Host", "hosts"));
    wait_for("every Cluster gone", Duration::from_secs(60), || async {
        clusters
            .list(&ListParams::default())
            .await
            .ok()?
            .items
            .is_empty()
            .then_some(())
    })
    .await;
    assert!(
        hosts
            .list(&ListParams::default())
            .await
            .expect("hosts")
            .items
            .is_empty()
    );
    let secrets: Api<Secret> = Api::namespaced(client.clone(), "team-a");
    let left: Vec<String> = secrets
        .list(&ListParams::default())
        .await
        .expect("secrets")
        .items
        .into_iter()
        .filter_map(|s| s.metadata.name)
        .collect();
    assert!(left.is_empty(), "the clusters' Secrets are gone: {left:?}");
    assert!(provider.list().await.expect("list").is_empty());
    assert_eq!(world.leftovers(), Vec::<String>::new(), "{}", world.log());
}
