//! Topic settings, describe and reading events against real engines: the CLI, the HTTP
//! routes and the binary protocol; per-topic retention and compression on real files;
//! data directories from before settings and damaged settings files.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use common::{cli, poll_until, EngineProcess};
use flowgate_client::Client;
use flowgate_core::{BatchBuilder, BatchHeader, Codec, ProducerStamp};
use serde_json::{json, Value};

fn describe(engine: &EngineProcess, topic: &str) -> Value {
    let (status, body) = engine.http("GET", &format!("/v1/topics/{topic}"), b"");
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

fn describe_cli(addr: &str, topic: &str) -> Value {
    let (code, out, err) = cli(&["topics", "describe", topic, "--json", "--addr", addr], None);
    assert_eq!(code, 0, "{out}{err}");
    serde_json::from_str(&out).unwrap()
}

fn setting(doc: &Value, name: &str) -> (Value, String) {
    let s = &doc["settings"][name];
    (s["value"].clone(), s["source"].as_str().unwrap_or("").to_owned())
}

/// Appends `batches` HTTP produce requests of `events` events each (about 100 bytes
/// each) to `topic`.
fn post_events(engine: &EngineProcess, topic: &str, batches: usize, events: usize) {
    for b in 0..batches {
        let body: String = (0..events)
            .map(|i| format!("{{\"batch\":{b},\"i\":{i},\"text\":\"{}\"}}\n", "lorem ipsum dolor ".repeat(4)))
            .collect();
        let (status, answer) = engine.http("POST", &format!("/v1/topics/{topic}/events"), body.as_bytes());
        assert_eq!(status, 200, "{answer}");
    }
}

fn start_offset(engine: &EngineProcess, topic: &str) -> u64 {
    describe(engine, topic)["partitions"][0]["start_offset"].as_u64().unwrap()
}

#[test]
fn the_cli_creates_describes_and_alters_settings_that_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let mut engine = EngineProcess::start(dir.path(), &[]);
    let addr = engine.binary.to_string();

    let (code, out, err) = cli(
        &[
            "topics",
            "create",
            "orders",
            "--partitions",
            "2",
            "--retention-ms",
            "3600000",
            "--compression",
            "zstd",
            "--addr",
            &addr,
        ],
        None,
    );
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("created topic 'orders' with 2 partitions (retention_ms=3600000 (1h00m), compression=zstd)"),
        "{out}"
    );
    let doc = describe_cli(&addr, "orders");
    assert_eq!(setting(&doc, "retention_ms"), (json!(3_600_000), "topic".into()));
    assert_eq!(setting(&doc, "retention_bytes"), (json!(0), "default".into()));
    assert_eq!(setting(&doc, "compression"), (json!("zstd"), "topic".into()));
    assert_eq!(doc["partitions"].as_array().unwrap().len(), 2);
    assert_eq!(doc, describe(&engine, "orders"), "the CLI's --json is the HTTP document");

    let (code, out, err) = cli(&["topics", "describe", "orders", "--addr", &addr], None);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.lines().any(|l| l.starts_with("retention_ms") && l.contains("3600000 (1h00m)") && l.ends_with(" topic")),
        "{out}"
    );
    assert!(
        out.lines().any(|l| l.starts_with("retention_bytes") && l.contains("0 (no limit)") && l.ends_with(" default")),
        "{out}"
    );
    assert!(out.contains("no pipeline has committed offsets of this topic"), "{out}");

    let (code, out, err) = cli(
        &["topics", "alter", "orders", "--retention-ms", "default", "--retention-bytes", "1048576", "--addr", &addr],
        None,
    );
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("retention_ms     3600000 (1h00m) (topic) -> 604800000 (7d00h) (default)"), "{out}");
    assert!(out.contains("retention_bytes  0 (no limit) (default) -> 1048576 (1.0 MiB) (topic)"), "{out}");
    assert!(!out.contains("compression"), "unchanged settings are not listed: {out}");
    let (_, out, _) = cli(&["topics", "alter", "orders", "--retention-bytes", "1048576", "--addr", &addr], None);
    assert!(out.contains("topic 'orders' unchanged"), "{out}");
    assert!(engine.log().contains("changed topic settings"), "{}", engine.log());
    assert!(engine.log().contains("retention_bytes default -> 1048576"), "{}", engine.log());

    // Refused, each with what to do, and nothing changes.
    for (args, expected) in [
        (vec!["alter", "orders", "--retention-ms", "-5"], "must not be negative"),
        (vec!["alter", "orders", "--retention-ms", "1h"], "whole number"),
        (vec!["alter", "orders", "--compression", "gzip"], "none, lz4, zstd or default"),
        (vec!["alter", "orders", "--retention-bytes", "9007199254740992"], "largest allowed value"),
        (vec!["alter", "orders", "--partitions", "4"], "fixed when a topic is created"),
        (vec!["alter", "orders"], "nothing to change"),
        (vec!["alter", "nope", "--retention-ms", "1"], "topic 'nope' does not exist"),
        (vec!["describe", "nope"], "topic 'nope' does not exist"),
        (vec!["create", "orders"], "already exists"),
        (vec!["create", "huge", "--retention-ms", "18446744073709551615"], "largest allowed value"),
    ] {
        let mut full = vec!["topics"];
        full.extend(args.iter());
        full.extend(["--addr", &addr]);
        let (code, out, err) = cli(&full, None);
        assert_ne!(code, 0, "{args:?}: {out}");
        assert!(err.contains(expected), "{args:?}: {err}");
    }
    assert_eq!(engine.http("GET", "/v1/topics/huge", b"").0, 404, "a refused create creates nothing");
    assert!(engine.metric("flowgate_topic_api_rejected_total{op=\"alter\",reason=\"invalid_setting\"}") >= 1.0);
    assert!(engine.metric("flowgate_topic_api_rejected_total{op=\"alter\",reason=\"unknown_topic\"}") >= 1.0);

    // The settings are on disk: a new process has them.
    let before = describe(&engine, "orders");
    assert!(engine.terminate().success());
    let engine = engine.restart();
    let after = describe_cli(&engine.binary.to_string(), "orders");
    assert_eq!(after["settings"], before["settings"]);
    assert_eq!(setting(&after, "retention_bytes"), (json!(1_048_576), "topic".into()));
    assert_eq!(setting(&after, "compression"), (json!("zstd"), "topic".into()));
}

