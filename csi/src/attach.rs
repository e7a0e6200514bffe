//! The per-volume attach process: a userspace NBD client that exposes the export as one file
//! (`<dir>/fuse/disk`) through FUSE, with a loop device on it. It runs apart from the node
//! plugin (its own session), so the plugin can be killed, restarted or upgraded without
//! interrupting I/O; the plugin finds it again through `<dir>/attach.json`.
//!
//! Signals: SIGUSR1 re-reads the export size (after the controller grew the volume); SIGTERM
//! detaches the loop device, unmounts FUSE, disconnects and removes the state file.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, TryLockError};
use std::time::{Duration, Instant, UNIX_EPOCH};

use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, INodeNo, LockOwner, OpenFlags,
    ReplyAttr, ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyWrite, Request,
    WriteFlags,
};
use nix::sys::signal::{SigSet, Signal};
use serde::{Deserialize, Serialize};
use slipway_blockstore::proto;

use crate::kernel_nbd::{self, KernelNbd, NetlinkGenl};
use crate::nbd::{Address, Client, TlsFiles};
use crate::sys;

/// The state file of one attachment.
pub const STATE_FILE: &str = "attach.json";
/// Name of the file FUSE exposes.
pub const DISK: &str = "disk";

/// Exit status of an attach process whose export does not exist (the node answers NOT_FOUND).
pub const EXIT_UNKNOWN_EXPORT: i32 = 3;

/// Exit status of an attach process the block store refused the export to (allow-list, TLS).
pub const EXIT_REFUSED: i32 = 4;

/// What an attach process records about itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AttachState {
    /// Volume ID.
    pub volume_id: String,
    /// Process ID of the attach process.
    pub pid: u32,
    /// The loop device.
    pub device: String,
    /// The FUSE-exposed file behind the loop device.
    pub file: PathBuf,
    /// Export size in bytes.
    pub size: u64,
    /// How many times the size was re-read (SIGUSR1), so a waiter sees its request answered.
    pub refreshed: u64,
    /// The kernel's NBD driver serves `device` (no FUSE file, no loop device).
    #[serde(default)]
    pub kernel: bool,
}

impl AttachState {
    /// Reads `<dir>/attach.json`.
    pub fn read(dir: &Path) -> Option<Self> {
        let bytes = std::fs::read(dir.join(STATE_FILE)).ok()?;
        serde_json::from_slice(&bytes).ok()
    }

    fn write(&self, dir: &Path) -> std::io::Result<()> {
        let tmp = dir.join(format!("{STATE_FILE}.tmp"));
        std::fs::write(
            &tmp,
            serde_json::to_vec(self).map_err(std::io::Error::other)?,
        )?;
        std::fs::rename(tmp, dir.join(STATE_FILE))
    }
}

/// Flags of `slipway csi attach` (started by the node plugin, not by users).
#[derive(Debug, Clone, clap::Args)]
pub struct AttachArgs {
    /// Volume ID (the export name).
    #[arg(long)]
    pub volume_id: String,
    /// NBD server: unix:/path or tcp:HOST:PORT.
    #[arg(long)]
    pub nbd: String,
    /// State directory of this attachment.
    #[arg(long)]
    pub dir: PathBuf,
    /// Hand the negotiated socket to the kernel's NBD driver (`/dev/nbdN`) instead of serving
    /// it through FUSE and a loop device.
    #[arg(long)]
    pub kernel_nbd: bool,
    /// TLS towards the block store (TCP): the CA of its certificate.
    #[arg(long, requires_all = ["tls_cert", "tls_key"])]
    pub tls_ca: Option<PathBuf>,
    /// This node's client certificate (its name is what export allow-lists hold).
    #[arg(long, requires_all = ["tls_ca", "tls_key"])]
    pub tls_cert: Option<PathBuf>,
    /// This node's client key.
    #[arg(long, requires_all = ["tls_ca", "tls_cert"])]
    pub tls_key: Option<PathBuf>,
}

impl AttachArgs {
    fn tls(&self) -> Option<TlsFiles> {
        Some(TlsFiles {
            ca: self.tls_ca.clone()?,
            cert: self.tls_cert.clone()?,
            key: self.tls_key.clone()?,
        })
    }
}

const ROOT: INodeNo = INodeNo::ROOT;
const FILE: INodeNo = INodeNo(2);

