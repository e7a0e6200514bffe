//! The Host reconciler: Hosts whose `spec.provider` is `netns` become hosts on this machine.
//! Level-triggered (every Host event, and every period, it compares the Hosts in the API with the
//! hosts the provider has and makes only the difference) and safe to kill at any point: the
//! finalizer is on a Host before anything is made for it, the provider finds half-made hosts
//! again, and a host the API no longer knows is removed.
//!
//! A netns host joins the supervisor as a real machine does: its agent runs
//! `slipway join --token-file ...` with a bootstrap token bound to that host (a Secret in
//! `slipway-system`, labelled with the host's name and removed with it), reaching the supervisor
//! through the provider's uplink.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use futures_util::StreamExt as _;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{
    Api, ApiResource, DeleteParams, DynamicObject, GroupVersionKind, ListParams, Patch,
    PatchParams, PostParams,
};
use kube::runtime::watcher;
use serde_json::{Value, json};
use slipway_api::slipway::{GROUP, HOST_LEASE_NAMESPACE, HostClassSpec, VERSION};
use tracing::{debug, info, warn};

use crate::netns::NetnsProvider;
use crate::{HostError, HostPhase, HostProvider, HostSpec};

/// The finalizer the reconciler keeps on the Hosts it provisions.
pub const FINALIZER: &str = "slipway.dev/host-provider";

/// The label naming the host a bootstrap token was made for.
pub const HOST_LABEL: &str = "slipway.dev/host";

/// How often the reconciler looks when nothing changes (a host's process may die without an
/// API event).
pub const PERIOD: Duration = Duration::from_secs(2);

/// How a netns host's agent joins.
#[derive(Debug, Clone)]
pub struct JoinSettings {
    /// The `slipway` binary the hosts run.
    pub binary: PathBuf,
    /// The supervisor's URL as the hosts reach it (through the uplink).
    pub supervisor_url: String,
    /// The supervisor's CA certificate.
    pub ca_file: PathBuf,
    /// Where bootstrap token files are kept (`<dir>/<host>.token`, 0600).
    pub token_dir: PathBuf,
    /// Hosts' data dirs are made under this.
    pub data_root: PathBuf,
    /// The agents' Lease renewal interval and duration.
    pub lease_interval: Duration,
    pub lease_duration: Duration,
    /// Flags for the node agent, passed after `--` (none: the heartbeat alone).
    pub agent_flags: Vec<String>,
}

/// The longest a failing host waits before it is tried again.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// Provisions netns Hosts.
#[derive(Debug)]
pub struct HostReconciler {
    provider: Arc<NetnsProvider>,
    /// Hosts whose making failed: when to try again, and the wait after that.
    backoff: std::sync::Mutex<std::collections::HashMap<String, (std::time::Instant, Duration)>>,
    join: JoinSettings,
    hosts: Api<DynamicObject>,
    classes: Api<DynamicObject>,
    secrets: Api<Secret>,
    /// The hosts' Leases (named after them).
    leases: Api<k8s_openapi::api::coordination::v1::Lease>,
}

fn host_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk(GROUP, VERSION, "Host"), "hosts")
}

fn str_at<'a>(v: &'a Value, pointer: &str) -> &'a str {
    v.pointer(pointer)
        .and_then(Value::as_str)
        .unwrap_or_default()
}

/// Whether `e` is a write that lost a race (409 Conflict).
pub fn is_conflict(e: &anyhow::Error) -> bool {
    e.chain().any(
        |c| matches!(c.downcast_ref::<kube::Error>(), Some(kube::Error::Api(s)) if s.code == 409),
    )
}

/// RFC 3339 (whole seconds, UTC) of now plus `after`.
fn rfc3339(after: Duration) -> String {
    let t = k8s_openapi::jiff::Timestamp::now()
        .checked_add(after)
        .unwrap_or_else(|_| k8s_openapi::jiff::Timestamp::now());
    format!("{:.0}", t)
}

/// A bootstrap token, kubeadm's format: 6 and 16 characters of `[a-z0-9]`.
fn new_token() -> std::io::Result<(String, String)> {
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let mut bytes = [0u8; 22];
    std::io::Read::read_exact(&mut std::fs::File::open("/dev/urandom")?, &mut bytes)?;
    // 256 is not a multiple of 36: drop the biased top values' effect by rejection would cost
    // more bytes; 256 % 36 = 4 leaves a bias of under 2 % on four letters, which a 100-bit
    // secret with a one-hour expiry tolerates.
    let text: String = bytes
        .iter()
        .map(|b| char::from(ALPHABET[usize::from(*b) % ALPHABET.len()]))
        .collect();
    Ok((text[..6].to_owned(), text[6..].to_owned()))
}

