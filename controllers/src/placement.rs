//! Where a Pod goes: the scheduler's decision as a pure function of the Pod, the Nodes and the
//! Pods already bound. Filters (unschedulable, taints the Pod does not tolerate, a Node not
//! Ready, nodeSelector and required node affinity, the node affinity of the PersistentVolumes
//! it mounts (a zonal volume's zone), requests against allocatable less what bound Pods
//! request) then a score that spreads a workload's Pods over zones
//! (`topology.kubernetes.io/zone`), then over hosts, then prefers the least requested Node. A Pod no Node fits gets upstream's message:
//! `0/2 nodes are available: 2 Insufficient cpu.`

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Node, NodeSelector, NodeSelectorRequirement, Pod, Taint, Toleration,
};
use kube::ResourceExt;

use crate::pods::{controller_uid, is_active, node_of, quantity, requests};

/// The zone label.
pub const ZONE_LABEL: &str = "topology.kubernetes.io/zone";
/// The taint node lifecycle puts on a Node whose Ready condition is False.
pub const NOT_READY_TAINT: &str = "node.kubernetes.io/not-ready";
/// The taint node lifecycle puts on a Node whose Ready condition is Unknown.
pub const UNREACHABLE_TAINT: &str = "node.kubernetes.io/unreachable";

/// Whether `tol` tolerates `taint` (key, operator, value and effect as upstream).
pub fn tolerates(tol: &Toleration, taint: &Taint) -> bool {
    if let Some(e) = tol.effect.as_deref()
        && !e.is_empty()
        && e != taint.effect
    {
        return false;
    }
    match tol.key.as_deref() {
        None | Some("") => tol.operator.as_deref() == Some("Exists"),
        Some(k) if k != taint.key => false,
        Some(_) => match tol.operator.as_deref() {
            Some("Exists") => true,
            _ => tol.value.as_deref().unwrap_or("") == taint.value.as_deref().unwrap_or(""),
        },
    }
}

/// The Pod's toleration of `taint`, if any.
pub fn toleration_of<'a>(pod: &'a Pod, taint: &Taint) -> Option<&'a Toleration> {
    pod.spec
        .as_ref()
        .and_then(|s| s.tolerations.as_ref())
        .and_then(|t| t.iter().find(|t| tolerates(t, taint)))
}

/// The Node's Ready condition status (`True`, `False`, `Unknown`; `Unknown` when absent).
pub fn ready_status(node: &Node) -> &str {
    node.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .and_then(|c| c.iter().find(|c| c.type_ == "Ready"))
        .map_or("Unknown", |c| c.status.as_str())
}

/// The taints a Node has, plus the not-ready or unreachable one its Ready condition implies
/// (so a Pod is not placed in the moment before node lifecycle writes the taint).
fn effective_taints(node: &Node) -> Vec<Taint> {
    let mut taints: Vec<Taint> = node
        .spec
        .as_ref()
        .and_then(|s| s.taints.clone())
        .unwrap_or_default();
    let implied = match ready_status(node) {
        "True" => None,
        "False" => Some(NOT_READY_TAINT),
        _ => Some(UNREACHABLE_TAINT),
    };
    if let Some(key) = implied
        && !taints.iter().any(|t| t.key == key)
    {
        taints.push(Taint {
            key: key.into(),
            effect: "NoSchedule".into(),
            ..Taint::default()
        });
    }
    taints
}

/// Whether a requirement holds for a label's `value` (upstream's operators).
fn requirement_holds(req: &NodeSelectorRequirement, value: Option<&str>) -> bool {
    let values = req.values.as_deref().unwrap_or_default();
    let number = |v: &str| v.parse::<i64>().ok();
    match req.operator.as_str() {
        "In" => value.is_some_and(|v| values.iter().any(|x| x == v)),
        "NotIn" => !value.is_some_and(|v| values.iter().any(|x| x == v)),
        "Exists" => value.is_some(),
        "DoesNotExist" => value.is_none(),
        "Gt" | "Lt" => match (
            value.and_then(number),
            values.first().and_then(|x| number(x)),
        ) {
            (Some(v), Some(bound)) if req.operator == "Gt" => v > bound,
            (Some(v), Some(bound)) => v < bound,
            _ => false,
        },
        _ => false,
    }
}

