//! `postgres`: writes events as rows of a PostgreSQL table; exactly once.
//!
//! - **Modes.** `insert` inserts a row per event. `upsert` inserts or, when a row with
//!   the same key exists, updates it (`INSERT … ON CONFLICT (key) DO UPDATE`). `cdc`
//!   applies Debezium-style change envelopes (`{"before", "after", "op", …}`, bare or
//!   inside `"payload"`): `c` and `r` upsert `after`, `u` upserts `after` (and deletes
//!   `before`'s row first when the key changed), `d` deletes `before`'s key, `t`
//!   truncates the table.
//! - **Columns.** At start (and at every reconnect) the sink reads the table's columns,
//!   types and primary key. By default every column (but generated and `GENERATED
//!   ALWAYS` identity ones) takes the event field of the same name; `columns` maps
//!   columns to fields (a name, or a JSON pointer starting with `/`) and then only those
//!   columns are written. A missing field writes NULL. `key_columns` (default: the
//!   primary key) is the key of `upsert` and `cdc`.
//! - **Batched.** A write is one transaction: in `insert` mode one `COPY … FROM STDIN`
//!   (text format) of the batch's rows; in `upsert` and `cdc` modes, per run of
//!   operations between truncates, at most one `DELETE … USING unnest(…)` and one
//!   `INSERT … SELECT … FROM unnest(…) ON CONFLICT …`, each with one text array per
//!   column (prepared once per connection; the server casts the text to the column
//!   types); then the position, then `COMMIT`. Within a batch of
//!   `upsert` or `cdc`, only the last operation per key is applied (earlier ones would
//!   be overwritten anyway), and a truncate applies what came before it first.
//! - **Exactly once.** The transaction that writes the rows also stores the position
//!   in the offsets table (`offsets_table`, default `flowgate_offsets`): (pipeline,
//!   sink, source topic, partition) → the highest source offset written. At start the
//!   sink reads it back, and skips every event at or below it: after a crash the replay
//!   since the engine's last checkpoint writes only what the table lacks. After a write
//!   failed (the commit's answer may have been lost) the next write reconnects and reads
//!   the position again. Events a processor made (no source offset) are written at
//!   least once.
//! - **Failures.** A failure that is not an event's fault (connection lost or refused,
//!   server shutting down or starting, serialization failure, deadlock, too many
//!   connections, timeout, and any error that is not about a value: a missing table or
//!   column, permissions) fails the whole write: the runtime retries it with backoff,
//!   and the sink reconnects. Values that cannot be converted to their column's type
//!   (see [`convert`]) and rows the server refuses (SQLSTATE classes 22 data exception,
//!   23 integrity constraint violation, 54 program limit, `0A000`) are refused per
//!   event: the batch is written again with a savepoint per half (bisecting down to the
//!   bad events), the bad events are reported with PostgreSQL's SQLSTATE and message
//!   (they go to the dead-letter topic), and the rest of the batch is written.
//! - **One connection per sink instance** (per source partition), kept across writes.

pub mod convert;

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use anyhow::Context;
use flowgate_engine::sink::BoxFuture;
use flowgate_engine::{EventFailure, Sink, SinkEvent, SinkPlace, WriteOutcome};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio_postgres::config::SslMode;
use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, NoTls, Statement, Transaction};
use tokio_postgres_rustls::MakeRustlsConnect;

use self::convert::{convert, copy_escape, Kind, Refused};
use super::registry::{BuildContext, SinkConnector};

/// What a write does with each event.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PostgresMode {
    /// One row per event.
    Insert,
    /// Insert, or update the row with the same key.
    Upsert,
    /// Apply Debezium-style change envelopes.
    Cdc,
}

/// TLS to the server.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PostgresTls {
    /// Plain TCP.
    Disable,
    /// TLS, without checking the server's certificate (as libpq's `sslmode=require`).
    Require,
    /// TLS with the certificate checked against the public roots (and `ca_file`) and the
    /// host name.
    VerifyFull,
}

/// `type = "postgres"`: a PostgreSQL table.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PostgresConfig {
    /// `postgres://user@host:port/database` (no password: see `password_env`).
    pub url: String,
    /// The environment variable holding the password.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_env: Option<String>,
    /// A file holding the password (relative paths are under the data directory).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_file: Option<PathBuf>,
    /// The table, optionally schema-qualified (`schema.table`), as SQL names it.
    pub table: String,
    /// `insert`, `upsert` or `cdc`.
    #[serde(default = "default_mode")]
    pub mode: PostgresMode,
    /// The key of `upsert` and `cdc`; empty for the table's primary key.
    #[serde(default)]
    pub key_columns: Vec<String>,
    /// Column → event field (a top-level name, or a JSON pointer starting with `/`);
    /// empty for every column from the field of the same name.
    #[serde(default)]
    pub columns: BTreeMap<String, String>,
    /// `disable`, `require` or `verify-full`.
    #[serde(default = "default_tls")]
    pub tls: PostgresTls,
    /// PEM certificates trusted besides the public roots (`verify-full`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
    /// The table holding the sink's positions (created when missing).
    #[serde(default = "default_offsets_table")]
    pub offsets_table: String,
    /// A connection not made within this long fails the write, which is retried.
    #[serde(default = "default_connect_timeout")]
    pub connect_timeout_ms: u64,
    /// A write not done within this long fails, and is retried on a new connection.
    #[serde(default = "default_timeout")]
    pub timeout_ms: u64,
}

