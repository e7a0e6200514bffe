//! The API client the `slipway` CLI and the agents use: kubeconfig loading, HTTPS with client
//! certificates or bearer tokens, resource-name resolution from the shared registry, and the
//! apply / get / describe / delete / watch operations.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, StatusCode, header};
use hyper_util::rt::TokioIo;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use serde_json::Value;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use crate::api::registry::{RESOURCES, ResourceType, by_kind};
use crate::server::keys;

/// Client failures.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The kubeconfig could not be read or is incomplete.
    #[error("kubeconfig {path}: {message}")]
    Kubeconfig {
        /// File.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// TLS set-up failed.
    #[error("TLS")]
    Tls(#[source] rustls::Error),
    /// Connecting or talking to the server failed.
    #[error("connecting to {0}")]
    Connect(String, #[source] std::io::Error),
    /// HTTP failed.
    #[error("HTTP")]
    Http(#[source] hyper::Error),
    /// The server answered with an error Status.
    #[error("Error from server ({reason}): {message}")]
    Api {
        /// HTTP code.
        code: u16,
        /// Status reason.
        reason: String,
        /// Status message.
        message: String,
    },
    /// A manifest or response did not parse.
    #[error("{0}")]
    Decode(String),
    /// The resource type is not served.
    #[error("the server doesn't have a resource type {0:?}")]
    UnknownResource(String),
}

/// Where and as whom to connect.
#[derive(Debug, Clone)]
pub struct Endpoint {
    /// `host:port`.
    pub addr: String,
    /// Host name for TLS verification.
    pub host: String,
    /// CA certificates (DER).
    pub ca: Vec<CertificateDer<'static>>,
    /// Client certificate chain and key PEM, if any.
    pub client_cert: Option<(String, String)>,
    /// Bearer token, if any.
    pub token: Option<String>,
}

/// Standard base64 decoding (kubeconfig `*-data` fields).
pub fn base64_decode(s: &str) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    let mut buf = 0u32;
    let mut bits = 0;
    for c in s.bytes().filter(|c| !c.is_ascii_whitespace()) {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            b'=' => break,
            _ => return None,
        };
        buf = (buf << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((buf >> bits) as u8);
        }
    }
    Some(out)
}

impl Endpoint {
    /// Loads the current context of a kubeconfig file.
    pub fn from_kubeconfig(path: &Path) -> Result<Self, ClientError> {
        let bad = |message: String| ClientError::Kubeconfig {
            path: path.to_path_buf(),
            message,
        };
        let text = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
        let kc: Value = serde_saphyr::from_str(&text).map_err(|e| bad(e.to_string()))?;
        let current = kc["current-context"]
            .as_str()
            .ok_or_else(|| bad("no current-context".into()))?;
        let find = |list: &str, name: &str| {
            kc[list]
                .as_array()
                .and_then(|l| l.iter().find(|e| e["name"].as_str() == Some(name)))
                .cloned()
        };
        let ctx = find("contexts", current)
            .ok_or_else(|| bad(format!("context {current:?} not found")))?;
        let cluster_name = ctx["context"]["cluster"].as_str().unwrap_or_default();
        let user_name = ctx["context"]["user"].as_str().unwrap_or_default();
        let cluster = find("clusters", cluster_name)
            .ok_or_else(|| bad(format!("cluster {cluster_name:?} not found")))?;
        let user = find("users", user_name)
            .map(|u| u["user"].clone())
            .unwrap_or(Value::Null);
        let server = cluster["cluster"]["server"]
            .as_str()
            .ok_or_else(|| bad("cluster has no server".into()))?;
        let addr = server
            .strip_prefix("https://")
            .ok_or_else(|| bad(format!("server {server:?} is not https")))?;
        let addr = addr.trim_end_matches('/').to_string();
        let host = addr
            .rsplit_once(':')
            .map_or(addr.as_str(), |(h, _)| h)
            .trim_matches(['[', ']'])
            .to_string();
        let data = |v: &Value, what: &str| -> Result<Option<Vec<u8>>, ClientError> {
            match v.as_str() {
                Some(s) => base64_decode(s)
                    .map(Some)
                    .ok_or_else(|| bad(format!("{what} is not base64"))),
                None => Ok(None),
            }
        };
        let ca_pem = data(
            &cluster["cluster"]["certificate-authority-data"],
            "certificate-authority-data",
        )?
        .ok_or_else(|| bad("certificate-authority-data missing".into()))?;
        let ca = CertificateDer::pem_slice_iter(&ca_pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| bad(format!("certificate-authority-data: {e}")))?;
        let cert = data(&user["client-certificate-data"], "client-certificate-data")?;
        let key = data(&user["client-key-data"], "client-key-data")?;
        let client_cert = match (cert, key) {
            (Some(c), Some(k)) => Some((
                String::from_utf8_lossy(&c).into_owned(),
                String::from_utf8_lossy(&k).into_owned(),
            )),
            _ => None,
        };
        let token = user["token"].as_str().map(String::from);
        Ok(Self {
            addr,
            host,
            ca,
            client_cert,
            token,
        })
    }
}

/// An API client.
#[derive(Clone)]
pub struct Client {
    endpoint: Endpoint,
    tls: TlsConnector,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("addr", &self.endpoint.addr)
            .finish_non_exhaustive()
    }
}