/// Whether `node` satisfies a required node selector (a PV's node affinity, a Pod's required
/// node affinity): some term matches, a term when all its label and field requirements hold.
pub fn selects(selector: &NodeSelector, node: &Node) -> bool {
    selector.node_selector_terms.iter().any(|term| {
        let labels = term.match_expressions.as_deref().unwrap_or_default();
        let fields = term.match_fields.as_deref().unwrap_or_default();
        (!labels.is_empty() || !fields.is_empty())
            && labels
                .iter()
                .all(|r| requirement_holds(r, node.labels().get(&r.key).map(String::as_str)))
            && fields.iter().all(|r| {
                let value = (r.key == "metadata.name").then(|| node.name_any());
                requirement_holds(r, value.as_deref())
            })
    })
}

/// The Pod's required node affinity, if any.
fn required_affinity(pod: &Pod) -> Option<&NodeSelector> {
    pod.spec
        .as_ref()?
        .affinity
        .as_ref()?
        .node_affinity
        .as_ref()?
        .required_during_scheduling_ignored_during_execution
        .as_ref()
}

/// Why one Node cannot take the Pod (the text upstream prints after the count). `volumes`
/// are the node affinities of the PersistentVolumes the Pod mounts.
fn unfit(pod: &Pod, node: &Node, bound: &[&Pod], volumes: &[NodeSelector]) -> Vec<String> {
    let mut why = Vec::new();
    if node.spec.as_ref().and_then(|s| s.unschedulable) == Some(true) {
        why.push("node(s) were unschedulable".to_string());
        return why;
    }
    for t in effective_taints(node) {
        if matches!(t.effect.as_str(), "NoSchedule" | "NoExecute")
            && toleration_of(pod, &t).is_none()
        {
            why.push(format!(
                "node(s) had untolerated taint {{{}: {}}}",
                t.key,
                t.value.as_deref().unwrap_or("")
            ));
            return why;
        }
    }
    let selector = pod
        .spec
        .as_ref()
        .and_then(|s| s.node_selector.clone())
        .unwrap_or_default();
    if selector
        .iter()
        .any(|(k, v)| node.labels().get(k) != Some(v))
        || required_affinity(pod).is_some_and(|a| !selects(a, node))
    {
        why.push("node(s) didn't match Pod's node affinity/selector".to_string());
        return why;
    }
    if volumes.iter().any(|v| !selects(v, node)) {
        why.push("node(s) had volume node affinity conflict".to_string());
        return why;
    }
    let allocatable: BTreeMap<String, f64> = node
        .status
        .as_ref()
        .and_then(|s| s.allocatable.as_ref().or(s.capacity.as_ref()))
        .map(|a| {
            a.iter()
                .filter_map(|(k, q)| quantity(&q.0).map(|v| (k.clone(), v)))
                .collect()
        })
        .unwrap_or_default();
    let mut used: BTreeMap<String, f64> = BTreeMap::new();
    for p in bound {
        for (k, v) in requests(p) {
            *used.entry(k).or_default() += v;
        }
    }
    if let Some(max) = allocatable.get("pods")
        && bound.len() as f64 + 1.0 > *max
    {
        why.push("Too many pods".to_string());
    }
    for (k, want) in requests(pod) {
        if want <= 0.0 {
            continue;
        }
        let free =
            allocatable.get(&k).copied().unwrap_or(0.0) - used.get(&k).copied().unwrap_or(0.0);
        // A tolerance for the decimal rounding of quantities such as 100m.
        if want > free + 1e-9 {
            why.push(format!("Insufficient {k}"));
        }
    }
    why
}

