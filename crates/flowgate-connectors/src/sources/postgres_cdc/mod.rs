//! `postgres_cdc`: change data capture from PostgreSQL by logical replication
//! (`pgoutput`), each captured row change appended to a topic as a JSON envelope.
//!
//! **Exactly once into the log.** Each transaction's changes are appended per topic
//! partition, in chunks of at most [`CHUNK_EVENTS`] changes (so a large transaction is
//! never held whole), as an idempotent producer whose id is derived from (source, topic
//! and its creation time, partition), with the sequence `commit_lsn << 16 | chunk`
//! (the chunk's index within the transaction for that partition) under the log's
//! monotonic rule. Commit LSNs increase from one transaction to the next, so the
//! sequences do too. The server is told a transaction is flushed (standby status,
//! `confirmed_flush_lsn`) only once every chunk of it, and of every transaction before
//! it, meets the configured durability. After a crash, PostgreSQL sends again from the
//! slot's confirmed position; the chunks stored before are refused by the producer
//! rule as duplicates, the rest are stored. Chunk boundaries depend only on what the
//! server sends, so a replay cuts the same chunks.
//!
//! **Heartbeat.** When no transaction is open and everything received is durable, a
//! keepalive's WAL position is confirmed too, so the slot advances (and the server can
//! recycle WAL) while the captured tables are idle and others are written.
//!
//! **Faults.** A lost connection or a failed setup is retried with backoff (200 ms
//! doubling to 10 s); `/v1/stats` shows the state and the last error. A slot or
//! publication this source created or used before and that has since disappeared is
//! an error naming it, not silently created again (changes in between would be lost):
//! the source keeps retrying and reporting it until an operator acts.
//!
//! The parts: [`config`] (options, URL, tables), `marker` (the state file), `snapshot`
//! and [`coverage`] (the initial snapshot and its hand-over), `stream` (the replication
//! stream into the log), `envelope` (what is stored), [`pgoutput`] and [`value`] (the
//! protocol's messages and values).

pub mod config;
pub mod coverage;
mod envelope;
mod marker;
pub mod pgoutput;
mod snapshot;
mod stream;
pub mod value;

pub use config::{PostgresCdcConfig, Snapshot};

use config::{check_identifier, parse_tables, parse_url, TableSpec, Target};
use envelope::{key_json, Envelope, Origin};
use marker::{marker_path, Marker};
pub use stream::sequence;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use flowgate_log::append::Appender;
use flowgate_log::{Log, SequenceRule};
use pgwire_replication::{Lsn, ReplicationClient, ReplicationConfig, TlsConfig};
use tokio_util::sync::CancellationToken;

use super::{SourceConnector, SourceContext, SourceFuture, SourceState, SourceStatus};

/// Changes per chunk: a transaction's changes to one partition are appended in chunks of
/// at most this many. Fixed, not configurable: a replay after a crash must cut the same
/// chunks as the first run, or the sequences would not match.
pub const CHUNK_EVENTS: usize = 512;

/// Bytes of decoded `pgoutput` messages per chunk at most (also fixed, for the same
/// reason; the messages are the same on a replay).
pub const CHUNK_INPUT_BYTES: usize = 4 << 20;

/// Session settings fixing the text forms of values (see [`value`]).
/// `standard_conforming_strings` is pinned on because literals are written with
/// [`quote_literal`], which doubles quotes only.
const SESSION_OPTIONS: &str = "-c datestyle=ISO -c timezone=UTC -c extra_float_digits=3 -c intervalstyle=iso_8601 \
                               -c standard_conforming_strings=on";

/// The largest commit LSN a sequence can hold: the low 16 bits are the chunk index.
pub const MAX_LSN: u64 = (1 << 48) - 1;

/// The source type.
#[derive(Debug)]
pub struct PostgresCdcSource;

impl SourceConnector for PostgresCdcSource {
    const TYPE: &'static str = "postgres_cdc";
    type Config = PostgresCdcConfig;

    fn validate(c: &PostgresCdcConfig) -> anyhow::Result<()> {
        parse_url(&c.url)?;
        parse_tables(&c.tables)?;
        check_identifier("`publication`", &c.publication)?;
        check_identifier("`slot`", &c.slot)?;
        anyhow::ensure!(
            c.slot.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_'),
            "`slot` '{}' must be lower-case letters, digits and '_' (PostgreSQL's rule for slot names)",
            c.slot
        );
        match (&c.topic_prefix, &c.topic) {
            (Some(p), None) => flowgate_log::validate_topic_name(&format!("{p}.s.t"))
                .map_err(|e| anyhow::anyhow!("`topic_prefix`: {e}"))?,
            (None, Some(t)) => flowgate_log::validate_topic_name(t).map_err(|e| anyhow::anyhow!("`topic`: {e}"))?,
            _ => anyhow::bail!("set exactly one of `topic_prefix` (a topic per table) and `topic` (one topic)"),
        }
        anyhow::ensure!(
            (10..=600_000).contains(&c.status_interval_ms),
            "`status_interval_ms` must be from 10 to 600000"
        );
        anyhow::ensure!(
            !(c.password_env.is_some() && c.password_file.is_some()),
            "set at most one of `password_env` and `password_file`"
        );
        Ok(())
    }

