//! The worker of one (pipeline, source partition): reads the log, runs the processors,
//! hands batches to the sinks and commits at every interval.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use flowgate_log::Partition;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::decode::decode;
use super::fan_out::fan_out;
use super::sink_driver::run_sink;
use super::Shared;
use crate::checkpoint::CheckpointFile;
use crate::config::PipelineConfig;
use crate::event::PipelineEvent;
use crate::metrics::{PipelineLabels, ProcessorLabels, SinkLabels};
use crate::processors::{self, Outputs, Processor};
use crate::sink::SinkPlace;

pub(super) struct Worker {
    pub(super) shared: Arc<Shared>,
    pub(super) config: Arc<PipelineConfig>,
    pub(super) topic: String,
    pub(super) partition: Arc<Partition>,
    pub(super) processors: Vec<Box<dyn Processor>>,
    pub(super) processor_labels: Vec<ProcessorLabels>,
    pub(super) checkpoint: CheckpointFile,
    pub(super) committed: Arc<std::sync::atomic::AtomicU64>,
}


impl Worker {
    pub(super) fn new(
        shared: Arc<Shared>,
        config: Arc<PipelineConfig>,
        topic: &str,
        partition: Arc<Partition>,
    ) -> anyhow::Result<Worker> {
        let sink_names: Vec<String> = config.sinks.iter().map(|s| s.name.clone()).collect();
        let processors = processors::build(&config.processors, &sink_names)?;
        let processor_labels = processors
            .iter()
            .enumerate()
            .map(|(i, p)| ProcessorLabels {
                pipeline: config.name.clone(),
                processor: format!("{}:{}", i + 1, p.kind()),
            })
            .collect();
        let checkpoint = CheckpointFile::new(&shared.data_dir, &config.name, topic, partition.id());
        Ok(Worker {
            shared,
            config,
            topic: topic.to_owned(),
            partition,
            processors,
            processor_labels,
            checkpoint,
            committed: Arc::new(std::sync::atomic::AtomicU64::new(0)),
        })
    }

    pub(super) async fn run(mut self, cancel: CancellationToken) -> anyhow::Result<()> {
        let saved = self.checkpoint.load()?;
        let place =
            SinkPlace { pipeline: self.config.name.clone(), topic: self.topic.clone(), partition: self.partition.id() };
        let mut sinks_tx = Vec::new();
        let mut sink_tasks = JoinSet::new();
        for (i, sink_config) in self.config.sinks.iter().enumerate() {
            let mut sink = self.shared.factory.build(sink_config, &place)?;
            let state = saved.as_ref().and_then(|c| c.sinks.get(i).cloned()).unwrap_or(serde_json::Value::Null);
            sink.recover(&state).await.map_err(|e| anyhow::anyhow!("sink '{}' recovery: {e:#}", sink_config.name))?;
            let (tx, rx) = mpsc::channel(4);
            sinks_tx.push(tx);
            let labels = SinkLabels { pipeline: self.config.name.clone(), sink: sink_config.name.clone() };
            sink_tasks.spawn(run_sink(
                sink,
                rx,
                sink_config.batch.clone(),
                1u64 << i,
                labels,
                self.shared.metrics.clone(),
            ));
        }
        let mut offset = match &saved {
            Some(c) => {
                for (p, state) in self.processors.iter_mut().zip(&c.processors) {
                    p.restore(state)?;
                }
                c.offset.max(self.partition.start_offset())
            }
            None if self.config.start == "latest" => self.partition.end_offset(),
            None => self.partition.start_offset(),
        };
        tracing::info!(pipeline = %self.config.name, topic = %self.topic, partition = self.partition.id(), offset,
            resumed = saved.is_some(), "pipeline worker started");
        let commit_every = Duration::from_millis(self.config.commit_interval_ms.max(10));
        let mut next_commit = Instant::now() + commit_every;
        let pipeline_labels = PipelineLabels { pipeline: self.config.name.clone() };
        let read_counter = self.shared.metrics.events_read.get_or_create(&pipeline_labels).clone();
        self.committed.store(offset, std::sync::atomic::Ordering::Release);
        let mut scratch = Vec::new();
        loop {
            if cancel.is_cancelled() {
                break;
            }
            if Instant::now() >= next_commit {
                self.commit(offset, &sinks_tx).await?;
                next_commit = Instant::now() + commit_every;
            }
            let read = match self.partition.read(offset, self.config.read.max_bytes) {
                Ok(r) => r,
                Err(flowgate_log::LogError::OffsetOutOfRange { start, .. }) if offset < start => {
                    tracing::warn!(pipeline = %self.config.name, from = offset, to = start, "offsets deleted by retention were skipped");
                    offset = start;
                    continue;
                }
                Err(e) => return Err(e.into()),
            };
            let events = if read.batches.is_empty() {
                let wait = next_commit.saturating_duration_since(Instant::now()).min(Duration::from_millis(100));
                tokio::select! {
                    _ = self.partition.wait_for_data(offset, wait) => {}
                    _ = cancel.cancelled() => {}
                }
                self.tick()
            } else {
                let buffer = Bytes::from(read.batches);
                let (events, next) = decode(&buffer, self.partition.id(), offset, &mut scratch)?;
                read_counter.inc_by(events.len() as u64);
                offset = next;
                self.process(events)
            };
            if !events.is_empty() {
                fan_out(events, &sinks_tx).await?;
            }
        }
        self.commit(offset, &sinks_tx).await?;
        drop(sinks_tx);
        while sink_tasks.join_next().await.is_some() {}
        tracing::info!(pipeline = %self.config.name, topic = %self.topic, partition = self.partition.id(), offset, "pipeline worker stopped cleanly");
        Ok(())
    }

    /// Runs events through every processor, handling dead letters and late events.
    fn process(&mut self, events: Vec<PipelineEvent>) -> Vec<PipelineEvent> {
        self.run_from(0, events, None)
    }

    /// Lets time-driven processors emit (windows on an idle stream).
    fn tick(&mut self) -> Vec<PipelineEvent> {
        let now = flowgate_core::time::now_ms();
        let mut out = Vec::new();
        for i in 0..self.processors.len() {
            let mut outputs = Outputs::default();
            let emitted = self.processors[i].tick(now, &mut outputs);
            self.handle_outputs(i, outputs);
            if !emitted.is_empty() {
                self.shared.metrics.processor_out.get_or_create(&self.processor_labels[i]).inc_by(emitted.len() as u64);
                out.extend(self.run_from(i + 1, emitted, None));
            }
        }
        out
    }

    fn run_from(&mut self, first: usize, mut events: Vec<PipelineEvent>, _: Option<()>) -> Vec<PipelineEvent> {
        for i in first..self.processors.len() {
            let n_in = events.len() as u64;
            let mut outputs = Outputs::default();
            events = self.processors[i].process(events, &mut outputs);
            let m = &self.shared.metrics;
            let labels = &self.processor_labels[i];
            let failed = outputs.dead_letters.len() as u64;
            m.processor_in.get_or_create(labels).inc_by(n_in);
            m.processor_out.get_or_create(labels).inc_by(events.len() as u64);
            m.processor_dropped.get_or_create(labels).inc_by(n_in.saturating_sub(events.len() as u64 + failed));
            m.processor_failed.get_or_create(labels).inc_by(failed);
            self.handle_outputs(i, outputs);
        }
        events
    }
}
