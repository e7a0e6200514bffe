//! Command-line arguments and entry points: `slipway supervisor` (the server) and the client
//! commands `apply`, `get`, `describe`, `delete` and `kubeconfig`.

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use http_body_util::BodyExt;
use hyper::Method;
use serde_json::Value;

use crate::api::registry::ResourceType;
use crate::client::{Client, collection_path, object_path, render_table, resolve};
use crate::tls::{Credential, Pki};

use crate::admission::AdmissionConfig;
use crate::server::limits::ConnectionLimits;
use crate::server::{Server, ServerConfig, StoreConfig};

/// Arguments of `slipway supervisor`.
#[derive(Debug, Clone, clap::Args)]
pub struct SupervisorArgs {
    /// Data directory: PKI, admin.kubeconfig, the redb store and the audit log.
    #[arg(long, value_name = "DIR")]
    pub data_dir: PathBuf,
    /// Address to serve HTTPS on (port 0 picks a free port).
    #[arg(long, value_name = "ADDR:PORT", default_value = "127.0.0.1:6443")]
    pub listen: SocketAddr,
    /// Store backend: `redb` (embedded, DIR/store.redb) or `etcd://host:port,host:port,...`.
    #[arg(long, value_name = "redb|etcd://h1,h2,...", default_value = "redb", value_parser = parse_store)]
    pub store: StoreConfig,
    /// The CA certificate (PEM) an etcd store's members are verified with; with
    /// `--etcd-certfile` and `--etcd-keyfile`, the store speaks TLS (`etcd://https://...`).
    #[arg(long, value_name = "FILE", requires_all = ["etcd_certfile", "etcd_keyfile"])]
    pub etcd_cafile: Option<PathBuf>,
    /// The client certificate (PEM) the supervisor presents to etcd.
    #[arg(long, value_name = "FILE", requires = "etcd_cafile")]
    pub etcd_certfile: Option<PathBuf>,
    /// The client certificate's key (PEM).
    #[arg(long, value_name = "FILE", requires = "etcd_cafile")]
    pub etcd_keyfile: Option<PathBuf>,
    /// Bearer token file, one `token,user,uid,"group1,group2"` per line.
    #[arg(long, value_name = "FILE")]
    pub token_file: Option<PathBuf>,
    /// Audit log (JSON lines); defaults to DIR/audit.log.
    #[arg(long, value_name = "FILE")]
    pub audit_log: Option<PathBuf>,
    /// Events the redb store keeps for watches to resume from; older resourceVersions get 410.
    #[arg(long, default_value_t = crate::store::redb::DEFAULT_HISTORY)]
    pub watch_history: u64,
    /// Smallest pod CIDR a Cluster may ask for, as a prefix length.
    #[arg(long, default_value_t = 24)]
    pub min_pod_cidr_prefix: u8,
    /// Smallest service CIDR a Cluster may ask for, as a prefix length.
    #[arg(long, default_value_t = 16)]
    pub min_service_cidr_prefix: u8,
    /// Smallest ingress/egress CIDR a Cluster may ask for, as a prefix length.
    #[arg(long, default_value_t = 27)]
    pub min_edge_cidr_prefix: u8,
    /// Block Services' ClusterIPs are allocated from (kube-apiserver's flag).
    #[arg(long, default_value = "10.96.0.0/12")]
    pub service_cluster_ip_range: ipnetwork::IpNetwork,
    /// Inclusive range node ports are allocated from, `LOW-HIGH`.
    #[arg(long, default_value = "30000-32767", value_parser = parse_port_range)]
    pub service_node_port_range: (u16, u16),
    /// Longest a TLS handshake may take (`10s`, `500ms`).
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub handshake_timeout: Duration,
    /// Longest a client may take to send a request's headers, idle time included.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub header_read_timeout: Duration,
    /// Open connections in all; more are closed at accept.
    #[arg(long, default_value_t = ConnectionLimits::default().max_connections)]
    pub max_connections: usize,
    /// Open connections from one client address; more are closed at accept.
    #[arg(long, default_value_t = ConnectionLimits::default().max_connections_per_client)]
    pub max_connections_per_client: usize,
    /// Open watches of one user; more get 429.
    #[arg(long, default_value_t = ConnectionLimits::default().max_watches_per_user)]
    pub max_watches_per_user: usize,
    /// The kubelet port `kubectl logs` reaches a Node's host agent at (its `--kubelet-listen`)
    /// when the Node names none in `status.daemonEndpoints.kubeletEndpoint.Port`.
    #[arg(long, default_value_t = slipway_api::logs::DEFAULT_KUBELET_PORT)]
    pub kubelet_port: u16,
    /// Another address clients reach the supervisor at (named in its serving certificate);
    /// repeatable.
    #[arg(long = "advertise-address", value_name = "IP")]
    pub advertise_address: Vec<std::net::IpAddr>,
    /// A network the supervisor uses, which no Cluster's blocks may overlap:
    /// `DESCRIPTION=CIDR` (repeatable; the netns host provider adds its underlay).
    #[arg(long = "reserved-network", value_name = "WHAT=CIDR", value_parser = parse_reserved)]
    pub reserved_network: Vec<(String, ipnetwork::IpNetwork)>,
    /// A block store the volume reconciler provisions claims of StorageClasses of
    /// `csi.slipway.dev` in: `ZONE=CONTROL_SOCKET,NBD_ADDRESS` (one per zone, repeatable; the
    /// netns host provider adds its storage hosts').
    #[arg(long = "block-store", value_name = "ZONE=SOCKET,tcp:HOST:PORT")]
    pub block_store: Vec<crate::controllers::volume_plan::BlockStoreRef>,
}

