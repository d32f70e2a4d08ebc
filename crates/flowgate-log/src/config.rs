//! Storage settings. Defaults favour throughput with bounded loss on power failure
//! (`fsync = "interval"`); `docs/log-format.md` says exactly what each policy risks.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// When appended bytes are forced to stable storage.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum FsyncPolicy {
    /// Acknowledge only after fsync. Concurrent appends share one fsync (group commit).
    /// Survives power loss.
    Always,
    /// Acknowledge after the write reaches the OS; fsync every `fsync_interval`.
    /// Survives a killed process; power loss may lose the last interval.
    #[default]
    Interval,
    /// Acknowledge after the write; fsync only when a segment is sealed (at roll) and at
    /// shutdown. Survives a killed process; power loss may lose whatever the OS had not
    /// written.
    Never,
}

/// Settings of a [`crate::Log`].
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// Durability of an acknowledged append.
    pub fsync: FsyncPolicy,
    /// Period of background fsync under [`FsyncPolicy::Interval`], in ms.
    pub fsync_interval_ms: u64,
    /// A segment rolls when it would grow past this many bytes.
    pub segment_bytes: u64,
    /// A segment rolls when it is older than this many ms (0 = never by age).
    pub segment_ms: u64,
    /// Bytes of batches between two offset index entries.
    pub index_interval_bytes: u64,
    /// Delete old segments while a partition holds more than this (0 = no limit). The
    /// default of topics that set no `retention_bytes` of their own.
    pub retention_bytes: u64,
    /// Delete segments last written more than this many ms ago (0 = keep forever). Age
    /// is the segment file's modification time, never the events' own timestamps. The
    /// default of topics that set no `retention_ms` of their own.
    pub retention_ms: u64,
    /// How often retention runs, in ms.
    pub retention_check_ms: u64,
    /// Partitions of a topic created implicitly by its first write.
    pub default_partitions: u32,
    /// Create topics on their first write.
    pub auto_create_topics: bool,
    /// Idempotent producers remembered per partition; the oldest is forgotten past this.
    pub max_producers_per_partition: usize,
    /// Partitions of all topics together at most: creating a topic (by hand or by a first
    /// write) past it is refused, so clients cannot exhaust file descriptors or memory
    /// by creating topics.
    pub max_partitions: u64,
}

impl Default for LogConfig {
    fn default() -> LogConfig {
        LogConfig {
            fsync: FsyncPolicy::Interval,
            fsync_interval_ms: 100,
            segment_bytes: 256 << 20,
            segment_ms: 7 * 24 * 3600 * 1000,
            index_interval_bytes: 4096,
            retention_bytes: 0,
            retention_ms: 7 * 24 * 3600 * 1000,
            retention_check_ms: 30_000,
            default_partitions: 1,
            auto_create_topics: true,
            max_producers_per_partition: 10_000,
            max_partitions: 10_000,
        }
    }
}

impl LogConfig {
    /// The background fsync period.
    pub fn fsync_interval(&self) -> Duration {
        Duration::from_millis(self.fsync_interval_ms.max(1))
    }

    /// The period of retention.
    pub fn retention_check_interval(&self) -> Duration {
        Duration::from_millis(self.retention_check_ms.max(1))
    }
}
