//! The dashboard at `/` in a real headless Chromium (Debian's `chromium`, installed by
//! scripts/install-test-services) against a live engine under load: the page renders
//! without console errors, its numbers move, and they agree with `/v1/stats`.
//!
//! The browser is driven over the DevTools protocol on a pipe (`--remote-debugging-pipe`:
//! JSON messages ended by a NUL byte on file descriptors 3 and 4), so the test needs no
//! WebDriver and no WebSocket client.

mod common;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use common::postgres::PgServer;
use common::{poll_until, EngineProcess};
use serde_json::{json, Value};

/// Messages from the browser: answers by id, and every event.
#[derive(Default)]
struct Inbox {
    answers: HashMap<u64, Value>,
    events: Vec<Value>,
}

/// A headless Chromium and one page in it, attached with a flat session.
struct Browser {
    child: Child,
    to: ChildStdin,
    inbox: Arc<(Mutex<Inbox>, Condvar)>,
    next_id: u64,
    session: String,
    _profile: tempfile::TempDir,
}

impl Browser {
    fn start(width: u32, height: u32) -> Browser {
        let chromium = ["chromium", "chromium-browser"]
            .into_iter()
            .find(|c| Command::new(c).arg("--version").stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok())
            .expect("Chromium is needed: run scripts/install-test-services (Debian's chromium package)");
        let profile = tempfile::tempdir().unwrap();
        // fd 3 reads what the test writes to the shell's stdin, fd 4 writes to its stdout.
        let script = format!(
            "exec {chromium} --headless --no-sandbox --disable-gpu --disable-dev-shm-usage --no-first-run \
             --disable-extensions --disable-background-networking --disable-sync --hide-scrollbars --mute-audio \
             --window-size={width},{height} --user-data-dir='{}' --remote-debugging-pipe about:blank \
             3<&0 4>&1 </dev/null >/dev/null",
            profile.path().display()
        );
        let mut child = Command::new("sh")
            .arg("-c")
            .arg(script)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start chromium");
        let to = child.stdin.take().unwrap();
        let from = child.stdout.take().unwrap();
        let inbox: Arc<(Mutex<Inbox>, Condvar)> = Arc::default();
        let inbox2 = inbox.clone();
        std::thread::spawn(move || {
            let mut reader = BufReader::new(from);
            let mut buf = Vec::new();
            while reader.read_until(0, &mut buf).unwrap_or(0) > 0 {
                if buf.last() == Some(&0) {
                    buf.pop();
                }
                if let Ok(msg) = serde_json::from_slice::<Value>(&buf) {
                    let (lock, cv) = &*inbox2;
                    let mut inbox = lock.lock().unwrap();
                    match msg.get("id").and_then(Value::as_u64) {
                        Some(id) => {
                            inbox.answers.insert(id, msg);
                        }
                        None => inbox.events.push(msg),
                    }
                    cv.notify_all();
                }
                buf.clear();
            }
        });
        let mut browser = Browser { child, to, inbox, next_id: 0, session: String::new(), _profile: profile };
        let target = browser.call(None, "Target.createTarget", json!({"url": "about:blank"}));
        let target_id = target["targetId"].as_str().expect("a target id").to_owned();
        let attached = browser.call(None, "Target.attachToTarget", json!({"targetId": target_id, "flatten": true}));
        browser.session = attached["sessionId"].as_str().expect("a session id").to_owned();
        for domain in ["Runtime.enable", "Log.enable", "Page.enable"] {
            browser.page(domain, json!({}));
        }
        browser.page(
            "Emulation.setDeviceMetricsOverride",
            json!({"width": width, "height": height, "deviceScaleFactor": 1, "mobile": false}),
        );
        browser
    }

