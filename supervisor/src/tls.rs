//! The supervisor's PKI: on first start a CA, a serving certificate and an admin client
//! certificate are generated under `DIR/pki`; `DIR/admin.kubeconfig` points kubectl at them.
//! Client certificates name the user (CN) and groups (O), as Kubernetes does.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// PKI and TLS set-up failures.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// Certificate generation failed.
    #[error("generating {what}")]
    Generate {
        /// Which certificate.
        what: &'static str,
        /// Cause.
        #[source]
        source: rcgen::Error,
    },
    /// A PKI file could not be read or written.
    #[error("{path}")]
    Io {
        /// File.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// A PEM file did not parse.
    #[error("parsing PEM {path}")]
    Pem {
        /// File.
        path: PathBuf,
        /// Cause.
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    /// rustls refused the configuration.
    #[error("TLS configuration")]
    Rustls(#[source] rustls::Error),
    /// The client verifier could not be built.
    #[error("client certificate verifier")]
    Verifier(#[source] rustls::server::VerifierBuilderError),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> TlsError + '_ {
    move |source| TlsError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn gen_err(what: &'static str) -> impl FnOnce(rcgen::Error) -> TlsError {
    move |source| TlsError::Generate { what, source }
}

const DAY: u64 = 24 * 3600;
/// Lifetime of the CA.
pub const CA_DAYS: u32 = 3650;
/// Lifetime of the serving certificate and of the admin client certificate.
pub const ADMIN_DAYS: u32 = 365;
/// Default lifetime of a user's client certificate (renewed with `slipway kubeconfig`).
pub const USER_DAYS: u32 = 90;
/// A certificate this close to its end is replaced at start-up.
const RENEW_BEFORE: u64 = 30 * DAY;

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Validity from an hour ago (clock skew between hosts) to `days` from now.
fn set_validity(params: &mut CertificateParams, days: u32) {
    let epoch = rcgen::date_time_ymd(1970, 1, 1);
    let now = now_secs();
    params.not_before = epoch + Duration::from_secs(now.saturating_sub(3600));
    params.not_after = epoch + Duration::from_secs(now + u64::from(days) * DAY);
}

/// Whether the PEM certificate at `path` ends within `RENEW_BEFORE` (or cannot be read).
fn due_for_renewal(path: &Path) -> bool {
    let end = CertificateDer::from_pem_file(path)
        .ok()
        .and_then(|der| validity_of(&der))
        .map(|(_, end)| end);
    end.is_none_or(|end| end < now_secs() + RENEW_BEFORE)
}

/// Paths of the PKI files under the data directory.
#[derive(Debug, Clone)]
pub struct Pki {
    dir: PathBuf,
}

impl Pki {
    /// The PKI rooted at `data_dir/pki`.
    pub fn new(data_dir: &Path) -> Self {
        Self {
            dir: data_dir.join("pki"),
        }
    }

    /// A PKI whose files are in `dir` itself.
    pub fn at(dir: &Path) -> Self {
        Self {
            dir: dir.to_owned(),
        }
    }

    /// CA certificate path.
    pub fn ca_cert(&self) -> PathBuf {
        self.dir.join("ca.crt")
    }
    /// CA key path.
    pub fn ca_key(&self) -> PathBuf {
        self.dir.join("ca.key")
    }
    fn server_cert(&self) -> PathBuf {
        self.dir.join("server.crt")
    }
    fn server_key(&self) -> PathBuf {
        self.dir.join("server.key")
    }
    fn admin_cert(&self) -> PathBuf {
        self.dir.join("admin.crt")
    }
    fn admin_key(&self) -> PathBuf {
        self.dir.join("admin.key")
    }

    /// Creates the CA and serving certificate if they do not exist yet; renews the serving
    /// certificate when it nears its end.
    pub fn ensure(&self, extra_sans: &[String]) -> Result<(), TlsError> {
        std::fs::create_dir_all(&self.dir).map_err(io(&self.dir))?;
        if !self.ca_cert().exists() {
            let key = KeyPair::generate().map_err(gen_err("CA key"))?;
            let mut params = ca_params()?;
            set_validity(&mut params, CA_DAYS);
            let cert = params.self_signed(&key).map_err(gen_err("CA"))?;
            write_private(&self.ca_key(), &key.serialize_pem())?;
            std::fs::write(self.ca_cert(), cert.pem()).map_err(io(&self.ca_cert()))?;
        }
        let mut sans = vec![
            "localhost".to_string(),
            "127.0.0.1".to_string(),
            "::1".to_string(),
        ];
        sans.extend(extra_sans.iter().cloned());
        sans.sort();
        sans.dedup();
        // The names the certificate was issued for, kept beside it: a new name reissues it.
        let names_file = self.dir.join("server.names");
        let names = sans.join("\n");
        let same_names = std::fs::read_to_string(&names_file).is_ok_and(|n| n == names);
        if due_for_renewal(&self.server_cert()) || !same_names {
            let key = KeyPair::generate().map_err(gen_err("server key"))?;
            let mut params = CertificateParams::new(sans).map_err(gen_err("server"))?;
            params.distinguished_name = dn("slipway-supervisor", None);
            params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
            set_validity(&mut params, ADMIN_DAYS);
            let cert = params
                .signed_by(&key, &self.issuer()?)
                .map_err(gen_err("server"))?;
            write_private(&self.server_key(), &key.serialize_pem())?;
            std::fs::write(self.server_cert(), cert.pem()).map_err(io(&self.server_cert()))?;
            std::fs::write(&names_file, names).map_err(io(&names_file))?;
        }
        Ok(())
    }

    fn issuer(&self) -> Result<Issuer<'static, KeyPair>, TlsError> {
        let key_pem = std::fs::read_to_string(self.ca_key()).map_err(io(&self.ca_key()))?;
        let key = KeyPair::from_pem(&key_pem).map_err(gen_err("CA key"))?;
        // The CA's subject and key usages are fixed, so its parameters are rebuilt rather than
        // parsed back from the certificate.
        Ok(Issuer::new(ca_params()?, key))
    }

    /// Issues a client certificate for `user` in `group` (subject O), valid for `days`;
    /// returns (cert PEM, key PEM). rcgen keeps one value per attribute type, so a generated
    /// certificate carries one group.
    pub fn issue_client(
        &self,
        user: &str,
        group: Option<&str>,
        days: u32,
    ) -> Result<(String, String), TlsError> {
        let key = KeyPair::generate().map_err(gen_err("client key"))?;
        sign_client(&self.issuer()?, &key, user, group, days)
    }

    /// As [`Self::issue_client`], also valid for the DNS `names` (a host's block store
    /// client name).
    pub fn issue_client_named(
        &self,
        user: &str,
        group: Option<&str>,
        names: &[String],
        days: u32,
    ) -> Result<(String, String), TlsError> {
        let key = KeyPair::generate().map_err(gen_err("client key"))?;
        sign_client_named(&self.issuer()?, &key, user, group, names, days)
    }

    /// A serving certificate for `names` (DNS names or IP addresses) signed by the CA, for
    /// a server the supervisor starts (a storage host's block store); returns (cert PEM,
    /// key PEM).
    pub fn issue_server(&self, names: &[String], days: u32) -> Result<(String, String), TlsError> {
        let key = KeyPair::generate().map_err(gen_err("server key"))?;
        let mut params = CertificateParams::new(names.to_vec()).map_err(gen_err("server"))?;
        params.distinguished_name = dn(names.first().map_or("server", String::as_str), None);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        set_validity(&mut params, days);
        let cert = params
            .signed_by(&key, &self.issuer()?)
            .map_err(gen_err("server"))?;
        Ok((cert.pem(), key.serialize_pem()))
    }

    /// A certificate both serving `names` and authenticating as a client named `names[0]`,
    /// signed by the CA: an etcd member's, for its clients and its peers alike; returns (cert
    /// PEM, key PEM).
    pub fn issue_peer(&self, names: &[String], days: u32) -> Result<(String, String), TlsError> {
        let key = KeyPair::generate().map_err(gen_err("peer key"))?;
        let mut params = CertificateParams::new(names.to_vec()).map_err(gen_err("peer"))?;
        params.distinguished_name = dn(names.first().map_or("peer", String::as_str), None);
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        set_validity(&mut params, days);
        let cert = params
            .signed_by(&key, &self.issuer()?)
            .map_err(gen_err("peer"))?;
        Ok((cert.pem(), key.serialize_pem()))
    }

    /// The one cluster-admin client certificate (`pki/admin.crt`): issued on first start for
    /// [`ADMIN_DAYS`], kept across restarts, and re-signed with the same key when it nears its
    /// end. Returns (cert PEM, key PEM).
    pub fn admin_client(&self, group: &str) -> Result<(String, String), TlsError> {
        let (cert, key) = (self.admin_cert(), self.admin_key());
        if key.exists() && !due_for_renewal(&cert) {
            return Ok((
                std::fs::read_to_string(&cert).map_err(io(&cert))?,
                std::fs::read_to_string(&key).map_err(io(&key))?,
            ));
        }
        let pair = match std::fs::read_to_string(&key) {
            Ok(pem) => KeyPair::from_pem(&pem).map_err(gen_err("admin key"))?,
            Err(_) => KeyPair::generate().map_err(gen_err("admin key"))?,
        };
        let (cert_pem, key_pem) =
            sign_client(&self.issuer()?, &pair, "admin", Some(group), ADMIN_DAYS)?;
        write_private(&key, &key_pem)?;
        write_private(&cert, &cert_pem)?;
        Ok((cert_pem, key_pem))
    }

    /// The rustls server configuration: serving cert, optional client certs from our CA, h2.
    pub fn server_config(&self) -> Result<Arc<rustls::ServerConfig>, TlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let chain = CertificateDer::pem_file_iter(self.server_cert())
            .map_err(|source| TlsError::Pem {
                path: self.server_cert(),
                source,
            })?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|source| TlsError::Pem {
                path: self.server_cert(),
                source,
            })?;
        let key =
            PrivateKeyDer::from_pem_file(self.server_key()).map_err(|source| TlsError::Pem {
                path: self.server_key(),
                source,
            })?;
        let mut roots = rustls::RootCertStore::empty();
        for ca in CertificateDer::pem_file_iter(self.ca_cert()).map_err(|source| TlsError::Pem {
            path: self.ca_cert(),
            source,
        })? {
            let ca = ca.map_err(|source| TlsError::Pem {
                path: self.ca_cert(),
                source,
            })?;
            roots.add(ca).map_err(TlsError::Rustls)?;
        }
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            Arc::new(roots),
            provider.clone(),
        )
        .allow_unauthenticated()
        .build()
        .map_err(TlsError::Verifier)?;
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(TlsError::Rustls)?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain, key)
            .map_err(TlsError::Rustls)?;
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(Arc::new(config))
    }

    /// Writes `path` as a kubeconfig for the server at `addr` with the given credentials.
    pub fn write_kubeconfig(
        &self,
        path: &Path,
        addr: SocketAddr,
        user: &str,
        cred: &Credential,
    ) -> Result<(), TlsError> {
        let text = self.kubeconfig(&authority(addr), user, cred)?;
        write_private(path, &text)
    }

    /// A kubeconfig for the server at `authority` (`host:port`) with the given credentials.
    pub fn kubeconfig(
        &self,
        authority: &str,
        user: &str,
        cred: &Credential,
    ) -> Result<String, TlsError> {
        let ca = std::fs::read(self.ca_cert()).map_err(io(&self.ca_cert()))?;
        Ok(kubeconfig_text(&ca, authority, user, cred))
    }
}

