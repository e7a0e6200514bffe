//! The kernel NBD attach path: after the userspace client negotiated the export, its socket is
//! handed to the kernel's NBD driver over generic netlink (family `nbd`, `NBD_CMD_CONNECT` with
//! the size, block size, transmission flags and the socket), which then serves `/dev/nbdN`
//! itself (linux/nbd-netlink.h). Used where the node has the driver ([`available`]); otherwise
//! the attach process serves the export through FUSE and a loop device.
//!
//! The netlink transport is a seam ([`Genl`]): the messages are built and parsed here and unit
//! tested against a scripted transport, and the real one is a `NETLINK_GENERIC` socket.

use std::io;
use std::path::Path;

/// Generic netlink controller family and its commands and attributes (linux/genetlink.h).
const GENL_ID_CTRL: u16 = 0x10;
const CTRL_CMD_GETFAMILY: u8 = 3;
const CTRL_ATTR_FAMILY_ID: u16 = 1;
const CTRL_ATTR_FAMILY_NAME: u16 = 2;

/// The NBD family (linux/nbd-netlink.h).
pub const NBD_FAMILY: &str = "nbd";
const NBD_GENL_VERSION: u8 = 1;
const NBD_CMD_CONNECT: u8 = 1;
const NBD_CMD_DISCONNECT: u8 = 2;
const NBD_CMD_RECONFIGURE: u8 = 3;
const NBD_ATTR_INDEX: u16 = 1;
const NBD_ATTR_SIZE_BYTES: u16 = 2;
const NBD_ATTR_BLOCK_SIZE_BYTES: u16 = 3;
const NBD_ATTR_TIMEOUT: u16 = 4;
const NBD_ATTR_SERVER_FLAGS: u16 = 5;
const NBD_ATTR_SOCKETS: u16 = 7;
const NBD_SOCK_ITEM: u16 = 1;
const NBD_SOCK_FD: u16 = 1;
const NLA_F_NESTED: u16 = 1 << 15;

const NLMSG_ERROR: u16 = 2;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_ACK: u16 = 4;
const NLMSG_HDRLEN: usize = 16;
const GENL_HDRLEN: usize = 4;

/// Block size the devices are configured with.
pub const BLOCK_SIZE: u64 = 4096;
/// Seconds a request may take before the kernel fails it.
pub const TIMEOUT_SECS: u64 = 120;

/// A kernel NBD failure.
#[derive(Debug, thiserror::Error)]
pub enum KernelNbdError {
    /// The netlink socket failed.
    #[error("generic netlink {what}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The kernel refused a request.
    #[error("{what}: kernel answered {}", io::Error::from_raw_os_error(*.errno))]
    Kernel {
        /// The request.
        what: &'static str,
        /// Its errno.
        errno: i32,
    },
    /// The kernel has no NBD driver (no generic netlink family `nbd`).
    #[error("the kernel has no NBD driver (no generic netlink family {NBD_FAMILY:?})")]
    NoDriver,
    /// A reply outside the protocol.
    #[error("generic netlink reply: {0}")]
    Malformed(String),
}

/// Whether this node can use kernel NBD: the driver is loaded (`/sys/module/nbd`) and has
/// devices (`/dev/nbd0`). `root` is `/` on a node; tests pass a prepared tree.
pub fn available(root: &Path) -> bool {
    root.join("sys/module/nbd").is_dir() && root.join("dev/nbd0").exists()
}

/// The transport: one request out, every message of its answer back (up to the ACK or error).
pub trait Genl {
    /// Sends `msg` and returns the reply datagram.
    fn transact(&mut self, msg: &[u8]) -> io::Result<Vec<u8>>;
}

/// The real transport: a `NETLINK_GENERIC` socket.
#[derive(Debug)]
pub struct NetlinkGenl(netlink_sys::Socket);

impl NetlinkGenl {
    /// Opens and binds a generic netlink socket.
    pub fn open() -> Result<Self, KernelNbdError> {
        let io = |what| move |source| KernelNbdError::Io { what, source };
        let mut s = netlink_sys::Socket::new(netlink_sys::protocols::NETLINK_GENERIC)
            .map_err(io("socket"))?;
        s.bind_auto().map_err(io("bind"))?;
        Ok(Self(s))
    }
}

impl Genl for NetlinkGenl {
    fn transact(&mut self, msg: &[u8]) -> io::Result<Vec<u8>> {
        self.0.send(msg, 0)?;
        self.0.recv_from_full().map(|(b, _)| b)
    }
}

/// One netlink attribute (type and payload), nested ones built from their children.
fn attr(out: &mut Vec<u8>, ty: u16, payload: &[u8]) {
    let len = 4 + payload.len();
    out.extend_from_slice(&(len as u16).to_ne_bytes());
    out.extend_from_slice(&ty.to_ne_bytes());
    out.extend_from_slice(payload);
    out.resize(out.len() + (len.next_multiple_of(4) - len), 0);
}

