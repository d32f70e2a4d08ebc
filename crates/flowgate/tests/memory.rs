//! The memory budget against a real engine process: a pipeline with a huge number of open
//! windows (one per event) behind a slow HTTP sink, producers sending as fast as they
//! can. Resident memory stays within the budget plus the fixed overhead docs/memory.md
//! names, producers are pushed back (they wait, or are refused with BUSY under
//! `memory_policy = "reject"`), and every acknowledged event is in the log.

mod common;

use std::io::{BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{poll_until, EngineProcess};

/// The budget the engine runs with.
const LIMIT: u64 = 96 << 20;
/// What the process may hold beyond the budget (docs/memory.md: code, stacks, base
/// buffers, indexes, allocator slack; the tests run a debug build, whose code is larger).
const OVERHEAD: u64 = 80 << 20;
/// How long the producers send.
const PRODUCE_FOR: Duration = Duration::from_secs(20);

/// An HTTP/1.1 target that takes its time over every request.
fn slow_target() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { return };
            std::thread::spawn(move || serve_slowly(stream));
        }
    });
    port
}

fn serve_slowly(stream: TcpStream) {
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut out = stream;
    while common::read_request(&mut reader).is_some() {
        std::thread::sleep(Duration::from_millis(20));
        if out.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n").is_err() {
            return;
        }
    }
}

fn write_config(dir: &Path, policy: &str, sink_port: u16) -> std::path::PathBuf {
    let path = dir.join("memory.toml");
    std::fs::write(
        &path,
        format!(
            r#"
[server]
memory_limit_bytes = {LIMIT}
memory_policy = "{policy}"
[log]
default_partitions = 1
[ingest]
max_frame_bytes = 4194304
max_buffered_bytes = 16777216
[[pipelines]]
name = "windows"
topics = ["in"]
commit_interval_ms = 200
[[pipelines.processors]]
type = "aggregate"
group_by = "id"
window = {{ type = "tumbling", size_ms = 10000 }}
idle_advance_ms = 500
max_groups = 100000000
max_open_windows = 100000000
functions = [{{ fn = "count" }}]
[[pipelines.sinks]]
name = "slow"
type = "http"
url = "http://127.0.0.1:{sink_port}/ingest"
batch = {{ max_events = 1000, max_bytes = 1048576, max_wait_ms = 50 }}
"#
        ),
    )
    .unwrap();
    path
}

/// What the producers saw.
#[derive(Debug, Default)]
struct Produced {
    /// Events the engine acknowledged.
    acked: AtomicU64,
    /// Events of requests whose outcome is unknown (unanswered when the producers
    /// stopped, or the connection was lost).
    unknown: AtomicU64,
    /// Requests refused with BUSY.
    busy: AtomicU64,
    /// The longest a request waited for its answer, ms.
    slowest_ms: AtomicU64,
    /// When the last answer came, ms after the producers started.
    last_answer_ms: AtomicU64,
}

