//! Streaming: a session's replication stream read, each transaction's changes appended
//! in chunks as an idempotent producer, and the slot's position confirmed once durable.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use flowgate_core::{partition_for_key, BatchBuilder, ProducerStamp};
use flowgate_log::append::{Route, Scratch};
use flowgate_log::{LogError, Partition, Topic};
use pgwire_replication::{Lsn, ReplicationEvent};
use serde_json::{Map, Value};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use super::envelope::{key_json, Envelope, Origin};
use super::marker::Marker;
use super::pgoutput::{self, Datum, Message, Old, Relation};
use super::{
    coverage, lsn_text, pg_micros_to_unix_ms, snapshot, value, Runner, CHUNK_EVENTS, CHUNK_INPUT_BYTES, MAX_LSN,
};
use crate::sources::SourceState;

/// A transaction's changes on their way into one partition.
#[derive(Default)]
struct PartBuffer {
    builder: BatchBuilder,
    /// The index of the next chunk of the open transaction.
    chunk: u32,
    /// Decoded bytes the buffered changes came from.
    input_bytes: usize,
}

/// The open transaction.
pub(super) struct Txn {
    pub(super) final_lsn: u64,
    pub(super) xid: u32,
    pub(super) commit_ts_ms: i64,
    /// Per (topic, partition): the end offset of the last chunk written, to wait for.
    pub(super) written: HashMap<(String, u32), (Arc<Partition>, u64)>,
}

/// A position to confirm once these partitions are durable up to these offsets.
struct PendingAck {
    lsn: u64,
    /// The transaction's commit time (0 for a heartbeat: caught up).
    commit_ts_ms: i64,
    waits: Vec<(Arc<Partition>, u64)>,
}

/// The producer sequence of chunk `chunk` of the transaction committed at `commit_lsn`.
pub fn sequence(commit_lsn: u64, chunk: u32) -> anyhow::Result<u64> {
    anyhow::ensure!(
        commit_lsn <= MAX_LSN,
        "commit LSN {} is beyond {} : sequences hold 48 bits of LSN",
        lsn_text(commit_lsn),
        lsn_text(MAX_LSN)
    );
    anyhow::ensure!(
        chunk < 1 << 16,
        "a transaction wrote more than {} changes to one partition; the largest is {} ({} chunks of {CHUNK_EVENTS})",
        (1usize << 16) * CHUNK_EVENTS,
        (1usize << 16) * CHUNK_EVENTS,
        1 << 16
    );
    Ok(commit_lsn << 16 | u64::from(chunk))
}

/// The producer of one (database, slot) stream into one topic partition: FNV-1a over
/// length-prefixed fields, stable across builds, restarts and renames of the source
/// (the stream, not the config's name, decides what a replay repeats).
fn producer_id(database: &str, slot: &str, topic: &Topic, partition: u32) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut field = |bytes: &[u8]| {
        for b in (bytes.len() as u64).to_le_bytes().iter().chain(bytes) {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    };
    field(b"postgres_cdc");
    field(database.as_bytes());
    field(slot.as_bytes());
    field(topic.name().as_bytes());
    field(&topic.created_ms().to_le_bytes());
    field(&partition.to_le_bytes());
    h.max(1)
}

/// Everything a session streams with.
struct Session {
    relations: HashMap<u32, Relation>,
    /// Primary key column names per (schema, table), read at connect.
    primary_keys: HashMap<(String, String), Vec<String>>,
    topics: HashMap<String, Arc<Topic>>,
    buffers: HashMap<(String, u32), PartBuffer>,
    scratch: Scratch,
    txn: Option<Txn>,
    /// The newest WAL position the server told of.
    server_wal_end: u64,
    /// While a snapshot's point is ahead: which changes it holds already.
    coverage: Option<coverage::Coverage>,
    /// The last position handed to the acker.
    queued: u64,
    /// The position confirmed.
    acked: u64,
}

