//! Frame layout, request and response bodies.

use std::fmt;

use crate::topic_admin::{self, SettingUpdate, SettingValue, TopicDescription};

/// The newest protocol version this crate speaks. Version 2 adds PRODUCE_PARTITION and
/// METADATA (idempotent producing with sequences checked in order per partition);
/// version 3 adds topic settings (in CREATE_TOPIC), ALTER_TOPIC and DESCRIBE_TOPIC.
pub const VERSION: u16 = 3;
/// The oldest protocol version this crate still speaks.
pub const MIN_VERSION: u16 = 1;
/// The HELLO magic.
pub const MAGIC: &[u8; 8] = b"FLOWGATE";
/// The default frame limit (16 MiB).
pub const DEFAULT_MAX_FRAME_BYTES: u32 = 16 << 20;
/// Length prefix, kind, flags and correlation id.
pub const FRAME_HEADER_LEN: usize = 10;
/// Bytes of one PRODUCE_OK entry: partition, first offset, record count.
const ACK_LEN: usize = 16;

mod kind {
    pub const HELLO: u8 = 0x01;
    pub const PRODUCE: u8 = 0x02;
    pub const FETCH: u8 = 0x03;
    pub const LIST_TOPICS: u8 = 0x04;
    pub const CREATE_TOPIC: u8 = 0x05;
    pub const DELETE_TOPIC: u8 = 0x06;
    pub const OFFSET_FOR_TIME: u8 = 0x07;
    pub const PRODUCE_PARTITION: u8 = 0x08;
    pub const METADATA: u8 = 0x09;
    pub const ALTER_TOPIC: u8 = 0x0A;
    pub const DESCRIBE_TOPIC: u8 = 0x0B;
    pub const HELLO_OK: u8 = 0x81;
    pub const PRODUCE_OK: u8 = 0x82;
    pub const FETCH_OK: u8 = 0x83;
    pub const TOPICS: u8 = 0x84;
    pub const CREATED: u8 = 0x85;
    pub const DELETED: u8 = 0x86;
    pub const OFFSET: u8 = 0x87;
    pub const METADATA_OK: u8 = 0x89;
    pub const ALTERED: u8 = 0x8A;
    pub const DESCRIBED: u8 = 0x8B;
    pub const ERROR: u8 = 0xFF;
}

/// Error codes carried by ERROR frames.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    /// No common version, or no HELLO first.
    UnsupportedVersion = 1,
    /// The frame does not parse.
    MalformedFrame = 2,
    /// Over the frame limit.
    FrameTooLarge = 3,
    /// No such topic and auto-creation is off.
    UnknownTopic = 4,
    /// CRC or record check failed; nothing stored.
    InvalidBatch = 5,
    /// The log could not write.
    StorageError = 6,
    /// CREATE_TOPIC for an existing topic.
    TopicExists = 7,
    /// Well-formed frame, bad contents.
    InvalidRequest = 8,
    /// Sequence stored before, too long ago for its offsets to be remembered: it is
    /// stored.
    DuplicateSequence = 9,
    /// The server is draining.
    ShuttingDown = 10,
    /// Fetch offset outside the partition.
    OffsetOutOfRange = 11,
    /// Partition number too high.
    UnknownPartition = 12,
    /// A sequence after a gap: an earlier batch never reached the partition. Nothing
    /// stored; resend the unacknowledged batches in order.
    OutOfOrderSequence = 13,
    /// The partition does not know the producer and the sequence is not 0. Nothing
    /// stored.
    UnknownProducer = 14,
    /// A PRODUCE split across partitions was stored in some of them only; the message
    /// lists which. Not retriable as a whole.
    PartiallyStored = 15,
    /// The server's ingest buffers stayed full for longer than its frame deadline.
    Busy = 16,
}

impl ErrorCode {
    /// The numeric code.
    pub fn code(self) -> u16 {
        self as u16
    }

    /// The error with this code, if known.
    pub fn from_code(code: u16) -> Option<ErrorCode> {
        use ErrorCode::*;
        Some(match code {
            1 => UnsupportedVersion,
            2 => MalformedFrame,
            3 => FrameTooLarge,
            4 => UnknownTopic,
            5 => InvalidBatch,
            6 => StorageError,
            7 => TopicExists,
            8 => InvalidRequest,
            9 => DuplicateSequence,
            10 => ShuttingDown,
            11 => OffsetOutOfRange,
            12 => UnknownPartition,
            13 => OutOfOrderSequence,
            14 => UnknownProducer,
            15 => PartiallyStored,
            16 => Busy,
            _ => return None,
        })
    }

