//! Open files: every partition keeps its segment files open and every connection is a
//! socket, so the engine raises its soft limit on open files to the hard limit at start
//! and says loudly when even that is below what the config allows.

use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};

/// Files a partition is counted for: its active segment and a sealed one (more sealed
/// segments take more; the warning is a floor, not a promise).
const FILES_PER_PARTITION: u64 = 2;
/// Files for everything else: the data directory, checkpoints, listeners, the runtime.
const HEADROOM: u64 = 256;

/// Files the config may need open at once, at least.
pub fn files_needed(max_partitions: u64, max_connections: usize) -> u64 {
    max_partitions.saturating_mul(FILES_PER_PARTITION).saturating_add(max_connections as u64).saturating_add(HEADROOM)
}

/// Raises the soft limit on open files to the hard limit; returns the limit now in force
/// (`None`: unlimited or unknown). Logs a warning when it is below `needed`.
pub fn raise(needed: u64) -> Option<u64> {
    let limit = getrlimit(Resource::Nofile);
    let raised = match (limit.current, limit.maximum) {
        (Some(current), maximum) if maximum.is_none_or(|m| m > current) => {
            match setrlimit(Resource::Nofile, Rlimit { current: maximum, maximum }) {
                Ok(()) => maximum,
                Err(e) => {
                    tracing::warn!(error = %e, current, "cannot raise the limit on open files");
                    Some(current)
                }
            }
        }
        (current, _) => current,
    };
    if let Some(limit) = raised {
        if limit < needed {
            tracing::warn!(
                limit,
                needed,
                "the limit on open files is below what log.max_partitions and ingest.max_connections allow: \
                 raise it (ulimit -n, LimitNOFILE= in a systemd unit) or lower those settings, or creating \
                 topics and accepting connections will fail with 'too many open files'"
            );
        }
    }
    raised
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_soft_limit_is_raised_to_the_hard_one() {
        let before = getrlimit(Resource::Nofile);
        let now = raise(0);
        assert_eq!(now, before.maximum, "soft limit raised to the hard limit");
        assert_eq!(getrlimit(Resource::Nofile).current, before.maximum);
        assert_eq!(files_needed(10_000, 1024), 20_000 + 1024 + 256);
        assert_eq!(files_needed(u64::MAX, usize::MAX), u64::MAX, "saturates");
    }
}