impl Runner {
    /// One connection: set up, read the snapshot if one is due, stream until an error
    /// or shutdown.
    pub(super) async fn session(&self, shutdown: &CancellationToken, streamed: &mut bool) -> anyhow::Result<()> {
        if !self.config.snapshot.streams() {
            return self.snapshot_only(shutdown, streamed).await;
        }
        let mut marker = Marker::read(&self.marker)?;
        let mut client = self.connect().await?;
        let confirmed = tokio::select! {
            r = self.set_up(&mut client, &mut marker) => r?,
            _ = shutdown.cancelled() => return Ok(()),
        };
        if marker.snapshot.as_ref().is_some_and(|p| !p.done) {
            // The slot waits (it is not started) while the rows are read.
            client.abort();
            self.status.set_state(SourceState::Snapshot);
            if let snapshot::Outcome::Stopped = self.snapshot(&mut marker, shutdown).await? {
                return Ok(());
            }
            // A failing snapshot backs off; one that finished starts streaming at once.
            *streamed = true;
            client = self.connect().await?;
        }
        let coverage =
            marker.snapshot.as_ref().and_then(coverage::Progress::coverage).filter(|c| c.highest_point() > confirmed);
        let primary_keys = Self::primary_keys(&mut client).await?;
        // Start from the slot's confirmed position; never report less.
        client.update_applied_lsn(Lsn(confirmed));
        client.start().await.map_err(|e| anyhow::anyhow!("{e}"))?;
        client.wait_started().await.map_err(|e| anyhow::anyhow!("starting replication: {e}"))?;
        tracing::info!(source = %self.name, slot = %self.config.slot, from = %lsn_text(confirmed),
            "streaming changes");
        self.status.set_state(SourceState::Connected);
        self.status.set_position(lsn_text(confirmed), 0);
        *streamed = true;

        // The acker waits for durability in order and publishes what may be confirmed.
        let (ack_tx, mut ack_rx) = mpsc::channel::<PendingAck>(256);
        let (durable_tx, mut durable_rx) = watch::channel((confirmed, 0i64));
        let mut acker = tokio::spawn(async move {
            while let Some(ack) = ack_rx.recv().await {
                for (partition, end) in &ack.waits {
                    partition.wait_durable(*end).await.map_err(|e| anyhow::anyhow!("waiting for durability: {e}"))?;
                }
                durable_tx.send_if_modified(|v| {
                    let newer = ack.lsn > v.0;
                    if newer {
                        *v = (ack.lsn, ack.commit_ts_ms);
                    }
                    newer
                });
            }
            anyhow::Ok(())
        });

        let mut s = Session {
            relations: HashMap::new(),
            primary_keys,
            topics: HashMap::new(),
            buffers: HashMap::new(),
            scratch: Scratch::default(),
            txn: None,
            server_wal_end: confirmed,
            coverage,
            queued: confirmed,
            acked: confirmed,
        };
        let result = loop {
            // Under memory pressure nothing more is read: the client's buffer fills, it
            // stops reading the socket, and the server waits (acknowledgements go on).
            if self.memory.level() != flowgate_memory::Level::Normal {
                tokio::select! {
                    _ = self.memory.wait_until(Duration::from_millis(100), |l| l == flowgate_memory::Level::Normal) => {}
                    changed = durable_rx.changed() => {
                        if changed.is_ok() {
                            let (lsn, _) = *durable_rx.borrow_and_update();
                            client.update_applied_lsn(Lsn(lsn));
                            s.acked = lsn;
                        }
                    }
                    _ = shutdown.cancelled() => break Ok(()),
                }
                continue;
            }
            tokio::select! {
                event = client.recv() => match event {
                    Ok(Some(event)) => {
                        if let Err(e) = self.handle(&mut s, event, &ack_tx).await {
                            break Err(e);
                        }
                    }
                    Ok(None) => break Err(anyhow::anyhow!("the server ended the replication stream")),
                    Err(e) => break Err(anyhow::anyhow!("replication: {e}")),
                },
                changed = durable_rx.changed() => {
                    if changed.is_err() {
                        continue;
                    }
                    let (lsn, commit_ts_ms) = *durable_rx.borrow_and_update();
                    client.update_applied_lsn(Lsn(lsn));
                    s.acked = lsn;
                    self.status.set_position(lsn_text(lsn), s.server_wal_end.saturating_sub(lsn));
                    let lag = if commit_ts_ms > 0 { flowgate_core::time::now_ms().saturating_sub(commit_ts_ms) } else { 0 };
                    self.status.set_lag_ms(u64::try_from(lag).unwrap_or(0));
                }
                ended = &mut acker => {
                    break Err(match ended {
                        Ok(Err(e)) => e,
                        Ok(Ok(())) => anyhow::anyhow!("the acknowledgement task ended"),
                        Err(e) => anyhow::anyhow!("the acknowledgement task failed: {e}"),
                    });
                }
                _ = shutdown.cancelled() => break Ok(()),
            }
        };
        // Whatever was confirmed durable is reported before the session goes (best
        // effort: the next session starts from the slot either way).
        drop(ack_tx);
        if result.is_ok() {
            if let Ok(Ok(Ok(()))) = tokio::time::timeout(Duration::from_secs(2), &mut acker).await {
                let (lsn, _) = *durable_rx.borrow();
                client.update_applied_lsn(Lsn(lsn));
            }
            let _ = tokio::time::timeout(Duration::from_secs(2), client.shutdown()).await;
        } else {
            acker.abort();
            client.abort();
        }
        result
    }

