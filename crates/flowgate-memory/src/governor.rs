//! The governor: one byte budget, charges against it, and the pressure level they make.
//!
//! A charge never fails and never waits: it records memory that is about to be held.
//! Whoever can hold back (a listener that need not read, a pipeline worker that need not
//! read its log) asks [`MemoryGovernor::level`] before it takes more, and waits with
//! [`MemoryGovernor::wait_until`]. Everything is atomics: hot paths charge once per
//! batch, never per event, and take no lock.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use tokio::sync::Notify;

/// How full the budget is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    /// Below the soft threshold.
    Normal,
    /// At or above the soft threshold: listeners stop reading sockets, sinks shrink
    /// their batches.
    Soft,
    /// At or above the limit: the configured policy applies (producers wait or are
    /// refused; pipelines stop reading their log or shed new state).
    Hard,
}

impl Level {
    /// 0, 1 or 2, as `flowgate_memory_pressure` shows it.
    pub fn as_number(self) -> i64 {
        match self {
            Level::Normal => 0,
            Level::Soft => 1,
            Level::Hard => 2,
        }
    }

    /// `normal`, `soft` or `hard`.
    pub fn as_str(self) -> &'static str {
        match self {
            Level::Normal => "normal",
            Level::Soft => "soft",
            Level::Hard => "hard",
        }
    }
}

/// What holds the memory a charge stands for; shown per component in the stats.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Component {
    /// Listener buffers beyond each connection's base buffer (`ingest.max_buffered_bytes`).
    Ingest,
    /// Pipeline log reads on their way through processors to the sink queues.
    PipelineReads,
    /// Window, group and dedup state of processors.
    ProcessorState,
    /// Batches sinks gather before a write (`batch.max_bytes` per sink task).
    SinkBatches,
}

impl Component {
    /// Every component, in the order the stats list them.
    pub const ALL: [Component; 4] =
        [Component::Ingest, Component::PipelineReads, Component::ProcessorState, Component::SinkBatches];

    fn index(self) -> usize {
        match self {
            Component::Ingest => 0,
            Component::PipelineReads => 1,
            Component::ProcessorState => 2,
            Component::SinkBatches => 3,
        }
    }

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Component::Ingest => "ingest",
            Component::PipelineReads => "pipeline_reads",
            Component::ProcessorState => "processor_state",
            Component::SinkBatches => "sink_batches",
        }
    }
}

struct Inner {
    limit: u64,
    soft: u64,
    used: AtomicU64,
    peak: AtomicU64,
    components: [AtomicU64; 4],
    /// Woken whenever usage crosses a threshold, either way.
    crossed: Notify,
}

/// The process's memory budget; cheap to clone (one `Arc`).
#[derive(Clone)]
pub struct MemoryGovernor {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for MemoryGovernor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryGovernor")
            .field("limit", &self.limit())
            .field("soft_limit", &self.soft_limit())
            .field("used", &self.used())
            .finish()
    }
}

/// A snapshot for `/v1/stats`.
#[derive(Clone, Debug, Serialize)]
pub struct MemoryStats {
    /// The budget (`server.memory_limit_bytes`, or the derived default).
    pub limit_bytes: u64,
    /// Where soft pressure starts.
    pub soft_limit_bytes: u64,
    /// Charged now.
    pub used_bytes: u64,
    /// The most ever charged at once.
    pub peak_bytes: u64,
    /// `used_bytes / limit_bytes`.
    pub pressure: f64,
    /// `normal`, `soft` or `hard`.
    pub level: Level,
    /// Charged now, by component.
    pub components: std::collections::BTreeMap<&'static str, u64>,
}

impl MemoryGovernor {
    /// A budget of `limit` bytes whose soft threshold is `soft_percent` of it (clamped
    /// to 1..=100).
    pub fn new(limit: u64, soft_percent: u8) -> MemoryGovernor {
        let limit = limit.max(1);
        let percent = u64::from(soft_percent.clamp(1, 100));
        // Divide first: no overflow whatever the limit, at the cost of < 100 bytes.
        let soft = (limit / 100).saturating_mul(percent).saturating_add(limit % 100 * percent / 100).max(1);
        MemoryGovernor {
            inner: Arc::new(Inner {
                limit,
                soft,
                used: AtomicU64::new(0),
                peak: AtomicU64::new(0),
                components: Default::default(),
                crossed: Notify::new(),
            }),
        }
    }

