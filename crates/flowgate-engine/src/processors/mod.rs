//! Processors: one module each. A processor takes a batch of events and returns the
//! events that go on; events it cannot handle go to the dead-letter topic with the error,
//! and the batch goes on.

mod aggregate;
mod dedup;
mod filter;
pub mod journal;
mod numeric;
mod remap;
mod route;
pub mod sketch;
pub mod state;
mod window_key;

use crate::config::{EventTimePolicy, PipelineConfig, ProcessorConfig, ProcessorKind};
use crate::event::PipelineEvent;
use crate::projection::{Projection, Reads};
use std::sync::Arc;

#[cfg(test)]
pub(crate) use dedup::tests::events as dedup_test_events;

pub use aggregate::Aggregate;
pub use dedup::Dedup;
pub use filter::Filter;
pub use numeric::Numeric;
pub use remap::Remap;
pub use route::Route;

/// An event a processor could not handle, and why.
#[derive(Debug)]
pub struct DeadLetter {
    /// The type of the processor that failed (the dead letter names its id).
    pub processor: String,
    /// What went wrong.
    pub error: String,
    /// The event as it was.
    pub event: PipelineEvent,
}

/// Where processors put what does not continue down the pipeline.
#[derive(Debug, Default)]
pub struct Outputs {
    /// Events that failed.
    pub dead_letters: Vec<DeadLetter>,
    /// Late events, with the side topic they go to (if any).
    pub late: Vec<(Option<String>, PipelineEvent)>,
    /// What hit a bound, for metrics ([`crate::PipelineMetrics::record_bounds`]).
    pub bounds: BoundCounts,
}

/// Events and state that hit a configured bound in one call. Events refused here are
/// also in [`Outputs::dead_letters`]; these counts say why.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct BoundCounts {
    /// Events whose event time was outside the pipeline's `event_time` bounds.
    pub event_time_out_of_bounds: u64,
    /// Events refused because they needed a new group or window of an aggregate at
    /// `max_groups` or `max_open_windows`.
    pub state_over_limit: u64,
    /// Quantile sketch buckets merged to stay within `sketch_max_buckets`.
    pub sketch_buckets_collapsed: u64,
    /// Events dropped instead of creating state while shedding at the memory limit
    /// ([`Processor::shed_new_state`]); not in the dead letters.
    pub memory_dropped: u64,
}

/// One processing step.
pub trait Processor: Send {
    /// The processor type, for metrics and errors.
    fn kind(&self) -> &'static str;

    /// Processes a batch, returning the events that continue.
    fn process(&mut self, events: Vec<PipelineEvent>, out: &mut Outputs) -> Vec<PipelineEvent>;

    /// Which fields of an event's document it reads ([`Reads::Everything`] unless it
    /// says): when every processor of a pipeline can say, events are parsed into just
    /// those fields ([`crate::projection`]). A processor that changes documents must
    /// answer `Everything`.
    fn reads(&self) -> Reads {
        Reads::Everything
    }

    /// Given, when every processor of the pipeline reads no more than it
    /// ([`crate::projection`]), the projection to parse events with: a processor that
    /// reads documents then reads them with [`PipelineEvent::doc_in`].
    fn project(&mut self, _projection: &Arc<Projection>) {}

    /// Whether the events it returns may be ones it made (window results) instead of
    /// its input: a panic further down is then not the source events' doing.
    fn makes_events(&self) -> bool {
        false
    }

    /// Called when time passes without data (wall clock ms); may emit events (windows).
    fn tick(&mut self, _now_ms: i64, _out: &mut Outputs) -> Vec<PipelineEvent> {
        Vec::new()
    }

    /// An estimate of the bytes its state holds, charged to the memory budget once per
    /// batch; must be cheap (no walk over the state).
    fn state_bytes(&self) -> usize {
        0
    }

    /// At the memory limit with `memory_policy = "drop_newest"`, `true` until the
    /// pressure falls: events that would create new state are dropped (counted in
    /// [`BoundCounts::memory_dropped`]) while events for existing state go on as usual.
    fn shed_new_state(&mut self, _on: bool) {}

    /// State to checkpoint with the pipeline's offsets (empty: none), whole.
    fn snapshot(&self) -> Vec<u8> {
        Vec::new()
    }

    /// Gives the processor a directory of its own beside its partition's checkpoint, for
    /// state too large to copy into every checkpoint. Called before
    /// [`Processor::restore`]; a processor that keeps nothing there ignores it.
    fn attach_state_dir(&mut self, _dir: std::path::PathBuf) {}

