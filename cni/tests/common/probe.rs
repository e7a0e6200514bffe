//! Real traffic for the NetworkPolicy truth tables: TCP and UDP echo servers inside pods' network
//! namespaces, probes from pod to pod (a new connection each, short timeouts, all in parallel),
//! long-lived connections for the policy-update cases, and the expected reachability matrix
//! with its builder, after upstream's `Reachability` (kubernetes test/e2e/network/netpol).
//!
//! setns(2) moves only the calling thread, so every probe runs on a thread spawned for it that
//! enters the source pod's namespace and ends with the probe; servers bind their sockets on such
//! a thread and keep them: a socket stays in the namespace it was created in, whichever thread
//! uses it later.

use std::fmt;
use std::fs::File;
use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use nix::sched::{CloneFlags, setns};
use nix::sys::socket::{Shutdown, shutdown};

/// The namespaces and pod names of the truth tables, in matrix order (namespace-major).
pub const NAMESPACES: [&str; 3] = ["x", "y", "z"];
pub const PODS: [&str; 3] = ["a", "b", "c"];
/// Pods in the matrix: 3 namespaces x 3 pods.
pub const N: usize = 9;

/// "x/a" for matrix index 0, "z/c" for 8.
pub fn pod_name(index: usize) -> String {
    format!("{}/{}", NAMESPACES[index / 3], PODS[index % 3])
}

/// The matrix index of "ns/pod".
pub fn pod_index(name: &str) -> usize {
    (0..N)
        .find(|&i| pod_name(i) == name)
        .unwrap_or_else(|| panic!("no pod {name:?} in the truth table"))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Protocol {
    Tcp,
    Udp,
}

/// A probed port: protocol and number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Port {
    pub protocol: Protocol,
    pub number: u16,
}

impl Port {
    pub const fn tcp(number: u16) -> Self {
        Self {
            protocol: Protocol::Tcp,
            number,
        }
    }

    pub const fn udp(number: u16) -> Self {
        Self {
            protocol: Protocol::Udp,
            number,
        }
    }

    /// The protocol as the policy API spells it.
    pub fn protocol_name(&self) -> &'static str {
        match self.protocol {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
        }
    }
}

impl fmt::Display for Port {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.protocol_name(), self.number)
    }
}

pub const TCP_80: Port = Port::tcp(80);
pub const TCP_81: Port = Port::tcp(81);
pub const UDP_80: Port = Port::udp(80);
pub const UDP_81: Port = Port::udp(81);
/// Every port each pod serves and each case probes.
pub const ALL_PORTS: [Port; 4] = [TCP_80, TCP_81, UDP_80, UDP_81];

/// A pod's network namespace, opened once so that probe threads can enter it.
#[derive(Debug, Clone)]
pub struct PodNs {
    pub name: String,
    file: Arc<File>,
}

impl PodNs {
    pub fn open(netns: &str) -> Self {
        let path = slipway_dataplane::netns::path(netns);
        let file = File::open(&path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
        Self {
            name: netns.to_owned(),
            file: Arc::new(file),
        }
    }

    /// Moves the calling thread into the namespace for the rest of its life: only for threads
    /// spawned to do work there.
    fn enter(&self) {
        setns(&*self.file, CloneFlags::CLONE_NEWNET)
            .unwrap_or_else(|e| panic!("setns into {}: {e}", self.name));
    }

    /// Runs `f` on a new thread inside the namespace.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        thread::scope(|scope| {
            scope
                .spawn(|| {
                    self.enter();
                    f()
                })
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })
    }
}

/// Echo servers on TCP and UDP ports inside one pod: TCP echoes every byte of every
/// connection, UDP sends every datagram back to its sender. Stopped on drop.
#[derive(Debug)]
pub struct Servers {
    stop: Arc<AtomicBool>,
    listeners: Vec<TcpListener>,
    threads: Vec<JoinHandle<()>>,
}

/// How long server threads block before looking at the stop flag.
const SERVER_TICK: Duration = Duration::from_millis(200);

enum Bound {
    Tcp(TcpListener),
    Udp(UdpSocket),
}

