//! The reference evaluator: given the pods (their namespace, labels, address, named ports), the
//! namespaces' labels and the policies, decide a connection and say which rules decided it.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use super::types::{
    IntOrString, NetworkPolicy, NetworkPolicyPeer, NetworkPolicyPort, PolicyExt, Rule,
    block_contains, port_protocol, selector_matches,
};

/// A pod as policy sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub namespace: String,
    pub name: String,
    pub ip: Ipv4Addr,
    pub labels: BTreeMap<String, String>,
    /// Named container ports: name -> (protocol, number).
    pub named_ports: BTreeMap<String, (String, u16)>,
}

/// Why one direction allowed or denied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reason {
    /// No policy selects the pod in this direction: open.
    NotIsolated,
    /// Allowed by rule `rule` of policy `namespace/name` in this direction.
    AllowedBy { policy: String, rule: usize },
    /// Policies select the pod in this direction (listed) and none of their rules allows it.
    DeniedBy { policies: Vec<String> },
}

impl Reason {
    pub fn allows(&self) -> bool {
        !matches!(self, Reason::DeniedBy { .. })
    }
}

/// The verdict on one connection: both directions must allow.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub egress: Reason,
    pub ingress: Reason,
}

impl Decision {
    pub fn allowed(&self) -> bool {
        self.egress.allows() && self.ingress.allows()
    }
}

/// Decides `src` -> `dst`:`port`/`protocol` under `policies`, with `namespaces` giving each
/// namespace's labels.
pub fn evaluate(
    policies: &[NetworkPolicy],
    namespaces: &BTreeMap<String, BTreeMap<String, String>>,
    src: &Endpoint,
    dst: &Endpoint,
    port: u16,
    protocol: &str,
) -> Decision {
    let egress = direction(
        policies,
        src,
        |p| p.governs().1,
        |policy| {
            policy
                .egress()
                .into_iter()
                .map(|r| peer_and_port(r, namespaces, policy.namespace(), dst, dst, port, protocol))
                .collect()
        },
    );
    let ingress = direction(
        policies,
        dst,
        |p| p.governs().0,
        |policy| {
            policy
                .ingress()
                .into_iter()
                .map(|r| peer_and_port(r, namespaces, policy.namespace(), src, dst, port, protocol))
                .collect()
        },
    );
    Decision { egress, ingress }
}

/// One direction for pod `subject`: the policies of its namespace that select it and govern the
/// direction, and the first rule (in policy order) that allows.
fn direction(
    policies: &[NetworkPolicy],
    subject: &Endpoint,
    governs: impl Fn(&NetworkPolicy) -> bool,
    rule_results: impl Fn(&NetworkPolicy) -> Vec<bool>,
) -> Reason {
    let selecting: Vec<&NetworkPolicy> = policies
        .iter()
        .filter(|p| governs(p) && p.selects(&subject.namespace, &subject.labels))
        .collect();
    if selecting.is_empty() {
        return Reason::NotIsolated;
    }
    for policy in &selecting {
        if let Some(rule) = rule_results(policy).iter().position(|allowed| *allowed) {
            return Reason::AllowedBy {
                policy: policy.key(),
                rule,
            };
        }
    }
    Reason::DeniedBy {
        policies: selecting.iter().map(|p| p.key()).collect(),
    }
}

/// Whether `rule` (of a policy in `policy_ns`) allows `peer` on `port`/`protocol`. Named ports
/// resolve against `destination`, the pod the traffic reaches: the peer for egress, the
/// selected pod for ingress.
fn peer_and_port(
    rule: &dyn Rule,
    namespaces: &BTreeMap<String, BTreeMap<String, String>>,
    policy_ns: &str,
    peer: &Endpoint,
    destination: &Endpoint,
    port: u16,
    protocol: &str,
) -> bool {
    let peer_ok = rule.peers().is_empty()
        || rule
            .peers()
            .iter()
            .any(|p| peer_matches(p, namespaces, policy_ns, peer));
    let port_ok = rule.ports().is_empty()
        || rule
            .ports()
            .iter()
            .any(|p| port_matches(p, port, protocol, destination));
    peer_ok && port_ok
}

fn peer_matches(
    peer: &NetworkPolicyPeer,
    namespaces: &BTreeMap<String, BTreeMap<String, String>>,
    policy_ns: &str,
    pod: &Endpoint,
) -> bool {
    if let Some(block) = &peer.ip_block {
        return block_contains(block, pod.ip);
    }
    let empty = BTreeMap::new();
    let ns_labels = namespaces.get(&pod.namespace).unwrap_or(&empty);
    let ns_ok = match &peer.namespace_selector {
        Some(selector) => selector_matches(selector, ns_labels),
        None => pod.namespace == policy_ns,
    };
    let pod_ok = peer
        .pod_selector
        .as_ref()
        .is_none_or(|s| selector_matches(s, &pod.labels));
    ns_ok && pod_ok
}

