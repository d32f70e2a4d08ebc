//! Alert rules against a real engine: a threshold and a rate rule fire from the engine's
//! own metrics, show in `/v1/alerts` and `/v1/stats`, are POSTed to a webhook (a small
//! real HTTP server here), and resolve; bad rules are refused by `validate`.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{cli, poll_until, EngineProcess};
use serde_json::Value;

/// An HTTP server that answers 200 to every POST and keeps the JSON bodies.
fn webhook_receiver() -> (String, Arc<Mutex<Vec<Value>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    let got = Arc::new(Mutex::new(Vec::new()));
    let keep = got.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { continue };
            let keep = keep.clone();
            std::thread::spawn(move || {
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                loop {
                    let mut length = 0usize;
                    let mut line = String::new();
                    if reader.read_line(&mut line).unwrap_or(0) == 0 {
                        return;
                    }
                    loop {
                        line.clear();
                        reader.read_line(&mut line).unwrap();
                        if line == "\r\n" {
                            break;
                        }
                        if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                            length = v.trim().parse().unwrap();
                        }
                    }
                    let mut body = vec![0; length];
                    reader.read_exact(&mut body).unwrap();
                    keep.lock().unwrap().push(serde_json::from_slice(&body).unwrap());
                    let mut w = stream.try_clone().unwrap();
                    w.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n").unwrap();
                }
            });
        }
    });
    (url, got)
}

#[test]
fn rules_fire_from_the_engines_metrics_reach_the_webhook_and_resolve() {
    let (url, got) = webhook_receiver();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("flowgate.toml");
    std::fs::write(
        &config,
        format!(
            "[alerting]\ninterval_ms = 200\nwebhook_url = \"{url}\"\n\n\
             [[alerts]]\nname = \"five events in\"\nmetric = \"flowgate_ingest_events_total\"\n\
             condition = \">= 5\"\nseverity = \"critical\"\ndescription = \"more than a few events\"\n\n\
             [[alerts]]\nname = \"ingest burst\"\nmetric = \"flowgate_ingest_events_total\"\nrate = true\n\
             condition = \"> 100\"\n"
        ),
    )
    .unwrap();
    let engine = EngineProcess::start_with(&dir.path().join("data"), Some(&config), &[]);
    let (_, body) = engine.http("GET", "/v1/alerts", b"");
    let alerts: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(alerts["rules"], 2);
    assert!(alerts["active"].as_array().unwrap().is_empty(), "{alerts}");

    let lines: Vec<String> = (0..2000).map(|i| format!("{{\"n\":{i}}}")).collect();
    let (status, _) = engine.http("POST", "/v1/topics/in/events", lines.join("\n").as_bytes());
    assert_eq!(status, 200);
    poll_until("both rules fire and reach the webhook", Duration::from_secs(30), || {
        let got = got.lock().unwrap();
        ["five events in", "ingest burst"]
            .iter()
            .all(|n| got.iter().any(|v| v["status"] == "firing" && v["alert"]["name"] == *n))
    });
    let firing = got.lock().unwrap().iter().find(|v| v["alert"]["name"] == "five events in").cloned().unwrap();
    assert_eq!(firing["alert"]["severity"], "critical");
    assert_eq!(firing["alert"]["description"], "more than a few events");
    assert!(firing["alert"]["value"].as_f64().unwrap() >= 2000.0, "{firing}");
    let (_, stats) = engine.http("GET", "/v1/stats", b"");
    let stats: Value = serde_json::from_str(&stats).unwrap();
    assert!(stats["alerts"].as_array().unwrap().iter().any(|a| a["name"] == "five events in"), "{stats}");

    // The burst is over: its rate falls to 0 and the rule resolves; the count stays.
    poll_until("the burst alert resolves", Duration::from_secs(30), || {
        got.lock().unwrap().iter().any(|v| v["status"] == "resolved" && v["alert"]["name"] == "ingest burst")
    });
    let (_, body) = engine.http("GET", "/v1/alerts", b"");
    let alerts: Value = serde_json::from_str(&body).unwrap();
    let active: Vec<&str> = alerts["active"].as_array().unwrap().iter().map(|a| a["name"].as_str().unwrap()).collect();
    assert_eq!(active, ["five events in"]);
    assert_eq!(alerts["resolved"][0]["name"], "ingest burst");
    assert!(engine.log().contains("alert firing"), "transitions are logged");
}

#[test]
fn validate_refuses_bad_rules_naming_them() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(&path, "[[alerts]]\nname = \"lag\"\nstat = \"/memory/used_bytes\"\ncondition = \"about 3\"\n")
        .unwrap();
    let (code, out, err) = cli(&["validate", "--config", path.to_str().unwrap()], None);
    assert_ne!(code, 0, "{out}");
    assert!(err.contains("alert 'lag'") && err.contains("operator"), "{err}");
    std::fs::write(&path, "[[alerts]]\nname = \"lag\"\nstat = \"/memory/used_bytes\"\nanomaly = { sigmas = 3 }\n")
        .unwrap();
    let (code, out, err) = cli(&["validate", "--config", path.to_str().unwrap()], None);
    assert_eq!(code, 0, "{out}{err}");
}
