//! Processors: one module each. A processor takes a batch of events and returns the
//! events that go on; events it cannot handle go to the dead-letter topic with the error,
//! and the batch goes on.

mod aggregate;
mod dedup;
mod filter;
mod numeric;
mod remap;
mod route;
pub mod sketch;

use crate::config::ProcessorConfig;
use crate::event::PipelineEvent;

pub use aggregate::Aggregate;
pub use dedup::Dedup;
pub use filter::Filter;
pub use numeric::Numeric;
pub use remap::Remap;
pub use route::Route;

/// An event a processor could not handle, and why.
#[derive(Debug)]
pub struct DeadLetter {
    /// Which processor failed (`<index>:<type>`).
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
}

/// One processing step.
pub trait Processor: Send {
    /// The processor type, for metrics and errors.
    fn kind(&self) -> &'static str;

    /// Processes a batch, returning the events that continue.
    fn process(&mut self, events: Vec<PipelineEvent>, out: &mut Outputs) -> Vec<PipelineEvent>;

    /// Called when time passes without data (wall clock ms); may emit events (windows).
    fn tick(&mut self, _now_ms: i64, _out: &mut Outputs) -> Vec<PipelineEvent> {
        Vec::new()
    }

    /// State to checkpoint with the pipeline's offsets (empty: none).
    fn snapshot(&self) -> Vec<u8> {
        Vec::new()
    }

    /// Restores checkpointed state (empty: none was saved).
    fn restore(&mut self, _state: &[u8]) -> anyhow::Result<()> {
        Ok(())
    }
}

/// Builds the processors of a pipeline. `sink_names` resolves route targets. Errors name
/// the processor by position and type.
pub fn build(configs: &[ProcessorConfig], sink_names: &[String]) -> anyhow::Result<Vec<Box<dyn Processor>>> {
    configs
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let place = format!("processor {} ({})", i + 1, processor_type(c));
            let p: anyhow::Result<Box<dyn Processor>> = match c {
                ProcessorConfig::Filter { condition } => Filter::new(condition).map(|p| Box::new(p) as _),
                ProcessorConfig::Remap { source } => Remap::new(source).map(|p| Box::new(p) as _),
                ProcessorConfig::Dedup { by, ttl_ms, max_entries } => {
                    Ok(Box::new(Dedup::new(by, *ttl_ms, *max_entries)))
                }
                ProcessorConfig::Aggregate(a) => Aggregate::new(a).map(|p| Box::new(p) as _),
                ProcessorConfig::Numeric(n) => Numeric::new(n).map(|p| Box::new(p) as _),
                ProcessorConfig::Route { routes, default } => {
                    Route::new(routes, default, sink_names).map(|p| Box::new(p) as _)
                }
            };
            p.map_err(|e| anyhow::anyhow!("{place}: {e}"))
        })
        .collect()
}

/// The `type` of a processor config.
pub fn processor_type(c: &ProcessorConfig) -> &'static str {
    match c {
        ProcessorConfig::Filter { .. } => "filter",
        ProcessorConfig::Remap { .. } => "remap",
        ProcessorConfig::Dedup { .. } => "dedup",
        ProcessorConfig::Aggregate(_) => "aggregate",
        ProcessorConfig::Numeric(_) => "numeric",
        ProcessorConfig::Route { .. } => "route",
    }
}
