//! The Debezium-style envelope every change and snapshot row is stored as.

use serde::Serialize;
use serde_json::{Map, Value};

use super::pgoutput::Relation;
use super::stream::Txn;

/// A change as stored: a Debezium-style envelope, written straight from its parts (no
/// tree is built per change). Fields in name order, as a JSON object map prints them.
#[derive(Serialize)]
pub(super) struct Envelope<'a> {
    after: &'a Value,
    before: &'a Value,
    op: &'a str,
    source: EnvelopeSource<'a>,
    ts_ms: i64,
}

/// Where a change comes from.
#[derive(Serialize)]
struct EnvelopeSource<'a> {
    commit_ts_ms: i64,
    connector: &'static str,
    lsn: u64,
    name: &'a str,
    schema: &'a str,
    snapshot: bool,
    table: &'a str,
    txid: u32,
}

/// Where a change or snapshot row comes from.
pub(super) struct Origin<'a> {
    /// The transaction's commit LSN, or the snapshot's consistent point.
    pub(super) lsn: u64,
    pub(super) txid: u32,
    pub(super) commit_ts_ms: i64,
    pub(super) snapshot: bool,
    pub(super) schema: &'a str,
    pub(super) table: &'a str,
}

impl<'a> Origin<'a> {
    pub(super) fn of(txn: &Txn, relation: &'a Relation) -> Origin<'a> {
        Origin {
            lsn: txn.final_lsn,
            txid: txn.xid,
            commit_ts_ms: txn.commit_ts_ms,
            snapshot: false,
            schema: &relation.namespace,
            table: &relation.name,
        }
    }
}

impl<'a> Envelope<'a> {
    pub(super) fn new(source: &'a str, origin: &Origin<'a>, op: &'a str, before: &'a Value, after: &'a Value) -> Self {
        Envelope {
            after,
            before,
            op,
            source: EnvelopeSource {
                commit_ts_ms: origin.commit_ts_ms,
                connector: "postgres_cdc",
                lsn: origin.lsn,
                name: source,
                schema: origin.schema,
                snapshot: origin.snapshot,
                table: origin.table,
                txid: origin.txid,
            },
            ts_ms: flowgate_core::time::now_ms(),
        }
    }
}

/// The key of a row: its key columns' values as a JSON object (`None` without a key).
pub(super) fn key_json(columns: &[&str], row: &Value) -> anyhow::Result<Option<Vec<u8>>> {
    if columns.is_empty() {
        return Ok(None);
    }
    let mut k = Map::new();
    for c in columns {
        k.insert((*c).to_owned(), row.get(c).cloned().unwrap_or(Value::Null));
    }
    Ok(Some(serde_json::to_vec(&Value::Object(k))?))
}
