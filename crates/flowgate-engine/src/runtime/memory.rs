//! A worker's share of the memory budget (`docs/memory.md`).
//!
//! A worker charges, once per batch:
//! - each log read, from the read until every sink has let go of the batch made from it
//!   (the events a sink queues are slices of the read buffer and keep it alive), plus
//!   the events handed to the sinks;
//! - its processors' state, as they estimate it ([`crate::processors::Processor::state_bytes`]);
//! - for each sink, a fixed reservation of `batch.max_bytes`: what the sink's pending
//!   batch may hold.
//!
//! At the limit a `block` pipeline stops reading its log (the log is the buffer) and
//! only lets time pass through its processors, so windows close and give back state. If
//! nothing is freed for [`STALL_AFTER`] — the state of the pipelines alone fills the
//! budget and needs more events to close — waiting would deadlock: the worker logs an
//! error, counts a stall, and reads on, with its processors' own bounds
//! (`max_open_windows`, `max_groups`, dedup `max_entries`) as the limit of its state,
//! until the pressure falls below the limit. A `drop_newest` pipeline reads on and has
//! its processors drop events that would create state.

use std::collections::VecDeque;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use flowgate_memory::{Charge, Component, Level, MemoryGovernor};
use prometheus_client::metrics::counter::Counter;

use crate::config::{PipelineConfig, PipelineMemoryPolicy};
use crate::metrics::{PipelineLabels, PipelineMetrics};
use crate::processors::Processor;
use crate::sink::SinkEvent;

/// How long a blocked worker waits with nothing freed before it reads on.
pub(super) const STALL_AFTER: Duration = Duration::from_secs(10);

/// How often a blocked worker lets time pass through its processors.
pub(super) const TICK_WHILE_BLOCKED: Duration = Duration::from_millis(100);

/// Decoded events cost this much each beside their bytes in the read buffer (the event,
/// its lazily parsed document's share).
const EVENT_OVERHEAD: usize = 256;

/// What a worker holds against the budget.
pub(super) struct WorkerMemory {
    governor: MemoryGovernor,
    policy: PipelineMemoryPolicy,
    _sink_batches: Charge,
    state: Charge,
    /// Batches handed to the sinks, charged until every sink has let go of them.
    handed: VecDeque<(Weak<Vec<SinkEvent>>, Charge)>,
    shedding: bool,
    /// Read on at the limit after a stall, until the pressure falls below it.
    stalled: bool,
    waits: Counter,
    stalls: Counter,
}

impl WorkerMemory {
    pub(super) fn new(governor: MemoryGovernor, config: &PipelineConfig, metrics: &PipelineMetrics) -> WorkerMemory {
        let reserved = config.sinks.iter().fold(0u64, |sum, s| sum.saturating_add(s.batch.max_bytes as u64));
        let labels = PipelineLabels { pipeline: config.name.clone() };
        WorkerMemory {
            _sink_batches: governor.charge(Component::SinkBatches, reserved),
            state: governor.empty(Component::ProcessorState),
            handed: VecDeque::new(),
            policy: config.memory_policy,
            shedding: false,
            stalled: false,
            waits: metrics.memory_waits.get_or_create(&labels).clone(),
            stalls: metrics.memory_stalls.get_or_create(&labels).clone(),
            governor,
        }
    }

    pub(super) fn level(&self) -> Level {
        self.governor.level()
    }

    pub(super) fn governor(&self) -> &MemoryGovernor {
        &self.governor
    }

    /// How much to read at once: `read.max_bytes`, or an eighth of it (at least 64 KiB)
    /// under pressure, so that one read past the limit adds little state.
    pub(super) fn read_bytes(&self, max_bytes: usize) -> usize {
        if self.level() == Level::Normal {
            max_bytes
        } else {
            (max_bytes / 8).max(64 << 10).min(max_bytes)
        }
    }

    /// Charges a log read of `bytes` holding `events` events.
    pub(super) fn charge_read(&self, bytes: usize, events: usize) -> Charge {
        let total = bytes.saturating_add(events.saturating_mul(EVENT_OVERHEAD));
        self.governor.charge(Component::PipelineReads, total as u64)
    }

    /// Keeps `charge` (grown by the batch's own bytes) until every sink has dropped
    /// `batch`.
    pub(super) fn handed(&mut self, batch: Weak<Vec<SinkEvent>>, bytes: usize, charge: Option<Charge>) {
        let mut charge = charge.unwrap_or_else(|| self.governor.empty(Component::PipelineReads));
        charge.grow(bytes as u64);
        self.handed.push_back((batch, charge));
    }

    /// Gives back what sinks have let go of.
    pub(super) fn release_delivered(&mut self) {
        self.handed.retain(|(batch, _)| batch.strong_count() > 0);
    }

    /// Charges the processors' state as they estimate it now.
    pub(super) fn set_state(&mut self, processors: &[Box<dyn Processor>]) {
        let bytes = processors.iter().fold(0u64, |sum, p| sum.saturating_add(p.state_bytes() as u64));
        self.state.set(bytes);
    }

