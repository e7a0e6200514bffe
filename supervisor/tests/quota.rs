//! End-to-end tests of namespace quotas under concurrency, over-quota namespaces that shrink,
//! and classes that cannot be deleted or grown under their users; on redb and on a real
//! 3-member etcd cluster, through the HTTP API and Debian's kubectl.

mod common;

use hyper::Method;
use serde_json::{Value, json};
use slipway_supervisor::client::{Client, ClientError};
use slipway_supervisor::store::etcd::EtcdStore;
use slipway_supervisor::store::redb::RedbStore;
use slipway_supervisor::store::{Cas, Store, StoreError};

use common::{Backend, Etcd, Supervisor, TempDir};

const SETUP: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: team-q}
spec:
  limits: {cpu: "8", memory: 64Gi, storage: 100Gi}
---
apiVersion: v1
kind: Namespace
metadata: {name: team-s}
spec:
  limits: {cpu: "16"}
---
apiVersion: slipway.dev/v1alpha1
kind: HostClass
metadata: {name: small}
spec: {cpus: 2, memory: 4Gi}
---
apiVersion: slipway.dev/v1alpha1
kind: HostClass
metadata: {name: spare}
spec: {cpus: 2, memory: 4Gi}
---
apiVersion: storage.k8s.io/v1
kind: StorageClass
metadata: {name: fast}
provisioner: csi.slipway.dev
---
apiVersion: storage.k8s.io/v1
kind: StorageClass
metadata: {name: unused}
provisioner: csi.slipway.dev
"#;

/// A cluster of `1 + workers` small hosts (2 cpus each).
fn cluster(ns: &str, name: &str, workers: u32) -> Value {
    json!({
        "apiVersion": "slipway.dev/v1alpha1",
        "kind": "Cluster",
        "metadata": {"name": name, "namespace": ns},
        "spec": {
            "topology": {
                "controlPlane": {"replicas": 1, "hostClass": "small"},
                "nodePools": [{"name": "workers", "replicas": workers, "hostClass": "small"}],
            },
            "settings": {"network": {
                "pods": {"cidrBlocks": ["192.168.0.0/16"]},
                "services": {"cidrBlocks": ["10.96.0.0/16"]},
            }},
        },
    })
}

fn claim(name: &str, size: &str) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {"name": name, "namespace": "team-q"},
        "spec": {
            "accessModes": ["ReadWriteOnce"],
            "storageClassName": "fast",
            "resources": {"requests": {"storage": size}},
        },
    })
}

/// POSTs every object at once; returns how many were created and the refusals' messages.
async fn create_all(client: &Client, path: &str, objs: Vec<Value>) -> (usize, Vec<String>) {
    let tasks: Vec<_> = objs
        .into_iter()
        .map(|o| {
            let (client, path) = (client.clone(), path.to_string());
            tokio::spawn(async move {
                let body = serde_json::to_vec(&o).expect("json");
                client
                    .call(
                        Method::POST,
                        &path,
                        Some("application/json"),
                        "application/json",
                        body,
                    )
                    .await
            })
        })
        .collect();
    let (mut created, mut refused) = (0, Vec::new());
    for t in tasks {
        match t.await.expect("task") {
            Ok(r) => {
                assert_eq!(r.status.as_u16(), 201);
                created += 1;
            }
            Err(ClientError::Api { code, message, .. }) => {
                assert_eq!(code, 403, "{message}");
                refused.push(message);
            }
            Err(e) => panic!("create failed: {e}"),
        }
    }
    (created, refused)
}

fn count(sup: &Supervisor, args: &[&str]) -> usize {
    let mut a = vec!["get"];
    a.extend_from_slice(args);
    a.extend_from_slice(&["-o", "json"]);
    let v: Value = serde_json::from_str(sup.kubectl(&a).ok()).expect("kubectl json");
    v["items"].as_array().map_or(0, Vec::len)
}

