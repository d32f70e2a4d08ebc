//! Processor state in a real engine process: values JSON cannot hold survive SIGKILL and
//! restart, and absurd event times go to the dead letters instead of poisoning windows.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::EngineProcess;

const WINDOWS: &str = r#"
[[pipelines]]
name = "windows"
topics = ["readings"]
commit_interval_ms = 50
[[pipelines.processors]]
type = "aggregate"
group_by = "k"
time_field = "t"
window = { type = "tumbling", size_ms = 60000 }
idle_advance_ms = 0
functions = [{ fn = "count" }, { fn = "sum", field = "v" }, { fn = "max", field = "v" }]
[[pipelines.sinks]]
name = "out"
type = "file"
path = "windows-out"
batch = { max_events = 1, max_wait_ms = 10 }
"#;

fn start(dir: &Path) -> EngineProcess {
    let config = dir.join("flowgate.toml");
    std::fs::write(&config, WINDOWS).unwrap();
    EngineProcess::start_with(dir, Some(&config), &[])
}

/// The start of the current one-minute window, in event time.
fn window_start() -> i64 {
    let now = flowgate_core::time::now_ms();
    now - now.rem_euclid(60_000)
}

fn send(engine: &EngineProcess, lines: &[String]) {
    let (status, body) = engine.http("POST", "/v1/topics/readings/events", lines.join("\n").as_bytes());
    assert_eq!(status, 200, "{body}");
}

/// Every complete line the file sink wrote, parsed.
fn windows_written(dir: &Path) -> Vec<serde_json::Value> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir.join("windows-out")) else { return out };
    for e in entries {
        let text = std::fs::read_to_string(e.unwrap().path()).unwrap();
        let complete = &text[..text.rfind('\n').map_or(0, |i| i + 1)];
        out.extend(complete.lines().map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()));
    }
    out
}

/// Waits for the window of group `a` that starts at `start`.
fn wait_for_window(engine: &EngineProcess, dir: &Path, start: i64) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(w) = windows_written(dir).into_iter().find(|w| w["window_start"] == start && w["k"] == "a") {
            return w;
        }
        assert!(Instant::now() < deadline, "window {start} was never written; engine log:\n{}", engine.log());
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The committed offset of the pipeline's checkpoint (its first line is a JSON header).
fn committed_offset(dir: &Path) -> u64 {
    committed_offset_of(&dir.join("pipelines/windows/readings-0.ckpt"))
}

