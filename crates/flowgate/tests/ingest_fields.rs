//! Keys, event times and client ids read from the JSON of HTTP and NDJSON events
//! (`[ingest]` key_field, timestamp_field, timestamp_unit, client_id_field, the HTTP
//! query), kept HTTP headers, and `flowgate send`'s fields, against real engine
//! processes.

mod common;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::time::Duration;

use common::{cli, http_request_with, poll_until, EngineProcess};
use flowgate_core::partition_for_key;
use serde_json::Value;

/// 2025-12-01T00:00:00Z.
const DEC_1: i64 = 1_764_547_200_000;

fn json(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("{e}: {text}"))
}

/// Every stored event of one partition, through the HTTP read API.
fn read_partition(engine: &EngineProcess, topic: &str, partition: u32) -> Vec<Value> {
    let mut events = Vec::new();
    let mut from = 0;
    loop {
        let path = format!("/v1/topics/{topic}/events?partition={partition}&from={from}&limit=10000");
        let (status, body) = engine.http("GET", &path, b"");
        assert_eq!(status, 200, "{body}");
        let page = json(&body);
        let got = page["events"].as_array().unwrap();
        events.extend(got.iter().cloned());
        from = page["next_offset"].as_u64().unwrap();
        if got.is_empty() || from >= page["log_end_offset"].as_u64().unwrap() {
            return events;
        }
    }
}

/// Every event of a topic as `flowgate tail --format json` prints it.
fn tail_json(engine: &EngineProcess, topic: &str) -> Vec<Value> {
    let (code, out, err) =
        cli(&["tail", "--topic", topic, "--format", "json", "--addr", &engine.binary.to_string()], None);
    assert_eq!(code, 0, "{err}");
    out.lines().map(json).collect()
}

fn create_topic(engine: &EngineProcess, topic: &str, partitions: u32) {
    let addr = engine.binary.to_string();
    let (code, out, err) =
        cli(&["topics", "create", topic, "--partitions", &partitions.to_string(), "--addr", &addr], None);
    assert_eq!(code, 0, "{out}{err}");
}

/// Checks that every event is in its key's partition and each key's `seq` runs 0, 1, 2…
/// with nothing missing; returns the events seen per key.
fn assert_order_per_key(engine: &EngineProcess, topic: &str, partitions: u32) -> HashMap<String, u64> {
    let mut next_seq: HashMap<String, u64> = HashMap::new();
    for p in 0..partitions {
        for e in read_partition(engine, topic, p) {
            let key = e["key"].as_str().unwrap_or_else(|| panic!("every event has a key: {e}")).to_owned();
            assert_eq!(e["payload"]["device"].as_str(), Some(key.as_str()), "the key is the device field: {e}");
            assert_eq!(partition_for_key(key.as_bytes(), partitions), p, "{key} in its own partition");
            let seq = e["payload"]["seq"].as_u64().unwrap();
            let expected = next_seq.entry(key.clone()).or_default();
            assert_eq!(seq, *expected, "{key}: order per key, nothing missing or repeated");
            *expected += 1;
        }
    }
    next_seq
}

