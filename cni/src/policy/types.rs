//! The networking.k8s.io/v1 NetworkPolicy schema as serde types, and `validate()`, which names
//! every bad field at once (`spec.ingress[0].from[1].ipBlock.except[0]: ...`).

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use ipnetwork::Ipv4Network;
use serde::{Deserialize, Serialize};

/// A NetworkPolicy object (metadata reduced to what policy needs).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NetworkPolicy {
    pub metadata: Metadata,
    pub spec: Spec,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct Metadata {
    pub name: String,
    #[serde(default = "default_namespace")]
    pub namespace: String,
}

fn default_namespace() -> String {
    "default".to_owned()
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Spec {
    #[serde(default)]
    pub pod_selector: LabelSelector,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy_types: Option<Vec<String>>,
    #[serde(default)]
    pub ingress: Vec<IngressRule>,
    #[serde(default)]
    pub egress: Vec<EgressRule>,
}

/// An ingress rule: the sources (`from`) and ports it allows. No peers means every peer; no
/// ports means every port.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct IngressRule {
    #[serde(default)]
    pub from: Vec<Peer>,
    #[serde(default)]
    pub ports: Vec<PolicyPort>,
}

/// An egress rule: the destinations (`to`) and ports it allows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct EgressRule {
    #[serde(default)]
    pub to: Vec<Peer>,
    #[serde(default)]
    pub ports: Vec<PolicyPort>,
}

/// A rule of either direction, seen the same way by the evaluator.
pub trait Rule {
    fn peers(&self) -> &[Peer];
    fn ports(&self) -> &[PolicyPort];
}

impl Rule for IngressRule {
    fn peers(&self) -> &[Peer] {
        &self.from
    }
    fn ports(&self) -> &[PolicyPort] {
        &self.ports
    }
}

