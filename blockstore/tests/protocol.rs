//! Protocol edge cases against a real server process: malformed handshakes, bad requests,
//! out-of-order replies, and clients that vanish mid-request while others keep being served.

mod common;

use std::collections::HashSet;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use common::{Client, ServerProc, TempDir, get_opt_reply, go_payload, greet, put_opt};
use slipway_blockstore::control::ControlRequest;
use slipway_blockstore::proto::{self, alloc, cflags, cmd, errno, opt, rep};

const MIB: u64 = 1 << 20;

fn closed(s: &mut UnixStream) -> bool {
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let mut b = [0u8; 1];
    matches!(s.read(&mut b), Ok(0) | Err(_))
}

#[test]
fn protocol_edge_cases() {
    let dir = TempDir::new("proto");
    let srv = ServerProc::start(dir.path());
    srv.create("vol", 4 * MIB);

    // A bystander connection that must keep working throughout.
    let mut bystander = Client::connect(&srv.unix, "vol", false).expect("bystander");
    bystander
        .write(0, &[9u8; 4096], 0)
        .expect("bystander write");

    // Unknown client flags: the server closes (proto.md).
    let mut s = UnixStream::connect(&srv.unix).expect("connect");
    let mut g = [0u8; 18];
    s.read_exact(&mut g).expect("greeting");
    s.write_all(&0x80u32.to_be_bytes()).expect("flags");
    assert!(closed(&mut s), "server kept a client with unknown flags");

    // Bad option magic: closed.
    let mut s = UnixStream::connect(&srv.unix).expect("connect");
    greet(&mut s);
    s.write_all(&[0xde; 16]).expect("garbage");
    assert!(closed(&mut s));

    // Unknown option -> ERR_UNSUP, session goes on; bad INFO payload -> ERR_INVALID;
    // unknown export -> ERR_UNKNOWN; LIST works; then GO succeeds.
    let mut s = UnixStream::connect(&srv.unix).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    greet(&mut s);
    put_opt(&mut s, 0x4242, b"whatever");
    assert_eq!(get_opt_reply(&mut s).expect("reply").1, rep::ERR_UNSUP);
    put_opt(&mut s, opt::EXTENDED_HEADERS, &[]);
    assert_eq!(get_opt_reply(&mut s).expect("reply").1, rep::ERR_UNSUP);
    put_opt(&mut s, opt::INFO, &[0, 0, 0, 9, b'v']);
    assert_eq!(get_opt_reply(&mut s).expect("reply").1, rep::ERR_INVALID);
    put_opt(&mut s, opt::GO, &go_payload("missing"));
    assert_eq!(get_opt_reply(&mut s).expect("reply").1, rep::ERR_UNKNOWN);
    put_opt(&mut s, opt::LIST, &[]);
    let (_, ty, d) = get_opt_reply(&mut s).expect("reply");
    assert_eq!(ty, rep::SERVER);
    assert_eq!(&d[4..], b"vol");
    assert_eq!(get_opt_reply(&mut s).expect("ack").1, rep::ACK);
    put_opt(&mut s, opt::GO, &go_payload("vol"));
    loop {
        let (_, ty, _) = get_opt_reply(&mut s).expect("reply");
        if ty == rep::ACK {
            break;
        }
        assert_eq!(ty, rep::INFO);
    }
    drop(s);

    // EXPORT_NAME with an unknown name: no error reply exists, so the server closes.
    let mut s = UnixStream::connect(&srv.unix).expect("connect");
    greet(&mut s);
    put_opt(&mut s, opt::EXPORT_NAME, b"missing");
    assert!(closed(&mut s));

    // ABORT is acknowledged, then closed.
    let mut s = UnixStream::connect(&srv.unix).expect("connect");
    greet(&mut s);
    put_opt(&mut s, opt::ABORT, &[]);
    assert_eq!(get_opt_reply(&mut s).expect("ack").1, rep::ACK);
    assert!(closed(&mut s));

    for structured in [false, true] {
        let mut c = Client::connect(&srv.unix, "vol", structured).expect("connect");
        assert_eq!(c.size, 4 * MIB);
        let want = proto::tflags::HAS_FLAGS
            | proto::tflags::SEND_FLUSH
            | proto::tflags::SEND_FUA
            | proto::tflags::SEND_TRIM
            | proto::tflags::SEND_WRITE_ZEROES
            | proto::tflags::CAN_MULTI_CONN;
        assert_eq!(c.flags & want, want);
        // Beyond the end: reads EINVAL, writes ENOSPC (payload consumed, session goes on).
        assert_eq!(c.read(4 * MIB - 512, 1024), Err(errno::EINVAL));
        assert_eq!(c.write(4 * MIB, &[1u8; 512], 0), Err(errno::ENOSPC));
        assert_eq!(c.read(u64::MAX - 10, 512), Err(errno::EINVAL));
        // Oversized requests.
        assert_eq!(c.read(0, 64 << 20), Err(errno::EINVAL));
        let big = vec![7u8; (proto::MAX_PAYLOAD + 4096) as usize];
        assert_eq!(c.write(0, &big, 0), Err(errno::EINVAL));
        // Unknown command and unknown flag.
        assert_eq!(c.simple(42, 0, 0, 512).map(|r| r.error), Ok(errno::EINVAL));
        assert_eq!(
            c.simple(cmd::FLUSH, 0x4000, 0, 0).map(|r| r.error),
            Ok(errno::EINVAL)
        );
        // Still in sync after all of that.
        assert_eq!(c.read(0, 4096), Ok(vec![9u8; 4096]));
        // FUA is accepted on every command (proto.md "Command flags"), ignored where nothing
        // is written.
        c.send(cmd::READ, cflags::FUA, 0, 4096, &[]);
        let r = c.recv(|_| 4096).expect("FUA read reply");
        assert_eq!((r.error, r.data), (0, vec![9u8; 4096]), "READ with FUA");
        for (command, len) in [(cmd::FLUSH, 0), (cmd::CACHE, 4096)] {
            assert_eq!(
                c.simple(command, cflags::FUA, 0, len).map(|r| r.error),
                Ok(0),
                "command {command} with FUA"
            );
        }
        if structured {
            assert_eq!(
                c.simple(cmd::BLOCK_STATUS, cflags::FUA, 0, 4096)
                    .map(|r| r.error),
                Ok(0),
                "BLOCK_STATUS with FUA"
            );
        }
        // WRITE_ZEROES with FAST_ZERO on a thin volume is fast; with FUA it is durable.
        let r = c
            .simple(
                cmd::WRITE_ZEROES,
                cflags::FAST_ZERO | cflags::FUA,
                8192,
                4096,
            )
            .expect("zero");
        assert_eq!(r.error, 0);
        if structured {
            let r = c
                .simple(cmd::BLOCK_STATUS, 0, 0, (4 * MIB) as u32)
                .expect("status");
            assert_eq!(r.error, 0);
            assert_eq!(r.extents.first().map(|e| e.1), Some(0), "{:?}", r.extents);
            assert_eq!(
                r.extents.last().map(|e| e.1),
                Some(alloc::HOLE | alloc::ZERO)
            );
            let total: u64 = r.extents.iter().map(|e| u64::from(e.0)).sum();
            assert_eq!(total, 4 * MIB);
            let r = c
                .simple(cmd::BLOCK_STATUS, cflags::REQ_ONE, 0, (4 * MIB) as u32)
                .expect("one");
            assert_eq!(r.extents.len(), 1);
        } else {
            // BLOCK_STATUS without a negotiated context is invalid.
            assert_eq!(
                c.simple(cmd::BLOCK_STATUS, 0, 0, 4096).map(|r| r.error),
                Ok(errno::EINVAL)
            );
        }
        assert_eq!(c.simple(cmd::CACHE, 0, 0, 4096).map(|r| r.error), Ok(0));
        c.disconnect();
    }

    // Bad request magic: the connection is closed.
    let mut c = Client::connect(&srv.unix, "vol", false).expect("connect");
    c.s.write_all(&[0x55; 28]).expect("garbage request");
    assert!(closed(&mut c.s));

    // A client that disconnects in the middle of a write payload.
    let mut c = Client::connect(&srv.unix, "vol", false).expect("connect");
    let hdr = proto::encode_request(&proto::Request {
        flags: 0,
        command: cmd::WRITE,
        cookie: 1,
        offset: 0,
        length: 65536,
    });
    c.s.write_all(&hdr).expect("header");
    c.s.write_all(&[1u8; 1000]).expect("part of payload");
    drop(c);
    // ... and one that vanishes mid-header.
    let mut c = Client::connect(&srv.unix, "vol", false).expect("connect");
    c.s.write_all(&hdr[..10]).expect("half header");
    drop(c);

    // The bystander never noticed; the half-written request changed nothing.
    assert_eq!(bystander.read(0, 4096), Ok(vec![9u8; 4096]));
    bystander.flush().expect("flush");

    // Writes to a snapshot are refused with EPERM.
    srv.control(ControlRequest::Snapshot {
        volume: "vol".into(),
        name: "s".into(),
    })
    .expect("snapshot");
    let mut s = Client::connect(&srv.unix, "vol@s", false).expect("snapshot export");
    assert_ne!(s.flags & proto::tflags::READ_ONLY, 0);
    assert_ne!(s.flags & proto::tflags::SEND_FUA, 0);
    s.send(cmd::READ, cflags::FUA, 0, 4096, &[]);
    let r = s.recv(|_| 4096).expect("FUA read reply");
    assert_eq!((r.error, r.data), (0, vec![9u8; 4096]), "READ with FUA");
    assert_eq!(
        s.simple(cmd::FLUSH, cflags::FUA, 0, 0).map(|r| r.error),
        Ok(0)
    );
    assert_eq!(s.write(0, &[1u8; 512], 0), Err(errno::EPERM));
    assert_eq!(
        s.simple(cmd::TRIM, 0, 0, 512).map(|r| r.error),
        Ok(errno::EPERM)
    );
    assert_eq!(s.read(0, 4096), Ok(vec![9u8; 4096]));

    // A volume deleted under an open connection answers ESHUTDOWN, not stale data.
    srv.create("gone", MIB);
    let mut g = Client::connect(&srv.unix, "gone", false).expect("connect");
    assert_eq!(g.read(0, 512), Ok(vec![0u8; 512]));
    srv.control(ControlRequest::Delete {
        name: "gone".into(),
        cascade: false,
    })
    .expect("delete");
    assert_eq!(g.read(0, 512), Err(errno::ESHUTDOWN));
    assert!(Client::connect(&srv.unix, "gone", false).is_err());
    assert!(!srv.log().contains("panicked"), "{}", srv.log());
}

