//! The engine's configuration: TOML, an embedded default, `FLOWGATE_*` overrides, and
//! errors that name the bad key and line.

use std::net::SocketAddr;
use std::path::PathBuf;

use flowgate_core::{Codec, TimestampUnit};
use flowgate_log::LogConfig;
use serde::{Deserialize, Serialize};

/// The embedded default configuration.
pub const DEFAULT_CONFIG: &str = include_str!("default.toml");

/// The prefix of environment overrides.
pub const ENV_PREFIX: &str = "FLOWGATE_";

/// The whole configuration.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Process-wide settings.
    #[serde(default)]
    pub server: ServerConfig,
    /// Storage settings.
    #[serde(default)]
    pub log: LogConfig,
    /// Listener settings.
    #[serde(default)]
    pub ingest: IngestConfig,
    /// Pipelines: topics through processors to sinks.
    #[serde(default)]
    pub pipelines: Vec<flowgate_engine::PipelineConfig>,
    /// Sources: external systems read into topics (docs/connectors.md).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sources: Vec<flowgate_connectors::sources::SourceConfig>,
    /// Alert rules (docs/alerts.md).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub alerts: Vec<crate::alerts::AlertRule>,
    /// How alerts are evaluated and delivered.
    #[serde(default)]
    pub alerting: crate::alerts::AlertingConfig,
    /// Spans exported over OTLP (docs/tracing.md).
    #[serde(default)]
    pub tracing: crate::trace::TracingConfig,
}

/// `[server]`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// Where the log lives.
    pub data_dir: PathBuf,
    /// At shutdown, how long connections may drain and pipelines may flush their sinks
    /// and commit (ms). What is still busy then is cut off.
    pub shutdown_grace_ms: u64,
    /// After the grace period, how long the final fsync and close of the log may take
    /// (ms). Shutdown ends within `shutdown_grace_ms + shutdown_flush_ms`.
    pub shutdown_flush_ms: u64,
    /// The memory budget (bytes) charged by everything that holds events or state
    /// (`docs/memory.md`); 0 derives it from the cgroup limit or the machine's memory.
    pub memory_limit_bytes: u64,
    /// Soft pressure starts at this percentage of the budget: listeners stop reading,
    /// sinks shrink their batches.
    pub memory_soft_percent: u8,
    /// What producers meet at the limit: they wait, or are refused with a retryable error.
    pub memory_policy: MemoryPolicy,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            data_dir: PathBuf::from("./flowgate-data"),
            shutdown_grace_ms: 10_000,
            shutdown_flush_ms: 5_000,
            memory_limit_bytes: 0,
            memory_soft_percent: 80,
            memory_policy: MemoryPolicy::Block,
        }
    }
}

/// Smallest `server.memory_limit_bytes`: below it the fixed reservations of one sink
/// alone would keep the engine under pressure.
pub const MIN_MEMORY_LIMIT_BYTES: u64 = 16 << 20;

/// `server.memory_policy`: what producers meet once the memory budget is used up.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MemoryPolicy {
    /// Listeners stop reading: producers wait (TCP pushes back).
    #[default]
    Block,
    /// Listeners read and refuse produce requests with a retryable error (binary
    /// `BUSY`, HTTP 503 with `Retry-After`); nothing refused is stored.
    Reject,
}