    /// True when retrying the same request later may succeed. An out-of-order sequence
    /// is retriable once the batches before it are resent.
    pub fn is_retriable(self) -> bool {
        matches!(
            self,
            ErrorCode::StorageError | ErrorCode::ShuttingDown | ErrorCode::OutOfOrderSequence | ErrorCode::Busy
        )
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use ErrorCode::*;
        f.write_str(match self {
            UnsupportedVersion => "UNSUPPORTED_VERSION",
            MalformedFrame => "MALFORMED_FRAME",
            FrameTooLarge => "FRAME_TOO_LARGE",
            UnknownTopic => "UNKNOWN_TOPIC",
            InvalidBatch => "INVALID_BATCH",
            StorageError => "STORAGE_ERROR",
            TopicExists => "TOPIC_EXISTS",
            InvalidRequest => "INVALID_REQUEST",
            DuplicateSequence => "DUPLICATE_SEQUENCE",
            ShuttingDown => "SHUTTING_DOWN",
            OffsetOutOfRange => "OFFSET_OUT_OF_RANGE",
            UnknownPartition => "UNKNOWN_PARTITION",
            OutOfOrderSequence => "OUT_OF_ORDER_SEQUENCE",
            UnknownProducer => "UNKNOWN_PRODUCER",
            PartiallyStored => "PARTIALLY_STORED",
            Busy => "BUSY",
        })
    }
}

/// Why bytes are not a valid frame.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    /// The length prefix exceeds the limit.
    #[error("frame of {len} bytes exceeds the limit of {max} bytes; send smaller batches")]
    FrameTooLarge {
        /// Stated length.
        len: u64,
        /// The limit.
        max: u32,
    },
    /// The length prefix is below the minimum.
    #[error("frame length {0} is below the minimum of 6")]
    FrameTooSmall(u32),
    /// The frame ends before its body does.
    #[error("frame truncated: {0}")]
    Truncated(&'static str),
    /// Bytes left after the body.
    #[error("{0} unexpected bytes after the frame body")]
    TrailingBytes(usize),
    /// Unknown frame kind.
    #[error("unknown frame kind {0:#04x}")]
    UnknownKind(u8),
    /// A string is not UTF-8.
    #[error("{0} is not valid UTF-8")]
    BadUtf8(&'static str),
    /// HELLO without the magic.
    #[error("HELLO does not start with the FLOWGATE magic")]
    BadMagic,
    /// Topic settings that do not parse.
    #[error("bad topic settings: {0}")]
    BadSetting(&'static str),
}

impl ProtocolError {
    /// The code to answer with.
    pub fn error_code(&self) -> ErrorCode {
        match self {
            ProtocolError::FrameTooLarge { .. } => ErrorCode::FrameTooLarge,
            ProtocolError::BadMagic => ErrorCode::UnsupportedVersion,
            _ => ErrorCode::MalformedFrame,
        }
    }
}

/// A request, borrowing from its frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Request<'a> {
    /// Opens a connection.
    Hello {
        /// Lowest version the client speaks.
        min_version: u16,
        /// Highest version the client speaks.
        max_version: u16,
        /// Free-form client name.
        client_name: &'a str,
    },
    /// Appends a batch, split across partitions by key (protocol v1 and v2). Not
    /// idempotent: `producer_id` must be 0 (v2 refuses others with INVALID_REQUEST).
    Produce {
        /// Topic.
        topic: &'a str,
        /// Idempotent producer id (0 = none).
        producer_id: u64,
        /// Request sequence of that producer.
        sequence: u64,
        /// One encoded record batch.
        batch: &'a [u8],
    },
    /// Appends a batch to one partition (protocol v2). With a producer id, idempotent:
    /// sequences are per producer and partition and must arrive in order.
    ProducePartition {
        /// Topic.
        topic: &'a str,
        /// Partition every record goes to; a keyed record must hash to it.
        partition: u32,
        /// Idempotent producer id (0 = none).
        producer_id: u64,
        /// The producer's sequence for this partition: 0, 1, 2, …
        sequence: u64,
        /// One encoded record batch.
        batch: &'a [u8],
    },
    /// Asks for a topic's partition count, creating the topic if auto-creation is on
    /// (protocol v2).
    Metadata {
        /// Topic.
        topic: &'a str,
    },
    /// Reads batches.
    Fetch {
        /// Topic.
        topic: &'a str,
        /// Partition.
        partition: u32,
        /// First wanted offset.
        offset: u64,
        /// About this many bytes.
        max_bytes: u32,
        /// Wait this long for data at the log end.
        max_wait_ms: u32,
    },
    /// Lists topics.
    ListTopics,
    /// Creates a topic, with settings of its own (protocol v3; none before).
    CreateTopic {
        /// Topic.
        topic: &'a str,
        /// Partitions.
        partitions: u32,
        /// The topic's own settings; the ones left out follow the defaults.
        settings: Vec<SettingUpdate>,
    },
    /// Changes a topic's settings (protocol v3).
    AlterTopic {
        /// Topic.
        topic: &'a str,
        /// The settings to change; the ones left out stay as they are.
        settings: Vec<SettingUpdate>,
    },
    /// Asks for a topic's settings, partitions and consumers (protocol v3).
    DescribeTopic {
        /// Topic.
        topic: &'a str,
    },
    /// Deletes a topic.
    DeleteTopic {
        /// Topic.
        topic: &'a str,
    },
    /// Finds the first offset at or after a time.
    OffsetForTime {
        /// Topic.
        topic: &'a str,
        /// Partition.
        partition: u32,
        /// ms since the epoch.
        timestamp_ms: i64,
    },
}

/// One partition's share of a produce.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PartitionAck {
    /// Partition.
    pub partition: u32,
    /// First offset assigned.
    pub first_offset: u64,
    /// Records with consecutive offsets from there.
    pub record_count: u32,
}

