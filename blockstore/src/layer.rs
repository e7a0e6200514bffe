//! One layer: a sparse data file plus its extent map, kept in memory and persisted on flush.
//!
//! The in-memory map holds only chunks of [`CHUNK`] extents that have an extent in them that
//! is not `ABSENT`, so it costs what the layer holds, not what the volume could hold (an empty
//! 15 TiB layer costs nothing). Opening a layer reads only the written parts of its (sparse)
//! map file, found with `SEEK_DATA` / `SEEK_HOLE`.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::os::unix::fs::FileExt;
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

/// Extents per chunk of the in-memory map (4 KiB of map per 256 MiB of volume at 64 KiB
/// extents).
pub const CHUNK: u64 = 4096;

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

/// The extent map: chunks that hold a state other than `ABSENT`.
#[derive(Debug, Default)]
struct MapState {
    /// Extents the map covers (beyond: `ABSENT`).
    len: u64,
    chunks: BTreeMap<u64, Box<[u8]>>,
    /// Extents whose map byte changed since the last persist.
    dirty: BTreeSet<u64>,
}

impl MapState {
    fn get(&self, idx: u64) -> u8 {
        self.chunks
            .get(&(idx / CHUNK))
            .map_or(ABSENT, |c| c[(idx % CHUNK) as usize])
    }

    /// Sets one extent; returns whether it changed.
    fn set(&mut self, idx: u64, state: u8) -> bool {
        let slot = (idx % CHUNK) as usize;
        match self.chunks.get_mut(&(idx / CHUNK)) {
            Some(c) if c[slot] == state => false,
            Some(c) => {
                c[slot] = state;
                true
            }
            None if state == ABSENT => false,
            None => {
                let mut c = vec![ABSENT; CHUNK as usize].into_boxed_slice();
                c[slot] = state;
                self.chunks.insert(idx / CHUNK, c);
                true
            }
        }
    }

    fn get_range(&self, first: u64, count: u64, out: &mut Vec<u8>) {
        out.clear();
        let end = first + count;
        let mut i = first;
        while i < end {
            let off = (i % CHUNK) as usize;
            let n = (CHUNK - i % CHUNK).min(end - i) as usize;
            match self.chunks.get(&(i / CHUNK)) {
                Some(c) => out.extend_from_slice(&c[off..off + n]),
                None => out.resize(out.len() + n, ABSENT),
            }
            i += n as u64;
        }
    }

    /// Every extent that is not `ABSENT`, in order.
    fn present(&self) -> impl Iterator<Item = (u64, u8)> + '_ {
        self.chunks.iter().flat_map(|(ci, c)| {
            c.iter()
                .enumerate()
                .filter(|(_, s)| **s != ABSENT)
                .map(move |(i, s)| (ci * CHUNK + i as u64, *s))
        })
    }
}

/// Reads the written parts of a sparse map file into a map of `len` extents.
fn load_map(id: u64, map: &File, path: &std::path::Path) -> Result<MapState, StoreError> {
    use rustix::fs::{SeekFrom, seek};
    let len = map.metadata().map_err(StoreError::io("stat", path))?.len();
    let mut st = MapState {
        len,
        ..MapState::default()
    };
    let mut pos = 0u64;
    let mut buf = vec![0u8; 1 << 20];
    while pos < len {
        let start = match seek(map, SeekFrom::Data(pos)) {
            Ok(s) => s,
            // No data after `pos`.
            Err(rustix::io::Errno::NXIO) => break,
            Err(e) => return Err(StoreError::io("lseek(SEEK_DATA)", path)(e.into())),
        };
        let end = seek(map, SeekFrom::Hole(start))
            .map_err(|e| StoreError::io("lseek(SEEK_HOLE)", path)(e.into()))?
            .min(len);
        let mut at = start;
        while at < end {
            let n = ((end - at) as usize).min(buf.len());
            map.read_exact_at(&mut buf[..n], at)
                .map_err(StoreError::io("read", path))?;
            for (i, &b) in buf[..n].iter().enumerate() {
                if b > ZERO {
                    return Err(StoreError::Inconsistent(format!(
                        "layer {id}: map byte {} has unknown state {b}",
                        at + i as u64
                    )));
                }
                st.set(at + i as u64, b);
            }
            at += n as u64;
        }
        pos = end;
    }
    Ok(st)
}

