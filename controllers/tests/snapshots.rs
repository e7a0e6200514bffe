//! Workload snapshots end to end, in the world of [`common::world`] (a real supervisor, block
//! store and workload cluster with its controllers): bytes written into a workload volume (as
//! its host, qemu-io over TLS), a VolumeSnapshot of its claim taken by the snapshotter through
//! the pvCSI socket, the original overwritten, a claim restored from the snapshot reading the
//! old bytes, a claim cloned from the original reading the new ones; a VolumeSnapshot of a
//! missing claim says so (status.error, Event); a claim from a missing snapshot waits, saying
//! so; a supervisor VolumeSnapshot annotated with another's snapshot is not trusted with it; a
//! deleted VolumeSnapshot waits for the claims restored from it, then takes its supervisor
//! snapshot and block store snapshot along, and at the end nothing is left in the store.
//!
//! Needs `cargo build -p slipway-blockstore --bin slipway-nbd` first.

mod common;

use anyhow::{Context as _, Result, ensure};
use common::{GI, World, host_creds, qemu, store_volumes, until};
use k8s_openapi::api::core::v1::{Event, Node, PersistentVolumeClaim, Pod};
use k8s_openapi::api::storage::v1::VolumeAttachment;
use kube::api::{Api, DeleteParams, DynamicObject, ListParams, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use serde_json::{Value, json};
use slipway_api::volumes::SNAPSHOT_HANDLE_ANNOTATION;
use slipway_controllers::snapshotter;

const NODE: &str = "team-c1-w-0";

/// Creates claim `name` of 1Gi, from `source` (a dataSource) if given.
async fn claim(claims: &Api<PersistentVolumeClaim>, name: &str, source: Value) -> Result<()> {
    claims
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": name}, "spec": {
                "accessModes": ["ReadWriteOnce"], "storageClassName": "fast",
                "resources": {"requests": {"storage": "1Gi"}},
                "dataSource": source}}))?,
        )
        .await?;
    Ok(())
}

/// Waits until claim `name` is bound; its volume handle.
async fn bound(wl: &Client, name: &str) -> Result<String> {
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(wl.clone(), "default");
    let pv = until(&format!("claim {name} bound"), 60, || async {
        let c = claims.get(name).await?;
        let bound = c.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Bound");
        Ok(bound.then(|| c.spec.and_then(|s| s.volume_name)).flatten())
    })
    .await?;
    let pv = Api::<k8s_openapi::api::core::v1::PersistentVolume>::all(wl.clone())
        .get(&pv)
        .await?;
    Ok(pv
        .spec
        .and_then(|s| s.csi)
        .context("a CSI PV")?
        .volume_handle)
}

/// Runs Pod `name` on [`NODE`] with `claims` and waits until each claim's volume is attached
/// there (its export then lets the node's host in).
async fn attach(wl: &Client, name: &str, claims: &[&str]) -> Result<()> {
    let volumes: Vec<Value> = claims
        .iter()
        .map(|c| json!({"name": c, "persistentVolumeClaim": {"claimName": c}}))
        .collect();
    Api::<Pod>::namespaced(wl.clone(), "default")
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": name}, "spec": {
                "nodeName": NODE, "containers": [{"name": "c", "image": "busybox"}],
                "volumes": volumes}}))?,
        )
        .await?;
    let vas: Api<VolumeAttachment> = Api::all(wl.clone());
    until(&format!("{claims:?} attached"), 60, || async {
        let attached = vas
            .list(&ListParams::default())
            .await?
            .items
            .into_iter()
            .filter(|va| {
                va.spec.node_name == NODE && va.status.as_ref().is_some_and(|s| s.attached)
            })
            .count();
        // One attachment per claim of this Pod, and any of earlier Pods still running.
        Ok((attached >= claims.len()).then_some(()))
    })
    .await
}

