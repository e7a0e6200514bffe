//! Paravirtual volumes end to end, through real processes and sockets: a supervisor API server
//! with its volume reconciler over a real block store (`slipway-nbd`, TLS with the supervisor's
//! CA), a workload cluster API server with the pvCSI controller and its provisioner and
//! attacher (`slipway_controllers::run` with a supervisor link), and a tonic client on the
//! pvCSI socket for the refusals. A workload claim becomes a supervisor claim and a volume; a
//! VolumeAttachment authorises exactly its host on the export (qemu-io over TLS with each
//! host's certificate); growth and deletion go through; bad requests are refused naming the
//! limit, the class, the parameter, the volume or the zone, and leave nothing.
//!
//! Needs `cargo build -p slipway-blockstore --bin slipway-nbd` first.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail, ensure};
use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim};
use k8s_openapi::api::storage::v1::VolumeAttachment;
use kube::api::{Api, DeleteParams, DynamicObject, ListParams, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, ResourceExt};
use serde_json::json;
use slipway_api::volumes::{NO_CLIENT, host_nbd_client};
use slipway_blockstore::control::{self, ControlRequest};
use slipway_controllers::{Options, SupervisorLink};
use slipway_csi::proto::controller_client::ControllerClient;
use slipway_csi::proto::{
    CapacityRange, ControllerPublishVolumeRequest, CreateVolumeRequest, DeleteVolumeRequest,
};
use slipway_supervisor::admission::AdmissionConfig;
use slipway_supervisor::auth::{CLUSTER_USER_PREFIX, CLUSTERS};
use slipway_supervisor::controllers::volume_plan::BlockStoreRef;
use slipway_supervisor::controllers::volumes::VolumeReconciler;
use slipway_supervisor::server::limits::ConnectionLimits;
use slipway_supervisor::server::{Server, ServerConfig, StoreConfig};
use slipway_supervisor::tls::{ADMIN_DAYS, Credential, Pki};

const GI: u64 = 1 << 30;

/// A child process killed on drop.
struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn api_server(dir: &Path) -> Result<(Client, PathBuf, std::net::SocketAddr)> {
    let server = Server::bind(ServerConfig {
        data_dir: dir.to_path_buf(),
        listen: "127.0.0.1:0".parse()?,
        store: StoreConfig::Redb,
        token_file: None,
        audit_log: None,
        watch_history: slipway_supervisor::store::redb::DEFAULT_HISTORY,
        admission: AdmissionConfig::default(),
        limits: ConnectionLimits::default(),
        advertise: Vec::new(),
    })
    .await?;
    let controllers = server.controllers_kubeconfig().to_owned();
    let addr = server.local_addr();
    tokio::spawn(server.serve(std::future::pending()));
    let kubeconfig = Kubeconfig::read_from(dir.join("admin.kubeconfig"))?;
    let config =
        kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default()).await?;
    Ok((Client::try_from(config)?, controllers, addr))
}

fn nbd_binary() -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let bin = exe
        .parent()
        .and_then(Path::parent)
        .context("target dir")?
        .join("slipway-nbd");
    ensure!(
        bin.exists(),
        "{} is missing: cargo build -p slipway-blockstore --bin slipway-nbd",
        bin.display()
    );
    Ok(bin)
}

/// A block store with TLS from the supervisor's CA: (guard, control socket, port).
fn block_store(dir: &Path, pki: &Pki) -> Result<(Child, PathBuf, u16)> {
    let (cert, key) = pki.issue_server(&["localhost".into(), "127.0.0.1".into()], ADMIN_DAYS)?;
    std::fs::write(dir.join("bs.crt"), cert)?;
    std::fs::write(dir.join("bs.key"), key)?;
    let control = dir.join("bs.sock");
    let mut child = Command::new(nbd_binary()?)
        .arg("serve")
        .arg("--data-dir")
        .arg(dir.join("bs-data"))
        .arg("--control")
        .arg(&control)
        .args(["--listen", "127.0.0.1:0", "--tls-cert"])
        .arg(dir.join("bs.crt"))
        .arg("--tls-key")
        .arg(dir.join("bs.key"))
        .arg("--tls-client-ca")
        .arg(pki.ca_cert())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(dir.join("blockstore.log"))?)
        .spawn()?;
    let stdout = child.stdout.take().context("stdout")?;
    let guard = Child(child);
    let mut line = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(stdout), &mut line)?;
    let port = line
        .split_whitespace()
        .find_map(|p| p.strip_prefix("tcp="))
        .and_then(|a| a.rsplit(':').next())
        .and_then(|p| p.parse().ok())
        .with_context(|| format!("no tcp= in {line:?}"))?;
    Ok((guard, control, port))
}