/// A client certificate for `user` in `group`, valid for `days`, signed by the CA whose key is
/// `ca_key_pem` (a CA this module made: its subject is fixed); returns (cert PEM, key PEM).
pub fn issue_client_with(
    ca_key_pem: &str,
    user: &str,
    group: Option<&str>,
    days: u32,
) -> Result<(String, String), TlsError> {
    let ca_key = KeyPair::from_pem(ca_key_pem).map_err(gen_err("CA key"))?;
    let key = KeyPair::generate().map_err(gen_err("client key"))?;
    sign_client(&Issuer::new(ca_params()?, ca_key), &key, user, group, days)
}

fn sign_client(
    issuer: &Issuer<'static, KeyPair>,
    key: &KeyPair,
    user: &str,
    group: Option<&str>,
    days: u32,
) -> Result<(String, String), TlsError> {
    sign_client_named(issuer, key, user, group, &[], days)
}

/// As [`sign_client`], with DNS names (subject alternative names) the certificate is valid
/// for: a host's name towards block stores (`slipway_api::volumes::host_nbd_client`).
fn sign_client_named(
    issuer: &Issuer<'static, KeyPair>,
    key: &KeyPair,
    user: &str,
    group: Option<&str>,
    names: &[String],
    days: u32,
) -> Result<(String, String), TlsError> {
    let mut params = CertificateParams::new(names.to_vec()).map_err(gen_err("client"))?;
    params.distinguished_name = dn(user, group);
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    set_validity(&mut params, days);
    let cert = params.signed_by(key, issuer).map_err(gen_err("client"))?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// A kubeconfig for the server at `authority` (`host:port`) whose CA certificate is `ca` (PEM),
/// with the given credentials.
pub fn kubeconfig_text(ca: &[u8], authority: &str, user: &str, cred: &Credential) -> String {
    let user_block = match cred {
        Credential::ClientCert { cert_pem, key_pem } => format!(
            "    client-certificate-data: {}\n    client-key-data: {}\n",
            base64(cert_pem.as_bytes()),
            base64(key_pem.as_bytes())
        ),
        Credential::Token(t) => format!("    token: {t}\n"),
    };
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: slipway\n  cluster:\n    server: https://{authority}\n    certificate-authority-data: {ca}\nusers:\n- name: {user}\n  user:\n{user_block}contexts:\n- name: {user}@slipway\n  context:\n    cluster: slipway\n    user: {user}\n    namespace: default\ncurrent-context: {user}@slipway\n",
        ca = base64(ca),
    )
}

