//! The NBD server: handshake and transmission over any byte stream (TCP or Unix socket).
//!
//! One task per connection parses requests, starts each at once and keeps many in flight,
//! queueing replies in completion order (proto.md allows any order) and writing them in
//! batches. All parsing is in `proto.rs` / `negotiate.rs`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use std::collections::VecDeque;
use std::future::Future;
use std::io::IoSlice;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, UnixListener};
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

    async fn transmission<S>(&self, mut stream: S, export: Arc<Export>, neg: Negotiator)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let mut conn = Conn {
            export: Arc::clone(&export),
            metrics: Arc::new(ConnMetrics::new(&self.metrics, &export.name)),
            structured: neg.structured,
            base_allocation: neg.base_allocation(&export.name),
            inbuf: vec![0u8; IN_BUF],
            in_start: 0,
            in_end: 0,
            reading: Reading::Header,
            pending: Vec::new(),
            budget: MAX_INFLIGHT as u32,
            out: VecDeque::new(),
            out_pos: 0,
            closing: false,
            warn: RateLimit(0),
        };
        std::future::poll_fn(|cx| conn.poll(cx, &mut stream)).await;
        let _ = stream.shutdown().await;
    }
}

/// Read buffer per connection.
const IN_BUF: usize = 256 * 1024;
/// Loop turns before a busy connection yields to other tasks.
const TURNS: usize = 64;

type Pending = Pin<Box<dyn Future<Output = (Frame, u32)> + Send>>;

enum Reading {
    Header,
    /// Collecting a WRITE payload of `buf.len()` bytes; `filled` so far.
    Payload {
        req: proto::Request,
        buf: Vec<u8>,
        filled: usize,
    },
    /// Skipping the payload of an oversized WRITE.
    Discard {
        req: proto::Request,
        left: u64,
    },
}

/// One connection in transmission: requests are parsed from one buffer, started at once, and
/// their replies queued as they complete; all in one task, so requests that complete inline
/// (page-cache hits) cost no wake-up or thread hop.
struct Conn {
    export: Arc<Export>,
    metrics: Arc<ConnMetrics>,
    structured: bool,
    base_allocation: bool,
    inbuf: Vec<u8>,
    in_start: usize,
    in_end: usize,
    reading: Reading,
    pending: Vec<Pending>,
    /// Free in-flight budget in [`UNIT`]s.
    budget: u32,
    out: VecDeque<Vec<u8>>,
    out_pos: usize,
    closing: bool,
    warn: RateLimit,
}

