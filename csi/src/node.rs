//! The CSI Node service: stage (attach the NBD export, make the filesystem if blank, mount at
//! the staging path), publish (bind mount), the reverse of both, volume stats and online
//! filesystem growth (CSI spec, "Node Service RPC").
//!
//! Attach path: kernel NBD where the node has it would be the fast path, but only the
//! userspace path is built so far (`attach`: NBD client + FUSE file + loop device, in a process
//! of its own). Every RPC reads the world (mount table, attach state files) and closes the gap,
//! so a restarted plugin finds its attachments again and repeated calls answer the same.

use std::collections::{HashMap, HashSet};
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tonic::{Request, Response, Status};

use crate::attach::AttachState;
use crate::capability::{self, Access};
use crate::controller::{CTX_NBD, check_name};
use crate::error::CsiError;
use crate::identity::ZONE_KEY;
use crate::kernel_nbd;
use crate::nbd::{Address, TlsFiles};
use crate::proto::node_server::Node;
use crate::proto::node_service_capability::{self, rpc};
use crate::proto::*;
use crate::sys;

/// How long attaching or detaching may take.
const ATTACH_DEADLINE: Duration = Duration::from_secs(60);

/// Settings of the node plugin.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// This node's ID (CSI `node_id`).
    pub node_id: String,
    /// This node's zone.
    pub zone: String,
    /// Where attachments keep their state (`<state_dir>/<volume_id>/`).
    pub state_dir: PathBuf,
    /// The command that starts an attach process (program and leading arguments).
    pub attach_command: Vec<OsString>,
    /// This node's TLS identity towards block stores reached over TCP.
    pub tls: Option<TlsFiles>,
}

/// The Node service.
#[derive(Debug)]
pub struct NodeService {
    cfg: NodeConfig,
    inflight: Arc<Mutex<HashSet<String>>>,
}

#[derive(Debug)]
struct Busy {
    set: Arc<Mutex<HashSet<String>>>,
    key: String,
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.set
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.key);
    }
}

fn path_field(field: &'static str, p: &str) -> Result<PathBuf, CsiError> {
    if p.is_empty() {
        return Err(CsiError::invalid(field, "is required"));
    }
    if !p.starts_with('/') {
        return Err(CsiError::invalid(
            field,
            format!("{p:?} is not an absolute path"),
        ));
    }
    Ok(PathBuf::from(p))
}

fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

impl NodeService {
    /// A node plugin; logs the attachments it finds from a previous run.
    pub fn new(cfg: NodeConfig) -> Self {
        if let Ok(entries) = std::fs::read_dir(&cfg.state_dir) {
            for e in entries.filter_map(Result::ok) {
                if let Some(s) = AttachState::read(&e.path()) {
                    tracing::info!(volume = %s.volume_id, pid = s.pid, device = %s.device, alive = sys::alive(s.pid), "found attachment");
                }
            }
        }
        tracing::info!(
            path = if Self::kernel_path(&cfg) {
                "kernel NBD (netlink)"
            } else {
                "userspace NBD + FUSE + loop"
            },
            "attach path"
        );
        Self {
            cfg,
            inflight: Arc::default(),
        }
    }

    /// Kernel NBD where the node has the driver, unless TLS is needed (the kernel cannot
    /// speak it; the userspace client does).
    fn kernel_path(cfg: &NodeConfig) -> bool {
        cfg.tls.is_none() && kernel_nbd::available(Path::new("/"))
    }

    fn busy(&self, key: &str) -> Result<Busy, CsiError> {
        let mut set = self.inflight.lock().unwrap_or_else(|p| p.into_inner());
        if !set.insert(key.to_owned()) {
            return Err(CsiError::Aborted(key.to_owned()));
        }
        Ok(Busy {
            set: Arc::clone(&self.inflight),
            key: key.to_owned(),
        })
    }

    fn vol_dir(&self, id: &str) -> PathBuf {
        self.cfg.state_dir.join(id)
    }

