//! The circuit breaker of one sink, shared by its instances (one per source partition)
//! through the sink's controller.
//!
//! Closed: writes go through. A write "fails" when it failed as a whole or came back with
//! every event retryable. After `consecutive_failures` failed writes in a row, or when
//! the last 20 writes failed at a rate of at least `failure_rate_percent` (below 100; raised for a
//! sink whose writes normally fail often: twice its long-run failure rate plus 10
//! points, at most 95%), it opens: no writes at all for `open_ms` (the sink's queues
//! fill, its pipeline stops reading, and the log holds the backlog). Then it is
//! half-open: one write probes the target; if the target answers for any event
//! (delivered, or refused for good) the breaker closes, else it opens again for twice as
//! long, up to `max_open_ms`, and never shorter than a target's Retry-After. Every
//! transition is logged and counted (`flowgate_sink_breaker_transitions_total{to}`);
//! `flowgate_sink_breakers_open` is 1 while a sink's breaker is open.

use std::time::Duration;

use tokio::time::Instant;

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

/// What a breaker allows now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Admit {
    /// Writes go through.
    Go,
    /// One probe write (half-open); the caller lets no other write through meanwhile.
    Probe,
    /// Open: no write until then.
    WaitUntil(Instant),
}

/// How many recent writes the failure rate is taken over.
const RATE_WINDOW: usize = 20;

/// How fast the sink's normal failure rate follows its writes: slowly, so that a burst of
/// failures trips the breaker before it is taken for normal.
const BASELINE_ALPHA: f64 = 0.01;

/// One sink's breaker (shared by its instances, one per source partition, through the
/// sink's controller).
pub(super) struct Breaker {
    policy: BreakerPolicy,
    state: State,
    failures_in_a_row: u32,
    /// The last [`RATE_WINDOW`] writes, true for a failed one.
    recent: std::collections::VecDeque<bool>,
    /// The sink's normal failure rate: an average over many writes.
    baseline: f64,
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
            recent: std::collections::VecDeque::with_capacity(RATE_WINDOW),
            baseline: 0.0,
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

    /// The failure rate of recent writes that opens the breaker: the configured one, or
    /// more for a sink whose writes normally fail often (twice its normal rate plus 10
    /// points, at most 95%), so that a sink's usual noise does not keep tripping it.
    pub(super) fn rate_threshold(&self) -> f64 {
        let floor = f64::from(self.policy.failure_rate_percent.min(100)) / 100.0;
        (2.0 * self.baseline + 0.1).min(0.95).max(floor)
    }