#[test]
fn many_requests_in_flight_all_answered() {
    let dir = TempDir::new("inflight");
    let srv = ServerProc::start(dir.path());
    srv.create("vol", 4 * MIB);
    let mut c = Client::connect(&srv.unix, "vol", true).expect("connect");
    let mut rng = common::Rng(77);
    // Fill 64 distinct blocks, pipelined without waiting for replies.
    let mut expect = Vec::new();
    let mut cookies = HashSet::new();
    for i in 0..64u64 {
        let mut data = vec![0u8; 4096];
        rng.fill(&mut data);
        let off = i * 65536 + 4096 * (i % 3);
        cookies.insert(c.send(cmd::WRITE, 0, off, 4096, &data));
        expect.push((off, data));
    }
    for _ in 0..64 {
        let r = c.recv(|_| 0).expect("reply");
        assert_eq!(r.error, 0);
        assert!(
            cookies.remove(&r.cookie),
            "unexpected or repeated cookie {}",
            r.cookie
        );
    }
    assert!(cookies.is_empty());
    // Pipelined reads, matched by cookie (replies may come in any order).
    let mut pending = std::collections::HashMap::new();
    for (off, data) in &expect {
        pending.insert(c.send(cmd::READ, 0, *off, 4096, &[]), data.clone());
    }
    for _ in 0..expect.len() {
        let r = c.recv(|_| 4096).expect("reply");
        let want = pending.remove(&r.cookie).expect("known cookie");
        assert_eq!(r.data, want);
    }
    assert!(pending.is_empty());
    // Replies leave in completion order: a FLUSH (fdatasync, completes asynchronously) sent
    // before a READ (page-cache hit, completes inline) is answered after it.
    c.write(0, &[3u8; 65536], 0).expect("dirty some data");
    let mut both = proto::encode_request(&proto::Request {
        flags: 0,
        command: cmd::FLUSH,
        cookie: 9001,
        offset: 0,
        length: 0,
    })
    .to_vec();
    both.extend_from_slice(&proto::encode_request(&proto::Request {
        flags: 0,
        command: cmd::READ,
        cookie: 9002,
        offset: 0,
        length: 4096,
    }));
    c.s.write_all(&both).expect("send flush+read");
    let data_len = |cookie| if cookie == 9002 { 4096 } else { 0 };
    let first = c.recv(data_len).expect("first reply");
    let second = c.recv(data_len).expect("second reply");
    assert_eq!(
        (first.cookie, second.cookie),
        (9002, 9001),
        "replies were not reordered"
    );
    assert_eq!(first.data, vec![3u8; 4096]);
    assert_eq!(second.error, 0);

    // A second connection (multi-conn) sees the first one's flushed writes.
    c.flush().expect("flush");
    let mut d = Client::connect(&srv.unix, "vol", false).expect("second connection");
    assert_eq!(d.read(expect[5].0, 4096), Ok(expect[5].1.clone()));
    assert_eq!(d.read(0, 4096), Ok(vec![3u8; 4096]));
}

