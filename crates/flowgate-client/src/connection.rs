//! One pipelined connection.
//!
//! A writer task coalesces queued frames into one write; a reader task matches replies
//! to requests. The server answers in request order, so pending requests form a FIFO;
//! the correlation id is checked against it, and any mismatch fails the connection.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use flowgate_protocol::{
    check_frame, decode_response, encode_request, PartitionAck, Request, Response, SettingUpdate, SettingValue,
    TopicDescription, TopicInfo, VERSION,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot, Mutex, Semaphore};

use crate::error::ClientError;

/// Requests in flight per connection.
const MAX_IN_FLIGHT: usize = 256;
/// The oldest protocol version this client speaks: the idempotent producer needs
/// PRODUCE_PARTITION and METADATA.
const MIN_VERSION: u16 = 2;
/// The protocol version topic settings, ALTER_TOPIC and DESCRIBE_TOPIC need.
const TOPIC_SETTINGS_VERSION: u16 = 3;

/// Batches read by a fetch.
#[derive(Clone, Debug)]
pub struct FetchResult {
    /// First offset the partition holds.
    pub log_start_offset: u64,
    /// Offset the next record will get.
    pub log_end_offset: u64,
    /// Whole batches; the first holds the requested offset. Parse with
    /// `flowgate_core::BatchView` and skip records below the requested offset.
    pub batches: Bytes,
}

enum Reply {
    Produced(Vec<PartitionAck>),
    Fetched(FetchResult),
    Topics(Vec<TopicInfo>),
    Done,
    Offset(u64),
    HelloOk { version: u16, max_frame_bytes: u32 },
    Metadata(u32),
    Altered { before: Vec<SettingValue>, after: Vec<SettingValue> },
    Described(Box<TopicDescription>),
}

type Waiter = oneshot::Sender<Result<Reply, ClientError>>;

struct Outgoing {
    frame: Vec<u8>,
    correlation_id: u32,
    waiter: Waiter,
}

struct Inner {
    addr: String,
    tx: mpsc::Sender<Outgoing>,
    next_id: AtomicU32,
    slots: Arc<Semaphore>,
    closed: Arc<AtomicBool>,
    max_frame_bytes: AtomicU32,
    /// The protocol version agreed at the handshake.
    version: std::sync::atomic::AtomicU16,
    /// The reader task; ended with the last clone of the client, so a peer that never
    /// answers nor closes does not keep the socket and the task alive.
    reader: tokio::task::AbortHandle,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

/// A connection to an engine. Clones share the connection; requests from any clone may
/// be in flight together.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client").field("addr", &self.inner.addr).finish()
    }
}

fn owned_reply(frame: Bytes) -> Result<(u32, Result<Reply, ClientError>), ClientError> {
    let (correlation_id, response) = decode_response(&frame).map_err(|e| ClientError::Protocol(e.to_string()))?;
    let reply = match response {
        Response::HelloOk { version, max_frame_bytes, .. } => Ok(Reply::HelloOk { version, max_frame_bytes }),
        Response::ProduceOk(acks) => Ok(Reply::Produced(acks)),
        Response::FetchOk { log_start_offset, log_end_offset, batches } => {
            let start = batches.as_ptr() as usize - frame.as_ptr() as usize;
            Ok(Reply::Fetched(FetchResult {
                log_start_offset,
                log_end_offset,
                batches: frame.slice(start..start + batches.len()),
            }))
        }
        Response::Topics(t) => Ok(Reply::Topics(t)),
        Response::Created | Response::Deleted => Ok(Reply::Done),
        Response::Offset(o) => Ok(Reply::Offset(o)),
        Response::Metadata { partitions } => Ok(Reply::Metadata(partitions)),
        Response::Altered { before, after } => Ok(Reply::Altered { before, after }),
        Response::Described(d) => Ok(Reply::Described(Box::new(d))),
        Response::Error { code, message } => Err(ClientError::Server { code, message: message.to_owned() }),
    };
    Ok((correlation_id, reply))
}

/// A reply not yet received.
struct PendingReply {
    reply: oneshot::Receiver<Result<Reply, ClientError>>,
    _slot: tokio::sync::OwnedSemaphorePermit,
    addr: String,
}

impl PendingReply {
    async fn wait(self) -> Result<Reply, ClientError> {
        let addr = self.addr;
        self.reply.await.map_err(|_| ClientError::Disconnected(addr))?
    }
}

/// A produce request on its way; [`PendingProduce::acks`] waits for the engine's answer.
pub struct PendingProduce {
    inner: PendingReply,
}

impl PendingProduce {
    /// Waits for the offsets (or the error).
    pub async fn acks(self) -> Result<Vec<PartitionAck>, ClientError> {
        match self.inner.wait().await? {
            Reply::Produced(acks) => Ok(acks),
            _ => Err(ClientError::Protocol("unexpected reply to PRODUCE".into())),
        }
    }
}

