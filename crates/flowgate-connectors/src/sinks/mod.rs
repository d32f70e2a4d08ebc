//! Sinks, one module each, and the factory the engine builds them with.
//!
//! Each sink module owns its options (a serde struct refusing unknown keys), their
//! checks and docs, and implements [`SinkConnector`]; [`SINKS`] lists them. Adding a
//! sink type is a new module and one line there: the engine's config, `flowgate
//! validate` and the server know sinks only as `type` plus options.

mod blackhole;
mod file;
mod http;
pub(crate) mod postgres;
mod registry;
mod resume;
mod stdout;
mod tcp;
mod topic;

use std::path::{Component, Path, PathBuf};

use flowgate_engine::config::SinkConfig;
use flowgate_engine::{Sink, SinkFactory, SinkPlace};
use flowgate_log::Log;

pub use blackhole::{BlackholeConfig, BlackholeSink};
pub use file::{FileConfig, FileSink};
pub use http::{HttpAuth, HttpConfig, HttpCredentials, HttpEncoding, HttpSink, HttpSinkSettings, HttpTls};
pub use postgres::{PostgresConfig, PostgresMode, PostgresSink, PostgresTls};
pub use registry::{BuildContext, Registration, SinkConnector};
pub use stdout::{StdoutConfig, StdoutSink};
pub use tcp::{TcpConfig, TcpSink, TcpSinkSettings};
pub use topic::{TopicConfig, TopicSink};

/// Every sink type. A plain list rather than link-time registration (`inventory`):
/// the compiler sees every entry, nothing depends on the linker keeping a module's
/// constructors, and the order of the types in messages is fixed.
pub static SINKS: &[Registration] = &[
    Registration::of::<BlackholeSink>(),
    Registration::of::<FileSink>(),
    Registration::of::<HttpSink>(),
    Registration::of::<PostgresSink>(),
    Registration::of::<StdoutSink>(),
    Registration::of::<TcpSink>(),
    Registration::of::<TopicSink>(),
];

/// The registration of sink type `kind`; the error lists the known types.
pub fn registration(kind: &str) -> anyhow::Result<&'static Registration> {
    SINKS.iter().find(|r| r.kind == kind).ok_or_else(|| {
        let known: Vec<&str> = SINKS.iter().map(|r| r.kind).collect();
        anyhow::anyhow!("unknown sink type '{kind}'; the sink types are {}", known.join(", "))
    })
}

/// Builds sinks for pipelines of one engine.
#[derive(Clone, Debug)]
pub struct Connectors {
    log: Log,
    data_dir: PathBuf,
}

impl Connectors {
    /// Sinks writing into `log` (topic sink) and under `data_dir` (relative file paths).
    pub fn new(log: Log, data_dir: PathBuf) -> Connectors {
        Connectors { log, data_dir }
    }
}

/// The largest `batch.max_bytes` a sink accepts: a sink batch must fit a log batch.
const MAX_SINK_BATCH_BYTES: usize = 64 << 20;

impl Connectors {
    /// Checks a sink config without an engine (for `flowgate validate`): its type is
    /// known, its options are that type's and well formed, its batching fits.
    pub fn validate_config(config: &SinkConfig) -> anyhow::Result<()> {
        registration(&config.kind)?.validate(config)?;
        anyhow::ensure!(config.batch.max_events > 0, "`batch.max_events` must be positive");
        // `min_events` bounds only the adaptive target; a fixed `max_events` below its
        // default is a plain small batch.
        anyhow::ensure!(
            !config.batch.adaptive || config.batch.min_events <= config.batch.max_events,
            "`batch.min_events` exceeds `batch.max_events` with `adaptive = true`"
        );
        anyhow::ensure!(
            config.batch.max_bytes <= MAX_SINK_BATCH_BYTES,
            "`batch.max_bytes` must be at most {MAX_SINK_BATCH_BYTES} (64 MiB)"
        );
        Ok(())
    }

    /// The output a sink claims for itself, with relative paths under `data_dir` (see
    /// [`SinkFactory::output_claim`]), as its type says; `None` for an unknown type.
    pub fn output_claim_in(data_dir: &Path, config: &SinkConfig) -> Option<String> {
        registration(&config.kind).ok()?.output_claim(config, data_dir)
    }

    /// `config` with every option its type defaults filled in: what the sink runs with
    /// (for `flowgate config`).
    pub fn complete_config(config: &SinkConfig) -> anyhow::Result<SinkConfig> {
        let options = registration(&config.kind)?.complete(config)?;
        Ok(SinkConfig { options, ..config.clone() })
    }
}

/// `path` with `.` and `..` resolved lexically (the directory may not exist yet).
fn normalize(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => {
                if !out.pop() {
                    out.push("..");
                }
            }
            other => out.push(other),
        }
    }
    out
}

