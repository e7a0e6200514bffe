//! The load balancer end to end: a client, the LB host running the daemon, backend hosts
//! running nginx (Debian nginx-light) or echo servers, all network namespaces on one underlay;
//! services applied through the local API, real traffic through the VIP (curl, TCP streams,
//! UDP datagrams). Privileged (root, BPF, netns): run by scripts/test.sh.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

use slipway_lb::config::{
    BackendSpec, HealthCheckSpec, Protocol, ServicePort, ServiceSpec, TrafficPolicy,
};
use slipway_lb::status::{BackendState, ServiceStatus};
use slipway_lb::world::{ECHO_PORT, EchoStream, LbWorld, udp_exchange, wait_for};

fn port(protocol: Protocol, port: u16) -> ServicePort {
    ServicePort {
        name: None,
        protocol,
        port,
        target_port: 0,
    }
}

fn spec<A: Into<IpAddr> + Copy>(
    name: &str,
    ports: Vec<ServicePort>,
    backends: &[(A, u32)],
) -> ServiceSpec {
    ServiceSpec {
        namespace: "default".into(),
        name: name.into(),
        ip_families: Vec::new(),
        ports,
        load_balancer_ip: None,
        load_balancer_source_ranges: Vec::new(),
        external_traffic_policy: TrafficPolicy::Cluster,
        backends: backends
            .iter()
            .map(|(ip, weight)| BackendSpec {
                ip: (*ip).into(),
                weight: *weight,
                node_local: false,
            })
            .collect(),
        health_check: None,
        drain_timeout_secs: None,
        session_affinity: Default::default(),
        session_affinity_config: None,
        direct_server_return: false,
    }
}

/// Answer lines per backend address.
fn by_backend(lines: &[String]) -> BTreeMap<IpAddr, usize> {
    let mut counts = BTreeMap::new();
    for line in lines {
        let ip = line
            .split_whitespace()
            .next()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("unexpected answer {line:?}"));
        *counts.entry(ip).or_default() += 1;
    }
    counts
}

/// Each backend's share of `n` new connections is its weight's share, within what sampling
/// explains: every connection picks a Maglev slot by the hash of its (new) source port, so a
/// backend's count is binomial. The bound is five standard deviations plus 1 % for the ring's
/// own deviation from the weights (a false alarm about once in a million checks), and still far
/// below the gap a wrong weighting makes (weights 1:2:3 read as equal move a share by 0.17).
fn assert_weighted_shares(counts: &BTreeMap<IpAddr, usize>, backends: &[(IpAddr, u32)], n: usize) {
    let total: u32 = backends.iter().map(|(_, w)| w).sum();
    for (ip, weight) in backends {
        let share = counts.get(ip).copied().unwrap_or(0) as f64 / n as f64;
        let expected = f64::from(*weight) / f64::from(total);
        let bound = 5.0 * (expected * (1.0 - expected) / n as f64).sqrt() + 0.01;
        assert!(
            (share - expected).abs() < bound,
            "{ip}: share {share:.3}, weight share {expected:.3} ± {bound:.3} ({counts:?})"
        );
    }
}

fn service_status(w: &LbWorld, name: &str) -> ServiceStatus {
    w.api()
        .status()
        .expect("status")
        .services
        .into_iter()
        .find(|s| s.name == name)
        .unwrap_or_else(|| panic!("service {name} not in status"))
}

/// One address family of the world: the source-range, local-policy and stream checks run over
/// IPv4 and IPv6 alike.
struct Family {
    backends: Vec<IpAddr>,
    client: IpAddr,
    client2: IpAddr,
    lb: IpAddr,
    /// A source range that holds both clients.
    wide: &'static str,
}

impl Family {
    fn v4(w: &LbWorld) -> Self {
        Family {
            backends: w.backend_ips().into_iter().map(IpAddr::V4).collect(),
            client: Ipv4Addr::new(10, 99, 0, 1).into(),
            client2: w.client2_ip().into(),
            lb: w.lb_ip().into(),
            wide: "10.99.0.0/24",
        }
    }

    fn v6(w: &LbWorld) -> Self {
        Family {
            backends: w.backend_ip6s().into_iter().map(IpAddr::V6).collect(),
            client: w.client_ip6().into(),
            client2: w.client2_ip6().into(),
            lb: w.lb_ip6().into(),
            wide: "fd99::/64",
        }
    }

    /// The client's address as a one-address range.
    fn client_only(&self) -> String {
        let bits = if self.client.is_ipv6() { 128 } else { 32 };
        format!("{}/{bits}", self.client)
    }
}

fn url(vip: IpAddr) -> String {
    match vip {
        IpAddr::V4(_) => format!("http://{vip}"),
        IpAddr::V6(_) => format!("http://[{vip}]"),
    }
}

