//! What the engine asks of a sink, and the batching in front of every sink.
//!
//! A sink receives batches of [`SinkEvent`]s. It may write them anywhere, but after
//! [`Sink::commit`] returns, everything written must be durable, and the state it returns
//! is checkpointed with the pipeline's offsets; after a crash [`Sink::recover`] gets that
//! state back (a file sink truncates its file to it, which makes it exactly-once).

use std::future::Future;
use std::pin::Pin;

use bytes::Bytes;

use crate::config::SinkConfig;

/// A boxed future, as sinks return.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// An event as a sink sees it. Its bytes live in storage of the batch being written
/// (copied there from the log read, so a queued event never pins a whole read buffer).
#[derive(Clone, Debug)]
pub struct SinkEvent {
    /// Source partition.
    pub partition: u32,
    /// Source offset (`u64::MAX` for events a processor made).
    pub offset: u64,
    /// Event time.
    pub timestamp: i64,
    /// Key, if any.
    pub key: Option<Bytes>,
    /// JSON payload.
    pub payload: Bytes,
}

/// A destination for a pipeline's events.
pub trait Sink: Send {
    /// Writes a batch.
    fn write<'a>(&'a mut self, events: &'a [SinkEvent]) -> BoxFuture<'a, anyhow::Result<()>>;

    /// Makes everything written durable and returns the state to checkpoint.
    fn commit(&mut self) -> BoxFuture<'_, anyhow::Result<serde_json::Value>>;

    /// Restores the checkpointed state at start (`Null` when there is none).
    fn recover<'a>(&'a mut self, state: &'a serde_json::Value) -> BoxFuture<'a, anyhow::Result<()>>;
}

/// Where a sink instance runs: one instance per sink per source partition.
#[derive(Clone, Debug)]
pub struct SinkPlace {
    /// Pipeline name.
    pub pipeline: String,
    /// Source topic.
    pub topic: String,
    /// Source partition.
    pub partition: u32,
}

/// Builds sinks from their config. Implemented by `flowgate-connectors`: the engine
/// names the sink types in its config ([`crate::config::SinkKind`]) but holds no sink's
/// code; it writes only through this trait.
pub trait SinkFactory: Send + Sync {
    /// Checks a sink config without building it.
    fn validate(&self, config: &SinkConfig) -> anyhow::Result<()>;

    /// What the sink writes to exclusively, as a string that is equal for two configs
    /// exactly when they would write the same output (e.g. `file:/abs/dir`); `None`
    /// when sinks may share their output (topics, stdout). Validation refuses two sinks,
    /// in any pipelines, with the same claim: they would cut or overwrite each other's
    /// output on recovery.
    fn output_claim(&self, _config: &SinkConfig) -> Option<String> {
        None
    }

    /// Builds the sink instance for one place.
    fn build(&self, config: &SinkConfig, place: &SinkPlace) -> anyhow::Result<Box<dyn Sink>>;
}
