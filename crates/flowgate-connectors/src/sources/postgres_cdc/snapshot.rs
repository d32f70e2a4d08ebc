//! The initial snapshot: every existing row of the captured tables, read in primary-key
//! order from an exported snapshot, appended as `op = "r"` envelopes.
//!
//! Each snapshot connection exports a snapshot by creating a *temporary* replication
//! slot (`CREATE_REPLICATION_SLOT … TEMPORARY … EXPORT_SNAPSHOT`), whose consistent
//! point says exactly which transactions the snapshot holds, and imports it in a
//! `REPEATABLE READ` transaction on a second connection (the temporary slot goes as soon
//! as it is imported). The permanent slot was created before, so it streams from before
//! that point; [`super::coverage`] decides which streamed changes the snapshot holds.
//!
//! Chunks of at most [`CHUNK_ROWS`] rows are appended per partition as an idempotent
//! producer (sequence = chunk number). Before a chunk's appends the chunk (its last key,
//! its point, its partitions) is written to the source's marker; after them, once they
//! are durable, the coverage moves on. After a crash the log says which partitions
//! stored the pending chunk; reading resumes after the lowest key every partition holds,
//! in a new exported snapshot, and skips the rows a partition holds already.

use std::sync::Arc;
use std::time::{Duration, Instant};

use flowgate_core::{partition_for_key, BatchBuilder, ProducerStamp};
use flowgate_log::append::{Route, Scratch};
use flowgate_log::{LogError, Partition, Topic};
use serde_json::{Map, Value};
use tokio::sync::mpsc;
use tokio_postgres::SimpleQueryMessage;
use tokio_util::sync::CancellationToken;

use super::coverage::{KeyColumn, KeyOrder, PendingChunk, Progress, TableProgress};
use super::pgoutput::Datum;
use super::{quote_literal, text_of, value, Envelope, Marker, Origin, Runner};

/// Rows per chunk at most.
pub const CHUNK_ROWS: usize = 4096;

/// Payload bytes per chunk at most (a partition's part of a chunk is one batch).
pub const CHUNK_BYTES: usize = 8 << 20;

/// Rows asked for per `FETCH` at most.
const FETCH_ROWS: usize = 2000;

/// About how many bytes of rows one `FETCH` asks for.
const FETCH_BYTES: usize = 4 << 20;

/// A column read by the snapshot.
#[derive(Clone, Debug)]
struct Column {
    name: String,
    type_oid: u32,
}

/// A table to read, as planned at the start of a snapshot connection.
struct Plan {
    index: usize,
    columns: Vec<Column>,
    /// Positions of the key columns in `columns`.
    key_at: Vec<usize>,
    topic: Arc<Topic>,
    select: String,
}

enum Fetched {
    Rows(Vec<tokio_postgres::SimpleQueryRow>),
    End,
}

/// What the snapshot connection of a session has done.
pub(super) enum Outcome {
    /// Every table was read.
    Done,
    /// Shutdown came first.
    Stopped,
}

fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// The producer of one snapshot's rows into one topic partition.
fn producer_id(database: &str, slot: &str, epoch: u64, topic: &Topic, partition: u32) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut field = |bytes: &[u8]| {
        for b in (bytes.len() as u64).to_le_bytes().iter().chain(bytes) {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    };
    field(b"postgres_cdc.snapshot");
    field(database.as_bytes());
    field(slot.as_bytes());
    field(&epoch.to_le_bytes());
    field(topic.name().as_bytes());
    field(&topic.created_ms().to_le_bytes());
    field(&partition.to_le_bytes());
    h.max(1)
}

/// The rows of one chunk on their way to their partitions.
struct Chunk {
    builders: Vec<BatchBuilder>,
    rows: usize,
    bytes: usize,
    last_key: Option<Vec<String>>,
}

impl Chunk {
    fn new(partitions: u32) -> Chunk {
        Chunk {
            builders: (0..partitions).map(|_| BatchBuilder::default()).collect(),
            rows: 0,
            bytes: 0,
            last_key: None,
        }
    }

