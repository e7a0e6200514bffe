//! The kubelet's read-only HTTPS endpoint on the host agent (`--kubelet-listen`): container
//! logs for the API server, `GET /containerLogs/{namespace}/{pod}/{container}` with kubelet's
//! query parameters (`follow`, `tailLines`, `limitBytes`, `timestamps`, `previous`,
//! `sinceSeconds`, `sinceTime`), read from the CRI log files the pod runner's containers write
//! (`<log root>/<namespace>_<pod>_<uid>/<container>/<attempt>.log`, parsed by
//! [`crate::pods::logs`]).
//!
//! Authentication is mutual TLS: only client certificates signed by the cluster's CA (the CA
//! of `--cluster-kubeconfig`) complete the handshake, and only the API server's kubelet-client
//! identity ([`KUBELET_CLIENT_USER`]) is served; anyone else gets 403. A followed log ends when
//! the container instance exits (asked of the runtime over CRI) or a newer one starts. The serving certificate
//! is self-signed at every start, as kubelet's default is: the API server does not verify it
//! (as kube-apiserver without `--kubelet-certificate-authority`).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt as _, StreamBody, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use hyper::{Request, Response, StatusCode, header};
use hyper_util::rt::TokioIo;
use k8s_openapi::jiff::Timestamp;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use slipway_api::logs::{KUBELET_CLIENT_USER, LogOptions};
use tokio::io::{AsyncBufReadExt as _, BufReader};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tracing::{Instrument as _, debug, info, info_span, warn};

use crate::pods::cri::Cri;
use crate::pods::logs::{Joiner, Limit, Line, Tail, parse_record, pick_attempt};
use crate::pods::spec::{LABEL_CONTAINER_NAME, LABEL_POD_UID};

/// How often a followed log that has no new line is looked at again.
const FOLLOW_POLL: Duration = Duration::from_millis(100);
/// Longest a client may take over its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Why the kubelet endpoint could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum KubeletApiError {
    #[error("--cluster-kubeconfig: reading {path}")]
    Kubeconfig {
        path: PathBuf,
        #[source]
        source: kube::config::KubeconfigError,
    },
    #[error("--cluster-kubeconfig: {0} names no certificate authority to check clients against")]
    NoCa(PathBuf),
    #[error("generating the self-signed serving certificate")]
    Generate(#[source] rcgen::Error),
    #[error("TLS configuration")]
    Rustls(#[source] rustls::Error),
    #[error("client certificate verifier")]
    Verifier(#[source] rustls::server::VerifierBuilderError),
    #[error("connecting to the container runtime")]
    Runtime(#[source] crate::pods::PodsError),
    #[error("--kubelet-listen: binding {addr}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// The CA certificates (DER) of the cluster `kubeconfig` points at, from its
/// `certificate-authority-data` or `certificate-authority`.
pub async fn cluster_ca(kubeconfig: &Path) -> Result<Vec<Vec<u8>>, KubeletApiError> {
    let err = |source| KubeletApiError::Kubeconfig {
        path: kubeconfig.to_owned(),
        source,
    };
    let config = kube::config::Kubeconfig::read_from(kubeconfig).map_err(err)?;
    let config =
        kube::Config::from_custom_kubeconfig(config, &kube::config::KubeConfigOptions::default())
            .await
            .map_err(err)?;
    config
        .root_cert
        .filter(|c| !c.is_empty())
        .ok_or_else(|| KubeletApiError::NoCa(kubeconfig.to_owned()))
}

/// The server side of the endpoint's TLS: a certificate self-signed for `names`, client
/// certificates required and checked against `client_cas`.
pub fn tls_config(
    client_cas: &[Vec<u8>],
    names: Vec<String>,
) -> Result<Arc<rustls::ServerConfig>, KubeletApiError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for der in client_cas {
        roots
            .add(CertificateDer::from(der.clone()))
            .map_err(KubeletApiError::Rustls)?;
    }
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    )
    .build()
    .map_err(KubeletApiError::Verifier)?;
    let serving = rcgen::generate_simple_self_signed(names).map_err(KubeletApiError::Generate)?;
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(
        serving.signing_key.serialize_der(),
    ));
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(KubeletApiError::Rustls)?
        .with_client_cert_verifier(verifier)
        .with_single_cert(vec![serving.cert.der().clone()], key)
        .map_err(KubeletApiError::Rustls)?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// The endpoint as `slipway agent` starts it: the CA of `kubeconfig`, a certificate
/// self-signed for the node's name and address, bound at `addr`, the containers' state asked
/// of the runtime at `containerd_socket`.
pub async fn start(
    addr: SocketAddr,
    kubeconfig: &Path,
    log_root: PathBuf,
    names: Vec<String>,
    containerd_socket: &Path,
) -> Result<KubeletApi, KubeletApiError> {
    let cas = cluster_ca(kubeconfig).await?;
    let cri = Cri::connect(containerd_socket)
        .await
        .map_err(KubeletApiError::Runtime)?;
    Ok(KubeletApi::bind(addr, tls_config(&cas, names)?, log_root)
        .await?
        .with_runtime(cri))
}

/// The bound endpoint.
pub struct KubeletApi {
    listener: TcpListener,
    tls: TlsAcceptor,
    log_root: Arc<PathBuf>,
    runtime: Option<Cri>,
}

impl std::fmt::Debug for KubeletApi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeletApi")
            .field("addr", &self.listener.local_addr().ok())
            .field("log_root", &self.log_root)
            .finish_non_exhaustive()
    }
}

