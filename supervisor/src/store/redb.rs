//! The embedded store: one redb file holding the objects, the global revision and a bounded
//! event log that watches resume from (also across restarts).

use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::sync::Arc;
use std::sync::mpsc as std_mpsc;

use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition};
use tokio::sync::{broadcast, mpsc, oneshot};

use super::{Cas, EventKind, Expect, KeyValue, Store, StoreError, StoreEvent, Then, WatchStream};

/// key -> (mod revision, value)
const OBJECTS: TableDefinition<&str, (u64, &[u8])> = TableDefinition::new("objects");
/// revision -> (kind: 0 put-create, 1 put-update, 2 delete, key, value)
const EVENTS: TableDefinition<u64, (u8, &str, &[u8])> = TableDefinition::new("events");
/// "revision" -> last revision, "compacted" -> highest revision dropped from the event log
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");

/// How many events the log keeps for watches to resume from.
pub const DEFAULT_HISTORY: u64 = 10_000;

/// The redb backend.
#[derive(Debug, Clone)]
pub struct RedbStore {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    db: Arc<Database>,
    /// Queue of the single writer thread, which commits concurrent writes together.
    writer: Option<std_mpsc::Sender<WriteReq>>,
    writer_thread: Option<std::thread::JoinHandle<()>>,
    events: broadcast::Sender<StoreEvent>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Closing the queue ends the writer; joining it releases the database file, so the
        // store can be reopened as soon as the last handle is gone.
        self.writer.take();
        if let Some(t) = self.writer_thread.take() {
            let _ = t.join();
        }
    }
}

fn rerr(e: impl Into<redb::Error>) -> StoreError {
    StoreError::Redb(e.into())
}

fn kind_code(kind: EventKind) -> u8 {
    match kind {
        EventKind::Put { created: true } => 0,
        EventKind::Put { created: false } => 1,
        EventKind::Delete => 2,
    }
}

fn code_kind(code: u8) -> EventKind {
    match code {
        0 => EventKind::Put { created: true },
        1 => EventKind::Put { created: false },
        _ => EventKind::Delete,
    }
}

#[derive(Debug)]
struct WriteReq {
    steps: Vec<Cas>,
    reply: oneshot::Sender<Result<Vec<u64>, StoreError>>,
}

/// Most writes committed in one transaction (one fsync).
const MAX_BATCH: usize = 256;

type Tables<'t> = (
    redb::Table<'t, &'static str, (u64, &'static [u8])>,
    redb::Table<'t, &'static str, u64>,
    redb::Table<'t, u64, (u8, &'static str, &'static [u8])>,
);

type Objects<'t> = redb::Table<'t, &'static str, (u64, &'static [u8])>;

/// Checks one step's expectation; returns the key's current (revision, value).
fn check(objects: &Objects<'_>, step: &Cas) -> Result<Option<(u64, Vec<u8>)>, StoreError> {
    let key = step.key.as_str();
    if let Expect::PrefixUnchangedSince(since) = step.expect {
        for item in objects.range(key..).map_err(rerr)? {
            let (k, v) = item.map_err(rerr)?;
            if !k.value().starts_with(key) {
                break;
            }
            let (rev, _) = v.value();
            if rev > since {
                return Err(StoreError::Conflict {
                    key: key.to_string(),
                    expected: since,
                    current: rev,
                });
            }
        }
        return Ok(None);
    }
    let current = objects.get(key).map_err(rerr)?.map(|g| {
        let (rev, bytes) = g.value();
        (rev, bytes.to_vec())
    });
    match (step.expect, &current) {
        (Expect::Absent, Some(_)) => Err(StoreError::AlreadyExists(key.to_string())),
        (Expect::Revision(_), None) => Err(StoreError::NotFound(key.to_string())),
        (Expect::Revision(expected), Some((rev, _))) if expected != *rev => {
            Err(StoreError::Conflict {
                key: key.to_string(),
                expected,
                current: *rev,
            })
        }
        _ => Ok(current),
    }
}

