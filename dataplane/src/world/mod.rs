//! The world of `slipway demo`, the benchmarks and the privileged tests: hosts as network namespaces joined by an underlay bridge that lives in a
//! namespace of its own (made as the `netns` host provider makes a zone's segment, through
//! [`crate::underlay`]), pods as namespaces wired to a host by a veth, and raw veth pairs for
//! baselines. It is product code (the demo and the benchmarks ship in the binary); the CNI
//! plugin and the agent import nothing from it.
//!
//! Everything a [`World`] creates is named `slipway-<id>-...` with an id unique to the world,
//! lives inside namespaces it created (the root namespace's links, addresses and routes are never
//! touched), and is torn down when the world is dropped, also while unwinding from a panic:
//! processes inside its namespaces are killed, the namespaces deleted (which deletes their
//! veths), and its bpffs directory removed.

pub mod cgroup;
mod netns;
pub mod traffic;

use std::collections::hash_map::RandomState;
use std::fs;
use std::hash::{BuildHasher, Hasher};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

pub use netns::{LinkInfo, LinkStats, Netns, Process};
use tracing::{debug, warn};

use crate::DataplaneError;
use crate::link::format_mac;

/// Every name a world creates starts with this (namespaces and its bpffs directory).
pub const NAME_PREFIX: &str = "slipway-";

/// Where worlds keep their pinned BPF objects: `<BPFFS>/<world name>/`.
pub const BPFFS: &str = "/sys/fs/bpf";

/// The underlay subnet: host `i` (1-based) is `10.99.0.i/24` on its `eth0`.
const UNDERLAY_NET: [u8; 3] = [10, 99, 0];

/// The link-local gateway every pod routes through; the host side of the pod's veth answers
/// for it through a permanent neighbour entry in the pod.
pub const POD_GATEWAY: Ipv4Addr = Ipv4Addr::new(169, 254, 1, 1);

/// A set of network namespaces torn down together on drop.
#[derive(Debug)]
pub struct World {
    name: String,
    underlay: Netns,
    hosts: Vec<Host>,
    /// Every namespace the world created, in creation order; deleted in reverse.
    created: Mutex<Vec<String>>,
}

/// A host: a network namespace with `eth0` on the underlay bridge.
#[derive(Debug, Clone)]
pub struct Host {
    pub netns: Netns,
    /// 1-based position in the world.
    pub index: usize,
    pub underlay_ip: Ipv4Addr,
}

/// A pod: a network namespace whose `eth0` is one end of a veth, the other end in its host.
#[derive(Debug, Clone)]
pub struct Pod {
    pub netns: Netns,
    pub ip: Ipv4Addr,
    /// Name of the host side of the veth, in the host's namespace.
    pub host_ifname: String,
    pub host_ifindex: u32,
    pub host_mac: [u8; 6],
    pub pod_mac: [u8; 6],
}

/// Builds a [`World`].
#[derive(Debug, Default)]
pub struct WorldBuilder {
    hosts: usize,
}

impl WorldBuilder {
    /// The number of hosts (at least 1).
    pub fn hosts(mut self, hosts: usize) -> Self {
        self.hosts = hosts;
        self
    }

    /// Creates the namespaces. On error, whatever was created is torn down before returning.
    pub fn build(self) -> Result<World, DataplaneError> {
        let name = format!("{NAME_PREFIX}{}", unique_id());
        let mut world = World {
            underlay: Netns::named(format!("{name}-ul")),
            name,
            hosts: Vec::new(),
            created: Mutex::new(Vec::new()),
        };
        world.create_netns(&world.underlay.clone())?;
        crate::underlay::block_on(crate::underlay::ensure_segment(world.underlay.name()))??;
        for index in 1..=self.hosts.max(1) {
            let host = world.add_host(index)?;
            world.hosts.push(host);
        }
        debug!(world = %world.name, hosts = world.hosts.len(), "world built");
        Ok(world)
    }
}

impl World {
    pub fn builder() -> WorldBuilder {
        WorldBuilder::default()
    }

