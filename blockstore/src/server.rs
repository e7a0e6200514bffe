//! The NBD server: handshake and transmission over any byte stream (TCP or Unix socket).
//!
//! One task per connection parses requests, starts each at once and keeps many in flight,
//! queueing replies in completion order (proto.md allows any order) and writing them in
//! batches. All parsing is in `proto.rs` / `negotiate.rs`.
//!
//! Memory: a connection's requests take units of a fixed budget when they start and give them
//! back only once their reply has been written to the socket, so a client that pipelines
//! large reads and never reads the replies pins at most the budget (plus one request).
//!
//! Stopping: [`Server::shutdown`] makes every connection stop reading requests, finish the
//! ones in flight and write their replies (proto.md "Terminating the transmission phase");
//! the accept loops return once their connections are gone, or cut them after
//! [`SHUTDOWN_GRACE`].

use std::collections::VecDeque;
use std::future::Future;
use std::io::IoSlice;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tracing::Instrument;

use crate::metrics::{Metrics, OpMetrics};
use crate::negotiate::{Negotiator, Step};
use crate::proto::{self, Command, ExportView, cmd};
use crate::store::Store;
use crate::volume::{Export, Piece, ZeroMode};

/// Budget of request bytes in flight per connection, in [`UNIT`]s (64 MiB): bounds the memory
/// a client can pin by pipelining large requests. A request's units come back when its
/// reply has been sent.
pub const MAX_INFLIGHT: usize = 1024;
/// Granularity of the in-flight budget; every request takes at least one unit.
pub const UNIT: u32 = 64 * 1024;
/// Time a client has to finish the handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);
/// Time connections get to finish their requests when the server stops.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
/// Connection log lines (info) per second, whatever clients do.
const CONN_LOGS_PER_SEC: u64 = 20;

/// Reply bytes, written in order.
type Frame = Vec<Vec<u8>>;

/// Serves NBD connections from a store.
#[derive(Debug)]
pub struct Server {
    store: Arc<Store>,
    metrics: Arc<Metrics>,
    /// Becomes true once, when the server stops.
    stop: watch::Sender<bool>,
    conn_logs: LogBudget,
    /// TLS for TCP clients (required when set).
    tls: Option<Tls>,
}

/// Where option haggling ended.
enum Handshake {
    Serve(Arc<Export>, Negotiator),
    StartTls(Negotiator),
    Close,
}

/// The TLS acceptor of the TCP listener.
#[derive(Clone)]
pub struct Tls(pub tokio_rustls::TlsAcceptor);

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Tls")
    }
}

/// Resolves once the server stops.
async fn stopped(stop: &mut watch::Receiver<bool>) {
    // An error means the sender (the server) is gone: stopped too.
    let _ = stop.wait_for(|s| *s).await;
}

enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener),
}

enum Accepted {
    Tcp(TcpStream, std::net::SocketAddr),
    Unix(UnixStream),
}

impl Listener {
    async fn accept(&self) -> std::io::Result<Accepted> {
        Ok(match self {
            Self::Tcp(l) => {
                let (s, peer) = l.accept().await?;
                Accepted::Tcp(s, peer)
            }
            Self::Unix(l) => Accepted::Unix(l.accept().await?.0),
        })
    }
}

/// Rate limit for log lines a peer can trigger by connecting: at most [`CONN_LOGS_PER_SEC`].
#[derive(Debug, Default)]
struct LogBudget {
    /// Second (since the server started) of the current window, and lines used in it.
    window: AtomicU64,
    used: AtomicU64,
    suppressed: AtomicU64,
    start: std::sync::OnceLock<Instant>,
}

impl LogBudget {
    /// `Some(lines suppressed since the last allowed one)` if a line may be logged now.
    fn allow(&self) -> Option<u64> {
        let now = self.start.get_or_init(Instant::now).elapsed().as_secs();
        if self.window.swap(now, Ordering::Relaxed) != now {
            self.used.store(0, Ordering::Relaxed);
        }
        if self.used.fetch_add(1, Ordering::Relaxed) < CONN_LOGS_PER_SEC {
            Some(self.suppressed.swap(0, Ordering::Relaxed))
        } else {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            None
        }
    }
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
    /// A server over `store`, recording into `metrics`; with `tls`, TCP clients must start
    /// TLS and prove a client certificate.
    pub fn new(store: Arc<Store>, metrics: Arc<Metrics>, tls: Option<Tls>) -> Arc<Self> {
        Arc::new(Self {
            store,
            metrics,
            stop: watch::channel(false).0,
            conn_logs: LogBudget::default(),
            tls,
        })
    }

