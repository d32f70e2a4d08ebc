//! Tracing (docs/tracing.md): the `[tracing]` section, the `ingest` and `append` spans
//! of an HTTP produce request with the W3C `traceparent` it carries, and the counters
//! `/metrics` and `/v1/stats` show. [`export`] sends the spans over OTLP/HTTP.
//!
//! A produce request is traced when its `traceparent` says the producer sampled it, or,
//! without one, at `sample_ratio`. A traced request's events carry the context of its
//! `ingest` span as a `traceparent` header, so the pipelines that read them continue the
//! same trace ([`flowgate_engine::trace`]). Untraced requests, and every request while
//! tracing is off, store no header and make no span.

pub mod export;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};

use axum::http::{HeaderMap, StatusCode};
use flowgate_core::traceparent::{self, TraceParent};
use flowgate_engine::trace::{self as engine_trace, TARGET};
use serde::{Deserialize, Serialize};

use crate::metrics::Metrics;

/// `[tracing]`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TracingConfig {
    /// Where spans are sent: an OTLP/HTTP traces endpoint taking protobuf, such as
    /// `http://127.0.0.1:4318/v1/traces`. Tracing is off without one (or with "").
    #[serde(skip_serializing_if = "Option::is_none")]
    pub otlp_endpoint: Option<String>,
    /// HTTP headers sent with every export (a collector's API key).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub otlp_headers: BTreeMap<String, String>,
    /// Share of the batches without a producer's context that are traced (0 to 1).
    /// Requests whose `traceparent` is sampled are always traced, others never.
    pub sample_ratio: f64,
    /// `service.name` of the exported spans.
    pub service_name: String,
    /// Finished spans waiting for export at most; past it new spans are dropped and
    /// counted (`flowgate_trace_spans_dropped_total{reason="queue_full"}`).
    pub max_queue_spans: usize,
    /// Spans sent in one export request at most.
    pub max_export_batch_spans: usize,
    /// How often queued spans are sent (ms), when no full batch is waiting.
    pub export_interval_ms: u64,
    /// How long one export request may take (ms); its spans are dropped past it.
    pub export_timeout_ms: u64,
}

impl Default for TracingConfig {
    fn default() -> Self {
        TracingConfig {
            otlp_endpoint: None,
            otlp_headers: BTreeMap::new(),
            sample_ratio: 1.0,
            service_name: "flowgate".into(),
            max_queue_spans: 4096,
            max_export_batch_spans: 512,
            export_interval_ms: 1000,
            export_timeout_ms: 10_000,
        }
    }
}

impl TracingConfig {
    /// The endpoint when tracing is on.
    pub fn endpoint(&self) -> Option<&str> {
        self.otlp_endpoint.as_deref().filter(|e| !e.is_empty())
    }

    /// Checks the values: `Err((key, message))` names the first bad one.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        if let Some(url) = self.endpoint() {
            let parsed =
                reqwest::Url::parse(url).ok().filter(|u| matches!(u.scheme(), "http" | "https") && u.has_host());
            let Some(parsed) = parsed else {
                return Err((
                    "tracing.otlp_endpoint",
                    "must be an http:// or https:// URL with a host, such as http://127.0.0.1:4318/v1/traces".into(),
                ));
            };
            // A URL is logged and shown in errors: a secret does not belong in it.
            if !parsed.username().is_empty() || parsed.password().is_some() {
                return Err((
                    "tracing.otlp_endpoint",
                    "must not hold a user or password; send credentials with tracing.otlp_headers".into(),
                ));
            }
        }
        for (name, value) in &self.otlp_headers {
            if axum::http::HeaderName::try_from(name.as_str()).is_err()
                || axum::http::HeaderValue::try_from(value.as_str()).is_err()
            {
                return Err(("tracing.otlp_headers", format!("'{name}' is not a valid HTTP header name and value")));
            }
        }
        if !(0.0..=1.0).contains(&self.sample_ratio) {
            return Err(("tracing.sample_ratio", "must be from 0 to 1".into()));
        }
        if self.service_name.is_empty() || self.service_name.len() > 256 {
            return Err(("tracing.service_name", "must be 1 to 256 bytes".into()));
        }
        // Spans wait outside the memory budget; a few KB each at most.
        if !(1..=100_000).contains(&self.max_queue_spans) {
            return Err(("tracing.max_queue_spans", "must be from 1 to 100000".into()));
        }
        if !(1..=self.max_queue_spans).contains(&self.max_export_batch_spans) {
            return Err(("tracing.max_export_batch_spans", "must be from 1 to tracing.max_queue_spans".into()));
        }
        if !(10..=60_000).contains(&self.export_interval_ms) {
            return Err(("tracing.export_interval_ms", "must be from 10 to 60000".into()));
        }
        if !(100..=300_000).contains(&self.export_timeout_ms) {
            return Err(("tracing.export_timeout_ms", "must be from 100 to 300000".into()));
        }
        Ok(())
    }
}