#[test]
fn the_http_routes_create_alter_and_describe() {
    let dir = tempfile::tempdir().unwrap();
    let engine = EngineProcess::start(dir.path(), &[("FLOWGATE_INGEST__COMPRESSION", "lz4")]);
    let body = br#"{"name":"h","partitions":3,"retention_bytes":1000000,"compression":"zstd"}"#;
    let (status, answer) = engine.http("POST", "/v1/topics", body);
    assert_eq!(status, 201, "{answer}");
    let created: Value = serde_json::from_str(&answer).unwrap();
    assert_eq!(created, describe(&engine, "h"));
    assert_eq!(created["partitions"].as_array().unwrap().len(), 3);
    assert_eq!(setting(&created, "retention_bytes"), (json!(1_000_000), "topic".into()));
    assert_eq!(setting(&created, "retention_ms"), (json!(604_800_000), "default".into()));

    let (status, answer) = engine.http("PATCH", "/v1/topics/h", br#"{"compression":null,"retention_ms":5000}"#);
    assert_eq!(status, 200, "{answer}");
    let patched: Value = serde_json::from_str(&answer).unwrap();
    assert_eq!(patched["before"]["compression"], json!({"value": "zstd", "source": "topic"}));
    assert_eq!(patched["after"]["compression"], json!({"value": "lz4", "source": "default"}), "ingest.compression");
    assert_eq!(patched["after"]["retention_ms"], json!({"value": 5000, "source": "topic"}));
    assert_eq!(patched["after"]["retention_bytes"], json!({"value": 1_000_000, "source": "topic"}), "left as it was");
    assert_eq!(describe(&engine, "h")["settings"], patched["after"]);

    // A topic created without settings (or by its first write) follows every default.
    let (status, _) = engine.http("POST", "/v1/topics", br#"{"name":"plain"}"#);
    assert_eq!(status, 201);
    let plain = describe(&engine, "plain");
    assert_eq!(plain["partitions"].as_array().unwrap().len(), 1, "log.default_partitions");
    for name in ["retention_ms", "retention_bytes", "compression"] {
        assert_eq!(setting(&plain, name).1, "default", "{name}");
    }

    for (method, path, body, status, expected) in [
        ("PATCH", "/v1/topics/h", &br#"{"partitions":4}"#[..], 400, "fixed when a topic is created"),
        ("PATCH", "/v1/topics/h", br#"{"retention_ms":-1}"#, 400, "must not be negative"),
        ("PATCH", "/v1/topics/h", br#"{"retention_ms":1e30}"#, 400, "whole number"),
        ("PATCH", "/v1/topics/h", br#"{"retention_bytes":9007199254740992}"#, 400, "largest allowed value"),
        ("PATCH", "/v1/topics/h", br#"{"compression":"brotli"}"#, 400, "'brotli' does not exist"),
        ("PATCH", "/v1/topics/h", br#"{"retention":1}"#, 400, "unknown setting 'retention'"),
        ("PATCH", "/v1/topics/h", b"not json", 400, "not JSON"),
        ("PATCH", "/v1/topics/nope", br#"{"retention_ms":1}"#, 404, "topic 'nope' does not exist"),
        ("GET", "/v1/topics/nope", b"", 404, "topic 'nope' does not exist"),
        ("POST", "/v1/topics", br#"{"name":"h"}"#, 409, "already exists"),
        ("POST", "/v1/topics", br#"{"name":"../x"}"#, 400, "invalid topic name"),
        ("POST", "/v1/topics", br#"{"partitions":2}"#, 400, "name is missing"),
        ("POST", "/v1/topics", br#"{"name":"x","partitions":0}"#, 400, "partitions must be"),
        // The engine's own topics keep the config's settings: a short retention would
        // delete dead letters (or replays) nobody has looked at.
        (
            "POST",
            "/v1/topics",
            br#"{"name":"_replay.orders","retention_bytes":1}"#,
            400,
            "takes no settings of its own",
        ),
        ("POST", "/v1/topics", br#"{"name":"_dlq","retention_ms":1}"#, 400, "takes no settings of its own"),
        ("PATCH", "/v1/topics/_dlq", br#"{"retention_ms":1}"#, 400, "takes no settings of its own"),
    ] {
        let (got, answer) = engine.http(method, path, body);
        assert_eq!(got, status, "{method} {path} {}: {answer}", String::from_utf8_lossy(body));
        let error = serde_json::from_str::<Value>(&answer).unwrap()["error"].as_str().unwrap_or("").to_owned();
        assert!(error.contains(expected), "{method} {path}: {answer}");
    }
    let huge = vec![b' '; 70 * 1024];
    assert_eq!(engine.http("POST", "/v1/topics", &huge).0, 413, "bodies are small");
    assert_eq!(setting(&describe(&engine, "h"), "retention_ms"), (json!(5000), "topic".into()), "nothing changed");
    assert!(engine.metric("flowgate_topic_api_rejected_total{op=\"alter\",reason=\"invalid_body\"}") >= 5.0);
    assert!(engine.metric("flowgate_topic_api_rejected_total{op=\"create\",reason=\"topic_exists\"}") >= 1.0);
}

#[test]
fn each_topic_is_retained_by_its_own_limits() {
    let dir = tempfile::tempdir().unwrap();
    // Small segments, so a few requests make several; retention every 200 ms.
    let engine = EngineProcess::start(
        dir.path(),
        &[("FLOWGATE_LOG__SEGMENT_BYTES", "2048"), ("FLOWGATE_LOG__RETENTION_CHECK_MS", "200")],
    );
    let addr = engine.binary.to_string();
    let (code, _, err) = cli(&["topics", "create", "short", "--retention-ms", "1000", "--addr", &addr], None);
    assert_eq!(code, 0, "{err}");
    let (code, _, err) = cli(&["topics", "create", "kept", "--addr", &addr], None);
    assert_eq!(code, 0, "{err}");
    post_events(&engine, "short", 10, 20);
    post_events(&engine, "kept", 10, 20);
    let segments = |t: &str| describe(&engine, t)["segments"].as_u64().unwrap();
    let kept_segments = segments("kept");
    assert!(segments("short") >= 5 && kept_segments >= 5, "{} {kept_segments}", segments("short"));
    poll_until("retention to delete the short topic's old segments", Duration::from_secs(30), || {
        start_offset(&engine, "short") > 0
    });
    assert_eq!(start_offset(&engine, "kept"), 0, "the default (7 days) keeps its neighbour's segments");
    // Every sealed segment of the short topic goes, once older than a second.
    poll_until("only the active segment to be left", Duration::from_secs(30), || segments("short") == 1);
    assert_eq!((start_offset(&engine, "kept"), segments("kept")), (0, kept_segments));
    assert!(engine.log().contains("retention deleted a segment"), "{}", engine.log());
}

#[test]
fn describe_shows_the_pipelines_reading_a_topic_and_a_topic_sink_writes_with_its_targets_codec() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("flowgate.toml");
    std::fs::write(
        &config,
        r#"
[[pipelines]]
name = "reader"
topics = ["watched"]
commit_interval_ms = 100
[[pipelines.sinks]]
name = "copy"
type = "topic"
topic = "copied"
batch = { max_events = 100, max_wait_ms = 20 }
"#,
    )
    .unwrap();
    let engine = EngineProcess::start_with(&dir.path().join("data"), Some(&config), &[]);
    let (status, answer) = engine.http("POST", "/v1/topics", br#"{"name":"copied","compression":"zstd"}"#);
    assert_eq!(status, 201, "{answer}");
    post_events(&engine, "watched", 5, 20);
    poll_until("the pipeline to commit every event", Duration::from_secs(30), || {
        let doc = describe(&engine, "watched");
        doc["consumers"] == json!([{"name": "reader", "lag": 0, "partitions": 1}])
            && doc["partitions"][0]["consumers"] == json!([{"name": "reader", "committed_offset": 100, "lag": 0}])
    });
    let (code, out, err) = cli(&["topics", "describe", "watched", "--addr", &engine.binary.to_string()], None);
    assert_eq!(code, 0, "{err}");
    let row: Vec<&str> = out.lines().find(|l| l.starts_with("reader ")).unwrap_or("").split_whitespace().collect();
    assert_eq!(row, ["reader", "0", "100", "0"], "{out}");

    // The topic sink's batches take the target topic's codec.
    poll_until("the copy", Duration::from_secs(30), || describe(&engine, "copied")["events"] == json!(100));
    let rt = tokio::runtime::Runtime::new().unwrap();
    let stored = rt.block_on(async {
        let client = Client::connect(&engine.binary.to_string()).await.unwrap();
        codecs(&client, "copied").await
    });
    assert!(!stored.is_empty() && stored.iter().all(|c| *c == Codec::Zstd), "{stored:?}");
}

/// The codec of every batch stored in partition 0 of `topic`, read over the protocol.
async fn codecs(client: &Client, topic: &str) -> Vec<Codec> {
    let fetched = client.fetch(topic, 0, 0, 1 << 20, 0).await.unwrap();
    let mut rest = &fetched.batches[..];
    let mut codecs = Vec::new();
    while !rest.is_empty() {
        let h = BatchHeader::parse(rest).unwrap();
        codecs.push(h.codec().unwrap());
        rest = &rest[h.total_len()..];
    }
    codecs
}

#[test]
fn a_topics_compression_is_what_its_stored_batches_use() {
    let dir = tempfile::tempdir().unwrap();
    let engine = EngineProcess::start(dir.path(), &[]);
    let addr = engine.binary.to_string();
    assert_eq!(cli(&["topics", "create", "z", "--compression", "zstd", "--addr", &addr], None).0, 0);
    assert_eq!(cli(&["topics", "create", "plain", "--addr", &addr], None).0, 0);
    post_events(&engine, "z", 3, 200);
    post_events(&engine, "plain", 3, 200);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let client = Client::connect(&addr).await.unwrap();
        // A batch the client encoded keeps its own codec.
        let mut b = BatchBuilder::new();
        b.push_payload(1, None, br#"{"from":"client"}"#);
        let batch = b.finish(Codec::Lz4, ProducerStamp::default()).unwrap();
        client.produce("z", bytes::Bytes::from(batch.bytes), ProducerStamp::default()).await.unwrap();
        assert_eq!(codecs(&client, "z").await, [Codec::Zstd, Codec::Zstd, Codec::Zstd, Codec::Lz4]);
        assert_eq!(codecs(&client, "plain").await, [Codec::None; 3]);
    });
    // The same events take far less room compressed.
    let bytes = |t: &str| describe(&engine, t)["size_bytes"].as_u64().unwrap();
    assert!(bytes("z") * 4 < bytes("plain"), "zstd {} vs none {}", bytes("z"), bytes("plain"));
    // What is read back is what was sent.
    let (status, answer) = engine.http("GET", "/v1/topics/z/events?limit=1", b"");
    assert_eq!(status, 200);
    assert_eq!(serde_json::from_str::<Value>(&answer).unwrap()["events"][0]["payload"]["batch"], json!(0));

    // Back to the default (ingest.compression, none): new batches are stored as is.
    assert_eq!(cli(&["topics", "alter", "z", "--compression", "default", "--addr", &addr], None).0, 0);
    post_events(&engine, "z", 1, 10);
    rt.block_on(async {
        let client = Client::connect(&addr).await.unwrap();
        assert_eq!(codecs(&client, "z").await.last(), Some(&Codec::None));
    });
}

#[test]
fn an_old_data_dir_opens_and_a_damaged_settings_file_suspends_only_its_topics_retention() {
    let dir = tempfile::tempdir().unwrap();
    let env = [("FLOWGATE_LOG__SEGMENT_BYTES", "2048"), ("FLOWGATE_LOG__RETENTION_CHECK_MS", "200")];
    let mut engine = EngineProcess::start(dir.path(), &env);
    let addr = engine.binary.to_string();
    assert_eq!(cli(&["topics", "create", "bad", "--retention-ms", "0", "--addr", &addr], None).0, 0);
    assert_eq!(cli(&["topics", "create", "control", "--addr", &addr], None).0, 0);
    post_events(&engine, "bad", 10, 20);
    post_events(&engine, "control", 10, 20);
    assert!(engine.terminate().success());

    // A topic as a flowgate from before settings wrote it: topic.json and its data only.
    let legacy = dir.path().join("topics/legacy");
    std::fs::create_dir_all(legacy.join("0")).unwrap();
    std::fs::write(legacy.join("topic.json"), br#"{"partitions":1,"created_ms":1700000000000}"#).unwrap();
    // One digit of bad's settings changed: valid JSON, but not what the engine wrote.
    let path = dir.path().join("topics/bad/settings.json");
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(text.contains(r#""retention_ms":0"#), "{text}");
    std::fs::write(&path, text.replace(r#""retention_ms":0"#, r#""retention_ms":9"#)).unwrap();

    // Now the default is one second: control's old segments go; bad's are kept.
    let engine = EngineProcess::start(dir.path(), &[env[0], env[1], ("FLOWGATE_LOG__RETENTION_MS", "1000")]);
    assert!(engine.log().contains("the topic's settings file is unreadable"), "{}", engine.log());
    let legacy = describe(&engine, "legacy");
    assert_eq!(legacy["settings_error"], Value::Null);
    assert_eq!(setting(&legacy, "retention_ms"), (json!(1000), "default".into()));
    let doc = describe(&engine, "bad");
    assert!(doc["settings_error"].as_str().unwrap().contains("checksum mismatch"), "{doc}");
    assert_eq!(setting(&doc, "retention_ms"), (json!(0), "suspended".into()));
    assert_eq!(engine.metric("flowgate_log_topic_settings_unreadable"), 1.0);
    let (_, out, _) = cli(&["topics", "describe", "bad", "--addr", &engine.binary.to_string()], None);
    assert!(out.contains("warning: the settings file is unreadable"), "{out}");
    poll_until("retention to run on the control topic", Duration::from_secs(30), || {
        start_offset(&engine, "control") > 0
    });
    assert_eq!(start_offset(&engine, "bad"), 0, "nothing deleted on a guess");
    assert_eq!(std::fs::read_to_string(&path).unwrap(), text.replace(r#""retention_ms":0"#, r#""retention_ms":9"#));

    // A change of one setting is refused: the others are unknown, and falling back to the
    // defaults (one second) would delete what the topic meant to keep.
    let addr = engine.binary.to_string();
    let (code, out, err) = cli(&["topics", "alter", "bad", "--retention-ms", "0", "--addr", &addr], None);
    assert_ne!(code, 0, "{out}{err}");
    assert!(err.contains("give every setting"), "{err}");
    assert_eq!(describe(&engine, "bad")["settings_error"].as_str().map(|e| e.contains("checksum")), Some(true));
    // Giving every setting repairs the topic.
    let every = ["--retention-ms", "0", "--retention-bytes", "default", "--compression", "default"];
    let (code, out, err) = cli(&[&["topics", "alter", "bad"][..], &every, &["--addr", &addr]].concat(), None);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("(suspended) -> 0 (no limit) (topic)"), "{out}");
    let doc = describe(&engine, "bad");
    assert_eq!(
        (doc["settings_error"].clone(), setting(&doc, "retention_ms")),
        (Value::Null, (json!(0), "topic".into()))
    );
    assert_eq!(engine.metric("flowgate_log_topic_settings_unreadable"), 0.0);
}

/// Creates `topic` (one partition) and produces `batches` to it, one request each.
fn produce(addr: &str, topic: &str, batches: impl IntoIterator<Item = Vec<u8>>) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let client = Client::connect(addr).await.unwrap();
        client.create_topic(topic, 1).await.unwrap();
        for batch in batches {
            client.produce(topic, bytes::Bytes::from(batch), ProducerStamp::default()).await.unwrap();
        }
    });
}

/// Reads every event of partition 0 of `topic` over HTTP, `query` added, page by page
/// (`limit` events each) until `next_offset` reaches the log end; returns the events and
/// the number of requests.
fn read_all(engine: &EngineProcess, topic: &str, query: &str) -> (Vec<Value>, usize) {
    let mut events = Vec::new();
    let mut from = 0;
    let mut requests = 0;
    loop {
        let (status, answer) = engine.http("GET", &format!("/v1/topics/{topic}/events?from={from}&{query}"), b"");
        assert_eq!(status, 200, "{answer}");
        requests += 1;
        let page: Value = serde_json::from_str(&answer).unwrap();
        events.extend(page["events"].as_array().unwrap().iter().cloned());
        from = page["next_offset"].as_u64().unwrap();
        if from >= page["log_end_offset"].as_u64().unwrap() {
            return (events, requests);
        }
    }
}

#[test]
fn get_events_answers_envelopes_and_one_keys_events() {
    let dir = tempfile::tempdir().unwrap();
    let engine = EngineProcess::start(dir.path(), &[]);
    let addr = engine.binary.to_string();
    let mut b = BatchBuilder::new();
    for i in 0..30u8 {
        let key = format!("k{}", i % 3);
        let headers = [("h", &[i, 0xff][..]), ("trace", &b"abc"[..])];
        let payload = if i % 2 == 0 { format!(r#"{{"i":{i}}}"#).into_bytes() } else { vec![0xfe, i] };
        b.push(1_000 + i64::from(i), Some(key.as_bytes()), Some(&[0x80, i][..]), headers.into_iter(), &payload);
    }
    b.push_payload(5, None, b"no key");
    produce(&addr, "e", [b.finish(Codec::Zstd, ProducerStamp::default()).unwrap().bytes]);

    // The envelope is exactly what `flowgate tail --format json` prints.
    let (envelopes, _) = read_all(&engine, "e", "format=envelope&limit=7");
    let (code, out, err) = cli(&["tail", "--topic", "e", "--format", "json", "--addr", &addr], None);
    assert_eq!(code, 0, "{err}");
    let tailed: Vec<Value> = out.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(envelopes, tailed);
    assert_eq!(envelopes.len(), 31);
    assert_eq!(
        envelopes[1],
        json!({"topic": "e", "partition": 0, "offset": 1, "key": "k1", "timestamp": 1001,
               "client_id": {"base64": "gAE="}, "headers": {"h": {"base64": "Af8="}, "trace": "abc"},
               "payload": {"base64": "/gE="}})
    );
    assert_eq!(envelopes[0]["payload"], json!({"i": 0}));
    assert_eq!((envelopes[30]["key"].clone(), envelopes[30]["client_id"].clone()), (Value::Null, Value::Null));

    // One key: its events only, in order, across pages of two.
    let (k1, requests) = read_all(&engine, "e", "format=envelope&key=k1&limit=2");
    let offsets: Vec<u64> = k1.iter().map(|e| e["offset"].as_u64().unwrap()).collect();
    assert_eq!(offsets, (0..30).filter(|i| i % 3 == 1).collect::<Vec<u64>>());
    assert_eq!(requests, 6, "five full pages, and one that reaches the end");
    let (k0, _) = read_all(&engine, "e", "key=k0");
    assert_eq!(k0.len(), 10);
    assert_eq!(k0[0], json!({"offset": 0, "timestamp": 1000, "key": "k0", "payload": {"i": 0}}), "the default format");
    assert!(read_all(&engine, "e", "key=none-such").0.is_empty());

    for (query, status, expected) in [
        ("format=xml", 400, "format must be"),
        ("limit=-1", 400, "limit must be"),
        ("from=abc", 400, "from must be"),
        ("partition=9", 404, "partition 9 does not exist"),
        ("partition=-1", 400, "partition must be"),
        ("from=99999", 200, ""),
    ] {
        let (got, answer) = engine.http("GET", &format!("/v1/topics/e/events?{query}"), b"");
        assert_eq!(got, status, "{query}: {answer}");
        assert!(answer.contains(expected), "{query}: {answer}");
    }
    assert_eq!(engine.http("GET", "/v1/topics/nope/events", b"").0, 404);
    assert!(engine.metric("flowgate_topic_api_rejected_total{op=\"read\",reason=\"invalid_query\"}") >= 4.0);
}

#[test]
fn a_key_filter_scans_a_bounded_number_of_bytes_per_request() {
    let dir = tempfile::tempdir().unwrap();
    let engine = EngineProcess::start(dir.path(), &[]);
    let addr = engine.binary.to_string();
    // 80 MiB of one key, then one event of another: more than one request scans.
    let one = |key: &[u8], payload: &[u8]| {
        let mut b = BatchBuilder::new();
        b.push_payload(1, Some(key), payload);
        b.finish(Codec::None, ProducerStamp::default()).unwrap().bytes
    };
    let big = vec![b'x'; 1 << 20];
    produce(&addr, "big", (0..80).map(|_| one(b"a", &big)).chain([one(b"b", br#"{"found":true}"#)]));
    let (status, answer) = engine.http("GET", "/v1/topics/big/events?key=b", b"");
    assert_eq!(status, 200);
    let first: Value = serde_json::from_str(&answer).unwrap();
    assert_eq!(first["events"], json!([]), "64 MiB scanned without a match");
    let next = first["next_offset"].as_u64().unwrap();
    assert!((60..80).contains(&next), "went on as far as it scanned: {next}");
    assert_eq!(first["log_end_offset"], json!(81));
    let (events, _) = read_all(&engine, "big", "key=b");
    assert_eq!(events, [json!({"offset": 80, "timestamp": 1, "key": "b", "payload": {"found": true}})]);
}

/// Sends one frame and reads one back.
fn exchange(s: &mut TcpStream, request: &flowgate_protocol::Request<'_>) -> Vec<u8> {
    let mut out = Vec::new();
    flowgate_protocol::encode_request(7, request, &mut out);
    s.write_all(&out).unwrap();
    let mut len = [0u8; 4];
    s.read_exact(&mut len).unwrap();
    let mut frame = len.to_vec();
    frame.resize(4 + u32::from_le_bytes(len) as usize, 0);
    s.read_exact(&mut frame[4..]).unwrap();
    frame
}

#[test]
fn a_version_2_client_still_creates_topics_and_is_told_what_settings_need() {
    use flowgate_protocol::{decode_response, Request, Response, Setting, SettingUpdate};
    let dir = tempfile::tempdir().unwrap();
    let engine = EngineProcess::start(dir.path(), &[]);
    let mut s = TcpStream::connect(engine.binary).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let hello = exchange(&mut s, &Request::Hello { min_version: 1, max_version: 2, client_name: "old" });
    assert!(matches!(decode_response(&hello).unwrap().1, Response::HelloOk { version: 2, .. }));
    let created = exchange(&mut s, &Request::CreateTopic { topic: "v2", partitions: 2, settings: Vec::new() });
    assert_eq!(decode_response(&created).unwrap().1, Response::Created);
    let settings = vec![SettingUpdate { setting: Setting::RetentionMs, value: Some(5) }];
    for request in [
        Request::CreateTopic { topic: "v2b", partitions: 1, settings: settings.clone() },
        Request::AlterTopic { topic: "v2", settings },
        Request::DescribeTopic { topic: "v2" },
    ] {
        let answer = exchange(&mut s, &request);
        match decode_response(&answer).unwrap().1 {
            Response::Error { code, message } => {
                assert_eq!(code, flowgate_protocol::ErrorCode::InvalidRequest);
                assert!(message.contains("protocol version 3"), "{message}");
            }
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(engine.http("GET", "/v1/topics/v2b", b"").0, 404);
    assert_eq!(describe(&engine, "v2")["partitions"].as_array().unwrap().len(), 2);
}

#[test]
fn reading_large_events_at_once_costs_about_their_bytes_not_a_parsed_tree_each() {
    let dir = tempfile::tempdir().unwrap();
    let engine = EngineProcess::start(dir.path(), &[]);
    // 8 MiB of `0,`: parsed into a JSON tree, each 2 bytes would take 32 or more.
    let elements = 4 << 20;
    let mut body = String::with_capacity(2 * elements + 16);
    body.push_str(r#"{"a":["#);
    for i in 0..elements {
        body.push_str(if i == 0 { "0" } else { ",0" });
    }
    body.push_str("]}");
    let (status, answer) = engine.http("POST", "/v1/topics/big/events", body.as_bytes());
    assert_eq!(status, 200, "{answer}");
    drop(body);
    let before = engine.peak_rss();
    let http = engine.http;
    let readers: Vec<_> = (0..6)
        .map(|_| {
            std::thread::spawn(move || {
                common::http_request(http, "GET", "/v1/topics/big/events?format=envelope&limit=1", b"")
            })
        })
        .collect();
    for reader in readers {
        let (status, answer) = reader.join().unwrap();
        assert_eq!(status, 200, "{}", &answer[..answer.len().min(200)]);
        let page: Value = serde_json::from_str(&answer).unwrap();
        assert_eq!(page["events"][0]["payload"]["a"].as_array().map(Vec::len), Some(elements));
    }
    let grown = engine.peak_rss().saturating_sub(before);
    assert!(grown < 160 << 20, "six reads of an 8 MiB event grew the engine by {} MiB", grown >> 20);
}
