//! The binary protocol listener (`docs/protocol.md`).
//!
//! Each connection has a reader and a writer. The reader decodes frames straight from
//! its read buffer (a produce request's batch is validated and appended in place, its
//! base offset patched into the buffer, no copy per event) and queues one reply per
//! request; the writer sends replies in request order, waiting for durability where the
//! config asks for it and coalescing ready replies into one write. The queue is bounded,
//! so a client that does not read its replies stops being read.

use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use flowgate_log::LogError;
use flowgate_protocol::{
    check_frame, decode_request, encode_response, ErrorCode, PartitionAck, PartitionInfo, ProtocolError, Request,
    Response, TopicInfo, MIN_VERSION, VERSION,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::OwnedWriteHalf;
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::ingest::{Scratch, Written};
use crate::metrics::{IngestPath, TopicCounters};
use crate::shared::{warn_bad_input, Shared};

/// Requests in flight per connection before the reader stops reading.
const MAX_IN_FLIGHT: usize = 256;
/// Base read buffer per connection; larger frames borrow from the shared budget.
const BASE_BUFFER: usize = 64 * 1024;
/// Fetch replies stay this far below the frame limit.
const FETCH_HEADROOM: usize = 1024;

enum Reply {
    Ready(Vec<u8>),
    Durable { correlation_id: u32, written: Written },
    Later(JoinHandle<Vec<u8>>),
    Close(Vec<u8>),
}

/// Maps a storage error to the protocol's error code.
pub fn error_code(e: &LogError) -> ErrorCode {
    match e {
        LogError::UnknownTopic(_) => ErrorCode::UnknownTopic,
        LogError::TopicExists(_) => ErrorCode::TopicExists,
        LogError::InvalidTopicName { .. } => ErrorCode::InvalidRequest,
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
    let writer = tokio::spawn(write_replies(write_half, rx));
    read_requests(read_half, tx, &shared, &peer).await;
    let _ = writer.await;
}

async fn write_replies(mut out: OwnedWriteHalf, mut rx: mpsc::Receiver<Reply>) {
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
                Reply::Later(handle) => buf.extend_from_slice(&handle.await.unwrap_or_default()),
                Reply::Close(bytes) => {
                    buf.extend_from_slice(&bytes);
                    closing = true;
                    break;
                }
            }
            if buf.len() < 1 << 20 {
                next = rx.try_recv().ok();
            }
        }
        if out.write_all(&buf).await.is_err() {
            return;
        }
        buf.clear();
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
    fn handle(&mut self, frame: &mut BytesMut) -> Reply {
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
                        "this server speaks protocol versions 1 to 2",
                    ))
                }
                _ => {
                    self.reject("no_handshake", "first frame was not HELLO");
                    Reply::Close(error_frame(correlation_id, ErrorCode::UnsupportedVersion, "send HELLO first"))
                }
            };
        }
        let ingest = &self.shared.ingest;
        let log_error = |e: LogError| Reply::Ready(error_frame(correlation_id, error_code(&e), &e.to_string()));
        if self.version < 2 && matches!(request, Request::ProducePartition { .. } | Request::Metadata { .. }) {
            return Reply::Ready(error_frame(
                correlation_id,
                ErrorCode::InvalidRequest,
                "PRODUCE_PARTITION and METADATA need protocol version 2; say so in HELLO",
            ));
        }
        match request {
            Request::Hello { .. } => {
                Reply::Ready(error_frame(correlation_id, ErrorCode::InvalidRequest, "HELLO was already sent"))
            }
            Request::Produce { topic, producer_id, sequence, batch } => {
                let (topic, batch) = (topic.to_owned(), batch_range(frame, batch));
                self.produce(frame, correlation_id, &topic, None, producer_id, sequence, batch)
            }
            Request::ProducePartition { topic, partition, producer_id, sequence, batch } => {
                let (topic, batch) = (topic.to_owned(), batch_range(frame, batch));
                self.produce(frame, correlation_id, &topic, Some(partition), producer_id, sequence, batch)
            }
            Request::Metadata { topic } => match ingest.topic(topic) {
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
                let limit = (self.shared.config.max_frame_bytes as usize).saturating_sub(FETCH_HEADROOM);
                let max_bytes = (max_bytes as usize).clamp(1, limit);
                let read = move |p: &flowgate_log::Partition| match p.read(offset, max_bytes) {
                    Ok(r) => response_frame(
                        correlation_id,
                        &Response::FetchOk {
                            log_start_offset: r.log_start_offset,
                            log_end_offset: r.log_end_offset,
                            batches: &r.batches,
                        },
                    ),
                    Err(e) => error_frame(correlation_id, error_code(&e), &e.to_string()),
                };
                if max_wait_ms > 0 && offset >= partition.end_offset() {
                    let wait = Duration::from_millis(u64::from(max_wait_ms).min(60_000));
                    let shutdown = self.shared.shutdown.clone();
                    Reply::Later(tokio::spawn(async move {
                        tokio::select! {
                            _ = partition.wait_for_data(offset, wait) => {}
                            _ = shutdown.cancelled() => {}
                        }
                        read(&partition)
                    }))
                } else {
                    Reply::Ready(read(&partition))
                }
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
                Reply::Ready(response_frame(correlation_id, &Response::Topics(topics)))
            }
            Request::CreateTopic { topic, partitions } => match ingest.log().create_topic(topic, partitions) {
                Ok(_) => Reply::Ready(response_frame(correlation_id, &Response::Created)),
                Err(e) => log_error(e),
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
}

impl Connection<'_> {
    /// PRODUCE (`partition` None: split by key) and PRODUCE_PARTITION.
    #[allow(clippy::too_many_arguments)]
    fn produce(
        &mut self,
        frame: &mut BytesMut,
        correlation_id: u32,
        topic: &str,
        partition: Option<u32>,
        producer_id: u64,
        sequence: u64,
        batch: std::ops::Range<usize>,
    ) -> Reply {
        let ingest = &self.shared.ingest;
        let log_error = |e: LogError| Reply::Ready(error_frame(correlation_id, error_code(&e), &e.to_string()));
        let topic_name = topic;
        let (start, end) = (batch.start, batch.end);
        let topic = match ingest.topic(topic_name) {
            Ok(t) => t,
            Err(e) => return log_error(e),
        };
        let header = flowgate_core::BatchHeader::parse(&frame[start..end]);
        if let Ok(h) = &header {
            if h.producer.producer_id != producer_id || h.producer.sequence != sequence {
                self.reject("invalid_batch", "producer id or sequence differ between request and batch");
                return Reply::Ready(error_frame(
                    correlation_id,
                    ErrorCode::InvalidRequest,
                    "the batch header's producer id and sequence must equal the request's",
                ));
            }
        }
        let payload_bytes = (end - start) as u64;
        let result = match partition {
            None => ingest.append_client_batch(&topic, &mut frame[start..end], &mut self.scratch),
            Some(p) => ingest.append_to_partition(&topic, p, &mut frame[start..end], &mut self.scratch),
        };
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
                    _ => {}
                }
                log_error(e)
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

/// Ingest-buffer budget held by one connection, shown in the buffered-bytes gauge for
/// exactly as long as it is held, however the connection ends.
struct BudgetHold {
    permit: tokio::sync::OwnedSemaphorePermit,
    gauge: prometheus_client::metrics::gauge::Gauge,
}

impl BudgetHold {
    fn new(permit: tokio::sync::OwnedSemaphorePermit, gauge: prometheus_client::metrics::gauge::Gauge) -> BudgetHold {
        gauge.inc_by(permit.num_permits() as i64);
        BudgetHold { permit, gauge }
    }
}

impl Drop for BudgetHold {
    fn drop(&mut self) {
        self.gauge.dec_by(self.permit.num_permits() as i64);
    }
}

async fn read_requests(
    mut input: tokio::net::tcp::OwnedReadHalf,
    tx: mpsc::Sender<Reply>,
    shared: &Arc<Shared>,
    peer: &str,
) {
    let mut conn =
        Connection { shared, peer, handshaken: false, version: 1, scratch: Scratch::default(), counters: Vec::new() };
    let max_frame = shared.config.max_frame_bytes;
    let idle = shared.idle_timeout();
    let metrics = shared.ingest.metrics().clone();
    let mut buf = BytesMut::with_capacity(BASE_BUFFER);
    // Budget held for a frame larger than the base buffer while it is being read.
    let mut budget: Option<BudgetHold> = None;
    loop {
        loop {
            match check_frame(&buf, max_frame) {
                Ok(Some(len)) => {
                    let mut frame = buf.split_to(len);
                    let reply = conn.handle(&mut frame);
                    budget = None;
                    let closing = matches!(reply, Reply::Close(_));
                    if tx.send(reply).await.is_err() || closing {
                        return;
                    }
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
        // A partial frame whose length is known: make room for all of it, borrowing
        // from the shared budget when it is large (this is the backpressure point).
        if buf.len() >= 4 {
            let need = u32::from_le_bytes(buf[0..4].try_into().expect("4 bytes")) as usize + 4;
            if need > BASE_BUFFER && budget.is_none() {
                let acquire = shared.buffer_budget.clone().acquire_many_owned(need as u32);
                let permit = tokio::select! {
                    p = acquire => p,
                    _ = shared.shutdown.cancelled() => return,
                };
                let Ok(permit) = permit else { return };
                budget = Some(BudgetHold::new(permit, metrics.buffered_bytes().clone()));
            }
            buf.reserve(need.saturating_sub(buf.len()));
        } else {
            buf.reserve(BASE_BUFFER);
        }
        let read = tokio::select! {
            r = tokio::time::timeout(idle, input.read_buf(&mut buf)) => r,
            _ = shared.shutdown.cancelled() => return,
        };
        match read {
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
            Ok(Ok(_)) => {}
        }
    }
}
