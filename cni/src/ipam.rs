//! Host-local address management for one host's block of the pod CIDR.
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
}

impl Allocation {
    pub fn attachment(&self) -> Attachment {
        Attachment {
            container_id: self.container_id.clone(),
            ifname: self.ifname.clone(),
        }
    }
}

/// The allocations of one network on one host.
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

impl Locked<'_> {
    /// Every allocation, in address order. Temporary files of interrupted writes are ignored.
    pub fn list(&self) -> Result<Vec<Allocation>, CniError> {
        let mut all = Vec::new();
        for entry in fs::read_dir(&self.store.dir).map_err(io_error("list"))? {
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

    /// The allocation of `attachment`, if any.
    pub fn find(&self, attachment: &Attachment) -> Result<Option<Allocation>, CniError> {
        Ok(self
            .list()?
            .into_iter()
            .find(|a| a.attachment() == *attachment))
    }

    /// Allocates the next free address of `block` after the last one handed out (round robin,
    /// so a released address is not reused at once) to `attachment`.
    pub fn allocate(
        &self,
        block: Ipv4Network,
        attachment: &Attachment,
        host_ifname: &str,
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
            let allocation = Allocation {
                ip,
                container_id: attachment.container_id.clone(),
                ifname: attachment.ifname.clone(),
                host_ifname: host_ifname.to_owned(),
            };
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

    #[test]
    fn allocates_round_robin_and_exhausts() {
        let (store, dir) = store("rr");
        let block: Ipv4Network = "10.244.1.0/29".parse().expect("cidr");
        let locked = store.lock().expect("lock");
        let ips: Vec<Ipv4Addr> = (0..5)
            .map(|i| {
                locked
                    .allocate(block, &attachment(&format!("c{i}")), "lxc")
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
            .allocate(block, &attachment("c9"), "lxc")
            .expect_err("full");
        assert_eq!(err.code, Code::NoAddresses);

        locked.release(ips[1]).expect("release");
        locked.release(ips[1]).expect("release twice");
        assert_eq!(
            locked
                .allocate(block, &attachment("c10"), "lxc")
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
        let a = locked
            .allocate(block, &attachment("a"), "lxc")
            .expect("a")
            .ip;
        locked.release(a).expect("release");
        let b = locked
            .allocate(block, &attachment("b"), "lxc")
            .expect("b")
            .ip;
        assert_ne!(a, b);
        let _ = fs::remove_dir_all(dir);
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
