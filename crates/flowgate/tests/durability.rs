//! "Acknowledged means stored" against a real engine process: idempotent sequences are
//! checked in order, a producer whose connections are cut mid-flight loses, duplicates
//! and reorders nothing it was told is stored, and a topic whose metadata file was lost
//! keeps its data.

mod common;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::EngineProcess;
use flowgate_client::{Client, ClientError, Producer, ProducerConfig};
use flowgate_core::{BatchBuilder, BatchView, Codec, Event, ProducerStamp};
use flowgate_protocol::{check_frame, decode_response, encode_request, ErrorCode, Request, Response};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn batch(values: std::ops::Range<u64>, stamp: ProducerStamp) -> Bytes {
    let mut b = BatchBuilder::new();
    for n in values {
        b.push_payload(flowgate_core::time::now_ms(), None, format!("{{\"n\":{n}}}").as_bytes());
    }
    Bytes::from(b.finish(Codec::None, stamp).unwrap().bytes)
}

/// Every record of a partition, as (key, payload) in offset order.
async fn read_partition(client: &Client, topic: &str, partition: u32) -> Vec<(Option<Vec<u8>>, serde_json::Value)> {
    let mut out = Vec::new();
    let mut offset = 0;
    let mut scratch = Vec::new();
    loop {
        let f = client.fetch(topic, partition, offset, 1 << 20, 0).await.unwrap();
        if f.batches.is_empty() {
            return out;
        }
        let mut rest = &f.batches[..];
        while !rest.is_empty() {
            let (view, tail) = BatchView::parse(rest).unwrap();
            for r in view.records(&mut scratch).unwrap() {
                let r = r.unwrap();
                if view.base_offset() + u64::from(r.offset_delta) >= offset {
                    out.push((r.key.map(<[u8]>::to_vec), serde_json::from_slice(r.payload).unwrap()));
                }
            }
            offset = view.last_offset() + 1;
            rest = tail;
        }
    }
}

fn is_server_error(result: &Result<Vec<flowgate_client::PartitionAck>, ClientError>, code: ErrorCode) -> bool {
    matches!(result, Err(ClientError::Server { code: c, .. }) if *c == code)
}

#[test]
fn sequences_out_of_order_are_refused_and_a_never_stored_one_is_never_reported_stored() {
    let dir = tempfile::tempdir().unwrap();
    let engine = EngineProcess::start(dir.path(), &[]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let client = Client::connect(&engine.binary.to_string()).await.unwrap();
        client.create_topic("seq", 1).await.unwrap();
        let s = |sequence| ProducerStamp { producer_id: 4242, sequence };
        client.produce_to("seq", 0, batch(0..1, s(0)), s(0)).await.unwrap();
        // Sequence 1 is lost on the way (a dropped connection). Sequences 2 to 10 arrive;
        // the engine must store none of them and say so.
        for seq in 2..=10 {
            let r = client.produce_to("seq", 0, batch(seq..seq + 1, s(seq)), s(seq)).await;
            assert!(is_server_error(&r, ErrorCode::OutOfOrderSequence), "sequence {seq}: {r:?}");
        }
        assert_eq!(read_partition(&client, "seq", 0).await.len(), 1, "nothing after the gap was stored");
        // The lost sequence, resent, is stored: not answered DUPLICATE_SEQUENCE.
        let acks = client.produce_to("seq", 0, batch(1..2, s(1)), s(1)).await.unwrap();
        assert_eq!(acks[0].first_offset, 1);
        for seq in 2..=10 {
            client.produce_to("seq", 0, batch(seq..seq + 1, s(seq)), s(seq)).await.unwrap();
        }
        // Replays: recent ones answer with their offsets, old ones DUPLICATE_SEQUENCE,
        // and none stores anything again.
        let again = client.produce_to("seq", 0, batch(10..11, s(10)), s(10)).await.unwrap();
        assert_eq!(again[0].first_offset, 10);
        let old = client.produce_to("seq", 0, batch(2..3, s(2)), s(2)).await;
        assert!(is_server_error(&old, ErrorCode::DuplicateSequence), "{old:?}");
        let stored: Vec<u64> =
            read_partition(&client, "seq", 0).await.iter().map(|(_, v)| v["n"].as_u64().unwrap()).collect();
        assert_eq!(stored, (0..=10).collect::<Vec<_>>(), "each sequence stored once, in order");
        // A producer the partition does not know must start at 0.
        let t = ProducerStamp { producer_id: 99, sequence: 7 };
        let r = client.produce_to("seq", 0, batch(0..1, t), t).await;
        assert!(is_server_error(&r, ErrorCode::UnknownProducer), "{r:?}");
        // An idempotent batch may not be split by the engine across partitions.
        let r = client.produce("seq", batch(0..1, s(11)), s(11)).await;
        assert!(is_server_error(&r, ErrorCode::InvalidRequest), "{r:?}");
        // A keyed record must belong to the partition it is sent to.
        client.create_topic("keyed", 4).await.unwrap();
        let key = b"some-key";
        let wrong = (flowgate_core::partition_for_key(key, 4) + 1) % 4;
        let mut b = BatchBuilder::new();
        b.push_payload(1, Some(key), b"{}");
        let r = client.produce_to("keyed", wrong, Bytes::from(b.finish(Codec::None, s(0)).unwrap().bytes), s(0)).await;
        assert!(is_server_error(&r, ErrorCode::InvalidBatch), "{r:?}");
    });
    assert!(engine.metric("flowgate_ingest_rejected_total{path=\"binary\",reason=\"out_of_order_sequence\"}") >= 10.0);
}