#[test]
fn a_window_sum_that_overflows_survives_sigkill_and_restart() {
    let dir = tempfile::tempdir().unwrap();
    let mut engine = start(dir.path());
    let start = window_start();
    send(
        &engine,
        &[format!(r#"{{"k":"a","t":{},"v":1e308}}"#, start + 1), format!(r#"{{"k":"a","t":{},"v":1e308}}"#, start + 2)],
    );
    // The sum is now infinite; wait until a checkpoint holds it, then kill.
    let deadline = Instant::now() + Duration::from_secs(30);
    while committed_offset(dir.path()) < 2 {
        assert!(Instant::now() < deadline, "no checkpoint past both events; engine log:\n{}", engine.log());
        std::thread::sleep(Duration::from_millis(10));
    }
    engine.kill9();
    let engine = engine.restart();
    // An event a window later closes the restored window.
    send(&engine, &[format!(r#"{{"k":"a","t":{},"v":1}}"#, start + 120_000)]);
    let w = wait_for_window(&engine, dir.path(), start);
    assert_eq!(w["count"], 2, "{w}");
    assert_eq!(w["sum_v"], serde_json::Value::Null, "an infinite sum is written as null: {w}");
    assert_eq!(w["max_v"], 1e308, "{w}");
    assert!(!engine.log().contains("pipeline worker stopped"), "{}", engine.log());
}

#[test]
fn an_event_stamped_in_microseconds_goes_to_the_dead_letters_and_leaves_the_window_alone() {
    let dir = tempfile::tempdir().unwrap();
    let engine = start(dir.path());
    let start = window_start();
    send(
        &engine,
        &[
            format!(r#"{{"k":"a","t":{},"v":1}}"#, start + 1),
            format!(r#"{{"k":"a","t":{},"v":1}}"#, (start + 2) * 1000),
            format!(r#"{{"k":"a","t":{},"v":1}}"#, start + 3),
        ],
    );
    send(&engine, &[format!(r#"{{"k":"a","t":{},"v":1}}"#, start + 120_000)]);
    let w = wait_for_window(&engine, dir.path(), start);
    assert_eq!(w["count"], 2, "the event after the bad one is not late: {w}");
    let deadline = Instant::now() + Duration::from_secs(30);
    let dead = loop {
        let (_, body) = engine.http("GET", "/v1/topics/_dlq/events?from=earliest&limit=10", b"");
        let events =
            serde_json::from_str::<serde_json::Value>(&body).ok().and_then(|v| v["events"].as_array().cloned());
        if let Some(event) = events.and_then(|e| e.into_iter().next()) {
            break event;
        }
        assert!(Instant::now() < deadline, "nothing reached _dlq; engine log:\n{}", engine.log());
        std::thread::sleep(Duration::from_millis(20));
    };
    let error = dead["payload"]["error"].as_str().unwrap_or_default();
    assert!(error.contains("event_time.max_ahead_ms"), "{dead}");
    assert_eq!(dead["payload"]["event"]["t"], (start + 2) * 1000, "{dead}");
    assert!(engine.metric("flowgate_dlq_events_total") >= 1.0);
    assert!(windows_written(dir.path()).iter().all(|w| w["count"] != 1), "no window was cut short");
}

fn dedup_config(processors_in_order: &[&str]) -> String {
    let filter = "[[pipelines.processors]]\ntype = \"filter\"\ncondition = \".keep == true\"\n";
    let dedup = "[[pipelines.processors]]\ntype = \"dedup\"\nby = \"id\"\nttl_ms = 3600000\n";
    let processors: String = processors_in_order.iter().map(|p| if *p == "filter" { filter } else { dedup }).collect();
    format!(
        "[log]\ndefault_partitions = 1\n[[pipelines]]\nname = \"dd\"\ntopics = [\"ids\"]\ncommit_interval_ms = 50\n\
         {processors}[[pipelines.sinks]]\nname = \"out\"\ntype = \"file\"\npath = \"dd-out\"\n\
         batch = {{ max_events = 1, max_wait_ms = 10 }}\n"
    )
}

fn ids_written(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir.join("dd-out")) else { return out };
    for e in entries {
        let text = std::fs::read_to_string(e.unwrap().path()).unwrap();
        let complete = &text[..text.rfind('\n').map_or(0, |i| i + 1)];
        out.extend(complete.lines().map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["id"].to_string()));
    }
    out.sort();
    out
}

#[test]
fn reordering_processors_gives_each_its_own_state_back() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("flowgate.toml");
    std::fs::write(&config, dedup_config(&["filter", "dedup"])).unwrap();
    let mut engine = EngineProcess::start_with(dir.path(), Some(&config), &[]);
    let post = |engine: &EngineProcess, ids: &[&str]| {
        let lines: Vec<String> = ids.iter().map(|id| format!(r#"{{"id":"{id}","keep":true}}"#)).collect();
        let (status, body) = engine.http("POST", "/v1/topics/ids/events", lines.join("\n").as_bytes());
        assert_eq!(status, 200, "{body}");
    };
    post(&engine, &["a", "b"]);
    let ckpt = dir.path().join("pipelines/dd/ids-0.ckpt");
    let deadline = Instant::now() + Duration::from_secs(30);
    while ids_written(dir.path()).len() < 2
        || !std::fs::read(&ckpt).is_ok_and(|b| b.windows(7).any(|w| w == b"dedup-1"))
    {
        assert!(Instant::now() < deadline, "a and b were never written and checkpointed; log:\n{}", engine.log());
        std::thread::sleep(Duration::from_millis(20));
    }
    while committed_offset_of(&ckpt) < 2 {
        assert!(Instant::now() < deadline, "no checkpoint past a and b; log:\n{}", engine.log());
        std::thread::sleep(Duration::from_millis(20));
    }
    engine.kill9();
    // The dedup now comes first: under position matching its state would be the
    // filter's (none) and it would refuse or forget what it had seen.
    std::fs::write(&config, dedup_config(&["dedup", "filter"])).unwrap();
    let engine = engine.restart();
    post(&engine, &["a", "b", "c"]);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !ids_written(dir.path()).contains(&"\"c\"".to_string()) {
        assert!(Instant::now() < deadline, "c was never written; log:\n{}", engine.log());
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(ids_written(dir.path()), ["\"a\"", "\"b\"", "\"c\""], "a and b were remembered across the reorder");
}

fn committed_offset_of(path: &Path) -> u64 {
    common::checkpoint_header(path).and_then(|h| h["offset"].as_u64()).unwrap_or(0)
}
