//! HTTP plumbing: response bodies (whole and streamed), JSON responses, query parsing.

use std::collections::HashMap;
use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::Frame;
use http_body_util::{BodyExt, Full};
use hyper::{Response, StatusCode, header};
use serde_json::Value;
use tokio::sync::mpsc;

use crate::error::ApiError;

/// Response body type: a whole buffer or a stream of chunks.
pub type Body = http_body_util::combinators::BoxBody<Bytes, Infallible>;

/// A streamed body fed by a channel (watch responses).
#[derive(Debug)]
pub struct ChannelBody {
    rx: mpsc::Receiver<Bytes>,
}

impl http_body::Body for ChannelBody {
    type Data = Bytes;
    type Error = Infallible;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.rx.poll_recv(cx).map(|o| o.map(|b| Ok(Frame::data(b))))
    }
}

/// A streaming response body and its sender.
pub fn channel_body() -> (mpsc::Sender<Bytes>, Body) {
    let (tx, rx) = mpsc::channel(64);
    (tx, ChannelBody { rx }.boxed())
}

fn full(b: impl Into<Bytes>) -> Body {
    Full::new(b.into()).boxed()
}

fn build(code: u16, content_type: &str, body: Body) -> Response<Body> {
    let mut r = Response::new(body);
    *r.status_mut() = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    if let Ok(v) = header::HeaderValue::from_str(content_type) {
        r.headers_mut().insert(header::CONTENT_TYPE, v);
    }
    r
}

/// A JSON response.
pub fn json(code: u16, v: &Value) -> Response<Body> {
    let bytes = serde_json::to_vec(v).unwrap_or_default();
    build(code, "application/json", full(bytes))
}

/// A response with raw bytes.
pub fn raw(code: u16, content_type: &str, bytes: impl Into<Bytes>) -> Response<Body> {
    build(code, content_type, full(bytes))
}

/// A streamed response.
pub fn stream(content_type: &str, body: Body) -> Response<Body> {
    build(200, content_type, body)
}

/// The `metav1.Status` response of an error.
pub fn error(e: &ApiError) -> Response<Body> {
    json(e.code(), &e.to_status())
}

/// Percent-decodes a query component (`+` is a space): the API crate's, shared with the
/// kubelet endpoint.
pub use slipway_api::logs::percent_decode;

/// Parses a query string into a map (last value wins).
pub fn parse_query(q: Option<&str>) -> HashMap<String, String> {
    q.unwrap_or_default()
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| match p.split_once('=') {
            Some((k, v)) => (percent_decode(k), percent_decode(v)),
            None => (percent_decode(p), String::new()),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_decoding() {
        let q = parse_query(Some("labelSelector=app%3Dweb%2Ctier+in+%28a%29&watch=1&x"));
        assert_eq!(
            q.get("labelSelector").map(String::as_str),
            Some("app=web,tier in (a)")
        );
        assert_eq!(q.get("watch").map(String::as_str), Some("1"));
        assert_eq!(q.get("x").map(String::as_str), Some(""));
        assert_eq!(percent_decode("100%"), "100%");
    }
}
