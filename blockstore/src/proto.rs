//! The NBD wire format: constants, checked parsers and encoders, with no I/O (proto.md).
//!
//! Everything a peer sends goes through a `parse_*` function here that returns a typed error
//! instead of panicking; `server.rs` only moves bytes. The property tests in this module and in
//! `negotiate.rs` feed random byte streams through these parsers.

use thiserror::Error;

/// `NBDMAGIC`, the first 8 bytes the server sends.
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`, sent by the server after `NBDMAGIC` and by the client before every option.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Magic of every option reply (fixed newstyle).
pub const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Magic of a transmission request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Magic of a simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Magic of a structured reply chunk.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

/// Handshake flags sent by the server.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1;
/// Handshake flag: the client may ask to skip the 124 zero bytes after `NBD_OPT_EXPORT_NAME`.
pub const FLAG_NO_ZEROES: u16 = 2;
/// Client flag: the client speaks fixed newstyle.
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1;
/// Client flag: omit the 124 zero bytes.
pub const FLAG_C_NO_ZEROES: u32 = 2;

/// Transmission flags (16 bits, sent with the export size).
pub mod tflags {
    /// Always set.
    pub const HAS_FLAGS: u16 = 1 << 0;
    /// The export is read-only.
    pub const READ_ONLY: u16 = 1 << 1;
    /// `NBD_CMD_FLUSH` is supported.
    pub const SEND_FLUSH: u16 = 1 << 2;
    /// `NBD_CMD_FLAG_FUA` is supported.
    pub const SEND_FUA: u16 = 1 << 3;
    /// `NBD_CMD_TRIM` is supported.
    pub const SEND_TRIM: u16 = 1 << 5;
    /// `NBD_CMD_WRITE_ZEROES` is supported.
    pub const SEND_WRITE_ZEROES: u16 = 1 << 6;
    /// `NBD_CMD_FLAG_DF` is supported.
    pub const SEND_DF: u16 = 1 << 7;
    /// Several connections to this export see one consistent, flush-coherent device.
    pub const CAN_MULTI_CONN: u16 = 1 << 8;
    /// `NBD_CMD_CACHE` is supported.
    pub const SEND_CACHE: u16 = 1 << 10;
    /// `NBD_CMD_FLAG_FAST_ZERO` is supported.
    pub const SEND_FAST_ZERO: u16 = 1 << 11;
}

/// Option numbers (`NBD_OPT_*`).
pub mod opt {
    /// Select an export and enter transmission (no error reply possible).
    pub const EXPORT_NAME: u32 = 1;
    /// Soft disconnect.
    pub const ABORT: u32 = 2;
    /// List exports.
    pub const LIST: u32 = 3;
    /// TLS upgrade.
    pub const STARTTLS: u32 = 5;
    /// Describe an export.
    pub const INFO: u32 = 6;
    /// Describe an export and enter transmission.
    pub const GO: u32 = 7;
    /// Use structured replies.
    pub const STRUCTURED_REPLY: u32 = 8;
    /// List metadata contexts.
    pub const LIST_META_CONTEXT: u32 = 9;
    /// Select metadata contexts.
    pub const SET_META_CONTEXT: u32 = 10;
    /// 64-bit headers (not supported: answered with `ERR_UNSUP`).
    pub const EXTENDED_HEADERS: u32 = 11;
}

/// Option reply types (`NBD_REP_*`).
pub mod rep {
    /// Final successful reply.
    pub const ACK: u32 = 1;
    /// One export in a `LIST` answer.
    pub const SERVER: u32 = 2;
    /// One `NBD_INFO_*` item.
    pub const INFO: u32 = 3;
    /// One metadata context.
    pub const META_CONTEXT: u32 = 4;
    const ERR: u32 = 1 << 31;
    /// Unknown option.
    pub const ERR_UNSUP: u32 = ERR + 1;
    /// Forbidden by policy.
    pub const ERR_POLICY: u32 = ERR + 2;
    /// Syntactically or semantically invalid option.
    pub const ERR_INVALID: u32 = ERR + 3;
    /// TLS must be started first.
    pub const ERR_TLS_REQD: u32 = ERR + 5;
    /// No such export.
    pub const ERR_UNKNOWN: u32 = ERR + 6;
    /// Option payload too large.
    pub const ERR_TOO_BIG: u32 = ERR + 9;
}

/// `NBD_INFO_*` item types.
pub mod info {
    /// Size and transmission flags.
    pub const EXPORT: u16 = 0;
    /// Canonical export name.
    pub const NAME: u16 = 1;
    /// Human-readable description.
    pub const DESCRIPTION: u16 = 2;
    /// Minimum, preferred and maximum block sizes.
    pub const BLOCK_SIZE: u16 = 3;
}

/// Command types (`NBD_CMD_*`).
pub mod cmd {
    /// Read.
    pub const READ: u16 = 0;
    /// Write (payload follows the header).
    pub const WRITE: u16 = 1;
    /// Disconnect.
    pub const DISC: u16 = 2;
    /// Flush to stable storage.
    pub const FLUSH: u16 = 3;
    /// Discard.
    pub const TRIM: u16 = 4;
    /// Prefetch.
    pub const CACHE: u16 = 5;
    /// Write zeroes.
    pub const WRITE_ZEROES: u16 = 6;
    /// Block status query.
    pub const BLOCK_STATUS: u16 = 7;
}

/// Command flags (`NBD_CMD_FLAG_*`).
pub mod cflags {
    /// Force unit access.
    pub const FUA: u16 = 1 << 0;
    /// `WRITE_ZEROES` must allocate.
    pub const NO_HOLE: u16 = 1 << 1;
    /// Don't fragment a structured read reply.
    pub const DF: u16 = 1 << 2;
    /// Block status: one descriptor only.
    pub const REQ_ONE: u16 = 1 << 3;
    /// `WRITE_ZEROES`: fail with `ENOTSUP` rather than be slow.
    pub const FAST_ZERO: u16 = 1 << 4;
}

/// Structured reply chunk types and flags.
pub mod reply {
    /// Last chunk of a reply.
    pub const FLAG_DONE: u16 = 1;
    /// Empty final chunk.
    pub const TYPE_NONE: u16 = 0;
    /// Data at an offset.
    pub const TYPE_OFFSET_DATA: u16 = 1;
    /// A range that reads as zeroes.
    pub const TYPE_OFFSET_HOLE: u16 = 2;
    /// Block status descriptors.
    pub const TYPE_BLOCK_STATUS: u16 = 5;
    /// Error with message.
    pub const TYPE_ERROR: u16 = (1 << 15) + 1;
}

/// NBD error numbers (proto.md "Error values"): not the host's errno.
pub mod errno {
    /// Operation not permitted (write to a read-only export).
    pub const EPERM: u32 = 1;
    /// Input/output error.
    pub const EIO: u32 = 5;
    /// Out of memory.
    pub const ENOMEM: u32 = 12;
    /// Invalid argument (unknown command or flag, read beyond the end, oversized request).
    pub const EINVAL: u32 = 22;
    /// No space (write beyond the end, disk full).
    pub const ENOSPC: u32 = 28;
    /// Value too large.
    pub const EOVERFLOW: u32 = 75;
    /// Not supported (`FAST_ZERO` that would be slow).
    pub const ENOTSUP: u32 = 95;
    /// Server shutting down.
    pub const ESHUTDOWN: u32 = 108;
}

/// `base:allocation` status flags.
pub mod alloc {
    /// The range is a hole.
    pub const HOLE: u32 = 1;
    /// The range reads as zeroes.
    pub const ZERO: u32 = 2;
}

/// The metadata context this server offers.
pub const BASE_ALLOCATION: &str = "base:allocation";
/// Context id we hand out for `base:allocation`.
pub const BASE_ALLOCATION_ID: u32 = 1;
/// Largest READ or WRITE payload we accept (advertised as the maximum block size).
pub const MAX_PAYLOAD: u32 = 32 * 1024 * 1024;
/// Preferred block size advertised in `NBD_INFO_BLOCK_SIZE`.
pub const PREFERRED_BLOCK: u32 = 4096;
/// Largest option payload we process; longer ones are read, discarded and answered with
/// `NBD_REP_ERR_TOO_BIG`.
pub const MAX_OPTION_LEN: u32 = 64 * 1024;
/// Longest string (export name, query) the spec allows.
pub const MAX_STRING: usize = 4096;
/// Size of a request header.
pub const REQUEST_LEN: usize = 28;
/// Size of an option header sent by the client.
pub const OPTION_HEADER_LEN: usize = 16;

/// A malformed message from the peer.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ProtoError {
    /// Wrong magic number: the stream cannot be resynchronised.
    #[error("bad magic {found:#x}, expected {expected:#x}")]
    BadMagic {
        /// What was received.
        found: u64,
        /// What the protocol requires.
        expected: u64,
    },
    /// The client set flags we do not know (the server must close, proto.md).
    #[error("unknown client flags {0:#x}")]
    UnknownClientFlags(u32),
    /// A buffer was shorter than its fields.
    #[error("message truncated: need {need} bytes, have {have}")]
    Truncated {
        /// Bytes required.
        need: usize,
        /// Bytes present.
        have: usize,
    },
    /// Bytes left over after the declared fields.
    #[error("{0} trailing bytes in option payload")]
    Trailing(usize),
    /// A string that is not UTF-8, contains NUL or is longer than 4096 bytes.
    #[error("invalid string in option payload")]
    BadString,
}

/// A big-endian reader over a byte slice that never panics.
#[derive(Debug)]
pub struct Cursor<'a> {
    buf: &'a [u8],
}

impl<'a> Cursor<'a> {
    /// Wraps `buf`.
    pub fn new(buf: &'a [u8]) -> Self {
        Self { buf }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], ProtoError> {
        if self.buf.len() < n {
            return Err(ProtoError::Truncated {
                need: n,
                have: self.buf.len(),
            });
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], ProtoError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }

    /// Reads a big-endian u16.
    pub fn u16(&mut self) -> Result<u16, ProtoError> {
        Ok(u16::from_be_bytes(self.array()?))
    }

    /// Reads a big-endian u32.
    pub fn u32(&mut self) -> Result<u32, ProtoError> {
        Ok(u32::from_be_bytes(self.array()?))
    }

    /// Reads a big-endian u64.
    pub fn u64(&mut self) -> Result<u64, ProtoError> {
        Ok(u64::from_be_bytes(self.array()?))
    }

    /// Reads a string of `len` bytes (UTF-8, no NUL, at most 4096 bytes).
    pub fn string(&mut self, len: usize) -> Result<String, ProtoError> {
        if len > MAX_STRING {
            return Err(ProtoError::BadString);
        }
        let raw = self.take(len)?;
        if raw.contains(&0) {
            return Err(ProtoError::BadString);
        }
        String::from_utf8(raw.to_vec()).map_err(|_| ProtoError::BadString)
    }

    /// Fails if bytes remain.
    pub fn finish(&self) -> Result<(), ProtoError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(ProtoError::Trailing(self.buf.len()))
        }
    }
}

/// The server's opening bytes of the fixed newstyle handshake.
pub fn greeting() -> [u8; 18] {
    let mut out = [0u8; 18];
    out[..8].copy_from_slice(&NBDMAGIC.to_be_bytes());
    out[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
    out[16..].copy_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    out
}

/// Client flags after the greeting; returns whether the 124 zero bytes are to be skipped.
pub fn parse_client_flags(raw: [u8; 4]) -> Result<bool, ProtoError> {
    let flags = u32::from_be_bytes(raw);
    if flags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
        return Err(ProtoError::UnknownClientFlags(flags));
    }
    Ok(flags & FLAG_C_NO_ZEROES != 0)
}

/// The header of one client option.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionHeader {
    /// Option number.
    pub option: u32,
    /// Payload length that follows.
    pub length: u32,
}

impl OptionHeader {
    /// The payload is longer than [`MAX_OPTION_LEN`]: skip it and answer `ERR_TOO_BIG`.
    pub fn too_big(&self) -> bool {
        self.length > MAX_OPTION_LEN
    }
}

/// Parses an option header (any payload length: see [`OptionHeader::too_big`]).
pub fn parse_option_header(raw: &[u8; OPTION_HEADER_LEN]) -> Result<OptionHeader, ProtoError> {
    let mut c = Cursor::new(raw);
    let magic = c.u64()?;
    if magic != IHAVEOPT {
        return Err(ProtoError::BadMagic {
            found: magic,
            expected: IHAVEOPT,
        });
    }
    let option = c.u32()?;
    let length = c.u32()?;
    Ok(OptionHeader { option, length })
}

/// Payload of `NBD_OPT_INFO` / `NBD_OPT_GO`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InfoRequest {
    /// Export name.
    pub name: String,
    /// `NBD_INFO_*` items the client asked for.
    pub requests: Vec<u16>,
}

/// Parses the payload of `NBD_OPT_INFO` / `NBD_OPT_GO`.
pub fn parse_info_request(data: &[u8]) -> Result<InfoRequest, ProtoError> {
    let mut c = Cursor::new(data);
    let len = c.u32()? as usize;
    let name = c.string(len)?;
    let n = c.u16()?;
    let mut requests = Vec::with_capacity(usize::from(n).min(64));
    for _ in 0..n {
        requests.push(c.u16()?);
    }
    c.finish()?;
    Ok(InfoRequest { name, requests })
}

/// Payload of `NBD_OPT_LIST_META_CONTEXT` / `NBD_OPT_SET_META_CONTEXT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaRequest {
    /// Export name.
    pub name: String,
    /// Context queries.
    pub queries: Vec<String>,
}

