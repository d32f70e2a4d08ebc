//! Tracing end to end: a real `flowgate run` exports its spans over OTLP/HTTP to a real
//! HTTP server in the test, which decodes each `ExportTraceServiceRequest`; the tests
//! send HTTP produce requests with and without a W3C `traceparent` and check the span
//! tree that arrives, what is not traced, and that a collector that is down or hangs
//! costs spans, never ingest.

mod common;

use std::collections::HashMap;
use std::io::{BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{poll_until, EngineProcess};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use prost::Message;

/// One span as the collector received it.
#[derive(Clone, Debug)]
struct Span {
    name: String,
    service: String,
    trace_id: Vec<u8>,
    span_id: Vec<u8>,
    parent_span_id: Vec<u8>,
    /// Attributes, each shown as a string (ints in decimal).
    attributes: HashMap<String, String>,
    /// (trace id, span id) of each link.
    links: Vec<(Vec<u8>, Vec<u8>)>,
    kind: i32,
}

impl Span {
    fn attr(&self, key: &str) -> &str {
        self.attributes.get(key).map_or("", String::as_str)
    }
}

/// A small OTLP/HTTP receiver: an HTTP/1.1 server (keep-alive) that decodes the
/// protobuf body of every POST to /v1/traces and keeps its spans.
struct Collector {
    addr: SocketAddr,
    spans: Arc<Mutex<Vec<Span>>>,
    requests: Arc<Mutex<Vec<String>>>,
}

impl Collector {
    fn start() -> Collector {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let spans = Arc::new(Mutex::new(Vec::new()));
        let requests = Arc::new(Mutex::new(Vec::new()));
        let (s, r) = (spans.clone(), requests.clone());
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { return };
                let (s, r) = (s.clone(), r.clone());
                std::thread::spawn(move || serve(stream, &s, &r));
            }
        });
        Collector { addr, spans, requests }
    }

    fn endpoint(&self) -> String {
        format!("http://{}/v1/traces", self.addr)
    }

    fn spans(&self) -> Vec<Span> {
        self.spans.lock().unwrap().clone()
    }

    fn spans_of(&self, trace_id: &[u8]) -> Vec<Span> {
        self.spans().into_iter().filter(|s| s.trace_id == trace_id).collect()
    }
}

fn serve(stream: TcpStream, spans: &Mutex<Vec<Span>>, requests: &Mutex<Vec<String>>) {
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut out = stream;
    while let Some(request) = common::read_request(&mut reader) {
        let content_type = request.header("content-type").unwrap_or_default();
        requests.lock().unwrap().push(format!("{} {content_type}", request.line));
        let decoded = ExportTraceServiceRequest::decode(&request.body[..]).expect("an OTLP protobuf body");
        let mut got = Vec::new();
        for rs in decoded.resource_spans {
            let service = rs
                .resource
                .iter()
                .flat_map(|r| r.attributes.iter())
                .find(|a| a.key == "service.name")
                .map(|a| show(a.value.as_ref().and_then(|v| v.value.as_ref())))
                .unwrap_or_default();
            for ss in rs.scope_spans {
                for s in ss.spans {
                    got.push(Span {
                        name: s.name,
                        service: service.clone(),
                        trace_id: s.trace_id,
                        span_id: s.span_id,
                        parent_span_id: s.parent_span_id,
                        attributes: s
                            .attributes
                            .iter()
                            .map(|a| (a.key.clone(), show(a.value.as_ref().and_then(|v| v.value.as_ref()))))
                            .collect(),
                        links: s.links.into_iter().map(|l| (l.trace_id, l.span_id)).collect(),
                        kind: s.kind,
                    });
                }
            }
        }
        spans.lock().unwrap().extend(got);
        let answer = "HTTP/1.1 200 OK\r\nContent-Type: application/x-protobuf\r\nContent-Length: 0\r\n\r\n";
        if out.write_all(answer.as_bytes()).is_err() {
            return;
        }
    }
}

