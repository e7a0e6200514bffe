//! A small synchronous NBD client (fixed newstyle handshake, `NBD_OPT_STARTTLS` with a client
//! certificate when the block store asks for it, `NBD_OPT_GO`, simple replies) for the userspace
//! attach path: READ, WRITE, FLUSH and DISC (NBD protocol, "Transmission").

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::os::fd::{BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};

use slipway_blockstore::proto;

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

/// The node's TLS identity towards the block store (PEM files): the CA that signed the block
/// store's certificate, and this node's client certificate and key (the name the export's
/// allow-list must hold).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// CA of the server certificate.
    pub ca: PathBuf,
    /// Client certificate chain.
    pub cert: PathBuf,
    /// Client private key.
    pub key: PathBuf,
}

impl TlsFiles {
    fn client_config(&self) -> Result<rustls::ClientConfig, NbdError> {
        let pem = |what: &'static str, path: &PathBuf| {
            let path = path.display().to_string();
            move |e: rustls::pki_types::pem::Error| NbdError::Tls(format!("{what} {path}: {e}"))
        };
        let mut roots = rustls::RootCertStore::empty();
        for ca in CertificateDer::pem_file_iter(&self.ca).map_err(pem("CA", &self.ca))? {
            roots
                .add(ca.map_err(pem("CA", &self.ca))?)
                .map_err(|e| NbdError::Tls(format!("CA {}: {e}", self.ca.display())))?;
        }
        let chain = CertificateDer::pem_file_iter(&self.cert)
            .map_err(pem("certificate", &self.cert))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(pem("certificate", &self.cert))?;
        let key = PrivateKeyDer::from_pem_file(&self.key).map_err(pem("key", &self.key))?;
        rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| NbdError::Tls(e.to_string()))?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .map_err(|e| NbdError::Tls(format!("client certificate: {e}")))
    }
}

/// An NBD failure.
#[derive(Debug, thiserror::Error)]
pub enum NbdError {
    /// The connection failed.
    #[error("NBD {what}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The server answered outside the protocol or refused.
    #[error("NBD server: {0}")]
    Protocol(String),
    /// TLS could not be set up or failed.
    #[error("NBD TLS: {0}")]
    Tls(String),
    /// The server's policy refuses this client the export (allow-list, or TLS required).
    #[error("NBD server refused export {export:?} to this client: {message}")]
    Refused {
        /// The export.
        export: String,
        /// The server's message.
        message: String,
    },
    /// The server has no export of this name.
    #[error("NBD server has no export {0:?}")]
    UnknownExport(String),
    /// The server failed one request with this errno.
    #[error("NBD request failed with errno {0}")]
    Errno(u32),
}

trait Stream: Read + Write + Send {}
impl<T: Read + Write + Send> Stream for T {}

/// One negotiated connection to one export.
pub struct Client {
    s: Box<dyn Stream>,
    /// The plain socket (no TLS), for handing to the kernel's NBD driver.
    sock: Option<OwnedFd>,
    /// Export size in bytes.
    pub size: u64,
    /// Transmission flags.
    pub flags: u16,
    cookie: u64,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client").field("size", &self.size).finish()
    }
}

fn io_err(what: &'static str) -> impl FnOnce(io::Error) -> NbdError {
    move |source| NbdError::Io { what, source }
}

impl Client {
    /// Connects and negotiates `export` with `NBD_OPT_GO`, first upgrading to TLS with `tls`
    /// (`NBD_OPT_STARTTLS`; TCP only: the block store's Unix socket is local and plain).
    pub fn connect(addr: &Address, export: &str, tls: Option<&TlsFiles>) -> Result<Self, NbdError> {
        let mut c = match addr {
            Address::Unix(p) => {
                let s = UnixStream::connect(p).map_err(io_err("connect"))?;
                let sock = s.try_clone().map_err(io_err("dup"))?;
                let mut c = Self::greet(Box::new(s))?;
                c.sock = Some(sock.into());
                c
            }
            Address::Tcp(a) => {
                let t = TcpStream::connect(a).map_err(io_err("connect"))?;
                t.set_nodelay(true).map_err(io_err("setsockopt"))?;
                let sock = t.try_clone().map_err(io_err("dup"))?;
                let mut c = Self::greet(Box::new(t))?;
                c.sock = Some(sock.into());
                if let Some(tls) = tls {
                    c.sock = None;
                    let host = a.rsplit_once(':').map_or(a.as_str(), |(h, _)| h);
                    let host = host.trim_start_matches('[').trim_end_matches(']');
                    c = c.start_tls(tls, host)?;
                }
                c
            }
        };
        c.go(export)?;
        Ok(c)
    }

