//! Network namespaces by name, as `ip netns` manages them (`/run/netns/<name>`), and running code
//! inside one. setns(2) changes the namespace of the calling thread only, so the code runs on a
//! scoped thread that enters the namespace and ends with the closure: the caller's thread never
//! leaves its own namespace.

use std::fs::File;
use std::path::PathBuf;
use std::thread;

use nix::sched::{CloneFlags, setns};

use crate::DataplaneError;

/// Where `ip netns add` keeps the bind mounts that name namespaces.
pub const NETNS_RUN_DIR: &str = "/run/netns";

/// The bind-mount path of the named namespace.
pub fn path(name: &str) -> PathBuf {
    PathBuf::from(NETNS_RUN_DIR).join(name)
}

/// Runs `f` on a thread inside the named network namespace and returns what it returns.
pub fn run_in<T: Send>(name: &str, f: impl FnOnce() -> T + Send) -> Result<T, DataplaneError> {
    let ns = File::open(path(name)).map_err(|source| DataplaneError::Syscall {
        call: "open netns",
        source,
    })?;
    thread::scope(|scope| {
        scope
            .spawn(move || {
                setns(&ns, CloneFlags::CLONE_NEWNET).map_err(|errno| DataplaneError::Syscall {
                    call: "setns(CLONE_NEWNET)",
                    source: errno.into(),
                })?;
                Ok(f())
            })
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}

/// The ifindex of `ifname` in the calling thread's network namespace.
pub fn ifindex(ifname: &str) -> Result<u32, DataplaneError> {
    nix::net::if_::if_nametoindex(ifname).map_err(|errno| DataplaneError::Syscall {
        call: "if_nametoindex",
        source: errno.into(),
    })
}
