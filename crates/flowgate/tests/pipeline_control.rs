//! Pipelines as things an operator manages, in a real engine process: `flowgate
//! pipelines list|status|pause|resume|reset` and `/v1/pipelines…`. A pause holds across
//! a reload and a restart; a reset to a time replays exactly the events from that time
//! on; a reset never deletes what the sinks wrote; `--processor-state keep` keeps the
//! dedup table (a rewind passes only what it does not hold) and `clear` empties it.

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::target::{http_pipeline_config, Decide, Target};
use common::{cli, poll_until, EngineProcess};
use flowgate_client::Client;
use flowgate_core::{BatchBuilder, Codec, ProducerStamp};
use serde_json::Value;

/// Event `i`'s timestamp: one second apart from `BASE`.
const BASE: i64 = 1_760_000_000_000;

fn config(dir: &Path) -> std::path::PathBuf {
    let path = dir.join("flowgate.toml");
    std::fs::write(
        &path,
        r#"
[log]
default_partitions = 2

[[pipelines]]
name = "p"
topics = ["in"]
commit_interval_ms = 100
[[pipelines.processors]]
name = "seen"
type = "dedup"
by = "id"
ttl_ms = 86400000
[[pipelines.sinks]]
name = "out"
type = "file"
path = "out"
batch = { max_events = 100, max_wait_ms = 20 }
"#,
    )
    .unwrap();
    path
}

/// Sends events `ids` (keyed by device, event time `BASE + id` seconds) to topic `in`.
fn send(engine: &EngineProcess, ids: std::ops::Range<u64>) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let client = Client::connect(&engine.binary.to_string()).await.unwrap();
        let mut b = BatchBuilder::new();
        for id in ids {
            let payload = format!(r#"{{"id":{id},"n":{id},"device":"d{}"}}"#, id % 7);
            let ts = BASE + i64::try_from(id).unwrap() * 1000;
            b.push_payload(ts, Some(format!("d{}", id % 7).as_bytes()), payload.as_bytes());
        }
        let batch = b.finish(Codec::None, ProducerStamp::default()).unwrap();
        client.produce("in", bytes::Bytes::from(batch.bytes), ProducerStamp::default()).await.unwrap();
    });
}

/// How often each id is in the file sink's output.
fn output(engine: &EngineProcess) -> HashMap<u64, usize> {
    common::file_sink_ids(&engine.data_dir.join("out"), "-").0
}

fn wait_for_output(engine: &EngineProcess, lines: usize) {
    poll_until(&format!("{lines} lines of output"), Duration::from_secs(60), || {
        output(engine).values().sum::<usize>() >= lines
    });
}

fn pipelines(engine: &EngineProcess, args: &[&str]) -> Value {
    let addr = engine.http.to_string();
    let mut all = vec!["pipelines"];
    all.extend_from_slice(args);
    all.extend_from_slice(&["--http-addr", &addr, "--json"]);
    let (code, stdout, stderr) = cli(&all, None);
    assert_eq!(code, 0, "flowgate {all:?} failed: {stderr}");
    serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{stdout}: {e}"))
}

fn status(engine: &EngineProcess) -> Value {
    pipelines(engine, &["status", "p"])
}

/// Waits until the pipeline is `state` and has committed everything stored.
fn wait_caught_up(engine: &EngineProcess, state: &str) -> Value {
    let mut last = Value::Null;
    poll_until(&format!("pipeline p {state} and caught up"), Duration::from_secs(60), || {
        last = status(engine);
        last["state"] == state && last["lag_events"] == 0
    });
    last
}

fn assert_counts(out: &HashMap<u64, usize>, ids: std::ops::Range<u64>, times: usize) {
    for id in ids {
        assert_eq!(out.get(&id).copied().unwrap_or(0), times, "id {id} should be in the output {times} times");
    }
}

