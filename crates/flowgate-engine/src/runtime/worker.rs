//! The worker of one (pipeline, source partition): reads the log, runs the processors,
//! hands batches to the sinks and commits at every interval.

use std::ops::Range;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use flowgate_log::Partition;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::commit::SinkStates;
use super::dead_letters::SideWriter;
use super::decode::decode;
use super::fan_out::fan_out;
use super::memory::{handed_bytes, WorkerMemory, TICK_WHILE_BLOCKED};
use super::quarantine::{InFlight, Quarantine};
use super::replay_worker::ReplayIndex;
use super::sink_driver::{run_sink, SinkSetup};
use super::supervisor::{WorkerHealth, WorkerState};
use super::Shared;
use crate::checkpoint::{CheckpointFile, ProcessorState};
use crate::config::PipelineConfig;
use crate::event::PipelineEvent;
use crate::metrics::{PipelineLabels, ProcessorLabels, SinkLabels, SourceLabels};
use crate::processors::{self, Outputs, Processor};
use crate::projection::Projection;
use crate::sink::SinkPlace;

pub(super) struct Worker {
    pub(super) shared: Arc<Shared>,
    /// The partition's lease, taken at the start of [`Worker::run`] ([`super::lease`]).
    pub(super) lease: Option<super::lease::Lease>,
    pub(super) config: Arc<PipelineConfig>,
    pub(super) topic: String,
    pub(super) partition: Arc<Partition>,
    pub(super) processors: Vec<Box<dyn Processor>>,
    /// Processor ids, which key their state and label their metrics.
    pub(super) processor_ids: Vec<String>,
    pub(super) processor_labels: Vec<ProcessorLabels>,
    /// Checkpointed state of processors that are not configured (carried forward).
    pub(super) unconfigured_states: Vec<ProcessorState>,
    pub(super) checkpoint: CheckpointFile,
    pub(super) health: Arc<WorkerHealth>,
    /// Side-output appends (dead letters, late events), which the next checkpoint waits
    /// for.
    pub(super) side: SideWriter,
    /// Sink state of the checkpoint, by sink name, with entries of sinks no longer
    /// configured (carried forward, never dropped).
    pub(super) sink_states: SinkStates,
    /// What is being processed now, for the supervisor to find poison events.
    pub(super) in_flight: Arc<InFlight>,
    /// Events to process one at a time, or to dead-letter unprocessed.
    pub(super) quarantine: Quarantine,
    /// Checkpoint before reading on (set once quarantined events are passed).
    pub(super) commit_soon: bool,
    /// Whether the state directories of processors whose state is gone were deleted
    /// (once per worker, after its first stored checkpoint).
    pub(super) state_dirs_swept: bool,
    /// `flowgate_pipeline_committed_offset` of this partition.
    pub(super) committed_offset: prometheus_client::metrics::gauge::Gauge,
    /// What this worker holds against the memory budget.
    pub(super) memory: WorkerMemory,
    /// Set when the topic is the pipeline's replay topic: what each event replays.
    pub(super) replay: Option<Arc<ReplayIndex>>,
    /// The trace contexts of the batch being read (reused from read to read).
    pub(super) trace_contexts: crate::trace::Contexts,
    /// The `pipeline.read` span of the batch being processed, when it is traced: the
    /// parent of its processors' spans.
    pub(super) read_span: Option<tracing::Span>,
}

