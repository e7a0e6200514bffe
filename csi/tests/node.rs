//! The Node service end to end (root: FUSE, loop devices, mounts): a real block store, the node
//! plugin as a process, attach processes, ext4, and a tonic client through the plugin's socket.
//! The plugin is killed with SIGKILL and restarted while the volume is mounted: I/O goes on, and
//! unpublish + unstage leave no mount, loop device, FUSE mount or process behind.

mod common;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::TempDir;
use slipway_blockstore::config::{ServeConfig, TlsConfig};
use slipway_blockstore::control::{self, ControlRequest};
use slipway_blockstore::daemon::Daemon;
use slipway_csi::attach::AttachState;
use slipway_csi::proto::node_client::NodeClient;
use slipway_csi::proto::node_service_capability::{self, rpc};
use slipway_csi::proto::volume_capability::{
    AccessMode, AccessType, BlockVolume, MountVolume, access_mode,
};
use slipway_csi::proto::*;
use slipway_csi::{server, sys};
use tonic::Code;
use tonic::transport::Channel;

const MIB: u64 = 1 << 20;

/// The block store on its own thread and runtime, as a separate daemon would be.
struct Blockstore {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Blockstore {
    /// Starts it; returns it and its TCP address, if it listens on TCP.
    fn start(cfg: ServeConfig) -> (Self, Option<std::net::SocketAddr>) {
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                let d = Daemon::start(&cfg).await.expect("block store daemon");
                let _ = ready_tx.send(d.tcp);
                let _ = stopped.await;
                drop(d);
            });
        });
        let tcp = ready_rx
            .recv_timeout(Duration::from_secs(30))
            .expect("block store ready");
        (
            Self {
                stop: Some(stop),
                thread: Some(thread),
            },
            tcp,
        )
    }
}

impl Drop for Blockstore {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The world of one test: plugin process, and on drop (also on panic) every mount, loop device
/// and attach process under the test directory removed.
struct World {
    dir: PathBuf,
    plugin: Option<Child>,
    /// Extra flags of the node plugin.
    flags: Vec<String>,
}

impl World {
    fn state(&self) -> PathBuf {
        self.dir.join("state")
    }

    fn socket(&self) -> PathBuf {
        self.dir.join("node.sock")
    }

    fn start_plugin(&mut self) {
        let mut child = Command::new(env!("CARGO_BIN_EXE_slipway-csi"))
            .arg("node")
            .arg("--endpoint")
            .arg(format!("unix://{}", self.socket().display()))
            .args(["--node-id", "node-1", "--zone", "zone-a"])
            .arg("--state-dir")
            .arg(self.state())
            .args(&self.flags)
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(Stdio::from(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(self.dir.join("plugin.log"))
                    .expect("log"),
            ))
            .spawn()
            .expect("spawn slipway-csi node");
        let stdout = child.stdout.take().expect("stdout");
        let mut line = String::new();
        BufReader::new(stdout)
            .read_line(&mut line)
            .expect("ready line");
        assert!(line.starts_with("slipway-csi node ready"), "{line:?}");
        self.plugin = Some(child);
    }

