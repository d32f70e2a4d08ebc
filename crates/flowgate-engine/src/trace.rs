//! Tracing of batches through pipelines (docs/tracing.md): the `pipeline.read` span of
//! a worker's batch, a `processor` span per processor under it, and a `sink.write` span
//! per sink write.
//!
//! Spans are `tracing` spans with target [`TARGET`]; the OpenTelemetry layer the binary
//! installs when `[tracing]` names an exporter turns them into OpenTelemetry spans, and
//! the log output leaves them out. Sampling is decided here, once per batch, before any
//! span exists: while tracing is off ([`enabled`] is one relaxed load) the hot paths
//! make no span, no allocation and no per-event check at all.
//!
//! A batch continues the trace its events were produced in: each stored batch's first
//! record may carry a W3C `traceparent` header ([`flowgate_core::traceparent`]); the
//! read's span is a child of the first sampled one and links to the others
//! ([`Contexts`]).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use flowgate_core::TraceParent;
use opentelemetry::trace::{SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState};
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// The target of every span flowgate exports. The log output filters it out, so that
/// log lines look the same with tracing on or off.
pub const TARGET: &str = "flowgate::trace";

static ENABLED: AtomicBool = AtomicBool::new(false);

/// The sample ratio as a fraction of `u64::MAX` (`u64::MAX` samples every batch).
static THRESHOLD: AtomicU64 = AtomicU64::new(0);

/// Turns sampling on at `ratio` (0 to 1) of the batches that carry no sampled context:
/// done by the exporter once it runs, as spans made before would go nowhere.
pub fn enable(ratio: f64) {
    let ratio = if ratio.is_finite() { ratio.clamp(0.0, 1.0) } else { 0.0 };
    // `as` saturates: a ratio of 1 is `u64::MAX`, sampled whatever the draw.
    THRESHOLD.store((ratio * u64::MAX as f64) as u64, Ordering::Relaxed);
    ENABLED.store(true, Ordering::Release);
}

/// Turns sampling off: no batch is traced from now on.
pub fn disable() {
    ENABLED.store(false, Ordering::Release);
}

/// Whether tracing is on: the one check per batch the hot paths make while it is off.
#[inline]
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// Whether a batch that carries no context is traced: a draw at the sample ratio.
pub fn sample_root() -> bool {
    let threshold = THRESHOLD.load(Ordering::Relaxed);
    threshold == u64::MAX || (threshold > 0 && fastrand::u64(..) < threshold)
}

/// The OpenTelemetry context of a remote parent.
pub fn remote_context(parent: &TraceParent) -> opentelemetry::Context {
    opentelemetry::Context::new().with_remote_span_context(span_context(parent))
}

fn span_context(tp: &TraceParent) -> SpanContext {
    SpanContext::new(
        TraceId::from_bytes(tp.trace_id),
        SpanId::from_bytes(tp.parent_id),
        TraceFlags::new(tp.flags),
        true,
        TraceState::default(),
    )
}

/// The W3C context naming `span` as parent, to store in event headers or hand to the
/// next stage; `None` when the span is not recorded (no OpenTelemetry layer).
pub fn context_of(span: &tracing::Span) -> Option<TraceParent> {
    let cx = span.context();
    let sc = cx.span().span_context().clone();
    sc.is_valid().then(|| TraceParent {
        trace_id: sc.trace_id().to_bytes(),
        parent_id: sc.span_id().to_bytes(),
        flags: sc.trace_flags().to_u8(),
    })
}

/// Makes `span` (just created, as a root) continue the trace of `parent`.
pub fn continue_trace(span: &tracing::Span, parent: &TraceParent) {
    // Fails only when no OpenTelemetry layer sees the span: then nothing is exported.
    let _ = span.set_parent(remote_context(parent));
}

/// Makes `span` a child of `contexts`' first context, linked to the others.
pub fn attach(span: &tracing::Span, contexts: &Contexts) {
    let mut all = contexts.list.iter();
    if let Some(parent) = all.next() {
        continue_trace(span, parent);
    }
    for other in all {
        span.add_link(span_context(other));
    }
}

/// The distinct trace contexts of one batch, in the order found: the first sampled one
/// is the parent of the batch's span, the others (at most [`Contexts::MAX`] in all)
/// are links. Cleared and reused from batch to batch.
#[derive(Debug, Default)]
pub struct Contexts {
    list: Vec<TraceParent>,
    unsampled: bool,
}

impl Contexts {
    /// Contexts kept per batch: a batch from many requests links to the first of them.
    pub const MAX: usize = 32;

    /// Notes a context found in the batch.
    pub fn push(&mut self, tp: TraceParent) {
        if !tp.sampled() {
            self.unsampled = true;
        } else if self.list.len() < Self::MAX && !self.list.contains(&tp) {
            self.list.push(tp);
        }
    }

