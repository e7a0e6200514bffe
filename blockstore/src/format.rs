//! The on-disk format of a data directory, and crash-safe catalog updates.
//!
//! ```text
//! <data-dir>/
//!   lock                 flock held by the daemon serving this directory
//!   catalog.json         the catalog (below), replaced atomically
//!   layers/<id>.data     sparse data file of layer <id>, byte offset = volume offset
//!   layers/<id>.map      extent map of layer <id>: one byte per extent
//! ```
//!
//! **Catalog** (`catalog.json`, JSON): `version` (this build writes and reads [`FORMAT_VERSION`]),
//! `extent_size` (bytes per extent, a power of two, fixed at creation), `next_layer`,
//! `layers` (id -> `{parent}`), `volumes` (name -> `{size, top, origin, clients}`), `snapshots`
//! (`volume@name` -> `{volume, layer, size}`). It is written to `catalog.json.tmp`, fsync'd,
//! renamed over `catalog.json`, and the directory is fsync'd: a crash leaves the old or the new
//! catalog, never a mix. Layer files not named by the catalog are leftovers of an interrupted
//! operation and are deleted when the store opens.
//!
//! **Layers.** A volume is a chain of layers: its writable top layer, then the layers of its
//! snapshots, newest first (a clone's chain continues into the snapshot it was cloned from).
//! Reading extent *i* walks the chain to the first layer whose map byte for *i* is not
//! `ABSENT` (0): `DATA` (1) means the bytes are in that layer's data file at the same offset,
//! `ZERO` (2) means the extent reads as zeroes. No layer with a byte means zeroes: a fresh
//! volume takes no space. Only the top layer of a volume is written; a snapshot freezes the
//! current top and puts a new empty layer above it (copy-on-write at extent granularity).
//!
//! **Map durability.** Map bytes change in memory when data lands and are written to the map
//! file only by a flush, after the data file was fdatasync'd, so the on-disk map never points
//! at data that is not on disk. A map byte is written in place (a single byte cannot tear).

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::StoreError;

/// The format version this build writes and reads.
pub const FORMAT_VERSION: u32 = 1;
/// Default extent (copy-on-write and allocation unit) size.
pub const DEFAULT_EXTENT_SIZE: u64 = 64 * 1024;

/// The catalog: every volume, snapshot and layer of a data directory.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Catalog {
    /// On-disk format version.
    pub version: u32,
    /// Bytes per extent.
    pub extent_size: u64,
    /// Next free layer id.
    pub next_layer: u64,
    /// Layers by id.
    pub layers: BTreeMap<u64, LayerRecord>,
    /// Writable volumes by name.
    pub volumes: BTreeMap<String, VolumeRecord>,
    /// Snapshots by `volume@snapshot`.
    pub snapshots: BTreeMap<String, SnapshotRecord>,
}

/// One layer.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct LayerRecord {
    /// The layer below, if any.
    pub parent: Option<u64>,
}

/// One volume.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct VolumeRecord {
    /// Size in bytes.
    pub size: u64,
    /// Its writable layer.
    pub top: u64,
    /// The snapshot it was cloned from, if it is a clone.
    pub origin: Option<String>,
    /// Network clients allowed to open it and its snapshots (empty: any).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub clients: Vec<String>,
}

/// One snapshot.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct SnapshotRecord {
    /// The volume it was taken of.
    pub volume: String,
    /// Its frozen layer.
    pub layer: u64,
    /// Size at the time of the snapshot.
    pub size: u64,
}

impl Catalog {
    /// An empty catalog.
    pub fn new(extent_size: u64) -> Self {
        Self {
            version: FORMAT_VERSION,
            extent_size,
            next_layer: 1,
            layers: BTreeMap::new(),
            volumes: BTreeMap::new(),
            snapshots: BTreeMap::new(),
        }
    }

    /// Layer ids from `top` down to the base.
    pub fn chain(&self, top: u64) -> Result<Vec<u64>, StoreError> {
        let mut out = vec![top];
        let mut cur = top;
        while let Some(parent) = self
            .layers
            .get(&cur)
            .ok_or_else(|| StoreError::Inconsistent(format!("layer {cur} missing")))?
            .parent
        {
            if out.contains(&parent) || out.len() > self.layers.len() {
                return Err(StoreError::Inconsistent(format!("layer cycle at {parent}")));
            }
            out.push(parent);
            cur = parent;
        }
        Ok(out)
    }

