//! I/O on one export (a volume or a read-only snapshot): reads through the layer chain,
//! copy-on-write writes, zeroing and trimming, block status and flush.
//!
//! Locking: every I/O holds the chain's read lock for its whole duration, so snapshot, resize
//! and merge (which take the write lock) see no I/O in flight. Writes that change the map
//! (first write to an extent, zeroing) also hold `alloc`, which serialises copy-on-write.
//! Writes to extents already in the top layer take neither `alloc` nor any map lock beyond a
//! lookup.
//!
//! Replication (next wave) has one place to hook in: every mutation goes through
//! [`Export::write`], [`Export::zero`] and [`Export::flush`], each of which returns only after
//! the local layer has the change; a replicated export would forward the same call to its
//! replicas and answer when enough of them have.

use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use thiserror::Error;
use tokio::sync::{Mutex, RwLock, RwLockWriteGuard};

use crate::error::StoreError;
use crate::layer::{ABSENT, DATA, Layer, ZERO};
use crate::proto::{alloc, errno};
use crate::uring::{PUNCH_HOLE, Uring, ZERO_RANGE};

/// An I/O request that failed.
#[derive(Debug, Error)]
pub enum IoError {
    /// The data file operation failed.
    #[error("data I/O failed")]
    Io(#[source] io::Error),
    /// Flushing the map failed.
    #[error("flush failed")]
    Flush(#[source] StoreError),
    /// `FAST_ZERO` was asked but zeroing needs a copy-on-write.
    #[error("zeroing this range is not fast")]
    NotFast,
    /// Write to a read-only export.
    #[error("export is read-only")]
    ReadOnly,
}

impl IoError {
    /// The NBD error number for this failure (proto.md "Error values").
    pub fn nbd_errno(&self) -> u32 {
        let os = match self {
            Self::NotFast => return errno::ENOTSUP,
            Self::ReadOnly => return errno::EPERM,
            Self::Io(e) => e.raw_os_error(),
            Self::Flush(StoreError::DataIo(e) | StoreError::Io { source: e, .. }) => {
                e.raw_os_error()
            }
            Self::Flush(_) => None,
        };
        match os {
            Some(libc::ENOSPC | libc::EDQUOT | libc::EFBIG) => errno::ENOSPC,
            Some(libc::ENOMEM) => errno::ENOMEM,
            _ => errno::EIO,
        }
    }
}

/// Part of what a read returns, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Piece {
    /// Bytes stored in a layer.
    Data(Vec<u8>),
    /// This many bytes read as zeroes: nothing is stored for them.
    Hole(u32),
}

impl Piece {
    /// Bytes of the range this piece covers.
    pub fn len(&self) -> u32 {
        match self {
            // A piece is never longer than a request (at most `MAX_PAYLOAD`).
            Self::Data(d) => d.len() as u32,
            Self::Hole(n) => *n,
        }
    }

