//! The HTTPS API server: TLS accept loop, per-connection client identity, shared state.

pub mod access_review;
pub mod binding;
pub mod discovery;
pub mod early;
pub mod handler;
pub mod health;
pub mod http;
pub mod join;
pub mod keys;
pub mod limits;
pub mod logs;
pub mod objects;
pub mod paging;
pub mod protobuf;
pub mod scale;
pub mod table;
mod verbs;
pub mod watch;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tracing::{debug, info, warn};

use crate::admission::AdmissionConfig;
use crate::audit::AuditLog;
use crate::auth::{AuthError, Authenticator, MASTERS, UserInfo};
use crate::metrics::Metrics;
use crate::store::etcd::EtcdStore;
use crate::store::redb::RedbStore;
use crate::store::{AnyStore, Store, StoreError};
use crate::tls::{Credential, Pki, TlsError, subject_of};
use limits::{ConnectionLimits, Limiter};

/// Which store backend to use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreConfig {
    /// `DIR/store.redb`.
    Redb,
    /// An etcd cluster (`http://host:port` or, with `tls`, `https://host:port` endpoints).
    Etcd {
        endpoints: Vec<String>,
        tls: Option<crate::store::etcd::EtcdTls>,
    },
}

/// Server configuration.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Data directory (PKI, kubeconfig, redb file).
    pub data_dir: PathBuf,
    /// Listen address (port 0 picks one).
    pub listen: SocketAddr,
    /// Store backend.
    pub store: StoreConfig,
    /// Bearer token file (`token,user,uid,"groups"`).
    pub token_file: Option<PathBuf>,
    /// Audit log path (JSON lines).
    pub audit_log: Option<PathBuf>,
    /// Events the redb store keeps for watch resumption.
    pub watch_history: u64,
    /// Admission minimums.
    pub admission: AdmissionConfig,
    /// Connection, handshake, header and watch limits.
    pub limits: ConnectionLimits,
    /// Addresses clients reach the server at besides the listen address (serving
    /// certificate names).
    pub advertise: Vec<std::net::IpAddr>,
}