fn default_mode() -> PostgresMode {
    PostgresMode::Insert
}
fn default_tls() -> PostgresTls {
    PostgresTls::Disable
}
fn default_offsets_table() -> String {
    "flowgate_offsets".to_owned()
}
fn default_connect_timeout() -> u64 {
    10_000
}
fn default_timeout() -> u64 {
    30_000
}

/// A SQL name of one or two parts (`schema.table`), each of letters, digits and `_`.
fn valid_name(name: &str) -> bool {
    let parts: Vec<&str> = name.split('.').collect();
    parts.len() <= 2
        && parts.iter().all(|p| {
            !p.is_empty()
                && p.len() <= 63
                && !p.starts_with(|c: char| c.is_ascii_digit())
                && p.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        })
}

/// `name` quoted as a SQL identifier.
fn quote(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// The password the config names, read now.
fn password(c: &PostgresConfig, data_dir: &Path) -> anyhow::Result<Option<String>> {
    if let Some(var) = &c.password_env {
        let p = std::env::var(var)
            .map_err(|_| anyhow::anyhow!("`password_env`: the environment variable '{var}' is not set"))?;
        return Ok(Some(p));
    }
    if let Some(file) = &c.password_file {
        let path = data_dir.join(file);
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("`password_file`: cannot read '{}'", path.display()))?;
        return Ok(Some(text.trim_end_matches(['\r', '\n']).to_owned()));
    }
    Ok(None)
}

impl SinkConnector for PostgresSink {
    const TYPE: &'static str = "postgres";
    const REMOTE: bool = true;
    type Config = PostgresConfig;

    fn validate(c: &PostgresConfig) -> anyhow::Result<()> {
        // The message of a parse error never repeats the URL (which could hold a password).
        let pg = tokio_postgres::Config::from_str(&c.url)
            .map_err(|e| anyhow::anyhow!("`url` is not a PostgreSQL URL ({e})"))?;
        anyhow::ensure!(!pg.get_hosts().is_empty(), "`url` names no host");
        anyhow::ensure!(
            pg.get_password().is_none(),
            "`url` holds a password: give it with `password_env` or `password_file` instead"
        );
        anyhow::ensure!(
            c.password_env.is_none() || c.password_file.is_none(),
            "`password_env` and `password_file` are exclusive"
        );
        if let Some(var) = &c.password_env {
            anyhow::ensure!(
                std::env::var_os(var).is_some(),
                "`password_env`: the environment variable '{var}' is not set"
            );
        }
        anyhow::ensure!(!c.table.trim().is_empty(), "`table` is empty");
        anyhow::ensure!(
            valid_name(&c.offsets_table),
            "`offsets_table` '{}' must be a name of letters, digits and '_' (optionally schema.name)",
            c.offsets_table
        );
        for (column, field) in &c.columns {
            anyhow::ensure!(!column.is_empty() && !field.is_empty(), "`columns` maps an empty name");
        }
        anyhow::ensure!(c.key_columns.iter().all(|k| !k.is_empty()), "`key_columns` holds an empty name");
        anyhow::ensure!(
            c.ca_file.is_none() || c.tls == PostgresTls::VerifyFull,
            "`ca_file` is for `tls = \"verify-full\"`"
        );
        anyhow::ensure!(c.connect_timeout_ms > 0 && c.timeout_ms > 0, "timeouts must be positive");
        Ok(())
    }

    fn build(c: PostgresConfig, cx: &BuildContext<'_>) -> anyhow::Result<Box<dyn Sink>> {
        Ok(Box::new(PostgresSink::new(c, cx.place, &cx.sink.name, cx.data_dir)?))
    }
}

/// A column written, where its value comes from and how it is checked.
#[derive(Clone, Debug)]
struct Column {
    name: String,
    /// The type the text is cast to (`format_type` without modifier, so that the
    /// assignment applies the modifier: a too long `varchar(n)` value is an error, not
    /// cut).
    cast: String,
    kind: Kind,
    field: String,
}

/// What the sink learned of the table at connect, and its prepared statements.
struct Schema {
    table: String,
    columns: Vec<Column>,
    /// Indices of the key columns in `columns`.
    keys: Vec<usize>,
    /// Every column's field is a top-level one (none is a JSON pointer).
    flat: bool,
    insert: Statement,
    /// `COPY … FROM STDIN` of the written columns, for `insert` mode.
    copy: Option<String>,
    delete: Option<Statement>,
    truncate: String,
    save: Statement,
}

struct Conn {
    client: Client,
    schema: Schema,
}

/// What one event asks of the table.
#[derive(Debug)]
enum OpKind {
    /// A row, values in `Schema::columns` order.
    Row(Vec<Option<String>>),
    /// A row as a line of COPY text, at this place of the write's line buffer (`insert`
    /// mode, every column a top-level field: no value is held on its own).
    Line(std::ops::Range<usize>),
    /// Delete by key, values in `Schema::keys` order.
    Delete(Vec<Option<String>>),
    Truncate,
}