    /// Stops the server: accept loops stop accepting, connections stop reading requests,
    /// finish those in flight and close. The accept loops return when that is done.
    pub fn shutdown(&self) {
        self.stop.send_replace(true);
    }

    /// Accepts TCP connections until [`Server::shutdown`].
    pub async fn serve_tcp(self: Arc<Self>, listener: TcpListener) {
        self.serve(Listener::Tcp(listener)).await;
    }

    /// Accepts Unix-socket connections until [`Server::shutdown`].
    pub async fn serve_unix(self: Arc<Self>, listener: UnixListener) {
        self.serve(Listener::Unix(listener)).await;
    }

    async fn serve(self: Arc<Self>, listener: Listener) {
        let mut stop = self.stop.subscribe();
        let mut conns = JoinSet::new();
        loop {
            tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok(Accepted::Tcp(sock, peer)) => {
                        let _ = sock.set_nodelay(true);
                        let span = tracing::info_span!("nbd", %peer);
                        conns.spawn(Arc::clone(&self).handle(sock, true).instrument(span));
                    }
                    Ok(Accepted::Unix(sock)) => {
                        let span = tracing::info_span!("nbd", peer = "unix");
                        conns.spawn(Arc::clone(&self).handle(sock, false).instrument(span));
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                },
                Some(_) = conns.join_next(), if !conns.is_empty() => {}
                () = stopped(&mut stop) => break,
            }
        }
        // No more connections.
        drop(listener);
        let drained = tokio::time::timeout(SHUTDOWN_GRACE, async {
            while conns.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            tracing::warn!(
                connections = conns.len(),
                "connections did not finish their requests in time; closing them"
            );
            conns.abort_all();
            while conns.join_next().await.is_some() {}
        }
    }

