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

pub mod coverage;
pub mod pgoutput;
mod snapshot;
pub mod value;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use flowgate_core::{partition_for_key, BatchBuilder, ProducerStamp};
use flowgate_log::append::{Appender, Route, Scratch};
use flowgate_log::{Log, LogError, Partition, SequenceRule, Topic};
use pgoutput::{Datum, Message, Old, Relation};
use pgwire_replication::{Lsn, ReplicationClient, ReplicationConfig, ReplicationEvent, TlsConfig};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use tokio::sync::{mpsc, watch};
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

/// When to read the tables' existing rows.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Snapshot {
    /// At the first start (no slot used before), then stream.
    #[default]
    Initial,
    /// Never: stream changes from the slot's start only.
    Never,
    /// Read the existing rows once and stop (no slot, no streaming).
    InitialOnly,
    /// As `initial`, and again, from a new slot, when the slot this source used was
    /// dropped (instead of stopping with an error).
    WhenNeeded,
}

impl Snapshot {
    fn streams(self) -> bool {
        self != Snapshot::InitialOnly
    }

    fn reads_rows(self) -> bool {
        self != Snapshot::Never
    }
}

/// `type = "postgres_cdc"`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PostgresCdcConfig {
    /// `postgres://user[:password]@host[:port]/database[?sslmode=disable|prefer|require|verify-ca|verify-full]`.
    pub url: String,
    /// An environment variable holding the password (instead of the URL's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_env: Option<String>,
    /// A file holding the password (trailing newline ignored).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_file: Option<PathBuf>,
    /// Tables to capture: `schema.table`, `table` (in `public`) or `schema.*`.
    pub tables: Vec<String>,
    /// The publication (created `FOR TABLE …` when missing at first start).
    #[serde(default = "default_name")]
    pub publication: String,
    /// The replication slot (created, permanent, `pgoutput`, when missing at first start).
    #[serde(default = "default_name")]
    pub slot: String,
    /// Each table to its own topic `<topic_prefix>.<schema>.<table>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub topic_prefix: Option<String>,
    /// Or every table to this one topic.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub topic: Option<String>,
    /// `initial` (default), `never`, `initial_only` or `when_needed`.
    #[serde(default)]
    pub snapshot: Snapshot,
    /// How often the confirmed position is sent to the server at most, in ms.
    #[serde(default = "default_status_interval_ms")]
    pub status_interval_ms: u64,
}

fn default_name() -> String {
    "flowgate".to_owned()
}

fn default_status_interval_ms() -> u64 {
    1000
}

/// A `tables` entry.
#[derive(Clone, Debug, PartialEq, Eq)]
struct TableSpec {
    schema: String,
    /// `None` for `schema.*`.
    table: Option<String>,
}

impl TableSpec {
    fn matches(&self, schema: &str, table: &str) -> bool {
        self.schema == schema && self.table.as_deref().is_none_or(|t| t == table)
    }
}

/// A PostgreSQL identifier as it is stored (case-sensitive): letters, digits, `_`, `$`,
/// not starting with a digit, at most 63 bytes. Anything else is refused rather than
/// quoted, so names can go into SQL and topic names as they are.
fn check_identifier(what: &str, s: &str) -> anyhow::Result<()> {
    let ok = !s.is_empty()
        && s.len() <= 63
        && !s.as_bytes()[0].is_ascii_digit()
        && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'$');
    anyhow::ensure!(ok, "{what} '{s}' must be 1 to 63 letters, digits, '_' or '$', not starting with a digit");
    Ok(())
}

fn parse_tables(tables: &[String]) -> anyhow::Result<Vec<TableSpec>> {
    anyhow::ensure!(!tables.is_empty(), "`tables` must name at least one table");
    tables
        .iter()
        .map(|t| {
            let (schema, table) = t.split_once('.').unwrap_or(("public", t));
            check_identifier("the schema of table", schema)?;
            if table == "*" {
                return Ok(TableSpec { schema: schema.to_owned(), table: None });
            }
            check_identifier("table", table)?;
            Ok(TableSpec { schema: schema.to_owned(), table: Some(table.to_owned()) })
        })
        .collect()
}

/// Where to connect, parsed from `url`.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Target {
    host: String,
    port: u16,
    user: String,
    password: Option<String>,
    database: String,
    tls: pgwire_replication::SslMode,
}

