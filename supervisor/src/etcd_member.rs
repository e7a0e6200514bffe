//! One member of a workload cluster's etcd on a control plane host (kubeadm's "stacked" etcd):
//! `slipway etcd-member` prepares the member and then becomes etcd (Debian's `etcd`), so the
//! host agent supervises etcd itself.
//!
//! A member with data starts from it. A new one (empty data dir) asks the members already
//! running, through the cluster's control plane endpoint, to add it (removing first a member of
//! its own name or peer URL: the host it replaces), and starts with `--initial-cluster-state
//! existing`. Only the first control plane host of a cluster that never ran may start a new
//! etcd cluster, and only when nobody answers at the endpoint. Members speak TLS to clients
//! and peers with certificates of the cluster's etcd CA, and trust nothing else.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;
use etcd_client::{Client, ConnectOptions};
use tracing::info;

use crate::store::etcd::EtcdTls;
use crate::tls::{ADMIN_DAYS, Pki};

/// The port members serve clients on.
pub const CLIENT_PORT: u16 = 2379;
/// The port members speak to their peers on.
pub const PEER_PORT: u16 = 2380;

/// Arguments of `slipway etcd-member`.
#[derive(Debug, Clone, clap::Args)]
pub struct EtcdMemberArgs {
    /// The control plane host's API server directory: the etcd CA in DIR/pki/etcd/ (ca.crt,
    /// ca.key), the member's data in DIR/etcd/.
    #[arg(long, value_name = "DIR")]
    pub data_dir: PathBuf,
    /// The member's name (its host's).
    #[arg(long)]
    pub name: String,
    /// The host's address, which the member serves on (with 127.0.0.1 for clients).
    #[arg(long, value_name = "IP")]
    pub address: IpAddr,
    /// The cluster's control plane endpoint: a new member joins through it, and every
    /// member's certificate names it.
    #[arg(long, value_name = "IP")]
    pub join_at: IpAddr,
    /// Start a new etcd cluster when nobody answers at --join-at (the first control plane
    /// host of a cluster that never ran).
    #[arg(long)]
    pub may_start: bool,
    /// A member that must run before this one joins (repeatable): members join one at a
    /// time, and a cluster with a member added but not started takes no other.
    #[arg(long = "after", value_name = "NAME")]
    pub after: Vec<String>,
    /// The etcd binary.
    #[arg(long, default_value = "etcd")]
    pub etcd: PathBuf,
}

/// Where a control plane host keeps its etcd certificates, under its API server directory.
pub fn pki_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("pki").join("etcd")
}

/// The TLS files the API server reaches its etcd with (made by [`prepare_certificates`]).
pub fn api_server_tls(data_dir: &Path) -> EtcdTls {
    let dir = pki_dir(data_dir);
    EtcdTls {
        ca: dir.join("ca.crt"),
        cert: dir.join("apiserver-etcd-client.crt"),
        key: dir.join("apiserver-etcd-client.key"),
    }
}

fn member_tls(data_dir: &Path) -> EtcdTls {
    let dir = pki_dir(data_dir);
    EtcdTls {
        ca: dir.join("ca.crt"),
        cert: dir.join("member.crt"),
        key: dir.join("member.key"),
    }
}

fn https(ip: IpAddr, port: u16) -> String {
    match ip {
        IpAddr::V4(a) => format!("https://{a}:{port}"),
        IpAddr::V6(a) => format!("https://[{a}]:{port}"),
    }
}

/// Issues the member's certificate (serving its clients and peers at its address, 127.0.0.1
/// and the endpoint) and the API server's client certificate, from the etcd CA; each is
/// reissued when its names change. Written before the member starts, the latter last.
pub fn prepare_certificates(args: &EtcdMemberArgs) -> anyhow::Result<()> {
    let pki = Pki::at(&pki_dir(&args.data_dir));
    let names = vec![
        args.name.clone(),
        args.address.to_string(),
        args.join_at.to_string(),
        "127.0.0.1".to_owned(),
        "localhost".to_owned(),
    ];
    let member = member_tls(&args.data_dir);
    let names_file = pki_dir(&args.data_dir).join("member.names");
    if std::fs::read_to_string(&names_file).ok() != Some(names.join("\n")) || !member.key.exists() {
        let (cert, key) = pki.issue_peer(&names, ADMIN_DAYS)?;
        crate::tls::write_private(&member.key, &key)?;
        crate::tls::write_private(&member.cert, &cert)?;
        std::fs::write(&names_file, names.join("\n"))
            .with_context(|| format!("writing {}", names_file.display()))?;
    }
    let client = api_server_tls(&args.data_dir);
    if !client.key.exists() {
        let (cert, key) = pki.issue_client("kube-apiserver-etcd-client", None, ADMIN_DAYS)?;
        crate::tls::write_private(&client.cert, &cert)?;
        crate::tls::write_private(&client.key, &key)?;
    }
    Ok(())
}

/// How the member starts: `new` (a cluster of itself) or `existing` with the members it
/// joins; the `--initial-cluster` value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Start {
    pub state: &'static str,
    pub initial_cluster: String,
}

