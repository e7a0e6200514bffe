//! The io_uring seam: one submission thread that runs every data-file read, write, fsync and
//! fallocate for the store, completing tokio futures.
//!
//! This is the only module with `unsafe`: io_uring reads and writes raw pointers into buffers
//! the kernel fills asynchronously. Each operation owns its buffer and an `Arc<File>` in the
//! worker's in-flight table until its completion is reaped, so neither can be freed early.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;

use io_uring::{IoUring, opcode, squeue, types};
use tokio::sync::oneshot;

/// `fallocate` mode that frees a range and keeps the file size.
pub const PUNCH_HOLE: i32 = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
/// `fallocate` mode that zeroes a range and keeps it allocated.
pub const ZERO_RANGE: i32 = libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE;

const RING_ENTRIES: u32 = 256;
const WAKE_TOKEN: u64 = u64::MAX;

#[derive(Debug)]
enum Kind {
    Read(Vec<u8>),
    Write(Vec<u8>),
    Fdatasync,
    Fallocate { mode: i32, len: u64 },
}

#[derive(Debug)]
struct Op {
    file: Arc<File>,
    offset: u64,
    kind: Kind,
    done: oneshot::Sender<(i32, Vec<u8>)>,
}

/// Handle to the submission thread. Cloning shares the ring.
#[derive(Debug, Clone)]
pub struct Uring {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    tx: std::sync::Mutex<Option<mpsc::Sender<Op>>>,
    sleeping: AtomicBool,
    wake: OwnedFd,
}

impl Drop for Shared {
    fn drop(&mut self) {
        if let Ok(mut tx) = self.tx.lock() {
            tx.take();
        }
        wake(self.wake.as_raw_fd());
    }
}

fn wake(fd: RawFd) {
    let one = 1u64.to_ne_bytes();
    // SAFETY: `fd` is an eventfd we own for the lifetime of `Shared`; the buffer is 8 valid
    // bytes, as eventfd requires.
    let _ = unsafe { libc::write(fd, one.as_ptr().cast(), one.len()) };
}

impl Uring {
    /// Creates the ring and starts its thread.
    pub fn new() -> io::Result<Self> {
        let ring = IoUring::new(RING_ENTRIES)?;
        // SAFETY: plain syscall with constant flags; the result is checked below.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` was just returned by eventfd and is owned by nobody else.
        let wake_fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let (tx, rx) = mpsc::channel();
        let shared = Arc::new(Shared {
            tx: std::sync::Mutex::new(Some(tx)),
            sleeping: AtomicBool::new(false),
            wake: wake_fd,
        });
        let worker = Worker {
            ring,
            rx,
            shared: Arc::downgrade(&shared),
            wake_fd: shared.wake.as_raw_fd(),
            wake_buf: Box::new([0u8; 8]),
            inflight: HashMap::new(),
            next: 0,
        };
        std::thread::Builder::new()
            .name("slipway-uring".into())
            .spawn(move || worker.run())?;
        Ok(Self { shared })
    }

    async fn submit(
        &self,
        file: &Arc<File>,
        offset: u64,
        kind: Kind,
    ) -> io::Result<(i32, Vec<u8>)> {
        let (done, rx) = oneshot::channel();
        let op = Op {
            file: Arc::clone(file),
            offset,
            kind,
            done,
        };
        {
            let tx = self
                .shared
                .tx
                .lock()
                .map_err(|_| io::Error::other("uring lock poisoned"))?;
            let tx = tx
                .as_ref()
                .ok_or_else(|| io::Error::other("uring stopped"))?;
            tx.send(op)
                .map_err(|_| io::Error::other("uring thread exited"))?;
        }
        if self.shared.sleeping.swap(false, Ordering::SeqCst) {
            wake(self.shared.wake.as_raw_fd());
        }
        let (res, buf) = rx
            .await
            .map_err(|_| io::Error::other("uring dropped an operation"))?;
        if res < 0 {
            return Err(io::Error::from_raw_os_error(-res));
        }
        Ok((res, buf))
    }

    /// Reads `len` bytes at `offset`; bytes past the end of the file read as zero.
    pub async fn read_at(&self, file: &Arc<File>, offset: u64, len: usize) -> io::Result<Vec<u8>> {
        let mut out = Vec::new();
        while out.len() < len {
            let want = len - out.len();
            let (n, mut buf) = self
                .submit(file, offset + out.len() as u64, Kind::Read(vec![0u8; want]))
                .await?;
            let n = n as usize;
            if n == 0 {
                out.resize(len, 0);
                break;
            }
            buf.truncate(n);
            if out.is_empty() {
                out = buf;
            } else {
                out.extend_from_slice(&buf);
            }
        }
        Ok(out)
    }

