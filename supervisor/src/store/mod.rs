//! The object store seam: one trait, two backends (embedded redb, etcd), both with monotonic
//! revisions and watch from a revision.

pub mod etcd;
pub mod redb;

use std::future::Future;

use tokio::sync::mpsc;

/// One stored object: its key, its serialized bytes and the revision that last modified it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyValue {
    /// Full key (`/registry/{group}/{resource}/[{namespace}/]{name}`).
    pub key: String,
    /// Serialized object (JSON without `metadata.resourceVersion`).
    pub value: Vec<u8>,
    /// Revision of the last modification.
    pub revision: u64,
}

/// What happened to a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    /// Created or modified.
    Put {
        /// True when the key did not exist before.
        created: bool,
    },
    /// Deleted; the value is the last one the key held.
    Delete,
}

/// One change, as a watcher sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreEvent {
    /// What happened.
    pub kind: EventKind,
    /// The key and its value (for a delete, the last value) at the event's revision.
    pub kv: KeyValue,
}

/// Store failures.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Create of a key that exists.
    #[error("key {0} already exists")]
    AlreadyExists(String),
    /// Update or delete of a key that does not exist.
    #[error("key {0} not found")]
    NotFound(String),
    /// The key's revision is not the expected one.
    #[error("key {key} is at revision {current}, not {expected}")]
    Conflict {
        /// Key.
        key: String,
        /// Revision the caller expected.
        expected: u64,
        /// Revision the key has.
        current: u64,
    },
    /// A watch asked for a revision older than the retained history.
    #[error("revision {requested} is compacted; oldest available is {oldest}")]
    Compacted {
        /// Revision asked for.
        requested: u64,
        /// Oldest revision still available.
        oldest: u64,
    },
    /// The embedded database failed.
    #[error("redb")]
    Redb(#[source] ::redb::Error),
    /// The etcd cluster failed or is unreachable.
    #[error("etcd")]
    Etcd(#[source] etcd_client::Error),
    /// The store did not answer in time (members down, quorum lost).
    #[error("{backend} unavailable: {detail}")]
    Unavailable {
        /// Which backend (`etcd`).
        backend: &'static str,
        /// What failed, member by member.
        detail: String,
    },
    /// A background task failed.
    #[error("store task failed: {0}")]
    Task(String),
    /// A watch fell too far behind the writers and must be restarted from a new list.
    #[error("watcher fell behind")]
    Lagged,
}

/// What a transaction step expects of its key before anything is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    /// The key does not exist.
    Absent,
    /// The key exists at exactly this revision.
    Revision(u64),
    /// No key under the step's key (a prefix) was modified after this revision: a collection
    /// read at this revision is still what the store holds, apart from deletions.
    PrefixUnchangedSince(u64),
}

/// What a transaction step does once every expectation held.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Then {
    /// Nothing: the step is a guard only.
    Keep,
    /// Writes this value.
    Put(Vec<u8>),
    /// Deletes the key.
    Delete,
}

/// One step of a multi-key compare-and-set transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cas {
    /// The key (for `Expect::PrefixUnchangedSince`, the prefix).
    pub key: String,
    /// What must hold first.
    pub expect: Expect,
    /// What to do.
    pub then: Then,
}

impl Cas {
    /// Creates `key`.
    pub fn create(key: &str, value: Vec<u8>) -> Self {
        Self {
            key: key.into(),
            expect: Expect::Absent,
            then: Then::Put(value),
        }
    }
    /// Replaces `key` at `revision`.
    pub fn update(key: &str, value: Vec<u8>, revision: u64) -> Self {
        Self {
            key: key.into(),
            expect: Expect::Revision(revision),
            then: Then::Put(value),
        }
    }
    /// Deletes `key` at `revision`.
    pub fn delete(key: &str, revision: u64) -> Self {
        Self {
            key: key.into(),
            expect: Expect::Revision(revision),
            then: Then::Delete,
        }
    }
    /// Writes `key` whether or not it exists, provided it is still as read (`None`: absent).
    pub fn put(key: &str, value: Vec<u8>, read: Option<u64>) -> Self {
        Self {
            key: key.into(),
            expect: read.map_or(Expect::Absent, Expect::Revision),
            then: Then::Put(value),
        }
    }
    /// Guards on `key` still being as read (`None`: absent).
    pub fn unchanged(key: &str, read: Option<u64>) -> Self {
        Self {
            key: key.into(),
            expect: read.map_or(Expect::Absent, Expect::Revision),
            then: Then::Keep,
        }
    }
    /// Guards on no key under `prefix` having changed after `revision`.
    pub fn prefix_unchanged(prefix: &str, revision: u64) -> Self {
        Self {
            key: prefix.into(),
            expect: Expect::PrefixUnchangedSince(revision),
            then: Then::Keep,
        }
    }
}

