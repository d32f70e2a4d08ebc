//! An operator's hands on a running pipeline: pause, resume, and reset (rewind or skip
//! its committed offsets), all while the engine runs (docs/pipelines.md, "Operating
//! pipelines").
//!
//! A pause stops the pipeline's workers the way a reload does (sinks flush, offsets and
//! state are checkpointed) and writes a marker, `<data_dir>/pipelines/<name>/PAUSED`, so
//! the pipeline stays paused across restarts and reloads until it is resumed. A reset
//! pauses the pipeline, takes every source partition's lease (no worker of it can write
//! any more), rewrites each partition's checkpoint with the new offset — keeping the
//! sinks' state, so a sink resumes after what it wrote and output already written is
//! never deleted, and keeping or clearing the processors' state as asked — and resumes
//! the pipeline if it was running. A reset is refused when the pipeline did not stop
//! cleanly: its checkpoint would not account for everything its sinks wrote.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::Serialize;

use tokio_util::sync::CancellationToken;

use super::pipelines::{stop_accounted, Pipelines, Running};
use super::supervisor::WorkerState;
use crate::checkpoint::{CheckpointFile, StateOwner};

/// The most a reset waits for a partition's lease once the pipeline's workers stopped
/// (what an aborted worker still had under way).
const LEASE_WAIT: Duration = Duration::from_secs(10);

/// The file whose presence keeps a pipeline paused.
fn marker(data_dir: &Path, pipeline: &str) -> PathBuf {
    data_dir.join("pipelines").join(pipeline).join("PAUSED")
}

/// Whether an operator paused `pipeline` (and did not resume it since).
pub(crate) fn is_paused(data_dir: &Path, pipeline: &str) -> bool {
    marker(data_dir, pipeline).exists()
}

/// What the pause marker holds.
#[derive(Serialize, serde::Deserialize)]
struct Mark {
    paused_at_ms: i64,
    /// Every worker stopped by committing all its sinks wrote: the checkpoints account
    /// for all the pipeline's output, so a reset may rewrite them.
    accounted: bool,
}

/// Whether the pipeline's pause marker says its checkpoints account for all its output
/// (an unreadable marker says no).
fn accounted(data_dir: &Path, pipeline: &str) -> bool {
    std::fs::read(marker(data_dir, pipeline))
        .ok()
        .and_then(|bytes| serde_json::from_slice::<Mark>(&bytes).ok())
        .is_some_and(|m| m.accounted)
}

/// Writes the pause marker (`Some(accounted)`) or removes it (`None`) durably: written
/// whole and renamed into place, file and directory synced.
fn set_paused(data_dir: &Path, pipeline: &str, paused: Option<bool>) -> anyhow::Result<()> {
    let path = marker(data_dir, pipeline);
    let dir = path.parent().expect("the marker has a directory");
    let what = if paused.is_some() { "write" } else { "remove" };
    let result = (|| -> std::io::Result<()> {
        match paused {
            Some(accounted) => {
                std::fs::create_dir_all(dir)?;
                let tmp = path.with_extension("tmp");
                let file = std::fs::File::create(&tmp)?;
                let mark = Mark { paused_at_ms: flowgate_core::time::now_ms(), accounted };
                serde_json::to_writer(&file, &mark)?;
                file.sync_all()?;
                std::fs::rename(&tmp, &path)?;
            }
            None => match std::fs::remove_file(&path) {
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
                other => other?,
            },
        }
        std::fs::File::open(dir)?.sync_all()
    })();
    result.map_err(|e| anyhow::anyhow!("cannot {what} the pause marker {}: {e}", path.display()))
}

/// Where a reset moves a pipeline's committed offsets, in each source partition.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ResetTo {
    /// The oldest stored event.
    Earliest,
    /// The end: only events stored from now on are processed.
    Latest,
    /// The first event whose timestamp is at or after this time (ms since the epoch);
    /// the end when every stored event is older.
    Time(i64),
}

/// What a reset does with the processors' state (dedup tables, open windows).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProcessorStateChoice {
    /// Start the processors empty: windows open afresh, dedup forgets what it saw.
    Clear,
    /// Keep it as of the last checkpoint (dedup then drops events it saw before).
    Keep,
}