/// `[ingest]`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct IngestConfig {
    /// Binary protocol listener.
    pub binary_addr: SocketAddr,
    /// HTTP API listener.
    pub http_addr: SocketAddr,
    /// NDJSON listener.
    pub ndjson_addr: SocketAddr,
    /// Topic NDJSON lines go to.
    pub ndjson_topic: String,
    /// Largest binary protocol frame.
    pub max_frame_bytes: u32,
    /// Longest NDJSON line.
    pub max_line_bytes: usize,
    /// Largest HTTP request body.
    pub max_http_body_bytes: usize,
    /// Open connections across all listeners.
    pub max_connections: usize,
    /// A connection that sends nothing for this long is closed.
    pub idle_timeout_secs: u64,
    /// A frame, NDJSON line or HTTP body must arrive whole within this many seconds of
    /// its first byte (however steadily it trickles), or the connection is cut.
    pub frame_timeout_secs: u64,
    /// Memory all connections may hold in ingest buffers together.
    pub max_buffered_bytes: usize,
    /// Largest records section a compressed batch may inflate to; larger batches are
    /// refused before anything is decompressed.
    pub max_uncompressed_batch_bytes: usize,
    /// What the NDJSON listener writes back: nothing, or one line per durable batch.
    pub ndjson_ack: NdjsonAck,
    /// Compression of batches the server builds (NDJSON, HTTP).
    pub compression: Codec,
    /// The JSON field (a dotted path) holding each NDJSON and HTTP event's key; the key
    /// picks the partition. None by default: events are stored without a key.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key_field: Option<String>,
    /// The JSON field holding each NDJSON and HTTP event's time, in `timestamp_unit`.
    /// None by default: events get the ingest time.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timestamp_field: Option<String>,
    /// How `timestamp_field` is written: `ms`, `s`, `us` (numbers since the epoch) or
    /// `rfc3339` (a string).
    pub timestamp_unit: TimestampUnit,
    /// The JSON field holding each NDJSON and HTTP event's client id (what a dedup
    /// `by = "@client_id"` compares). None by default.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_id_field: Option<String>,
    /// HTTP request headers stored as headers of each event of the request
    /// (case-insensitive names, at most 16).
    pub http_keep_headers: Vec<String>,
}

impl Default for IngestConfig {
    fn default() -> Self {
        IngestConfig {
            binary_addr: "127.0.0.1:7070".parse().expect("valid"),
            http_addr: "127.0.0.1:7071".parse().expect("valid"),
            ndjson_addr: "127.0.0.1:7072".parse().expect("valid"),
            ndjson_topic: "events".into(),
            max_frame_bytes: 16 << 20,
            max_line_bytes: 1 << 20,
            max_http_body_bytes: 16 << 20,
            max_connections: 1024,
            idle_timeout_secs: 300,
            frame_timeout_secs: 30,
            max_buffered_bytes: 256 << 20,
            max_uncompressed_batch_bytes: 64 << 20,
            ndjson_ack: NdjsonAck::None,
            compression: Codec::None,
            key_field: None,
            timestamp_field: None,
            timestamp_unit: TimestampUnit::Ms,
            client_id_field: None,
            http_keep_headers: Vec::new(),
        }
    }
}

/// `ingest.ndjson_ack`: whether an NDJSON client is told what was stored.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NdjsonAck {
    /// The server writes nothing back; a clean close after the client's own close is
    /// the only signal (`docs/ndjson.md`).
    #[default]
    None,
    /// After every batch is durable the server writes one JSON line naming the last line
    /// it covers, and one error line per line it refused (`docs/ndjson.md`).
    Batch,
}

/// A configuration that cannot be used; the message names the key and, for syntax and
/// type errors, the line.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// TOML syntax, an unknown key, or a wrong type.
    #[error("{origin}: {message}")]
    Parse {
        /// The file or environment variable.
        origin: String,
        /// What is wrong, with key and line.
        message: String,
    },
    /// A value that parses but cannot work.
    #[error("{origin}: key `{key}`: {message}")]
    Invalid {
        /// The file.
        origin: String,
        /// The bad key.
        key: String,
        /// Why.
        message: String,
    },
}

fn line_of(text: &str, span: Option<std::ops::Range<usize>>) -> String {
    match span {
        Some(span) => {
            let line = text[..span.start.min(text.len())].matches('\n').count() + 1;
            format!("line {line}: ")
        }
        None => String::new(),
    }
}

/// Where each sink's table is in the text, found by a second pass over it that reads
/// nothing else.
#[derive(Deserialize)]
struct SinkSpans {
    #[serde(default)]
    pipelines: Vec<PipelineSpans>,
}

#[derive(Deserialize)]
struct PipelineSpans {
    #[serde(default)]
    sinks: Vec<toml::Spanned<toml::Table>>,
}

/// Where each source's table is in the text.
#[derive(Deserialize)]
struct SourceSpans {
    #[serde(default)]
    sources: Vec<toml::Spanned<toml::Table>>,
}

/// Checks each source's options as its type does, naming the source's line.
fn check_source_options(config: &Config, text: &str, origin: &str) -> Result<(), ConfigError> {
    for (i, s) in config.sources.iter().enumerate() {
        if let Err(e) = flowgate_connectors::sources::validate_configs(std::slice::from_ref(s)) {
            let spans = toml::from_str::<SourceSpans>(text).ok();
            let span = spans.as_ref().and_then(|x| Some(x.sources.get(i)?.span()));
            // The message names the source as the first of a list of one: name it here.
            let message = format!("{e:#}").replacen("source 1 ", &format!("source {} ", i + 1), 1);
            return Err(ConfigError::Parse {
                origin: origin.to_owned(),
                message: format!("{}{message}", line_of(text, span)),
            });
        }
    }
    Ok(())
}

