//! The L4 load balancer suite (`slipway bench lb`): nginx on three backend hosts; a client
//! drives wrk and iperf3 through the Slipway VIP, through HAProxy in TCP mode on the same LB
//! host, and straight to one backend, alternating in the same run (Slipway, HAProxy, direct,
//! Slipway, ...). Metrics: new connections/s (wrk, `Connection: close`), keep-alive
//! requests/s, iperf3 Gbit/s through the VIP vs direct, and the LB's CPU time per 1,000 new
//! connections.
//!
//! CPU accounting: for Slipway, the kernel's run-time stats of the LB program
//! (`BPF_ENABLE_STATS`), which cover the program itself but not the redirect that follows it;
//! for HAProxy, the process's utime+stime. Neither includes the softirq time of forwarding,
//! which on hosts that are namespaces of one kernel cannot be told apart per host. So the suite
//! also reports the whole machine's busy CPU time per 1,000 new connections through the VIP
//! against the same straight to the backend: on a CPU-bound machine its ratio is what sets the
//! ratio of new connections/s, and it includes the extra hop (the LB host's veth, the second
//! crossing of the underlay bridge, the redirect) that the program's run time leaves out.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use anyhow::{Context as _, bail, ensure};
use slipway_dataplane::world::{Netns, Process};
use slipway_lb::config::ServiceSpec;
use slipway_lb::datapath::{enable_run_time_stats, run_time};
use slipway_lb::world::LbWorld;

use crate::report::{Metric, Record, Samples};

pub const SUITE: &str = "lb";
const BACKENDS: usize = 3;
const HAPROXY_PORT: u16 = 8080;
const IPERF_PORT: u16 = 5201;

/// How long and how often to measure.
#[derive(Debug, Clone)]
pub struct Options {
    /// Runs per side.
    pub runs: usize,
    /// Length of each wrk and iperf3 run (whole seconds).
    pub duration: Duration,
    /// wrk threads and connections.
    pub wrk_threads: usize,
    pub wrk_connections: usize,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            runs: 3,
            duration: Duration::from_secs(3),
            wrk_threads: 2,
            wrk_connections: 50,
        }
    }
}

/// What one wrk run measured.
#[derive(Debug, Clone, Copy)]
pub struct Wrk {
    pub requests_per_s: f64,
    pub requests: u64,
    pub errors: u64,
}

