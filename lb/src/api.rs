//! The LB's local control API: HTTP/1.1 with JSON bodies on a Unix socket (only local users
//! with access to the socket file can drive it). The supervisor will drive the same calls.
//!
//! | method | path | body | answer |
//! | --- | --- | --- | --- |
//! | PUT | `/v1/services` | [`ServiceSpec`] | `{"vip": ...}` |
//! | DELETE | `/v1/services/{namespace}/{name}` | | 204 |
//! | GET | `/v1/status` | | [`Status`] |
//! | GET | `/metrics` | | OpenMetrics text |
//!
//! Errors answer `{"error": "...", "fields": [...]}` (each field a Kubernetes `StatusCause`,
//! `slipway_api::FieldError`) with the status code chosen in one place,
//! `impl IntoResponse for ApiError`. [`Client`] is the blocking client `slipway lb` uses.

use std::io::{Read, Write};
use std::net::IpAddr;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use axum::Json;
use axum::body::Bytes;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};

use crate::LbError;
use crate::config::ServiceSpec;
use crate::status::Status;
use slipway_api::FieldError;

/// The body of a successful `PUT /v1/services`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Applied {
    pub vip: IpAddr,
}

/// The body of every error answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: String,
    #[serde(default)]
    pub fields: Vec<FieldError>,
}

/// An [`LbError`] on its way to the wire.
#[derive(Debug)]
pub struct ApiError(pub LbError);

impl From<LbError> for ApiError {
    fn from(e: LbError) -> Self {
        Self(e)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let code = match &self.0 {
            LbError::Invalid { .. } => StatusCode::BAD_REQUEST,
            LbError::NotFound(_) => StatusCode::NOT_FOUND,
            LbError::VipConflict { .. } => StatusCode::CONFLICT,
            LbError::NotInPool(_) => StatusCode::UNPROCESSABLE_ENTITY,
            LbError::PoolExhausted(_) | LbError::Capacity(_) => StatusCode::INSUFFICIENT_STORAGE,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        if let LbError::Capacity(what) = &self.0 {
            // A map at its size is an operator's problem: say so in the log too.
            tracing::warn!(what, "request refused: datapath full");
        }
        let fields = match &self.0 {
            LbError::Invalid { errors, .. } => errors.clone(),
            _ => Vec::new(),
        };
        let mut error = self.0.to_string();
        let mut source = std::error::Error::source(&self.0);
        while let Some(s) = source {
            error.push_str(": ");
            error.push_str(&s.to_string());
            source = s.source();
        }
        (code, Json(ErrorBody { error, fields })).into_response()
    }
}

/// Parses a JSON request body; a body that is not a valid spec is a 400 naming the problem.
pub fn parse_spec(body: &Bytes) -> Result<ServiceSpec, ApiError> {
    serde_json::from_slice(body).map_err(|e| {
        ApiError(LbError::Invalid {
            what: "service",
            errors: vec![FieldError::new(
                "body",
                slipway_api::FieldReason::Invalid,
                e.to_string(),
            )],
        })
    })
}

/// A blocking client of the local API.
#[derive(Debug, Clone)]
pub struct Client {
    socket: PathBuf,
}

impl Client {
    pub fn new(socket: impl AsRef<Path>) -> Self {
        Self {
            socket: socket.as_ref().to_owned(),
        }
    }

    pub fn status(&self) -> Result<Status, LbError> {
        let body = self.call("GET", "/v1/status", None)?;
        serde_json::from_slice(&body).map_err(|e| LbError::Api(format!("status body: {e}")))
    }

    pub fn apply(&self, spec: &ServiceSpec) -> Result<IpAddr, LbError> {
        let json = serde_json::to_vec(spec).map_err(|e| LbError::Api(e.to_string()))?;
        let body = self.call("PUT", "/v1/services", Some(&json))?;
        let applied: Applied =
            serde_json::from_slice(&body).map_err(|e| LbError::Api(format!("apply body: {e}")))?;
        Ok(applied.vip)
    }

