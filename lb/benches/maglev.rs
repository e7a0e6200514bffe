//! criterion: building the Maglev table for N = 10, 100, 1000 backends at M = 65537.

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use slipway_lb::maglev::{DEFAULT_SIZE, Table, Weighted};

fn backends(n: usize) -> Vec<Weighted> {
    (0..n)
        .map(|i| Weighted {
            name: format!("10.{}.{}.{}:80", i / 65536, (i / 256) % 256, i % 256),
            weight: 1,
        })
        .collect()
}

fn build(c: &mut Criterion) {
    let mut group = c.benchmark_group("maglev_build_m65537");
    for n in [10usize, 100, 1000] {
        let input = backends(n);
        group.bench_with_input(BenchmarkId::from_parameter(n), &input, |b, input| {
            b.iter(|| Table::build(std::hint::black_box(input), DEFAULT_SIZE))
        });
    }
    group.finish();
}

criterion_group!(benches, build);
criterion_main!(benches);
