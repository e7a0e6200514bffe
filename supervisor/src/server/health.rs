//! `/livez`, `/readyz` and `/healthz` as kube-apiserver serves them: named checks, `?verbose`
//! for one line per check, `?exclude=NAME`, and `/readyz/NAME` for a single check.
//!
//! `livez` answers whether the process should be restarted (its event loop runs), `readyz`
//! and `healthz` whether it can serve requests, which needs a store that answers. Restarting
//! the supervisor does not bring a lost etcd quorum back, so the store is a readiness check
//! only.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use hyper::Response;
use tracing::warn;

use super::State;
use super::http::{self, Body};
use crate::store::{AnyStore, Store, StoreError};

/// How long the store check waits for an answer: a store that does not answer within this is
/// not ready (the bound is 2 s from quorum loss to a failing `/readyz`).
pub const STORE_CHECK_TIMEOUT: Duration = Duration::from_secs(1);

/// A key no object ever has: reading it costs the store a linearizable round trip.
const PROBE_KEY: &str = "/registry/health-probe";

/// What the last store check found, so a failure is logged when it starts and a recovery
/// when it ends, not once per probe (anyone may call `/readyz`).
#[derive(Debug, Default)]
pub struct CheckLog {
    store_failing: AtomicBool,
}

impl CheckLog {
    fn record(&self, check: &str, result: &Result<(), String>) {
        let failing = result.is_err();
        if self.store_failing.swap(failing, Ordering::Relaxed) == failing {
            return;
        }
        match result {
            Err(reason) => warn!(check, %reason, "health check failing"),
            Ok(()) => tracing::info!(check, "health check passing again"),
        }
    }
}

/// Which endpoint a health request is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    /// `/livez`.
    Live,
    /// `/readyz`.
    Ready,
    /// `/healthz` (the union, as kube-apiserver's legacy endpoint).
    Health,
}

impl Endpoint {
    fn name(self) -> &'static str {
        match self {
            Self::Live => "livez",
            Self::Ready => "readyz",
            Self::Health => "healthz",
        }
    }
}

/// The name of the store check: the backend's name, so a failure says which store is down.
pub fn store_check_name(store: &AnyStore) -> &'static str {
    match store {
        AnyStore::Redb(_) => "redb",
        AnyStore::Etcd(_) => "etcd",
    }
}

/// Asks the store for one key within [`STORE_CHECK_TIMEOUT`].
async fn store_check(store: &AnyStore) -> Result<(), String> {
    match tokio::time::timeout(STORE_CHECK_TIMEOUT, store.get(PROBE_KEY)).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(error_chain(&e)),
        Err(_) => Err(format!("no answer within {STORE_CHECK_TIMEOUT:?}")),
    }
}

/// A store error with its sources, on one line.
pub fn error_chain(e: &StoreError) -> String {
    let mut s = e.to_string();
    let mut cur: Option<&dyn std::error::Error> = std::error::Error::source(e);
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// Serves `/{livez,readyz,healthz}[/check]`.
pub async fn serve(
    state: &State,
    endpoint: Endpoint,
    only: Option<&str>,
    query: &HashMap<String, String>,
) -> Response<Body> {
    let store_name = store_check_name(&state.store);
    let mut names = vec!["ping"];
    if endpoint != Endpoint::Live {
        names.push(store_name);
    }
    if let Some(one) = only {
        if !names.contains(&one) {
            return http::raw(404, "text/plain", format!("no check {one:?}\n"));
        }
        names.retain(|n| *n == one);
    }
    let excluded: Vec<&str> = query
        .get("exclude")
        .map(|e| e.split(',').collect())
        .unwrap_or_default();
    let mut lines = Vec::new();
    let mut failed = false;
    for name in names {
        if excluded.contains(&name) {
            lines.push(format!("[+]{name} excluded: ok"));
            continue;
        }
        let result = if name == store_name {
            let r = store_check(&state.store).await;
            state.health.record(name, &r);
            r
        } else {
            Ok(())
        };
        match result {
            Ok(()) => lines.push(format!("[+]{name} ok")),
            Err(_) => {
                failed = true;
                // Like kube-apiserver, the reason goes to the log, not to anonymous callers.
                lines.push(format!("[-]{name} failed: reason withheld"));
            }
        }
    }
    let verdict = if failed { "failed" } else { "passed" };
    let code = if failed { 500 } else { 200 };
    let verbose = query.contains_key("verbose");
    let body = if verbose || failed {
        format!(
            "{}\n{} check {verdict}\n",
            lines.join("\n"),
            endpoint.name()
        )
    } else {
        "ok".to_string()
    };
    http::raw(code, "text/plain; charset=utf-8", body)
}