#[test]
fn a_duplicate_sequence_is_answered_only_once_the_batch_it_vouches_for_is_durable() {
    let dir = tempfile::tempdir().unwrap();
    // Acknowledgements wait for an fsync that takes 500 ms, and so must
    // DUPLICATE_SEQUENCE, which tells the client its batch is stored.
    let env = [("FLOWGATE_LOG__FSYNC", "always"), ("FLOWGATE_FAILPOINT_FSYNC_DELAY_MS", "500")];
    let engine = EngineProcess::start(dir.path(), &env);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let addr = engine.binary.to_string();
        let first = Client::connect(&addr).await.unwrap();
        first.create_topic("dup", 1).await.unwrap();
        let s = |sequence| ProducerStamp { producer_id: 7, sequence };
        let mut pending = Vec::new();
        for seq in 0..6 {
            pending.push(first.produce_to_queued("dup", 0, batch(seq..seq + 1, s(seq)), s(seq)).await.unwrap());
        }
        // A resend on another connection, once all six are in the log: sequence 0 is
        // older than the five the partition remembers.
        let second = Client::connect(&addr).await.unwrap();
        while second.fetch("dup", 0, 0, 1 << 20, 0).await.unwrap().log_end_offset < 6 {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let acked = tokio::spawn(async move {
            for p in pending {
                p.acks().await.unwrap();
            }
            std::time::Instant::now()
        });
        let asked = std::time::Instant::now();
        let dup = second.produce_to("dup", 0, batch(0..1, s(0)), s(0)).await;
        let answered = std::time::Instant::now();
        assert!(is_server_error(&dup, ErrorCode::DuplicateSequence), "{dup:?}");
        let acked = acked.await.unwrap();
        assert!(
            acked > asked,
            "the batches were acknowledged before the resend was even sent: the test proves nothing"
        );
        assert!(
            answered + Duration::from_millis(50) >= acked,
            "DUPLICATE_SEQUENCE came {:?} before the batches it vouches for were durable",
            acked - answered
        );
    });
}

/// Writes one request frame on a raw socket and reads one response frame.
fn raw_call(stream: &mut std::net::TcpStream, request: &Request<'_>) -> Vec<u8> {
    let mut out = Vec::new();
    encode_request(1, request, &mut out);
    stream.write_all(&out).unwrap();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(len) = check_frame(&buf, u32::MAX).unwrap() {
            buf.truncate(len);
            return buf;
        }
        let n = stream.read(&mut chunk).unwrap();
        assert!(n > 0, "connection closed before a reply");
        buf.extend_from_slice(&chunk[..n]);
    }
}

#[test]
fn protocol_version_1_clients_still_produce_and_get_version_1() {
    let dir = tempfile::tempdir().unwrap();
    let engine = EngineProcess::start(dir.path(), &[]);
    let mut stream = std::net::TcpStream::connect(engine.binary).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let reply = raw_call(&mut stream, &Request::Hello { min_version: 1, max_version: 1, client_name: "old" });
    assert!(matches!(decode_response(&reply).unwrap().1, Response::HelloOk { version: 1, .. }));
    let b = batch(0..3, ProducerStamp::default());
    let reply = raw_call(&mut stream, &Request::Produce { topic: "old", producer_id: 0, sequence: 0, batch: &b });
    assert!(matches!(decode_response(&reply).unwrap().1, Response::ProduceOk(_)), "{:?}", decode_response(&reply));
    // Version 2 requests need a version 2 handshake.
    let reply = raw_call(&mut stream, &Request::Metadata { topic: "old" });
    assert!(matches!(decode_response(&reply).unwrap().1, Response::Error { code: ErrorCode::InvalidRequest, .. }));
}

