//! The etcd backend: the HA store. Every write is one etcd transaction guarded by the key's
//! create/mod revision, so resourceVersions are etcd revisions and watch resumes from them.

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use std::path::PathBuf;

use etcd_client::{
    Certificate, Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, Identity,
    TlsOptions, Txn, TxnOp, TxnOpResponse, WatchOptions,
};
use tokio::sync::mpsc;

use super::{Cas, EventKind, Expect, KeyValue, Store, StoreError, StoreEvent, Then, WatchStream};

/// How long one store call may take over all its attempts and members before it fails with
/// [`StoreError::Unavailable`]: long enough to ride out a leader election, short enough that a
/// lost quorum is an error in seconds rather than a hang.
const CALL_BUDGET: Duration = Duration::from_secs(5);
/// How long one attempt on one member may take.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a member that failed is passed over, doubling per failure up to the maximum.
const BACKOFF_MIN: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(15);
/// Pause between two rounds in which every member failed.
const ROUND_PAUSE: Duration = Duration::from_millis(100);

/// What the store knows of one member's health.
#[derive(Debug, Default)]
struct Health {
    /// Passed over until then (None = healthy).
    down_until: Option<Instant>,
    /// The next backoff.
    backoff: Duration,
    /// Failures since the member went down (logged when it comes back).
    failures: u32,
}

/// One etcd member and its own client, so a dead member can be passed over.
struct Member {
    endpoint: String,
    client: Client,
    health: Mutex<Health>,
}

/// The members: calls stay on the one that last answered (as etcd's own client pins an
/// endpoint: its connection is warm and reads need no extra hop), move on to the next healthy
/// one when it fails, and try failed ones last, soonest-back first.
struct Members {
    list: Vec<Member>,
    preferred: AtomicUsize,
}

impl Members {
    fn health(&self, i: usize) -> std::sync::MutexGuard<'_, Health> {
        self.list[i]
            .health
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The order in which one round tries the members.
    fn order(&self) -> Vec<usize> {
        let n = self.list.len();
        let start = self.preferred.load(Ordering::Relaxed);
        let now = Instant::now();
        let mut healthy = Vec::with_capacity(n);
        let mut down = Vec::new();
        for k in 0..n {
            let i = (start + k) % n;
            match self.health(i).down_until {
                Some(t) if t > now => down.push((t, i)),
                _ => healthy.push(i),
            }
        }
        down.sort();
        healthy.extend(down.into_iter().map(|(_, i)| i));
        healthy
    }

    fn mark_ok(&self, i: usize) {
        let mut h = self.health(i);
        if h.down_until.is_some() {
            tracing::info!(
                endpoint = %self.list[i].endpoint,
                failures = h.failures,
                "etcd member answers again"
            );
        }
        *h = Health::default();
    }

    /// Backs off from a member; logs once per outage, not once per failed call.
    fn mark_failed(&self, i: usize, error: &str) {
        let mut h = self.health(i);
        let was_up = h.down_until.is_none();
        h.backoff = if was_up {
            BACKOFF_MIN
        } else {
            (h.backoff * 2).min(BACKOFF_MAX)
        };
        h.down_until = Some(Instant::now() + h.backoff);
        h.failures += 1;
        if was_up {
            tracing::warn!(
                endpoint = %self.list[i].endpoint,
                %error,
                "etcd member failed; using the other members and retrying it with backoff"
            );
        } else {
            tracing::debug!(endpoint = %self.list[i].endpoint, %error, backoff = ?h.backoff, "etcd member still failing");
        }
    }

