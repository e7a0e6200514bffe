//! The plugin's lifecycle commands against the real kernel, exec'd as a runtime does: DEL is
//! idempotent and leaves nothing, CHECK tells a healthy pod from a broken one, GC reclaims what
//! the runtime no longer lists (also after an ADD killed halfway), bad input gets the spec's
//! error code and a message naming the problem, STATUS and VERSION answer, DEL works without
//! the agent's node state, static address and MAC requests are honoured or refused.
//! Privileged (root, BPF, netns): run by scripts/test.sh.

mod common;

use std::process::Stdio;
use std::time::Duration;

use common::{Cluster, Leftovers};
use serde_json::{Value, json};
use slipway_dataplane::netns;
use slipway_dataplane::node::{NodeMaps, Pins};

fn path_of(ns: &slipway_dataplane::world::Netns) -> String {
    netns::path(ns.name()).display().to_string()
}

#[test]
#[cfg_attr(
    not(feature = "privileged"),
    ignore = "privileged: root + BPF + netns; run scripts/test.sh"
)]
fn del_is_idempotent_and_leaves_nothing() {
    let cluster = Cluster::new(1, "vxlan");
    let a = cluster.add_pod(1, "a");
    let during = cluster.leftovers(1);
    assert_eq!(
        (
            during.veths.len(),
            during.allocations.len(),
            during.endpoints,
            during.pins.len()
        ),
        (1, 1, vec![a.ip], 1)
    );
    assert_eq!(during.routes, [a.ip.to_string()], "host route to the pod");

    cluster.del_pod(&a).expect_ok("DEL");
    assert_eq!(cluster.leftovers(1), Leftovers::default());
    cluster.del_pod(&a).expect_ok("repeated DEL");
    let conf = cluster.conf(1);
    cluster
        .cni(
            1,
            "DEL",
            &a.container_id,
            Some("/run/netns/no-such-netns"),
            &conf,
        )
        .expect_ok("DEL, netns gone");
    cluster
        .cni(1, "DEL", "never-added", None, &conf)
        .expect_ok("DEL of an unknown container");
    assert_eq!(cluster.leftovers(1), Leftovers::default());
}

#[test]
#[cfg_attr(
    not(feature = "privileged"),
    ignore = "privileged: root + BPF + netns; run scripts/test.sh"
)]
fn check_passes_on_a_healthy_pod_and_names_what_broke() {
    let cluster = Cluster::new(1, "vxlan");
    let a = cluster.add_pod(1, "a");
    let conf = cluster.conf(1);
    let check = |what: &str| {
        cluster
            .cni(1, "CHECK", &a.container_id, Some(&path_of(&a.netns)), &conf)
            .expect_ok(what)
    };
    check("CHECK healthy");

    a.netns
        .ip(&["route", "del", "default"])
        .expect("break the route");
    let broken = cluster.cni(1, "CHECK", &a.container_id, Some(&path_of(&a.netns)), &conf);
    assert!(!broken.success);
    assert_eq!(broken.code(), Some(100), "{:?}", broken.stdout);
    assert!(broken.msg().contains("default route"), "{}", broken.msg());
    a.netns
        .ip(&[
            "route",
            "add",
            "default",
            "via",
            "169.254.1.1",
            "dev",
            "eth0",
        ])
        .expect("repair");
    check("CHECK repaired");

    let pins = Pins::new(&cluster.node(1).bpffs);
    NodeMaps::open(&pins)
        .expect("maps")
        .remove_endpoint(a.ip)
        .expect("remove entry");
    let broken = cluster.cni(1, "CHECK", &a.container_id, Some(&path_of(&a.netns)), &conf);
    assert_eq!(broken.code(), Some(100));
    assert!(broken.msg().contains("endpoint map"), "{}", broken.msg());
}

#[test]
#[cfg_attr(
    not(feature = "privileged"),
    ignore = "privileged: root + BPF + netns; run scripts/test.sh"
)]
fn gc_reclaims_every_attachment_the_runtime_no_longer_lists() {
    let cluster = Cluster::new(1, "vxlan");
    let a = cluster.add_pod(1, "a");
    let b = cluster.add_pod(1, "b");
    let c = cluster.add_pod(1, "c");
    let mut conf = cluster.conf(1);
    conf["cni.dev/valid-attachments"] =
        json!([{ "containerID": b.container_id, "ifname": "eth0" }]);
    cluster.cni(1, "GC", "", None, &conf).expect_ok("GC");
    let left = cluster.leftovers(1);
    assert_eq!(left.endpoints, [b.ip], "only b's endpoint stays");
    assert_eq!(left.allocations, [b.ip.to_string()]);
    assert_eq!((left.veths.len(), left.pins.len()), (1, 1));
    assert_eq!(left.routes, [b.ip.to_string()]);
    for gone in [&a, &c] {
        assert!(
            gone.netns.link("eth0").is_err(),
            "pod {} still has eth0",
            gone.ip
        );
    }
    let conf = cluster.conf(1);
    cluster
        .cni(1, "CHECK", &b.container_id, Some(&path_of(&b.netns)), &conf)
        .expect_ok("b intact");
}

