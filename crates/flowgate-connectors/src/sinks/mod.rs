//! Sinks, one module each, and the factory the engine builds them with.

mod blackhole;
mod file;
mod http;
mod resume;
mod stdout;
mod tcp;
mod topic;

use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use flowgate_engine::config::{SinkConfig, SinkKind};
use flowgate_engine::{Sink, SinkFactory, SinkPlace};
use flowgate_log::Log;

pub use blackhole::BlackholeSink;
pub use file::FileSink;
pub use http::{HttpCredentials, HttpEncoding, HttpSink, HttpSinkSettings};
pub use stdout::StdoutSink;
pub use tcp::{TcpSink, TcpSinkSettings};
pub use topic::TopicSink;

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
    /// Checks a sink config without an engine (for `flowgate validate`).
    pub fn validate_config(config: &SinkConfig) -> anyhow::Result<()> {
        match &config.kind {
            SinkKind::File { path, rotate_bytes, compression, .. } => {
                anyhow::ensure!(!path.is_empty(), "`path` is empty");
                anyhow::ensure!(*rotate_bytes >= 1024, "`rotate_bytes` must be at least 1024");
                anyhow::ensure!(matches!(compression.as_str(), "none" | "zstd"), "`compression` must be none or zstd");
            }
            SinkKind::Topic { topic } => flowgate_log::validate_topic_name(topic)?,
            SinkKind::Tcp { addr, topic, connect_timeout_ms, request_timeout_ms } => {
                anyhow::ensure!(addr.contains(':'), "`addr` must be host:port");
                flowgate_log::validate_topic_name(topic)?;
                for (key, ms) in
                    [("connect_timeout_ms", connect_timeout_ms), ("request_timeout_ms", request_timeout_ms)]
                {
                    anyhow::ensure!((1..=3_600_000).contains(ms), "`{key}` must be between 1 and 3600000 (one hour)");
                }
            }
            SinkKind::Http { .. } => {
                HttpSinkSettings::from_config(&config.kind)?;
            }
            SinkKind::Stdout | SinkKind::Blackhole => {}
        }
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
    /// [`SinkFactory::output_claim`]): a file sink's directory, normalized so that
    /// `out`, `./out/` and `<data_dir>/out` are one claim. Other sinks claim nothing:
    /// topics and remote engines take writers side by side.
    pub fn output_claim_in(data_dir: &Path, config: &SinkConfig) -> Option<String> {
        match &config.kind {
            SinkKind::File { path, .. } => Some(format!("directory {}", normalize(&data_dir.join(path)).display())),
            _ => None,
        }
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
        matches!(config.kind, SinkKind::Http { .. } | SinkKind::Tcp { .. })
    }

    fn build(&self, config: &SinkConfig, place: &SinkPlace) -> anyhow::Result<Box<dyn Sink>> {
        Ok(match &config.kind {
            SinkKind::File { path, rotate_bytes, rotate_ms, compression } => {
                let dir = self.data_dir.join(path);
                Box::new(FileSink::new(dir, place, *rotate_bytes, *rotate_ms, compression == "zstd")?)
            }
            SinkKind::Topic { topic } => Box::new(TopicSink::new(self.log.clone(), topic, &config.name)),
            SinkKind::Stdout => Box::new(StdoutSink),
            SinkKind::Tcp { addr, topic, connect_timeout_ms, request_timeout_ms } => {
                let settings = TcpSinkSettings {
                    addr: addr.clone(),
                    topic: topic.clone(),
                    connect_timeout: Duration::from_millis(*connect_timeout_ms),
                    request_timeout: Duration::from_millis(*request_timeout_ms),
                };
                Box::new(TcpSink::new(settings, place, &config.name))
            }
            SinkKind::Http { .. } => {
                Box::new(HttpSink::new(HttpSinkSettings::from_config(&config.kind)?, place, &config.name)?)
            }
            SinkKind::Blackhole => Box::new(BlackholeSink),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file_sink(name: &str, path: &str) -> SinkConfig {
        SinkConfig {
            name: name.into(),
            kind: SinkKind::File { path: path.into(), rotate_bytes: 1 << 20, rotate_ms: 0, compression: "none".into() },
            batch: Default::default(),
            retry: Default::default(),
            breaker: Default::default(),
            concurrency: Default::default(),
        }
    }

    #[test]
    fn one_directory_is_one_claim_however_it_is_spelt() {
        let data = Path::new("/data");
        let claim = |p: &str| Connectors::output_claim_in(data, &file_sink("s", p)).unwrap();
        assert_eq!(claim("out"), claim("./out/"));
        assert_eq!(claim("out"), claim("/data/out"));
        assert_eq!(claim("out"), claim("x/../out"));
        assert_ne!(claim("out"), claim("out2"));
        let topic = SinkConfig {
            name: "t".into(),
            kind: SinkKind::Topic { topic: "t".into() },
            batch: Default::default(),
            retry: Default::default(),
            breaker: Default::default(),
            concurrency: Default::default(),
        };
        assert_eq!(Connectors::output_claim_in(data, &topic), None);
    }
}
