//! Kernels on 1M f64 against the one-element-at-a-time loop.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use flowgate_kernels::{available_levels, count_where_with, reference, scale_offset_with, stats_with, Cmp};

fn bench(c: &mut Criterion) {
    let x: Vec<f64> = (0..1_000_000).map(|i| ((i * 7919) % 10_007) as f64 * 0.01 - 30.0).collect();
    let mut group = c.benchmark_group("stats_1M");
    group.throughput(Throughput::Elements(x.len() as u64));
    group.bench_function("naive_scalar", |b| b.iter(|| reference::sum_min_max(std::hint::black_box(&x))));
    for level in available_levels() {
        group.bench_with_input(BenchmarkId::new("kernel", format!("{level:?}")), &level, |b, &l| {
            b.iter(|| stats_with(l, std::hint::black_box(&x)))
        });
    }
    group.finish();

    let mut group = c.benchmark_group("count_gt_1M");
    group.throughput(Throughput::Elements(x.len() as u64));
    group
        .bench_function("naive_scalar", |b| b.iter(|| reference::count_where(std::hint::black_box(&x), Cmp::Gt, 10.0)));
    for level in available_levels() {
        group.bench_with_input(BenchmarkId::new("kernel", format!("{level:?}")), &level, |b, &l| {
            b.iter(|| count_where_with(l, std::hint::black_box(&x), Cmp::Gt, 10.0))
        });
    }
    group.finish();

    let mut group = c.benchmark_group("scale_offset_1M");
    group.throughput(Throughput::Elements(x.len() as u64));
    let mut out = Vec::with_capacity(x.len());
    group.bench_function("naive_scalar", |b| {
        b.iter(|| {
            out.clear();
            for &v in std::hint::black_box(&x) {
                out.push(v * 1.8 + 32.0);
            }
        })
    });
    for level in available_levels() {
        group.bench_with_input(BenchmarkId::new("kernel", format!("{level:?}")), &level, |b, &l| {
            b.iter(|| scale_offset_with(l, std::hint::black_box(&x), 1.8, 32.0, &mut out))
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
