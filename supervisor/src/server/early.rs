//! Early responses over HTTP/2: a response sent before the request body was read (401 before
//! the body, 400 for a body over the limit) must reach the client whole. Dropping an unread
//! request body makes h2 reset the stream, and the reset discards the response frames still
//! queued, which curl reports as a framing error. So the unread remainder of the request body
//! is kept, and once the response body has ended it is read and discarded (up to a bound of
//! bytes and time) so the stream closes normally; past the bound it is dropped (reset).

use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};

use std::time::Duration;

use bytes::Bytes;
use http_body::{Body as _, Frame, SizeHint};
use http_body_util::BodyExt;
use hyper::Response;
use hyper::body::Incoming;

use super::http::Body;

type Slot = Arc<Mutex<Option<Incoming>>>;

/// Most a remainder is drained of before it is dropped.
const DRAIN_BYTES: usize = 64 * 1024 * 1024;
/// Longest a remainder is drained for.
const DRAIN_TIME: Duration = Duration::from_secs(10);

/// The request body the handler reads; what it leaves unread stays with the response.
#[derive(Debug)]
pub struct RequestBody {
    slot: Slot,
}

/// Keeps a request body's unread remainder alive.
#[derive(Debug)]
pub struct Remainder {
    slot: Slot,
}

impl Remainder {
    /// Reads and discards what is left of the request body, within the bounds.
    fn drain(self) {
        let body = self
            .slot
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        let Some(mut body) = body else { return };
        if body.is_end_stream() {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        runtime.spawn(async move {
            let mut read = 0usize;
            let _ = tokio::time::timeout(DRAIN_TIME, async {
                while let Some(Ok(frame)) = body.frame().await {
                    read += frame.data_ref().map_or(0, Bytes::len);
                    if read > DRAIN_BYTES {
                        break;
                    }
                }
            })
            .await;
        });
    }
}

/// Splits a request body into the handler's reader and the remainder keeper.
pub fn split(body: Incoming) -> (RequestBody, Remainder) {
    let slot = Arc::new(Mutex::new(Some(body)));
    (RequestBody { slot: slot.clone() }, Remainder { slot })
}

impl http_body::Body for RequestBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let mut guard = self.slot.lock().unwrap_or_else(PoisonError::into_inner);
        match guard.as_mut() {
            Some(b) => Pin::new(b).poll_frame(cx),
            None => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.slot
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .as_ref()
            .is_none_or(|b| b.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        self.slot
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .as_ref()
            .map(|b| b.size_hint())
            .unwrap_or_default()
    }
}

/// A response body that drops the request's remainder once it has ended.
struct Holding {
    inner: Body,
    remainder: Option<Remainder>,
}

impl http_body::Body for Holding {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(None) = polled
            && let Some(r) = self.remainder.take()
        {
            r.drain();
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Holding {
    // hyper may drop a body that says it has ended without polling it to the end.
    fn drop(&mut self) {
        if let Some(r) = self.remainder.take() {
            r.drain();
        }
    }
}

/// Ties the request's remainder to the response, to be drained once the response has ended.
pub fn hold(response: Response<Body>, remainder: Remainder) -> Response<Body> {
    response.map(|inner| {
        Holding {
            inner,
            remainder: Some(remainder),
        }
        .boxed()
    })
}
