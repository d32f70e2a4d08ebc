//! The one way to append to a topic: pick the partition of each record, split a batch
//! that spans partitions, encode what a [`BatchBuilder`] holds, append under a producer
//! rule, and hand back a [`Written`] to wait on for durability.
//!
//! Every writer of a local topic goes through an [`Appender`]: the listeners (client
//! batches and the NDJSON/HTTP lines they build), the engine's side outputs (dead
//! letters, late events), replay topics and the topic sink. So they all route keys with
//! [`partition_for_key`], refuse a split the same way and are timed the same way.
//!
//! Everything here is per batch: records are only read (to verify them and learn their
//! partition) and copied when a batch must be split. Buffers live in a [`Scratch`] the
//! caller keeps, so a steady stream of appends allocates no more than one small vector
//! per batch (the parts of its [`Written`]).

use std::sync::Arc;
use std::time::{Duration, Instant};

use flowgate_core::{partition_for_key, BatchBuilder, BatchError, BatchView, Codec, ProducerStamp};

use crate::error::{LogError, Result};
use crate::partition::{AppendOutcome, Partition};
use crate::producers::SequenceRule;
use crate::topic::Topic;

/// Called after each batch a partition accepted (a retry found already stored included:
/// the caller waited for it all the same), with the time the write took and the batch's
/// record count.
pub type AppendHook = Arc<dyn Fn(Duration, u32) + Send + Sync>;

/// Which partition the records of an append go to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Route {
    /// Each keyed record to [`partition_for_key`]; the keyless ones of a batch together,
    /// to one partition that moves round robin across batches. A batch spanning several
    /// partitions is split, one batch per partition.
    ByKey,
    /// All records to one partition, round robin across calls, whatever their keys.
    RoundRobin,
    /// All records to this partition. For a batch a client encoded, each keyed record
    /// must belong there ([`LogError::KeyInWrongPartition`]): a consumer relies on a key
    /// living in one partition.
    Partition(u32),
}

/// Buffers an append reuses, one set per caller (a connection, a pipeline worker, a
/// sink), so splitting and encoding allocate only while they grow.
#[derive(Debug, Default)]
pub struct Scratch {
    builders: Vec<BatchBuilder>,
    encoded: Vec<u8>,
    /// A built batch about to be split (the split encodes its parts into `encoded`).
    whole: Vec<u8>,
    decompressed: Vec<u8>,
    partition_of: Vec<u32>,
}

impl Scratch {
    /// Gives back capacity above `bytes` per buffer, so one large batch does not pin its
    /// size for the rest of a caller's life.
    pub fn shrink_to(&mut self, bytes: usize) {
        // One builder per partition a split touched, each with its own buffers: even
        // shrunk they add up to many times `bytes` (memory no budget was charged for
        // between appends), so they are dropped and made again by the next split.
        self.builders = Vec::new();
        self.encoded.shrink_to(bytes);
        self.whole.shrink_to(bytes);
        self.decompressed.shrink_to(bytes);
        self.partition_of.shrink_to(bytes / 4);
    }

