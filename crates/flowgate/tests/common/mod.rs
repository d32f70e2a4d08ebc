//! Real engine processes for end-to-end tests: each test starts `flowgate run` on free
//! ports with its own data directory, and can SIGKILL and restart it.

#![allow(dead_code)]

pub mod postgres;
pub mod target;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The `flowgate` binary under test.
pub fn flowgate_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_flowgate"))
}

/// Polls `done` every 50 ms until it holds; fails the test after `timeout`.
pub fn poll_until(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The JSON header (first line) of a pipeline checkpoint file, if it can be read.
pub fn checkpoint_header(path: &Path) -> Option<serde_json::Value> {
    let bytes = std::fs::read(path).ok()?;
    serde_json::from_slice(&bytes[..bytes.iter().position(|&b| b == b'\n')?]).ok()
}

/// A running engine process.
pub struct EngineProcess {
    pub child: Child,
    pub data_dir: PathBuf,
    pub binary: SocketAddr,
    pub http: SocketAddr,
    pub ndjson: SocketAddr,
    pub stderr: Arc<Mutex<String>>,
    env: Vec<(String, String)>,
    config: Option<PathBuf>,
    args: Vec<String>,
}

fn field(line: &str, name: &str) -> Option<SocketAddr> {
    let start = line.find(&format!("{name}="))? + name.len() + 1;
    let rest = &line[start..];
    let end = rest.find(|c: char| c.is_whitespace()).unwrap_or(rest.len());
    rest[..end].parse().ok()
}

impl EngineProcess {
    /// Starts an engine on free ports with `data_dir`, plus extra `FLOWGATE_*` settings.
    pub fn start(data_dir: &Path, env: &[(&str, &str)]) -> EngineProcess {
        EngineProcess::start_with(data_dir, None, env)
    }

    /// Starts an engine with a config file.
    pub fn start_with(data_dir: &Path, config: Option<&Path>, env: &[(&str, &str)]) -> EngineProcess {
        EngineProcess::start_with_args(data_dir, config, &[], env)
    }

    /// Starts an engine with a config file and more arguments of `flowgate run`.
    pub fn start_with_args(
        data_dir: &Path,
        config: Option<&Path>,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> EngineProcess {
        let env: Vec<(String, String)> = env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        let args = args.iter().map(|a| a.to_string()).collect();
        EngineProcess::start_owned(data_dir.to_path_buf(), config.map(Path::to_path_buf), args, env)
    }

    fn start_owned(
        data_dir: PathBuf,
        config: Option<PathBuf>,
        args: Vec<String>,
        env: Vec<(String, String)>,
    ) -> EngineProcess {
        let mut cmd = Command::new(flowgate_bin());
        cmd.arg("run").args(&args);
        if let Some(c) = &config {
            cmd.arg("--config").arg(c);
        }
        cmd.arg("--data-dir")
            .arg(&data_dir)
            .env("FLOWGATE_INGEST__BINARY_ADDR", "127.0.0.1:0")
            .env("FLOWGATE_INGEST__HTTP_ADDR", "127.0.0.1:0")
            .env("FLOWGATE_INGEST__NDJSON_ADDR", "127.0.0.1:0")
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (k, v) in &env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("start flowgate run");
        let stderr = child.stderr.take().expect("piped stderr");
        let log = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let log2 = log.clone();
        std::thread::spawn(move || {
            let mut reader = BufReader::new(stderr);
            let mut line = String::new();
            let mut sent = false;
            while reader.read_line(&mut line).unwrap_or(0) > 0 {
                log2.lock().unwrap().push_str(&line);
                if !sent && line.contains("flowgate is ready") {
                    let _ = tx.send(line.clone());
                    sent = true;
                }
                line.clear();
            }
        });
        let ready = match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(line) => line,
            Err(_) => {
                let _ = child.kill();
                panic!("engine did not become ready; its log:\n{}", log.lock().unwrap());
            }
        };
        EngineProcess {
            child,
            data_dir,
            binary: field(&ready, "binary").expect("binary address in ready line"),
            http: field(&ready, "http").expect("http address in ready line"),
            ndjson: field(&ready, "ndjson").expect("ndjson address in ready line"),
            stderr: log,
            env,
            config,
            args,
        }
    }

    /// Kills the process with SIGKILL: no drain, no fsync, no goodbye.
    pub fn kill9(&mut self) {
        self.child.kill().expect("SIGKILL");
        self.child.wait().expect("reap");
    }

    /// Sends a signal (`HUP`, `TERM`...) without waiting.
    pub fn signal(&self, name: &str) {
        let pid = self.child.id().to_string();
        assert!(Command::new("kill").args([&format!("-{name}"), &pid]).status().expect("kill").success());
    }

    /// Sends SIGTERM and waits for the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let pid = self.child.id().to_string();
        Command::new("kill").args(["-TERM", &pid]).status().expect("kill -TERM");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                return status;
            }
            assert!(Instant::now() < deadline, "engine did not exit after SIGTERM");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Starts a new engine on the same data directory and settings.
    pub fn restart(&self) -> EngineProcess {
        EngineProcess::start_owned(self.data_dir.clone(), self.config.clone(), self.args.clone(), self.env.clone())
    }

    /// Peak resident memory of the process (VmHWM), in bytes.
    pub fn peak_rss(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap_or_default();
        status
            .lines()
            .find(|l| l.starts_with("VmHWM:"))
            .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
            .map_or(0, |kb| kb * 1024)
    }

    /// What the engine logged so far.
    pub fn log(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// A plain HTTP/1.1 request; returns (status, body).
    pub fn http(&self, method: &str, path: &str, body: &[u8]) -> (u16, String) {
        http_request(self.http, method, path, body)
    }

    /// The value of a Prometheus sample whose line starts with `prefix`, 0 if absent.
    pub fn metric(&self, prefix: &str) -> f64 {
        let (_, text) = self.http("GET", "/metrics", b"");
        text.lines().filter(|l| l.starts_with(prefix)).filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok()).sum()
    }
}