impl StoreError {
    /// The key a refused transaction step named (exists, missing or stale), if this is one.
    pub fn refused_key(&self) -> Option<&str> {
        match self {
            Self::AlreadyExists(k) | Self::NotFound(k) | Self::Conflict { key: k, .. } => Some(k),
            _ => None,
        }
    }
}

/// Receives the events of one watch, in revision order.
pub type WatchStream = mpsc::Receiver<Result<StoreEvent, StoreError>>;

/// The storage contract every backend meets: linearizable single-key compare-and-set writes,
/// one global monotonic revision, and watch from any retained revision.
///
/// Every write future resolves only after the write is durable (redb commit with
/// `Durability::Immediate`, etcd quorum ack).
pub trait Store: Send + Sync + 'static {
    /// Reads one key.
    fn get(&self, key: &str) -> impl Future<Output = Result<Option<KeyValue>, StoreError>> + Send;
    /// Reads all keys under a prefix, and the store revision the read saw.
    fn list(
        &self,
        prefix: &str,
    ) -> impl Future<Output = Result<(Vec<KeyValue>, u64), StoreError>> + Send;
    /// Creates a key; fails with `AlreadyExists`. Returns the new revision.
    fn create(
        &self,
        key: &str,
        value: Vec<u8>,
    ) -> impl Future<Output = Result<u64, StoreError>> + Send;
    /// Replaces a key whose revision is `expected`; fails with `Conflict` or `NotFound`.
    fn update(
        &self,
        key: &str,
        value: Vec<u8>,
        expected: u64,
    ) -> impl Future<Output = Result<u64, StoreError>> + Send;
    /// Deletes a key whose revision is `expected`. Returns the delete's revision.
    fn delete(
        &self,
        key: &str,
        expected: u64,
    ) -> impl Future<Output = Result<u64, StoreError>> + Send;
    /// Streams every change under `prefix` with a revision greater than `after`.
    fn watch(
        &self,
        prefix: &str,
        after: u64,
    ) -> impl Future<Output = Result<WatchStream, StoreError>> + Send;
    /// Applies every step or none: when an expectation fails, nothing is written and the error
    /// (`AlreadyExists`, `NotFound` or `Conflict`) names the first step's key that failed.
    /// Returns each step's revision (a written key's new one, a guard's current one).
    fn txn(&self, steps: Vec<Cas>) -> impl Future<Output = Result<Vec<u64>, StoreError>> + Send;
}

/// The backend chosen at start-up.
#[derive(Debug)]
pub enum AnyStore {
    /// Embedded single-file store.
    Redb(redb::RedbStore),
    /// External etcd cluster.
    Etcd(Box<etcd::EtcdStore>),
}

impl Store for AnyStore {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        match self {
            Self::Redb(s) => s.get(key).await,
            Self::Etcd(s) => s.get(key).await,
        }
    }
    async fn list(&self, prefix: &str) -> Result<(Vec<KeyValue>, u64), StoreError> {
        match self {
            Self::Redb(s) => s.list(prefix).await,
            Self::Etcd(s) => s.list(prefix).await,
        }
    }
    async fn create(&self, key: &str, value: Vec<u8>) -> Result<u64, StoreError> {
        match self {
            Self::Redb(s) => s.create(key, value).await,
            Self::Etcd(s) => s.create(key, value).await,
        }
    }
    async fn update(&self, key: &str, value: Vec<u8>, expected: u64) -> Result<u64, StoreError> {
        match self {
            Self::Redb(s) => s.update(key, value, expected).await,
            Self::Etcd(s) => s.update(key, value, expected).await,
        }
    }
    async fn delete(&self, key: &str, expected: u64) -> Result<u64, StoreError> {
        match self {
            Self::Redb(s) => s.delete(key, expected).await,
            Self::Etcd(s) => s.delete(key, expected).await,
        }
    }
    async fn watch(&self, prefix: &str, after: u64) -> Result<WatchStream, StoreError> {
        match self {
            Self::Redb(s) => s.watch(prefix, after).await,
            Self::Etcd(s) => s.watch(prefix, after).await,
        }
    }
    async fn txn(&self, steps: Vec<Cas>) -> Result<Vec<u64>, StoreError> {
        match self {
            Self::Redb(s) => s.txn(steps).await,
            Self::Etcd(s) => s.txn(steps).await,
        }
    }
}
