//! The node datapath: the pod-veth and host-device programs of one host and the maps they share,
//! all pinned in one bpffs directory so that the agent, the CNI plugin and a restarted agent
//! work on the same objects.
//!
//! Layout of the directory (`/sys/fs/bpf/slipway` on a node):
//!
//! | pin | what |
//! | --- | --- |
//! | `endpoints`, `routes`, `node_config`, `counters`, `nat_*`, `stack_flows` | the shared maps |
//! | `map_fill`, `map_full` | how full the tables the programs insert into are |
//! | `policy_*` | NetworkPolicy state, connection tracking and events ([`crate::policy`]) |
//! | `prog_from_pod`, `prog_from_netdev` | the programs, for the plugin to attach |
//! | `links/<ifname>` | the TCX link of each attached device: it outlives the process that made it |

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use aya::maps::lpm_trie::{Key, LpmTrie};
use aya::maps::{Array, HashMap, IterableMap, Map, MapData, PerCpuArray, PerCpuHashMap};
use aya::programs::links::{FdLink, PinnedLink};
use aya::programs::{SchedClassifier, TcAttachType};
use aya::{Ebpf, EbpfLoader};
use tracing::{debug, info, warn};

use crate::DataplaneError;
use crate::abi::{
    CounterKey, CounterValue, EndpointInfo, EndpointKey, MAX_NAT_FLOWS, MAX_ROUTES, MapFill, MapId,
    NodeConfig, RouteInfo,
};
use crate::error::{is_not_found, map_error};
use crate::objects;

/// Where a node pins its datapath unless told otherwise.
pub const DEFAULT_BPFFS_DIR: &str = "/sys/fs/bpf/slipway";

const MAPS: [&str; 15] = [
    "endpoints",
    ROUTES,
    "node_config",
    "counters",
    NAT_FLOWS,
    NAT_REVERSE,
    STACK_FLOWS,
    FILL,
    FULL,
    crate::policy::STATE_MAP,
    crate::policy::IPCACHE_MAP,
    crate::policy::ENDPOINTS_MAP,
    crate::policy::RULES_MAP,
    crate::policy::CT_MAP,
    crate::policy::EVENTS_MAP,
];
const ROUTES: &str = "routes";
const NAT_FLOWS: &str = "nat_flows";
const NAT_REVERSE: &str = "nat_reverse";
const STACK_FLOWS: &str = "stack_flows";
const FILL: &str = "map_fill";
const FULL: &str = "map_full";
/// The service maps the node programs share with the socket programs (`services`), pinned in
/// their directory.
const SERVICE_MAPS: [&str; 3] = [
    crate::services::SERVICES_MAP,
    crate::services::SLOTS_MAP,
    crate::services::COUNTERS_MAP,
];

/// Capacities of the node tables a busy node fills, set when the maps are created. A map
/// already pinned keeps the capacity it was created with (its state survives a restart); a
/// different request is logged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MapSizes {
    /// `policy_ct`: connections of local pods that NetworkPolicy tracks.
    pub conntrack: u32,
    /// `nat_flows`, `nat_reverse`, `stack_flows`: flows translated per packet (NodePorts,
    /// ClusterIPs of pods outside the socket programs' cgroup) and pods' flows through the
    /// host stack.
    pub nat: u32,
    /// `routes`: pod blocks of other hosts.
    pub routes: u32,
}

impl Default for MapSizes {
    /// What fits a busy node: Cilium's default TCP conntrack of 512k connections.
    fn default() -> Self {
        Self {
            conntrack: crate::abi::policy::MAX_CT,
            nat: MAX_NAT_FLOWS,
            routes: MAX_ROUTES,
        }
    }
}