impl Worker {
    pub(super) fn new(
        shared: Arc<Shared>,
        config: Arc<PipelineConfig>,
        topic: &str,
        partition: Arc<Partition>,
        health: Arc<WorkerHealth>,
        in_flight: Arc<InFlight>,
        quarantine: Quarantine,
    ) -> anyhow::Result<Worker> {
        let mut processors = processors::build_pipeline(&config)?;
        let processor_ids = config.processor_ids();
        // Parsed lazily, as each processor first reads an event: a processor that takes
        // events one at a time (aggregate) holds one document at a time.
        if let Some(projection) = Projection::of(processors.iter().map(|p| p.reads())) {
            let projection = Arc::new(projection);
            processors.iter_mut().for_each(|p| p.project(&projection));
        }
        let processor_labels = processor_ids
            .iter()
            .map(|id| ProcessorLabels { pipeline: config.name.clone(), processor: id.clone() })
            .collect();
        let checkpoint = CheckpointFile::new(&shared.data_dir, &config.name, topic, partition.id());
        for (processor, id) in processors.iter_mut().zip(&processor_ids) {
            processor.attach_state_dir(checkpoint.processor_dir(id));
        }
        let committed_offset = shared
            .metrics
            .committed_offset
            .get_or_create(&SourceLabels {
                pipeline: config.name.clone(),
                topic: topic.to_owned(),
                partition: partition.id().to_string(),
            })
            .clone();
        let memory = WorkerMemory::new(shared.memory.clone(), &config, &shared.metrics);
        let replay = (topic == super::replay::replay_topic(&config.name)).then(|| Arc::new(ReplayIndex::new(topic)));
        let side = SideWriter::new(shared.log.clone()).with_replays(replay.clone());
        Ok(Worker {
            memory,
            shared,
            config,
            topic: topic.to_owned(),
            partition,
            processors,
            processor_ids,
            processor_labels,
            unconfigured_states: Vec::new(),
            checkpoint,
            health,
            side,
            sink_states: SinkStates::default(),
            lease: None,
            in_flight,
            quarantine,
            commit_soon: false,
            state_dirs_swept: false,
            committed_offset,
            replay,
            trace_contexts: crate::trace::Contexts::default(),
            read_span: None,
        })
    }