    /// Whether the piece covers nothing (never true for pieces a read returns).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The `len` bytes that `pieces` describe, as one buffer (holes filled with zeroes).
pub fn flatten(pieces: Vec<Piece>, len: u32) -> Vec<u8> {
    let mut pieces = pieces;
    if let [Piece::Data(_)] = pieces[..]
        && let Some(Piece::Data(d)) = pieces.pop()
    {
        return d;
    }
    let mut out = vec![0u8; len as usize];
    let mut at = 0usize;
    for p in pieces {
        match p {
            Piece::Data(d) => {
                out[at..at + d.len()].copy_from_slice(&d);
                at += d.len();
            }
            Piece::Hole(n) => at += n as usize,
        }
    }
    out
}

/// How a zeroing request behaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ZeroMode {
    /// Keep the range allocated (`NO_HOLE`).
    pub no_hole: bool,
    /// Fail rather than copy (`FAST_ZERO`).
    pub fast: bool,
}

/// One export: a name, a size and a chain of layers (top first).
#[derive(Debug)]
pub struct Export {
    /// Export name.
    pub name: String,
    /// Snapshots are read-only.
    pub read_only: bool,
    size: AtomicU64,
    deleted: AtomicBool,
    /// Network clients allowed to open it (empty: any).
    clients: std::sync::RwLock<Vec<String>>,
    extent_size: u64,
    chain: RwLock<Vec<Arc<Layer>>>,
    alloc: Mutex<()>,
    flush_lock: Mutex<()>,
    ring: Uring,
}

/// Where the bytes of one extent come from.
type Source = Option<usize>;

fn resolve(chain: &[Arc<Layer>], first: u64, count: u64) -> Vec<Source> {
    let mut out: Vec<Source> = vec![None; count as usize];
    let mut done = vec![false; count as usize];
    let mut states = Vec::new();
    for (li, layer) in chain.iter().enumerate() {
        layer.get_range(first, count, &mut states);
        let mut pending = false;
        for (i, s) in states.iter().enumerate() {
            if done[i] {
                continue;
            }
            match *s {
                DATA => {
                    out[i] = Some(li);
                    done[i] = true;
                }
                ZERO => done[i] = true,
                _ => pending = true,
            }
        }
        if !pending {
            break;
        }
    }
    out
}

impl Export {
    /// A new export over `chain` (top first).
    pub fn new(
        name: String,
        read_only: bool,
        size: u64,
        extent_size: u64,
        chain: Vec<Arc<Layer>>,
        ring: Uring,
    ) -> Self {
        Self {
            name,
            read_only,
            size: AtomicU64::new(size),
            deleted: AtomicBool::new(false),
            clients: std::sync::RwLock::new(Vec::new()),
            extent_size,
            chain: RwLock::new(chain),
            alloc: Mutex::new(()),
            flush_lock: Mutex::new(()),
            ring,
        }
    }

    /// Current size in bytes.
    pub fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    /// Stops all I/O and returns the chain for a topology change (snapshot, resize, merge).
    pub(crate) async fn lock_chain(&self) -> RwLockWriteGuard<'_, Vec<Arc<Layer>>> {
        self.chain.write().await
    }