/// Why a pipeline control was refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// No configured pipeline has this name.
    #[error("no pipeline is named '{0}' (`flowgate pipelines list` shows them)")]
    UnknownPipeline(String),
    /// The pipeline's workers did not flush and commit in time.
    #[error(
        "pipeline '{0}' did not flush and commit in time (a sink is stalled?); nothing was reset and it runs \
         as before: see `flowgate pipelines status {0}` and try again"
    )]
    NotStopped(String),
    /// The pipeline is paused, but its workers did not stop by committing all they wrote
    /// (cut off, failing, or killed while stopping).
    #[error(
        "pipeline '{0}' did not stop cleanly when it was paused (its workers were cut off, failing, or the engine \
         stopped meanwhile): its checkpoints may not account for all its sinks wrote, so a reset could delete \
         output. Resume it, let it catch up, pause it again, then reset"
    )]
    NotAccounted(String),
    /// The engine is shutting down.
    #[error("the engine is shutting down")]
    ShuttingDown,
    /// Something else went wrong; the message says what.
    #[error("{0:#}")]
    Failed(anyhow::Error),
}

/// What a control did.
#[derive(Clone, Debug, Serialize)]
pub struct ControlReport {
    /// The pipeline.
    pub pipeline: String,
    /// `running` or `paused`, after the control.
    pub state: &'static str,
    /// False when the pipeline already was in the state asked for.
    pub changed: bool,
    /// A pause whose workers did not flush in time and were cut off: they resume from
    /// their last checkpoint.
    pub cut_off: bool,
    /// For a reset: each source partition's committed offset before and after.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub partitions: Vec<Rewound>,
    /// For a reset: what happened to the processors' state.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub processor_state: Option<ProcessorStateChoice>,
}

/// One source partition's committed offset, moved by a reset.
#[derive(Clone, Debug, Serialize)]
pub struct Rewound {
    /// Source topic.
    pub topic: String,
    /// Source partition.
    pub partition: u32,
    /// The committed offset before (none when the pipeline had not committed there).
    pub from: Option<u64>,
    /// The committed offset now: the next event the pipeline reads.
    pub to: u64,
}

impl ControlReport {
    fn new(pipeline: &str, paused: bool, changed: bool) -> ControlReport {
        ControlReport {
            pipeline: pipeline.to_owned(),
            state: if paused { "paused" } else { "running" },
            changed,
            cut_off: false,
            partitions: Vec::new(),
            processor_state: None,
        }
    }
}

impl Pipelines {
    fn position(&self, pipeline: &str) -> Result<usize, ControlError> {
        self.running
            .iter()
            .position(|r| r.config.name == pipeline)
            .ok_or_else(|| ControlError::UnknownPipeline(pipeline.to_owned()))
    }

    /// Pauses a pipeline: its workers flush, commit and stop (until `deadline`, cut off
    /// after it, or when `shutdown` is cancelled), and it stays paused across reloads
    /// and restarts until [`Pipelines::resume`].
    pub async fn pause(
        &mut self,
        pipeline: &str,
        deadline: Instant,
        shutdown: &CancellationToken,
    ) -> Result<ControlReport, ControlError> {
        let i = self.position(pipeline)?;
        if self.running[i].paused {
            return Ok(ControlReport::new(pipeline, true, false));
        }
        let data_dir = self.shared.data_dir.clone();
        // Not accounted until the workers say so: a crash meanwhile leaves it paused.
        set_paused(&data_dir, pipeline, Some(false)).map_err(ControlError::Failed)?;
        let (finished, accounted) = self.halt(i, deadline, shutdown).await;
        set_paused(&data_dir, pipeline, Some(accounted)).map_err(ControlError::Failed)?;
        if finished {
            tracing::info!(pipeline, accounted, "pipeline paused");
        } else {
            tracing::warn!(
                pipeline,
                "pipeline paused; its workers did not flush in time and were cut off: \
                they resume from their last checkpoint"
            );
        }
        let mut report = ControlReport::new(pipeline, true, true);
        report.cut_off = !accounted;
        Ok(report)
    }

    /// Resumes a paused pipeline from its checkpoints.
    pub fn resume(&mut self, pipeline: &str) -> Result<ControlReport, ControlError> {
        let i = self.position(pipeline)?;
        if !self.running[i].paused {
            return Ok(ControlReport::new(pipeline, false, false));
        }
        set_paused(&self.shared.data_dir, pipeline, None).map_err(ControlError::Failed)?;
        self.relaunch(i).map_err(ControlError::Failed)?;
        tracing::info!(pipeline, "pipeline resumed");
        Ok(ControlReport::new(pipeline, false, true))
    }

