//! `coordination.k8s.io/v1` kinds: Lease, the upstream type, which host agents renew as their
//! heartbeat.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::Validate;
use crate::error::FieldError;

/// A Lease (namespaced), the upstream type: unknown fields are refused as for every upstream
/// kind (see `registry::decode_upstream`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(transparent)]
#[schemars(transparent)]
pub struct Lease(pub k8s_openapi::api::coordination::v1::Lease);

impl Validate for Lease {
    fn validate(&self, errs: &mut Vec<FieldError>) {
        let Some(spec) = &self.0.spec else { return };
        if let Some(d) = spec.lease_duration_seconds
            && d <= 0
        {
            errs.push(FieldError::invalid(
                "spec.leaseDurationSeconds",
                d,
                "must be greater than 0",
            ));
        }
        if let Some(t) = spec.lease_transitions
            && t < 0
        {
            errs.push(FieldError::invalid(
                "spec.leaseTransitions",
                t,
                "must be greater than or equal to 0",
            ));
        }
    }
}