/// Parses `WHAT=CIDR`.
pub fn parse_reserved(s: &str) -> Result<(String, ipnetwork::IpNetwork), String> {
    let (what, cidr) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?}: expected WHAT=CIDR"))?;
    let net = cidr
        .parse()
        .map_err(|e| format!("{cidr:?} is not a CIDR: {e}"))?;
    Ok((what.to_owned(), net))
}

/// What controllers run beside the supervisor get once it listens.
#[derive(Debug, Clone)]
pub struct Listening {
    /// The bound address.
    pub addr: SocketAddr,
    /// The controllers' kubeconfig (`system:slipway:controllers`).
    pub controllers_kubeconfig: PathBuf,
    /// The CA certificate clients trust.
    pub ca: PathBuf,
}

/// Parses a duration: a number with `ms`, `s` or `m`, or bare seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    let (num, unit) = match t.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => t.split_at(i),
        None => (t, "s"),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("invalid duration {s:?}: want a whole number with ms, s or m"))?;
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "s" => Ok(Duration::from_secs(n)),
        "m" => Ok(Duration::from_secs(n * 60)),
        _ => Err(format!("invalid duration {s:?}: unit must be ms, s or m")),
    }
}

/// Parses `--store`.
pub fn parse_store(s: &str) -> Result<StoreConfig, String> {
    if s == "redb" {
        return Ok(StoreConfig::Redb);
    }
    let hosts = s
        .strip_prefix("etcd://")
        .ok_or_else(|| format!("store must be redb or etcd://h1,h2,...; got {s:?}"))?;
    let endpoints: Vec<String> = hosts
        .split(',')
        .map(str::trim)
        .filter(|h| !h.is_empty())
        .map(|h| {
            if h.contains("://") {
                h.to_string()
            } else {
                format!("http://{h}")
            }
        })
        .collect();
    if endpoints.is_empty() {
        return Err("etcd:// needs at least one host:port".into());
    }
    Ok(StoreConfig::Etcd {
        endpoints,
        tls: None,
    })
}

impl SupervisorArgs {
    fn config(&self) -> ServerConfig {
        ServerConfig {
            data_dir: self.data_dir.clone(),
            listen: self.listen,
            store: match (
                &self.store,
                &self.etcd_cafile,
                &self.etcd_certfile,
                &self.etcd_keyfile,
            ) {
                (StoreConfig::Etcd { endpoints, .. }, Some(ca), Some(cert), Some(key)) => {
                    StoreConfig::Etcd {
                        endpoints: endpoints.clone(),
                        tls: Some(crate::store::etcd::EtcdTls {
                            ca: ca.clone(),
                            cert: cert.clone(),
                            key: key.clone(),
                        }),
                    }
                }
                (store, ..) => store.clone(),
            },
            token_file: self.token_file.clone(),
            audit_log: Some(
                self.audit_log
                    .clone()
                    .unwrap_or_else(|| self.data_dir.join("audit.log")),
            ),
            watch_history: self.watch_history,
            admission: AdmissionConfig {
                reserved: self
                    .reserved_network
                    .iter()
                    .map(|(what, net)| (what.clone(), *net))
                    .collect(),
                pod_prefix_max: self.min_pod_cidr_prefix,
                service_prefix_max: self.min_service_cidr_prefix,
                edge_prefix_max: self.min_edge_cidr_prefix,
                services: crate::admission::services::ServiceNetwork {
                    cidr: self.service_cluster_ip_range,
                    node_ports: self.service_node_port_range,
                },
            },
            limits: ConnectionLimits {
                handshake_timeout: self.handshake_timeout,
                header_read_timeout: self.header_read_timeout,
                max_connections: self.max_connections,
                max_connections_per_client: self.max_connections_per_client,
                max_watches_per_user: self.max_watches_per_user,
            },
            advertise: self.advertise_address.clone(),
        }
    }