fn show(v: Option<&Value>) -> String {
    match v {
        Some(Value::StringValue(s)) => s.clone(),
        Some(Value::IntValue(i)) => i.to_string(),
        Some(Value::BoolValue(b)) => b.to_string(),
        Some(Value::DoubleValue(d)) => d.to_string(),
        other => format!("{other:?}"),
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// POSTs `body` to `path` with extra `headers`; returns (status, body).
fn post(addr: SocketAddr, path: &str, headers: &[(&str, &str)], body: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).expect("connect http");
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut head = format!(
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    s.write_all(head.as_bytes()).unwrap();
    s.write_all(body.as_bytes()).unwrap();
    let mut response = String::new();
    s.read_to_string(&mut response).unwrap();
    let status = response.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    (status, response.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default())
}

/// Lines of every file the file sink wrote into `dir`.
fn sink_lines(dir: &Path) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(dir) else { return Vec::new() };
    let mut lines = Vec::new();
    for e in entries {
        let text = std::fs::read_to_string(e.unwrap().path()).unwrap_or_default();
        lines.extend(text.lines().map(str::to_owned));
    }
    lines
}

/// Whether any segment file of the data directory holds `needle`.
fn log_holds(data_dir: &Path, needle: &[u8]) -> bool {
    log_count(data_dir, needle) > 0
}

/// How often `needle` occurs in the segment files of the data directory.
fn log_count(data_dir: &Path, needle: &[u8]) -> usize {
    let mut stack = vec![data_dir.to_path_buf()];
    let mut n = 0;
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).unwrap().flatten() {
            let path = e.path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|x| x == "log") {
                let bytes = std::fs::read(&path).unwrap();
                n += bytes.windows(needle.len()).filter(|w| *w == needle).count();
            }
        }
    }
    n
}

/// A config with pipeline `traced` from topic `orders` through a filter and a remap to
/// a file sink in `dir/out`, and `[tracing]` with `tracing` lines.
fn config(dir: &Path, tracing: &str) -> std::path::PathBuf {
    let path = dir.join("flowgate.toml");
    let out = dir.join("out");
    std::fs::write(
        &path,
        format!(
            r#"
[log]
default_partitions = 1

[tracing]
export_interval_ms = 50
{tracing}

[[pipelines]]
name = "traced"
topics = ["orders"]
commit_interval_ms = 50

[[pipelines.processors]]
type = "filter"
name = "big-orders"
condition = '(to_int(.amount) ?? 0) > 10'

[[pipelines.processors]]
type = "remap"
name = "add-tax"
source = '.tax = (to_float(.amount) ?? 0.0) * 0.2'

[[pipelines.sinks]]
name = "files"
type = "file"
path = "{}"
batch = {{ max_events = 1000, max_wait_ms = 10 }}
"#,
            out.display()
        ),
    )
    .unwrap();
    path
}

const ORDERS: &str = r#"[{"id":1,"amount":50},{"id":2,"amount":5},{"id":3,"amount":70}]"#;

fn one<'a>(spans: &'a [Span], name: &str) -> &'a Span {
    let found: Vec<&Span> = spans.iter().filter(|s| s.name == name).collect();
    assert_eq!(found.len(), 1, "one {name} span expected in {spans:#?}");
    found[0]
}

