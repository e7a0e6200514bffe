//! `slipway join`: a machine becomes a host of a supervisor, as `kubeadm join` makes a node.
//! With a bootstrap token and the supervisor's CA it asks for the host's own identity (a
//! `HostJoin`, answered with a kubeconfig for `system:host:<name>`), keeps that kubeconfig in its
//! data dir, and runs the host agent: the heartbeat alone, or with the node datapath when agent
//! flags follow `--`. A restarted join finds its kubeconfig and does not join again. The `netns`
//! provider starts its hosts through this same command.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser as _;
use kube::config::{KubeConfigOptions, Kubeconfig};
use serde_json::{Value, json};
use tracing::{info, warn};

use crate::args::AgentArgs;
use crate::heartbeat::{Heartbeat, HeartbeatArgs};

/// The kubeconfig a joined host keeps, under its data dir.
pub const KUBECONFIG: &str = "supervisor.kubeconfig";

/// How `slipway join` is started.
#[derive(Debug, Clone, clap::Args)]
pub struct JoinArgs {
    /// The supervisor to join (`https://HOST:PORT`).
    #[arg(long)]
    pub supervisor: String,
    /// The bootstrap token (`<id>.<secret>`); prefer --token-file, which keeps it out of `ps`.
    #[arg(long)]
    pub token: Option<String>,
    /// A file holding the bootstrap token.
    #[arg(long = "token-file")]
    pub token_file: Option<PathBuf>,
    /// The supervisor's CA certificate (PEM): the only certificate the join trusts.
    #[arg(long = "ca-file")]
    pub ca_file: PathBuf,
    /// The host's state: the kubeconfig it is given (`supervisor.kubeconfig`) unless
    /// --supervisor-kubeconfig names another path.
    #[arg(long = "host-data-dir", default_value = "/var/lib/slipway/host")]
    pub host_data_dir: PathBuf,
    #[command(flatten)]
    pub heartbeat: HeartbeatArgs,
    /// The node agent's flags (`slipway agent ...`), after `--`: given, the agent runs the node
    /// datapath as well as the heartbeat.
    #[arg(last = true)]
    pub agent: Vec<String>,
}

/// What a host of a Cluster is told on joining, beside its kubeconfig: the cluster's pod CIDR
/// and its own block of it (its Node's `spec.podCIDR`).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct NodeSettings {
    pod_cidr: String,
    host_block: String,
}

/// Parses `slipway agent` flags.
#[derive(Debug, clap::Parser)]
#[command(name = "agent")]
struct AgentCommand {
    #[command(flatten)]
    args: AgentArgs,
}

impl JoinArgs {
    fn token(&self) -> anyhow::Result<String> {
        let token = match (&self.token, &self.token_file) {
            (Some(t), None) => t.clone(),
            (None, Some(f)) => std::fs::read_to_string(f)
                .with_context(|| format!("--token-file: reading {}", f.display()))?,
            (Some(_), Some(_)) => anyhow::bail!("--token and --token-file: give one"),
            (None, None) => anyhow::bail!("--token or --token-file: a bootstrap token is needed"),
        };
        Ok(token.trim().to_owned())
    }

    /// Where a control plane host's workload API server keeps its state (its CA in `pki/`).
    fn api_server_dir(&self) -> PathBuf {
        self.host_data_dir.join("apiserver")
    }

    /// The cluster's link to its supervisor namespace (a kubeconfig), for a control plane host.
    fn supervisor_link_path(&self) -> PathBuf {
        self.host_data_dir.join("supervisor-link.kubeconfig")
    }

    /// The workload cluster's kubeconfig (the node's identity), for a host of a Cluster.
    fn cluster_kubeconfig_path(&self) -> PathBuf {
        self.host_data_dir.join("cluster.kubeconfig")
    }

    /// The node's settings in its cluster ([`NodeSettings`]), for a host of a Cluster.
    fn node_settings_path(&self) -> PathBuf {
        self.host_data_dir.join("node.json")
    }

