//! The `postgres_cdc` source against a private PostgreSQL (wal_level = logical) and real
//! engine processes: envelopes and types, exactly once across SIGKILL of flowgate and
//! restarts of PostgreSQL, the confirmed position never ahead of what is stored, the
//! heartbeat of an idle slot, and a dropped slot named in the stats.

mod common;

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::postgres::PgServer;
use common::{poll_until, EngineProcess};
use serde_json::Value;

const PARTITIONS: &str = "3";

fn write_config(dir: &Path, pg: &PgServer, tables: &[&str], topic: &str) -> std::path::PathBuf {
    let tables: Vec<String> = tables.iter().map(|t| format!("\"{t}\"")).collect();
    let text = format!(
        "[[sources]]\nname = \"pg\"\ntype = \"postgres_cdc\"\nurl = \"{}\"\ntables = [{}]\n{topic}\n\
         status_interval_ms = 100\n",
        pg.url(),
        tables.join(", ")
    );
    let path = dir.join("flowgate.toml");
    std::fs::write(&path, text).unwrap();
    path
}

fn start(data: &Path, config: &Path) -> EngineProcess {
    EngineProcess::start_with(data, Some(config), &[("FLOWGATE_LOG__DEFAULT_PARTITIONS", PARTITIONS)])
}

fn source_stats(engine: &EngineProcess) -> Value {
    let (_, body) = engine.http("GET", "/v1/stats", b"");
    let stats: Value = serde_json::from_str(&body).unwrap();
    stats["sources"][0].clone()
}

fn wait_connected(engine: &EngineProcess) {
    poll_until("the source connects", Duration::from_secs(60), || source_stats(engine)["state"] == "connected");
}

/// Every event of `topic` (all partitions) read through the HTTP API, as (partition,
/// key, payload), in offset order per partition.
fn read_topic(engine: &EngineProcess, topic: &str) -> Vec<(u32, Option<String>, Value)> {
    let mut out = Vec::new();
    for p in 0.. {
        let mut from = 0u64;
        loop {
            let (status, body) =
                engine.http("GET", &format!("/v1/topics/{topic}/events?partition={p}&from={from}&limit=10000"), b"");
            if status == 404 && from == 0 && p > 0 {
                return out;
            }
            if status != 200 {
                if p == 0 && from == 0 {
                    return out; // no topic yet
                }
                return out;
            }
            let page: Value = serde_json::from_str(&body).unwrap();
            for e in page["events"].as_array().unwrap() {
                out.push((p, e["key"].as_str().map(str::to_owned), e["payload"].clone()));
            }
            let next = page["next_offset"].as_u64().unwrap();
            if next >= page["log_end_offset"].as_u64().unwrap() || next == from {
                break;
            }
            from = next;
        }
    }
    out
}

fn slot_confirmed(pg: &PgServer) -> String {
    pg.psql("select coalesce(confirmed_flush_lsn::text, '') from pg_replication_slots where slot_name = 'flowgate'")
}

