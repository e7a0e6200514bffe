//! The store: a data directory's volumes, snapshots and clones, and their exports.
//!
//! Management operations (create, snapshot, clone, resize, delete) are serialised by one lock
//! and each ends with one atomic catalog write; see `format.rs` for the on-disk layout.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, RwLock};

use serde::{Deserialize, Serialize};
use tokio::sync::Mutex;

use crate::error::StoreError;
use crate::format::{Catalog, LayerRecord, Layout, SnapshotRecord, VolumeRecord};
use crate::layer::{ABSENT, DATA, Layer, ZERO};
use crate::negotiate::{ExportCatalog, ExportInfo};
use crate::uring::{PUNCH_HOLE, Uring};
use crate::volume::Export;

/// Largest volume: a layer's data file is as large as its volume (byte offset = volume
/// offset), and ext4 with 4 KiB blocks holds files of at most 2^32 - 1 blocks, 16 TiB - 4 KiB.
/// (A filesystem with a lower limit refuses the volume at creation with the same error.)
pub const MAX_VOLUME_SIZE: u64 = ((1 << 32) - 1) * 4096;

/// What `list` reports for one volume or snapshot.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct VolumeInfo {
    /// Export name (`volume` or `volume@snapshot`).
    pub name: String,
    /// `volume` or `snapshot`.
    pub kind: String,
    /// Size in bytes.
    pub size: u64,
    /// Bytes held by this volume's own layer (0 for snapshots).
    pub allocated: u64,
    /// For a clone, the snapshot it came from; for a snapshot, its volume.
    pub origin: Option<String>,
    /// Network clients allowed to open it (empty: any).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub clients: Vec<String>,
}

/// A data directory opened for serving.
#[derive(Debug)]
pub struct Store {
    /// Held (flock) for the store's lifetime: one daemon per data directory.
    _lock: std::fs::File,
    layout: Layout,
    ring: Uring,
    state: Mutex<State>,
    exports: RwLock<HashMap<String, Arc<Export>>>,
}

#[derive(Debug)]
struct State {
    catalog: Catalog,
    layers: HashMap<u64, Arc<Layer>>,
}

