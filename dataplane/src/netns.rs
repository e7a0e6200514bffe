//! Network namespaces by name, as `ip netns` manages them (`/run/netns/<name>`), and running code
//! inside one. setns(2) changes the namespace of the calling thread only, so the code runs on a
//! scoped thread that enters the namespace and ends with the closure: the caller's thread never
//! leaves its own namespace. Namespaces are created and deleted here too, as `ip netns add` and
//! `ip netns del` do (a bind mount of the namespace at `/run/netns/<name>`), without running `ip`.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::thread;

use nix::mount::{MntFlags, MsFlags, mount, umount2};
use nix::sched::{CloneFlags, setns, unshare};

use crate::DataplaneError;

/// Where `ip netns add` keeps the bind mounts that name namespaces.
pub const NETNS_RUN_DIR: &str = "/run/netns";

/// The bind-mount path of the named namespace.
pub fn path(name: &str) -> PathBuf {
    PathBuf::from(NETNS_RUN_DIR).join(name)
}

/// Whether the named namespace exists (its bind mount or at least its file under `/run/netns`).
pub fn exists(name: &str) -> bool {
    path(name).exists()
}

/// Creates the named network namespace, as `ip netns add` does: a fresh namespace bind-mounted
/// at `/run/netns/<name>`. Fails if the name is taken. Nothing is left behind on failure.
pub fn create(name: &str) -> Result<(), DataplaneError> {
    if name.is_empty() || name.contains('/') || name == "." || name == ".." {
        return Err(DataplaneError::Invalid {
            field: "netns name",
            reason: "must be a non-empty file name",
        });
    }
    fs::create_dir_all(NETNS_RUN_DIR).map_err(|source| DataplaneError::Syscall {
        call: "mkdir /run/netns",
        source,
    })?;
    share_run_dir()?;
    let target = path(name);
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&target)
        .map_err(|source| DataplaneError::Syscall {
            call: "create netns file",
            source,
        })?;
    // unshare(CLONE_NEWNET) moves only the calling thread, which ends right after the bind
    // mount has given the namespace its name.
    let made = thread::scope(|scope| {
        scope
            .spawn(|| {
                unshare(CloneFlags::CLONE_NEWNET).map_err(|errno| DataplaneError::Syscall {
                    call: "unshare(CLONE_NEWNET)",
                    source: errno.into(),
                })?;
                mount(
                    Some("/proc/thread-self/ns/net"),
                    &target,
                    None::<&str>,
                    MsFlags::MS_BIND,
                    None::<&str>,
                )
                .map_err(|errno| DataplaneError::Syscall {
                    call: "bind-mount netns",
                    source: errno.into(),
                })
            })
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    });
    if made.is_err() {
        let _ = fs::remove_file(&target);
    }
    made
}

/// Makes `/run/netns` a shared mount (a bind mount of itself first, if it is not a mount point),
/// as `ip netns add` does: names made later propagate to other mount namespaces, and so do
/// their unmounts, which would otherwise keep deleted namespaces alive there.
fn share_run_dir() -> Result<(), DataplaneError> {
    let share = || {
        mount(
            None::<&str>,
            NETNS_RUN_DIR,
            Some("none"),
            MsFlags::MS_SHARED | MsFlags::MS_REC,
            None::<&str>,
        )
    };
    let result = match share() {
        Err(nix::errno::Errno::EINVAL) => mount(
            Some(NETNS_RUN_DIR),
            NETNS_RUN_DIR,
            Some("none"),
            MsFlags::MS_BIND | MsFlags::MS_REC,
            None::<&str>,
        )
        .and_then(|()| share()),
        other => other,
    };
    result.map_err(|errno| DataplaneError::Syscall {
        call: "make /run/netns a shared mount",
        source: errno.into(),
    })
}

/// Deletes the named namespace's name, as `ip netns del` does; an absent name is not an error.
/// The namespace itself goes when nothing else holds it (kill its processes first, see
/// [`pids`]); its veths go with it.
pub fn delete(name: &str) -> Result<(), DataplaneError> {
    let target = path(name);
    match umount2(&target, MntFlags::MNT_DETACH) {
        // EINVAL: not a mount point (a half-made name); ENOENT: no such name.
        Ok(()) | Err(nix::errno::Errno::EINVAL) | Err(nix::errno::Errno::ENOENT) => {}
        Err(errno) => {
            return Err(DataplaneError::Syscall {
                call: "umount netns",
                source: errno.into(),
            });
        }
    }
    match fs::remove_file(&target) {
        Err(source) if source.kind() != io::ErrorKind::NotFound => Err(DataplaneError::Syscall {
            call: "remove netns file",
            source,
        }),
        _ => Ok(()),
    }
}

/// Kills (SIGKILL) every process in the named namespace, waits until they are gone, and
/// deletes the name; an absent namespace is not an error.
pub fn destroy(name: &str) -> Result<(), DataplaneError> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let pids = pids(name);
        if pids.is_empty() {
            return delete(name);
        }
        for pid in &pids {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(*pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        if std::time::Instant::now() >= deadline {
            return Err(DataplaneError::Command {
                command: format!("kill the processes in namespace {name}"),
                detail: format!("{pids:?} still there after SIGKILL"),
            });
        }
        thread::sleep(std::time::Duration::from_millis(10));
    }
}

/// The processes whose network namespace is the named one (as `ip netns pids`), from the process
/// table. Empty when the namespace does not exist.
pub fn pids(name: &str) -> Vec<i32> {
    let Ok(target) = fs::metadata(path(name)) else {
        return Vec::new();
    };
    pids_in_netns(target.dev(), target.ino())
}

/// The processes in the network namespace with device `dev` and inode `ino` (as `stat` of
/// `/proc/<pid>/ns/net` shows them).
pub fn pids_in_netns(dev: u64, ino: u64) -> Vec<i32> {
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            fs::metadata(format!("/proc/{pid}/ns/net"))
                .is_ok_and(|m| m.dev() == dev && m.ino() == ino)
        })
        .collect()
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
    use std::process::Command;

    use super::*;

    /// The namespace inode of the calling thread.
    fn own_netns() -> u64 {
        fs::metadata("/proc/thread-self/ns/net")
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
        let target = fs::metadata(path(&ns.0)).expect("netns pin").ino();
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

    #[test]
    #[cfg_attr(
        not(feature = "privileged"),
        ignore = "privileged: root + netns; run with --ignored"
    )]
    fn create_and_delete_name_a_new_namespace_and_leave_nothing() {
        let name = format!("slipway-nscreate-{}", std::process::id());
        /// Deletes the namespace even if an assertion fails.
        struct Guard(String);
        impl Drop for Guard {
            fn drop(&mut self) {
                let _ = delete(&self.0);
            }
        }
        let guard = Guard(name.clone());
        create(&name).expect("create");
        assert!(exists(&name));
        let err = create(&name).expect_err("the name is taken");
        assert!(err.to_string().contains("create netns file"), "{err}");
        let target = fs::metadata(path(&name)).expect("pin").ino();
        assert_ne!(target, own_netns(), "a new namespace");
        assert_eq!(run_in(&name, own_netns).expect("run_in"), target);
        // `ip` sees it as one of its own.
        let out = Command::new("ip")
            .args(["-n", &name, "link", "show", "lo"])
            .output()
            .expect("ip");
        assert!(out.status.success(), "{out:?}");
        assert!(pids(&name).is_empty());
        delete(&name).expect("delete");
        assert!(!exists(&name));
        delete(&name).expect("deleting an absent name is not an error");
        drop(guard);
        assert!(create("a/b").is_err());
    }
}
