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
mod commit;
mod controller;
pub mod dead_letters;
mod decode;
#[cfg(all(feature = "failpoints", debug_assertions))]
mod failpoints;
mod fan_out;
mod memory;
mod processor_states;
mod quarantine;
pub mod replay;
pub mod replay_marks;
pub mod replay_record;
mod replay_worker;
mod side_outputs;
mod sink_driver;
mod sink_status;
mod supervisor;
mod worker;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use flowgate_log::{Log, Partition};
use tokio_util::sync::CancellationToken;

use crate::config::PipelineConfig;
use crate::metrics::{PipelineMetrics, SourceLabels};
use crate::processors;
use crate::sink::SinkFactory;
pub use controller::{ControllerStatus, SinkControllers};
pub use sink_status::{SinkStatus, SinkStatuses};
use supervisor::{supervise, WorkerHealth};
pub use supervisor::{PipelineHealth, WorkerState, WorkerStatus};

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

/// Running pipelines; stop them with [`Pipelines::shutdown`] or
/// [`Pipelines::shutdown_within`].
///
/// Pipelines run on their own threads (a runtime of their own), so the operating
/// system shares the cores between processing and ingest: a busy pipeline cannot delay
/// the listeners' acknowledgements. Each worker runs under a supervisor that restarts it
/// after a failure; [`Pipelines::health`] shows them.
pub struct Pipelines {
    cancel: CancellationToken,
    supervisors: Vec<tokio::task::JoinHandle<()>>,
    health: PipelineHealth,
    replayer: Arc<replay::Replayer>,
    runtime: Option<tokio::runtime::Runtime>,
}

impl std::fmt::Debug for Pipelines {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pipelines").field("workers", &self.supervisors.len()).finish()
    }
}

impl Drop for Pipelines {
    fn drop(&mut self) {
        self.cancel.cancel();
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

pub(crate) struct Shared {
    pub(crate) log: Log,
    pub(crate) data_dir: PathBuf,
    pub(crate) metrics: Arc<PipelineMetrics>,
    pub(crate) factory: Arc<dyn SinkFactory>,
    /// Names of every configured pipeline (to tell a renamed one from a new one).
    pub(crate) pipeline_names: Vec<String>,
    /// What every sink task is doing.
    pub(crate) sink_statuses: SinkStatuses,
    /// Every sink's controller.
    pub(crate) controllers: SinkControllers,
    /// The process's memory budget.
    pub(crate) memory: flowgate_memory::MemoryGovernor,
}

impl Pipelines {
    /// Starts every pipeline: one supervised worker per source partition, charging what
    /// it holds to `memory`.
    pub fn start(
        log: Log,
        data_dir: PathBuf,
        configs: Vec<PipelineConfig>,
        factory: Arc<dyn SinkFactory>,
        metrics: Arc<PipelineMetrics>,
        memory: flowgate_memory::MemoryGovernor,
    ) -> anyhow::Result<Pipelines> {
        validate(&configs, factory.as_ref())?;
        let pipeline_names = configs.iter().map(|c| c.name.clone()).collect();
        let sink_statuses = SinkStatuses::default();
        let controllers = SinkControllers::default();
        for p in &configs {
            for s in &p.sinks {
                let labels = crate::metrics::SinkLabels { pipeline: p.name.clone(), sink: s.name.clone() };
                let adaptive = s.concurrency.adaptive.unwrap_or_else(|| factory.remote(s));
                controllers.insert(controller::SinkController::new(
                    labels,
                    controller::Mode::of(&s.concurrency, adaptive),
                    s.concurrency.clone(),
                    s.batch.clone(),
                    s.breaker.clone(),
                    &metrics,
                ));
            }
        }
        let shared = Arc::new(Shared {
            log,
            data_dir,
            metrics,
            factory,
            pipeline_names,
            sink_statuses: sink_statuses.clone(),
            controllers: controllers.clone(),
            memory,
        });
        reservations_fit(&shared, &configs)?;
        let cancel = CancellationToken::new();
        let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
        // Dropped on an error below, it shuts down in the background: a runtime dropped
        // in the caller's async context would panic.
        let runtime = StartingRuntime(Some(
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(threads)
                .thread_name("flowgate-pipeline")
                .enable_all()
                .build()?,
        ));
        let mut supervisors = Vec::new();
        let mut healths = Vec::new();
        // Lag (and memory pressure on the sinks) is refreshed apart from the workers, so a
        // stalled worker still shows it.
        let mut lags: Vec<(Arc<Partition>, Arc<WorkerHealth>, prometheus_client::metrics::gauge::Gauge)> = Vec::new();
        let mut all = Vec::new();
        for config in configs {
            side_outputs::ensure_topics(&shared.log, &config)?;
            let config = Arc::new(config);
            all.push(config.clone());
            let replays = replay::replay_topic(&config.name);
            if shared.log.topic(&replays).is_none() {
                match shared.log.create_topic(&replays, 1) {
                    Ok(_) | Err(flowgate_log::LogError::TopicExists(_)) => {}
                    Err(e) => return Err(e.into()),
                }
            }
            for topic_name in config.topics.iter().chain(std::iter::once(&replays)) {
                // A pipeline's source topics exist once it is configured, whatever
                // `auto_create_topics` says about clients' writes.
                let topic = ensure_topic(&shared.log, topic_name)?;
                for partition in topic.partitions() {
                    let health = Arc::new(WorkerHealth::new(&config.name, topic_name, partition.id()));
                    let gauge = shared
                        .metrics
                        .lag
                        .get_or_create(&SourceLabels {
                            pipeline: config.name.clone(),
                            topic: topic_name.to_string(),
                            partition: partition.id().to_string(),
                        })
                        .clone();
                    lags.push((partition.clone(), health.clone(), gauge));
                    healths.push(health.clone());
                    let worker = supervise(
                        shared.clone(),
                        config.clone(),
                        topic_name.to_string(),
                        partition.clone(),
                        health,
                        cancel.clone(),
                    );
                    if *topic_name != replays {
                        supervisors.push(runtime.spawn(worker));
                        continue;
                    }
                    // The replay worker starts once something was ever replayed: until
                    // then the pipeline's sinks run no second instance for it.
                    let (partition, cancel) = (partition.clone(), cancel.clone());
                    supervisors.push(runtime.spawn(async move {
                        while partition.end_offset() == 0 {
                            tokio::select! {
                                _ = partition.wait_for_data(0, Duration::from_secs(1)) => {}
                                _ = cancel.cancelled() => return,
                            }
                        }
                        worker.await;
                    }));
                }
            }
        }
        let lag_cancel = cancel.clone();
        let (memory, pressured) = (shared.memory.clone(), controllers.clone());
        runtime.spawn(async move {
            loop {
                for (partition, health, gauge) in &lags {
                    let committed = health.committed.load(std::sync::atomic::Ordering::Acquire);
                    gauge.set(i64::try_from(partition.end_offset().saturating_sub(committed)).unwrap_or(i64::MAX));
                }
                // Past the soft threshold, every sink's controller lowers its concurrency
                // and batch size.
                pressured.set_memory_pressure(memory.level() != flowgate_memory::Level::Normal);
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(250)) => {}
                    _ = lag_cancel.cancelled() => return,
                }
            }
        });
        let health = PipelineHealth::new(healths, sink_statuses, controllers);
        let replayer =
            Arc::new(replay::Replayer::new(shared.log.clone(), shared.data_dir.clone(), all, health.clone()));
        runtime.spawn(replayer.clone().reprocess(cancel.clone()));
        Ok(Pipelines { cancel, supervisors, health, replayer, runtime: Some(runtime.started()) })
    }

