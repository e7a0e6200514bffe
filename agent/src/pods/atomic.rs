//! kubelet's atomic writer for a volume's files (configMap and secret volumes): the payload is
//! written into a fresh hidden directory named after its digest, the symlink `..data` is
//! swapped to it in one rename, and each visible top-level entry is a symlink through `..data`.
//! A reader sees the old files or the new ones, never a mix.

use std::collections::HashSet;
use std::io;
use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;

/// Files to write: (relative path, content, mode).
pub type Files = Vec<(String, Vec<u8>, u32)>;

/// A digest of a payload (its directory's name: the same payload is never written twice).
fn digest(files: &Files) -> String {
    use sha2::{Digest as _, Sha256};
    let mut h = Sha256::new();
    for (path, content, mode) in files {
        h.update(path.as_bytes());
        h.update([0]);
        h.update(mode.to_le_bytes());
        h.update((content.len() as u64).to_le_bytes());
        h.update(content);
    }
    h.finalize()
        .iter()
        .take(8)
        .map(|b| format!("{b:02x}"))
        .collect()
}

const DATA_LINK: &str = "..data";

/// Writes `files` into `dir` atomically (see the module's description); nothing changes when
/// `..data` already holds them.
pub fn write_atomically(dir: &Path, files: &Files) -> io::Result<()> {
    let name = format!("..{}", digest(files));
    let link = dir.join(DATA_LINK);
    let current = std::fs::read_link(&link).ok();
    if current.as_deref() == Some(Path::new(&name)) {
        return Ok(());
    }
    let payload = dir.join(&name);
    if payload.exists() {
        std::fs::remove_dir_all(&payload)?;
    }
    std::fs::create_dir_all(&payload)?;
    for (path, content, mode) in files {
        let file = payload.join(path);
        if let Some(parent) = file.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::write(&file, content)?;
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(*mode))?;
    }
    std::fs::set_permissions(&payload, std::fs::Permissions::from_mode(0o755))?;
    let tmp = dir.join("..data_tmp");
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(&name, &tmp)?;
    std::fs::rename(&tmp, &link)?;
    // The visible entries: each top-level name through `..data`; names no longer there go.
    let top: HashSet<String> = files
        .iter()
        .filter_map(|(p, _, _)| p.split('/').next().map(str::to_owned))
        .collect();
    for entry in std::fs::read_dir(dir)?.flatten() {
        let n = entry.file_name().to_string_lossy().into_owned();
        if !n.starts_with("..") && !top.contains(&n) {
            std::fs::remove_file(entry.path())?;
        }
    }
    for t in &top {
        let visible = dir.join(t);
        if std::fs::symlink_metadata(&visible).is_err() {
            std::os::unix::fs::symlink(Path::new(DATA_LINK).join(t), &visible)?;
        }
    }
    if let Some(old) = current {
        let _ = std::fs::remove_dir_all(dir.join(old));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_update_swaps_the_payload_in_one_rename() {
        let dir = std::env::temp_dir().join(format!("slipway-volumes-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("dir");
        let v1: Files = vec![
            ("a".into(), b"one".to_vec(), 0o644),
            ("d/b".into(), b"two".to_vec(), 0o600),
        ];
        write_atomically(&dir, &v1).expect("write");
        assert_eq!(std::fs::read(dir.join("a")).expect("a"), b"one");
        assert_eq!(std::fs::read(dir.join("d/b")).expect("d/b"), b"two");
        let mode = std::fs::metadata(dir.join("d/b"))
            .expect("meta")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let first = std::fs::read_link(dir.join(DATA_LINK)).expect("link");
        // The same payload again changes nothing.
        write_atomically(&dir, &v1).expect("again");
        assert_eq!(
            std::fs::read_link(dir.join(DATA_LINK)).expect("link"),
            first
        );
        let v2: Files = vec![("a".into(), b"uno".to_vec(), 0o644)];
        write_atomically(&dir, &v2).expect("update");
        assert_eq!(std::fs::read(dir.join("a")).expect("a"), b"uno");
        assert!(
            std::fs::symlink_metadata(dir.join("d")).is_err(),
            "d is gone"
        );
        assert!(!dir.join(&first).exists(), "the old payload is gone");
        let entries: Vec<String> = std::fs::read_dir(&dir)
            .expect("ls")
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(entries.len(), 3, "{entries:?}");
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }
}