fn start(dir: &TempDir, backend: &Backend) -> Supervisor {
    let sup = Supervisor::start(dir.path(), &backend.store_arg(), &[]);
    let setup = sup.file("setup.yaml", SETUP);
    sup.kubectl(&["apply", "-f", &setup]).ok();
    sup
}

/// Point 1: admission and the write are one atomic step.
async fn parallel_suite(backend: &Backend) {
    let dir = TempDir::new("quota");
    let sup = start(&dir, backend);
    let client = Client::from_kubeconfig(&sup.kubeconfig()).expect("client");

    // Room for 2 clusters of 4 cpus (limit 8): 20 parallel creates admit exactly 2.
    let clusters = (0..20)
        .map(|i| cluster("team-q", &format!("c{i}"), 1))
        .collect();
    let (created, refused) = create_all(
        &client,
        "/apis/slipway.dev/v1alpha1/namespaces/team-q/clusters",
        clusters,
    )
    .await;
    assert_eq!(created, 2, "refusals: {refused:?}");
    assert_eq!(refused.len(), 18);
    assert!(
        refused
            .iter()
            .all(|m| m.contains("exceeded quota: spec.limits.cpu")),
        "{refused:?}"
    );
    assert_eq!(count(&sup, &["clusters", "-n", "team-q"]), 2);

    // Same for storage: 9 × 40Gi against 100Gi admit exactly 2.
    let claims = (0..9).map(|i| claim(&format!("d{i}"), "40Gi")).collect();
    let (created, refused) = create_all(
        &client,
        "/api/v1/namespaces/team-q/persistentvolumeclaims",
        claims,
    )
    .await;
    assert_eq!(created, 2, "refusals: {refused:?}");
    assert!(
        refused
            .iter()
            .all(|m| m.contains("exceeded quota: spec.limits.storage")),
        "{refused:?}"
    );
    assert_eq!(count(&sup, &["pvc", "-n", "team-q"]), 2);
}

/// Point 2: an over-quota namespace can shrink and be annotated, not grow.
fn shrink_suite(backend: &Backend) {
    let dir = TempDir::new("shrink");
    let sup = start(&dir, backend);
    let big = serde_json::to_string(&cluster("team-s", "big", 5)).expect("json");
    let f = sup.file("big.json", &big);
    sup.kubectl(&["apply", "-f", &f]).ok();
    sup.kubectl(&[
        "patch",
        "namespace",
        "team-s",
        "--type=merge",
        "-p",
        r#"{"spec":{"limits":{"cpu":"2"}}}"#,
    ])
    .ok();
    let scale = |n: u32| {
        sup.kubectl(&[
            "patch",
            "cluster",
            "big",
            "-n",
            "team-s",
            "--type=json",
            "-p",
            &format!(
                r#"[{{"op":"replace","path":"/spec/topology/nodePools/0/replicas","value":{n}}}]"#
            ),
        ])
    };
    scale(1).ok();
    sup.kubectl(&["annotate", "cluster", "big", "-n", "team-s", "owner=qa"])
        .ok();
    let grow = scale(2);
    assert!(
        grow.err().contains("exceeded quota: spec.limits.cpu"),
        "{}",
        grow.stderr
    );
    let big = serde_json::from_str::<Value>(
        sup.kubectl(&["get", "cluster", "big", "-n", "team-s", "-o", "json"])
            .ok(),
    )
    .expect("json");
    assert_eq!(big["spec"]["topology"]["nodePools"][0]["replicas"], 1);
    assert_eq!(big["metadata"]["annotations"]["owner"], "qa");
}