/// Checks each sink's options as its type does, so that a misspelt option is reported
/// with its sink's line: the engine parses options only as a table (it knows no sink
/// type), and its own check names the sink but cannot name a line.
fn check_sink_options(config: &Config, text: &str, origin: &str) -> Result<(), ConfigError> {
    for (pi, p) in config.pipelines.iter().enumerate() {
        for (si, s) in p.sinks.iter().enumerate() {
            if let Err(e) = flowgate_connectors::Connectors::validate_config(s) {
                // The text is parsed again for spans only when there is an error to place.
                let spans = toml::from_str::<SinkSpans>(text).ok();
                let span = spans.as_ref().and_then(|x| Some(x.pipelines.get(pi)?.sinks.get(si)?.span()));
                return Err(ConfigError::Parse {
                    origin: origin.to_owned(),
                    message: format!(
                        "{}pipeline '{}': sink {} ('{}'): {e:#}",
                        line_of(text, span),
                        p.name,
                        si + 1,
                        s.name
                    ),
                });
            }
        }
    }
    Ok(())
}

impl Config {
    /// The embedded default.
    pub fn embedded_default() -> Config {
        Config::parse(DEFAULT_CONFIG, "embedded default").expect("the embedded default config is valid")
    }

    /// Reads a file, applies `FLOWGATE_*` overrides from the process environment, validates.
    pub fn load(path: Option<&std::path::Path>) -> Result<Config, ConfigError> {
        let (text, origin) = match path {
            Some(p) => (
                std::fs::read_to_string(p).map_err(|source| ConfigError::Read { path: p.into(), source })?,
                p.display().to_string(),
            ),
            None => (DEFAULT_CONFIG.to_owned(), "embedded default".to_owned()),
        };
        Config::parse_with_env(&text, &origin, std::env::vars())
    }

    /// Parses TOML text and validates it (no environment).
    pub fn parse(text: &str, origin: &str) -> Result<Config, ConfigError> {
        Config::parse_with_env(text, origin, std::iter::empty())
    }

    /// Parses TOML text, applies overrides from `env` (pairs of name and value; only
    /// names starting with `FLOWGATE_` and holding `__` count), and validates.
    pub fn parse_with_env(
        text: &str,
        origin: &str,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        // Parse as a document first: syntax errors then carry their line.
        let mut table: toml::Table = text.parse::<toml::Table>().map_err(|e| ConfigError::Parse {
            origin: origin.to_owned(),
            message: format!("{}{}", line_of(text, e.span()), e.message()),
        })?;
        let mut overridden = Vec::new();
        for (name, value) in env {
            let Some(path) = name.strip_prefix(ENV_PREFIX) else {
                continue;
            };
            let Some((section, key)) = path.split_once("__") else {
                continue;
            };
            let (section, key) = (section.to_ascii_lowercase(), key.to_ascii_lowercase());
            // A value that reads as a TOML literal (number, boolean) is one; else a string.
            let parsed = format!("v = {value}")
                .parse::<toml::Table>()
                .ok()
                .and_then(|mut t| t.remove("v"))
                .unwrap_or(toml::Value::String(value.clone()));
            let entry = table.entry(section.clone()).or_insert_with(|| toml::Value::Table(Default::default()));
            match entry {
                toml::Value::Table(t) => {
                    t.insert(key.clone(), parsed);
                }
                _ => {
                    return Err(ConfigError::Invalid { origin: name, key: section, message: "is not a section".into() })
                }
            }
            overridden.push(format!("{section}.{key}"));
        }
        let config: Config = if overridden.is_empty() {
            // Deserializing from the text keeps spans, so errors name the line.
            toml::from_str(text).map_err(|e| ConfigError::Parse {
                origin: origin.to_owned(),
                message: format!("{}{}", line_of(text, e.span()), e.message()),
            })?
        } else {
            Config::deserialize(toml::Value::Table(table)).map_err(|e| ConfigError::Parse {
                origin: format!("{origin} with environment overrides of {}", overridden.join(", ")),
                message: e.message().to_owned(),
            })?
        };
        if overridden.is_empty() {
            check_sink_options(&config, text, origin)?;
            check_source_options(&config, text, origin)?;
        }
        config.validate(origin)?;
        Ok(config)
    }