    /// Parses and notes a `traceparent` header value; an invalid one is ignored (the
    /// engine wrote it, or a producer did on purpose: it is not an event's fault).
    pub fn push_header(&mut self, value: &[u8]) {
        if let Ok(tp) = TraceParent::parse(value) {
            self.push(tp);
        }
    }

    /// Whether any context was noted.
    pub fn is_empty(&self) -> bool {
        self.list.is_empty() && !self.unsampled
    }

    /// Whether a batch with these contexts is traced: yes when a producer sampled one
    /// of them; no when producers said not to (unsampled contexts only); by the sample
    /// ratio when there are none.
    pub fn sampled(&self) -> bool {
        if !self.list.is_empty() {
            true
        } else if self.unsampled {
            false
        } else {
            sample_root()
        }
    }

    /// The sampled contexts, parent first.
    pub fn list(&self) -> &[TraceParent] {
        &self.list
    }

    /// Forgets the contexts, keeping the allocation.
    pub fn clear(&mut self) {
        self.list.clear();
        self.unsampled = false;
    }
}

/// The `pipeline.read` span of a worker's batch, continuing `contexts`.
pub(crate) fn pipeline_read(
    contexts: &Contexts,
    pipeline: &str,
    topic: &str,
    partition: u32,
    offsets: std::ops::Range<u64>,
    events: usize,
) -> tracing::Span {
    let span = tracing::info_span!(target: TARGET, parent: None, "pipeline.read",
        otel.kind = "consumer",
        flowgate.pipeline = pipeline,
        flowgate.topic = topic,
        flowgate.partition = partition,
        flowgate.offset.first = offsets.start,
        flowgate.offset.next = offsets.end,
        flowgate.events = events as u64,
        flowgate.events.out = tracing::field::Empty,
        flowgate.links = contexts.list().len().saturating_sub(1) as u64,
    );
    attach(&span, contexts);
    span
}

/// The span of processor `id` running a batch of `events` under `read`.
pub(crate) fn processor(read: &tracing::Span, pipeline: &str, id: &str, events: u64) -> tracing::Span {
    tracing::info_span!(target: TARGET, parent: read, "processor",
        flowgate.pipeline = pipeline,
        flowgate.processor = id,
        flowgate.events = events,
        flowgate.events.out = tracing::field::Empty,
        flowgate.events.failed = tracing::field::Empty,
    )
}

/// The span of one write of `events` events (`bytes` of keys and payloads) to a sink,
/// continuing the `pipeline.read` spans its events came from.
pub(crate) fn sink_write(
    contexts: &Contexts,
    pipeline: &str,
    sink: &str,
    events: usize,
    bytes: usize,
    attempt: u32,
) -> tracing::Span {
    let span = tracing::info_span!(target: TARGET, parent: None, "sink.write",
        otel.kind = "client",
        otel.status_code = tracing::field::Empty,
        otel.status_description = tracing::field::Empty,
        flowgate.pipeline = pipeline,
        flowgate.sink = sink,
        flowgate.events = events as u64,
        flowgate.bytes = bytes as u64,
        flowgate.attempt = attempt,
        flowgate.outcome = tracing::field::Empty,
        flowgate.events.failed = tracing::field::Empty,
        flowgate.links = contexts.list().len().saturating_sub(1) as u64,
    );
    attach(&span, contexts);
    span
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tp(n: u8, flags: u8) -> TraceParent {
        TraceParent { trace_id: [n; 16], parent_id: [n; 8], flags }
    }

    #[test]
    fn the_first_sampled_context_leads_distinct_ones_follow_up_to_the_bound() {
        let mut c = Contexts::default();
        assert!(c.is_empty());
        c.push(tp(1, 0));
        assert!(!c.sampled(), "producers that did not sample are respected");
        for n in 2..100 {
            c.push(tp(n, 1));
            c.push(tp(n, 1));
        }
        assert!(c.sampled());
        assert_eq!(c.list().len(), Contexts::MAX);
        assert_eq!(c.list()[0], tp(2, 1));
        c.clear();
        assert!(c.is_empty());
        c.push_header(b"not a traceparent");
        assert!(c.is_empty());
    }

    #[test]
    fn the_ratio_bounds_root_sampling() {
        enable(0.0);
        assert!((0..1000).all(|_| !sample_root()));
        enable(1.0);
        assert!((0..1000).all(|_| sample_root()));
        enable(0.5);
        let n = (0..10_000).filter(|_| sample_root()).count();
        assert!((4000..6000).contains(&n), "{n}");
        disable();
        assert!(!enabled());
    }
}