impl Client {
    /// Connects and performs the handshake.
    pub async fn connect(addr: &str) -> Result<Client, ClientError> {
        let io_err = |e: std::io::Error| ClientError::Io { addr: addr.to_owned(), message: e.to_string() };
        let stream = TcpStream::connect(addr).await.map_err(io_err)?;
        stream.set_nodelay(true).map_err(io_err)?;
        let (mut read_half, mut write_half) = stream.into_split();
        let (tx, mut rx) = mpsc::channel::<Outgoing>(MAX_IN_FLIGHT);
        let pending: Arc<Mutex<VecDeque<(u32, Waiter)>>> = Arc::default();
        let closed = Arc::new(AtomicBool::new(false));

        // Writer: register waiters in order, then write every queued frame at once.
        let writer_pending = pending.clone();
        let writer_closed = closed.clone();
        let writer_addr = addr.to_owned();
        tokio::spawn(async move {
            let mut buf = Vec::with_capacity(64 * 1024);
            while let Some(first) = rx.recv().await {
                let mut next = Some(first);
                {
                    let mut pending = writer_pending.lock().await;
                    while let Some(out) = next.take() {
                        // The reader marks the connection closed before it fails every
                        // waiter it holds, under this lock: a request queued after that
                        // would wait for a reply forever, so it fails now.
                        if writer_closed.load(Ordering::Acquire) {
                            let _ = out.waiter.send(Err(ClientError::Disconnected(writer_addr.clone())));
                        } else {
                            buf.extend_from_slice(&out.frame);
                            pending.push_back((out.correlation_id, out.waiter));
                        }
                        if buf.len() < 1 << 20 {
                            next = rx.try_recv().ok();
                        }
                    }
                }
                if buf.is_empty() {
                    continue;
                }
                if write_half.write_all(&buf).await.is_err() {
                    writer_closed.store(true, Ordering::Release);
                    break;
                }
                buf.clear();
            }
        });

        // Reader: one reply per pending request, in order.
        let reader_pending = pending.clone();
        let reader_closed = closed.clone();
        let reader_addr = addr.to_owned();
        let reader = tokio::spawn(async move {
            let mut buf = BytesMut::with_capacity(64 * 1024);
            let failure = loop {
                match check_frame(&buf, u32::MAX) {
                    Ok(Some(len)) => {
                        let frame = buf.split_to(len).freeze();
                        let (correlation_id, reply) = match owned_reply(frame) {
                            Ok(r) => r,
                            Err(e) => break e,
                        };
                        let Some((expected, waiter)) = reader_pending.lock().await.pop_front() else {
                            // An unsolicited reply: the server refusing the connection.
                            match reply {
                                Err(e) => break e,
                                Ok(_) => break ClientError::Protocol("reply without a request".into()),
                            }
                        };
                        if expected != correlation_id {
                            let e = ClientError::Protocol(format!(
                                "reply for request {correlation_id} where {expected} was expected"
                            ));
                            let _ = waiter.send(Err(e.clone()));
                            break e;
                        }
                        let _ = waiter.send(reply);
                        continue;
                    }
                    Ok(None) => {}
                    Err(e) => break ClientError::Protocol(e.to_string()),
                }
                buf.reserve(64 * 1024);
                match read_half.read_buf(&mut buf).await {
                    Ok(0) => break ClientError::Disconnected(reader_addr.clone()),
                    Ok(_) => {}
                    Err(e) => break ClientError::Io { addr: reader_addr.clone(), message: e.to_string() },
                }
            };
            reader_closed.store(true, Ordering::Release);
            let mut pending = reader_pending.lock().await;
            for (_, waiter) in pending.drain(..) {
                let _ = waiter.send(Err(match &failure {
                    ClientError::Server { .. } | ClientError::Protocol(_) => failure.clone(),
                    _ => ClientError::Disconnected(reader_addr.clone()),
                }));
            }
        });

        let client = Client {
            inner: Arc::new(Inner {
                addr: addr.to_owned(),
                tx,
                next_id: AtomicU32::new(0),
                slots: Arc::new(Semaphore::new(MAX_IN_FLIGHT)),
                closed,
                max_frame_bytes: AtomicU32::new(flowgate_protocol::DEFAULT_MAX_FRAME_BYTES),
                version: std::sync::atomic::AtomicU16::new(MIN_VERSION),
                reader: reader.abort_handle(),
            }),
        };
        let hello = Request::Hello { min_version: MIN_VERSION, max_version: VERSION, client_name: "flowgate-client" };
        match client.call(&hello).await? {
            Reply::HelloOk { version, max_frame_bytes } => {
                client.inner.max_frame_bytes.store(max_frame_bytes, Ordering::Relaxed);
                client.inner.version.store(version, Ordering::Relaxed);
            }
            _ => return Err(ClientError::Protocol("unexpected reply to HELLO".into())),
        }
        Ok(client)
    }

