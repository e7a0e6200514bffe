//! The mount table (`/proc/self/mountinfo`) and taking down what is mounted below a directory:
//! the CSI node's view of its volumes, and a host's removal (a containerd leaves its sandboxes'
//! shm, netns and rootfs mounts under the host's data dir).

use std::io;
use std::path::{Path, PathBuf};

use nix::mount::{MntFlags, umount2};

use crate::DataplaneError;

/// One line of /proc/self/mountinfo.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountEntry {
    /// Mount point.
    pub target: PathBuf,
    /// Filesystem type.
    pub fstype: String,
    /// Mount source.
    pub source: String,
    /// Per-mount options (`rw`/`ro`, ...).
    pub options: String,
}

impl MountEntry {
    /// Whether the mount is read-only.
    pub fn readonly(&self) -> bool {
        self.options.split(',').any(|o| o == "ro")
    }
}

fn unescape(s: &str) -> String {
    // mountinfo escapes space, tab, newline and backslash as \ooo.
    let mut out = String::new();
    let mut it = s.chars().peekable();
    while let Some(c) = it.next() {
        if c == '\\' {
            let oct: String = it.by_ref().take(3).collect();
            match u8::from_str_radix(&oct, 8) {
                Ok(b) => out.push(b as char),
                Err(_) => {
                    out.push('\\');
                    out.push_str(&oct);
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Parses mountinfo text.
pub fn parse_mountinfo(text: &str) -> Vec<MountEntry> {
    text.lines()
        .filter_map(|l| {
            let (left, right) = l.split_once(" - ")?;
            let mut fields = left.split(' ').skip(4);
            let target = fields.next()?;
            let options = fields.next()?;
            let mut r = right.split(' ');
            let fstype = r.next()?;
            let source = r.next()?;
            Some(MountEntry {
                target: PathBuf::from(unescape(target)),
                fstype: fstype.to_owned(),
                source: unescape(source),
                options: options.to_owned(),
            })
        })
        .collect()
}

/// The mount table of this process's mount namespace.
pub fn mounts() -> io::Result<Vec<MountEntry>> {
    std::fs::read_to_string("/proc/self/mountinfo").map(|t| parse_mountinfo(&t))
}

/// Mounts a tmpfs at `target` (memory-backed, never written to disk: what a pod's Secret and
/// `medium: Memory` volumes live on), `size` bytes at most (the kernel's default, half the
/// memory, when `None`), its root directory with permission bits `mode`.
pub fn mount_tmpfs(target: &Path, size: Option<u64>, mode: u32) -> Result<(), DataplaneError> {
    let mut options = format!("mode={mode:o}");
    if let Some(size) = size {
        options.push_str(&format!(",size={size}"));
    }
    nix::mount::mount(
        Some("tmpfs"),
        target,
        Some("tmpfs"),
        nix::mount::MsFlags::MS_NOSUID | nix::mount::MsFlags::MS_NODEV,
        Some(options.as_str()),
    )
    .map_err(|e| DataplaneError::Syscall {
        call: "mount tmpfs",
        source: io::Error::from(e),
    })
}

/// Whether something is mounted exactly at `target`.
pub fn is_mount_point(target: &Path) -> io::Result<bool> {
    Ok(mounts()?.iter().any(|m| m.target == target))
}

/// Detaches every mount at or below `dir` (deepest first, lazily: a busy mount goes once its
/// last user does); returns how many. Nothing mounted there is not an error.
pub fn unmount_below(dir: &Path) -> Result<usize, DataplaneError> {
    let table = mounts().map_err(|source| DataplaneError::Syscall {
        call: "read /proc/self/mountinfo",
        source,
    })?;
    let mut targets: Vec<PathBuf> = table
        .into_iter()
        .map(|m| m.target)
        .filter(|t| t.starts_with(dir))
        .collect();
    // Deepest first; a path mounted twice is detached twice.
    targets.sort_by_key(|t| std::cmp::Reverse(t.components().count()));
    let mut count = 0;
    for target in targets {
        match umount2(&target, MntFlags::MNT_DETACH) {
            Ok(()) => count += 1,
            // Gone with a parent detached before it.
            Err(nix::errno::Errno::EINVAL | nix::errno::Errno::ENOENT) => {}
            Err(e) => {
                return Err(DataplaneError::Syscall {
                    call: "umount2",
                    source: io::Error::from(e),
                });
            }
        }
    }
    Ok(count)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_lines_parse_with_escapes() {
        let text = "36 35 98:0 / /mnt/a\\040b rw,noatime master:1 - ext4 /dev/loop3 rw,errors=continue\n\
                    37 35 0:40 / /x rw shared:2 - fuse /dev/fuse rw,user_id=0\n";
        let m = parse_mountinfo(text);
        assert_eq!(m.len(), 2);
        assert_eq!(m[0].target, PathBuf::from("/mnt/a b"));
        assert_eq!(
            (m[0].fstype.as_str(), m[0].source.as_str()),
            ("ext4", "/dev/loop3")
        );
        assert_eq!(m[1].fstype, "fuse");
        assert!(!m[0].readonly());
        assert!(parse_mountinfo("1 2 0:1 / /r ro,nosuid - tmpfs t rw\n")[0].readonly());
    }

    #[test]
    #[cfg_attr(
        not(feature = "privileged"),
        ignore = "privileged: mounts; run with --ignored"
    )]
    fn everything_mounted_below_a_directory_is_detached() {
        let dir = std::env::temp_dir().join(format!("slipway-mounts-{}", std::process::id()));
        let nested = dir.join("a/b");
        std::fs::create_dir_all(&nested).expect("dirs");
        let tmpfs = |p: &Path| {
            nix::mount::mount(
                Some("tmpfs"),
                p,
                Some("tmpfs"),
                nix::mount::MsFlags::empty(),
                None::<&str>,
            )
            .expect("mount tmpfs");
        };
        tmpfs(&dir.join("a"));
        std::fs::create_dir_all(&nested).expect("dir inside the tmpfs");
        tmpfs(&nested);
        let below = |d: &Path| {
            mounts()
                .expect("mounts")
                .iter()
                .filter(|m| m.target.starts_with(d))
                .count()
        };
        assert_eq!(below(&dir), 2);
        assert_eq!(unmount_below(&dir).expect("unmount"), 2);
        assert_eq!(below(&dir), 0);
        assert_eq!(unmount_below(&dir).expect("nothing left"), 0);
        std::fs::remove_dir_all(&dir).expect("clean up");
    }
}
