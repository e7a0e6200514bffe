//! The Identity and Controller services through their Unix socket, with a real tonic client,
//! against a real block store daemon: every RPC's lifecycle, its error codes, and that each RPC
//! repeated gives the same answer. Volume contents are checked with qemu-io over NBD.

mod common;

use std::collections::HashMap;
use std::sync::Arc;

use common::{TempDir, blockstore, qemu_io, serve};
use slipway_csi::CsiError;
use slipway_csi::backend::{BackendVolume, BlockstoreBackend, VolumeBackend};
use slipway_csi::controller::{ControllerConfig, ControllerService};
use slipway_csi::identity::{DRIVER_NAME, IdentityService, ZONE_KEY};
use slipway_csi::proto::controller_client::ControllerClient;
use slipway_csi::proto::controller_server::ControllerServer;
use slipway_csi::proto::controller_service_capability::{self, rpc};
use slipway_csi::proto::identity_client::IdentityClient;
use slipway_csi::proto::identity_server::IdentityServer;
use slipway_csi::proto::volume_capability::{AccessMode, AccessType, MountVolume, access_mode};
use slipway_csi::proto::volume_content_source::{SnapshotSource, Type as Src, VolumeSource};
use slipway_csi::proto::*;
use tonic::Code;
use tonic::transport::Channel;

const MIB: i64 = 1 << 20;
const POOL: u64 = 1 << 30;

fn mount_cap() -> VolumeCapability {
    VolumeCapability {
        access_mode: Some(AccessMode {
            mode: access_mode::Mode::SingleNodeWriter as i32,
        }),
        access_type: Some(AccessType::Mount(MountVolume {
            fs_type: "ext4".into(),
            mount_flags: vec![],
        })),
    }
}

fn create_req(name: &str, size: i64) -> CreateVolumeRequest {
    CreateVolumeRequest {
        name: name.into(),
        capacity_range: Some(CapacityRange {
            required_bytes: size,
            limit_bytes: 0,
        }),
        volume_capabilities: vec![mount_cap()],
        ..Default::default()
    }
}

fn code<T: std::fmt::Debug>(r: Result<tonic::Response<T>, tonic::Status>) -> (Code, String) {
    match r {
        Ok(v) => panic!("expected an error, got {v:?}"),
        Err(s) => (s.code(), s.message().to_owned()),
    }
}

