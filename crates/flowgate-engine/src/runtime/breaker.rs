//! The circuit breaker of one sink.
//!
//! Closed: writes go through. After `consecutive_failures` writes in a row that failed as
//! a whole or came back with every event retryable, it opens: no writes at all for
//! `open_ms` (the sink's queue fills, its pipeline stops reading, and the log holds the
//! backlog). Then it is half-open: one write probes the target; if the target answers for
//! any event (delivered, or refused for good) the breaker closes, else it opens
//! again for twice as long, up to `max_open_ms`, and never shorter than a target's
//! Retry-After. Every transition is logged and counted
//! (`flowgate_sink_breaker_transitions_total{to}`); `flowgate_sink_breakers_open` counts
//! the open breakers of a sink's instances (one per source partition).

use std::time::{Duration, Instant};

use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;

use crate::config::BreakerPolicy;
use crate::metrics::{BreakerLabels, PipelineMetrics, SinkLabels};

/// Where a breaker is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum State {
    Closed,
    HalfOpen,
    Open,
}

impl State {
    fn as_str(self) -> &'static str {
        match self {
            State::Closed => "closed",
            State::HalfOpen => "half_open",
            State::Open => "open",
        }
    }
}

/// One sink's breaker.
pub(super) struct Breaker {
    policy: BreakerPolicy,
    state: State,
    failures_in_a_row: u32,
    /// While open: until when.
    open_until: Instant,
    /// How long the next opening lasts.
    open_for: Duration,
    /// When the current state was entered (ms since the epoch).
    since_ms: i64,
    labels: SinkLabels,
    gauge: Gauge,
    transitions: Family<BreakerLabels, prometheus_client::metrics::counter::Counter>,
}

impl Breaker {
    pub(super) fn new(policy: BreakerPolicy, labels: SinkLabels, metrics: &PipelineMetrics) -> Breaker {
        let gauge = metrics.sink_breakers_open.get_or_create(&labels).clone();
        let open_for = Duration::from_millis(policy.open_ms.max(1));
        Breaker {
            policy,
            state: State::Closed,
            failures_in_a_row: 0,
            open_until: Instant::now(),
            open_for,
            since_ms: flowgate_core::time::now_ms(),
            labels,
            gauge,
            transitions: metrics.sink_breaker_transitions.clone(),
        }
    }

    pub(super) fn state(&self) -> State {
        self.state
    }

    /// The state's name and when it was entered (ms since the epoch).
    pub(super) fn shown(&self) -> (&'static str, i64) {
        (self.state.as_str(), self.since_ms)
    }

    fn move_to(&mut self, to: State, why: &str) {
        if self.state == to {
            return;
        }
        let from = self.state;
        self.state = to;
        self.since_ms = flowgate_core::time::now_ms();
        // One gauge counts the open breakers of a sink's instances (one per source
        // partition).
        if to == State::Open {
            self.gauge.inc();
        } else if from == State::Open {
            self.gauge.dec();
        }
        let labels = BreakerLabels {
            pipeline: self.labels.pipeline.clone(),
            sink: self.labels.sink.clone(),
            to: to.as_str().into(),
        };
        self.transitions.get_or_create(&labels).inc();
        let (pipeline, sink) = (&self.labels.pipeline, &self.labels.sink);
        match to {
            State::Open => {
                tracing::warn!(%pipeline, %sink, from = from.as_str(), open_ms = self.open_for.as_millis() as u64,
                why, "circuit breaker opened: no writes to this sink until it probes again")
            }
            State::HalfOpen => tracing::info!(%pipeline, %sink, "circuit breaker half-open: probing the target"),
            State::Closed => tracing::info!(%pipeline, %sink, "circuit breaker closed: the target delivers again"),
        }
    }

    /// Waits until a write may be made (at once while closed or half-open; while open,
    /// until the opening ends, when the breaker turns half-open).
    pub(super) async fn admit(&mut self) {
        if self.state == State::Open {
            tokio::time::sleep_until(self.open_until.into()).await;
            self.move_to(State::HalfOpen, "probe");
        }
    }