    fn full(&self) -> bool {
        self.rows >= CHUNK_ROWS || self.bytes >= CHUNK_BYTES
    }
}

impl Runner {
    async fn save(&self, marker: &Marker) -> anyhow::Result<()> {
        let path = self.marker.clone();
        let bytes = serde_json::to_vec(marker)?;
        tokio::task::spawn_blocking(move || Marker::write_bytes(&bytes, &path)).await??;
        Ok(())
    }

    /// Runs one snapshot connection: reads every table not read yet, resuming where a
    /// crash left off.
    pub(super) async fn snapshot(&self, marker: &mut Marker, shutdown: &CancellationToken) -> anyhow::Result<Outcome> {
        let mut progress = marker.snapshot.clone().unwrap_or_else(|| Progress::new(fastrand::u64(..)));
        let epoch = progress.epoch;
        let database = self.target.database.clone();
        let slot = self.config.slot.clone();
        let log = self.log.clone();
        progress.resolve(|topic, partition, chunk| {
            let Ok(topic) = log.topic_or_create(topic) else { return false };
            let id = producer_id(&database, &slot, epoch, &topic, partition);
            topic.partition(partition).ok().and_then(|p| p.producer_last_sequence(id)).is_some_and(|last| last >= chunk)
        });

        // Export a snapshot from a temporary slot, import it, and let the slot go. Creating
        // the slot waits for every transaction running on the server: shutdown does not.
        let imported = tokio::select! {
            r = self.import_snapshot() => r?,
            _ = shutdown.cancelled() => return Ok(Outcome::Stopped),
        };
        let (client, point) = imported;
        let started_ms = flowgate_core::time::now_ms();

        if progress.tables.is_none() {
            progress.tables = Some(self.list_tables(&client).await?);
        }
        marker.snapshot = Some(progress.clone());
        self.save(marker).await?;
        self.lock_tables(&client, progress.tables.as_ref().expect("listed above")).await?;
        self.read_tables(marker, progress, client, point, started_ms, shutdown).await
    }

    /// A connection in a transaction on a snapshot exported by a temporary slot, and the
    /// snapshot's consistent point.
    async fn import_snapshot(&self) -> anyhow::Result<(tokio_postgres::Client, u64)> {
        let mut exporter = pgwire_replication::ReplicationClient::connect_gated(self.replication_config())
            .await
            .map_err(|e| anyhow::anyhow!("connecting to {}:{}: {e}", self.target.host, self.target.port))?;
        let temporary =
            format!("{}_snap_{:08x}", &self.config.slot[..self.config.slot.len().min(40)], fastrand::u32(..));
        let rows = exporter
            .simple_query(&format!(
                "CREATE_REPLICATION_SLOT \"{temporary}\" TEMPORARY LOGICAL pgoutput EXPORT_SNAPSHOT"
            ))
            .await
            .map_err(|e| {
                anyhow::anyhow!(
                    "exporting a snapshot (a temporary replication slot: is max_replication_slots large enough?): {e}"
                )
            })?;
        let row = rows.first().ok_or_else(|| anyhow::anyhow!("CREATE_REPLICATION_SLOT returned no row"))?;
        let point = text_of(row, 1)
            .and_then(|l| pgwire_replication::Lsn::parse(&l).ok())
            .ok_or_else(|| anyhow::anyhow!("CREATE_REPLICATION_SLOT returned no consistent point"))?
            .as_u64();
        let name = text_of(row, 2).ok_or_else(|| anyhow::anyhow!("CREATE_REPLICATION_SLOT exported no snapshot"))?;
        let client = self.sql_client().await?;
        client
            .batch_execute(&format!(
                "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY; SET TRANSACTION SNAPSHOT {}",
                quote_literal(&name)
            ))
            .await
            .map_err(|e| anyhow::anyhow!("importing the exported snapshot: {e}"))?;
        exporter.abort();
        Ok((client, point))
    }

