//! Real NBD clients (qemu-img, qemu-io, nbdinfo, nbdcopy, fio) against a real server process.

mod common;

use common::{ServerProc, TempDir, qemu_io, qemu_io_ro, run, run_status};
use slipway_blockstore::control::ControlRequest;

const MIB: u64 = 1 << 20;

fn map_lines(uri: &str) -> Vec<(u64, u64, u32)> {
    run("nbdinfo", &["--map", uri])
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            Some((
                f.first()?.parse().ok()?,
                f.get(1)?.parse().ok()?,
                f.get(2)?.parse().ok()?,
            ))
        })
        .collect()
}

#[test]
fn qemu_nbdinfo_nbdcopy_and_fio_interoperate() {
    let dir = TempDir::new("interop");
    let srv = ServerProc::start(dir.path());
    srv.create("vol", 64 * MIB);
    let uri = srv.uri("vol");

    // qemu-img info over the Unix socket and over TCP.
    let info = run("qemu-img", &["info", &uri]);
    assert!(
        info.contains("virtual size: 64 MiB (67108864 bytes)"),
        "{info}"
    );
    let tcp_uri = format!("nbd://{}/vol", srv.tcp);
    let info = run("qemu-img", &["info", &tcp_uri]);
    assert!(info.contains("67108864 bytes"), "{info}");

    // nbdinfo: list, and a fresh thin volume is one hole.
    let list = run(
        "nbdinfo",
        &[
            "--list",
            &format!("nbd+unix:///?socket={}", srv.unix.display()),
        ],
    );
    assert!(list.contains("export=\"vol\""), "{list}");
    assert!(
        list.contains("can_multi_conn: true") || list.contains("vol"),
        "{list}"
    );
    assert_eq!(map_lines(&uri), vec![(0, 64 * MIB, 3)]);

    // qemu-io with pattern verification: write, read back, discard, write zeroes.
    qemu_io(
        &uri,
        &[
            "write -P 0xab 0 1M",
            "write -P 0xcd 3M 100k",
            "read -P 0xab 0 1M",
            "read -P 0xcd 3M 100k",
            "discard 128k 128k",
            "read -P 0 128k 128k",
            "read -P 0xab 256k 768k",
            "write -z 512k 64k",
            "read -P 0 512k 64k",
            "write -z -u 2M 1M",
            "read -P 0 2M 1M",
            "read -P 0 1M 2M",
        ],
    );
    // A mismatching pattern must be detected (proves the checks above can fail).
    let (_, out) = run_status("qemu-io", &["-f", "raw", "-c", "read -P 0x11 0 4k", &uri]);
    assert!(out.contains("Pattern verification failed"), "{out}");

    // Block status: holes where never written and where trimmed.
    let map = map_lines(&uri);
    assert!(
        map.contains(&(128 * 1024, 128 * 1024, 3)),
        "trimmed range not a hole: {map:?}"
    );
    assert!(map.iter().any(|&(o, _, f)| o == 0 && f == 0), "{map:?}");
    assert_eq!(map.last().map(|m| m.2), Some(3), "{map:?}");
    let allocated: u64 = map.iter().filter(|m| m.2 == 0).map(|m| m.1).sum();
    assert!(
        allocated <= 2 * MIB,
        "thin volume allocated {allocated} bytes"
    );

    // nbdcopy a file in and out, compare checksums (byte equality).
    let src = dir.path().join("in.img");
    let mut rng = common::Rng(0x5eed);
    let mut content = vec![0u8; (24 * MIB) as usize];
    rng.fill(&mut content);
    content[(4 * MIB) as usize..(6 * MIB) as usize].fill(0);
    std::fs::write(&src, &content).expect("write source");
    run("nbdcopy", &[src.to_str().expect("utf8"), &uri]);
    let dst = dir.path().join("out.img");
    run("nbdcopy", &[&uri, dst.to_str().expect("utf8")]);
    let back = std::fs::read(&dst).expect("read copy");
    assert_eq!(back.len() as u64, 64 * MIB);
    assert!(
        back[..content.len()] == content[..],
        "nbdcopy round trip differs"
    );

    // qemu-img convert into the export, then compare.
    let raw = dir.path().join("conv.img");
    let mut content2 = vec![0u8; (8 * MIB) as usize];
    rng.fill(&mut content2);
    std::fs::write(&raw, &content2).expect("write raw");
    run(
        "qemu-img",
        &["resize", "-f", "raw", raw.to_str().expect("utf8"), "64M"],
    );
    run(
        "qemu-img",
        &[
            "convert",
            "-n",
            "-f",
            "raw",
            "-O",
            "raw",
            raw.to_str().expect("utf8"),
            &uri,
        ],
    );
    let cmp = run(
        "qemu-img",
        &[
            "compare",
            "-f",
            "raw",
            "-F",
            "raw",
            raw.to_str().expect("utf8"),
            &uri,
        ],
    );
    assert!(cmp.contains("Images are identical"), "{cmp}");

    // fio's nbd engine with crc32c verification, 2 connections' worth of jobs.
    let fio = run(
        "fio",
        &[
            "--name=verify",
            "--ioengine=nbd",
            &format!("--uri={uri}"),
            "--rw=randwrite",
            "--bs=4k",
            "--size=8M",
            "--iodepth=16",
            "--verify=crc32c",
            "--do_verify=1",
            "--verify_fatal=1",
            // fio would otherwise write a verify state file into the working directory.
            "--verify_state_save=0",
            "--output-format=terse",
            "--terse-version=3",
        ],
    );
    // Terse v3: field 5 is the error code.
    let fields: Vec<&str> = fio.trim().split(';').collect();
    assert_eq!(fields.get(4), Some(&"0"), "fio reported an error: {fio}");

    // Metrics count what happened.
    let body = http_get(&srv.metrics);
    assert!(
        body.contains("slipway_nbd_requests_total{export=\"vol\",op=\"write\"}"),
        "{body}"
    );
    assert!(
        body.contains("slipway_nbd_request_duration_seconds_bucket"),
        "{body}"
    );
    assert!(!srv.log().contains("panicked"), "{}", srv.log());
}