/// loadBalancerSourceRanges let the listed client in only (the other is dropped and counted),
/// and widening the range lets the other in. Needs nginx on backend 0.
fn check_source_ranges(w: &LbWorld, f: &Family) {
    let mut web = spec("web", vec![port(Protocol::Tcp, 80)], &[(f.backends[0], 1)]);
    web.load_balancer_source_ranges = vec![f.client_only()];
    let vip = w.api().apply(&web).expect("apply");
    assert_eq!(vip.is_ipv6(), f.client.is_ipv6(), "{vip}");
    let url = url(vip);
    assert_eq!(LbWorld::curl(w.client(), &url, 5).expect("curl").len(), 5);
    assert_eq!(
        LbWorld::curl(w.client2(), &url, 2).expect("curl").len(),
        0,
        "{} is outside {}",
        f.client2,
        f.client_only()
    );
    let status = w.api().status().expect("status");
    assert!(
        status.verdicts["drop_source_range"] >= 2,
        "{:?}",
        status.verdicts
    );

    web.load_balancer_source_ranges = vec![f.wide.into()];
    w.api().apply(&web).expect("widen");
    assert_eq!(LbWorld::curl(w.client2(), &url, 5).expect("curl").len(), 5);
}

/// externalTrafficPolicy Local: only the node-local backend serves, and it sees the client's
/// address (it answers through the LB, as a pod on the LB node would); the other backend is
/// NotLocal. Needs nginx on backends 0 and 1.
fn check_local_policy(w: &LbWorld, f: &Family) {
    let (local_ns, _) = w.backend(0);
    let client_only = f.client_only();
    let lb = f.lb.to_string();
    let mut route = vec!["route", "add", client_only.as_str(), "via", lb.as_str()];
    if f.client.is_ipv6() {
        route.insert(0, "-6");
    }
    local_ns.ip(&route).expect("route via the LB");
    let mut local = spec(
        "local",
        vec![port(Protocol::Tcp, 80)],
        &[(f.backends[0], 1), (f.backends[1], 1)],
    );
    local.external_traffic_policy = TrafficPolicy::Local;
    local.backends[0].node_local = true;
    let vip = w.api().apply(&local).expect("apply");
    let lines = LbWorld::curl(w.client(), &url(vip), 40).expect("curl");
    assert_eq!(lines.len(), 40);
    let expected = format!("{} {}", f.backends[0], f.client);
    assert!(
        lines.iter().all(|l| *l == expected),
        "only the local backend, seeing the client: {lines:?}"
    );
    let status = service_status(w, "default/local");
    assert_eq!(status.backends[1].state, BackendState::NotLocal);
}

/// Long-lived streams through the VIP keep their backend while one is added (new flows reach
/// it) and one removed (it drains: its streams carry on, no new flow goes to it, and it is
/// released once they end). Needs echo servers on four backends.
fn check_streams_across_backend_changes(w: &LbWorld, f: &Family) {
    let ips = &f.backends;
    let three: Vec<(IpAddr, u32)> = ips[..3].iter().map(|ip| (*ip, 1)).collect();
    let vip = w
        .api()
        .apply(&spec("echo", vec![port(Protocol::Tcp, ECHO_PORT)], &three))
        .expect("apply");
    assert_eq!(vip.is_ipv6(), f.client.is_ipv6(), "{vip}");
    let streams: Vec<EchoStream> = (0..24)
        .map(|_| EchoStream::open(w.client(), vip).expect("stream"))
        .collect();
    let on = |ip: IpAddr| streams.iter().filter(|s| s.backend() == ip).count();
    for ip in &ips[..3] {
        assert!(on(*ip) > 0, "24 streams reach every backend");
    }
    let progressed = |streams: &[EchoStream], before: &[u64]| {
        streams
            .iter()
            .zip(before)
            .all(|(s, b)| s.ended() || s.rounds() >= b + 10)
    };

    // Add a fourth backend: a quarter of the ring moves to it, no established stream does.
    let mut four = three.clone();
    four.push((ips[3], 1));
    w.api()
        .apply(&spec("echo", vec![port(Protocol::Tcp, ECHO_PORT)], &four))
        .expect("add");
    let before: Vec<u64> = streams.iter().map(EchoStream::rounds).collect();
    wait_for("streams progress", Duration::from_secs(10), || {
        progressed(&streams, &before).then_some(())
    })
    .expect("progress after add");
    let new: Vec<EchoStream> = (0..24)
        .map(|_| EchoStream::open(w.client(), vip).expect("stream"))
        .collect();
    assert!(
        new.iter().any(|s| s.backend() == ips[3]),
        "new flows reach the new backend"
    );

    // Remove the third backend: every stream carries on, those on the removed backend too
    // (it drains: no new flows, its tracked ones stay on it until they end).
    assert!(on(ips[2]) > 0, "a stream on the backend to remove");
    let mut without = four.clone();
    without.remove(2);
    w.api()
        .apply(&spec(
            "echo",
            vec![port(Protocol::Tcp, ECHO_PORT)],
            &without,
        ))
        .expect("remove");
    let before: Vec<u64> = streams.iter().map(EchoStream::rounds).collect();
    wait_for("streams progress", Duration::from_secs(10), || {
        progressed(&streams, &before).then_some(())
    })
    .expect("progress after remove");

    let removed = service_status(w, "default/echo")
        .backends
        .into_iter()
        .find(|b| b.ip == ips[2])
        .expect("the removed backend is listed while it drains");
    assert_eq!(removed.state, BackendState::Draining);
    let open_on_removed = streams
        .iter()
        .chain(&new)
        .filter(|s| s.backend() == ips[2])
        .count();
    assert_eq!(removed.active_flows, open_on_removed as u64, "{removed:?}");
    let fresh: Vec<EchoStream> = (0..24)
        .map(|_| EchoStream::open(w.client(), vip).expect("stream"))
        .collect();
    assert!(
        fresh.iter().all(|s| s.backend() != ips[2]),
        "no new flow goes to the removed backend"
    );

    for s in streams.into_iter().chain(new).chain(fresh) {
        let backend = s.backend();
        let report = s.finish().expect("report");
        assert_eq!(report.error, None, "stream to {backend}: {report:?}");
        assert!(
            report.max_gap < Duration::from_millis(500),
            "stream to {backend} stalled: {report:?}"
        );
    }
    // Its streams ended (FIN): the removed backend is released.
    wait_for(
        "the removed backend is released",
        Duration::from_secs(10),
        || {
            let status = service_status(w, "default/echo");
            status.backends.iter().all(|b| b.ip != ips[2]).then_some(())
        },
    )
    .expect("released");
}

