//! flowgate's pipelines: events flow from topics through processors to sinks, batch at
//! a time, in order per partition, without loss.
//!
//! - [`config`]: `[[pipelines]]` — topics, processors, sinks, batching.
//! - [`event`]: an event inside a pipeline and its lazily parsed JSON document.
//! - [`expr`]: VRL, the expression language of `filter`, `remap` and `route`.
//! - [`projection`]: parsing only the fields a pipeline reads.
//! - [`processors`]: filter, remap, dedup, aggregate (windows, watermarks, DDSketch),
//!   numeric (SIMD), route.
//! - [`sink`]: what a sink must do; the sinks' code lives in `flowgate-connectors`.
//! - [`checkpoint`]: committed offsets with processor and sink state.
//! - [`runtime`]: supervised workers per source partition, sink tasks with adaptive
//!   batching, aligned checkpoints, the dead-letter topic.
//! - [`metrics`]: per pipeline, processor and sink.
//! - [`trace`]: the spans of a batch through a pipeline, and their sampling.

#![warn(missing_docs)]

pub mod checkpoint;
pub mod config;
pub mod event;
pub mod expr;
pub mod metrics;
pub mod processors;
pub mod projection;
pub mod runtime;
pub mod sink;
pub mod trace;

pub use config::PipelineConfig;
pub use flowgate_memory::MemoryGovernor;
pub use metrics::PipelineMetrics;
pub use runtime::{
    validate, Changes, ControlError, ControlReport, PipelineHealth, Pipelines, ProcessorStateChoice, ResetTo,
    SinkStatus, WorkerState, WorkerStatus, DLQ_TOPIC,
};
pub use sink::{EventFailure, Sink, SinkEvent, SinkFactory, SinkPlace, WriteOutcome};