/// Point 4: classes in use cannot be deleted; the refusal names the users. Growing a class
/// re-checks its users' quotas.
fn class_suite(backend: &Backend) {
    let dir = TempDir::new("classes");
    let sup = start(&dir, backend);
    for (i, obj) in [
        cluster("team-q", "c0", 1),
        cluster("team-q", "c1", 1),
        cluster("team-s", "big", 1),
        claim("d0", "40Gi"),
    ]
    .iter()
    .enumerate()
    {
        let f = sup.file(&format!("obj{i}.json"), &obj.to_string());
        sup.kubectl(&["apply", "-f", &f]).ok();
    }

    let del = sup.kubectl(&["delete", "hostclass", "small"]);
    let msg = del.err();
    assert!(msg.contains("in use by"), "{msg}");
    assert!(msg.contains("Cluster team-s/big"), "{msg}");
    assert!(msg.contains("Cluster team-q/c"), "{msg}");
    let del = sup.kubectl(&["delete", "storageclass", "fast"]);
    assert!(
        del.err().contains("PersistentVolumeClaim team-q/d"),
        "{}",
        del.stderr
    );
    assert_eq!(count(&sup, &["hostclasses"]), 2);
    sup.kubectl(&["delete", "storageclass", "unused"]).ok();
    sup.kubectl(&["delete", "hostclass", "spare"]).ok();

    // Growing a class re-checks its users' quotas: refused, naming the namespace and limit.
    let grow = sup.kubectl(&[
        "patch",
        "hostclass",
        "small",
        "--type=merge",
        "-p",
        r#"{"spec":{"cpus":64}}"#,
    ]);
    let msg = grow.err();
    assert!(msg.contains("spec.limits.cpu"), "{msg}");
    assert!(
        msg.contains(r#"namespace "team-q""#) || msg.contains(r#"namespace "team-s""#),
        "{msg}"
    );
    let small = serde_json::from_str::<Value>(
        sup.kubectl(&["get", "hostclass", "small", "-o", "json"])
            .ok(),
    )
    .expect("json");
    assert_eq!(small["spec"]["cpus"], 2);
    // Memory growth within every user's limits passes (team-q: 4 hosts × 8Gi <= 64Gi).
    sup.kubectl(&[
        "patch",
        "hostclass",
        "small",
        "--type=merge",
        "-p",
        r#"{"spec":{"memory":"8Gi"}}"#,
    ])
    .ok();
    // Once its users are gone, the class can go.
    sup.kubectl(&["delete", "clusters", "--all", "-n", "team-q"])
        .ok();
    sup.kubectl(&["delete", "cluster", "big", "-n", "team-s"])
        .ok();
    sup.kubectl(&["delete", "hostclass", "small"]).ok();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parallel_creates_admit_exactly_the_room_on_redb() {
    parallel_suite(&Backend::Redb).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parallel_creates_admit_exactly_the_room_on_etcd() {
    parallel_suite(&Backend::Etcd(Etcd::start(3))).await;
}

#[test]
fn over_quota_namespace_shrinks_on_redb() {
    shrink_suite(&Backend::Redb);
}

#[test]
fn over_quota_namespace_shrinks_on_etcd() {
    shrink_suite(&Backend::Etcd(Etcd::start(3)));
}

#[test]
fn classes_in_use_are_kept_on_redb() {
    class_suite(&Backend::Redb);
}

#[test]
fn classes_in_use_are_kept_on_etcd() {
    class_suite(&Backend::Etcd(Etcd::start(3)));
}

/// The store's multi-key transaction, the primitive the quota rests on: every step or none,
/// the refusal names the failing key, a prefix guard sees a key changed after a list.
async fn txn_contract(store: &impl Store) -> Result<(), StoreError> {
    let a = store.create("/t/a", b"1".to_vec()).await?;
    let refused = store
        .txn(vec![
            Cas::create("/t/b", b"2".to_vec()),
            Cas::unchanged("/t/a", Some(a + 1)),
        ])
        .await;
    assert!(
        matches!(&refused, Err(e) if e.refused_key() == Some("/t/a")),
        "{refused:?}"
    );
    assert!(store.get("/t/b").await?.is_none(), "a refused txn wrote");
    let revs = store
        .txn(vec![
            Cas::create("/t/b", b"2".to_vec()),
            Cas::put("/u/rec", b"r".to_vec(), None),
            Cas::unchanged("/t/a", Some(a)),
        ])
        .await?;
    assert_eq!(revs[2], a);
    let b = store.get("/t/b").await?.expect("/t/b").revision;
    assert_eq!(revs[0], b);
    let (_, listed) = store.list("/t/").await?;
    // Unchanged since the list: the guarded delete goes through.
    store
        .txn(vec![
            Cas::delete("/u/rec", revs[1]),
            Cas::prefix_unchanged("/t/", listed),
        ])
        .await?;
    // Changed since: refused, naming the prefix, and nothing deleted.
    store.update("/t/b", b"3".to_vec(), b).await?;
    let refused = store
        .txn(vec![
            Cas::delete("/t/a", a),
            Cas::prefix_unchanged("/t/", listed),
        ])
        .await;
    assert!(
        matches!(&refused, Err(e) if e.refused_key() == Some("/t/")),
        "{refused:?}"
    );
    assert!(store.get("/t/a").await?.is_some());
    Ok(())
}

#[tokio::test]
async fn store_txn_contract_on_redb() -> Result<(), StoreError> {
    let dir = TempDir::new("txn");
    txn_contract(&RedbStore::open(&dir.path().join("store.redb"))?).await
}

#[tokio::test]
async fn store_txn_contract_on_etcd() -> Result<(), StoreError> {
    let etcd = Etcd::start(3);
    txn_contract(&EtcdStore::connect(&etcd.client_urls).await?).await
}

/// Namespace limits are split equally across the zones the namespace's clusters use: a Cluster
/// that would put more than its zone's share in one zone is refused (403) naming the zone, the
/// share and the limit, and nothing is stored; the same hosts spread over the zones fit.
#[test]
fn a_zone_takes_no_more_than_its_share_of_the_namespace() {
    let dir = TempDir::new("zones");
    let sup = start(&dir, &Backend::Redb);
    let zones = sup.file(
        "zones.yaml",
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: team-z}\nspec:\n  limits: {cpu: \"18\"}\n\
         ---\napiVersion: slipway.dev/v1alpha1\nkind: Zone\nmetadata: {name: za}\nspec: {}\n\
         ---\napiVersion: slipway.dev/v1alpha1\nkind: Zone\nmetadata: {name: zb}\nspec: {}\n\
         ---\napiVersion: slipway.dev/v1alpha1\nkind: Zone\nmetadata: {name: zc}\nspec: {}\n",
    );
    sup.kubectl(&["apply", "-f", &zones]).ok();
    // 1 + 2 small hosts (2 cpus each) over za, zb (cp and worker 0 in za): za 4, zb 2.
    let spread = sup.file("spread.json", &cluster("team-z", "spread", 2).to_string());
    sup.kubectl(&["apply", "-f", &spread]).ok();
    // 1 + 3 more, all pinned to za: 6 cpus of 18 in all fits the namespace, but za would hold
    // 4 + 2 + 6 = 12 of a share of 18 / 2 zones = 9.
    let mut pinned = cluster("team-z", "pinned", 3);
    pinned["spec"]["topology"]["nodePools"][0]["failureDomain"] = json!("za");
    let f = sup.file("pinned.json", &pinned.to_string());
    let out = sup.kubectl(&["apply", "-f", &f]);
    let msg = out.err();
    assert!(
        msg.contains("Forbidden") || msg.contains("forbidden"),
        "{msg}"
    );
    assert!(
        msg.contains("zone \"za\"") && msg.contains("share 9.000"),
        "{msg}"
    );
    assert!(
        msg.contains("spec.limits.cpu") && msg.contains("2 zones"),
        "{msg}"
    );
    assert_eq!(
        count(&sup, &["clusters", "-n", "team-z"]),
        1,
        "nothing stored"
    );
    // The same three workers in zc: za 6 (cp), zb 2, zc 6 → 3 zones, share 6 each: fits.
    pinned["spec"]["topology"]["nodePools"][0]["failureDomain"] = json!("zc");
    let f = sup.file("pinned-zc.json", &pinned.to_string());
    sup.kubectl(&["apply", "-f", &f]).ok();
    assert_eq!(count(&sup, &["clusters", "-n", "team-z"]), 2);
}
