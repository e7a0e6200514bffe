//! The volume reconciler against a real block store (`slipway-nbd`, TLS with certificates from
//! the supervisor's CA) and a real supervisor process, driven with kubectl: claims become
//! volumes with bound PVs, grow, clone and go with their claim; attachments authorise exactly
//! their host on the export (qemu-io over TLS with each host's certificate); bad claims are
//! refused naming the limit or the class and leave nothing in the block store.
//!
//! Needs `cargo build -p slipway-blockstore --bin slipway-nbd` first (the test finds it beside
//! its own binary's directory).

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{ChildGuard, Supervisor, TempDir, wait_for};
use serde_json::Value;
use slipway_api::volumes::{NO_CLIENT, host_nbd_client};
use slipway_blockstore::control::{self, ControlRequest};
use slipway_supervisor::auth::issue_host_identity;
use slipway_supervisor::tls::{ADMIN_DAYS, Pki};

const GI: u64 = 1 << 30;

const SETUP: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: team}
spec:
  limits: {storage: 4Gi}
  storageClasses: [fast]
---
apiVersion: v1
kind: Namespace
metadata: {name: other}
---
apiVersion: slipway.dev/v1alpha1
kind: HostClass
metadata: {name: small}
spec: {cpus: 1, memory: 1Gi}
---
apiVersion: storage.k8s.io/v1
kind: StorageClass
metadata: {name: fast}
provisioner: csi.slipway.dev
allowVolumeExpansion: true
---
apiVersion: storage.k8s.io/v1
kind: StorageClass
metadata: {name: slow}
provisioner: csi.slipway.dev
---
apiVersion: slipway.dev/v1alpha1
kind: Host
metadata: {name: team-c1-workers-0}
spec: {zone: zone-a, hostClass: small, provider: static, cluster: {namespace: team, name: c1}, pool: workers}
---
apiVersion: slipway.dev/v1alpha1
kind: Host
metadata: {name: other-c2-workers-0}
spec: {zone: zone-a, hostClass: small, provider: static, cluster: {namespace: other, name: c2}, pool: workers}
"#;

/// The block store binary, built beside this test's binary.
fn nbd_binary() -> PathBuf {
    let exe = std::env::current_exe().expect("test binary");
    let dir = exe.parent().and_then(Path::parent).expect("target dir");
    let bin = dir.join("slipway-nbd");
    assert!(
        bin.exists(),
        "{} is missing: cargo build -p slipway-blockstore --bin slipway-nbd",
        bin.display()
    );
    bin
}

/// A block store serving TLS with a certificate of the supervisor's CA; returns the guard,
/// its control socket and TCP port.
fn start_block_store(dir: &Path, pki: &Pki) -> (ChildGuard, PathBuf, u16) {
    let (cert, key) = pki
        .issue_server(&["localhost".into(), "127.0.0.1".into()], ADMIN_DAYS)
        .expect("server certificate");
    std::fs::write(dir.join("bs.crt"), cert).expect("write");
    std::fs::write(dir.join("bs.key"), key).expect("write");
    let control = dir.join("bs.sock");
    let log = std::fs::File::create(dir.join("blockstore.log")).expect("log");
    let mut child = Command::new(nbd_binary())
        .arg("serve")
        .arg("--data-dir")
        .arg(dir.join("bs-data"))
        .arg("--control")
        .arg(&control)
        .args(["--listen", "127.0.0.1:0", "--tls-cert"])
        .arg(dir.join("bs.crt"))
        .arg("--tls-key")
        .arg(dir.join("bs.key"))
        .arg("--tls-client-ca")
        .arg(pki.ca_cert())
        .stdout(Stdio::piped())
        .stderr(log)
        .spawn()
        .expect("spawn slipway-nbd");
    let stdout = child.stdout.take().expect("stdout");
    let guard = ChildGuard(Some(child));
    let mut line = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(stdout), &mut line).expect("ready");
    let port = line
        .split_whitespace()
        .find_map(|p| p.strip_prefix("tcp="))
        .and_then(|a| a.rsplit(':').next())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no tcp= in {line:?}"));
    (guard, control, port)
}

/// A qemu/libnbd credentials directory for a host, with its certificate from the CA.
fn host_creds(dir: &Path, pki: &Pki, host: &str) -> String {
    let d = dir.join(format!("creds-{host}"));
    std::fs::create_dir_all(&d).expect("dir");
    let (cert, key) = issue_host_identity(pki, host, ADMIN_DAYS).expect("client certificate");
    std::fs::copy(pki.ca_cert(), d.join("ca-cert.pem")).expect("ca");
    std::fs::write(d.join("client-cert.pem"), cert).expect("write");
    std::fs::write(d.join("client-key.pem"), key).expect("write");
    d.display().to_string()
}