#[test]
fn changes_of_two_tables_arrive_as_envelopes_with_their_types() {
    let pg = PgServer::start();
    pg.psql(
        "create table orders (id int primary key, amount numeric(10,2), paid bool, note text, meta jsonb, \
         created timestamptz, day date, uid uuid, tags text[], blob bytea, ratio float8, big text); \
         alter table orders alter column big set storage external; \
         create table customers (id bigint primary key, name text); \
         alter table customers replica identity full",
    );
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &pg, &["public.orders", "public.customers"], "topic_prefix = \"cdc\"");
    let engine = start(&dir.path().join("data"), &config);
    wait_connected(&engine);
    pg.psql(
        "insert into orders values (1, 12.50, true, 'first', '{\"a\": [1, 2]}', '2024-05-01 12:00:00.5+00', \
         '2024-05-01', 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', '{x,y}', '\\x00ff10', 0.25, \
         (select string_agg(md5(i::text), '') from generate_series(1, 300) i)); \
         insert into orders (id) values (2)",
    );
    pg.psql("update orders set paid = false where id = 1");
    pg.psql("delete from orders where id = 2");
    pg.psql("insert into customers values (7, 'ann'); update customers set name = 'bob' where id = 7");
    pg.psql("delete from customers where id = 7");
    pg.psql("truncate orders");

    poll_until("every order change arrives", Duration::from_secs(30), || {
        read_topic(&engine, "cdc.public.orders").len() >= 4 + 2
    });
    let orders = read_topic(&engine, "cdc.public.orders");
    let rows: Vec<&Value> = orders.iter().map(|(_, _, p)| p).filter(|p| p["op"] != "t").collect();
    assert_eq!(rows.len(), 4, "{orders:#?}");
    let insert = rows.iter().find(|p| p["op"] == "c" && p["after"]["id"] == 1).expect("insert of 1");
    let after = &insert["after"];
    assert_eq!(insert["before"], Value::Null);
    assert_eq!(after["amount"], "12.50");
    assert_eq!(after["paid"], true);
    assert_eq!(after["note"], "first");
    assert_eq!(after["meta"], serde_json::json!({"a": [1, 2]}));
    assert_eq!(after["created"], "2024-05-01T12:00:00.5Z");
    assert_eq!(after["day"], "2024-05-01");
    assert_eq!(after["uid"], "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11");
    assert_eq!(after["tags"], serde_json::json!(["x", "y"]));
    assert_eq!(after["blob"], "AP8Q");
    assert_eq!(after["ratio"], 0.25);
    assert_eq!(after["big"].as_str().unwrap().len(), 9600);
    let source = &insert["source"];
    assert_eq!((source["schema"].as_str(), source["table"].as_str()), (Some("public"), Some("orders")));
    assert_eq!(source["snapshot"], false);
    assert!(source["lsn"].as_u64().unwrap() > 0 && source["txid"].as_u64().unwrap() > 0, "{source}");
    assert!(source["commit_ts_ms"].as_i64().unwrap() > 1_700_000_000_000, "{source}");
    assert!(insert["ts_ms"].as_i64().unwrap() > 1_700_000_000_000);
    let null_row = rows.iter().find(|p| p["op"] == "c" && p["after"]["id"] == 2).unwrap();
    assert_eq!(null_row["after"]["amount"], Value::Null);

    let update = rows.iter().find(|p| p["op"] == "u").expect("an update");
    assert_eq!(update["after"]["paid"], false);
    assert_eq!(update["after"]["big"], "__unchanged_toast", "an unchanged TOAST value is marked, not null");
    assert_eq!(update["before"], Value::Null, "default replica identity: no before image without a key change");
    let delete = rows.iter().find(|p| p["op"] == "d").expect("a delete");
    assert_eq!(delete["before"], serde_json::json!({"id": 2}));
    assert_eq!(delete["after"], Value::Null);
    // Keys are the primary key as JSON, and one key's changes share a partition.
    let key_of_1: HashSet<(u32, Option<String>)> = orders
        .iter()
        .filter(|(_, _, p)| p["after"]["id"] == 1 || p["before"]["id"] == 1)
        .map(|(p, k, _)| (*p, k.clone()))
        .collect();
    assert_eq!(key_of_1.len(), 1, "{key_of_1:?}");
    assert_eq!(key_of_1.iter().next().unwrap().1.as_deref(), Some("{\"id\":1}"));
    // A truncate reaches every partition, after the changes before it.
    let truncates: Vec<u32> = orders.iter().filter(|(_, _, p)| p["op"] == "t").map(|(p, _, _)| *p).collect();
    assert_eq!(truncates.len(), PARTITIONS.parse::<usize>().unwrap(), "{truncates:?}");

    poll_until("every customer change arrives", Duration::from_secs(30), || {
        read_topic(&engine, "cdc.public.customers").len() >= 3
    });
    let customers = read_topic(&engine, "cdc.public.customers");
    let ops: Vec<&str> = customers.iter().map(|(_, _, p)| p["op"].as_str().unwrap()).collect();
    assert_eq!(ops, ["c", "u", "d"]);
    // REPLICA IDENTITY FULL: before images hold every column.
    assert_eq!(customers[1].2["before"], serde_json::json!({"id": 7, "name": "ann"}));
    assert_eq!(customers[1].2["after"], serde_json::json!({"id": 7, "name": "bob"}));
    assert_eq!(customers[2].2["before"], serde_json::json!({"id": 7, "name": "bob"}));

    // Metrics per table and op, and the position in the stats.
    poll_until("changes are counted", Duration::from_secs(10), || {
        engine.metric("flowgate_source_changes_total{source=\"pg\",table=\"public.customers\",op=\"u\"}") == 1.0
    });
    assert_eq!(engine.metric("flowgate_source_connected{source=\"pg\"}"), 1.0);
    let stats = source_stats(&engine);
    assert_eq!(stats["changes"]["public.orders"]["c"], 2, "{stats}");
    assert!(stats["position"].as_str().unwrap().contains('/'), "{stats}");
    poll_until("the slot confirms the changes", Duration::from_secs(30), || {
        pg.psql("select confirmed_flush_lsn >= pg_current_wal_lsn() - 10000000 from pg_replication_slots") == "t"
    });
}

