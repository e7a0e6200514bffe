//! The plugin's commands: ADD wires a pod (veth, addresses, routes, datapath entries), DEL undoes
//! it, CHECK verifies it, GC reclaims what the runtime no longer lists, STATUS says whether ADD
//! can work. Every step ADD takes is undone if a later one fails.

use std::collections::BTreeSet;
use std::fs;
use std::io::Write;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Command as Process, Stdio};

use ipnetwork::Ipv4Network;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use slipway_dataplane::abi::EndpointInfo;
use slipway_dataplane::link::Netlink;
use slipway_dataplane::link::format_mac;
use slipway_dataplane::node::{self, NodeMaps, Pins};
use tracing::{debug, warn};

use crate::ipam::{Allocation, Owner, Store};
use crate::spec::{
    Attachment, CNI_VERSION, CniError, CniResult, Code, Env, Interface, IpConfig, NetConf,
    Requests, Route, Routing,
};

/// The link-local gateway of every pod: the host side of its veth, known to the pod through a
/// permanent neighbour entry, so no address is spent on it and no ARP is needed.
pub const POD_GATEWAY: Ipv4Addr = Ipv4Addr::new(169, 254, 1, 1);

/// Bytes VXLAN adds: outer IPv4 (20) + UDP (8) + VXLAN (8) + inner Ethernet (14).
pub const VXLAN_OVERHEAD: u32 = 50;

pub const DEFAULT_DATA_DIR: &str = "/var/lib/slipway";
pub const DEFAULT_UNDERLAY: &str = "eth0";

/// What the agent tells the plugin about its node (`<dataDir>/node.json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct NodeState {
    #[serde(rename = "podCIDR")]
    pub pod_cidr: String,
    pub host_block: String,
    pub routing: Routing,
    pub mtu: u32,
    pub underlay_device: String,
    pub bpffs: String,
}

impl NodeState {
    pub fn path(data_dir: &Path) -> PathBuf {
        data_dir.join("node.json")
    }

    pub fn read(data_dir: &Path) -> Option<Self> {
        serde_json::from_slice(&fs::read(Self::path(data_dir)).ok()?).ok()
    }
}

/// Where the node's state lives, from the configuration, the agent's node state or the
/// defaults: all DEL needs, so DEL works before the agent ever ran.
#[derive(Debug, Clone)]
pub struct Location {
    pub data_dir: PathBuf,
    pub pins: Pins,
}

impl Location {
    pub fn resolve(conf: &NetConf) -> Self {
        let data_dir = PathBuf::from(conf.data_dir.as_deref().unwrap_or(DEFAULT_DATA_DIR));
        let bpffs = conf
            .bpffs
            .clone()
            .or_else(|| NodeState::read(&data_dir).map(|n| n.bpffs))
            .unwrap_or_else(|| node::DEFAULT_BPFFS_DIR.to_owned());
        Self {
            data_dir,
            pins: Pins::new(bpffs),
        }
    }
}

/// The configuration resolved against the node: everything ADD needs.
#[derive(Debug, Clone)]
pub struct Settings {
    pub network: String,
    pub version: String,
    pub pod_cidr: Ipv4Network,
    pub block: Ipv4Network,
    pub mtu: u32,
    pub pins: Pins,
    pub data_dir: PathBuf,
    pub delegate_ipam: Option<Value>,
}