/// Connections sending batches of events with a unique id each, as fast as they are
/// answered, for `PRODUCE_FOR`.
fn produce(addr: std::net::SocketAddr, connections: usize) -> Arc<Produced> {
    let produced = Arc::new(Produced::default());
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    runtime.block_on(async {
        let mut tasks = Vec::new();
        for c in 0..connections {
            let (produced, stop) = (produced.clone(), stop.clone());
            tasks.push(tokio::spawn(async move {
                let mut client = flowgate_client::Client::connect(&addr.to_string()).await.unwrap();
                let mut seq = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let now = flowgate_core::time::now_ms();
                    let mut b = flowgate_core::BatchBuilder::new();
                    for _ in 0..2000 {
                        b.push_payload(now, None, format!(r#"{{"id":"c{c}-{seq}","n":{seq}}}"#).as_bytes());
                        seq += 1;
                    }
                    let bytes = b.finish(flowgate_core::Codec::None, Default::default()).unwrap().bytes;
                    let sent = Instant::now();
                    produced.unknown.fetch_add(2000, Ordering::Relaxed);
                    let result = client.produce("in", bytes.into(), Default::default()).await;
                    produced.slowest_ms.fetch_max(sent.elapsed().as_millis() as u64, Ordering::Relaxed);
                    produced.last_answer_ms.fetch_max(started.elapsed().as_millis() as u64, Ordering::Relaxed);
                    if !matches!(
                        result,
                        Err(flowgate_client::ClientError::Io { .. } | flowgate_client::ClientError::Disconnected(_))
                    ) {
                        produced.unknown.fetch_sub(2000, Ordering::Relaxed);
                    }
                    match result {
                        Ok(acks) => {
                            let n: u64 = acks.iter().map(|a| u64::from(a.record_count)).sum();
                            produced.acked.fetch_add(n, Ordering::Relaxed);
                        }
                        Err(flowgate_client::ClientError::Server {
                            code: flowgate_protocol::ErrorCode::Busy, ..
                        }) => {
                            produced.busy.fetch_add(1, Ordering::Relaxed);
                            tokio::time::sleep(Duration::from_millis(5)).await;
                        }
                        Err(e) => {
                            assert!(e.is_retriable(), "{e}");
                            client = flowgate_client::Client::connect(&addr.to_string()).await.unwrap();
                        }
                    }
                }
            }));
        }
        tokio::time::sleep(PRODUCE_FOR).await;
        stop.store(true, Ordering::Relaxed);
        // A request the engine holds back is answered only once memory frees up, which
        // may take the pipeline longer than this test: stop waiting for it (it counts as
        // unknown: stored or not).
        for t in tasks {
            t.abort();
            let _ = t.await;
        }
    });
    runtime.shutdown_background();
    produced
}

fn stored(engine: &EngineProcess) -> u64 {
    let (status, body) = engine.http("GET", "/v1/topics", b"");
    assert_eq!(status, 200, "{body}");
    let topics: serde_json::Value = serde_json::from_str(&body).unwrap();
    topics["topics"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|t| t["name"] == "in")
        .flat_map(|t| t["partitions"].as_array().unwrap().iter())
        .map(|p| p["end_offset"].as_u64().unwrap())
        .sum()
}

fn run(policy: &str) -> (tempfile::TempDir, EngineProcess, Arc<Produced>) {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), policy, slow_target());
    let engine = EngineProcess::start_with(&dir.path().join("data"), Some(&config), &[]);
    let produced = produce(engine.binary, 3);
    let (acked, unknown) = (produced.acked.load(Ordering::Relaxed), produced.unknown.load(Ordering::Relaxed));
    let stored = stored(&engine);
    let peak_rss = engine.peak_rss();
    let stats: serde_json::Value = serde_json::from_str(&engine.http("GET", "/v1/stats", b"").1).unwrap();
    eprintln!("{policy}: {produced:?}, stored {stored}, peak RSS {peak_rss}, memory {}", stats["memory"]);
    assert!(acked > 0, "the producers got events in");
    assert!(stored >= acked, "every acknowledged event is in the log: {stored} stored, {acked} acknowledged");
    assert!(stored <= acked + unknown, "nothing refused was stored: {stored} stored, {acked} acknowledged");
    assert!(peak_rss <= LIMIT + OVERHEAD, "peak RSS {peak_rss} over the budget {LIMIT} plus {OVERHEAD}");
    let peak_charged = stats["memory"]["peak_bytes"].as_u64().unwrap();
    assert!(peak_charged >= stats["memory"]["soft_limit_bytes"].as_u64().unwrap(), "the budget came under pressure");
    (dir, engine, produced)
}

