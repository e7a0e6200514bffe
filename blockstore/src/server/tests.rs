use super::*;
use crate::proto::cmd;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use std::collections::HashMap;

struct Dir(std::path::PathBuf);
impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

type Req = (u16, u16, u64, u32);

/// Reads the greeting and asks for export "vol" (and structured replies) with `NBD_OPT_GO`.
async fn send_options(client: &mut tokio::io::DuplexStream, structured: bool) {
    let mut g = [0u8; 18];
    client.read_exact(&mut g).await.expect("greeting");
    client.write_all(&3u32.to_be_bytes()).await.expect("flags");
    let mut opts = Vec::new();
    let mut put = |opt: u32, data: &[u8]| {
        opts.extend_from_slice(&proto::IHAVEOPT.to_be_bytes());
        opts.extend_from_slice(&opt.to_be_bytes());
        opts.extend_from_slice(&(data.len() as u32).to_be_bytes());
        opts.extend_from_slice(data);
    };
    if structured {
        put(proto::opt::STRUCTURED_REPLY, &[]);
    }
    let mut go = 3u32.to_be_bytes().to_vec();
    go.extend_from_slice(b"vol");
    go.extend_from_slice(&0u16.to_be_bytes());
    put(proto::opt::GO, &go);
    client.write_all(&opts).await.expect("options");
}

/// Reads option replies until the options [`send_options`] sent are acknowledged.
async fn read_option_acks(client: &mut tokio::io::DuplexStream, structured: bool) {
    let mut acks = 0;
    while acks < 1 + usize::from(structured) {
        let mut h = [0u8; 20];
        client.read_exact(&mut h).await.expect("option reply");
        let len = u32::from_be_bytes([h[16], h[17], h[18], h[19]]) as usize;
        let mut d = vec![0u8; len];
        client.read_exact(&mut d).await.expect("option payload");
        if u32::from_be_bytes([h[12], h[13], h[14], h[15]]) == proto::rep::ACK {
            acks += 1;
        }
    }
}

/// A stream that holds written bytes until it is flushed (as TLS does with the records
/// the socket could not take yet): each reply must reach the client while the client
/// waits for it, with no later write or close to push it out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replies_are_flushed_through_a_buffering_stream() {
    let dir = Dir(std::env::temp_dir().join(format!("slw-flush-{}", std::process::id())));
    let store = Store::open(&dir.0, 65536).expect("store");
    store.create("vol", 4 << 20).await.expect("volume");
    let server = Server::new(store, Arc::new(Metrics::new()), None);
    let (mut client, theirs) = tokio::io::duplex(64 << 10);
    let task = tokio::spawn(server.handle(tokio::io::BufWriter::new(theirs), false));
    send_options(&mut client, false).await;
    read_option_acks(&mut client, false).await;
    for (cookie, (command, length)) in [
        (cmd::WRITE, 4096u32),
        (cmd::READ, 1 << 20),
        (cmd::READ, 512),
    ]
    .into_iter()
    .enumerate()
    {
        let req = proto::Request {
            flags: 0,
            command,
            cookie: cookie as u64,
            offset: 0,
            length,
        };
        let mut wire = proto::encode_request(&req).to_vec();
        if command == cmd::WRITE {
            wire.resize(wire.len() + length as usize, 0x5a);
        }
        client.write_all(&wire).await.expect("request");
        let reply = async {
            let mut h = [0u8; 16];
            client.read_exact(&mut h).await.expect("reply header");
            assert_eq!(h[..4], proto::SIMPLE_REPLY_MAGIC.to_be_bytes());
            assert_eq!(h[4..8], [0; 4], "errno");
            assert_eq!(h[8..16], (cookie as u64).to_be_bytes());
            let mut data = vec![
                0u8;
                if command == cmd::READ {
                    length as usize
                } else {
                    0
                }
            ];
            client.read_exact(&mut data).await.expect("reply data");
            data
        };
        let data = tokio::time::timeout(Duration::from_secs(10), reply)
            .await
            .unwrap_or_else(|_| panic!("no reply to request {cookie} (command {command})"));
        assert!(
            data.iter().take(4096).all(|b| *b == 0x5a),
            "read back the write"
        );
    }
    drop(client);
    tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .expect("connection task did not end")
        .expect("connection task panicked");
}