fn parse_url(url: &str) -> anyhow::Result<Target> {
    let parsed = url::Url::parse(url).map_err(|e| anyhow::anyhow!("`url` is not a URL: {e}"))?;
    anyhow::ensure!(
        matches!(parsed.scheme(), "postgres" | "postgresql"),
        "`url` must start with postgres:// (not {}://)",
        parsed.scheme()
    );
    let decode = |s: &str| url::form_urlencoded::parse(format!("x={s}").as_bytes()).next().map(|(_, v)| v.into_owned());
    let host = parsed.host_str().filter(|h| !h.is_empty()).unwrap_or("localhost").to_owned();
    let user = decode(parsed.username()).filter(|u| !u.is_empty()).unwrap_or_else(|| "postgres".to_owned());
    let password = parsed.password().and_then(decode);
    let database = parsed.path().trim_start_matches('/');
    let database = if database.is_empty() { user.clone() } else { decode(database).unwrap_or_default() };
    let mut tls = pgwire_replication::SslMode::Disable;
    for (k, v) in parsed.query_pairs() {
        match &*k {
            "sslmode" => {
                tls = match &*v {
                    "disable" => pgwire_replication::SslMode::Disable,
                    "prefer" => pgwire_replication::SslMode::Prefer,
                    "require" => pgwire_replication::SslMode::Require,
                    "verify-ca" => pgwire_replication::SslMode::VerifyCa,
                    "verify-full" => pgwire_replication::SslMode::VerifyFull,
                    other => anyhow::bail!("`url`: unknown sslmode '{other}'"),
                }
            }
            other => anyhow::bail!("`url`: unknown parameter '{other}' (only sslmode is read)"),
        }
    }
    Ok(Target { host, port: parsed.port().unwrap_or(5432), user, password, database, tls })
}

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

/// Where the source's marker is: named after the stream (server, database and slot), as
/// the producer ids are, so a source renamed keeps it while two sources reading slots
/// of the same name on different servers do not share one. A marker of an earlier
/// version, named after the source, is moved there.
fn marker_path(data_dir: &Path, name: &str, target: &Target, slot: &str) -> PathBuf {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let server = format!("{}\0{}\0{}", target.host, target.port, target.database);
    for b in server.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    let dir = data_dir.join("sources");
    let path = dir.join(format!("postgres_cdc.{slot}.{h:016x}.json"));
    let old = dir.join(format!("{name}.json"));
    if !path.exists() && old.exists() {
        let _ = std::fs::rename(&old, &path);
    }
    path
}

/// What this source has used before: a slot or publication named here that is missing
/// now was dropped, not never created.
/// It also holds the initial snapshot's progress.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct Marker {
    slot: Option<String>,
    publication: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    snapshot: Option<coverage::Progress>,
}