/// Checks a volume or snapshot name: 1-64 of `[A-Za-z0-9._-]`, not starting with `.` or `-`.
pub fn validate_name(name: &str) -> Result<(), StoreError> {
    let bad = |reason| StoreError::InvalidName {
        name: name.to_owned(),
        reason,
    };
    if name.is_empty() || name.len() > 64 {
        return Err(bad("must be 1 to 64 characters"));
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
    {
        return Err(bad("only letters, digits, '.', '_' and '-' are allowed"));
    }
    if name.starts_with(['.', '-']) {
        return Err(bad("must not start with '.' or '-'"));
    }
    Ok(())
}

fn validate_size(size: u64) -> Result<(), StoreError> {
    if size == 0 || !size.is_multiple_of(512) {
        return Err(StoreError::InvalidSize {
            size,
            reason: "must be a positive multiple of 512",
        });
    }
    if size > MAX_VOLUME_SIZE {
        return Err(StoreError::InvalidSize {
            size,
            reason: "larger than the maximum volume size, 17592186040320 bytes (16 TiB - 4 KiB: \
                     one data file per layer, ext4's file size limit)",
        });
    }
    Ok(())
}

impl Store {
    /// Opens (or initialises) the data directory at `dir`.
    pub fn open(dir: &Path, extent_size: u64) -> Result<Arc<Self>, StoreError> {
        let layout = Layout::new(dir);
        std::fs::create_dir_all(dir).map_err(StoreError::io("mkdir", dir))?;
        let lock_path = dir.join("lock");
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(StoreError::io("open", &lock_path))?;
        lock.try_lock()
            .map_err(|_| StoreError::Locked(dir.to_owned()))?;
        let catalog = layout.load_or_init(extent_size)?;
        let ring = Uring::new().map_err(StoreError::io("io_uring_setup", dir))?;
        let mut layers = HashMap::new();
        for &id in catalog.layers.keys() {
            layers.insert(id, Arc::new(Layer::open(&layout, id)?));
        }
        remove_orphans(&layout, &catalog);
        let store = Arc::new(Self {
            _lock: lock,
            layout,
            ring,
            state: Mutex::new(State { catalog, layers }),
            exports: RwLock::new(HashMap::new()),
        });
        store.rebuild_exports_sync()?;
        {
            let state = store
                .state
                .try_lock()
                .map_err(|_| StoreError::Inconsistent("store state locked during open".into()))?;
            tracing::info!(
                data_dir = %dir.display(),
                volumes = state.catalog.volumes.len(),
                snapshots = state.catalog.snapshots.len(),
                extent_size = state.catalog.extent_size,
                "store opened"
            );
        }
        Ok(store)
    }

    /// Makes every write acknowledged so far on every volume durable, as a FLUSH on each
    /// would (a clean stop ends with this). Returns the number of volumes flushed; on
    /// failure every volume was still tried and the first error is returned.
    pub async fn flush_all(&self) -> Result<usize, StoreError> {
        let volumes: Vec<Arc<Export>> = self
            .exports_read()
            .values()
            .filter(|e| !e.read_only)
            .cloned()
            .collect();
        let mut first = None;
        for v in &volumes {
            if let Err(e) = v.persist().await {
                tracing::error!(volume = %v.name, error = %e, "flush failed");
                first.get_or_insert(e);
            }
        }
        first.map_or(Ok(volumes.len()), Err)
    }

    fn exports_read(&self) -> std::sync::RwLockReadGuard<'_, HashMap<String, Arc<Export>>> {
        self.exports.read().unwrap_or_else(|p| p.into_inner())
    }

    fn exports_write(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<String, Arc<Export>>> {
        self.exports.write().unwrap_or_else(|p| p.into_inner())
    }

    fn rebuild_exports_sync(&self) -> Result<(), StoreError> {
        let state = self
            .state
            .try_lock()
            .map_err(|_| StoreError::Inconsistent("store state locked during open".into()))?;
        let mut exports = HashMap::new();
        for (name, v) in &state.catalog.volumes {
            let chain = chain_layers(&state, v.top)?;
            let extents = v.size.div_ceil(state.catalog.extent_size);
            chain[0].grow(&self.layout, v.size, extents)?;
            let export = self.export(name, false, v.size, chain, &state);
            export.set_clients(v.clients.clone());
            exports.insert(name.clone(), export);
        }
        for (name, s) in &state.catalog.snapshots {
            let chain = chain_layers(&state, s.layer)?;
            let export = self.export(name, true, s.size, chain, &state);
            if let Some(v) = state.catalog.volumes.get(&s.volume) {
                export.set_clients(v.clients.clone());
            }
            exports.insert(name.clone(), export);
        }
        *self.exports_write() = exports;
        Ok(())
    }

    fn export(
        &self,
        name: &str,
        read_only: bool,
        size: u64,
        chain: Vec<Arc<Layer>>,
        state: &State,
    ) -> Arc<Export> {
        Arc::new(Export::new(
            name.to_owned(),
            read_only,
            size,
            state.catalog.extent_size,
            chain,
            self.ring.clone(),
        ))
    }

    /// The export with this name.
    pub fn get(&self, name: &str) -> Option<Arc<Export>> {
        self.exports_read().get(name).cloned()
    }

    /// Bytes per extent.
    pub async fn extent_size(&self) -> u64 {
        self.state.lock().await.catalog.extent_size
    }

    /// Creates an empty thin volume.
    pub async fn create(&self, name: &str, size: u64) -> Result<VolumeInfo, StoreError> {
        validate_name(name)?;
        validate_size(size)?;
        let mut state = self.state.lock().await;
        if self.exists(&state, name) {
            return Err(StoreError::AlreadyExists(name.to_owned()));
        }
        let layer = self.new_layer(&mut state, None, size)?;
        let mut catalog = state.catalog.clone();
        catalog.volumes.insert(
            name.to_owned(),
            VolumeRecord {
                size,
                top: layer.id,
                origin: None,
                clients: Vec::new(),
            },
        );
        self.commit(&mut state, catalog)?;
        let export = self.export(name, false, size, vec![layer], &state);
        self.exports_write().insert(name.to_owned(), export);
        tracing::info!(volume = name, size, "volume created");
        Ok(self.info_of(&state, name).await)
    }

    /// Takes a read-only snapshot `volume@name`.
    pub async fn snapshot(&self, volume: &str, name: &str) -> Result<VolumeInfo, StoreError> {
        validate_name(name)?;
        let full = format!("{volume}@{name}");
        let mut state = self.state.lock().await;
        let vrec = state
            .catalog
            .volumes
            .get(volume)
            .cloned()
            .ok_or_else(|| StoreError::NotFound(volume.to_owned()))?;
        if state.catalog.snapshots.contains_key(&full) {
            return Err(StoreError::AlreadyExists(full));
        }
        let export = self
            .get(volume)
            .ok_or_else(|| StoreError::NotFound(volume.to_owned()))?;
        let mut chain = export.lock_chain().await;
        // Freeze: everything written so far becomes durable in the old top layer.
        chain[0].persist(&self.ring).await?;
        let frozen = chain.clone();
        let layer = self.new_layer(&mut state, Some(vrec.top), vrec.size)?;
        let mut catalog = state.catalog.clone();
        if let Some(v) = catalog.volumes.get_mut(volume) {
            v.top = layer.id;
        }
        catalog.snapshots.insert(
            full.clone(),
            SnapshotRecord {
                volume: volume.to_owned(),
                layer: vrec.top,
                size: vrec.size,
            },
        );
        self.commit(&mut state, catalog)?;
        chain.insert(0, layer);
        drop(chain);
        let snap = self.export(&full, true, vrec.size, frozen, &state);
        snap.set_clients(vrec.clients.clone());
        self.exports_write().insert(full.clone(), snap);
        tracing::info!(volume, snapshot = %full, "snapshot taken");
        Ok(self.info_of(&state, &full).await)
    }

    /// Creates a writable clone `name` of the snapshot `snapshot` (`volume@snap`).
    pub async fn clone_snapshot(
        &self,
        snapshot: &str,
        name: &str,
    ) -> Result<VolumeInfo, StoreError> {
        validate_name(name)?;
        let mut state = self.state.lock().await;
        let srec = state
            .catalog
            .snapshots
            .get(snapshot)
            .cloned()
            .ok_or_else(|| StoreError::NotFound(snapshot.to_owned()))?;
        if self.exists(&state, name) {
            return Err(StoreError::AlreadyExists(name.to_owned()));
        }
        let layer = self.new_layer(&mut state, Some(srec.layer), srec.size)?;
        let mut catalog = state.catalog.clone();
        catalog.volumes.insert(
            name.to_owned(),
            VolumeRecord {
                size: srec.size,
                top: layer.id,
                origin: Some(snapshot.to_owned()),
                clients: Vec::new(),
            },
        );
        self.commit(&mut state, catalog)?;
        let chain = chain_layers(&state, layer.id)?;
        let export = self.export(name, false, srec.size, chain, &state);
        self.exports_write().insert(name.to_owned(), export);
        tracing::info!(snapshot, clone = name, "clone created");
        Ok(self.info_of(&state, name).await)
    }

    /// Sets the network clients (DNS names their TLS certificates prove) allowed to open a
    /// volume and its snapshots; an empty list allows any. Connections already open stay.
    pub async fn authorize(
        &self,
        name: &str,
        clients: Vec<String>,
    ) -> Result<VolumeInfo, StoreError> {
        if let Some(bad) = clients.iter().find(|c| !crate::tls::valid_client_name(c)) {
            return Err(StoreError::InvalidName {
                name: bad.clone(),
                reason: "clients: a client is named by a DNS name of its certificate",
            });
        }
        let mut state = self.state.lock().await;
        let mut catalog = state.catalog.clone();
        let v = catalog
            .volumes
            .get_mut(name)
            .ok_or_else(|| StoreError::NotFound(name.to_owned()))?;
        v.clients = clients.clone();
        self.commit(&mut state, catalog)?;
        let prefix = format!("{name}@");
        for (export_name, e) in self.exports_read().iter() {
            if export_name == name || export_name.starts_with(&prefix) {
                e.set_clients(clients.clone());
            }
        }
        tracing::info!(volume = name, ?clients, "clients authorised");
        Ok(self.info_of(&state, name).await)
    }

    /// Grows a volume online; new connections see the new size.
    pub async fn resize(&self, name: &str, size: u64) -> Result<VolumeInfo, StoreError> {
        validate_size(size)?;
        let mut state = self.state.lock().await;
        let vrec = state
            .catalog
            .volumes
            .get(name)
            .cloned()
            .ok_or_else(|| StoreError::NotFound(name.to_owned()))?;
        if size < vrec.size {
            return Err(StoreError::Shrink {
                name: name.to_owned(),
                current: vrec.size,
                requested: size,
            });
        }
        let export = self
            .get(name)
            .ok_or_else(|| StoreError::NotFound(name.to_owned()))?;
        let chain = export.lock_chain().await;
        let extents = size.div_ceil(state.catalog.extent_size);
        chain[0].grow(&self.layout, size, extents)?;
        let mut catalog = state.catalog.clone();
        if let Some(v) = catalog.volumes.get_mut(name) {
            v.size = size;
        }
        self.commit(&mut state, catalog)?;
        export.set_size(size);
        drop(chain);
        tracing::info!(volume = name, size, "volume resized");
        Ok(self.info_of(&state, name).await)
    }

    /// Deletes a volume (with its snapshots) or a snapshot. Refused while clones depend on it,
    /// unless `cascade`, which deletes those clones first.
    pub async fn delete(&self, name: &str, cascade: bool) -> Result<Vec<String>, StoreError> {
        let mut state = self.state.lock().await;
        if !self.exists(&state, name) {
            return Err(StoreError::NotFound(name.to_owned()));
        }
        let dependents = dependents(&state.catalog, name);
        if !dependents.is_empty() && !cascade {
            return Err(StoreError::HasDependents {
                name: name.to_owned(),
                dependents,
            });
        }
        let mut deleted = Vec::new();
        // Dependents come deepest first, so each is free of clones when it is deleted.
        for dep in dependents.iter().chain(std::iter::once(&name.to_owned())) {
            self.delete_one(&mut state, dep).await?;
            deleted.push(dep.clone());
        }
        Ok(deleted)
    }

    async fn delete_one(&self, state: &mut State, name: &str) -> Result<(), StoreError> {
        let mut catalog = state.catalog.clone();
        if catalog.volumes.remove(name).is_some() {
            catalog.snapshots.retain(|_, s| s.volume != name);
        } else if let Some(srec) = catalog.snapshots.remove(name) {
            self.merge_out(state, &srec).await?;
            catalog = state.catalog.clone();
            catalog.snapshots.remove(name);
            // The snapshot's layer now has no reader left above it that needs it: relink
            // its child onto its parent.
            let parent = catalog.layers.get(&srec.layer).and_then(|l| l.parent);
            for l in catalog.layers.values_mut() {
                if l.parent == Some(srec.layer) {
                    l.parent = parent;
                }
            }
        } else {
            return Err(StoreError::NotFound(name.to_owned()));
        }
        let reachable = catalog.reachable();
        let dropped: Vec<u64> = catalog
            .layers
            .keys()
            .copied()
            .filter(|id| !reachable.contains(id))
            .collect();
        for id in &dropped {
            catalog.layers.remove(id);
        }
        self.commit(state, catalog)?;
        {
            let mut exports = self.exports_write();
            exports.retain(|n, e| {
                let keep = state.catalog.volumes.contains_key(n)
                    || state.catalog.snapshots.contains_key(n);
                if !keep {
                    e.mark_deleted();
                }
                keep
            });
        }
        self.relink_exports(state).await?;
        for id in dropped {
            state.layers.remove(&id);
            let _ = std::fs::remove_file(self.layout.data(id));
            let _ = std::fs::remove_file(self.layout.map(id));
        }
        tracing::info!(name, "deleted");
        Ok(())
    }

    /// Before a snapshot's layer disappears, copy its extents into each remaining child layer
    /// that does not hide them, so every reader above sees the same bytes afterwards.
    async fn merge_out(&self, state: &mut State, srec: &SnapshotRecord) -> Result<(), StoreError> {
        let Some(lower) = state.layers.get(&srec.layer).cloned() else {
            return Err(StoreError::Inconsistent(format!(
                "layer {} missing",
                srec.layer
            )));
        };
        let children: Vec<u64> = state
            .catalog
            .layers
            .iter()
            .filter(|(_, l)| l.parent == Some(srec.layer))
            .map(|(id, _)| *id)
            .collect();
        let es = state.catalog.extent_size;
        let owner = self.get(&srec.volume);
        for child_id in children {
            let Some(child) = state.layers.get(&child_id).cloned() else {
                continue;
            };
            tracing::info!(
                snapshot = srec.layer,
                into = child_id,
                extents = lower.present().len(),
                "merging snapshot layer into its child"
            );
            // If the child is the volume's writable top, hold off its allocating writes.
            let _alloc = match &owner {
                Some(o) => Some(o.lock_alloc().await),
                None => None,
            };
            for (idx, st) in lower.present() {
                if child.get(idx) != ABSENT {
                    continue;
                }
                let (start, len) = (idx * es, es.min(srec.size.saturating_sub(idx * es)));
                if len == 0 {
                    continue;
                }
                if st == DATA {
                    let buf = self
                        .ring
                        .read_at(&lower.data, start, len as usize)
                        .await
                        .map_err(StoreError::DataIo)?;
                    self.ring
                        .write_at(&child.data, start, buf)
                        .await
                        .map_err(StoreError::DataIo)?;
                    child.set_range(idx, 1, DATA);
                } else {
                    self.ring
                        .fallocate(&child.data, PUNCH_HOLE, start, len)
                        .await
                        .map_err(StoreError::DataIo)?;
                    child.set_range(idx, 1, ZERO);
                }
            }
            child.persist(&self.ring).await?;
            tracing::info!(into = child_id, "merge done");
        }
        Ok(())
    }

    /// Points every export's chain at the layers the catalog now names.
    async fn relink_exports(&self, state: &State) -> Result<(), StoreError> {
        let exports: Vec<Arc<Export>> = self.exports_read().values().cloned().collect();
        for export in exports {
            let top = if let Some(v) = state.catalog.volumes.get(&export.name) {
                v.top
            } else if let Some(s) = state.catalog.snapshots.get(&export.name) {
                s.layer
            } else {
                continue;
            };
            let fresh = chain_layers(state, top)?;
            let mut chain = export.lock_chain().await;
            let same =
                chain.len() == fresh.len() && chain.iter().zip(&fresh).all(|(a, b)| a.id == b.id);
            if !same {
                *chain = fresh;
            }
        }
        Ok(())
    }

    /// Every volume and snapshot.
    pub async fn list(&self) -> Vec<VolumeInfo> {
        let state = self.state.lock().await;
        let names: Vec<String> = state
            .catalog
            .volumes
            .keys()
            .chain(state.catalog.snapshots.keys())
            .cloned()
            .collect();
        let mut out = Vec::with_capacity(names.len());
        for name in names {
            out.push(self.info_of(&state, &name).await);
        }
        out
    }

    async fn info_of(&self, state: &State, name: &str) -> VolumeInfo {
        if let Some(v) = state.catalog.volumes.get(name) {
            let allocated = match self.get(name) {
                Some(e) => e.allocated_bytes().await,
                None => 0,
            };
            VolumeInfo {
                name: name.to_owned(),
                kind: "volume".into(),
                size: v.size,
                allocated,
                origin: v.origin.clone(),
                clients: v.clients.clone(),
            }
        } else {
            let s = state.catalog.snapshots.get(name);
            VolumeInfo {
                name: name.to_owned(),
                kind: "snapshot".into(),
                size: s.map_or(0, |s| s.size),
                allocated: 0,
                origin: s.map(|s| s.volume.clone()),
                clients: s
                    .and_then(|s| state.catalog.volumes.get(&s.volume))
                    .map(|v| v.clients.clone())
                    .unwrap_or_default(),
            }
        }
    }

    fn exists(&self, state: &State, name: &str) -> bool {
        state.catalog.volumes.contains_key(name) || state.catalog.snapshots.contains_key(name)
    }

    fn new_layer(
        &self,
        state: &mut State,
        parent: Option<u64>,
        size: u64,
    ) -> Result<Arc<Layer>, StoreError> {
        let id = state.catalog.next_layer;
        state.catalog.next_layer += 1;
        let extents = size.div_ceil(state.catalog.extent_size);
        let layer = Arc::new(Layer::create(&self.layout, id, size, extents)?);
        state.catalog.layers.insert(id, LayerRecord { parent });
        state.layers.insert(id, Arc::clone(&layer));
        Ok(layer)
    }

    /// Writes `catalog` durably and makes it current.
    fn commit(&self, state: &mut State, catalog: Catalog) -> Result<(), StoreError> {
        let mut catalog = catalog;
        // Layers made by this operation were recorded in `state.catalog` by `new_layer`.
        catalog.next_layer = catalog.next_layer.max(state.catalog.next_layer);
        catalog.check()?;
        self.layout.save(&catalog)?;
        state.catalog = catalog;
        Ok(())
    }
}

fn chain_layers(state: &State, top: u64) -> Result<Vec<Arc<Layer>>, StoreError> {
    state
        .catalog
        .chain(top)?
        .into_iter()
        .map(|id| {
            state
                .layers
                .get(&id)
                .cloned()
                .ok_or_else(|| StoreError::Inconsistent(format!("layer {id} not open")))
        })
        .collect()
}

/// Clones that depend on `name` (a volume's snapshots' clones, or a snapshot's clones),
/// transitively, deepest first.
fn dependents(catalog: &Catalog, name: &str) -> Vec<String> {
    let snaps: Vec<&String> = if catalog.volumes.contains_key(name) {
        catalog
            .snapshots
            .iter()
            .filter(|(_, s)| s.volume == name)
            .map(|(n, _)| n)
            .collect()
    } else {
        catalog.snapshots.keys().filter(|n| *n == name).collect()
    };
    let mut out = Vec::new();
    for snap in snaps {
        for (clone, v) in &catalog.volumes {
            if v.origin.as_deref() == Some(snap.as_str()) {
                for d in dependents(catalog, clone) {
                    if !out.contains(&d) {
                        out.push(d);
                    }
                }
                if !out.contains(clone) {
                    out.push(clone.clone());
                }
            }
        }
    }
    out
}

fn remove_orphans(layout: &Layout, catalog: &Catalog) {
    let Ok(dir) = std::fs::read_dir(layout.layers()) else {
        return;
    };
    for entry in dir.flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        let id = name.split('.').next().and_then(|s| s.parse::<u64>().ok());
        if id.is_none_or(|id| !catalog.layers.contains_key(&id)) {
            tracing::info!(file = %name, "removing leftover layer file");
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

impl ExportCatalog for Store {
    fn lookup(&self, name: &str) -> Option<ExportInfo> {
        self.get(name).map(|e| ExportInfo {
            name: e.name.clone(),
            size: e.size(),
            read_only: e.read_only,
            clients: e.clients(),
        })
    }

    fn list(&self) -> Vec<ExportInfo> {
        let exports = self.exports_read();
        let mut out: Vec<ExportInfo> = exports
            .values()
            .map(|e| ExportInfo {
                name: e.name.clone(),
                size: e.size(),
                read_only: e.read_only,
                clients: e.clients(),
            })
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::volume::{IoError, ZeroMode};

    const ES: u64 = 64 * 1024;

    struct Dir(std::path::PathBuf);
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    fn dir(tag: &str) -> Dir {
        let p = std::env::temp_dir().join(format!("slw-store-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        Dir(p)
    }

    async fn read(store: &Store, name: &str, off: u64, len: u32) -> Vec<u8> {
        let e = store.get(name).expect("export");
        e.read(off, len).await.expect("read")
    }

    async fn write(store: &Store, name: &str, off: u64, byte: u8, len: usize) {
        let e = store.get(name).expect("export");
        e.write(off, vec![byte; len], false).await.expect("write");
    }

    #[tokio::test]
    async fn snapshot_chain_merges_keep_every_view() -> Result<(), StoreError> {
        let d = dir("merge");
        let store = Store::open(&d.0, ES)?;
        store.create("v", 1 << 20).await?;
        write(&store, "v", 0, 0xa1, ES as usize).await;
        write(&store, "v", 3 * ES, 0xa3, 100).await;
        store.snapshot("v", "s1").await?;
        write(&store, "v", ES, 0xb1, ES as usize).await;
        // Partial overwrite of an extent that lives in s1: copy-on-write.
        write(&store, "v", 10, 0xb0, 10).await;
        store.snapshot("v", "s2").await?;
        // Full-extent trim of data that lives below: must read as zeroes.
        let v = store.get("v").expect("v");
        let trim = ZeroMode {
            no_hole: false,
            fast: false,
        };
        v.zero(3 * ES, ES as u32, trim, false)
            .await
            .map_err(|e| StoreError::Inconsistent(e.to_string()))?;
        // Partial zero over lower data with FAST_ZERO is refused, without it done.
        let fast = ZeroMode {
            no_hole: false,
            fast: true,
        };
        assert!(matches!(
            v.zero(ES + 8, 8, fast, false).await,
            Err(IoError::NotFast)
        ));
        v.zero(ES + 8, 8, trim, false)
            .await
            .map_err(|e| StoreError::Inconsistent(e.to_string()))?;
        let r = v.zero(2 * ES + 8, 8, fast, false).await;
        assert!(r.is_ok(), "extent 2 has no data anywhere: zeroing is free");
        store.create("w", 1 << 20).await?;
        write(&store, "w", 0, 0x11, 4096).await;
        store.snapshot("w", "ws").await?;
        let w = store.get("w").expect("w");
        assert!(matches!(
            w.zero(8, 8, fast, false).await,
            Err(IoError::NotFast)
        ));

        let expect_v = |buf: &[u8]| {
            assert!(buf[..10].iter().all(|b| *b == 0xa1));
            assert!(buf[10..20].iter().all(|b| *b == 0xb0));
            assert!(buf[20..ES as usize].iter().all(|b| *b == 0xa1));
            assert!(buf[ES as usize..ES as usize + 8].iter().all(|b| *b == 0xb1));
            assert!(
                buf[ES as usize + 8..ES as usize + 16]
                    .iter()
                    .all(|b| *b == 0)
            );
            assert!(
                buf[3 * ES as usize..4 * ES as usize]
                    .iter()
                    .all(|b| *b == 0)
            );
        };
        expect_v(&read(&store, "v", 0, (4 * ES) as u32).await);
        let s1 = read(&store, "v@s1", 0, (4 * ES) as u32).await;
        assert!(s1[..ES as usize].iter().all(|b| *b == 0xa1));
        assert!(s1[ES as usize..2 * ES as usize].iter().all(|b| *b == 0));
        assert!(
            s1[3 * ES as usize..3 * ES as usize + 100]
                .iter()
                .all(|b| *b == 0xa3)
        );
        let s2_before = read(&store, "v@s2", 0, (4 * ES) as u32).await;

        // Delete the oldest snapshot: its extents merge into s2's layer.
        assert_eq!(store.delete("v@s1", false).await?, vec!["v@s1".to_owned()]);
        assert_eq!(read(&store, "v@s2", 0, (4 * ES) as u32).await, s2_before);
        expect_v(&read(&store, "v", 0, (4 * ES) as u32).await);
        // Delete s2 too: merged into the live top layer.
        store.delete("v@s2", false).await?;
        expect_v(&read(&store, "v", 0, (4 * ES) as u32).await);
        store
            .get("v")
            .expect("v")
            .flush()
            .await
            .map_err(|e| StoreError::Inconsistent(e.to_string()))?;
        let status = store
            .get("v")
            .expect("v")
            .block_status(0, 1 << 20, false)
            .await;
        assert_eq!(status[0], ((2 * ES) as u32, 0));
        assert_eq!(status[1], ((14 * ES) as u32, 3));
        drop(store);

        // Reopen: the catalog names exactly the live layers, and the data is the same.
        std::fs::write(d.0.join("layers/999.data"), b"junk").expect("junk file");
        let store = Store::open(&d.0, ES)?;
        assert!(
            !d.0.join("layers/999.data").exists(),
            "leftover layer file kept"
        );
        let names: Vec<String> = store.list().await.into_iter().map(|v| v.name).collect();
        assert_eq!(names, ["v", "w", "w@ws"]);
        expect_v(&read(&store, "v", 0, (4 * ES) as u32).await);
        Ok(())
    }

    #[tokio::test]
    async fn allow_lists_persist_and_cover_snapshots() -> Result<(), StoreError> {
        let d = dir("authz");
        let store = Store::open(&d.0, ES)?;
        store.create("v", 1 << 20).await?;
        store.snapshot("v", "old").await?;
        assert!(matches!(
            store.authorize("v", vec!["bad name".into()]).await,
            Err(StoreError::InvalidName { .. })
        ));
        assert!(matches!(
            store.authorize("nope", Vec::new()).await,
            Err(StoreError::NotFound(_))
        ));
        let hosts = vec!["host-a.zone-1".to_owned()];
        let info = store.authorize("v", hosts.clone()).await?;
        assert_eq!(info.clients, hosts);
        store.snapshot("v", "new").await?;
        for name in ["v", "v@old", "v@new"] {
            assert_eq!(store.lookup(name).map(|e| e.clients), Some(hosts.clone()));
        }
        drop(store);
        let store = Store::open(&d.0, ES)?;
        for name in ["v", "v@old", "v@new"] {
            assert_eq!(store.lookup(name).map(|e| e.clients), Some(hosts.clone()));
        }
        store.authorize("v", Vec::new()).await?;
        assert_eq!(store.lookup("v@old").map(|e| e.clients), Some(Vec::new()));
        Ok(())
    }

    #[tokio::test]
    async fn delete_rules_and_validation() -> Result<(), StoreError> {
        let d = dir("rules");
        let store = Store::open(&d.0, ES)?;
        assert!(
            matches!(Store::open(&d.0, ES), Err(StoreError::Locked(_))),
            "a second daemon must not open the same data directory"
        );
        assert!(matches!(
            store.create("bad/name", 4096).await,
            Err(StoreError::InvalidName { .. })
        ));
        assert!(matches!(
            store.create("v", 1000).await,
            Err(StoreError::InvalidSize { .. })
        ));
        match store.create("v", MAX_VOLUME_SIZE + 512).await {
            Err(StoreError::InvalidSize { reason, .. }) => {
                assert!(reason.contains(&MAX_VOLUME_SIZE.to_string()), "{reason}");
            }
            other => panic!("expected InvalidSize, got {other:?}"),
        }
        store.create("v", 1 << 20).await?;
        assert!(matches!(
            store.create("v", 1 << 20).await,
            Err(StoreError::AlreadyExists(_))
        ));
        write(&store, "v", 0, 0x42, 4096).await;
        store.snapshot("v", "s").await?;
        store.clone_snapshot("v@s", "c").await?;
        store.snapshot("c", "cs").await?;
        store.clone_snapshot("c@cs", "cc").await?;
        assert_eq!(read(&store, "cc", 0, 4096).await, vec![0x42; 4096]);
        match store.delete("v", false).await {
            Err(StoreError::HasDependents { dependents, .. }) => {
                assert_eq!(dependents, ["cc", "c"]);
            }
            other => panic!("expected HasDependents, got {other:?}"),
        }
        // Deleting the clone of a clone is fine on its own.
        write(&store, "c", 4096, 0x43, 4096).await;
        assert_eq!(store.delete("v", true).await?, ["cc", "c", "v"]);
        assert!(store.list().await.is_empty());
        let left = std::fs::read_dir(d.0.join("layers"))
            .expect("layers")
            .count();
        assert_eq!(left, 0, "layer files left behind");
        Ok(())
    }
}
