//! The `netns` host provider: hosts on this machine as network namespaces.
//!
//! Each zone is an underlay segment: a bridge `br0` in a zone namespace of its own
//! (`<prefix>z-<zone>`), with the zone's /24 of the underlay network. A core namespace
//! (`<prefix>core`) routes between the zones, as a distributed switch would: it holds each
//! zone's gateway address (`.1`) on a veth whose other end is a port of that zone's bridge. A
//! host is a namespace `<prefix>h-<name>` whose `eth0` is a veth onto its zone's bridge, with an
//! address of the zone's subnet and a default route via the zone's gateway, cgroups
//! `<prefix>h-<name>` with its cpu and memory limits, a data dir, a bpffs directory, and its
//! agent process started inside all of them.
//!
//! State lives where a restarted provider finds it: one record per host under the state dir
//! (written before anything is made, so a half-made host is never unknown), and the kernel's
//! names, which all derive from the provider's prefix and the host's name. Delete works from any
//! half-made state. The prefix must not be a prefix of another provider's.

use std::collections::BTreeSet;
use std::fs::{self, OpenOptions};
use std::io;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use ipnetwork::Ipv4Network;
use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};
use slipway_dataplane::cgroup::{Layout, Limits};
use slipway_dataplane::link::Netlink;
use slipway_dataplane::underlay::{self, Plug};
use slipway_dataplane::{DataplaneError, netns};
use tokio::sync::Mutex;
use tracing::{debug, info, warn};

use crate::{FieldProblem, HostError, HostHandle, HostPhase, HostProvider, HostSpec, HostStatus};

/// The underlay network zones take their /24s from, in order, by default.
pub const DEFAULT_UNDERLAY: Ipv4Network =
    match Ipv4Network::new_checked(Ipv4Addr::new(10, 100, 0, 0), 16) {
        Some(net) => net,
        None => panic!("a valid network"),
    };

/// The zone's end of its link to the core (a bridge port).
const UPLINK: &str = "uplink";

/// The core's end of its link to the root namespace.
const CORE_UPLINK: &str = "up0";

/// What the `netns` provider is configured with.
#[derive(Debug, Clone)]
pub struct NetnsConfig {
    /// Every name the provider makes starts with this (namespaces, cgroups, bpffs entries).
    pub prefix: String,
    /// Where host records live (`<state_dir>/<host>.json`).
    pub state_dir: PathBuf,
    /// Zone `i` (0-based, in this order) gets the `i`-th /24 of this network.
    pub underlay: Ipv4Network,
    /// The zones, by name.
    pub zones: Vec<String>,
    /// How long a host's processes have between SIGTERM and SIGKILL on delete.
    pub stop_grace: Duration,
    /// Where hosts' bpffs directories are made.
    pub bpffs_root: PathBuf,
    /// The root namespace's end of a link to the core (a veth of this name), so that hosts
    /// reach this machine (the supervisor) and it reaches them: the underlay's last /30 holds
    /// the two ends ([`NetnsProvider::uplink_addresses`]). None leaves the underlay closed.
    pub uplink_device: Option<String>,
}

impl NetnsConfig {
    /// A configuration with the default underlay (10.100.0.0/16), a 5 s grace and bpffs at
    /// `/sys/fs/bpf`.
    pub fn new(prefix: impl Into<String>, state_dir: impl Into<PathBuf>, zones: &[&str]) -> Self {
        Self {
            prefix: prefix.into(),
            state_dir: state_dir.into(),
            underlay: DEFAULT_UNDERLAY,
            zones: zones.iter().map(|z| (*z).to_owned()).collect(),
            stop_grace: Duration::from_secs(5),
            bpffs_root: PathBuf::from("/sys/fs/bpf"),
            uplink_device: None,
        }
    }

