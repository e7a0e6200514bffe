//! Leader election over a Lease on a real API server (Slipway's, in process): of two
//! candidates one runs the work and the other waits while the first renews; when the first
//! stops (its task dropped, as a killed process), its work stops with it and the second takes
//! over once it has seen the Lease unchanged for the Lease's duration.

mod common;

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Result;
use k8s_openapi::api::coordination::v1::Lease;
use kube::Api;
use slipway_controllers::leader::{self, DURATION, RENEW};

type Running = Arc<Mutex<BTreeSet<&'static str>>>;

/// Marks `name` running while it lives.
struct Mark(Running, &'static str);

impl Drop for Mark {
    fn drop(&mut self) {
        if let Ok(mut r) = self.0.lock() {
            r.remove(self.1);
        }
    }
}

fn candidate(
    client: kube::Client,
    name: &'static str,
    running: Running,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(leader::run_elected(client, name.to_owned(), move || {
        let running = running.clone();
        async move {
            if let Ok(mut r) = running.lock() {
                r.insert(name);
            }
            let _mark = Mark(running, name);
            std::future::pending::<()>().await;
        }
    }))
}

fn now_running(running: &Running) -> BTreeSet<&'static str> {
    running.lock().map(|r| r.clone()).unwrap_or_default()
}

async fn until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) -> Result<()> {
    let start = Instant::now();
    while !f() {
        anyhow::ensure!(start.elapsed() < timeout, "{what}: not within {timeout:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_candidate_leads_and_the_other_takes_over_when_it_stops() -> Result<()> {
    let dir = tempfile::Builder::new()
        .prefix("slipway-leader-")
        .tempdir()?;
    let (client, _, _) = common::api_server(dir.path()).await?;
    let running: Running = Arc::default();

    let a = candidate(client.clone(), "a", running.clone());
    until("a leading", Duration::from_secs(10), || {
        now_running(&running) == BTreeSet::from(["a"])
    })
    .await?;
    let b = candidate(client.clone(), "b", running.clone());
    // While a renews, b never runs: watched over more than the Lease's duration (an absence,
    // which no event announces).
    let watch = Instant::now();
    while watch.elapsed() < DURATION + 2 * RENEW {
        assert_eq!(now_running(&running), BTreeSet::from(["a"]));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let leases: Api<Lease> = Api::namespaced(client.clone(), leader::NAMESPACE);
    let lease = leases.get(leader::NAME).await?;
    assert_eq!(
        lease.spec.and_then(|s| s.holder_identity).as_deref(),
        Some("a")
    );

    // a stops: its work goes with it, and b takes the Lease after its duration, not before.
    a.abort();
    let stopped = Instant::now();
    until("a's work stopped", Duration::from_secs(5), || {
        !now_running(&running).contains("a")
    })
    .await?;
    until("b leading", Duration::from_secs(15), || {
        now_running(&running) == BTreeSet::from(["b"])
    })
    .await?;
    let took = stopped.elapsed();
    assert!(
        took >= DURATION - RENEW,
        "b took over {took:?} after a stopped, within the Lease's duration"
    );
    eprintln!("b took over {took:?} after a stopped");
    let lease = leases.get(leader::NAME).await?;
    let spec = lease.spec.unwrap_or_default();
    assert_eq!(spec.holder_identity.as_deref(), Some("b"));
    assert_eq!(spec.lease_transitions, Some(1));
    b.abort();
    Ok(())
}