    /// The world's unique name, `slipway-<id>`.
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn hosts(&self) -> &[Host] {
        &self.hosts
    }

    /// Host `index`, 1-based as in its name and underlay address.
    pub fn host(&self, index: usize) -> &Host {
        &self.hosts[index - 1]
    }

    /// The namespace holding the underlay bridge `br0`.
    pub fn underlay(&self) -> &Netns {
        &self.underlay
    }

    /// This world's directory on bpffs, removed with the world. Created on first use.
    pub fn bpffs_dir(&self) -> PathBuf {
        Path::new(BPFFS).join(&self.name)
    }

    fn add_host(&self, index: usize) -> Result<Host, DataplaneError> {
        let netns = Netns::named(format!("{}-h{index}", self.name));
        let octet = u8::try_from(index).map_err(|_| DataplaneError::Command {
            command: "build world".into(),
            detail: format!("host {index}: at most 200 hosts"),
        })?;
        let underlay_ip = Ipv4Addr::new(UNDERLAY_NET[0], UNDERLAY_NET[1], UNDERLAY_NET[2], octet);
        self.plug_into_underlay(&netns, &format!("h{index}"), underlay_ip)?;
        Ok(Host {
            netns,
            index,
            underlay_ip,
        })
    }

    /// A machine outside the cluster on the underlay: namespace `<world>-<label>` with `eth0`
    /// on the bridge at `10.99.0.<octet>/24` (hosts take the low octets; use 200 and up).
    pub fn add_outside(&self, label: &str, octet: u8) -> Result<Netns, DataplaneError> {
        let netns = Netns::named(format!("{}-{label}", self.name));
        let ip = Ipv4Addr::new(UNDERLAY_NET[0], UNDERLAY_NET[1], UNDERLAY_NET[2], octet);
        self.plug_into_underlay(&netns, &format!("o{octet}"), ip)?;
        Ok(netns)
    }

    /// Creates `netns` with `eth0` at `ip/24`, its peer `port` a port of the underlay bridge:
    /// the host provider's plug ([`crate::underlay::Plug`]), without a gateway.
    fn plug_into_underlay(
        &self,
        netns: &Netns,
        port: &str,
        ip: Ipv4Addr,
    ) -> Result<(), DataplaneError> {
        self.create_netns(netns)?;
        let plug = crate::underlay::Plug {
            segment: self.underlay.name(),
            port,
            netns: netns.name(),
            ifname: "eth0",
            address: ip,
            prefix: 24,
            gateway: None,
        };
        crate::underlay::block_on(plug.ensure())?
    }

    /// Creates pod `name` on host `host` with address `ip/32`, routed through [`POD_GATEWAY`].
    /// IPv6 is off in the pod, so that it sends only what a test makes it send.
    pub fn add_pod(&self, host: usize, name: &str, ip: Ipv4Addr) -> Result<Pod, DataplaneError> {
        let host = self.host(host).netns.clone();
        let netns = Netns::named(format!("{}-{name}", host.name()));
        self.create_netns(&netns)?;
        netns.sysctl(&[
            "net.ipv6.conf.all.disable_ipv6=1",
            "net.ipv6.conf.default.disable_ipv6=1",
        ])?;
        let host_ifname = veth_name(name);
        host.ip(&[
            "link",
            "add",
            &host_ifname,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            netns.name(),
        ])?;
        host.ip(&["link", "set", &host_ifname, "up"])?;
        netns.ip(&["addr", "add", &format!("{ip}/32"), "dev", "eth0"])?;
        netns.ip(&["link", "set", "eth0", "up"])?;
        let gateway = POD_GATEWAY.to_string();
        netns.ip(&["route", "add", &gateway, "dev", "eth0", "scope", "link"])?;
        netns.ip(&["route", "add", "default", "via", &gateway, "dev", "eth0"])?;
        let host_link = host.link(&host_ifname)?;
        let pod_link = netns.link("eth0")?;
        netns.ip(&[
            "neigh",
            "add",
            &gateway,
            "lladdr",
            &format_mac(&host_link.mac),
            "dev",
            "eth0",
            "nud",
            "permanent",
        ])?;
        Ok(Pod {
            netns,
            ip,
            host_ifname,
            host_ifindex: host_link.ifindex,
            host_mac: host_link.mac,
            pod_mac: pod_link.mac,
        })
    }

