//! `tcp`: to another flowgate over the binary protocol. A batch counts as written once
//! the remote engine acknowledged it; at-least-once across crashes.
//!
//! - **Requests go to one partition each.** On each connection the sink asks the peer how
//!   many partitions its topic has (METADATA) and cuts each write by destination
//!   partition itself: a keyed event goes where `partition_for_key` puts it, the keyless
//!   events of one write all go to one partition (round robin across writes). Each share
//!   is sent with PRODUCE_PARTITION, in batch order, so order per key holds.
//! - **Requests fit the peer.** A share is cut into requests by bytes, against the frame
//!   limit the peer announces in its handshake (`HELLO_OK`), so a request is never
//!   refused for its size. An event that cannot fit any request of that peer is reported
//!   refused for good (code `too_large`), and the runtime sends it to the dead-letter
//!   topic instead of retrying it forever.
//! - **Retries are idempotent.** Requests carry the sink instance's producer id and a
//!   sequence number counted per destination partition from 0, as the peer requires
//!   (it stores a producer's batches to a partition only in sequence order). A request
//!   whose answer did not come (a timeout, a connection that closed) is sent again, on a
//!   new connection, with the same stamp and the same events, so the peer stores it once
//!   (its `DUPLICATE_SEQUENCE` then means "stored before"). Requests acknowledged before a
//!   failure are not sent again: the runtime's retry of the batch resumes after them.
//!   A request refused `OUT_OF_ORDER_SEQUENCE` or `UNKNOWN_PRODUCER` is not stored (the
//!   peer lost this producer's earlier batches or forgot the producer): the write fails,
//!   and its retry sends those events under a new producer id, from sequence 0.
//! - **Nothing waits forever.** Connecting (with the handshake) is bounded by
//!   `connect_timeout_ms`, the partition count question and each request by
//!   `request_timeout_ms`; a request that times out drops its connection (a half-open
//!   peer is never written to again) and fails the write, which the runtime retries with
//!   backoff.

use std::collections::HashMap;
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use flowgate_client::{Client, ClientError, ErrorCode};
use flowgate_core::batch::{HEADER_LEN, MAX_BATCH_LEN};
use flowgate_core::{partition_for_key, BatchBuilder, Codec, ProducerStamp};
use flowgate_engine::sink::BoxFuture;
use flowgate_engine::{EventFailure, Sink, SinkEvent, SinkPlace, WriteOutcome};
use serde::{Deserialize, Serialize};

use super::registry::{BuildContext, SinkConnector};

/// `type = "tcp"`: another flowgate over the binary protocol.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TcpConfig {
    /// Its address, `host:port`.
    pub addr: String,
    /// Topic there.
    pub topic: String,
    /// A connection (with its handshake) not made within this long fails the write,
    /// which is retried.
    #[serde(default = "default_connect_timeout")]
    pub connect_timeout_ms: u64,
    /// A request not answered within this long fails the write; the connection is
    /// dropped and the write retried on a new one (idempotently: stored once).
    #[serde(default = "default_request_timeout")]
    pub request_timeout_ms: u64,
}

fn default_connect_timeout() -> u64 {
    5_000
}

fn default_request_timeout() -> u64 {
    10_000
}

impl SinkConnector for TcpSink {
    const TYPE: &'static str = "tcp";
    const REMOTE: bool = true;
    type Config = TcpConfig;

    fn validate(c: &TcpConfig) -> anyhow::Result<()> {
        anyhow::ensure!(c.addr.contains(':'), "`addr` must be host:port");
        flowgate_log::validate_topic_name(&c.topic)?;
        for (key, ms) in [("connect_timeout_ms", c.connect_timeout_ms), ("request_timeout_ms", c.request_timeout_ms)] {
            anyhow::ensure!((1..=3_600_000).contains(&ms), "`{key}` must be between 1 and 3600000 (one hour)");
        }
        Ok(())
    }