    /// Writes all of `data` at `offset`.
    pub async fn write_at(&self, file: &Arc<File>, offset: u64, data: Vec<u8>) -> io::Result<()> {
        let total = data.len();
        let (n, buf) = self.submit(file, offset, Kind::Write(data)).await?;
        let mut done = n as usize;
        while done < total {
            // Short write (rare on regular files): write the rest from a copy.
            let (n, _) = self
                .submit(
                    file,
                    offset + done as u64,
                    Kind::Write(buf[done..].to_vec()),
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
        self.submit(file, 0, Kind::Fdatasync).await.map(drop)
    }

    /// `fallocate(mode, offset, len)`.
    pub async fn fallocate(
        &self,
        file: &Arc<File>,
        mode: i32,
        offset: u64,
        len: u64,
    ) -> io::Result<()> {
        self.submit(file, offset, Kind::Fallocate { mode, len })
            .await
            .map(drop)
    }
}

struct Worker {
    ring: IoUring,
    rx: mpsc::Receiver<Op>,
    shared: std::sync::Weak<Shared>,
    wake_fd: RawFd,
    wake_buf: Box<[u8; 8]>,
    inflight: HashMap<u64, Op>,
    next: u64,
}

impl Worker {
    fn run(mut self) {
        if let Err(e) = self.arm_wake() {
            tracing::error!(error = %e, "io_uring: cannot arm the wake-up read");
            return;
        }
        let mut open = true;
        loop {
            // Take everything queued.
            while open {
                match self.rx.try_recv() {
                    Ok(op) => self.push(op),
                    Err(mpsc::TryRecvError::Empty) => break,
                    Err(mpsc::TryRecvError::Disconnected) => open = false,
                }
            }
            if !open && self.inflight.is_empty() {
                return;
            }
            let Some(shared) = self.shared.upgrade() else {
                open = false;
                if self.inflight.is_empty() {
                    return;
                }
                self.wait();
                continue;
            };
            shared.sleeping.store(true, Ordering::SeqCst);
            drop(shared);
            // Re-check after announcing sleep: a sender that saw `sleeping == false` queued
            // its op before this point.
            match self.rx.try_recv() {
                Ok(op) => {
                    self.push(op);
                    if let Some(s) = self.shared.upgrade() {
                        s.sleeping.store(false, Ordering::SeqCst);
                    }
                    let _ = self.ring.submit();
                    self.reap();
                    continue;
                }
                Err(mpsc::TryRecvError::Disconnected) => open = false,
                Err(mpsc::TryRecvError::Empty) => {}
            }
            self.wait();
        }
    }

    fn wait(&mut self) {
        if let Err(e) = self.ring.submit_and_wait(1)
            && e.raw_os_error() != Some(libc::EINTR)
        {
            tracing::error!(error = %e, "io_uring_enter failed");
        }
        if let Some(s) = self.shared.upgrade() {
            s.sleeping.store(false, Ordering::SeqCst);
        }
        self.reap();
    }

    fn arm_wake(&mut self) -> io::Result<()> {
        let entry = opcode::Read::new(types::Fd(self.wake_fd), self.wake_buf.as_mut_ptr(), 8)
            .offset(u64::MAX)
            .build()
            .user_data(WAKE_TOKEN);
        self.push_entry(&entry)
    }

    fn push_entry(&mut self, entry: &squeue::Entry) -> io::Result<()> {
        loop {
            // SAFETY: every pointer in `entry` refers to a buffer owned by `self` (the wake
            // buffer) or by an `Op` stored in `self.inflight` until its completion is reaped.
            let pushed = unsafe { self.ring.submission().push(entry) };
            if pushed.is_ok() {
                return Ok(());
            }
            // Submission queue full: hand the batch to the kernel and retry.
            self.ring.submit()?;
            self.reap();
        }
    }

    fn push(&mut self, mut op: Op) {
        let token = self.next;
        self.next = self.next.wrapping_add(1) % (u64::MAX - 1);
        let fd = types::Fd(op.file.as_raw_fd());
        let entry = match &mut op.kind {
            Kind::Read(buf) => opcode::Read::new(fd, buf.as_mut_ptr(), buf.len() as u32)
                .offset(op.offset)
                .build(),
            Kind::Write(buf) => opcode::Write::new(fd, buf.as_ptr(), buf.len() as u32)
                .offset(op.offset)
                .build(),
            Kind::Fdatasync => opcode::Fsync::new(fd)
                .flags(types::FsyncFlags::DATASYNC)
                .build(),
            Kind::Fallocate { mode, len } => opcode::Fallocate::new(fd, *len)
                .offset(op.offset)
                .mode(*mode)
                .build(),
        }
        .user_data(token);
        // The Vec's heap buffer does not move when `op` is moved into the map.
        self.inflight.insert(token, op);
        if let Err(e) = self.push_entry(&entry)
            && let Some(op) = self.inflight.remove(&token)
        {
            let _ = op
                .done
                .send((-e.raw_os_error().unwrap_or(libc::EIO), Vec::new()));
        }
    }

    fn reap(&mut self) {
        let done: Vec<(u64, i32)> = self
            .ring
            .completion()
            .map(|c| (c.user_data(), c.result()))
            .collect();
        for (token, res) in done {
            if token == WAKE_TOKEN {
                if let Err(e) = self.arm_wake() {
                    tracing::error!(error = %e, "io_uring: cannot re-arm the wake-up read");
                }
                continue;
            }
            if let Some(op) = self.inflight.remove(&token) {
                let buf = match op.kind {
                    Kind::Read(b) | Kind::Write(b) => b,
                    _ => Vec::new(),
                };
                let _ = op.done.send((res, buf));
            }
        }
    }
}

impl std::fmt::Debug for Worker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Worker")
            .field("inflight", &self.inflight.len())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
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
        std::fs::remove_dir_all(&dir)
    }
}
