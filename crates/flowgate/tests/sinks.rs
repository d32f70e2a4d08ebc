//! Sinks in real engine processes, under faults: a destination partition that fails, a
//! topic sink killed between its appends and its checkpoint,
//! a checkpoint that went missing, two sinks on one path, a peer with a small frame
//! limit, a peer that never answers, a peer that closes in the middle of a batch, an
//! HTTP endpoint that is busy and then refuses an event.

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{cli, EngineProcess};
use flowgate_client::Client;
use flowgate_core::{BatchBuilder, BatchView, Codec, ProducerStamp};

fn write_config(dir: &Path, text: &str) -> PathBuf {
    let path = dir.join("flowgate.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// `{"id": i, "pad": "<pad bytes>"}` for each id, keyed by id.
fn batch_of(ids: std::ops::Range<u64>, pad: usize) -> Bytes {
    let mut b = BatchBuilder::new();
    let padding = "x".repeat(pad);
    for id in ids {
        let payload = format!(r#"{{"id":{id},"pad":"{padding}"}}"#);
        b.push_payload(flowgate_core::time::now_ms(), Some(format!("k{id}").as_bytes()), payload.as_bytes());
    }
    Bytes::from(b.finish(Codec::None, ProducerStamp::default()).unwrap().bytes)
}

fn produce(rt: &tokio::runtime::Runtime, addr: SocketAddr, topic: &str, batches: Vec<Bytes>) {
    rt.block_on(async {
        let client = Client::connect(&addr.to_string()).await.unwrap();
        for b in batches {
            client.produce(topic, b, ProducerStamp::default()).await.unwrap();
        }
    });
}

/// Every event payload of every partition of `topic`, parsed, partition by partition.
fn read_topic(rt: &tokio::runtime::Runtime, addr: SocketAddr, topic: &str) -> Vec<serde_json::Value> {
    read_partitions(rt, addr, topic).into_iter().flatten().collect()
}

/// Every event payload of `topic`, parsed, per partition.
fn read_partitions(rt: &tokio::runtime::Runtime, addr: SocketAddr, topic: &str) -> Vec<Vec<serde_json::Value>> {
    rt.block_on(async {
        let client = Client::connect(&addr.to_string()).await.unwrap();
        let Some(info) = client.list_topics().await.unwrap().into_iter().find(|t| t.name == topic) else {
            return Vec::new();
        };
        let mut partitions = Vec::new();
        let mut scratch = Vec::new();
        for p in 0..info.partitions.len() as u32 {
            let mut out = Vec::new();
            let mut offset = 0;
            loop {
                let f = client.fetch(topic, p, offset, 8 << 20, 0).await.unwrap();
                if f.batches.is_empty() {
                    break;
                }
                let mut rest = &f.batches[..];
                while !rest.is_empty() {
                    let (view, tail) = BatchView::parse(rest).unwrap();
                    for (i, rec) in view.records(&mut scratch).unwrap().enumerate() {
                        if view.base_offset() + i as u64 >= offset {
                            out.push(serde_json::from_slice(rec.unwrap().payload).unwrap());
                        }
                    }
                    offset = view.last_offset() + 1;
                    rest = tail;
                }
            }
            partitions.push(out);
        }
        partitions
    })
}

fn ids(events: &[serde_json::Value]) -> Vec<u64> {
    events.iter().map(|v| v["id"].as_u64().unwrap()).collect()
}

fn sorted_ids(events: &[serde_json::Value]) -> Vec<u64> {
    let mut ids = ids(events);
    ids.sort_unstable();
    ids
}

fn wait_for(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(25));
    }
}

#[test]
fn a_topic_sink_whose_second_partition_fails_once_stores_each_event_once() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        dir.path(),
        r#"
[[pipelines]]
name = "chain"
topics = ["in"]
commit_interval_ms = 100
[[pipelines.sinks]]
name = "next"
type = "topic"
topic = "out"
batch = { max_events = 1000, max_wait_ms = 20 }
"#,
    );
    // Tiny segments: every append to `out` that follows another rolls to a new segment.
    let engine = EngineProcess::start_with(dir.path(), Some(&config), &[("FLOWGATE_LOG__SEGMENT_BYTES", "1024")]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    // One source partition, two destination partitions: each sink write spans both.
    rt.block_on(async {
        Client::connect(&engine.binary.to_string()).await.unwrap().create_topic("out", 2).await.unwrap();
    });
    produce(&rt, engine.binary, "in", vec![batch_of(0..200, 40)]);
    wait_for("the first events in `out`", Duration::from_secs(20), || {
        read_topic(&rt, engine.binary, "out").len() >= 200
    });
    // A real fault: a directory where partition 1's next segment file must go makes its
    // roll fail, so the sink's append to partition 1 fails after partition 0's succeeded.
    let partition_1 = dir.path().join("topics").join("out").join("1");
    let end_1 = rt.block_on(async {
        let client = Client::connect(&engine.binary.to_string()).await.unwrap();
        let topics = client.list_topics().await.unwrap();
        topics.into_iter().find(|t| t.name == "out").unwrap().partitions[1].end_offset
    });
    let blocker = partition_1.join(format!("{end_1:020}.log"));
    std::fs::create_dir(&blocker).unwrap();
    produce(&rt, engine.binary, "in", vec![batch_of(200..400, 40)]);
    // Several failed attempts, each of which appended partition 0's part before the fix.
    wait_for("failed sink writes", Duration::from_secs(20), || {
        engine.metric("flowgate_sink_errors_total{pipeline=\"chain\"") >= 3.0
    });
    std::fs::remove_dir(&blocker).unwrap();
    wait_for("the second events in `out`", Duration::from_secs(20), || {
        read_topic(&rt, engine.binary, "out").len() >= 400
    });
    // Give a duplicate time to show up, then count.
    std::thread::sleep(Duration::from_millis(300));
    let stored = sorted_ids(&read_topic(&rt, engine.binary, "out"));
    assert_eq!(stored, (0..400).collect::<Vec<u64>>(), "every event exactly once after the retries");
}

