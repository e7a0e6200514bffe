//! The L4 load balancer's datapath in the kernel: loading `ebpf/lb.c` (TC) or `ebpf/lb_xdp.c`
//! (XDP), its maps sized and pinned, attaching it to the LB interface, and typed operations on
//! its maps ([`maps`]). The LB's control logic (`slipway-lb`) drives it through its `LbMaps`
//! seam and never touches aya itself.

mod maps;
mod pins;
mod stats;

use std::fs;
use std::path::{Path, PathBuf};

use aya::maps::lpm_trie::LpmTrie;
use aya::maps::{Array, ArrayOfMaps, HashMap, MapData, PerCpuArray};
use aya::programs::{SchedClassifier, TestRun, TestRunOptions, Xdp};
use aya::{Ebpf, EbpfLoader};
use tracing::debug;

use crate::DataplaneError;
use crate::abi::CounterValue;
use crate::abi::lb::{
    LbAffinity, LbAffinityKey, LbBackend, LbConfig, LbFlow, LbFlowKey, LbReverse, LbService,
    LbServiceKey, LbSourceRange, LbStats, LbVip, LbVipKey, MAX_BACKENDS, MAX_FLOWS, MAX_SERVICES,
};
use crate::error::map_error;
use crate::objects;
pub use maps::MapUsage;
pub use pins::{link_pin, remove_pins};
pub use stats::{enable_run_time_stats, run_time, run_time_of};

/// Source ports the datapath gives SNATed flows (`LB_SNAT_PORT_MIN`..`LB_SNAT_PORT_END` in
/// ebpf/include/lb_core.h): kept clear of the kernel's ephemeral ports.
pub const SNAT_PORTS: std::ops::Range<u16> = 1024..32768;

const TC_PROGRAM: &str = "lb_ingress";
const XDP_PROGRAM: &str = "lb_xdp";

/// Capacities of the LB maps (aya sets `max_entries` before the program loads). Memory:
/// every tracked flow holds an `lb_flows` and an `lb_reverse` entry, and the ClientIP affinity
/// table is as large (preallocated LRU hash maps: ~41.5 MB per 100,000 flows on kernel 6.18);
/// every service port in use holds a Maglev ring of 65,537 slots (256 KiB), created when the
/// port is; `slipway lb status` reports the bytes of each map.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct MapSizes {
    /// Service ports (VIP, port, protocol) at once; also the VIPs announced at once.
    #[serde(default = "default_max_services")]
    pub services: u32,
    /// Backend ids: one per service port and backend address, draining ones included.
    #[serde(default = "default_max_backends")]
    pub backends: u32,
    /// Tracked flows; beyond them the least recently used flow is evicted (counted as
    /// `flow_untracked` when its next segment comes).
    #[serde(default = "default_max_flows")]
    pub flows: u32,
}

fn default_max_services() -> u32 {
    MAX_SERVICES
}
fn default_max_backends() -> u32 {
    MAX_BACKENDS
}
fn default_max_flows() -> u32 {
    MAX_FLOWS
}

impl Default for MapSizes {
    fn default() -> Self {
        Self {
            services: default_max_services(),
            backends: default_max_backends(),
            flows: default_max_flows(),
        }
    }
}

/// How the XDP program is attached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum XdpMode {
    /// Generic XDP, run by the kernel's network stack (any device, veths included).
    Skb,
    /// Native XDP, run by the driver.
    Driver,
}

impl From<XdpMode> for aya::programs::XdpMode {
    fn from(mode: XdpMode) -> Self {
        match mode {
            XdpMode::Skb => Self::Skb,
            XdpMode::Driver => Self::Driver,
        }
    }
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

/// One of the LB's programs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LbProgram {
    /// `lb_ingress` of `ebpf/lb.c`.
    Tc,
    /// `lb_xdp` of `ebpf/lb_xdp.c` (loaded with [`AttachPoint::Xdp`]).
    Xdp,
}

/// What one `BPF_PROG_TEST_RUN` gave back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TestRunResult {
    /// The program's verdict (`TC_ACT_*`, `XDP_*`).
    pub verdict: u32,
    /// The frame as the program left it.
    pub frame: Vec<u8>,
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