    /// The live attachment of a volume, if any.
    fn attachment(&self, id: &str) -> Option<AttachState> {
        AttachState::read(&self.vol_dir(id)).filter(|s| {
            sys::alive(s.pid)
                && if s.kernel {
                    Path::new(&s.device).exists()
                } else {
                    sys::loops_backed_by(&s.file).contains(&s.device)
                }
        })
    }

    /// Attaches the volume unless it already is; returns the attachment and whether this call
    /// made it.
    fn ensure_attached(&self, id: &str, nbd: &str) -> Result<(AttachState, bool), CsiError> {
        if let Some(s) = self.attachment(id) {
            return Ok((s, false));
        }
        self.spawn_attach(id, nbd).map(|s| (s, true))
    }

    fn spawn_attach(&self, id: &str, nbd: &str) -> Result<AttachState, CsiError> {
        let dir = self.vol_dir(id);
        // A dead attachment's leftovers (its process was killed): clear them first.
        self.detach(id)?;
        std::fs::create_dir_all(&dir).map_err(CsiError::io("mkdir", dir.display()))?;
        let log = std::fs::File::create(dir.join("attach.log"))
            .map_err(CsiError::io("create", dir.join("attach.log").display()))?;
        let (prog, lead) =
            self.cfg
                .attach_command
                .split_first()
                .ok_or_else(|| CsiError::Attach {
                    volume: id.into(),
                    reason: "no attach command configured".into(),
                })?;
        let mut cmd = Command::new(prog);
        cmd.args(lead)
            .arg("attach")
            .arg("--volume-id")
            .arg(id)
            .arg("--nbd")
            .arg(nbd)
            .arg("--dir")
            .arg(&dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log));
        if Self::kernel_path(&self.cfg) {
            cmd.arg("--kernel-nbd");
        }
        if let Some(tls) = &self.cfg.tls {
            cmd.arg("--tls-ca")
                .arg(&tls.ca)
                .arg("--tls-cert")
                .arg(&tls.cert)
                .arg("--tls-key")
                .arg(&tls.key);
        }
        // It calls setsid() first: a session of its own, apart from the plugin's.
        let mut child = cmd.spawn().map_err(|e| CsiError::Command {
            command: format!("{} attach", Path::new(prog).display()),
            output: e.to_string(),
        })?;
        let pid = child.id();
        let deadline = Instant::now() + ATTACH_DEADLINE;
        loop {
            if let Some(s) = AttachState::read(&dir).filter(|s| s.pid == pid) {
                // Reap it whenever it exits, so it never lingers as a zombie of this plugin.
                std::thread::spawn(move || child.wait());
                tracing::info!(volume = %id, pid, device = %s.device, "attached");
                return Ok(s);
            }
            if let Ok(Some(status)) = child.try_wait() {
                let log = std::fs::read_to_string(dir.join("attach.log")).unwrap_or_default();
                // Nothing half-made: the process cleaned up what it made; its directory goes.
                self.detach(id)?;
                match status.code() {
                    Some(crate::attach::EXIT_UNKNOWN_EXPORT) => {
                        return Err(CsiError::NotFound {
                            what: "volume",
                            id: id.into(),
                        });
                    }
                    Some(crate::attach::EXIT_REFUSED) => {
                        return Err(CsiError::FailedPrecondition(format!(
                            "the block store does not let this node open volume {id:?}: {}",
                            log.trim()
                        )));
                    }
                    _ => {}
                }
                return Err(CsiError::Attach {
                    volume: id.into(),
                    reason: format!("attach process exited ({status}): {}", log.trim()),
                });
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                let _ = self.detach(id);
                return Err(CsiError::Attach {
                    volume: id.into(),
                    reason: format!("not attached within {ATTACH_DEADLINE:?}"),
                });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops the volume's attach process and clears its state (no-op when not attached).
    fn detach(&self, id: &str) -> Result<(), CsiError> {
        let dir = self.vol_dir(id);
        if let Some(s) = AttachState::read(&dir) {
            if sys::alive(s.pid) {
                nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(s.pid as i32),
                    nix::sys::signal::Signal::SIGTERM,
                )
                .map_err(|e| CsiError::io("kill", s.pid)(e.into()))?;
                let deadline = Instant::now() + ATTACH_DEADLINE;
                while sys::alive(s.pid) {
                    if Instant::now() > deadline {
                        return Err(CsiError::Attach {
                            volume: id.into(),
                            reason: format!("attach process {} did not exit", s.pid),
                        });
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
            // A killed attach process leaves its device (kernel NBD) or its loop device and
            // FUSE mount behind.
            if s.kernel {
                let index = s.device.trim_start_matches("/dev/nbd").parse::<u32>();
                if let Ok(index) = index {
                    kernel_nbd::KernelNbd::new(kernel_nbd::NetlinkGenl::open().map_err(|e| {
                        CsiError::Attach {
                            volume: id.into(),
                            reason: e.to_string(),
                        }
                    })?)
                    .and_then(|mut k| k.disconnect(index))
                    .map_err(|e| CsiError::Attach {
                        volume: id.into(),
                        reason: e.to_string(),
                    })?;
                }
            }
            for dev in sys::loops_backed_by(&s.file) {
                sys::loop_detach(&dev)?;
            }
        }
        let fuse = dir.join("fuse");
        if sys::mounted_at(&fuse)?.is_some() {
            sys::umount(&fuse)?;
        }
        match std::fs::remove_dir_all(&dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(CsiError::io("rmdir", dir.display())(e)),
        }
    }

    fn stage(&self, req: NodeStageVolumeRequest) -> Result<(), CsiError> {
        check_name("volume_id", &req.volume_id)?;
        let staging = path_field("staging_target_path", &req.staging_target_path)?;
        let cap = req
            .volume_capability
            .as_ref()
            .ok_or_else(|| CsiError::invalid("volume_capability", "is required"))?;
        let access = capability::check(cap, "volume_capability")?;
        let nbd = req
            .volume_context
            .get(CTX_NBD)
            .ok_or_else(|| CsiError::invalid("volume_context", format!("{CTX_NBD} is missing")))?;
        Address::parse(nbd).map_err(|e| CsiError::invalid("volume_context", e.to_string()))?;
        let _busy = self.busy(&req.volume_id)?;
        let (att, fresh) = self.ensure_attached(&req.volume_id, nbd)?;
        let Access::Mount { fs, flags } = access else {
            return Ok(());
        };
        if let Some(m) = sys::mounted_at(&staging)? {
            if m.source == att.device && m.fstype == fs.as_str() {
                return Ok(());
            }
            return Err(CsiError::AlreadyExists(format!(
                "{} is already mounted from {} ({}), incompatible with {} from volume {:?}",
                staging.display(),
                m.source,
                m.fstype,
                fs.as_str(),
                req.volume_id
            )));
        }
        let made = self.format_and_mount(&req.volume_id, &att, fs, &flags, &staging);
        if made.is_err() && fresh {
            // Nothing half-made: the attachment this call started goes with the failure.
            if let Err(e) = self.detach(&req.volume_id) {
                tracing::error!(volume = %req.volume_id, error = %e, "cannot undo a failed stage");
            }
        }
        made
    }

    fn format_and_mount(
        &self,
        id: &str,
        att: &AttachState,
        fs: capability::FsType,
        flags: &[String],
        staging: &Path,
    ) -> Result<(), CsiError> {
        match sys::fs_type(&att.device)? {
            None => {
                sys::mkfs(fs, &att.device)?;
                tracing::info!(volume = %id, fs = fs.as_str(), "filesystem made");
            }
            Some(found) if found == fs.as_str() => {}
            Some(found) => {
                return Err(CsiError::FailedPrecondition(format!(
                    "volume holds {found}, {} was asked",
                    fs.as_str()
                )));
            }
        }
        std::fs::create_dir_all(staging).map_err(CsiError::io("mkdir", staging.display()))?;
        sys::mount(&att.device, staging, fs.as_str(), flags)?;
        tracing::info!(volume = %id, staging = %staging.display(), "staged");
        Ok(())
    }

    fn unstage(&self, req: NodeUnstageVolumeRequest) -> Result<(), CsiError> {
        check_name("volume_id", &req.volume_id)?;
        let staging = path_field("staging_target_path", &req.staging_target_path)?;
        let _busy = self.busy(&req.volume_id)?;
        while sys::mounted_at(&staging)?.is_some() {
            sys::umount(&staging)?;
        }
        self.detach(&req.volume_id)?;
        tracing::info!(volume = %req.volume_id, "unstaged");
        Ok(())
    }

    fn publish(&self, req: NodePublishVolumeRequest) -> Result<(), CsiError> {
        check_name("volume_id", &req.volume_id)?;
        let target = path_field("target_path", &req.target_path)?;
        let staging = path_field("staging_target_path", &req.staging_target_path)?;
        let cap = req
            .volume_capability
            .as_ref()
            .ok_or_else(|| CsiError::invalid("volume_capability", "is required"))?;
        let access = capability::check(cap, "volume_capability")?;
        let _busy = self.busy(&req.volume_id)?;
        if let Some(m) = sys::mounted_at(&target)? {
            if m.readonly() == req.readonly {
                return Ok(());
            }
            return Err(CsiError::AlreadyExists(format!(
                "{} is already published {}",
                target.display(),
                if m.readonly() {
                    "read-only"
                } else {
                    "read-write"
                }
            )));
        }
        let source = match access {
            Access::Block => {
                let att = self.attachment(&req.volume_id).ok_or_else(|| {
                    CsiError::FailedPrecondition(format!(
                        "volume {:?} is not staged",
                        req.volume_id
                    ))
                })?;
                if let Some(parent) = target.parent() {
                    std::fs::create_dir_all(parent)
                        .map_err(CsiError::io("mkdir", parent.display()))?;
                }
                std::fs::OpenOptions::new()
                    .create(true)
                    .truncate(false)
                    .write(true)
                    .open(&target)
                    .map_err(CsiError::io("create", target.display()))?;
                PathBuf::from(att.device)
            }
            Access::Mount { .. } => {
                if sys::mounted_at(&staging)?.is_none() {
                    return Err(CsiError::FailedPrecondition(format!(
                        "volume {:?} is not staged at {}",
                        req.volume_id,
                        staging.display()
                    )));
                }
                std::fs::create_dir_all(&target)
                    .map_err(CsiError::io("mkdir", target.display()))?;
                staging
            }
        };
        sys::bind(&source, &target, req.readonly)?;
        tracing::info!(volume = %req.volume_id, target = %target.display(), "published");
        Ok(())
    }

    fn unpublish(&self, req: NodeUnpublishVolumeRequest) -> Result<(), CsiError> {
        check_name("volume_id", &req.volume_id)?;
        let target = path_field("target_path", &req.target_path)?;
        let _busy = self.busy(&req.volume_id)?;
        while sys::mounted_at(&target)?.is_some() {
            sys::umount(&target)?;
        }
        let removed = if target.is_dir() {
            std::fs::remove_dir(&target)
        } else {
            std::fs::remove_file(&target)
        };
        match removed {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(CsiError::io("remove", target.display())(e)),
        }
        tracing::info!(volume = %req.volume_id, target = %target.display(), "unpublished");
        Ok(())
    }

    fn condition(&self, id: &str) -> VolumeCondition {
        match AttachState::read(&self.vol_dir(id)) {
            Some(s) if sys::alive(s.pid) => VolumeCondition {
                abnormal: false,
                message: format!("attached at {} by process {}", s.device, s.pid),
            },
            Some(s) => VolumeCondition {
                abnormal: true,
                message: format!("attach process {} is gone; unstage and stage again", s.pid),
            },
            None => VolumeCondition {
                abnormal: true,
                message: "not attached on this node".into(),
            },
        }
    }

    fn stats(
        &self,
        req: NodeGetVolumeStatsRequest,
    ) -> Result<NodeGetVolumeStatsResponse, CsiError> {
        check_name("volume_id", &req.volume_id)?;
        let path = path_field("volume_path", &req.volume_path)?;
        if sys::mounted_at(&path)?.is_none() {
            return Err(CsiError::NotFound {
                what: "volume path",
                id: path.display().to_string(),
            });
        }
        let usage = if path.is_dir() {
            let st = nix::sys::statvfs::statvfs(&path)
                .map_err(|e| CsiError::io("statvfs", path.display())(e.into()))?;
            let frs = st.fragment_size();
            vec![
                VolumeUsage {
                    total: to_i64(st.blocks() * frs),
                    available: to_i64(st.blocks_available() * frs),
                    used: to_i64((st.blocks() - st.blocks_free()) * frs),
                    unit: volume_usage::Unit::Bytes as i32,
                },
                VolumeUsage {
                    total: to_i64(st.files()),
                    available: to_i64(st.files_available()),
                    used: to_i64(st.files() - st.files_free()),
                    unit: volume_usage::Unit::Inodes as i32,
                },
            ]
        } else {
            vec![VolumeUsage {
                total: to_i64(sys::device_size(&path)?),
                available: 0,
                used: 0,
                unit: volume_usage::Unit::Bytes as i32,
            }]
        };
        Ok(NodeGetVolumeStatsResponse {
            usage,
            volume_condition: Some(self.condition(&req.volume_id)),
        })
    }

    fn expand(&self, req: NodeExpandVolumeRequest) -> Result<NodeExpandVolumeResponse, CsiError> {
        check_name("volume_id", &req.volume_id)?;
        let path = path_field("volume_path", &req.volume_path)?;
        let _busy = self.busy(&req.volume_id)?;
        let att = self
            .attachment(&req.volume_id)
            .ok_or_else(|| CsiError::NotFound {
                what: "volume",
                id: req.volume_id.clone(),
            })?;
        let mounted = sys::mounted_at(&path)?.ok_or_else(|| CsiError::NotFound {
            what: "volume path",
            id: path.display().to_string(),
        })?;
        let required = req
            .capacity_range
            .as_ref()
            .map_or(0, |r| r.required_bytes.max(0) as u64);
        // The attach process re-reads the export's size; wait until it recorded it.
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(att.pid as i32),
            nix::sys::signal::Signal::SIGUSR1,
        )
        .map_err(|e| CsiError::io("kill", att.pid)(e.into()))?;
        let deadline = Instant::now() + ATTACH_DEADLINE;
        let size = loop {
            match AttachState::read(&self.vol_dir(&req.volume_id)) {
                Some(s) if s.refreshed > att.refreshed => break s.size,
                _ if Instant::now() > deadline => {
                    return Err(CsiError::Attach {
                        volume: req.volume_id,
                        reason: "the attach process did not re-read the export size".into(),
                    });
                }
                _ => std::thread::sleep(Duration::from_millis(20)),
            }
        };
        if size < required {
            return Err(CsiError::OutOfRange(format!(
                "the export is {size} bytes, {required} asked: expand the volume first"
            )));
        }
        if !att.kernel {
            // The kernel learns the file's new size on the next stat (attributes are not
            // cached), the loop device from it.
            std::fs::metadata(&att.file).map_err(CsiError::io("stat", att.file.display()))?;
            sys::loop_set_capacity(&att.device)?;
        }
        if mounted.fstype != "none" && path.is_dir() {
            sys::grow_fs(&mounted.fstype, &att.device, &path)?;
        }
        tracing::info!(volume = %req.volume_id, size, "expanded");
        Ok(NodeExpandVolumeResponse {
            capacity_bytes: to_i64(size),
        })
    }
}

fn rpc_cap(t: rpc::Type) -> NodeServiceCapability {
    NodeServiceCapability {
        r#type: Some(node_service_capability::Type::Rpc(
            node_service_capability::Rpc { r#type: t as i32 },
        )),
    }
}

/// Runs blocking node work off the async executor.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, CsiError> + Send + 'static,
) -> Result<T, Status> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Status::internal(format!("node task failed: {e}")))?
        .map_err(Status::from)
}