#[test]
fn oversized_option_gets_too_big_and_the_session_goes_on() {
    let dir = TempDir::new("toobig");
    let srv = ServerProc::start(dir.path());
    srv.create("vol", MIB);
    let mut s = UnixStream::connect(&srv.unix).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    greet(&mut s);
    for len in [proto::MAX_OPTION_LEN as usize + 1, 1 << 20] {
        // A syntactically plausible INFO payload padded far beyond the limit.
        let mut big = go_payload("vol");
        big.resize(len, 0x41);
        put_opt(&mut s, opt::INFO, &big);
        let (o, ty, msg) = get_opt_reply(&mut s).expect("reply to an oversized option");
        assert_eq!(
            (o, ty),
            (opt::INFO, rep::ERR_TOO_BIG),
            "{}",
            String::from_utf8_lossy(&msg)
        );
    }
    // Still in sync: negotiation and transmission go on.
    put_opt(&mut s, opt::GO, &go_payload("vol"));
    loop {
        let (_, ty, _) = get_opt_reply(&mut s).expect("reply");
        if ty == rep::ACK {
            break;
        }
        assert_eq!(ty, rep::INFO);
    }
    let req = proto::encode_request(&proto::Request {
        flags: 0,
        command: cmd::READ,
        cookie: 5,
        offset: 0,
        length: 512,
    });
    s.write_all(&req).expect("read request");
    let mut reply = [0u8; 16 + 512];
    s.read_exact(&mut reply).expect("read reply");
    assert_eq!(reply[..4], proto::SIMPLE_REPLY_MAGIC.to_be_bytes());
    assert_eq!(reply[4..8], [0, 0, 0, 0]);
}

