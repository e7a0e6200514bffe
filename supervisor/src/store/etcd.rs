//! The etcd backend: the HA store. Every write is one etcd transaction guarded by the key's
//! create/mod revision, so resourceVersions are etcd revisions and watch resumes from them.

use std::future::Future;
use std::time::Duration;

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, Txn, TxnOp, TxnOpResponse,
    WatchOptions,
};
use tokio::sync::mpsc;

use super::{Cas, EventKind, Expect, KeyValue, Store, StoreError, StoreEvent, Then, WatchStream};

/// The etcd backend (a cheap-to-clone client over one gRPC channel per endpoint).
#[derive(Clone)]
pub struct EtcdStore {
    client: Client,
    endpoints: Vec<String>,
}

impl std::fmt::Debug for EtcdStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdStore")
            .field("endpoints", &self.endpoints)
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
                | tonic::Code::Unknown
                | tonic::Code::Aborted
        ),
        _ => false,
    }
}

/// Runs an etcd call, retrying transient failures with backoff. Writes are compare-and-set
/// guarded by revision, so a retried write whose first attempt did commit fails its guard
/// instead of applying twice.
async fn retry<T, F, Fut>(mut f: F) -> Result<T, StoreError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, etcd_client::Error>>,
{
    let mut delay = Duration::from_millis(100);
    let mut attempt = 0;
    loop {
        match f().await {
            Ok(v) => return Ok(v),
            Err(e) if transient(&e) && attempt < 6 => {
                tracing::warn!(error = %e, attempt, "etcd call failed; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(2));
                attempt += 1;
            }
            Err(e) => return Err(eerr(e)),
        }
    }
}

fn rev(r: i64) -> u64 {
    u64::try_from(r).unwrap_or(0)
}

fn irev(r: u64) -> i64 {
    i64::try_from(r).unwrap_or(i64::MAX)
}

impl EtcdStore {
    /// Connects to the cluster (`http://h:port` or `h:port` endpoints).
    pub async fn connect(endpoints: &[String]) -> Result<Self, StoreError> {
        let opts = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(5))
            .with_timeout(Duration::from_secs(10))
            .with_keep_alive(Duration::from_secs(5), Duration::from_secs(5));
        let client = Client::connect(endpoints, Some(opts)).await.map_err(eerr)?;
        Ok(Self {
            client,
            endpoints: endpoints.to_vec(),
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
        let resp = retry(|| {
            let txn = txn.clone();
            let mut kv = self.client.kv_client();
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
    client: &Client,
    prefix: &str,
    after: u64,
) -> Result<etcd_client::WatchStream, StoreError> {
    let opts = WatchOptions::new()
        .with_prefix()
        .with_prev_key()
        .with_start_revision(irev(after + 1));
    retry(|| {
        let mut w = client.watch_client();
        let opts = opts.clone();
        async move { w.watch(prefix, Some(opts)).await }
    })
    .await
}

/// Reopens a broken watch, for as long as its reader is there: a member election can take
/// longer than one call's retries, and the reader must not see the stream end meanwhile.
async fn reopen(
    client: &Client,
    prefix: &str,
    last: u64,
    tx: &mpsc::Sender<Result<StoreEvent, StoreError>>,
) -> Option<etcd_client::WatchStream> {
    loop {
        tokio::select! {
            r = open_watch(client, prefix, last) => match r {
                Ok(s) => return Some(s),
                Err(e) => tracing::warn!(error = %e, last, "reopening etcd watch failed; retrying"),
            },
            () = tx.closed() => return None,
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

impl Store for EtcdStore {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        let resp = retry(|| {
            let mut kv = self.client.kv_client();
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
        let resp = retry(|| {
            let mut kv = self.client.kv_client();
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
        let mut stream = open_watch(&self.client, prefix, after).await?;
        let (tx, rx) = mpsc::channel(256);
        let client = self.client.clone();
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
        multi_txn(&self.client, steps).await
    }
}

/// One etcd transaction for a multi-key compare-and-set: a compare per step, the writes when
/// all hold, else a read of each step's key to say which one failed.
async fn multi_txn(client: &Client, steps: Vec<Cas>) -> Result<Vec<u64>, StoreError> {
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
    let resp = retry(|| {
        let txn = txn.clone();
        let mut kv = client.kv_client();
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
