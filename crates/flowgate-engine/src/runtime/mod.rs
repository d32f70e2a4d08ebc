//! Running pipelines.
//!
//! Each (pipeline, source partition) is one worker task: it reads batches from the log,
//! runs them through its own processor instances, and hands them to one task per sink
//! over a bounded queue. Every `commit_interval_ms` the worker asks each sink to flush
//! and commit, waits for all of them, and checkpoints the offset together with the
//! processors' and sinks' state — an aligned checkpoint, so a restart replays from a
//! consistent point: at-least-once for every sink, exactly-once for a file sink (it
//! truncates to its checkpointed length) and for duplicates a dedup processor removes.
//!
//! A slow sink fills its queue, which stops the worker reading the log: memory stays
//! bounded and ingest is untouched (the log is the buffer). What a worker holds is
//! charged to the process's memory budget ([`memory`]); at the limit it stops reading
//! too.

mod breaker;
mod changes;
mod commit;
pub mod control;
mod controller;
pub mod dead_letters;
mod decode;
#[cfg(all(feature = "failpoints", debug_assertions))]
mod failpoints;
mod fan_out;
mod lease;
mod memory;
mod pipelines;
mod processor_states;
mod quarantine;
pub mod replay;
pub mod replay_marks;
pub mod replay_record;
mod replay_worker;
mod side_outputs;
mod sink_driver;
mod sink_status;
pub mod status;
mod supervisor;
mod worker;

use std::path::PathBuf;
use std::sync::Arc;

use flowgate_log::Log;

use crate::config::PipelineConfig;
use crate::metrics::PipelineMetrics;
use crate::processors;
use crate::sink::SinkFactory;
pub use changes::Changes;
pub use control::{ControlError, ControlReport, ProcessorStateChoice, ResetTo, Rewound};
pub use controller::{ControllerStatus, SinkControllers};
pub use pipelines::Pipelines;
pub use sink_status::{SinkStatus, SinkStatuses};
pub use supervisor::{PipelineHealth, SinkQueue, WorkerState, WorkerStatus};

/// Sinks one pipeline may have: route masks are 64-bit.
pub const MAX_SINKS: usize = 64;

/// Longest `commit_interval_ms` and `batch.max_wait_ms` (one day): larger values would
/// overflow the clock arithmetic and mean "never" anyway.
const MAX_INTERVAL_MS: u64 = 86_400_000;

/// The dead-letter topic.
pub const DLQ_TOPIC: &str = "_dlq";

/// Longest pipeline name: its replay topic (`_replay.<name>`) is a topic.
const MAX_PIPELINE_NAME: usize = 192;