    fn build(c: TcpConfig, cx: &BuildContext<'_>) -> anyhow::Result<Box<dyn Sink>> {
        let settings = TcpSinkSettings {
            addr: c.addr,
            topic: c.topic,
            connect_timeout: Duration::from_millis(c.connect_timeout_ms),
            request_timeout: Duration::from_millis(c.request_timeout_ms),
        };
        Ok(Box::new(TcpSink::new(settings, cx.place, &cx.sink.name)))
    }
}

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

/// Bytes of a PRODUCE_PARTITION frame beyond its topic and batch, with room to spare:
/// length, kind, flags, correlation id, topic length, partition, producer id, sequence.
const REQUEST_OVERHEAD: usize = 64;

/// The smallest records budget a peer's frame limit must allow.
const MIN_RECORDS_BUDGET: usize = 1024;

/// A request sent whose answer has not come.
#[derive(Clone, Copy, Debug)]
struct InDoubt {
    /// Entries `[done, end)` of the plan, all to one partition.
    end: usize,
    stamp: ProducerStamp,
}

/// The batch being written, cut by destination partition, and how far the write got.
#[derive(Debug)]
struct Plan {
    /// The peer's partition count the destinations were picked for.
    partitions: u32,
    /// `(destination partition, index of the event in the batch)`, grouped by partition,
    /// in batch order within each.
    entries: Vec<(u32, usize)>,
    /// Entries acknowledged by the peer or dead-lettered.
    done: usize,
    in_doubt: Option<InDoubt>,
}

impl Plan {
    /// Destinations for the events at `indices` (ascending) among `partitions`, keyless
    /// ones to `keyless`.
    fn new(events: &[SinkEvent], indices: impl Iterator<Item = usize>, partitions: u32, keyless: u32) -> Plan {
        let mut entries: Vec<(u32, usize)> = indices
            .map(|i| (events[i].key.as_deref().map_or(keyless, |k| partition_for_key(k, partitions)), i))
            .collect();
        // Stable: batch order stays within each partition.
        entries.sort_by_key(|&(p, _)| p);
        Plan { partitions, entries, done: 0, in_doubt: None }
    }

    fn finished(&self) -> bool {
        self.done >= self.entries.len()
    }
}

/// The sink's idempotent producer: its id and, per destination partition, the next
/// sequence.
struct ProducerState {
    id: u64,
    next_sequence: HashMap<u32, u64>,
}

impl ProducerState {
    fn new(place: &SinkPlace, name: &str) -> ProducerState {
        ProducerState { id: new_producer_id(place, name), next_sequence: HashMap::new() }
    }

    /// Starts over with a new producer id: sequences already used may be stored with
    /// other events, so they must never be reused.
    fn renew(&mut self, place: &SinkPlace, name: &str) {
        *self = ProducerState::new(place, name);
    }

    /// The stamp of the next request to `partition`.
    fn next_stamp(&mut self, partition: u32, place: &SinkPlace, name: &str) -> ProducerStamp {
        let next = self.next_sequence.entry(partition).or_insert(0);
        let stamp = ProducerStamp { producer_id: self.id, sequence: *next };
        match next.checked_add(1) {
            Some(n) => *next = n,
            // This stamp is still this request's (a resend reuses it); the next request
            // starts a new producer.
            None => self.renew(place, name),
        }
        stamp
    }
}

