//! Network namespaces by name, as `ip netns` manages them (`/run/netns/<name>`), and running code
//! inside one. setns(2) changes the namespace of the calling thread only, so the code runs on a
//! scoped thread that enters the namespace and ends with the closure: the caller's thread never
//! leaves its own namespace.

use std::fs::File;
use std::path::{Path, PathBuf};
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
    run_in_path(&path(name), f)
}

/// Runs `f` on a thread inside the network namespace at `netns` (e.g. `/run/netns/x` or
/// `/proc/<pid>/ns/net`) and returns what it returns.
pub fn run_in_path<T: Send>(
    netns: &Path,
    f: impl FnOnce() -> T + Send,
) -> Result<T, DataplaneError> {
    thread::scope(|scope| {
        scope
            .spawn(move || {
                enter_path(netns)?;
                Ok(f())
            })
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}

/// Moves the calling thread into the named network namespace for the rest of its life: for a
/// thread spawned to live there (a daemon's, a test server's). Anything else uses [`run_in`].
pub fn enter(name: &str) -> Result<(), DataplaneError> {
    enter_path(&path(name))
}

/// Like [`enter`], for the namespace at `netns`.
pub fn enter_path(netns: &Path) -> Result<(), DataplaneError> {
    let ns = File::open(netns).map_err(|source| DataplaneError::Syscall {
        call: "open netns",
        source,
    })?;
    setns(&ns, CloneFlags::CLONE_NEWNET).map_err(|errno| DataplaneError::Syscall {
        call: "setns(CLONE_NEWNET)",
        source: errno.into(),
    })
}

/// The ifindex of `ifname` in the calling thread's network namespace.
pub fn ifindex(ifname: &str) -> Result<u32, DataplaneError> {
    nix::net::if_::if_nametoindex(ifname).map_err(|errno| DataplaneError::Syscall {
        call: "if_nametoindex",
        source: errno.into(),
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use std::os::unix::fs::MetadataExt as _;
    use std::process::Command;

    use super::*;

    /// The namespace inode of the calling thread.
    fn own_netns() -> u64 {
        std::fs::metadata("/proc/thread-self/ns/net")
            .expect("own netns")
            .ino()
    }

    /// A namespace made with `ip netns add`, deleted on drop (on panic too).
    pub(crate) struct Scratch(pub(crate) String);

    impl Scratch {
        /// `tag` tells apart the namespaces of tests that run at once.
        pub(crate) fn new(tag: &str) -> Self {
            let name = format!("slipway-{tag}-{}", std::process::id());
            let status = Command::new("ip")
                .args(["netns", "add", &name])
                .status()
                .expect("run ip netns add");
            assert!(status.success(), "ip netns add {name} (needs root)");
            Self(name)
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
        }
    }

    #[test]
    fn a_missing_namespace_is_an_error_naming_the_call() {
        let err = enter("slipway-no-such-namespace").expect_err("no such namespace");
        assert!(err.to_string().contains("open netns"), "{err}");
        let err = run_in("slipway-no-such-namespace", || ()).expect_err("no such namespace");
        assert!(err.to_string().contains("open netns"), "{err}");
    }

    #[test]
    #[cfg_attr(
        not(feature = "privileged"),
        ignore = "privileged: root + netns; run with --ignored"
    )]
    fn code_runs_inside_the_namespace_and_the_caller_stays_out() {
        let ns = Scratch::new("nstest");
        let target = std::fs::metadata(path(&ns.0)).expect("netns pin").ino();
        let before = own_netns();
        assert_ne!(before, target, "the scratch namespace is a new one");
        assert_eq!(run_in(&ns.0, own_netns).expect("run_in"), target);
        let name = ns.0.clone();
        let entered = thread::spawn(move || enter(&name).map(|()| own_netns()))
            .join()
            .expect("thread");
        assert_eq!(entered.expect("enter"), target);
        assert_eq!(own_netns(), before, "the caller never left its namespace");
    }
}
