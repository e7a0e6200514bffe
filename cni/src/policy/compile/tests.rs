use serde_json::{Value, json};

use super::*;
use crate::policy::eval::evaluate;

#[test]
fn port_ranges_become_exact_prefix_covers() {
    assert_eq!(port_prefixes(80, 80), vec![(80, 16)]);
    assert_eq!(port_prefixes(80, 81), vec![(80, 15)]);
    assert_eq!(port_prefixes(1, 65535).len(), 16);
    for (first, last) in [
        (1, 65535),
        (80, 81),
        (81, 90),
        (1000, 2999),
        (32768, 65535),
        (7, 7),
    ] {
        let mut covered = BTreeSet::new();
        for (value, bits) in port_prefixes(first, last) {
            let size = 1u32 << (16 - u32::from(bits));
            assert_eq!(u32::from(value) % size, 0, "{value}/{bits} is aligned");
            for p in u32::from(value)..u32::from(value) + size {
                assert!(covered.insert(p), "{p} covered twice in {first}-{last}");
            }
        }
        assert_eq!(covered, (first..=last).collect(), "{first}-{last}");
    }
}

fn namespaces() -> Vec<Namespace> {
    ["x", "y", "z"]
        .iter()
        .map(|ns| Namespace {
            name: ns.to_string(),
            labels: BTreeMap::from([("ns".to_owned(), ns.to_string())]),
        })
        .collect()
}

/// The 9 pods of the upstream truth tables; named ports differ between pods so that a
/// named port resolving against the wrong pod shows.
fn pods() -> Vec<Pod> {
    let mut all = Vec::new();
    for (i, ns) in ["x", "y", "z"].iter().enumerate() {
        for (j, name) in ["a", "b", "c"].iter().enumerate() {
            let k = i * 3 + j;
            all.push(Pod {
                namespace: ns.to_string(),
                name: name.to_string(),
                ip: Ipv4Addr::new(10, 244, 1 + (k % 2) as u8, 10 + k as u8),
                labels: BTreeMap::from([
                    ("pod".to_owned(), name.to_string()),
                    (
                        "tier".to_owned(),
                        if k % 3 == 0 { "web" } else { "db" }.to_owned(),
                    ),
                ]),
                ports: vec![
                    ContainerPort {
                        name: "serve".into(),
                        container_port: 80 + (k % 2) as u16,
                        protocol: "TCP".into(),
                    },
                    ContainerPort {
                        name: "dns".into(),
                        container_port: 81,
                        protocol: "UDP".into(),
                    },
                ],
            });
        }
    }
    all
}

fn policy(value: Value) -> NetworkPolicy {
    let policy: NetworkPolicy = serde_json::from_value(value).expect("policy");
    assert_eq!(policy.validate(), Vec::<String>::new(), "{policy:?}");
    policy
}

/// Asserts that the compiled tables decide every pair, port and protocol as the reference
/// evaluator does, and that an allowing rule belongs to a policy selecting the pod.
fn assert_agrees(policies: &[NetworkPolicy]) {
    let namespaces = namespaces();
    let pods = pods();
    let ns_map: BTreeMap<String, BTreeMap<String, String>> = namespaces
        .iter()
        .map(|n| (n.name.clone(), n.labels.clone()))
        .collect();
    let compiled = compile(&namespaces, &pods, policies);
    for src in &pods {
        for dst in &pods {
            for port in [79, 80, 81, 82, 8080] {
                for protocol in ["TCP", "UDP", "SCTP"] {
                    let want = evaluate(
                        policies,
                        &ns_map,
                        &src.endpoint(),
                        &dst.endpoint(),
                        port,
                        protocol,
                    );
                    let proto = protocol_number(protocol).expect("protocol");
                    let got = Compiled::explain(&compiled.tables, src.ip, dst.ip, port, proto);
                    assert_eq!(
                        (got.egress.allows(), got.ingress.allows()),
                        (want.egress.allows(), want.ingress.allows()),
                        "{}/{} -> {}/{} {port}/{protocol} under {policies:#?}",
                        src.namespace,
                        src.name,
                        dst.namespace,
                        dst.name
                    );
                    for (verdict, ep, direction) in [
                        (&got.egress, src, Direction::Egress),
                        (&got.ingress, dst, Direction::Ingress),
                    ] {
                        if let EndVerdict::Allow { rule } = verdict {
                            let rule = compiled.rule(*rule).expect("rule id");
                            assert_eq!(rule.direction, direction);
                            assert!(
                                compiled.selected_by[&(ep.ip, direction)].contains(&rule.policy)
                            );
                        }
                    }
                }
            }
        }
    }
}

