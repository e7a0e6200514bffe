//! TLS for the NBD TCP listener (`NBD_OPT_STARTTLS`, proto.md "TLS support") and the client
//! identity it proves: a certificate signed by the configured client CA, valid for a DNS name.
//! An export's allow-list names the clients (DNS names) that may open it.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use thiserror::Error;
use tokio_rustls::TlsAcceptor;

use crate::config::TlsConfig;

/// The TLS configuration could not be loaded.
#[derive(Debug, Error)]
pub enum TlsError {
    /// A PEM file could not be read or parsed.
    #[error("cannot read {what} from {path}")]
    Pem {
        /// Which file (`tls.cert`, `tls.key`, `tls.client_ca`).
        what: &'static str,
        /// Its path.
        path: PathBuf,
        /// Why.
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    /// rustls refused the certificates or key.
    #[error("invalid TLS configuration")]
    Rustls(#[source] rustls::Error),
    /// The client CA cannot verify clients.
    #[error("invalid client CA")]
    Verifier(#[source] rustls::server::VerifierBuilderError),
}

/// A client certificate, verified against the client CA during the TLS handshake.
#[derive(Debug, Clone)]
pub struct ClientCert(CertificateDer<'static>);

impl ClientCert {
    /// Whether the certificate is valid for `name` (a DNS name in its subject alternative
    /// names), i.e. whether this client is `name`.
    pub fn is(&self, name: &str) -> bool {
        let Ok(server_name) = ServerName::try_from(name) else {
            return false;
        };
        rustls::server::ParsedCertificate::try_from(&self.0)
            .is_ok_and(|c| rustls::client::verify_server_name(&c, &server_name).is_ok())
    }
}

impl From<CertificateDer<'static>> for ClientCert {
    fn from(der: CertificateDer<'static>) -> Self {
        Self(der)
    }
}

/// Checks that `name` can name a client (a DNS name), for allow-lists.
pub fn valid_client_name(name: &str) -> bool {
    matches!(ServerName::try_from(name), Ok(ServerName::DnsName(_)))
}

/// The identity a finished TLS session proves, if the client sent a certificate.
pub fn client_of<S>(stream: &tokio_rustls::server::TlsStream<S>) -> Option<ClientCert> {
    stream
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .map(|c| ClientCert(c.clone().into_owned()))
}

fn pem_certs(what: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let err = |source| TlsError::Pem {
        what,
        path: path.to_owned(),
        source,
    };
    CertificateDer::pem_file_iter(path)
        .map_err(err)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(err)
}

/// The acceptor for `cfg`: TLS 1.2 or later, client certificates required and verified
/// against the client CA.
pub fn acceptor(cfg: &TlsConfig) -> Result<TlsAcceptor, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let chain = pem_certs("tls.cert", &cfg.cert)?;
    let key = PrivateKeyDer::from_pem_file(&cfg.key).map_err(|source| TlsError::Pem {
        what: "tls.key",
        path: cfg.key.clone(),
        source,
    })?;
    let mut roots = rustls::RootCertStore::empty();
    for ca in pem_certs("tls.client_ca", &cfg.client_ca)? {
        roots.add(ca).map_err(TlsError::Rustls)?;
    }
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    )
    .build()
    .map_err(TlsError::Verifier)?;
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(TlsError::Rustls)?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(TlsError::Rustls)?;
    Ok(TlsAcceptor::from(Arc::new(config)))
}
