//! Pipeline metrics, registered into the engine's Prometheus registry.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// Labels of a processor.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProcessorLabels {
    /// Pipeline name.
    pub pipeline: String,
    /// The processor id: its `name`, or `<type>-<n>`, e.g. `dedup-1`.
    pub processor: String,
}

/// Labels of a sink.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SinkLabels {
    /// Pipeline name.
    pub pipeline: String,
    /// Sink name.
    pub sink: String,
}

/// Labels of a circuit-breaker transition.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BreakerLabels {
    /// Pipeline name.
    pub pipeline: String,
    /// Sink name.
    pub sink: String,
    /// The state entered: `open`, `half_open` or `closed`.
    pub to: String,
}

/// Labels of a flush.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FlushLabels {
    /// Pipeline name.
    pub pipeline: String,
    /// Sink name.
    pub sink: String,
    /// `size`, `bytes`, `time` or `commit`.
    pub reason: String,
}

/// Labels of a pipeline.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PipelineLabels {
    /// Pipeline name.
    pub pipeline: String,
}

/// Labels of a source partition.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SourceLabels {
    /// Pipeline name.
    pub pipeline: String,
    /// Source topic.
    pub topic: String,
    /// Source partition.
    pub partition: String,
}

fn batch_histogram() -> Histogram {
    Histogram::new(exponential_buckets(1.0, 2.0, 18))
}

fn seconds_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.000_05, 2.0, 20))
}

fn latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.000_5, 2.0, 20))
}

/// Every pipeline metric.
#[derive(Debug)]
pub struct PipelineMetrics {
    /// Events read from the log.
    pub events_read: Family<PipelineLabels, Counter>,
    /// Events into each processor.
    pub processor_in: Family<ProcessorLabels, Counter>,
    /// Events out of each processor.
    pub processor_out: Family<ProcessorLabels, Counter>,
    /// Events a processor dropped on purpose (filtered, duplicate, consumed by a window).
    pub processor_dropped: Family<ProcessorLabels, Counter>,
    /// Events a processor failed on (sent to the dead-letter topic).
    pub processor_failed: Family<ProcessorLabels, Counter>,
    /// Late events (aggregate).
    pub late_events: Family<ProcessorLabels, Counter>,
    /// Events written by each sink.
    pub sink_events: Family<SinkLabels, Counter>,
    /// Failed sink writes (retried).
    pub sink_errors: Family<SinkLabels, Counter>,
    /// Events a sink sent to the dead-letter topic (refused, or out of retries).
    pub sink_dead_letters: Family<SinkLabels, Counter>,
    /// 1 while a sink's circuit breaker is open.
    pub sink_breakers_open: Family<SinkLabels, Gauge>,
    /// Circuit-breaker transitions, by the state entered.
    pub sink_breaker_transitions: Family<BreakerLabels, Counter>,
    /// Flushes by reason.
    pub sink_flushes: Family<FlushLabels, Counter>,
    /// Events per sink write.
    pub sink_batch_events: Family<SinkLabels, Histogram, fn() -> Histogram>,
    /// Duration of sink writes.
    pub sink_write_seconds: Family<SinkLabels, Histogram, fn() -> Histogram>,
    /// Current batch size target (moves with adaptive batching).
    pub sink_batch_target: Family<SinkLabels, Gauge>,
    /// Writes a sink may have in flight at once (its controller's limit).
    pub sink_concurrency_limit: Family<SinkLabels, Gauge>,
    /// Writes a sink has in flight now.
    pub sink_in_flight: Family<SinkLabels, Gauge>,
    /// A sink's recent write latency, as its controller averages it.
    pub sink_latency_seconds: Family<SinkLabels, Gauge<f64, std::sync::atomic::AtomicU64>>,
    /// The lowest recent write latency of a sink, which its controller compares with.
    pub sink_latency_floor_seconds: Family<SinkLabels, Gauge<f64, std::sync::atomic::AtomicU64>>,
    /// From the event's timestamp (ingest time unless the client set one) to its sink write.
    pub end_to_end_seconds: Family<PipelineLabels, Histogram, fn() -> Histogram>,
    /// From the event's timestamp to the commit that made its sink output durable.
    pub durable_seconds: Family<PipelineLabels, Histogram, fn() -> Histogram>,
    /// Log end offset minus committed offset.
    pub lag: Family<SourceLabels, Gauge>,
    /// The next offset to read after the last checkpoint (everything below it is in
    /// durable sink output, durable side outputs or checkpointed processor state).
    pub committed_offset: Family<SourceLabels, Gauge>,
    /// Events sent to the dead-letter topic.
    pub dead_letters: Family<PipelineLabels, Counter>,
    /// Events refused because their event time was outside the pipeline's bounds.
    pub event_time_rejected: Family<ProcessorLabels, Counter>,
    /// Events refused at an aggregate's `max_groups` or `max_open_windows`.
    pub state_over_limit: Family<ProcessorLabels, Counter>,
    /// Quantile sketch buckets merged at `sketch_max_buckets`.
    pub sketch_buckets_collapsed: Family<ProcessorLabels, Counter>,
    /// Stored batches a worker could not decode (sent to the dead-letter topic, skipped).
    pub unreadable_batches: Family<SourceLabels, Counter>,
    /// Worker failures, each followed by a restart from the last checkpoint.
    pub worker_restarts: Family<SourceLabels, Counter>,
    /// 1 while a worker runs, 0 while it waits to be restarted or has stopped.
    pub worker_up: Family<SourceLabels, Gauge>,
    /// Events a processor dropped instead of growing its state at the memory limit
    /// (`memory_policy = "drop_newest"`).
    pub memory_dropped: Family<ProcessorLabels, Counter>,
    /// Times a worker stopped reading its log at the memory limit.
    pub memory_waits: Family<PipelineLabels, Counter>,
    /// Times a worker waited at the memory limit for long with nothing freed, and read
    /// on under its processors' own bounds.
    pub memory_stalls: Family<PipelineLabels, Counter>,
}

