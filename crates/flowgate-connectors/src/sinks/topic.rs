//! `topic`: appends to another topic of this engine, so pipelines chain. The key picks
//! the partition, as for ingest. Exactly once in effect across crashes, through the
//! log's idempotent producers:
//!
//! - **A producer per destination partition.** Each sink instance (one per source
//!   partition) appends to a destination partition as a producer whose id is derived
//!   from (pipeline, sink, source topic and its creation time, source partition,
//!   destination topic, destination partition): the same after a restart, another for
//!   a source topic deleted and created again (its offsets start over).
//! - **The source offset is the sequence.** A batch's sequence is the source offset of
//!   its last event, appended under the log's monotonic rule
//!   ([`SequenceRule::Monotonic`]: above the last stored sequence, gaps allowed, as a
//!   filter leaves them). The destination partition keeps the last sequence with its
//!   batches (rebuilt from them on start, so it always matches what is stored). Before
//!   appending, the sink drops the events at or below it: after a crash, the replay
//!   of events since the last checkpoint appends only those not stored before, however
//!   the replay is batched. A batch refused as a duplicate counts as delivered.
//! - **Keyless events go where their offset says**: a block of [`KEYLESS_SPAN`] source
//!   offsets goes to one destination partition (spread by source partition), so a
//!   replay sends each event where it went the first time.
//! - **Events a processor made** (aggregate results; their offset is `u64::MAX`) have
//!   no source offset to stand for them: they are appended without a producer stamp,
//!   at least once (a crash before the checkpoint appends them again), and keyless ones
//!   go round robin, one partition per write.
//!
//! The guarantee holds while the destination partition remembers the producer (the
//! `log.max_producers_per_partition` most recently active producers are) and its
//! partition count does not change between the crash and the replay.
//!
//! A write appends one batch per destination partition and run of events (stamped or
//! made), in partition order. If one fails, the runtime retries the write with the same
//! events; the retry appends only what the first attempt did not (and sends keyless
//! made events to the partition the first attempt chose), so a retried write stores
//! each event once.

use std::sync::Arc;

use flowgate_core::{partition_for_key, BatchBuilder, Codec, ProducerStamp};
use flowgate_engine::sink::BoxFuture;
use flowgate_engine::{Sink, SinkEvent, SinkPlace, WriteOutcome};
use flowgate_log::append::{Appender, Route, Scratch};
use flowgate_log::{Log, LogError, Partition, SequenceRule};
use serde::{Deserialize, Serialize};

use super::registry::{BuildContext, SinkConnector};
use super::resume::Unfinished;

/// Source offsets per block of keyless events that go to one destination partition.
pub const KEYLESS_SPAN: u64 = 4096;

/// `type = "topic"`: another topic of this engine.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TopicConfig {
    /// The topic (created on first write if the log allows).
    pub topic: String,
}

impl SinkConnector for TopicSink {
    const TYPE: &'static str = "topic";
    type Config = TopicConfig;

    fn validate(c: &TopicConfig) -> anyhow::Result<()> {
        flowgate_log::validate_topic_name(&c.topic)?;
        // A forged entry there would be replayed into sinks, and replay topics have one
        // writer, the replay.
        anyhow::ensure!(
            !flowgate_engine::runtime::replay::is_engine_topic(&c.topic),
            "topic '{}' is written by the engine only (dead letters and their replays); choose another",
            c.topic
        );
        Ok(())
    }

    fn build(c: TopicConfig, cx: &BuildContext<'_>) -> anyhow::Result<Box<dyn Sink>> {
        Ok(Box::new(TopicSink::new(cx.log.clone(), &c.topic, cx.place, &cx.sink.name)))
    }
}

/// Bytes of encoding buffer a topic sink keeps between writes.
const SCRATCH_KEPT_BYTES: usize = 1 << 20;

/// How far a failed write got.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Progress {
    /// The topic's partition count when the write started.
    partitions: u32,
    /// Where keyless events a processor made go for this batch.
    keyless: u32,
    /// Partitions below this one hold their part of the batch already.
    next_partition: u32,
    /// In `next_partition`, runs below this one are stored already.
    next_run: usize,
}