/// Process-wide counters of the exporter (there is one per process, like the
/// subscriber it feeds), read into `/metrics` and `/v1/stats`.
#[derive(Debug, Default)]
pub struct TraceStats {
    /// Spans the collector accepted.
    pub exported: AtomicU64,
    /// Spans dropped because the queue was full (the collector is slow or down).
    pub dropped_queue_full: AtomicU64,
    /// Spans dropped because their export request failed or timed out.
    pub dropped_export_failed: AtomicU64,
    /// Export requests that failed or timed out.
    pub export_failures: AtomicU64,
}

static STATS: TraceStats = TraceStats {
    exported: AtomicU64::new(0),
    dropped_queue_full: AtomicU64::new(0),
    dropped_export_failed: AtomicU64::new(0),
    export_failures: AtomicU64::new(0),
};

/// The exporter's counters.
pub fn stats() -> &'static TraceStats {
    &STATS
}

/// The `tracing` object of `/v1/stats`.
pub fn stats_json() -> serde_json::Value {
    let s = stats();
    serde_json::json!({
        "enabled": engine_trace::enabled(),
        "spans_exported": s.exported.load(Ordering::Relaxed),
        "spans_dropped_queue_full": s.dropped_queue_full.load(Ordering::Relaxed),
        "spans_dropped_export_failed": s.dropped_export_failed.load(Ordering::Relaxed),
        "export_failures": s.export_failures.load(Ordering::Relaxed),
    })
}

/// Bytes the `traceparent` header adds to a record: a header count, the name and value
/// with their lengths.
pub const RECORD_HEADER_BYTES: usize = 1 + 1 + traceparent::HEADER.len() + 1 + traceparent::LEN;

/// The trace of one traced produce request: its `ingest` span and the header its
/// events carry.
pub struct IngestTrace {
    span: tracing::Span,
    header: [u8; traceparent::LEN],
}

/// Decides whether a produce request to `topic` is traced and, if so, starts its
/// `ingest` span; called only while tracing is on. An invalid `traceparent` (or more
/// than one) is counted and ignored, as if there were none.
pub fn ingest(headers: &HeaderMap, topic: &str, metrics: &Metrics) -> Option<IngestTrace> {
    let mut values = headers.get_all(traceparent::HEADER).iter();
    let parent = match (values.next(), values.next()) {
        (None, _) => None,
        (Some(value), None) => match TraceParent::parse(value.as_bytes()) {
            Ok(tp) => Some(tp),
            Err(_) => {
                metrics.traceparent_invalid();
                None
            }
        },
        // W3C: a request with several is treated as having none.
        (Some(_), Some(_)) => {
            metrics.traceparent_invalid();
            None
        }
    };
    let sampled = match &parent {
        Some(tp) => tp.sampled(),
        None => engine_trace::sample_root(),
    };
    if !sampled {
        return None;
    }
    let span = tracing::info_span!(target: TARGET, parent: None, "ingest",
        otel.kind = "server",
        otel.status_code = tracing::field::Empty,
        http.request.method = "POST",
        http.route = "/v1/topics/{topic}/events",
        http.response.status_code = tracing::field::Empty,
        flowgate.topic = topic,
        flowgate.events = tracing::field::Empty,
        flowgate.bytes = tracing::field::Empty,
        flowgate.partition = tracing::field::Empty,
        flowgate.offset.first = tracing::field::Empty,
        flowgate.offset.last = tracing::field::Empty,
    );
    if let Some(tp) = &parent {
        engine_trace::continue_trace(&span, tp);
    }
    // None when no OpenTelemetry layer records the span: nothing to continue then.
    let header = engine_trace::context_of(&span)?.encode();
    Some(IngestTrace { span, header })
}