/// qemu-io over TLS as the host whose credentials are in `creds`: whether it read.
fn opens(creds: &str, port: u16, export: &str) -> bool {
    let object = format!("tls-creds-x509,id=tls0,endpoint=client,dir={creds}");
    let image = format!(
        "driver=nbd,server.type=inet,server.host=localhost,server.port={port},export={export},tls-creds=tls0"
    );
    let out = Command::new("qemu-io")
        .args([
            "--object",
            &object,
            "--image-opts",
            "-c",
            "read 0 4k",
            &image,
        ])
        .output()
        .expect("qemu-io");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("qemu-io {export} as {creds}: {text}");
    out.status.success() && !text.contains("failed") && !text.contains("error")
}

fn volumes(control: &Path) -> Vec<slipway_blockstore::store::VolumeInfo> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(control::call(control, &ControlRequest::List {}))
        .expect("list volumes")
        .volumes
}

fn get(sup: &Supervisor, args: &[&str]) -> Option<Value> {
    let mut a = vec!["get"];
    a.extend_from_slice(args);
    a.extend_from_slice(&["-o", "json"]);
    let out = sup.kubectl(&a);
    out.ok
        .then(|| serde_json::from_str(&out.stdout).ok())
        .flatten()
}

fn claim(name: &str, class: &str, size: &str, source: Option<&str>) -> String {
    let source = source.map_or(String::new(), |s| {
        format!("\n  dataSource: {{kind: PersistentVolumeClaim, name: {s}}}")
    });
    format!(
        "apiVersion: v1\nkind: PersistentVolumeClaim\nmetadata: {{name: {name}, namespace: team}}\nspec:\n  accessModes: [ReadWriteOnce]\n  storageClassName: {class}\n  resources: {{requests: {{storage: {size}}}}}{source}\n"
    )
}

/// Waits for a claim to be Bound; returns its volume name.
fn bound(sup: &Supervisor, name: &str) -> String {
    wait_for(
        &format!("claim {name} bound"),
        Duration::from_secs(30),
        || {
            let c = get(sup, &["pvc", name, "-n", "team"])?;
            (c["status"]["phase"] == "Bound")
                .then(|| c["spec"]["volumeName"].as_str().map(str::to_owned))
                .flatten()
        },
    )
}

