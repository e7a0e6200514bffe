//! The node datapath: the pod-veth and host-device programs of one host and the maps they share,
//! all pinned in one bpffs directory so that the agent, the CNI plugin and a restarted agent
//! work on the same objects.
//!
//! Layout of the directory (`/sys/fs/bpf/slipway` on a node):
//!
//! | pin | what |
//! | --- | --- |
//! | `endpoints`, `routes`, `node_config`, `counters`, `nat_*` | the shared maps |
//! | `policy_*` | NetworkPolicy state, connection tracking and events ([`crate::policy`]) |
//! | `prog_from_pod`, `prog_from_netdev` | the programs, for the plugin to attach |
//! | `links/<ifname>` | the TCX link of each attached device: it outlives the process that made it |

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use aya::maps::lpm_trie::{Key, LpmTrie};
use aya::maps::{Array, HashMap, Map, MapData, PerCpuHashMap};
use aya::programs::links::{FdLink, PinnedLink};
use aya::programs::{SchedClassifier, TcAttachType};
use aya::{Ebpf, EbpfLoader};
use tracing::{debug, info};

use crate::DataplaneError;
use crate::abi::{CounterKey, CounterValue, EndpointInfo, EndpointKey, NodeConfig, RouteInfo};
use crate::error::{is_not_found, map_error};
use crate::objects;

/// Where a node pins its datapath unless told otherwise.
pub const DEFAULT_BPFFS_DIR: &str = "/sys/fs/bpf/slipway";

const MAPS: [&str; 12] = [
    "endpoints",
    "routes",
    "node_config",
    "counters",
    "nat_flows",
    "nat_reverse",
    crate::policy::STATE_MAP,
    crate::policy::IPCACHE_MAP,
    crate::policy::ENDPOINTS_MAP,
    crate::policy::RULES_MAP,
    crate::policy::CT_MAP,
    crate::policy::EVENTS_MAP,
];
/// The service maps the host program shares with the socket programs (`services`), pinned in
/// their directory.
const SERVICE_MAPS: [&str; 2] = [crate::services::SERVICES_MAP, crate::services::SLOTS_MAP];
const FROM_POD: &str = "from_pod";
const FROM_NETDEV: &str = "from_netdev";

/// The pin paths of one node's datapath.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pins {
    dir: PathBuf,
}

impl Pins {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn map(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    pub fn program(&self, name: &str) -> PathBuf {
        self.dir.join(format!("prog_{name}"))
    }

    /// Where the service datapath (`crate::services`) pins its maps and links.
    pub fn services_dir(&self) -> PathBuf {
        self.dir.join("services")
    }

    pub fn links_dir(&self) -> PathBuf {
        self.dir.join("links")
    }

    pub fn link(&self, ifname: &str) -> PathBuf {
        self.links_dir().join(ifname)
    }

    /// Whether the agent has set the datapath up (its programs and maps are pinned).
    pub fn is_ready(&self) -> bool {
        self.program(FROM_POD).exists() && MAPS.iter().all(|m| self.map(m).exists())
    }
}

/// Handles on the pinned maps, for whoever writes state: the agent and the CNI plugin.
pub struct NodeMaps {
    endpoints: HashMap<MapData, EndpointKey, EndpointInfo>,
    routes: LpmTrie<MapData, u32, RouteInfo>,
    config: Array<MapData, NodeConfig>,
    counters: PerCpuHashMap<MapData, CounterKey, CounterValue>,
}

impl std::fmt::Debug for NodeMaps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeMaps").finish_non_exhaustive()
    }
}

