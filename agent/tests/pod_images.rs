//! Images imported offline: OCI and Docker archives and directories become runtime images under
//! new names with their entrypoints and commands, through `slipway image import` against a
//! host's own containerd. Privileged (root, BPF, netns, containerd): run by scripts/test.sh.

#[path = "../../cni/tests/common/mod.rs"]
mod common;
#[path = "common/pod_host.rs"]
mod pod_host;

use std::process::Command;
use std::time::{Duration, Instant};

use pod_host::*;

#[test]
#[cfg_attr(
    not(feature = "privileged"),
    ignore = "privileged: root + BPF + netns + containerd; run scripts/test.sh"
)]
fn image_archives_oci_and_docker_are_imported_under_new_names_and_their_cmds_run() {
    let mut host = PodHost::start(Backoff::default());
    let rootfs = host.cluster.dir.join("busybox-rootfs");
    let archive = host.cluster.dir.join("tools.tar");
    slipway_agent::pods::image::build_archive(
        "tools:1",
        &rootfs,
        &slipway_agent::pods::image::ImageConfig {
            entrypoint: vec!["sh".into(), "-c".into()],
            cmd: vec!["echo \"from the archive, $GREETING\"; exec sleep 3600".into()],
            env: vec!["GREETING=hello".into()],
            working_dir: Some("/tmp".into()),
        },
        &archive,
    )
    .expect("archive");
    let (ok, stderr) = import(
        &host,
        &["example.com/tools:2", archive.to_str().expect("utf-8")],
    );
    assert!(ok, "{stderr}");
    // Bad input: a bad name, a missing source, image config flags with an archive.
    let (ok, stderr) = import(&host, &["Tools", archive.to_str().expect("utf-8")]);
    assert!(!ok && stderr.contains("NAME"), "{stderr}");
    let (ok, stderr) = import(&host, &["tools", "/nonexistent/rootfs"]);
    assert!(!ok && stderr.contains("DIR|TAR"), "{stderr}");
    let (ok, stderr) = import(
        &host,
        &["tools", archive.to_str().expect("utf-8"), "--env", "A=b"],
    );
    assert!(!ok && stderr.contains("--env"), "{stderr}");

    // The image's Entrypoint, Cmd and Env run when the Pod gives no command.
    let tools = pod(
        "tools",
        json!({"containers": [{"name": "t", "image": "example.com/tools:2"}]}),
    );
    let pods = vec![tools.clone()];
    host.wait(&pods, "tools", Duration::from_secs(60), running);
    let log = host
        .dir
        .join("pods")
        .join(format!("default_tools_{}", uid(&tools)))
        .join("t/0.log");
    let end = Instant::now() + Duration::from_secs(10);
    loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if text.contains("from the archive, hello") {
            break;
        }
        assert!(Instant::now() < end, "log {}: {text:?}", log.display());
        std::thread::sleep(Duration::from_millis(50));
    }

    // A docker archive (`podman save --format docker-archive` of a rootfs podman imported).
    let podman_dir = host.cluster.dir.join("podman");
    std::fs::create_dir_all(&podman_dir).expect("podman dir");
    let rootfs_tar = podman_dir.join("rootfs.tar");
    let status = Command::new("tar")
        .arg("-C")
        .arg(&rootfs)
        .arg("-cf")
        .arg(&rootfs_tar)
        .arg(".")
        .status()
        .expect("tar");
    assert!(status.success());
    let docker_tar = podman_dir.join("docker.tar");
    let podman = |args: &[&str]| {
        let out = Command::new("podman")
            .arg("--root")
            .arg(podman_dir.join("root"))
            .arg("--runroot")
            .arg(podman_dir.join("runroot"))
            .args(["--storage-driver", "vfs"])
            .args(args)
            .output()
            .expect("podman (Debian package podman)");
        assert!(
            out.status.success(),
            "podman {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    podman(&[
        "import",
        "--change",
        "CMD [\"/bin/busybox\", \"echo\", \"from a docker archive\"]",
        rootfs_tar.to_str().expect("utf-8"),
        "localhost/podman-made:1",
    ]);
    podman(&[
        "save",
        "--format",
        "docker-archive",
        "-o",
        docker_tar.to_str().expect("utf-8"),
        "localhost/podman-made:1",
    ]);
    let (ok, stderr) = import(
        &host,
        &["docker-made:1", docker_tar.to_str().expect("utf-8")],
    );
    assert!(ok, "{stderr}");
    let once = pod(
        "once",
        json!({"restartPolicy": "Never",
               "containers": [{"name": "o", "image": "docker-made:1"}]}),
    );
    let log = host
        .dir
        .join("pods")
        .join(format!("default_once_{}", uid(&once)))
        .join("o/0.log");
    let pods = vec![once];
    let status = host.wait(&pods, "once", Duration::from_secs(60), |s| {
        matches!(s.phase.as_deref(), Some("Succeeded" | "Failed"))
    });
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert_eq!(status.phase.as_deref(), Some("Succeeded"), "{text}");
    assert!(text.contains("from a docker archive"), "{text:?}");

    let report = host.sync(&[]);
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    assert_eq!(host.cluster.leftovers(1), Leftovers::default());
}
