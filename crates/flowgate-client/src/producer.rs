//! A batching, idempotent producer.
//!
//! The producer picks each event's partition itself (the key's
//! `flowgate_core::partition_for_key`, or one partition per batch for keyless events) and
//! numbers its batches per partition: 0, 1, 2, … The engine stores a partition's batches
//! only in that order (`docs/protocol.md`), so a batch is never stored after a later one
//! and a retry is recognised.
//!
//! One driver task per partition owns that partition's unacknowledged batches, in
//! sequence order. It pipelines them (up to `max_in_flight` across the producer) and reads
//! the answers in order. When an answer fails (a dropped connection, a batch refused as
//! out of order because an earlier one was lost), it waits for every request still in
//! flight, then resends every batch not known stored, in order, on a fresh connection. A
//! batch counts as acknowledged only when the engine says it is stored: PRODUCE_OK, or
//! DUPLICATE_SEQUENCE (stored before, which in-order sequences make certain).

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use flowgate_core::{partition_for_key, BatchBuilder, Codec, Event, ProducerStamp};
use flowgate_protocol::{ErrorCode, PartitionAck};
use tokio::sync::{mpsc, oneshot, Mutex, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;

use crate::connection::Client;
use crate::error::ClientError;

/// How a [`Producer`] batches and retries.
#[derive(Clone, Debug)]
pub struct ProducerConfig {
    /// A batch is sent when it holds this many events.
    pub max_batch_events: u32,
    /// … or this many bytes of records.
    pub max_batch_bytes: usize,
    /// … or when its first event is this old at the next `send` (or at `flush`).
    pub linger: Duration,
    /// Compression of the batches.
    pub codec: Codec,
    /// Batches sent and not yet acknowledged, across all partitions. Order per key holds
    /// whatever this is.
    pub max_in_flight: usize,
    /// Resend rounds in a row without any batch of a partition being acknowledged before
    /// the producer gives up on that partition (and fails).
    pub retries: u32,
    /// Wait before the first resend; doubles each round up to [`MAX_RETRY_BACKOFF`] (or
    /// this, if larger), back to this after progress.
    pub retry_backoff: Duration,
}

/// The longest wait between resend rounds that doubling reaches.
pub const MAX_RETRY_BACKOFF: Duration = Duration::from_secs(1);

impl Default for ProducerConfig {
    fn default() -> Self {
        ProducerConfig {
            max_batch_events: 1000,
            max_batch_bytes: 1 << 20,
            linger: Duration::from_millis(5),
            codec: Codec::None,
            max_in_flight: 16,
            retries: 5,
            retry_backoff: Duration::from_millis(100),
        }
    }
}

/// A connection that is replaced when it fails.
struct SharedClient {
    addr: String,
    current: Mutex<Client>,
}

impl SharedClient {
    async fn get(&self) -> Result<Client, ClientError> {
        let mut current = self.current.lock().await;
        if current.is_closed() {
            *current = Client::connect(&self.addr).await?;
        }
        Ok(current.clone())
    }
}

/// What every driver shares.
struct Shared {
    client: SharedClient,
    topic: String,
    producer_id: u64,
    retries: u32,
    retry_backoff: Duration,
    acked: AtomicU64,
    failure: std::sync::Mutex<Option<ClientError>>,
}

impl Shared {
    fn failure(&self) -> Option<ClientError> {
        self.failure.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn fail(&self, e: ClientError) {
        self.failure.lock().unwrap_or_else(|e| e.into_inner()).get_or_insert(e);
    }
}

/// A batch handed to a driver; its permit is one of `max_in_flight`.
struct Batch {
    sequence: u64,
    bytes: Bytes,
    events: u64,
    _permit: OwnedSemaphorePermit,
}

enum Message {
    Batch(Batch),
    /// Answer when every batch handed over before is resolved.
    Flush(oneshot::Sender<()>),
}

/// One partition's batches being filled.
struct Filling {
    builder: BatchBuilder,
    started: Option<Instant>,
    next_sequence: u64,
}

/// Events in, batches out. Call [`Producer::flush`] before dropping it.
pub struct Producer {
    shared: Arc<Shared>,
    config: ProducerConfig,
    partitions: u32,
    filling: Vec<Filling>,
    drivers: Vec<Option<mpsc::UnboundedSender<Message>>>,
    tasks: JoinSet<()>,
    slots: Arc<Semaphore>,
    keyless_partition: u32,
    events_since_linger_check: u32,
}

fn random_producer_id() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos());
    h.write_u32(std::process::id());
    h.finish().max(1)
}

