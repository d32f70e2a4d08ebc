//! Supervision: a worker that fails (an unreadable checkpoint, a sink that cannot be
//! built or recovered, a side output that cannot be written, a panic) is restarted from
//! its last checkpoint with exponential backoff. Every failure is counted, logged and
//! shown in [`PipelineHealth`], which `/ready` and `/v1/stats` read. A processor that
//! panics on an event does not stop its partition: see [`super::quarantine`].

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use flowgate_log::Partition;
use parking_lot::Mutex;
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use super::controller::{ControllerStatus, SinkControllers};
use super::quarantine::{InFlight, Learned, Quarantine};
use super::sink_status::{SinkStatus, SinkStatuses};
use super::worker::Worker;
use super::Shared;
use crate::config::PipelineConfig;
use crate::metrics::SourceLabels;

/// First wait before a failed worker is restarted; doubles per failure.
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
/// Longest wait between restarts.
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// A worker that ran this long before failing starts its backoff over.
const HEALTHY_RUN: Duration = Duration::from_secs(60);

/// What a worker is doing.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum WorkerState {
    /// Loading its checkpoint and recovering its sinks.
    Starting,
    /// Reading and delivering.
    Running,
    /// Failed; waiting out its backoff before the next start.
    Restarting,
    /// Stopped by shutdown.
    Stopped,
    /// Paused by an operator (`flowgate pipelines pause`): reads nothing until resumed;
    /// its committed offset stays where its last checkpoint put it.
    Paused,
}

/// A snapshot of one worker's health.
#[derive(Clone, Debug, Serialize)]
pub struct WorkerStatus {
    /// Pipeline name.
    pub pipeline: String,
    /// Source topic.
    pub topic: String,
    /// Source partition.
    pub partition: u32,
    /// What it is doing.
    pub state: WorkerState,
    /// Failures since the engine started (each one was followed by a restart).
    pub restarts: u64,
    /// Why it last failed, if it ever did.
    pub last_error: Option<String>,
    /// The offset of its last checkpoint.
    pub committed_offset: u64,
    /// Whether the worker is held back by a sink: some sink's queue is full, so the
    /// worker waits to hand it the next batch and reads nothing meanwhile.
    pub backpressure: bool,
    /// Each sink's queue: batches handed to the sink task and not yet taken by it.
    pub sink_queues: Vec<SinkQueue>,
}

/// The queue between a worker and one of its sink tasks.
#[derive(Clone, Debug, Serialize)]
pub struct SinkQueue {
    /// Sink name.
    pub sink: String,
    /// Batches waiting in the queue now.
    pub depth: usize,
    /// The most it holds: at this depth the worker stops reading (backpressure).
    pub capacity: usize,
}

/// The live health of one worker, shared between its supervisor and readers.
#[derive(Debug)]
pub(super) struct WorkerHealth {
    pipeline: String,
    topic: String,
    partition: u32,
    state: Mutex<(WorkerState, Option<String>)>,
    restarts: AtomicU64,
    /// The offset of the last checkpoint (also drives the lag gauge).
    pub(super) committed: Arc<AtomicU64>,
    /// The running worker's sink queues; weak, so that they close when the worker ends.
    queues: Mutex<Vec<(String, tokio::sync::mpsc::WeakSender<super::fan_out::SinkMsg>)>>,
}

impl WorkerHealth {
    pub(super) fn new(pipeline: &str, topic: &str, partition: u32) -> WorkerHealth {
        WorkerHealth {
            pipeline: pipeline.to_owned(),
            topic: topic.to_owned(),
            partition,
            state: Mutex::new((WorkerState::Starting, None)),
            restarts: AtomicU64::new(0),
            committed: Arc::new(AtomicU64::new(0)),
            queues: Mutex::new(Vec::new()),
        }
    }

    /// Records the queues of a worker that starts.
    pub(super) fn set_sink_queues<'a>(
        &self,
        queues: impl Iterator<Item = (String, &'a tokio::sync::mpsc::Sender<super::fan_out::SinkMsg>)>,
    ) {
        *self.queues.lock() = queues.map(|(sink, tx)| (sink, tx.downgrade())).collect();
    }

    fn sink_queues(&self) -> Vec<SinkQueue> {
        self.queues
            .lock()
            .iter()
            .filter_map(|(sink, weak)| {
                let tx = weak.upgrade()?;
                let capacity = tx.max_capacity();
                Some(SinkQueue { sink: sink.clone(), depth: capacity.saturating_sub(tx.capacity()), capacity })
            })
            .collect()
    }

