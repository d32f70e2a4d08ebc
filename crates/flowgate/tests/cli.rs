//! The CLI against a real engine: send, tail, topics, validate, log check, SIGTERM.

mod common;

use std::time::Duration;

use common::{cli, EngineProcess};

#[test]
fn send_tail_topics_and_graceful_shutdown() {
    let dir = tempfile::tempdir().unwrap();
    let mut engine = EngineProcess::start(dir.path(), &[]);
    let addr = engine.binary.to_string();

    let (code, out, err) = cli(&["topics", "create", "orders", "--partitions", "3", "--addr", &addr], None);
    assert_eq!(code, 0, "{out}{err}");
    let input: String = (0..500).map(|i| format!("{{\"order\":{i}}}\n")).collect();
    let (code, out, err) =
        cli(&["send", "--topic", "orders", "--key", "customer-1", "--addr", &addr], Some(input.as_bytes()));
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("acknowledged 500 events"), "{out}");

    // One key: one partition, in order.
    let (code, out, err) = cli(&["tail", "--topic", "orders", "--addr", &addr], None);
    assert_eq!(code, 0, "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 500);
    for (i, line) in lines.iter().enumerate() {
        assert_eq!(*line, format!("{{\"order\":{i}}}"));
    }
    let (code, out, _) = cli(&["tail", "--topic", "orders", "--from", "latest", "--addr", &addr], None);
    assert_eq!((code, out.as_str()), (0, ""));
    let (_, out, _) =
        cli(&["tail", "--topic", "orders", "--from", "2000-01-01T00:00:00Z", "--limit", "3", "--addr", &addr], None);
    assert_eq!(out.lines().count(), 3);

    let (code, out, _) = cli(&["topics", "list", "--addr", &addr], None);
    assert_eq!(code, 0);
    assert!(out.lines().any(|l| l.starts_with("orders") && l.contains(" 3 ") && l.contains(" 500 ")), "{out}");

    // The envelope, and only one key's events.
    let (code, out, err) =
        cli(&["send", "--topic", "orders", "--key", "customer-2", "--addr", &addr], Some(b"{\"order\":\"x\"}\n"));
    assert_eq!(code, 0, "{out}{err}");
    let (code, out, err) =
        cli(&["tail", "--topic", "orders", "--format", "json", "--key", "customer-2", "--addr", &addr], None);
    assert_eq!(code, 0, "{err}");
    let events: Vec<serde_json::Value> = out.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(events.len(), 1, "{out}");
    let e = &events[0];
    assert_eq!((e["topic"].as_str(), e["key"].as_str()), (Some("orders"), Some("customer-2")), "{e}");
    assert_eq!(e["payload"], serde_json::json!({"order": "x"}), "the payload as JSON, not a string: {e}");
    assert!(e["partition"].is_u64() && e["offset"].is_u64() && e["timestamp"].as_i64().unwrap() > 0, "{e}");
    assert!(e["headers"].is_object(), "{e}");
    let (_, out, _) = cli(
        &["tail", "--topic", "orders", "--format", "json", "--key", "customer-1", "--limit", "2", "--addr", &addr],
        None,
    );
    let keys: Vec<serde_json::Value> =
        out.lines().map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["key"].clone()).collect();
    assert_eq!(keys, vec![serde_json::json!("customer-1"); 2]);

    // Bad input to send: it stops at the bad line and says how many were acknowledged.
    let (code, out, err) = cli(&["send", "--topic", "orders", "--addr", &addr], Some(b"{\"ok\":1}\nnot json\n"));
    assert_ne!(code, 0);
    assert!(err.contains("line 2"), "{err}");
    assert!(out.contains("acknowledged"), "{out}");

    let (code, _, err) = cli(&["tail", "--topic", "nope", "--addr", &addr], None);
    assert_ne!(code, 0);
    assert!(err.contains("nope"), "{err}");

    let (code, out, _) = cli(&["topics", "delete", "orders", "--addr", &addr], None);
    assert_eq!(code, 0, "{out}");

    let status = engine.terminate();
    assert!(status.success(), "SIGTERM must drain and exit 0: {status:?}\n{}", engine.log());
    assert!(engine.log().contains("log closed cleanly"));

    let (code, out, _) = cli(&["log", "check", "--data-dir", dir.path().to_str().unwrap()], None);
    assert_eq!(code, 0, "{out}");
}

#[test]
fn send_to_a_dead_engine_fails_with_one_clear_line() {
    let (code, out, err) = cli(&["send", "--topic", "t", "--addr", "127.0.0.1:1"], Some(b"{}\n"));
    assert_ne!(code, 0);
    assert!(out.contains("acknowledged 0 events"), "{out}");
    assert!(err.contains("127.0.0.1:1"), "{err}");
}

