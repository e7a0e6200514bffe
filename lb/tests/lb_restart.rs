//! The daemon as a real process (`slipway-lb`), killed with SIGKILL and stopped with SIGTERM
//! under traffic: the pinned datapath keeps serving while it is down, and a restarted daemon
//! knows every service it served (status, VIP allocation, delete). Privileged (root, BPF,
//! netns): run by scripts/test.sh.

use std::net::{IpAddr, Ipv4Addr};
use std::process::Command;
use std::time::Duration;

use slipway_lb::config::ServiceSpec;
use slipway_lb::status::Status;
use slipway_lb::world::{ECHO_PORT, EchoStream, LbWorld, wait_for};

const BIN: &str = env!("CARGO_BIN_EXE_slipway-lb");

fn spec(name: &str, port: u16, backends: &[Ipv4Addr]) -> ServiceSpec {
    let backends: Vec<IpAddr> = backends.iter().map(|ip| (*ip).into()).collect();
    ServiceSpec::tcp("default", name, port, &backends)
}

/// `slipway-lb <args>`; fails unless it exits 0. Returns stdout.
fn lb_cli(args: &[&str]) -> String {
    let out = Command::new(BIN)
        .args(args)
        .output()
        .expect("run slipway-lb");
    assert!(
        out.status.success(),
        "slipway-lb {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `slipway-lb status --json`, as an operator reads it.
fn cli_status(w: &LbWorld) -> Status {
    let socket = w.config().socket.display().to_string();
    serde_json::from_str(&lb_cli(&["status", "--json", "--socket", &socket])).expect("status")
}

/// Waits until every stream made `rounds` more round trips.
fn progress(streams: &[EchoStream], what: &str) {
    let before: Vec<u64> = streams.iter().map(EchoStream::rounds).collect();
    wait_for(what, Duration::from_secs(10), || {
        streams
            .iter()
            .zip(&before)
            .all(|(s, b)| s.rounds() >= b + 10)
            .then_some(())
    })
    .expect(what);
}

fn answered_by(w: &LbWorld, vip: IpAddr, count: usize) -> Vec<String> {
    LbWorld::curl(w.client(), &format!("http://{vip}"), count).expect("curl")
}

#[test]
#[cfg_attr(
    not(feature = "privileged"),
    ignore = "privileged: root + BPF + netns; run scripts/test.sh"
)]
fn the_datapath_serves_while_the_daemon_is_down_and_a_restarted_daemon_knows_its_services() {
    let mut w = LbWorld::new(3).expect("world");
    for i in 0..3 {
        w.start_nginx(i).expect("nginx");
        w.start_echo(i).expect("echo");
    }
    let ips = w.backend_ips();
    w.start_daemon_process(BIN).expect("daemon process");
    let web = w.api().apply(&spec("web", 80, &ips)).expect("web");
    let echo = w.api().apply(&spec("echo", ECHO_PORT, &ips)).expect("echo");
    let streams: Vec<EchoStream> = (0..6)
        .map(|_| EchoStream::open(w.client(), echo).expect("stream"))
        .collect();
    assert_eq!(answered_by(&w, web, 20).len(), 20);

    // kill -9: new connections and open streams carry on through the pinned link and maps.
    w.kill_daemon().expect("kill -9");
    assert!(w.api().status().is_err(), "the daemon is gone");
    assert_eq!(
        answered_by(&w, web, 30).len(),
        30,
        "new connections while down"
    );
    progress(&streams, "streams progress while the daemon is killed");

    // The restarted daemon knows both services and their VIPs.
    w.start_daemon_process(BIN).expect("restart");
    let status = cli_status(&w);
    let listed: Vec<(&str, IpAddr)> = status
        .services
        .iter()
        .map(|s| (s.name.as_str(), s.vip))
        .collect();
    assert_eq!(listed, [("default/echo", echo), ("default/web", web)]);
    assert_eq!(status.pools[0].used, 2, "{:?}", status.pools);
    assert!(status.services.iter().all(|s| s.backends.len() == 3));

    // A new service gets a free VIP, not a live one, and answers from its own backend.
    let new = w.api().apply(&spec("new", 80, &ips[..1])).expect("new");
    assert!(new != web && new != echo, "{new} is live");
    let lines = answered_by(&w, new, 10);
    assert_eq!(lines.len(), 10);
    assert!(
        lines.iter().all(|l| l.starts_with(&format!("{} ", ips[0]))),
        "{lines:?}"
    );

    // An old service is deleted, and its VIP stops answering.
    lb_cli(&[
        "delete",
        "default/web",
        "--socket",
        &w.config().socket.display().to_string(),
    ]);
    assert!(
        cli_status(&w)
            .services
            .iter()
            .all(|s| s.name != "default/web")
    );
    w.client()
        .ip(&["neigh", "flush", "dev", "eth0"])
        .expect("flush");
    assert!(
        answered_by(&w, web, 1).is_empty(),
        "a deleted VIP is not served"
    );

    // SIGTERM (an upgrade) leaves the datapath attached too.
    w.stop_daemon().expect("SIGTERM, exit 0");
    assert_eq!(
        answered_by(&w, new, 20).len(),
        20,
        "new connections while stopped"
    );
    progress(&streams, "streams progress while the daemon is stopped");
    for s in streams {
        let backend = s.backend();
        let report = s.finish().expect("report");
        assert_eq!(report.error, None, "stream to {backend}: {report:?}");
    }

    // Teardown removes the links (the program detaches) and the maps.
    let config = w.config().clone();
    let path = std::env::temp_dir().join(format!("{}-lb.json", w.world().name()));
    std::fs::write(&path, serde_json::to_vec(&config).expect("json")).expect("config");
    let out = lb_cli(&["teardown", "--config", &path.display().to_string()]);
    let _ = std::fs::remove_file(&path);
    let pins = config.pin_dir.expect("pin dir");
    assert!(out.contains("link_tc_eth0"), "{out}");
    assert!(!pins.exists(), "{} left behind", pins.display());
    assert!(
        !config
            .state_dir
            .join(slipway_lb::state::STATE_FILE)
            .exists(),
        "state forgotten"
    );
    // A program still attached would serve on from its (unpinned but referenced) maps.
    assert!(
        answered_by(&w, new, 1).is_empty(),
        "nothing serves after teardown: the program is detached"
    );
}