    fn problems(&self) -> Vec<FieldProblem> {
        let mut problems = Vec::new();
        let mut bad = |field, reason: String| problems.push(FieldProblem { field, reason });
        if self.prefix.is_empty() || self.prefix.contains('/') || self.prefix.len() > 40 {
            bad(
                "prefix",
                "must be 1 to 40 characters without '/'".to_owned(),
            );
        }
        if self.zones.is_empty() {
            bad("zones", "at least one zone".to_owned());
        }
        let unique: BTreeSet<_> = self.zones.iter().collect();
        if unique.len() != self.zones.len() {
            bad("zones", "zone names repeat".to_owned());
        }
        if let Some(dev) = &self.uplink_device
            && (dev.is_empty() || dev.len() > 15 || dev.contains(['/', ' ']))
        {
            bad(
                "uplinkDevice",
                format!("{dev:?} is not an interface name (1 to 15 characters, no '/' or space)"),
            );
        }
        if let Some(zone) = self.zones.iter().find(|z| !crate::is_label(z)) {
            bad("zones", format!("{zone:?} is not a DNS label"));
        }
        let prefix = self.underlay.prefix();
        // With an uplink, the underlay's last /24 holds it and no zone.
        let reserved = usize::from(self.uplink_device.is_some());
        if prefix > 24 || (1usize << (24 - prefix)) < self.zones.len() + reserved {
            bad(
                "underlay",
                format!(
                    "{} holds fewer /24s than the {} zones",
                    self.underlay,
                    self.zones.len()
                ),
            );
        }
        problems
    }
}

/// The record of one host, under the state dir.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Record {
    spec: HostSpec,
    address: Ipv4Addr,
    /// False until every part of the host is made.
    complete: bool,
}

/// The step after which a test stops a create as if the caller had been killed (no rollback).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Step {
    Namespace,
    Link,
    Cgroups,
}

/// Hosts as network namespaces on this machine; see the module documentation.
#[derive(Debug)]
pub struct NetnsProvider {
    config: NetnsConfig,
    layout: Layout,
    /// One change at a time in this process (and [`StateLock`] across processes): addresses
    /// are allocated and zones made or removed under it.
    lock: Mutex<()>,
}

fn kernel(host: &str, step: &str) -> impl FnOnce(DataplaneError) -> HostError {
    let host = host.to_owned();
    let step = step.to_owned();
    move |source| HostError::Kernel { host, step, source }
}

fn state_error(path: &Path) -> impl FnOnce(io::Error) -> HostError {
    let path = path.to_owned();
    move |source| HostError::State { path, source }
}

/// The state dir's lock, held while one change is made: providers in other processes on the
/// same state dir wait (the kernel releases it when its holder dies, even by SIGKILL).
struct StateLock {
    _lock: Flock<fs::File>,
}

impl StateLock {
    async fn take(state_dir: &Path) -> Result<Self, HostError> {
        let path = state_dir.join(".lock");
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(state_error(&path))?;
        let lock = tokio::task::spawn_blocking(move || {
            Flock::lock(file, FlockArg::LockExclusive).map_err(|(_, errno)| errno)
        })
        .await
        .map_err(|e| state_error(&path)(io::Error::other(e)))?
        .map_err(|errno| state_error(&path)(errno.into()))?;
        Ok(Self { _lock: lock })
    }
}

/// Removes `path` and everything under it; an absent path is not an error.
fn remove_all(path: &Path) -> Result<(), HostError> {
    match fs::remove_dir_all(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(state_error(path)(e)),
        _ => Ok(()),
    }
}

impl NetnsProvider {
    /// A provider on this machine's cgroup layout, detected now.
    pub fn new(config: NetnsConfig) -> Result<Self, HostError> {
        let layout = Layout::detect().map_err(kernel("-", "detect the cgroup layout"))?;
        Self::with_layout(config, layout)
    }

    /// A provider whose cgroups are in `layout`.
    pub fn with_layout(config: NetnsConfig, layout: Layout) -> Result<Self, HostError> {
        let problems = config.problems();
        if !problems.is_empty() {
            return Err(HostError::Invalid(problems));
        }
        fs::create_dir_all(&config.state_dir).map_err(state_error(&config.state_dir))?;
        info!(prefix = %config.prefix, zones = ?config.zones, ?layout, "netns host provider");
        Ok(Self {
            config,
            layout,
            lock: Mutex::new(()),
        })
    }

