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

/// A running daemon; dropping it stops the listeners and removes its sockets.
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
    tasks: Vec<JoinHandle<()>>,
}

fn bind_unix(what: &'static str, path: &Path) -> Result<UnixListener, DaemonError> {
    // e.g. /run/slipway for the default control socket.
    if let Some(parent) = path.parent()
        && !parent.as_os_str().is_empty()
    {
        std::fs::create_dir_all(parent).map_err(|source| DaemonError::Bind {
            what,
            addr: path.display().to_string(),
            source,
        })?;
    }
    // A socket file left by a killed daemon would make bind fail.
    if std::fs::symlink_metadata(path).is_ok_and(|m| {
        use std::os::unix::fs::FileTypeExt;
        m.file_type().is_socket()
    }) {
        let _ = std::fs::remove_file(path);
    }
    UnixListener::bind(path).map_err(|source| DaemonError::Bind {
        what,
        addr: path.display().to_string(),
        source,
    })
}

impl Daemon {
    /// Validates `cfg`, opens the store and starts every listener (needs a tokio runtime).
    pub async fn start(cfg: &ServeConfig) -> Result<Self, DaemonError> {
        cfg.validate()?;
        let store = Store::open(&cfg.data_dir, cfg.extent_size)?;
        let metrics = Arc::new(Metrics::new());
        let server = Server::new(Arc::clone(&store), Arc::clone(&metrics));
        let mut tasks = Vec::new();
        let mut tcp = None;
        if let Some(addr) = &cfg.listen {
            let l = TcpListener::bind(addr)
                .await
                .map_err(|source| DaemonError::Bind {
                    what: "NBD TCP listener",
                    addr: addr.clone(),
                    source,
                })?;
            tcp = l.local_addr().ok();
            tasks.push(tokio::spawn(Arc::clone(&server).serve_tcp(l)));
        }
        if let Some(path) = &cfg.unix {
            let l = bind_unix("NBD Unix socket", path)?;
            tasks.push(tokio::spawn(Arc::clone(&server).serve_unix(l)));
        }
        let l = bind_unix("control socket", &cfg.control)?;
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
        tasks.push(tokio::spawn(crate::control::serve(l, Arc::clone(&store))));
        let mut metrics_addr = None;
        if let Some(addr) = &cfg.metrics {
            let l = TcpListener::bind(addr)
                .await
                .map_err(|source| DaemonError::Bind {
                    what: "metrics endpoint",
                    addr: addr.clone(),
                    source,
                })?;
            metrics_addr = l.local_addr().ok();
            tasks.push(tokio::spawn(metrics::serve_http(l, metrics)));
        }
        tracing::info!(?tcp, unix = ?cfg.unix, control = %cfg.control.display(), metrics = ?metrics_addr, "serving");
        Ok(Self {
            tcp,
            unix: cfg.unix.clone(),
            control: cfg.control.clone(),
            metrics: metrics_addr,
            store,
            tasks,
        })
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
        for t in &self.tasks {
            t.abort();
        }
        if let Some(u) = &self.unix {
            let _ = std::fs::remove_file(u);
        }
        let _ = std::fs::remove_file(&self.control);
    }
}