impl IngestTrace {
    /// The header the request's first event carries.
    pub fn header(&self) -> (&'static str, &[u8]) {
        (traceparent::HEADER, &self.header)
    }

    /// Records what the request held once its body is parsed.
    pub fn parsed(&self, events: u64, bytes: u64) {
        self.span.record("flowgate.events", events);
        self.span.record("flowgate.bytes", bytes);
    }

    /// The `append` span of the request's batch: the write to the log and the wait
    /// until it is durable as `log.fsync` says.
    pub fn append(&self, topic: &str, events: u64) -> tracing::Span {
        tracing::info_span!(target: TARGET, parent: &self.span, "append",
            otel.status_code = tracing::field::Empty,
            flowgate.topic = topic,
            flowgate.events = events,
            flowgate.partition = tracing::field::Empty,
            flowgate.offset.first = tracing::field::Empty,
        )
    }

    /// Records where the batch was stored.
    pub fn stored(&self, append: &tracing::Span, partition: u32, first: u64, last: u64) {
        for span in [append, &self.span] {
            span.record("flowgate.partition", partition);
            span.record("flowgate.offset.first", first);
        }
        self.span.record("flowgate.offset.last", last);
    }

    /// Ends the `ingest` span with the request's answer (an error status for 5xx, as
    /// OpenTelemetry's HTTP conventions say for a server).
    pub fn finish(self, status: StatusCode) {
        self.span.record("http.response.status_code", status.as_u16());
        if status.is_server_error() {
            self.span.record("otel.status_code", "error");
        }
    }
}

/// Marks a span as failed.
pub fn failed(span: &tracing::Span) {
    span.record("otel.status_code", "error");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_section_is_checked_and_names_the_bad_key() {
        assert!(TracingConfig::default().validate().is_ok());
        assert_eq!(TracingConfig::default().endpoint(), None);
        let on = TracingConfig { otlp_endpoint: Some("http://127.0.0.1:4318/v1/traces".into()), ..Default::default() };
        assert!(on.validate().is_ok());
        let off = TracingConfig { otlp_endpoint: Some(String::new()), ..Default::default() };
        assert_eq!(off.endpoint(), None);
        let bad = |c: TracingConfig| c.validate().unwrap_err().0;
        assert_eq!(
            bad(TracingConfig { otlp_endpoint: Some("127.0.0.1:4318".into()), ..Default::default() }),
            "tracing.otlp_endpoint"
        );
        assert_eq!(bad(TracingConfig { sample_ratio: 1.5, ..Default::default() }), "tracing.sample_ratio");
        assert_eq!(bad(TracingConfig { sample_ratio: f64::NAN, ..Default::default() }), "tracing.sample_ratio");
        assert_eq!(bad(TracingConfig { service_name: String::new(), ..Default::default() }), "tracing.service_name");
        assert_eq!(
            bad(TracingConfig { max_export_batch_spans: 5000, ..Default::default() }),
            "tracing.max_export_batch_spans"
        );
        let headers = BTreeMap::from([("bad name".to_owned(), "v".to_owned())]);
        assert_eq!(bad(TracingConfig { otlp_headers: headers, ..Default::default() }), "tracing.otlp_headers");
    }

    #[test]
    fn the_record_header_size_matches_what_the_batch_format_writes() {
        let tp = TraceParent { trace_id: [1; 16], parent_id: [2; 8], flags: 1 };
        let encoded = tp.encode();
        let mut with = flowgate_core::BatchBuilder::new();
        with.push(0, None, None, std::iter::once((traceparent::HEADER, &encoded[..])), b"{}");
        let mut without = flowgate_core::BatchBuilder::new();
        without.push_payload(0, None, b"{}");
        assert_eq!(with.records_len() - without.records_len(), RECORD_HEADER_BYTES);
    }
}
