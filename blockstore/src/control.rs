//! The local control API: JSON lines over a Unix socket, used by `slipway volume` and the CSI
//! driver.
//!
//! Each request is one JSON object on one line, e.g.
//! `{"op":"create","name":"pvc-1","size":1073741824}`; each answer is one line
//! `{"ok":true,"volumes":[...]}` or `{"ok":false,"error":"..."}`.

use std::io::{BufRead, Write};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use thiserror::Error;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixListener;

use crate::store::{Store, VolumeInfo};

/// Longest request line accepted.
const MAX_LINE: usize = 64 * 1024;

/// A control request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum ControlRequest {
    /// Create a thin volume.
    Create {
        /// Volume name.
        name: String,
        /// Size in bytes.
        size: u64,
    },
    /// List volumes and snapshots.
    List {},
    /// Snapshot `volume` as `volume@name`.
    Snapshot {
        /// Volume name.
        volume: String,
        /// Snapshot name (without the volume prefix).
        name: String,
    },
    /// Clone a snapshot into a new volume.
    Clone {
        /// Snapshot, `volume@snap`.
        snapshot: String,
        /// New volume name.
        name: String,
    },
    /// Set the network clients (DNS names of their TLS certificates) allowed to open a volume
    /// and its snapshots; empty allows any.
    Authorize {
        /// Volume name.
        name: String,
        /// Client names.
        clients: Vec<String>,
    },
    /// Grow a volume.
    Resize {
        /// Volume name.
        name: String,
        /// New size in bytes.
        size: u64,
    },
    /// Delete a volume or snapshot.
    Delete {
        /// Volume or `volume@snap`.
        name: String,
        /// Also delete dependent clones.
        #[serde(default)]
        cascade: bool,
    },
}

/// A control answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct ControlResponse {
    /// Success.
    pub ok: bool,
    /// Error chain, on failure.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Volumes created, changed or listed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub volumes: Vec<VolumeInfo>,
    /// Names deleted.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub deleted: Vec<String>,
}

/// Talking to the control socket failed.
#[derive(Debug, Error)]
pub enum ControlError {
    /// Could not connect or exchange the request.
    #[error("control socket {path}")]
    Io {
        /// Socket path.
        path: String,
        /// OS error.
        #[source]
        source: std::io::Error,
    },
    /// The server answered something that is not a response.
    #[error("bad answer from the control socket")]
    Decode(#[source] serde_json::Error),
    /// The server refused the request.
    #[error("{0}")]
    Refused(String),
}

/// The error's message with its whole source chain on one line (`a: b: c`), as control answers
/// and CSI statuses carry it.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        out.push_str(": ");
        out.push_str(&s.to_string());
        cur = s.source();
    }
    out
}

/// Runs one request against the store.
pub async fn dispatch(store: &Store, req: ControlRequest) -> ControlResponse {
    let result = match req {
        ControlRequest::Create { name, size } => store.create(&name, size).await.map(|v| vec![v]),
        ControlRequest::List {} => Ok(store.list().await),
        ControlRequest::Snapshot { volume, name } => {
            store.snapshot(&volume, &name).await.map(|v| vec![v])
        }
        ControlRequest::Clone { snapshot, name } => store
            .clone_snapshot(&snapshot, &name)
            .await
            .map(|v| vec![v]),
        ControlRequest::Resize { name, size } => store.resize(&name, size).await.map(|v| vec![v]),
        ControlRequest::Authorize { name, clients } => {
            store.authorize(&name, clients).await.map(|v| vec![v])
        }
        ControlRequest::Delete { name, cascade } => {
            return match store.delete(&name, cascade).await {
                Ok(deleted) => ControlResponse {
                    ok: true,
                    deleted,
                    ..ControlResponse::default()
                },
                Err(e) => failure(error_chain(&e)),
            };
        }
    };
    match result {
        Ok(volumes) => ControlResponse {
            ok: true,
            volumes,
            ..ControlResponse::default()
        },
        Err(e) => failure(error_chain(&e)),
    }
}

fn failure(error: String) -> ControlResponse {
    ControlResponse {
        ok: false,
        error: Some(error),
        ..ControlResponse::default()
    }
}

/// Serves the control socket until the task is dropped.
pub async fn serve(listener: UnixListener, store: Arc<Store>) {
    loop {
        let Ok((sock, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let store = Arc::clone(&store);
        tokio::spawn(async move {
            let (rd, mut wr) = sock.into_split();
            let mut rd = BufReader::new(rd);
            loop {
                let mut line = Vec::new();
                let mut limited = tokio::io::AsyncReadExt::take(&mut rd, MAX_LINE as u64);
                match limited.read_until(b'\n', &mut line).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
                let resp = if line.last() != Some(&b'\n') && line.len() >= MAX_LINE {
                    failure(format!("request longer than {MAX_LINE} bytes"))
                } else {
                    match serde_json::from_slice::<ControlRequest>(&line) {
                        Ok(req) => {
                            tracing::info!(?req, "control request");
                            dispatch(&store, req).await
                        }
                        Err(e) => failure(format!("bad request: {e}")),
                    }
                };
                let mut out = serde_json::to_vec(&resp).unwrap_or_default();
                out.push(b'\n');
                if wr.write_all(&out).await.is_err() {
                    return;
                }
                if line.last() != Some(&b'\n') {
                    return;
                }
            }
        });
    }
}

/// Sends one request over a blocking connection (for the CLI).
pub fn call_blocking(path: &Path, req: &ControlRequest) -> Result<ControlResponse, ControlError> {
    let io = |source| ControlError::Io {
        path: path.display().to_string(),
        source,
    };
    let mut sock = std::os::unix::net::UnixStream::connect(path).map_err(io)?;
    let mut line = serde_json::to_vec(req).map_err(ControlError::Decode)?;
    line.push(b'\n');
    sock.write_all(&line).map_err(io)?;
    let mut answer = String::new();
    std::io::BufReader::new(sock)
        .read_line(&mut answer)
        .map_err(io)?;
    let resp: ControlResponse = serde_json::from_str(&answer).map_err(ControlError::Decode)?;
    if resp.ok {
        Ok(resp)
    } else {
        Err(ControlError::Refused(resp.error.unwrap_or_default()))
    }
}

/// Sends one request from async code (for the CSI driver).
pub async fn call(path: &Path, req: &ControlRequest) -> Result<ControlResponse, ControlError> {
    let io = |source| ControlError::Io {
        path: path.display().to_string(),
        source,
    };
    let sock = tokio::net::UnixStream::connect(path).await.map_err(io)?;
    let (rd, mut wr) = sock.into_split();
    let mut line = serde_json::to_vec(req).map_err(ControlError::Decode)?;
    line.push(b'\n');
    wr.write_all(&line).await.map_err(io)?;
    let mut answer = String::new();
    BufReader::new(rd)
        .read_line(&mut answer)
        .await
        .map_err(io)?;
    let resp: ControlResponse = serde_json::from_str(&answer).map_err(ControlError::Decode)?;
    if resp.ok {
        Ok(resp)
    } else {
        Err(ControlError::Refused(resp.error.unwrap_or_default()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_parse_strictly() {
        let r: ControlRequest =
            serde_json::from_str(r#"{"op":"delete","name":"v"}"#).expect("parse");
        assert_eq!(
            r,
            ControlRequest::Delete {
                name: "v".into(),
                cascade: false
            }
        );
        assert!(serde_json::from_str::<ControlRequest>(r#"{"op":"list","x":1}"#).is_err());
        assert!(serde_json::from_str::<ControlRequest>(r#"{"op":"explode"}"#).is_err());
    }
}
