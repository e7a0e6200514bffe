//! One connection's transmission phase: requests parsed and started at once, many in flight,
//! replies queued in completion order and written in batches, the in-flight budget given back
//! when a reply has been written.

use std::collections::VecDeque;
use std::future::Future;
use std::io::IoSlice;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::sync::watch;

use crate::negotiate::Negotiator;
use crate::proto::{self, Command, ExportView, cmd};
use crate::volume::{Export, Piece, ZeroMode};

use super::{ConnMetrics, MAX_INFLIGHT, RateLimit, UNIT, stopped};

/// Reply bytes, written in order.
type Frame = Vec<Vec<u8>>;

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
pub(super) struct Conn {
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
    pub(super) fn new(
        export: Arc<Export>,
        metrics: Arc<ConnMetrics>,
        neg: &Negotiator,
        mut stop: watch::Receiver<bool>,
    ) -> Self {
        Self {
            base_allocation: neg.base_allocation(&export.name),
            export,
            metrics,
            structured: neg.structured,
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
        }
    }

    /// Serves requests until the client disconnects or the server stops; returns the number
    /// of requests served.
    pub(super) async fn serve<S>(mut self, mut stream: S) -> u64
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        std::future::poll_fn(|cx| self.poll(cx, &mut stream)).await;
        let _ = stream.shutdown().await;
        self.requests
    }

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
