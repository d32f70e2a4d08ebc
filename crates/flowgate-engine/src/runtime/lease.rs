//! One worker per (pipeline, topic, partition) at a time, to its last write.
//!
//! A worker that is cut off (at a reload, or after a failure) is aborted, but an abort
//! is only a request: its sink tasks end at their next await, and a checkpoint write
//! handed to a blocking thread runs to its end. A worker takes its partition's lease
//! before it reads the checkpoint, and every task and blocking write of it holds a
//! clone; the lease is free again only when the last of them has ended, so the next
//! worker of the partition never writes beside the one before it.

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::Mutex;

/// Held, through clones, by everything a worker runs; free once every clone is dropped.
pub(crate) type Lease = Arc<tokio::sync::OwnedMutexGuard<()>>;

/// (pipeline, topic, partition).
type Place = (String, String, u32);

/// The leases of every (pipeline, topic, partition) that ever had a worker.
#[derive(Default)]
pub(crate) struct Leases {
    locks: Mutex<HashMap<Place, Arc<tokio::sync::Mutex<()>>>>,
}

impl Leases {
    /// Waits until no earlier worker of the partition holds its lease, then takes it.
    pub(crate) async fn acquire(&self, pipeline: &str, topic: &str, partition: u32) -> Lease {
        let lock = self.locks.lock().entry((pipeline.to_owned(), topic.to_owned(), partition)).or_default().clone();
        if let Ok(guard) = lock.clone().try_lock_owned() {
            return Arc::new(guard);
        }
        tracing::info!(pipeline, topic, partition, "waiting for the previous worker of this partition to end");
        Arc::new(lock.lock_owned().await)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_lease_is_free_only_once_every_clone_is_dropped() {
        let leases = Leases::default();
        let first = leases.acquire("p", "t", 0).await;
        let held_by_a_task = first.clone();
        drop(first);
        let other_partition = leases.acquire("p", "t", 1).await;
        let waiting = leases.acquire("p", "t", 0);
        tokio::pin!(waiting);
        assert!(tokio::time::timeout(std::time::Duration::from_millis(50), &mut waiting).await.is_err());
        drop(held_by_a_task);
        tokio::time::timeout(std::time::Duration::from_secs(5), waiting).await.expect("free once the last clone goes");
        drop(other_partition);
    }
}