impl Settings {
    /// Resolves `conf`: fields it sets win over the agent's node state; the MTU falls back to
    /// the underlay device's minus the encapsulation. Reports every bad field at once.
    pub fn resolve(conf: &NetConf) -> Result<Self, CniError> {
        let data_dir = PathBuf::from(conf.data_dir.as_deref().unwrap_or(DEFAULT_DATA_DIR));
        let node = NodeState::read(&data_dir);
        let mut problems = Vec::new();
        let pod_cidr = conf
            .pod_cidr
            .parse::<Ipv4Network>()
            .map_err(|e| {
                problems.push(format!(
                    "podCIDR: {:?} is not an IPv4 CIDR: {e}",
                    conf.pod_cidr
                ))
            })
            .ok();
        let block_text = conf
            .host_block
            .clone()
            .or_else(|| node.as_ref().map(|n| n.host_block.clone()));
        let Some(block_text) = block_text else {
            return Err(CniError::new(
                Code::TryAgainLater,
                format!(
                    "hostBlock: not in the configuration, and no node state from the agent at {} \
                     (is `slipway agent` running with --data-dir {}? set \"dataDir\" in the \
                     conflist to the agent's --data-dir)",
                    NodeState::path(&data_dir).display(),
                    data_dir.display()
                ),
            ));
        };
        let block = block_text
            .parse::<Ipv4Network>()
            .map_err(|e| {
                problems.push(format!(
                    "hostBlock: {block_text:?} is not an IPv4 CIDR: {e}"
                ))
            })
            .ok();
        if let (Some(cidr), Some(block)) = (pod_cidr, block)
            && !(cidr.contains(block.network()) && cidr.prefix() <= block.prefix())
        {
            problems.push(format!("hostBlock: {block} is not inside podCIDR {cidr}"));
        }
        let routing = conf
            .routing
            .or(node.as_ref().map(|n| n.routing))
            .unwrap_or_default();
        let underlay = conf
            .underlay_device
            .clone()
            .or_else(|| node.as_ref().map(|n| n.underlay_device.clone()))
            .unwrap_or_else(|| DEFAULT_UNDERLAY.to_owned());
        let mtu = match conf.mtu.or(node.as_ref().map(|n| n.mtu)) {
            Some(mtu) => mtu,
            None => match detect_mtu(&underlay, routing) {
                Ok(mtu) => mtu,
                Err(e) => {
                    problems.push(format!("mtu: not set and {e}"));
                    0
                }
            },
        };
        if conf.mtu.is_some() && !(576..=65535).contains(&mtu) {
            problems.push(format!("mtu: {mtu} is outside 576..=65535"));
        }
        if let Some(ipam) = &conf.ipam
            && ipam
                .get("type")
                .and_then(Value::as_str)
                .is_none_or(str::is_empty)
        {
            problems.push(
                "ipam.type: missing; name the IPAM plugin to delegate to (e.g. host-local)"
                    .to_owned(),
            );
        }
        let bpffs = conf
            .bpffs
            .clone()
            .or_else(|| node.as_ref().map(|n| n.bpffs.clone()))
            .unwrap_or_else(|| node::DEFAULT_BPFFS_DIR.to_owned());
        match (pod_cidr, block) {
            (Some(pod_cidr), Some(block)) if problems.is_empty() => Ok(Self {
                network: conf.name.clone(),
                version: conf.cni_version.clone(),
                pod_cidr,
                block,
                mtu,
                pins: Pins::new(bpffs),
                data_dir,
                delegate_ipam: conf.ipam.clone(),
            }),
            _ => Err(CniError::new(Code::InvalidConfig, problems.join("; "))),
        }
    }

    /// The IPAM store of this host's block, shared by every network over it.
    fn store(&self) -> Result<Store, CniError> {
        Store::for_block(&self.data_dir, self.block)
    }
}

/// The underlay device's MTU (from sysfs of the caller's namespace) minus encapsulation.
pub fn detect_mtu(underlay: &str, routing: Routing) -> Result<u32, String> {
    let path = format!("/sys/class/net/{underlay}/mtu");
    let mtu: u32 = fs::read_to_string(&path)
        .map_err(|e| format!("the underlay device {underlay} could not be read ({path}: {e})"))?
        .trim()
        .parse()
        .map_err(|e| format!("{path}: {e}"))?;
    Ok(match routing {
        Routing::Vxlan => mtu.saturating_sub(VXLAN_OVERHEAD),
        Routing::Native => mtu,
    })
}

/// The host side of an attachment's veth: `lxc` + 11 hex digits of a hash of the attachment,
/// so DEL and GC can name it without any state.
pub fn host_ifname(attachment: &Attachment) -> String {
    // FNV-1a: stable across builds, unlike std's hasher, so any plugin version finds the name.
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    let bytes = attachment
        .container_id
        .bytes()
        .chain([0])
        .chain(attachment.ifname.bytes());
    for byte in bytes {
        hash = (hash ^ u64::from(byte)).wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("lxc{:011x}", hash & 0x0fff_ffff_ffff)
}

fn runtime() -> Result<tokio::runtime::Runtime, CniError> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| CniError::new(Code::Io, format!("tokio runtime: {e}")))
}