    /// A budget nothing reaches: for tests and tools that run pipelines without a
    /// server.
    pub fn unlimited() -> MemoryGovernor {
        MemoryGovernor::new(u64::MAX, 100)
    }

    /// The budget.
    pub fn limit(&self) -> u64 {
        self.inner.limit
    }

    /// Where soft pressure starts.
    pub fn soft_limit(&self) -> u64 {
        self.inner.soft
    }

    /// Bytes charged now.
    pub fn used(&self) -> u64 {
        self.inner.used.load(Ordering::Relaxed)
    }

    /// The most ever charged at once.
    pub fn peak(&self) -> u64 {
        self.inner.peak.load(Ordering::Relaxed)
    }

    /// Bytes charged now by one component.
    pub fn component(&self, component: Component) -> u64 {
        self.inner.components[component.index()].load(Ordering::Relaxed)
    }

    /// `used / limit` (may exceed 1: charges are never refused).
    pub fn pressure(&self) -> f64 {
        self.used() as f64 / self.limit() as f64
    }

    fn level_of(&self, used: u64) -> Level {
        if used >= self.inner.limit {
            Level::Hard
        } else if used >= self.inner.soft {
            Level::Soft
        } else {
            Level::Normal
        }
    }

    /// The pressure level now: one atomic load.
    pub fn level(&self) -> Level {
        self.level_of(self.used())
    }

    /// A charge of `bytes` for `component`, released when dropped.
    pub fn charge(&self, component: Component, bytes: u64) -> Charge {
        let mut charge = Charge { governor: self.clone(), component, held: 0 };
        charge.set(bytes);
        charge
    }

    /// An empty charge for `component`, to grow and shrink with [`Charge::set`].
    pub fn empty(&self, component: Component) -> Charge {
        Charge { governor: self.clone(), component, held: 0 }
    }

    fn add(&self, component: Component, bytes: u64) {
        if bytes == 0 {
            return;
        }
        let inner = &self.inner;
        let _ = inner.components[component.index()]
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| Some(v.saturating_add(bytes)));
        let before = inner
            .used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |v| Some(v.saturating_add(bytes)))
            .unwrap_or_else(|v| v);
        let after = before.saturating_add(bytes);
        inner.peak.fetch_max(after, Ordering::Relaxed);
        if self.level_of(before) != self.level_of(after) {
            inner.crossed.notify_waiters();
        }
    }

    fn sub(&self, component: Component, bytes: u64) {
        if bytes == 0 {
            return;
        }
        let inner = &self.inner;
        let _ = inner.components[component.index()]
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| Some(v.saturating_sub(bytes)));
        let before = inner
            .used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |v| Some(v.saturating_sub(bytes)))
            .unwrap_or_else(|v| v);
        if self.level_of(before) != self.level_of(before.saturating_sub(bytes)) {
            inner.crossed.notify_waiters();
        }
    }

    /// Waits until `ok(level)` holds; returns at once if it does. Wakes on every
    /// crossing of a threshold, and rechecks at least every `recheck` besides.
    pub async fn wait_until(&self, recheck: Duration, ok: impl Fn(Level) -> bool) {
        loop {
            let crossed = self.inner.crossed.notified();
            tokio::pin!(crossed);
            // Registered before the check, so a crossing between the two is not missed.
            crossed.as_mut().enable();
            if ok(self.level()) {
                return;
            }
            let _ = tokio::time::timeout(recheck, crossed).await;
        }
    }

    /// What `/v1/stats` shows.
    pub fn stats(&self) -> MemoryStats {
        let used = self.used();
        MemoryStats {
            limit_bytes: self.limit(),
            soft_limit_bytes: self.soft_limit(),
            used_bytes: used,
            peak_bytes: self.peak(),
            pressure: self.pressure(),
            level: self.level_of(used),
            components: Component::ALL.iter().map(|c| (c.as_str(), self.component(*c))).collect(),
        }
    }
}

/// Bytes held against the budget, given back when dropped (however the holder ends).
#[derive(Debug)]
pub struct Charge {
    governor: MemoryGovernor,
    component: Component,
    held: u64,
}