/// How a kubeconfig user authenticates.
#[derive(Debug, Clone)]
pub enum Credential {
    /// Client certificate and key (PEM).
    ClientCert {
        /// Certificate PEM.
        cert_pem: String,
        /// Key PEM.
        key_pem: String,
    },
    /// Bearer token.
    Token(String),
}

fn ca_params() -> Result<CertificateParams, TlsError> {
    let mut params = CertificateParams::new(Vec::<String>::new()).map_err(gen_err("CA"))?;
    params.distinguished_name = dn("slipway-ca", None);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    Ok(params)
}

fn dn(cn: &str, org: Option<&str>) -> DistinguishedName {
    let mut d = DistinguishedName::new();
    d.push(DnType::CommonName, cn);
    if let Some(o) = org {
        d.push(DnType::OrganizationName, o);
    }
    d
}

/// The `host:port` a client on this machine reaches a server bound to `addr` at (loopback for
/// an unspecified address).
pub fn authority(addr: SocketAddr) -> String {
    let host = match addr.ip() {
        IpAddr::V4(v) if v.is_unspecified() => "127.0.0.1".to_string(),
        IpAddr::V6(v) if v.is_unspecified() => "127.0.0.1".to_string(),
        IpAddr::V6(v) => format!("[{v}]"),
        IpAddr::V4(v) => v.to_string(),
    };
    format!("{host}:{}", addr.port())
}