    /// Runs until `cancel`; true when it then flushed and committed everything its sinks
    /// wrote (its checkpoint accounts for all of its output), false when it was
    /// cancelled before it recovered its sinks (output of an earlier worker past the
    /// checkpoint may still be there).
    pub(super) async fn run(mut self, cancel: CancellationToken) -> anyhow::Result<bool> {
        let (pipeline, partition) = (self.config.name.clone(), self.partition.id());
        let lease = self.shared.leases.acquire(&pipeline, &self.topic, partition);
        self.lease = tokio::select! {
            lease = lease => Some(lease),
            _ = cancel.cancelled() => return Ok(false),
        };
        // A restart must find the side topics even if someone deleted them meanwhile.
        super::side_outputs::ensure_topics(&self.shared.log, &self.config)?;
        let saved = self.checkpoint.load()?;
        if saved.is_none() {
            self.refuse_if_renamed()?;
        }
        self.sink_states = SinkStates::from_checkpoint(saved.as_ref(), &self.config);
        let place =
            SinkPlace { pipeline: self.config.name.clone(), topic: self.topic.clone(), partition: self.partition.id() };
        let mut sinks_tx = Vec::new();
        let mut sink_tasks = JoinSet::new();
        for (i, sink_config) in self.config.sinks.iter().enumerate() {
            let at = |e: anyhow::Error| anyhow::anyhow!("sink '{}': {e:#}", sink_config.name);
            let mut sink = self.shared.factory.build(sink_config, &place).map_err(|e| at(e.context("cannot build")))?;
            let state = self.sink_states.get(&sink_config.name);
            sink.recover(&state).await.map_err(|e| at(e.context("recovery")))?;
            let (tx, rx) = mpsc::channel(4);
            sinks_tx.push(tx);
            let labels = SinkLabels { pipeline: self.config.name.clone(), sink: sink_config.name.clone() };
            // `validate` allows at most 64 sinks, so every sink has a mask bit.
            let bit = u32::try_from(i).ok().and_then(|i| 1u64.checked_shl(i)).unwrap_or(0);
            let controller = self
                .shared
                .controllers
                .get(&self.config.name, &sink_config.name)
                .ok_or_else(|| at(anyhow::anyhow!("the sink has no controller")))?;
            let learned = self.sink_states.learned(&sink_config.name);
            controller.resume(learned.concurrency_limit, learned.batch_target);
            let setup = SinkSetup {
                lease: self.lease.clone(),
                statuses: self.shared.sink_statuses.clone(),
                partition: self.partition.id(),
                batch: sink_config.batch.clone(),
                retry: sink_config.retry.clone(),
                controller,
                bit,
                labels,
                metrics: self.shared.metrics.clone(),
                topic: self.topic.clone(),
                side: SideWriter::new(self.shared.log.clone()).with_replays(self.replay.clone()),
            };
            sink_tasks.spawn(run_sink(sink, rx, setup));
        }
        self.health.set_sink_queues(self.config.sinks.iter().map(|s| s.name.clone()).zip(&sinks_tx));
        let mut offset = match &saved {
            Some(c) => {
                self.unconfigured_states = super::processor_states::restore(
                    c,
                    &mut self.processors,
                    &self.config,
                    &self.processor_ids,
                    &self.checkpoint,
                )?;
                c.offset.max(self.partition.start_offset())
            }
            // Replays are read whatever `start` says: they were written for this pipeline.
            None if self.config.start == "latest" && self.replay.is_none() => self.partition.end_offset(),
            None => self.partition.start_offset(),
        };
        tracing::info!(pipeline = %self.config.name, topic = %self.topic, partition = self.partition.id(), offset,
            resumed = saved.is_some(), "pipeline worker started");
        if saved.is_none() || self.config.sinks.iter().any(|s| !self.sink_states.has(&s.name)) {
            // A first checkpoint before any output, also when a sink has no state in the
            // checkpoint (one added to the pipeline, or a reset where it never ran): a
            // crash before the first periodic one then recovers from it, so sinks cut
            // back what they wrote since (a file sink without any state must leave
            // existing files alone, which would write those events twice).
            self.commit(offset, &sinks_tx).await?;
        }
        self.report_committed(offset);
        self.health.set_state(WorkerState::Running);
        let commit_every = Duration::from_millis(self.config.commit_interval_ms.max(10));
        let mut next_commit = Instant::now() + commit_every;
        let pipeline_labels = PipelineLabels { pipeline: self.config.name.clone() };
        let read_counter = self.shared.metrics.events_read.get_or_create(&pipeline_labels).clone();
        let unreadable = self
            .shared
            .metrics
            .unreadable_batches
            .get_or_create(&SourceLabels {
                pipeline: self.config.name.clone(),
                topic: self.topic.clone(),
                partition: self.partition.id().to_string(),
            })
            .clone();
        self.health.committed.store(offset, std::sync::atomic::Ordering::Release);
        let mut scratch = Vec::new();
        loop {
            if cancel.is_cancelled() {
                break;
            }
            if self.commit_soon || Instant::now() >= next_commit {
                self.commit(offset, &sinks_tx).await?;
                self.commit_soon = false;
                next_commit = Instant::now() + commit_every;
            }
            self.memory.release_delivered();
            if self.memory.must_wait(&mut self.processors) {
                self.wait_for_memory(&sinks_tx, &cancel).await?;
                continue;
            }
            let read = match self.partition.read(offset, self.memory.read_bytes(self.config.read.max_bytes)) {
                Ok(r) => r,
                Err(flowgate_log::LogError::OffsetOutOfRange { start, .. }) if offset < start => {
                    tracing::warn!(pipeline = %self.config.name, from = offset, to = start, "offsets deleted by retention were skipped");
                    offset = start;
                    continue;
                }
                Err(e) => return Err(e.into()),
            };
            let mut read_charge = None;
            let mut read_buffer = None;
            let events = if read.batches.is_empty() {
                let wait = next_commit.saturating_duration_since(Instant::now()).min(Duration::from_millis(100));
                tokio::select! {
                    _ = self.partition.wait_for_data(offset, wait) => {}
                    _ = cancel.cancelled() => {}
                }
                self.tick()?
            } else {
                let buffer = Bytes::from(read.batches);
                // The one check per batch tracing costs while it is off.
                let traced = crate::trace::enabled();
                if traced {
                    self.trace_contexts.clear();
                }
                let contexts = traced.then_some(&mut self.trace_contexts);
                let decoded = decode(&buffer, self.partition.id(), offset, &mut scratch, contexts)?;
                read_charge = Some(self.memory.charge_read(buffer.len(), decoded.events.len()));
                read_buffer = Some(buffer.clone());
                read_counter.inc_by(decoded.events.len() as u64);
                unreadable.inc_by(decoded.unreadable.len() as u64);
                let range = offset..decoded.next;
                if traced && self.trace_contexts.sampled() {
                    self.read_span = Some(crate::trace::pipeline_read(
                        &self.trace_contexts,
                        &self.config.name,
                        &self.topic,
                        self.partition.id(),
                        range.clone(),
                        decoded.events.len(),
                    ));
                }
                offset = decoded.next;
                self.dead_letter_unreadable(decoded.unreadable)?;
                if self.replay.is_some() {
                    self.process_replay(decoded.events, range)?
                } else {
                    self.process(decoded.events, range)?
                }
            };
            self.memory.set_state(&self.processors);
            // The read's span lasts until its events are with the sinks.
            let read_span = self.read_span.take();
            let trace = read_span.as_ref().and_then(|span| {
                span.record("flowgate.events.out", events.len() as u64);
                crate::trace::context_of(span)
            });
            if !events.is_empty() {
                let handed = fan_out(events, &sinks_tx, trace).await?;
                let bytes = handed.upgrade().map_or(0, |b| handed_bytes(&b, read_buffer.as_deref()));
                self.memory.handed(handed, bytes, read_charge);
            }
            drop(read_span);
        }
        self.commit(offset, &sinks_tx).await?;
        drop(sinks_tx);
        while sink_tasks.join_next().await.is_some() {}
        tracing::info!(pipeline = %self.config.name, topic = %self.topic, partition = self.partition.id(), offset, "pipeline worker stopped cleanly");
        Ok(true)
    }

