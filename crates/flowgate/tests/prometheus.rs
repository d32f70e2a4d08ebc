//! `/metrics` as Prometheus reads it: the content type of each format it serves,
//! `promtool check metrics` on a live engine's exposition, the shipped alert rules
//! (`deploy/prometheus/alerts.yml`) through `promtool check rules` and `promtool test
//! rules`, every metric the rules and the Grafana dashboard (`deploy/grafana/flowgate.json`)
//! name exported by the engine, and a real Prometheus scraping an engine and evaluating
//! the rules against it.
//!
//! `promtool` and `prometheus` come from Debian's `prometheus` package (scripts/test
//! installs it).

mod common;

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::postgres::PgServer;
use common::{poll_until, EngineProcess};
use serde_json::Value;

/// What Prometheus sends when it scrapes.
const PROMETHEUS_ACCEPT: &str = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn alerts_yml() -> PathBuf {
    repo().join("deploy/prometheus/alerts.yml")
}

fn dashboard_json() -> PathBuf {
    repo().join("deploy/grafana/flowgate.json")
}

fn tool(name: &str) -> PathBuf {
    for dir in std::env::var("PATH").unwrap_or_default().split(':').chain(["/usr/bin", "/usr/local/bin"]) {
        let path = Path::new(dir).join(name);
        if path.is_file() {
            return path;
        }
    }
    panic!("{name} is not installed (Debian's `prometheus` package has it; scripts/test installs it)");
}

/// Runs `promtool` with `args` and `stdin`; returns (success, stdout and stderr).
fn promtool(args: &[&str], stdin: Stdio) -> (bool, String) {
    let out = Command::new(tool("promtool")).args(args).stdin(stdin).output().expect("run promtool");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

/// An HTTP/1.0 GET (so the body is not chunked) with an `Accept` header; returns
/// (status, content type, body).
fn get(addr: SocketAddr, path: &str, accept: Option<&str>) -> (u16, String, String) {
    let mut s = TcpStream::connect(addr).expect("connect http");
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let accept = accept.map(|a| format!("Accept: {a}\r\n")).unwrap_or_default();
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n{accept}\r\n").unwrap();
    let mut response = Vec::new();
    s.read_to_end(&mut response).unwrap();
    let text = String::from_utf8(response).expect("a UTF-8 response");
    let (head, body) = text.split_once("\r\n\r\n").expect("a response head");
    let status = head.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let content_type = head
        .lines()
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.eq_ignore_ascii_case("content-type"))
        .map(|(_, v)| v.trim().to_owned())
        .unwrap_or_default();
    (status, content_type, body.to_owned())
}

/// Every `flowgate_…` name in `text`.
fn flowgate_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = text;
    while let Some(at) = rest.find("flowgate_") {
        let before = rest[..at].chars().next_back();
        let tail = &rest[at..];
        let end =
            tail.find(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')).unwrap_or(tail.len());
        // Not the tail of a longer identifier (`my_flowgate_x`).
        if !before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_') {
            names.insert(tail[..end].to_owned());
        }
        rest = &tail[end..];
    }
    names
}

/// The metric families of a text-format exposition (their `# TYPE` lines).
fn families(exposition: &str) -> BTreeSet<String> {
    exposition
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split(' ').next())
        .map(str::to_owned)
        .collect()
}

/// Whether `name` is a family of `families`, or a histogram's series of one.
fn exported(name: &str, families: &BTreeSet<String>) -> bool {
    families.contains(name)
        || ["_bucket", "_sum", "_count"]
            .iter()
            .any(|suffix| name.strip_suffix(suffix).is_some_and(|family| families.contains(family)))
}

/// An engine with every kind of component the rules and dashboard watch: a PostgreSQL
/// source (with a snapshot), a pipeline with a processor and a sink, events through
/// both ingest and the source.
struct Loaded {
    engine: EngineProcess,
    _pg: PgServer,
    _dir: tempfile::TempDir,
}

fn loaded_engine() -> Loaded {
    let pg = PgServer::start();
    pg.psql("create table orders (id int primary key, amount int); insert into orders values (1, 10), (2, 20)");
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("flowgate.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[[sources]]
name = "shop"
type = "postgres_cdc"
url = "{}"
tables = ["public.orders"]
topic = "orders"
status_interval_ms = 100

[[pipelines]]
name = "copy"
topics = ["in"]
commit_interval_ms = 100
[[pipelines.processors]]
type = "filter"
condition = ".skip != true"
[[pipelines.sinks]]
name = "next"
type = "topic"
topic = "out"
batch = {{ max_events = 100, max_wait_ms = 10 }}
"#,
            pg.url()
        ),
    )
    .unwrap();
    let engine = EngineProcess::start_with(&dir.path().join("data"), Some(&config), &[]);
    let (status, body) = engine.http("POST", "/v1/topics/in/events", br#"[{"n":1},{"n":2},{"n":3,"skip":true}]"#);
    assert_eq!(status, 200, "{body}");
    poll_until("the sink writes the events", Duration::from_secs(30), || {
        engine.metric("flowgate_sink_events_total{pipeline=\"copy\",sink=\"next\"}") >= 2.0
    });
    poll_until("the source stores its snapshot", Duration::from_secs(60), || {
        engine.metric("flowgate_source_snapshot_rows{source=\"shop\"}") >= 2.0
    });
    Loaded { engine, _pg: pg, _dir: dir }
}

