//! `slipway up`, the main job: a supervisor provisioning hosts in network namespaces over three
//! zones, the objects a demo needs (Zones, a HostClass, a namespace) and the demo Cluster of
//! `examples/cluster.yaml`; a progress bar until it is Ready, then its hosts and the commands to
//! try. It stays in the foreground; Ctrl-C, SIGTERM or `slipway down` tear everything down
//! (hosts, namespaces, cgroups, processes, pins, the data dir). A run killed with kill -9 is
//! cleaned up by the next `slipway up`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::Parser as _;
use kube::api::{
    Api, ApiResource, DynamicObject, GroupVersionKind, ListParams, Patch, PatchParams, PostParams,
};
use serde_json::{Value, json};
use slipway_hosts::reconciler::ProviderArgs;

use crate::supervisor::SupervisorCommand;

/// The demo Cluster.
const CLUSTER: &str = include_str!("../../examples/cluster.yaml");

/// What runs on it once it is Ready.
const WEB: &str = include_str!("../../examples/web.yaml");

/// How long the demo workloads may take to be Ready.
const WEB_TIMEOUT: Duration = Duration::from_secs(120);

/// How long the demo cluster may take to be Ready.
const READY_TIMEOUT: Duration = Duration::from_secs(120);

#[derive(Debug, clap::Args)]
pub struct UpArgs {
    /// The supervisor's state (wiped when `up` starts and when it ends).
    #[arg(long, default_value = "/var/lib/slipway/up")]
    data_dir: PathBuf,
    /// Where the supervisor serves its API.
    #[arg(long, default_value = "0.0.0.0:6443")]
    listen: SocketAddr,
    #[command(flatten)]
    hosts: ProviderArgs,
}

#[derive(Debug, clap::Args)]
pub struct DownArgs {
    /// The data dir of the `slipway up` to stop.
    #[arg(long, default_value = "/var/lib/slipway/up")]
    data_dir: PathBuf,
}

fn pid_file(data_dir: &Path) -> PathBuf {
    data_dir.with_extension("pid")
}

#[derive(Debug, clap::Parser)]
struct Supervisor {
    #[command(flatten)]
    command: SupervisorCommand,
}

pub(crate) fn resource(group: &str, kind: &str, plural: &str) -> ApiResource {
    let version = if group.is_empty() { "v1" } else { "v1alpha1" };
    resource_in(group, version, kind, plural)
}

pub(crate) fn resource_in(group: &str, version: &str, kind: &str, plural: &str) -> ApiResource {
    ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk(group, version, kind), plural)
}

pub(crate) async fn create(
    client: &kube::Client,
    api: &ApiResource,
    namespace: Option<&str>,
    obj: Value,
) -> anyhow::Result<()> {
    let obj: DynamicObject = serde_json::from_value(obj)?;
    let api: Api<DynamicObject> = match namespace {
        Some(ns) => Api::namespaced_with(client.clone(), ns, api),
        None => Api::all_with(client.clone(), api),
    };
    match api.create(&PostParams::default(), &obj).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 409 => Ok(()),
        Err(e) => Err(e).context(format!(
            "creating {}",
            obj.metadata.name.unwrap_or_default()
        )),
    }
}

pub(crate) fn ready_hosts(hosts: &[DynamicObject], names: &[String]) -> usize {
    hosts
        .iter()
        .filter(|h| names.iter().any(|n| Some(n) == h.metadata.name.as_ref()))
        .filter(|h| {
            h.data["status"]["conditions"].as_array().is_some_and(|cs| {
                cs.iter()
                    .any(|c| c["type"] == "Ready" && c["status"] == "True")
            })
        })
        .count()
}

/// What a cluster needs in a fresh supervisor: its `zones`, a HostClass `small` (1 cpu,
/// 512Mi) and `namespace`.
pub(crate) async fn seed(
    client: &kube::Client,
    zones: &[String],
    namespace: &str,
) -> anyhow::Result<()> {
    for zone in zones {
        create(
            client,
            &resource("slipway.dev", "Zone", "zones"),
            None,
            json!({
                "apiVersion": "slipway.dev/v1alpha1", "kind": "Zone",
                "metadata": {"name": zone}, "spec": {},
            }),
        )
        .await?;
    }
    create(
        client,
        &resource("slipway.dev", "HostClass", "hostclasses"),
        None,
        json!({
            "apiVersion": "slipway.dev/v1alpha1", "kind": "HostClass",
            "metadata": {"name": "small"}, "spec": {"cpus": 1, "memory": "512Mi"},
        }),
    )
    .await?;
    create(
        client,
        &resource("", "Namespace", "namespaces"),
        None,
        json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}}),
    )
    .await
}

