//! Socket-level service translation on live traffic: processes in a host's cgroup, in the host
//! namespace and in a pod, reach a ClusterIP (and a NodePort on the host's address) through
//! three backend pods that answer with their own name; connections spread over every backend,
//! a removed backend gets no new connection, UDP replies come from the service address, a
//! process outside the cgroup is not translated, and no iptables/nftables rule appears.
//! Privileged (root, BPF, netns, cgroup v2): run by scripts/test.sh with `--features privileged`.

use std::collections::BTreeMap;
use std::io::{ErrorKind, Write};
use std::net::{Ipv4Addr, TcpListener, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use slipway_dataplane::abi::EndpointInfo;
use slipway_dataplane::abi::services::{MAX_REVERSE, MAX_SERVICES, MAX_SLOTS, SvcEvent};
use slipway_dataplane::netns;
use slipway_dataplane::pod::PodDatapath;
use slipway_dataplane::services::{
    Backend, REVERSE_MAP, SERVICES_MAP, SLOTS_MAP, ServiceDatapath, ServiceError, ServiceKey,
};
use slipway_dataplane::world::cgroup::{CGROUP2_ROOT, Cgroup};
use slipway_dataplane::world::{Netns, Pod, World};

const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const TCP_PORT: u16 = 80;
const UDP_PORT: u16 = 53;
const NODE_PORT: u16 = 30080;
/// Where every backend listens (TCP and UDP).
const BACKEND_PORT: u16 = 8080;
const BACKENDS: [(&str, Ipv4Addr); 3] = [
    ("be1", Ipv4Addr::new(10, 244, 1, 11)),
    ("be2", Ipv4Addr::new(10, 244, 1, 12)),
    ("be3", Ipv4Addr::new(10, 244, 1, 13)),
];
const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 20);
/// Connections per spread check: the chance that one of 3 backends gets none of them is
/// 3 * (2/3)^60, about 1e-10.
const SPREAD: usize = 60;

/// A backend: TCP and UDP servers bound inside a pod that answer with the pod's name.
struct Server {
    stop: Arc<AtomicBool>,
    accepted: Arc<AtomicUsize>,
    threads: Vec<JoinHandle<()>>,
}

impl Server {
    fn start(pod: &Pod, name: &'static str) -> Self {
        // Sockets belong to the namespace they are created in, whichever thread uses them.
        let (tcp, udp) = netns::run_in(pod.netns.name(), || {
            let tcp = TcpListener::bind((Ipv4Addr::UNSPECIFIED, BACKEND_PORT))?;
            let udp = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, BACKEND_PORT))?;
            std::io::Result::Ok((tcp, udp))
        })
        .expect("setns")
        .expect("bind");
        tcp.set_nonblocking(true).expect("nonblocking");
        udp.set_read_timeout(Some(Duration::from_millis(20)))
            .expect("timeout");
        let stop = Arc::new(AtomicBool::new(false));
        let accepted = Arc::new(AtomicUsize::new(0));
        let reply = format!("{name}\n");
        let tcp_thread = {
            let (stop, accepted, reply) = (stop.clone(), accepted.clone(), reply.clone());
            thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    match tcp.accept() {
                        Ok((mut stream, _)) => {
                            accepted.fetch_add(1, Ordering::Relaxed);
                            let _ = stream.set_nonblocking(false);
                            let _ = stream.write_all(reply.as_bytes());
                        }
                        Err(e) if e.kind() == ErrorKind::WouldBlock => {
                            thread::sleep(Duration::from_millis(2));
                        }
                        Err(_) => thread::sleep(Duration::from_millis(2)),
                    }
                }
            })
        };
        let udp_thread = {
            let stop = stop.clone();
            thread::spawn(move || {
                let mut buf = [0u8; 1500];
                while !stop.load(Ordering::Relaxed) {
                    if let Ok((_, peer)) = udp.recv_from(&mut buf) {
                        let _ = udp.send_to(reply.as_bytes(), peer);
                    }
                }
            })
        };
        Self {
            stop,
            accepted,
            threads: vec![tcp_thread, udp_thread],
        }
    }

    fn accepted(&self) -> usize {
        self.accepted.load(Ordering::Relaxed)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

fn endpoint(pod: &Pod) -> EndpointInfo {
    EndpointInfo {
        ifindex: pod.host_ifindex,
        pod_mac: pod.pod_mac,
        host_mac: pod.host_mac,
    }
}

fn backends(names: &[&str]) -> Vec<Backend> {
    BACKENDS
        .iter()
        .filter(|(name, _)| names.contains(name))
        .map(|(_, ip)| Backend::new(*ip, BACKEND_PORT))
        .collect()
}

/// `n` TCP connections in a row to `addr:port` from one process in `cgroup` and `ns`; what
/// each connection read (a backend's name, or FAILED).
fn tcp_names(cgroup: &Cgroup, ns: &Netns, addr: &str, port: u16, n: usize) -> Vec<String> {
    let script =
        format!("for i in $(seq {n}); do nc -w 2 {addr} {port} </dev/null || echo FAILED; done");
    let out = cgroup
        .run(ns, &["timeout", "60", "sh", "-c", &script])
        .expect("tcp client");
    out.lines().map(str::to_owned).collect()
}

/// How many times each name occurs.
fn tally(names: &[String]) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for name in names {
        *counts.entry(name.clone()).or_default() += 1;
    }
    counts
}

