//! The LB datapath in the kernel: loading `ebpf/lb.c` (TC) or `ebpf/lb_xdp.c` (XDP) with aya,
//! pinning its maps, attaching it to the LB interface, and the typed maps behind
//! [`LbMaps`].

use std::collections::BTreeMap;
use std::fs;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use aya::maps::lpm_trie::{Key, LpmTrie};
use aya::maps::{
    Array, ArrayOfMaps, HashMap, IterableMap, MapData, MapError, PerCpuArray, PerCpuValues,
};
use aya::programs::links::{FdLink, PinnedLink};
use aya::programs::tc::SchedClassifierLink;
use aya::programs::xdp::XdpLink;
use aya::programs::{ProgramError, SchedClassifier, TcAttachType, Xdp, XdpMode};
use aya::{Ebpf, EbpfLoader};
use ipnetwork::IpNetwork;
use slipway_dataplane::DataplaneError;
use slipway_dataplane::abi::CounterValue;
use slipway_dataplane::abi::lb::{
    LbAffinity, LbAffinityKey, LbBackend, LbConfig, LbFlow, LbFlowKey, LbReason, LbReverse,
    LbService, LbServiceKey, LbSourceRange, LbStats, LbVip, LbVipKey, MAGLEV_SIZE,
};
use slipway_dataplane::error::{is_not_found, map_error};
use slipway_dataplane::objects;
use tracing::debug;

use crate::LbError;
use crate::config::MapSizes;
use crate::maps::{LbMaps, MapUsage};

/// Source ports the datapath gives SNATed flows (`LB_SNAT_PORT_MIN`..`LB_SNAT_PORT_END` in
/// ebpf/include/lb_core.h): kept clear of the kernel's ephemeral ports.
pub const SNAT_PORTS: std::ops::Range<u16> = 1024..32768;

const TC_PROGRAM: &str = "lb_ingress";
const XDP_PROGRAM: &str = "lb_xdp";

/// Every map of the object (ebpf/include/lb_maps.h), pinned under these names.
const MAPS: [&str; 12] = [
    "lb_services",
    "lb_affinity",
    "lb_maglev",
    "lb_backends",
    "lb_flows",
    "lb_reverse",
    "lb_source_ranges",
    "lb_vips",
    "lb_config",
    "lb_backend_stats",
    "lb_service_stats",
    "lb_counters",
];

/// (key, value) sizes and capacity of every map, from the ABI mirrors (checked against the
/// objects' BTF) and the sizes asked for: what a map pinned under its name must have to be
/// reused.
fn layout_of(map: &str, sizes: &MapSizes) -> Option<(usize, usize, Option<u32>)> {
    use slipway_dataplane::abi::lb::LbReverse;
    Some(match map {
        "lb_services" => (
            size_of::<LbServiceKey>(),
            size_of::<LbService>(),
            Some(sizes.services),
        ),
        "lb_maglev" => (size_of::<u32>(), size_of::<u32>(), Some(sizes.services)),
        "lb_backends" => (
            size_of::<u32>(),
            size_of::<LbBackend>(),
            Some(sizes.backends),
        ),
        "lb_flows" => (
            size_of::<LbFlowKey>(),
            size_of::<LbFlow>(),
            Some(sizes.flows),
        ),
        "lb_reverse" => (
            size_of::<LbFlowKey>(),
            size_of::<LbReverse>(),
            Some(sizes.flows),
        ),
        "lb_affinity" => (
            size_of::<LbAffinityKey>(),
            size_of::<LbAffinity>(),
            Some(sizes.flows),
        ),
        "lb_source_ranges" => (size_of::<Key<LbSourceRange>>(), size_of::<u32>(), None),
        "lb_vips" => (
            size_of::<LbVipKey>(),
            size_of::<LbVip>(),
            Some(sizes.services),
        ),
        "lb_config" => (size_of::<u32>(), size_of::<LbConfig>(), None),
        "lb_backend_stats" => (size_of::<u32>(), size_of::<LbStats>(), Some(sizes.backends)),
        "lb_service_stats" => (size_of::<u32>(), size_of::<LbStats>(), Some(sizes.services)),
        "lb_counters" => (size_of::<u32>(), size_of::<CounterValue>(), None),
        _ => return None,
    })
}