impl KubeletApi {
    /// Binds `addr` with `tls` (see [`tls_config`]), serving the logs under `log_root`.
    pub async fn bind(
        addr: SocketAddr,
        tls: Arc<rustls::ServerConfig>,
        log_root: PathBuf,
    ) -> Result<Self, KubeletApiError> {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| KubeletApiError::Bind { addr, source })?;
        Ok(Self {
            listener,
            tls: TlsAcceptor::from(tls),
            log_root: Arc::new(log_root),
            runtime: None,
        })
    }

    /// Asks `cri` whether a followed container still runs: a follow of one that exited ends,
    /// as kubelet's does. Without it a follow ends only when a newer instance starts.
    pub fn with_runtime(mut self, cri: Cri) -> Self {
        self.runtime = Some(cri);
        self
    }

    /// The bound address.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves until the task is dropped.
    pub async fn serve(self) -> anyhow::Result<()> {
        info!(addr = ?self.listener.local_addr().ok(), "kubelet endpoint listening");
        loop {
            let (tcp, peer) = match self.listener.accept().await {
                Ok(a) => a,
                Err(e) => {
                    warn!(error = %e, "kubelet endpoint: accept failed");
                    continue;
                }
            };
            let tls = self.tls.clone();
            let root = self.log_root.clone();
            let runtime = self.runtime.clone();
            tokio::spawn(
                async move {
                    let stream =
                        match tokio::time::timeout(HANDSHAKE_TIMEOUT, tls.accept(tcp)).await {
                            Ok(Ok(s)) => s,
                            Ok(Err(e)) => {
                                debug!(error = %e, "TLS handshake refused");
                                return;
                            }
                            Err(_) => {
                                debug!("TLS handshake timed out");
                                return;
                            }
                        };
                    let user = stream
                        .get_ref()
                        .1
                        .peer_certificates()
                        .and_then(|c| c.first())
                        .and_then(|c| common_name(c));
                    let svc = hyper::service::service_fn(move |req| {
                        let root = root.clone();
                        let user = user.clone();
                        let runtime = runtime.clone();
                        async move {
                            Ok::<_, Infallible>(handle(&root, runtime, user.as_deref(), req).await)
                        }
                    });
                    if let Err(e) = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await
                    {
                        debug!(error = %e, "connection ended");
                    }
                }
                .instrument(info_span!("kubelet_api", %peer)),
            );
        }
    }
}

