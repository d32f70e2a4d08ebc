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