/// A TCP proxy that cuts every connection after a few KiB from the client, in the
/// middle of whatever it is forwarding: requests in flight are lost, replies are lost,
/// frames are torn.
async fn cutting_proxy(upstream: std::net::SocketAddr) -> (std::net::SocketAddr, Arc<AtomicU64>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let cuts = Arc::new(AtomicU64::new(0));
    let cuts2 = cuts.clone();
    tokio::spawn(async move {
        let mut n = 0u64;
        while let Ok((mut client, _)) = listener.accept().await {
            n += 1;
            // Varying budgets, from 2 KiB (inside the handshake or the first batch) up.
            let budget = 2048 + (n * 7919) % 40_000;
            let cuts = cuts2.clone();
            tokio::spawn(async move {
                let Ok(mut server) = tokio::net::TcpStream::connect(upstream).await else { return };
                let (mut cr, mut cw) = client.split();
                let (mut sr, mut sw) = server.split();
                let up = async {
                    let mut left = budget;
                    let mut buf = vec![0u8; 16 * 1024];
                    loop {
                        let n = match cr.read(&mut buf).await {
                            Ok(0) | Err(_) => return false,
                            Ok(n) => n,
                        };
                        let take = n.min(left as usize);
                        if sw.write_all(&buf[..take]).await.is_err() {
                            return false;
                        }
                        left -= take as u64;
                        if left == 0 {
                            return true;
                        }
                    }
                };
                let down = tokio::io::copy(&mut sr, &mut cw);
                let cut = tokio::select! {
                    cut = up => cut,
                    _ = down => false,
                };
                if cut {
                    cuts.fetch_add(1, Ordering::Relaxed);
                }
                // Dropping both sockets closes both sides.
            });
        }
    });
    (addr, cuts)
}

#[test]
fn a_producer_whose_connections_are_cut_mid_flight_stores_every_acknowledged_event_once_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let engine = EngineProcess::start(dir.path(), &[]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let direct = Client::connect(&engine.binary.to_string()).await.unwrap();
        direct.create_topic("chaos", 3).await.unwrap();
        let (proxy, cuts) = cutting_proxy(engine.binary).await;
        let config = ProducerConfig {
            max_batch_events: 40,
            max_in_flight: 16,
            retries: 200,
            retry_backoff: Duration::from_millis(2),
            ..ProducerConfig::default()
        };
        let mut producer = Producer::new(&proxy.to_string(), "chaos", config).await.unwrap();
        let total = 12_000u64;
        for n in 0..total {
            let key = if n % 7 == 0 { None } else { Some(format!("k{}", n % 13)) };
            let event = Event::from_payload(format!(r#"{{"k":{},"n":{n}}}"#, serde_json::json!(key)).into_bytes());
            let event = match &key {
                Some(k) => event.with_key(k.clone().into_bytes()),
                None => event,
            };
            producer.send(&event).await.unwrap();
        }
        let acked = producer.flush().await.unwrap();
        assert_eq!(acked, total, "every event acknowledged once");
        assert!(cuts.load(Ordering::Relaxed) >= 5, "the proxy cut connections mid-flight");

        let mut seen: HashMap<u64, u32> = HashMap::new();
        let mut last_per_key: HashMap<String, u64> = HashMap::new();
        for p in 0..3 {
            for (key, v) in read_partition(&direct, "chaos", p).await {
                let n = v["n"].as_u64().unwrap();
                *seen.entry(n).or_default() += 1;
                if let Some(key) = key {
                    let key = String::from_utf8(key).unwrap();
                    if let Some(prev) = last_per_key.insert(key.clone(), n) {
                        assert!(prev < n, "key {key}: {n} stored after {prev}");
                    }
                }
            }
        }
        let missing: Vec<u64> = (0..total).filter(|n| !seen.contains_key(n)).take(10).collect();
        assert!(missing.is_empty(), "acknowledged but not stored: {missing:?}…");
        let twice: Vec<(u64, u32)> = seen.iter().filter(|(_, &c)| c > 1).map(|(&n, &c)| (n, c)).take(10).collect();
        assert!(twice.is_empty(), "stored more than once: {twice:?}");
        assert_eq!(seen.len() as u64, total);
    });
}

#[test]
fn a_topic_whose_metadata_was_lost_keeps_its_data_when_written_to_again() {
    let dir = tempfile::tempdir().unwrap();
    let mut engine = EngineProcess::start(dir.path(), &[]);
    let (status, body) = engine.http("POST", "/v1/topics/kept/events", br#"[{"a":1},{"a":2}]"#);
    assert_eq!(status, 200, "{body}");
    engine.kill9();
    let meta_path = dir.path().join("topics/kept/topic.json");
    let meta = std::fs::read(&meta_path).unwrap();
    std::fs::remove_file(&meta_path).unwrap();

    let mut engine = engine.restart();
    // Auto-create must refuse rather than wipe the directory.
    let (status, body) = engine.http("POST", "/v1/topics/kept/events", br#"[{"a":3}]"#);
    assert_ne!(status, 200, "{body}");
    assert!(body.contains("topic.json"), "the error says what to do: {body}");
    assert!(engine.log().contains("holds data but no topic.json"), "{}", engine.log());
    engine.kill9();

    std::fs::write(&meta_path, meta).unwrap();
    let engine = engine.restart();
    let (status, body) = engine.http("GET", "/v1/topics/kept/events?from=0&limit=10", b"");
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["events"].as_array().unwrap().len(), 2, "{body}");
}