impl Servers {
    /// Binds `ports` on 0.0.0.0 inside `pod` and serves them on background threads.
    pub fn start(pod: &PodNs, ports: &[Port]) -> Self {
        let bound: Vec<Bound> = pod.run(|| {
            ports
                .iter()
                .map(|p| match p.protocol {
                    Protocol::Tcp => Bound::Tcp(
                        TcpListener::bind((Ipv4Addr::UNSPECIFIED, p.number))
                            .unwrap_or_else(|e| panic!("bind {p} in {}: {e}", pod.name)),
                    ),
                    Protocol::Udp => Bound::Udp(
                        UdpSocket::bind((Ipv4Addr::UNSPECIFIED, p.number))
                            .unwrap_or_else(|e| panic!("bind {p} in {}: {e}", pod.name)),
                    ),
                })
                .collect()
        });
        let stop = Arc::new(AtomicBool::new(false));
        let mut listeners = Vec::new();
        let mut threads = Vec::new();
        for socket in bound {
            let stop = stop.clone();
            match socket {
                Bound::Tcp(listener) => {
                    listeners.push(listener.try_clone().expect("dup listener"));
                    threads.push(thread::spawn(move || accept_loop(&listener, &stop)));
                }
                Bound::Udp(socket) => {
                    threads.push(thread::spawn(move || udp_echo(&socket, &stop)));
                }
            }
        }
        Self {
            stop,
            listeners,
            threads,
        }
    }
}

impl Drop for Servers {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // shutdown(2) on a listening socket wakes a blocked accept(2) (it fails with EINVAL).
        for listener in &self.listeners {
            let _ = shutdown(listener.as_raw_fd(), Shutdown::Both);
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn accept_loop(listener: &TcpListener, stop: &Arc<AtomicBool>) {
    loop {
        let accepted = listener.accept();
        if stop.load(Ordering::SeqCst) {
            return;
        }
        match accepted {
            Ok((stream, _)) => {
                let stop = stop.clone();
                thread::spawn(move || tcp_echo(stream, &stop));
            }
            Err(_) => thread::sleep(Duration::from_millis(5)),
        }
    }
}

fn tcp_echo(mut stream: TcpStream, stop: &AtomicBool) {
    let _ = stream.set_read_timeout(Some(SERVER_TICK));
    let mut buf = [0u8; 4096];
    while !stop.load(Ordering::SeqCst) {
        match stream.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => {
                if stream.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(_) => return,
        }
    }
}

fn udp_echo(socket: &UdpSocket, stop: &AtomicBool) {
    let _ = socket.set_read_timeout(Some(SERVER_TICK));
    let mut buf = [0u8; 2048];
    while !stop.load(Ordering::SeqCst) {
        if let Ok((n, from)) = socket.recv_from(&mut buf) {
            let _ = socket.send_to(&buf[..n], from);
        }
    }
}

/// One probe: a new connection from the pod `src` to `dst`:`port`.
#[derive(Debug, Clone)]
pub struct Probe {
    pub src: PodNs,
    pub dst: Ipv4Addr,
    pub port: Port,
}

/// Runs every probe at once, each on its own thread in its source namespace; whether each got
/// through, in order. A probe succeeds only if data made the round trip within `timeout` per
/// step: TCP connects, sends a byte and reads it back; UDP sends a datagram and reads the echo.
pub fn run_probes(probes: &[Probe], timeout: Duration) -> Vec<bool> {
    thread::scope(|scope| {
        let handles: Vec<_> = probes
            .iter()
            .map(|p| {
                thread::Builder::new()
                    .stack_size(256 * 1024)
                    .spawn_scoped(scope, move || {
                        p.src.enter();
                        probe_once(p.dst, p.port, timeout)
                    })
                    .expect("spawn probe thread")
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
            })
            .collect()
    })
}

static NONCE: AtomicU64 = AtomicU64::new(1);

/// One probe from the calling thread's namespace.
fn probe_once(dst: Ipv4Addr, port: Port, timeout: Duration) -> bool {
    let addr = SocketAddr::from((dst, port.number));
    match port.protocol {
        Protocol::Tcp => {
            let Ok(mut stream) = TcpStream::connect_timeout(&addr, timeout) else {
                return false;
            };
            exchange_on(&mut stream, b'p', timeout)
        }
        Protocol::Udp => {
            let Ok(socket) = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)) else {
                return false;
            };
            // Connected: only datagrams from dst:port are read, and an ICMP error fails the read.
            if socket.connect(addr).is_err() {
                return false;
            }
            let nonce = NONCE.fetch_add(1, Ordering::Relaxed).to_be_bytes();
            if socket.send(&nonce).is_err() {
                return false;
            }
            let deadline = Instant::now() + timeout;
            let mut buf = [0u8; 64];
            loop {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() || socket.set_read_timeout(Some(left)).is_err() {
                    return false;
                }
                match socket.recv(&mut buf) {
                    Ok(n) if buf[..n] == nonce => return true,
                    Ok(_) => {}
                    Err(_) => return false,
                }
            }
        }
    }
}

