//! `networking.k8s.io/v1` NetworkPolicy: the upstream type with the supervisor's defaults, checked
//! by the workspace's one NetworkPolicy validation (`slipway_api::networking`).

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use slipway_api::networking::{check_policy_spec, policy_types};

use super::Validate;
use crate::error::FieldError;

/// A NetworkPolicy (networking.k8s.io/v1), the upstream type: decoded as every upstream kind is
/// (unknown fields refused, see `registry::decode_upstream`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(transparent)]
#[schemars(transparent)]
pub struct NetworkPolicy(pub k8s_openapi::api::networking::v1::NetworkPolicy);

impl Validate for NetworkPolicy {
    fn default_fields(&mut self) {
        let spec = self.0.spec.get_or_insert_with(Default::default);
        spec.pod_selector.get_or_insert_with(Default::default);
        if spec.policy_types.is_none() {
            let (ingress, egress) = policy_types(spec);
            let types = [(ingress, "Ingress"), (egress, "Egress")];
            spec.policy_types = Some(
                types
                    .into_iter()
                    .filter(|(on, _)| *on)
                    .map(|(_, t)| t.to_owned())
                    .collect(),
            );
        }
    }
    fn validate(&self, errs: &mut Vec<FieldError>) {
        match &self.0.spec {
            Some(spec) => check_policy_spec(spec, errs),
            None => errs.push(FieldError::required("spec")),
        }
    }
}
