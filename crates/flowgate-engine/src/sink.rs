//! What the engine asks of a sink, and the batching in front of every sink.
//!
//! A sink receives batches of [`SinkEvent`]s and reports, per event, whether it was
//! delivered ([`WriteOutcome`]). It may write them anywhere, but after
//! [`Sink::commit`] returns, everything written must be durable, and the state it returns
//! is checkpointed with the pipeline's offsets; after a crash [`Sink::recover`] gets that
//! state back (a file sink truncates its file to it, which makes it exactly-once).

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

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

/// What became of the events of one write: every event not named in `failures` was
/// delivered.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WriteOutcome {
    /// Events not delivered, by their index in the batch written.
    pub failures: Vec<EventFailure>,
    /// How long the target asked to be left alone before the next attempt (an HTTP
    /// Retry-After, say), if it did.
    pub retry_after: Option<Duration>,
}

impl WriteOutcome {
    /// Every event delivered.
    pub fn delivered() -> WriteOutcome {
        WriteOutcome::default()
    }
}

/// One event a write did not deliver, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EventFailure {
    /// The event's index in the batch written.
    pub index: usize,
    /// Whether a later attempt may succeed (the target was busy or failed for now);
    /// `false` when the target refused the event for good (it goes to the dead-letter
    /// topic at once).
    pub retryable: bool,
    /// What went wrong, for the operator.
    pub reason: String,
    /// The target's own code for it (an HTTP status, an error name), if it has one.
    pub code: Option<String>,
}

/// A destination for a pipeline's events.
///
/// The engine's sink driver, below every sink, batches events, retries what a write did
/// not deliver (per [`crate::config::RetryPolicy`]) and sends what is refused for good or
/// runs out of retries to the dead-letter topic; a sink only says what became of each
/// event.
pub trait Sink: Send {
    /// Writes a batch. `Err` means that nothing can be said of any event (the target was
    /// unreachable, say): the driver retries the same batch, which a sink may resume
    /// where the failed attempt stopped. `Ok` names the events not delivered; the driver
    /// retries the retryable ones as a new, smaller batch.
    fn write<'a>(&'a mut self, events: &'a [SinkEvent]) -> BoxFuture<'a, anyhow::Result<WriteOutcome>>;

    /// Whether a batch whose write keeps failing as a whole may be given up once `retry`
    /// runs out (its events dead-lettered as `retries_exhausted`). By default not: a
    /// sink that may have stored part of a failed write and resumes it (a file, a topic,
    /// a tcp connection) must be retried until it can say. A sink that neither resumes
    /// nor promises more than at least once (http) says yes, so that a batch the target
    /// can never take (always timing out, say) does not hold its partition forever.
    fn may_give_up_failed_writes(&self) -> bool {
        false
    }

    /// Makes everything written durable and returns the state to checkpoint. By default
    /// nothing: for a sink whose writes are done when they return and that keeps no state.
    fn commit(&mut self) -> BoxFuture<'_, anyhow::Result<serde_json::Value>> {
        Box::pin(async { Ok(serde_json::Value::Null) })
    }

    /// Restores the checkpointed state at start (`Null` when there is none). By default
    /// nothing, for a sink that keeps no state.
    fn recover<'a>(&'a mut self, _state: &'a serde_json::Value) -> BoxFuture<'a, anyhow::Result<()>> {
        Box::pin(async { Ok(()) })
    }
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
/// neither names the sink types nor holds any sink's code ([`SinkConfig::kind`] and
/// [`SinkConfig::options`] are the connectors' to read); it writes only through this
/// trait.
pub trait SinkFactory: Send + Sync {
    /// Checks a sink config without building it: its type is known and its options
    /// are that type's, well formed.
    fn validate(&self, config: &SinkConfig) -> anyhow::Result<()>;

    /// What the sink writes to exclusively, as a string that is equal for two configs
    /// exactly when they would write the same output (e.g. `file:/abs/dir`); `None`
    /// when sinks may share their output (topics, stdout). Validation refuses two sinks,
    /// in any pipelines, with the same claim: they would cut or overwrite each other's
    /// output on recovery.
    fn output_claim(&self, _config: &SinkConfig) -> Option<String> {
        None
    }

    /// Whether the sink writes to another system, whose capacity its controller should
    /// learn (adaptive concurrency by default), rather than to local storage (no limit
    /// but the number of instances by default).
    fn remote(&self, _config: &SinkConfig) -> bool {
        false
    }

    /// Builds the sink instance for one place.
    fn build(&self, config: &SinkConfig, place: &SinkPlace) -> anyhow::Result<Box<dyn Sink>>;
}