    pub(super) fn set_state(&self, state: WorkerState) {
        self.state.lock().0 = state;
    }

    fn failed(&self, error: String) -> u64 {
        *self.state.lock() = (WorkerState::Restarting, Some(error));
        self.restarts.fetch_add(1, Ordering::AcqRel) + 1
    }

    fn status(&self) -> WorkerStatus {
        let (state, last_error) = self.state.lock().clone();
        let sink_queues = self.sink_queues();
        WorkerStatus {
            backpressure: sink_queues.iter().any(|q| q.depth >= q.capacity),
            sink_queues,
            pipeline: self.pipeline.clone(),
            topic: self.topic.clone(),
            partition: self.partition,
            state,
            restarts: self.restarts.load(Ordering::Acquire),
            last_error,
            committed_offset: self.committed.load(Ordering::Acquire),
        }
    }
}

/// The health of every pipeline worker of an engine; cheap to clone.
#[derive(Clone, Debug, Default)]
pub struct PipelineHealth {
    /// Grows and shrinks as a reload adds and removes pipelines.
    workers: Arc<parking_lot::RwLock<Vec<Arc<WorkerHealth>>>>,
    sinks: SinkStatuses,
    controllers: SinkControllers,
}

impl PipelineHealth {
    pub(super) fn new(sinks: SinkStatuses, controllers: SinkControllers) -> PipelineHealth {
        PipelineHealth { workers: Default::default(), sinks, controllers }
    }

    /// Adds the workers of a pipeline that starts.
    pub(super) fn add(&self, workers: impl IntoIterator<Item = Arc<WorkerHealth>>) {
        self.workers.write().extend(workers);
    }

    /// Forgets a pipeline that stopped for good (removed, or replaced by a reload): its
    /// workers, sink statuses and controllers.
    pub(super) fn remove(&self, pipeline: &str) {
        self.workers.write().retain(|w| w.pipeline != pipeline);
        self.sinks.remove_pipeline(pipeline);
        self.controllers.remove_pipeline(pipeline);
    }

    /// Shows every worker of `pipeline` in `state`.
    pub(super) fn set_pipeline_state(&self, pipeline: &str, state: WorkerState) {
        self.workers.read().iter().filter(|w| w.pipeline == pipeline).for_each(|w| w.set_state(state));
    }

    /// Sets the committed offset shown for one worker (a reset moved it).
    pub(super) fn set_committed(&self, pipeline: &str, topic: &str, partition: u32, offset: u64) {
        for w in self.workers.read().iter() {
            if w.pipeline == pipeline && w.topic == topic && w.partition == partition {
                w.committed.store(offset, Ordering::Release);
            }
        }
    }

    /// Puts the workers in the order of `pipelines` (configuration order).
    pub(super) fn order(&self, pipelines: &[String]) {
        let rank = |w: &Arc<WorkerHealth>| pipelines.iter().position(|p| *p == w.pipeline).unwrap_or(usize::MAX);
        self.workers.write().sort_by_key(rank);
    }

    /// Every sink's controller: concurrency limit, in flight, batch target, latency and
    /// its floor, breaker.
    pub fn controllers(&self) -> Vec<ControllerStatus> {
        self.controllers.all()
    }

    /// Every sink's controller, to set memory pressure on.
    pub fn sink_controllers(&self) -> SinkControllers {
        self.controllers.clone()
    }

    /// Every sink instance's status (breaker, batch target, retries).
    pub fn sinks(&self) -> Vec<SinkStatus> {
        self.sinks.all()
    }

    /// Every worker's status, in configuration order.
    pub fn workers(&self) -> Vec<WorkerStatus> {
        self.workers.read().iter().map(|w| w.status()).collect()
    }

    /// Workers that failed and have not run since: while there is one, the engine is
    /// not ready.
    pub fn failing(&self) -> Vec<WorkerStatus> {
        self.workers()
            .into_iter()
            .filter(|w| match w.state {
                WorkerState::Restarting => true,
                WorkerState::Starting => w.restarts > 0,
                WorkerState::Running | WorkerState::Stopped | WorkerState::Paused => false,
            })
            .collect()
    }
}