    /// Serves until SIGINT/SIGTERM, inside the caller's tokio runtime. Prints
    /// `slipway supervisor listening on https://ADDR` on stdout once the port is bound.
    pub async fn run_async(self) -> anyhow::Result<()> {
        self.run_async_with(|_| async { std::future::pending().await })
            .await
    }

    /// As [`Self::run_async`], with more controllers: `more` is started once the server
    /// listens and runs beside it; if it ends with an error, the supervisor stops with it.
    pub async fn run_async_with<F, Fut>(self, more: F) -> anyhow::Result<()>
    where
        F: FnOnce(Listening) -> Fut,
        Fut: Future<Output = anyhow::Result<()>> + Send + 'static,
    {
        anyhow::ensure!(
            self.etcd_cafile.is_none() || matches!(self.store, StoreConfig::Etcd { .. }),
            "--etcd-cafile: only with an etcd store (--store etcd://...)"
        );
        let server = Server::bind(self.config())
            .await
            .context("starting the supervisor API")?
            .with_kubelet_port(self.kubelet_port);
        println!(
            "slipway supervisor listening on https://{}",
            server.local_addr()
        );
        let host_health =
            crate::controllers::host_health::HostHealth::connect(server.controllers_kubeconfig())
                .await
                .context("starting the host health controller")?;
        let clusters = crate::controllers::clusters::ClusterReconciler::connect(
            server.controllers_kubeconfig(),
            &self.data_dir.join("clusters"),
        )
        .await
        .context("starting the cluster reconciler")?;
        let loadbalancers = crate::controllers::loadbalancers::LoadBalancerReconciler::connect(
            server.controllers_kubeconfig(),
        )
        .await
        .context("starting the load balancer reconciler")?;
        let controllers = tokio::spawn(host_health.run());
        let cluster_controller = tokio::spawn(clusters.run());
        let lb_controller = tokio::spawn(loadbalancers.run());
        let volumes = if self.block_store.is_empty() {
            None
        } else {
            let reconciler = crate::controllers::volumes::VolumeReconciler::connect(
                server.controllers_kubeconfig(),
                self.block_store.clone(),
            )
            .await
            .context("starting the volume reconciler")?;
            Some(tokio::spawn(reconciler.run()))
        };
        let mut more = tokio::spawn(more(Listening {
            addr: server.local_addr(),
            controllers_kubeconfig: server.controllers_kubeconfig().to_owned(),
            ca: Pki::new(&self.data_dir).ca_cert(),
        }));
        let (failed_tx, failed_rx) = tokio::sync::oneshot::channel();
        let shutdown = async {
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending().await } } => {}
                done = &mut more => {
                    let _ = failed_tx.send(match done {
                        Ok(Ok(())) => Ok(()),
                        Ok(Err(e)) => Err(e),
                        Err(e) => Err(anyhow::anyhow!("a controller panicked: {e}")),
                    });
                }
            }
        };
        server.serve(shutdown).await;
        controllers.abort();
        cluster_controller.abort();
        lb_controller.abort();
        if let Some(v) = volumes {
            v.abort();
        }
        more.abort();
        match failed_rx.await {
            Ok(result) => result,
            Err(_) => Ok(()),
        }
    }

    /// Builds a multi-threaded tokio runtime and serves (for a synchronous `main`).
    pub fn run(self) -> anyhow::Result<()> {
        tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .context("tokio runtime")?
            .block_on(self.run_async())
    }
}

