//! flowgate's core: the event model and the record batch format.
//!
//! Everything that crosses a boundary in flowgate — a produce request on the wire, a
//! batch in a log segment, a batch handed to a pipeline — is a [`batch`] of records in
//! one binary layout, written down in `docs/log-format.md`. This crate owns that layout
//! and nothing else: it knows no files and no sockets.
//!
//! - [`event`]: the owned [`Event`] a client builds and the borrowed [`RecordRef`] a
//!   decoder hands out without copying.
//! - [`batch`]: [`BatchBuilder`] encodes records into a batch (compression, CRC32C);
//!   [`BatchView`] validates and decodes one.
//! - [`codec`]: the compression codecs a batch may use.
//! - [`varint`]: the LEB128 / zig-zag integers records are made of.
//! - [`partition`]: which partition a key goes to.
//! - [`time`]: milliseconds since the epoch.
//! - [`timestamp`]: event times clients write (numbers in a unit, RFC 3339), checked.
//! - [`fields`]: an event's key, time and client id read from its own JSON.
//! - [`traceparent`]: the W3C Trace Context value events carry to continue a trace.

pub mod batch;
pub mod codec;
pub mod event;
pub mod fields;
pub mod partition;
pub mod time;
pub mod timestamp;
pub mod traceparent;
pub mod varint;

pub use batch::{BatchBuilder, BatchError, BatchHeader, BatchView, EncodedBatch, ProducerStamp};
pub use codec::Codec;
pub use event::{Event, Header, RecordRef};
pub use fields::{FieldPath, FieldSpec};
pub use partition::partition_for_key;
pub use timestamp::TimestampUnit;
pub use traceparent::TraceParent;