    /// Keeps the tables to read from being rewritten or truncated until they are read: a
    /// table rewritten after the snapshot was taken looks empty to it.
    async fn lock_tables(&self, client: &tokio_postgres::Client, tables: &[TableProgress]) -> anyhow::Result<()> {
        let names: Vec<String> = tables
            .iter()
            .filter(|t| !t.finished)
            .map(|t| format!("{}.{}", quote_ident(&t.schema), quote_ident(&t.table)))
            .collect();
        if !names.is_empty() {
            client
                .batch_execute(&format!("LOCK TABLE {} IN ACCESS SHARE MODE", names.join(", ")))
                .await
                .map_err(|e| anyhow::anyhow!("locking the tables to read against rewrites: {e}"))?;
        }
        Ok(())
    }

    /// Reads every table not read yet, on the imported snapshot.
    async fn read_tables(
        &self,
        marker: &mut Marker,
        mut progress: Progress,
        client: tokio_postgres::Client,
        point: u64,
        started_ms: i64,
        shutdown: &CancellationToken,
    ) -> anyhow::Result<Outcome> {
        let tables = progress.tables.as_ref().expect("listed above");
        let mut plans = Vec::new();
        let mut estimate = 0u64;
        for (index, t) in tables.iter().enumerate() {
            if t.finished {
                continue;
            }
            let plan = self.plan(&client, index, t).await?;
            let rows = client
                .query_one(
                    "SELECT greatest(c.reltuples, 0)::int8 FROM pg_class c WHERE c.oid = $1::text::regclass",
                    &[&format!("{}.{}", quote_ident(&t.schema), quote_ident(&t.table))],
                )
                .await
                .map(|r| r.get::<_, i64>(0))
                .unwrap_or(0);
            estimate = estimate.saturating_add(u64::try_from(rows).unwrap_or(0));
            plans.push(plan);
        }
        let done_rows: u64 = tables.iter().map(|t| t.rows).sum();
        let total_tables = tables.len() as u64;
        let mut tables_done = tables.iter().filter(|t| t.finished).count() as u64;
        self.status.set_snapshot("reading", total_tables, tables_done, done_rows, done_rows.saturating_add(estimate));
        tracing::info!(source = %self.name, tables = plans.len(), at = %super::lsn_text(point),
            rows_estimate = estimate, "reading the snapshot");

        let (tx, mut rx) = mpsc::channel::<anyhow::Result<Fetched>>(1);
        let selects: Vec<String> = plans.iter().map(|p| p.select.clone()).collect();
        let memory = self.memory.clone();
        let reader = tokio::spawn(async move {
            // Rows per FETCH, sized from the rows seen so that one holds about
            // FETCH_BYTES (large rows are fetched a few at a time).
            let mut per_fetch = FETCH_ROWS;
            for select in selects {
                let result = async {
                    client.batch_execute(&format!("DECLARE fg_snapshot NO SCROLL CURSOR FOR {select}")).await?;
                    loop {
                        if memory.level() != flowgate_memory::Level::Normal {
                            memory.wait_until(Duration::from_secs(1), |l| l == flowgate_memory::Level::Normal).await;
                        }
                        let mut rows = Vec::with_capacity(per_fetch);
                        let mut bytes = 0usize;
                        for m in client.simple_query(&format!("FETCH {per_fetch} FROM fg_snapshot")).await? {
                            if let SimpleQueryMessage::Row(r) = m {
                                bytes += (0..r.len()).map(|i| r.get(i).map_or(0, str::len)).sum::<usize>();
                                rows.push(r);
                            }
                        }
                        if rows.is_empty() {
                            break;
                        }
                        let row_bytes = (bytes / rows.len()).max(1);
                        per_fetch = (FETCH_BYTES / row_bytes).clamp(1, FETCH_ROWS);
                        if tx.send(Ok(Fetched::Rows(rows))).await.is_err() {
                            return Ok(false);
                        }
                    }
                    client.batch_execute("CLOSE fg_snapshot").await?;
                    Ok::<bool, tokio_postgres::Error>(tx.send(Ok(Fetched::End)).await.is_ok())
                }
                .await;
                match result {
                    Ok(true) => {}
                    Ok(false) => return,
                    Err(e) => {
                        let _ = tx.send(Err(anyhow::anyhow!("reading the snapshot: {e}"))).await;
                        return;
                    }
                }
            }
            let _ = client.batch_execute("COMMIT").await;
        });
        let _abort_reader = AbortOnDrop(reader.abort_handle());

        let mut scratch = Scratch::default();
        let mut last_report = Instant::now();
        let mut rows_read = done_rows;
        for plan in &plans {
            let table = &mut progress.tables.as_mut().expect("listed")[plan.index];
            if table.key.is_empty() {
                table.restart();
            }
            let partitions = table.partitions;
            let mut chunk = Chunk::new(partitions);
            loop {
                if self.memory.level() != flowgate_memory::Level::Normal {
                    self.memory.wait_until(Duration::from_secs(1), |l| l == flowgate_memory::Level::Normal).await;
                }
                let fetched = tokio::select! {
                    f = rx.recv() => f.ok_or_else(|| anyhow::anyhow!("the snapshot reader ended"))??,
                    _ = shutdown.cancelled() => return Ok(Outcome::Stopped),
                };
                let rows = match fetched {
                    Fetched::Rows(rows) => rows,
                    Fetched::End => {
                        self.write_chunk(marker, &mut progress, plan, &mut chunk, None, point, &mut scratch).await?;
                        marker.snapshot = Some(progress.clone());
                        self.save(marker).await?;
                        tables_done += 1;
                        break;
                    }
                };
                for row in &rows {
                    let table = &progress.tables.as_ref().expect("listed")[plan.index];
                    self.add_row(table, plan, row, point, started_ms, &mut chunk)?;
                    if chunk.full() {
                        let upper = chunk.last_key.clone().unwrap_or_default();
                        self.write_chunk(marker, &mut progress, plan, &mut chunk, Some(upper), point, &mut scratch)
                            .await?;
                    }
                }
                rows_read = rows_read.saturating_add(rows.len() as u64);
                self.status.set_snapshot(
                    "reading",
                    total_tables,
                    tables_done,
                    rows_read,
                    done_rows.saturating_add(estimate).max(rows_read),
                );
                if last_report.elapsed() >= Duration::from_secs(5) {
                    last_report = Instant::now();
                    let percent =
                        rows_read.saturating_mul(100) / done_rows.saturating_add(estimate).max(rows_read).max(1);
                    tracing::info!(source = %self.name, rows = rows_read, tables_done, tables = total_tables,
                        percent, "snapshot progress");
                }
            }
        }
        progress.done = true;
        marker.snapshot = Some(progress);
        self.save(marker).await?;
        self.status.set_snapshot("done", total_tables, total_tables, rows_read, rows_read);
        tracing::info!(source = %self.name, rows = rows_read, tables = total_tables, "snapshot done");
        Ok(Outcome::Done)
    }