/// Appends to a local topic.
pub struct TopicSink {
    log: Log,
    topic: String,
    name: String,
    /// What the producer ids are derived from, but the destination partition.
    producer_seed: u64,
    source_partition: u32,
    /// Per destination partition, the indices of the write's events that go there.
    routed: Vec<Vec<usize>>,
    builder: BatchBuilder,
    /// Appends under the monotonic rule: the sequence is a source offset, gaps allowed.
    appender: Appender,
    scratch: Scratch,
    /// Per destination partition, the end offset of the last append since the last
    /// commit: what [`Sink::commit`] waits to be durable. One entry per partition, so it
    /// stays bounded however many writes happen between commits.
    written: Vec<Option<(Arc<Partition>, u64)>>,
    unfinished: Option<Unfinished<Progress>>,
}

impl TopicSink {
    /// A sink named `name` (for log lines and its producer ids) running at `place`, into
    /// `topic` (created on first write if the log allows).
    pub fn new(log: Log, topic: &str, place: &SinkPlace, name: &str) -> TopicSink {
        let source_created = log.topic(&place.topic).map_or(0, |t| t.created_ms());
        let mut seed = Fnv::new();
        for field in [place.pipeline.as_bytes(), name.as_bytes(), place.topic.as_bytes(), topic.as_bytes()] {
            seed.field(field);
        }
        seed.field(&source_created.to_le_bytes());
        seed.field(&place.partition.to_le_bytes());
        TopicSink {
            log,
            topic: topic.to_owned(),
            name: name.to_owned(),
            producer_seed: seed.0,
            source_partition: place.partition,
            routed: Vec::new(),
            builder: BatchBuilder::new(),
            appender: Appender::new(Codec::None).with_rule(SequenceRule::Monotonic),
            scratch: Scratch::default(),
            written: Vec::new(),
            unfinished: None,
        }
    }

    /// The producer id of this sink instance in destination partition `partition`:
    /// derived, never stored, so a restart finds the same one; never 0 (no producer).
    fn producer_id(&self, partition: u32) -> u64 {
        let mut h = Fnv(self.producer_seed);
        h.field(&partition.to_le_bytes());
        h.0.max(1)
    }

    fn write_batch(&mut self, events: &[SinkEvent]) -> anyhow::Result<()> {
        let topic = self.log.topic_or_create(&self.topic)?;
        let n = topic.partition_count();
        let resumed = self.unfinished.take().and_then(|u| u.resume(events, &self.name)).filter(|p| p.partitions == n);
        let mut progress = resumed.unwrap_or_else(|| Progress {
            partitions: n,
            keyless: topic.next_round_robin(),
            next_partition: 0,
            next_run: 0,
        });
        if self.routed.len() < n as usize {
            self.routed.resize_with(n as usize, Vec::new);
            self.written.resize_with(n as usize, || None);
        }
        for r in &mut self.routed {
            r.clear();
        }
        for (i, e) in events.iter().enumerate() {
            let p = match (&e.key, e.offset) {
                (Some(k), _) => partition_for_key(k, n),
                (None, u64::MAX) => progress.keyless,
                (None, offset) => keyless_partition(offset, self.source_partition, n),
            };
            if p >= progress.next_partition {
                self.routed[p as usize].push(i);
            }
        }
        let mut skipped = 0usize;
        for p in progress.next_partition..n {
            let routed = std::mem::take(&mut self.routed[p as usize]);
            let result = self.append_runs(&topic, p, events, &routed, &mut progress, &mut skipped);
            self.routed[p as usize] = routed;
            if let Err(e) = result {
                self.unfinished = Some(Unfinished::new(events, progress));
                return Err(e.context(format!("appending to partition {p} of topic '{}'", self.topic)));
            }
            progress.next_run = 0;
        }
        // A large write's encoding buffer is not kept for the sink's life.
        self.scratch.shrink_to(SCRATCH_KEPT_BYTES);
        if skipped > 0 {
            tracing::info!(
                sink = %self.name,
                topic = %self.topic,
                skipped,
                "events the topic holds already (appended before a restart) were not appended again"
            );
        }
        Ok(())
    }

