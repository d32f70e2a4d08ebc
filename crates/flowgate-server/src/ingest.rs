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
        // One builder per partition a split touched: with many partitions even shrunk
        // builders add up, so past a few they are dropped and made again when needed.
        const KEPT_BUILDERS: usize = 16;
        if self.builders.len() > KEPT_BUILDERS {
            self.builders = Vec::new();
        }
        for builder in &mut self.builders {
            builder.shrink_to(bytes);
        }
        self.encoded.shrink_to(bytes);
        self.decompressed.shrink_to(bytes);
        self.partition_of.shrink_to(bytes / 4);
    }

    /// Bytes of buffer capacity held.
    pub fn capacity_bytes(&self) -> usize {
        self.builders.iter().map(BatchBuilder::capacity_bytes).sum::<usize>()
            + self.encoded.capacity()
            + self.decompressed.capacity()
            + self.partition_of.capacity() * 4
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

    /// The topic, created on first write if the config allows. The engine's own topics
    /// (the dead-letter topic `_dlq` and the replay topics `_replay.<pipeline>`) take no
    /// writes from producers: a forged entry there would be replayed into a sink.
    pub fn topic(&self, name: &str) -> Result<Arc<Topic>, LogError> {
        if flowgate_engine::runtime::replay::is_engine_topic(name) {
            return Err(LogError::InvalidTopicName {
                name: name.to_owned(),
                reason: "it is written by the engine only (dead letters and their replays)",
            });
        }
        self.log.topic_or_create(name)
    }

    fn append_to(&self, partition: &Arc<Partition>, batch: &mut [u8]) -> Result<AppendOutcome, LogError> {
        let started = Instant::now();
        let outcome = partition.append(batch)?;
        self.metrics.append(started.elapsed(), outcome.record_count);
        Ok(outcome)
    }

    /// Appends a batch a client encoded, split by partition (PRODUCE). Verifies its
    /// checksum and every record first, so a bad batch stores nothing. Keys pick
    /// partitions; keyless records go to one round-robin partition per batch. A batch that
    /// lands in one partition is written as it came (its base offset patched in place);
    /// otherwise it is split.
    ///
    /// Not idempotent: an idempotent batch must name its partition
    /// ([`Ingest::append_to_partition`]). A split batch either is stored whole or fails
    /// before anything is written (every target partition is checked writable first);
    /// should a write fail after another partition's part was stored, the error is
    /// [`LogError::PartiallyStored`], which names exactly what was stored.
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
        let producer = view.header.producer;
        if producer.producer_id != 0 {
            return Err(LogError::IdempotentBatchNeedsPartition { producer_id: producer.producer_id });
        }
        let partitions = topic.partition_count();
        let keyless = topic.next_round_robin();
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
        // Split: one sub-batch per partition, same codec.
        let codec = view.header.codec()?;
        if scratch.builders.len() < partitions as usize {
            scratch.builders.resize_with(partitions as usize, BatchBuilder::new);
        }
        for builder in &mut scratch.builders {
            builder.clear();
        }
        let (view, _) = BatchView::parse(batch)?;
        for (record, &p) in view.records(&mut scratch.decompressed)?.zip(scratch.partition_of.iter()) {
            scratch.builders[p as usize].push_record(&record?);
        }
        // Refuse before writing anything if a target partition is fenced, so the common
        // failure leaves nothing half-stored.
        for p in 0..partitions {
            if !scratch.builders[p as usize].is_empty() {
                topic.partition(p)?.check_writable()?;
            }
        }
        let mut parts: Vec<(Arc<Partition>, AppendOutcome)> = Vec::new();
        for p in 0..partitions {
            let builder = &mut scratch.builders[p as usize];
            if builder.is_empty() {
                continue;
            }
            let result = builder
                .finish_into(codec, ProducerStamp::default(), &mut scratch.encoded)
                .map_err(LogError::from)
                .and_then(|_| {
                    let partition = topic.partition(p)?;
                    Ok((partition.clone(), self.append_to(partition, &mut scratch.encoded)?))
                });
            match result {
                Ok(part) => parts.push(part),
                Err(e) if parts.is_empty() => return Err(e),
                Err(e) => {
                    let stored = parts
                        .iter()
                        .map(|(p, o)| {
                            format!(
                                "partition {} offsets {}..={}",
                                p.id(),
                                o.first_offset,
                                o.end_offset().saturating_sub(1)
                            )
                        })
                        .collect::<Vec<_>>()
                        .join(", ");
                    // Only binary PRODUCE splits a batch across partitions.
                    self.metrics.rejected(crate::metrics::IngestPath::Binary, "partially_stored", 1);
                    return Err(LogError::PartiallyStored { stored, failed_partition: p, source: Box::new(e) });
                }
            }
        }
        Ok(Written { parts })
    }

    /// Appends a batch a client encoded to one partition it named (PRODUCE_PARTITION):
    /// verified like [`Ingest::append_client_batch`], every keyed record must belong to
    /// `partition`, and the batch is written as it came, in one write, so it is stored
    /// whole or not at all. An idempotent batch's sequence is checked in order for that
    /// partition ([`flowgate_log::producers`]).
    pub fn append_to_partition(
        &self,
        topic: &Topic,
        partition: u32,
        batch: &mut [u8],
        scratch: &mut Scratch,
    ) -> Result<Written, LogError> {
        let target = topic.partition(partition)?;
        let (view, rest) = BatchView::parse(batch)?;
        if !rest.is_empty() {
            return Err(LogError::InvalidBatch(flowgate_core::BatchError::BadLength(batch.len() as u64)));
        }
        let partitions = topic.partition_count();
        for record in view.records(&mut scratch.decompressed)? {
            if let Some(key) = record?.key {
                let expected = partition_for_key(key, partitions);
                if expected != partition {
                    return Err(LogError::KeyInWrongPartition { partition, expected });
                }
            }
        }
        let outcome = self.append_to(target, batch)?;
        Ok(Written { parts: vec![(target.clone(), outcome)] })
    }

    /// Encodes the records in `builder` as one batch and appends it to one partition
    /// (round robin across calls) in one write, so it is stored whole or not at all. Used
    /// by the NDJSON and HTTP listeners.
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