#[test]
fn a_producers_trace_continues_through_ingest_append_pipeline_processors_and_sink() {
    let collector = Collector::start();
    let dir = tempfile::tempdir().unwrap();
    let tracing =
        format!("otlp_endpoint = \"{}\"\nsample_ratio = 0.0\nservice_name = \"flowgate-test\"", collector.endpoint());
    let config = config(dir.path(), &tracing);
    // Every span target at its most verbose: spans still never reach the log lines.
    let verbose = [("RUST_LOG", "info,flowgate_engine=trace,flowgate_server=trace")];
    let engine = EngineProcess::start_with(dir.path(), Some(&config), &verbose);

    // The producer's context: its trace, its span as parent, sampled.
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let producer_span = "00f067aa0ba902b7";
    let traceparent = format!("00-{trace_id}-{producer_span}-01");
    let (status, body) = post(engine.http, "/v1/topics/orders/events", &[("traceparent", &traceparent)], ORDERS);
    assert_eq!(status, 200, "{body}");
    let trace = (0..16).map(|i| u8::from_str_radix(&trace_id[2 * i..2 * i + 2], 16).unwrap()).collect::<Vec<u8>>();
    poll_until("the sink.write span", Duration::from_secs(30), || {
        collector.spans_of(&trace).iter().any(|s| s.name == "sink.write")
    });
    // Each span ends before its parent's export can be relied on: wait for the tree.
    poll_until("the whole tree", Duration::from_secs(30), || collector.spans_of(&trace).len() >= 6);
    let spans = collector.spans_of(&trace);

    let ingest = one(&spans, "ingest");
    assert_eq!(hex(&ingest.parent_span_id), producer_span, "ingest continues the producer's span");
    assert_eq!(ingest.service, "flowgate-test");
    assert_eq!(ingest.kind, 2, "SERVER");
    assert_eq!(ingest.attr("flowgate.topic"), "orders");
    assert_eq!(ingest.attr("flowgate.events"), "3");
    assert_eq!(log_count(dir.path(), b"traceparent"), 1, "the context is stored once per request, on its first event");
    assert_eq!(ingest.attr("http.response.status_code"), "200");

    let append = one(&spans, "append");
    assert_eq!(append.parent_span_id, ingest.span_id, "append is a child of ingest");
    assert_eq!(append.attr("flowgate.events"), "3");
    assert_eq!(append.attr("flowgate.partition"), "0");
    assert_eq!(append.attr("flowgate.offset.first"), "0");

    let read = one(&spans, "pipeline.read");
    assert_eq!(read.parent_span_id, ingest.span_id, "the pipeline continues the ingest span its events carry");
    assert_eq!(read.kind, 5, "CONSUMER");
    assert_eq!(read.attr("flowgate.pipeline"), "traced");
    assert_eq!(read.attr("flowgate.events"), "3");
    assert_eq!(read.attr("flowgate.events.out"), "2", "the filter dropped one");

    let processors: Vec<&Span> = spans.iter().filter(|s| s.name == "processor").collect();
    assert_eq!(processors.len(), 2, "{processors:#?}");
    for p in &processors {
        assert_eq!(p.parent_span_id, read.span_id, "each processor is a child of the read");
    }
    let by_id = |id: &str| *processors.iter().find(|p| p.attr("flowgate.processor") == id).unwrap();
    assert_eq!(
        (by_id("big-orders").attr("flowgate.events"), by_id("big-orders").attr("flowgate.events.out")),
        ("3", "2")
    );
    assert_eq!((by_id("add-tax").attr("flowgate.events"), by_id("add-tax").attr("flowgate.events.out")), ("2", "2"));

    let write = one(&spans, "sink.write");
    assert_eq!(write.parent_span_id, read.span_id, "the sink write is a child of the read");
    assert_eq!(write.attr("flowgate.sink"), "files");
    assert_eq!(write.attr("flowgate.events"), "2");
    assert_eq!(write.attr("flowgate.outcome"), "delivered");
    assert!(write.attr("flowgate.bytes").parse::<u64>().unwrap() > 20, "{write:?}");
    assert!(write.links.is_empty());
    // The file sink's lines are in its files once it flushes them (by its commit).
    poll_until("the 2 events in the sink's files", Duration::from_secs(30), || {
        sink_lines(&dir.path().join("out")).len() == 2
    });
    assert!(collector
        .requests
        .lock()
        .unwrap()
        .iter()
        .all(|r| r.starts_with("POST /v1/traces ") && r.ends_with("application/x-protobuf")));

    // An invalid traceparent is ignored and counted, never refused; a producer that did
    // not sample is respected.
    for bad in ["00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01", "garbage", ""] {
        let (status, body) = post(engine.http, "/v1/topics/orders/events", &[("traceparent", bad)], ORDERS);
        assert_eq!(status, 200, "{bad}: {body}");
    }
    let unsampled = "00-11111111111111111111111111111111-2222222222222222-00";
    assert_eq!(post(engine.http, "/v1/topics/orders/events", &[("traceparent", unsampled)], ORDERS).0, 200);
    // A marker trace after them: once it has arrived, anything those requests were to
    // export would have arrived before it.
    let marker = "00-99999999999999999999999999999999-8888888888888888-01";
    assert_eq!(post(engine.http, "/v1/topics/orders/events", &[("traceparent", marker)], ORDERS).0, 200);
    let marker_trace = vec![0x99u8; 16];
    poll_until("the marker's sink.write", Duration::from_secs(30), || {
        collector.spans_of(&marker_trace).iter().any(|s| s.name == "sink.write")
    });
    let traces: std::collections::HashSet<Vec<u8>> = collector.spans().into_iter().map(|s| s.trace_id).collect();
    assert_eq!(
        traces.len(),
        2,
        "only the two sampled producers' traces: {:?}",
        traces.iter().map(|t| hex(t)).collect::<Vec<_>>()
    );
    assert_eq!(engine.metric("flowgate_trace_traceparent_invalid_total"), 3.0);
    poll_until("every request's 2 big orders in the sink's files", Duration::from_secs(30), || {
        sink_lines(&dir.path().join("out")).len() == 2 * 6
    });
    poll_until("the exported counter", Duration::from_secs(10), || {
        engine.metric("flowgate_trace_spans_exported_total") == collector.spans().len() as f64
    });
    // Log lines are untouched by the spans.
    let log = engine.log();
    assert!(!log.contains("pipeline.read") && !log.contains("flowgate.topic"), "{log}");
}