    /// Writes the host's client certificate and key (PEM, from its kubeconfig) as files for
    /// TLS towards block stores; returns their paths.
    fn host_tls_files(&self, kubeconfig: &Path) -> anyhow::Result<(PathBuf, PathBuf)> {
        let config = Kubeconfig::read_from(kubeconfig)
            .with_context(|| format!("reading {}", kubeconfig.display()))?;
        let auth = config
            .auth_infos
            .first()
            .and_then(|a| a.auth_info.as_ref())
            .with_context(|| format!("{}: no user", kubeconfig.display()))?;
        // The kubeconfig's data fields are base64, as a ByteString's JSON is.
        let decode = |field: &str, b64: Option<String>| -> anyhow::Result<Vec<u8>> {
            let b64 = b64.with_context(|| format!("{}: no {field}", kubeconfig.display()))?;
            Ok(
                serde_json::from_value::<k8s_openapi::ByteString>(Value::String(b64))
                    .with_context(|| format!("{}: {field}", kubeconfig.display()))?
                    .0,
            )
        };
        let cert = decode(
            "client-certificate-data",
            auth.client_certificate_data.clone(),
        )?;
        let key = decode(
            "client-key-data",
            auth.client_key_data
                .as_ref()
                .map(|k| secrecy::ExposeSecret::expose_secret(k).to_owned()),
        )?;
        let dir = self.host_data_dir.join("nbd-tls");
        let (cert_path, key_path) = (dir.join("tls.crt"), dir.join("tls.key"));
        crate::run::write_atomically_with_mode(&cert_path, &cert, 0o644)
            .with_context(|| format!("writing {}", cert_path.display()))?;
        crate::run::write_atomically_with_mode(&key_path, &key, 0o600)
            .with_context(|| format!("writing {}", key_path.display()))?;
        Ok((cert_path, key_path))
    }

    fn kubeconfig_path(&self) -> PathBuf {
        self.heartbeat
            .kubeconfig
            .clone()
            .unwrap_or_else(|| self.host_data_dir.join(KUBECONFIG))
    }

    /// Asks the supervisor for the host's identity; returns its answer (the kubeconfig, and
    /// for a control plane host the cluster's CA).
    async fn ask(&self, host: &str, token: &str) -> Result<Value, kube::Error> {
        let bootstrap: Kubeconfig = serde_json::from_value(json!({
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "supervisor", "cluster": {
                "server": self.supervisor,
                "certificate-authority": self.ca_file,
            }}],
            "users": [{"name": "bootstrap", "user": {"token": token}}],
            "contexts": [{"name": "join", "context": {"cluster": "supervisor", "user": "bootstrap"}}],
            "current-context": "join",
        }))
        .map_err(kube::Error::SerdeError)?;
        let config = kube::Config::from_custom_kubeconfig(bootstrap, &KubeConfigOptions::default())
            .await
            .map_err(kube::Error::InferKubeconfig)?;
        let client = kube::Client::try_from(config)?;
        let body = json!({
            "apiVersion": format!("{}/{}", slipway_api::slipway::GROUP, slipway_api::slipway::VERSION),
            "kind": "HostJoin",
            "spec": {
                "hostName": host,
                "zone": self.heartbeat.zone,
                "hostClass": (!self.heartbeat.host_class.is_empty()).then_some(&self.heartbeat.host_class),
            },
        });
        let request = hyper::Request::post(format!(
            "/apis/{}/{}/hostjoins",
            slipway_api::slipway::GROUP,
            slipway_api::slipway::VERSION
        ))
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .body(serde_json::to_vec(&body).map_err(kube::Error::SerdeError)?)
        .map_err(kube::Error::HttpError)?;
        client.request(request).await
    }

    /// Joins (unless a kubeconfig from an earlier join is there) and returns the kubeconfig's
    /// path. Unreachable supervisors are retried with back-off; a refusal is final.
    pub async fn join(&self) -> anyhow::Result<PathBuf> {
        let path = self.kubeconfig_path();
        let host = self
            .heartbeat
            .host_name
            .clone()
            .filter(|h| !h.is_empty())
            .context("--host-name: required")?;
        anyhow::ensure!(!self.heartbeat.zone.is_empty(), "--zone: required");
        if path.exists() {
            info!(kubeconfig = %path.display(), "joined before: keeping the host's kubeconfig");
            return Ok(path);
        }
        let token = self.token()?;
        let mut delay = Duration::from_millis(200);
        let answer = loop {
            match self.ask(&host, &token).await {
                Ok(a) => break a,
                Err(kube::Error::Api(s)) if (400..500).contains(&s.code) => {
                    anyhow::bail!("joining {}: {} ({})", self.supervisor, s.message, s.code)
                }
                Err(e) => {
                    warn!(supervisor = %self.supervisor, error = %e, retry_in = ?delay, "cannot join yet");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
            }
        };
        let kubeconfig = answer
            .pointer("/status/kubeconfig")
            .and_then(Value::as_str)
            .context("the supervisor's HostJoin answer carries no kubeconfig")?;
        // A control plane host's bootstrap data first: a kubeconfig on disk means "joined".
        if let Some(cp) = answer
            .pointer("/status/controlPlane")
            .filter(|v| !v.is_null())
        {
            let pki = self.api_server_dir().join("pki");
            write_ca(&pki, cp, "controlPlane")?;
            if let Some(link) = cp["supervisorLink"].as_str().filter(|l| !l.is_empty()) {
                crate::run::write_atomically_with_mode(
                    &self.supervisor_link_path(),
                    link.as_bytes(),
                    0o600,
                )
                .context("writing the cluster's supervisor link")?;
            }
            // Three control plane hosts: the cluster's etcd CA, for this host's member.
            if let Some(etcd) = cp.get("etcd").filter(|v| !v.is_null()) {
                write_ca(&pki.join("etcd"), etcd, "controlPlane.etcd")?;
            }
            let settings = json!({
                "serviceCidr": cp["serviceCidr"],
                "cluster": cp["cluster"],
                "endpoint": cp["endpoint"],
                "etcd": cp["etcd"].get("joinAt").map(|_| json!({
                    "joinAt": cp["etcd"]["joinAt"],
                    "mayStart": cp["etcd"]["mayStart"],
                    "after": cp["etcd"]["after"],
                })),
            });
            crate::run::write_atomically(
                &self.api_server_dir().join("bootstrap.json"),
                settings.to_string().as_bytes(),
            )
            .context("writing the API server's settings")?;
            info!(cluster = %cp["cluster"], "control plane host: the cluster's CA kept");
        }
        // A host of a Cluster: its Node's credentials and pod block.
        if let Some(node) = answer.pointer("/status/node").filter(|v| !v.is_null()) {
            let cluster_kubeconfig = node["kubeconfig"]
                .as_str()
                .filter(|k| !k.is_empty())
                .context("the HostJoin answer's node carries no kubeconfig")?;
            let settings: NodeSettings = serde_json::from_value(node.clone())
                .context("the HostJoin answer's node settings")?;
            crate::run::write_atomically_with_mode(
                &self.cluster_kubeconfig_path(),
                cluster_kubeconfig.as_bytes(),
                0o600,
            )
            .context("writing the cluster's kubeconfig")?;
            crate::run::write_atomically(
                &self.node_settings_path(),
                serde_json::to_string(&settings)?.as_bytes(),
            )
            .context("writing the node's settings")?;
            info!(cluster = %node["cluster"], block = %settings.host_block, "a node of its cluster");
        }
        crate::edge::keep_settings(&self.host_data_dir, &answer)?;
        crate::run::write_atomically_with_mode(&path, kubeconfig.as_bytes(), 0o600)
            .with_context(|| format!("writing {}", path.display()))?;
        info!(%host, zone = %self.heartbeat.zone, supervisor = %self.supervisor, "joined");
        Ok(path)
    }
}