/// Options shared by the client commands.
#[derive(Debug, Clone, clap::Args)]
pub struct ClientOpts {
    /// Kubeconfig to use (default: $KUBECONFIG, then ~/.kube/config).
    #[arg(long, value_name = "FILE")]
    pub kubeconfig: Option<PathBuf>,
    /// Namespace (default: `default`).
    #[arg(short = 'n', long)]
    pub namespace: Option<String>,
}

impl ClientOpts {
    fn client(&self) -> anyhow::Result<Client> {
        let path = match &self.kubeconfig {
            Some(p) => p.clone(),
            None => match std::env::var_os("KUBECONFIG") {
                Some(p) => PathBuf::from(p),
                None => PathBuf::from(std::env::var_os("HOME").context("HOME is not set")?)
                    .join(".kube/config"),
            },
        };
        Ok(Client::from_kubeconfig(&path)?)
    }

    fn ns(&self) -> &str {
        self.namespace.as_deref().unwrap_or("default")
    }
}

fn display_name(rt: &ResourceType) -> String {
    if rt.group.is_empty() {
        rt.singular.to_string()
    } else {
        format!("{}.{}", rt.singular, rt.group)
    }
}

fn read_manifests(file: &Path) -> anyhow::Result<Vec<Value>> {
    let text = if file == Path::new("-") {
        std::io::read_to_string(std::io::stdin()).context("reading stdin")?
    } else {
        std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?
    };
    let docs: Vec<Value> = serde_saphyr::from_str_multiple(&text)
        .with_context(|| format!("parsing {}", file.display()))?;
    Ok(docs.into_iter().filter(|d| !d.is_null()).collect())
}

/// `slipway apply -f FILE`: create or update every object in a YAML file.
#[derive(Debug, Clone, clap::Args)]
pub struct ApplyArgs {
    /// Manifest file (`-` for stdin); several documents separated by `---`.
    #[arg(short = 'f', long = "filename", value_name = "FILE")]
    pub file: PathBuf,
    /// Connection options.
    #[command(flatten)]
    pub opts: ClientOpts,
}

impl ApplyArgs {
    /// Runs, printing one line per object.
    pub async fn run_to(&self, out: &mut (impl Write + Send)) -> anyhow::Result<()> {
        let client = self.opts.client()?;
        for doc in read_manifests(&self.file)? {
            let (rt, name, outcome) = client.apply(&doc, self.opts.ns()).await?;
            writeln!(out, "{}/{name} {outcome}", display_name(rt))?;
        }
        Ok(())
    }

    /// Runs on a new runtime, printing to stdout.
    pub fn run(self) -> anyhow::Result<()> {
        block_on(async move { self.run_to(&mut std::io::stdout()).await })
    }
}

/// `slipway get RESOURCE [NAME]`: the server's Table, or the object as YAML/JSON; `-w` follows.
#[derive(Debug, Clone, clap::Args)]
pub struct GetArgs {
    /// Resource type (`svc`, `clusters`, `hostclass.slipway.dev`).
    pub resource: String,
    /// Object name.
    pub name: Option<String>,
    /// All namespaces.
    #[arg(short = 'A', long)]
    pub all_namespaces: bool,
    /// Label selector.
    #[arg(short = 'l', long)]
    pub selector: Option<String>,
    /// `yaml`, `json` or `wide`.
    #[arg(short = 'o', long)]
    pub output: Option<String>,
    /// Watch for changes after listing.
    #[arg(short = 'w', long)]
    pub watch: bool,
    /// Connection options.
    #[command(flatten)]
    pub opts: ClientOpts,
}

const TABLE_ACCEPT: &str = "application/json;as=Table;v=v1;g=meta.k8s.io,application/json";

impl GetArgs {
    fn path(&self, rt: &ResourceType) -> String {
        let ns = (!self.all_namespaces).then(|| self.opts.ns());
        let mut path = match &self.name {
            Some(n) => object_path(rt, ns, n),
            None => collection_path(rt, ns),
        };
        if let Some(l) = &self.selector {
            path.push_str(&format!("?labelSelector={}", encode_query(l)));
        }
        path
    }

