//! A real engine process killed with SIGKILL during acknowledged load: after restart
//! every acknowledged event is there, at its acknowledged offset, in order per partition.

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use common::EngineProcess;
use flowgate_client::Client;
use flowgate_core::{BatchBuilder, BatchView, Codec, ProducerStamp};

const PARTITIONS: u32 = 4;

/// (partition, offset) → payload, for every acknowledged event.
type Acked = Arc<Mutex<HashMap<(u32, u64), String>>>;

async fn produce_until_killed(addr: String, writer: u32, acked: Acked) {
    let Ok(client) = Client::connect(&addr).await else {
        return;
    };
    let mut seq = 0u64;
    loop {
        // 50 events with 10 keys: keys spread over partitions, order per key must hold.
        let mut builder = BatchBuilder::new();
        let mut payloads = Vec::new();
        for i in 0..50u64 {
            let key = format!("w{writer}-k{}", i % 10);
            let payload = format!("{{\"writer\":{writer},\"seq\":{seq},\"i\":{i},\"key\":\"{key}\"}}");
            builder.push_payload(flowgate_core::time::now_ms(), Some(key.as_bytes()), payload.as_bytes());
            payloads.push((key, payload));
        }
        let batch = Bytes::from(builder.finish(Codec::None, ProducerStamp::default()).unwrap().bytes);
        let Ok(acks) = client.produce("crash", batch, ProducerStamp::default()).await else {
            return;
        };
        // Map acknowledged offsets back to events: within a partition, batch order.
        let mut by_partition: HashMap<u32, Vec<&String>> = HashMap::new();
        for (key, payload) in &payloads {
            by_partition.entry(flowgate_core::partition_for_key(key.as_bytes(), PARTITIONS)).or_default().push(payload);
        }
        let mut acked = acked.lock().unwrap();
        for ack in acks {
            let events = &by_partition[&ack.partition];
            assert_eq!(events.len() as u32, ack.record_count);
            for (i, payload) in events.iter().enumerate() {
                acked.insert((ack.partition, ack.first_offset + i as u64), (*payload).clone());
            }
        }
        seq += 1;
    }
}

async fn read_partition(client: &Client, partition: u32) -> Vec<(u64, String)> {
    let mut out = Vec::new();
    let mut offset = 0u64;
    let mut scratch = Vec::new();
    loop {
        let fetched = client.fetch("crash", partition, offset, 1 << 20, 0).await.unwrap();
        if fetched.batches.is_empty() {
            return out;
        }
        let mut rest = &fetched.batches[..];
        while !rest.is_empty() {
            let (view, tail) = BatchView::parse(rest).unwrap();
            for r in view.records(&mut scratch).unwrap() {
                let r = r.unwrap();
                let o = view.base_offset() + u64::from(r.offset_delta);
                if o >= offset {
                    out.push((o, String::from_utf8(r.payload.to_vec()).unwrap()));
                    offset = o + 1;
                }
            }
            rest = tail;
        }
    }
}

fn run_crash_case(fsync: &str) {
    let dir = tempfile::tempdir().unwrap();
    let mut engine =
        EngineProcess::start(dir.path(), &[("FLOWGATE_LOG__FSYNC", fsync), ("FLOWGATE_LOG__SEGMENT_BYTES", "262144")]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let acked: Acked = Arc::default();
    let addr = engine.binary.to_string();
    rt.block_on(async {
        let client = Client::connect(&addr).await.unwrap();
        client.create_topic("crash", PARTITIONS).await.unwrap();
    });
    let writers: Vec<_> = (0..4).map(|w| rt.spawn(produce_until_killed(addr.clone(), w, acked.clone()))).collect();
    // Let load build up, then kill mid-stream.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while acked.lock().unwrap().len() < 200_000 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    engine.kill9();
    rt.block_on(async {
        for w in writers {
            let _ = tokio::time::timeout(Duration::from_secs(10), w).await;
        }
    });
    let acked = acked.lock().unwrap().clone();
    assert!(acked.len() >= 100_000, "too little acknowledged load before the kill: {}", acked.len());

    let engine = engine.restart();
    let addr = engine.binary.to_string();
    rt.block_on(async {
        let client = Client::connect(&addr).await.unwrap();
        let mut found = 0;
        for p in 0..PARTITIONS {
            let stored = read_partition(&client, p).await;
            // Offsets are dense and increasing.
            for (i, (o, _)) in stored.iter().enumerate() {
                assert_eq!(*o, i as u64, "partition {p}: offsets must be dense");
            }
            // Per key, the writer's sequence never goes backwards.
            let mut last: HashMap<String, u64> = HashMap::new();
            for (_, payload) in &stored {
                let v: serde_json::Value = serde_json::from_str(payload).unwrap();
                let key = v["key"].as_str().unwrap().to_owned();
                let seq = v["seq"].as_u64().unwrap();
                let prev = last.insert(key.clone(), seq);
                assert!(prev.is_none_or(|prev| prev <= seq), "order broken for key {key}");
            }
            let stored: HashMap<u64, String> = stored.into_iter().collect();
            for ((partition, offset), payload) in acked.iter().filter(|((pp, _), _)| *pp == p) {
                assert_eq!(
                    stored.get(offset),
                    Some(payload),
                    "acknowledged event lost or changed at partition {partition} offset {offset} (fsync={fsync})"
                );
                found += 1;
            }
        }
        assert_eq!(found, acked.len());
    });
}

#[test]
fn sigkill_under_load_loses_no_acknowledged_event_with_fsync_interval() {
    run_crash_case("interval");
}

#[test]
fn sigkill_under_load_loses_no_acknowledged_event_with_fsync_always() {
    run_crash_case("always");
}
