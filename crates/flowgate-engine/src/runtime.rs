//! Running pipelines.
//!
//! Each (pipeline, source partition) is one worker task: it reads batches from the log,
//! runs them through its own processor instances, and hands them to one task per sink
//! over a bounded queue. Every `commit_interval_ms` the worker asks each sink to flush
//! and commit, waits for all of them, and checkpoints the offset together with the
//! processors' and sinks' state — an aligned checkpoint, so a restart replays from a
//! consistent point: at-least-once for every sink, exactly-once for a file sink (it
//! truncates to its checkpointed length) and for duplicates a dedup processor removes.
//!
//! A slow sink fills its queue, which stops the worker reading the log: memory stays
//! bounded and ingest is untouched (the log is the buffer).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use flowgate_core::{BatchBuilder, BatchView, Codec, ProducerStamp};
use flowgate_log::{Log, Partition};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::checkpoint::{Checkpoint, CheckpointFile};
use crate::config::{BatchPolicy, PipelineConfig};
use crate::event::{PipelineEvent, ALL_SINKS};
use crate::metrics::{FlushLabels, PipelineLabels, PipelineMetrics, ProcessorLabels, SinkLabels, SourceLabels};
use crate::processors::{self, Outputs, Processor};
use crate::sink::{Sink, SinkEvent, SinkFactory, SinkPlace};

/// The dead-letter topic.
pub const DLQ_TOPIC: &str = "_dlq";

/// Checks every pipeline: unique names, processors that compile, sinks the factory
/// accepts. The error names the pipeline and the place.
pub fn validate(pipelines: &[PipelineConfig], sinks: &dyn SinkFactory) -> anyhow::Result<()> {
    let mut names = std::collections::HashSet::new();
    for p in pipelines {
        let at = |e: anyhow::Error| anyhow::anyhow!("pipeline '{}': {e}", p.name);
        if !names.insert(&p.name) {
            return Err(at(anyhow::anyhow!("the name is used twice")));
        }
        if p.name.is_empty() || !p.name.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b)) {
            return Err(at(anyhow::anyhow!("name must be letters, digits, '-', '_' or '.'")));
        }
        if p.topics.is_empty() {
            return Err(at(anyhow::anyhow!("`topics` is empty")));
        }
        for t in &p.topics {
            flowgate_log::validate_topic_name(t).map_err(|e| at(e.into()))?;
        }
        if !matches!(p.start.as_str(), "earliest" | "latest") {
            return Err(at(anyhow::anyhow!("`start` must be earliest or latest")));
        }
        if p.sinks.is_empty() {
            return Err(at(anyhow::anyhow!("a pipeline needs at least one sink")));
        }
        let mut sink_names = Vec::new();
        for (i, s) in p.sinks.iter().enumerate() {
            if sink_names.contains(&s.name) {
                return Err(at(anyhow::anyhow!("sink name '{}' is used twice", s.name)));
            }
            sink_names.push(s.name.clone());
            sinks.validate(s).map_err(|e| at(anyhow::anyhow!("sink {} ('{}'): {e}", i + 1, s.name)))?;
        }
        processors::build(&p.processors, &sink_names).map_err(at)?;
    }
    crate::sink::check_output_claims(pipelines, sinks)
}

/// Running pipelines; stop them with [`Pipelines::shutdown`].
///
/// Pipelines run on their own threads (a runtime of their own), so the operating
/// system shares the cores between processing and ingest: a busy pipeline cannot delay
/// the listeners' acknowledgements.
pub struct Pipelines {
    cancel: CancellationToken,
    workers: Vec<tokio::task::JoinHandle<()>>,
    runtime: Option<tokio::runtime::Runtime>,
}

impl std::fmt::Debug for Pipelines {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pipelines").field("workers", &self.workers.len()).finish()
    }
}