    /// What to do before the next read: `true` to wait (a `block` pipeline at the limit
    /// that has not stalled). Switches shedding for a `drop_newest` pipeline.
    pub(super) fn must_wait(&mut self, processors: &mut [Box<dyn Processor>]) -> bool {
        let hard = self.level() == Level::Hard;
        if !hard {
            self.stalled = false;
        }
        match self.policy {
            PipelineMemoryPolicy::Block => hard && !self.stalled,
            PipelineMemoryPolicy::DropNewest => {
                if hard != self.shedding {
                    self.shedding = hard;
                    for p in processors.iter_mut() {
                        p.shed_new_state(hard);
                    }
                }
                false
            }
        }
    }

    /// Counts the start of a wait.
    pub(super) fn waiting(&self) {
        self.waits.inc();
    }

    /// Tells whether a wait that last saw usage fall at `progress_at` has stalled; if so, logs it, counts it, and reads on from now.
    pub(super) fn check_stall(&mut self, pipeline: &str, progress_at: Instant) -> bool {
        if progress_at.elapsed() < STALL_AFTER {
            return false;
        }
        self.stalls.inc();
        self.stalled = true;
        tracing::error!(
            pipeline,
            used = self.governor.used(),
            limit = self.governor.limit(),
            state = self.state.held(),
            waited_s = STALL_AFTER.as_secs(),
            "the memory budget is used up and waiting freed nothing: the pipelines' state alone fills it. Reading on, \
             bounded by the processors' own limits (max_open_windows, max_groups, max_entries); lower those or raise \
             server.memory_limit_bytes"
        );
        true
    }
}

/// Bytes a batch handed to the sinks holds beside `read`, the log read it came from
/// (charged already): keys and payloads that slice `read` (events that passed through
/// unchanged) cost nothing more; those a processor made are counted.
pub(super) fn handed_bytes(events: &Arc<Vec<SinkEvent>>, read: Option<&[u8]>) -> usize {
    let read = read.map_or(0..0, |r| {
        let start = r.as_ptr() as usize;
        start..start.saturating_add(r.len())
    });
    let own = |b: &[u8]| {
        let start = b.as_ptr() as usize;
        if b.is_empty() || (read.start <= start && start.saturating_add(b.len()) <= read.end) {
            0
        } else {
            b.len()
        }
    };
    events.iter().fold(events.len().saturating_mul(std::mem::size_of::<SinkEvent>()), |sum, e| {
        sum.saturating_add(own(&e.payload)).saturating_add(e.key.as_deref().map_or(0, own))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_that_slice_the_read_are_not_charged_twice() {
        let read = bytes::Bytes::from_static(b"....{\"a\":1}....");
        let event = |payload: bytes::Bytes, key: Option<bytes::Bytes>| SinkEvent {
            partition: 0,
            offset: 0,
            timestamp: 0,
            key,
            payload,
        };
        let passed = Arc::new(vec![event(read.slice(4..11), Some(read.slice(0..4)))]);
        let overhead = std::mem::size_of::<SinkEvent>();
        assert_eq!(handed_bytes(&passed, Some(&read)), overhead, "slices of the read are charged with it");
        assert_eq!(handed_bytes(&passed, None), overhead + 7 + 4);
        let made = Arc::new(vec![event(bytes::Bytes::from(b"{\"made\":true}".to_vec()), None)]);
        assert_eq!(handed_bytes(&made, Some(&read)), overhead + 13, "a processor's own payload is charged");
    }

    #[test]
    fn handed_batches_are_charged_until_every_sink_lets_go() {
        let memory = MemoryGovernor::new(1 << 30, 80);
        let config: PipelineConfig = serde_json::from_value(serde_json::json!({
            "name": "p", "topics": ["t"],
            "sinks": [{"name": "s", "type": "blackhole", "batch": {"max_bytes": 1000}}]
        }))
        .unwrap();
        let metrics = PipelineMetrics::new();
        let mut worker = WorkerMemory::new(memory.clone(), &config, &metrics);
        assert_eq!(memory.component(Component::SinkBatches), 1000, "the sink's batch is reserved");
        let read = worker.charge_read(5000, 10);
        assert_eq!(memory.component(Component::PipelineReads), 5000 + 10 * EVENT_OVERHEAD as u64);
        let batch = Arc::new(vec![SinkEvent {
            partition: 0,
            offset: 0,
            timestamp: 0,
            key: None,
            payload: bytes::Bytes::from_static(b"{}"),
        }]);
        let bytes = handed_bytes(&batch, None);
        worker.handed(Arc::downgrade(&batch), bytes, Some(read));
        let queued = batch.clone();
        drop(batch);
        worker.release_delivered();
        assert!(memory.component(Component::PipelineReads) > 5000, "a sink still holds it");
        drop(queued);
        worker.release_delivered();
        assert_eq!(memory.component(Component::PipelineReads), 0);
        drop(worker);
        assert_eq!(memory.used(), 0);
    }
}
