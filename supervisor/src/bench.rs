//! `slipway bench api`: creates/s, gets/s, listing N objects, and watch-event latency to many
//! concurrent watchers, on redb and on a 3-member etcd cluster started for the run, with
//! `etcdctl check perf` as the store's reference. Writes `target/slipway-bench/api.jsonl`
//! (one JSON object per metric, the benchmark contract of docs/development.md) and prints a table.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use http_body_util::BodyExt;
use hyper::Method;
use serde_json::{Value, json};

use crate::admission::AdmissionConfig;
use crate::api::meta::{now_secs, rfc3339};
use crate::client::Client;
use crate::server::{Server, ServerConfig, StoreConfig};

/// Options of the API benchmark.
#[derive(Debug, Clone, clap::Args)]
pub struct BenchApiArgs {
    /// Objects created to measure creates/s.
    #[arg(long, default_value_t = 2000)]
    pub creates: usize,
    /// Gets measured.
    #[arg(long, default_value_t = 5000)]
    pub gets: usize,
    /// Objects in the listed collection.
    #[arg(long, default_value_t = 10_000)]
    pub list_objects: usize,
    /// Concurrent client connections for creates and gets.
    #[arg(long, default_value_t = 16)]
    pub concurrency: usize,
    /// Concurrent watchers.
    #[arg(long, default_value_t = 100)]
    pub watchers: usize,
    /// Updates each watcher must see.
    #[arg(long, default_value_t = 200)]
    pub watch_events: usize,
    /// Skip the etcd backend (and etcdctl check perf).
    #[arg(long)]
    pub skip_etcd: bool,
    /// Skip `etcdctl check perf` (it runs for about a minute).
    #[arg(long)]
    pub skip_check_perf: bool,
    /// Output file.
    #[arg(long, default_value = "target/slipway-bench/api.jsonl")]
    pub out: PathBuf,
}

/// One measured metric.
#[derive(Debug, Clone)]
pub struct Measurement {
    /// Metric name (`creates_per_s_redb`).
    pub metric: String,
    /// Unit.
    pub unit: &'static str,
    /// Whether bigger is better.
    pub higher_is_better: bool,
    /// Slipway's value.
    pub value: f64,
    /// Reference name and value, if any.
    pub baseline: Option<(String, f64)>,
}

struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> anyhow::Result<Self> {
        let p = std::env::temp_dir().join(format!(
            "slipway-bench-{}-{tag}-{}",
            std::process::id(),
            now_secs()
        ));
        std::fs::create_dir_all(&p).with_context(|| format!("creating {}", p.display()))?;
        Ok(Self(p))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A 3-member etcd cluster on loopback, killed on drop.
struct EtcdCluster {
    children: Vec<Child>,
    endpoints: Vec<String>,
    _dir: TempDir,
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

impl EtcdCluster {
    fn start() -> anyhow::Result<Self> {
        let dir = TempDir::new("etcd")?;
        let ports: Vec<(u16, u16)> = (0..3)
            .map(|_| Ok((free_port()?, free_port()?)))
            .collect::<anyhow::Result<_>>()?;
        let initial: Vec<String> = ports
            .iter()
            .enumerate()
            .map(|(i, (_, p))| format!("b{i}=http://127.0.0.1:{p}"))
            .collect();
        let mut cluster = Self {
            children: Vec::new(),
            endpoints: Vec::new(),
            _dir: dir,
        };
        for (i, (client, peer)) in ports.iter().enumerate() {
            let child = Command::new("etcd")
                .args(["--name", &format!("b{i}")])
                .arg("--data-dir")
                .arg(cluster._dir.0.join(format!("b{i}")))
                .args([
                    "--listen-client-urls",
                    &format!("http://127.0.0.1:{client}"),
                ])
                .args([
                    "--advertise-client-urls",
                    &format!("http://127.0.0.1:{client}"),
                ])
                .args(["--listen-peer-urls", &format!("http://127.0.0.1:{peer}")])
                .args([
                    "--initial-advertise-peer-urls",
                    &format!("http://127.0.0.1:{peer}"),
                ])
                .args(["--initial-cluster", &initial.join(",")])
                .args(["--initial-cluster-state", "new"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .context("starting etcd (is etcd-server installed?)")?;
            cluster.children.push(child);
            cluster.endpoints.push(format!("127.0.0.1:{client}"));
        }
        let start = Instant::now();
        while !etcdctl(&cluster.endpoints, &["endpoint", "health"])
            .is_ok_and(|o| o.status.success())
        {
            anyhow::ensure!(
                start.elapsed() < Duration::from_secs(30),
                "etcd cluster did not become healthy"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        Ok(cluster)
    }
}

fn etcdctl(endpoints: &[String], args: &[&str]) -> std::io::Result<std::process::Output> {
    Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .arg("--endpoints")
        .arg(endpoints.join(","))
        .args(args)
        .output()
}

/// Runs `etcdctl check perf` at its large load (8,000 writes/s offered) and returns the write
/// throughput etcd achieved (writes/s); at the small load it would only report the 150 writes/s
/// it was offered.
fn check_perf(endpoints: &[String]) -> anyhow::Result<f64> {
    let out =
        etcdctl(endpoints, &["check", "perf", "--load=l"]).context("running etcdctl check perf")?;
    let text = String::from_utf8_lossy(&out.stdout);
    parse_check_perf(&text)
        .with_context(|| format!("no throughput in etcdctl check perf output: {text}"))
}

/// The achieved writes/s from `etcdctl check perf` (`PASS: Throughput is 150 writes/s` or
/// `FAIL: Throughput too low: 2389 writes/s`).
fn parse_check_perf(text: &str) -> Option<f64> {
    text.lines()
        .filter(|l| l.contains("Throughput"))
        .find_map(|l| {
            let before = l.split("writes/s").next()?;
            before
                .split(|c: char| !c.is_ascii_digit() && c != '.')
                .rfind(|t| !t.is_empty())?
                .parse()
                .ok()
        })
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

fn zone(name: &str, tag: &str) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "apiVersion": "slipway.dev/v1alpha1", "kind": "Zone",
        "metadata": {"name": name}, "spec": {"hosts": [tag]},
    }))
    .unwrap_or_default()
}

const ZONES: &str = "/apis/slipway.dev/v1alpha1/zones";

/// Creates `names` with `concurrency` connections; returns seconds taken.
async fn create_all(
    client: &Client,
    names: Vec<String>,
    concurrency: usize,
) -> anyhow::Result<f64> {
    let queue = Arc::new(Mutex::new(names));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..concurrency.max(1) {
        let client = client.clone();
        let queue = queue.clone();
        tasks.push(tokio::spawn(async move {
            let mut conn = client.connect().await?;
            loop {
                let next = queue.lock().map_err(|_| anyhow::anyhow!("poisoned"))?.pop();
                let Some(name) = next else {
                    return anyhow::Ok(());
                };
                conn.call(
                    Method::POST,
                    ZONES,
                    Some("application/json"),
                    zone(&name, "h"),
                )
                .await?;
            }
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok(start.elapsed().as_secs_f64())
}

/// Runs every measurement against one backend.
async fn measure(
    args: &BenchApiArgs,
    store: StoreConfig,
    label: &str,
) -> anyhow::Result<Vec<Measurement>> {
    let dir = TempDir::new(label)?;
    let cfg = ServerConfig {
        data_dir: dir.0.clone(),
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        store,
        token_file: None,
        audit_log: None,
        watch_history: crate::store::redb::DEFAULT_HISTORY,
        admission: AdmissionConfig::default(),
        limits: crate::server::limits::ConnectionLimits::default(),
        advertise: Vec::new(),
    };
    let server = Server::bind(cfg).await?;
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let serving = tokio::spawn(server.serve(async {
        let _ = stop_rx.await;
    }));
    let client = Client::from_kubeconfig(&dir.0.join("admin.kubeconfig"))?;
    let mut out = Vec::new();

    // creates/s
    let names: Vec<String> = (0..args.creates).map(|i| format!("c{i}")).collect();
    let secs = create_all(&client, names, args.concurrency).await?;
    out.push(Measurement {
        metric: format!("creates_per_s_{label}"),
        unit: "ops/s",
        higher_is_better: true,
        value: args.creates as f64 / secs,
        baseline: None,
    });

    // gets/s
    let per = args.gets / args.concurrency.max(1);
    let start = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..args.concurrency.max(1) {
        let client = client.clone();
        let n = args.creates.max(1);
        tasks.push(tokio::spawn(async move {
            let mut conn = client.connect().await?;
            for i in 0..per {
                conn.call(
                    Method::GET,
                    &format!("{ZONES}/c{}", (w * per + i) % n),
                    None,
                    Vec::new(),
                )
                .await?;
            }
            anyhow::Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    let gets = (per * args.concurrency.max(1)) as f64;
    out.push(Measurement {
        metric: format!("gets_per_s_{label}"),
        unit: "ops/s",
        higher_is_better: true,
        value: gets / start.elapsed().as_secs_f64(),
        baseline: None,
    });

    // list of N objects
    let more: Vec<String> = (args.creates..args.list_objects.max(args.creates))
        .map(|i| format!("c{i}"))
        .collect();
    create_all(&client, more, args.concurrency).await?;
    let mut conn = client.connect().await?;
    let start = Instant::now();
    let reply = conn.call(Method::GET, ZONES, None, Vec::new()).await?;
    let list_ms = start.elapsed().as_secs_f64() * 1000.0;
    let listed: Value = serde_json::from_slice(&reply.body)?;
    let count = listed["items"].as_array().map_or(0, Vec::len);
    anyhow::ensure!(
        count >= args.list_objects,
        "listed {count} of {} objects",
        args.list_objects
    );
    out.push(Measurement {
        metric: format!("list_{}_ms_{label}", args.list_objects),
        unit: "ms",
        higher_is_better: false,
        value: list_ms,
        baseline: None,
    });

    // watch-event latency to W watchers
    conn.call(
        Method::POST,
        ZONES,
        Some("application/json"),
        zone("watched", "u0"),
    )
    .await?;
    let rv = {
        let v: Value = serde_json::from_slice(
            &conn
                .call(Method::GET, &format!("{ZONES}/watched"), None, Vec::new())
                .await?
                .body,
        )?;
        v["metadata"]["resourceVersion"]
            .as_str()
            .unwrap_or("0")
            .to_string()
    };
    let sent: Arc<Mutex<Vec<Option<Instant>>>> =
        Arc::new(Mutex::new(vec![None; args.watch_events + 1]));
    let mut watchers = Vec::new();
    let (ready_tx, mut ready_rx) = tokio::sync::mpsc::channel::<()>(args.watchers.max(1));
    for _ in 0..args.watchers {
        let client = client.clone();
        let sent = sent.clone();
        let ready = ready_tx.clone();
        let path = format!(
            "{ZONES}?watch=true&resourceVersion={rv}&fieldSelector=metadata.name%3Dwatched"
        );
        let want = args.watch_events;
        watchers.push(tokio::spawn(async move {
            let resp = client
                .send(Method::GET, &path, None, "application/json", Vec::new())
                .await?;
            let _ = ready.send(()).await;
            let mut body = resp.into_body();
            let mut buf = Vec::new();
            let mut lat = Vec::with_capacity(want);
            while lat.len() < want {
                let Some(frame) = body.frame().await else {
                    anyhow::bail!("watch ended early")
                };
                let Ok(data) = frame?.into_data() else {
                    continue;
                };
                buf.extend_from_slice(&data);
                while let Some(pos) = buf.iter().position(|b| *b == b'\n') {
                    let line: Vec<u8> = buf.drain(..=pos).collect();
                    let now = Instant::now();
                    let ev: Value = serde_json::from_slice(&line)?;
                    let tag = ev["object"]["spec"]["hosts"][0]
                        .as_str()
                        .unwrap_or_default();
                    let Some(i) = tag.strip_prefix('u').and_then(|n| n.parse::<usize>().ok())
                    else {
                        continue;
                    };
                    let t0 = sent
                        .lock()
                        .map_err(|_| anyhow::anyhow!("poisoned"))?
                        .get(i)
                        .copied()
                        .flatten();
                    if let Some(t0) = t0 {
                        lat.push(now.duration_since(t0).as_secs_f64() * 1000.0);
                    }
                }
            }
            anyhow::Ok(lat)
        }));
    }
    drop(ready_tx);
    for _ in 0..args.watchers {
        ready_rx.recv().await.context("a watcher failed to start")?;
    }
    for i in 1..=args.watch_events {
        sent.lock().map_err(|_| anyhow::anyhow!("poisoned"))?[i] = Some(Instant::now());
        let patch = serde_json::to_vec(&json!({"spec": {"hosts": [format!("u{i}")]}}))?;
        conn.call(
            Method::PATCH,
            &format!("{ZONES}/watched"),
            Some("application/merge-patch+json"),
            patch,
        )
        .await?;
    }
    let mut all = Vec::new();
    for w in watchers {
        all.extend(
            tokio::time::timeout(Duration::from_secs(120), w)
                .await
                .context("watchers timed out")???,
        );
    }
    all.sort_by(f64::total_cmp);
    for (p, name) in [(0.5, "p50"), (0.99, "p99")] {
        out.push(Measurement {
            metric: format!("watch_latency_{name}_{}w_{label}", args.watchers),
            unit: "ms",
            higher_is_better: false,
            value: percentile(&all, p),
            baseline: None,
        });
    }
    let _ = stop_tx.send(());
    let _ = serving.await;
    Ok(out)
}

fn record(m: &Measurement, at: &str) -> Value {
    let (baseline, baseline_value, ratio) = match &m.baseline {
        Some((name, v)) => {
            let ratio = if m.higher_is_better {
                m.value / v
            } else {
                v / m.value
            };
            (json!(name), json!(v), json!(ratio))
        }
        None => (Value::Null, Value::Null, Value::Null),
    };
    json!({
        "suite": "api", "metric": m.metric, "unit": m.unit, "higher_is_better": m.higher_is_better,
        "slipway": m.value, "baseline": baseline, "baseline_value": baseline_value, "ratio": ratio,
        "runs": 1, "spread": format!("{:.3}..{:.3}", m.value, m.value), "at": at,
    })
}

impl BenchApiArgs {
    /// Runs the benchmark and returns the measurements (also written to `out`).
    pub async fn run_async(&self) -> anyhow::Result<Vec<Measurement>> {
        let mut all = measure(self, StoreConfig::Redb, "redb").await?;
        if !self.skip_etcd {
            let etcd = EtcdCluster::start()?;
            let endpoints: Vec<String> = etcd
                .endpoints
                .iter()
                .map(|e| format!("http://{e}"))
                .collect();
            let store = StoreConfig::Etcd {
                endpoints,
                tls: None,
            };
            let mut e = measure(self, store, "etcd").await?;
            if !self.skip_check_perf {
                let writes = check_perf(&etcd.endpoints)?;
                for m in all
                    .iter_mut()
                    .chain(e.iter_mut())
                    .filter(|m| m.metric.starts_with("creates_per_s"))
                {
                    m.baseline = Some(("etcdctl-check-perf".into(), writes));
                }
            }
            all.append(&mut e);
        }
        write_jsonl(&self.out, &all)?;
        Ok(all)
    }

    /// Runs on a new runtime and prints a table.
    pub fn run(self) -> anyhow::Result<()> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?;
        let ms = rt.block_on(self.run_async())?;
        println!(
            "{:<32} {:>12} {:<6} {:>20}",
            "METRIC", "SLIPWAY", "UNIT", "BASELINE"
        );
        for m in &ms {
            let base = m
                .baseline
                .as_ref()
                .map(|(n, v)| format!("{n} {v:.1}"))
                .unwrap_or_default();
            println!(
                "{:<32} {:>12.2} {:<6} {:>20}",
                m.metric, m.value, m.unit, base
            );
        }
        println!("wrote {}", self.out.display());
        Ok(())
    }
}

fn write_jsonl(path: &Path, ms: &[Measurement]) -> anyhow::Result<()> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let at = rfc3339(now_secs());
    let text: String = ms.iter().map(|m| format!("{}\n", record(m, &at))).collect();
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_check_perf_pass_and_fail() {
        assert_eq!(
            parse_check_perf("60 / 60 100%\nPASS: Throughput is 150 writes/s\n"),
            Some(150.0)
        );
        assert_eq!(
            parse_check_perf("x\nFAIL: Throughput too low: 2389 writes/s\nSlowest request"),
            Some(2389.0)
        );
        assert_eq!(parse_check_perf("nothing"), None);
        assert_eq!(percentile(&[1.0, 2.0, 3.0, 4.0], 0.5), 3.0);
    }
}