/// ADD: returns the result to print.
pub fn add(env: &Env, conf: &NetConf) -> Result<Value, CniError> {
    let settings = Settings::resolve(conf)?;
    let requests = Requests::parse(env, conf)?;
    if !settings.pins.is_ready() {
        return Err(CniError::new(
            Code::TryAgainLater,
            format!(
                "the node datapath is not installed in {} (is `slipway agent` running?)",
                settings.pins.dir().display()
            ),
        ));
    }
    let netns = env.netns.clone().unwrap_or_default();
    if !Path::new(&netns).exists() {
        return Err(CniError::new(
            Code::UnknownContainer,
            format!("CNI_NETNS: {netns} does not exist"),
        ));
    }
    let attachment = Attachment {
        container_id: env.container_id.clone(),
        ifname: env.ifname.clone(),
    };
    let owner = Owner {
        host_ifname: host_ifname(&attachment),
        attachment: attachment.clone(),
        network: settings.network.clone(),
    };
    let store = settings.store()?;
    let locked = store.lock()?;
    locked.adopt_legacy(&settings.data_dir, settings.block)?;
    if let Some(existing) = locked.find(&attachment)? {
        return Err(CniError::new(
            Code::InvalidConfig,
            format!(
                "container {} already has {} on {} (DEL it first)",
                attachment.container_id, existing.ip, attachment.ifname
            ),
        ));
    }
    // Addresses the datapath delivers to a pod are in use, whatever store recorded them.
    let endpoints = NodeMaps::open(&settings.pins)?.endpoints()?;
    let in_use = |ip: Ipv4Addr| endpoints.contains_key(&ip);
    let allocation = match (&settings.delegate_ipam, &requests.ip) {
        (None, None) => locked.allocate(settings.block, &owner, &in_use)?,
        (None, Some(want)) => {
            locked.allocate_exact(settings.block, want.value, &owner, &in_use, &want.field)?
        }
        (Some(_), want) => {
            let result = delegate(env, conf, "ADD")?
                .ok_or_else(|| CniError::new(Code::Decode, "ipam: delegate returned no result"))?;
            let refuse = |error: CniError| {
                let _ = delegate(env, conf, "DEL");
                Err(error)
            };
            let Some((ip, _)) = result.first_ipv4() else {
                return refuse(CniError::new(
                    Code::InvalidConfig,
                    "ipam: delegate returned no IPv4 address",
                ));
            };
            if let Some(want) = want.as_ref().filter(|w| w.value != ip) {
                return refuse(CniError::new(
                    Code::InvalidConfig,
                    format!(
                        "{}: asks for {}, but the delegated IPAM plugin gave {ip} \
                         (give it the request, e.g. host-local's \"ips\" capability)",
                        want.field, want.value
                    ),
                ));
            }
            if in_use(ip) {
                return refuse(CniError::new(
                    Code::AddressInUse,
                    format!("ipam: the delegated IPAM plugin gave {ip}, which another pod uses"),
                ));
            }
            let allocation = owner.at(ip);
            if let Err(e) = locked.record(&allocation) {
                return refuse(e);
            }
            allocation
        }
    };
    let mac = requests.mac.map(|m| m.value);
    let rt = runtime()?;
    match rt.block_on(wire(&settings, &allocation, Path::new(&netns), mac)) {
        Ok(wired) => {
            Ok(result(&settings, conf, &allocation, &wired, &netns)?.to_json(&settings.version))
        }
        Err(error) => {
            warn!(%error, container = %attachment.container_id, "ADD failed; undoing");
            let _ = rt.block_on(unwire(
                &settings.pins,
                &allocation.host_ifname,
                Some(allocation.ip),
            ));
            let _ = locked.release(allocation.ip);
            if settings.delegate_ipam.is_some() {
                let _ = delegate(env, conf, "DEL");
            }
            Err(error)
        }
    }
}