/// Applies one transaction inside the batch's database transaction: every expectation is
/// checked before anything is written, so a refusal touches nothing and the rest of the batch
/// commits without it. Each written key gets a revision of its own.
fn apply_txn(
    t: &mut Tables<'_>,
    req: &mut WriteReq,
    history: u64,
) -> Result<(Vec<StoreEvent>, Vec<u64>), StoreError> {
    let (objects, meta, log) = t;
    let mut currents = Vec::with_capacity(req.steps.len());
    for step in &req.steps {
        currents.push(check(objects, step)?);
    }
    let (mut events, mut revisions) = (Vec::new(), Vec::new());
    for (step, current) in req.steps.iter_mut().zip(currents) {
        let key = step.key.as_str();
        let then = std::mem::replace(&mut step.then, Then::Keep);
        let (kind, stored) = match (then, current) {
            (Then::Keep, current) => {
                revisions.push(current.map_or(0, |(rev, _)| rev));
                continue;
            }
            (Then::Put(v), current) => (
                EventKind::Put {
                    created: current.is_none(),
                },
                v,
            ),
            (Then::Delete, Some((_, old))) => (EventKind::Delete, old),
            (Then::Delete, None) => return Err(StoreError::NotFound(key.to_string())),
        };
        let revision = meta
            .get("revision")
            .map_err(rerr)?
            .map(|g| g.value())
            .unwrap_or(0)
            + 1;
        meta.insert("revision", revision).map_err(rerr)?;
        if kind == EventKind::Delete {
            objects.remove(key).map_err(rerr)?;
        } else {
            objects
                .insert(key, (revision, stored.as_slice()))
                .map_err(rerr)?;
        }
        log.insert(revision, (kind_code(kind), key, stored.as_slice()))
            .map_err(rerr)?;
        // Bound the log; remember the newest dropped revision so stale watches get 410.
        if revision > history {
            let drop_upto = revision - history;
            let mut compacted = meta
                .get("compacted")
                .map_err(rerr)?
                .map(|g| g.value())
                .unwrap_or(0);
            while compacted < drop_upto {
                compacted += 1;
                log.remove(compacted).map_err(rerr)?;
            }
            meta.insert("compacted", compacted).map_err(rerr)?;
        }
        revisions.push(revision);
        events.push(StoreEvent {
            kind,
            kv: KeyValue {
                key: key.to_string(),
                value: stored,
                revision,
            },
        });
    }
    Ok((events, revisions))
}

type TxnResult = Result<(Vec<StoreEvent>, Vec<u64>), StoreError>;

/// Commits a batch in one durable transaction; per-request results, or a store error that
/// failed the whole batch.
fn commit_batch(
    db: &Database,
    batch: &mut [WriteReq],
    history: u64,
) -> Result<Vec<TxnResult>, StoreError> {
    let mut txn = db.begin_write().map_err(rerr)?;
    txn.set_durability(Durability::Immediate).map_err(rerr)?;
    let mut results = Vec::with_capacity(batch.len());
    {
        let mut tables: Tables<'_> = (
            txn.open_table(OBJECTS).map_err(rerr)?,
            txn.open_table(META).map_err(rerr)?,
            txn.open_table(EVENTS).map_err(rerr)?,
        );
        for req in batch.iter_mut() {
            match apply_txn(&mut tables, req, history) {
                Err(e @ (StoreError::Redb(_) | StoreError::Task(_))) => return Err(e),
                other => results.push(other),
            }
        }
    }
    txn.commit().map_err(rerr)?;
    Ok(results)
}

/// The writer thread: drains the queue, commits what has accumulated (group commit), then
/// broadcasts the events in revision order and answers each caller.
fn writer_loop(
    db: Arc<Database>,
    rx: std_mpsc::Receiver<WriteReq>,
    events: broadcast::Sender<StoreEvent>,
    history: u64,
) {
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(r) => batch.push(r),
                Err(_) => break,
            }
        }
        match commit_batch(&db, &mut batch, history) {
            Ok(results) => {
                for (req, res) in batch.into_iter().zip(results) {
                    let reply = res.map(|(evs, revisions)| {
                        for ev in evs {
                            // No receivers is fine: nobody is watching.
                            let _ = events.send(ev);
                        }
                        revisions
                    });
                    let _ = req.reply.send(reply);
                }
            }
            Err(e) => {
                tracing::error!(error = %e, writes = batch.len(), "redb commit failed");
                let msg = format!("commit failed: {e}");
                for req in batch {
                    let _ = req.reply.send(Err(StoreError::Task(msg.clone())));
                }
            }
        }
    }
}