fn host_creds(dir: &Path, pki: &Pki, host: &str) -> Result<String> {
    let d = dir.join(format!("creds-{host}"));
    std::fs::create_dir_all(&d)?;
    let (cert, key) = pki.issue_client_named(
        &format!("system:host:{host}"),
        Some("system:slipway:hosts"),
        &[host_nbd_client(host)],
        ADMIN_DAYS,
    )?;
    std::fs::copy(pki.ca_cert(), d.join("ca-cert.pem"))?;
    std::fs::write(d.join("client-cert.pem"), cert)?;
    std::fs::write(d.join("client-key.pem"), key)?;
    Ok(d.display().to_string())
}

/// Whether qemu-io, as the host whose credentials are in `creds`, reads the export.
fn opens(creds: &str, port: u16, export: &str) -> bool {
    let object = format!("tls-creds-x509,id=tls0,endpoint=client,dir={creds}");
    let image = format!(
        "driver=nbd,server.type=inet,server.host=localhost,server.port={port},export={export},tls-creds=tls0"
    );
    let Ok(out) = Command::new("qemu-io")
        .args([
            "--object",
            &object,
            "--image-opts",
            "-c",
            "read 0 4k",
            &image,
        ])
        .output()
    else {
        return false;
    };
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out.status.success() && !text.contains("failed") && !text.contains("error")
}

async fn store_volumes(control: &Path) -> Result<Vec<slipway_blockstore::store::VolumeInfo>> {
    Ok(control::call(control, &ControlRequest::List {})
        .await?
        .volumes)
}

