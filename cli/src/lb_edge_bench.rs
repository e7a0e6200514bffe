//! The edge half of `slipway bench lb`: LoadBalancer Services of a provisioned cluster, served
//! by two edge hosts fed by the supervisor, as a workload cluster's users get them. A cluster
//! of netns hosts (1 control plane, 2 workers with containerd) runs an nginx pod and an iperf3
//! pod on one worker behind two Services of type LoadBalancer with `externalTrafficPolicy:
//! Local` and direct server return (the cloud provider's default); two edge hosts and a client
//! host share one zone's segment.
//!
//! Alternating in the same run, from the client host:
//! - new connections/s (wrk, `Connection: close`) and TCP throughput (iperf3) through the VIP
//!   (IP-in-IP to the worker, which answers the client itself), through HAProxy in TCP mode on
//!   an edge host (to the worker's node port), and straight to the worker's node port;
//! - the CPU per 1,000 new connections: the LB programs' run time against HAProxy's process.
//!
//! First, `--kills` times, the VIP owner's LB daemon dies (kill -9) with requests half sent
//! through it: the time until a new connection through the VIP is answered again (p50, p99,
//! against the 1 s goal), how many of the half-sent requests finish, and how often the other
//! edge host took the VIP (else the owner's LB, restarted by its host's join, renewed its Lease
//! first). The next kill waits until both edge hosts serve again.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Node, Pod, Service};
use kube::api::{Api, DynamicObject, ListParams, PostParams};
use serde_json::{Value, json};
use slipway_bench::lb::{Options, haproxy_tcp, iperf3_to, process_cpu_seconds, wrk};
use slipway_bench::report::{Metric, Record, Samples};
use slipway_dataplane::world::Netns;
use slipway_hosts::reconciler::ProviderArgs;
use slipway_lb::datapath::{enable_run_time_stats, run_time};
use slipway_lb::world::HalfRequests;

use crate::bench_pods::{latency_records, until};
use crate::up::{create, resource};

const SUITE: &str = slipway_bench::lb::SUITE;
/// The cluster's ingress pool ([`crate::cluster_bench::cluster`]).
const POOL: &str = "10.124.100.0/27";
const HAPROXY_WEB: u16 = 8080;
const HAPROXY_IPERF: u16 = 5202;
const IPERF: u16 = 5201;
/// Requests half sent through the owner before each of its deaths.
const HALF_SENT: usize = 5;
/// The goal for the failover gap (the issue's): traffic again within a second.
const GOAL_MS: f64 = 1000.0;

/// What the edge half measures, and how long.
#[derive(Debug, Clone)]
pub(crate) struct EdgeOptions {
    pub lb: Options,
    pub kills: usize,
}

/// nginx in the tools image on port 8080 without an access log (its default writes one line a
/// request to the container's log).
const NGINX: &str = "sed -e 's|access_log /dev/stdout|access_log off|' \
    -e 's|worker_connections 256|worker_connections 4096|' -e 's|listen 80|listen 8080|' \
    /etc/nginx/nginx.conf > /tmp/nginx.conf && exec /usr/sbin/nginx -c /tmp/nginx.conf";

fn pinned_pod(name: &str, node: &str, command: &[&str], port: u16) -> anyhow::Result<Pod> {
    Ok(serde_json::from_value(json!({
        "metadata": {"name": name, "labels": {"app": name}},
        "spec": {
            "nodeName": node,
            "containers": [{"name": "c", "image": "tools", "imagePullPolicy": "Never",
                            "command": command,
                            "readinessProbe": {"tcpSocket": {"port": port}, "periodSeconds": 1}}],
        },
    }))?)
}

fn lb_service(name: &str, port: u16, target: u16) -> anyhow::Result<Service> {
    Ok(serde_json::from_value(json!({
        "metadata": {"name": name},
        "spec": {"type": "LoadBalancer", "externalTrafficPolicy": "Local",
                 "selector": {"app": name},
                 "ports": [{"port": port, "targetPort": target}]},
    }))?)
}

/// Runs `argv` in `netns`; fails with its stderr.
fn run_in(netns: &Netns, argv: &[&str]) -> anyhow::Result<String> {
    Ok(netns.run(argv)?)
}