    /// The engine address.
    pub fn addr(&self) -> &str {
        &self.inner.addr
    }

    /// True once the connection has failed; make a new client.
    pub fn is_closed(&self) -> bool {
        self.inner.closed.load(Ordering::Acquire)
    }

    /// The protocol version agreed with the engine at the handshake.
    pub fn version(&self) -> u16 {
        self.inner.version.load(Ordering::Relaxed)
    }

    /// Refuses, before sending anything, what an engine of an older protocol version
    /// would not understand.
    fn needs_topic_settings(&self, what: &str) -> Result<(), ClientError> {
        let version = self.version();
        if version < TOPIC_SETTINGS_VERSION {
            return Err(ClientError::Protocol(format!(
                "{what} needs protocol version {TOPIC_SETTINGS_VERSION} and the engine at {} speaks {version}; \
                 upgrade the engine",
                self.inner.addr
            )));
        }
        Ok(())
    }

    /// The engine's frame limit, learned at the handshake.
    pub fn max_frame_bytes(&self) -> u32 {
        self.inner.max_frame_bytes.load(Ordering::Relaxed)
    }

    /// Queues a request for sending; the requests of one caller go out in the order
    /// it queues them. Returns the pending reply.
    async fn enqueue(&self, request: &Request<'_>) -> Result<PendingReply, ClientError> {
        let disconnected = || ClientError::Disconnected(self.inner.addr.clone());
        if self.is_closed() {
            return Err(disconnected());
        }
        let slot = self.inner.slots.clone().acquire_owned().await.map_err(|_| disconnected())?;
        let correlation_id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let mut frame = Vec::new();
        encode_request(correlation_id, request, &mut frame);
        let max = self.max_frame_bytes();
        if frame.len() > max as usize + 4 {
            return Err(ClientError::TooLarge { size: frame.len(), max });
        }
        let (waiter, reply) = oneshot::channel();
        self.inner.tx.send(Outgoing { frame, correlation_id, waiter }).await.map_err(|_| disconnected())?;
        Ok(PendingReply { reply, _slot: slot, addr: self.inner.addr.clone() })
    }

    async fn call(&self, request: &Request<'_>) -> Result<Reply, ClientError> {
        self.enqueue(request).await?.wait().await
    }

    /// Queues a produce request and returns at once with its pending acknowledgement.
    /// Requests queued one after another from one task reach the engine in that order
    /// (which is what keeps per-key order with many requests in flight).
    pub async fn produce_queued(
        &self,
        topic: &str,
        batch: Bytes,
        stamp: flowgate_core::ProducerStamp,
    ) -> Result<PendingProduce, ClientError> {
        let request =
            Request::Produce { topic, producer_id: stamp.producer_id, sequence: stamp.sequence, batch: &batch };
        Ok(PendingProduce { inner: self.enqueue(&request).await? })
    }

    /// Queues a produce request for one partition (PRODUCE_PARTITION) and returns at once
    /// with its pending acknowledgement. Requests queued one after another from one task
    /// reach the engine in that order, which idempotent sequences require.
    pub async fn produce_to_queued(
        &self,
        topic: &str,
        partition: u32,
        batch: Bytes,
        stamp: flowgate_core::ProducerStamp,
    ) -> Result<PendingProduce, ClientError> {
        let request = Request::ProducePartition {
            topic,
            partition,
            producer_id: stamp.producer_id,
            sequence: stamp.sequence,
            batch: &batch,
        };
        Ok(PendingProduce { inner: self.enqueue(&request).await? })
    }

    /// Appends one encoded batch to one partition of `topic` (PRODUCE_PARTITION). Every
    /// keyed record must belong to `partition` (`flowgate_core::partition_for_key`). With
    /// a producer id in `stamp`, the append is idempotent: `stamp.sequence` numbers this
    /// producer's batches to this partition from 0, and must follow the last stored one
    /// (`docs/protocol.md`).
    pub async fn produce_to(
        &self,
        topic: &str,
        partition: u32,
        batch: Bytes,
        stamp: flowgate_core::ProducerStamp,
    ) -> Result<Vec<PartitionAck>, ClientError> {
        self.produce_to_queued(topic, partition, batch, stamp).await?.acks().await
    }

    /// The number of partitions of `topic`, creating the topic if the engine
    /// auto-creates topics.
    pub async fn partition_count(&self, topic: &str) -> Result<u32, ClientError> {
        match self.call(&Request::Metadata { topic }).await? {
            Reply::Metadata(n) => Ok(n),
            _ => Err(ClientError::Protocol("unexpected reply to METADATA".into())),
        }
    }