    async fn handle(
        &self,
        s: &mut Session,
        event: ReplicationEvent,
        acks: &mpsc::Sender<PendingAck>,
    ) -> anyhow::Result<()> {
        match event {
            ReplicationEvent::Begin { final_lsn, xid, commit_time_micros } => {
                self.begin(s, final_lsn.as_u64(), xid, commit_time_micros)?;
            }
            ReplicationEvent::Commit { end_lsn, .. } => self.commit(s, end_lsn.as_u64(), acks).await?,
            ReplicationEvent::XLogData { wal_end, data, .. } => {
                s.server_wal_end = s.server_wal_end.max(wal_end.as_u64());
                let message = pgoutput::decode(&data).map_err(|e| anyhow::anyhow!("{e}"))?;
                match message {
                    Message::Begin { final_lsn, commit_ts, xid } => self.begin(s, final_lsn, xid, commit_ts)?,
                    Message::Commit { end_lsn, .. } => self.commit(s, end_lsn, acks).await?,
                    Message::Relation(r) => {
                        s.relations.insert(r.oid, r);
                    }
                    Message::Insert { relation, new } => self.change(s, relation, "c", None, Some(&new), data.len())?,
                    Message::Update { relation, old, new } => {
                        self.change(s, relation, "u", old.as_ref(), Some(&new), data.len())?
                    }
                    Message::Delete { relation, old } => self.change(s, relation, "d", Some(&old), None, data.len())?,
                    Message::Truncate { relations, .. } => {
                        for relation in relations {
                            self.truncate(s, relation)?;
                        }
                    }
                    Message::Type { .. } | Message::Origin { .. } | Message::LogicalMessage { .. } => {}
                }
            }
            ReplicationEvent::KeepAlive { wal_end, .. } => {
                let wal_end = wal_end.as_u64();
                s.server_wal_end = s.server_wal_end.max(wal_end);
                // Heartbeat: nothing open, so every change before `wal_end` was received;
                // it may be confirmed once what was appended before is durable.
                if s.txn.is_none() && wal_end > s.queued {
                    if let Ok(()) = acks.try_send(PendingAck { lsn: wal_end, commit_ts_ms: 0, waits: Vec::new() }) {
                        s.queued = wal_end;
                    }
                }
                self.status.set_position(lsn_text(s.acked), s.server_wal_end.saturating_sub(s.acked));
            }
            ReplicationEvent::Message { .. } | ReplicationEvent::StoppedAt { .. } => {}
        }
        Ok(())
    }