/// One new connection through `url` from `client`: whether it was answered.
fn answered(client: &Netns, url: &str) -> bool {
    client
        .exec(&[
            "curl",
            "-s",
            "-o",
            "/dev/null",
            "--connect-timeout",
            "0.1",
            "--max-time",
            "0.5",
            url,
        ])
        .is_ok_and(|o| o.status.success())
}

/// A Host's address once it is Ready.
async fn host_address(hosts: &Api<DynamicObject>, name: &str) -> anyhow::Result<Option<String>> {
    let Some(h) = hosts.get_opt(name).await? else {
        return Ok(None);
    };
    let ready = h.data["status"]["conditions"].as_array().is_some_and(|cs| {
        cs.iter()
            .any(|c| c["type"] == "Ready" && c["status"] == "True")
    });
    Ok(ready
        .then(|| h.data["status"]["address"].as_str().map(str::to_owned))
        .flatten())
}

/// The VIP a workload Service got.
async fn vip(services: &Api<Service>, name: &str) -> anyhow::Result<Ipv4Addr> {
    until(&format!("Service {name}'s EXTERNAL-IP"), || async {
        let svc = services.get(name).await?;
        Ok(svc
            .status
            .and_then(|s| s.load_balancer)
            .and_then(|lb| lb.ingress)
            .and_then(|i| i.first().and_then(|i| i.ip.clone()))
            .and_then(|ip| ip.parse().ok()))
    })
    .await
}

async fn node_port(services: &Api<Service>, name: &str) -> anyhow::Result<u16> {
    let svc = services.get(name).await?;
    svc.spec
        .and_then(|s| s.ports)
        .and_then(|p| p.first().and_then(|p| p.node_port))
        .and_then(|p| u16::try_from(p).ok())
        .with_context(|| format!("Service {name} has no node port"))
}

/// The pids of `host`'s LB daemon (`slipway lb serve`).
fn lb_pids(netns: &Netns) -> Vec<String> {
    let out = Command::new("ip")
        .args(["netns", "pids", netns.name()])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    out.split_whitespace()
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| String::from_utf8_lossy(&c).contains("lb\0serve"))
        })
        .map(str::to_owned)
        .collect()
}