/// Sends to a remote engine.
pub struct TcpSink {
    settings: TcpSinkSettings,
    place: SinkPlace,
    name: String,
    client: Option<Client>,
    /// The topic's partition count at the peer, asked on the current connection.
    peer_partitions: Option<u32>,
    producer: ProducerState,
    /// Counts writes; picks the partition of each write's keyless events.
    keyless_turn: u32,
    builder: BatchBuilder,
    /// The batch being written (bytes shared with the runtime's), kept so that a retry
    /// can be recognised; empty when no write is unfinished.
    batch: Vec<SinkEvent>,
    /// Its destinations and progress, once the peer's partition count is known.
    plan: Option<Plan>,
    /// Events of the unfinished write the peer can never take (reported as refused).
    refused: Vec<EventFailure>,
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

/// What to do next for the batch.
enum Step {
    /// Every event is acknowledged or dead-lettered.
    Finished,
    /// The event at this index of the batch fits no request: dead-letter it.
    DeadLetter(usize),
    /// Send plan entries `[start, end)` to `partition` with `stamp`; `resend` when it
    /// was sent before.
    Send { partition: u32, start: usize, end: usize, stamp: ProducerStamp, resend: bool },
}

impl TcpSink {
    /// A sink named `name`, running at `place`, to `settings.topic` on the engine at
    /// `settings.addr` (connects on first write); events too large for that engine are
    /// reported refused (the runtime dead-letters them).
    pub fn new(settings: TcpSinkSettings, place: &SinkPlace, name: &str) -> TcpSink {
        let producer = ProducerState::new(place, name);
        TcpSink {
            settings,
            place: place.clone(),
            name: name.to_owned(),
            client: None,
            peer_partitions: None,
            // Sinks started together spread their keyless events.
            keyless_turn: producer.id as u32,
            producer,
            builder: BatchBuilder::new(),
            batch: Vec::new(),
            plan: None,
            refused: Vec::new(),
        }
    }

    /// Drops the connection (and what was learned on it): it is never written to again.
    fn disconnect(&mut self) {
        self.client = None;
        self.peer_partitions = None;
    }

    /// The connection and the peer's partition count for the topic.
    async fn connected(&mut self) -> anyhow::Result<(Client, u32)> {
        let client = match self.client.as_ref().filter(|c| !c.is_closed()) {
            Some(c) => c.clone(),
            None => {
                self.disconnect();
                let addr = &self.settings.addr;
                let client = tokio::time::timeout(self.settings.connect_timeout, Client::connect(addr))
                    .await
                    .map_err(|_| {
                        anyhow::anyhow!(
                            "no handshake from {addr} within connect_timeout_ms ({} ms)",
                            self.settings.connect_timeout.as_millis()
                        )
                    })??;
                self.client = Some(client.clone());
                client
            }
        };
        if let Some(n) = self.peer_partitions {
            return Ok((client, n));
        }
        let asked =
            tokio::time::timeout(self.settings.request_timeout, client.partition_count(&self.settings.topic)).await;
        match asked {
            Ok(Ok(n)) => {
                let n = n.max(1);
                self.peer_partitions = Some(n);
                Ok((client, n))
            }
            Ok(Err(e)) => {
                if !matches!(e, ClientError::Server { .. }) {
                    self.disconnect();
                }
                Err(e).with_context(|| {
                    format!("asking {} for the partition count of topic '{}'", self.settings.addr, self.settings.topic)
                })
            }
            Err(_) => {
                self.disconnect();
                anyhow::bail!(
                    "no answer from {} to METADATA within request_timeout_ms ({} ms)",
                    self.settings.addr,
                    self.settings.request_timeout.as_millis()
                );
            }
        }
    }

    /// Makes the plan of the batch fit a peer whose topic has `partitions` partitions.
    fn plan_for(&mut self, events: &[SinkEvent], partitions: u32) {
        let keyless = |turn: &mut u32| {
            *turn = turn.wrapping_add(1);
            *turn % partitions
        };
        match self.plan.take() {
            None => {
                let keyless = keyless(&mut self.keyless_turn);
                self.plan = Some(Plan::new(events, 0..events.len(), partitions, keyless));
            }
            Some(plan) if plan.partitions != partitions => {
                // The topic was recreated at the peer: destinations change, and its
                // producer state is gone.
                if plan.in_doubt.is_some() {
                    tracing::warn!(sink = %self.name, addr = %self.settings.addr, "the peer's topic changed its \
                        partition count under an unacknowledged request; sending its events anew (they may be \
                        stored twice)");
                } else {
                    tracing::warn!(sink = %self.name, addr = %self.settings.addr, from = plan.partitions,
                        to = partitions, "the peer's topic changed its partition count; the rest of the write is \
                        cut anew");
                }
                self.producer.renew(&self.place, &self.name);
                let mut rest: Vec<usize> = plan.entries[plan.done..].iter().map(|&(_, i)| i).collect();
                rest.sort_unstable();
                let keyless = keyless(&mut self.keyless_turn);
                self.plan = Some(Plan::new(events, rest.into_iter(), partitions, keyless));
            }
            Some(plan) => self.plan = Some(plan),
        }
    }

