//! HTTP routes and binary-protocol behaviour against a real engine process.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::{poll_until, EngineProcess};
use flowgate_client::{Client, ClientError, Producer, ProducerConfig};
use flowgate_core::{BatchBuilder, Codec, Event, ProducerStamp};
use flowgate_protocol::ErrorCode;

#[test]
fn http_routes() {
    let dir = tempfile::tempdir().unwrap();
    let engine = EngineProcess::start(dir.path(), &[]);
    assert_eq!(engine.http("GET", "/health", b"").0, 200);
    assert_eq!(engine.http("GET", "/ready", b"").0, 200);

    let (status, body) = engine.http("POST", "/v1/topics/web/events", br#"[{"a":1},{"a":2},{"a":3}]"#);
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["accepted"], 3);
    assert_eq!(v["offsets"], serde_json::json!([0, 2]));
    let (status, body) = engine.http("POST", "/v1/topics/web/events", b"{\"a\":4}\n{\"a\":5}\n");
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["offsets"], serde_json::json!([3, 4]));

    let (status, body) = engine.http("GET", "/v1/topics/web/events?from=1&limit=3", b"");
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let got: Vec<i64> = v["events"].as_array().unwrap().iter().map(|e| e["payload"]["a"].as_i64().unwrap()).collect();
    assert_eq!(got, vec![2, 3, 4]);
    assert_eq!(v["next_offset"], 4);

    let (status, body) = engine.http("GET", "/v1/topics", b"");
    assert_eq!(status, 200);
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let web = v["topics"].as_array().unwrap().iter().find(|t| t["name"] == "web").expect("topic web listed");
    assert_eq!(web["partitions"][0]["end_offset"], 5);

    let (status, text) = engine.http("GET", "/metrics", b"");
    assert_eq!(status, 200);
    assert!(text.contains("flowgate_ingest_events_total{topic=\"web\",path=\"http\"} 5"), "{text}");
    assert!(text.contains("flowgate_append_duration_seconds_bucket"));
    assert!(text.contains("flowgate_log_size_bytes{topic=\"web\"}"));
    let (status, body) = engine.http("GET", "/v1/stats", b"");
    assert_eq!(status, 200, "{body}");
    assert_eq!(engine.http("GET", "/v1/topics/none/events", b"").0, 404);
}

fn batch(events: &[&str], stamp: ProducerStamp) -> Bytes {
    let mut b = BatchBuilder::new();
    for e in events {
        b.push_event(&Event::from_payload(e.as_bytes().to_vec()), flowgate_core::time::now_ms());
    }
    Bytes::from(b.finish(Codec::Lz4, stamp).unwrap().bytes)
}

#[test]
fn a_retried_produce_is_stored_once() {
    let dir = tempfile::tempdir().unwrap();
    let engine = EngineProcess::start(dir.path(), &[]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let client = Client::connect(&engine.binary.to_string()).await.unwrap();
        let stamp = ProducerStamp { producer_id: 77, sequence: 0 };
        let first = client.produce_to("idem", 0, batch(&["{\"a\":1}", "{\"a\":2}"], stamp), stamp).await.unwrap();
        // The same request again, as a client retrying after a lost reply would.
        let again = client.produce_to("idem", 0, batch(&["{\"a\":1}", "{\"a\":2}"], stamp), stamp).await.unwrap();
        assert_eq!(first, again, "a retry answers with the first offsets");
        // A new connection (as after a reconnect) is recognised too.
        let client2 = Client::connect(&engine.binary.to_string()).await.unwrap();
        let third = client2.produce_to("idem", 0, batch(&["{\"a\":1}", "{\"a\":2}"], stamp), stamp).await.unwrap();
        assert_eq!(first, third);
        let next = ProducerStamp { producer_id: 77, sequence: 1 };
        let acks = client.produce_to("idem", 0, batch(&["{\"a\":3}"], next), next).await.unwrap();
        assert_eq!(acks[0].first_offset, 2);
        let topics = client.list_topics().await.unwrap();
        let t = topics.iter().find(|t| t.name == "idem").unwrap();
        assert_eq!(t.partitions[0].end_offset, 3, "3 distinct events stored once each");
    });
}