/// What ADD created, for the result.
struct Wired {
    host_mac: [u8; 6],
    pod_mac: [u8; 6],
}

/// Wires the pod: veth (with the requested MAC, if any, on the pod's end), addresses, routes,
/// the datapath program and endpoint entry.
async fn wire(
    settings: &Settings,
    allocation: &Allocation,
    netns: &Path,
    mac: Option<[u8; 6]>,
) -> Result<Wired, CniError> {
    let host = Netlink::current()?;
    let pod = Netlink::in_netns(netns)?;
    let veth = host
        .add_veth(
            &allocation.host_ifname,
            &allocation.ifname,
            netns,
            settings.mtu,
        )
        .await?;
    let host_mac = veth
        .mac
        .ok_or_else(|| CniError::new(Code::Datapath, "host veth has no MAC"))?;
    host.set_up(veth.index).await?;
    let eth = pod.link(&allocation.ifname).await?.ok_or_else(|| {
        CniError::new(
            Code::Datapath,
            format!("{} did not appear in the pod", allocation.ifname),
        )
    })?;
    let pod_mac = match mac {
        Some(mac) => {
            pod.set_mac(eth.index, mac).await?;
            mac
        }
        None => eth
            .mac
            .ok_or_else(|| CniError::new(Code::Datapath, "pod interface has no MAC"))?,
    };
    if let Some(lo) = pod.link("lo").await? {
        pod.set_up(lo.index).await?;
    }
    pod.set_up(eth.index).await?;
    pod.add_address(eth.index, allocation.ip, 32).await?;
    pod.add_route(POD_GATEWAY, 32, None, eth.index).await?;
    pod.add_route(Ipv4Addr::UNSPECIFIED, 0, Some(POD_GATEWAY), eth.index)
        .await?;
    pod.add_neighbour(eth.index, POD_GATEWAY, host_mac).await?;
    // The host reaches the pod (and masqueraded replies find it) through this route.
    host.add_route(allocation.ip, 32, None, veth.index).await?;
    node::attach_pod_from_pin(&settings.pins, &allocation.host_ifname)?;
    let mut maps = NodeMaps::open(&settings.pins)?;
    maps.upsert_endpoint(
        allocation.ip,
        EndpointInfo {
            ifindex: veth.index,
            pod_mac,
            host_mac,
        },
    )?;
    debug!(ip = %allocation.ip, host_if = %allocation.host_ifname, "pod wired");
    Ok(Wired { host_mac, pod_mac })
}

/// Undoes [`wire`] for the veth `host_ifname` (and the endpoint of `ip`, when known); every
/// step tolerates what is already gone. The veth's counters go with it, so neither the map
/// nor the metrics keep series of devices that no longer exist.
async fn unwire(pins: &Pins, host_ifname: &str, ip: Option<Ipv4Addr>) -> Result<(), CniError> {
    let host = Netlink::current()?;
    let ifindex = host.link(host_ifname).await?.map(|link| link.index);
    let mut maps = if pins.is_ready() {
        Some(NodeMaps::open(pins)?)
    } else {
        None
    };
    if let (Some(maps), Some(ip)) = (maps.as_mut(), ip) {
        // The address is this allocation's alone, so its entry is this attachment's.
        maps.remove_endpoint(ip)?;
    }
    node::detach(pins, host_ifname)?;
    host.delete_link(host_ifname).await?;
    if let (Some(maps), Some(index)) = (maps.as_mut(), ifindex) {
        let removed = maps.remove_counters(|k| k.ifindex_in == index || k.ifindex_out == index)?;
        debug!(
            host_if = host_ifname,
            removed, "counters of the veth removed"
        );
    }
    Ok(())
}