    /// Runs one connection to completion; `network` for TCP clients (TLS when configured,
    /// export allow-lists apply), not for local Unix-socket ones.
    pub async fn handle<S>(self: Arc<Self>, mut stream: S, network: bool)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let mut stop = self.stop.subscribe();
        let negotiated = tokio::select! {
            n = tokio::time::timeout(HANDSHAKE_TIMEOUT, self.handshake(&mut stream, None, network)) => n,
            () = stopped(&mut stop) => return,
        };
        match self.outcome(negotiated) {
            Some(Handshake::Serve(export, neg)) => self.serve_connection(stream, export, neg).await,
            Some(Handshake::StartTls(mut neg)) => {
                let Some(tls) = &self.tls else { return };
                let upgraded = async {
                    let mut t = match tls.0.accept(stream).await {
                        Ok(t) => t,
                        Err(e) => {
                            self.metrics.handshake("tls_failed");
                            tracing::debug!(error = %e, "TLS handshake failed");
                            return Ok(None);
                        }
                    };
                    neg.tls_started(crate::tls::client_of(&t));
                    let h = self.handshake(&mut t, Some(neg), network).await?;
                    Ok(Some((t, h)))
                };
                let negotiated = tokio::select! {
                    n = tokio::time::timeout(HANDSHAKE_TIMEOUT, upgraded) => n,
                    () = stopped(&mut stop) => return,
                };
                match negotiated {
                    Ok(Ok(None)) => {}
                    Ok(Ok(Some((t, h)))) => {
                        if let Some(Handshake::Serve(export, neg)) = self.outcome(Ok(Ok(h))) {
                            self.serve_connection(t, export, neg).await;
                        }
                    }
                    Ok(Err(e)) => {
                        self.outcome(Ok(Err(e)));
                    }
                    Err(elapsed) => {
                        self.outcome(Err(elapsed));
                    }
                }
            }
            Some(Handshake::Close) | None => {}
        }
    }

    /// Logs and counts how a negotiation ended.
    fn outcome(
        &self,
        r: Result<std::io::Result<Handshake>, tokio::time::error::Elapsed>,
    ) -> Option<Handshake> {
        match r {
            Ok(Ok(h)) => {
                if matches!(h, Handshake::Close) {
                    self.metrics.handshake("closed");
                }
                Some(h)
            }
            Ok(Err(e)) => {
                self.metrics.handshake("error");
                tracing::debug!(error = %e, "handshake ended");
                None
            }
            Err(_) => {
                self.metrics.handshake("timeout");
                tracing::debug!("handshake timed out");
                None
            }
        }
    }

    async fn serve_connection<S>(&self, stream: S, export: Arc<Export>, neg: Negotiator)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        self.metrics.handshake("served");
        if let Some(suppressed) = self.conn_logs.allow() {
            tracing::info!(
                export = %export.name,
                structured = neg.structured,
                tls = neg.tls_active(),
                suppressed,
                "client connected"
            );
        }
        let span = tracing::info_span!("export", name = %export.name);
        self.metrics.connections.inc();
        let name = export.name.clone();
        let requests = self
            .transmission(stream, export, neg)
            .instrument(span)
            .await;
        self.metrics.connections.dec();
        if let Some(suppressed) = self.conn_logs.allow() {
            tracing::info!(export = %name, requests, suppressed, "client disconnected");
        }
    }

    /// Option haggling, from the greeting (`neg` is `None`) or, after STARTTLS, from where
    /// `neg` left off.
    async fn handshake<S>(
        &self,
        s: &mut S,
        neg: Option<Negotiator>,
        network: bool,
    ) -> std::io::Result<Handshake>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let mut neg = match neg {
            Some(neg) => neg,
            None => {
                s.write_all(&proto::greeting()).await?;
                s.flush().await?;
                let mut flags = [0u8; 4];
                s.read_exact(&mut flags).await?;
                let no_zeroes = match proto::parse_client_flags(flags) {
                    Ok(z) => z,
                    Err(e) => {
                        // proto.md: the server MUST close on client flags it does not know.
                        tracing::debug!(error = %e, "closing");
                        return Ok(Handshake::Close);
                    }
                };
                if network {
                    Negotiator::network(no_zeroes, self.tls.is_some())
                } else {
                    Negotiator::new(no_zeroes)
                }
            }
        };
        loop {
            let mut hdr = [0u8; proto::OPTION_HEADER_LEN];
            s.read_exact(&mut hdr).await?;
            let h = match proto::parse_option_header(&hdr) {
                Ok(h) => h,
                Err(e) => {
                    tracing::debug!(error = %e, "bad option header, closing");
                    return Ok(Handshake::Close);
                }
            };
            let mut out = Vec::new();
            let step = if h.too_big() {
                let step = neg.too_big(h.option, h.length, &mut out);
                if step == Step::Continue {
                    // Skip the payload: the session stays in sync and goes on.
                    let skipped = tokio::io::copy(
                        &mut (&mut *s).take(u64::from(h.length)),
                        &mut tokio::io::sink(),
                    )
                    .await?;
                    if skipped < u64::from(h.length) {
                        return Err(std::io::ErrorKind::UnexpectedEof.into());
                    }
                }
                step
            } else {
                let mut data = vec![0u8; h.length as usize];
                s.read_exact(&mut data).await?;
                neg.option(h.option, &data, &*self.store, &mut out)
            };
            s.write_all(&out).await?;
            s.flush().await?;
            match step {
                Step::Continue => {}
                Step::Close => return Ok(Handshake::Close),
                Step::StartTls => return Ok(Handshake::StartTls(neg)),
                Step::Transmission(info) => {
                    return Ok(match self.store.get(&info.name) {
                        Some(e) => Handshake::Serve(e, neg),
                        None => Handshake::Close,
                    });
                }
            }
        }
    }

    /// Serves requests until the client disconnects or the server stops; returns the number
    /// of requests served.
    async fn transmission<S>(&self, mut stream: S, export: Arc<Export>, neg: Negotiator) -> u64
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let mut stop = self.stop.subscribe();
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
            unflushed: false,
            closing: false,
            stop: Some(Box::pin(async move { stopped(&mut stop).await })),
            requests: 0,
            warn: RateLimit(0),
        };
        std::future::poll_fn(|cx| conn.poll(cx, &mut stream)).await;
        let _ = stream.shutdown().await;
        conn.requests
    }
}