/// Fails if a map pinned at `path` has another layout or capacity than this LB's `map`; a
/// missing pin is fine (the loader creates it).
fn check_pin(map: &str, path: &Path, sizes: &MapSizes) -> Result<(), LbError> {
    let (Some((key, value, entries)), true) = (layout_of(map, sizes), path.exists()) else {
        return Ok(());
    };
    let info = aya::maps::MapInfo::from_pin(path)
        .map_err(|e| map_err("pinned map", &format!("inspect {}", path.display()), e))?;
    let found = (info.key_size() as usize, info.value_size() as usize);
    if found != (key, value) {
        return Err(LbError::StalePin {
            path: path.to_owned(),
            found: format!("{found:?} (key, value) bytes"),
            expected: format!("{:?}", (key, value)),
        });
    }
    if let Some(entries) = entries
        && info.max_entries() != entries
    {
        return Err(LbError::StalePin {
            path: path.to_owned(),
            found: format!("{} entries", info.max_entries()),
            expected: format!("{entries} (the map sizes asked for)"),
        });
    }
    Ok(())
}

/// Where the LB program runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttachPoint {
    /// TCX ingress (`ebpf/lb.c`): the choice on veths.
    Tc,
    /// XDP (`ebpf/lb_xdp.c`) in the given mode, for NICs with native XDP, with `lb.c` at TCX
    /// ingress beside it on the same (pinned) maps for frames whose next hop XDP cannot
    /// resolve yet. Needs a pin directory.
    Xdp(XdpMode),
}

/// The loaded LB program and its maps.
pub struct LbDatapath {
    bpf: Ebpf,
    /// The XDP object, with [`AttachPoint::Xdp`].
    xdp_bpf: Option<Ebpf>,
    point: AttachPoint,
    services: HashMap<MapData, LbServiceKey, LbService>,
    maglev: ArrayOfMaps<MapData, Array<MapData, u32>>,
    backends: Array<MapData, LbBackend>,
    flows: HashMap<MapData, LbFlowKey, LbFlow>,
    reverse: HashMap<MapData, LbFlowKey, LbReverse>,
    affinity: HashMap<MapData, LbAffinityKey, LbAffinity>,
    source_ranges: LpmTrie<MapData, LbSourceRange, u32>,
    vips: HashMap<MapData, LbVipKey, LbVip>,
    config: Array<MapData, LbConfig>,
    backend_stats: PerCpuArray<MapData, LbStats>,
    service_stats: PerCpuArray<MapData, LbStats>,
    counters: PerCpuArray<MapData, CounterValue>,
    pin_dir: Option<PathBuf>,
    sizes: MapSizes,
}

impl std::fmt::Debug for LbDatapath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LbDatapath")
            .field("point", &self.point)
            .field("pin_dir", &self.pin_dir)
            .finish_non_exhaustive()
    }
}

fn dp(e: DataplaneError) -> LbError {
    LbError::from(e)
}

fn map_err(map: &'static str, action: &str, source: MapError) -> LbError {
    dp(map_error(map, action, source))
}

fn ignore_missing(
    result: Result<(), MapError>,
    map: &'static str,
    action: &str,
) -> Result<(), LbError> {
    match result {
        Err(e) if !is_not_found(&e) => Err(map_err(map, action, e)),
        _ => Ok(()),
    }
}