/// The edge half of the suite on a supervisor already serving at `data_dir`.
pub(crate) async fn measure(
    data_dir: &Path,
    hosts_args: &ProviderArgs,
    options: &EdgeOptions,
) -> anyhow::Result<Vec<Record>> {
    let zones = &hosts_args.zones;
    let zone = zones.first().context("no zone")?.clone();
    println!(
        "bench lb: making a cluster of 1 control plane host and 2 workers, 2 edge hosts and a client"
    );
    let workload = crate::pods_bench::node_cluster(data_dir, zones, "1Gi").await?;
    let client = crate::client_for(&data_dir.join("admin.kubeconfig")).await?;
    create(
        &client,
        &resource("slipway.dev", "HostClass", "hostclasses"),
        None,
        json!({"apiVersion": "slipway.dev/v1alpha1", "kind": "HostClass",
               "metadata": {"name": "edge"}, "spec": {"cpus": 1, "memory": "512Mi"}}),
    )
    .await?;
    let hosts_rt = resource("slipway.dev", "Host", "hosts");
    for (name, class, pool) in [
        ("edge-a", "edge", Some("edge")),
        ("edge-b", "edge", Some("edge")),
        ("client", "node", None),
    ] {
        let mut spec = json!({"zone": zone, "hostClass": class, "provider": "netns"});
        if let Some(p) = pool {
            spec["pool"] = json!(p);
        }
        create(
            &client,
            &hosts_rt,
            None,
            json!({"apiVersion": "slipway.dev/v1alpha1", "kind": "Host",
                   "metadata": {"name": name}, "spec": spec}),
        )
        .await?;
    }
    let hosts: Api<DynamicObject> = Api::all_with(client.clone(), &hosts_rt);
    let mut address = BTreeMap::new();
    for name in ["edge-a", "edge-b", "client"] {
        let a = until(&format!("host {name} Ready"), || host_address(&hosts, name)).await?;
        address.insert(name, a);
    }
    let netns = |host: &str| Netns::named(format!("{}h-{host}", hosts_args.netns_prefix));
    let client_ns = netns("client");
    run_in(&client_ns, &["ip", "route", "add", POOL, "dev", "eth0"])?;
    // Every side's connections end at the same pod, which closes first (`Connection: close`)
    // and keeps each client port's last connection in TIME-WAIT for 60 s: a later side reusing
    // the port would wait for it unless the pod can tell the new SYN is newer, which it can
    // from timestamps without a per-connection random offset (mode 2). Without it the side
    // that runs first is favoured. (tw_reuse: the client's own TIME-WAIT ports, as above.)
    client_ns.sysctl(&["net.ipv4.tcp_tw_reuse=1", "net.ipv4.tcp_timestamps=2"])?;

    // nginx and iperf3 on one worker, each behind a LoadBalancer Service.
    let worker = Api::<Node>::all(workload.clone())
        .list(&ListParams::default())
        .await?
        .items
        .into_iter()
        .find(|n| {
            n.metadata
                .labels
                .as_ref()
                .is_none_or(|l| !l.contains_key("node-role.kubernetes.io/control-plane"))
        })
        .context("no worker Node")?;
    let worker_name = worker.metadata.name.clone().unwrap_or_default();
    let worker_ip: Ipv4Addr = worker
        .status
        .and_then(|s| s.addresses)
        .into_iter()
        .flatten()
        .find(|a| a.type_ == "InternalIP")
        .and_then(|a| a.address.parse().ok())
        .context("the worker has no InternalIP")?;
    let pods: Api<Pod> = Api::namespaced(workload.clone(), "default");
    let services: Api<Service> = Api::namespaced(workload.clone(), "default");
    let iperf_port = IPERF.to_string();
    for pod in [
        pinned_pod("web", &worker_name, &["sh", "-c", NGINX], 8080)?,
        pinned_pod(
            "iperf",
            &worker_name,
            &["/usr/bin/iperf3", "-s", "-p", &iperf_port],
            IPERF,
        )?,
    ] {
        pods.create(&PostParams::default(), &pod).await?;
    }
    services
        .create(&PostParams::default(), &lb_service("web", 80, 8080)?)
        .await?;
    services
        .create(&PostParams::default(), &lb_service("iperf", IPERF, IPERF)?)
        .await?;
    let (web_vip, iperf_vip) = (vip(&services, "web").await?, vip(&services, "iperf").await?);
    let (web_np, iperf_np) = (
        node_port(&services, "web").await?,
        node_port(&services, "iperf").await?,
    );
    let vip_url = format!("http://{web_vip}/");
    let direct_url = format!("http://{worker_ip}:{web_np}/");
    until("an answer through the VIP", || async {
        Ok(answered(&client_ns, &vip_url).then_some(()))
    })
    .await?;

    // The owner's deaths first: the connection runs below leave the pods' ends of the client's
    // ports in TIME-WAIT (the server closes first), and a new connection that reuses one waits
    // for it, which would be counted as a gap.
    let leases: Api<Lease> = Api::namespaced(client.clone(), "slipway-lb");
    let lease_name = format!("vip-{}", web_vip.to_string().replace('.', "-"));
    let holder = || async {
        Ok::<_, anyhow::Error>(
            leases
                .get_opt(&lease_name)
                .await?
                .and_then(|l| l.spec?.holder_identity),
        )
    };
    let served = |host: &str| {
        let socket = data_dir.join(format!("hosts/data/{host}/lb/lb.sock"));
        slipway_local::LocalClient::new(&socket)
            .with_timeout(Duration::from_secs(2))
            .request("GET", "/v1/status", None)
            .ok()
            .filter(|a| a.is_success())
            .and_then(|a| serde_json::from_slice::<Value>(&a.body).ok())
            .and_then(|v| v["services"].as_array().map(Vec::len))
    };
    let (mut gaps, mut survived, mut taken_over) = (Vec::new(), 0, 0);
    let bar = indicatif::ProgressBar::new(options.kills as u64);
    for _ in 0..options.kills {
        let owner = until("the VIP's owner", holder).await?;
        let other = if owner == "edge-a" {
            "edge-b"
        } else {
            "edge-a"
        };
        until(&format!("{other} serving both Services"), || async {
            Ok((served(other) == Some(2)).then_some(()))
        })
        .await?;
        let owner_ns = netns(&owner);
        let pids = until(&format!("{owner}'s LB running"), || async {
            let p = lb_pids(&owner_ns);
            Ok((!p.is_empty()).then_some(p))
        })
        .await?;
        let half = HalfRequests::open(&client_ns, web_vip.into(), "/", HALF_SENT)?;
        let killed = Instant::now();
        for pid in &pids {
            let _ = Command::new("kill").args(["-9", pid]).status();
        }
        let gap = until("an answer through the VIP after the owner died", || async {
            Ok(answered(&client_ns, &vip_url).then(|| killed.elapsed()))
        })
        .await?;
        gaps.push(gap.as_secs_f64() * 1000.0);
        survived += half.finish()?;
        if holder().await?.as_deref() == Some(other) {
            taken_over += 1;
        }
        bar.inc(1);
    }
    bar.finish_and_clear();
    let edge_a: Ipv4Addr = address["edge-a"].parse()?;
    let ha_dir = data_dir.join("haproxy");
    let ha = haproxy_tcp(
        &netns("edge-a"),
        &[
            (
                SocketAddr::from((edge_a, HAPROXY_WEB)),
                vec![SocketAddr::from((worker_ip, web_np))],
            ),
            (
                SocketAddr::from((edge_a, HAPROXY_IPERF)),
                vec![SocketAddr::from((worker_ip, iperf_np))],
            ),
        ],
        &ha_dir,
    )?;
    let ha_pid = ha.id().context("haproxy pid")?;
    let ha_url = format!("http://{edge_a}:{HAPROXY_WEB}/");
    for url in [&vip_url, &ha_url, &direct_url] {
        until(&format!("an answer from {url}"), || async {
            Ok(answered(&client_ns, url).then_some(()))
        })
        .await?;
    }
    let _stats = enable_run_time_stats()?;

    // New connections/s and CPU per 1,000, then throughput, alternated.
    let lb = &options.lb;
    let (mut s, mut h, mut d) = (Vec::new(), Vec::new(), Vec::new());
    let (mut s_cpu, mut h_cpu) = (Vec::new(), Vec::new());
    let ms_per_1000 = |seconds: f64, requests: u64| seconds * 1e3 / (requests as f64 / 1000.0);
    for run in 0..lb.runs {
        println!(
            "bench lb: edge new connections, run {}/{}",
            run + 1,
            lb.runs
        );
        let (t0, _) = run_time()?;
        let r = wrk(&client_ns, &vip_url, true, lb)?;
        let (t1, _) = run_time()?;
        s.push(r.requests_per_s);
        s_cpu.push(ms_per_1000((t1 - t0).as_secs_f64(), r.requests));
        let c0 = process_cpu_seconds(ha_pid)?;
        let r = wrk(&client_ns, &ha_url, true, lb)?;
        let c1 = process_cpu_seconds(ha_pid)?;
        h.push(r.requests_per_s);
        h_cpu.push(ms_per_1000(c1 - c0, r.requests));
        d.push(wrk(&client_ns, &direct_url, true, lb)?.requests_per_s);
    }
    let (mut tp_s, mut tp_h, mut tp_d) = (Vec::new(), Vec::new(), Vec::new());
    for run in 0..lb.runs {
        println!("bench lb: edge iperf3, run {}/{}", run + 1, lb.runs);
        tp_s.push(iperf3_to(
            &client_ns,
            SocketAddr::from((iperf_vip, IPERF)),
            lb.duration,
        )?);
        tp_h.push(iperf3_to(
            &client_ns,
            SocketAddr::from((edge_a, HAPROXY_IPERF)),
            lb.duration,
        )?);
        tp_d.push(iperf3_to(
            &client_ns,
            SocketAddr::from((worker_ip, iperf_np)),
            lb.duration,
        )?);
    }
    drop(ha);
    let _ = std::fs::remove_dir_all(&ha_dir);
    let metric = |name, unit, higher_is_better, baseline| Metric {
        suite: SUITE,
        name,
        unit,
        higher_is_better,
        baseline,
    };
    let pair = |a: &Vec<f64>, b: &Vec<f64>| Samples {
        slipway: a.clone(),
        baseline: b.clone(),
    };
    let mut records = vec![
        pair(&s, &d).record(metric(
            "edge_dsr_new_connections_per_s_vs_direct",
            "conn/s",
            true,
            "direct-node-port",
        ))?,
        pair(&s, &h).record(metric(
            "edge_dsr_new_connections_per_s",
            "conn/s",
            true,
            "haproxy-tcp-on-edge",
        ))?,
        pair(&s_cpu, &h_cpu).record(metric(
            "edge_lb_cpu_ms_per_1000_new_connections",
            "ms",
            false,
            "haproxy-tcp-on-edge",
        ))?,
        pair(&tp_s, &tp_d).record(metric(
            "edge_dsr_tcp_throughput_vs_direct",
            "Gbit/s",
            true,
            "direct-node-port",
        ))?,
        pair(&tp_s, &tp_h).record(metric(
            "edge_dsr_tcp_throughput",
            "Gbit/s",
            true,
            "haproxy-tcp-on-edge",
        ))?,
    ];

    let goal = vec![GOAL_MS; gaps.len()];
    println!(
        "bench lb: {taken_over} of {} deaths moved the VIP to the other edge host (else the \
         restarted LB kept its Lease); failover gaps (ms): {}",
        options.kills,
        gaps.iter()
            .map(|g| format!("{g:.0}"))
            .collect::<Vec<_>>()
            .join(" ")
    );
    records.extend(latency_records(
        SUITE,
        "edge_failover_gap",
        "goal-1s",
        &gaps,
        &goal,
    ));
    let mut survival = Samples {
        slipway: vec![survived as f64],
        baseline: vec![(HALF_SENT * options.kills) as f64],
    }
    .record(metric(
        "edge_failover_connections_survived",
        "connections",
        true,
        "connections-open",
    ))?;
    survival.runs = options.kills;
    records.push(survival);
    Ok(records)
}