#[test]
#[cfg_attr(
    not(feature = "privileged"),
    ignore = "privileged: root + BPF + netns; run scripts/test.sh"
)]
fn adds_killed_halfway_are_reclaimed_by_gc() {
    let cluster = Cluster::new(1, "vxlan");
    let conf = cluster.conf(1);
    let plugin = cluster.cni_path.join("slipway");
    // Kill ADDs at staggered moments, so some die before, during and after each step.
    for (n, delay_us) in [0u64, 300, 1_000, 2_000, 3_000, 5_000, 8_000, 12_000, 20_000]
        .iter()
        .enumerate()
    {
        let sandbox = cluster.sandbox(&format!("k{n}"));
        let mut cmd = cluster
            .node(1)
            .netns
            .command(&[plugin.to_str().expect("utf-8")]);
        cmd.env("CNI_COMMAND", "ADD")
            .env("CNI_CONTAINERID", format!("killed-{n}"))
            .env("CNI_NETNS", path_of(&sandbox))
            .env("CNI_IFNAME", "eth0")
            .env("CNI_PATH", &cluster.cni_path)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let mut child = cmd.spawn().expect("spawn");
        use std::io::Write;
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(conf.to_string().as_bytes())
            .expect("stdin");
        std::thread::sleep(Duration::from_micros(*delay_us));
        let _ = child.kill();
        let _ = child.wait();
    }
    let mut gc = conf.clone();
    gc["cni.dev/valid-attachments"] = json!([]);
    cluster.cni(1, "GC", "", None, &gc).expect_ok("GC");
    assert_eq!(
        cluster.leftovers(1),
        Leftovers::default(),
        "GC left something of the killed ADDs"
    );
    // The node still works.
    let a = cluster.add_pod(1, "after");
    assert!(a.netns.link("eth0").is_ok());
}

#[test]
#[cfg_attr(
    not(feature = "privileged"),
    ignore = "privileged: root + BPF + netns; run scripts/test.sh"
)]
fn bad_input_gets_the_spec_code_and_names_the_problem() {
    let cluster = Cluster::new(1, "vxlan");
    let sandbox = cluster.sandbox("bad");
    let sandbox_path = path_of(&sandbox);
    let mut cases: Vec<(&str, Value, Option<String>, u64, &str)> = Vec::new();
    let mut conf = cluster.conf(1);
    conf["cniVersion"] = json!("0.9.9");
    cases.push((
        "unknown cniVersion",
        conf,
        Some(sandbox_path.clone()),
        1,
        "0.9.9",
    ));
    cases.push((
        "missing netns",
        cluster.conf(1),
        Some("/run/netns/slipway-no-such-netns".into()),
        3,
        "CNI_NETNS",
    ));
    cases.push(("unset netns", cluster.conf(1), None, 4, "CNI_NETNS"));
    let mut conf = cluster.conf(1);
    conf["hostBlock"] = json!("10.250.1.0/24");
    cases.push((
        "block outside the pod CIDR",
        conf,
        Some(sandbox_path.clone()),
        7,
        "hostBlock: 10.250.1.0/24 is not inside podCIDR 10.244.0.0/16",
    ));
    let mut conf = cluster.conf(1);
    conf["mtu"] = json!(100);
    cases.push((
        "MTU out of range",
        conf,
        Some(sandbox_path.clone()),
        7,
        "mtu: 100",
    ));
    let mut conf = cluster.conf(1);
    conf["frobnicate"] = json!(true);
    cases.push((
        "unknown field",
        conf,
        Some(sandbox_path.clone()),
        2,
        "frobnicate",
    ));
    for (what, conf, netns, code, needle) in cases {
        let outcome = cluster.cni(1, "ADD", "bad-input", netns.as_deref(), &conf);
        assert!(!outcome.success, "{what}: succeeded");
        assert_eq!(outcome.code(), Some(code), "{what}: {}", outcome.stdout);
        assert!(
            outcome.msg().contains(needle),
            "{what}: {:?} lacks {needle:?}",
            outcome.msg()
        );
        assert_eq!(
            cluster.leftovers(1),
            Leftovers::default(),
            "{what} left something"
        );
    }
    // Malformed JSON is a decode error.
    let mut cmd = cluster.node(1).netns.command(&[cluster
        .cni_path
        .join("slipway")
        .to_str()
        .expect("utf-8")]);
    cmd.env("CNI_COMMAND", "ADD")
        .env("CNI_CONTAINERID", "x")
        .env("CNI_NETNS", &sandbox_path)
        .env("CNI_IFNAME", "eth0");
    let output = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .and_then(|mut child| {
            use std::io::Write;
            child
                .stdin
                .take()
                .expect("stdin")
                .write_all(b"{\"cniVersion\": ")?;
            child.wait_with_output()
        });
    let output = output.expect("run");
    let error: Value = serde_json::from_slice(&output.stdout).expect("an error object");
    assert_eq!(error["code"], 6, "{error}");
    assert_eq!(cluster.leftovers(1), Leftovers::default());
}