impl Layer {
    /// Creates the files of a new, empty layer of `size` bytes. On error no file is left.
    pub fn create(layout: &Layout, id: u64, size: u64, extents: u64) -> Result<Self, StoreError> {
        let data_path = layout.data(id);
        let map_path = layout.map(id);
        let made = (|| {
            let data = format::open_rw(&data_path, true)?;
            data.set_len(size).map_err(|e| {
                if e.raw_os_error() == Some(libc::EFBIG) {
                    StoreError::InvalidSize {
                        size,
                        reason: "larger than the largest file the data directory's filesystem holds",
                    }
                } else {
                    StoreError::io("truncate", &data_path)(e)
                }
            })?;
            data.sync_all()
                .map_err(StoreError::io("fsync", &data_path))?;
            let map = format::open_rw(&map_path, true)?;
            map.set_len(extents)
                .map_err(StoreError::io("truncate", &map_path))?;
            map.sync_all().map_err(StoreError::io("fsync", &map_path))?;
            format::sync_dir(&layout.layers())?;
            Ok((data, map))
        })();
        let (data, map) = made.inspect_err(|_| {
            let _ = std::fs::remove_file(&data_path);
            let _ = std::fs::remove_file(&map_path);
        })?;
        Ok(Self {
            id,
            data: Arc::new(data),
            map_file: Arc::new(map),
            state: Mutex::new(MapState {
                len: extents,
                ..MapState::default()
            }),
            persist_lock: tokio::sync::Mutex::new(()),
        })
    }

    /// Opens an existing layer and loads its map (only the parts that were ever written).
    pub fn open(layout: &Layout, id: u64) -> Result<Self, StoreError> {
        let data_path = layout.data(id);
        let map_path = layout.map(id);
        let data = format::open_rw(&data_path, false)?;
        let map = format::open_rw(&map_path, false)?;
        let state = load_map(id, &map, &map_path)?;
        Ok(Self {
            id,
            data: Arc::new(data),
            map_file: Arc::new(map),
            state: Mutex::new(state),
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
        self.lock().get(idx)
    }

    /// States of `count` extents from `first`.
    pub fn get_range(&self, first: u64, count: u64, out: &mut Vec<u8>) {
        self.lock().get_range(first, count, out);
    }

    /// Sets extent states (in memory; persisted by [`Layer::persist`]).
    pub fn set_range(&self, first: u64, count: u64, state: u8) {
        let mut st = self.lock();
        st.len = st.len.max(first + count);
        for i in first..first + count {
            if st.set(i, state) {
                st.dirty.insert(i);
            }
        }
    }

    /// Number of extents in the map.
    pub fn extents(&self) -> u64 {
        self.lock().len
    }

    /// Every extent that is not `ABSENT` in this layer, with its state, in order.
    pub fn present(&self) -> Vec<(u64, u8)> {
        self.lock().present().collect()
    }

    /// Number of extents holding data in this layer.
    pub fn allocated(&self) -> u64 {
        self.lock().present().filter(|(_, s)| *s == DATA).count() as u64
    }

    /// Bytes of memory the in-memory map holds (chunks), for tests and metrics.
    pub fn map_bytes(&self) -> u64 {
        self.lock().chunks.len() as u64 * CHUNK
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
        if st.len < extents {
            st.len = extents;
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
            dirty.into_iter().map(|i| (i, st.get(i))).collect()
        };
        let result = self.write_map(ring, &captured).await;
        if result.is_err() {
            // Keep them dirty so the next flush retries.
            let mut st = self.lock();
            for (i, _) in &captured {
                st.dirty.insert(*i);
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

#[cfg(test)]
mod tests {
    use super::*;

    struct Dir(std::path::PathBuf);
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[tokio::test]
    async fn map_memory_follows_what_is_allocated_and_reloads() -> Result<(), StoreError> {
        let dir = Dir(std::env::temp_dir().join(format!("slw-layer-{}", std::process::id())));
        let layout = Layout::new(&dir.0);
        std::fs::create_dir_all(layout.layers()).expect("layers dir");
        let ring = Uring::new().map_err(StoreError::DataIo)?;
        // A 15 TiB layer of 64 KiB extents.
        let size = 15u64 << 40;
        let extents = size / (64 * 1024);
        let layer = Layer::create(&layout, 1, size, extents)?;
        assert_eq!(layer.map_bytes(), 0, "an empty layer holds no map");
        layer.set_range(0, 1, DATA);
        layer.set_range(extents / 2, 3, DATA);
        layer.set_range(extents - 1, 1, ZERO);
        assert_eq!(layer.map_bytes(), 3 * CHUNK);
        let mut states = Vec::new();
        layer.get_range(extents / 2 - 1, 5, &mut states);
        assert_eq!(states, [ABSENT, DATA, DATA, DATA, ABSENT]);
        layer.persist(&ring).await?;
        drop(layer);

        let layer = Layer::open(&layout, 1)?;
        assert_eq!(layer.extents(), extents);
        let mid = extents / 2;
        assert_eq!(
            layer.present(),
            [
                (0, DATA),
                (mid, DATA),
                (mid + 1, DATA),
                (mid + 2, DATA),
                (extents - 1, ZERO)
            ]
        );
        assert_eq!(layer.allocated(), 4);
        assert_eq!(layer.map_bytes(), 3 * CHUNK);
        // An unknown state on disk is refused, naming the extent.
        let map = format::open_rw(&layout.map(1), false)?;
        map.write_all_at(&[9], 12345).expect("corrupt the map");
        drop(layer);
        match Layer::open(&layout, 1) {
            Err(StoreError::Inconsistent(m)) => assert!(m.contains("map byte 12345"), "{m}"),
            other => panic!("corrupt map accepted: {other:?}"),
        }
        Ok(())
    }
}