    fn begin(&self, s: &mut Session, final_lsn: u64, xid: u32, commit_micros: i64) -> anyhow::Result<()> {
        anyhow::ensure!(s.txn.is_none(), "a transaction began inside another (xid {xid})");
        sequence(final_lsn, 0)?;
        s.txn =
            Some(Txn { final_lsn, xid, commit_ts_ms: pg_micros_to_unix_ms(commit_micros), written: HashMap::new() });
        Ok(())
    }

    async fn commit(&self, s: &mut Session, end_lsn: u64, acks: &mpsc::Sender<PendingAck>) -> anyhow::Result<()> {
        let keys: Vec<(String, u32)> =
            s.buffers.iter().filter(|(_, b)| !b.builder.is_empty()).map(|(k, _)| k.clone()).collect();
        for key in keys {
            self.flush(s, &key)?;
        }
        let txn = s.txn.take().ok_or_else(|| anyhow::anyhow!("a commit without a transaction"))?;
        for b in s.buffers.values_mut() {
            b.chunk = 0;
            b.input_bytes = 0;
            // A large transaction does not pin its chunk's size for the session's life.
            b.builder.shrink_to(1 << 20);
        }
        let waits = txn.written.into_values().collect();
        acks.send(PendingAck { lsn: end_lsn, commit_ts_ms: txn.commit_ts_ms, waits })
            .await
            .map_err(|_| anyhow::anyhow!("the acknowledgement task ended"))?;
        s.queued = s.queued.max(end_lsn);
        Ok(())
    }

    pub(super) fn topic_name(&self, schema: &str, table: &str) -> anyhow::Result<String> {
        Ok(match (&self.config.topic, &self.config.topic_prefix) {
            (Some(t), _) => t.clone(),
            (None, Some(p)) => format!("{p}.{schema}.{table}"),
            (None, None) => anyhow::bail!("no topic configured"),
        })
    }

    fn topic_for(&self, s: &mut Session, schema: &str, table: &str) -> anyhow::Result<Arc<Topic>> {
        let name = self.topic_name(schema, table)?;
        if let Some(t) = s.topics.get(&name) {
            return Ok(t.clone());
        }
        let topic = self.log.topic_or_create(&name).map_err(|e| anyhow::anyhow!("topic '{name}': {e}"))?;
        s.topics.insert(name, topic.clone());
        Ok(topic)
    }

