//! Hot reload in a real engine process under load: `POST /v1/reload`, SIGHUP and
//! `--watch-config` add, change and remove pipelines and alert rules while events keep
//! coming; an invalid config is refused and the old one keeps running; nothing
//! acknowledged is lost and the file sinks write every event once.

mod common;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{device_batch, poll_until, EngineProcess};
use flowgate_client::Client;
use flowgate_core::ProducerStamp;
use serde_json::Value;

fn pipeline(name: &str, extra: &str) -> String {
    format!(
        r#"
[[pipelines]]
name = "{name}"
topics = ["in"]
commit_interval_ms = 100
{extra}
[[pipelines.sinks]]
name = "out"
type = "file"
path = "out-{name}"
batch = {{ max_events = 200, max_wait_ms = 20 }}
"#
    )
}

const SLOW: &str = r#"[[pipelines.processors]]
type = "remap"
source = '.h = length(encode_json(encode_json(encode_json(encode_json(encode_json(encode_json(encode_json(encode_json(encode_json(.))))))))))'
"#;

const MARK: &str = r#"[[pipelines.processors]]
type = "remap"
source = '.reloaded = true'
"#;

/// Sends batches of 100 new ids to topic `in` until stopped; counts the acknowledged.
struct Producer {
    stop: Arc<AtomicBool>,
    acked: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Producer {
    fn start(addr: String) -> Producer {
        let (stop, acked) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicU64::new(0)));
        let (s, a) = (stop.clone(), acked.clone());
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Runtime::new().unwrap();
            rt.block_on(async {
                let client = Client::connect(&addr).await.unwrap();
                let mut next = 0u64;
                while !s.load(Ordering::Acquire) {
                    client.produce("in", device_batch(next..next + 100), ProducerStamp::default()).await.unwrap();
                    next += 100;
                    a.store(next, Ordering::Release);
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
            });
        });
        Producer { stop, acked, thread: Some(thread) }
    }

    /// Ids acknowledged so far: 0..n.
    fn acked(&self) -> u64 {
        self.acked.load(Ordering::Acquire)
    }

    fn finish(mut self) -> u64 {
        self.stop.store(true, Ordering::Release);
        self.thread.take().unwrap().join().expect("the producer never failed");
        self.acked()
    }
}

fn reload(engine: &EngineProcess) -> (u16, Value) {
    let (status, body) = engine.http("POST", "/v1/reload", b"");
    (status, serde_json::from_str(&body).unwrap_or_else(|e| panic!("{status} {body}: {e}")))
}

fn names(v: &Value) -> Vec<&str> {
    let mut names: Vec<&str> = v.as_array().unwrap().iter().map(|n| n.as_str().unwrap()).collect();
    names.sort_unstable();
    names
}

