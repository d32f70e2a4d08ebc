//! The aligned checkpoint: every sink flushes and commits, side outputs become durable,
//! then the offset and the processors' and sinks' state are stored together.
//!
//! Sink state is stored by sink name — each entry of the checkpoint's `sinks` list is
//! `{"sink": <name>, "state": <state>, "batch_target": <n>, "concurrency_limit": <n>}`,
//! the last two being what the sink's controller learned, so that a restart starts from
//! them — so reordering sinks gives each its own state back. Entries of sinks that are no longer configured are carried into every later
//! checkpoint (and reported at start), never dropped: adding the sink back finds them.
//! A checkpoint written before names were stored holds bare states by position; it is
//! read by position once and rewritten by name.

use serde_json::Value;
use tokio::sync::{mpsc, oneshot};

use super::fan_out::SinkMsg;
use super::worker::Worker;
use crate::checkpoint::Checkpoint;
use crate::config::PipelineConfig;

/// One sink's entry of a checkpoint.
#[derive(Debug)]
struct Entry {
    name: String,
    state: Value,
    learned: Learned,
}

/// What a sink's controller had learned at a checkpoint.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) struct Learned {
    /// The batch target.
    pub(super) batch_target: Option<usize>,
    /// The concurrency limit.
    pub(super) concurrency_limit: Option<u32>,
}

/// Sink states of a checkpoint, by sink name.
#[derive(Debug, Default)]
pub(super) struct SinkStates {
    /// In checkpoint order.
    entries: Vec<Entry>,
}

/// One entry of the named format, or `None` when it is not one.
fn named_entry(entry: &Value) -> Option<Entry> {
    let Value::Object(m) = entry else { return None };
    let mut learned = Learned::default();
    for (key, value) in m {
        match key.as_str() {
            "sink" | "state" => {}
            // A learned value out of range is forgotten, not trusted.
            "batch_target" => learned.batch_target = value.as_u64().and_then(|v| usize::try_from(v).ok()),
            "concurrency_limit" => learned.concurrency_limit = value.as_u64().and_then(|v| u32::try_from(v).ok()),
            // What a later version learns is left to it.
            _ => {}
        }
    }
    Some(Entry { name: m.get("sink")?.as_str()?.to_owned(), state: m.get("state")?.clone(), learned })
}

impl SinkStates {
    /// Reads the sink states of `saved`, reporting states of sinks `config` lacks.
    pub(super) fn from_checkpoint(saved: Option<&Checkpoint>, config: &PipelineConfig) -> SinkStates {
        let Some(saved) = saved else { return SinkStates::default() };
        let named: Option<Vec<Entry>> = saved.sinks.iter().map(named_entry).collect();
        let entries = match named {
            Some(entries) => entries,
            None => {
                tracing::info!(pipeline = %config.name,
                    "the checkpoint stores sink state by position (an older format): matching it to sinks by position once");
                config
                    .sinks
                    .iter()
                    .map(|s| s.name.clone())
                    .zip(saved.sinks.iter().cloned())
                    .map(|(name, state)| Entry { name, state, learned: Learned::default() })
                    .collect()
            }
        };
        for e in &entries {
            if !config.sinks.iter().any(|s| s.name == e.name) {
                tracing::warn!(pipeline = %config.name, sink = %e.name,
                    "the checkpoint holds state of a sink that is not configured; it is kept for when the sink returns");
            }
        }
        SinkStates { entries }
    }

    /// The state of sink `name` (`Null`: none was checkpointed).
    pub(super) fn get(&self, name: &str) -> Value {
        self.entries.iter().find(|e| e.name == name).map_or(Value::Null, |e| e.state.clone())
    }

    /// Whether the checkpoint holds state for sink `name`.
    pub(super) fn has(&self, name: &str) -> bool {
        self.entries.iter().any(|e| e.name == name)
    }

    /// What sink `name`'s controller had learned at the checkpoint.
    pub(super) fn learned(&self, name: &str) -> Learned {
        self.entries.iter().find(|e| e.name == name).map(|e| e.learned).unwrap_or_default()
    }

    /// Records the state of sink `name`.
    fn set(&mut self, name: &str, state: Value, learned: Learned) {
        match self.entries.iter_mut().find(|e| e.name == name) {
            Some(entry) => {
                entry.state = state;
                entry.learned = learned;
            }
            None => self.entries.push(Entry { name: name.to_owned(), state, learned }),
        }
    }

    fn to_checkpoint(&self) -> Vec<Value> {
        self.entries
            .iter()
            .map(|e| {
                let mut m = serde_json::Map::new();
                m.insert("sink".into(), Value::from(e.name.clone()));
                m.insert("state".into(), e.state.clone());
                if let Some(t) = e.learned.batch_target {
                    m.insert("batch_target".into(), Value::from(t));
                }
                if let Some(l) = e.learned.concurrency_limit {
                    m.insert("concurrency_limit".into(), Value::from(l));
                }
                Value::Object(m)
            })
            .collect()
    }
}