impl Default for PipelineMetrics {
    fn default() -> Self {
        PipelineMetrics::new()
    }
}

impl PipelineMetrics {
    /// Metrics not registered anywhere (for tests and embedding).
    pub fn new() -> PipelineMetrics {
        PipelineMetrics {
            events_read: Family::default(),
            processor_in: Family::default(),
            processor_out: Family::default(),
            processor_dropped: Family::default(),
            processor_failed: Family::default(),
            late_events: Family::default(),
            sink_events: Family::default(),
            sink_errors: Family::default(),
            sink_dead_letters: Family::default(),
            sink_breakers_open: Family::default(),
            sink_breaker_transitions: Family::default(),
            sink_flushes: Family::default(),
            sink_batch_events: Family::new_with_constructor(batch_histogram as fn() -> Histogram),
            sink_write_seconds: Family::new_with_constructor(seconds_histogram as fn() -> Histogram),
            sink_batch_target: Family::default(),
            sink_concurrency_limit: Family::default(),
            sink_in_flight: Family::default(),
            sink_latency_seconds: Family::default(),
            sink_latency_floor_seconds: Family::default(),
            end_to_end_seconds: Family::new_with_constructor(latency_histogram as fn() -> Histogram),
            durable_seconds: Family::new_with_constructor(latency_histogram as fn() -> Histogram),
            lag: Family::default(),
            committed_offset: Family::default(),
            dead_letters: Family::default(),
            event_time_rejected: Family::default(),
            state_over_limit: Family::default(),
            sketch_buckets_collapsed: Family::default(),
            unreadable_batches: Family::default(),
            worker_restarts: Family::default(),
            worker_up: Family::default(),
            memory_dropped: Family::default(),
            memory_waits: Family::default(),
            memory_stalls: Family::default(),
        }
    }

    /// Counts what hit a bound in one processor call (only non-zero counts touch a
    /// metric, so the common case costs nothing).
    pub fn record_bounds(&self, labels: &ProcessorLabels, bounds: &crate::processors::BoundCounts) {
        for (family, n) in [
            (&self.event_time_rejected, bounds.event_time_out_of_bounds),
            (&self.state_over_limit, bounds.state_over_limit),
            (&self.sketch_buckets_collapsed, bounds.sketch_buckets_collapsed),
            (&self.memory_dropped, bounds.memory_dropped),
        ] {
            if n > 0 {
                family.get_or_create(labels).inc_by(n);
            }
        }
    }