    /// Moves a pipeline's committed offsets in every source partition to `to` (see the
    /// module doc), keeping or clearing its processors' state; a running pipeline is
    /// paused meanwhile (flushing until `deadline`) and resumed after. Refused when the
    /// pipeline's checkpoints may not account for all its sinks wrote.
    pub async fn reset(
        &mut self,
        pipeline: &str,
        to: ResetTo,
        processor_state: ProcessorStateChoice,
        deadline: Instant,
        shutdown: &CancellationToken,
    ) -> Result<ControlReport, ControlError> {
        let i = self.position(pipeline)?;
        let data_dir = self.shared.data_dir.clone();
        let was_running = !self.running[i].paused;
        if was_running {
            // A crash from here leaves the pipeline paused, not half reset and running.
            set_paused(&data_dir, pipeline, Some(false)).map_err(ControlError::Failed)?;
            let (_, accounted) = self.halt(i, deadline, shutdown).await;
            if !accounted {
                // Its checkpoints do not account for all its sinks wrote: rewinding
                // would have them cut back output that no checkpoint covers.
                set_paused(&data_dir, pipeline, None).map_err(ControlError::Failed)?;
                if shutdown.is_cancelled() {
                    return Err(ControlError::ShuttingDown);
                }
                self.relaunch(i).map_err(ControlError::Failed)?;
                return Err(ControlError::NotStopped(pipeline.to_owned()));
            }
            set_paused(&data_dir, pipeline, Some(true)).map_err(ControlError::Failed)?;
        } else if !accounted(&data_dir, pipeline) {
            return Err(ControlError::NotAccounted(pipeline.to_owned()));
        }
        let rewound = match self.rewrite_checkpoints(i, to, processor_state, shutdown).await {
            Ok(r) => r,
            Err(e) => {
                // Checkpoints are replaced one by one, each atomically, sink state kept:
                // the pipeline stays paused (and accounted) for the operator to reset
                // again.
                tracing::error!(pipeline, error = %format!("{e:#}"), "pipeline reset failed; the pipeline stays paused");
                return Err(ControlError::Failed(e.context(format!(
                    "the reset of pipeline '{pipeline}' failed part way; it stays paused: reset it again, then resume it"
                ))));
            }
        };
        for r in &rewound {
            tracing::info!(pipeline, topic = %r.topic, partition = r.partition, from = ?r.from, to = r.to,
                processor_state = ?processor_state, "pipeline reset");
        }
        if was_running && !shutdown.is_cancelled() {
            set_paused(&data_dir, pipeline, None).map_err(ControlError::Failed)?;
            self.relaunch(i).map_err(ControlError::Failed)?;
        }
        let mut report = ControlReport::new(pipeline, self.running[i].paused, true);
        report.partitions = rewound;
        report.processor_state = Some(processor_state);
        Ok(report)
    }

    /// Stops the workers of pipeline `i` (flushing until `deadline` or `shutdown`) and
    /// shows it paused. Returns whether every worker finished in time, and whether every
    /// one ended by committing all its sinks wrote.
    async fn halt(&mut self, i: usize, deadline: Instant, shutdown: &CancellationToken) -> (bool, bool) {
        let child = self.cancel.child_token();
        let running = &mut self.running[i];
        let supervisors = std::mem::take(&mut running.supervisors);
        let stopped = tokio::select! {
            stopped = stop_accounted(&running.cancel, supervisors, deadline) => stopped,
            // The engine stops every worker itself; their leases keep them apart.
            _ = shutdown.cancelled() => (false, false),
        };
        running.cancel.cancel();
        running.cancel = child;
        running.paused = true;
        self.health.set_pipeline_state(&running.config.name, WorkerState::Paused);
        stopped
    }