/// Read buffer per connection.
const IN_BUF: usize = 256 * 1024;
/// Loop turns before a busy connection yields to other tasks.
const TURNS: usize = 64;

type Pending = Pin<Box<dyn Future<Output = (Frame, u32)> + Send>>;
type Stop = Pin<Box<dyn Future<Output = ()> + Send>>;

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
    /// Reply bytes to write, each with the budget units to give back once it is written.
    out: VecDeque<(Vec<u8>, u32)>,
    out_pos: usize,
    /// Bytes were written since the stream was last flushed. A stream may hold them (TLS
    /// keeps the records the socket could not take yet) until it is flushed.
    unflushed: bool,
    closing: bool,
    /// Resolves when the server stops; taken once it has.
    stop: Option<Stop>,
    requests: u64,
    warn: RateLimit,
}

impl Conn {
    fn poll<S>(&mut self, cx: &mut Context<'_>, stream: &mut S) -> Poll<()>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        if let Some(stop) = &mut self.stop
            && stop.as_mut().poll(cx).is_ready()
        {
            // Server stopping: read no more requests; finish and answer those in flight.
            self.stop = None;
            self.closing = true;
        }
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
                // An error reply also waits for the client to read it: it takes a unit.
                self.budget = self.budget.saturating_sub(1);
                self.push_frame(
                    error_frame(req.cookie, errno, self.structured, "invalid request"),
                    1,
                );
                return;
            }
        };
        self.requests += 1;
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

    /// Queues a reply; its `units` come back when its last byte has been written.
    fn push_frame(&mut self, frame: Frame, units: u32) {
        let last = frame.len().saturating_sub(1);
        for (i, chunk) in frame.into_iter().enumerate() {
            self.out
                .push_back((chunk, if i == last { units } else { 0 }));
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
                    self.push_frame(frame, units);
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
            for (i, (chunk, _)) in self.out.iter().take(64).enumerate() {
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
                        let Some((front, units)) = self.out.front() else {
                            break;
                        };
                        let left = front.len() - self.out_pos;
                        if written >= left {
                            written -= left;
                            // The reply is on its way: its budget is free again.
                            self.budget += units;
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
                    self.unflushed |= wrote;
                    return if wrote {
                        Poll::Ready(Ok(true))
                    } else {
                        Poll::Pending
                    };
                }
            }
        }
        // Every reply is with the stream: push out what it may still hold, or the client
        // waits for a reply that sits in the TLS layer. Pending wakes this task when the
        // socket takes more.
        self.unflushed |= wrote;
        if self.unflushed {
            match Pin::new(&mut *stream).poll_flush(cx) {
                Poll::Ready(Ok(())) => self.unflushed = false,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => {}
            }
        }
        Poll::Ready(Ok(wrote))
    }
}

fn error_frame(cookie: u64, errno: u32, structured: bool, message: &str) -> Frame {
    if structured {
        vec![proto::error_chunk(cookie, errno, message)]
    } else {
        vec![proto::simple_reply(cookie, errno).to_vec()]
    }
}

fn ok_frame(cookie: u64) -> Frame {
    vec![proto::simple_reply(cookie, 0).to_vec()]
}