#[test]
#[cfg_attr(
    not(feature = "privileged"),
    ignore = "privileged: root + BPF + netns; run scripts/test.sh"
)]
fn curl_reaches_every_backend_in_proportion_to_its_weight() {
    let mut w = LbWorld::new(3).expect("world");
    for i in 0..3 {
        w.start_nginx(i).expect("nginx");
    }
    let ips = w.backend_ips();
    let weights = [1u32, 2, 3];
    let backends: Vec<(Ipv4Addr, u32)> = ips.iter().copied().zip(weights).collect();
    let vip = w
        .api()
        .apply(&spec("web", vec![port(Protocol::Tcp, 80)], &backends))
        .expect("apply");
    assert_eq!(
        vip,
        Ipv4Addr::new(10, 99, 100, 1),
        "the pool's first address"
    );

    const N: usize = 1200;
    let lines = LbWorld::curl(w.client(), &format!("http://{vip}"), N).expect("curl");
    assert_eq!(lines.len(), N, "every request answered");
    let counts = by_backend(&lines);
    let backends: Vec<(IpAddr, u32)> = backends.iter().map(|(ip, w)| ((*ip).into(), *w)).collect();
    assert_weighted_shares(&counts, &backends, N);
    // SNAT: the backends see the LB's address.
    assert!(
        lines
            .iter()
            .all(|l| l.ends_with(&format!(" {}", w.lb_ip())))
    );

    // The datapath counted one new flow per connection, per backend, and the ring shares
    // follow the weights.
    let status = service_status(&w, "default/web");
    assert_eq!(status.vip, vip);
    for b in &status.backends {
        assert_eq!(b.flows_total as usize, counts[&b.ip], "flows of {}", b.ip);
        assert_eq!(b.state, BackendState::Active);
        let expected = 65537.0 * f64::from(b.weight) / 6.0;
        assert!((b.slots as f64 - expected).abs() / expected < 0.01, "{b:?}");
    }
    assert_eq!(status.ports[0].flows_total as usize, N);
    let metrics = w.api().metrics().expect("metrics");
    let line = format!(
        "slipway_lb_backend_flows_total{{service=\"default/web\",vip=\"{vip}\",backend=\"{}\"}} {}",
        ips[2],
        counts[&IpAddr::from(ips[2])]
    );
    assert!(metrics.contains(&line), "{line} not in\n{metrics}");
    let table = w.api().status().expect("status").table();
    assert!(
        table.contains(&format!("default/web  VIP {vip}")),
        "{table}"
    );

    // The LB host's own connections to a backend (as a proxy beside the LB would make) are
    // not mistaken for translated flows, however many of those came before.
    let own = LbWorld::curl(w.lb(), &format!("http://{}", ips[0]), 300).expect("curl");
    assert_eq!(own.len(), 300, "every request of the LB host answered");
    assert!(
        own.iter()
            .all(|l| *l == format!("{} {}", ips[0], w.lb_ip()))
    );
}