    /// Reads the greeting and sends the client flags.
    fn greet(mut s: Box<dyn Stream>) -> Result<Self, NbdError> {
        let mut g = [0u8; 18];
        s.read_exact(&mut g).map_err(io_err("greeting"))?;
        if g[..8] != proto::NBDMAGIC.to_be_bytes() || g[8..16] != proto::IHAVEOPT.to_be_bytes() {
            return Err(NbdError::Protocol("not a newstyle NBD server".into()));
        }
        let sflags = u16::from_be_bytes([g[16], g[17]]);
        if sflags & proto::FLAG_FIXED_NEWSTYLE == 0 {
            return Err(NbdError::Protocol("server is not fixed newstyle".into()));
        }
        let cflags = proto::FLAG_C_FIXED_NEWSTYLE | (u32::from(sflags & proto::FLAG_NO_ZEROES));
        s.write_all(&cflags.to_be_bytes())
            .map_err(io_err("client flags"))?;
        Ok(Self {
            s,
            sock: None,
            size: 0,
            flags: 0,
            cookie: 0,
        })
    }

    fn send_option(&mut self, option: u32, data: &[u8]) -> Result<(), NbdError> {
        let mut msg = proto::IHAVEOPT.to_be_bytes().to_vec();
        msg.extend_from_slice(&option.to_be_bytes());
        msg.extend_from_slice(&(data.len() as u32).to_be_bytes());
        msg.extend_from_slice(data);
        self.s.write_all(&msg).map_err(io_err("send option"))
    }

    /// One option reply: its type and data.
    fn option_reply(&mut self) -> Result<(u32, Vec<u8>), NbdError> {
        let mut h = [0u8; 20];
        self.s.read_exact(&mut h).map_err(io_err("option reply"))?;
        if h[..8] != proto::OPT_REPLY_MAGIC.to_be_bytes() {
            return Err(NbdError::Protocol("bad option reply magic".into()));
        }
        let ty = u32::from_be_bytes([h[12], h[13], h[14], h[15]]);
        let len = u32::from_be_bytes([h[16], h[17], h[18], h[19]]) as usize;
        if len > 64 * 1024 {
            return Err(NbdError::Protocol(format!("option reply of {len} bytes")));
        }
        let mut d = vec![0u8; len];
        self.s.read_exact(&mut d).map_err(io_err("option reply"))?;
        Ok((ty, d))
    }

    /// `NBD_OPT_STARTTLS`, then the TLS handshake with this node's client certificate.
    fn start_tls(mut self, tls: &TlsFiles, host: &str) -> Result<Self, NbdError> {
        let config = tls.client_config()?;
        let name = ServerName::try_from(host.to_owned())
            .map_err(|e| NbdError::Tls(format!("server name {host:?}: {e}")))?;
        self.send_option(proto::opt::STARTTLS, &[])?;
        match self.option_reply()? {
            (proto::rep::ACK, _) => {}
            (t, d) => {
                return Err(NbdError::Tls(format!(
                    "STARTTLS refused (reply {t:#x}: {})",
                    String::from_utf8_lossy(&d)
                )));
            }
        }
        let conn = rustls::ClientConnection::new(Arc::new(config), name)
            .map_err(|e| NbdError::Tls(e.to_string()))?;
        let mut stream = rustls::StreamOwned::new(conn, self.s);
        // Drive the handshake now, so a refused certificate fails here, named as TLS.
        while stream.conn.is_handshaking() {
            stream
                .conn
                .complete_io(&mut stream.sock)
                .map_err(|e| NbdError::Tls(format!("handshake: {e}")))?;
        }
        self.s = Box::new(stream);
        Ok(self)
    }

