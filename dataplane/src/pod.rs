//! The pod-veth datapath (`ebpf/pod_veth.c`): loading it, attaching it with TCX to the host side
//! of pod veths, and its two maps: `endpoints` (pod IP -> where to deliver) and the per-CPU
//! `counters`.

use std::collections::BTreeMap;
use std::fs;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use aya::maps::{HashMap, MapData, PerCpuHashMap};
use aya::programs::{SchedClassifier, TcAttachType};
use aya::{Ebpf, EbpfLoader};
use tracing::debug;

use crate::DataplaneError;
use crate::abi::{CounterKey, CounterValue, EndpointInfo, EndpointKey};
use crate::error::{is_not_found, map_error};
use crate::objects;

const OBJECT: &str = "pod_veth";
const PROGRAM: &str = "from_pod";
const ENDPOINTS: &str = "endpoints";
const COUNTERS: &str = "counters";

/// The loaded pod-veth program and its maps.
pub struct PodDatapath {
    bpf: Ebpf,
    endpoints: HashMap<MapData, EndpointKey, EndpointInfo>,
    counters: PerCpuHashMap<MapData, CounterKey, CounterValue>,
    pin_dir: Option<PathBuf>,
}

impl std::fmt::Debug for PodDatapath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PodDatapath")
            .field("pin_dir", &self.pin_dir)
            .finish_non_exhaustive()
    }
}

impl PodDatapath {
    /// Loads the program into the kernel. With `pin_dir`, the maps live at `<pin_dir>/endpoints`
    /// and `<pin_dir>/counters` on bpffs; maps already pinned there are reused, which is how a
    /// restarted agent finds the state its predecessor left.
    pub fn load(pin_dir: Option<&Path>) -> Result<Self, DataplaneError> {
        let mut loader = EbpfLoader::new();
        let (endpoints_pin, counters_pin);
        if let Some(dir) = pin_dir {
            fs::create_dir_all(dir).map_err(|source| DataplaneError::Bpffs {
                path: dir.to_owned(),
                source,
            })?;
            endpoints_pin = dir.join(ENDPOINTS);
            counters_pin = dir.join(COUNTERS);
            loader.map_pin_path(ENDPOINTS, endpoints_pin.as_path());
            loader.map_pin_path(COUNTERS, counters_pin.as_path());
        }
        let mut bpf = loader
            .load(objects::POD_VETH)
            .map_err(|source| DataplaneError::Load {
                object: OBJECT,
                source: Box::new(source),
            })?;

        let program = classifier(&mut bpf)?;
        program.load().map_err(|source| DataplaneError::Program {
            program: PROGRAM,
            action: "load".into(),
            source: Box::new(source),
        })?;

        let endpoints = take_map(&mut bpf, ENDPOINTS)?;
        let endpoints =
            HashMap::try_from(endpoints).map_err(|source| map_error(ENDPOINTS, "open", source))?;
        let counters = take_map(&mut bpf, COUNTERS)?;
        let counters = PerCpuHashMap::try_from(counters)
            .map_err(|source| map_error(COUNTERS, "open", source))?;
        debug!(pin_dir = ?pin_dir, "pod-veth datapath loaded");
        Ok(Self {
            bpf,
            endpoints,
            counters,
            pin_dir: pin_dir.map(Path::to_owned),
        })
    }

    /// Attaches the program with TCX at ingress of `ifname` (the host side of a pod veth) in the
    /// calling thread's network namespace. The link lives as long as this value.
    pub fn attach(&mut self, ifname: &str) -> Result<(), DataplaneError> {
        classifier(&mut self.bpf)?
            .attach(ifname, TcAttachType::Ingress)
            .map_err(|source| DataplaneError::Program {
                program: PROGRAM,
                action: format!("attach to {ifname}"),
                source: Box::new(source),
            })?;
        debug!(ifname, "attached at tcx ingress");
        Ok(())
    }

    /// The loaded program, e.g. for `BPF_PROG_TEST_RUN`.
    pub fn program(&mut self) -> Result<&mut SchedClassifier, DataplaneError> {
        classifier(&mut self.bpf)
    }

    /// Adds or replaces the endpoint for `ip`.
    pub fn upsert_endpoint(
        &mut self,
        ip: Ipv4Addr,
        info: EndpointInfo,
    ) -> Result<(), DataplaneError> {
        self.endpoints
            .insert(EndpointKey::new(ip), info, 0)
            .map_err(|source| map_error(ENDPOINTS, &format!("insert {ip}"), source))
    }

    /// Removes the endpoint for `ip`; removing an absent endpoint is not an error.
    pub fn remove_endpoint(&mut self, ip: Ipv4Addr) -> Result<(), DataplaneError> {
        match self.endpoints.remove(&EndpointKey::new(ip)) {
            Err(source) if !is_not_found(&source) => {
                Err(map_error(ENDPOINTS, &format!("remove {ip}"), source))
            }
            _ => Ok(()),
        }
    }

    /// The endpoint for `ip`, if any.
    pub fn endpoint(&self, ip: Ipv4Addr) -> Result<Option<EndpointInfo>, DataplaneError> {
        match self.endpoints.get(&EndpointKey::new(ip), 0) {
            Ok(info) => Ok(Some(info)),
            Err(source) if is_not_found(&source) => Ok(None),
            Err(source) => Err(map_error(ENDPOINTS, &format!("get {ip}"), source)),
        }
    }

    /// Every counter, summed over the CPUs.
    pub fn counters(&self) -> Result<BTreeMap<CounterKey, CounterValue>, DataplaneError> {
        let mut totals = BTreeMap::new();
        for entry in self.counters.iter() {
            let (key, per_cpu) = entry.map_err(|source| map_error(COUNTERS, "iterate", source))?;
            let total: &mut CounterValue = totals.entry(key).or_default();
            for value in per_cpu.iter() {
                *total += *value;
            }
        }
        Ok(totals)
    }

    /// Where the maps are pinned, if they are.
    pub fn pin_dir(&self) -> Option<&Path> {
        self.pin_dir.as_deref()
    }
}

fn classifier(bpf: &mut Ebpf) -> Result<&mut SchedClassifier, DataplaneError> {
    let program = bpf
        .program_mut(PROGRAM)
        .ok_or(DataplaneError::MissingProgram {
            object: OBJECT,
            program: PROGRAM,
        })?;
    program
        .try_into()
        .map_err(|source| DataplaneError::Program {
            program: PROGRAM,
            action: "expect a TC classifier".into(),
            source: Box::new(source),
        })
}

fn take_map(bpf: &mut Ebpf, name: &'static str) -> Result<aya::maps::Map, DataplaneError> {
    bpf.take_map(name).ok_or(DataplaneError::MissingMap {
        object: OBJECT,
        map: name,
    })
}
