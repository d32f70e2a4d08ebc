//! The aligned checkpoint: every sink flushes and commits, side outputs become durable,
//! then the offset and the processors' and sinks' state are stored together.
//!
//! Sink state is stored by sink name — each entry of the checkpoint's `sinks` list is
//! `{"sink": <name>, "state": <state>}` — so reordering sinks gives each its own state
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
    /// `(name, state)` in checkpoint order.
    entries: Vec<(String, Value)>,
}

impl SinkStates {
    /// Reads the sink states of `saved`, reporting states of sinks `config` lacks.
    pub(super) fn from_checkpoint(saved: Option<&Checkpoint>, config: &PipelineConfig) -> SinkStates {
        let Some(saved) = saved else { return SinkStates::default() };
        let named: Option<Vec<(String, Value)>> = saved
            .sinks
            .iter()
            .map(|entry| match entry {
                Value::Object(m) if m.len() == 2 => {
                    Some((m.get("sink")?.as_str()?.to_owned(), m.get("state")?.clone()))
                }
                _ => None,
            })
            .collect();
        let entries = match named {
            Some(entries) => entries,
            None => {
                tracing::info!(pipeline = %config.name,
                    "the checkpoint stores sink state by position (an older format): matching it to sinks by position once");
                config.sinks.iter().map(|s| s.name.clone()).zip(saved.sinks.iter().cloned()).collect()
            }
        };
        for (name, _) in &entries {
            if !config.sinks.iter().any(|s| &s.name == name) {
                tracing::warn!(pipeline = %config.name, sink = %name,
                    "the checkpoint holds state of a sink that is not configured; it is kept for when the sink returns");
            }
        }
        SinkStates { entries }
    }

    /// The state of sink `name` (`Null`: none was checkpointed).
    pub(super) fn get(&self, name: &str) -> Value {
        self.entries.iter().find(|(n, _)| n == name).map_or(Value::Null, |(_, s)| s.clone())
    }

    /// Records the state of sink `name`.
    fn set(&mut self, name: &str, state: Value) {
        match self.entries.iter_mut().find(|(n, _)| n == name) {
            Some(entry) => entry.1 = state,
            None => self.entries.push((name.to_owned(), state)),
        }
    }

    fn to_checkpoint(&self) -> Vec<Value> {
        self.entries.iter().map(|(name, state)| serde_json::json!({"sink": name, "state": state})).collect()
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
            let state = rx
                .await
                .map_err(|_| anyhow::anyhow!("sink '{}' stopped", sink.name))?
                .map_err(|e| anyhow::anyhow!("sink '{}' commit: {e:#}", sink.name))?;
            self.sink_states.set(&sink.name, state);
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
        Ok(())
    }

    /// Tells the log (whose retention reports deleting what a pipeline has not read) and
    /// the metrics where this partition's pipeline stands.
    pub(super) fn report_committed(&self, offset: u64) {
        self.partition.set_consumer_offset(&self.config.name, offset);
        self.committed_offset.set(i64::try_from(offset).unwrap_or(i64::MAX));
    }
}