/// Runs one worker until `cancel`, restarting it from its checkpoint after each failure.
/// True when the worker ended by flushing and committing all it wrote ([`Worker::run`]);
/// false when it ended failed, waiting to restart, or before it recovered its sinks.
pub(super) async fn supervise(
    shared: Arc<Shared>,
    config: Arc<PipelineConfig>,
    topic: String,
    partition: Arc<Partition>,
    health: Arc<WorkerHealth>,
    cancel: CancellationToken,
) -> bool {
    let place = format!("{}/{}/{}", config.name, topic, partition.id());
    let labels =
        SourceLabels { pipeline: config.name.clone(), topic: topic.clone(), partition: partition.id().to_string() };
    let restarts = shared.metrics.worker_restarts.get_or_create(&labels).clone();
    let up = shared.metrics.worker_up.get_or_create(&labels).clone();
    let mut backoff = FIRST_BACKOFF;
    let in_flight = Arc::new(InFlight::default());
    let mut quarantine = Quarantine::default();
    loop {
        let started = Instant::now();
        health.set_state(WorkerState::Starting);
        quarantine.forget_before(health.committed.load(Ordering::Acquire));
        // Aborted with the supervisor: a reload that cuts off a stalled pipeline must not
        // leave its worker running beside the replacement.
        let mut attempt = AbortOnDrop(tokio::spawn({
            let (shared, config, topic, partition, health, cancel) =
                (shared.clone(), config.clone(), topic.clone(), partition.clone(), health.clone(), cancel.clone());
            let (in_flight, quarantine) = (in_flight.clone(), quarantine.clone());
            async move {
                let worker = Worker::new(shared, config, &topic, partition, health, in_flight, quarantine)?;
                worker.run(cancel).await
            }
        }));
        up.set(1);
        let mut clean = false;
        let error = match (&mut attempt.0).await {
            Ok(Ok(committed)) => {
                clean = committed;
                None
            }
            Ok(Err(e)) => Some(format!("{e:#}")),
            Err(e) if e.is_panic() => {
                let message = panic_message(e.into_panic());
                for offset in in_flight.take_dead_lettered() {
                    quarantine.dead_lettered(offset);
                }
                if let Some(mut blame) = in_flight.take() {
                    blame.processor = blame.processor.min(config.processors.len().saturating_sub(1));
                    let (from, to, processor) = (blame.range.start, blame.range.end, blame.processor);
                    match quarantine.learn(&blame, &message, in_flight.successes()) {
                        Learned::Suspect => {
                            // Narrowing down a poison event is progress, not a failure loop.
                            backoff = FIRST_BACKOFF;
                            tracing::error!(place, from, to, processor, error = %message,
                                "a processor panicked on these events; processing them one at a time");
                        }
                        Learned::Poison => {
                            backoff = FIRST_BACKOFF;
                            tracing::error!(place, offset = from, processor, error = %message,
                                "a processor panicked on this event alone; it goes to the dead-letter topic");
                        }
                        Learned::Nothing => {}
                        Learned::GaveUp => tracing::error!(place, offset = from, processor, error = %message,
                            "a processor panicked on every one of several events in a row: its state, not the \
                             events, is taken to be at fault; restarting with backoff instead"),
                    }
                }
                Some(format!("panicked: {message}"))
            }
            Err(e) => Some(e.to_string()),
        };
        in_flight.take();
        for offset in in_flight.take_dead_lettered() {
            quarantine.dead_lettered(offset);
        }
        up.set(0);
        if cancel.is_cancelled() {
            if let Some(error) = &error {
                tracing::warn!(place, error, "pipeline worker stopped at shutdown with an error");
            }
            health.set_state(WorkerState::Stopped);
            return clean && error.is_none();
        }
        let error = error.unwrap_or_else(|| "stopped without being asked to".into());
        if started.elapsed() >= HEALTHY_RUN {
            backoff = FIRST_BACKOFF;
        }
        let n = health.failed(error.clone());
        restarts.inc();
        tracing::error!(
            place,
            error,
            restarts = n,
            retry_in_ms = backoff.as_millis() as u64,
            "pipeline worker failed; restarting from its last checkpoint"
        );
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = cancel.cancelled() => {
                health.set_state(WorkerState::Stopped);
                return false;
            }
        }
        backoff = backoff.saturating_mul(2).min(MAX_BACKOFF);
    }
}

/// A task aborted when this is dropped.
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn panic_message(payload: Box<dyn std::any::Any + Send>) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "(no message)".into()
    }
}
