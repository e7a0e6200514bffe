//! The option-haggling state machine of the fixed newstyle handshake, with no I/O.
//!
//! `server.rs` reads one option at a time and hands it to [`Negotiator::option`], which appends
//! the reply bytes and says whether to go on, close, or enter transmission. Keeping it pure lets
//! the property test below drive it with arbitrary option streams.

use crate::proto::{self, ProtoError, info, opt, rep, tflags};
use crate::tls::ClientCert;

/// What a connection may learn about an export during the handshake.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportInfo {
    /// Export name (volume name, or `volume@snapshot`).
    pub name: String,
    /// Size in bytes.
    pub size: u64,
    /// Snapshots are read-only.
    pub read_only: bool,
    /// Network clients (DNS names their certificates prove) allowed to open it; empty: any.
    pub clients: Vec<String>,
}

impl ExportInfo {
    /// Transmission flags for this export; `structured` if structured replies were
    /// negotiated (proto.md: `SEND_DF` MUST be clear otherwise).
    pub fn transmission_flags(&self, structured: bool) -> u16 {
        use tflags::*;
        // FUA is accepted on every command (ignored where nothing is written), so it is
        // advertised on read-only exports too.
        let mut flags = HAS_FLAGS | SEND_FLUSH | SEND_FUA | SEND_CACHE;
        if structured {
            flags |= SEND_DF;
        }
        // Every connection to an export shares one store and FLUSH syncs the whole volume, so
        // multi-conn's consistency rule (a flush covers writes completed on any connection)
        // holds.
        flags |= CAN_MULTI_CONN;
        if self.read_only {
            flags |= READ_ONLY;
        } else {
            flags |= SEND_TRIM | SEND_WRITE_ZEROES | SEND_FAST_ZERO;
        }
        flags
    }
}

/// Where the handshake looks up exports.
pub trait ExportCatalog {
    /// The export with this name, if any.
    fn lookup(&self, name: &str) -> Option<ExportInfo>;
    /// Every export, for `NBD_OPT_LIST`.
    fn list(&self) -> Vec<ExportInfo>;
}

/// What the server does after an option.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Write the replies and read the next option.
    Continue,
    /// Write the replies, then close the connection.
    Close,
    /// Write the replies, then serve this export.
    Transmission(ExportInfo),
    /// Write the replies (an ACK), then start TLS and call [`Negotiator::tls_started`].
    StartTls,
}

/// Who the client is, as far as its connection proves it.
#[derive(Debug, Clone, Default)]
pub enum Peer {
    /// A local (Unix socket) client, trusted by the socket file's permissions.
    #[default]
    Local,
    /// A TCP client, with the certificate it proved over TLS, if any.
    Network(Option<ClientCert>),
}

/// Negotiation state of one connection.
#[derive(Debug, Default)]
pub struct Negotiator {
    /// Client asked to omit the 124 zero bytes.
    pub no_zeroes: bool,
    /// Structured replies negotiated.
    pub structured: bool,
    /// Export for which `base:allocation` was selected, if any.
    meta_export: Option<String>,
    peer: Peer,
    /// FORCEDTLS (proto.md): every option but STARTTLS and ABORT waits for TLS.
    tls_required: bool,
    tls_active: bool,
}

impl Negotiator {
    /// A fresh negotiation; `no_zeroes` comes from the client flags.
    pub fn new(no_zeroes: bool) -> Self {
        Self {
            no_zeroes,
            ..Self::default()
        }
    }

    /// A negotiation with a TCP client; `tls_required` when the server has TLS configured.
    pub fn network(no_zeroes: bool, tls_required: bool) -> Self {
        Self {
            no_zeroes,
            peer: Peer::Network(None),
            tls_required,
            ..Self::default()
        }
    }

    /// Whether the session runs over TLS.
    pub fn tls_active(&self) -> bool {
        self.tls_active
    }

