//! The controller of one sink: how many writes are in flight, how big a batch is, and
//! the circuit breaker — one per (pipeline, sink), shared by the sink's instances (one
//! per source partition, each writing one batch at a time, in order).
//!
//! Every write asks the controller first ([`SinkController::acquire`]) and reports its
//! latency and outcome after ([`Permit::finish`]). From that:
//! - **Concurrency** (unless `concurrency.limit` fixes it) moves like TCP congestion
//!   control, on windows of at least one write latency and as many writes as the limit: after a window in which the
//!   target pushed back (a write failed, or events came back retryable), or whose mean
//!   latency rose above the floor by more than `latency_tolerance`, the limit falls by
//!   10%; after a window whose latency stayed near the floor and in which a write had to
//!   wait for the limit, it rises by one. The floor is the lowest window latency seen,
//!   except at a limit of 1, where the latency is the target's own and becomes the
//!   floor: a target that became slower for good drives the limit down to 1, which
//!   learns its new floor. A restart starts from the limit the last checkpoint holds.
//! - **Batch size** (with `batch.adaptive`) grows by a quarter while writes are faster
//!   than `batch.target_latency_ms`, and shrinks by a quarter when slower.
//! - **The breaker** ([`super::breaker`]) holds every write back while it is open, and
//!   lets one probe through when half-open.
//! - **Memory pressure** ([`SinkController::set_memory_pressure`]) makes both the limit
//!   and the batch size fall at each window, however fast the target is.
//!
//! Without a fixed limit, a sink that writes to another system (`http`, `tcp`) is
//! adaptive and a local one (`file`, `topic`, ...) unlimited (as many writes in flight
//! as instances), unless `concurrency.adaptive` says otherwise.
//!
//! The controller is asked once per write, never per event. What it decides is in
//! `/v1/stats` (`sink_controllers`) and in the metrics `flowgate_sink_concurrency_limit`,
//! `flowgate_sink_in_flight`, `flowgate_sink_latency_seconds`,
//! `flowgate_sink_latency_floor_seconds` and `flowgate_sink_batch_target_events`.

#[cfg(test)]
use std::sync::atomic::AtomicU64;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use prometheus_client::metrics::gauge::Gauge;
use serde::Serialize;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
// Tokio's clock, which tests can pause and advance.
use tokio::time::Instant;

use super::breaker::{Admit, Breaker, State as BreakerState};
use crate::config::{BatchPolicy, BreakerPolicy, ConcurrencyPolicy};
use crate::metrics::{PipelineMetrics, SinkLabels};

/// What the limit is multiplied by when it falls.
const DECREASE_RATIO: f64 = 0.9;

/// Weight of the newest window in the latency average.
const LATENCY_ALPHA: f64 = 0.4;

/// How a sink's writes in flight are limited.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Mode {
    /// At most this many.
    Fixed(u32),
    /// A limit learned from latency.
    Adaptive,
    /// No limit but the number of instances.
    Unlimited,
}

impl Mode {
    /// The mode a sink's policy asks for; `adaptive` is the policy's own, or the sink
    /// type's default.
    pub(super) fn of(policy: &ConcurrencyPolicy, adaptive: bool) -> Mode {
        match (policy.limit, adaptive) {
            (Some(limit), _) => Mode::Fixed(limit.max(1)),
            (None, true) => Mode::Adaptive,
            (None, false) => Mode::Unlimited,
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            Mode::Fixed(_) => "fixed",
            Mode::Adaptive => "adaptive",
            Mode::Unlimited => "unlimited",
        }
    }
}

/// What a write's outcome tells the controller.
#[derive(Clone, Copy, Debug)]
pub(super) enum Outcome<'a> {
    /// The target answered for some event (delivered, or refused for good);
    /// `pushback` when it also sent some back as retryable or asked to wait; `full` when
    /// the batch was a full one (flushed for its size), whose latency is comparable
    /// with other full ones.
    Answered { pushback: bool, full: bool },
    /// The write failed as a whole, or every event came back retryable.
    Failed { why: &'a str },
}

/// Writes finished since the window started.
#[derive(Debug)]
struct Window {
    start: Instant,
    /// Sum and count of latencies (seconds) of answered writes.
    latency_sum: f64,
    answered: u32,
    pushback: bool,
    /// A write waited for the limit (the limit, not the target, held throughput back).
    limited: bool,
}

