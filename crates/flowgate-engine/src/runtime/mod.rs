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

mod decode;
mod fan_out;
mod side_outputs;
mod sink_driver;
mod worker;
mod commit;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use flowgate_log::{Log, Partition};
use tokio_util::sync::CancellationToken;

use crate::config::PipelineConfig;
use crate::metrics::{PipelineMetrics, SourceLabels};
use crate::processors;
use crate::sink::SinkFactory;
use worker::Worker;

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
    Ok(())
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

pub(crate) struct Shared {
    pub(crate) log: Log,
    pub(crate) data_dir: PathBuf,
    pub(crate) metrics: Arc<PipelineMetrics>,
    pub(crate) factory: Arc<dyn SinkFactory>,
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
