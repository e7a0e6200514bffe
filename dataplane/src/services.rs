//! Services without kube-proxy, at the socket layer (`ebpf/sock.c`): loading the cgroup
//! `connect4` / `sendmsg4` / `recvmsg4` / `getpeername4` programs (and their IPv6 twins, which
//! translate IPv4-mapped addresses of dual-stack sockets), attaching them to a host's child
//! cgroup v2, and the service table they read (ClusterIP or node IP + NodePort -> backends).
//!
//! Every process in the cgroup (host processes and pods alike, whatever their network
//! namespace) that connects or sends to a service address is sent to one of its backends,
//! picked at random per connection (per datagram for unconnected UDP); UDP replies read with
//! `recvfrom`, and `getpeername` on a translated socket, show the service address. No iptables
//! or nftables rule is involved.
//!
//! A backend list is replaced without a moment where a connect could see it half-written: the
//! new list is written under a new revision, the service entry is switched to it in one map
//! update, then the old revision is deleted (see `struct svc_info` in `ebpf/include/abi.h`).

use std::collections::BTreeMap;
use std::fmt;
use std::fs;
use std::io;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::{Path, PathBuf};

use aya::maps::{HashMap, MapData, MapError, PerCpuArray};
use aya::programs::links::{FdLink, PinnedLink};
use aya::programs::{CgroupAttachMode, CgroupSockAddr, ProgramError};
use aya::{Ebpf, EbpfLoader};
use tracing::{debug, info, warn};

pub use crate::abi::services::Protocol;
use crate::abi::services::{MAX_BACKENDS, SvcAddr, SvcEvent, SvcInfo, SvcKey, SvcSlotKey};
use crate::error::{is_not_found, map_error};
use crate::{DataplaneError, objects};

const OBJECT: &str = "sock";
/// The programs of `ebpf/sock.c`, by function name.
pub const PROGRAMS: [&str; 8] = [
    "sock_connect4",
    "sock_sendmsg4",
    "sock_recvmsg4",
    "sock_peer4",
    "sock_connect6",
    "sock_sendmsg6",
    "sock_recvmsg6",
    "sock_peer6",
];
/// Map names, which are also their pin names under the pin directory.
pub const SERVICES_MAP: &str = "svc_services";
pub const SLOTS_MAP: &str = "svc_slots";
pub const REVERSE_MAP: &str = "svc_reverse";
pub const COUNTERS_MAP: &str = "svc_counters";
const MAPS: [&str; 4] = [SERVICES_MAP, SLOTS_MAP, REVERSE_MAP, COUNTERS_MAP];

/// Errors of the socket-level service datapath.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    /// The BPF object could not be parsed or loaded (verifier rejection included).
    #[error("loading BPF object {OBJECT}")]
    Load(#[source] Box<aya::EbpfError>),
    /// The object lacks a program or map the code expects: the build and the code disagree.
    #[error("BPF object {OBJECT} has no {kind} `{name}`")]
    Missing {
        kind: &'static str,
        name: &'static str,
    },
    /// A program could not be loaded or attached.
    #[error("program `{program}`: {action}")]
    Program {
        program: &'static str,
        action: String,
        #[source]
        source: Box<ProgramError>,
    },
    /// A map operation failed.
    #[error(transparent)]
    Map(#[from] DataplaneError),
    /// A path under bpffs (pin directory, pinned link) could not be created, read or removed.
    #[error("bpffs path {path}: {action}")]
    Bpffs {
        path: PathBuf,
        action: &'static str,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The cgroup directory could not be opened or inspected.
    #[error("cgroup {path}")]
    Cgroup {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The path is not a directory of a cgroup v2 hierarchy.
    #[error("{path} is not a cgroup v2 directory")]
    NotCgroup2 { path: PathBuf },
    /// Attaching to the root would translate every process of the machine.
    #[error("{path} is the cgroup v2 root: attach to the host's child cgroup")]
    CgroupRoot { path: PathBuf },
    /// A service or backend the datapath cannot represent.
    #[error("service {service}: {reason}")]
    Invalid { service: ServiceKey, reason: String },
}

/// What a client addresses: a ClusterIP, or a node IP with a NodePort, on a port and protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceKey {
    pub ip: Ipv4Addr,
    pub port: u16,
    pub protocol: Protocol,
}

impl ServiceKey {
    pub fn tcp(ip: Ipv4Addr, port: u16) -> Self {
        Self {
            ip,
            port,
            protocol: Protocol::Tcp,
        }
    }

    pub fn udp(ip: Ipv4Addr, port: u16) -> Self {
        Self {
            ip,
            port,
            protocol: Protocol::Udp,
        }
    }

    fn raw(self) -> SvcKey {
        SvcKey::new(self.ip, self.port, self.protocol)
    }

    fn from_raw(raw: &SvcKey) -> Option<Self> {
        Some(Self {
            ip: raw.ip(),
            port: raw.port(),
            protocol: raw.protocol()?,
        })
    }
}

impl fmt::Display for ServiceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}/{}", self.ip, self.port, self.protocol.as_str())
    }
}

