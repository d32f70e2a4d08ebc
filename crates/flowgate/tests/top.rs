//! `flowgate top` against a real engine: its own client samples the engine twice and its
//! view draws the samples into ratatui's `TestBackend`; and the real binary runs on a
//! pseudo-terminal (util-linux `script`), draws, and quits on `q`.

mod common;

use std::io::{Read, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{poll_until, EngineProcess};
use flowgate::top::sample::{self, Kind, Sample};
use flowgate::top::view::{self, Link, Screen, UiState};
use ratatui::backend::TestBackend;
use ratatui::Terminal;

const PIPELINE: &str = "orders-enrich";

fn start_engine(dir: &Path) -> EngineProcess {
    let out = dir.join("archive");
    let config = format!(
        r#"
[[pipelines]]
name = "{PIPELINE}"
topics = ["orders"]
commit_interval_ms = 100
[[pipelines.sinks]]
name = "archive"
type = "file"
path = "{}"
batch = {{ max_events = 100, max_wait_ms = 20 }}
"#,
        out.display()
    );
    let path = dir.join("flowgate.toml");
    std::fs::write(&path, config).unwrap();
    EngineProcess::start_with(dir, Some(&path), &[])
}

/// Posts `n` events to `orders` and waits until the pipeline's sink wrote them all.
fn send_and_wait(engine: &EngineProcess, n: usize) {
    let before = engine.metric(&format!("flowgate_sink_events_total{{pipeline=\"{PIPELINE}\""));
    let body: String = (0..n).map(|i| format!("{{\"id\":{i},\"amount\":{}}}\n", i % 17)).collect();
    let (status, answer) = engine.http("POST", "/v1/topics/orders/events", body.as_bytes());
    assert_eq!(status, 200, "{answer}");
    let target = before + n as f64;
    poll_until("the pipeline to deliver the events", Duration::from_secs(30), || {
        engine.metric(&format!("flowgate_sink_events_total{{pipeline=\"{PIPELINE}\"")) >= target
    });
}

fn render(prev: Option<&Sample>, cur: &Sample, ui: &UiState) -> Vec<String> {
    let mut terminal = Terminal::new(TestBackend::new(140, 24)).unwrap();
    let screen = Screen { addr: "engine", interval: Duration::from_secs(1), prev, cur: Some(cur), ui, link: &Link::Up };
    terminal.draw(|f| view::draw(f, &screen)).unwrap();
    let buffer = terminal.backend().buffer();
    (0..buffer.area.height)
        .map(|y| (0..buffer.area.width).map(|x| buffer[(x, y)].symbol()).collect::<String>())
        .collect()
}

/// The table line of the component `kind name`, split into its cells.
fn row<'a>(lines: &'a [String], kind: &str, name: &str) -> Option<Vec<&'a str>> {
    lines
        .iter()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|cells| cells.len() > 2 && cells[0] == kind && cells[1] == name)
}

#[test]
fn top_samples_a_live_engine_and_draws_rates_sorted_and_filtered() {
    let dir = tempfile::tempdir().unwrap();
    let engine = start_engine(dir.path());
    let addr = engine.http.to_string();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();

    // A first batch makes every counter exist; the second one moves them.
    send_and_wait(&engine, 300);
    let first = rt.block_on(sample::fetch(&addr)).expect("first sample");
    send_and_wait(&engine, 700);
    let second = rt.block_on(sample::fetch(&addr)).expect("second sample");

    let rows = view::rows(Some(&first), &second);
    let pipeline = rows.iter().find(|r| r.kind == Kind::Pipeline && r.name == PIPELINE).expect("a pipeline row");
    assert!(pipeline.in_rate.is_some_and(|r| r > 0.0), "{pipeline:?}");
    assert!(pipeline.out_rate.is_some_and(|r| r > 0.0), "{pipeline:?}");
    let sink =
        rows.iter().find(|r| r.kind == Kind::Sink && r.name == format!("{PIPELINE}/archive")).expect("a sink row");
    assert!(sink.batch.is_some() && sink.concurrency.is_some() && sink.state.as_deref() == Some("closed"), "{sink:?}");
    let topic = rows.iter().find(|r| r.kind == Kind::Topic && r.name == "orders").expect("a topic row");
    assert!(topic.in_rate.is_some_and(|r| r > 0.0), "{topic:?}");
    assert!(second.memory.as_ref().is_some_and(|m| m.limit > 0));

    let ui = UiState::default();
    let lines = render(Some(&first), &second, &ui);
    let text = lines.join("\n");
    assert!(text.contains("memory"), "{text}");
    let cells = row(&lines, "pipeline", PIPELINE).unwrap_or_else(|| panic!("no pipeline row in\n{text}"));
    // IN/S and OUT/S: a number that is not zero.
    for rate in &cells[2..4] {
        assert!(
            !["0", "-"].contains(rate) && rate.starts_with(|c: char| c.is_ascii_digit()),
            "rate {rate:?} in\n{text}"
        );
    }
    assert!(row(&lines, "sink", &format!("{PIPELINE}/archive")).is_some(), "{text}");
    assert!(row(&lines, "topic", "orders").is_some(), "{text}");

    // A filter hides the rows that do not match it.
    let filtered = UiState { filter: "topic".into(), ..UiState::default() };
    let lines = render(Some(&first), &second, &filtered);
    let text = lines.join("\n");
    assert!(row(&lines, "topic", "orders").is_some(), "{text}");
    assert!(
        lines.iter().all(|l| !l.trim_start().starts_with("pipeline") && !l.trim_start().starts_with("sink")),
        "the filter left other rows in\n{text}"
    );
    let filtered = UiState { filter: "archive".into(), ..UiState::default() };
    let lines = render(Some(&first), &second, &filtered);
    assert!(row(&lines, "sink", &format!("{PIPELINE}/archive")).is_some());
    assert!(row(&lines, "pipeline", PIPELINE).is_none() && row(&lines, "topic", "orders").is_none());

    // Sorted by in/s, highest first: the pipeline and the topic (which both saw the 700
    // events) come before the sink (no in/s).
    let by_in = UiState { sort: view::SortBy::In, ..UiState::default() };
    let lines = render(Some(&first), &second, &by_in);
    let position = |kind: &str, name: &str| lines.iter().position(|l| l.split_whitespace().take(2).eq([kind, name]));
    assert!(position("sink", &format!("{PIPELINE}/archive")) > position("pipeline", PIPELINE));
}

