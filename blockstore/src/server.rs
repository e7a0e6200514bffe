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

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tracing::Instrument;

use crate::metrics::{Metrics, OpMetrics};
use crate::negotiate::{Negotiator, Step};
use crate::proto::{self, Command};
use crate::store::Store;
use crate::volume::Export;

mod conn;
use conn::Conn;

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
    async fn transmission<S>(&self, stream: S, export: Arc<Export>, neg: Negotiator) -> u64
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let metrics = Arc::new(ConnMetrics::new(&self.metrics, &export.name));
        Conn::new(export, metrics, &neg, self.stop.subscribe())
            .serve(stream)
            .await
    }
}

#[cfg(test)]
mod tests;
