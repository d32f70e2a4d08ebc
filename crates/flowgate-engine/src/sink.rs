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

/// An event as a sink sees it: bytes shared, not copied.
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

/// Builds sinks from their config. Implemented by `flowgate-connectors`, so the engine
/// knows no concrete sink.
pub trait SinkFactory: Send + Sync {
    /// Checks a sink config without building it.
    fn validate(&self, config: &SinkConfig) -> anyhow::Result<()>;

    /// Builds the sink instance for one place.
    fn build(&self, config: &SinkConfig, place: &SinkPlace) -> anyhow::Result<Box<dyn Sink>>;

    /// What the sink writes that no other sink may write too (for a file sink its
    /// directory), as a comparable string; `None` when sinks of its kind may share a
    /// destination. [`check_output_claims`] refuses two sinks with the same claim.
    fn output_claim(&self, _config: &SinkConfig) -> Option<String> {
        None
    }
}

/// Refuses two sinks, in one pipeline or in two, that claim the same output (two file
/// sinks on one directory would cut and overwrite each other's files on recovery).
pub fn check_output_claims(pipelines: &[crate::PipelineConfig], factory: &dyn SinkFactory) -> anyhow::Result<()> {
    let mut claimed: std::collections::HashMap<String, (&str, &str)> = std::collections::HashMap::new();
    for p in pipelines {
        for s in &p.sinks {
            let Some(claim) = factory.output_claim(s) else { continue };
            if let Some((other_pipeline, other_sink)) =
                claimed.insert(claim.clone(), (p.name.as_str(), s.name.as_str()))
            {
                anyhow::bail!(
                    "pipeline '{}': sink '{}' writes to {claim}, which sink '{other_sink}' of pipeline \
                     '{other_pipeline}' writes to already; give each sink its own path",
                    p.name,
                    s.name
                );
            }
        }
    }
    Ok(())
}
