//! The sink task: batching, adaptive batch sizes, retries, sink metrics.

use std::sync::Arc;
use std::time::{Duration, Instant};

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