//! Clients that try to exhaust the engine: compression bombs, pipelined fetches never
//! read, frames, lines and bodies that trickle in, and a budget no larger than one frame.
//! Each runs against a real engine process, whose resident memory is read from /proc.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{poll_until, EngineProcess};
use flowgate_client::Client;
use flowgate_core::batch::compute_crc;
use flowgate_core::{BatchBuilder, Codec, ProducerStamp};
use flowgate_protocol::{decode_response, encode_request, ErrorCode, Request, Response};

const MIB: u64 = 1 << 20;

/// A connection that has done the handshake.
fn connect_raw(addr: SocketAddr) -> TcpStream {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    send_request(&mut s, 0, &Request::Hello { min_version: 1, max_version: 1, client_name: "abuse" });
    let frame = read_frame(&mut s);
    assert!(matches!(decode_response(&frame).unwrap().1, Response::HelloOk { .. }));
    s
}

fn send_request(s: &mut TcpStream, correlation_id: u32, request: &Request<'_>) {
    let mut out = Vec::new();
    encode_request(correlation_id, request, &mut out);
    s.write_all(&out).unwrap();
}

fn read_frame(s: &mut TcpStream) -> Vec<u8> {
    let mut len = [0u8; 4];
    s.read_exact(&mut len).unwrap();
    let mut frame = len.to_vec();
    frame.resize(4 + u32::from_le_bytes(len) as usize, 0);
    s.read_exact(&mut frame[4..]).unwrap();
    frame
}

/// The error code and message of an ERROR reply, or panics.
fn expect_error(frame: &[u8]) -> (ErrorCode, String) {
    match decode_response(frame).unwrap().1 {
        Response::Error { code, message } => (code, message.to_owned()),
        other => panic!("expected an error, got {other:?}"),
    }
}

fn batch_of(events: usize, size: usize, codec: Codec) -> Bytes {
    let mut b = BatchBuilder::new();
    let payload = vec![b'x'; size];
    for _ in 0..events {
        b.push_payload(flowgate_core::time::now_ms(), None, &payload);
    }
    Bytes::from(b.finish(codec, ProducerStamp::default()).unwrap().bytes)
}

/// A tiny compressed batch whose header claims `claimed` uncompressed bytes, with a
/// checksum that matches, as an attacker would send it.
fn bomb(codec: Codec, claimed: u32) -> Vec<u8> {
    let mut b = BatchBuilder::new();
    b.push_payload(1, None, b"{}");
    let mut batch = b.finish(codec, ProducerStamp::default()).unwrap().bytes;
    batch[55..59].copy_from_slice(&claimed.to_le_bytes());
    let crc = compute_crc(&batch);
    batch[13..17].copy_from_slice(&crc.to_le_bytes());
    batch
}

fn produce_ok(engine: &EngineProcess, topic: &str, batch: Bytes) -> u32 {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let addr = engine.binary.to_string();
    let topic = topic.to_owned();
    rt.block_on(async move {
        let client = Client::connect(&addr).await.unwrap();
        let acks =
            tokio::time::timeout(Duration::from_secs(10), client.produce(&topic, batch, ProducerStamp::default()))
                .await
                .expect("a well-behaved producer is answered promptly")
                .unwrap();
        acks.iter().map(|a| a.record_count).sum()
    })
}