/// A backend of a service: a pod (or host) address and the port it serves on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Backend {
    pub ip: Ipv4Addr,
    pub port: u16,
}

impl Backend {
    pub fn new(ip: Ipv4Addr, port: u16) -> Self {
        Self { ip, port }
    }

    fn raw(self) -> SvcAddr {
        SvcAddr::new(SocketAddrV4::new(self.ip, self.port))
    }

    fn from_raw(raw: &SvcAddr) -> Self {
        let addr = raw.addr();
        Self {
            ip: *addr.ip(),
            port: addr.port(),
        }
    }
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.ip, self.port)
    }
}

/// The loaded socket programs and their maps.
pub struct ServiceDatapath {
    bpf: Ebpf,
    tables: AyaTables,
    counters: PerCpuArray<MapData, u64>,
    pin_dir: Option<PathBuf>,
}

impl fmt::Debug for ServiceDatapath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServiceDatapath")
            .field("pin_dir", &self.pin_dir)
            .finish_non_exhaustive()
    }
}

impl ServiceDatapath {
    /// Loads the programs into the kernel. With `pin_dir`, the maps live at
    /// `<pin_dir>/svc_services`, `svc_slots`, `svc_reverse` and `svc_counters` on bpffs; maps
    /// already pinned there are reused (a restarted agent finds its services as it left them),
    /// and backend slots an interrupted update left behind are deleted. One writer at a time:
    /// a second instance on the same pins must not load while the first still updates.
    pub fn load(pin_dir: Option<&Path>) -> Result<Self, ServiceError> {
        let mut loader = EbpfLoader::new();
        let pins: Vec<(&str, PathBuf)> = match pin_dir {
            Some(dir) => {
                fs::create_dir_all(dir).map_err(|source| ServiceError::Bpffs {
                    path: dir.to_owned(),
                    action: "create",
                    source: Box::new(source),
                })?;
                MAPS.iter().map(|map| (*map, dir.join(map))).collect()
            }
            None => Vec::new(),
        };
        for (map, path) in &pins {
            loader.map_pin_path(map, path.as_path());
        }
        let mut bpf = loader
            .load(objects::SOCK)
            .map_err(|source| ServiceError::Load(Box::new(source)))?;
        for name in PROGRAMS {
            program(&mut bpf, name)?
                .load()
                .map_err(|source| ServiceError::Program {
                    program: name,
                    action: "load".into(),
                    source: Box::new(source),
                })?;
        }
        let services = HashMap::try_from(take_map(&mut bpf, SERVICES_MAP)?)
            .map_err(|source| map_error(SERVICES_MAP, "open", source))?;
        let slots = HashMap::try_from(take_map(&mut bpf, SLOTS_MAP)?)
            .map_err(|source| map_error(SLOTS_MAP, "open", source))?;
        let counters = PerCpuArray::try_from(take_map(&mut bpf, COUNTERS_MAP)?)
            .map_err(|source| map_error(COUNTERS_MAP, "open", source))?;
        let mut datapath = Self {
            bpf,
            tables: AyaTables { services, slots },
            counters,
            pin_dir: pin_dir.map(Path::to_owned),
        };
        let swept = sweep(&mut datapath.tables)?;
        if swept > 0 {
            info!(
                swept,
                "deleted backend slots an interrupted update left behind"
            );
        }
        debug!(pin_dir = ?pin_dir, "socket-level service datapath loaded");
        Ok(datapath)
    }