/// Every output file (name, bytes) in `dir`.
/// `{"id": i, "skip": …}` for each id (`skip` for every id ≡ 3 mod 7, which the test
/// pipelines filter out, leaving gaps in the source offsets), keyed by id or keyless.
fn skippable_batch(ids: std::ops::Range<u64>, keyed: bool) -> Bytes {
    let mut b = BatchBuilder::new();
    for id in ids {
        let payload = format!(r#"{{"id":{id},"skip":{}}}"#, id % 7 == 3);
        let key = keyed.then(|| format!("k{id}"));
        b.push_payload(flowgate_core::time::now_ms(), key.as_deref().map(str::as_bytes), payload.as_bytes());
    }
    Bytes::from(b.finish(Codec::None, ProducerStamp::default()).unwrap().bytes)
}

#[test]
fn a_topic_sink_killed_after_appending_and_before_its_checkpoint_stores_each_event_once() {
    let dir = tempfile::tempdir().unwrap();
    // No checkpoint but the one each partition writes as it starts: everything the sink
    // appends before the kill is replayed after it.
    let config = write_config(
        dir.path(),
        r#"
[[pipelines]]
name = "chain"
topics = ["in"]
commit_interval_ms = 86400000
[[pipelines.processors]]
type = "filter"
condition = ".skip != true"
[[pipelines.sinks]]
name = "next"
type = "topic"
topic = "out"
batch = { max_events = 50, max_wait_ms = 5 }
"#,
    );
    let env = [("FLOWGATE_LOG__DEFAULT_PARTITIONS", "2")];
    let mut engine = EngineProcess::start_with(dir.path(), Some(&config), &env);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let wave = |range: std::ops::Range<u64>| {
        let half = range.start + (range.end - range.start) / 2;
        vec![skippable_batch(range.start..half, true), skippable_batch(half..range.end, false)]
    };
    let kept = |range: std::ops::Range<u64>| range.filter(|id| id % 7 != 3).collect::<Vec<u64>>();
    produce(&rt, engine.binary, "in", wave(0..400));
    wait_for("the first wave in `out`", Duration::from_secs(30), || {
        read_topic(&rt, engine.binary, "out").len() >= kept(0..400).len()
    });
    for p in 0..2 {
        let header = common::checkpoint_header(&dir.path().join(format!("pipelines/chain/in-{p}.ckpt")));
        assert_eq!(header.map(|h| h["offset"].clone()), Some(serde_json::json!(0)), "no checkpoint past the events");
    }
    engine.kill9();

    let engine = engine.restart();
    produce(&rt, engine.binary, "in", wave(400..600));
    // Each source partition is replayed in order, and the second wave follows the first
    // in both: once the second wave is in, the replay is through.
    let expected = kept(0..600);
    wait_for("the second wave in `out`", Duration::from_secs(30), || {
        sorted_ids(&read_topic(&rt, engine.binary, "out")).ends_with(&kept(400..600))
            || read_topic(&rt, engine.binary, "out").len() > expected.len()
    });
    assert_eq!(sorted_ids(&read_topic(&rt, engine.binary, "out")), expected, "every event exactly once");
    assert!(engine.log().contains("were not appended again"), "the replay was refused, not lost:\n{}", engine.log());
}

fn files(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out: Vec<(String, Vec<u8>)> = std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .map(|e| {
                    let e = e.unwrap();
                    (e.file_name().to_string_lossy().into_owned(), std::fs::read(e.path()).unwrap())
                })
                .collect()
        })
        .unwrap_or_default();
    out.sort();
    out
}