/// What a writer committed: per transaction, its txid and the changes it made as
/// (id, n) pairs (n grows with each update of a row).
#[derive(Default)]
struct Written {
    txids: Vec<u64>,
    changes: usize,
}

/// Writes `rounds` rounds to `items` on a thread: each round inserts 100 new rows in one
/// transaction and updates the previous round's rows in another; every 10th round is
/// one transaction of 2000 updates (many chunks). Returns the thread's handle.
fn spawn_writer(
    pg_url_port: u16,
    rounds: usize,
    paused: Arc<AtomicBool>,
    written: Arc<Mutex<Written>>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let psql = |sql: &str| -> Result<String, String> {
            let bin = common::postgres::bin_dir().join("psql");
            let out = std::process::Command::new(bin)
                .args(["-h", "127.0.0.1", "-p", &pg_url_port.to_string(), "-U", "postgres", "-d", "postgres"])
                .args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-c", sql])
                .output()
                .unwrap();
            if out.status.success() {
                Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
            } else {
                Err(String::from_utf8_lossy(&out.stderr).into_owned())
            }
        };
        let mut round = 0;
        while round < rounds {
            while paused.load(Ordering::Acquire) {
                std::thread::sleep(Duration::from_millis(20));
            }
            let lo = round * 100;
            let dml = if round % 10 == 9 {
                // One large transaction: up to 2000 rows, more than a chunk per partition.
                "update items set n = n + 1 where id < 4000".to_owned()
            } else if round % 2 == 0 {
                format!("insert into items select g, 0 from generate_series({lo}, {}) g", lo + 99)
            } else {
                format!("update items set n = n + 1 where id >= {} and id < {lo}", lo - 100)
            };
            let sql = format!("with u as ({dml} returning 1) select count(*) || ',' || txid_current() from u");
            match psql(&sql) {
                Ok(out) => {
                    let (changes, txid) = out.trim().split_once(',').unwrap();
                    let mut w = written.lock().unwrap();
                    w.txids.push(txid.parse().unwrap());
                    w.changes += changes.parse::<usize>().unwrap();
                    round += 1;
                }
                // The server is restarting: the transaction did not commit; try again.
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    })
}

/// Checks the `items` topic holds each change exactly once and each row's versions in
/// commit order; returns the count.
fn check_exactly_once(events: &[(u32, Option<String>, Value)], written: &Written) {
    let mut seen = HashSet::new();
    let mut last_n: HashMap<i64, (i64, u32)> = HashMap::new();
    for (p, key, e) in events {
        let id = e["after"]["id"].as_i64().unwrap();
        let n = e["after"]["n"].as_i64().unwrap();
        assert!(seen.insert((id, n)), "row {id} version {n} stored twice");
        assert_eq!(key.as_deref(), Some(format!("{{\"id\":{id}}}").as_str()));
        if let Some((prev, prev_p)) = last_n.insert(id, (n, *p)) {
            assert_eq!(prev_p, *p, "row {id} moved partitions");
            assert_eq!(prev + 1, n, "row {id}: version {n} after {prev}");
        } else {
            assert_eq!(n, 0, "row {id} starts at version 0");
        }
    }
    assert_eq!(seen.len(), written.changes, "every change once");
    let txids: HashSet<u64> = events.iter().map(|(_, _, e)| e["source"]["txid"].as_u64().unwrap()).collect();
    for t in &written.txids {
        assert!(txids.contains(&(t & 0xffff_ffff)), "transaction {t} stored");
    }
}

