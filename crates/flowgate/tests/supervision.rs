//! Pipeline supervision and shutdown in real engine processes: a peer that never reads,
//! signals during shutdown, sinks that cannot be built, unreadable stored batches, events
//! a processor panics on,
//! side outputs across SIGKILL, and sink state across renames and reorders.

mod common;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{cli, EngineProcess};

fn write_config(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

/// Polls `probe` until it gives a value, failing with `what` after `secs` seconds.
fn wait_for<T>(what: &str, secs: u64, mut probe: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = probe() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(25));
    }
}

fn signal(engine: &EngineProcess, name: &str) {
    let status = Command::new("kill").args([&format!("-{name}"), &engine.child.id().to_string()]).status().unwrap();
    assert!(status.success());
}

/// Waits for the process to exit, at most `secs` seconds; returns its status and how long it took.
fn wait_exit(engine: &mut EngineProcess, secs: u64) -> (ExitStatus, Duration) {
    let started = Instant::now();
    let status = wait_for("the engine to exit", secs, || engine.child.try_wait().unwrap());
    (status, started.elapsed())
}

fn post(engine: &EngineProcess, topic: &str, lines: &[String]) {
    let (status, body) = engine.http("POST", &format!("/v1/topics/{topic}/events"), lines.join("\n").as_bytes());
    assert_eq!(status, 200, "{body}");
}

/// Payloads of a topic's partition 0 (empty if the topic does not exist).
fn topic_payloads(engine: &EngineProcess, topic: &str) -> Vec<serde_json::Value> {
    let (status, body) = engine.http("GET", &format!("/v1/topics/{topic}/events?from=0&limit=1000"), b"");
    if status != 200 {
        return Vec::new();
    }
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    v["events"].as_array().unwrap().iter().map(|e| e["payload"].clone()).collect()
}

/// Every complete line of every file in `dir`, in file order, parsed.
fn file_lines(dir: &Path) -> Vec<serde_json::Value> {
    let Ok(entries) = std::fs::read_dir(dir) else { return Vec::new() };
    let mut files: Vec<PathBuf> = entries.map(|e| e.unwrap().path()).collect();
    files.sort();
    let mut out = Vec::new();
    for f in files {
        let text = std::fs::read_to_string(&f).unwrap();
        let complete = &text[..text.rfind('\n').map_or(0, |i| i + 1)];
        out.extend(complete.lines().map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()));
    }
    out
}

fn numbers(lines: &[serde_json::Value]) -> Vec<u64> {
    lines.iter().map(|v| v["n"].as_u64().unwrap()).collect()
}

/// A TCP peer that accepts connections and never reads from them nor answers.
struct DeafPeer {
    addr: std::net::SocketAddr,
    accepted: Arc<AtomicBool>,
}

impl DeafPeer {
    fn start() -> DeafPeer {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicBool::new(false));
        let flag = accepted.clone();
        std::thread::spawn(move || {
            let mut held = Vec::new();
            for conn in listener.incoming() {
                held.push(conn);
                flag.store(true, Ordering::Release);
            }
        });
        DeafPeer { addr, accepted }
    }
}

fn stalled_sink_config(peer: &DeafPeer) -> String {
    format!(
        r#"
[[pipelines]]
name = "stuck"
topics = ["in"]
[[pipelines.sinks]]
name = "remote"
type = "tcp"
addr = "{}"
topic = "x"
batch = {{ max_events = 1, max_wait_ms = 1 }}
"#,
        peer.addr
    )
}

