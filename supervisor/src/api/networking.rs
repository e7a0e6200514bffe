//! `networking.k8s.io/v1` NetworkPolicy.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::core::check_cidr;
use super::meta::IntOrString;
use super::{Validate, at, kind};
use crate::error::FieldError;

/// One `matchExpressions` entry.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LabelSelectorRequirement {
    /// Label key.
    pub key: String,
    /// In, NotIn, Exists, DoesNotExist.
    pub operator: String,
    /// Values for In and NotIn.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub values: Option<Vec<String>>,
}

/// `metav1.LabelSelector`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LabelSelector {
    /// Equality terms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub match_labels: Option<BTreeMap<String, String>>,
    /// Set-based terms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub match_expressions: Option<Vec<LabelSelectorRequirement>>,
}

/// CIDR peer.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct IpBlock {
    /// Allowed CIDR.
    pub cidr: String,
    /// CIDRs carved out of it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub except: Option<Vec<String>>,
}

/// A traffic peer.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NetworkPolicyPeer {
    /// Pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_selector: Option<LabelSelector>,
    /// Namespaces.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace_selector: Option<LabelSelector>,
    /// CIDR.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip_block: Option<IpBlock>,
}

/// A port (range).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NetworkPolicyPort {
    /// TCP (default), UDP, SCTP.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<String>,
    /// Port number or name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<IntOrString>,
    /// End of a port range.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end_port: Option<i64>,
}

/// Ingress rule.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NetworkPolicyIngressRule {
    /// Sources.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<Vec<NetworkPolicyPeer>>,
    /// Ports.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ports: Option<Vec<NetworkPolicyPort>>,
}

/// Egress rule.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NetworkPolicyEgressRule {
    /// Destinations.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<Vec<NetworkPolicyPeer>>,
    /// Ports.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ports: Option<Vec<NetworkPolicyPort>>,
}

/// NetworkPolicy spec.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NetworkPolicySpec {
    /// Pods the policy applies to.
    #[serde(default)]
    pub pod_selector: LabelSelector,
    /// Ingress and/or Egress.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy_types: Option<Vec<String>>,
    /// Ingress rules.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ingress: Option<Vec<NetworkPolicyIngressRule>>,
    /// Egress rules.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub egress: Option<Vec<NetworkPolicyEgressRule>>,
}

kind!(
    /// A NetworkPolicy (networking.k8s.io/v1).
    NetworkPolicy,
    NetworkPolicySpec,
    Value
);

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
        if self.spec.policy_types.is_none() {
            let mut types = vec!["Ingress".to_string()];
            if self.spec.egress.is_some() {
                types.push("Egress".into());
            }
            self.spec.policy_types = Some(types);
        }
    }
    fn validate(&self, errs: &mut Vec<FieldError>) {
        for (i, t) in self.spec.policy_types.iter().flatten().enumerate() {
            if t != "Ingress" && t != "Egress" {
                errs.push(FieldError::not_supported(
                    at("spec.policyTypes", i),
                    t,
                    &["Ingress", "Egress"],
                ));
            }
        }
        for (i, r) in self.spec.ingress.iter().flatten().enumerate() {
            check_peers(&format!("spec.ingress[{i}].from"), &r.from, errs);
            check_ports(&format!("spec.ingress[{i}].ports"), &r.ports, errs);
        }
        for (i, r) in self.spec.egress.iter().flatten().enumerate() {
            check_peers(&format!("spec.egress[{i}].to"), &r.to, errs);
            check_ports(&format!("spec.egress[{i}].ports"), &r.ports, errs);
        }
    }
}