/// Parses the payload of the metadata-context options.
pub fn parse_meta_request(data: &[u8]) -> Result<MetaRequest, ProtoError> {
    let mut c = Cursor::new(data);
    let len = c.u32()? as usize;
    let name = c.string(len)?;
    let n = c.u32()?;
    let mut queries = Vec::new();
    for _ in 0..n {
        let len = c.u32()? as usize;
        queries.push(c.string(len)?);
    }
    c.finish()?;
    Ok(MetaRequest { name, queries })
}

/// Appends an option reply to `out`.
pub fn put_option_reply(out: &mut Vec<u8>, option: u32, reply_type: u32, data: &[u8]) {
    out.extend_from_slice(&OPT_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&reply_type.to_be_bytes());
    // Option payloads we build are small (names <= 4096 bytes), so the cast cannot truncate.
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
}

/// One transmission request header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    /// Command flags.
    pub flags: u16,
    /// Command type (may be unknown).
    pub command: u16,
    /// Opaque client handle, echoed in the reply.
    pub cookie: u64,
    /// Byte offset.
    pub offset: u64,
    /// Byte length.
    pub length: u32,
}

impl Request {
    /// Bytes of payload that follow this header on the wire (only WRITE carries one).
    pub fn payload_len(&self) -> u32 {
        if self.command == cmd::WRITE {
            self.length
        } else {
            0
        }
    }
}

