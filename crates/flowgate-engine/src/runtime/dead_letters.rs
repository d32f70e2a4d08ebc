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
//! `event` is the event as the failing stage got it (a processor: as it came to that
//! processor, earlier processors' changes included; a sink: as the pipeline made it). A
//! JSON payload is embedded as is (never parsed into a tree); text as a JSON string when
//! escaping at most doubles it; anything else (bytes that are not UTF-8, text of control
//! characters) as base64 with `"event_encoding": "base64"`, so an entry is never more
//! than about twice its event and a replay gets the bytes back exactly. The entry of a replayed event that failed again
//! (see [`super::replay`]) also carries `"replay_of": {"partition": P, "offset": O}`, the
//! `_dlq` entry it replays, and `"replays": N`, how many times the original event has
//! been replayed; its topic, partition and offset are the original event's. Entries are appended to the log before the
//! checkpoint that moves past their events, and [`SideWriter::make_durable`] makes that
//! checkpoint wait until they are on stable storage.

use std::collections::HashMap;
use std::sync::Arc;

use flowgate_core::{BatchBuilder, Codec, ProducerStamp};
use flowgate_log::append::{Appender, Route, Scratch};
use flowgate_log::{Log, Partition};
use serde::Serialize;

use super::replay_record::ReplayHead;
use super::replay_worker::ReplayIndex;
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
    #[serde(skip_serializing_if = "Option::is_none")]
    replay_of: Option<ReplayOf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    replays: Option<u32>,
}

#[derive(Serialize)]
struct ReplayOf {
    partition: u32,
    offset: u64,
}

impl Entry<'_> {
    /// The entry as the JSON object stored in the dead-letter topic.
    pub fn encode(&self) -> Vec<u8> {
        self.encode_replayed(None)
    }

    /// The entry as stored, of an event that `replay` re-injected (if any): it names the
    /// original event's place and the entry replayed.
    pub fn encode_replayed(&self, replay: Option<&ReplayHead>) -> Vec<u8> {
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
            topic: replay.map_or(self.topic, |r| r.topic.as_str()),
            partition: replay.map_or(self.partition, |r| r.partition),
            offset: replay.map_or(self.offset, |r| r.offset),
            last_offset: self.last_offset,
            timestamp: self.timestamp,
            replay_of: replay.map(|r| ReplayOf { partition: r.entry.partition, offset: r.entry.offset }),
            replays: replay.map(|r| r.replays),
        };
        let mut out = serde_json::to_vec(&head).expect("a dead-letter head serializes");
        out.pop(); // its closing brace
        match self.event {
            None => out.extend_from_slice(b",\"event\":null"),
            Some(payload) if serde_json::from_slice::<serde::de::IgnoredAny>(payload).is_ok() => {
                out.extend_from_slice(b",\"event\":");
                out.extend_from_slice(payload);
            }
            Some(payload) => {
                let text = std::str::from_utf8(payload)
                    .ok()
                    .map(|t| serde_json::to_vec(t).expect("a string serializes"))
                    .filter(|escaped| escaped.len() <= payload.len().saturating_mul(2).saturating_add(2));
                match text {
                    Some(escaped) => {
                        out.extend_from_slice(b",\"event\":");
                        out.extend_from_slice(&escaped);
                    }
                    None => {
                        use base64::Engine as _;
                        out.extend_from_slice(b",\"event_encoding\":\"base64\",\"event\":\"");
                        out.extend_from_slice(base64::engine::general_purpose::STANDARD.encode(payload).as_bytes());
                        out.push(b'"');
                    }
                }
            }
        }
        out.push(b'}');
        out
    }
}

/// Bytes of side outputs (dead letters, late events) appended as one batch, about: a
/// batch is appended once it holds this much.
pub(super) const SIDE_BATCH_BYTES: usize = 1 << 20;

/// Bytes of encoding buffer a [`SideWriter`] keeps between appends.
const SCRATCH_KEPT_BYTES: usize = 1 << 20;