/// Start-up failures.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The data directory could not be created.
    #[error("creating data directory {0}")]
    DataDir(PathBuf, #[source] std::io::Error),
    /// PKI set-up failed.
    #[error("PKI")]
    Tls(#[from] TlsError),
    /// The store could not be opened.
    #[error("opening the store")]
    Store(#[from] StoreError),
    /// The token file is bad.
    #[error("token file")]
    Auth(#[from] AuthError),
    /// The audit log could not be opened.
    #[error("opening audit log {0}")]
    Audit(PathBuf, #[source] std::io::Error),
    /// The listen address could not be bound.
    #[error("binding {0}")]
    Bind(SocketAddr, #[source] std::io::Error),
}

/// State shared by every request.
#[derive(Debug)]
pub struct State {
    /// Object store.
    pub store: AnyStore,
    /// Token authenticator.
    pub auth: Authenticator,
    /// Audit log, if enabled.
    pub audit: Option<AuditLog>,
    /// Metrics.
    pub metrics: Metrics,
    /// Admission settings.
    pub admission: AdmissionConfig,
    /// `/openapi/v2` as JSON.
    pub openapi_json: Bytes,
    /// `/openapi/v2` as gnostic protobuf.
    pub openapi_pb: Bytes,
    /// Open connections and watches.
    pub limiter: Arc<Limiter>,
    /// Health check transitions, for logging.
    pub health: health::CheckLog,
    /// The CA, for the identities the server issues (joined hosts).
    pub pki: Pki,
    /// How `pods/log` reaches kubelets.
    pub kubelet: logs::KubeletClient,
}

/// Counts one open connection in the gauge for as long as it lives.
struct OpenConnection(prometheus_client::metrics::gauge::Gauge);

impl OpenConnection {
    fn new(gauge: &prometheus_client::metrics::gauge::Gauge) -> Self {
        gauge.inc();
        Self(gauge.clone())
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// A bound, ready-to-serve API server.
pub struct Server {
    state: Arc<State>,
    listener: TcpListener,
    tls: TlsAcceptor,
    addr: SocketAddr,
    controllers_kubeconfig: PathBuf,
}

/// Creates the `default` and `kube-system` namespaces on first start, as Kubernetes does
/// (controllers elect their leader with a Lease in `kube-system`), `slipway-system`,
/// where hosts keep their Leases and bootstrap tokens live, and `slipway-lb`, where edge hosts
/// hold their VIPs' Leases.
async fn bootstrap(store: &AnyStore) -> Result<(), StoreError> {
    let Some(rt) = crate::api::registry::lookup("", "v1", "namespaces") else {
        return Ok(());
    };
    for name in [
        "default",
        "kube-system",
        slipway_api::slipway::HOST_LEASE_NAMESPACE,
        slipway_api::slipway::VIP_LEASE_NAMESPACE,
    ] {
        let key = keys::object(rt, None, name);
        if store.get(&key).await?.is_some() {
            continue;
        }
        let mut ns = serde_json::json!({
            "apiVersion": "v1",
            "kind": "Namespace",
            "metadata": {"name": name},
            "spec": {},
            "status": {"phase": "Active"},
        });
        objects::stamp_new(&mut ns);
        let bytes = serde_json::to_vec(&ns).map_err(|e| StoreError::Task(e.to_string()))?;
        match store.create(&key, bytes).await {
            Ok(_) | Err(StoreError::AlreadyExists(_)) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl Server {
    /// Creates the PKI on first start, opens the store, binds the listener and writes
    /// `DIR/admin.kubeconfig` for the bound address.
    pub async fn bind(cfg: ServerConfig) -> Result<Self, ServerError> {
        // The data directory holds the store, keys and audit log: the supervisor's alone.
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&cfg.data_dir)
            .map_err(|e| ServerError::DataDir(cfg.data_dir.clone(), e))?;
        let pki = Pki::new(&cfg.data_dir);
        let mut sans: Vec<String> = cfg.advertise.iter().map(ToString::to_string).collect();
        if !cfg.listen.ip().is_unspecified() {
            sans.push(cfg.listen.ip().to_string());
        }
        pki.ensure(&sans)?;
        let store = match &cfg.store {
            StoreConfig::Redb => AnyStore::Redb(RedbStore::open_with_history(
                &cfg.data_dir.join("store.redb"),
                cfg.watch_history,
            )?),
            StoreConfig::Etcd { endpoints, tls } => AnyStore::Etcd(Box::new(
                EtcdStore::connect_with(endpoints, tls.as_ref()).await?,
            )),
        };
        let auth = match &cfg.token_file {
            Some(p) => Authenticator::from_token_file(p)?,
            None => Authenticator::default(),
        };
        let audit = match &cfg.audit_log {
            Some(p) => Some(AuditLog::open(p).map_err(|e| ServerError::Audit(p.clone(), e))?),
            None => None,
        };
        bootstrap(&store).await?;
        let listener = TcpListener::bind(cfg.listen)
            .await
            .map_err(|e| ServerError::Bind(cfg.listen, e))?;
        let addr = listener
            .local_addr()
            .map_err(|e| ServerError::Bind(cfg.listen, e))?;
        let (cert_pem, key_pem) = pki.admin_client(MASTERS)?;
        pki.write_kubeconfig(
            &cfg.data_dir.join("admin.kubeconfig"),
            addr,
            "admin",
            &Credential::ClientCert { cert_pem, key_pem },
        )?;
        // The controllers' identity, issued anew at every start (kept 0600 in the data dir).
        let controllers_kubeconfig = cfg.data_dir.join("controllers.kubeconfig");
        let (cert_pem, key_pem) = pki.issue_client(
            "system:slipway:supervisor-controllers",
            Some(crate::auth::CONTROLLERS),
            crate::tls::ADMIN_DAYS,
        )?;
        pki.write_kubeconfig(
            &controllers_kubeconfig,
            addr,
            "supervisor-controllers",
            &Credential::ClientCert { cert_pem, key_pem },
        )?;
        let doc = crate::openapi::document();
        let openapi_pb = Bytes::from(crate::openapi::document_protobuf(&doc));
        let openapi_json = Bytes::from(serde_json::to_vec(&doc).unwrap_or_default());
        let state = State {
            store,
            auth,
            audit,
            metrics: Metrics::default(),
            admission: cfg.admission,
            openapi_json,
            openapi_pb,
            limiter: Limiter::new(cfg.limits.clone()),
            health: health::CheckLog::default(),
            pki: pki.clone(),
            kubelet: logs::KubeletClient::new(&pki, slipway_api::logs::DEFAULT_KUBELET_PORT)?,
        };
        let tls = TlsAcceptor::from(pki.server_config()?);
        info!(%addr, store = ?cfg.store, "supervisor API listening");
        Ok(Self {
            state: Arc::new(state),
            listener,
            tls,
            addr,
            controllers_kubeconfig,
        })
    }

    /// Sets the kubelet port of Nodes that name none in `status.daemonEndpoints` (default
    /// 10250). Takes effect only before [`Self::serve`], while the state is not shared yet.
    pub fn with_kubelet_port(mut self, port: u16) -> Self {
        if let Some(state) = Arc::get_mut(&mut self.state) {
            state.kubelet.port = port;
        }
        self
    }

    /// The bound address.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The kubeconfig the supervisor's own controllers use (group `system:slipway:controllers`).
    pub fn controllers_kubeconfig(&self) -> &Path {
        &self.controllers_kubeconfig
    }

    /// Serves until `shutdown` resolves; open connections are then dropped.
    pub async fn serve(self, shutdown: impl Future<Output = ()>) {
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        tokio::pin!(shutdown);
        loop {
            let (tcp, peer) = tokio::select! {
                accepted = self.listener.accept() => match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        warn!(error = %e, "accept failed");
                        continue;
                    }
                },
                () = &mut shutdown => break,
            };
            let permit = match self.state.limiter.connection(peer.ip()) {
                Ok(p) => p,
                Err(refused) => {
                    // A flood must not flood the log: counted, logged at debug only.
                    self.state.metrics.connections_refused.inc();
                    debug!(%peer, %refused, "connection refused");
                    continue;
                }
            };
            let limits = self.state.limiter.limits().clone();
            let tls = self.tls.clone();
            let state = self.state.clone();
            let mut stop = stop_rx.clone();
            tokio::spawn(async move {
                let _permit = permit;
                let _open = OpenConnection::new(&state.metrics.connections);
                let stream = match tokio::time::timeout(limits.handshake_timeout, tls.accept(tcp))
                    .await
                {
                    Ok(Ok(s)) => s,
                    Ok(Err(e)) => {
                        debug!(%peer, error = %e, "TLS handshake failed");
                        return;
                    }
                    Err(_) => {
                        debug!(%peer, timeout = ?limits.handshake_timeout, "TLS handshake timed out");
                        return;
                    }
                };
                let h2 = stream.get_ref().1.alpn_protocol() == Some(b"h2".as_slice());
                let cert_user = stream
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|c| c.first())
                    .and_then(|c| subject_of(c))
                    .map(|(name, groups)| UserInfo { name, groups });
                let requested = Arc::new(AtomicBool::new(false));
                let seen = requested.clone();
                let svc = hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
                    let state = state.clone();
                    let cert_user = cert_user.clone();
                    seen.store(true, Ordering::Relaxed);
                    async move {
                        let (parts, body) = req.into_parts();
                        let (body, remainder) = early::split(body);
                        let req = hyper::Request::from_parts(parts, body);
                        let response = handler::handle(state, cert_user, req).await;
                        Ok::<_, Infallible>(early::hold(response, remainder))
                    }
                });
                // The protocol is the one TLS negotiated (ALPN), so no bytes are awaited
                // without a timeout; HTTP/1's header timeout also ends idle connections.
                let mut builder =
                    hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                builder
                    .http1()
                    .timer(TokioTimer::new())
                    .header_read_timeout(limits.header_read_timeout);
                let builder = if h2 {
                    builder.http2_only()
                } else {
                    builder.http1_only()
                };
                let conn = builder.serve_connection(TokioIo::new(stream), svc);
                tokio::pin!(conn);
                // HTTP/2 has no header timeout: a connection that sends no request within
                // the header-read timeout is closed.
                let first_request = tokio::time::sleep(limits.header_read_timeout);
                tokio::pin!(first_request);
                let mut waiting = true;
                loop {
                    tokio::select! {
                        r = conn.as_mut() => {
                            if let Err(e) = r {
                                debug!(%peer, error = %e, "connection ended");
                            }
                            break;
                        }
                        () = &mut first_request, if waiting => {
                            waiting = false;
                            if !requested.load(Ordering::Relaxed) {
                                // Nothing in flight to finish (and an h2 client that never
                                // sent its preface would hold off a graceful shutdown).
                                debug!(%peer, "no request within the header-read timeout");
                                break;
                            }
                        }
                        _ = stop.changed() => break,
                    }
                }
            });
        }
        let _ = stop_tx.send(true);
    }
}