impl NodeMaps {
    /// Opens the maps pinned under `pins`.
    pub fn open(pins: &Pins) -> Result<Self, DataplaneError> {
        let open = |name: &'static str| {
            MapData::from_pin(pins.map(name)).map_err(|source| map_error(name, "open pin", source))
        };
        Ok(Self {
            endpoints: HashMap::try_from(Map::HashMap(open("endpoints")?))
                .map_err(|source| map_error("endpoints", "type", source))?,
            routes: LpmTrie::try_from(Map::LpmTrie(open("routes")?))
                .map_err(|source| map_error("routes", "type", source))?,
            config: Array::try_from(Map::Array(open("node_config")?))
                .map_err(|source| map_error("node_config", "type", source))?,
            counters: PerCpuHashMap::try_from(Map::PerCpuHashMap(open("counters")?))
                .map_err(|source| map_error("counters", "type", source))?,
        })
    }

    pub fn upsert_endpoint(
        &mut self,
        ip: Ipv4Addr,
        info: EndpointInfo,
    ) -> Result<(), DataplaneError> {
        self.endpoints
            .insert(EndpointKey::new(ip), info, 0)
            .map_err(|source| map_error("endpoints", &format!("insert {ip}"), source))
    }

    /// Removes the endpoint for `ip`; an absent one is not an error.
    pub fn remove_endpoint(&mut self, ip: Ipv4Addr) -> Result<(), DataplaneError> {
        match self.endpoints.remove(&EndpointKey::new(ip)) {
            Err(source) if !is_not_found(&source) => {
                Err(map_error("endpoints", &format!("remove {ip}"), source))
            }
            _ => Ok(()),
        }
    }

    pub fn endpoint(&self, ip: Ipv4Addr) -> Result<Option<EndpointInfo>, DataplaneError> {
        match self.endpoints.get(&EndpointKey::new(ip), 0) {
            Ok(info) => Ok(Some(info)),
            Err(source) if is_not_found(&source) => Ok(None),
            Err(source) => Err(map_error("endpoints", &format!("get {ip}"), source)),
        }
    }

    /// Every endpoint, by pod address.
    pub fn endpoints(&self) -> Result<BTreeMap<Ipv4Addr, EndpointInfo>, DataplaneError> {
        let mut all = BTreeMap::new();
        for entry in self.endpoints.iter() {
            let (key, info) = entry.map_err(|source| map_error("endpoints", "iterate", source))?;
            all.insert(key.ip(), info);
        }
        Ok(all)
    }

    /// Routes `block/prefix` to its owning host.
    pub fn upsert_route(
        &mut self,
        block: Ipv4Addr,
        prefix: u8,
        info: RouteInfo,
    ) -> Result<(), DataplaneError> {
        let key = Key::new(u32::from(prefix), u32::from_ne_bytes(block.octets()));
        self.routes
            .insert(&key, info, 0)
            .map_err(|source| map_error("routes", &format!("insert {block}/{prefix}"), source))
    }

    pub fn remove_route(&mut self, block: Ipv4Addr, prefix: u8) -> Result<(), DataplaneError> {
        let key = Key::new(u32::from(prefix), u32::from_ne_bytes(block.octets()));
        match self.routes.remove(&key) {
            Err(source) if !is_not_found(&source) => Err(map_error(
                "routes",
                &format!("remove {block}/{prefix}"),
                source,
            )),
            _ => Ok(()),
        }
    }

    /// Every route: (block, prefix) -> owner.
    pub fn routes(&self) -> Result<BTreeMap<(Ipv4Addr, u8), RouteInfo>, DataplaneError> {
        let mut all = BTreeMap::new();
        for entry in self.routes.iter() {
            let (key, info) = entry.map_err(|source| map_error("routes", "iterate", source))?;
            let prefix = u8::try_from(key.prefix_len()).unwrap_or(32);
            all.insert((Ipv4Addr::from(key.data().to_ne_bytes()), prefix), info);
        }
        Ok(all)
    }

    pub fn set_config(&mut self, config: NodeConfig) -> Result<(), DataplaneError> {
        self.config
            .set(0, config, 0)
            .map_err(|source| map_error("node_config", "set", source))
    }

    pub fn config(&self) -> Result<NodeConfig, DataplaneError> {
        self.config
            .get(&0, 0)
            .map_err(|source| map_error("node_config", "get", source))
    }

    /// Every counter, summed over the CPUs.
    pub fn counters(&self) -> Result<BTreeMap<CounterKey, CounterValue>, DataplaneError> {
        let mut totals = BTreeMap::new();
        for entry in self.counters.iter() {
            let (key, per_cpu) =
                entry.map_err(|source| map_error("counters", "iterate", source))?;
            let total: &mut CounterValue = totals.entry(key).or_default();
            for value in per_cpu.iter() {
                *total += *value;
            }
        }
        Ok(totals)
    }
}

/// Loads both programs with their maps pinned under `pins` (reusing maps already pinned there,
/// so state survives an agent restart), and (re)pins the programs for the plugin. Returns the
/// loaded objects, which the caller keeps while it attaches host devices.
pub fn install(pins: &Pins) -> Result<Installed, DataplaneError> {
    fs::create_dir_all(pins.services_dir()).map_err(|source| DataplaneError::Bpffs {
        path: pins.services_dir(),
        source,
    })?;
    fs::create_dir_all(pins.links_dir()).map_err(|source| DataplaneError::Bpffs {
        path: pins.links_dir(),
        source,
    })?;
    let load = |object: &'static str,
                bytes: &[u8],
                program: &'static str|
     -> Result<Ebpf, DataplaneError> {
        let paths: Vec<(&'static str, PathBuf)> = MAPS
            .iter()
            .map(|m| (*m, pins.map(m)))
            .chain(
                SERVICE_MAPS
                    .iter()
                    .map(|m| (*m, pins.services_dir().join(m))),
            )
            .collect();
        let mut loader = EbpfLoader::new();
        for (name, path) in &paths {
            loader.map_pin_path(name, path.as_path());
        }
        let mut bpf = loader.load(bytes).map_err(|source| DataplaneError::Load {
            object,
            source: Box::new(source),
        })?;
        let prog = classifier(&mut bpf, program)?;
        prog.load()
            .map_err(|source| program_error(program, "load", source))?;
        // Replace the pin: the plugin attaches whatever is pinned, so it gets this version.
        let pin = pins.program(program);
        remove_pin(&pin)?;
        prog.pin(&pin).map_err(|source| DataplaneError::Bpffs {
            path: pin.clone(),
            source: io::Error::other(source),
        })?;
        Ok(bpf)
    };
    let pod = load("pod_veth", objects::POD_VETH, FROM_POD)?;
    let host = load("host", objects::HOST, FROM_NETDEV)?;
    info!(dir = %pins.dir().display(), "node datapath installed");
    Ok(Installed {
        pins: pins.clone(),
        pod,
        host,
    })
}

/// The loaded node programs, as [`install`] left them.
pub struct Installed {
    pins: Pins,
    pod: Ebpf,
    host: Ebpf,
}

impl std::fmt::Debug for Installed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Installed")
            .field("pins", &self.pins)
            .finish_non_exhaustive()
    }
}