/// The txids of the transactions the slot still holds (not confirmed), read with the
/// slot idle (the engine is down).
fn pending_txids(pg: &PgServer) -> HashSet<u64> {
    let mut out = String::new();
    poll_until("the slot is released", Duration::from_secs(30), || {
        match pg.try_psql(
            "select coalesce(string_agg(distinct xid::text, ','), '') from \
             pg_logical_slot_peek_binary_changes('flowgate', null, null, 'proto_version', '1', \
             'publication_names', 'flowgate')",
        ) {
            Ok(o) => {
                out = o;
                true
            }
            Err(_) => false,
        }
    });
    out.split(',').filter(|s| !s.is_empty()).map(|s| s.parse().unwrap()).collect()
}

/// Every transaction stored in the dead engine's log, read with the log itself.
fn stored_txids(data: &Path, topic: &str) -> HashSet<u64> {
    let log = flowgate_log::Log::open(data, flowgate_log::LogConfig::default()).unwrap();
    let mut out = HashSet::new();
    if let Some(t) = log.topic(topic) {
        for p in t.partitions() {
            let mut offset = p.start_offset();
            let mut scratch = Vec::new();
            while offset < p.end_offset() {
                let read = p.read(offset, 1 << 20).unwrap();
                let mut rest = &read.batches[..];
                while !rest.is_empty() {
                    let (view, tail) = flowgate_core::BatchView::parse(rest).unwrap();
                    for r in view.records(&mut scratch).unwrap() {
                        let r = r.unwrap();
                        let o = view.base_offset() + u64::from(r.offset_delta);
                        if o >= offset {
                            let e: Value = serde_json::from_slice(r.payload).unwrap();
                            out.insert(e["source"]["txid"].as_u64().unwrap());
                        }
                    }
                    offset = offset.max(view.base_offset() + u64::from(view.header.record_count));
                    rest = tail;
                }
            }
        }
    }
    log.close().unwrap();
    out
}

fn items_setup(pg: &PgServer, dir: &Path) -> std::path::PathBuf {
    pg.psql("create table items (id int primary key, n int not null)");
    write_config(dir, pg, &["items"], "topic = \"items\"")
}

#[test]
fn sigkill_of_flowgate_during_streaming_stores_every_change_exactly_once() {
    let pg = PgServer::start();
    let dir = tempfile::tempdir().unwrap();
    let config = items_setup(&pg, dir.path());
    let data = dir.path().join("data");
    let mut engine = start(&data, &config);
    wait_connected(&engine);
    let paused = Arc::new(AtomicBool::new(false));
    let written = Arc::new(Mutex::new(Written::default()));
    let writer = spawn_writer(pg.port, 120, paused.clone(), written.clone());
    for _ in 0..3 {
        poll_until("some changes arrive", Duration::from_secs(60), || {
            engine.metric("flowgate_source_changes_total") >= 3000.0 || writer.is_finished()
        });
        engine.kill9();
        // What the slot will not send again must be in the log already.
        paused.store(true, Ordering::Release);
        std::thread::sleep(Duration::from_millis(300)); // let an in-flight psql finish
        let committed: Vec<u64> = written.lock().unwrap().txids.clone();
        let stored = stored_txids(&data, "items");
        let pending = pending_txids(&pg);
        for t in committed {
            let t = t & 0xffff_ffff;
            assert!(
                stored.contains(&t) || pending.contains(&t),
                "transaction {t} was confirmed to PostgreSQL (confirmed_flush_lsn {}) but is not in the log",
                slot_confirmed(&pg)
            );
        }
        paused.store(false, Ordering::Release);
        // A source renamed between a crash and the restart reads the same slot into the
        // same topic: what it replays is still recognised as stored.
        let renamed = std::fs::read_to_string(&config).unwrap().replace("name = \"pg\"", "name = \"pg-renamed\"");
        std::fs::write(&config, renamed).unwrap();
        engine = engine.restart();
    }
    writer.join().unwrap();
    let written = written.lock().unwrap();
    poll_until("every change arrives", Duration::from_secs(120), || {
        read_topic(&engine, "items").len() >= written.changes
    });
    let events = read_topic(&engine, "items");
    check_exactly_once(&events, &written);
    assert!(written.changes >= 20_000, "{}", written.changes);
}

