//! The one seam to the node's kernel interfaces: loop devices, mkfs, mount and umount, filesystem
//! growth, statvfs and the mount table. Everything here runs a standard tool or reads /proc.

use std::path::Path;
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

/// Attaches a loop device to `file` in direct-I/O mode (the loop device keeps many requests in
/// flight on its file and no second page cache; the kernel falls back to buffered I/O on a file
/// that cannot do direct I/O); returns the device path.
pub fn loop_attach(file: &Path) -> Result<String, CsiError> {
    let f = file.to_string_lossy();
    Ok(run("losetup", &["--find", "--show", "--direct-io=on", &f])?
        .trim()
        .to_owned())
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

pub use slipway_dataplane::mounts::{MountEntry, parse_mountinfo};

/// The mount table of this process's mount namespace.
pub fn mounts() -> Result<Vec<MountEntry>, CsiError> {
    slipway_dataplane::mounts::mounts().map_err(CsiError::io("read", "/proc/self/mountinfo"))
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

/// The size of the ext4 filesystem on `dev`, from its superblock (`dumpe2fs -h`).
fn ext4_size(dev: &str) -> Result<u64, CsiError> {
    let text = run("dumpe2fs", &["-h", dev])?;
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().parse::<u64>().ok())
    };
    field("Block count:")
        .zip(field("Block size:"))
        .map(|(count, size)| count * size)
        .ok_or_else(|| CsiError::Command {
            command: format!("dumpe2fs -h {dev}"),
            output: "no block count or block size".into(),
        })
}

/// Grows the filesystem mounted at `mountpoint` from `dev` to the device's size (online); an
/// ext4 filesystem that already fills its device is left as it is.
pub fn grow_fs(fs: &str, dev: &str, mountpoint: &Path) -> Result<(), CsiError> {
    if fs == "ext4" && ext4_size(dev)? + 4096 > device_size(Path::new(dev))? {
        return Ok(());
    }
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