/// Writes the CA of `part` of the HostJoin answer (`caCert`, `caKey`) as `ca.crt` and
/// `ca.key` (0600) in `dir`.
fn write_ca(dir: &Path, part: &Value, what: &str) -> anyhow::Result<()> {
    for (file, key, mode) in [("ca.crt", "caCert", 0o644), ("ca.key", "caKey", 0o600)] {
        let pem = part[key]
            .as_str()
            .filter(|p| !p.is_empty())
            .with_context(|| format!("the HostJoin answer's {what} carries no {key}"))?;
        crate::run::write_atomically_with_mode(&dir.join(file), pem.as_bytes(), mode)
            .with_context(|| format!("writing {}", dir.join(file).display()))?;
    }
    Ok(())
}

/// The local address this machine reaches `url`'s host from: the host's address as the
/// supervisor sees it, when no datapath names an underlay device.
fn address_towards(url: &str) -> anyhow::Result<String> {
    let uri: hyper::Uri = url
        .parse()
        .with_context(|| format!("--supervisor: {url:?}"))?;
    let host = uri
        .host()
        .with_context(|| format!("--supervisor: {url:?} names no host"))?
        .trim_start_matches('[')
        .trim_end_matches(']');
    let ip: std::net::IpAddr = host
        .parse()
        .with_context(|| format!("--supervisor: {host:?} is not an IP address"))?;
    let socket = std::net::UdpSocket::bind((
        if ip.is_ipv4() {
            std::net::IpAddr::from([0, 0, 0, 0])
        } else {
            std::net::IpAddr::from([0u16; 8])
        },
        0,
    ))?;
    socket
        .connect((ip, uri.port_u16().unwrap_or(443)))
        .with_context(|| format!("--supervisor: no route to {ip}"))?;
    Ok(socket.local_addr()?.ip().to_string())
}