    /// The next step of the plan, requests cut to `budget` bytes of records.
    fn next_step(&mut self, events: &[SinkEvent], budget: usize) -> Step {
        let Some(plan) = self.plan.as_mut() else { return Step::Finished };
        loop {
            let Some(&(partition, first)) = plan.entries.get(plan.done) else { return Step::Finished };
            let start = plan.done;
            let size = |range: &[(u32, usize)]| {
                range.iter().map(|&(_, i)| record_bound(&events[i])).fold(0usize, usize::saturating_add)
            };
            match plan.in_doubt {
                Some(d) if size(&plan.entries[start..d.end]) <= budget => {
                    return Step::Send { partition, start, end: d.end, stamp: d.stamp, resend: true };
                }
                Some(_) => {
                    // The peer's limit shrank below a request sent before: it cannot be
                    // sent again as it was, and it may be stored.
                    tracing::warn!(sink = %self.name, addr = %self.settings.addr,
                        "the peer's frame limit shrank under an unacknowledged request; sending its events anew \
                         (they may be stored twice)");
                    plan.in_doubt = None;
                    self.producer.renew(&self.place, &self.name);
                }
                None => {
                    if record_bound(&events[first]) > budget {
                        return Step::DeadLetter(first);
                    }
                    let mut size = 0usize;
                    let mut end = start;
                    while let Some(&(p, i)) = plan.entries.get(end) {
                        let next = size.saturating_add(record_bound(&events[i]));
                        if p != partition || next > budget {
                            break;
                        }
                        size = next;
                        end += 1;
                    }
                    let stamp = self.producer.next_stamp(partition, &self.place, &self.name);
                    plan.in_doubt = Some(InDoubt { end, stamp });
                    return Step::Send { partition, start, end, stamp, resend: false };
                }
            }
        }
    }

