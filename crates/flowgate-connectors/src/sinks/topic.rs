//! `topic`: appends to another topic of this engine, so pipelines chain. The key picks
//! the partition, as for ingest. At-least-once: after a crash, events since the last
//! checkpoint are appended again.

use std::sync::Arc;

use flowgate_core::{partition_for_key, BatchBuilder, Codec, ProducerStamp};
use flowgate_engine::sink::BoxFuture;
use flowgate_engine::{Sink, SinkEvent};
use flowgate_log::{Log, Partition};

/// Appends to a local topic.
pub struct TopicSink {
    log: Log,
    topic: String,
    builders: Vec<BatchBuilder>,
    written: Vec<(Arc<Partition>, u64)>,
}

impl TopicSink {
    /// A sink into `topic` (created on first write if the log allows).
    pub fn new(log: Log, topic: &str) -> TopicSink {
        TopicSink { log, topic: topic.to_owned(), builders: Vec::new(), written: Vec::new() }
    }
}

impl Sink for TopicSink {
    fn write<'a>(&'a mut self, events: &'a [SinkEvent]) -> BoxFuture<'a, anyhow::Result<()>> {
        Box::pin(async move {
            let topic = self.log.topic_or_create(&self.topic)?;
            let n = topic.partition_count();
            if self.builders.len() < n as usize {
                self.builders.resize_with(n as usize, BatchBuilder::new);
            }
            let keyless = topic.next_round_robin();
            for e in events {
                let p = e.key.as_deref().map_or(keyless, |k| partition_for_key(k, n));
                self.builders[p as usize].push(e.timestamp, e.key.as_deref(), None, std::iter::empty(), &e.payload);
            }
            for (p, builder) in self.builders.iter_mut().enumerate() {
                if builder.is_empty() {
                    continue;
                }
                let mut batch = builder.finish(Codec::None, ProducerStamp::default())?;
                let partition = topic.partition(p as u32)?;
                let outcome = partition.append(&mut batch.bytes)?;
                self.written.push((partition.clone(), outcome.end_offset()));
            }
            Ok(())
        })
    }

    fn commit(&mut self) -> BoxFuture<'_, anyhow::Result<serde_json::Value>> {
        Box::pin(async move {
            for (p, end) in self.written.drain(..) {
                p.wait_durable(end).await?;
            }
            Ok(serde_json::Value::Null)
        })
    }

    fn recover<'a>(&'a mut self, _state: &'a serde_json::Value) -> BoxFuture<'a, anyhow::Result<()>> {
        Box::pin(async { Ok(()) })
    }
}
