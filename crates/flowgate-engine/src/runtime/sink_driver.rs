//! The sink task: batching, adaptive batch sizes, retries, sink metrics.
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

use super::fan_out::SinkMsg;
use crate::config::BatchPolicy;
use crate::event::ALL_SINKS;
use crate::metrics::{FlushLabels, PipelineLabels, PipelineMetrics, SinkLabels};
use crate::sink::{Sink, SinkEvent};

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
}

/// Bound of [`SinkTask::uncommitted`]: 8 MiB of timestamps between two commits.
const MAX_UNCOMMITTED_SAMPLES: usize = 1 << 20;

impl SinkTask {
    /// Writes the batch (retrying with backoff until it succeeds), records metrics, and
    /// returns how long the successful write took.
    async fn flush(&mut self, batch: &mut PendingBatch, reason: Reason) -> Option<Duration> {
        if batch.is_empty() {
            return None;
        }
        let events = batch.seal();
        let mut backoff = Duration::from_millis(50);
        let took = loop {
            let started = Instant::now();
            match self.sink.write(events).await {
                Ok(()) => break started.elapsed(),
                Err(e) => {
                    self.metrics.sink_errors.get_or_create(&self.labels).inc();
                    tracing::warn!(pipeline = %self.labels.pipeline, sink = %self.labels.sink, error = %format!("{e:#}"),
                        "sink write failed; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = backoff.saturating_mul(2).min(Duration::from_secs(5));
                }
            }
        };
        let now = flowgate_core::time::now_ms();
        let room = MAX_UNCOMMITTED_SAMPLES.saturating_sub(self.uncommitted.len());
        for e in events {
            // Event times come from clients: any i64 may be here.
            self.end_to_end.observe(now.saturating_sub(e.timestamp).max(0) as f64 / 1000.0);
        }
        self.uncommitted.extend(events.iter().take(room).map(|e| e.timestamp));
        self.events.inc_by(events.len() as u64);
        self.metrics.sink_batch_events.get_or_create(&self.labels).observe(events.len() as f64);
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

impl SinkTask {
    /// Observes how long the events written since the last commit took to become durable.
    fn observe_durable(&mut self) {
        let now = flowgate_core::time::now_ms();
        for ts in self.uncommitted.drain(..) {
            self.durable.observe(now.saturating_sub(ts).max(0) as f64 / 1000.0);
        }
    }
}

/// The sink task: batches by count, bytes and wait; adapts the batch size toward the
/// target latency when asked; retries failed writes with backoff (the queue in front
/// fills meanwhile, which slows the pipeline, not ingest). `bit` is the sink's bit in
/// route masks.
pub(super) async fn run_sink(
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
    let durable = metrics.durable_seconds.get_or_create(&PipelineLabels { pipeline: labels.pipeline.clone() }).clone();
    let mut task = SinkTask { sink, events, end_to_end, durable, uncommitted: Vec::new(), labels, metrics };
    let target_gauge = task.metrics.sink_batch_target.get_or_create(&task.labels).clone();
    let mut target = if policy.adaptive {
        (policy.max_events / 4).max(policy.min_events).min(policy.max_events)
    } else {
        policy.max_events
    };
    target_gauge.set(i64::try_from(target).unwrap_or(i64::MAX));
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
                    buffer.push(e);
                    oldest.get_or_insert_with(Instant::now);
                    let reason = if buffer.len() >= target {
                        Reason::Size
                    } else if buffer.bytes() >= policy.max_bytes {
                        Reason::Bytes
                    } else {
                        continue;
                    };
                    let took = task.flush(&mut buffer, reason).await;
                    oldest = None;
                    if let (true, Some(took)) = (policy.adaptive, took) {
                        target = adapt(target, took, &policy);
                        target_gauge.set(i64::try_from(target).unwrap_or(i64::MAX));
                    }
                }
            }
            Some(SinkMsg::Commit(reply)) => {
                task.flush(&mut buffer, Reason::Commit).await;
                oldest = None;
                let committed = task.sink.commit().await;
                if committed.is_ok() {
                    task.observe_durable();
                }
                let _ = reply.send(committed);
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
    let next = if took < target.saturating_mul(8) / 10 {
        current.saturating_add(current / 4).saturating_add(1)
    } else if took > target {
        current - current / 4
    } else {
        current
    };
    // `min` then `max`, not `clamp`: a config with min above max must not panic here.
    next.min(policy.max_events.max(1)).max(policy.min_events.max(1).min(policy.max_events.max(1)))
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
        let unbounded = BatchPolicy { max_events: usize::MAX, ..policy };
        assert_eq!(adapt(usize::MAX, Duration::ZERO, &unbounded), usize::MAX, "growth saturates");
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