#[test]
#[cfg_attr(
    not(feature = "privileged"),
    ignore = "privileged: root + BPF + netns; run scripts/test.sh"
)]
fn a_killed_backend_leaves_within_interval_times_fall_and_comes_back() {
    let mut w = LbWorld::new(3).expect("world");
    for i in 0..3 {
        w.start_nginx(i).expect("nginx");
    }
    let ips = w.backend_ips();
    let mut web = spec(
        "web",
        vec![port(Protocol::Tcp, 80)],
        &[(ips[0], 1), (ips[1], 1), (ips[2], 1)],
    );
    let (interval, fall, rise) = (200u64, 3u32, 2u32);
    web.health_check = Some(HealthCheckSpec {
        interval_ms: interval,
        timeout_ms: 100,
        rise,
        fall,
        port: None,
        http_path: Some("/".into()),
    });
    let vip = w.api().apply(&web).expect("apply");
    let url = format!("http://{vip}");
    assert_eq!(
        by_backend(&LbWorld::curl(w.client(), &url, 150).expect("curl")).len(),
        3
    );

    w.kill_nginx(1).expect("kill");
    let killed = Instant::now();
    let state = |w: &LbWorld| {
        service_status(w, "default/web")
            .backends
            .iter()
            .find(|b| b.ip == ips[1])
            .map(|b| b.state)
    };
    wait_for("backend 2 unhealthy", Duration::from_secs(10), || {
        (state(&w) == Some(BackendState::Unhealthy)).then_some(())
    })
    .expect("removed");
    let took = killed.elapsed();
    // fall failed probes, the first up to one interval after the kill, each with its timeout.
    let limit = Duration::from_millis(interval * u64::from(fall) + interval + 100 + 300);
    assert!(took <= limit, "removed after {took:?}, limit {limit:?}");

    // No new connection fails, none goes to the dead backend.
    let lines = LbWorld::curl(w.client(), &url, 300).expect("curl");
    assert_eq!(lines.len(), 300, "every request answered");
    let counts = by_backend(&lines);
    assert_eq!(
        counts.keys().copied().collect::<Vec<_>>(),
        vec![ips[0], ips[2]]
    );

    w.start_nginx(1).expect("restart");
    let back = Instant::now();
    wait_for("backend 2 healthy", Duration::from_secs(10), || {
        (state(&w) == Some(BackendState::Active)).then_some(())
    })
    .expect("back");
    let limit = Duration::from_millis(interval * u64::from(rise) + interval + 300);
    assert!(back.elapsed() <= limit, "back after {:?}", back.elapsed());
    let counts = by_backend(&LbWorld::curl(w.client(), &url, 150).expect("curl"));
    assert!(counts.contains_key(&IpAddr::from(ips[1])), "{counts:?}");
}

#[test]
#[cfg_attr(
    not(feature = "privileged"),
    ignore = "privileged: root + BPF + netns; run scripts/test.sh"
)]
fn long_lived_streams_survive_adding_and_removing_backends() {
    let mut w = LbWorld::new(4).expect("world");
    for i in 0..4 {
        w.start_echo(i).expect("echo");
    }
    check_streams_across_backend_changes(&w, &Family::v4(&w));
}

#[test]
#[cfg_attr(
    not(feature = "privileged"),
    ignore = "privileged: root + BPF + netns; run scripts/test.sh"
)]
fn drain_keeps_existing_streams_sends_no_new_ones_and_ends_them_at_the_timeout() {
    let mut w = LbWorld::new(3).expect("world");
    for i in 0..3 {
        w.start_echo(i).expect("echo");
    }
    let ips = w.backend_ips();
    let all: Vec<(Ipv4Addr, u32)> = ips.iter().map(|ip| (*ip, 1)).collect();
    let echo = spec("echo", vec![port(Protocol::Tcp, ECHO_PORT)], &all);
    let vip = w.api().apply(&echo).expect("apply");
    let streams: Vec<EchoStream> = (0..18)
        .map(|_| EchoStream::open(w.client(), vip).expect("stream"))
        .collect();
    let drained = ips[0];
    let to_drained = streams.iter().filter(|s| s.backend() == drained).count();
    assert!(to_drained > 0);

    const TIMEOUT: Duration = Duration::from_secs(3);
    let mut draining = echo.clone();
    draining.backends[0].weight = 0;
    draining.drain_timeout_secs = Some(TIMEOUT.as_secs());
    w.api().apply(&draining).expect("drain");
    let drain_started = Instant::now();
    let before: Vec<u64> = streams.iter().map(EchoStream::rounds).collect();
    // Existing streams, those to the drained backend included, keep going...
    wait_for("streams progress", Duration::from_secs(10), || {
        streams
            .iter()
            .zip(&before)
            .all(|(s, b)| s.rounds() >= b + 30)
            .then_some(())
    })
    .expect("progress while draining");
    assert!(streams.iter().all(|s| !s.ended()));
    // ...no new one lands there...
    for _ in 0..30 {
        let s = EchoStream::open(w.client(), vip).expect("new stream");
        assert_ne!(
            s.backend(),
            drained,
            "a new flow went to the draining backend"
        );
    }
    let status = service_status(&w, "default/echo");
    let b = status
        .backends
        .iter()
        .find(|b| b.ip == drained)
        .expect("drained");
    assert_eq!((b.state, b.slots), (BackendState::Draining, 0));
    assert_eq!(b.active_flows as usize, to_drained, "{b:?}");
    assert!(
        drain_started.elapsed() < TIMEOUT,
        "the checks above must run within the drain timeout to mean anything"
    );
    assert!(
        streams.iter().all(|s| !s.ended()),
        "nothing ended before the timeout"
    );

    // ...until the drain timeout ends them.
    wait_for(
        "drained streams end",
        TIMEOUT + Duration::from_secs(5),
        || {
            streams
                .iter()
                .filter(|s| s.backend() == drained)
                .all(EchoStream::ended)
                .then_some(())
        },
    )
    .expect("drained streams ended");
    assert!(drain_started.elapsed() >= TIMEOUT, "not before the timeout");
    for s in streams {
        let backend = s.backend();
        let report = s.finish().expect("report");
        if backend != drained {
            assert_eq!(report.error, None, "stream to {backend} broke: {report:?}");
        }
    }
}