    /// Attaches the eight programs to the cgroup v2 directory `cgroup`: from then on, sockets
    /// created by processes in it or in any cgroup below it (pods' cgroups) have service
    /// addresses translated. `cgroup` must be a child cgroup (the host's), never the v2 root.
    ///
    /// Programs attach through BPF links, which the kernel always runs in multi mode: other
    /// programs on the cgroup keep running. With a pin directory, the links are pinned as `<pin_dir>/link_<program>` and outlive this
    /// process: a restarted agent attaches its programs, then replaces the pinned links of its
    /// predecessor, so there is no moment without translation. Without one, the programs stay
    /// attached as long as this value lives.
    pub fn attach(&mut self, cgroup: &Path) -> Result<(), ServiceError> {
        check_child_cgroup(cgroup)?;
        let file = fs::File::open(cgroup).map_err(|source| ServiceError::Cgroup {
            path: cgroup.to_owned(),
            source,
        })?;
        for name in PROGRAMS {
            let attach_error = |source| ServiceError::Program {
                program: name,
                action: format!("attach to {}", cgroup.display()),
                source: Box::new(source),
            };
            let prog = program(&mut self.bpf, name)?;
            let link_id = prog
                // `Single` is flag 0, the only value bpf_link_create accepts for cgroups.
                .attach(&file, CgroupAttachMode::Single)
                .map_err(attach_error)?;
            if let Some(dir) = &self.pin_dir {
                let link = prog.take_link(link_id).map_err(attach_error)?;
                let link = FdLink::try_from(link).map_err(|source| ServiceError::Bpffs {
                    path: dir.clone(),
                    action: "take an fd link to pin",
                    source: Box::new(source),
                })?;
                replace_pinned_link(&dir.join(format!("link_{name}")), link)?;
            }
        }
        info!(cgroup = %cgroup.display(), pinned = self.pin_dir.is_some(), "service translation attached");
        Ok(())
    }

    /// Removes the pinned links, detaching the programs from the cgroup (links that are not
    /// pinned go with this value). Missing links are not an error.
    pub fn detach_pinned(&mut self) -> Result<(), ServiceError> {
        let Some(dir) = &self.pin_dir else {
            return Ok(());
        };
        for name in PROGRAMS {
            let path = dir.join(format!("link_{name}"));
            if path.exists() {
                remove_pinned_link(&path)?;
            }
        }
        Ok(())
    }

    /// Adds service `key` or replaces its backends. Zero backends make connects to it fail
    /// with ECONNREFUSED. A connect running at the same time uses either the old or the new
    /// list, never a mix.
    pub fn upsert_service(
        &mut self,
        key: ServiceKey,
        backends: &[Backend],
    ) -> Result<(), ServiceError> {
        upsert(&mut self.tables, key, backends)?;
        debug!(service = %key, backends = backends.len(), "service updated");
        Ok(())
    }

    /// Removes service `key`: its address is no longer translated. Returns whether it existed.
    pub fn remove_service(&mut self, key: ServiceKey) -> Result<bool, ServiceError> {
        let existed = remove(&mut self.tables, key)?;
        debug!(service = %key, existed, "service removed");
        Ok(existed)
    }

    /// The backends of service `key`, `None` if there is no such service.
    pub fn service(&self, key: ServiceKey) -> Result<Option<Vec<Backend>>, ServiceError> {
        backends_of(&self.tables, key)
    }

    /// Every service and its backends, as the maps hold them (how an agent restores its state).
    pub fn services(&self) -> Result<BTreeMap<ServiceKey, Vec<Backend>>, ServiceError> {
        list(&self.tables)
    }