    /// Runs an etcd call on the healthy members first, moving on at once when one fails,
    /// until [`CALL_BUDGET`] is spent. Writes are compare-and-set guarded by revision, so a
    /// retried write whose first attempt did commit fails its guard instead of applying twice.
    async fn call<T, F, Fut>(&self, mut f: F) -> Result<T, StoreError>
    where
        F: FnMut(Client) -> Fut,
        Fut: Future<Output = Result<T, etcd_client::Error>>,
    {
        let deadline = Instant::now() + CALL_BUDGET;
        let mut errors: Vec<String> = Vec::new();
        loop {
            for i in self.order() {
                let remaining = deadline.saturating_duration_since(Instant::now());
                if remaining.is_zero() {
                    break;
                }
                let member = &self.list[i];
                let error = match tokio::time::timeout(
                    remaining.min(ATTEMPT_TIMEOUT),
                    f(member.client.clone()),
                )
                .await
                {
                    Ok(Ok(v)) => {
                        self.mark_ok(i);
                        self.preferred.store(i, Ordering::Relaxed);
                        return Ok(v);
                    }
                    Ok(Err(e)) if transient(&e) => e.to_string(),
                    Ok(Err(e)) => return Err(eerr(e)),
                    Err(_) => format!("no answer within {:?}", remaining.min(ATTEMPT_TIMEOUT)),
                };
                self.mark_failed(i, &error);
                let line = format!("{}: {error}", member.endpoint);
                errors.retain(|e| !e.starts_with(&format!("{}: ", member.endpoint)));
                errors.push(line);
            }
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                return Err(StoreError::Unavailable {
                    backend: "etcd",
                    detail: format!(
                        "no member answered within {CALL_BUDGET:?} ({})",
                        errors.join("; ")
                    ),
                });
            }
            tokio::time::sleep(remaining.min(ROUND_PAUSE)).await;
        }
    }
}

/// The etcd backend: one client per member (cheap to clone).
#[derive(Clone)]
pub struct EtcdStore {
    members: Arc<Members>,
}

impl std::fmt::Debug for EtcdStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let endpoints: Vec<&str> = self
            .members
            .list
            .iter()
            .map(|m| m.endpoint.as_str())
            .collect();
        f.debug_struct("EtcdStore")
            .field("endpoints", &endpoints)
            .finish()
    }
}

fn eerr(e: etcd_client::Error) -> StoreError {
    StoreError::Etcd(e)
}

/// Whether an etcd error is worth retrying on another member (the one we talked to died or
/// lost quorum for a moment).
fn transient(e: &etcd_client::Error) -> bool {
    match e {
        etcd_client::Error::TransportError(_) | etcd_client::Error::IoError(_) => true,
        etcd_client::Error::GRpcStatus(s) => matches!(
            s.code(),
            tonic::Code::Unavailable
                | tonic::Code::DeadlineExceeded
                // tonic's own request timeout ("Timeout expired").
                | tonic::Code::Cancelled
                | tonic::Code::Unknown
                | tonic::Code::Aborted
        ),
        _ => false,
    }
}

fn rev(r: i64) -> u64 {
    u64::try_from(r).unwrap_or(0)
}

fn irev(r: u64) -> i64 {
    i64::try_from(r).unwrap_or(i64::MAX)
}

/// How the store speaks TLS to etcd (kube-apiserver's `--etcd-cafile`, `--etcd-certfile`,
/// `--etcd-keyfile`): members are verified with `ca`, the store presents `cert` and `key`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcdTls {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl EtcdTls {
    /// The client's TLS options, from the PEM files.
    pub fn options(&self) -> Result<TlsOptions, StoreError> {
        let read = |path: &PathBuf| {
            std::fs::read(path).map_err(|e| StoreError::Unavailable {
                backend: "etcd",
                detail: format!("reading {}: {e}", path.display()),
            })
        };
        Ok(TlsOptions::new()
            .ca_certificate(Certificate::from_pem(read(&self.ca)?))
            .identity(Identity::from_pem(read(&self.cert)?, read(&self.key)?)))
    }
}

impl EtcdStore {
    /// Connects to the cluster (`http://h:port` or `h:port` endpoints).
    pub async fn connect(endpoints: &[String]) -> Result<Self, StoreError> {
        Self::connect_with(endpoints, None).await
    }

    /// Connects to the cluster, over TLS when `tls` is given (`https://h:port` endpoints).
    ///
    /// Each member gets its own (lazily connecting) client, so calls go to the members that
    /// answer and a dead one is retried only after its backoff. `require_leader` makes a member
    /// that lost its leader refuse at once instead of holding the call.
    pub async fn connect_with(
        endpoints: &[String],
        tls: Option<&EtcdTls>,
    ) -> Result<Self, StoreError> {
        let mut opts = ConnectOptions::new()
            .with_connect_timeout(ATTEMPT_TIMEOUT)
            .with_timeout(ATTEMPT_TIMEOUT)
            .with_keep_alive(Duration::from_secs(5), Duration::from_secs(5))
            .with_require_leader(true);
        if let Some(tls) = tls {
            opts = opts.with_tls(tls.options()?);
        }
        let mut list = Vec::with_capacity(endpoints.len());
        for endpoint in endpoints {
            let client = Client::connect([endpoint], Some(opts.clone()))
                .await
                .map_err(eerr)?;
            list.push(Member {
                endpoint: endpoint.clone(),
                client,
                health: Mutex::new(Health::default()),
            });
        }
        if list.is_empty() {
            return Err(StoreError::Unavailable {
                backend: "etcd",
                detail: "no endpoints given".into(),
            });
        }
        Ok(Self {
            members: Arc::new(Members {
                list,
                preferred: AtomicUsize::new(0),
            }),
        })
    }