fn line_count(dir: &Path) -> usize {
    files(dir).iter().map(|(_, b)| b.iter().filter(|&&c| c == b'\n').count()).sum()
}

#[test]
fn a_file_sink_started_without_its_checkpoint_leaves_earlier_files_intact() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        dir.path(),
        r#"
[[pipelines]]
name = "archive"
topics = ["in"]
commit_interval_ms = 100
[[pipelines.sinks]]
name = "files"
type = "file"
path = "out"
rotate_bytes = 4096
batch = { max_events = 100, max_wait_ms = 20 }
"#,
    );
    let mut engine = EngineProcess::start_with(dir.path(), Some(&config), &[]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    produce(&rt, engine.binary, "in", vec![batch_of(0..300, 20)]);
    let out = dir.path().join("out");
    wait_for("the first output", Duration::from_secs(20), || line_count(&out) >= 300);
    assert!(engine.terminate().success());
    let before = files(&out);
    assert!(before.len() > 1, "several files were rolled: {}", before.len());
    // The checkpoint goes away (moved, or the pipeline renamed): nothing accounts for
    // the files any more, and none of them may be touched.
    std::fs::remove_dir_all(dir.path().join("pipelines")).unwrap();
    let engine = engine.restart();
    // The pipeline starts over from the earliest offset: 300 lines again, in new files.
    wait_for("the replayed output", Duration::from_secs(20), || line_count(&out) >= 600);
    std::thread::sleep(Duration::from_millis(300));
    let after = files(&out);
    for (name, bytes) in &before {
        let now = after.iter().find(|(n, _)| n == name).map(|(_, b)| b);
        assert_eq!(now, Some(bytes), "{name} must be left exactly as it was");
    }
    assert_eq!(line_count(&out), 600, "the new series holds the replay, once");
    assert!(engine.log().contains("no checkpoint accounts for"), "the engine says what it did");
}

#[test]
fn two_sinks_writing_one_path_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        dir.path(),
        r#"
[[pipelines]]
name = "first"
topics = ["a"]
[[pipelines.sinks]]
name = "files"
type = "file"
path = "shared"