    fn build(
        name: &str,
        config: PostgresCdcConfig,
        cx: SourceContext,
        shutdown: CancellationToken,
    ) -> anyhow::Result<SourceFuture> {
        let mut target = parse_url(&config.url)?;
        if let Some(var) = &config.password_env {
            target.password =
                Some(std::env::var(var).map_err(|_| anyhow::anyhow!("`password_env`: the variable {var} is not set"))?);
        }
        if let Some(file) = &config.password_file {
            let path = cx.data_dir.join(file);
            let text = std::fs::read_to_string(&path)
                .map_err(|e| anyhow::anyhow!("`password_file` {}: {e}", path.display()))?;
            target.password = Some(text.trim_end_matches(['\n', '\r']).to_owned());
        }
        let tables = parse_tables(&config.tables)?;
        let runner = Runner {
            name: name.to_owned(),
            marker: marker_path(&cx.data_dir, name, &target, &config.slot),
            log: cx.log,
            appender: cx.appender.with_rule(SequenceRule::Monotonic),
            status: cx.status,
            memory: cx.memory,
            target,
            tables,
            config,
        };
        Ok(Box::pin(runner.run(shutdown)))
    }
}

struct Runner {
    name: String,
    marker: PathBuf,
    log: Log,
    appender: Appender,
    status: Arc<SourceStatus>,
    memory: flowgate_memory::MemoryGovernor,
    target: Target,
    tables: Vec<TableSpec>,
    config: PostgresCdcConfig,
}

/// Microseconds since 2000-01-01 as milliseconds since 1970-01-01.
fn pg_micros_to_unix_ms(micros: i64) -> i64 {
    micros.div_euclid(1000).saturating_add(946_684_800_000)
}

fn lsn_text(lsn: u64) -> String {
    Lsn(lsn).to_pg_string()
}

fn quote_literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

fn text_of(row: &[Option<bytes::Bytes>], i: usize) -> Option<String> {
    row.get(i)?.as_ref().map(|b| String::from_utf8_lossy(b).into_owned())
}

