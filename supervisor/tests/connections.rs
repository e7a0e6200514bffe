//! What unauthenticated and greedy clients can hold: idle TCP and trickling TLS connections are
//! closed within the handshake and header-read timeouts, a connection flood past the
//! per-address cap is refused while an authenticated client is served, watches per user are
//! capped, and early error responses survive HTTP/2.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{Supervisor, TempDir};
use hyper::Method;
use slipway_supervisor::client::{Client, base64_decode};
use tokio::io::AsyncReadExt;

/// The timeouts the first test sets; the acceptance is that connections close within
/// them (a little scheduling slack is allowed on top).
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(1);
const HEADER_TIMEOUT: Duration = Duration::from_secs(2);
const SLACK: Duration = Duration::from_secs(1);

fn addr(sup: &Supervisor) -> SocketAddr {
    sup.addr.parse().expect("supervisor address")
}

/// Waits for the peer to close `s`; returns how long after `start` it did, or None if it was
/// still open at `give_up`.
fn closed_after(s: &mut TcpStream, start: Instant, give_up: Duration) -> Option<Duration> {
    s.set_read_timeout(Some(Duration::from_millis(200)))
        .expect("read timeout");
    let mut buf = [0u8; 512];
    while start.elapsed() < give_up {
        match s.read(&mut buf) {
            Ok(0) => return Some(start.elapsed()),
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return Some(start.elapsed()),
        }
    }
    None
}

