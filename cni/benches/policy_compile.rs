//! NetworkPolicy compilation: the time from a policy list to the node's tables, for the rule
//! counts of `slipway bench policy` (ipBlock rules selecting one pod, as in that suite).

use std::collections::BTreeMap;
use std::hint::black_box;
use std::net::Ipv4Addr;

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use serde_json::json;
use slipway_cni::policy::NetworkPolicy;
use slipway_cni::policy::compile::{Namespace, Pod, compile};

fn world(rules: u32) -> (Vec<Namespace>, Vec<Pod>, Vec<NetworkPolicy>) {
    let namespaces = vec![Namespace {
        name: "bench".into(),
        labels: BTreeMap::from([("ns".into(), "bench".into())]),
    }];
    let pods = ["client", "server"]
        .iter()
        .enumerate()
        .map(|(i, name)| Pod {
            namespace: "bench".into(),
            name: name.to_string(),
            ip: Ipv4Addr::new(10, 244, 1, 2 + i as u8),
            labels: BTreeMap::from([("app".into(), name.to_string())]),
            ports: vec![],
        })
        .collect();
    // 10 policies selecting the server; 9 in 10 rules are ipBlock /32s, 1 in 10 selector rules
    // on unused ports.
    let policies = (0..10u32)
        .map(|p| {
            let ingress: Vec<_> = (0..rules / 10)
                .map(|i| {
                    let n = p * (rules / 10) + i;
                    if n.is_multiple_of(10) {
                        json!({"from": [{"podSelector": {"matchLabels": {"app": "client"}}}],
                               "ports": [{"port": 10_000 + n % 50_000}]})
                    } else {
                        json!({"from": [{"ipBlock": {"cidr": format!("172.{}.{}.{}/32", 16 + n / 65536, (n / 256) % 256, n % 256)}}],
                               "ports": [{"port": 80}]})
                    }
                })
                .collect();
            serde_json::from_value(json!({
                "metadata": {"name": format!("p{p}"), "namespace": "bench"},
                "spec": {"podSelector": {"matchLabels": {"app": "server"}}, "ingress": ingress},
            }))
            .expect("policy")
        })
        .collect();
    (namespaces, pods, policies)
}

fn compile_rules(c: &mut Criterion) {
    let mut group = c.benchmark_group("policy_compile");
    group.sample_size(10);
    for rules in [1_000u32, 10_000] {
        let (namespaces, pods, policies) = world(rules);
        group.bench_with_input(BenchmarkId::from_parameter(rules), &rules, |b, _| {
            b.iter(|| black_box(compile(&namespaces, &pods, &policies)))
        });
    }
    group.finish();
}

criterion_group!(benches, compile_rules);
criterion_main!(benches);