#[test]
fn compression_bombs_are_refused_before_inflating_and_others_are_still_served() {
    let dir = tempfile::tempdir().unwrap();
    let engine = EngineProcess::start(dir.path(), &[]);
    assert_eq!(produce_ok(&engine, "warm", batch_of(10, 100, Codec::Lz4)), 10);
    let baseline = engine.peak_rss();

    // 105 bytes on the wire claiming 256 MiB, on 8 connections at once, twice each.
    let bombs: Vec<TcpStream> = (0..8).map(|_| connect_raw(engine.binary)).collect();
    let lz4_bomb = bomb(Codec::Lz4, 256 << 20);
    for mut s in bombs {
        for corr in 1..=2 {
            send_request(&mut s, corr, &Request::Produce { topic: "t", producer_id: 0, sequence: 0, batch: &lz4_bomb });
            let (code, message) = expect_error(&read_frame(&mut s));
            assert_eq!(code, ErrorCode::FrameTooLarge);
            assert!(message.contains("max_uncompressed_batch_bytes"), "{message}");
        }
    }
    // Under the size limit, but more than the bytes could inflate to: refused unread.
    let mut s = connect_raw(engine.binary);
    for (corr, codec) in [(1, Codec::Lz4), (2, Codec::Zstd)] {
        let lie = bomb(codec, 48 << 20);
        send_request(&mut s, corr, &Request::Produce { topic: "t", producer_id: 0, sequence: 0, batch: &lie });
        let (code, message) = expect_error(&read_frame(&mut s));
        assert_eq!(code, ErrorCode::InvalidBatch, "{message}");
        assert!(message.contains("cannot inflate"), "{message}");
    }
    // A real batch that inflates ~250:1 past the limit (100 MiB of zeros in ~400 KiB).
    let mut b = BatchBuilder::new();
    b.push_payload(1, None, &vec![0u8; 100 << 20]);
    let real = b.finish(Codec::Lz4, ProducerStamp::default()).unwrap().bytes;
    assert!(real.len() < 1 << 20, "{}", real.len());
    send_request(&mut s, 3, &Request::Produce { topic: "t", producer_id: 0, sequence: 0, batch: &real });
    let (code, message) = expect_error(&read_frame(&mut s));
    assert_eq!(code, ErrorCode::FrameTooLarge);
    assert!(message.contains("max_uncompressed_batch_bytes"), "{message}");

    let grown = engine.peak_rss().saturating_sub(baseline);
    assert!(grown < 64 * MIB, "the engine's peak memory grew by {} MiB", grown / MIB);
    assert_eq!(produce_ok(&engine, "t", batch_of(100, 100, Codec::Lz4)), 100, "others are still served");
    assert_eq!(
        engine.metric("flowgate_ingest_rejected_total{path=\"binary\",reason=\"uncompressed_too_large\"}"),
        17.0
    );
    assert_eq!(engine.metric("flowgate_ingest_rejected_total{path=\"binary\",reason=\"invalid_batch\"}"), 2.0);
    let (_, text) = engine.http("GET", "/v1/topics", b"");
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let t = v["topics"].as_array().unwrap().iter().find(|t| t["name"] == "t").unwrap();
    assert_eq!(t["partitions"][0]["end_offset"], 100, "only the good batch was stored: {t}");
}

#[test]
fn pipelined_fetches_that_are_never_read_hold_one_reply_at_most() {
    let dir = tempfile::tempdir().unwrap();
    let engine = EngineProcess::start(dir.path(), &[]);
    for _ in 0..20 {
        assert_eq!(produce_ok(&engine, "big", batch_of(1000, 1000, Codec::None)), 1000);
    }
    let baseline = engine.peak_rss();
    // 255 fetches of 16 MiB each, then a marker request whose effect is visible; the
    // replies are never read.
    let mut s = connect_raw(engine.binary);
    let mut out = Vec::new();
    for corr in 1..=255 {
        let fetch = Request::Fetch { topic: "big", partition: 0, offset: 0, max_bytes: 16 << 20, max_wait_ms: 0 };
        encode_request(corr, &fetch, &mut out);
    }
    encode_request(
        256,
        &Request::CreateTopic { topic: "fetches-handled", partitions: 1, settings: Vec::new() },
        &mut out,
    );
    s.write_all(&out).unwrap();
    poll_until("the engine to handle every fetch", Duration::from_secs(60), || {
        engine.http("GET", "/v1/topics", b"").1.contains("fetches-handled")
    });
    let grown = engine.peak_rss().saturating_sub(baseline);
    assert!(grown < 96 * MIB, "the engine's peak memory grew by {} MiB", grown / MIB);
    assert_eq!(produce_ok(&engine, "other", batch_of(10, 100, Codec::None)), 10, "others are still served");
    drop(s);
}

