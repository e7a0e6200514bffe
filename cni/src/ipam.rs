//! Host-local address management for one host's block of the pod CIDR.
//!
//! There is one store per host block (`<dataDir>/ipam/<network address>_<prefix>/`), whatever
//! the network name: two conflists over the same block share its lock and its allocations, so
//! they never hand out the same address. Each allocation records the network that made it, so
//! one network's GC reclaims only its own attachments. Allocations older versions kept per
//! network (`<dataDir>/ipam/<network name>/`) are adopted into their block's store.
//!
//! Each allocation is one file in the store directory, named by the address and holding the
//! attachment that owns it. A file is written in full under a temporary name, synced, and then
//! hard-linked to its final name, which fails if the address is taken: an allocation either
//! exists completely or not at all, whatever moment a crash hits. An ADD killed after
//! allocating leaves a complete record naming its attachment, which GC reclaims when the runtime
//! no longer lists the attachment. A lock file serialises concurrent plugin runs.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::net::Ipv4Addr;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};

use ipnetwork::Ipv4Network;
use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};

use crate::spec::{Attachment, CniError, Code};

/// Who holds an address.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Allocation {
    pub ip: Ipv4Addr,
    #[serde(rename = "containerID")]
    pub container_id: String,
    pub ifname: String,
    /// The host side of the pod's veth.
    pub host_ifname: String,
    /// The network (conflist `name`) that made it; absent in records of older versions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<String>,
}

impl Allocation {
    pub fn attachment(&self) -> Attachment {
        Attachment {
            container_id: self.container_id.clone(),
            ifname: self.ifname.clone(),
        }
    }
}

/// Who asks for an address: everything of an [`Allocation`] but the address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owner {
    pub attachment: Attachment,
    pub host_ifname: String,
    pub network: String,
}

impl Owner {
    /// The allocation of `ip` to this owner.
    pub fn at(&self, ip: Ipv4Addr) -> Allocation {
        Allocation {
            ip,
            container_id: self.attachment.container_id.clone(),
            ifname: self.attachment.ifname.clone(),
            host_ifname: self.host_ifname.clone(),
            network: Some(self.network.clone()),
        }
    }
}

/// The allocations of one host block.
#[derive(Debug, Clone)]
pub struct Store {
    dir: PathBuf,
}

/// Holds the store's lock while alive.
#[derive(Debug)]
pub struct Locked<'a> {
    store: &'a Store,
    _lock: Flock<File>,
}

fn io_error(what: impl std::fmt::Display) -> impl FnOnce(io::Error) -> CniError {
    let what = what.to_string();
    move |e| CniError::new(Code::Io, format!("ipam: {what}: {e}"))
}

impl Store {
    /// The store in `dir`, created if missing.
    pub fn open(dir: impl Into<PathBuf>) -> Result<Self, CniError> {
        let dir = dir.into();
        fs::create_dir_all(&dir).map_err(io_error(format!("create {}", dir.display())))?;
        Ok(Self { dir })
    }

    /// The store of `block` under `data_dir`, created if missing.
    pub fn for_block(data_dir: &Path, block: Ipv4Network) -> Result<Self, CniError> {
        Self::open(block_dir(data_dir, block))
    }

    /// Every store under `data_dir` (those of blocks, and per-network ones older versions
    /// made), for commands that must find an attachment without knowing the block.
    pub fn all(data_dir: &Path) -> Result<Vec<Self>, CniError> {
        let root = data_dir.join("ipam");
        let entries = match fs::read_dir(&root) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io_error(format!("list {}", root.display()))(e)),
        };
        let mut stores: Vec<Self> = entries
            .flatten()
            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
            .map(|e| Self { dir: e.path() })
            .collect();
        stores.sort_by(|a, b| a.dir.cmp(&b.dir));
        Ok(stores)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Takes the store's lock (blocking).
    pub fn lock(&self) -> Result<Locked<'_>, CniError> {
        let path = self.dir.join(".lock");
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(io_error("open lock"))?;
        let lock = Flock::lock(file, FlockArg::LockExclusive).map_err(|(_, errno)| {
            CniError::new(Code::Io, format!("ipam: lock {}: {errno}", path.display()))
        })?;
        Ok(Locked {
            store: self,
            _lock: lock,
        })
    }
}