    /// Bytes of buffer capacity held.
    pub fn capacity_bytes(&self) -> usize {
        self.builders.iter().map(BatchBuilder::capacity_bytes).sum::<usize>()
            + self.encoded.capacity()
            + self.whole.capacity()
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

/// What one append wrote to one partition.
#[derive(Clone, Debug)]
pub struct Part {
    /// The partition written.
    pub partition: Arc<Partition>,
    /// Where the batch landed (or, for a retry already stored, where it landed before).
    pub outcome: AppendOutcome,
}

/// A batch written to the log (the bytes are in the segment files), not yet known
/// durable.
#[derive(Debug)]
pub struct Written {
    parts: Vec<Part>,
}

impl Written {
    /// The part written to each partition, in partition order.
    pub fn parts(&self) -> &[Part] {
        &self.parts
    }

    /// Offsets per partition.
    pub fn acks(&self) -> Vec<Ack> {
        self.parts
            .iter()
            .map(|p| Ack {
                partition: p.partition.id(),
                first_offset: p.outcome.first_offset,
                record_count: p.outcome.record_count,
            })
            .collect()
    }

    /// Events written (or found already stored).
    pub fn events(&self) -> u64 {
        self.parts.iter().map(|p| u64::from(p.outcome.record_count)).sum()
    }

    /// True when waiting for [`Written::durable`] would wait for an fsync.
    pub fn needs_wait(&self) -> bool {
        self.parts.iter().any(|p| p.partition.durable_offset() < p.outcome.end_offset())
    }

    /// Waits until every part meets the configured durability (the fsync policy): what an
    /// acknowledgement to a client must wait for.
    pub async fn durable(&self) -> Result<()> {
        for p in &self.parts {
            p.partition.wait_durable(p.outcome.end_offset()).await?;
        }
        Ok(())
    }

    /// Puts every part on stable storage whatever the fsync policy
    /// ([`Partition::make_durable`]): for writers whose own progress is fsynced and must
    /// not get ahead of what they wrote.
    pub async fn make_durable(&self) -> Result<()> {
        for p in &self.parts {
            p.partition.make_durable(p.outcome.end_offset()).await?;
        }
        Ok(())
    }
}

/// `partition P offsets A..=B, …`: what an error names as stored.
impl std::fmt::Display for Written {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, part) in self.parts.iter().enumerate() {
            let sep = if i == 0 { "" } else { ", " };
            let (first, end) = (part.outcome.first_offset, part.outcome.end_offset());
            write!(f, "{sep}partition {} offsets {first}..={}", part.partition.id(), end.saturating_sub(1))?;
        }
        Ok(())
    }
}

/// How a writer appends: the codec of the batches it encodes, the rule for its producer
/// sequences, and what to tell of each write. Cheap to clone.
#[derive(Clone)]
pub struct Appender {
    codec: Codec,
    rule: SequenceRule,
    on_append: Option<AppendHook>,
}

impl std::fmt::Debug for Appender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Appender")
            .field("codec", &self.codec)
            .field("rule", &self.rule)
            .field("on_append", &self.on_append.is_some())
            .finish()
    }
}

impl Appender {
    /// Appends whose encoded batches use `codec`, checking producer sequences by
    /// [`SequenceRule::Contiguous`] (that of the binary protocol's clients).
    pub fn new(codec: Codec) -> Appender {
        Appender { codec, rule: SequenceRule::Contiguous, on_append: None }
    }

    /// The same, checking producer sequences by `rule`.
    pub fn with_rule(mut self, rule: SequenceRule) -> Appender {
        self.rule = rule;
        self
    }

    /// The same, calling `hook` after each batch written to a partition. Only the write
    /// itself is timed (not verifying or splitting), so every writer's numbers compare.
    pub fn on_append(mut self, hook: AppendHook) -> Appender {
        self.on_append = Some(hook);
        self
    }

    /// The codec of the batches this appender encodes for topics that set none.
    pub fn codec(&self) -> Codec {
        self.codec
    }

    /// The codec of the batches this appender encodes for `topic`: the topic's own
    /// setting, else the appender's.
    pub fn codec_for(&self, topic: &Topic) -> Codec {
        topic.compression().unwrap_or(self.codec)
    }

    /// Appends a batch someone else encoded (a client's PRODUCE). Its checksum and every
    /// record are verified first, so a bad batch stores nothing. A batch whose records
    /// all go to one partition is written as it came (its base offset patched in place);
    /// otherwise ([`Route::ByKey`]) it is split, each part encoded with the batch's own
    /// codec.
    ///
    /// An idempotent batch must name its partition ([`Route::Partition`], else
    /// [`LogError::IdempotentBatchNeedsPartition`]): its sequence is checked per
    /// partition. A batch the route writes whole is stored whole or not at
    /// all. A split one fails before anything is written when a target partition refuses
    /// appends (they are all checked first); should a write fail after another part was
    /// stored, the error is [`LogError::PartiallyStored`], which names what was stored.
    pub fn append_encoded(
        &self,
        topic: &Topic,
        route: Route,
        batch: &mut [u8],
        scratch: &mut Scratch,
    ) -> Result<Written> {
        let target = match route {
            Route::Partition(partition) => {
                // Asked first, so an unknown partition is the error whatever the batch holds.
                let target = topic.partition(partition)?;
                let partitions = topic.partition_count();
                for record in parse_whole(batch)?.records(&mut scratch.decompressed)? {
                    if let Some(key) = record?.key {
                        let expected = partition_for_key(key, partitions);
                        if expected != partition {
                            return Err(LogError::KeyInWrongPartition { partition, expected });
                        }
                    }
                }
                target
            }
            Route::RoundRobin => {
                let view = parse_whole(batch)?;
                let producer_id = view.header.producer.producer_id;
                if producer_id != 0 {
                    return Err(LogError::IdempotentBatchNeedsPartition { producer_id });
                }
                view.validate_records(&mut scratch.decompressed)?;
                topic.partition(topic.next_round_robin())?
            }
            Route::ByKey => {
                let view = parse_whole(batch)?;
                let producer_id = view.header.producer.producer_id;
                if producer_id != 0 {
                    return Err(LogError::IdempotentBatchNeedsPartition { producer_id });
                }
                match self.route_by_key(topic, view, scratch)? {
                    Some(p) => topic.partition(p)?,
                    None => return self.split(topic, batch, view.header.codec()?, scratch),
                }
            }
        };
        let outcome = self.write(target, batch)?;
        Ok(Written { parts: vec![Part { partition: target.clone(), outcome }] })
    }