#[derive(Debug)]
struct Op {
    event: usize,
    kind: OpKind,
}

/// How to treat an error of the server or the connection.
#[derive(Debug, PartialEq, Eq)]
enum Class {
    /// The event's fault: refuse it.
    PerEvent,
    /// Not the events' fault: fail the write, which is retried.
    Write,
}

fn classify(e: &tokio_postgres::Error) -> Class {
    match e.code().map(|c| c.code()) {
        // 21000: one statement touched a row twice (two spellings of one key in a batch):
        // the events apart, in order, write fine.
        Some(code)
            if code.starts_with("22")
                || code.starts_with("23")
                || code.starts_with("54")
                || code == "0A000"
                || code == "21000" =>
        {
            Class::PerEvent
        }
        _ => Class::Write,
    }
}

/// The server's message for an event it refused.
fn refusal(e: &tokio_postgres::Error) -> (String, Option<String>) {
    match e.as_db_error() {
        Some(db) => {
            let mut reason = db.message().to_owned();
            if let Some(detail) = db.detail() {
                reason.push_str(" (");
                reason.push_str(detail);
                reason.push(')');
            }
            (reason, Some(db.code().code().to_owned()))
        }
        None => (e.to_string(), None),
    }
}

/// Writes events into a PostgreSQL table.
pub struct PostgresSink {
    config: PostgresConfig,
    pg: tokio_postgres::Config,
    tls: Option<MakeRustlsConnect>,
    pipeline: String,
    sink: String,
    topic: String,
    partition: i32,
    conn: Option<Conn>,
    /// The highest source offset the table holds for this place (read at connect).
    stored: Option<u64>,
}

impl PostgresSink {
    /// A sink for `place`, not connected yet (it connects at recovery or first write).
    pub fn new(config: PostgresConfig, place: &SinkPlace, name: &str, data_dir: &Path) -> anyhow::Result<PostgresSink> {
        let mut pg = tokio_postgres::Config::from_str(&config.url)
            .map_err(|e| anyhow::anyhow!("`url` is not a PostgreSQL URL ({e})"))?;
        if let Some(p) = password(&config, data_dir)? {
            pg.password(p);
        }
        pg.connect_timeout(Duration::from_millis(config.connect_timeout_ms));
        pg.keepalives_idle(Duration::from_secs(30));
        if pg.get_application_name().is_none() {
            pg.application_name("flowgate");
        }
        let tls = match config.tls {
            PostgresTls::Disable => {
                pg.ssl_mode(SslMode::Disable);
                None
            }
            PostgresTls::Require | PostgresTls::VerifyFull => {
                pg.ssl_mode(SslMode::Require);
                Some(tls::connector(config.tls, config.ca_file.as_deref().map(|f| data_dir.join(f)).as_deref())?)
            }
        };
        Ok(PostgresSink {
            config,
            pg,
            tls,
            pipeline: place.pipeline.clone(),
            sink: name.to_owned(),
            topic: place.topic.clone(),
            partition: i32::try_from(place.partition).unwrap_or(i32::MAX),
            conn: None,
            stored: None,
        })
    }

    async fn connect(&mut self) -> anyhow::Result<()> {
        let client = match &self.tls {
            None => {
                let (client, connection) = self.pg.connect(NoTls).await?;
                tokio::spawn(async move {
                    let _ = connection.await;
                });
                client
            }
            Some(tls) => {
                let (client, connection) = self.pg.connect(tls.clone()).await?;
                tokio::spawn(async move {
                    let _ = connection.await;
                });
                client
            }
        };
        let schema = self.load_schema(&client).await?;
        let read = format!(
            "SELECT \"offset\" FROM {} WHERE pipeline = $1 AND sink = $2 AND topic = $3 AND partition = $4",
            schema_offsets(&self.config.offsets_table)
        );
        let row = client.query_opt(&read, &[&self.pipeline, &self.sink, &self.topic, &self.partition]).await?;
        self.stored = row.map(|r| r.get::<_, i64>(0)).and_then(|o| u64::try_from(o).ok());
        tracing::info!(sink = %self.sink, pipeline = %self.pipeline, table = %schema.table, partition = self.partition,
            stored = ?self.stored, "connected to PostgreSQL");
        self.conn = Some(Conn { client, schema });
        Ok(())
    }