#[tonic::async_trait]
impl Node for Arc<NodeService> {
    async fn node_stage_volume(
        &self,
        req: Request<NodeStageVolumeRequest>,
    ) -> Result<Response<NodeStageVolumeResponse>, Status> {
        let me = Arc::clone(self);
        blocking(move || me.stage(req.into_inner())).await?;
        Ok(Response::new(NodeStageVolumeResponse {}))
    }

    async fn node_unstage_volume(
        &self,
        req: Request<NodeUnstageVolumeRequest>,
    ) -> Result<Response<NodeUnstageVolumeResponse>, Status> {
        let me = Arc::clone(self);
        blocking(move || me.unstage(req.into_inner())).await?;
        Ok(Response::new(NodeUnstageVolumeResponse {}))
    }

    async fn node_publish_volume(
        &self,
        req: Request<NodePublishVolumeRequest>,
    ) -> Result<Response<NodePublishVolumeResponse>, Status> {
        let me = Arc::clone(self);
        blocking(move || me.publish(req.into_inner())).await?;
        Ok(Response::new(NodePublishVolumeResponse {}))
    }

    async fn node_unpublish_volume(
        &self,
        req: Request<NodeUnpublishVolumeRequest>,
    ) -> Result<Response<NodeUnpublishVolumeResponse>, Status> {
        let me = Arc::clone(self);
        blocking(move || me.unpublish(req.into_inner())).await?;
        Ok(Response::new(NodeUnpublishVolumeResponse {}))
    }