#[test]
#[cfg_attr(
    not(feature = "privileged"),
    ignore = "privileged: root + BPF + netns; run scripts/test.sh"
)]
fn source_ranges_let_listed_clients_in_only() {
    let mut w = LbWorld::new(1).expect("world");
    w.start_nginx(0).expect("nginx");
    check_source_ranges(&w, &Family::v4(&w));
}

#[test]
#[cfg_attr(
    not(feature = "privileged"),
    ignore = "privileged: root + BPF + netns; run scripts/test.sh"
)]
fn external_traffic_policy_local_preserves_the_client_ip() {
    let mut w = LbWorld::new(2).expect("world");
    for i in 0..2 {
        w.start_nginx(i).expect("nginx");
    }
    check_local_policy(&w, &Family::v4(&w));
    let ips = w.backend_ips();

    // The same backends under Cluster see the LB's address.
    let cluster = spec(
        "cluster",
        vec![port(Protocol::Tcp, 80)],
        &[(ips[0], 1), (ips[1], 1)],
    );
    let vip = w.api().apply(&cluster).expect("apply");
    let lines = LbWorld::curl(w.client(), &format!("http://{vip}"), 40).expect("curl");
    assert_eq!(lines.len(), 40);
    assert!(
        lines
            .iter()
            .all(|l| l.ends_with(&format!(" {}", w.lb_ip()))),
        "{lines:?}"
    );
}

#[test]
#[cfg_attr(
    not(feature = "privileged"),
    ignore = "privileged: root + BPF + netns; run scripts/test.sh"
)]
fn udp_through_the_vip_and_two_services_sharing_it() {
    let mut w = LbWorld::new(3).expect("world");
    for i in 0..3 {
        w.start_echo(i).expect("echo");
    }
    w.start_nginx(2).expect("nginx");
    let ips = w.backend_ips();
    let shared = IpAddr::V4(Ipv4Addr::new(10, 99, 100, 77));
    let mut dns = spec(
        "udp",
        vec![port(Protocol::Udp, 53)],
        &[(ips[0], 1), (ips[1], 1)],
    );
    dns.ports[0].target_port = ECHO_PORT;
    dns.load_balancer_ip = Some(shared);
    let mut web = spec("web", vec![port(Protocol::Tcp, 80)], &[(ips[2], 1)]);
    web.load_balancer_ip = Some(shared);
    assert_eq!(w.api().apply(&dns).expect("udp"), shared);
    assert_eq!(w.api().apply(&web).expect("web"), shared);

    let mut seen = BTreeMap::new();
    for i in 0..40 {
        let (answer, from) = udp_exchange(w.client(), shared, 53, &format!("q{i}")).expect("udp");
        assert_eq!(from, (shared, 53).into(), "the answer comes from the VIP");
        let (backend, echoed) = answer.split_once(' ').expect("answer");
        assert_eq!(echoed, format!("q{i}"));
        *seen.entry(backend.to_owned()).or_insert(0) += 1;
    }
    assert_eq!(
        seen.len(),
        2,
        "fresh source ports spread over both UDP backends: {seen:?}"
    );
    let lines = LbWorld::curl(w.client(), &format!("http://{shared}"), 10).expect("curl");
    assert_eq!(lines.len(), 10);
    assert!(lines.iter().all(|l| l.starts_with(&format!("{} ", ips[2]))));

    // A third service may not take port 80 of the shared VIP...
    let mut clash = spec("clash", vec![port(Protocol::Tcp, 80)], &[(ips[0], 1)]);
    clash.load_balancer_ip = Some(shared);
    let err = w.api().apply(&clash).expect_err("port 80 is taken");
    assert!(err.to_string().contains("409"), "{err}");
    // ...and a rejected request left nothing behind.
    assert_eq!(w.api().status().expect("status").services.len(), 2);
}

#[test]
#[cfg_attr(
    not(feature = "privileged"),
    ignore = "privileged: root + BPF + netns; run scripts/test.sh"
)]
fn a_vip_is_announced_released_and_reallocated() {
    let mut w = LbWorld::new(2).expect("world");
    for i in 0..2 {
        w.start_nginx(i).expect("nginx");
    }
    let ips = w.backend_ips();
    let first = Ipv4Addr::new(10, 99, 100, 1);
    let lb_mac = w.lb().link("eth0").expect("lb mac").mac;
    // A stale cache entry on the client: gratuitous ARP must correct it.
    w.client()
        .ip(&[
            "neigh",
            "add",
            &first.to_string(),
            "lladdr",
            "02:00:00:00:00:99",
            "dev",
            "eth0",
            "nud",
            "stale",
        ])
        .expect("stale entry");
    let a = spec("a", vec![port(Protocol::Tcp, 80)], &[(ips[0], 1)]);
    assert_eq!(w.api().apply(&a).expect("a"), first);
    let mac = slipway_dataplane::link::format_mac(&lb_mac);
    wait_for("gratuitous ARP", Duration::from_secs(3), || {
        let out = w
            .client()
            .ip(&["neigh", "show", &first.to_string(), "dev", "eth0"])
            .ok()?;
        out.contains(&mac).then_some(())
    })
    .expect("the client's cache points at the LB");
    let url = format!("http://{first}");
    assert!(
        LbWorld::curl(w.client(), &url, 5)
            .expect("curl")
            .iter()
            .all(|l| l.starts_with(&format!("{} ", ips[0])))
    );

    w.api().delete("default", "a").expect("delete");
    let status = w.api().status().expect("status");
    assert!(status.announced.is_empty());
    assert_eq!(status.pools[0].used, 0, "back in the pool");
    w.client()
        .ip(&["neigh", "flush", "dev", "eth0"])
        .expect("flush");
    assert!(
        LbWorld::curl(w.client(), &url, 1).expect("curl").is_empty(),
        "nobody answers for a released VIP"
    );

    let b = spec("b", vec![port(Protocol::Tcp, 80)], &[(ips[1], 1)]);
    assert_eq!(w.api().apply(&b).expect("b"), first, "re-allocated");
    let lines = LbWorld::curl(w.client(), &url, 5).expect("curl");
    assert_eq!(lines.len(), 5);
    assert!(
        lines.iter().all(|l| l.starts_with(&format!("{} ", ips[1]))),
        "{lines:?}"
    );
}