async fn controller(
    dir: &TempDir,
    backend: impl VolumeBackend,
) -> (ControllerClient<Channel>, IdentityClient<Channel>) {
    let svc = ControllerService::new(
        backend,
        ControllerConfig {
            nbd_address: format!("unix:{}", dir.path().join("nbd.sock").display()),
            zone: "zone-a".into(),
            capacity: Some(POOL),
        },
    );
    let router = tonic::transport::Server::builder()
        .add_service(IdentityServer::new(IdentityService { controller: true }))
        .add_service(ControllerServer::new(svc));
    let (_, channel, _task) = serve(dir.path(), "controller", router).await;
    (
        ControllerClient::new(channel.clone()),
        IdentityClient::new(channel),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identity_answers_name_capabilities_and_probe() {
    let dir = TempDir::new("identity");
    let _bs = blockstore(dir.path()).await;
    let backend = BlockstoreBackend::new(dir.path().join("ctl.sock"));
    let (_, mut id) = controller(&dir, backend).await;
    for _ in 0..2 {
        let info = id
            .get_plugin_info(GetPluginInfoRequest {})
            .await
            .expect("info")
            .into_inner();
        assert_eq!(info.name, DRIVER_NAME);
        assert_eq!(info.vendor_version, env!("CARGO_PKG_VERSION"));
        let caps = id
            .get_plugin_capabilities(GetPluginCapabilitiesRequest {})
            .await
            .expect("caps")
            .into_inner()
            .capabilities;
        let has = |t| caps.iter().any(|c| c.r#type == Some(t));
        assert!(has(plugin_capability::Type::Service(
            plugin_capability::Service {
                r#type: plugin_capability::service::Type::ControllerService as i32
            }
        )));
        assert!(has(plugin_capability::Type::VolumeExpansion(
            plugin_capability::VolumeExpansion {
                r#type: plugin_capability::volume_expansion::Type::Online as i32
            }
        )));
        let probe = id.probe(ProbeRequest {}).await.expect("probe").into_inner();
        assert_eq!(probe.ready, Some(true));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn volume_lifecycle_is_idempotent_with_spec_error_codes() {
    let dir = TempDir::new("ctl-vol");
    let _bs = blockstore(dir.path()).await;
    let (mut c, _) = controller(&dir, BlockstoreBackend::new(dir.path().join("ctl.sock"))).await;

    // Capabilities: exactly what works (no ControllerPublish: exports are not yet authorised).
    let caps: Vec<i32> = c
        .controller_get_capabilities(ControllerGetCapabilitiesRequest {})
        .await
        .expect("caps")
        .into_inner()
        .capabilities
        .into_iter()
        .filter_map(|c| {
            c.r#type
                .map(|controller_service_capability::Type::Rpc(r)| r.r#type)
        })
        .collect();
    for t in [
        rpc::Type::CreateDeleteVolume,
        rpc::Type::ListVolumes,
        rpc::Type::GetCapacity,
        rpc::Type::CreateDeleteSnapshot,
        rpc::Type::ListSnapshots,
        rpc::Type::CloneVolume,
        rpc::Type::ExpandVolume,
        rpc::Type::GetVolume,
    ] {
        assert!(caps.contains(&(t as i32)), "{t:?} missing from {caps:?}");
    }
    assert!(!caps.contains(&(rpc::Type::PublishUnpublishVolume as i32)));
    let (code_, _) = code(
        c.controller_publish_volume(ControllerPublishVolumeRequest::default())
            .await,
    );
    assert_eq!(code_, Code::Unimplemented);

    let cap0 = c
        .get_capacity(GetCapacityRequest::default())
        .await
        .expect("capacity")
        .into_inner()
        .available_capacity;
    assert_eq!(cap0, POOL as i64);

    // Create, then the same request again: the same volume.
    let first = c
        .create_volume(create_req("pvc-a", 10 * MIB + 1))
        .await
        .expect("create")
        .into_inner()
        .volume
        .expect("volume");
    assert_eq!(first.volume_id, "pvc-a");
    assert_eq!(first.capacity_bytes % 4096, 0);
    assert!(first.capacity_bytes > 10 * MIB);
    assert_eq!(
        first.accessible_topology[0]
            .segments
            .get(ZONE_KEY)
            .map(String::as_str),
        Some("zone-a")
    );
    assert_eq!(
        first.volume_context.get("nbdAddress").map(String::as_str),
        Some(format!("unix:{}", dir.path().join("nbd.sock").display()).as_str())
    );
    let again = c
        .create_volume(create_req("pvc-a", 10 * MIB + 1))
        .await
        .expect("create again")
        .into_inner()
        .volume;
    assert_eq!(again.as_ref(), Some(&first));
    // The block store really has it, of that size.
    let info = common::run(
        "qemu-img",
        &[
            "info",
            &format!(
                "nbd+unix:///pvc-a?socket={}",
                dir.path().join("nbd.sock").display()
            ),
        ],
    );
    assert!(
        info.contains(&format!("({} bytes)", first.capacity_bytes)),
        "{info}"
    );

    // Same name, incompatible size: ALREADY_EXISTS.
    let (k, msg) = code(c.create_volume(create_req("pvc-a", 100 * MIB)).await);
    assert_eq!(k, Code::AlreadyExists, "{msg}");

    // Capacity went down by the volume's size.
    let cap1 = c
        .get_capacity(GetCapacityRequest::default())
        .await
        .expect("capacity")
        .into_inner()
        .available_capacity;
    assert_eq!(cap1, cap0 - first.capacity_bytes);
    let other_zone = c
        .get_capacity(GetCapacityRequest {
            accessible_topology: Some(Topology {
                segments: HashMap::from([(ZONE_KEY.into(), "zone-b".into())]),
            }),
            ..Default::default()
        })
        .await
        .expect("capacity")
        .into_inner()
        .available_capacity;
    assert_eq!(other_zone, 0);

    // Bad input names the field; nothing is created.
    let mut bad = create_req("pvc-bad", MIB);
    bad.parameters.insert("replicas".into(), "3".into());
    let (k, msg) = code(c.create_volume(bad).await);
    assert_eq!(k, Code::InvalidArgument);
    assert!(
        msg.starts_with("parameters:") && msg.contains("replicas"),
        "{msg}"
    );
    let (k, msg) = code(c.create_volume(create_req("", MIB)).await);
    assert_eq!(
        (k, msg.starts_with("name:")),
        (Code::InvalidArgument, true),
        "{msg}"
    );
    let mut bad = create_req("pvc-bad", MIB);
    bad.volume_capabilities.clear();
    let (k, msg) = code(c.create_volume(bad).await);
    assert_eq!(k, Code::InvalidArgument);
    assert!(msg.starts_with("volume_capabilities:"), "{msg}");
    let mut bad = create_req("pvc-bad", 3 * MIB);
    bad.capacity_range = Some(CapacityRange {
        required_bytes: 5000,
        limit_bytes: 6000,
    });
    let (k, msg) = code(c.create_volume(bad).await);
    assert_eq!(k, Code::OutOfRange, "{msg}");
    let (k, msg) = code(
        c.create_volume(create_req("pvc-huge", 2 * POOL as i64))
            .await,
    );
    assert_eq!(k, Code::ResourceExhausted, "{msg}");
    let mut bad = create_req("pvc-bad", MIB);
    bad.accessibility_requirements = Some(TopologyRequirement {
        requisite: vec![Topology {
            segments: HashMap::from([(ZONE_KEY.into(), "zone-b".into())]),
        }],
        preferred: vec![],
    });
    let (k, msg) = code(c.create_volume(bad).await);
    assert_eq!(k, Code::ResourceExhausted, "{msg}");
    let mut bad = create_req("pvc-bad", MIB);
    bad.volume_content_source = Some(VolumeContentSource {
        r#type: Some(Src::Snapshot(SnapshotSource {
            snapshot_id: "nope@nope".into(),
        })),
    });
    let (k, msg) = code(c.create_volume(bad).await);
    assert_eq!(k, Code::NotFound, "{msg}");

    // ListVolumes sees exactly pvc-a; paging; a foreign token is ABORTED.
    c.create_volume(create_req("pvc-b", MIB))
        .await
        .expect("create b");
    let list = |max, token: &str| ListVolumesRequest {
        max_entries: max,
        starting_token: token.into(),
    };
    let all = c
        .list_volumes(list(0, ""))
        .await
        .expect("list")
        .into_inner();
    let ids: Vec<_> = all
        .entries
        .iter()
        .filter_map(|e| e.volume.as_ref().map(|v| v.volume_id.as_str()))
        .collect();
    assert_eq!(ids, ["pvc-a", "pvc-b"]);
    assert_eq!(
        all,
        c.list_volumes(list(0, ""))
            .await
            .expect("list")
            .into_inner()
    );
    let p1 = c
        .list_volumes(list(1, ""))
        .await
        .expect("page")
        .into_inner();
    assert_eq!(p1.entries.len(), 1);
    let p2 = c
        .list_volumes(list(1, &p1.next_token))
        .await
        .expect("page 2")
        .into_inner();
    assert_eq!(
        p2.entries[0].volume.as_ref().map(|v| v.volume_id.as_str()),
        Some("pvc-b")
    );
    assert!(p2.next_token.is_empty());
    assert_eq!(
        code(c.list_volumes(list(1, "bogus")).await).0,
        Code::Aborted
    );

    // ControllerGetVolume and ValidateVolumeCapabilities.
    let got = c
        .controller_get_volume(ControllerGetVolumeRequest {
            volume_id: "pvc-a".into(),
        })
        .await
        .expect("get")
        .into_inner();
    assert_eq!(got.volume.as_ref(), Some(&first));
    assert_eq!(
        got.status
            .and_then(|s| s.volume_condition)
            .map(|c| c.abnormal),
        Some(false)
    );
    assert_eq!(
        code(
            c.controller_get_volume(ControllerGetVolumeRequest {
                volume_id: "pvc-zz".into()
            })
            .await
        )
        .0,
        Code::NotFound
    );
    let v = c
        .validate_volume_capabilities(ValidateVolumeCapabilitiesRequest {
            volume_id: "pvc-a".into(),
            volume_capabilities: vec![mount_cap()],
            ..Default::default()
        })
        .await
        .expect("validate")
        .into_inner();
    assert!(v.confirmed.is_some(), "{}", v.message);
    let mut multi = mount_cap();
    multi.access_mode = Some(AccessMode {
        mode: access_mode::Mode::MultiNodeMultiWriter as i32,
    });
    let v = c
        .validate_volume_capabilities(ValidateVolumeCapabilitiesRequest {
            volume_id: "pvc-a".into(),
            volume_capabilities: vec![multi],
            ..Default::default()
        })
        .await
        .expect("validate")
        .into_inner();
    assert!(v.confirmed.is_none());
    assert!(
        v.message.contains("MULTI_NODE_MULTI_WRITER"),
        "{}",
        v.message
    );

    // Expand: grows, repeats give the same answer, smaller asks keep the size.
    let expand = |size: i64| ControllerExpandVolumeRequest {
        volume_id: "pvc-b".into(),
        capacity_range: Some(CapacityRange {
            required_bytes: size,
            limit_bytes: 0,
        }),
        volume_capability: Some(mount_cap()),
        ..Default::default()
    };
    let e1 = c
        .controller_expand_volume(expand(8 * MIB))
        .await
        .expect("expand")
        .into_inner();
    assert_eq!(
        (e1.capacity_bytes, e1.node_expansion_required),
        (8 * MIB, true)
    );
    let e2 = c
        .controller_expand_volume(expand(8 * MIB))
        .await
        .expect("again")
        .into_inner();
    assert_eq!(e1, e2);
    let e3 = c
        .controller_expand_volume(expand(MIB))
        .await
        .expect("smaller")
        .into_inner();
    assert_eq!(e3.capacity_bytes, 8 * MIB);
    let info = common::run(
        "qemu-img",
        &[
            "info",
            &format!(
                "nbd+unix:///pvc-b?socket={}",
                dir.path().join("nbd.sock").display()
            ),
        ],
    );
    assert!(info.contains(&format!("({} bytes)", 8 * MIB)), "{info}");
    let mut missing = expand(8 * MIB);
    missing.volume_id = "pvc-zz".into();
    assert_eq!(
        code(c.controller_expand_volume(missing).await).0,
        Code::NotFound
    );
    let mut capped = expand(8 * MIB);
    capped.capacity_range = Some(CapacityRange {
        required_bytes: MIB,
        limit_bytes: 2 * MIB,
    });
    assert_eq!(
        code(c.controller_expand_volume(capped).await).0,
        Code::OutOfRange
    );
    let mut huge = expand(2 * POOL as i64);
    huge.volume_id = "pvc-b".into();
    assert_eq!(
        code(c.controller_expand_volume(huge).await).0,
        Code::OutOfRange
    );

    // Delete, twice: both succeed; the volume is gone from the list and the store.
    for _ in 0..2 {
        c.delete_volume(DeleteVolumeRequest {
            volume_id: "pvc-b".into(),
            ..Default::default()
        })
        .await
        .expect("delete");
    }
    let left = c
        .list_volumes(list(0, ""))
        .await
        .expect("list")
        .into_inner();
    assert_eq!(left.entries.len(), 1);
    let (k, msg) = code(
        c.delete_volume(DeleteVolumeRequest {
            volume_id: "a/b".into(),
            ..Default::default()
        })
        .await,
    );
    assert_eq!(k, Code::InvalidArgument);
    assert!(msg.starts_with("volume_id:"), "{msg}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshots_and_clones_carry_the_data() {
    let dir = TempDir::new("ctl-snap");
    let _bs = blockstore(dir.path()).await;
    let (mut c, _) = controller(&dir, BlockstoreBackend::new(dir.path().join("ctl.sock"))).await;
    c.create_volume(create_req("src", 4 * MIB))
        .await
        .expect("create");
    qemu_io(dir.path(), "src", &["write -P 0xa5 0 1M"]);

    let snap_req = |name: &str, vol: &str| CreateSnapshotRequest {
        source_volume_id: vol.into(),
        name: name.into(),
        ..Default::default()
    };
    let s1 = c
        .create_snapshot(snap_req("snap-1", "src"))
        .await
        .expect("snapshot")
        .into_inner()
        .snapshot
        .expect("snapshot");
    assert_eq!(
        (s1.source_volume_id.as_str(), s1.ready_to_use),
        ("src", true)
    );
    assert_eq!(s1.size_bytes, 4 * MIB);
    let s1b = c
        .create_snapshot(snap_req("snap-1", "src"))
        .await
        .expect("snapshot again")
        .into_inner()
        .snapshot;
    assert_eq!(s1b.as_ref(), Some(&s1));
    // Written after the snapshot: the snapshot and its clone keep the old bytes.
    qemu_io(dir.path(), "src", &["write -P 0x3c 0 1M"]);

    c.create_volume(create_req("other", MIB))
        .await
        .expect("other");
    let (k, msg) = code(c.create_snapshot(snap_req("snap-1", "other")).await);
    assert_eq!(k, Code::AlreadyExists, "{msg}");
    assert_eq!(
        code(c.create_snapshot(snap_req("snap-x", "nope")).await).0,
        Code::NotFound
    );
    let (k, msg) = code(c.create_snapshot(snap_req("", "src")).await);
    assert_eq!(
        (k, msg.starts_with("name:")),
        (Code::InvalidArgument, true),
        "{msg}"
    );

    // ListSnapshots: by ID, by source, all; repeated, the same.
    let list = |id: &str, src: &str| ListSnapshotsRequest {
        snapshot_id: id.into(),
        source_volume_id: src.into(),
        ..Default::default()
    };
    let by_id = c
        .list_snapshots(list(&s1.snapshot_id, ""))
        .await
        .expect("list")
        .into_inner();
    assert_eq!(by_id.entries.len(), 1);
    assert_eq!(by_id.entries[0].snapshot.as_ref(), Some(&s1));
    let by_src = c
        .list_snapshots(list("", "src"))
        .await
        .expect("list")
        .into_inner();
    assert_eq!(by_src, by_id);
    assert!(
        c.list_snapshots(list("", "other"))
            .await
            .expect("list")
            .into_inner()
            .entries
            .is_empty()
    );

    // Restore the snapshot into a new, larger volume: old content, new size; repeat: same.
    let mut restore = create_req("restored", 8 * MIB);
    restore.volume_content_source = Some(VolumeContentSource {
        r#type: Some(Src::Snapshot(SnapshotSource {
            snapshot_id: s1.snapshot_id.clone(),
        })),
    });
    let r1 = c
        .create_volume(restore.clone())
        .await
        .expect("restore")
        .into_inner();
    let r2 = c
        .create_volume(restore.clone())
        .await
        .expect("restore again")
        .into_inner();
    assert_eq!(r1, r2);
    let rv = r1.volume.expect("volume");
    assert_eq!(rv.capacity_bytes, 8 * MIB);
    assert_eq!(rv.content_source, restore.volume_content_source);
    qemu_io(dir.path(), "restored", &["read -P 0xa5 0 1M"]);
    // The same name from another source is not the same volume.
    let mut plain = create_req("restored", 8 * MIB);
    plain.volume_content_source = None;
    assert_eq!(code(c.create_volume(plain).await).0, Code::AlreadyExists);

    // Clone a volume: its current bytes.
    let mut clone = create_req("cloned", 4 * MIB);
    clone.volume_content_source = Some(VolumeContentSource {
        r#type: Some(Src::Volume(VolumeSource {
            volume_id: "src".into(),
        })),
    });
    let c1 = c
        .create_volume(clone.clone())
        .await
        .expect("clone")
        .into_inner();
    assert_eq!(
        c1,
        c.create_volume(clone.clone())
            .await
            .expect("clone again")
            .into_inner()
    );
    assert_eq!(
        c1.volume.and_then(|v| v.content_source),
        clone.volume_content_source
    );
    qemu_io(dir.path(), "cloned", &["read -P 0x3c 0 1M"]);
    // The clone's hidden source snapshot is not a CSI snapshot.
    assert_eq!(
        c.list_snapshots(list("", "src"))
            .await
            .expect("list")
            .into_inner()
            .entries
            .len(),
        1
    );

    // Deleting what others depend on is refused; in order, everything goes, repeatably.
    let del_snap = |id: &str| DeleteSnapshotRequest {
        snapshot_id: id.into(),
        ..Default::default()
    };
    let del_vol = |id: &str| DeleteVolumeRequest {
        volume_id: id.into(),
        ..Default::default()
    };
    assert_eq!(
        code(c.delete_snapshot(del_snap(&s1.snapshot_id)).await).0,
        Code::FailedPrecondition
    );
    assert_eq!(
        code(c.delete_volume(del_vol("src")).await).0,
        Code::FailedPrecondition
    );
    for _ in 0..2 {
        c.delete_volume(del_vol("restored"))
            .await
            .expect("delete restored");
        c.delete_snapshot(del_snap(&s1.snapshot_id))
            .await
            .expect("delete snapshot");
        c.delete_volume(del_vol("cloned"))
            .await
            .expect("delete clone");
        c.delete_volume(del_vol("src")).await.expect("delete src");
        c.delete_volume(del_vol("other"))
            .await
            .expect("delete other");
    }
    let store = slipway_blockstore::control::call(
        &dir.path().join("ctl.sock"),
        &slipway_blockstore::control::ControlRequest::List {},
    )
    .await
    .expect("store list");
    assert!(
        store.volumes.is_empty(),
        "left in the store: {:?}",
        store.volumes
    );
}

