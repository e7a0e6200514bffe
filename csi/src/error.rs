//! Errors of the CSI driver and their one mapping onto gRPC status codes (CSI spec, "Error
//! Scheme": each RPC lists the codes it may return).

use std::io;

use slipway_blockstore::control::error_chain;
use thiserror::Error;
use tonic::{Code, Status};

/// Everything a CSI RPC can fail with.
#[derive(Debug, Error)]
pub enum CsiError {
    /// A request field is missing or malformed (`INVALID_ARGUMENT`).
    #[error("{field}: {reason}")]
    InvalidArgument {
        /// The request field, as named in the CSI spec (e.g. `capacity_range.limit_bytes`).
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// The volume or snapshot does not exist (`NOT_FOUND`).
    #[error("{what} {id:?} does not exist")]
    NotFound {
        /// `volume` or `snapshot`.
        what: &'static str,
        /// The ID asked for.
        id: String,
    },
    /// The name is taken by an object with other parameters (`ALREADY_EXISTS`).
    #[error("{0}")]
    AlreadyExists(String),
    /// The capacity asked for cannot be met (`OUT_OF_RANGE`).
    #[error("{0}")]
    OutOfRange(String),
    /// The object is in a state that forbids the operation (`FAILED_PRECONDITION`).
    #[error("{0}")]
    FailedPrecondition(String),
    /// The pool or topology cannot hold the volume (`RESOURCE_EXHAUSTED`).
    #[error("{0}")]
    ResourceExhausted(String),
    /// Another operation on the same volume is in flight (`ABORTED`); the caller retries.
    #[error("an operation on {0:?} is already in progress")]
    Aborted(String),
    /// A pagination token this driver did not issue (`ABORTED`, as the spec asks).
    #[error("starting_token {0:?} is not valid")]
    BadToken(String),
    /// The RPC is not offered by this driver (`UNIMPLEMENTED`).
    #[error("{0} is not offered by this driver")]
    Unimplemented(&'static str),
    /// The block store's control socket could not be reached (`UNAVAILABLE`).
    #[error("block store unreachable")]
    BackendUnavailable(#[source] slipway_blockstore::control::ControlError),
    /// The block store refused or failed the request (`INTERNAL`).
    #[error("block store request failed")]
    Backend(#[source] slipway_blockstore::control::ControlError),
    /// The supervisor could not be reached or failed the request (`UNAVAILABLE` when it
    /// could not be reached, `INTERNAL` otherwise).
    #[error("supervisor: {what}")]
    Supervisor {
        /// What the call did.
        what: String,
        /// The client's error.
        #[source]
        source: kube::Error,
    },
    /// The supervisor has not finished the request in time (`DEADLINE_EXCEEDED`); the caller
    /// retries, and the retry finds the request's objects again.
    #[error("{0}")]
    NotYet(String),
    /// A system call or file operation failed (`INTERNAL`).
    #[error("{call} {path}")]
    Io {
        /// The operation.
        call: &'static str,
        /// What it was applied to.
        path: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// An external command (mkfs, losetup, resize2fs...) failed (`INTERNAL`).
    #[error("{command} failed: {output}")]
    Command {
        /// The command line.
        command: String,
        /// Its stderr (or the spawn error).
        output: String,
    },
    /// The volume's attachment is broken (`INTERNAL`).
    #[error("attachment of volume {volume:?}: {reason}")]
    Attach {
        /// Volume ID.
        volume: String,
        /// What went wrong.
        reason: String,
    },
}

impl CsiError {
    /// `INVALID_ARGUMENT` for `field`.
    pub fn invalid(field: &'static str, reason: impl Into<String>) -> Self {
        Self::InvalidArgument {
            field,
            reason: reason.into(),
        }
    }

    /// An [`CsiError::Io`] builder for `map_err`.
    pub fn io(call: &'static str, path: impl std::fmt::Display) -> impl FnOnce(io::Error) -> Self {
        let path = path.to_string();
        move |source| Self::Io { call, path, source }
    }

    /// The gRPC code the CSI spec assigns to this error.
    pub fn code(&self) -> Code {
        match self {
            Self::InvalidArgument { .. } => Code::InvalidArgument,
            Self::NotFound { .. } => Code::NotFound,
            Self::AlreadyExists(_) => Code::AlreadyExists,
            Self::OutOfRange(_) => Code::OutOfRange,
            Self::FailedPrecondition(_) => Code::FailedPrecondition,
            Self::ResourceExhausted(_) => Code::ResourceExhausted,
            Self::Aborted(_) | Self::BadToken(_) => Code::Aborted,
            Self::Unimplemented(_) => Code::Unimplemented,
            Self::BackendUnavailable(_) => Code::Unavailable,
            Self::Supervisor { source, .. } => match source {
                kube::Error::Api(_) => Code::Internal,
                _ => Code::Unavailable,
            },
            Self::NotYet(_) => Code::DeadlineExceeded,
            Self::Backend(_) | Self::Io { .. } | Self::Command { .. } | Self::Attach { .. } => {
                Code::Internal
            }
        }
    }
}

impl From<CsiError> for Status {
    fn from(e: CsiError) -> Self {
        let code = e.code();
        if matches!(code, Code::Internal | Code::Unavailable) {
            tracing::warn!(error = %error_chain(&e), "CSI request failed");
        }
        Status::new(code, error_chain(&e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_names_the_field_and_keeps_the_chain() {
        let s = Status::from(CsiError::invalid("name", "must not be empty"));
        assert_eq!(s.code(), Code::InvalidArgument);
        assert_eq!(s.message(), "name: must not be empty");
        let s = Status::from(CsiError::io("open", "/x")(io::Error::from_raw_os_error(2)));
        assert_eq!(s.code(), Code::Internal);
        assert!(s.message().starts_with("open /x: "), "{}", s.message());
        assert!(s.message().contains("No such file"), "{}", s.message());
        assert_eq!(
            Status::from(CsiError::BadToken("x".into())).code(),
            Code::Aborted
        );
    }
}