fn fixed_policies() -> Vec<NetworkPolicy> {
    vec![
        policy(
            json!({"metadata": {"name": "deny-ingress", "namespace": "x"}, "spec": {"podSelector": {}}}),
        ),
        policy(
            json!({"metadata": {"name": "deny-egress", "namespace": "y"},
            "spec": {"podSelector": {}, "policyTypes": ["Egress"]}}),
        ),
        policy(
            json!({"metadata": {"name": "from-ns-y-pod-a", "namespace": "x"}, "spec": {
            "podSelector": {"matchLabels": {"pod": "a"}},
            "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"ns": "y"}},
                                   "podSelector": {"matchExpressions": [{"key": "pod", "operator": "In", "values": ["a", "b"]}]}}]}]}}),
        ),
        policy(
            json!({"metadata": {"name": "ipblock", "namespace": "z"}, "spec": {
            "podSelector": {"matchExpressions": [{"key": "tier", "operator": "Exists"}]},
            "ingress": [{"from": [{"ipBlock": {"cidr": "10.244.0.0/16", "except": ["10.244.1.0/24", "10.244.2.12/32"]}}],
                         "ports": [{"port": 80, "endPort": 81}]}]}}),
        ),
        policy(
            json!({"metadata": {"name": "named-egress", "namespace": "x"}, "spec": {
            "podSelector": {"matchLabels": {"pod": "b"}}, "policyTypes": ["Egress"],
            "egress": [{"to": [{"namespaceSelector": {}}], "ports": [{"port": "serve"}, {"port": "dns", "protocol": "UDP"}]}]}}),
        ),
        policy(
            json!({"metadata": {"name": "named-ingress", "namespace": "y"}, "spec": {
            "podSelector": {"matchExpressions": [{"key": "pod", "operator": "NotIn", "values": ["c"]}]},
            "ingress": [{"ports": [{"port": "serve"}]}, {"from": [{"podSelector": {}}], "ports": [{"protocol": "SCTP"}]}]}}),
        ),
        policy(
            json!({"metadata": {"name": "egress-to-z", "namespace": "y"}, "spec": {
            "podSelector": {"matchExpressions": [{"key": "nothing", "operator": "DoesNotExist"}]},
            "policyTypes": ["Egress", "Ingress"],
            "egress": [{"to": [{"namespaceSelector": {"matchLabels": {"ns": "z"}}}, {"ipBlock": {"cidr": "10.244.2.0/24"}}],
                        "ports": [{"protocol": "UDP", "port": 79, "endPort": 82}]}]}}),
        ),
    ]
}

#[test]
fn compiled_tables_decide_as_the_reference_evaluator() {
    let all = fixed_policies();
    assert_agrees(&[]);
    for p in &all {
        assert_agrees(std::slice::from_ref(p));
    }
    assert_agrees(&all);
}

/// A small deterministic generator (xorshift) of random policies over the 9-pod world.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
        items[(self.next() % items.len() as u64) as usize]
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }
}

fn random_selector(rng: &mut Rng, key: &str, values: &[&str]) -> Value {
    if rng.chance(30) {
        return json!({});
    }
    if rng.chance(50) {
        return json!({"matchLabels": {key: rng.pick(values)}});
    }
    let op = rng.pick(&["In", "NotIn", "Exists", "DoesNotExist"]);
    let values: Vec<&str> = if matches!(op, "In" | "NotIn") {
        vec![rng.pick(values), rng.pick(values)]
    } else {
        vec![]
    };
    json!({"matchExpressions": [{"key": key, "operator": op, "values": values}]})
}

