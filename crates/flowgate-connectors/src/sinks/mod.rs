//! Sinks, one module each, and the factory the engine builds them with.

mod blackhole;
mod file;
mod stdout;
mod tcp;
mod topic;

use std::path::PathBuf;

use flowgate_engine::config::{SinkConfig, SinkKind};
use flowgate_engine::{Sink, SinkFactory, SinkPlace};
use flowgate_log::Log;

pub use blackhole::BlackholeSink;
pub use file::FileSink;
pub use stdout::StdoutSink;
pub use tcp::TcpSink;
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
            SinkKind::Tcp { addr, topic } => {
                anyhow::ensure!(addr.contains(':'), "`addr` must be host:port");
                flowgate_log::validate_topic_name(topic)?;
            }
            SinkKind::Stdout | SinkKind::Blackhole => {}
        }
        anyhow::ensure!(config.batch.max_events > 0, "`batch.max_events` must be positive");
        anyhow::ensure!(
            config.batch.min_events <= config.batch.max_events,
            "`batch.min_events` exceeds `batch.max_events`"
        );
        Ok(())
    }
}

impl Connectors {
    /// What a sink writes to exclusively, for an engine whose data directory is
    /// `data_dir` (see [`SinkFactory::output_claim`]): a file sink claims its directory.
    pub fn output_claim_in(data_dir: &std::path::Path, config: &SinkConfig) -> Option<String> {
        match &config.kind {
            SinkKind::File { path, .. } => {
                // Lexically normal, so `out`, `./out` and `out/` are one claim.
                let mut dir = PathBuf::new();
                for part in data_dir.join(path).components() {
                    match part {
                        std::path::Component::CurDir => {}
                        std::path::Component::ParentDir => {
                            dir.pop();
                        }
                        other => dir.push(other),
                    }
                }
                Some(format!("file directory {}", dir.display()))
            }
            SinkKind::Topic { .. } | SinkKind::Stdout | SinkKind::Tcp { .. } | SinkKind::Blackhole => None,
        }
    }
}

impl SinkFactory for Connectors {
    fn validate(&self, config: &SinkConfig) -> anyhow::Result<()> {
        Connectors::validate_config(config)
    }

    fn output_claim(&self, config: &SinkConfig) -> Option<String> {
        Connectors::output_claim_in(&self.data_dir, config)
    }

    fn build(&self, config: &SinkConfig, place: &SinkPlace) -> anyhow::Result<Box<dyn Sink>> {
        Ok(match &config.kind {
            SinkKind::File { path, rotate_bytes, rotate_ms, compression } => {
                let dir = self.data_dir.join(path);
                Box::new(FileSink::new(dir, place, *rotate_bytes, *rotate_ms, compression == "zstd")?)
            }
            SinkKind::Topic { topic } => Box::new(TopicSink::new(self.log.clone(), topic)),
            SinkKind::Stdout => Box::new(StdoutSink),
            SinkKind::Tcp { addr, topic } => Box::new(TcpSink::new(addr, topic)),
            SinkKind::Blackhole => Box::new(BlackholeSink),
        })
    }
}
