//! The sink task: batching, per-event outcomes, retries with backoff and jitter, dead
//! letters of what is refused or runs out of retries, sink metrics. Every write is let
//! through and reported to the sink's controller ([`super::controller`]), which sets the
//! batch size, the writes in flight and the circuit breaker. This is the machinery every
//! sink shares; a sink only writes and says what became of each event
//! ([`crate::sink::WriteOutcome`]).
//!
//! Events wait for their flush in a [`PendingBatch`], which copies their key and payload
//! into storage of its own. Events arrive as slices of the worker's log reads (about
//! `read.max_bytes` each); holding those slices would keep a whole read buffer alive
//! for every event a sink keeps, so a sink that takes one event in a thousand would
//! hold a thousand buffers. With the copy, a sink holds at most its queue (4 messages,
//! each a slice of one read) plus its batch (`batch.max_bytes` plus one event).

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use tokio::sync::mpsc;

use super::controller::{Outcome, SinkController};
use super::dead_letters::{Category, Entry, FailedAt, SideWriter};
use super::fan_out::{Committed, SinkMsg};
use super::sink_status::{SinkStatus, SinkStatuses};
use crate::config::{BatchPolicy, RetryPolicy};
use crate::event::ALL_SINKS;
use crate::metrics::{FlushLabels, PipelineLabels, PipelineMetrics, SinkLabels};
use crate::sink::{EventFailure, Sink, SinkEvent, WriteOutcome};
use crate::trace::{self, Contexts};

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

/// Where an event's bytes are in a [`PendingBatch`]'s storage.
struct Pending {
    partition: u32,
    offset: u64,
    timestamp: i64,
    key: Option<(usize, usize)>,
    payload: (usize, usize),
}

/// A sink's batch before its flush: events whose bytes are copied into one buffer of
/// the batch's own. The buffer's allocation is reused from batch to batch once the
/// sink has let go of the last one.
#[derive(Default)]
pub(super) struct PendingBatch {
    storage: BytesMut,
    pending: Vec<Pending>,
    sealed: Vec<SinkEvent>,
    /// The `pipeline.read` spans of the traced batches its events came from: its writes
    /// continue them.
    traces: Contexts,
}

impl PendingBatch {
    /// Copies an event in.
    pub(super) fn push(&mut self, e: &SinkEvent) {
        let key = e.key.as_ref().map(|k| {
            let start = self.storage.len();
            self.storage.extend_from_slice(k);
            (start, self.storage.len())
        });
        let start = self.storage.len();
        self.storage.extend_from_slice(&e.payload);
        self.pending.push(Pending {
            partition: e.partition,
            offset: e.offset,
            timestamp: e.timestamp,
            key,
            payload: (start, self.storage.len()),
        });
    }

    fn len(&self) -> usize {
        self.pending.len()
    }

    fn is_empty(&self) -> bool {
        self.pending.is_empty() && self.sealed.is_empty()
    }

    /// Bytes of keys and payloads held.
    fn bytes(&self) -> usize {
        self.storage.len()
    }

    /// The events as a sink takes them (built once per batch; retries reuse them).
    fn seal(&mut self) -> &[SinkEvent] {
        if !self.pending.is_empty() {
            let storage: Bytes = self.storage.split().freeze();
            self.sealed.extend(self.pending.drain(..).map(|p| SinkEvent {
                partition: p.partition,
                offset: p.offset,
                timestamp: p.timestamp,
                key: p.key.map(|(a, b)| storage.slice(a..b)),
                payload: storage.slice(p.payload.0..p.payload.1),
            }));
        }
        &self.sealed
    }

    /// Drops the written events, releasing their storage for the next batch.
    fn clear(&mut self) {
        self.sealed.clear();
        self.pending.clear();
        self.storage.clear();
        self.traces.clear();
    }
}

struct SinkTask {
    sink: Box<dyn Sink>,
    labels: SinkLabels,
    metrics: Arc<PipelineMetrics>,
    events: prometheus_client::metrics::counter::Counter,
    end_to_end: prometheus_client::metrics::histogram::Histogram,
    durable: prometheus_client::metrics::histogram::Histogram,
    /// Timestamps of events written since the last commit, observed into `durable` once
    /// the commit succeeds; at most [`MAX_UNCOMMITTED_SAMPLES`] (the earliest, which wait
    /// longest, are kept).
    uncommitted: Vec<i64>,
    retry: RetryPolicy,
    /// The source topic, for dead letters.
    topic: String,
    /// Dead letters of this sink, which its commit waits for.
    side: SideWriter,
    /// Why dead letters could not be written, reported at the next commit (which fails,
    /// so that the worker restarts from its last checkpoint and they are written again).
    broken: Option<String>,
    controller: Arc<SinkController>,
    /// What `/v1/stats` shows of this task.
    status: SinkStatus,
    statuses: SinkStatuses,
}