impl HostReconciler {
    pub fn new(client: kube::Client, provider: Arc<NetnsProvider>, join: JoinSettings) -> Self {
        Self {
            provider,
            backoff: std::sync::Mutex::default(),
            join,
            hosts: Api::all_with(client.clone(), &host_resource()),
            classes: Api::all_with(
                client.clone(),
                &ApiResource::from_gvk_with_plural(
                    &GroupVersionKind::gvk(GROUP, VERSION, "HostClass"),
                    "hostclasses",
                ),
            ),
            secrets: Api::namespaced(client.clone(), HOST_LEASE_NAMESPACE),
            leases: Api::namespaced(client, HOST_LEASE_NAMESPACE),
        }
    }

    /// Runs until the task is dropped: a pass at every Host event and every [`PERIOD`].
    pub async fn run(self) -> anyhow::Result<()> {
        let mut events = watcher(self.hosts.clone(), watcher::Config::default()).boxed();
        let mut tick = tokio::time::interval(PERIOD);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                e = events.next() => {
                    if let Some(Err(e)) = e {
                        warn!(error = %e, "watching Hosts");
                    }
                }
            }
            match self.reconcile_all().await {
                Ok(()) => {}
                // Another writer got there first: the next pass starts from what it wrote.
                Err(e) if is_conflict(&e) => {
                    debug!(error = %format!("{e:#}"), "conflict; next pass")
                }
                Err(e) => warn!(error = %format!("{e:#}"), "host reconciler pass failed; retrying"),
            }
        }
    }

    /// One pass over every netns Host and every host the provider has.
    pub async fn reconcile_all(&self) -> anyhow::Result<()> {
        let hosts: Vec<DynamicObject> = self
            .hosts
            .list(&ListParams::default())
            .await
            .context("listing Hosts")?
            .items
            .into_iter()
            .filter(|h| str_at(&h.data, "/spec/provider") == "netns")
            .collect();
        // Only the hosts this reconciler makes (under its data root): the provider's other
        // hosts (the storage hosts) are not Hosts and no orphans.
        let made: BTreeSet<String> = self
            .provider
            .list()
            .await?
            .into_iter()
            .filter(|h| h.spec.data_root == self.join.data_root)
            .map(|h| h.spec.name)
            .collect();
        let mut wanted = BTreeSet::new();
        for host in &hosts {
            let name = host.metadata.name.clone().unwrap_or_default();
            let finalizers = host.metadata.finalizers.clone().unwrap_or_default();
            let ours = finalizers.iter().any(|f| f == FINALIZER);
            if host.metadata.deletion_timestamp.is_some() {
                if ours {
                    self.remove(&name, &finalizers).await?;
                }
                continue;
            }
            wanted.insert(name.clone());
            if !ours {
                // Before anything is made: a deletion from now on waits for the teardown.
                let mut with = finalizers.clone();
                with.push(FINALIZER.to_owned());
                self.set_finalizers(&name, &with).await?;
            }
            let needs_making = !made.contains(&name)
                || matches!(
                    self.provider.status(&name).await.map(|s| s.phase),
                    Ok(HostPhase::Creating | HostPhase::Lost)
                );
            if !needs_making || self.backing_off(&name) {
                continue;
            }
            if let Err(e) = self.make(&name, &host.data).await {
                let retry = self.failed(&name);
                warn!(host = %name, error = %format!("{e:#}"), ?retry, "provisioning failed");
                let reason = match e.downcast_ref::<HostError>() {
                    Some(HostError::Invalid(_)) => "InvalidSpec",
                    _ => "ProviderError",
                };
                self.set_provisioned(&name, "False", reason, &format!("{e:#}"))
                    .await?;
            }
        }
        for orphan in made.difference(&wanted) {
            // Made for a Host that is gone (deleted while its finalizer was not yet set, or by
            // someone who removed the finalizer by hand): nothing may outlive its Host.
            if !hosts
                .iter()
                .any(|h| h.metadata.name.as_deref() == Some(orphan.as_str()))
            {
                info!(host = %orphan, "removing a host whose Host is gone");
                self.provider.delete(orphan).await?;
                self.delete_tokens(orphan).await?;
            }
        }
        Ok(())
    }

    fn backing_off(&self, name: &str) -> bool {
        self.backoff.lock().is_ok_and(|b| {
            b.get(name)
                .is_some_and(|(at, _)| std::time::Instant::now() < *at)
        })
    }

    /// Notes a failure; returns the wait before the next attempt (1 s doubling to 30 s).
    fn failed(&self, name: &str) -> Duration {
        let Ok(mut b) = self.backoff.lock() else {
            return PERIOD;
        };
        let wait = b
            .get(name)
            .map_or(Duration::from_secs(1), |(_, w)| (*w * 2).min(MAX_BACKOFF));
        b.insert(name.to_owned(), (std::time::Instant::now() + wait, wait));
        wait
    }

    async fn set_finalizers(&self, name: &str, finalizers: &[String]) -> anyhow::Result<()> {
        self.hosts
            .patch(
                name,
                &PatchParams::default(),
                &Patch::Merge(json!({"metadata": {"finalizers": finalizers}})),
            )
            .await
            .with_context(|| format!("setting Host {name}'s finalizers"))?;
        Ok(())
    }

    async fn set_provisioned(
        &self,
        name: &str,
        status: &str,
        reason: &str,
        message: &str,
    ) -> anyhow::Result<()> {
        let host = self.hosts.get(name).await?;
        let condition = json!({
            "type": "Provisioned",
            "status": status,
            "reason": reason,
            "message": message,
            "lastTransitionTime": rfc3339(Duration::ZERO),
        });
        // Custom kinds take no strategic merge: the list is written whole, other conditions
        // (Ready) kept, at the version it was read at.
        let mut patch = json!({
            "metadata": {"resourceVersion": host.metadata.resource_version},
            "status": {"conditions": slipway_api::meta::set_condition(
                &host.data["status"]["conditions"],
                condition,
            )},
        });
        if status == "False" && reason == "InvalidSpec" {
            patch["status"]["phase"] = json!("Failed");
        }
        self.hosts
            .patch_status(name, &PatchParams::default(), &Patch::Merge(patch))
            .await
            .with_context(|| format!("writing Host {name}'s status"))?;
        Ok(())
    }

    /// The provider's spec for a Host: its class's limits, and the join as its agent.
    async fn spec(&self, name: &str, host: &Value) -> anyhow::Result<HostSpec> {
        let class_name = str_at(host, "/spec/hostClass");
        let class = self
            .classes
            .get_opt(class_name)
            .await?
            .with_context(|| format!("spec.hostClass: HostClass {class_name:?} not found"))?;
        let class: HostClassSpec = serde_json::from_value(class.data["spec"].clone())
            .with_context(|| format!("HostClass {class_name}: spec"))?;
        let memory = class
            .memory
            .as_ref()
            .and_then(slipway_api::meta::Quantity::value)
            .with_context(|| format!("HostClass {class_name}: spec.memory is not a quantity"))?;
        let zone = str_at(host, "/spec/zone");
        let j = &self.join;
        let token_file = j.token_dir.join(format!("{name}.token"));
        let mut agent: Vec<String> = vec![
            j.binary.display().to_string(),
            "join".into(),
            "--supervisor".into(),
            j.supervisor_url.clone(),
            "--token-file".into(),
            token_file.display().to_string(),
            "--ca-file".into(),
            j.ca_file.display().to_string(),
            "--host-data-dir".into(),
            "{data_dir}".into(),
            "--host-name".into(),
            name.to_owned(),
            "--zone".into(),
            zone.to_owned(),
            "--host-class".into(),
            class_name.to_owned(),
            "--lease-interval".into(),
            humantime::format_duration(j.lease_interval).to_string(),
            "--lease-duration".into(),
            humantime::format_duration(j.lease_duration).to_string(),
        ];
        if !j.agent_flags.is_empty() {
            agent.push("--".into());
            agent.extend(j.agent_flags.iter().cloned());
        }
        #[allow(
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss,
            reason = "a validated HostClass's memory is a positive byte count well inside u64"
        )]
        let memory_bytes = memory as u64;
        Ok(HostSpec {
            name: name.to_owned(),
            zone: zone.to_owned(),
            cpu_millis: u64::from(class.cpus) * 1000,
            memory_bytes,
            data_root: j.data_root.clone(),
            agent,
        })
    }

    /// A bootstrap token bound to the host, in the API and in the file its agent reads.
    async fn ensure_token(&self, name: &str) -> anyhow::Result<()> {
        let file = self.join.token_dir.join(format!("{name}.token"));
        let existing = self
            .secrets
            .list(&ListParams::default().labels(&format!("{HOST_LABEL}={name}")))
            .await?;
        if let Ok(text) = std::fs::read_to_string(&file)
            && let Some((id, _)) = text.trim().split_once('.')
            && existing
                .items
                .iter()
                .any(|s| s.metadata.name.as_deref() == Some(&format!("bootstrap-token-{id}")))
        {
            return Ok(());
        }
        let (id, secret) = new_token()?;
        let expiration = rfc3339(Duration::from_secs(3600));
        let token: Secret = serde_json::from_value(json!({
            "metadata": {
                "name": format!("bootstrap-token-{id}"),
                "labels": {HOST_LABEL: name},
            },
            "type": "bootstrap.kubernetes.io/token",
            "stringData": {
                "token-id": id,
                "token-secret": secret,
                "usage-bootstrap-authentication": "true",
                "expiration": expiration,
                "host-name": name,
                "description": format!("joins netns host {name}"),
            },
        }))?;
        self.secrets.create(&PostParams::default(), &token).await?;
        std::fs::create_dir_all(&self.join.token_dir)?;
        write_private(&file, &format!("{id}.{secret}"))?;
        Ok(())
    }

    async fn make(&self, name: &str, host: &Value) -> anyhow::Result<()> {
        let spec = self.spec(name, host).await?;
        self.ensure_token(name).await?;
        let handle = self.provider.create(&spec).await?;
        info!(host = %name, address = %handle.address, "host provisioned");
        if let Ok(mut b) = self.backoff.lock() {
            b.remove(name);
        }
        let mut patch = json!({"status": {"address": handle.address.to_string()}});
        if str_at(host, "/status/phase").is_empty() || str_at(host, "/status/phase") == "Failed" {
            patch["status"]["phase"] = json!("Provisioning");
        }
        self.hosts
            .patch_status(name, &PatchParams::default(), &Patch::Merge(patch))
            .await?;
        self.set_provisioned(
            name,
            "True",
            "Created",
            &format!("netns host at {}", handle.address),
        )
        .await
    }

    async fn delete_tokens(&self, name: &str) -> anyhow::Result<()> {
        let tokens = self
            .secrets
            .list(&ListParams::default().labels(&format!("{HOST_LABEL}={name}")))
            .await?;
        for t in tokens.items {
            if let Some(n) = t.metadata.name {
                match self.secrets.delete(&n, &DeleteParams::default()).await {
                    Ok(_) => {}
                    Err(kube::Error::Api(s)) if s.code == 404 => {}
                    Err(e) => return Err(e.into()),
                }
            }
        }
        let _ = std::fs::remove_file(self.join.token_dir.join(format!("{name}.token")));
        Ok(())
    }

    /// Tears the host down, then lets its Host go.
    async fn remove(&self, name: &str, finalizers: &[String]) -> anyhow::Result<()> {
        self.provider.delete(name).await?;
        self.delete_tokens(name).await?;
        // Its Lease goes with it: a host made again under the name starts unregistered.
        match self.leases.delete(name, &DeleteParams::default()).await {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.code == 404 => {}
            Err(e) => return Err(e).with_context(|| format!("deleting Lease {name}")),
        }
        let rest: Vec<String> = finalizers
            .iter()
            .filter(|f| *f != FINALIZER)
            .cloned()
            .collect();
        self.set_finalizers(name, &rest).await?;
        info!(host = %name, "host removed");
        Ok(())
    }
}