/// Sends `byte` and waits up to `timeout` for it to come back.
fn exchange_on(stream: &mut TcpStream, byte: u8, timeout: Duration) -> bool {
    if stream.set_read_timeout(Some(timeout)).is_err()
        || stream.set_write_timeout(Some(timeout)).is_err()
        || stream.write_all(&[byte]).is_err()
    {
        return false;
    }
    let mut back = [0u8; 1];
    stream.read_exact(&mut back).is_ok() && back[0] == byte
}

/// A connection kept open across policy updates, exchanging one byte at a time with an echo
/// server: a TCP stream, or a connected UDP socket (one flow: the same addresses and ports).
#[derive(Debug)]
pub struct OpenConnection {
    pub label: String,
    channel: Channel,
    next: u8,
}

#[derive(Debug)]
enum Channel {
    Tcp(TcpStream),
    Udp(UdpSocket),
}

impl OpenConnection {
    /// Opens a flow from inside `src` to `dst`:`port`, TCP or UDP, labelled with the names.
    pub fn connect(
        src: &PodNs,
        src_name: &str,
        dst: Ipv4Addr,
        dst_name: &str,
        port: Port,
        timeout: Duration,
    ) -> std::io::Result<Self> {
        let addr = SocketAddr::from((dst, port.number));
        let channel = src.run(|| match port.protocol {
            Protocol::Tcp => TcpStream::connect_timeout(&addr, timeout).map(Channel::Tcp),
            Protocol::Udp => {
                let socket = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))?;
                socket.connect(addr)?;
                Ok(Channel::Udp(socket))
            }
        })?;
        Ok(Self {
            label: format!("{src_name} -> {dst_name} {port}"),
            channel,
            next: 1,
        })
    }

    /// Sends the next byte; whether its echo came back within `timeout`. Bytes are numbered,
    /// so a late echo of an earlier byte never passes for this one.
    pub fn exchange(&mut self, timeout: Duration) -> bool {
        let byte = self.next;
        self.next = self.next.wrapping_add(1).max(1);
        let sent = match &mut self.channel {
            Channel::Tcp(stream) => stream.write_all(&[byte]).is_ok(),
            Channel::Udp(socket) => socket.send(&[byte]).is_ok(),
        };
        if !sent {
            return false;
        }
        let deadline = Instant::now() + timeout;
        let mut back = [0u8; 16];
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            let read = match &mut self.channel {
                Channel::Tcp(stream) => stream
                    .set_read_timeout(Some(left))
                    .and_then(|()| stream.read(&mut back[..1])),
                Channel::Udp(socket) => socket
                    .set_read_timeout(Some(left))
                    .and_then(|()| socket.recv(&mut back)),
            };
            match read {
                Ok(1) if back[0] == byte => return true,
                Ok(n) if n > 0 => {}
                _ => return false,
            }
        }
    }
}

/// An expected (or observed) 9x9 reachability matrix, rows the sources, columns the
/// destinations. Built like upstream's: start from all allowed or all denied, then set peers.
/// Pods are named "ns/pod"; "*" stands for any namespace or any pod ("x/*", "*/a", "*").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reachability {
    cells: [[bool; N]; N],
}

