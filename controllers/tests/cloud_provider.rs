//! The cloud provider between two real API servers (in-process, each its own redb store): a
//! workload cluster, where Debian's kubectl creates a LoadBalancer Service, and a supervisor
//! running its LoadBalancer reconciler over a Cluster with an ingress pool. The Service is
//! mirrored (node ports as target ports, the Nodes as the backends), its VIP comes back to
//! `kubectl get svc`, a request outside the pool becomes a Warning Event naming the field, and
//! deleting the Service deletes the mirror.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail, ensure};
use k8s_openapi::api::core::v1::{Event, Namespace, Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::api::{
    Api, ApiResource, DynamicObject, GroupVersionKind, ListParams, Patch, PatchParams, PostParams,
};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, ResourceExt};
use serde_json::json;
use slipway_controllers::cloud_provider::mirror_name;
use slipway_controllers::{Options, SupervisorLink};
use slipway_supervisor::controllers::loadbalancers::LoadBalancerReconciler;

const NS: &str = "team-a";
const CLUSTER: &str = "c1";

/// Debian's kubectl 1.20 (override with SLIPWAY_KUBECTL).
fn kubectl_path() -> PathBuf {
    std::env::var_os("SLIPWAY_KUBECTL")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/opt/slipway/kubernetes-client/usr/bin/kubectl"))
}

fn kubectl(kubeconfig: &Path, args: &[&str]) -> Result<String> {
    let out = Command::new(kubectl_path())
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .args(args)
        .output()
        .context("running kubectl")?;
    ensure!(
        out.status.success(),
        "kubectl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// An API server on a temporary directory; its tasks end with the test's runtime.
async fn server() -> Result<(tempfile::TempDir, Client, PathBuf)> {
    let dir = tempfile::Builder::new().prefix("slipway-cp-").tempdir()?;
    let (client, controllers, _) = common::api_server(dir.path()).await?;
    Ok((dir, client, controllers))
}

/// A client with the cluster link's own identity (`system:cluster:<namespace>:<cluster>`, group
/// `system:slipway:clusters`), signed by the supervisor's CA as its join answer would be: the
/// provider must need no more than the link may do.
async fn link_client(sup_dir: &Path) -> Result<Client> {
    let admin = Kubeconfig::read_from(sup_dir.join("admin.kubeconfig"))?;
    let server = admin
        .clusters
        .first()
        .and_then(|c| c.cluster.as_ref())
        .and_then(|c| c.server.clone())
        .context("the admin kubeconfig's server")?;
    let authority = server.trim_start_matches("https://").to_owned();
    let pki = slipway_supervisor::tls::Pki::new(sup_dir);
    let user = format!(
        "{}{NS}:{CLUSTER}",
        slipway_supervisor::auth::CLUSTER_USER_PREFIX
    );
    let (cert_pem, key_pem) =
        pki.issue_client(&user, Some(slipway_supervisor::auth::CLUSTERS), 1)?;
    let text = pki.kubeconfig(
        &authority,
        &user,
        &slipway_supervisor::tls::Credential::ClientCert { cert_pem, key_pem },
    )?;
    let config = kube::Config::from_custom_kubeconfig(
        Kubeconfig::from_yaml(&text)?,
        &KubeConfigOptions::default(),
    )
    .await?;
    Ok(Client::try_from(config)?)
}

fn slipway(kind: &str, plural: &str) -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("slipway.dev", "v1alpha1", kind),
        plural,
    )
}