    /// Runs, writing to `out` (a watch runs until the server ends it).
    pub async fn run_to(&self, out: &mut (impl Write + Send)) -> anyhow::Result<()> {
        let client = self.opts.client()?;
        let rt = resolve(&self.resource)?;
        let path = self.path(rt);
        let with_ns = self.all_namespaces && rt.namespaced;
        let rv = match self.output.as_deref() {
            Some("yaml") | Some("json") => {
                let v = client.get_json(&path).await?;
                if self.output.as_deref() == Some("json") {
                    writeln!(out, "{}", serde_json::to_string_pretty(&v)?)?;
                } else {
                    write!(out, "{}", serde_saphyr::to_string(&v)?)?;
                }
                v["metadata"]["resourceVersion"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string()
            }
            other => {
                let r = client
                    .call(Method::GET, &path, None, TABLE_ACCEPT, Vec::new())
                    .await?;
                let table: Value = serde_json::from_slice(&r.body)?;
                let wide = other == Some("wide");
                if table["rows"].as_array().is_none_or(Vec::is_empty) && !self.watch {
                    writeln!(out, "No resources found")?;
                } else {
                    write!(out, "{}", render_table(&table, wide, with_ns, true))?;
                }
                table["metadata"]["resourceVersion"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string()
            }
        };
        out.flush()?;
        if !self.watch {
            return Ok(());
        }
        let ns = (!self.all_namespaces).then(|| self.opts.ns());
        let mut wpath = format!(
            "{}?watch=true&resourceVersion={rv}",
            collection_path(rt, ns)
        );
        if let Some(n) = &self.name {
            wpath.push_str(&format!(
                "&fieldSelector=metadata.name%3D{}",
                encode_query(n)
            ));
        }
        if let Some(l) = &self.selector {
            wpath.push_str(&format!("&labelSelector={}", encode_query(l)));
        }
        let resp = client
            .send(Method::GET, &wpath, None, TABLE_ACCEPT, Vec::new())
            .await?;
        let mut body = resp.into_body();
        let mut pending = Vec::new();
        let mut columns = Value::Null;
        while let Some(frame) = body.frame().await {
            let Ok(data) = frame.map(|f| f.into_data()) else {
                break;
            };
            let Ok(data) = data else { continue };
            pending.extend_from_slice(&data);
            while let Some(pos) = pending.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = pending.drain(..=pos).collect();
                let ev: Value = serde_json::from_slice(&line)?;
                match ev["type"].as_str() {
                    Some("ERROR") => anyhow::bail!(
                        "watch ended: {}",
                        ev["object"]["message"].as_str().unwrap_or_default()
                    ),
                    Some("BOOKMARK") | None => continue,
                    Some(_) => {}
                }
                let mut table = ev["object"].clone();
                if table["columnDefinitions"]
                    .as_array()
                    .is_some_and(|c| !c.is_empty())
                {
                    columns = table["columnDefinitions"].clone();
                } else {
                    table["columnDefinitions"] = columns.clone();
                }
                write!(
                    out,
                    "{}",
                    render_table(
                        &table,
                        self.output.as_deref() == Some("wide"),
                        with_ns,
                        false
                    )
                )?;
                out.flush()?;
            }
        }
        Ok(())
    }

    /// Runs on a new runtime, printing to stdout.
    pub fn run(self) -> anyhow::Result<()> {
        block_on(async move { self.run_to(&mut std::io::stdout()).await })
    }
}

/// `slipway describe RESOURCE NAME`: the object and its events.
#[derive(Debug, Clone, clap::Args)]
pub struct DescribeArgs {
    /// Resource type.
    pub resource: String,
    /// Object name.
    pub name: String,
    /// Connection options.
    #[command(flatten)]
    pub opts: ClientOpts,
}

impl DescribeArgs {
    /// Runs, writing to `out`.
    pub async fn run_to(&self, out: &mut (impl Write + Send)) -> anyhow::Result<()> {
        let client = self.opts.client()?;
        let rt = resolve(&self.resource)?;
        let ns = rt.namespaced.then(|| self.opts.ns());
        let mut obj = client.get_json(&object_path(rt, ns, &self.name)).await?;
        if let Some(a) = obj["metadata"]["annotations"].as_object_mut() {
            a.remove("kubectl.kubernetes.io/last-applied-configuration");
        }
        write!(out, "{}", serde_saphyr::to_string(&obj)?)?;
        let Some(events_rt) = crate::api::registry::lookup("", "v1", "events") else {
            return Ok(());
        };
        let mut selector = format!(
            "involvedObject.name={},involvedObject.kind={}",
            self.name, rt.kind
        );
        if let Some(ns) = ns {
            selector.push_str(&format!(",involvedObject.namespace={ns}"));
        }
        let events_ns = ns.unwrap_or("default");
        let path = format!(
            "{}?fieldSelector={}",
            collection_path(events_rt, Some(events_ns)),
            encode_query(&selector)
        );
        let events = client.get_json(&path).await?;
        let items = events["items"].as_array().cloned().unwrap_or_default();
        if items.is_empty() {
            writeln!(out, "Events: <none>")?;
        } else {
            writeln!(out, "Events:\n  TYPE      REASON          MESSAGE")?;
            for e in items {
                writeln!(
                    out,
                    "  {:<9} {:<15} {}",
                    e["type"].as_str().unwrap_or_default(),
                    e["reason"].as_str().unwrap_or_default(),
                    e["message"].as_str().unwrap_or_default()
                )?;
            }
        }
        Ok(())
    }