    /// Appends partition `p`'s share of the write: one batch per run of events that are
    /// all stamped (they have a source offset) or all made by a processor, in order,
    /// from run `progress.next_run` on. On failure `progress` names the failed run.
    fn append_runs(
        &mut self,
        topic: &flowgate_log::Topic,
        p: u32,
        events: &[SinkEvent],
        routed: &[usize],
        progress: &mut Progress,
        skipped: &mut usize,
    ) -> anyhow::Result<()> {
        if routed.is_empty() {
            return Ok(());
        }
        let partition = topic.partition(p)?;
        let producer_id = self.producer_id(p);
        let mut stored_up_to = partition.producer_last_sequence(producer_id);
        let made = |i: &usize| events[*i].offset == u64::MAX;
        let start_run = if p == progress.next_partition { progress.next_run } else { 0 };
        for (run_index, run) in routed.chunk_by(|a, b| made(a) == made(b)).enumerate().skip(start_run) {
            let stamped = !made(&run[0]);
            let mut last_offset = None;
            for &i in run {
                let e = &events[i];
                if stamped {
                    if stored_up_to.is_some_and(|s| e.offset <= s) {
                        *skipped += 1;
                        continue;
                    }
                    last_offset = Some(e.offset);
                }
                self.builder.push(e.timestamp, e.key.as_deref(), None, std::iter::empty(), &e.payload);
            }
            if self.builder.is_empty() {
                continue;
            }
            let stamp = match last_offset {
                Some(sequence) => ProducerStamp { producer_id, sequence },
                None => ProducerStamp::default(),
            };
            let appended = match self.appender.append_built(
                topic,
                Route::Partition(p),
                &mut self.builder,
                stamp,
                &mut self.scratch,
            ) {
                Ok(written) => Ok(written.parts().iter().map(|part| part.outcome.end_offset()).max()),
                // Stored before (by an instance this one replaced): delivered.
                Err(LogError::DuplicateSequence { .. }) => Ok(None),
                Err(e) => Err(anyhow::Error::from(e)),
            };
            match appended {
                Ok(end) => {
                    if let Some(end) = end {
                        let slot = &mut self.written[p as usize];
                        let end = slot.as_ref().map_or(end, |(_, e)| end.max(*e));
                        *slot = Some((partition.clone(), end));
                    }
                    if let Some(sequence) = last_offset {
                        stored_up_to = Some(stored_up_to.map_or(sequence, |s| s.max(sequence)));
                    }
                }
                Err(e) => {
                    self.builder.clear();
                    progress.next_partition = p;
                    progress.next_run = run_index;
                    return Err(e);
                }
            }
        }
        Ok(())
    }
}

/// The destination partition of a keyless event with a source offset: a function of
/// the event alone, so that a replay sends it where it went before.
fn keyless_partition(offset: u64, source_partition: u32, partitions: u32) -> u32 {
    let n = u64::from(partitions.max(1));
    let block = (offset / KEYLESS_SPAN) % n;
    let spread = u64::from(source_partition) % n;
    // Both are below n, a u32: the sum fits and its remainder fits a u32.
    u32::try_from((block + spread) % n).unwrap_or(0)
}

/// FNV-1a (64 bit), over length-prefixed fields: a hash whose values never change with
/// the Rust version or the process, as derived producer ids must not.
struct Fnv(u64);

impl Fnv {
    fn new() -> Fnv {
        Fnv(0xcbf2_9ce4_8422_2325)
    }

    fn field(&mut self, bytes: &[u8]) {
        let len = u64::try_from(bytes.len()).unwrap_or(u64::MAX);
        for b in len.to_le_bytes().iter().chain(bytes) {
            self.0 ^= u64::from(*b);
            self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        }
    }
}

impl Sink for TopicSink {
    fn write<'a>(&'a mut self, events: &'a [SinkEvent]) -> BoxFuture<'a, anyhow::Result<WriteOutcome>> {
        Box::pin(async move { self.write_batch(events).map(|()| WriteOutcome::delivered()) })
    }