    /// Creates the metrics and registers them.
    pub fn register(registry: &mut Registry) -> PipelineMetrics {
        let m = PipelineMetrics::new();
        registry.register("flowgate_pipeline_events_read", "Events pipelines read from the log", m.events_read.clone());
        registry.register("flowgate_processor_events_in", "Events into a processor", m.processor_in.clone());
        registry.register("flowgate_processor_events_out", "Events out of a processor", m.processor_out.clone());
        registry.register(
            "flowgate_processor_events_dropped",
            "Events a processor dropped on purpose",
            m.processor_dropped.clone(),
        );
        registry.register(
            "flowgate_processor_events_failed",
            "Events a processor failed on (sent to _dlq)",
            m.processor_failed.clone(),
        );
        registry.register("flowgate_processor_late_events", "Events later than their windows", m.late_events.clone());
        registry.register("flowgate_sink_events", "Events written by a sink", m.sink_events.clone());
        registry.register("flowgate_sink_errors", "Sink writes that left events undelivered", m.sink_errors.clone());
        registry.register(
            "flowgate_sink_breakers_open",
            "1 while a sink's circuit breaker is open",
            m.sink_breakers_open.clone(),
        );
        registry.register(
            "flowgate_sink_breaker_transitions",
            "Circuit-breaker transitions by the state entered",
            m.sink_breaker_transitions.clone(),
        );
        registry.register(
            "flowgate_sink_dead_letters",
            "Events a sink sent to the dead-letter topic (refused, or out of retries)",
            m.sink_dead_letters.clone(),
        );
        registry.register("flowgate_sink_flushes", "Sink batch flushes by reason", m.sink_flushes.clone());
        registry.register("flowgate_sink_batch_events", "Events per sink write", m.sink_batch_events.clone());
        registry.register(
            "flowgate_sink_write_duration_seconds",
            "Duration of sink writes",
            m.sink_write_seconds.clone(),
        );
        registry.register(
            "flowgate_sink_batch_target_events",
            "Current sink batch size target",
            m.sink_batch_target.clone(),
        );
        registry.register(
            "flowgate_sink_concurrency_limit",
            "Writes a sink may have in flight at once",
            m.sink_concurrency_limit.clone(),
        );
        registry.register("flowgate_sink_in_flight", "Writes a sink has in flight", m.sink_in_flight.clone());
        registry.register(
            "flowgate_sink_latency_seconds",
            "Recent write latency of a sink, as its controller averages it",
            m.sink_latency_seconds.clone(),
        );
        registry.register(
            "flowgate_sink_latency_floor_seconds",
            "Lowest recent write latency of a sink",
            m.sink_latency_floor_seconds.clone(),
        );
        registry.register(
            "flowgate_pipeline_end_to_end_latency_seconds",
            "From event timestamp to sink write",
            m.end_to_end_seconds.clone(),
        );
        registry.register(
            "flowgate_pipeline_durable_latency_seconds",
            "From event timestamp to the sink commit that made it durable",
            m.durable_seconds.clone(),
        );
        registry.register("flowgate_pipeline_lag", "Log end offset minus committed offset", m.lag.clone());
        registry.register(
            "flowgate_pipeline_committed_offset",
            "Next offset to read after the last checkpoint",
            m.committed_offset.clone(),
        );
        registry.register("flowgate_dlq_events", "Events sent to the dead-letter topic", m.dead_letters.clone());
        registry.register(
            "flowgate_processor_event_time_rejected",
            "Events whose event time was outside the pipeline's event_time bounds (sent to _dlq)",
            m.event_time_rejected.clone(),
        );
        registry.register(
            "flowgate_aggregate_events_over_limit",
            "Events refused at an aggregate's max_groups or max_open_windows (sent to _dlq)",
            m.state_over_limit.clone(),
        );
        registry.register(
            "flowgate_memory_dropped_events",
            "Events a processor dropped at the memory limit instead of growing its state (memory_policy = drop_newest)",
            m.memory_dropped.clone(),
        );
        registry.register(
            "flowgate_memory_pipeline_waits",
            "Times a pipeline worker stopped reading its log at the memory limit",
            m.memory_waits.clone(),
        );
        registry.register(
            "flowgate_memory_pipeline_stalls",
            "Times a pipeline worker waited at the memory limit with nothing freed and read on under its processors' own bounds",
            m.memory_stalls.clone(),
        );
        registry.register(
            "flowgate_aggregate_sketch_buckets_collapsed",
            "Quantile sketch buckets merged at sketch_max_buckets",
            m.sketch_buckets_collapsed.clone(),
        );
        registry.register(
            "flowgate_pipeline_unreadable_batches",
            "Stored batches a pipeline could not decode (sent to _dlq and skipped)",
            m.unreadable_batches.clone(),
        );
        registry.register(
            "flowgate_pipeline_worker_restarts",
            "Pipeline worker failures, each followed by a restart from the last checkpoint",
            m.worker_restarts.clone(),
        );
        registry.register(
            "flowgate_pipeline_worker_up",
            "1 while a pipeline worker runs, 0 while it waits to restart",
            m.worker_up.clone(),
        );
        m
    }
}