#[test]
#[cfg_attr(
    not(feature = "privileged"),
    ignore = "privileged: root + BPF + netns; run scripts/test.sh"
)]
fn the_xdp_attach_point_balances_too() {
    use slipway_lb::datapath::{AttachPoint, XdpMode, enable_run_time_stats, run_time_of};
    let mut w = LbWorld::with_attach(2, AttachPoint::Xdp(XdpMode::Skb)).expect("world");
    let link = w
        .lb()
        .ip(&["-d", "link", "show", "dev", "eth0"])
        .expect("link");
    assert!(link.contains("xdpgeneric"), "{link}");
    // bpf_fib_lookup() in the XDP program wants forwarding on the device.
    w.lb()
        .sysctl(&["net.ipv4.conf.eth0.forwarding=1"])
        .expect("forwarding");
    for i in 0..2 {
        w.start_nginx(i).expect("nginx");
    }
    let ips = w.backend_ips();
    let vip = w
        .api()
        .apply(&spec(
            "web",
            vec![port(Protocol::Tcp, 80)],
            &[(ips[0], 1), (ips[1], 1)],
        ))
        .expect("apply");
    let url = format!("http://{vip}");
    // The first flows resolve the neighbours (through TC); then XDP does the work.
    assert_eq!(LbWorld::curl(w.client(), &url, 20).expect("curl").len(), 20);
    let _stats = enable_run_time_stats().expect("stats");
    let (xdp0, tc0) = (
        run_time_of("lb_xdp").expect("xdp").1,
        run_time_of("lb_ingress").expect("tc").1,
    );
    let lines = LbWorld::curl(w.client(), &url, 200).expect("curl");
    assert_eq!(lines.len(), 200, "every request answered");
    assert_eq!(by_backend(&lines).len(), 2);
    assert!(
        lines
            .iter()
            .all(|l| l.ends_with(&format!(" {}", w.lb_ip())))
    );
    let xdp = run_time_of("lb_xdp").expect("xdp").1 - xdp0;
    let tc = run_time_of("lb_ingress").expect("tc").1 - tc0;
    // 200 connections are at least 1,000 packets through the LB (SYN, ACK, request, FINs,
    // both ways); TC sees only what XDP passed on.
    assert!(xdp >= 1000, "XDP ran {xdp} times");
    assert!(
        tc * 10 < xdp,
        "TC ran {tc} times beside XDP's {xdp}: XDP did not translate"
    );

    // IPv6 through XDP as well: the NS answered by XDP_TX, the translation by hand.
    w.lb()
        .sysctl(&["net.ipv6.conf.eth0.forwarding=1"])
        .expect("forwarding");
    let ip6s: Vec<IpAddr> = w.backend_ip6s().into_iter().map(IpAddr::V6).collect();
    let vip6 = w
        .api()
        .apply(&spec(
            "web6",
            vec![port(Protocol::Tcp, 80)],
            &[(ip6s[0], 1), (ip6s[1], 1)],
        ))
        .expect("apply v6");
    let url6 = format!("http://[{vip6}]");
    assert_eq!(
        LbWorld::curl(w.client(), &url6, 20).expect("curl").len(),
        20
    );
    let (xdp0, tc0) = (
        run_time_of("lb_xdp").expect("xdp").1,
        run_time_of("lb_ingress").expect("tc").1,
    );
    let lines = LbWorld::curl(w.client(), &url6, 200).expect("curl -6");
    assert_eq!(lines.len(), 200, "every IPv6 request answered");
    assert_eq!(by_backend(&lines).len(), 2);
    assert!(
        lines
            .iter()
            .all(|l| l.ends_with(&format!(" {}", w.lb_ip6())))
    );
    let xdp = run_time_of("lb_xdp").expect("xdp").1 - xdp0;
    let tc = run_time_of("lb_ingress").expect("tc").1 - tc0;
    assert!(xdp >= 1000, "XDP ran {xdp} times for IPv6");
    assert!(
        tc * 10 < xdp,
        "TC ran {tc} times beside XDP's {xdp}: XDP did not translate IPv6"
    );
}

// ---- IPv6 VIPs ---------------------------------------------------------------------------