    /// The state for the checkpoint about to be stored: [`Processor::snapshot`], unless
    /// the processor keeps its state in its directory, in which case what is there is
    /// made durable now and the state names it. Files the previous checkpoint names
    /// must stay readable until [`Processor::checkpoint_stored`].
    fn checkpoint(&mut self) -> anyhow::Result<Vec<u8>> {
        Ok(self.snapshot())
    }

    /// Called once the checkpoint holding the last [`Processor::checkpoint`] is stored.
    fn checkpoint_stored(&mut self) {}

    /// Whether [`Processor::checkpoint`] writes files (blocking I/O), so the runtime
    /// moves its other tasks off the thread meanwhile; false for state kept in memory.
    fn checkpoint_writes_files(&self) -> bool {
        false
    }

    /// Restores checkpointed state (empty: none was saved). A processor that keeps no
    /// state refuses any: state under its id belongs to another processor, and dropping
    /// it silently would lose it.
    fn restore(&mut self, state: &[u8]) -> anyhow::Result<()> {
        anyhow::ensure!(
            state.is_empty(),
            "the checkpoint holds {} bytes of state in the place of this stateless processor: processor state is \
             matched by processor id (name, or type and ordinal), and this id now names another type",
            state.len()
        );
        Ok(())
    }
}

/// Builds the processors of a pipeline with its sinks' names (route targets) and its
/// event-time bounds. Errors name the processor by position and type, and the key.
pub fn build_pipeline(config: &PipelineConfig) -> anyhow::Result<Vec<Box<dyn Processor>>> {
    let sink_names: Vec<String> = config.sinks.iter().map(|s| s.name.clone()).collect();
    build_with(&config.processors, &config.event_time, &sink_names)
}

/// Builds processors with the default event-time bounds (see [`build_pipeline`], which
/// applies a pipeline's own `event_time`). `sink_names` resolves route targets.
pub fn build(configs: &[ProcessorConfig], sink_names: &[String]) -> anyhow::Result<Vec<Box<dyn Processor>>> {
    build_with(configs, &EventTimePolicy::default(), sink_names)
}

fn build_with(
    configs: &[ProcessorConfig],
    event_time: &EventTimePolicy,
    sink_names: &[String],
) -> anyhow::Result<Vec<Box<dyn Processor>>> {
    configs
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let place = match &c.name {
                Some(name) => format!("processor {} ('{name}', {})", i + 1, c.kind.type_name()),
                None => format!("processor {} ({})", i + 1, c.kind.type_name()),
            };
            let p: anyhow::Result<Box<dyn Processor>> = match &c.kind {
                ProcessorKind::Filter { condition } => Filter::new(condition).map(|p| Box::new(p) as _),
                ProcessorKind::Remap { source } => Remap::new(source).map(|p| Box::new(p) as _),
                ProcessorKind::Dedup { by, ttl_ms, max_entries } => {
                    Dedup::new(by, *ttl_ms, *max_entries, event_time).map(|p| Box::new(p) as _)
                }
                ProcessorKind::Aggregate(a) => Aggregate::new(a, event_time).map(|p| Box::new(p) as _),
                ProcessorKind::Numeric(n) => Numeric::new(n).map(|p| Box::new(p) as _),
                ProcessorKind::Route { routes, default } => {
                    Route::new(routes, default, sink_names).map(|p| Box::new(p) as _)
                }
            };
            p.map_err(|e| anyhow::anyhow!("{place}: {e}"))
        })
        .collect()
}

/// Most windows one event may fall in (hopping `size_ms / hop_ms`): past it, one event
/// would cost unbounded work and state.
pub const MAX_WINDOWS_PER_EVENT: u64 = 1000;

/// A duration key of the config as signed milliseconds, comparable with event times;
/// refuses one that no event time could be compared with, naming the key.
pub(crate) fn duration_ms(key: &str, ms: u64) -> anyhow::Result<i64> {
    i64::try_from(ms)
        .map_err(|_| anyhow::anyhow!("{key} is {ms}, more than the largest time flowgate represents ({} ms)", i64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_in_the_place_of_a_stateless_processor_is_refused_not_dropped() {
        let configs: Vec<ProcessorConfig> = serde_json::from_str(
            r#"[{"type": "filter", "condition": "true"}, {"type": "dedup", "by": "id", "ttl_ms": 1000}]"#,
        )
        .unwrap();
        let mut processors = build(&configs, &[]).unwrap();
        let mut dedup_state = processors[1].snapshot();
        if dedup_state.is_empty() {
            dedup_state = vec![0];
        }
        // `[filter, dedup]` checkpointed, then the config became `[dedup, filter]`.
        let err = processors[0].restore(&dedup_state).unwrap_err();
        assert!(err.to_string().contains("stateless processor"), "{err}");
        processors[0].restore(&[]).unwrap();
    }
}