impl Drop for Pipelines {
    fn drop(&mut self) {
        self.cancel.cancel();
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

struct Shared {
    log: Log,
    data_dir: PathBuf,
    metrics: Arc<PipelineMetrics>,
    factory: Arc<dyn SinkFactory>,
}

impl Pipelines {
    /// Starts every pipeline: one worker per source partition.
    pub fn start(
        log: Log,
        data_dir: PathBuf,
        configs: Vec<PipelineConfig>,
        factory: Arc<dyn SinkFactory>,
        metrics: Arc<PipelineMetrics>,
    ) -> anyhow::Result<Pipelines> {
        validate(&configs, factory.as_ref())?;
        let shared = Arc::new(Shared { log, data_dir, metrics, factory });
        let cancel = CancellationToken::new();
        let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .thread_name("flowgate-pipeline")
            .enable_all()
            .build()?;
        let mut workers = Vec::new();
        // Lag is refreshed apart from the workers, so a stalled worker still shows it.
        let mut lags: Vec<(
            Arc<Partition>,
            Arc<std::sync::atomic::AtomicU64>,
            prometheus_client::metrics::gauge::Gauge,
        )> = Vec::new();
        for config in configs {
            let config = Arc::new(config);
            for topic_name in &config.topics {
                // A pipeline's source topics exist once it is configured, whatever
                // `auto_create_topics` says about clients' writes.
                let topic = match shared.log.topic(topic_name) {
                    Some(t) => t,
                    None => match shared.log.create_topic(topic_name, shared.log.config().default_partitions) {
                        Ok(t) => t,
                        Err(flowgate_log::LogError::TopicExists(_)) => shared.log.topic_or_create(topic_name)?,
                        Err(e) => return Err(e.into()),
                    },
                };
                for partition in topic.partitions() {
                    let worker = Worker::new(shared.clone(), config.clone(), topic_name, partition.clone())?;
                    let gauge = shared
                        .metrics
                        .lag
                        .get_or_create(&SourceLabels {
                            pipeline: config.name.clone(),
                            topic: topic_name.clone(),
                            partition: partition.id().to_string(),
                        })
                        .clone();
                    lags.push((partition.clone(), worker.committed.clone(), gauge));
                    let cancel = cancel.clone();
                    workers.push(runtime.spawn(async move {
                        let place = format!("{}/{}/{}", worker.config.name, worker.topic, worker.partition.id());
                        if let Err(e) = worker.run(cancel).await {
                            tracing::error!(place, error = %format!("{e:#}"), "pipeline worker stopped");
                        }
                    }));
                }
            }
        }
        let lag_cancel = cancel.clone();
        runtime.spawn(async move {
            loop {
                for (partition, committed, gauge) in &lags {
                    let committed = committed.load(std::sync::atomic::Ordering::Acquire);
                    gauge.set(partition.end_offset().saturating_sub(committed) as i64);
                }
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(250)) => {}
                    _ = lag_cancel.cancelled() => return,
                }
            }
        });
        Ok(Pipelines { cancel, workers, runtime: Some(runtime) })
    }