impl LbDatapath {
    /// Loads the program for `point` into the kernel (not yet attached), its maps sized by
    /// `sizes`. With `pin_dir`, the maps live there on bpffs and maps already pinned there
    /// are reused (if they have the same layout and sizes), so flows survive a restart of
    /// the daemon.
    pub fn load(
        point: AttachPoint,
        pin_dir: Option<&Path>,
        sizes: &MapSizes,
    ) -> Result<Self, DataplaneError> {
        if matches!(point, AttachPoint::Xdp(_)) && pin_dir.is_none() {
            return Err(DataplaneError::Invalid {
                field: "pin directory",
                reason: "XDP mode shares its maps with the TC program through pins: give one",
            });
        }
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
        let mut take = |name: &'static str| {
            bpf.take_map(name).ok_or(DataplaneError::MissingMap {
                object: "lb",
                map: name,
            })
        };
        macro_rules! open {
            ($kind:ident, $name:literal) => {
                $kind::try_from(take($name)?).map_err(|e| map_error($name, "open", e))?
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
    pub fn attach(&mut self, ifname: &str) -> Result<(), DataplaneError> {
        let pin_dir = self.pin_dir.clone();
        let pin = |kind| pin_dir.as_deref().map(|d| link_pin(d, kind, ifname));
        pins::attach_tc(
            classifier(&mut self.bpf)?,
            ifname,
            pin(pins::TC_LINK).as_deref(),
        )?;
        if let (AttachPoint::Xdp(mode), Some(xdp_bpf)) = (self.point, self.xdp_bpf.as_mut()) {
            pins::attach_xdp(
                xdp(xdp_bpf)?,
                ifname,
                mode.into(),
                pin(pins::XDP_LINK).as_deref(),
            )?;
        }
        debug!(ifname, point = ?self.point, pinned = pin_dir.is_some(), "LB program attached");
        Ok(())
    }

    /// The TC program (loaded with [`AttachPoint::Tc`] and [`AttachPoint::Xdp`]).
    pub fn classifier(&mut self) -> Result<&mut SchedClassifier, DataplaneError> {
        classifier(&mut self.bpf)
    }

    /// The XDP program (loaded with [`AttachPoint::Xdp`]).
    pub fn xdp(&mut self) -> Result<&mut Xdp, DataplaneError> {
        match self.xdp_bpf.as_mut() {
            Some(bpf) => xdp(bpf),
            None => Err(DataplaneError::MissingProgram {
                object: "lb",
                program: XDP_PROGRAM,
            }),
        }
    }

    /// Runs `program` once on `frame` with `BPF_PROG_TEST_RUN`, on these maps.
    pub fn test_run(
        &mut self,
        program: LbProgram,
        frame: &[u8],
    ) -> Result<TestRunResult, DataplaneError> {
        // Room for a frame the program makes longer: the run fails if it outgrows the buffer.
        let mut out = vec![0u8; frame.len() + 64];
        let options = TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            repeat: 1,
            ..TestRunOptions::default()
        };
        let (name, result) = match program {
            LbProgram::Tc => (TC_PROGRAM, self.classifier()?.test_run(options)),
            LbProgram::Xdp => (XDP_PROGRAM, self.xdp()?.test_run(options)),
        };
        let result = result.map_err(|source| DataplaneError::Program {
            program: name,
            action: "BPF_PROG_TEST_RUN".into(),
            source: Box::new(source),
        })?;
        out.truncate(result.data_size_out as usize);
        Ok(TestRunResult {
            verdict: result.return_value,
            frame: out,
        })
    }

    pub fn pin_dir(&self) -> Option<&Path> {
        self.pin_dir.as_deref()
    }
}

/// Loads one object (its maps at `pin_dir`, reused if pinned there already) and its program.
fn load_object(
    object: &[u8],
    object_name: &'static str,
    program: &'static str,
    pin_dir: Option<&Path>,
    sizes: &MapSizes,
) -> Result<Ebpf, DataplaneError> {
    let mut loader = EbpfLoader::new();
    for map in pins::MAPS {
        if let Some((_, _, Some(entries))) = pins::layout_of(map, sizes) {
            loader.map_max_entries(map, entries);
        }
    }
    let pin_paths: Vec<(&str, PathBuf)> = match pin_dir {
        Some(dir) => {
            fs::create_dir_all(dir).map_err(|source| DataplaneError::Bpffs {
                path: dir.to_owned(),
                source,
            })?;
            pins::MAPS.iter().map(|m| (*m, dir.join(m))).collect()
        }
        None => Vec::new(),
    };
    for (map, path) in &pin_paths {
        // aya reuses whatever is pinned there; a map of another layout must not be.
        pins::check_pin(map, path, sizes)?;
        loader.map_pin_path(map, path.as_path());
    }
    let mut bpf = loader.load(object).map_err(|source| DataplaneError::Load {
        object: object_name,
        source: Box::new(source),
    })?;
    let load_err = |source| DataplaneError::Program {
        program,
        action: "load".into(),
        source: Box::new(source),
    };
    if program == XDP_PROGRAM {
        xdp(&mut bpf)?.load().map_err(load_err)?;
    } else {
        classifier(&mut bpf)?.load().map_err(load_err)?;
    }
    Ok(bpf)
}

fn classifier(bpf: &mut Ebpf) -> Result<&mut SchedClassifier, DataplaneError> {
    let program = bpf
        .program_mut(TC_PROGRAM)
        .ok_or(DataplaneError::MissingProgram {
            object: "lb",
            program: TC_PROGRAM,
        })?;
    program
        .try_into()
        .map_err(|source| DataplaneError::Program {
            program: TC_PROGRAM,
            action: "expect a TC classifier".into(),
            source: Box::new(source),
        })
}

fn xdp(bpf: &mut Ebpf) -> Result<&mut Xdp, DataplaneError> {
    let program = bpf
        .program_mut(XDP_PROGRAM)
        .ok_or(DataplaneError::MissingProgram {
            object: "lb_xdp",
            program: XDP_PROGRAM,
        })?;
    program
        .try_into()
        .map_err(|source| DataplaneError::Program {
            program: XDP_PROGRAM,
            action: "expect an XDP program".into(),
            source: Box::new(source),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xdp_without_a_pin_directory_is_refused_naming_it() {
        let err = LbDatapath::load(AttachPoint::Xdp(XdpMode::Skb), None, &MapSizes::default())
            .expect_err("XDP needs pins");
        assert!(err.to_string().starts_with("pin directory:"), "{err}");
    }

    #[test]
    fn map_sizes_default_to_the_abi_limits() {
        let sizes: MapSizes = serde_json::from_str(r#"{"flows": 2048}"#).expect("parse");
        assert_eq!(
            sizes,
            MapSizes {
                flows: 2048,
                ..MapSizes::default()
            }
        );
        assert_eq!(MapSizes::default().services, MAX_SERVICES);
        assert!(serde_json::from_str::<MapSizes>(r#"{"flow": 1}"#).is_err());
    }
}