/// Polls `f` until it answers Some, for up to 15 s.
async fn until<T, F: Future<Output = Option<T>>>(
    what: &str,
    mut f: impl FnMut() -> F,
) -> Result<T> {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if let Some(v) = f().await {
            return Ok(v);
        }
        if Instant::now() > deadline {
            bail!("timed out waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_balancer_services_are_mirrored_and_get_their_vip_back() -> Result<()> {
    // The supervisor: a namespace, a Cluster with an ingress pool, the LB reconciler.
    let (sup_dir, sup, sup_controllers) = server().await?;
    Api::<Namespace>::all(sup.clone())
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": NS}}))?,
        )
        .await?;
    Api::<DynamicObject>::all_with(sup.clone(), &slipway("HostClass", "hostclasses"))
        .create(
            &PostParams::default(),
            &serde_json::from_value(
                json!({"apiVersion": "slipway.dev/v1alpha1", "kind": "HostClass",
                "metadata": {"name": "small"}, "spec": {"cpus": 1, "memory": "1Gi"}}),
            )?,
        )
        .await?;
    Api::<DynamicObject>::namespaced_with(sup.clone(), NS, &slipway("Cluster", "clusters"))
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({
                "apiVersion": "slipway.dev/v1alpha1", "kind": "Cluster",
                "metadata": {"name": CLUSTER, "namespace": NS},
                "spec": {
                    "topology": {"controlPlane": {"replicas": 1, "hostClass": "small"}},
                    "settings": {"network": {
                        "pods": {"cidrBlocks": ["192.168.0.0/16"]},
                        "services": {"cidrBlocks": ["10.96.0.0/16"]},
                        "ingress": {"cidrBlocks": ["10.99.100.0/27"]},
                    }},
                },
            }))?,
        )
        .await?;
    tokio::spawn(
        LoadBalancerReconciler::connect(&sup_controllers)
            .await?
            .run(),
    );

    // The workload cluster: two Ready Nodes, its controllers with the link.
    let (wl_dir, wl, _) = server().await?;
    for (name, ip) in [("n1", "10.100.1.11"), ("n2", "10.100.2.12")] {
        let nodes = Api::<Node>::all(wl.clone());
        nodes
            .create(
                &PostParams::default(),
                &serde_json::from_value(json!({"metadata": {"name": name}}))?,
            )
            .await?;
        nodes
            .patch_status(
                name,
                &PatchParams::default(),
                &Patch::Merge(json!({"status": {
                    "addresses": [{"type": "InternalIP", "address": ip}],
                    "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady"}],
                }})),
            )
            .await?;
    }
    tokio::spawn(slipway_controllers::run(
        wl.clone(),
        Options {
            supervisor: Some(SupervisorLink {
                client: link_client(sup_dir.path()).await?,
                namespace: NS.into(),
                cluster: CLUSTER.into(),
            }),
            ..Options::default()
        },
    ));
    let wl_kubeconfig = wl_dir.path().join("admin.kubeconfig");

    let started = Instant::now();
    kubectl(
        &wl_kubeconfig,
        &["create", "service", "loadbalancer", "web", "--tcp=80:8080"],
    )?;
    let services: Api<Service> = Api::namespaced(wl.clone(), "default");
    let vip = until("the VIP in the workload Service's status", || {
        let services = services.clone();
        async move {
            let svc = services.get("web").await.ok()?;
            svc.status?.load_balancer?.ingress?.first()?.ip.clone()
        }
    })
    .await?;
    let took = started.elapsed();
    ensure!(vip == "10.99.100.1", "a VIP from the pool: {vip}");
    println!("EXTERNAL-IP {vip} {took:?} after kubectl create started");
    let shown = kubectl(&wl_kubeconfig, &["get", "svc", "web"])?;
    ensure!(
        shown.contains(&vip),
        "kubectl get svc shows EXTERNAL-IP: {shown}"
    );

    // The mirror: node ports as target ports, the Nodes as its backends.
    let web = services.get("web").await?;
    let node_port = web
        .spec
        .as_ref()
        .and_then(|s| s.ports.as_ref())
        .and_then(|p| p.first())
        .and_then(|p| p.node_port)
        .context("a node port")?;
    let name = mirror_name(CLUSTER, "default", "web");
    let mirrors: Api<Service> = Api::namespaced(sup.clone(), NS);
    let mirror = mirrors.get(&name).await?;
    let port = mirror
        .spec
        .as_ref()
        .and_then(|s| s.ports.as_ref())
        .and_then(|p| p.first())
        .cloned()
        .context("a mirrored port")?;
    ensure!(port.port == 80 && port.target_port == Some(IntOrString::Int(node_port)));
    ensure!(
        port.node_port.is_none(),
        "no supervisor node port: {port:?}"
    );
    ensure!(
        mirror
            .annotations()
            .get(slipway_api::networking::DSR_ANNOTATION)
            == Some(&"true".to_owned()),
        "direct server return by default: {:?}",
        mirror.annotations()
    );
    let slices: Api<EndpointSlice> = Api::namespaced(sup.clone(), NS);
    let slice = slices.get(&name).await?;
    let mut addresses: Vec<String> = slice
        .endpoints
        .iter()
        .flat_map(|e| e.addresses.clone())
        .collect();
    addresses.sort();
    ensure!(
        addresses == ["10.100.1.11", "10.100.2.12"],
        "the Nodes: {addresses:?}"
    );

    // A Node going NotReady is a backend not ready.
    Api::<Node>::all(wl.clone())
        .patch_status(
            "n2",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"conditions": [
                {"type": "Ready", "status": "False", "reason": "KubeletNotReady"}]}})),
        )
        .await?;
    until("n2 not ready in the slice", || {
        let slices = slices.clone();
        let name = name.clone();
        async move {
            let slice = slices.get(&name).await.ok()?;
            slice
                .endpoints
                .iter()
                .any(|e| {
                    e.addresses == ["10.100.2.12"]
                        && e.conditions.as_ref().and_then(|c| c.ready) == Some(false)
                })
                .then_some(())
        }
    })
    .await?;

    // Outside the pool: a Warning Event on the workload Service, naming the field.
    kubectl(
        &wl_kubeconfig,
        &[
            "create",
            "service",
            "loadbalancer",
            "outside",
            "--tcp=81:8080",
        ],
    )?;
    services
        .patch(
            "outside",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"loadBalancerIP": "10.1.2.3"}})),
        )
        .await?;
    let message = until("a Warning Event on outside", || {
        let events: Api<Event> = Api::namespaced(wl.clone(), "default");
        async move {
            events
                .list(&ListParams::default())
                .await
                .ok()?
                .items
                .into_iter()
                .find(|e| {
                    e.involved_object.name.as_deref() == Some("outside")
                        && e.reason.as_deref() == Some("SyncLoadBalancerFailed")
                })
                .and_then(|e| e.message)
        }
    })
    .await?;
    ensure!(
        message.contains("spec.loadBalancerIP") && message.contains("10.99.100.0/27"),
        "{message}"
    );

    // Delete: the mirror and its slice go.
    kubectl(&wl_kubeconfig, &["delete", "service", "web"])?;
    until("the mirror gone", || {
        let (mirrors, slices, name) = (mirrors.clone(), slices.clone(), name.clone());
        async move {
            let m = mirrors.get_opt(&name).await.ok()?;
            let s = slices.get_opt(&name).await.ok()?;
            (m.is_none() && s.is_none()).then_some(())
        }
    })
    .await?;
    let left: Vec<String> = mirrors
        .list(&ListParams::default())
        .await?
        .items
        .iter()
        .map(ResourceExt::name_any)
        .collect();
    ensure!(
        left == [mirror_name(CLUSTER, "default", "outside")],
        "{left:?}"
    );
    Ok(())
}