/// A response: status, content and (for watches) the still-open body.
#[derive(Debug)]
pub struct Reply {
    /// HTTP status.
    pub status: StatusCode,
    /// Body.
    pub body: Bytes,
}

fn api_error(status: StatusCode, body: &[u8]) -> ClientError {
    let v: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    ClientError::Api {
        code: status.as_u16(),
        reason: v["reason"]
            .as_str()
            .unwrap_or(status.canonical_reason().unwrap_or("Unknown"))
            .to_string(),
        message: v["message"]
            .as_str()
            .map(String::from)
            .unwrap_or_else(|| String::from_utf8_lossy(body).into_owned()),
    }
}

impl Client {
    /// A client for an endpoint.
    pub fn new(endpoint: Endpoint) -> Result<Self, ClientError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = rustls::RootCertStore::empty();
        for c in &endpoint.ca {
            roots.add(c.clone()).map_err(ClientError::Tls)?;
        }
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(ClientError::Tls)?
            .with_root_certificates(roots);
        let config = match &endpoint.client_cert {
            Some((cert, key)) => {
                let chain = CertificateDer::pem_slice_iter(cert.as_bytes())
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| ClientError::Decode(format!("client certificate: {e}")))?;
                let key = PrivateKeyDer::from_pem_slice(key.as_bytes())
                    .map_err(|e| ClientError::Decode(format!("client key: {e}")))?;
                builder
                    .with_client_auth_cert(chain, key)
                    .map_err(ClientError::Tls)?
            }
            None => builder.with_no_client_auth(),
        };
        Ok(Self {
            endpoint,
            tls: TlsConnector::from(Arc::new(config)),
        })
    }

    /// A client from a kubeconfig file.
    pub fn from_kubeconfig(path: &Path) -> Result<Self, ClientError> {
        Self::new(Endpoint::from_kubeconfig(path)?)
    }

    /// Opens one keep-alive connection for a sequence of requests.
    pub async fn connect(&self) -> Result<Conn, ClientError> {
        let tcp = TcpStream::connect(&self.endpoint.addr)
            .await
            .map_err(|e| ClientError::Connect(self.endpoint.addr.clone(), e))?;
        let _ = tcp.set_nodelay(true);
        let name = ServerName::try_from(self.endpoint.host.clone())
            .map_err(|e| ClientError::Decode(e.to_string()))?;
        let tls = self
            .tls
            .connect(name, tcp)
            .await
            .map_err(|e| ClientError::Connect(self.endpoint.addr.clone(), e))?;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .map_err(ClientError::Http)?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(Conn {
            sender,
            endpoint: self.endpoint.clone(),
        })
    }

    /// Sends one request on a fresh connection; returns the response with its body unread.
    pub async fn send(
        &self,
        method: Method,
        path: &str,
        content_type: Option<&str>,
        accept: &str,
        body: Vec<u8>,
    ) -> Result<hyper::Response<hyper::body::Incoming>, ClientError> {
        self.connect()
            .await?
            .send(method, path, content_type, accept, body)
            .await
    }

    /// Sends a request and reads the whole reply; error statuses become `ClientError::Api`.
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        content_type: Option<&str>,
        accept: &str,
        body: Vec<u8>,
    ) -> Result<Reply, ClientError> {
        read_reply(self.send(method, path, content_type, accept, body).await?).await
    }

    /// GETs JSON.
    pub async fn get_json(&self, path: &str) -> Result<Value, ClientError> {
        let r = self
            .call(Method::GET, path, None, "application/json", Vec::new())
            .await?;
        serde_json::from_slice(&r.body).map_err(|e| ClientError::Decode(e.to_string()))
    }

    /// Applies one manifest: creates it, or merges it into the live object. Returns
    /// `created`, `configured` or `unchanged`.
    pub async fn apply(
        &self,
        obj: &Value,
        default_ns: &str,
    ) -> Result<(&'static ResourceType, String, &'static str), ClientError> {
        let (group, _version) = split_api_version(obj["apiVersion"].as_str().unwrap_or_default());
        let kind = obj["kind"].as_str().unwrap_or_default();
        let rt = by_kind(group, kind)
            .ok_or_else(|| ClientError::UnknownResource(format!("{kind} in {group:?}")))?;
        let name = obj["metadata"]["name"]
            .as_str()
            .ok_or_else(|| ClientError::Decode(format!("{kind} without metadata.name")))?
            .to_string();
        let ns = obj["metadata"]["namespace"]
            .as_str()
            .unwrap_or(default_ns)
            .to_string();
        let ns = rt.namespaced.then_some(ns.as_str());
        let body = serde_json::to_vec(obj).map_err(|e| ClientError::Decode(e.to_string()))?;
        match self.get_json(&object_path(rt, ns, &name)).await {
            Err(ClientError::Api { code: 404, .. }) => {
                self.call(
                    Method::POST,
                    &collection_path(rt, ns),
                    Some("application/json"),
                    "application/json",
                    body,
                )
                .await?;
                Ok((rt, name, "created"))
            }
            Err(e) => Err(e),
            Ok(live) => {
                let r = self
                    .call(
                        Method::PATCH,
                        &object_path(rt, ns, &name),
                        Some("application/merge-patch+json"),
                        "application/json",
                        body,
                    )
                    .await?;
                let new: Value = serde_json::from_slice(&r.body)
                    .map_err(|e| ClientError::Decode(e.to_string()))?;
                let changed =
                    new["metadata"]["resourceVersion"] != live["metadata"]["resourceVersion"];
                Ok((rt, name, if changed { "configured" } else { "unchanged" }))
            }
        }
    }
}

