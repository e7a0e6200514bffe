//! The `log` subresource of Pods (`GET pods/{name}/log`, what `kubectl logs` reads), as
//! kube-apiserver serves it: the Pod's container is picked (the only one, or the one the
//! `container` parameter names), its Node's address looked up (`InternalIP`, the kubelet port
//! of `status.daemonEndpoints.kubeletEndpoint.Port` or `--kubelet-port`), and the body of the
//! host agent's kubelet endpoint (`/containerLogs/{ns}/{pod}/{container}`) streamed through,
//! so `follow` prints lines as they come.
//!
//! The server authenticates to the kubelet with a client certificate it issues from its own CA
//! at start ([`KUBELET_CLIENT_USER`], no group). It does not verify the kubelet's serving
//! certificate (self-signed, as kubelet's default), as kube-apiserver without
//! `--kubelet-certificate-authority` does not.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt as _;
use hyper::{Method, Request, Response};
use hyper_util::rt::TokioIo;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use serde_json::Value;
use slipway_api::logs::{KUBELET_CLIENT_USER, LogOptions};
use tracing::{Instrument as _, debug};

use super::handler::Call;
use super::http::{self, Body};
use super::keys;
use super::objects::present;
use crate::api::registry::{ResourceType, lookup};
use crate::error::ApiError;
use crate::store::{AnyStore, Store as _};
use crate::tls::{ADMIN_DAYS, Pki, TlsError};

/// Longest the server waits to connect to a kubelet.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Most of a kubelet's error body carried into the API error.
const MAX_ERROR_BODY: usize = 64 * 1024;

/// Whether `rt` has a log subresource.
pub fn loggable(rt: &ResourceType) -> bool {
    rt.group.is_empty() && rt.plural == "pods"
}

/// How the server reaches kubelets: their default port and its TLS client identity.
#[derive(Debug, Clone)]
pub struct KubeletClient {
    /// The port of a Node that names none in `status.daemonEndpoints`.
    pub port: u16,
    tls: Arc<rustls::ClientConfig>,
}

/// Accepts any kubelet serving certificate (self-signed at the kubelet's start) but still
/// checks the handshake's signatures with it.
#[derive(Debug)]
struct UnverifiedKubelet(Arc<CryptoProvider>);

impl ServerCertVerifier for UnverifiedKubelet {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

impl KubeletClient {
    /// A client whose certificate `pki` issues now for [`KUBELET_CLIENT_USER`].
    pub fn new(pki: &Pki, port: u16) -> Result<Self, TlsError> {
        let (cert_pem, key_pem) = pki.issue_client(KUBELET_CLIENT_USER, None, ADMIN_DAYS)?;
        let pem_err = |source| TlsError::Pem {
            path: "(kubelet client certificate)".into(),
            source,
        };
        let chain = vec![CertificateDer::from_pem_slice(cert_pem.as_bytes()).map_err(pem_err)?];
        let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(pem_err)?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut tls = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(TlsError::Rustls)?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(UnverifiedKubelet(provider)))
            .with_client_auth_cert(chain, key)
            .map_err(TlsError::Rustls)?;
        tls.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Self {
            port,
            tls: Arc::new(tls),
        })
    }

    /// `GET https://ip:port{path}`; the response's body streams as the kubelet writes it.
    async fn get(
        &self,
        ip: IpAddr,
        port: u16,
        path: &str,
    ) -> Result<Response<hyper::body::Incoming>, String> {
        let tcp = tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::TcpStream::connect((ip, port)))
            .await
            .map_err(|_| format!("dial tcp {ip}:{port}: i/o timeout"))?
            .map_err(|e| format!("dial tcp {ip}:{port}: {e}"))?;
        let tls = tokio_rustls::TlsConnector::from(self.tls.clone())
            .connect(ServerName::IpAddress(ip.into()), tcp)
            .await
            .map_err(|e| format!("TLS handshake with {ip}:{port}: {e}"))?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .map_err(|e| e.to_string())?;
        tokio::spawn(
            async move {
                if let Err(e) = conn.await {
                    debug!(error = %e, "kubelet connection ended");
                }
            }
            .in_current_span(),
        );
        let authority = std::net::SocketAddr::new(ip, port).to_string();
        let req = Request::get(path)
            .header(hyper::header::HOST, authority)
            .body(http_body_util::Empty::<Bytes>::new())
            .map_err(|e| e.to_string())?;
        sender.send_request(req).await.map_err(|e| e.to_string())
    }
}