/// Parses a request header. A bad magic is fatal for the connection.
pub fn parse_request(raw: &[u8; REQUEST_LEN]) -> Result<Request, ProtoError> {
    let mut c = Cursor::new(raw);
    let magic = c.u32()?;
    if magic != REQUEST_MAGIC {
        return Err(ProtoError::BadMagic {
            found: u64::from(magic),
            expected: u64::from(REQUEST_MAGIC),
        });
    }
    Ok(Request {
        flags: c.u16()?,
        command: c.u16()?,
        cookie: c.u64()?,
        offset: c.u64()?,
        length: c.u32()?,
    })
}

/// Encodes a request header (used by the test client and the fuzz tests).
pub fn encode_request(req: &Request) -> [u8; REQUEST_LEN] {
    let mut out = [0u8; REQUEST_LEN];
    out[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
    out[4..6].copy_from_slice(&req.flags.to_be_bytes());
    out[6..8].copy_from_slice(&req.command.to_be_bytes());
    out[8..16].copy_from_slice(&req.cookie.to_be_bytes());
    out[16..24].copy_from_slice(&req.offset.to_be_bytes());
    out[24..28].copy_from_slice(&req.length.to_be_bytes());
    out
}

/// What the connection knows when it checks a request.
#[derive(Debug, Clone, Copy)]
pub struct ExportView {
    /// Current size in bytes.
    pub size: u64,
    /// Read-only export (snapshot).
    pub read_only: bool,
    /// Structured replies were negotiated.
    pub structured: bool,
    /// `base:allocation` was selected.
    pub base_allocation: bool,
}

/// A request that passed validation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// Read `length` bytes at `offset`.
    Read {
        /// Byte offset.
        offset: u64,
        /// Byte length.
        length: u32,
        /// `DF`: at most one content chunk in the structured reply.
        df: bool,
    },
    /// Write the payload at `offset`.
    Write {
        /// Byte offset.
        offset: u64,
        /// Payload length.
        length: u32,
        /// Persist before replying.
        fua: bool,
    },
    /// Flush everything acknowledged so far.
    Flush,
    /// Discard a range.
    Trim {
        /// Byte offset.
        offset: u64,
        /// Byte length.
        length: u32,
        /// Persist before replying.
        fua: bool,
    },
    /// Zero a range.
    WriteZeroes {
        /// Byte offset.
        offset: u64,
        /// Byte length.
        length: u32,
        /// Persist before replying.
        fua: bool,
        /// Keep the range allocated.
        no_hole: bool,
        /// Fail with `ENOTSUP` rather than be slow.
        fast: bool,
    },
    /// Prefetch a range.
    Cache {
        /// Byte offset.
        offset: u64,
        /// Byte length.
        length: u32,
    },
    /// Report allocation of a range.
    BlockStatus {
        /// Byte offset.
        offset: u64,
        /// Byte length.
        length: u32,
        /// Only one descriptor.
        req_one: bool,
    },
    /// Disconnect after in-flight requests.
    Disconnect,
}

