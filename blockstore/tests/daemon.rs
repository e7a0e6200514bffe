//! The daemon's life cycle against real processes: a clean stop (SIGTERM) keeps every
//! acknowledged write, a second daemon never takes over a running one's sockets, and the
//! default log level says what happens.

mod common;

use std::os::unix::net::UnixListener;
use std::time::{Duration, Instant};

use common::{Client, Rng, ServerOpts, ServerProc, TempDir};
use slipway_blockstore::control::ControlRequest;
use slipway_blockstore::proto::{self, cmd};

const MIB: u64 = 1 << 20;

fn random(seed: u64, len: usize) -> Vec<u8> {
    let mut b = vec![0u8; len];
    Rng(seed).fill(&mut b);
    b
}

/// Polls `cond` every 20 ms until it holds or `within` passes.
fn wait_for(within: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + within;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn sigterm_keeps_every_acknowledged_write() {
    let dir = TempDir::new("sigterm");
    let mut srv = ServerProc::start(dir.path());
    srv.create("vol", 4 * MIB);
    // 64 KiB across an extent boundary, acknowledged, never flushed; the client vanishes
    // without FLUSH or DISC.
    let gone = random(1, 64 * 1024);
    let mut c = Client::connect(&srv.unix, "vol", false).expect("connect");
    c.write(96 * 1024, &gone, 0).expect("write");
    drop(c);
    // A second client is still connected (structured replies) when the stop comes.
    let stays = random(2, 64 * 1024);
    let mut c2 = Client::connect(&srv.unix, "vol", true).expect("connect");
    c2.write(3 * MIB, &stays, 0).expect("write");

    let status = srv.terminate();
    assert!(
        status.success(),
        "clean stop failed ({status}):\n{}",
        srv.log()
    );
    assert!(!srv.unix.exists() && !srv.control.exists(), "sockets left");
    // The connected client was closed.
    let mut b = [0u8; 1];
    assert!(
        matches!(std::io::Read::read(&mut c2.s, &mut b), Ok(0) | Err(_)),
        "connection left open"
    );

    let srv = ServerProc::start(dir.path());
    let mut c = Client::connect(&srv.unix, "vol", false).expect("reconnect");
    assert!(
        c.read(96 * 1024, 64 * 1024) == Ok(gone),
        "unflushed write lost"
    );
    assert!(
        c.read(3 * MIB, 64 * 1024) == Ok(stays),
        "unflushed write lost"
    );
}

#[test]
fn sigterm_stops_even_when_a_client_never_reads_its_replies() {
    let dir = TempDir::new("sigterm-stuck");
    let mut srv = ServerProc::start(dir.path());
    srv.create("vol", 64 * MIB);
    let data = random(3, 64 * 1024);
    let mut c = Client::connect(&srv.unix, "vol", false).expect("connect");
    c.write(0, &data, 0).expect("write");
    // Replies this client never reads: the server cannot finish them.
    let mut stuck = Client::connect(&srv.unix, "vol", false).expect("connect");
    for _ in 0..8 {
        stuck.send(cmd::READ, 0, 0, proto::MAX_PAYLOAD, &[]);
    }
    let status = srv.terminate();
    assert!(status.success(), "{status}\n{}", srv.log());
    assert!(
        srv.log().contains("did not finish their requests in time"),
        "{}",
        srv.log()
    );
    let srv = ServerProc::start(dir.path());
    let mut c = Client::connect(&srv.unix, "vol", false).expect("reconnect");
    assert!(c.read(0, 64 * 1024) == Ok(data), "unflushed write lost");
}

#[test]
fn second_daemon_refuses_live_sockets_and_replaces_stale_ones() {
    let a_dir = TempDir::new("live-a");
    let mut a = ServerProc::start(a_dir.path());
    a.create("a-vol", MIB);

    // Same NBD and control sockets, another data directory: refused, nothing made.
    let b_dir = TempDir::new("live-b");
    let opts = ServerOpts {
        unix: a.unix.clone(),
        control: a.control.clone(),
        ..ServerOpts::in_dir(b_dir.path())
    };
    let err = match ServerProc::spawn(b_dir.path(), opts) {
        Ok(_) => panic!("a second daemon took over live sockets"),
        Err(e) => e,
    };
    assert!(
        err.contains("in use by a running daemon") && err.contains(&a.unix.display().to_string()),
        "{err}"
    );
    assert!(
        !b_dir.path().join("data").exists(),
        "refused daemon made its data directory"
    );
    // Only the control socket is shared: the daemon's own NBD socket is removed again.
    let opts = ServerOpts {
        control: a.control.clone(),
        ..ServerOpts::in_dir(b_dir.path())
    };
    let err = match ServerProc::spawn(b_dir.path(), opts) {
        Ok(_) => panic!("a second daemon took over a live control socket"),
        Err(e) => e,
    };
    assert!(
        err.contains("control socket") && err.contains("in use by a running daemon"),
        "{err}"
    );
    assert!(
        !b_dir.path().join("nbd.sock").exists(),
        "refused daemon left its socket"
    );
    // The first daemon never noticed.
    let list = a.control(ControlRequest::List {}).expect("list");
    assert_eq!(list.volumes.len(), 1);
    assert_eq!(list.volumes[0].name, "a-vol");
    let mut c = Client::connect(&a.unix, "a-vol", false).expect("connect to the first daemon");
    assert_eq!(c.read(0, 512), Ok(vec![0u8; 512]));
    drop(c);

    // Killed: its socket files stay behind, nobody listens; a new daemon replaces them.
    a.kill9();
    assert!(a.unix.exists() && a.control.exists());
    let c_dir = TempDir::new("live-c");
    let opts = ServerOpts {
        unix: a.unix.clone(),
        control: a.control.clone(),
        ..ServerOpts::in_dir(c_dir.path())
    };
    let mut c = ServerProc::spawn(c_dir.path(), opts).expect("stale sockets are replaced");
    c.create("c-vol", MIB);
    let names: Vec<String> = c
        .control(ControlRequest::List {})
        .expect("list")
        .volumes
        .into_iter()
        .map(|v| v.name)
        .collect();
    assert_eq!(names, ["c-vol"]);

    // On exit a daemon removes only the socket files it created: someone else's socket now
    // at its control path stays.
    std::fs::remove_file(&c.control).expect("remove control socket");
    let foreign = UnixListener::bind(&c.control).expect("bind a foreign socket");
    let status = c.terminate();
    assert!(status.success(), "{status}\n{}", c.log());
    assert!(
        c.control.exists(),
        "daemon removed a socket it did not create"
    );
    assert!(!c.unix.exists(), "daemon left its own socket");
    drop(foreign);
}

#[test]
fn logs_at_info_by_default() {
    let dir = TempDir::new("logs");
    let opts = ServerOpts {
        rust_log: None,
        ..ServerOpts::in_dir(dir.path())
    };
    let mut srv = ServerProc::spawn(dir.path(), opts).expect("start");
    srv.create("vol", MIB);
    let mut c = Client::connect(&srv.unix, "vol", false).expect("connect");
    c.write(0, &[1u8; 4096], 0).expect("write");
    c.disconnect();
    let logged = wait_for(Duration::from_secs(10), || {
        srv.log().contains("client disconnected")
    });
    assert!(logged, "no disconnect logged:\n{}", srv.log());
    let status = srv.terminate();
    assert!(status.success());
    let log = srv.log();
    for line in [
        "store opened",
        "serving",
        "volume created",
        "client connected",
        "client disconnected",
        "stopped",
    ] {
        assert!(
            log.contains(line),
            "{line:?} not logged at the default level:\n{log}"
        );
    }
    assert!(log.contains(" INFO "), "{log}");
}