/// One keep-alive HTTP/1.1 connection to the server.
pub struct Conn {
    sender: hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    endpoint: Endpoint,
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Conn")
            .field("addr", &self.endpoint.addr)
            .finish_non_exhaustive()
    }
}

impl Conn {
    /// Sends one request; returns the response with its body unread.
    pub async fn send(
        &mut self,
        method: Method,
        path: &str,
        content_type: Option<&str>,
        accept: &str,
        body: Vec<u8>,
    ) -> Result<hyper::Response<hyper::body::Incoming>, ClientError> {
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header(header::HOST, &self.endpoint.addr)
            .header(header::ACCEPT, accept);
        if let Some(ct) = content_type {
            req = req.header(header::CONTENT_TYPE, ct);
        }
        if let Some(t) = &self.endpoint.token {
            req = req.header(header::AUTHORIZATION, format!("Bearer {t}"));
        }
        let req = req
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| ClientError::Decode(e.to_string()))?;
        self.sender.ready().await.map_err(ClientError::Http)?;
        self.sender
            .send_request(req)
            .await
            .map_err(ClientError::Http)
    }

    /// Sends a request and reads the whole reply; error statuses become `ClientError::Api`.
    pub async fn call(
        &mut self,
        method: Method,
        path: &str,
        content_type: Option<&str>,
        body: Vec<u8>,
    ) -> Result<Reply, ClientError> {
        read_reply(
            self.send(method, path, content_type, "application/json", body)
                .await?,
        )
        .await
    }
}

/// Reads a whole reply; error statuses become `ClientError::Api`.
async fn read_reply(resp: hyper::Response<hyper::body::Incoming>) -> Result<Reply, ClientError> {
    let status = resp.status();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(ClientError::Http)?
        .to_bytes();
    if !status.is_success() {
        return Err(api_error(status, &body));
    }
    Ok(Reply { status, body })
}