    async fn node_get_volume_stats(
        &self,
        req: Request<NodeGetVolumeStatsRequest>,
    ) -> Result<Response<NodeGetVolumeStatsResponse>, Status> {
        let me = Arc::clone(self);
        Ok(Response::new(
            blocking(move || me.stats(req.into_inner())).await?,
        ))
    }

    async fn node_expand_volume(
        &self,
        req: Request<NodeExpandVolumeRequest>,
    ) -> Result<Response<NodeExpandVolumeResponse>, Status> {
        let me = Arc::clone(self);
        Ok(Response::new(
            blocking(move || me.expand(req.into_inner())).await?,
        ))
    }

    async fn node_get_capabilities(
        &self,
        _req: Request<NodeGetCapabilitiesRequest>,
    ) -> Result<Response<NodeGetCapabilitiesResponse>, Status> {
        Ok(Response::new(NodeGetCapabilitiesResponse {
            capabilities: [
                rpc::Type::StageUnstageVolume,
                rpc::Type::GetVolumeStats,
                rpc::Type::ExpandVolume,
                rpc::Type::VolumeCondition,
            ]
            .into_iter()
            .map(rpc_cap)
            .collect(),
        }))
    }

    async fn node_get_info(
        &self,
        _req: Request<NodeGetInfoRequest>,
    ) -> Result<Response<NodeGetInfoResponse>, Status> {
        Ok(Response::new(NodeGetInfoResponse {
            node_id: self.cfg.node_id.clone(),
            max_volumes_per_node: 0,
            accessible_topology: Some(Topology {
                segments: HashMap::from([(ZONE_KEY.to_owned(), self.cfg.zone.clone())]),
            }),
        }))
    }
}
