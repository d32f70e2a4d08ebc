//! An HTTP target for the http sink that the test controls: it records the events
//! (payload field `n`) of the requests it accepts and answers as the test says.

use std::io::{BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// What the target does with one request: the events it got (payload `n`s, in order) and
/// the answer (status, body).
pub type Decide = dyn Fn(u64, &[u64]) -> (u16, String) + Send + Sync;

/// A small HTTP/1.1 server (keep-alive) that records the events of the requests it
/// accepts and answers as `decide` says.
pub struct Target {
    pub port: u16,
    pub delivered: Arc<Mutex<Vec<u64>>>,
    pub requests: Arc<AtomicU64>,
}

impl Target {
    pub fn start(decide: Arc<Decide>) -> Target {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let delivered = Arc::new(Mutex::new(Vec::new()));
        let requests = Arc::new(AtomicU64::new(0));
        let (d, r) = (delivered.clone(), requests.clone());
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { return };
                let (decide, delivered, requests) = (decide.clone(), d.clone(), r.clone());
                std::thread::spawn(move || serve(stream, &*decide, &delivered, &requests));
            }
        });
        Target { port, delivered, requests }
    }
}

fn serve(stream: TcpStream, decide: &Decide, delivered: &Mutex<Vec<u64>>, requests: &AtomicU64) {
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut out = stream;
    while let Some(request) = super::read_request(&mut reader) {
        let events: Vec<u64> = request
            .body
            .split(|b| *b == b'\n')
            .filter(|l| !l.is_empty())
            .map(|l| serde_json::from_slice::<serde_json::Value>(l).unwrap()["n"].as_u64().unwrap())
            .collect();
        let nth = requests.fetch_add(1, Ordering::SeqCst);
        let (status, answer) = decide(nth, &events);
        if status < 300 {
            let refused: Vec<usize> = serde_json::from_str::<serde_json::Value>(&answer)
                .ok()
                .and_then(|v| v["results"].as_array().cloned())
                .unwrap_or_default()
                .iter()
                .map(|r| r["index"].as_u64().unwrap() as usize)
                .collect();
            let mut d = delivered.lock().unwrap();
            d.extend(events.iter().enumerate().filter(|(i, _)| !refused.contains(i)).map(|(_, n)| *n));
        }
        let reason = if status < 300 { "OK" } else { "Failed" };
        let response = format!(
            "HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{answer}",
            answer.len()
        );
        if out.write_all(response.as_bytes()).is_err() {
            return;
        }
    }
}

/// A config with pipeline `p` from topic `in` (1 partition) to an http sink `api` at the
/// target on `port`, with `extra` lines in the pipeline's table, written to `dir/name`.
pub fn http_pipeline_config(dir: &Path, name: &str, port: u16, extra: &str) -> std::path::PathBuf {
    let path = dir.join(name);
    std::fs::write(
        &path,
        format!(
            r#"
[log]
default_partitions = 1
[[pipelines]]
name = "p"
topics = ["in"]
commit_interval_ms = 50
{extra}
[[pipelines.sinks]]
name = "api"
type = "http"
url = "http://127.0.0.1:{port}/ingest"
per_event_results = true
batch = {{ max_events = 20, max_wait_ms = 10 }}
retry = {{ initial_backoff_ms = 10, max_backoff_ms = 100 }}
"#
        ),
    )
    .unwrap();
    path
}