/// Writes `text` to `path`, readable by its owner only.
pub(crate) fn write_private(path: &std::path::Path, text: &str) -> std::io::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(text.as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

/// How `slipway supervisor` provisions hosts.
#[derive(Debug, Clone, clap::Args)]
pub struct ProviderArgs {
    /// Provision Hosts of provider `netns` on this machine (`netns`), or leave every Host to
    /// join by itself (`none`).
    #[arg(long = "host-provider", default_value = "none", value_parser = ["none", "netns"])]
    pub host_provider: String,
    /// The netns provider's zones, comma-separated (each an underlay segment).
    #[arg(long, value_delimiter = ',', default_value = "zone-a,zone-b,zone-c")]
    pub zones: Vec<String>,
    /// The netns provider's underlay network: a /24 per zone, the last /30 for the uplink.
    #[arg(long, default_value_t = crate::netns::DEFAULT_UNDERLAY)]
    pub underlay: ipnetwork::Ipv4Network,
    /// What the netns provider's namespaces, cgroups and bpffs entries are named with.
    #[arg(long = "netns-prefix", default_value = "slipway-")]
    pub netns_prefix: String,
    /// This machine's end of the link to the netns hosts' underlay.
    #[arg(long = "uplink-device", default_value = "slipway-up")]
    pub uplink_device: String,
    /// How often netns hosts' agents renew their Lease.
    #[arg(long = "host-lease-interval", default_value = "1s", value_parser = humantime::parse_duration)]
    pub lease_interval: Duration,
    /// How long a netns host's Lease holds without renewal.
    #[arg(long = "host-lease-duration", default_value = "4s", value_parser = humantime::parse_duration)]
    pub lease_duration: Duration,
    /// A node agent flag for every netns host (repeatable; none runs the heartbeat alone).
    #[arg(long = "host-agent-flag", allow_hyphen_values = true)]
    pub agent_flags: Vec<String>,
    /// Per zone, a storage host running a block store (NBD over TLS on its underlay address,
    /// port 10809) that the volume reconciler provisions claims in.
    #[arg(long = "storage-hosts")]
    pub storage_hosts: bool,
    /// A storage host's cpu limit, in thousandths of a CPU.
    #[arg(long = "storage-host-cpu-millis", default_value_t = 1000)]
    pub storage_cpu_millis: u64,
    /// A storage host's memory limit, in bytes.
    #[arg(long = "storage-host-memory", default_value_t = 1 << 30)]
    pub storage_memory_bytes: u64,
}

/// The node agent flags that make a netns host a node of its cluster: the datapath on the
/// host's own bpffs dir and cgroup, its own containerd with the CNI the agent installs, the
/// images of `image_dir`, pods under the host's cgroups, cluster DNS and the kubelet's endpoint (container logs)
/// on the host's address. `slipway join` adds the cluster's
/// settings (pod CIDR, the host's block, the node's kubeconfig) when the host serves a Cluster.
pub fn netns_node_flags(image_dir: &std::path::Path) -> Vec<String> {
    [
        "--data-dir={data_dir}/agent",
        "--socket={data_dir}/agent.sock",
        "--bpffs={bpffs}",
        "--cgroup={cgroup}",
        "--containerd-dir={data_dir}/containerd",
        "--cni-conf-dir={data_dir}/net.d",
        "--cni-bin-dir={data_dir}/cni-bin",
        "--install-cni",
        "--pod-cgroup-parent=own",
        "--dns-listen={address}:53",
        "--kubelet-listen={address}:10250",
        "--csi-dir={data_dir}/csi",
    ]
    .into_iter()
    .map(str::to_owned)
    .chain([format!("--image-dir={}", image_dir.display())])
    .collect()
}

impl ProviderArgs {
    /// The netns provider these flags ask for (None with `--host-provider none`), keeping its
    /// state under `<data_dir>/hosts`.
    pub fn provider(&self, data_dir: &std::path::Path) -> Result<Option<NetnsProvider>, HostError> {
        if self.host_provider != "netns" {
            return Ok(None);
        }
        let zones: Vec<&str> = self.zones.iter().map(String::as_str).collect();
        let mut config = crate::netns::NetnsConfig::new(
            &self.netns_prefix,
            data_dir.join("hosts/state"),
            &zones,
        );
        config.underlay = self.underlay;
        config.uplink_device = Some(self.uplink_device.clone());
        NetnsProvider::new(config).map(Some)
    }

    /// How hosts of `provider` join a supervisor listening on `port` whose CA is `ca_file`.
    pub fn join_settings(
        &self,
        provider: &NetnsProvider,
        data_dir: &std::path::Path,
        port: u16,
        ca_file: PathBuf,
    ) -> std::io::Result<JoinSettings> {
        let (uplink, _) = provider.uplink_addresses();
        Ok(JoinSettings {
            binary: std::env::current_exe()?,
            supervisor_url: format!("https://{uplink}:{port}"),
            ca_file,
            token_dir: data_dir.join("hosts/tokens"),
            data_root: data_dir.join("hosts/data"),
            lease_interval: self.lease_interval,
            lease_duration: self.lease_duration,
            agent_flags: self.agent_flags.clone(),
        })
    }
}
