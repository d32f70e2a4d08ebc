//! Fault injection for end-to-end tests: built only with the `failpoints` feature (which
//! the workspace's tests turn on) and debug assertions, so never into a release binary,
//! even one built with `--all-targets`.
//!
//! `FLOWGATE_FAILPOINT_PANIC_ON=<text>` in the engine's environment makes every
//! processor panic on an event whose payload contains `<text>`, as a processor bug
//! would: the tests of poison-event handling need a panic they can aim.
//!
//! `FLOWGATE_FAILPOINT_CRASH_AFTER_REPLAY_APPEND=1` makes the process abort (no
//! destructors, no flush: what a SIGKILL leaves on disk) once a replay's records are
//! durable in its replay topic and before its entries are marked replayed, the window a
//! second replay must not send twice.

use std::sync::OnceLock;

use crate::event::PipelineEvent;

/// Panics if one of `events` carries the marker of `FLOWGATE_FAILPOINT_PANIC_ON`.
pub(super) fn before_processor(events: &mut [PipelineEvent]) {
    static MARKER: OnceLock<Option<Vec<u8>>> = OnceLock::new();
    let marker = MARKER.get_or_init(|| std::env::var("FLOWGATE_FAILPOINT_PANIC_ON").ok().map(String::into_bytes));
    let Some(marker) = marker.as_deref().filter(|m| !m.is_empty()) else { return };
    for event in events {
        if event.payload().windows(marker.len()).any(|w| w == marker) {
            panic!("failpoint: the event at offset {} carries the panic marker", event.offset);
        }
    }
}

/// Aborts the process if `FLOWGATE_FAILPOINT_CRASH_AFTER_REPLAY_APPEND` is set.
pub(super) fn after_replay_append() {
    if std::env::var_os("FLOWGATE_FAILPOINT_CRASH_AFTER_REPLAY_APPEND").is_some_and(|v| !v.is_empty()) {
        eprintln!("failpoint: crashing between a replay's append and its marks");
        std::process::abort();
    }
}
