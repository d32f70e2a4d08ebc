//! What a running source tells `/v1/stats` and `/metrics`.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use parking_lot::Mutex;
use serde_json::json;

/// Where a source is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SourceState {
    /// Connecting for the first time.
    Connecting,
    /// Connected and reading the tables' existing rows (the initial snapshot).
    Snapshot,
    /// Connected and reading.
    Connected,
    /// Lost its connection (or could not set up); waiting to try again.
    Reconnecting,
    /// Did all it had to (a source that reads once, such as a snapshot only).
    Finished,
    /// Stopped (engine shutdown).
    Stopped,
}

impl SourceState {
    fn as_str(self) -> &'static str {
        match self {
            SourceState::Connecting => "connecting",
            SourceState::Snapshot => "snapshot",
            SourceState::Connected => "connected",
            SourceState::Reconnecting => "reconnecting",
            SourceState::Finished => "finished",
            SourceState::Stopped => "stopped",
        }
    }
}

#[derive(Debug)]
struct Inner {
    state: SourceState,
    last_error: Option<String>,
    /// The upstream position confirmed (durable here), as the source spells it.
    position: Option<String>,
    /// Bytes of upstream log between the newest position seen and the confirmed one.
    lag_bytes: u64,
    reconnects: u64,
    /// Seconds between the commit of the newest transaction confirmed and its
    /// confirmation (0 once caught up).
    lag_ms: u64,
    /// Changes per (table, op).
    changes: BTreeMap<(String, &'static str), u64>,
    snapshot: Option<SnapshotProgress>,
}

/// How far a source's initial read of existing rows is.
#[derive(Clone, Debug, PartialEq, Eq)]
struct SnapshotProgress {
    state: &'static str,
    tables: u64,
    tables_done: u64,
    rows: u64,
    rows_estimate: u64,
}

impl SnapshotProgress {
    fn percent(&self) -> f64 {
        if self.state == "done" {
            return 100.0;
        }
        let p = self.rows as f64 * 100.0 / self.rows_estimate.max(1) as f64;
        (p * 10.0).round().min(999.0) / 10.0
    }
}

/// The state and counters of one source, shared between it and the server.
#[derive(Debug)]
pub struct SourceStatus {
    name: String,
    kind: String,
    inner: Mutex<Inner>,
}

impl SourceStatus {
    /// A source that has not connected yet.
    pub fn new(name: &str, kind: &str) -> SourceStatus {
        SourceStatus {
            name: name.to_owned(),
            kind: kind.to_owned(),
            inner: Mutex::new(Inner {
                state: SourceState::Connecting,
                last_error: None,
                position: None,
                lag_bytes: 0,
                reconnects: 0,
                lag_ms: 0,
                changes: BTreeMap::new(),
                snapshot: None,
            }),
        }
    }

    /// The source's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Sets the state.
    pub fn set_state(&self, state: SourceState) {
        self.inner.lock().state = state;
    }

    /// The state.
    pub fn state(&self) -> SourceState {
        self.inner.lock().state
    }

    /// Records an error and the move to [`SourceState::Reconnecting`].
    pub fn failed(&self, error: String) {
        let mut inner = self.inner.lock();
        inner.state = SourceState::Reconnecting;
        inner.last_error = Some(error);
        inner.reconnects += 1;
    }

    /// Records the confirmed position and the lag behind the newest one seen.
    pub fn set_position(&self, position: String, lag_bytes: u64) {
        let mut inner = self.inner.lock();
        inner.position = Some(position);
        inner.lag_bytes = lag_bytes;
    }

    /// Records the lag in time behind the server (milliseconds).
    pub fn set_lag_ms(&self, lag_ms: u64) {
        self.inner.lock().lag_ms = lag_ms;
    }

    /// Records the snapshot's progress: `state` (`reading`, `done`), tables in it and
    /// read, rows stored and the rows expected (an estimate while reading).
    pub fn set_snapshot(&self, state: &'static str, tables: u64, tables_done: u64, rows: u64, rows_estimate: u64) {
        self.inner.lock().snapshot = Some(SnapshotProgress { state, tables, tables_done, rows, rows_estimate });
    }

    /// Why this source makes the engine not ready, if it does: it lost its connection
    /// or could not set up.
    pub fn down_reason(&self) -> Option<String> {
        let inner = self.inner.lock();
        (inner.state == SourceState::Reconnecting).then(|| {
            format!(
                "source '{}' is down and reconnecting: {}",
                self.name,
                inner.last_error.as_deref().unwrap_or("unknown error")
            )
        })
    }