[[pipelines]]
name = "second"
topics = ["a"]
[[pipelines.sinks]]
name = "copy"
type = "file"
path = "./shared/"
"#,
    );
    let (code, _, err) = cli(&["validate", "--config", config.to_str().unwrap()], None);
    assert_ne!(code, 0, "validate must refuse two sinks on one directory");
    assert!(err.contains("'copy'") && err.contains("'files'") && err.contains("shared"), "{err}");
    let (code, _, err) =
        cli(&["run", "--config", config.to_str().unwrap(), "--data-dir", dir.path().to_str().unwrap()], None);
    assert_ne!(code, 0, "run must refuse it too");
    assert!(err.contains("'copy'"), "{err}");
    // Distinct directories are fine.
    let fine = std::fs::read_to_string(&config).unwrap().replace("./shared/", "other");
    std::fs::write(&config, fine).unwrap();
    let (code, out, err) = cli(&["validate", "--config", config.to_str().unwrap()], None);
    assert_eq!(code, 0, "{out}{err}");
}

fn tcp_pipeline(dir: &Path, peer: SocketAddr, extra: &str) -> PathBuf {
    write_config(
        dir,
        &format!(
            r#"
[[pipelines]]
name = "forward"
topics = ["in"]
commit_interval_ms = 100
[[pipelines.sinks]]
name = "remote"
type = "tcp"
addr = "{peer}"
topic = "copy"
{extra}
"#
        ),
    )
}

