//! The `postgres_cdc` options: parsed, checked, and the connection target and tables
//! they name.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

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
    pub(super) fn streams(self) -> bool {
        self != Snapshot::InitialOnly
    }

    pub(super) fn reads_rows(self) -> bool {
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
pub(super) struct TableSpec {
    pub(super) schema: String,
    /// `None` for `schema.*`.
    pub(super) table: Option<String>,
}

impl TableSpec {
    pub(super) fn matches(&self, schema: &str, table: &str) -> bool {
        self.schema == schema && self.table.as_deref().is_none_or(|t| t == table)
    }
}

/// A PostgreSQL identifier as it is stored (case-sensitive): letters, digits, `_`, `$`,
/// not starting with a digit, at most 63 bytes. Anything else is refused rather than
/// quoted, so names can go into SQL and topic names as they are.
pub(super) fn check_identifier(what: &str, s: &str) -> anyhow::Result<()> {
    let ok = !s.is_empty()
        && s.len() <= 63
        && !s.as_bytes()[0].is_ascii_digit()
        && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'$');
    anyhow::ensure!(ok, "{what} '{s}' must be 1 to 63 letters, digits, '_' or '$', not starting with a digit");
    Ok(())
}

pub(super) fn parse_tables(tables: &[String]) -> anyhow::Result<Vec<TableSpec>> {
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
pub(super) struct Target {
    pub(super) host: String,
    pub(super) port: u16,
    pub(super) user: String,
    pub(super) password: Option<String>,
    pub(super) database: String,
    pub(super) tls: pgwire_replication::SslMode,
}

pub(super) fn parse_url(url: &str) -> anyhow::Result<Target> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sources::postgres_cdc::PostgresCdcSource;
    use crate::sources::SourceConnector;

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
