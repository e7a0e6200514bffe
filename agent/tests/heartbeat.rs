//! The host agent's registration against a real supervisor (`slipway supervisor`, redb): the
//! Host is created with its status, the Lease (and its namespace) made and renewed every
//! interval; a restarted agent takes over the same Lease, and a Lease deleted behind the agent's
//! back comes back. Needs no privileges: only the heartbeat runs, not the datapath.

mod common;

use std::time::Duration;

use common::{Supervisor, wait_for};

use k8s_openapi::api::coordination::v1::Lease;
use kube::api::{Api, ApiResource, DeleteParams, DynamicObject, GroupVersionKind};
use kube::config::{KubeConfigOptions, Kubeconfig};
use slipway_agent::heartbeat::{Heartbeat, LEASE_NAMESPACE, Registration};

fn registration() -> Registration {
    Registration {
        host: "host-a1".into(),
        zone: "zone-a".into(),
        host_class: "small".into(),
        address: "10.100.0.5".into(),
        interval: Duration::from_millis(200),
        duration: Duration::from_secs(1),
    }
}

#[tokio::test]
async fn the_agent_registers_its_host_and_keeps_its_lease_renewed() {
    let sup = Supervisor::start("hb");
    let config = kube::Config::from_custom_kubeconfig(
        Kubeconfig::read_from(sup.kubeconfig()).expect("kubeconfig"),
        &KubeConfigOptions::default(),
    )
    .await
    .expect("config");
    let client = kube::Client::try_from(config).expect("client");
    let leases: Api<Lease> = Api::namespaced(client.clone(), LEASE_NAMESPACE);
    let host_resource = ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("slipway.dev", "v1alpha1", "Host"),
        "hosts",
    );
    let hosts: Api<DynamicObject> = Api::all_with(client, &host_resource);
    let renew_time = |lease: &Lease| {
        serde_json::to_value(&lease.spec)
            .ok()
            .and_then(|s| s["renewTime"].as_str().map(str::to_owned))
    };

    let agent = Heartbeat::connect(&sup.kubeconfig(), registration())
        .await
        .expect("connect");
    let running = tokio::spawn(agent.run());

    // The Host, with the agent's status.
    let host = wait_for("the Host's status", Duration::from_secs(10), || async {
        hosts
            .get_opt("host-a1")
            .await
            .ok()
            .flatten()
            .filter(|h| h.data["status"]["phase"] == "Running")
    })
    .await;
    assert_eq!(host.data["spec"]["zone"], "zone-a");
    assert_eq!(host.data["spec"]["hostClass"], "small");
    assert_eq!(host.data["status"]["address"], "10.100.0.5");
    assert_eq!(
        host.data["status"]["agentVersion"],
        env!("CARGO_PKG_VERSION")
    );

    // The Lease (its namespace made on the way), renewed round after round.
    let first = wait_for("the Lease", Duration::from_secs(10), || async {
        leases.get_opt("host-a1").await.ok().flatten()
    })
    .await;
    let spec = first.spec.clone().expect("lease spec");
    assert_eq!(spec.holder_identity.as_deref(), Some("host-a1"));
    assert_eq!(spec.lease_duration_seconds, Some(1));
    let acquired = serde_json::to_value(&spec)
        .ok()
        .and_then(|s| s["acquireTime"].as_str().map(str::to_owned))
        .expect("acquireTime");
    let mut seen = renew_time(&first).expect("renewTime");
    for _ in 0..3 {
        seen = wait_for("a renewal", Duration::from_secs(5), || async {
            let lease = leases.get_opt("host-a1").await.ok().flatten()?;
            renew_time(&lease).filter(|t| *t > seen)
        })
        .await;
    }

    // A restarted agent (the old one killed mid-interval) renews the same Lease.
    running.abort();
    let _ = running.await;
    let agent = Heartbeat::connect(&sup.kubeconfig(), registration())
        .await
        .expect("connect again");
    let running = tokio::spawn(agent.run());
    let renewed = wait_for(
        "a renewal by the restarted agent",
        Duration::from_secs(5),
        || async {
            let lease = leases.get_opt("host-a1").await.ok().flatten()?;
            renew_time(&lease).filter(|t| *t > seen).map(|_| lease)
        },
    )
    .await;
    let still_acquired = serde_json::to_value(&renewed.spec)
        .ok()
        .and_then(|s| s["acquireTime"].as_str().map(str::to_owned));
    assert_eq!(
        still_acquired.as_deref(),
        Some(acquired.as_str()),
        "the same Lease, not a new one"
    );

    // A Lease deleted behind the agent's back comes back.
    leases
        .delete("host-a1", &DeleteParams::default())
        .await
        .expect("delete lease");
    wait_for("the Lease made again", Duration::from_secs(5), || async {
        let lease = leases.get_opt("host-a1").await.ok().flatten()?;
        let acquire = serde_json::to_value(&lease.spec)
            .ok()
            .and_then(|s| s["acquireTime"].as_str().map(str::to_owned))?;
        (acquire != acquired).then_some(())
    })
    .await;
    running.abort();
}