#[test]
fn claims_become_volumes_that_only_attached_hosts_open() {
    let dir = TempDir::new("volumes");
    let sup_dir = dir.path().join("sup");
    let pki = Pki::new(&sup_dir);
    pki.ensure(&[]).expect("CA");
    let (_bs, control, port) = start_block_store(dir.path(), &pki);
    let store = format!("zone-a={},tcp:127.0.0.1:{port}", control.display());
    let sup = Supervisor::start(&sup_dir, "redb", &["--block-store", &store]);
    let setup = sup.file("setup.yaml", SETUP);
    sup.kubectl(&["apply", "-f", &setup]).ok();

    // A claim becomes a volume, a PV bound to it, and an export nobody may open yet.
    sup.kubectl_stdin(
        &["apply", "-f", "-"],
        Some(&claim("data", "fast", "1Gi", None)),
    )
    .ok();
    let vol = bound(&sup, "data");
    let pv = get(&sup, &["pv", &vol]).expect("PV");
    assert_eq!(pv["spec"]["csi"]["driver"], "csi.slipway.dev");
    assert_eq!(pv["spec"]["csi"]["volumeHandle"], vol.as_str());
    assert_eq!(
        pv["spec"]["csi"]["volumeAttributes"]["nbdAddress"],
        format!("tcp:127.0.0.1:{port}")
    );
    assert_eq!(pv["spec"]["claimRef"]["name"], "data");
    assert_eq!(pv["status"]["phase"], "Bound");
    let info = volumes(&control);
    let v = info
        .iter()
        .find(|v| v.name == vol)
        .expect("volume in the store");
    assert_eq!(v.size, GI);
    assert_eq!(v.clients, vec![NO_CLIENT.to_owned()]);
    let team_host = host_creds(dir.path(), &pki, "team-c1-workers-0");
    let other_host = host_creds(dir.path(), &pki, "other-c2-workers-0");
    assert!(
        !opens(&team_host, port, &vol),
        "opened before any attachment"
    );

    // Bad claims are refused naming the limit or the class, and leave nothing.
    let before = volumes(&control).len();
    let err = sup
        .kubectl_stdin(
            &["apply", "-f", "-"],
            Some(&claim("huge", "fast", "5Gi", None)),
        )
        .err()
        .to_owned();
    assert!(err.contains("spec.limits.storage"), "{err}");
    let err = sup
        .kubectl_stdin(
            &["apply", "-f", "-"],
            Some(&claim("slowly", "slow", "1Gi", None)),
        )
        .err()
        .to_owned();
    assert!(
        err.contains("StorageClass \"slow\" is not allowed"),
        "{err}"
    );
    assert_eq!(volumes(&control).len(), before);
    assert!(get(&sup, &["pvc", "huge", "-n", "team"]).is_none());
    let err = sup
        .kubectl_stdin(
            &["apply", "-f", "-"],
            Some("apiVersion: storage.k8s.io/v1\nkind: StorageClass\nmetadata: {name: odd}\nprovisioner: csi.slipway.dev\nparameters: {replicas: \"3\"}\n"),
        )
        .err()
        .to_owned();
    assert!(
        err.contains("parameters.replicas") && err.contains("unknown parameter"),
        "{err}"
    );

    // Attached to the team's host: exactly that host opens it.
    let hva = "apiVersion: slipway.dev/v1alpha1\nkind: HostVolumeAttachment\nmetadata: {name: data-h0, namespace: team}\nspec: {claim: data, host: team-c1-workers-0}\n";
    sup.kubectl_stdin(&["apply", "-f", "-"], Some(hva)).ok();
    let status = wait_for("attached", Duration::from_secs(30), || {
        let a = get(&sup, &["hostvolumeattachments", "data-h0", "-n", "team"])?;
        (a["status"]["attached"] == true).then(|| a["status"].clone())
    });
    assert_eq!(
        status["attachmentMetadata"]["nbdAddress"],
        format!("tcp:127.0.0.1:{port}")
    );
    assert_eq!(
        status["attachmentMetadata"]["nbdClient"],
        host_nbd_client("team-c1-workers-0")
    );
    assert!(
        opens(&team_host, port, &vol),
        "the attached host was refused"
    );
    assert!(
        !opens(&other_host, port, &vol),
        "a second host opened the export"
    );
    // Another namespace's host cannot be attached; the refusal names it.
    let bad = "apiVersion: slipway.dev/v1alpha1\nkind: HostVolumeAttachment\nmetadata: {name: data-x, namespace: team}\nspec: {claim: data, host: other-c2-workers-0}\n";
    sup.kubectl_stdin(&["apply", "-f", "-"], Some(bad)).ok();
    let err = wait_for("refused attachment", Duration::from_secs(30), || {
        let a = get(&sup, &["hostvolumeattachments", "data-x", "-n", "team"])?;
        a["status"]["error"].as_str().map(str::to_owned)
    });
    assert!(
        err.contains("serves no Cluster of namespace \"team\""),
        "{err}"
    );
    assert!(!opens(&other_host, port, &vol));

    // A supervisor restarted at this point finds everything again: nothing is made twice.
    let made = volumes(&control).len();
    let mut sup = sup;
    sup.restart();
    // Growth: the claim asks for more, the volume and PV follow.
    sup.kubectl(&[
        "patch",
        "pvc",
        "data",
        "-n",
        "team",
        "--type",
        "merge",
        "-p",
        r#"{"spec":{"resources":{"requests":{"storage":"2Gi"}}}}"#,
    ])
    .ok();
    wait_for("grown", Duration::from_secs(30), || {
        volumes(&control)
            .iter()
            .any(|v| v.name == vol && v.size == 2 * GI)
            .then_some(())
    });
    wait_for("PV grown", Duration::from_secs(30), || {
        let pv = get(&sup, &["pv", &vol])?;
        let want = (2 * GI).to_string();
        (pv["spec"]["capacity"]["storage"].as_str() == Some(want.as_str())).then_some(())
    });
    assert_eq!(
        volumes(&control).len(),
        made,
        "a restarted reconciler made a volume again"
    );
    assert!(
        opens(&team_host, port, &vol),
        "the restart lost the attachment"
    );

    // A clone of the claim (within the 4Gi limit: 2Gi + 2Gi).
    sup.kubectl_stdin(
        &["apply", "-f", "-"],
        Some(&claim("copy", "fast", "2Gi", Some("data"))),
    )
    .ok();
    let copy = wait_for("clone bound", Duration::from_secs(30), || {
        let c = get(&sup, &["pvc", "copy", "-n", "team"])?;
        (c["status"]["phase"] == "Bound")
            .then(|| c["spec"]["volumeName"].as_str().map(str::to_owned))
            .flatten()
    });
    let info = volumes(&control);
    let c = info.iter().find(|v| v.name == copy).expect("clone");
    assert_eq!(
        c.origin.as_deref(),
        Some(format!("{vol}@clone.{copy}").as_str())
    );

    // Detach: the host is off the list once the attachment is gone.
    sup.kubectl(&[
        "delete",
        "hostvolumeattachment",
        "data-h0",
        "-n",
        "team",
        "--wait=true",
    ])
    .ok();
    wait_for("de-authorised", Duration::from_secs(30), || {
        volumes(&control)
            .iter()
            .any(|v| v.name == vol && v.clients == vec![NO_CLIENT.to_owned()])
            .then_some(())
    });
    assert!(
        !opens(&team_host, port, &vol),
        "a detached host still opens it"
    );

    // Deleting the claims deletes their volumes and PVs.
    sup.kubectl(&["delete", "hostvolumeattachment", "data-x", "-n", "team"])
        .ok();
    sup.kubectl(&["delete", "pvc", "copy", "data", "-n", "team", "--wait=true"])
        .ok();
    wait_for("volumes gone", Duration::from_secs(30), || {
        volumes(&control).is_empty().then_some(())
    });
    wait_for("PVs gone", Duration::from_secs(30), || {
        let pvs = get(&sup, &["pv"])?;
        pvs["items"]
            .as_array()
            .is_some_and(Vec::is_empty)
            .then_some(())
    });
}