#[test]
fn a_tcp_sink_delivers_64_kib_events_and_dead_letters_what_the_peer_cannot_take() {
    let dir_b = tempfile::tempdir().unwrap();
    // A peer that takes frames of at most 1 MiB: a few 64 KiB events per request.
    let engine_b = EngineProcess::start(dir_b.path(), &[("FLOWGATE_INGEST__MAX_FRAME_BYTES", "1048576")]);
    let dir_a = tempfile::tempdir().unwrap();
    let config = tcp_pipeline(
        dir_a.path(),
        engine_b.binary,
        "batch = { max_events = 1000, max_bytes = 16777216, max_wait_ms = 50 }",
    );
    let engine_a = EngineProcess::start_with(dir_a.path(), Some(&config), &[]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut batches: Vec<Bytes> = (0..20u64).map(|b| batch_of(b * 10..b * 10 + 10, 64 << 10)).collect();
    // One event no request to that peer can carry, in the middle of the stream.
    batches.insert(10, batch_of(1_000_000..1_000_001, 2 << 20));
    produce(&rt, engine_a.binary, "in", batches);
    wait_for("200 events at the peer", Duration::from_secs(60), || {
        read_topic(&rt, engine_b.binary, "copy").len() >= 200
    });
    std::thread::sleep(Duration::from_millis(300));
    let delivered = read_topic(&rt, engine_b.binary, "copy");
    assert_eq!(ids(&delivered), (0..200).collect::<Vec<u64>>(), "in order, each once");
    assert!(delivered.iter().all(|v| v["pad"].as_str().unwrap().len() == 64 << 10));
    wait_for("the dead letter", Duration::from_secs(20), || !read_topic(&rt, engine_a.binary, "_dlq").is_empty());
    let dlq = read_topic(&rt, engine_a.binary, "_dlq");
    assert_eq!(dlq.len(), 1, "only the oversized event is dead-lettered");
    assert_eq!(dlq[0]["sink"], "remote");
    assert_eq!(dlq[0]["pipeline"], "forward");
    assert_eq!(dlq[0]["event"]["id"], 1_000_000);
    assert!(dlq[0]["error"].as_str().unwrap().contains("does not fit"), "{}", dlq[0]["error"]);
}

/// What a proxy connection does.
#[derive(Clone, Copy, Debug)]
enum Behaviour {
    /// Accepts and never answers anything, handshake included.
    Silent,
    /// Passes the handshake both ways, then swallows every request: never answers.
    SwallowAfterHello,
    /// Passes everything until the peer's `n`-th reply, which it drops, then closes
    /// both sides: the request was stored but its sender never hears so.
    CloseAtReply(usize),
    /// Passes everything.
    PassThrough,
}

/// A real TCP proxy in front of an engine, acting out one behaviour per connection in
/// the order they arrive (then passing through).
struct Proxy {
    addr: SocketAddr,
    connections: Arc<AtomicUsize>,
}

fn read_frame(s: &mut TcpStream) -> Option<Vec<u8>> {
    let mut len = [0u8; 4];
    s.read_exact(&mut len).ok()?;
    let mut frame = len.to_vec();
    frame.resize(4 + u32::from_le_bytes(len) as usize, 0);
    s.read_exact(&mut frame[4..]).ok()?;
    Some(frame)
}

fn pump(mut from: TcpStream, mut to: TcpStream) {
    let _ = std::io::copy(&mut from, &mut to);
    let _ = to.shutdown(Shutdown::Write);
}

fn start_proxy(upstream: SocketAddr, plan: Vec<Behaviour>) -> Proxy {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let connections = Arc::new(AtomicUsize::new(0));
    let counter = connections.clone();
    std::thread::spawn(move || {
        for client in listener.incoming() {
            let Ok(mut client) = client else { return };
            let n = counter.fetch_add(1, Ordering::SeqCst);
            let behaviour = plan.get(n).copied().unwrap_or(Behaviour::PassThrough);
            std::thread::spawn(move || match behaviour {
                Behaviour::Silent => {
                    // Read and drop until the sink gives up on the connection.
                    let _ = std::io::copy(&mut client, &mut std::io::sink());
                }
                Behaviour::SwallowAfterHello => {
                    let mut server = TcpStream::connect(upstream).unwrap();
                    let Some(hello) = read_frame(&mut client) else { return };
                    server.write_all(&hello).unwrap();
                    let Some(ok) = read_frame(&mut server) else { return };
                    client.write_all(&ok).unwrap();
                    let _ = std::io::copy(&mut client, &mut std::io::sink());
                }
                Behaviour::CloseAtReply(n) => {
                    let mut server = TcpStream::connect(upstream).unwrap();
                    let up = std::thread::spawn({
                        let (c, s) = (client.try_clone().unwrap(), server.try_clone().unwrap());
                        move || pump(c, s)
                    });
                    for _ in 1..n {
                        let Some(reply) = read_frame(&mut server) else { break };
                        if client.write_all(&reply).is_err() {
                            break;
                        }
                    }
                    let _ = read_frame(&mut server);
                    let _ = client.shutdown(Shutdown::Both);
                    let _ = server.shutdown(Shutdown::Both);
                    let _ = up.join();
                }
                Behaviour::PassThrough => {
                    let server = TcpStream::connect(upstream).unwrap();
                    let up = std::thread::spawn({
                        let (c, s) = (client.try_clone().unwrap(), server.try_clone().unwrap());
                        move || pump(c, s)
                    });
                    pump(server, client);
                    let _ = up.join();
                }
            });
        }
    });
    Proxy { addr, connections }
}

#[test]
fn a_tcp_sink_times_out_on_a_peer_that_never_answers_and_retries_without_hanging() {
    let dir_b = tempfile::tempdir().unwrap();
    let engine_b = EngineProcess::start(dir_b.path(), &[]);
    // First a peer that accepts and says nothing, then one that takes the handshake and
    // never answers a request, then the real thing.
    let proxy = start_proxy(engine_b.binary, vec![Behaviour::Silent, Behaviour::SwallowAfterHello]);
    let dir_a = tempfile::tempdir().unwrap();
    let config = tcp_pipeline(
        dir_a.path(),
        proxy.addr,
        "connect_timeout_ms = 300\nrequest_timeout_ms = 500\nbatch = { max_events = 1000, max_wait_ms = 20 }",
    );
    let engine_a = EngineProcess::start_with(dir_a.path(), Some(&config), &[]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let started = Instant::now();
    produce(&rt, engine_a.binary, "in", vec![batch_of(0..500, 50)]);
    wait_for("delivery past the silent peers", Duration::from_secs(30), || {
        read_topic(&rt, engine_b.binary, "copy").len() >= 500
    });
    let took = started.elapsed();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(ids(&read_topic(&rt, engine_b.binary, "copy")), (0..500).collect::<Vec<u64>>(), "in order, each once");
    assert!(proxy.connections.load(Ordering::SeqCst) >= 3, "the sink gave up on both silent connections");
    assert!(engine_a.metric("flowgate_sink_errors_total{pipeline=\"forward\"") >= 2.0, "both timeouts counted");
    assert!(took < Duration::from_secs(15), "timeouts are short, not the kernel's: {took:?}");
}

#[test]
fn a_peer_that_closes_in_the_middle_of_a_batch_gets_no_duplicates() {
    let dir_b = tempfile::tempdir().unwrap();
    // 256 KiB frames: a sink write of 1000 events of ~1 KiB takes several requests.
    let engine_b = EngineProcess::start(dir_b.path(), &[("FLOWGATE_INGEST__MAX_FRAME_BYTES", "262144")]);
    // The first connection stores the handshake and two requests but the sink hears of
    // the first only: the connection closes before the second's answer.
    let proxy = start_proxy(engine_b.binary, vec![Behaviour::CloseAtReply(3)]);
    let dir_a = tempfile::tempdir().unwrap();
    let config = tcp_pipeline(dir_a.path(), proxy.addr, "batch = { max_events = 1000, max_wait_ms = 200 }");
    let engine_a = EngineProcess::start_with(dir_a.path(), Some(&config), &[]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    produce(&rt, engine_a.binary, "in", vec![batch_of(0..1000, 1000)]);
    wait_for("delivery after the reconnect", Duration::from_secs(30), || {
        read_topic(&rt, engine_b.binary, "copy").len() >= 1000
    });
    std::thread::sleep(Duration::from_millis(500));
    let delivered = ids(&read_topic(&rt, engine_b.binary, "copy"));
    assert_eq!(
        delivered,
        (0..1000).collect::<Vec<u64>>(),
        "each event once, in order, though a stored request was sent again"
    );
    assert!(proxy.connections.load(Ordering::SeqCst) >= 2, "the sink reconnected");
    assert!(engine_a.metric("flowgate_sink_errors_total{pipeline=\"forward\"") >= 1.0);
}

#[test]
fn a_tcp_sink_to_a_partitioned_peer_stores_each_event_once_in_its_keys_partition() {
    let dir_b = tempfile::tempdir().unwrap();
    // Four partitions and 256 KiB frames: each write goes out as several requests to
    // each partition.
    let engine_b = EngineProcess::start(
        dir_b.path(),
        &[("FLOWGATE_INGEST__MAX_FRAME_BYTES", "262144"), ("FLOWGATE_LOG__DEFAULT_PARTITIONS", "4")],
    );
    // The first connection passes the handshake, the partition count and one request,
    // then stores the next request but closes before its answer.
    let proxy = start_proxy(engine_b.binary, vec![Behaviour::CloseAtReply(4)]);
    let dir_a = tempfile::tempdir().unwrap();
    let config = tcp_pipeline(dir_a.path(), proxy.addr, "batch = { max_events = 1000, max_wait_ms = 200 }");
    let engine_a = EngineProcess::start_with(dir_a.path(), Some(&config), &[]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    produce(&rt, engine_a.binary, "in", vec![batch_of(0..1000, 1000)]);
    wait_for("delivery after the reconnect", Duration::from_secs(30), || {
        read_topic(&rt, engine_b.binary, "copy").len() >= 1000
    });
    std::thread::sleep(Duration::from_millis(500));
    let partitions = read_partitions(&rt, engine_b.binary, "copy");
    assert_eq!(partitions.len(), 4);
    let all: Vec<serde_json::Value> = partitions.iter().flatten().cloned().collect();
    assert_eq!(sorted_ids(&all), (0..1000).collect::<Vec<u64>>(), "each event once");
    for (p, events) in partitions.iter().enumerate() {
        let ids = ids(events);
        assert!(!ids.is_empty(), "partition {p} got its keys");
        assert!(ids.windows(2).all(|w| w[0] < w[1]), "partition {p} in order");
        for id in ids {
            let key = format!("k{id}");
            assert_eq!(
                flowgate_core::partition_for_key(key.as_bytes(), 4),
                p as u32,
                "event {id} in its key's partition"
            );
        }
    }
    assert!(proxy.connections.load(Ordering::SeqCst) >= 2, "the sink reconnected");
}

/// A proxy that sends new connections to `first` until `switch` is set, then to
/// `then`; setting `switch` and calling `cut` closes the connections to `first`.
struct SwitchingProxy {
    addr: SocketAddr,
    switch: Arc<std::sync::atomic::AtomicBool>,
    open: Arc<std::sync::Mutex<Vec<TcpStream>>>,
}

impl SwitchingProxy {
    fn start(first: SocketAddr, then: SocketAddr) -> SwitchingProxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let switch = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let open: Arc<std::sync::Mutex<Vec<TcpStream>>> = Arc::default();
        let (switched, kept) = (switch.clone(), open.clone());
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { return };
                let upstream = if switched.load(Ordering::SeqCst) { then } else { first };
                let server = TcpStream::connect(upstream).unwrap();
                kept.lock().unwrap().push(client.try_clone().unwrap());
                let (c, s) = (client.try_clone().unwrap(), server.try_clone().unwrap());
                std::thread::spawn(move || pump(c, s));
                std::thread::spawn(move || pump(server, client));
            }
        });
        SwitchingProxy { addr, switch, open }
    }

    /// From now on, to `then`; the connections open so far are closed.
    fn cut(&self) {
        self.switch.store(true, Ordering::SeqCst);
        for s in self.open.lock().unwrap().drain(..) {
            let _ = s.shutdown(Shutdown::Both);
        }
    }
}