fn names(pod: &Value, list: &str) -> Vec<String> {
    pod.pointer(&format!("/spec/{list}"))
        .and_then(Value::as_array)
        .map(|cs| {
            cs.iter()
                .filter_map(|c| c.get("name").and_then(Value::as_str))
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default()
}

/// The container whose log is asked for: the one named, or the Pod's only container; the
/// errors say what kube-apiserver says.
pub fn pick_container(pod: &Value, name: &str, asked: Option<&str>) -> Result<String, ApiError> {
    let containers = names(pod, "containers");
    let init = names(pod, "initContainers");
    let ephemeral = names(pod, "ephemeralContainers");
    match asked {
        Some(c) => {
            if containers
                .iter()
                .chain(&init)
                .chain(&ephemeral)
                .any(|n| n == c)
            {
                Ok(c.to_owned())
            } else {
                Err(ApiError::BadRequest(format!(
                    "container {c} is not valid for pod {name}"
                )))
            }
        }
        None if containers.len() == 1 => Ok(containers[0].clone()),
        None => {
            let mut message = format!(
                "a container name must be specified for pod {name}, choose one of: [{}]",
                containers.join(" ")
            );
            if !init.is_empty() {
                message.push_str(&format!(
                    " or one of the init containers: [{}]",
                    init.join(" ")
                ));
            }
            Err(ApiError::BadRequest(message))
        }
    }
}

/// Where the kubelet of `node` listens: its `InternalIP` (an `ExternalIP` when it has none)
/// and `status.daemonEndpoints.kubeletEndpoint.Port`, else `default_port`.
pub fn kubelet_address(node: &Value, default_port: u16) -> Result<(IpAddr, u16), ApiError> {
    let name = node
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let addresses = node
        .pointer("/status/addresses")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let of_type = |t: &str| {
        addresses
            .iter()
            .filter(|a| a.get("type").and_then(Value::as_str) == Some(t))
            .find_map(|a| {
                a.get("address")
                    .and_then(Value::as_str)?
                    .parse::<IpAddr>()
                    .ok()
            })
    };
    let ip = of_type("InternalIP")
        .or_else(|| of_type("ExternalIP"))
        .ok_or_else(|| {
            ApiError::BadRequest(format!(
                "node {name} has no InternalIP or ExternalIP address to reach its kubelet at"
            ))
        })?;
    let port = node
        .pointer("/status/daemonEndpoints/kubeletEndpoint/Port")
        .and_then(Value::as_u64)
        .and_then(|p| u16::try_from(p).ok())
        .filter(|p| *p > 0)
        .unwrap_or(default_port);
    Ok((ip, port))
}

async fn object(
    store: &AnyStore,
    rt: &'static ResourceType,
    ns: Option<&str>,
    name: &str,
) -> Result<Option<Value>, ApiError> {
    match store.get(&keys::object(rt, ns, name)).await? {
        Some(kv) => present(rt, &kv).map(Some),
        None => Ok(None),
    }
}

/// Serves GET on `pods/{name}/log`.
pub(super) async fn serve(call: &Call<'_>, method: &Method) -> Result<Response<Body>, ApiError> {
    let (Some(name), &Method::GET) = (call.t.name.as_deref(), method) else {
        return Err(ApiError::MethodNotAllowed);
    };
    let opts = LogOptions::from_pairs(call.query.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .map_err(|causes| ApiError::Invalid {
            kind: "PodLogOptions".into(),
            name: name.into(),
            causes,
        })?;
    let ns = call.ns().unwrap_or_default();
    let pod = object(&call.state.store, call.t.rt, Some(ns), name)
        .await?
        .ok_or_else(|| call.not_found(name))?;
    let container = pick_container(&pod, name, opts.container.as_deref())?;
    let node_name = pod
        .pointer("/spec/nodeName")
        .and_then(Value::as_str)
        .filter(|n| !n.is_empty())
        .ok_or_else(|| {
            ApiError::BadRequest(format!(
                "pod {name} has not been scheduled to a node yet: it has no log"
            ))
        })?;
    let nodes = lookup("", "v1", "nodes")
        .ok_or_else(|| ApiError::Internal("the nodes resource is not registered".into()))?;
    let node = object(&call.state.store, nodes, None, node_name)
        .await?
        .ok_or_else(|| ApiError::NotFound {
            resource: "nodes".into(),
            name: node_name.into(),
        })?;
    let (ip, port) = kubelet_address(&node, call.state.kubelet.port)?;
    let mut path = format!("/containerLogs/{ns}/{name}/{container}");
    let query = opts.kubelet_query();
    if !query.is_empty() {
        path = format!("{path}?{query}");
    }
    debug!(%ip, port, %path, "proxying a container log");
    let response =
        call.state
            .kubelet
            .get(ip, port, &path)
            .await
            .map_err(|e| ApiError::Kubelet {
                code: 500,
                message: format!("Get \"https://{ip}:{port}{path}\": {e}"),
            })?;
    let status = response.status();
    let mut body = response.into_body();
    if !status.is_success() {
        let bytes = http_body_util::Limited::new(body, MAX_ERROR_BODY)
            .collect()
            .await
            .map(|c| c.to_bytes())
            .unwrap_or_default();
        return Err(ApiError::Kubelet {
            code: status.as_u16(),
            message: String::from_utf8_lossy(&bytes).trim_end().to_owned(),
        });
    }
    let (tx, out) = http::channel_body();
    tokio::spawn(
        async move {
            loop {
                tokio::select! {
                    frame = body.frame() => match frame {
                        Some(Ok(frame)) => {
                            if let Ok(data) = frame.into_data()
                                && tx.send(data).await.is_err()
                            {
                                break;
                            }
                        }
                        Some(Err(e)) => {
                            debug!(error = %e, "the kubelet's log stream broke");
                            break;
                        }
                        None => break,
                    },
                    // The client went: close the kubelet's stream (a followed log may be idle).
                    () = tx.closed() => break,
                }
            }
        }
        .in_current_span(),
    );
    Ok(http::stream("text/plain", out))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn the_container_is_the_only_one_or_must_be_named() {
        let one = json!({"spec": {"containers": [{"name": "main"}]}});
        assert_eq!(pick_container(&one, "p", None).expect("only"), "main");
        let two = json!({"spec": {
            "containers": [{"name": "a"}, {"name": "b"}],
            "initContainers": [{"name": "setup"}],
        }});
        assert_eq!(pick_container(&two, "p", Some("b")).expect("named"), "b");
        assert_eq!(
            pick_container(&two, "p", Some("setup")).expect("init"),
            "setup"
        );
        let err = pick_container(&two, "p", None).expect_err("ambiguous");
        assert_eq!(err.code(), 400);
        assert_eq!(
            err.to_string(),
            "a container name must be specified for pod p, choose one of: [a b] or one of the init containers: [setup]"
        );
        let err = pick_container(&two, "p", Some("c")).expect_err("unknown");
        assert_eq!(err.to_string(), "container c is not valid for pod p");
    }

    #[test]
    fn the_kubelet_is_at_the_internal_ip_and_the_node_s_port() {
        let node = |port: Value| {
            json!({"metadata": {"name": "n1"}, "status": {
                "addresses": [
                    {"type": "Hostname", "address": "n1"},
                    {"type": "ExternalIP", "address": "192.0.2.1"},
                    {"type": "InternalIP", "address": "10.0.0.5"},
                ],
                "daemonEndpoints": {"kubeletEndpoint": {"Port": port}},
            }})
        };
        assert_eq!(
            kubelet_address(&node(json!(10255)), 10250).expect("address"),
            ("10.0.0.5".parse().expect("ip"), 10255)
        );
        assert_eq!(
            kubelet_address(&node(json!(0)), 10250)
                .expect("default port")
                .1,
            10250
        );
        let external =
            json!({"status": {"addresses": [{"type": "ExternalIP", "address": "192.0.2.1"}]}});
        assert_eq!(
            kubelet_address(&external, 1).expect("external").0,
            "192.0.2.1".parse::<IpAddr>().expect("ip")
        );
        let err = kubelet_address(&json!({"metadata": {"name": "n2"}}), 1).expect_err("none");
        assert!(err.to_string().contains("node n2"), "{err}");
    }
}