#[test]
fn a_batch_of_many_producers_is_a_child_of_the_first_and_links_to_the_others() {
    let collector = Collector::start();
    let dir = tempfile::tempdir().unwrap();
    let tracing = format!("otlp_endpoint = \"{}\"\nsample_ratio = 0.0", collector.endpoint());
    let config = config(dir.path(), &tracing);
    // First the producers, with no pipeline running: their batches wait in the log, and
    // the pipeline started afterwards reads them all at once.
    let no_pipeline = dir.path().join("ingest-only.toml");
    std::fs::write(
        &no_pipeline,
        format!("[log]\ndefault_partitions = 1\n[tracing]\nexport_interval_ms = 50\n{tracing}\n"),
    )
    .unwrap();
    let mut engine = EngineProcess::start_with(dir.path(), Some(&no_pipeline), &[]);
    let producers: Vec<String> =
        (1..=3).map(|n| format!("00-{}-{}-01", format!("{n:x}").repeat(32), "ab".repeat(8))).collect();
    for tp in &producers {
        assert_eq!(post(engine.http, "/v1/topics/orders/events", &[("traceparent", tp)], ORDERS).0, 200);
    }
    poll_until("three ingest spans", Duration::from_secs(30), || {
        collector.spans().iter().filter(|s| s.name == "ingest").count() == 3
    });
    let ingest: HashMap<Vec<u8>, Vec<u8>> = collector
        .spans()
        .iter()
        .filter(|s| s.name == "ingest")
        .map(|s| (s.trace_id.clone(), s.span_id.clone()))
        .collect();
    assert_eq!(engine.terminate().code(), Some(0));
    let engine = EngineProcess::start_with(dir.path(), Some(&config), &[]);
    poll_until("the read's sink.write", Duration::from_secs(30), || {
        collector.spans().iter().any(|s| s.name == "sink.write")
    });
    let reads: Vec<Span> = collector.spans().into_iter().filter(|s| s.name == "pipeline.read").collect();
    assert_eq!(reads.len(), 1, "one read of the three stored batches: {reads:#?}");
    let read = &reads[0];
    assert_eq!(read.trace_id, vec![0x11; 16], "the first producer's trace");
    assert_eq!(read.parent_span_id, ingest[&vec![0x11u8; 16]], "a child of the first batch's ingest span");
    assert_eq!(read.attr("flowgate.links"), "2");
    let linked: Vec<(Vec<u8>, Vec<u8>)> =
        [0x22u8, 0x33].iter().map(|&n| (vec![n; 16], ingest[&vec![n; 16]].clone())).collect();
    assert_eq!(read.links, linked, "linked to the other batches' ingest spans, in log order");
    drop(engine);
}