impl RedbStore {
    /// Opens (or creates) the store file.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        Self::open_with_history(path, DEFAULT_HISTORY)
    }

    /// Opens the store keeping `history` events for watch resumption.
    pub fn open_with_history(path: &Path, history: u64) -> Result<Self, StoreError> {
        // Every object, tokens' bindings included, is in this file: owner-only (0600), also
        // when an older file was more open. redb initializes an empty file.
        let file_err = |e: std::io::Error| StoreError::Task(format!("{}: {e}", path.display()));
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(path)
            .map_err(file_err)?;
        file.set_permissions(std::fs::Permissions::from_mode(0o600))
            .map_err(file_err)?;
        drop(file);
        let db = Database::create(path).map_err(rerr)?;
        let txn = db.begin_write().map_err(rerr)?;
        {
            txn.open_table(OBJECTS).map_err(rerr)?;
            txn.open_table(EVENTS).map_err(rerr)?;
            txn.open_table(META).map_err(rerr)?;
        }
        txn.commit().map_err(rerr)?;
        let db = Arc::new(db);
        let (events, _) = broadcast::channel(4096);
        let (writer, rx) = std_mpsc::channel();
        let (wdb, wevents) = (db.clone(), events.clone());
        let thread = std::thread::Builder::new()
            .name("redb-writer".into())
            .spawn(move || writer_loop(wdb, rx, wevents, history.max(1)))
            .map_err(|e| StoreError::Task(format!("spawning the writer thread: {e}")))?;
        let inner = Inner {
            db,
            writer: Some(writer),
            writer_thread: Some(thread),
            events,
        };
        Ok(Self {
            inner: Arc::new(inner),
        })
    }

    async fn write(&self, steps: Vec<Cas>) -> Result<Vec<u64>, StoreError> {
        let (reply, rx) = oneshot::channel();
        self.inner
            .writer
            .as_ref()
            .ok_or_else(|| StoreError::Task("the store is closing".into()))?
            .send(WriteReq { steps, reply })
            .map_err(|_| StoreError::Task("the writer thread is gone".into()))?;
        rx.await
            .map_err(|_| StoreError::Task("the writer thread dropped a write".into()))?
    }

    fn read_history(&self, prefix: &str, after: u64) -> Result<Vec<StoreEvent>, StoreError> {
        let txn = self.inner.db.begin_read().map_err(rerr)?;
        let meta = txn.open_table(META).map_err(rerr)?;
        let compacted = meta
            .get("compacted")
            .map_err(rerr)?
            .map(|g| g.value())
            .unwrap_or(0);
        if after < compacted {
            return Err(StoreError::Compacted {
                requested: after,
                oldest: compacted + 1,
            });
        }
        let log = txn.open_table(EVENTS).map_err(rerr)?;
        let mut out = Vec::new();
        for item in log.range(after + 1..).map_err(rerr)? {
            let (rev, entry) = item.map_err(rerr)?;
            let (code, key, value) = entry.value();
            if key.starts_with(prefix) {
                out.push(StoreEvent {
                    kind: code_kind(code),
                    kv: KeyValue {
                        key: key.to_string(),
                        value: value.to_vec(),
                        revision: rev.value(),
                    },
                });
            }
        }
        Ok(out)
    }

    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(RedbStore) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let this = self.clone();
        tokio::task::spawn_blocking(move || f(this))
            .await
            .map_err(|e| StoreError::Task(e.to_string()))?
    }
}

fn first(revisions: Vec<u64>) -> Result<u64, StoreError> {
    revisions
        .first()
        .copied()
        .ok_or_else(|| StoreError::Task("a write returned no revision".into()))
}