    /// Runs on a new runtime, printing to stdout.
    pub fn run(self) -> anyhow::Result<()> {
        block_on(async move { self.run_to(&mut std::io::stdout()).await })
    }
}

/// `slipway delete RESOURCE NAME` or `slipway delete -f FILE`.
#[derive(Debug, Clone, clap::Args)]
pub struct DeleteArgs {
    /// Resource type (with NAME).
    pub resource: Option<String>,
    /// Object name.
    pub name: Option<String>,
    /// Delete the objects of a manifest file instead.
    #[arg(short = 'f', long = "filename", value_name = "FILE")]
    pub file: Option<PathBuf>,
    /// Connection options.
    #[command(flatten)]
    pub opts: ClientOpts,
}

impl DeleteArgs {
    /// Runs, writing to `out`.
    pub async fn run_to(&self, out: &mut (impl Write + Send)) -> anyhow::Result<()> {
        let client = self.opts.client()?;
        let mut targets: Vec<(&'static ResourceType, Option<String>, String)> = Vec::new();
        if let Some(f) = &self.file {
            for doc in read_manifests(f)? {
                let (group, _) = doc["apiVersion"]
                    .as_str()
                    .unwrap_or_default()
                    .split_once('/')
                    .unwrap_or(("", ""));
                let kind = doc["kind"].as_str().unwrap_or_default();
                let rt = crate::api::registry::by_kind(group, kind)
                    .with_context(|| format!("unknown kind {kind}"))?;
                let name = doc["metadata"]["name"]
                    .as_str()
                    .context("manifest without metadata.name")?
                    .to_string();
                let ns = doc["metadata"]["namespace"]
                    .as_str()
                    .map(String::from)
                    .or_else(|| Some(self.opts.ns().to_string()));
                targets.push((rt, ns, name));
            }
        } else {
            let rt = resolve(
                self.resource
                    .as_deref()
                    .context("RESOURCE NAME or -f FILE required")?,
            )?;
            let name = self.name.clone().context("NAME required")?;
            targets.push((rt, Some(self.opts.ns().to_string()), name));
        }
        for (rt, ns, name) in targets {
            let ns = ns.as_deref().filter(|_| rt.namespaced);
            client
                .call(
                    Method::DELETE,
                    &object_path(rt, ns, &name),
                    None,
                    "application/json",
                    Vec::new(),
                )
                .await?;
            writeln!(out, "{} \"{name}\" deleted", display_name(rt))?;
        }
        Ok(())
    }

    /// Runs on a new runtime, printing to stdout.
    pub fn run(self) -> anyhow::Result<()> {
        block_on(async move { self.run_to(&mut std::io::stdout()).await })
    }
}

/// `slipway kubeconfig`: issue a kubeconfig for a user from the supervisor's CA.
#[derive(Debug, Clone, clap::Args)]
pub struct KubeconfigArgs {
    /// The supervisor's data directory (holds the CA and admin.kubeconfig).
    #[arg(long, value_name = "DIR")]
    pub data_dir: PathBuf,
    /// User name (certificate CN).
    #[arg(long, required_unless_present = "cluster")]
    pub user: Option<String>,
    /// Print the admin kubeconfig of workload cluster NAME (its Secret `NAME-kubeconfig`,
    /// made by the Cluster reconciler) instead of issuing one.
    #[arg(long, value_name = "NAME", conflicts_with_all = ["user", "group", "token"])]
    pub cluster: Option<String>,
    /// The cluster's namespace (with --cluster).
    #[arg(long, short = 'n', default_value = "default")]
    pub namespace: String,
    /// Group (certificate O); `system:masters` makes a cluster admin.
    #[arg(long)]
    pub group: Option<String>,
    /// Use this bearer token instead of a client certificate.
    #[arg(long)]
    pub token: Option<String>,
    /// Days the client certificate is valid (at most 365); run again to renew.
    #[arg(long, default_value_t = crate::tls::USER_DAYS, value_parser = clap::value_parser!(u32).range(1..=i64::from(crate::tls::ADMIN_DAYS)))]
    pub days: u32,
    /// Write here instead of stdout.
    #[arg(long, value_name = "FILE")]
    pub out: Option<PathBuf>,
}

impl KubeconfigArgs {
    /// Writes the kubeconfig; the server address is taken from DIR/admin.kubeconfig.
    pub fn run(self) -> anyhow::Result<()> {
        let admin = self.data_dir.join("admin.kubeconfig");
        let text = match &self.cluster {
            Some(cluster) => self.cluster_kubeconfig(&admin, cluster)?,
            None => self.issue(&admin)?,
        };
        match &self.out {
            Some(p) => crate::tls::write_private(p, &text)?,
            None => print!("{text}"),
        }
        Ok(())
    }

