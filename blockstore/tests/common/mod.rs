//! Shared fixtures for the integration tests: temp dirs and server processes that clean up in
//! `Drop` (also on panic), a tool runner, and a small synchronous NBD client.
#![allow(dead_code, reason = "each test binary uses a different subset")]

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use slipway_blockstore::control::{self, ControlRequest, ControlResponse};
use slipway_blockstore::proto::{self, Request, cmd};

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A temp directory removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let p = std::env::temp_dir().join(format!("slw-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("create temp dir");
        Self(p)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A `slipway-nbd serve` child process, killed on drop.
pub struct ServerProc {
    child: Option<Child>,
    pub dir: PathBuf,
    pub unix: PathBuf,
    pub control: PathBuf,
    pub tcp: String,
    pub metrics: String,
    pub log: PathBuf,
}

/// Where a server process keeps its data, sockets and log, and how much it logs.
pub struct ServerOpts {
    pub data: PathBuf,
    pub unix: PathBuf,
    pub control: PathBuf,
    /// `RUST_LOG`; `None` leaves it unset (the daemon's default level).
    pub rust_log: Option<String>,
    pub log: PathBuf,
    /// More `serve` flags.
    pub args: Vec<String>,
}

impl ServerOpts {
    /// Everything under `dir`: `data/`, `nbd.sock`, `ctl.sock`, `server.log`; warnings only.
    pub fn in_dir(dir: &Path) -> Self {
        Self {
            data: dir.join("data"),
            unix: dir.join("nbd.sock"),
            control: dir.join("ctl.sock"),
            rust_log: Some("warn".into()),
            log: dir.join("server.log"),
            args: Vec::new(),
        }
    }
}

impl ServerProc {
    /// Starts a server on `dir/data`, waiting for its ready line.
    pub fn start(dir: &Path) -> Self {
        Self::spawn(dir, ServerOpts::in_dir(dir)).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Starts a server with `opts`; `Err` holds its exit status and log if it did not become
    /// ready (the process is reaped either way).
    pub fn spawn(dir: &Path, opts: ServerOpts) -> Result<Self, String> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&opts.log)
            .expect("log file");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_slipway-nbd"));
        cmd.arg("serve")
            .arg("--data-dir")
            .arg(&opts.data)
            .arg("--unix")
            .arg(&opts.unix)
            .arg("--control")
            .arg(&opts.control)
            .args(["--listen", "127.0.0.1:0", "--metrics", "127.0.0.1:0"])
            .args(&opts.args)
            .env_remove("RUST_LOG")
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log));
        if let Some(level) = &opts.rust_log {
            cmd.env("RUST_LOG", level);
        }
        let mut child = cmd.spawn().expect("spawn slipway-nbd");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let line = rx
            .recv_timeout(Duration::from_secs(20))
            .expect("server ready line or exit");
        if !line.starts_with("slipway-blockstore ready") {
            // Closed stdout without a ready line: the daemon exited (or is exiting).
            let status = child.wait().expect("reap slipway-nbd");
            let log = std::fs::read_to_string(&opts.log).unwrap_or_default();
            return Err(format!("server not ready ({status}): {line:?}\n{log}"));
        }
        let mut me = Self {
            child: Some(child),
            dir: dir.to_owned(),
            unix: opts.unix,
            control: opts.control,
            tcp: String::new(),
            metrics: String::new(),
            log: opts.log,
        };
        for part in line.split_whitespace() {
            if let Some(v) = part.strip_prefix("tcp=") {
                me.tcp = v.to_owned();
            }
            if let Some(v) = part.strip_prefix("metrics=") {
                me.metrics = v.to_owned();
            }
        }
        Ok(me)
    }

    /// SIGTERM, then waits (with a deadline) for the process to exit; returns its status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("server running");
        run("kill", &["-TERM", &child.id().to_string()]);
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = child.try_wait().expect("wait for slipway-nbd") {
                return status;
            }
            if std::time::Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("server did not exit within 30 s of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, |c| c.id())
    }

    /// SIGKILL and reap.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn uri(&self, export: &str) -> String {
        format!("nbd+unix:///{export}?socket={}", self.unix.display())
    }

    pub fn control(&self, req: ControlRequest) -> Result<ControlResponse, String> {
        control::call_blocking(&self.control, &req).map_err(|e| e.to_string())
    }

    pub fn create(&self, name: &str, size: u64) {
        self.control(ControlRequest::Create {
            name: name.into(),
            size,
        })
        .expect("create volume");
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for ServerProc {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Runs a tool, asserts it succeeded, returns stdout.
pub fn run(tool: &str, args: &[&str]) -> String {
    let out = Command::new(tool)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {tool}: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "{tool} {args:?} failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    stdout
}

/// Runs a tool and returns (success, stdout+stderr).
pub fn run_status(tool: &str, args: &[&str]) -> (bool, String) {
    let out = Command::new(tool)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {tool}: {e}"));
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

/// qemu-io with a list of commands; asserts success and no verification failure.
pub fn qemu_io(uri: &str, cmds: &[&str]) -> String {
    qemu_io_with(&["-f", "raw"], uri, cmds)
}

/// qemu-io opening the export read-only (snapshots).
pub fn qemu_io_ro(uri: &str, cmds: &[&str]) -> String {
    qemu_io_with(&["-r", "-f", "raw"], uri, cmds)
}

fn qemu_io_with(opts: &[&str], uri: &str, cmds: &[&str]) -> String {
    let mut args = opts.to_vec();
    for c in cmds {
        args.push("-c");
        args.push(c);
    }
    args.push(uri);
    let out = run("qemu-io", &args);
    assert!(
        !out.contains("failed") && !out.contains("error"),
        "qemu-io {cmds:?} reported a failure:\n{out}"
    );
    out
}

/// Deterministic xorshift generator.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}

/// One reply from the server.
#[derive(Debug)]
pub struct Reply {
    pub cookie: u64,
    pub error: u32,
    /// Data read (structured: the content chunks put in order, holes as zeroes).
    pub data: Vec<u8>,
    /// Block status descriptors (structured replies only).
    pub extents: Vec<(u32, u32)>,
    /// Structured READ content chunks in arrival order: (offset, length, is a hole).
    pub content: Vec<(u64, u32, bool)>,
}

/// A minimal synchronous NBD client over a Unix socket.
pub struct Client {
    pub s: UnixStream,
    pub structured: bool,
    pub size: u64,
    pub flags: u16,
    next: u64,
}

pub fn put_opt(s: &mut impl Write, option: u32, data: &[u8]) {
    let mut b = proto::IHAVEOPT.to_be_bytes().to_vec();
    b.extend_from_slice(&option.to_be_bytes());
    b.extend_from_slice(&(data.len() as u32).to_be_bytes());
    b.extend_from_slice(data);
    s.write_all(&b).expect("send option");
}

/// Reads one option reply: (option, type, payload).
pub fn get_opt_reply(s: &mut impl Read) -> std::io::Result<(u32, u32, Vec<u8>)> {
    let mut h = [0u8; 20];
    s.read_exact(&mut h)?;
    assert_eq!(&h[..8], &proto::OPT_REPLY_MAGIC.to_be_bytes());
    let opt = u32::from_be_bytes([h[8], h[9], h[10], h[11]]);
    let ty = u32::from_be_bytes([h[12], h[13], h[14], h[15]]);
    let len = u32::from_be_bytes([h[16], h[17], h[18], h[19]]);
    let mut d = vec![0u8; len as usize];
    s.read_exact(&mut d)?;
    Ok((opt, ty, d))
}

/// Reads the greeting and sends client flags.
pub fn greet(s: &mut UnixStream) {
    let mut g = [0u8; 18];
    s.read_exact(&mut g).expect("greeting");
    assert_eq!(g, proto::greeting());
    s.write_all(&3u32.to_be_bytes()).expect("client flags");
}

pub fn go_payload(name: &str) -> Vec<u8> {
    let mut d = (name.len() as u32).to_be_bytes().to_vec();
    d.extend_from_slice(name.as_bytes());
    d.extend_from_slice(&0u16.to_be_bytes());
    d
}

impl Client {
    /// Connects and negotiates `export` with GO (and structured replies + base:allocation).
    pub fn connect(path: &Path, export: &str, structured: bool) -> std::io::Result<Self> {
        let mut s = UnixStream::connect(path)?;
        s.set_read_timeout(Some(Duration::from_secs(30)))?;
        greet(&mut s);
        if structured {
            put_opt(&mut s, proto::opt::STRUCTURED_REPLY, &[]);
            let (_, ty, _) = get_opt_reply(&mut s)?;
            assert_eq!(ty, proto::rep::ACK);
            let mut q = (export.len() as u32).to_be_bytes().to_vec();
            q.extend_from_slice(export.as_bytes());
            q.extend_from_slice(&1u32.to_be_bytes());
            q.extend_from_slice(&15u32.to_be_bytes());
            q.extend_from_slice(b"base:allocation");
            put_opt(&mut s, proto::opt::SET_META_CONTEXT, &q);
            loop {
                let (_, ty, _) = get_opt_reply(&mut s)?;
                if ty == proto::rep::ACK {
                    break;
                }
                assert_eq!(ty, proto::rep::META_CONTEXT);
            }
        }
        put_opt(&mut s, proto::opt::GO, &go_payload(export));
        let (mut size, mut flags) = (0, 0);
        loop {
            let (_, ty, d) = get_opt_reply(&mut s)?;
            if ty == proto::rep::ACK {
                break;
            }
            if ty != proto::rep::INFO {
                return Err(std::io::Error::other(format!("GO refused: {ty:#x}")));
            }
            if d[..2] == proto::info::EXPORT.to_be_bytes() {
                size = u64::from_be_bytes(d[2..10].try_into().expect("8 bytes"));
                flags = u16::from_be_bytes([d[10], d[11]]);
            }
        }
        Ok(Self {
            s,
            structured,
            size,
            flags,
            next: 1,
        })
    }

    pub fn send(&mut self, command: u16, flags: u16, offset: u64, length: u32, data: &[u8]) -> u64 {
        // A send to a killed server fails; the following receive reports it.
        self.try_send(command, flags, offset, length, data)
            .unwrap_or(self.next - 1)
    }

    /// Sends one request; `Err` if the server's end of the socket is already closed.
    pub fn try_send(
        &mut self,
        command: u16,
        flags: u16,
        offset: u64,
        length: u32,
        data: &[u8],
    ) -> std::io::Result<u64> {
        let cookie = self.next;
        self.next += 1;
        let req = Request {
            flags,
            command,
            cookie,
            offset,
            length,
        };
        let mut b = proto::encode_request(&req).to_vec();
        b.extend_from_slice(data);
        self.s.write_all(&b)?;
        Ok(cookie)
    }

    /// Reads one complete reply; `read_len` says how much data a simple READ reply carries
    /// (the caller knows, since simple replies are not self-describing).
    pub fn recv(&mut self, read_len: impl Fn(u64) -> usize) -> std::io::Result<Reply> {
        let mut magic = [0u8; 4];
        self.s.read_exact(&mut magic)?;
        let magic = u32::from_be_bytes(magic);
        if magic == proto::SIMPLE_REPLY_MAGIC {
            let mut h = [0u8; 12];
            self.s.read_exact(&mut h)?;
            let error = u32::from_be_bytes([h[0], h[1], h[2], h[3]]);
            let cookie = u64::from_be_bytes(h[4..12].try_into().expect("8 bytes"));
            let mut data = Vec::new();
            if error == 0 {
                data = vec![0u8; read_len(cookie)];
                self.s.read_exact(&mut data)?;
            }
            return Ok(Reply {
                cookie,
                error,
                data,
                extents: Vec::new(),
                content: Vec::new(),
            });
        }
        assert_eq!(magic, proto::STRUCTURED_REPLY_MAGIC, "bad reply magic");
        let mut reply = Reply {
            cookie: 0,
            error: 0,
            data: Vec::new(),
            extents: Vec::new(),
            content: Vec::new(),
        };
        let mut pieces: Vec<(u64, Vec<u8>)> = Vec::new();
        let mut first = true;
        loop {
            if !first {
                let mut m = [0u8; 4];
                self.s.read_exact(&mut m)?;
                assert_eq!(u32::from_be_bytes(m), proto::STRUCTURED_REPLY_MAGIC);
            }
            first = false;
            let mut h = [0u8; 16];
            self.s.read_exact(&mut h)?;
            let flags = u16::from_be_bytes([h[0], h[1]]);
            let ty = u16::from_be_bytes([h[2], h[3]]);
            reply.cookie = u64::from_be_bytes(h[4..12].try_into().expect("8 bytes"));
            let len = u32::from_be_bytes([h[12], h[13], h[14], h[15]]) as usize;
            let mut p = vec![0u8; len];
            self.s.read_exact(&mut p)?;
            match ty {
                proto::reply::TYPE_OFFSET_DATA => {
                    let offset = u64::from_be_bytes(p[..8].try_into().expect("8 bytes"));
                    reply.content.push((offset, (p.len() - 8) as u32, false));
                    pieces.push((offset, p[8..].to_vec()));
                }
                proto::reply::TYPE_OFFSET_HOLE => {
                    assert_eq!(p.len(), 12, "OFFSET_HOLE payload must be 12 bytes");
                    let offset = u64::from_be_bytes(p[..8].try_into().expect("8 bytes"));
                    let len = u32::from_be_bytes(p[8..12].try_into().expect("4 bytes"));
                    assert!(len > 0, "empty hole chunk");
                    reply.content.push((offset, len, true));
                    pieces.push((offset, vec![0u8; len as usize]));
                }
                proto::reply::TYPE_BLOCK_STATUS => {
                    for d in p[4..].chunks(8) {
                        reply.extents.push((
                            u32::from_be_bytes([d[0], d[1], d[2], d[3]]),
                            u32::from_be_bytes([d[4], d[5], d[6], d[7]]),
                        ));
                    }
                }
                t if t & 0x8000 != 0 => {
                    reply.error = u32::from_be_bytes([p[0], p[1], p[2], p[3]]);
                }
                _ => {}
            }
            if flags & proto::reply::FLAG_DONE != 0 {
                // Content chunks may come in any order; they must tile one range.
                pieces.sort_by_key(|p| p.0);
                if let Some(&(mut next, _)) = pieces.first() {
                    for (offset, bytes) in pieces {
                        assert_eq!(offset, next, "content chunks overlap or leave a gap");
                        next += bytes.len() as u64;
                        reply.data.extend_from_slice(&bytes);
                    }
                }
                return Ok(reply);
            }
        }
    }

    pub fn read(&mut self, offset: u64, len: u32) -> Result<Vec<u8>, u32> {
        self.send(cmd::READ, 0, offset, len, &[]);
        let r = self.recv(|_| len as usize).map_err(|_| u32::MAX)?;
        if r.error != 0 {
            Err(r.error)
        } else {
            Ok(r.data)
        }
    }

    pub fn write(&mut self, offset: u64, data: &[u8], flags: u16) -> Result<(), u32> {
        self.send(cmd::WRITE, flags, offset, data.len() as u32, data);
        let r = self.recv(|_| 0).map_err(|_| u32::MAX)?;
        if r.error != 0 { Err(r.error) } else { Ok(()) }
    }

    pub fn simple(
        &mut self,
        command: u16,
        flags: u16,
        offset: u64,
        len: u32,
    ) -> Result<Reply, u32> {
        self.send(command, flags, offset, len, &[]);
        self.recv(|_| 0).map_err(|_| u32::MAX)
    }

    pub fn flush(&mut self) -> Result<(), u32> {
        let r = self.simple(cmd::FLUSH, 0, 0, 0)?;
        if r.error != 0 { Err(r.error) } else { Ok(()) }
    }

    pub fn disconnect(mut self) {
        self.send(cmd::DISC, 0, 0, 0, &[]);
    }
}
