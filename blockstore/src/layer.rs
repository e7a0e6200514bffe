//! One layer: a sparse data file plus its extent map, kept in memory and persisted on flush.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Read;
use std::sync::{Arc, Mutex, MutexGuard};

use crate::error::StoreError;
use crate::format::{self, Layout};
use crate::uring::Uring;

/// Extent state: not in this layer (look below).
pub const ABSENT: u8 = 0;
/// Extent state: the bytes are in this layer's data file.
pub const DATA: u8 = 1;
/// Extent state: the extent reads as zeroes.
pub const ZERO: u8 = 2;

/// A layer of a volume chain.
#[derive(Debug)]
pub struct Layer {
    /// Layer id (file names).
    pub id: u64,
    /// The sparse data file.
    pub data: Arc<File>,
    /// The map file.
    map_file: Arc<File>,
    state: Mutex<MapState>,
    /// Serialises persists so map bytes reach the file in capture order.
    persist_lock: tokio::sync::Mutex<()>,
}

#[derive(Debug, Default)]
struct MapState {
    states: Vec<u8>,
    /// Extents whose map byte changed since the last persist.
    dirty: BTreeMap<u64, ()>,
}

impl Layer {
    /// Creates the files of a new, empty layer of `size` bytes.
    pub fn create(layout: &Layout, id: u64, size: u64, extents: u64) -> Result<Self, StoreError> {
        let data_path = layout.data(id);
        let map_path = layout.map(id);
        let data = format::open_rw(&data_path, true)?;
        data.set_len(size)
            .map_err(StoreError::io("truncate", &data_path))?;
        data.sync_all()
            .map_err(StoreError::io("fsync", &data_path))?;
        let map = format::open_rw(&map_path, true)?;
        map.set_len(extents)
            .map_err(StoreError::io("truncate", &map_path))?;
        map.sync_all().map_err(StoreError::io("fsync", &map_path))?;
        format::sync_dir(&layout.layers())?;
        Ok(Self {
            id,
            data: Arc::new(data),
            map_file: Arc::new(map),
            state: Mutex::new(MapState {
                states: vec![ABSENT; extents as usize],
                dirty: BTreeMap::new(),
            }),
            persist_lock: tokio::sync::Mutex::new(()),
        })
    }

    /// Opens an existing layer and loads its map.
    pub fn open(layout: &Layout, id: u64) -> Result<Self, StoreError> {
        let data_path = layout.data(id);
        let map_path = layout.map(id);
        let data = format::open_rw(&data_path, false)?;
        let mut map = format::open_rw(&map_path, false)?;
        let mut states = Vec::new();
        map.read_to_end(&mut states)
            .map_err(StoreError::io("read", &map_path))?;
        if let Some(bad) = states.iter().position(|s| *s > ZERO) {
            return Err(StoreError::Inconsistent(format!(
                "layer {id}: map byte {bad} has unknown state {}",
                states[bad]
            )));
        }
        Ok(Self {
            id,
            data: Arc::new(data),
            map_file: Arc::new(map),
            state: Mutex::new(MapState {
                states,
                dirty: BTreeMap::new(),
            }),
            persist_lock: tokio::sync::Mutex::new(()),
        })
    }

    fn lock(&self) -> MutexGuard<'_, MapState> {
        // A panic while holding this lock leaves the map valid (every update is one store),
        // so a poisoned lock is recovered.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// State of extent `idx` (`ABSENT` beyond the map).
    pub fn get(&self, idx: u64) -> u8 {
        self.lock()
            .states
            .get(idx as usize)
            .copied()
            .unwrap_or(ABSENT)
    }

    /// States of `count` extents from `first`.
    pub fn get_range(&self, first: u64, count: u64, out: &mut Vec<u8>) {
        let st = self.lock();
        out.clear();
        out.extend(
            (first..first + count).map(|i| st.states.get(i as usize).copied().unwrap_or(ABSENT)),
        );
    }

    /// Sets extent states (in memory; persisted by [`Layer::persist`]).
    pub fn set_range(&self, first: u64, count: u64, state: u8) {
        let mut st = self.lock();
        let end = (first + count) as usize;
        if st.states.len() < end {
            st.states.resize(end, ABSENT);
        }
        for i in first..first + count {
            if st.states[i as usize] != state {
                st.states[i as usize] = state;
                st.dirty.insert(i, ());
            }
        }
    }

    /// Number of extents in the map.
    pub fn extents(&self) -> u64 {
        self.lock().states.len() as u64
    }

    /// Number of extents holding data in this layer.
    pub fn allocated(&self) -> u64 {
        self.lock().states.iter().filter(|s| **s == DATA).count() as u64
    }

    /// Grows the data file and map to `size` bytes / `extents` extents.
    pub fn grow(&self, layout: &Layout, size: u64, extents: u64) -> Result<(), StoreError> {
        let data_path = layout.data(self.id);
        let map_path = layout.map(self.id);
        if self.data.metadata().map(|m| m.len()).unwrap_or(0) < size {
            self.data
                .set_len(size)
                .map_err(StoreError::io("truncate", &data_path))?;
        }
        self.data
            .sync_all()
            .map_err(StoreError::io("fsync", &data_path))?;
        let mut st = self.lock();
        if (st.states.len() as u64) < extents {
            st.states.resize(extents as usize, ABSENT);
            self.map_file
                .set_len(extents)
                .map_err(StoreError::io("truncate", &map_path))?;
            self.map_file
                .sync_all()
                .map_err(StoreError::io("fsync", &map_path))?;
        }
        Ok(())
    }

    /// Makes the data and map durable: fdatasync the data file, then write the map bytes that
    /// changed before that sync, then fdatasync the map.
    pub async fn persist(&self, ring: &Uring) -> Result<(), StoreError> {
        let _order = self.persist_lock.lock().await;
        // Capture the dirty set before syncing data: every byte captured describes data that
        // completed before the capture, hence is covered by the sync below.
        let captured: Vec<(u64, u8)> = {
            let mut st = self.lock();
            let dirty = std::mem::take(&mut st.dirty);
            dirty
                .into_keys()
                .map(|i| (i, st.states[i as usize]))
                .collect()
        };
        let result = self.write_map(ring, &captured).await;
        if result.is_err() {
            // Keep them dirty so the next flush retries.
            let mut st = self.lock();
            for (i, _) in &captured {
                st.dirty.insert(*i, ());
            }
        }
        result
    }

    async fn write_map(&self, ring: &Uring, captured: &[(u64, u8)]) -> Result<(), StoreError> {
        ring.fdatasync(&self.data)
            .await
            .map_err(StoreError::DataIo)?;
        if captured.is_empty() {
            return Ok(());
        }
        // Coalesce consecutive indices into one write each.
        let mut runs: Vec<(u64, Vec<u8>)> = Vec::new();
        for &(i, s) in captured {
            match runs.last_mut() {
                Some((start, bytes)) if *start + bytes.len() as u64 == i => bytes.push(s),
                _ => runs.push((i, vec![s])),
            }
        }
        for (start, bytes) in runs {
            ring.write_at(&self.map_file, start, bytes)
                .await
                .map_err(StoreError::DataIo)?;
        }
        ring.fdatasync(&self.map_file)
            .await
            .map_err(StoreError::DataIo)
    }
}