    /// Reads the table's columns and key, creates the offsets table if missing, and
    /// prepares the statements.
    async fn load_schema(&self, client: &Client) -> anyhow::Result<Schema> {
        let c = &self.config;
        let table = &c.table;
        let row = client
            .query_opt(
                "SELECT quote_ident(n.nspname) || '.' || quote_ident(c.relname) FROM pg_class c \
                 JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = to_regclass($1)",
                &[table],
            )
            .await
            .with_context(|| format!("looking up table '{table}'"))?;
        let Some(row) = row else {
            anyhow::bail!("table '{table}' does not exist (or the user cannot see it)");
        };
        let qualified: String = row.get(0);
        let rows = client
            .query(
                "SELECT a.attname::text, format_type(a.atttypid, NULL), t.typname::text, \
                 a.attgenerated::text <> '' OR a.attidentity::text = 'a' \
                 FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid \
                 WHERE a.attrelid = to_regclass($1) AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum",
                &[table],
            )
            .await?;
        let mut columns = Vec::new();
        for r in &rows {
            let (name, cast, typname, skip): (String, String, String, bool) = (r.get(0), r.get(1), r.get(2), r.get(3));
            let field = if c.columns.is_empty() {
                if skip {
                    continue;
                }
                name.clone()
            } else if let Some(f) = c.columns.get(&name) {
                f.clone()
            } else {
                continue;
            };
            columns.push(Column { kind: Kind::of(&typname), name, cast, field });
        }
        for name in c.columns.keys() {
            anyhow::ensure!(
                columns.iter().any(|col| &col.name == name),
                "`columns`: table '{table}' has no column '{name}'"
            );
        }
        anyhow::ensure!(!columns.is_empty(), "table '{table}' has no column to write");
        let key_names: Vec<String> = if c.key_columns.is_empty() {
            client
                .query(
                    "SELECT a.attname::text FROM pg_index i \
                     CROSS JOIN LATERAL unnest(i.indkey::int2[]) WITH ORDINALITY AS k(attnum, ord) \
                     JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum \
                     WHERE i.indrelid = to_regclass($1) AND i.indisprimary ORDER BY k.ord",
                    &[table],
                )
                .await?
                .iter()
                .map(|r| r.get(0))
                .collect()
        } else {
            c.key_columns.clone()
        };
        let mut keys = Vec::new();
        if c.mode != PostgresMode::Insert {
            anyhow::ensure!(
                !key_names.is_empty(),
                "table '{table}' has no primary key: set `key_columns` for mode {:?}",
                c.mode
            );
            for k in &key_names {
                let i = columns
                    .iter()
                    .position(|col| &col.name == k)
                    .ok_or_else(|| anyhow::anyhow!("key column '{k}' is not a column written to table '{table}'"))?;
                keys.push(i);
            }
        }

        let params = (1..=columns.len()).map(|i| format!("${i}::text[]")).collect::<Vec<_>>().join(", ");
        let vs = (0..columns.len()).map(|i| format!("v{i}")).collect::<Vec<_>>().join(", ");
        let names = columns.iter().map(|col| quote(&col.name)).collect::<Vec<_>>().join(", ");
        let casts = columns.iter().enumerate().map(|(i, col)| format!("v{i}::{}", col.cast)).collect::<Vec<_>>();
        let mut insert =
            format!("INSERT INTO {qualified} ({names}) SELECT {} FROM unnest({params}) AS u({vs})", casts.join(", "));
        if c.mode != PostgresMode::Insert {
            let key_list = keys.iter().map(|&i| quote(&columns[i].name)).collect::<Vec<_>>().join(", ");
            let sets: Vec<String> = (0..columns.len())
                .filter(|i| !keys.contains(i))
                .map(|i| format!("{0} = EXCLUDED.{0}", quote(&columns[i].name)))
                .collect();
            if sets.is_empty() {
                insert.push_str(&format!(" ON CONFLICT ({key_list}) DO NOTHING"));
            } else {
                insert.push_str(&format!(" ON CONFLICT ({key_list}) DO UPDATE SET {}", sets.join(", ")));
            }
        }
        let delete = if c.mode == PostgresMode::Cdc {
            let kparams = (1..=keys.len()).map(|i| format!("${i}::text[]")).collect::<Vec<_>>().join(", ");
            let kvs = (0..keys.len()).map(|i| format!("k{i}")).collect::<Vec<_>>().join(", ");
            let cond = keys
                .iter()
                .enumerate()
                .map(|(j, &i)| format!("t.{} = u.k{j}::{}", quote(&columns[i].name), columns[i].cast))
                .collect::<Vec<_>>()
                .join(" AND ");
            let sql = format!("DELETE FROM {qualified} AS t USING unnest({kparams}) AS u({kvs}) WHERE {cond}");
            Some(client.prepare(&sql).await.with_context(|| format!("preparing the delete from '{table}'"))?)
        } else {
            None
        };
        let insert = client.prepare(&insert).await.with_context(|| format!("preparing the writes to '{table}'"))?;

        let offsets = schema_offsets(&c.offsets_table);
        let create = format!(
            "CREATE TABLE IF NOT EXISTS {offsets} (pipeline text NOT NULL, sink text NOT NULL, topic text NOT NULL, \
             partition integer NOT NULL, \"offset\" bigint NOT NULL, updated_at timestamptz NOT NULL DEFAULT now(), \
             PRIMARY KEY (pipeline, sink, topic, partition))"
        );
        if let Err(e) = client.batch_execute(&create).await {
            // Two instances creating it at once: one of them loses the race, harmlessly.
            let raced = e.code().is_some_and(|c| c.code() == "23505" || c.code() == "42P07");
            if !raced {
                return Err(anyhow::Error::new(e).context(format!("creating the offsets table '{}'", c.offsets_table)));
            }
        }
        let save = client
            .prepare(&format!(
                "INSERT INTO {offsets} (pipeline, sink, topic, partition, \"offset\") VALUES ($1, $2, $3, $4, $5) \
                 ON CONFLICT (pipeline, sink, topic, partition) DO UPDATE SET \"offset\" = EXCLUDED.\"offset\", \
                 updated_at = now()"
            ))
            .await?;
        let copy = (c.mode == PostgresMode::Insert).then(|| format!("COPY {qualified} ({names}) FROM STDIN"));
        Ok(Schema {
            flat: columns.iter().all(|c: &Column| !c.field.starts_with('/')),
            truncate: format!("TRUNCATE {qualified}"),
            table: qualified,
            columns,
            keys,
            insert,
            copy,
            delete,
            save,
        })
    }