impl Conn {
    fn poll<S>(&mut self, cx: &mut Context<'_>, stream: &mut S) -> Poll<()>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        for _ in 0..TURNS {
            let mut progress = self.parse();
            progress |= self.poll_pending(cx);
            match self.poll_flush(cx, stream) {
                Poll::Ready(Ok(true)) => progress = true,
                Poll::Ready(Ok(false)) | Poll::Pending => {}
                Poll::Ready(Err(_)) => {
                    // The client is gone: stop reading; finish what is in flight.
                    self.closing = true;
                    self.out.clear();
                    self.out_pos = 0;
                }
            }
            if !self.closing && self.budget > 0 {
                progress |= self.poll_read(cx, stream);
            }
            if self.closing && self.pending.is_empty() && self.out.is_empty() {
                return Poll::Ready(());
            }
            if !progress {
                return Poll::Pending;
            }
        }
        // Busy: let other connections run.
        cx.waker().wake_by_ref();
        Poll::Pending
    }

    /// Reads from the socket into the input buffer or the current payload.
    fn poll_read<S: AsyncRead + Unpin>(&mut self, cx: &mut Context<'_>, stream: &mut S) -> bool {
        let res = match &mut self.reading {
            Reading::Payload { buf, filled, .. } if self.in_start == self.in_end => {
                let mut rb = ReadBuf::new(&mut buf[*filled..]);
                match Pin::new(&mut *stream).poll_read(cx, &mut rb) {
                    Poll::Ready(Ok(())) => {
                        let n = rb.filled().len();
                        *filled += n;
                        Poll::Ready(Ok(n))
                    }
                    Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
                    Poll::Pending => Poll::Pending,
                }
            }
            _ => {
                if self.in_start == self.in_end {
                    self.in_start = 0;
                    self.in_end = 0;
                } else if self.in_end == self.inbuf.len() {
                    self.inbuf.copy_within(self.in_start..self.in_end, 0);
                    self.in_end -= self.in_start;
                    self.in_start = 0;
                }
                let mut rb = ReadBuf::new(&mut self.inbuf[self.in_end..]);
                match Pin::new(&mut *stream).poll_read(cx, &mut rb) {
                    Poll::Ready(Ok(())) => {
                        let n = rb.filled().len();
                        self.in_end += n;
                        Poll::Ready(Ok(n))
                    }
                    Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
                    Poll::Pending => Poll::Pending,
                }
            }
        };
        match res {
            Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => {
                // End of stream (or reset), possibly mid-request: nothing more to read.
                self.closing = true;
                true
            }
            Poll::Ready(Ok(_)) => true,
            Poll::Pending => false,
        }
    }

    /// Parses and starts every complete request in the buffer (within the budget).
    fn parse(&mut self) -> bool {
        let mut progress = false;
        while !self.closing && self.budget > 0 {
            let avail = self.in_end - self.in_start;
            match &mut self.reading {
                Reading::Header => {
                    if avail < proto::REQUEST_LEN {
                        return progress;
                    }
                    let mut hdr = [0u8; proto::REQUEST_LEN];
                    hdr.copy_from_slice(
                        &self.inbuf[self.in_start..self.in_start + proto::REQUEST_LEN],
                    );
                    self.in_start += proto::REQUEST_LEN;
                    progress = true;
                    let req = match proto::parse_request(&hdr) {
                        Ok(r) => r,
                        Err(e) => {
                            if self.warn.allow() {
                                tracing::warn!(error = %e, "unparseable request, closing");
                            }
                            self.closing = true;
                            return true;
                        }
                    };
                    if req.command == cmd::WRITE {
                        if req.length > proto::MAX_PAYLOAD {
                            self.reading = Reading::Discard {
                                req,
                                left: u64::from(req.length),
                            };
                        } else {
                            self.reading = Reading::Payload {
                                req,
                                buf: vec![0u8; req.length as usize],
                                filled: 0,
                            };
                        }
                        continue;
                    }
                    self.start(req, None, false);
                }
                Reading::Payload { buf, filled, .. } => {
                    let take = avail.min(buf.len() - *filled);
                    buf[*filled..*filled + take]
                        .copy_from_slice(&self.inbuf[self.in_start..self.in_start + take]);
                    *filled += take;
                    self.in_start += take;
                    if *filled < buf.len() {
                        return progress || take > 0;
                    }
                    progress = true;
                    if let Reading::Payload { req, buf, .. } =
                        std::mem::replace(&mut self.reading, Reading::Header)
                    {
                        self.start(req, Some(buf), false);
                    }
                }
                Reading::Discard { left, .. } => {
                    let take = (avail as u64).min(*left);
                    *left -= take;
                    self.in_start += take as usize;
                    if *left > 0 {
                        return progress || take > 0;
                    }
                    progress = true;
                    if let Reading::Discard { req, .. } =
                        std::mem::replace(&mut self.reading, Reading::Header)
                    {
                        self.start(req, None, true);
                    }
                }
            }
        }
        progress
    }

    /// Validates a request and starts it, or queues its error reply.
    fn start(&mut self, req: proto::Request, payload: Option<Vec<u8>>, oversized: bool) {
        let view = ExportView {
            size: self.export.size(),
            read_only: self.export.read_only,
            structured: self.structured,
            base_allocation: self.base_allocation,
        };
        let command = match proto::validate(&req, &view) {
            Ok(_) if oversized => Err(proto::errno::EINVAL),
            Ok(c) if c != Command::Disconnect && self.export.is_deleted() => {
                Err(proto::errno::ESHUTDOWN)
            }
            other => other,
        };
        let command = match command {
            Ok(Command::Disconnect) => {
                // proto.md: finish outstanding requests, then close.
                self.closing = true;
                return;
            }
            Ok(c) => c,
            Err(errno) => {
                if self.warn.allow() {
                    tracing::debug!(command = req.command, errno, "request refused");
                }
                self.push_frame(error_frame(
                    req.cookie,
                    errno,
                    self.structured,
                    "invalid request",
                ));
                return;
            }
        };
        let units = req.length.div_ceil(UNIT).clamp(1, MAX_INFLIGHT as u32);
        self.budget = self.budget.saturating_sub(units);
        let (export, metrics, structured) = (
            Arc::clone(&self.export),
            Arc::clone(&self.metrics),
            self.structured,
        );
        self.pending.push(Box::pin(async move {
            let start = Instant::now();
            let (frame, bytes, ok) =
                execute(&export, command, payload, req.cookie, structured).await;
            metrics.of(&command).record(bytes, start.elapsed(), ok);
            (frame, units)
        }));
    }

    fn push_frame(&mut self, (head, data): Frame) {
        self.out.push_back(head);
        if let Some(d) = data {
            self.out.push_back(d);
        }
    }

    /// Polls in-flight requests; queues replies of those that finished.
    fn poll_pending(&mut self, cx: &mut Context<'_>) -> bool {
        let mut progress = false;
        let mut i = 0;
        while i < self.pending.len() {
            match self.pending[i].as_mut().poll(cx) {
                Poll::Ready((frame, units)) => {
                    drop(self.pending.swap_remove(i));
                    self.budget += units;
                    self.push_frame(frame);
                    progress = true;
                }
                Poll::Pending => i += 1,
            }
        }
        progress
    }

    /// Writes queued replies; `Ok(true)` if something was written.
    fn poll_flush<S: AsyncWrite + Unpin>(
        &mut self,
        cx: &mut Context<'_>,
        stream: &mut S,
    ) -> Poll<std::io::Result<bool>> {
        let mut wrote = false;
        while !self.out.is_empty() {
            let mut slices = [IoSlice::new(&[]); 64];
            let mut n = 0;
            for (i, chunk) in self.out.iter().take(64).enumerate() {
                slices[i] = IoSlice::new(if i == 0 {
                    &chunk[self.out_pos..]
                } else {
                    chunk
                });
                n += 1;
            }
            match Pin::new(&mut *stream).poll_write_vectored(cx, &slices[..n]) {
                Poll::Ready(Ok(0)) => {
                    return Poll::Ready(Err(std::io::ErrorKind::WriteZero.into()));
                }
                Poll::Ready(Ok(mut written)) => {
                    wrote = true;
                    while written > 0 {
                        let Some(front) = self.out.front() else { break };
                        let left = front.len() - self.out_pos;
                        if written >= left {
                            written -= left;
                            self.out.pop_front();
                            self.out_pos = 0;
                        } else {
                            self.out_pos += written;
                            written = 0;
                        }
                    }
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => {
                    return if wrote {
                        Poll::Ready(Ok(true))
                    } else {
                        Poll::Pending
                    };
                }
            }
        }
        Poll::Ready(Ok(wrote))
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

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use proptest::test_runner::{Config, TestRunner};
    use std::collections::HashMap;

    struct Dir(std::path::PathBuf);
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    type Req = (u16, u16, u64, u32);

    /// Negotiates like a client, sends `reqs` (valid magic, arbitrary fields) and `tail`
    /// (arbitrary bytes), half-closes, and checks every reply is well formed and the server
    /// ends the connection.
    async fn session(server: Arc<Server>, structured: bool, reqs: Vec<Req>, tail: Vec<u8>) {
        let (mut client, theirs) = tokio::io::duplex(1 << 22);
        let task = tokio::spawn(server.handle(theirs));
        let mut g = [0u8; 18];
        client.read_exact(&mut g).await.expect("greeting");
        client.write_all(&3u32.to_be_bytes()).await.expect("flags");
        let mut opts = Vec::new();
        let mut put = |opt: u32, data: &[u8]| {
            opts.extend_from_slice(&proto::IHAVEOPT.to_be_bytes());
            opts.extend_from_slice(&opt.to_be_bytes());
            opts.extend_from_slice(&(data.len() as u32).to_be_bytes());
            opts.extend_from_slice(data);
        };
        if structured {
            put(proto::opt::STRUCTURED_REPLY, &[]);
        }
        let mut go = 3u32.to_be_bytes().to_vec();
        go.extend_from_slice(b"vol");
        go.extend_from_slice(&0u16.to_be_bytes());
        put(proto::opt::GO, &go);
        client.write_all(&opts).await.expect("options");
        let mut lens = HashMap::new();
        let mut wire = Vec::new();
        for (i, (command, flags, offset, length)) in reqs.into_iter().enumerate() {
            let r = proto::Request {
                flags,
                command,
                cookie: i as u64,
                offset,
                length,
            };
            wire.extend_from_slice(&proto::encode_request(&r));
            if command == cmd::WRITE {
                wire.resize(wire.len() + length as usize, 0xa5);
            }
            lens.insert(i as u64, if command == cmd::READ { length } else { 0 });
        }
        wire.extend_from_slice(&tail);
        client.write_all(&wire).await.expect("requests");
        client.shutdown().await.expect("half close");
        // Option replies first.
        let mut acks = 0;
        while acks < 1 + usize::from(structured) {
            let mut h = [0u8; 20];
            client.read_exact(&mut h).await.expect("option reply");
            let len = u32::from_be_bytes([h[16], h[17], h[18], h[19]]) as usize;
            let mut d = vec![0u8; len];
            client.read_exact(&mut d).await.expect("option payload");
            if u32::from_be_bytes([h[12], h[13], h[14], h[15]]) == proto::rep::ACK {
                acks += 1;
            }
        }
        // Then replies until the server closes.
        let read_all = async {
            loop {
                let mut m = [0u8; 4];
                if client.read_exact(&mut m).await.is_err() {
                    return;
                }
                match u32::from_be_bytes(m) {
                    proto::SIMPLE_REPLY_MAGIC => {
                        let mut h = [0u8; 12];
                        client.read_exact(&mut h).await.expect("simple reply");
                        let err = u32::from_be_bytes([h[0], h[1], h[2], h[3]]);
                        let cookie = u64::from_be_bytes(h[4..12].try_into().expect("8"));
                        let len = *lens.get(&cookie).expect("reply to a request we sent");
                        if err == 0 && len > 0 {
                            let mut d = vec![0u8; len as usize];
                            client.read_exact(&mut d).await.expect("read data");
                        }
                    }
                    proto::STRUCTURED_REPLY_MAGIC => {
                        let mut h = [0u8; 16];
                        client.read_exact(&mut h).await.expect("chunk header");
                        let len = u32::from_be_bytes([h[12], h[13], h[14], h[15]]) as usize;
                        let mut d = vec![0u8; len];
                        client.read_exact(&mut d).await.expect("chunk payload");
                    }
                    other => panic!("bad reply magic {other:#x}"),
                }
            }
        };
        tokio::time::timeout(Duration::from_secs(20), read_all)
            .await
            .expect("server did not close");
        tokio::time::timeout(Duration::from_secs(20), task)
            .await
            .expect("connection task did not end")
            .expect("connection task panicked");
    }

    #[test]
    fn random_request_streams_are_answered_or_closed() {
        let dir = Dir(std::env::temp_dir().join(format!("slw-fuzz-{}", std::process::id())));
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let server = rt.block_on(async {
            let store = Store::open(&dir.0, 65536).expect("store");
            store.create("vol", 1 << 20).await.expect("volume");
            Server::new(store, Arc::new(Metrics::new()))
        });
        let strategy = (
            any::<bool>(),
            proptest::collection::vec(
                (
                    0u16..9,
                    prop_oneof![Just(0u16), any::<u16>()],
                    0u64..(1 << 21),
                    0u32..70_000,
                ),
                0..8,
            ),
            proptest::collection::vec(any::<u8>(), 0..64),
        );
        let mut runner = TestRunner::new(Config {
            cases: 64,
            failure_persistence: None,
            ..Config::default()
        });
        let result = runner.run(&strategy, |(structured, reqs, tail)| {
            rt.block_on(session(Arc::clone(&server), structured, reqs, tail));
            Ok(())
        });
        drop(server);
        drop(rt);
        assert!(result.is_ok(), "{result:?}");
    }
}