/// Whether two Pods belong to the same workload (same controller, or same labels when bare).
fn same_workload(a: &Pod, b: &Pod) -> bool {
    a.namespace() == b.namespace()
        && match (controller_uid(a), controller_uid(b)) {
            (Some(x), Some(y)) => x == y,
            (None, None) => a.labels() == b.labels(),
            _ => false,
        }
}

/// The outcome for one Pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Placement {
    /// Bind to this Node.
    Node(String),
    /// No Node fits; upstream's message says why.
    Unschedulable(String),
}

/// Chooses a Node for `pod` among `nodes`, given every Pod (bound ones count against their
/// Node) and the node affinities of the volumes the Pod mounts. Deterministic: ties go to the
/// Node whose name sorts first.
pub fn place(pod: &Pod, nodes: &[Node], pods: &[Pod], volumes: &[NodeSelector]) -> Placement {
    let mut reasons: BTreeMap<String, usize> = BTreeMap::new();
    let mut fits: Vec<&Node> = Vec::new();
    let on = |n: &str| -> Vec<&Pod> {
        pods.iter()
            .filter(|p| is_active(p) && node_of(p) == Some(n))
            .collect()
    };
    for node in nodes {
        let why = unfit(pod, node, &on(&node.name_any()), volumes);
        if why.is_empty() {
            fits.push(node);
        }
        for w in why {
            *reasons.entry(w).or_default() += 1;
        }
    }
    if fits.is_empty() {
        let mut parts: Vec<String> = reasons.iter().map(|(w, n)| format!("{n} {w}")).collect();
        parts.sort();
        let detail = if parts.is_empty() {
            String::new()
        } else {
            format!(" {}.", parts.join(", "))
        };
        return Placement::Unschedulable(format!("0/{} nodes are available:{detail}", nodes.len()));
    }
    let zone_of = |n: &Node| n.labels().get(ZONE_LABEL).cloned().unwrap_or_default();
    let siblings: Vec<&Pod> = pods
        .iter()
        .filter(|p| is_active(p) && same_workload(p, pod) && p.uid() != pod.uid())
        .collect();
    let node_zone: BTreeMap<String, String> =
        nodes.iter().map(|n| (n.name_any(), zone_of(n))).collect();
    let in_zone = |z: &str| {
        siblings
            .iter()
            .filter(|p| {
                node_of(p)
                    .and_then(|n| node_zone.get(n))
                    .map(String::as_str)
                    == Some(z)
            })
            .count()
    };
    let on_node = |n: &str| siblings.iter().filter(|p| node_of(p) == Some(n)).count();
    let cpu_requested = |n: &str| -> u64 {
        let used: f64 = on(n)
            .iter()
            .map(|p| requests(p).get("cpu").copied().unwrap_or(0.0))
            .sum();
        (used * 1000.0) as u64
    };
    let best = fits.into_iter().min_by_key(|n| {
        let name = n.name_any();
        (
            in_zone(&zone_of(n)),
            on_node(&name),
            on(&name).len(),
            cpu_requested(&name),
            name,
        )
    });
    match best {
        Some(n) => Placement::Node(n.name_any()),
        None => Placement::Unschedulable(format!("0/{} nodes are available.", nodes.len())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{
        Container, NodeCondition, NodeSpec, NodeStatus, PodSpec, ResourceRequirements, Toleration,
    };
    use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};

    fn node(name: &str, zone: &str, cpu: &str, ready: &str) -> Node {
        Node {
            metadata: ObjectMeta {
                name: Some(name.into()),
                labels: Some(BTreeMap::from([(ZONE_LABEL.into(), zone.into())])),
                ..ObjectMeta::default()
            },
            spec: Some(NodeSpec::default()),
            status: Some(NodeStatus {
                allocatable: Some(BTreeMap::from([
                    ("cpu".into(), Quantity(cpu.into())),
                    ("pods".into(), Quantity("110".into())),
                ])),
                conditions: Some(vec![NodeCondition {
                    type_: "Ready".into(),
                    status: ready.into(),
                    ..NodeCondition::default()
                }]),
                ..NodeStatus::default()
            }),
        }
    }

    fn pod(name: &str, cpu: &str, node: Option<&str>) -> Pod {
        Pod {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some("default".into()),
                uid: Some(format!("uid-{name}")),
                owner_references: Some(vec![OwnerReference {
                    uid: "rs".into(),
                    controller: Some(true),
                    ..OwnerReference::default()
                }]),
                ..ObjectMeta::default()
            },
            spec: Some(PodSpec {
                node_name: node.map(String::from),
                containers: vec![Container {
                    name: "c".into(),
                    resources: Some(ResourceRequirements {
                        requests: Some(BTreeMap::from([("cpu".into(), Quantity(cpu.into()))])),
                        ..ResourceRequirements::default()
                    }),
                    ..Container::default()
                }],
                ..PodSpec::default()
            }),
            status: None,
        }
    }

    #[test]
    fn spreads_over_zones_then_hosts() {
        let nodes = [
            node("a1", "a", "4", "True"),
            node("a2", "a", "4", "True"),
            node("b1", "b", "4", "True"),
        ];
        let pods = [pod("p1", "100m", Some("a1"))];
        assert_eq!(
            place(&pod("p2", "100m", None), &nodes, &pods, &[]),
            Placement::Node("b1".into())
        );
        let pods = [pod("p1", "100m", Some("a1")), pod("p2", "100m", Some("b1"))];
        assert_eq!(
            place(&pod("p3", "100m", None), &nodes, &pods, &[]),
            Placement::Node("a2".into())
        );
    }

    #[test]
    fn says_why_nothing_fits() {
        let nodes = [node("a1", "a", "1", "True"), node("b1", "b", "1", "True")];
        assert_eq!(
            place(&pod("big", "2", None), &nodes, &[], &[]),
            Placement::Unschedulable("0/2 nodes are available: 2 Insufficient cpu.".into())
        );
        let nodes = [node("a1", "a", "4", "False"), node("b1", "b", "1", "True")];
        assert_eq!(
            place(&pod("p", "2", None), &nodes, &[], &[]),
            Placement::Unschedulable(
                "0/2 nodes are available: 1 Insufficient cpu, 1 node(s) had untolerated taint {node.kubernetes.io/not-ready: }.".into()
            )
        );
    }

    #[test]
    fn node_selector_taints_and_tolerations() {
        let mut a = node("a1", "a", "4", "True");
        a.spec = Some(NodeSpec {
            taints: Some(vec![Taint {
                key: "dedicated".into(),
                value: Some("db".into()),
                effect: "NoSchedule".into(),
                ..Taint::default()
            }]),
            ..NodeSpec::default()
        });
        let b = node("b1", "b", "4", "True");
        let mut p = pod("p", "100m", None);
        assert_eq!(
            place(&p, &[a.clone(), b.clone()], &[], &[]),
            Placement::Node("b1".into())
        );
        if let Some(spec) = p.spec.as_mut() {
            spec.node_selector = Some(BTreeMap::from([(ZONE_LABEL.into(), "a".into())]));
        }
        assert_eq!(
            place(&p, &[a.clone(), b.clone()], &[], &[]),
            Placement::Unschedulable(
                "0/2 nodes are available: 1 node(s) didn't match Pod's node affinity/selector, 1 node(s) had untolerated taint {dedicated: db}.".into()
            )
        );
        if let Some(spec) = p.spec.as_mut() {
            spec.tolerations = Some(vec![Toleration {
                key: Some("dedicated".into()),
                operator: Some("Equal".into()),
                value: Some("db".into()),
                effect: Some("NoSchedule".into()),
                toleration_seconds: None,
            }]);
        }
        assert_eq!(place(&p, &[a, b], &[], &[]), Placement::Node("a1".into()));
        let mut cordoned = node("c1", "c", "4", "True");
        if let Some(spec) = cordoned.spec.as_mut() {
            spec.unschedulable = Some(true);
        }
        assert_eq!(
            place(&pod("q", "1", None), &[cordoned], &[], &[]),
            Placement::Unschedulable(
                "0/1 nodes are available: 1 node(s) were unschedulable.".into()
            )
        );
    }

    #[test]
    fn bound_requests_count_against_allocatable() {
        let nodes = [node("a1", "a", "1", "True")];
        let pods = [pod("p1", "600m", Some("a1"))];
        assert!(matches!(
            place(&pod("p2", "500m", None), &nodes, &pods, &[]),
            Placement::Unschedulable(_)
        ));
        assert_eq!(
            place(&pod("p2", "400m", None), &nodes, &pods, &[]),
            Placement::Node("a1".into())
        );
    }

    fn zone_in(key: &str, zones: &[&str]) -> NodeSelector {
        NodeSelector {
            node_selector_terms: vec![k8s_openapi::api::core::v1::NodeSelectorTerm {
                match_expressions: Some(vec![NodeSelectorRequirement {
                    key: key.into(),
                    operator: "In".into(),
                    values: Some(zones.iter().map(|z| (*z).to_owned()).collect()),
                }]),
                match_fields: None,
            }],
        }
    }

    #[test]
    fn volumes_and_required_affinity_narrow_the_nodes() {
        // b1 is the emptier node, but the Pod's volume lives in zone a.
        let nodes = [node("a1", "a", "4", "True"), node("b1", "b", "4", "True")];
        let pods = [pod("busy", "1", Some("a1"))];
        assert_eq!(
            place(&pod("p", "100m", None), &nodes, &pods, &[]),
            Placement::Node("b1".into())
        );
        assert_eq!(
            place(
                &pod("p", "100m", None),
                &nodes,
                &pods,
                &[zone_in(ZONE_LABEL, &["a"])]
            ),
            Placement::Node("a1".into())
        );
        assert_eq!(
            place(
                &pod("p", "100m", None),
                &nodes,
                &pods,
                &[zone_in(ZONE_LABEL, &["c"])]
            ),
            Placement::Unschedulable(
                "0/2 nodes are available: 2 node(s) had volume node affinity conflict.".into()
            )
        );
        // Two volumes in different zones: no node has both.
        assert!(matches!(
            place(
                &pod("p", "100m", None),
                &nodes,
                &pods,
                &[zone_in(ZONE_LABEL, &["a"]), zone_in(ZONE_LABEL, &["b"])]
            ),
            Placement::Unschedulable(_)
        ));
        // A Pod's required node affinity, by label and by the node's name.
        let mut p = pod("p", "100m", None);
        if let Some(spec) = p.spec.as_mut() {
            spec.affinity = Some(k8s_openapi::api::core::v1::Affinity {
                node_affinity: Some(k8s_openapi::api::core::v1::NodeAffinity {
                    required_during_scheduling_ignored_during_execution: Some(zone_in(
                        ZONE_LABEL,
                        &["a"],
                    )),
                    ..Default::default()
                }),
                ..Default::default()
            });
        }
        assert_eq!(place(&p, &nodes, &pods, &[]), Placement::Node("a1".into()));
        let by_name = NodeSelector {
            node_selector_terms: vec![k8s_openapi::api::core::v1::NodeSelectorTerm {
                match_expressions: None,
                match_fields: Some(vec![NodeSelectorRequirement {
                    key: "metadata.name".into(),
                    operator: "NotIn".into(),
                    values: Some(vec!["b1".into()]),
                }]),
            }],
        };
        assert!(selects(&by_name, &nodes[0]) && !selects(&by_name, &nodes[1]));
        // An empty term selects nothing, as upstream.
        let empty = NodeSelector {
            node_selector_terms: vec![k8s_openapi::api::core::v1::NodeSelectorTerm::default()],
        };
        assert!(!selects(&empty, &nodes[0]));
    }
}