/// The subject CN of a DER certificate.
fn common_name(der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let cn = cert.subject().iter_common_name().next()?;
    cn.as_str().ok().map(str::to_owned)
}

type Body = BoxBody<Bytes, Infallible>;

fn text(code: StatusCode, message: String) -> Response<Body> {
    let mut r = Response::new(
        http_body_util::Full::new(Bytes::from(message))
            .map_err(|e| match e {})
            .boxed(),
    );
    *r.status_mut() = code;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

async fn handle(
    root: &Path,
    runtime: Option<Cri>,
    user: Option<&str>,
    req: Request<Incoming>,
) -> Response<Body> {
    // The handshake only lets through certificates of the cluster's CA; of those, only the API
    // server's identity may read logs.
    if user != Some(KUBELET_CLIENT_USER) {
        return text(
            StatusCode::FORBIDDEN,
            format!(
                "Forbidden (user={}, verb=get, resource=nodes, subresource=log)",
                user.unwrap_or("system:anonymous")
            ),
        );
    }
    let path = req.uri().path().to_owned();
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    let ["containerLogs", ns, pod, container] = segs.as_slice() else {
        return text(StatusCode::NOT_FOUND, format!("{path}: not found\n"));
    };
    if req.method() != hyper::Method::GET {
        return text(StatusCode::METHOD_NOT_ALLOWED, "only GET\n".into());
    }
    let opts = match LogOptions::from_query(req.uri().query().unwrap_or_default()) {
        Ok(o) => o,
        Err(errs) => {
            let lines: Vec<String> = errs.iter().map(ToString::to_string).collect();
            return text(StatusCode::BAD_REQUEST, lines.join("; ") + "\n");
        }
    };
    let (file, dir) = match find_log(root, ns, pod, container, opts.previous) {
        Ok(found) => found,
        Err((code, message)) => return text(code, message + "\n"),
    };
    let instance = runtime.and_then(|cri| Instance::of(cri, &file, container));
    debug!(file = %file.display(), follow = opts.follow, "serving a container log");
    let (tx, mut rx) = mpsc::channel::<Bytes>(64);
    tokio::spawn(
        async move {
            if let Err(e) = stream_log(&file, &dir, instance, &opts, &tx).await {
                debug!(file = %file.display(), error = %e, "log stream ended");
            }
        }
        .in_current_span(),
    );
    let body = StreamBody::new(futures_util::stream::poll_fn(move |cx| {
        rx.poll_recv(cx).map(|o| o.map(|b| Ok(Frame::data(b))))
    }));
    let mut r = Response::new(body.boxed());
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain"),
    );
    r
}

/// Whether `s` may be a namespace, pod or container name (DNS labels and subdomains): nothing
/// that could leave the log root or blur the `<ns>_<pod>_<uid>` directory names.
fn plain_name(s: &str) -> bool {
    !s.is_empty()
        && !s.starts_with('.')
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
}

/// The log file of `container` of `ns/pod` under `root` (the newest instance's, or the one
/// before for `previous`) and its container's directory; else the status and message to answer.
fn find_log(
    root: &Path,
    ns: &str,
    pod: &str,
    container: &str,
    previous: bool,
) -> Result<(PathBuf, PathBuf), (StatusCode, String)> {
    for (what, name) in [("namespace", ns), ("pod", pod), ("container", container)] {
        if !plain_name(name) {
            return Err((
                StatusCode::BAD_REQUEST,
                format!("{what}: {name:?} is not a valid name"),
            ));
        }
    }
    let prefix = format!("{ns}_{pod}_");
    // A Pod deleted and created again under the same name has a new UID: the newest directory
    // is the one that runs.
    let dir = std::fs::read_dir(root)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(&prefix))
        .max_by_key(|e| e.metadata().and_then(|m| m.modified()).ok())
        .map(|e| e.path())
        .ok_or_else(|| {
            (
                StatusCode::NOT_FOUND,
                format!("pod \"{ns}/{pod}\" does not exist on this node"),
            )
        })?;
    let dir = dir.join(container);
    let attempts: Vec<u32> = std::fs::read_dir(&dir)
        .map_err(|_| {
            (
                StatusCode::NOT_FOUND,
                format!("container \"{container}\" not found in pod \"{ns}/{pod}\""),
            )
        })?
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.strip_suffix(".log")?.parse().ok())
        .collect();
    let Some(attempt) = pick_attempt(&attempts, previous) else {
        return Err(if previous {
            (
                StatusCode::BAD_REQUEST,
                format!("previous terminated container \"{container}\" in pod \"{pod}\" not found"),
            )
        } else {
            (
                StatusCode::NOT_FOUND,
                format!("container \"{container}\" in pod \"{pod}\" has not written a log yet"),
            )
        });
    };
    Ok((dir.join(format!("{attempt}.log")), dir))
}