fn hb_name(args: &JoinArgs) -> &str {
    args.heartbeat.host_name.as_deref().unwrap_or_default()
}

/// What a control plane host's API server was given when it joined (`bootstrap.json`).
fn api_server_bootstrap(dir: &Path) -> Value {
    std::fs::read(dir.join("bootstrap.json"))
        .ok()
        .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
        .unwrap_or_default()
}

/// Runs this host's member of the cluster's etcd (`slipway etcd-member`, which becomes etcd),
/// restarting it with back-off when it exits; it dies with the agent.
/// `etcd` is the member's part of the bootstrap data (`joinAt`, `mayStart`, `after`).
async fn serve_etcd_member(
    dir: PathBuf,
    host: String,
    address: String,
    etcd: Value,
) -> anyhow::Result<()> {
    let join_at = etcd["joinAt"].as_str().unwrap_or_default().to_owned();
    let after: Vec<String> = etcd["after"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|n| n.as_str().map(str::to_owned))
        .collect();
    let exe = std::env::current_exe().context("the slipway binary")?;
    let log = dir.with_file_name("etcd.log");
    crate::supervise::supervise("the cluster's etcd member", &log, || {
        let mut command = tokio::process::Command::new(&exe);
        command
            .arg("etcd-member")
            .arg("--data-dir")
            .arg(&dir)
            .args([
                "--name",
                &host,
                "--address",
                &address,
                "--join-at",
                &join_at,
            ]);
        if etcd["mayStart"].as_bool() == Some(true) {
            command.arg("--may-start");
        }
        for name in &after {
            command.args(["--after", name]);
        }
        Ok(command)
    })
    .await
}

/// Runs the workload cluster's API server (`slipway supervisor`, the same server code) on a
/// control plane host, restarting it with back-off when it exits; it dies with the agent. With
/// three control plane hosts, its store is the cluster's etcd: this host's member first, then
/// any member through the control plane endpoint.
async fn serve_cluster_api(
    dir: PathBuf,
    link: PathBuf,
    address: String,
    port: u16,
) -> anyhow::Result<()> {
    let exe = std::env::current_exe().context("the slipway binary")?;
    let log = dir.with_extension("log");
    let bootstrap = api_server_bootstrap(&dir);
    let etcd_tls = slipway_supervisor::etcd_member::api_server_tls(&dir);
    if let Some(join_at) = bootstrap["etcd"]["joinAt"].as_str() {
        // The etcd member issues the API server's client certificate before it starts.
        let mut waiting = tokio::time::interval(Duration::from_millis(100));
        while !etcd_tls.key.exists() {
            waiting.tick().await;
        }
        info!(%join_at, "the API server's store: the cluster's etcd");
    }
    crate::supervise::supervise("the workload cluster's API server", &log, || {
        let mut command = tokio::process::Command::new(&exe);
        command
            .arg("supervisor")
            .arg("--data-dir")
            .arg(&dir)
            .args([
                "--listen",
                &format!("0.0.0.0:{port}"),
                "--advertise-address",
                &address,
            ])
            .arg("--cluster-controllers");
        if let Some(endpoint) = bootstrap["endpoint"].as_str() {
            command.args(["--advertise-address", endpoint]);
        }
        if let Some(join_at) = bootstrap["etcd"]["joinAt"].as_str() {
            let port = slipway_supervisor::etcd_member::CLIENT_PORT;
            command
                .arg(format!(
                    "--store=etcd://https://127.0.0.1:{port},https://{join_at}:{port}"
                ))
                .arg("--etcd-cafile")
                .arg(&etcd_tls.ca)
                .arg("--etcd-certfile")
                .arg(&etcd_tls.cert)
                .arg("--etcd-keyfile")
                .arg(&etcd_tls.key);
        }
        if let Some(cidr) = bootstrap["serviceCidr"].as_str() {
            command.args(["--service-cluster-ip-range", cidr]);
        }
        if let (Some(ns), Some(cluster), true) = (
            bootstrap["cluster"]["namespace"].as_str(),
            bootstrap["cluster"]["name"].as_str(),
            link.exists(),
        ) {
            command.arg("--supervisor-link").arg(&link).args([
                "--supervisor-namespace",
                ns,
                "--cluster-name",
                cluster,
            ]);
        }
        Ok(command)
    })
    .await
}