    /// TLS is up (after [`Step::StartTls`]); `client` is the certificate it verified.
    pub fn tls_started(&mut self, client: Option<ClientCert>) {
        self.tls_active = true;
        self.peer = Peer::Network(client);
        // Nothing negotiated in the clear carries over into the TLS session.
        self.structured = false;
        self.meta_export = None;
    }

    /// Whether this client may open `export`: local clients always; network clients if the
    /// export has no allow-list or their certificate is valid for a name on it.
    fn allowed(&self, export: &ExportInfo) -> bool {
        match &self.peer {
            Peer::Local => true,
            Peer::Network(cert) => {
                export.clients.is_empty()
                    || cert
                        .as_ref()
                        .is_some_and(|c| export.clients.iter().any(|n| c.is(n)))
            }
        }
    }

    /// The export named `name` if this client may open it, else the error reply to send.
    fn find(
        &self,
        catalog: &dyn ExportCatalog,
        name: &str,
    ) -> Result<ExportInfo, (u32, &'static str)> {
        let export = catalog
            .lookup(name)
            .ok_or((rep::ERR_UNKNOWN, "no such export"))?;
        if self.allowed(&export) {
            Ok(export)
        } else {
            Err((
                rep::ERR_POLICY,
                "this client is not authorised for the export",
            ))
        }
    }

    /// Whether `base:allocation` is active for `export` (valid after [`Step::Transmission`]).
    pub fn base_allocation(&self, export: &str) -> bool {
        self.structured && self.meta_export.as_deref() == Some(export)
    }

    /// Handles one option; replies are appended to `out`.
    pub fn option(
        &mut self,
        option: u32,
        data: &[u8],
        catalog: &dyn ExportCatalog,
        out: &mut Vec<u8>,
    ) -> Step {
        if self.tls_required && !self.tls_active {
            match option {
                opt::STARTTLS if data.is_empty() => {
                    proto::put_option_reply(out, option, rep::ACK, &[]);
                    return Step::StartTls;
                }
                opt::STARTTLS => {
                    return error(out, option, rep::ERR_INVALID, "payload not allowed");
                }
                opt::ABORT => {}
                // It has no error reply (proto.md FORCEDTLS: terminate the session).
                opt::EXPORT_NAME => return Step::Close,
                _ => return error(out, option, rep::ERR_TLS_REQD, "start TLS first"),
            }
        }
        match option {
            opt::STARTTLS if self.tls_active => {
                error(out, option, rep::ERR_INVALID, "TLS already started")
            }
            opt::EXPORT_NAME => {
                let Ok(name) = proto::Cursor::new(data).string(data.len()) else {
                    return Step::Close;
                };
                // No error reply exists for EXPORT_NAME: an unknown or forbidden export ends
                // the session.
                let Ok(export) = self.find(catalog, &name) else {
                    return Step::Close;
                };
                out.extend_from_slice(&export.size.to_be_bytes());
                out.extend_from_slice(&export.transmission_flags(self.structured).to_be_bytes());
                if !self.no_zeroes {
                    out.extend_from_slice(&[0u8; 124]);
                }
                Step::Transmission(export)
            }
            opt::ABORT => {
                proto::put_option_reply(out, option, rep::ACK, &[]);
                Step::Close
            }
            opt::LIST => {
                if !data.is_empty() {
                    return error(out, option, rep::ERR_INVALID, "LIST takes no payload");
                }
                for export in catalog.list().into_iter().filter(|e| self.allowed(e)) {
                    let mut item = Vec::with_capacity(4 + export.name.len());
                    item.extend_from_slice(&(export.name.len() as u32).to_be_bytes());
                    item.extend_from_slice(export.name.as_bytes());
                    proto::put_option_reply(out, option, rep::SERVER, &item);
                }
                proto::put_option_reply(out, option, rep::ACK, &[]);
                Step::Continue
            }
            opt::INFO | opt::GO => self.info(option, data, catalog, out),
            opt::STRUCTURED_REPLY => {
                if !data.is_empty() {
                    return error(out, option, rep::ERR_INVALID, "payload not allowed");
                }
                if self.structured {
                    return error(out, option, rep::ERR_INVALID, "already negotiated");
                }
                self.structured = true;
                proto::put_option_reply(out, option, rep::ACK, &[]);
                Step::Continue
            }
            opt::LIST_META_CONTEXT | opt::SET_META_CONTEXT => self.meta(option, data, catalog, out),
            _ => error(out, option, rep::ERR_UNSUP, "option not supported"),
        }
    }

