//! The nbd suite: Slipway's NBD server beside nbdkit (file plugin on the same raw file, and the
//! memory plugin) and qemu-nbd (`--aio=io_uring`) on the same machine in the same run, driven by
//! the same client (fio's nbd engine) over a Unix socket and TCP loopback, on 1 and 4
//! connections; plus the raw file through fio's io_uring engine as the physical reference.
//!
//! Every server sees the same page-cache state: before each job the file it serves is read
//! once (so it is resident, as in the reference figures) and its residency is logged.
//! Server CPU time per I/O comes from utime+stime of the server process over the job; Slipway
//! runs inside this process (its own tokio runtime), whose main thread only waits for fio.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};
use slipway_blockstore::config::ServeConfig;
use slipway_blockstore::control::{ControlRequest, dispatch};
use slipway_blockstore::daemon::Daemon;

use crate::report::{Metric, Record, Samples};

pub const SUITE: &str = "nbd";
const EXPORT: &str = "bench";

/// How much and how long to measure.
#[derive(Debug, Clone)]
pub struct Options {
    /// Rounds; in each round every server runs every job once (A B C D, A B C D, ...).
    pub runs: usize,
    /// Length of each fio job.
    pub runtime: Duration,
    /// Size of the served file / volume, MiB.
    pub size_mib: u64,
    /// Scratch directory (raw file, Slipway data dir, sockets); removed afterwards.
    pub work_dir: PathBuf,
    /// Transports to measure.
    pub transports: Vec<Transport>,
    /// Connection counts to measure (fio jobs, one NBD connection each).
    pub connections: Vec<usize>,
    /// Only jobs whose label (e.g. `randread_4k_qd1_unix_1conn`) contains this.
    pub only: Option<String>,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            runs: 3,
            runtime: Duration::from_secs(2),
            size_mib: 1024,
            work_dir: std::env::temp_dir()
                .join(format!("slipway-bench-nbd-{}", std::process::id())),
            transports: vec![Transport::Unix, Transport::Tcp],
            connections: vec![1, 4],
            only: None,
        }
    }
}

/// How fio reaches the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// Unix domain socket.
    Unix,
    /// TCP over loopback.
    Tcp,
}