#[test]
fn many_open_windows_and_a_slow_sink_under_max_ingest_stay_within_the_budget_and_block_producers() {
    let (_dir, engine, produced) = run("block");
    assert!(engine.metric("flowgate_memory_ingest_pauses_total{path=\"binary\"}") > 0.0, "ingest was pushed back");
    // Held back: the requests in flight when the producers stopped had waited a while.
    let held_ms = (PRODUCE_FOR.as_millis() as u64).saturating_sub(produced.last_answer_ms.load(Ordering::Relaxed));
    assert!(held_ms >= 1000 || produced.slowest_ms.load(Ordering::Relaxed) >= 1000, "{produced:?}");
    assert_eq!(produced.busy.load(Ordering::Relaxed), 0, "block refuses nothing");
    poll_until("the engine to stay up", Duration::from_secs(5), || engine.http("GET", "/health", b"").0 == 200);
}

#[test]
fn many_open_windows_and_a_slow_sink_under_max_ingest_stay_within_the_budget_and_refuse_producers() {
    let (_dir, engine, produced) = run("reject");
    assert!(produced.busy.load(Ordering::Relaxed) > 0, "producers were refused: {produced:?}");
    let refused = engine.metric("flowgate_ingest_rejected_total{path=\"binary\",reason=\"memory_pressure\"}");
    // At least: a request refused as the producers stopped was never read back.
    assert!(refused as u64 >= produced.busy.load(Ordering::Relaxed), "{refused} refusals counted, {produced:?}");
}

#[test]
fn validate_checks_the_memory_settings() {
    let dir = tempfile::tempdir().unwrap();
    let check = |text: &str| {
        let path = dir.path().join("c.toml");
        std::fs::write(&path, text).unwrap();
        common::cli(&["validate", "--config", path.to_str().unwrap()], None)
    };
    let (code, _, err) = check("[server]\nmemory_limit_bytes = 1000\n");
    assert!(code != 0 && err.contains("server.memory_limit_bytes"), "{err}");
    let (code, _, err) = check("[server]\nmemory_policy = \"drop_newest\"\n");
    assert!(code != 0 && err.contains("line 2") && err.contains("drop_newest"), "{err}");
    let pipeline = "[[pipelines]]\nname = \"p\"\ntopics = [\"t\"]\nmemory_policy = \"{}\"\n\
                    [[pipelines.sinks]]\nname = \"s\"\ntype = \"blackhole\"\n";
    let (code, out, err) = check(&pipeline.replace("{}", "drop_newest"));
    assert_eq!(code, 0, "{out}{err}");
    let (code, _, err) = check(&pipeline.replace("{}", "sometimes"));
    assert!(code != 0 && err.contains("sometimes"), "{err}");
}

#[test]
fn pipelines_whose_sink_batches_would_hold_the_budget_for_good_are_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("c.toml");
    // 256 MiB budget, soft at 204.8 MiB; 8 partitions + the replay topic's one, each with
    // a 16 MiB batch reservation: 144 MiB held for as long as the pipeline runs.
    std::fs::write(
        &config,
        "[server]\nmemory_limit_bytes = 268435456\n[log]\ndefault_partitions = 8\n[[pipelines]]\nname = \"p\"\n\
         topics = [\"t\"]\n[[pipelines.sinks]]\nname = \"s\"\ntype = \"blackhole\"\nbatch = { max_bytes = 16777216 }\n",
    )
    .unwrap();
    let mut child = std::process::Command::new(common::flowgate_bin())
        .args(["run", "--config", config.to_str().unwrap(), "--data-dir", dir.path().join("data").to_str().unwrap()])
        .env("FLOWGATE_INGEST__BINARY_ADDR", "127.0.0.1:0")
        .env("FLOWGATE_INGEST__HTTP_ADDR", "127.0.0.1:0")
        .env("FLOWGATE_INGEST__NDJSON_ADDR", "127.0.0.1:0")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut status = None;
    poll_until("the engine to refuse the config", Duration::from_secs(30), || {
        status = child.try_wait().unwrap();
        status.is_some()
    });
    let mut err = String::new();
    child.stderr.take().unwrap().read_to_string(&mut err).unwrap();
    assert!(!status.unwrap().success(), "{err}");
    assert!(err.contains("batch.max_bytes") && err.contains("server.memory_limit_bytes"), "{err}");
}