    fn row(relation: &Relation, values: &[Datum<'_>], only_key: bool) -> Value {
        let mut row = Map::new();
        for (c, v) in relation.columns.iter().zip(values) {
            if only_key && !c.key {
                continue;
            }
            row.insert(c.name.clone(), value::to_json(c.type_oid, v));
        }
        Value::Object(row)
    }

    fn change(
        &self,
        s: &mut Session,
        oid: u32,
        op: &'static str,
        old: Option<&Old<'_>>,
        new: Option<&Vec<Datum<'_>>>,
        input_bytes: usize,
    ) -> anyhow::Result<()> {
        let relation =
            s.relations.get(&oid).ok_or_else(|| anyhow::anyhow!("a change to relation {oid}, not described"))?;
        if !self.tables.iter().any(|t| t.matches(&relation.namespace, &relation.name)) {
            return Ok(());
        }
        let txn = s.txn.as_ref().ok_or_else(|| anyhow::anyhow!("a change outside a transaction"))?;
        let before = match old {
            Some(Old::Row(v)) => Self::row(relation, v, false),
            Some(Old::Key(v)) => Self::row(relation, v, true),
            None => Value::Null,
        };
        let mut after = new.map_or(Value::Null, |v| Self::row(relation, v, false));
        let mut op = op;
        if let Some(coverage) = s.coverage.as_ref().filter(|c| txn.final_lsn < c.highest_point()) {
            // The snapshot may hold this change already: stored only when the range of
            // its key was read before the transaction committed.
            let (schema, table) = (relation.namespace.as_str(), relation.name.as_str());
            match coverage.key_of(schema, table) {
                None => {
                    if !coverage.wants(schema, table, None, &[], txn.final_lsn) {
                        return Ok(());
                    }
                }
                Some(columns) => {
                    let names: Vec<&str> = columns.iter().map(|c| c.name.as_str()).collect();
                    let wants = |row: &Value, values: &[Datum<'_>]| -> anyhow::Result<bool> {
                        let texts: Vec<&[u8]> = columns
                            .iter()
                            .map(|c| {
                                let at = relation.columns.iter().position(|rc| rc.name == c.name);
                                match at.and_then(|i| values.get(i)) {
                                    Some(Datum::Text(b)) => *b,
                                    _ => &[][..],
                                }
                            })
                            .collect();
                        Ok(coverage.wants(schema, table, key_json(&names, row)?.as_deref(), &texts, txn.final_lsn))
                    };
                    let new_side = new.map(|v| wants(&after, v)).transpose()?;
                    let old_side = match old {
                        Some(Old::Row(v) | Old::Key(v)) => Some(wants(&before, v)?),
                        None => None,
                    };
                    match (new_side, old_side) {
                        (Some(true), _) | (None, Some(true)) => {}
                        // The key changed, the new key's range was read after the commit
                        // (the row is there already), the old one's before: only the old
                        // row's removal is missing.
                        (Some(false), Some(true)) => {
                            op = "d";
                            after = Value::Null;
                        }
                        _ => return Ok(()),
                    }
                }
            }
        }
        // The key: the primary key's columns, from the new row (the old one for a delete).
        let key_row = if after.is_null() { &before } else { &after };
        let pk = s.primary_keys.get(&(relation.namespace.clone(), relation.name.clone()));
        let key_columns: Vec<&str> = match pk {
            Some(cols) => cols.iter().map(String::as_str).collect(),
            // Replica identity FULL flags every column: that is no key to route by.
            None if relation.replica_identity == b'f' => Vec::new(),
            None => relation.columns.iter().filter(|c| c.key).map(|c| c.name.as_str()).collect(),
        };
        let key = key_json(&key_columns, key_row)?;
        let envelope = serde_json::to_vec(&Envelope::new(&self.name, &Origin::of(txn, relation), op, &before, &after))?;
        let table = format!("{}.{}", relation.namespace, relation.name);
        let (schema, name) = (relation.namespace.clone(), relation.name.clone());
        let topic = self.topic_for(s, &schema, &name)?;
        let n = topic.partition_count();
        let partition = match &key {
            Some(k) => partition_for_key(k, n),
            // Without a key, a table's changes go to one partition, in commit order.
            None => partition_for_key(table.as_bytes(), n),
        };
        self.push(s, &topic, partition, key.as_deref(), &envelope, input_bytes)?;
        self.status.count_changes(&table, op, 1);
        Ok(())
    }

    /// A truncate goes to every partition of the table's topic, so it is ordered before
    /// the later changes of every key.
    fn truncate(&self, s: &mut Session, oid: u32) -> anyhow::Result<()> {
        let relation =
            s.relations.get(&oid).ok_or_else(|| anyhow::anyhow!("a truncate of relation {oid}, not described"))?;
        if !self.tables.iter().any(|t| t.matches(&relation.namespace, &relation.name)) {
            return Ok(());
        }
        let txn = s.txn.as_ref().ok_or_else(|| anyhow::anyhow!("a truncate outside a transaction"))?;
        let payload = serde_json::to_vec(&Envelope::new(
            &self.name,
            &Origin::of(txn, relation),
            "t",
            &Value::Null,
            &Value::Null,
        ))?;
        let table = format!("{}.{}", relation.namespace, relation.name);
        let (schema, name) = (relation.namespace.clone(), relation.name.clone());
        let final_lsn = txn.final_lsn;
        let topic = self.topic_for(s, &schema, &name)?;
        for p in 0..topic.partition_count() {
            // Within a resumed snapshot's window, a partition whose rows were all read
            // after the truncate does not get it.
            if s.coverage.as_ref().is_some_and(|c| !c.truncate_reaches(&schema, &name, p, final_lsn)) {
                continue;
            }
            self.push(s, &topic, p, None, &payload, 0)?;
        }
        self.status.count_changes(&table, "t", 1);
        Ok(())
    }

    fn push(
        &self,
        s: &mut Session,
        topic: &Arc<Topic>,
        partition: u32,
        key: Option<&[u8]>,
        payload: &[u8],
        input_bytes: usize,
    ) -> anyhow::Result<()> {
        let commit_ts_ms = s.txn.as_ref().map_or(0, |t| t.commit_ts_ms);
        let id = (topic.name().to_owned(), partition);
        let buffer = s.buffers.entry(id.clone()).or_default();
        buffer.builder.push(commit_ts_ms, key, None, std::iter::empty(), payload);
        buffer.input_bytes = buffer.input_bytes.saturating_add(input_bytes);
        if buffer.builder.len() as usize >= CHUNK_EVENTS || buffer.input_bytes >= CHUNK_INPUT_BYTES {
            self.flush(s, &id)?;
        }
        Ok(())
    }

    /// Appends the buffered changes of one partition as the next chunk of the open
    /// transaction.
    fn flush(&self, s: &mut Session, id: &(String, u32)) -> anyhow::Result<()> {
        let txn = s.txn.as_mut().ok_or_else(|| anyhow::anyhow!("changes outside a transaction"))?;
        let topic = s.topics.get(&id.0).ok_or_else(|| anyhow::anyhow!("topic '{}' not open", id.0))?.clone();
        let buffer = s.buffers.get_mut(id).expect("flushing a buffer that exists");
        let stamp = ProducerStamp {
            producer_id: producer_id(&self.target.database, &self.config.slot, &topic, id.1),
            sequence: sequence(txn.final_lsn, buffer.chunk)?,
        };
        let written = match self.appender.append_built(
            &topic,
            Route::Partition(id.1),
            &mut buffer.builder,
            stamp,
            &mut s.scratch,
        ) {
            Ok(w) => w.parts().iter().map(|p| (p.partition.clone(), p.outcome.end_offset())).next(),
            // Stored before a restart: the producer rule refuses it again. What it
            // stored is waited for all the same (the whole partition so far: where the
            // chunk landed is no longer remembered).
            Err(LogError::DuplicateSequence { .. }) => topic.partition(id.1).ok().map(|p| (p.clone(), p.end_offset())),
            Err(e) => {
                return Err(anyhow::anyhow!("appending to partition {} of topic '{}': {e}", id.1, id.0));
            }
        };
        buffer.builder.clear();
        buffer.chunk += 1;
        buffer.input_bytes = 0;
        if let Some((partition, end)) = written {
            let slot = txn.written.entry(id.clone()).or_insert_with(|| (partition.clone(), end));
            slot.1 = slot.1.max(end);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sequences_grow_across_transactions_and_refuse_what_does_not_fit() {
        assert!(sequence(100, 65535).unwrap() < sequence(101, 0).unwrap());
        assert!(sequence(100, 0).unwrap() < sequence(100, 1).unwrap());
        assert!(sequence(MAX_LSN, 0).is_ok());
        let e = sequence(MAX_LSN + 1, 0).unwrap_err().to_string();
        assert!(e.contains("48 bits"), "{e}");
        assert!(sequence(5, 1 << 16).is_err());
    }
}