/// Appends side outputs (dead letters, late events) to their topics and remembers how
/// far, so that a checkpoint can wait until they are durable.
#[derive(Debug)]
pub(super) struct SideWriter {
    log: Log,
    appender: Appender,
    scratch: Scratch,
    /// For the worker of a replay topic: what each replayed event replays, so that its
    /// dead letter says so.
    replays: Option<Arc<ReplayIndex>>,
    /// Partitions appended to since the last [`SideWriter::make_durable`], and the end
    /// offset each must be durable up to.
    pending: Vec<(Arc<Partition>, u64)>,
}

impl SideWriter {
    pub(super) fn new(log: Log) -> SideWriter {
        SideWriter {
            log,
            appender: Appender::new(Codec::None),
            scratch: Scratch::default(),
            replays: None,
            pending: Vec::new(),
        }
    }

    /// The writer of a replay topic's worker, whose dead letters name what they replay.
    pub(super) fn with_replays(mut self, replays: Option<Arc<ReplayIndex>>) -> SideWriter {
        self.replays = replays;
        self
    }

    /// Appends the built batch to `topic`, routed by `route`. An error says the worker
    /// restarts from its last checkpoint and writes it again.
    pub(super) fn append(&mut self, topic: &str, route: Route, builder: &mut BatchBuilder) -> anyhow::Result<()> {
        if builder.is_empty() {
            return Ok(());
        }
        let written = match self.log.topic(topic) {
            Some(t) => self
                .appender
                .append_built(&t, route, builder, ProducerStamp::default(), &mut self.scratch)
                .map_err(anyhow::Error::from),
            None => {
                builder.clear();
                Err(anyhow::anyhow!("it does not exist (deleted while the pipeline runs?)"))
            }
        };
        // Side outputs come in bursts (a failing sink, a late partition): what one grew is
        // not kept for the worker's life.
        self.scratch.shrink_to(SCRATCH_KEPT_BYTES);
        let written = written.map_err(|e| {
            anyhow::anyhow!("cannot write to side topic '{topic}': {e:#}; the worker restarts from its last checkpoint")
        })?;
        for part in written.parts() {
            self.remember(part.partition.clone(), part.outcome.end_offset());
        }
        Ok(())
    }

    /// Notes that `partition` must be durable up to `end`: one entry per partition.
    fn remember(&mut self, partition: Arc<Partition>, end: u64) {
        match self.pending.iter_mut().find(|(p, _)| Arc::ptr_eq(p, &partition)) {
            Some(entry) => entry.1 = entry.1.max(end),
            None => self.pending.push((partition, end)),
        }
    }

