//! Errors of the dataplane crate.

use std::io;
use std::path::PathBuf;

use aya::maps::MapError;

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
        source: Box<MapError>,
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
    /// A map pinned where the LB keeps its maps has another layout (left by another version
    /// of the LB), which the programs would misread, or another capacity than asked for.
    #[error(
        "pinned map {} has {found}, this LB needs {expected}: another version or other map \
         sizes made it; remove the pin directory (slipway lb teardown) to start afresh",
        path.display()
    )]
    StalePin {
        path: PathBuf,
        found: String,
        expected: String,
    },
    /// A request the datapath cannot carry out as given; `field` names what to change.
    #[error("{field}: {reason}")]
    Invalid {
        field: &'static str,
        reason: &'static str,
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

/// The error of operation `action` (e.g. "insert 10.0.0.1") on map `map`: the one place a map
/// error becomes a [`DataplaneError`].
pub fn map_error(map: &'static str, action: &str, source: MapError) -> DataplaneError {
    DataplaneError::Map {
        map,
        action: action.to_owned(),
        source: Box::new(source),
    }
}

/// Whether `error` says the key is not in the map: aya reports a missing key as `KeyNotFound`
/// from lookups and as ENOENT from deletes.
pub fn is_not_found(error: &MapError) -> bool {
    match error {
        MapError::KeyNotFound => true,
        MapError::SyscallError(e) => e.io_error.raw_os_error() == Some(libc::ENOENT),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_keys_are_recognised_from_lookups_and_deletes() {
        assert!(is_not_found(&MapError::KeyNotFound));
        let enoent = aya::sys::SyscallError {
            call: "bpf_map_delete_elem",
            io_error: io::Error::from_raw_os_error(libc::ENOENT),
        };
        assert!(is_not_found(&MapError::SyscallError(enoent)));
        let eperm = aya::sys::SyscallError {
            call: "bpf_map_update_elem",
            io_error: io::Error::from_raw_os_error(libc::EPERM),
        };
        assert!(!is_not_found(&MapError::SyscallError(eperm)));
        assert!(!is_not_found(&MapError::OutOfBounds {
            index: 1,
            max_entries: 1
        }));
    }

    #[test]
    fn a_map_error_names_the_map_and_the_action() {
        let e = map_error("endpoints", "insert 10.0.0.1", MapError::KeyNotFound);
        assert_eq!(e.to_string(), "map `endpoints`: insert 10.0.0.1");
        assert!(std::error::Error::source(&e).is_some());
    }
}