    pub fn config(&self) -> &NetnsConfig {
        &self.config
    }

    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// The core namespace, which routes between zones.
    pub fn core_netns(&self) -> String {
        format!("{}core", self.config.prefix)
    }

    /// The namespace of zone `zone`'s segment (its bridge).
    pub fn zone_netns(&self, zone: &str) -> String {
        format!("{}z-{zone}", self.config.prefix)
    }

    /// The namespace (and cgroup) name of host `name`.
    pub fn host_netns(&self, name: &str) -> String {
        format!("{}h-{name}", self.config.prefix)
    }

    /// Zone `zone`'s subnet, if the provider has that zone.
    pub fn zone_subnet(&self, zone: &str) -> Option<Ipv4Network> {
        let index = self.config.zones.iter().position(|z| z == zone)?;
        let base = u32::from(self.config.underlay.network()) + ((index as u32) << 8);
        Ipv4Network::new(Ipv4Addr::from(base), 24).ok()
    }

    /// The two ends of the uplink (root namespace, core): `.253` and `.254` of the underlay's
    /// last /30. The root's end is where hosts reach this machine.
    pub fn uplink_addresses(&self) -> (Ipv4Addr, Ipv4Addr) {
        let last = u32::from(self.config.underlay.broadcast());
        (Ipv4Addr::from(last - 2), Ipv4Addr::from(last - 1))
    }

    /// The addresses control plane endpoints (VIPs) are taken from: `.1` to `.250` of the
    /// underlay's last /24, which holds the uplink and no zone. None without an uplink (nothing
    /// outside the underlay would reach them).
    pub fn endpoint_pool(&self) -> Option<Vec<Ipv4Addr>> {
        self.config.uplink_device.as_ref()?;
        let last = u32::from(self.config.underlay.broadcast()) & !0xff;
        Some((1..=250).map(|i| Ipv4Addr::from(last + i)).collect())
    }

