//! The LB's world, shared by `slipway bench lb` and the LB's end-to-end tests: a client host, the
//! LB host running the daemon (on a thread inside the LB host's namespace), backend hosts that
//! run nginx or in-process echo servers, and a second client; plus long-lived echo streams
//! that notice any interruption. Every host is dual-stack on the underlay (`10.99.0.i/24` and
//! `fd99::i/64`), with an IPv4 and an IPv6 VIP pool. Built on
//! [`slipway_dataplane::world::World`], torn down on drop.

use std::collections::BTreeMap;
use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use slipway_dataplane::world::{Netns, Process, World};

use crate::LbError;
use crate::api::Client;
use crate::config::{LbConfig, PoolConfig};
use crate::daemon::DaemonHandle;
use crate::datapath::AttachPoint;

/// Host numbers in an [`LbWorld`]: host 1 is the client, host 2 the LB, hosts 3.. backends,
/// the last host a second client.
pub const CLIENT_HOST: usize = 1;
pub const LB_HOST: usize = 2;
pub const FIRST_BACKEND_HOST: usize = 3;

/// The VIP pool of the world, routed on-link from the clients (so they ARP for VIPs).
pub const VIP_POOL: &str = "10.99.100.0/24";
/// The IPv6 VIP pool, likewise on-link from the clients (so they resolve VIPs by NDP).
pub const VIP_POOL6: &str = "fd99:100::/120";

/// Host `index`'s IPv6 underlay address, `fd99::<index>` (a /64 on `eth0`).
pub fn host_ip6(index: usize) -> Ipv6Addr {
    Ipv6Addr::new(
        0xfd99,
        0,
        0,
        0,
        0,
        0,
        0,
        u16::try_from(index).unwrap_or(u16::MAX),
    )
}
/// Port of the in-process TCP and UDP echo servers.
pub const ECHO_PORT: u16 = 9000;

fn world_err(e: slipway_dataplane::DataplaneError) -> LbError {
    LbError::from(e)
}

/// Client, LB with its daemon, backends, second client.
#[derive(Debug)]
pub struct LbWorld {
    // Fields drop in this order: the daemon and the servers before their namespaces go.
    daemon: Option<DaemonHandle>,
    /// The daemon as a process ([`LbWorld::start_daemon_process`]); SIGKILLed on drop.
    process: Option<Process>,
    config: LbConfig,
    point: AttachPoint,
    nginx: BTreeMap<usize, Process>,
    echo: Vec<EchoServer>,
    dir: PathBuf,
    backends: usize,
    world: World,
}

impl LbWorld {
    /// A world with `backends` backend hosts and the LB daemon running on host 2 (TC).
    pub fn new(backends: usize) -> Result<Self, LbError> {
        Self::with_attach(backends, AttachPoint::Tc)
    }

