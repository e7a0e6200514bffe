//! The test world itself: hosts reach each other over the underlay bridge, the root namespace is
//! never touched, and dropping the world, also while a panic unwinds, leaves no namespace, veth,
//! process or bpffs pin behind. Privileged (root, netns, BPF): run by scripts/test.sh.

use std::net::Ipv4Addr;
use std::panic;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use slipway_dataplane::netns;
use slipway_dataplane::pod::PodDatapath;
use slipway_dataplane::world::World;
use slipway_dataplane::world::traffic::{ping, wait_reachable};

/// Links, addresses and routes of the root namespace, as `ip` prints them.
fn root_namespace_state() -> String {
    ["link", "addr", "route"]
        .iter()
        .map(|what| {
            let out = Command::new("ip")
                .args(["-o", what, "show"])
                .output()
                .expect("ip");
            String::from_utf8_lossy(&out.stdout).into_owned()
        })
        .collect()
}

/// Alive means running: a killed child that nobody reaped yet is a zombie (state `Z`).
fn process_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => {
            stat.rsplit(')')
                .next()
                .and_then(|rest| rest.split_whitespace().next())
                != Some("Z")
        }
        Err(_) => false,
    }
}

#[test]
#[cfg_attr(
    not(feature = "privileged"),
    ignore = "privileged: root + netns; run scripts/test.sh"
)]
fn hosts_reach_each_other_over_the_underlay_only() {
    let root_before = root_namespace_state();
    let world = World::builder().hosts(3).build().expect("world");
    assert_eq!(world.hosts().len(), 3);
    for (from, to) in [(1, 2), (2, 3), (3, 1)] {
        wait_reachable(
            &world.host(from).netns,
            world.host(to).underlay_ip,
            Duration::from_secs(5),
        )
        .expect("the underlay comes up");
        let report = ping(
            &world.host(from).netns,
            world.host(to).underlay_ip,
            2,
            Duration::from_millis(10),
        )
        .expect("ping");
        assert_eq!(report.received, 2, "host {from} -> host {to}");
    }
    // The underlay is private to the world: the root namespace cannot reach it.
    let out = Command::new("ping")
        .args([
            "-n",
            "-c",
            "1",
            "-W",
            "1",
            &world.host(1).underlay_ip.to_string(),
        ])
        .output()
        .expect("ping");
    assert!(
        !out.status.success(),
        "the root namespace reached the underlay"
    );
    assert_eq!(
        root_namespace_state(),
        root_before,
        "building a world changed the root namespace"
    );
}

#[test]
#[cfg_attr(
    not(feature = "privileged"),
    ignore = "privileged: root + netns + BPF; run scripts/test.sh"
)]
fn dropping_a_world_while_panicking_leaves_nothing() {
    let root_before = root_namespace_state();
    let mut names = Vec::new();
    let mut pid = 0;
    let mut pins = PathBuf::new();

    let result = panic::catch_unwind(panic::AssertUnwindSafe(|| {
        let world = World::builder().hosts(2).build().expect("world");
        let pod = world
            .add_pod(2, "p", Ipv4Addr::new(10, 244, 2, 2))
            .expect("pod");
        let (raw_a, raw_b) = world.add_raw_pair("raw").expect("raw pair");
        let sleeper = world.host(1).netns.spawn(&["sleep", "600"]).expect("spawn");
        pid = sleeper.id().expect("pid");
        std::mem::forget(sleeper); // only the world's teardown may stop it now

        pins = world.bpffs_dir().join("pod");
        let mut dp = PodDatapath::load(Some(&pins)).expect("load");
        netns::run_in(world.host(2).netns.name(), || dp.attach(&pod.host_ifname))
            .expect("setns")
            .expect("attach");
        std::mem::forget(dp); // leak the fds too: the pins must still go with the world

        names = [
            world.underlay(),
            &world.host(1).netns,
            &world.host(2).netns,
            &pod.netns,
            &raw_a,
            &raw_b,
        ]
        .iter()
        .map(|ns| ns.name().to_owned())
        .collect();
        for name in &names {
            assert!(netns::path(name).exists(), "{name} was created");
        }
        assert!(pins.join("endpoints").exists());
        panic!("boom: unwinding must tear the world down");
    }));

    assert!(result.is_err(), "the closure panicked");
    assert_eq!(names.len(), 6);
    for name in &names {
        assert!(!netns::path(name).exists(), "namespace {name} left behind");
    }
    assert!(!pins.exists(), "bpffs pins {} left behind", pins.display());
    assert!(
        !pins.parent().expect("world dir").exists(),
        "world bpffs dir left behind"
    );
    assert!(
        !process_alive(pid),
        "process {pid} in the world survived it"
    );
    assert_eq!(
        root_namespace_state(),
        root_before,
        "the root namespace changed"
    );
}
