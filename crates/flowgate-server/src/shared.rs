//! State shared by every listener of one engine.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::budget::Charge;
use crate::config::IngestConfig;
use crate::ingest::Ingest;

/// Everything a connection handler needs.
#[derive(Debug)]
pub struct Shared {
    /// The append path.
    pub ingest: Ingest,
    /// Listener settings.
    pub config: IngestConfig,
    /// The fields NDJSON and HTTP events' keys, times and client ids are read from, and
    /// the HTTP headers kept (parsed from `config`).
    pub fields: crate::fields::IngestFields,
    /// One permit per open connection, across listeners.
    pub connections: Arc<Semaphore>,
    /// One permit per byte of ingest buffer beyond each connection's small base buffer.
    pub buffer_budget: Arc<Semaphore>,
    /// Cancelled when the engine begins shutting down.
    pub shutdown: CancellationToken,
    /// Connection tasks, so shutdown can wait for them to drain.
    pub tasks: TaskTracker,
    /// False while starting and once shutting down.
    pub ready: AtomicBool,
    /// When the engine started.
    pub started: Instant,
    /// Rate limit for logging bad client input.
    pub bad_input_log: RateLimit,
    /// Health of the pipeline workers, once pipelines have started.
    pub pipelines: std::sync::OnceLock<flowgate_engine::PipelineHealth>,
    /// The configured pipelines (their processors and sinks, for the dashboard's graph);
    /// a reload replaces them.
    pub pipeline_configs: parking_lot::RwLock<Vec<flowgate_engine::PipelineConfig>>,
    /// The configured sources (the topics they write, for the dashboard's graph).
    pub source_configs: parking_lot::RwLock<Vec<flowgate_connectors::sources::SourceConfig>>,
    /// The process's memory budget.
    pub memory: flowgate_memory::MemoryGovernor,
    /// What producers meet at the memory limit.
    pub memory_policy: crate::config::MemoryPolicy,
    /// The status of each running source.
    pub sources: parking_lot::RwLock<Vec<Arc<flowgate_connectors::sources::SourceStatus>>>,
    /// The stats document of each second, built once for every stream at the default
    /// interval (started by the first such stream).
    pub stats_feed: std::sync::OnceLock<tokio::sync::watch::Receiver<bytes::Bytes>>,
    /// The alert rules and their states.
    pub alerts: std::sync::OnceLock<Arc<crate::alerts::Alerts>>,
    /// What a config reload changes, and where the config is read from.
    pub reloader: crate::reload::Reloader,
    /// Replays dead letters into the pipelines, once they have started.
    pub replayer: std::sync::OnceLock<Arc<flowgate_engine::runtime::replay::Replayer>>,
}

impl Shared {
    /// The idle timeout.
    pub fn idle_timeout(&self) -> Duration {
        Duration::from_secs(self.config.idle_timeout_secs.max(1))
    }

    /// How long one frame, NDJSON line or HTTP body may take to arrive.
    pub fn frame_timeout(&self) -> Duration {
        Duration::from_secs(self.config.frame_timeout_secs.max(1))
    }

    /// A new, empty charge against the ingest buffer budget.
    pub fn charge(&self) -> Charge {
        Charge::new(
            self.buffer_budget.clone(),
            self.config.max_buffered_bytes.min(Semaphore::MAX_PERMITS),
            self.ingest.metrics().buffered_bytes().clone(),
            self.memory.empty(flowgate_memory::Component::Ingest),
        )
    }

    /// True when serving.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    /// Why the engine is not ready, empty when it is: starting or stopping, or pipeline
    /// workers that failed and have not run since.
    pub fn not_ready_reasons(&self) -> Vec<String> {
        let mut reasons = Vec::new();
        if !self.is_ready() {
            reasons.push("the engine is starting or shutting down".to_owned());
        }
        if let Some(health) = self.pipelines.get() {
            for w in health.failing() {
                reasons.push(format!(
                    "pipeline '{}' on {}-{} failed {} time(s) and is restarting: {}",
                    w.pipeline,
                    w.topic,
                    w.partition,
                    w.restarts,
                    w.last_error.as_deref().unwrap_or("unknown error")
                ));
            }
        }
        reasons.extend(self.sources.read().iter().filter_map(|s| s.down_reason()));
        reasons
    }
}

/// Lets a message through at most once per period and counts the rest, so a flood of
/// bad input cannot flood the log.
#[derive(Debug)]
pub struct RateLimit {
    period: Duration,
    state: Mutex<(Option<Instant>, u64)>,
}

impl RateLimit {
    /// At most one message per `period`.
    pub fn new(period: Duration) -> RateLimit {
        RateLimit { period, state: Mutex::new((None, 0)) }
    }

    /// `Some(suppressed since the last one)` when a message may be logged now.
    pub fn allow(&self) -> Option<u64> {
        let mut state = self.state.lock();
        let now = Instant::now();
        match state.0 {
            Some(last) if now.duration_since(last) < self.period => {
                state.1 += 1;
                None
            }
            _ => {
                let suppressed = state.1;
                *state = (Some(now), 0);
                Some(suppressed)
            }
        }
    }
}

/// Logs a warning about bad client input, rate-limited.
pub fn warn_bad_input(shared: &Arc<Shared>, path: &str, peer: &str, what: &str) {
    if let Some(suppressed) = shared.bad_input_log.allow() {
        tracing::warn!(path, peer, suppressed, "rejected input: {what}");
    }
}