fn result(
    settings: &Settings,
    conf: &NetConf,
    allocation: &Allocation,
    wired: &Wired,
    netns: &str,
) -> Result<CniResult, CniError> {
    let mut result = match &conf.prev_result {
        Some(prev) => serde_json::from_value::<CniResult>(prev.clone())
            .map_err(|e| CniError::new(Code::Decode, format!("prevResult: {e}")))?,
        None => CniResult::default(),
    };
    result.cni_version = CNI_VERSION.to_owned();
    let base = result.interfaces.len();
    result.interfaces.push(Interface {
        name: allocation.host_ifname.clone(),
        mac: format_mac(&wired.host_mac),
        mtu: Some(settings.mtu),
        sandbox: None,
    });
    result.interfaces.push(Interface {
        name: allocation.ifname.clone(),
        mac: format_mac(&wired.pod_mac),
        mtu: Some(settings.mtu),
        sandbox: Some(netns.to_owned()),
    });
    result
        .ips
        .retain(|ip| !ip.address.starts_with(&format!("{}/", allocation.ip)));
    result.ips.push(IpConfig {
        address: format!("{}/32", allocation.ip),
        gateway: Some(POD_GATEWAY.to_string()),
        interface: Some(base + 1),
    });
    result.routes.push(Route {
        dst: "0.0.0.0/0".into(),
        gw: Some(POD_GATEWAY.to_string()),
    });
    if result.dns.is_none() {
        result.dns = conf.dns.clone();
    }
    Ok(result)
}

/// DEL: idempotent; a missing netns, interface, allocation or node state is success (SPEC.md
/// "DEL": a plugin should complete DEL without error even if some resources are missing). It
/// needs no host block: the attachment's allocation is looked up in every store.
pub fn del(env: &Env, conf: &NetConf) -> Result<(), CniError> {
    let location = Location::resolve(conf);
    let attachment = Attachment {
        container_id: env.container_id.clone(),
        ifname: env.ifname.clone(),
    };
    let rt = runtime()?;
    let mut found = false;
    for store in Store::all(&location.data_dir)? {
        let locked = store.lock()?;
        if let Some(allocation) = locked.find(&attachment)? {
            rt.block_on(unwire(
                &location.pins,
                &allocation.host_ifname,
                Some(allocation.ip),
            ))?;
            locked.release(allocation.ip)?;
            found = true;
        }
    }
    if !found {
        // No allocation: an ADD that failed or a repeated DEL; the veth may still be there.
        rt.block_on(unwire(&location.pins, &host_ifname(&attachment), None))?;
    }
    if conf.ipam.is_some() {
        delegate(env, conf, "DEL")?;
    }
    Ok(())
}

/// The allocation of `attachment` in any store under `data_dir`.
fn find_allocation(
    data_dir: &Path,
    attachment: &Attachment,
) -> Result<Option<Allocation>, CniError> {
    for store in Store::all(data_dir)? {
        if let Some(found) = store.lock()?.find(attachment)? {
            return Ok(Some(found));
        }
    }
    Ok(None)
}

/// CHECK: the attachment is as ADD left it.
pub fn check(env: &Env, conf: &NetConf) -> Result<(), CniError> {
    let settings = Settings::resolve(conf)?;
    let attachment = Attachment {
        container_id: env.container_id.clone(),
        ifname: env.ifname.clone(),
    };
    let allocation = find_allocation(&settings.data_dir, &attachment)?.ok_or_else(|| {
        CniError::new(
            Code::CheckFailed,
            format!(
                "no address is allocated to {} {}",
                attachment.container_id, attachment.ifname
            ),
        )
    })?;
    let netns = env.netns.clone().unwrap_or_default();
    if !Path::new(&netns).exists() {
        return Err(CniError::new(
            Code::UnknownContainer,
            format!("CNI_NETNS: {netns} does not exist"),
        ));
    }
    let failed = |what: String| CniError::new(Code::CheckFailed, what);
    runtime()?.block_on(async {
        let host = Netlink::current()?;
        let veth = host
            .link(&allocation.host_ifname)
            .await?
            .ok_or_else(|| failed(format!("host veth {} is missing", allocation.host_ifname)))?;
        if !veth.up {
            return Err(failed(format!(
                "host veth {} is down",
                allocation.host_ifname
            )));
        }
        if !settings.pins.link(&allocation.host_ifname).exists() {
            return Err(failed(format!(
                "no datapath program is attached to {}",
                allocation.host_ifname
            )));
        }
        let pod = Netlink::in_netns(Path::new(&netns))?;
        let eth = pod
            .link(&allocation.ifname)
            .await?
            .ok_or_else(|| failed(format!("{} is missing in the pod", allocation.ifname)))?;
        if !pod
            .addresses(eth.index)
            .await?
            .contains(&(allocation.ip, 32))
        {
            return Err(failed(format!(
                "{} lacks {}/32",
                allocation.ifname, allocation.ip
            )));
        }
        let routes = pod.routes().await?;
        if !routes
            .iter()
            .any(|r| r.prefix == 0 && r.gateway == Some(POD_GATEWAY) && r.oif == Some(eth.index))
        {
            return Err(failed(format!(
                "the pod has no default route via {POD_GATEWAY} on {}",
                allocation.ifname
            )));
        }
        let maps = NodeMaps::open(&settings.pins)?;
        let expected = EndpointInfo {
            ifindex: veth.index,
            pod_mac: eth.mac.unwrap_or_default(),
            host_mac: veth.mac.unwrap_or_default(),
        };
        match maps.endpoint(allocation.ip)? {
            Some(found) if found == expected => Ok(()),
            Some(found) => Err(failed(format!(
                "endpoint map entry for {} is {found:?}, expected {expected:?}",
                allocation.ip
            ))),
            None => Err(failed(format!(
                "no endpoint map entry for {}",
                allocation.ip
            ))),
        }
    })
}