/// A generic netlink request: header, genl header, attributes.
fn message(family: u16, cmd: u8, version: u8, seq: u32, attrs: &[u8]) -> Vec<u8> {
    let len = NLMSG_HDRLEN + GENL_HDRLEN + attrs.len();
    let mut m = Vec::with_capacity(len);
    m.extend_from_slice(&(len as u32).to_ne_bytes());
    m.extend_from_slice(&family.to_ne_bytes());
    m.extend_from_slice(&(NLM_F_REQUEST | NLM_F_ACK).to_ne_bytes());
    m.extend_from_slice(&seq.to_ne_bytes());
    m.extend_from_slice(&0u32.to_ne_bytes());
    m.extend_from_slice(&[cmd, version, 0, 0]);
    m.extend_from_slice(attrs);
    m
}

/// The attributes of a reply's messages, or the kernel's error.
fn parse_reply(what: &'static str, buf: &[u8]) -> Result<Vec<(u16, Vec<u8>)>, KernelNbdError> {
    let mut attrs = Vec::new();
    let mut rest = buf;
    while rest.len() >= NLMSG_HDRLEN {
        let len = u32::from_ne_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
        let ty = u16::from_ne_bytes([rest[4], rest[5]]);
        if len < NLMSG_HDRLEN || len > rest.len() {
            return Err(KernelNbdError::Malformed(format!("message length {len}")));
        }
        let body = &rest[NLMSG_HDRLEN..len];
        if ty == NLMSG_ERROR {
            let errno = body
                .get(..4)
                .map(|b| i32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
                .ok_or_else(|| KernelNbdError::Malformed("short error message".into()))?;
            if errno != 0 {
                return Err(KernelNbdError::Kernel {
                    what,
                    errno: -errno,
                });
            }
        } else if body.len() >= GENL_HDRLEN {
            let mut a = &body[GENL_HDRLEN..];
            while a.len() >= 4 {
                let alen = u16::from_ne_bytes([a[0], a[1]]) as usize;
                let aty = u16::from_ne_bytes([a[2], a[3]]) & !NLA_F_NESTED;
                if alen < 4 || alen > a.len() {
                    return Err(KernelNbdError::Malformed(format!(
                        "attribute length {alen}"
                    )));
                }
                attrs.push((aty, a[4..alen].to_vec()));
                a = &a[alen.next_multiple_of(4).min(a.len())..];
            }
        }
        rest = &rest[len.next_multiple_of(4).min(rest.len())..];
    }
    Ok(attrs)
}

/// What the kernel's NBD device is told about the export.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Export {
    /// Size in bytes.
    pub size: u64,
    /// Transmission flags from the handshake.
    pub flags: u16,
}

/// The kernel NBD driver, reached through `G`.
#[derive(Debug)]
pub struct KernelNbd<G> {
    genl: G,
    family: u16,
    seq: u32,
}

impl<G: Genl> KernelNbd<G> {
    /// Resolves the `nbd` family; [`KernelNbdError::NoDriver`] when the kernel has none.
    pub fn new(mut genl: G) -> Result<Self, KernelNbdError> {
        let mut name = NBD_FAMILY.as_bytes().to_vec();
        name.push(0);
        let mut a = Vec::new();
        attr(&mut a, CTRL_ATTR_FAMILY_NAME, &name);
        let reply = genl
            .transact(&message(GENL_ID_CTRL, CTRL_CMD_GETFAMILY, 1, 1, &a))
            .map_err(|source| KernelNbdError::Io {
                what: "resolve family",
                source,
            })?;
        let family = match parse_reply("resolve family nbd", &reply) {
            Err(KernelNbdError::Kernel { errno, .. }) if errno == libc::ENOENT => {
                return Err(KernelNbdError::NoDriver);
            }
            r => r?,
        }
        .into_iter()
        .find(|(t, v)| *t == CTRL_ATTR_FAMILY_ID && v.len() >= 2)
        .map(|(_, v)| u16::from_ne_bytes([v[0], v[1]]))
        .ok_or_else(|| KernelNbdError::Malformed("no family id".into()))?;
        Ok(Self {
            genl,
            family,
            seq: 1,
        })
    }

    fn request(
        &mut self,
        what: &'static str,
        cmd: u8,
        attrs: &[u8],
    ) -> Result<Vec<(u16, Vec<u8>)>, KernelNbdError> {
        self.seq += 1;
        let reply = self
            .genl
            .transact(&message(
                self.family,
                cmd,
                NBD_GENL_VERSION,
                self.seq,
                attrs,
            ))
            .map_err(|source| KernelNbdError::Io { what, source })?;
        parse_reply(what, &reply)
    }

