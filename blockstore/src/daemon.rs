//! Starting and stopping the daemon: store, NBD listeners, control socket, metrics endpoint.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use thiserror::Error;
use tokio::net::{TcpListener, UnixListener};
use tokio::task::JoinHandle;

use crate::config::{ConfigError, ServeConfig};
use crate::error::StoreError;
use crate::metrics::{self, Metrics};
use crate::server::Server;
use crate::store::Store;

/// The daemon could not start.
#[derive(Debug, Error)]
pub enum DaemonError {
    /// Bad configuration.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The data directory could not be opened.
    #[error("cannot open the data directory")]
    Store(#[from] StoreError),
    /// The TLS files could not be used.
    #[error("cannot set up TLS")]
    Tls(#[from] crate::tls::TlsError),
    /// Another daemon is listening on this socket.
    #[error("{what} {path} is in use by a running daemon (refusing to take it over)")]
    SocketInUse {
        /// Which socket.
        what: &'static str,
        /// Its path.
        path: PathBuf,
    },
    /// A listener could not be bound.
    #[error("cannot bind {what} on {addr}")]
    Bind {
        /// Which listener.
        what: &'static str,
        /// Address or path.
        addr: String,
        /// OS error.
        #[source]
        source: std::io::Error,
    },
}

/// A running daemon. [`Daemon::shutdown`] stops it cleanly; dropping it stops the listeners.
/// Either way it removes the socket files it created (and only those).
#[derive(Debug)]
pub struct Daemon {
    /// Bound TCP address, if any.
    pub tcp: Option<SocketAddr>,
    /// NBD Unix socket, if any.
    pub unix: Option<PathBuf>,
    /// Control socket.
    pub control: PathBuf,
    /// Bound metrics address, if any.
    pub metrics: Option<SocketAddr>,
    /// The store being served.
    pub store: Arc<Store>,
    server: Arc<Server>,
    /// NBD accept loops (they return once their connections are done after a shutdown).
    nbd: Vec<JoinHandle<()>>,
    /// Control and metrics loops.
    aux: Vec<JoinHandle<()>>,
    /// Removed when the daemon is dropped.
    _sockets: Vec<OwnedSocket>,
}

/// A Unix socket file this daemon created; removed on drop if the path still names that
/// file (another process may have replaced it since).
#[derive(Debug)]
struct OwnedSocket {
    path: PathBuf,
    id: (u64, u64),
}

impl Drop for OwnedSocket {
    fn drop(&mut self) {
        if file_id(&self.path) == Some(self.id) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Device and inode of the file at `path`.
fn file_id(path: &Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::symlink_metadata(path)
        .ok()
        .map(|m| (m.dev(), m.ino()))
}

fn bind_unix(what: &'static str, path: &Path) -> Result<(UnixListener, OwnedSocket), DaemonError> {
    let err = |source| DaemonError::Bind {
        what,
        addr: path.display().to_string(),
        source,
    };
    // e.g. /run/slipway for the default control socket.
    if let Some(parent) = path.parent()
        && !parent.as_os_str().is_empty()
    {
        std::fs::create_dir_all(parent).map_err(err)?;
    }
    let is_socket = std::fs::symlink_metadata(path).is_ok_and(|m| {
        use std::os::unix::fs::FileTypeExt;
        m.file_type().is_socket()
    });
    if is_socket {
        // A live socket belongs to a running daemon: never take it over. One nobody listens
        // on was left by a daemon that was killed, and is replaced.
        match std::os::unix::net::UnixStream::connect(path) {
            Ok(_) => {
                return Err(DaemonError::SocketInUse {
                    what,
                    path: path.to_owned(),
                });
            }
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                tracing::info!(socket = %path.display(), "replacing a stale socket file");
                let _ = std::fs::remove_file(path);
            }
            // Bind reports whatever is wrong with the path.
            Err(_) => {}
        }
    }
    let listener = UnixListener::bind(path).map_err(err)?;
    let id = file_id(path).ok_or_else(|| err(std::io::ErrorKind::NotFound.into()))?;
    Ok((
        listener,
        OwnedSocket {
            path: path.to_owned(),
            id,
        },
    ))
}

async fn bind_tcp(what: &'static str, addr: &str) -> Result<TcpListener, DaemonError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| DaemonError::Bind {
            what,
            addr: addr.to_owned(),
            source,
        })
}

impl Daemon {
    /// Validates `cfg`, binds every listener, opens the store and starts serving (needs a
    /// tokio runtime). On error nothing is left behind: no socket file, no task.
    pub async fn start(cfg: &ServeConfig) -> Result<Self, DaemonError> {
        cfg.validate()?;
        let mut sockets = Vec::new();
        let tcp = match &cfg.listen {
            Some(addr) => Some(bind_tcp("NBD TCP listener", addr).await?),
            None => None,
        };
        let unix = match &cfg.unix {
            Some(path) => {
                let (l, owned) = bind_unix("NBD Unix socket", path)?;
                sockets.push(owned);
                Some(l)
            }
            None => None,
        };
        let (control, owned) = bind_unix("control socket", &cfg.control)?;
        sockets.push(owned);
        // The control API creates and deletes volumes: owner only.
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&cfg.control, std::fs::Permissions::from_mode(0o600))
                .map_err(|source| DaemonError::Bind {
                    what: "control socket (chmod 0600)",
                    addr: cfg.control.display().to_string(),
                    source,
                })?;
        }
        let metrics_listener = match &cfg.metrics {
            Some(addr) => Some(bind_tcp("metrics endpoint", addr).await?),
            None => None,
        };
        let tls = match &cfg.tls {
            Some(t) => Some(crate::server::Tls(crate::tls::acceptor(t)?)),
            None => None,
        };
        let store = Store::open(&cfg.data_dir, cfg.extent_size)?;