/// Sends `n` UDP datagrams to `addr:port` from one socket (IPv6 if `addr` is, connected with
/// `connected`), each answered before the next; prints "<source address>:<port> <payload>" per
/// reply, the source as `recvfrom` reported it.
const UDP_CLIENT: &str = r#"
use strict; use Socket qw(:all);
my ($ip, $port, $n, $mode) = @ARGV;
my $v6 = $ip =~ /:/;
socket(my $s, $v6 ? PF_INET6 : PF_INET, SOCK_DGRAM, 0) or die "socket: $!\n";
my $dest = $v6 ? sockaddr_in6($port, inet_pton(AF_INET6, $ip)) : sockaddr_in($port, inet_aton($ip));
if ($mode eq "connected") { connect($s, $dest) or die "connect: $!\n"; }
for my $i (1..$n) {
    my $sent = $mode eq "connected" ? send($s, "ping", 0) : send($s, "ping", 0, $dest);
    defined $sent or die "send: $!\n";
    my $rin = ''; vec($rin, fileno($s), 1) = 1;
    select(my $rout = $rin, undef, undef, 2) > 0 or die "no reply to datagram $i\n";
    my $from = recv($s, my $buf, 1500, 0);
    defined $from or die "recv: $!\n";
    my ($fport, $faddr) = $v6 ? sockaddr_in6($from) : sockaddr_in($from);
    chomp $buf;
    print inet_ntop($v6 ? AF_INET6 : AF_INET, $faddr), ":$fport $buf\n";
}
"#;

fn udp_client(
    cgroup: &Cgroup,
    ns: &Netns,
    addr: &str,
    port: u16,
    n: usize,
    connected: bool,
) -> std::process::Output {
    let (port, n) = (port.to_string(), n.to_string());
    let mode = if connected { "connected" } else { "sendto" };
    cgroup
        .exec(
            ns,
            &[
                "timeout", "30", "perl", "-e", UDP_CLIENT, addr, &port, &n, mode,
            ],
        )
        .expect("udp client")
}