/// Starts an engine whose only pipeline is stuck writing to a peer that never reads.
fn engine_with_a_stalled_sink(dir: &Path, grace_ms: &str, flush_ms: &str) -> (EngineProcess, DeafPeer) {
    let peer = DeafPeer::start();
    let config = write_config(dir, "stalled.toml", &stalled_sink_config(&peer));
    let engine = EngineProcess::start_with(
        dir,
        Some(&config),
        &[("FLOWGATE_SERVER__SHUTDOWN_GRACE_MS", grace_ms), ("FLOWGATE_SERVER__SHUTDOWN_FLUSH_MS", flush_ms)],
    );
    post(&engine, "in", &[r#"{"n":1}"#.to_owned()]);
    wait_for("the sink to connect to the deaf peer", 20, || peer.accepted.load(Ordering::Acquire).then_some(()));
    (engine, peer)
}

#[test]
fn sigterm_with_a_sink_whose_peer_never_reads_ends_within_grace_plus_flush() {
    let dir = tempfile::tempdir().unwrap();
    let (mut engine, _peer) = engine_with_a_stalled_sink(dir.path(), "1000", "2000");
    signal(&engine, "TERM");
    let (status, took) = wait_exit(&mut engine, 30);
    assert!(took < Duration::from_millis(1000 + 2000 + 2000), "shutdown took {took:?}; {}", engine.log());
    // 1: the stalled pipeline was cut off at the end of the grace period (documented in `flowgate run`).
    assert_eq!(status.code(), Some(1), "{}", engine.log());
    assert!(engine.log().contains("did not flush within the shutdown grace period"), "{}", engine.log());
    // What was acknowledged is still there.
    let engine = engine.restart();
    assert_eq!(topic_payloads(&engine, "in"), vec![serde_json::json!({"n": 1})]);
}

#[test]
fn a_second_signal_during_shutdown_exits_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let (mut engine, _peer) = engine_with_a_stalled_sink(dir.path(), "60000", "5000");
    signal(&engine, "TERM");
    wait_for("shutdown to begin", 10, || engine.log().contains("a second signal exits at once").then_some(()));
    assert!(engine.child.try_wait().unwrap().is_none(), "a 60 s grace period keeps it waiting for the sink");
    signal(&engine, "TERM");
    let (status, took) = wait_exit(&mut engine, 30);
    assert!(took < Duration::from_secs(2), "the second SIGTERM took {took:?} to end the process");
    assert_eq!(status.code(), Some(128 + 15), "{}", engine.log());
}

#[test]
fn a_worker_whose_sink_cannot_be_built_is_restarted_counted_and_not_ready() {
    let dir = tempfile::tempdir().unwrap();
    // The sink's directory is a regular file: building the sink fails until it is removed.
    std::fs::write(dir.path().join("blocked"), b"not a directory").unwrap();
    let config = write_config(
        dir.path(),
        "blocked.toml",
        r#"
[[pipelines]]
name = "p"
topics = ["in"]
commit_interval_ms = 50
[[pipelines.sinks]]
name = "files"
type = "file"
path = "blocked"
batch = { max_wait_ms = 5 }
"#,
    );
    let engine = EngineProcess::start_with(dir.path(), Some(&config), &[]);
    let body = wait_for("/ready to report the failing worker", 20, || {
        let (status, body) = engine.http("GET", "/ready", b"");
        (status == 503 && body.contains("cannot build")).then_some(body)
    });
    assert!(body.contains("pipeline 'p'") && body.contains("files"), "{body}");
    wait_for("two restarts with backoff", 20, || {
        (engine.metric("flowgate_pipeline_worker_restarts_total{pipeline=\"p\"") >= 2.0).then_some(())
    });
    let (_, stats) = engine.http("GET", "/v1/stats", b"");
    let stats: serde_json::Value = serde_json::from_str(&stats).unwrap();
    let worker = &stats["pipeline_workers"][0];
    assert_eq!(worker["pipeline"], "p");
    assert!(worker["restarts"].as_u64().unwrap() >= 2, "{stats}");
    assert!(worker["last_error"].as_str().unwrap().contains("cannot build"), "{stats}");
    assert_eq!(stats["ready"], false);
    // The cause goes away: the next restart succeeds and the pipeline delivers.
    std::fs::remove_file(dir.path().join("blocked")).unwrap();
    post(&engine, "in", &[r#"{"n":7}"#.to_owned()]);
    wait_for("the restarted worker to deliver", 60, || {
        (numbers(&file_lines(&dir.path().join("blocked"))) == [7]).then_some(())
    });
    wait_for("/ready to recover", 10, || (engine.http("GET", "/ready", b"").0 == 200).then_some(()));
}

#[test]
fn an_unreadable_stored_batch_goes_to_the_dead_letter_topic_and_the_partition_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let env = [("FLOWGATE_LOG__SEGMENT_BYTES", "1024")];
    let plain = write_config(dir.path(), "plain.toml", "[server]\n");
    let mut engine = EngineProcess::start_with(dir.path(), Some(&plain), &env);
    let pad = "p".repeat(300);
    for n in 0..12 {
        post(&engine, "in", &[format!(r#"{{"n":{n},"pad":"{pad}"}}"#)]);
    }
    assert!(engine.terminate().success());
    // Flip one payload byte of the first batch, in a sealed segment (recovery only
    // checks the active one): its checksum no longer matches.
    let partition = dir.path().join("topics/in/0");
    let mut segments: Vec<PathBuf> = std::fs::read_dir(&partition)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "log"))
        .collect();
    segments.sort();
    assert!(segments.len() >= 3, "small segments: {segments:?}");
    let mut bytes = std::fs::read(&segments[0]).unwrap();
    let at = bytes.windows(pad.len()).position(|w| w == pad.as_bytes()).expect("payload in the first segment");
    bytes[at + 10] = b'q';
    std::fs::write(&segments[0], bytes).unwrap();
    let config = write_config(
        dir.path(),
        "pipeline.toml",
        r#"
[[pipelines]]
name = "p"
topics = ["in"]
commit_interval_ms = 50
[[pipelines.sinks]]
name = "out"
type = "file"
path = "out"
batch = { max_wait_ms = 5 }
"#,
    );
    let engine = EngineProcess::start_with(dir.path(), Some(&config), &env);
    let out = dir.path().join("out");
    wait_for("the events after the bad batch to be delivered", 30, || {
        (numbers(&file_lines(&out)) == (1..12).collect::<Vec<u64>>()).then_some(())
    });
    let dlq = wait_for("the dead letter of the bad batch", 10, || {
        let dlq = topic_payloads(&engine, "_dlq");
        (!dlq.is_empty()).then_some(dlq)
    });
    assert_eq!(dlq.len(), 1, "{dlq:?}");
    assert_eq!(dlq[0]["offset"], 0);
    assert_eq!(dlq[0]["pipeline"], "p");
    assert!(dlq[0]["error"].as_str().unwrap().contains("unreadable"), "{dlq:?}");
    assert_eq!(engine.metric("flowgate_pipeline_unreadable_batches_total{pipeline=\"p\""), 1.0);
    assert_eq!(engine.metric("flowgate_pipeline_worker_restarts_total"), 0.0, "skipping needs no restart");
}

#[test]
fn an_event_a_processor_panics_on_goes_to_the_dead_letters_and_the_partition_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        dir.path(),
        "poison.toml",
        r#"
[log]
default_partitions = 1
[[pipelines]]
name = "p"
topics = ["in"]
commit_interval_ms = 50
[[pipelines.processors]]
type = "remap"
source = ".seen = true"
[[pipelines.processors]]
name = "keep-all"
type = "filter"
condition = "true"
[[pipelines.sinks]]
name = "out"
type = "file"
path = "out"
batch = { max_wait_ms = 5 }
"#,
    );
    // Every processor panics on an event that carries the marker, as on a processor bug.
    let engine = EngineProcess::start_with(dir.path(), Some(&config), &[("FLOWGATE_FAILPOINT_PANIC_ON", "POISON")]);
    let poison = [4u64, 7, 12];
    let lines =
        |range: std::ops::Range<u64>| -> Vec<String> {
            range
                .map(|n| {
                    if poison.contains(&n) {
                        format!(r#"{{"n":{n},"x":"POISON"}}"#)
                    } else {
                        format!(r#"{{"n":{n}}}"#)
                    }
                })
                .collect()
        };
    // A batch with two poison events, then one with a third: each is narrowed down to
    // its event, dead-lettered once, and everything else is delivered once, in order.
    post(&engine, "in", &lines(0..10));
    let out = dir.path().join("out");
    let expected: Vec<u64> = (0..10).filter(|n| !poison.contains(n)).collect();
    wait_for("every other event of the first batch to be delivered", 60, || {
        (numbers(&file_lines(&out)) == expected).then_some(())
    });
    post(&engine, "in", &lines(10..15));
    let expected: Vec<u64> = (0..15).filter(|n| !poison.contains(n)).collect();
    wait_for("every other event of the second batch to be delivered", 60, || {
        (numbers(&file_lines(&out)) == expected).then_some(())
    });
    let dlq = wait_for("the dead letters of the poison events", 10, || {
        let dlq = topic_payloads(&engine, "_dlq");
        (dlq.len() >= 3).then_some(dlq)
    });
    let offsets: Vec<u64> = dlq.iter().map(|d| d["offset"].as_u64().unwrap()).collect();
    assert_eq!(offsets, poison, "each poison event dead-lettered once: {dlq:?}");
    for d in &dlq {
        assert_eq!(d["processor"], "remap-1", "{d}");
        assert!(d["error"].as_str().unwrap().contains("panicked"), "{d}");
        assert_eq!(d["event"]["x"], "POISON", "the event as stored: {d}");
    }
    assert!(file_lines(&out).iter().all(|l| l["seen"] == true), "every delivered event went through the remap");
    // Later events flow as usual once the poison is passed.
    post(&engine, "in", &(15..20).map(|n| format!(r#"{{"n":{n}}}"#)).collect::<Vec<_>>());
    let expected: Vec<u64> = (0..20).filter(|n| !poison.contains(n)).collect();
    wait_for("later events to be delivered", 30, || (numbers(&file_lines(&out)) == expected).then_some(()));
    assert_eq!(topic_payloads(&engine, "_dlq").len(), 3, "no poison event dead-lettered twice");
    let restarts = engine.metric("flowgate_pipeline_worker_restarts_total");
    assert!((3.0..=6.0).contains(&restarts), "a restart to isolate each batch and one per poison event: {restarts}");
    assert_eq!(engine.metric("flowgate_processor_events_failed_total{pipeline=\"p\",processor=\"remap-1\""), 3.0);
    wait_for("/ready", 10, || (engine.http("GET", "/ready", b"").0 == 200).then_some(()));
}

const SIDE_OUTPUTS: &str = r#"
[[pipelines]]
name = "p"
topics = ["in"]
commit_interval_ms = 50
[[pipelines.processors]]
type = "remap"
source = ".doubled = to_int!(.n) * 2"
[[pipelines.processors]]
type = "aggregate"
time_field = "ts"
window = { type = "tumbling", size_ms = 1000 }
late_topic = "late"
idle_advance_ms = 0
functions = [{ fn = "count" }]
[[pipelines.sinks]]
name = "out"
type = "file"
path = "out"
batch = { max_wait_ms = 5 }
"#;

/// The offset in a checkpoint file (its first line is a JSON header).
fn checkpoint_offset(path: &Path) -> Option<u64> {
    common::checkpoint_header(path)?["offset"].as_u64()
}

#[test]
fn late_events_are_remapped_and_side_outputs_survive_sigkill_right_after_the_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), "side.toml", SIDE_OUTPUTS);
    let mut engine = EngineProcess::start_with(dir.path(), Some(&config), &[]);
    for line in [
        r#"{"n":1,"ts":1000}"#,
        r#"{"n":2,"ts":5000}"#,
        // Its window [1000, 2000) was emitted when the watermark reached 5000: late.
        r#"{"n":3,"ts":1500}"#,
        // The remap fails: a dead letter.
        r#"{"n":"x","ts":5001}"#,
    ] {
        post(&engine, "in", &[line.to_owned()]);
    }
    let checkpoint = dir.path().join("pipelines/p/in-0.ckpt");
    wait_for("a checkpoint past every event", 20, || (checkpoint_offset(&checkpoint)? >= 4).then_some(()));
    engine.kill9();
    let engine = engine.restart();
    let late = topic_payloads(&engine, "late");
    assert_eq!(late, vec![serde_json::json!({"n": 3, "ts": 1500, "doubled": 6})], "the late event as remapped");
    let dlq = topic_payloads(&engine, "_dlq");
    assert_eq!(dlq.len(), 1, "{dlq:?}");
    assert_eq!(dlq[0]["event"], serde_json::json!({"n": "x", "ts": 5001}));
    assert_eq!(dlq[0]["offset"], 3);
}

#[test]
fn a_dead_letter_that_cannot_be_written_is_retried_not_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        dir.path(),
        "dlq.toml",
        r#"
[[pipelines]]
name = "p"
topics = ["in"]
commit_interval_ms = 50
[[pipelines.processors]]
type = "remap"
source = ".doubled = to_int!(.n) * 2"
[[pipelines.sinks]]
name = "out"
type = "file"
path = "out"
batch = { max_wait_ms = 5 }
"#,
    );
    let engine = EngineProcess::start_with(dir.path(), Some(&config), &[("FLOWGATE_LOG__AUTO_CREATE_TOPICS", "false")]);
    // The engine made the dead-letter topic; take it away under the running pipeline.
    let (code, out, err) = cli(&["topics", "delete", "_dlq", "--addr", &engine.binary.to_string()], None);
    assert_eq!(code, 0, "{out}{err}");
    post(&engine, "in", &[r#"{"n":"x"}"#.to_owned(), r#"{"n":2}"#.to_owned()]);
    let dlq = wait_for("the dead letter, written after the worker restarted", 30, || {
        let dlq = topic_payloads(&engine, "_dlq");
        (!dlq.is_empty()).then_some(dlq)
    });
    assert_eq!(dlq.len(), 1, "{dlq:?}");
    assert_eq!(dlq[0]["event"], serde_json::json!({"n": "x"}));
    assert!(engine.metric("flowgate_pipeline_worker_restarts_total{pipeline=\"p\"") >= 1.0);
    wait_for("the good event", 10, || (numbers(&file_lines(&dir.path().join("out"))) == [2]).then_some(()));
}

fn two_file_sinks(pipeline: &str, first: &str, second: &str) -> String {
    let sink = |name: &str| {
        match name {
        "a" => "[[pipelines.sinks]]\nname = \"a\"\ntype = \"file\"\npath = \"out-a\"\nrotate_bytes = 1024\nbatch = { max_wait_ms = 5 }\n",
        _ => "[[pipelines.sinks]]\nname = \"b\"\ntype = \"file\"\npath = \"out-b\"\nbatch = { max_wait_ms = 5 }\n",
    }
    };
    format!(
        "[[pipelines]]\nname = \"{pipeline}\"\ntopics = [\"in\"]\ncommit_interval_ms = 50\n{}{}",
        sink(first),
        sink(second)
    )
}

fn send_range(engine: &EngineProcess, range: std::ops::Range<u64>) {
    let lines: Vec<String> = range.map(|n| format!(r#"{{"n":{n},"pad":"{}"}}"#, "x".repeat(50))).collect();
    post(engine, "in", &lines);
}

fn wait_outputs(dir: &Path, upto: u64) {
    let expected: Vec<u64> = (0..upto).collect();
    wait_for(&format!("both sinks to hold 0..{upto}"), 30, || {
        let a = numbers(&file_lines(&dir.join("out-a")));
        let b = numbers(&file_lines(&dir.join("out-b")));
        (a.len() as u64 >= upto && b.len() as u64 >= upto).then_some(())
    });
    assert_eq!(numbers(&file_lines(&dir.join("out-a"))), expected, "sink a: each event once, in order");
    assert_eq!(numbers(&file_lines(&dir.join("out-b"))), expected, "sink b: each event once, in order");
}

#[test]
fn reordering_sinks_and_renaming_a_pipeline_keep_earlier_file_output() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut engine =
        EngineProcess::start_with(d, Some(&write_config(d, "1.toml", &two_file_sinks("p", "a", "b"))), &[]);
    send_range(&engine, 0..40);
    wait_outputs(d, 40);
    assert!(engine.terminate().success());
    assert!(std::fs::read_dir(d.join("out-a")).unwrap().count() > 1, "sink a rolled files");

    // Sinks swapped: each must get its own state back.
    let mut engine =
        EngineProcess::start_with(d, Some(&write_config(d, "2.toml", &two_file_sinks("p", "b", "a"))), &[]);
    send_range(&engine, 40..80);
    wait_outputs(d, 80);
    assert!(engine.terminate().success());

    // Renamed: the engine refuses to start the pipeline afresh over p's output.
    let mut engine =
        EngineProcess::start_with(d, Some(&write_config(d, "3.toml", &two_file_sinks("q", "b", "a"))), &[]);
    let body = wait_for("/ready to name the renamed pipeline", 20, || {
        let (status, body) = engine.http("GET", "/ready", b"");
        (status == 503 && body.contains("'p'")).then_some(body)
    });
    assert!(body.contains("rename"), "{body}");
    send_range(&engine, 80..90);
    assert_eq!(engine.terminate().code(), Some(0));
    wait_outputs(d, 80);

    // Told so by renaming the checkpoint directory, q carries on where p stopped.
    std::fs::rename(d.join("pipelines/p"), d.join("pipelines/q")).unwrap();
    let mut engine = EngineProcess::start_with(d, Some(&d.join("3.toml")), &[]);
    wait_outputs(d, 90);
    assert!(engine.terminate().success());
}

#[test]
fn two_sinks_writing_the_same_directory_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        dir.path(),
        "dup.toml",
        r#"
[[pipelines]]
name = "one"
topics = ["a"]
[[pipelines.sinks]]
name = "files"
type = "file"
path = "out"

[[pipelines]]
name = "two"
topics = ["b"]
[[pipelines.sinks]]
name = "files"
type = "file"
path = "./out/"
"#,
    );
    let (code, _, err) = cli(&["validate", "--config", config.to_str().unwrap()], None);
    assert_ne!(code, 0);
    assert!(err.contains("pipeline 'two'") && err.contains("pipeline 'one' sink 'files'"), "{err}");
}