    /// Likewise, with the LB program attached at `point`.
    pub fn with_attach(backends: usize, point: AttachPoint) -> Result<Self, LbError> {
        let world = World::builder()
            .hosts(backends + 3)
            .build()
            .map_err(world_err)?;
        let dir = std::env::temp_dir().join(world.name());
        fs::create_dir_all(&dir).map_err(|source| LbError::Syscall {
            call: "mkdir test directory",
            source,
        })?;
        let mut lbw = Self {
            daemon: None,
            process: None,
            config: LbConfig::new("eth0", Vec::new()),
            point,
            nginx: BTreeMap::new(),
            echo: Vec::new(),
            dir,
            backends,
            world,
        };
        // Without a multicast querier the bridge floods Neighbor Solicitations anyway; with
        // snooping off it does so from the first one, before any MLD report is seen.
        lbw.world
            .underlay()
            .ip(&[
                "link",
                "set",
                "br0",
                "type",
                "bridge",
                "mcast_snooping",
                "0",
            ])
            .map_err(world_err)?;
        for host in lbw.world.hosts() {
            // No duplicate address detection: no host of a world claims another's address,
            // and a link-local address still tentative for its first second or so would
            // silence the host's Neighbor Solicitations sent from it (the LB's, for a client it
            // answers from a VIP). The link goes down and up to get a link-local address that
            // is not tentative.
            // DAD is skipped only when both `all` and the device say so.
            host.netns
                .sysctl(&[
                    "net.ipv6.conf.all.accept_dad=0",
                    "net.ipv6.conf.eth0.accept_dad=0",
                ])
                .map_err(world_err)?;
            host.netns
                .ip(&["link", "set", "eth0", "down"])
                .map_err(world_err)?;
            host.netns
                .ip(&["link", "set", "eth0", "up"])
                .map_err(world_err)?;
            let ip6 = format!("{}/64", host_ip6(host.index));
            host.netns
                .ip(&["-6", "addr", "add", &ip6, "dev", "eth0", "nodad"])
                .map_err(world_err)?;
        }
        // The link-local address comes when the kernel sees the carrier, a moment after the
        // link is up; wait for it on every host, past DAD.
        for host in lbw.world.hosts() {
            wait_for(
                &format!("{}: a link-local address past DAD", host.netns.name()),
                Duration::from_secs(5),
                || {
                    let show = |filter: &str| {
                        host.netns
                            .ip(&["-6", "addr", "show", "dev", "eth0", "scope", "link", filter])
                            .ok()
                    };
                    let ready = show("-tentative")?.contains("inet6 fe80:");
                    let tentative = show("tentative")?.contains("inet6");
                    (ready && !tentative).then_some(())
                },
            )?;
        }
        for client in [lbw.client().clone(), lbw.client2().clone()] {
            client
                .ip(&["route", "add", VIP_POOL, "dev", "eth0"])
                .map_err(world_err)?;
            client
                .ip(&["-6", "route", "add", VIP_POOL6, "dev", "eth0"])
                .map_err(world_err)?;
        }
        let mut config = LbConfig::new(
            "eth0",
            vec![
                PoolConfig {
                    name: "ingress".into(),
                    cidr: VIP_POOL.into(),
                },
                PoolConfig {
                    name: "ingress6".into(),
                    cidr: VIP_POOL6.into(),
                },
            ],
        );
        config.socket = lbw.dir.join("lb.sock");
        config.pin_dir = Some(lbw.world.bpffs_dir().join("lb"));
        config.state_dir = lbw.dir.join("state");
        // Small maps: worlds run side by side, and the default 1M-flow tables take ~300 MB.
        config.maps = crate::config::MapSizes {
            services: 256,
            backends: 4096,
            flows: 65536,
        };
        config.garp_interval_ms = 200;
        lbw.config = config;
        lbw.start_daemon()?;
        Ok(lbw)
    }

    /// The daemon's configuration.
    pub fn config(&self) -> &LbConfig {
        &self.config
    }

    /// Stops the daemon and starts it again (on a thread) with `change` applied to its
    /// configuration.
    pub fn reconfigure(&mut self, change: impl FnOnce(&mut LbConfig)) -> Result<(), LbError> {
        self.stop_daemon()?;
        change(&mut self.config);
        self.start_daemon()
    }

    /// Starts the daemon on a thread inside the LB host (as [`LbWorld::new`] does).
    pub fn start_daemon(&mut self) -> Result<(), LbError> {
        let lb_ns = self.lb().name().to_owned();
        self.daemon = Some(DaemonHandle::start_in_netns_at(
            &lb_ns,
            self.config.clone(),
            self.point,
        )?);
        Ok(())
    }