/// Checks a request against the export; `Err` carries the NBD error number to reply with.
pub fn validate(req: &Request, view: &ExportView) -> Result<Command, u32> {
    use cflags::*;
    // proto.md "Command flags": FUA is valid on every command and the server MUST accept it,
    // ignoring it where nothing is written.
    let allowed = FUA
        | match req.command {
            cmd::READ if view.structured => DF,
            cmd::READ | cmd::WRITE | cmd::TRIM | cmd::FLUSH | cmd::CACHE | cmd::DISC => 0,
            cmd::WRITE_ZEROES => NO_HOLE | FAST_ZERO,
            cmd::BLOCK_STATUS => REQ_ONE,
            _ => return Err(errno::EINVAL),
        };
    if req.flags & !allowed != 0 {
        return Err(errno::EINVAL);
    }
    let writes = matches!(req.command, cmd::WRITE | cmd::TRIM | cmd::WRITE_ZEROES);
    if writes && view.read_only {
        return Err(errno::EPERM);
    }
    match req.command {
        cmd::FLUSH => {
            return if req.offset == 0 && req.length == 0 {
                Ok(Command::Flush)
            } else {
                Err(errno::EINVAL)
            };
        }
        cmd::DISC => return Ok(Command::Disconnect),
        _ => {}
    }
    if matches!(req.command, cmd::READ | cmd::WRITE) && req.length > MAX_PAYLOAD {
        return Err(errno::EINVAL);
    }
    if req.command == cmd::BLOCK_STATUS && !(view.structured && view.base_allocation) {
        return Err(errno::EINVAL);
    }
    if req.length == 0 {
        return Err(errno::EINVAL);
    }
    let end = req.offset.checked_add(u64::from(req.length));
    if end.is_none_or(|end| end > view.size) {
        return Err(if writes { errno::ENOSPC } else { errno::EINVAL });
    }
    let (offset, length) = (req.offset, req.length);
    let fua = req.flags & FUA != 0;
    Ok(match req.command {
        cmd::READ => Command::Read {
            offset,
            length,
            df: req.flags & DF != 0,
        },
        cmd::WRITE => Command::Write {
            offset,
            length,
            fua,
        },
        cmd::TRIM => Command::Trim {
            offset,
            length,
            fua,
        },
        cmd::WRITE_ZEROES => Command::WriteZeroes {
            offset,
            length,
            fua,
            no_hole: req.flags & NO_HOLE != 0,
            fast: req.flags & FAST_ZERO != 0,
        },
        cmd::CACHE => Command::Cache { offset, length },
        _ => Command::BlockStatus {
            offset,
            length,
            req_one: req.flags & REQ_ONE != 0,
        },
    })
}

