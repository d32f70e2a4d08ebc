//! Errors of the storage layer. Each says what failed and, where it can, what to do.

use std::path::PathBuf;

use flowgate_core::BatchError;

/// Result with a [`LogError`].
pub type Result<T, E = LogError> = std::result::Result<T, E>;

/// What went wrong in the log.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    /// An I/O call failed.
    #[error("{action} {path}: {source}")]
    Io {
        /// What the log was doing.
        action: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The topic does not exist.
    #[error("topic '{0}' does not exist; create it with `flowgate topics create` or enable auto_create_topics")]
    UnknownTopic(String),
    /// Creating the topic would pass `log.max_partitions`.
    #[error(
        "the log holds {held} partitions and {asked} more would pass log.max_partitions ({max}); delete unused \
         topics or raise the limit (each partition keeps files open)"
    )]
    PartitionLimit {
        /// Partitions of every topic now.
        held: u64,
        /// Partitions of the topic asked for.
        asked: u32,
        /// The limit.
        max: u64,
    },
    /// The topic already exists.
    #[error("topic '{0}' already exists")]
    TopicExists(String),
    /// The topic name breaks the naming rules.
    #[error("invalid topic name '{name}': {reason}")]
    InvalidTopicName {
        /// The name given.
        name: String,
        /// Which rule it breaks.
        reason: &'static str,
    },
    /// A topic setting with a value it cannot take.
    #[error("invalid value for {setting}: {reason}")]
    InvalidSetting {
        /// The setting.
        setting: &'static str,
        /// What is wrong and what it may be.
        reason: String,
    },
    /// Partition number out of range.
    #[error("topic '{topic}' has {partitions} partitions; partition {partition} does not exist")]
    UnknownPartition {
        /// Topic.
        topic: String,
        /// Requested partition.
        partition: u32,
        /// How many there are.
        partitions: u32,
    },
    /// A read asked for an offset outside the partition.
    #[error("offset {requested} is outside [{start}, {end}]")]
    OffsetOutOfRange {
        /// Requested offset.
        requested: u64,
        /// First stored offset.
        start: u64,
        /// Next offset to be assigned.
        end: u64,
    },
    /// The batch handed to append is invalid.
    #[error("invalid batch: {0}")]
    InvalidBatch(#[from] BatchError),
    /// A producer sequence stored before, too long ago for its offsets to be remembered.
    /// The batch is stored; the client counts it as stored.
    #[error(
        "producer {producer_id} sequence {sequence} was stored before (the last stored is {last_sequence}); \
         its offsets are no longer remembered"
    )]
    DuplicateSequence {
        /// Producer id.
        producer_id: u64,
        /// Sequence.
        sequence: u64,
        /// The last sequence stored in the partition.
        last_sequence: u64,
    },
    /// A producer sequence after a gap: an earlier batch of this producer never reached
    /// the partition. Nothing was stored.
    #[error(
        "producer {producer_id} sequence {sequence} is out of order: partition {partition} expects sequence \
         {expected} next; resend the unacknowledged batches in order from {expected}"
    )]
    OutOfOrderSequence {
        /// Producer id.
        producer_id: u64,
        /// Sequence received.
        sequence: u64,
        /// Sequence expected.
        expected: u64,
        /// The partition.
        partition: u32,
    },
    /// A sequence other than 0 from a producer the partition does not know. Nothing was
    /// stored.
    #[error(
        "producer {producer_id} is unknown to partition {partition} (forgotten as idle, or its batches were \
         lost with a power failure) and sequence {sequence} is not 0; nothing was stored; start a new producer"
    )]
    UnknownProducer {
        /// Producer id.
        producer_id: u64,
        /// Sequence received.
        sequence: u64,
        /// The partition.
        partition: u32,
    },
    /// An idempotent batch (producer id other than 0) sent where the server would split
    /// it across partitions: its sequence numbers one partition's batches.
    #[error(
        "an idempotent batch (producer id {producer_id}) must name its partition: sequences are per \
         partition; send it with PRODUCE_PARTITION (protocol version 2)"
    )]
    IdempotentBatchNeedsPartition {
        /// Producer id.
        producer_id: u64,
    },
    /// A keyed record in a batch sent to one partition whose key belongs to another.
    #[error("a record's key belongs to partition {expected}, not {partition}; pick partitions with xxh3_64(key) % partitions")]
    KeyInWrongPartition {
        /// The partition named.
        partition: u32,
        /// The key's partition.
        expected: u32,
    },
    /// A batch split across partitions was stored in some of them and failed in another.
    #[error(
        "stored only partly: {stored}; partition {failed_partition} failed: {source}; \
         resend only the records of the partitions not listed as stored"
    )]
    PartiallyStored {
        /// The parts that were stored (shown as `partition P offsets A..=B` items). A
        /// caller that tells a client what was stored waits for their durability first
        /// ([`crate::Written::durable`]), as for a whole append.
        stored: crate::append::Written,
        /// The partition whose append failed.
        failed_partition: u32,
        /// Why it failed.
        source: Box<LogError>,
    },
    /// A topic directory holds data but no `topic.json` (lost in a crash or removed by
    /// hand). The log neither opens nor deletes it.
    #[error(
        "topic directory {path} holds data but no topic.json; restore topic.json \
         ({{\"partitions\": N, \"created_ms\": 0}} with N the number of partition directories) \
         or move the directory away, then restart"
    )]
    OrphanTopicDirectory {
        /// The directory.
        path: PathBuf,
    },
    /// A metadata file is unreadable.
    #[error("metadata {path} is unreadable: {reason}")]
    BadMetadata {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// The partition reached the largest offset; nothing more can be appended.
    #[error("the partition's offsets are exhausted (2^64); write to a new topic")]
    OffsetsExhausted,
    /// The log is shut down.
    #[error("the log is closed")]
    Closed,
}

impl LogError {
    pub(crate) fn io(action: &'static str, path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> LogError {
        let path = path.into();
        move |source| LogError::Io { action, path, source }
    }
}