impl Producer {
    /// Connects to `addr` and produces to `topic` (created if the engine auto-creates
    /// topics).
    pub async fn new(addr: &str, topic: &str, config: ProducerConfig) -> Result<Producer, ClientError> {
        let client = Client::connect(addr).await?;
        let partitions = client.partition_count(topic).await?.max(1);
        let producer_id = random_producer_id();
        let shared = Arc::new(Shared {
            client: SharedClient { addr: addr.to_owned(), current: Mutex::new(client) },
            topic: topic.to_owned(),
            producer_id,
            retries: config.retries,
            retry_backoff: config.retry_backoff,
            acked: AtomicU64::new(0),
            failure: std::sync::Mutex::new(None),
        });
        let filling = (0..partitions)
            .map(|_| Filling { builder: BatchBuilder::new(), started: None, next_sequence: 0 })
            .collect();
        Ok(Producer {
            shared,
            slots: Arc::new(Semaphore::new(config.max_in_flight.max(1))),
            keyless_partition: (producer_id % u64::from(partitions)) as u32,
            config,
            partitions,
            filling,
            drivers: (0..partitions).map(|_| None).collect(),
            tasks: JoinSet::new(),
            events_since_linger_check: 0,
        })
    }

    /// This producer's id.
    pub fn producer_id(&self) -> u64 {
        self.shared.producer_id
    }

    /// Events acknowledged (stored) so far.
    pub fn acked(&self) -> u64 {
        self.shared.acked.load(Ordering::Relaxed)
    }