impl Runner {
    async fn run(self, shutdown: CancellationToken) {
        let mut backoff = Duration::from_millis(200);
        loop {
            if shutdown.is_cancelled() {
                break;
            }
            let mut streamed = false;
            match self.session(&shutdown, &mut streamed).await {
                Ok(()) => break,
                Err(e) => {
                    let message = format!("{e:#}");
                    tracing::warn!(source = %self.name, error = %message, retry_ms = backoff.as_millis() as u64,
                        "postgres_cdc source failed; reconnecting");
                    self.status.failed(message);
                }
            }
            if streamed {
                backoff = Duration::from_millis(200);
            }
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = shutdown.cancelled() => break,
            }
            backoff = (backoff * 2).min(Duration::from_secs(10));
        }
        self.status.set_state(SourceState::Stopped);
    }

    fn replication_config(&self) -> ReplicationConfig {
        let t = &self.target;
        let tls = match t.tls {
            pgwire_replication::SslMode::Disable => TlsConfig::disabled(),
            pgwire_replication::SslMode::Require | pgwire_replication::SslMode::Prefer => TlsConfig::require(),
            pgwire_replication::SslMode::VerifyCa => TlsConfig::verify_ca(None),
            pgwire_replication::SslMode::VerifyFull => TlsConfig::verify_full(None),
        };
        ReplicationConfig::new(
            t.host.clone(),
            t.user.clone(),
            t.password.clone().unwrap_or_default(),
            t.database.clone(),
            self.config.slot.clone(),
            self.config.publication.clone(),
        )
        .with_port(t.port)
        .with_tls(tls)
        .with_status_interval(Duration::from_millis(self.config.status_interval_ms))
        .with_wakeup_interval(Duration::from_secs(10))
        .with_buffer_size(1024)
        .with_options(SESSION_OPTIONS)
        .with_application_name(format!("flowgate-{}", self.name))
    }

    async fn query(client: &mut ReplicationClient, sql: &str) -> anyhow::Result<Vec<pgwire_replication::QueryRow>> {
        client.simple_query(sql).await.map_err(|e| anyhow::anyhow!("{e}"))
    }

    /// Makes sure the publication and the slot exist; returns the slot's confirmed
    /// position. A slot this source uses for the first time starts a snapshot (when
    /// the mode reads rows), recorded in the same marker write as the slot.
    async fn set_up(&self, client: &mut ReplicationClient, marker: &mut Marker) -> anyhow::Result<u64> {
        let (publication, slot) = (&self.config.publication, &self.config.slot);
        let rows = Self::query(
            client,
            &format!("SELECT 1 FROM pg_publication WHERE pubname = {}", quote_literal(publication)),
        )
        .await?;
        if rows.is_empty() {
            anyhow::ensure!(
                marker.publication.as_deref() != Some(publication.as_str()),
                "publication '{publication}' does not exist: it was dropped after this source used it. Create it \
                 again (CREATE PUBLICATION \"{publication}\" FOR TABLE …), or delete {} to let the source create it",
                self.marker.display()
            );
            let mut tables = Vec::new();
            let mut schemas = Vec::new();
            for t in &self.tables {
                match &t.table {
                    Some(name) => tables.push(format!("\"{}\".\"{}\"", t.schema, name)),
                    None => schemas.push(format!("\"{}\"", t.schema)),
                }
            }
            let mut objects = Vec::new();
            if !tables.is_empty() {
                objects.push(format!("TABLE {}", tables.join(", ")));
            }
            if !schemas.is_empty() {
                objects.push(format!("TABLES IN SCHEMA {}", schemas.join(", ")));
            }
            // Changes of a partitioned table as changes of the table (as the snapshot reads
            // it), not of its partitions (PostgreSQL 13 and newer).
            let version = Self::query(client, "SELECT current_setting('server_version_num')::int >= 130000").await?;
            let via_root = if version.first().and_then(|r| text_of(r, 0)).as_deref() == Some("t") {
                " WITH (publish_via_partition_root = true)"
            } else {
                ""
            };
            Self::query(client, &format!("CREATE PUBLICATION \"{publication}\" FOR {}{via_root}", objects.join(", ")))
                .await
                .map_err(|e| e.context(format!("creating publication '{publication}'")))?;
            tracing::info!(source = %self.name, publication = %publication, "created the publication");
        }
        let slot_query = format!(
            "SELECT confirmed_flush_lsn, plugin, database FROM pg_replication_slots WHERE slot_name = {}",
            quote_literal(slot)
        );
        let rows = Self::query(client, &slot_query).await?;
        let confirmed = match rows.first() {
            Some(row) => {
                let plugin = text_of(row, 1).unwrap_or_default();
                anyhow::ensure!(
                    plugin == "pgoutput",
                    "replication slot '{slot}' uses the plugin '{plugin}', not pgoutput"
                );
                let database = text_of(row, 2).unwrap_or_default();
                anyhow::ensure!(
                    database == self.target.database,
                    "replication slot '{slot}' belongs to database '{database}', not '{}'",
                    self.target.database
                );
                text_of(row, 0).and_then(|l| Lsn::parse(&l).ok()).map_or(0, |l| l.as_u64())
            }
            None => {
                if marker.slot.as_deref() == Some(slot.as_str()) && self.config.snapshot == Snapshot::WhenNeeded {
                    tracing::warn!(source = %self.name, slot = %slot,
                        "the replication slot was dropped; creating it again and reading every row again");
                    marker.slot = None;
                    marker.snapshot = None;
                    // Written before the new slot exists: a crash in between must not
                    // find the new slot and a finished snapshot of the old one.
                    let (path, copy) = (self.marker.clone(), marker.clone());
                    tokio::task::spawn_blocking(move || copy.write(&path)).await??;
                }
                anyhow::ensure!(
                    marker.slot.as_deref() != Some(slot.as_str()),
                    "replication slot '{slot}' does not exist: it was dropped after this source used it, and the \
                     changes since are lost to it. Delete {} to let the source create a new slot (from now on)",
                    self.marker.display()
                );
                let rows = Self::query(
                    client,
                    &format!("CREATE_REPLICATION_SLOT \"{slot}\" LOGICAL pgoutput NOEXPORT_SNAPSHOT"),
                )
                .await
                .map_err(|e| e.context(format!("creating replication slot '{slot}'")))?;
                let lsn = rows.first().and_then(|r| text_of(r, 1)).and_then(|l| Lsn::parse(&l).ok());
                tracing::info!(source = %self.name, slot = %slot, lsn = ?lsn.map(|l| l.to_pg_string()),
                    "created the replication slot");
                lsn.map_or(0, |l| l.as_u64())
            }
        };
        if marker.slot.as_deref() != Some(slot.as_str()) || marker.publication.as_deref() != Some(publication.as_str())
        {
            if marker.slot.as_deref() != Some(slot.as_str())
                && marker.snapshot.is_none()
                && self.config.snapshot.reads_rows()
            {
                marker.snapshot = Some(coverage::Progress::new(fastrand::u64(..)));
            }
            marker.slot = Some(slot.clone());
            marker.publication = Some(publication.clone());
            let path = self.marker.clone();
            let copy = marker.clone();
            tokio::task::spawn_blocking(move || copy.write(&path)).await??;
        }
        Ok(confirmed)
    }

    async fn primary_keys(client: &mut ReplicationClient) -> anyhow::Result<HashMap<(String, String), Vec<String>>> {
        let rows = Self::query(
            client,
            "SELECT n.nspname, c.relname, a.attname FROM pg_index i \
             JOIN pg_class c ON c.oid = i.indrelid JOIN pg_namespace n ON n.oid = c.relnamespace \
             CROSS JOIN LATERAL unnest(i.indkey::int2[]) WITH ORDINALITY AS k(attnum, ord) \
             JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum = k.attnum \
             WHERE i.indisprimary AND n.nspname NOT IN ('pg_catalog', 'information_schema') \
             ORDER BY 1, 2, k.ord",
        )
        .await?;
        let mut keys: HashMap<(String, String), Vec<String>> = HashMap::new();
        for row in rows {
            if let (Some(s), Some(t), Some(c)) = (text_of(&row, 0), text_of(&row, 1), text_of(&row, 2)) {
                keys.entry((s, t)).or_default().push(c);
            }
        }
        Ok(keys)
    }

    async fn connect(&self) -> anyhow::Result<ReplicationClient> {
        ReplicationClient::connect_gated(self.replication_config())
            .await
            .map_err(|e| anyhow::anyhow!("connecting to {}:{}: {e}", self.target.host, self.target.port))
    }

    /// A plain SQL connection with the replication session's settings (so values are
    /// sent in the same text forms).
    async fn sql_client(&self) -> anyhow::Result<tokio_postgres::Client> {
        let t = &self.target;
        let mut pg = tokio_postgres::Config::new();
        pg.host(&t.host)
            .port(t.port)
            .user(&t.user)
            .dbname(&t.database)
            // A snapshot's statements and its open transaction may take long.
            .options(format!("{SESSION_OPTIONS} -c statement_timeout=0 -c idle_in_transaction_session_timeout=0"))
            .application_name(format!("flowgate-{}", self.name))
            .connect_timeout(Duration::from_secs(30))
            .keepalives_idle(Duration::from_secs(30));
        if let Some(p) = &t.password {
            pg.password(p);
        }
        let place = format!("connecting to {}:{}", t.host, t.port);
        let tls = match t.tls {
            pgwire_replication::SslMode::Disable => None,
            pgwire_replication::SslMode::Prefer => {
                pg.ssl_mode(tokio_postgres::config::SslMode::Prefer);
                Some(crate::sinks::postgres::tls::connector(crate::sinks::postgres::PostgresTls::Require, None)?)
            }
            pgwire_replication::SslMode::Require => {
                pg.ssl_mode(tokio_postgres::config::SslMode::Require);
                Some(crate::sinks::postgres::tls::connector(crate::sinks::postgres::PostgresTls::Require, None)?)
            }
            pgwire_replication::SslMode::VerifyCa | pgwire_replication::SslMode::VerifyFull => {
                pg.ssl_mode(tokio_postgres::config::SslMode::Require);
                Some(crate::sinks::postgres::tls::connector(crate::sinks::postgres::PostgresTls::VerifyFull, None)?)
            }
        };
        let client = match tls {
            None => {
                let (client, connection) =
                    pg.connect(tokio_postgres::NoTls).await.map_err(|e| anyhow::anyhow!("{place}: {e}"))?;
                tokio::spawn(connection);
                client
            }
            Some(tls) => {
                let (client, connection) = pg.connect(tls).await.map_err(|e| anyhow::anyhow!("{place}: {e}"))?;
                tokio::spawn(connection);
                client
            }
        };
        Ok(client)
    }

    /// `initial_only`: the snapshot, then nothing.
    async fn snapshot_only(&self, shutdown: &CancellationToken, streamed: &mut bool) -> anyhow::Result<()> {
        let mut marker = Marker::read(&self.marker)?;
        if !marker.snapshot.as_ref().is_some_and(|p| p.done) {
            self.status.set_state(SourceState::Snapshot);
            if let snapshot::Outcome::Stopped = self.snapshot(&mut marker, shutdown).await? {
                return Ok(());
            }
            *streamed = true;
        }
        self.status.set_state(SourceState::Finished);
        shutdown.cancelled().await;
        Ok(())
    }
}