/// A partition in a topic listing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PartitionInfo {
    /// First offset held.
    pub start_offset: u64,
    /// Next offset to assign.
    pub end_offset: u64,
    /// Bytes on disk.
    pub size_bytes: u64,
}

/// A topic in a listing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TopicInfo {
    /// Name.
    pub name: String,
    /// Partitions, by number.
    pub partitions: Vec<PartitionInfo>,
}

/// A response, borrowing from its frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Response<'a> {
    /// Handshake accepted.
    HelloOk {
        /// Version chosen.
        version: u16,
        /// The server's frame limit.
        max_frame_bytes: u32,
        /// Server name and version.
        server_name: &'a str,
    },
    /// Produce stored (and durable as configured).
    ProduceOk(Vec<PartitionAck>),
    /// Fetched batches.
    FetchOk {
        /// First offset held.
        log_start_offset: u64,
        /// Next offset to assign.
        log_end_offset: u64,
        /// Whole batches.
        batches: &'a [u8],
    },
    /// Topic listing.
    Topics(Vec<TopicInfo>),
    /// Topic created.
    Created,
    /// Topic deleted.
    Deleted,
    /// An offset (`u64::MAX` for none).
    Offset(u64),
    /// A topic's partition count.
    Metadata {
        /// Partitions.
        partitions: u32,
    },
    /// Topic settings changed: their effective values before and after.
    Altered {
        /// Before the change.
        before: Vec<SettingValue>,
        /// After the change.
        after: Vec<SettingValue>,
    },
    /// A topic's description.
    Described(TopicDescription),
    /// The request failed.
    Error {
        /// What kind of failure.
        code: ErrorCode,
        /// What happened and what to do.
        message: &'a str,
    },
}

/// Whether `buf` starts with a whole frame: `Ok(Some(len))` with the frame's total
/// length, `Ok(None)` when more bytes are needed. Only the length prefix is read.
pub fn check_frame(buf: &[u8], max_frame_bytes: u32) -> Result<Option<usize>, ProtocolError> {
    let Some(prefix) = buf.get(..4) else {
        return Ok(None);
    };
    let len = u32::from_le_bytes(prefix.try_into().expect("4 bytes"));
    if len > max_frame_bytes {
        return Err(ProtocolError::FrameTooLarge { len: u64::from(len), max: max_frame_bytes });
    }
    if len < 6 {
        return Err(ProtocolError::FrameTooSmall(len));
    }
    let total = (len as usize).saturating_add(4);
    Ok((buf.len() >= total).then_some(total))
}

/// A cursor over a frame's body.
pub(crate) struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    pub(crate) fn u8(&mut self, what: &'static str) -> Result<u8, ProtocolError> {
        Ok(self.take(1, what)?[0])
    }
    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], ProtocolError> {
        let end = self.pos.checked_add(n).ok_or(ProtocolError::Truncated(what))?;
        let s = self.buf.get(self.pos..end).ok_or(ProtocolError::Truncated(what))?;
        self.pos = end;
        Ok(s)
    }
    pub(crate) fn u16(&mut self, what: &'static str) -> Result<u16, ProtocolError> {
        Ok(u16::from_le_bytes(self.take(2, what)?.try_into().expect("2")))
    }
    pub(crate) fn u32(&mut self, what: &'static str) -> Result<u32, ProtocolError> {
        Ok(u32::from_le_bytes(self.take(4, what)?.try_into().expect("4")))
    }
    pub(crate) fn u64(&mut self, what: &'static str) -> Result<u64, ProtocolError> {
        Ok(u64::from_le_bytes(self.take(8, what)?.try_into().expect("8")))
    }
    pub(crate) fn str(&mut self, what: &'static str) -> Result<&'a str, ProtocolError> {
        let n = self.u16(what)? as usize;
        std::str::from_utf8(self.take(n, what)?).map_err(|_| ProtocolError::BadUtf8(what))
    }
    fn bytes32(&mut self, what: &'static str) -> Result<&'a [u8], ProtocolError> {
        let n = self.u32(what)? as usize;
        self.take(n, what)
    }
    pub(crate) fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }
    fn rest(&mut self) -> &'a [u8] {
        let s = &self.buf[self.pos..];
        self.pos = self.buf.len();
        s
    }
    fn finish(&self) -> Result<(), ProtocolError> {
        match self.buf.len() - self.pos {
            0 => Ok(()),
            n => Err(ProtocolError::TrailingBytes(n)),
        }
    }
}

/// Splits a whole frame into (kind, correlation id, body reader).
fn open_frame(frame: &[u8]) -> Result<(u8, u32, Reader<'_>), ProtocolError> {
    let prefix = frame.get(..4).ok_or(ProtocolError::Truncated("length prefix"))?;
    let len = u32::from_le_bytes(prefix.try_into().expect("4 bytes"));
    if len < 6 {
        return Err(ProtocolError::FrameTooSmall(len));
    }
    let total = (len as usize).saturating_add(4);
    if frame.len() < total {
        return Err(ProtocolError::Truncated("frame body"));
    }
    if frame.len() > total {
        return Err(ProtocolError::TrailingBytes(frame.len() - total));
    }
    let kind = frame[4];
    let correlation_id = u32::from_le_bytes(frame[6..10].try_into().expect("4 bytes"));
    Ok((kind, correlation_id, Reader { buf: &frame[FRAME_HEADER_LEN..total], pos: 0 }))
}