/// STATUS: ready when the agent has installed the datapath and the block has a free address.
pub fn status(conf: &NetConf) -> Result<(), CniError> {
    let settings = Settings::resolve(conf).map_err(|e| match e.code {
        Code::TryAgainLater => CniError::new(Code::NotAvailable, e.msg),
        _ => e,
    })?;
    if !settings.pins.is_ready() {
        return Err(CniError::new(
            Code::NotAvailable,
            format!(
                "the node datapath is not installed in {} (is `slipway agent` running?)",
                settings.pins.dir().display()
            ),
        ));
    }
    if settings.delegate_ipam.is_none() {
        let store = settings.store()?;
        let used = store.lock()?.list()?.len();
        if used >= crate::ipam::usable(settings.block).len() {
            return Err(CniError::new(
                Code::NotAvailable,
                format!("hostBlock {} has no free address", settings.block),
            ));
        }
    }
    Ok(())
}

/// What GC removed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Collected {
    pub allocations: Vec<Ipv4Addr>,
    pub links: Vec<String>,
    pub endpoints: Vec<Ipv4Addr>,
    pub pins: Vec<String>,
    /// Counter entries of devices that are gone.
    pub counters: usize,
}

/// GC: removes every allocation of this network, and every veth, pinned link, endpoint entry
/// and counter that belongs to no attachment in `cni.dev/valid-attachments` or to another
/// network's allocation.
pub fn gc(env: &Env, conf: &NetConf) -> Result<Collected, CniError> {
    let settings = Settings::resolve(conf)?;
    let valid: BTreeSet<Attachment> = conf
        .valid_attachments
        .clone()
        .unwrap_or_default()
        .into_iter()
        .collect();
    let store = settings.store()?;
    let locked = store.lock()?;
    locked.sweep_temporaries()?;
    locked.adopt_legacy(&settings.data_dir, settings.block)?;
    let mut collected = Collected::default();
    let rt = runtime()?;
    // Veths of every allocation that stays: this network's valid ones and other networks'.
    let mut kept = BTreeSet::new();
    for allocation in locked.list()? {
        let ours = allocation
            .network
            .as_deref()
            .is_none_or(|n| n == settings.network);
        if !ours || valid.contains(&allocation.attachment()) {
            kept.insert(allocation.host_ifname.clone());
            continue;
        }
        rt.block_on(unwire(
            &settings.pins,
            &allocation.host_ifname,
            Some(allocation.ip),
        ))?;
        locked.release(allocation.ip)?;
        collected.allocations.push(allocation.ip);
    }
    let mut allocated: BTreeSet<Ipv4Addr> = locked.list()?.into_iter().map(|a| a.ip).collect();
    // Other stores (other blocks, older versions' per-network stores) are read, not locked:
    // their records are written before their veths exist, so a racing ADD is seen.
    for other in Store::all(&settings.data_dir)? {
        if other.dir() != store.dir() {
            for allocation in other.snapshot()? {
                kept.insert(allocation.host_ifname);
                allocated.insert(allocation.ip);
            }
        }
    }
    // Veths and pins of attachments that never got (or lost) their allocation record.
    for link in rt.block_on(async { Netlink::current()?.links_with_prefix("lxc").await })? {
        if link.name.len() == 14 && !kept.contains(&link.name) {
            rt.block_on(unwire(&settings.pins, &link.name, None))?;
            collected.links.push(link.name);
        }
    }
    for pin in node::attached(&settings.pins)? {
        if pin.starts_with("lxc") && !kept.contains(&pin) {
            node::detach(&settings.pins, &pin)?;
            collected.pins.push(pin);
        }
    }
    if settings.pins.is_ready() {
        let mut maps = NodeMaps::open(&settings.pins)?;
        for (ip, _) in maps.endpoints()? {
            if settings.block.contains(ip) && !allocated.contains(&ip) {
                maps.remove_endpoint(ip)?;
                collected.endpoints.push(ip);
            }
        }
        // Counters of devices that are gone. The counters are read before the links are
        // listed: a device whose counter was read existed before the listing, so it is listed
        // unless it is gone (one created since is never mistaken for a gone one).
        let seen: Vec<_> = maps.counters()?.into_keys().collect();
        let present: BTreeSet<u32> = rt
            .block_on(async { Netlink::current()?.links_with_prefix("").await })?
            .into_iter()
            .map(|l| l.index)
            .collect();
        let gone = |index: u32| index != 0 && !present.contains(&index);
        let doomed: BTreeSet<_> = seen
            .into_iter()
            .filter(|k| gone(k.ifindex_in) || gone(k.ifindex_out))
            .collect();
        collected.counters = maps.remove_counters(|k| doomed.contains(k))?;
    }
    if settings.delegate_ipam.is_some() {
        delegate(env, conf, "GC")?;
    }
    Ok(collected)
}