    /// Stops the daemon, thread or process, the way an operator does (the thread's graceful
    /// shutdown; SIGTERM to the process, which must then exit 0).
    pub fn stop_daemon(&mut self) -> Result<(), LbError> {
        if let Some(daemon) = self.daemon.take() {
            daemon.stop()?;
        }
        if let Some(process) = self.process.take() {
            let pid = process
                .id()
                .and_then(|id| i32::try_from(id).ok())
                .ok_or_else(|| LbError::Api("daemon process without a pid".into()))?;
            nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGTERM,
            )
            .map_err(|e| LbError::Syscall {
                call: "kill(SIGTERM)",
                source: e.into(),
            })?;
            process.wait().map_err(world_err)?;
        }
        Ok(())
    }

    /// Kills the daemon process with SIGKILL and reaps it.
    pub fn kill_daemon(&mut self) -> Result<(), LbError> {
        match self.process.take() {
            Some(process) => {
                drop(process);
                Ok(())
            }
            None => Err(LbError::Api("no daemon process to kill".into())),
        }
    }

    /// Runs the daemon as a process of `bin` (the crate's `slipway-lb`) inside the LB host,
    /// with this world's configuration, after stopping the current one; waits until its API
    /// answers.
    pub fn start_daemon_process(&mut self, bin: &str) -> Result<(), LbError> {
        self.stop_daemon()?;
        let path = self.dir.join("lb.json");
        let json = serde_json::to_vec(&self.config).map_err(|e| LbError::Api(e.to_string()))?;
        fs::write(&path, json).map_err(|source| LbError::Syscall {
            call: "write daemon configuration",
            source,
        })?;
        let path = path.display().to_string();
        let mut argv = vec![bin, "serve", "--config", &path];
        if matches!(self.point, AttachPoint::Xdp(_)) {
            argv.push("--xdp");
        }
        self.process = Some(self.lb().spawn(&argv).map_err(world_err)?);
        let api = self.api();
        wait_for(
            "the daemon process answers",
            Duration::from_secs(30),
            || api.status().ok(),
        )?;
        Ok(())
    }

    pub fn world(&self) -> &World {
        &self.world
    }

    pub fn client(&self) -> &Netns {
        &self.world.host(CLIENT_HOST).netns
    }

    /// The second client, the world's last host.
    pub fn client2(&self) -> &Netns {
        &self.world.host(self.backends + 3).netns
    }

    pub fn client2_ip(&self) -> Ipv4Addr {
        self.world.host(self.backends + 3).underlay_ip
    }

    pub fn client_ip6(&self) -> Ipv6Addr {
        host_ip6(CLIENT_HOST)
    }

    pub fn client2_ip6(&self) -> Ipv6Addr {
        host_ip6(self.backends + 3)
    }

    pub fn lb_ip6(&self) -> Ipv6Addr {
        host_ip6(LB_HOST)
    }

    /// The backends' IPv6 addresses.
    pub fn backend_ip6s(&self) -> Vec<Ipv6Addr> {
        (0..self.backends)
            .map(|i| host_ip6(FIRST_BACKEND_HOST + i))
            .collect()
    }

    pub fn lb(&self) -> &Netns {
        &self.world.host(LB_HOST).netns
    }

    pub fn lb_ip(&self) -> Ipv4Addr {
        self.world.host(LB_HOST).underlay_ip
    }

    /// Backend `i` (0-based) and its address.
    pub fn backend(&self, i: usize) -> (&Netns, Ipv4Addr) {
        let host = self.world.host(FIRST_BACKEND_HOST + i);
        (&host.netns, host.underlay_ip)
    }

    pub fn backend_ips(&self) -> Vec<Ipv4Addr> {
        (0..self.backends).map(|i| self.backend(i).1).collect()
    }

    pub fn api(&self) -> Client {
        match &self.daemon {
            Some(d) => d.client(),
            None => Client::new(self.dir.join("lb.sock")),
        }
    }

    /// Starts nginx on backend `i`, port 80 of IPv4 and IPv6: it answers every request with
    /// "<its own address> <the client address it sees>\n".
    pub fn start_nginx(&mut self, i: usize) -> Result<(), LbError> {
        let (netns, _) = self.backend(i);
        let netns = netns.clone();
        let dir = self.dir.join(format!("nginx{i}"));
        fs::create_dir_all(&dir).map_err(|source| LbError::Syscall {
            call: "mkdir nginx directory",
            source,
        })?;
        let conf = dir.join("nginx.conf");
        let d = dir.display();
        fs::write(
            &conf,
            format!(
                "daemon off;\nmaster_process off;\nworker_processes 1;\npid {d}/nginx.pid;\n\
                 error_log stderr crit;\nevents {{ worker_connections 4096; }}\n\
                 http {{\n  access_log off;\n  client_body_temp_path {d}/body;\n\
                 proxy_temp_path {d}/proxy;\n  fastcgi_temp_path {d}/fastcgi;\n\
                 uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n\
                 keepalive_requests 1000000;\n\
                 server {{\n    listen 80 backlog=4096;\n    listen [::]:80 ipv6only=on backlog=4096;\n\
                 location / {{ return 200 \"$server_addr $remote_addr\\n\"; }}\n  }}\n}}\n"
            ),
        )
        .map_err(|source| LbError::Syscall {
            call: "write nginx.conf",
            source,
        })?;
        let conf = conf.display().to_string();
        let process = netns
            .spawn(&["nginx", "-c", &conf, "-e", "stderr"])
            .map_err(world_err)?;
        netns
            .wait_tcp_listen(80, Duration::from_secs(10))
            .map_err(world_err)?;
        self.nginx.insert(i, process);
        Ok(())
    }

    /// Kills backend `i`'s nginx (SIGKILL) and waits until nothing listens on port 80.
    pub fn kill_nginx(&mut self, i: usize) -> Result<(), LbError> {
        drop(self.nginx.remove(&i));
        let (netns, _) = self.backend(i);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let out = netns
                .run(&["ss", "-H", "-l", "-t", "-n", "sport = :80"])
                .map_err(world_err)?;
            if out.trim().is_empty() {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(LbError::Api(format!("nginx on backend {i} did not die")));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Starts TCP and UDP echo servers on [`ECHO_PORT`] of backend `i`, IPv4 and IPv6.
    pub fn start_echo(&mut self, i: usize) -> Result<(), LbError> {
        let (netns, ip) = self.backend(i);
        let netns = netns.clone();
        let ip6 = host_ip6(FIRST_BACKEND_HOST + i);
        self.echo.push(EchoServer::start(&netns, ip, ip6)?);
        Ok(())
    }

    /// `count` HTTP requests from `client` to `url_base` (e.g. "http://10.99.100.1" or
    /// "http://[fd99:100::1]"), each on a new connection; returns the answer lines
    /// ("<backend> <client as seen>").
    pub fn curl(client: &Netns, url_base: &str, count: usize) -> Result<Vec<String>, LbError> {
        let url = format!("{url_base}/?[1-{count}]");
        let out = client
            .exec(&[
                "curl",
                "-s",
                "--connect-timeout",
                "2",
                "--max-time",
                "60",
                "-H",
                "Connection: close",
                &url,
            ])
            .map_err(world_err)?;
        Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_owned)
            .collect())
    }
}