/// Decodes a whole request frame (length prefix included).
pub fn decode_request(frame: &[u8]) -> Result<(u32, Request<'_>), ProtocolError> {
    let (k, correlation_id, mut r) = open_frame(frame)?;
    let request = match k {
        kind::HELLO => {
            if r.take(8, "magic")? != MAGIC {
                return Err(ProtocolError::BadMagic);
            }
            Request::Hello {
                min_version: r.u16("min_version")?,
                max_version: r.u16("max_version")?,
                client_name: r.str("client_name")?,
            }
        }
        kind::PRODUCE => Request::Produce {
            topic: r.str("topic")?,
            producer_id: r.u64("producer_id")?,
            sequence: r.u64("sequence")?,
            batch: r.rest(),
        },
        kind::PRODUCE_PARTITION => Request::ProducePartition {
            topic: r.str("topic")?,
            partition: r.u32("partition")?,
            producer_id: r.u64("producer_id")?,
            sequence: r.u64("sequence")?,
            batch: r.rest(),
        },
        kind::METADATA => Request::Metadata { topic: r.str("topic")? },
        kind::FETCH => Request::Fetch {
            topic: r.str("topic")?,
            partition: r.u32("partition")?,
            offset: r.u64("offset")?,
            max_bytes: r.u32("max_bytes")?,
            max_wait_ms: r.u32("max_wait_ms")?,
        },
        kind::LIST_TOPICS => Request::ListTopics,
        kind::CREATE_TOPIC => {
            let (topic, partitions) = (r.str("topic")?, r.u32("partitions")?);
            // Versions 1 and 2 end here; version 3 may add settings.
            let settings = if r.remaining() > 0 { topic_admin::read_updates(&mut r)? } else { Vec::new() };
            Request::CreateTopic { topic, partitions, settings }
        }
        kind::ALTER_TOPIC => {
            Request::AlterTopic { topic: r.str("topic")?, settings: topic_admin::read_updates(&mut r)? }
        }
        kind::DESCRIBE_TOPIC => Request::DescribeTopic { topic: r.str("topic")? },
        kind::DELETE_TOPIC => Request::DeleteTopic { topic: r.str("topic")? },
        kind::OFFSET_FOR_TIME => Request::OffsetForTime {
            topic: r.str("topic")?,
            partition: r.u32("partition")?,
            timestamp_ms: r.u64("timestamp_ms")? as i64,
        },
        other => return Err(ProtocolError::UnknownKind(other)),
    };
    r.finish()?;
    Ok((correlation_id, request))
}

/// Decodes a whole response frame (length prefix included).
pub fn decode_response(frame: &[u8]) -> Result<(u32, Response<'_>), ProtocolError> {
    let (k, correlation_id, mut r) = open_frame(frame)?;
    let response = match k {
        kind::HELLO_OK => Response::HelloOk {
            version: r.u16("version")?,
            max_frame_bytes: r.u32("max_frame_bytes")?,
            server_name: r.str("server_name")?,
        },
        kind::PRODUCE_OK => {
            let n = r.u16("ack count")?;
            // Never reserve more entries than the frame's remaining bytes can hold.
            let mut acks = Vec::with_capacity((n as usize).min(r.remaining() / ACK_LEN));
            for _ in 0..n {
                acks.push(PartitionAck {
                    partition: r.u32("partition")?,
                    first_offset: r.u64("first_offset")?,
                    record_count: r.u32("record_count")?,
                });
            }
            Response::ProduceOk(acks)
        }
        kind::FETCH_OK => Response::FetchOk {
            log_start_offset: r.u64("log_start_offset")?,
            log_end_offset: r.u64("log_end_offset")?,
            batches: r.bytes32("batches")?,
        },
        kind::TOPICS => {
            let n = r.u32("topic count")?;
            // A topic takes at least 6 bytes (empty name, partition count).
            let mut topics = Vec::with_capacity((n as usize).min(r.remaining() / 6));
            for _ in 0..n {
                let name = r.str("topic name")?.to_owned();
                let p = r.u32("partition count")?;
                let mut partitions = Vec::with_capacity((p as usize).min(r.remaining() / 24));
                for _ in 0..p {
                    partitions.push(PartitionInfo {
                        start_offset: r.u64("start_offset")?,
                        end_offset: r.u64("end_offset")?,
                        size_bytes: r.u64("size_bytes")?,
                    });
                }
                topics.push(TopicInfo { name, partitions });
            }
            Response::Topics(topics)
        }
        kind::CREATED => Response::Created,
        kind::DELETED => Response::Deleted,
        kind::OFFSET => Response::Offset(r.u64("offset")?),
        kind::METADATA_OK => Response::Metadata { partitions: r.u32("partitions")? },
        kind::ALTERED => {
            Response::Altered { before: topic_admin::read_values(&mut r)?, after: topic_admin::read_values(&mut r)? }
        }
        kind::DESCRIBED => Response::Described(topic_admin::read_description(&mut r)?),
        kind::ERROR => {
            let raw = r.u16("error code")?;
            let code = ErrorCode::from_code(raw).unwrap_or(ErrorCode::InvalidRequest);
            Response::Error { code, message: r.str("error message")? }
        }
        other => return Err(ProtocolError::UnknownKind(other)),
    };
    r.finish()?;
    Ok((correlation_id, response))
}