    /// Counts `n` changes of `op` to `table`.
    pub fn count_changes(&self, table: &str, op: &'static str, n: u64) {
        let mut inner = self.inner.lock();
        match inner.changes.get_mut(&(table.to_owned(), op)) {
            Some(c) => *c += n,
            None => {
                inner.changes.insert((table.to_owned(), op), n);
            }
        }
    }

    /// The JSON of `/v1/stats`.
    pub fn to_json(&self) -> serde_json::Value {
        let inner = self.inner.lock();
        let mut changes = serde_json::Map::new();
        for ((table, op), n) in &inner.changes {
            let entry = changes.entry(table.clone()).or_insert_with(|| json!({}));
            entry[*op] = json!(n);
        }
        json!({
            "name": self.name,
            "type": self.kind,
            "state": inner.state.as_str(),
            "last_error": inner.last_error,
            "position": inner.position,
            "lag_bytes": inner.lag_bytes,
            "lag_seconds": inner.lag_ms as f64 / 1000.0,
            "snapshot": inner.snapshot.as_ref().map(|s| json!({
                "state": s.state,
                "tables": s.tables,
                "tables_done": s.tables_done,
                "rows": s.rows,
                "rows_estimate": s.rows_estimate,
                "percent": s.percent(),
            })),
            "reconnects": inner.reconnects,
            "changes": changes,
        })
    }

    /// Writes the source's metrics in the Prometheus text format.
    pub fn render_metrics(statuses: &[std::sync::Arc<SourceStatus>], out: &mut String) {
        if statuses.is_empty() {
            return;
        }
        let esc = |s: &str| s.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n");
        out.push_str("# HELP flowgate_source_changes Changes a source read, per table and operation.\n");
        out.push_str("# TYPE flowgate_source_changes counter\n");
        for s in statuses {
            for ((table, op), n) in &s.inner.lock().changes {
                let _ = writeln!(
                    out,
                    "flowgate_source_changes_total{{source=\"{}\",table=\"{}\",op=\"{op}\"}} {n}",
                    esc(&s.name),
                    esc(table)
                );
            }
        }
        out.push_str("# HELP flowgate_source_lag_bytes Upstream log bytes not yet confirmed durable here.\n");
        out.push_str("# TYPE flowgate_source_lag_bytes gauge\n");
        for s in statuses {
            let _ =
                writeln!(out, "flowgate_source_lag_bytes{{source=\"{}\"}} {}", esc(&s.name), s.inner.lock().lag_bytes);
        }
        out.push_str("# HELP flowgate_source_lag_seconds Time between the commit of the newest change confirmed and now (0 when caught up).\n");
        out.push_str("# TYPE flowgate_source_lag_seconds gauge\n");
        for s in statuses {
            let lag = s.inner.lock().lag_ms as f64 / 1000.0;
            let _ = writeln!(out, "flowgate_source_lag_seconds{{source=\"{}\"}} {lag}", esc(&s.name));
        }
        out.push_str("# HELP flowgate_source_snapshot_rows Rows a source's initial snapshot stored.\n");
        out.push_str("# TYPE flowgate_source_snapshot_rows gauge\n");
        for s in statuses {
            if let Some(p) = &s.inner.lock().snapshot {
                let _ = writeln!(out, "flowgate_source_snapshot_rows{{source=\"{}\"}} {}", esc(&s.name), p.rows);
            }
        }
        out.push_str("# HELP flowgate_source_snapshot_percent How far a source's initial snapshot is (estimated while reading).\n");
        out.push_str("# TYPE flowgate_source_snapshot_percent gauge\n");
        for s in statuses {
            if let Some(p) = &s.inner.lock().snapshot {
                let _ =
                    writeln!(out, "flowgate_source_snapshot_percent{{source=\"{}\"}} {}", esc(&s.name), p.percent());
            }
        }
        out.push_str("# HELP flowgate_source_reconnects Times a source lost or could not set up its connection.\n");
        out.push_str("# TYPE flowgate_source_reconnects counter\n");
        for s in statuses {
            let _ = writeln!(
                out,
                "flowgate_source_reconnects_total{{source=\"{}\"}} {}",
                esc(&s.name),
                s.inner.lock().reconnects
            );
        }
        out.push_str("# HELP flowgate_source_connected 1 while a source is connected upstream.\n");
        out.push_str("# TYPE flowgate_source_connected gauge\n");
        for s in statuses {
            let up = u8::from(matches!(s.state(), SourceState::Connected | SourceState::Snapshot));
            let _ = writeln!(out, "flowgate_source_connected{{source=\"{}\"}} {up}", esc(&s.name));
        }
    }
}
