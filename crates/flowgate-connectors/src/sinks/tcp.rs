//! `tcp`: to another flowgate over the binary protocol. A batch counts as written once
//! the remote engine acknowledged it; at-least-once across crashes.
//!
//! - **Requests fit the peer.** A write is cut into requests by bytes, against the frame
//!   limit the peer announces in its handshake (`HELLO_OK`), so a request is never
//!   refused for its size. An event that cannot fit any request of that peer goes to the
//!   local dead-letter topic `_dlq` (as `{pipeline, sink, error, topic, partition, offset,
//!   timestamp, event}`, durable before the checkpoint that moves past it) instead of
//!   being retried forever.
//! - **Retries are idempotent.** Requests carry a producer id (one per sink instance)
//!   and a sequence number. A request whose answer did not come (a timeout, a connection
//!   that closed) is sent again, on a new connection, with the same id and sequence and
//!   the same events, so the peer stores it once. Requests acknowledged before a failure
//!   are not sent again: the runtime's retry of the batch resumes after them.
//! - **Nothing waits forever.** Connecting (with the handshake) is bounded by
//!   `connect_timeout_ms`, each request by `request_timeout_ms`; a request that times out
//!   drops its connection (a half-open peer is never written to again) and fails the
//!   write, which the runtime retries with backoff.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use flowgate_client::{Client, ClientError, ErrorCode};
use flowgate_core::batch::{HEADER_LEN, MAX_BATCH_LEN};
use flowgate_core::{BatchBuilder, Codec, ProducerStamp};
use flowgate_engine::sink::BoxFuture;
use flowgate_engine::{Sink, SinkEvent, SinkPlace, DLQ_TOPIC};
use flowgate_log::{Log, Partition};

/// Where and how a TCP sink connects.
#[derive(Clone, Debug)]
pub struct TcpSinkSettings {
    /// The remote engine's binary protocol address.
    pub addr: String,
    /// The topic there.
    pub topic: String,
    /// Bound on connecting, handshake included.
    pub connect_timeout: Duration,
    /// Bound on each request's answer.
    pub request_timeout: Duration,
}

/// Bytes a record adds beyond its key and payload, at most: body length, attributes,
/// timestamp delta and key length (varints of up to 10 bytes each).
const RECORD_OVERHEAD: usize = 32;

/// Bytes of a PRODUCE frame beyond its topic and batch, with room to spare: length,
/// kind, flags, correlation id, topic length, producer id, sequence.
const REQUEST_OVERHEAD: usize = 64;

/// The smallest records budget a peer's frame limit must allow.
const MIN_RECORDS_BUDGET: usize = 1024;

/// A request sent whose answer has not come.
#[derive(Clone, Copy, Debug)]
struct InDoubt {
    /// Events `[done, end)` of the batch.
    end: usize,
    stamp: ProducerStamp,
}

/// How far the write of the current batch got.
#[derive(Clone, Copy, Debug, Default)]
struct Progress {
    /// Events acknowledged by the peer or dead-lettered.
    done: usize,
    in_doubt: Option<InDoubt>,
}

/// Sends to a remote engine.
pub struct TcpSink {
    settings: TcpSinkSettings,
    log: Log,
    place: SinkPlace,
    name: String,
    client: Option<Client>,
    producer_id: u64,
    next_sequence: u64,
    builder: BatchBuilder,
    /// The batch being written (bytes shared with the runtime's), kept so that a retry
    /// can be recognised; empty when no write is unfinished.
    batch: Vec<SinkEvent>,
    progress: Option<Progress>,
    /// Per partition of the dead-letter topic, the end of what this sink appended since
    /// the last commit.
    dead_letters: Vec<Option<(Arc<Partition>, u64)>>,
}

