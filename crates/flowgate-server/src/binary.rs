//! The binary protocol listener (`docs/protocol.md`).
//!
//! Each connection has a reader and a writer. The reader decodes frames straight from
//! its read buffer (a produce request's batch is validated and appended in place, its
//! base offset patched into the buffer, no copy per event) and queues one reply per
//! request; the writer sends replies in request order, waiting for durability where the
//! config asks for it and coalescing ready replies into one write. The queue is bounded,
//! so a client that does not read its replies stops being read.
//!
//! Memory per connection is bounded whatever the client announces: the read buffer grows
//! only as a frame's bytes arrive, borrowing from the shared ingest budget
//! ([`crate::budget`]) beyond a small base, and shrinks back when the frame is done; a
//! frame must arrive whole within `ingest.frame_timeout_secs` of its first byte; a
//! compressed batch is charged for its inflated size before it is decompressed; and a
//! fetch is read from the log only when the writer is about to send it, straight from
//! its read buffer, so at most one fetch reply per connection is in memory.

use std::sync::Arc;
use std::time::Duration;

use flowgate_core::{BatchHeader, Codec};
use flowgate_log::{LogError, Partition};
use flowgate_protocol::{
    check_frame, decode_request, encode_fetch_ok_head, encode_response, ErrorCode, PartitionAck, PartitionInfo,
    ProtocolError, Request, Response, TopicInfo, MIN_VERSION, VERSION,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::budget::Charge;
use crate::ingest::{Scratch, Written};
use crate::metrics::{IngestPath, Metrics, TopicCounters};
use crate::shared::{warn_bad_input, Shared};
use crate::topic_admin::Op;

/// Requests in flight per connection before the reader stops reading.
const MAX_IN_FLIGHT: usize = 256;
/// Base read buffer (and scratch kept between requests) per connection; more is borrowed
/// from the shared budget for as long as it is needed.
const BASE_BUFFER: usize = 64 * 1024;
/// A read buffer grown past its base for large frames keeps its size (and its charge)
/// while large frames keep coming, and is given back once none has been pending for this
/// long: a producer streaming large batches does not reallocate its buffer per frame,
/// and an idle one holds no budget for long.
const KEEP_LARGE_BUFFER: Duration = Duration::from_millis(250);
/// Fetch replies stay this far below the frame limit.
const FETCH_HEADROOM: usize = 1024;
/// Ready replies are coalesced into one write up to about this size.
const COALESCE_BYTES: usize = 1 << 20;

enum Reply {
    Ready(Vec<u8>),
    Durable {
        correlation_id: u32,
        written: Written,
    },
    /// An answer that vouches for data already in the log (DUPLICATE_SEQUENCE: "stored
    /// before"), sent only once the partition is durable up to `until`, as a PRODUCE_OK
    /// would be: a resend must not be acknowledged ahead of the fsync of its first write.
    DurableError {
        partition: Arc<Partition>,
        until: u64,
        frame: Vec<u8>,
        correlation_id: u32,
    },
    /// A PARTIALLY_STORED answer, sent once the parts it names as stored are durable.
    PartlyStored {
        stored: Written,
        frame: Vec<u8>,
        correlation_id: u32,
    },
    Fetch(FetchReply),
    Close(Vec<u8>),
}

/// A fetch whose reply is read from the log only when it is next to be sent.
struct FetchReply {
    correlation_id: u32,
    partition: Arc<Partition>,
    offset: u64,
    max_bytes: usize,
    /// For a fetch at the log end that may wait: ends when data arrives, the wait is
    /// over, or the engine shuts down.
    wait: Option<JoinHandle<()>>,
}

/// Maps a storage error to the protocol's error code.
pub fn error_code(e: &LogError) -> ErrorCode {
    match e {
        LogError::UnknownTopic(_) => ErrorCode::UnknownTopic,
        LogError::TopicExists(_) => ErrorCode::TopicExists,
        LogError::InvalidTopicName { .. } | LogError::InvalidSetting { .. } | LogError::PartitionLimit { .. } => {
            ErrorCode::InvalidRequest
        }
        LogError::UnknownPartition { .. } => ErrorCode::UnknownPartition,
        LogError::OffsetOutOfRange { .. } => ErrorCode::OffsetOutOfRange,
        LogError::InvalidBatch(_) => ErrorCode::InvalidBatch,
        LogError::DuplicateSequence { .. } => ErrorCode::DuplicateSequence,
        LogError::OutOfOrderSequence { .. } => ErrorCode::OutOfOrderSequence,
        LogError::UnknownProducer { .. } => ErrorCode::UnknownProducer,
        LogError::PartiallyStored { .. } => ErrorCode::PartiallyStored,
        LogError::IdempotentBatchNeedsPartition { .. } => ErrorCode::InvalidRequest,
        LogError::KeyInWrongPartition { .. } => ErrorCode::InvalidBatch,
        LogError::Closed => ErrorCode::ShuttingDown,
        LogError::Io { .. }
        | LogError::BadMetadata { .. }
        | LogError::OrphanTopicDirectory { .. }
        | LogError::OffsetsExhausted => ErrorCode::StorageError,
    }
}

fn error_frame(correlation_id: u32, code: ErrorCode, message: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(64 + message.len());
    encode_response(correlation_id, &Response::Error { code, message }, &mut out);
    out
}

fn response_frame(correlation_id: u32, response: &Response<'_>) -> Vec<u8> {
    let mut out = Vec::new();
    encode_response(correlation_id, response, &mut out);
    out
}

/// The frame of `response`, or `FRAME_TOO_LARGE` naming the HTTP `route` that answers
/// the same when it is over the frame limit.
fn fitting(correlation_id: u32, response: &Response<'_>, max_frame_bytes: u32, what: &str, route: &str) -> Reply {
    let frame = response_frame(correlation_id, response);
    if frame.len() > max_frame_bytes as usize {
        let message = format!("{what} is over max_frame_bytes; read it over HTTP ({route})");
        return Reply::Ready(error_frame(correlation_id, ErrorCode::FrameTooLarge, &message));
    }
    Reply::Ready(frame)
}

fn produce_ok(correlation_id: u32, written: &Written) -> Vec<u8> {
    let acks = written
        .acks()
        .into_iter()
        .map(|a| PartitionAck { partition: a.partition, first_offset: a.first_offset, record_count: a.record_count })
        .collect();
    response_frame(correlation_id, &Response::ProduceOk(acks))
}

/// Tells a client it was refused for lack of connection slots, then drops it.
pub async fn refuse(mut stream: TcpStream) {
    let bytes = error_frame(0, ErrorCode::ShuttingDown, "too many connections; retry later");
    let _ = tokio::time::timeout(Duration::from_secs(1), stream.write_all(&bytes)).await;
}

/// Serves one binary-protocol connection.
pub async fn serve_connection(stream: TcpStream, shared: Arc<Shared>) {
    let _ = stream.set_nodelay(true);
    let peer = stream.peer_addr().map(|a| a.to_string()).unwrap_or_default();
    let (read_half, write_half) = stream.into_split();
    let (tx, rx) = mpsc::channel(MAX_IN_FLIGHT);
    let metrics = shared.ingest.metrics().clone();
    let writer = tokio::spawn(write_replies(write_half, rx, shared.idle_timeout(), metrics));
    read_requests(read_half, tx, &shared, &peer).await;
    let _ = writer.await;
}

/// Writes `bytes`, giving up on a client that does not read for `timeout`.
async fn send(out: &mut OwnedWriteHalf, bytes: &[u8], timeout: Duration, metrics: &Metrics) -> bool {
    match tokio::time::timeout(timeout, out.write_all(bytes)).await {
        Ok(Ok(())) => true,
        Ok(Err(_)) => false,
        Err(_) => {
            metrics.rejected(IngestPath::Binary, "write_timeout", 1);
            false
        }
    }
}

async fn write_replies(
    mut out: OwnedWriteHalf,
    mut rx: mpsc::Receiver<Reply>,
    timeout: Duration,
    metrics: Arc<Metrics>,
) {
    let mut buf: Vec<u8> = Vec::with_capacity(BASE_BUFFER);
    let mut closing = false;
    while let Some(first) = rx.recv().await {
        let mut next = Some(first);
        while let Some(reply) = next.take() {
            match reply {
                Reply::Ready(bytes) => buf.extend_from_slice(&bytes),
                Reply::Durable { correlation_id, written } => match written.durable().await {
                    Ok(()) => buf.extend_from_slice(&produce_ok(correlation_id, &written)),
                    Err(e) => buf.extend_from_slice(&error_frame(correlation_id, error_code(&e), &e.to_string())),
                },
                Reply::DurableError { partition, until, frame, correlation_id } => {
                    match partition.wait_durable(until).await {
                        Ok(()) => buf.extend_from_slice(&frame),
                        Err(e) => buf.extend_from_slice(&error_frame(correlation_id, error_code(&e), &e.to_string())),
                    }
                }
                Reply::PartlyStored { stored, frame, correlation_id } => match stored.durable().await {
                    Ok(()) => buf.extend_from_slice(&frame),
                    Err(e) => buf.extend_from_slice(&error_frame(correlation_id, error_code(&e), &e.to_string())),
                },
                Reply::Fetch(fetch) => {
                    if let Some(wait) = fetch.wait {
                        let _ = wait.await;
                    }
                    match fetch.partition.read(fetch.offset, fetch.max_bytes) {
                        Ok(read) => {
                            // The head joins the queued replies; the batches go out from
                            // the buffer they were read into.
                            encode_fetch_ok_head(
                                fetch.correlation_id,
                                read.log_start_offset,
                                read.log_end_offset,
                                read.batches.len(),
                                &mut buf,
                            );
                            if !send(&mut out, &buf, timeout, &metrics).await
                                || !send(&mut out, &read.batches, timeout, &metrics).await
                            {
                                return;
                            }
                            buf.clear();
                        }
                        Err(e) => {
                            buf.extend_from_slice(&error_frame(fetch.correlation_id, error_code(&e), &e.to_string()))
                        }
                    }
                }
                Reply::Close(bytes) => {
                    buf.extend_from_slice(&bytes);
                    closing = true;
                    break;
                }
            }
            if buf.len() < COALESCE_BYTES {
                next = rx.try_recv().ok();
            }
        }
        if !buf.is_empty() && !send(&mut out, &buf, timeout, &metrics).await {
            return;
        }
        buf.clear();
        buf.shrink_to(BASE_BUFFER);
        if closing {
            break;
        }
    }
    let _ = out.shutdown().await;
}

struct Connection<'a> {
    shared: &'a Arc<Shared>,
    peer: &'a str,
    handshaken: bool,
    version: u16,
    scratch: Scratch,
    counters: Vec<(String, TopicCounters)>,
    /// Budget borrowed for the read buffer beyond its base, plus, while a request is
    /// handled, for the memory it needs (decompression, splitting).
    charge: Charge,
}