#[test]
fn sample_ratio_zero_without_traceparent_exports_nothing_and_stores_no_header() {
    let collector = Collector::start();
    let dir = tempfile::tempdir().unwrap();
    let tracing = format!("otlp_endpoint = \"{}\"\nsample_ratio = 0.0", collector.endpoint());
    let config = config(dir.path(), &tracing);
    let engine = EngineProcess::start_with(dir.path(), Some(&config), &[]);
    for _ in 0..20 {
        assert_eq!(post(engine.http, "/v1/topics/orders/events", &[], ORDERS).0, 200);
    }
    poll_until("40 events through the pipeline", Duration::from_secs(30), || {
        sink_lines(&dir.path().join("out")).len() == 40
    });
    assert!(!log_holds(dir.path(), b"traceparent"), "untraced events carry no header");
    let marker = "00-99999999999999999999999999999999-8888888888888888-01";
    assert_eq!(post(engine.http, "/v1/topics/orders/events", &[("traceparent", marker)], ORDERS).0, 200);
    poll_until("the marker's sink.write", Duration::from_secs(30), || {
        collector.spans().iter().any(|s| s.name == "sink.write")
    });
    assert!(
        collector.spans().iter().all(|s| s.trace_id == vec![0x99; 16]),
        "nothing but the marker was exported: {:#?}",
        collector.spans()
    );
    assert!(log_holds(dir.path(), b"traceparent"), "the traced request's events carry it");
}

#[test]
fn tracing_off_stores_no_header_even_when_the_request_has_one() {
    let dir = tempfile::tempdir().unwrap();
    let config = config(dir.path(), "");
    let engine = EngineProcess::start_with(dir.path(), Some(&config), &[]);
    let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    assert_eq!(post(engine.http, "/v1/topics/orders/events", &[("traceparent", tp)], ORDERS).0, 200);
    poll_until("2 events through the pipeline", Duration::from_secs(30), || {
        sink_lines(&dir.path().join("out")).len() == 2
    });
    assert!(!log_holds(dir.path(), b"traceparent"));
    let (_, stats) = engine.http("GET", "/v1/stats", b"");
    let stats: serde_json::Value = serde_json::from_str(&stats).unwrap();
    assert_eq!(stats["tracing"]["enabled"], false);
}

/// A collector that takes connections and never answers.
fn hung_collector() -> (SocketAddr, Arc<Mutex<Vec<TcpStream>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let held = Arc::new(Mutex::new(Vec::new()));
    let h = held.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            h.lock().unwrap().push(stream);
        }
    });
    (addr, held)
}

#[test]
fn a_collector_that_is_down_or_hangs_costs_spans_never_ingest_or_shutdown() {
    // Down: nothing listens on the port.
    let down = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let (hung, _held) = hung_collector();
    for (what, addr) in [("down", down), ("hung", hung)] {
        let dir = tempfile::tempdir().unwrap();
        let tracing = format!(
            "otlp_endpoint = \"http://{addr}/v1/traces\"\nsample_ratio = 1.0\nmax_queue_spans = 16\n\
             max_export_batch_spans = 8\nexport_timeout_ms = 300"
        );
        let config = config(dir.path(), &tracing);
        let mut engine = EngineProcess::start_with(dir.path(), Some(&config), &[]);
        let started = Instant::now();
        for i in 0..200 {
            let tp = format!("00-{:032x}-{:016x}-01", i + 1, i + 1);
            let (status, body) = post(engine.http, "/v1/topics/orders/events", &[("traceparent", &tp)], ORDERS);
            assert_eq!(status, 200, "{what}: {body}");
        }
        assert!(started.elapsed() < Duration::from_secs(20), "{what}: ingest slowed down: {:?}", started.elapsed());
        poll_until("every event through the pipeline", Duration::from_secs(30), || {
            sink_lines(&dir.path().join("out")).len() == 400
        });
        poll_until("dropped spans counted", Duration::from_secs(30), || {
            engine.metric("flowgate_trace_spans_dropped_total") > 0.0
                && engine.metric("flowgate_trace_export_failures_total") > 0.0
        });
        assert_eq!(engine.metric("flowgate_trace_spans_exported_total"), 0.0, "{what}");
        let stopping = Instant::now();
        assert_eq!(engine.terminate().code(), Some(0), "{what}: {}", engine.log());
        // The last flush of queued spans gives up at its first failed export: a hung
        // collector holds shutdown for one export timeout (300 ms), not the shutdown
        // bound (grace and flush, 15 s by default).
        assert!(stopping.elapsed() < Duration::from_secs(5), "{what}: shutdown took {:?}", stopping.elapsed());
        assert!(engine.log().contains("tracing: span export failed"), "{what}: {}", engine.log());
    }
}