#[test]
fn protocol_errors_name_the_problem() {
    let dir = tempfile::tempdir().unwrap();
    let engine = EngineProcess::start(dir.path(), &[("FLOWGATE_LOG__AUTO_CREATE_TOPICS", "false")]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let client = Client::connect(&engine.binary.to_string()).await.unwrap();
        let err = client.produce("missing", batch(&["{}"], ProducerStamp::default()), ProducerStamp::default()).await;
        assert!(matches!(err, Err(ClientError::Server { code: ErrorCode::UnknownTopic, .. })), "{err:?}");
        client.create_topic("t", 2).await.unwrap();
        let err = client.create_topic("t", 2).await;
        assert!(matches!(err, Err(ClientError::Server { code: ErrorCode::TopicExists, .. })), "{err:?}");
        let err = client.fetch("t", 0, 5, 1024, 0).await;
        assert!(matches!(err, Err(ClientError::Server { code: ErrorCode::OffsetOutOfRange, .. })), "{err:?}");
        let err = client.fetch("t", 9, 0, 1024, 0).await;
        assert!(matches!(err, Err(ClientError::Server { code: ErrorCode::UnknownPartition, .. })), "{err:?}");
        // A corrupted batch is refused and stores nothing.
        let mut bad = batch(&["{\"x\":1}"], ProducerStamp::default()).to_vec();
        let last = bad.len() - 1;
        bad[last] ^= 0x55;
        let err = client.produce("t", Bytes::from(bad), ProducerStamp::default()).await;
        assert!(matches!(err, Err(ClientError::Server { code: ErrorCode::InvalidBatch, .. })), "{err:?}");
        let topics = client.list_topics().await.unwrap();
        let t = topics.iter().find(|t| t.name == "t").unwrap();
        assert!(t.partitions.iter().all(|p| p.end_offset == 0));
        // The connection is still usable after refused requests; long-poll fetch wakes on data.
        let c2 = client.clone();
        let waiter = tokio::spawn(async move { c2.fetch("t", 0, 0, 1 << 20, 5_000).await });
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        let other = Client::connect(&engine.binary.to_string()).await.unwrap();
        // A key that lands in partition 0, where the fetch is waiting.
        let key =
            (0..).map(|i| format!("k{i}")).find(|k| flowgate_core::partition_for_key(k.as_bytes(), 2) == 0).unwrap();
        let mut b = BatchBuilder::new();
        b.push_payload(1, Some(key.as_bytes()), b"{}");
        let stamp = ProducerStamp::default();
        let started = std::time::Instant::now();
        other.produce("t", Bytes::from(b.finish(Codec::None, stamp).unwrap().bytes), stamp).await.unwrap();
        let fetched = waiter.await.unwrap().unwrap();
        assert!(!fetched.batches.is_empty(), "the waiting fetch returns the new batch");
        assert!(started.elapsed() < std::time::Duration::from_secs(4), "woken by the append, not the timeout");
    });
}

