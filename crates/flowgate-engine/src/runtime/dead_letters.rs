//! The dead-letter topic [`DLQ_TOPIC`], and the appends a checkpoint must wait for.
//!
//! Every event a pipeline cannot deliver becomes one entry, whoever failed it — a
//! processor, the sink driver, or the log (a stored batch that cannot be read):
//!
//! ```json
//! {"pipeline": "p", "processor": "dedup-1", "sink": null, "category": "processing_error",
//!  "error": "…", "code": null, "attempts": 1, "first_failure_ms": T, "last_failure_ms": T,
//!  "topic": "in", "partition": 0, "offset": 42, "timestamp": T, "event": {…}}
//! ```
//!
//! `event` is the event as it was (a JSON payload embedded as is, anything else as a
//! string; never parsed into a tree). Entries are appended to the log before the
//! checkpoint that moves past their events, and [`SideWriter::make_durable`] makes that
//! checkpoint wait until they are on stable storage.

use std::sync::Arc;

use flowgate_core::{BatchBuilder, Codec, ProducerStamp};
use flowgate_log::{Log, Partition};
use serde::Serialize;

use super::DLQ_TOPIC;

/// Why an event is in the dead-letter topic.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Category {
    /// A processor could not handle it (not JSON, a failed VRL program, an event time
    /// out of bounds, a state bound reached).
    ProcessingError,
    /// A processor panicked on it alone.
    Panicked,
    /// Its stored batch cannot be decoded.
    Unreadable,
    /// The sink's target refused it for good.
    Rejected,
    /// The sink's target kept failing it until its retries ran out.
    RetriesExhausted,
}

/// Who failed the event.
#[derive(Clone, Copy, Debug)]
pub enum FailedAt<'a> {
    /// The processor with this id.
    Processor(&'a str),
    /// The sink with this name.
    Sink(&'a str),
    /// Reading the source (nothing downstream saw the event).
    Source,
}

/// One dead-letter entry, before encoding.
#[derive(Clone, Debug)]
pub struct Entry<'a> {
    /// Pipeline name.
    pub pipeline: &'a str,
    /// Who failed the event.
    pub at: FailedAt<'a>,
    /// Why.
    pub category: Category,
    /// What went wrong.
    pub error: &'a str,
    /// The target's code for it, if any.
    pub code: Option<&'a str>,
    /// Attempts made.
    pub attempts: u32,
    /// When it first failed (ms since the epoch).
    pub first_failure_ms: i64,
    /// When it last failed.
    pub last_failure_ms: i64,
    /// Source topic.
    pub topic: &'a str,
    /// Source partition.
    pub partition: u32,
    /// Source offset (`u64::MAX` for an event a processor made).
    pub offset: u64,
    /// For an unreadable batch, its last offset.
    pub last_offset: Option<u64>,
    /// Event time.
    pub timestamp: i64,
    /// The event as it was, if it can be trusted to be one.
    pub event: Option<&'a [u8]>,
}

#[derive(Serialize)]
struct Head<'a> {
    pipeline: &'a str,
    processor: Option<&'a str>,
    sink: Option<&'a str>,
    category: Category,
    error: &'a str,
    code: Option<&'a str>,
    attempts: u32,
    first_failure_ms: i64,
    last_failure_ms: i64,
    topic: &'a str,
    partition: u32,
    offset: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    last_offset: Option<u64>,
    timestamp: i64,
}

impl Entry<'_> {
    /// The entry as the JSON object stored in the dead-letter topic.
    pub fn encode(&self) -> Vec<u8> {
        let (processor, sink) = match self.at {
            FailedAt::Processor(p) => (Some(p), None),
            FailedAt::Sink(s) => (None, Some(s)),
            FailedAt::Source => (None, None),
        };
        let head = Head {
            pipeline: self.pipeline,
            processor,
            sink,
            category: self.category,
            error: self.error,
            code: self.code,
            attempts: self.attempts,
            first_failure_ms: self.first_failure_ms,
            last_failure_ms: self.last_failure_ms,
            topic: self.topic,
            partition: self.partition,
            offset: self.offset,
            last_offset: self.last_offset,
            timestamp: self.timestamp,
        };
        let mut out = serde_json::to_vec(&head).expect("a dead-letter head serializes");
        out.pop(); // its closing brace
        out.extend_from_slice(b",\"event\":");
        match self.event {
            None => out.extend_from_slice(b"null"),
            Some(payload) if serde_json::from_slice::<serde::de::IgnoredAny>(payload).is_ok() => {
                out.extend_from_slice(payload);
            }
            Some(payload) => {
                let text = String::from_utf8_lossy(payload);
                out.extend_from_slice(&serde_json::to_vec(&text).expect("a string serializes"));
            }
        }
        out.push(b'}');
        out
    }
}

