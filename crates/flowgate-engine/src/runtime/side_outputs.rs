//! Side outputs: dead letters (to [`DLQ_TOPIC`]) and late events (to their topic).
//!
//! They are appended to the log before the batch that produced them goes on, and the
//! next checkpoint waits until they are durable: a checkpoint never moves past an event
//! whose dead letter or late copy could still be lost. An append that fails fails the
//! worker, which restarts from its last checkpoint and produces them again.

use std::collections::HashMap;

use flowgate_core::{BatchBuilder, Codec, ProducerStamp};
use flowgate_log::Log;

use super::decode::UnreadableBatch;
use super::worker::Worker;
use super::DLQ_TOPIC;
use crate::config::{PipelineConfig, ProcessorKind};
use crate::event::PipelineEvent;
use crate::metrics::PipelineLabels;
use crate::processors::Outputs;

/// Creates the side topics a pipeline writes to (the dead-letter topic and every late
/// topic) if they are missing, as for its source topics: whatever `auto_create_topics`
/// says about clients, the engine's own outputs must be writable.
pub(super) fn ensure_topics(log: &Log, config: &PipelineConfig) -> anyhow::Result<()> {
    super::ensure_topic(log, DLQ_TOPIC)?;
    for p in &config.processors {
        if let ProcessorKind::Aggregate(a) = &p.kind {
            if let Some(topic) = &a.late_topic {
                super::ensure_topic(log, topic)?;
            }
        }
    }
    Ok(())
}

impl Worker {
    /// Writes the late events and dead letters processor `i` produced.
    pub(super) fn handle_outputs(&mut self, i: usize, outputs: Outputs) -> anyhow::Result<()> {
        self.shared.metrics.record_bounds(&self.processor_labels[i], &outputs.bounds);
        if !outputs.late.is_empty() {
            self.shared.metrics.late_events.get_or_create(&self.processor_labels[i]).inc_by(outputs.late.len() as u64);
            let mut by_topic: HashMap<String, Vec<PipelineEvent>> = HashMap::new();
            for (topic, event) in outputs.late {
                if let Some(t) = topic {
                    by_topic.entry(t).or_default().push(event);
                }
            }
            for (topic, mut events) in by_topic {
                let mut b = BatchBuilder::new();
                for e in &mut events {
                    // The event as the pipeline made it so far (a remap's result), not as stored.
                    let payload = e.payload().clone();
                    b.push(e.timestamp, e.key.as_deref(), e.client_id.as_deref(), std::iter::empty(), &payload);
                }
                self.append(&topic, &mut b)?;
            }
        }
        if !outputs.dead_letters.is_empty() {
            self.count_dead_letters(outputs.dead_letters.len());
            let mut b = BatchBuilder::new();
            for mut dl in outputs.dead_letters {
                let payload = dl.event.payload().clone();
                let original = serde_json::from_slice::<serde_json::Value>(&payload)
                    .unwrap_or_else(|_| serde_json::Value::String(String::from_utf8_lossy(&payload).into_owned()));
                let envelope = serde_json::json!({
                    "pipeline": self.config.name,
                    "processor": self.processor_labels[i].processor,
                    "error": dl.error,
                    "topic": self.topic,
                    "partition": dl.event.partition,
                    "offset": dl.event.offset,
                    "timestamp": dl.event.timestamp,
                    "event": original,
                });
                b.push(
                    dl.event.timestamp,
                    dl.event.key.as_deref(),
                    None,
                    std::iter::empty(),
                    &serde_json::to_vec(&envelope).unwrap_or_default(),
                );
            }
            self.append(DLQ_TOPIC, &mut b)?;
        }
        Ok(())
    }

    /// Sends one dead letter per stored batch that cannot be decoded: its offsets and
    /// the error (its bytes cannot be trusted to be events).
    pub(super) fn dead_letter_unreadable(&mut self, batches: Vec<UnreadableBatch>) -> anyhow::Result<()> {
        if batches.is_empty() {
            return Ok(());
        }
        self.count_dead_letters(batches.len());
        let now = flowgate_core::time::now_ms();
        let mut b = BatchBuilder::new();
        for batch in batches {
            tracing::error!(pipeline = %self.config.name, topic = %self.topic, partition = self.partition.id(),
                first_offset = batch.first_offset, last_offset = batch.last_offset, error = %batch.error,
                "skipping an unreadable stored batch; it is recorded in the dead-letter topic");
            let envelope = serde_json::json!({
                "pipeline": self.config.name,
                "processor": null,
                "error": format!("the stored batch is unreadable: {}", batch.error),
                "topic": self.topic,
                "partition": self.partition.id(),
                "offset": batch.first_offset,
                "last_offset": batch.last_offset,
                "timestamp": now,
                "event": null,
            });
            b.push(now, None, None, std::iter::empty(), &serde_json::to_vec(&envelope).unwrap_or_default());
        }
        self.append(DLQ_TOPIC, &mut b)
    }

    /// Makes the next checkpoint wait until the dead-letter topic is durable as far as
    /// it is written now: for dead letters an earlier run of this worker wrote past the
    /// last checkpoint, which this run does not write again.
    pub(super) fn cover_earlier_dead_letters(&mut self) {
        if let Some(t) = self.shared.log.topic(DLQ_TOPIC) {
            for p in t.partitions() {
                self.side_writes.push((p.clone(), p.end_offset()));
            }
        }
    }

    fn count_dead_letters(&self, n: usize) {
        self.shared
            .metrics
            .dead_letters
            .get_or_create(&PipelineLabels { pipeline: self.config.name.clone() })
            .inc_by(n as u64);
    }

    /// Appends a side-output batch and remembers it for the next checkpoint to wait on.
    fn append(&mut self, topic: &str, builder: &mut BatchBuilder) -> anyhow::Result<()> {
        if builder.is_empty() {
            return Ok(());
        }
        let mut batch = builder.finish(Codec::None, ProducerStamp::default())?;
        let written =
            self.shared.log.topic(topic).ok_or_else(|| {
                anyhow::anyhow!("side topic '{topic}' does not exist (deleted while the pipeline runs?)")
            });
        let written = written.and_then(|t| {
            let partition = t.partition(t.next_round_robin())?.clone();
            let outcome = partition.append(&mut batch.bytes)?;
            Ok((partition, outcome.end_offset()))
        });
        let (partition, end) = written.map_err(|e: anyhow::Error| {
            anyhow::anyhow!("cannot write to side topic '{topic}': {e:#}; the worker restarts from its last checkpoint")
        })?;
        self.side_writes.push((partition, end));
        Ok(())
    }
}
