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

use std::net::IpAddr;
use std::path::Path;

use axum::Json;
use axum::body::Bytes;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use slipway_local::LocalClient;

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
    local: LocalClient,
}

impl Client {
    pub fn new(socket: impl AsRef<Path>) -> Self {
        Self {
            local: LocalClient::new(socket),
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

    /// One request; a non-2xx answer is an error carrying the server's message.
    fn call(&self, method: &str, path: &str, body: Option<&[u8]>) -> Result<Vec<u8>, LbError> {
        let answer = self
            .local
            .request(method, path, body)
            .map_err(|e| LbError::Api(e.to_string()))?;
        if answer.is_success() {
            return Ok(answer.body);
        }
        let message = serde_json::from_slice::<ErrorBody>(&answer.body)
            .map(|e| e.error)
            .unwrap_or_else(|_| answer.text());
        Err(LbError::Api(format!(
            "{method} {path}: {}: {message}",
            answer.status
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