impl Window {
    fn new(now: Instant) -> Window {
        Window { start: now, latency_sum: 0.0, answered: 0, pushback: false, limited: false }
    }
}

struct Inner {
    breaker: Breaker,
    limit: u32,
    /// Slots to take out of use as writes end, the limit having fallen below the slots
    /// in use.
    excess: u32,
    in_flight: u32,
    /// A half-open breaker's probe is in flight.
    probing: bool,
    window: Window,
    /// Average window latency (seconds).
    latency: Option<f64>,
    /// The lowest window latency seen (seconds).
    floor: Option<f64>,
    /// When the limit last moved: only writes granted since tell what the limit is worth.
    limit_moved_at: Instant,
    /// Whether the limit and batch target were learned in this process or taken from a
    /// checkpoint (later checkpoints of other partitions then do not move them).
    resumed: bool,
}

/// One sink's controller. Cheap to share: a write locks it a few times (before and
/// after), for well under a microsecond each.
pub(super) struct SinkController {
    labels: SinkLabels,
    mode: Mode,
    policy: ConcurrencyPolicy,
    batch: BatchPolicy,
    inner: Mutex<Inner>,
    changed: Notify,
    /// One slot per write allowed in flight: a fair queue of writes waiting for the limit.
    slots: Arc<Semaphore>,
    batch_target: AtomicUsize,
    memory_pressure: AtomicBool,
    limit_gauge: Gauge,
    in_flight_gauge: Gauge,
    batch_target_gauge: Gauge,
    latency_gauge: Gauge<f64, std::sync::atomic::AtomicU64>,
    floor_gauge: Gauge<f64, std::sync::atomic::AtomicU64>,
}

/// What `/v1/stats` shows of a sink's controller.
#[derive(Clone, Debug, Serialize)]
pub struct ControllerStatus {
    /// Pipeline name.
    pub pipeline: String,
    /// Sink name.
    pub sink: String,
    /// Writes allowed in flight at once (`None`: unlimited).
    pub concurrency_limit: Option<u32>,
    /// `adaptive`, `fixed` or `unlimited`.
    pub concurrency: &'static str,
    /// The lowest the limit may go (`None`: unlimited): 1 when adaptive, the limit when
    /// fixed.
    pub concurrency_min: Option<u32>,
    /// The highest the limit may go (`None`: unlimited): `concurrency.max` when
    /// adaptive, the limit when fixed.
    pub concurrency_max: Option<u32>,
    /// Writes in flight now.
    pub in_flight: u32,
    /// Events per batch the sink's instances flush at.
    pub batch_target: usize,
    /// Whether the batch size moves toward `batch_target_latency_ms`.
    pub batch_adaptive: bool,
    /// The lowest batch size (`batch.min_events` when adaptive, else `batch.max_events`).
    pub batch_min: usize,
    /// The highest batch size (`batch.max_events`).
    pub batch_max: usize,
    /// The write latency adaptive batching aims for (ms; `None` when not adaptive).
    pub batch_target_latency_ms: Option<u64>,
    /// A batch is flushed when its oldest event has waited this long (ms).
    pub batch_max_wait_ms: u64,
    /// Average write latency of recent windows (ms).
    pub latency_ms: Option<f64>,
    /// The lowest recent window latency (ms).
    pub latency_floor_ms: Option<f64>,
    /// `closed`, `half_open` or `open`.
    pub breaker: &'static str,
    /// When the breaker entered that state (ms since the epoch).
    pub breaker_since_ms: i64,
    /// Whether memory pressure is holding the limit and batch size down.
    pub memory_pressure: bool,
}

/// Leave to make one write; give it back with [`Permit::finish`] (dropping it counts as
/// a write that told nothing).
pub(super) struct Permit {
    controller: Arc<SinkController>,
    probe: bool,
    slot: Option<OwnedSemaphorePermit>,
    started: Instant,
    finished: bool,
}