/// Checks every pipeline: unique names, processors that compile, sinks the factory
/// accepts. The error names the pipeline and the place.
pub fn validate(pipelines: &[PipelineConfig], sinks: &dyn SinkFactory) -> anyhow::Result<()> {
    let mut names = std::collections::HashSet::new();
    let mut claims = std::collections::HashMap::new();
    for p in pipelines {
        let at = |e: anyhow::Error| anyhow::anyhow!("pipeline '{}': {e}", p.name);
        if !names.insert(&p.name) {
            return Err(at(anyhow::anyhow!("the name is used twice")));
        }
        if p.name.is_empty() || !p.name.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b)) {
            return Err(at(anyhow::anyhow!("name must be letters, digits, '-', '_' or '.'")));
        }
        // Its replay topic's name must be a topic name.
        if p.name.len() > MAX_PIPELINE_NAME {
            return Err(at(anyhow::anyhow!("name must be at most {MAX_PIPELINE_NAME} characters")));
        }
        if let Some(after) = p.dlq.reprocess_after_ms {
            if !(100..=30 * MAX_INTERVAL_MS).contains(&after) {
                return Err(at(anyhow::anyhow!("`dlq.reprocess_after_ms` must be from 100 to 30 days")));
            }
            if !(1..=100).contains(&p.dlq.reprocess_max_times) {
                return Err(at(anyhow::anyhow!("`dlq.reprocess_max_times` must be from 1 to 100")));
            }
        }
        if p.topics.is_empty() {
            return Err(at(anyhow::anyhow!("`topics` is empty")));
        }
        for t in &p.topics {
            flowgate_log::validate_topic_name(t).map_err(|e| at(e.into()))?;
        }
        if !matches!(p.start.as_str(), "earliest" | "latest") {
            return Err(at(anyhow::anyhow!("`start` must be earliest or latest")));
        }
        if p.sinks.is_empty() {
            return Err(at(anyhow::anyhow!("a pipeline needs at least one sink")));
        }
        if p.sinks.len() > MAX_SINKS {
            return Err(at(anyhow::anyhow!("a pipeline may have at most {MAX_SINKS} sinks")));
        }
        if !(10..=MAX_INTERVAL_MS).contains(&p.commit_interval_ms) {
            return Err(at(anyhow::anyhow!("`commit_interval_ms` must be from 10 to {MAX_INTERVAL_MS}")));
        }
        let mut sink_names = Vec::new();
        for (i, s) in p.sinks.iter().enumerate() {
            // Sink names label metrics and go into every dead letter and replay record
            // (whose head is bounded).
            if !is_stage_name(&s.name) {
                return Err(at(anyhow::anyhow!(
                    "sink {} name '{}': up to 64 letters, digits, '-', '_' or '.'",
                    i + 1,
                    s.name.escape_debug()
                )));
            }
            if sink_names.contains(&s.name) {
                return Err(at(anyhow::anyhow!("sink name '{}' is used twice", s.name)));
            }
            sink_names.push(s.name.clone());
            let at_sink = |e: anyhow::Error| at(anyhow::anyhow!("sink {} ('{}'): {e}", i + 1, s.name));
            if s.batch.max_wait_ms > MAX_INTERVAL_MS || s.batch.target_latency_ms > MAX_INTERVAL_MS {
                return Err(at_sink(anyhow::anyhow!(
                    "`batch.max_wait_ms` and `batch.target_latency_ms` must be at most {MAX_INTERVAL_MS}"
                )));
            }
            validate_delivery(s).map_err(at_sink)?;
            sinks.validate(s).map_err(at_sink)?;
            if let Some(claim) = sinks.output_claim(s) {
                if let Some(owner) = claims.insert(claim.clone(), format!("pipeline '{}' sink '{}'", p.name, s.name)) {
                    return Err(at_sink(anyhow::anyhow!(
                        "writes to {claim}, which {owner} writes to already; give each sink its own output"
                    )));
                }
            }
        }
        let ids = p.processor_ids();
        for (i, (id, c)) in ids.iter().zip(&p.processors).enumerate() {
            if c.name.is_some() && !is_stage_name(id) {
                return Err(at(anyhow::anyhow!(
                    "processor {} name '{id}': up to 64 letters, digits, '-', '_' or '.'",
                    i + 1
                )));
            }
            if ids[..i].contains(id) {
                return Err(at(anyhow::anyhow!(
                    "processor id '{id}' is used twice (ids are `name`s, or `<type>-<n>` for unnamed processors); \
                     give processor {} another name",
                    i + 1
                )));
            }
        }
        processors::build_pipeline(p).map_err(at)?;
    }
    Ok(())
}

/// Whether `name` may name a processor or sink: 1 to 64 letters, digits, '-', '_' or '.'.
fn is_stage_name(name: &str) -> bool {
    !name.is_empty() && name.len() <= 64 && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
}

/// The largest concurrency limit a sink may have.
const MAX_CONCURRENCY: u32 = 1024;