    /// The health of every worker (for readiness and stats); stays valid after shutdown.
    pub fn health(&self) -> PipelineHealth {
        self.health.clone()
    }

    /// Replays dead letters into these pipelines ([`replay`]).
    pub fn replayer(&self) -> Arc<replay::Replayer> {
        self.replayer.clone()
    }

    /// Stops reading, flushes and commits every worker, however long that takes.
    pub async fn shutdown(self) {
        self.shutdown_within(None).await;
    }

    /// Stops reading and lets every worker flush its sinks and commit until `deadline`;
    /// workers still busy then (a stalled sink) are dropped without committing, so they
    /// resume from their last checkpoint. Returns true when every worker finished.
    pub async fn shutdown_within(mut self, deadline: Option<Instant>) -> bool {
        self.cancel.cancel();
        let supervisors = std::mem::take(&mut self.supervisors);
        let all = async move {
            for supervisor in supervisors {
                let _ = supervisor.await;
            }
        };
        let finished = match deadline {
            Some(deadline) => tokio::time::timeout_at(deadline.into(), all).await.is_ok(),
            None => {
                all.await;
                true
            }
        };
        if !finished {
            let stuck: Vec<String> = self
                .health
                .workers()
                .into_iter()
                .filter(|w| w.state != WorkerState::Stopped)
                .map(|w| format!("{}/{}/{}", w.pipeline, w.topic, w.partition))
                .collect();
            tracing::warn!(workers = %stuck.join(", "),
                "pipeline workers did not flush within the shutdown grace period; they resume from their last checkpoint");
        }
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
        finished
    }
}

/// The pipelines' runtime while [`Pipelines::start`] may still fail.
struct StartingRuntime(Option<tokio::runtime::Runtime>);

impl std::ops::Deref for StartingRuntime {
    type Target = tokio::runtime::Runtime;

    fn deref(&self) -> &Self::Target {
        self.0.as_ref().expect("taken only when started")
    }
}

impl StartingRuntime {
    fn started(mut self) -> tokio::runtime::Runtime {
        self.0.take().expect("taken once")
    }
}

impl Drop for StartingRuntime {
    fn drop(&mut self) {
        if let Some(runtime) = self.0.take() {
            runtime.shutdown_background();
        }
    }
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
