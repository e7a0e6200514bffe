//! The supervisor provisions hosts: `slipway supervisor --host-provider netns` turns Host objects
//! into network-namespace hosts whose agents join it (`slipway join` with a bootstrap token bound
//! to the host, through the provider's uplink), register, renew their Lease and go Ready. Killed
//! with kill -9 while a host is being made, the restarted supervisor converges without making a
//! host twice; a deleted Host leaves nothing; bad Hosts are refused with the field named.
//! Privileged (root, netns, cgroups): run by scripts/test.sh.

mod common;

use std::time::{Duration, Instant};

use common::{World, gvk, wait_for};

use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, DeleteParams, DynamicObject, ListParams, PostParams};
use serde_json::{Value, json};
use slipway_hosts::HostProvider as _;

fn condition<'a>(host: &'a DynamicObject, kind: &str) -> Option<&'a Value> {
    host.data["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == kind)
}

async fn ready(hosts: &Api<DynamicObject>, name: &str) -> Option<DynamicObject> {
    let h = hosts.get_opt(name).await.ok()??;
    (condition(&h, "Ready")?["status"] == "True" && h.data["status"]["phase"] == "Running")
        .then_some(h)
}

/// Creates a Host; a failure shows the supervisor's log.
async fn create_host(
    world: &World,
    hosts: &Api<DynamicObject>,
    name: &str,
    zone: &str,
    class: &str,
) {
    let mut h = DynamicObject::new(name, &gvk("Host", "hosts"));
    h.data = json!({"spec": {"zone": zone, "hostClass": class, "provider": "netns"}});
    if let Err(e) = hosts.create(&PostParams::default(), &h).await {
        panic!("create Host {name}: {e}\nsupervisor log:\n{}", world.log());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "privileged: root + netns + cgroups; run with --ignored"]
async fn hosts_are_provisioned_join_go_ready_survive_a_supervisor_kill_and_leave_nothing() {
    let mut world = World::new();
    let client = world.client().await;
    world.seed(&client).await;
    let hosts: Api<DynamicObject> = Api::all_with(client.clone(), &gvk("Host", "hosts"));
    let started = Instant::now();
    create_host(&world, &hosts, "h1", "za", "small").await;
    create_host(&world, &hosts, "h2", "zb", "small").await;
    for (name, subnet) in [("h1", "10.123.0."), ("h2", "10.123.1.")] {
        let h = wait_for(&format!("{name} Ready"), Duration::from_secs(30), || {
            ready(&hosts, name)
        })
        .await;
        let address = h.data["status"]["address"].as_str().unwrap_or_default();
        assert!(address.starts_with(subnet), "{name} at {address}");
        assert!(
            h.metadata
                .finalizers
                .iter()
                .flatten()
                .any(|f| f == "slipway.dev/host-provider"),
            "{name} carries the provider's finalizer"
        );
        assert_eq!(
            condition(&h, "Provisioned").map(|c| c["status"].clone()),
            Some(json!("True"))
        );
    }
    eprintln!(
        "2 hosts Ready {:?} after their Hosts were created",
        started.elapsed()
    );
    let provider = world.provider();
    let status = provider.status("h1").await.expect("h1 status");
    assert!(!status.pids.is_empty(), "h1's agent runs in its cgroups");

    // kill -9 the supervisor right after a Host is created, then restart it: the host is made
    // once, and the hosts made before keep (or regain) their Lease.
    create_host(&world, &hosts, "h3", "za", "small").await;
    world.kill9();
    world.start();
    let client = world.client().await;
    let hosts: Api<DynamicObject> = Api::all_with(client.clone(), &gvk("Host", "hosts"));
    for name in ["h1", "h2", "h3"] {
        wait_for(
            &format!("{name} Ready after the restart"),
            Duration::from_secs(30),
            || ready(&hosts, name),
        )
        .await;
    }
    let made: Vec<String> = provider
        .list()
        .await
        .expect("list")
        .into_iter()
        .map(|h| h.spec.name)
        .collect();
    assert_eq!(made, ["h1", "h2", "h3"], "every Host made once");

    // Bad Hosts: refused with the field named, nothing made.
    create_host(&world, &hosts, "bad-class", "za", "nope").await;
    create_host(&world, &hosts, "bad-zone", "zc", "small").await;
    for (name, needle) in [("bad-class", "spec.hostClass"), ("bad-zone", "zone")] {
        let h = wait_for(
            &format!("{name} refused"),
            Duration::from_secs(10),
            || async {
                let h = hosts.get_opt(name).await.ok()??;
                (condition(&h, "Provisioned")?["status"] == "False").then_some(h)
            },
        )
        .await;
        let message = condition(&h, "Provisioned")
            .map(|c| c["message"].to_string())
            .unwrap_or_default();
        assert!(message.contains(needle), "{name}: {message}");
    }
    let made: Vec<String> = provider
        .list()
        .await
        .expect("list")
        .into_iter()
        .map(|h| h.spec.name)
        .collect();
    assert_eq!(made, ["h1", "h2", "h3"], "nothing made for bad Hosts");

    // Delete: the Host goes once its host is torn down, with its bootstrap token.
    let secrets: Api<Secret> = Api::namespaced(client.clone(), "slipway-system");
    for name in ["h1", "h2", "h3", "bad-class", "bad-zone"] {
        hosts
            .delete(name, &DeleteParams::default())
            .await
            .expect("delete");
    }
    wait_for("every Host gone", Duration::from_secs(30), || async {
        hosts
            .list(&ListParams::default())
            .await
            .ok()?
            .items
            .is_empty()
            .then_some(())
    })
    .await;
    let tokens = secrets
        .list(&ListParams::default().labels("slipway.dev/host"))
        .await
        .expect("secrets");
    assert!(
        tokens.items.is_empty(),
        "bootstrap tokens left: {:?}",
        tokens.items.len()
    );
    assert!(provider.list().await.expect("list").is_empty());
    assert_eq!(world.leftovers(), Vec::<String>::new(), "{}", world.log());
}