/// `flowgate top` on a pseudo-terminal of 30×140 made by `script`; its output (escape
/// sequences and all) is gathered as it comes.
struct Pty {
    child: std::process::Child,
    output: Arc<Mutex<Vec<u8>>>,
}

impl Pty {
    /// `None` where util-linux `script` is missing.
    fn top(addr: &str) -> Option<Pty> {
        let bin = common::flowgate_bin();
        let command = format!("stty rows 30 cols 140 && exec '{}' top --addr {addr} --interval-ms 200", bin.display());
        let mut child = match Command::new("script")
            .args(["-qfec", &command, "/dev/null"])
            .env("TERM", "xterm-256color")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
        {
            Ok(c) => c,
            Err(e) => {
                eprintln!("skipped: cannot run util-linux `script` ({e})");
                return None;
            }
        };
        let mut stdout = child.stdout.take().unwrap();
        let output = Arc::new(Mutex::new(Vec::new()));
        let sink = output.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 8192];
            while let Ok(n) = stdout.read(&mut buf) {
                if n == 0 {
                    break;
                }
                sink.lock().unwrap().extend_from_slice(&buf[..n]);
            }
        });
        Some(Pty { child, output })
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.output.lock().unwrap()).into_owned()
    }

    fn wait_for(&self, what: &str) {
        poll_until(&format!("top to draw {what:?}"), Duration::from_secs(30), || self.text().contains(what));
    }

    /// Presses `q` and waits for a clean exit.
    fn quit(mut self) -> String {
        self.child.stdin.as_mut().unwrap().write_all(b"q").unwrap();
        self.child.stdin.as_mut().unwrap().flush().unwrap();
        let mut status = None;
        poll_until("top to quit on q", Duration::from_secs(15), || {
            status = self.child.try_wait().unwrap();
            status.is_some()
        });
        let mut stderr = String::new();
        let _ = self.child.stderr.take().unwrap().read_to_string(&mut stderr);
        assert!(status.unwrap().success(), "top exited with {status:?}: {stderr}\n{}", self.text());
        self.text()
    }
}

impl Drop for Pty {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn the_binary_draws_on_a_terminal_and_quits_on_q_restoring_it() {
    let dir = tempfile::tempdir().unwrap();
    let engine = start_engine(dir.path());
    send_and_wait(&engine, 50);
    let Some(top) = Pty::top(&engine.http.to_string()) else { return };
    top.wait_for(PIPELINE);
    top.wait_for("memory");
    let output = top.quit();
    // Left the alternate screen and showed the cursor again.
    assert!(output.contains("\x1b[?1049l"), "the alternate screen was not left:\n{output:?}");
    assert!(output.contains("\x1b[?25h"), "the cursor was not shown again");
}

#[test]
fn the_binary_says_when_the_engine_is_unreachable_and_keeps_running() {
    // A port nothing listens on: bound, then closed.
    let addr = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().to_string();
    let Some(top) = Pty::top(&addr) else { return };
    top.wait_for("engine unreachable");
    // Still retrying: each failed attempt redraws the count of them.
    let drawn = top.output.lock().unwrap().len();
    poll_until("top to retry", Duration::from_secs(15), || top.output.lock().unwrap().len() > drawn);
    let output = top.quit();
    assert!(output.contains("\x1b[?1049l"), "the alternate screen was not left:\n{output:?}");
}

#[test]
fn top_without_a_terminal_says_what_to_do() {
    let (code, _, stderr) = common::cli(&["top", "--addr", "127.0.0.1:1"], None);
    assert_ne!(code, 0);
    assert!(stderr.contains("/v1/stats"), "{stderr}");
    let (code, _, stderr) = common::cli(&["top", "--addr", "nowhere"], None);
    assert_ne!(code, 0);
    assert!(stderr.contains("host:port"), "{stderr}");
}