/// Bound of [`SinkTask::uncommitted`]: 8 MiB of timestamps between two commits.
const MAX_UNCOMMITTED_SAMPLES: usize = 1 << 20;

/// The wait before attempt `attempt + 1` (`attempt` ≥ 1): full jitter, a uniform draw
/// from zero to the step, which doubles from the initial backoff up to the largest.
fn backoff(policy: &RetryPolicy, attempt: u32) -> Duration {
    let step = policy
        .initial_backoff_ms
        .max(1)
        .saturating_mul(1u64.checked_shl(attempt.saturating_sub(1)).unwrap_or(u64::MAX))
        .min(policy.max_backoff_ms.max(1));
    Duration::from_millis(fastrand::u64(0..=step))
}

/// Records on a `sink.write` span what became of the write: `delivered`, `partial`
/// (the sink named events it did not deliver) or `failed` (the write failed whole).
fn record_outcome(span: &tracing::Span, result: &anyhow::Result<WriteOutcome>, events: usize) {
    match result {
        Ok(outcome) if outcome.failures.is_empty() => {
            span.record("flowgate.outcome", "delivered");
            span.record("flowgate.events.failed", 0u64);
        }
        Ok(outcome) => {
            span.record("flowgate.outcome", "partial");
            span.record("flowgate.events.failed", outcome.failures.len() as u64);
            span.record("otel.status_code", "error");
            span.record("otel.status_description", outcome.failures[0].reason.as_str());
        }
        Err(e) => {
            span.record("flowgate.outcome", "failed");
            span.record("flowgate.events.failed", events as u64);
            span.record("otel.status_code", "error");
            span.record("otel.status_description", format!("{e:#}").as_str());
        }
    }
}

/// An event the sink did not deliver, on its way to the dead-letter topic.
struct Undelivered {
    event: SinkEvent,
    category: Category,
    error: String,
    code: Option<String>,
    /// Attempts made when it was given up.
    attempts: u32,
}

