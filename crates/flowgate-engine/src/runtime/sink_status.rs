//! What each sink task is doing, for `/v1/stats`: its circuit breaker and since when, its
//! batch target, the events it is retrying now, and its last error. Sink tasks update it
//! once per write, never per event.

use std::collections::BTreeMap;
use std::sync::Arc;

use parking_lot::Mutex;
use serde::Serialize;

/// One sink instance (per source partition) as `/v1/stats` shows it.
#[derive(Clone, Debug, Serialize)]
pub struct SinkStatus {
    /// Pipeline name.
    pub pipeline: String,
    /// Sink name.
    pub sink: String,
    /// Source topic.
    pub topic: String,
    /// Source partition.
    pub partition: u32,
    /// `closed`, `half_open` or `open`.
    pub breaker: &'static str,
    /// When the breaker entered that state (ms since the epoch).
    pub breaker_since_ms: i64,
    /// Events per batch the sink flushes at now (moves with adaptive batching).
    pub batch_target: usize,
    /// Events of the current batch not delivered yet and being retried.
    pub retrying_events: usize,
    /// The last write error, if the last write left events undelivered.
    pub last_error: Option<String>,
}

impl SinkStatus {
    /// A sink instance that has written nothing yet: breaker closed, nothing retried.
    pub(super) fn starting(
        labels: &crate::metrics::SinkLabels,
        topic: &str,
        partition: u32,
        batch_target: usize,
    ) -> Self {
        SinkStatus {
            pipeline: labels.pipeline.clone(),
            sink: labels.sink.clone(),
            topic: topic.to_owned(),
            partition,
            breaker: "closed",
            breaker_since_ms: flowgate_core::time::now_ms(),
            batch_target,
            retrying_events: 0,
            last_error: None,
        }
    }
}

type Key = (String, String, u32, String);

/// Every sink's status; cheap to clone.
#[derive(Clone, Debug, Default)]
pub struct SinkStatuses {
    inner: Arc<Mutex<BTreeMap<Key, SinkStatus>>>,
}

impl SinkStatuses {
    /// Every sink's status, by pipeline, topic, partition and sink.
    pub fn all(&self) -> Vec<SinkStatus> {
        self.inner.lock().values().cloned().collect()
    }

    /// Forgets the sinks of a pipeline that stopped for good.
    pub(super) fn remove_pipeline(&self, pipeline: &str) {
        self.inner.lock().retain(|(p, ..), _| p != pipeline);
    }

    /// Records (or replaces) a sink's status.
    pub(super) fn set(&self, status: &SinkStatus) {
        let key = (status.pipeline.clone(), status.topic.clone(), status.partition, status.sink.clone());
        self.inner.lock().insert(key, status.clone());
    }
}