    fn check_failed(&self) -> Result<(), ClientError> {
        match self.shared.failure() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Adds an event; sends its partition's batch when it is full or old enough. Fails
    /// with the error of an earlier batch that could not be delivered.
    pub async fn send(&mut self, event: &Event) -> Result<(), ClientError> {
        self.check_failed()?;
        let p = match &event.key {
            Some(k) => partition_for_key(k, self.partitions),
            None => self.keyless_partition,
        };
        let filling = &mut self.filling[p as usize];
        filling.builder.push_event(event, flowgate_core::time::now_ms());
        let started = *filling.started.get_or_insert_with(Instant::now);
        if filling.builder.len() >= self.config.max_batch_events
            || filling.builder.records_len() >= self.config.max_batch_bytes
            || started.elapsed() >= self.config.linger
        {
            self.ship(p).await?;
        }
        // Batches of other partitions that waited long enough go too (looked at every
        // few events, not per event).
        self.events_since_linger_check += 1;
        if self.events_since_linger_check >= 64 {
            self.events_since_linger_check = 0;
            let linger = self.config.linger;
            for q in 0..self.partitions {
                if self.filling[q as usize].started.is_some_and(|s| s.elapsed() >= linger) {
                    self.ship(q).await?;
                }
            }
        }
        Ok(())
    }

    /// Hands partition `p`'s batch to its driver.
    async fn ship(&mut self, p: u32) -> Result<(), ClientError> {
        let filling = &mut self.filling[p as usize];
        if filling.builder.is_empty() {
            return Ok(());
        }
        filling.started = None;
        let stamp = ProducerStamp { producer_id: self.shared.producer_id, sequence: filling.next_sequence };
        let batch =
            filling.builder.finish(self.config.codec, stamp).map_err(|e| ClientError::Protocol(e.to_string()))?;
        filling.next_sequence += 1;
        if p == self.keyless_partition {
            // Keyless events move on to the next partition, a batch at a time.
            self.keyless_partition = (p + 1) % self.partitions;
        }
        let permit =
            self.slots.clone().acquire_owned().await.map_err(|_| ClientError::Protocol("producer closed".into()))?;
        self.check_failed()?;
        let batch = Batch {
            sequence: stamp.sequence,
            events: u64::from(batch.record_count),
            bytes: Bytes::from(batch.bytes),
            _permit: permit,
        };
        let driver = self.drivers[p as usize].get_or_insert_with(|| {
            let (tx, rx) = mpsc::unbounded_channel();
            self.tasks.spawn(drive(self.shared.clone(), p, rx));
            tx
        });
        driver.send(Message::Batch(batch)).map_err(|_| ClientError::Protocol("producer driver ended".into()))
    }

    /// Sends every partial batch and waits until every batch is acknowledged or the
    /// producer failed. Returns the number of events acknowledged in total, or the first
    /// error (events of batches after a failed one are not stored).
    pub async fn flush(&mut self) -> Result<u64, ClientError> {
        for p in 0..self.partitions {
            self.ship(p).await?;
        }
        let mut waiting = Vec::new();
        for driver in self.drivers.iter().flatten() {
            let (tx, rx) = oneshot::channel();
            if driver.send(Message::Flush(tx)).is_ok() {
                waiting.push(rx);
            }
        }
        for rx in waiting {
            let _ = rx.await;
        }
        self.check_failed()?;
        Ok(self.acked())
    }
}

type Answer = Pin<Box<dyn Future<Output = Result<Vec<PartitionAck>, ClientError>> + Send>>;

enum State {
    /// Not on the wire (new behind a failure, or to be resent).
    Unsent,
    /// Sent; its answer is awaited.
    InFlight(Answer),
    /// The engine said it is stored.
    Stored,
}

struct Entry {
    batch: Batch,
    state: State,
}

/// Sends `batch` on `client` (or fails at once) and returns its answer to await.
async fn send_one(shared: &Shared, client: &Result<Client, ClientError>, partition: u32, batch: &Batch) -> Answer {
    let stamp = ProducerStamp { producer_id: shared.producer_id, sequence: batch.sequence };
    let queued = match client {
        Ok(c) => c.produce_to_queued(&shared.topic, partition, batch.bytes.clone(), stamp).await,
        Err(e) => Err(e.clone()),
    };
    match queued {
        Ok(pending) => Box::pin(pending.acks()),
        Err(e) => Box::pin(async move { Err(e) }),
    }
}

/// The wait after `current` for a round that made no progress: doubled, up to
/// [`MAX_RETRY_BACKOFF`] (or `initial`, if larger). Uncapped doubling made a run of failed
/// rounds wait minutes, then years, before the producer could give up after `retries`.
fn next_backoff(current: Duration, initial: Duration) -> Duration {
    current.saturating_mul(2).min(MAX_RETRY_BACKOFF.max(initial))
}

/// What an answer means for the batch.
enum Outcome {
    Stored,
    Resend(ClientError),
    Fatal(ClientError),
}

/// `first_unacknowledged`: every earlier batch of the partition is known stored.
fn classify(answer: Result<Vec<PartitionAck>, ClientError>, first_unacknowledged: bool) -> Outcome {
    match answer {
        // DUPLICATE_SEQUENCE: stored before. Sequences are stored only in order, so a
        // sequence at or below the partition's last one is stored.
        Ok(_) | Err(ClientError::Server { code: ErrorCode::DuplicateSequence, .. }) => Outcome::Stored,
        // The partition knows nothing of this producer: normal while sequence 0 itself is
        // still to be (re)sent; fatal when every earlier batch is stored (the engine
        // forgot this producer, or lost its batches with a power failure).
        Err(e @ ClientError::Server { code: ErrorCode::UnknownProducer, .. }) if !first_unacknowledged => {
            Outcome::Resend(e)
        }
        Err(e) if e.is_retriable() => Outcome::Resend(e),
        Err(e) => Outcome::Fatal(e),
    }
}

/// The driver of one partition: see the module docs.
async fn drive(shared: Arc<Shared>, partition: u32, mut rx: mpsc::UnboundedReceiver<Message>) {
    let mut queue: VecDeque<Entry> = VecDeque::new();
    let mut flushes: Vec<oneshot::Sender<()>> = Vec::new();
    let mut resend = false;
    let mut rounds_without_progress = 0u32;
    let mut backoff = shared.retry_backoff;
    let mut open = true;
    loop {
        // Acknowledged batches leave from the front, in order.
        while queue.front().is_some_and(|e| matches!(e.state, State::Stored)) {
            let entry = queue.pop_front().expect("front exists");
            shared.acked.fetch_add(entry.batch.events, Ordering::Relaxed);
        }
        if queue.is_empty() {
            for f in flushes.drain(..) {
                let _ = f.send(());
            }
            if !open {
                return;
            }
        }
        let in_flight = queue.iter().position(|e| matches!(e.state, State::InFlight(_)));
        if resend && in_flight.is_none() {
            // Every answer of the failed round is in: resend what is not stored, in order.
            rounds_without_progress += 1;
            if rounds_without_progress > shared.retries {
                let e = ClientError::Protocol(format!(
                    "partition {partition}: no batch acknowledged after {} resend rounds; the unacknowledged \
                     batches from sequence {} on are not known stored",
                    shared.retries,
                    queue.front().map_or(0, |e| e.batch.sequence)
                ));
                fail(&shared, &mut queue, &mut flushes, e);
                resend = false;
                continue;
            }
            tokio::time::sleep(backoff).await;
            backoff = next_backoff(backoff, shared.retry_backoff);
            resend = false;
            let client = shared.client.get().await;
            for entry in queue.iter_mut().filter(|e| matches!(e.state, State::Unsent)) {
                entry.state = State::InFlight(send_one(&shared, &client, partition, &entry.batch).await);
            }
            continue;
        }
        let message = match in_flight {
            None if open => rx.recv().await.map(Ok),
            None => {
                // Closed, with batches waiting and none in flight: send them.
                resend = true;
                continue;
            }
            Some(i) => {
                let State::InFlight(answer) = &mut queue[i].state else { unreachable!("position found it in flight") };
                tokio::select! {
                    biased;
                    answer = answer => Some(Err((i, answer))),
                    m = rx.recv(), if open => m.map(Ok),
                }
            }
        };
        match message {
            None => open = false,
            Some(Ok(Message::Flush(tx))) => flushes.push(tx),
            Some(Ok(Message::Batch(batch))) => {
                if shared.failure().is_some() {
                    // The producer failed: this batch is not sent (its events are not
                    // counted), and the caller hears the error.
                    continue;
                }
                let state = if resend || queue.iter().any(|e| matches!(e.state, State::Unsent)) {
                    // Behind a failure: it goes out with the resend, in order.
                    State::Unsent
                } else {
                    let client = shared.client.get().await;
                    State::InFlight(send_one(&shared, &client, partition, &batch).await)
                };
                queue.push_back(Entry { batch, state });
            }
            Some(Err((i, answer))) => match classify(answer, i == 0) {
                Outcome::Stored => {
                    queue[i].state = State::Stored;
                    rounds_without_progress = 0;
                    backoff = shared.retry_backoff;
                }
                Outcome::Resend(e) => {
                    tracing::debug!(error = %e, partition, sequence = queue[i].batch.sequence, "batch will be resent");
                    queue[i].state = State::Unsent;
                    resend = true;
                }
                Outcome::Fatal(e) => fail(&shared, &mut queue, &mut flushes, e),
            },
        }
    }
}

/// Gives up: records the error, drops every unacknowledged batch (they are not counted),
/// and answers every flush.
fn fail(shared: &Shared, queue: &mut VecDeque<Entry>, flushes: &mut Vec<oneshot::Sender<()>>, e: ClientError) {
    tracing::warn!(error = %e, "producer failed; unacknowledged batches are not counted as stored");
    shared.fail(e);
    // Batches the engine already said are stored still count.
    for entry in queue.drain(..) {
        if matches!(entry.state, State::Stored) {
            shared.acked.fetch_add(entry.batch.events, Ordering::Relaxed);
        }
    }
    for f in flushes.drain(..) {
        let _ = f.send(());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resend_waits_double_up_to_the_cap_however_many_rounds_fail() {
        let initial = Duration::from_millis(2);
        let mut wait = initial;
        let mut total = Duration::ZERO;
        for _ in 0..200 {
            total += wait;
            wait = next_backoff(wait, initial);
        }
        assert_eq!(wait, MAX_RETRY_BACKOFF);
        // 200 failed rounds (the durability test's `retries`) wait a few minutes at most,
        // not the 2^200 ms doubling would reach.
        assert!(total <= Duration::from_secs(200), "{total:?}");
        // A configured first wait longer than the cap is kept.
        let long = Duration::from_secs(5);
        assert_eq!(next_backoff(long, long), long);
        assert_eq!(next_backoff(Duration::MAX, initial), MAX_RETRY_BACKOFF);
    }
}