/// `slipway join`: joins, then runs the host agent until SIGTERM/SIGINT.
pub async fn run(args: JoinArgs) -> anyhow::Result<()> {
    let kubeconfig = args.join().await?;
    let mut etcd = None;
    let api_server = if args.api_server_dir().join("pki/ca.key").exists() {
        let address = address_towards(&args.supervisor)?;
        info!(%address, "control plane host: serving the workload cluster's API");
        let bootstrap = api_server_bootstrap(&args.api_server_dir());
        if bootstrap["etcd"]["joinAt"].is_string() {
            etcd = Some(tokio::spawn(serve_etcd_member(
                args.api_server_dir(),
                hb_name(&args).to_owned(),
                address.clone(),
                bootstrap["etcd"].clone(),
            )));
        }
        Some(tokio::spawn(serve_cluster_api(
            args.api_server_dir(),
            args.supervisor_link_path(),
            address,
            CLUSTER_API_PORT,
        )))
    } else {
        None
    };
    let edge = crate::edge::settings_path(&args.host_data_dir)
        .exists()
        .then(|| {
            tokio::spawn(crate::edge::serve(
                args.host_data_dir.clone(),
                args.agent.clone(),
                kubeconfig.clone(),
                hb_name(&args).to_owned(),
            ))
        });
    let result = run_agent(&args, kubeconfig).await;
    for task in [api_server, etcd, edge].into_iter().flatten() {
        task.abort();
    }
    result
}

/// The port a control plane host serves its cluster's API on.
pub const CLUSTER_API_PORT: u16 = 6443;

async fn run_agent(args: &JoinArgs, kubeconfig: PathBuf) -> anyhow::Result<()> {
    // The datapath needs a pod CIDR: from the flags, or from the cluster the host serves. A
    // host that serves none (yet) runs the heartbeat alone.
    let node = args.node_settings_path().exists();
    let has_cidr = args
        .agent
        .iter()
        .any(|a| a == "--pod-cidr" || a.starts_with("--pod-cidr="));
    if !args.agent.is_empty() && !node && !has_cidr {
        info!("the host serves no cluster: the heartbeat runs without the node datapath");
    }
    if args.agent.is_empty() || (!node && !has_cidr) {
        let address = address_towards(&args.supervisor)?;
        let mut heartbeat = args.heartbeat.clone();
        heartbeat.kubeconfig = Some(kubeconfig);
        let Some((path, reg)) = heartbeat.registration(address)? else {
            anyhow::bail!("--supervisor-kubeconfig: no registration");
        };
        let beat = Heartbeat::connect(&path, reg).await?;
        println!(
            "slipway join: host {} joined {}",
            hb_name(args),
            args.supervisor
        );
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            r = beat.run() => r,
            _ = term.recv() => Ok(()),
            _ = tokio::signal::ctrl_c() => Ok(()),
        }
    } else {
        let mut argv = vec!["agent".to_owned()];
        argv.extend(args.agent.iter().cloned());
        // A node of a Cluster: the cluster's settings complete the host's flags.
        if let Ok(text) = std::fs::read(args.node_settings_path()) {
            let node: NodeSettings = serde_json::from_slice(&text)
                .with_context(|| format!("{}", args.node_settings_path().display()))?;
            argv.extend([
                "--pod-cidr".into(),
                node.pod_cidr,
                "--host-block".into(),
                node.host_block,
                "--cluster-kubeconfig".into(),
                args.cluster_kubeconfig_path().display().to_string(),
                "--node-name".into(),
                hb_name(args).to_owned(),
            ]);
        }
        // The CSI node plugin opens block store exports over TLS with the host's own
        // certificate (it names the host, as export allow-lists do), trusting the supervisor's CA.
        if args
            .agent
            .iter()
            .any(|a| a == "--csi-dir" || a.starts_with("--csi-dir="))
        {
            let (cert, key) = args.host_tls_files(&kubeconfig)?;
            argv.extend([
                "--csi-nbd-tls-ca".into(),
                args.ca_file.display().to_string(),
                "--csi-nbd-tls-cert".into(),
                cert.display().to_string(),
                "--csi-nbd-tls-key".into(),
                key.display().to_string(),
            ]);
        }
        let hb = &args.heartbeat;
        argv.extend([
            "--supervisor-kubeconfig".into(),
            kubeconfig.display().to_string(),
            "--host-name".into(),
            hb_name(args).to_owned(),
            "--zone".into(),
            hb.zone.clone(),
            "--host-class".into(),
            hb.host_class.clone(),
            "--lease-interval".into(),
            humantime::format_duration(hb.lease_interval).to_string(),
            "--lease-duration".into(),
            humantime::format_duration(hb.lease_duration).to_string(),
        ]);
        let agent = AgentCommand::try_parse_from(&argv)
            .map_err(|e| anyhow::anyhow!("the agent's flags after `--`: {e}"))?;
        crate::run::run(agent.args).await
    }
}
