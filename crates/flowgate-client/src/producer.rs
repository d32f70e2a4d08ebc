//! A batching, idempotent producer.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use flowgate_core::{BatchBuilder, Codec, Event, ProducerStamp};
use tokio::sync::Mutex;
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
    /// Requests in flight at once. With retries, order across batches holds only with 1.
    pub max_in_flight: usize,
    /// Resends of a failed request (same producer id and sequence).
    pub retries: u32,
    /// Wait before the first retry; doubles each time.
    pub retry_backoff: Duration,
}

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

/// Events in, batches out. Call [`Producer::flush`] before dropping it.
pub struct Producer {
    client: Arc<SharedClient>,
    topic: Arc<str>,
    config: ProducerConfig,
    producer_id: u64,
    next_sequence: u64,
    builder: BatchBuilder,
    batch_started: Option<Instant>,
    in_flight: JoinSet<Result<u64, ClientError>>,
    acked: Arc<AtomicU64>,
}

fn random_producer_id() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos());
    h.write_u32(std::process::id());
    h.finish().max(1)
}

impl Producer {
    /// Connects to `addr` and produces to `topic`.
    pub async fn new(addr: &str, topic: &str, config: ProducerConfig) -> Result<Producer, ClientError> {
        let client = Client::connect(addr).await?;
        Ok(Producer {
            client: Arc::new(SharedClient { addr: addr.to_owned(), current: Mutex::new(client) }),
            topic: topic.into(),
            builder: BatchBuilder::with_capacity(config.max_batch_bytes.min(4 << 20)),
            config,
            producer_id: random_producer_id(),
            next_sequence: 0,
            batch_started: None,
            in_flight: JoinSet::new(),
            acked: Arc::new(AtomicU64::new(0)),
        })
    }

    /// This producer's id.
    pub fn producer_id(&self) -> u64 {
        self.producer_id
    }

    /// Events acknowledged so far.
    pub fn acked(&self) -> u64 {
        self.acked.load(Ordering::Relaxed)
    }

    /// Adds an event; sends the batch when it is full or old enough. Fails with the
    /// first error of an earlier batch that could not be delivered.
    pub async fn send(&mut self, event: &Event) -> Result<(), ClientError> {
        self.reap_finished()?;
        self.builder.push_event(event, flowgate_core::time::now_ms());
        let started = *self.batch_started.get_or_insert_with(Instant::now);
        if self.builder.len() >= self.config.max_batch_events
            || self.builder.records_len() >= self.config.max_batch_bytes
            || started.elapsed() >= self.config.linger
        {
            self.ship().await?;
        }
        Ok(())
    }

    fn reap_finished(&mut self) -> Result<(), ClientError> {
        while let Some(done) = self.in_flight.try_join_next() {
            done.map_err(|e| ClientError::Protocol(format!("send task failed: {e}")))??;
        }
        Ok(())
    }

    async fn ship(&mut self) -> Result<(), ClientError> {
        if self.builder.is_empty() {
            return Ok(());
        }
        self.batch_started = None;
        let stamp = ProducerStamp { producer_id: self.producer_id, sequence: self.next_sequence };
        self.next_sequence += 1;
        let batch = self.builder.finish(self.config.codec, stamp).map_err(|e| ClientError::Protocol(e.to_string()))?;
        let count = u64::from(batch.record_count);
        let bytes = Bytes::from(batch.bytes);
        while self.in_flight.len() >= self.config.max_in_flight.max(1) {
            if let Some(done) = self.in_flight.join_next().await {
                done.map_err(|e| ClientError::Protocol(format!("send task failed: {e}")))??;
            }
        }
        // Queue the first attempt here, in the caller's task, so requests leave in
        // sequence order; only the waiting (and any retry) happens in the background.
        let first = match self.client.get().await {
            Ok(c) => c.produce_queued(&self.topic, bytes.clone(), stamp).await,
            Err(e) => Err(e),
        };
        let (client, topic, acked) = (self.client.clone(), self.topic.clone(), self.acked.clone());
        let (retries, mut backoff) = (self.config.retries, self.config.retry_backoff);
        self.in_flight.spawn(async move {
            let mut attempt = 0;
            let mut pending = Some(first);
            loop {
                let result = match pending.take() {
                    Some(Ok(p)) => p.acks().await,
                    Some(Err(e)) => Err(e),
                    None => match client.get().await {
                        Ok(c) => c.produce(&topic, bytes.clone(), stamp).await,
                        Err(e) => Err(e),
                    },
                };
                match result {
                    // DUPLICATE_SEQUENCE: the engine stored this sequence before (a retry
                    // of a request whose reply was lost).
                    Ok(_) | Err(ClientError::Server { code: crate::ErrorCode::DuplicateSequence, .. }) => {
                        acked.fetch_add(count, Ordering::Relaxed);
                        return Ok(count);
                    }
                    Err(e) if e.is_retriable() && attempt < retries => {
                        attempt += 1;
                        tracing::debug!(error = %e, attempt, sequence = stamp.sequence, "retrying produce");
                        tokio::time::sleep(backoff).await;
                        backoff = backoff.saturating_mul(2);
                    }
                    Err(e) => return Err(e),
                }
            }
        });
        Ok(())
    }

    /// Sends the partial batch and waits for every request. Returns the number of events
    /// acknowledged in total, or the first error.
    pub async fn flush(&mut self) -> Result<u64, ClientError> {
        self.ship().await?;
        let mut first_error = None;
        while let Some(done) = self.in_flight.join_next().await {
            let result = done.map_err(|e| ClientError::Protocol(format!("send task failed: {e}"))).and_then(|r| r);
            if let Err(e) = result {
                first_error.get_or_insert(e);
            }
        }
        match first_error {
            Some(e) => Err(e),
            None => Ok(self.acked()),
        }
    }
}
