//! The kernel's run-time accounting of the LB programs (`BPF_ENABLE_STATS`): what the benchmark
//! reads the LB's CPU cost from.

use std::os::fd::OwnedFd;
use std::time::Duration;

use super::{TC_PROGRAM, XDP_PROGRAM};
use crate::DataplaneError;

/// Turns on the kernel's run-time accounting of BPF programs (`BPF_ENABLE_STATS`) for as long
/// as the returned descriptor lives.
pub fn enable_run_time_stats() -> Result<OwnedFd, DataplaneError> {
    aya::sys::enable_stats(aya::sys::Stats::RunTime).map_err(|e| DataplaneError::Syscall {
        call: "bpf(BPF_ENABLE_STATS)",
        source: e.io_error,
    })
}

/// CPU time spent in, and runs of, every loaded LB program (TC and XDP), as the kernel counts
/// them while run-time stats are enabled.
pub fn run_time() -> Result<(Duration, u64), DataplaneError> {
    let tc = run_time_of(TC_PROGRAM)?;
    let xdp = run_time_of(XDP_PROGRAM)?;
    Ok((tc.0 + xdp.0, tc.1 + xdp.1))
}

/// Likewise for the loaded programs named `program` ("lb_ingress" at TC, "lb_xdp").
pub fn run_time_of(program: &str) -> Result<(Duration, u64), DataplaneError> {
    let mut total = (Duration::ZERO, 0);
    for info in aya::programs::loaded_programs() {
        let info = info.map_err(|source| DataplaneError::Program {
            program: TC_PROGRAM,
            action: "list loaded programs".into(),
            source: Box::new(source),
        })?;
        if info.name_as_str() == Some(program) {
            total.0 += info.run_time();
            total.1 += info.run_count();
        }
    }
    Ok(total)
}