pub(crate) fn put_str(out: &mut Vec<u8>, s: &str) {
    // Strings longer than u16::MAX are cut at a char boundary: only free-form text
    // (messages, names) can be that long, and topic names are limited to 200 bytes.
    let mut end = s.len().min(u16::MAX as usize);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    out.extend_from_slice(&(end as u16).to_le_bytes());
    out.extend_from_slice(&s.as_bytes()[..end]);
}

fn begin(out: &mut Vec<u8>, kind: u8, correlation_id: u32) -> usize {
    let start = out.len();
    out.extend_from_slice(&[0, 0, 0, 0, kind, 0]);
    out.extend_from_slice(&correlation_id.to_le_bytes());
    start
}

fn end(out: &mut [u8], start: usize) {
    // Callers keep frames under the peer's limit (at most u32::MAX); saturate if not, so
    // the peer refuses the frame as too large instead of misreading a wrapped length.
    let len = u32::try_from(out.len() - start - 4).unwrap_or(u32::MAX);
    out[start..start + 4].copy_from_slice(&len.to_le_bytes());
}

/// Appends a whole request frame to `out`.
pub fn encode_request(correlation_id: u32, request: &Request<'_>, out: &mut Vec<u8>) {
    let start;
    match request {
        Request::Hello { min_version, max_version, client_name } => {
            start = begin(out, kind::HELLO, correlation_id);
            out.extend_from_slice(MAGIC);
            out.extend_from_slice(&min_version.to_le_bytes());
            out.extend_from_slice(&max_version.to_le_bytes());
            put_str(out, client_name);
        }
        Request::Produce { topic, producer_id, sequence, batch } => {
            start = begin(out, kind::PRODUCE, correlation_id);
            put_str(out, topic);
            out.extend_from_slice(&producer_id.to_le_bytes());
            out.extend_from_slice(&sequence.to_le_bytes());
            out.extend_from_slice(batch);
        }
        Request::ProducePartition { topic, partition, producer_id, sequence, batch } => {
            start = begin(out, kind::PRODUCE_PARTITION, correlation_id);
            put_str(out, topic);
            out.extend_from_slice(&partition.to_le_bytes());
            out.extend_from_slice(&producer_id.to_le_bytes());
            out.extend_from_slice(&sequence.to_le_bytes());
            out.extend_from_slice(batch);
        }
        Request::Metadata { topic } => {
            start = begin(out, kind::METADATA, correlation_id);
            put_str(out, topic);
        }
        Request::Fetch { topic, partition, offset, max_bytes, max_wait_ms } => {
            start = begin(out, kind::FETCH, correlation_id);
            put_str(out, topic);
            out.extend_from_slice(&partition.to_le_bytes());
            out.extend_from_slice(&offset.to_le_bytes());
            out.extend_from_slice(&max_bytes.to_le_bytes());
            out.extend_from_slice(&max_wait_ms.to_le_bytes());
        }
        Request::ListTopics => start = begin(out, kind::LIST_TOPICS, correlation_id),
        Request::CreateTopic { topic, partitions, settings } => {
            start = begin(out, kind::CREATE_TOPIC, correlation_id);
            put_str(out, topic);
            out.extend_from_slice(&partitions.to_le_bytes());
            // Without settings, the frame of versions 1 and 2.
            if !settings.is_empty() {
                topic_admin::put_updates(out, settings);
            }
        }
        Request::AlterTopic { topic, settings } => {
            start = begin(out, kind::ALTER_TOPIC, correlation_id);
            put_str(out, topic);
            topic_admin::put_updates(out, settings);
        }
        Request::DescribeTopic { topic } => {
            start = begin(out, kind::DESCRIBE_TOPIC, correlation_id);
            put_str(out, topic);
        }
        Request::DeleteTopic { topic } => {
            start = begin(out, kind::DELETE_TOPIC, correlation_id);
            put_str(out, topic);
        }
        Request::OffsetForTime { topic, partition, timestamp_ms } => {
            start = begin(out, kind::OFFSET_FOR_TIME, correlation_id);
            put_str(out, topic);
            out.extend_from_slice(&partition.to_le_bytes());
            out.extend_from_slice(&timestamp_ms.to_le_bytes());
        }
    }
    end(out, start);
}

/// Appends the head of a FETCH_OK frame (everything but the batches) to `out`; the
/// caller sends `batches_len` bytes of batches right after it. Lets a server write a large
/// reply straight from the buffer it read, without copying it into a frame.
pub fn encode_fetch_ok_head(
    correlation_id: u32,
    log_start_offset: u64,
    log_end_offset: u64,
    batches_len: usize,
    out: &mut Vec<u8>,
) {
    let start = begin(out, kind::FETCH_OK, correlation_id);
    out.extend_from_slice(&log_start_offset.to_le_bytes());
    out.extend_from_slice(&log_end_offset.to_le_bytes());
    let batches_len = u32::try_from(batches_len).unwrap_or(u32::MAX);
    out.extend_from_slice(&batches_len.to_le_bytes());
    let len = u32::try_from(out.len() - start - 4).unwrap_or(u32::MAX).saturating_add(batches_len);
    out[start..start + 4].copy_from_slice(&len.to_le_bytes());
}

