//! Serving the CSI services on a Unix socket (CSI spec: the CO talks to plugins over a Unix
//! domain socket given as `unix:///path`).

use std::path::{Path, PathBuf};

use tokio::net::UnixListener;
use tokio_stream::wrappers::UnixListenerStream;
use tonic::transport::Server;

use crate::error::CsiError;

/// Parses an endpoint: `unix:///path`, `unix:/path` or a plain path.
pub fn socket_path(endpoint: &str) -> Result<PathBuf, CsiError> {
    let p = endpoint
        .strip_prefix("unix://")
        .or_else(|| endpoint.strip_prefix("unix:"))
        .unwrap_or(endpoint);
    if !p.starts_with('/') {
        return Err(CsiError::invalid(
            "endpoint",
            format!("{endpoint:?} is not unix:///absolute/path"),
        ));
    }
    if p.len() > 107 {
        return Err(CsiError::invalid(
            "endpoint",
            "socket path is longer than 107 bytes",
        ));
    }
    Ok(PathBuf::from(p))
}

/// Binds the socket, refusing one a live process still serves (a stale file is replaced).
pub fn bind(path: &Path) -> Result<UnixListener, CsiError> {
    if std::os::unix::net::UnixStream::connect(path).is_ok() {
        return Err(CsiError::FailedPrecondition(format!(
            "{} is served by another process",
            path.display()
        )));
    }
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(CsiError::io("mkdir", parent.display()))?;
    }
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(CsiError::io("unlink", path.display())(e)),
    }
    UnixListener::bind(path).map_err(CsiError::io("bind", path.display()))
}

/// Serves `router` on `listener` until `shutdown` resolves, then removes the socket file.
pub async fn serve(
    router: tonic::transport::server::Router,
    listener: UnixListener,
    path: &Path,
    shutdown: impl Future<Output = ()>,
) -> Result<(), tonic::transport::Error> {
    let r = router
        .serve_with_incoming_shutdown(UnixListenerStream::new(listener), shutdown)
        .await;
    let _ = std::fs::remove_file(path);
    r
}

/// A tonic server builder with the settings every plugin uses.
pub fn builder() -> Server {
    Server::builder()
}

/// A gRPC channel to a plugin's Unix socket (what a CO, or a test, calls the plugin through).
pub async fn connect(path: &Path) -> Result<tonic::transport::Channel, tonic::transport::Error> {
    let path = path.to_owned();
    // The URI is required by the builder and ignored by the connector.
    tonic::transport::Endpoint::from_static("http://csi.sock")
        .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
            let path = path.clone();
            async move {
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                    tokio::net::UnixStream::connect(path).await?,
                ))
            }
        }))
        .await
}