#[test]
#[cfg_attr(
    not(feature = "privileged"),
    ignore = "privileged: root + BPF + netns; run scripts/test.sh"
)]
fn status_and_version_answer() {
    let cluster = Cluster::new(1, "vxlan");
    let conf = cluster.conf(1);
    cluster
        .cni(1, "STATUS", "", None, &conf)
        .expect_ok("STATUS with the agent up");
    let mut conf_elsewhere = conf.clone();
    conf_elsewhere["bpffs"] = json!(cluster.dir.join("no-datapath-here"));
    let status = cluster.cni(1, "STATUS", "", None, &conf_elsewhere);
    assert_eq!(status.code(), Some(50), "{}", status.stdout);
    let version = cluster
        .cni(1, "VERSION", "", None, &conf)
        .expect_ok("VERSION");
    assert_eq!(version["cniVersion"], "1.1.0");
    let versions: Vec<&str> = version["supportedVersions"]
        .as_array()
        .expect("list")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(
        versions.contains(&"1.1.0") && versions.contains(&"0.4.0"),
        "{versions:?}"
    );
}

#[test]
#[cfg_attr(
    not(feature = "privileged"),
    ignore = "privileged: root + BPF + netns; run scripts/test.sh"
)]
fn ipam_delegated_to_host_local_and_a_set_mtu() {
    let cluster = Cluster::new(1, "vxlan");
    let state = cluster.dir.join("host-local");
    let mut conf = cluster.conf(1);
    // Debian's host-local speaks up to 1.0.0.
    conf["cniVersion"] = json!("1.0.0");
    conf["mtu"] = json!(1400);
    conf["ipam"] = json!({
        "type": "host-local",
        "dataDir": state,
        "ranges": [[{ "subnet": "10.244.1.0/24", "rangeStart": "10.244.1.100", "rangeEnd": "10.244.1.110" }]],
    });
    let sandbox = cluster.sandbox("delegated");
    let path = path_of(&sandbox);
    let result = cluster
        .cni(1, "ADD", "delegated", Some(&path), &conf)
        .expect_ok("ADD");
    assert_eq!(result["ips"][0]["address"], "10.244.1.100/32", "{result}");
    assert_eq!(result["interfaces"][1]["mtu"], 1400);
    let eth0: Value = serde_json::from_str(
        &sandbox
            .ip(&["-j", "link", "show", "dev", "eth0"])
            .expect("ip"),
    )
    .expect("json");
    assert_eq!(eth0[0]["mtu"], 1400, "the pod's MTU is the one set");
    let host_local_file = state.join(common::NETWORK).join("10.244.1.100");
    assert!(
        host_local_file.exists(),
        "host-local recorded its allocation"
    );
    cluster
        .cni(1, "CHECK", "delegated", Some(&path), &conf)
        .expect_ok("CHECK");

    cluster
        .cni(1, "DEL", "delegated", Some(&path), &conf)
        .expect_ok("DEL");
    assert!(
        !host_local_file.exists(),
        "DEL released the address in host-local too"
    );
    assert_eq!(cluster.leftovers(1), Leftovers::default());
}

#[test]
#[cfg_attr(
    not(feature = "privileged"),
    ignore = "privileged: root + BPF + netns; run scripts/test.sh"
)]
fn del_succeeds_without_node_state() {
    let cluster = Cluster::new(1, "vxlan");
    // A node whose agent never ran: no node.json, no IPAM store, no datapath.
    let never = cluster.dir.join("agent-never-ran");
    let mut conf = cluster.conf(1);
    conf["dataDir"] = json!(never);
    conf["bpffs"] = json!(cluster.dir.join("no-datapath-here"));
    let del = cluster.cni(1, "DEL", "never-added", None, &conf);
    assert!(
        del.success,
        "DEL with nothing to remove must succeed: {} {}",
        del.stdout, del.stderr
    );
    assert_eq!(del.stdout, Value::Null, "DEL prints nothing on success");
    // ADD there cannot work, and says where it looked for the agent's state.
    let sandbox = cluster.sandbox("no-state");
    let add = cluster.cni(1, "ADD", "no-state", Some(&path_of(&sandbox)), &conf);
    assert_eq!(add.code(), Some(11), "{}", add.stdout);
    let looked_at = never.join("node.json");
    assert!(
        add.msg().contains(looked_at.to_str().expect("utf-8")),
        "the error names the path it looked at: {}",
        add.msg()
    );

    // The node state is lost after a pod was added: DEL still removes all of it.
    let a = cluster.add_pod(1, "a");
    std::fs::remove_file(cluster.node(1).data_dir.join("node.json")).expect("remove node.json");
    let mut conf = cluster.conf(1);
    conf["bpffs"] = json!(cluster.node(1).bpffs);
    cluster
        .cni(1, "DEL", &a.container_id, Some(&path_of(&a.netns)), &conf)
        .expect_ok("DEL without node.json");
    assert_eq!(cluster.leftovers(1), Leftovers::default());
}