    /// The captured tables, their topics and primary keys.
    async fn list_tables(&self, client: &tokio_postgres::Client) -> anyhow::Result<Vec<TableProgress>> {
        let rows = client
            .query(
                "SELECT n.nspname::text, c.relname::text FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
                 WHERE c.relkind IN ('r', 'p') AND NOT c.relispartition \
                 AND n.nspname NOT IN ('pg_catalog', 'information_schema') ORDER BY 1, 2",
                &[],
            )
            .await?;
        let mut out = Vec::new();
        for row in rows {
            let (schema, table): (String, String) = (row.get(0), row.get(1));
            if !self.tables.iter().any(|t| t.matches(&schema, &table)) {
                continue;
            }
            // The primary key, or else the replica identity index (streaming keys changes
            // by the same columns).
            let key = client
                .query(
                    "SELECT a.attname::text, a.atttypid::int8, \
                     a.attcollation IN (950, 951) OR (a.attcollation = 100 AND (SELECT datcollate IN ('C', 'POSIX') \
                       FROM pg_database WHERE datname = current_database())) \
                     FROM pg_index i \
                     CROSS JOIN LATERAL unnest(i.indkey::int2[]) WITH ORDINALITY AS k(attnum, ord) \
                     JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum \
                     WHERE i.indrelid = $1::text::regclass AND i.indexrelid = (SELECT j.indexrelid FROM pg_index j \
                       WHERE j.indrelid = i.indrelid AND (j.indisprimary OR j.indisreplident) \
                       ORDER BY j.indisprimary DESC LIMIT 1) \
                     ORDER BY k.ord",
                    &[&format!("{}.{}", quote_ident(&schema), quote_ident(&table))],
                )
                .await?
                .iter()
                .map(|r| KeyColumn {
                    name: r.get(0),
                    order: KeyOrder::of(u32::try_from(r.get::<_, i64>(1)).unwrap_or(0), r.get(2)),
                })
                .collect();
            let topic = self.topic_name(&schema, &table)?;
            let partitions = self
                .log
                .topic_or_create(&topic)
                .map_err(|e| anyhow::anyhow!("topic '{topic}': {e}"))?
                .partition_count();
            out.push(TableProgress::new(&schema, &table, &topic, partitions, key));
        }
        for spec in &self.tables {
            if let Some(t) = &spec.table {
                anyhow::ensure!(
                    out.iter().any(|p| p.schema == spec.schema && &p.table == t),
                    "table {}.{t} does not exist (or is not a table this user can see)",
                    spec.schema
                );
            }
        }
        Ok(out)
    }