#[test]
fn metrics_have_the_content_type_of_their_format_and_pass_promtool() {
    let loaded = loaded_engine();
    let addr = loaded.engine.http;

    // curl, promtool and any scraper that does not ask for OpenMetrics: text format 0.0.4.
    for accept in [None, Some("*/*"), Some("text/plain;version=0.0.4")] {
        let (status, content_type, body) = get(addr, "/metrics", accept);
        assert_eq!(status, 200);
        assert_eq!(content_type, "text/plain; version=0.0.4; charset=utf-8", "Accept: {accept:?}");
        assert!(!body.contains("# EOF") && !body.contains("# UNIT"), "{body}");
        assert!(body.contains("# TYPE flowgate_sink_events_total counter\n"), "{body}");
        assert!(body.contains("\nflowgate_source_snapshot_rows{source=\"shop\"} 2\n"), "{body}");
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), &body).unwrap();
        let (ok, out) = promtool(&["check", "metrics"], Stdio::from(std::fs::File::open(file.path()).unwrap()));
        assert!(ok, "promtool check metrics:\n{out}\n{body}");
        assert!(out.trim().is_empty(), "promtool check metrics found problems:\n{out}");
        for line in body.lines().filter(|l| l.starts_with("# TYPE ") && l.ends_with(" counter")) {
            assert!(line.split(' ').nth(2).unwrap().ends_with("_total"), "{line}");
        }
    }

    // Prometheus asks for OpenMetrics first and gets it, with its content type.
    let (status, content_type, body) = get(addr, "/metrics", Some(PROMETHEUS_ACCEPT));
    assert_eq!(status, 200);
    assert_eq!(content_type, "application/openmetrics-text; version=1.0.0; charset=utf-8");
    assert!(body.ends_with("# EOF\n"), "the end marker comes last:\n{body}");
    assert_eq!(body.matches("# EOF").count(), 1);
    assert!(body.contains("# TYPE flowgate_sink_events counter\n"), "{body}");
    assert!(body.contains("\nflowgate_sink_events_total{pipeline=\"copy\",sink=\"next\"} 2\n"), "{body}");
    assert!(body.contains("# TYPE flowgate_source_changes counter\n"), "source metrics before # EOF:\n{body}");
}

#[test]
fn the_alert_rules_pass_promtool_check_and_their_unit_tests() {
    let rules = alerts_yml();
    let (ok, out) = promtool(&["check", "rules", rules.to_str().unwrap()], Stdio::null());
    assert!(ok, "promtool check rules:\n{out}");
    assert!(out.contains("SUCCESS"), "{out}");
    let tests = repo().join("deploy/prometheus/alerts_test.yml");
    let (ok, out) = promtool(&["test", "rules", tests.to_str().unwrap()], Stdio::null());
    assert!(ok, "promtool test rules:\n{out}");
}

#[test]
fn the_dashboard_is_importable_and_covers_every_area() {
    let text = std::fs::read_to_string(dashboard_json()).unwrap();
    let dashboard: Value = serde_json::from_str(&text).expect("the dashboard is JSON");
    assert!(dashboard["title"].as_str().is_some_and(|t| !t.is_empty()));
    assert!(dashboard["uid"].as_str().is_some_and(|u| !u.is_empty()));
    assert!(dashboard["schemaVersion"].as_u64().is_some());
    assert!(dashboard["id"].is_null(), "an importable dashboard has no id of its own");
    let variables = dashboard["templating"]["list"].as_array().unwrap();
    assert!(variables.iter().any(|v| v["type"] == "datasource" && v["query"] == "prometheus"));
    let panels = dashboard["panels"].as_array().unwrap();
    let titles: Vec<String> = panels.iter().map(|p| p["title"].as_str().unwrap_or_default().to_lowercase()).collect();
    for area in ["throughput", "lag", "sink write latency", "errors", "breaker", "memory", "dead letters", "source"] {
        assert!(titles.iter().any(|t| t.contains(area)), "no panel for {area}: {titles:?}");
    }
    let mut ids = BTreeSet::new();
    for panel in panels.iter().filter(|p| p["type"] != "row") {
        assert!(ids.insert(panel["id"].as_u64().unwrap()), "panel ids are unique");
        for key in ["x", "y", "w", "h"] {
            assert!(panel["gridPos"][key].as_u64().is_some(), "{panel}");
        }
        let targets = panel["targets"].as_array().unwrap();
        assert!(!targets.is_empty(), "{}", panel["title"]);
        for target in targets {
            assert!(target["expr"].as_str().is_some_and(|e| e.contains("flowgate_")), "{target}");
        }
        assert_eq!(panel["datasource"]["uid"], "${datasource}", "{}", panel["title"]);
    }
}