/// A simple reply header (data, if any, follows).
pub fn simple_reply(cookie: u64, error: u32) -> [u8; 16] {
    let mut out = [0u8; 16];
    out[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    out[4..8].copy_from_slice(&error.to_be_bytes());
    out[8..16].copy_from_slice(&cookie.to_be_bytes());
    out
}

/// A structured reply chunk header for a payload of `length` bytes.
pub fn chunk_header(cookie: u64, flags: u16, kind: u16, length: u32) -> [u8; 20] {
    let mut out = [0u8; 20];
    out[0..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    out[4..6].copy_from_slice(&flags.to_be_bytes());
    out[6..8].copy_from_slice(&kind.to_be_bytes());
    out[8..16].copy_from_slice(&cookie.to_be_bytes());
    out[16..20].copy_from_slice(&length.to_be_bytes());
    out
}

/// The header of an `OFFSET_DATA` chunk carrying `len` bytes read at `offset` (the data
/// follows); `done` marks the last chunk of the reply.
pub fn read_chunk_header(cookie: u64, offset: u64, len: u32, done: bool) -> Vec<u8> {
    let mut out = Vec::with_capacity(28);
    out.extend_from_slice(&chunk_header(
        cookie,
        if done { reply::FLAG_DONE } else { 0 },
        reply::TYPE_OFFSET_DATA,
        len.saturating_add(8),
    ));
    out.extend_from_slice(&offset.to_be_bytes());
    out
}

/// An `OFFSET_HOLE` chunk: `len` bytes at `offset` read as zeroes.
pub fn hole_chunk(cookie: u64, offset: u64, len: u32, done: bool) -> Vec<u8> {
    let mut out = Vec::with_capacity(32);
    out.extend_from_slice(&chunk_header(
        cookie,
        if done { reply::FLAG_DONE } else { 0 },
        reply::TYPE_OFFSET_HOLE,
        12,
    ));
    out.extend_from_slice(&offset.to_be_bytes());
    out.extend_from_slice(&len.to_be_bytes());
    out
}

/// A final `ERROR` chunk.
pub fn error_chunk(cookie: u64, error: u32, message: &str) -> Vec<u8> {
    let msg = &message.as_bytes()[..message.len().min(1024)];
    let mut out = Vec::with_capacity(26 + msg.len());
    out.extend_from_slice(&chunk_header(
        cookie,
        reply::FLAG_DONE,
        reply::TYPE_ERROR,
        6 + msg.len() as u32,
    ));
    out.extend_from_slice(&error.to_be_bytes());
    out.extend_from_slice(&(msg.len() as u16).to_be_bytes());
    out.extend_from_slice(msg);
    out
}

/// A final `BLOCK_STATUS` chunk with `(length, flags)` descriptors.
pub fn block_status_chunk(cookie: u64, context: u32, extents: &[(u32, u32)]) -> Vec<u8> {
    let len = 4 + 8 * extents.len();
    let mut out = Vec::with_capacity(20 + len);
    out.extend_from_slice(&chunk_header(
        cookie,
        reply::FLAG_DONE,
        reply::TYPE_BLOCK_STATUS,
        len as u32,
    ));
    out.extend_from_slice(&context.to_be_bytes());
    for (length, flags) in extents {
        out.extend_from_slice(&length.to_be_bytes());
        out.extend_from_slice(&flags.to_be_bytes());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const VIEW: ExportView = ExportView {
        size: 1 << 20,
        read_only: false,
        structured: true,
        base_allocation: true,
    };

    fn req(command: u16, flags: u16, offset: u64, length: u32) -> Request {
        Request {
            flags,
            command,
            cookie: 7,
            offset,
            length,
        }
    }

    #[test]
    fn request_round_trips() {
        let r = req(cmd::WRITE, cflags::FUA, 4096, 512);
        assert_eq!(parse_request(&encode_request(&r)), Ok(r));
        assert_eq!(r.payload_len(), 512);
        assert_eq!(req(cmd::READ, 0, 0, 512).payload_len(), 0);
    }

    #[test]
    fn bad_magic_is_rejected() {
        let mut raw = encode_request(&req(cmd::READ, 0, 0, 1));
        raw[0] ^= 1;
        assert!(matches!(
            parse_request(&raw),
            Err(ProtoError::BadMagic { .. })
        ));
    }

    #[test]
    fn validation_uses_spec_error_numbers() {
        assert_eq!(validate(&req(99, 0, 0, 1), &VIEW), Err(errno::EINVAL));
        assert_eq!(
            validate(&req(cmd::READ, 1 << 9, 0, 1), &VIEW),
            Err(errno::EINVAL)
        );
        assert_eq!(
            validate(&req(cmd::WRITE, 0, (1 << 20) - 1, 2), &VIEW),
            Err(errno::ENOSPC)
        );
        assert_eq!(
            validate(&req(cmd::READ, 0, 1 << 20, 1), &VIEW),
            Err(errno::EINVAL)
        );
        assert_eq!(
            validate(&req(cmd::READ, 0, u64::MAX, 1), &VIEW),
            Err(errno::EINVAL)
        );
        assert_eq!(
            validate(&req(cmd::READ, 0, 0, MAX_PAYLOAD + 1), &VIEW),
            Err(errno::EINVAL)
        );
        let ro = ExportView {
            read_only: true,
            ..VIEW
        };
        assert_eq!(validate(&req(cmd::TRIM, 0, 0, 1), &ro), Err(errno::EPERM));
        assert_eq!(validate(&req(cmd::FLUSH, 0, 0, 0), &ro), Ok(Command::Flush));
        assert_eq!(
            validate(&req(cmd::FLUSH, 0, 1, 0), &VIEW),
            Err(errno::EINVAL)
        );
        let no_meta = ExportView {
            base_allocation: false,
            ..VIEW
        };
        assert_eq!(
            validate(&req(cmd::BLOCK_STATUS, 0, 0, 1), &no_meta),
            Err(errno::EINVAL)
        );
        assert_eq!(
            validate(
                &req(
                    cmd::WRITE_ZEROES,
                    cflags::NO_HOLE | cflags::FAST_ZERO,
                    0,
                    4096
                ),
                &VIEW
            ),
            Ok(Command::WriteZeroes {
                offset: 0,
                length: 4096,
                fua: false,
                no_hole: true,
                fast: true
            })
        );
    }

    #[test]
    fn fua_is_accepted_on_every_command() {
        let ro = ExportView {
            read_only: true,
            ..VIEW
        };
        for view in [VIEW, ro] {
            assert_eq!(
                validate(&req(cmd::READ, cflags::FUA | cflags::DF, 0, 512), &view),
                Ok(Command::Read {
                    offset: 0,
                    length: 512,
                    df: true
                })
            );
            assert_eq!(
                validate(&req(cmd::FLUSH, cflags::FUA, 0, 0), &view),
                Ok(Command::Flush)
            );
            assert_eq!(
                validate(&req(cmd::CACHE, cflags::FUA, 0, 512), &view),
                Ok(Command::Cache {
                    offset: 0,
                    length: 512
                })
            );
            assert_eq!(
                validate(&req(cmd::BLOCK_STATUS, cflags::FUA, 0, 512), &view),
                Ok(Command::BlockStatus {
                    offset: 0,
                    length: 512,
                    req_one: false
                })
            );
            assert_eq!(
                validate(&req(cmd::DISC, cflags::FUA, 0, 0), &view),
                Ok(Command::Disconnect)
            );
        }
        assert_eq!(
            validate(&req(cmd::TRIM, cflags::FUA, 0, 512), &VIEW),
            Ok(Command::Trim {
                offset: 0,
                length: 512,
                fua: true
            })
        );
    }

    #[test]
    fn client_flags() {
        assert_eq!(parse_client_flags(3u32.to_be_bytes()), Ok(true));
        assert_eq!(parse_client_flags(1u32.to_be_bytes()), Ok(false));
        assert!(parse_client_flags(4u32.to_be_bytes()).is_err());
    }

    #[test]
    fn info_request_parses_and_rejects_trailing() {
        let mut data = Vec::new();
        data.extend_from_slice(&3u32.to_be_bytes());
        data.extend_from_slice(b"vol");
        data.extend_from_slice(&1u16.to_be_bytes());
        data.extend_from_slice(&info::BLOCK_SIZE.to_be_bytes());
        assert_eq!(
            parse_info_request(&data),
            Ok(InfoRequest {
                name: "vol".into(),
                requests: vec![info::BLOCK_SIZE]
            })
        );
        data.push(0);
        assert_eq!(parse_info_request(&data), Err(ProtoError::Trailing(1)));
    }

    proptest! {
        #[test]
        fn request_parser_never_panics(raw in proptest::array::uniform28(any::<u8>())) {
            if let Ok(r) = parse_request(&raw) {
                prop_assert_eq!(encode_request(&r), raw);
                // Validation is total: it returns a command or an error number.
                match validate(&r, &VIEW) {
                    Ok(Command::Read { offset, length, .. }) => {
                        prop_assert!(offset + u64::from(length) <= VIEW.size);
                    }
                    Ok(_) => {}
                    Err(e) => prop_assert!([errno::EINVAL, errno::ENOSPC, errno::EPERM].contains(&e)),
                }
            }
        }

        #[test]
        fn option_payload_parsers_never_panic(data in proptest::collection::vec(any::<u8>(), 0..64)) {
            if let Ok(r) = parse_info_request(&data) {
                prop_assert!(r.name.len() <= MAX_STRING);
            }
            if let Ok(r) = parse_meta_request(&data) {
                prop_assert!(r.queries.len() <= data.len() / 4);
            }
        }
    }
}