impl Transport {
    fn name(self) -> &'static str {
        match self {
            Self::Unix => "unix",
            Self::Tcp => "tcp",
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Job {
    name: &'static str,
    rw: &'static str,
    bs: &'static str,
    iodepth: u32,
}

const JOBS: [Job; 5] = [
    Job {
        name: "randread_4k_qd32",
        rw: "randread",
        bs: "4k",
        iodepth: 32,
    },
    Job {
        name: "randwrite_4k_qd32",
        rw: "randwrite",
        bs: "4k",
        iodepth: 32,
    },
    Job {
        name: "randread_4k_qd1",
        rw: "randread",
        bs: "4k",
        iodepth: 1,
    },
    Job {
        name: "seqread_1m",
        rw: "read",
        bs: "1M",
        iodepth: 8,
    },
    Job {
        name: "seqwrite_1m",
        rw: "write",
        bs: "1M",
        iodepth: 8,
    },
];

/// One fio result.
#[derive(Debug, Clone, Copy, Default)]
struct FioResult {
    iops: f64,
    mb_per_s: f64,
    p50_us: f64,
    p99_us: f64,
    ios: f64,
    /// Server CPU seconds over the job (NaN when not measured).
    cpu_s: f64,
}

/// The servers of one transport, all serving equal content.
trait Server {
    fn name(&self) -> &'static str;
    fn uri(&self) -> String;
    /// The file whose page-cache state matters (None: memory-backed).
    fn backing(&self) -> Option<PathBuf>;
    /// utime+stime of the server process, seconds.
    fn cpu_seconds(&self) -> anyhow::Result<f64>;
}

/// Runs the suite; prints progress and the table to stderr.
pub fn run(options: &Options) -> anyhow::Result<Vec<Record>> {
    ensure!(options.runs > 0, "runs: must be at least 1");
    ensure!(options.size_mib >= 64, "size_mib: at least 64");
    for tool in ["fio", "nbdkit", "qemu-nbd", "fincore"] {
        ensure!(
            which(tool),
            "{tool} is not installed (scripts/bootstrap.sh installs it)"
        );
    }
    let work = WorkDir::new(&options.work_dir)?;
    let size = options.size_mib << 20;
    let raw = work.0.join("raw.img");
    eprintln!("[nbd] preparing a {} MiB raw file", options.size_mib);
    fio_run(
        &[
            "--name=prefill".into(),
            "--ioengine=psync".into(),
            "--rw=write".into(),
            "--bs=1M".into(),
            format!("--filename={}", raw.display()),
            format!("--size={size}"),
            "--end_fsync=1".into(),
        ],
        None,
    )?;

    // Slipway, in-process.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("tokio runtime")?;
    let slip_dir = work.0.join("slipway");
    let cfg = ServeConfig {
        data_dir: slip_dir.join("data"),
        listen: Some("127.0.0.1:0".into()),
        unix: Some(slip_dir.join("nbd.sock")),
        control: slip_dir.join("ctl.sock"),
        metrics: None,
        extent_size: slipway_blockstore::format::DEFAULT_EXTENT_SIZE,
        tls: None,
    };
    std::fs::create_dir_all(&slip_dir)?;
    let daemon = rt
        .block_on(Daemon::start(&cfg))
        .context("starting Slipway")?;
    let resp = rt.block_on(dispatch(
        &daemon.store,
        ControlRequest::Create {
            name: EXPORT.into(),
            size,
        },
    ));
    ensure!(resp.ok, "creating the Slipway volume: {:?}", resp.error);
    let slip_unix = format!(
        "nbd+unix:///{EXPORT}?socket={}",
        slip_dir.join("nbd.sock").display()
    );
    let slip_tcp = format!(
        "nbd://{}/{EXPORT}",
        daemon.tcp.context("Slipway TCP address")?
    );
    eprintln!("[nbd] filling the Slipway volume (fully allocated, like the raw file)");
    fio_fill(&slip_unix, size)?;
    let slip_data = slip_dir.join("data").join("layers");

    let mut records = Vec::new();
    for &transport in &options.transports {
        let nbdkit_file = Spawned::nbdkit(
            &work.0,
            transport,
            "file",
            &[&format!("file={}", raw.display())],
            Some(raw.clone()),
        )?;
        let nbdkit_mem = Spawned::nbdkit(
            &work.0,
            transport,
            "memory",
            &[&format!("size={size}")],
            None,
        )?;
        let qemu = Spawned::qemu_nbd(&work.0, transport, &raw)?;
        eprintln!(
            "[nbd] {}: filling the nbdkit memory export",
            transport.name()
        );
        fio_fill(&nbdkit_mem.uri(), size)?;
        let slip = InProcess {
            uri: match transport {
                Transport::Unix => slip_unix.clone(),
                Transport::Tcp => slip_tcp.clone(),
            },
            data: slip_data.clone(),
        };
        let servers: [&dyn Server; 4] = [&slip, &nbdkit_file, &nbdkit_mem, &qemu];
        for &conns in &options.connections {
            for job in JOBS {
                let label = format!("{}_{}_{}conn", job.name, transport.name(), conns);
                if options
                    .only
                    .as_ref()
                    .is_some_and(|o| !label.contains(o.as_str()))
                {
                    continue;
                }
                // results[server][run]
                let mut results: Vec<Vec<FioResult>> = vec![Vec::new(); servers.len() + 1];
                for run in 0..options.runs {
                    // Rotate who goes first, so no server always follows another's writes.
                    for k in 0..servers.len() {
                        let i = (run + k) % servers.len();
                        let server = servers[i];
                        eprintln!("[nbd] {label} run {run}: {}", server.name());
                        results[i].push(measure(server, job, conns, size, options.runtime)?);
                    }
                    if transport == Transport::Unix && conns == 1 {
                        results[servers.len()].push(raw_reference(
                            &raw,
                            job,
                            size,
                            options.runtime,
                        )?);
                    }
                }
                records.extend(records_for(&label, job, &servers, &results)?);
            }
        }
    }
    drop(daemon);
    drop(rt);
    eprintln!("{}", crate::report::table(&records));
    Ok(records)
}

fn records_for(
    label: &str,
    job: Job,
    servers: &[&dyn Server; 4],
    results: &[Vec<FioResult>],
) -> anyhow::Result<Vec<Record>> {
    let mut out = Vec::new();
    let mut add = |metric: String,
                   unit: &str,
                   hib: bool,
                   baseline: &str,
                   pick: &dyn Fn(&FioResult) -> f64,
                   b: usize|
     -> anyhow::Result<()> {
        let samples = Samples {
            slipway: results[0].iter().map(pick).collect(),
            baseline: results[b].iter().map(pick).collect(),
        };
        if samples.baseline.is_empty()
            || samples
                .slipway
                .iter()
                .chain(&samples.baseline)
                .any(|v| !v.is_finite())
        {
            return Ok(());
        }
        out.push(samples.record(Metric {
            suite: SUITE,
            name: &metric,
            unit,
            higher_is_better: hib,
            baseline,
        })?);
        Ok(())
    };
    let raw = servers.len();
    for (b, server) in servers.iter().enumerate().skip(1) {
        let base = server.name();
        match job.bs {
            "1M" => {
                add(label.to_owned(), "MB/s", true, base, &|r| r.mb_per_s, b)?;
            }
            _ if job.iodepth == 1 => {
                add(format!("{label}_p50"), "us", false, base, &|r| r.p50_us, b)?;
                add(format!("{label}_p99"), "us", false, base, &|r| r.p99_us, b)?;
            }
            _ => {
                add(label.to_owned(), "IOPS", true, base, &|r| r.iops, b)?;
                add(
                    format!("{label}_cpu_per_io"),
                    "us",
                    false,
                    base,
                    &|r| r.cpu_s * 1e6 / r.ios.max(1.0),
                    b,
                )?;
            }
        }
    }
    if !results[raw].is_empty() {
        let base = "raw-file-io_uring";
        match job.bs {
            "1M" => add(label.to_owned(), "MB/s", true, base, &|r| r.mb_per_s, raw)?,
            _ if job.iodepth == 1 => add(
                format!("{label}_p50"),
                "us",
                false,
                base,
                &|r| r.p50_us,
                raw,
            )?,
            _ => add(label.to_owned(), "IOPS", true, base, &|r| r.iops, raw)?,
        }
    }
    Ok(out)
}

fn measure(
    server: &dyn Server,
    job: Job,
    conns: usize,
    size: u64,
    runtime: Duration,
) -> anyhow::Result<FioResult> {
    if let Some(file) = server.backing() {
        warm(&file)?;
    }
    let before = server.cpu_seconds()?;
    let mut r = fio_job(
        &["--ioengine=nbd".into(), format!("--uri={}", server.uri())],
        job,
        conns,
        size,
        runtime,
    )?;
    r.cpu_s = server.cpu_seconds()? - before;
    Ok(r)
}

fn raw_reference(raw: &Path, job: Job, size: u64, runtime: Duration) -> anyhow::Result<FioResult> {
    settle()?;
    warm(raw)?;
    fio_job(
        &[
            "--ioengine=io_uring".into(),
            format!("--filename={}", raw.display()),
            // Keep the page cache: every NBD server above is measured cache-hot too.
            "--invalidate=0".into(),
        ],
        job,
        1,
        size,
        runtime,
    )
}

fn fio_job(
    target: &[String],
    job: Job,
    conns: usize,
    size: u64,
    runtime: Duration,
) -> anyhow::Result<FioResult> {
    let mut args: Vec<String> = vec![
        "--name=bench".into(),
        format!("--rw={}", job.rw),
        format!("--bs={}", job.bs),
        format!("--iodepth={}", job.iodepth),
        format!("--numjobs={conns}"),
        format!("--size={size}"),
        format!("--runtime={}", runtime.as_secs_f64()),
        "--time_based".into(),
        "--group_reporting".into(),
        "--norandommap".into(),
        "--randrepeat=0".into(),
    ];
    args.extend_from_slice(target);
    let json = fio_run(&args, Some(()))?;
    let job = json
        .get("jobs")
        .and_then(|j| j.get(0))
        .context("fio output has no job")?;
    let err = job.get("error").and_then(|e| e.as_i64()).unwrap_or(-1);
    ensure!(err == 0, "fio job failed with error {err}");
    let mut r = FioResult::default();
    for dir in ["read", "write"] {
        let d = &job[dir];
        let ios = d["total_ios"].as_f64().unwrap_or(0.0);
        if ios <= 0.0 {
            continue;
        }
        r.ios += ios;
        r.iops += d["iops"].as_f64().unwrap_or(0.0);
        r.mb_per_s += d["bw_bytes"].as_f64().unwrap_or(0.0) / 1e6;
        let pct = &d["clat_ns"]["percentile"];
        r.p50_us = pct["50.000000"].as_f64().unwrap_or(f64::NAN) / 1e3;
        r.p99_us = pct["99.000000"].as_f64().unwrap_or(f64::NAN) / 1e3;
    }
    ensure!(r.ios > 0.0, "fio did no I/O");
    Ok(r)
}

/// Runs fio; with `json`, returns its JSON report.
fn fio_run(args: &[String], json: Option<()>) -> anyhow::Result<serde_json::Value> {
    let mut cmd = Command::new("fio");
    cmd.args(args);
    let out_file = std::env::temp_dir().join(format!("slipway-fio-{}.json", std::process::id()));
    if json.is_some() {
        cmd.arg("--output-format=json")
            .arg(format!("--output={}", out_file.display()));
    }
    let out = cmd.output().context("running fio")?;
    if !out.status.success() {
        bail!(
            "fio {:?} failed: {}{}",
            args,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    if json.is_none() {
        return Ok(serde_json::Value::Null);
    }
    let text = std::fs::read_to_string(&out_file).context("reading fio output")?;
    let _ = std::fs::remove_file(&out_file);
    let start = text.find('{').context("no JSON in fio output")?;
    serde_json::from_str(&text[start..]).context("parsing fio JSON")
}

fn fio_fill(uri: &str, size: u64) -> anyhow::Result<()> {
    fio_run(
        &[
            "--name=fill".into(),
            "--ioengine=nbd".into(),
            format!("--uri={uri}"),
            "--rw=write".into(),
            "--bs=1M".into(),
            "--iodepth=8".into(),
            format!("--size={size}"),
            "--end_fsync=1".into(),
        ],
        None,
    )
    .map(drop)
}

/// Writes back dirty pages left by the previous job (whoever ran it), so that no job pays for
/// another server's writeback.
fn settle() -> anyhow::Result<()> {
    let ok = Command::new("sync").status().is_ok_and(|s| s.success());
    ensure!(ok, "sync failed");
    Ok(())
}

/// Reads `path` (a file, or every file in a directory) so it is resident, then logs residency.
fn warm(path: &Path) -> anyhow::Result<()> {
    let files: Vec<PathBuf> = if path.is_dir() {
        std::fs::read_dir(path)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "data"))
            .collect()
    } else {
        vec![path.to_owned()]
    };
    for f in files {
        let mut file = std::fs::File::open(&f).with_context(|| format!("open {}", f.display()))?;
        std::io::copy(&mut file, &mut std::io::sink())?;
        let res = Command::new("fincore")
            .args(["--bytes", "--noheadings", "--output", "RES,SIZE"])
            .arg(&f)
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
            .unwrap_or_default();
        eprintln!("[cache] {}: resident,size = {res}", f.display());
    }
    Ok(())
}

fn which(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn proc_cpu_seconds(pid: &str) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which may hold spaces) start at ") ".
    let rest = stat.rsplit_once(") ").context("bad /proc stat")?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 =
        f.get(11).context("utime")?.parse::<f64>()? + f.get(12).context("stime")?.parse::<f64>()?;
    // /proc reports clock ticks in USER_HZ, which is 100 on Linux.
    Ok(ticks / 100.0)
}

struct InProcess {
    uri: String,
    data: PathBuf,
}

impl Server for InProcess {
    fn name(&self) -> &'static str {
        "slipway"
    }
    fn uri(&self) -> String {
        self.uri.clone()
    }
    fn backing(&self) -> Option<PathBuf> {
        Some(self.data.clone())
    }
    fn cpu_seconds(&self) -> anyhow::Result<f64> {
        proc_cpu_seconds("self")
    }
}

