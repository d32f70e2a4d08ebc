//! Bad input on every port — garbage, absurd lengths, a never-ending line, idle and
//! stalled clients, bad HTTP bodies — while a well-behaved client keeps being served.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::EngineProcess;
use flowgate_client::Client;
use flowgate_core::{BatchBuilder, Codec, ProducerStamp};

fn good_batch(n: usize) -> Bytes {
    let mut b = BatchBuilder::new();
    for i in 0..n {
        b.push_payload(flowgate_core::time::now_ms(), None, format!("{{\"good\":{i}}}").as_bytes());
    }
    Bytes::from(b.finish(Codec::None, ProducerStamp::default()).unwrap().bytes)
}

/// Reads until the server closes the connection (or 10 s pass); true if it closed.
fn closed_by_server(mut s: TcpStream) -> bool {
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut buf = [0u8; 4096];
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
            Err(_) => return false,
        }
    }
    false
}

#[test]
fn bad_clients_on_every_port_do_not_harm_a_good_client() {
    let dir = tempfile::tempdir().unwrap();
    let engine = EngineProcess::start(
        dir.path(),
        &[("FLOWGATE_INGEST__IDLE_TIMEOUT_SECS", "2"), ("FLOWGATE_INGEST__MAX_LINE_BYTES", "1024")],
    );
    let rt = tokio::runtime::Runtime::new().unwrap();
    let addr = engine.binary.to_string();
    let good = rt.spawn(async move {
        let client = Client::connect(&addr).await.unwrap();
        let mut acked = 0u64;
        let deadline = Instant::now() + Duration::from_secs(6);
        while Instant::now() < deadline {
            let acks = client.produce("good", good_batch(100), ProducerStamp::default()).await.unwrap();
            acked += acks.iter().map(|a| u64::from(a.record_count)).sum::<u64>();
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        acked
    });

    // Binary port: garbage instead of a handshake.
    let mut s = TcpStream::connect(engine.binary).unwrap();
    s.write_all(b"GET / HTTP/1.1\r\n\r\nthis is not a frame at all, not even close............").unwrap();
    assert!(closed_by_server(s), "garbage must get the connection closed");
    // Binary port: an absurd length prefix is refused before any allocation.
    let mut s = TcpStream::connect(engine.binary).unwrap();
    s.write_all(&u32::MAX.to_le_bytes()).unwrap();
    s.write_all(&[0u8; 16]).unwrap();
    assert!(closed_by_server(s), "an absurd length must get the connection closed");
    // Binary port: a frame that starts and never finishes is cut by the idle timeout.
    let mut s = TcpStream::connect(engine.binary).unwrap();
    s.write_all(&1000u32.to_le_bytes()).unwrap();
    s.write_all(&[1u8; 10]).unwrap();
    assert!(closed_by_server(s), "a stalled frame must be cut by the idle timeout");
    // Binary port: an idle client that never says anything.
    let idle = TcpStream::connect(engine.binary).unwrap();
    assert!(closed_by_server(idle), "an idle client must be disconnected");
    // HTTP port: a client that starts a request and never finishes it, and an idle one.
    let mut s = TcpStream::connect(engine.http).unwrap();
    s.write_all(b"POST /v1/topics/web/events HTTP/1.1\r\nContent-Length: 100\r\n\r\n{").unwrap();
    assert!(closed_by_server(s), "a stalled HTTP request must be cut by the idle timeout");
    assert!(closed_by_server(TcpStream::connect(engine.http).unwrap()), "an idle HTTP client must be disconnected");

    // NDJSON port: a never-ending line, invalid JSON, then good lines on the same connection.
    let mut s = TcpStream::connect(engine.ndjson).unwrap();
    let long = vec![b'x'; 200_000];
    s.write_all(b"{\"before\":1}\n").unwrap();
    s.write_all(&long).unwrap();
    s.write_all(b"\nnot json\n{\"broken\":\n[1,2]\n{\"after\":2}\n").unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    assert!(closed_by_server(s));

    // HTTP: bad bodies get 400 and store nothing.
    let (status, body) = engine.http("POST", "/v1/topics/web/events", b"{\"a\":1}\n{oops}\n");
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("line 2"), "{body}");
    let (status, _) = engine.http("POST", "/v1/topics/web/events", b"[1,2,3]");
    assert_eq!(status, 400);
    let (status, _) = engine.http("POST", "/v1/topics/bad%2Fname/events", b"{\"a\":1}");
    assert!(status == 400 || status == 404, "bad topic name answered {status}");
    let (status, _) = engine.http("GET", "/v1/topics/web/events", b"");
    assert_eq!(status, 404, "nothing was stored for topic web");

    let acked = rt.block_on(good).unwrap();
    assert!(acked > 1000, "the good client was starved: {acked} events acknowledged");

    // What the NDJSON client sent well is stored; the rest was counted by reason.
    let (status, body) = engine.http("GET", "/v1/topics/events/events?limit=10", b"");
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let payloads: Vec<String> = v["events"].as_array().unwrap().iter().map(|e| e["payload"].to_string()).collect();
    assert_eq!(payloads, vec!["{\"before\":1}".to_owned(), "{\"after\":2}".to_owned()]);
    assert_eq!(engine.metric("flowgate_ingest_rejected_total{path=\"ndjson\",reason=\"line_too_long\"}"), 1.0);
    assert_eq!(engine.metric("flowgate_ingest_rejected_total{path=\"ndjson\",reason=\"invalid_json\"}"), 3.0);
    assert!(engine.metric("flowgate_ingest_rejected_total{path=\"binary\"") >= 3.0);
    assert!(engine.metric("flowgate_ingest_rejected_total{path=\"http\"") >= 2.0);
}

#[test]
fn too_many_connections_are_refused_and_counted() {
    let dir = tempfile::tempdir().unwrap();
    let engine = EngineProcess::start(dir.path(), &[("FLOWGATE_INGEST__MAX_CONNECTIONS", "4")]);
    let held: Vec<TcpStream> = (0..4).map(|_| TcpStream::connect(engine.ndjson).unwrap()).collect();
    std::thread::sleep(Duration::from_millis(200));
    let extra = TcpStream::connect(engine.binary).unwrap();
    assert!(closed_by_server(extra), "the fifth connection must be refused");
    let extra_http = TcpStream::connect(engine.http).unwrap();
    assert!(closed_by_server(extra_http), "HTTP counts against the same limit");
    drop(held);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(engine.metric("flowgate_ingest_rejected_total{path=\"binary\",reason=\"too_many_connections\"}"), 1.0);
    assert_eq!(engine.metric("flowgate_ingest_rejected_total{path=\"http\",reason=\"too_many_connections\"}"), 1.0);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let addr = engine.binary.to_string();
    rt.block_on(async move {
        let client = Client::connect(&addr).await.unwrap();
        client.produce("t", good_batch(3), ProducerStamp::default()).await.unwrap();
    });
}

#[test]
fn producers_cannot_write_the_engines_own_dead_letter_and_replay_topics() {
    let dir = tempfile::tempdir().unwrap();
    let engine = EngineProcess::start(dir.path(), &[]);
    for topic in ["_dlq", "_replay.p"] {
        let (status, body) = engine.http("POST", &format!("/v1/topics/{topic}/events"), br#"{"sink":"s"}"#);
        assert!((400..500).contains(&status), "{topic}: {status} {body}");
        assert!(body.contains("written by the engine only"), "{body}");
    }
    let (status, body) = engine.http("POST", "/v1/topics/ordinary/events", br#"{"n":1}"#);
    assert_eq!(status, 200, "{body}");
}