    fn move_to(&mut self, to: State, why: &str) {
        if self.state == to {
            return;
        }
        let from = self.state;
        self.state = to;
        self.since_ms = flowgate_core::time::now_ms();
        // One gauge per sink: 1 while its breaker is open.
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

    /// Whether a write may be made at `now`. An opening that has run out turns the
    /// breaker half-open, and the write is its probe.
    pub(super) fn admit(&mut self, now: Instant) -> Admit {
        match self.state {
            State::Closed => Admit::Go,
            State::HalfOpen => Admit::Probe,
            State::Open if now >= self.open_until => {
                self.move_to(State::HalfOpen, "probe");
                Admit::Probe
            }
            State::Open => Admit::WaitUntil(self.open_until),
        }
    }

    /// The target asked to be left alone for `hint`: an opening lasts at least that long.
    pub(super) fn hold_for(&mut self, hint: Duration) {
        if self.state == State::Open {
            self.open_until = self.open_until.max(Instant::now() + hint);
        }
    }

    fn record(&mut self, failed: bool) {
        if self.recent.len() == RATE_WINDOW {
            self.recent.pop_front();
        }
        self.recent.push_back(failed);
        self.baseline += BASELINE_ALPHA * (f64::from(u8::from(failed)) - self.baseline);
    }

    /// The target answered for some event of a write (delivered or refused for good).
    pub(super) fn delivered(&mut self) {
        self.record(false);
        self.failures_in_a_row = 0;
        self.open_for = Duration::from_millis(self.policy.open_ms.max(1));
        self.move_to(State::Closed, "delivered");
    }

    /// A write failed as a whole or every event of it came back retryable; `why` says how.
    pub(super) fn failed(&mut self, why: &str) {
        self.record(true);
        self.failures_in_a_row = self.failures_in_a_row.saturating_add(1);
        let trip = match self.state {
            State::HalfOpen => true,
            State::Closed if self.policy.consecutive_failures == 0 => false,
            State::Closed => {
                let failing = self.recent.iter().filter(|f| **f).count();
                self.failures_in_a_row >= self.policy.consecutive_failures
                    || (self.policy.failure_rate_percent < 100
                        && self.recent.len() == RATE_WINDOW
                        && failing as f64 / RATE_WINDOW as f64 >= self.rate_threshold())
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
            // The window starts over after an opening, so one bad stretch trips it once.
            self.recent.clear();
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
        let policy = BreakerPolicy { consecutive_failures, open_ms: 20, max_open_ms: 50, ..BreakerPolicy::default() };
        let b = Breaker::new(policy, SinkLabels { pipeline: "p".into(), sink: "s".into() }, &metrics);
        (b, metrics)
    }

    fn transitions(metrics: &PipelineMetrics, to: &str) -> u64 {
        metrics
            .sink_breaker_transitions
            .get_or_create(&BreakerLabels { pipeline: "p".into(), sink: "s".into(), to: to.into() })
            .get()
    }

    /// How long the open breaker holds writes back from now.
    fn held_for(b: &mut Breaker) -> Duration {
        let now = Instant::now();
        match b.admit(now) {
            Admit::WaitUntil(t) => t - now,
            other => panic!("expected an open breaker, found {other:?}"),
        }
    }

    #[test]
    fn opens_after_failures_in_a_row_probes_after_a_while_and_closes_on_delivery() {
        let (mut b, metrics) = breaker(3);
        b.failed("503");
        b.delivered();
        b.failed("503");
        b.failed("503");
        assert_eq!(b.state(), State::Closed, "a delivery in between starts the count over");
        b.failed("503");
        assert_eq!(b.state(), State::Open);
        assert!(held_for(&mut b) > Duration::from_millis(15), "no write while open");
        assert_eq!(b.admit(Instant::now() + Duration::from_millis(25)), Admit::Probe);
        assert_eq!(b.state(), State::HalfOpen);
        assert_eq!(b.admit(Instant::now()), Admit::Probe, "half-open until the probe says how it went");
        b.failed("503");
        assert_eq!(b.state(), State::Open, "a failed probe opens it again");
        assert!(held_for(&mut b) > Duration::from_millis(35), "twice as long the second time");
        b.admit(Instant::now() + Duration::from_secs(1));
        b.failed("503");
        assert!(held_for(&mut b) <= Duration::from_millis(50), "within max_open_ms");
        b.hold_for(Duration::from_secs(2));
        assert!(held_for(&mut b) > Duration::from_millis(1900), "never shorter than the target asked");
        b.admit(Instant::now() + Duration::from_secs(3));
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

    #[test]
    fn zero_consecutive_failures_never_opens() {
        let (mut b, _) = breaker(0);
        for _ in 0..100 {
            b.failed("503");
        }
        assert_eq!(b.state(), State::Closed);
    }

    #[test]
    fn a_high_failure_rate_opens_it_without_failures_in_a_row() {
        let (mut b, _) = breaker(3);
        // Every other write fails: never three in a row, but half of the last 20.
        for i in 0..=RATE_WINDOW {
            if i % 2 == 0 {
                b.failed("503");
            } else {
                b.delivered();
            }
        }
        assert_eq!(b.state(), State::Open, "50% of the window failed");
    }

    #[test]
    fn a_sink_that_normally_fails_often_needs_more_to_trip() {
        let (mut b, _) = breaker(1000);
        // A long stretch at 40% failures: the normal rate of this sink.
        for i in 0..2000 {
            if i % 5 < 2 {
                b.failed("503");
            } else {
                b.delivered();
            }
        }
        assert_eq!(b.state(), State::Closed);
        let threshold = b.rate_threshold();
        assert!(threshold > 0.8, "the threshold rose above twice the normal rate: {threshold}");
        // Then 60% for one window: above the configured 50%, below this sink's threshold.
        for i in 0..RATE_WINDOW {
            if i % 5 < 3 {
                b.failed("503");
            } else {
                b.delivered();
            }
        }
        assert_eq!(b.state(), State::Closed, "its usual noise, a little worse, does not trip it");
        for _ in 0..RATE_WINDOW {
            b.failed("503");
        }
        assert_eq!(b.state(), State::Open, "a real outage still does");
    }
}