impl Drop for LbWorld {
    fn drop(&mut self) {
        self.daemon.take();
        self.process.take();
        self.nginx.clear();
        self.echo.clear();
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// Runs `f` on a new thread inside network namespace `netns`.
pub fn spawn_in<T: Send + 'static>(
    netns: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> JoinHandle<Result<T, LbError>> {
    let netns = netns.to_owned();
    std::thread::spawn(move || {
        slipway_dataplane::netns::enter(&netns)?;
        Ok(f())
    })
}

/// TCP and UDP echo servers on a backend, on one dual-stack socket each: a TCP connection
/// first gets "<backend ip>\n" (the address it reached, IPv4 or IPv6), then its bytes back; a
/// UDP datagram gets "<backend ip of its family> <datagram>" back.
#[derive(Debug)]
pub struct EchoServer {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<Result<(), LbError>>>,
}

impl EchoServer {
    pub fn start(netns: &Netns, ip: Ipv4Addr, ip6: Ipv6Addr) -> Result<Self, LbError> {
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<(), String>>();
        let tcp = {
            let stop = stop.clone();
            let ready = ready_tx.clone();
            spawn_in(netns.name(), move || {
                // [::] without IPV6_V6ONLY (the Linux default) takes IPv4 too, as mapped.
                let listener = match TcpListener::bind((Ipv6Addr::UNSPECIFIED, ECHO_PORT)) {
                    Ok(l) => l,
                    Err(e) => {
                        let _ = ready.send(Err(e.to_string()));
                        return;
                    }
                };
                let _ = listener.set_nonblocking(true);
                let _ = ready.send(Ok(()));
                while !stop.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((mut conn, _)) => {
                            let stop = stop.clone();
                            std::thread::spawn(move || {
                                let _ = conn.set_nonblocking(false);
                                let _ = conn.set_read_timeout(Some(Duration::from_millis(100)));
                                let Ok(local) = conn.local_addr() else {
                                    return;
                                };
                                let me = local.ip().to_canonical();
                                if conn.write_all(format!("{me}\n").as_bytes()).is_err() {
                                    return;
                                }
                                let mut buf = [0u8; 4096];
                                while !stop.load(Ordering::Relaxed) {
                                    match conn.read(&mut buf) {
                                        Ok(0) => return,
                                        Ok(n) => {
                                            if conn.write_all(&buf[..n]).is_err() {
                                                return;
                                            }
                                        }
                                        Err(e)
                                            if matches!(
                                                e.kind(),
                                                std::io::ErrorKind::WouldBlock
                                                    | std::io::ErrorKind::TimedOut
                                            ) => {}
                                        Err(_) => return,
                                    }
                                }
                            });
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(5)),
                    }
                }
            })
        };
        let udp = {
            let stop = stop.clone();
            spawn_in(netns.name(), move || {
                let socket = match UdpSocket::bind((Ipv6Addr::UNSPECIFIED, ECHO_PORT)) {
                    Ok(s) => s,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e.to_string()));
                        return;
                    }
                };
                let _ = socket.set_read_timeout(Some(Duration::from_millis(50)));
                let _ = ready_tx.send(Ok(()));
                let mut buf = [0u8; 2048];
                while !stop.load(Ordering::Relaxed) {
                    if let Ok((n, from)) = socket.recv_from(&mut buf) {
                        let me = match from.ip().to_canonical() {
                            IpAddr::V4(_) => IpAddr::V4(ip),
                            IpAddr::V6(_) => IpAddr::V6(ip6),
                        };
                        let mut answer = format!("{me} ").into_bytes();
                        answer.extend_from_slice(&buf[..n]);
                        let _ = socket.send_to(&answer, from);
                    }
                }
            })
        };
        let server = Self {
            stop,
            threads: vec![tcp, udp],
        };
        for _ in 0..2 {
            match ready_rx.recv_timeout(Duration::from_secs(10)) {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return Err(LbError::Api(format!("echo server: {e}"))),
                Err(_) => return Err(LbError::Api("echo server did not start".into())),
            }
        }
        Ok(server)
    }
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// What a long-lived echo stream saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamReport {
    /// The backend that greeted it.
    pub backend: IpAddr,
    /// Round trips completed.
    pub rounds: u64,
    /// Longest time between two completed round trips.
    pub max_gap: Duration,
    /// Why it ended before being stopped, if it did.
    pub error: Option<String>,
}