/// Makes the demo objects and follows the Cluster until it is Ready.
async fn bring_up(data_dir: PathBuf, zones: Vec<String>, addr: SocketAddr) -> anyhow::Result<()> {
    let kubeconfig = data_dir.join("admin.kubeconfig");
    let client = crate::client_for(&kubeconfig).await?;
    seed(&client, &zones, "demo").await?;
    // The namespace's limits (split over the zones its cluster uses), and its two users: `dev`
    // edits, `viewer` reads (no Secrets), each with a kubeconfig of their own.
    let namespaces: Api<DynamicObject> =
        Api::all_with(client.clone(), &resource("", "Namespace", "namespaces"));
    namespaces
        .patch(
            "demo",
            &PatchParams::default(),
            &Patch::Merge(
                json!({"spec": {"limits": {"cpu": "6", "memory": "6Gi", "storage": "20Gi"}}}),
            ),
        )
        .await
        .context("the demo namespace's limits")?;
    let pki = slipway_supervisor::tls::Pki::new(&data_dir);
    for (user, role) in [("dev", "edit"), ("viewer", "view")] {
        create(&client, &resource_in("rbac.authorization.k8s.io", "v1", "RoleBinding", "rolebindings"), Some("demo"), json!({
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
            "metadata": {"name": format!("{user}-{role}"), "namespace": "demo"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role},
            "subjects": [{"kind": "User", "name": user}],
        }))
        .await?;
        let (cert_pem, key_pem) =
            pki.issue_client(user, None, slipway_supervisor::tls::USER_DAYS)?;
        let text = pki.kubeconfig(
            &slipway_supervisor::tls::authority(addr),
            user,
            &slipway_supervisor::tls::Credential::ClientCert { cert_pem, key_pem },
        )?;
        slipway_supervisor::tls::write_private(
            &data_dir.join(format!("{user}.kubeconfig")),
            &text,
        )?;
    }
    // The images the hosts start with (no registry is reachable): busybox, pause, tools.
    println!("slipway up: building the node images (busybox, pause, tools)");
    slipway_agent::pods::image::build_node_images(&data_dir.join("images"))
        .map_err(|e| anyhow::anyhow!(slipway_agent::pods::error_chain(&e)))
        .context("building the node images")?;
    // The supervisor's StorageClass the cluster's claims name (`svStorageClass: fast`).
    create(
        &client,
        &resource_in("storage.k8s.io", "v1", "StorageClass", "storageclasses"),
        None,
        json!({
            "apiVersion": "storage.k8s.io/v1", "kind": "StorageClass",
            "metadata": {"name": "fast"}, "provisioner": "csi.slipway.dev",
            "allowVolumeExpansion": true,
        }),
    )
    .await?;
    let cluster: Value = serde_saphyr::from_str(CLUSTER).context("examples/cluster.yaml")?;
    let clusters_api = resource("slipway.dev", "Cluster", "clusters");
    create(&client, &clusters_api, Some("demo"), cluster).await?;
    let clusters: Api<DynamicObject> = Api::namespaced_with(client.clone(), "demo", &clusters_api);
    let hosts_api: Api<DynamicObject> =
        Api::all_with(client.clone(), &resource("slipway.dev", "Host", "hosts"));

    let bar = indicatif::ProgressBar::new(3);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{spinner} cluster demo/demo [{bar:20}] {pos}/{len} hosts Ready  {msg}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar.enable_steady_tick(Duration::from_millis(100));
    let started = Instant::now();
    let cluster = loop {
        anyhow::ensure!(
            started.elapsed() < READY_TIMEOUT,
            "cluster demo/demo is not Ready after {READY_TIMEOUT:?}; `kubectl --kubeconfig {} describe cluster demo -n demo` says why",
            kubeconfig.display()
        );
        let c = clusters.get("demo").await?;
        let names: Vec<String> = c.data["status"]["hosts"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|v| v.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default();
        let all = hosts_api.list(&ListParams::default()).await?.items;
        bar.set_position(ready_hosts(&all, &names) as u64);
        bar.set_message(
            c.data["status"]["phase"]
                .as_str()
                .unwrap_or("Pending")
                .to_owned(),
        );
        let ready = c.data["status"]["conditions"].as_array().is_some_and(|cs| {
            cs.iter()
                .any(|x| x["type"] == "Ready" && x["status"] == "True")
        });
        if ready {
            break c;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    bar.finish_and_clear();
    println!(
        "slipway up: cluster demo/demo is Ready in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let all = hosts_api.list(&ListParams::default()).await?.items;
    println!(
        "{:<32} {:<8} {:<14} {:<14} READY",
        "HOST", "ZONE", "POOL", "ADDRESS"
    );
    for h in all
        .iter()
        .filter(|h| h.data["spec"]["cluster"]["name"] == "demo")
    {
        println!(
            "{:<32} {:<8} {:<14} {:<14} {}",
            h.metadata.name.as_deref().unwrap_or_default(),
            h.data["spec"]["zone"].as_str().unwrap_or_default(),
            h.data["spec"]["pool"].as_str().unwrap_or_default(),
            h.data["status"]["address"].as_str().unwrap_or_default(),
            ready_hosts(
                std::slice::from_ref(h),
                &[h.metadata.name.clone().unwrap_or_default()]
            ) == 1,
        );
    }
    // The workload cluster's own API, on its control plane host.
    let secrets: Api<DynamicObject> =
        Api::namespaced_with(client.clone(), "demo", &resource("", "Secret", "secrets"));
    let cluster_kubeconfig = data_dir.join("demo.kubeconfig");
    let secret = secrets.get("demo-kubeconfig").await?;
    let text = secret.data["data"]["value"]
        .as_str()
        .and_then(slipway_supervisor::client::base64_decode)
        .context("Secret demo/demo-kubeconfig has no value")?;
    std::fs::write(&cluster_kubeconfig, text)?;
    let workload = crate::client_for(&cluster_kubeconfig).await?;
    let nodes: Api<DynamicObject> = Api::all_with(workload.clone(), &resource("", "Node", "nodes"));
    println!(
        "\nThe workload cluster's API, at {}: its Nodes",
        cluster.data["status"]["apiEndpoint"]
            .as_str()
            .unwrap_or_default()
    );
    for n in nodes.list(&ListParams::default()).await?.items {
        println!(
            "  {:<32} zone {:<8} Ready {}",
            n.metadata.name.as_deref().unwrap_or_default(),
            n.metadata
                .labels
                .as_ref()
                .and_then(|l| l.get("topology.kubernetes.io/zone"))
                .map_or("", String::as_str),
            ready_hosts(
                std::slice::from_ref(&n),
                &[n.metadata.name.clone().unwrap_or_default()]
            ) == 1,
        );
    }
    deploy_web(&workload).await?;
    let k = format!("kubectl --kubeconfig {}", kubeconfig.display());
    let kc = format!("kubectl --kubeconfig {}", cluster_kubeconfig.display());
    let dev = format!(
        "kubectl --kubeconfig {}",
        data_dir.join("dev.kubeconfig").display()
    );
    println!(
        "\nTry:\n  {kc} get nodes -L topology.kubernetes.io/zone\n  {kc} get pods -o wide\n  {kc} get svc,endpointslices,networkpolicies\n  {kc} logs deploy/client      # answers from the 3 web pods\n  {kc} logs deploy/intruder    # refused: the NetworkPolicy admits only the client\n  {kc} scale deploy/web --replicas 4\n  {kc} get pvc,pv              # claim notes, provisioned by the supervisor\n  {kc} logs deploy/notebook    # its notes; they outlive the pod: {kc} delete pod -l app=notebook\n  {dev} get clusters -n demo   # the namespace's editor (viewer.kubeconfig reads)\n  {k} get clusters -n demo\n  {k} describe cluster demo -n demo\n  {k} get hosts -o wide\n  \
         {k} patch cluster demo -n demo --type merge -p '{{\"spec\":{{\"topology\":{{\"nodePools\":[{{\"name\":\"workers\",\"replicas\":3,\"hostClass\":\"small\"}}]}}}}}}'\n\
         Ctrl-C (or `slipway down`) tears everything down."
    );
    std::future::pending().await
}

/// Applies `examples/web.yaml` to the workload cluster (server-side apply: a second run
/// changes nothing) and waits until its web pods are Ready.
async fn deploy_web(workload: &kube::Client) -> anyhow::Result<()> {
    let docs: Vec<Value> = serde_saphyr::from_multiple(WEB).context("examples/web.yaml")?;
    for doc in docs {
        let obj: DynamicObject = serde_json::from_value(doc).context("examples/web.yaml")?;
        let types = obj
            .types
            .clone()
            .context("examples/web.yaml: an object without a kind")?;
        let gvk = GroupVersionKind::try_from(&types)?;
        let (ar, caps) = kube::discovery::pinned_kind(workload, &gvk)
            .await
            .with_context(|| format!("the workload cluster serves no {}", types.kind))?;
        let name = obj.metadata.name.clone().unwrap_or_default();
        let ns = obj
            .metadata
            .namespace
            .clone()
            .unwrap_or_else(|| "default".into());
        let api: Api<DynamicObject> = match caps.scope {
            kube::discovery::Scope::Cluster => Api::all_with(workload.clone(), &ar),
            kube::discovery::Scope::Namespaced => Api::namespaced_with(workload.clone(), &ns, &ar),
        };
        api.patch(
            &name,
            &PatchParams::apply("slipway-up"),
            &Patch::Apply(&obj),
        )
        .await
        .with_context(|| format!("applying {} {ns}/{name}", types.kind))?;
    }
    let pods: Api<DynamicObject> =
        Api::namespaced_with(workload.clone(), "default", &resource("", "Pod", "pods"));
    // The 3 web pods and the notebook on its claim.
    let bar = indicatif::ProgressBar::new(4);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{spinner} examples/web.yaml [{bar:20}] {pos}/{len} pods Ready (web ×3, notebook)",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar.enable_steady_tick(Duration::from_millis(100));
    let started = Instant::now();
    loop {
        let ready = pods
            .list(&ListParams::default().labels("app in (web, notebook)"))
            .await?
            .items
            .iter()
            .filter(|p| {
                p.data["status"]["conditions"].as_array().is_some_and(|cs| {
                    cs.iter()
                        .any(|c| c["type"] == "Ready" && c["status"] == "True")
                })
            })
            .count();
        bar.set_position(ready as u64);
        if ready >= 4 {
            break;
        }
        anyhow::ensure!(
            started.elapsed() < WEB_TIMEOUT,
            "examples/web.yaml: {ready}/4 pods (web ×3, notebook) Ready after {WEB_TIMEOUT:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    bar.finish_and_clear();
    println!(
        "slipway up: examples/web.yaml is Ready in {:.1} s (3 web pods behind Service web; the notebook on claim notes)",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// A supervisor of this process over a fresh `data_dir`, provisioning netns hosts as `hosts`
/// says, with `more` beside it; everything is torn down when it stops (and what an earlier,
/// killed run left is removed before it starts).
pub(crate) async fn with_supervisor<F, Fut>(
    data_dir: &Path,
    listen: SocketAddr,
    hosts: &ProviderArgs,
    more: F,
) -> anyhow::Result<()>
where
    F: FnOnce(slipway_supervisor::cli::Listening) -> Fut + Send + 'static,
    Fut: Future<Output = anyhow::Result<()>> + Send + 'static,
{
    let mut hosts = hosts.clone();
    hosts.host_provider = "netns".into();
    clean(data_dir, &hosts).await?;
    let mut argv = vec![
        "supervisor".to_owned(),
        "--data-dir".into(),
        data_dir.display().to_string(),
        "--listen".into(),
        listen.to_string(),
    ];
    argv.extend(provider_flags(&hosts));
    let result = Supervisor::try_parse_from(&argv)?
        .command
        .run_with(more)
        .await;
    eprintln!("slipway: tearing everything down");
    result.and(clean(data_dir, &hosts).await)
}

/// Removes what a supervisor over `data_dir` made: its hosts (namespaces, cgroups, processes,
/// pins) and the data dir.
async fn clean(data_dir: &Path, hosts: &ProviderArgs) -> anyhow::Result<()> {
    if let Some(provider) = hosts.provider(data_dir)? {
        provider
            .teardown()
            .await
            .context("tearing the hosts down")?;
    }
    match std::fs::remove_dir_all(data_dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(e).with_context(|| format!("removing {}", data_dir.display()))
        }
        _ => Ok(()),
    }
}

impl UpArgs {
    pub fn run(self) -> anyhow::Result<()> {
        tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .context("tokio runtime")?
            .block_on(self.run_async())
    }

    async fn run_async(self) -> anyhow::Result<()> {
        std::fs::create_dir_all(self.data_dir.parent().unwrap_or(Path::new("/")))?;
        std::fs::write(pid_file(&self.data_dir), std::process::id().to_string())?;
        let data_dir = self.data_dir.clone();
        let mut hosts = self.hosts.clone();
        // Per zone a storage host: the demo's claim is provisioned there.
        hosts.storage_hosts = true;
        if hosts.agent_flags.is_empty() {
            // Every host a node of its cluster, with the images bring_up builds.
            hosts.agent_flags =
                slipway_hosts::reconciler::netns_node_flags(&self.data_dir.join("images"));
        }
        let zones = self.hosts.zones.clone();
        let result = with_supervisor(&self.data_dir, self.listen, &hosts, move |listening| {
            bring_up(data_dir, zones, listening.addr)
        })
        .await;
        let _ = std::fs::remove_file(pid_file(&self.data_dir));
        result
    }
}

/// The flags that give `slipway supervisor` these provider settings.
fn provider_flags(h: &ProviderArgs) -> Vec<String> {
    let mut flags = vec![
        "--host-provider".to_owned(),
        h.host_provider.clone(),
        "--zones".into(),
        h.zones.join(","),
        "--underlay".into(),
        h.underlay.to_string(),
        "--netns-prefix".into(),
        h.netns_prefix.clone(),
        "--uplink-device".into(),
        h.uplink_device.clone(),
        "--host-lease-interval".into(),
        humantime::format_duration(h.lease_interval).to_string(),
        "--host-lease-duration".into(),
        humantime::format_duration(h.lease_duration).to_string(),
    ];
    for f in &h.agent_flags {
        flags.push(format!("--host-agent-flag={f}"));
    }
    if h.storage_hosts {
        flags.extend([
            "--storage-hosts".into(),
            "--storage-host-cpu-millis".into(),
            h.storage_cpu_millis.to_string(),
            "--storage-host-memory".into(),
            h.storage_memory_bytes.to_string(),
        ]);
    }
    flags
}

/// Whether `pid` runs (a zombie, waiting for its parent to reap it, does not).
fn alive(pid: nix::unistd::Pid) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            // The state follows the command name, which is in parentheses.
            stat.rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().next().map(|s| s != "Z"))
        })
        .unwrap_or(false)
}

impl DownArgs {
    /// Sends SIGTERM to the running `slipway up` and waits until it has torn everything down.
    pub fn run(self) -> anyhow::Result<()> {
        let file = pid_file(&self.data_dir);
        let text = std::fs::read_to_string(&file).with_context(|| {
            format!(
                "no `slipway up` runs for {} ({} is missing)",
                self.data_dir.display(),
                file.display()
            )
        })?;
        let pid: i32 = text
            .trim()
            .parse()
            .with_context(|| format!("{}: not a pid", file.display()))?;
        let pid = nix::unistd::Pid::from_raw(pid);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM)
            .with_context(|| format!("signalling slipway up (pid {pid})"))?;
        let deadline = Instant::now() + Duration::from_secs(60);
        while alive(pid) {
            anyhow::ensure!(
                Instant::now() < deadline,
                "slipway up (pid {pid}) is still running after 60 s"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        println!("slipway down: stopped, nothing left");
        Ok(())
    }
}