impl Connection<'_> {
    fn counters(&mut self, topic: &str) -> &TopicCounters {
        if let Some(i) = self.counters.iter().position(|(t, _)| t == topic) {
            return &self.counters[i].1;
        }
        let c = self.shared.ingest.metrics().topic_counters(topic, IngestPath::Binary);
        self.counters.push((topic.to_owned(), c));
        &self.counters.last().expect("just pushed").1
    }

    fn reject(&self, reason: &str, what: &str) {
        self.shared.ingest.metrics().rejected(IngestPath::Binary, reason, 1);
        warn_bad_input(self.shared, "binary", self.peer, what);
    }

    /// Handles one complete frame; returns the reply to queue.
    async fn handle(&mut self, frame: &mut [u8]) -> Reply {
        let (correlation_id, request) = match decode_request(frame) {
            Ok(r) => r,
            Err(e) => {
                self.reject("malformed_frame", &e.to_string());
                return Reply::Close(error_frame(0, e.error_code(), &e.to_string()));
            }
        };
        if !self.handshaken {
            return match request {
                Request::Hello { min_version, max_version, .. }
                    if min_version <= VERSION && MIN_VERSION <= max_version && min_version <= max_version =>
                {
                    self.handshaken = true;
                    self.version = max_version.min(VERSION);
                    Reply::Ready(frame_hello(correlation_id, self.version, self.shared.config.max_frame_bytes))
                }
                Request::Hello { .. } => {
                    self.reject("unsupported_version", "no common protocol version");
                    Reply::Close(error_frame(
                        correlation_id,
                        ErrorCode::UnsupportedVersion,
                        "this server speaks protocol versions 1 to 3",
                    ))
                }
                _ => {
                    self.reject("no_handshake", "first frame was not HELLO");
                    Reply::Close(error_frame(correlation_id, ErrorCode::UnsupportedVersion, "send HELLO first"))
                }
            };
        }
        let shared = self.shared;
        let ingest = &shared.ingest;
        let log_error = |e: LogError| Reply::Ready(error_frame(correlation_id, error_code(&e), &e.to_string()));
        let refused = |op: Op, e: LogError| {
            crate::topic_admin::count_rejection(shared, op, &e);
            log_error(e)
        };
        if self.version < 2 && matches!(request, Request::ProducePartition { .. } | Request::Metadata { .. }) {
            return Reply::Ready(error_frame(
                correlation_id,
                ErrorCode::InvalidRequest,
                "PRODUCE_PARTITION and METADATA need protocol version 2; say so in HELLO",
            ));
        }
        let topic_admin = match &request {
            Request::CreateTopic { settings, .. } if !settings.is_empty() => Some(Op::Create),
            Request::AlterTopic { .. } => Some(Op::Alter),
            Request::DescribeTopic { .. } => Some(Op::Describe),
            _ => None,
        };
        if let Some(op) = topic_admin.filter(|_| self.version < 3) {
            shared.ingest.metrics().topic_api_rejected(op, "protocol_version");
            return Reply::Ready(error_frame(
                correlation_id,
                ErrorCode::InvalidRequest,
                "topic settings, ALTER_TOPIC and DESCRIBE_TOPIC need protocol version 3; say so in HELLO",
            ));
        }
        match request {
            Request::Hello { .. } => {
                Reply::Ready(error_frame(correlation_id, ErrorCode::InvalidRequest, "HELLO was already sent"))
            }
            Request::Produce { topic, producer_id, sequence, batch } => {
                let (topic, batch) = (topic.to_owned(), batch_range(frame, batch));
                self.produce(correlation_id, &topic, None, producer_id, sequence, &mut frame[batch]).await
            }
            Request::ProducePartition { topic, partition, producer_id, sequence, batch } => {
                let (topic, batch) = (topic.to_owned(), batch_range(frame, batch));
                self.produce(correlation_id, &topic, Some(partition), producer_id, sequence, &mut frame[batch]).await
            }
            // The engine's own topics have metadata (consumers read them), but only
            // `topic` creates topics.
            Request::Metadata { topic } => match ingest.log().topic(topic).map_or_else(|| ingest.topic(topic), Ok) {
                Ok(t) => Reply::Ready(response_frame(
                    correlation_id,
                    &Response::Metadata { partitions: t.partition_count() },
                )),
                Err(e) => log_error(e),
            },
            Request::Fetch { topic, partition, offset, max_bytes, max_wait_ms } => {
                let partition = match ingest.log().topic(topic) {
                    Some(t) => match t.partition(partition) {
                        Ok(p) => p.clone(),
                        Err(e) => return log_error(e),
                    },
                    None => return log_error(LogError::UnknownTopic(topic.to_owned())),
                };
                let limit = (shared.config.max_frame_bytes as usize).saturating_sub(FETCH_HEADROOM);
                let max_bytes = (max_bytes as usize).clamp(1, limit);
                let wait = (max_wait_ms > 0 && offset >= partition.end_offset()).then(|| {
                    let wait = Duration::from_millis(u64::from(max_wait_ms).min(60_000));
                    let shutdown = shared.shutdown.clone();
                    let partition = partition.clone();
                    tokio::spawn(async move {
                        tokio::select! {
                            _ = partition.wait_for_data(offset, wait) => {}
                            _ = shutdown.cancelled() => {}
                        }
                    })
                });
                Reply::Fetch(FetchReply { correlation_id, partition, offset, max_bytes, wait })
            }
            Request::ListTopics => {
                let topics = ingest
                    .log()
                    .topic_infos()
                    .into_iter()
                    .map(|t| TopicInfo {
                        name: t.name,
                        partitions: t
                            .partitions
                            .iter()
                            .map(|p| PartitionInfo {
                                start_offset: p.start_offset,
                                end_offset: p.end_offset,
                                size_bytes: p.size_bytes,
                            })
                            .collect(),
                    })
                    .collect();
                // Bounded by log.max_partitions, but it must also fit one frame.
                let response = Response::Topics(topics);
                fitting(correlation_id, &response, shared.config.max_frame_bytes, "the topic list", "GET /v1/topics")
            }
            Request::CreateTopic { topic, partitions, settings } => {
                match crate::topic_admin::create(shared, topic, Some(partitions), &settings).await {
                    Ok(()) => Reply::Ready(response_frame(correlation_id, &Response::Created)),
                    Err(e) => refused(Op::Create, e),
                }
            }
            Request::AlterTopic { topic, settings } => {
                match crate::topic_admin::alter(shared, topic, &settings).await {
                    Ok((before, after)) => {
                        Reply::Ready(response_frame(correlation_id, &Response::Altered { before, after }))
                    }
                    Err(e) => refused(Op::Alter, e),
                }
            }
            Request::DescribeTopic { topic } => match crate::topic_admin::describe(shared, topic) {
                Ok(description) => {
                    let response = Response::Described(description);
                    let max = shared.config.max_frame_bytes;
                    fitting(correlation_id, &response, max, "the description", "GET /v1/topics/{topic}")
                }
                Err(e) => refused(Op::Describe, e),
            },
            Request::DeleteTopic { topic } => match ingest.log().delete_topic(topic) {
                Ok(()) => Reply::Ready(response_frame(correlation_id, &Response::Deleted)),
                Err(e) => log_error(e),
            },
            Request::OffsetForTime { topic, partition, timestamp_ms } => {
                let result = ingest
                    .log()
                    .topic(topic)
                    .ok_or_else(|| LogError::UnknownTopic(topic.to_owned()))
                    .and_then(|t| t.partition(partition)?.offset_for_timestamp(timestamp_ms));
                match result {
                    Ok(offset) => {
                        Reply::Ready(response_frame(correlation_id, &Response::Offset(offset.unwrap_or(u64::MAX))))
                    }
                    Err(e) => log_error(e),
                }
            }
        }
    }

    /// Validates, charges and appends one produced batch: PRODUCE (`partition` None:
    /// split by key) and PRODUCE_PARTITION.
    async fn produce(
        &mut self,
        correlation_id: u32,
        topic_name: &str,
        partition: Option<u32>,
        producer_id: u64,
        sequence: u64,
        batch: &mut [u8],
    ) -> Reply {
        let shared = self.shared;
        let ingest = &shared.ingest;
        let error = |code: ErrorCode, message: &str| Reply::Ready(error_frame(correlation_id, code, message));
        if crate::memory::should_refuse(shared) {
            ingest.metrics().rejected(IngestPath::Binary, "memory_pressure", 1);
            return error(ErrorCode::Busy, crate::memory::REFUSED);
        }
        let topic = match ingest.topic(topic_name) {
            Ok(t) => t,
            Err(e) => return error(error_code(&e), &e.to_string()),
        };
        // Memory the append needs beyond the frame itself, charged before it is allocated.
        let mut working = 0usize;
        if let Ok(h) = BatchHeader::parse(batch) {
            if h.producer.producer_id != producer_id || h.producer.sequence != sequence {
                self.reject("invalid_batch", "producer id or sequence differ between request and batch");
                return error(
                    ErrorCode::InvalidRequest,
                    "the batch header's producer id and sequence must equal the request's",
                );
            }
            let inflated = h.records_length as usize;
            let codec = h.codec().unwrap_or(Codec::None);
            let limit = shared.config.max_uncompressed_batch_bytes;
            if codec != Codec::None && inflated > limit {
                let message = format!(
                    "the batch's records inflate to {inflated} bytes, over this server's limit of {limit} \
                     (ingest.max_uncompressed_batch_bytes); send smaller batches"
                );
                self.reject("uncompressed_too_large", &message);
                return error(ErrorCode::FrameTooLarge, &message);
            }
            // A header that claims more than its bytes can inflate to is refused by the
            // decoder before it allocates; there is nothing to charge for it.
            let compressed = batch.len().saturating_sub(flowgate_core::batch::HEADER_LEN);
            if codec != Codec::None && inflated <= codec.max_inflated_len(compressed) {
                working = inflated;
            }
            if partition.is_none() && topic.partition_count() > 1 {
                // Splitting by partition re-encodes the records: builders (which grow by
                // doubling) and one sub-batch, and with a codec its scratch and the output
                // reserved before compressing (PRODUCE_PARTITION names its partition and
                // is never split).
                let copies = if codec == Codec::None { 3 } else { 5 };
                working = working.saturating_add(inflated.saturating_mul(copies));
            }
        }
        let held = self.charge.held();
        if working > 0 {
            // Never fits: the frame's own buffer and the working memory exceed the budget.
            let needed = working.saturating_add(batch.len().saturating_sub(BASE_BUFFER));
            if needed > self.charge.total() {
                let message = format!(
                    "this batch needs {needed} bytes of buffers, more than the server may buffer in all ({} bytes, \
                     ingest.max_buffered_bytes); send smaller batches",
                    self.charge.total()
                );
                self.reject("over_budget", &message);
                return error(ErrorCode::FrameTooLarge, &message);
            }
            let wait = self.charge.grow_to(held.saturating_add(working));
            match tokio::time::timeout(shared.frame_timeout(), wait).await {
                Ok(Ok(())) => {}
                // It fits, but not next to a read buffer this connection grew for earlier,
                // larger frames; that buffer is given back soon.
                Ok(Err(_)) | Err(_) => {
                    self.reject("busy", "ingest buffers stayed full for ingest.frame_timeout_secs");
                    return error(ErrorCode::Busy, "the server's ingest buffers are full; retry later");
                }
            }
        }
        let payload_bytes = batch.len() as u64;
        let result = match partition {
            None => ingest.append_client_batch(&topic, batch, &mut self.scratch),
            Some(p) => ingest.append_to_partition(&topic, p, batch, &mut self.scratch),
        };
        self.scratch.shrink_to(BASE_BUFFER);
        self.charge.shrink_to(held);
        match result {
            Ok(written) => {
                self.counters(topic_name).accepted(written.events(), payload_bytes);
                if written.needs_wait() {
                    Reply::Durable { correlation_id, written }
                } else {
                    Reply::Ready(produce_ok(correlation_id, &written))
                }
            }
            Err(e) => {
                match &e {
                    LogError::InvalidBatch(_) | LogError::KeyInWrongPartition { .. } => {
                        self.reject("invalid_batch", &e.to_string())
                    }
                    LogError::OutOfOrderSequence { .. } | LogError::UnknownProducer { .. } => {
                        self.shared.ingest.metrics().rejected(IngestPath::Binary, "out_of_order_sequence", 1)
                    }
                    LogError::DuplicateSequence { .. } => {
                        if let Some(p) = partition.and_then(|p| topic.partition(p).ok()) {
                            let until = p.end_offset();
                            return Reply::DurableError {
                                partition: p.clone(),
                                until,
                                frame: error_frame(correlation_id, error_code(&e), &e.to_string()),
                                correlation_id,
                            };
                        }
                    }
                    LogError::PartiallyStored { .. } => {
                        let frame = error_frame(correlation_id, error_code(&e), &e.to_string());
                        if let LogError::PartiallyStored { stored, .. } = e {
                            let total =
                                BatchHeader::parse(batch).map_or(stored.events(), |h| u64::from(h.record_count));
                            self.counters(topic_name).accepted_part(stored.events(), total, payload_bytes);
                            return Reply::PartlyStored { stored, frame, correlation_id };
                        }
                    }
                    _ => {}
                }
                error(error_code(&e), &e.to_string())
            }
        }
    }
}

