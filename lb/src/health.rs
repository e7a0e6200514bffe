//! Active health checks of backends: a TCP connect, or an HTTP GET that must answer 2xx/3xx,
//! every interval with a timeout; `rise` consecutive successes bring a failed backend back,
//! `fall` consecutive failures take it out (HAProxy's model). The threshold logic is pure
//! ([`Health`]); [`probe`] does the I/O.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::time::timeout;

/// Rise/fall state of one backend endpoint. A new backend starts healthy, so that a service
/// takes traffic at once; a dead one leaves after `fall` probes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Health {
    pub healthy: bool,
    /// Consecutive results that disagree with `healthy`.
    streak: u32,
    /// Probes run so far.
    pub probes: u64,
    /// Results of the last probe.
    pub last_ok: Option<bool>,
}

impl Default for Health {
    fn default() -> Self {
        Self {
            healthy: true,
            streak: 0,
            probes: 0,
            last_ok: None,
        }
    }
}

impl Health {
    /// Records one probe result; returns the new state if it changed.
    pub fn observe(&mut self, ok: bool, rise: u32, fall: u32) -> Option<bool> {
        self.probes += 1;
        self.last_ok = Some(ok);
        if ok == self.healthy {
            self.streak = 0;
            return None;
        }
        self.streak += 1;
        let needed = if ok { rise } else { fall };
        if self.streak >= needed.max(1) {
            self.healthy = ok;
            self.streak = 0;
            Some(ok)
        } else {
            None
        }
    }
}

/// One probe of `addr`: TCP connect, then with `http_path` a GET whose status must be 2xx or
/// 3xx, all within `limit`.
pub async fn probe(addr: SocketAddr, http_path: Option<&str>, limit: Duration) -> bool {
    timeout(limit, probe_inner(addr, http_path))
        .await
        .unwrap_or(false)
}

/// Source ports of probes: above every port the datapath uses for SNAT (`LB_SNAT_PORT_END`
/// in ebpf/include/lb_core.h), so a backend's answer to a probe is never taken for the reply
/// to a translated flow.
pub const PROBE_PORTS: std::ops::Range<u16> = 61000..65535;

/// Connects from a port in [`PROBE_PORTS`], over the backend's family.
async fn connect(addr: SocketAddr) -> std::io::Result<TcpStream> {
    static NEXT: AtomicU16 = AtomicU16::new(0);
    let span = PROBE_PORTS.end - PROBE_PORTS.start;
    let mut last = std::io::Error::from(std::io::ErrorKind::AddrInUse);
    for _ in 0..16 {
        let port = PROBE_PORTS.start + NEXT.fetch_add(1, Ordering::Relaxed) % span;
        let (socket, any) = match addr {
            SocketAddr::V4(_) => (TcpSocket::new_v4()?, IpAddr::V4(Ipv4Addr::UNSPECIFIED)),
            SocketAddr::V6(_) => (TcpSocket::new_v6()?, IpAddr::V6(Ipv6Addr::UNSPECIFIED)),
        };
        match socket.bind(SocketAddr::new(any, port)) {
            Ok(()) => return socket.connect(addr).await,
            Err(e) => last = e,
        }
    }
    Err(last)
}

async fn probe_inner(addr: SocketAddr, http_path: Option<&str>) -> bool {
    let Ok(mut stream) = connect(addr).await else {
        return false;
    };
    let Some(path) = http_path else {
        return true;
    };
    let request = format!(
        "GET {path} HTTP/1.0\r\nHost: {}\r\nUser-Agent: slipway-lb-health\r\n\r\n",
        addr.ip()
    );
    if stream.write_all(request.as_bytes()).await.is_err() {
        return false;
    }
    let mut head = [0u8; 16];
    let mut got = 0;
    while got < 12 {
        match stream.read(&mut head[got..]).await {
            Ok(0) | Err(_) => return false,
            Ok(n) => got += n,
        }
    }
    http_status_ok(&head[..got])
}

/// Whether a response starting with `head` ("HTTP/1.x NNN") has a 2xx or 3xx status.
pub fn http_status_ok(head: &[u8]) -> bool {
    head.starts_with(b"HTTP/1.")
        && head.len() >= 12
        && head[8] == b' '
        && matches!(head[9], b'2' | b'3')
        && head[10].is_ascii_digit()
        && head[11].is_ascii_digit()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn falls_after_fall_failures_and_rises_after_rise_successes() {
        let mut h = Health::default();
        assert!(h.healthy);
        assert_eq!(h.observe(false, 2, 3), None);
        assert_eq!(h.observe(false, 2, 3), None);
        assert_eq!(
            h.observe(true, 2, 3),
            None,
            "a success resets the failure streak"
        );
        assert_eq!(h.observe(false, 2, 3), None);
        assert_eq!(h.observe(false, 2, 3), None);
        assert_eq!(h.observe(false, 2, 3), Some(false));
        assert!(!h.healthy);
        assert_eq!(h.observe(true, 2, 3), None);
        assert_eq!(h.observe(false, 2, 3), None);
        assert_eq!(h.observe(true, 2, 3), None);
        assert_eq!(h.observe(true, 2, 3), Some(true));
        assert_eq!(h.probes, 10);
    }

    #[test]
    fn parses_http_status_lines() {
        assert!(http_status_ok(b"HTTP/1.1 200 OK"));
        assert!(http_status_ok(b"HTTP/1.0 301 Moved"));
        assert!(!http_status_ok(b"HTTP/1.1 503 Service"));
        assert!(!http_status_ok(b"HTTP/1.1 404 Not"));
        assert!(!http_status_ok(b"SSH-2.0-OpenSSH"));
        assert!(!http_status_ok(b"HTTP/1.1 2"));
    }

    #[tokio::test]
    async fn probes_real_sockets() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let server = tokio::spawn(async move {
            for status in ["200 OK", "500 Internal Server Error"] {
                let (mut s, _) = listener.accept().await.expect("accept");
                let mut buf = [0u8; 256];
                let _ = s.read(&mut buf).await;
                let _ = s
                    .write_all(format!("HTTP/1.1 {status}\r\n\r\n").as_bytes())
                    .await;
            }
            listener
        });
        let limit = Duration::from_secs(2);
        assert!(probe(addr, Some("/healthz"), limit).await);
        assert!(!probe(addr, Some("/healthz"), limit).await);
        let listener = server.await.expect("server");
        assert!(probe(addr, None, limit).await, "TCP connect succeeds");
        drop(listener);
        assert!(!probe(addr, None, limit).await, "nothing listens any more");
    }

    #[tokio::test]
    async fn probes_ipv6_backends_over_ipv6() {
        let listener = tokio::net::TcpListener::bind("[::1]:0")
            .await
            .expect("bind the IPv6 loopback");
        let addr = listener.local_addr().expect("addr");
        let accept = tokio::spawn(async move {
            let (_, peer) = listener.accept().await.expect("accept");
            peer
        });
        assert!(probe(addr, None, Duration::from_secs(2)).await);
        let peer = accept.await.expect("peer");
        assert!(peer.is_ipv6(), "{peer}");
        assert!(PROBE_PORTS.contains(&peer.port()), "{peer}");
    }
}