impl MapSizes {
    /// (map, requested max_entries), for each sized map.
    fn by_map(&self) -> [(&'static str, u32); 5] {
        [
            (crate::policy::CT_MAP, self.conntrack),
            (NAT_FLOWS, self.nat),
            (NAT_REVERSE, self.nat),
            (STACK_FLOWS, self.nat),
            (ROUTES, self.routes),
        ]
    }
}

/// How full one table is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TableFill {
    /// The map's name.
    pub map: &'static str,
    /// Its max_entries.
    pub capacity: u32,
    /// Entries it holds (for LRU maps: the programs' count, which stays at the capacity once
    /// the map has filled).
    pub entries: u64,
    /// Inserts that found it full: refused, or (LRU maps) made room by evicting an entry.
    pub full_inserts: u64,
}
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
    fill: Array<MapData, MapFill>,
    full: PerCpuArray<MapData, u64>,
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
            fill: Array::try_from(Map::Array(open(FILL)?))
                .map_err(|source| map_error(FILL, "type", source))?,
            full: PerCpuArray::try_from(Map::PerCpuArray(open(FULL)?))
                .map_err(|source| map_error(FULL, "type", source))?,
        })
    }

    /// How many routes the `routes` map holds at most.
    pub fn route_capacity(&self) -> Result<u32, DataplaneError> {
        max_entries(IterableMap::map(&self.routes), ROUTES)
    }

    /// How full each table is: those the programs insert into, and `routes`.
    pub fn fills(&self) -> Result<Vec<TableFill>, DataplaneError> {
        let mut fills = Vec::new();
        for map in MapId::ALL {
            let index = map as u32;
            let full: u64 = self
                .full
                .get(&index, 0)
                .map_err(|source| map_error(FULL, &format!("get {}", map.as_str()), source))?
                .iter()
                .sum();
            let (capacity, entries) = if map == MapId::Counters {
                // Not counted by the programs: userspace deletes entries too.
                let capacity = max_entries(IterableMap::map(&self.counters), "counters")?;
                (capacity, self.counters.keys().count() as u64)
            } else {
                let fill = self
                    .fill
                    .get(&index, 0)
                    .map_err(|source| map_error(FILL, &format!("get {}", map.as_str()), source))?;
                (fill.capacity, u64::try_from(fill.entries).unwrap_or(0))
            };
            fills.push(TableFill {
                map: map.as_str(),
                capacity,
                entries,
                full_inserts: full,
            });
        }
        fills.push(TableFill {
            map: ROUTES,
            capacity: self.route_capacity()?,
            entries: self.routes.keys().count() as u64,
            full_inserts: 0,
        });
        Ok(fills)
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
        match self.routes.insert(&key, info, 0) {
            Ok(()) => Ok(()),
            // An LPM trie at its max_entries refuses new prefixes with ENOSPC.
            Err(aya::maps::MapError::SyscallError(e))
                if e.io_error.raw_os_error() == Some(libc::ENOSPC) =>
            {
                let capacity = max_entries(IterableMap::map(&self.routes), ROUTES)?;
                warn!(block = %block, prefix, capacity, "the routes table is full");
                Err(DataplaneError::TableFull {
                    map: ROUTES,
                    capacity,
                })
            }
            Err(source) => Err(map_error(
                ROUTES,
                &format!("insert {block}/{prefix}"),
                source,
            )),
        }
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

impl NodeMaps {
    /// Removes the counters whose key satisfies `doomed` (the series of a device that is gone);
    /// returns how many.
    pub fn remove_counters(
        &mut self,
        doomed: impl Fn(&CounterKey) -> bool,
    ) -> Result<usize, DataplaneError> {
        let mut keys = Vec::new();
        for key in self.counters.keys() {
            let key = key.map_err(|source| map_error("counters", "iterate", source))?;
            if doomed(&key) {
                keys.push(key);
            }
        }
        for key in &keys {
            match self.counters.remove(key) {
                Err(source) if !is_not_found(&source) => {
                    return Err(map_error("counters", "remove", source));
                }
                _ => {}
            }
        }
        Ok(keys.len())
    }

    /// The counters map's capacity (entries), as the kernel reports it.
    pub fn counters_capacity(&self) -> Result<u32, DataplaneError> {
        use aya::maps::IterableMap as _;
        self.counters
            .map()
            .info()
            .map(|info| info.max_entries())
            .map_err(|source| map_error("counters", "info", source))
    }
}

/// Loads both programs with their maps pinned under `pins` (reusing maps already pinned there,
/// so state survives an agent restart; new maps get the capacities of `sizes`), and (re)pins
/// the programs for the plugin. Returns the loaded objects, which the caller keeps while it
/// attaches host devices.
pub fn install(pins: &Pins, sizes: &MapSizes) -> Result<Installed, DataplaneError> {
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
        for (name, size) in sizes.by_map() {
            loader.map_max_entries(name, size);
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
    record_capacities(pins, sizes)?;
    info!(dir = %pins.dir().display(), ?sizes, "node datapath installed");
    Ok(Installed {
        pins: pins.clone(),
        pod,
        host,
    })
}

/// Writes each tracked table's capacity into `map_fill`, where the programs compare their count
/// with it, and logs the tables whose pinned map has another capacity than `sizes` asks for.
fn record_capacities(pins: &Pins, sizes: &MapSizes) -> Result<(), DataplaneError> {
    let mut capacities = BTreeMap::new();
    for (name, requested) in sizes.by_map() {
        let map = MapData::from_pin(pins.map(name))
            .map_err(|source| map_error(name, "open pin", source))?;
        let actual = max_entries(&map, name)?;
        if actual != requested {
            warn!(
                map = name,
                pinned = actual,
                requested,
                "the pinned map keeps the capacity it was created with; remove its pin (and its \
                 state) and restart to resize it"
            );
        }
        capacities.insert(name, actual);
    }
    let mut fill: Array<MapData, MapFill> = Array::try_from(Map::Array(
        MapData::from_pin(pins.map(FILL)).map_err(|source| map_error(FILL, "open pin", source))?,
    ))
    .map_err(|source| map_error(FILL, "type", source))?;
    for map in MapId::ALL {
        let Some(&capacity) = capacities.get(map.as_str()) else {
            continue;
        };
        let index = map as u32;
        let mut value = fill
            .get(&index, 0)
            .map_err(|source| map_error(FILL, "get", source))?;
        // Only a new (or resized) table is written: the programs update `entries` meanwhile.
        if value.capacity != capacity {
            value.capacity = capacity;
            fill.set(index, value, 0)
                .map_err(|source| map_error(FILL, "set", source))?;
        }
    }
    Ok(())
}

fn max_entries(map: &MapData, name: &'static str) -> Result<u32, DataplaneError> {
    map.info()
        .map(|info| info.max_entries())
        .map_err(|source| map_error(name, "info", source))
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