/// NBD connections per attachment when the server allows several (`NBD_FLAG_CAN_MULTI_CONN`:
/// a FLUSH on one covers the writes completed on all), and FUSE threads serving them. 4k random
/// reads at queue depth 32 in a pod (`slipway bench csi`, release, 2 cores) ran at 27.6k IOPS
/// with 8 and 25.7k with 16: the CPU, not the connection count, is the limit here.
const CONNECTIONS: usize = 8;

/// The connections FUSE requests are served on.
struct Pool {
    conns: Vec<Mutex<Client>>,
    next: AtomicUsize,
}

impl Pool {
    /// `first`, and more connections to the same export if the server allows multi-conn.
    fn open(first: Client, addr: &Address, export: &str, tls: Option<&TlsFiles>) -> Self {
        let n = if first.flags & proto::tflags::CAN_MULTI_CONN != 0 {
            CONNECTIONS
        } else {
            1
        };
        let mut conns = vec![Mutex::new(first)];
        while conns.len() < n {
            match Client::connect(addr, export, tls) {
                Ok(c) => conns.push(Mutex::new(c)),
                Err(e) => {
                    tracing::warn!(error = %e, connections = conns.len(), "extra NBD connection");
                    break;
                }
            }
        }
        Self {
            conns,
            next: AtomicUsize::new(0),
        }
    }

    /// A free connection, or the next one in turn when all are busy.
    fn get(&self) -> MutexGuard<'_, Client> {
        let n = self.conns.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed) % n;
        for i in 0..n {
            match self.conns[(start + i) % n].try_lock() {
                Ok(g) => return g,
                Err(TryLockError::Poisoned(p)) => return p.into_inner(),
                Err(TryLockError::WouldBlock) => {}
            }
        }
        self.conns[start].lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Replaces every connection with a fresh one (after the export grew); returns the new size.
    fn reconnect(
        &self,
        addr: &Address,
        export: &str,
        tls: Option<&TlsFiles>,
    ) -> Result<u64, crate::nbd::NbdError> {
        let mut size = 0;
        for slot in &self.conns {
            let fresh = Client::connect(addr, export, tls)?;
            size = fresh.size;
            let old =
                std::mem::replace(&mut *slot.lock().unwrap_or_else(|p| p.into_inner()), fresh);
            old.disconnect();
        }
        Ok(size)
    }

    /// Flushes and closes every connection.
    fn close(self) {
        for c in self.conns {
            let mut c = c.into_inner().unwrap_or_else(|p| p.into_inner());
            if let Err(e) = c.flush() {
                tracing::error!(error = %e, "NBD flush at detach");
            }
            c.disconnect();
        }
    }
}

/// One export as one file.
struct DiskFs {
    pool: Arc<Pool>,
    size: Arc<AtomicU64>,
}

impl DiskFs {
    fn attr(&self, ino: INodeNo) -> FileAttr {
        let (kind, perm, size, nlink) = if ino == ROOT {
            (FileType::Directory, 0o700, 0, 2)
        } else {
            (
                FileType::RegularFile,
                0o600,
                self.size.load(Ordering::SeqCst),
                1,
            )
        };
        FileAttr {
            ino,
            size,
            blocks: size.div_ceil(512),
            atime: UNIX_EPOCH,
            mtime: UNIX_EPOCH,
            ctime: UNIX_EPOCH,
            crtime: UNIX_EPOCH,
            kind,
            perm,
            nlink,
            uid: 0,
            gid: 0,
            rdev: 0,
            blksize: 4096,
            flags: 0,
        }
    }

    fn client(&self) -> MutexGuard<'_, Client> {
        self.pool.get()
    }
}

/// Attributes are never cached: the size changes when the volume grows.
const TTL: Duration = Duration::ZERO;