    /// How to read table `t`: its columns now, and the query from where it left off.
    async fn plan(&self, client: &tokio_postgres::Client, index: usize, t: &TableProgress) -> anyhow::Result<Plan> {
        let qualified = format!("{}.{}", quote_ident(&t.schema), quote_ident(&t.table));
        let columns: Vec<Column> = client
            .query(
                "SELECT attname::text, atttypid::int8 FROM pg_attribute WHERE attrelid = $1::text::regclass \
                 AND attnum > 0 AND NOT attisdropped AND attgenerated = '' ORDER BY attnum",
                &[&qualified],
            )
            .await
            .map_err(|e| anyhow::anyhow!("reading the columns of {qualified}: {e}"))?
            .iter()
            .map(|r| Column { name: r.get(0), type_oid: u32::try_from(r.get::<_, i64>(1)).unwrap_or(0) })
            .collect();
        let mut key_at = Vec::new();
        for k in &t.key {
            let at = columns.iter().position(|c| c.name == k.name).ok_or_else(|| {
                anyhow::anyhow!("the key column {} of {qualified} is gone; the snapshot cannot go on", k.name)
            })?;
            key_at.push(at);
        }
        let list: Vec<String> = columns.iter().map(|c| quote_ident(&c.name)).collect();
        let mut select = format!("SELECT {} FROM {qualified}", list.join(", "));
        if !t.key.is_empty() {
            let order: Vec<String> = t.key.iter().map(|k| k.order.sql(&quote_ident(&k.name))).collect();
            if let Some(after) = t.resume_after() {
                let values: Vec<String> =
                    after.iter().zip(&t.key).map(|(v, k)| quote_literal(k.order.literal(v))).collect();
                select.push_str(&format!(" WHERE ({}) > ({})", order.join(", "), values.join(", ")));
            }
            select.push_str(&format!(" ORDER BY {}", order.join(", ")));
        }
        let topic = self.log.topic_or_create(&t.topic).map_err(|e| anyhow::anyhow!("topic '{}': {e}", t.topic))?;
        anyhow::ensure!(
            topic.partition_count() == t.partitions,
            "topic '{}' has {} partitions, not the {} it had when the snapshot began: the snapshot cannot resume",
            t.topic,
            topic.partition_count(),
            t.partitions
        );
        Ok(Plan { index, columns, key_at, topic, select })
    }