/// A baseline server process, killed on drop.
struct Spawned {
    name: &'static str,
    child: Child,
    uri: String,
    backing: Option<PathBuf>,
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

impl Spawned {
    fn nbdkit(
        dir: &Path,
        t: Transport,
        plugin: &str,
        params: &[&str],
        backing: Option<PathBuf>,
    ) -> anyhow::Result<Self> {
        let name = if plugin == "file" {
            "nbdkit-file"
        } else {
            "nbdkit-memory"
        };
        let mut cmd = Command::new("nbdkit");
        cmd.arg("-f");
        let uri = match t {
            Transport::Unix => {
                let sock = dir.join(format!("{name}.sock"));
                cmd.arg("-U").arg(&sock);
                format!("nbd+unix:///{EXPORT}?socket={}", sock.display())
            }
            Transport::Tcp => {
                let port = free_port()?;
                cmd.args(["-i", "127.0.0.1", "-p", &port.to_string()]);
                format!("nbd://127.0.0.1:{port}/{EXPORT}")
            }
        };
        cmd.arg(plugin).args(params);
        Self::spawn(name, cmd, uri, backing)
    }

    fn qemu_nbd(dir: &Path, t: Transport, raw: &Path) -> anyhow::Result<Self> {
        let mut cmd = Command::new("qemu-nbd");
        cmd.args([
            "-f",
            "raw",
            "--aio=io_uring",
            "-x",
            EXPORT,
            "-t",
            "-e",
            "16",
        ]);
        let uri = match t {
            Transport::Unix => {
                let sock = dir.join("qemu-nbd.sock");
                cmd.arg("-k").arg(&sock);
                format!("nbd+unix:///{EXPORT}?socket={}", sock.display())
            }
            Transport::Tcp => {
                let port = free_port()?;
                cmd.args(["-b", "127.0.0.1", "-p", &port.to_string()]);
                format!("nbd://127.0.0.1:{port}/{EXPORT}")
            }
        };
        cmd.arg(raw);
        Self::spawn("qemu-nbd", cmd, uri, Some(raw.to_owned()))
    }

    fn spawn(
        name: &'static str,
        mut cmd: Command,
        uri: String,
        backing: Option<PathBuf>,
    ) -> anyhow::Result<Self> {
        let child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {name}"))?;
        let me = Self {
            name,
            child,
            uri,
            backing,
        };
        // Wait until it answers.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let ok = Command::new("nbdinfo")
                .arg("--size")
                .arg(&me.uri)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if ok {
                return Ok(me);
            }
            ensure!(
                Instant::now() < deadline,
                "{name} did not come up on {}",
                me.uri
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Server for Spawned {
    fn name(&self) -> &'static str {
        self.name
    }
    fn uri(&self) -> String {
        self.uri.clone()
    }
    fn backing(&self) -> Option<PathBuf> {
        self.backing.clone()
    }
    fn cpu_seconds(&self) -> anyhow::Result<f64> {
        proc_cpu_seconds(&self.child.id().to_string())
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct WorkDir(PathBuf);

impl WorkDir {
    fn new(path: &Path) -> anyhow::Result<Self> {
        let _ = std::fs::remove_dir_all(path);
        std::fs::create_dir_all(path).with_context(|| format!("creating {}", path.display()))?;
        Ok(Self(path.to_owned()))
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