    /// `NBD_OPT_GO` for `export`: records its size and transmission flags.
    fn go(&mut self, export: &str) -> Result<(), NbdError> {
        let mut data = (export.len() as u32).to_be_bytes().to_vec();
        data.extend_from_slice(export.as_bytes());
        data.extend_from_slice(&0u16.to_be_bytes());
        self.send_option(proto::opt::GO, &data)?;
        loop {
            let (ty, d) = self.option_reply()?;
            match ty {
                proto::rep::ACK => break,
                proto::rep::INFO
                    if d.len() >= 12 && d[..2] == proto::info::EXPORT.to_be_bytes() =>
                {
                    let mut sz = [0u8; 8];
                    sz.copy_from_slice(&d[2..10]);
                    self.size = u64::from_be_bytes(sz);
                    self.flags = u16::from_be_bytes([d[10], d[11]]);
                }
                proto::rep::INFO => {}
                proto::rep::ERR_UNKNOWN => return Err(NbdError::UnknownExport(export.to_owned())),
                proto::rep::ERR_POLICY | proto::rep::ERR_TLS_REQD => {
                    return Err(NbdError::Refused {
                        export: export.to_owned(),
                        message: String::from_utf8_lossy(&d).into_owned(),
                    });
                }
                t if t & 0x8000_0000 != 0 => {
                    return Err(NbdError::Protocol(format!(
                        "export {export:?} refused (reply {t:#x}: {})",
                        String::from_utf8_lossy(&d)
                    )));
                }
                t => {
                    return Err(NbdError::Protocol(format!(
                        "unexpected option reply {t:#x}"
                    )));
                }
            }
        }
        if self.size == 0 && self.flags == 0 {
            return Err(NbdError::Protocol("no export information".into()));
        }
        Ok(())
    }

    fn request(
        &mut self,
        command: u16,
        offset: u64,
        len: u32,
        data: &[u8],
    ) -> Result<(), NbdError> {
        self.cookie += 1;
        let req = proto::Request {
            flags: 0,
            command,
            cookie: self.cookie,
            offset,
            length: len,
        };
        let mut b = proto::encode_request(&req).to_vec();
        b.extend_from_slice(data);
        self.s.write_all(&b).map_err(io_err("send request"))
    }

    fn reply(&mut self, buf: &mut [u8]) -> Result<(), NbdError> {
        let mut h = [0u8; 16];
        self.s.read_exact(&mut h).map_err(io_err("read reply"))?;
        if h[..4] != proto::SIMPLE_REPLY_MAGIC.to_be_bytes() {
            return Err(NbdError::Protocol("bad reply magic".into()));
        }
        if h[8..16] != self.cookie.to_be_bytes() {
            return Err(NbdError::Protocol("reply to another request".into()));
        }
        let errno = u32::from_be_bytes([h[4], h[5], h[6], h[7]]);
        if errno != 0 {
            return Err(NbdError::Errno(errno));
        }
        self.s.read_exact(buf).map_err(io_err("read data"))
    }

    /// Reads `buf.len()` bytes at `offset`.
    pub fn read(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), NbdError> {
        for (i, chunk) in buf.chunks_mut(MAX_IO).enumerate() {
            let off = offset + (i * MAX_IO) as u64;
            self.request(proto::cmd::READ, off, chunk.len() as u32, &[])?;
            self.reply(chunk)?;
        }
        Ok(())
    }

    /// Writes `data` at `offset`.
    pub fn write(&mut self, offset: u64, data: &[u8]) -> Result<(), NbdError> {
        for (i, chunk) in data.chunks(MAX_IO).enumerate() {
            let off = offset + (i * MAX_IO) as u64;
            self.request(proto::cmd::WRITE, off, chunk.len() as u32, chunk)?;
            self.reply(&mut [])?;
        }
        Ok(())
    }

    /// Makes every acknowledged write durable.
    pub fn flush(&mut self) -> Result<(), NbdError> {
        self.request(proto::cmd::FLUSH, 0, 0, &[])?;
        self.reply(&mut [])
    }

    /// The negotiated plain socket (None over TLS), for the kernel's NBD driver.
    pub fn socket(&self) -> Option<BorrowedFd<'_>> {
        use std::os::fd::AsFd;
        self.sock.as_ref().map(|s| s.as_fd())
    }

    /// Ends the session politely.
    pub fn disconnect(mut self) {
        let _ = self.request(proto::cmd::DISC, 0, 0, &[]);
    }
}

/// Largest single request this client sends.
const MAX_IO: usize = 1 << 20;