    fn add_row(
        &self,
        table: &TableProgress,
        plan: &Plan,
        row: &tokio_postgres::SimpleQueryRow,
        point: u64,
        started_ms: i64,
        chunk: &mut Chunk,
    ) -> anyhow::Result<()> {
        let mut after = Map::new();
        for (i, c) in plan.columns.iter().enumerate() {
            let datum = match row.get(i) {
                Some(text) => Datum::Text(text.as_bytes()),
                None => Datum::Null,
            };
            after.insert(c.name.clone(), value::to_json(c.type_oid, &datum));
        }
        let after = Value::Object(after);
        let key_texts: Vec<&[u8]> = plan.key_at.iter().map(|&i| row.get(i).unwrap_or("").as_bytes()).collect();
        let key_names: Vec<&str> = table.key.iter().map(|k| k.name.as_str()).collect();
        let key = super::key_json(&key_names, &after)?;
        let partition = match &key {
            Some(k) => partition_for_key(k, table.partitions),
            None => partition_for_key(format!("{}.{}", table.schema, table.table).as_bytes(), table.partitions),
        };
        chunk.last_key = Some(key_texts.iter().map(|k| String::from_utf8_lossy(k).into_owned()).collect());
        if !table.key.is_empty() && table.covers(partition, &key_texts) {
            return Ok(());
        }
        let origin = Origin {
            lsn: point,
            txid: 0,
            commit_ts_ms: started_ms,
            snapshot: true,
            schema: &table.schema,
            table: &table.table,
        };
        let payload = serde_json::to_vec(&Envelope::new(&self.name, &origin, "r", &Value::Null, &after))?;
        chunk.bytes = chunk.bytes.saturating_add(payload.len());
        chunk.rows += 1;
        chunk.builders[partition as usize].push(started_ms, key.as_deref(), None, std::iter::empty(), &payload);
        Ok(())
    }

    /// Stores a chunk: records it as pending, appends each partition's part, waits until
    /// they are durable, and moves the coverage on.
    #[allow(clippy::too_many_arguments)]
    async fn write_chunk(
        &self,
        marker: &mut Marker,
        progress: &mut Progress,
        plan: &Plan,
        chunk: &mut Chunk,
        upper: Option<Vec<String>>,
        point: u64,
        scratch: &mut Scratch,
    ) -> anyhow::Result<()> {
        let number = progress.next_chunk;
        let partitions: Vec<u32> =
            (0..plan.topic.partition_count()).filter(|&p| !chunk.builders[p as usize].is_empty()).collect();
        // A table without a key is read in one pass; its chunks before the last cover
        // nothing (an empty bound says so).
        let upper = if progress.tables.as_ref().expect("listed")[plan.index].key.is_empty() {
            upper.map(|_| Vec::new())
        } else {
            upper
        };
        progress.pending = Some(PendingChunk {
            chunk: number,
            table: plan.index,
            upper: upper.clone(),
            point,
            partitions: partitions.clone(),
        });
        marker.snapshot = Some(progress.clone());
        self.save(marker).await?;
        let mut waits: Vec<(Arc<Partition>, u64)> = Vec::new();
        for &p in &partitions {
            let stamp = ProducerStamp {
                producer_id: producer_id(&self.target.database, &self.config.slot, progress.epoch, &plan.topic, p),
                sequence: number,
            };
            let builder = &mut chunk.builders[p as usize];
            match self.appender.append_built(&plan.topic, Route::Partition(p), builder, stamp, scratch) {
                Ok(w) => waits.extend(w.parts().iter().map(|part| (part.partition.clone(), part.outcome.end_offset()))),
                Err(LogError::DuplicateSequence { .. }) => {}
                Err(e) => anyhow::bail!("appending to partition {p} of topic '{}': {e}", plan.topic.name()),
            }
            builder.clear();
            builder.shrink_to(1 << 20);
        }
        for (partition, end) in waits {
            partition.wait_durable(end).await.map_err(|e| anyhow::anyhow!("waiting for durability: {e}"))?;
        }
        let rows = chunk.rows as u64;
        progress.resolve(|_, _, _| true);
        if let Some(t) = progress.tables.as_mut().and_then(|t| t.get_mut(plan.index)) {
            t.rows = t.rows.saturating_add(rows);
        }
        chunk.rows = 0;
        chunk.bytes = 0;
        Ok(())
    }
}

/// Aborts a task when dropped (the reader, when the snapshot stops early).
struct AbortOnDrop(tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