fn port_matches(
    rule: &NetworkPolicyPort,
    port: u16,
    protocol: &str,
    destination: &Endpoint,
) -> bool {
    if port_protocol(rule) != protocol {
        return false;
    }
    match &rule.port {
        None => true,
        Some(IntOrString::Int(first)) => {
            let last = rule.end_port.unwrap_or(*first);
            (*first..=last).contains(&i32::from(port))
        }
        Some(IntOrString::String(name)) => destination
            .named_ports
            .get(name)
            .is_some_and(|(proto, number)| proto == protocol && *number == port),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn pod(ns: &str, name: &str, last: u8) -> Endpoint {
        Endpoint {
            namespace: ns.into(),
            name: name.into(),
            ip: Ipv4Addr::new(10, 244, 1, last),
            labels: BTreeMap::from([("pod".to_owned(), name.to_owned())]),
            named_ports: BTreeMap::from([("serve-80".to_owned(), ("TCP".to_owned(), 80))]),
        }
    }

    fn namespaces() -> BTreeMap<String, BTreeMap<String, String>> {
        ["x", "y", "z"]
            .iter()
            .map(|ns| {
                (
                    ns.to_string(),
                    BTreeMap::from([("ns".to_owned(), ns.to_string())]),
                )
            })
            .collect()
    }

    fn policy(value: serde_json::Value) -> NetworkPolicy {
        let policy: NetworkPolicy = serde_json::from_value(value).expect("policy");
        assert_eq!(policy.validate(), Vec::<String>::new());
        policy
    }

    /// The 9 pods x/a .. z/c of the upstream e2e truth tables.
    fn pods() -> Vec<Endpoint> {
        let mut all = Vec::new();
        for (i, ns) in ["x", "y", "z"].iter().enumerate() {
            for (j, name) in ["a", "b", "c"].iter().enumerate() {
                all.push(pod(ns, name, (i * 3 + j + 2) as u8));
            }
        }
        all
    }

    /// The reachability matrix (row: source, column: destination) for port/protocol.
    fn matrix(policies: &[NetworkPolicy], port: u16, protocol: &str) -> Vec<String> {
        let pods = pods();
        pods.iter()
            .map(|src| {
                pods.iter()
                    .map(|dst| {
                        if evaluate(policies, &namespaces(), src, dst, port, protocol).allowed() {
                            '.'
                        } else {
                            'X'
                        }
                    })
                    .collect()
            })
            .collect()
    }

    #[test]
    fn no_policy_allows_everything() {
        assert!(matrix(&[], 80, "TCP").iter().all(|row| row == "........."));
    }

    #[test]
    fn deny_all_ingress_isolates_the_namespace_pods_as_destinations() {
        let deny = policy(
            json!({"metadata": {"name": "deny", "namespace": "x"}, "spec": {"podSelector": {}, "policyTypes": ["Ingress"]}}),
        );
        let expected = vec!["XXX......"; 9];
        assert_eq!(matrix(&[deny], 80, "TCP"), expected);
    }

    #[test]
    fn deny_all_egress_isolates_the_namespace_pods_as_sources() {
        let deny = policy(
            json!({"metadata": {"name": "deny", "namespace": "x"}, "spec": {"podSelector": {}, "policyTypes": ["Egress"]}}),
        );
        let mut expected = vec!["XXXXXXXXX"; 3];
        expected.extend(vec!["........."; 6]);
        assert_eq!(matrix(&[deny], 80, "TCP"), expected);
    }

    #[test]
    fn combined_selectors_are_and_separate_peers_are_or() {
        // x/a accepts from pods b in namespace y (AND), or from anything in namespace z (OR).
        let allow = policy(
            json!({"metadata": {"name": "allow", "namespace": "x"}, "spec": {
            "podSelector": {"matchLabels": {"pod": "a"}},
            "ingress": [{"from": [
                {"namespaceSelector": {"matchLabels": {"ns": "y"}}, "podSelector": {"matchLabels": {"pod": "b"}}},
                {"namespaceSelector": {"matchExpressions": [{"key": "ns", "operator": "In", "values": ["z"]}]}}
            ]}]}}),
        );
        let column_a: String = matrix(&[allow], 80, "TCP")
            .iter()
            .map(|row| row.chars().next().unwrap_or('?'))
            .collect();
        assert_eq!(column_a, "XXXX.X...", "sources x/a..z/c into x/a");
    }

    #[test]
    fn ip_block_except_named_port_and_end_port() {
        let by_block = policy(
            json!({"metadata": {"name": "block", "namespace": "y"}, "spec": {
            "podSelector": {},
            "ingress": [{"from": [{"ipBlock": {"cidr": "10.244.1.0/29", "except": ["10.244.1.4/32"]}}],
                          "ports": [{"port": "serve-80"}, {"port": 8000, "endPort": 8010, "protocol": "UDP"}]}]}}),
        );
        let p = pods();
        let (xa, xc, yb) = (&p[0], &p[2], &p[4]);
        let ns = namespaces();
        // x/a (.2) is in the block; x/c (.4) is the exception.
        assert!(evaluate(std::slice::from_ref(&by_block), &ns, xa, yb, 80, "TCP").allowed());
        assert!(!evaluate(std::slice::from_ref(&by_block), &ns, xc, yb, 80, "TCP").allowed());
        // The named port resolves on the destination; other ports and protocols are denied.
        assert!(!evaluate(std::slice::from_ref(&by_block), &ns, xa, yb, 81, "TCP").allowed());
        assert!(evaluate(std::slice::from_ref(&by_block), &ns, xa, yb, 8005, "UDP").allowed());
        assert!(!evaluate(std::slice::from_ref(&by_block), &ns, xa, yb, 8005, "TCP").allowed());
        assert!(!evaluate(std::slice::from_ref(&by_block), &ns, xa, yb, 8011, "UDP").allowed());
        let decision = evaluate(std::slice::from_ref(&by_block), &ns, xa, yb, 80, "TCP");
        assert_eq!(
            decision.ingress,
            Reason::AllowedBy {
                policy: "y/block".into(),
                rule: 0
            }
        );
        assert_eq!(decision.egress, Reason::NotIsolated);
    }

    #[test]
    fn policies_are_additive() {
        let only_a = policy(
            json!({"metadata": {"name": "only-a", "namespace": "x"}, "spec": {
            "podSelector": {}, "ingress": [{"from": [{"podSelector": {"matchLabels": {"pod": "a"}}}]}]}}),
        );
        let only_b = policy(
            json!({"metadata": {"name": "only-b", "namespace": "x"}, "spec": {
            "podSelector": {}, "ingress": [{"from": [{"podSelector": {"matchLabels": {"pod": "b"}}}]}]}}),
        );
        let rows = matrix(&[only_a, only_b], 80, "TCP");
        assert_eq!(rows[0], "........."); // x/a
        assert_eq!(rows[1], "........."); // x/b
        assert_eq!(rows[2], "XXX......"); // x/c
        assert_eq!(rows[3], "XXX......"); // y/a: another namespace, no namespaceSelector
    }

    #[test]
    fn invalid_policies_name_every_bad_field() {
        let bad: NetworkPolicy = serde_json::from_value(json!({"metadata": {"name": "bad", "namespace": "x"}, "spec": {
            "podSelector": {"matchExpressions": [{"key": "a", "operator": "Maybe"}]},
            "policyTypes": ["Sideways"],
            "ingress": [{"from": [{"ipBlock": {"cidr": "10.0.0.0/8", "except": ["11.0.0.0/16", "nope"]}}, {}],
                          "ports": [{"protocol": "ICMP", "port": 90, "endPort": 80}, {"port": "x", "endPort": 9}]}]}}))
        .expect("parses");
        let errors = bad.validate().join("\n");
        for field in [
            "spec.podSelector.matchExpressions[0].operator",
            "spec.policyTypes[0]",
            "spec.ingress[0].from[0].ipBlock.except[0]",
            "spec.ingress[0].from[0].ipBlock.except[1]",
            "spec.ingress[0].from[1]: Required value: must specify a peer",
            "spec.ingress[0].ports[0].protocol",
            "spec.ingress[0].ports[0].endPort",
            "spec.ingress[0].ports[1].endPort",
        ] {
            assert!(errors.contains(field), "{field} missing from:\n{errors}");
        }
    }

    #[test]
    fn an_empty_namespace_is_refused_by_name() {
        let empty: NetworkPolicy =
            serde_json::from_value(json!({"metadata": {"name": "p", "namespace": ""}, "spec": {}}))
                .expect("parses");
        let errors = empty.validate().join("\n");
        assert!(
            errors.contains("metadata.namespace: must not be empty"),
            "{errors}"
        );
        let omitted: NetworkPolicy =
            serde_json::from_value(json!({"metadata": {"name": "p"}, "spec": {}})).expect("parses");
        assert_eq!(omitted.namespace(), "default");
        assert!(omitted.validate().is_empty(), "{:?}", omitted.validate());
    }
}
