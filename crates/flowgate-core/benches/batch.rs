//! Batch encode/decode and CRC32C throughput.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use flowgate_core::{BatchBuilder, BatchView, Codec, ProducerStamp};

fn payload(i: usize) -> Vec<u8> {
    format!(r#"{{"device":"sensor-{:05}","temp":{}.{},"ok":true,"seq":{:08}}}"#, i % 10_000, 20 + i % 10, i % 7, i)
        .into_bytes()
        .into_iter()
        .chain(std::iter::repeat_n(b' ', 30))
        .take(100)
        .collect()
}

fn bench(c: &mut Criterion) {
    let events: Vec<Vec<u8>> = (0..1000).map(payload).collect();
    let mut group = c.benchmark_group("batch");
    group.throughput(Throughput::Elements(events.len() as u64));
    for codec in [Codec::None, Codec::Lz4, Codec::Zstd] {
        group.bench_with_input(BenchmarkId::new("encode_1000x100B", codec), &codec, |b, &codec| {
            let mut builder = BatchBuilder::with_capacity(128 * 1024);
            let mut out = Vec::new();
            b.iter(|| {
                for (i, e) in events.iter().enumerate() {
                    builder.push_payload(1_700_000_000_000 + i as i64, None, e);
                }
                builder.finish_into(codec, ProducerStamp::default(), &mut out).unwrap();
                out.len()
            })
        });
        let mut builder = BatchBuilder::new();
        for (i, e) in events.iter().enumerate() {
            builder.push_payload(1_700_000_000_000 + i as i64, None, e);
        }
        let encoded = builder.finish(codec, ProducerStamp::default()).unwrap();
        group.bench_with_input(BenchmarkId::new("decode_1000x100B", codec), &encoded.bytes, |b, bytes| {
            let mut scratch = Vec::new();
            b.iter(|| {
                let (view, _) = BatchView::parse(bytes).unwrap();
                let mut total = 0usize;
                for r in view.records(&mut scratch).unwrap() {
                    total += r.unwrap().payload.len();
                }
                total
            })
        });
    }
    group.finish();

    let mut crc = c.benchmark_group("crc32c");
    let data = vec![0xa5u8; 1 << 20];
    crc.throughput(Throughput::Bytes(data.len() as u64));
    crc.bench_function("1MiB", |b| b.iter(|| crc32c::crc32c(&data)));
    crc.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