/// Checks a sink's `retry`, `breaker` and `concurrency`: every duration at least 1 ms and at most a day
/// (`max_elapsed_ms` at most 30 days), and each bound at least its start.
fn validate_delivery(s: &crate::config::SinkConfig) -> anyhow::Result<()> {
    let (r, b) = (&s.retry, &s.breaker);
    for (key, ms) in [
        ("retry.initial_backoff_ms", r.initial_backoff_ms),
        ("retry.max_backoff_ms", r.max_backoff_ms),
        ("breaker.open_ms", b.open_ms),
        ("breaker.max_open_ms", b.max_open_ms),
    ] {
        anyhow::ensure!((1..=MAX_INTERVAL_MS).contains(&ms), "`{key}` must be from 1 to {MAX_INTERVAL_MS} (one day)");
    }
    anyhow::ensure!(
        r.max_elapsed_ms <= 30 * MAX_INTERVAL_MS,
        "`retry.max_elapsed_ms` must be at most 30 days (0: no limit)"
    );
    anyhow::ensure!(
        r.initial_backoff_ms <= r.max_backoff_ms,
        "`retry.initial_backoff_ms` exceeds `retry.max_backoff_ms`"
    );
    anyhow::ensure!(b.open_ms <= b.max_open_ms, "`breaker.open_ms` exceeds `breaker.max_open_ms`");
    anyhow::ensure!(
        (1..=100).contains(&b.failure_rate_percent),
        "`breaker.failure_rate_percent` must be from 1 to 100 (100: only failures in a row open it)"
    );
    let c = &s.concurrency;
    for (key, n) in
        [("concurrency.initial", Some(c.initial)), ("concurrency.max", Some(c.max)), ("concurrency.limit", c.limit)]
    {
        if let Some(n) = n {
            anyhow::ensure!((1..=MAX_CONCURRENCY).contains(&n), "`{key}` must be from 1 to {MAX_CONCURRENCY}");
        }
    }
    anyhow::ensure!(c.initial <= c.max, "`concurrency.initial` exceeds `concurrency.max`");
    anyhow::ensure!(
        c.latency_tolerance.is_finite() && (0.0..=100.0).contains(&c.latency_tolerance),
        "`concurrency.latency_tolerance` must be a number from 0 to 100"
    );
    Ok(())
}

pub(crate) struct Shared {
    pub(crate) log: Log,
    pub(crate) data_dir: PathBuf,
    pub(crate) metrics: Arc<PipelineMetrics>,
    pub(crate) factory: Arc<dyn SinkFactory>,
    /// Names of every configured pipeline (to tell a renamed one from a new one); a
    /// reload replaces them.
    pub(crate) pipeline_names: parking_lot::RwLock<Vec<String>>,
    /// What every sink task is doing.
    pub(crate) sink_statuses: SinkStatuses,
    /// Every sink's controller.
    pub(crate) controllers: SinkControllers,
    /// The process's memory budget.
    pub(crate) memory: flowgate_memory::MemoryGovernor,
    /// One worker per partition at a time ([`lease`]).
    pub(crate) leases: lease::Leases,
}

/// Refuses a config whose sink batch reservations (`batch.max_bytes` per sink and source
/// partition, the replay topic's one included), which are held for as long as pipelines
/// run, take more than half of the memory budget's soft threshold: with them, pressure
/// would never end and listeners would stay paused.
fn reservations_fit(shared: &Shared, configs: &[PipelineConfig]) -> anyhow::Result<()> {
    let mut reserved = 0u64;
    for p in configs {
        let per_partition = p.sinks.iter().fold(0u64, |sum, s| sum.saturating_add(s.batch.max_bytes as u64));
        let partitions = p.topics.iter().fold(1u64, |sum, t| {
            let n = shared.log.topic(t).map_or(shared.log.config().default_partitions, |t| t.partition_count());
            sum.saturating_add(u64::from(n))
        });
        reserved = reserved.saturating_add(per_partition.saturating_mul(partitions));
    }
    let room = shared.memory.soft_limit() / 2;
    anyhow::ensure!(
        reserved <= room,
        "the pipelines' sink batches reserve {reserved} bytes (batch.max_bytes per sink and source partition), \
         more than half of the memory budget's soft threshold ({room} bytes of {}): lower batch.max_bytes or \
         raise server.memory_limit_bytes",
        shared.memory.soft_limit()
    );
    Ok(())
}

/// The topic, created with the default partition count if it does not exist.
fn ensure_topic(log: &Log, name: &str) -> anyhow::Result<Arc<flowgate_log::Topic>> {
    Ok(match log.topic(name) {
        Some(t) => t,
        None => match log.create_topic(name, log.config().default_partitions) {
            Ok(t) => t,
            Err(flowgate_log::LogError::TopicExists(_)) => log.topic_or_create(name)?,
            Err(e) => return Err(e.into()),
        },
    })
}