    /// The target asked to be left alone for `hint`: an opening lasts at least that long.
    pub(super) fn hold_for(&mut self, hint: Duration) {
        if self.state == State::Open {
            self.open_until = self.open_until.max(Instant::now() + hint);
        }
    }

    /// The target answered for some event of a write (delivered or refused for good).
    pub(super) fn delivered(&mut self) {
        self.failures_in_a_row = 0;
        self.open_for = Duration::from_millis(self.policy.open_ms.max(1));
        self.move_to(State::Closed, "delivered");
    }

    /// A write failed as a whole or every event of it came back retryable; `why` says how.
    pub(super) fn failed(&mut self, why: &str) {
        self.failures_in_a_row = self.failures_in_a_row.saturating_add(1);
        let trip = match self.state {
            State::HalfOpen => true,
            State::Closed => {
                self.policy.consecutive_failures > 0 && self.failures_in_a_row >= self.policy.consecutive_failures
            }
            State::Open => false,
        };
        if trip {
            if self.state == State::HalfOpen {
                // The probe failed: stay away twice as long, within the bound.
                self.open_for =
                    self.open_for.saturating_mul(2).min(Duration::from_millis(self.policy.max_open_ms.max(1)));
            }
            self.open_until = Instant::now() + self.open_for;
            self.move_to(State::Open, why);
        }
    }
}

impl Drop for Breaker {
    fn drop(&mut self) {
        if self.state == State::Open {
            self.gauge.dec();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn breaker(consecutive_failures: u32) -> (Breaker, std::sync::Arc<PipelineMetrics>) {
        let metrics = std::sync::Arc::new(PipelineMetrics::new());
        let policy = BreakerPolicy { consecutive_failures, open_ms: 20, max_open_ms: 50 };
        let b = Breaker::new(policy, SinkLabels { pipeline: "p".into(), sink: "s".into() }, &metrics);
        (b, metrics)
    }

    fn transitions(metrics: &PipelineMetrics, to: &str) -> u64 {
        metrics
            .sink_breaker_transitions
            .get_or_create(&BreakerLabels { pipeline: "p".into(), sink: "s".into(), to: to.into() })
            .get()
    }

    #[tokio::test]
    async fn opens_after_failures_in_a_row_probes_after_a_while_and_closes_on_delivery() {
        let (mut b, metrics) = breaker(3);
        b.failed("503");
        b.delivered();
        b.failed("503");
        b.failed("503");
        assert_eq!(b.state(), State::Closed, "a delivery in between starts the count over");
        b.failed("503");
        assert_eq!(b.state(), State::Open);
        let opened = Instant::now();
        b.admit().await;
        assert!(opened.elapsed() >= Duration::from_millis(15), "no write while open");
        assert_eq!(b.state(), State::HalfOpen);
        b.failed("503");
        assert_eq!(b.state(), State::Open, "a failed probe opens it again");
        let reopened = Instant::now();
        b.admit().await;
        assert!(reopened.elapsed() >= Duration::from_millis(35), "twice as long the second time");
        b.failed("503");
        b.admit().await;
        assert!(b.open_for <= Duration::from_millis(50), "within max_open_ms");
        b.delivered();
        assert_eq!(b.state(), State::Closed);
        assert_eq!(
            (transitions(&metrics, "open"), transitions(&metrics, "half_open"), transitions(&metrics, "closed")),
            (3, 3, 1)
        );
        assert_eq!(metrics.sink_breakers_open.get_or_create(&b.labels).get(), 0);
        b.failed("503");
        b.failed("503");
        b.failed("503");
        assert_eq!(metrics.sink_breakers_open.get_or_create(&b.labels).get(), 1);
        drop(b);
        assert_eq!(
            metrics.sink_breakers_open.get_or_create(&SinkLabels { pipeline: "p".into(), sink: "s".into() }).get(),
            0,
            "a breaker that goes away is not counted open"
        );
    }

    #[tokio::test]
    async fn zero_consecutive_failures_never_opens() {
        let (mut b, _) = breaker(0);
        for _ in 0..100 {
            b.failed("503");
        }
        assert_eq!(b.state(), State::Closed);
    }
}