#[test]
fn an_operator_lists_pauses_resumes_and_rewinds_a_pipeline() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path());
    let mut engine = EngineProcess::start_with(dir.path(), Some(&cfg), &[]);
    send(&engine, 0..1000);
    wait_for_output(&engine, 1000);
    let running = wait_caught_up(&engine, "running");

    // list: one line per pipeline, in human form and as JSON over HTTP.
    let (code, text, _) = cli(&["pipelines", "list", "--http-addr", &engine.http.to_string()], None);
    assert_eq!(code, 0);
    assert!(text.lines().any(|l| l.starts_with("p ") && l.contains("running") && l.contains("in")), "{text}");
    let (status_code, body) = engine.http("GET", "/v1/pipelines", b"");
    assert_eq!(status_code, 200);
    let listed: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(listed["pipelines"][0]["name"], "p");
    assert_eq!(listed["pipelines"][0]["topics"], serde_json::json!(["in"]));
    // status: both partitions of `in`, committed to their ends, with the dedup table's size.
    let sources: Vec<&Value> =
        running["partitions"].as_array().unwrap().iter().filter(|w| w["topic"] == "in").collect();
    assert_eq!(sources.len(), 2, "{running}");
    let committed: u64 = sources.iter().map(|w| w["committed_offset"].as_u64().unwrap()).sum();
    assert_eq!(committed, 1000);
    for w in &sources {
        assert!(w["processor_state_bytes"]["seen"].as_u64().unwrap() > 0, "{w}");
        assert!(w["last_checkpoint_age_seconds"].as_f64().unwrap() < 60.0, "{w}");
        assert_eq!(w["sinks"][0]["sink"], "out", "{w}");
    }

    // pause: nothing is read; the lag grows with what arrives.
    let paused = pipelines(&engine, &["pause", "p"]);
    assert_eq!((paused["state"].as_str(), paused["changed"].as_bool()), (Some("paused"), Some(true)));
    send(&engine, 1000..1500);
    let seen = status(&engine);
    assert_eq!((seen["state"].as_str(), seen["lag_events"].as_u64()), (Some("paused"), Some(500)), "{seen}");
    // The lag in seconds is the age of the oldest unread event (stamped BASE + 1000 s).
    let age = (flowgate_core::time::now_ms() - BASE - 1_000_000) as f64 / 1000.0;
    let lag = seen["lag_seconds"].as_f64().unwrap();
    assert!((lag - age).abs() < 60.0, "lag {lag} s, expected about {age} s: {seen}");
    // A negative cannot be polled: give a running pipeline ample time to write them.
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(output(&engine).len(), 1000, "a paused pipeline wrote output");

    // The pause holds across a reload that changes the pipeline, and across a restart.
    let cfg_text = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(&cfg, cfg_text.replace("commit_interval_ms = 100", "commit_interval_ms = 150")).unwrap();
    let (code, body) = engine.http("POST", "/v1/reload", b"");
    assert_eq!(code, 200, "{body}");
    assert_eq!(status(&engine)["state"], "paused");
    assert_eq!(engine.terminate().code(), Some(0));
    engine = engine.restart();
    assert_eq!(status(&engine)["state"], "paused");
    assert_eq!(status(&engine)["lag_events"], 500);
    assert_eq!(output(&engine).len(), 1000, "a paused pipeline wrote output after a restart");
    assert!(engine.log().contains("pipeline is paused"), "{}", engine.log());

    // resume: the 500 waiting events are written once each.
    let resumed = pipelines(&engine, &["resume", "p"]);
    assert_eq!(resumed["state"], "running");
    wait_for_output(&engine, 1500);
    wait_caught_up(&engine, "running");
    assert_counts(&output(&engine), 0..1500, 1);
    assert_eq!(pipelines(&engine, &["resume", "p"])["changed"], false);

    // reset to a time, processor state cleared: exactly the events from that time on
    // (ids 500.. by their timestamps) are processed again, and nothing written goes.
    let at = "2025-10-09T09:01:40Z"; // BASE + 500 s
    assert_eq!(flowgate_core::timestamp::parse_rfc3339(at).ok(), Some(BASE + 500_000));
    let reset = pipelines(&engine, &["reset", "p", "--to", at, "--processor-state", "clear"]);
    assert_eq!(reset["state"], "running", "{reset}");
    let moved: u64 = reset["partitions"].as_array().unwrap().iter().map(|p| p["to"].as_u64().unwrap()).sum();
    assert_eq!(moved, 500, "every partition rewound to its first event at or after {at}: {reset}");
    wait_for_output(&engine, 2500);
    wait_caught_up(&engine, "running");
    let out = output(&engine);
    assert_counts(&out, 0..500, 1);
    assert_counts(&out, 500..1500, 2);
    assert!(engine.log().contains("pipeline reset"), "every change is logged");

    // reset to earliest keeping the dedup table: everything is read again, and only
    // what the table does not hold passes — ids 0..500, which it has not seen since the
    // reset above cleared it.
    let reset = pipelines(&engine, &["reset", "p", "--to", "earliest", "--processor-state", "keep"]);
    assert!(reset["partitions"].as_array().unwrap().iter().all(|p| p["to"] == 0), "{reset}");
    wait_for_output(&engine, 3000);
    let caught_up = wait_caught_up(&engine, "running");
    let committed: u64 = caught_up["partitions"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|w| w["topic"] == "in")
        .map(|w| w["committed_offset"].as_u64().unwrap())
        .sum();
    assert_eq!(committed, 1500);
    assert_counts(&output(&engine), 0..1500, 2);

    // reset to latest while paused: what arrived meanwhile is skipped, it stays paused.
    pipelines(&engine, &["pause", "p"]);
    send(&engine, 1500..1600);
    let reset = pipelines(&engine, &["reset", "p", "--to", "latest"]);
    assert_eq!(reset["state"], "paused", "{reset}");
    assert_eq!(status(&engine)["lag_events"], 0);
    pipelines(&engine, &["resume", "p"]);
    send(&engine, 1600..1650);
    wait_for_output(&engine, 3050);
    let out = output(&engine);
    assert_counts(&out, 1500..1600, 0);
    assert_counts(&out, 1600..1650, 1);

    // What is refused, with a clear line and a non-zero exit.
    let addr = engine.http.to_string();
    let (code, _, stderr) = cli(&["pipelines", "status", "nope", "--http-addr", &addr], None);
    assert_ne!(code, 0);
    assert!(stderr.contains("no pipeline is named 'nope'"), "{stderr}");
    let (code, _, stderr) = cli(&["pipelines", "reset", "p", "--to", "yesterday", "--http-addr", &addr], None);
    assert_ne!(code, 0);
    assert!(stderr.contains("RFC 3339"), "{stderr}");
    let (code, body) = engine.http("POST", "/v1/pipelines/p/reset", br#"{"to": {"offset": 3}}"#);
    assert_eq!(code, 400, "{body}");
    let (code, body) = engine.http("POST", "/v1/pipelines/p/reset", b"not json");
    assert_eq!(code, 400, "{body}");
    let (code, body) =
        engine.http("POST", "/v1/pipelines/p/reset", br#"{"to": "earliest", "processor_state": "maybe"}"#);
    assert_eq!(code, 400, "{body}");
    let (code, _) = engine.http("POST", "/v1/pipelines/nope/pause", b"");
    assert_eq!(code, 404);
    assert_eq!(output(&engine).values().sum::<usize>(), 3050, "a refused control changed nothing");
}

#[test]
fn a_reset_is_refused_while_a_sink_cannot_flush_and_the_pipeline_runs_on() {
    // The target refuses everything until told otherwise: the sink cannot flush, so the
    // pipeline cannot stop cleanly, and rewinding would lose track of what it sent.
    let up = Arc::new(AtomicBool::new(false));
    let answer = up.clone();
    let decide: Arc<Decide> = Arc::new(move |_, _| {
        if answer.load(Ordering::Acquire) {
            (200, r#"{"results": []}"#.to_owned())
        } else {
            (503, "{}".to_owned())
        }
    });
    let target = Target::start(decide);
    let dir = tempfile::tempdir().unwrap();
    let cfg = http_pipeline_config(dir.path(), "flowgate.toml", target.port, "");
    let engine = EngineProcess::start_with(dir.path(), Some(&cfg), &[("FLOWGATE_SERVER__SHUTDOWN_GRACE_MS", "1000")]);
    send(&engine, 0..200);
    poll_until("the sink to try the target", Duration::from_secs(30), || target.requests.load(Ordering::SeqCst) > 0);
    let (code, body) = engine.http("POST", "/v1/pipelines/p/reset", br#"{"to": "latest"}"#);
    assert_eq!(code, 409, "{body}");
    assert!(body.contains("did not flush and commit in time"), "{body}");
    // Paused while the sink cannot flush, the workers are cut off: the pause says so,
    // and a reset stays refused until a clean pause.
    let (code, body) = engine.http("POST", "/v1/pipelines/p/pause", b"");
    assert_eq!(code, 200, "{body}");
    assert!(body.contains(r#""cut_off":true"#), "{body}");
    let (code, body) = engine.http("POST", "/v1/pipelines/p/reset", br#"{"to": "latest"}"#);
    assert_eq!(code, 409, "{body}");
    assert!(body.contains("did not stop cleanly"), "{body}");
    // Nothing was reset: once the target is back, every event is delivered.
    up.store(true, Ordering::Release);
    pipelines(&engine, &["resume", "p"]);
    poll_until("every event delivered", Duration::from_secs(60), || {
        let delivered = target.delivered.lock().unwrap();
        (0..200).all(|n| delivered.contains(&n))
    });
    poll_until("the pipeline running and caught up", Duration::from_secs(60), || {
        let s = status(&engine);
        s["state"] == "running" && s["lag_events"] == 0
    });
    let paused = pipelines(&engine, &["pause", "p"]);
    assert_eq!(paused["cut_off"], false, "{paused}");
    let reset = pipelines(&engine, &["reset", "p", "--to", "earliest"]);
    assert_eq!(reset["state"], "paused", "{reset}");
}

#[test]
fn a_pause_and_a_reset_survive_a_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path());
    let mut engine = EngineProcess::start_with(dir.path(), Some(&cfg), &[]);
    send(&engine, 0..300);
    wait_for_output(&engine, 300);
    wait_caught_up(&engine, "running");
    // Acknowledged means durable: SIGKILL right after the answer keeps the pause...
    assert_eq!(pipelines(&engine, &["pause", "p"])["state"], "paused");
    engine.kill9();
    engine = engine.restart();
    assert_eq!(status(&engine)["state"], "paused");
    // ...and the reset (a paused pipeline stays paused).
    let reset = pipelines(&engine, &["reset", "p", "--to", "earliest"]);
    assert_eq!(reset["state"], "paused", "{reset}");
    engine.kill9();
    engine = engine.restart();
    let seen = status(&engine);
    assert_eq!((seen["state"].as_str(), seen["lag_events"].as_u64()), (Some("paused"), Some(300)), "{seen}");
    assert_counts(&output(&engine), 0..300, 1);
    pipelines(&engine, &["resume", "p"]);
    wait_for_output(&engine, 600);
    wait_caught_up(&engine, "running");
    assert_counts(&output(&engine), 0..300, 2);
}