/// The pipelines the engine runs workers for, from `/v1/stats`.
fn running_pipelines(engine: &EngineProcess) -> Vec<String> {
    let (_, body) = engine.http("GET", "/v1/stats", b"");
    let stats: Value = serde_json::from_str(&body).unwrap();
    let mut names: Vec<String> = stats["pipeline_workers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["pipeline"].as_str().unwrap().to_owned())
        .collect();
    names.sort_unstable();
    names.dedup();
    names
}

/// How often a pipeline's workers were started, from the engine's log.
fn worker_starts(engine: &EngineProcess, pipeline: &str) -> usize {
    let needle = format!("pipeline={pipeline} ");
    engine.log().lines().filter(|l| l.contains("pipeline worker started") && l.contains(&needle)).count()
}

fn write(path: &Path, text: &str) {
    // Written whole and renamed into place, as editors and config managers do.
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

fn wait_until_written(dir: &Path, ids: u64) {
    poll_until(&format!("{} to hold {ids} ids", dir.display()), Duration::from_secs(60), || {
        common::file_sink_ids(dir, "-").0.len() as u64 >= ids
    });
}

/// Every id in 0..n exactly once.
fn assert_exactly_once(dir: &Path, n: u64) {
    let (counts, _) = common::file_sink_ids(dir, "-");
    let missing: Vec<u64> = (0..n).filter(|id| !counts.contains_key(id)).take(5).collect();
    assert!(missing.is_empty(), "{}: acknowledged ids missing: {missing:?}", dir.display());
    let repeated: Vec<(&u64, &usize)> = counts.iter().filter(|(_, c)| **c != 1).take(5).collect();
    assert!(repeated.is_empty(), "{}: ids written more than once: {repeated:?}", dir.display());
    assert_eq!(counts.len() as u64, n, "{}: ids that were never sent", dir.display());
}

#[test]
fn pipelines_and_alert_rules_change_under_load_and_nothing_is_lost() {
    let dir = tempfile::tempdir().unwrap();
    let config: PathBuf = dir.path().join("flowgate.toml");
    let v1 = format!("{}{}", pipeline("a", ""), pipeline("b", ""));
    write(&config, &v1);
    let engine = EngineProcess::start_with(dir.path(), Some(&config), &[("FLOWGATE_LOG__DEFAULT_PARTITIONS", "2")]);
    let producer = Producer::start(engine.binary.to_string());
    let (out_a, out_b, out_c) = (dir.path().join("out-a"), dir.path().join("out-b"), dir.path().join("out-c"));
    wait_until_written(&out_a, 2_000);
    assert_eq!(worker_starts(&engine, "b"), 2, "one worker per partition");

    // a changes (a processor marks what it writes from now on), b stays, c and an alert
    // rule are new, and [ingest] changes, which takes a restart.
    let rule = "[[alerts]]\nname = \"lagging\"\nmetric = \"flowgate_pipeline_lag\"\ncondition = \"> 1e12\"\n";
    let v2 = format!(
        "[ingest]\nmax_connections = 999\n{}{}{}{rule}",
        pipeline("a", MARK),
        pipeline("b", ""),
        pipeline("c", "start = \"earliest\"")
    );
    write(&config, &v2);
    let (status, report) = reload(&engine);
    assert_eq!(status, 200, "{report}");
    assert_eq!(names(&report["pipelines"]["restarted"]), ["a"], "{report}");
    assert_eq!(names(&report["pipelines"]["unchanged"]), ["b"], "{report}");
    assert_eq!(names(&report["pipelines"]["added"]), ["c"], "{report}");
    assert_eq!(names(&report["pipelines"]["cut_off"]), Vec::<&str>::new(), "{report}");
    assert_eq!(names(&report["alerts"]["added"]), ["lagging"], "{report}");
    assert_eq!(names(&report["restart_required"]), ["ingest"], "{report}");
    assert_eq!(running_pipelines(&engine), ["a", "b", "c"]);
    let (_, alerts) = engine.http("GET", "/v1/alerts", b"");
    assert_eq!(serde_json::from_str::<Value>(&alerts).unwrap()["rules"], 1);
    let after_change = producer.acked();
    wait_until_written(&out_c, after_change);

    // A config that does not compile is refused, named, and changes nothing.
    let broken = v2.replace(".reloaded = true", ".reloaded = ");
    write(&config, &broken);
    let (status, refused) = reload(&engine);
    assert_eq!(status, 400, "{refused}");
    let error = refused["error"].as_str().unwrap();
    assert!(error.contains("pipeline 'a'") && error.contains("old one stays"), "{error}");
    assert_eq!(running_pipelines(&engine), ["a", "b", "c"]);
    let refusals = engine.metric("flowgate_config_reloads_total{outcome=\"refused\"}");
    assert_eq!(refusals, 1.0);

    // SIGHUP: b goes; a and c stay as they are.
    let v3 = format!("{}{}{rule}", pipeline("a", MARK), pipeline("c", "start = \"earliest\""));
    write(&config, &v3);
    engine.signal("HUP");
    poll_until("b to be removed", Duration::from_secs(30), || running_pipelines(&engine) == ["a", "c"]);
    poll_until("the reload to be logged", Duration::from_secs(10), || engine.log().contains("config reloaded"));
    assert_eq!(engine.metric("flowgate_config_reloads_total{outcome=\"applied\"}"), 2.0);
    let after_removal = producer.acked();
    poll_until("more events after the removal", Duration::from_secs(30), || producer.acked() >= after_removal + 5_000);

    let sent = producer.finish();
    assert!(sent > after_change, "events kept coming through the reloads");
    wait_until_written(&out_a, sent);
    wait_until_written(&out_c, sent);
    let mut engine = engine;
    assert!(engine.terminate().success(), "{}", engine.log());
    assert_exactly_once(&out_a, sent);
    assert_exactly_once(&out_c, sent);
    // b wrote each event it got to once, and was never restarted while it ran.
    let (b, _) = common::file_sink_ids(&out_b, "-");
    assert!(b.values().all(|&n| n == 1) && b.len() as u64 >= after_change.min(2_000));
    assert_eq!(worker_starts(&engine, "b"), 2, "b ran untouched until removed");
    assert_eq!(worker_starts(&engine, "c"), 2, "c ran untouched after it was added");
    // a's changed processor took effect: what it wrote after the change is marked,
    // and the last events it wrote all are.
    let (_, marked) = common::file_sink_ids(&out_a, "reloaded");
    let marked: std::collections::HashSet<u64> = marked.into_iter().collect();
    assert!(marked.contains(&(sent - 1)), "a's last event passed through the new processor");
    assert!((after_change..sent).all(|id| marked.contains(&id)), "everything after the change is marked");
}

#[test]
fn watch_config_applies_a_changed_file_and_refuses_a_broken_one() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("flowgate.toml");
    write(&config, &pipeline("a", ""));
    let engine = EngineProcess::start_with_args(dir.path(), Some(&config), &["--watch-config"], &[]);
    assert_eq!(running_pipelines(&engine), ["a"]);
    write(&config, &format!("{}{}", pipeline("a", ""), pipeline("b", "")));
    poll_until("the watched change to add b", Duration::from_secs(30), || running_pipelines(&engine) == ["a", "b"]);
    assert_eq!(worker_starts(&engine, "a"), 1, "a kept running");
    write(&config, "[[pipelines]]\nname = ");
    poll_until("the broken file to be refused", Duration::from_secs(30), || {
        engine.log().contains("config reload refused")
    });
    assert_eq!(running_pipelines(&engine), ["a", "b"], "the old config stays");
    // A file past 16 MiB is not read at all (the watcher would hold it whole).
    let huge = format!("{}#{}\n", pipeline("a", ""), "x".repeat(17 << 20));
    write(&config, &huge);
    poll_until("the oversized file to be refused", Duration::from_secs(30), || {
        engine.log().contains("not a regular file of at most 16 MiB")
    });
    assert_eq!(running_pipelines(&engine), ["a", "b"], "the old config stays");
    let (status, _) = engine.http("GET", "/ready", b"");
    assert_eq!(status, 200);
    // An engine started from the embedded default has nothing to watch but reloads it.
    let plain = EngineProcess::start(&dir.path().join("plain"), &[]);
    let (status, report) = reload(&plain);
    assert_eq!(status, 200, "{report}");
    assert_eq!(report["restart_required"], serde_json::json!([]), "{report}");
}

/// `a`: dedup by `by` into a file; `slow`: an HTTP sink at `target`.
fn stateful_and_slow(by: &str, a_name: &str, target: std::net::SocketAddr, slow_batch: u32) -> String {
    format!(
        r#"
[[pipelines]]
name = "{a_name}"
topics = ["in"]
commit_interval_ms = 100
[[pipelines.processors]]
name = "d"
type = "dedup"
by = "{by}"
[[pipelines.sinks]]
name = "out"
type = "file"
path = "out-{a_name}"
batch = {{ max_events = 200, max_wait_ms = 20 }}

[[pipelines]]
name = "slow"
topics = ["in"]
[[pipelines.sinks]]
name = "remote"
type = "http"
url = "http://{target}/ingest"
batch = {{ max_events = {slow_batch}, max_wait_ms = 20 }}
"#
    )
}

/// Workers of `pipeline` reading `topic` partition 0, from `/v1/stats`.
fn workers_of(engine: &EngineProcess, pipeline: &str) -> usize {
    let (_, body) = engine.http("GET", "/v1/stats", b"");
    let stats: Value = serde_json::from_str(&body).unwrap();
    stats["pipeline_workers"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|w| w["pipeline"] == pipeline && w["topic"] == "in" && w["partition"] == 0)
        .count()
}

#[test]
fn a_reload_refuses_what_would_not_start_outlives_its_client_and_yields_to_shutdown() {
    // A peer that accepts and never answers: the `slow` pipeline's writes hang.
    let black_hole = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let target = black_hole.local_addr().unwrap();
    let held = std::thread::spawn(move || black_hole.incoming().take(16).collect::<Vec<_>>());
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("flowgate.toml");
    write(&config, &stateful_and_slow("id", "a", target, 100));
    let mut engine =
        EngineProcess::start_with(dir.path(), Some(&config), &[("FLOWGATE_SERVER__SHUTDOWN_GRACE_MS", "2000")]);
    let producer = Producer::start(engine.binary.to_string());
    wait_until_written(&dir.path().join("out-a"), 1_000);

    // The dedup's checkpointed state was kept under `by = "id"`: under another field it
    // would mean something else, and the partition would not start. Refused, unchanged.
    write(&config, &stateful_and_slow("device", "a", target, 100));
    let (status, refused) = reload(&engine);
    assert_eq!(status, 400, "{refused}");
    assert!(refused["error"].as_str().unwrap().contains("discard_processor_state"), "{refused}");
    // Renaming `a` would start a pipeline afresh where `a` left off: refused, named.
    write(&config, &stateful_and_slow("id", "a2", target, 100));
    let (status, refused) = reload(&engine);
    assert_eq!(status, 400, "{refused}");
    assert!(refused["error"].as_str().unwrap().contains("'a' renamed"), "{refused}");
    assert_eq!(running_pipelines(&engine), ["a", "slow"]);

    // A client that hangs up at once does not stop the reload half way: `slow` (its
    // write hangs) is cut off after the grace period and runs again, once.
    write(&config, &stateful_and_slow("id", "a", target, 50));
    {
        use std::io::Write;
        let mut hang_up = std::net::TcpStream::connect(engine.http).unwrap();
        write!(hang_up, "POST /v1/reload HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n").unwrap();
        // Hung up once the reload is under way (stopping `slow` takes the grace period).
        poll_until("the reload to start", Duration::from_secs(10), || engine.log().contains("applying the new config"));
    }
    poll_until("the reload to finish without its client", Duration::from_secs(30), || {
        engine.log().contains("config reloaded")
    });
    assert!(engine.log().contains("cut off"), "the stalled pipeline was cut off");
    assert_eq!(workers_of(&engine, "slow"), 1, "one worker of slow per partition, not two");
    assert_eq!(workers_of(&engine, "a"), 1);
    let before = producer.acked();
    poll_until("a to keep writing", Duration::from_secs(30), || {
        common::file_sink_ids(&dir.path().join("out-a"), "-").0.len() as u64 >= before
    });

    // A SIGHUP reload that waits on the stalled pipeline does not hold up shutdown.
    write(&config, &stateful_and_slow("id", "a", target, 25));
    engine.signal("HUP");
    poll_until("the reload to start", Duration::from_secs(10), || engine.log().contains("reloading the config"));
    let sent = producer.finish();
    let asked = std::time::Instant::now();
    let status = engine.terminate();
    assert!(asked.elapsed() < Duration::from_secs(6), "shutdown waited {:?} for the reload", asked.elapsed());
    // Cut off (the stalled sink) is exit code 1; what matters is that `a` lost nothing.
    assert!(status.code().is_some(), "{status:?}");
    let restarted = engine.restart();
    wait_until_written(&dir.path().join("out-a"), sent);
    assert_exactly_once(&dir.path().join("out-a"), sent);
    drop(restarted);
    drop(held);
}

#[test]
fn a_reordered_config_restarts_nothing_and_a_kill_during_a_reload_loses_and_repeats_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("flowgate.toml");
    // `a` hashes every event a few times over, so that on a fast machine it is still
    // writing its backlog when the kill comes.
    let slow = |extra: &str| pipeline("a", &format!("{SLOW}{extra}"));
    write(&config, &format!("{}{}", slow(""), pipeline("b", "")));
    let engine = EngineProcess::start_with(dir.path(), Some(&config), &[("FLOWGATE_LOG__DEFAULT_PARTITIONS", "2")]);
    // The same pipelines in another order: nothing to restart.
    write(&config, &format!("{}{}", pipeline("b", ""), slow("")));
    let (status, report) = reload(&engine);
    assert_eq!(status, 200, "{report}");
    assert_eq!(names(&report["pipelines"]["unchanged"]), ["a", "b"], "{report}");
    assert_eq!(report["pipelines"]["restarted"], serde_json::json!([]), "{report}");

    // A backlog, so that `a` is writing when it is asked to stop for a change.
    const N: u64 = 200_000;
    let rt = tokio::runtime::Runtime::new().unwrap();
    let addr = engine.binary.to_string();
    rt.block_on(async {
        let client = Client::connect(&addr).await.unwrap();
        for start in (0..N).step_by(1000) {
            client.produce("in", device_batch(start..start + 1000), ProducerStamp::default()).await.unwrap();
        }
    });
    let out_a = dir.path().join("out-a");
    poll_until("a to be writing", Duration::from_secs(30), || !common::file_sink_ids(&out_a, "-").0.is_empty());
    write(&config, &format!("{}{}", pipeline("b", ""), slow(MARK)));
    engine.signal("HUP");
    poll_until("the reload to be under way", Duration::from_secs(10), || {
        engine.log().contains("applying the new config")
    });
    // SIGKILL in the middle of it: `a` stopping (or starting again), `b` writing.
    let mut engine = engine;
    engine.kill9();
    let written_at_kill = common::file_sink_ids(&out_a, "-").0.len() as u64;
    let engine = engine.restart();
    wait_until_written(&out_a, N);
    wait_until_written(&dir.path().join("out-b"), N);
    assert!(written_at_kill < N, "the kill came while a was writing: {written_at_kill} of {N}");
    assert_exactly_once(&out_a, N);
    assert_exactly_once(&dir.path().join("out-b"), N);
    // The restart ran the new config: what `a` wrote after it is marked.
    let (_, marked) = common::file_sink_ids(&out_a, "reloaded");
    assert!(!marked.is_empty(), "a ran its new processor after the restart");
    drop(engine);
}