impl LbDatapath {
    /// Loads the program for `point` into the kernel (not yet attached), its maps sized by
    /// `sizes`. With `pin_dir`, the maps live there on bpffs and maps already pinned there
    /// are reused (if they have the same layout and sizes), so flows survive a restart of
    /// the daemon.
    pub fn load(
        point: AttachPoint,
        pin_dir: Option<&Path>,
        sizes: &MapSizes,
    ) -> Result<Self, LbError> {
        if matches!(point, AttachPoint::Xdp(_)) && pin_dir.is_none() {
            return Err(LbError::Capacity(
                "XDP mode shares its maps with the TC program through pins: give a pin directory",
            ));
        }
        sizes.validate()?;
        let mut bpf = load_object(objects::LB, "lb", TC_PROGRAM, pin_dir, sizes)?;
        let xdp_bpf = match point {
            AttachPoint::Tc => None,
            AttachPoint::Xdp(_) => Some(load_object(
                objects::LB_XDP,
                "lb_xdp",
                XDP_PROGRAM,
                pin_dir,
                sizes,
            )?),
        };
        let object_name = "lb";
        let mut take = |name: &'static str| {
            bpf.take_map(name).ok_or(dp(DataplaneError::MissingMap {
                object: object_name,
                map: name,
            }))
        };
        macro_rules! open {
            ($kind:ident, $name:literal) => {
                $kind::try_from(take($name)?).map_err(|e| map_err($name, "open", e))?
            };
        }
        let datapath = Self {
            services: open!(HashMap, "lb_services"),
            maglev: open!(ArrayOfMaps, "lb_maglev"),
            backends: open!(Array, "lb_backends"),
            flows: open!(HashMap, "lb_flows"),
            reverse: open!(HashMap, "lb_reverse"),
            affinity: open!(HashMap, "lb_affinity"),
            source_ranges: open!(LpmTrie, "lb_source_ranges"),
            vips: open!(HashMap, "lb_vips"),
            config: open!(Array, "lb_config"),
            backend_stats: open!(PerCpuArray, "lb_backend_stats"),
            service_stats: open!(PerCpuArray, "lb_service_stats"),
            counters: open!(PerCpuArray, "lb_counters"),
            bpf,
            xdp_bpf,
            point,
            pin_dir: pin_dir.map(Path::to_owned),
            sizes: *sizes,
        };
        debug!(?point, ?pin_dir, "LB datapath loaded");
        Ok(datapath)
    }

    /// Attaches the program to `ifname` in the calling thread's network namespace (TCX
    /// ingress, or XDP in the chosen mode). With a pin directory the links are pinned there
    /// ([`link_pin`]) and outlive the daemon, killed or stopped: the datapath keeps serving
    /// while it is down, and a restarted daemon swaps its program into the pinned links
    /// atomically (`BPF_LINK_UPDATE`), so there is no moment without one. Only
    /// [`remove_pins`] detaches them. Without a pin directory the links live as long as this
    /// value.
    pub fn attach(&mut self, ifname: &str) -> Result<(), LbError> {
        let pin_dir = self.pin_dir.clone();
        let pin = |kind| pin_dir.as_deref().map(|d| link_pin(d, kind, ifname));
        attach_tc(classifier(&mut self.bpf)?, ifname, pin(TC_LINK).as_deref())?;
        if let (AttachPoint::Xdp(mode), Some(xdp_bpf)) = (self.point, self.xdp_bpf.as_mut()) {
            attach_xdp(xdp(xdp_bpf)?, ifname, mode, pin(XDP_LINK).as_deref())?;
        }
        debug!(ifname, point = ?self.point, pinned = pin_dir.is_some(), "LB program attached");
        Ok(())
    }

    /// The TC program, e.g. for `BPF_PROG_TEST_RUN` (loaded with [`AttachPoint::Tc`]).
    pub fn classifier(&mut self) -> Result<&mut SchedClassifier, LbError> {
        classifier(&mut self.bpf)
    }

    /// The XDP program (loaded with [`AttachPoint::Xdp`]).
    pub fn xdp(&mut self) -> Result<&mut Xdp, LbError> {
        match self.xdp_bpf.as_mut() {
            Some(bpf) => xdp(bpf),
            None => Err(dp(DataplaneError::MissingProgram {
                object: "lb",
                program: XDP_PROGRAM,
            })),
        }
    }

    /// The reverse translation entries (backend -> client direction).
    pub fn reverse_entries(&self) -> Result<Vec<(LbFlowKey, LbReverse)>, LbError> {
        self.reverse
            .iter()
            .map(|e| e.map_err(|e| map_err("lb_reverse", "iterate", e)))
            .collect()
    }

    pub fn pin_dir(&self) -> Option<&Path> {
        self.pin_dir.as_deref()
    }
}