    /// How often each [`SvcEvent`] happened, summed over the CPUs.
    pub fn counters(&self) -> Result<BTreeMap<SvcEvent, u64>, ServiceError> {
        let mut totals = BTreeMap::new();
        for event in SvcEvent::ALL {
            let per_cpu = match self.counters.get(&(event as u32), 0) {
                Ok(per_cpu) => per_cpu,
                // A map pinned by an older version, without this event's slot: never counted.
                Err(MapError::OutOfBounds { .. }) => {
                    totals.insert(event, 0);
                    continue;
                }
                Err(source) => {
                    return Err(map_error(COUNTERS_MAP, &format!("get {event:?}"), source).into());
                }
            };
            totals.insert(event, per_cpu.iter().sum());
        }
        Ok(totals)
    }

    /// Where the maps (and pinned links) are pinned, if they are.
    pub fn pin_dir(&self) -> Option<&Path> {
        self.pin_dir.as_deref()
    }
}

/// Refuses anything but a non-root directory of a cgroup v2 hierarchy.
fn check_child_cgroup(path: &Path) -> Result<(), ServiceError> {
    let stat = nix::sys::statfs::statfs(path).map_err(|errno| ServiceError::Cgroup {
        path: path.to_owned(),
        source: errno.into(),
    })?;
    if stat.filesystem_type() != nix::sys::statfs::CGROUP2_SUPER_MAGIC {
        return Err(ServiceError::NotCgroup2 {
            path: path.to_owned(),
        });
    }
    // The kernel gives every cgroup but the root a `cgroup.type` file (CFTYPE_NOT_ON_ROOT).
    if !path.join("cgroup.type").exists() {
        return Err(ServiceError::CgroupRoot {
            path: path.to_owned(),
        });
    }
    Ok(())
}

/// Pins `link` at `path`, first detaching whatever link a predecessor pinned there. The new
/// link is attached before the old one goes, so translation never stops.
fn replace_pinned_link(path: &Path, link: FdLink) -> Result<(), ServiceError> {
    if path.exists() {
        remove_pinned_link(path)?;
    }
    link.pin(path).map_err(|source| ServiceError::Bpffs {
        path: path.to_owned(),
        action: "pin link",
        source: Box::new(source),
    })?;
    Ok(())
}

fn remove_pinned_link(path: &Path) -> Result<(), ServiceError> {
    let old = PinnedLink::from_pin(path).map_err(|source| ServiceError::Bpffs {
        path: path.to_owned(),
        action: "open pinned link",
        source: Box::new(source),
    })?;
    // Unpinning drops the last reference but our fd; dropping the fd detaches the link.
    let old = old.unpin().map_err(|source| ServiceError::Bpffs {
        path: path.to_owned(),
        action: "unpin link",
        source: Box::new(source),
    })?;
    drop(old);
    Ok(())
}

fn program<'a>(
    bpf: &'a mut Ebpf,
    name: &'static str,
) -> Result<&'a mut CgroupSockAddr, ServiceError> {
    bpf.program_mut(name)
        .ok_or(ServiceError::Missing {
            kind: "program",
            name,
        })?
        .try_into()
        .map_err(|source| ServiceError::Program {
            program: name,
            action: "expect a cgroup sock_addr program".into(),
            source: Box::new(source),
        })
}

fn take_map(bpf: &mut Ebpf, name: &'static str) -> Result<aya::maps::Map, ServiceError> {
    bpf.take_map(name)
        .ok_or(ServiceError::Missing { kind: "map", name })
}

/// The two maps that hold the service table: the seam between the update logic below and the
/// kernel, so that the logic is unit-tested against [`tests::FakeTables`].
trait Tables {
    fn service(&self, key: &SvcKey) -> Result<Option<SvcInfo>, ServiceError>;
    fn set_service(&mut self, key: &SvcKey, info: SvcInfo) -> Result<(), ServiceError>;
    fn remove_service(&mut self, key: &SvcKey) -> Result<bool, ServiceError>;
    fn services(&self) -> Result<Vec<(SvcKey, SvcInfo)>, ServiceError>;
    fn slot(&self, key: &SvcSlotKey) -> Result<Option<SvcAddr>, ServiceError>;
    fn set_slot(&mut self, key: &SvcSlotKey, backend: SvcAddr) -> Result<(), ServiceError>;
    fn remove_slot(&mut self, key: &SvcSlotKey) -> Result<(), ServiceError>;
    fn slot_keys(&self) -> Result<Vec<SvcSlotKey>, ServiceError>;
}

