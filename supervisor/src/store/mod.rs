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
}
