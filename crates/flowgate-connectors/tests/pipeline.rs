//! Pipelines end to end inside one process: a real log, real processors, real file and
//! topic sinks, checkpoints on disk.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use flowgate_connectors::Connectors;
use flowgate_core::{BatchBuilder, BatchView, Codec, ProducerStamp};
use flowgate_engine::{PipelineConfig, PipelineMetrics, Pipelines};
use flowgate_log::{Log, LogConfig};

fn append(log: &Log, topic: &str, lines: &[String]) {
    let t = log.topic_or_create(topic).unwrap();
    let mut b = BatchBuilder::new();
    for l in lines {
        b.push_payload(flowgate_core::time::now_ms(), None, l.as_bytes());
    }
    t.partition(0).unwrap().append(&mut b.finish(Codec::None, ProducerStamp::default()).unwrap().bytes).unwrap();
}

fn read_topic(log: &Log, topic: &str) -> Vec<serde_json::Value> {
    let Some(t) = log.topic(topic) else { return Vec::new() };
    let mut out = Vec::new();
    let mut scratch = Vec::new();
    for p in t.partitions() {
        let mut offset = p.start_offset();
        while offset < p.end_offset() {
            let r = p.read(offset, 1 << 20).unwrap();
            let mut rest = &r.batches[..];
            while !rest.is_empty() {
                let (view, tail) = BatchView::parse(rest).unwrap();
                for rec in view.records(&mut scratch).unwrap() {
                    out.push(serde_json::from_slice(rec.unwrap().payload).unwrap());
                }
                offset = view.last_offset() + 1;
                rest = tail;
            }
        }
    }
    out
}

fn read_dir_lines(dir: &Path) -> Vec<serde_json::Value> {
    let Ok(entries) = std::fs::read_dir(dir) else { return Vec::new() };
    let mut files: Vec<_> = entries.map(|e| e.unwrap().path()).collect();
    files.sort();
    files
        .iter()
        .flat_map(|f| {
            std::fs::read_to_string(f).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect::<Vec<_>>()
        })
        .collect()
}

fn pipelines(toml_text: &str) -> Vec<PipelineConfig> {
    #[derive(serde::Deserialize)]
    struct File {
        pipelines: Vec<PipelineConfig>,
    }
    toml::from_str::<File>(toml_text).unwrap().pipelines
}

async fn wait_until(mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !f() {
        assert!(Instant::now() < deadline, "condition not reached in time");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn filter_remap_route_and_dead_letters() {
    let dir = tempfile::tempdir().unwrap();
    let log = Log::open(dir.path(), LogConfig::default()).unwrap();
    let configs = pipelines(
        r#"
        [[pipelines]]
        name = "p"
        topics = ["in"]
        commit_interval_ms = 50
        [[pipelines.processors]]
        type = "filter"
        condition = "to_float!(.temp) > 0.0"
        [[pipelines.processors]]
        type = "remap"
        source = ".doubled = to_float!(.temp) * 2.0"
        [[pipelines.processors]]
        type = "route"
        routes = [{ condition = ".kind == \"a\"", sinks = ["a"] }]
        default = ["rest"]
        [[pipelines.sinks]]
        name = "a"
        type = "file"
        path = "out-a"
        [[pipelines.sinks]]
        name = "rest"
        type = "topic"
        topic = "rest"
        "#,
    );
    let lines: Vec<String> = vec![
        r#"{"kind":"a","temp":1.5}"#.into(),
        r#"{"kind":"b","temp":2}"#.into(),
        r#"{"kind":"a","temp":-1}"#.into(),
        r#"{"kind":"a","temp":"hot"}"#.into(),
        "not json at all".into(),
        r#"{"kind":"a","temp":3}"#.into(),
    ];
    append(&log, "in", &lines);
    let metrics = Arc::new(PipelineMetrics::new());
    let factory = Arc::new(Connectors::new(log.clone(), dir.path().to_path_buf()));
    let running = Pipelines::start(
        log.clone(),
        dir.path().to_path_buf(),
        configs,
        factory,
        metrics,
        flowgate_engine::MemoryGovernor::unlimited(),
    )
    .unwrap();
    let out_a = dir.path().join("out-a");
    wait_until(|| {
        read_dir_lines(&out_a).len() >= 2 && !read_topic(&log, "rest").is_empty() && read_topic(&log, "_dlq").len() >= 2
    })
    .await;
    running.shutdown().await;
    let a = read_dir_lines(&out_a);
    assert_eq!(
        a,
        vec![
            serde_json::json!({"kind":"a","temp":1.5,"doubled":3.0}),
            serde_json::json!({"kind":"a","temp":3,"doubled":6.0})
        ]
    );
    assert_eq!(read_topic(&log, "rest"), vec![serde_json::json!({"kind":"b","temp":2,"doubled":4.0})]);
    let dlq = read_topic(&log, "_dlq");
    assert_eq!(dlq.len(), 2, "{dlq:?}");
    assert_eq!(dlq[0]["processor"], "filter-1");
    assert_eq!(dlq[0]["event"], serde_json::json!({"kind":"a","temp":"hot"}));
    assert!(dlq[0]["error"].as_str().unwrap().contains("float"), "{}", dlq[0]["error"]);
    assert_eq!(dlq[1]["event"], "not json at all");
    assert_eq!(dlq[1]["offset"], 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offsets_and_state_are_committed_and_resumed() {
    let dir = tempfile::tempdir().unwrap();
    let log = Log::open(dir.path(), LogConfig::default()).unwrap();
    let toml_text = r#"
        [[pipelines]]
        name = "p"
        topics = ["in"]
        commit_interval_ms = 50
        [[pipelines.processors]]
        type = "dedup"
        by = "id"
        [[pipelines.sinks]]
        name = "out"
        type = "file"
        path = "out"
        "#;
    let ids = |r: std::ops::Range<u32>| r.map(|i| format!(r#"{{"id":{i}}}"#)).collect::<Vec<_>>();
    append(&log, "in", &ids(0..100));
    let start = |log: &Log| {
        let factory = Arc::new(Connectors::new(log.clone(), dir.path().to_path_buf()));
        Pipelines::start(
            log.clone(),
            dir.path().to_path_buf(),
            pipelines(toml_text),
            factory,
            Arc::new(PipelineMetrics::new()),
            flowgate_engine::MemoryGovernor::unlimited(),
        )
        .unwrap()
    };
    let running = start(&log);
    let out = dir.path().join("out");
    wait_until(|| read_dir_lines(&out).len() == 100).await;
    running.shutdown().await;
    // Duplicates of the first run's ids, and new ids: after the restart only the new ones
    // pass, because the dedup state was committed with the offsets.
    append(&log, "in", &ids(50..150));
    let running = start(&log);
    wait_until(|| read_dir_lines(&out).len() >= 150).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    running.shutdown().await;
    let got: Vec<u64> = read_dir_lines(&out).iter().map(|v| v["id"].as_u64().unwrap()).collect();
    assert_eq!(got, (0..150).collect::<Vec<u64>>());
}