    pub fn delete(&self, namespace: &str, name: &str) -> Result<(), LbError> {
        self.call("DELETE", &format!("/v1/services/{namespace}/{name}"), None)
            .map(drop)
    }

    pub fn metrics(&self) -> Result<String, LbError> {
        let body = self.call("GET", "/metrics", None)?;
        Ok(String::from_utf8_lossy(&body).into_owned())
    }

    /// One request on a fresh connection (`Connection: close`); a non-2xx answer is an
    /// error carrying the server's message.
    fn call(&self, method: &str, path: &str, body: Option<&[u8]>) -> Result<Vec<u8>, LbError> {
        let io = |e: std::io::Error| LbError::Api(format!("{}: {e}", self.socket.display()));
        let mut stream = UnixStream::connect(&self.socket).map_err(io)?;
        stream
            .set_read_timeout(Some(Duration::from_secs(60)))
            .map_err(io)?;
        let body = body.unwrap_or_default();
        let head = format!(
            "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        stream.write_all(head.as_bytes()).map_err(io)?;
        stream.write_all(body).map_err(io)?;
        let mut response = Vec::new();
        stream.read_to_end(&mut response).map_err(io)?;
        let (code, body) = parse_response(&response)
            .ok_or_else(|| LbError::Api(format!("malformed answer to {method} {path}")))?;
        if (200..300).contains(&code) {
            return Ok(body);
        }
        let message = serde_json::from_slice::<ErrorBody>(&body)
            .map(|e| e.error)
            .unwrap_or_else(|_| String::from_utf8_lossy(&body).into_owned());
        Err(LbError::Api(format!("{method} {path}: {code}: {message}")))
    }
}

/// Splits an HTTP/1.1 response into its status code and body (chunked bodies decoded).
fn parse_response(raw: &[u8]) -> Option<(u16, Vec<u8>)> {
    let end = raw.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = std::str::from_utf8(&raw[..end]).ok()?;
    let code = head.split_whitespace().nth(1)?.parse().ok()?;
    let body = &raw[end + 4..];
    let chunked = head.lines().any(|l| {
        let l = l.to_ascii_lowercase();
        l.starts_with("transfer-encoding:") && l.contains("chunked")
    });
    if !chunked {
        return Some((code, body.to_vec()));
    }
    let mut out = Vec::new();
    let mut rest = body;
    loop {
        let line_end = rest.windows(2).position(|w| w == b"\r\n")?;
        let size =
            usize::from_str_radix(std::str::from_utf8(&rest[..line_end]).ok()?.trim(), 16).ok()?;
        rest = &rest[line_end + 2..];
        if size == 0 {
            return Some((code, out));
        }
        out.extend_from_slice(rest.get(..size)?);
        rest = rest.get(size + 2..)?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_plain_and_chunked_responses() {
        let plain = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}";
        assert_eq!(parse_response(plain), Some((200, b"{}".to_vec())));
        let chunked = b"HTTP/1.1 404 Not Found\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n";
        assert_eq!(parse_response(chunked), Some((404, b"abcde".to_vec())));
        assert_eq!(parse_response(b"garbage"), None);
    }

    #[test]
    fn errors_map_to_status_codes() {
        let code = |e| ApiError(e).into_response().status();
        assert_eq!(code(LbError::NotFound("a/b".into())), StatusCode::NOT_FOUND);
        assert_eq!(
            code(LbError::PoolExhausted(crate::config::IpFamily::Ipv6)),
            StatusCode::INSUFFICIENT_STORAGE
        );
        assert_eq!(
            code(LbError::VipConflict {
                vip: IpAddr::V6(std::net::Ipv6Addr::LOCALHOST),
                owner: "a/b".into(),
                port: "80/TCP".into()
            }),
            StatusCode::CONFLICT
        );
        let bad = parse_spec(&Bytes::from_static(b"{\"nope\":1}")).expect_err("bad");
        assert_eq!(bad.into_response().status(), StatusCode::BAD_REQUEST);
    }
}