/// Pin names of the links: `link_<kind>_<ifname>` in the pin directory.
const TC_LINK: &str = "tc";
const XDP_LINK: &str = "xdp";

/// Where the link of `kind` ("tc", "xdp") on `ifname` is pinned.
pub fn link_pin(pin_dir: &Path, kind: &str, ifname: &str) -> PathBuf {
    pin_dir.join(format!("link_{kind}_{ifname}"))
}

fn attach_err(program: &'static str, action: String, source: ProgramError) -> LbError {
    dp(DataplaneError::Program {
        program,
        action,
        source: Box::new(source),
    })
}

fn pin_err(path: &Path, source: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> LbError {
    dp(DataplaneError::Bpffs {
        path: path.to_owned(),
        source: std::io::Error::other(source),
    })
}

/// The link pinned at `pin`, if there is one, as a link of program type `L`.
fn pinned_link<L>(pin: Option<&Path>) -> Result<Option<L>, LbError>
where
    L: TryFrom<FdLink>,
    L::Error: std::error::Error + Send + Sync + 'static,
{
    let Some(pin) = pin.filter(|p| p.exists()) else {
        return Ok(None);
    };
    let link = PinnedLink::from_pin(pin).map_err(|e| pin_err(pin, e))?;
    L::try_from(FdLink::from(link))
        .map(Some)
        .map_err(|e| pin_err(pin, e))
}

/// Replaces whatever is pinned at `pin` with `link`.
fn pin_link(pin: &Path, link: FdLink) -> Result<(), LbError> {
    remove_file(pin)?;
    link.pin(pin).map_err(|e| pin_err(pin, e))?;
    Ok(())
}

fn remove_file(path: &Path) -> Result<(), LbError> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(pin_err(path, e)),
        _ => Ok(()),
    }
}

/// Attaches the TC program at TCX ingress of `ifname`, or swaps it into the link pinned at
/// `pin`; pins the link there.
fn attach_tc(
    program: &mut SchedClassifier,
    ifname: &str,
    pin: Option<&Path>,
) -> Result<(), LbError> {
    let id = match pinned_link::<SchedClassifierLink>(pin)? {
        Some(old) => program
            .attach_to_link(old)
            .map_err(|e| attach_err(TC_PROGRAM, format!("update the link of {ifname}"), e))?,
        None => program
            .attach(ifname, TcAttachType::Ingress)
            .map_err(|e| attach_err(TC_PROGRAM, format!("attach to {ifname}"), e))?,
    };
    if let Some(pin) = pin {
        let link = program
            .take_link(id)
            .map_err(|e| attach_err(TC_PROGRAM, "take the link".into(), e))?;
        pin_link(pin, FdLink::try_from(link).map_err(|e| pin_err(pin, e))?)?;
    }
    Ok(())
}

/// Likewise for the XDP program.
fn attach_xdp(
    program: &mut Xdp,
    ifname: &str,
    mode: XdpMode,
    pin: Option<&Path>,
) -> Result<(), LbError> {
    let id = match pinned_link::<XdpLink>(pin)? {
        Some(old) => program
            .attach_to_link(old)
            .map_err(|e| attach_err(XDP_PROGRAM, format!("update the link of {ifname}"), e))?,
        None => program
            .attach(ifname, mode)
            .map_err(|e| attach_err(XDP_PROGRAM, format!("attach to {ifname}"), e))?,
    };
    if let Some(pin) = pin {
        let link = program
            .take_link(id)
            .map_err(|e| attach_err(XDP_PROGRAM, "take the link".into(), e))?;
        pin_link(pin, FdLink::try_from(link).map_err(|e| pin_err(pin, e))?)?;
    }
    Ok(())
}

