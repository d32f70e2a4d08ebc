//! Append and read throughput of one partition on the real filesystem.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use flowgate_core::{BatchBuilder, Codec, ProducerStamp};
use flowgate_log::{FsyncPolicy, Log, LogConfig};

fn encoded_batch(events: usize) -> Vec<u8> {
    let mut b = BatchBuilder::new();
    let payload = [b'x'; 100];
    for i in 0..events {
        b.push_payload(1_700_000_000_000 + i as i64, None, &payload);
    }
    b.finish(Codec::None, ProducerStamp::default()).unwrap().bytes
}

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("append");
    for events in [100usize, 1000] {
        let batch = encoded_batch(events);
        group.throughput(Throughput::Elements(events as u64));
        group.bench_with_input(BenchmarkId::new("interval_100B_events", events), &batch, |b, batch| {
            let dir = tempfile::tempdir().unwrap();
            let log = Log::open(dir.path(), LogConfig { fsync: FsyncPolicy::Never, ..LogConfig::default() }).unwrap();
            let p = log.topic_or_create("bench").unwrap().partition(0).unwrap().clone();
            let mut buf = batch.clone();
            b.iter(|| p.append(&mut buf).unwrap())
        });
    }
    group.finish();

    let mut group = c.benchmark_group("read");
    let dir = tempfile::tempdir().unwrap();
    let log = Log::open(dir.path(), LogConfig::default()).unwrap();
    let p = log.topic_or_create("bench").unwrap().partition(0).unwrap().clone();
    let batch = encoded_batch(1000);
    for _ in 0..200 {
        p.append(&mut batch.clone()).unwrap();
    }
    group.throughput(Throughput::Bytes(1 << 20));
    group.bench_function("1MiB_from_middle", |b| {
        let mut offset = 0u64;
        b.iter(|| {
            let r = p.read(offset, 1 << 20).unwrap();
            offset = (offset + 37_000) % 150_000;
            r.batches.len()
        })
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