fn parse_wrk(text: &str) -> Option<Wrk> {
    let requests_per_s = text
        .lines()
        .find(|l| l.starts_with("Requests/sec:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()?;
    let requests = text
        .lines()
        .find(|l| l.contains("requests in"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    let mut errors = 0;
    if let Some(line) = text
        .lines()
        .find(|l| l.trim_start().starts_with("Socket errors:"))
    {
        errors += line
            .split(',')
            .filter_map(|p| p.split_whitespace().last()?.parse::<u64>().ok())
            .sum::<u64>();
    }
    if let Some(line) = text
        .lines()
        .find(|l| l.contains("Non-2xx or 3xx responses:"))
    {
        errors += line
            .split_whitespace()
            .last()
            .and_then(|n| n.parse().ok())
            .unwrap_or(0);
    }
    Some(Wrk {
        requests_per_s,
        requests,
        errors,
    })
}

pub fn wrk(client: &Netns, url: &str, close: bool, options: &Options) -> anyhow::Result<Wrk> {
    let threads = options.wrk_threads.to_string();
    let conns = options.wrk_connections.to_string();
    let secs = format!("{}s", options.duration.as_secs().max(1));
    let mut argv = vec!["wrk", "-t", &threads, "-c", &conns, "-d", &secs];
    if close {
        argv.extend(["-H", "Connection: close"]);
    }
    argv.push(url);
    let out = client.run(&argv).with_context(|| format!("wrk {url}"))?;
    let result = parse_wrk(&out).with_context(|| format!("wrk output: {out}"))?;
    if result.errors > result.requests / 100 {
        eprintln!(
            "[lb] warning: wrk {url}: {} errors in {} requests",
            result.errors, result.requests
        );
    }
    Ok(result)
}

fn iperf3(
    client: &Netns,
    server: &Netns,
    target: IpAddr,
    options: &Options,
) -> anyhow::Result<f64> {
    let port = IPERF_PORT.to_string();
    let process = server.spawn(&["iperf3", "-s", "-1", "-p", &port])?;
    server.wait_tcp_listen(IPERF_PORT, Duration::from_secs(5))?;
    let gbps = iperf3_to(
        client,
        SocketAddr::new(target, IPERF_PORT),
        options.duration,
    )?;
    process.wait()?;
    Ok(gbps)
}

/// One iperf3 run (TCP, `duration`) from `client` to a server at `target`: Gbit/s received.
pub fn iperf3_to(client: &Netns, target: SocketAddr, duration: Duration) -> anyhow::Result<f64> {
    let secs = duration.as_secs().max(1);
    let limit = (secs + 15).to_string();
    let secs = secs.to_string();
    let (ip, port) = (target.ip().to_string(), target.port().to_string());
    let text = client.run(&[
        "timeout", &limit, "iperf3", "-c", &ip, "-p", &port, "-t", &secs, "-J",
    ])?;
    let json: serde_json::Value = serde_json::from_str(&text).context("iperf3 JSON")?;
    let bps = json["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .context("iperf3: no sum_received")?;
    Ok(bps / 1e9)
}

/// Busy clock ticks of every CPU (user, nice, system, irq, softirq, steal: all but idle and
/// iowait) in the `cpu` line of /proc/stat.
fn parse_busy_ticks(stat: &str) -> Option<u64> {
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let ticks: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|t| t.parse().ok())
        .collect::<Option<_>>()?;
    let &[user, nice, system, _idle, _iowait, irq, softirq, steal, ..] = ticks.as_slice() else {
        return None;
    };
    Some(user + nice + system + irq + softirq + steal)
}

/// Busy time of the whole machine so far, seconds.
fn machine_busy_seconds() -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string("/proc/stat")?;
    let ticks = parse_busy_ticks(&stat).context("/proc/stat: cpu line")?;
    // /proc/stat counts clock ticks of USER_HZ, 100 on Linux x86_64.
    Ok(ticks as f64 / 100.0)
}

/// utime+stime of process `pid`, seconds.
pub fn process_cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .context("/proc/pid/stat")?
        .1
        .split_whitespace()
        .collect();
    // Fields 14 and 15 (utime, stime), counted after the command name: indices 11 and 12.
    let ticks: f64 = fields[11].parse::<f64>()? + fields[12].parse::<f64>()?;
    // /proc/pid/stat counts clock ticks of USER_HZ, 100 on Linux x86_64.
    Ok(ticks / 100.0)
}

fn haproxy(
    lb: &Netns,
    listen: Ipv4Addr,
    backends: &[Ipv4Addr],
    dir: &std::path::Path,
) -> anyhow::Result<Process> {
    let backends: Vec<SocketAddr> = backends
        .iter()
        .map(|b| SocketAddr::from((*b, 80)))
        .collect();
    haproxy_tcp(
        lb,
        &[(SocketAddr::from((listen, HAPROXY_PORT)), backends)],
        dir,
    )
}

/// HAProxy in TCP mode in `lb`: each frontend address round-robin over its backends (config
/// written to `dir`); returns once every frontend listens.
pub fn haproxy_tcp(
    lb: &Netns,
    frontends: &[(SocketAddr, Vec<SocketAddr>)],
    dir: &std::path::Path,
) -> anyhow::Result<Process> {
    let mut cfg = String::from(
        "global\n  maxconn 8000\n\ndefaults\n  mode tcp\n  timeout connect 5s\n  \
         timeout client 30s\n  timeout server 30s\n",
    );
    for (f, (listen, backends)) in frontends.iter().enumerate() {
        cfg.push_str(&format!(
            "\nfrontend fe{f}\n  bind {listen}\n  default_backend be{f}\n\n\
             backend be{f}\n  balance roundrobin\n"
        ));
        for (i, b) in backends.iter().enumerate() {
            cfg.push_str(&format!("  server b{i} {b}\n"));
        }
    }
    std::fs::create_dir_all(dir)?;
    let path = dir.join("haproxy.cfg");
    std::fs::write(&path, cfg)?;
    let path = path.display().to_string();
    let process = lb.spawn(&["haproxy", "-db", "-f", &path])?;
    for (listen, _) in frontends {
        lb.wait_tcp_listen(listen.port(), Duration::from_secs(10))?;
    }
    Ok(process)
}

fn service(name: &str, port: u16, backends: &[Ipv4Addr]) -> ServiceSpec {
    let backends: Vec<IpAddr> = backends.iter().map(|ip| (*ip).into()).collect();
    ServiceSpec::tcp("bench", name, port, &backends)
}

/// Runs the suite; prints progress and results to stderr.
pub fn run(options: &Options) -> anyhow::Result<Vec<Record>> {
    ensure!(options.runs > 0, "runs: must be at least 1");
    for tool in ["wrk", "haproxy", "nginx", "iperf3"] {
        ensure!(
            std::process::Command::new("sh")
                .args(["-c", &format!("command -v {tool}")])
                .output()
                .is_ok_and(|o| o.status.success()),
            "{tool} is not installed"
        );
    }
    eprintln!("[lb] building the world: client, LB, {BACKENDS} nginx backends");
    let mut w = LbWorld::new(BACKENDS)?;
    for i in 0..BACKENDS {
        w.start_nginx(i)?;
    }
    let ips = w.backend_ips();
    let api = w.api();
    let vip = api.apply(&service("web", 80, &ips))?;
    let iperf_vip = api.apply(&service("iperf", IPERF_PORT, &ips[..1]))?;
    let dir = std::env::temp_dir().join(format!("{}-haproxy", w.world().name()));
    let ha = haproxy(w.lb(), w.lb_ip(), &ips, &dir)?;
    let ha_pid = ha.id().context("haproxy pid")?;
    let client = w.client().clone();
    // About one direct connection in ten (and many through HAProxy) ends with wrk closing
    // first, its close racing the server's FIN, which leaves the client in TIME-WAIT towards
    // that destination for 60 s. Those fill the client's ephemeral ports for it, and
    // connect()'s port search (__inet_hash_connect, __inet_check_established) then takes the
    // client's CPU: direct fell from 44k to 33k to 18k new connections/s over consecutive
    // runs, and to 1.2k with 100 connections; HAProxy's figure halved. Reusing TIME-WAIT ports
    // (guarded by TCP timestamps, RFC 7323) makes each side's result independent of the runs
    // before it. The VIP's flows rarely leave any (0.5%), so this raises the baselines only.
    client.sysctl(&["net.ipv4.tcp_tw_reuse=1"])?;
    let slipway_url = format!("http://{vip}/");
    let haproxy_url = format!("http://{}:{HAPROXY_PORT}/", w.lb_ip());
    let direct_url = format!("http://{}/", ips[0]);
    // Warm up: neighbour caches, nginx, HAProxy.
    for url in [&slipway_url, &haproxy_url, &direct_url] {
        let lines = LbWorld::curl(&client, url.trim_end_matches('/'), 20)?;
        ensure!(lines.len() == 20, "warm-up through {url} failed");
    }
    let _stats = enable_run_time_stats()?;

    let mut records = Vec::new();
    let metric = |name, unit, higher_is_better, baseline| Metric {
        suite: SUITE,
        name,
        unit,
        higher_is_better,
        baseline,
    };

    // New connections/s, and the CPU each side spends on them.
    let (mut s, mut h, mut d) = (Vec::new(), Vec::new(), Vec::new());
    let (mut s_cpu, mut h_cpu) = (Vec::new(), Vec::new());
    let (mut s_box, mut d_box) = (Vec::new(), Vec::new());
    let ms_per_1000 = |seconds: f64, requests: u64| seconds * 1e3 / (requests as f64 / 1000.0);
    for run in 0..options.runs {
        eprintln!("[lb] new connections, run {}/{}", run + 1, options.runs);
        let (t0, _) = run_time()?;
        let b0 = machine_busy_seconds()?;
        let r = wrk(&client, &slipway_url, true, options)?;
        let b1 = machine_busy_seconds()?;
        let (t1, _) = run_time()?;
        s.push(r.requests_per_s);
        s_cpu.push(ms_per_1000((t1 - t0).as_secs_f64(), r.requests));
        s_box.push(ms_per_1000(b1 - b0, r.requests));
        let c0 = process_cpu_seconds(ha_pid)?;
        let r = wrk(&client, &haproxy_url, true, options)?;
        let c1 = process_cpu_seconds(ha_pid)?;
        h.push(r.requests_per_s);
        h_cpu.push(ms_per_1000(c1 - c0, r.requests));
        let b0 = machine_busy_seconds()?;
        let r = wrk(&client, &direct_url, true, options)?;
        let b1 = machine_busy_seconds()?;
        d.push(r.requests_per_s);
        d_box.push(ms_per_1000(b1 - b0, r.requests));
    }
    // The records keep Slipway's spread only; the baselines' runs matter as much here.
    let runs = |v: &[f64]| {
        v.iter()
            .map(|x| format!("{x:.0}"))
            .collect::<Vec<_>>()
            .join(" ")
    };
    eprintln!(
        "[lb] new connections/s per run: slipway {}; haproxy {}; direct {}",
        runs(&s),
        runs(&h),
        runs(&d)
    );
    eprintln!(
        "[lb] machine CPU ms per 1,000 new connections per run: slipway {}; direct {}",
        runs(&s_box),
        runs(&d_box)
    );
    let samples = |slipway: &Vec<f64>, baseline: &Vec<f64>| Samples {
        slipway: slipway.clone(),
        baseline: baseline.clone(),
    };
    records.push(samples(&s, &h).record(metric(
        "new_connections_per_s",
        "conn/s",
        true,
        "haproxy-tcp",
    ))?);
    records.push(samples(&s, &d).record(metric(
        "new_connections_per_s_vs_direct",
        "conn/s",
        true,
        "direct-backend",
    ))?);
    records.push(samples(&s_cpu, &h_cpu).record(metric(
        "lb_cpu_ms_per_1000_new_connections",
        "ms",
        false,
        "haproxy-tcp",
    ))?);
    records.push(samples(&s_box, &d_box).record(metric(
        "machine_cpu_ms_per_1000_new_connections_vs_direct",
        "ms",
        false,
        "direct-backend",
    ))?);

    // Keep-alive requests/s.
    let (mut s, mut h, mut d) = (Vec::new(), Vec::new(), Vec::new());
    for run in 0..options.runs {
        eprintln!("[lb] keep-alive requests, run {}/{}", run + 1, options.runs);
        s.push(wrk(&client, &slipway_url, false, options)?.requests_per_s);
        h.push(wrk(&client, &haproxy_url, false, options)?.requests_per_s);
        d.push(wrk(&client, &direct_url, false, options)?.requests_per_s);
    }
    records.push(samples(&s, &h).record(metric(
        "keepalive_requests_per_s",
        "req/s",
        true,
        "haproxy-tcp",
    ))?);
    records.push(samples(&s, &d).record(metric(
        "keepalive_requests_per_s_vs_direct",
        "req/s",
        true,
        "direct-backend",
    ))?);

    // Throughput through the VIP (a service with one backend) vs straight to that backend.
    let (server, _) = w.backend(0);
    let server = server.clone();
    let samples_tp = Samples::alternate(
        options.runs,
        |run| {
            eprintln!("[lb] iperf3, run {}/{}", run + 1, options.runs);
            iperf3(&client, &server, iperf_vip, options)
        },
        |_| iperf3(&client, &server, ips[0].into(), options),
    )?;
    records.push(samples_tp.record(metric("tcp_throughput", "Gbit/s", true, "direct-backend"))?);

    drop(ha);
    let _ = std::fs::remove_dir_all(&dir);
    if records.is_empty() {
        bail!("no records");
    }
    Ok(records)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_wrk_output() {
        let text = "Running 3s test @ http://10.99.100.1/\n  2 threads and 50 connections\n\
            Thread Stats   Avg      Stdev     Max   +/- Stdev\n    Latency     2.01ms  \n\
            65432 requests in 3.00s, 9.87MB read\n  Socket errors: connect 0, read 3, write 0, timeout 2\n\
            Non-2xx or 3xx responses: 1\nRequests/sec:  21810.67\nTransfer/sec:      3.29MB\n";
        let w = parse_wrk(text).expect("parse");
        assert_eq!((w.requests, w.errors), (65432, 6));
        assert!((w.requests_per_s - 21810.67).abs() < 1e-9);
        assert!(parse_wrk("unable to connect").is_none());
    }

    #[test]
    fn parses_proc_stat_busy_ticks() {
        let stat = "cpu  100 2 30 5000 7 1 40 3 0 0\ncpu0 50 1 15 2500 3 0 20 1 0 0\nctxt 9\n";
        assert_eq!(parse_busy_ticks(stat), Some(100 + 2 + 30 + 1 + 40 + 3));
        assert_eq!(parse_busy_ticks("cpu  1 2 3\n"), None);
        assert_eq!(parse_busy_ticks("cpu  1 2 x 4 5 6 7 8\n"), None);
        assert_eq!(parse_busy_ticks("intr 5\n"), None);
    }
}