/// The reply to a successful READ. Structured: one chunk per piece, holes as `OFFSET_HOLE`
/// (no zeroes on the wire); with `DF`, one content chunk (proto.md: a range mixing data and
/// holes then goes as `OFFSET_DATA` with the zeroes in it).
fn read_frame(
    cookie: u64,
    offset: u64,
    length: u32,
    pieces: Vec<Piece>,
    structured: bool,
    df: bool,
) -> Frame {
    if !structured {
        return vec![
            proto::simple_reply(cookie, 0).to_vec(),
            crate::volume::flatten(pieces, length),
        ];
    }
    let pieces = if df && pieces.len() > 1 {
        vec![Piece::Data(crate::volume::flatten(pieces, length))]
    } else {
        pieces
    };
    let mut frame = Vec::with_capacity(pieces.len() * 2);
    let (mut at, last) = (offset, pieces.len().saturating_sub(1));
    for (i, piece) in pieces.into_iter().enumerate() {
        let len = piece.len();
        match piece {
            Piece::Data(data) => {
                frame.push(proto::read_chunk_header(cookie, at, len, i == last));
                frame.push(data);
            }
            Piece::Hole(n) => frame.push(proto::hole_chunk(cookie, at, n, i == last)),
        }
        at += u64::from(len);
    }
    frame
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
        Command::Read { offset, length, df } => {
            return match export.read_pieces(offset, length).await {
                Ok(pieces) => (
                    read_frame(cookie, offset, length, pieces, structured, df),
                    u64::from(length),
                    true,
                ),
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
            return (vec![chunk], 0, true);
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

    /// Reads the greeting and asks for export "vol" (and structured replies) with `NBD_OPT_GO`.
    async fn send_options(client: &mut tokio::io::DuplexStream, structured: bool) {
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
    }

    /// Reads option replies until the options [`send_options`] sent are acknowledged.
    async fn read_option_acks(client: &mut tokio::io::DuplexStream, structured: bool) {
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
    }

    /// A stream that holds written bytes until it is flushed (as TLS does with the records
    /// the socket could not take yet): each reply must reach the client while the client
    /// waits for it, with no later write or close to push it out.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn replies_are_flushed_through_a_buffering_stream() {
        let dir = Dir(std::env::temp_dir().join(format!("slw-flush-{}", std::process::id())));
        let store = Store::open(&dir.0, 65536).expect("store");
        store.create("vol", 4 << 20).await.expect("volume");
        let server = Server::new(store, Arc::new(Metrics::new()), None);
        let (mut client, theirs) = tokio::io::duplex(64 << 10);
        let task = tokio::spawn(server.handle(tokio::io::BufWriter::new(theirs), false));
        send_options(&mut client, false).await;
        read_option_acks(&mut client, false).await;
        for (cookie, (command, length)) in [
            (cmd::WRITE, 4096u32),
            (cmd::READ, 1 << 20),
            (cmd::READ, 512),
        ]
        .into_iter()
        .enumerate()
        {
            let req = proto::Request {
                flags: 0,
                command,
                cookie: cookie as u64,
                offset: 0,
                length,
            };
            let mut wire = proto::encode_request(&req).to_vec();
            if command == cmd::WRITE {
                wire.resize(wire.len() + length as usize, 0x5a);
            }
            client.write_all(&wire).await.expect("request");
            let reply = async {
                let mut h = [0u8; 16];
                client.read_exact(&mut h).await.expect("reply header");
                assert_eq!(h[..4], proto::SIMPLE_REPLY_MAGIC.to_be_bytes());
                assert_eq!(h[4..8], [0; 4], "errno");
                assert_eq!(h[8..16], (cookie as u64).to_be_bytes());
                let mut data = vec![
                    0u8;
                    if command == cmd::READ {
                        length as usize
                    } else {
                        0
                    }
                ];
                client.read_exact(&mut data).await.expect("reply data");
                data
            };
            let data = tokio::time::timeout(Duration::from_secs(10), reply)
                .await
                .unwrap_or_else(|_| panic!("no reply to request {cookie} (command {command})"));
            assert!(
                data.iter().take(4096).all(|b| *b == 0x5a),
                "read back the write"
            );
        }
        drop(client);
        tokio::time::timeout(Duration::from_secs(10), task)
            .await
            .expect("connection task did not end")
            .expect("connection task panicked");
    }

    /// Negotiates like a client, sends `reqs` (valid magic, arbitrary fields) and `tail`
    /// (arbitrary bytes), half-closes, and checks every reply is well formed and the server
    /// ends the connection.
    async fn session(server: Arc<Server>, structured: bool, reqs: Vec<Req>, tail: Vec<u8>) {
        let (mut client, theirs) = tokio::io::duplex(1 << 22);
        let task = tokio::spawn(server.handle(theirs, false));
        send_options(&mut client, structured).await;
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
        read_option_acks(&mut client, structured).await;
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
            Server::new(store, Arc::new(Metrics::new()), None)
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