    /// Gives the negotiated socket `fd` to a free NBD device; returns its index (`/dev/nbdN`).
    pub fn connect(&mut self, fd: i32, export: Export) -> Result<u32, KernelNbdError> {
        let mut a = Vec::new();
        attr(&mut a, NBD_ATTR_SIZE_BYTES, &export.size.to_ne_bytes());
        attr(&mut a, NBD_ATTR_BLOCK_SIZE_BYTES, &BLOCK_SIZE.to_ne_bytes());
        attr(&mut a, NBD_ATTR_TIMEOUT, &TIMEOUT_SECS.to_ne_bytes());
        attr(
            &mut a,
            NBD_ATTR_SERVER_FLAGS,
            &u64::from(export.flags).to_ne_bytes(),
        );
        let mut fd_attr = Vec::new();
        attr(&mut fd_attr, NBD_SOCK_FD, &(fd as u32).to_ne_bytes());
        let mut item = Vec::new();
        attr(&mut item, NBD_SOCK_ITEM | NLA_F_NESTED, &fd_attr);
        attr(&mut a, NBD_ATTR_SOCKETS | NLA_F_NESTED, &item);
        self.request("NBD_CMD_CONNECT", NBD_CMD_CONNECT, &a)?
            .into_iter()
            .find(|(t, v)| *t == NBD_ATTR_INDEX && v.len() >= 4)
            .map(|(_, v)| u32::from_ne_bytes([v[0], v[1], v[2], v[3]]))
            .ok_or_else(|| KernelNbdError::Malformed("NBD_CMD_CONNECT: no device index".into()))
    }

    /// Tells device `index` the export's new size (after the volume grew).
    pub fn resize(&mut self, index: u32, size: u64) -> Result<(), KernelNbdError> {
        let mut a = Vec::new();
        attr(&mut a, NBD_ATTR_INDEX, &index.to_ne_bytes());
        attr(&mut a, NBD_ATTR_SIZE_BYTES, &size.to_ne_bytes());
        self.request("NBD_CMD_RECONFIGURE", NBD_CMD_RECONFIGURE, &a)
            .map(drop)
    }

