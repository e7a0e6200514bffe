//! The networking.k8s.io/v1 NetworkPolicy as policy reads it: k8s-openapi's types (the same ones
//! the supervisor serves and the agent watches), what the compiler and the evaluator ask of
//! them, and `validate()`, which names every bad field at once
//! (`spec.ingress[0].from[1].ipBlock.except[0]: ...`) with the API's own checks plus the
//! datapath's (IPv4 blocks).

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::sync::LazyLock;

use ipnetwork::Ipv4Network;
pub use k8s_openapi::api::networking::v1::{
    IPBlock, NetworkPolicy, NetworkPolicyEgressRule, NetworkPolicyIngressRule, NetworkPolicyPeer,
    NetworkPolicyPort, NetworkPolicySpec,
};
pub use k8s_openapi::apimachinery::pkg::apis::meta::v1::{
    LabelSelector, LabelSelectorRequirement, ObjectMeta,
};
pub use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use slipway_api::networking::{check_policy_spec, policy_types};
pub use slipway_api::networking::{port_protocol, selector_matches};

/// The namespace of a policy that names none.
pub const DEFAULT_NAMESPACE: &str = "default";

/// A rule of either direction, seen the same way by the evaluator and the compiler.
pub trait Rule {
    /// The peers it allows (none: every peer).
    fn peers(&self) -> &[NetworkPolicyPeer];
    /// The ports it allows (none: every port).
    fn ports(&self) -> &[NetworkPolicyPort];
}

impl Rule for NetworkPolicyIngressRule {
    fn peers(&self) -> &[NetworkPolicyPeer] {
        self.from.as_deref().unwrap_or_default()
    }
    fn ports(&self) -> &[NetworkPolicyPort] {
        self.ports.as_deref().unwrap_or_default()
    }
}

impl Rule for NetworkPolicyEgressRule {
    fn peers(&self) -> &[NetworkPolicyPeer] {
        self.to.as_deref().unwrap_or_default()
    }
    fn ports(&self) -> &[NetworkPolicyPort] {
        self.ports.as_deref().unwrap_or_default()
    }
}

static NO_SPEC: LazyLock<NetworkPolicySpec> = LazyLock::new(NetworkPolicySpec::default);

/// What policy asks of a NetworkPolicy.
pub trait PolicyExt {
    /// Its namespace ([`DEFAULT_NAMESPACE`] when it names none).
    fn namespace(&self) -> &str;
    /// Its name.
    fn name(&self) -> &str;
    /// `namespace/name`.
    fn key(&self) -> String {
        format!("{}/{}", self.namespace(), self.name())
    }
    /// Its spec (an omitted one reads as `{}`: every pod of the namespace, ingress denied).
    fn spec(&self) -> &NetworkPolicySpec;
    /// The directions it governs, (ingress, egress).
    fn governs(&self) -> (bool, bool) {
        policy_types(self.spec())
    }
    /// Whether it selects a pod of `namespace` with `labels`.
    fn selects(&self, namespace: &str, labels: &BTreeMap<String, String>) -> bool {
        namespace == self.namespace()
            && self
                .spec()
                .pod_selector
                .as_ref()
                .is_none_or(|s| selector_matches(s, labels))
    }
    /// Its ingress rules, then its egress rules.
    fn ingress(&self) -> Vec<&dyn Rule> {
        let rules = self.spec().ingress.as_deref().unwrap_or_default();
        rules.iter().map(|r| r as &dyn Rule).collect()
    }
    /// Its egress rules.
    fn egress(&self) -> Vec<&dyn Rule> {
        let rules = self.spec().egress.as_deref().unwrap_or_default();
        rules.iter().map(|r| r as &dyn Rule).collect()
    }
    /// Every bad field, named by its path; empty when the policy is valid.
    fn validate(&self) -> Vec<String>;
}

impl PolicyExt for NetworkPolicy {
    fn namespace(&self) -> &str {
        self.metadata
            .namespace
            .as_deref()
            .unwrap_or(DEFAULT_NAMESPACE)
    }

    fn name(&self) -> &str {
        self.metadata.name.as_deref().unwrap_or_default()
    }

    fn spec(&self) -> &NetworkPolicySpec {
        self.spec.as_ref().unwrap_or(&NO_SPEC)
    }

    fn validate(&self) -> Vec<String> {
        let mut errors = Vec::new();
        if self.name().is_empty() {
            errors.push("metadata.name: must not be empty".to_owned());
        }
        if self.metadata.namespace.as_deref() == Some("") {
            // An empty namespace would select no pod at all; omitted, it is "default".
            errors
                .push("metadata.namespace: must not be empty (omit it for \"default\")".to_owned());
        }
        let mut causes = Vec::new();
        check_policy_spec(self.spec(), &mut causes);
        errors.extend(causes.iter().map(ToString::to_string));
        // The datapath matches IPv4 addresses only.
        for (dir, field, rules) in [
            ("ingress", "from", self.ingress()),
            ("egress", "to", self.egress()),
        ] {
            for (i, rule) in rules.iter().enumerate() {
                for (j, peer) in rule.peers().iter().enumerate() {
                    let Some(block) = &peer.ip_block else {
                        continue;
                    };
                    let cidrs = std::iter::once(("cidr".to_owned(), &block.cidr)).chain(
                        block
                            .except
                            .iter()
                            .flatten()
                            .enumerate()
                            .map(|(k, e)| (format!("except[{k}]"), e)),
                    );
                    for (name, cidr) in cidrs {
                        if cidr.contains(':') {
                            errors.push(format!(
                                "spec.{dir}[{i}].{field}[{j}].ipBlock.{name}: {cidr:?}: the datapath matches IPv4 only"
                            ));
                        }
                    }
                }
            }
        }
        errors
    }
}

/// Whether `ip` is in the block's CIDR and in none of its exceptions.
pub fn block_contains(block: &IPBlock, ip: Ipv4Addr) -> bool {
    let inside = |cidr: &str| cidr.parse::<Ipv4Network>().is_ok_and(|n| n.contains(ip));
    inside(&block.cidr) && !block.except.iter().flatten().any(|e| inside(e))
}