    async fn write_batch(&mut self, events: &[SinkEvent]) -> anyhow::Result<Vec<EventFailure>> {
        if events.is_empty() {
            return Ok(Vec::new());
        }
        if self.batch.is_empty() || !super::resume::same_events(&self.batch, events) {
            if !self.batch.is_empty() {
                tracing::warn!(sink = %self.name, "a write was given another batch than the one that failed; writing it whole");
            }
            if self.plan.take().is_some_and(|p| p.in_doubt.is_some()) {
                // Its sequence may be stored: never reuse it for other events.
                self.producer.renew(&self.place, &self.name);
            }
            // Remembered before anything is sent, so that even a write abandoned half
            // way (its future dropped) resumes rather than repeats.
            self.batch.clear();
            self.batch.extend_from_slice(events);
            self.refused.clear();
        }
        while !self.plan.as_ref().is_some_and(Plan::finished) {
            let (client, partitions) = self.connected().await?;
            let Some(budget) = records_budget(client.max_frame_bytes(), self.settings.topic.len()) else {
                self.disconnect();
                anyhow::bail!(
                    "the engine at {} announces a frame limit of {} bytes, too small for any request; raise its \
                     ingest.max_frame_bytes",
                    self.settings.addr,
                    client.max_frame_bytes()
                );
            };
            self.plan_for(events, partitions);
            let (partition, start, end, stamp, resend) = match self.next_step(events, budget) {
                Step::Finished => break,
                Step::DeadLetter(i) => {
                    self.refuse(i, &events[i], budget);
                    if let Some(plan) = self.plan.as_mut() {
                        plan.done += 1;
                    }
                    continue;
                }
                Step::Send { partition, start, end, stamp, resend } => (partition, start, end, stamp, resend),
            };
            self.builder.clear();
            if let Some(plan) = self.plan.as_ref() {
                for &(_, i) in &plan.entries[start..end] {
                    let e = &events[i];
                    self.builder.push(e.timestamp, e.key.as_deref(), None, std::iter::empty(), &e.payload);
                }
            }
            let batch = self.builder.finish(Codec::Lz4, stamp)?;
            let sent = tokio::time::timeout(
                self.settings.request_timeout,
                client.produce_to(&self.settings.topic, partition, Bytes::from(batch.bytes), stamp),
            )
            .await;
            let what = |settings: &TcpSinkSettings| {
                format!(
                    "sending {} events to partition {partition} of topic '{}' at {}",
                    end - start,
                    settings.topic,
                    settings.addr
                )
            };
            match sent {
                Ok(Ok(_)) => {}
                // An earlier attempt of this very request was stored: the peer stores a
                // producer's sequences only in order, so one at or below its last is in.
                Ok(Err(ClientError::Server { code: ErrorCode::DuplicateSequence, .. })) if resend => {}
                Ok(Err(e @ ClientError::Server { code: ErrorCode::DuplicateSequence, .. })) => {
                    // A fresh sequence the peer says it has: not ours to trust as stored.
                    self.give_up_in_doubt();
                    return Err(e)
                        .with_context(|| what(&self.settings))
                        .context("the peer claims a sequence never sent before; retrying under a new producer id");
                }
                Ok(Err(
                    e @ ClientError::Server { code: ErrorCode::OutOfOrderSequence | ErrorCode::UnknownProducer, .. },
                )) => {
                    // Not stored: the peer lost this producer's earlier batches to the
                    // partition, or the producer itself. Only a new producer, starting at
                    // sequence 0, gets these events in.
                    tracing::warn!(sink = %self.name, addr = %self.settings.addr, partition, error = %e,
                        "the peer refused the sequence; the events go again under a new producer id");
                    self.give_up_in_doubt();
                    return Err(e).with_context(|| what(&self.settings)).context("retrying under a new producer id");
                }
                Ok(Err(e)) => {
                    if matches!(e, ClientError::Server { .. }) {
                        // Asked again before the resend: a topic recreated with another
                        // partition count refuses keyed records where they no longer belong.
                        self.peer_partitions = None;
                    } else {
                        self.disconnect();
                    }
                    return Err(e).with_context(|| what(&self.settings));
                }
                Err(_) => {
                    // Half-open or stalled: never use this connection again.
                    self.disconnect();
                    anyhow::bail!(
                        "no answer from {} within request_timeout_ms ({} ms); the request is sent again",
                        self.settings.addr,
                        self.settings.request_timeout.as_millis()
                    );
                }
            }
            if let Some(plan) = self.plan.as_mut() {
                plan.done = end;
                plan.in_doubt = None;
            }
        }
        self.plan = None;
        // Let go of the runtime's buffers.
        self.batch.clear();
        Ok(std::mem::take(&mut self.refused))
    }

    /// Forgets the request in doubt, known not stored (or not to be trusted as stored),
    /// and starts a new producer: its events go again, from sequence 0.
    fn give_up_in_doubt(&mut self) {
        if let Some(plan) = self.plan.as_mut() {
            plan.in_doubt = None;
        }
        self.producer.renew(&self.place, &self.name);
    }