#[test]
fn validate_names_the_bad_key_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.toml");
    std::fs::write(&good, "[log]\nfsync = \"always\"\n").unwrap();
    let (code, out, _) = cli(&["validate", "--config", good.to_str().unwrap()], None);
    assert_eq!(code, 0, "{out}");
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[log]\nfsync = \"always\"\n\n[ingest]\nmax_frame_byte = 10\n").unwrap();
    let (code, _, err) = cli(&["validate", "--config", bad.to_str().unwrap()], None);
    assert_ne!(code, 0);
    assert!(err.contains("max_frame_byte") && err.contains("line 5"), "{err}");
}

#[test]
fn a_torn_tail_is_reported_by_log_check_and_cut_on_start() {
    let dir = tempfile::tempdir().unwrap();
    let mut engine = EngineProcess::start(dir.path(), &[]);
    let addr = engine.binary.to_string();
    for batch in 0..3 {
        let input: String = (0..100).map(|i| format!("{{\"batch\":{batch},\"i\":{i}}}\n")).collect();
        let (code, out, err) = cli(&["send", "--topic", "t", "--addr", &addr], Some(input.as_bytes()));
        assert_eq!(code, 0, "{out}{err}");
    }
    assert!(engine.terminate().success());
    let segment = dir.path().join("topics/t/0/00000000000000000000.log");
    let len = std::fs::metadata(&segment).unwrap().len();
    let f = std::fs::OpenOptions::new().write(true).open(&segment).unwrap();
    f.set_len(len - 7).unwrap();
    drop(f);

    let (code, out, _) = cli(&["log", "check", "--data-dir", dir.path().to_str().unwrap()], None);
    assert_ne!(code, 0, "{out}");
    assert!(out.contains("00000000000000000000.log") && out.contains("CORRUPT"), "{out}");

    let mut engine = engine.restart();
    std::thread::sleep(Duration::from_millis(100));
    assert!(engine.log().contains("recovery cut a torn or damaged tail"), "{}", engine.log());
    let addr = engine.binary.to_string();
    let (_, out, _) = cli(&["tail", "--topic", "t", "--addr", &addr], None);
    assert_eq!(out.lines().count(), 200, "the two earlier batches survive");
    assert!(engine.terminate().success());
    let (code, _, _) = cli(&["log", "check", "--data-dir", dir.path().to_str().unwrap()], None);
    assert_eq!(code, 0);
}