    fn kill9_plugin(&mut self) {
        if let Some(mut c) = self.plugin.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Mounts under the test directory.
    fn mounts(&self) -> Vec<PathBuf> {
        sys::mounts()
            .expect("mountinfo")
            .into_iter()
            .map(|m| m.target)
            .filter(|t| t.starts_with(&self.dir))
            .collect()
    }

    /// Loop devices backed by a file under the test directory.
    fn loops(&self) -> Vec<String> {
        let mut out = Vec::new();
        for e in std::fs::read_dir("/sys/block")
            .expect("/sys/block")
            .flatten()
        {
            if let Ok(b) = std::fs::read_to_string(e.path().join("loop/backing_file"))
                && Path::new(b.trim()).starts_with(&self.dir)
            {
                out.push(format!("/dev/{}", e.file_name().to_string_lossy()));
            }
        }
        out
    }

    fn attach_pids(&self) -> Vec<u32> {
        std::fs::read_dir(self.state())
            .map(|d| {
                d.flatten()
                    .filter_map(|e| AttachState::read(&e.path()))
                    .map(|s| s.pid)
                    .filter(|p| sys::alive(*p))
                    .collect()
            })
            .unwrap_or_default()
    }
}

impl Drop for World {
    fn drop(&mut self) {
        self.kill9_plugin();
        // Loop devices first: once their FUSE file is unmounted the kernel no longer shows
        // its path under the test directory.
        let loops = self.loops();
        for pid in self.attach_pids() {
            let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
        }
        for m in self.mounts().into_iter().rev() {
            let _ = Command::new("umount").arg("-l").arg(&m).status();
        }
        for l in loops {
            let _ = Command::new("losetup").args(["-d", &l]).status();
        }
    }
}

fn mount_cap(fs: &str) -> VolumeCapability {
    VolumeCapability {
        access_mode: Some(AccessMode {
            mode: access_mode::Mode::SingleNodeWriter as i32,
        }),
        access_type: Some(AccessType::Mount(MountVolume {
            fs_type: fs.into(),
            mount_flags: vec![],
        })),
    }
}

fn block_cap() -> VolumeCapability {
    VolumeCapability {
        access_mode: Some(AccessMode {
            mode: access_mode::Mode::SingleNodeWriter as i32,
        }),
        access_type: Some(AccessType::Block(BlockVolume {})),
    }
}

fn wait_for<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

async fn client(w: &World) -> NodeClient<Channel> {
    NodeClient::new(server::connect(&w.socket()).await.expect("connect"))
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

fn write_synced(path: &Path, data: &[u8]) {
    let mut f = std::fs::File::create(path).expect("create file");
    f.write_all(data).expect("write");
    f.sync_all().expect("fsync");
}

/// A block store, a node plugin process and the test directory; dropped in that order.
struct Fixture {
    w: World,
    /// The NBD address stage requests carry.
    nbd: String,
    _bs: Blockstore,
    _tmp: TempDir,
}

impl Fixture {
    async fn start(tag: &str, volumes: &[(&str, u64)]) -> Self {
        Self::start_with(tag, volumes, |_| (None, Vec::new())).await
    }

    /// `setup` gets the test directory and returns the block store's TLS settings and the
    /// plugin's extra flags.
    async fn start_with(
        tag: &str,
        volumes: &[(&str, u64)],
        setup: impl FnOnce(&Path) -> (Option<TlsConfig>, Vec<String>),
    ) -> Self {
        let tmp = TempDir::new(tag);
        let dir = tmp.path().to_owned();
        let (tls, flags) = setup(&dir);
        let (bs, tcp) = Blockstore::start(ServeConfig {
            data_dir: dir.join("data"),
            listen: tls.is_some().then(|| "127.0.0.1:0".to_owned()),
            unix: Some(dir.join("nbd.sock")),
            control: dir.join("ctl.sock"),
            metrics: None,
            extent_size: slipway_blockstore::format::DEFAULT_EXTENT_SIZE,
            tls,
        });
        for (name, size) in volumes {
            control::call(
                &dir.join("ctl.sock"),
                &ControlRequest::Create {
                    name: (*name).into(),
                    size: *size,
                },
            )
            .await
            .expect("create volume");
        }
        let mut w = World {
            dir,
            plugin: None,
            flags,
        };
        w.start_plugin();
        let nbd = match tcp {
            Some(a) => format!("tcp:localhost:{}", a.port()),
            None => format!("unix:{}", w.dir.join("nbd.sock").display()),
        };
        Self {
            w,
            nbd,
            _bs: bs,
            _tmp: tmp,
        }
    }

    async fn control(&self, req: ControlRequest) {
        control::call(&self.w.dir.join("ctl.sock"), &req)
            .await
            .expect("block store control");
    }

    async fn resize(&self, name: &str, size: u64) {
        control::call(
            &self.w.dir.join("ctl.sock"),
            &ControlRequest::Resize {
                name: name.into(),
                size,
            },
        )
        .await
        .expect("resize volume");
    }

    fn stage_req(&self, vol: &str, cap: VolumeCapability) -> NodeStageVolumeRequest {
        NodeStageVolumeRequest {
            volume_id: vol.into(),
            staging_target_path: self.w.dir.join("staging").join(vol).display().to_string(),
            volume_capability: Some(cap),
            volume_context: HashMap::from([("nbdAddress".into(), self.nbd.clone())]),
            ..Default::default()
        }
    }

    fn publish_req(&self, vol: &str, cap: VolumeCapability) -> NodePublishVolumeRequest {
        NodePublishVolumeRequest {
            volume_id: vol.into(),
            staging_target_path: self.w.dir.join("staging").join(vol).display().to_string(),
            target_path: self
                .w
                .dir
                .join("pods/p1/volumes")
                .join(vol)
                .display()
                .to_string(),
            volume_capability: Some(cap),
            ..Default::default()
        }
    }

    fn unpublish_req(&self, vol: &str) -> NodeUnpublishVolumeRequest {
        NodeUnpublishVolumeRequest {
            volume_id: vol.into(),
            target_path: self
                .w
                .dir
                .join("pods/p1/volumes")
                .join(vol)
                .display()
                .to_string(),
        }
    }

    fn unstage_req(&self, vol: &str) -> NodeUnstageVolumeRequest {
        NodeUnstageVolumeRequest {
            volume_id: vol.into(),
            staging_target_path: self.w.dir.join("staging").join(vol).display().to_string(),
        }
    }

    /// Attach processes of this test (their command line names its state directory).
    fn processes(&self) -> Vec<u32> {
        let me = std::process::id();
        let needle = self.w.state().display().to_string();
        std::fs::read_dir("/proc")
            .expect("/proc")
            .flatten()
            .filter_map(|e| e.file_name().to_string_lossy().parse::<u32>().ok())
            .filter(|pid| *pid != me && sys::alive(*pid))
            .filter(|pid| {
                std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| {
                    let args: Vec<_> = c.split(|b| *b == 0).map(String::from_utf8_lossy).collect();
                    args.iter().any(|a| a == "attach") && args.iter().any(|a| a.contains(&needle))
                })
            })
            .collect()
    }

    /// No mount, loop device, attach process or attachment state of this test is left.
    fn assert_nothing_left(&self, when: &str) {
        assert_eq!(self.w.mounts(), Vec::<PathBuf>::new(), "mounts left {when}");
        assert_eq!(
            self.w.loops(),
            Vec::<String>::new(),
            "loop devices left {when}"
        );
        wait_for("attach processes to exit", || {
            self.processes().is_empty().then_some(())
        });
        let states: Vec<_> = std::fs::read_dir(self.w.state())
            .map(|d| d.flatten().map(|e| e.path()).collect())
            .unwrap_or_default();
        assert_eq!(
            states,
            Vec::<PathBuf>::new(),
            "attachment state left {when}"
        );
    }
}

/// Spoils one field of a good request.
type Spoil = Box<dyn Fn(&mut NodeStageVolumeRequest)>;

fn usage(stats: &NodeGetVolumeStatsResponse, unit: volume_usage::Unit) -> VolumeUsage {
    stats
        .usage
        .iter()
        .find(|u| u.unit == unit as i32)
        .cloned()
        .unwrap_or_else(|| panic!("no {unit:?} usage in {stats:?}"))
}

fn fs_bytes(path: &Path) -> u64 {
    let st = nix::sys::statvfs::statvfs(path).expect("statvfs");
    st.blocks() * st.fragment_size()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(feature = "privileged"),
    ignore = "privileged: root, FUSE, loop devices, mounts; run scripts/test.sh"
)]
async fn bad_requests_get_their_codes_and_leave_nothing() {
    let f = Fixture::start("node-err", &[("vol-e", 64 * MIB)]).await;
    let mut c = client(&f.w).await;
    let good = f.stage_req("vol-e", mount_cap("ext4"));
    let cases: [(&str, Spoil); 5] = [
        ("volume_id:", Box::new(|r| r.volume_id.clear())),
        (
            "staging_target_path:",
            Box::new(|r| r.staging_target_path.clear()),
        ),
        (
            "staging_target_path:",
            Box::new(|r| r.staging_target_path = "rel/path".into()),
        ),
        (
            "volume_capability:",
            Box::new(|r| r.volume_capability = None),
        ),
        ("volume_context:", Box::new(|r| r.volume_context.clear())),
    ];
    for (field, spoil) in cases {
        let mut r = good.clone();
        spoil(&mut r);
        let e = c.node_stage_volume(r).await.expect_err(field);
        assert_eq!(e.code(), Code::InvalidArgument, "{field}: {}", e.message());
        assert!(e.message().starts_with(field), "{}", e.message());
    }
    let mut r = f.publish_req("vol-e", mount_cap("ext4"));
    r.target_path.clear();
    let e = c.node_publish_volume(r).await.expect_err("no target");
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().starts_with("target_path:"), "{}", e.message());
    let e = c
        .node_unstage_volume(NodeUnstageVolumeRequest::default())
        .await
        .expect_err("empty unstage");
    assert_eq!(e.code(), Code::InvalidArgument);
    f.assert_nothing_left("after invalid requests");