    /// Handles an option whose payload was too long to process (the caller skips the
    /// payload unless this says to close).
    pub fn too_big(&mut self, option: u32, length: u32, out: &mut Vec<u8>) -> Step {
        if option == opt::EXPORT_NAME {
            // No error reply exists for EXPORT_NAME, and no export name is that long.
            return Step::Close;
        }
        let message = format!(
            "option payload of {length} bytes is longer than {} bytes",
            proto::MAX_OPTION_LEN
        );
        error(out, option, rep::ERR_TOO_BIG, &message)
    }

    fn info(
        &mut self,
        option: u32,
        data: &[u8],
        catalog: &dyn ExportCatalog,
        out: &mut Vec<u8>,
    ) -> Step {
        let req = match proto::parse_info_request(data) {
            Ok(req) => req,
            Err(e) => return bad_payload(out, option, &e),
        };
        let export = match self.find(catalog, &req.name) {
            Ok(e) => e,
            Err((kind, message)) => return error(out, option, kind, message),
        };
        let mut item = Vec::with_capacity(12);
        item.extend_from_slice(&info::EXPORT.to_be_bytes());
        item.extend_from_slice(&export.size.to_be_bytes());
        item.extend_from_slice(&export.transmission_flags(self.structured).to_be_bytes());
        proto::put_option_reply(out, option, rep::INFO, &item);
        if req.requests.contains(&info::NAME) {
            let mut item = info::NAME.to_be_bytes().to_vec();
            item.extend_from_slice(export.name.as_bytes());
            proto::put_option_reply(out, option, rep::INFO, &item);
        }
        // Block sizes are always sent: clients that did not ask may ignore them.
        let mut item = info::BLOCK_SIZE.to_be_bytes().to_vec();
        item.extend_from_slice(&1u32.to_be_bytes());
        item.extend_from_slice(&proto::PREFERRED_BLOCK.to_be_bytes());
        item.extend_from_slice(&proto::MAX_PAYLOAD.to_be_bytes());
        proto::put_option_reply(out, option, rep::INFO, &item);
        proto::put_option_reply(out, option, rep::ACK, &[]);
        if option == opt::GO {
            if self.meta_export.as_deref() != Some(export.name.as_str()) {
                // Contexts selected for another export do not carry over (proto.md).
                self.meta_export = None;
            }
            Step::Transmission(export)
        } else {
            Step::Continue
        }
    }

    fn meta(
        &mut self,
        option: u32,
        data: &[u8],
        catalog: &dyn ExportCatalog,
        out: &mut Vec<u8>,
    ) -> Step {
        if !self.structured {
            return error(
                out,
                option,
                rep::ERR_INVALID,
                "structured replies not negotiated",
            );
        }
        let req = match proto::parse_meta_request(data) {
            Ok(req) => req,
            Err(e) => return bad_payload(out, option, &e),
        };
        if let Err((kind, message)) = self.find(catalog, &req.name) {
            return error(out, option, kind, message);
        }
        let set = option == opt::SET_META_CONTEXT;
        let matched = if set {
            req.queries.iter().any(|q| q == proto::BASE_ALLOCATION)
        } else {
            req.queries.is_empty()
                || req
                    .queries
                    .iter()
                    .any(|q| q == proto::BASE_ALLOCATION || q == "base:")
        };
        if matched {
            let mut item = proto::BASE_ALLOCATION_ID.to_be_bytes().to_vec();
            item.extend_from_slice(proto::BASE_ALLOCATION.as_bytes());
            proto::put_option_reply(out, option, rep::META_CONTEXT, &item);
        }
        if set {
            self.meta_export = matched.then_some(req.name);
        }
        proto::put_option_reply(out, option, rep::ACK, &[]);
        Step::Continue
    }
}