/// Negotiates like a client, sends `reqs` (valid magic, arbitrary fields) and `tail`
/// (arbitrary bytes), half-closes, and checks every reply is well formed and the server
/// ends the connection.
async fn session(server: Arc<Server>, structured: bool, reqs: Vec<Req>, tail: Vec<u8>) {
    let (mut client, theirs) = tokio::io::duplex(1 << 22);
    let task = tokio::spawn(server.handle(theirs, false));
    send_options(&mut client, structured).await;
    let mut lens = HashMap::new();
    let mut wire = Vec::new();
    for (i, (command, flags, offset, length)) in reqs.into_iter().enumerate() {
        let r = proto::Request {
            flags,
            command,
            cookie: i as u64,
            offset,
            length,
        };
        wire.extend_from_slice(&proto::encode_request(&r));
        if command == cmd::WRITE {
            wire.resize(wire.len() + length as usize, 0xa5);
        }
        lens.insert(i as u64, if command == cmd::READ { length } else { 0 });
    }
    wire.extend_from_slice(&tail);
    client.write_all(&wire).await.expect("requests");
    client.shutdown().await.expect("half close");
    // Option replies first.
    read_option_acks(&mut client, structured).await;
    // Then replies until the server closes.
    let read_all = async {
        loop {
            let mut m = [0u8; 4];
            if client.read_exact(&mut m).await.is_err() {
                return;
            }
            match u32::from_be_bytes(m) {
                proto::SIMPLE_REPLY_MAGIC => {
                    let mut h = [0u8; 12];
                    client.read_exact(&mut h).await.expect("simple reply");
                    let err = u32::from_be_bytes([h[0], h[1], h[2], h[3]]);
                    let cookie = u64::from_be_bytes(h[4..12].try_into().expect("8"));
                    let len = *lens.get(&cookie).expect("reply to a request we sent");
                    if err == 0 && len > 0 {
                        let mut d = vec![0u8; len as usize];
                        client.read_exact(&mut d).await.expect("read data");
                    }
                }
                proto::STRUCTURED_REPLY_MAGIC => {
                    let mut h = [0u8; 16];
                    client.read_exact(&mut h).await.expect("chunk header");
                    let len = u32::from_be_bytes([h[12], h[13], h[14], h[15]]) as usize;
                    let mut d = vec![0u8; len];
                    client.read_exact(&mut d).await.expect("chunk payload");
                }
                other => panic!("bad reply magic {other:#x}"),
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(20), read_all)
        .await
        .expect("server did not close");
    tokio::time::timeout(Duration::from_secs(20), task)
        .await
        .expect("connection task did not end")
        .expect("connection task panicked");
}

#[test]
fn random_request_streams_are_answered_or_closed() {
    let dir = Dir(std::env::temp_dir().join(format!("slw-fuzz-{}", std::process::id())));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let server = rt.block_on(async {
        let store = Store::open(&dir.0, 65536).expect("store");
        store.create("vol", 1 << 20).await.expect("volume");
        Server::new(store, Arc::new(Metrics::new()), None)
    });
    let strategy = (
        any::<bool>(),
        proptest::collection::vec(
            (
                0u16..9,
                prop_oneof![Just(0u16), any::<u16>()],
                0u64..(1 << 21),
                0u32..70_000,
            ),
            0..8,
        ),
        proptest::collection::vec(any::<u8>(), 0..64),
    );
    let mut runner = TestRunner::new(Config {
        cases: 64,
        failure_persistence: None,
        ..Config::default()
    });
    let result = runner.run(&strategy, |(structured, reqs, tail)| {
        rt.block_on(session(Arc::clone(&server), structured, reqs, tail));
        Ok(())
    });
    drop(server);
    drop(rt);
    assert!(result.is_ok(), "{result:?}");
}