impl SinkController {
    /// A controller for `labels`'s sink, starting from its configured initial limit.
    pub(super) fn new(
        labels: SinkLabels,
        mode: Mode,
        concurrency: ConcurrencyPolicy,
        batch: BatchPolicy,
        breaker: BreakerPolicy,
        metrics: &PipelineMetrics,
    ) -> SinkController {
        let now = Instant::now();
        let limit = match mode {
            Mode::Fixed(limit) => limit,
            Mode::Adaptive => concurrency.initial.clamp(1, concurrency.max.max(1)),
            Mode::Unlimited => Semaphore::MAX_PERMITS.try_into().unwrap_or(u32::MAX),
        };
        let target = if batch.adaptive {
            (batch.max_events / 4).max(batch.min_events).min(batch.max_events).max(1)
        } else {
            batch.max_events.max(1)
        };
        let controller = SinkController {
            limit_gauge: metrics.sink_concurrency_limit.get_or_create(&labels).clone(),
            in_flight_gauge: metrics.sink_in_flight.get_or_create(&labels).clone(),
            batch_target_gauge: metrics.sink_batch_target.get_or_create(&labels).clone(),
            latency_gauge: metrics.sink_latency_seconds.get_or_create(&labels).clone(),
            floor_gauge: metrics.sink_latency_floor_seconds.get_or_create(&labels).clone(),
            inner: Mutex::new(Inner {
                breaker: Breaker::new(breaker, labels.clone(), metrics),
                limit,
                excess: 0,
                in_flight: 0,
                probing: false,
                window: Window::new(now),
                latency: None,
                floor: None,
                limit_moved_at: now,
                resumed: false,
            }),
            labels,
            mode,
            policy: concurrency,
            batch,
            changed: Notify::new(),
            slots: Arc::new(Semaphore::new(limit as usize)),
            batch_target: AtomicUsize::new(target),
            memory_pressure: AtomicBool::new(false),
        };
        controller.limit_gauge.set(i64::from(limit));
        controller.batch_target_gauge.set(i64::try_from(target).unwrap_or(i64::MAX));
        controller
    }

    fn adaptive(&self) -> bool {
        self.mode == Mode::Adaptive
    }

    /// Starts from what a checkpoint learned, unless this process has learned (or
    /// resumed) already: the first of a sink's instances to start sets it.
    pub(super) fn resume(&self, limit: Option<u32>, batch_target: Option<usize>) {
        let mut inner = self.inner.lock();
        if inner.resumed {
            return;
        }
        // An instance with nothing learned (a partition that never checkpointed) leaves
        // it to the next one.
        if let (true, Some(limit)) = (self.adaptive(), limit) {
            inner.resumed = true;
            self.move_limit(&mut inner, limit.clamp(1, self.policy.max.max(1)));
        }
        if let (true, Some(target)) = (self.batch.adaptive, batch_target) {
            inner.resumed = true;
            self.set_batch_target(clamp_target(target, &self.batch));
        }
    }

    /// Events per batch to flush at now.
    pub(super) fn batch_target(&self) -> usize {
        self.batch_target.load(Ordering::Relaxed)
    }

    /// The concurrency limit now.
    #[cfg(test)]
    fn limit(&self) -> u32 {
        self.inner.lock().limit
    }

    /// The limit to checkpoint: what an adaptive controller has learned.
    pub(super) fn learned_limit(&self) -> Option<u32> {
        self.adaptive().then(|| self.inner.lock().limit)
    }

    fn set_batch_target(&self, target: usize) {
        self.batch_target.store(target, Ordering::Relaxed);
        self.batch_target_gauge.set(i64::try_from(target).unwrap_or(i64::MAX));
    }

    /// Memory is short (or no longer): while it is, the limit and the batch size fall
    /// at every window instead of growing.
    pub fn set_memory_pressure(&self, on: bool) {
        self.memory_pressure.store(on, Ordering::Relaxed);
    }

    /// Whether the breaker is open now (a failed write then waits for its probe rather
    /// than backing off).
    pub(super) fn breaker_open(&self) -> bool {
        self.inner.lock().breaker.state() == BreakerState::Open
    }

    /// The breaker's state name and since when.
    pub(super) fn breaker_shown(&self) -> (&'static str, i64) {
        self.inner.lock().breaker.shown()
    }

    /// The target asked to be left alone for `hint`: an open breaker stays open that long.
    pub(super) fn hold_for(&self, hint: Duration) {
        self.inner.lock().breaker.hold_for(hint);
    }