/// Appends a whole response frame to `out`.
pub fn encode_response(correlation_id: u32, response: &Response<'_>, out: &mut Vec<u8>) {
    let start;
    match response {
        Response::HelloOk { version, max_frame_bytes, server_name } => {
            start = begin(out, kind::HELLO_OK, correlation_id);
            out.extend_from_slice(&version.to_le_bytes());
            out.extend_from_slice(&max_frame_bytes.to_le_bytes());
            put_str(out, server_name);
        }
        Response::ProduceOk(acks) => {
            start = begin(out, kind::PRODUCE_OK, correlation_id);
            out.extend_from_slice(&(acks.len().min(u16::MAX as usize) as u16).to_le_bytes());
            for a in acks.iter().take(u16::MAX as usize) {
                out.extend_from_slice(&a.partition.to_le_bytes());
                out.extend_from_slice(&a.first_offset.to_le_bytes());
                out.extend_from_slice(&a.record_count.to_le_bytes());
            }
        }
        Response::FetchOk { log_start_offset, log_end_offset, batches } => {
            start = begin(out, kind::FETCH_OK, correlation_id);
            out.extend_from_slice(&log_start_offset.to_le_bytes());
            out.extend_from_slice(&log_end_offset.to_le_bytes());
            out.extend_from_slice(&u32::try_from(batches.len()).unwrap_or(u32::MAX).to_le_bytes());
            out.extend_from_slice(batches);
        }
        Response::Topics(topics) => {
            start = begin(out, kind::TOPICS, correlation_id);
            out.extend_from_slice(&(topics.len() as u32).to_le_bytes());
            for t in topics {
                put_str(out, &t.name);
                out.extend_from_slice(&(t.partitions.len() as u32).to_le_bytes());
                for p in &t.partitions {
                    out.extend_from_slice(&p.start_offset.to_le_bytes());
                    out.extend_from_slice(&p.end_offset.to_le_bytes());
                    out.extend_from_slice(&p.size_bytes.to_le_bytes());
                }
            }
        }
        Response::Created => start = begin(out, kind::CREATED, correlation_id),
        Response::Deleted => start = begin(out, kind::DELETED, correlation_id),
        Response::Offset(o) => {
            start = begin(out, kind::OFFSET, correlation_id);
            out.extend_from_slice(&o.to_le_bytes());
        }
        Response::Metadata { partitions } => {
            start = begin(out, kind::METADATA_OK, correlation_id);
            out.extend_from_slice(&partitions.to_le_bytes());
        }
        Response::Altered { before, after } => {
            start = begin(out, kind::ALTERED, correlation_id);
            topic_admin::put_values(out, before);
            topic_admin::put_values(out, after);
        }
        Response::Described(description) => {
            start = begin(out, kind::DESCRIBED, correlation_id);
            topic_admin::put_description(out, description);
        }
        Response::Error { code, message } => {
            start = begin(out, kind::ERROR, correlation_id);
            out.extend_from_slice(&code.code().to_le_bytes());
            put_str(out, message);
        }
    }
    end(out, start);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::topic_admin::{ConsumerOffset, PartitionDetail, Setting, SettingSource};
    use proptest::prelude::*;

    fn topic() -> impl Strategy<Value = String> {
        "[a-z0-9._-]{1,40}"
    }

    fn setting() -> impl Strategy<Value = Setting> {
        prop::sample::select(Setting::ALL.to_vec())
    }

    /// Up to three settings, each at most once.
    fn updates() -> impl Strategy<Value = Vec<SettingUpdate>> {
        (prop::sample::subsequence(Setting::ALL.to_vec(), 0..=3), prop::collection::vec(any::<Option<u64>>(), 3))
            .prop_map(|(settings, values)| {
                settings.into_iter().zip(values).map(|(setting, value)| SettingUpdate { setting, value }).collect()
            })
    }

    fn values() -> impl Strategy<Value = Vec<SettingValue>> {
        let source = prop::sample::select(vec![SettingSource::Default, SettingSource::Topic, SettingSource::Suspended]);
        prop::collection::vec(
            (setting(), source, any::<u64>()).prop_map(|(setting, source, value)| SettingValue {
                setting,
                source,
                value,
            }),
            0..6,
        )
    }

    fn description() -> impl Strategy<Value = TopicDescription> {
        let consumer =
            (topic(), any::<u64>()).prop_map(|(name, committed_offset)| ConsumerOffset { name, committed_offset });
        let partition = (any::<[u64; 3]>(), any::<u32>(), any::<i64>(), prop::collection::vec(consumer, 0..3))
            .prop_map(|([start_offset, end_offset, size_bytes], segments, oldest_segment_ms, consumers)| {
                PartitionDetail { start_offset, end_offset, size_bytes, segments, oldest_segment_ms, consumers }
            });
        (topic(), any::<i64>(), values(), proptest::option::of("[a-z ]{1,30}"), prop::collection::vec(partition, 0..4))
            .prop_map(|(name, created_ms, settings, settings_error, partitions)| TopicDescription {
                name,
                created_ms,
                settings,
                settings_error,
                partitions,
            })
    }

    fn request() -> impl Strategy<Value = (String, u64, u64, Vec<u8>, u32, u16, u16, i64)> {
        (
            topic(),
            any::<u64>(),
            any::<u64>(),
            proptest::collection::vec(any::<u8>(), 0..200),
            any::<u32>(),
            any::<u16>(),
            any::<u16>(),
            any::<i64>(),
        )
    }

    proptest! {
        #[test]
        fn requests_round_trip((t, a, b, bytes, n, v1, v2, ts) in request(), corr in any::<u32>(), updates in updates()) {
            let requests = vec![
                Request::Hello { min_version: v1, max_version: v2, client_name: &t },
                Request::Produce { topic: &t, producer_id: a, sequence: b, batch: &bytes },
                Request::ProducePartition { topic: &t, partition: n, producer_id: a, sequence: b, batch: &bytes },
                Request::Metadata { topic: &t },
                Request::Fetch { topic: &t, partition: n, offset: a, max_bytes: n, max_wait_ms: n / 2 },
                Request::ListTopics,
                Request::CreateTopic { topic: &t, partitions: n, settings: Vec::new() },
                Request::CreateTopic { topic: &t, partitions: n, settings: updates.clone() },
                Request::AlterTopic { topic: &t, settings: updates.clone() },
                Request::DescribeTopic { topic: &t },
                Request::DeleteTopic { topic: &t },
                Request::OffsetForTime { topic: &t, partition: n, timestamp_ms: ts },
            ];
            let mut out = Vec::new();
            for r in &requests {
                encode_request(corr, r, &mut out);
            }
            let mut rest = &out[..];
            for r in &requests {
                let len = check_frame(rest, u32::MAX).unwrap().unwrap();
                let (c, decoded) = decode_request(&rest[..len]).unwrap();
                prop_assert_eq!(c, corr);
                prop_assert_eq!(&decoded, r);
                rest = &rest[len..];
            }
            prop_assert!(rest.is_empty());
        }

        #[test]
        fn responses_round_trip((t, a, b, bytes, n, v1, _v2, _ts) in request(), corr in any::<u32>(), code in 1u16..=16, values in values(), description in description()) {
            let topics = vec![TopicInfo { name: t.clone(), partitions: vec![PartitionInfo { start_offset: a, end_offset: b, size_bytes: u64::from(n) }; (n % 4) as usize] }];
            let responses = vec![
                Response::HelloOk { version: v1, max_frame_bytes: n, server_name: &t },
                Response::ProduceOk(vec![PartitionAck { partition: n, first_offset: a, record_count: n / 3 }; (n % 5) as usize]),
                Response::FetchOk { log_start_offset: a, log_end_offset: b, batches: &bytes },
                Response::Topics(topics),
                Response::Created,
                Response::Deleted,
                Response::Offset(a),
                Response::Metadata { partitions: n },
                Response::Altered { before: values.clone(), after: values.into_iter().rev().collect() },
                Response::Described(description),
                Response::Error { code: ErrorCode::from_code(code).unwrap(), message: &t },
            ];
            for r in &responses {
                let mut out = Vec::new();
                encode_response(corr, r, &mut out);
                let (c, decoded) = decode_response(&out).unwrap();
                prop_assert_eq!(c, corr);
                prop_assert_eq!(&decoded, r);
            }
        }

        #[test]
        fn a_fetch_ok_head_and_its_batches_are_the_whole_frame(corr in any::<u32>(), a in any::<u64>(), b in any::<u64>(), bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let mut whole = Vec::new();
            encode_response(corr, &Response::FetchOk { log_start_offset: a, log_end_offset: b, batches: &bytes }, &mut whole);
            let mut split = Vec::new();
            encode_fetch_ok_head(corr, a, b, bytes.len(), &mut split);
            split.extend_from_slice(&bytes);
            prop_assert_eq!(split, whole);
        }

        #[test]
        fn decoders_never_panic_on_arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = check_frame(&bytes, 1 << 20);
            let _ = decode_request(&bytes);
            let _ = decode_response(&bytes);
        }

        #[test]
        fn decoders_never_panic_behind_a_valid_prefix(kind in any::<u8>(), body in proptest::collection::vec(any::<u8>(), 0..300)) {
            let mut frame = ((body.len() + 6) as u32).to_le_bytes().to_vec();
            frame.push(kind);
            frame.push(0);
            frame.extend_from_slice(&7u32.to_le_bytes());
            frame.extend_from_slice(&body);
            prop_assert_eq!(check_frame(&frame, 1 << 20).unwrap(), Some(frame.len()));
            let _ = decode_request(&frame);
            let _ = decode_response(&frame);
        }
    }

    #[test]
    fn counts_in_responses_never_reserve_more_than_the_frame_holds() {
        // A PRODUCE_OK claiming 65535 acks in a 12-byte body, and TOPICS claiming 4 billion.
        let mut out = Vec::new();
        let start = begin(&mut out, kind::PRODUCE_OK, 1);
        out.extend_from_slice(&u16::MAX.to_le_bytes());
        end(&mut out, start);
        assert_eq!(decode_response(&out), Err(ProtocolError::Truncated("partition")));
        let mut out = Vec::new();
        let start = begin(&mut out, kind::TOPICS, 1);
        out.extend_from_slice(&u32::MAX.to_le_bytes());
        end(&mut out, start);
        assert_eq!(decode_response(&out), Err(ProtocolError::Truncated("topic name")));
    }

    #[test]
    fn create_topic_without_settings_is_the_frame_of_versions_1_and_2() {
        let mut out = Vec::new();
        encode_request(3, &Request::CreateTopic { topic: "t", partitions: 4, settings: Vec::new() }, &mut out);
        let mut v2 = Vec::new();
        let start = begin(&mut v2, kind::CREATE_TOPIC, 3);
        put_str(&mut v2, "t");
        v2.extend_from_slice(&4u32.to_le_bytes());
        end(&mut v2, start);
        assert_eq!(out, v2);
    }

    #[test]
    fn bad_settings_are_named() {
        let frame = |settings: &[u8]| {
            let mut out = Vec::new();
            let start = begin(&mut out, kind::ALTER_TOPIC, 1);
            put_str(&mut out, "t");
            out.extend_from_slice(settings);
            end(&mut out, start);
            out
        };
        let one = |id: u8, action: u8| [&[id, action][..], &5u64.to_le_bytes()].concat();
        let cases: [(Vec<u8>, &str); 4] = [
            ([&[4u8][..], &one(1, 1), &one(2, 1), &one(3, 1), &one(1, 1)].concat(), "more settings"),
            ([&[1u8][..], &one(9, 1)].concat(), "unknown setting"),
            ([&[1u8][..], &one(1, 7)].concat(), "action"),
            ([&[2u8][..], &one(1, 1), &one(1, 0)].concat(), "twice"),
        ];
        for (body, what) in cases {
            let err = decode_request(&frame(&body)).unwrap_err();
            assert!(matches!(err, ProtocolError::BadSetting(m) if m.contains(what)), "{what}: {err}");
        }
        assert_eq!(decode_request(&frame(&[])), Err(ProtocolError::Truncated("setting count")));
        let good = frame(&[&[1u8][..], &one(3, 0)].concat());
        let (_, ok) = decode_request(&good).unwrap();
        assert_eq!(
            ok,
            Request::AlterTopic {
                topic: "t",
                settings: vec![SettingUpdate { setting: Setting::Compression, value: None }]
            }
        );
    }

    #[test]
    fn counts_in_a_description_never_reserve_more_than_the_frame_holds() {
        let mut out = Vec::new();
        let start = begin(&mut out, kind::DESCRIBED, 1);
        put_str(&mut out, "t");
        out.extend_from_slice(&0i64.to_le_bytes());
        out.push(u8::MAX);
        end(&mut out, start);
        assert_eq!(decode_response(&out), Err(ProtocolError::Truncated("setting")));
        let mut out = Vec::new();
        let start = begin(&mut out, kind::DESCRIBED, 1);
        put_str(&mut out, "t");
        out.extend_from_slice(&0i64.to_le_bytes());
        out.push(0);
        put_str(&mut out, "");
        out.extend_from_slice(&u32::MAX.to_le_bytes());
        out.extend_from_slice(&[0; 36]);
        out.extend_from_slice(&u16::MAX.to_le_bytes());
        end(&mut out, start);
        assert_eq!(decode_response(&out), Err(ProtocolError::Truncated("consumer name")));
    }

    #[test]
    fn lengths_are_checked_before_anything_else() {
        assert_eq!(check_frame(&[], 100), Ok(None));
        assert_eq!(check_frame(&[1, 0], 100), Ok(None));
        assert!(matches!(check_frame(&u32::MAX.to_le_bytes(), 1 << 24), Err(ProtocolError::FrameTooLarge { .. })));
        assert!(matches!(check_frame(&5u32.to_le_bytes(), 100), Err(ProtocolError::FrameTooSmall(5))));
        assert_eq!(check_frame(&[20, 0, 0, 0, 1], 100), Ok(None));
    }

    #[test]
    fn bad_frames_are_named() {
        let mut out = Vec::new();
        encode_request(1, &Request::Hello { min_version: 1, max_version: 1, client_name: "x" }, &mut out);
        let mut bad_magic = out.clone();
        bad_magic[10] = b'X';
        assert_eq!(decode_request(&bad_magic), Err(ProtocolError::BadMagic));
        let mut trailing = out.clone();
        trailing[0] += 1;
        trailing.push(0);
        assert_eq!(decode_request(&trailing), Err(ProtocolError::TrailingBytes(1)));
        assert!(matches!(decode_request(&out[..out.len() - 1]), Err(ProtocolError::Truncated(_))));
        let mut unknown = out.clone();
        unknown[4] = 0x42;
        assert_eq!(decode_request(&unknown), Err(ProtocolError::UnknownKind(0x42)));
        let mut bad_utf8 = Vec::new();
        encode_request(1, &Request::DeleteTopic { topic: "ab" }, &mut bad_utf8);
        let n = bad_utf8.len();
        bad_utf8[n - 1] = 0xff;
        assert_eq!(decode_request(&bad_utf8), Err(ProtocolError::BadUtf8("topic")));
    }
}
