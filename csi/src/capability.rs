//! Checking the volume capabilities of a request (access mode, block or filesystem) without I/O,
//! shared by the Controller and Node services.

use crate::error::CsiError;
use crate::proto::VolumeCapability;
use crate::proto::volume_capability::{AccessType, access_mode::Mode};

/// A filesystem the node plugin can make and grow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FsType {
    /// ext4 (the default when `fs_type` is empty).
    Ext4,
    /// XFS.
    Xfs,
}

impl FsType {
    /// The name mkfs and mount know it by.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ext4 => "ext4",
            Self::Xfs => "xfs",
        }
    }

    /// Parses `fs_type` from a request (`""` means ext4).
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "" | "ext4" => Some(Self::Ext4),
            "xfs" => Some(Self::Xfs),
            _ => None,
        }
    }
}

/// How a volume is consumed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Access {
    /// A raw block device.
    Block,
    /// A mounted filesystem.
    Mount {
        /// The filesystem.
        fs: FsType,
        /// Extra mount options.
        flags: Vec<String>,
    },
}

/// Checks one capability: single-node access (the export is attached on one node at a time),
/// block or ext4/xfs. `field` names the capability in the request for the error.
pub fn check(cap: &VolumeCapability, field: &'static str) -> Result<Access, CsiError> {
    let mode = cap
        .access_mode
        .as_ref()
        .map(|m| Mode::try_from(m.mode).unwrap_or(Mode::Unknown))
        .unwrap_or(Mode::Unknown);
    match mode {
        Mode::SingleNodeWriter | Mode::SingleNodeReaderOnly => {}
        Mode::Unknown => return Err(CsiError::invalid(field, "access_mode is missing")),
        other => {
            return Err(CsiError::invalid(
                field,
                format!(
                    "access_mode {} is not supported (an NBD export is attached on one node)",
                    other.as_str_name()
                ),
            ));
        }
    }
    match &cap.access_type {
        Some(AccessType::Block(_)) => Ok(Access::Block),
        Some(AccessType::Mount(m)) => {
            let fs = FsType::parse(&m.fs_type).ok_or_else(|| {
                CsiError::invalid(
                    field,
                    format!("fs_type {:?} is not supported (ext4, xfs)", m.fs_type),
                )
            })?;
            if let Some(bad) = m
                .mount_flags
                .iter()
                .find(|f| f.is_empty() || f.contains(','))
            {
                return Err(CsiError::invalid(
                    field,
                    format!("mount flag {bad:?} must be one non-empty option"),
                ));
            }
            Ok(Access::Mount {
                fs,
                flags: m.mount_flags.clone(),
            })
        }
        None => Err(CsiError::invalid(
            field,
            "access_type (block or mount) is missing",
        )),
    }
}

/// Checks every capability of a list that must not be empty.
pub fn check_all(caps: &[VolumeCapability], field: &'static str) -> Result<(), CsiError> {
    if caps.is_empty() {
        return Err(CsiError::invalid(
            field,
            "at least one capability is required",
        ));
    }
    caps.iter().try_for_each(|c| check(c, field).map(drop))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::volume_capability::{AccessMode, BlockVolume, MountVolume};

    fn cap(mode: Mode, access: Option<AccessType>) -> VolumeCapability {
        VolumeCapability {
            access_mode: Some(AccessMode { mode: mode as i32 }),
            access_type: access,
        }
    }

    fn mount(fs: &str) -> Option<AccessType> {
        Some(AccessType::Mount(MountVolume {
            fs_type: fs.into(),
            mount_flags: vec![],
        }))
    }

    #[test]
    fn accepts_single_node_block_and_ext4_xfs() {
        assert_eq!(
            check(&cap(Mode::SingleNodeWriter, mount("")), "c").ok(),
            Some(Access::Mount {
                fs: FsType::Ext4,
                flags: vec![]
            })
        );
        assert!(matches!(
            check(&cap(Mode::SingleNodeReaderOnly, mount("xfs")), "c"),
            Ok(Access::Mount {
                fs: FsType::Xfs,
                ..
            })
        ));
        assert_eq!(
            check(
                &cap(
                    Mode::SingleNodeWriter,
                    Some(AccessType::Block(BlockVolume {}))
                ),
                "c"
            )
            .ok(),
            Some(Access::Block)
        );
    }

    #[test]
    fn refuses_what_cannot_work_naming_the_field() {
        for (c, needle) in [
            (
                cap(Mode::MultiNodeMultiWriter, mount("")),
                "MULTI_NODE_MULTI_WRITER",
            ),
            (cap(Mode::Unknown, mount("")), "access_mode is missing"),
            (cap(Mode::SingleNodeWriter, mount("btrfs")), "btrfs"),
            (cap(Mode::SingleNodeWriter, None), "access_type"),
        ] {
            let Err(CsiError::InvalidArgument { field, reason }) = check(&c, "volume_capability")
            else {
                panic!("{c:?} accepted");
            };
            assert_eq!(field, "volume_capability");
            assert!(reason.contains(needle), "{reason}");
        }
        assert!(check_all(&[], "volume_capabilities").is_err());
    }
}