    /// Waits until a write may be made: the breaker is closed (or this write is its
    /// probe) and fewer writes than the limit are in flight. Writes waiting for the
    /// limit get through first come, first served, so no instance starves.
    pub(super) async fn acquire(self: &Arc<Self>) -> Permit {
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            // Registered before the state is read, so a release in between wakes it.
            changed.as_mut().enable();
            let gate = {
                let mut inner = self.inner.lock();
                match inner.breaker.admit(Instant::now()) {
                    Admit::WaitUntil(t) => Err(Some(t)),
                    Admit::Probe if inner.probing => Err(None),
                    Admit::Probe => {
                        inner.probing = true;
                        Ok(ProbeGuard { controller: Some(self.clone()) })
                    }
                    Admit::Go => Ok(ProbeGuard { controller: None }),
                }
            };
            let probe = match gate {
                Ok(probe) => probe,
                Err(Some(until)) => {
                    tokio::select! {
                        _ = tokio::time::sleep_until(until) => {}
                        _ = &mut changed => {}
                    }
                    continue;
                }
                Err(None) => {
                    changed.await;
                    continue;
                }
            };
            let slot = if self.mode == Mode::Unlimited {
                None
            } else {
                if self.slots.available_permits() == 0 {
                    self.inner.lock().window.limited = true;
                }
                Some(self.slots.clone().acquire_owned().await.expect("the slots are never closed"))
            };
            let mut inner = self.inner.lock();
            if probe.controller.is_none() && inner.breaker.state() != BreakerState::Closed {
                // The breaker opened while this write waited for a slot.
                if let Some(slot) = slot {
                    give_back(&mut inner, slot);
                }
                continue;
            }
            inner.in_flight = inner.in_flight.saturating_add(1);
            self.in_flight_gauge.set(i64::from(inner.in_flight));
            return Permit {
                controller: self.clone(),
                probe: probe.defuse(),
                slot,
                started: Instant::now(),
                finished: false,
            };
        }
    }

    /// Moves the limit to `limit`, handing out or taking back slots.
    fn move_limit(&self, inner: &mut Inner, limit: u32) {
        let before = inner.limit;
        if limit > before {
            let mut up = limit - before;
            let cancelled = up.min(inner.excess);
            inner.excess -= cancelled;
            up -= cancelled;
            self.slots.add_permits(up as usize);
        } else {
            let down = before - limit;
            let mut taken = 0;
            while taken < down {
                match self.slots.try_acquire() {
                    Ok(slot) => slot.forget(),
                    Err(_) => break,
                }
                taken += 1;
            }
            // Slots in use now are taken back as their writes end.
            inner.excess = inner.excess.saturating_add(down - taken);
        }
        inner.limit = limit;
        self.limit_gauge.set(i64::from(limit));
    }

    fn release(&self, probe: bool, slot: Option<OwnedSemaphorePermit>, started: Instant, outcome: Option<Outcome<'_>>) {
        let took = started.elapsed();
        let mut inner = self.inner.lock();
        if let Some(slot) = slot {
            give_back(&mut inner, slot);
        }
        inner.in_flight = inner.in_flight.saturating_sub(1);
        if probe {
            inner.probing = false;
        }
        self.in_flight_gauge.set(i64::from(inner.in_flight));
        match outcome {
            Some(Outcome::Answered { pushback, full }) => {
                inner.breaker.delivered();
                let took = took.as_secs_f64();
                // A write granted before the limit last moved says nothing of the new
                // limit, and a small batch (flushed by time or for a checkpoint) nothing
                // of the latency of full ones.
                if started >= inner.limit_moved_at && full {
                    inner.window.latency_sum += took;
                    inner.window.answered = inner.window.answered.saturating_add(1);
                }
                inner.window.pushback |= pushback;
                if !pushback && self.batch.adaptive && !self.memory_pressure.load(Ordering::Relaxed) {
                    let before = self.batch_target();
                    let next = adapt(before, Duration::from_secs_f64(took), &self.batch);
                    if next != before {
                        self.set_batch_target(next);
                        // Latency follows the batch size: the floor is learned anew for it.
                        inner.floor = None;
                    }
                }
            }
            Some(Outcome::Failed { why }) => {
                inner.breaker.failed(why);
                inner.window.pushback = true;
            }
            None => {}
        }
        let now = Instant::now();
        let span = Duration::from_secs_f64(inner.latency.unwrap_or(0.0)).max(Duration::from_millis(1));
        // A window holds a round of writes at the current limit: ending it at the first
        // one back would judge the limit by its fastest writes, which waited least.
        let round = if self.mode == Mode::Unlimited { 1 } else { inner.limit };
        let full = inner.window.answered >= round
            || inner.window.pushback
            || (inner.window.answered > 0 && self.memory_pressure.load(Ordering::Relaxed));
        if now.duration_since(inner.window.start) >= span && full {
            self.end_window(&mut inner, now);
        }
        drop(inner);
        self.changed.notify_waiters();
    }

    /// Moves the limit (and, under memory pressure, the batch size) on what the window saw.
    fn end_window(&self, inner: &mut Inner, now: Instant) {
        let window = std::mem::replace(&mut inner.window, Window::new(now));
        let mean = (window.answered > 0).then(|| window.latency_sum / f64::from(window.answered));
        if let Some(mean) = mean {
            // At one write in flight the latency is the target's own, not a queue this
            // sink made: a target that became slower for good moves the floor up here.
            let floor = match inner.floor {
                Some(f) if inner.limit > 1 => f.min(mean),
                _ => mean,
            };
            inner.floor = Some(floor);
            inner.latency = Some(inner.latency.map_or(mean, |l| l + LATENCY_ALPHA * (mean - l)));
            self.latency_gauge.set(inner.latency.unwrap_or(mean));
            self.floor_gauge.set(floor);
        }
        let pressure = self.memory_pressure.load(Ordering::Relaxed);
        if pressure && self.batch.adaptive {
            let target = self.batch_target();
            self.set_batch_target(clamp_target(target - target / 4, &self.batch));
        }
        if !self.adaptive() {
            return;
        }
        let slow = match (mean, inner.floor) {
            (Some(mean), Some(floor)) => mean > floor * (1.0 + self.policy.latency_tolerance.max(0.0)),
            _ => false,
        };
        let before = inner.limit;
        let next = if window.pushback || slow || pressure {
            ((f64::from(before) * DECREASE_RATIO) as u32).max(1)
        } else if window.limited && mean.is_some() {
            before.saturating_add(1).min(self.policy.max.max(1))
        } else {
            before
        };
        if next != before {
            inner.limit_moved_at = now;
            self.move_limit(inner, next);
        }
    }

    /// What `/v1/stats` shows.
    pub(super) fn status(&self) -> ControllerStatus {
        let inner = self.inner.lock();
        let (breaker, breaker_since_ms) = inner.breaker.shown();
        ControllerStatus {
            pipeline: self.labels.pipeline.clone(),
            sink: self.labels.sink.clone(),
            concurrency_limit: (self.mode != Mode::Unlimited).then_some(inner.limit),
            concurrency: self.mode.as_str(),
            concurrency_min: match self.mode {
                Mode::Unlimited => None,
                Mode::Fixed(n) => Some(n),
                Mode::Adaptive => Some(1),
            },
            concurrency_max: match self.mode {
                Mode::Unlimited => None,
                Mode::Fixed(n) => Some(n),
                Mode::Adaptive => Some(self.policy.max),
            },
            in_flight: inner.in_flight,
            batch_target: self.batch_target(),
            batch_adaptive: self.batch.adaptive,
            batch_min: if self.batch.adaptive { self.batch.min_events } else { self.batch.max_events },
            batch_max: self.batch.max_events,
            batch_target_latency_ms: self.batch.adaptive.then_some(self.batch.target_latency_ms),
            batch_max_wait_ms: self.batch.max_wait_ms,
            latency_ms: inner.latency.map(|s| s * 1000.0),
            latency_floor_ms: inner.floor.map(|s| s * 1000.0),
            breaker,
            breaker_since_ms,
            memory_pressure: self.memory_pressure.load(Ordering::Relaxed),
        }
    }
}

