//! What `flowgate pipelines list|status` and `GET /v1/pipelines[/{name}]` show: each
//! pipeline's state and lag, and per partition its committed offset, lag, checkpoint,
//! processor state sizes and sinks.
//!
//! Built from the workers' live health, the log and the checkpoint files (their header
//! lines alone), when asked: nothing here runs on the pipelines' path.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use flowgate_log::Log;
use serde::Serialize;

use super::supervisor::{PipelineHealth, WorkerState, WorkerStatus};
use super::SinkStatus;
use crate::checkpoint::CheckpointFile;

/// One pipeline, in a line.
#[derive(Clone, Debug, Serialize)]
pub struct PipelineSummary {
    /// Pipeline name.
    pub name: String,
    /// Source topics.
    pub topics: Vec<String>,
    /// `running`, `paused`, `starting`, `failing` (a worker failed and waits to restart)
    /// or `stopped`.
    pub state: &'static str,
    /// Events stored and not yet committed, over every partition it reads (its replay
    /// topic's included).
    pub lag_events: u64,
    /// The largest of its partitions' `lag_seconds` (0 when caught up).
    pub lag_seconds: f64,
    /// Age of the oldest of its partitions' last checkpoints (none before the first).
    pub last_checkpoint_age_seconds: Option<f64>,
    /// Worker failures since the pipeline last started (engine start, reload, resume),
    /// each followed by a restart.
    pub worker_restarts: u64,
}

/// One pipeline in full.
#[derive(Clone, Debug, Serialize)]
pub struct PipelineStatus {
    /// The pipeline in a line.
    #[serde(flatten)]
    pub summary: PipelineSummary,
    /// Each partition it reads.
    pub partitions: Vec<PartitionStatus>,
}

/// One (pipeline, topic, partition).
#[derive(Clone, Debug, Serialize)]
pub struct PartitionStatus {
    /// Source topic (`_replay.<pipeline>` for its dead-letter replays).
    pub topic: String,
    /// Source partition.
    pub partition: u32,
    /// What its worker is doing.
    pub state: WorkerState,
    /// The committed offset: the next event it reads after a restart.
    pub committed_offset: u64,
    /// The partition's end offset.
    pub end_offset: u64,
    /// `end_offset - committed_offset`.
    pub lag_events: u64,
    /// Age of the next event to read, by the first timestamp of the stored batch that
    /// holds it (0 when caught up).
    pub lag_seconds: f64,
    /// Age of its checkpoint file.
    pub last_checkpoint_age_seconds: Option<f64>,
    /// Worker failures since the pipeline last started.
    pub restarts: u64,
    /// Why it last failed.
    pub last_error: Option<String>,
    /// Size in bytes of each stateful processor's state in the last checkpoint.
    pub processor_state_bytes: BTreeMap<String, u64>,
    /// Each sink instance of this partition: breaker, batch target, retries, last error.
    pub sinks: Vec<SinkStatus>,
    /// Batches waiting for each sink.
    pub sink_queues: Vec<super::SinkQueue>,
}

/// Every pipeline, in configuration order.
pub fn list(health: &PipelineHealth, log: &Log, data_dir: &Path) -> Vec<PipelineSummary> {
    statuses(health, log, data_dir, None).into_iter().map(|s| s.summary).collect()
}

/// One pipeline, or `None` when no pipeline has that name.
pub fn status(health: &PipelineHealth, log: &Log, data_dir: &Path, pipeline: &str) -> Option<PipelineStatus> {
    statuses(health, log, data_dir, Some(pipeline)).pop()
}

fn statuses(health: &PipelineHealth, log: &Log, data_dir: &Path, only: Option<&str>) -> Vec<PipelineStatus> {
    let now = flowgate_core::time::now_ms();
    let mut sinks: HashMap<(String, String, u32), Vec<SinkStatus>> = HashMap::new();
    for s in health.sinks() {
        if only.is_none_or(|name| name == s.pipeline) {
            sinks.entry((s.pipeline.clone(), s.topic.clone(), s.partition)).or_default().push(s);
        }
    }
    let mut out: Vec<PipelineStatus> = Vec::new();
    for worker in health.workers() {
        if only.is_some_and(|name| name != worker.pipeline) {
            continue;
        }
        let place = (worker.pipeline.clone(), worker.topic.clone(), worker.partition);
        let partition = partition_status(&worker, log, data_dir, now, sinks.remove(&place).unwrap_or_default());
        match out.last_mut() {
            Some(p) if p.summary.name == worker.pipeline => p.partitions.push(partition),
            _ => out.push(PipelineStatus { summary: summarize(&worker.pipeline), partitions: vec![partition] }),
        }
    }
    for p in &mut out {
        sum_up(p);
    }
    out
}

