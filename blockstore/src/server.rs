//! The NBD server: handshake and transmission over any byte stream (TCP or Unix socket).
//!
//! One task reads requests and spawns one task per request, so many requests are in flight on
//! a connection and replies go out in completion order (proto.md allows any order); a writer
//! task serialises the replies. All parsing is in `proto.rs` / `negotiate.rs`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{Semaphore, mpsc};
use tracing::Instrument;

use crate::metrics::{Metrics, OpMetrics};
use crate::negotiate::{Negotiator, Step};
use crate::proto::{self, Command, ExportView, cmd};
use crate::store::Store;
use crate::volume::{Export, ZeroMode};

/// Budget of request bytes in flight per connection, in [`UNIT`]s (64 MiB): bounds the memory
/// a client can pin by pipelining large requests.
pub const MAX_INFLIGHT: usize = 1024;
/// Granularity of the in-flight budget; every request takes at least one unit.
pub const UNIT: u32 = 64 * 1024;
/// Time a client has to finish the handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);

/// Reply bytes: a header and an optional data payload written after it.
type Frame = (Vec<u8>, Option<Vec<u8>>);

/// Serves NBD connections from a store.
#[derive(Debug)]
pub struct Server {
    store: Arc<Store>,
    metrics: Arc<Metrics>,
}

struct ConnMetrics {
    read: OpMetrics,
    write: OpMetrics,
    flush: OpMetrics,
    trim: OpMetrics,
    zero: OpMetrics,
    cache: OpMetrics,
    status: OpMetrics,
}

impl ConnMetrics {
    fn new(m: &Metrics, export: &str) -> Self {
        Self {
            read: m.op(export, "read"),
            write: m.op(export, "write"),
            flush: m.op(export, "flush"),
            trim: m.op(export, "trim"),
            zero: m.op(export, "write_zeroes"),
            cache: m.op(export, "cache"),
            status: m.op(export, "block_status"),
        }
    }

    fn of(&self, c: &Command) -> &OpMetrics {
        match c {
            Command::Read { .. } => &self.read,
            Command::Write { .. } => &self.write,
            Command::Trim { .. } => &self.trim,
            Command::WriteZeroes { .. } => &self.zero,
            Command::Cache { .. } => &self.cache,
            Command::BlockStatus { .. } => &self.status,
            Command::Flush | Command::Disconnect => &self.flush,
        }
    }
}

/// Logs at most a few peer-triggered warnings per connection.
struct RateLimit(u32);

impl RateLimit {
    fn allow(&mut self) -> bool {
        self.0 += 1;
        self.0 <= 5
    }
}

impl Server {
    /// A server over `store`, recording into `metrics`.
    pub fn new(store: Arc<Store>, metrics: Arc<Metrics>) -> Arc<Self> {
        Arc::new(Self { store, metrics })
    }

