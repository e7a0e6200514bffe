//! Durability: a client writes random blocks and FLUSHes (and uses FUA) while the server is
//! killed with SIGKILL at random points; after each restart every flushed block reads back.

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::{Client, Rng, ServerProc, TempDir};
use slipway_blockstore::control::ControlRequest;
use slipway_blockstore::proto::{cflags, cmd};

const BLOCK: usize = 4096;
const SIZE: u64 = 8 << 20;
const BLOCKS: u64 = SIZE / BLOCK as u64;
/// Kills that must land while a write is in flight (sent to a live server, not answered).
const MID_WRITE_KILLS: usize = 20;
/// Rounds allowed to get there (a kill may also land during a FLUSH or between requests).
const MAX_ROUNDS: usize = 60;

/// Content of `block` at `version` (version 0 = what the base pattern wrote).
fn content(block: u64, version: u64) -> Vec<u8> {
    let mut rng = Rng((block << 20) ^ version.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ 0xabcd);
    let mut b = vec![0u8; BLOCK];
    rng.fill(&mut b);
    b
}

/// What each block may contain after a crash.
#[derive(Default)]
struct Model {
    /// Last version known durable.
    durable: HashMap<u64, u64>,
    /// Versions written (or in flight) since, any of which may have survived.
    maybe: HashMap<u64, Vec<u64>>,
    /// Acknowledged but not yet flushed.
    acked: HashMap<u64, u64>,
}

#[test]
fn flushed_writes_survive_sigkill() {
    let dir = TempDir::new("crash");
    let mut srv = ServerProc::start(dir.path());
    srv.create("vol", SIZE);
    let mut model = Model::default();
    // Base content, then a snapshot so later writes go through copy-on-write.
    {
        let mut c = Client::connect(&srv.unix, "vol", false).expect("connect");
        for b in 0..BLOCKS / 2 {
            c.write(b * BLOCK as u64, &content(b, 0), 0)
                .expect("base write");
            model.durable.insert(b, 0);
        }
        c.flush().expect("flush");
    }
    srv.control(ControlRequest::Snapshot {
        volume: "vol".into(),
        name: "base".into(),
    })
    .expect("snapshot");

    let mut rng = Rng(0x00c0_ffee);
    let mut version = 1u64;
    let mut total_flushes = 0;
    let mut kills_mid_write = 0;
    let mut rounds = 0;
    for round in 0..MAX_ROUNDS {
        if kills_mid_write >= MID_WRITE_KILLS {
            break;
        }
        rounds += 1;
        let mut c = Client::connect(&srv.unix, "vol", round % 2 == 0).expect("connect");
        let pid = srv.pid();
        let delay = Duration::from_millis(20 + rng.below(120));
        let killer = std::thread::spawn(move || {
            std::thread::sleep(delay);
            let _ = std::process::Command::new("kill")
                .args(["-9", &pid.to_string()])
                .status();
        });
        let start = Instant::now();
        loop {
            if start.elapsed() > Duration::from_secs(10) {
                panic!("server was not killed");
            }
            let op = rng.below(10);
            if op == 0 {
                // FLUSH: everything acknowledged becomes durable once it is answered.
                if c.flush().is_err() {
                    break;
                }
                total_flushes += 1;
                for (b, v) in model.acked.drain() {
                    model.durable.insert(b, v);
                    model.maybe.remove(&b);
                }
                continue;
            }
            let b = rng.below(BLOCKS);
            let v = version;
            version += 1;
            let fua = op == 1;
            model.maybe.entry(b).or_default().push(v);
            let flags = if fua { cflags::FUA } else { 0 };
            if c.try_send(
                cmd::WRITE,
                flags,
                b * BLOCK as u64,
                BLOCK as u32,
                &content(b, v),
            )
            .is_err()
            {
                // The server's socket was already closed: the kill came between requests.
                break;
            }
            match c.recv(|_| 0) {
                Ok(r) if r.error == 0 && fua => {
                    model.durable.insert(b, v);
                    model.maybe.remove(&b);
                    model.acked.remove(&b);
                }
                Ok(r) if r.error == 0 => {
                    model.acked.insert(b, v);
                }
                Ok(r) => panic!("write refused with error {}", r.error),
                Err(_) => {
                    // The write reached a live server and was never answered: the kill
                    // landed while it was in flight.
                    kills_mid_write += 1;
                    break;
                }
            }
        }
        killer.join().expect("killer thread");
        srv.kill9();
        srv = ServerProc::start(dir.path());

        // Verify every block ever written, then adopt what is on disk as the new durable state.
        let mut c = Client::connect(&srv.unix, "vol", false).expect("reconnect");
        let mut blocks: Vec<u64> = model
            .durable
            .keys()
            .chain(model.maybe.keys())
            .copied()
            .collect();
        blocks.sort_unstable();
        blocks.dedup();
        for b in blocks {
            let got = c.read(b * BLOCK as u64, BLOCK as u32).expect("read back");
            let mut allowed: Vec<u64> = model.maybe.get(&b).cloned().unwrap_or_default();
            let durable = model.durable.get(&b).copied();
            let matched = allowed
                .iter()
                .copied()
                .chain(durable)
                .find(|v| content(b, *v) == got);
            allowed.extend(durable);
            match matched {
                Some(v) => {
                    model.durable.insert(b, v);
                }
                None if durable.is_none() && got == vec![0u8; BLOCK] => {}
                None => panic!(
                    "round {round}: block {b} lost flushed data (durable {durable:?}, allowed {allowed:?})"
                ),
            }
        }
        model.maybe.clear();
        model.acked.clear();
        // The snapshot never changes.
        let mut s = Client::connect(&srv.unix, "vol@base", false).expect("snapshot");
        for b in [0, BLOCKS / 4, BLOCKS / 2 - 1] {
            assert_eq!(s.read(b * BLOCK as u64, BLOCK as u32), Ok(content(b, 0)));
        }
        assert_eq!(
            s.read((BLOCKS / 2) * BLOCK as u64, BLOCK as u32),
            Ok(vec![0u8; BLOCK])
        );
    }
    eprintln!("{kills_mid_write} of {rounds} kills landed while a write was in flight");
    assert!(
        kills_mid_write >= MID_WRITE_KILLS,
        "only {kills_mid_write} of {rounds} kills landed while a write was in flight"
    );
    assert!(
        total_flushes > rounds,
        "too few flushes exercised: {total_flushes}"
    );
}