    /// Encodes the records in `builder` as one batch stamped `stamp` (with the codec of
    /// [`Appender::codec_for`]; the builder is cleared once encoded) and appends it where
    /// `route` says. Under [`Route::RoundRobin`] and [`Route::Partition`] it is one
    /// write, so the batch is stored whole or not at all; keys are not checked against a
    /// named partition (the caller routed them). A `stamp` of an idempotent producer
    /// needs [`Route::Partition`], as in [`Appender::append_encoded`]. [`Route::ByKey`]
    /// splits it as [`Appender::append_encoded`] does.
    pub fn append_built(
        &self,
        topic: &Topic,
        route: Route,
        builder: &mut BatchBuilder,
        stamp: ProducerStamp,
        scratch: &mut Scratch,
    ) -> Result<Written> {
        let target = match route {
            Route::Partition(p) => topic.partition(p)?,
            // A sequence is checked per partition: one that moves would look out of order.
            Route::RoundRobin if stamp.producer_id != 0 => {
                return Err(LogError::IdempotentBatchNeedsPartition { producer_id: stamp.producer_id })
            }
            Route::RoundRobin => topic.partition(topic.next_round_robin())?,
            Route::ByKey => {
                // The split encodes its parts into `scratch.encoded`: the whole batch
                // waits in a buffer of its own.
                let mut whole = std::mem::take(&mut scratch.whole);
                let result = builder
                    .finish_into(self.codec_for(topic), stamp, &mut whole)
                    .map_err(LogError::from)
                    .and_then(|_| self.append_encoded(topic, Route::ByKey, &mut whole, scratch));
                scratch.whole = whole;
                return result;
            }
        };
        builder.finish_into(self.codec_for(topic), stamp, &mut scratch.encoded)?;
        let outcome = self.write(target, &mut scratch.encoded)?;
        Ok(Written { parts: vec![Part { partition: target.clone(), outcome }] })
    }

    /// Reads every record of `view` (verifying it) and notes its partition in
    /// `scratch.partition_of`. Returns the partition when all records share one (the
    /// batch is then written as it came), `None` when it must be split.
    fn route_by_key(&self, topic: &Topic, view: BatchView<'_>, scratch: &mut Scratch) -> Result<Option<u32>> {
        let partitions = topic.partition_count();
        // Asked once per batch, so the batch's keyless records stay together.
        let keyless = topic.next_round_robin();
        scratch.partition_of.clear();
        let mut single = true;
        for record in view.records(&mut scratch.decompressed)? {
            let record = record?;
            // One partition: nothing to decide, but every record is still verified.
            if partitions > 1 {
                let p = record.key.map_or(keyless, |k| partition_for_key(k, partitions));
                if scratch.partition_of.first().is_some_and(|&first| first != p) {
                    single = false;
                }
                scratch.partition_of.push(p);
            }
        }
        Ok(single.then(|| scratch.partition_of.first().copied().unwrap_or(0)))
    }