struct AyaTables {
    services: HashMap<MapData, SvcKey, SvcInfo>,
    slots: HashMap<MapData, SvcSlotKey, SvcAddr>,
}

impl Tables for AyaTables {
    fn service(&self, key: &SvcKey) -> Result<Option<SvcInfo>, ServiceError> {
        match self.services.get(key, 0) {
            Ok(info) => Ok(Some(info)),
            Err(e) if is_not_found(&e) => Ok(None),
            Err(e) => Err(map_error(SERVICES_MAP, "get", e).into()),
        }
    }

    fn set_service(&mut self, key: &SvcKey, info: SvcInfo) -> Result<(), ServiceError> {
        self.services
            .insert(key, info, 0)
            .map_err(|e| map_error(SERVICES_MAP, "insert", e).into())
    }

    fn remove_service(&mut self, key: &SvcKey) -> Result<bool, ServiceError> {
        match self.services.remove(key) {
            Ok(()) => Ok(true),
            Err(e) if is_not_found(&e) => Ok(false),
            Err(e) => Err(map_error(SERVICES_MAP, "remove", e).into()),
        }
    }

    fn services(&self) -> Result<Vec<(SvcKey, SvcInfo)>, ServiceError> {
        self.services
            .iter()
            .collect::<Result<_, _>>()
            .map_err(|e| map_error(SERVICES_MAP, "iterate", e).into())
    }

    fn slot(&self, key: &SvcSlotKey) -> Result<Option<SvcAddr>, ServiceError> {
        match self.slots.get(key, 0) {
            Ok(addr) => Ok(Some(addr)),
            Err(e) if is_not_found(&e) => Ok(None),
            Err(e) => Err(map_error(SLOTS_MAP, "get", e).into()),
        }
    }

    fn set_slot(&mut self, key: &SvcSlotKey, backend: SvcAddr) -> Result<(), ServiceError> {
        self.slots
            .insert(key, backend, 0)
            .map_err(|e| map_error(SLOTS_MAP, "insert", e).into())
    }

    fn remove_slot(&mut self, key: &SvcSlotKey) -> Result<(), ServiceError> {
        match self.slots.remove(key) {
            Err(e) if !is_not_found(&e) => Err(map_error(SLOTS_MAP, "remove", e).into()),
            _ => Ok(()),
        }
    }

    fn slot_keys(&self) -> Result<Vec<SvcSlotKey>, ServiceError> {
        self.slots
            .keys()
            .collect::<Result<_, _>>()
            .map_err(|e| map_error(SLOTS_MAP, "iterate", e).into())
    }
}

fn validate(key: ServiceKey, backends: &[Backend]) -> Result<(), ServiceError> {
    let invalid = |reason: String| ServiceError::Invalid {
        service: key,
        reason,
    };
    if key.ip.is_unspecified() || key.ip.is_broadcast() {
        return Err(invalid(format!("{} is not a service address", key.ip)));
    }
    if key.port == 0 {
        return Err(invalid("port 0".into()));
    }
    if backends.len() > MAX_BACKENDS {
        return Err(invalid(format!(
            "{} backends, at most {MAX_BACKENDS}",
            backends.len()
        )));
    }
    let bad: Vec<String> = backends
        .iter()
        .filter(|b| b.ip.is_unspecified() || b.ip.is_broadcast() || b.port == 0)
        .map(Backend::to_string)
        .collect();
    if !bad.is_empty() {
        return Err(invalid(format!("unusable backends {}", bad.join(", "))));
    }
    Ok(())
}