impl SinkTask {
    /// Writes the batch until every event is delivered or dead-lettered: events the
    /// target refuses for good go to the dead-letter topic at once; the rest are retried
    /// (the whole batch when the write failed as a whole, which a sink may resume; only
    /// the undelivered ones when it said which) with backoff until they are delivered or
    /// [`RetryPolicy`] gives up on them. Returns how long the last write took.
    async fn flush(&mut self, batch: &mut PendingBatch, reason: Reason) -> Option<Duration> {
        if batch.is_empty() {
            return None;
        }
        // Only a batch holding events of a traced read is traced.
        let traces = std::mem::take(&mut batch.traces);
        let mut bytes = if traces.list().is_empty() { 0 } else { batch.bytes() };
        let events = batch.seal();
        let mut retrying: Option<Vec<SinkEvent>> = None;
        let mut undelivered: Vec<Undelivered> = Vec::new();
        let mut attempts = 0u32;
        let mut first_failure: Option<(Instant, i64)> = None;
        let mut last_error = String::new();
        let took = loop {
            let current: &[SinkEvent] = retrying.as_deref().unwrap_or(events);
            // Latencies of full batches are compared with each other; retries of a few
            // events and flushes by time are not full.
            let full = retrying.is_none() && matches!(reason, Reason::Size | Reason::Bytes);
            let permit = self.controller.acquire().await;
            self.show_breaker();
            attempts = attempts.saturating_add(1);
            let span = (!traces.list().is_empty()).then(|| {
                if retrying.is_some() {
                    bytes = current.iter().map(|e| e.payload.len() + e.key.as_ref().map_or(0, |k| k.len())).sum();
                }
                trace::sink_write(&traces, &self.labels.pipeline, &self.labels.sink, current.len(), bytes, attempts)
            });
            let result = self.sink.write(current).await;
            if let Some(span) = span {
                record_outcome(&span, &result, current.len());
            }
            // The retryable failures, in batch order; `None` when the write failed as a whole.
            let (failed, retry_after): (Option<Vec<EventFailure>>, Option<Duration>) = match result {
                Ok(outcome) if outcome.failures.is_empty() => (Some(Vec::new()), None),
                Ok(mut outcome) => {
                    self.metrics.sink_errors.get_or_create(&self.labels).inc();
                    // Batch order, so that a retry keeps the order of a key's events.
                    outcome.failures.sort_by_key(|f| f.index);
                    let mut again: Vec<EventFailure> = Vec::new();
                    let mut last_index = None;
                    for f in outcome.failures {
                        // A sink naming an event twice or out of range is not trusted
                        // beyond the events it names once.
                        if f.index >= current.len() || last_index == Some(f.index) {
                            tracing::warn!(pipeline = %self.labels.pipeline, sink = %self.labels.sink, index = f.index,
                                "the sink named an event twice or one outside the batch; ignored");
                            continue;
                        }
                        last_index = Some(f.index);
                        if f.retryable {
                            again.push(f);
                        } else {
                            undelivered.push(Undelivered {
                                event: current[f.index].clone(),
                                category: Category::Rejected,
                                error: f.reason,
                                code: f.code,
                                attempts,
                            });
                        }
                    }
                    (Some(again), outcome.retry_after)
                }
                Err(e) => {
                    self.metrics.sink_errors.get_or_create(&self.labels).inc();
                    last_error = format!("{e:#}");
                    tracing::warn!(pipeline = %self.labels.pipeline, sink = %self.labels.sink, error = %last_error,
                        attempt = attempts, "sink write failed; retrying");
                    (None, None)
                }
            };
            let whole = failed.is_none();
            // The target answered for some events unless the whole write failed or every
            // event of it came back retryable.
            let answered = failed.as_ref().is_some_and(|f| f.len() < current.len());
            let failed = match failed {
                Some(f) if f.is_empty() => {
                    break permit.finish(Outcome::Answered { pushback: retry_after.is_some(), full });
                }
                Some(f) => f,
                None => Vec::new(),
            };
            let took = if answered {
                permit.finish(Outcome::Answered { pushback: true, full })
            } else {
                let why = if whole { last_error.as_str() } else { failed[0].reason.as_str() };
                permit.finish(Outcome::Failed { why })
            };
            let first = *first_failure.get_or_insert((Instant::now(), flowgate_core::time::now_ms()));
            // A write that failed as a whole is retried until it succeeds, whatever the
            // bounds, unless the sink says it may be given up: the sink may have stored
            // part of it, which only its own resume of the same batch can tell, so none
            // of it may go to the dead letters.
            let exhausted = (!whole || self.sink.may_give_up_failed_writes())
                && ((self.retry.max_attempts > 0 && attempts >= self.retry.max_attempts)
                    || (self.retry.max_elapsed_ms > 0
                        && first.0.elapsed() >= Duration::from_millis(self.retry.max_elapsed_ms)));
            if exhausted && whole {
                undelivered.extend(current.iter().map(|event| Undelivered {
                    event: event.clone(),
                    category: Category::RetriesExhausted,
                    error: last_error.clone(),
                    code: None,
                    attempts,
                }));
                break took;
            }
            if exhausted {
                undelivered.extend(failed.into_iter().map(|f| Undelivered {
                    event: current[f.index].clone(),
                    category: Category::RetriesExhausted,
                    error: f.reason,
                    code: f.code,
                    attempts,
                }));
                break took;
            }
            let shown_error = if whole { last_error.clone() } else { failed[0].reason.clone() };
            self.show(if whole { current.len() } else { failed.len() }, Some(shown_error));
            if !whole {
                tracing::warn!(pipeline = %self.labels.pipeline, sink = %self.labels.sink, events = failed.len(),
                    error = %failed[0].reason, attempt = attempts, "the sink did not deliver some events; retrying them");
                retrying = Some(failed.iter().map(|f| current[f.index].clone()).collect());
            }
            // A target's hint is honoured up to the largest backoff step, so that no
            // answer can park a sink (and its checkpoints) for long.
            let hint = retry_after.unwrap_or_default().min(Duration::from_millis(self.retry.max_backoff_ms.max(1)));
            self.controller.hold_for(hint);
            // An open breaker makes the next attempt wait for its probe instead.
            if !self.controller.breaker_open() {
                tokio::time::sleep(backoff(&self.retry, attempts).max(hint)).await;
            }
        };
        if !undelivered.is_empty() {
            let first_ms = first_failure.map_or_else(flowgate_core::time::now_ms, |f| f.1);
            self.dead_letter(&undelivered, first_ms);
        }
        if attempts > 1 || !undelivered.is_empty() || self.status.retrying_events > 0 {
            let error = undelivered.first().map(|u| u.error.clone());
            self.show(0, error);
        }
        let now = flowgate_core::time::now_ms();
        let room = MAX_UNCOMMITTED_SAMPLES.saturating_sub(self.uncommitted.len());
        // Latencies are of delivered events only (dead letters are counted apart).
        let dead: std::collections::HashSet<(u32, u64)> =
            undelivered.iter().map(|u| (u.event.partition, u.event.offset)).collect();
        let delivered_events = events.iter().filter(|e| dead.is_empty() || !dead.contains(&(e.partition, e.offset)));
        for e in delivered_events.clone() {
            // Event times come from clients: any i64 may be here.
            self.end_to_end.observe(now.saturating_sub(e.timestamp).max(0) as f64 / 1000.0);
        }
        self.uncommitted.extend(delivered_events.take(room).map(|e| e.timestamp));
        let delivered = events.len().saturating_sub(undelivered.len());
        self.events.inc_by(delivered as u64);
        self.metrics.sink_batch_events.get_or_create(&self.labels).observe(events.len() as f64);
        self.metrics.sink_write_seconds.get_or_create(&self.labels).observe(took.as_secs_f64());
        let flush_labels = FlushLabels {
            pipeline: self.labels.pipeline.clone(),
            sink: self.labels.sink.clone(),
            reason: reason.as_str().into(),
        };
        self.metrics.sink_flushes.get_or_create(&flush_labels).inc();
        batch.clear();
        // Keeps the allocation for the next batch.
        batch.traces = traces;
        batch.traces.clear();
        Some(took)
    }

