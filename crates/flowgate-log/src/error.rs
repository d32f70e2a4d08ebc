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
    /// A producer sequence older than any remembered.
    #[error("producer {producer_id} sequence {sequence} is older than any remembered; it was stored before")]
    DuplicateSequence {
        /// Producer id.
        producer_id: u64,
        /// Sequence.
        sequence: u64,
    },
    /// A metadata file is unreadable.
    #[error("metadata {path} is unreadable: {reason}")]
    BadMetadata {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
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