#[test]
fn http_events_keyed_by_a_field_keep_their_order_per_key_across_partitions() {
    let dir = tempfile::tempdir().unwrap();
    let engine = EngineProcess::start(dir.path(), &[("FLOWGATE_INGEST__KEY_FIELD", "device")]);
    create_topic(&engine, "orders", 4);
    let (keys, requests, per_request) = (30usize, 120usize, 40usize);
    let mut sent = vec![0u64; keys];
    let mut split_requests = 0;
    for r in 0..requests {
        let events: Vec<String> = (0..per_request)
            .map(|i| {
                // Keys interleave within and across requests.
                let k = (r * 7 + i * 13 + i * i) % keys;
                sent[k] += 1;
                format!(r#"{{"device":"d{k}","seq":{},"r":{r}}}"#, sent[k] - 1)
            })
            .collect();
        let body = if r % 2 == 0 { format!("[{}]", events.join(",")) } else { events.join("\n") };
        let (status, answer) = engine.http("POST", "/v1/topics/orders/events", body.as_bytes());
        assert_eq!(status, 200, "{answer}");
        let answer = json(&answer);
        assert_eq!(answer["accepted"], per_request, "{answer}");
        let parts = answer["partitions"].as_array().unwrap();
        let mut total = 0;
        for part in parts {
            let (first, last) = (part["offsets"][0].as_u64().unwrap(), part["offsets"][1].as_u64().unwrap());
            assert_eq!(last - first + 1, part["accepted"].as_u64().unwrap(), "{answer}");
            total += part["accepted"].as_u64().unwrap();
        }
        assert_eq!(total, per_request as u64, "{answer}");
        if parts.len() > 1 {
            split_requests += 1;
            assert!(answer.get("partition").is_none() && answer.get("offsets").is_none(), "{answer}");
        } else {
            assert_eq!(answer["partition"], parts[0]["partition"], "{answer}");
        }
    }
    assert!(split_requests > requests / 2, "most requests span partitions ({split_requests})");
    let seen = assert_order_per_key(&engine, "orders", 4);
    for (k, n) in sent.iter().enumerate() {
        assert_eq!(seen.get(&format!("d{k}")).copied().unwrap_or(0), *n, "every event of d{k} stored");
    }
}

/// Sends `input` on a new NDJSON connection, closes the write side, and returns every
/// reply line until the server closes.
fn ndjson_exchange(engine: &EngineProcess, input: &str) -> Vec<Value> {
    let stream = TcpStream::connect(engine.ndjson).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut writer = stream.try_clone().unwrap();
    writer.write_all(input.as_bytes()).unwrap();
    writer.shutdown(std::net::Shutdown::Write).unwrap();
    BufReader::new(stream).lines().map(|l| json(&l.expect("a clean close"))).collect()
}

fn errors_of(replies: &[Value]) -> Vec<(u64, String)> {
    replies
        .iter()
        .filter(|v| v.get("error").is_some())
        .map(|v| (v["line"].as_u64().unwrap(), v["reason"].as_str().unwrap().to_owned()))
        .collect()
}

#[test]
fn times_in_every_unit_are_stored_as_ms_and_absurd_ones_refused_without_harming_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let engine = EngineProcess::start(
        dir.path(),
        &[("FLOWGATE_INGEST__TIMESTAMP_FIELD", "ts"), ("FLOWGATE_INGEST__NDJSON_ACK", "batch")],
    );
    // NDJSON, the configured unit (ms): good and absurd times on one connection.
    let lines = [
        r#"{"n":0,"ts":1764547200000}"#,
        r#"{"n":1,"ts":1e300}"#,
        r#"{"n":2,"ts":-1e30}"#,
        r#"{"n":3,"ts":"9999999999999999999"}"#,
        r#"{"n":4,"ts":9999999999999999999}"#,
        r#"{"n":5,"ts":"not a date"}"#,
        r#"{"n":6,"ts":{"nested":{"deeper":[1]}}}"#,
        r#"{"n":7}"#,
        r#"{"n":8,"ts":1764547200123.9}"#,
        r#"{"n":9,"ts":null}"#,
    ];
    let before = flowgate_core::time::now_ms();
    let replies = ndjson_exchange(&engine, &format!("{}\n", lines.join("\n")));
    let after = flowgate_core::time::now_ms();
    let refused: Vec<(u64, String)> = (2..=7).map(|line| (line, "bad_timestamp".to_owned())).collect();
    assert_eq!(errors_of(&replies), refused, "{replies:?}");
    let last = replies.last().unwrap();
    assert_eq!((last["through_line"].as_u64(), last["stored"].as_u64()), (Some(10), Some(4)), "{replies:?}");
    let first_error = replies.iter().find(|v| v.get("error").is_some()).unwrap();
    assert!(first_error["error"].as_str().unwrap().contains("after 9999-12-31"), "{first_error}");
    let stored = read_partition(&engine, "events", 0);
    let got: Vec<(u64, i64)> =
        stored.iter().map(|e| (e["payload"]["n"].as_u64().unwrap(), e["timestamp"].as_i64().unwrap())).collect();
    assert_eq!(got.iter().map(|(n, _)| *n).collect::<Vec<_>>(), vec![0, 7, 8, 9]);
    assert_eq!((got[0].1, got[2].1), (DEC_1, DEC_1 + 123));
    for (n, t) in [got[1], got[3]] {
        assert!((before..=after).contains(&t), "event {n} without a time gets the ingest time ({t})");
    }
    assert_eq!(engine.metric("flowgate_ingest_rejected_total{path=\"ndjson\",reason=\"bad_timestamp\"}"), 6.0);

    // HTTP, each other unit through the query.
    for (unit, body, expected) in [
        ("s", r#"[{"ts":1764547200},{"ts":1764547200.5}]"#, vec![DEC_1, DEC_1 + 500]),
        ("us", r#"[{"ts":1764547200000123},{"ts":1764547200999999}]"#, vec![DEC_1, DEC_1 + 999]),
        ("%C2%B5s", r#"[{"ts":1764547200001000}]"#, vec![DEC_1 + 1]),
        (
            "rfc3339",
            r#"[{"ts":"2025-12-01T02:00:00+02:00"},{"ts":"2025-12-01T00:00:00.250Z"},{"ts":"2025-11-30T19:30:00.5-04:30"}]"#,
            vec![DEC_1, DEC_1 + 250, DEC_1 + 500],
        ),
    ] {
        let topic = format!("times-{}", unit.replace('%', ""));
        let (status, answer) =
            engine.http("POST", &format!("/v1/topics/{topic}/events?timestamp_unit={unit}"), body.as_bytes());
        assert_eq!(status, 200, "{unit}: {answer}");
        let times: Vec<i64> =
            read_partition(&engine, &topic, 0).iter().map(|e| e["timestamp"].as_i64().unwrap()).collect();
        assert_eq!(times, expected, "{unit}");
    }
    // An absurd time refuses the whole request, which stores nothing.
    let body = r#"[{"ts":"2025-12-01T00:00:00Z"},{"ts":"2025-02-29T00:00:00Z"}]"#;
    let (status, answer) =
        engine.http("POST", "/v1/topics/times-rfc3339/events?timestamp_unit=rfc3339", body.as_bytes());
    assert_eq!(status, 400, "{answer}");
    let answer = json(&answer);
    assert_eq!(answer["reason"], "bad_timestamp");
    assert!(answer["error"].as_str().unwrap().starts_with("element 1: timestamp field `ts`"), "{answer}");
    assert_eq!(read_partition(&engine, "times-rfc3339", 0).len(), 3, "nothing of the refused request stored");
    assert_eq!(engine.metric("flowgate_ingest_rejected_total{path=\"http\",reason=\"bad_timestamp\"}"), 1.0);
    // The engine still takes events on both paths.
    let replies = ndjson_exchange(&engine, "{\"n\":10,\"ts\":1}\n");
    assert_eq!(replies.last().unwrap()["stored"], 1, "{replies:?}");
}

#[test]
fn a_dedup_by_client_id_removes_events_resent_over_http() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("flowgate.toml");
    std::fs::write(
        &config,
        r#"
[ingest]
client_id_field = "cid"

[[pipelines]]
name = "orders"
topics = ["orders"]
commit_interval_ms = 100
[[pipelines.processors]]
type = "dedup"
by = "@client_id"
[[pipelines.sinks]]
name = "out"
type = "file"
path = "out"
batch = { max_events = 100, max_wait_ms = 20 }
"#,
    )
    .unwrap();
    let engine = EngineProcess::start_with(dir.path(), Some(&config), &[]);
    // Each request resends the last half of the one before, as a producer retrying
    // after lost answers would; client ids are numbers in some requests and strings in
    // others (a number's text is its client id, so 7 and "7" are one id).
    let mut sent = 0u64;
    for r in 0..12u64 {
        let events: Vec<String> = (r * 25..r * 25 + 50)
            .map(|id| {
                if r % 3 == 0 {
                    format!(r#"{{"id":{id},"cid":{id}}}"#)
                } else {
                    format!(r#"{{"id":{id},"cid":"{id}"}}"#)
                }
            })
            .collect();
        sent += events.len() as u64;
        let (status, answer) =
            engine.http("POST", "/v1/topics/orders/events", format!("[{}]", events.join(",")).as_bytes());
        assert_eq!(status, 200, "{answer}");
    }
    let distinct = 11 * 25 + 50;
    let out = dir.path().join("out");
    poll_until("the pipeline to read every event and write every id", Duration::from_secs(30), || {
        let read = engine.metric("flowgate_pipeline_events_read_total{pipeline=\"orders\"");
        read >= sent as f64 && common::file_sink_ids(&out, "-").0.len() >= distinct as usize
    });
    let (counts, _) = common::file_sink_ids(&out, "-");
    assert_eq!(counts.len(), distinct as usize);
    let repeated: Vec<_> = counts.iter().filter(|(_, n)| **n > 1).collect();
    assert!(repeated.is_empty(), "resent events were removed: {repeated:?}");
}

#[test]
fn the_query_overrides_the_fields_and_kept_headers_show_in_tail() {
    let dir = tempfile::tempdir().unwrap();
    let engine = EngineProcess::start(
        dir.path(),
        &[
            ("FLOWGATE_INGEST__KEY_FIELD", "device"),
            ("FLOWGATE_INGEST__HTTP_KEEP_HEADERS", r#"["X-Request-Id", "x-tenant"]"#),
        ],
    );
    let body = br#"[{"user":"u1","device":"d1","eid":"e1"},{"device":"d2","eid":7}]"#;
    let headers = [("X-Request-Id", "req-42"), ("X-Tenant", "acme"), ("X-Other", "not kept")];
    let (status, answer) = http_request_with(
        engine.http,
        "POST",
        "/v1/topics/web/events?key_field=user&client_id_field=eid&key=fallback",
        &headers,
        body,
    );
    assert_eq!(status, 200, "{answer}");
    // Another request: the config's key field again, and an empty one for no key at all.
    let (status, answer) = engine.http("POST", "/v1/topics/web/events", br#"{"device":"d3"}"#);
    assert_eq!(status, 200, "{answer}");
    let (status, answer) = engine.http("POST", "/v1/topics/web/events?key_field=", br#"{"device":"d4"}"#);
    assert_eq!(status, 200, "{answer}");
    let events = tail_json(&engine, "web");
    let summary: Vec<(Option<&str>, Option<&str>)> =
        events.iter().map(|e| (e["key"].as_str(), e["client_id"].as_str())).collect();
    assert_eq!(
        summary,
        vec![(Some("u1"), Some("e1")), (Some("fallback"), Some("7")), (Some("d3"), None), (None, None)]
    );
    for e in &events[..2] {
        assert_eq!(e["headers"], serde_json::json!({"x-request-id": "req-42", "x-tenant": "acme"}), "{e}");
    }
    assert_eq!(events[2]["headers"], serde_json::json!({}), "only what the request sent");
    // A bad query is refused before the body is read, and counted.
    for query in ["?keyfield=a", "?timestamp_unit=days", "?key_field=a..b", "?key="] {
        let (status, answer) = engine.http("POST", &format!("/v1/topics/web/events{query}"), b"{}");
        assert_eq!(status, 400, "{query}: {answer}");
        assert_eq!(json(&answer)["reason"], "invalid_query", "{answer}");
    }
    assert_eq!(engine.metric("flowgate_ingest_rejected_total{path=\"http\",reason=\"invalid_query\"}"), 4.0);
    let big = "v".repeat(9000);
    let (status, answer) =
        http_request_with(engine.http, "POST", "/v1/topics/web/events", &[("x-tenant", &big)], b"{}");
    assert_eq!(status, 431, "{answer}");
    assert_eq!(tail_json(&engine, "web").len(), 4, "refused requests stored nothing");
}

#[test]
fn ndjson_lines_keyed_by_a_field_go_to_their_partitions_and_the_acks_say_where() {
    let dir = tempfile::tempdir().unwrap();
    let engine = EngineProcess::start(
        dir.path(),
        &[
            ("FLOWGATE_INGEST__KEY_FIELD", "device"),
            ("FLOWGATE_INGEST__NDJSON_ACK", "batch"),
            ("FLOWGATE_LOG__DEFAULT_PARTITIONS", "4"),
        ],
    );
    let mut input = String::new();
    let mut seq = [0u64; 10];
    for line in 1..=400u64 {
        match line {
            50 => input.push_str("{\"device\":[1],\"seq\":0}\n"),
            60 => input.push_str("not json\n"),
            _ => {
                let d = (line * 7 % 10) as usize;
                input.push_str(&format!("{{\"device\":\"d{d}\",\"seq\":{}}}\n", seq[d]));
                seq[d] += 1;
            }
        }
    }
    let replies = ndjson_exchange(&engine, &input);
    assert_eq!(errors_of(&replies), vec![(50, "bad_key".to_owned()), (60, "invalid_json".to_owned())]);
    let bad_key = replies.iter().find(|v| v["reason"] == "bad_key").unwrap();
    assert!(bad_key["error"].as_str().unwrap().contains("key field `device` is an array"), "{bad_key}");
    let mut stored = 0;
    let mut acked: Vec<(u64, u64, u64)> = Vec::new();
    for ack in replies.iter().filter(|v| v.get("through_line").is_some()) {
        let parts = ack["partitions"].as_array().unwrap();
        let n: u64 = parts.iter().map(|p| p["stored"].as_u64().unwrap()).sum();
        assert_eq!(n, ack["stored"].as_u64().unwrap(), "{ack}");
        assert_eq!(ack.get("partition").is_some(), parts.len() == 1, "{ack}");
        for p in parts {
            acked.push((
                p["partition"].as_u64().unwrap(),
                p["first_offset"].as_u64().unwrap(),
                p["stored"].as_u64().unwrap(),
            ));
        }
        stored += n;
    }
    assert_eq!(stored, 398);
    assert!(acked.len() > 1, "the lines went to several partitions: {acked:?}");
    // The acks' offsets cover each partition exactly, in order.
    for p in 0..4u64 {
        let mut ranges: Vec<(u64, u64)> = acked.iter().filter(|a| a.0 == p).map(|a| (a.1, a.2)).collect();
        ranges.sort_unstable();
        let mut next = 0;
        for (first, n) in ranges {
            assert_eq!(first, next, "partition {p}: {acked:?}");
            next += n;
        }
        assert_eq!(read_partition(&engine, "events", p as u32).len() as u64, next, "partition {p}");
    }
    let seen = assert_order_per_key(&engine, "events", 4);
    assert_eq!(seen.values().sum::<u64>(), 398);
    assert_eq!(engine.metric("flowgate_ingest_rejected_total{path=\"ndjson\",reason=\"bad_key\"}"), 1.0);
}

#[test]
fn send_reads_keys_times_in_a_unit_and_client_ids_from_fields() {
    let dir = tempfile::tempdir().unwrap();
    let engine = EngineProcess::start(dir.path(), &[]);
    let addr = engine.binary.to_string();
    let input = concat!(
        "{\"device\":\"d1\",\"ts\":1764547200.5,\"eid\":\"a\"}\n",
        "{\"meta\":{\"device\":7},\"device\":\"ignored\",\"ts\":1764547201,\"eid\":2}\n",
        "{\"device\":\"d3\"}\n",
    );
    let before = flowgate_core::time::now_ms();
    let args = ["send", "--topic", "s", "--key-field", "device", "--timestamp-field", "ts", "--timestamp-unit", "s"];
    let (code, out, err) =
        cli(&[&args[..], &["--client-id-field", "eid", "--addr", &addr]].concat(), Some(input.as_bytes()));
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("acknowledged 3 events"), "{out}");
    let (code, out, err) = cli(
        &["send", "--topic", "s", "--key-field", "meta.device", "--time-field", "ts", "--addr", &addr],
        Some(b"{\"meta\":{\"device\":7},\"ts\":1764547201000}\n"),
    );
    assert_eq!(code, 0, "{out}{err}");
    let events = tail_json(&engine, "s");
    let got: Vec<(Option<&str>, i64, Option<&str>)> =
        events.iter().map(|e| (e["key"].as_str(), e["timestamp"].as_i64().unwrap(), e["client_id"].as_str())).collect();
    assert_eq!(got[0], (Some("d1"), DEC_1 + 500, Some("a")));
    assert_eq!(got[1], (Some("ignored"), DEC_1 + 1000, Some("2")));
    assert_eq!((got[2].0, got[2].2), (Some("d3"), None));
    assert!(got[2].1 >= before, "no time field: the ingest time");
    assert_eq!(got[3], (Some("7"), DEC_1 + 1000, None), "a dotted path, a number's text, --time-field");
    // The same parsing as the engine's: an absurd time is an error naming the line.
    let (code, _, err) = cli(
        &["send", "--topic", "s", "--timestamp-field", "ts", "--timestamp-unit", "rfc3339", "--addr", &addr],
        Some(b"{\"ts\":\"2025-12-01T00:00:00Z\"}\n{\"ts\":\"2025-13-01T00:00:00Z\"}\n"),
    );
    assert_ne!(code, 0);
    assert!(err.contains("line 2: timestamp field `ts`") && err.contains("RFC 3339"), "{err}");
    let (code, _, err) = cli(&["send", "--topic", "s", "--timestamp-unit", "days", "--addr", &addr], Some(b"{}\n"));
    assert_ne!(code, 0);
    assert!(err.contains("ms, s, us or rfc3339"), "{err}");
}

#[test]
fn a_keyed_request_whose_split_fails_part_way_names_exactly_the_durable_parts_it_stored() {
    let dir = tempfile::tempdir().unwrap();
    let engine = EngineProcess::start(
        dir.path(),
        &[
            ("FLOWGATE_INGEST__KEY_FIELD", "device"),
            ("FLOWGATE_INGEST__NDJSON_ACK", "batch"),
            ("FLOWGATE_LOG__SEGMENT_BYTES", "1024"),
            ("FLOWGATE_INGEST__NDJSON_TOPIC", "orders"),
        ],
    );
    create_topic(&engine, "orders", 2);
    let key_in = |p: u32| (0..).map(|i| format!("d{i}")).find(|k| partition_for_key(k.as_bytes(), 2) == p).unwrap();
    let (k0, k1) = (key_in(0), key_in(1));
    // Partition 1's next write must start a new segment, in a directory that is gone (a
    // disk failing under one partition): it fails after partition 0's part is written.
    let big = "x".repeat(2000);
    let (status, answer) =
        engine.http("POST", "/v1/topics/orders/events", format!(r#"{{"device":"{k1}","pad":"{big}"}}"#).as_bytes());
    assert_eq!(status, 200, "{answer}");
    std::fs::remove_dir_all(dir.path().join("topics/orders/1")).unwrap();

    let body = format!(r#"[{{"device":"{k0}","n":1}},{{"device":"{k1}","n":2}},{{"device":"{k0}","n":3}}]"#);
    let (status, answer) = engine.http("POST", "/v1/topics/orders/events", body.as_bytes());
    assert_eq!(status, 500, "{answer}");
    let answer = json(&answer);
    assert_eq!(answer["reason"], "partially_stored", "{answer}");
    assert_eq!(answer["failed_partition"], 1, "{answer}");
    assert_eq!(answer["stored"]["accepted"], 2, "{answer}");
    assert_eq!(answer["stored"]["partitions"], serde_json::json!([{"partition": 0, "offsets": [0, 1], "accepted": 2}]));
    let stored: Vec<u64> =
        read_partition(&engine, "orders", 0).iter().map(|e| e["payload"]["n"].as_u64().unwrap()).collect();
    assert_eq!(stored, [1, 3], "exactly what the answer names is stored");
    assert_eq!(engine.metric("flowgate_ingest_rejected_total{path=\"http\",reason=\"partially_stored\"}"), 1.0);

    // The same over NDJSON: a fatal line names the parts stored; the rest is counted.
    let input =
        format!("{{\"device\":\"{k0}\",\"n\":4}}\n{{\"device\":\"{k1}\",\"n\":5}}\n{{\"device\":\"{k0}\",\"n\":6}}\n");
    let stream = TcpStream::connect(engine.ndjson).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    (&stream).write_all(input.as_bytes()).unwrap();
    stream.shutdown(std::net::Shutdown::Write).unwrap();
    let replies: Vec<Value> = BufReader::new(stream).lines().map_while(Result::ok).map(|l| json(&l)).collect();
    let last = replies.last().unwrap_or_else(|| panic!("a fatal line: {replies:?}"));
    assert_eq!(
        (last["reason"].as_str(), last["fatal"].as_bool()),
        (Some("partially_stored"), Some(true)),
        "{replies:?}"
    );
    assert_eq!(last["partitions"], serde_json::json!([{"partition": 0, "first_offset": 2, "stored": 2}]), "{last}");
    let stored: Vec<u64> =
        read_partition(&engine, "orders", 0).iter().map(|e| e["payload"]["n"].as_u64().unwrap()).collect();
    assert_eq!(stored, [1, 3, 4, 6]);
    assert_eq!(engine.metric("flowgate_ingest_rejected_total{path=\"ndjson\",reason=\"partially_stored\"}"), 1.0);

    // And a client's PRODUCE: PARTIALLY_STORED names the part stored.
    let mut b = flowgate_core::BatchBuilder::new();
    for (k, n) in [(&k1, 7), (&k0, 8)] {
        b.push_payload(1, Some(k.as_bytes()), format!(r#"{{"n":{n}}}"#).as_bytes());
    }
    let batch = b.finish(flowgate_core::Codec::None, flowgate_core::ProducerStamp::default()).unwrap();
    let err = tokio::runtime::Runtime::new().unwrap().block_on(async {
        let client = flowgate_client::Client::connect(&engine.binary.to_string()).await.unwrap();
        client.produce("orders", bytes::Bytes::from(batch.bytes), flowgate_core::ProducerStamp::default()).await
    });
    match err {
        Err(flowgate_client::ClientError::Server { code, message }) => {
            assert_eq!(code, flowgate_protocol::ErrorCode::PartiallyStored, "{message}");
            assert!(message.contains("partition 0 offsets 4..=4"), "{message}");
        }
        other => panic!("{other:?}"),
    }
    let stored: Vec<u64> =
        read_partition(&engine, "orders", 0).iter().map(|e| e["payload"]["n"].as_u64().unwrap()).collect();
    assert_eq!(stored, [1, 3, 4, 6, 8]);
}

#[test]
fn a_keyed_request_is_charged_for_the_copies_its_split_makes_and_refused_whole_past_the_budget() {
    let dir = tempfile::tempdir().unwrap();
    let engine = EngineProcess::start(
        dir.path(),
        &[
            ("FLOWGATE_INGEST__KEY_FIELD", "device"),
            ("FLOWGATE_INGEST__MAX_FRAME_BYTES", "1048576"),
            ("FLOWGATE_INGEST__MAX_BUFFERED_BYTES", "12582912"),
        ],
    );
    create_topic(&engine, "orders", 4);
    let body = |events: usize| {
        let lines: Vec<String> = (0..events).map(|i| format!(r#"{{"device":"d{}","v":{i}}}"#, i % 50)).collect();
        format!("[{}]", lines.join(","))
    };
    // About 1.6 MiB of events: as one batch (no key) its copies fit the 12 MiB budget;
    // split by key they would not, so the request is refused before anything is built.
    let big = body(60_000);
    let (status, answer) = engine.http("POST", "/v1/topics/orders/events", big.as_bytes());
    assert_eq!(status, 413, "{answer}");
    assert_eq!(json(&answer)["reason"], "over_budget", "{answer}");
    let stored = |engine: &EngineProcess| -> usize { (0..4).map(|p| read_partition(engine, "orders", p).len()).sum() };
    assert_eq!(stored(&engine), 0, "nothing of a refused request is stored");
    let (status, answer) = engine.http("POST", "/v1/topics/orders/events?key_field=", big.as_bytes());
    assert_eq!(status, 200, "the same body unkeyed: {answer}");
    let (status, answer) = engine.http("POST", "/v1/topics/orders/events", body(10_000).as_bytes());
    assert_eq!(status, 200, "a smaller keyed body: {answer}");
    assert_eq!(stored(&engine), 70_000);
    assert_eq!(engine.metric("flowgate_ingest_rejected_total{path=\"http\",reason=\"over_budget\"}"), 1.0);
    assert_eq!(engine.metric("flowgate_ingest_buffered_bytes"), 0.0, "every charge is given back");
}