    fn commit(&mut self) -> BoxFuture<'_, anyhow::Result<serde_json::Value>> {
        Box::pin(async move {
            for slot in &mut self.written {
                if let Some((partition, end)) = slot.take() {
                    if let Err(e) = partition.make_durable(end).await {
                        // Keep waiting for it at the next commit rather than forget it.
                        *slot = Some((partition, end));
                        return Err(e.into());
                    }
                }
            }
            Ok(serde_json::Value::Null)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use flowgate_core::BatchView;
    use flowgate_log::LogConfig;

    fn events(range: std::ops::Range<u64>) -> Vec<SinkEvent> {
        range
            .map(|i| SinkEvent {
                partition: 0,
                offset: i,
                timestamp: 1,
                key: (i % 3 != 0).then(|| Bytes::from(format!("k{i}"))),
                payload: Bytes::from(format!("{{\"n\":{i},\"pad\":\"{}\"}}", "x".repeat(200))),
            })
            .collect()
    }

    fn place() -> SinkPlace {
        SinkPlace { pipeline: "p".into(), topic: "in".into(), partition: 0 }
    }

    /// Events a processor made: no source offset.
    fn made(range: std::ops::Range<u64>) -> Vec<SinkEvent> {
        let mut out = events(range);
        for e in &mut out {
            e.offset = u64::MAX;
        }
        out
    }

    fn stored(log: &Log, topic: &str) -> Vec<u64> {
        let mut out = Vec::new();
        let mut scratch = Vec::new();
        for p in log.topic(topic).unwrap().partitions() {
            let mut offset = p.start_offset();
            while offset < p.end_offset() {
                let r = p.read(offset, 1 << 20).unwrap();
                let mut rest = &r.batches[..];
                while !rest.is_empty() {
                    let (view, tail) = BatchView::parse(rest).unwrap();
                    for rec in view.records(&mut scratch).unwrap() {
                        let v: serde_json::Value = serde_json::from_slice(rec.unwrap().payload).unwrap();
                        out.push(v["n"].as_u64().unwrap());
                    }
                    offset = view.last_offset() + 1;
                    rest = tail;
                }
            }
        }
        out.sort_unstable();
        out
    }

    /// A real fault: a directory where partition 1's next segment file must be created
    /// makes its roll, hence its append, fail until the directory goes.
    #[tokio::test]
    async fn a_retry_after_a_later_partition_failed_stores_each_event_once() {
        let dir = tempfile::tempdir().unwrap();
        let config = LogConfig { segment_bytes: 1024, ..LogConfig::default() };
        let log = Log::open(dir.path(), config).unwrap();
        let topic = log.create_topic("out", 3).unwrap();
        let mut sink = TopicSink::new(log.clone(), "out", &place(), "s");
        sink.write(&events(0..30)).await.unwrap();
        let blocker =
            topic.partition(1).unwrap().dir().join(format!("{:020}.log", topic.partition(1).unwrap().end_offset()));
        std::fs::create_dir(&blocker).unwrap();
        let batch = events(30..90);
        let err = sink.write(&batch).await.unwrap_err();
        assert!(format!("{err:#}").contains("partition 1"), "{err:#}");
        // Failing again must not append partition 0's part again either.
        sink.write(&batch).await.unwrap_err();
        std::fs::remove_dir(&blocker).unwrap();
        sink.write(&batch).await.unwrap();
        sink.commit().await.unwrap();
        assert_eq!(stored(&log, "out"), (0..90).collect::<Vec<u64>>(), "every event exactly once");
        assert!(sink.written.len() <= 3);
    }

    /// A restart replays the events since the last checkpoint in other batches than
    /// the first run wrote them in: each is stored once, gaps (filtered events) and all.
    #[tokio::test]
    async fn a_replay_after_a_restart_stores_nothing_twice_however_it_is_batched() {
        let dir = tempfile::tempdir().unwrap();
        let log = Log::open(dir.path(), LogConfig::default()).unwrap();
        log.create_topic("out", 3).unwrap();
        let unfiltered =
            |r: std::ops::Range<u64>| events(r).into_iter().filter(|e| e.offset % 7 != 3).collect::<Vec<_>>();
        let mut first = TopicSink::new(log.clone(), "out", &place(), "s");
        for chunk in unfiltered(0..100).chunks(30) {
            first.write(chunk).await.unwrap();
        }
        // The crash: a new instance (same pipeline, sink and place) from the checkpoint at 40.
        let mut again = TopicSink::new(log.clone(), "out", &place(), "s");
        for chunk in unfiltered(40..160).chunks(17) {
            again.write(chunk).await.unwrap();
        }
        let expected: Vec<u64> = (0..160).filter(|o| o % 7 != 3).collect();
        assert_eq!(stored(&log, "out"), expected, "every event once");

        // Another sink (or pipeline) writing the same source offsets is another producer.
        let mut other = TopicSink::new(log.clone(), "out", &place(), "other");
        other.write(&events(0..5)).await.unwrap();
        assert_eq!(stored(&log, "out").len(), expected.len() + 5);
    }

    /// Events a processor made have no offset to deduplicate by: stored every time, and
    /// in order with the stamped events around them.
    #[tokio::test]
    async fn made_events_are_at_least_once_and_keep_their_place() {
        let dir = tempfile::tempdir().unwrap();
        let log = Log::open(dir.path(), LogConfig::default()).unwrap();
        log.create_topic("out", 1).unwrap();
        let mut batch = events(0..3);
        batch.extend(made(100..102));
        batch.extend(events(3..5));
        let mut sink = TopicSink::new(log.clone(), "out", &place(), "s");
        sink.write(&batch).await.unwrap();
        let mut again = TopicSink::new(log.clone(), "out", &place(), "s");
        again.write(&batch).await.unwrap();
        let mut order = Vec::new();
        let p = log.topic("out").unwrap().partition(0).unwrap().clone();
        let r = p.read(0, 1 << 20).unwrap();
        let mut rest = &r.batches[..];
        let mut scratch = Vec::new();
        while !rest.is_empty() {
            let (view, tail) = flowgate_core::BatchView::parse(rest).unwrap();
            for rec in view.records(&mut scratch).unwrap() {
                let v: serde_json::Value = serde_json::from_slice(rec.unwrap().payload).unwrap();
                order.push(v["n"].as_u64().unwrap());
            }
            rest = tail;
        }
        assert_eq!(order, [0, 1, 2, 100, 101, 3, 4, 100, 101]);
    }

    #[test]
    fn keyless_events_go_where_their_offset_says() {
        assert_eq!(keyless_partition(0, 0, 3), keyless_partition(KEYLESS_SPAN - 1, 0, 3));
        assert_ne!(keyless_partition(0, 0, 3), keyless_partition(KEYLESS_SPAN, 0, 3));
        assert_ne!(keyless_partition(0, 0, 3), keyless_partition(0, 1, 3));
        assert!(keyless_partition(u64::MAX - 1, u32::MAX, u32::MAX) < u32::MAX);
        assert_eq!(keyless_partition(12345, 7, 1), 0);
    }

    #[test]
    fn producer_ids_are_stable_and_distinct() {
        let dir = tempfile::tempdir().unwrap();
        let log = Log::open(dir.path(), LogConfig::default()).unwrap();
        let a = TopicSink::new(log.clone(), "out", &place(), "s");
        let b = TopicSink::new(log.clone(), "out", &place(), "s");
        assert_eq!(a.producer_id(0), b.producer_id(0));
        assert_ne!(a.producer_id(0), a.producer_id(1));
        let other_partition = SinkPlace { partition: 1, ..place() };
        assert_ne!(a.producer_id(0), TopicSink::new(log.clone(), "out", &other_partition, "s").producer_id(0));
        assert_ne!(a.producer_id(0), TopicSink::new(log.clone(), "out2", &place(), "s").producer_id(0));
        // Pinned: a change would make every running topic sink a new producer after an
        // upgrade, and its replay a duplicate.
        let mut h = Fnv::new();
        h.field(b"p");
        assert_eq!(h.0, 0x529a_5cdc_8ff5_853c_u64, "{:#x}", h.0);
    }
}