/// The real backend, with `list` held at a gate so a second request meets the first in flight.
struct Gated {
    inner: BlockstoreBackend,
    entered: Arc<tokio::sync::Notify>,
    gate: Arc<tokio::sync::Semaphore>,
}

impl VolumeBackend for Gated {
    async fn list(&self) -> Result<Vec<BackendVolume>, CsiError> {
        self.entered.notify_one();
        let _permit = self
            .gate
            .acquire()
            .await
            .map_err(|_| CsiError::Aborted("gate".into()))?;
        self.inner.list().await
    }
    async fn create(&self, name: &str, size: u64) -> Result<(), CsiError> {
        self.inner.create(name, size).await
    }
    async fn snapshot(&self, volume: &str, name: &str) -> Result<(), CsiError> {
        self.inner.snapshot(volume, name).await
    }
    async fn clone_snapshot(&self, snapshot: &str, name: &str) -> Result<(), CsiError> {
        self.inner.clone_snapshot(snapshot, name).await
    }
    async fn resize(&self, name: &str, size: u64) -> Result<(), CsiError> {
        self.inner.resize(name, size).await
    }
    async fn delete(&self, name: &str) -> Result<(), CsiError> {
        self.inner.delete(name).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_operations_on_one_volume_are_aborted() {
    let dir = TempDir::new("ctl-abort");
    let _bs = blockstore(dir.path()).await;
    let entered = Arc::new(tokio::sync::Notify::new());
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let backend = Gated {
        inner: BlockstoreBackend::new(dir.path().join("ctl.sock")),
        entered: Arc::clone(&entered),
        gate: Arc::clone(&gate),
    };
    let (c, _) = controller(&dir, backend).await;
    let mut first = c.clone();
    let pending = tokio::spawn(async move { first.create_volume(create_req("pvc-c", MIB)).await });
    entered.notified().await;
    let mut second = c.clone();
    let (k, msg) = code(second.create_volume(create_req("pvc-c", MIB)).await);
    assert_eq!(k, Code::Aborted, "{msg}");
    let (k, _) = code(
        second
            .delete_volume(DeleteVolumeRequest {
                volume_id: "pvc-c".into(),
                ..Default::default()
            })
            .await,
    );
    assert_eq!(k, Code::Aborted);
    gate.add_permits(100);
    let done = pending.await.expect("join").expect("first create");
    assert_eq!(
        done.into_inner().volume.map(|v| v.volume_id).as_deref(),
        Some("pvc-c")
    );
    // Once it finished, the retry succeeds with the same answer.
    second
        .create_volume(create_req("pvc-c", MIB))
        .await
        .expect("retry");
}
