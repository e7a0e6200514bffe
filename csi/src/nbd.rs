//! A small synchronous NBD client (fixed newstyle handshake, `NBD_OPT_GO`, simple replies) for
//! the userspace attach path: READ, WRITE, FLUSH, TRIM and DISC (NBD protocol, "Transmission").

use crate::error::CsiError;

/// Where an NBD server listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Address {
    /// A Unix socket path.
    Unix(String),
    /// `host:port`.
    Tcp(String),
}

impl Address {
    /// Parses `unix:/path` or `tcp:host:port`.
    pub fn parse(s: &str) -> Result<Self, CsiError> {
        if let Some(p) = s.strip_prefix("unix:") {
            if p.starts_with('/') {
                return Ok(Self::Unix(p.into()));
            }
        } else if let Some(a) = s.strip_prefix("tcp:")
            && a.rsplit_once(':')
                .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok())
        {
            return Ok(Self::Tcp(a.into()));
        }
        Err(CsiError::invalid(
            "nbd",
            format!("{s:?} is not unix:/absolute/path or tcp:HOST:PORT"),
        ))
    }
}