/// Tears the datapath down for good: removes the pinned links (which detaches the programs),
/// then the pinned maps (which forgets every flow), then the directory. What `slipway lb
/// teardown` does; a daemon that stops or dies leaves the pins alone. Returns what it removed.
pub fn remove_pins(pin_dir: &Path) -> Result<Vec<PathBuf>, LbError> {
    let entries = match fs::read_dir(pin_dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(pin_err(pin_dir, e)),
    };
    let mut paths: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
    // Links first: the program stops before its maps go.
    paths.sort_by_key(|p| {
        !p.file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with("link_"))
    });
    for path in &paths {
        let is_link = path
            .file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with("link_"));
        if is_link {
            remove_link(path)?;
        } else {
            remove_file(path)?;
        }
    }
    fs::remove_dir(pin_dir).map_err(|e| pin_err(pin_dir, e))?;
    Ok(paths)
}

/// How long [`remove_link`] waits for the kernel to let a link go.
const DETACH_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Unpins the link at `pin` and waits until the kernel has detached it: a pin's reference is
/// dropped only after an RCU grace period (bpffs frees its inodes so), so the program may run
/// a moment after the file is gone.
fn remove_link(pin: &Path) -> Result<(), LbError> {
    let link = PinnedLink::from_pin(pin)
        .map_err(|e| pin_err(pin, e))?
        .unpin()
        .map_err(|e| pin_err(pin, e))?;
    let id = link.info().map_err(|e| pin_err(pin, e))?.id();
    drop(link);
    let deadline = std::time::Instant::now() + DETACH_TIMEOUT;
    loop {
        let alive = aya::programs::loaded_links().any(|l| l.is_ok_and(|l| l.id() == id));
        if !alive {
            return Ok(());
        }
        if std::time::Instant::now() > deadline {
            return Err(pin_err(
                pin,
                format!("link {id} still attached {DETACH_TIMEOUT:?} after unpinning"),
            ));
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

/// Loads one object (its maps at `pin_dir`, reused if pinned there already) and its program.
fn load_object(
    object: &[u8],
    object_name: &'static str,
    program: &'static str,
    pin_dir: Option<&Path>,
    sizes: &MapSizes,
) -> Result<Ebpf, LbError> {
    let mut loader = EbpfLoader::new();
    for map in MAPS {
        if let Some((_, _, Some(entries))) = layout_of(map, sizes) {
            loader.map_max_entries(map, entries);
        }
    }
    let pins: Vec<(&str, PathBuf)> = match pin_dir {
        Some(dir) => {
            fs::create_dir_all(dir).map_err(|source| {
                dp(DataplaneError::Bpffs {
                    path: dir.to_owned(),
                    source,
                })
            })?;
            MAPS.iter().map(|m| (*m, dir.join(m))).collect()
        }
        None => Vec::new(),
    };
    for (map, path) in &pins {
        // aya reuses whatever is pinned there; a map of another layout must not be.
        check_pin(map, path, sizes)?;
        loader.map_pin_path(map, path.as_path());
    }
    let mut bpf = loader.load(object).map_err(|source| {
        dp(DataplaneError::Load {
            object: object_name,
            source: Box::new(source),
        })
    })?;
    let load_err = |source| {
        dp(DataplaneError::Program {
            program,
            action: "load".into(),
            source: Box::new(source),
        })
    };
    if program == XDP_PROGRAM {
        xdp(&mut bpf)?.load().map_err(load_err)?;
    } else {
        classifier(&mut bpf)?.load().map_err(load_err)?;
    }
    Ok(bpf)
}

fn classifier(bpf: &mut Ebpf) -> Result<&mut SchedClassifier, LbError> {
    let program = bpf
        .program_mut(TC_PROGRAM)
        .ok_or(dp(DataplaneError::MissingProgram {
            object: "lb",
            program: TC_PROGRAM,
        }))?;
    program.try_into().map_err(|source| {
        dp(DataplaneError::Program {
            program: TC_PROGRAM,
            action: "expect a TC classifier".into(),
            source: Box::new(source),
        })
    })
}

fn xdp(bpf: &mut Ebpf) -> Result<&mut Xdp, LbError> {
    let program = bpf
        .program_mut(XDP_PROGRAM)
        .ok_or(dp(DataplaneError::MissingProgram {
            object: "lb_xdp",
            program: XDP_PROGRAM,
        }))?;
    program.try_into().map_err(|source| {
        dp(DataplaneError::Program {
            program: XDP_PROGRAM,
            action: "expect an XDP program".into(),
            source: Box::new(source),
        })
    })
}

/// The LPM key of a source range: the 32 bits of the service id, then the range's prefix of
/// the 128-bit address (an IPv4 /n is the IPv4-mapped /(96 + n)).
fn range_key(service_id: u32, net: IpNetwork) -> Key<LbSourceRange> {
    let bits = match net {
        IpNetwork::V4(n) => 96 + u32::from(n.prefix()),
        IpNetwork::V6(n) => u32::from(n.prefix()),
    };
    Key::new(
        32 + bits,
        LbSourceRange {
            service_id,
            ip: net.network().into(),
        },
    )
}

fn sum_stats(values: &[LbStats]) -> LbStats {
    let mut total = LbStats::default();
    for v in values {
        total += *v;
    }
    total
}

impl LbMaps for LbDatapath {
    fn set_config(&mut self, config: LbConfig) -> Result<(), LbError> {
        self.config
            .set(0, config, 0)
            .map_err(|e| map_err("lb_config", "set", e))
    }

    fn set_service(&mut self, key: LbServiceKey, value: LbService) -> Result<(), LbError> {
        self.services
            .insert(key, value, 0)
            .map_err(|e| map_err("lb_services", "insert", e))
    }

    fn remove_service(&mut self, key: &LbServiceKey) -> Result<(), LbError> {
        ignore_missing(self.services.remove(key), "lb_services", "remove")
    }

    fn set_backend(&mut self, id: u32, backend: LbBackend) -> Result<(), LbError> {
        self.backends
            .set(id, backend, 0)
            .map_err(|e| map_err("lb_backends", &format!("set {id}"), e))
    }

    fn write_ring(&mut self, service_id: u32, slots: &[(u32, u32)]) -> Result<(), LbError> {
        let ring = match self.maglev.get(&service_id, 0) {
            Ok(ring) => Some(ring),
            Err(e) if is_not_found(&e) => None,
            Err(e) => return Err(map_err("lb_maglev", &format!("get ring {service_id}"), e)),
        };
        let fresh = ring.is_none();
        let mut ring = match ring {
            Some(ring) => ring,
            None => Array::<MapData, u32>::create(MAGLEV_SIZE, 0)
                .map_err(|e| map_err("lb_maglev", "create a ring", e))?,
        };
        for &(slot, backend) in slots {
            ring.set(slot, backend, 0)
                .map_err(|e| map_err("lb_maglev", &format!("set ring {service_id}"), e))?;
        }
        // A new ring goes in whole, once written: the program never sees it half-filled.
        if fresh {
            self.maglev
                .set(service_id, &ring, 0)
                .map_err(|e| map_err("lb_maglev", &format!("insert ring {service_id}"), e))?;
        }
        Ok(())
    }

    fn add_source_range(&mut self, service_id: u32, net: IpNetwork) -> Result<(), LbError> {
        self.source_ranges
            .insert(&range_key(service_id, net), 1, 0)
            .map_err(|e| map_err("lb_source_ranges", &format!("insert {net}"), e))
    }

    fn remove_source_range(&mut self, service_id: u32, net: IpNetwork) -> Result<(), LbError> {
        ignore_missing(
            self.source_ranges.remove(&range_key(service_id, net)),
            "lb_source_ranges",
            "remove",
        )
    }

    fn add_vip(&mut self, vip: IpAddr) -> Result<(), LbError> {
        self.vips
            .insert(LbVipKey { ip: vip.into() }, LbVip::default(), 0)
            .map_err(|e| map_err("lb_vips", &format!("insert {vip}"), e))
    }

    fn remove_vip(&mut self, vip: IpAddr) -> Result<(), LbError> {
        ignore_missing(
            self.vips.remove(&LbVipKey { ip: vip.into() }),
            "lb_vips",
            "remove",
        )
    }

    fn flows(&self) -> Result<Vec<(LbFlowKey, LbFlow)>, LbError> {
        self.flows
            .iter()
            .map(|e| e.map_err(|e| map_err("lb_flows", "iterate", e)))
            .collect()
    }

    fn remove_flow(&mut self, forward: &LbFlowKey, reverse: &LbFlowKey) -> Result<(), LbError> {
        ignore_missing(self.flows.remove(forward), "lb_flows", "remove")?;
        ignore_missing(self.reverse.remove(reverse), "lb_reverse", "remove")
    }

    fn backend_stats(&self, id: u32) -> Result<LbStats, LbError> {
        let values = self
            .backend_stats
            .get(&id, 0)
            .map_err(|e| map_err("lb_backend_stats", "get", e))?;
        Ok(sum_stats(&values))
    }

    fn service_stats(&self, id: u32) -> Result<LbStats, LbError> {
        let values = self
            .service_stats
            .get(&id, 0)
            .map_err(|e| map_err("lb_service_stats", "get", e))?;
        Ok(sum_stats(&values))
    }

    fn counters(&self) -> Result<BTreeMap<LbReason, CounterValue>, LbError> {
        let mut out = BTreeMap::new();
        for reason in LbReason::ALL {
            let values = self
                .counters
                .get(&(reason as u32), 0)
                .map_err(|e| map_err("lb_counters", "get", e))?;
            let mut total = CounterValue::default();
            for v in values.iter() {
                total += *v;
            }
            out.insert(reason, total);
        }
        Ok(out)
    }

    fn reset_service_stats(&mut self, id: u32) -> Result<(), LbError> {
        zero_stats(&mut self.service_stats, "lb_service_stats", id)
    }

    fn reset_backend_stats(&mut self, id: u32) -> Result<(), LbError> {
        zero_stats(&mut self.backend_stats, "lb_backend_stats", id)
    }

    fn service_keys(&self) -> Result<Vec<LbServiceKey>, LbError> {
        self.services
            .keys()
            .map(|k| k.map_err(|e| map_err("lb_services", "iterate", e)))
            .collect()
    }

    fn source_ranges(&self) -> Result<Vec<(u32, IpNetwork)>, LbError> {
        let mut out = Vec::new();
        for key in self.source_ranges.keys() {
            let key = key.map_err(|e| map_err("lb_source_ranges", "iterate", e))?;
            let data = key.data();
            let bits = key.prefix_len().saturating_sub(32);
            let net = match data.ip.ip() {
                IpAddr::V4(ip) => IpNetwork::new(ip.into(), bits.saturating_sub(96) as u8),
                ip @ IpAddr::V6(_) => IpNetwork::new(ip, bits as u8),
            };
            if let Ok(net) = net {
                out.push((data.service_id, net));
            }
        }
        Ok(out)
    }

    fn backend_ids(&self) -> Result<Vec<u32>, LbError> {
        let mut out = Vec::new();
        for (id, backend) in self.backends.iter().enumerate() {
            let backend = backend.map_err(|e| map_err("lb_backends", "iterate", e))?;
            if backend != LbBackend::default() {
                out.push(id as u32);
            }
        }
        Ok(out)
    }

    fn map_usage(&self) -> Result<Vec<MapUsage>, LbError> {
        let mut out = vec![
            usage("lb_services", self.services.map())?,
            usage("lb_backends", self.backends.map())?,
            usage("lb_flows", self.flows.map())?,
            usage("lb_reverse", self.reverse.map())?,
            usage("lb_affinity", self.affinity.map())?,
            usage("lb_source_ranges", self.source_ranges.map())?,
            usage("lb_vips", self.vips.map())?,
            usage("lb_backend_stats", self.backend_stats.map())?,
            usage("lb_service_stats", self.service_stats.map())?,
        ];
        // The rings (the outer array of ids is small next to them).
        let mut rings = MapUsage {
            name: "lb_maglev".into(),
            max_entries: self.sizes.services,
            bytes: 0,
        };
        for id in 0..rings.max_entries {
            match self.maglev.get(&id, 0) {
                Ok(ring) => rings.bytes += memlock(ring.map())?,
                Err(e) if is_not_found(&e) => {}
                Err(e) => return Err(map_err("lb_maglev", "get ring", e)),
            }
        }
        out.push(rings);
        Ok(out)
    }

    fn vips(&self) -> Result<Vec<IpAddr>, LbError> {
        self.vips
            .keys()
            .map(|k| {
                k.map(|k| k.ip.ip())
                    .map_err(|e| map_err("lb_vips", "iterate", e))
            })
            .collect()
    }
}

/// What the kernel charges for a map (`memlock` in its fdinfo, which `bpftool map show`
/// prints too).
fn memlock(map: &MapData) -> Result<u64, LbError> {
    use std::os::fd::{AsFd as _, AsRawFd as _};
    let fd = map.fd().as_fd().as_raw_fd();
    let text = fs::read_to_string(format!("/proc/self/fdinfo/{fd}")).map_err(|source| {
        LbError::Syscall {
            call: "read map fdinfo",
            source,
        }
    })?;
    Ok(text
        .lines()
        .find_map(|l| l.strip_prefix("memlock:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0))
}

fn usage(name: &'static str, map: &MapData) -> Result<MapUsage, LbError> {
    let info = map.info().map_err(|e| map_err(name, "get info", e))?;
    Ok(MapUsage {
        name: name.to_owned(),
        max_entries: info.max_entries(),
        bytes: memlock(map)?,
    })
}

/// Sets entry `id` of a per-CPU counter array to zero on every CPU.
fn zero_stats(
    map: &mut PerCpuArray<MapData, LbStats>,
    name: &'static str,
    id: u32,
) -> Result<(), LbError> {
    let cpus = aya::util::nr_cpus().map_err(|(_, source)| LbError::Syscall {
        call: "read the possible CPUs",
        source,
    })?;
    let zeros = PerCpuValues::try_from(vec![LbStats::default(); cpus]).map_err(|source| {
        LbError::Syscall {
            call: "build per-CPU values",
            source,
        }
    })?;
    map.set(id, zeros, 0)
        .map_err(|e| map_err(name, &format!("zero {id}"), e))
}

/// Turns on the kernel's run-time accounting of BPF programs (`BPF_ENABLE_STATS`) for as long
/// as the returned descriptor lives: what the benchmark reads the LB's CPU cost from.
pub fn enable_run_time_stats() -> Result<std::os::fd::OwnedFd, LbError> {
    aya::sys::enable_stats(aya::sys::Stats::RunTime).map_err(|e| LbError::Syscall {
        call: "bpf(BPF_ENABLE_STATS)",
        source: e.io_error,
    })
}

/// CPU time spent in, and runs of, every loaded LB program (TC and XDP), as the kernel counts
/// them while run-time stats are enabled.
pub fn run_time() -> Result<(std::time::Duration, u64), LbError> {
    let tc = run_time_of(TC_PROGRAM)?;
    let xdp = run_time_of(XDP_PROGRAM)?;
    Ok((tc.0 + xdp.0, tc.1 + xdp.1))
}

/// Likewise for the loaded programs named `program` ("lb_ingress" at TC, "lb_xdp").
pub fn run_time_of(program: &str) -> Result<(std::time::Duration, u64), LbError> {
    let mut total = (std::time::Duration::ZERO, 0);
    for info in aya::programs::loaded_programs() {
        let info = info.map_err(|source| {
            dp(DataplaneError::Program {
                program: TC_PROGRAM,
                action: "list loaded programs".into(),
                source: Box::new(source),
            })
        })?;
        if info.name_as_str() == Some(program) {
            total.0 += info.run_time();
            total.1 += info.run_count();
        }
    }
    Ok(total)
}