impl Store {
    /// Every allocation, read without the lock (for a look at another store).
    pub fn snapshot(&self) -> Result<Vec<Allocation>, CniError> {
        read_all(&self.dir)
    }
}

impl Locked<'_> {
    /// Every allocation, in address order. Temporary files of interrupted writes are ignored.
    pub fn list(&self) -> Result<Vec<Allocation>, CniError> {
        read_all(&self.store.dir)
    }

    /// The allocation of `attachment`, if any.
    pub fn find(&self, attachment: &Attachment) -> Result<Option<Allocation>, CniError> {
        Ok(self
            .list()?
            .into_iter()
            .find(|a| a.attachment() == *attachment))
    }

    /// Allocates the next free address of `block` after the last one handed out (round robin,
    /// so a released address is not reused at once) to `owner`. Addresses `in_use` says are
    /// taken (by a pod whose record is elsewhere) are skipped.
    pub fn allocate(
        &self,
        block: Ipv4Network,
        owner: &Owner,
        in_use: &dyn Fn(Ipv4Addr) -> bool,
    ) -> Result<Allocation, CniError> {
        let hosts = usable(block);
        if hosts.is_empty() {
            return Err(CniError::new(
                Code::InvalidConfig,
                format!("hostBlock: {block} has no usable address"),
            ));
        }
        let last = fs::read_to_string(self.store.dir.join("last_reserved_ip"))
            .ok()
            .and_then(|t| t.trim().parse::<Ipv4Addr>().ok());
        let start = last
            .and_then(|ip| hosts.iter().position(|h| *h == ip))
            .map_or(0, |i| i + 1);
        for offset in 0..hosts.len() {
            let ip = hosts[(start + offset) % hosts.len()];
            if in_use(ip) {
                continue;
            }
            let allocation = owner.at(ip);
            if self.claim(&allocation)? {
                // Best effort: only the starting point of the next search depends on it.
                let _ = write_synced(
                    &self.store.dir.join("last_reserved_ip"),
                    ip.to_string().as_bytes(),
                );
                return Ok(allocation);
            }
        }
        Err(CniError::new(
            Code::NoAddresses,
            format!("ipam: no free address in {block}"),
        ))
    }

    /// Allocates exactly `ip` (a runtime's static address request) to `owner`: it must be a
    /// usable address of `block` that is free.
    pub fn allocate_exact(
        &self,
        block: Ipv4Network,
        ip: Ipv4Addr,
        owner: &Owner,
        in_use: &dyn Fn(Ipv4Addr) -> bool,
        field: &str,
    ) -> Result<Allocation, CniError> {
        if !usable(block).contains(&ip) {
            return Err(CniError::new(
                Code::InvalidConfig,
                format!(
                    "{field}: {ip} is not a usable pod address of this host's block {block} \
                     (not its network, router or broadcast address)"
                ),
            ));
        }
        let allocation = owner.at(ip);
        if in_use(ip) || !self.claim(&allocation)? {
            return Err(CniError::new(
                Code::AddressInUse,
                format!("{field}: {ip} is already in use"),
            ));
        }
        Ok(allocation)
    }

    /// Records an address another IPAM plugin handed out (delegation), so DEL and GC find it.
    pub fn record(&self, allocation: &Allocation) -> Result<(), CniError> {
        if self.claim(allocation)? {
            Ok(())
        } else {
            Err(CniError::new(
                Code::InvalidConfig,
                format!(
                    "ipam: {} is already recorded for another attachment",
                    allocation.ip
                ),
            ))
        }
    }

    /// Writes the allocation's file unless the address is taken; Ok(false) if it is.
    fn claim(&self, allocation: &Allocation) -> Result<bool, CniError> {
        let path = self.store.dir.join(allocation.ip.to_string());
        if path.exists() {
            return Ok(false);
        }
        let tmp = self
            .store
            .dir
            .join(format!(".{}.{}.tmp", allocation.ip, std::process::id()));
        let body =
            serde_json::to_vec(allocation).map_err(|e| CniError::new(Code::Io, e.to_string()))?;
        write_synced(&tmp, &body).map_err(io_error("write allocation"))?;
        let linked = fs::hard_link(&tmp, &path);
        let _ = fs::remove_file(&tmp);
        match linked {
            Ok(()) => {
                sync_dir(&self.store.dir).map_err(io_error("sync"))?;
                Ok(true)
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(false),
            Err(e) => Err(io_error("link allocation")(e)),
        }
    }

    /// Releases `ip`; an address that is not allocated is not an error.
    pub fn release(&self, ip: Ipv4Addr) -> Result<(), CniError> {
        match fs::remove_file(self.store.dir.join(ip.to_string())) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => {
                Err(io_error(format!("release {ip}"))(e))
            }
            _ => sync_dir(&self.store.dir).map_err(io_error("sync")),
        }
    }

    /// Moves into this store (that of `block`) the allocations of `block` that older versions
    /// recorded in per-network stores (`<dataDir>/ipam/<network name>/`), naming their network,
    /// so GC and STATUS see them. An address recorded in both stays where it is (DEL finds it
    /// there). Returns how many moved.
    pub fn adopt_legacy(&self, data_dir: &Path, block: Ipv4Network) -> Result<usize, CniError> {
        let mut moved = 0;
        for store in Store::all(data_dir)? {
            let Some(network) = store
                .dir()
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .filter(|n| !is_block_name(n))
            else {
                continue;
            };
            let legacy = store.lock()?;
            for mut allocation in legacy.list()? {
                if !block.contains(allocation.ip) {
                    continue;
                }
                allocation.network.get_or_insert_with(|| network.clone());
                if self.claim(&allocation)? {
                    legacy.release(allocation.ip)?;
                    moved += 1;
                }
            }
        }
        Ok(moved)
    }

    /// Removes temporary files left by writes that were interrupted.
    pub fn sweep_temporaries(&self) -> Result<usize, CniError> {
        let mut removed = 0;
        for entry in fs::read_dir(&self.store.dir)
            .map_err(io_error("list"))?
            .flatten()
        {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.ends_with(".tmp") && fs::remove_file(entry.path()).is_ok() {
                removed += 1;
            }
        }
        Ok(removed)
    }
}

