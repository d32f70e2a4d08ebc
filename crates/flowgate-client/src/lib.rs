//! An async Rust client for flowgate's binary protocol (`docs/protocol.md`).
//!
//! - [`Client`]: one connection, many requests in flight, cheap to clone. Produce
//!   pre-encoded batches, fetch, manage topics.
//! - [`Producer`]: events in, batches out: partitions picked by key, batching by count,
//!   bytes and linger, a window of requests in flight, and sequences numbered per
//!   partition and resent in order after a failure, so the engine stores every batch
//!   once, in order, and nothing unstored is counted as acknowledged.
//! - [`ClientError`]: what went wrong and what to do.

#![warn(missing_docs)]

mod connection;
mod error;
mod producer;

pub use connection::{Client, FetchResult, PendingProduce};
pub use error::ClientError;
pub use flowgate_protocol::{
    ConsumerOffset, ErrorCode, PartitionAck, PartitionDetail, PartitionInfo, Setting, SettingSource, SettingUpdate,
    SettingValue, TopicDescription, TopicInfo,
};
pub use producer::{Producer, ProducerConfig};