/// What [`udp_client`] printed, as (source, payload) pairs; fails unless it succeeded.
fn udp_replies(
    cgroup: &Cgroup,
    ns: &Netns,
    addr: &str,
    port: u16,
    n: usize,
    connected: bool,
) -> Vec<(String, String)> {
    let output = udp_client(cgroup, ns, addr, port, n, connected);
    assert!(
        output.status.success(),
        "udp client: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let out = String::from_utf8_lossy(&output.stdout);
    out.lines()
        .map(|line| {
            let (from, name) = line.split_once(' ').unwrap_or((line, ""));
            (from.to_owned(), name.to_owned())
        })
        .collect()
}

/// How many programs are attached to the cgroup at `path` (bpftool's view).
fn attached(path: &std::path::Path) -> usize {
    let out = std::process::Command::new("bpftool")
        .args(["-j", "cgroup", "show"])
        .arg(path)
        .output()
        .expect("bpftool");
    let programs: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    programs.as_array().map_or(0, Vec::len)
}

/// Connects a TCP or UDP socket to `addr:port`, reads one answer (sending a datagram first
/// for UDP), and prints "<getpeername address>:<port> <answer>".
const PEER_CLIENT: &str = r#"
use strict; use Socket qw(:all);
my ($proto, $ip, $port) = @ARGV;
my $v6 = $ip =~ /:/;
socket(my $s, $v6 ? PF_INET6 : PF_INET, $proto eq "udp" ? SOCK_DGRAM : SOCK_STREAM, 0)
    or die "socket: $!\n";
my $dest = $v6 ? sockaddr_in6($port, inet_pton(AF_INET6, $ip)) : sockaddr_in($port, inet_aton($ip));
connect($s, $dest) or die "connect: $!\n";
my ($pport, $paddr) = $v6 ? sockaddr_in6(getpeername($s)) : sockaddr_in(getpeername($s));
my $answer;
if ($proto eq "udp") {
    defined send($s, "ping", 0) or die "send: $!\n";
    my $rin = ''; vec($rin, fileno($s), 1) = 1;
    select(my $rout = $rin, undef, undef, 2) > 0 or die "no reply\n";
    defined recv($s, $answer, 1500, 0) or die "recv: $!\n";
} else {
    $answer = <$s>;
}
chomp $answer;
print inet_ntop($v6 ? AF_INET6 : AF_INET, $paddr), ":$pport $answer\n";
"#;

/// What `getpeername` reports for a socket connected to `addr:port`, and what it read.
fn peer(cgroup: &Cgroup, ns: &Netns, proto: &str, addr: &str, port: u16) -> String {
    cgroup
        .run(
            ns,
            &[
                "timeout",
                "10",
                "perl",
                "-e",
                PEER_CLIENT,
                proto,
                addr,
                &port.to_string(),
            ],
        )
        .expect("peer client")
        .trim()
        .to_owned()
}

/// The capacity of the map pinned at `path`, as the kernel reports it.
fn max_entries(path: &std::path::Path) -> u32 {
    let out = std::process::Command::new("bpftool")
        .args(["-j", "map", "show", "pinned"])
        .arg(path)
        .output()
        .expect("bpftool");
    let info: serde_json::Value = serde_json::from_slice(&out.stdout).expect("bpftool json");
    info["max_entries"]
        .as_u64()
        .and_then(|n| u32::try_from(n).ok())
        .expect("max_entries")
}

/// The iptables (nft and legacy backends) and nft rulesets of `ns`, without the comment lines
/// that carry timestamps. A tool that is not installed is recorded as such.
fn rulesets(ns: &Netns) -> String {
    let mut all = String::new();
    for argv in [
        &["iptables-nft-save"][..],
        &["iptables-legacy-save"][..],
        &["nft", "list", "ruleset"][..],
    ] {
        all.push_str(&format!("== {}\n", argv.join(" ")));
        match ns.exec(argv) {
            Ok(out) => {
                let text = String::from_utf8_lossy(&out.stdout);
                for line in text.lines().filter(|l| !l.starts_with('#')) {
                    all.push_str(line);
                    all.push('\n');
                }
            }
            Err(_) => all.push_str("(not installed)\n"),
        }
    }
    all
}

#[test]
#[cfg_attr(
    not(feature = "privileged"),
    ignore = "privileged: root + BPF + netns + cgroup v2; run scripts/test.sh"
)]
fn services_are_translated_at_the_socket_for_processes_in_the_cgroup() {
    let world = World::builder().hosts(1).build().expect("world");
    let host = world.host(1).clone();
    let mut pods = Vec::new();
    for (name, ip) in BACKENDS {
        pods.push(world.add_pod(1, name, ip).expect("backend pod"));
    }
    let client = world.add_pod(1, "cl", CLIENT_IP).expect("client pod");

    // Pod-to-pod through the pod-veth datapath; the host reaches the pods by plain routes.
    let mut pod_dp = PodDatapath::load(Some(&world.bpffs_dir().join("pod"))).expect("pod dp");
    for pod in pods.iter().chain([&client]) {
        netns::run_in(host.netns.name(), || pod_dp.attach(&pod.host_ifname))
            .expect("setns")
            .expect("attach pod dp");
        pod_dp
            .upsert_endpoint(pod.ip, endpoint(pod))
            .expect("endpoint");
        host.netns
            .ip(&[
                "route",
                "add",
                &format!("{}/32", pod.ip),
                "dev",
                &pod.host_ifname,
                "src",
                &host.underlay_ip.to_string(),
            ])
            .expect("route to pod");
    }
    let servers: BTreeMap<&str, Server> = BACKENDS
        .iter()
        .zip(&pods)
        .map(|((name, _), pod)| (*name, Server::start(pod, name)))
        .collect();
    let accepted =
        || -> BTreeMap<&str, usize> { servers.iter().map(|(n, s)| (*n, s.accepted())).collect() };
    let rules_before = rulesets(&host.netns);

    let cgroup = Cgroup::create(&world, "h1").expect("cgroup");
    let pin_dir = world.bpffs_dir().join("svc");
    let mut svc = ServiceDatapath::load(Some(&pin_dir)).expect("load");
    let root = svc.attach(std::path::Path::new(CGROUP2_ROOT));
    assert!(
        matches!(root, Err(ServiceError::CgroupRoot { .. })),
        "{root:?}"
    );
    svc.attach(cgroup.path()).expect("attach");
    assert_eq!(
        attached(cgroup.path()),
        8,
        "connect, sendmsg, recvmsg, getpeername x 4 and 6"
    );
    assert_eq!(
        [SERVICES_MAP, SLOTS_MAP, REVERSE_MAP].map(|map| max_entries(&pin_dir.join(map))),
        [MAX_SERVICES, MAX_SLOTS, MAX_REVERSE],
        "map capacities in abi.h and abi::services agree"
    );
    let vip = VIP.to_string();
    let tcp = ServiceKey::tcp(VIP, TCP_PORT);
    let udp = ServiceKey::udp(VIP, UDP_PORT);
    let node_port = ServiceKey::tcp(host.underlay_ip, NODE_PORT);
    let all = backends(&["be1", "be2", "be3"]);
    for key in [tcp, udp, node_port] {
        svc.upsert_service(key, &all).expect("service");
    }
    assert_eq!(svc.service(tcp).expect("read"), Some(all.clone()));

    // Every connection reaches a backend, and each backend gets some, from the host namespace
    // and from a pod alike; the pod's process sits in a pod cgroup below the host's.
    let pod_cgroup = cgroup.child("pod-cl").expect("pod cgroup");
    for (who, ns, cg) in [
        ("host", &host.netns, &cgroup),
        ("pod", &client.netns, &pod_cgroup),
    ] {
        let names = tcp_names(cg, ns, &vip, TCP_PORT, SPREAD);
        let counts = tally(&names);
        assert_eq!(names.len(), SPREAD, "{who}: {counts:?}");
        assert_eq!(
            counts.keys().map(String::as_str).collect::<Vec<_>>(),
            ["be1", "be2", "be3"],
            "{who}: every connection reached a backend and every backend got some: {counts:?}"
        );
    }
    // A NodePort addressed to the node's own IP, from the host.
    let names = tcp_names(
        &cgroup,
        &host.netns,
        &host.underlay_ip.to_string(),
        NODE_PORT,
        6,
    );
    assert!(
        names.iter().all(|n| n.starts_with("be")),
        "nodeport: {names:?}"
    );

    // A removed backend gets no new connection.
    svc.upsert_service(tcp, &backends(&["be1", "be2"]))
        .expect("remove be3");
    let be3_before = accepted()["be3"];
    let names = tcp_names(&cgroup, &client.netns, &vip, TCP_PORT, 30);
    let counts = tally(&names);
    assert_eq!(counts.values().sum::<usize>(), 30, "{counts:?}");
    assert!(
        counts.keys().all(|n| n == "be1" || n == "be2"),
        "{counts:?}"
    );
    assert_eq!(accepted()["be3"], be3_before, "be3 got a connection");

    // The backend list churning as fast as userspace can write it: every connect still lands
    // on a backend of one complete list.
    let stop = AtomicBool::new(false);
    let names = thread::scope(|scope| {
        let svc = &mut svc;
        let stop = &stop;
        let flipper = scope.spawn(move || {
            let lists = [backends(&["be1", "be2"]), backends(&["be2", "be3"])];
            let mut flips = 0usize;
            while !stop.load(Ordering::Relaxed) {
                svc.upsert_service(tcp, &lists[flips % 2]).expect("flip");
                flips += 1;
            }
            flips
        });
        let names = tcp_names(&cgroup, &client.netns, &vip, TCP_PORT, SPREAD);
        stop.store(true, Ordering::Relaxed);
        let flips = flipper.join().expect("flipper");
        assert!(flips > 10, "the list changed only {flips} times");
        names
    });
    let counts = tally(&names);
    assert_eq!(names.len(), SPREAD, "{counts:?}");
    assert!(
        counts.keys().all(|n| n.starts_with("be")),
        "under churn: {counts:?}"
    );

    // Zero backends: connects are refused at once; without the service, nothing is translated.
    svc.upsert_service(tcp, &[]).expect("no backends");
    let refused = cgroup
        .exec(
            &client.netns,
            &[
                "nc",
                "-v",
                "-w",
                "2",
                &VIP.to_string(),
                &TCP_PORT.to_string(),
            ],
        )
        .expect("nc");
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        !refused.status.success() && stderr.contains("Connection refused"),
        "{stderr}"
    );
    svc.upsert_service(tcp, &all).expect("restore");
    svc.upsert_service(udp, &[]).expect("no udp backends");
    let refused = udp_client(&cgroup, &client.netns, &vip, UDP_PORT, 1, false);
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        !refused.status.success() && stderr.contains("send: Connection refused"),
        "{stderr}"
    );
    svc.upsert_service(udp, &all).expect("restore udp");

    // UDP through the VIP, unconnected (sendto/recvfrom) and connected: every reply is
    // reported as coming from the VIP, and the datagrams spread over the backends.
    let vip_udp = format!("{VIP}:{UDP_PORT}");
    for (who, ns) in [("host", &host.netns), ("pod", &client.netns)] {
        let replies = udp_replies(&cgroup, ns, &vip, UDP_PORT, SPREAD, false);
        assert_eq!(replies.len(), SPREAD, "{who}: {replies:?}");
        assert!(
            replies.iter().all(|(from, _)| *from == vip_udp),
            "{who}: {replies:?}"
        );
        let names: Vec<String> = replies.into_iter().map(|(_, name)| name).collect();
        assert_eq!(tally(&names).len(), 3, "{who}: {:?}", tally(&names));
    }
    let replies = udp_replies(&cgroup, &client.netns, &vip, UDP_PORT, 3, true);
    assert_eq!(replies.len(), 3, "{replies:?}");
    assert!(
        replies
            .iter()
            .all(|(from, name)| *from == vip_udp && name.starts_with("be")),
        "{replies:?}"
    );

    // Dual-stack IPv6 sockets addressing the IPv4-mapped VIP are translated the same way.
    let mapped = format!("::ffff:{VIP}");
    let names = tcp_names(&cgroup, &host.netns, &mapped, TCP_PORT, 6);
    assert!(
        names.iter().all(|n| n.starts_with("be")),
        "v4-mapped tcp: {names:?}"
    );
    let replies = udp_replies(&cgroup, &client.netns, &mapped, UDP_PORT, 6, false);
    let mapped_udp = format!("{mapped}:{UDP_PORT}");
    assert!(
        replies.len() == 6
            && replies
                .iter()
                .all(|(from, name)| *from == mapped_udp && name.starts_with("be")),
        "v4-mapped udp: {replies:?}"
    );

    // getpeername() on translated sockets names the service, like the replies do.
    for (proto, addr, port) in [
        ("tcp", vip.as_str(), TCP_PORT),
        ("udp", vip.as_str(), UDP_PORT),
        ("tcp", mapped.as_str(), TCP_PORT),
    ] {
        let seen = peer(&cgroup, &client.netns, proto, addr, port);
        let (peer_addr, name) = seen.split_once(' ').unwrap_or((&seen, ""));
        assert!(
            peer_addr == format!("{addr}:{port}") && name.starts_with("be"),
            "{proto} {addr}: {seen}"
        );
    }

    // Outside the cgroup nothing is translated: the host has no route to the VIP, and a pod's
    // packet to it reaches a host that does not forward.
    let counters_before = svc.counters().expect("counters");
    let accepted_before = accepted();
    for ns in [&host.netns, &client.netns] {
        let out = ns
            .exec(&[
                "nc",
                "-z",
                "-w",
                "1",
                &VIP.to_string(),
                &TCP_PORT.to_string(),
            ])
            .expect("nc");
        assert!(!out.status.success(), "{} reached the VIP", ns.name());
    }
    assert_eq!(accepted(), accepted_before);
    assert_eq!(svc.counters().expect("counters"), counters_before);

    // Every translation counted, once: 2 x 60 spread + 6 NodePort + 30 after the removal
    // + 60 under churn + 6 v4-mapped + 2 getpeername TCP connects; 2 connected UDP sockets;
    // 2 x 60 + 6 datagrams sent and their replies plus 3 + 1 on the connected sockets; 2
    // refusals; 3 getpeername calls.
    let expected = BTreeMap::from([
        (SvcEvent::ConnectTcp, (3 * SPREAD + 44) as u64),
        (SvcEvent::ConnectUdp, 2),
        (SvcEvent::SendmsgUdp, (2 * SPREAD + 6) as u64),
        (SvcEvent::RecvmsgUdp, (2 * SPREAD + 6 + 4) as u64),
        (SvcEvent::RefusedNoBackend, 2),
        (SvcEvent::RefusedRace, 0),
        (SvcEvent::Getpeername, 3),
        // No pod veth program here: nothing is translated per packet.
        (SvcEvent::PacketTcp, 0),
        (SvcEvent::PacketUdp, 0),
    ]);
    assert_eq!(svc.counters().expect("counters"), expected);

    // An agent restart: a second instance finds the services in the pinned maps, takes over
    // the pinned links, and translation goes on after the first is gone.
    let mut successor = ServiceDatapath::load(Some(&pin_dir)).expect("reload");
    assert_eq!(
        successor.services().expect("services"),
        svc.services().expect("services")
    );
    successor.attach(cgroup.path()).expect("take over");
    drop(svc);
    assert_eq!(
        attached(cgroup.path()),
        8,
        "the successor's links replaced the predecessor's"
    );
    let names = tcp_names(&cgroup, &client.netns, &vip, TCP_PORT, 6);
    assert!(
        names.iter().all(|n| n.starts_with("be")),
        "after restart: {names:?}"
    );

    // Detaching stops translation for new sockets.
    successor.detach_pinned().expect("detach");
    assert_eq!(attached(cgroup.path()), 0);
    let out = cgroup
        .exec(
            &host.netns,
            &["nc", "-z", "-w", "1", &vip, &TCP_PORT.to_string()],
        )
        .expect("nc");
    assert!(!out.status.success(), "translated after detach");

    // No rule was created anywhere on the way.
    assert_eq!(rulesets(&host.netns), rules_before);

    // Teardown: the cgroup and the pins go with their guards.
    let cgroup_path = cgroup.path().to_owned();
    drop(successor);
    drop(pod_cgroup);
    drop(cgroup);
    assert!(!cgroup_path.exists(), "cgroup left behind");
    drop(servers);
    drop(pod_dp);
    let bpffs = world.bpffs_dir();
    drop(world);
    assert!(!bpffs.exists(), "pins left behind");
}