impl Installed {
    /// Attaches `from_netdev` at TCX ingress of `ifname` (in the calling thread's namespace) and
    /// pins the link. An existing pinned link is updated in place to this program, atomically,
    /// so a restarted agent never leaves the device without a program.
    pub fn attach_netdev(&mut self, ifname: &str) -> Result<(), DataplaneError> {
        attach_pinned(
            classifier(&mut self.host, FROM_NETDEV)?,
            FROM_NETDEV,
            ifname,
            &self.pins.link(ifname),
        )
    }

    /// Attaches `from_pod` to `ifname` likewise (the plugin normally does this from the pin).
    pub fn attach_pod(&mut self, ifname: &str) -> Result<(), DataplaneError> {
        attach_pinned(
            classifier(&mut self.pod, FROM_POD)?,
            FROM_POD,
            ifname,
            &self.pins.link(ifname),
        )
    }
}

/// Attaches the pinned `from_pod` program to the host side of a pod veth, in the calling
/// thread's namespace, and pins the link at `links/<ifname>`: what the CNI plugin does on ADD.
pub fn attach_pod_from_pin(pins: &Pins, ifname: &str) -> Result<(), DataplaneError> {
    let mut program = SchedClassifier::from_pin(pins.program(FROM_POD))
        .map_err(|source| program_error(FROM_POD, "open pin", source))?;
    attach_pinned(&mut program, FROM_POD, ifname, &pins.link(ifname))
}

/// Removes the pinned link of `ifname`, detaching the program if the device still exists. An
/// absent pin is not an error.
pub fn detach(pins: &Pins, ifname: &str) -> Result<(), DataplaneError> {
    remove_pin(&pins.link(ifname))
}

/// Names of the devices with a pinned link.
pub fn attached(pins: &Pins) -> Result<Vec<String>, DataplaneError> {
    let dir = pins.links_dir();
    let entries = match fs::read_dir(&dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => return Err(DataplaneError::Bpffs { path: dir, source }),
    };
    let mut names: Vec<String> = entries
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    Ok(names)
}

fn attach_pinned(
    program: &mut SchedClassifier,
    name: &'static str,
    ifname: &str,
    pin: &Path,
) -> Result<(), DataplaneError> {
    let id = match PinnedLink::from_pin(pin) {
        Ok(old) => {
            let link = FdLink::from(old)
                .try_into()
                .map_err(|source| DataplaneError::Bpffs {
                    path: pin.to_owned(),
                    source: io::Error::other(source),
                })?;
            let id = program.attach_to_link(link).map_err(|source| {
                program_error(name, &format!("update link of {ifname}"), source)
            })?;
            debug!(ifname, program = name, "updated pinned link");
            id
        }
        Err(_) => program
            .attach(ifname, TcAttachType::Ingress)
            .map_err(|source| program_error(name, &format!("attach to {ifname}"), source))?,
    };
    let link = program
        .take_link(id)
        .map_err(|source| program_error(name, "take link", source))?;
    let link: FdLink = link.try_into().map_err(|source| DataplaneError::Bpffs {
        path: pin.to_owned(),
        source: io::Error::other(source),
    })?;
    remove_pin(pin)?;
    link.pin(pin).map_err(|source| DataplaneError::Bpffs {
        path: pin.to_owned(),
        source: io::Error::other(source),
    })?;
    Ok(())
}

fn remove_pin(path: &Path) -> Result<(), DataplaneError> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(DataplaneError::Bpffs {
            path: path.to_owned(),
            source: e,
        }),
        _ => Ok(()),
    }
}

fn classifier<'a>(
    bpf: &'a mut Ebpf,
    name: &'static str,
) -> Result<&'a mut SchedClassifier, DataplaneError> {
    let object = if name == FROM_POD { "pod_veth" } else { "host" };
    let program = bpf
        .program_mut(name)
        .ok_or(DataplaneError::MissingProgram {
            object,
            program: name,
        })?;
    program
        .try_into()
        .map_err(|source| program_error(name, "expect a TC classifier", source))
}

fn program_error(
    program: &'static str,
    action: &str,
    source: aya::programs::ProgramError,
) -> DataplaneError {
    DataplaneError::Program {
        program,
        action: action.to_owned(),
        source: Box::new(source),
    }
}
