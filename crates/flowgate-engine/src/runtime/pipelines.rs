//! The running pipelines of an engine: starting them, changing them while they run (a
//! reload), and stopping them.
//!
//! A reload compares each new pipeline with the running one of its name: an equal one
//! keeps running untouched; a changed one stops like at shutdown (its sinks flush, its
//! offsets and state are checkpointed) and starts again from that checkpoint with the
//! new config; a removed one stops the same way; a new one starts. Nothing is stopped
//! before the whole new set has passed validation, so a config that would not start
//! changes nothing.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::changes::Changes;
use flowgate_log::{Log, Partition};
use parking_lot::Mutex;
use prometheus_client::metrics::gauge::Gauge;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::controller::{self, SinkControllers};
use super::sink_status::SinkStatuses;
use super::supervisor::{supervise, PipelineHealth, WorkerHealth, WorkerState};
use super::{ensure_topic, replay, reservations_fit, side_outputs, validate, Shared};
use crate::config::PipelineConfig;
use crate::metrics::{PipelineMetrics, SourceLabels};
use crate::sink::SinkFactory;

/// How long a reload waits for the supervisors of a pipeline it cut off to end once
/// aborted (they end at their next await).
const ABORT_WAIT: Duration = Duration::from_secs(5);

/// Running pipelines; change them with [`Pipelines::reload`], stop them with
/// [`Pipelines::shutdown`] or [`Pipelines::shutdown_within`].
///
/// Pipelines run on their own threads (a runtime of their own), so the operating
/// system shares the cores between processing and ingest: a busy pipeline cannot delay
/// the listeners' acknowledgements. Each worker runs under a supervisor that restarts it
/// after a failure; [`Pipelines::health`] shows them.
pub struct Pipelines {
    pub(super) cancel: CancellationToken,
    /// In configuration order; paused pipelines too.
    pub(super) running: Vec<Running>,
    pub(super) health: PipelineHealth,
    replayer: Arc<replay::Replayer>,
    lags: Arc<Mutex<Vec<Lag>>>,
    pub(super) shared: Arc<Shared>,
    runtime: Option<tokio::runtime::Runtime>,
}

/// One configured pipeline: running, or paused ([`super::control`]).
pub(super) struct Running {
    pub(super) config: Arc<PipelineConfig>,
    /// A child of the engine's token: cancelling it stops this pipeline alone.
    pub(super) cancel: CancellationToken,
    /// None while paused.
    pub(super) supervisors: Vec<JoinHandle<bool>>,
    /// Paused by an operator: its workers are not running.
    pub(super) paused: bool,
}

/// What the lag gauge of one worker is computed from.
struct Lag {
    labels: SourceLabels,
    partition: Arc<Partition>,
    health: Arc<WorkerHealth>,
    gauge: Gauge,
}

impl std::fmt::Debug for Pipelines {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pipelines").field("pipelines", &self.running.len()).finish()
    }
}

impl Drop for Pipelines {
    fn drop(&mut self) {
        self.cancel.cancel();
        if let Some(runtime) = self.runtime.take() {
            // Not `shutdown_timeout`: this may run inside the caller's async context.
            runtime.shutdown_background();
        }
    }
}