    // A volume the block store does not have: NOT_FOUND, and the attach process it needed is
    // gone with everything it made.
    let e = c
        .node_stage_volume(f.stage_req("no-such-volume", mount_cap("ext4")))
        .await
        .expect_err("unknown volume");
    assert_eq!(e.code(), Code::NotFound, "{}", e.message());
    assert!(e.message().contains("no-such-volume"), "{}", e.message());
    f.assert_nothing_left("after staging an unknown volume");

    // Publishing what is not staged is refused.
    let e = c
        .node_publish_volume(f.publish_req("vol-e", mount_cap("ext4")))
        .await
        .expect_err("publish unstaged");
    assert_eq!(e.code(), Code::FailedPrecondition, "{}", e.message());
    // A failure after the attach (mount options the kernel refuses) undoes the attach.
    let mut r = f.stage_req("vol-e", mount_cap("ext4"));
    if let Some(AccessType::Mount(m)) = r
        .volume_capability
        .as_mut()
        .and_then(|c| c.access_type.as_mut())
    {
        m.mount_flags = vec!["no-such-option".into()];
    }
    let e = c.node_stage_volume(r).await.expect_err("bad mount option");
    assert_eq!(e.code(), Code::Internal, "{}", e.message());
    assert!(e.message().contains("mount"), "{}", e.message());
    f.assert_nothing_left("after a failed mount");
    // Two stages of one volume at once: one works, the other is ABORTED or finds it done.
    let (mut c1, mut c2) = (client(&f.w).await, client(&f.w).await);
    let (a, b) = tokio::join!(
        c1.node_stage_volume(f.stage_req("vol-e", mount_cap("ext4"))),
        c2.node_stage_volume(f.stage_req("vol-e", mount_cap("ext4"))),
    );
    let codes: Vec<Code> = [&a, &b]
        .iter()
        .map(|r| r.as_ref().map_or_else(|e| e.code(), |_| Code::Ok))
        .collect();
    assert!(codes.contains(&Code::Ok), "{a:?} {b:?}");
    assert!(
        codes.iter().all(|c| matches!(c, Code::Ok | Code::Aborted)),
        "{a:?} {b:?}"
    );
    c.node_unstage_volume(f.unstage_req("vol-e"))
        .await
        .expect("unstage");
    f.assert_nothing_left("after concurrent stages");