    /// The operations of one event.
    fn event_ops(&self, schema: &Schema, payload: &[u8]) -> Result<Vec<OpKind>, Refused> {
        if self.config.mode != PostgresMode::Cdc && schema.flat {
            if let Some(fields) = convert::Fields::of(payload) {
                return Ok(vec![OpKind::Row(row_of_fields(schema, &fields)?)]);
            }
        }
        let v: Value = serde_json::from_slice(payload)
            .map_err(|e| Refused { code: "22P02", reason: format!("the event is not JSON: {e}") })?;
        match self.config.mode {
            PostgresMode::Insert | PostgresMode::Upsert => Ok(vec![OpKind::Row(row(schema, &v)?)]),
            PostgresMode::Cdc => {
                let env = if v.get("op").is_none() { v.get("payload").unwrap_or(&v) } else { &v };
                let op = env.get("op").and_then(Value::as_str).ok_or_else(|| Refused {
                    code: "22P02",
                    reason: "the event is no change envelope: it has no \"op\"".to_owned(),
                })?;
                let side = |name: &str| -> Result<&Value, Refused> {
                    env.get(name).filter(|v| v.is_object()).ok_or_else(|| Refused {
                        code: "22P02",
                        reason: format!("a change of op \"{op}\" has no \"{name}\" object"),
                    })
                };
                match op {
                    "c" | "r" => Ok(vec![OpKind::Row(row(schema, side("after")?)?)]),
                    "u" => {
                        let after = row(schema, side("after")?)?;
                        let new_key: Vec<Option<String>> = schema.keys.iter().map(|&i| after[i].clone()).collect();
                        let mut ops = Vec::new();
                        if let Ok(before) = side("before") {
                            let old_key = key(schema, before)?;
                            if old_key != new_key {
                                ops.push(OpKind::Delete(old_key));
                            }
                        }
                        ops.push(OpKind::Row(after));
                        Ok(ops)
                    }
                    "d" => Ok(vec![OpKind::Delete(key(schema, side("before")?)?)]),
                    "t" => Ok(vec![OpKind::Truncate]),
                    other => Err(Refused {
                        code: "22P02",
                        reason: format!("unknown change op {:?}", other.chars().take(16).collect::<String>()),
                    }),
                }
            }
        }
    }

    async fn write_inner(&mut self, events: &[SinkEvent]) -> anyhow::Result<WriteOutcome> {
        if self.conn.is_none() {
            self.connect().await?;
        }
        let mut failures = Vec::new();
        let mut ops = Vec::new();
        let mut last: Option<u64> = None;
        let mut skipped = 0usize;
        let mut lines = bytes::BytesMut::new();
        {
            let schema = &self.conn.as_ref().expect("connected").schema;
            let as_lines = self.config.mode == PostgresMode::Insert && schema.flat;
            if as_lines {
                lines.reserve(events.iter().map(|e| e.payload.len().saturating_add(schema.columns.len())).sum());
            }
            for (i, e) in events.iter().enumerate() {
                if e.offset != u64::MAX && i64::try_from(e.offset).is_ok() {
                    if self.stored.is_some_and(|s| e.offset <= s) {
                        skipped += 1;
                        continue;
                    }
                    last = Some(last.map_or(e.offset, |l| l.max(e.offset)));
                }
                if as_lines {
                    if let Some(fields) = convert::Fields::of(&e.payload) {
                        let start = lines.len();
                        match copy_line(schema, &fields, &mut lines) {
                            Ok(()) => ops.push(Op { event: i, kind: OpKind::Line(start..lines.len()) }),
                            Err(r) => {
                                lines.truncate(start);
                                failures.push(EventFailure {
                                    index: i,
                                    retryable: false,
                                    reason: r.reason,
                                    code: Some(r.code.to_owned()),
                                });
                            }
                        }
                        continue;
                    }
                }
                match self.event_ops(schema, &e.payload) {
                    Ok(kinds) => ops.extend(kinds.into_iter().map(|kind| Op { event: i, kind })),
                    Err(r) => failures.push(EventFailure {
                        index: i,
                        retryable: false,
                        reason: r.reason,
                        code: Some(r.code.to_owned()),
                    }),
                }
            }
            if self.config.mode != PostgresMode::Insert {
                ops = last_per_key(ops, schema);
            }
        }
        if skipped > 0 {
            tracing::info!(sink = %self.sink, pipeline = %self.pipeline, skipped,
                "events the table holds already (written before a restart) were not written again");
        }
        if ops.is_empty() && last.is_none() {
            return Ok(WriteOutcome { failures, retry_after: None });
        }
        let lines = lines.freeze();
        let conn = self.conn.as_mut().expect("connected");
        let schema = &conn.schema;
        let tx = conn.client.transaction().await?;
        let tx = match execute(&tx, schema, &ops, &lines).await {
            Ok(()) => tx,
            Err(e) if classify(&e) == Class::PerEvent => {
                tx.rollback().await?;
                let mut tx = conn.client.transaction().await?;
                isolate(&mut tx, schema, &ops, &lines, &mut failures).await?;
                tx
            }
            Err(e) => return Err(anyhow::Error::new(e).context(format!("writing to {}", schema.table))),
        };
        if let Some(last) = last {
            let offset = i64::try_from(last).unwrap_or(i64::MAX);
            tx.execute(&schema.save, &[&self.pipeline, &self.sink, &self.topic, &self.partition, &offset]).await?;
        }
        tx.commit().await.with_context(|| format!("committing the writes to {}", schema.table))?;
        if last.is_some() {
            self.stored = last;
        }
        failures.sort_by_key(|f| f.index);
        failures.dedup_by_key(|f| f.index);
        Ok(WriteOutcome { failures, retry_after: None })
    }
}

