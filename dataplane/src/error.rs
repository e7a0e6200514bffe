//! Errors of the dataplane crate.

use std::io;
use std::path::PathBuf;

/// Everything that can go wrong while loading, attaching or driving the datapath.
// The aya errors are boxed: they are large, and every fallible call here returns this type.
#[derive(Debug, thiserror::Error)]
pub enum DataplaneError {
    /// The BPF object could not be parsed or loaded (verifier rejection included).
    #[error("loading BPF object {object}")]
    Load {
        object: &'static str,
        #[source]
        source: Box<aya::EbpfError>,
    },
    /// The object lacks a program the code expects: the build and the code disagree.
    #[error("BPF object {object} has no program `{program}`")]
    MissingProgram {
        object: &'static str,
        program: &'static str,
    },
    /// The object lacks a map the code expects.
    #[error("BPF object {object} has no map `{map}`")]
    MissingMap {
        object: &'static str,
        map: &'static str,
    },
    /// A program could not be loaded into the kernel or attached.
    #[error("program `{program}`: {action}")]
    Program {
        program: &'static str,
        action: String,
        #[source]
        source: Box<aya::programs::ProgramError>,
    },
    /// A map operation failed.
    #[error("map `{map}`: {action}")]
    Map {
        map: &'static str,
        action: String,
        #[source]
        source: Box<aya::maps::MapError>,
    },
    /// A table refused an insert because it holds as many entries as it was created for.
    #[error("table `{map}` is full ({capacity} entries)")]
    TableFull { map: &'static str, capacity: u32 },
    /// A path under bpffs could not be created or removed.
    #[error("bpffs path {path}")]
    Bpffs {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// A system call failed; `call` names it.
    #[error("{call}")]
    Syscall {
        call: &'static str,
        #[source]
        source: io::Error,
    },
    /// A netlink request failed.
    #[error("netlink: {what}: {detail}")]
    Netlink { what: String, detail: String },
    /// An external command (ip, iperf3, ...) failed.
    #[error("`{command}` failed: {detail}")]
    Command { command: String, detail: String },
    /// Output of an external command could not be understood.
    #[error("could not parse the output of `{command}`: {detail}")]
    Parse { command: String, detail: String },
}