fn tls_config(sup: &Supervisor) -> Arc<rustls::ClientConfig> {
    let pem = std::fs::read(sup.dir.join("pki/ca.crt")).expect("CA certificate");
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls::pki_types::pem::PemObject::pem_slice_iter(&pem) {
        roots.add(c.expect("CA PEM")).expect("CA root");
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Arc::new(cfg)
}

#[test]
fn idle_tcp_and_trickling_tls_are_closed_within_the_timeouts() {
    let dir = TempDir::new("timeouts");
    let sup = Supervisor::start(
        dir.path(),
        "redb",
        &[
            "--handshake-timeout",
            &format!("{}ms", HANDSHAKE_TIMEOUT.as_millis()),
            "--header-read-timeout",
            &format!("{}ms", HEADER_TIMEOUT.as_millis()),
        ],
    );

    // A TCP connection that never starts TLS.
    let start = Instant::now();
    let mut idle = TcpStream::connect(addr(&sup)).expect("connect");
    let closed = closed_after(&mut idle, start, HANDSHAKE_TIMEOUT + SLACK * 3);
    eprintln!("idle TCP connection closed after {closed:?}");
    assert!(
        closed.is_some_and(|t| t <= HANDSHAKE_TIMEOUT + SLACK),
        "idle TCP connection closed after {closed:?}, handshake timeout {HANDSHAKE_TIMEOUT:?}"
    );

    // A TLS connection that sends one header line every 300 ms and never ends its headers.
    let start = Instant::now();
    let tcp = TcpStream::connect(addr(&sup)).expect("connect");
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").expect("server name");
    let conn = rustls::ClientConnection::new(tls_config(&sup), name).expect("TLS client");
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    tls.write_all(b"GET /api HTTP/1.1\r\nHost: x\r\n")
        .expect("TLS handshake and first line");
    let mut closed = None;
    while start.elapsed() < HEADER_TIMEOUT + SLACK * 3 {
        std::thread::sleep(Duration::from_millis(300));
        if tls.write_all(b"X-Trickle: 1\r\n").is_err() || tls.flush().is_err() {
            closed = Some(start.elapsed());
            break;
        }
        tls.sock
            .set_read_timeout(Some(Duration::from_millis(10)))
            .expect("read timeout");
        let mut buf = [0u8; 512];
        match tls.read(&mut buf) {
            Ok(_) => {
                closed = Some(start.elapsed());
                break;
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => {
                closed = Some(start.elapsed());
                break;
            }
        }
    }
    eprintln!("trickling TLS connection closed after {closed:?}");
    assert!(
        closed.is_some_and(|t| t <= HEADER_TIMEOUT + SLACK),
        "trickling TLS connection closed after {closed:?}, header timeout {HEADER_TIMEOUT:?}"
    );
    // An HTTP/2 connection that completes TLS and never sends a request.
    let start = Instant::now();
    let tcp = TcpStream::connect(addr(&sup)).expect("connect");
    let mut cfg = (*tls_config(&sup)).clone();
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").expect("server name");
    let conn = rustls::ClientConnection::new(Arc::new(cfg), name).expect("TLS client");
    let mut h2 = rustls::StreamOwned::new(conn, tcp);
    h2.flush().expect("TLS handshake");
    while h2.conn.is_handshaking() {
        h2.conn.complete_io(&mut h2.sock).expect("TLS handshake");
    }
    let closed = closed_after(&mut h2.sock, start, HEADER_TIMEOUT + SLACK * 3);
    eprintln!("idle HTTP/2 connection closed after {closed:?}");
    assert!(
        closed.is_some_and(|t| t <= HEADER_TIMEOUT + SLACK),
        "idle HTTP/2 connection closed after {closed:?}, header timeout {HEADER_TIMEOUT:?}"
    );

    // Well-behaved clients are unaffected.
    sup.kubectl(&["get", "ns"]).ok();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flood_past_the_cap_is_refused_while_an_authenticated_client_is_served()
-> anyhow::Result<()> {
    const PER_CLIENT: usize = 20;
    const FLOOD: usize = 100;
    const WATCHES: usize = 2;
    let dir = TempDir::new("flood");
    let sup = tokio::task::block_in_place(|| {
        Supervisor::start(
            dir.path(),
            "redb",
            &[
                "--max-connections-per-client",
                &PER_CLIENT.to_string(),
                "--max-watches-per-user",
                &WATCHES.to_string(),
                "--handshake-timeout",
                "60s",
            ],
        )
    });
    let server = addr(&sup);
    // The flood comes from another loopback address than the authenticated client.
    let mut flood = Vec::new();
    for _ in 0..FLOOD {
        let s = tokio::net::TcpSocket::new_v4()?;
        s.bind(SocketAddr::from(([127, 0, 0, 2], 0)))?;
        flood.push(s.connect(server).await?);
    }
    let mut refused = 0;
    let mut held = 0;
    for s in &mut flood {
        let mut buf = [0u8; 16];
        match tokio::time::timeout(Duration::from_millis(300), s.read(&mut buf)).await {
            Ok(Ok(0) | Err(_)) => refused += 1,
            Ok(Ok(_)) => {}
            Err(_) => held += 1,
        }
    }
    assert_eq!(
        held, PER_CLIENT,
        "connections held from the flooding address"
    );
    assert_eq!(refused, FLOOD - PER_CLIENT, "connections refused");

    // Meanwhile an authenticated client is served.
    let out = tokio::task::block_in_place(|| sup.kubectl(&["get", "ns", "default"]));
    out.ok();
    let client = Client::from_kubeconfig(&sup.kubeconfig())?;
    let metrics = client
        .call(Method::GET, "/metrics", None, "text/plain", Vec::new())
        .await?;
    let metrics = String::from_utf8_lossy(&metrics.body).into_owned();
    assert!(
        metrics.contains(&format!(
            "slipway_apiserver_connections_refused_total {}",
            FLOOD - PER_CLIENT
        )),
        "{metrics}"
    );

    // Watches per user: the cap holds, the next one is 429, and a slot comes back.
    let watch = "/api/v1/namespaces/default/services?watch=true";
    let mut open = Vec::new();
    for _ in 0..WATCHES {
        let r = client
            .send(Method::GET, watch, None, "application/json", Vec::new())
            .await?;
        assert_eq!(r.status(), 200);
        open.push(r);
    }
    let over = client
        .call(Method::GET, watch, None, "application/json", Vec::new())
        .await;
    let err = over
        .expect_err("a watch past the cap is refused")
        .to_string();
    assert!(err.contains("too many open watches"), "{err}");
    drop(open);
    let again = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let r = client
                .send(Method::GET, watch, None, "application/json", Vec::new())
                .await?;
            if r.status() == 200 {
                return Ok::<_, anyhow::Error>(());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    assert!(
        matches!(again, Ok(Ok(()))),
        "no watch slot came back: {again:?}"
    );
    drop(flood);
    Ok(())
}

/// Runs curl over HTTP/2; returns (exit code, HTTP code).
fn curl_h2(args: &[&str]) -> (i32, u16) {
    let out = std::process::Command::new("curl")
        .args(["-sk", "--http2", "-o", "/dev/null", "-w", "%{http_code}"])
        .args(args)
        .output()
        .expect("curl");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).parse().unwrap_or(0),
    )
}

#[test]
fn early_error_responses_reach_http2_clients() {
    let dir = TempDir::new("h2");
    let sup = Supervisor::start(dir.path(), "redb", &[]);
    let url = format!("https://{}/api/v1/namespaces/default/services", sup.addr);
    let small = dir.path().join("small.json");
    std::fs::write(&small, vec![b'a'; 200_000]).expect("body");
    let small_arg = format!("@{}", small.display());
    let results: Vec<(i32, u16)> = (0..20)
        .map(|_| {
            curl_h2(&[
                "-X",
                "POST",
                "-H",
                "Content-Type: application/json",
                "--data-binary",
                &small_arg,
                &url,
            ])
        })
        .collect();
    assert!(
        results.iter().all(|r| *r == (0, 401)),
        "unauthenticated POSTs over h2: {results:?}"
    );

    // 50 MiB from an authenticated client: refused as too large, not a stream error.
    let kubeconfig = std::fs::read_to_string(sup.kubeconfig()).expect("kubeconfig");
    let field = |name: &str| {
        kubeconfig
            .lines()
            .find_map(|l| l.trim().strip_prefix(name))
            .and_then(|v| base64_decode(v.trim()))
            .expect("kubeconfig credential")
    };
    let cert = dir.path().join("client.crt");
    let key = dir.path().join("client.key");
    std::fs::write(&cert, field("client-certificate-data:")).expect("cert");
    std::fs::write(&key, field("client-key-data:")).expect("key");
    let big = dir.path().join("big.json");
    std::fs::write(&big, vec![b' '; 50 * 1024 * 1024]).expect("body");
    let (rc, code) = curl_h2(&[
        "--cert",
        &cert.display().to_string(),
        "--key",
        &key.display().to_string(),
        "-X",
        "POST",
        "-H",
        "Content-Type: application/json",
        "--data-binary",
        &format!("@{}", big.display()),
        &url,
    ]);
    assert!(
        rc == 0 && (code == 400 || code == 413),
        "50 MiB POST over h2: curl exit {rc}, HTTP {code}"
    );
}