impl Marker {
    /// The marker at `path`; none yet is an empty one, a damaged one an error (it may
    /// hold a snapshot's progress, which must not be silently forgotten).
    fn read(path: &Path) -> anyhow::Result<Marker> {
        match std::fs::read(path) {
            Ok(b) => serde_json::from_slice(&b)
                .map_err(|e| anyhow::anyhow!("{} is damaged ({e}); repair or delete it", path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Marker::default()),
            Err(e) => Err(anyhow::anyhow!("reading {}: {e}", path.display())),
        }
    }

    fn write(&self, path: &Path) -> anyhow::Result<()> {
        Self::write_bytes(&serde_json::to_vec(self)?, path)
    }

    fn write_bytes(bytes: &[u8], path: &Path) -> anyhow::Result<()> {
        let dir = path.parent().expect("the marker is in a directory");
        std::fs::create_dir_all(dir)?;
        let tmp = path.with_extension("json.tmp");
        {
            use std::io::Write;
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(bytes)?;
            f.sync_all()?;
        }
        std::fs::rename(&tmp, path)?;
        std::fs::File::open(dir)?.sync_all()?;
        Ok(())
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

/// A transaction's changes on their way into one partition.
#[derive(Default)]
struct PartBuffer {
    builder: BatchBuilder,
    /// The index of the next chunk of the open transaction.
    chunk: u32,
    /// Decoded bytes the buffered changes came from.
    input_bytes: usize,
}

/// A change as stored: a Debezium-style envelope, written straight from its parts (no
/// tree is built per change). Fields in name order, as a JSON object map prints them.
#[derive(Serialize)]
struct Envelope<'a> {
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
struct Origin<'a> {
    /// The transaction's commit LSN, or the snapshot's consistent point.
    lsn: u64,
    txid: u32,
    commit_ts_ms: i64,
    snapshot: bool,
    schema: &'a str,
    table: &'a str,
}

impl<'a> Origin<'a> {
    fn of(txn: &Txn, relation: &'a Relation) -> Origin<'a> {
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
    fn new(source: &'a str, origin: &Origin<'a>, op: &'a str, before: &'a Value, after: &'a Value) -> Self {
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
fn key_json(columns: &[&str], row: &Value) -> anyhow::Result<Option<Vec<u8>>> {
    if columns.is_empty() {
        return Ok(None);
    }
    let mut k = Map::new();
    for c in columns {
        k.insert((*c).to_owned(), row.get(c).cloned().unwrap_or(Value::Null));
    }
    Ok(Some(serde_json::to_vec(&Value::Object(k))?))
}

/// The open transaction.
struct Txn {
    final_lsn: u64,
    xid: u32,
    commit_ts_ms: i64,
    /// Per (topic, partition): the end offset of the last chunk written, to wait for.
    written: HashMap<(String, u32), (Arc<Partition>, u64)>,
}

/// A position to confirm once these partitions are durable up to these offsets.
struct PendingAck {
    lsn: u64,
    /// The transaction's commit time (0 for a heartbeat: caught up).
    commit_ts_ms: i64,
    waits: Vec<(Arc<Partition>, u64)>,
}

/// Microseconds since 2000-01-01 as milliseconds since 1970-01-01.
fn pg_micros_to_unix_ms(micros: i64) -> i64 {
    micros.div_euclid(1000).saturating_add(946_684_800_000)
}

fn lsn_text(lsn: u64) -> String {
    Lsn(lsn).to_pg_string()
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

fn quote_literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

fn text_of(row: &[Option<bytes::Bytes>], i: usize) -> Option<String> {
    row.get(i)?.as_ref().map(|b| String::from_utf8_lossy(b).into_owned())
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

    /// One connection: set up, read the snapshot if one is due, stream until an error
    /// or shutdown.
    async fn session(&self, shutdown: &CancellationToken, streamed: &mut bool) -> anyhow::Result<()> {
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

    fn topic_name(&self, schema: &str, table: &str) -> anyhow::Result<String> {
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

    #[test]
    fn urls_tables_and_names_are_checked() {
        let t = parse_url("postgres://bob:p%40ss@db.local:6543/shop?sslmode=require").unwrap();
        assert_eq!(
            (t.host.as_str(), t.port, t.user.as_str(), t.password.as_deref(), t.database.as_str()),
            ("db.local", 6543, "bob", Some("p@ss"), "shop")
        );
        assert_eq!(t.tls, pgwire_replication::SslMode::Require);
        assert!(parse_url("mysql://x/y").is_err());
        assert!(parse_url("postgres://x/y?sslmode=sometimes").is_err());
        let specs = parse_tables(&["orders".into(), "inv.*".into(), "s.t".into()]).unwrap();
        assert_eq!(specs[0], TableSpec { schema: "public".into(), table: Some("orders".into()) });
        assert!(specs[1].matches("inv", "anything") && !specs[1].matches("public", "anything"));
        assert!(parse_tables(&["bad name".into()]).is_err());
        assert!(parse_tables(&["x\".y".into()]).is_err());
        assert!(parse_tables(&[]).is_err());
    }

    fn config(extra: &str) -> anyhow::Result<()> {
        let text = format!("url = \"postgres://u@h/db\"\ntables = [\"t\"]\n{extra}");
        let c: PostgresCdcConfig = toml::from_str(&text).map_err(|e| anyhow::anyhow!("{e}"))?;
        PostgresCdcSource::validate(&c)
    }

    #[test]
    fn exactly_one_topic_setting_and_only_supported_snapshots() {
        config("topic = \"x\"").unwrap();
        config("topic_prefix = \"cdc\"").unwrap();
        assert!(config("").unwrap_err().to_string().contains("exactly one"));
        assert!(config("topic = \"x\"\ntopic_prefix = \"y\"").is_err());
        for mode in ["initial", "never", "initial_only", "when_needed"] {
            config(&format!("topic = \"x\"\nsnapshot = \"{mode}\"")).unwrap();
        }
        assert!(config("topic = \"x\"\nsnapshot = \"sometimes\"").is_err());
        assert!(config("topic = \"x\"\nslot = \"Upper\"").is_err());
        assert!(config("topic = \"x\"\nbogus = 1").unwrap_err().to_string().contains("unknown field `bogus`"));
    }
}
