//! The worker's side outputs: dead letters of processors and of unreadable batches (to
//! [`DLQ_TOPIC`], see [`super::dead_letters`]) and late events (to their topic).
//!
//! They are appended to the log before the batch that produced them goes on, and the
//! next checkpoint waits until they are durable: a checkpoint never moves past an event
//! whose dead letter or late copy could still be lost. An append that fails fails the
//! worker, which restarts from its last checkpoint and produces them again.

use std::collections::HashMap;

use flowgate_core::BatchBuilder;
use flowgate_log::append::Route;
use flowgate_log::Log;

use super::dead_letters::{Category, Entry, FailedAt, SIDE_BATCH_BYTES};
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
                    if b.records_len() >= SIDE_BATCH_BYTES {
                        self.side.append(&topic, Route::ByKey, &mut b)?;
                    }
                }
                // By key, as producers' events are: a pipeline reading the late topic
                // keeps a key's state in one partition.
                self.side.append(&topic, Route::ByKey, &mut b)?;
            }
        }
        if !outputs.dead_letters.is_empty() {
            self.count_dead_letters(outputs.dead_letters.len());
            let now = flowgate_core::time::now_ms();
            let mut dead = outputs.dead_letters;
            let payloads: Vec<bytes::Bytes> = dead.iter_mut().map(|dl| dl.event.payload().clone()).collect();
            let (pipeline, processor, topic) = (&self.config.name, &self.processor_labels[i].processor, &self.topic);
            let entries = dead.iter().zip(&payloads).map(|(dl, payload)| {
                let entry = Entry {
                    pipeline,
                    at: FailedAt::Processor(processor),
                    category: Category::ProcessingError,
                    error: &dl.error,
                    code: None,
                    attempts: 1,
                    first_failure_ms: now,
                    last_failure_ms: now,
                    topic,
                    partition: dl.event.partition,
                    offset: dl.event.offset,
                    last_offset: None,
                    timestamp: dl.event.timestamp,
                    event: Some(&payload[..]),
                };
                (entry, dl.event.key.as_deref())
            });
            self.side.dead_letters(entries)?;
        }
        Ok(())
    }

    /// Sends an event processor `i` panicked on, alone, to the dead-letter topic,
    /// unprocessed.
    pub(super) fn dead_letter_poison(&mut self, i: usize, event: PipelineEvent, message: &str) -> anyhow::Result<()> {
        self.count_dead_letters(1);
        self.shared.metrics.processor_failed.get_or_create(&self.processor_labels[i]).inc();
        let error = format!("the processor panicked on this event: {message}");
        let processor = self.processor_labels[i].processor.clone();
        self.dead_letter_one(FailedAt::Processor(&processor), Category::Panicked, &error, 2, event)
    }

    /// Sends one event, failed now, to the dead-letter topic (the caller counts it).
    pub(super) fn dead_letter_one(
        &mut self,
        at: FailedAt<'_>,
        category: Category,
        error: &str,
        attempts: u32,
        mut event: PipelineEvent,
    ) -> anyhow::Result<()> {
        let now = flowgate_core::time::now_ms();
        let payload = event.payload().clone();
        let entry = Entry {
            pipeline: &self.config.name,
            at,
            category,
            error,
            code: None,
            attempts,
            first_failure_ms: now,
            last_failure_ms: now,
            topic: &self.topic,
            partition: event.partition,
            offset: event.offset,
            last_offset: None,
            timestamp: event.timestamp,
            event: Some(&payload[..]),
        };
        self.side.dead_letters([(entry, event.key.as_deref())])
    }

    /// Sends one dead letter per stored batch that cannot be decoded: its offsets and
    /// the error (its bytes cannot be trusted to be events).
    pub(super) fn dead_letter_unreadable(&mut self, batches: Vec<UnreadableBatch>) -> anyhow::Result<()> {
        if batches.is_empty() {
            return Ok(());
        }
        self.count_dead_letters(batches.len());
        let now = flowgate_core::time::now_ms();
        let errors: Vec<String> =
            batches.iter().map(|b| format!("the stored batch is unreadable: {}", b.error)).collect();
        for batch in &batches {
            tracing::error!(pipeline = %self.config.name, topic = %self.topic, partition = self.partition.id(),
                first_offset = batch.first_offset, last_offset = batch.last_offset, error = %batch.error,
                "skipping an unreadable stored batch; it is recorded in the dead-letter topic");
        }
        let partition = self.partition.id();
        let entries = batches.iter().zip(&errors).map(|(batch, error)| {
            let entry = Entry {
                pipeline: &self.config.name,
                at: FailedAt::Source,
                category: Category::Unreadable,
                error,
                code: None,
                attempts: 1,
                first_failure_ms: now,
                last_failure_ms: now,
                topic: &self.topic,
                partition,
                offset: batch.first_offset,
                last_offset: Some(batch.last_offset),
                timestamp: now,
                event: None,
            };
            (entry, None)
        });
        self.side.dead_letters(entries)
    }

    /// Makes the next checkpoint wait until the dead-letter topic is durable as far as
    /// it is written now: for dead letters an earlier run of this worker wrote past the
    /// last checkpoint, which this run does not write again.
    pub(super) fn cover_earlier_dead_letters(&mut self) {
        self.side.cover(DLQ_TOPIC);
    }

    pub(super) fn count_dead_letters(&self, n: usize) {
        self.shared
            .metrics
            .dead_letters
            .get_or_create(&PipelineLabels { pipeline: self.config.name.clone() })
            .inc_by(n as u64);
    }
}
