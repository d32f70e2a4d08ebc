//! The flusher: one background thread per log that turns appends into durable appends.
//!
//! Under `fsync = "always"`, an appender that needs durability queues its partition
//! here and waits; the thread takes everything queued, fsyncs each partition once, and
//! wakes every waiter whose records are now covered. Appends that arrive during an fsync
//! queue up for the next one, so N concurrent appenders share one fsync (group commit)
//! and the fsync rate adapts to the disk, not to the request rate.
//!
//! Under `fsync = "interval"`, the same thread fsyncs every partition with unsynced
//! appends once per `fsync_interval_ms`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use parking_lot::{Condvar, Mutex};

use crate::partition::Partition;

/// Receives fsync timings, for metrics.
pub type FsyncHook = Arc<dyn Fn(std::time::Duration) + Send + Sync>;

/// Queue and wake-up of the flusher thread.
pub struct Flusher {
    pending: Mutex<Vec<Arc<Partition>>>,
    wake: Condvar,
    stop: AtomicBool,
    on_fsync: Mutex<Option<FsyncHook>>,
}

impl std::fmt::Debug for Flusher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Flusher").field("pending", &self.pending.lock().len()).finish()
    }
}

impl Flusher {
    pub(crate) fn new() -> Arc<Flusher> {
        Arc::new(Flusher {
            pending: Mutex::new(Vec::new()),
            wake: Condvar::new(),
            stop: AtomicBool::new(false),
            on_fsync: Mutex::new(None),
        })
    }

    /// Sets the hook that receives each fsync's duration.
    pub fn set_fsync_hook(&self, hook: FsyncHook) {
        *self.on_fsync.lock() = Some(hook);
    }

    /// Asks for `partition` to be fsynced soon.
    pub fn request(&self, partition: Arc<Partition>) {
        let mut pending = self.pending.lock();
        if !pending.iter().any(|p| Arc::ptr_eq(p, &partition)) {
            pending.push(partition);
        }
        drop(pending);
        self.wake.notify_one();
    }

    pub(crate) fn stop(&self) {
        self.stop.store(true, Ordering::Release);
        self.wake.notify_all();
    }

    pub(crate) fn sync_one(&self, partition: &Partition) {
        let started = Instant::now();
        match partition.sync() {
            Ok(()) => {
                if let Some(hook) = self.on_fsync.lock().clone() {
                    hook(started.elapsed());
                }
            }
            // The partition fenced itself and logged the failure.
            Err(e) => tracing::debug!(error = %e, "background fsync failed"),
        }
    }

    /// The thread body. `all_partitions` lists every partition for interval syncs;
    /// `interval` is `None` when only requested syncs happen.
    pub(crate) fn run(
        self: Arc<Self>,
        interval: Option<std::time::Duration>,
        all_partitions: impl Fn() -> Vec<Arc<Partition>>,
    ) {
        let mut next_tick = interval.map(|i| Instant::now() + i);
        loop {
            let batch = {
                let mut pending = self.pending.lock();
                while pending.is_empty() && !self.stop.load(Ordering::Acquire) {
                    match next_tick {
                        Some(t) => {
                            if self.wake.wait_until(&mut pending, t).timed_out() {
                                break;
                            }
                        }
                        None => self.wake.wait(&mut pending),
                    }
                }
                std::mem::take(&mut *pending)
            };
            for partition in &batch {
                self.sync_one(partition);
            }
            if let (Some(t), Some(i)) = (next_tick, interval) {
                if Instant::now() >= t {
                    for partition in all_partitions() {
                        self.sync_one(&partition);
                    }
                    next_tick = Some(Instant::now() + i);
                }
            }
            if self.stop.load(Ordering::Acquire) && self.pending.lock().is_empty() {
                return;
            }
        }
    }
}