/// The lladdr of `ip`'s neighbour entry on the client's eth0, if it has one with an address.
fn neighbour_mac(w: &LbWorld, ip: IpAddr) -> Option<String> {
    let out = w
        .client()
        .ip(&["-6", "neigh", "show", &ip.to_string(), "dev", "eth0"])
        .ok()?;
    let mut words = out.split_whitespace();
    words.find(|w| *w == "lladdr")?;
    words.next().map(str::to_owned)
}

#[test]
#[cfg_attr(
    not(feature = "privileged"),
    ignore = "privileged: root + BPF + netns; run scripts/test.sh"
)]
fn an_ipv6_vip_is_announced_by_ndp_and_reaches_every_backend() {
    let mut w = LbWorld::new(3).expect("world");
    for i in 0..3 {
        w.start_nginx(i).expect("nginx");
        w.start_echo(i).expect("echo");
    }
    let ips = w.backend_ip6s();
    let vip = IpAddr::V6("fd99:100::1".parse().expect("vip"));
    let lb_mac = slipway_dataplane::link::format_mac(&w.lb().link("eth0").expect("lb").mac);

    // A stale cache entry on the client: the unsolicited Neighbor Advertisement the LB sends
    // when it takes the VIP over must correct it.
    let stale = "02:00:00:00:00:99";
    w.client()
        .ip(&[
            "-6",
            "neigh",
            "add",
            &vip.to_string(),
            "lladdr",
            stale,
            "dev",
            "eth0",
            "nud",
            "stale",
        ])
        .expect("stale entry");
    assert_eq!(neighbour_mac(&w, vip).as_deref(), Some(stale));
    let weights = [1u32, 2, 3];
    let backends: Vec<(IpAddr, u32)> = ips.iter().map(|ip| IpAddr::V6(*ip)).zip(weights).collect();
    let web = spec("web6", vec![port(Protocol::Tcp, 80)], &backends);
    assert_eq!(
        w.api().apply(&web).expect("apply"),
        vip,
        "the IPv6 pool's first address"
    );
    wait_for("unsolicited NA", Duration::from_secs(3), || {
        (neighbour_mac(&w, vip)? == lb_mac).then_some(())
    })
    .expect("the client's neighbour entry points at the LB");
    // The LB host joined the VIP's solicited-node group, so that a NIC's multicast filter and
    // an MLD-snooping switch let the solicitations for it through.
    let groups = || {
        w.lb()
            .ip(&["-6", "maddr", "show", "dev", "eth0"])
            .expect("maddr")
    };
    assert!(groups().contains("ff02::1:ff00:1"), "{}", groups());

    // Resolved afresh by Neighbor Discovery: the LB's datapath answers the solicitation.
    w.client()
        .ip(&["-6", "neigh", "flush", "dev", "eth0"])
        .expect("flush");
    const N: usize = 1200;
    let url = format!("http://[{vip}]");
    let lines = LbWorld::curl(w.client(), &url, N).expect("curl -6");
    assert_eq!(lines.len(), N, "every request answered");
    assert_eq!(
        neighbour_mac(&w, vip).as_deref(),
        Some(lb_mac.as_str()),
        "ip -6 neigh: the VIP is at the LB's MAC"
    );
    let counts = by_backend(&lines);
    assert_weighted_shares(&counts, &backends, N);
    assert!(
        lines
            .iter()
            .all(|l| l.ends_with(&format!(" {}", w.lb_ip6()))),
        "SNAT: the backends see the LB's IPv6 address"
    );

    // UDP through the same VIP on another port, to the echo servers.
    let mut dns = spec("dns6", vec![port(Protocol::Udp, 53)], &backends);
    dns.ports[0].target_port = ECHO_PORT;
    dns.load_balancer_ip = Some(vip);
    assert_eq!(
        w.api().apply(&dns).expect("dns6"),
        vip,
        "shared on disjoint ports"
    );
    let mut seen = BTreeMap::new();
    for i in 0..60 {
        let (answer, from) = udp_exchange(w.client(), vip, 53, &format!("q{i}")).expect("udp");
        assert_eq!(from, (vip, 53).into(), "the answer comes from the VIP");
        let (backend, echoed) = answer.split_once(' ').expect("answer");
        assert_eq!(echoed, format!("q{i}"));
        *seen.entry(backend.to_owned()).or_insert(0) += 1;
    }
    assert_eq!(seen.len(), 3, "UDP reaches every backend: {seen:?}");

    // Status and metrics show the IPv6 VIP, its backends and the NDP answers.
    let status = w.api().status().expect("status");
    assert!(status.announced.contains(&vip));
    assert!(status.verdicts["ndp_reply"] >= 1, "{:?}", status.verdicts);
    let web_status = service_status(&w, "default/web6");
    assert_eq!(web_status.vip, vip);
    for b in &web_status.backends {
        assert_eq!(b.flows_total as usize, counts[&b.ip], "flows of {}", b.ip);
        assert_eq!(b.state, BackendState::Active);
    }
    let pool6 = status
        .pools
        .iter()
        .find(|p| p.cidr == "fd99:100::/120")
        .expect("the IPv6 pool");
    assert_eq!((pool6.used, pool6.size), (1, 255));
    let table = status.table();
    assert!(
        table.contains(&format!("default/web6  VIP {vip}")),
        "{table}"
    );
    assert!(table.contains(&ips[2].to_string()), "{table}");
    let metrics = w.api().metrics().expect("metrics");
    let line = format!(
        "slipway_lb_backend_flows_total{{service=\"default/web6\",vip=\"{vip}\",backend=\"{}\"}} {}",
        ips[2],
        counts[&IpAddr::V6(ips[2])]
    );
    assert!(metrics.contains(&line), "{line} not in\n{metrics}");

    // Released with its services: nobody answers for it any more.
    w.api().delete("default", "web6").expect("delete");
    w.api().delete("default", "dns6").expect("delete");
    assert!(w.api().status().expect("status").announced.is_empty());
    assert!(
        !groups().contains("ff02::1:ff00:1"),
        "the group is left with the VIP: {}",
        groups()
    );
    w.client()
        .ip(&["-6", "neigh", "flush", "dev", "eth0"])
        .expect("flush");
    assert!(
        LbWorld::curl(w.client(), &url, 1).expect("curl").is_empty(),
        "nobody answers for a released IPv6 VIP"
    );
}