/// A TCP connection to an echo server through the VIP that does a round trip every 10 ms.
#[derive(Debug)]
pub struct EchoStream {
    stop: Arc<AtomicBool>,
    rounds: Arc<AtomicU64>,
    backend: IpAddr,
    thread: Option<JoinHandle<Result<StreamReport, LbError>>>,
}

impl EchoStream {
    /// Connects from `client` to `vip`:[`ECHO_PORT`] and starts the round trips.
    pub fn open(client: &Netns, vip: IpAddr) -> Result<Self, LbError> {
        let stop = Arc::new(AtomicBool::new(false));
        let rounds = Arc::new(AtomicU64::new(0));
        let (tx, rx) = std::sync::mpsc::channel::<Result<IpAddr, String>>();
        let thread = {
            let stop = stop.clone();
            let rounds = rounds.clone();
            spawn_in(client.name(), move || -> StreamReport {
                let greet = || -> Result<(TcpStream, IpAddr), String> {
                    let addr = SocketAddr::new(vip, ECHO_PORT);
                    let conn = TcpStream::connect_timeout(&addr, Duration::from_secs(3))
                        .map_err(|e| e.to_string())?;
                    conn.set_read_timeout(Some(Duration::from_secs(2)))
                        .map_err(|e| e.to_string())?;
                    let mut line = String::new();
                    BufReader::new(&conn)
                        .read_line(&mut line)
                        .map_err(|e| e.to_string())?;
                    let ip = line
                        .trim()
                        .parse()
                        .map_err(|_| format!("greeting {line:?}"))?;
                    Ok((conn, ip))
                };
                let (mut conn, backend) = match greet() {
                    Ok(ok) => ok,
                    Err(e) => {
                        let _ = tx.send(Err(e.clone()));
                        return StreamReport {
                            backend: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
                            rounds: 0,
                            max_gap: Duration::ZERO,
                            error: Some(e),
                        };
                    }
                };
                let _ = tx.send(Ok(backend));
                let mut report = StreamReport {
                    backend,
                    rounds: 0,
                    max_gap: Duration::ZERO,
                    error: None,
                };
                let mut last = Instant::now();
                let mut buf = [0u8; 8];
                while !stop.load(Ordering::Relaxed) {
                    let msg = report.rounds.to_be_bytes();
                    let trip = conn
                        .write_all(&msg)
                        .and_then(|()| conn.read_exact(&mut buf));
                    if let Err(e) = trip {
                        report.error = Some(e.to_string());
                        break;
                    }
                    if buf != msg {
                        report.error = Some(format!("echo {buf:?}, sent {msg:?}"));
                        break;
                    }
                    report.rounds += 1;
                    rounds.store(report.rounds, Ordering::Relaxed);
                    report.max_gap = report.max_gap.max(last.elapsed());
                    last = Instant::now();
                    std::thread::sleep(Duration::from_millis(10));
                }
                report
            })
        };
        match rx.recv_timeout(Duration::from_secs(10)) {
            Ok(Ok(backend)) => Ok(Self {
                stop,
                rounds,
                backend,
                thread: Some(thread),
            }),
            Ok(Err(e)) => Err(LbError::Api(format!("echo stream to {vip}: {e}"))),
            Err(_) => Err(LbError::Api(format!("echo stream to {vip}: no greeting"))),
        }
    }

