//! The io_uring seam: every data-file read, write, fdatasync and fallocate of the store.
//!
//! A task submits its operation itself (one `io_uring_enter`) and reaps the completion queue
//! under the same lock, so operations the kernel completes inline (reads and writes that hit
//! the page cache) finish without a thread hop or a wake-up. Completions that happen later
//! (fsync, fallocate, cache misses) signal an eventfd registered with
//! `IORING_REGISTER_EVENTFD_ASYNC`, which a tokio task watches to reap them and wake their
//! waiters.
//!
//! This is the only module with `unsafe`: the kernel reads and writes buffers through raw
//! pointers. Each operation's buffer and file live in the ring's slot table from submission
//! until its completion is reaped, whatever happens to the future that asked for it, and the
//! ring is not torn down while operations are in flight.

use std::collections::HashMap;
use std::fs::File;
use std::future::Future;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

use io_uring::{IoUring, opcode, squeue, types};
use tokio::io::unix::AsyncFd;

/// `fallocate` mode that frees a range and keeps the file size.
pub const PUNCH_HOLE: i32 = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
/// `fallocate` mode that zeroes a range and keeps it allocated.
pub const ZERO_RANGE: i32 = libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE;

const RING_ENTRIES: u32 = 256;

#[derive(Debug)]
enum Kind {
    Read,
    Write,
    Fdatasync,
    Fallocate { mode: i32, len: u64 },
}

/// An operation in the kernel's hands.
#[derive(Debug)]
struct Slot {
    /// Kept alive until the completion is reaped (the kernel uses its fd).
    _file: Arc<File>,
    /// Kept alive (and unmoved: only the Vec header moves) until the completion is reaped.
    /// For reads the kernel fills its spare capacity; `len` is set from the result.
    buf: Vec<u8>,
    read: bool,
    result: Option<i32>,
    waker: Option<Waker>,
    /// The future was dropped: discard the slot when the completion arrives.
    abandoned: bool,
}

struct Ring {
    // Field order matters for Drop: see `impl Drop for Ring`.
    ring: IoUring,
    slots: HashMap<u64, Slot>,
    next: u64,
}

impl Ring {
    /// Enables eventfd notifications only while some operation waits for the kernel, so that
    /// completions reaped inline by their submitter cost no wake-up. Called with the lock held
    /// after every reap; enabling is followed by a reap, so a completion that arrived before
    /// notifications were on is not missed.
    fn arm(&mut self) {
        let waiting = self
            .slots
            .values()
            .any(|s| s.result.is_none() && !s.abandoned);
        let disabled = self.ring.completion().eventfd_disabled();
        if waiting && disabled {
            self.ring.completion().enable_eventfd();
            self.reap();
        } else if !waiting && !disabled {
            self.ring.completion().disable_eventfd();
        }
    }

    fn reap(&mut self) {
        let done: Vec<(u64, i32)> = self
            .ring
            .completion()
            .map(|c| (c.user_data(), c.result()))
            .collect();
        for (token, res) in done {
            let remove = match self.slots.get_mut(&token) {
                Some(slot) if slot.abandoned => true,
                Some(slot) => {
                    slot.result = Some(res);
                    if let Some(w) = slot.waker.take() {
                        w.wake();
                    }
                    false
                }
                None => false,
            };
            if remove {
                self.slots.remove(&token);
            }
        }
    }

    fn push(&mut self, entry: &squeue::Entry) -> io::Result<()> {
        loop {
            // SAFETY: every pointer in `entry` refers to a buffer held by a slot of
            // `self.slots`, which keeps it (and the file) alive until the completion for this
            // entry is reaped, and the ring waits for all completions before it is freed.
            if unsafe { self.ring.submission().push(entry) }.is_ok() {
                return Ok(());
            }
            // Submission queue full: hand the batch to the kernel and retry.
            self.ring.submit()?;
            self.reap();
        }
    }
}

impl std::fmt::Debug for Ring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ring")
            .field("in_flight", &self.slots.len())
            .finish()
    }
}

impl Drop for Ring {
    fn drop(&mut self) {
        // Buffers in `slots` must outlive the kernel's use of them: wait for every in-flight
        // operation before the slots (and then the ring) are freed.
        for _ in 0..1_000_000 {
            if !self.slots.values().any(|s| s.result.is_none()) {
                break;
            }
            if self.ring.submit_and_wait(1).is_err() {
                break;
            }
            self.reap();
        }
    }
}

#[derive(Debug)]
struct Shared {
    ring: Mutex<Ring>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Ring> {
        // Ring state stays consistent across a panic (each update is self-contained).
        self.ring.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Handle to the store's rings (one per CPU, each used mostly by one thread so that
/// submissions from different tokio workers do not contend). Cloning shares them.
#[derive(Debug, Clone)]
pub struct Uring {
    rings: Arc<[Arc<Shared>]>,
}

/// A small per-thread index, so each thread keeps to one ring.
fn thread_slot() -> usize {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static SLOT: usize = NEXT.fetch_add(1, Ordering::Relaxed);
    }
    SLOT.with(|s| *s)
}

impl Uring {
    /// Creates the rings and their completion watchers; must be called inside a tokio runtime.
    pub fn new() -> io::Result<Self> {
        let n = std::thread::available_parallelism().map_or(2, |n| n.get().clamp(2, 8));
        let rings = (0..n)
            .map(|_| Self::new_ring())
            .collect::<io::Result<Vec<_>>>()?;
        Ok(Self {
            rings: rings.into(),
        })
    }