/// The directory of `block`'s store: `<dataDir>/ipam/10.244.1.0_24`.
pub fn block_dir(data_dir: &Path, block: Ipv4Network) -> PathBuf {
    data_dir
        .join("ipam")
        .join(format!("{}_{}", block.network(), block.prefix()))
}

/// Whether a store directory's name is a block's (`10.244.1.0_24`), not a network's.
fn is_block_name(name: &str) -> bool {
    name.split_once('_').is_some_and(|(ip, prefix)| {
        ip.parse::<Ipv4Addr>().is_ok() && prefix.parse::<u8>().is_ok_and(|p| p <= 32)
    })
}

/// The addresses of `block` a pod may get: all but the network address, the host's router
/// address (the first one, see [`router_ip`]) and the broadcast address. A /30 spares no
/// router address; a /31 or /32 has no network or broadcast address either.
pub fn usable(block: Ipv4Network) -> Vec<Ipv4Addr> {
    let all: Vec<Ipv4Addr> = block.iter().collect();
    match block.prefix() {
        31 | 32 => all,
        30 => all[1..3].to_vec(),
        _ => all[2..all.len() - 1].to_vec(),
    }
}

/// The host's router address in `block`: the source of NodePort traffic it sends to backends
/// on other hosts. `None` for blocks too small to spare it.
pub fn router_ip(block: Ipv4Network) -> Option<Ipv4Addr> {
    (block.prefix() < 30).then(|| block.iter().nth(1)).flatten()
}

/// Every allocation record in `dir`, in address order; temporaries are ignored.
fn read_all(dir: &Path) -> Result<Vec<Allocation>, CniError> {
    let mut all = Vec::new();
    for entry in fs::read_dir(dir).map_err(io_error("list"))? {
        let entry = entry.map_err(io_error("list"))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.parse::<Ipv4Addr>().is_err() {
            continue;
        }
        let text = fs::read(entry.path()).map_err(io_error(format!("read {name}")))?;
        let allocation: Allocation = serde_json::from_slice(&text).map_err(|e| {
            CniError::new(
                Code::Decode,
                format!("ipam: allocation {name} is corrupt: {e}"),
            )
        })?;
        all.push(allocation);
    }
    all.sort_by_key(|a| a.ip);
    Ok(all)
}