impl Store for RedbStore {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        let key = key.to_string();
        self.blocking(move |s| {
            let txn = s.inner.db.begin_read().map_err(rerr)?;
            let objects = txn.open_table(OBJECTS).map_err(rerr)?;
            Ok(objects.get(key.as_str()).map_err(rerr)?.map(|g| {
                let (revision, value) = g.value();
                KeyValue {
                    key: key.clone(),
                    value: value.to_vec(),
                    revision,
                }
            }))
        })
        .await
    }

    async fn list(&self, prefix: &str) -> Result<(Vec<KeyValue>, u64), StoreError> {
        let prefix = prefix.to_string();
        self.blocking(move |s| {
            let txn = s.inner.db.begin_read().map_err(rerr)?;
            let meta = txn.open_table(META).map_err(rerr)?;
            let revision = meta
                .get("revision")
                .map_err(rerr)?
                .map(|g| g.value())
                .unwrap_or(0);
            let objects = txn.open_table(OBJECTS).map_err(rerr)?;
            let mut out = Vec::new();
            for item in objects.range(prefix.as_str()..).map_err(rerr)? {
                let (k, v) = item.map_err(rerr)?;
                let key = k.value();
                if !key.starts_with(prefix.as_str()) {
                    break;
                }
                let (rev, value) = v.value();
                out.push(KeyValue {
                    key: key.to_string(),
                    value: value.to_vec(),
                    revision: rev,
                });
            }
            Ok((out, revision))
        })
        .await
    }

    async fn create(&self, key: &str, value: Vec<u8>) -> Result<u64, StoreError> {
        first(self.write(vec![Cas::create(key, value)]).await?)
    }

    async fn update(&self, key: &str, value: Vec<u8>, expected: u64) -> Result<u64, StoreError> {
        first(self.write(vec![Cas::update(key, value, expected)]).await?)
    }

    async fn delete(&self, key: &str, expected: u64) -> Result<u64, StoreError> {
        first(self.write(vec![Cas::delete(key, expected)]).await?)
    }

    async fn txn(&self, steps: Vec<Cas>) -> Result<Vec<u64>, StoreError> {
        self.write(steps).await
    }

    async fn watch(&self, prefix: &str, after: u64) -> Result<WatchStream, StoreError> {
        // Subscribe before reading history so no event falls between the two.
        let mut live = self.inner.events.subscribe();
        let prefix_owned = prefix.to_string();
        let history = self
            .blocking(move |s| s.read_history(&prefix_owned, after))
            .await?;
        let prefix = prefix.to_string();
        let (tx, rx) = mpsc::channel(256);
        tokio::spawn(async move {
            let mut last = after;
            for ev in history {
                last = ev.kv.revision;
                if tx.send(Ok(ev)).await.is_err() {
                    return;
                }
            }
            loop {
                match live.recv().await {
                    Ok(ev) => {
                        if ev.kv.revision <= last || !ev.kv.key.starts_with(&prefix) {
                            continue;
                        }
                        last = ev.kv.revision;
                        if tx.send(Ok(ev)).await.is_err() {
                            return;
                        }
                    }
                    Err(broadcast::error::RecvError::Lagged(_)) => {
                        let _ = tx.send(Err(StoreError::Lagged)).await;
                        return;
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                }
            }
        });
        Ok(rx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A store file in a fresh directory, removed with the guard (also when a test fails).
    struct TempStore(std::path::PathBuf);

    impl TempStore {
        fn new(name: &str) -> Self {
            let dir =
                std::env::temp_dir().join(format!("slipway-redb-{}-{name}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).expect("temp dir");
            Self(dir)
        }

        fn path(&self) -> std::path::PathBuf {
            self.0.join("store.redb")
        }
    }

    impl Drop for TempStore {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[tokio::test]
    async fn revisions_conflicts_and_watch_history() -> Result<(), StoreError> {
        let dir = TempStore::new("basic");
        let path = dir.path();
        let store = RedbStore::open_with_history(&path, 3)?;
        let r1 = store.create("/a/1", b"one".to_vec()).await?;
        assert!(matches!(
            store.create("/a/1", b"x".to_vec()).await,
            Err(StoreError::AlreadyExists(_))
        ));
        let r2 = store.update("/a/1", b"two".to_vec(), r1).await?;
        assert!(r2 > r1);
        assert!(matches!(
            store.update("/a/1", b"x".to_vec(), r1).await,
            Err(StoreError::Conflict { .. })
        ));
        let r3 = store.create("/b/1", b"b".to_vec()).await?;
        let (items, rev) = store.list("/a/").await?;
        assert_eq!(items.len(), 1);
        assert_eq!(rev, r3);
        let mut w = store.watch("/a/", r1).await?;
        let ev = w.recv().await.expect("event")?;
        assert_eq!(ev.kv.revision, r2);
        let r4 = store.delete("/a/1", r2).await?;
        let ev = w.recv().await.expect("event")?;
        assert_eq!(
            (ev.kind, ev.kv.revision, ev.kv.value.as_slice()),
            (EventKind::Delete, r4, &b"two"[..])
        );
        // History holds 3 events: r1 is gone.
        store.create("/c", b"c".to_vec()).await?;
        assert!(matches!(
            store.watch("/a/", 0).await,
            Err(StoreError::Compacted { .. })
        ));
        drop(w);
        drop(store);
        let reopened = RedbStore::open_with_history(&path, 3)?;
        assert!(reopened.get("/a/1").await?.is_none());
        assert_eq!(reopened.get("/b/1").await?.map(|kv| kv.revision), Some(r3));
        Ok(())
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_writes_commit_together_with_unique_revisions() -> Result<(), StoreError> {
        let dir = TempStore::new("group");
        let path = dir.path();
        let store = RedbStore::open(&path)?;
        let mut tasks = Vec::new();
        for i in 0..200 {
            let s = store.clone();
            tasks.push(tokio::spawn(async move {
                s.create(&format!("/k/{i}"), vec![1]).await
            }));
        }
        // Racing creates of one key inside the same batches: exactly one wins.
        for _ in 0..10 {
            let s = store.clone();
            tasks.push(tokio::spawn(async move { s.create("/dup", vec![2]).await }));
        }
        let mut revs = Vec::new();
        let mut dup_errors = 0;
        for t in tasks {
            match t.await.map_err(|e| StoreError::Task(e.to_string()))? {
                Ok(r) => revs.push(r),
                Err(StoreError::AlreadyExists(_)) => dup_errors += 1,
                Err(e) => return Err(e),
            }
        }
        revs.sort_unstable();
        assert_eq!(revs, (1..=201).collect::<Vec<u64>>());
        assert_eq!(dup_errors, 9);
        let (items, rev) = store.list("/k/").await?;
        assert_eq!((items.len(), rev), (200, 201));
        Ok(())
    }
}
