//! `topic`: appends to another topic of this engine, so pipelines chain. The key picks
//! the partition, as for ingest. At-least-once across crashes: after a crash, events
//! since the last checkpoint are appended again.
//!
//! A write appends one batch per destination partition, in partition order. If one of
//! them fails, the runtime retries the write with the same events; the retry appends
//! only to the partitions not yet written (and sends keyless events to the partition the
//! first attempt chose), so a retried write stores each event once.

use std::sync::Arc;

use flowgate_core::{partition_for_key, BatchBuilder, Codec, ProducerStamp};
use flowgate_engine::sink::BoxFuture;
use flowgate_engine::{Sink, SinkEvent, WriteOutcome};
use flowgate_log::{Log, Partition};

use super::resume::Unfinished;

/// How far a failed write got.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Progress {
    /// The topic's partition count when the write started.
    partitions: u32,
    /// Where keyless events go for this batch.
    keyless: u32,
    /// Partitions below this one hold their part of the batch already.
    next_partition: u32,
}

/// Appends to a local topic.
pub struct TopicSink {
    log: Log,
    topic: String,
    name: String,
    builders: Vec<BatchBuilder>,
    /// Per destination partition, the end offset of the last append since the last
    /// commit: what [`Sink::commit`] waits to be durable. One entry per partition, so it
    /// stays bounded however many writes happen between commits.
    written: Vec<Option<(Arc<Partition>, u64)>>,
    unfinished: Option<Unfinished<Progress>>,
}

impl TopicSink {
    /// A sink named `name` (for log lines) into `topic` (created on first write if the
    /// log allows).
    pub fn new(log: Log, topic: &str, name: &str) -> TopicSink {
        TopicSink {
            log,
            topic: topic.to_owned(),
            name: name.to_owned(),
            builders: Vec::new(),
            written: Vec::new(),
            unfinished: None,
        }
    }

    fn write_batch(&mut self, events: &[SinkEvent]) -> anyhow::Result<()> {
        let topic = self.log.topic_or_create(&self.topic)?;
        let n = topic.partition_count();
        let resumed = self.unfinished.take().and_then(|u| u.resume(events, &self.name)).filter(|p| p.partitions == n);
        let mut progress =
            resumed.unwrap_or_else(|| Progress { partitions: n, keyless: topic.next_round_robin(), next_partition: 0 });
        if self.builders.len() < n as usize {
            self.builders.resize_with(n as usize, BatchBuilder::new);
            self.written.resize_with(n as usize, || None);
        }
        for b in &mut self.builders {
            b.clear();
        }
        for e in events {
            let p = e.key.as_deref().map_or(progress.keyless, |k| partition_for_key(k, n));
            if p >= progress.next_partition {
                self.builders[p as usize].push(e.timestamp, e.key.as_deref(), None, std::iter::empty(), &e.payload);
            }
        }
        for p in progress.next_partition..n {
            let builder = &mut self.builders[p as usize];
            if builder.is_empty() {
                continue;
            }
            let appended = builder.finish(Codec::None, ProducerStamp::default()).map_err(anyhow::Error::from).and_then(
                |mut batch| {
                    let partition = topic.partition(p)?;
                    let outcome = partition.append(&mut batch.bytes)?;
                    Ok((partition.clone(), outcome.end_offset()))
                },
            );
            match appended {
                Ok((partition, end)) => {
                    let slot = &mut self.written[p as usize];
                    let end = slot.as_ref().map_or(end, |(_, e)| end.max(*e));
                    *slot = Some((partition, end));
                }
                Err(e) => {
                    progress.next_partition = p;
                    self.unfinished = Some(Unfinished::new(events, progress));
                    return Err(e.context(format!("appending to partition {p} of topic '{}'", self.topic)));
                }
            }
        }
        Ok(())
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

    fn recover<'a>(&'a mut self, _state: &'a serde_json::Value) -> BoxFuture<'a, anyhow::Result<()>> {
        Box::pin(async { Ok(()) })
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
        let mut sink = TopicSink::new(log.clone(), "out", "s");
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
}