    /// The backend the stream landed on.
    pub fn backend(&self) -> IpAddr {
        self.backend
    }

    /// Round trips so far.
    pub fn rounds(&self) -> u64 {
        self.rounds.load(Ordering::Relaxed)
    }

    /// Whether the stream's thread ended (on an error) by itself.
    pub fn ended(&self) -> bool {
        self.thread.as_ref().is_none_or(JoinHandle::is_finished)
    }

    /// Stops the stream and returns what it saw.
    pub fn finish(mut self) -> Result<StreamReport, LbError> {
        self.stop.store(true, Ordering::Relaxed);
        match self.thread.take() {
            Some(t) => t
                .join()
                .unwrap_or_else(|_| Err(LbError::Api("stream thread panicked".into()))),
            None => Err(LbError::Api("stream already finished".into())),
        }
    }
}

impl Drop for EchoStream {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// HTTP requests from a client host to `vip`:80, each on a connection of its own that has sent
/// only the request's first line: the server answers once [`HalfRequests::finish`] sends the
/// rest. Whatever carries that rest after a change (a failover) carries the established
/// connections.
#[derive(Debug)]
pub struct HalfRequests {
    go: std::sync::mpsc::Sender<()>,
    thread: Option<JoinHandle<Result<Result<usize, String>, LbError>>>,
}

impl HalfRequests {
    /// Opens `count` connections from `client` to `vip`:80, each having sent `GET path
    /// HTTP/1.0`.
    pub fn open(client: &Netns, vip: IpAddr, path: &str, count: usize) -> Result<Self, LbError> {
        let (opened, opened_rx) = std::sync::mpsc::channel::<Result<(), String>>();
        let (go, go_rx) = std::sync::mpsc::channel::<()>();
        let first = format!("GET {path} HTTP/1.0\r\n");
        let thread = spawn_in(client.name(), move || -> Result<usize, String> {
            let open = || -> Result<Vec<TcpStream>, String> {
                (0..count)
                    .map(|_| {
                        let addr = SocketAddr::new(vip, 80);
                        let mut conn = TcpStream::connect_timeout(&addr, Duration::from_secs(2))
                            .map_err(|e| format!("connect: {e}"))?;
                        conn.write_all(first.as_bytes())
                            .map_err(|e| format!("send: {e}"))?;
                        Ok(conn)
                    })
                    .collect()
            };
            let conns = open();
            let _ = opened.send(conns.as_ref().map(|_| ()).map_err(Clone::clone));
            let conns = conns?;
            go_rx.recv().map_err(|_| "not finished".to_owned())?;
            Ok(conns.iter().filter(|c| answered_ok(c)).count())
        });
        match opened_rx.recv_timeout(Duration::from_secs(30)) {
            Ok(Ok(())) => Ok(Self {
                go,
                thread: Some(thread),
            }),
            Ok(Err(e)) => Err(LbError::Api(format!("requests to {vip}: {e}"))),
            Err(_) => Err(LbError::Api(format!(
                "requests to {vip}: not opened in 30 s"
            ))),
        }
    }

