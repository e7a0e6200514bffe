//! TLS on the TCP listener (NBD_OPT_STARTTLS, client certificates) and per-export client
//! allow-lists, with real clients: qemu-io (GnuTLS) and nbdinfo (libnbd).

mod common;

use std::path::Path;

use common::{Client, ServerOpts, ServerProc, TempDir, qemu_io, run_status};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use slipway_blockstore::control::ControlRequest;

const MIB: u64 = 1 << 20;

/// A test CA that signs server and client certificates.
struct Ca {
    issuer: Issuer<'static, KeyPair>,
    pem: String,
}

impl Ca {
    fn new(name: &str) -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let key = KeyPair::generate().expect("CA key");
        let pem = params.self_signed(&key).expect("CA cert").pem();
        Self {
            issuer: Issuer::new(params, key),
            pem,
        }
    }

    /// (certificate PEM, key PEM) for `names` (DNS names or IP addresses).
    fn issue(&self, names: &[&str], usage: ExtendedKeyUsagePurpose) -> (String, String) {
        let names: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
        let mut params = CertificateParams::new(names.clone()).expect("params");
        params
            .distinguished_name
            .push(DnType::CommonName, &names[0]);
        params.extended_key_usages = vec![usage];
        let key = KeyPair::generate().expect("key");
        let cert = params.signed_by(&key, &self.issuer).expect("sign");
        (cert.pem(), key.serialize_pem())
    }

    /// A credentials directory as qemu (tls-creds-x509) and libnbd (tls-certificates) read
    /// it: ca-cert.pem, client-cert.pem, client-key.pem.
    fn client_dir(&self, dir: &Path, sub: &str, name: &str, trust: &str) -> String {
        let d = dir.join(sub);
        std::fs::create_dir_all(&d).expect("creds dir");
        let (cert, key) = self.issue(&[name], ExtendedKeyUsagePurpose::ClientAuth);
        std::fs::write(d.join("ca-cert.pem"), trust).expect("write");
        std::fs::write(d.join("client-cert.pem"), cert).expect("write");
        std::fs::write(d.join("client-key.pem"), key).expect("write");
        d.to_str().expect("utf8").to_owned()
    }
}

/// qemu-io over TLS to `export` on `port`, as the client whose credentials are in `creds`.
fn qemu_io_tls(creds: &str, port: &str, export: &str, cmds: &[&str]) -> (bool, String) {
    let object = format!("tls-creds-x509,id=tls0,endpoint=client,dir={creds}");
    let image = format!(
        "driver=nbd,server.type=inet,server.host=localhost,server.port={port},export={export},tls-creds=tls0"
    );
    let mut args = vec!["--object", &object, "--image-opts"];
    for c in cmds {
        args.push("-c");
        args.push(c);
    }
    args.push(&image);
    // A reply left unsent would hang the client: a deadline makes that a failure.
    let mut timed = vec!["60", "qemu-io"];
    timed.extend(args);
    let (ok, out) = run_status("timeout", &timed);
    (ok && !out.contains("failed") && !out.contains("error"), out)
}