fn write_synced(path: &Path, body: &[u8]) -> io::Result<()> {
    let mut file = File::create(path)?;
    file.write_all(body)?;
    file.sync_all()
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    let dir = File::open(dir)?;
    nix::unistd::fsync(dir.as_fd()).map_err(io::Error::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store(name: &str) -> (Store, PathBuf) {
        let dir = std::env::temp_dir().join(format!("slipway-ipam-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        (Store::open(&dir).expect("store"), dir)
    }

    fn attachment(id: &str) -> Attachment {
        Attachment {
            container_id: id.into(),
            ifname: "eth0".into(),
        }
    }

    fn owner(id: &str) -> Owner {
        Owner {
            attachment: attachment(id),
            host_ifname: "lxc".into(),
            network: "net".into(),
        }
    }

    fn free(_: Ipv4Addr) -> bool {
        false
    }

    #[test]
    fn allocates_round_robin_and_exhausts() {
        let (store, dir) = store("rr");
        let block: Ipv4Network = "10.244.1.0/29".parse().expect("cidr");
        let locked = store.lock().expect("lock");
        let ips: Vec<Ipv4Addr> = (0..5)
            .map(|i| {
                locked
                    .allocate(block, &owner(&format!("c{i}")), &free)
                    .expect("alloc")
                    .ip
            })
            .collect();
        let expected: Vec<Ipv4Addr> = (2..=6).map(|i| Ipv4Addr::new(10, 244, 1, i)).collect();
        assert_eq!(
            ips, expected,
            "network, router and broadcast are never handed out"
        );
        let err = locked
            .allocate(block, &owner("c9"), &free)
            .expect_err("full");
        assert_eq!(err.code, Code::NoAddresses);

        locked.release(ips[1]).expect("release");
        locked.release(ips[1]).expect("release twice");
        assert_eq!(
            locked
                .allocate(block, &owner("c10"), &free)
                .expect("reuse")
                .ip,
            ips[1]
        );
        assert_eq!(
            locked.find(&attachment("c10")).expect("find").map(|a| a.ip),
            Some(ips[1])
        );
        assert_eq!(locked.list().expect("list").len(), 5);
        let _ = fs::remove_dir_all(dir);
    }

    #[test]
    fn a_released_address_is_not_reused_first() {
        let (store, dir) = store("next");
        let block: Ipv4Network = "10.244.2.0/24".parse().expect("cidr");
        let locked = store.lock().expect("lock");
        let a = locked.allocate(block, &owner("a"), &free).expect("a").ip;
        locked.release(a).expect("release");
        let b = locked.allocate(block, &owner("b"), &free).expect("b").ip;
        assert_ne!(a, b);
        let _ = fs::remove_dir_all(dir);
    }

    #[test]
    fn addresses_in_use_elsewhere_are_skipped() {
        let (store, dir) = store("inuse");
        let block: Ipv4Network = "10.244.4.0/29".parse().expect("cidr");
        let locked = store.lock().expect("lock");
        let taken = Ipv4Addr::new(10, 244, 4, 2);
        let got = locked
            .allocate(block, &owner("a"), &|ip| ip == taken)
            .expect("alloc")
            .ip;
        assert_ne!(got, taken, "an address in use is never handed out");
        let _ = fs::remove_dir_all(dir);
    }

    #[test]
    fn an_exact_address_is_honoured_or_refused() {
        let (store, dir) = store("exact");
        let block: Ipv4Network = "10.244.5.0/24".parse().expect("cidr");
        let locked = store.lock().expect("lock");
        let want = Ipv4Addr::new(10, 244, 5, 77);
        let got = locked
            .allocate_exact(block, want, &owner("a"), &free, "ips")
            .expect("free address");
        assert_eq!((got.ip, got.network.as_deref()), (want, Some("net")));
        let err = locked
            .allocate_exact(block, want, &owner("b"), &free, "ips")
            .expect_err("taken");
        assert_eq!(err.code, Code::AddressInUse);
        assert!(err.msg.starts_with("ips: 10.244.5.77"), "{}", err.msg);
        let other = Ipv4Addr::new(10, 244, 5, 78);
        let err = locked
            .allocate_exact(block, other, &owner("b"), &|ip| ip == other, "ips")
            .expect_err("in use elsewhere");
        assert_eq!(err.code, Code::AddressInUse);
        for outside in ["10.244.6.3", "10.244.5.1", "10.244.5.255"] {
            let ip: Ipv4Addr = outside.parse().expect("ip");
            let err = locked
                .allocate_exact(block, ip, &owner("c"), &free, "ips")
                .expect_err("unusable");
            assert_eq!(err.code, Code::InvalidConfig, "{outside}");
            assert!(err.msg.contains(outside), "{}", err.msg);
        }
        assert_eq!(
            locked.list().expect("list").len(),
            1,
            "refusals claim nothing"
        );
        let _ = fs::remove_dir_all(dir);
    }

    #[test]
    fn one_store_per_block_whatever_the_network() {
        let data = std::env::temp_dir().join(format!("slipway-ipam-blocks-{}", std::process::id()));
        let _ = fs::remove_dir_all(&data);
        let block: Ipv4Network = "10.244.1.0/24".parse().expect("cidr");
        let a = Store::for_block(&data, block).expect("a");
        let b = Store::for_block(&data, block).expect("b");
        assert_eq!(a.dir(), b.dir());
        assert_eq!(a.dir(), data.join("ipam/10.244.1.0_24"));
        Store::open(data.join("ipam/legacy-network")).expect("legacy");
        let all: Vec<PathBuf> = Store::all(&data)
            .expect("all")
            .iter()
            .map(|s| s.dir().to_owned())
            .collect();
        assert_eq!(all.len(), 2, "{all:?}");
        assert!(Store::all(&data.join("missing")).expect("none").is_empty());
        let _ = fs::remove_dir_all(data);
    }

    #[test]
    fn allocations_of_older_per_network_stores_are_adopted() {
        let data = std::env::temp_dir().join(format!("slipway-ipam-legacy-{}", std::process::id()));
        let _ = fs::remove_dir_all(&data);
        let block: Ipv4Network = "10.244.1.0/24".parse().expect("cidr");
        let legacy = Store::open(data.join("ipam/old-net")).expect("legacy");
        let inside = Ipv4Addr::new(10, 244, 1, 9);
        let outside = Ipv4Addr::new(10, 244, 2, 9);
        {
            let locked = legacy.lock().expect("lock");
            for ip in [inside, outside] {
                let mut allocation = owner("old").at(ip);
                allocation.network = None;
                locked.record(&allocation).expect("record");
            }
        }
        let store = Store::for_block(&data, block).expect("block store");
        let locked = store.lock().expect("lock");
        assert_eq!(locked.adopt_legacy(&data, block).expect("adopt"), 1);
        let adopted = locked.list().expect("list");
        assert_eq!(adopted.len(), 1);
        assert_eq!(
            (adopted[0].ip, adopted[0].network.as_deref()),
            (inside, Some("old-net"))
        );
        let left: Vec<Ipv4Addr> = legacy
            .snapshot()
            .expect("legacy")
            .iter()
            .map(|a| a.ip)
            .collect();
        assert_eq!(left, [outside], "only the block's allocations move");
        assert_eq!(locked.adopt_legacy(&data, block).expect("again"), 0);
        let _ = fs::remove_dir_all(data);
    }

    #[test]
    fn interrupted_writes_leave_only_temporaries() {
        let (store, dir) = store("tmp");
        fs::write(dir.join(".10.244.3.9.123.tmp"), b"{partial").expect("write");
        let locked = store.lock().expect("lock");
        assert!(
            locked.list().expect("list").is_empty(),
            "a temporary is no allocation"
        );
        assert_eq!(locked.sweep_temporaries().expect("sweep"), 1);
        let _ = fs::remove_dir_all(dir);
    }

    #[test]
    fn the_router_address_is_never_handed_out() {
        let block: Ipv4Network = "10.244.1.0/24".parse().expect("cidr");
        assert_eq!(router_ip(block), Some(Ipv4Addr::new(10, 244, 1, 1)));
        let usable = usable(block);
        assert_eq!(usable.first(), Some(&Ipv4Addr::new(10, 244, 1, 2)));
        assert_eq!(usable.last(), Some(&Ipv4Addr::new(10, 244, 1, 254)));
        assert_eq!(usable.len(), 253);
    }

    #[test]
    fn usable_addresses() {
        assert_eq!(
            usable("10.0.0.0/30".parse().expect("cidr")),
            [Ipv4Addr::new(10, 0, 0, 1), Ipv4Addr::new(10, 0, 0, 2)]
        );
        assert_eq!(
            usable("10.0.0.4/32".parse().expect("cidr")),
            [Ipv4Addr::new(10, 0, 0, 4)]
        );
    }
}