fn new_producer_id(place: &SinkPlace, name: &str) -> u64 {
    use std::hash::{BuildHasher, Hash, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    (&place.pipeline, &place.topic, place.partition, name).hash(&mut h);
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos().hash(&mut h);
    std::process::id().hash(&mut h);
    h.finish().max(1)
}

/// Upper bound of an event's encoded record size.
fn record_bound(e: &SinkEvent) -> usize {
    e.payload.len().saturating_add(e.key.as_ref().map_or(0, |k| k.len())).saturating_add(RECORD_OVERHEAD)
}

/// The uncompressed records bytes one request may carry to a peer whose frame limit
/// is `max_frame_bytes`: whatever the compression makes of them (LZ4 can grow
/// incompressible input by 1/255 plus a few bytes), the frame stays within the limit,
/// and the records inflate to no more than the limit either.
fn records_budget(max_frame_bytes: u32, topic_len: usize) -> Option<usize> {
    let frame = usize::try_from(max_frame_bytes).unwrap_or(usize::MAX).min(MAX_BATCH_LEN);
    let room = frame.checked_sub(REQUEST_OVERHEAD + topic_len + HEADER_LEN)?;
    let budget = room.checked_sub(room / 128 + 64)?;
    (budget >= MIN_RECORDS_BUDGET).then_some(budget)
}

impl TcpSink {
    /// A sink named `name`, running at `place`, to `settings.topic` on the engine at
    /// `settings.addr` (connects on first write); events too large for that engine are
    /// dead-lettered into `log`.
    pub fn new(settings: TcpSinkSettings, log: Log, place: &SinkPlace, name: &str) -> TcpSink {
        TcpSink {
            settings,
            log,
            place: place.clone(),
            name: name.to_owned(),
            client: None,
            producer_id: new_producer_id(place, name),
            next_sequence: 0,
            builder: BatchBuilder::new(),
            batch: Vec::new(),
            progress: None,
            dead_letters: Vec::new(),
        }
    }

    /// Starts over with a new producer id: sequences already used may be stored with
    /// other events, so they must never be reused.
    fn new_producer(&mut self) {
        self.producer_id = new_producer_id(&self.place, &self.name);
        self.next_sequence = 0;
    }

    async fn connected(&mut self) -> anyhow::Result<Client> {
        if let Some(c) = self.client.as_ref().filter(|c| !c.is_closed()) {
            return Ok(c.clone());
        }
        self.client = None;
        let addr = &self.settings.addr;
        let client =
            tokio::time::timeout(self.settings.connect_timeout, Client::connect(addr)).await.map_err(|_| {
                anyhow::anyhow!(
                    "no handshake from {addr} within connect_timeout_ms ({} ms)",
                    self.settings.connect_timeout.as_millis()
                )
            })??;
        self.client = Some(client.clone());
        Ok(client)
    }

    async fn write_batch(&mut self, events: &[SinkEvent]) -> anyhow::Result<()> {
        let mut progress = match self.progress.take() {
            Some(p) if super::resume::same_events(&self.batch, events) => p,
            other => {
                if other.is_some() {
                    tracing::warn!(sink = %self.name, "a write was given another batch than the one that failed; writing it whole");
                    self.new_producer();
                }
                // Remembered before anything is sent, so that even a write abandoned
                // half way (its future dropped) resumes rather than repeats.
                self.batch.clear();
                self.batch.extend_from_slice(events);
                Progress::default()
            }
        };
        while progress.done < events.len() {
            self.progress = Some(progress);
            let client = self.connected().await?;
            let Some(budget) = records_budget(client.max_frame_bytes(), self.settings.topic.len()) else {
                self.client = None;
                anyhow::bail!(
                    "the engine at {} announces a frame limit of {} bytes, too small for any request; raise its \
                     ingest.max_frame_bytes",
                    self.settings.addr,
                    client.max_frame_bytes()
                );
            };
            let fits =
                |range: &[SinkEvent]| range.iter().map(record_bound).fold(0usize, usize::saturating_add) <= budget;
            let (end, stamp, resend) = match progress.in_doubt {
                Some(d) if fits(&events[progress.done..d.end]) => (d.end, d.stamp, true),
                Some(_) => {
                    // The peer's limit shrank below a request sent before: it cannot be
                    // sent again as it was, and it may be stored.
                    tracing::warn!(sink = %self.name, addr = %self.settings.addr,
                        "the peer's frame limit shrank under an unacknowledged request; sending its events anew \
                         (they may be stored twice)");
                    progress.in_doubt = None;
                    self.new_producer();
                    continue;
                }
                None => {
                    let first = &events[progress.done];
                    if record_bound(first) > budget {
                        self.dead_letter(first, budget)?;
                        progress.done += 1;
                        continue;
                    }
                    let mut size = 0usize;
                    let mut end = progress.done;
                    while let Some(e) = events.get(end) {
                        let next = size.saturating_add(record_bound(e));
                        if next > budget {
                            break;
                        }
                        size = next;
                        end += 1;
                    }
                    let stamp = ProducerStamp { producer_id: self.producer_id, sequence: self.next_sequence };
                    match self.next_sequence.checked_add(1) {
                        Some(next) => self.next_sequence = next,
                        None => self.new_producer(),
                    }
                    progress.in_doubt = Some(InDoubt { end, stamp });
                    (end, stamp, false)
                }
            };
            self.progress = Some(progress);
            self.builder.clear();
            for e in &events[progress.done..end] {
                self.builder.push(e.timestamp, e.key.as_deref(), None, std::iter::empty(), &e.payload);
            }
            let batch = self.builder.finish(Codec::Lz4, stamp)?;
            let sent = tokio::time::timeout(
                self.settings.request_timeout,
                client.produce(&self.settings.topic, Bytes::from(batch.bytes), stamp),
            )
            .await;
            match sent {
                Ok(Ok(_)) => {}
                // An earlier attempt of this very request was stored.
                Ok(Err(ClientError::Server { code: ErrorCode::DuplicateSequence, .. })) if resend => {}
                Ok(Err(e @ ClientError::Server { code: ErrorCode::DuplicateSequence, .. })) => {
                    // A fresh sequence the peer says it has: not ours to trust as stored.
                    progress.in_doubt = None;
                    self.progress = Some(progress);
                    self.new_producer();
                    return Err(e)
                        .context("the peer claims a sequence never sent before; retrying under a new producer id");
                }
                Ok(Err(e)) => {
                    if !matches!(e, ClientError::Server { .. }) {
                        self.client = None;
                    }
                    return Err(e).with_context(|| {
                        format!(
                            "sending {} events to topic '{}' at {}",
                            end - progress.done,
                            self.settings.topic,
                            self.settings.addr
                        )
                    });
                }
                Err(_) => {
                    // Half-open or stalled: never use this connection again.
                    self.client = None;
                    anyhow::bail!(
                        "no answer from {} within request_timeout_ms ({} ms); the request is sent again",
                        self.settings.addr,
                        self.settings.request_timeout.as_millis()
                    );
                }
            }
            progress.done = end;
            progress.in_doubt = None;
        }
        self.progress = None;
        // Let go of the runtime's buffers.
        self.batch.clear();
        Ok(())
    }

    /// Appends an event the peer can never take to the local dead-letter topic.
    fn dead_letter(&mut self, event: &SinkEvent, budget: usize) -> anyhow::Result<()> {
        let error = format!(
            "event of {} bytes does not fit a request to {} (at most {budget} bytes of records; its \
             ingest.max_frame_bytes sets that)",
            event.payload.len(),
            self.settings.addr
        );
        tracing::warn!(pipeline = %self.place.pipeline, sink = %self.name, offset = event.offset, %error,
            "event sent to the dead-letter topic");
        let envelope = dead_letter_envelope(&self.place, &self.name, &error, event);
        let mut builder = BatchBuilder::with_capacity(envelope.len() + RECORD_OVERHEAD);
        builder.push(event.timestamp, event.key.as_deref(), None, std::iter::empty(), &envelope);
        let mut batch = builder.finish(Codec::None, ProducerStamp::default())?;
        let topic = self.log.topic_or_create(DLQ_TOPIC)?;
        let p = topic.next_round_robin();
        let partition = topic.partition(p)?.clone();
        let outcome = partition.append(&mut batch.bytes)?;
        if self.dead_letters.len() <= p as usize {
            self.dead_letters.resize_with(p as usize + 1, || None);
        }
        let slot = &mut self.dead_letters[p as usize];
        let end = slot.as_ref().map_or(outcome.end_offset(), |(_, e)| outcome.end_offset().max(*e));
        *slot = Some((partition, end));
        Ok(())
    }
}

/// `{pipeline, sink, error, topic, partition, offset, timestamp, event}`, with the event
/// as it was if it is JSON and as a string if not; the payload is not parsed into a tree.
fn dead_letter_envelope(place: &SinkPlace, sink: &str, error: &str, event: &SinkEvent) -> Vec<u8> {
    let head = serde_json::json!({
        "pipeline": place.pipeline,
        "sink": sink,
        "error": error,
        "topic": place.topic,
        "partition": event.partition,
        "offset": event.offset,
        "timestamp": event.timestamp,
    });
    let mut out = serde_json::to_vec(&head).unwrap_or_else(|_| b"{}".to_vec());
    out.pop(); // the closing brace
    out.extend_from_slice(b",\"event\":");
    if serde_json::from_slice::<serde::de::IgnoredAny>(&event.payload).is_ok() {
        out.extend_from_slice(&event.payload);
    } else {
        let text = String::from_utf8_lossy(&event.payload);
        out.extend_from_slice(&serde_json::to_vec(&text).unwrap_or_default());
    }
    out.push(b'}');
    out
}

impl Sink for TcpSink {
    fn write<'a>(&'a mut self, events: &'a [SinkEvent]) -> BoxFuture<'a, anyhow::Result<()>> {
        Box::pin(self.write_batch(events))
    }

    fn commit(&mut self) -> BoxFuture<'_, anyhow::Result<serde_json::Value>> {
        Box::pin(async move {
            for slot in &mut self.dead_letters {
                if let Some((partition, end)) = slot.take() {
                    if let Err(e) = partition.wait_durable(end).await {
                        *slot = Some((partition, end));
                        return Err(e.into());
                    }
                }
            }
            Ok(serde_json::Value::Null)
        })
    }

    fn recover<'a>(&'a mut self, _state: &'a serde_json::Value) -> BoxFuture<'a, anyhow::Result<()>> {
        Box::pin(async { Ok(()) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budgets_keep_every_request_within_the_frame_limit() {
        assert_eq!(records_budget(100, 5), None, "a limit with no room is refused, not divided by");
        assert_eq!(records_budget(0, 5), None);
        let b = records_budget(1 << 20, 10).unwrap();
        // Worst case LZ4 growth plus headers stays within the frame.
        assert!(b + b / 255 + 16 + HEADER_LEN + REQUEST_OVERHEAD + 10 <= 1 << 20, "{b}");
        assert!(b > (1 << 20) - 16 * 1024, "most of the frame is used: {b}");
        let huge = records_budget(u32::MAX, 10).unwrap();
        assert!(huge < MAX_BATCH_LEN, "a batch never exceeds what a decoder accepts");
    }

    #[test]
    fn dead_letters_carry_the_event_as_it_was() {
        let place = SinkPlace { pipeline: "p".into(), topic: "in".into(), partition: 3 };
        let event = |payload: &'static [u8]| SinkEvent {
            partition: 3,
            offset: 9,
            timestamp: 5,
            key: None,
            payload: Bytes::from_static(payload),
        };
        let v: serde_json::Value =
            serde_json::from_slice(&dead_letter_envelope(&place, "s", "too big", &event(b"{\"a\": [1, 2]}"))).unwrap();
        assert_eq!(v["event"], serde_json::json!({"a": [1, 2]}));
        assert_eq!((v["sink"].as_str(), v["offset"].as_u64(), v["pipeline"].as_str()), (Some("s"), Some(9), Some("p")));
        let v: serde_json::Value =
            serde_json::from_slice(&dead_letter_envelope(&place, "s", "too big", &event(b"not json\""))).unwrap();
        assert_eq!(v["event"], "not json\"");
    }
}