impl Permit {
    /// Reports the write's outcome; its latency is measured from the grant.
    pub(super) fn finish(mut self, outcome: Outcome<'_>) -> Duration {
        self.finished = true;
        let took = self.started.elapsed();
        self.controller.release(self.probe, self.slot.take(), self.started, Some(outcome));
        took
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        if !self.finished {
            self.controller.release(self.probe, self.slot.take(), self.started, None);
        }
    }
}

/// A half-open breaker's probe between its admission and its write: if the write is
/// never made (its task was dropped while it waited for a slot), the next write probes.
struct ProbeGuard {
    controller: Option<Arc<SinkController>>,
}

impl ProbeGuard {
    /// Whether this is a probe; from now on its [`Permit`] ends it.
    fn defuse(mut self) -> bool {
        self.controller.take().is_some()
    }
}

impl Drop for ProbeGuard {
    fn drop(&mut self) {
        if let Some(c) = self.controller.take() {
            c.inner.lock().probing = false;
            c.changed.notify_waiters();
        }
    }
}

/// Returns a slot, or takes it out of use while the limit is above its new value.
fn give_back(inner: &mut Inner, slot: OwnedSemaphorePermit) {
    if inner.excess > 0 {
        inner.excess -= 1;
        slot.forget();
    }
}