#[test]
fn a_tcp_sink_whose_peer_forgot_its_producer_starts_a_new_one_and_stores_each_event_once() {
    // The peer is replaced by a fresh engine (as if its data were lost) between two
    // writes: it does not know the sink's producer, whose sequences no longer start at 0.
    let dir_b1 = tempfile::tempdir().unwrap();
    let engine_b1 = EngineProcess::start(dir_b1.path(), &[("FLOWGATE_INGEST__MAX_FRAME_BYTES", "262144")]);
    let dir_b2 = tempfile::tempdir().unwrap();
    let engine_b2 = EngineProcess::start(dir_b2.path(), &[("FLOWGATE_INGEST__MAX_FRAME_BYTES", "262144")]);
    let proxy = SwitchingProxy::start(engine_b1.binary, engine_b2.binary);
    let dir_a = tempfile::tempdir().unwrap();
    let config = tcp_pipeline(dir_a.path(), proxy.addr, "batch = { max_events = 1000, max_wait_ms = 200 }");
    let engine_a = EngineProcess::start_with(dir_a.path(), Some(&config), &[]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    produce(&rt, engine_a.binary, "in", vec![batch_of(0..500, 1000)]);
    wait_for("the first write at the first peer", Duration::from_secs(30), || {
        read_topic(&rt, engine_b1.binary, "copy").len() >= 500
    });
    proxy.cut();
    produce(&rt, engine_a.binary, "in", vec![batch_of(500..1000, 1000)]);
    wait_for("the second write at the new peer", Duration::from_secs(30), || {
        read_topic(&rt, engine_b2.binary, "copy").len() >= 500
    });
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(ids(&read_topic(&rt, engine_b1.binary, "copy")), (0..500).collect::<Vec<u64>>());
    assert_eq!(
        ids(&read_topic(&rt, engine_b2.binary, "copy")),
        (500..1000).collect::<Vec<u64>>(),
        "each event once, in order, under the new producer"
    );
    assert!(engine_a.log().contains("new producer id"), "the refusal was seen and answered: {}", engine_a.log());
}

/// A real HTTP/1.1 endpoint for the http sink: its first request is answered 503 with
/// `Retry-After: 1`, every later one 200 with per-event statuses (an array in batch
/// order) that refuse the event with id 7 (400). Records each request's ids and when
/// it came.
struct HttpEndpoint {
    addr: SocketAddr,
    requests: Requests,
}

/// Each request's arrival and the ids in its body.
type Requests = Arc<Mutex<Vec<(Instant, Vec<u64>)>>>;

fn start_http_endpoint() -> HttpEndpoint {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let requests: Requests = Arc::new(Mutex::new(Vec::new()));
    let seen = requests.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(conn) = conn else { return };
            let seen = seen.clone();
            std::thread::spawn(move || serve_http(conn, seen));
        }
    });
    HttpEndpoint { addr, requests }
}