    /// Writes `batch` (whose records [`Appender::route_by_key`] placed in
    /// `scratch.partition_of`) as one batch per partition, in partition order.
    fn split(&self, topic: &Topic, batch: &[u8], codec: Codec, scratch: &mut Scratch) -> Result<Written> {
        let partitions = topic.partition_count() as usize;
        if scratch.builders.len() < partitions {
            scratch.builders.resize_with(partitions, BatchBuilder::new);
        }
        for builder in &mut scratch.builders {
            builder.clear();
        }
        let (view, _) = BatchView::parse(batch)?;
        for (record, &p) in view.records(&mut scratch.decompressed)?.zip(scratch.partition_of.iter()) {
            scratch.builders[p as usize].push_record(&record?);
        }
        // Refuse before writing anything if a target partition is fenced, so the common
        // failure leaves nothing half-stored (a retry would duplicate the stored part).
        let mut targets = 0;
        for (p, builder) in scratch.builders[..partitions].iter().enumerate() {
            if !builder.is_empty() {
                topic.partition(p as u32)?.check_writable()?;
                targets += 1;
            }
        }
        let mut parts: Vec<Part> = Vec::with_capacity(targets);
        for (p, builder) in scratch.builders[..partitions].iter_mut().enumerate() {
            if builder.is_empty() {
                continue;
            }
            let p = p as u32;
            let result = builder
                .finish_into(codec, ProducerStamp::default(), &mut scratch.encoded)
                .map_err(LogError::from)
                .and_then(|_| {
                    let partition = topic.partition(p)?;
                    Ok(Part { partition: partition.clone(), outcome: self.write(partition, &mut scratch.encoded)? })
                });
            match result {
                Ok(part) => parts.push(part),
                Err(e) if parts.is_empty() => return Err(e),
                Err(e) => {
                    return Err(LogError::PartiallyStored {
                        stored: Written { parts },
                        failed_partition: p,
                        source: Box::new(e),
                    });
                }
            }
        }
        Ok(Written { parts })
    }

    /// The one place a batch reaches a partition, so every append is timed alike.
    fn write(&self, partition: &Partition, batch: &mut [u8]) -> Result<AppendOutcome> {
        let started = Instant::now();
        let outcome = partition.append_with(batch, self.rule)?;
        if let Some(hook) = &self.on_append {
            hook(started.elapsed(), outcome.record_count);
        }
        Ok(outcome)
    }
}