    async fn guarded(
        &self,
        key: &str,
        guard: Compare,
        op: TxnOp,
    ) -> Result<(bool, u64, Option<u64>), StoreError> {
        let txn = Txn::new()
            .when([guard])
            .and_then([op])
            .or_else([TxnOp::get(key, None)]);
        let resp = self
            .members
            .call(|c| {
                let txn = txn.clone();
                let mut kv = c.kv_client();
                async move { kv.txn(txn).await }
            })
            .await?;
        let revision = resp.header().map(|h| rev(h.revision())).unwrap_or(0);
        let current = resp.op_responses().into_iter().find_map(|r| match r {
            TxnOpResponse::Get(g) => g.kvs().first().map(|kv| rev(kv.mod_revision())),
            _ => None,
        });
        Ok((resp.succeeded(), revision, current))
    }
}

/// Opens an etcd watch on `prefix` for revisions after `after`.
async fn open_watch(
    members: &Members,
    prefix: &str,
    after: u64,
) -> Result<etcd_client::WatchStream, StoreError> {
    let opts = WatchOptions::new()
        .with_prefix()
        .with_prev_key()
        .with_start_revision(irev(after + 1));
    members
        .call(|c| {
            let mut w = c.watch_client();
            let opts = opts.clone();
            async move { w.watch(prefix, Some(opts)).await }
        })
        .await
}