fn error(out: &mut Vec<u8>, option: u32, kind: u32, message: &str) -> Step {
    proto::put_option_reply(out, option, kind, message.as_bytes());
    Step::Continue
}

fn bad_payload(out: &mut Vec<u8>, option: u32, e: &ProtoError) -> Step {
    error(out, option, rep::ERR_INVALID, &e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    struct One;
    impl ExportCatalog for One {
        fn lookup(&self, name: &str) -> Option<ExportInfo> {
            (name == "vol").then(|| ExportInfo {
                name: "vol".into(),
                size: 1 << 20,
                read_only: false,
                clients: Vec::new(),
            })
        }
        fn list(&self) -> Vec<ExportInfo> {
            self.lookup("vol").into_iter().collect()
        }
    }

    fn go_payload(name: &str) -> Vec<u8> {
        let mut d = (name.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(name.as_bytes());
        d.extend_from_slice(&0u16.to_be_bytes());
        d
    }

    /// Splits an option-reply stream into (option, type, payload) triples.
    fn replies(mut buf: &[u8]) -> Vec<(u32, u32, Vec<u8>)> {
        let mut out = Vec::new();
        while !buf.is_empty() {
            let mut c = proto::Cursor::new(buf);
            assert_eq!(c.u64(), Ok(proto::OPT_REPLY_MAGIC));
            let (o, t, l) = (
                c.u32().expect("opt"),
                c.u32().expect("type"),
                c.u32().expect("len"),
            );
            out.push((o, t, buf[20..20 + l as usize].to_vec()));
            buf = &buf[20 + l as usize..];
        }
        out
    }

    #[test]
    fn unknown_option_is_unsup_and_session_continues() {
        let mut n = Negotiator::new(true);
        let mut out = Vec::new();
        assert_eq!(n.option(4242, b"xyz", &One, &mut out), Step::Continue);
        assert_eq!(replies(&out)[0].1, rep::ERR_UNSUP);
        out.clear();
        assert!(matches!(
            n.option(opt::GO, &go_payload("vol"), &One, &mut out),
            Step::Transmission(_)
        ));
        let r = replies(&out);
        assert_eq!(r.last().map(|x| x.1), Some(rep::ACK));
        assert_eq!(r[0].2[..2], info::EXPORT.to_be_bytes());
    }

    #[test]
    fn df_is_advertised_only_with_structured_replies() {
        let flags = |structured: bool| {
            let mut n = Negotiator::new(true);
            let mut out = Vec::new();
            if structured {
                n.option(opt::STRUCTURED_REPLY, &[], &One, &mut out);
                out.clear();
            }
            n.option(opt::GO, &go_payload("vol"), &One, &mut out);
            let r = replies(&out);
            u16::from_be_bytes([r[0].2[10], r[0].2[11]])
        };
        assert_eq!(flags(false) & tflags::SEND_DF, 0);
        assert_ne!(flags(true) & tflags::SEND_DF, 0);
    }

    #[test]
    fn go_unknown_export_is_err_unknown() {
        let mut out = Vec::new();
        let step = Negotiator::new(true).option(opt::GO, &go_payload("nope"), &One, &mut out);
        assert_eq!(step, Step::Continue);
        assert_eq!(replies(&out)[0].1, rep::ERR_UNKNOWN);
    }

    #[test]
    fn meta_context_needs_structured_and_selects_base_allocation() {
        let mut n = Negotiator::new(true);
        let mut q = 3u32.to_be_bytes().to_vec();
        q.extend_from_slice(b"vol");
        q.extend_from_slice(&1u32.to_be_bytes());
        q.extend_from_slice(&15u32.to_be_bytes());
        q.extend_from_slice(b"base:allocation");
        let mut out = Vec::new();
        n.option(opt::SET_META_CONTEXT, &q, &One, &mut out);
        assert_eq!(replies(&out)[0].1, rep::ERR_INVALID);
        out.clear();
        n.option(opt::STRUCTURED_REPLY, &[], &One, &mut out);
        out.clear();
        n.option(opt::SET_META_CONTEXT, &q, &One, &mut out);
        let r = replies(&out);
        assert_eq!(r[0].1, rep::META_CONTEXT);
        assert_eq!(r[1].1, rep::ACK);
        assert!(n.base_allocation("vol"));
    }

    #[test]
    fn too_big_option_is_err_too_big_and_session_continues() {
        let mut n = Negotiator::new(true);
        let mut out = Vec::new();
        let step = n.too_big(opt::INFO, proto::MAX_OPTION_LEN + 1, &mut out);
        assert_eq!(step, Step::Continue);
        let r = replies(&out);
        assert_eq!((r[0].0, r[0].1), (opt::INFO, rep::ERR_TOO_BIG));
        out.clear();
        let step = n.too_big(opt::EXPORT_NAME, 1 << 20, &mut out);
        assert_eq!(step, Step::Close);
        assert!(out.is_empty());
    }

    /// "vol" open to anyone, "sec" only to `host-a.example`.
    struct Two;
    impl ExportCatalog for Two {
        fn lookup(&self, name: &str) -> Option<ExportInfo> {
            let clients = match name {
                "vol" => Vec::new(),
                "sec" => vec!["host-a.example".to_owned()],
                _ => return None,
            };
            Some(ExportInfo {
                name: name.into(),
                size: 1 << 20,
                read_only: false,
                clients,
            })
        }
        fn list(&self) -> Vec<ExportInfo> {
            ["sec", "vol"]
                .iter()
                .filter_map(|n| self.lookup(n))
                .collect()
        }
    }

    fn cert_for(name: &str) -> ClientCert {
        let key = rcgen::KeyPair::generate().expect("key");
        let cert = rcgen::CertificateParams::new(vec![name.to_owned()])
            .expect("params")
            .self_signed(&key)
            .expect("cert");
        ClientCert::from(cert.der().clone())
    }

    fn listed(n: &mut Negotiator) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        n.option(opt::LIST, &[], &Two, &mut out);
        replies(&out)
            .into_iter()
            .filter(|r| r.1 == rep::SERVER)
            .map(|r| r.2[4..].to_vec())
            .collect()
    }

    #[test]
    fn forced_tls_refuses_everything_but_starttls_and_abort() {
        let mut n = Negotiator::network(true, true);
        let mut out = Vec::new();
        for option in [opt::LIST, opt::GO, opt::INFO, opt::STRUCTURED_REPLY] {
            out.clear();
            assert_eq!(
                n.option(option, &go_payload("vol"), &Two, &mut out),
                Step::Continue
            );
            assert_eq!(replies(&out)[0].1, rep::ERR_TLS_REQD, "option {option}");
        }
        assert_eq!(
            n.option(opt::EXPORT_NAME, b"vol", &Two, &mut out),
            Step::Close
        );
        out.clear();
        assert_eq!(n.option(opt::STARTTLS, &[], &Two, &mut out), Step::StartTls);
        assert_eq!(replies(&out)[0].1, rep::ACK);
        n.tls_started(Some(cert_for("host-b.example")));
        out.clear();
        n.option(opt::STARTTLS, &[], &Two, &mut out);
        assert_eq!(replies(&out)[0].1, rep::ERR_INVALID, "TLS started twice");
        out.clear();
        assert!(matches!(
            n.option(opt::GO, &go_payload("vol"), &Two, &mut out),
            Step::Transmission(_)
        ));
        // Without TLS configured, STARTTLS is not supported.
        out.clear();
        Negotiator::network(true, false).option(opt::STARTTLS, &[], &Two, &mut out);
        assert_eq!(replies(&out)[0].1, rep::ERR_UNSUP);
    }

    #[test]
    fn allow_lists_admit_only_the_named_clients() {
        let go = |n: &mut Negotiator, name: &str| {
            let mut out = Vec::new();
            let step = n.option(opt::GO, &go_payload(name), &Two, &mut out);
            (step, replies(&out).first().map(|r| r.1))
        };
        // A network client without a certificate, or with another name: refused, and the
        // export is not listed.
        for cert in [None, Some(cert_for("host-b.example"))] {
            let mut n = Negotiator::network(true, false);
            n.tls_started(cert);
            assert_eq!(go(&mut n, "sec"), (Step::Continue, Some(rep::ERR_POLICY)));
            assert_eq!(listed(&mut n), [b"vol".to_vec()]);
            let mut out = Vec::new();
            assert_eq!(
                n.option(opt::EXPORT_NAME, b"sec", &Two, &mut out),
                Step::Close
            );
        }
        // The named client, and any local client, may open it.
        let mut n = Negotiator::network(true, true);
        n.tls_started(Some(cert_for("host-a.example")));
        assert_eq!(listed(&mut n), [b"sec".to_vec(), b"vol".to_vec()]);
        assert!(matches!(go(&mut n, "sec").0, Step::Transmission(_)));
        assert!(matches!(
            go(&mut Negotiator::new(true), "sec").0,
            Step::Transmission(_)
        ));
    }

    #[test]
    fn export_name_unknown_closes() {
        let mut out = Vec::new();
        assert_eq!(
            Negotiator::new(false).option(opt::EXPORT_NAME, b"nope", &One, &mut out),
            Step::Close
        );
        let step = Negotiator::new(false).option(opt::EXPORT_NAME, b"vol", &One, &mut out);
        assert!(matches!(step, Step::Transmission(_)));
        assert_eq!(out.len(), 8 + 2 + 124);
    }

    proptest! {
        /// Random option streams: every option gets a well-formed reply stream (or the
        /// EXPORT_NAME answer), and nothing panics.
        #[test]
        fn random_option_streams(stream in proptest::collection::vec(
            (0u32..14, proptest::collection::vec(any::<u8>(), 0..40)), 0..12)) {
            let mut n = Negotiator::new(true);
            for (option, data) in stream {
                let mut out = Vec::new();
                let step = n.option(option, &data, &One, &mut out);
                if option == opt::EXPORT_NAME {
                    prop_assert!(matches!(step, Step::Close | Step::Transmission(_)));
                    break;
                }
                let r = replies(&out);
                prop_assert!(!r.is_empty());
                prop_assert!(r.iter().all(|x| x.0 == option));
                let last = r.last().map(|x| x.1).unwrap_or_default();
                prop_assert!(last == rep::ACK || last & (1 << 31) != 0);
                if step != Step::Continue {
                    break;
                }
            }
        }

        /// Random bytes as whole handshake input: header parse then negotiation.
        #[test]
        fn random_handshake_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let mut n = Negotiator::new(false);
            let mut rest = &bytes[..];
            while rest.len() >= proto::OPTION_HEADER_LEN {
                let mut h = [0u8; proto::OPTION_HEADER_LEN];
                h.copy_from_slice(&rest[..proto::OPTION_HEADER_LEN]);
                rest = &rest[proto::OPTION_HEADER_LEN..];
                let Ok(hdr) = proto::parse_option_header(&h) else { break };
                if hdr.too_big() {
                    // The payload would be skipped; these bytes cannot hold it all.
                    let mut out = Vec::new();
                    n.too_big(hdr.option, hdr.length, &mut out);
                    break;
                }
                let len = (hdr.length as usize).min(rest.len());
                let mut out = Vec::new();
                let step = n.option(hdr.option, &rest[..len], &One, &mut out);
                rest = &rest[len..];
                if step != Step::Continue { break; }
            }
        }
    }
}