fn summarize(name: &str) -> PipelineSummary {
    PipelineSummary {
        name: name.to_owned(),
        topics: Vec::new(),
        state: "running",
        lag_events: 0,
        lag_seconds: 0.0,
        last_checkpoint_age_seconds: None,
        worker_restarts: 0,
    }
}

/// Fills a pipeline's summary from its partitions.
fn sum_up(p: &mut PipelineStatus) {
    let replays = super::replay::replay_topic(&p.summary.name);
    let s = &mut p.summary;
    // The replay worker waits, shown as starting, until something is replayed: its
    // state says nothing of the pipeline's.
    let sources: Vec<&PartitionStatus> = p.partitions.iter().filter(|w| w.topic != replays).collect();
    for w in &p.partitions {
        s.lag_events = s.lag_events.saturating_add(w.lag_events);
        s.lag_seconds = s.lag_seconds.max(w.lag_seconds);
        s.worker_restarts = s.worker_restarts.saturating_add(w.restarts);
    }
    for w in &sources {
        if !s.topics.contains(&w.topic) {
            s.topics.push(w.topic.clone());
        }
        s.last_checkpoint_age_seconds = match (s.last_checkpoint_age_seconds, w.last_checkpoint_age_seconds) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        };
    }
    let any = |state: WorkerState| sources.iter().any(|w| w.state == state);
    let failing = p
        .partitions
        .iter()
        .any(|w| w.state == WorkerState::Restarting || (w.state == WorkerState::Starting && w.restarts > 0));
    s.state = if failing {
        "failing"
    } else if !sources.is_empty() && sources.iter().all(|w| w.state == WorkerState::Paused) {
        "paused"
    } else if any(WorkerState::Starting) {
        "starting"
    } else if !sources.is_empty() && sources.iter().all(|w| w.state == WorkerState::Stopped) {
        "stopped"
    } else {
        "running"
    };
}

fn partition_status(
    worker: &WorkerStatus,
    log: &Log,
    data_dir: &Path,
    now: i64,
    sinks: Vec<SinkStatus>,
) -> PartitionStatus {
    let source = log.topic(&worker.topic).and_then(|t| t.partition(worker.partition).ok().cloned());
    let end_offset = source.as_ref().map_or(worker.committed_offset, |p| p.end_offset());
    let lag_events = end_offset.saturating_sub(worker.committed_offset);
    let lag_seconds = match &source {
        Some(p) if lag_events > 0 => {
            p.batch_timestamp_at(worker.committed_offset).ok().flatten().map_or(0.0, |ts| age(now, ts))
        }
        _ => 0.0,
    };
    let summary = CheckpointFile::new(data_dir, &worker.pipeline, &worker.topic, worker.partition).summary();
    let (processor_state_bytes, last_checkpoint_age_seconds) = match summary {
        Ok(Some(s)) => (s.processor_state_bytes.into_iter().collect(), s.written_ms.map(|ms| age(now, ms))),
        // An unreadable checkpoint stops its worker, which says why in `last_error`.
        Ok(None) | Err(_) => (BTreeMap::new(), None),
    };
    PartitionStatus {
        topic: worker.topic.clone(),
        partition: worker.partition,
        state: worker.state,
        committed_offset: worker.committed_offset,
        end_offset,
        lag_events,
        lag_seconds,
        last_checkpoint_age_seconds,
        restarts: worker.restarts,
        last_error: worker.last_error.clone(),
        processor_state_bytes,
        sinks,
        sink_queues: worker.sink_queues.clone(),
    }
}

/// Seconds from `ms` to `now`, 0 for a time in the future.
fn age(now: i64, ms: i64) -> f64 {
    now.saturating_sub(ms).max(0) as f64 / 1000.0
}
