//! The supervisor on a real 3-member etcd when members die: `/readyz` names etcd within 2 s of
//! quorum loss and requests fail with a Status that says what the store did; with one member
//! down, writes go to the others at close to the healthy speed.

mod common;

use std::time::{Duration, Instant};

use common::{Etcd, Supervisor, TempDir, wait_for};
use hyper::Method;
use slipway_supervisor::client::{Client, ClientError};

/// The bound from quorum loss to a failing `/readyz`.
const READYZ_DEADLINE: Duration = Duration::from_secs(2);

fn host_class(name: &str) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "apiVersion": "slipway.dev/v1alpha1",
        "kind": "HostClass",
        "metadata": {"name": name},
        "spec": {"cpus": 1, "memory": "1Gi"},
    }))
    .expect("json")
}

#[test]
fn readyz_names_etcd_on_quorum_loss_and_requests_fail_with_the_reason() {
    let mut etcd = Etcd::start(3);
    let dir = TempDir::new("readyz");
    let sup = Supervisor::start(dir.path(), &etcd.store_arg(), &[]);

    let (code, body) = sup.curl_anonymous("/readyz?verbose");
    assert_eq!(code, 200, "{body}");
    assert!(
        body.contains("[+]etcd ok") && body.contains("readyz check passed"),
        "{body}"
    );
    assert_eq!(sup.curl_anonymous("/readyz/etcd").0, 200);

    etcd.members[1].kill();
    etcd.members[2].kill();
    let lost = Instant::now();
    let body = wait_for("/readyz to fail", READYZ_DEADLINE, || {
        let (code, body) = sup.curl_anonymous("/readyz?verbose");
        (code == 500).then_some(body)
    });
    eprintln!("/readyz failed {:?} after quorum loss", lost.elapsed());
    assert!(
        lost.elapsed() <= READYZ_DEADLINE,
        "took {:?}",
        lost.elapsed()
    );
    assert!(
        body.contains("[-]etcd failed") && body.contains("readyz check failed"),
        "{body}"
    );
    for _ in 0..5 {
        assert_eq!(sup.curl_anonymous("/healthz").0, 500);
    }
    // Anyone may probe: the failure is logged when it starts, not once per probe.
    let log = std::fs::read_to_string(sup.dir.join("supervisor.log")).expect("log");
    assert_eq!(log.matches("health check failing").count(), 1, "{log}");
    // The process itself is fine: a restart would not bring the quorum back.
    assert_eq!(sup.curl_anonymous("/livez").0, 200);

    // A request fails with a Status that names the store and what its members said (within
    // kubectl's request timeout, which the harness sets).
    let hc = sup.file("hc.yaml", "apiVersion: slipway.dev/v1alpha1\nkind: HostClass\nmetadata: {name: lost}\nspec: {cpus: 1, memory: 1Gi}\n");
    let asked = Instant::now();
    let failed = sup.kubectl(&["apply", "-f", &hc]);
    eprintln!("a write failed after {:?} without quorum", asked.elapsed());
    let err = failed.err();
    assert!(
        err.contains("ServiceUnavailable") || err.contains("etcd unavailable"),
        "{err}"
    );
    assert!(err.contains("etcd unavailable"), "{err}");
    assert!(err.contains(&etcd.client_urls[1]), "{err}");
}

/// Creates `n` HostClasses one after the other on one connection; returns the time taken.
async fn creates(client: &Client, prefix: &str, n: usize) -> Result<Duration, ClientError> {
    let mut conn = client.connect().await?;
    let start = Instant::now();
    for i in 0..n {
        conn.call(
            Method::POST,
            "/apis/slipway.dev/v1alpha1/hostclasses",
            Some("application/json"),
            host_class(&format!("{prefix}-{i}")),
        )
        .await?;
    }
    Ok(start.elapsed())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_dead_member_leaves_writes_near_healthy_speed() -> anyhow::Result<()> {
    let mut etcd = tokio::task::block_in_place(|| Etcd::start(3));
    let dir = TempDir::new("member-down");
    let sup = tokio::task::block_in_place(|| Supervisor::start(dir.path(), &etcd.store_arg(), &[]));
    let client = Client::from_kubeconfig(&sup.kubeconfig())?;
    creates(&client, "warm", 10).await?;
    let healthy = creates(&client, "healthy", 100).await?;

    etcd.members[0].kill();
    // The first write after the kill may wait out an election if the dead member led.
    creates(&client, "settle", 1).await?;
    let degraded = creates(&client, "degraded", 100).await?;
    eprintln!("100 creates: healthy {healthy:?}, one member down {degraded:?}");
    // The acceptance: no more than twice the healthy time.
    assert!(
        degraded <= healthy * 2,
        "100 creates took {degraded:?} with one member down, {healthy:?} healthy"
    );
    // The dead member is reported once per outage, not once per call.
    let log = std::fs::read_to_string(sup.dir.join("supervisor.log"))?;
    let dead = &etcd.client_urls[0];
    let warnings = log
        .lines()
        .filter(|l| l.contains("WARN") && l.contains(dead.as_str()))
        .count();
    assert!(
        (1..=2).contains(&warnings),
        "{warnings} warnings about {dead}:\n{log}"
    );
    Ok(())
}