fn schema_offsets(name: &str) -> String {
    name.split('.').map(quote).collect::<Vec<_>>().join(".")
}

/// An event's field for `column`.
fn field<'a>(v: &'a Value, column: &Column) -> &'a Value {
    let found = if column.field.starts_with('/') { v.pointer(&column.field) } else { v.get(&column.field) };
    found.unwrap_or(&Value::Null)
}

fn row(schema: &Schema, v: &Value) -> Result<Vec<Option<String>>, Refused> {
    if !v.is_object() {
        return Err(Refused { code: "22P02", reason: "the event is not a JSON object".to_owned() });
    }
    schema
        .columns
        .iter()
        .map(|col| {
            convert(field(v, col), col.kind)
                .map_err(|r| Refused { code: r.code, reason: format!("column '{}': {}", col.name, r.reason) })
        })
        .collect()
}

/// [`row`] of an event whose columns are all top-level fields, read without a tree.
fn row_of_fields(schema: &Schema, fields: &convert::Fields<'_>) -> Result<Vec<Option<String>>, Refused> {
    schema
        .columns
        .iter()
        .map(|col| match fields.get(&col.field) {
            None => Ok(None),
            Some(raw) => convert::convert_raw(raw, col.kind)
                .map_err(|r| Refused { code: r.code, reason: format!("column '{}': {}", col.name, r.reason) }),
        })
        .collect()
}

/// Appends an event's row as a line of COPY text.
fn copy_line(schema: &Schema, fields: &convert::Fields<'_>, buf: &mut bytes::BytesMut) -> Result<(), Refused> {
    for (c, col) in schema.columns.iter().enumerate() {
        if c > 0 {
            buf.extend_from_slice(b"\t");
        }
        match fields.get(&col.field) {
            None => buf.extend_from_slice(b"\\N"),
            Some(raw) => convert::copy_value(raw, col.kind, buf)
                .map_err(|r| Refused { code: r.code, reason: format!("column '{}': {}", col.name, r.reason) })?,
        }
    }
    buf.extend_from_slice(b"\n");
    Ok(())
}

fn key(schema: &Schema, v: &Value) -> Result<Vec<Option<String>>, Refused> {
    schema
        .keys
        .iter()
        .map(|&i| {
            let col = &schema.columns[i];
            match convert(field(v, col), col.kind) {
                Ok(Some(s)) => Ok(Some(s)),
                Ok(None) => Err(Refused { code: "23502", reason: format!("key column '{}' is null", col.name) }),
                Err(r) => Err(Refused { code: r.code, reason: format!("column '{}': {}", col.name, r.reason) }),
            }
        })
        .collect()
}

/// Keeps only the last operation per key between truncates (an upsert statement may
/// not touch a row twice, and the last one decides the row anyway).
fn last_per_key(ops: Vec<Op>, schema: &Schema) -> Vec<Op> {
    let mut seen: HashSet<Vec<Option<String>>> = HashSet::new();
    let mut kept = Vec::with_capacity(ops.len());
    for op in ops.into_iter().rev() {
        let k = match &op.kind {
            OpKind::Truncate => {
                seen.clear();
                kept.push(op);
                continue;
            }
            OpKind::Row(values) => schema.keys.iter().map(|&i| values[i].clone()).collect(),
            OpKind::Delete(k) => k.clone(),
            OpKind::Line(_) => {
                kept.push(op);
                continue;
            }
        };
        if seen.insert(k) {
            kept.push(op);
        }
    }
    kept.reverse();
    kept
}