    /// Two namespaces joined by one veth (`eth0` in each, `10.98.0.1/30` and `10.98.0.2/30`):
    /// the raw veth baseline that datapaths are measured against. Returns (a, b).
    pub fn add_raw_pair(&self, label: &str) -> Result<(Netns, Netns), DataplaneError> {
        let a = Netns::named(format!("{}-{label}a", self.name));
        let b = Netns::named(format!("{}-{label}b", self.name));
        for ns in [&a, &b] {
            self.create_netns(ns)?;
            ns.sysctl(&[
                "net.ipv6.conf.all.disable_ipv6=1",
                "net.ipv6.conf.default.disable_ipv6=1",
            ])?;
        }
        a.ip(&[
            "link",
            "add",
            "eth0",
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            b.name(),
        ])?;
        for (ns, ip) in [(&a, "10.98.0.1/30"), (&b, "10.98.0.2/30")] {
            ns.ip(&["addr", "add", ip, "dev", "eth0"])?;
            ns.ip(&["link", "set", "eth0", "up"])?;
        }
        Ok((a, b))
    }

    /// An empty namespace `<world>-<label>` (only `lo`, up), torn down with the world: a pod's
    /// sandbox before a CNI plugin wires it, or a host outside the cluster.
    pub fn add_netns(&self, label: &str) -> Result<Netns, DataplaneError> {
        let ns = Netns::named(format!("{}-{label}", self.name));
        self.create_netns(&ns)?;
        Ok(ns)
    }

    /// Creates namespace `ns` (with `lo` up) and records it for teardown.
    fn create_netns(&self, ns: &Netns) -> Result<(), DataplaneError> {
        crate::netns::create(ns.name())?;
        self.created
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(ns.name().to_owned());
        crate::underlay::block_on(crate::underlay::ensure_netns(ns.name()))?
    }
}

impl Drop for World {
    fn drop(&mut self) {
        let created = std::mem::take(&mut *self.created.lock().unwrap_or_else(|p| p.into_inner()));
        for name in created.iter().rev() {
            if let Err(err) = crate::netns::destroy(name) {
                warn!(netns = %name, error = %err, "could not delete namespace");
            }
        }
        let dir = self.bpffs_dir();
        if dir.exists()
            && let Err(err) = fs::remove_dir_all(&dir)
        {
            warn!(dir = %dir.display(), error = %err, "could not remove bpffs directory");
        }
        debug!(world = %self.name, "world torn down");
    }
}

/// The names of namespaces and bpffs entries that look like a world's, for leak checks.
pub fn leftovers() -> Vec<String> {
    let mut found = Vec::new();
    for dir in [crate::netns::NETNS_RUN_DIR, BPFFS] {
        if let Ok(entries) = fs::read_dir(dir) {
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                if name.starts_with(NAME_PREFIX) {
                    found.push(format!("{dir}/{name}"));
                }
            }
        }
    }
    found.sort();
    found
}

/// 8 hex digits, different for every world of every process.
fn unique_id() -> String {
    let mut hasher = RandomState::new().build_hasher();
    hasher.write_u32(std::process::id());
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    hasher.write_u128(nanos);
    format!("{:08x}", hasher.finish() as u32)
}

/// The host-side veth name of pod `pod`: `lxc` + the pod name, cut to IFNAMSIZ - 1.
fn veth_name(pod: &str) -> String {
    let mut name = format!("lxc{pod}");
    name.truncate(15);
    name
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_and_veth_names() {
        assert_ne!(unique_id(), unique_id());
        assert_eq!(unique_id().len(), 8);
        assert_eq!(veth_name("a"), "lxca");
        assert_eq!(veth_name("a-very-long-pod-name").len(), 15);
    }
}