fn split_api_version(av: &str) -> (&str, &str) {
    av.split_once('/').unwrap_or(("", av))
}

fn prefix_path(rt: &ResourceType) -> String {
    if rt.group.is_empty() {
        format!("/api/{}", rt.version)
    } else {
        format!("/apis/{}/{}", rt.group, rt.version)
    }
}

/// Path of a collection (all namespaces when `ns` is None).
pub fn collection_path(rt: &ResourceType, ns: Option<&str>) -> String {
    match ns {
        Some(ns) if rt.namespaced => format!("{}/namespaces/{ns}/{}", prefix_path(rt), rt.plural),
        _ => format!("{}/{}", prefix_path(rt), rt.plural),
    }
}

/// Path of one object.
pub fn object_path(rt: &ResourceType, ns: Option<&str>, name: &str) -> String {
    format!("{}/{name}", collection_path(rt, ns))
}

/// Resolves `svc`, `services`, `Service`, `clusters.slipway.dev` to a served type.
pub fn resolve(name: &str) -> Result<&'static ResourceType, ClientError> {
    let lower = name.to_ascii_lowercase();
    let (base, group) = match lower.split_once('.') {
        Some((b, g)) => (b.to_string(), Some(g.to_string())),
        None => (lower.clone(), None),
    };
    RESOURCES
        .iter()
        .find(|r| {
            group.as_deref().is_none_or(|g| g == r.group)
                && (r.plural == base
                    || r.singular == base
                    || r.kind.eq_ignore_ascii_case(&base)
                    || r.short_names.contains(&base.as_str()))
        })
        .ok_or_else(|| ClientError::UnknownResource(name.to_string()))
}

/// Key of an object in the store (for tools that inspect the store directly).
pub fn store_key(rt: &ResourceType, ns: Option<&str>, name: &str) -> String {
    keys::object(rt, ns, name)
}

/// Renders a server Table as kubectl does (upper-case headers, priority-0 columns unless wide).
pub fn render_table(table: &Value, wide: bool, with_namespace: bool, headers: bool) -> String {
    let cols: Vec<(usize, String)> = table["columnDefinitions"]
        .as_array()
        .into_iter()
        .flatten()
        .enumerate()
        .filter(|(_, c)| wide || c["priority"].as_u64().unwrap_or(0) == 0)
        .map(|(i, c)| (i, c["name"].as_str().unwrap_or_default().to_uppercase()))
        .collect();
    let mut rows: Vec<Vec<String>> = Vec::new();
    if headers {
        let mut h: Vec<String> = cols.iter().map(|(_, n)| n.clone()).collect();
        if with_namespace {
            h.insert(0, "NAMESPACE".into());
        }
        rows.push(h);
    }
    for r in table["rows"].as_array().into_iter().flatten() {
        let cells = r["cells"].as_array().cloned().unwrap_or_default();
        let mut row: Vec<String> = cols
            .iter()
            .map(|(i, _)| match cells.get(*i) {
                Some(Value::String(s)) => s.clone(),
                Some(Value::Null) | None => "<none>".into(),
                Some(v) => v.to_string(),
            })
            .collect();
        if with_namespace {
            row.insert(
                0,
                r["object"]["metadata"]["namespace"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
            );
        }
        rows.push(row);
    }
    let widths: Vec<usize> = (0..rows.first().map_or(0, Vec::len))
        .map(|i| {
            rows.iter()
                .map(|r| r.get(i).map_or(0, String::len))
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for r in rows {
        let line: Vec<String> = r
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<w$}", w = widths[i]))
            .collect();
        out.push_str(line.join("   ").trim_end());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolves_names_and_decodes_base64() -> Result<(), ClientError> {
        assert_eq!(resolve("svc")?.kind, "Service");
        assert_eq!(resolve("Cluster")?.plural, "clusters");
        assert_eq!(resolve("clusters.slipway.dev")?.group, "slipway.dev");
        assert!(resolve("widgets").is_err());
        assert_eq!(
            base64_decode(&crate::tls::base64(b"slipway!")),
            Some(b"slipway!".to_vec())
        );
        Ok(())
    }
}