/// Applies `ops` in one go: per run between truncates, one delete and one insert.
async fn execute(
    tx: &Transaction<'_>,
    schema: &Schema,
    ops: &[Op],
    lines: &bytes::Bytes,
) -> Result<(), tokio_postgres::Error> {
    let mut i = 0;
    while i < ops.len() {
        if matches!(ops[i].kind, OpKind::Truncate) {
            tx.batch_execute(&schema.truncate).await?;
            i += 1;
            continue;
        }
        let end = ops[i..].iter().position(|o| matches!(o.kind, OpKind::Truncate)).map_or(ops.len(), |p| i + p);
        if let Some(copy) = &schema.copy {
            copy_rows(tx, copy, &ops[i..end], lines).await?;
            i = end;
            continue;
        }
        let mut rows: Vec<Vec<Option<&str>>> = vec![Vec::new(); schema.columns.len()];
        let mut deletes: Vec<Vec<Option<&str>>> = vec![Vec::new(); schema.keys.len()];
        for op in &ops[i..end] {
            match &op.kind {
                OpKind::Row(values) => {
                    for (c, v) in values.iter().enumerate() {
                        rows[c].push(v.as_deref());
                    }
                }
                OpKind::Delete(k) => {
                    for (c, v) in k.iter().enumerate() {
                        deletes[c].push(v.as_deref());
                    }
                }
                OpKind::Truncate => unreachable!("runs end before truncates"),
                OpKind::Line(_) => unreachable!("lines are made only for COPY"),
            }
        }
        if let (Some(delete), Some(first)) = (&schema.delete, deletes.first()) {
            if !first.is_empty() {
                let params: Vec<&(dyn ToSql + Sync)> = deletes.iter().map(|c| c as &(dyn ToSql + Sync)).collect();
                tx.execute(delete, &params).await?;
            }
        }
        if rows.first().is_some_and(|c| !c.is_empty()) {
            let params: Vec<&(dyn ToSql + Sync)> = rows.iter().map(|c| c as &(dyn ToSql + Sync)).collect();
            tx.execute(&schema.insert, &params).await?;
        }
        i = end;
    }
    Ok(())
}

/// Writes rows with `COPY … FROM STDIN` (text format): as fast as the server loads
/// rows. A bad row fails the whole COPY, like a statement.
async fn copy_rows(
    tx: &Transaction<'_>,
    copy: &str,
    ops: &[Op],
    lines: &bytes::Bytes,
) -> Result<(), tokio_postgres::Error> {
    use futures_util::SinkExt;
    let sink = tx.copy_in::<str, bytes::Bytes>(copy).await?;
    let mut sink = std::pin::pin!(sink);
    // Lines side by side in the buffer go in one message.
    let mut run: Option<std::ops::Range<usize>> = None;
    for op in ops {
        let OpKind::Line(r) = &op.kind else { continue };
        match &mut run {
            Some(open) if open.end == r.start => open.end = r.end,
            _ => {
                if let Some(done) = run.replace(r.clone()) {
                    sink.send(lines.slice(done)).await?;
                }
            }
        }
    }
    if let Some(done) = run {
        sink.send(lines.slice(done)).await?;
    }
    let mut buf = bytes::BytesMut::new();
    for op in ops {
        let OpKind::Row(values) = &op.kind else { continue };
        for (c, v) in values.iter().enumerate() {
            if c > 0 {
                buf.extend_from_slice(b"\t");
            }
            match v {
                None => buf.extend_from_slice(b"\\N"),
                Some(s) => copy_escape(&mut buf, s),
            }
        }
        buf.extend_from_slice(b"\n");
    }
    if !buf.is_empty() {
        sink.send(buf.freeze()).await?;
    }
    sink.as_mut().finish().await?;
    Ok(())
}

/// Applies `ops` under savepoints, halving the runs that fail until the failing
/// operations stand alone; their events are refused with the server's code.
async fn isolate(
    tx: &mut Transaction<'_>,
    schema: &Schema,
    ops: &[Op],
    lines: &bytes::Bytes,
    failures: &mut Vec<EventFailure>,
) -> anyhow::Result<()> {
    // Ranges to try, the next one last; the whole batch failed already.
    let mut todo: Vec<(usize, usize)> = Vec::new();
    let split = |todo: &mut Vec<(usize, usize)>, a: usize, b: usize| {
        let mid = a + (b - a) / 2;
        todo.push((mid, b));
        todo.push((a, mid));
    };
    if ops.len() == 1 {
        todo.push((0, 1));
    } else {
        split(&mut todo, 0, ops.len());
    }
    let mut refused: HashSet<usize> = HashSet::new();
    while let Some((a, b)) = todo.pop() {
        // An event with two operations (a key change) is refused whole.
        let run: Vec<&Op> = ops[a..b].iter().filter(|o| !refused.contains(&o.event)).collect();
        if run.is_empty() {
            continue;
        }
        let sp = tx.savepoint("flowgate_isolate").await?;
        let owned: Vec<Op> = run.iter().map(|o| Op { event: o.event, kind: clone_kind(&o.kind) }).collect();
        match execute(&sp, schema, &owned, lines).await {
            Ok(()) => sp.commit().await?,
            Err(e) if classify(&e) == Class::PerEvent => {
                sp.rollback().await?;
                if b - a == 1 {
                    let (reason, code) = refusal(&e);
                    refused.insert(ops[a].event);
                    failures.push(EventFailure { index: ops[a].event, retryable: false, reason, code });
                } else {
                    split(&mut todo, a, b);
                }
            }
            Err(e) => return Err(anyhow::Error::new(e).context(format!("writing to {}", schema.table))),
        }
    }
    Ok(())
}

fn clone_kind(k: &OpKind) -> OpKind {
    match k {
        OpKind::Row(v) => OpKind::Row(v.clone()),
        OpKind::Line(r) => OpKind::Line(r.clone()),
        OpKind::Delete(v) => OpKind::Delete(v.clone()),
        OpKind::Truncate => OpKind::Truncate,
    }
}