#[test]
#[cfg_attr(
    not(feature = "privileged"),
    ignore = "privileged: root + BPF + netns; run scripts/test.sh"
)]
fn ipv6_source_ranges_local_policy_and_streams_across_backend_changes() {
    let mut w = LbWorld::new(4).expect("world");
    for i in 0..4 {
        w.start_nginx(i).expect("nginx");
        w.start_echo(i).expect("echo");
    }
    let f = Family::v6(&w);
    check_source_ranges(&w, &f);
    check_local_policy(&w, &f);
    check_streams_across_backend_changes(&w, &f);
}

#[test]
#[cfg_attr(
    not(feature = "privileged"),
    ignore = "privileged: root + BPF + netns; run scripts/test.sh"
)]
fn iperf3_through_a_three_backend_vip_works_with_client_ip_affinity() {
    use slipway_lb::config::SessionAffinity;
    let w = LbWorld::new(3).expect("world");
    // iperf3 opens a control and a data connection, which must reach the same server.
    let servers: Vec<_> = (0..3)
        .map(|i| {
            let (ns, _) = w.backend(i);
            let server = ns
                .spawn(&["iperf3", "-s", "-p", "5201"])
                .expect("iperf3 server");
            ns.wait_tcp_listen(5201, Duration::from_secs(10))
                .expect("iperf3 listens");
            server
        })
        .collect();
    let ips = w.backend_ips();
    let backends: Vec<(Ipv4Addr, u32)> = ips.iter().map(|ip| (*ip, 1)).collect();
    let mut iperf = spec("iperf", vec![port(Protocol::Tcp, 5201)], &backends);
    iperf.session_affinity = SessionAffinity::ClientIp;
    let vip = w.api().apply(&iperf).expect("apply");
    for run in 0..6 {
        let out = w
            .client()
            .exec(&[
                "timeout",
                "30",
                "iperf3",
                "-c",
                &vip.to_string(),
                "-p",
                "5201",
                "-t",
                "1",
                "--connect-timeout",
                "3000",
            ])
            .expect("iperf3 client");
        assert!(
            out.status.success(),
            "run {run}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let status = service_status(&w, "default/iperf");
    let used: Vec<&BackendStatusRow> = status
        .backends
        .iter()
        .filter(|b| b.flows_total > 0)
        .collect();
    assert_eq!(
        used.len(),
        1,
        "one client, one backend: {:?}",
        status.backends
    );
    drop(servers);
}

type BackendStatusRow = slipway_lb::status::BackendStatus;

#[test]
#[cfg_attr(
    not(feature = "privileged"),
    ignore = "privileged: root + BPF + netns; run scripts/test.sh"
)]
fn prometheus_scrapes_the_metrics_over_tcp() {
    let mut w = LbWorld::new(1).expect("world");
    w.start_nginx(0).expect("nginx");
    let addr = std::net::SocketAddr::new(w.lb_ip().into(), 9630);
    w.reconfigure(|c| c.metrics_address = Some(addr))
        .expect("daemon with a metrics address");
    let ips = w.backend_ips();
    let vip = w
        .api()
        .apply(&spec("web", vec![port(Protocol::Tcp, 80)], &[(ips[0], 1)]))
        .expect("apply");
    assert_eq!(
        LbWorld::curl(w.client(), &format!("http://{vip}"), 3)
            .expect("curl")
            .len(),
        3
    );
    // From another host, as Prometheus would.
    let out = w
        .client()
        .run(&[
            "curl",
            "-sf",
            "--max-time",
            "10",
            &format!("http://{addr}/metrics"),
        ])
        .expect("scrape");
    let line = out
        .lines()
        .find(|l| {
            l.starts_with("slipway_lb_vip_flows_total{") && l.contains("service=\"default/web\"")
        })
        .unwrap_or_else(|| panic!("no flow counter of default/web in\n{out}"));
    let flows: u64 = line
        .rsplit(' ')
        .next()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{line}"));
    assert_eq!(flows, 3, "{line}");
    assert!(
        out.contains("slipway_lb_map_bytes{map=\"lb_flows\"}"),
        "map memory is exported"
    );
}
