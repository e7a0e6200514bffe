//! Resource limits against a real server process: the memory one client can pin, and the
//! memory and size limits of big thin volumes.

mod common;

use std::collections::HashSet;
use std::io::{Read, Write};
use std::time::{Duration, Instant};

use common::{Client, ServerProc, TempDir, qemu_io};
use slipway_blockstore::proto::{self, cmd};
use slipway_blockstore::server::{MAX_INFLIGHT, UNIT};

const MIB: u64 = 1 << 20;

/// A `/proc/PID/status` field in KiB (`VmRSS`, `VmHWM`).
fn status_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
}

/// READ requests the server has completed on `export` (from its metrics endpoint).
fn reads_done(metrics: &str, export: &str) -> u64 {
    let mut s = std::net::TcpStream::connect(metrics).expect("connect metrics");
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .expect("send");
    let mut body = String::new();
    s.read_to_string(&mut body).expect("read metrics");
    let key = format!("slipway_nbd_requests_total{{export=\"{export}\",op=\"read\"}} ");
    body.lines()
        .find_map(|l| l.strip_prefix(&key)?.trim().parse().ok())
        .unwrap_or(0)
}

#[test]
fn replies_never_read_do_not_grow_server_memory() {
    let dir = TempDir::new("rss");
    let srv = ServerProc::start(dir.path());
    srv.create("vol", 64 * MIB);
    let len = proto::MAX_PAYLOAD;
    // Real data (not holes), so every reply buffer is touched memory.
    qemu_io(&srv.uri("vol"), &[&format!("write -P 0xab 0 {len}")]);
    let pid = srv.pid();
    let mut c = Client::connect(&srv.unix, "vol", false).expect("connect");
    // One read consumed in full first, so the allocator has settled.
    assert!(c.read(0, len) == Ok(vec![0xab; len as usize]));
    let base = status_kib(pid, "VmRSS");
    // Reset the peak (VmHWM) to what is resident now.
    std::fs::write(format!("/proc/{pid}/clear_refs"), "5").expect("reset peak RSS");
    let before = reads_done(&srv.metrics, "vol");

    // 40 pipelined reads of the largest size (~1 KiB on the wire), replies never read.
    const N: usize = 40;
    let mut cookies = HashSet::new();
    for _ in 0..N {
        cookies.insert(c.send(cmd::READ, 0, 0, len, &[]));
    }
    // Wait until the server makes no more progress: no read completes for a second (or
    // all of them did, which the bound below then refuses).
    let deadline = Instant::now() + Duration::from_secs(120);
    let (mut last, mut since) = (reads_done(&srv.metrics, "vol"), Instant::now());
    while since.elapsed() < Duration::from_secs(1) && last - before < N as u64 {
        assert!(Instant::now() < deadline, "server never settled");
        std::thread::sleep(Duration::from_millis(50));
        let now = reads_done(&srv.metrics, "vol");
        if now != last {
            (last, since) = (now, Instant::now());
        }
    }
    let peak = status_kib(pid, "VmHWM");
    let grown_mib = peak.saturating_sub(base) / 1024;
    // What a connection may pin: its in-flight budget, plus the one request that may start
    // on the budget's last unit, plus slack for socket buffers and allocator rounding.
    let budget_mib = (MAX_INFLIGHT as u64 * u64::from(UNIT) + u64::from(len)) / MIB;
    let bound_mib = budget_mib + 32;
    eprintln!(
        "server RSS {} MiB -> peak {} MiB with {N} x {} MiB reads unread ({} completed); bound {bound_mib} MiB",
        base / 1024,
        peak / 1024,
        len / (1 << 20),
        last - before
    );
    assert!(
        grown_mib <= bound_mib,
        "server memory grew by {grown_mib} MiB with replies unread (bound {bound_mib} MiB)"
    );

    // Reading the replies lets the rest through: every request is answered.
    for _ in 0..N {
        let r = c.recv(|_| len as usize).expect("reply");
        assert_eq!(r.error, 0);
        assert!(cookies.remove(&r.cookie), "unknown or repeated cookie");
        assert!(r.data.iter().all(|b| *b == 0xab), "wrong data");
    }
    assert!(cookies.is_empty());
}