impl Filesystem for DiskFs {
    fn init(&mut self, _req: &Request, config: &mut fuser::KernelConfig) -> std::io::Result<()> {
        // Direct I/O submitted asynchronously (the loop device's, in direct-I/O mode) reaches
        // this process as concurrent requests, one per FUSE thread and NBD connection, instead
        // of one at a time.
        if let Err(missing) = config.add_capabilities(fuser::InitFlags::FUSE_ASYNC_DIO) {
            tracing::warn!(?missing, "the kernel's FUSE has no asynchronous direct I/O");
        }
        // Up to 64 such requests queued (the kernel's default is 12), enough to keep every
        // connection busy under a pod's queue depth of 32.
        if let Err(max) = config.set_max_background(64) {
            tracing::warn!(max, "FUSE max_background");
        }
        if let Err(max) = config.set_congestion_threshold(48) {
            tracing::warn!(max, "FUSE congestion_threshold");
        }
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        if parent == ROOT && name == DISK {
            reply.entry(&TTL, &self.attr(FILE), fuser::Generation(0));
        } else {
            reply.error(Errno::ENOENT);
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        if ino == ROOT || ino == FILE {
            reply.attr(&TTL, &self.attr(ino));
        } else {
            reply.error(Errno::ENOENT);
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        if ino == FILE {
            // No page cache over the export: every read and write of the loop device goes to
            // the block store, as with the kernel's NBD device (the host's memory is not spent
            // on a second copy of what the pod's filesystem caches, and O_DIRECT in the pod
            // means what it says).
            reply.opened(FileHandle(0), FopenFlags::FOPEN_DIRECT_IO);
        } else {
            reply.error(Errno::EISDIR);
        }
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let end = (offset + u64::from(size)).min(self.size.load(Ordering::SeqCst));
        let mut buf = vec![0u8; end.saturating_sub(offset) as usize];
        match self.client().read(offset, &mut buf) {
            Ok(()) => reply.data(&buf),
            Err(e) => {
                tracing::error!(error = %e, offset, "NBD read failed");
                reply.error(Errno::EIO);
            }
        }
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        if offset + data.len() as u64 > self.size.load(Ordering::SeqCst) {
            reply.error(Errno::ENOSPC);
            return;
        }
        match self.client().write(offset, data) {
            Ok(()) => reply.written(data.len() as u32),
            Err(e) => {
                tracing::error!(error = %e, offset, "NBD write failed");
                reply.error(Errno::EIO);
            }
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lo: LockOwner,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        match self.client().flush() {
            Ok(()) => reply.ok(),
            Err(e) => {
                tracing::error!(error = %e, "NBD flush failed");
                reply.error(Errno::EIO);
            }
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        if ino != ROOT {
            reply.error(Errno::ENOTDIR);
            return;
        }
        let entries = [
            (ROOT, FileType::Directory, "."),
            (ROOT, FileType::Directory, ".."),
            (FILE, FileType::RegularFile, DISK),
        ];
        for (i, (ino, kind, name)) in entries.into_iter().enumerate().skip(offset as usize) {
            if reply.add(ino, (i + 1) as u64, kind, name) {
                break;
            }
        }
        reply.ok();
    }
}

/// Runs the attach process until SIGTERM.
pub fn run(args: &AttachArgs) -> anyhow::Result<()> {
    use anyhow::Context;
    // Signals are taken with sigwait; block them before any thread starts so every thread
    // inherits the mask.
    let mut signals = SigSet::empty();
    for s in [
        Signal::SIGTERM,
        Signal::SIGINT,
        Signal::SIGUSR1,
        Signal::SIGHUP,
    ] {
        signals.add(s);
    }
    signals.thread_block().context("block signals")?;
    // Its own session: nothing sent to the node plugin's session or terminal reaches it.
    if let Err(e) = nix::unistd::setsid() {
        tracing::warn!(error = %e, "setsid");
    }
    let tls = args.tls();
    let addr = Address::parse(&args.nbd)?;
    let span = tracing::info_span!("attach", volume = %args.volume_id);
    let _enter = span.enter();
    let client = Client::connect(&addr, &args.volume_id, tls.as_ref())
        .context("connect to the NBD export")?;
    if args.kernel_nbd {
        return run_kernel(args, &addr, client, &signals);
    }
    let size = Arc::new(AtomicU64::new(client.size));
    let pool = Arc::new(Pool::open(client, &addr, &args.volume_id, tls.as_ref()));
    let mnt = args.dir.join("fuse");
    std::fs::create_dir_all(&mnt).with_context(|| format!("mkdir {}", mnt.display()))?;
    let mut cfg = fuser::Config::default();
    cfg.mount_options = vec![
        fuser::MountOption::FSName(format!("slipway-nbd:{}", args.volume_id)),
        fuser::MountOption::Subtype("slipway".into()),
    ];
    cfg.n_threads = Some(pool.conns.len());
    cfg.clone_fd = true;
    let fs = DiskFs {
        pool: Arc::clone(&pool),
        size: Arc::clone(&size),
    };
    let session = fuser::spawn_mount(fs, &mnt, &cfg).context("FUSE mount")?;
    let file = mnt.join(DISK);
    let device = match sys::loop_attach(&file) {
        Ok(d) => d,
        Err(e) => {
            drop(session);
            return Err(e.into());
        }
    };
    let mut state = AttachState {
        volume_id: args.volume_id.clone(),
        pid: std::process::id(),
        device: device.clone(),
        file: file.clone(),
        size: size.load(Ordering::SeqCst),
        refreshed: 0,
        kernel: false,
    };
    if let Err(e) = state.write(&args.dir) {
        // Nothing half-made: the loop device and the FUSE mount go with the failure.
        let _ = sys::loop_detach(&device);
        drop(session);
        return Err(anyhow::Error::from(e).context("write the state file"));
    }
    println!("slipway-csi attach ready device={device}");
    tracing::info!(%device, size = state.size, "attached");
    loop {
        match signals.wait().context("sigwait")? {
            Signal::SIGUSR1 => {
                match pool.reconnect(&addr, &args.volume_id, tls.as_ref()) {
                    Ok(new_size) => {
                        size.store(new_size, Ordering::SeqCst);
                        state.size = new_size;
                        tracing::info!(size = state.size, "export size re-read");
                    }
                    Err(e) => tracing::error!(error = %e, "cannot re-read the export size"),
                }
                state.refreshed += 1;
                state.write(&args.dir).context("write the state file")?;
            }
            Signal::SIGHUP => {}
            _ => break,
        }
    }
    // Detach: loop device first (it holds the FUSE file open), then FUSE, then NBD.
    for dev in sys::loops_backed_by(&file) {
        if let Err(e) = sys::loop_detach(&dev) {
            tracing::error!(error = %e, %dev, "cannot detach the loop device");
        }
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while !sys::loops_backed_by(&file).is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    session.umount_and_join().context("FUSE unmount")?;
    match Arc::try_unwrap(pool) {
        Ok(pool) => pool.close(),
        Err(_) => tracing::error!("NBD connections still in use after the FUSE unmount"),
    }
    let _ = std::fs::remove_file(args.dir.join(STATE_FILE));
    let _ = std::fs::remove_dir(&mnt);
    tracing::info!("detached");
    Ok(())
}

/// The kernel path: the device is `/dev/nbdN`, served by the kernel over the negotiated socket;
/// this process stays to resize it (SIGUSR1) and disconnect it (SIGTERM).
fn run_kernel(
    args: &AttachArgs,
    addr: &Address,
    client: Client,
    signals: &SigSet,
) -> anyhow::Result<()> {
    use anyhow::Context;
    use std::os::fd::AsRawFd;
    let fd = client
        .socket()
        .context("kernel NBD needs a plain socket (TLS is served in userspace)")?
        .as_raw_fd();
    let export = kernel_nbd::Export {
        size: client.size,
        flags: client.flags,
    };
    let mut knbd = KernelNbd::new(NetlinkGenl::open()?)?;
    let index = knbd.connect(fd, export)?;
    // The kernel holds its own reference to the socket now.
    drop(client);
    let device = format!("/dev/nbd{index}");
    let mut state = AttachState {
        volume_id: args.volume_id.clone(),
        pid: std::process::id(),
        device: device.clone(),
        file: PathBuf::from(&device),
        size: export.size,
        refreshed: 0,
        kernel: true,
    };
    if let Err(e) = state.write(&args.dir) {
        let _ = knbd.disconnect(index);
        return Err(anyhow::Error::from(e).context("write the state file"));
    }
    println!("slipway-csi attach ready device={device}");
    tracing::info!(%device, "attached through kernel NBD");
    loop {
        match signals.wait().context("sigwait")? {
            Signal::SIGUSR1 => {
                match Client::connect(addr, &args.volume_id, None) {
                    Ok(fresh) => match knbd.resize(index, fresh.size) {
                        Ok(()) => state.size = fresh.size,
                        Err(e) => tracing::error!(error = %e, "cannot resize the NBD device"),
                    },
                    Err(e) => tracing::error!(error = %e, "cannot re-read the export size"),
                }
                state.refreshed += 1;
                state.write(&args.dir).context("write the state file")?;
            }
            Signal::SIGHUP => {}
            _ => break,
        }
    }
    knbd.disconnect(index)?;
    let _ = std::fs::remove_file(args.dir.join(STATE_FILE));
    tracing::info!("detached");
    Ok(())
}