#[test]
fn trickling_frames_are_cut_at_their_deadline_and_do_not_starve_producers() {
    let dir = tempfile::tempdir().unwrap();
    let engine = EngineProcess::start(dir.path(), &[("FLOWGATE_INGEST__FRAME_TIMEOUT_SECS", "4")]);
    // 24 connections announce maximal frames (16 MiB each: 384 MiB, more than the whole
    // 256 MiB budget) and send one byte every 100 ms.
    let tricklers: Vec<TcpStream> = (0..24)
        .map(|_| {
            let mut s = TcpStream::connect(engine.binary).unwrap();
            s.write_all(&(16u32 << 20).to_le_bytes()).unwrap();
            s
        })
        .collect();
    let rounds = Arc::new(AtomicUsize::new(0));
    let cut = Arc::new(AtomicUsize::new(0));
    let (rounds2, cut2) = (rounds.clone(), cut.clone());
    let trickle = std::thread::spawn(move || {
        let mut alive: Vec<TcpStream> = tricklers;
        let deadline = Instant::now() + Duration::from_secs(30);
        while !alive.is_empty() && Instant::now() < deadline {
            alive.retain_mut(|s| {
                let ok = s.write_all(&[1]).is_ok();
                if !ok {
                    cut2.fetch_add(1, Ordering::SeqCst);
                }
                ok
            });
            rounds2.fetch_add(1, Ordering::SeqCst);
            std::thread::sleep(Duration::from_millis(100));
        }
        alive.len()
    });
    poll_until("the tricklers to get going", Duration::from_secs(10), || rounds.load(Ordering::SeqCst) >= 5);
    // A producer with frames well over the base buffer is acknowledged promptly.
    let started = Instant::now();
    for _ in 0..5 {
        assert_eq!(produce_ok(&engine, "normal", batch_of(1000, 200, Codec::None)), 1000);
    }
    assert!(started.elapsed() < Duration::from_secs(3), "the producer waited {:?}", started.elapsed());
    assert!(cut.load(Ordering::SeqCst) == 0, "the tricklers were cut before their deadline");
    // Every trickler is cut by the frame deadline, though it never stops sending.
    poll_until("the frame deadline to cut every trickler", Duration::from_secs(20), || {
        engine.metric("flowgate_ingest_rejected_total{path=\"binary\",reason=\"frame_timeout\"}") >= 24.0
    });
    assert_eq!(trickle.join().unwrap(), 0, "every trickler's connection was closed");
    poll_until("the budget to be given back", Duration::from_secs(5), || {
        engine.http("GET", "/metrics", b"").1.contains("\nflowgate_ingest_buffered_bytes 0\n")
    });
}

/// A produce frame of exactly `frame_len` bytes after its length prefix.
fn frame_of_exactly(frame_len: usize, topic: &str) -> Vec<u8> {
    let overhead = 6 + 2 + topic.len() + 16; // kind, flags, correlation id; topic; producer id, sequence
    let want = frame_len - overhead;
    let mut payload = want - 80;
    loop {
        let mut b = BatchBuilder::new();
        b.push_payload(1, None, &vec![b'x'; payload]);
        let batch = b.finish(Codec::None, ProducerStamp::default()).unwrap().bytes;
        match batch.len().cmp(&want) {
            std::cmp::Ordering::Equal => {
                let mut out = Vec::new();
                encode_request(1, &Request::Produce { topic, producer_id: 0, sequence: 0, batch: &batch }, &mut out);
                assert_eq!(out.len(), frame_len + 4);
                return out;
            }
            std::cmp::Ordering::Less => payload += want - batch.len(),
            std::cmp::Ordering::Greater => payload -= 1,
        }
    }
}

#[test]
fn a_budget_equal_to_the_frame_limit_accepts_a_frame_of_the_maximum_size() {
    let dir = tempfile::tempdir().unwrap();
    let limit = 4u32 << 20;
    let engine = EngineProcess::start(
        dir.path(),
        &[("FLOWGATE_INGEST__MAX_FRAME_BYTES", "4194304"), ("FLOWGATE_INGEST__MAX_BUFFERED_BYTES", "4194304")],
    );
    let frame = frame_of_exactly(limit as usize, "max");
    let mut s = connect_raw(engine.binary);
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    for _ in 0..3 {
        s.write_all(&frame).unwrap();
        let reply = read_frame(&mut s);
        match decode_response(&reply).unwrap().1 {
            Response::ProduceOk(acks) => assert_eq!(acks[0].record_count, 1),
            other => panic!("a maximal frame was refused: {other:?}"),
        }
    }
    poll_until("the budget to be given back", Duration::from_secs(5), || {
        engine.http("GET", "/metrics", b"").1.contains("\nflowgate_ingest_buffered_bytes 0\n")
    });
}

/// Reads reply lines until one acknowledges `through` lines; returns them all.
fn read_acks(reader: &mut BufReader<TcpStream>, through: u64) -> Vec<serde_json::Value> {
    let mut out = Vec::new();
    loop {
        let mut line = String::new();
        assert!(reader.read_line(&mut line).unwrap() > 0, "the server closed before acknowledging line {through}");
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        let done = v["through_line"].as_u64().is_some_and(|n| n >= through);
        out.push(v);
        if done {
            return out;
        }
    }
}

fn stored_payloads(engine: &EngineProcess, topic: &str) -> Vec<String> {
    let (status, body) = engine.http("GET", &format!("/v1/topics/{topic}/events?limit=10000"), b"");
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    v["events"].as_array().unwrap().iter().map(|e| e["payload"].to_string()).collect()
}