impl Worker {
    pub(super) async fn commit(&mut self, offset: u64, sinks: &[mpsc::Sender<SinkMsg>]) -> anyhow::Result<()> {
        let mut replies = Vec::with_capacity(sinks.len());
        for tx in sinks {
            let (reply, rx) = oneshot::channel();
            tx.send(SinkMsg::Commit(reply)).await.map_err(|_| anyhow::anyhow!("a sink task stopped"))?;
            replies.push(rx);
        }
        for (rx, sink) in replies.into_iter().zip(&self.config.sinks) {
            let committed = rx
                .await
                .map_err(|_| anyhow::anyhow!("sink '{}' stopped", sink.name))?
                .map_err(|e| anyhow::anyhow!("sink '{}' commit: {e:#}", sink.name))?;
            let learned =
                Learned { batch_target: Some(committed.batch_target), concurrency_limit: committed.concurrency_limit };
            self.sink_states.set(&sink.name, committed.state, learned);
        }
        self.side.make_durable().await?;
        // A processor's checkpoint may write and fsync its own files (dedup's journal):
        // on the pipelines' runtime the other tasks of this thread move elsewhere meanwhile.
        // Only then: handing the thread's tasks over costs a thread switch, and the
        // tasks' allocations then spread over more threads' heaps.
        let writes_files = self.processors.iter().any(|p| p.checkpoint_writes_files());
        let mut snapshot = || {
            super::processor_states::snapshot(
                &mut self.processors,
                &self.config,
                &self.processor_ids,
                &self.unconfigured_states,
            )
        };
        let processors = match tokio::runtime::Handle::current().runtime_flavor() {
            tokio::runtime::RuntimeFlavor::MultiThread if writes_files => tokio::task::block_in_place(snapshot)?,
            _ => snapshot()?,
        };
        let checkpoint = Checkpoint { offset, processors, sinks: self.sink_states.to_checkpoint() };
        let (file, lease) = (self.checkpoint.clone(), self.lease.clone());
        tokio::task::spawn_blocking(move || {
            // Runs to its end even if the worker is aborted meanwhile: it holds the lease.
            let _lease = lease;
            file.store(&checkpoint)
        })
        .await??;
        for processor in &mut self.processors {
            processor.checkpoint_stored();
        }
        if !self.state_dirs_swept {
            super::processor_states::sweep_state_dirs(&self.checkpoint, &self.processor_ids, &self.unconfigured_states);
            self.state_dirs_swept = true;
        }
        self.health.committed.store(offset, std::sync::atomic::Ordering::Release);
        self.report_committed(offset);
        if let Some(replay) = &self.replay {
            replay.forget_before(offset);
        }
        Ok(())
    }

    /// Tells the log (whose retention reports deleting what a pipeline has not read) and
    /// the metrics where this partition's pipeline stands.
    pub(super) fn report_committed(&self, offset: u64) {
        self.partition.set_consumer_offset(&self.config.name, offset);
        self.committed_offset.set(i64::try_from(offset).unwrap_or(i64::MAX));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(sinks: &[&str]) -> PipelineConfig {
        let sinks: Vec<serde_json::Value> =
            sinks.iter().map(|name| serde_json::json!({"name": name, "type": "stdout"})).collect();
        serde_json::from_value(serde_json::json!({"name": "p", "topics": ["t"], "sinks": sinks})).unwrap()
    }

    fn checkpoint(sinks: Vec<Value>) -> Checkpoint {
        Checkpoint { offset: 1, processors: Vec::new(), sinks }
    }

    fn learned(batch_target: usize, concurrency_limit: u32) -> Learned {
        Learned { batch_target: Some(batch_target), concurrency_limit: Some(concurrency_limit) }
    }

    #[test]
    fn sink_state_and_what_controllers_learned_come_back_by_name() {
        let mut states = SinkStates::default();
        states.set("a", serde_json::json!({"seq": 1}), learned(3125, 7));
        states.set("b", Value::Null, learned(40, 1));
        let saved = checkpoint(states.to_checkpoint());
        let back = SinkStates::from_checkpoint(Some(&saved), &config(&["b", "a"]));
        assert_eq!((back.get("a"), back.learned("a")), (serde_json::json!({"seq": 1}), learned(3125, 7)));
        assert_eq!(back.learned("b"), learned(40, 1));
        assert_eq!(back.learned("c"), Learned::default());
    }

    #[test]
    fn a_learned_value_out_of_range_is_forgotten() {
        let absurd = checkpoint(vec![serde_json::json!({"sink": "a", "state": 1, "concurrency_limit": u64::MAX})]);
        let back = SinkStates::from_checkpoint(Some(&absurd), &config(&["a"]));
        assert_eq!((back.get("a"), back.learned("a")), (serde_json::json!(1), Learned::default()));
    }

    #[test]
    fn older_checkpoints_without_targets_or_names_still_read() {
        let by_name = checkpoint(vec![serde_json::json!({"sink": "a", "state": 7})]);
        let back = SinkStates::from_checkpoint(Some(&by_name), &config(&["a"]));
        assert_eq!((back.get("a"), back.learned("a")), (serde_json::json!(7), Learned::default()));
        let by_position = checkpoint(vec![serde_json::json!({"seq": 2, "len": 9})]);
        let back = SinkStates::from_checkpoint(Some(&by_position), &config(&["a"]));
        assert_eq!(back.get("a"), serde_json::json!({"seq": 2, "len": 9}));
    }
}