    /// Checks values that parse but cannot work.
    pub fn validate(&self, origin: &str) -> Result<(), ConfigError> {
        let bad = |key: &str, message: &str| ConfigError::Invalid {
            origin: origin.to_owned(),
            key: key.to_owned(),
            message: message.to_owned(),
        };
        // A day each at most: the deadline arithmetic must not overflow, and a longer
        // shutdown is no shutdown.
        if self.server.shutdown_grace_ms > 86_400_000 {
            return Err(bad("server.shutdown_grace_ms", "must be at most 86400000 (one day)"));
        }
        if self.server.shutdown_flush_ms > 86_400_000 {
            return Err(bad("server.shutdown_flush_ms", "must be at most 86400000 (one day)"));
        }
        if self.server.memory_limit_bytes != 0 {
            if self.server.memory_limit_bytes < MIN_MEMORY_LIMIT_BYTES {
                return Err(bad("server.memory_limit_bytes", "must be 0 (derived) or at least 16777216 (16 MiB)"));
            }
            if self.ingest.max_buffered_bytes as u64 > self.server.memory_limit_bytes {
                return Err(bad(
                    "ingest.max_buffered_bytes",
                    "must be at most server.memory_limit_bytes (ingest buffers are part of that budget)",
                ));
            }
        }
        if !(1..=100).contains(&self.server.memory_soft_percent) {
            return Err(bad("server.memory_soft_percent", "must be from 1 to 100"));
        }
        if self.log.segment_bytes < 1024 {
            return Err(bad("log.segment_bytes", "must be at least 1024"));
        }
        if self.log.segment_bytes > u64::from(u32::MAX) {
            return Err(bad("log.segment_bytes", "must be below 4 GiB (index positions are 32-bit)"));
        }
        if self.log.retention_check_ms < 100 {
            return Err(bad("log.retention_check_ms", "must be at least 100"));
        }
        if self.log.default_partitions == 0 {
            return Err(bad("log.default_partitions", "must be at least 1"));
        }
        if self.ingest.max_frame_bytes < 1024 {
            return Err(bad("ingest.max_frame_bytes", "must be at least 1024"));
        }
        if self.ingest.max_line_bytes == 0 {
            return Err(bad("ingest.max_line_bytes", "must be at least 1"));
        }
        if self.ingest.frame_timeout_secs == 0 {
            return Err(bad("ingest.frame_timeout_secs", "must be at least 1"));
        }
        if self.ingest.max_uncompressed_batch_bytes < 1024 {
            return Err(bad("ingest.max_uncompressed_batch_bytes", "must be at least 1024"));
        }
        if self.ingest.max_connections == 0 {
            return Err(bad("ingest.max_connections", "must be at least 1"));
        }
        if self.ingest.max_buffered_bytes < self.ingest.max_frame_bytes as usize {
            return Err(bad("ingest.max_buffered_bytes", "must be at least ingest.max_frame_bytes"));
        }
        if self.ingest.max_buffered_bytes < self.ingest.max_line_bytes {
            return Err(bad("ingest.max_buffered_bytes", "must be at least ingest.max_line_bytes"));
        }
        if flowgate_log::validate_topic_name(&self.ingest.ndjson_topic).is_err() {
            return Err(bad("ingest.ndjson_topic", "is not a valid topic name"));
        }
        crate::fields::IngestFields::from_config(&self.ingest).map_err(|(key, message)| bad(key, &message))?;
        flowgate_connectors::sources::validate_configs(&self.sources).map_err(|e| ConfigError::Invalid {
            origin: origin.to_owned(),
            key: "sources".into(),
            message: format!("{e:#}"),
        })?;
        crate::alerts::validate(&self.alerts, &self.alerting).map_err(|message| ConfigError::Invalid {
            origin: origin.to_owned(),
            key: "alerts".into(),
            message,
        })?;
        self.tracing.validate().map_err(|(key, message)| bad(key, &message))?;
        self.validate_pipelines(origin)
    }

