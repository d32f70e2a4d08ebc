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
    /// Connected and reading.
    Connected,
    /// Lost its connection (or could not set up); waiting to try again.
    Reconnecting,
    /// Stopped (engine shutdown).
    Stopped,
}

impl SourceState {
    fn as_str(self) -> &'static str {
        match self {
            SourceState::Connecting => "connecting",
            SourceState::Connected => "connected",
            SourceState::Reconnecting => "reconnecting",
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
    /// Changes per (table, op).
    changes: BTreeMap<(String, &'static str), u64>,
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
                changes: BTreeMap::new(),
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
            let up = u8::from(s.state() == SourceState::Connected);
            let _ = writeln!(out, "flowgate_source_connected{{source=\"{}\"}} {up}", esc(&s.name));
        }
    }
}