#[test]
#[cfg_attr(
    not(feature = "privileged"),
    ignore = "privileged: root + BPF + netns; run scripts/test.sh"
)]
fn the_xdp_datapath_serves_on_while_the_daemon_is_killed() {
    use slipway_lb::datapath::{AttachPoint, XdpMode};
    let mut w = LbWorld::with_attach(2, AttachPoint::Xdp(XdpMode::Skb)).expect("world");
    // bpf_fib_lookup() in the XDP program wants forwarding on the device.
    w.lb()
        .sysctl(&["net.ipv4.conf.eth0.forwarding=1"])
        .expect("forwarding");
    for i in 0..2 {
        w.start_nginx(i).expect("nginx");
    }
    let ips = w.backend_ips();
    w.start_daemon_process(BIN).expect("daemon process");
    let vip = w.api().apply(&spec("web", 80, &ips)).expect("web");
    assert_eq!(answered_by(&w, vip, 20).len(), 20);
    w.kill_daemon().expect("kill -9");
    let link = w
        .lb()
        .ip(&["-d", "link", "show", "dev", "eth0"])
        .expect("link");
    assert!(link.contains("xdpgeneric"), "the XDP program stays: {link}");
    assert_eq!(
        answered_by(&w, vip, 30).len(),
        30,
        "new connections while down"
    );
    w.start_daemon_process(BIN).expect("restart");
    let status = cli_status(&w);
    assert_eq!(status.services.len(), 1);
    assert_eq!(status.services[0].vip, vip);
    assert_eq!(answered_by(&w, vip, 20).len(), 20);
}