/// Creates a volume of `size` with data at both ends and a snapshot, stops the daemon
/// cleanly and starts it again; returns the restarted daemon's RSS (KiB) and start time.
fn rss_after_restart(tag: &str, size: u64) -> (u64, Duration) {
    let dir = TempDir::new(tag);
    let mut srv = ServerProc::start(dir.path());
    srv.create("v", size);
    let uri = srv.uri("v");
    let tail = size - 65536;
    qemu_io(
        &uri,
        &["write -P 0x11 0 64k", &format!("write -P 0x22 {tail} 64k")],
    );
    srv.control(slipway_blockstore::control::ControlRequest::Snapshot {
        volume: "v".into(),
        name: "s".into(),
    })
    .expect("snapshot");
    qemu_io(&uri, &["write -P 0x33 0 4k"]);
    assert!(srv.terminate().success(), "{}", srv.log());
    let started = Instant::now();
    let srv = ServerProc::start(dir.path());
    let took = started.elapsed();
    qemu_io(
        &uri,
        &[
            "read -P 0x33 0 4k",
            "read -P 0x11 4k 60k",
            &format!("read -P 0x22 {tail} 64k"),
        ],
    );
    (status_kib(srv.pid(), "VmRSS"), took)
}

#[test]
fn a_big_thin_volume_costs_what_is_allocated() {
    const TIB: u64 = 1 << 40;
    let (small, small_start) = rss_after_restart("map-small", 1 << 30);
    let (big, big_start) = rss_after_restart("map-big", 15 * TIB);
    eprintln!(
        "after a restart with a volume + snapshot: 1 GiB -> RSS {} MiB, started in {small_start:?}; \
         15 TiB -> RSS {} MiB, started in {big_start:?}",
        small / 1024,
        big / 1024
    );
    // A map sized by the volume costs a byte per extent per layer (two layers here); one
    // sized by what is allocated costs next to nothing more for the bigger volume.
    let extents = 15 * TIB / slipway_blockstore::format::DEFAULT_EXTENT_SIZE;
    let extra = big.saturating_sub(small) * 1024;
    assert!(
        extra < extents / 16,
        "a 15 TiB volume costs {extra} bytes more than a 1 GiB one ({extents} extents)"
    );
}

#[test]
fn volume_size_is_limited_to_what_one_data_file_holds() {
    use slipway_blockstore::control::ControlRequest;
    use slipway_blockstore::store::MAX_VOLUME_SIZE;
    let dir = TempDir::new("maxsize");
    let srv = ServerProc::start(dir.path());
    // The largest size works on ext4, to its last byte.
    srv.create("max", MAX_VOLUME_SIZE);
    let last = MAX_VOLUME_SIZE - 4096;
    qemu_io(
        &srv.uri("max"),
        &[
            &format!("write -P 0x7e {last} 4k"),
            &format!("read -P 0x7e {last} 4k"),
        ],
    );
    for size in [MAX_VOLUME_SIZE + 512, 64 << 40] {
        let err = srv
            .control(ControlRequest::Create {
                name: "toobig".into(),
                size,
            })
            .expect_err("a volume larger than the limit was created");
        assert!(
            err.contains(&format!("invalid size {size}")) && err.contains("maximum volume size"),
            "{err}"
        );
        let err = srv
            .control(ControlRequest::Resize {
                name: "max".into(),
                size,
            })
            .expect_err("a volume grew beyond the limit");
        assert!(err.contains("maximum volume size"), "{err}");
    }
    // Nothing half-made: one volume, one layer (data + map file).
    let list = srv.control(ControlRequest::List {}).expect("list");
    assert_eq!(list.volumes.len(), 1);
    let files = std::fs::read_dir(dir.path().join("data/layers"))
        .expect("layers dir")
        .count();
    assert_eq!(files, 2);
}