/// The Events about `name` with `reason`, their messages.
async fn events(wl: &Client, name: &str, reason: &str) -> Result<Vec<String>> {
    Ok(Api::<Event>::namespaced(wl.clone(), "default")
        .list(&ListParams::default())
        .await?
        .items
        .into_iter()
        .filter(|e| {
            e.involved_object.name.as_deref() == Some(name) && e.reason.as_deref() == Some(reason)
        })
        .filter_map(|e| e.message)
        .collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_workload_snapshot_restores_old_bytes_and_goes_with_its_volume_snapshot() -> Result<()> {
    let World {
        store: _store,
        dir,
        pki,
        control,
        port,
        sv,
        wl,
        ..
    } = common::world("slipway-snapshots-").await?;
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(wl.clone(), "default");
    let snapshots: Api<DynamicObject> =
        Api::namespaced_with(wl.clone(), "default", &snapshotter::resource());
    let sv_snapshots: Api<DynamicObject> =
        Api::namespaced_with(sv.clone(), "team", &snapshotter::resource());
    Api::<Node>::all(wl.clone())
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": NODE, "labels": {
                "topology.slipway.dev/zone": "zone-a"}}}))?,
        )
        .await?;
    let host = host_creds(dir.path(), &pki, NODE)?;

    // Old bytes in a workload volume.
    claim(&claims, "data", Value::Null).await?;
    let data = bound(&wl, "data").await?;
    attach(&wl, "writer", &["data"]).await?;
    ensure!(
        qemu(&host, port, &data, &["write -P 0xab 0 64k", "flush"]),
        "writing the old bytes"
    );

    // A claim from a snapshot that does not exist (yet) waits, saying so once.
    claim(
        &claims,
        "early",
        json!({"apiGroup": "snapshot.storage.k8s.io", "kind": "VolumeSnapshot", "name": "later"}),
    )
    .await?;
    let said = until("the claim waits for its snapshot", 30, || async {
        let said = events(&wl, "early", "WaitingForDataSource").await?;
        Ok((!said.is_empty()).then_some(said))
    })
    .await?;
    assert!(
        said[0].contains("VolumeSnapshot \"later\" not found"),
        "{said:?}"
    );

    // The snapshot: taken through the pvCSI socket, ready, its handle recorded.
    let vs: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "snapshot.storage.k8s.io/v1", "kind": "VolumeSnapshot",
        "metadata": {"name": "snap"},
        "spec": {"source": {"persistentVolumeClaimName": "data"}}}))?;
    snapshots.create(&PostParams::default(), &vs).await?;
    let vs = until("snapshot ready", 60, || async {
        let vs = snapshots.get("snap").await?;
        Ok(snapshotter::ready(&vs).then_some(vs))
    })
    .await?;
    let uid = vs.uid().context("uid")?;
    let handle = snapshotter::handle(&vs).context("handle")?.to_owned();
    assert_eq!(vs.data["status"]["restoreSize"], GI.to_string().as_str());
    assert!(vs.data["status"]["creationTime"].is_string(), "{vs:?}");
    assert!(vs.data["status"]["error"].is_null(), "{vs:?}");
    assert!(vs.finalizers().iter().any(|f| f == snapshotter::FINALIZER));
    let sv_vs = sv_snapshots
        .get(&format!("c1-snapshot-{uid}"))
        .await
        .context("the supervisor's VolumeSnapshot")?;
    assert_eq!(
        sv_vs.annotations().get(SNAPSHOT_HANDLE_ANNOTATION),
        Some(&handle)
    );
    assert!(
        store_volumes(&control)
            .await?
            .iter()
            .any(|v| v.name == handle),
        "no block store snapshot {handle}"
    );
    assert_eq!(events(&wl, "snap", "SnapshotReady").await?.len(), 1);

    // A pass killed after CreateSnapshot, before it recorded anything: the next pass finds
    // the same snapshot by name, and takes no second one.
    let forgotten = snapshots
        .patch(
            "snap",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"annotations": {SNAPSHOT_HANDLE_ANNOTATION: null}}})),
        )
        .await?;
    assert_eq!(snapshotter::handle(&forgotten), None);
    let forgotten = snapshots
        .patch_status(
            "snap",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"readyToUse": null, "restoreSize": null}})),
        )
        .await?;
    assert!(!snapshotter::ready(&forgotten) || snapshotter::handle(&forgotten).is_some());
    let again = until("snapshot found again", 60, || async {
        let vs = snapshots.get("snap").await?;
        Ok(snapshotter::ready(&vs)
            .then(|| snapshotter::handle(&vs).map(str::to_owned))
            .flatten())
    })
    .await?;
    assert_eq!(again, handle);
    let taken = store_volumes(&control)
        .await?
        .iter()
        .filter(|v| v.name.starts_with(&format!("{data}@snap-")))
        .count();
    assert_eq!(taken, 1, "a second snapshot was taken");

    // A supervisor VolumeSnapshot whose annotation names another one's snapshot (anyone who
    // may edit it can write that) is not trusted: it gets a snapshot of its own, and deleting
    // it leaves the other alone.
    let data_uid = claims.get("data").await?.uid().context("uid")?;
    let forged: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "snapshot.storage.k8s.io/v1", "kind": "VolumeSnapshot",
        "metadata": {"name": "forged", "annotations": {SNAPSHOT_HANDLE_ANNOTATION: handle}},
        "spec": {"source": {"persistentVolumeClaimName": format!("c1-pvc-{data_uid}")}}}))?;
    let forged = sv_snapshots.create(&PostParams::default(), &forged).await?;
    let forged_uid = forged.uid().context("uid")?;
    let own = until("the forged snapshot ready", 30, || async {
        let vs = sv_snapshots.get("forged").await?;
        let h = snapshotter::handle(&vs).map(str::to_owned);
        Ok(h.filter(|h| snapshotter::ready(&vs) && *h != handle))
    })
    .await?;
    assert!(own.ends_with(&format!("@snap-{forged_uid}")), "{own}");
    sv_snapshots
        .delete("forged", &DeleteParams::default())
        .await?;
    until("the forged snapshot gone", 30, || async {
        Ok(sv_snapshots
            .get_opt("forged")
            .await?
            .is_none()
            .then_some(()))
    })
    .await?;
    let vols = store_volumes(&control).await?;
    assert!(vols.iter().any(|v| v.name == handle), "{vols:?}");
    assert!(!vols.iter().any(|v| v.name == own), "{vols:?}");

    // New bytes in the original; a restored claim has the old, a clone the new.
    ensure!(
        qemu(&host, port, &data, &["write -P 0xcd 0 64k", "flush"]),
        "overwriting"
    );
    let from_snap =
        json!({"apiGroup": "snapshot.storage.k8s.io", "kind": "VolumeSnapshot", "name": "snap"});
    claim(&claims, "restored", from_snap).await?;
    claim(
        &claims,
        "clone",
        json!({"kind": "PersistentVolumeClaim", "name": "data"}),
    )
    .await?;
    let restored = bound(&wl, "restored").await?;
    let clone = bound(&wl, "clone").await?;
    attach(&wl, "reader", &["data", "restored", "clone"]).await?;
    assert!(
        qemu(&host, port, &restored, &["read -P 0xab 0 64k"]),
        "the restored volume lacks the snapshot's bytes"
    );
    assert!(
        qemu(&host, port, &clone, &["read -P 0xcd 0 64k"]),
        "the clone lacks the source's bytes"
    );
    assert!(qemu(&host, port, &data, &["read -P 0xcd 0 64k"]));
    // Told once, many passes ago; still waiting, with no volume.
    assert_eq!(events(&wl, "early", "WaitingForDataSource").await?.len(), 1);
    let early = claims.get("early").await?;
    assert!(early.spec.and_then(|s| s.volume_name).is_none());

    // A snapshot of a claim that does not exist: status.error and an Event name it.
    let orphan: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "snapshot.storage.k8s.io/v1", "kind": "VolumeSnapshot",
        "metadata": {"name": "orphan"},
        "spec": {"source": {"persistentVolumeClaimName": "nope"}}}))?;
    snapshots.create(&PostParams::default(), &orphan).await?;
    let error = until("the orphan's error", 30, || async {
        let vs = snapshots.get("orphan").await?;
        Ok(vs.data["status"]["error"]["message"]
            .as_str()
            .map(str::to_owned))
    })
    .await?;
    assert!(
        error.contains("persistentVolumeClaimName: claim \"nope\" not found"),
        "{error}"
    );
    let orphan = snapshots.get("orphan").await?;
    assert_eq!(orphan.data["status"]["readyToUse"], false);
    assert!(orphan.data["status"]["error"]["time"].is_string());
    let said = until("the orphan's Event", 30, || async {
        let said = events(&wl, "orphan", "SourceClaimNotFound").await?;
        Ok((!said.is_empty()).then_some(said))
    })
    .await?;
    assert!(said[0].contains("\"nope\""), "{said:?}");
    assert!(
        orphan.finalizers().is_empty(),
        "nothing taken, nothing held"
    );
    snapshots.delete("orphan", &DeleteParams::default()).await?;

    // A deleted VolumeSnapshot stays while a claim restored from it remains (the block store
    // keeps a snapshot while a clone of it exists), saying so; then it goes, and its
    // supervisor snapshot and block store snapshot with it.
    let pods: Api<Pod> = Api::namespaced(wl.clone(), "default");
    for p in ["reader", "writer"] {
        pods.delete(p, &DeleteParams::default().grace_period(0))
            .await?;
    }
    snapshots.delete("snap", &DeleteParams::default()).await?;
    let error = until("the deleted snapshot's error", 30, || async {
        let vs = snapshots.get("snap").await?;
        Ok(vs.data["status"]["error"]["message"]
            .as_str()
            .map(str::to_owned))
    })
    .await?;
    assert!(
        error.contains("claims restored from it remain: restored"),
        "{error}"
    );
    until("the deleted snapshot's Event", 30, || async {
        Ok((events(&wl, "snap", "SnapshotInUse").await?.len() == 1).then_some(()))
    })
    .await?;
    assert!(
        sv_snapshots
            .get_opt(&format!("c1-snapshot-{uid}"))
            .await?
            .is_some()
    );
    claims.delete("restored", &DeleteParams::default()).await?;
    until("restored volume gone", 60, || async {
        Ok((!store_volumes(&control)
            .await?
            .iter()
            .any(|v| v.name == restored))
        .then_some(()))
    })
    .await?;
    until("VolumeSnapshot gone", 90, || async {
        Ok(snapshots.get_opt("snap").await?.is_none().then_some(()))
    })
    .await?;
    assert!(
        sv_snapshots
            .list(&ListParams::default())
            .await?
            .items
            .is_empty(),
        "a supervisor VolumeSnapshot is left"
    );
    let vols = store_volumes(&control).await?;
    assert!(!vols.iter().any(|v| v.name == handle), "{vols:?}");

    // The rest goes too: nothing left in the store.
    for c in ["early", "clone", "data"] {
        claims.delete(c, &DeleteParams::default()).await?;
    }
    until("store empty", 90, || async {
        Ok(store_volumes(&control).await?.is_empty().then_some(()))
    })
    .await?;
    Ok(())
}
