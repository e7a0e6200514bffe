//! Storage in the supervisor, through the `slipway` binary: `slipway supervisor --host-provider
//! netns --storage-hosts` makes per zone a storage host whose block store serves NBD over TLS on
//! the host's underlay address; a claim of a `csi.slipway.dev` StorageClass becomes a volume
//! there and a bound PV naming that address. Killed with kill -9 and started again, the
//! supervisor finds its storage hosts and volumes and makes nothing twice; a deleted claim
//! takes its volume along; teardown leaves nothing.
//! Privileged (root, netns, cgroups): run by scripts/test.sh.

mod common;

use std::path::Path;
use std::time::Duration;

use common::{World, wait_for};
use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim};
use kube::api::{Api, DeleteParams};
use slipway_api::volumes::NO_CLIENT;
use slipway_blockstore::control::{self, ControlRequest};
use slipway_hosts::HostProvider as _;

const SETUP: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: team}
spec:
  limits: {storage: 10Gi}
---
apiVersion: storage.k8s.io/v1
kind: StorageClass
metadata: {name: fast}
provisioner: csi.slipway.dev
allowVolumeExpansion: true
---
apiVersion: v1
kind: PersistentVolumeClaim
metadata: {name: data, namespace: team}
spec:
  accessModes: [ReadWriteOnce]
  storageClassName: fast
  resources: {requests: {storage: 1Gi}}
"#;

async fn volumes(control: &Path) -> Option<Vec<slipway_blockstore::store::VolumeInfo>> {
    control::call(control, &ControlRequest::List {})
        .await
        .ok()
        .map(|r| r.volumes)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "privileged: root + netns + cgroups; run with --ignored"]
async fn storage_hosts_serve_claims_and_survive_a_supervisor_kill() {
    let mut world = World::with_flags(
        Vec::new(),
        vec![
            "--storage-hosts".into(),
            "--storage-host-memory".into(),
            (256u64 << 20).to_string(),
        ],
    );
    let client = world.client().await;
    world.seed(&client).await;
    world.apply(SETUP);
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), "team");
    let volume = wait_for("claim bound", Duration::from_secs(60), || async {
        let c = claims.get_opt("data").await.ok()??;
        let bound = c.status.as_ref()?.phase.as_deref() == Some("Bound");
        bound.then(|| c.spec?.volume_name).flatten()
    })
    .await;
    // The PV names the storage host of zone za (the first zone): its address on za's segment.
    let pvs: Api<PersistentVolume> = Api::all(client.clone());
    let pv = pvs.get(&volume).await.expect("PV");
    let nbd = pv
        .spec
        .and_then(|s| s.csi)
        .and_then(|c| c.volume_attributes)
        .and_then(|a| a.get("nbdAddress").cloned())
        .unwrap_or_default();
    assert!(
        nbd.starts_with("tcp:10.123.0.") && nbd.ends_with(":10809"),
        "{nbd}\n{}",
        world.log()
    );
    let control = world.dir.path().join("sup/storage/za/control.sock");
    let vols = volumes(&control).await.expect("za's block store answers");
    assert_eq!(vols.len(), 1, "{vols:?}");
    assert_eq!(vols[0].name, volume);
    assert_eq!(vols[0].clients, vec![NO_CLIENT.to_owned()]);
    assert!(
        volumes(&world.dir.path().join("sup/storage/zb/control.sock"))
            .await
            .is_some_and(|v| v.is_empty()),
        "zb's block store"
    );

    // kill -9 and start again: the same storage hosts and volumes, nothing made twice.
    world.kill9();
    world.start();
    let client = world.client().await;
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), "team");
    let vols = volumes(&control)
        .await
        .expect("za's block store after the restart");
    assert_eq!(vols.len(), 1, "{vols:?}");
    let storage_hosts: Vec<String> = world
        .provider()
        .list()
        .await
        .expect("hosts")
        .into_iter()
        .map(|h| h.spec.name)
        .collect();
    assert_eq!(storage_hosts, ["storage-za", "storage-zb"]);

    // The claim goes, and its volume with it.
    claims
        .delete("data", &DeleteParams::default())
        .await
        .expect("delete claim");
    wait_for("volume deleted", Duration::from_secs(60), || async {
        volumes(&control).await.filter(Vec::is_empty).map(|_| ())
    })
    .await;
    wait_for("PV deleted", Duration::from_secs(30), || async {
        pvs.get_opt(&volume).await.ok()?.is_none().then_some(())
    })
    .await;
    world.kill9();
    let provider = world.provider();
    provider.teardown().await.expect("teardown");
    assert_eq!(world.leftovers(), Vec::<String>::new());
}
