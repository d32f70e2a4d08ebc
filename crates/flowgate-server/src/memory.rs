//! The memory budget as the listeners see it (`docs/memory.md`): its limit at start, and
//! when a listener holds back.
//!
//! Under soft pressure a listener does not read its socket (the client's sends back up
//! in TCP); at the limit, with `memory_policy = "block"` it goes on not reading, and
//! with `"reject"` it reads and refuses produce requests with a retryable error, so a
//! producer hears why instead of waiting. A listener pauses only between frames, lines
//! or requests. One that holds borrowed buffer (a large frame under way) pauses only
//! while the listeners together hold less than half the soft threshold: their buffers
//! are part of the budget, and if they alone kept it under pressure, waiting on it would
//! wait on themselves.

use std::time::Duration;

use flowgate_memory::{Level, MemoryGovernor};

use crate::config::{IngestConfig, MemoryPolicy, ServerConfig};
use crate::metrics::IngestPath;
use crate::shared::Shared;

/// How often a paused listener looks again even without a threshold crossing.
const RECHECK: Duration = Duration::from_millis(100);

/// The budget for `server`: its `memory_limit_bytes`, or the derived default.
pub fn governor(server: &ServerConfig, ingest: &IngestConfig) -> MemoryGovernor {
    let (limit, source) = if server.memory_limit_bytes != 0 {
        (server.memory_limit_bytes, "server.memory_limit_bytes".to_owned())
    } else {
        match flowgate_memory::limit::available() {
            Some(a) => {
                (flowgate_memory::limit::default_limit(a.bytes), format!("half of {} bytes ({})", a.bytes, a.source))
            }
            None => {
                tracing::warn!(
                    "cannot read the cgroup memory limit nor /proc/meminfo; set server.memory_limit_bytes. Until then \
                     the memory budget is 1 GiB"
                );
                (1 << 30, "fallback".to_owned())
            }
        }
    };
    let limit = limit.max(crate::config::MIN_MEMORY_LIMIT_BYTES);
    if (ingest.max_buffered_bytes as u64) > limit {
        tracing::warn!(
            limit,
            max_buffered_bytes = ingest.max_buffered_bytes,
            "ingest.max_buffered_bytes is over the memory budget; listeners hold back once the budget is used"
        );
    }
    let governor = MemoryGovernor::new(limit, server.memory_soft_percent);
    tracing::info!(limit, soft_limit = governor.soft_limit(), policy = ?server.memory_policy, %source, "memory budget");
    governor
}

/// True when this listener should not read now: soft pressure, or the limit under
/// `block`.
pub fn should_pause(shared: &Shared) -> bool {
    pressed(shared.memory.level(), shared.memory_policy == MemoryPolicy::Reject)
}

/// Whether a listener waits at `level`: under any pressure, except at the limit when it
/// reads on there to refuse (`read_at_hard`).
fn pressed(level: Level, read_at_hard: bool) -> bool {
    match level {
        Level::Normal => false,
        Level::Soft => true,
        Level::Hard => !read_at_hard,
    }
}

/// True when a connection holding `holding` bytes of borrowed buffer may pause now (see
/// the module's documentation).
pub fn may_pause(shared: &Shared, holding: usize) -> bool {
    holding == 0 || shared.memory.component(flowgate_memory::Component::Ingest) < shared.memory.soft_limit() / 2
}

/// True when a produce request is to be refused now: the limit under `reject`.
pub fn should_refuse(shared: &Shared) -> bool {
    shared.memory_policy == MemoryPolicy::Reject && shared.memory.level() == Level::Hard
}

/// Waits while [`should_pause`] holds (counted once per pause), or until the engine shuts
/// down; returns how long it waited.
pub async fn pause_while_pressed(shared: &Shared, path: IngestPath) -> Duration {
    pause(shared, path, shared.memory_policy == MemoryPolicy::Reject).await
}

/// Waits while the budget is under any pressure, whatever the policy (for a listener
/// that has no retryable refusal to give), or until the engine shuts down; returns how
/// long it waited.
pub async fn pause_while_pressed_fully(shared: &Shared, path: IngestPath) -> Duration {
    pause(shared, path, false).await
}

async fn pause(shared: &Shared, path: IngestPath, read_at_hard: bool) -> Duration {
    if !pressed(shared.memory.level(), read_at_hard) {
        return Duration::ZERO;
    }
    shared.ingest.metrics().memory_paused(path);
    let started = tokio::time::Instant::now();
    tokio::select! {
        _ = shared.memory.wait_until(RECHECK, move |level| !pressed(level, read_at_hard)) => {}
        _ = shared.shutdown.cancelled() => {}
    }
    started.elapsed()
}

/// The message a refused producer gets.
pub const REFUSED: &str = "the server is at its memory limit (server.memory_limit_bytes); retry later";