#[test]
fn postgres_restarts_and_crashes_during_streaming_lose_and_double_nothing() {
    let mut pg = PgServer::start();
    let dir = tempfile::tempdir().unwrap();
    let config = items_setup(&pg, dir.path());
    let engine = start(&dir.path().join("data"), &config);
    wait_connected(&engine);
    let paused = Arc::new(AtomicBool::new(false));
    let written = Arc::new(Mutex::new(Written::default()));
    let writer = spawn_writer(pg.port, 60, paused.clone(), written.clone());
    for (i, crash) in [false, true].into_iter().enumerate() {
        poll_until("some changes arrive", Duration::from_secs(60), || {
            engine.metric("flowgate_source_changes_total") >= ((i + 1) * 1500) as f64 || writer.is_finished()
        });
        paused.store(true, Ordering::Release);
        std::thread::sleep(Duration::from_millis(200));
        if crash {
            pg.crash();
        } else {
            pg.stop();
        }
        poll_until("the source reports the outage", Duration::from_secs(30), || {
            let s = source_stats(&engine);
            s["state"] == "reconnecting" && !s["last_error"].is_null()
        });
        // The engine keeps serving everything else.
        let (status, _) = engine.http("POST", "/v1/topics/other/events", b"{\"a\":1}");
        assert_eq!(status, 200);
        pg.start_again();
        paused.store(false, Ordering::Release);
        wait_connected(&engine);
    }
    writer.join().unwrap();
    let written = written.lock().unwrap();
    poll_until("every change arrives", Duration::from_secs(120), || {
        read_topic(&engine, "items").len() >= written.changes
    });
    check_exactly_once(&read_topic(&engine, "items"), &written);
    assert!(engine.metric("flowgate_source_reconnects_total{source=\"pg\"}") >= 2.0);
}

#[test]
fn an_idle_captured_table_lets_the_slot_advance_while_others_are_written() {
    let pg = PgServer::start();
    pg.psql("create table quiet (id int primary key); create table busy (id serial primary key, v text)");
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &pg, &["quiet"], "topic = \"quiet\"");
    let engine = start(&dir.path().join("data"), &config);
    wait_connected(&engine);
    let start_lsn = slot_confirmed(&pg);
    for _ in 0..20 {
        pg.psql("insert into busy (v) select repeat('x', 100) from generate_series(1, 500)");
    }
    let target = pg.psql("select pg_current_wal_lsn()");
    poll_until("the slot passes the other table's writes", Duration::from_secs(60), || {
        pg.psql(&format!(
            "select confirmed_flush_lsn >= '{target}'::pg_lsn from pg_replication_slots where slot_name = 'flowgate'"
        )) == "t"
    });
    assert_ne!(slot_confirmed(&pg), start_lsn);
    assert!(read_topic(&engine, "quiet").is_empty());
    let lag = source_stats(&engine)["lag_bytes"].as_u64().unwrap();
    assert!(lag < 1_000_000, "lag {lag}");
}

#[test]
fn a_dropped_slot_is_an_error_naming_it_and_not_silently_created_again() {
    let pg = PgServer::start();
    pg.psql("create table t (id int primary key)");
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &pg, &["t"], "topic = \"t\"");
    let data = dir.path().join("data");
    let mut engine = start(&data, &config);
    wait_connected(&engine);
    pg.psql("insert into t values (1)");
    poll_until("the insert arrives", Duration::from_secs(30), || read_topic(&engine, "t").len() == 1);
    engine.terminate();
    pg.psql("select pg_drop_replication_slot('flowgate')");
    let engine = start(&data, &config);
    poll_until("the stats name the dropped slot", Duration::from_secs(30), || {
        source_stats(&engine)["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("replication slot 'flowgate' does not exist"))
    });
    assert_eq!(pg.psql("select count(*) from pg_replication_slots"), "0", "not created again");
}