fn random_peer(rng: &mut Rng) -> Value {
    match rng.next() % 4 {
        0 => json!({"podSelector": random_selector(rng, "pod", &["a", "b", "c"])}),
        1 => json!({"namespaceSelector": random_selector(rng, "ns", &["x", "y", "z"])}),
        2 => json!({"podSelector": random_selector(rng, "tier", &["web", "db"]),
                    "namespaceSelector": random_selector(rng, "ns", &["x", "y", "z"])}),
        _ => {
            let cidr = rng.pick(&[
                "10.244.0.0/16",
                "10.244.1.0/24",
                "10.244.2.0/25",
                "10.244.1.12/30",
            ]);
            let except: Vec<String> = match cidr {
                "10.244.0.0/16" if rng.chance(50) => vec!["10.244.2.0/24".into()],
                "10.244.1.0/24" if rng.chance(50) => vec!["10.244.1.14/31".into()],
                _ => vec![],
            };
            json!({"ipBlock": {"cidr": cidr, "except": except}})
        }
    }
}

fn random_port(rng: &mut Rng) -> Value {
    let protocol = rng.pick(&["TCP", "UDP", "SCTP"]);
    match rng.next() % 4 {
        0 => json!({"protocol": protocol}),
        1 => json!({"protocol": protocol, "port": 80}),
        2 => json!({"protocol": protocol, "port": 79, "endPort": 81}),
        _ => json!({"protocol": protocol, "port": rng.pick(&["serve", "dns"])}),
    }
}

fn random_rules(rng: &mut Rng, field: &str) -> Vec<Value> {
    (0..rng.next() % 3)
        .map(|_| {
            let peers: Vec<Value> = (0..rng.next() % 3).map(|_| random_peer(rng)).collect();
            let ports: Vec<Value> = (0..rng.next() % 3).map(|_| random_port(rng)).collect();
            json!({field: peers, "ports": ports})
        })
        .collect()
}

#[test]
fn random_policies_compile_to_what_the_reference_evaluator_decides() {
    let mut rng = Rng(0x5eed_cafe_f00d_d00d);
    for case in 0..150 {
        let count = 1 + rng.next() % 3;
        let policies: Vec<NetworkPolicy> = (0..count)
            .map(|i| {
                let types: Value = match rng.next() % 4 {
                    0 => json!(["Ingress"]),
                    1 => json!(["Egress"]),
                    2 => json!(["Ingress", "Egress"]),
                    _ => Value::Null,
                };
                let mut spec = json!({
                    "podSelector": random_selector(&mut rng, "pod", &["a", "b", "c"]),
                    "ingress": random_rules(&mut rng, "from"),
                    "egress": random_rules(&mut rng, "to"),
                });
                if !types.is_null() {
                    spec["policyTypes"] = types;
                }
                policy(json!({
                    "metadata": {"name": format!("p{case}-{i}"), "namespace": rng.pick(&["x", "y", "z"])},
                    "spec": spec,
                }))
            })
            .collect();
        assert_agrees(&policies);
    }
}

#[test]
fn constant_lookups_whatever_the_rule_count() {
    // 10,000 ipBlock rules on one pod: one ipcache prefix and one rule entry each, and the
    // pod's allowed peer still decided by the same two rule lookups.
    let mut pods = pods();
    pods.truncate(2);
    let rules: Vec<Value> = (0..10_000u32)
        .map(|i| json!({"from": [{"ipBlock": {"cidr": format!("172.16.{}.{}/32", i / 256, i % 256)}}]}))
        .collect();
    let p = policy(json!({"metadata": {"name": "many", "namespace": "x"},
        "spec": {"podSelector": {"matchLabels": {"pod": "a"}}, "ingress": rules}}));
    let compiled = compile(&namespaces(), &pods, &[p]);
    let a = pods[0].ip;
    assert_eq!(compiled.entries[&(a, Direction::Ingress)], 10_000);
    assert!(compiled.tables.ipcache.len() >= 10_000);
    let inside = Ipv4Addr::new(172, 16, 39, 15);
    let verdict = Compiled::explain(&compiled.tables, inside, a, 80, 6);
    assert_eq!(
        compiled
            .rule(match verdict.ingress {
                EndVerdict::Allow { rule } => rule,
                other => panic!("{other:?}"),
            })
            .expect("rule")
            .index,
        39 * 256 + 15
    );
    assert_eq!(
        Compiled::explain(&compiled.tables, pods[1].ip, a, 80, 6).ingress,
        EndVerdict::Deny
    );
}
