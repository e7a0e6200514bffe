//! Storage hosts against the real kernel: a zone's storage host is a network namespace on the
//! zone's underlay whose block store serves NBD over TLS (certificates from a supervisor CA) on
//! the host's address. A host of the zone opens an export it is authorised on and a second host
//! is refused (qemu-io inside each host's namespace); the block store, killed, is started again
//! with its volumes and data.
//!
//! Needs `cargo build -p slipway-blockstore --bin slipway-nbd` first; root.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use slipway_api::volumes::host_nbd_client;
use slipway_blockstore::control::{self, ControlRequest};
use slipway_hosts::netns::{NetnsConfig, NetnsProvider};
use slipway_hosts::storage::{StorageHosts, StorageSettings, host_name};
use slipway_hosts::{HostProvider, HostSpec};
use slipway_supervisor::auth::issue_host_identity;
use slipway_supervisor::tls::{ADMIN_DAYS, Pki};

/// Tears down everything the test's provider made, also on panic.
struct Teardown(Arc<NetnsProvider>);

impl Drop for Teardown {
    fn drop(&mut self) {
        let provider = Arc::clone(&self.0);
        let joined = std::thread::spawn(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime")
                .block_on(provider.teardown())
        })
        .join();
        if let Ok(Err(e)) = joined {
            eprintln!("teardown: {e}");
        }
    }
}

fn nbd_binary() -> PathBuf {
    let exe = std::env::current_exe().expect("test binary");
    let bin = exe
        .parent()
        .and_then(Path::parent)
        .expect("target dir")
        .join("slipway-nbd");
    assert!(
        bin.exists(),
        "{} is missing: cargo build -p slipway-blockstore --bin slipway-nbd",
        bin.display()
    );
    bin
}

fn creds(dir: &Path, pki: &Pki, host: &str) -> String {
    let d = dir.join(format!("creds-{host}"));
    std::fs::create_dir_all(&d).expect("dir");
    let (cert, key) = issue_host_identity(pki, host, ADMIN_DAYS).expect("client certificate");
    std::fs::copy(pki.ca_cert(), d.join("ca-cert.pem")).expect("ca");
    std::fs::write(d.join("client-cert.pem"), cert).expect("write");
    std::fs::write(d.join("client-key.pem"), key).expect("write");
    d.display().to_string()
}

/// qemu-io inside network namespace `netns` as the host of `creds`: (success, output).
fn qemu_io_in(netns: &str, creds: &str, nbd: &str, export: &str, cmds: &[&str]) -> (bool, String) {
    let (host, port) = nbd
        .trim_start_matches("tcp:")
        .rsplit_once(':')
        .expect("tcp:HOST:PORT");
    let object = format!("tls-creds-x509,id=tls0,endpoint=client,dir={creds}");
    let image = format!(
        "driver=nbd,server.type=inet,server.host={host},server.port={port},export={export},tls-creds=tls0"
    );
    let mut args = vec![
        "netns",
        "exec",
        netns,
        "qemu-io",
        "--object",
        &object,
        "--image-opts",
    ];
    for c in cmds {
        args.push("-c");
        args.push(c);
    }
    args.push(&image);
    let out = Command::new("ip")
        .args(&args)
        .output()
        .expect("ip netns exec");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("qemu-io in {netns}: {text}");
    (
        out.status.success() && !text.contains("failed") && !text.contains("error"),
        text,
    )
}

#[tokio::test]
#[cfg_attr(
    not(feature = "privileged"),
    ignore = "privileged: network namespaces, cgroups; run scripts/test.sh"
)]
async fn a_zone_storage_host_serves_its_hosts_over_tls_and_survives_a_kill() {
    let dir = tempfile::Builder::new()
        .prefix("slipway-storage-")
        .tempdir()
        .expect("temp dir");
    let prefix = format!("slipway-s{:05x}-", std::process::id() & 0xf_ffff);
    let mut config = NetnsConfig::new(prefix, dir.path().join("state"), &["zone-a"]);
    config.stop_grace = Duration::from_secs(2);
    let provider = Arc::new(NetnsProvider::new(config).expect("provider"));
    let _teardown = Teardown(Arc::clone(&provider));
    let pki = Pki::new(&dir.path().join("sup"));
    pki.ensure(&[]).expect("CA");
    let issuer = pki.clone();
    let storage = StorageHosts::new(
        Arc::clone(&provider),
        StorageSettings {
            command: vec![nbd_binary().display().to_string(), "serve".into()],
            root: dir.path().join("storage"),
            client_ca: pki.ca_cert(),
            issue_server: Arc::new(move |names: &[String]| {
                issuer.issue_server(names, ADMIN_DAYS).map_err(Into::into)
            }),
            cpu_millis: 500,
            memory_bytes: 256 << 20,
        },
    );
    let store = storage.ensure("zone-a").await.expect("storage host");
    // Asking again finds it serving: the same answer, no second block store.
    assert_eq!(storage.ensure("zone-a").await.expect("again"), store);
    let storage_host = provider
        .status(&host_name("zone-a"))
        .await
        .expect("storage host status");
    assert!(
        store.nbd.contains(&storage_host.handle.address.to_string()),
        "{store:?} is not on the host's address"
    );
    let call = |req: ControlRequest| {
        let control = store.control.clone();
        async move { control::call(&control, &req).await.expect("control") }
    };
    call(ControlRequest::Create {
        name: "v".into(),
        size: 64 << 20,
    })
    .await;
    call(ControlRequest::Authorize {
        name: "v".into(),
        clients: vec![host_nbd_client("h1")],
    })
    .await;

    // Two hosts of the zone; only the authorised one opens the export.
    let mut made = Vec::new();
    for name in ["h1", "h2"] {
        let h = provider
            .create(&HostSpec {
                name: name.into(),
                zone: "zone-a".into(),
                cpu_millis: 250,
                memory_bytes: 128 << 20,
                data_root: dir.path().join("data"),
                agent: vec!["sleep".into(), "infinity".into()],
            })
            .await
            .expect("host");
        made.push(h);
    }
    let h1 = creds(dir.path(), &pki, "h1");
    let h2 = creds(dir.path(), &pki, "h2");
    let (ok, out) = qemu_io_in(
        &made[0].netns,
        &h1,
        &store.nbd,
        "v",
        &["write -P 0x5a 0 64k", "flush", "read -P 0x5a 0 64k"],
    );
    assert!(ok, "the authorised host was refused:\n{out}");
    let (ok, out) = qemu_io_in(&made[1].netns, &h2, &store.nbd, "v", &["read 0 4k"]);
    assert!(!ok, "a second host opened the export:\n{out}");

    // Killed, the block store is started again with its volume and data.
    let pids = provider
        .status(&host_name("zone-a"))
        .await
        .expect("status")
        .pids;
    assert!(
        !pids.is_empty(),
        "no block store process in the storage host"
    );
    for pid in pids {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while std::os::unix::net::UnixStream::connect(&store.control).is_ok() {
        assert!(
            std::time::Instant::now() < deadline,
            "the block store did not die"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(storage.ensure("zone-a").await.expect("restarted"), store);
    let list = call(ControlRequest::List {}).await;
    assert!(list.volumes.iter().any(|v| v.name == "v"), "{list:?}");
    let (ok, out) = qemu_io_in(
        &made[0].netns,
        &h1,
        &store.nbd,
        "v",
        &["read -P 0x5a 0 64k"],
    );
    assert!(ok, "data lost across the restart:\n{out}");
}
