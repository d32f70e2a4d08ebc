//! The listeners under memory pressure, against a real engine in this process with real
//! sockets: the budget is filled by a charge the test holds, so the level is exact.

use std::time::{Duration, Instant};

use flowgate_memory::Component;
use flowgate_server::metrics::IngestPath;
use flowgate_server::{Config, Engine};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn config(dir: &std::path::Path, policy: &str) -> Config {
    let text = format!(
        r#"
[server]
data_dir = "{}"
memory_limit_bytes = 33554432
memory_policy = "{policy}"
[ingest]
binary_addr = "127.0.0.1:0"
http_addr = "127.0.0.1:0"
ndjson_addr = "127.0.0.1:0"
max_frame_bytes = 1048576
max_buffered_bytes = 8388608
"#,
        dir.display()
    );
    Config::parse(&text, "test").unwrap()
}

async fn poll_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A produce over HTTP; returns the status line and headers with the body.
async fn post(engine_http: std::net::SocketAddr, body: &str) -> String {
    let mut s = TcpStream::connect(engine_http).await.unwrap();
    let head = format!(
        "POST /v1/topics/web/events HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(head.as_bytes()).await.unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}

fn stored(engine: &Engine, topic: &str) -> u64 {
    engine.log().topic(topic).map_or(0, |t| t.partitions().iter().map(|p| p.end_offset()).sum())
}

fn batch(n: usize) -> bytes::Bytes {
    let mut b = flowgate_core::BatchBuilder::new();
    for i in 0..n {
        b.push_payload(1, None, format!("{{\"n\":{i}}}").as_bytes());
    }
    b.finish(flowgate_core::Codec::None, flowgate_core::ProducerStamp::default()).unwrap().bytes.into()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_soft_pressure_no_listener_reads_and_all_resume_once_memory_is_freed() {
    let dir = tempfile::tempdir().unwrap();
    let engine = Engine::start(config(dir.path(), "block")).await.unwrap();
    let metrics = engine.metrics().clone();
    let memory = engine.memory().clone();
    // Fill the budget to the soft threshold.
    let held = memory.charge(Component::ProcessorState, memory.soft_limit());

    let mut ndjson = TcpStream::connect(engine.ndjson_addr).await.unwrap();
    let lines: String = (0..1000).map(|i| format!("{{\"n\":{i}}}\n")).collect();
    ndjson.write_all(lines.as_bytes()).await.unwrap();
    let http_addr = engine.http_addr;
    let http = tokio::spawn(async move { post(http_addr, "[{\"a\":1},{\"a\":2}]").await });
    let binary_addr = engine.binary_addr.to_string();
    let binary = tokio::spawn(async move {
        let client = flowgate_client::Client::connect(&binary_addr).await?;
        client.produce("bin", batch(10), flowgate_core::ProducerStamp::default()).await
    });

    poll_until("every listener to pause", || {
        [IngestPath::Ndjson, IngestPath::Http, IngestPath::Binary].iter().all(|p| metrics.memory_paused_count(*p) >= 1)
    })
    .await;
    // Paused, so nothing they sent can have been read: give them time to show otherwise.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!((stored(&engine, "events"), stored(&engine, "web"), stored(&engine, "bin")), (0, 0, 0));
    assert!(!http.is_finished() && !binary.is_finished(), "no answer while paused");

    drop(held);
    poll_until("the NDJSON lines to be stored", || stored(&engine, "events") == 1000).await;
    let response = tokio::time::timeout(Duration::from_secs(20), http).await.unwrap().unwrap();
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    let acks = tokio::time::timeout(Duration::from_secs(20), binary).await.unwrap().unwrap().unwrap();
    assert_eq!(acks.iter().map(|a| a.record_count).sum::<u32>(), 10);
    assert_eq!((stored(&engine, "web"), stored(&engine, "bin")), (2, 10));
    assert_eq!(memory.used(), 0, "every listener gave its buffers back");
    assert!(memory.peak() >= memory.soft_limit());
    engine.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_the_limit_reject_refuses_produce_requests_retryably_and_stores_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let engine = Engine::start(config(dir.path(), "reject")).await.unwrap();
    let memory = engine.memory().clone();
    let client = flowgate_client::Client::connect(&engine.binary_addr.to_string()).await.unwrap();
    let held = memory.charge(Component::ProcessorState, memory.limit());

    let err = client.produce("bin", batch(10), flowgate_core::ProducerStamp::default()).await.unwrap_err();
    assert!(
        matches!(err, flowgate_client::ClientError::Server { code: flowgate_protocol::ErrorCode::Busy, .. }),
        "{err}"
    );
    assert!(err.is_retriable());
    let response = post(engine.http_addr, "[{\"a\":1}]").await;
    assert!(response.starts_with("HTTP/1.1 503"), "{response}");
    assert!(response.to_ascii_lowercase().contains("retry-after: 1"), "{response}");
    assert_eq!((stored(&engine, "bin"), stored(&engine, "web")), (0, 0), "nothing refused is stored");
    let metrics = engine.metrics();
    assert_eq!(metrics.rejected_count(IngestPath::Binary, "memory_pressure"), 1);
    assert_eq!(metrics.rejected_count(IngestPath::Http, "memory_pressure"), 1);

    drop(held);
    let acks = client.produce("bin", batch(10), flowgate_core::ProducerStamp::default()).await.unwrap();
    assert_eq!(acks.iter().map(|a| a.record_count).sum::<u32>(), 10);
    assert!(post(engine.http_addr, "[{\"a\":1}]").await.starts_with("HTTP/1.1 200"));
    engine.shutdown().await.unwrap();
}
