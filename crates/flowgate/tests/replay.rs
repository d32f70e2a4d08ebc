//! Replaying dead letters against real engine processes and a real HTTP target the test
//! controls: `flowgate dlq replay` (dry runs, exactly one re-injection per entry, events
//! that fail again) and automatic reprocessing.

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::target::{Decide, Target};
use common::{cli, poll_until, EngineProcess};

/// An answer refusing for good (400) the events `refuse` picks.
fn refusing(events: &[u64], refuse: impl Fn(u64) -> bool) -> (u16, String) {
    let results: Vec<serde_json::Value> = events
        .iter()
        .enumerate()
        .filter(|(_, n)| refuse(**n))
        .map(|(i, n)| serde_json::json!({"index": i, "status": 400, "error": format!("n={n} is not allowed")}))
        .collect();
    (200, serde_json::json!({ "results": results }).to_string())
}

fn send(engine: &EngineProcess, ns: impl Iterator<Item = u64>) {
    let lines: Vec<String> = ns.map(|n| format!(r#"{{"n":{n}}}"#)).collect();
    let (status, body) = engine.http("POST", "/v1/topics/in/events", lines.join("\n").as_bytes());
    assert_eq!(status, 200, "{body}");
}

/// `flowgate dlq list` once it holds `n` entries.
fn dead_letters(engine: &EngineProcess, n: usize) -> Vec<serde_json::Value> {
    let mut entries = Vec::new();
    poll_until("the dead letters", Duration::from_secs(30), || {
        entries = list(engine);
        entries.len() >= n
    });
    assert_eq!(entries.len(), n, "{entries:?}");
    entries
}

fn list(engine: &EngineProcess) -> Vec<serde_json::Value> {
    let (code, out, err) =
        cli(&["dlq", "list", "--addr", &engine.binary.to_string(), "--http-addr", &engine.http.to_string()], None);
    assert_eq!(code, 0, "{err}");
    out.lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

fn replay(engine: &EngineProcess, args: &[&str]) -> serde_json::Value {
    let http = engine.http.to_string();
    let mut all = vec!["dlq", "replay", "--json", "--http-addr", &http];
    all.extend_from_slice(args);
    let (code, out, err) = cli(&all, None);
    assert_eq!(code, 0, "{err}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"))
}

fn sorted(mut v: Vec<u64>) -> Vec<u64> {
    v.sort_unstable();
    v
}

#[test]
fn replay_after_the_target_is_fixed_delivers_each_dead_letter_once_and_a_second_replay_sends_nothing() {
    let fixed = Arc::new(AtomicBool::new(false));
    let is_fixed = fixed.clone();
    let decide: Arc<Decide> =
        Arc::new(move |_, events: &[u64]| refusing(events, |n| !is_fixed.load(Ordering::SeqCst) && n % 10 == 3));
    let target = Target::start(decide);
    let dir = tempfile::tempdir().unwrap();
    let config = common::target::http_pipeline_config(dir.path(), "replay.toml", target.port, "");
    let engine = EngineProcess::start_with(dir.path(), Some(&config), &[]);
    send(&engine, 0..50);
    let refused: Vec<u64> = (0..50).filter(|n| n % 10 == 3).collect();
    let dead = dead_letters(&engine, refused.len());
    assert!(dead.iter().all(|d| d["replayed"] == false), "{dead:?}");
    poll_until("every other event", Duration::from_secs(30), || target.delivered.lock().unwrap().len() >= 45);

    // A dry run reports and changes nothing.
    let report = replay(&engine, &["--dry-run"]);
    assert_eq!((report["matched"].as_u64(), report["reinjected"].as_u64()), (Some(5), Some(5)), "{report}");
    assert_eq!(report["dry_run"], true, "{report}");
    assert!(list(&engine).iter().all(|d| d["replayed"] == false));

    fixed.store(true, Ordering::SeqCst);
    let report = replay(&engine, &["--pipeline", "p", "--category", "rejected"]);
    assert_eq!((report["matched"].as_u64(), report["reinjected"].as_u64()), (Some(5), Some(5)), "{report}");
    assert_eq!(report["completed"], true, "{report}");
    assert_eq!((report["delivered"].as_u64(), report["failed"].as_u64()), (Some(5), Some(0)), "{report}");
    assert_eq!(sorted(target.delivered.lock().unwrap().clone()), (0..50).collect::<Vec<u64>>(), "each event once");
    let dead = list(&engine);
    assert_eq!(dead.len(), 5, "no new dead letters: {dead:?}");
    assert!(dead.iter().all(|d| d["replayed"] == true), "{dead:?}");
    let (code, out, err) = cli(
        &["dlq", "stats", "--json", "--addr", &engine.binary.to_string(), "--http-addr", &engine.http.to_string()],
        None,
    );
    assert_eq!(code, 0, "{err}");
    let stats: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!((stats["total"].as_u64(), stats["replayed"].as_u64()), (Some(5), Some(5)), "{stats}");

    // A second replay finds them replayed and sends nothing.
    let requests = target.requests.load(Ordering::SeqCst);
    let report = replay(&engine, &[]);
    assert_eq!((report["matched"].as_u64(), report["reinjected"].as_u64()), (Some(5), Some(0)), "{report}");
    assert_eq!(report["skipped"]["already_replayed"], 5, "{report}");
    assert_eq!(target.requests.load(Ordering::SeqCst), requests, "nothing sent");
    // The same over HTTP, and the text a terminal gets.
    let (status, body) = engine.http("POST", "/v1/dlq/replay?dry_run=true&pipeline=p", b"");
    assert_eq!(status, 200, "{body}");
    assert_eq!(serde_json::from_str::<serde_json::Value>(&body).unwrap()["skipped"]["already_replayed"], 5);
    let (status, body) = engine.http("POST", "/v1/dlq/replay", br#"{"dry_run": true, "nonsense": 1}"#);
    assert_eq!(status, 400, "{body}");
    let (code, out, err) = cli(&["dlq", "replay", "--http-addr", &engine.http.to_string()], None);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("replayed 0 of 5 matching entries; skipped 5: 5 already replayed"), "{out}");

    // Replays survive a restart: the marks are durable.
    drop(engine);
    let engine = EngineProcess::start_with(dir.path(), Some(&config), &[]);
    let report = replay(&engine, &[]);
    assert_eq!(report["reinjected"], 0, "{report}");
    assert_eq!(sorted(target.delivered.lock().unwrap().clone()), (0..50).collect::<Vec<u64>>());
}

#[test]
fn events_that_fail_again_are_reported_and_their_new_entries_name_the_entry_they_replay() {
    let decide: Arc<Decide> = Arc::new(|_, events: &[u64]| refusing(events, |n| n % 10 == 3));
    let target = Target::start(decide);
    let dir = tempfile::tempdir().unwrap();
    let config = common::target::http_pipeline_config(dir.path(), "replay.toml", target.port, "");
    let engine = EngineProcess::start_with(dir.path(), Some(&config), &[]);
    send(&engine, 0..30);
    let first = dead_letters(&engine, 3);
    let report = replay(&engine, &[]);
    assert_eq!((report["reinjected"].as_u64(), report["completed"].as_bool()), (Some(3), Some(true)), "{report}");
    assert_eq!((report["delivered"].as_u64(), report["failed"].as_u64()), (Some(0), Some(3)), "{report}");
    let all = list(&engine);
    assert_eq!(all.len(), 6, "{all:?}");
    // The `_dlq` offset of each first entry, by the event's source offset.
    let first_at: HashMap<u64, u64> =
        first.iter().enumerate().map(|(i, d)| (d["offset"].as_u64().unwrap(), i as u64)).collect();
    let again: Vec<&serde_json::Value> = all.iter().filter(|d| !d["replay_of"].is_null()).collect();
    assert_eq!(again.len(), 3, "{all:?}");
    for d in &again {
        let source = d["offset"].as_u64().unwrap();
        assert_eq!(d["replay_of"], serde_json::json!({"partition": 0, "offset": first_at[&source]}), "{d}");
        assert_eq!((d["replays"].as_u64(), d["topic"].as_str()), (Some(1), Some("in")), "{d}");
        assert_eq!((d["sink"].as_str(), d["category"].as_str()), (Some("api"), Some("rejected")), "{d}");
        assert_eq!(d["event"]["n"].as_u64(), Some(source), "the event as it was: {d}");
        assert_eq!(d["replayed"], false);
    }
    // Replaying again takes the new entries only, and counts the chain on.
    let report = replay(&engine, &["--category", "rejected"]);
    assert_eq!((report["matched"].as_u64(), report["reinjected"].as_u64()), (Some(6), Some(3)), "{report}");
    assert_eq!(report["failed"], 3, "{report}");
    let all = list(&engine);
    assert_eq!(all.iter().filter(|d| d["replays"] == 2).count(), 3, "{all:?}");
    assert_eq!(sorted(target.delivered.lock().unwrap().clone()), (0..30).filter(|n| n % 10 != 3).collect::<Vec<_>>());
}

#[test]
fn automatic_reprocessing_replays_sink_dead_letters_after_the_delay_at_most_the_configured_times() {
    // 13 is refused the first time only; 3 always.
    let seen: Arc<Mutex<HashMap<u64, u32>>> = Arc::default();
    let decide: Arc<Decide> = Arc::new(move |_, events: &[u64]| {
        let mut seen = seen.lock().unwrap();
        let mut refuse = Vec::new();
        for n in events {
            let times = seen.entry(*n).or_default();
            *times += 1;
            if *n == 3 || (*n == 13 && *times == 1) {
                refuse.push(*n);
            }
        }
        refusing(events, |n| refuse.contains(&n))
    });
    let target = Target::start(decide);
    let dir = tempfile::tempdir().unwrap();
    let config = common::target::http_pipeline_config(
        dir.path(),
        "replay.toml",
        target.port,
        "dlq = { reprocess_after_ms = 200, reprocess_max_times = 2 }",
    );
    let engine = EngineProcess::start_with(dir.path(), Some(&config), &[]);
    send(&engine, 0..20);
    poll_until("13 delivered by a reprocessing", Duration::from_secs(30), || {
        target.delivered.lock().unwrap().contains(&13)
    });
    let of_3 = |engine: &EngineProcess| list(engine).into_iter().filter(|d| d["offset"] == 3).collect::<Vec<_>>();
    poll_until("3 replayed twice", Duration::from_secs(30), || of_3(&engine).len() >= 3);
    let replays: Vec<u64> = of_3(&engine).iter().map(|d| d["replays"].as_u64().unwrap_or(0)).collect();
    assert_eq!(replays, vec![0, 1, 2], "the original, then two replays");
    // Several reprocessing rounds later, it was not replayed a third time.
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(of_3(&engine).len(), 3);
    let delivered = sorted(target.delivered.lock().unwrap().clone());
    assert_eq!(delivered, (0..20).filter(|n| *n != 3).collect::<Vec<_>>(), "13 once, after its replay");
    let all = list(&engine);
    assert_eq!(all.iter().filter(|d| d["offset"] == 13).count(), 1, "{all:?}");
}

#[test]
fn a_crash_between_the_replay_append_and_its_marks_delivers_each_dead_letter_once_and_a_second_replay_sends_nothing() {
    let fixed = Arc::new(AtomicBool::new(false));
    let is_fixed = fixed.clone();
    let decide: Arc<Decide> =
        Arc::new(move |_, events: &[u64]| refusing(events, |n| !is_fixed.load(Ordering::SeqCst) && n % 10 == 7));
    let target = Target::start(decide);
    let dir = tempfile::tempdir().unwrap();
    let config = common::target::http_pipeline_config(dir.path(), "replay.toml", target.port, "");
    let crash = [("FLOWGATE_FAILPOINT_CRASH_AFTER_REPLAY_APPEND", "1")];
    let mut engine = EngineProcess::start_with(dir.path(), Some(&config), &crash);
    send(&engine, 0..40);
    dead_letters(&engine, 4);
    poll_until("every other event", Duration::from_secs(30), || target.delivered.lock().unwrap().len() >= 36);
    // The http sink delivers at least once: what the last checkpoint does not cover is
    // sent again after a crash, so the crash comes after a checkpoint covers it all.
    poll_until("a checkpoint of every event", Duration::from_secs(30), || {
        engine.metric("flowgate_pipeline_committed_offset{pipeline=\"p\"") >= 40.0
    });

    // The replay's records are durable when the engine dies; no entry is marked yet.
    fixed.store(true, Ordering::SeqCst);
    let http = engine.http.to_string();
    let (code, _, _) = cli(&["dlq", "replay", "--json", "--http-addr", &http], None);
    assert_ne!(code, 0, "the engine died during the replay");
    let status = engine.child.wait().expect("reap");
    assert!(!status.success(), "{status:?}");
    assert!(engine.log().contains("failpoint: crashing between a replay's append and its marks"), "{}", engine.log());

    // Restarted, the engine delivers what the replay topic holds, once, and a new replay
    // finds every entry replayed.
    let engine = EngineProcess::start_with(dir.path(), Some(&config), &[]);
    poll_until("the replayed events", Duration::from_secs(30), || target.delivered.lock().unwrap().len() >= 40);
    let report = replay(&engine, &[]);
    assert_eq!((report["matched"].as_u64(), report["reinjected"].as_u64()), (Some(4), Some(0)), "{report}");
    assert_eq!(report["skipped"]["already_replayed"], 4, "{report}");
    let requests = target.requests.load(Ordering::SeqCst);
    let report = replay(&engine, &[]);
    assert_eq!(report["reinjected"], 0, "{report}");
    assert_eq!(target.requests.load(Ordering::SeqCst), requests, "nothing sent");
    assert_eq!(sorted(target.delivered.lock().unwrap().clone()), (0..40).collect::<Vec<u64>>(), "each event once");
    assert!(list(&engine).iter().all(|d| d["replayed"] == true));
}

#[test]
fn processor_dead_letters_replay_from_the_processor_that_failed_not_from_the_start() {
    let target = Target::start(Arc::new(|_, _: &[u64]| (200, "{}".to_owned())));
    let dir = tempfile::tempdir().unwrap();
    // `tag` is not idempotent (it adds 1000 to `n` each time it runs): a replay that
    // went through it again would deliver n + 2000.
    let pipeline = |div: &str| {
        format!(
            r#"[[pipelines.processors]]
type = "remap"
name = "tag"
source = '.n = to_int!(.n) + 1000'
[[pipelines.processors]]
type = "remap"
name = "div"
source = '{div}'"#
        )
    };
    let broken =
        common::target::http_pipeline_config(dir.path(), "broken.toml", target.port, &pipeline(".q = to_int!(.d)"));
    let engine = EngineProcess::start_with(dir.path(), Some(&broken), &[]);
    let lines: Vec<String> = (0..30)
        .map(|n| if n % 5 == 2 { format!(r#"{{"n":{n},"d":"x"}}"#) } else { format!(r#"{{"n":{n},"d":1}}"#) })
        .collect();
    let (status, body) = engine.http("POST", "/v1/topics/in/events", lines.join("\n").as_bytes());
    assert_eq!(status, 200, "{body}");
    let dead = dead_letters(&engine, 6);
    assert!(dead.iter().all(|d| d["processor"] == "div" && d["category"] == "processing_error"), "{dead:?}");
    poll_until("the other events", Duration::from_secs(30), || target.delivered.lock().unwrap().len() >= 24);
    // A clean stop checkpoints what was delivered (the http sink sends again what no
    // checkpoint covers).
    let mut engine = engine;
    assert!(engine.terminate().success());

    let fixed =
        common::target::http_pipeline_config(dir.path(), "fixed.toml", target.port, &pipeline(".q = to_int(.d) ?? 0"));
    let engine = EngineProcess::start_with(dir.path(), Some(&fixed), &[]);
    let report = replay(&engine, &[]);
    assert_eq!((report["reinjected"].as_u64(), report["completed"].as_bool()), (Some(6), Some(true)), "{report}");
    assert_eq!((report["delivered"].as_u64(), report["failed"].as_u64()), (Some(6), Some(0)), "{report}");
    assert_eq!(
        sorted(target.delivered.lock().unwrap().clone()),
        (1000..1030).collect::<Vec<u64>>(),
        "each event once, tagged once"
    );
}