    /// Publishes the breaker's state if it changed.
    fn show_breaker(&mut self) {
        if self.controller.breaker_shown().0 != self.status.breaker {
            let (retrying, error) = (self.status.retrying_events, self.status.last_error.take());
            self.show(retrying, error);
        }
    }

    /// Publishes the task's status (once per write that left events undelivered, and
    /// once when it is resolved).
    fn show(&mut self, retrying_events: usize, last_error: Option<String>) {
        let (breaker, since) = self.controller.breaker_shown();
        self.status.breaker = breaker;
        self.status.breaker_since_ms = since;
        self.status.retrying_events = retrying_events;
        self.status.last_error = last_error;
        self.statuses.set(&self.status);
    }

    /// Appends the undelivered events to the dead-letter topic; a failure is kept for
    /// the next commit to report.
    fn dead_letter(&mut self, undelivered: &[Undelivered], first_failure_ms: i64) {
        let now = flowgate_core::time::now_ms();
        let (pipeline, sink, topic) = (&self.labels.pipeline, &self.labels.sink, &self.topic);
        for u in undelivered.iter().take(1) {
            tracing::warn!(pipeline = %pipeline, sink = %sink, events = undelivered.len(), category = ?u.category,
                error = %u.error, "events sent to the dead-letter topic");
        }
        let entries = undelivered.iter().map(|u| {
            let entry = Entry {
                pipeline,
                at: FailedAt::Sink(sink),
                category: u.category,
                error: &u.error,
                code: u.code.as_deref(),
                attempts: u.attempts,
                first_failure_ms,
                last_failure_ms: now,
                topic,
                partition: u.event.partition,
                offset: u.event.offset,
                last_offset: None,
                timestamp: u.event.timestamp,
                event: Some(&u.event.payload[..]),
            };
            (entry, u.event.key.as_deref())
        });
        match self.side.dead_letters(entries) {
            Ok(()) => {
                let labels = PipelineLabels { pipeline: pipeline.clone() };
                self.metrics.dead_letters.get_or_create(&labels).inc_by(undelivered.len() as u64);
                let by = SinkLabels { pipeline: pipeline.clone(), sink: sink.clone() };
                self.metrics.sink_dead_letters.get_or_create(&by).inc_by(undelivered.len() as u64);
            }
            Err(e) => self.broken = Some(format!("{e:#}")),
        }
    }
}

impl SinkTask {
    /// Makes the sink's output and its dead letters durable and returns the state to
    /// checkpoint; fails while dead letters could not be written.
    async fn commit(&mut self) -> anyhow::Result<serde_json::Value> {
        if let Some(broken) = &self.broken {
            anyhow::bail!("dead letters could not be written ({broken}); the worker restarts from its last checkpoint");
        }
        self.side.make_durable().await?;
        self.sink.commit().await
    }

    /// Observes how long the events written since the last commit took to become durable.
    fn observe_durable(&mut self) {
        let now = flowgate_core::time::now_ms();
        for ts in self.uncommitted.drain(..) {
            self.durable.observe(now.saturating_sub(ts).max(0) as f64 / 1000.0);
        }
    }
}

