//! Delivery control against real engine processes and a real HTTP target the test
//! controls: per-event outcomes, retries, and the dead-letter topic with `flowgate dlq`.

mod common;

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::target::{Decide, Target};
use common::{cli, poll_until, EngineProcess};

fn write_config(dir: &Path, port: u16) -> std::path::PathBuf {
    common::target::http_pipeline_config(dir, "delivery.toml", port, "")
}

#[test]
fn a_target_refusing_some_events_for_good_gets_every_other_once_in_order_and_the_rest_are_dead_letters() {
    // Every event whose n ends in 3 is refused for good; the first request fails whole
    // with a 503, so the batch is retried whole before anything is delivered.
    let decide: Arc<Decide> = Arc::new(|nth, events: &[u64]| {
        if nth == 0 {
            return (503, "{}".to_owned());
        }
        let results: Vec<serde_json::Value> = events
            .iter()
            .enumerate()
            .filter(|(_, n)| *n % 10 == 3)
            .map(|(i, n)| serde_json::json!({"index": i, "status": 400, "error": format!("n={n} is not allowed")}))
            .collect();
        (200, serde_json::json!({ "results": results }).to_string())
    });
    let target = Target::start(decide);
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), target.port);
    let engine = EngineProcess::start_with(dir.path(), Some(&config), &[]);
    let lines: Vec<String> = (0..100).map(|n| format!(r#"{{"n":{n}}}"#)).collect();
    let (status, body) = engine.http("POST", "/v1/topics/in/events", lines.join("\n").as_bytes());
    assert_eq!(status, 200, "{body}");
    let expected: Vec<u64> = (0..100).filter(|n| n % 10 != 3).collect();
    poll_until("every accepted event to reach the target", Duration::from_secs(30), || {
        target.delivered.lock().unwrap().len() >= expected.len()
    });
    assert_eq!(*target.delivered.lock().unwrap(), expected, "each once, in order");
    let dead = poll_until_dlq(&engine, 10);
    let offsets: Vec<u64> = dead.iter().map(|d| d["offset"].as_u64().unwrap()).collect();
    assert_eq!(offsets, (0..100).filter(|n| n % 10 == 3).collect::<Vec<u64>>());
    for d in &dead {
        assert_eq!(
            (d["sink"].as_str(), d["category"].as_str(), d["code"].as_str()),
            (Some("api"), Some("rejected"), Some("400")),
            "{d}"
        );
        assert!(d["error"].as_str().unwrap().contains("is not allowed"), "{d}");
        assert_eq!(d["event"]["n"].as_u64(), d["offset"].as_u64(), "the event as it was: {d}");
    }
    let (code, out, err) = cli(&["dlq", "stats", "--json", "--addr", &engine.binary.to_string()], None);
    assert_eq!(code, 0, "{err}");
    let stats: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(stats["total"], 10, "{stats}");
    assert_eq!(stats["groups"][0]["stage"], "sink api", "{stats}");
    assert_eq!(engine.metric("flowgate_sink_dead_letters_total{pipeline=\"p\",sink=\"api\""), 10.0);
    // The same over HTTP.
    let (status, body) = engine.http("GET", "/v1/dlq?pipeline=p&category=rejected&limit=4", b"");
    assert_eq!(status, 200, "{body}");
    let listed: serde_json::Value = serde_json::from_str(&body).unwrap();
    let offsets: Vec<u64> =
        listed["entries"].as_array().unwrap().iter().map(|e| e["offset"].as_u64().unwrap()).collect();
    assert_eq!((offsets, listed["truncated"].as_bool()), (vec![3, 13, 23, 33], Some(true)), "{listed}");
    let (_, body) = engine.http("GET", "/v1/dlq?pipeline=other", b"");
    assert_eq!(serde_json::from_str::<serde_json::Value>(&body).unwrap()["entries"], serde_json::json!([]));
    let (_, body) = engine.http("GET", "/v1/dlq/stats", b"");
    let stats: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!((stats["total"].as_u64(), stats["top_errors"].as_array().map(Vec::len)), (Some(10), Some(5)), "{stats}");
    // Purging takes a --yes, empties the dead-letter topic, and the pipeline goes on
    // writing dead letters into it.
    let addr = engine.binary.to_string();
    let (code, _, err) = cli(&["dlq", "purge", "--addr", &addr], None);
    assert!(code != 0 && err.contains("--yes"), "{err}");
    let (code, out, err) = cli(&["dlq", "purge", "--yes", "--addr", &addr], None);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("purged 10"), "{out}");
    let (_, out, _) = cli(&["dlq", "list", "--addr", &addr], None);
    assert_eq!(out, "", "nothing left after the purge");
    let lines: Vec<String> = (100..110).map(|n| format!(r#"{{"n":{n}}}"#)).collect();
    engine.http("POST", "/v1/topics/in/events", lines.join("\n").as_bytes());
    let dead = poll_until_dlq(&engine, 1);
    assert_eq!(dead[0]["offset"], 103, "{dead:?}");
}

/// The `flowgate dlq list` entries once there are `n` of them.
fn poll_until_dlq(engine: &EngineProcess, n: usize) -> Vec<serde_json::Value> {
    let mut entries = Vec::new();
    poll_until("the dead letters", Duration::from_secs(30), || {
        let (code, out, _) = cli(&["dlq", "list", "--pipeline", "p", "--addr", &engine.binary.to_string()], None);
        entries = out.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        code == 0 && entries.len() >= n
    });
    assert_eq!(entries.len(), n, "{entries:?}");
    entries
}

#[test]
fn events_a_target_keeps_failing_go_to_the_dead_letters_once_retries_run_out() {
    let decide: Arc<Decide> =
        Arc::new(|_, events: &[u64]| if events.contains(&7) { (503, "{}".to_owned()) } else { (200, "{}".to_owned()) });
    let target = Target::start(decide);
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), target.port);
    let text = std::fs::read_to_string(&config).unwrap().replace(
        "retry = { initial_backoff_ms = 10, max_backoff_ms = 100 }",
        "retry = { max_attempts = 3, initial_backoff_ms = 10, max_backoff_ms = 100 }",
    );
    std::fs::write(&config, text).unwrap();
    let engine = EngineProcess::start_with(dir.path(), Some(&config), &[]);
    let lines: Vec<String> = (0..5).map(|n| format!(r#"{{"n":{n}}}"#)).collect();
    engine.http("POST", "/v1/topics/in/events", lines.join("\n").as_bytes());
    poll_until("the first batch", Duration::from_secs(30), || target.delivered.lock().unwrap().len() == 5);
    let requests_before = target.requests.load(Ordering::SeqCst);
    engine.http("POST", "/v1/topics/in/events", br#"{"n":7}"#);
    let dead = poll_until_dlq(&engine, 1);
    assert_eq!((dead[0]["category"].as_str(), dead[0]["attempts"].as_u64()), (Some("retries_exhausted"), Some(3)));
    assert_eq!(dead[0]["code"], "503", "{dead:?}");
    assert_eq!(target.requests.load(Ordering::SeqCst) - requests_before, 3, "three attempts, no more");
    engine.http("POST", "/v1/topics/in/events", br#"{"n":8}"#);
    poll_until("later events to flow", Duration::from_secs(30), || target.delivered.lock().unwrap().last() == Some(&8));
}

#[test]
fn a_target_that_is_down_gets_probes_not_a_storm_and_everything_is_delivered_once_it_is_back() {
    // Down for 3 s from the first request it gets.
    let first_request = Arc::new(std::sync::OnceLock::new());
    let refused = Arc::new(AtomicU64::new(0));
    let counted = refused.clone();
    let decide: Arc<Decide> = Arc::new(move |_, _: &[u64]| {
        let since = *first_request.get_or_init(std::time::Instant::now);
        if since.elapsed() < Duration::from_secs(3) {
            counted.fetch_add(1, Ordering::SeqCst);
            (503, "{}".to_owned())
        } else {
            (200, "{}".to_owned())
        }
    });
    let target = Target::start(decide);
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), target.port);
    let text = std::fs::read_to_string(&config).unwrap().replace(
        "retry = { initial_backoff_ms = 10, max_backoff_ms = 100 }",
        "retry = { initial_backoff_ms = 10, max_backoff_ms = 100 }\nbreaker = { consecutive_failures = 3, open_ms = 400, max_open_ms = 1000 }",
    );
    std::fs::write(&config, text).unwrap();
    let engine = EngineProcess::start_with(dir.path(), Some(&config), &[]);
    for chunk in 0..10u64 {
        let lines: Vec<String> = (chunk * 10..chunk * 10 + 10).map(|n| format!(r#"{{"n":{n}}}"#)).collect();
        let (status, body) = engine.http("POST", "/v1/topics/in/events", lines.join("\n").as_bytes());
        assert_eq!(status, 200, "{body}");
    }
    poll_until("the breaker to open", Duration::from_secs(10), || {
        engine.metric("flowgate_sink_breakers_open{pipeline=\"p\",sink=\"api\"}") == 1.0
    });
    poll_until("the opening to be logged", Duration::from_secs(5), || engine.log().contains("circuit breaker opened"));
    // Nothing is committed while the target is down: the backlog shows as lag.
    poll_until("lag to show the backlog", Duration::from_secs(5), || {
        engine.metric("flowgate_pipeline_lag{pipeline=\"p\",topic=\"in\",partition=\"0\"}") > 0.0
    });
    // `/v1/stats` shows what the sink is doing while the target is down.
    let (_, stats) = engine.http("GET", "/v1/stats", b"");
    let stats: serde_json::Value = serde_json::from_str(&stats).unwrap();
    let sink = &stats["pipeline_sinks"][0];
    assert_eq!((sink["pipeline"].as_str(), sink["sink"].as_str()), (Some("p"), Some("api")), "{stats}");
    assert_ne!(sink["breaker"], "closed", "{sink}");
    assert!(sink["retrying_events"].as_u64().unwrap() > 0, "{sink}");
    assert!(sink["last_error"].as_str().unwrap().contains("503"), "{sink}");
    poll_until("everything to be delivered once the target is back", Duration::from_secs(30), || {
        target.delivered.lock().unwrap().len() >= 100
    });
    assert_eq!(*target.delivered.lock().unwrap(), (0..100).collect::<Vec<u64>>(), "each once, in order");
    // 3 failures open it; over the 3 s outage it probes after 0.4, 0.8 and 1 s: a handful
    // of requests, where retrying every 10-100 ms would have made dozens.
    let failed_requests = refused.load(Ordering::SeqCst);
    assert!((3..=10).contains(&failed_requests), "{failed_requests} requests while the target was down");
    assert!(engine.metric("flowgate_sink_breaker_transitions_total{pipeline=\"p\",sink=\"api\",to=\"open\"}") >= 1.0);
    assert_eq!(engine.metric("flowgate_sink_breakers_open{pipeline=\"p\",sink=\"api\"}"), 0.0, "closed again");
    assert!(topic_is_empty_or_missing(&engine, "_dlq"), "nothing was dead-lettered");
}

fn topic_is_empty_or_missing(engine: &EngineProcess, topic: &str) -> bool {
    let (status, body) = engine.http("GET", &format!("/v1/topics/{topic}/events?from=0&limit=10"), b"");
    status != 200 || serde_json::from_str::<serde_json::Value>(&body).unwrap()["events"].as_array().unwrap().is_empty()
}

#[test]
fn the_batch_size_adaptive_batching_learned_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("adaptive.toml");
    std::fs::write(
        &config,
        r#"
[log]
default_partitions = 1
[[pipelines]]
name = "p"
topics = ["in"]
commit_interval_ms = 50
[[pipelines.sinks]]
name = "out"
type = "file"
path = "out"
batch = { adaptive = true, max_events = 100000, min_events = 10, target_latency_ms = 1000, max_wait_ms = 5 }
"#,
    )
    .unwrap();
    let mut engine = EngineProcess::start_with(dir.path(), Some(&config), &[]);
    let target = |engine: &EngineProcess| -> Option<u64> {
        let (_, stats) = engine.http("GET", "/v1/stats", b"");
        serde_json::from_str::<serde_json::Value>(&stats).ok()?["pipeline_sinks"][0]["batch_target"].as_u64()
    };
    poll_until("the sink to start", Duration::from_secs(30), || target(&engine).is_some());
    assert_eq!(target(&engine), Some(25_000), "a quarter of max_events to begin with");
    // Fast writes of full batches grow the target by a quarter each.
    let lines: Vec<String> = (0..10_000).map(|n| format!(r#"{{"n":{n}}}"#)).collect();
    for _ in 0..12 {
        engine.http("POST", "/v1/topics/in/events", lines.join("\n").as_bytes());
    }
    poll_until("the target to grow", Duration::from_secs(30), || target(&engine).is_some_and(|t| t > 25_000));
    let ckpt = dir.path().join("pipelines/p/in-0.ckpt");
    // (offset, batch target) of the checkpoint.
    let checkpointed = || -> Option<(u64, u64)> {
        let header = common::checkpoint_header(&ckpt)?;
        Some((header["offset"].as_u64()?, header["sinks"][0]["batch_target"].as_u64()?))
    };
    // Everything written and checkpointed: a restart has nothing to replay, so nothing
    // moves the target before it is read back.
    poll_until("a checkpoint past every event, with the grown target", Duration::from_secs(30), || {
        checkpointed().is_some_and(|(offset, t)| offset == 120_000 && t > 25_000)
    });
    engine.kill9();
    let learned = checkpointed().unwrap().1;
    let engine = engine.restart();
    poll_until("the sink to start", Duration::from_secs(30), || target(&engine).is_some());
    assert_eq!(target(&engine), Some(learned), "starts from what it learned, not from a quarter of max_events");
}

#[test]
fn dead_letters_of_a_sink_survive_sigkill_right_after_the_checkpoint_and_nothing_is_sent_again() {
    let decide: Arc<Decide> = Arc::new(|_, events: &[u64]| {
        let results: Vec<serde_json::Value> = events
            .iter()
            .enumerate()
            .filter(|(_, n)| *n % 10 == 3)
            .map(|(i, _)| serde_json::json!({"index": i, "status": 422, "error": "unprocessable"}))
            .collect();
        (200, serde_json::json!({ "results": results }).to_string())
    });
    let target = Target::start(decide);
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), target.port);
    let mut engine = EngineProcess::start_with(dir.path(), Some(&config), &[("FLOWGATE_LOG__FSYNC", "never")]);
    let lines: Vec<String> = (0..100).map(|n| format!(r#"{{"n":{n}}}"#)).collect();
    engine.http("POST", "/v1/topics/in/events", lines.join("\n").as_bytes());
    let ckpt = dir.path().join("pipelines/p/in-0.ckpt");
    poll_until("a checkpoint past every event", Duration::from_secs(30), || {
        common::checkpoint_header(&ckpt).is_some_and(|h| h["offset"] == 100)
    });
    // The worst moment for dead letters: the checkpoint that counts them is written, and
    // the process dies before anything else happens.
    engine.kill9();
    let engine = engine.restart();
    let refused: Vec<u64> = (0..100).filter(|n| n % 10 == 3).collect();
    let dead = poll_until_dlq(&engine, refused.len());
    let offsets: Vec<u64> = dead.iter().map(|d| d["offset"].as_u64().unwrap()).collect();
    assert_eq!(offsets, refused, "every dead letter the checkpoint counted is there, once");
    // The restarted pipeline goes on from the checkpoint: nothing below it is sent again.
    let more: Vec<String> = (100..110).map(|n| format!(r#"{{"n":{n}}}"#)).collect();
    engine.http("POST", "/v1/topics/in/events", more.join("\n").as_bytes());
    let expected: Vec<u64> = (0..110).filter(|n| n % 10 != 3).collect();
    poll_until("the later events", Duration::from_secs(30), || {
        target.delivered.lock().unwrap().len() >= expected.len()
    });
    assert_eq!(*target.delivered.lock().unwrap(), expected, "each once, in order, across the SIGKILL");
    let _ = poll_until_dlq(&engine, refused.len() + 1);
}

#[test]
fn sigterm_while_a_sink_breaker_is_open_for_a_long_time_ends_within_grace_plus_flush() {
    let decide: Arc<Decide> = Arc::new(|_, _: &[u64]| (503, "{}".to_owned()));
    let target = Target::start(decide);
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), target.port);
    let text = std::fs::read_to_string(&config).unwrap().replace(
        "retry = { initial_backoff_ms = 10, max_backoff_ms = 100 }",
        "retry = { initial_backoff_ms = 10, max_backoff_ms = 100 }\nbreaker = { consecutive_failures = 1, open_ms = 3600000, max_open_ms = 3600000 }",
    );
    std::fs::write(&config, text).unwrap();
    let env = [("FLOWGATE_SERVER__SHUTDOWN_GRACE_MS", "1000"), ("FLOWGATE_SERVER__SHUTDOWN_FLUSH_MS", "1000")];
    let mut engine = EngineProcess::start_with(dir.path(), Some(&config), &env);
    engine.http("POST", "/v1/topics/in/events", br#"{"n":1}"#);
    poll_until("the breaker to open for an hour", Duration::from_secs(10), || {
        engine.metric("flowgate_sink_breakers_open{pipeline=\"p\",sink=\"api\"}") == 1.0
    });
    let started = std::time::Instant::now();
    engine.terminate();
    assert!(started.elapsed() < Duration::from_secs(6), "shutdown took {:?}", started.elapsed());
}

/// A target with `workers` workers, each taking `service` per request; more requests
/// wait for a worker, so past `workers` in flight latency grows and throughput does not.
/// Counts the requests in flight at once.
struct QueueingTarget {
    free: Mutex<usize>,
    freed: std::sync::Condvar,
    service: Duration,
    in_flight: AtomicU64,
    most_in_flight: AtomicU64,
}

impl QueueingTarget {
    fn handle(&self) -> (u16, String) {
        let now = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        self.most_in_flight.fetch_max(now, Ordering::SeqCst);
        let mut free = self.freed.wait_while(self.free.lock().unwrap(), |f| *f == 0).unwrap();
        *free -= 1;
        drop(free);
        std::thread::sleep(self.service);
        *self.free.lock().unwrap() += 1;
        self.freed.notify_one();
        self.in_flight.fetch_sub(1, Ordering::SeqCst);
        (200, "{}".to_owned())
    }
}

#[test]
fn the_concurrency_limit_settles_near_the_targets_knee_and_a_restart_starts_from_it() {
    // 2 workers of 25 ms: more than 2 requests in flight only wait in its queue.
    let queueing = Arc::new(QueueingTarget {
        free: Mutex::new(2),
        freed: std::sync::Condvar::new(),
        service: Duration::from_millis(25),
        in_flight: AtomicU64::new(0),
        most_in_flight: AtomicU64::new(0),
    });
    let q = queueing.clone();
    let target = Target::start(Arc::new(move |_, _: &[u64]| q.handle()));
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), target.port);
    // 8 source partitions: up to 8 writes could be in flight.
    let text = std::fs::read_to_string(&config).unwrap().replace("default_partitions = 1", "default_partitions = 8");
    std::fs::write(&config, text).unwrap();
    let mut engine = EngineProcess::start_with(dir.path(), Some(&config), &[]);
    let controller = |engine: &EngineProcess| -> Option<serde_json::Value> {
        let (_, stats) = engine.http("GET", "/v1/stats", b"");
        let stats: serde_json::Value = serde_json::from_str(&stats).ok()?;
        let c = stats["sink_controllers"][0].clone();
        (c["sink"] == "api").then_some(c)
    };
    poll_until("the sink's controller", Duration::from_secs(30), || controller(&engine).is_some());
    assert_eq!(controller(&engine).unwrap()["concurrency_limit"], 1, "a first start begins at 1");
    // 16 000 events, about 10 s of the target's capacity (80 requests of 20 a second,
    // 1600 events/s) at 1 in flight, 5 s at 2: a backlog on every partition.
    let lines: Vec<String> = (0..500).map(|n| format!(r#"{{"n":{n}}}"#)).collect();
    let body = lines.join("\n");
    for _ in 0..32 {
        let (status, answer) = engine.http("POST", "/v1/topics/in/events", body.as_bytes());
        assert_eq!(status, 200, "{answer}");
    }
    poll_until("the limit to grow", Duration::from_secs(20), || {
        controller(&engine).is_some_and(|c| c["concurrency_limit"].as_u64().unwrap() >= 2)
    });
    let mut limits = Vec::new();
    for _ in 0..20 {
        limits.push(controller(&engine).unwrap()["concurrency_limit"].as_u64().unwrap());
        std::thread::sleep(Duration::from_millis(100));
    }
    limits.sort_unstable();
    let (median, p90) = (limits[limits.len() / 2], limits[limits.len() * 9 / 10]);
    assert!((2..=4).contains(&median) && p90 <= 5, "the limit stays near the knee of 2 (of 8 possible): {limits:?}");
    let c = controller(&engine).unwrap();
    assert!(c["latency_floor_ms"].as_f64().unwrap() >= 25.0, "{c}");
    assert!(engine.metric("flowgate_sink_concurrency_limit{pipeline=\"p\",sink=\"api\"}") >= 1.0);
    poll_until("every event delivered", Duration::from_secs(60), || target.delivered.lock().unwrap().len() >= 16_000);
    // Restart from a checkpoint that holds the learned limit. With nothing left to
    // write, only the checkpoint can move the limit of the restarted engine.
    let ckpt = dir.path().join("pipelines/p/in-0.ckpt");
    let checkpointed =
        || -> Option<u64> { common::checkpoint_header(&ckpt)?["sinks"][0]["concurrency_limit"].as_u64() };
    let live = controller(&engine).unwrap()["concurrency_limit"].as_u64().unwrap();
    assert!(live >= 2, "learned more than the first 1: {live}");
    poll_until("a checkpoint with the learned limit", Duration::from_secs(10), || checkpointed() == Some(live));
    engine.kill9();
    let engine = engine.restart();
    poll_until("the learned limit to be resumed", Duration::from_secs(30), || {
        controller(&engine).is_some_and(|c| c["concurrency_limit"].as_u64() == Some(live))
    });
    assert!(queueing.most_in_flight.load(Ordering::SeqCst) >= 2);
}
