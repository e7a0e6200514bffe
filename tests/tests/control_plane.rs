//! Three control plane hosts over three zones: the workload cluster's API servers share a
//! 3-member etcd (TLS, its own CA) on those hosts, behind a control plane endpoint (a VIP the
//! `netns` provider's core spreads over the hosts that answer). One control plane host killed
//! with kill -9 (its agent, API server and etcd): the cluster's API keeps answering through
//! the others, keeps what was written, and the host is replaced by one whose etcd member
//! takes the dead one's place. Deleting the Cluster leaves nothing.
//! Privileged (root, netns, cgroups): run by scripts/test.sh.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{World, gvk, wait_for};
use kube::api::{Api, DynamicObject, ListParams};
use serde_json::Value;
use slipway_hosts::HostProvider as _;

const CLUSTER: &str = "apiVersion: slipway.dev/v1alpha1
kind: Cluster
metadata:
  name: ha
  namespace: team-h
spec:
  topology:
    controlPlane:
      replicas: 3
      hostClass: cp
    nodePools:
    - name: workers
      replicas: 1
      hostClass: small
  settings:
    network:
      pods:
        cidrBlocks: [\"192.168.0.0/16\"]
      services:
        cidrBlocks: [\"10.96.0.0/16\"]
";

fn ready(o: &DynamicObject) -> bool {
    o.data["status"]["conditions"].as_array().is_some_and(|cs| {
        cs.iter()
            .any(|c| c["type"] == "Ready" && c["status"] == "True")
    })
}

/// The Cluster once Running and Ready with `count` hosts, all Ready.
async fn running(
    clusters: &Api<DynamicObject>,
    hosts: &Api<DynamicObject>,
    count: usize,
) -> Option<DynamicObject> {
    let c = clusters.get_opt("ha").await.ok()??;
    let owned: Vec<DynamicObject> = hosts
        .list(&ListParams::default())
        .await
        .ok()?
        .items
        .into_iter()
        .filter(|h| h.data["spec"]["cluster"]["name"] == "ha")
        .collect();
    (c.data["status"]["phase"] == "Running"
        && ready(&c)
        && owned.len() == count
        && owned.iter().all(ready))
    .then_some(c)
}

/// kubectl with the workload cluster's kubeconfig: its stdout, or its stderr as the error.
fn kubectl(kubeconfig: &Path, args: &[&str]) -> Result<String, String> {
    let out = Command::new("kubectl")
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .args(["--request-timeout", "5s"])
        .args(args)
        .output()
        .map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// etcdctl against `endpoint` (`IP:2379`) with control plane host `host`'s member certificate:
/// its stdout, or its stderr as the error.
fn etcdctl(world: &World, host: &str, endpoint: &str, args: &[&str]) -> Result<String, String> {
    let pki = world
        .dir
        .path()
        .join(format!("sup/hosts/data/{host}/apiserver/pki/etcd"));
    let out = Command::new("etcdctl")
        .args(["--endpoints", &format!("https://{endpoint}")])
        .arg("--cacert")
        .arg(pki.join("ca.crt"))
        .arg("--cert")
        .arg(pki.join("member.crt"))
        .arg("--key")
        .arg(pki.join("member.key"))
        .args(["--command-timeout", "3s"])
        .args(args)
        .output()
        .map_err(|e| format!("etcdctl: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// The etcd members (name → peer URL), asked through the endpoint.
fn etcd_members(world: &World, host: &str, vip: &str) -> Result<BTreeMap<String, String>, String> {
    let out = etcdctl(
        world,
        host,
        &format!("{vip}:2379"),
        &["member", "list", "-w", "json"],
    )?;
    let list: Value = serde_json::from_str(&out).map_err(|e| e.to_string())?;
    Ok(list["members"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|m| {
            (
                m["name"].as_str().unwrap_or_default().to_owned(),
                m["peerURLs"][0].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect())
}

fn cp(i: u32) -> String {
    format!("team-h-ha-control-plane-{i}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "privileged: root + netns + cgroups; run with --ignored"]
async fn three_control_plane_hosts_share_etcd_behind_an_endpoint_and_survive_one_killed() {
    let world = World::with_zones(Vec::new(), Vec::new(), &["za", "zb", "zc"]);
    let client = world.client().await;
    world.seed(&client).await;
    world.apply(
        "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: team-h\n---\n\
         apiVersion: slipway.dev/v1alpha1\nkind: HostClass\nmetadata:\n  name: cp\n\
         spec:\n  cpus: 1\n  memory: 1Gi\n",
    );
    let clusters: Api<DynamicObject> =
        Api::namespaced_with(client.clone(), "team-h", &gvk("Cluster", "clusters"));
    let hosts: Api<DynamicObject> = Api::all_with(client.clone(), &gvk("Host", "hosts"));

    let started = Instant::now();
    world.apply(CLUSTER);
    let cluster = wait_for("ha Running with 4 hosts", Duration::from_secs(150), || {
        running(&clusters, &hosts, 4)
    })
    .await;
    eprintln!(
        "3+1 hosts: kubectl apply → Ready in {:?}",
        started.elapsed()
    );

    // The endpoint: a VIP of the underlay's last /24, in the spec, the status and the
    // kubeconfig.
    let vip = cluster.data["spec"]["controlPlaneEndpoint"]["host"]
        .as_str()
        .expect("spec.controlPlaneEndpoint.host")
        .to_owned();
    assert!(vip.starts_with("10.123.255."), "VIP {vip}");
    assert_eq!(
        cluster.data["status"]["apiEndpoint"],
        format!("https://{vip}:6443")
    );
    // The control plane's size and its endpoint are fixed, each refused naming the field.
    let err = world.apply_refused(&CLUSTER.replacen("replicas: 3", "replicas: 1", 1));
    assert!(
        err.contains("spec.topology.controlPlane.replicas") && err.contains("immutable"),
        "{err}"
    );
    let err = world.apply_refused(&format!(
        "{CLUSTER}  controlPlaneEndpoint:\n    host: 10.123.255.99\n"
    ));
    assert!(
        err.contains("spec.controlPlaneEndpoint") && err.contains("immutable"),
        "{err}"
    );
    let path = world.cluster_kubeconfig(&client, "team-h", "ha").await;
    assert!(
        std::fs::read_to_string(&path)
            .expect("kubeconfig")
            .contains(&format!("server: https://{vip}:6443")),
        "the kubeconfig names the VIP"
    );

    // The control plane over the three zones; every host a Ready Node.
    let all = hosts
        .list(&ListParams::default())
        .await
        .expect("hosts")
        .items;
    let zones: BTreeSet<&str> = all
        .iter()
        .filter(|h| h.data["spec"]["pool"] == "control-plane")
        .filter_map(|h| h.data["spec"]["zone"].as_str())
        .collect();
    assert_eq!(zones, BTreeSet::from(["za", "zb", "zc"]));
    let nodes = wait_for("4 Ready Nodes", Duration::from_secs(30), || async {
        let out = kubectl(&path, &["get", "nodes", "--no-headers"]).ok()?;
        let ready = out
            .lines()
            .filter(|l| l.split_whitespace().nth(1) == Some("Ready"))
            .count();
        (ready == 4).then_some(out)
    })
    .await;
    eprintln!("{nodes}");

    // One etcd of three started members, one per control plane host.
    let members = wait_for("3 etcd members", Duration::from_secs(30), || async {
        etcd_members(&world, &cp(1), &vip)
            .ok()
            .filter(|m| m.len() == 3 && m.keys().all(|n| !n.is_empty()))
    })
    .await;
    assert_eq!(
        members.keys().cloned().collect::<BTreeSet<_>>(),
        (0..3).map(cp).collect::<BTreeSet<_>>()
    );
    // (Current kubectl sends `create configmap` as protobuf, which the API does not read.)
    let configmap = |name: &str| {
        let file = world.dir.path().join(format!("{name}.yaml"));
        std::fs::write(
            &file,
            format!(
                "apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: {name}, namespace: default}}\ndata: {{k: v}}\n"
            ),
        )
        .expect("write configmap");
        file.display().to_string()
    };
    kubectl(&path, &["apply", "-f", &configmap("before")]).expect("apply");

    // kill -9 every process of the first control plane host: its agent, API server, etcd.
    let provider = world.provider();
    let victim = cp(0);
    let old_uid = hosts.get(&victim).await.expect("cp-0").metadata.uid;
    let old_peer = members[&victim].clone();
    let pids = provider.status(&victim).await.expect("status").pids;
    assert!(pids.len() >= 3, "agent, API server and etcd run: {pids:?}");
    let killed = Instant::now();
    common::kill9(&pids);
    // The API answers through the two others, reads and writes alike.
    wait_for(
        "the cluster API answering after the kill",
        Duration::from_secs(20),
        || async { kubectl(&path, &["apply", "-f", &configmap("during")]).ok() },
    )
    .await;
    let gap = killed.elapsed();
    let mut failures = Vec::new();
    for _ in 0..10 {
        if let Err(e) = kubectl(
            &path,
            &["get", "configmap", "before", "during", "-o", "name"],
        ) {
            failures.push(e);
        }
    }
    assert!(
        failures.is_empty(),
        "the API stopped answering: {failures:?}"
    );
    eprintln!("control plane host killed: the API answered a write after {gap:?}");
    // The cluster's controllers run on one control plane host at a time (the holder of their
    // Lease), and on another once their host is dead: a Deployment's Pods are made and bound.
    let web = world.dir.path().join("web.yaml");
    std::fs::write(
        &web,
        "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: web, namespace: default}\n\
         spec:\n  replicas: 2\n  selector: {matchLabels: {app: web}}\n  template:\n    \
         metadata: {labels: {app: web}}\n    spec:\n      containers:\n      - {name: web, image: busybox}\n",
    )
    .expect("web.yaml");
    kubectl(&path, &["apply", "-f", &web.display().to_string()]).expect("apply web");
    wait_for("2 web Pods bound", Duration::from_secs(30), || async {
        let out = kubectl(
            &path,
            &[
                "get",
                "pods",
                "-l",
                "app=web",
                "-o",
                "jsonpath={.items[*].spec.nodeName}",
            ],
        )
        .ok()?;
        (out.split_whitespace().count() == 2).then_some(())
    })
    .await;
    let holder = kubectl(
        &path,
        &[
            "get",
            "lease",
            "-n",
            "kube-system",
            "slipway-controllers",
            "-o",
            "jsonpath={.spec.holderIdentity}",
        ],
    )
    .expect("the controllers' Lease");
    eprintln!("the controllers' Lease is held by {holder}");
    assert!(!holder.is_empty(), "nobody holds the controllers' Lease");

    // The host replaced (same name and zone), its new etcd member in the old one's place.
    wait_for(
        "cp-0 replaced and the cluster Ready",
        Duration::from_secs(120),
        || async {
            let h = hosts.get_opt(&victim).await.ok()??;
            (h.metadata.uid != old_uid).then_some(())?;
            running(&clusters, &hosts, 4).await
        },
    )
    .await;
    eprintln!(
        "control plane host replaced: Ready in {:?}",
        killed.elapsed()
    );
    let members = wait_for("3 etcd members again", Duration::from_secs(60), || async {
        etcd_members(&world, &cp(1), &vip)
            .ok()
            .filter(|m| m.len() == 3 && m.keys().all(|n| !n.is_empty()))
    })
    .await;
    assert!(members.contains_key(&victim), "{members:?}");
    let new_address = hosts.get(&victim).await.expect("cp-0").data["status"]["address"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert_eq!(members[&victim], format!("https://{new_address}:2380"));
    eprintln!("etcd members: {members:?} (the dead member was {old_peer})");
    let kept = kubectl(
        &path,
        &["get", "configmap", "before", "during", "-o", "name"],
    )
    .expect("configmaps");
    assert_eq!(
        kept.lines().collect::<Vec<_>>(),
        ["configmap/before", "configmap/during"]
    );

    // kill -9 only another control plane host's API server and etcd: its agent starts them
    // again (etcd from its data: the same member, no replacement) while the API answers
    // through the others.
    let second = cp(1);
    let uid = hosts.get(&second).await.expect("cp-1").metadata.uid;
    let address = hosts.get(&second).await.expect("cp-1").data["status"]["address"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let servers: Vec<i32> = provider
        .status(&second)
        .await
        .expect("status")
        .pids
        .into_iter()
        .filter(|p| {
            let cmd = std::fs::read(format!("/proc/{p}/cmdline")).unwrap_or_default();
            let args: Vec<&[u8]> = cmd.split(|b| *b == 0).collect();
            args.first() == Some(&b"etcd".as_slice())
                || args.get(1) == Some(&b"supervisor".as_slice())
        })
        .collect();
    assert_eq!(servers.len(), 2, "cp-1's API server and etcd: {servers:?}");
    let killed = Instant::now();
    common::kill9(&servers);
    wait_for(
        "the API answering a write",
        Duration::from_secs(20),
        || async { kubectl(&path, &["apply", "-f", &configmap("after")]).ok() },
    )
    .await;
    eprintln!(
        "cp-1's API server and etcd killed: the API answered a write after {:?}",
        killed.elapsed()
    );
    wait_for(
        "cp-1's etcd member healthy again",
        Duration::from_secs(30),
        || async {
            etcdctl(
                &world,
                &second,
                &format!("{address}:2379"),
                &["endpoint", "health"],
            )
            .ok()
        },
    )
    .await;
    let own = world.dir.path().join("cp1.kubeconfig");
    std::fs::write(
        &own,
        std::fs::read_to_string(&path).expect("kubeconfig").replace(
            &format!("https://{vip}:6443"),
            &format!("https://{address}:6443"),
        ),
    )
    .expect("write kubeconfig");
    wait_for(
        "cp-1's API server answering again",
        Duration::from_secs(30),
        || async { kubectl(&own, &["get", "configmap", "after", "-o", "name"]).ok() },
    )
    .await;
    eprintln!("cp-1's API server and etcd back in {:?}", killed.elapsed());
    assert_eq!(
        hosts.get(&second).await.expect("cp-1").metadata.uid,
        uid,
        "a host whose agent lives is not replaced"
    );
    assert_eq!(etcd_members(&world, &second, &vip).map(|m| m.len()), Ok(3));

    // Delete: every host goes, the endpoint leaves the core's table.
    world.kubectl(&["delete", "cluster", "ha", "-n", "team-h", "--wait=false"]);
    wait_for("every host gone", Duration::from_secs(90), || async {
        hosts
            .list(&ListParams::default())
            .await
            .ok()
            .filter(|l| l.items.is_empty())
    })
    .await;
    // (The core goes with the last host; while it is there, its table names the VIP no more.)
    wait_for(
        "the VIP out of the core's table",
        Duration::from_secs(10),
        || async {
            let core = provider.core_netns();
            if !slipway_dataplane::netns::exists(&core) {
                return Some(());
            }
            let out = Command::new("ip")
                .args(["netns", "exec", &core])
                .args(["nft", "list", "table", "ip", "slipway-endpoints"])
                .output()
                .ok()?;
            (out.status.success() && !String::from_utf8_lossy(&out.stdout).contains(&vip))
                .then_some(())
        },
    )
    .await;
    wait_for("the Cluster gone", Duration::from_secs(30), || async {
        clusters.get_opt("ha").await.ok()?.is_none().then_some(())
    })
    .await;

    // The same Cluster made again (the same VIP and host addresses, a new core namespace):
    // its endpoint serves again.
    world.apply(CLUSTER);
    wait_for("ha Running again", Duration::from_secs(150), || {
        running(&clusters, &hosts, 4)
    })
    .await;
    let path = world.cluster_kubeconfig(&client, "team-h", "ha").await;
    kubectl(&path, &["get", "nodes", "-o", "name"]).expect("the API through the VIP again");
    world.kubectl(&["delete", "cluster", "ha", "-n", "team-h", "--wait=false"]);
    wait_for("every host gone again", Duration::from_secs(90), || async {
        hosts
            .list(&ListParams::default())
            .await
            .ok()
            .filter(|l| l.items.is_empty())
    })
    .await;
}