    /// At the memory limit: reads nothing, but lets time pass through the processors
    /// (so windows close and give back their state) until the pressure falls below the
    /// limit, the worker is cancelled, or nothing is freed for long (a stall, see
    /// [`super::memory`]).
    async fn wait_for_memory(
        &mut self,
        sinks_tx: &[mpsc::Sender<super::fan_out::SinkMsg>],
        cancel: &CancellationToken,
    ) -> anyhow::Result<()> {
        self.memory.waiting();
        let mut lowest = self.memory.governor().used();
        let mut progress_at = Instant::now();
        while self.memory.must_wait(&mut self.processors) && !cancel.is_cancelled() {
            let events = self.tick()?;
            self.memory.set_state(&self.processors);
            if !events.is_empty() {
                let handed = fan_out(events, sinks_tx, None).await?;
                let bytes = handed.upgrade().map_or(0, |b| handed_bytes(&b, None));
                self.memory.handed(handed, bytes, None);
            }
            self.memory.release_delivered();
            let used = self.memory.governor().used();
            if used < lowest {
                lowest = used;
                progress_at = Instant::now();
            }
            if self.memory.check_stall(&self.config.name, progress_at) {
                break;
            }
            let governor = self.memory.governor().clone();
            tokio::select! {
                _ = governor.wait_until(TICK_WHILE_BLOCKED, |l| l != flowgate_memory::Level::Hard) => {}
                _ = cancel.cancelled() => {}
            }
        }
        Ok(())
    }