#[test]
fn validate_checks_sources_and_names_the_bad_key_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(
        &path,
        "[[sources]]\nname = \"pg\"\ntype = \"postgres_cdc\"\nurl = \"postgres://u@h/db\"\ntables = [\"t\"]\n\
         topic = \"t\"\npublicaton = \"p\"\n",
    )
    .unwrap();
    let (code, _, err) = common::cli(&["validate", "--config", path.to_str().unwrap()], None);
    assert_ne!(code, 0);
    assert!(err.contains("line 1") && err.contains("unknown field `publicaton`"), "{err}");
    std::fs::write(&path, "[[sources]]\nname = \"pg\"\ntype = \"postgres_cdc\"\nurl = \"postgres://u@h/db\"\ntables = [\"t\"]\ntopic = \"t\"\n").unwrap();
    let (code, out, err) = common::cli(&["validate", "--config", path.to_str().unwrap()], None);
    assert_eq!(code, 0, "{out}{err}");
}

/// Per row, its events in log order must be one snapshot read (`r`) of some version and
/// then every later version once, in order, up to the row's last version in the table.
fn check_snapshot_then_changes(events: &[(u32, Option<String>, Value)], table: &HashMap<i64, i64>) {
    let mut versions: HashMap<i64, Vec<(&str, i64)>> = HashMap::new();
    for (_, _, e) in events {
        let id = e["after"]["id"].as_i64().unwrap();
        let op = e["op"].as_str().unwrap();
        assert_eq!(e["source"]["snapshot"], op == "r", "{e}");
        versions.entry(id).or_default().push((op, e["after"]["n"].as_i64().unwrap()));
    }
    assert_eq!(versions.len(), table.len(), "every row is read");
    for (id, last) in table {
        let seen = &versions[id];
        assert_eq!(seen[0].0, "r", "row {id} starts with its snapshot read: {seen:?}");
        assert_eq!(seen.iter().filter(|(op, _)| *op == "r").count(), 1, "row {id} read once: {seen:?}");
        for pair in seen.windows(2) {
            assert_eq!(pair[1], ("u", pair[0].1 + 1), "row {id}: every change once, in order: {seen:?}");
        }
        assert_eq!(seen.last().unwrap().1, *last, "row {id} ends at its last version: {seen:?}");
    }
}

#[test]
fn a_snapshot_interrupted_by_sigkills_resumes_and_hands_over_to_streaming_exactly_once() {
    let pg = PgServer::start();
    const ROWS: i64 = 100_000;
    pg.psql(&format!(
        "create table items (id int primary key, n int not null, pad text); \
         insert into items select g, 0, repeat('p', 40) from generate_series(1, {ROWS}) g"
    ));
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &pg, &["items"], "topic = \"items\"");
    let data = dir.path().join("data");
    // Updates all through the snapshot, its restarts and the streaming after.
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (stop, port) = (stop.clone(), pg.port);
        std::thread::spawn(move || {
            let mut round = 0i64;
            while !stop.load(Ordering::Acquire) {
                let lo = (round * 7919) % ROWS;
                let sql = format!("update items set n = n + 1 where id > {lo} and id <= {lo} + 50");
                let _ = std::process::Command::new(common::postgres::bin_dir().join("psql"))
                    .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-U", "postgres", "-d", "postgres"])
                    .args(["-X", "-q", "-c", &sql])
                    .output();
                round += 1;
            }
        })
    };
    let mut engine = start(&data, &config);
    let mut killed_while_reading = 0;
    for threshold in [15_000u64, 45_000, 75_000] {
        poll_until("the snapshot goes on", Duration::from_secs(120), || {
            let s = source_stats(&engine);
            s["snapshot"]["rows"].as_u64().unwrap_or(0) >= threshold || s["state"] == "connected"
        });
        if source_stats(&engine)["state"] == "snapshot" {
            killed_while_reading += 1;
        }
        engine.kill9();
        engine = engine.restart();
    }
    wait_connected(&engine);
    assert_eq!(source_stats(&engine)["snapshot"]["state"], "done");
    assert!(killed_while_reading >= 2, "the snapshot was interrupted {killed_while_reading} times");
    // And once more while streaming.
    std::thread::sleep(Duration::from_millis(500));
    engine.kill9();
    engine = engine.restart();
    wait_connected(&engine);
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::Release);
    writer.join().unwrap();
    let table: HashMap<i64, i64> = pg
        .psql("select string_agg(id || ':' || n, ',') from items")
        .split(',')
        .map(|p| {
            let (id, n) = p.split_once(':').unwrap();
            (id.parse().unwrap(), n.parse().unwrap())
        })
        .collect();
    assert!(table.values().sum::<i64>() > 0);
    // Every row's last version stored (or the time is up, and the check says what lacks).
    let caught_up = |engine: &EngineProcess| {
        let mut last: HashMap<i64, i64> = HashMap::new();
        for (_, _, e) in read_topic(engine, "items") {
            last.insert(e["after"]["id"].as_i64().unwrap(), e["after"]["n"].as_i64().unwrap());
        }
        last == table
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while !caught_up(&engine) && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
    }
    check_snapshot_then_changes(&read_topic(&engine, "items"), &table);
}

