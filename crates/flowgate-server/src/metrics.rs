//! The engine's Prometheus metrics (prefix `flowgate_`).
//!
//! [`Metrics::render`] writes the OpenMetrics text format; [`openmetrics_to_text`] turns it
//! into the Prometheus text format 0.0.4 for scrapers that do not ask for OpenMetrics
//! ([`wants_openmetrics`] reads their `Accept` header).
//!
//! Hot paths never build label sets per event: a connection resolves its counters once
//! per topic ([`TopicCounters`]) and bumps them once per batch.

use std::sync::Arc;
use std::time::Duration;

use flowgate_log::Log;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// The ingest path an event came in by.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum IngestPath {
    /// Binary TCP protocol.
    Binary,
    /// NDJSON over TCP.
    Ndjson,
    /// HTTP API.
    Http,
}

impl IngestPath {
    /// Label value.
    pub fn as_str(self) -> &'static str {
        match self {
            IngestPath::Binary => "binary",
            IngestPath::Ndjson => "ndjson",
            IngestPath::Http => "http",
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TopicPathLabels {
    topic: String,
    path: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RejectLabels {
    path: String,
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PathLabels {
    path: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ComponentLabels {
    component: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TopicLabels {
    topic: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OpReasonLabels {
    op: String,
    reason: String,
}

/// All metrics of one engine.
pub struct Metrics {
    registry: Registry,
    events: Family<TopicPathLabels, Counter>,
    bytes: Family<TopicPathLabels, Counter>,
    rejected: Family<RejectLabels, Counter>,
    connections: Family<PathLabels, Gauge>,
    connections_total: Family<PathLabels, Counter>,
    append_seconds: Histogram,
    fsync_seconds: Histogram,
    batch_events: Histogram,
    log_size: Family<TopicLabels, Gauge>,
    log_end_offset: Family<TopicLabels, Gauge>,
    retention_unread_deleted: Family<TopicLabels, Counter>,
    topic_settings_unreadable: Gauge,
    topic_api_rejected: Family<OpReasonLabels, Counter>,
    buffered_bytes: Gauge,
    memory_paused: Family<PathLabels, Counter>,
    memory_used: Gauge,
    memory_limit: Gauge,
    memory_soft_limit: Gauge,
    memory_peak: Gauge,
    memory_pressure: Gauge<f64, std::sync::atomic::AtomicU64>,
    memory_level: Gauge,
    memory_components: Family<ComponentLabels, Gauge>,
    reloads: Family<OutcomeLabels, Counter>,
    last_reload: Gauge,
    traceparent_invalid: Counter,
    trace_exported: Counter,
    trace_dropped: Family<ReasonLabels, Counter>,
    trace_export_failures: Counter,
    /// Pipeline, processor and sink metrics.
    pub pipelines: Arc<flowgate_engine::PipelineMetrics>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

/// Counters of one (topic, path), resolved once and bumped per batch.
#[derive(Clone, Debug)]
pub struct TopicCounters {
    events: Counter,
    bytes: Counter,
}

impl TopicCounters {
    /// Counts an accepted batch.
    #[inline]
    pub fn accepted(&self, events: u64, bytes: u64) {
        self.events.inc_by(events);
        self.bytes.inc_by(bytes);
    }

    /// Counts the `stored` events of a batch of `events` events and `bytes` payload bytes
    /// that was stored only in part, with their share of the bytes.
    pub fn accepted_part(&self, stored: u64, events: u64, bytes: u64) {
        let share = u128::from(bytes) * u128::from(stored) / u128::from(events.max(1));
        self.accepted(stored, u64::try_from(share).unwrap_or(bytes));
    }
}

impl Metrics {
    /// Counts a config reload: `applied`, `refused` (nothing changed) or `failed` (part
    /// of it was applied).
    pub fn reloaded(&self, outcome: &str) {
        self.reloads.get_or_create(&OutcomeLabels { outcome: outcome.into() }).inc();
        if outcome == "applied" {
            self.last_reload.set(flowgate_core::time::now_ms() / 1000);
        }
    }

    /// A fresh registry with every metric registered.
    pub fn new() -> Arc<Metrics> {
        let mut registry = Registry::default();
        let events = Family::<TopicPathLabels, Counter>::default();
        registry.register("flowgate_ingest_events", "Events accepted into the log", events.clone());
        let bytes = Family::<TopicPathLabels, Counter>::default();
        registry.register("flowgate_ingest_bytes", "Payload bytes accepted into the log", bytes.clone());
        let rejected = Family::<RejectLabels, Counter>::default();
        registry.register("flowgate_ingest_rejected", "Input refused, by path and reason", rejected.clone());
        let connections = Family::<PathLabels, Gauge>::default();
        registry.register("flowgate_connections", "Open client connections", connections.clone());
        let connections_total = Family::<PathLabels, Counter>::default();
        registry.register("flowgate_connections_accepted", "Client connections accepted", connections_total.clone());
        let append_seconds = Histogram::new(exponential_buckets(0.000_005, 2.0, 20));
        registry.register(
            "flowgate_append_duration_seconds",
            "Time to write one batch to the log",
            append_seconds.clone(),
        );
        let fsync_seconds = Histogram::new(exponential_buckets(0.000_05, 2.0, 18));
        registry.register("flowgate_fsync_duration_seconds", "Time of one fsync of a partition", fsync_seconds.clone());
        let batch_events = Histogram::new(exponential_buckets(1.0, 2.0, 16));
        registry.register("flowgate_append_batch_events", "Events per appended batch", batch_events.clone());
        let log_size = Family::<TopicLabels, Gauge>::default();
        registry.register("flowgate_log_size_bytes", "Bytes of segment files per topic", log_size.clone());
        let log_end_offset = Family::<TopicLabels, Gauge>::default();
        registry.register(
            "flowgate_log_end_offset",
            "Sum over partitions of the next offset, per topic",
            log_end_offset.clone(),
        );
        let retention_unread_deleted = Family::<TopicLabels, Counter>::default();
        registry.register(
            "flowgate_log_retention_unread_deleted_events",
            "Events retention deleted before a pipeline had committed them, per topic",
            retention_unread_deleted.clone(),
        );
        let topic_settings_unreadable = Gauge::default();
        registry.register(
            "flowgate_log_topic_settings_unreadable",
            "Topics whose settings file could not be read at start (their retention deletes nothing)",
            topic_settings_unreadable.clone(),
        );
        let topic_api_rejected = Family::<OpReasonLabels, Counter>::default();
        registry.register(
            "flowgate_topic_api_rejected",
            "Topic requests (create, alter, describe, read) refused for what they asked, by reason",
            topic_api_rejected.clone(),
        );
        let buffered_bytes = Gauge::default();
        registry.register("flowgate_ingest_buffered_bytes", "Bytes held in ingest buffers", buffered_bytes.clone());
        let memory_paused = Family::<PathLabels, Counter>::default();
        registry.register(
            "flowgate_memory_ingest_pauses",
            "Times a connection stopped reading because of memory pressure, by path",
            memory_paused.clone(),
        );
        let memory_used = Gauge::default();
        registry.register("flowgate_memory_used_bytes", "Bytes charged to the memory budget", memory_used.clone());
        let memory_limit = Gauge::default();
        registry.register("flowgate_memory_limit_bytes", "The memory budget", memory_limit.clone());
        let memory_soft_limit = Gauge::default();
        registry.register(
            "flowgate_memory_soft_limit_bytes",
            "Where soft memory pressure starts",
            memory_soft_limit.clone(),
        );
        let memory_peak = Gauge::default();
        registry.register(
            "flowgate_memory_peak_bytes",
            "The most ever charged to the memory budget",
            memory_peak.clone(),
        );
        let memory_pressure = Gauge::<f64, std::sync::atomic::AtomicU64>::default();
        registry.register(
            "flowgate_memory_pressure",
            "Bytes charged over the memory budget (1 = at the limit)",
            memory_pressure.clone(),
        );
        let memory_level = Gauge::default();
        registry.register(
            "flowgate_memory_pressure_level",
            "Memory pressure: 0 normal, 1 soft, 2 hard (at the limit)",
            memory_level.clone(),
        );
        let memory_components = Family::<ComponentLabels, Gauge>::default();
        registry.register(
            "flowgate_memory_component_bytes",
            "Bytes charged to the memory budget, by what holds them",
            memory_components.clone(),
        );
        let reloads = Family::<OutcomeLabels, Counter>::default();
        registry.register(
            "flowgate_config_reloads",
            "Config reloads: applied, refused (nothing changed) or failed (part applied)",
            reloads.clone(),
        );
        let last_reload = Gauge::default();
        registry.register(
            "flowgate_config_last_reload_timestamp_seconds",
            "When the config was last reloaded successfully (0: never)",
            last_reload.clone(),
        );
        let traceparent_invalid = Counter::default();
        registry.register(
            "flowgate_trace_traceparent_invalid",
            "HTTP produce requests whose traceparent header was ignored as invalid",
            traceparent_invalid.clone(),
        );
        let trace_exported = Counter::default();
        registry.register("flowgate_trace_spans_exported", "Spans the OTLP collector accepted", trace_exported.clone());
        let trace_dropped = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "flowgate_trace_spans_dropped",
            "Spans not exported: the queue was full (queue_full) or their export failed (export_failed)",
            trace_dropped.clone(),
        );
        let trace_export_failures = Counter::default();
        registry.register(
            "flowgate_trace_export_failures",
            "OTLP export requests that failed or timed out",
            trace_export_failures.clone(),
        );
        let pipelines = Arc::new(flowgate_engine::PipelineMetrics::register(&mut registry));
        Arc::new(Metrics {
            reloads,
            last_reload,
            traceparent_invalid,
            trace_exported,
            trace_dropped,
            trace_export_failures,
            memory_paused,
            memory_used,
            memory_limit,
            memory_soft_limit,
            memory_peak,
            memory_pressure,
            memory_level,
            memory_components,
            pipelines,
            registry,
            events,
            bytes,
            rejected,
            connections,
            connections_total,
            append_seconds,
            fsync_seconds,
            batch_events,
            log_size,
            log_end_offset,
            retention_unread_deleted,
            topic_settings_unreadable,
            topic_api_rejected,
            buffered_bytes,
        })
    }

    /// The counters of `topic` via `path`.
    pub fn topic_counters(&self, topic: &str, path: IngestPath) -> TopicCounters {
        let labels = TopicPathLabels { topic: topic.to_owned(), path: path.as_str().to_owned() };
        TopicCounters {
            events: self.events.get_or_create(&labels).clone(),
            bytes: self.bytes.get_or_create(&labels).clone(),
        }
    }

    /// Counts refused input.
    pub fn rejected(&self, path: IngestPath, reason: &str, n: u64) {
        self.rejected
            .get_or_create(&RejectLabels { path: path.as_str().to_owned(), reason: reason.to_owned() })
            .inc_by(n);
    }

    /// Counts a topic request refused for what it asked.
    pub fn topic_api_rejected(&self, op: crate::topic_admin::Op, reason: &str) {
        self.topic_api_rejected
            .get_or_create(&OpReasonLabels { op: op.as_str().to_owned(), reason: reason.to_owned() })
            .inc();
    }

    /// The number of rejections so far for (path, reason).
    pub fn rejected_count(&self, path: IngestPath, reason: &str) -> u64 {
        self.rejected.get_or_create(&RejectLabels { path: path.as_str().to_owned(), reason: reason.to_owned() }).get()
    }

    /// A connection opened; the guard counts it closed when dropped.
    pub fn connection_opened(self: &Arc<Self>, path: IngestPath) -> ConnectionGuard {
        let labels = PathLabels { path: path.as_str().to_owned() };
        self.connections_total.get_or_create(&labels).inc();
        let gauge = self.connections.get_or_create(&labels).clone();
        gauge.inc();
        ConnectionGuard { gauge }
    }

    /// Records one append.
    #[inline]
    pub fn append(&self, took: Duration, events: u32) {
        self.append_seconds.observe(took.as_secs_f64());
        self.batch_events.observe(f64::from(events));
    }

    /// Records one fsync.
    pub fn fsync(&self, took: Duration) {
        self.fsync_seconds.observe(took.as_secs_f64());
    }

    /// Tracks bytes held in ingest buffers.
    pub fn buffered_bytes(&self) -> &Gauge {
        &self.buffered_bytes
    }

    /// Counts a connection that stopped reading for memory pressure.
    pub fn memory_paused(&self, path: IngestPath) {
        self.memory_paused.get_or_create(&PathLabels { path: path.as_str().to_owned() }).inc();
    }

    /// Times connections of `path` stopped reading for memory pressure.
    pub fn memory_paused_count(&self, path: IngestPath) -> u64 {
        self.memory_paused.get_or_create(&PathLabels { path: path.as_str().to_owned() }).get()
    }

    /// Copies the memory budget's state into its gauges.
    pub fn observe_memory(&self, memory: &flowgate_memory::MemoryGovernor) {
        let as_i64 = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        self.memory_used.set(as_i64(memory.used()));
        self.memory_limit.set(as_i64(memory.limit()));
        self.memory_soft_limit.set(as_i64(memory.soft_limit()));
        self.memory_peak.set(as_i64(memory.peak()));
        self.memory_pressure.set(memory.pressure());
        self.memory_level.set(memory.level().as_number());
        for c in flowgate_memory::Component::ALL {
            self.memory_components
                .get_or_create(&ComponentLabels { component: c.as_str().to_owned() })
                .set(as_i64(memory.component(c)));
        }
    }

    /// Counts an HTTP produce request whose `traceparent` was ignored as invalid.
    pub fn traceparent_invalid(&self) {
        self.traceparent_invalid.inc();
    }

    /// Brings the exporter's counters (process-wide, see [`crate::trace::stats`]) into
    /// this registry's.
    fn observe_trace_export(&self) {
        let catch_up = |counter: &Counter, total: &std::sync::atomic::AtomicU64| {
            let total = total.load(std::sync::atomic::Ordering::Relaxed);
            counter.inc_by(total.saturating_sub(counter.get()));
        };
        let stats = crate::trace::stats();
        catch_up(&self.trace_exported, &stats.exported);
        catch_up(&self.trace_export_failures, &stats.export_failures);
        for (reason, total) in
            [("queue_full", &stats.dropped_queue_full), ("export_failed", &stats.dropped_export_failed)]
        {
            catch_up(&self.trace_dropped.get_or_create(&ReasonLabels { reason: reason.to_owned() }), total);
        }
    }

    /// The OpenMetrics text exposition (ending in `# EOF`), with log sizes read fresh.
    pub fn render(&self, log: &Log) -> String {
        self.observe_trace_export();
        let unreadable = log.topics().iter().filter(|t| t.settings_error().is_some()).count();
        self.topic_settings_unreadable.set(unreadable as i64);
        for topic in log.topic_infos() {
            let labels = TopicLabels { topic: topic.name.clone() };
            self.log_size.get_or_create(&labels).set(topic.partitions.iter().map(|p| p.size_bytes as i64).sum());
            self.log_end_offset.get_or_create(&labels).set(topic.partitions.iter().map(|p| p.end_offset as i64).sum());
            // The log counts since start; the counter catches up with it.
            let unread: u64 = topic.partitions.iter().map(|p| p.unread_deleted_events).sum();
            let counter = self.retention_unread_deleted.get_or_create(&labels);
            counter.inc_by(unread.saturating_sub(counter.get()));
        }
        let mut out = String::with_capacity(8192);
        prometheus_client::encoding::text::encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }
}

/// The content type of the Prometheus text format 0.0.4.
pub const TEXT_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// The content type of the OpenMetrics text format [`Metrics::render`] writes.
pub const OPENMETRICS_CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Whether a scraper's `Accept` header prefers OpenMetrics to the text format 0.0.4: it
/// names `application/openmetrics-text` with a quality above 0 and at least that of
/// `text/plain` (Prometheus asks for OpenMetrics first; `curl` and `promtool` get text).
pub fn wants_openmetrics(accept: &str) -> bool {
    let mut openmetrics = 0.0_f64;
    let mut text = 0.0_f64;
    for range in accept.split(',') {
        let mut parts = range.split(';').map(str::trim);
        let media = parts.next().unwrap_or("").to_ascii_lowercase();
        let q = parts
            .filter_map(|p| p.split_once('='))
            .find(|(k, _)| k.trim().eq_ignore_ascii_case("q"))
            .and_then(|(_, v)| v.trim().parse::<f64>().ok())
            .unwrap_or(1.0);
        match media.as_str() {
            "application/openmetrics-text" => openmetrics = openmetrics.max(q),
            "text/plain" => text = text.max(q),
            _ => {}
        }
    }
    openmetrics > 0.0 && openmetrics >= text
}

/// The Prometheus text format 0.0.4 of an OpenMetrics exposition: a counter family is
/// named as its samples (`x_total`, where OpenMetrics names it `x`), `unknown` becomes
/// `untyped`, and what 0.0.4 has no place for goes (`# UNIT`, `# EOF`, `_created`
/// samples of counters).
pub fn openmetrics_to_text(openmetrics: &str) -> String {
    let mut counters = std::collections::HashSet::new();
    for line in openmetrics.lines() {
        if let Some((name, kind)) = line.strip_prefix("# TYPE ").and_then(|rest| rest.split_once(' ')) {
            if kind.trim() == "counter" {
                counters.insert(name);
            }
        }
    }
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let descriptor = line.strip_prefix("# HELP ").map(|rest| ("HELP", rest));
        let descriptor = descriptor.or_else(|| line.strip_prefix("# TYPE ").map(|rest| ("TYPE", rest)));
        if let Some((kind, rest)) = descriptor {
            let (name, value) = rest.split_once(' ').unwrap_or((rest, ""));
            let value = if kind == "TYPE" && value.trim() == "unknown" { "untyped" } else { value };
            let suffix = if counters.contains(name) && !name.ends_with("_total") { "_total" } else { "" };
            out.push_str(&format!("# {kind} {name}{suffix} {value}\n"));
            continue;
        }
        let sample_name = line.split(['{', ' ']).next().unwrap_or("");
        if sample_name.strip_suffix("_created").is_some_and(|family| counters.contains(family)) {
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

/// Decrements the open-connections gauge when dropped.
#[derive(Debug)]
pub struct ConnectionGuard {
    gauge: Gauge,
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.gauge.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prometheus_gets_openmetrics_and_other_scrapers_text() {
        let prometheus =
            "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,\
                          text/plain;version=0.0.4;q=0.5,*/*;q=0.1";
        assert!(wants_openmetrics(prometheus));
        assert!(wants_openmetrics("application/openmetrics-text"));
        assert!(!wants_openmetrics(""));
        assert!(!wants_openmetrics("*/*"));
        assert!(!wants_openmetrics("text/plain;version=0.0.4"));
        assert!(!wants_openmetrics("text/plain, application/openmetrics-text;q=0.5"));
        assert!(!wants_openmetrics("application/openmetrics-text;q=0"));
    }

    #[test]
    fn the_text_format_names_counter_families_as_their_samples() {
        let openmetrics = "# HELP a_events Events.\n# TYPE a_events counter\na_events_total{x=\"1\"} 3\n\
                           a_events_created{x=\"1\"} 1.5\n# HELP b Gauge.\n# TYPE b gauge\n# UNIT b bytes\nb 2\n\
                           # HELP c Other.\n# TYPE c unknown\nc 1\n# EOF\n";
        assert_eq!(
            openmetrics_to_text(openmetrics),
            "# HELP a_events_total Events.\n# TYPE a_events_total counter\na_events_total{x=\"1\"} 3\n\
             # HELP b Gauge.\n# TYPE b gauge\nb 2\n# HELP c Other.\n# TYPE c untyped\nc 1\n"
        );
    }

    #[test]
    fn every_counter_of_the_engine_ends_in_total_in_the_text_format() {
        let metrics = Metrics::new();
        let dir = tempfile::tempdir().unwrap();
        let log = Log::open(dir.path(), flowgate_log::LogConfig::default()).unwrap();
        let text = openmetrics_to_text(&metrics.render(&log));
        assert!(!text.contains("# EOF"));
        for line in text.lines().filter(|l| l.starts_with("# TYPE ") && l.ends_with(" counter")) {
            assert!(line.split(' ').nth(2).unwrap().ends_with("_total"), "{line}");
        }
    }
}