    // Stats and expansion of a volume not staged here: NOT_FOUND.
    let e = c
        .node_get_volume_stats(NodeGetVolumeStatsRequest {
            volume_id: "vol-e".into(),
            volume_path: f.w.dir.join("nowhere").display().to_string(),
            ..Default::default()
        })
        .await
        .expect_err("stats");
    assert_eq!(e.code(), Code::NotFound, "{}", e.message());
    let e = c
        .node_expand_volume(NodeExpandVolumeRequest {
            volume_id: "vol-e".into(),
            volume_path: f.w.dir.join("nowhere").display().to_string(),
            ..Default::default()
        })
        .await
        .expect_err("expand");
    assert_eq!(e.code(), Code::NotFound, "{}", e.message());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(feature = "privileged"),
    ignore = "privileged: root, FUSE, loop devices, mounts, fio; run scripts/test.sh"
)]
async fn ext4_lifecycle_and_plugin_kill9_under_fio_verify() {
    let mut f = Fixture::start("node-ext4", &[("vol-1", 256 * MIB)]).await;
    let mut c = client(&f.w).await;

    let info = c
        .node_get_info(NodeGetInfoRequest {})
        .await
        .expect("info")
        .into_inner();
    assert_eq!(info.node_id, "node-1");
    assert_eq!(
        info.accessible_topology.map(|t| t.segments),
        Some(HashMap::from([(
            "topology.slipway.dev/zone".to_owned(),
            "zone-a".to_owned()
        )]))
    );
    let mut caps: Vec<i32> = c
        .node_get_capabilities(NodeGetCapabilitiesRequest {})
        .await
        .expect("caps")
        .into_inner()
        .capabilities
        .into_iter()
        .filter_map(|c| {
            c.r#type
                .map(|node_service_capability::Type::Rpc(r)| r.r#type)
        })
        .collect();
    caps.sort_unstable();
    let mut want = [
        rpc::Type::StageUnstageVolume as i32,
        rpc::Type::GetVolumeStats as i32,
        rpc::Type::ExpandVolume as i32,
        rpc::Type::VolumeCondition as i32,
    ];
    want.sort_unstable();
    assert_eq!(caps, want);

    let stage = f.stage_req("vol-1", mount_cap("ext4"));
    let publish = f.publish_req("vol-1", mount_cap("ext4"));
    let staging = PathBuf::from(&stage.staging_target_path);
    let target = PathBuf::from(&publish.target_path);
    for _ in 0..2 {
        c.node_stage_volume(stage.clone()).await.expect("stage");
    }
    let att = AttachState::read(&f.w.state().join("vol-1")).expect("attach state");
    assert!(sys::alive(att.pid));
    assert_eq!(
        sys::mounted_at(&staging)
            .expect("mountinfo")
            .map(|m| (m.source, m.fstype)),
        Some((att.device.clone(), "ext4".to_owned()))
    );
    // The same staging path with another filesystem: ALREADY_EXISTS.
    let e = c
        .node_stage_volume(f.stage_req("vol-1", mount_cap("xfs")))
        .await
        .expect_err("xfs over ext4");
    assert_eq!(e.code(), Code::AlreadyExists, "{}", e.message());
    for _ in 0..2 {
        c.node_publish_volume(publish.clone())
            .await
            .expect("publish");
    }
    let mut ro = publish.clone();
    ro.readonly = true;
    let e = c
        .node_publish_volume(ro)
        .await
        .expect_err("read-only over read-write");
    assert_eq!(e.code(), Code::AlreadyExists, "{}", e.message());

    let data = pattern(7, 3 * MIB as usize);
    write_synced(&target.join("a.bin"), &data);
    assert_eq!(std::fs::read(target.join("a.bin")).expect("read"), data);
    let stats = c
        .node_get_volume_stats(NodeGetVolumeStatsRequest {
            volume_id: "vol-1".into(),
            volume_path: target.display().to_string(),
            ..Default::default()
        })
        .await
        .expect("stats")
        .into_inner();
    let bytes = usage(&stats, volume_usage::Unit::Bytes);
    let inodes = usage(&stats, volume_usage::Unit::Inodes);
    assert!(
        bytes.total > 200 * MIB as i64
            && bytes.used >= data.len() as i64
            && bytes.available < bytes.total,
        "{bytes:?}"
    );
    assert!(
        inodes.total > 0 && inodes.used > 0 && inodes.available < inodes.total,
        "{inodes:?}"
    );
    assert_eq!(stats.volume_condition.map(|c| c.abnormal), Some(false));

    // fio writes and verifies on the volume while the plugin is killed with SIGKILL and
    // restarted.
    let fio_out = f.w.dir.join("fio.out");
    let mut fio = Command::new("fio")
        .args([
            "--name=kill9",
            "--rw=randwrite",
            "--bs=4k",
            "--size=48M",
            "--ioengine=psync",
            "--direct=1",
            "--verify=crc32c",
            "--do_verify=1",
            "--verify_fatal=1",
            "--verify_backlog=1024",
            "--filename",
        ])
        .arg(target.join("fio.dat"))
        .arg("--output")
        .arg(&fio_out)
        .stdout(Stdio::null())
        .spawn()
        .expect("fio (scripts/bootstrap.sh installs it)");
    wait_for("fio to start writing", || {
        std::fs::metadata(target.join("fio.dat"))
            .ok()
            .filter(|m| m.len() > 0)
            .map(drop)
    });
    f.w.kill9_plugin();
    assert!(
        fio.try_wait().expect("fio").is_none(),
        "fio ended before the plugin was killed"
    );
    assert!(sys::alive(att.pid), "attach process died with the plugin");
    f.w.start_plugin();
    let mut c = client(&f.w).await;
    // Restarted, the plugin finds its attachment (and says so at start): stage and publish
    // again are no-ops.
    let log = std::fs::read_to_string(f.w.dir.join("plugin.log")).expect("plugin log");
    assert!(
        log.lines().any(|l| l.contains("found attachment")
            && l.contains("vol-1")
            && l.contains("alive=true")),
        "{log}"
    );
    c.node_stage_volume(stage.clone())
        .await
        .expect("stage after restart");
    c.node_publish_volume(publish.clone())
        .await
        .expect("publish after restart");
    assert_eq!(
        AttachState::read(&f.w.state().join("vol-1")).map(|s| s.pid),
        Some(att.pid)
    );
    let fio_running_at_restart = fio.try_wait().expect("fio").is_none();
    let status = fio.wait().expect("fio");
    let out = std::fs::read_to_string(&fio_out).unwrap_or_default();
    assert!(status.success(), "fio failed ({status}):\n{out}");
    assert!(out.contains("err= 0"), "fio reported errors:\n{out}");
    assert!(
        !out.contains("verify failed") && !out.contains("bad magic"),
        "{out}"
    );
    eprintln!(
        "fio across plugin kill -9 (running at restart: {fio_running_at_restart}): {}",
        out.lines()
            .find(|l| l.contains("WRITE:"))
            .unwrap_or("")
            .trim()
    );
    assert_eq!(std::fs::read(target.join("a.bin")).expect("read a"), data);

    // Online expansion of ext4: the kernel's resize ioctl needs CAP_SYS_RESOURCE.
    f.resize("vol-1", 384 * MIB).await;
    let expand = NodeExpandVolumeRequest {
        volume_id: "vol-1".into(),
        volume_path: target.display().to_string(),
        capacity_range: Some(CapacityRange {
            required_bytes: (384 * MIB) as i64,
            limit_bytes: 0,
        }),
        ..Default::default()
    };
    let before = fs_bytes(&target);
    match c.node_expand_volume(expand).await {
        Ok(r) => {
            assert!(sys::has_capability(sys::CAP_SYS_RESOURCE));
            assert_eq!(r.into_inner().capacity_bytes, (384 * MIB) as i64);
            assert!(fs_bytes(&target) > before + 100 * MIB, "ext4 did not grow");
        }
        Err(e) => {
            assert!(!sys::has_capability(sys::CAP_SYS_RESOURCE), "{e:?}");
            assert_eq!(e.code(), Code::FailedPrecondition, "{}", e.message());
            assert!(e.message().contains("CAP_SYS_RESOURCE"), "{}", e.message());
        }
    }

    // Unpublish and unstage, twice each: nothing left.
    for _ in 0..2 {
        c.node_unpublish_volume(f.unpublish_req("vol-1"))
            .await
            .expect("unpublish");
    }
    assert!(!target.exists());
    for _ in 0..2 {
        c.node_unstage_volume(f.unstage_req("vol-1"))
            .await
            .expect("unstage");
    }
    f.assert_nothing_left("after unstage");

    // The data is in the block store: a fresh attachment reads it back.
    c.node_stage_volume(stage.clone())
        .await
        .expect("stage again");
    c.node_publish_volume(publish.clone())
        .await
        .expect("publish again");
    assert_eq!(std::fs::read(target.join("a.bin")).expect("read a"), data);

    // The attach process gone: the volume condition says so, unstage still cleans up.
    let att = AttachState::read(&f.w.state().join("vol-1")).expect("attach state");
    let _ = Command::new("kill")
        .args(["-9", &att.pid.to_string()])
        .status();
    wait_for("the attach process to die", || {
        (!sys::alive(att.pid)).then_some(())
    });
    let stats = c
        .node_get_volume_stats(NodeGetVolumeStatsRequest {
            volume_id: "vol-1".into(),
            volume_path: staging.display().to_string(),
            ..Default::default()
        })
        .await
        .expect("stats of a broken volume")
        .into_inner();
    let cond = stats.volume_condition.expect("condition");
    assert!(cond.abnormal && cond.message.contains("gone"), "{cond:?}");
    c.node_unpublish_volume(f.unpublish_req("vol-1"))
        .await
        .expect("unpublish broken");
    c.node_unstage_volume(f.unstage_req("vol-1"))
        .await
        .expect("unstage broken");
    f.assert_nothing_left("after unstaging a broken attachment");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(feature = "privileged"),
    ignore = "privileged: root, FUSE, loop devices, mounts, xfsprogs; run scripts/test.sh"
)]
async fn xfs_grows_online_and_raw_block_publishes() {
    let f = Fixture::start("node-xfs", &[("vol-x", 320 * MIB), ("vol-b", 32 * MIB)]).await;
    let mut c = client(&f.w).await;
    let stage = f.stage_req("vol-x", mount_cap("xfs"));
    let publish = f.publish_req("vol-x", mount_cap("xfs"));
    let target = PathBuf::from(&publish.target_path);
    c.node_stage_volume(stage.clone()).await.expect("stage xfs");
    c.node_publish_volume(publish.clone())
        .await
        .expect("publish xfs");
    assert_eq!(
        sys::mounted_at(&target)
            .expect("mountinfo")
            .map(|m| m.fstype),
        Some("xfs".to_owned())
    );
    let data = pattern(3, 2 * MIB as usize);
    write_synced(&target.join("x.bin"), &data);

    // Grown in the block store, then online on the node while a writer keeps writing.
    f.resize("vol-x", 640 * MIB).await;
    let before = fs_bytes(&target);
    let writer_path = target.join("during.bin");
    let writer = std::thread::spawn(move || {
        let mut file = std::fs::File::create(&writer_path).expect("create");
        for i in 0..64u8 {
            file.write_all(&pattern(i, 64 * 1024))
                .expect("write during expansion");
        }
        file.sync_all().expect("fsync");
    });
    let grown = c
        .node_expand_volume(NodeExpandVolumeRequest {
            volume_id: "vol-x".into(),
            volume_path: target.display().to_string(),
            capacity_range: Some(CapacityRange {
                required_bytes: (640 * MIB) as i64,
                limit_bytes: 0,
            }),
            ..Default::default()
        })
        .await
        .expect("expand xfs")
        .into_inner();
    writer.join().expect("writer");
    assert_eq!(grown.capacity_bytes, (640 * MIB) as i64);
    let after = fs_bytes(&target);
    eprintln!(
        "xfs online growth: {} MiB -> {} MiB",
        before / MIB,
        after / MIB
    );
    assert!(
        after > before + 250 * MIB,
        "xfs did not grow: {before} -> {after}"
    );
    assert_eq!(std::fs::read(target.join("x.bin")).expect("read x"), data);
    // Asking for more than the export has: OUT_OF_RANGE.
    let e = c
        .node_expand_volume(NodeExpandVolumeRequest {
            volume_id: "vol-x".into(),
            volume_path: target.display().to_string(),
            capacity_range: Some(CapacityRange {
                required_bytes: (2048 * MIB) as i64,
                limit_bytes: 0,
            }),
            ..Default::default()
        })
        .await
        .expect_err("beyond the export");
    assert_eq!(e.code(), Code::OutOfRange, "{}", e.message());

    // A raw block volume: staged without a filesystem, published as a device file.
    let bstage = f.stage_req("vol-b", block_cap());
    let bpublish = f.publish_req("vol-b", block_cap());
    let dev = PathBuf::from(&bpublish.target_path);
    for _ in 0..2 {
        c.node_stage_volume(bstage.clone())
            .await
            .expect("stage block");
        c.node_publish_volume(bpublish.clone())
            .await
            .expect("publish block");
    }
    let block = pattern(5, 1 << 16);
    {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&dev)
            .expect("open device");
        file.write_all_at(&block, 5 * MIB).expect("write device");
        file.sync_all().expect("fsync device");
        let mut back = vec![0u8; block.len()];
        file.read_exact_at(&mut back, 5 * MIB).expect("read device");
        assert_eq!(back, block);
    }
    let stats = c
        .node_get_volume_stats(NodeGetVolumeStatsRequest {
            volume_id: "vol-b".into(),
            volume_path: dev.display().to_string(),
            ..Default::default()
        })
        .await
        .expect("block stats")
        .into_inner();
    assert_eq!(
        usage(&stats, volume_usage::Unit::Bytes).total,
        (32 * MIB) as i64
    );

    for vol in ["vol-b", "vol-x"] {
        for _ in 0..2 {
            c.node_unpublish_volume(f.unpublish_req(vol))
                .await
                .expect("unpublish");
            c.node_unstage_volume(f.unstage_req(vol))
                .await
                .expect("unstage");
        }
    }
    f.assert_nothing_left("after unstaging xfs and block volumes");
    // The block volume's bytes reached the block store.
    let out = common::qemu_io(&f.w.dir, "vol-b", &[&format!("read -P 5 {} 1", 5 * MIB)]);
    assert!(out.contains("read 1/1 bytes"), "{out}");
}