#[test]
fn reads_of_holes_send_hole_chunks() {
    let dir = TempDir::new("holes");
    let srv = ServerProc::start(dir.path());
    srv.create("vol", 4 * MIB);
    let ext = 64 * 1024u64;
    let mut c = Client::connect(&srv.unix, "vol", true).expect("connect");
    let data = vec![0x5au8; 4096];
    c.write(ext + 4096, &data, 0).expect("write");
    let mut want = vec![0u8; (4 * ext) as usize];
    want[(ext + 4096) as usize..(ext + 8192) as usize].copy_from_slice(&data);

    // Structured: the unwritten extents come as OFFSET_HOLE chunks, the written one as data.
    c.send(cmd::READ, 0, 0, (4 * ext) as u32, &[]);
    let r = c.recv(|_| 0).expect("reply");
    assert_eq!(r.error, 0);
    assert!(r.data == want, "read back wrong bytes");
    let holes: u64 = r
        .content
        .iter()
        .filter(|c| c.2)
        .map(|c| u64::from(c.1))
        .sum();
    let sent: u64 = r
        .content
        .iter()
        .filter(|c| !c.2)
        .map(|c| u64::from(c.1))
        .sum();
    assert_eq!(holes, 3 * ext, "chunks: {:?}", r.content);
    assert_eq!(sent, ext, "chunks: {:?}", r.content);
    // A read wholly inside a hole is one hole chunk.
    c.send(cmd::READ, 0, 2 * MIB + 512, 4096, &[]);
    let r = c.recv(|_| 0).expect("reply");
    assert_eq!(r.content, vec![(2 * MIB + 512, 4096, true)]);
    assert_eq!(r.data, vec![0u8; 4096]);
    // DF (don't fragment): one content chunk, data with the zeroes in it (proto.md).
    c.send(cmd::READ, cflags::DF, 0, (4 * ext) as u32, &[]);
    let r = c.recv(|_| 0).expect("reply");
    assert_eq!(r.content, vec![(0, (4 * ext) as u32, false)]);
    assert!(r.data == want, "DF read back wrong bytes");
    // Simple replies carry the zeroes.
    let mut s = Client::connect(&srv.unix, "vol", false).expect("connect");
    assert!(
        s.read(0, (4 * ext) as u32) == Ok(want),
        "simple read wrong bytes"
    );
}