/// The one batch `batch` holds, its checksum verified; trailing bytes are refused.
fn parse_whole(batch: &[u8]) -> Result<BatchView<'_>> {
    let (view, rest) = BatchView::parse(batch)?;
    if !rest.is_empty() {
        return Err(LogError::InvalidBatch(BatchError::BadLength(batch.len() as u64)));
    }
    Ok(view)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Log, LogConfig};
    use proptest::prelude::*;

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

    /// Every record of `partition`, as (key, payload), in offset order.
    fn stored(partition: &Partition) -> Vec<(Option<Vec<u8>>, Vec<u8>)> {
        let mut out = Vec::new();
        let mut offset = partition.start_offset();
        let mut scratch = Vec::new();
        while offset < partition.end_offset() {
            let read = partition.read(offset, 1 << 20).unwrap();
            assert!(!read.batches.is_empty(), "nothing read at {offset}");
            let mut rest = &read.batches[..];
            while !rest.is_empty() {
                let (view, tail) = BatchView::parse(rest).unwrap();
                for record in view.records(&mut scratch).unwrap() {
                    let record = record.unwrap();
                    out.push((record.key.map(<[u8]>::to_vec), record.payload.to_vec()));
                }
                offset = view.last_offset() + 1;
                rest = tail;
            }
        }
        out
    }

    fn fence(partition: &Partition) {
        partition.append(&mut keyed_batch(&["x"])).unwrap();
        partition.inject_fsync_failures(true);
        assert!(partition.sync().is_err());
        partition.inject_fsync_failures(false);
    }

    #[test]
    fn a_split_batch_is_refused_whole_when_one_of_its_partitions_is_fenced() {
        let dir = tempfile::tempdir().unwrap();
        let log = Log::open(dir.path(), LogConfig::default()).unwrap();
        let topic = log.create_topic("t", 2).unwrap();
        let appender = Appender::new(Codec::None);
        let mut scratch = Scratch::default();
        let (k0, k1) = (key_in(0, 2), key_in(1, 2));
        // Partition 1's disk fails an fsync: it is fenced.
        fence(topic.partition(1).unwrap());
        let before: Vec<u64> = topic.partitions().iter().map(|p| p.end_offset()).collect();
        let err = appender
            .append_encoded(&topic, Route::ByKey, &mut keyed_batch(&[&k0, &k1, &k0]), &mut scratch)
            .unwrap_err();
        assert!(matches!(err, LogError::Io { .. }), "{err}");
        let after: Vec<u64> = topic.partitions().iter().map(|p| p.end_offset()).collect();
        assert_eq!(before, after, "nothing stored in partition 0 either: a retry would duplicate it");
        // A batch for the healthy partition alone still goes in.
        appender.append_encoded(&topic, Route::ByKey, &mut keyed_batch(&[&k0]), &mut scratch).unwrap();
    }

    #[test]
    fn a_built_batch_split_by_key_is_refused_whole_when_a_partition_is_fenced() {
        let dir = tempfile::tempdir().unwrap();
        let log = Log::open(dir.path(), LogConfig::default()).unwrap();
        let topic = log.create_topic("t", 3).unwrap();
        let appender = Appender::new(Codec::Lz4);
        let mut scratch = Scratch::default();
        fence(topic.partition(2).unwrap());
        let before: Vec<u64> = topic.partitions().iter().map(|p| p.end_offset()).collect();
        let mut b = BatchBuilder::new();
        for p in [0, 1, 2, 0] {
            b.push_payload(1, Some(key_in(p, 3).as_bytes()), b"{}");
        }
        let err =
            appender.append_built(&topic, Route::ByKey, &mut b, ProducerStamp::default(), &mut scratch).unwrap_err();
        assert!(matches!(err, LogError::Io { .. }), "{err}");
        let after: Vec<u64> = topic.partitions().iter().map(|p| p.end_offset()).collect();
        assert_eq!(before, after);
    }

    #[tokio::test]
    async fn a_split_failing_part_way_names_exactly_the_parts_it_stored_and_they_become_durable() {
        let dir = tempfile::tempdir().unwrap();
        let config = LogConfig { segment_bytes: 1024, fsync: crate::FsyncPolicy::Always, ..LogConfig::default() };
        let log = Log::open(dir.path(), config).unwrap();
        let topic = log.create_topic("t", 2).unwrap();
        let appender = Appender::new(Codec::None);
        let mut scratch = Scratch::default();
        let (k0, k1) = (key_in(0, 2), key_in(1, 2));
        // Partition 1's next append must start a segment, and its directory is gone: the
        // write fails after partition 0's part (partition order) was stored.
        let big = vec![b'x'; 2000];
        let mut b = BatchBuilder::new();
        b.push_payload(1, Some(k1.as_bytes()), &big);
        let mut first = b.finish(Codec::None, ProducerStamp::default()).unwrap().bytes;
        topic.partition(1).unwrap().append(&mut first).unwrap();
        std::fs::remove_dir_all(topic.partition(1).unwrap().dir()).unwrap();
        let err = appender
            .append_encoded(&topic, Route::ByKey, &mut keyed_batch(&[&k0, &k1, &k0]), &mut scratch)
            .unwrap_err();
        let LogError::PartiallyStored { stored, failed_partition, .. } = &err else { panic!("{err}") };
        assert_eq!(*failed_partition, 1);
        assert_eq!(stored.acks(), vec![Ack { partition: 0, first_offset: 0, record_count: 2 }]);
        assert!(err.to_string().contains("partition 0 offsets 0..=1"), "{err}");
        assert_eq!(stored.events(), 2);
        stored.durable().await.unwrap();
        let p0 = topic.partition(0).unwrap();
        assert_eq!(p0.durable_offset(), 2, "what the error names as stored is durable once awaited");
        assert_eq!(stored_keys(p0), vec![k0.clone(), k0]);
    }

    fn stored_keys(partition: &Partition) -> Vec<String> {
        stored(partition).into_iter().map(|(k, _)| String::from_utf8(k.unwrap()).unwrap()).collect()
    }

    #[test]
    fn scratch_gives_back_what_a_split_grew_and_keeps_no_builders() {
        let dir = tempfile::tempdir().unwrap();
        let log = Log::open(dir.path(), LogConfig::default()).unwrap();
        let appender = Appender::new(Codec::None);
        let mut scratch = Scratch::default();
        let big = vec![b'x'; 100 << 10];
        let split = |partitions: u32, scratch: &mut Scratch| {
            let topic = log.create_topic(&format!("t{partitions}"), partitions).unwrap();
            let mut b = BatchBuilder::new();
            for p in 0..partitions {
                b.push_payload(1, Some(key_in(p, partitions).as_bytes()), &big);
            }
            let mut bytes = b.finish(Codec::None, ProducerStamp::default()).unwrap().bytes;
            let written = appender.append_encoded(&topic, Route::ByKey, &mut bytes, scratch).unwrap();
            assert_eq!(written.acks().len(), partitions as usize, "one part per partition");
        };
        split(40, &mut scratch);
        assert!(scratch.capacity_bytes() > 40 * big.len(), "the split grew a builder per partition");
        scratch.shrink_to(64 << 10);
        assert!(scratch.capacity_bytes() <= 3 * (64 << 10), "40 builders are dropped: {}", scratch.capacity_bytes());
        split(4, &mut scratch);
        scratch.shrink_to(64 << 10);
        let kept = scratch.capacity_bytes();
        assert!(kept <= 3 * (64 << 10), "even a few builders are dropped: {kept}");
    }

    #[test]
    fn idempotent_batches_name_their_partition_and_keys_must_belong_there() {
        let dir = tempfile::tempdir().unwrap();
        let log = Log::open(dir.path(), LogConfig::default()).unwrap();
        let topic = log.create_topic("t", 2).unwrap();
        let appender = Appender::new(Codec::None);
        let mut scratch = Scratch::default();
        let stamp = ProducerStamp { producer_id: 3, sequence: 0 };
        let mut b = BatchBuilder::new();
        b.push_payload(1, Some(key_in(1, 2).as_bytes()), b"{}");
        let mut bytes = b.finish(Codec::None, stamp).unwrap().bytes;
        let err = appender.append_encoded(&topic, Route::ByKey, &mut bytes.clone(), &mut scratch).unwrap_err();
        assert!(matches!(err, LogError::IdempotentBatchNeedsPartition { .. }), "{err}");
        let err = appender.append_encoded(&topic, Route::RoundRobin, &mut bytes.clone(), &mut scratch).unwrap_err();
        assert!(matches!(err, LogError::IdempotentBatchNeedsPartition { .. }), "{err}");
        b.push_payload(1, None, b"{}");
        let err = appender.append_built(&topic, Route::RoundRobin, &mut b, stamp, &mut scratch).unwrap_err();
        assert!(matches!(err, LogError::IdempotentBatchNeedsPartition { .. }), "{err}");
        b.clear();
        let err = appender.append_encoded(&topic, Route::Partition(0), &mut bytes.clone(), &mut scratch).unwrap_err();
        assert!(matches!(err, LogError::KeyInWrongPartition { partition: 0, expected: 1 }), "{err}");
        let err = appender.append_encoded(&topic, Route::Partition(2), &mut bytes.clone(), &mut scratch).unwrap_err();
        assert!(matches!(err, LogError::UnknownPartition { .. }), "{err}");
        let written = appender.append_encoded(&topic, Route::Partition(1), &mut bytes, &mut scratch).unwrap();
        assert_eq!(written.acks()[0].partition, 1);
        assert_eq!(topic.partition(0).unwrap().end_offset(), 0);
    }

    #[test]
    fn the_producer_rule_and_the_hook_apply_to_every_write() {
        let dir = tempfile::tempdir().unwrap();
        let log = Log::open(dir.path(), LogConfig::default()).unwrap();
        let topic = log.create_topic("t", 1).unwrap();
        let timed = Arc::new(std::sync::Mutex::new(Vec::new()));
        let seen = timed.clone();
        let appender = Appender::new(Codec::None)
            .with_rule(SequenceRule::Monotonic)
            .on_append(Arc::new(move |_took, records| seen.lock().unwrap().push(records)));
        let mut scratch = Scratch::default();
        let mut b = BatchBuilder::new();
        let mut append = |sequence: u64, events: usize| {
            for _ in 0..events {
                b.push_payload(1, None, b"{}");
            }
            let stamp = ProducerStamp { producer_id: 9, sequence };
            appender.append_built(&topic, Route::Partition(0), &mut b, stamp, &mut scratch)
        };
        // Monotonic: a producer unknown here may start anywhere and leave gaps.
        append(100, 2).unwrap();
        let written = append(150, 3).unwrap();
        assert_eq!(written.acks(), [Ack { partition: 0, first_offset: 2, record_count: 3 }]);
        assert!(matches!(append(120, 1), Err(LogError::DuplicateSequence { .. })));
        assert_eq!(*timed.lock().unwrap(), [2, 3]);
        assert!(b.is_empty(), "the builder is cleared");
    }

    #[tokio::test]
    async fn make_durable_puts_parts_on_disk_whatever_the_policy() {
        let dir = tempfile::tempdir().unwrap();
        let config = LogConfig { fsync: crate::FsyncPolicy::Never, ..LogConfig::default() };
        let log = Log::open(dir.path(), config).unwrap();
        let topic = log.create_topic("t", 2).unwrap();
        let appender = Appender::new(Codec::None);
        let mut scratch = Scratch::default();
        let mut batch = keyed_batch(&[&key_in(0, 2), &key_in(1, 2)]);
        let written = appender.append_encoded(&topic, Route::ByKey, &mut batch, &mut scratch).unwrap();
        assert_eq!(written.events(), 2);
        written.durable().await.unwrap();
        assert!(written.parts().iter().all(|p| p.partition.durable_offset() == 0), "`never` waits for nothing");
        written.make_durable().await.unwrap();
        assert!(written.parts().iter().all(|p| p.partition.durable_offset() == 1));
        assert!(!written.needs_wait());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]

        /// Whatever the keys and the partition count, each keyed record lands in
        /// `partition_for_key`, the keyless ones of a batch together, and each partition
        /// holds its records in the order they came.
        #[test]
        fn records_land_in_their_key_partition_in_order(
            partitions in 1u32..=7,
            batches in prop::collection::vec(
                prop::collection::vec(prop::option::weighted(0.8, prop::collection::vec(any::<u8>(), 0..6)), 1..30),
                1..4,
            ),
            built in any::<bool>(),
        ) {
            let dir = tempfile::tempdir().unwrap();
            let log = Log::open(dir.path(), LogConfig::default()).unwrap();
            let topic = log.create_topic("t", partitions).unwrap();
            let appender = Appender::new(Codec::None);
            let mut scratch = Scratch::default();
            let mut inputs = Vec::new();
            let mut n = 0u32;
            for keys in &batches {
                let mut b = BatchBuilder::new();
                let mut records = Vec::new();
                for key in keys {
                    let payload = n.to_le_bytes().to_vec();
                    n += 1;
                    b.push_payload(1, key.as_deref(), &payload);
                    records.push((key.clone(), payload));
                }
                let written = if built {
                    appender.append_built(&topic, Route::ByKey, &mut b, ProducerStamp::default(), &mut scratch)
                } else {
                    let mut bytes = b.finish(Codec::None, ProducerStamp::default()).unwrap().bytes;
                    appender.append_encoded(&topic, Route::ByKey, &mut bytes, &mut scratch)
                }
                .unwrap();
                prop_assert_eq!(written.events(), records.len() as u64);
                inputs.push(records);
            }
            // Payloads are unique: find where each record went.
            let mut place = std::collections::HashMap::new();
            let mut total = 0;
            for p in 0..partitions {
                let got = stored(topic.partition(p).unwrap());
                // In input order: payloads were numbered as they came.
                let order: Vec<u32> = got.iter().map(|(_, v)| u32::from_le_bytes(v[..4].try_into().unwrap())).collect();
                prop_assert!(order.windows(2).all(|w| w[0] < w[1]), "partition {} out of order: {:?}", p, order);
                total += got.len();
                for record in got {
                    place.insert(record.1.clone(), (p, record));
                }
            }
            let sent = inputs.iter().map(Vec::len).sum::<usize>();
            prop_assert_eq!((total, place.len()), (sent, sent), "each record stored once");
            for records in &inputs {
                let mut keyless = None;
                for (key, payload) in records {
                    let (p, record) = &place[payload];
                    prop_assert_eq!(&record.0, key);
                    match key {
                        Some(k) => prop_assert_eq!(*p, partition_for_key(k, partitions)),
                        None => prop_assert_eq!(*keyless.get_or_insert(*p), *p, "a batch's keyless records stay together"),
                    }
                }
            }
        }
    }
}