/// Writes the new list under the next revision, switches the service entry to it, deletes the
/// old revision. If writing the new list fails, the service is left as it was; if the list is
/// the one the service already has, nothing is written (an agent may re-apply its state).
fn upsert(
    tables: &mut impl Tables,
    key: ServiceKey,
    backends: &[Backend],
) -> Result<(), ServiceError> {
    validate(key, backends)?;
    let raw = key.raw();
    let old = tables.service(&raw)?;
    if old.is_some() && backends_of(tables, key)?.as_deref() == Some(backends) {
        return Ok(());
    }
    let revision = old.map_or(1, |info| info.revision.wrapping_add(1));
    for (slot, backend) in (0u32..).zip(backends) {
        if let Err(error) = tables.set_slot(&raw.slot(revision, slot), backend.raw()) {
            delete_slots(tables, &raw, revision, slot);
            return Err(error);
        }
    }
    let count = backends.len() as u32;
    if let Err(error) = tables.set_service(&raw, SvcInfo { count, revision }) {
        delete_slots(tables, &raw, revision, count);
        return Err(error);
    }
    if let Some(old) = old {
        delete_slots(tables, &raw, old.revision, old.count);
    }
    Ok(())
}

fn remove(tables: &mut impl Tables, key: ServiceKey) -> Result<bool, ServiceError> {
    let raw = key.raw();
    let Some(old) = tables.service(&raw)? else {
        return Ok(false);
    };
    let existed = tables.remove_service(&raw)?;
    delete_slots(tables, &raw, old.revision, old.count);
    Ok(existed)
}

/// Deletes slots `0..count` of `revision`. Best effort: a slot left behind is unreachable
/// (no service entry names its revision) and [`sweep`] deletes it on the next load.
fn delete_slots(tables: &mut impl Tables, key: &SvcKey, revision: u32, count: u32) {
    for slot in 0..count {
        if let Err(error) = tables.remove_slot(&key.slot(revision, slot)) {
            warn!(%error, revision, slot, "could not delete a backend slot");
        }
    }
}

fn backends_of(
    tables: &impl Tables,
    key: ServiceKey,
) -> Result<Option<Vec<Backend>>, ServiceError> {
    let raw = key.raw();
    let Some(info) = tables.service(&raw)? else {
        return Ok(None);
    };
    let mut backends = Vec::with_capacity(info.count as usize);
    for slot in 0..info.count {
        if let Some(addr) = tables.slot(&raw.slot(info.revision, slot))? {
            backends.push(Backend::from_raw(&addr));
        }
    }
    Ok(Some(backends))
}

fn list(tables: &impl Tables) -> Result<BTreeMap<ServiceKey, Vec<Backend>>, ServiceError> {
    let mut all = BTreeMap::new();
    for (raw, _) in tables.services()? {
        let Some(key) = ServiceKey::from_raw(&raw) else {
            continue;
        };
        if let Some(backends) = backends_of(tables, key)? {
            all.insert(key, backends);
        }
    }
    Ok(all)
}

/// Deletes every slot that no service entry points at. Returns how many.
fn sweep(tables: &mut impl Tables) -> Result<usize, ServiceError> {
    let live: std::collections::HashMap<SvcKey, SvcInfo> = tables.services()?.into_iter().collect();
    let mut swept = 0;
    for slot in tables.slot_keys()? {
        let service = SvcKey {
            ip4: slot.ip4,
            port: slot.port,
            proto: slot.proto,
            pad: 0,
        };
        let reachable = live
            .get(&service)
            .is_some_and(|info| info.revision == slot.revision && slot.slot < info.count);
        if !reachable {
            tables.remove_slot(&slot)?;
            swept += 1;
        }
    }
    Ok(swept)
}

#[cfg(test)]
mod tests {
    use super::*;
    use aya::maps::MapError;

    /// The maps in memory. After every write it checks what the BPF program relies on: every
    /// published service's slots `0..count` of its revision exist.
    #[derive(Default)]
    pub(super) struct FakeTables {
        services: BTreeMap<SvcKey, SvcInfo>,
        slots: BTreeMap<SvcSlotKey, SvcAddr>,
        /// Fail the nth slot write from now (1-based), to test rollback.
        fail_slot_write: Option<usize>,
    }