/// Runs `flowgate` with extra environment variables.
fn cli_env(args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let out = std::process::Command::new(common::flowgate_bin())
        .args(args)
        .envs(env.iter().copied())
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run flowgate");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn config_prints_the_effective_configuration_and_it_validates_again() {
    let dir = tempfile::tempdir().unwrap();
    let (code, out, err) = cli_env(&["config"], &[("FLOWGATE_LOG__FSYNC", "always")]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("fsync = \"always\""), "the environment override is applied:\n{out}");
    assert!(out.contains("[ingest]") && out.contains("binary_addr = \"127.0.0.1:7070\""), "{out}");
    assert!(!out.contains("[[pipelines]]"), "the embedded default starts no pipeline:\n{out}");

    // What it prints is a complete config that `validate` and `config` accept as is.
    let printed = dir.path().join("printed.toml");
    std::fs::write(&printed, &out).unwrap();
    let (code, again, err) = cli_env(&["config", "--config", printed.to_str().unwrap()], &[]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(again, out);
    let (code, _, err) = cli_env(&["validate", "--config", printed.to_str().unwrap()], &[]);
    assert_eq!(code, 0, "{err}");

    let (code, out, err) = cli_env(&["config", "--data-dir", "/srv/fg", "--json"], &[]);
    assert_eq!(code, 0, "{err}");
    let json: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(json["server"]["data_dir"], "/srv/fg");

    let (code, _, err) = cli_env(&["config"], &[("FLOWGATE_LOG__FSYNC", "sometimes")]);
    assert_ne!(code, 0);
    assert!(err.contains("FLOWGATE_LOG__FSYNC") || err.contains("log.fsync"), "{err}");
}

#[test]
fn the_embedded_default_runs_no_pipeline() {
    let dir = tempfile::tempdir().unwrap();
    let mut engine = EngineProcess::start(dir.path(), &[]);
    let addr = engine.binary.to_string();
    let (code, out, err) = cli(&["send", "--topic", "telemetry", "--addr", &addr], Some(b"{\"device\":\"d1\"}\n"));
    assert_eq!(code, 0, "{out}{err}");
    let (code, out, _) = cli(&["topics", "list", "--addr", &addr], None);
    assert_eq!(code, 0);
    let topics: Vec<&str> = out.lines().filter_map(|l| l.split_whitespace().next()).collect();
    assert!(topics.contains(&"telemetry"), "{out}");
    assert!(
        !topics.iter().any(|t| t.starts_with("telemetry-") || *t == "_dlq"),
        "no pipeline may write anything on the default config: {out}"
    );
    assert!(!engine.log().contains("pipelines started"), "{}", engine.log());
    assert!(engine.terminate().success());
}

#[test]
fn send_takes_keys_and_times_from_fields() {
    let dir = tempfile::tempdir().unwrap();
    let mut engine = EngineProcess::start(dir.path(), &[]);
    let addr = engine.binary.to_string();
    let (code, out, _) = cli(&["topics", "create", "readings", "--partitions", "4", "--addr", &addr], None);
    assert_eq!(code, 0, "{out}");
    let input: String =
        (0..400).map(|i| format!("{{\"device\":\"d{}\",\"seq\":{i},\"ts\":{}}}\n", i % 7, 1_000_000 + i)).collect();
    let (code, out, err) = cli(
        &["send", "--topic", "readings", "--key-field", "device", "--time-field", "ts", "--addr", &addr],
        Some(input.as_bytes()),
    );
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("acknowledged 400 events"), "{out}");

    let mut seen = 0;
    let mut partition_of = std::collections::HashMap::new();
    for p in 0..4 {
        let (status, body) = engine.http("GET", &format!("/v1/topics/readings/events?partition={p}&limit=1000"), b"");
        assert_eq!(status, 200, "{body}");
        let body: serde_json::Value = serde_json::from_str(&body).unwrap();
        let mut last_seq = std::collections::HashMap::new();
        for e in body["events"].as_array().unwrap() {
            let device = e["payload"]["device"].as_str().unwrap().to_owned();
            assert_eq!(e["key"].as_str(), Some(device.as_str()), "the key is the device field");
            assert_eq!(e["timestamp"], e["payload"]["ts"], "the time is the ts field");
            assert_eq!(*partition_of.entry(device.clone()).or_insert(p), p, "one key, one partition");
            let seq = e["payload"]["seq"].as_u64().unwrap();
            assert!(last_seq.insert(device, seq).is_none_or(|prev| prev < seq), "order per key");
            seen += 1;
        }
    }
    assert_eq!(seen, 400);

    let (code, _, err) =
        cli(&["send", "--topic", "readings", "--time-field", "ts", "--addr", &addr], Some(b"{\"ts\":\"soon\"}\n"));
    assert_ne!(code, 0);
    assert!(err.contains("line 1") && err.contains("timestamp field `ts`"), "{err}");
    assert!(engine.terminate().success());
}

/// The two numbers after `label` in a line of the demo report, e.g. "sent 10  removed 10".
fn report_pair(report: &str, first: &str, second: &str) -> (u64, u64) {
    let line = report.lines().find(|l| l.contains(first) && l.contains(second)).unwrap_or_else(|| panic!("{report}"));
    let after = |word: &str| -> u64 {
        let rest = &line[line.find(word).unwrap() + word.len()..];
        rest.split_whitespace().next().unwrap().parse().unwrap()
    };
    (after(first), after(second))
}

#[test]
fn the_demo_reports_what_its_pipeline_did() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("demo");
    let (code, out, err) = cli(
        &[
            "demo",
            "--exit",
            "--duration",
            "2",
            "--rate",
            "20000",
            "--devices",
            "50",
            "--data-dir",
            data.to_str().unwrap(),
        ],
        None,
    );
    assert_eq!(code, 0, "{err}");
    let (sent, removed) = report_pair(&out, "duplicates sent ", "removed ");
    assert!(sent > 0 && removed == sent, "every duplicate removed by the dedup:\n{out}");
    let (emitted, written) = report_pair(&out, "windows emitted ", "written to files ");
    assert!(emitted > 0 && written == emitted, "every window emitted reaches the files:\n{out}");
    // The report leads with the dashboard; the engine's log lines went to a file, not
    // between the progress lines and the report.
    let report = out.split("flowgate demo report").nth(1).expect("a report");
    assert!(report.trim_start().starts_with("dashboard  http://"), "{out}");
    assert!(!err.contains(" INFO ") && !out.contains(" INFO "), "no log lines on the terminal:\n{err}");
    let log = std::fs::read_to_string(data.join("flowgate.log")).unwrap();
    assert!(log.contains("flowgate is ready"), "{log}");
}