    /// Sends the rest of every request; how many were answered 200.
    pub fn finish(mut self) -> Result<usize, LbError> {
        let _ = self.go.send(());
        match self.thread.take() {
            Some(t) => t
                .join()
                .unwrap_or_else(|_| Err(LbError::Api("request thread panicked".into())))?
                .map_err(LbError::Api),
            None => Err(LbError::Api("requests already finished".into())),
        }
    }
}

impl Drop for HalfRequests {
    fn drop(&mut self) {
        let _ = self.go.send(());
    }
}

/// Ends the request open on `conn` and reads the whole answer: whether it is a 200.
fn answered_ok(mut conn: &TcpStream) -> bool {
    let mut answer = Vec::new();
    conn.set_read_timeout(Some(Duration::from_secs(3))).is_ok()
        && conn.write_all(b"Host: vip\r\n\r\n").is_ok()
        && conn.read_to_end(&mut answer).is_ok()
        && answer.windows(5).any(|w| w == b" 200 ")
}

/// Sends one UDP datagram from `client` (a fresh socket, so a fresh source port) to
/// `vip:port` and returns the answer and the address it came from.
pub fn udp_exchange(
    client: &Netns,
    vip: IpAddr,
    port: u16,
    payload: &str,
) -> Result<(String, SocketAddr), LbError> {
    let payload = payload.to_owned();
    spawn_in(
        client.name(),
        move || -> Result<(String, SocketAddr), String> {
            let any = match vip {
                IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
                IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
            };
            let socket = UdpSocket::bind((any, 0)).map_err(|e| e.to_string())?;
            socket
                .set_read_timeout(Some(Duration::from_millis(500)))
                .map_err(|e| e.to_string())?;
            let mut buf = [0u8; 2048];
            // UDP may lose a datagram; three tries, each waiting 500 ms.
            for _ in 0..3 {
                socket
                    .send_to(payload.as_bytes(), (vip, port))
                    .map_err(|e| e.to_string())?;
                if let Ok((n, from)) = socket.recv_from(&mut buf) {
                    return Ok((String::from_utf8_lossy(&buf[..n]).into_owned(), from));
                }
            }
            Err("no answer".into())
        },
    )
    .join()
    .unwrap_or_else(|_| Err(LbError::Api("udp thread panicked".into())))?
    .map_err(|e| LbError::Api(format!("udp to {vip}:{port}: {e}")))
}

/// Polls `f` every 20 ms until it returns `Some`, or fails after `timeout`.
pub fn wait_for<T>(
    what: &str,
    timeout: Duration,
    mut f: impl FnMut() -> Option<T>,
) -> Result<T, LbError> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Ok(v);
        }
        if Instant::now() > deadline {
            return Err(LbError::Api(format!(
                "timed out after {timeout:?} waiting for {what}"
            )));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