    impl FakeTables {
        fn check_published(&self) {
            for (key, info) in &self.services {
                for slot in 0..info.count {
                    assert!(
                        self.slots.contains_key(&key.slot(info.revision, slot)),
                        "service {key:?} published with slot {slot} of revision {} missing",
                        info.revision
                    );
                }
            }
        }
    }

    fn injected() -> ServiceError {
        map_error(
            SLOTS_MAP,
            "insert",
            MapError::OutOfBounds {
                index: 0,
                max_entries: 0,
            },
        )
        .into()
    }

    impl Tables for FakeTables {
        fn service(&self, key: &SvcKey) -> Result<Option<SvcInfo>, ServiceError> {
            Ok(self.services.get(key).copied())
        }
        fn set_service(&mut self, key: &SvcKey, info: SvcInfo) -> Result<(), ServiceError> {
            self.services.insert(*key, info);
            self.check_published();
            Ok(())
        }
        fn remove_service(&mut self, key: &SvcKey) -> Result<bool, ServiceError> {
            Ok(self.services.remove(key).is_some())
        }
        fn services(&self) -> Result<Vec<(SvcKey, SvcInfo)>, ServiceError> {
            Ok(self.services.iter().map(|(k, v)| (*k, *v)).collect())
        }
        fn slot(&self, key: &SvcSlotKey) -> Result<Option<SvcAddr>, ServiceError> {
            Ok(self.slots.get(key).copied())
        }
        fn set_slot(&mut self, key: &SvcSlotKey, backend: SvcAddr) -> Result<(), ServiceError> {
            if let Some(n) = self.fail_slot_write.as_mut() {
                *n -= 1;
                if *n == 0 {
                    self.fail_slot_write = None;
                    return Err(injected());
                }
            }
            self.slots.insert(*key, backend);
            Ok(())
        }
        fn remove_slot(&mut self, key: &SvcSlotKey) -> Result<(), ServiceError> {
            self.slots.remove(key);
            self.check_published();
            Ok(())
        }
        fn slot_keys(&self) -> Result<Vec<SvcSlotKey>, ServiceError> {
            Ok(self.slots.keys().copied().collect())
        }
    }