/// Reopens a broken watch, for as long as its reader is there: a member election can take
/// longer than one call's retries, and the reader must not see the stream end meanwhile.
async fn reopen(
    client: &Members,
    prefix: &str,
    last: u64,
    tx: &mpsc::Sender<Result<StoreEvent, StoreError>>,
) -> Option<etcd_client::WatchStream> {
    // Warned once per outage: every watch retries until the store is back.
    let mut warned = false;
    loop {
        tokio::select! {
            r = open_watch(client, prefix, last) => match r {
                Ok(s) => return Some(s),
                Err(e) if !warned => {
                    warned = true;
                    tracing::warn!(error = %e, last, prefix, "reopening etcd watch failed; retrying");
                }
                Err(e) => tracing::debug!(error = %e, last, prefix, "reopening etcd watch failed; retrying"),
            },
            () = tx.closed() => return None,
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

impl Store for EtcdStore {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        let resp = self
            .members
            .call(|c| {
                let mut kv = c.kv_client();
                async move { kv.get(key, None).await }
            })
            .await?;
        Ok(resp.kvs().first().map(|kv| KeyValue {
            key: key.to_string(),
            value: kv.value().to_vec(),
            revision: rev(kv.mod_revision()),
        }))
    }

    async fn list(&self, prefix: &str) -> Result<(Vec<KeyValue>, u64), StoreError> {
        let resp = self
            .members
            .call(|c| {
                let mut kv = c.kv_client();
                async move { kv.get(prefix, Some(GetOptions::new().with_prefix())).await }
            })
            .await?;
        let revision = resp.header().map(|h| rev(h.revision())).unwrap_or(0);
        let items = resp
            .kvs()
            .iter()
            .map(|kv| KeyValue {
                key: String::from_utf8_lossy(kv.key()).into_owned(),
                value: kv.value().to_vec(),
                revision: rev(kv.mod_revision()),
            })
            .collect();
        Ok((items, revision))
    }

    async fn create(&self, key: &str, value: Vec<u8>) -> Result<u64, StoreError> {
        let guard = Compare::create_revision(key, CompareOp::Equal, 0);
        match self
            .guarded(key, guard, TxnOp::put(key, value, None))
            .await?
        {
            (true, revision, _) => Ok(revision),
            (false, _, _) => Err(StoreError::AlreadyExists(key.to_string())),
        }
    }

    async fn update(&self, key: &str, value: Vec<u8>, expected: u64) -> Result<u64, StoreError> {
        let guard = Compare::mod_revision(key, CompareOp::Equal, irev(expected));
        match self
            .guarded(key, guard, TxnOp::put(key, value, None))
            .await?
        {
            (true, revision, _) => Ok(revision),
            (false, _, None) => Err(StoreError::NotFound(key.to_string())),
            (false, _, Some(current)) => Err(StoreError::Conflict {
                key: key.to_string(),
                expected,
                current,
            }),
        }
    }

    async fn delete(&self, key: &str, expected: u64) -> Result<u64, StoreError> {
        let guard = Compare::mod_revision(key, CompareOp::Equal, irev(expected));
        match self.guarded(key, guard, TxnOp::delete(key, None)).await? {
            (true, revision, _) => Ok(revision),
            (false, _, None) => Err(StoreError::NotFound(key.to_string())),
            (false, _, Some(current)) => Err(StoreError::Conflict {
                key: key.to_string(),
                expected,
                current,
            }),
        }
    }

    async fn watch(&self, prefix: &str, after: u64) -> Result<WatchStream, StoreError> {
        let mut stream = open_watch(&self.members, prefix, after).await?;
        let (tx, rx) = mpsc::channel(256);
        let client = self.members.clone();
        let prefix = prefix.to_string();
        tokio::spawn(async move {
            let mut last = after;
            loop {
                // Stop (and so cancel the etcd watch) as soon as the reader goes away.
                let next = tokio::select! {
                    m = stream.message() => m,
                    () = tx.closed() => return,
                };
                let msg = match next {
                    Ok(Some(m)) => m,
                    // The member serving the watch went away: resume on another one from the
                    // last revision delivered, so the reader sees no gap and no repeat.
                    Ok(None) => match reopen(&client, &prefix, last, &tx).await {
                        Some(s) => {
                            stream = s;
                            continue;
                        }
                        None => return,
                    },
                    Err(e) if transient(&e) => {
                        tracing::warn!(error = %e, last, "etcd watch broke; resuming");
                        match reopen(&client, &prefix, last, &tx).await {
                            Some(s) => {
                                stream = s;
                                continue;
                            }
                            None => return,
                        }
                    }
                    Err(e) => {
                        let _ = tx.send(Err(eerr(e))).await;
                        return;
                    }
                };
                if msg.compact_revision() > 0 {
                    let oldest = rev(msg.compact_revision());
                    let _ = tx
                        .send(Err(StoreError::Compacted {
                            requested: last,
                            oldest,
                        }))
                        .await;
                    return;
                }
                if msg.canceled() {
                    let _ = tx
                        .send(Err(StoreError::Task("etcd cancelled the watch".into())))
                        .await;
                    return;
                }
                for ev in msg.events() {
                    let Some(kv) = ev.kv() else { continue };
                    let key = String::from_utf8_lossy(kv.key()).into_owned();
                    let revision = rev(kv.mod_revision());
                    let out = match ev.event_type() {
                        EventType::Put => StoreEvent {
                            kind: EventKind::Put {
                                created: kv.create_revision() == kv.mod_revision(),
                            },
                            kv: KeyValue {
                                key,
                                value: kv.value().to_vec(),
                                revision,
                            },
                        },
                        EventType::Delete => StoreEvent {
                            kind: EventKind::Delete,
                            kv: KeyValue {
                                key,
                                value: ev.prev_kv().map(|p| p.value().to_vec()).unwrap_or_default(),
                                revision,
                            },
                        },
                    };
                    last = last.max(revision);
                    if tx.send(Ok(out)).await.is_err() {
                        return;
                    }
                }
            }
        });
        Ok(rx)
    }
    async fn txn(&self, steps: Vec<Cas>) -> Result<Vec<u64>, StoreError> {
        multi_txn(&self.members, steps).await
    }
}

/// One etcd transaction for a multi-key compare-and-set: a compare per step, the writes when
/// all hold, else a read of each step's key to say which one failed.
async fn multi_txn(members: &Members, steps: Vec<Cas>) -> Result<Vec<u64>, StoreError> {
    let (mut compares, mut writes, mut reads) = (Vec::new(), Vec::new(), Vec::new());
    for step in &steps {
        let key = step.key.as_str();
        compares.push(match step.expect {
            Expect::Absent => Compare::create_revision(key, CompareOp::Equal, 0),
            Expect::Revision(r) => Compare::mod_revision(key, CompareOp::Equal, irev(r)),
            Expect::PrefixUnchangedSince(r) => {
                Compare::mod_revision(key, CompareOp::Less, irev(r + 1)).with_prefix()
            }
        });
        reads.push(match step.expect {
            Expect::PrefixUnchangedSince(r) => TxnOp::get(
                key,
                Some(
                    GetOptions::new()
                        .with_prefix()
                        .with_keys_only()
                        .with_min_mod_revision(irev(r + 1))
                        .with_limit(1),
                ),
            ),
            _ => TxnOp::get(key, Some(GetOptions::new().with_keys_only())),
        });
        match &step.then {
            Then::Keep => {}
            Then::Put(v) => writes.push(TxnOp::put(key, v.clone(), None)),
            Then::Delete => writes.push(TxnOp::delete(key, None)),
        }
    }
    let txn = Txn::new().when(compares).and_then(writes).or_else(reads);
    let resp = members
        .call(|c| {
            let txn = txn.clone();
            let mut kv = c.kv_client();
            async move { kv.txn(txn).await }
        })
        .await?;
    if resp.succeeded() {
        let revision = resp.header().map(|h| rev(h.revision())).unwrap_or(0);
        return Ok(steps
            .iter()
            .map(|s| match (&s.then, s.expect) {
                (Then::Keep, Expect::Revision(r)) => r,
                (Then::Keep, _) => 0,
                _ => revision,
            })
            .collect());
    }
    let found = resp.op_responses().into_iter().map(|r| match r {
        TxnOpResponse::Get(g) => g.kvs().first().map(|kv| rev(kv.mod_revision())),
        _ => None,
    });
    for (step, current) in steps.iter().zip(found) {
        let key = step.key.clone();
        match (step.expect, current) {
            (Expect::Absent, Some(_)) => return Err(StoreError::AlreadyExists(key)),
            (Expect::Revision(_), None) => return Err(StoreError::NotFound(key)),
            (Expect::Revision(expected), Some(current))
            | (Expect::PrefixUnchangedSince(expected), Some(current))
                if current != expected =>
            {
                return Err(StoreError::Conflict {
                    key,
                    expected,
                    current,
                });
            }
            _ => {}
        }
    }
    // Every key reads as expected now: a concurrent writer changed one and changed it back.
    Err(StoreError::Conflict {
        key: steps.first().map(|s| s.key.clone()).unwrap_or_default(),
        expected: 0,
        current: 0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn members(n: usize) -> Result<Members, StoreError> {
        let mut list = Vec::new();
        for i in 0..n {
            // Nothing listens there; clients connect lazily, and no call is made.
            let endpoint = format!("http://127.0.0.1:{}", 1 + i);
            let client = Client::connect([&endpoint], None).await.map_err(eerr)?;
            list.push(Member {
                endpoint,
                client,
                health: Mutex::new(Health::default()),
            });
        }
        Ok(Members {
            list,
            preferred: AtomicUsize::new(0),
        })
    }

    #[tokio::test]
    async fn calls_stay_on_the_answering_member_and_pass_over_failed_ones() -> Result<(), StoreError>
    {
        let m = members(3).await?;
        assert_eq!(m.order(), vec![0, 1, 2]);
        m.mark_failed(0, "connection refused");
        assert_eq!(m.order(), vec![1, 2, 0], "the failed member is tried last");
        m.preferred.store(1, Ordering::Relaxed);
        m.mark_failed(2, "connection refused");
        assert_eq!(
            m.order(),
            vec![1, 0, 2],
            "failed ones by when their backoff ends"
        );
        let first = m.health(0).backoff;
        m.mark_failed(0, "connection refused");
        assert_eq!(m.health(0).backoff, (first * 2).min(BACKOFF_MAX));
        m.mark_ok(0);
        assert!(m.health(0).down_until.is_none());
        assert_eq!(
            m.order(),
            vec![1, 0, 2],
            "a member that answers again is healthy"
        );
        Ok(())
    }
}
