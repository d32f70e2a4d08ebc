//! The `postgres` sink against real engine processes and a private PostgreSQL server per
//! test: insert and upsert modes with bad rows dead-lettered by SQLSTATE, exactly once
//! across SIGKILLs and a server outage, Debezium-style change envelopes, and configs
//! refused by name.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::postgres::PgServer;
use common::{cli, poll_until, EngineProcess};

/// A config with one pipeline per `(name, topic, sink options)`.
fn config(dir: &Path, partitions: u32, pipelines: &[(&str, &str, String)]) -> PathBuf {
    let mut text = format!("[log]\ndefault_partitions = {partitions}\n");
    for (name, topic, sink) in pipelines {
        text.push_str(&format!(
            "[[pipelines]]\nname = \"{name}\"\ntopics = [\"{topic}\"]\ncommit_interval_ms = 50\n\
             [[pipelines.sinks]]\nname = \"pg\"\ntype = \"postgres\"\n{sink}\n\
             retry = {{ initial_backoff_ms = 20, max_backoff_ms = 200 }}\n"
        ));
    }
    let path = dir.join("flowgate.toml");
    std::fs::write(&path, text).unwrap();
    path
}

fn post(engine: &EngineProcess, topic: &str, lines: &[String]) {
    for chunk in lines.chunks(2000) {
        let (status, body) = engine.http("POST", &format!("/v1/topics/{topic}/events"), chunk.join("\n").as_bytes());
        assert_eq!(status, 200, "{body}");
    }
}

fn count(pg: &PgServer, sql: &str) -> u64 {
    pg.try_psql(sql).ok().and_then(|s| s.trim().parse().ok()).unwrap_or(0)
}

fn dead_letters(engine: &EngineProcess, pipeline: &str, n: usize) -> Vec<serde_json::Value> {
    let mut entries = Vec::new();
    poll_until("the dead letters", Duration::from_secs(60), || {
        let (code, out, _) = cli(&["dlq", "list", "--pipeline", pipeline, "--addr", &engine.binary.to_string()], None);
        entries = out.lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
        code == 0 && entries.len() >= n
    });
    assert_eq!(entries.len(), n, "{entries:?}");
    entries
}

