//! Fault injection for end-to-end tests: built only with the `failpoints` feature (which
//! the workspace's tests turn on) and debug assertions, so never into a release binary.
//!
//! `FLOWGATE_FAILPOINT_FSYNC_DELAY_MS=<ms>` in the engine's environment makes every fsync
//! of a partition's segment take that much longer, as a slow disk would: the tests of
//! what waits for durability need an fsync they can see.

use std::sync::OnceLock;
use std::time::Duration;

/// Sleeps for `FLOWGATE_FAILPOINT_FSYNC_DELAY_MS`, if set.
pub(crate) fn before_fsync() {
    static DELAY: OnceLock<Option<Duration>> = OnceLock::new();
    let delay = DELAY.get_or_init(|| {
        std::env::var("FLOWGATE_FAILPOINT_FSYNC_DELAY_MS").ok()?.parse().ok().map(Duration::from_millis)
    });
    if let Some(delay) = delay {
        std::thread::sleep(*delay);
    }
}