    const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);

    fn backends(last_octets: &[u8]) -> Vec<Backend> {
        last_octets
            .iter()
            .map(|o| Backend::new(Ipv4Addr::new(10, 244, 1, *o), 8080))
            .collect()
    }

    #[test]
    fn replacing_backends_never_publishes_a_partial_list() {
        let mut tables = FakeTables::default();
        let key = ServiceKey::tcp(VIP, 80);
        upsert(&mut tables, key, &backends(&[1, 2, 3])).expect("first");
        upsert(&mut tables, key, &backends(&[4, 5])).expect("shrink");
        upsert(&mut tables, key, &backends(&[4, 5, 6, 7])).expect("grow");
        assert_eq!(
            backends_of(&tables, key).expect("read"),
            Some(backends(&[4, 5, 6, 7]))
        );
        assert_eq!(tables.services[&key.raw()].revision, 3);
        // Only the live revision's slots remain.
        assert_eq!(tables.slots.len(), 4);
        assert!(tables.slots.keys().all(|s| s.revision == 3));
    }

    #[test]
    fn reapplying_the_same_list_writes_nothing() {
        let mut tables = FakeTables::default();
        let key = ServiceKey::tcp(VIP, 80);
        upsert(&mut tables, key, &backends(&[1, 2])).expect("first");
        upsert(&mut tables, key, &backends(&[1, 2])).expect("again");
        assert_eq!(tables.services[&key.raw()].revision, 1);
        // Same backends in another order is another list: the program indexes slots.
        upsert(&mut tables, key, &backends(&[2, 1])).expect("reordered");
        assert_eq!(tables.services[&key.raw()].revision, 2);
        upsert(&mut tables, key, &[]).expect("empty");
        upsert(&mut tables, key, &[]).expect("empty again");
        assert_eq!(tables.services[&key.raw()].revision, 3);
    }

    #[test]
    fn zero_backends_is_a_service_that_refuses() {
        let mut tables = FakeTables::default();
        let key = ServiceKey::udp(VIP, 53);
        upsert(&mut tables, key, &backends(&[1])).expect("one");
        upsert(&mut tables, key, &[]).expect("none");
        assert_eq!(backends_of(&tables, key).expect("read"), Some(vec![]));
        assert_eq!(tables.services[&key.raw()].count, 0);
        assert!(tables.slots.is_empty());
    }

    #[test]
    fn remove_deletes_entry_and_slots() {
        let mut tables = FakeTables::default();
        let tcp = ServiceKey::tcp(VIP, 80);
        let udp = ServiceKey::udp(VIP, 80);
        upsert(&mut tables, tcp, &backends(&[1, 2])).expect("tcp");
        upsert(&mut tables, udp, &backends(&[3])).expect("udp");
        assert!(remove(&mut tables, tcp).expect("remove"));
        assert!(!remove(&mut tables, tcp).expect("remove again"));
        assert_eq!(
            list(&tables).expect("list"),
            BTreeMap::from([(udp, backends(&[3]))])
        );
        assert_eq!(tables.slots.len(), 1);
    }

    #[test]
    fn a_failed_write_leaves_the_old_list_in_place() {
        let mut tables = FakeTables::default();
        let key = ServiceKey::tcp(VIP, 80);
        upsert(&mut tables, key, &backends(&[1, 2])).expect("first");
        tables.fail_slot_write = Some(2);
        assert!(upsert(&mut tables, key, &backends(&[3, 4, 5])).is_err());
        assert_eq!(
            backends_of(&tables, key).expect("read"),
            Some(backends(&[1, 2]))
        );
        assert_eq!(
            tables.slots.len(),
            2,
            "the new revision's slot was rolled back"
        );
    }

    #[test]
    fn sweep_deletes_unreachable_slots() {
        let mut tables = FakeTables::default();
        let key = ServiceKey::tcp(VIP, 80);
        upsert(&mut tables, key, &backends(&[1, 2])).expect("first");
        let raw = key.raw();
        let stray = Backend::new(Ipv4Addr::new(10, 244, 9, 9), 1).raw();
        // What an agent killed mid-update leaves: a written but unpublished revision, and a
        // slot beyond the live count.
        tables.slots.insert(raw.slot(2, 0), stray);
        tables.slots.insert(raw.slot(1, 5), stray);
        let gone = ServiceKey::tcp(Ipv4Addr::new(10, 96, 0, 11), 80).raw();
        tables.slots.insert(gone.slot(1, 0), stray);
        assert_eq!(sweep(&mut tables).expect("sweep"), 3);
        assert_eq!(
            backends_of(&tables, key).expect("read"),
            Some(backends(&[1, 2]))
        );
        assert_eq!(tables.slots.len(), 2);
    }

    #[test]
    fn the_datapath_can_move_to_an_agent_thread() {
        fn send_and_sync<T: Send + Sync>() {}
        send_and_sync::<ServiceDatapath>();
        send_and_sync::<ServiceError>();
    }

    #[test]
    fn bad_input_is_refused_naming_the_problem() {
        let mut tables = FakeTables::default();
        let cases = [
            (ServiceKey::tcp(Ipv4Addr::UNSPECIFIED, 80), backends(&[1])),
            (ServiceKey::tcp(VIP, 0), backends(&[1])),
            (
                ServiceKey::tcp(VIP, 80),
                vec![Backend::new(Ipv4Addr::new(10, 244, 1, 1), 0)],
            ),
            (
                ServiceKey::tcp(VIP, 80),
                backends(&[1]).repeat(MAX_BACKENDS + 1),
            ),
        ];
        for (key, list) in cases {
            let error = upsert(&mut tables, key, &list).expect_err("refused");
            assert!(matches!(error, ServiceError::Invalid { .. }), "{error}");
        }
        assert!(tables.services.is_empty() && tables.slots.is_empty());
        assert_eq!(ServiceKey::udp(VIP, 53).to_string(), "10.96.0.10:53/udp");
    }
}