#[test]
fn initial_only_reads_once_without_a_slot_and_when_needed_reads_again_after_a_lost_slot() {
    let pg = PgServer::start();
    pg.psql(
        "create table tags (name text, seq int, note text, primary key (name, seq)); \
         insert into tags select chr(65 + g % 26) || chr(97 + g % 7) || g, g % 3, 'x' from generate_series(1, 3000) g",
    );
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &pg, &["tags"], "topic = \"tags\"\nsnapshot = \"initial_only\"");
    let mut engine = start(&dir.path().join("once"), &config);
    poll_until("the snapshot finishes", Duration::from_secs(60), || source_stats(&engine)["state"] == "finished");
    let events = read_topic(&engine, "tags");
    assert_eq!(events.len(), 3000);
    assert!(events.iter().all(|(_, k, e)| e["op"] == "r"
        && k.as_deref() == Some(&*format!("{{\"name\":{},\"seq\":{}}}", e["after"]["name"], e["after"]["seq"]))));
    assert_eq!(pg.psql("select count(*) from pg_replication_slots"), "0", "initial_only leaves no slot");
    engine.terminate();

    let config = write_config(dir.path(), &pg, &["tags"], "topic = \"tags\"\nsnapshot = \"when_needed\"");
    let data = dir.path().join("needed");
    let mut engine = start(&data, &config);
    wait_connected(&engine);
    pg.psql("insert into tags values ('new', 1, 'y')");
    poll_until("the snapshot and the insert arrive", Duration::from_secs(60), || {
        read_topic(&engine, "tags").len() == 3001
    });
    engine.terminate();
    pg.psql("select pg_drop_replication_slot('flowgate')");
    engine = start(&data, &config);
    wait_connected(&engine);
    poll_until("every row is read again from a new slot", Duration::from_secs(60), || {
        read_topic(&engine, "tags").len() == 3001 + 3001
    });
    let reads = read_topic(&engine, "tags").iter().filter(|(_, _, e)| e["op"] == "r").count();
    assert_eq!(reads, 3000 + 3001);
}

/// A table's rows as sorted text, for comparing two tables row for row.
fn table_rows(pg: &PgServer, table: &str) -> Result<String, String> {
    pg.try_psql(&format!(
        "select coalesce(string_agg(id || ':' || n || ':' || coalesce(note, '~') || ':' || coalesce(tags::text, '~'), \
         ',' order by id), '') from {table}"
    ))
}

