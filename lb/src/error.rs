//! The load balancer's one error type.

use std::io;
use std::net::IpAddr;

use crate::config::IpFamily;
use crate::maglev::MaglevError;
use slipway_api::FieldError;

/// Everything that can go wrong in the load balancer.
#[derive(Debug, thiserror::Error)]
pub enum LbError {
    /// Configuration or an API request failed validation; every bad field is listed.
    #[error("invalid {what}: {}", list(.errors))]
    Invalid {
        what: &'static str,
        errors: Vec<FieldError>,
    },
    /// The service does not exist.
    #[error("service {0} not found")]
    NotFound(String),
    /// The requested VIP is not in any pool.
    #[error("address {0} is in no VIP pool")]
    NotInPool(IpAddr),
    /// The requested VIP is used by another service on an overlapping port.
    #[error("address {vip} is used by service {owner} on {port}")]
    VipConflict {
        vip: IpAddr,
        owner: String,
        port: String,
    },
    /// Every pool of the family is used up (or there is none).
    #[error("no free {0} address in the VIP pools")]
    PoolExhausted(IpFamily),
    /// A datapath limit (services, backends) is reached.
    #[error("datapath full: {0}")]
    Capacity(&'static str),
    #[error(transparent)]
    Maglev(#[from] MaglevError),
    /// The eBPF datapath failed.
    #[error("datapath")]
    Datapath(#[source] Box<slipway_dataplane::DataplaneError>),
    /// A system call failed; `call` names it.
    #[error("{call}")]
    Syscall {
        call: &'static str,
        #[source]
        source: io::Error,
    },
    /// Talking to the daemon's local API failed.
    #[error("local API: {0}")]
    Api(String),
}

impl From<slipway_dataplane::DataplaneError> for LbError {
    fn from(e: slipway_dataplane::DataplaneError) -> Self {
        LbError::Datapath(Box::new(e))
    }
}

fn list(errors: &[FieldError]) -> String {
    errors
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}