    /// Sends one command (to the browser, or to the page's session) and waits for its answer.
    fn call(&mut self, session: Option<&str>, method: &str, params: Value) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        let mut msg = json!({"id": id, "method": method, "params": params});
        if let Some(s) = session {
            msg["sessionId"] = json!(s);
        }
        let mut bytes = serde_json::to_vec(&msg).unwrap();
        bytes.push(0);
        self.to.write_all(&bytes).expect("write to chromium");
        self.to.flush().unwrap();
        let (lock, cv) = &*self.inbox;
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut inbox = lock.lock().unwrap();
        loop {
            if let Some(answer) = inbox.answers.remove(&id) {
                assert!(answer.get("error").is_none(), "{method}: {answer}");
                return answer["result"].clone();
            }
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(!left.is_zero(), "chromium did not answer {method}");
            inbox = cv.wait_timeout(inbox, left).unwrap().0;
        }
    }

    fn page(&mut self, method: &str, params: Value) -> Value {
        let session = self.session.clone();
        self.call(Some(&session), method, params)
    }

    /// Evaluates `expression` in the page; returns its value (JSON-serializable).
    fn eval(&mut self, expression: &str) -> Value {
        let r = self.page("Runtime.evaluate", json!({"expression": expression, "returnByValue": true}));
        assert!(r.get("exceptionDetails").is_none(), "{expression}: {r}");
        r["result"]["value"].clone()
    }

    /// Console errors, uncaught exceptions and browser log errors seen so far.
    fn errors(&self) -> Vec<Value> {
        let inbox = self.inbox.0.lock().unwrap();
        inbox
            .events
            .iter()
            .filter(|e| match e["method"].as_str() {
                Some("Runtime.exceptionThrown") => true,
                Some("Runtime.consoleAPICalled") => matches!(e["params"]["type"].as_str(), Some("error" | "assert")),
                Some("Log.entryAdded") => e["params"]["entry"]["level"] == "error",
                _ => false,
            })
            .cloned()
            .collect()
    }

    fn screenshot(&mut self) -> Vec<u8> {
        let shot = self.page("Page.captureScreenshot", json!({"format": "png", "captureBeyondViewport": true}));
        base64_decode(shot["data"].as_str().expect("screenshot data"))
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.call(None, "Browser.close", json!({}));
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn base64_decode(text: &str) -> Vec<u8> {
    let value = |c: u8| match c {
        b'A'..=b'Z' => c - b'A',
        b'a'..=b'z' => c - b'a' + 26,
        b'0'..=b'9' => c - b'0' + 52,
        b'+' => 62,
        b'/' => 63,
        _ => panic!("not base64: {c}"),
    };
    let bytes: Vec<u8> = text.bytes().filter(|&c| c != b'=' && !c.is_ascii_whitespace()).map(value).collect();
    let mut out = Vec::with_capacity(bytes.len() * 3 / 4);
    for chunk in bytes.chunks(4) {
        let n = chunk.iter().enumerate().fold(0u32, |n, (i, &v)| n | (u32::from(v) << (18 - 6 * i)));
        out.extend_from_slice(&n.to_be_bytes()[1..chunk.len()]);
    }
    out
}

/// A number the page shows in `data-v` of the element `selector`, if it shows one.
fn page_number(browser: &mut Browser, selector: &str) -> Option<f64> {
    let v = browser.eval(&format!("(document.querySelector({selector:?}) || {{dataset: {{}}}}).dataset.v || ''"));
    v.as_str().and_then(|s| s.parse().ok())
}

fn stats(engine: &EngineProcess) -> Value {
    let (status, body) = engine.http("GET", "/v1/stats", b"");
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

fn topic_events(stats: &Value, topic: &str) -> f64 {
    stats["topics"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|t| t["name"] == topic)
        .flat_map(|t| t["partitions"].as_array().unwrap().iter())
        .map(|p| p["end_offset"].as_f64().unwrap())
        .sum()
}

#[test]
fn the_dashboard_renders_live_numbers_that_agree_with_stats() {
    // A change-data-capture source writes into the pipeline's topic too.
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
name = "orders"
topics = ["orders"]
commit_interval_ms = 100
[[pipelines.processors]]
type = "filter"
condition = ".skip != true"
[[pipelines.sinks]]
name = "copy"
type = "topic"
topic = "orders-copy"
batch = {{ max_events = 200, max_wait_ms = 20 }}
[[pipelines.sinks]]
name = "drain"
type = "blackhole"
"#,
            pg.url()
        ),
    )
    .unwrap();
    let engine = EngineProcess::start_with(&dir.path().join("data"), Some(&config), &[]);

    // Load: batches of events from a thread until the test ends.
    let stop = Arc::new(AtomicBool::new(false));
    let loader = {
        let stop = stop.clone();
        let addr = engine.http;
        std::thread::spawn(move || {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let batch: Vec<String> = (0..50)
                    .map(|i| {
                        n += 1;
                        format!(r#"{{"id":{n},"skip":{}}}"#, i % 10 == 0)
                    })
                    .collect();
                let (status, body) = common::http_request(
                    addr,
                    "POST",
                    "/v1/topics/orders/events",
                    format!("[{}]", batch.join(",")).as_bytes(),
                );
                assert_eq!(status, 200, "{body}");
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };

    // The page and its files come from the engine, with types and validators.
    let (status, html) = engine.http("GET", "/", b"");
    assert_eq!(status, 200);
    assert!(html.contains("/dashboard/app.js") && html.contains("/dashboard/uPlot.iife.min.js"), "{html}");
    let (status, _) = engine.http("GET", "/dashboard/nothing.js", b"");
    assert_eq!(status, 404);

    let mut browser = Browser::start(1440, 1000);
    browser.page("Page.navigate", json!({"url": format!("http://{}/", engine.http)}));

    // The graph: the source, the topic, the filter and two sinks, with a rate on each of
    // four edges.
    poll_until("the page shows rates and the pipeline graph", Duration::from_secs(30), || {
        page_number(&mut browser, "#in-rate").is_some()
            && page_number(&mut browser, "#out-rate").is_some_and(|r| r > 0.0)
            && browser.eval("document.querySelectorAll('#graph .node').length").as_u64() == Some(5)
            && browser.eval("document.querySelectorAll('#graph text.rate').length").as_u64() == Some(4)
    });

    // The rates move under load.
    let first = page_number(&mut browser, "#in-rate").unwrap();
    let mut second = first;
    poll_until("the events-in rate changes", Duration::from_secs(20), || {
        second = page_number(&mut browser, "#in-rate").unwrap_or(first);
        second != first
    });
    assert!(first > 0.0 || second > 0.0, "rates {first} {second}");

    // The page agrees with /v1/stats: a counter read between two reads of the stats (the
    // page shows a document at most a second old), and a limit that does not change.
    let before = stats(&engine);
    std::thread::sleep(Duration::from_millis(2500));
    let shown =
        page_number(&mut browser, "tr[data-topic='orders'] td[data-k='topic-events']").expect("orders on the page");
    let after = stats(&engine);
    let (low, high) = (topic_events(&before, "orders"), topic_events(&after, "orders"));
    assert!(low <= shown && shown <= high, "page shows {shown} events in orders; /v1/stats said {low}, then {high}");
    assert!(low < high, "the load stopped: {low} {high}");
    let limit =
        page_number(&mut browser, "tr[data-k='memory-limit'] td[data-v]").expect("the memory limit on the page");
    assert_eq!(limit, after["memory"]["limit_bytes"].as_f64().unwrap());
    let page_sinks = browser.eval("document.querySelectorAll('#sinks tbody tr[data-key]').length");
    assert_eq!(page_sinks, json!(2));

    // Clicking a sink shows its details.
    browser.eval("document.querySelector(\"#graph .node[data-key='sink:orders:copy']\").dispatchEvent(new MouseEvent('click', {bubbles: true}))");
    poll_until("the sink's details", Duration::from_secs(10), || {
        browser
            .eval("document.getElementById('details-table').textContent")
            .as_str()
            .is_some_and(|t| t.contains("batch_target"))
    });

    // Dark and light, each in a screenshot.
    let shots = std::env::var_os("FLOWGATE_DASHBOARD_SCREENSHOTS").map_or_else(|| dir.path().to_path_buf(), Into::into);
    for (scheme, file) in [("light", "dashboard.png"), ("dark", "dashboard-dark.png")] {
        browser.page(
            "Emulation.setEmulatedMedia",
            json!({"features": [{"name": "prefers-color-scheme", "value": scheme}]}),
        );
        std::thread::sleep(Duration::from_millis(1500));
        let background = browser.eval("getComputedStyle(document.body).backgroundColor");
        let dark = background.as_str().is_some_and(|b| b.starts_with("rgb(15,") || b.starts_with("rgb(15 "));
        assert_eq!(dark, scheme == "dark", "{scheme}: background {background}");
        let png = browser.screenshot();
        assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
        std::fs::write(std::path::Path::new(&shots).join(file), png).unwrap();
    }

    let errors = browser.errors();
    assert!(errors.is_empty(), "console errors: {errors:#?}");
    stop.store(true, Ordering::Relaxed);
    loader.join().unwrap();
}
