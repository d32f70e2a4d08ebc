//! flowgate's log: durable, partitioned, replayable storage for record batches.
//!
//! This crate knows nothing of the network. A [`Log`] is a directory of topics; a
//! [`Topic`] has a fixed number of [`Partition`]s; a partition is a directory of
//! segments. The on-disk format and the recovery rules are written down in
//! `docs/log-format.md`; each piece lives in its own module:
//!
//! - [`config`]: durability (`fsync`), segment size and age, retention, index density.
//! - [`segment`]: one segment file and its in-memory indexes.
//! - [`index`]: the sparse offset index and the time index, and their files.
//! - [`scan`]: walking a segment batch by batch, verifying each; shared by recovery,
//!   index rebuilds and `flowgate log check`.
//! - [`producers`]: idempotent-producer state, so a retried request is stored once.
//! - [`partition`]: append (one write per batch), reads by offset and time, retention.
//! - [`append`]: the one append path of every writer: routing records to partitions,
//!   splitting a batch, encoding, producer rules, waiting for durability.
//! - [`flusher`]: the background thread that fsyncs: group commit for `always`, a timer
//!   for `interval`.
//! - [`topic`] and [`log`]: topic metadata, creation, deletion, opening a data directory.
//! - [`settings`]: a topic's own retention and compression, and their file.
//! - [`check`]: the read-only verification behind `flowgate log check`.

pub mod append;
pub mod check;
pub mod config;
pub mod error;
#[cfg(all(feature = "failpoints", debug_assertions))]
mod failpoints;
pub mod flusher;
pub mod index;
pub mod log;
pub mod partition;
pub mod producers;
pub mod scan;
pub mod segment;
pub mod settings;
pub mod topic;

pub use append::{Appender, Route, Scratch, Written};
pub use check::{check_data_dir, CheckReport, CorruptRange};
pub use config::{FsyncPolicy, LogConfig};
pub use error::{LogError, Result};
pub use log::{Log, LogObserver};
pub use partition::{AppendOutcome, Partition, PartitionInfo, ReadResult};
pub use producers::SequenceRule;
pub use settings::{Change, Retention, SettingsChange, TopicSettings};
pub use topic::{validate_topic_name, Topic, TopicInfo};