#[test]
fn a_table_replicated_through_cdc_and_the_sink_equals_its_source_after_sigkills_and_an_outage() {
    let mut pg = PgServer::start();
    pg.psql(
        "create table a (id int primary key, n int not null, note text, tags text[]); \
         create table b (id int primary key, n int not null, note text, tags text[]); \
         insert into a select g, 0, 'start', array['t' || g, 'x \"y'] from generate_series(1, 20000) g",
    );
    let dir = tempfile::tempdir().unwrap();
    let source = write_config(dir.path(), &pg, &["a"], "topic = \"changes\"");
    let text = std::fs::read_to_string(&source).unwrap()
        + &format!(
            "\n[[pipelines]]\nname = \"replica\"\ntopics = [\"changes\"]\ncommit_interval_ms = 50\n\
             [[pipelines.sinks]]\nname = \"b\"\ntype = \"postgres\"\nurl = \"{}\"\ntable = \"b\"\nmode = \"cdc\"\n\
             connect_timeout_ms = 1000\nretry = {{ initial_backoff_ms = 50, max_backoff_ms = 1000 }}\n",
            pg.url()
        );
    std::fs::write(&source, text).unwrap();
    let data = dir.path().join("data");
    let mut engine = start(&data, &source);

    // Inserts, updates and deletes on `a` until told to stop; a failed statement (the
    // server is down) is tried again later.
    let stop = Arc::new(AtomicBool::new(false));
    let paused = Arc::new(AtomicBool::new(false));
    let writer = {
        let (stop, paused, port) = (stop.clone(), paused.clone(), pg.port);
        std::thread::spawn(move || {
            let mut round = 0i64;
            while !stop.load(Ordering::Acquire) {
                if paused.load(Ordering::Acquire) {
                    std::thread::sleep(Duration::from_millis(20));
                    continue;
                }
                let lo = (round * 389) % 20000;
                let sql = match round % 4 {
                    0 => format!(
                        "insert into a select g, 0, 'new' from generate_series({0}, {0} + 49) g",
                        100_000 + round * 50
                    ),
                    1 => format!("delete from a where id > {lo} and id <= {lo} + 10"),
                    _ => format!(
                        "update a set n = n + 1, note = 'r{round}', tags = array['r{round}', null, 'a,b'] \
                         where id > {lo} and id <= {lo} + 100"
                    ),
                };
                let ok = std::process::Command::new(common::postgres::bin_dir().join("psql"))
                    .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-U", "postgres", "-d", "postgres"])
                    .args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-c", &sql])
                    .output()
                    .is_ok_and(|o| o.status.success());
                if ok {
                    round += 1;
                } else {
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        })
    };
    // SIGKILLs during the snapshot (if it is still going) and during streaming.
    for _ in 0..2 {
        poll_until("rows reach b", Duration::from_secs(60), || {
            pg.try_psql("select count(*) from b").is_ok_and(|c| c.parse::<u64>().unwrap_or(0) > 0)
        });
        std::thread::sleep(Duration::from_millis(700));
        engine.kill9();
        engine = engine.restart();
    }
    // A 30 s outage of the server: the source and the sink both lose it.
    std::thread::sleep(Duration::from_secs(1));
    paused.store(true, Ordering::Release);
    std::thread::sleep(Duration::from_millis(200));
    pg.stop();
    poll_until("the source reports the outage", Duration::from_secs(30), || {
        source_stats(&engine)["state"] == "reconnecting"
    });
    std::thread::sleep(Duration::from_secs(30));
    pg.start_again();
    paused.store(false, Ordering::Release);
    wait_connected(&engine);
    std::thread::sleep(Duration::from_secs(2));
    engine.kill9();
    engine = engine.restart();
    std::thread::sleep(Duration::from_secs(1));
    stop.store(true, Ordering::Release);
    writer.join().unwrap();

    let expected = table_rows(&pg, "a").unwrap();
    assert!(expected.len() > 100_000, "a workload ran");
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while table_rows(&pg, "b").as_ref() != Ok(&expected) && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(250));
    }
    let got = table_rows(&pg, "b").unwrap();
    if got != expected {
        let a: HashSet<&str> = expected.split(',').collect();
        let b: HashSet<&str> = got.split(',').collect();
        let missing: Vec<_> = a.difference(&b).take(10).collect();
        let extra: Vec<_> = b.difference(&a).take(10).collect();
        panic!("b differs from a: missing {missing:?}, extra {extra:?}");
    }
    let (_, body) = engine.http("GET", "/v1/dlq?pipeline=replica", b"");
    assert!(!body.contains("\"offset\""), "no dead letters: {body}");
}