    /// Accepts TCP connections forever.
    pub async fn serve_tcp(self: Arc<Self>, listener: TcpListener) {
        loop {
            match listener.accept().await {
                Ok((sock, peer)) => {
                    let _ = sock.set_nodelay(true);
                    let span = tracing::info_span!("nbd", %peer);
                    tokio::spawn(Arc::clone(&self).handle(sock).instrument(span));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }

    /// Accepts Unix-socket connections forever.
    pub async fn serve_unix(self: Arc<Self>, listener: UnixListener) {
        loop {
            match listener.accept().await {
                Ok((sock, _)) => {
                    let span = tracing::info_span!("nbd", peer = "unix");
                    tokio::spawn(Arc::clone(&self).handle(sock).instrument(span));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }

    /// Runs one connection to completion.
    pub async fn handle<S>(self: Arc<Self>, mut stream: S)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let negotiated = tokio::time::timeout(HANDSHAKE_TIMEOUT, self.handshake(&mut stream)).await;
        let (export, neg) = match negotiated {
            Ok(Ok(Some(x))) => x,
            Ok(Ok(None)) => return,
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "handshake ended");
                return;
            }
            Err(_) => {
                tracing::debug!("handshake timed out");
                return;
            }
        };
        let span = tracing::info_span!("export", name = %export.name);
        self.metrics.connections.inc();
        self.transmission(stream, export, neg)
            .instrument(span)
            .await;
        self.metrics.connections.dec();
    }

    async fn handshake<S>(&self, s: &mut S) -> std::io::Result<Option<(Arc<Export>, Negotiator)>>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        s.write_all(&proto::greeting()).await?;
        let mut flags = [0u8; 4];
        s.read_exact(&mut flags).await?;
        let no_zeroes = match proto::parse_client_flags(flags) {
            Ok(z) => z,
            Err(e) => {
                // proto.md: the server MUST close on client flags it does not know.
                tracing::debug!(error = %e, "closing");
                return Ok(None);
            }
        };
        let mut neg = Negotiator::new(no_zeroes);
        loop {
            let mut hdr = [0u8; proto::OPTION_HEADER_LEN];
            s.read_exact(&mut hdr).await?;
            let h = match proto::parse_option_header(&hdr) {
                Ok(h) => h,
                Err(e) => {
                    tracing::debug!(error = %e, "bad option header, closing");
                    return Ok(None);
                }
            };
            let mut data = vec![0u8; h.length as usize];
            s.read_exact(&mut data).await?;
            let mut out = Vec::new();
            let step = neg.option(h.option, &data, &*self.store, &mut out);
            s.write_all(&out).await?;
            s.flush().await?;
            match step {
                Step::Continue => {}
                Step::Close => return Ok(None),
                Step::Transmission(info) => {
                    return Ok(self.store.get(&info.name).map(|e| (e, neg)));
                }
            }
        }
    }

    async fn transmission<S>(&self, stream: S, export: Arc<Export>, neg: Negotiator)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let (rd, wr) = tokio::io::split(stream);
        let mut rd = BufReader::with_capacity(256 * 1024, rd);
        let (tx, rx) = mpsc::channel::<Frame>(MAX_INFLIGHT * 2);
        let writer = tokio::spawn(write_replies(wr, rx));
        let slots = Arc::new(Semaphore::new(MAX_INFLIGHT));
        let structured = neg.structured;
        let base_allocation = neg.base_allocation(&export.name);
        let metrics = Arc::new(ConnMetrics::new(&self.metrics, &export.name));
        let mut warn = RateLimit(0);
        loop {
            let mut hdr = [0u8; proto::REQUEST_LEN];
            if rd.read_exact(&mut hdr).await.is_err() {
                break; // client went away
            }
            let req = match proto::parse_request(&hdr) {
                Ok(r) => r,
                Err(e) => {
                    if warn.allow() {
                        tracing::warn!(error = %e, "unparseable request, closing");
                    }
                    break;
                }
            };
            // The payload of a WRITE is on the wire whatever we think of the request.
            let mut payload = None;
            let mut oversized = false;
            if req.command == cmd::WRITE {
                if req.length > proto::MAX_PAYLOAD {
                    oversized = true;
                    let mut sink = tokio::io::sink();
                    let mut take = (&mut rd).take(u64::from(req.length));
                    match tokio::io::copy(&mut take, &mut sink).await {
                        Ok(n) if n == u64::from(req.length) => {}
                        _ => break,
                    }
                } else {
                    let mut buf = vec![0u8; req.length as usize];
                    if rd.read_exact(&mut buf).await.is_err() {
                        break; // disconnected mid-request
                    }
                    payload = Some(buf);
                }
            }
            let view = ExportView {
                size: export.size(),
                read_only: export.read_only,
                structured,
                base_allocation,
            };
            let command = match proto::validate(&req, &view) {
                Ok(_) if oversized => Err(proto::errno::EINVAL),
                other => other,
            };
            let command = match command {
                Ok(c) => c,
                Err(errno) => {
                    if warn.allow() {
                        tracing::debug!(command = req.command, errno, "request refused");
                    }
                    let frame = error_frame(req.cookie, errno, structured, "invalid request");
                    if tx.send(frame).await.is_err() {
                        break;
                    }
                    continue;
                }
            };
            if command == Command::Disconnect {
                break;
            }
            let units = req.length.div_ceil(UNIT).clamp(1, MAX_INFLIGHT as u32);
            let Ok(permit) = Arc::clone(&slots).acquire_many_owned(units).await else {
                break;
            };
            let (tx, export, metrics) = (tx.clone(), Arc::clone(&export), Arc::clone(&metrics));
            tokio::spawn(async move {
                let start = Instant::now();
                let (frame, bytes, ok) =
                    execute(&export, command, payload, req.cookie, structured).await;
                metrics.of(&command).record(bytes, start.elapsed(), ok);
                let _ = tx.send(frame).await;
                drop(permit);
            });
        }
        // proto.md (NBD_CMD_DISC): handle all outstanding requests before closing.
        let _ = slots.acquire_many(MAX_INFLIGHT as u32).await;
        drop(tx);
        let _ = writer.await;
    }
}

fn error_frame(cookie: u64, errno: u32, structured: bool, message: &str) -> Frame {
    if structured {
        (proto::error_chunk(cookie, errno, message), None)
    } else {
        (proto::simple_reply(cookie, errno).to_vec(), None)
    }
}

fn ok_frame(cookie: u64) -> Frame {
    (proto::simple_reply(cookie, 0).to_vec(), None)
}

/// Runs one validated command; returns its reply, the bytes moved and success.
async fn execute(
    export: &Export,
    command: Command,
    payload: Option<Vec<u8>>,
    cookie: u64,
    structured: bool,
) -> (Frame, u64, bool) {
    let result = match command {
        Command::Read { offset, length } => {
            return match export.read(offset, length).await {
                Ok(data) => {
                    let head = if structured {
                        proto::read_chunk_header(cookie, offset, length)
                    } else {
                        proto::simple_reply(cookie, 0).to_vec()
                    };
                    ((head, Some(data)), u64::from(length), true)
                }
                Err(e) => {
                    tracing::warn!(error = %e, offset, length, "read failed");
                    (
                        error_frame(cookie, e.nbd_errno(), structured, "read failed"),
                        0,
                        false,
                    )
                }
            };
        }
        Command::Write { offset, fua, .. } => {
            let data = payload.unwrap_or_default();
            let n = data.len() as u64;
            export.write(offset, data, fua).await.map(|()| n)
        }
        Command::Flush => export.flush().await.map(|()| 0),
        Command::Trim {
            offset,
            length,
            fua,
        } => {
            let mode = ZeroMode {
                no_hole: false,
                fast: false,
            };
            export.zero(offset, length, mode, fua).await.map(|()| 0)
        }
        Command::WriteZeroes {
            offset,
            length,
            fua,
            no_hole,
            fast,
        } => {
            let mode = ZeroMode { no_hole, fast };
            export.zero(offset, length, mode, fua).await.map(|()| 0)
        }
        Command::Cache { .. } | Command::Disconnect => Ok(0),
        Command::BlockStatus {
            offset,
            length,
            req_one,
        } => {
            let extents = export.block_status(offset, length, req_one).await;
            let chunk = proto::block_status_chunk(cookie, proto::BASE_ALLOCATION_ID, &extents);
            return ((chunk, None), 0, true);
        }
    };
    match result {
        Ok(n) => (ok_frame(cookie), n, true),
        Err(e) => {
            if !matches!(e, crate::volume::IoError::NotFast) {
                tracing::warn!(error = %e, "request failed");
            }
            (
                error_frame(cookie, e.nbd_errno(), structured, &e.to_string()),
                0,
                false,
            )
        }
    }
}

async fn write_replies<W>(wr: W, mut rx: mpsc::Receiver<Frame>)
where
    W: AsyncWrite + Unpin,
{
    let mut w = BufWriter::with_capacity(256 * 1024, wr);
    while let Some(frame) = rx.recv().await {
        let mut next = Some(frame);
        while let Some((head, data)) = next.take() {
            if w.write_all(&head).await.is_err() {
                return;
            }
            if let Some(data) = data
                && w.write_all(&data).await.is_err()
            {
                return;
            }
            next = rx.try_recv().ok();
        }
        if w.flush().await.is_err() {
            return;
        }
    }
    let _ = w.shutdown().await;
}
