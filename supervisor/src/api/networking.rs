//! `networking.k8s.io/v1` NetworkPolicy: the upstream type with the supervisor's defaults and
//! checks.

use k8s_openapi::api::networking::v1::{NetworkPolicyPeer, NetworkPolicyPort};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::core::check_cidr;
use super::{Validate, at};
use crate::error::FieldError;

/// A NetworkPolicy (networking.k8s.io/v1), the upstream type: decoded as every upstream kind is
/// (unknown fields refused, see `registry::decode_upstream`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(transparent)]
#[schemars(transparent)]
pub struct NetworkPolicy(pub k8s_openapi::api::networking::v1::NetworkPolicy);

fn check_peers(field: &str, peers: &Option<Vec<NetworkPolicyPeer>>, errs: &mut Vec<FieldError>) {
    for (i, p) in peers.iter().flatten().enumerate() {
        let f = at(field, i);
        if let Some(b) = &p.ip_block {
            let outer = check_cidr(&format!("{f}.ipBlock.cidr"), &b.cidr, errs);
            for (j, e) in b.except.iter().flatten().enumerate() {
                let ef = format!("{f}.ipBlock.except[{j}]");
                if let (Some(inner), Some(outer)) = (check_cidr(&ef, e, errs), outer)
                    && !(outer.contains(inner.network()) && inner.prefix() > outer.prefix())
                {
                    errs.push(FieldError::invalid(
                        ef,
                        format!("{e:?}"),
                        "must be a strict subset of cidr",
                    ));
                }
            }
            if p.pod_selector.is_some() || p.namespace_selector.is_some() {
                errs.push(FieldError::forbidden(
                    f.clone(),
                    "may not specify more than 1 peer type",
                ));
            }
        }
    }
}

fn check_ports(field: &str, ports: &Option<Vec<NetworkPolicyPort>>, errs: &mut Vec<FieldError>) {
    for (i, p) in ports.iter().flatten().enumerate() {
        let f = at(field, i);
        if let Some(IntOrString::Int(n)) = p.port
            && !(1..=65535).contains(&n)
        {
            errs.push(FieldError::invalid(
                format!("{f}.port"),
                n,
                "must be between 1 and 65535, inclusive",
            ));
        }
        if let Some(proto) = &p.protocol
            && !["TCP", "UDP", "SCTP"].contains(&proto.as_str())
        {
            errs.push(FieldError::not_supported(
                format!("{f}.protocol"),
                proto,
                &["TCP", "UDP", "SCTP"],
            ));
        }
    }
}

impl Validate for NetworkPolicy {
    fn default_fields(&mut self) {
        let spec = self.0.spec.get_or_insert_with(Default::default);
        spec.pod_selector.get_or_insert_with(Default::default);
        if spec.policy_types.is_none() {
            let mut types = vec!["Ingress".to_string()];
            if spec.egress.is_some() {
                types.push("Egress".into());
            }
            spec.policy_types = Some(types);
        }
    }
    fn validate(&self, errs: &mut Vec<FieldError>) {
        let Some(spec) = &self.0.spec else {
            errs.push(FieldError::required("spec"));
            return;
        };
        for (i, t) in spec.policy_types.iter().flatten().enumerate() {
            if t != "Ingress" && t != "Egress" {
                errs.push(FieldError::not_supported(
                    at("spec.policyTypes", i),
                    t,
                    &["Ingress", "Egress"],
                ));
            }
        }
        for (i, r) in spec.ingress.iter().flatten().enumerate() {
            check_peers(&format!("spec.ingress[{i}].from"), &r.from, errs);
            check_ports(&format!("spec.ingress[{i}].ports"), &r.ports, errs);
        }
        for (i, r) in spec.egress.iter().flatten().enumerate() {
            check_peers(&format!("spec.egress[{i}].to"), &r.to, errs);
            check_ports(&format!("spec.egress[{i}].ports"), &r.ports, errs);
        }
    }
}