/// Whether an instance newer than the file's has started (the followed one has ended).
fn superseded(file: &Path, dir: &Path) -> bool {
    let attempt = |p: &Path| -> Option<u32> { p.file_stem()?.to_str()?.parse().ok() };
    let Some(mine) = attempt(file) else {
        return true;
    };
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| attempt(&e.path()))
        .any(|a| a > mine)
}

/// The container instance a log file belongs to, as the runtime knows it.
struct Instance {
    cri: Cri,
    uid: String,
    container: String,
    attempt: u32,
}

impl Instance {
    /// From `<root>/<ns>_<pod>_<uid>/<container>/<attempt>.log`.
    fn of(cri: Cri, file: &Path, container: &str) -> Option<Self> {
        let attempt = file.file_stem()?.to_str()?.parse().ok()?;
        let pod_dir = file.parent()?.parent()?.file_name()?.to_str()?;
        let uid = pod_dir.splitn(3, '_').nth(2)?.to_owned();
        Some(Self {
            cri,
            uid,
            container: container.to_owned(),
            attempt,
        })
    }

    /// Whether the instance has exited (or is gone). A runtime that does not answer is taken
    /// for a running container: the follow goes on.
    async fn exited(&mut self) -> bool {
        let labels = [
            (LABEL_POD_UID.to_owned(), self.uid.clone()),
            (LABEL_CONTAINER_NAME.to_owned(), self.container.clone()),
        ];
        match self.cri.containers_labelled(labels.into()).await {
            Ok(containers) => !containers.iter().any(|c| {
                c.metadata
                    .as_ref()
                    .is_some_and(|m| m.attempt == self.attempt)
                    && c.state != k8s_cri::v1::ContainerState::ContainerExited as i32
            }),
            Err(e) => {
                debug!(error = %crate::pods::error_chain(&e), "asking the runtime about a followed container");
                false
            }
        }
    }
}

/// Sends `line` within the byte limit; false once nothing more may go (limit reached or the
/// client gone).
async fn send(tx: &mpsc::Sender<Bytes>, limit: &mut Limit, line: &Line, timestamps: bool) -> bool {
    let rendered = line.render(timestamps);
    let part = limit.take(&rendered);
    if !part.is_empty() && tx.send(Bytes::copy_from_slice(part)).await.is_err() {
        return false;
    }
    !limit.reached()
}