    /// Appends dead-letter entries, in batches of about [`SIDE_BATCH_BYTES`]: one read
    /// whose every event fails may make far more entry bytes than one batch may hold.
    pub(super) fn dead_letters<'a>(
        &mut self,
        entries: impl IntoIterator<Item = (Entry<'a>, Option<&'a [u8]>)>,
    ) -> anyhow::Result<()> {
        let mut b = BatchBuilder::new();
        for (entry, key) in entries {
            // Stamped with when it failed, not the event's own time: `flowgate dlq
            // --since` finds entries by when they were written.
            let replay = self.replays.as_ref().and_then(|r| r.get(entry.topic, entry.partition, entry.offset));
            b.push(entry.last_failure_ms, key, None, std::iter::empty(), &entry.encode_replayed(replay.as_deref()));
            if b.records_len() >= SIDE_BATCH_BYTES {
                self.append(DLQ_TOPIC, Route::RoundRobin, &mut b)?;
            }
        }
        self.append(DLQ_TOPIC, Route::RoundRobin, &mut b)
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

/// Messages are grouped by their first characters: the rest often carries an offset or
/// a value that differs per event.
const MESSAGE_KEY_CHARS: usize = 120;

/// Distinct error messages counted apart; the rest count as "(other errors)", so that
/// counting a huge dead-letter topic takes bounded memory.
pub const MAX_ERROR_KEYS: usize = 10_000;

/// Which entries to look at.
#[derive(Clone, Debug, Default)]
pub struct EntryFilter {
    /// Only entries of this pipeline.
    pub pipeline: Option<String>,
    /// Only entries of this category.
    pub category: Option<String>,
}

impl EntryFilter {
    /// Whether `entry` (a decoded dead-letter entry) passes.
    pub fn matches(&self, entry: &serde_json::Value) -> bool {
        self.matches_fields(entry["pipeline"].as_str(), entry["category"].as_str())
    }

    /// Whether an entry of this pipeline and category passes.
    pub fn matches_fields(&self, pipeline: Option<&str>, category: Option<&str>) -> bool {
        self.pipeline.as_deref().is_none_or(|p| pipeline == Some(p))
            && self.category.as_deref().is_none_or(|c| category == Some(c))
    }
}

/// Counts of dead-letter entries: by pipeline, stage and category, the most frequent
/// errors (at most [`MAX_ERROR_KEYS`] distinct ones are told apart), the oldest entry.
#[derive(Debug, Default)]
pub struct Stats {
    total: u64,
    /// Entries known to be replayed (`None`: not known).
    replayed: Option<u64>,
    by_group: HashMap<(String, String, String), u64>,
    by_error: HashMap<String, u64>,
    oldest_ms: Option<i64>,
}

impl Stats {
    /// Counts one entry.
    pub fn add(&mut self, entry: &serde_json::Value) {
        let text = |v: &serde_json::Value| v.as_str().unwrap_or("").to_owned();
        let stage = match (entry["processor"].as_str(), entry["sink"].as_str()) {
            (Some(p), _) => format!("processor {p}"),
            (None, Some(s)) => format!("sink {s}"),
            (None, None) => "source".to_owned(),
        };
        let category = entry["category"].as_str().unwrap_or("processing_error").to_owned();
        self.total += 1;
        *self.by_group.entry((text(&entry["pipeline"]), stage, category)).or_default() += 1;
        let mut error: String = text(&entry["error"]).chars().take(MESSAGE_KEY_CHARS).collect();
        if !self.by_error.contains_key(&error) && self.by_error.len() >= MAX_ERROR_KEYS {
            error = "(other errors)".to_owned();
        }
        *self.by_error.entry(error).or_default() += 1;
        let at = entry["first_failure_ms"].as_i64().or_else(|| entry["timestamp"].as_i64());
        if let Some(at) = at {
            self.oldest_ms = Some(self.oldest_ms.map_or(at, |o| o.min(at)));
        }
    }

    /// Counts one entry that has been replayed (once [`Stats::add`] counted it); once
    /// called, the counts show how many were.
    pub fn add_replayed(&mut self, replayed: bool) {
        *self.replayed.get_or_insert(0) += u64::from(replayed);
    }

    fn top_errors(&self) -> Vec<(&String, u64)> {
        let mut errors: Vec<(&String, u64)> = self.by_error.iter().map(|(e, n)| (e, *n)).collect();
        errors.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(b.0)));
        errors.truncate(5);
        errors
    }

    fn groups(&self) -> Vec<(&(String, String, String), u64)> {
        let mut groups: Vec<_> = self.by_group.iter().map(|(k, n)| (k, *n)).collect();
        groups.sort();
        groups
    }

    /// The counts as one JSON object.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "total": self.total,
            "replayed": self.replayed,
            "oldest_ms": self.oldest_ms,
            "groups": self.groups().into_iter().map(|((pipeline, stage, category), n)| serde_json::json!({
                "pipeline": pipeline, "stage": stage, "category": category, "entries": n,
            })).collect::<Vec<_>>(),
            "top_errors": self.top_errors().into_iter().map(|(e, n)| serde_json::json!({"error": e, "entries": n}))
                .collect::<Vec<_>>(),
        })
    }

    /// The counts as text for a terminal.
    pub fn to_text(&self) -> String {
        let mut out = format!("{} dead-letter entries", self.total);
        if let Some(replayed) = self.replayed {
            out.push_str(&format!(" ({replayed} replayed)"));
        }
        if let Some(oldest) = self.oldest_ms {
            out.push_str(&format!(", the oldest from {oldest} (ms since the epoch)"));
        }
        out.push('\n');
        for ((pipeline, stage, category), n) in self.groups() {
            out.push_str(&format!("{n:>10}  pipeline {pipeline}, {stage}, {category}\n"));
        }
        if !self.by_error.is_empty() {
            out.push_str("most frequent errors:\n");
            for (error, n) in self.top_errors() {
                out.push_str(&format!("{n:>10}  {error}\n"));
            }
        }
        out
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

    #[tokio::test]
    async fn many_dead_letters_of_one_read_are_appended_in_batches_of_bounded_size() {
        let dir = tempfile::tempdir().unwrap();
        let log = Log::open(dir.path(), flowgate_log::LogConfig::default()).unwrap();
        log.create_topic(DLQ_TOPIC, 1).unwrap();
        let mut side = SideWriter::new(log.clone());
        let event = vec![b'x'; 10_000];
        let json = format!("\"{}\"", String::from_utf8(event.clone()).unwrap());
        side.dead_letters((0..500).map(|_| (entry(Some(json.as_bytes())), None))).unwrap();
        side.make_durable().await.unwrap();
        let partition = log.topic(DLQ_TOPIC).unwrap().partition(0).unwrap().clone();
        assert_eq!(partition.end_offset(), 500);
        let (mut batches, mut offset) = (0, 0);
        while offset < 500 {
            let read = partition.read(offset, 1).unwrap();
            let (view, _) = flowgate_core::BatchView::parse(&read.batches).unwrap();
            assert!(view.header.batch_length as usize <= SIDE_BATCH_BYTES + 20_000, "{}", view.header.batch_length);
            offset = view.base_offset() + u64::from(view.header.record_count);
            batches += 1;
        }
        assert!(batches >= 4, "5 MB of entries in batches of about 1 MiB: {batches}");
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
        let v: serde_json::Value = serde_json::from_slice(&entry(Some(b"not json")).encode()).unwrap();
        assert_eq!((v["event"].as_str(), v.get("event_encoding")), (Some("not json"), None));
        // Bytes that are not UTF-8 are kept exactly, as base64.
        let v: serde_json::Value = serde_json::from_slice(&entry(Some(b"not json \xff")).encode()).unwrap();
        assert_eq!((v["event"].as_str(), v["event_encoding"].as_str()), (Some("bm90IGpzb24g/w=="), Some("base64")));
        let v: serde_json::Value = serde_json::from_slice(&entry(None).encode()).unwrap();
        assert_eq!(v["event"], serde_json::Value::Null);
    }

    #[test]
    fn stats_count_by_group_and_error_and_find_the_oldest() {
        let mut stats = Stats::default();
        let entry = |pipeline: &str, sink: Option<&str>, category: &str, error: &str, at: i64| {
            serde_json::json!({"pipeline": pipeline, "processor": if sink.is_none() { serde_json::json!("dedup-1") } else { serde_json::Value::Null },
                "sink": sink, "category": category, "error": error, "first_failure_ms": at})
        };
        stats.add(&entry("p", Some("out"), "rejected", "400 bad", 30));
        stats.add(&entry("p", Some("out"), "rejected", "400 bad", 10));
        stats.add(&entry("p", None, "processing_error", "not JSON", 20));
        let v = stats.to_json();
        assert_eq!(v["total"], 3);
        assert_eq!(v["oldest_ms"], 10);
        assert_eq!(v["top_errors"][0], serde_json::json!({"error": "400 bad", "entries": 2}));
        assert_eq!(v["groups"].as_array().unwrap().len(), 2);
        assert!(stats.to_text().contains("pipeline p, sink out, rejected"), "{}", stats.to_text());
        let filter = EntryFilter { pipeline: Some("p".into()), category: Some("rejected".into()) };
        assert!(filter.matches(&entry("p", Some("out"), "rejected", "x", 1)));
        assert!(!filter.matches(&entry("q", Some("out"), "rejected", "x", 1)));
        assert!(!filter.matches(&entry("p", None, "processing_error", "x", 1)));
    }
}