#[test]
fn the_alert_rules_and_the_dashboard_name_only_metrics_the_engine_exports() {
    let loaded = loaded_engine();
    let (_, _, exposition) = get(loaded.engine.http, "/metrics", None);
    let families = families(&exposition);
    for (file, text) in [
        (alerts_yml(), std::fs::read_to_string(alerts_yml()).unwrap()),
        (dashboard_json(), std::fs::read_to_string(dashboard_json()).unwrap()),
    ] {
        let names = flowgate_names(&text);
        assert!(names.len() >= 10, "{}: {names:?}", file.display());
        let missing: Vec<_> = names.iter().filter(|n| !exported(n, &families)).collect();
        assert!(missing.is_empty(), "{} names metrics the engine does not export: {missing:?}", file.display());
    }
}

/// A Prometheus server of the test's own, scraping one target every 100 ms and
/// evaluating the shipped rules.
struct Prometheus {
    child: Child,
    addr: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Prometheus {
    fn start(target: SocketAddr) -> Prometheus {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 100ms\n  evaluation_interval: 100ms\n\
                 rule_files:\n  - {}\n\
                 scrape_configs:\n  - job_name: flowgate\n    static_configs:\n      - targets: ['{target}']\n",
                alerts_yml().display()
            ),
        )
        .unwrap();
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let child = Command::new(tool("prometheus"))
            .arg(format!("--config.file={}", config.display()))
            .arg(format!("--storage.tsdb.path={}", dir.path().join("data").display()))
            .arg(format!("--web.listen-address={addr}"))
            .arg("--log.level=warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("prometheus.log")).unwrap())
            .spawn()
            .expect("start prometheus");
        Prometheus { child, addr, _dir: dir }
    }

    fn api(&self, path: &str) -> Option<Value> {
        let mut s = TcpStream::connect(self.addr).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
        write!(s, "GET {path} HTTP/1.0\r\nHost: {}\r\n\r\n", self.addr).ok()?;
        let mut response = String::new();
        s.read_to_string(&mut response).ok()?;
        serde_json::from_str(response.split_once("\r\n\r\n")?.1).ok()
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self._dir.path().join("prometheus.log")).unwrap_or_default()
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn a_real_prometheus_scrapes_the_engine_and_evaluates_the_rules() {
    let loaded = loaded_engine();
    let prometheus = Prometheus::start(loaded.engine.http);

    poll_until("Prometheus scrapes the engine", Duration::from_secs(60), || {
        let Some(targets) = prometheus.api("/api/v1/targets") else { return false };
        let target = &targets["data"]["activeTargets"][0];
        assert!(target["lastError"].as_str().unwrap_or_default().is_empty(), "scrape error: {target}");
        target["health"] == "up"
    });
    let query = |q: &str| {
        let path = format!("/api/v1/query?query={q}");
        prometheus.api(&path).map(|v| v["data"]["result"].as_array().cloned().unwrap_or_default())
    };
    // The counter as Prometheus stored it, with the value the engine counted.
    poll_until("the sink's counter in Prometheus", Duration::from_secs(30), || {
        query("flowgate_sink_events_total")
            .is_some_and(|r| r.iter().any(|s| s["metric"]["sink"] == "next" && s["value"][1].as_str() == Some("2")))
    });
    let metadata = prometheus.api("/api/v1/metadata?metric=flowgate_sink_events").unwrap();
    assert_eq!(metadata["data"]["flowgate_sink_events"][0]["type"], "counter", "{metadata}");
    assert!(query("flowgate_source_connected%7Bsource%3D%22shop%22%7D").is_some_and(|r| r.len() == 1));
    assert!(query("flowgate_memory_used_bytes").is_some_and(|r| !r.is_empty()));

    // Every rule loads and evaluates without error against the engine's series.
    poll_until("every rule evaluated", Duration::from_secs(30), || {
        let Some(rules) = prometheus.api("/api/v1/rules") else { return false };
        let groups = rules["data"]["groups"].as_array().cloned().unwrap_or_default();
        let all: Vec<Value> = groups.iter().flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default()).collect();
        assert!(!all.is_empty(), "no rules loaded: {rules}\n{}", prometheus.log());
        for rule in &all {
            assert_ne!(rule["health"], "err", "rule failed: {rule}");
        }
        all.iter().all(|r| r["health"] == "ok")
    });
    // Nothing is wrong with this engine, so nothing fires.
    let alerts = prometheus.api("/api/v1/alerts").unwrap();
    let firing = alerts["data"]["alerts"].as_array().unwrap();
    assert!(firing.is_empty(), "alerts (firing or pending) on a healthy engine: {firing:?}");
}