/// Streams the log at `file` to `tx` as `opts` asks: the (last N of the) lines since the asked
/// time, then, when following, each new line as it is written until the client goes, the byte
/// limit is reached, a newer instance of the container starts or the log is removed.
async fn stream_log(
    file: &Path,
    dir: &Path,
    mut instance: Option<Instance>,
    opts: &LogOptions,
    tx: &mpsc::Sender<Bytes>,
) -> std::io::Result<()> {
    let since = opts.since(Timestamp::now());
    let keep = |l: &Line| since.is_none_or(|s| l.at_or_after(s));
    let mut reader = BufReader::new(tokio::fs::File::open(file).await?);
    let mut joiner = Joiner::default();
    let mut tail = Tail::new(opts.tail_lines);
    let mut limit = Limit::new(opts.limit_bytes);
    let mut buf = Vec::new();
    // What is in the file now.
    loop {
        let n = reader.read_until(b'\n', &mut buf).await?;
        if n == 0 || !buf.ends_with(b"\n") {
            break;
        }
        if let Ok(record) = parse_record(&buf)
            && let Some(line) = joiner.push(&record)
            && keep(&line)
        {
            tail.push(line);
        }
        buf.clear();
    }
    for line in tail.into_lines() {
        if !send(tx, &mut limit, &line, opts.timestamps).await {
            return Ok(());
        }
    }
    if !opts.follow {
        return Ok(());
    }
    // What is written from now on. `buf` may hold the start of a line still being written.
    loop {
        let n = reader.read_until(b'\n', &mut buf).await?;
        if n > 0 && buf.ends_with(b"\n") {
            if let Ok(record) = parse_record(&buf)
                && let Some(line) = joiner.push(&record)
                && keep(&line)
                && !send(tx, &mut limit, &line, opts.timestamps).await
            {
                return Ok(());
            }
            buf.clear();
            continue;
        }
        if n > 0 {
            continue;
        }
        if tx.is_closed() || !file.exists() {
            return Ok(());
        }
        let ended = superseded(file, dir)
            || match instance.as_mut() {
                Some(i) => i.exited().await,
                None => false,
            };
        if ended {
            // The runtime wrote everything before the instance ended; take that and end.
            let mut rest = Vec::new();
            tokio::io::AsyncReadExt::read_to_end(&mut reader, &mut rest).await?;
            buf.extend_from_slice(&rest);
            for raw in buf.split_inclusive(|b| *b == b'\n') {
                if let Ok(record) = parse_record(raw)
                    && let Some(line) = joiner.push(&record)
                    && keep(&line)
                    && !send(tx, &mut limit, &line, opts.timestamps).await
                {
                    return Ok(());
                }
            }
            return Ok(());
        }
        tokio::time::sleep(FOLLOW_POLL).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_that_could_leave_the_log_root_are_refused() {
        assert!(plain_name("web-1.a"));
        for bad in ["", "..", ".x", "a/b", "a_b", "A"] {
            assert!(!plain_name(bad), "{bad:?}");
        }
    }

    #[test]
    fn logs_are_found_by_pod_container_and_instance() {
        let root = std::env::temp_dir().join(format!("slipway-kubelet-api-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let main = root.join("apps_web_u-1/main");
        std::fs::create_dir_all(&main).expect("dirs");
        for a in [0, 1] {
            std::fs::write(main.join(format!("{a}.log")), b"").expect("log");
        }
        let found = |ns, pod, c, prev| find_log(&root, ns, pod, c, prev);
        assert_eq!(
            found("apps", "web", "main", false).map(|f| f.0),
            Ok(main.join("1.log"))
        );
        assert_eq!(
            found("apps", "web", "main", true).map(|f| f.0),
            Ok(main.join("0.log"))
        );
        assert!(!superseded(&main.join("1.log"), &main));
        assert!(superseded(&main.join("0.log"), &main));
        let (code, message) = found("apps", "we", "main", false).expect_err("no pod");
        assert_eq!(code, StatusCode::NOT_FOUND);
        assert!(message.contains("apps/we"), "{message}");
        let (code, message) = found("apps", "web", "side", false).expect_err("no container");
        assert_eq!(code, StatusCode::NOT_FOUND);
        assert!(message.contains("\"side\""), "{message}");
        let (code, _) = found("apps", "web", "../x", false).expect_err("bad name");
        assert_eq!(code, StatusCode::BAD_REQUEST);
        std::fs::remove_file(main.join("0.log")).expect("rm");
        let (code, message) = found("apps", "web", "main", true).expect_err("no previous");
        assert_eq!(code, StatusCode::BAD_REQUEST);
        assert!(
            message.contains("previous terminated container"),
            "{message}"
        );
        let _ = std::fs::remove_dir_all(&root);
    }
}