fn serve_http(mut conn: TcpStream, seen: Requests) {
    let mut buf = Vec::new();
    let mut chunk = vec![0u8; 64 << 10];
    loop {
        let head_end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            match conn.read(&mut chunk) {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
        let len: usize =
            head.lines().find_map(|l| l.strip_prefix("content-length:")).map_or(0, |v| v.trim().parse().unwrap());
        while buf.len() < head_end + len {
            match conn.read(&mut chunk) {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
        let body: Vec<u8> = buf.drain(..head_end + len).skip(head_end).collect();
        let ids: Vec<u64> = body
            .split(|&b| b == b'\n')
            .filter(|l| !l.is_empty())
            .map(|l| serde_json::from_slice::<serde_json::Value>(l).unwrap()["id"].as_u64().unwrap())
            .collect();
        let first = {
            let mut seen = seen.lock().unwrap();
            seen.push((Instant::now(), ids.clone()));
            seen.len() == 1
        };
        let reply = if first {
            "HTTP/1.1 503 Service Unavailable\r\nretry-after: 1\r\ncontent-length: 0\r\n\r\n".to_owned()
        } else {
            let statuses: Vec<u16> = ids.iter().map(|&id| if id == 7 { 400 } else { 200 }).collect();
            let body = serde_json::to_string(&statuses).unwrap();
            format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}", body.len())
        };
        if conn.write_all(reply.as_bytes()).is_err() {
            return;
        }
    }
}

#[test]
fn an_http_sink_waits_out_a_busy_endpoint_and_dead_letters_the_event_it_refuses() {
    let endpoint = start_http_endpoint();
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        dir.path(),
        &format!(
            r#"
[[pipelines]]
name = "hook"
topics = ["in"]
commit_interval_ms = 100
[[pipelines.sinks]]
name = "web"
type = "http"
url = "http://{}/ingest"
per_event_results = true
timeout_ms = 5000
batch = {{ max_events = 1000, max_wait_ms = 20 }}
"#,
            endpoint.addr
        ),
    );
    let engine = EngineProcess::start_with(dir.path(), Some(&config), &[]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    produce(&rt, engine.binary, "in", vec![batch_of(0..50, 10)]);
    // Every id in a request answered 200 (all but the first request), each once.
    let answered = |requests: &[(Instant, Vec<u64>)]| {
        let mut ids: Vec<u64> = requests.iter().skip(1).flat_map(|(_, ids)| ids.iter().copied()).collect();
        ids.sort_unstable();
        ids
    };
    wait_for("every event answered 200", Duration::from_secs(30), || {
        answered(&endpoint.requests.lock().unwrap()).len() >= 50
    });
    wait_for("the dead letter", Duration::from_secs(20), || !read_topic(&rt, engine.binary, "_dlq").is_empty());
    std::thread::sleep(Duration::from_millis(300));
    let requests = endpoint.requests.lock().unwrap().clone();
    assert_eq!(answered(&requests), (0..50).collect::<Vec<u64>>(), "each event once past the 503");
    // The batch answered 503 was sent again whole, no sooner than its Retry-After.
    let (busy_at, busy_ids) = &requests[0];
    let (again_at, _) = requests[1..].iter().find(|(_, ids)| ids == busy_ids).expect("the 503'd batch again");
    assert!(again_at.duration_since(*busy_at) >= Duration::from_millis(950), "{:?}", again_at.duration_since(*busy_at));
    let dlq = read_topic(&rt, engine.binary, "_dlq");
    assert_eq!(dlq.len(), 1, "only the refused event is dead-lettered: {dlq:?}");
    assert_eq!((dlq[0]["pipeline"].as_str(), dlq[0]["sink"].as_str()), (Some("hook"), Some("web")));
    assert_eq!((dlq[0]["category"].as_str(), dlq[0]["code"].as_str()), (Some("rejected"), Some("400")));
    assert_eq!(dlq[0]["event"]["id"], 7);
    assert!(dlq[0]["error"].as_str().unwrap().contains("status 400"), "{}", dlq[0]["error"]);
}