#[test]
fn a_producer_with_many_requests_in_flight_keeps_order_per_key() {
    let dir = tempfile::tempdir().unwrap();
    let engine = EngineProcess::start(dir.path(), &[]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let addr = engine.binary.to_string();
    rt.block_on(async {
        Client::connect(&addr).await.unwrap().create_topic("ordered", 3).await.unwrap();
        let config = ProducerConfig { max_batch_events: 50, max_in_flight: 16, ..ProducerConfig::default() };
        let mut producer = Producer::new(&addr, "ordered", config).await.unwrap();
        for n in 0..20_000u32 {
            let key = format!("k{}", n % 10);
            let event =
                Event::from_payload(format!(r#"{{"k":"{key}","n":{n}}}"#).into_bytes()).with_key(key.into_bytes());
            producer.send(&event).await.unwrap();
        }
        assert_eq!(producer.flush().await.unwrap(), 20_000);
        let client = Client::connect(&addr).await.unwrap();
        let mut last: std::collections::HashMap<String, u64> = Default::default();
        let mut total = 0;
        let mut scratch = Vec::new();
        for p in 0..3 {
            let mut offset = 0;
            loop {
                let f = client.fetch("ordered", p, offset, 1 << 20, 0).await.unwrap();
                if f.batches.is_empty() {
                    break;
                }
                let mut rest = &f.batches[..];
                while !rest.is_empty() {
                    let (view, tail) = flowgate_core::BatchView::parse(rest).unwrap();
                    for r in view.records(&mut scratch).unwrap() {
                        let r = r.unwrap();
                        let v: serde_json::Value = serde_json::from_slice(r.payload).unwrap();
                        let (k, n) = (v["k"].as_str().unwrap().to_owned(), v["n"].as_u64().unwrap());
                        if let Some(prev) = last.insert(k.clone(), n) {
                            assert!(prev < n, "key {k}: {n} after {prev}");
                        }
                        total += 1;
                    }
                    offset = view.last_offset() + 1;
                    rest = tail;
                }
            }
        }
        assert_eq!(total, 20_000, "every event stored once");
    });
}

#[test]
fn large_frames_borrow_from_the_buffer_budget_and_give_it_back() {
    let dir = tempfile::tempdir().unwrap();
    let engine = EngineProcess::start(dir.path(), &[]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let client = Client::connect(&engine.binary.to_string()).await.unwrap();
        let payload = vec![b'x'; 1000];
        let mut b = BatchBuilder::new();
        for _ in 0..2000 {
            b.push_payload(1, None, &payload);
        }
        let stamp = ProducerStamp::default();
        let big = Bytes::from(b.finish(Codec::None, stamp).unwrap().bytes);
        assert!(big.len() > 1 << 20, "a frame well over the 64 KiB base buffer");
        for _ in 0..5 {
            let acks = client.produce("big", big.clone(), stamp).await.unwrap();
            assert_eq!(acks[0].record_count, 2000);
        }
        // The connection stays open and idle: its grown buffer is given back all the same.
        poll_until("an idle connection to give back its borrowed bytes", Duration::from_secs(5), || {
            engine.http("GET", "/metrics", b"").1.contains("\nflowgate_ingest_buffered_bytes 0\n")
        });
        drop(client);
    });
    assert_eq!(engine.metric("flowgate_ingest_events_total{topic=\"big\""), 10_000.0);
}

#[test]
fn an_http_read_holds_at_most_a_body_of_payloads_and_says_where_to_go_on() {
    let dir = tempfile::tempdir().unwrap();
    let mut engine = EngineProcess::start(dir.path(), &[("FLOWGATE_INGEST__MAX_HTTP_BODY_BYTES", "4096")]);
    let pad = "x".repeat(80);
    for chunk in 0..4 {
        let body: String = (0..25).map(|i| format!("{{\"n\":{},\"pad\":\"{pad}\"}}\n", chunk * 25 + i)).collect();
        let (status, answer) = engine.http("POST", "/v1/topics/big/events", body.as_bytes());
        assert_eq!(status, 200, "{answer}");
    }
    let (mut from, mut seen) = (0u64, Vec::new());
    while seen.len() < 100 {
        let (status, body) = engine.http("GET", &format!("/v1/topics/big/events?from={from}&limit=10000"), b"");
        assert_eq!(status, 200, "{body}");
        let body: serde_json::Value = serde_json::from_str(&body).unwrap();
        let events = body["events"].as_array().unwrap();
        let bytes: usize = events.iter().map(|e| e["payload"].to_string().len()).sum();
        assert!(!events.is_empty() && bytes <= 4096 + 200, "one read held {bytes} bytes of payloads");
        seen.extend(events.iter().map(|e| e["payload"]["n"].as_u64().unwrap()));
        from = body["next_offset"].as_u64().unwrap();
    }
    assert_eq!(seen, (0..100).collect::<Vec<u64>>(), "paging by next_offset reads every event once, in order");
    assert!(engine.terminate().success());
}

/// Reads `n` server-sent `stats` events from `GET /v1/stats/stream` and returns their
/// documents.
fn stats_events(engine: &EngineProcess, query: &str, n: usize) -> Vec<serde_json::Value> {
    use std::io::{BufRead, BufReader, Write};
    let mut stream = std::net::TcpStream::connect(engine.http).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(stream, "GET /v1/stats/stream{query} HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut reader = BufReader::new(stream);
    let mut head = String::new();
    let mut out = Vec::new();
    let mut line = String::new();
    while out.len() < n {
        line.clear();
        assert!(reader.read_line(&mut line).unwrap() > 0, "the stream ended after {} events", out.len());
        if out.is_empty() && head.len() < 4096 && !line.starts_with("data: ") {
            head.push_str(&line);
        }
        if let Some(data) = line.strip_prefix("data: ") {
            out.push(serde_json::from_str(data.trim_end()).unwrap());
        }
    }
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(head.to_ascii_lowercase().contains("content-type: text/event-stream"), "{head}");
    out
}

#[test]
fn the_stats_stream_pushes_the_stats_document_and_refuses_bad_intervals() {
    let dir = tempfile::tempdir().unwrap();
    let engine = EngineProcess::start(dir.path(), &[]);
    let (status, _) = engine.http("POST", "/v1/topics/streamed/events", br#"{"a":1}"#);
    assert_eq!(status, 200);
    let events = stats_events(&engine, "?interval_ms=100", 3);
    // At the default interval, streams share one document a second.
    let shared = std::thread::scope(|s| {
        let a = s.spawn(|| stats_events(&engine, "", 2));
        let b = s.spawn(|| stats_events(&engine, "", 2));
        (a.join().unwrap(), b.join().unwrap())
    });
    assert_eq!(shared.0.len(), 2);
    assert!(shared.0[1]["uptime_secs"].as_u64() >= shared.0[0]["uptime_secs"].as_u64());
    assert!(shared.1.iter().all(|e| e["memory"].is_object()));
    for e in &events {
        assert!(e["uptime_secs"].is_u64() && e["memory"].is_object(), "{e}");
        assert!(e["topics"].as_array().unwrap().iter().any(|t| t["name"] == "streamed"), "{e}");
    }
    let (_, plain) = engine.http("GET", "/v1/stats", b"");
    let plain: serde_json::Value = serde_json::from_str(&plain).unwrap();
    let keys = |v: &serde_json::Value| v.as_object().unwrap().keys().cloned().collect::<Vec<_>>();
    assert_eq!(keys(&events[0]), keys(&plain), "the same document as /v1/stats");
    // Throughput over time: the events posted show in the ingest rate.
    poll_until("the ingest rate", Duration::from_secs(10), || {
        let (_, body) = engine.http("GET", "/v1/stats", b"");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        v["throughput"]["ingest"]["1m"].as_f64().is_some_and(|r| r > 0.0)
            && v["latency"]["append"]["log"]["count"].as_f64().is_some_and(|n| n > 0.0)
            && v["latency"]["append"]["log"]["p99"].as_f64().is_some()
    });
    assert_eq!(engine.http("GET", "/v1/stats/stream?interval_ms=5", b"").0, 400);
    assert_eq!(engine.http("GET", "/v1/stats/stream?interval_ms=600000", b"").0, 400);
}

/// Opens `GET /v1/stats/stream` from local address `from`; returns the socket and the
/// status of the answer.
fn open_stream(engine: &EngineProcess, from: std::net::Ipv4Addr) -> (std::net::TcpStream, u16) {
    use std::io::{BufRead, BufReader, Write};
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket.bind(&std::net::SocketAddr::from((from, 0)).into()).unwrap();
    socket.connect(&engine.http.into()).unwrap();
    let mut stream: std::net::TcpStream = socket.into();
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(stream, "GET /v1/stats/stream HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut status = String::new();
    BufReader::new(&stream).read_line(&mut status).unwrap();
    let code = status.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    (stream, code)
}

#[test]
fn one_client_cannot_take_every_stats_stream() {
    let dir = tempfile::tempdir().unwrap();
    let engine = EngineProcess::start(dir.path(), &[]);
    let local = std::net::Ipv4Addr::new(127, 0, 0, 1);
    let mut mine: Vec<std::net::TcpStream> = (0..8)
        .map(|i| {
            let (s, code) = open_stream(&engine, local);
            assert_eq!(code, 200, "stream {i}");
            s
        })
        .collect();
    let (_, code) = open_stream(&engine, local);
    assert_eq!(code, 503, "a ninth stream of one client is refused");
    let (_other, code) = open_stream(&engine, std::net::Ipv4Addr::new(127, 0, 0, 2));
    assert_eq!(code, 200, "another client still gets one");
    // A stream's place is given back when its client goes.
    drop(mine.pop());
    poll_until("a place to come free", Duration::from_secs(10), || open_stream(&engine, local).1 == 200);
}
