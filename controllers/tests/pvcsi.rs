//! Paravirtual volumes end to end, through real processes and sockets: a supervisor API server
//! with its volume reconciler over a real block store (`slipway-nbd`, TLS with the supervisor's
//! CA), a workload cluster API server with the pvCSI controller and its provisioner and
//! attacher (and the attach-detach controller, which attaches a Pod's claim to its node)
//! (`slipway_controllers::run` with a supervisor link), and a tonic client on the pvCSI socket
//! for the refusals. A workload claim becomes a supervisor claim and a volume; a
//! VolumeAttachment authorises exactly its host on the export (qemu-io over TLS with each
//! host's certificate); growth and deletion go through; bad requests are refused naming the
//! limit, the class, the parameter, the volume or the zone, and leave nothing.
//!
//! The world is [`common::world`]; needs `cargo build -p slipway-blockstore --bin slipway-nbd`
//! first.

mod common;

use std::collections::HashMap;

use anyhow::{Context as _, Result};
use common::{GI, World, host_creds, mount_cap, opens, qemu, store_volumes, until};
use k8s_openapi::api::core::v1::{Node, PersistentVolume, PersistentVolumeClaim, Pod};
use k8s_openapi::api::storage::v1::VolumeAttachment;
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, DynamicObject, ListParams, Patch, PatchParams, PostParams};
use serde_json::json;
use slipway_api::volumes::{NO_CLIENT, host_nbd_client};
use slipway_csi::proto::controller_client::ControllerClient;
use slipway_csi::proto::{
    CapacityRange, ControllerPublishVolumeRequest, ControllerUnpublishVolumeRequest,
    CreateSnapshotRequest, CreateVolumeRequest, DeleteSnapshotRequest, DeleteVolumeRequest,
    ListSnapshotsRequest, VolumeContentSource, volume_content_source,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn workload_claims_become_supervisor_volumes_attached_to_one_host() -> Result<()> {
    let World {
        store: _store,
        dir,
        pki,
        control,
        port,
        sv,
        wl,
        socket,
    } = common::world("slipway-pvcsi-").await?;
    // A workload claim: a supervisor claim, a volume, a PV bound in the workload cluster.
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(wl.clone(), "default");
    claims
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": "data"}, "spec": {
                "accessModes": ["ReadWriteOnce"], "storageClassName": "fast",
                "resources": {"requests": {"storage": "1Gi"}}}}))?,
        )
        .await?;
    let pv_name = until("workload claim bound", 60, || async {
        let c = claims.get("data").await?;
        let bound = c.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Bound");
        Ok(bound.then(|| c.spec.and_then(|s| s.volume_name)).flatten())
    })
    .await?;
    let uid = claims.get("data").await?.uid().context("uid")?;
    assert_eq!(pv_name, format!("pvc-{uid}"));
    let pvs: Api<PersistentVolume> = Api::all(wl.clone());
    let pv = pvs.get(&pv_name).await?;
    let csi = pv
        .spec
        .as_ref()
        .and_then(|s| s.csi.clone())
        .context("csi")?;
    let handle = csi.volume_handle.clone();
    assert_eq!(
        csi.volume_attributes.unwrap_or_default().get("nbdAddress"),
        Some(&format!("tcp:127.0.0.1:{port}"))
    );
    let sv_claims: Api<PersistentVolumeClaim> = Api::namespaced(sv.clone(), "team");
    let sv_claim = sv_claims.get(&format!("c1-pvc-{uid}")).await?;
    assert_eq!(
        sv_claim
            .labels()
            .get("slipway.dev/cluster")
            .map(String::as_str),
        Some("c1")
    );
    assert_eq!(
        sv_claim
            .spec
            .as_ref()
            .and_then(|s| s.volume_name.as_deref()),
        Some(handle.as_str())
    );
    let vols = store_volumes(&control).await?;
    let v = vols
        .iter()
        .find(|v| v.name == handle)
        .context("volume in the store")?;
    assert_eq!(v.size, GI);
    assert_eq!(v.clients, vec![NO_CLIENT.to_owned()]);

    // A Pod on host team-c1-w-0 mounts the claim: the attach-detach controller makes its
    // VolumeAttachment, the attacher publishes it, and exactly that host opens the export.
    let nodes: Api<Node> = Api::all(wl.clone());
    nodes
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": "team-c1-w-0", "labels": {
                "topology.slipway.dev/zone": "zone-a"}}}))?,
        )
        .await?;
    let pods: Api<Pod> = Api::namespaced(wl.clone(), "default");
    pods.create(
        &PostParams::default(),
        &serde_json::from_value(json!({"metadata": {"name": "user"}, "spec": {
            "nodeName": "team-c1-w-0",
            "containers": [{"name": "c", "image": "busybox"}],
            "volumes": [{"name": "data", "persistentVolumeClaim": {"claimName": "data"}}]}}))?,
    )
    .await?;
    let vas: Api<VolumeAttachment> = Api::all(wl.clone());
    let (va_name, meta) = until("attached", 60, || async {
        let found = vas
            .list(&ListParams::default())
            .await?
            .items
            .into_iter()
            .find(|va| {
                va.spec.source.persistent_volume_name.as_deref() == Some(pv_name.as_str())
                    && va.spec.node_name == "team-c1-w-0"
            });
        Ok(found.and_then(|va| {
            let name = va.metadata.name.clone()?;
            va.status
                .filter(|s| s.attached)
                .map(|s| (name, s.attachment_metadata.unwrap_or_default()))
        }))
    })
    .await?;
    assert_eq!(
        meta.get("nbdAddress"),
        Some(&format!("tcp:127.0.0.1:{port}"))
    );
    assert_eq!(meta.get("nbdClient"), Some(&host_nbd_client("team-c1-w-0")));
    let host0 = host_creds(dir.path(), &pki, "team-c1-w-0")?;
    let other = host_creds(dir.path(), &pki, "other-c2-w-0")?;
    assert!(
        opens(&host0, port, &handle),
        "the attached host was refused"
    );
    assert!(
        !opens(&other, port, &handle),
        "a second host opened the export"
    );

    // Growth: the workload claim asks for 2Gi; the volume and both PVs follow.
    claims
        .patch(
            "data",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"resources": {"requests": {"storage": "2Gi"}}}})),
        )
        .await?;
    until("volume grown", 60, || async {
        Ok(store_volumes(&control)
            .await?
            .iter()
            .any(|v| v.name == handle && v.size == 2 * GI)
            .then_some(()))
    })
    .await?;
    until("workload PV grown", 60, || async {
        let pv = pvs.get(&pv_name).await?;
        let cap = pv
            .spec
            .and_then(|s| s.capacity)
            .and_then(|c| c.get("storage").cloned());
        Ok((cap.map(|q| q.0) == Some((2 * GI).to_string())).then_some(()))
    })
    .await?;

    // Bad requests on the pvCSI socket: refused naming what is wrong, nothing left behind.
    let mut grpc = ControllerClient::new(slipway_csi::server::connect(&socket).await?);
    let count = || async {
        Ok::<_, anyhow::Error>(sv_claims.list(&ListParams::default()).await?.items.len())
    };
    let before = count().await?;
    let create = |name: &str, size: u64, params: &[(&str, &str)]| CreateVolumeRequest {
        name: name.into(),
        capacity_range: Some(CapacityRange {
            required_bytes: i64::try_from(size).unwrap_or(i64::MAX),
            limit_bytes: 0,
        }),
        volume_capabilities: vec![mount_cap()],
        parameters: params
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect(),
        ..Default::default()
    };
    let e = grpc
        .create_volume(create("pvc-big", 8 * GI, &[("svStorageClass", "fast")]))
        .await
        .expect_err("over the limit");
    assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{e:?}");
    assert!(
        e.message().contains("spec.limits.storage"),
        "{}",
        e.message()
    );
    let e = grpc
        .create_volume(create("pvc-slow", GI, &[("svStorageClass", "slow")]))
        .await
        .expect_err("class not allowed");
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
    assert!(
        e.message().contains("StorageClass \"slow\" is not allowed"),
        "{}",
        e.message()
    );
    let e = grpc
        .create_volume(create(
            "pvc-odd",
            GI,
            &[("svStorageClass", "fast"), ("replicas", "3")],
        ))
        .await
        .expect_err("unknown parameter");
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
    assert!(
        e.message().contains("unknown parameter \"replicas\""),
        "{}",
        e.message()
    );
    assert_eq!(count().await?, before, "a refused request left a claim");
    let publish = |volume: &str, node: &str| ControllerPublishVolumeRequest {
        volume_id: volume.into(),
        node_id: node.into(),
        volume_capability: Some(mount_cap()),
        ..Default::default()
    };
    let e = grpc
        .controller_publish_volume(publish("pvc-nope", "team-c1-w-0"))
        .await
        .expect_err("no such volume");
    assert_eq!(e.code(), tonic::Code::NotFound, "{e:?}");
    let e = grpc
        .controller_publish_volume(publish(&handle, "team-c1-w-1"))
        .await
        .expect_err("another zone");
    assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("zone \"zone-b\""), "{}", e.message());
    let hvas: Api<DynamicObject> = Api::namespaced_with(
        sv.clone(),
        "team",
        &kube::api::ApiResource::from_gvk_with_plural(
            &kube::api::GroupVersionKind::gvk("slipway.dev", "v1alpha1", "HostVolumeAttachment"),
            "hostvolumeattachments",
        ),
    );
    until("refused attachment removed", 30, || async {
        let left = hvas.list(&ListParams::default()).await?.items;
        Ok((left.len() == 1).then_some(()))
    })
    .await?;
    // Snapshots: taken in the supervisor, restored into a new volume with the old content.
    assert!(qemu(
        &host0,
        port,
        &handle,
        &["write -P 0xab 0 64k", "flush"]
    ));
    let snap_req = || CreateSnapshotRequest {
        source_volume_id: handle.clone(),
        name: "snapshot-1".into(),
        ..Default::default()
    };
    let snap = grpc
        .create_snapshot(snap_req())
        .await?
        .into_inner()
        .snapshot
        .context("snapshot")?;
    assert!(snap.ready_to_use);
    assert_eq!(snap.source_volume_id, handle);
    assert_eq!(snap.size_bytes, i64::try_from(2 * GI)?);
    // Repeated, the same answer.
    let again = grpc
        .create_snapshot(snap_req())
        .await?
        .into_inner()
        .snapshot
        .context("snapshot")?;
    assert_eq!(again.snapshot_id, snap.snapshot_id);
    let listed = grpc
        .list_snapshots(ListSnapshotsRequest::default())
        .await?
        .into_inner()
        .entries;
    assert_eq!(listed.len(), 1);
    assert!(qemu(
        &host0,
        port,
        &handle,
        &["write -P 0xcd 0 64k", "flush"]
    ));
    let mut from_snap = create("pvc-restored", 2 * GI, &[("svStorageClass", "fast")]);
    from_snap.volume_content_source = Some(VolumeContentSource {
        r#type: Some(volume_content_source::Type::Snapshot(
            volume_content_source::SnapshotSource {
                snapshot_id: snap.snapshot_id.clone(),
            },
        )),
    });
    let restored = grpc
        .create_volume(from_snap)
        .await?
        .into_inner()
        .volume
        .context("restored volume")?;
    let ctx = grpc
        .controller_publish_volume(publish(&restored.volume_id, "team-c1-w-0"))
        .await?
        .into_inner()
        .publish_context;
    assert_eq!(ctx.get("nbdClient"), Some(&host_nbd_client("team-c1-w-0")));
    assert!(
        qemu(&host0, port, &restored.volume_id, &["read -P 0xab 0 64k"]),
        "the restored volume lacks the snapshot's content"
    );
    assert!(qemu(&host0, port, &handle, &["read -P 0xcd 0 64k"]));
    grpc.controller_unpublish_volume(ControllerUnpublishVolumeRequest {
        volume_id: restored.volume_id.clone(),
        node_id: "team-c1-w-0".into(),
        secrets: HashMap::new(),
    })
    .await?;
    grpc.delete_volume(DeleteVolumeRequest {
        volume_id: restored.volume_id.clone(),
        secrets: HashMap::new(),
    })
    .await?;
    grpc.delete_snapshot(DeleteSnapshotRequest {
        snapshot_id: snap.snapshot_id.clone(),
        secrets: HashMap::new(),
    })
    .await?;
    let vols = store_volumes(&control).await?;
    assert!(
        !vols
            .iter()
            .any(|v| v.name == snap.snapshot_id || v.name == restored.volume_id),
        "{vols:?}"
    );
    // Deleting a volume that does not exist succeeds (CSI spec).
    grpc.delete_volume(DeleteVolumeRequest {
        volume_id: "pvc-nope".into(),
        secrets: HashMap::new(),
    })
    .await?;

    // Detach: the Pod goes, then its VolumeAttachment, and the host from the allow-list.
    pods.delete("user", &DeleteParams::default().grace_period(0))
        .await?;
    until("VolumeAttachment gone", 60, || async {
        Ok(vas.get_opt(&va_name).await?.is_none().then_some(()))
    })
    .await?;
    let vols = store_volumes(&control).await?;
    let v = vols.iter().find(|v| v.name == handle).context("volume")?;
    assert_eq!(v.clients, vec![NO_CLIENT.to_owned()]);
    assert!(
        !opens(&host0, port, &handle),
        "a detached host still opens it"
    );
    assert!(hvas.list(&ListParams::default()).await?.items.is_empty());

    // Deleting the workload claim deletes the PV, the supervisor claim and the volume.
    claims.delete("data", &DeleteParams::default()).await?;
    until("volume gone", 60, || async {
        Ok(store_volumes(&control).await?.is_empty().then_some(()))
    })
    .await?;
    until("PVs and claims gone", 60, || async {
        let wl_pvs = pvs.list(&ListParams::default()).await?.items.len();
        Ok((wl_pvs == 0 && count().await? == 0).then_some(()))
    })
    .await?;
    Ok(())
}