/// `target` within the policy's bounds (`min` then `max`, not `clamp`: a config with
/// min above max must not panic here).
fn clamp_target(target: usize, policy: &BatchPolicy) -> usize {
    target.min(policy.max_events.max(1)).max(policy.min_events.max(1).min(policy.max_events.max(1)))
}

/// The next batch size target: grow by a quarter while writes are faster than the
/// target latency, shrink by a quarter when slower, within [min_events, max_events].
pub(super) fn adapt(current: usize, took: Duration, policy: &BatchPolicy) -> usize {
    let target = Duration::from_millis(policy.target_latency_ms.max(1));
    let next = if took < target.saturating_mul(8) / 10 {
        current.saturating_add(current / 4).saturating_add(1)
    } else if took > target {
        current - current / 4
    } else {
        current
    };
    clamp_target(next, policy)
}

/// Controllers by (pipeline, sink) name.
type ByName = std::collections::BTreeMap<(String, String), Arc<SinkController>>;

/// The controllers of every pipeline's sinks, by pipeline and sink name.
#[derive(Clone, Default)]
pub struct SinkControllers {
    inner: Arc<Mutex<ByName>>,
}

impl std::fmt::Debug for SinkControllers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SinkControllers").field("sinks", &self.inner.lock().len()).finish()
    }
}

impl SinkControllers {
    pub(super) fn insert(&self, controller: SinkController) {
        let key = (controller.labels.pipeline.clone(), controller.labels.sink.clone());
        self.inner.lock().insert(key, Arc::new(controller));
    }

    /// Forgets the controllers of a pipeline that stopped for good.
    pub(super) fn remove_pipeline(&self, pipeline: &str) {
        self.inner.lock().retain(|(p, _), _| p != pipeline);
    }

    pub(super) fn get(&self, pipeline: &str, sink: &str) -> Option<Arc<SinkController>> {
        self.inner.lock().get(&(pipeline.to_owned(), sink.to_owned())).cloned()
    }

    /// Every controller's status, by pipeline and sink.
    pub fn all(&self) -> Vec<ControllerStatus> {
        self.inner.lock().values().map(|c| c.status()).collect()
    }