/// What a sink task needs besides its sink: where its events come from, its sink's
/// controller, and where its dead letters go.
pub(super) struct SinkSetup {
    /// The worker's partition lease, held until the task ends.
    pub(super) lease: Option<super::lease::Lease>,
    pub(super) statuses: SinkStatuses,
    /// The source partition.
    pub(super) partition: u32,
    pub(super) batch: BatchPolicy,
    pub(super) retry: RetryPolicy,
    /// The sink's controller, shared with its instances of the other partitions.
    pub(super) controller: Arc<SinkController>,
    /// The sink's bit in route masks.
    pub(super) bit: u64,
    pub(super) labels: SinkLabels,
    pub(super) metrics: Arc<PipelineMetrics>,
    /// The source topic.
    pub(super) topic: String,
    pub(super) side: SideWriter,
}

/// The sink task: batches by count (the controller's batch target), bytes and wait;
/// retries failed writes with backoff (the queue in front fills meanwhile, which slows
/// the pipeline, not ingest).
pub(super) async fn run_sink(sink: Box<dyn Sink>, mut rx: mpsc::Receiver<SinkMsg>, setup: SinkSetup) {
    let SinkSetup {
        lease: _lease,
        statuses,
        partition,
        batch: policy,
        retry,
        controller,
        bit,
        labels,
        metrics,
        topic,
        side,
    } = setup;
    let status = SinkStatus::starting(&labels, &topic, partition, controller.batch_target());
    let events = metrics.sink_events.get_or_create(&labels).clone();
    let end_to_end =
        metrics.end_to_end_seconds.get_or_create(&PipelineLabels { pipeline: labels.pipeline.clone() }).clone();
    let durable = metrics.durable_seconds.get_or_create(&PipelineLabels { pipeline: labels.pipeline.clone() }).clone();
    let mut task = SinkTask {
        sink,
        events,
        end_to_end,
        durable,
        uncommitted: Vec::new(),
        labels,
        metrics,
        retry,
        topic,
        side,
        broken: None,
        controller,
        status,
        statuses,
    };
    task.statuses.set(&task.status);
    let max_wait = Duration::from_millis(policy.max_wait_ms.max(1));
    let mut buffer = PendingBatch::default();
    let mut oldest: Option<Instant> = None;
    loop {
        let msg = match oldest {
            Some(o) => tokio::select! {
                m = rx.recv() => m,
                _ = tokio::time::sleep_until((o + max_wait).into()) => {
                    task.flush(&mut buffer, Reason::Time).await;
                    oldest = None;
                    if task.broken.is_some() {
                        return;
                    }
                    continue;
                }
            },
            None => rx.recv().await,
        };
        match msg {
            Some(SinkMsg::Events(events, masks, trace)) => {
                // Read once per message, not per event; it moves once per write.
                let mut target = task.controller.batch_target();
                let for_this = |m: &u64| *m == ALL_SINKS || *m & bit != 0;
                // A traced message's context goes with the batch being filled if any of its
                // events comes to this sink, and again after each flush if any is left:
                // checked per message and per flush, never per event of an untraced one.
                if let Some(tp) = trace.filter(|_| masks.iter().any(for_this)) {
                    buffer.traces.push(tp);
                }
                for (i, (e, m)) in events.iter().zip(masks.iter()).enumerate() {
                    if !for_this(m) {
                        continue;
                    }
                    buffer.push(e);
                    oldest.get_or_insert_with(Instant::now);
                    let reason = if buffer.len() >= target {
                        Reason::Size
                    } else if buffer.bytes() >= policy.max_bytes {
                        Reason::Bytes
                    } else {
                        continue;
                    };
                    task.flush(&mut buffer, reason).await;
                    oldest = None;
                    if let Some(tp) = trace.filter(|_| masks[i + 1..].iter().any(for_this)) {
                        buffer.traces.push(tp);
                    }
                    if task.broken.is_some() {
                        // Dead letters could not be written: stop, so that the worker
                        // restarts from its last checkpoint now rather than at its next
                        // commit, and nothing more is written meanwhile.
                        return;
                    }
                    target = task.controller.batch_target();
                    if task.status.batch_target != target {
                        task.status.batch_target = target;
                        task.statuses.set(&task.status);
                    }
                }
            }
            Some(SinkMsg::Commit(reply)) => {
                task.flush(&mut buffer, Reason::Commit).await;
                oldest = None;
                let committed = task.commit().await;
                if committed.is_ok() {
                    task.observe_durable();
                }
                let (batch_target, concurrency_limit) =
                    (task.controller.batch_target(), task.controller.learned_limit());
                let _ = reply.send(committed.map(|state| Committed { state, batch_target, concurrency_limit }));
            }
            None => {
                task.flush(&mut buffer, Reason::Commit).await;
                let _ = task.commit().await;
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::BreakerPolicy;
    use crate::sink::{BoxFuture, WriteOutcome};

    /// A sink that answers each write from a script, and records what it was given.
    struct Scripted {
        answers: std::collections::VecDeque<anyhow::Result<WriteOutcome>>,
        seen: Arc<parking_lot::Mutex<Vec<Vec<u64>>>>,
        at: Arc<parking_lot::Mutex<Vec<Instant>>>,
        gives_up: bool,
    }

    impl Sink for Scripted {
        fn write<'a>(&'a mut self, events: &'a [SinkEvent]) -> BoxFuture<'a, anyhow::Result<WriteOutcome>> {
            self.seen.lock().push(events.iter().map(|e| e.offset).collect());
            self.at.lock().push(Instant::now());
            let answer = self.answers.pop_front().unwrap_or_else(|| Ok(WriteOutcome::delivered()));
            Box::pin(async move { answer })
        }

        fn may_give_up_failed_writes(&self) -> bool {
            self.gives_up
        }

        fn commit(&mut self) -> BoxFuture<'_, anyhow::Result<serde_json::Value>> {
            Box::pin(async { Ok(serde_json::Value::Null) })
        }

        fn recover<'a>(&'a mut self, _state: &'a serde_json::Value) -> BoxFuture<'a, anyhow::Result<()>> {
            Box::pin(async { Ok(()) })
        }
    }

    thread_local! {
        /// Whether the next scripted sink may give up failed writes.
        static GIVES_UP: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    }

    fn failure(index: usize, retryable: bool, code: &str) -> EventFailure {
        EventFailure { index, retryable, reason: format!("status {code}"), code: Some(code.into()) }
    }

    /// Runs one flush of events with offsets 0..n through a scripted sink; returns what
    /// the sink was given per attempt and the dead letters written.
    async fn flush_through(
        n: u64,
        answers: Vec<anyhow::Result<WriteOutcome>>,
        retry: RetryPolicy,
    ) -> (Vec<Vec<u64>>, Vec<serde_json::Value>) {
        flush_with_breaker(n, answers, retry, BreakerPolicy { consecutive_failures: 0, ..BreakerPolicy::default() })
            .await
            .0
    }

    /// As [`flush_through`], with a breaker; also returns when each write was made.
    async fn flush_with_breaker(
        n: u64,
        answers: Vec<anyhow::Result<WriteOutcome>>,
        retry: RetryPolicy,
        breaker: BreakerPolicy,
    ) -> ((Vec<Vec<u64>>, Vec<serde_json::Value>), Vec<Instant>) {
        let dir = tempfile::tempdir().unwrap();
        let log = flowgate_log::Log::open(dir.path(), flowgate_log::LogConfig::default()).unwrap();
        log.create_topic(super::super::DLQ_TOPIC, 1).unwrap();
        let seen = Arc::new(parking_lot::Mutex::new(Vec::new()));
        let written_at = Arc::new(parking_lot::Mutex::new(Vec::new()));
        let gives_up = GIVES_UP.with(std::cell::Cell::get);
        let sink = Scripted { answers: answers.into(), seen: seen.clone(), at: written_at.clone(), gives_up };
        let metrics = Arc::new(PipelineMetrics::new());
        let labels = SinkLabels { pipeline: "p".into(), sink: "out".into() };
        let (labels_for_breaker, metrics_for_breaker) = (labels.clone(), metrics.clone());
        let statuses = SinkStatuses::default();
        let events = metrics.sink_events.get_or_create(&labels).clone();
        let end_to_end = metrics.end_to_end_seconds.get_or_create(&PipelineLabels { pipeline: "p".into() }).clone();
        let durable = metrics.durable_seconds.get_or_create(&PipelineLabels { pipeline: "p".into() }).clone();
        let mut task = SinkTask {
            sink: Box::new(sink),
            events,
            end_to_end,
            durable,
            uncommitted: Vec::new(),
            labels,
            metrics,
            retry,
            topic: "in".into(),
            side: SideWriter::new(log.clone()),
            broken: None,
            status: SinkStatus::starting(&labels_for_breaker, "in", 0, 1),
            controller: Arc::new(SinkController::new(
                labels_for_breaker,
                super::super::controller::Mode::Unlimited,
                crate::config::ConcurrencyPolicy::default(),
                BatchPolicy::default(),
                breaker,
                &metrics_for_breaker,
            )),
            statuses: statuses.clone(),
        };
        let mut batch = PendingBatch::default();
        for offset in 0..n {
            let payload = bytes::Bytes::from(format!("{{\"n\":{offset}}}"));
            batch.push(&SinkEvent { partition: 0, offset, timestamp: 1, key: None, payload });
        }
        task.flush(&mut batch, Reason::Size).await;
        task.commit().await.unwrap();
        let read = log.topic(super::super::DLQ_TOPIC).unwrap().partition(0).unwrap().read(0, 1 << 20).unwrap();
        let mut dead = Vec::new();
        let mut scratch = Vec::new();
        let mut rest = &read.batches[..];
        while !rest.is_empty() {
            let (view, tail) = flowgate_core::BatchView::parse(rest).unwrap();
            for r in view.records(&mut scratch).unwrap() {
                dead.push(serde_json::from_slice(r.unwrap().payload).unwrap());
            }
            rest = tail;
        }
        let seen = seen.lock().clone();
        let at = written_at.lock().clone();
        ((seen, dead), at)
    }

    fn quick() -> RetryPolicy {
        RetryPolicy { initial_backoff_ms: 1, max_backoff_ms: 2, ..RetryPolicy::default() }
    }

    #[tokio::test]
    async fn refused_events_are_dead_lettered_and_only_retryable_ones_are_sent_again() {
        let first =
            WriteOutcome { failures: vec![failure(1, false, "400"), failure(2, true, "503")], retry_after: None };
        let (seen, dead) = flush_through(4, vec![Ok(first)], quick()).await;
        assert_eq!(seen, vec![vec![0, 1, 2, 3], vec![2]], "the retry carries only the retryable event");
        assert_eq!(dead.len(), 1, "{dead:?}");
        assert_eq!((dead[0]["offset"].as_u64(), dead[0]["category"].as_str()), (Some(1), Some("rejected")));
        assert_eq!((dead[0]["sink"].as_str(), dead[0]["code"].as_str()), (Some("out"), Some("400")));
        assert_eq!(dead[0]["event"], serde_json::json!({"n": 1}));
    }

    #[tokio::test]
    async fn a_whole_batch_failure_is_retried_whole_whatever_the_bounds() {
        // The sink may have stored part of the batch: none of it may be dead-lettered.
        let retry = RetryPolicy { max_attempts: 3, ..quick() };
        let answers = (0..5).map(|_| Err(anyhow::anyhow!("connection refused"))).collect();
        let (seen, dead) = flush_through(2, answers, retry).await;
        assert_eq!(seen, vec![vec![0, 1]; 6], "the same batch until it went through");
        assert!(dead.is_empty(), "{dead:?}");
    }

    #[tokio::test]
    async fn events_the_sink_keeps_failing_are_dead_lettered_once_the_attempts_run_out() {
        let retry = RetryPolicy { max_attempts: 3, ..quick() };
        let busy = |index| Ok(WriteOutcome { failures: vec![failure(index, true, "503")], retry_after: None });
        let (seen, dead) = flush_through(3, vec![busy(1), busy(0), busy(0), busy(0)], retry).await;
        assert_eq!(seen, vec![vec![0, 1, 2], vec![1], vec![1]], "three attempts of event 1");
        assert_eq!(dead.len(), 1, "{dead:?}");
        assert_eq!((dead[0]["category"].as_str(), dead[0]["attempts"].as_u64()), (Some("retries_exhausted"), Some(3)));
        assert_eq!(dead[0]["code"], "503");
    }

    #[tokio::test]
    async fn a_write_failing_as_a_whole_is_given_up_once_retries_run_out_only_where_the_sink_allows() {
        let retry = RetryPolicy { max_attempts: 3, ..quick() };
        let down = || (0..5).map(|_| Err(anyhow::anyhow!("timed out"))).collect::<Vec<_>>();
        GIVES_UP.with(|g| g.set(true));
        let (seen, dead) = flush_through(2, down(), retry.clone()).await;
        GIVES_UP.with(|g| g.set(false));
        assert_eq!(seen.len(), 3, "three attempts");
        assert_eq!(dead.len(), 2, "{dead:?}");
        assert!(dead.iter().all(|d| d["category"] == "retries_exhausted" && d["error"] == "timed out"), "{dead:?}");
        // A sink that may have stored part of the write is retried until it succeeds.
        let (seen, dead) = flush_through(2, down(), retry).await;
        assert_eq!((seen.len(), dead.len()), (6, 0), "five failures, then delivered");
    }

    #[tokio::test]
    async fn a_retry_keeps_batch_order_whatever_order_the_sink_names_events_in() {
        let out_of_order =
            WriteOutcome { failures: vec![failure(3, true, "503"), failure(1, true, "503")], retry_after: None };
        let (seen, _) = flush_through(4, vec![Ok(out_of_order)], quick()).await;
        assert_eq!(seen, vec![vec![0, 1, 2, 3], vec![1, 3]]);
    }

    #[tokio::test]
    async fn a_retry_after_hint_is_honoured_up_to_the_largest_backoff_step() {
        let retry = RetryPolicy { initial_backoff_ms: 1, max_backoff_ms: 300, ..RetryPolicy::default() };
        let hinted =
            WriteOutcome { failures: vec![failure(0, true, "429")], retry_after: Some(Duration::from_secs(86_400)) };
        let breaker = BreakerPolicy { consecutive_failures: 0, ..BreakerPolicy::default() };
        let started = Instant::now();
        let ((seen, _), at) = flush_with_breaker(1, vec![Ok(hinted)], retry, breaker).await;
        assert_eq!(seen.len(), 2);
        assert!(at[1] - at[0] >= Duration::from_millis(290), "the hint was honoured");
        assert!(started.elapsed() < Duration::from_secs(5), "but not for a day");
    }

    #[tokio::test]
    async fn a_sink_naming_an_event_twice_or_out_of_range_is_not_believed_beyond_that() {
        let odd = WriteOutcome {
            failures: vec![failure(0, false, "400"), failure(0, true, "503"), failure(9, false, "400")],
            retry_after: None,
        };
        let (seen, dead) = flush_through(2, vec![Ok(odd)], quick()).await;
        assert_eq!(seen, vec![vec![0, 1]], "nothing left to retry");
        assert_eq!(dead.len(), 1, "{dead:?}");
    }

    #[tokio::test]
    async fn an_open_breaker_makes_no_writes_until_its_probe() {
        // Retries back off 1-2 ms; the breaker opens after 3 failures for 200 ms.
        let answers = (0..4).map(|_| Err(anyhow::anyhow!("connection refused"))).collect();
        let breaker =
            BreakerPolicy { consecutive_failures: 3, open_ms: 200, max_open_ms: 1000, ..BreakerPolicy::default() };
        let ((seen, dead), at) = flush_with_breaker(1, answers, quick(), breaker).await;
        assert_eq!(seen.len(), 5, "4 failures, then the delivery");
        assert!(dead.is_empty());
        assert!(at[3] - at[2] >= Duration::from_millis(190), "no write while open: {:?}", at[3] - at[2]);
        assert!(
            at[4] - at[3] >= Duration::from_millis(390),
            "the failed probe doubled the opening: {:?}",
            at[4] - at[3]
        );
        assert!(at[2] - at[0] < Duration::from_millis(150), "before it opened, plain backoff");
    }

    #[test]
    fn backoff_is_full_jitter_under_a_doubling_cap() {
        let policy = RetryPolicy { initial_backoff_ms: 100, max_backoff_ms: 1000, ..RetryPolicy::default() };
        for attempt in [1u32, 2, 4, 30, u32::MAX] {
            let cap = (100u64 << (attempt.min(10) - 1).min(9)).min(1000);
            for _ in 0..200 {
                assert!(backoff(&policy, attempt) <= Duration::from_millis(cap), "attempt {attempt}");
            }
        }
        let spread: std::collections::HashSet<Duration> = (0..200).map(|_| backoff(&policy, 5)).collect();
        assert!(spread.len() > 50, "the waits are spread, not all the same");
    }

    #[test]
    fn a_pending_event_does_not_pin_the_read_buffer_it_came_from() {
        let read = bytes::Bytes::from(vec![7u8; 1 << 20]);
        let event = SinkEvent {
            partition: 0,
            offset: 1,
            timestamp: i64::MIN,
            key: Some(read.slice(0..3)),
            payload: read.slice(10..20),
        };
        let mut batch = PendingBatch::default();
        batch.push(&event);
        drop(event);
        assert!(read.is_unique(), "the batch must hold its own copy, not a slice of the 1 MiB read");
        let sealed = batch.seal();
        assert_eq!(sealed.len(), 1);
        assert_eq!(sealed[0].key.as_deref(), Some(&[7u8; 3][..]));
        assert_eq!(&sealed[0].payload[..], &[7u8; 10][..]);
        assert_eq!(sealed[0].timestamp, i64::MIN);
        assert!(batch.bytes() == 0 && !batch.is_empty());
        batch.clear();
        assert!(batch.is_empty());
    }
}