#[test]
fn ndjson_ack_lines_say_exactly_which_lines_are_stored_and_which_were_refused() {
    let dir = tempfile::tempdir().unwrap();
    let engine = EngineProcess::start(
        dir.path(),
        &[("FLOWGATE_INGEST__NDJSON_ACK", "batch"), ("FLOWGATE_INGEST__MAX_LINE_BYTES", "1000")],
    );
    let stream = TcpStream::connect(engine.ndjson).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut writer = stream.try_clone().unwrap();
    let mut reader = BufReader::new(stream);
    let mut expected_stored = Vec::new();
    let mut expected_errors = Vec::new();
    let mut replies = Vec::new();
    let mut line_no = 0u64;
    for round in 0..20 {
        let mut chunk = String::new();
        for i in 0..50 {
            line_no += 1;
            match (round * 50 + i) % 10 {
                3 => {
                    chunk.push_str("not json\n");
                    expected_errors.push((line_no, "invalid_json"));
                }
                5 => chunk.push('\n'),
                7 => {
                    chunk.push_str(&format!("{{\"pad\":\"{}\"}}\n", "y".repeat(2000)));
                    expected_errors.push((line_no, "line_too_long"));
                }
                _ => {
                    // Keys in alphabetical order: the read API re-serializes payloads that way.
                    let line = format!("{{\"i\":{i},\"round\":{round}}}");
                    chunk.push_str(&line);
                    chunk.push('\n');
                    expected_stored.push(line);
                }
            }
        }
        writer.write_all(chunk.as_bytes()).unwrap();
        replies.extend(read_acks(&mut reader, line_no));
    }
    let errors: Vec<(u64, String)> = replies
        .iter()
        .filter(|v| v.get("error").is_some())
        .map(|v| (v["line"].as_u64().unwrap(), v["reason"].as_str().unwrap().to_owned()))
        .collect();
    let expected_errors: Vec<(u64, String)> = expected_errors.into_iter().map(|(l, r)| (l, r.to_owned())).collect();
    assert_eq!(errors, expected_errors);
    // What the acks say is stored is exactly what is stored, in order, at those offsets.
    let stored = stored_payloads(&engine, "events");
    assert_eq!(stored, expected_stored);
    let mut next_offset = 0u64;
    for ack in replies.iter().filter(|v| v.get("through_line").is_some()) {
        let n = ack["stored"].as_u64().unwrap();
        if n > 0 {
            assert_eq!(ack["first_offset"].as_u64().unwrap(), next_offset, "{ack}");
            assert_eq!(ack["partition"].as_u64().unwrap(), 0);
        }
        next_offset += n;
    }
    assert_eq!(next_offset, expected_stored.len() as u64);
    // Closing: after the client's own close, a final ack, then an orderly end of file.
    writer.write_all(b"{\"last\":true}").unwrap();
    writer.shutdown(std::net::Shutdown::Write).unwrap();
    let last = read_acks(&mut reader, line_no + 1);
    assert_eq!(last.last().unwrap()["stored"], 1);
    let mut rest = String::new();
    assert_eq!(reader.read_to_string(&mut rest).unwrap(), 0, "a clean close follows: {rest}");
    assert_eq!(engine.metric("flowgate_ingest_rejected_total{path=\"ndjson\",reason=\"invalid_json\"}"), 100.0);
    assert_eq!(engine.metric("flowgate_ingest_rejected_total{path=\"ndjson\",reason=\"line_too_long\"}"), 100.0);
}

#[test]
fn a_trickling_ndjson_line_is_cut_at_its_deadline_and_reported() {
    let dir = tempfile::tempdir().unwrap();
    let engine = EngineProcess::start(
        dir.path(),
        &[("FLOWGATE_INGEST__NDJSON_ACK", "batch"), ("FLOWGATE_INGEST__FRAME_TIMEOUT_SECS", "2")],
    );
    let mut s = TcpStream::connect(engine.ndjson).unwrap();
    s.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
    s.write_all(b"{\"ok\":1}\n{\"slow\":").unwrap();
    let started = Instant::now();
    let mut replies = Vec::new();
    let mut buf = [0u8; 4096];
    // Keep trickling a byte every 100 ms (well inside the idle timeout) until cut.
    let reset = loop {
        assert!(started.elapsed() < Duration::from_secs(15), "the trickling line was never cut");
        if s.write_all(b" ").is_err() {
            break true;
        }
        match s.read(&mut buf) {
            Ok(0) => break false,
            Ok(n) => replies.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock || e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(_) => break true,
        }
    };
    assert!(started.elapsed() >= Duration::from_millis(1500), "cut after {:?}", started.elapsed());
    let text = String::from_utf8_lossy(&replies);
    assert!(text.contains("\"through_line\":1"), "{text}");
    assert!(reset || text.contains("\"fatal\":true"), "a stop is never an orderly close: {text}");
    poll_until("the line timeout to be counted", Duration::from_secs(5), || {
        engine.metric("flowgate_ingest_rejected_total{path=\"ndjson\",reason=\"line_timeout\"}") == 1.0
    });
    assert_eq!(stored_payloads(&engine, "events"), vec!["{\"ok\":1}".to_owned()]);
}

