//! The world of the paravirtual volume tests, shared by each test binary: a supervisor API
//! server with its volume reconciler over a real block store (`slipway-nbd`, TLS with the
//! supervisor's CA), a namespace `team` with a 4Gi storage limit and StorageClass `fast`, hosts
//! of cluster `team/c1` in zones a and b (and `other-c2-w-0` of no cluster), and a workload
//! cluster API server running the controllers with the cluster's supervisor link and the pvCSI
//! socket, with StorageClass `fast` of `csi.slipway.dev`. Helpers drive exports with qemu-io
//! over TLS as a host would.
//!
//! Needs `cargo build -p slipway-blockstore --bin slipway-nbd` first.
#![allow(
    dead_code,
    reason = "each integration test binary uses a different subset"
)]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail, ensure};
use kube::Client;
use kube::api::{Api, DynamicObject, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use serde_json::json;
use slipway_blockstore::control::{self, ControlRequest};
use slipway_controllers::{Options, SupervisorLink};
use slipway_supervisor::admission::AdmissionConfig;
use slipway_supervisor::auth::{CLUSTER_USER_PREFIX, CLUSTERS, issue_host_identity};
use slipway_supervisor::controllers::volume_plan::BlockStoreRef;
use slipway_supervisor::controllers::volumes::VolumeReconciler;
use slipway_supervisor::server::limits::ConnectionLimits;
use slipway_supervisor::server::{Server, ServerConfig, StoreConfig};
use slipway_supervisor::tls::{ADMIN_DAYS, Credential, Pki};

pub const GI: u64 = 1 << 30;

/// A child process killed on drop.
#[derive(Debug)]
pub struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub async fn api_server(dir: &Path) -> Result<(Client, PathBuf, std::net::SocketAddr)> {
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

pub fn nbd_binary() -> Result<PathBuf> {
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
pub fn block_store(dir: &Path, pki: &Pki) -> Result<(Child, PathBuf, u16)> {
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

pub fn host_creds(dir: &Path, pki: &Pki, host: &str) -> Result<String> {
    let d = dir.join(format!("creds-{host}"));
    std::fs::create_dir_all(&d)?;
    let (cert, key) = issue_host_identity(pki, host, ADMIN_DAYS)?;
    std::fs::copy(pki.ca_cert(), d.join("ca-cert.pem"))?;
    std::fs::write(d.join("client-cert.pem"), cert)?;
    std::fs::write(d.join("client-key.pem"), key)?;
    Ok(d.display().to_string())
}

/// Whether qemu-io, as the host whose credentials are in `creds`, reads the export.
pub fn opens(creds: &str, port: u16, export: &str) -> bool {
    qemu(creds, port, export, &["read 0 4k"])
}

/// Whether qemu-io, as the host whose credentials are in `creds`, runs `cmds` on the export.
pub fn qemu(creds: &str, port: u16, export: &str, cmds: &[&str]) -> bool {
    let object = format!("tls-creds-x509,id=tls0,endpoint=client,dir={creds}");
    let image = format!(
        "driver=nbd,server.type=inet,server.host=localhost,server.port={port},export={export},tls-creds=tls0"
    );
    let mut args = vec!["--object", object.as_str(), "--image-opts"];
    for c in cmds {
        args.extend(["-c", c]);
    }
    args.push(&image);
    let Ok(out) = Command::new("qemu-io").args(&args).output() else {
        return false;
    };
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out.status.success() && !text.contains("failed") && !text.contains("error")
}

pub async fn store_volumes(control: &Path) -> Result<Vec<slipway_blockstore::store::VolumeInfo>> {
    Ok(control::call(control, &ControlRequest::List {})
        .await?
        .volumes)
}

/// Polls `f` every 100 ms until it returns Some or `secs` pass.
pub async fn until<T, F, Fut>(what: &str, secs: u64, mut f: F) -> Result<T>
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

pub async fn apply(client: &Client, yaml: serde_json::Value) -> Result<()> {
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

pub fn mount_cap() -> slipway_csi::proto::VolumeCapability {
    slipway_controllers::pvcsi::capability(None, &["ReadWriteOnce".into()], "ext4")
}

/// The running world; its processes stop and its directory goes when it is dropped (the
/// servers and controllers are tasks of the test's runtime).
pub struct World {
    /// The block store (killed on drop).
    pub store: Child,
    /// Everything on disk.
    pub dir: tempfile::TempDir,
    /// The supervisor's CA.
    pub pki: Pki,
    /// The block store's control socket.
    pub control: PathBuf,
    /// The block store's NBD port on 127.0.0.1.
    pub port: u16,
    /// The supervisor, as its admin.
    pub sv: Client,
    /// The workload cluster, as its admin.
    pub wl: Client,
    /// The pvCSI controller's socket.
    pub socket: PathBuf,
}

/// Starts the world, its temporary directory named with `prefix`.
pub async fn world(prefix: &str) -> Result<World> {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_test_writer()
        .try_init();
    let dir = tempfile::Builder::new().prefix(prefix).tempdir()?;
    let sup_dir = dir.path().join("sup");
    std::fs::create_dir_all(&sup_dir)?;
    let pki = Pki::new(&sup_dir);
    pki.ensure(&[])?;
    let (store, control, port) = block_store(dir.path(), &pki)?;
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

    Ok(World {
        store,
        dir,
        pki,
        control,
        port,
        sv,
        wl,
        socket,
    })
}