/// A test CA and the PEM files it issues.
struct Ca {
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
    pem: String,
}

impl Ca {
    fn new() -> Self {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "slipway test CA");
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::DigitalSignature,
        ];
        let key = rcgen::KeyPair::generate().expect("CA key");
        let pem = params.self_signed(&key).expect("CA cert").pem();
        Self {
            issuer: rcgen::Issuer::new(params, key),
            pem,
        }
    }

    /// Writes `<dir>/<stem>.crt` and `<dir>/<stem>.key` for `name`; returns their paths.
    fn issue(
        &self,
        dir: &Path,
        stem: &str,
        name: &str,
        usage: rcgen::ExtendedKeyUsagePurpose,
    ) -> (PathBuf, PathBuf) {
        let mut params = rcgen::CertificateParams::new(vec![name.to_owned()]).expect("params");
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        params.extended_key_usages = vec![usage];
        let key = rcgen::KeyPair::generate().expect("key");
        let cert = params.signed_by(&key, &self.issuer).expect("sign");
        let (c, k) = (
            dir.join(format!("{stem}.crt")),
            dir.join(format!("{stem}.key")),
        );
        std::fs::write(&c, cert.pem()).expect("write cert");
        std::fs::write(&k, key.serialize_pem()).expect("write key");
        (c, k)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(feature = "privileged"),
    ignore = "privileged: root, FUSE, loop devices, mounts; run scripts/test.sh"
)]
async fn over_tcp_the_node_uses_starttls_and_opens_only_what_it_is_authorised_for() {
    let f = Fixture::start_with(
        "node-tls",
        &[("mine", 64 * MIB), ("theirs", 64 * MIB)],
        |dir| {
            let ca = Ca::new();
            let ca_file = dir.join("ca.pem");
            std::fs::write(&ca_file, &ca.pem).expect("write CA");
            let (cert, key) = ca.issue(
                dir,
                "server",
                "localhost",
                rcgen::ExtendedKeyUsagePurpose::ServerAuth,
            );
            let (ncert, nkey) = ca.issue(
                dir,
                "node-1",
                "node-1.zone-a",
                rcgen::ExtendedKeyUsagePurpose::ClientAuth,
            );
            let tls = TlsConfig {
                cert,
                key,
                client_ca: ca_file.clone(),
            };
            let flags = [
                ("--nbd-tls-ca", ca_file),
                ("--nbd-tls-cert", ncert),
                ("--nbd-tls-key", nkey),
            ]
            .into_iter()
            .flat_map(|(k, v)| [k.to_owned(), v.display().to_string()])
            .collect();
            (Some(tls), flags)
        },
    )
    .await;
    assert!(f.nbd.starts_with("tcp:"), "{}", f.nbd);
    for (name, client) in [("mine", "node-1.zone-a"), ("theirs", "node-2.zone-a")] {
        f.control(ControlRequest::Authorize {
            name: name.into(),
            clients: vec![client.into()],
        })
        .await;
    }
    let mut c = client(&f.w).await;
    // Another node's volume: refused at the export, nothing left here.
    let e = c
        .node_stage_volume(f.stage_req("theirs", mount_cap("ext4")))
        .await
        .expect_err("another node's volume");
    assert_eq!(e.code(), Code::FailedPrecondition, "{}", e.message());
    assert!(e.message().contains("theirs"), "{}", e.message());
    f.assert_nothing_left("after a refused export");
    // Its own volume: over TLS, written and read through the mount.
    let publish = f.publish_req("mine", mount_cap("ext4"));
    let target = PathBuf::from(&publish.target_path);
    c.node_stage_volume(f.stage_req("mine", mount_cap("ext4")))
        .await
        .expect("stage over TLS");
    c.node_publish_volume(publish).await.expect("publish");
    let data = pattern(11, MIB as usize);
    write_synced(&target.join("t.bin"), &data);
    assert_eq!(std::fs::read(target.join("t.bin")).expect("read"), data);
    c.node_unpublish_volume(f.unpublish_req("mine"))
        .await
        .expect("unpublish");
    c.node_unstage_volume(f.unstage_req("mine"))
        .await
        .expect("unstage");
    f.assert_nothing_left("after unstaging over TLS");
}
