//! Handing a processed batch to every sink task.

use std::sync::Arc;

use flowgate_core::TraceParent;
use tokio::sync::{mpsc, oneshot};

use crate::event::PipelineEvent;
use crate::sink::SinkEvent;

/// What a worker sends its sink tasks.
pub(super) enum SinkMsg {
    /// A processed batch: its events, each one's sink mask, and the context of its
    /// `pipeline.read` span when the batch is traced.
    Events(Arc<Vec<SinkEvent>>, Arc<Vec<u64>>, Option<TraceParent>),
    Commit(oneshot::Sender<anyhow::Result<Committed>>),
}

/// What a sink task hands back at a commit: its sink's state and what its driver has
/// learned, both checkpointed.
pub(super) struct Committed {
    /// The sink's own state ([`crate::sink::Sink::commit`]).
    pub(super) state: serde_json::Value,
    /// The batch size the sink's controller has set now (moved by adaptive batching),
    /// so that a restart starts from it instead of from scratch.
    pub(super) batch_target: usize,
    /// The concurrency limit the sink's controller has learned (adaptive sinks only),
    /// for the same reason.
    pub(super) concurrency_limit: Option<u32>,
}

/// Hands `events` to every sink task, with the trace context their writes continue;
/// returns the batch as the sinks share it, so that its memory stays charged until they
/// have all let go of it.
pub(super) async fn fan_out(
    mut events: Vec<PipelineEvent>,
    sinks: &[mpsc::Sender<SinkMsg>],
    trace: Option<TraceParent>,
) -> anyhow::Result<std::sync::Weak<Vec<SinkEvent>>> {
    let masks: Vec<u64> = events.iter().map(|e| e.sinks).collect();
    let out: Vec<SinkEvent> = events
        .iter_mut()
        .map(|e| SinkEvent {
            partition: e.partition,
            offset: e.offset,
            timestamp: e.timestamp,
            key: e.key.clone(),
            payload: e.payload().clone(),
        })
        .collect();
    let (out, masks) = (Arc::new(out), Arc::new(masks));
    let shared = Arc::downgrade(&out);
    for tx in sinks {
        tx.send(SinkMsg::Events(out.clone(), masks.clone(), trace))
            .await
            .map_err(|_| anyhow::anyhow!("a sink task stopped"))?;
    }
    Ok(shared)
}