/// Polls `f` every 100 ms until it returns Some or `secs` pass.
async fn until<T, F, Fut>(what: &str, secs: u64, mut f: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Option<T>>>,
{
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = f().await? {
            return Ok(v);
        }
        if Instant::now() > deadline {
            bail!("timed out after {secs}s waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn apply(client: &Client, yaml: serde_json::Value) -> Result<()> {
    let obj: DynamicObject = serde_json::from_value(yaml)?;
    let gvk = kube::api::GroupVersionKind::try_from(obj.types.as_ref().context("types")?)?;
    let kind = gvk.kind.to_lowercase();
    let plural = if kind.ends_with('s') {
        format!("{kind}es")
    } else {
        format!("{kind}s")
    };
    let ar = kube::api::ApiResource::from_gvk_with_plural(&gvk, &plural);
    let api: Api<DynamicObject> = match &obj.metadata.namespace {
        Some(ns) => Api::namespaced_with(client.clone(), ns, &ar),
        None => Api::all_with(client.clone(), &ar),
    };
    api.create(&PostParams::default(), &obj).await?;
    Ok(())
}

fn mount_cap() -> slipway_csi::proto::VolumeCapability {
    slipway_controllers::pvcsi::capability(None, &["ReadWriteOnce".into()])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn workload_claims_become_supervisor_volumes_attached_to_one_host() -> Result<()> {
    let dir = tempfile::Builder::new()
        .prefix("slipway-pvcsi-")
        .tempdir()?;
    let sup_dir = dir.path().join("sup");
    std::fs::create_dir_all(&sup_dir)?;
    let pki = Pki::new(&sup_dir);
    pki.ensure(&[])?;
    let (_bs, control, port) = block_store(dir.path(), &pki)?;
    let (sv, controllers_kubeconfig, sv_addr) = api_server(&sup_dir).await?;
    let reconciler = VolumeReconciler::connect(
        &controllers_kubeconfig,
        vec![BlockStoreRef {
            zone: "zone-a".into(),
            control: control.clone(),
            nbd: format!("tcp:127.0.0.1:{port}"),
        }],
    )
    .await?;
    tokio::spawn(reconciler.run());
    for obj in [
        json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "team"},
               "spec": {"limits": {"storage": "4Gi"}, "storageClasses": ["fast"]}}),
        json!({"apiVersion": "slipway.dev/v1alpha1", "kind": "HostClass", "metadata": {"name": "small"},
               "spec": {"cpus": 1, "memory": "1Gi"}}),
        json!({"apiVersion": "storage.k8s.io/v1", "kind": "StorageClass", "metadata": {"name": "fast"},
               "provisioner": "csi.slipway.dev", "allowVolumeExpansion": true}),
        json!({"apiVersion": "storage.k8s.io/v1", "kind": "StorageClass", "metadata": {"name": "slow"},
               "provisioner": "csi.slipway.dev"}),
        json!({"apiVersion": "slipway.dev/v1alpha1", "kind": "Host", "metadata": {"name": "team-c1-w-0"},
               "spec": {"zone": "zone-a", "hostClass": "small", "provider": "static",
                        "cluster": {"namespace": "team", "name": "c1"}, "pool": "w"}}),
        json!({"apiVersion": "slipway.dev/v1alpha1", "kind": "Host", "metadata": {"name": "team-c1-w-1"},
               "spec": {"zone": "zone-b", "hostClass": "small", "provider": "static",
                        "cluster": {"namespace": "team", "name": "c1"}, "pool": "w"}}),
        json!({"apiVersion": "slipway.dev/v1alpha1", "kind": "Host", "metadata": {"name": "other-c2-w-0"},
               "spec": {"zone": "zone-a", "hostClass": "small", "provider": "static"}}),
    ] {
        apply(&sv, obj).await?;
    }

    // The workload cluster: its API server and controllers with the link.
    let wl_dir = dir.path().join("workload");
    std::fs::create_dir_all(&wl_dir)?;
    let (wl, _, _) = api_server(&wl_dir).await?;
    // The link has the cluster's own namespace-scoped identity, as a control plane host gets it.
    let (cert_pem, key_pem) = pki.issue_client(
        &format!("{CLUSTER_USER_PREFIX}team:c1"),
        Some(CLUSTERS),
        ADMIN_DAYS,
    )?;
    let link_kubeconfig = dir.path().join("link.kubeconfig");
    std::fs::write(
        &link_kubeconfig,
        pki.kubeconfig(
            &slipway_supervisor::tls::authority(sv_addr),
            "link",
            &Credential::ClientCert { cert_pem, key_pem },
        )?,
    )?;
    let link = Client::try_from(
        kube::Config::from_custom_kubeconfig(
            Kubeconfig::read_from(&link_kubeconfig)?,
            &KubeConfigOptions::default(),
        )
        .await?,
    )?;
    let socket = dir.path().join("pvcsi.sock");
    tokio::spawn(slipway_controllers::run(
        wl.clone(),
        Options {
            supervisor: Some(SupervisorLink {
                client: link,
                namespace: "team".into(),
                cluster: "c1".into(),
            }),
            pvcsi_socket: Some(socket.clone()),
            ..Options::default()
        },
    ));
    apply(
        &wl,
        json!({"apiVersion": "storage.k8s.io/v1", "kind": "StorageClass", "metadata": {"name": "fast"},
               "provisioner": "csi.slipway.dev", "allowVolumeExpansion": true,
               "parameters": {"svStorageClass": "fast"}}),
    )
    .await?;

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

    // A VolumeAttachment for host team-c1-w-0: exactly that host opens the export.
    let vas: Api<VolumeAttachment> = Api::all(wl.clone());
    vas.create(
        &PostParams::default(),
        &serde_json::from_value(json!({"metadata": {"name": "va-data"}, "spec": {
            "attacher": "csi.slipway.dev", "nodeName": "team-c1-w-0",
            "source": {"persistentVolumeName": pv_name}}}))?,
    )
    .await?;
    let meta = until("attached", 60, || async {
        let va = vas.get("va-data").await?;
        Ok(va
            .status
            .filter(|s| s.attached)
            .map(|s| s.attachment_metadata.unwrap_or_default()))
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
    // Deleting a volume that does not exist succeeds (CSI spec).
    grpc.delete_volume(DeleteVolumeRequest {
        volume_id: "pvc-nope".into(),
        secrets: HashMap::new(),
    })
    .await?;

    // Detach: the VolumeAttachment goes, and so does the host from the allow-list.
    vas.delete("va-data", &DeleteParams::default()).await?;
    until("VolumeAttachment gone", 60, || async {
        Ok(vas.get_opt("va-data").await?.is_none().then_some(()))
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
