//! Daemon configuration: a serde type (JSON file or CLI flags) and its validation.

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use slipway_api::{FieldError, FieldReason};
use thiserror::Error;

use crate::format::DEFAULT_EXTENT_SIZE;

/// Longest Unix socket path (`sun_path` holds 108 bytes including the NUL).
const MAX_SOCKET_PATH: usize = 107;

/// Configuration of the block store daemon.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ServeConfig {
    /// Data directory (catalog and layer files).
    pub data_dir: PathBuf,
    /// NBD over TCP, `ADDR:PORT` (port 0 picks a free port).
    #[serde(default)]
    pub listen: Option<String>,
    /// NBD over a Unix socket at this path.
    #[serde(default)]
    pub unix: Option<PathBuf>,
    /// Control API Unix socket.
    pub control: PathBuf,
    /// Prometheus endpoint, `ADDR:PORT`.
    #[serde(default)]
    pub metrics: Option<String>,
    /// Extent size for a new data directory (ignored for an existing one).
    #[serde(default = "default_extent_size")]
    pub extent_size: u64,
    /// TLS on the TCP listener; when set, TCP clients must upgrade with `NBD_OPT_STARTTLS`
    /// and present a certificate signed by `client_ca`.
    #[serde(default)]
    pub tls: Option<TlsConfig>,
}

/// TLS files (PEM).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// The server's certificate chain.
    pub cert: PathBuf,
    /// The server's private key.
    pub key: PathBuf,
    /// The CA that signs client certificates.
    pub client_ca: PathBuf,
}

fn default_extent_size() -> u64 {
    DEFAULT_EXTENT_SIZE
}

/// A configuration that cannot be used.
#[derive(Debug, Error)]
pub enum ConfigError {
    /// One or more fields are invalid (all are listed).
    #[error("invalid configuration: {}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
    Invalid(Vec<FieldError>),
    /// The config file could not be read.
    #[error("cannot read config file {path}")]
    Read {
        /// File path.
        path: PathBuf,
        /// OS error.
        #[source]
        source: std::io::Error,
    },
    /// The config file is not valid JSON for this type.
    #[error("cannot parse config file {path}")]
    Parse {
        /// File path.
        path: PathBuf,
        /// Parse error.
        #[source]
        source: serde_json::Error,
    },
}

impl ServeConfig {
    /// Reads a JSON config file.
    pub fn from_file(path: &std::path::Path) -> Result<Self, ConfigError> {
        let bytes = std::fs::read(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        serde_json::from_slice(&bytes).map_err(|source| ConfigError::Parse {
            path: path.to_owned(),
            source,
        })
    }

    /// Checks every field and reports all problems at once.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut errs = Vec::new();
        let mut bad = |field: &str, detail: String| {
            errs.push(FieldError::new(field, FieldReason::Invalid, detail));
        };
        if self.data_dir.as_os_str().is_empty() {
            bad("data_dir", "must not be empty".into());
        }
        if self.listen.is_none() && self.unix.is_none() {
            bad("listen", "set listen or unix (or both)".into());
        }
        if let Some(l) = &self.listen
            && l.parse::<SocketAddr>().is_err()
        {
            bad("listen", format!("{l:?} is not ADDR:PORT"));
        }
        if let Some(m) = &self.metrics
            && m.parse::<SocketAddr>().is_err()
        {
            bad("metrics", format!("{m:?} is not ADDR:PORT"));
        }
        for (field, path) in [
            ("unix", self.unix.as_ref()),
            ("control", Some(&self.control)),
        ] {
            if let Some(p) = path {
                let len = p.as_os_str().len();
                if len == 0 || len > MAX_SOCKET_PATH {
                    bad(
                        field,
                        format!("socket path must be 1 to {MAX_SOCKET_PATH} bytes"),
                    );
                }
            }
        }
        if !self.extent_size.is_power_of_two()
            || !(4096..=4 * 1024 * 1024).contains(&self.extent_size)
        {
            bad(
                "extent_size",
                format!(
                    "{} is not a power of two in 4 KiB..=4 MiB",
                    self.extent_size
                ),
            );
        }
        if let Some(tls) = &self.tls {
            if self.listen.is_none() {
                bad("tls", "applies to the TCP listener: set listen too".into());
            }
            for (field, path) in [
                ("tls.cert", &tls.cert),
                ("tls.key", &tls.key),
                ("tls.client_ca", &tls.client_ca),
            ] {
                if !path.is_file() {
                    bad(field, format!("{} is not a readable file", path.display()));
                }
            }
        }
        if errs.is_empty() {
            Ok(())
        } else {
            Err(ConfigError::Invalid(errs))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_every_bad_field() {
        let cfg = ServeConfig {
            data_dir: PathBuf::new(),
            listen: Some("nope".into()),
            unix: None,
            control: PathBuf::from("/tmp/c"),
            metrics: Some("x".into()),
            extent_size: 3,
            tls: Some(TlsConfig {
                cert: PathBuf::from("/nonexistent/cert.pem"),
                key: PathBuf::from("/nonexistent/key.pem"),
                client_ca: PathBuf::from("/nonexistent/ca.pem"),
            }),
        };
        let Err(ConfigError::Invalid(errs)) = cfg.validate() else {
            panic!("expected invalid");
        };
        let fields: Vec<_> = errs.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(
            fields,
            [
                "data_dir",
                "listen",
                "metrics",
                "extent_size",
                "tls.cert",
                "tls.key",
                "tls.client_ca"
            ]
        );
    }

    #[test]
    fn unknown_fields_are_rejected() {
        let json = r#"{"data_dir":"/d","control":"/c","unix":"/u","colour":1}"#;
        assert!(serde_json::from_str::<ServeConfig>(json).is_err());
        let ok = r#"{"data_dir":"/d","control":"/c","unix":"/u"}"#;
        let cfg: ServeConfig = serde_json::from_str(ok).expect("valid config");
        assert!(cfg.validate().is_ok());
        assert_eq!(cfg.extent_size, DEFAULT_EXTENT_SIZE);
    }
}
