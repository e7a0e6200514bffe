//! The LB's objects on bpffs: which maps are pinned and what a pinned map must look like to be
//! reused, the links pinned per interface (so the datapath outlives the daemon), and tearing
//! it all down.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use aya::maps::MapInfo;
use aya::maps::lpm_trie::Key;
use aya::programs::links::{FdLink, PinnedLink};
use aya::programs::tc::SchedClassifierLink;
use aya::programs::xdp::XdpLink;
use aya::programs::{ProgramError, SchedClassifier, TcAttachType, Xdp, XdpMode, loaded_links};

use super::{MapSizes, TC_PROGRAM, XDP_PROGRAM};
use crate::DataplaneError;
use crate::abi::CounterValue;
use crate::abi::lb::{
    LbAffinity, LbAffinityKey, LbBackend, LbConfig, LbFlow, LbFlowKey, LbReverse, LbService,
    LbServiceKey, LbSourceRange, LbStats, LbVip, LbVipKey,
};
use crate::error::map_error;

/// Every map of the object (ebpf/include/lb_maps.h), pinned under these names.
pub(super) const MAPS: [&str; 12] = [
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

/// Pin names of the links: `link_<kind>_<ifname>` in the pin directory.
pub(super) const TC_LINK: &str = "tc";
pub(super) const XDP_LINK: &str = "xdp";

/// (key, value) sizes and capacity of every map, from the ABI mirrors (checked against the
/// objects' BTF) and the sizes asked for: what a map pinned under its name must have to be
/// reused.
pub(super) fn layout_of(map: &str, sizes: &MapSizes) -> Option<(usize, usize, Option<u32>)> {
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
pub(super) fn check_pin(map: &str, path: &Path, sizes: &MapSizes) -> Result<(), DataplaneError> {
    let (Some((key, value, entries)), true) = (layout_of(map, sizes), path.exists()) else {
        return Ok(());
    };
    let info = MapInfo::from_pin(path)
        .map_err(|e| map_error("pinned map", &format!("inspect {}", path.display()), e))?;
    let found = (info.key_size() as usize, info.value_size() as usize);
    if found != (key, value) {
        return Err(DataplaneError::StalePin {
            path: path.to_owned(),
            found: format!("{found:?} (key, value) bytes"),
            expected: format!("{:?}", (key, value)),
        });
    }
    if let Some(entries) = entries
        && info.max_entries() != entries
    {
        return Err(DataplaneError::StalePin {
            path: path.to_owned(),
            found: format!("{} entries", info.max_entries()),
            expected: format!("{entries} (the map sizes asked for)"),
        });
    }
    Ok(())
}

/// Where the link of `kind` ("tc", "xdp") on `ifname` is pinned.
pub fn link_pin(pin_dir: &Path, kind: &str, ifname: &str) -> PathBuf {
    pin_dir.join(format!("link_{kind}_{ifname}"))
}

fn attach_err(program: &'static str, action: String, source: ProgramError) -> DataplaneError {
    DataplaneError::Program {
        program,
        action,
        source: Box::new(source),
    }
}

fn pin_err(
    path: &Path,
    source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
) -> DataplaneError {
    DataplaneError::Bpffs {
        path: path.to_owned(),
        source: std::io::Error::other(source),
    }
}

/// The link pinned at `pin`, if there is one, as a link of program type `L`.
fn pinned_link<L>(pin: Option<&Path>) -> Result<Option<L>, DataplaneError>
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
fn pin_link(pin: &Path, link: FdLink) -> Result<(), DataplaneError> {
    remove_file(pin)?;
    link.pin(pin).map_err(|e| pin_err(pin, e))?;
    Ok(())
}

fn remove_file(path: &Path) -> Result<(), DataplaneError> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(pin_err(path, e)),
        _ => Ok(()),
    }
}

/// Attaches the TC program at TCX ingress of `ifname`, or swaps it into the link pinned at
/// `pin`; pins the link there.
pub(super) fn attach_tc(
    program: &mut SchedClassifier,
    ifname: &str,
    pin: Option<&Path>,
) -> Result<(), DataplaneError> {
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
pub(super) fn attach_xdp(
    program: &mut Xdp,
    ifname: &str,
    mode: XdpMode,
    pin: Option<&Path>,
) -> Result<(), DataplaneError> {
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
pub fn remove_pins(pin_dir: &Path) -> Result<Vec<PathBuf>, DataplaneError> {
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
const DETACH_TIMEOUT: Duration = Duration::from_secs(5);

/// Unpins the link at `pin` and waits until the kernel has detached it: a pin's reference is
/// dropped only after an RCU grace period (bpffs frees its inodes so), so the program may run
/// a moment after the file is gone.
fn remove_link(pin: &Path) -> Result<(), DataplaneError> {
    let link = PinnedLink::from_pin(pin)
        .map_err(|e| pin_err(pin, e))?
        .unpin()
        .map_err(|e| pin_err(pin, e))?;
    let id = link.info().map_err(|e| pin_err(pin, e))?.id();
    drop(link);
    let deadline = Instant::now() + DETACH_TIMEOUT;
    loop {
        let alive = loaded_links().any(|l| l.is_ok_and(|l| l.id() == id));
        if !alive {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(pin_err(
                pin,
                format!("link {id} still attached {DETACH_TIMEOUT:?} after unpinning"),
            ));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_map_has_a_layout_and_the_sized_ones_follow_the_sizes() {
        let sizes = MapSizes {
            services: 3,
            backends: 5,
            flows: 7,
        };
        for map in MAPS {
            let (key, value, entries) =
                layout_of(map, &sizes).unwrap_or_else(|| panic!("{map} has no layout"));
            assert!(key > 0 && value > 0, "{map}");
            if let Some(entries) = entries {
                assert!([3, 5, 7].contains(&entries), "{map}: {entries}");
            }
        }
        assert_eq!(layout_of("lb_flows", &sizes).map(|l| l.2), Some(Some(7)));
        assert_eq!(layout_of("no_such_map", &sizes), None);
    }

    #[test]
    fn links_are_pinned_per_kind_and_interface() {
        assert_eq!(
            link_pin(Path::new("/sys/fs/bpf/lb"), TC_LINK, "eth0"),
            Path::new("/sys/fs/bpf/lb/link_tc_eth0")
        );
    }

    #[test]
    fn a_missing_pin_directory_is_nothing_to_remove() {
        let dir = Path::new("/nonexistent/slipway-lb-pins");
        assert_eq!(
            remove_pins(dir).expect("nothing to do"),
            Vec::<PathBuf>::new()
        );
    }
}