    /// A workload cluster's admin kubeconfig, from its Secret in the supervisor.
    fn cluster_kubeconfig(&self, admin: &Path, cluster: &str) -> anyhow::Result<String> {
        let client = Client::from_kubeconfig(admin)?;
        let path = format!(
            "/api/v1/namespaces/{}/secrets/{}",
            self.namespace,
            crate::controllers::clusters::kubeconfig_secret(cluster)
        );
        let secret = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
            .block_on(client.get_json(&path))
            .with_context(|| {
                format!(
                    "cluster {}/{cluster}: no kubeconfig yet (is the Cluster there, and its control plane host up?)",
                    self.namespace
                )
            })?;
        let value = secret["data"]["value"]
            .as_str()
            .and_then(crate::client::base64_decode)
            .with_context(|| format!("{path}: no data.value"))?;
        Ok(String::from_utf8(value)?)
    }

    /// Issues a kubeconfig for --user.
    fn issue(&self, admin: &Path) -> anyhow::Result<String> {
        let user = self.user.as_deref().unwrap_or_default();
        let endpoint = crate::client::Endpoint::from_kubeconfig(admin)?;
        let addr: SocketAddr = endpoint
            .addr
            .parse()
            .with_context(|| format!("server address {} in {}", endpoint.addr, admin.display()))?;
        let pki = Pki::new(&self.data_dir);
        let cred = match &self.token {
            Some(t) => Credential::Token(t.clone()),
            None => {
                anyhow::ensure!(
                    (1..=crate::tls::ADMIN_DAYS).contains(&self.days),
                    "--days: must be between 1 and {}, got {}",
                    crate::tls::ADMIN_DAYS,
                    self.days
                );
                let (cert_pem, key_pem) =
                    pki.issue_client(user, self.group.as_deref(), self.days)?;
                Credential::ClientCert { cert_pem, key_pem }
            }
        };
        Ok(pki.kubeconfig(&crate::tls::authority(addr), user, &cred)?)
    }
}

fn encode_query(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                char::from(b).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn block_on<F: Future<Output = anyhow::Result<()>>>(f: F) -> anyhow::Result<()> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("tokio runtime")?
        .block_on(f)
}

/// Parses `LOW-HIGH` (inclusive, LOW <= HIGH).
fn parse_port_range(s: &str) -> Result<(u16, u16), String> {
    let (lo, hi) = s
        .split_once('-')
        .ok_or_else(|| format!("{s:?}: expected LOW-HIGH"))?;
    let lo: u16 = lo.trim().parse().map_err(|e| format!("{lo:?}: {e}"))?;
    let hi: u16 = hi.trim().parse().map_err(|e| format!("{hi:?}: {e}"))?;
    if lo == 0 || lo > hi {
        return Err(format!("{s:?}: expected 1 <= LOW <= HIGH"));
    }
    Ok((lo, hi))
}