    /// Disconnects device `index`.
    pub fn disconnect(&mut self, index: u32) -> Result<(), KernelNbdError> {
        let mut a = Vec::new();
        attr(&mut a, NBD_ATTR_INDEX, &index.to_ne_bytes());
        self.request("NBD_CMD_DISCONNECT", NBD_CMD_DISCONNECT, &a)
            .map(drop)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A transport that records requests and answers from a script.
    struct Scripted {
        sent: Vec<Vec<u8>>,
        replies: Vec<Vec<u8>>,
    }

    impl Genl for &mut Scripted {
        fn transact(&mut self, msg: &[u8]) -> io::Result<Vec<u8>> {
            self.sent.push(msg.to_vec());
            Ok(self.replies.remove(0))
        }
    }

    fn reply(family: u16, attrs: &[(u16, &[u8])]) -> Vec<u8> {
        let mut a = Vec::new();
        for (t, v) in attrs {
            attr(&mut a, *t, v);
        }
        let mut m = message(family, 1, 1, 0, &a);
        m.extend(ack(0));
        m
    }

    fn ack(errno: i32) -> Vec<u8> {
        let mut m = Vec::new();
        m.extend_from_slice(&36u32.to_ne_bytes());
        m.extend_from_slice(&NLMSG_ERROR.to_ne_bytes());
        m.extend_from_slice(&[0; 10]);
        m.extend_from_slice(&(-errno).to_ne_bytes());
        m.extend_from_slice(&[0; 16]);
        m
    }

    /// The attributes of a request we sent, nested ones as raw payloads.
    fn sent_attrs(msg: &[u8]) -> Vec<(u16, Vec<u8>)> {
        let mut m = msg.to_vec();
        // Parse it as a reply (same layout).
        m[4..6].copy_from_slice(&0x20u16.to_ne_bytes());
        parse_reply("sent", &m).expect("parse")
    }

    #[test]
    fn connect_resolves_the_family_and_hands_over_the_socket() {
        let mut t = Scripted {
            sent: Vec::new(),
            replies: vec![
                reply(
                    GENL_ID_CTRL,
                    &[(CTRL_ATTR_FAMILY_ID, &0x1du16.to_ne_bytes())],
                ),
                reply(0x1d, &[(NBD_ATTR_INDEX, &3u32.to_ne_bytes())]),
                ack(0),
                ack(0),
            ],
        };
        let mut k = KernelNbd::new(&mut t).expect("family");
        let export = Export {
            size: 1 << 30,
            flags: 0x4d,
        };
        assert_eq!(k.connect(7, export).expect("connect"), 3);
        k.resize(3, 2 << 30).expect("resize");
        k.disconnect(3).expect("disconnect");

        let get = &t.sent[0];
        assert_eq!(u16::from_ne_bytes([get[4], get[5]]), GENL_ID_CTRL);
        assert_eq!(get[16], CTRL_CMD_GETFAMILY);
        assert_eq!(
            sent_attrs(get),
            vec![(CTRL_ATTR_FAMILY_NAME, b"nbd\0".to_vec())]
        );

        let conn = &t.sent[1];
        assert_eq!(
            u32::from_ne_bytes([conn[0], conn[1], conn[2], conn[3]]) as usize,
            conn.len()
        );
        assert_eq!(u16::from_ne_bytes([conn[4], conn[5]]), 0x1d);
        assert_eq!(
            u16::from_ne_bytes([conn[6], conn[7]]),
            NLM_F_REQUEST | NLM_F_ACK
        );
        assert_eq!((conn[16], conn[17]), (NBD_CMD_CONNECT, NBD_GENL_VERSION));
        let a = sent_attrs(conn);
        let get_attr = |ty| a.iter().find(|(t, _)| *t == ty).map(|(_, v)| v.clone());
        assert_eq!(
            get_attr(NBD_ATTR_SIZE_BYTES),
            Some((1u64 << 30).to_ne_bytes().to_vec())
        );
        assert_eq!(
            get_attr(NBD_ATTR_BLOCK_SIZE_BYTES),
            Some(4096u64.to_ne_bytes().to_vec())
        );
        assert_eq!(
            get_attr(NBD_ATTR_SERVER_FLAGS),
            Some(0x4du64.to_ne_bytes().to_vec())
        );
        // SOCKETS { ITEM { FD = 7 } }, both nested.
        let mut want = Vec::new();
        let mut fd = Vec::new();
        attr(&mut fd, NBD_SOCK_FD, &7u32.to_ne_bytes());
        attr(&mut want, NBD_SOCK_ITEM | NLA_F_NESTED, &fd);
        assert_eq!(get_attr(NBD_ATTR_SOCKETS), Some(want));
        let raw_type = u16::from_ne_bytes([conn[conn.len() - 14], conn[conn.len() - 13]]);
        assert_eq!(raw_type, NBD_ATTR_SOCKETS | NLA_F_NESTED);

        let re = sent_attrs(&t.sent[2]);
        assert_eq!(t.sent[2][16], NBD_CMD_RECONFIGURE);
        assert!(re.contains(&(NBD_ATTR_INDEX, 3u32.to_ne_bytes().to_vec())));
        assert!(re.contains(&(NBD_ATTR_SIZE_BYTES, (2u64 << 30).to_ne_bytes().to_vec())));
        assert_eq!(t.sent[3][16], NBD_CMD_DISCONNECT);
    }

    #[test]
    fn missing_driver_and_kernel_errors_are_named() {
        let mut t = Scripted {
            sent: Vec::new(),
            replies: vec![ack(libc::ENOENT)],
        };
        assert!(matches!(
            KernelNbd::new(&mut t),
            Err(KernelNbdError::NoDriver)
        ));
        let mut t = Scripted {
            sent: Vec::new(),
            replies: vec![
                reply(
                    GENL_ID_CTRL,
                    &[(CTRL_ATTR_FAMILY_ID, &0x1du16.to_ne_bytes())],
                ),
                ack(libc::EBUSY),
            ],
        };
        let mut k = KernelNbd::new(&mut t).expect("family");
        let e = k
            .connect(7, Export { size: 1, flags: 0 })
            .expect_err("busy");
        assert!(
            matches!(e, KernelNbdError::Kernel { errno, .. } if errno == libc::EBUSY),
            "{e}"
        );
        assert!(
            e.to_string()
                .starts_with("NBD_CMD_CONNECT: kernel answered"),
            "{e}"
        );
    }

    #[test]
    fn availability_needs_the_module_and_a_device() {
        let root = std::env::temp_dir().join(format!("slipway-knbd-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(root.join("sys/module/nbd")).expect("mkdir");
        std::fs::create_dir_all(root.join("dev")).expect("mkdir");
        assert!(!available(&root));
        std::fs::write(root.join("dev/nbd0"), b"").expect("touch");
        assert!(available(&root));
        let _ = std::fs::remove_dir_all(&root);
    }

    /// The real socket against this kernel: the controller answers, and a kernel without the
    /// NBD driver (this machine) is reported as such.
    #[test]
    fn the_real_kernel_answers_family_lookups() {
        match KernelNbd::new(NetlinkGenl::open().expect("netlink socket")) {
            Ok(k) => assert!(available(Path::new("/")) || k.family != 0),
            Err(e) => assert!(matches!(e, KernelNbdError::NoDriver), "{e}"),
        }
    }
}
