//! Label selectors and `networking.k8s.io/v1` NetworkPolicy as every plane reads them: whether a
//! selector matches a set of labels, the directions a policy governs, and the checks
//! kube-apiserver makes on a policy's spec. The supervisor's admission and the node agent's local
//! API validate with these same functions; the types are k8s-openapi's.

use std::collections::BTreeMap;

use k8s_openapi::api::networking::v1::{NetworkPolicyPeer, NetworkPolicyPort, NetworkPolicySpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use crate::meta::check_cidr;
use crate::{FieldError, FieldReason};

/// The operators of a selector's `matchExpressions`.
pub const SELECTOR_OPERATORS: [&str; 4] = ["In", "NotIn", "Exists", "DoesNotExist"];
/// The values of a policy's `policyTypes`.
pub const POLICY_TYPES: [&str; 2] = ["Ingress", "Egress"];
/// The protocols a policy port may name.
pub const PROTOCOLS: [&str; 3] = ["TCP", "UDP", "SCTP"];

/// Whether `labels` satisfy the selector's matchLabels and matchExpressions (an empty selector
/// matches everything; an unknown operator matches nothing).
pub fn selector_matches(sel: &LabelSelector, labels: &BTreeMap<String, String>) -> bool {
    let labels_ok = sel
        .match_labels
        .iter()
        .flatten()
        .all(|(k, v)| labels.get(k) == Some(v));
    let exprs_ok = sel.match_expressions.iter().flatten().all(|e| {
        let values = e.values.as_deref().unwrap_or_default();
        match e.operator.as_str() {
            "In" => labels.get(&e.key).is_some_and(|v| values.contains(v)),
            "NotIn" => labels.get(&e.key).is_none_or(|v| !values.contains(v)),
            "Exists" => labels.contains_key(&e.key),
            "DoesNotExist" => !labels.contains_key(&e.key),
            _ => false,
        }
    });
    labels_ok && exprs_ok
}

/// Checks a selector's expressions: a key, a known operator, values for In and NotIn and none
/// for Exists and DoesNotExist.
pub fn check_selector(field: &str, sel: &LabelSelector, errs: &mut Vec<FieldError>) {
    for (i, e) in sel.match_expressions.iter().flatten().enumerate() {
        let at = format!("{field}.matchExpressions[{i}]");
        if e.key.is_empty() {
            errs.push(FieldError::required(format!("{at}.key")));
        }
        let values = e.values.as_deref().unwrap_or_default();
        match e.operator.as_str() {
            "In" | "NotIn" if values.is_empty() => errs.push(FieldError::new(
                format!("{at}.values"),
                FieldReason::Required,
                "must be specified when `operator` is 'In' or 'NotIn'",
            )),
            "Exists" | "DoesNotExist" if !values.is_empty() => errs.push(FieldError::forbidden(
                format!("{at}.values"),
                "may not be specified when `operator` is 'Exists' or 'DoesNotExist'",
            )),
            op if SELECTOR_OPERATORS.contains(&op) => {}
            op => errs.push(FieldError::not_supported(
                format!("{at}.operator"),
                op,
                &SELECTOR_OPERATORS,
            )),
        }
    }
}

/// The directions a policy governs, (ingress, egress): its `policyTypes`, or upstream's default
/// (Ingress, and Egress when it has egress rules: an empty `egress: []` does not count).
pub fn policy_types(spec: &NetworkPolicySpec) -> (bool, bool) {
    match &spec.policy_types {
        Some(types) => (
            types.iter().any(|t| t == "Ingress"),
            types.iter().any(|t| t == "Egress"),
        ),
        None => (true, spec.egress.as_ref().is_some_and(|e| !e.is_empty())),
    }
}

/// A policy port's protocol (TCP when omitted).
pub fn port_protocol(port: &NetworkPolicyPort) -> &str {
    port.protocol.as_deref().unwrap_or("TCP")
}

/// Checks a NetworkPolicy's spec as kube-apiserver does; every bad field is named by its path
/// (`spec.ingress[0].from[1].ipBlock.except[0]`).
pub fn check_policy_spec(spec: &NetworkPolicySpec, errs: &mut Vec<FieldError>) {
    if let Some(sel) = &spec.pod_selector {
        check_selector("spec.podSelector", sel, errs);
    }
    for (i, t) in spec.policy_types.iter().flatten().enumerate() {
        if !POLICY_TYPES.contains(&t.as_str()) {
            errs.push(FieldError::not_supported(
                format!("spec.policyTypes[{i}]"),
                t,
                &POLICY_TYPES,
            ));
        }
    }
    for (i, r) in spec.ingress.iter().flatten().enumerate() {
        let at = format!("spec.ingress[{i}]");
        check_rule(&at, "from", r.from.as_deref(), r.ports.as_deref(), errs);
    }
    for (i, r) in spec.egress.iter().flatten().enumerate() {
        let at = format!("spec.egress[{i}]");
        check_rule(&at, "to", r.to.as_deref(), r.ports.as_deref(), errs);
    }
}

fn check_rule(
    at: &str,
    peers_field: &str,
    peers: Option<&[NetworkPolicyPeer]>,
    ports: Option<&[NetworkPolicyPort]>,
    errs: &mut Vec<FieldError>,
) {
    for (j, peer) in peers.unwrap_or_default().iter().enumerate() {
        check_peer(&format!("{at}.{peers_field}[{j}]"), peer, errs);
    }
    for (j, port) in ports.unwrap_or_default().iter().enumerate() {
        check_port(&format!("{at}.ports[{j}]"), port, errs);
    }
}

fn check_peer(at: &str, peer: &NetworkPolicyPeer, errs: &mut Vec<FieldError>) {
    if let Some(block) = &peer.ip_block {
        if peer.pod_selector.is_some() || peer.namespace_selector.is_some() {
            errs.push(FieldError::forbidden(
                at,
                "may not specify more than 1 peer type (ipBlock with podSelector or namespaceSelector)",
            ));
        }
        let outer = check_cidr(&format!("{at}.ipBlock.cidr"), &block.cidr, errs);
        for (k, except) in block.except.iter().flatten().enumerate() {
            let field = format!("{at}.ipBlock.except[{k}]");
            if let (Some(inner), Some(outer)) = (check_cidr(&field, except, errs), &outer)
                && !(outer.contains(&inner) && inner.prefix > outer.prefix)
            {
                errs.push(FieldError::invalid(
                    field,
                    format!("{except:?}"),
                    format!("must be a strict subset of cidr {}", block.cidr),
                ));
            }
        }
    } else if peer.pod_selector.is_none() && peer.namespace_selector.is_none() {
        errs.push(FieldError::new(
            at,
            FieldReason::Required,
            "must specify a peer (podSelector, namespaceSelector or ipBlock)",
        ));
    }
    if let Some(sel) = &peer.pod_selector {
        check_selector(&format!("{at}.podSelector"), sel, errs);
    }
    if let Some(sel) = &peer.namespace_selector {
        check_selector(&format!("{at}.namespaceSelector"), sel, errs);
    }
}

fn check_port(at: &str, port: &NetworkPolicyPort, errs: &mut Vec<FieldError>) {
    match (&port.port, port.end_port) {
        (Some(IntOrString::Int(p)), _) if !(1..=65535).contains(p) => {
            errs.push(FieldError::invalid(
                format!("{at}.port"),
                p,
                "must be between 1 and 65535, inclusive",
            ))
        }
        (Some(IntOrString::Int(p)), Some(end)) if end < *p || end > 65535 => {
            errs.push(FieldError::invalid(
                format!("{at}.endPort"),
                end,
                format!("must be between {p} (port) and 65535, inclusive"),
            ))
        }
        (Some(IntOrString::String(name)), Some(_)) => errs.push(FieldError::forbidden(
            format!("{at}.endPort"),
            format!("may not be specified when `port` is the named port {name:?}"),
        )),
        (None, Some(_)) => errs.push(FieldError::new(
            format!("{at}.port"),
            FieldReason::Required,
            "must be specified when `endPort` is",
        )),
        (Some(IntOrString::String(name)), None) if name.is_empty() || name.len() > 15 => {
            errs.push(FieldError::invalid(
                format!("{at}.port"),
                format!("{name:?}"),
                "must be a port name of 1-15 characters",
            ))
        }
        _ => {}
    }
    let protocol = port_protocol(port);
    if !PROTOCOLS.contains(&protocol) {
        errs.push(FieldError::not_supported(
            format!("{at}.protocol"),
            protocol,
            &PROTOCOLS,
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn selectors_match_labels_and_every_operator() {
        let sel: LabelSelector = serde_json::from_value(json!({
            "matchLabels": {"app": "web"},
            "matchExpressions": [
                {"key": "tier", "operator": "In", "values": ["a", "b"]},
                {"key": "env", "operator": "NotIn", "values": ["prod"]},
                {"key": "team", "operator": "Exists"},
                {"key": "legacy", "operator": "DoesNotExist"},
            ],
        }))
        .expect("selector");
        let good = labels(&[("app", "web"), ("tier", "a"), ("team", "x")]);
        assert!(selector_matches(&sel, &good));
        for (k, v) in [
            ("app", "db"),
            ("tier", "c"),
            ("env", "prod"),
            ("legacy", "1"),
        ] {
            let mut bad = good.clone();
            bad.insert(k.to_owned(), v.to_owned());
            assert!(!selector_matches(&sel, &bad), "{k}={v} must not match");
        }
        let mut no_team = good.clone();
        no_team.remove("team");
        assert!(!selector_matches(&sel, &no_team));
        assert!(selector_matches(
            &LabelSelector::default(),
            &BTreeMap::new()
        ));
        let unknown: LabelSelector = serde_json::from_value(json!({
            "matchExpressions": [{"key": "a", "operator": "Near"}],
        }))
        .expect("selector");
        assert!(!selector_matches(&unknown, &good));
    }

    #[test]
    fn a_bad_policy_spec_names_every_bad_field() {
        let spec: NetworkPolicySpec = serde_json::from_value(json!({
            "podSelector": {"matchExpressions": [{"key": "", "operator": "In"}]},
            "policyTypes": ["Ingress", "Sideways"],
            "ingress": [{
                "from": [
                    {},
                    {"ipBlock": {"cidr": "10.0.0.0/8", "except": ["11.0.0.0/16", "10.0.0.0/8"]},
                     "podSelector": {}},
                    {"ipBlock": {"cidr": "10.0.0.1/8"}},
                ],
                "ports": [
                    {"protocol": "ICMP", "port": 0},
                    {"port": "http", "endPort": 90},
                    {"endPort": 90},
                    {"port": 100, "endPort": 90},
                    {"port": "a-name-far-too-long"},
                ],
            }],
            "egress": [{"to": [{"namespaceSelector": {"matchExpressions": [
                {"key": "a", "operator": "Exists", "values": ["x"]},
                {"key": "b", "operator": "Near"},
            ]}}]}],
        }))
        .expect("spec");
        let mut errs = Vec::new();
        check_policy_spec(&spec, &mut errs);
        let fields: Vec<&str> = errs.iter().map(|e| e.field.as_str()).collect();
        let want = [
            "spec.podSelector.matchExpressions[0].key",
            "spec.podSelector.matchExpressions[0].values",
            "spec.policyTypes[1]",
            "spec.ingress[0].from[0]",
            "spec.ingress[0].from[1]",
            "spec.ingress[0].from[1].ipBlock.except[0]",
            "spec.ingress[0].from[1].ipBlock.except[1]",
            "spec.ingress[0].from[2].ipBlock.cidr",
            "spec.ingress[0].ports[0].port",
            "spec.ingress[0].ports[0].protocol",
            "spec.ingress[0].ports[1].endPort",
            "spec.ingress[0].ports[2].port",
            "spec.ingress[0].ports[3].endPort",
            "spec.ingress[0].ports[4].port",
            "spec.egress[0].to[0].namespaceSelector.matchExpressions[0].values",
            "spec.egress[0].to[0].namespaceSelector.matchExpressions[1].operator",
        ];
        assert_eq!(fields, want, "{errs:#?}");

        let good: NetworkPolicySpec = serde_json::from_value(json!({
            "podSelector": {"matchLabels": {"app": "web"}},
            "ingress": [{"from": [{"ipBlock": {"cidr": "10.0.0.0/8", "except": ["10.1.0.0/16"]}}],
                         "ports": [{"port": 80, "endPort": 90}, {"protocol": "UDP", "port": "dns"}]}],
        }))
        .expect("spec");
        let mut errs = Vec::new();
        check_policy_spec(&good, &mut errs);
        assert!(errs.is_empty(), "{errs:#?}");
        assert_eq!(policy_types(&good), (true, false));
    }
}

/// The annotation of a LoadBalancer Service that says whether its load balancer sends with
/// direct server return (`"true"`: the client's packets reach a node inside IP-in-IP and the
/// node answers the client itself) or translates (`"false"`). A workload cluster's cloud
/// provider writes `"true"` on its mirrors unless the workload Service says `"false"`: its
/// nodes run Slipway's agent, which takes the header off.
pub const DSR_ANNOTATION: &str = "slipway.dev/direct-server-return";

/// A Service's `externalTrafficPolicy` (and the agent's and the LB's own service records').
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum TrafficPolicy {
    /// Traffic from outside may go to any endpoint, on any node (the node translates the
    /// client's address to reach a remote one).
    #[default]
    Cluster,
    /// Traffic from outside goes only to endpoints on the node it reached, which see the
    /// client's address.
    Local,
}

impl TrafficPolicy {
    /// The policy `spec.externalTrafficPolicy` names (Cluster unless it says Local).
    pub fn of(field: Option<&str>) -> Self {
        if field == Some("Local") {
            Self::Local
        } else {
            Self::Cluster
        }
    }
}