impl Pipelines {
    /// Starts every pipeline: one supervised worker per source partition, charging what
    /// it holds to `memory`. Pipelines can be added later by [`Pipelines::reload`], so
    /// `configs` may be empty.
    pub fn start(
        log: Log,
        data_dir: std::path::PathBuf,
        configs: Vec<PipelineConfig>,
        factory: Arc<dyn SinkFactory>,
        metrics: Arc<PipelineMetrics>,
        memory: flowgate_memory::MemoryGovernor,
    ) -> anyhow::Result<Pipelines> {
        validate(&configs, factory.as_ref())?;
        let controllers = SinkControllers::default();
        let sink_statuses = SinkStatuses::default();
        let shared = Arc::new(Shared {
            log: log.clone(),
            data_dir: data_dir.clone(),
            metrics,
            factory,
            pipeline_names: parking_lot::RwLock::new(configs.iter().map(|c| c.name.clone()).collect()),
            sink_statuses: sink_statuses.clone(),
            controllers: controllers.clone(),
            memory,
            leases: Default::default(),
        });
        reservations_fit(&shared, &configs)?;
        let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .thread_name("flowgate-pipeline")
            .enable_all()
            .build()?;
        let health = PipelineHealth::new(sink_statuses, controllers);
        let replayer = Arc::new(replay::Replayer::new(log, data_dir, Vec::new(), health.clone()));
        // From here an error drops `pipelines`, which stops what had started.
        let mut pipelines = Pipelines {
            cancel: CancellationToken::new(),
            running: Vec::new(),
            health,
            replayer,
            lags: Default::default(),
            shared,
            runtime: Some(runtime),
        };
        for config in configs {
            pipelines.launch(config)?;
        }
        pipelines.replayer.set_pipelines(pipelines.configs());
        pipelines.runtime().spawn(refresh_lags(
            pipelines.lags.clone(),
            pipelines.shared.memory.clone(),
            pipelines.shared.controllers.clone(),
            pipelines.cancel.clone(),
        ));
        pipelines.runtime().spawn(pipelines.replayer.clone().reprocess(pipelines.cancel.clone()));
        Ok(pipelines)
    }

    /// The health of every worker (for readiness and stats); stays valid after shutdown
    /// and follows reloads.
    pub fn health(&self) -> PipelineHealth {
        self.health.clone()
    }

    /// Replays dead letters into these pipelines ([`replay`]).
    pub fn replayer(&self) -> Arc<replay::Replayer> {
        self.replayer.clone()
    }

    /// The running pipelines' configs, in configuration order.
    pub fn configs(&self) -> Vec<Arc<PipelineConfig>> {
        self.running.iter().map(|r| r.config.clone()).collect()
    }

    /// Makes the running pipelines those of `configs` (see the module doc): checks the
    /// whole set first ([`Pipelines::check`]) and changes nothing when that fails; then
    /// stops the removed and changed pipelines, letting them flush and commit until
    /// `deadline` (cut off after it, to resume from their last checkpoint), and starts
    /// the new and changed ones. When `shutdown` is cancelled meanwhile it stops waiting,
    /// starts nothing more and returns an error: the engine is stopping everything.
    pub async fn reload(
        &mut self,
        configs: Vec<PipelineConfig>,
        deadline: Instant,
        shutdown: &CancellationToken,
    ) -> anyhow::Result<Changes> {
        self.check(&configs)?;
        let mut changes = Changes::default();
        let (keep, stopping) = changes.sort_running(
            std::mem::take(&mut self.running),
            |r| &r.config.name,
            |r| configs.iter().find(|c| c.name == r.config.name).map(|c| same(c, &r.config)),
        );
        self.running = keep;
        for running in &stopping {
            running.cancel.cancel();
        }
        for running in stopping {
            let name = running.config.name.clone();
            let finished = tokio::select! {
                finished = stop(&running.cancel, running.supervisors, deadline) => finished,
                // Shutdown stops the rest; their leases keep any worker still ending from
                // overlapping a later one.
                _ = shutdown.cancelled() => false,
            };
            if !finished {
                tracing::warn!(pipeline = %name,
                    "reload: the pipeline did not flush and commit in time; cut off, it resumes from its last checkpoint");
                changes.cut_off.push(name.clone());
            }
            self.forget(&name, changes.removed.contains(&name));
        }
        let names: Vec<String> = configs.iter().map(|c| c.name.clone()).collect();
        *self.shared.pipeline_names.write() = names.clone();
        let mut launched = Ok(());
        for config in configs {
            if self.running.iter().any(|r| r.config.name == config.name) {
                changes.unchanged.push(config.name);
                continue;
            }
            if shutdown.is_cancelled() {
                launched =
                    Err(anyhow::anyhow!("the engine is shutting down; pipeline '{}' was not started", config.name));
                break;
            }
            changes.starting(&config.name);
            let name = config.name.clone();
            if let Err(e) = self.launch(config) {
                launched = Err(anyhow::anyhow!("pipeline '{name}' did not start: {e:#}"));
                break;
            }
        }
        // Whatever happened, what is shown and replayed into is what runs.
        self.running.sort_by_key(|r| names.iter().position(|n| *n == r.config.name));
        self.health.order(&names);
        self.replayer.set_pipelines(self.configs());
        launched.map(|()| changes)
    }