    /// Appends one encoded batch (from `flowgate_core::BatchBuilder`) to `topic`, split
    /// across partitions by key by the engine. Not idempotent: `stamp` must be the
    /// default (an idempotent batch must name its partition, see [`Client::produce_to`]).
    /// Returns the offsets per partition, once the append is as durable as the engine's
    /// config asks.
    pub async fn produce(
        &self,
        topic: &str,
        batch: Bytes,
        stamp: flowgate_core::ProducerStamp,
    ) -> Result<Vec<PartitionAck>, ClientError> {
        let request =
            Request::Produce { topic, producer_id: stamp.producer_id, sequence: stamp.sequence, batch: &batch };
        match self.call(&request).await? {
            Reply::Produced(acks) => Ok(acks),
            _ => Err(ClientError::Protocol("unexpected reply to PRODUCE".into())),
        }
    }

    /// Reads whole batches from `offset`, about `max_bytes`; waits up to `max_wait_ms`
    /// for data when `offset` is the log end.
    pub async fn fetch(
        &self,
        topic: &str,
        partition: u32,
        offset: u64,
        max_bytes: u32,
        max_wait_ms: u32,
    ) -> Result<FetchResult, ClientError> {
        match self.call(&Request::Fetch { topic, partition, offset, max_bytes, max_wait_ms }).await? {
            Reply::Fetched(f) => Ok(f),
            _ => Err(ClientError::Protocol("unexpected reply to FETCH".into())),
        }
    }

    /// Lists topics with their partitions.
    pub async fn list_topics(&self) -> Result<Vec<TopicInfo>, ClientError> {
        match self.call(&Request::ListTopics).await? {
            Reply::Topics(t) => Ok(t),
            _ => Err(ClientError::Protocol("unexpected reply to LIST_TOPICS".into())),
        }
    }

    /// Creates a topic whose settings all follow the engine's defaults.
    pub async fn create_topic(&self, topic: &str, partitions: u32) -> Result<(), ClientError> {
        self.create_topic_with(topic, partitions, &[]).await
    }

    /// Creates a topic with settings of its own (`docs/topics.md`); the settings not
    /// given follow the engine's defaults. With settings it needs an engine of protocol
    /// version 3.
    pub async fn create_topic_with(
        &self,
        topic: &str,
        partitions: u32,
        settings: &[SettingUpdate],
    ) -> Result<(), ClientError> {
        if !settings.is_empty() {
            self.needs_topic_settings("creating a topic with settings")?;
        }
        self.call(&Request::CreateTopic { topic, partitions, settings: settings.to_vec() }).await.map(|_| ())
    }

    /// Changes a topic's settings (`None` values return to the default; the settings
    /// not given stay as they are). Returns every setting's effective value before and
    /// after. Needs an engine of protocol version 3.
    pub async fn alter_topic(
        &self,
        topic: &str,
        settings: &[SettingUpdate],
    ) -> Result<(Vec<SettingValue>, Vec<SettingValue>), ClientError> {
        self.needs_topic_settings("changing topic settings")?;
        match self.call(&Request::AlterTopic { topic, settings: settings.to_vec() }).await? {
            Reply::Altered { before, after } => Ok((before, after)),
            _ => Err(ClientError::Protocol("unexpected reply to ALTER_TOPIC".into())),
        }
    }

    /// A topic's settings (effective values and where they come from), partitions,
    /// segments and consumers. Needs an engine of protocol version 3.
    pub async fn describe_topic(&self, topic: &str) -> Result<TopicDescription, ClientError> {
        self.needs_topic_settings("describing a topic")?;
        match self.call(&Request::DescribeTopic { topic }).await? {
            Reply::Described(d) => Ok(*d),
            _ => Err(ClientError::Protocol("unexpected reply to DESCRIBE_TOPIC".into())),
        }
    }

    /// Deletes a topic and its data.
    pub async fn delete_topic(&self, topic: &str) -> Result<(), ClientError> {
        self.call(&Request::DeleteTopic { topic }).await.map(|_| ())
    }

    /// The first offset whose record is at or after `timestamp_ms`, if any.
    pub async fn offset_for_time(
        &self,
        topic: &str,
        partition: u32,
        timestamp_ms: i64,
    ) -> Result<Option<u64>, ClientError> {
        match self.call(&Request::OffsetForTime { topic, partition, timestamp_ms }).await? {
            Reply::Offset(u64::MAX) => Ok(None),
            Reply::Offset(o) => Ok(Some(o)),
            _ => Err(ClientError::Protocol("unexpected reply to OFFSET_FOR_TIME".into())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn connecting_to_nothing_says_where() {
        let err = Client::connect("127.0.0.1:1").await.unwrap_err();
        assert!(err.to_string().contains("127.0.0.1:1"), "{err}");
        assert!(err.is_retriable());
    }
}