    /// With no checkpoint of its own, a pipeline whose source partition has a checkpoint
    /// under the name of a pipeline that is no longer configured was most likely renamed:
    /// starting it afresh would make its sinks treat their earlier output as unknown, so
    /// it does not start until the operator says which it is.
    fn refuse_if_renamed(&self) -> anyhow::Result<()> {
        let root = self.shared.data_dir.join("pipelines");
        let Ok(entries) = std::fs::read_dir(&root) else { return Ok(()) };
        let file = format!("{}-{}.ckpt", self.topic, self.partition.id());
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if self.shared.pipeline_names.read().contains(&name) || !entry.path().join(&file).exists() {
                continue;
            }
            anyhow::bail!(
                "pipeline '{}' has no checkpoint for {}-{}, but pipeline '{name}', which is not configured, has one \
                 ({}): if '{}' is '{name}' renamed, stop the engine and rename that directory to '{}'; if '{name}' \
                 is gone for good, delete it. Not starting afresh, so that no sink rewrites earlier output.",
                self.config.name,
                self.topic,
                self.partition.id(),
                entry.path().display(),
                self.config.name,
                self.config.name,
            );
        }
        Ok(())
    }

    /// Runs the events of source offsets `range` through every processor, handling dead
    /// letters and late events; where a processor panicked before, one event at a time
    /// (see [`super::quarantine`]).
    pub(super) fn process(
        &mut self,
        events: Vec<PipelineEvent>,
        range: Range<u64>,
    ) -> anyhow::Result<Vec<PipelineEvent>> {
        if !self.quarantine.covers(&range) {
            self.in_flight.start(range, false);
            let out = self.run_from(0, events);
            self.in_flight.done();
            return out;
        }
        let mut out = Vec::new();
        // Events go through one at a time here: no processor spans, which would be one
        // per event.
        let read_span = self.read_span.take();
        for event in events {
            if let Some(poison) = self.quarantine.poison(event.offset).cloned() {
                let i = poison.processor;
                if !poison.dead_lettered {
                    let offset = event.offset;
                    self.dead_letter_poison(i, event, &poison.message)?;
                    self.quarantine.dead_lettered(offset);
                    self.in_flight.dead_lettered(offset);
                } else {
                    self.cover_earlier_dead_letters();
                }
                continue;
            }
            self.in_flight.start(event.offset..event.offset.saturating_add(1), true);
            out.extend(self.run_from(0, vec![event])?);
            self.in_flight.done();
        }
        self.read_span = read_span;
        // Checkpoint past the quarantined events at once: a later restart must not reach
        // back before them (and dead-letter a poison event twice).
        self.commit_soon = true;
        Ok(out)
    }

    /// Lets time-driven processors emit (windows on an idle stream).
    fn tick(&mut self) -> anyhow::Result<Vec<PipelineEvent>> {
        let now = flowgate_core::time::now_ms();
        let mut out = Vec::new();
        for i in 0..self.processors.len() {
            let mut outputs = Outputs::default();
            let emitted = self.processors[i].tick(now, &mut outputs);
            self.handle_outputs(i, outputs)?;
            if !emitted.is_empty() {
                self.shared.metrics.processor_out.get_or_create(&self.processor_labels[i]).inc_by(emitted.len() as u64);
                out.extend(self.run_from(i + 1, emitted)?);
            }
        }
        Ok(out)
    }

    fn run_from(&mut self, first: usize, events: Vec<PipelineEvent>) -> anyhow::Result<Vec<PipelineEvent>> {
        self.run_from_blaming(first, events, first == 0)
    }

    /// Runs `events` through processors `first..`; `blameable` says they are stored
    /// events (a panic can be blamed on them).
    pub(super) fn run_from_blaming(
        &mut self,
        first: usize,
        mut events: Vec<PipelineEvent>,
        blameable: bool,
    ) -> anyhow::Result<Vec<PipelineEvent>> {
        // Stored events can be blamed for a panic until a processor makes events of its
        // own (window results); `tick` hands on only such events.
        let mut source_events = blameable;
        for i in first..self.processors.len() {
            self.in_flight.at_processor(i, source_events);
            #[cfg(all(feature = "failpoints", debug_assertions))]
            super::failpoints::before_processor(&mut events);
            let n_in = events.len() as u64;
            let span = self
                .read_span
                .as_ref()
                .map(|read| crate::trace::processor(read, &self.config.name, &self.processor_ids[i], n_in));
            let mut outputs = Outputs::default();
            events = self.processors[i].process(events, &mut outputs);
            let m = &self.shared.metrics;
            let labels = &self.processor_labels[i];
            let failed = outputs.dead_letters.len() as u64;
            if let Some(span) = span {
                span.record("flowgate.events.out", events.len() as u64);
                span.record("flowgate.events.failed", failed);
            }
            m.processor_in.get_or_create(labels).inc_by(n_in);
            m.processor_out.get_or_create(labels).inc_by(events.len() as u64);
            m.processor_dropped.get_or_create(labels).inc_by(n_in.saturating_sub(events.len() as u64 + failed));
            m.processor_failed.get_or_create(labels).inc_by(failed);
            source_events &= !self.processors[i].makes_events();
            self.in_flight.writing_side_outputs();
            self.handle_outputs(i, outputs)?;
        }
        Ok(events)
    }
}