    /// Stops reading, flushes and commits every worker.
    pub async fn shutdown(mut self) {
        self.cancel.cancel();
        for worker in self.workers.drain(..) {
            let _ = worker.await;
        }
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

enum SinkMsg {
    Events(Arc<Vec<SinkEvent>>, Arc<Vec<u64>>),
    Commit(oneshot::Sender<anyhow::Result<serde_json::Value>>),
}

struct Worker {
    shared: Arc<Shared>,
    config: Arc<PipelineConfig>,
    topic: String,
    partition: Arc<Partition>,
    processors: Vec<Box<dyn Processor>>,
    processor_labels: Vec<ProcessorLabels>,
    checkpoint: CheckpointFile,
    committed: Arc<std::sync::atomic::AtomicU64>,
}

impl Worker {
    fn new(
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

    async fn run(mut self, cancel: CancellationToken) -> anyhow::Result<()> {
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

    fn handle_outputs(&mut self, i: usize, outputs: Outputs) {
        if !outputs.late.is_empty() {
            self.shared.metrics.late_events.get_or_create(&self.processor_labels[i]).inc_by(outputs.late.len() as u64);
            let mut by_topic: std::collections::HashMap<String, Vec<PipelineEvent>> = Default::default();
            for (topic, event) in outputs.late {
                if let Some(t) = topic {
                    by_topic.entry(t).or_default().push(event);
                }
            }
            for (topic, mut events) in by_topic {
                let mut b = BatchBuilder::new();
                for e in &mut events {
                    b.push(e.timestamp, e.key.as_deref(), e.client_id.as_deref(), std::iter::empty(), e.raw_payload());
                }
                self.append(&topic, &mut b);
            }
        }
        if !outputs.dead_letters.is_empty() {
            let m = &self.shared.metrics;
            m.dead_letters
                .get_or_create(&PipelineLabels { pipeline: self.config.name.clone() })
                .inc_by(outputs.dead_letters.len() as u64);
            let mut b = BatchBuilder::new();
            for dl in outputs.dead_letters {
                let payload = dl.event.raw_payload();
                let original = serde_json::from_slice::<serde_json::Value>(payload)
                    .unwrap_or_else(|_| serde_json::Value::String(String::from_utf8_lossy(payload).into_owned()));
                let envelope = serde_json::json!({
                    "pipeline": self.config.name,
                    "processor": format!("{}:{}", i + 1, dl.processor),
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
            self.append(DLQ_TOPIC, &mut b);
        }
    }

    fn append(&self, topic: &str, builder: &mut BatchBuilder) {
        if builder.is_empty() {
            return;
        }
        let result =
            builder.finish(Codec::None, ProducerStamp::default()).map_err(anyhow::Error::from).and_then(|mut batch| {
                let t = self.shared.log.topic_or_create(topic)?;
                let p = t.partition(t.next_round_robin())?;
                p.append(&mut batch.bytes)?;
                Ok(())
            });
        if let Err(e) = result {
            tracing::error!(topic, error = %format!("{e:#}"), "could not write side output");
        }
    }

    async fn commit(&mut self, offset: u64, sinks: &[mpsc::Sender<SinkMsg>]) -> anyhow::Result<()> {
        let mut replies = Vec::with_capacity(sinks.len());
        for tx in sinks {
            let (reply, rx) = oneshot::channel();
            tx.send(SinkMsg::Commit(reply)).await.map_err(|_| anyhow::anyhow!("a sink task stopped"))?;
            replies.push(rx);
        }
        let mut sink_states = Vec::with_capacity(replies.len());
        for rx in replies {
            sink_states.push(rx.await.map_err(|_| anyhow::anyhow!("a sink task stopped"))??);
        }
        let checkpoint = Checkpoint {
            offset,
            processors: self.processors.iter().map(|p| p.snapshot()).collect(),
            sinks: sink_states,
        };
        let file = self.checkpoint.clone();
        tokio::task::spawn_blocking(move || file.store(&checkpoint)).await??;
        self.committed.store(offset, std::sync::atomic::Ordering::Release);
        Ok(())
    }
}

/// Decodes whole batches into events at or after `from`, sharing the buffer's bytes
/// (a compressed batch is decompressed once into its own shared buffer). Returns the
/// events and the next offset to read.
fn decode(
    buffer: &Bytes,
    partition: u32,
    from: u64,
    scratch: &mut Vec<u8>,
) -> anyhow::Result<(Vec<PipelineEvent>, u64)> {
    let mut events = Vec::new();
    let mut next = from;
    let mut rest = &buffer[..];
    while !rest.is_empty() {
        let (view, tail) = BatchView::parse(rest)?;
        let base = view.base_offset();
        let owned;
        let (shared, section) = if view.header.codec()? == Codec::None {
            (buffer, view.raw_records())
        } else {
            owned = Bytes::copy_from_slice(view.records_section(scratch)?);
            (&owned, &owned[..])
        };
        let records =
            flowgate_core::batch::RecordIter::over(section, view.header.first_timestamp, view.header.record_count);
        for record in records {
            let record = record?;
            let offset = base + u64::from(record.offset_delta);
            if offset >= from {
                events.push(PipelineEvent::from_record_in(Some(shared), partition, offset, &record));
            }
        }
        next = next.max(view.last_offset() + 1);
        rest = tail;
    }
    Ok((events, next))
}

async fn fan_out(mut events: Vec<PipelineEvent>, sinks: &[mpsc::Sender<SinkMsg>]) -> anyhow::Result<()> {
    let masks: Vec<u64> = events.iter().map(|e| e.sinks).collect();
    let out: Vec<SinkEvent> = events
        .iter_mut()
        .map(|e| SinkEvent {
            partition: e.partition,
            offset: e.offset,
            timestamp: e.timestamp,
            key: e.key.clone(),
            payload: e.payload().clone(),
        })
        .collect();
    let (out, masks) = (Arc::new(out), Arc::new(masks));
    for tx in sinks {
        tx.send(SinkMsg::Events(out.clone(), masks.clone()))
            .await
            .map_err(|_| anyhow::anyhow!("a sink task stopped"))?;
    }
    Ok(())
}

/// Why a batch was flushed.
#[derive(Clone, Copy)]
enum Reason {
    Size,
    Bytes,
    Time,
    Commit,
}

impl Reason {
    fn as_str(self) -> &'static str {
        match self {
            Reason::Size => "size",
            Reason::Bytes => "bytes",
            Reason::Time => "time",
            Reason::Commit => "commit",
        }
    }
}

struct SinkTask {
    sink: Box<dyn Sink>,
    labels: SinkLabels,
    metrics: Arc<PipelineMetrics>,
    events: prometheus_client::metrics::counter::Counter,
    end_to_end: prometheus_client::metrics::histogram::Histogram,
}

impl SinkTask {
    /// Writes the batch (retrying with backoff until it succeeds), records metrics, and
    /// returns how long the successful write took.
    async fn flush(&mut self, batch: &mut Vec<SinkEvent>, reason: Reason) -> Option<Duration> {
        if batch.is_empty() {
            return None;
        }
        let mut backoff = Duration::from_millis(50);
        let took = loop {
            let started = Instant::now();
            match self.sink.write(batch).await {
                Ok(()) => break started.elapsed(),
                Err(e) => {
                    self.metrics.sink_errors.get_or_create(&self.labels).inc();
                    tracing::warn!(pipeline = %self.labels.pipeline, sink = %self.labels.sink, error = %format!("{e:#}"),
                        "sink write failed; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        };
        let now = flowgate_core::time::now_ms();
        for e in batch.iter() {
            self.end_to_end.observe((now - e.timestamp).max(0) as f64 / 1000.0);
        }
        self.events.inc_by(batch.len() as u64);
        self.metrics.sink_batch_events.get_or_create(&self.labels).observe(batch.len() as f64);
        self.metrics.sink_write_seconds.get_or_create(&self.labels).observe(took.as_secs_f64());
        let flush_labels = FlushLabels {
            pipeline: self.labels.pipeline.clone(),
            sink: self.labels.sink.clone(),
            reason: reason.as_str().into(),
        };
        self.metrics.sink_flushes.get_or_create(&flush_labels).inc();
        batch.clear();
        Some(took)
    }
}

/// The sink task: batches by count, bytes and wait; adapts the batch size toward the
/// target latency when asked; retries failed writes with backoff (the queue in front
/// fills meanwhile, which slows the pipeline, not ingest).
async fn run_sink(
    sink: Box<dyn Sink>,
    mut rx: mpsc::Receiver<SinkMsg>,
    policy: BatchPolicy,
    bit: u64,
    labels: SinkLabels,
    metrics: Arc<PipelineMetrics>,
) {
    let events = metrics.sink_events.get_or_create(&labels).clone();
    let end_to_end =
        metrics.end_to_end_seconds.get_or_create(&PipelineLabels { pipeline: labels.pipeline.clone() }).clone();
    let mut task = SinkTask { sink, events, end_to_end, labels, metrics };
    let target_gauge = task.metrics.sink_batch_target.get_or_create(&task.labels).clone();
    let mut target = if policy.adaptive { (policy.max_events / 4).max(policy.min_events) } else { policy.max_events };
    target_gauge.set(target as i64);
    let max_wait = Duration::from_millis(policy.max_wait_ms.max(1));
    let mut buffer: Vec<SinkEvent> = Vec::with_capacity(target.min(100_000));
    let mut bytes = 0usize;
    let mut oldest: Option<Instant> = None;
    loop {
        let msg = match oldest {
            Some(o) => tokio::select! {
                m = rx.recv() => m,
                _ = tokio::time::sleep_until((o + max_wait).into()) => {
                    task.flush(&mut buffer, Reason::Time).await;
                    (bytes, oldest) = (0, None);
                    continue;
                }
            },
            None => rx.recv().await,
        };
        match msg {
            Some(SinkMsg::Events(events, masks)) => {
                for (e, m) in events.iter().zip(masks.iter()) {
                    if *m != ALL_SINKS && *m & bit == 0 {
                        continue;
                    }
                    bytes += e.payload.len();
                    buffer.push(e.clone());
                    oldest.get_or_insert_with(Instant::now);
                    let reason = if buffer.len() >= target {
                        Reason::Size
                    } else if bytes >= policy.max_bytes {
                        Reason::Bytes
                    } else {
                        continue;
                    };
                    let took = task.flush(&mut buffer, reason).await;
                    (bytes, oldest) = (0, None);
                    if let (true, Some(took)) = (policy.adaptive, took) {
                        target = adapt(target, took, &policy);
                        target_gauge.set(target as i64);
                    }
                }
            }
            Some(SinkMsg::Commit(reply)) => {
                task.flush(&mut buffer, Reason::Commit).await;
                (bytes, oldest) = (0, None);
                let _ = reply.send(task.sink.commit().await);
            }
            None => {
                task.flush(&mut buffer, Reason::Commit).await;
                let _ = task.sink.commit().await;
                return;
            }
        }
    }
}

/// The next batch size target: grow by a quarter while writes are faster than the
/// target latency, shrink by a quarter when slower, within [min_events, max_events].
fn adapt(current: usize, took: Duration, policy: &BatchPolicy) -> usize {
    let target = Duration::from_millis(policy.target_latency_ms.max(1));
    let next = if took < target * 8 / 10 {
        current + current / 4 + 1
    } else if took > target {
        current - current / 4
    } else {
        current
    };
    next.clamp(policy.min_events.max(1), policy.max_events.max(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adaptive_batching_moves_toward_the_target_latency_within_bounds() {
        let policy = BatchPolicy {
            max_events: 10_000,
            min_events: 100,
            target_latency_ms: 10,
            adaptive: true,
            ..BatchPolicy::default()
        };
        let mut n = 1000;
        for _ in 0..50 {
            n = adapt(n, Duration::from_millis(1), &policy);
        }
        assert_eq!(n, 10_000, "fast writes grow the batch up to the bound");
        for _ in 0..50 {
            n = adapt(n, Duration::from_millis(50), &policy);
        }
        assert_eq!(n, 100, "slow writes shrink it down to the bound");
        assert_eq!(adapt(500, Duration::from_millis(9), &policy), 500, "near the target it stays");
    }
}