impl Drop for EngineProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A plain HTTP/1.1 request with `Connection: close`; returns (status, body).
pub fn http_request(addr: SocketAddr, method: &str, path: &str, body: &[u8]) -> (u16, String) {
    http_request_with(addr, method, path, &[], body)
}

/// [`http_request`] with more request headers.
pub fn http_request_with(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> (u16, String) {
    let mut s = TcpStream::connect(addr).expect("connect http");
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let extra: String = headers.iter().map(|(name, value)| format!("{name}: {value}\r\n")).collect();
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Type: application/json\r\n{extra}Content-Length: {}\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).unwrap();
    s.write_all(body).unwrap();
    let mut response = Vec::new();
    s.read_to_end(&mut response).unwrap();
    let text = String::from_utf8_lossy(&response).into_owned();
    let status = text.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
    // Bodies may be chunked; tests only look for substrings and JSON inside.
    (status, dechunk(&body))
}

fn dechunk(body: &str) -> String {
    let mut out = String::new();
    let mut rest = body;
    loop {
        let Some((size, tail)) = rest.split_once("\r\n") else {
            return body.to_owned();
        };
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            return body.to_owned();
        };
        if n == 0 {
            return out;
        }
        if tail.len() < n {
            return body.to_owned();
        }
        out.push_str(&tail[..n]);
        rest = tail[n..].trim_start_matches("\r\n");
    }
}

/// Runs the flowgate CLI; returns (exit code, stdout, stderr).
pub fn cli(args: &[&str], stdin: Option<&[u8]>) -> (i32, String, String) {
    let mut cmd = Command::new(flowgate_bin());
    cmd.args(args).stdout(Stdio::piped()).stderr(Stdio::piped()).stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    });
    let mut child = cmd.spawn().expect("run flowgate");
    if let Some(input) = stdin {
        let mut sink = child.stdin.take().unwrap();
        let input = input.to_vec();
        std::thread::spawn(move || {
            let _ = sink.write_all(&input);
        });
    }
    let out = child.wait_with_output().expect("wait");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A batch of one event per id, `{"id":…,"device":"d…","v":…}`, keyed by its device
/// (97 devices).
pub fn device_batch(ids: std::ops::Range<u64>) -> bytes::Bytes {
    let mut b = flowgate_core::BatchBuilder::new();
    for id in ids {
        let payload = format!(r#"{{"id":{id},"device":"d{}","v":{}}}"#, id % 97, id % 13);
        b.push_payload(flowgate_core::time::now_ms(), Some(format!("d{}", id % 97).as_bytes()), payload.as_bytes());
    }
    let batch = b.finish(flowgate_core::Codec::None, flowgate_core::ProducerStamp::default()).unwrap();
    bytes::Bytes::from(batch.bytes)
}

/// The `id` of every complete line of every file in a file sink's directory, with how
/// often it appears, and the ids of the lines that carry `field`.
pub fn file_sink_ids(dir: &Path, field: &str) -> (std::collections::HashMap<u64, usize>, Vec<u64>) {
    let mut counts = std::collections::HashMap::new();
    let mut marked = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else { return (counts, marked) };
    for e in entries {
        let text = std::fs::read_to_string(e.unwrap().path()).unwrap();
        // A line still being written (no newline yet) is not output yet.
        let complete = &text[..text.rfind('\n').map_or(0, |i| i + 1)];
        for line in complete.lines() {
            let v: serde_json::Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("torn line {line:?}: {e}"));
            let id = v["id"].as_u64().unwrap();
            *counts.entry(id).or_default() += 1;
            if v.get(field).is_some() {
                marked.push(id);
            }
        }
    }
    (counts, marked)
}

/// One HTTP/1.1 request, as a test's small HTTP server reads it.
pub struct HttpRequest {
    /// `POST /path HTTP/1.1`.
    pub line: String,
    /// Names as sent, values trimmed.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl HttpRequest {
    /// The first header of this name (any case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
}

/// Reads the next request off a connection (its body by `Content-Length`); `None` when
/// the peer closed, or the body was cut short.
pub fn read_request(reader: &mut impl BufRead) -> Option<HttpRequest> {
    let mut line = String::new();
    if reader.read_line(&mut line).unwrap_or(0) == 0 {
        return None;
    }
    let mut headers = Vec::new();
    loop {
        let mut header = String::new();
        if reader.read_line(&mut header).unwrap_or(0) == 0 {
            return None;
        }
        let header = header.trim_end();
        if header.is_empty() {
            break;
        }
        if let Some((name, value)) = header.split_once(':') {
            headers.push((name.to_owned(), value.trim().to_owned()));
        }
    }
    let mut request = HttpRequest { line: line.trim_end().to_owned(), headers, body: Vec::new() };
    let length: usize = request.header("content-length").map_or(0, |l| l.parse().unwrap());
    request.body = vec![0u8; length];
    reader.read_exact(&mut request.body).ok()?;
    Some(request)
}