impl Charge {
    /// Bytes held.
    pub fn held(&self) -> u64 {
        self.held
    }

    /// Holds exactly `bytes` from now on (more or less than before).
    pub fn set(&mut self, bytes: u64) {
        if bytes > self.held {
            self.governor.add(self.component, bytes - self.held);
        } else {
            self.governor.sub(self.component, self.held - bytes);
        }
        self.held = bytes;
    }

    /// Holds `bytes` more.
    pub fn grow(&mut self, bytes: u64) {
        self.set(self.held.saturating_add(bytes));
    }

    /// The governor charged.
    pub fn governor(&self) -> &MemoryGovernor {
        &self.governor
    }
}

impl Drop for Charge {
    fn drop(&mut self) {
        self.governor.sub(self.component, self.held);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn charges_add_up_release_on_drop_and_keep_the_peak() {
        let g = MemoryGovernor::new(1000, 80);
        assert_eq!((g.limit(), g.soft_limit(), g.level()), (1000, 800, Level::Normal));
        let a = g.charge(Component::Ingest, 500);
        let mut b = g.charge(Component::ProcessorState, 200);
        assert_eq!((g.used(), g.level()), (700, Level::Normal));
        b.set(300);
        assert_eq!((g.used(), g.level()), (800, Level::Soft), "the soft threshold is inclusive");
        b.grow(200);
        assert_eq!((g.used(), g.level(), g.component(Component::ProcessorState)), (1000, Level::Hard, 500));
        drop(a);
        assert_eq!((g.used(), g.level(), g.peak()), (500, Level::Normal, 1000));
        b.set(10);
        drop(b);
        assert_eq!((g.used(), g.peak()), (0, 1000));
        let stats = g.stats();
        assert_eq!((stats.used_bytes, stats.peak_bytes, stats.level), (0, 1000, Level::Normal));
        assert_eq!(stats.components.values().sum::<u64>(), 0);
    }

    #[test]
    fn absurd_numbers_saturate_instead_of_wrapping() {
        let g = MemoryGovernor::new(u64::MAX, 100);
        assert_eq!(g.soft_limit(), u64::MAX);
        let a = g.charge(Component::Ingest, u64::MAX);
        let b = g.charge(Component::Ingest, u64::MAX);
        assert_eq!((g.used(), g.level()), (u64::MAX, Level::Hard));
        drop(a);
        assert_eq!(g.used(), 0, "saturated at the top, so the first release empties it");
        drop(b);
        assert_eq!((g.used(), g.component(Component::Ingest), g.peak()), (0, 0, u64::MAX));
        let tiny = MemoryGovernor::new(0, 0);
        assert_eq!((tiny.limit(), tiny.soft_limit()), (1, 1));
        let _c = tiny.charge(Component::SinkBatches, 1);
        assert_eq!(tiny.level(), Level::Hard);
        for (limit, percent) in [(u64::MAX, 80u8), (99, 80), (1 << 40, 255), (7, 1)] {
            let g = MemoryGovernor::new(limit, percent);
            assert!(g.soft_limit() <= g.limit() && g.soft_limit() >= 1, "{limit} {percent}");
        }
        assert_eq!(MemoryGovernor::new(1000, 255).soft_limit(), 1000, "percent clamps to 100");
    }

    #[tokio::test]
    async fn waiters_wake_when_usage_crosses_a_threshold() {
        let g = MemoryGovernor::new(100, 50);
        let mut held = g.charge(Component::PipelineReads, 100);
        let waiter = {
            let g = g.clone();
            tokio::spawn(async move { g.wait_until(Duration::from_secs(3600), |l| l == Level::Normal).await })
        };
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        held.set(60);
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished(), "still soft");
        held.set(10);
        tokio::time::timeout(Duration::from_secs(5), waiter).await.expect("woken by the crossing").unwrap();
        // Rising crossings wake too (a refusing listener waits for Hard).
        let up = {
            let g = g.clone();
            tokio::spawn(async move { g.wait_until(Duration::from_secs(3600), |l| l == Level::Hard).await })
        };
        tokio::task::yield_now().await;
        held.set(200);
        tokio::time::timeout(Duration::from_secs(5), up).await.expect("woken").unwrap();
    }
}
