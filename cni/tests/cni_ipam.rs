//! IPAM shared by every network over one host block: two conflists that differ only in their
//! name, ADDs racing across both, never hand out one address twice, and one network's GC leaves
//! the other's pods alone. Privileged (root, BPF, netns): run by scripts/test.sh.

mod common;

use std::collections::BTreeSet;
use std::net::Ipv4Addr;

use common::Cluster;
use serde_json::{Value, json};
use slipway_dataplane::netns;
use slipway_dataplane::node::{NodeMaps, Pins};

/// Pods each network adds, all at once.
const PER_NETWORK: usize = 10;

#[test]
#[cfg_attr(
    not(feature = "privileged"),
    ignore = "privileged: root + BPF + netns; run scripts/test.sh"
)]
fn two_networks_over_one_block_never_share_an_address() {
    let cluster = Cluster::new(1, "vxlan");
    let first = cluster.conf(1);
    let mut second = first.clone();
    second["name"] = json!("slipway-second");
    let confs = [first, second];
    let sandboxes: Vec<(usize, String, String)> = (0..2)
        .flat_map(|n| (0..PER_NETWORK).map(move |k| (n, k)))
        .map(|(n, k)| {
            let sandbox = cluster.sandbox(&format!("n{n}p{k}"));
            (
                n,
                format!("n{n}p{k}"),
                netns::path(sandbox.name()).display().to_string(),
            )
        })
        .collect();
    let results: Vec<(usize, String, String, Value)> = std::thread::scope(|s| {
        let handles: Vec<_> = sandboxes
            .iter()
            .map(|(n, id, path)| {
                let conf = &confs[*n];
                let cluster = &cluster;
                s.spawn(move || {
                    let result = cluster
                        .cni(1, "ADD", id, Some(path), conf)
                        .expect_ok(&format!("ADD {id}"));
                    (*n, id.clone(), path.clone(), result)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("ADD thread"))
            .collect()
    });
    let ip_of = |result: &Value| -> Ipv4Addr {
        result["ips"][0]["address"]
            .as_str()
            .and_then(|a| a.split('/').next())
            .and_then(|a| a.parse().ok())
            .expect("an address")
    };
    let ips: BTreeSet<Ipv4Addr> = results.iter().map(|(_, _, _, r)| ip_of(r)).collect();
    assert_eq!(
        ips.len(),
        results.len(),
        "an address was handed out twice: {:?}",
        results
            .iter()
            .map(|(_, id, _, r)| (id, ip_of(r)))
            .collect::<Vec<_>>()
    );
    let pins = Pins::new(&cluster.node(1).bpffs);
    let endpoints: BTreeSet<Ipv4Addr> = NodeMaps::open(&pins)
        .expect("maps")
        .endpoints()
        .expect("endpoints")
        .into_keys()
        .collect();
    assert_eq!(endpoints, ips, "every pod keeps its own endpoint entry");
    for (n, id, path, _) in &results {
        cluster
            .cni(1, "CHECK", id, Some(path), &confs[*n])
            .expect_ok(&format!("CHECK {id}"));
    }

    // The first network's GC, listing none of its attachments, takes only its own pods.
    let mut gc = confs[0].clone();
    gc["cni.dev/valid-attachments"] = json!([]);
    cluster.cni(1, "GC", "", None, &gc).expect_ok("GC");
    let second_ips: BTreeSet<Ipv4Addr> = results
        .iter()
        .filter(|(n, ..)| *n == 1)
        .map(|(_, _, _, r)| ip_of(r))
        .collect();
    assert_eq!(
        cluster
            .leftovers(1)
            .endpoints
            .into_iter()
            .collect::<BTreeSet<_>>(),
        second_ips,
        "GC of one network removed another's pods"
    );
    for (n, id, path, _) in results.iter().filter(|(n, ..)| *n == 1) {
        cluster
            .cni(1, "CHECK", id, Some(path), &confs[*n])
            .expect_ok(&format!("CHECK {id} after the other network's GC"));
        cluster
            .cni(1, "DEL", id, Some(path), &confs[*n])
            .expect_ok(&format!("DEL {id}"));
    }
    assert_eq!(cluster.leftovers(1), common::Leftovers::default());
}