/// Writes `text` to `path`, readable by its owner only.
pub fn write_private(path: &Path, text: &str) -> Result<(), TlsError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(io(path))?;
    f.write_all(text.as_bytes()).map_err(io(path))?;
    f.sync_all().map_err(io(path))
}

/// Standard base64 with padding.
pub fn base64(data: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(A[((n >> (18 - 6 * i)) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// One DER element: (tag, contents, the bytes after it).
fn tlv(b: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let tag = *b.first()?;
    let first = *b.get(1)?;
    let (len, hdr) = if first < 0x80 {
        (usize::from(first), 2)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 {
            return None;
        }
        let mut len = 0usize;
        for i in 0..n {
            len = (len << 8) | usize::from(*b.get(2 + i)?);
        }
        (len, 2 + n)
    };
    let end = hdr.checked_add(len)?;
    Some((tag, b.get(hdr..end)?, b.get(end..)?))
}

/// The TBSCertificate fields from `validity` on (explicit version skipped).
fn from_validity(der: &[u8]) -> Option<&[u8]> {
    let (_, cert, _) = tlv(der)?;
    let (_, tbs, _) = tlv(cert)?;
    let mut rest = tbs;
    let (tag, _, r) = tlv(rest)?;
    if tag == 0xa0 {
        rest = r; // explicit version
    }
    // serial, signature algorithm, issuer
    for _ in 0..3 {
        rest = tlv(rest)?.2;
    }
    Some(rest)
}

/// Seconds since the epoch of an X.509 UTCTime (`YYMMDDHHMMSSZ`, tag 0x17) or
/// GeneralizedTime (`YYYYMMDDHHMMSSZ`, tag 0x18), RFC 5280 §4.1.2.5.
fn x509_time(tag: u8, v: &[u8]) -> Option<u64> {
    let s = std::str::from_utf8(v).ok()?.strip_suffix('Z')?;
    let num = |r: std::ops::Range<usize>| s.get(r)?.parse::<u64>().ok();
    let (year, rest) = match (tag, s.len()) {
        (0x17, 12) => {
            let yy = num(0..2)?;
            (if yy >= 50 { 1900 + yy } else { 2000 + yy }, 2)
        }
        (0x18, 14) => (num(0..4)?, 4),
        _ => return None,
    };
    let (month, day) = (num(rest..rest + 2)?, num(rest + 2..rest + 4)?);
    let (h, m, sec) = (
        num(rest + 4..rest + 6)?,
        num(rest + 6..rest + 8)?,
        num(rest + 8..rest + 10)?,
    );
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) || year < 1970 {
        return None;
    }
    // Days from the civil date (Howard Hinnant's days_from_civil).
    let y = if month <= 2 { year - 1 } else { year };
    let era = y / 400;
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = (era * 146097 + doe).checked_sub(719468)?;
    Some(days * DAY + h * 3600 + m * 60 + sec)
}

/// (notBefore, notAfter) of a DER certificate, in seconds since the epoch.
pub fn validity_of(der: &[u8]) -> Option<(u64, u64)> {
    let (_, validity, _) = tlv(from_validity(der)?)?;
    let (t1, v1, rest) = tlv(validity)?;
    let (t2, v2, _) = tlv(rest)?;
    Some((x509_time(t1, v1)?, x509_time(t2, v2)?))
}

/// Subject CN and O values of a DER certificate (user and groups), read with a minimal DER walk.
pub fn subject_of(der: &[u8]) -> Option<(String, Vec<String>)> {
    let rest = tlv(from_validity(der)?)?.2;
    let (_, mut subject, _) = tlv(rest)?;
    let (mut cn, mut orgs) = (None, Vec::new());
    while !subject.is_empty() {
        let (_, set, r) = tlv(subject)?;
        subject = r;
        let (_, atv, _) = tlv(set)?;
        let (_, oid, r) = tlv(atv)?;
        let (_, val, _) = tlv(r)?;
        let val = String::from_utf8_lossy(val).into_owned();
        match oid {
            [0x55, 0x04, 0x03] => cn = Some(val),
            [0x55, 0x04, 0x0a] => orgs.push(val),
            _ => {}
        }
    }
    Some((cn?, orgs))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MASTERS_FOR_TEST: &str = "system:masters";

    #[test]
    fn x509_times_parse() {
        assert_eq!(x509_time(0x17, b"700101000000Z"), Some(0));
        assert_eq!(x509_time(0x17, b"260305120000Z"), Some(1_772_712_000));
        assert_eq!(x509_time(0x18, b"40960101000000Z"), Some(67_090_118_400));
        assert_eq!(x509_time(0x17, b"261305120000Z"), None);
        assert_eq!(x509_time(0x18, b"700101000000Z"), None);
    }

    #[test]
    fn issued_client_cert_names_user_and_groups() -> Result<(), TlsError> {
        let dir = std::env::temp_dir().join(format!("slipway-pki-{}", std::process::id()));
        let pki = Pki::new(&dir);
        pki.ensure(&[])?;
        let (cert, _) = pki.issue_client("alice", Some("system:masters"), USER_DAYS)?;
        let der =
            CertificateDer::from_pem_slice(cert.as_bytes()).map_err(|source| TlsError::Pem {
                path: dir.clone(),
                source,
            })?;
        assert_eq!(
            subject_of(&der),
            Some(("alice".into(), vec!["system:masters".into()]))
        );
        let (start, end) = validity_of(&der).unwrap_or_default();
        let now = now_secs();
        assert!(start <= now && now - start <= 3700, "{start} vs {now}");
        assert_eq!((end - now).div_ceil(DAY), u64::from(USER_DAYS));
        // The admin certificate is kept: a second call returns the same one.
        let first = pki.admin_client(MASTERS_FOR_TEST)?;
        assert_eq!(pki.admin_client(MASTERS_FOR_TEST)?, first);
        assert_eq!(base64(b"hello"), "aGVsbG8=");
        assert!(pki.server_config().is_ok());
        let _ = std::fs::remove_dir_all(dir);
        Ok(())
    }

    #[test]
    fn serving_certificate_is_renewed_near_its_end() -> Result<(), TlsError> {
        let dir = std::env::temp_dir().join(format!("slipway-pki-renew-{}", std::process::id()));
        let pki = Pki::new(&dir);
        pki.ensure(&[])?;
        let end = |pki: &Pki| {
            CertificateDer::from_pem_file(pki.server_cert())
                .ok()
                .and_then(|d| validity_of(&d))
                .map_or(0, |(_, end)| end)
        };
        assert_eq!(
            (end(&pki) - now_secs()).div_ceil(DAY),
            u64::from(ADMIN_DAYS)
        );
        // A certificate with 10 days left is due: the next start replaces it.
        let (short, _) = pki.issue_client("slipway-supervisor", None, 10)?;
        std::fs::write(pki.server_cert(), short).map_err(io(&pki.server_cert()))?;
        assert!(due_for_renewal(&pki.server_cert()));
        pki.ensure(&[])?;
        assert_eq!(
            (end(&pki) - now_secs()).div_ceil(DAY),
            u64::from(ADMIN_DAYS)
        );
        assert!(pki.server_config().is_ok());
        let _ = std::fs::remove_dir_all(dir);
        Ok(())
    }

    proptest::proptest! {
        #[test]
        fn subject_parser_never_panics(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..512)) {
            let _ = subject_of(&bytes);
        }
    }
}