    fn new_ring() -> io::Result<Arc<Shared>> {
        let handle = tokio::runtime::Handle::try_current()
            .map_err(|_| io::Error::other("io_uring: no tokio runtime"))?;
        let mut ring = IoUring::new(RING_ENTRIES)?;
        // SAFETY: plain syscall with constant flags; the result is checked below.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` was just returned by eventfd and is owned by nobody else.
        let efd = unsafe { OwnedFd::from_raw_fd(fd) };
        ring.submitter().register_eventfd(efd.as_raw_fd())?;
        ring.completion().disable_eventfd();
        let shared = Arc::new(Shared {
            ring: Mutex::new(Ring {
                ring,
                slots: HashMap::new(),
                next: 0,
            }),
        });
        let _guard = handle.enter();
        // SAFETY: `efd` is an open eventfd that the AsyncFd owns from here on; nothing else can
        // close it or make its raw fd refer to another file.
        let afd = unsafe { AsyncFd::register_with_interest(efd, tokio::io::Interest::READABLE) }
            .map_err(|e| io::Error::other(e.to_string()))?;
        let weak = Arc::downgrade(&shared);
        handle.spawn(async move {
            loop {
                let Ok(mut guard) = afd.readable().await else {
                    return;
                };
                let mut counter = [0u8; 8];
                // SAFETY: reading 8 bytes into an 8-byte buffer from our non-blocking eventfd.
                let _ = unsafe {
                    libc::read(afd.as_raw_fd(), counter.as_mut_ptr().cast(), counter.len())
                };
                guard.clear_ready();
                let Some(shared) = weak.upgrade() else {
                    return;
                };
                let mut ring = shared.lock();
                ring.reap();
                ring.arm();
            }
        });
        Ok(shared)
    }

    fn op(&self, file: &Arc<File>, offset: u64, kind: Kind, buf: Vec<u8>) -> Op {
        Op {
            shared: Arc::clone(&self.rings[thread_slot() % self.rings.len()]),
            state: OpState::New {
                file: Arc::clone(file),
                offset,
                kind,
                buf,
            },
        }
    }

    /// Reads `len` bytes at `offset`; bytes past the end of the file read as zero.
    pub async fn read_at(&self, file: &Arc<File>, offset: u64, len: usize) -> io::Result<Vec<u8>> {
        let (_, mut buf) = self
            .op(file, offset, Kind::Read, Vec::with_capacity(len))
            .await?;
        // Short read: past the end of file (zeroes) or, rarely, a partial read.
        while buf.len() < len {
            let got = buf.len();
            let (n, part) = self
                .op(
                    file,
                    offset + got as u64,
                    Kind::Read,
                    Vec::with_capacity(len - got),
                )
                .await?;
            if n == 0 {
                buf.resize(len, 0);
                break;
            }
            buf.extend_from_slice(&part);
        }
        Ok(buf)
    }

    /// Writes all of `data` at `offset`.
    pub async fn write_at(&self, file: &Arc<File>, offset: u64, data: Vec<u8>) -> io::Result<()> {
        let total = data.len();
        let (n, buf) = self.op(file, offset, Kind::Write, data).await?;
        let mut done = n as usize;
        while done < total {
            // Short write (rare on regular files): write the rest from a copy.
            let (n, _) = self
                .op(
                    file,
                    offset + done as u64,
                    Kind::Write,
                    buf[done..].to_vec(),
                )
                .await?;
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::WriteZero,
                    format!("short write: {done} of {total} bytes"),
                ));
            }
            done += n as usize;
        }
        Ok(())
    }

    /// `fdatasync`.
    pub async fn fdatasync(&self, file: &Arc<File>) -> io::Result<()> {
        self.op(file, 0, Kind::Fdatasync, Vec::new())
            .await
            .map(drop)
    }

    /// `fallocate(mode, offset, len)`.
    pub async fn fallocate(
        &self,
        file: &Arc<File>,
        mode: i32,
        offset: u64,
        len: u64,
    ) -> io::Result<()> {
        self.op(file, offset, Kind::Fallocate { mode, len }, Vec::new())
            .await
            .map(drop)
    }
}

#[derive(Debug)]
enum OpState {
    New {
        file: Arc<File>,
        offset: u64,
        kind: Kind,
        buf: Vec<u8>,
    },
    Submitted(u64),
    Done,
}

/// One operation's future: resolves to (result, buffer).
#[derive(Debug)]
struct Op {
    shared: Arc<Shared>,
    state: OpState,
}