impl SinkFactory for Connectors {
    fn validate(&self, config: &SinkConfig) -> anyhow::Result<()> {
        Connectors::validate_config(config)
    }

    fn output_claim(&self, config: &SinkConfig) -> Option<String> {
        Connectors::output_claim_in(&self.data_dir, config)
    }

    fn remote(&self, config: &SinkConfig) -> bool {
        registration(&config.kind).is_ok_and(|r| r.remote)
    }

    fn build(&self, config: &SinkConfig, place: &SinkPlace) -> anyhow::Result<Box<dyn Sink>> {
        let cx = BuildContext { log: &self.log, data_dir: &self.data_dir, sink: config, place };
        registration(&config.kind)?.build(config, &cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sink(toml: &str) -> SinkConfig {
        toml::from_str(toml).unwrap()
    }

    #[test]
    fn one_directory_is_one_claim_however_it_is_spelt() {
        let data = Path::new("/data");
        let claim = |p: &str| {
            let config = SinkConfig::new("s", "file", serde_json::json!({ "path": p }));
            Connectors::output_claim_in(data, &config).unwrap()
        };
        assert_eq!(claim("out"), claim("./out/"));
        assert_eq!(claim("out"), claim("/data/out"));
        assert_eq!(claim("out"), claim("x/../out"));
        assert_ne!(claim("out"), claim("out2"));
        let topic = SinkConfig::new("t", "topic", serde_json::json!({ "topic": "t" }));
        assert_eq!(Connectors::output_claim_in(data, &topic), None);
    }

    #[test]
    fn every_type_is_registered_once() {
        let mut kinds: Vec<&str> = SINKS.iter().map(|r| r.kind).collect();
        kinds.sort_unstable();
        kinds.dedup();
        assert_eq!(kinds.len(), SINKS.len());
    }

    #[test]
    fn an_unknown_type_is_refused_with_the_known_ones() {
        let e = Connectors::validate_config(&sink("name = \"s\"\ntype = \"kafka\"")).unwrap_err().to_string();
        assert!(e.contains("'kafka'"), "{e}");
        for r in SINKS {
            assert!(e.contains(r.kind), "{e}");
        }
    }

    #[test]
    fn a_misspelt_option_is_refused_by_name_and_shared_keys_are_not_options() {
        let e = Connectors::validate_config(&sink("name = \"s\"\ntype = \"file\"\npath = \"out\"\nrotate_byte = 4096"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown field `rotate_byte`") && e.contains("rotate_bytes"), "{e}");
        let e =
            Connectors::validate_config(&sink("name = \"s\"\ntype = \"stdout\"\nlevel = 1")).unwrap_err().to_string();
        assert!(e.contains("unknown field `level`"), "{e}");
        let c = sink(
            "name = \"s\"\ntype = \"topic\"\ntopic = \"t\"\nbatch = { max_events = 7 }\nretry = { max_attempts = 3 }\n\
             breaker = { consecutive_failures = 0 }",
        );
        assert_eq!((c.batch.max_events, c.retry.max_attempts, c.breaker.consecutive_failures), (7, 3, 0));
        assert_eq!(c.options.keys().collect::<Vec<_>>(), ["topic"]);
        Connectors::validate_config(&c).unwrap();
    }

    #[test]
    fn the_complete_config_holds_the_defaults_and_parses_again() {
        let c = sink("name = \"s\"\ntype = \"file\"\npath = \"out\"");
        let full = Connectors::complete_config(&c).unwrap();
        assert_eq!(full.options["rotate_bytes"], 128 << 20);
        assert_eq!(full.options["compression"], "none");
        let text = toml::to_string(&full).unwrap();
        let again: SinkConfig = toml::from_str(&text).unwrap();
        assert_eq!(again.options, full.options);
        for text in [
            "name = \"h\"\ntype = \"http\"\nurl = \"http://127.0.0.1:1/\"",
            "name = \"t\"\ntype = \"tcp\"\naddr = \"127.0.0.1:1\"\ntopic = \"t\"",
            "name = \"o\"\ntype = \"stdout\"",
            "name = \"b\"\ntype = \"blackhole\"",
            "name = \"t\"\ntype = \"topic\"\ntopic = \"t\"",
            "name = \"p\"\ntype = \"postgres\"\nurl = \"postgres://u@h/db\"\ntable = \"t\"\nmode = \"cdc\"",
        ] {
            let full = Connectors::complete_config(&sink(text)).unwrap();
            let printed = toml::to_string(&full).unwrap();
            Connectors::validate_config(&toml::from_str(&printed).unwrap()).unwrap();
        }
    }
}