        let metrics = Arc::new(Metrics::new());
        let server = Server::new(Arc::clone(&store), Arc::clone(&metrics), tls);
        let tcp_addr = tcp.as_ref().and_then(|l| l.local_addr().ok());
        let metrics_addr = metrics_listener.as_ref().and_then(|l| l.local_addr().ok());
        let mut nbd = Vec::new();
        if let Some(l) = tcp {
            nbd.push(tokio::spawn(Arc::clone(&server).serve_tcp(l)));
        }
        if let Some(l) = unix {
            nbd.push(tokio::spawn(Arc::clone(&server).serve_unix(l)));
        }
        let mut aux = vec![tokio::spawn(crate::control::serve(
            control,
            Arc::clone(&store),
        ))];
        if let Some(l) = metrics_listener {
            aux.push(tokio::spawn(metrics::serve_http(l, metrics)));
        }
        tracing::info!(tcp = ?tcp_addr, tls = cfg.tls.is_some(), unix = ?cfg.unix, control = %cfg.control.display(), metrics = ?metrics_addr, "serving");
        Ok(Self {
            tcp: tcp_addr,
            unix: cfg.unix.clone(),
            control: cfg.control.clone(),
            metrics: metrics_addr,
            store,
            server,
            nbd,
            aux,
            _sockets: sockets,
        })
    }

    /// Stops cleanly: no new connections or control requests; open connections finish and
    /// answer the requests they have started (for up to [`crate::server::SHUTDOWN_GRACE`]);
    /// then every volume is flushed, so every write acknowledged before the stop is durable
    /// (as if each client had sent FLUSH). Returns the number of volumes flushed.
    pub async fn shutdown(mut self) -> Result<usize, StoreError> {
        for t in self.aux.drain(..) {
            t.abort();
        }
        self.server.shutdown();
        for t in self.nbd.drain(..) {
            let _ = t.await;
        }
        self.store.flush_all().await
    }

    /// The line the daemon prints once it accepts connections (tests wait for it).
    pub fn ready_line(&self) -> String {
        let opt = |v: Option<String>| v.unwrap_or_else(|| "-".into());
        format!(
            "slipway-blockstore ready tcp={} unix={} control={} metrics={}",
            opt(self.tcp.map(|a| a.to_string())),
            opt(self.unix.as_ref().map(|p| p.display().to_string())),
            self.control.display(),
            opt(self.metrics.map(|a| a.to_string())),
        )
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        for t in self.nbd.iter().chain(&self.aux) {
            t.abort();
        }
    }
}