#[test]
fn tls_clients_open_only_the_exports_they_are_authorised_for() {
    let dir = TempDir::new("tls");
    let ca = Ca::new("slipway test CA");
    let (cert, key) = ca.issue(
        &["localhost", "127.0.0.1"],
        ExtendedKeyUsagePurpose::ServerAuth,
    );
    let files = dir.path().join("server");
    std::fs::create_dir_all(&files).expect("dir");
    for (name, body) in [("cert.pem", &cert), ("key.pem", &key), ("ca.pem", &ca.pem)] {
        std::fs::write(files.join(name), body).expect("write");
    }
    let path = |n: &str| files.join(n).to_str().expect("utf8").to_owned();
    let opts = ServerOpts {
        args: vec![
            "--tls-cert".into(),
            path("cert.pem"),
            "--tls-key".into(),
            path("key.pem"),
            "--tls-client-ca".into(),
            path("ca.pem"),
        ],
        ..ServerOpts::in_dir(dir.path())
    };
    let srv = ServerProc::spawn(dir.path(), opts).expect("start with TLS");
    let port = srv.tcp.rsplit(':').next().expect("port").to_owned();
    srv.create("secret", 4 * MIB);
    srv.create("open", MIB);
    srv.create("bulk", 32 * MIB);
    srv.control(ControlRequest::Authorize {
        name: "secret".into(),
        clients: vec!["host-a.zone-1".into()],
    })
    .expect("authorize");
    // A bad client name is refused, naming the field.
    let err = srv
        .control(ControlRequest::Authorize {
            name: "secret".into(),
            clients: vec!["not a name!".into()],
        })
        .expect_err("bad client name accepted");
    assert!(err.contains("clients"), "{err}");

    let host_a = ca.client_dir(dir.path(), "a", "host-a.zone-1", &ca.pem);
    let host_b = ca.client_dir(dir.path(), "b", "host-b.zone-1", &ca.pem);
    // The authorised host writes and reads over TLS.
    let (ok, out) = qemu_io_tls(
        &host_a,
        &port,
        "secret",
        &["write -P 0xab 0 64k", "read -P 0xab 0 64k"],
    );
    assert!(ok, "authorised client refused:\n{out}");
    // Replies larger than the socket buffers (16 MiB, one request each way) arrive whole: the
    // TLS layer's last records are flushed, not left waiting for another write.
    let (ok, out) = qemu_io_tls(
        &host_b,
        &port,
        "bulk",
        &[
            "write -P 0xcd 0 16M",
            "read -P 0xcd 0 16M",
            "read -P 0xcd 4k 8M",
        ],
    );
    assert!(ok, "large transfers over TLS:\n{out}");
    // Another host of the same CA cannot open it, but opens an export with no allow-list.
    let (ok, out) = qemu_io_tls(&host_b, &port, "secret", &["read 0 4k"]);
    assert!(!ok, "unauthorised client opened the export:\n{out}");
    let (ok, out) = qemu_io_tls(&host_b, &port, "open", &["read -P 0 0 4k"]);
    assert!(ok, "{out}");
    // Its snapshot carries the same allow-list.
    srv.control(ControlRequest::Snapshot {
        volume: "secret".into(),
        name: "s".into(),
    })
    .expect("snapshot");
    let (ok, out) = qemu_io_tls(&host_b, &port, "secret@s", &["read 0 4k"]);
    assert!(!ok, "unauthorised client opened the snapshot:\n{out}");
    // nbdinfo (libnbd) over TLS: host-a sees both exports, host-b only the open one.
    let list = |creds: &str| {
        run_status(
            "nbdinfo",
            &[
                "--list",
                &format!("nbds://localhost:{port}/?tls-certificates={creds}"),
            ],
        )
    };
    let (ok, out) = list(&host_a);
    assert!(ok && out.contains("export=\"secret\""), "{out}");
    let (ok, out) = list(&host_b);
    assert!(
        ok && out.contains("export=\"open\"") && !out.contains("\"secret\""),
        "{out}"
    );
    // Without TLS the TCP listener refuses every export.
    let (ok, out) = run_status(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "read 0 4k",
            &format!("nbd://127.0.0.1:{port}/open"),
        ],
    );
    assert!(!ok, "plain TCP client served:\n{out}");
    // A certificate from another CA, even one naming an authorised host, fails the TLS
    // handshake.
    let rogue = Ca::new("rogue CA");
    // (The client trusts both CAs, so it gets as far as the server's check.)
    let both = format!("{}{}", ca.pem, rogue.pem);
    let mallory = rogue.client_dir(dir.path(), "mallory", "host-a.zone-1", &both);
    for export in ["open", "secret"] {
        let (ok, out) = qemu_io_tls(&mallory, &port, export, &["read 0 4k"]);
        assert!(!ok, "client with a foreign certificate served:\n{out}");
    }
    // The local Unix socket is trusted by its permissions: no TLS, no allow-list.
    qemu_io(&srv.uri("secret"), &["read -P 0xab 0 64k"]);
    let mut c = Client::connect(&srv.unix, "secret", true).expect("local client");
    assert_eq!(c.read(0, 512), Ok(vec![0xab; 512]));
    // The two failed TLS handshakes are counted (the server counts after the client saw
    // the alert: poll).
    let failed = || {
        http_get(&srv.metrics)
            .lines()
            .find_map(|l| l.strip_prefix("slipway_nbd_handshakes_total{result=\"tls_failed\"} "))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or(0)
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while failed() < 2 && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert_eq!(failed(), 2);
    let log = srv.log();
    assert!(!log.contains("panicked"), "{log}");
}

fn http_get(addr: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).expect("connect metrics");
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .expect("send");
    let mut out = String::new();
    s.read_to_string(&mut out).expect("read");
    out
}