impl Future for Op {
    type Output = io::Result<(u32, Vec<u8>)>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        let mut ring = this.shared.lock();
        let token = match std::mem::replace(&mut this.state, OpState::Done) {
            OpState::New {
                file,
                offset,
                kind,
                mut buf,
            } => {
                let kind_is_read = matches!(kind, Kind::Read);
                if kind_is_read {
                    // The kernel writes into the spare capacity; nothing is initialised yet.
                    buf.clear();
                }
                let token = ring.next;
                ring.next = ring.next.wrapping_add(1);
                let fd = types::Fd(file.as_raw_fd());
                let entry = match kind {
                    Kind::Read => opcode::Read::new(fd, buf.as_mut_ptr(), buf.capacity() as u32)
                        .offset(offset)
                        .build(),
                    Kind::Write => opcode::Write::new(fd, buf.as_ptr(), buf.len() as u32)
                        .offset(offset)
                        .build(),
                    Kind::Fdatasync => opcode::Fsync::new(fd)
                        .flags(types::FsyncFlags::DATASYNC)
                        .build(),
                    Kind::Fallocate { mode, len } => opcode::Fallocate::new(fd, len)
                        .offset(offset)
                        .mode(mode)
                        .build(),
                }
                .user_data(token);
                ring.slots.insert(
                    token,
                    Slot {
                        _file: file,
                        read: kind_is_read,
                        buf,
                        result: None,
                        waker: None,
                        abandoned: false,
                    },
                );
                let submitted = ring.push(&entry).and_then(|()| ring.ring.submit());
                if let Err(e) = submitted {
                    // The entry may already be queued: let the slot be reaped as abandoned.
                    if let Some(s) = ring.slots.get_mut(&token) {
                        s.abandoned = true;
                    }
                    return Poll::Ready(Err(e));
                }
                ring.reap();
                token
            }
            OpState::Submitted(token) => {
                ring.reap();
                token
            }
            OpState::Done => return Poll::Ready(Err(io::Error::other("polled after completion"))),
        };
        let Some(slot) = ring.slots.get_mut(&token) else {
            return Poll::Ready(Err(io::Error::other("io_uring slot lost")));
        };
        match slot.result {
            Some(res) => {
                let Some(slot) = ring.slots.remove(&token) else {
                    return Poll::Ready(Err(io::Error::other("io_uring slot lost")));
                };
                let mut buf = slot.buf;
                if slot.read && res > 0 {
                    let n = (res as usize).min(buf.capacity());
                    // SAFETY: the kernel reported `res` bytes read into this buffer's
                    // allocation, starting at its base pointer, so they are initialised.
                    unsafe { buf.set_len(n) };
                }
                if res < 0 {
                    Poll::Ready(Err(io::Error::from_raw_os_error(-res)))
                } else {
                    Poll::Ready(Ok((res as u32, buf)))
                }
            }
            None => {
                slot.waker = Some(cx.waker().clone());
                this.state = OpState::Submitted(token);
                ring.arm();
                Poll::Pending
            }
        }
    }
}

impl Drop for Op {
    fn drop(&mut self) {
        if let OpState::Submitted(token) = self.state {
            let mut ring = self.shared.lock();
            let done = match ring.slots.get_mut(&token) {
                Some(slot) if slot.result.is_some() => true,
                Some(slot) => {
                    slot.abandoned = true;
                    slot.waker = None;
                    false
                }
                None => false,
            };
            if done {
                ring.slots.remove(&token);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn read_write_fsync_punch() -> io::Result<()> {
        let dir = std::env::temp_dir().join(format!("slipway-uring-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let path = dir.join("f");
        let file = Arc::new(
            std::fs::OpenOptions::new()
                .create(true)
                .truncate(true)
                .read(true)
                .write(true)
                .open(&path)?,
        );
        file.set_len(1 << 20)?;
        let ring = Uring::new()?;
        ring.write_at(&file, 4096, vec![7u8; 8192]).await?;
        ring.fdatasync(&file).await?;
        assert_eq!(ring.read_at(&file, 4096, 8192).await?, vec![7u8; 8192]);
        ring.fallocate(&file, PUNCH_HOLE, 4096, 4096).await?;
        let back = ring.read_at(&file, 4096, 8192).await?;
        assert_eq!(&back[..4096], &[0u8; 4096][..]);
        assert_eq!(&back[4096..], &[7u8; 4096][..]);
        // Past the end reads as zeroes.
        assert_eq!(
            ring.read_at(&file, (1 << 20) - 10, 20).await?,
            vec![0u8; 20]
        );
        // Many concurrent operations, some completing asynchronously (fsync).
        let mut tasks = Vec::new();
        for i in 0..64u64 {
            let (ring, file) = (ring.clone(), Arc::clone(&file));
            tasks.push(tokio::spawn(async move {
                ring.write_at(&file, i * 4096, vec![i as u8; 4096]).await?;
                ring.fdatasync(&file).await?;
                ring.read_at(&file, i * 4096, 4096).await
            }));
        }
        for (i, t) in tasks.into_iter().enumerate() {
            let got = t.await.map_err(io::Error::other)??;
            assert_eq!(got, vec![i as u8; 4096]);
        }
        std::fs::remove_dir_all(&dir)
    }
}