/// Runs the delegated IPAM plugin (`ipam.type`, found on CNI_PATH) with `command`, the same
/// environment and this configuration on stdin.
fn delegate(env: &Env, conf: &NetConf, command: &str) -> Result<Option<CniResult>, CniError> {
    let plugin = conf
        .ipam
        .as_ref()
        .and_then(|i| i.get("type"))
        .and_then(Value::as_str)
        .unwrap_or_default();
    let binary = env
        .path
        .iter()
        .map(|dir| Path::new(dir).join(plugin))
        .find(|p| p.is_file())
        .ok_or_else(|| {
            CniError::new(
                Code::InvalidConfig,
                format!("ipam.type: plugin {plugin:?} not found on CNI_PATH"),
            )
        })?;
    let mut stdin_conf =
        serde_json::to_value(conf).map_err(|e| CniError::new(Code::Io, e.to_string()))?;
    if let Some(obj) = stdin_conf.as_object_mut() {
        obj.remove("prevResult");
    }
    let mut child = Process::new(&binary)
        .env("CNI_COMMAND", command)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| CniError::new(Code::Io, format!("ipam: run {}: {e}", binary.display())))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(stdin_conf.to_string().as_bytes())
            .map_err(|e| CniError::new(Code::Io, format!("ipam: {e}")))?;
    }
    let output = child
        .wait_with_output()
        .map_err(|e| CniError::new(Code::Io, format!("ipam: {e}")))?;
    if !output.status.success() {
        let error: Value = serde_json::from_slice(&output.stdout).unwrap_or(Value::Null);
        let msg = error
            .get("msg")
            .and_then(Value::as_str)
            .unwrap_or("failed")
            .to_owned();
        return Err(CniError::new(
            Code::Datapath,
            format!("ipam {plugin} {command}: {msg}"),
        ));
    }
    if command != "ADD" {
        return Ok(None);
    }
    serde_json::from_slice(&output.stdout)
        .map(Some)
        .map_err(|e| CniError::new(Code::Decode, format!("ipam {plugin} result: {e}")))
}
