//! PersistentVolumeClaim volumes through a real container runtime and the real CSI node
//! plugin: a block store (`slipway blockstore`) holds the volume, the node plugin (`slipway csi
//! node`) stages it (NBD attach, mkfs, mount) and publishes it into the pod the runner starts
//! through containerd; the pod's bytes are still there for the next pod after the volume was
//! unpublished and unstaged; a volume grown under a running pod is expanded online (the pod's
//! df sees it); fio in a pod verifies its writes while the node plugin is killed (kill -9) and
//! started again; a claim that is not bound keeps its pod in ContainerCreating with the reason; nothing is left (mount, loop device, attach process) once the pods are gone.
//! Privileged (root, BPF, netns, containerd, FUSE, loop devices): run by scripts/test.sh.

#[path = "../../cni/tests/common/mod.rs"]
mod common;
#[path = "common/pod_host.rs"]
mod pod_host;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;
use pod_host::*;
use slipway_agent::pods::claims::{ClaimVolume, CsiNode};

/// A daemon process killed (and reaped) on drop, on panic too.
struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn(args: &[&str], log: &Path) -> Daemon {
    let log = std::fs::File::create(log).expect("log");
    Daemon(
        Command::new(common::slipway_binary())
            .args(args)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("slipway"),
    )
}

