//! Errors of the block store (volume management and I/O), one enum per subsystem.

use std::io;
use std::path::PathBuf;

use thiserror::Error;

/// Errors from volume management and the on-disk format.
#[derive(Debug, Error)]
pub enum StoreError {
    /// A filesystem call on a store file failed.
    #[error("{call} {path}")]
    Io {
        /// The operation (`open`, `fsync`, `rename`...).
        call: &'static str,
        /// The file it was applied to.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Another process serves this data directory.
    #[error("data directory {0} is in use by another process")]
    Locked(PathBuf),
    /// Data-file I/O through io_uring failed.
    #[error("volume I/O failed")]
    DataIo(#[source] io::Error),
    /// The catalog could not be parsed.
    #[error("catalog {path} is corrupt")]
    Catalog {
        /// Catalog path.
        path: PathBuf,
        /// Parse error.
        #[source]
        source: serde_json::Error,
    },
    /// The catalog was written by an unknown format version.
    #[error("unsupported on-disk format version {found} (this build reads version {supported})")]
    Version {
        /// Version in the catalog.
        found: u32,
        /// Version this build understands.
        supported: u32,
    },
    /// The catalog refers to something that does not exist.
    #[error("catalog is inconsistent: {0}")]
    Inconsistent(String),
    /// A volume or snapshot name is not allowed.
    #[error("invalid name {name:?}: {reason}")]
    InvalidName {
        /// The rejected name.
        name: String,
        /// Why.
        reason: &'static str,
    },
    /// A size is not allowed.
    #[error("invalid size {size}: {reason}")]
    InvalidSize {
        /// Requested size in bytes.
        size: u64,
        /// Why.
        reason: &'static str,
    },
    /// No volume or snapshot with this name.
    #[error("{0:?} not found")]
    NotFound(String),
    /// The name is taken.
    #[error("{0:?} already exists")]
    AlreadyExists(String),
    /// Deleting would orphan clones; pass `cascade` to delete them too.
    #[error("{name:?} has dependent clones {dependents:?}; delete them first or ask to cascade")]
    HasDependents {
        /// What was to be deleted.
        name: String,
        /// Clones that depend on it.
        dependents: Vec<String>,
    },
    /// Volumes only grow.
    #[error("cannot shrink {name:?} from {current} to {requested} bytes")]
    Shrink {
        /// Volume name.
        name: String,
        /// Current size.
        current: u64,
        /// Requested size.
        requested: u64,
    },
}

impl StoreError {
    pub(crate) fn io(
        call: &'static str,
        path: impl Into<PathBuf>,
    ) -> impl FnOnce(io::Error) -> Self {
        let path = path.into();
        move |source| Self::Io { call, path, source }
    }
}