#[cfg(test)]
mod tests {
    use super::*;
    use flowgate_log::LogConfig;

    fn keyed_batch(keys: &[&str]) -> Vec<u8> {
        let mut b = BatchBuilder::new();
        for k in keys {
            b.push_payload(1, Some(k.as_bytes()), b"{}");
        }
        b.finish(Codec::None, ProducerStamp::default()).unwrap().bytes
    }

    fn key_in(partition: u32, partitions: u32) -> String {
        (0..).map(|i| format!("k{i}")).find(|k| partition_for_key(k.as_bytes(), partitions) == partition).unwrap()
    }

    #[test]
    fn a_split_batch_is_refused_whole_when_one_of_its_partitions_is_fenced() {
        let dir = tempfile::tempdir().unwrap();
        let log = Log::open(dir.path(), LogConfig::default()).unwrap();
        let topic = log.create_topic("t", 2).unwrap();
        let ingest = Ingest::new(log.clone(), Metrics::new(), Codec::None);
        let mut scratch = Scratch::default();
        let (k0, k1) = (key_in(0, 2), key_in(1, 2));
        // Partition 1's disk fails an fsync: it is fenced.
        let p1 = topic.partition(1).unwrap().clone();
        p1.append(&mut keyed_batch(&[&k1])).unwrap();
        p1.inject_fsync_failures(true);
        assert!(p1.sync().is_err());
        p1.inject_fsync_failures(false);
        let before: Vec<u64> = topic.partitions().iter().map(|p| p.end_offset()).collect();
        let err = ingest.append_client_batch(&topic, &mut keyed_batch(&[&k0, &k1, &k0]), &mut scratch).unwrap_err();
        assert!(matches!(err, LogError::Io { .. }), "{err}");
        let after: Vec<u64> = topic.partitions().iter().map(|p| p.end_offset()).collect();
        assert_eq!(before, after, "nothing stored in partition 0 either: a retry would duplicate it");
        // A batch for the healthy partition alone still goes in.
        ingest.append_client_batch(&topic, &mut keyed_batch(&[&k0]), &mut scratch).unwrap();
    }

    #[test]
    fn scratch_gives_back_what_a_wide_split_grew_and_keeps_few_small_builders() {
        let dir = tempfile::tempdir().unwrap();
        let log = Log::open(dir.path(), LogConfig::default()).unwrap();
        let ingest = Ingest::new(log.clone(), Metrics::new(), Codec::None);
        let mut scratch = Scratch::default();
        let big = vec![b'x'; 100 << 10];
        let split = |partitions: u32, scratch: &mut Scratch| {
            let topic = log.create_topic(&format!("t{partitions}"), partitions).unwrap();
            let mut b = BatchBuilder::new();
            for p in 0..partitions {
                b.push_payload(1, Some(key_in(p, partitions).as_bytes()), &big);
            }
            let mut bytes = b.finish(Codec::None, ProducerStamp::default()).unwrap().bytes;
            let written = ingest.append_client_batch(&topic, &mut bytes, scratch).unwrap();
            assert_eq!(written.acks().len(), partitions as usize, "one part per partition");
        };
        split(40, &mut scratch);
        assert!(scratch.capacity_bytes() > 40 * big.len(), "the split grew a builder per partition");
        scratch.shrink_to(64 << 10);
        assert!(scratch.capacity_bytes() <= 3 * (64 << 10), "40 builders are dropped: {}", scratch.capacity_bytes());
        split(4, &mut scratch);
        scratch.shrink_to(64 << 10);
        let kept = scratch.capacity_bytes();
        assert!(kept <= (4 * 2 + 3) * (64 << 10), "4 builders are kept, shrunk: {kept}");
    }

    #[test]
    fn idempotent_batches_name_their_partition_and_keys_must_belong_there() {
        let dir = tempfile::tempdir().unwrap();
        let log = Log::open(dir.path(), LogConfig::default()).unwrap();
        let topic = log.create_topic("t", 2).unwrap();
        let ingest = Ingest::new(log.clone(), Metrics::new(), Codec::None);
        let mut scratch = Scratch::default();
        let stamp = ProducerStamp { producer_id: 3, sequence: 0 };
        let mut b = BatchBuilder::new();
        b.push_payload(1, Some(key_in(1, 2).as_bytes()), b"{}");
        let mut bytes = b.finish(Codec::None, stamp).unwrap().bytes;
        let err = ingest.append_client_batch(&topic, &mut bytes.clone(), &mut scratch).unwrap_err();
        assert!(matches!(err, LogError::IdempotentBatchNeedsPartition { .. }), "{err}");
        let err = ingest.append_to_partition(&topic, 0, &mut bytes.clone(), &mut scratch).unwrap_err();
        assert!(matches!(err, LogError::KeyInWrongPartition { partition: 0, expected: 1 }), "{err}");
        let written = ingest.append_to_partition(&topic, 1, &mut bytes, &mut scratch).unwrap();
        assert_eq!(written.acks()[0].partition, 1);
        assert_eq!(topic.partition(0).unwrap().end_offset(), 0);
    }
}