impl Rule for EgressRule {
    fn peers(&self) -> &[Peer] {
        &self.to
    }
    fn ports(&self) -> &[PolicyPort] {
        &self.ports
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Peer {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_selector: Option<LabelSelector>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace_selector: Option<LabelSelector>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip_block: Option<IpBlock>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct IpBlock {
    pub cidr: String,
    #[serde(default)]
    pub except: Vec<String>,
}

/// A port or port range; `port` is a number or a named container port.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PolicyPort {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<PortRef>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end_port: Option<u32>,
}

/// `intstr.IntOrString` for ports.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum PortRef {
    Number(u32),
    Name(String),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct LabelSelector {
    #[serde(default)]
    pub match_labels: BTreeMap<String, String>,
    #[serde(default)]
    pub match_expressions: Vec<Requirement>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Requirement {
    pub key: String,
    pub operator: String,
    #[serde(default)]
    pub values: Vec<String>,
}

impl LabelSelector {
    /// Whether `labels` satisfy every label and every expression (an empty selector matches all).
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.match_labels
            .iter()
            .all(|(k, v)| labels.get(k) == Some(v))
            && self.match_expressions.iter().all(|r| {
                let value = labels.get(&r.key);
                match r.operator.as_str() {
                    "In" => value.is_some_and(|v| r.values.contains(v)),
                    "NotIn" => value.is_none_or(|v| !r.values.contains(v)),
                    "Exists" => value.is_some(),
                    "DoesNotExist" => value.is_none(),
                    _ => false,
                }
            })
    }

    fn validate(&self, at: &str, errors: &mut Vec<String>) {
        for (i, r) in self.match_expressions.iter().enumerate() {
            let at = format!("{at}.matchExpressions[{i}]");
            if r.key.is_empty() {
                errors.push(format!("{at}.key: must not be empty"));
            }
            match r.operator.as_str() {
                "In" | "NotIn" if r.values.is_empty() => errors.push(format!(
                    "{at}.values: must not be empty with operator {}",
                    r.operator
                )),
                "Exists" | "DoesNotExist" if !r.values.is_empty() => errors.push(format!(
                    "{at}.values: must be empty with operator {}",
                    r.operator
                )),
                "In" | "NotIn" | "Exists" | "DoesNotExist" => {}
                other => errors.push(format!(
                    "{at}.operator: {other:?} is not In, NotIn, Exists or DoesNotExist"
                )),
            }
        }
    }
}

impl IpBlock {
    /// Whether `ip` is in the block's CIDR and in none of its exceptions.
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        let inside = |cidr: &str| cidr.parse::<Ipv4Network>().is_ok_and(|n| n.contains(ip));
        inside(&self.cidr) && !self.except.iter().any(|e| inside(e))
    }
}

impl Spec {
    /// The directions the policy governs: `policyTypes`, or its default.
    pub fn types(&self) -> (bool, bool) {
        match &self.policy_types {
            Some(types) => (
                types.iter().any(|t| t == "Ingress"),
                types.iter().any(|t| t == "Egress"),
            ),
            None => (true, !self.egress.is_empty()),
        }
    }
}

impl NetworkPolicy {
    /// Every bad field, named by its path; empty when the policy is valid.
    pub fn validate(&self) -> Vec<String> {
        let mut errors = Vec::new();
        if self.metadata.name.is_empty() {
            errors.push("metadata.name: must not be empty".to_owned());
        }
        if self.metadata.namespace.is_empty() {
            // An empty namespace would select no pod at all; omitted, it is "default".
            errors
                .push("metadata.namespace: must not be empty (omit it for \"default\")".to_owned());
        }
        let spec = &self.spec;
        spec.pod_selector.validate("spec.podSelector", &mut errors);
        if let Some(types) = &spec.policy_types {
            for (i, t) in types.iter().enumerate() {
                if t != "Ingress" && t != "Egress" {
                    errors.push(format!(
                        "spec.policyTypes[{i}]: {t:?} is not Ingress or Egress"
                    ));
                }
            }
        }
        let ingress = spec.ingress.iter().map(|r| r as &dyn Rule);
        let egress = spec.egress.iter().map(|r| r as &dyn Rule);
        for (dir, field, rules) in [
            ("ingress", "from", ingress.collect::<Vec<_>>()),
            ("egress", "to", egress.collect::<Vec<_>>()),
        ] {
            for (i, rule) in rules.iter().enumerate() {
                let at = format!("spec.{dir}[{i}]");
                for (j, peer) in rule.peers().iter().enumerate() {
                    peer.validate(&format!("{at}.{field}[{j}]"), &mut errors);
                }
                for (j, port) in rule.ports().iter().enumerate() {
                    port.validate(&format!("{at}.ports[{j}]"), &mut errors);
                }
            }
        }
        errors
    }
}

impl Peer {
    fn validate(&self, at: &str, errors: &mut Vec<String>) {
        if let Some(block) = &self.ip_block {
            if self.pod_selector.is_some() || self.namespace_selector.is_some() {
                errors.push(format!(
                    "{at}.ipBlock: may not be combined with podSelector or namespaceSelector"
                ));
            }
            match block.cidr.parse::<Ipv4Network>() {
                Err(e) => errors.push(format!(
                    "{at}.ipBlock.cidr: {:?} is not an IPv4 CIDR: {e}",
                    block.cidr
                )),
                Ok(cidr) => {
                    for (k, except) in block.except.iter().enumerate() {
                        match except.parse::<Ipv4Network>() {
                            Err(e) => errors.push(format!(
                                "{at}.ipBlock.except[{k}]: {except:?} is not an IPv4 CIDR: {e}"
                            )),
                            Ok(e)
                                if !(cidr.contains(e.network()) && e.prefix() >= cidr.prefix()) =>
                            {
                                errors.push(format!(
                                    "{at}.ipBlock.except[{k}]: {except} is not inside {}",
                                    block.cidr
                                ))
                            }
                            Ok(_) => {}
                        }
                    }
                }
            }
        } else if self.pod_selector.is_none() && self.namespace_selector.is_none() {
            errors.push(format!(
                "{at}: needs podSelector, namespaceSelector or ipBlock"
            ));
        }
        if let Some(s) = &self.pod_selector {
            s.validate(&format!("{at}.podSelector"), errors);
        }
        if let Some(s) = &self.namespace_selector {
            s.validate(&format!("{at}.namespaceSelector"), errors);
        }
    }
}

impl PolicyPort {
    /// The protocol, TCP when not given.
    pub fn protocol(&self) -> &str {
        self.protocol.as_deref().unwrap_or("TCP")
    }

    fn validate(&self, at: &str, errors: &mut Vec<String>) {
        if !matches!(self.protocol(), "TCP" | "UDP" | "SCTP") {
            errors.push(format!(
                "{at}.protocol: {:?} is not TCP, UDP or SCTP",
                self.protocol()
            ));
        }
        match (&self.port, self.end_port) {
            (Some(PortRef::Number(p)), _) if !(1..=65535).contains(p) => {
                errors.push(format!("{at}.port: {p} is outside 1-65535"))
            }
            (Some(PortRef::Number(p)), Some(end)) if end < *p || end > 65535 => {
                errors.push(format!("{at}.endPort: {end} must be within {p}-65535"))
            }
            (Some(PortRef::Name(name)), Some(_)) => errors.push(format!(
                "{at}.endPort: not allowed with the named port {name:?}"
            )),
            (None, Some(_)) => errors.push(format!("{at}.endPort: needs a numeric port")),
            (Some(PortRef::Name(name)), None) if name.is_empty() || name.len() > 15 => errors.push(
                format!("{at}.port: {name:?} is not a port name (1-15 characters)"),
            ),
            _ => {}
        }
    }
}