#[test]
fn insert_and_upsert_write_each_event_once_and_refused_rows_are_dead_letters_with_their_sqlstate() {
    let pg = PgServer::start();
    pg.psql("CREATE TABLE items (id int PRIMARY KEY, name text NOT NULL, qty int CHECK (qty >= 0), note varchar(8))");
    pg.psql("CREATE TABLE totals (k int PRIMARY KEY, v bigint NOT NULL, seen int)");
    let dir = tempfile::tempdir().unwrap();
    let url = pg.url();
    let cfg = config(
        dir.path(),
        1,
        &[
            ("p", "in", format!("url = \"{url}\"\ntable = \"items\"\nbatch = {{ max_events = 50, max_wait_ms = 20 }}")),
            (
                "q",
                "up",
                format!(
                    "url = \"{url}\"\ntable = \"totals\"\nmode = \"upsert\"\ncolumns = {{ k = \"key\", v = \"/data/v\", seen = \"n\" }}\n\
                     batch = {{ max_events = 64, max_wait_ms = 20 }}"
                ),
            ),
        ],
    );
    let engine = EngineProcess::start_with(dir.path(), Some(&cfg), &[]);
    // Every n ending in 3 lacks its NOT NULL name, every n ending in 7 breaks the CHECK,
    // 55 has a string for an int, 88 a note too long for varchar(8).
    let lines: Vec<String> = (0..200)
        .map(|n| match n {
            55 => format!(r#"{{"id":{n},"name":"x","qty":"abc"}}"#),
            88 => format!(r#"{{"id":{n},"name":"x","qty":1,"note":"far too long a note"}}"#),
            n if n % 10 == 3 => format!(r#"{{"id":{n},"qty":{n}}}"#),
            n if n % 10 == 7 => format!(r#"{{"id":{n},"name":"n{n}","qty":-1}}"#),
            n => format!(r#"{{"id":{n},"name":"n{n}","qty":{n},"note":"ok"}}"#),
        })
        .collect();
    post(&engine, "in", &lines);
    // Upserts: 20 keys, each written 25 times (several times per batch).
    let ups: Vec<String> =
        (0..500).map(|n| format!(r#"{{"key":{},"n":{n},"data":{{"v":{}}}}}"#, n % 20, n * 10)).collect();
    post(&engine, "up", &ups);

    let bad = |n: u64| n % 10 == 3 || n % 10 == 7 || n == 55 || n == 88;
    let good: Vec<u64> = (0..200).filter(|&n| !bad(n)).collect();
    poll_until("the good rows", Duration::from_secs(60), || {
        count(&pg, "SELECT count(*) FROM items") >= good.len() as u64
    });
    let ids: Vec<u64> = pg.psql("SELECT id FROM items ORDER BY id").lines().map(|l| l.parse().unwrap()).collect();
    assert_eq!(ids, good, "every good row once");
    assert_eq!(pg.psql("SELECT name || ':' || qty || ':' || note FROM items WHERE id = 12"), "n12:12:ok");

    let dead = dead_letters(&engine, "p", 200 - good.len());
    for d in &dead {
        let n = d["offset"].as_u64().unwrap();
        let expected = match n {
            55 => "22P02",
            88 => "22001",
            n if n % 10 == 3 => "23502",
            _ => "23514",
        };
        assert_eq!((d["sink"].as_str(), d["category"].as_str()), (Some("pg"), Some("rejected")), "{d}");
        assert_eq!(d["code"].as_str(), Some(expected), "{d}");
        assert_eq!(d["event"]["id"].as_u64(), Some(n), "{d}");
    }
    let not_null = dead.iter().find(|d| d["code"] == "23502").unwrap();
    assert!(not_null["error"].as_str().unwrap().contains("name"), "the server's message: {not_null}");
    let (status, body) = engine.http("GET", "/v1/dlq?pipeline=p", b"");
    assert_eq!(status, 200);
    assert!(body.contains("23514"), "{body}");

    poll_until("the upserts", Duration::from_secs(60), || {
        count(&pg, "SELECT count(*) FROM totals WHERE seen >= 480") == 20
    });
    let rows = pg.psql("SELECT k || ':' || v || ':' || seen FROM totals ORDER BY k");
    let expected: Vec<String> = (0..20).map(|k| format!("{k}:{}:{}", (480 + k) * 10, 480 + k)).collect();
    assert_eq!(rows.lines().collect::<Vec<_>>(), expected);
    assert_eq!(dead_letters(&engine, "q", 0).len(), 0);
    let stored = pg.psql("SELECT pipeline || ':' || \"offset\" FROM flowgate_offsets ORDER BY pipeline");
    assert_eq!(stored, "p:199\nq:499", "the positions");
}

#[test]
fn sigkills_while_writing_leave_each_event_in_the_table_once() {
    let pg = PgServer::start();
    // No key: a duplicate would be a second row.
    pg.psql("CREATE TABLE events (n bigint NOT NULL, body text)");
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(
        dir.path(),
        2,
        &[(
            "p",
            "in",
            // Small batches, one write at a time: the writing lasts long enough (thousands
            // of transactions) for every kill to land in the middle of it.
            format!(
                "url = \"{}\"\ntable = \"events\"\nbatch = {{ max_events = 10, max_wait_ms = 5 }}\n\
                 concurrency = {{ limit = 1 }}",
                pg.url()
            ),
        )],
    );
    let mut engine = EngineProcess::start_with(dir.path(), Some(&cfg), &[]);
    const N: u64 = 20_000;
    let lines: Vec<String> = (0..N).map(|n| format!(r#"{{"n":{n},"body":"event number {n}"}}"#)).collect();
    post(&engine, "in", &lines);
    let mut at_kill = Vec::new();
    for threshold in [2_000, 6_000, 10_000, 14_000] {
        poll_until("rows to be written", Duration::from_secs(60), || {
            count(&pg, "SELECT count(*) FROM events") >= threshold
        });
        engine.kill9();
        at_kill.push(count(&pg, "SELECT count(*) FROM events"));
        engine = engine.restart();
    }
    assert!(at_kill[0] < N, "the first kill came while writing: {at_kill:?}");
    poll_until("every row", Duration::from_secs(120), || count(&pg, "SELECT count(*) FROM events") >= N);
    // Nothing more arrives afterwards either.
    poll_until("the positions to cover every event", Duration::from_secs(30), || {
        count(&pg, "SELECT sum(\"offset\" + 1) FROM flowgate_offsets") == N
    });
    assert_eq!(
        pg.psql("SELECT count(*), count(DISTINCT n), min(n), max(n) FROM events"),
        format!("{N}|{N}|0|{}", N - 1)
    );
    let (_, body) = engine.http("GET", "/v1/dlq?pipeline=p", b"");
    assert!(!body.contains("\"offset\""), "no dead letters: {body}");
}

#[test]
fn a_server_outage_in_the_middle_loses_and_duplicates_nothing_and_shows_in_the_metrics() {
    let mut pg = PgServer::start();
    pg.psql("CREATE TABLE events (n bigint NOT NULL, body text)");
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(
        dir.path(),
        1,
        &[(
            "p",
            "in",
            format!(
                "url = \"{}\"\ntable = \"events\"\nconnect_timeout_ms = 1000\nbatch = {{ max_events = 200, max_wait_ms = 5 }}",
                pg.url()
            ),
        )],
    );
    let engine = EngineProcess::start_with(dir.path(), Some(&cfg), &[]);
    let lines: Vec<String> = (0..5_000).map(|n| format!(r#"{{"n":{n},"body":"b{n}"}}"#)).collect();
    post(&engine, "in", &lines);
    poll_until("the first rows", Duration::from_secs(60), || count(&pg, "SELECT count(*) FROM events") >= 5_000);
    pg.stop();
    let more: Vec<String> = (5_000..10_000).map(|n| format!(r#"{{"n":{n},"body":"b{n}"}}"#)).collect();
    post(&engine, "in", &more);
    // The outage shows: failed writes, retried, until the breaker opens.
    poll_until("failed writes during the outage", Duration::from_secs(30), || {
        engine.metric("flowgate_sink_errors_total{pipeline=\"p\",sink=\"pg\"") >= 5.0
    });
    let started = std::time::Instant::now();
    poll_until("the breaker to open", Duration::from_secs(30), || {
        engine.metric("flowgate_sink_breaker_transitions_total{pipeline=\"p\",sink=\"pg\",to=\"open\"") >= 1.0
    });
    if let Some(rest) = Duration::from_secs(5).checked_sub(started.elapsed()) {
        // The rest of a 5 s outage (the breaker keeps probing meanwhile).
        std::thread::sleep(rest);
    }
    pg.start_again();
    poll_until("every row after the outage", Duration::from_secs(120), || {
        count(&pg, "SELECT count(*) FROM events") >= 10_000
    });
    poll_until("the position", Duration::from_secs(30), || {
        count(&pg, "SELECT \"offset\" FROM flowgate_offsets") == 9_999
    });
    assert_eq!(pg.psql("SELECT count(*), count(DISTINCT n) FROM events"), "10000|10000");
    let (_, body) = engine.http("GET", "/v1/dlq?pipeline=p", b"");
    assert!(!body.contains("\"offset\""), "no dead letters: {body}");
    assert!(engine.metric("flowgate_sink_events_total{pipeline=\"p\",sink=\"pg\"") >= 10_000.0);
}

#[test]
fn cdc_envelopes_leave_the_table_in_the_state_they_describe() {
    let pg = PgServer::start();
    pg.psql("CREATE TABLE customers (id int PRIMARY KEY, name text NOT NULL, tier smallint)");
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(
        dir.path(),
        1,
        &[(
            "p",
            "changes",
            format!(
                "url = \"{}\"\ntable = \"customers\"\nmode = \"cdc\"\nbatch = {{ max_events = 7, max_wait_ms = 10 }}",
                pg.url()
            ),
        )],
    );
    let engine = EngineProcess::start_with(dir.path(), Some(&cfg), &[]);
    let change = |op: &str, before: serde_json::Value, after: serde_json::Value| {
        serde_json::json!({"before": before, "after": after, "op": op, "ts_ms": 1_700_000_000_000u64,
            "source": {"connector": "postgresql", "table": "customers"}})
        .to_string()
    };
    let null = serde_json::Value::Null;
    let row = |id: i64, name: &str, tier: i64| serde_json::json!({"id": id, "name": name, "tier": tier});
    let mut lines = vec![
        change("r", null.clone(), row(1, "ann", 1)),
        change("c", null.clone(), row(2, "bob", 1)),
        change("c", null.clone(), row(3, "cy", 2)),
        change("u", row(2, "bob", 1), row(2, "bobby", 3)),
        change("d", row(3, "cy", 2), null.clone()),
        // A key change: the old row goes, the new one comes.
        change("u", row(1, "ann", 1), row(10, "ann", 2)),
        change("c", null.clone(), row(4, "dee", 1)),
        change("u", row(4, "dee", 1), row(4, "dee", 2)),
        change("d", row(4, "dee", 2), null.clone()),
        change("c", null.clone(), row(4, "dee", 5)),
        // Wrapped as Debezium's JSON converter with schemas does.
        serde_json::json!({"schema": {}, "payload": {"before": null, "after": row(5, "eve", 1), "op": "c"}})
            .to_string(),
        // A bad one among them: tier out of smallint's range.
        change("c", null.clone(), row(6, "fay", 100_000)),
    ];
    for i in 0..30 {
        lines.push(change("c", null.clone(), row(100 + i, "bulk", 0)));
    }
    for i in 0..30 {
        if i % 3 == 0 {
            lines.push(change("d", row(100 + i, "bulk", 0), null.clone()));
        } else {
            lines.push(change("u", row(100 + i, "bulk", 0), row(100 + i, "bulk", i)));
        }
    }
    post(&engine, "changes", &lines);
    let total = lines.len() as u64;
    poll_until("every change applied", Duration::from_secs(60), || {
        count(&pg, "SELECT \"offset\" FROM flowgate_offsets") == total - 1
    });
    let mut expected = vec!["2:bobby:3".to_owned(), "4:dee:5".to_owned(), "5:eve:1".to_owned(), "10:ann:2".to_owned()];
    expected.extend((0..30).filter(|i| i % 3 != 0).map(|i| format!("{}:bulk:{i}", 100 + i)));
    let state = pg.psql("SELECT id || ':' || name || ':' || tier FROM customers ORDER BY id");
    assert_eq!(state.lines().collect::<Vec<_>>(), expected);
    let dead = dead_letters(&engine, "p", 1);
    assert_eq!(dead[0]["code"].as_str(), Some("22003"), "{}", dead[0]);
    assert!(dead[0]["error"].as_str().unwrap().contains("tier"), "{}", dead[0]);

    // A truncate empties the table; what comes after it stays.
    let after = vec![
        change("c", null.clone(), row(50, "gus", 1)),
        change("t", null.clone(), null.clone()),
        change("c", null.clone(), row(51, "hal", 1)),
        change("u", row(51, "hal", 1), row(51, "hal", 2)),
    ];
    post(&engine, "changes", &after);
    poll_until("the truncate", Duration::from_secs(60), || {
        count(&pg, "SELECT \"offset\" FROM flowgate_offsets") == total + after.len() as u64 - 1
    });
    assert_eq!(pg.psql("SELECT id || ':' || name || ':' || tier FROM customers ORDER BY id"), "51:hal:2");
}

#[test]
fn bad_configs_are_refused_with_a_message_naming_what_is_wrong() {
    let dir = tempfile::tempdir().unwrap();
    let check = |sink: &str| -> (i32, String) {
        let cfg = config(dir.path(), 1, &[("p", "in", sink.to_owned())]);
        let (code, out, err) = cli(&["validate", "--config", cfg.to_str().unwrap()], None);
        (code, format!("{out}{err}"))
    };
    let (code, msg) = check(
        "url = \"postgres://postgres@127.0.0.1:1/db\"\ntable = \"t\"\npassword_env = \"FLOWGATE_TEST_PG_NO_SUCH_PASSWORD\"",
    );
    assert!(code != 0 && msg.contains("FLOWGATE_TEST_PG_NO_SUCH_PASSWORD"), "{msg}");
    let (code, msg) = check("url = \"postgres://postgres@127.0.0.1:notaport/db\"\ntable = \"t\"");
    assert!(code != 0 && msg.contains("url"), "{msg}");
    let (code, msg) = check("url = \"postgres://postgres:hunter2@127.0.0.1/db\"\ntable = \"t\"");
    assert!(code != 0 && msg.contains("password_env") && !msg.contains("hunter2"), "{msg}");
    let (code, msg) = check("url = \"postgres://postgres@127.0.0.1/db\"\ntable = \"t\"\nmode = \"merge\"");
    assert!(code != 0 && msg.contains("merge"), "{msg}");
    let (code, msg) = check("url = \"postgres://postgres@127.0.0.1/db\"\ntable = \"t\"");
    assert_eq!(code, 0, "{msg}");

    // An engine refuses a missing password variable at start.
    let cfg = config(
        dir.path(),
        1,
        &[("p", "in", "url = \"postgres://postgres@127.0.0.1:1/db\"\ntable = \"t\"\npassword_env = \"FLOWGATE_TEST_PG_NO_SUCH_PASSWORD\"".to_owned())],
    );
    let out = std::process::Command::new(common::flowgate_bin())
        .args(["run", "--config", cfg.to_str().unwrap(), "--data-dir", dir.path().join("d").to_str().unwrap()])
        .env("FLOWGATE_INGEST__BINARY_ADDR", "127.0.0.1:0")
        .env("FLOWGATE_INGEST__HTTP_ADDR", "127.0.0.1:0")
        .env("FLOWGATE_INGEST__NDJSON_ADDR", "127.0.0.1:0")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("FLOWGATE_TEST_PG_NO_SUCH_PASSWORD"), "{err}");

    // An unknown table is named by the worker's error, and nothing is read past it.
    let pg = PgServer::start();
    let data = tempfile::tempdir().unwrap();
    let cfg = config(data.path(), 1, &[("p", "in", format!("url = \"{}\"\ntable = \"no_such_table\"", pg.url()))]);
    let engine = EngineProcess::start_with(data.path(), Some(&cfg), &[]);
    post(&engine, "in", &[r#"{"a":1}"#.to_owned()]);
    poll_until("the error naming the table", Duration::from_secs(30), || {
        engine.log().contains("table 'no_such_table' does not exist")
    });
    // Once the table exists, the worker's restart writes the event.
    pg.psql("CREATE TABLE no_such_table (a int)");
    poll_until("the event after the table appeared", Duration::from_secs(60), || {
        count(&pg, "SELECT count(*) FROM no_such_table") == 1
    });
}

#[test]
fn tls_require_encrypts_the_connection_and_a_password_comes_from_its_variable() {
    let pg = PgServer::start();
    // A self-signed certificate, and TLS switched on with a reload.
    let data = pg.psql("SHOW data_directory");
    let out = std::process::Command::new("openssl")
        .args(["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=localhost"])
        .args(["-keyout", &format!("{data}/server.key"), "-out", &format!("{data}/server.crt")])
        .output()
        .expect("openssl (scripts/install-test-services installs it)");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let key = format!("{data}/server.key");
    let crt = format!("{data}/server.crt");
    // The server runs as `postgres` when the tests run as root.
    let _ = std::process::Command::new("chown").args(["postgres:postgres", &key, &crt]).status();
    std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    // `writer` must give its password (the cluster trusts everyone else).
    let hba = format!("{data}/pg_hba.conf");
    let rules = std::fs::read_to_string(&hba).unwrap();
    std::fs::write(&hba, format!("host all writer 127.0.0.1/32 scram-sha-256\n{rules}")).unwrap();
    pg.psql("ALTER SYSTEM SET ssl = on");
    pg.psql("SELECT pg_reload_conf()");
    poll_until("TLS on", Duration::from_secs(10), || pg.psql("SHOW ssl") == "on");
    pg.psql("CREATE ROLE writer LOGIN PASSWORD 'pw-from-env'");
    pg.psql("CREATE TABLE secure (n int)");
    pg.psql("GRANT ALL ON secure TO writer; GRANT CREATE ON SCHEMA public TO writer");
    let dir = tempfile::tempdir().unwrap();
    let url = format!("postgres://writer@127.0.0.1:{}/postgres", pg.port);
    let cfg = config(
        dir.path(),
        1,
        &[(
            "p",
            "in",
            format!(
                "url = \"{url}\"\ntable = \"secure\"\ntls = \"require\"\npassword_env = \"FLOWGATE_TEST_PG_PASSWORD\""
            ),
        )],
    );
    let engine = EngineProcess::start_with(dir.path(), Some(&cfg), &[("FLOWGATE_TEST_PG_PASSWORD", "pw-from-env")]);
    post(&engine, "in", &(0..10).map(|n| format!(r#"{{"n":{n}}}"#)).collect::<Vec<_>>());
    poll_until("the rows", Duration::from_secs(60), || count(&pg, "SELECT count(*) FROM secure") == 10);
    assert_eq!(
        pg.psql(
            "SELECT bool_and(s.ssl) FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) WHERE a.usename = 'writer'"
        ),
        "t",
        "the sink's connection is encrypted"
    );
    assert!(!engine.log().contains("pw-from-env"), "the password is not logged");
}