    /// Sets memory pressure on every sink (see [`SinkController::set_memory_pressure`]).
    pub fn set_memory_pressure(&self, on: bool) {
        for c in self.inner.lock().values() {
            c.set_memory_pressure(on);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn controller(concurrency: ConcurrencyPolicy, batch: BatchPolicy) -> Arc<SinkController> {
        let metrics = PipelineMetrics::new();
        let labels = SinkLabels { pipeline: "p".into(), sink: "s".into() };
        let mode = Mode::of(&concurrency, true);
        Arc::new(SinkController::new(labels, mode, concurrency, batch, BreakerPolicy::default(), &metrics))
    }

    /// `writers` instances writing as fast as they can for `secs` (of tokio's paused
    /// clock) to a target with `workers` workers, each taking `service` per request
    /// (more requests wait in its queue). Returns the writes done in the last half and
    /// the limit sampled every 100 ms of the last half, and the most writes in flight.
    async fn drive(
        c: &Arc<SinkController>,
        writers: usize,
        workers: usize,
        service: Duration,
        secs: u64,
    ) -> (u64, Vec<u32>, u64) {
        let (now, most) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let target = Arc::new(tokio::sync::Semaphore::new(workers));
        let done = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let stop = Instant::now() + Duration::from_secs(secs);
        let mut tasks = Vec::new();
        for _ in 0..writers {
            let (c, target, done) = (c.clone(), target.clone(), done.clone());
            let (now, most) = (now.clone(), most.clone());
            tasks.push(tokio::spawn(async move {
                while Instant::now() < stop {
                    let permit = c.acquire().await;
                    most.fetch_max(now.fetch_add(1, Ordering::SeqCst) + 1, Ordering::SeqCst);
                    let worker = target.acquire().await.unwrap();
                    tokio::time::sleep(service).await;
                    drop(worker);
                    now.fetch_sub(1, Ordering::SeqCst);
                    permit.finish(Outcome::Answered { pushback: false, full: true });
                    done.fetch_add(1, Ordering::Relaxed);
                }
            }));
        }
        tokio::time::sleep(Duration::from_secs(secs / 2)).await;
        let before = done.load(Ordering::Relaxed);
        let mut limits = Vec::new();
        while Instant::now() < stop {
            limits.push(c.limit());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        for t in tasks {
            t.await.unwrap();
        }
        (done.load(Ordering::Relaxed) - before, limits, most.load(Ordering::SeqCst))
    }

    #[tokio::test(start_paused = true)]
    async fn the_limit_settles_near_the_targets_knee_and_keeps_its_throughput() {
        let c = controller(ConcurrencyPolicy::default(), BatchPolicy::default());
        // 4 workers of 20 ms: 200 writes/s at most, reached from 4 in flight on; more
        // in flight only queue.
        let (writes, limits, _) = drive(&c, 16, 4, Duration::from_millis(20), 120).await;
        // With 30% latency tolerance it may go to 5 (25 ms) and overshoots by one or two
        // before a window shows the queue; 16 writers without a limit would make 80 ms.
        let near = limits.iter().filter(|l| (3..=7).contains(*l)).count();
        assert!(near * 10 >= limits.len() * 9, "the limit stays near the knee of 4: {limits:?}");
        let mean = limits.iter().map(|l| f64::from(*l)).sum::<f64>() / limits.len() as f64;
        assert!(mean < 6.0, "on average close to it: {mean}");
        assert!(writes >= 60 * 200 * 9 / 10, "at least 90% of the target's capacity: {writes} writes in 60 s");
        let latency = c.status().latency_ms.unwrap();
        assert!(latency < 20.0 * 1.6, "without a long queue at the target: {latency} ms");
    }

    #[tokio::test(start_paused = true)]
    async fn a_fixed_limit_is_never_exceeded_nor_moved() {
        let c =
            controller(ConcurrencyPolicy { limit: Some(3), ..ConcurrencyPolicy::default() }, BatchPolicy::default());
        let (_, limits, most) = drive(&c, 8, 1, Duration::from_millis(5), 4).await;
        assert!(limits.iter().all(|l| *l == 3), "{limits:?}");
        assert_eq!(most, 3, "8 writers, at most 3 writes in flight");
        let mut held = Vec::new();
        for _ in 0..3 {
            held.push(c.acquire().await);
        }
        let fourth = tokio::time::timeout(Duration::from_secs(1), c.acquire()).await;
        assert!(fourth.is_err(), "a fourth write waits");
        drop(held.pop());
        let fourth = tokio::time::timeout(Duration::from_secs(1), c.acquire()).await;
        assert!(fourth.is_ok(), "until one is given back");
    }

    #[tokio::test(start_paused = true)]
    async fn a_limit_that_falls_while_writes_are_in_flight_takes_their_slots_back() {
        let c = controller(ConcurrencyPolicy::default(), BatchPolicy::default());
        c.resume(Some(20), None);
        let mut held = acquire_n(&c, 20).await;
        let blocked = |c: &Arc<SinkController>| {
            let c = c.clone();
            async move { tokio::time::timeout(Duration::from_secs(1), c.acquire()).await.is_err() }
        };
        // A pushback moves the limit from 20 to 18 while 19 writes are still in flight.
        tokio::time::advance(Duration::from_millis(5)).await;
        held.pop().unwrap().finish(Outcome::Answered { pushback: true, full: true });
        assert_eq!(c.limit(), 18);
        assert!(blocked(&c).await, "19 in flight, 18 allowed");
        drop(held.pop());
        assert!(blocked(&c).await, "18 in flight: the slot given back was taken out of use");
        drop(held.pop());
        let one = tokio::time::timeout(Duration::from_secs(1), c.acquire()).await.expect("17 in flight: one more");
        assert!(blocked(&c).await);
        drop(one);
        drop(held);
        let all = acquire_n(&c, 18).await;
        assert!(blocked(&c).await, "with nothing else in flight, exactly the limit is free again");
        drop(all);
    }

    async fn acquire_n(c: &Arc<SinkController>, n: usize) -> Vec<Permit> {
        let mut out = Vec::new();
        for _ in 0..n {
            out.push(tokio::time::timeout(Duration::from_secs(1), c.acquire()).await.expect("a free slot"));
        }
        out
    }

    #[tokio::test(start_paused = true)]
    async fn an_unlimited_sink_lets_every_instance_write_at_once() {
        let metrics = PipelineMetrics::new();
        let labels = SinkLabels { pipeline: "p".into(), sink: "s".into() };
        let policy = ConcurrencyPolicy::default();
        let c = Arc::new(SinkController::new(
            labels,
            Mode::of(&policy, false),
            policy,
            BatchPolicy::default(),
            BreakerPolicy::default(),
            &metrics,
        ));
        let held = acquire_n(&c, 100).await;
        assert_eq!(c.status().in_flight, 100);
        assert_eq!((c.status().concurrency, c.status().concurrency_limit), ("unlimited", None));
        drop(held);
    }

    #[tokio::test(start_paused = true)]
    async fn a_restart_resumes_from_the_learned_limit_and_batch_target() {
        let batch = BatchPolicy { adaptive: true, min_events: 10, max_events: 1000, ..BatchPolicy::default() };
        let c = controller(ConcurrencyPolicy::default(), batch.clone());
        assert_eq!((c.limit(), c.batch_target()), (1, 250));
        c.resume(Some(12), Some(700));
        assert_eq!((c.limit(), c.batch_target()), (12, 700));
        c.resume(Some(3), Some(20));
        assert_eq!((c.limit(), c.batch_target()), (12, 700), "the first instance to start sets it");
        let c = controller(ConcurrencyPolicy { max: 8, ..ConcurrencyPolicy::default() }, batch);
        c.resume(Some(u32::MAX), Some(usize::MAX));
        assert_eq!((c.limit(), c.batch_target()), (8, 1000), "within today's bounds");
    }

    #[tokio::test(start_paused = true)]
    async fn pushback_and_memory_pressure_lower_the_limit_and_batch_size() {
        let batch = BatchPolicy { adaptive: true, min_events: 10, max_events: 1000, ..BatchPolicy::default() };
        let c = controller(ConcurrencyPolicy::default(), batch);
        c.resume(Some(20), Some(1000));
        for _ in 0..5 {
            let p = c.acquire().await;
            tokio::time::sleep(Duration::from_millis(5)).await;
            p.finish(Outcome::Answered { pushback: true, full: true });
        }
        let after_pushback = c.limit();
        assert!(after_pushback < 20, "{after_pushback}");
        c.set_memory_pressure(true);
        for _ in 0..5 {
            let p = c.acquire().await;
            tokio::time::sleep(Duration::from_millis(5)).await;
            p.finish(Outcome::Answered { pushback: false, full: true });
        }
        assert!(c.limit() < after_pushback, "pressure lowers it further");
        assert!(c.batch_target() < 1000, "and the batch size: {}", c.batch_target());
        assert!(c.status().memory_pressure);
    }

    #[tokio::test(start_paused = true)]
    async fn an_open_breaker_holds_every_instance_back_and_lets_one_probe_through() {
        let metrics = PipelineMetrics::new();
        let labels = SinkLabels { pipeline: "p".into(), sink: "s".into() };
        let breaker =
            BreakerPolicy { consecutive_failures: 2, open_ms: 1000, max_open_ms: 1000, ..BreakerPolicy::default() };
        let c = Arc::new(SinkController::new(
            labels,
            Mode::Fixed(8),
            ConcurrencyPolicy { limit: Some(8), ..ConcurrencyPolicy::default() },
            BatchPolicy::default(),
            breaker,
            &metrics,
        ));
        for _ in 0..2 {
            c.acquire().await.finish(Outcome::Failed { why: "connection refused" });
        }
        assert!(c.breaker_open());
        let opened = Instant::now();
        let probe = c.acquire().await;
        assert!(opened.elapsed() >= Duration::from_millis(999), "no write while open");
        let second = tokio::time::timeout(Duration::from_secs(5), c.acquire()).await;
        assert!(second.is_err(), "one probe at a time");
        probe.finish(Outcome::Answered { pushback: false, full: true });
        assert_eq!(c.status().breaker, "closed");
        let (a, b) = (c.acquire().await, c.acquire().await);
        assert_eq!(c.status().in_flight, 2, "closed again: writes go through side by side");
        drop((a, b));
        assert_eq!(c.status().in_flight, 0, "a dropped permit is given back");
    }

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
}
