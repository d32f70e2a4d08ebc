//! The aligned checkpoint: every sink flushes and commits, side outputs become durable,
//! then the offset and the processors' and sinks' state are stored together.
//!
//! Sink state is stored by sink name — each entry of the checkpoint's `sinks` list is
//! `{"sink": <name>, "state": <state>, "batch_target": <n>}`, the last being what
//! adaptive batching learned, so that a restart starts from it — so reordering sinks gives each its own state
//! back. Entries of sinks that are no longer configured are carried into every later
//! checkpoint (and reported at start), never dropped: adding the sink back finds them.
//! A checkpoint written before names were stored holds bare states by position; it is
//! read by position once and rewritten by name.

use serde_json::Value;
use tokio::sync::{mpsc, oneshot};

use super::fan_out::SinkMsg;
use super::worker::Worker;
use crate::checkpoint::Checkpoint;
use crate::config::PipelineConfig;

/// Sink states of a checkpoint, by sink name.
#[derive(Debug, Default)]
pub(super) struct SinkStates {
    /// `(name, state, batch target)` in checkpoint order.
    entries: Vec<(String, Value, Option<usize>)>,
}

impl SinkStates {
    /// Reads the sink states of `saved`, reporting states of sinks `config` lacks.
    pub(super) fn from_checkpoint(saved: Option<&Checkpoint>, config: &PipelineConfig) -> SinkStates {
        let Some(saved) = saved else { return SinkStates::default() };
        let named: Option<Vec<(String, Value, Option<usize>)>> = saved
            .sinks
            .iter()
            .map(|entry| match entry {
                Value::Object(m) if (2..=3).contains(&m.len()) => {
                    let target = m.get("batch_target").and_then(Value::as_u64).and_then(|t| usize::try_from(t).ok());
                    if m.len() == 3 && target.is_none() {
                        return None;
                    }
                    Some((m.get("sink")?.as_str()?.to_owned(), m.get("state")?.clone(), target))
                }
                _ => None,
            })
            .collect();
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
                    .map(|(n, s)| (n, s, None))
                    .collect()
            }
        };
        for (name, _, _) in &entries {
            if !config.sinks.iter().any(|s| &s.name == name) {
                tracing::warn!(pipeline = %config.name, sink = %name,
                    "the checkpoint holds state of a sink that is not configured; it is kept for when the sink returns");
            }
        }
        SinkStates { entries }
    }

    /// The state of sink `name` (`Null`: none was checkpointed).
    pub(super) fn get(&self, name: &str) -> Value {
        self.entries.iter().find(|(n, _, _)| n == name).map_or(Value::Null, |(_, s, _)| s.clone())
    }

    /// The adaptive batch target of sink `name` at the checkpoint, if one was stored.
    pub(super) fn batch_target(&self, name: &str) -> Option<usize> {
        self.entries.iter().find(|(n, _, _)| n == name).and_then(|(_, _, t)| *t)
    }

    /// Records the state of sink `name`.
    fn set(&mut self, name: &str, state: Value, batch_target: usize) {
        match self.entries.iter_mut().find(|(n, _, _)| n == name) {
            Some(entry) => {
                entry.1 = state;
                entry.2 = Some(batch_target);
            }
            None => self.entries.push((name.to_owned(), state, Some(batch_target))),
        }
    }

    fn to_checkpoint(&self) -> Vec<Value> {
        self.entries
            .iter()
            .map(|(name, state, target)| match target {
                Some(t) => serde_json::json!({"sink": name, "state": state, "batch_target": t}),
                None => serde_json::json!({"sink": name, "state": state}),
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
            self.sink_states.set(&sink.name, committed.state, committed.batch_target);
        }
        self.side.make_durable().await?;
        let checkpoint = Checkpoint {
            offset,
            processors: super::processor_states::snapshot(
                &self.processors,
                &self.config,
                &self.processor_ids,
                &self.unconfigured_states,
            ),
            sinks: self.sink_states.to_checkpoint(),
        };
        let file = self.checkpoint.clone();
        tokio::task::spawn_blocking(move || file.store(&checkpoint)).await??;
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

    #[test]
    fn sink_state_and_learned_batch_targets_come_back_by_name() {
        let mut states = SinkStates::default();
        states.set("a", serde_json::json!({"seq": 1}), 3125);
        states.set("b", Value::Null, 40);
        let saved = checkpoint(states.to_checkpoint());
        let back = SinkStates::from_checkpoint(Some(&saved), &config(&["b", "a"]));
        assert_eq!((back.get("a"), back.batch_target("a")), (serde_json::json!({"seq": 1}), Some(3125)));
        assert_eq!(back.batch_target("b"), Some(40));
        assert_eq!(back.batch_target("c"), None);
    }

    #[test]
    fn older_checkpoints_without_targets_or_names_still_read() {
        let by_name = checkpoint(vec![serde_json::json!({"sink": "a", "state": 7})]);
        let back = SinkStates::from_checkpoint(Some(&by_name), &config(&["a"]));
        assert_eq!((back.get("a"), back.batch_target("a")), (serde_json::json!(7), None));
        let by_position = checkpoint(vec![serde_json::json!({"seq": 2, "len": 9})]);
        let back = SinkStates::from_checkpoint(Some(&by_position), &config(&["a"]));
        assert_eq!(back.get("a"), serde_json::json!({"seq": 2, "len": 9}));
    }
}
