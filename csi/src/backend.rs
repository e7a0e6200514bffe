//! The storage behind the Controller service, as a trait: today a block store daemon reached
//! through its local control socket; later the supervisor (paravirtual forwarding).

use std::future::Future;
use std::path::PathBuf;

use slipway_blockstore::control::{self, ControlError, ControlRequest};

use crate::error::CsiError;

/// A volume or snapshot as the backend reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendVolume {
    /// Name: `volume` or `volume@snapshot`.
    pub name: String,
    /// True for a snapshot.
    pub snapshot: bool,
    /// Size in bytes.
    pub size: u64,
    /// For a clone, the snapshot it came from; for a snapshot, its volume.
    pub origin: Option<String>,
}

/// What the Controller needs from the storage. Every call is one request; the controller
/// decides idempotency and error codes from [`VolumeBackend::list`], not from error strings.
pub trait VolumeBackend: Send + Sync + 'static {
    /// Every volume and snapshot.
    fn list(&self) -> impl Future<Output = Result<Vec<BackendVolume>, CsiError>> + Send;
    /// Creates a thin volume.
    fn create(&self, name: &str, size: u64) -> impl Future<Output = Result<(), CsiError>> + Send;
    /// Snapshots `volume` as `volume@name`.
    fn snapshot(
        &self,
        volume: &str,
        name: &str,
    ) -> impl Future<Output = Result<(), CsiError>> + Send;
    /// Creates volume `name` from snapshot `snapshot` (`volume@snap`).
    fn clone_snapshot(
        &self,
        snapshot: &str,
        name: &str,
    ) -> impl Future<Output = Result<(), CsiError>> + Send;
    /// Grows a volume.
    fn resize(&self, name: &str, size: u64) -> impl Future<Output = Result<(), CsiError>> + Send;
    /// Deletes a volume or snapshot (never its dependents).
    fn delete(&self, name: &str) -> impl Future<Output = Result<(), CsiError>> + Send;
}

/// A block store daemon on this machine, through its control socket.
#[derive(Debug, Clone)]
pub struct BlockstoreBackend {
    control: PathBuf,
}

impl BlockstoreBackend {
    /// A backend talking to the control socket at `control`.
    pub fn new(control: PathBuf) -> Self {
        Self { control }
    }

    async fn call(&self, req: ControlRequest) -> Result<control::ControlResponse, CsiError> {
        control::call(&self.control, &req)
            .await
            .map_err(|e| match e {
                ControlError::Io { .. } => CsiError::BackendUnavailable(e),
                other => CsiError::Backend(other),
            })
    }
}

impl VolumeBackend for BlockstoreBackend {
    async fn list(&self) -> Result<Vec<BackendVolume>, CsiError> {
        let resp = self.call(ControlRequest::List {}).await?;
        Ok(resp
            .volumes
            .into_iter()
            .map(|v| BackendVolume {
                snapshot: v.kind == "snapshot",
                name: v.name,
                size: v.size,
                origin: v.origin,
            })
            .collect())
    }

    async fn create(&self, name: &str, size: u64) -> Result<(), CsiError> {
        self.call(ControlRequest::Create {
            name: name.into(),
            size,
        })
        .await
        .map(drop)
    }

    async fn snapshot(&self, volume: &str, name: &str) -> Result<(), CsiError> {
        self.call(ControlRequest::Snapshot {
            volume: volume.into(),
            name: name.into(),
        })
        .await
        .map(drop)
    }

    async fn clone_snapshot(&self, snapshot: &str, name: &str) -> Result<(), CsiError> {
        self.call(ControlRequest::Clone {
            snapshot: snapshot.into(),
            name: name.into(),
        })
        .await
        .map(drop)
    }

    async fn resize(&self, name: &str, size: u64) -> Result<(), CsiError> {
        self.call(ControlRequest::Resize {
            name: name.into(),
            size,
        })
        .await
        .map(drop)
    }

    async fn delete(&self, name: &str) -> Result<(), CsiError> {
        self.call(ControlRequest::Delete {
            name: name.into(),
            cascade: false,
        })
        .await
        .map(drop)
    }
}