    /// Serialises with allocating writes (used by merges into the top layer).
    pub(crate) async fn lock_alloc(&self) -> tokio::sync::MutexGuard<'_, ()> {
        self.alloc.lock().await
    }

    /// The volume or snapshot was deleted; connections still open get `ESHUTDOWN`.
    pub fn is_deleted(&self) -> bool {
        self.deleted.load(Ordering::Acquire)
    }

    pub(crate) fn mark_deleted(&self) {
        self.deleted.store(true, Ordering::Release);
    }

    /// Network clients allowed to open this export (empty: any).
    pub fn clients(&self) -> Vec<String> {
        self.clients
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub(crate) fn set_clients(&self, clients: Vec<String>) {
        *self.clients.write().unwrap_or_else(|p| p.into_inner()) = clients;
    }

    pub(crate) fn set_size(&self, size: u64) {
        self.size.store(size, Ordering::Release);
    }

    /// Bytes allocated in this export's own top layer.
    pub async fn allocated_bytes(&self) -> u64 {
        let chain = self.chain.read().await;
        chain.first().map_or(0, |l| l.allocated()) * self.extent_size
    }

    fn extent_range(&self, offset: u64, len: u64) -> (u64, u64) {
        let first = offset / self.extent_size;
        let last = (offset + len - 1) / self.extent_size;
        (first, last - first + 1)
    }

    /// Reads `len` bytes at `offset` (bounds were checked by the caller).
    pub async fn read(&self, offset: u64, len: u32) -> Result<Vec<u8>, IoError> {
        Ok(flatten(self.read_pieces(offset, len).await?, len))
    }

    /// Reads `len` bytes at `offset` as consecutive pieces: bytes stored in a layer, or
    /// ranges nothing is stored for, which read as zeroes (sent as holes, not as zeroes).
    pub async fn read_pieces(&self, offset: u64, len: u32) -> Result<Vec<Piece>, IoError> {
        let chain = self.chain.read().await;
        let es = self.extent_size;
        let (first, count) = self.extent_range(offset, u64::from(len));
        let sources = resolve(&chain, first, count);
        let end = offset + u64::from(len);
        // Group consecutive extents with the same source.
        let mut runs: Vec<(Source, u64, u64)> = Vec::new();
        for (i, src) in sources.into_iter().enumerate() {
            let ext = first + i as u64;
            let s = (ext * es).max(offset);
            let e = ((ext + 1) * es).min(end);
            match runs.last_mut() {
                Some((rs, _, re)) if *rs == src => *re = e,
                _ => runs.push((src, s, e)),
            }
        }
        let mut out = Vec::with_capacity(runs.len());
        for (src, s, e) in runs {
            out.push(match src {
                Some(li) => Piece::Data(
                    self.ring
                        .read_at(&chain[li].data, s, (e - s) as usize)
                        .await
                        .map_err(IoError::Io)?,
                ),
                None => Piece::Hole((e - s) as u32),
            });
        }
        Ok(out)
    }

    /// Writes `data` at `offset`; with `fua`, the data is durable when this returns.
    pub async fn write(&self, offset: u64, data: Vec<u8>, fua: bool) -> Result<(), IoError> {
        if self.read_only {
            return Err(IoError::ReadOnly);
        }
        self.write_inner(offset, data).await?;
        if fua {
            self.flush().await?;
        }
        Ok(())
    }

    async fn write_inner(&self, offset: u64, data: Vec<u8>) -> Result<(), IoError> {
        let chain = self.chain.read().await;
        let top = &chain[0];
        let len = data.len() as u64;
        let (first, count) = self.extent_range(offset, len);
        let mut states = Vec::new();
        top.get_range(first, count, &mut states);
        if states.iter().all(|s| *s == DATA) {
            return self
                .ring
                .write_at(&top.data, offset, data)
                .await
                .map_err(IoError::Io);
        }
        let _alloc = self.alloc.lock().await;
        top.get_range(first, count, &mut states);
        let end = offset + len;
        let es = self.extent_size;
        let size = self.size();
        for (i, state) in states.iter().enumerate() {
            if *state == DATA {
                continue;
            }
            let ext = first + i as u64;
            let (es_start, es_end) = (ext * es, ((ext + 1) * es).min(size));
            if offset <= es_start && end >= es_end {
                continue; // fully overwritten
            }
            self.prepare_partial(&chain, ext, es_start, es_end, *state)
                .await?;
        }
        self.ring
            .write_at(&top.data, offset, data)
            .await
            .map_err(IoError::Io)?;
        for (i, state) in states.iter().enumerate() {
            if *state != DATA {
                top.set_range(first + i as u64, 1, DATA);
            }
        }
        Ok(())
    }

    /// Before part of a non-DATA extent becomes DATA: copy the lower layer's bytes up, or make
    /// sure the top file's region is a hole (it may hold bytes of a write that was lost from
    /// the map by a crash).
    async fn prepare_partial(
        &self,
        chain: &[Arc<Layer>],
        ext: u64,
        start: u64,
        end: u64,
        state: u8,
    ) -> Result<(), IoError> {
        let top = &chain[0];
        let below = if state == ABSENT && chain.len() > 1 {
            resolve(&chain[1..], ext, 1)[0].map(|li| li + 1)
        } else {
            None
        };
        match below {
            Some(li) => {
                let buf = self
                    .ring
                    .read_at(&chain[li].data, start, (end - start) as usize)
                    .await
                    .map_err(IoError::Io)?;
                self.ring
                    .write_at(&top.data, start, buf)
                    .await
                    .map_err(IoError::Io)
            }
            None => self
                .ring
                .fallocate(&top.data, PUNCH_HOLE, start, end - start)
                .await
                .map_err(IoError::Io),
        }
    }

    /// Zeroes (or, for TRIM, discards) a range; reads of it return zeroes afterwards.
    pub async fn zero(
        &self,
        offset: u64,
        len: u32,
        mode: ZeroMode,
        fua: bool,
    ) -> Result<(), IoError> {
        if self.read_only {
            return Err(IoError::ReadOnly);
        }
        self.zero_inner(offset, u64::from(len), mode).await?;
        if fua {
            self.flush().await?;
        }
        Ok(())
    }

    async fn zero_inner(&self, offset: u64, len: u64, mode: ZeroMode) -> Result<(), IoError> {
        let chain = self.chain.read().await;
        let _alloc = self.alloc.lock().await;
        let top = &chain[0];
        let es = self.extent_size;
        let size = self.size();
        let end = offset + len;
        let (first, count) = self.extent_range(offset, len);
        let mut states = Vec::new();
        top.get_range(first, count, &mut states);
        let below: Vec<Source> = if chain.len() > 1 {
            resolve(&chain[1..], first, count)
        } else {
            vec![None; count as usize]
        };
        let span = |i: usize| {
            let ext = first + i as u64;
            let (s, e) = (ext * es, ((ext + 1) * es).min(size));
            (s, e, s.max(offset), e.min(end))
        };
        // FAST_ZERO: fail before changing anything if some extent needs a copy.
        if mode.fast {
            for (i, st) in states.iter().enumerate() {
                let (s, e, zs, ze) = span(i);
                let full = zs == s && ze == e;
                if !full && *st == ABSENT && below[i].is_some() {
                    return Err(IoError::NotFast);
                }
            }
        }
        let io = IoError::Io;
        for (i, st) in states.iter().enumerate() {
            let ext = first + i as u64;
            let (s, e, zs, ze) = span(i);
            if zs == s && ze == e {
                if mode.no_hole {
                    self.ring
                        .fallocate(&top.data, ZERO_RANGE, s, e - s)
                        .await
                        .map_err(io)?;
                    top.set_range(ext, 1, DATA);
                } else {
                    self.ring
                        .fallocate(&top.data, PUNCH_HOLE, s, e - s)
                        .await
                        .map_err(io)?;
                    let st = if chain.len() > 1 { ZERO } else { ABSENT };
                    top.set_range(ext, 1, st);
                }
                continue;
            }
            let fl = if mode.no_hole { ZERO_RANGE } else { PUNCH_HOLE };
            match *st {
                DATA => {
                    self.ring
                        .fallocate(&top.data, fl, zs, ze - zs)
                        .await
                        .map_err(io)?;
                }
                ABSENT if below[i].is_some() => {
                    self.prepare_partial(&chain, ext, s, e, ABSENT).await?;
                    self.ring
                        .fallocate(&top.data, fl, zs, ze - zs)
                        .await
                        .map_err(io)?;
                    top.set_range(ext, 1, DATA);
                }
                _ if mode.no_hole => {
                    // Reads as zero already; allocate as asked.
                    self.prepare_partial(&chain, ext, s, e, ZERO).await?;
                    self.ring
                        .fallocate(&top.data, ZERO_RANGE, zs, ze - zs)
                        .await
                        .map_err(io)?;
                    top.set_range(ext, 1, DATA);
                }
                _ => {} // already reads as zeroes
            }
        }
        Ok(())
    }

    /// `base:allocation` descriptors `(length, flags)` for a range.
    pub async fn block_status(&self, offset: u64, len: u32, req_one: bool) -> Vec<(u32, u32)> {
        let chain = self.chain.read().await;
        let es = self.extent_size;
        let end = offset + u64::from(len);
        let (first, count) = self.extent_range(offset, u64::from(len));
        let sources = resolve(&chain, first, count);
        let mut out: Vec<(u32, u32)> = Vec::new();
        for (i, src) in sources.into_iter().enumerate() {
            let ext = first + i as u64;
            let s = (ext * es).max(offset);
            let e = ((ext + 1) * es).min(end);
            let flags = if src.is_some() {
                0
            } else {
                alloc::HOLE | alloc::ZERO
            };
            match out.last_mut() {
                Some((l, f)) if *f == flags => *l += (e - s) as u32,
                _ => out.push(((e - s) as u32, flags)),
            }
        }
        if req_one {
            out.truncate(1);
        }
        out
    }

    /// Makes every write completed so far durable (data, then the map that points at it).
    pub async fn flush(&self) -> Result<(), IoError> {
        self.persist().await.map_err(IoError::Flush)
    }

    /// [`Export::flush`] for the store (a clean stop flushes every volume).
    pub(crate) async fn persist(&self) -> Result<(), StoreError> {
        if self.read_only {
            return Ok(());
        }
        let _f = self.flush_lock.lock().await;
        let chain = self.chain.read().await;
        chain[0].persist(&self.ring).await
    }
}