    /// The same config with each sink's and source's options completed by its type's defaults (what
    /// the sinks run with); a sink whose options do not parse is left as written.
    pub fn with_sink_defaults(mut self) -> Config {
        for sink in self.pipelines.iter_mut().flat_map(|p| p.sinks.iter_mut()) {
            if let Ok(full) = flowgate_connectors::Connectors::complete_config(sink) {
                *sink = full;
            }
        }
        for source in &mut self.sources {
            if let Ok(full) = flowgate_connectors::sources::complete_config(source) {
                *source = full;
            }
        }
        self
    }

    /// Checks every pipeline: processors compile (VRL), sinks are well formed, names unique.
    pub fn validate_pipelines(&self, origin: &str) -> Result<(), ConfigError> {
        struct Checker<'a>(&'a std::path::Path);
        impl flowgate_engine::SinkFactory for Checker<'_> {
            fn validate(&self, config: &flowgate_engine::config::SinkConfig) -> anyhow::Result<()> {
                flowgate_connectors::Connectors::validate_config(config)
            }
            fn output_claim(&self, config: &flowgate_engine::config::SinkConfig) -> Option<String> {
                flowgate_connectors::Connectors::output_claim_in(self.0, config)
            }
            fn build(
                &self,
                _: &flowgate_engine::config::SinkConfig,
                _: &flowgate_engine::SinkPlace,
            ) -> anyhow::Result<Box<dyn flowgate_engine::Sink>> {
                anyhow::bail!("validation only")
            }
        }
        flowgate_engine::validate(&self.pipelines, &Checker(&self.server.data_dir)).map_err(|e| ConfigError::Invalid {
            origin: origin.to_owned(),
            key: "pipelines".into(),
            message: format!("{e:#}"),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_default_is_valid_and_matches_the_contract() {
        let c = Config::embedded_default();
        assert_eq!(c.ingest.binary_addr.to_string(), "127.0.0.1:7070");
        assert_eq!(c.ingest.http_addr.to_string(), "127.0.0.1:7071");
        assert_eq!(c.ingest.ndjson_addr.to_string(), "127.0.0.1:7072");
        assert_eq!(c.server.data_dir, PathBuf::from("./flowgate-data"));
        assert_eq!(c.log.fsync, flowgate_log::FsyncPolicy::Interval);
    }

    #[test]
    fn sources_are_checked_by_their_type_with_their_line() {
        let ok = "[[sources]]\nname = \"pg\"\ntype = \"postgres_cdc\"\nurl = \"postgres://u@h/db\"\n\
                  tables = [\"public.orders\"]\ntopic_prefix = \"cdc\"\n";
        let c = Config::parse(ok, "f.toml").unwrap();
        assert_eq!(c.sources[0].kind, "postgres_cdc");
        let full = c.with_sink_defaults();
        assert_eq!(full.sources[0].options["slot"], "flowgate");
        let err = Config::parse(&format!("[log]\nfsync = \"always\"\n\n{ok}slots = \"x\"\n"), "f.toml")
            .unwrap_err()
            .to_string();
        assert!(err.contains("line 4") && err.contains("unknown field `slots`") && err.contains("'pg'"), "{err}");
        let err = Config::parse("[[sources]]\nname = \"x\"\ntype = \"mysql\"\n", "f.toml").unwrap_err().to_string();
        assert!(err.contains("unknown source type 'mysql'"), "{err}");
    }

    #[test]
    fn errors_name_the_key_and_line() {
        let err = Config::parse("[log]\nfsync = \"always\"\nsegmnt_bytes = 5\n", "f.toml").unwrap_err().to_string();
        assert!(err.contains("segmnt_bytes") && err.contains("line 3"), "{err}");
        let err = Config::parse("[log]\nfsync = \"sometimes\"\n", "f.toml").unwrap_err().to_string();
        assert!(err.contains("line 2") && err.contains("sometimes"), "{err}");
        let err = Config::parse("[log]\nsegment_bytes = 10\n", "f.toml").unwrap_err().to_string();
        assert!(err.contains("log.segment_bytes"), "{err}");
        let err = Config::parse("[log\n", "f.toml").unwrap_err().to_string();
        assert!(err.contains("line 1"), "{err}");
    }

    const PIPELINE: &str = "[[pipelines]]\nname = \"p\"\ntopics = [\"in\"]\n\n[[pipelines.sinks]]\nname = \"out\"\n";

    #[test]
    fn sink_options_are_checked_by_their_type_and_errors_name_pipeline_sink_and_key() {
        let ok = format!("{PIPELINE}type = \"file\"\npath = \"out\"\nbatch = {{ max_events = 5 }}\n");
        let c = Config::parse(&ok, "f.toml").unwrap();
        assert_eq!(c.pipelines[0].sinks[0].batch.max_events, 5);
        let err = Config::parse(&format!("{ok}rotate_byte = 4096\n"), "f.toml").unwrap_err().to_string();
        assert!(
            err.contains("pipeline 'p'") && err.contains("'out'") && err.contains("unknown field `rotate_byte`"),
            "{err}"
        );
        assert!(err.contains("line 5") || err.contains("line 6"), "the sink's table is named: {err}");
        let err = Config::parse(&format!("{PIPELINE}type = \"files\"\n"), "f.toml").unwrap_err().to_string();
        assert!(err.contains("unknown sink type 'files'") && err.contains("file, http"), "{err}");
        let err = Config::parse(&format!("{PIPELINE}type = \"file\"\n"), "f.toml").unwrap_err().to_string();
        assert!(err.contains("missing field `path`"), "{err}");
    }

    #[test]
    fn sink_defaults_are_filled_in_and_the_result_parses_again() {
        let text = format!("{PIPELINE}type = \"http\"\nurl = \"http://127.0.0.1:9/x\"\n");
        let c = Config::parse(&text, "f.toml").unwrap().with_sink_defaults();
        let options = &c.pipelines[0].sinks[0].options;
        assert_eq!(
            (&options["method"], &options["timeout_ms"]),
            (&serde_json::json!("POST"), &serde_json::json!(30_000))
        );
        let printed = toml::to_string_pretty(&c).unwrap();
        let again = Config::parse(&printed, "printed").unwrap();
        assert_eq!(&again.pipelines[0].sinks[0].options, options);
    }

    #[test]
    fn memory_settings_are_checked() {
        let c = Config::embedded_default();
        assert_eq!((c.server.memory_limit_bytes, c.server.memory_soft_percent), (0, 80));
        assert_eq!(c.server.memory_policy, MemoryPolicy::Block);
        let ok = "[server]\nmemory_limit_bytes = 134217728\nmemory_policy = \"reject\"\n[ingest]\nmax_buffered_bytes = 33554432\n";
        let c = Config::parse(ok, "f.toml").unwrap();
        assert_eq!((c.server.memory_limit_bytes, c.server.memory_policy), (128 << 20, MemoryPolicy::Reject));
        for (text, key) in [
            ("[server]\nmemory_limit_bytes = 1000\n", "server.memory_limit_bytes"),
            ("[server]\nmemory_limit_bytes = 67108864\n", "ingest.max_buffered_bytes"),
            ("[server]\nmemory_soft_percent = 0\n", "server.memory_soft_percent"),
            ("[server]\nmemory_soft_percent = 101\n", "server.memory_soft_percent"),
        ] {
            let err = Config::parse(text, "f.toml").unwrap_err().to_string();
            assert!(err.contains(key), "{text}: {err}");
        }
        let err = Config::parse("[server]\nmemory_policy = \"drop\"\n", "f.toml").unwrap_err().to_string();
        assert!(err.contains("line 2") && err.contains("drop"), "{err}");
        let err = Config::parse("[server]\nmemory_soft_percent = 300\n", "f.toml").unwrap_err().to_string();
        assert!(err.contains("line 2"), "{err}");
    }

    #[test]
    fn event_fields_are_read_checked_and_printed() {
        let c = Config::embedded_default();
        assert_eq!((c.ingest.key_field.as_deref(), c.ingest.timestamp_unit), (None, TimestampUnit::Ms));
        let text = "[ingest]\nkey_field = \"device.id\"\ntimestamp_field = \"ts\"\ntimestamp_unit = \"µs\"\n\
                    client_id_field = \"id\"\nhttp_keep_headers = [\"X-Request-Id\"]\n";
        let c = Config::parse(text, "f.toml").unwrap();
        assert_eq!(c.ingest.timestamp_unit, TimestampUnit::Us);
        let printed = toml::to_string_pretty(&c).unwrap();
        assert!(
            printed.contains("timestamp_unit = \"us\"") && printed.contains("key_field = \"device.id\""),
            "{printed}"
        );
        assert_eq!(Config::parse(&printed, "printed").unwrap().ingest.client_id_field.as_deref(), Some("id"));
        let err = Config::parse("[ingest]\ntimestamp_unit = \"seconds\"\n", "f.toml").unwrap_err().to_string();
        assert!(err.contains("line 2") && err.contains("'seconds'") && err.contains("rfc3339"), "{err}");
        let err = Config::parse("[ingest]\nkey_field = \"a.\"\n", "f.toml").unwrap_err().to_string();
        assert!(err.contains("ingest.key_field") && err.contains("`a.`"), "{err}");
        let env = vec![("FLOWGATE_INGEST__HTTP_KEEP_HEADERS".to_owned(), "[\"x-a\", \"X-A\"]".to_owned())];
        let err = Config::parse_with_env(DEFAULT_CONFIG, "default", env).unwrap_err().to_string();
        assert!(err.contains("ingest.http_keep_headers") && err.contains("twice"), "{err}");
    }

    #[test]
    fn tracing_is_off_by_default_and_set_by_file_or_environment() {
        let c = Config::embedded_default();
        assert_eq!((c.tracing.endpoint(), c.tracing.sample_ratio), (None, 1.0));
        assert_eq!(c.tracing.service_name, "flowgate");
        let env = vec![
            ("FLOWGATE_TRACING__OTLP_ENDPOINT".to_owned(), "http://127.0.0.1:4318/v1/traces".to_owned()),
            ("FLOWGATE_TRACING__SAMPLE_RATIO".to_owned(), "0.25".to_owned()),
        ];
        let c = Config::parse_with_env(DEFAULT_CONFIG, "default", env).unwrap();
        assert_eq!((c.tracing.endpoint(), c.tracing.sample_ratio), (Some("http://127.0.0.1:4318/v1/traces"), 0.25));
        let env = vec![("FLOWGATE_TRACING__SAMPLE_RATIO".to_owned(), "1".to_owned())];
        assert_eq!(Config::parse_with_env(DEFAULT_CONFIG, "default", env).unwrap().tracing.sample_ratio, 1.0);
        let err = Config::parse("[tracing]\nsample_ratio = 2\n", "f.toml").unwrap_err().to_string();
        assert!(err.contains("tracing.sample_ratio") && err.contains("from 0 to 1"), "{err}");
        let err = Config::parse("[tracing]\nsample_rate = 0.5\n", "f.toml").unwrap_err().to_string();
        assert!(err.contains("line 2") && err.contains("sample_rate"), "{err}");
        let err = Config::parse("[tracing]\notlp_endpoint = \"localhost:4318\"\n", "f.toml").unwrap_err().to_string();
        assert!(err.contains("tracing.otlp_endpoint"), "{err}");
        let text = "[tracing]\notlp_endpoint = \"https://otel.example/v1/traces\"\n\
                    [tracing.otlp_headers]\nx-api-key = \"k\"\n";
        let c = Config::parse(text, "f.toml").unwrap();
        let printed = toml::to_string_pretty(&c).unwrap();
        assert!(printed.contains("[tracing]") && printed.contains("x-api-key"), "{printed}");
        assert_eq!(Config::parse(&printed, "printed").unwrap().tracing.otlp_headers["x-api-key"], "k");
    }

    #[test]
    fn environment_overrides_keys() {
        let env = vec![
            ("FLOWGATE_LOG__FSYNC".to_owned(), "always".to_owned()),
            ("FLOWGATE_LOG__DEFAULT_PARTITIONS".to_owned(), "4".to_owned()),
            ("FLOWGATE_SERVER__DATA_DIR".to_owned(), "/tmp/x".to_owned()),
            ("UNRELATED".to_owned(), "1".to_owned()),
        ];
        let c = Config::parse_with_env(DEFAULT_CONFIG, "default", env).unwrap();
        assert_eq!(c.log.fsync, flowgate_log::FsyncPolicy::Always);
        assert_eq!(c.log.default_partitions, 4);
        assert_eq!(c.server.data_dir, PathBuf::from("/tmp/x"));
        let env = vec![("FLOWGATE_LOG__NO_SUCH_KEY".to_owned(), "1".to_owned())];
        let err = Config::parse_with_env(DEFAULT_CONFIG, "default", env).unwrap_err().to_string();
        assert!(err.contains("no_such_key") && err.contains("log.no_such_key"), "{err}");
    }
}