    /// Checks references and cycles.
    pub fn check(&self) -> Result<(), StoreError> {
        if self.version != FORMAT_VERSION {
            return Err(StoreError::Version {
                found: self.version,
                supported: FORMAT_VERSION,
            });
        }
        if !self.extent_size.is_power_of_two() || self.extent_size < 4096 {
            return Err(StoreError::Inconsistent(format!(
                "extent_size {} is not a power of two >= 4096",
                self.extent_size
            )));
        }
        for v in self.volumes.values() {
            self.chain(v.top)?;
        }
        for (name, s) in &self.snapshots {
            self.chain(s.layer)?;
            if !self.volumes.contains_key(&s.volume) {
                return Err(StoreError::Inconsistent(format!(
                    "snapshot {name} of missing volume {}",
                    s.volume
                )));
            }
        }
        Ok(())
    }

    /// Layers reachable from a volume or a snapshot.
    pub fn reachable(&self) -> Vec<u64> {
        let mut out: Vec<u64> = Vec::new();
        let tops = self
            .volumes
            .values()
            .map(|v| v.top)
            .chain(self.snapshots.values().map(|s| s.layer));
        for top in tops {
            for id in self.chain(top).unwrap_or_default() {
                if !out.contains(&id) {
                    out.push(id);
                }
            }
        }
        out
    }
}

/// Paths inside a data directory.
#[derive(Debug, Clone)]
pub struct Layout {
    root: PathBuf,
}

impl Layout {
    /// The layout under `root`.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    /// The data directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// `catalog.json`.
    pub fn catalog(&self) -> PathBuf {
        self.root.join("catalog.json")
    }

    /// `layers/`.
    pub fn layers(&self) -> PathBuf {
        self.root.join("layers")
    }

    /// Data file of a layer.
    pub fn data(&self, id: u64) -> PathBuf {
        self.layers().join(format!("{id}.data"))
    }

    /// Map file of a layer.
    pub fn map(&self, id: u64) -> PathBuf {
        self.layers().join(format!("{id}.map"))
    }

    /// Loads the catalog, or creates an empty data directory.
    pub fn load_or_init(&self, extent_size: u64) -> Result<Catalog, StoreError> {
        fs::create_dir_all(self.layers()).map_err(StoreError::io("mkdir", self.layers()))?;
        let path = self.catalog();
        match fs::read(&path) {
            Ok(bytes) => {
                let catalog: Catalog = serde_json::from_slice(&bytes)
                    .map_err(|source| StoreError::Catalog { path, source })?;
                catalog.check()?;
                Ok(catalog)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let catalog = Catalog::new(extent_size);
                self.save(&catalog)?;
                Ok(catalog)
            }
            Err(e) => Err(StoreError::io("read", path)(e)),
        }
    }

    /// Atomically replaces the catalog (write, fsync, rename, fsync directory).
    pub fn save(&self, catalog: &Catalog) -> Result<(), StoreError> {
        let tmp = self.root.join("catalog.json.tmp");
        let bytes = serde_json::to_vec_pretty(catalog).map_err(|source| StoreError::Catalog {
            path: tmp.clone(),
            source,
        })?;
        let mut f = File::create(&tmp).map_err(StoreError::io("create", &tmp))?;
        f.write_all(&bytes).map_err(StoreError::io("write", &tmp))?;
        f.sync_all().map_err(StoreError::io("fsync", &tmp))?;
        fs::rename(&tmp, self.catalog()).map_err(StoreError::io("rename", &tmp))?;
        sync_dir(&self.root)
    }
}

/// fsyncs a directory so that renames and creations in it are durable.
pub fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(StoreError::io("fsync", dir))
}

/// Opens a file for read and write, creating it if asked.
pub fn open_rw(path: &Path, create: bool) -> Result<File, StoreError> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(create)
        .truncate(false)
        .open(path)
        .map_err(StoreError::io("open", path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn catalog_round_trips_and_rejects_unknown_fields() {
        let mut c = Catalog::new(DEFAULT_EXTENT_SIZE);
        c.layers.insert(1, LayerRecord { parent: None });
        c.layers.insert(2, LayerRecord { parent: Some(1) });
        c.volumes.insert(
            "v".into(),
            VolumeRecord {
                size: 1 << 20,
                top: 2,
                origin: None,
                clients: Vec::new(),
            },
        );
        let json = serde_json::to_string(&c).expect("serialize");
        let back: Catalog = serde_json::from_str(&json).expect("parse");
        assert_eq!(back, c);
        assert_eq!(c.chain(2).expect("chain"), vec![2, 1]);
        let bad = json.replacen("\"version\"", "\"bogus\":1,\"version\"", 1);
        assert!(serde_json::from_str::<Catalog>(&bad).is_err());
        let mut wrong = c.clone();
        wrong.version = 99;
        assert!(matches!(
            wrong.check(),
            Err(StoreError::Version { found: 99, .. })
        ));
        let mut cyc = c;
        cyc.layers.insert(1, LayerRecord { parent: Some(2) });
        assert!(cyc.check().is_err());
    }
}