fn await_path(path: &Path, log: &Path) {
    let end = Instant::now() + Duration::from_secs(20);
    while !path.exists() {
        assert!(
            Instant::now() < end,
            "{} did not appear: {}",
            path.display(),
            std::fs::read_to_string(log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn mounts_below(dir: &Path) -> Vec<String> {
    slipway_dataplane::mounts::mounts()
        .expect("mounts")
        .into_iter()
        .filter(|m| m.target.starts_with(dir))
        .map(|m| format!("{} {}", m.fstype, m.target.display()))
        .collect()
}

/// Live attach processes (`slipway csi attach`) whose state is under `dir`.
fn attach_processes(dir: &Path) -> Vec<u32> {
    let needle = dir.display().to_string();
    std::fs::read_dir("/proc")
        .expect("/proc")
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            !gone(i32::try_from(*pid).unwrap_or(i32::MAX))
                && std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| {
                    let args: Vec<_> = c.split(|b| *b == 0).map(String::from_utf8_lossy).collect();
                    args.iter().any(|a| a == "attach") && args.iter().any(|a| a.contains(&needle))
                })
        })
        .collect()
}

/// Waits until the attach processes under `dir` have exited (a detach signals them and
/// returns; they flush and go on their own).
fn await_no_attach(dir: &Path) {
    let end = Instant::now() + Duration::from_secs(20);
    loop {
        let left = attach_processes(dir);
        if left.is_empty() {
            return;
        }
        assert!(
            Instant::now() < end,
            "attach processes left: {left:?}: {}\nplugin log: {}",
            left.iter()
                .map(|p| std::fs::read_to_string(format!("/proc/{p}/cmdline")).unwrap_or_default())
                .collect::<Vec<_>>()
                .join("; "),
            std::fs::read_to_string(dir.join("plugin.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn claim_pod(name: &str, claim: &str, script: &str) -> Pod {
    pod(
        name,
        json!({
            "restartPolicy": "Never",
            "terminationGracePeriodSeconds": 1,
            "volumes": [{"name": "data", "persistentVolumeClaim": {"claimName": claim}}],
            "containers": [{"name": "c", "image": "busybox", "imagePullPolicy": "Never",
                            "command": ["sh", "-c", script],
                            "volumeMounts": [{"name": "data", "mountPath": "/data"}]}],
        }),
    )
}

#[test]
#[cfg_attr(
    not(feature = "privileged"),
    ignore = "privileged: root + BPF + netns + containerd + FUSE + loop devices; run scripts/test.sh"
)]
fn claims_are_staged_and_published_through_the_csi_node_plugin_and_keep_their_bytes() {
    let mut host = PodHost::start(Backoff::default());
    let dir = host.cluster.dir.join("storage");
    std::fs::create_dir_all(&dir).expect("storage dir");
    let control = dir.join("ctl.sock");
    let nbd = dir.join("nbd.sock");
    let _store = spawn(
        &[
            "blockstore",
            "--data-dir",
            &dir.join("data").display().to_string(),
            "--unix",
            &nbd.display().to_string(),
            "--control",
            &control.display().to_string(),
        ],
        &dir.join("blockstore.log"),
    );
    await_path(&control, &dir.join("blockstore.log"));
    let out = Command::new(common::slipway_binary())
        .args(["volume", "create", "vol1", "--size", "256M", "--control"])
        .arg(&control)
        .output()
        .expect("slipway volume create");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let csi_dir = host.cluster.dir.join("csi");
    std::fs::create_dir_all(&csi_dir).expect("csi dir");
    let socket = csi_dir.join("csi.sock");
    let plugin_args = [
        "csi".to_owned(),
        "node".into(),
        "--endpoint".into(),
        format!("unix://{}", socket.display()),
        "--node-id".into(),
        "n1".into(),
        "--state-dir".into(),
        csi_dir.join("attachments").display().to_string(),
    ];
    let plugin_args: Vec<&str> = plugin_args.iter().map(String::as_str).collect();
    let plugin = spawn(&plugin_args, &csi_dir.join("plugin.log"));
    await_path(&socket, &csi_dir.join("plugin.log"));

    // The runner with the node's CSI plugin, as `slipway agent --csi-dir` configures it.
    let cri = host.rt.block_on(Cri::connect(&host.socket())).expect("cri");
    let volume_root = host.dir.join("kubelet-pods");
    let staging_root = csi_dir.join("staging");
    host.runner = Some(PodRunner::new(
        cri,
        RunnerConfig {
            log_root: host.dir.join("pods"),
            cgroup_parent: host.cgroup_parent.clone(),
            backoff: Backoff::default(),
            host_ip: None,
            probe_netns: None,
            dns: None,
            volume_root: volume_root.clone(),
            csi: Some(CsiNode {
                socket: socket.clone(),
                staging_root: staging_root.clone(),
            }),
        },
    ));
    let volume = ClaimVolume {
        driver: "csi.slipway.dev".into(),
        volume_id: "vol1".into(),
        fs_type: "ext4".into(),
        volume_context: HashMap::from([("nbdAddress".into(), format!("unix:{}", nbd.display()))]),
        ..Default::default()
    };
    host.objects
        .insert_claim("default", "data", Ok(volume.clone()));

    // A pod writes through the claim's filesystem and ends.
    let writer = claim_pod(
        "writer",
        "data",
        "echo kept-across-pods > /data/note && sync && grep -q ' /data ext4 ' /proc/mounts",
    );
    let status = host.wait(
        std::slice::from_ref(&writer),
        "writer",
        Duration::from_secs(90),
        |s| matches!(s.phase.as_deref(), Some("Succeeded" | "Failed")),
    );
    assert_eq!(
        status.phase.as_deref(),
        Some("Succeeded"),
        "{status:?}\nplugin log: {}",
        std::fs::read_to_string(csi_dir.join("plugin.log")).unwrap_or_default()
    );
    let staged = mounts_below(&staging_root);
    assert_eq!(staged.len(), 1, "staged once: {staged:?}");
    assert_eq!(attach_processes(&csi_dir).len(), 1, "one attach process");

    // The pod goes: unpublished, and unstaged (no pod on the node uses it any more).
    let report = host.sync(&[]);
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    assert_eq!(mounts_below(&volume_root), Vec::<String>::new());
    assert_eq!(mounts_below(&staging_root), Vec::<String>::new());
    await_no_attach(&csi_dir);

    // The next pod reads the bytes the first one wrote (staged again from the block store).
    let reader = claim_pod(
        "reader",
        "data",
        "test \"$(cat /data/note)\" = kept-across-pods",
    );
    let status = host.wait(
        std::slice::from_ref(&reader),
        "reader",
        Duration::from_secs(90),
        |s| matches!(s.phase.as_deref(), Some("Succeeded" | "Failed")),
    );
    assert_eq!(status.phase.as_deref(), Some("Succeeded"), "{status:?}");

    // A volume grows while a pod uses it: the block store volume first (the controller's
    // part), then the PV's capacity; the runner's next sync expands the staged filesystem
    // online and df in the pod sees it. xfs: growing ext4 online takes CAP_SYS_RESOURCE,
    // which a node plugin may lack (the CSI node test covers that refusal).
    let volume_cmd = |args: &[&str]| {
        let out = Command::new(common::slipway_binary())
            .arg("volume")
            .args(args)
            .arg("--control")
            .arg(&control)
            .output()
            .expect("slipway volume");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    volume_cmd(&["create", "vol2", "--size", "320M"]);
    let grown = ClaimVolume {
        volume_id: "vol2".into(),
        fs_type: "xfs".into(),
        capacity: 320 << 20,
        ..volume.clone()
    };
    host.objects
        .insert_claim("default", "grown", Ok(grown.clone()));
    let grower = claim_pod(
        "grower",
        "grown",
        "until [ \"$(df -Pk /data | awk 'NR==2 {print $2}')\" -gt 500000 ]; do sleep 0.2; done",
    );
    let pods = vec![reader.clone(), grower.clone()];
    host.wait(&pods, "grower", Duration::from_secs(90), |s| {
        s.phase.as_deref() == Some("Running")
    });
    let fs_size = || {
        let staged = slipway_dataplane::mounts::mounts()
            .expect("mounts")
            .into_iter()
            .find(|m| m.target.starts_with(&staging_root) && m.fstype == "xfs")
            .expect("the staged xfs filesystem");
        let st = nix::sys::statvfs::statvfs(&staged.target).expect("statvfs");
        st.blocks() * st.fragment_size()
    };
    let before = fs_size();
    assert!(before <= 320 << 20, "{before} bytes before growing");
    volume_cmd(&["resize", "vol2", "--size", "640M"]);
    host.objects.insert_claim(
        "default",
        "grown",
        Ok(ClaimVolume {
            capacity: 640 << 20,
            ..grown
        }),
    );
    let status = host.wait(&pods, "grower", Duration::from_secs(60), |s| {
        matches!(s.phase.as_deref(), Some("Succeeded" | "Failed"))
    });
    assert_eq!(
        status.phase.as_deref(),
        Some("Succeeded"),
        "{status:?}\nplugin log: {}",
        std::fs::read_to_string(csi_dir.join("plugin.log")).unwrap_or_default()
    );
    let after = fs_size();
    assert!(
        after > 500 << 20,
        "{after} bytes after growing (from {before})"
    );

    // fio verifies its writes inside a pod while the node plugin is killed (kill -9) and
    // started again: the attachment lives in its own process, so I/O never stops.
    let rootfs = host.cluster.dir.join("fio-rootfs");
    slipway_agent::pods::image::tools_rootfs(&rootfs, &["/usr/bin/fio"]).expect("fio rootfs");
    let (ok, err) = import(&host, &["fio", rootfs.to_str().expect("utf-8")]);
    assert!(ok, "slipway image import fio: {err}");
    let fio = pod(
        "fio",
        json!({
            "restartPolicy": "Never",
            "volumes": [{"name": "data", "persistentVolumeClaim": {"claimName": "data"}}],
            "containers": [{"name": "fio", "image": "fio", "imagePullPolicy": "Never",
                            "command": ["/usr/bin/fio", "--name=verify", "--filename=/data/fio.dat",
                                        "--size=32M", "--rw=randwrite", "--bs=4k", "--direct=1",
                                        "--ioengine=psync", "--verify=crc32c", "--do_verify=1"],
                            "volumeMounts": [{"name": "data", "mountPath": "/data"}]}],
        }),
    );
    let pods = vec![reader.clone(), fio.clone()];
    host.wait(&pods, "fio", Duration::from_secs(90), |s| {
        s.phase.as_deref() == Some("Running")
    });
    let fio_log = host
        .dir
        .join("pods")
        .join(format!("default_fio_{}", uid(&fio)))
        .join("fio/0.log");
    let attached = attach_processes(&csi_dir);
    assert!(
        !std::fs::read_to_string(&fio_log)
            .unwrap_or_default()
            .contains("err="),
        "fio ended before the plugin was killed"
    );
    drop(plugin);
    let _plugin = spawn(&plugin_args, &csi_dir.join("plugin.log"));
    await_path(&socket, &csi_dir.join("plugin.log"));
    let status = host.wait(&pods, "fio", Duration::from_secs(120), |s| {
        matches!(s.phase.as_deref(), Some("Succeeded" | "Failed"))
    });
    let log = std::fs::read_to_string(&fio_log).unwrap_or_default();
    assert_eq!(status.phase.as_deref(), Some("Succeeded"), "fio: {log}");
    assert!(
        log.contains("err= 0") && !log.contains("verify: bad"),
        "fio did not verify: {log}"
    );
    assert_eq!(
        attach_processes(&csi_dir),
        attached,
        "the attach process outlived the plugin"
    );

    // A claim that is not bound: the pod waits with the reason and gets no sandbox.
    host.objects.insert_claim(
        "default",
        "unbound",
        Err("persistentvolumeclaim \"unbound\" is not bound".into()),
    );
    let waiting = claim_pod("waits", "unbound", "true");
    let pods = vec![reader.clone(), waiting.clone()];
    let status = host.wait(&pods, "waits", Duration::from_secs(10), |s| {
        s.phase.as_deref() == Some("Pending")
    });
    let message = status.container_statuses.as_ref().expect("statuses")[0]
        .state
        .as_ref()
        .and_then(|s| s.waiting.as_ref())
        .and_then(|w| w.message.clone())
        .unwrap_or_default();
    assert!(message.contains("is not bound"), "{message}");
    assert!(host.sandboxes(&uid(&waiting)).is_empty());

    // Everything goes with the pods.
    let report = host.sync(&[]);
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    let left: Vec<PathBuf> = [&volume_root, &staging_root]
        .iter()
        .flat_map(|d| std::fs::read_dir(d).into_iter().flatten().flatten())
        .map(|e| e.path())
        .collect();
    assert!(left.is_empty(), "left: {left:?}");
    assert_eq!(mounts_below(&csi_dir), Vec::<String>::new());
    assert_eq!(mounts_below(&volume_root), Vec::<String>::new());
    await_no_attach(&csi_dir);
}