impl Sink for PostgresSink {
    fn write<'a>(&'a mut self, events: &'a [SinkEvent]) -> BoxFuture<'a, anyhow::Result<WriteOutcome>> {
        Box::pin(async move {
            let limit = Duration::from_millis(self.config.timeout_ms);
            let result = match tokio::time::timeout(limit, self.write_inner(events)).await {
                Ok(r) => r,
                Err(_) => Err(anyhow::anyhow!("the write took longer than {} ms", self.config.timeout_ms)),
            };
            if result.is_err() {
                // The connection may be broken, and the commit's answer may have been
                // lost: the next write reconnects and reads the position again.
                self.conn = None;
            }
            result.with_context(|| format!("postgres sink '{}'", self.sink))
        })
    }

    fn recover<'a>(&'a mut self, _state: &'a serde_json::Value) -> BoxFuture<'a, anyhow::Result<()>> {
        // The position is the table's, written with the rows; the checkpoint holds none.
        Box::pin(async move {
            self.conn = None;
            self.connect().await.with_context(|| format!("postgres sink '{}' connecting", self.sink))
        })
    }
}

pub(crate) mod tls {
    //! TLS connectors: `require` encrypts without checking the certificate (as libpq's
    //! `sslmode=require`); `verify-full` checks it and the host name.

    use std::path::Path;
    use std::sync::Arc;

    use anyhow::Context;
    use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
    use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
    use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
    use tokio_postgres_rustls::MakeRustlsConnect;

    use super::PostgresTls;

    pub(crate) fn connector(mode: PostgresTls, ca_file: Option<&Path>) -> anyhow::Result<MakeRustlsConnect> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = ClientConfig::builder_with_provider(provider.clone()).with_safe_default_protocol_versions()?;
        let config = if mode == PostgresTls::Require {
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider)))
                .with_no_client_auth()
        } else {
            let mut roots = RootCertStore { roots: webpki_roots::TLS_SERVER_ROOTS.to_vec() };
            if let Some(file) = ca_file {
                for cert in CertificateDer::pem_file_iter(file)
                    .with_context(|| format!("`ca_file`: cannot read '{}'", file.display()))?
                {
                    let cert =
                        cert.with_context(|| format!("`ca_file`: '{}' holds a bad certificate", file.display()))?;
                    roots.add(cert)?;
                }
            }
            builder.with_root_certificates(roots).with_no_client_auth()
        };
        Ok(MakeRustlsConnect::new(config))
    }

    #[derive(Debug)]
    struct AnyCertificate(Arc<CryptoProvider>);

    impl ServerCertVerifier for AnyCertificate {
        fn verify_server_cert(
            &self,
            _end_entity: &CertificateDer<'_>,
            _intermediates: &[CertificateDer<'_>],
            _server_name: &ServerName<'_>,
            _ocsp_response: &[u8],
            _now: UnixTime,
        ) -> Result<ServerCertVerified, rustls::Error> {
            Ok(ServerCertVerified::assertion())
        }

        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
        }

        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            self.0.signature_verification_algorithms.supported_schemes()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(extra: serde_json::Value) -> PostgresConfig {
        let mut base = serde_json::json!({ "url": "postgres://postgres@127.0.0.1:5432/postgres", "table": "t" });
        base.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        serde_json::from_value(base).unwrap()
    }

    #[test]
    fn validation_names_what_is_wrong() {
        PostgresSink::validate(&config(serde_json::json!({}))).unwrap();
        let e = PostgresSink::validate(&config(serde_json::json!({ "url": "postgres://u:secret@h/db" })))
            .unwrap_err()
            .to_string();
        assert!(e.contains("password") && !e.contains("secret"), "{e}");
        let e = PostgresSink::validate(&config(serde_json::json!({ "url": "postgres://h:notaport/db" })))
            .unwrap_err()
            .to_string();
        assert!(e.contains("`url`"), "{e}");
        let e = PostgresSink::validate(&config(serde_json::json!({ "password_env": "FLOWGATE_TEST_NO_SUCH_VAR" })))
            .unwrap_err()
            .to_string();
        assert!(e.contains("FLOWGATE_TEST_NO_SUCH_VAR"), "{e}");
        let e =
            PostgresSink::validate(&config(serde_json::json!({ "offsets_table": "a;drop" }))).unwrap_err().to_string();
        assert!(e.contains("offsets_table"), "{e}");
        let bad: Result<PostgresConfig, _> =
            serde_json::from_value(serde_json::json!({ "url": "postgres://h/db", "table": "t", "mode": "merge" }));
        assert!(bad.unwrap_err().to_string().contains("merge"));
    }

    #[test]
    fn copy_text_escapes_what_copy_reads_specially() {
        let mut buf = bytes::BytesMut::new();
        copy_escape(&mut buf, "a\\b\tc\nd\re\\N");
        assert_eq!(&buf[..], b"a\\\\b\\tc\\nd\\re\\\\N");
    }

    #[test]
    fn names_are_quoted() {
        assert_eq!(quote("a\"b"), "\"a\"\"b\"");
        assert_eq!(schema_offsets("s.flowgate_offsets"), "\"s\".\"flowgate_offsets\"");
        assert!(valid_name("flowgate_offsets") && valid_name("s.t") && !valid_name("a.b.c") && !valid_name("1a"));
    }
}