#[test]
#[cfg_attr(
    not(feature = "privileged"),
    ignore = "privileged: root + BPF + netns; run scripts/test.sh"
)]
fn static_address_and_mac_requests_are_honoured_or_refused() {
    let cluster = Cluster::new(1, "vxlan");
    let pins = Pins::new(&cluster.node(1).bpffs);
    // The `ips` and `mac` capabilities, as a runtime passes them.
    let mut conf = cluster.conf(1);
    conf["runtimeConfig"] = json!({ "ips": ["10.244.1.77/24"], "mac": "02:5a:00:00:00:77" });
    let a = cluster.sandbox("static-a");
    let result = cluster
        .cni(1, "ADD", "static-a", Some(&path_of(&a)), &conf)
        .expect_ok("ADD with a free address of the block");
    assert_eq!(result["ips"][0]["address"], "10.244.1.77/32", "{result}");
    assert_eq!(
        result["interfaces"][1]["mac"], "02:5a:00:00:00:77",
        "{result}"
    );
    let eth0 = a.link("eth0").expect("eth0");
    assert_eq!(
        eth0.mac,
        [0x02, 0x5a, 0, 0, 0, 0x77],
        "the pod has the MAC asked for"
    );
    let endpoint = NodeMaps::open(&pins)
        .expect("maps")
        .endpoint("10.244.1.77".parse().expect("ip"))
        .expect("endpoint")
        .expect("an endpoint entry");
    assert_eq!(
        endpoint.pod_mac, eth0.mac,
        "the datapath delivers to that MAC"
    );
    cluster
        .cni(1, "CHECK", "static-a", Some(&path_of(&a)), &conf)
        .expect_ok("CHECK");

    // `args.cni.ips`, another free address: honoured too.
    let mut by_args = cluster.conf(1);
    by_args["args"] = json!({ "cni": { "ips": ["10.244.1.78"] } });
    let b = cluster.sandbox("static-b");
    let result = cluster
        .cni(1, "ADD", "static-b", Some(&path_of(&b)), &by_args)
        .expect_ok("ADD by args");
    assert_eq!(result["ips"][0]["address"], "10.244.1.78/32", "{result}");

    let before = cluster.leftovers(1);
    let refused: [(&str, Value, u64, &str); 4] = [
        (
            "an address in use",
            json!({ "ips": ["10.244.1.77/24"] }),
            103,
            "runtimeConfig.ips[0]: 10.244.1.77 is already in use",
        ),
        (
            "an address outside the block",
            json!({ "ips": ["10.244.2.9/24"] }),
            7,
            "runtimeConfig.ips[0]: 10.244.2.9 is not a usable pod address",
        ),
        (
            "the router address",
            json!({ "ips": ["10.244.1.1/24"] }),
            7,
            "runtimeConfig.ips[0]: 10.244.1.1",
        ),
        (
            "a multicast MAC",
            json!({ "mac": "01:00:5e:00:00:01" }),
            7,
            "runtimeConfig.mac",
        ),
    ];
    for (n, (what, runtime_config, code, needle)) in refused.into_iter().enumerate() {
        let mut conf = cluster.conf(1);
        conf["runtimeConfig"] = runtime_config;
        let sandbox = cluster.sandbox(&format!("refused{n}"));
        let outcome = cluster.cni(1, "ADD", "refused", Some(&path_of(&sandbox)), &conf);
        assert!(!outcome.success, "{what}: accepted");
        assert_eq!(outcome.code(), Some(code), "{what}: {}", outcome.stdout);
        assert!(
            outcome.msg().contains(needle),
            "{what}: {:?} lacks {needle:?}",
            outcome.msg()
        );
        assert_eq!(cluster.leftovers(1), before, "{what} left something");
    }

    for (id, ns) in [("static-a", &a), ("static-b", &b)] {
        cluster
            .cni(1, "DEL", id, Some(&path_of(ns)), &cluster.conf(1))
            .expect_ok("DEL");
    }
    assert_eq!(cluster.leftovers(1), Leftovers::default());
}
