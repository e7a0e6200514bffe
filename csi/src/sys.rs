//! The one seam to the node's kernel interfaces: loop devices, mkfs, mount and umount, filesystem
//! growth, statvfs and the mount table. Everything here runs a standard tool or reads /proc.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::capability::FsType;
use crate::error::CsiError;

/// Runs a tool; its stdout on success, an error naming the command and its stderr otherwise.
pub fn run(tool: &str, args: &[&str]) -> Result<String, CsiError> {
    let line = || format!("{tool} {}", args.join(" "));
    let out = Command::new(tool)
        .args(args)
        .output()
        .map_err(|e| CsiError::Command {
            command: line(),
            output: e.to_string(),
        })?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(CsiError::Command {
            command: line(),
            output: format!(
                "{}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        })
    }
}

/// Attaches a loop device to `file`; returns the device path.
pub fn loop_attach(file: &Path) -> Result<String, CsiError> {
    let f = file.to_string_lossy();
    Ok(run("losetup", &["--find", "--show", &f])?.trim().to_owned())
}

/// Detaches a loop device.
pub fn loop_detach(dev: &str) -> Result<(), CsiError> {
    run("losetup", &["--detach", dev]).map(drop)
}

/// Makes the loop device re-read its backing file's size.
pub fn loop_set_capacity(dev: &str) -> Result<(), CsiError> {
    run("losetup", &["--set-capacity", dev]).map(drop)
}

/// Loop devices whose backing file is `file`.
pub fn loops_backed_by(file: &Path) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir("/sys/block") else {
        return Vec::new();
    };
    entries
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().starts_with("loop"))
        .filter(|e| {
            std::fs::read_to_string(e.path().join("loop/backing_file"))
                .is_ok_and(|b| Path::new(b.trim()) == file)
        })
        .map(|e| format!("/dev/{}", e.file_name().to_string_lossy()))
        .collect()
}

/// The filesystem on `dev`, or None if it is blank.
pub fn fs_type(dev: &str) -> Result<Option<String>, CsiError> {
    let out = Command::new("blkid")
        .args(["-p", "-o", "value", "-s", "TYPE", dev])
        .output()
        .map_err(|e| CsiError::Command {
            command: format!("blkid {dev}"),
            output: e.to_string(),
        })?;
    // blkid exits 2 when it finds nothing.
    match out.status.code() {
        Some(0) => Ok(Some(String::from_utf8_lossy(&out.stdout).trim().to_owned())),
        Some(2) => Ok(None),
        _ => Err(CsiError::Command {
            command: format!("blkid -p {dev}"),
            output: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        }),
    }
}

/// Makes a filesystem on `dev`.
pub fn mkfs(fs: FsType, dev: &str) -> Result<(), CsiError> {
    match fs {
        // No discard pass: the block store's volumes start thin.
        FsType::Ext4 => run("mkfs.ext4", &["-q", "-E", "nodiscard", dev]).map(drop),
        FsType::Xfs => run("mkfs.xfs", &["-q", "-K", dev]).map(drop),
    }
}

/// Mounts `dev` at `target`.
pub fn mount(dev: &str, target: &Path, fs: &str, options: &[String]) -> Result<(), CsiError> {
    let t = target.to_string_lossy();
    let mut args = vec!["-t", fs];
    let opts = options.join(",");
    if !opts.is_empty() {
        args.extend(["-o", &opts]);
    }
    args.extend([dev, &t]);
    run("mount", &args).map(drop)
}

/// Bind-mounts `source` on `target`, read-only if asked.
pub fn bind(source: &Path, target: &Path, readonly: bool) -> Result<(), CsiError> {
    let (s, t) = (source.to_string_lossy(), target.to_string_lossy());
    run("mount", &["--bind", &s, &t])?;
    if readonly {
        run("mount", &["-o", "remount,bind,ro", &t])?;
    }
    Ok(())
}

/// Unmounts `target`.
pub fn umount(target: &Path) -> Result<(), CsiError> {
    run("umount", &[&target.to_string_lossy()]).map(drop)
}

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
pub fn mounts() -> Result<Vec<MountEntry>, CsiError> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .map(|t| parse_mountinfo(&t))
        .map_err(CsiError::io("read", "/proc/self/mountinfo"))
}

/// The topmost mount at `target`, if any.
pub fn mounted_at(target: &Path) -> Result<Option<MountEntry>, CsiError> {
    Ok(mounts()?.into_iter().rev().find(|m| m.target == target))
}

/// `CAP_SYS_RESOURCE`: ext4's online resize ioctl demands it.
pub const CAP_SYS_RESOURCE: u32 = 24;

/// Whether this process holds capability `cap` (effective set, /proc/self/status).
pub fn has_capability(cap: u32) -> bool {
    std::fs::read_to_string("/proc/self/status").is_ok_and(|s| status_has_capability(&s, cap))
}

fn status_has_capability(status: &str, cap: u32) -> bool {
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .is_some_and(|mask| cap < 64 && mask & (1 << cap) != 0)
}

/// Grows the filesystem mounted at `mountpoint` from `dev` to the device's size (online).
pub fn grow_fs(fs: &str, dev: &str, mountpoint: &Path) -> Result<(), CsiError> {
    match fs {
        "xfs" => run("xfs_growfs", &[&mountpoint.to_string_lossy()]).map(drop),
        "ext4" if !has_capability(CAP_SYS_RESOURCE) => Err(CsiError::FailedPrecondition(
            "growing ext4 online needs CAP_SYS_RESOURCE, which the node plugin lacks \
             (the kernel refuses EXT4_IOC_RESIZE_FS with EPERM); grant it or use xfs"
                .into(),
        )),
        "ext4" => run("resize2fs", &[dev]).map(drop),
        other => Err(CsiError::FailedPrecondition(format!(
            "cannot grow a {other} filesystem online"
        ))),
    }
}

/// Size of a block device (or a file bind-mounted from one) in bytes.
pub fn device_size(dev: &Path) -> Result<u64, CsiError> {
    use std::io::{Seek, SeekFrom};
    std::fs::File::open(dev)
        .and_then(|mut f| f.seek(SeekFrom::End(0)))
        .map_err(CsiError::io("size of", dev.display()))
}

/// Whether a process is alive (and not a zombie).
pub fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .map(|(_, r)| r.trim_start().starts_with('Z'))
        })
        .is_some_and(|zombie| !zombie)
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
    fn capabilities_read_from_proc() {
        // This machine's root: every capability but CAP_SYS_RESOURCE.
        let status = "Name:\tx\nCapPrm:\t000001ffffffffff\nCapEff:\t000001fffeffffff\n";
        assert!(status_has_capability(status, 21));
        assert!(!status_has_capability(status, CAP_SYS_RESOURCE));
        assert!(!status_has_capability(status, 63));
        assert!(!status_has_capability("Name:\tx\n", 21));
        assert!(!has_capability(63));
    }

    #[test]
    fn this_process_is_alive() {
        assert!(alive(std::process::id()));
        assert!(!alive(u32::MAX));
    }
}