/// Appends side outputs (dead letters, late events) to their topics and remembers how
/// far, so that a checkpoint can wait until they are durable.
#[derive(Debug)]
pub(super) struct SideWriter {
    log: Log,
    /// Partitions appended to since the last [`SideWriter::make_durable`], and the end
    /// offset each must be durable up to.
    pending: Vec<(Arc<Partition>, u64)>,
}

impl SideWriter {
    pub(super) fn new(log: Log) -> SideWriter {
        SideWriter { log, pending: Vec::new() }
    }

    /// Appends the built batch to `topic` (round robin over its partitions). An error
    /// says the worker restarts from its last checkpoint and writes it again.
    pub(super) fn append(&mut self, topic: &str, builder: &mut BatchBuilder) -> anyhow::Result<()> {
        if builder.is_empty() {
            return Ok(());
        }
        let written = (|| {
            let mut batch = builder.finish(Codec::None, ProducerStamp::default())?;
            let t = self
                .log
                .topic(topic)
                .ok_or_else(|| anyhow::anyhow!("it does not exist (deleted while the pipeline runs?)"))?;
            let partition = t.partition(t.next_round_robin())?.clone();
            let outcome = partition.append(&mut batch.bytes)?;
            anyhow::Ok((partition, outcome.end_offset()))
        })();
        let (partition, end) = written.map_err(|e| {
            anyhow::anyhow!("cannot write to side topic '{topic}': {e:#}; the worker restarts from its last checkpoint")
        })?;
        self.remember(partition, end);
        Ok(())
    }

    /// Notes that `partition` must be durable up to `end`: one entry per partition.
    fn remember(&mut self, partition: Arc<Partition>, end: u64) {
        match self.pending.iter_mut().find(|(p, _)| Arc::ptr_eq(p, &partition)) {
            Some(entry) => entry.1 = entry.1.max(end),
            None => self.pending.push((partition, end)),
        }
    }

    /// Appends dead-letter entries as one batch.
    pub(super) fn dead_letters<'a>(
        &mut self,
        entries: impl IntoIterator<Item = (Entry<'a>, Option<&'a [u8]>)>,
    ) -> anyhow::Result<()> {
        let mut b = BatchBuilder::new();
        for (entry, key) in entries {
            // Stamped with when it failed, not the event's own time: `flowgate dlq
            // --since` finds entries by when they were written.
            b.push(entry.last_failure_ms, key, None, std::iter::empty(), &entry.encode());
        }
        self.append(DLQ_TOPIC, &mut b)
    }

    /// Makes the checkpoint wait for everything in `topic` as written now, too: for side
    /// outputs an earlier run wrote past the last checkpoint, which this run does not
    /// write again.
    pub(super) fn cover(&mut self, topic: &str) {
        if let Some(t) = self.log.topic(topic) {
            for p in t.partitions() {
                self.remember(p.clone(), p.end_offset());
            }
        }
    }

    /// Puts everything appended since the last call on stable storage, whatever the
    /// log's fsync policy; what fails stays pending.
    pub(super) async fn make_durable(&mut self) -> anyhow::Result<()> {
        while let Some((partition, end)) = self.pending.last().cloned() {
            partition.make_durable(end).await?;
            self.pending.pop();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(event: Option<&[u8]>) -> Entry<'_> {
        Entry {
            pipeline: "p",
            at: FailedAt::Sink("out"),
            category: Category::RetriesExhausted,
            error: "503 \"busy\"",
            code: Some("503"),
            attempts: 4,
            first_failure_ms: 10,
            last_failure_ms: 20,
            topic: "in",
            partition: 1,
            offset: 7,
            last_offset: None,
            timestamp: i64::MIN,
            event,
        }
    }

    #[test]
    fn entries_carry_the_event_as_it_was_and_every_field() {
        let v: serde_json::Value = serde_json::from_slice(&entry(Some(br#"{"a": [1, 2]}"#)).encode()).unwrap();
        assert_eq!(v["event"], serde_json::json!({"a": [1, 2]}));
        assert_eq!(v["sink"], "out");
        assert_eq!(v["processor"], serde_json::Value::Null);
        assert_eq!(v["category"], "retries_exhausted");
        assert_eq!((v["attempts"].as_u64(), v["code"].as_str()), (Some(4), Some("503")));
        assert_eq!(v["error"], "503 \"busy\"");
        assert_eq!(v["timestamp"], i64::MIN);
        assert!(v.get("last_offset").is_none());
        let v: serde_json::Value = serde_json::from_slice(&entry(Some(b"not json \xff")).encode()).unwrap();
        assert_eq!(v["event"], "not json \u{fffd}");
        let v: serde_json::Value = serde_json::from_slice(&entry(None).encode()).unwrap();
        assert_eq!(v["event"], serde_json::Value::Null);
    }
}