    /// Starts pipeline `i` again with its config (paused or not, as its marker says).
    /// When it cannot start, it is kept paused (marker written) so that it stays listed
    /// and can be resumed once the cause is fixed.
    fn relaunch(&mut self, i: usize) -> anyhow::Result<()> {
        let running = self.running.remove(i);
        let config = running.config.clone();
        self.forget(&config.name, false);
        let launched = self.launch((*config).clone());
        let placed = match launched {
            Ok(()) => self.running.pop().expect("launch pushed it"),
            Err(_) => {
                // A failed launch forgot what it had started; show the pipeline paused.
                let _ = set_paused(&self.shared.data_dir, &config.name, Some(false));
                Running { config, cancel: self.cancel.child_token(), supervisors: Vec::new(), paused: true }
            }
        };
        self.running.insert(i, placed);
        let names: Vec<String> = self.running.iter().map(|r| r.config.name.clone()).collect();
        self.health.order(&names);
        launched
    }

    /// Rewrites the checkpoint of every source partition of paused pipeline `i` with the
    /// offset `to` names, holding each partition's lease.
    async fn rewrite_checkpoints(
        &self,
        i: usize,
        to: ResetTo,
        processor_state: ProcessorStateChoice,
        shutdown: &CancellationToken,
    ) -> anyhow::Result<Vec<Rewound>> {
        let config = self.running[i].config.clone();
        let shared = self.shared.clone();
        let mut rewound = Vec::new();
        for topic_name in &config.topics {
            let topic = super::ensure_topic(&shared.log, topic_name)?;
            for partition in topic.partitions() {
                let p = partition.id();
                let lease = tokio::select! {
                    lease = tokio::time::timeout(LEASE_WAIT, shared.leases.acquire(&config.name, topic_name, p)) => {
                        lease.map_err(|_| {
                            anyhow::anyhow!("a worker of {topic_name}-{p} is still ending after {LEASE_WAIT:?}")
                        })?
                    }
                    _ = shutdown.cancelled() => anyhow::bail!("the engine is shutting down"),
                };
                let ids = config.processor_ids();
                let file = CheckpointFile::new(&shared.data_dir, &config.name, topic_name, p);
                let partition = partition.clone();
                let (from, offset) = tokio::task::spawn_blocking(move || -> anyhow::Result<(Option<u64>, u64)> {
                    let saved = file.load()?;
                    let from = saved.as_ref().map(|c| c.offset);
                    let offset = match to {
                        ResetTo::Earliest => partition.start_offset(),
                        ResetTo::Latest => partition.end_offset(),
                        ResetTo::Time(ms) => {
                            partition.offset_for_timestamp(ms)?.unwrap_or_else(|| partition.end_offset())
                        }
                    };
                    // Sink state stays: each sink goes on after what it wrote.
                    let mut checkpoint = saved.unwrap_or_default();
                    checkpoint.offset = offset;
                    if processor_state == ProcessorStateChoice::Clear {
                        // State of processors no longer configured is kept for their
                        // return, as the worker keeps it.
                        checkpoint.processors.retain(|p| match &p.owner {
                            StateOwner::Id { id, .. } => !ids.contains(id),
                            StateOwner::Position(_) => false,
                        });
                    }
                    file.store(&checkpoint)?;
                    drop(lease);
                    Ok((from, offset))
                })
                .await??;
                topic.partition(p)?.set_consumer_offset(&config.name, offset);
                self.health.set_committed(&config.name, topic_name, p, offset);
                rewound.push(Rewound { topic: topic_name.clone(), partition: p, from, to: offset });
            }
        }
        Ok(rewound)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_marker_is_written_and_removed_durably() {
        let dir = tempfile::tempdir().unwrap();
        assert!(!is_paused(dir.path(), "p"));
        set_paused(dir.path(), "p", Some(false)).unwrap();
        assert!(is_paused(dir.path(), "p") && !accounted(dir.path(), "p"));
        set_paused(dir.path(), "p", Some(true)).unwrap();
        assert!(is_paused(dir.path(), "p") && accounted(dir.path(), "p"));
        set_paused(dir.path(), "p", None).unwrap();
        assert!(!is_paused(dir.path(), "p") && !accounted(dir.path(), "p"));
        set_paused(dir.path(), "p", None).unwrap();
        // A torn marker keeps the pipeline paused and accounts for nothing.
        set_paused(dir.path(), "p", Some(true)).unwrap();
        std::fs::write(marker(dir.path(), "p"), b"{\"paused_at_ms\":1,\"acc").unwrap();
        assert!(is_paused(dir.path(), "p") && !accounted(dir.path(), "p"));
    }
}