#[test]
fn a_trickling_http_body_times_out_and_an_oversized_one_is_refused_unread() {
    let dir = tempfile::tempdir().unwrap();
    let engine = EngineProcess::start(
        dir.path(),
        &[("FLOWGATE_INGEST__FRAME_TIMEOUT_SECS", "2"), ("FLOWGATE_INGEST__MAX_HTTP_BODY_BYTES", "100000")],
    );
    let mut s = TcpStream::connect(engine.http).unwrap();
    s.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
    s.write_all(b"POST /v1/topics/web/events HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{\"a\":").unwrap();
    let started = Instant::now();
    let mut response = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&response).contains("\r\n\r\n") {
        assert!(started.elapsed() < Duration::from_secs(15), "the trickling body was never cut");
        let _ = s.write_all(b" ");
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => response.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock || e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(e) => panic!("{e}"),
        }
    }
    let text = String::from_utf8_lossy(&response);
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    assert!(started.elapsed() >= Duration::from_millis(1500), "answered after {:?}", started.elapsed());
    assert_eq!(engine.metric("flowgate_ingest_rejected_total{path=\"http\",reason=\"body_timeout\"}"), 1.0);

    // A body announced over the limit is refused before it is read.
    let mut s = TcpStream::connect(engine.http).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"POST /v1/topics/web/events HTTP/1.1\r\nHost: x\r\nContent-Length: 4000000000\r\n\r\n{").unwrap();
    let mut response = [0u8; 12];
    s.read_exact(&mut response).unwrap();
    assert_eq!(&response, b"HTTP/1.1 413");
    assert_eq!(engine.metric("flowgate_ingest_rejected_total{path=\"http\",reason=\"body_too_large\"}"), 1.0);
    let (status, body) = engine.http("POST", "/v1/topics/web/events", b"{\"fine\":1}");
    assert_eq!(status, 200, "{body}");
    assert_eq!(stored_payloads(&engine, "web"), vec!["{\"fine\":1}".to_owned()]);
}

#[test]
fn a_flood_of_tiny_bad_ndjson_lines_gets_bounded_replies_that_still_count_every_refusal() {
    let dir = tempfile::tempdir().unwrap();
    let engine = EngineProcess::start(dir.path(), &[("FLOWGATE_INGEST__NDJSON_ACK", "batch")]);
    let stream = TcpStream::connect(engine.ndjson).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut writer = stream.try_clone().unwrap();
    // 200 000 two-byte lines that are not JSON objects; one good line at the end.
    let n = 200_000u64;
    let mut flood = "1\n".repeat(n as usize);
    flood.push_str("{\"ok\":true}\n");
    let sender = std::thread::spawn(move || {
        writer.write_all(flood.as_bytes()).unwrap();
        writer.shutdown(std::net::Shutdown::Write).unwrap();
    });
    let mut replies = String::new();
    BufReader::new(stream).read_to_string(&mut replies).unwrap();
    sender.join().unwrap();
    // One error line each would be about 75 bytes a line: 15 MB.
    assert!(replies.len() < 2 << 20, "{} bytes of replies", replies.len());
    let mut reported = 0u64;
    for line in replies.lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        match v["reason"].as_str() {
            Some("invalid_json") => reported += 1,
            Some("many_refused") => reported += v["count"].as_u64().unwrap(),
            _ => {}
        }
    }
    assert_eq!(reported, n, "every refused line is reported, one by one or counted");
    assert_eq!(engine.metric("flowgate_ingest_rejected_total{path=\"ndjson\",reason=\"invalid_json\"}"), n as f64);
    let last: serde_json::Value = serde_json::from_str(replies.lines().last().unwrap()).unwrap();
    assert_eq!(last["through_line"].as_u64(), Some(n + 1), "{last}");
}
