//! The append path shared by every listener: split a batch by partition, write it, and
//! wait for the durability the config asks for.

use std::sync::Arc;
use std::time::Instant;

use flowgate_core::{partition_for_key, BatchBuilder, BatchView, Codec, ProducerStamp};
use flowgate_log::{AppendOutcome, Log, LogError, Partition, Topic};

use crate::metrics::Metrics;

/// Per-connection scratch buffers, so splitting and encoding reuse memory.
#[derive(Debug, Default)]
pub struct Scratch {
    builders: Vec<BatchBuilder>,
    encoded: Vec<u8>,
    decompressed: Vec<u8>,
    partition_of: Vec<u32>,
}

impl Scratch {
    /// Gives back capacity above `bytes` per buffer, so one large batch does not pin its
    /// size for the rest of a connection's life.
    pub fn shrink_to(&mut self, bytes: usize) {
        for builder in &mut self.builders {
            builder.shrink_to(bytes);
        }
        self.encoded.shrink_to(bytes);
        self.decompressed.shrink_to(bytes);
        self.partition_of.shrink_to(bytes / 4);
    }
}

/// One partition's share of an appended batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ack {
    /// Partition number.
    pub partition: u32,
    /// First offset assigned.
    pub first_offset: u64,
    /// Records that got consecutive offsets from `first_offset`.
    pub record_count: u32,
}

/// A batch written to the log, not yet known durable.
#[derive(Debug)]
pub struct Written {
    parts: Vec<(Arc<Partition>, AppendOutcome)>,
}

impl Written {
    /// Offsets per partition.
    pub fn acks(&self) -> Vec<Ack> {
        self.parts
            .iter()
            .map(|(p, o)| Ack { partition: p.id(), first_offset: o.first_offset, record_count: o.record_count })
            .collect()
    }

    /// Events written (or found already stored).
    pub fn events(&self) -> u64 {
        self.parts.iter().map(|(_, o)| u64::from(o.record_count)).sum()
    }

    /// True when the ack must wait for an fsync.
    pub fn needs_wait(&self) -> bool {
        self.parts.iter().any(|(p, o)| p.durable_offset() < o.end_offset())
    }

    /// Waits until the configured durability is met for every part.
    pub async fn durable(&self) -> Result<(), LogError> {
        for (p, o) in &self.parts {
            p.wait_durable(o.end_offset()).await?;
        }
        Ok(())
    }
}

/// The shared append path.
#[derive(Debug, Clone)]
pub struct Ingest {
    log: Log,
    metrics: Arc<Metrics>,
    codec: Codec,
}

impl Ingest {
    /// An append path into `log`; batches the server builds use `codec`.
    pub fn new(log: Log, metrics: Arc<Metrics>, codec: Codec) -> Ingest {
        Ingest { log, metrics, codec }
    }

    /// The log.
    pub fn log(&self) -> &Log {
        &self.log
    }

    /// The metrics.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// The topic, created on first write if the config allows.
    pub fn topic(&self, name: &str) -> Result<Arc<Topic>, LogError> {
        self.log.topic_or_create(name)
    }

    fn append_to(&self, partition: &Arc<Partition>, batch: &mut [u8]) -> Result<AppendOutcome, LogError> {
        let started = Instant::now();
        let outcome = partition.append(batch)?;
        self.metrics.append(started.elapsed(), outcome.record_count);
        Ok(outcome)
    }

    /// Appends a batch a client encoded. Verifies its checksum and every record first, so
    /// a bad batch stores nothing. Keys pick partitions; keyless records go to one
    /// round-robin partition per batch. A batch that lands in one partition is written
    /// as it came (its base offset patched in place); otherwise it is split.
    pub fn append_client_batch(
        &self,
        topic: &Topic,
        batch: &mut [u8],
        scratch: &mut Scratch,
    ) -> Result<Written, LogError> {
        let (view, rest) = BatchView::parse(batch)?;
        if !rest.is_empty() {
            return Err(LogError::InvalidBatch(flowgate_core::BatchError::BadLength(batch.len() as u64)));
        }
        let partitions = topic.partition_count();
        let producer = view.header.producer;
        // Keyless records go round robin; an idempotent batch's partition follows from
        // its (producer, sequence), so a retry lands where the first attempt did.
        let keyless = if producer.producer_id != 0 {
            let mut id = [0u8; 16];
            id[..8].copy_from_slice(&producer.producer_id.to_le_bytes());
            id[8..].copy_from_slice(&producer.sequence.to_le_bytes());
            partition_for_key(&id, partitions)
        } else {
            topic.next_round_robin()
        };
        scratch.partition_of.clear();
        let mut single = true;
        for record in view.records(&mut scratch.decompressed)? {
            let record = record?;
            if partitions > 1 {
                let p = record.key.map_or(keyless, |k| partition_for_key(k, partitions));
                if scratch.partition_of.first().is_some_and(|&first| first != p) {
                    single = false;
                }
                scratch.partition_of.push(p);
            }
        }
        if single {
            let p = scratch.partition_of.first().copied().unwrap_or(0);
            let partition = topic.partition(p)?;
            let outcome = self.append_to(partition, batch)?;
            return Ok(Written { parts: vec![(partition.clone(), outcome)] });
        }
        // Split: one sub-batch per partition, same codec and producer stamp (dedup is
        // per partition, so a retry is still recognised in each).
        let header = view.header;
        let codec = header.codec()?;
        let stamp: ProducerStamp = header.producer;
        if scratch.builders.len() < partitions as usize {
            scratch.builders.resize_with(partitions as usize, BatchBuilder::new);
        }
        let (view, _) = BatchView::parse(batch)?;
        for (record, &p) in view.records(&mut scratch.decompressed)?.zip(scratch.partition_of.iter()) {
            scratch.builders[p as usize].push_record(&record?);
        }
        let mut parts = Vec::new();
        for p in 0..partitions {
            let builder = &mut scratch.builders[p as usize];
            if builder.is_empty() {
                continue;
            }
            builder.finish_into(codec, stamp, &mut scratch.encoded)?;
            let partition = topic.partition(p)?;
            let outcome = self.append_to(partition, &mut scratch.encoded)?;
            parts.push((partition.clone(), outcome));
        }
        Ok(Written { parts })
    }

    /// Encodes the records in `builder` as one batch and appends it to one partition
    /// (round robin across calls). Used by the NDJSON and HTTP listeners.
    pub fn append_built(
        &self,
        topic: &Topic,
        builder: &mut BatchBuilder,
        scratch: &mut Scratch,
    ) -> Result<Written, LogError> {
        builder.finish_into(self.codec, ProducerStamp::default(), &mut scratch.encoded)?;
        let partition = topic.partition(topic.next_round_robin())?;
        let outcome = self.append_to(partition, &mut scratch.encoded)?;
        Ok(Written { parts: vec![(partition.clone(), outcome)] })
    }
}
