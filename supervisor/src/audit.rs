//! The audit log: one JSON line per request that changes state or is denied.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::sync::Mutex;

use serde::Serialize;

/// One audit record.
#[derive(Debug, Clone, Serialize)]
pub struct AuditRecord<'a> {
    /// RFC 3339 time.
    pub time: String,
    /// User name (`system:anonymous` when unauthenticated).
    pub user: &'a str,
    /// Kubernetes verb.
    pub verb: &'a str,
    /// Resource plural (or the path for non-resource requests).
    pub resource: &'a str,
    /// Subresource (`status`), if the request was for one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub subresource: Option<&'a str>,
    /// API group.
    pub group: &'a str,
    /// Namespace.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub namespace: Option<&'a str>,
    /// Object name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<&'a str>,
    /// HTTP status code.
    pub code: u16,
}

/// Appends audit records to a file.
#[derive(Debug)]
pub struct AuditLog {
    file: Mutex<std::fs::File>,
}

impl AuditLog {
    /// Opens (appends to) the audit log, readable by its owner only (0600, also when an older
    /// file was more open).
    pub fn open(path: &Path) -> std::io::Result<Self> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(path)?;
        file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
        Ok(Self {
            file: Mutex::new(file),
        })
    }

    /// Writes one record (errors are logged, never fail the request).
    pub fn record(&self, rec: &AuditRecord<'_>) {
        let Ok(mut line) = serde_json::to_vec(rec) else {
            return;
        };
        line.push(b'\n');
        match self.file.lock() {
            Ok(mut f) => {
                if let Err(e) = f.write_all(&line) {
                    tracing::warn!(error = %e, "audit log write failed");
                }
            }
            Err(_) => tracing::warn!("audit log lock poisoned"),
        }
    }
}