    /// Whether [`Pipelines::reload`] would accept `configs`: every check it makes before
    /// it changes anything, and those a new or changed pipeline's workers make at their
    /// start, so that a reload does not stop a pipeline for a config that cannot run: a
    /// new pipeline on a partition of which a pipeline no longer configured has a
    /// checkpoint (most likely it was renamed), and processors that cannot take the
    /// state in a changed pipeline's checkpoints. Reads those checkpoints.
    pub fn check(&self, configs: &[PipelineConfig]) -> anyhow::Result<()> {
        validate(configs, self.shared.factory.as_ref())?;
        reservations_fit(&self.shared, configs)?;
        let names: Vec<&str> = configs.iter().map(|c| c.name.as_str()).collect();
        let root = self.shared.data_dir.join("pipelines");
        let others: Vec<String> = std::fs::read_dir(&root)
            .map(|dir| dir.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
            .unwrap_or_default();
        for config in configs {
            if self.running.iter().any(|r| same(&r.config, config)) {
                continue;
            }
            let ids = config.processor_ids();
            for topic_name in &config.topics {
                let Some(topic) = self.shared.log.topic(topic_name) else { continue };
                for partition in topic.partitions() {
                    let p = partition.id();
                    let file =
                        crate::checkpoint::CheckpointFile::new(&self.shared.data_dir, &config.name, topic_name, p);
                    if let Some(saved) = file.load()? {
                        super::processor_states::check(&saved, config, &ids, &file)
                            .map_err(|e| anyhow::anyhow!("pipeline '{}': {e:#}", config.name))?;
                        continue;
                    }
                    let ckpt = format!("{topic_name}-{p}.ckpt");
                    let owner = others
                        .iter()
                        .find(|o| !names.contains(&o.as_str()) && root.join(o.as_str()).join(&ckpt).exists());
                    if let Some(owner) = owner {
                        anyhow::bail!(
                            "pipeline '{}' has no checkpoint for {topic_name}-{p}, but pipeline '{owner}', which is \
                             not configured, has one: if '{}' is '{owner}' renamed, keep the name '{owner}' (or stop \
                             the engine and rename the directory {}); if '{owner}' is gone for good, delete that \
                             directory. A new pipeline does not start afresh there, so that no sink rewrites earlier \
                             output.",
                            config.name,
                            config.name,
                            root.join(owner).display()
                        );
                    }
                }
            }
        }
        Ok(())
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
        let supervisors: Vec<JoinHandle<bool>> =
            std::mem::take(&mut self.running).into_iter().flat_map(|r| r.supervisors).collect();
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
                .filter(|w| !matches!(w.state, WorkerState::Stopped | WorkerState::Paused))
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

    fn runtime(&self) -> &tokio::runtime::Runtime {
        self.runtime.as_ref().expect("taken only by shutdown, which consumes self")
    }

    /// Starts one pipeline, or only shows it when it is paused ([`super::control`]); on
    /// an error, whatever of it had started is stopped.
    pub(super) fn launch(&mut self, config: PipelineConfig) -> anyhow::Result<()> {
        let name = config.name.clone();
        let cancel = self.cancel.child_token();
        let mut supervisors = Vec::new();
        let paused = super::control::is_paused(&self.shared.data_dir, &name);
        let started = self.spawn_workers(config, &cancel, &mut supervisors, paused);
        match started {
            Ok(config) => {
                if paused {
                    tracing::info!(pipeline = %name, "pipeline is paused; `flowgate pipelines resume` starts it");
                }
                self.running.push(Running { config, cancel, supervisors, paused });
                Ok(())
            }
            Err(e) => {
                cancel.cancel();
                for s in supervisors {
                    s.abort();
                }
                self.forget(&name, false);
                Err(e)
            }
        }
    }

    /// Creates what one pipeline reads and writes (its topics, side outputs, replay
    /// topic) and spawns a supervised worker per source partition into `supervisors`;
    /// when `paused`, only the workers' health (at their checkpoints) and lag gauges.
    fn spawn_workers(
        &self,
        config: PipelineConfig,
        cancel: &CancellationToken,
        supervisors: &mut Vec<JoinHandle<bool>>,
        paused: bool,
    ) -> anyhow::Result<Arc<PipelineConfig>> {
        let shared = &self.shared;
        for s in &config.sinks {
            let labels = crate::metrics::SinkLabels { pipeline: config.name.clone(), sink: s.name.clone() };
            let adaptive = s.concurrency.adaptive.unwrap_or_else(|| shared.factory.remote(s));
            shared.controllers.insert(controller::SinkController::new(
                labels,
                controller::Mode::of(&s.concurrency, adaptive),
                s.concurrency.clone(),
                s.batch.clone(),
                s.breaker.clone(),
                &shared.metrics,
            ));
        }
        side_outputs::ensure_topics(&shared.log, &config)?;
        let config = Arc::new(config);
        let replays = replay::replay_topic(&config.name);
        if shared.log.topic(&replays).is_none() {
            match shared.log.create_topic(&replays, 1) {
                Ok(_) | Err(flowgate_log::LogError::TopicExists(_)) => {}
                Err(e) => return Err(e.into()),
            }
        }
        let mut healths = Vec::new();
        let mut lags = Vec::new();
        for topic_name in config.topics.iter().chain(std::iter::once(&replays)) {
            // A pipeline's source topics exist once it is configured, whatever
            // `auto_create_topics` says about clients' writes.
            let topic = ensure_topic(&shared.log, topic_name)?;
            for partition in topic.partitions() {
                let health = Arc::new(WorkerHealth::new(&config.name, topic_name, partition.id()));
                let labels = SourceLabels {
                    pipeline: config.name.clone(),
                    topic: topic_name.to_string(),
                    partition: partition.id().to_string(),
                };
                let gauge = shared.metrics.lag.get_or_create(&labels).clone();
                lags.push(Lag { labels, partition: partition.clone(), health: health.clone(), gauge });
                healths.push(health.clone());
                if paused {
                    let file = crate::checkpoint::CheckpointFile::new(
                        &shared.data_dir,
                        &config.name,
                        topic_name,
                        partition.id(),
                    );
                    // Where the worker will start, as it would choose.
                    let start = if config.start == "latest" && *topic_name != replays {
                        partition.end_offset()
                    } else {
                        partition.start_offset()
                    };
                    let committed = file.summary().ok().flatten().map_or(start, |s| s.offset);
                    health.committed.store(committed, std::sync::atomic::Ordering::Release);
                    health.set_state(WorkerState::Paused);
                    // Retention counts what a paused pipeline has not read, as for any.
                    partition.set_consumer_offset(&config.name, committed);
                    continue;
                }
                let worker = supervise(
                    shared.clone(),
                    config.clone(),
                    topic_name.to_string(),
                    partition.clone(),
                    health,
                    cancel.clone(),
                );
                if *topic_name != replays {
                    supervisors.push(self.runtime().spawn(worker));
                    continue;
                }
                // The replay worker starts once something was ever replayed: until
                // then the pipeline's sinks run no second instance for it.
                let (partition, cancel) = (partition.clone(), cancel.clone());
                supervisors.push(self.runtime().spawn(async move {
                    while partition.end_offset() == 0 {
                        tokio::select! {
                            _ = partition.wait_for_data(0, Duration::from_secs(1)) => {}
                            // Never started: it wrote nothing to account for.
                            _ = cancel.cancelled() => return true,
                        }
                    }
                    worker.await
                }));
            }
        }
        self.health.add(healths);
        self.lags.lock().extend(lags);
        Ok(config)
    }

    /// Forgets a pipeline that stopped: its health, sink statuses, controllers and
    /// per-partition gauges; when it is `removed` for good, also its place among the
    /// log's consumers (or retention would count what it never reads as lost).
    pub(super) fn forget(&self, pipeline: &str, removed: bool) {
        self.health.remove(pipeline);
        let metrics = &self.shared.metrics;
        self.lags.lock().retain(|lag| {
            let keep = lag.labels.pipeline != pipeline;
            if !keep {
                metrics.lag.remove(&lag.labels);
                metrics.worker_up.remove(&lag.labels);
                metrics.committed_offset.remove(&lag.labels);
                if removed {
                    lag.partition.remove_consumer(pipeline);
                }
            }
            keep
        });
    }
}

/// Whether two configs of a pipeline are the same: compared as the JSON they serialize
/// to, so that every field counts, including options a sink type reads itself.
fn same(a: &PipelineConfig, b: &PipelineConfig) -> bool {
    match (serde_json::to_value(a), serde_json::to_value(b)) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    }
}

/// Cancels a pipeline's workers and lets them flush and commit until `deadline`; aborts
/// those still busy then. True when every worker finished on its own. Cancel-safe: dropped,
/// it leaves the workers to their cancel token and leases.
pub(super) async fn stop(cancel: &CancellationToken, supervisors: Vec<JoinHandle<bool>>, deadline: Instant) -> bool {
    stop_accounted(cancel, supervisors, deadline).await.0
}

/// [`stop`], and whether every worker ended by committing all its sinks wrote
/// ([`supervise`]): only then does the pipeline's checkpoint account for all its output.
pub(super) async fn stop_accounted(
    cancel: &CancellationToken,
    mut supervisors: Vec<JoinHandle<bool>>,
    deadline: Instant,
) -> (bool, bool) {
    cancel.cancel();
    let all = async {
        let mut accounted = true;
        for supervisor in &mut supervisors {
            accounted &= supervisor.await.unwrap_or(false);
        }
        accounted
    };
    if let Ok(accounted) = tokio::time::timeout_at(deadline.into(), all).await {
        return (true, accounted);
    }
    // What an aborted worker still has under way (a write in the kernel, a checkpoint
    // on a blocking thread) holds its partition's lease: the replacement waits for it.
    for supervisor in &supervisors {
        supervisor.abort();
    }
    let ended = async {
        for supervisor in &mut supervisors {
            let _ = supervisor.await;
        }
    };
    let _ = tokio::time::timeout(ABORT_WAIT, ended).await;
    (false, false)
}

/// Refreshes every worker's lag gauge apart from the workers, so a stalled worker still
/// shows it; and, past the memory budget's soft threshold, has every sink's controller
/// lower its concurrency and batch size.
async fn refresh_lags(
    lags: Arc<Mutex<Vec<Lag>>>,
    memory: flowgate_memory::MemoryGovernor,
    controllers: SinkControllers,
    cancel: CancellationToken,
) {
    loop {
        for lag in lags.lock().iter() {
            let committed = lag.health.committed.load(std::sync::atomic::Ordering::Acquire);
            lag.gauge.set(i64::try_from(lag.partition.end_offset().saturating_sub(committed)).unwrap_or(i64::MAX));
        }
        controllers.set_memory_pressure(memory.level() != flowgate_memory::Level::Normal);
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(250)) => {}
            _ = cancel.cancelled() => return,
        }
    }
}