/// `slipway bench lb`: the standalone LB against HAProxy and direct connections, then (unless
/// `--no-edge`) the edge half on a provisioned cluster; both into `lb.jsonl`.
#[derive(Debug, clap::Args)]
pub struct LbBenchArgs {
    #[command(flatten)]
    run: crate::bench::RunArgs,
    /// Deaths of the VIP's owner timed in the edge half.
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u64).range(1..=500))]
    kills: u64,
    /// Only the standalone half (no supervisor, cluster or edge hosts).
    #[arg(long)]
    no_edge: bool,
    /// The supervisor's state for the edge half (wiped before and after).
    #[arg(long, default_value = "/var/lib/slipway/bench-lb")]
    data_dir: std::path::PathBuf,
    /// Where the supervisor serves during the edge half.
    #[arg(long, default_value = "0.0.0.0:6446")]
    listen: SocketAddr,
    #[command(flatten)]
    hosts: ProviderArgs,
}

impl LbBenchArgs {
    pub fn run(self) -> anyhow::Result<()> {
        let options = self.run.lb_options();
        let mut records = slipway_bench::lb::run(&options)?;
        if !self.no_edge {
            let edge = EdgeOptions {
                lb: options,
                kills: self.kills as usize,
            };
            crate::bench_pods::as_root("network namespaces, cgroups and containers", async {
                records.extend(self.edge(edge).await?);
                Ok(())
            })?;
        }
        self.run.print_and_write(SUITE, &records)
    }

    async fn edge(&self, options: EdgeOptions) -> anyhow::Result<Vec<Record>> {
        let images = self.data_dir.with_extension("images");
        let mut hosts = self.hosts.clone();
        crate::bench_pods::node_images(SUITE, &images, &mut hosts)?;
        crate::bench_pods::long_leases(SUITE, &mut hosts);
        let (tx, rx) = tokio::sync::oneshot::channel();
        let (data_dir, provider) = (self.data_dir.clone(), hosts.clone());
        let result =
            crate::up::with_supervisor(&self.data_dir, self.listen, &hosts, move |_| async move {
                let _ = tx.send(measure(&data_dir, &provider, &options).await?);
                Ok(())
            })
            .await;
        let _ = std::fs::remove_dir_all(&images);
        result?;
        rx.await.context("the edge runs did not finish")
    }
}
