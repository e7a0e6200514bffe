//! `discovery.k8s.io/v1` EndpointSlice: the upstream type with kube-apiserver's checks.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::core::{check_enum, check_port};
use super::{Validate, at};
use crate::error::FieldError;

/// An EndpointSlice (discovery.k8s.io/v1), the upstream type.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(transparent)]
#[schemars(transparent)]
pub struct EndpointSlice(pub k8s_openapi::api::discovery::v1::EndpointSlice);

const ADDRESS_TYPES: &[&str] = &["IPv4", "IPv6", "FQDN"];

impl Validate for EndpointSlice {
    fn validate(&self, errs: &mut Vec<FieldError>) {
        let s = &self.0;
        check_enum(
            "addressType",
            &Some(s.address_type.clone()),
            ADDRESS_TYPES,
            errs,
        );
        for (i, e) in s.endpoints.iter().enumerate() {
            let f = at("endpoints", i);
            if e.addresses.is_empty() {
                errs.push(FieldError::required(format!("{f}.addresses")));
            }
            if s.address_type != "FQDN" {
                for (j, a) in e.addresses.iter().enumerate() {
                    slipway_api::meta::check_ip(&format!("{f}.addresses[{j}]"), a, errs);
                }
            }
        }
        for (i, p) in s.ports.iter().flatten().enumerate() {
            let f = at("ports", i);
            if let Some(n) = p.port {
                check_port(&format!("{f}.port"), i64::from(n), errs);
            }
            check_enum(
                &format!("{f}.protocol"),
                &p.protocol,
                &["TCP", "UDP", "SCTP"],
                errs,
            );
        }
    }
}