fn http_get(addr: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).expect("connect metrics");
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .expect("send");
    let mut out = String::new();
    s.read_to_string(&mut out).expect("read");
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    out
}

#[test]
fn snapshots_clones_resize_delete_and_restart() {
    let dir = TempDir::new("snap");
    let mut srv = ServerProc::start(dir.path());
    srv.create("v", 16 * MIB);
    let v = srv.uri("v");
    qemu_io(&v, &["write -P 0xaa 0 2M", "write -P 0x77 8M 1M"]);
    srv.control(ControlRequest::Snapshot {
        volume: "v".into(),
        name: "s1".into(),
    })
    .expect("snapshot");
    // Writes after the snapshot don't show in it.
    qemu_io(&v, &["write -P 0xbb 0 1M", "write -P 0xbc 1536k 4k"]);
    let s1 = srv.uri("v@s1");
    qemu_io_ro(
        &s1,
        &["read -P 0xaa 0 2M", "read -P 0x77 8M 1M", "read -P 0 2M 6M"],
    );
    qemu_io(
        &v,
        &[
            "read -P 0xbb 0 1M",
            "read -P 0xaa 1M 512k",
            "read -P 0xbc 1536k 4k",
        ],
    );
    // Snapshots are read-only.
    let (ok, out) = run_status("qemu-io", &["-f", "raw", "-c", "write -P 1 0 4k", &s1]);
    assert!(!ok && out.contains("Permission denied"), "{out}");
    let info = run("nbdinfo", &[&s1]);
    assert!(info.contains("is_read_only: true"), "{info}");

    // A clone starts as the snapshot and is independent of it and of the volume.
    srv.control(ControlRequest::Clone {
        snapshot: "v@s1".into(),
        name: "c".into(),
    })
    .expect("clone");
    let c = srv.uri("c");
    qemu_io(
        &c,
        &[
            "read -P 0xaa 0 2M",
            "write -P 0xcc 64k 64k",
            "read -P 0xcc 64k 64k",
        ],
    );
    qemu_io(&v, &["read -P 0xbb 0 1M"]);
    qemu_io_ro(&s1, &["read -P 0xaa 0 2M"]);
    qemu_io(&c, &["read -P 0xaa 0 64k", "read -P 0xaa 128k 1M"]);

    // Grow online: a new connection sees the new size, old data intact, new space zero.
    srv.control(ControlRequest::Resize {
        name: "v".into(),
        size: 32 * MIB,
    })
    .expect("resize");
    let info = run("qemu-img", &["info", &v]);
    assert!(info.contains("virtual size: 32 MiB"), "{info}");
    qemu_io(
        &v,
        &[
            "read -P 0 16M 16M",
            "write -P 0xdd 30M 1M",
            "read -P 0x77 8M 1M",
        ],
    );
    assert!(
        srv.control(ControlRequest::Resize {
            name: "v".into(),
            size: 8 * MIB
        })
        .is_err_and(|e| e.contains("shrink"))
    );

    // Deleting a snapshot with a clone is refused, unless cascading.
    let err = srv
        .control(ControlRequest::Delete {
            name: "v@s1".into(),
            cascade: false,
        })
        .expect_err("delete must be refused");
    assert!(
        err.contains("dependent clones") && err.contains("\"c\""),
        "{err}"
    );
    let resp = srv
        .control(ControlRequest::Delete {
            name: "v@s1".into(),
            cascade: true,
        })
        .expect("cascade delete");
    assert_eq!(resp.deleted, vec!["c".to_owned(), "v@s1".to_owned()]);
    // The volume keeps every byte it had through the snapshot layer that was merged away.
    qemu_io(
        &v,
        &[
            "read -P 0xbb 0 1M",
            "read -P 0xaa 1M 512k",
            "read -P 0xbc 1536k 4k",
            "read -P 0x77 8M 1M",
            "read -P 0xdd 30M 1M",
        ],
    );

    // Restart: catalog and data persist.
    srv.kill9();
    drop(srv);
    let srv = ServerProc::start(dir.path());
    let list = srv.control(ControlRequest::List {}).expect("list");
    let names: Vec<&str> = list.volumes.iter().map(|v| v.name.as_str()).collect();
    assert_eq!(names, ["v"]);
    assert_eq!(list.volumes[0].size, 32 * MIB);
    let v = srv.uri("v");
    qemu_io(
        &v,
        &[
            "read -P 0xbb 0 1M",
            "read -P 0xaa 1M 512k",
            "read -P 0x77 8M 1M",
            "read -P 0xdd 30M 1M",
        ],
    );

    // The CLI front end talks to the same API.
    let out = run(
        env!("CARGO_BIN_EXE_slipway-nbd"),
        &[
            "volume",
            "list",
            "--control",
            srv.control.to_str().expect("utf8"),
        ],
    );
    assert!(out.contains("v ") && out.contains("33554432"), "{out}");
    let (ok, out) = run_status(
        env!("CARGO_BIN_EXE_slipway-nbd"),
        &[
            "volume",
            "delete",
            "nope",
            "--control",
            srv.control.to_str().expect("utf8"),
        ],
    );
    assert!(!ok && out.contains("not found"), "{out}");
}