/// Joins the running members through the endpoint (replacing a member of the same name or
/// peer URL), or starts a new cluster when allowed and nobody answers.
async fn membership(args: &EtcdMemberArgs) -> anyhow::Result<Start> {
    let peer_url = https(args.address, PEER_PORT);
    let endpoint = https(args.join_at, CLIENT_PORT);
    let opts = ConnectOptions::new()
        .with_connect_timeout(Duration::from_secs(2))
        .with_timeout(Duration::from_secs(5))
        .with_tls(member_tls(&args.data_dir).options()?);
    let mut waited = String::new();
    let (mut client, list) = loop {
        let connected = match Client::connect([&endpoint], Some(opts.clone())).await {
            Ok(mut c) => c.member_list().await.map(|l| (c, l)),
            Err(e) => Err(e),
        };
        match connected {
            Ok((client, list)) => {
                // One new member at a time: those this one comes after run, and no other
                // member is added but not started (an unstarted one of this host's peer URL
                // is this host's own earlier attempt, removed below).
                let started: BTreeSet<&str> = list.members().iter().map(|m| m.name()).collect();
                let missing = args.after.iter().find(|n| !started.contains(n.as_str()));
                let unstarted = list
                    .members()
                    .iter()
                    .find(|m| m.name().is_empty() && !m.peer_urls().contains(&peer_url));
                let why = match (missing, unstarted) {
                    (Some(name), _) => format!("member {name} to start"),
                    (None, Some(m)) => format!("member {:?} to start", m.peer_urls()),
                    (None, None) => break (client, list),
                };
                if waited != why {
                    info!(%endpoint, "waiting for {why} before joining");
                    waited = why;
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) if args.may_start => {
                info!(%endpoint, error = %e, "no etcd member answers: starting a new etcd cluster");
                return Ok(Start {
                    state: "new",
                    initial_cluster: format!("{}={peer_url}", args.name),
                });
            }
            Err(e) => {
                let why = "an etcd member to answer".to_owned();
                if waited != why {
                    info!(%endpoint, error = %e, "waiting for {why}");
                    waited = why;
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    };
    // The host this one replaces: a started member of this name or peer URL goes. An
    // unstarted one of this peer URL is this host's own earlier attempt (added, then the
    // process died before etcd ran): it is taken as it is.
    let own_attempt = list
        .members()
        .iter()
        .find(|m| m.name().is_empty() && m.peer_urls().contains(&peer_url))
        .map(etcd_client::Member::id);
    for old in list.members().iter().filter(|m| {
        !m.name().is_empty() && (m.name() == args.name || m.peer_urls().contains(&peer_url))
    }) {
        info!(id = %format!("{:x}", old.id()), name = old.name(), "removing the member this host replaces");
        client
            .member_remove(old.id())
            .await
            .with_context(|| format!("removing etcd member {:x}", old.id()))?;
    }
    let (members, new_id) = match own_attempt {
        Some(id) => (client.member_list().await?.members().to_vec(), id),
        None => {
            let added = client
                .member_add([peer_url.as_str()], None)
                .await
                .context("adding this host as an etcd member")?;
            let id = added
                .member()
                .map(etcd_client::Member::id)
                .context("etcd did not say which member it added")?;
            (added.member_list().to_vec(), id)
        }
    };
    let mut initial = Vec::new();
    for m in &members {
        let name = if m.id() == new_id {
            args.name.as_str()
        } else {
            m.name()
        };
        anyhow::ensure!(
            !name.is_empty(),
            "etcd member {:x} ({:?}) was added but never started: a cluster takes one new member at a time",
            m.id(),
            m.peer_urls()
        );
        for url in m.peer_urls() {
            initial.push(format!("{name}={url}"));
        }
    }
    info!(members = initial.len(), "joined the etcd cluster");
    Ok(Start {
        state: "existing",
        initial_cluster: initial.join(","),
    })
}

/// The etcd command line of the member.
pub fn etcd_command(args: &EtcdMemberArgs, start: &Start) -> std::process::Command {
    let tls = member_tls(&args.data_dir);
    let client_url = https(args.address, CLIENT_PORT);
    let peer_url = https(args.address, PEER_PORT);
    let mut command = std::process::Command::new(&args.etcd);
    command
        .arg("--name")
        .arg(&args.name)
        .arg("--data-dir")
        .arg(args.data_dir.join("etcd"))
        .arg("--listen-client-urls")
        .arg(format!(
            "{client_url},{}",
            https(IpAddr::from([127, 0, 0, 1]), CLIENT_PORT)
        ))
        .arg("--advertise-client-urls")
        .arg(&client_url)
        .arg("--listen-peer-urls")
        .arg(&peer_url)
        .arg("--initial-advertise-peer-urls")
        .arg(&peer_url)
        .arg("--initial-cluster")
        .arg(&start.initial_cluster)
        .arg("--initial-cluster-state")
        .arg(start.state)
        .args(["--client-cert-auth", "--peer-client-cert-auth"])
        .arg("--trusted-ca-file")
        .arg(&tls.ca)
        .arg("--cert-file")
        .arg(&tls.cert)
        .arg("--key-file")
        .arg(&tls.key)
        .arg("--peer-trusted-ca-file")
        .arg(&tls.ca)
        .arg("--peer-cert-file")
        .arg(&tls.cert)
        .arg("--peer-key-file")
        .arg(&tls.key);
    command
}

/// `slipway etcd-member`: prepares the member, then becomes etcd (returns only on error).
pub async fn run(args: EtcdMemberArgs) -> anyhow::Result<()> {
    prepare_certificates(&args)?;
    let data = args.data_dir.join("etcd").join("member");
    let start = if data.exists() {
        // etcd starts from its data and ignores the initial cluster.
        info!(data = %data.display(), "starting from the member's data");
        Start {
            state: "existing",
            initial_cluster: format!("{}={}", args.name, https(args.address, PEER_PORT)),
        }
    } else {
        membership(&args).await?
    };
    let error = etcd_command(&args, &start).exec();
    Err(anyhow::anyhow!("running {}: {error}", args.etcd.display()))
}