    fn gateway(subnet: Ipv4Network) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(subnet.network()) + 1)
    }

    fn record_path(&self, name: &str) -> PathBuf {
        self.config.state_dir.join(format!("{name}.json"))
    }

    fn read_record(&self, name: &str) -> Result<Option<Record>, HostError> {
        let path = self.record_path(name);
        match fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|e| state_error(&path)(io::Error::new(io::ErrorKind::InvalidData, e))),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(state_error(&path)(e)),
        }
    }

    /// Writes the record atomically (a reader sees the old or the new one, never a mix).
    fn write_record(&self, record: &Record) -> Result<(), HostError> {
        let path = self.record_path(&record.spec.name);
        let tmp = path.with_extension("json.tmp");
        let bytes = serde_json::to_vec_pretty(record)
            .map_err(|e| state_error(&path)(io::Error::new(io::ErrorKind::InvalidData, e)))?;
        fs::write(&tmp, bytes).map_err(state_error(&tmp))?;
        fs::rename(&tmp, &path).map_err(state_error(&path))
    }

    fn records(&self) -> Result<Vec<Record>, HostError> {
        let dir = &self.config.state_dir;
        let entries = match fs::read_dir(dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(state_error(dir)(e)),
        };
        let mut records = Vec::new();
        for entry in entries.flatten() {
            let file = entry.file_name();
            let Some(name) = file.to_str().and_then(|f| f.strip_suffix(".json")) else {
                continue;
            };
            if let Some(record) = self.read_record(name)? {
                records.push(record);
            }
        }
        records.sort_by(|a, b| a.spec.name.cmp(&b.spec.name));
        Ok(records)
    }

    fn handle(&self, record: &Record) -> HostHandle {
        let spec = &record.spec;
        let subnet = self
            .zone_subnet(&spec.zone)
            .unwrap_or_else(|| Ipv4Network::from(record.address));
        let group = self.host_netns(&spec.name);
        HostHandle {
            spec: spec.clone(),
            address: record.address,
            prefix: subnet.prefix(),
            gateway: Self::gateway(subnet),
            netns: group.clone(),
            data_dir: spec.data_root.join(&spec.name),
            bpffs: self.config.bpffs_root.join(&group),
            cgroup: self.layout.v2_dir(&group),
            cgroups: self.layout.dirs(&group),
        }
    }

    /// The lowest free address of `zone`'s subnet (the gateway is `.1`).
    fn allocate(&self, zone: &str, subnet: Ipv4Network) -> Result<Ipv4Addr, HostError> {
        let used: BTreeSet<Ipv4Addr> = self
            .records()?
            .into_iter()
            .filter(|r| r.spec.zone == zone)
            .map(|r| r.address)
            .collect();
        let base = u32::from(subnet.network());
        (2..255)
            .map(|i| Ipv4Addr::from(base + i))
            .find(|ip| !used.contains(ip))
            .ok_or_else(|| HostError::invalid("zone", format!("zone {zone} has no free address")))
    }

    /// Makes the core namespace (if missing) with forwarding on, and its uplink if configured.
    async fn ensure_core(&self) -> Result<(), DataplaneError> {
        let core = self.core_netns();
        underlay::ensure_netns(&core).await?;
        netns::run_in(&core, || fs::write("/proc/sys/net/ipv4/ip_forward", "1"))?.map_err(
            |source| DataplaneError::Syscall {
                call: "enable forwarding in the core namespace",
                source,
            },
        )?;
        self.ensure_uplink().await
    }

    /// The veth between this machine's namespace and the core, addressed, with the routes
    /// each side needs (the core's default, this machine's to the underlay).
    async fn ensure_uplink(&self) -> Result<(), DataplaneError> {
        let Some(dev) = &self.config.uplink_device else {
            return Ok(());
        };
        let (root_ip, core_ip) = self.uplink_addresses();
        let core_path = netns::path(&self.core_netns());
        // The process's main thread stays in the namespace the process started in.
        let root = Netlink::in_netns(Path::new("/proc/self/ns/net"))?;
        let core = Netlink::in_netns(&core_path)?;
        if root.link(dev).await?.is_none() || core.link(CORE_UPLINK).await?.is_none() {
            root.delete_link(dev).await?;
            core.delete_link(CORE_UPLINK).await?;
            root.add_veth(dev, CORE_UPLINK, &core_path, underlay::MTU)
                .await?;
        }
        let missing = |what: &str| DataplaneError::Netlink {
            what: what.to_owned(),
            detail: "not found".into(),
        };
        let root_link = root.link(dev).await?.ok_or_else(|| missing(dev))?;
        let core_link = core
            .link(CORE_UPLINK)
            .await?
            .ok_or_else(|| missing(CORE_UPLINK))?;
        for (nl, link, ip) in [(&root, &root_link, root_ip), (&core, &core_link, core_ip)] {
            if !nl.addresses(link.index).await?.contains(&(ip, 30)) {
                nl.add_address(link.index, ip, 30).await?;
            }
            nl.set_up(link.index).await?;
        }
        core.add_route(Ipv4Addr::UNSPECIFIED, 0, Some(root_ip), core_link.index)
            .await?;
        let underlay = self.config.underlay;
        root.add_route(
            underlay.network(),
            underlay.prefix(),
            Some(core_ip),
            root_link.index,
        )
        .await
    }

    /// Makes zone `zone`'s segment and its link to the core, whatever of them is missing.
    async fn ensure_zone(&self, zone: &str, subnet: Ipv4Network) -> Result<(), DataplaneError> {
        let index = self
            .config
            .zones
            .iter()
            .position(|z| z == zone)
            .unwrap_or_default();
        let zone_ns = self.zone_netns(zone);
        underlay::ensure_segment(&zone_ns).await?;
        let core_ns = self.core_netns();
        let core_port = format!("z{index}");
        Plug {
            segment: &zone_ns,
            port: UPLINK,
            netns: &core_ns,
            ifname: &core_port,
            address: Self::gateway(subnet),
            prefix: subnet.prefix(),
            gateway: None,
        }
        .ensure()
        .await
    }

    /// Makes the host's parts in order; `stop` (tests only) ends early as a killed caller would.
    async fn build(&self, record: &Record, stop: Option<Step>) -> Result<(), HostError> {
        let spec = &record.spec;
        let name = spec.name.as_str();
        let handle = self.handle(record);
        let subnet = self
            .zone_subnet(&spec.zone)
            .ok_or_else(|| HostError::invalid("zone", "unknown zone"))?;
        self.ensure_core()
            .await
            .map_err(kernel(name, "make the core namespace"))?;
        self.ensure_zone(&spec.zone, subnet)
            .await
            .map_err(kernel(name, "make the zone segment"))?;
        underlay::ensure_netns(&handle.netns)
            .await
            .map_err(kernel(name, "make the host namespace"))?;
        if stop == Some(Step::Namespace) {
            return Ok(());
        }
        self.plug(&handle)
            .await
            .map_err(kernel(name, "plug the host into its zone"))?;
        if stop == Some(Step::Link) {
            return Ok(());
        }
        fs::create_dir_all(&handle.data_dir).map_err(state_error(&handle.data_dir))?;
        fs::create_dir_all(&handle.bpffs).map_err(state_error(&handle.bpffs))?;
        let limits = Limits {
            cpu_millis: spec.cpu_millis,
            memory_bytes: spec.memory_bytes,
        };
        self.layout
            .create(&handle.netns, limits)
            .map_err(kernel(name, "make the cgroups"))?;
        if stop == Some(Step::Cgroups) {
            return Ok(());
        }
        if !spec.agent.is_empty() {
            self.start(&handle)?;
        }
        Ok(())
    }

    /// The host's `eth0` on its zone's bridge, addressed, with its default route.
    async fn plug(&self, handle: &HostHandle) -> Result<(), DataplaneError> {
        Plug {
            segment: &self.zone_netns(&handle.spec.zone),
            port: &format!("h{}", handle.address.octets()[3]),
            netns: &handle.netns,
            ifname: "eth0",
            address: handle.address,
            prefix: handle.prefix,
            gateway: Some(handle.gateway),
        }
        .ensure()
        .await
    }

    /// Starts the host's agent inside its namespace and cgroups, logging to
    /// `<data dir>/agent.log`. A thread reaps it when it exits.
    fn start(&self, handle: &HostHandle) -> Result<(), HostError> {
        let name = handle.spec.name.as_str();
        let argv: Vec<String> = handle
            .spec
            .agent
            .iter()
            .map(|arg| substitute(arg, handle))
            .collect();
        let log_path = handle.data_dir.join("agent.log");
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(state_error(&log_path))?;
        let log2 = log.try_clone().map_err(state_error(&log_path))?;
        let mut command = Command::new(&argv[0]);
        command
            .args(&argv[1..])
            .env("SLIPWAY_HOST", name)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2);
        let mut child = slipway_dataplane::cgroup::spawn_in(
            &mut command,
            &netns::path(&handle.netns),
            &self.layout.procs_files(&handle.netns),
        )
        .map_err(kernel(name, &format!("start {}", argv[0])))?;
        let pid = child.id();
        info!(host = name, pid, agent = ?argv, "host agent started");
        let host = name.to_owned();
        std::thread::spawn(move || match child.wait() {
            Ok(status) => debug!(host, pid, %status, "host agent exited"),
            Err(error) => warn!(host, pid, %error, "could not reap the host agent"),
        });
        Ok(())
    }

    /// Removes every part of host `name` that exists, in reverse order of making.
    async fn remove(&self, name: &str) -> Result<(), HostError> {
        let record = self.read_record(name)?;
        let group = self.host_netns(name);
        let layout = self.layout.clone();
        let grace = self.config.stop_grace;
        let group2 = group.clone();
        tokio::task::spawn_blocking(move || layout.remove(&group2, grace))
            .await
            .map_err(|e| HostError::Kernel {
                host: name.to_owned(),
                step: "stop the processes".into(),
                source: DataplaneError::Command {
                    command: "cgroup removal".into(),
                    detail: e.to_string(),
                },
            })?
            .map_err(kernel(name, "stop the processes and remove the cgroups"))?;
        netns::destroy(&group).map_err(kernel(name, "delete the host namespace"))?;
        remove_all(&self.config.bpffs_root.join(&group))?;
        if let Some(record) = &record {
            // What the host's containerd mounted (sandboxes' shm and netns, rootfs overlays)
            // outlives its processes: detached before the data dir goes.
            let data_dir = record.spec.data_root.join(name);
            slipway_dataplane::mounts::unmount_below(&data_dir)
                .map_err(kernel(name, "unmount what the host mounted"))?;
            remove_all(&data_dir)?;
        }
        let path = self.record_path(name);
        match fs::remove_file(&path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(state_error(&path)(e)),
            _ => {}
        }
        self.remove_idle_zones().await
    }

    /// Deletes the segments of zones without hosts, and the core when no host is left.
    async fn remove_idle_zones(&self) -> Result<(), HostError> {
        let records = self.records()?;
        for zone in &self.config.zones {
            let zone_ns = self.zone_netns(zone);
            if netns::exists(&zone_ns) && !records.iter().any(|r| &r.spec.zone == zone) {
                netns::destroy(&zone_ns).map_err(kernel("-", &format!("delete zone {zone}")))?;
                debug!(zone, "zone segment removed");
            }
        }
        if records.is_empty() {
            self.remove_uplink()
                .await
                .map_err(kernel("-", "delete the uplink"))?;
            netns::destroy(&self.core_netns()).map_err(kernel("-", "delete the core namespace"))?;
        }
        Ok(())
    }

    /// Deletes this machine's end of the uplink (the kernel would, with the core namespace,
    /// but only once that namespace's cleanup runs).
    async fn remove_uplink(&self) -> Result<(), DataplaneError> {
        match &self.config.uplink_device {
            Some(dev) => {
                Netlink::in_netns(Path::new("/proc/self/ns/net"))?
                    .delete_link(dev)
                    .await
            }
            None => Ok(()),
        }
    }

    async fn create_inner(
        &self,
        spec: &HostSpec,
        stop: Option<Step>,
    ) -> Result<HostHandle, HostError> {
        let mut problems = spec.problems();
        let subnet = self.zone_subnet(&spec.zone);
        if subnet.is_none() && !spec.zone.is_empty() {
            problems.push(FieldProblem {
                field: "zone",
                reason: format!(
                    "unknown zone {:?}; the zones are {}",
                    spec.zone,
                    self.config.zones.join(", ")
                ),
            });
        }
        let Some(subnet) = subnet.filter(|_| problems.is_empty()) else {
            return Err(HostError::Invalid(problems));
        };
        let _guard = self.lock.lock().await;
        let _state = StateLock::take(&self.config.state_dir).await?;
        if let Some(existing) = self.read_record(&spec.name)? {
            if existing.spec != *spec {
                return Err(HostError::invalid(
                    "name",
                    format!("host {} exists with another spec", spec.name),
                ));
            }
            if existing.complete && netns::exists(&self.host_netns(&spec.name)) {
                return Ok(self.handle(&existing));
            }
            // Half-made by a caller that died: start again from nothing.
            info!(host = %spec.name, "removing a half-made host before making it again");
            self.remove(&spec.name).await?;
        }
        let address = self.allocate(&spec.zone, subnet)?;
        let mut record = Record {
            spec: spec.clone(),
            address,
            complete: false,
        };
        self.write_record(&record)?;
        let started = Instant::now();
        let built = self.build(&record, stop).await;
        if stop.is_some() {
            built?;
            return Ok(self.handle(&record));
        }
        if let Err(error) = built {
            warn!(host = %spec.name, %error, "host creation failed; removing what was made");
            if let Err(undo) = self.remove(&spec.name).await {
                warn!(host = %spec.name, error = %undo, "could not remove the half-made host");
            }
            return Err(error);
        }
        record.complete = true;
        self.write_record(&record)?;
        info!(host = %spec.name, %address, zone = %spec.zone, elapsed = ?started.elapsed(), "host created");
        Ok(self.handle(&record))
    }

    /// Stops as a caller killed after `stop` would have (tests only).
    #[cfg(test)]
    pub(crate) async fn create_interrupted(
        &self,
        spec: &HostSpec,
        stop: Step,
    ) -> Result<HostHandle, HostError> {
        self.create_inner(spec, Some(stop)).await
    }

    /// Deletes every host, then anything else named with the provider's prefix (namespaces,
    /// cgroups, bpffs entries) whether recorded or not: leaves nothing.
    pub async fn teardown(&self) -> Result<(), HostError> {
        let _guard = self.lock.lock().await;
        let _state = StateLock::take(&self.config.state_dir).await?;
        let mut first_error = None;
        for record in self.records()? {
            if let Err(e) = self.remove(&record.spec.name).await {
                warn!(host = %record.spec.name, error = %e, "teardown");
                first_error.get_or_insert(e);
            }
        }
        let prefix = &self.config.prefix;
        for group in self.layout.groups_with_prefix(prefix) {
            let layout = self.layout.clone();
            let grace = self.config.stop_grace;
            let result = tokio::task::spawn_blocking(move || layout.remove(&group, grace)).await;
            if let Ok(Err(e)) = result {
                first_error.get_or_insert(HostError::Kernel {
                    host: "-".into(),
                    step: "remove a cgroup".into(),
                    source: e,
                });
            }
        }
        if let Err(e) = self.remove_uplink().await {
            first_error.get_or_insert(kernel("-", "delete the uplink")(e));
        }
        // Hosts before zones before the core, so that no zone's veth outlives its host.
        let mut names = names_with_prefix(Path::new(netns::NETNS_RUN_DIR), prefix);
        names.sort_by_key(|n| {
            let own = &n[prefix.len()..];
            (!own.starts_with("h-"), own == "core")
        });
        for name in names {
            if let Err(e) = netns::destroy(&name) {
                first_error.get_or_insert(kernel("-", &format!("delete {name}"))(e));
            }
        }
        for name in names_with_prefix(&self.config.bpffs_root, prefix) {
            if let Err(e) = remove_all(&self.config.bpffs_root.join(name)) {
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }
}

#[async_trait::async_trait]
impl HostProvider for NetnsProvider {
    async fn create(&self, spec: &HostSpec) -> Result<HostHandle, HostError> {
        self.create_inner(spec, None).await
    }

    async fn delete(&self, name: &str) -> Result<(), HostError> {
        if !crate::is_label(name) {
            return Err(HostError::invalid(
                "name",
                format!("{name:?} is not a DNS label"),
            ));
        }
        let _guard = self.lock.lock().await;
        let _state = StateLock::take(&self.config.state_dir).await?;
        self.remove(name).await?;
        info!(host = name, "host deleted");
        Ok(())
    }

    async fn list(&self) -> Result<Vec<HostHandle>, HostError> {
        Ok(self.records()?.iter().map(|r| self.handle(r)).collect())
    }

    async fn status(&self, name: &str) -> Result<HostStatus, HostError> {
        let record = self
            .read_record(name)?
            .ok_or_else(|| HostError::NotFound(name.to_owned()))?;
        let handle = self.handle(&record);
        let pids = self.layout.pids(&handle.netns);
        let phase = if !record.complete {
            HostPhase::Creating
        } else if !netns::exists(&handle.netns) {
            HostPhase::Lost
        } else if !record.spec.agent.is_empty() && pids.is_empty() {
            HostPhase::Exited
        } else {
            HostPhase::Running
        };
        Ok(HostStatus {
            handle,
            phase,
            pids,
        })
    }
}

/// `arg` with the host's placeholders replaced.
fn substitute(arg: &str, handle: &HostHandle) -> String {
    let path = |p: &Path| p.display().to_string();
    arg.replace("{name}", &handle.spec.name)
        .replace("{zone}", &handle.spec.zone)
        .replace("{address}", &handle.address.to_string())
        .replace("{netns}", &handle.netns)
        .replace("{data_dir}", &path(&handle.data_dir))
        .replace("{bpffs}", &path(&handle.bpffs))
        .replace(
            "{cgroup}",
            &handle.cgroup.as_deref().map(path).unwrap_or_default(),
        )
}

/// The entries of `dir` whose names start with `prefix`.
fn names_with_prefix(dir: &Path, prefix: &str) -> Vec<String> {
    fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .filter_map(|e| e.file_name().into_string().ok())
                .filter(|n| n.starts_with(prefix))
                .collect()
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests;