/// Where a request's batch (a sub-slice of the frame) lies, so it can be borrowed mutably.
fn batch_range(frame: &[u8], batch: &[u8]) -> std::ops::Range<usize> {
    let start = batch.as_ptr() as usize - frame.as_ptr() as usize;
    start..start + batch.len()
}

fn frame_hello(correlation_id: u32, version: u16, max_frame_bytes: u32) -> Vec<u8> {
    let name = concat!("flowgate ", env!("CARGO_PKG_VERSION"));
    response_frame(correlation_id, &Response::HelloOk { version, max_frame_bytes, server_name: name })
}

/// The total length of the partial frame at the start of `buf`, once its prefix is there.
fn announced_len(buf: &[u8]) -> usize {
    buf.get(..4).map_or(0, |p| (u32::from_le_bytes(p.try_into().expect("4 bytes")) as usize).saturating_add(4))
}

async fn read_requests(mut input: OwnedReadHalf, tx: mpsc::Sender<Reply>, shared: &Arc<Shared>, peer: &str) {
    let mut conn = Connection {
        shared,
        peer,
        handshaken: false,
        version: 1,
        scratch: Scratch::default(),
        counters: Vec::new(),
        charge: shared.charge(),
    };
    let max_frame = shared.config.max_frame_bytes;
    let idle = shared.idle_timeout();
    let frame_timeout = shared.frame_timeout();
    let mut buf: Vec<u8> = Vec::with_capacity(BASE_BUFFER);
    // When the frame now at the start of `buf` must be complete; `None` while `buf` is empty.
    let mut frame_deadline: Option<Instant> = None;
    // When the last read completed: every byte in `buf` had arrived by then.
    let mut read_at = Instant::now();
    // Until when a buffer grown for large frames is kept.
    let mut keep_large_until = read_at;
    loop {
        let mut consumed = 0;
        loop {
            match check_frame(&buf[consumed..], max_frame) {
                Ok(Some(len)) => {
                    let frame = &mut buf[consumed..consumed + len];
                    consumed += len;
                    let reply = conn.handle(frame).await;
                    let closing = matches!(reply, Reply::Close(_));
                    if tx.send(reply).await.is_err() || closing {
                        return;
                    }
                    // The next frame began to arrive by the last read, if not before.
                    frame_deadline = Some(read_at + frame_timeout);
                }
                Ok(None) => break,
                Err(e) => {
                    let reason = match e {
                        ProtocolError::FrameTooLarge { .. } => "frame_too_large",
                        _ => "malformed_frame",
                    };
                    conn.reject(reason, &e.to_string());
                    let _ = tx.send(Reply::Close(error_frame(0, e.error_code(), &e.to_string()))).await;
                    return;
                }
            }
        }
        buf.drain(..consumed);
        if buf.is_empty() {
            frame_deadline = None;
        }
        // Size the buffer for what has arrived: double it (borrowing from the budget)
        // only once it is full and the frame needs more; give it back once no large
        // frame has been pending for a while.
        let need = announced_len(&buf);
        let capacity = buf.capacity();
        if need > BASE_BUFFER {
            keep_large_until = read_at + KEEP_LARGE_BUFFER;
        }
        if need > capacity && buf.len() == capacity {
            let target = need.min(capacity.saturating_mul(2).max(BASE_BUFFER));
            let grow = conn.charge.grow_to(target - BASE_BUFFER);
            let deadline = frame_deadline.unwrap_or_else(|| Instant::now() + frame_timeout);
            let granted = tokio::select! {
                g = tokio::time::timeout_at(deadline, grow) => g,
                _ = shared.shutdown.cancelled() => return,
            };
            match granted {
                Ok(Ok(())) => buf.reserve_exact(target - buf.len()),
                Ok(Err(over)) => {
                    // Cannot happen while max_buffered_bytes >= max_frame_bytes (checked
                    // at load); refuse rather than wait forever.
                    conn.reject("frame_too_large", &over.to_string());
                    let _ = tx.send(Reply::Close(error_frame(0, ErrorCode::FrameTooLarge, &over.to_string()))).await;
                    return;
                }
                Err(_) => {
                    conn.reject("frame_timeout", "a frame did not arrive whole within ingest.frame_timeout_secs");
                    return;
                }
            }
        } else if need <= BASE_BUFFER && capacity > BASE_BUFFER && Instant::now() >= keep_large_until {
            buf.shrink_to(BASE_BUFFER);
            conn.charge.shrink_to(buf.capacity().saturating_sub(BASE_BUFFER));
        }
        if crate::memory::should_pause(shared) && crate::memory::may_pause(shared, conn.charge.held()) {
            // Memory pressure: stop reading (the client's sends back up in TCP), giving
            // back first a large buffer the bytes in it do not need.
            if buf.len() < BASE_BUFFER && buf.capacity() > BASE_BUFFER {
                buf.shrink_to(BASE_BUFFER);
                conn.charge.shrink_to(buf.capacity().saturating_sub(BASE_BUFFER));
            }
            let paused = crate::memory::pause_while_pressed(shared, IngestPath::Binary).await;
            if shared.shutdown.is_cancelled() {
                return;
            }
            // Time the server spent not reading is not the client's to make up.
            frame_deadline = frame_deadline.map(|d| d + paused);
        }
        debug_assert!(buf.capacity() > buf.len(), "a read always has room, so Vec never grows on its own");
        // A connection that sends nothing for the idle timeout is closed; inside a frame,
        // the frame's own deadline, which no trickle of bytes moves, applies as well.
        let idle_deadline = Instant::now() + idle;
        let frame_expires = frame_deadline.filter(|d| *d < idle_deadline);
        let cut_at = frame_expires.unwrap_or(idle_deadline);
        // A large buffer with no large frame pending is given back when its time is up,
        // even if nothing more arrives (`read_buf` is cancel safe: nothing is lost).
        let shrink_at = (buf.capacity() > BASE_BUFFER && announced_len(&buf) <= BASE_BUFFER)
            .then_some(keep_large_until)
            .filter(|at| *at < cut_at);
        let read = tokio::select! {
            r = tokio::time::timeout_at(shrink_at.unwrap_or(cut_at), input.read_buf(&mut buf)) => r,
            _ = shared.shutdown.cancelled() => return,
            _ = tx.closed() => return,
        };
        if read.is_err() && shrink_at.is_some() {
            continue;
        }
        read_at = Instant::now();
        match read {
            Err(_) if frame_expires.is_some() => {
                conn.reject("frame_timeout", "a frame did not arrive whole within ingest.frame_timeout_secs");
                return;
            }
            Err(_) => {
                conn.reject("idle_timeout", "connection idle too long");
                return;
            }
            Ok(Err(_)) => return,
            Ok(Ok(0)) => {
                if !buf.is_empty() {
                    conn.reject("truncated_frame", "connection closed in the middle of a frame");
                }
                return;
            }
            Ok(Ok(_)) => {
                if frame_deadline.is_none() {
                    frame_deadline = Some(read_at + frame_timeout);
                }
            }
        }
    }
}