impl Reachability {
    pub fn new(default: bool) -> Self {
        Self {
            cells: [[default; N]; N],
        }
    }

    /// Sets every pair matching `from` -> `to`.
    pub fn expect(mut self, from: &str, to: &str, allowed: bool) -> Self {
        let (froms, tos) = (matching(from), matching(to));
        for &f in &froms {
            for &t in &tos {
                self.cells[f][t] = allowed;
            }
        }
        self
    }

    /// Sets everything into `to`.
    pub fn expect_all_ingress(self, to: &str, allowed: bool) -> Self {
        self.expect("*", to, allowed)
    }

    /// Sets everything out of `from`.
    pub fn expect_all_egress(self, from: &str, allowed: bool) -> Self {
        self.expect(from, "*", allowed)
    }

    /// What the policies say about `from` -> `to`.
    pub fn policy_allows(&self, from: usize, to: usize) -> bool {
        self.cells[from][to]
    }

    /// What a probe must see: the policy verdict, except that a pod always reaches itself
    /// (loopback never crosses the datapath; upstream's `AllowLoopback`, and the Kubernetes
    /// docs: pods cannot block access to themselves).
    pub fn probe_allows(&self, from: usize, to: usize) -> bool {
        from == to || self.cells[from][to]
    }
}

/// Matrix indices matching "ns/pod" with "*" wildcards, or "*" for all.
fn matching(pattern: &str) -> Vec<usize> {
    let (ns, pod) = if pattern == "*" {
        ("*", "*")
    } else {
        pattern
            .split_once('/')
            .unwrap_or_else(|| panic!("{pattern:?} is not ns/pod"))
    };
    assert!(
        ns == "*" || NAMESPACES.contains(&ns),
        "no namespace {ns:?} in {pattern:?}"
    );
    assert!(
        pod == "*" || PODS.contains(&pod),
        "no pod {pod:?} in {pattern:?}"
    );
    (0..N)
        .filter(|&i| (ns == "*" || NAMESPACES[i / 3] == ns) && (pod == "*" || PODS[i % 3] == pod))
        .collect()
}

/// One cell of an observed matrix.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Seen {
    Allowed,
    Denied,
    /// Not looked at (explain is not asked about a pod and itself).
    #[default]
    NotChecked,
    /// Asked, and no verdict came back.
    Unknown,
}

impl From<bool> for Seen {
    fn from(allowed: bool) -> Self {
        if allowed { Seen::Allowed } else { Seen::Denied }
    }
}

/// A grid of `expected` beside `observed` (`.` allowed, `X` denied, `-` not checked, `?` no
/// answer; `!` marks the cells where they differ), followed by the differing pairs.
pub fn render(
    what: &str,
    expected: impl Fn(usize, usize) -> bool,
    observed: impl Fn(usize, usize) -> Seen,
) -> String {
    let mark = |b: bool| if b { '.' } else { 'X' };
    let header: String = (0..N).map(|t| format!("{:>4}", pod_name(t))).collect();
    let mut out = format!(
        "{what}: rows are sources, columns destinations; . allowed, X denied, ! differs\n\
         {:<6}{header}    | {:<6}{header}\n",
        "expect", "seen"
    );
    let mut diffs = Vec::new();
    for f in 0..N {
        let mut left = format!("{:<6}", pod_name(f));
        let mut right = left.clone();
        for t in 0..N {
            let e = expected(f, t);
            left.push_str(&format!("{:>4}", mark(e)));
            let seen = observed(f, t);
            let (symbol, differs) = match seen {
                Seen::Allowed => ('.', !e),
                Seen::Denied => ('X', e),
                Seen::NotChecked => ('-', false),
                Seen::Unknown => ('?', true),
            };
            right.push_str(&format!("{:>3}{}", symbol, if differs { '!' } else { ' ' }));
            if differs {
                diffs.push(format!(
                    "{} -> {}: expected {}, seen {seen:?}",
                    pod_name(f),
                    pod_name(t),
                    if e { "allowed" } else { "denied" },
                ));
            }
        }
        out.push_str(&format!("{left}    | {right}\n"));
    }
    for d in diffs {
        out.push_str(&format!("  {d}\n"));
    }
    out
}