    /// Reports the event at `index`, which no request to this peer can carry, as refused
    /// for good: the runtime sends it to the dead-letter topic instead of retrying it.
    fn refuse(&mut self, index: usize, event: &SinkEvent, budget: usize) {
        let reason = format!(
            "event of {} bytes does not fit a request to {} (at most {budget} bytes of records; its \
             ingest.max_frame_bytes sets that)",
            event.payload.len(),
            self.settings.addr
        );
        self.refused.push(EventFailure { index, retryable: false, reason, code: Some("too_large".into()) });
    }
}

impl Sink for TcpSink {
    fn write<'a>(&'a mut self, events: &'a [SinkEvent]) -> BoxFuture<'a, anyhow::Result<WriteOutcome>> {
        Box::pin(async move {
            let failures = self.write_batch(events).await?;
            Ok(WriteOutcome { failures, retry_after: None })
        })
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

    fn keyed(key: Option<&str>) -> SinkEvent {
        SinkEvent {
            partition: 0,
            offset: 0,
            timestamp: 1,
            key: key.map(|k| Bytes::copy_from_slice(k.as_bytes())),
            payload: Bytes::from_static(b"{}"),
        }
    }

    #[test]
    fn a_plan_sends_each_event_to_its_keys_partition_in_batch_order_and_keyless_ones_together() {
        let keys = [Some("a"), None, Some("b"), Some("c"), None, Some("a"), Some("d"), None];
        let events: Vec<SinkEvent> = keys.iter().map(|k| keyed(*k)).collect();
        let plan = Plan::new(&events, 0..events.len(), 3, 2);
        assert_eq!(plan.entries.len(), events.len(), "every event once");
        let mut seen: Vec<usize> = plan.entries.iter().map(|&(_, i)| i).collect();
        seen.sort_unstable();
        assert_eq!(seen, (0..events.len()).collect::<Vec<_>>());
        for &(p, i) in &plan.entries {
            let expected = keys[i].map_or(2, |k| partition_for_key(k.as_bytes(), 3));
            assert_eq!(p, expected, "event {i}");
        }
        // Grouped by partition (so a request goes to one), batch order within each.
        assert!(plan.entries.windows(2).all(|w| w[0].0 < w[1].0 || (w[0].0 == w[1].0 && w[0].1 < w[1].1)));
        // A re-plan of what is left keeps only those events.
        let rest = Plan::new(&events, [1usize, 4, 6].into_iter(), 5, 0);
        assert_eq!(
            rest.entries.iter().filter(|&&(p, _)| p == 0).count(),
            2 + usize::from(partition_for_key(b"d", 5) == 0)
        );
        assert_eq!(rest.entries.len(), 3);
    }

    #[test]
    fn sequences_count_per_partition_from_zero_and_a_new_producer_starts_over() {
        let place = SinkPlace { pipeline: "p".into(), topic: "in".into(), partition: 0 };
        let mut producer = ProducerState::new(&place, "s");
        let first = producer.id;
        let seq = |s: ProducerStamp| (s.producer_id, s.sequence);
        assert_eq!(seq(producer.next_stamp(0, &place, "s")), (first, 0));
        assert_eq!(seq(producer.next_stamp(0, &place, "s")), (first, 1));
        assert_eq!(seq(producer.next_stamp(3, &place, "s")), (first, 0), "each partition from 0");
        assert_eq!(seq(producer.next_stamp(0, &place, "s")), (first, 2));
        producer.renew(&place, "s");
        assert_ne!(producer.id, first);
        assert_eq!(producer.next_stamp(0, &place, "s").sequence, 0);
        assert_eq!(producer.next_stamp(3, &place, "s").sequence, 0);
        // The last sequence is used, then a new producer takes over.
        producer.next_sequence.insert(1, u64::MAX);
        let last = producer.next_stamp(1, &place, "s");
        assert_eq!(last.sequence, u64::MAX);
        let after = producer.next_stamp(1, &place, "s");
        assert_ne!(after.producer_id, last.producer_id);
        assert_eq!(after.sequence, 0);
    }
}
