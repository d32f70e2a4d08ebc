//! Replaying dead letters: `flowgate dlq replay` and `POST /v1/dlq/replay`, and the
//! automatic reprocessing of `[pipelines.dlq]`.
//!
//! Every pipeline also reads its own replay topic, [`replay_topic`] (`_replay.<name>`,
//! one partition), whose worker routes each record where its head says
//! ([`super::replay_worker`]). A replay:
//!
//! 1. marks, from the replay topics, entries an earlier replay appended but did not get
//!    to mark (a crash between the two);
//! 2. picks the matching `_dlq` entries that are not marked replayed — `unreadable`
//!    ones, ones without an event and ones of pipelines not configured are skipped, with
//!    the reason;
//! 3. appends one replay record per entry to its pipeline's replay topic and waits until
//!    that is durable, then marks the entries replayed ([`super::replay_marks`]);
//! 4. waits (bounded) until each pipeline's checkpoint of its replay topic passes those
//!    appends, and counts the dead letters that name a replayed entry in `replay_of`:
//!    those failed again, the rest were delivered.
//!
//! Each entry is re-injected once: a crash before the appends are durable leaves the
//! entries unmarked (a later replay sends them), a crash after leaves them in the replay
//! topic (the next replay marks them before it picks any). Replayed events are then
//! delivered as the pipeline delivers anything: at least once.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use flowgate_core::{BatchBuilder, BatchView, Codec, ProducerStamp, RecordRef};
use flowgate_log::append::{Appender, Route, Scratch};
use flowgate_log::{Log, Partition};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use super::dead_letters::EntryFilter;
use super::replay_marks::Marks;
use super::replay_record::{fingerprint, EntryRef, ReplayHead, Resume};
use super::supervisor::PipelineHealth;
use super::DLQ_TOPIC;
use crate::config::PipelineConfig;

/// What every pipeline's replay topic is named with, before the pipeline's name.
pub const REPLAY_TOPIC_PREFIX: &str = "_replay.";

/// The replay topic of pipeline `pipeline`.
pub fn replay_topic(pipeline: &str) -> String {
    format!("{REPLAY_TOPIC_PREFIX}{pipeline}")
}

/// Whether the engine alone writes `topic` (the dead-letter topic and the replay
/// topics): producers may not, or a forged entry would be replayed into a sink.
pub fn is_engine_topic(topic: &str) -> bool {
    topic == super::DLQ_TOPIC || topic.starts_with(REPLAY_TOPIC_PREFIX)
}

/// Entries one replay takes at most (the rest wait for the next; the report says so).
pub const MAX_ENTRIES: usize = 100_000;
/// Default of [`ReplayRequest::limit`].
const DEFAULT_ENTRIES: usize = 10_000;
/// Bytes of events one replay holds at most.
const MAX_BYTES: usize = 64 << 20;
/// Default and largest wait for the pipelines to process the replay.
const DEFAULT_WAIT: Duration = Duration::from_secs(30);
const MAX_WAIT: Duration = Duration::from_secs(600);
/// Bytes of one appended batch of replay records (about).
const BATCH_BYTES: usize = 256 << 10;

/// What to replay (`POST /v1/dlq/replay`'s body or query).
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplayRequest {
    /// Only entries of this pipeline.
    #[serde(default)]
    pub pipeline: Option<String>,
    /// Only entries of this category.
    #[serde(default)]
    pub category: Option<String>,
    /// Report what would be replayed; change nothing.
    #[serde(default)]
    pub dry_run: bool,
    /// How long to wait for the pipelines to process the replay (ms; default 30 s, at
    /// most 10 min; 0 does not wait).
    #[serde(default)]
    pub wait_ms: Option<u64>,
    /// Entries to take at most (default 10,000, at most [`MAX_ENTRIES`]).
    #[serde(default)]
    pub limit: Option<usize>,
}

/// What a replay did.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ReplayReport {
    /// Nothing was changed.
    pub dry_run: bool,
    /// Entries that passed the filters.
    pub matched: u64,
    /// Entries re-injected into their pipeline (with `dry_run`: that would be).
    pub reinjected: u64,
    /// Entries not re-injected, by reason (`already_replayed`, `unreadable`, `no_event`,
    /// `pipeline_not_configured`).
    pub skipped: BTreeMap<&'static str, u64>,
    /// More entries matched than one replay takes: run it again for the rest.
    pub more: bool,
    /// Every pipeline checkpointed past the re-injected events within the wait.
    pub completed: bool,
    /// Re-injected events that did not come back as dead letters (once `completed`).
    pub delivered: Option<u64>,
    /// Re-injected events that failed again: new entries name them in `replay_of`
    /// (once `completed`).
    pub failed: Option<u64>,
}

/// Which entries a replay picks, beyond a request's filters.
#[derive(Clone, Debug, Default)]
struct Selection {
    filter: EntryFilter,
    /// Only entries a sink failed.
    sinks_only: bool,
    /// Only entries that last failed at or before this time.
    failed_by_ms: Option<i64>,
    /// Only entries whose event was replayed fewer times than this.
    max_replays: Option<u64>,
    /// Remember, under this name, how far each `_dlq` partition holds nothing more for
    /// this selection, and start there next time (automatic reprocessing, which runs
    /// the same selection every few seconds, so each run reads only what is new).
    cursor: Option<String>,
}

/// Where each `_dlq` partition ended when a replay picked its entries.
type Ends = Vec<(u32, u64)>;

/// One entry to re-inject.
struct Planned {
    pipeline: String,
    head: ReplayHead,
    key: Option<Vec<u8>>,
    timestamp: i64,
    event: Vec<u8>,
}

/// Replays dead letters into the running pipelines; one replay at a time.
pub struct Replayer {
    log: Log,
    marks_dir: PathBuf,
    /// Opened on first use.
    marks: Mutex<Option<Marks>>,
    /// The configured pipelines; a reload replaces them.
    pipelines: parking_lot::RwLock<Vec<Arc<PipelineConfig>>>,
    health: PipelineHealth,
    running: tokio::sync::Mutex<()>,
    /// Per [`Selection::cursor`] name, per `_dlq` partition: the offset before which
    /// that selection has nothing left to take.
    /// Kept with the `created_ms` of the `_dlq` they are of: a purge makes it anew.
    cursors: Mutex<HashMap<String, Cursor>>,
    /// Marks there were after the last pruning ([`Replayer::prune_marks`]).
    marks_pruned_at: Mutex<usize>,
    /// Per replay topic partition: the offset up to which its records are known marked.
    /// Keyed by topic, its `created_ms` (a topic deleted and made again starts over) and
    /// partition.
    reconciled: Mutex<HashMap<(String, i64, u32), u64>>,
}

impl std::fmt::Debug for Replayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Replayer").field("marks_dir", &self.marks_dir).finish()
    }
}

/// Calls `visit` with each record of `partition` from `from` up to `to`, until it
/// returns false.
fn each_record(
    partition: &Partition,
    from: u64,
    to: u64,
    mut visit: impl FnMut(u64, &RecordRef<'_>) -> bool,
) -> anyhow::Result<()> {
    let mut next = from.max(partition.start_offset());
    let mut scratch = Vec::new();
    while next < to {
        let read = partition.read(next, 1 << 20)?;
        if read.batches.is_empty() {
            break;
        }
        let mut rest = &read.batches[..];
        let before = next;
        while !rest.is_empty() {
            let (view, tail) = BatchView::parse(rest)?;
            for record in view.records(&mut scratch)? {
                let record = record?;
                let offset = view.base_offset().saturating_add(u64::from(record.offset_delta));
                if offset < next {
                    continue;
                }
                if offset >= to {
                    return Ok(());
                }
                next = offset.saturating_add(1);
                if !visit(offset, &record) {
                    return Ok(());
                }
            }
            rest = tail;
        }
        if next == before {
            break;
        }
    }
    Ok(())
}

#[derive(Deserialize)]
struct StoredEvent<'a> {
    #[serde(borrow)]
    event: Option<&'a serde_json::value::RawValue>,
    #[serde(default, borrow)]
    event_encoding: Option<&'a str>,
}

/// The event bytes of a stored entry: a JSON event as it was, a string (how text that
/// was not JSON is stored) as its text, base64 (`event_encoding`) decoded; `None` when
/// the entry holds none.
fn event_bytes(stored: &[u8]) -> Option<Vec<u8>> {
    let stored = serde_json::from_slice::<StoredEvent<'_>>(stored).ok()?;
    let text = stored.event?.get();
    if text == "null" {
        return None;
    }
    if text.starts_with('"') {
        let string = serde_json::from_str::<String>(text).ok()?;
        return match stored.event_encoding {
            Some("base64") => {
                use base64::Engine as _;
                base64::engine::general_purpose::STANDARD.decode(string).ok()
            }
            Some(_) => None,
            None => Some(string.into_bytes()),
        };
    }
    Some(text.as_bytes().to_vec())
}

/// Where a selection's next run starts in each partition of one `_dlq` (made at
/// `created_ms`).
#[derive(Clone, Debug, Default)]
struct Cursor {
    created_ms: i64,
    offsets: HashMap<u32, u64>,
}

/// Whether a selection takes an entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Pick {
    Yes,
    /// Not now: it failed too recently.
    NotYet,
    /// Never: another pipeline, category or stage, or replayed often enough.
    Never,
}

/// The fields of a stored entry a replay reads: its event is skipped, not parsed into a
/// tree (a replay reads every entry of `_dlq`; it takes the event's bytes only from the
/// entries it re-injects).
#[derive(Debug, Default, Deserialize)]
struct EntryFields {
    pipeline: Option<String>,
    processor: Option<String>,
    sink: Option<String>,
    category: Option<String>,
    last_failure_ms: Option<i64>,
    replays: Option<u64>,
    topic: Option<String>,
    partition: Option<u64>,
    offset: Option<u64>,
    timestamp: Option<i64>,
}

impl Selection {
    fn picks(&self, entry: &EntryFields) -> Pick {
        let fits = self.filter.matches_fields(entry.pipeline.as_deref(), entry.category.as_deref())
            && (!self.sinks_only || entry.sink.is_some())
            && self.max_replays.is_none_or(|max| entry.replays.unwrap_or(0) < max);
        if !fits {
            return Pick::Never;
        }
        match (self.failed_by_ms, entry.last_failure_ms) {
            (None, _) => Pick::Yes,
            (Some(t), Some(at)) if at <= t => Pick::Yes,
            (Some(_), Some(_)) => Pick::NotYet,
            // Without a failure time it never gets old enough; waiting for it would keep
            // every later entry from the cursor.
            (Some(_), None) => Pick::Never,
        }
    }
}

impl Replayer {
    pub(super) fn new(
        log: Log,
        data_dir: PathBuf,
        pipelines: Vec<Arc<PipelineConfig>>,
        health: PipelineHealth,
    ) -> Replayer {
        Replayer {
            log,
            marks_dir: data_dir.join("dlq"),
            marks: Mutex::new(None),
            pipelines: parking_lot::RwLock::new(pipelines),
            health,
            running: tokio::sync::Mutex::new(()),
            cursors: Mutex::new(HashMap::new()),
            marks_pruned_at: Mutex::new(0),
            reconciled: Mutex::new(HashMap::new()),
        }
    }

    /// The pipelines replays go to, after a reload.
    pub(super) fn set_pipelines(&self, pipelines: Vec<Arc<PipelineConfig>>) {
        *self.pipelines.write() = pipelines;
    }

    fn with_marks<R>(&self, f: impl FnOnce(&mut Marks) -> std::io::Result<R>) -> anyhow::Result<R> {
        let mut marks = self.marks.lock();
        if marks.is_none() {
            *marks =
                Some(Marks::open(&self.marks_dir).map_err(|e| {
                    anyhow::anyhow!("cannot open the replayed marks in {}: {e}", self.marks_dir.display())
                })?);
        }
        let marks = marks.as_mut().expect("opened above");
        f(marks).map_err(|e| anyhow::anyhow!("replayed marks in {}: {e}", self.marks_dir.display()))
    }

    /// Whether the stored `_dlq` entry at (`partition`, `offset`) with bytes `entry` has
    /// been replayed.
    pub fn is_replayed(&self, partition: u32, offset: u64, entry: &[u8]) -> anyhow::Result<bool> {
        let r = EntryRef { partition, offset, fingerprint: fingerprint(entry) };
        self.with_marks(|m| Ok(m.contains(&r)))
    }

    /// Every entry marked replayed.
    pub fn replayed(&self) -> anyhow::Result<Vec<EntryRef>> {
        self.with_marks(|m| {
            let mut all: Vec<EntryRef> = m.all().copied().collect();
            all.sort();
            Ok(all)
        })
    }

    /// Replays what `request` asks for.
    pub async fn replay(self: &Arc<Self>, request: &ReplayRequest) -> anyhow::Result<ReplayReport> {
        let selection = Selection {
            filter: EntryFilter { pipeline: request.pipeline.clone(), category: request.category.clone() },
            ..Selection::default()
        };
        let limit = request.limit.unwrap_or(DEFAULT_ENTRIES).clamp(1, MAX_ENTRIES);
        let wait = request.wait_ms.map_or(DEFAULT_WAIT, Duration::from_millis).min(MAX_WAIT);
        self.run(selection, request.dry_run, limit, wait).await
    }

    async fn run(
        self: &Arc<Self>,
        selection: Selection,
        dry_run: bool,
        limit: usize,
        wait: Duration,
    ) -> anyhow::Result<ReplayReport> {
        // Held from choosing entries until they are marked (so no entry is replayed
        // twice), not while the pipelines process them: a long wait blocks no other replay.
        let one_at_a_time = self.running.lock().await;
        let me = self.clone();
        let cursor = selection.cursor.clone();
        let (mut report, planned, dlq_ends, settled) =
            tokio::task::spawn_blocking(move || me.plan(&selection, dry_run, limit)).await??;
        // Entries below `settled` are taken now (and marked below) or never will be.
        let keep_cursor = |settled| {
            if let (Some(name), false) = (&cursor, dry_run) {
                self.cursors.lock().insert(name.clone(), settled);
            }
        };
        report.dry_run = dry_run;
        if dry_run || planned.is_empty() {
            keep_cursor(settled);
            report.completed = !dry_run;
            if !dry_run {
                (report.delivered, report.failed) = (Some(0), Some(0));
            }
            return Ok(report);
        }
        let refs: Vec<EntryRef> = planned.iter().map(|p| p.head.entry).collect();
        let replayed: HashSet<(u32, u64)> =
            planned.iter().map(|p| (p.head.entry.partition, p.head.entry.offset)).collect();
        let reinjected = planned.len() as u64;
        // Segment writes of up to 64 MiB: off the runtime that serves clients.
        let me = self.clone();
        let appended = tokio::task::spawn_blocking(move || {
            let mut by_pipeline: BTreeMap<&str, Vec<&Planned>> = BTreeMap::new();
            for p in &planned {
                by_pipeline.entry(p.pipeline.as_str()).or_default().push(p);
            }
            by_pipeline
                .into_iter()
                .map(|(pipeline, entries)| Ok((pipeline.to_owned(), me.append(pipeline, &entries)?)))
                .collect::<anyhow::Result<Vec<_>>>()
        })
        .await??;
        let mut targets: BTreeMap<String, u64> = BTreeMap::new();
        for (pipeline, (partition, end)) in appended {
            partition
                .make_durable(end)
                .await
                .map_err(|e| anyhow::anyhow!("cannot make {} durable: {e}", replay_topic(&pipeline)))?;
            targets.insert(pipeline, end);
        }
        #[cfg(all(feature = "failpoints", debug_assertions))]
        super::failpoints::after_replay_append();
        let me = self.clone();
        tokio::task::spawn_blocking(move || me.with_marks(|m| m.add(&refs))).await??;
        keep_cursor(settled);
        drop(one_at_a_time);
        report.reinjected = reinjected;
        if wait.is_zero() {
            return Ok(report);
        }
        report.completed = self.wait_for(&targets, wait).await;
        if report.completed {
            let me = self.clone();
            let failed = tokio::task::spawn_blocking(move || me.failed_again(&dlq_ends, &replayed)).await??;
            report.failed = Some(failed);
            report.delivered = Some(report.reinjected.saturating_sub(failed));
        }
        Ok(report)
    }

    /// Steps 1 and 2: reconciles the marks, then picks the entries. Returns the report so
    /// far, the entries, where each `_dlq` partition ended, and where the selection's
    /// cursor may move once the entries are marked.
    fn plan(
        &self,
        selection: &Selection,
        dry_run: bool,
        limit: usize,
    ) -> anyhow::Result<(ReplayReport, Vec<Planned>, Ends, Cursor)> {
        self.reconcile()?;
        let mut report = ReplayReport::default();
        let mut planned = Vec::new();
        let Some(dlq) = self.log.topic(DLQ_TOPIC) else { return Ok((report, planned, Vec::new(), Cursor::default())) };
        self.prune_marks(&dlq)?;
        let from: HashMap<u32, u64> = match &selection.cursor {
            Some(name) => self
                .cursors
                .lock()
                .get(name)
                .filter(|c| c.created_ms == dlq.created_ms())
                .map(|c| c.offsets.clone())
                .unwrap_or_default(),
            None => HashMap::new(),
        };
        // Partitions a run does not reach (it took its limit before) keep their place.
        let mut settled = from.clone();
        let ends: Vec<(u32, u64)> = dlq.partitions().iter().map(|p| (p.id(), p.end_offset())).collect();
        let mut bytes = 0usize;
        // Entries taken toward the limit (those not replayed before).
        let mut taken = 0u64;
        let mut failure = None;
        'partitions: for (partition, &(id, end)) in dlq.partitions().iter().zip(&ends) {
            let mut full = false;
            // Past the end: the topic was deleted and made again.
            let start = from.get(&id).copied().filter(|&f| f <= end).unwrap_or(0);
            // Every entry before it is taken now or never will be; it stops at the first
            // that a later run may take.
            let mut settled_to = start;
            let mut open = false;
            each_record(partition, start, end, |offset, record| {
                let settle = |open: bool, settled_to: &mut u64| {
                    if !open {
                        *settled_to = offset.saturating_add(1);
                    }
                };
                let Ok(entry) = serde_json::from_slice::<EntryFields>(record.payload) else {
                    settle(open, &mut settled_to);
                    return true;
                };
                match selection.picks(&entry) {
                    Pick::Yes => {}
                    Pick::Never => {
                        settle(open, &mut settled_to);
                        return true;
                    }
                    Pick::NotYet => {
                        open = true;
                        return true;
                    }
                }
                let r = EntryRef { partition: id, offset, fingerprint: fingerprint(record.payload) };
                // Entries replayed before do not count toward the limit: they would
                // otherwise fill it on every run and hide every later entry.
                match self.with_marks(|m| Ok(m.contains(&r))) {
                    Ok(true) => {
                        report.matched += 1;
                        settle(open, &mut settled_to);
                        return skip(&mut report, "already_replayed");
                    }
                    Ok(false) => {}
                    Err(e) => {
                        failure = Some(e);
                        return false;
                    }
                }
                if taken >= limit as u64 || bytes >= MAX_BYTES {
                    report.more = true;
                    full = true;
                    return false;
                }
                taken += 1;
                report.matched += 1;
                // Taken now (marked once appended), or skipped for good below.
                settle(open, &mut settled_to);
                if entry.category.as_deref() == Some("unreadable") {
                    return skip(&mut report, "unreadable");
                }
                let pipeline = entry.pipeline.as_deref().unwrap_or_default();
                if !self.pipelines.read().iter().any(|p| p.name == pipeline) {
                    return skip(&mut report, "pipeline_not_configured");
                }
                let Some(event) = event_bytes(record.payload) else { return skip(&mut report, "no_event") };
                let resume = match (&entry.sink, &entry.processor) {
                    (Some(s), _) => Resume::Sink(s.clone()),
                    (None, Some(p)) => Resume::Processor(p.clone()),
                    (None, None) => Resume::Start,
                };
                let replays = entry.replays.unwrap_or(0).saturating_add(1);
                let head = ReplayHead {
                    entry: r,
                    resume,
                    topic: entry.topic.clone().unwrap_or_default(),
                    partition: entry.partition.and_then(|p| u32::try_from(p).ok()).unwrap_or(0),
                    offset: entry.offset.unwrap_or(u64::MAX),
                    replays: u32::try_from(replays).unwrap_or(u32::MAX),
                };
                report.reinjected += 1;
                if dry_run {
                    return true;
                }
                bytes = bytes.saturating_add(event.len()).saturating_add(record.key.map_or(0, <[u8]>::len));
                planned.push(Planned {
                    pipeline: pipeline.to_owned(),
                    head,
                    key: record.key.map(<[u8]>::to_vec),
                    timestamp: entry.timestamp.unwrap_or_else(flowgate_core::time::now_ms),
                    event,
                });
                true
            })?;
            if let Some(e) = failure.take() {
                return Err(e);
            }
            settled.insert(id, settled_to);
            if full {
                break 'partitions;
            }
        }
        if !dry_run {
            report.reinjected = 0;
        }
        Ok((report, planned, ends, Cursor { created_ms: dlq.created_ms(), offsets: settled }))
    }

    /// Drops the marks of entries `_dlq` no longer holds (deleted by retention, or past
    /// its end after a purge), once the marks doubled since the last time: marks would
    /// otherwise grow for the life of the data directory.
    fn prune_marks(&self, dlq: &flowgate_log::Topic) -> anyhow::Result<()> {
        let mut pruned_at = self.marks_pruned_at.lock();
        let len = self.with_marks(|m| Ok(m.count()))?;
        if len < pruned_at.saturating_mul(2).max(1024) {
            return Ok(());
        }
        let live: HashMap<u32, (u64, u64)> =
            dlq.partitions().iter().map(|p| (p.id(), (p.start_offset(), p.end_offset()))).collect();
        let dropped = self.with_marks(|m| {
            m.retain(|r| live.get(&r.partition).is_some_and(|&(start, end)| (start..end).contains(&r.offset)))
        })?;
        if dropped > 0 {
            tracing::info!(dropped, "replayed marks of entries no longer in the dead-letter topic were dropped");
        }
        *pruned_at = len - dropped;
        Ok(())
    }

    /// Marks the entries every replay topic holds: appended by a replay that did not get
    /// to mark them.
    fn reconcile(&self) -> anyhow::Result<()> {
        let mut found = Vec::new();
        let mut reached = Vec::new();
        let pipelines = self.pipelines.read().clone();
        for p in &pipelines {
            let name = replay_topic(&p.name);
            let Some(topic) = self.log.topic(&name) else { continue };
            for partition in topic.partitions() {
                let key = (name.clone(), topic.created_ms(), partition.id());
                let end = partition.end_offset();
                let from = self.reconciled.lock().get(&key).copied().filter(|&f| f <= end).unwrap_or(0);
                each_record(partition, from, end, |_, record| {
                    if let Ok((head, _)) = ReplayHead::parse(record.payload) {
                        found.push(head.entry);
                    }
                    true
                })?;
                reached.push((key, end));
            }
        }
        let missing: Vec<EntryRef> = self.with_marks(|m| Ok(found.into_iter().filter(|r| !m.contains(r)).collect()))?;
        if !missing.is_empty() {
            tracing::warn!(entries = missing.len(),
                "dead-letter entries in replay topics were not marked replayed (a crash during an earlier replay); marking them");
            self.with_marks(|m| m.add(&missing))?;
        }
        self.reconciled.lock().extend(reached);
        Ok(())
    }

    /// Step 3 for one pipeline: appends its records (the caller makes them durable); returns
    /// the partition and its end offset.
    fn append(&self, pipeline: &str, entries: &[&Planned]) -> anyhow::Result<(Arc<Partition>, u64)> {
        let name = replay_topic(pipeline);
        let topic = self.log.topic_or_create(&name)?;
        let partition = topic.partition(0)?.clone();
        // Replay topics have one partition: the replay worker reads them in order.
        let appender = Appender::new(Codec::None);
        let mut scratch = Scratch::default();
        let mut builder = BatchBuilder::new();
        let mut pending = 0usize;
        let mut end = partition.end_offset();
        let mut flush = |builder: &mut BatchBuilder| -> anyhow::Result<()> {
            if builder.is_empty() {
                return Ok(());
            }
            let written =
                appender.append_built(&topic, Route::Partition(0), builder, ProducerStamp::default(), &mut scratch)?;
            end = written.parts().iter().map(|p| p.outcome.end_offset()).max().unwrap_or(end);
            Ok(())
        };
        for p in entries {
            let record = p.head.encode(&p.event);
            builder.push(p.timestamp, p.key.as_deref(), None, std::iter::empty(), &record);
            pending = pending.saturating_add(record.len());
            if pending >= BATCH_BYTES {
                flush(&mut builder).map_err(|e| anyhow::anyhow!("cannot append to {name}: {e:#}"))?;
                pending = 0;
            }
        }
        flush(&mut builder).map_err(|e| anyhow::anyhow!("cannot append to {name}: {e:#}"))?;
        Ok((partition, end))
    }

    /// Step 4: waits until every pipeline's replay worker checkpointed past its target.
    async fn wait_for(&self, targets: &BTreeMap<String, u64>, wait: Duration) -> bool {
        let deadline = Instant::now() + wait;
        loop {
            let workers = self.health.workers();
            let done = targets.iter().all(|(pipeline, &end)| {
                let topic = replay_topic(pipeline);
                workers.iter().any(|w| {
                    &w.pipeline == pipeline && w.topic == topic && w.partition == 0 && w.committed_offset >= end
                })
            });
            if done {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Dead letters written since `ends` that replay one of `replayed`, counted once per
    /// replayed entry.
    fn failed_again(&self, ends: &[(u32, u64)], replayed: &HashSet<(u32, u64)>) -> anyhow::Result<u64> {
        let Some(dlq) = self.log.topic(DLQ_TOPIC) else { return Ok(0) };
        let mut failed = HashSet::new();
        for partition in dlq.partitions() {
            let from = ends.iter().find(|(id, _)| *id == partition.id()).map_or(0, |(_, end)| *end);
            each_record(partition, from, partition.end_offset(), |_, record| {
                if let Ok(entry) = serde_json::from_slice::<serde_json::Value>(record.payload) {
                    let of = &entry["replay_of"];
                    if let (Some(p), Some(o)) = (of["partition"].as_u64(), of["offset"].as_u64()) {
                        if let Ok(p) = u32::try_from(p) {
                            if replayed.contains(&(p, o)) {
                                failed.insert((p, o));
                            }
                        }
                    }
                }
                true
            })?;
        }
        Ok(failed.len() as u64)
    }

    /// Automatic reprocessing: every pipeline with `dlq.reprocess_after_ms` has its sink
    /// dead letters that failed at least that long ago replayed, until each original
    /// event was replayed `dlq.reprocess_max_times` times.
    pub(super) async fn reprocess(self: Arc<Self>, cancel: CancellationToken) {
        loop {
            // Read each round: a config reload adds, changes and removes policies.
            let policies: Vec<(String, u64, u32)> = self
                .pipelines
                .read()
                .iter()
                .filter_map(|p| Some((p.name.clone(), p.dlq.reprocess_after_ms?, p.dlq.reprocess_max_times)))
                .collect();
            // Often enough that an entry waits little past its delay, without scanning
            // the dead letters more than a few times a second; with no policy, only to
            // notice one.
            let shortest = policies.iter().map(|(_, after, _)| *after).min();
            let period = Duration::from_millis(shortest.map_or(1_000, |s| (s / 4).clamp(100, 10_000)));
            tokio::select! {
                _ = tokio::time::sleep(period) => {}
                _ = cancel.cancelled() => return,
            }
            for (pipeline, after, max_times) in &policies {
                let selection = Selection {
                    filter: EntryFilter { pipeline: Some(pipeline.clone()), category: None },
                    sinks_only: true,
                    failed_by_ms: Some(
                        flowgate_core::time::now_ms().saturating_sub(i64::try_from(*after).unwrap_or(i64::MAX)),
                    ),
                    max_replays: Some(u64::from(*max_times)),
                    cursor: Some(pipeline.clone()),
                };
                match self.run(selection, false, DEFAULT_ENTRIES, Duration::ZERO).await {
                    Ok(report) if report.reinjected > 0 => {
                        tracing::info!(pipeline = %pipeline, entries = report.reinjected,
                            "dead letters reprocessed automatically");
                    }
                    Ok(_) => {}
                    Err(e) => tracing::warn!(pipeline = %pipeline, error = %format!("{e:#}"),
                        "automatic reprocessing of dead letters failed; trying again later"),
                }
            }
        }
    }
}

fn skip(report: &mut ReplayReport, why: &'static str) -> bool {
    *report.skipped.entry(why).or_default() += 1;
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(sink: Option<&str>, category: &str, failed_ms: i64, replays: Option<u64>) -> EntryFields {
        serde_json::from_value(entry_json(sink, category, failed_ms, replays)).unwrap()
    }

    fn entry_json(sink: Option<&str>, category: &str, failed_ms: i64, replays: Option<u64>) -> serde_json::Value {
        let mut e = serde_json::json!({"pipeline": "p", "sink": sink, "processor": if sink.is_some() { None } else { Some("f") },
            "category": category, "last_failure_ms": failed_ms});
        if let Some(n) = replays {
            e["replays"] = n.into();
        }
        e
    }

    #[test]
    fn selections_filter_by_pipeline_category_stage_age_and_replays() {
        use Pick::{Never, NotYet, Yes};
        let all = Selection::default();
        assert_eq!(all.picks(&entry(None, "processing_error", 5, None)), Yes);
        let rejected = Selection {
            filter: EntryFilter { pipeline: Some("p".into()), category: Some("rejected".into()) },
            ..Selection::default()
        };
        assert_eq!(rejected.picks(&entry(Some("api"), "rejected", 5, None)), Yes);
        assert_eq!(rejected.picks(&entry(Some("api"), "retries_exhausted", 5, None)), Never);
        let other = Selection { filter: EntryFilter { pipeline: Some("q".into()), category: None }, ..all.clone() };
        assert_eq!(other.picks(&entry(Some("api"), "rejected", 5, None)), Never);
        let auto = Selection { sinks_only: true, failed_by_ms: Some(10), max_replays: Some(2), ..Selection::default() };
        assert_eq!(auto.picks(&entry(Some("api"), "rejected", 10, None)), Yes, "old enough, never replayed");
        assert_eq!(auto.picks(&entry(Some("api"), "rejected", 10, Some(1))), Yes, "replayed once of twice");
        assert_eq!(auto.picks(&entry(Some("api"), "rejected", 10, Some(2))), Never, "replayed as often as allowed");
        assert_eq!(auto.picks(&entry(Some("api"), "rejected", 11, None)), NotYet, "too recent");
        assert_eq!(auto.picks(&entry(None, "processing_error", 1, None)), Never, "not a sink's");
        let mut timeless = entry_json(Some("api"), "rejected", 1, None);
        timeless.as_object_mut().unwrap().remove("last_failure_ms");
        assert_eq!(auto.picks(&serde_json::from_value(timeless).unwrap()), Never, "never old enough");
    }

    fn append(log: &Log, topic: &str, records: &[(Option<&[u8]>, Vec<u8>)]) {
        let mut b = BatchBuilder::new();
        for (key, payload) in records {
            b.push(1, *key, None, std::iter::empty(), payload);
        }
        let mut batch = b.finish(Codec::None, ProducerStamp::default()).unwrap();
        log.topic(topic).unwrap().partition(0).unwrap().append(&mut batch.bytes).unwrap();
    }

    fn replayer(log: &Log, dir: &std::path::Path) -> Arc<Replayer> {
        let config: PipelineConfig = serde_json::from_value(serde_json::json!({
            "name": "p", "topics": ["in"], "sinks": [{"name": "api", "type": "stdout"}]
        }))
        .unwrap();
        Arc::new(Replayer::new(log.clone(), dir.to_path_buf(), vec![Arc::new(config)], PipelineHealth::default()))
    }

    #[tokio::test]
    async fn entries_replayed_but_not_marked_before_a_crash_are_marked_and_not_sent_again() {
        let dir = tempfile::tempdir().unwrap();
        let log = Log::open(dir.path().join("log"), flowgate_log::LogConfig::default()).unwrap();
        log.create_topic(DLQ_TOPIC, 1).unwrap();
        log.create_topic(&replay_topic("p"), 1).unwrap();
        let entry = |pipeline: &str, category: &str, event: &str| {
            format!(r#"{{"pipeline":"{pipeline}","processor":null,"sink":"api","category":"{category}","topic":"in","partition":0,"offset":5,"timestamp":9,"event":{event}}}"#).into_bytes()
        };
        append(
            &log,
            DLQ_TOPIC,
            &[
                (Some(b"k"), entry("p", "rejected", r#"{"n": 1.50}"#)),
                (None, entry("p", "retries_exhausted", r#""not json""#)),
                (None, entry("p", "unreadable", "null")),
                (None, entry("p", "rejected", "null")),
                (None, entry("gone", "rejected", "{}")),
            ],
        );
        let now = ReplayRequest { wait_ms: Some(0), ..ReplayRequest::default() };
        let dry = replayer(&log, dir.path()).replay(&ReplayRequest { dry_run: true, ..now.clone() }).await.unwrap();
        assert_eq!((dry.matched, dry.reinjected), (5, 2), "{dry:?}");
        let skipped: Vec<(&str, u64)> = dry.skipped.iter().map(|(k, v)| (*k, *v)).collect();
        assert_eq!(skipped, vec![("no_event", 1), ("pipeline_not_configured", 1), ("unreadable", 1)]);
        let replays = log.topic(&replay_topic("p")).unwrap().partition(0).unwrap().clone();
        assert_eq!(replays.end_offset(), 0, "a dry run appends nothing");

        let report = replayer(&log, dir.path()).replay(&now).await.unwrap();
        assert_eq!(report.reinjected, 2, "{report:?}");
        let mut records = Vec::new();
        each_record(&replays, 0, replays.end_offset(), |_, r| {
            let (head, at) = ReplayHead::parse(r.payload).unwrap();
            records.push((
                head.entry.offset,
                head.resume,
                head.replays,
                r.key.map(<[u8]>::to_vec),
                r.payload[at..].to_vec(),
                r.timestamp,
            ));
            true
        })
        .unwrap();
        assert_eq!(
            records,
            vec![
                (0, Resume::Sink("api".into()), 1, Some(b"k".to_vec()), br#"{"n": 1.50}"#.to_vec(), 9),
                (1, Resume::Sink("api".into()), 1, None, b"not json".to_vec(), 9),
            ]
        );

        // A kill -9 after the appends, before the marks: the next replay marks them from
        // the replay topic and sends nothing again.
        std::fs::remove_file(dir.path().join("dlq/replayed")).unwrap();
        let report = replayer(&log, dir.path()).replay(&now).await.unwrap();
        assert_eq!((report.reinjected, report.skipped.get("already_replayed")), (0, Some(&2)), "{report:?}");
        assert_eq!(replays.end_offset(), 2);
        let again = replayer(&log, dir.path());
        let stored = entry("p", "rejected", r#"{"n": 1.50}"#);
        assert!(again.is_replayed(0, 0, &stored).unwrap());
        assert!(!again.is_replayed(0, 0, b"another entry at the same place").unwrap());
    }

    #[tokio::test]
    async fn automatic_runs_start_where_the_last_left_nothing_to_take() {
        let dir = tempfile::tempdir().unwrap();
        let log = Log::open(dir.path().join("log"), flowgate_log::LogConfig::default()).unwrap();
        log.create_topic(DLQ_TOPIC, 1).unwrap();
        let entry = |pipeline: &str, failed_ms: i64| {
            format!(r#"{{"pipeline":"{pipeline}","processor":null,"sink":"api","category":"rejected","topic":"in","partition":0,"offset":5,"timestamp":9,"last_failure_ms":{failed_ms},"event":{{}}}}"#).into_bytes()
        };
        // Offsets: 0 another pipeline's, 1 old, 2 too recent at first, 3 old.
        append(
            &log,
            DLQ_TOPIC,
            &[(None, entry("q", 1)), (None, entry("p", 1)), (None, entry("p", 50)), (None, entry("p", 1))],
        );
        let r = replayer(&log, dir.path());
        let auto = |failed_by_ms| Selection {
            filter: EntryFilter { pipeline: Some("p".into()), category: None },
            sinks_only: true,
            failed_by_ms: Some(failed_by_ms),
            max_replays: Some(3),
            cursor: Some("p".into()),
        };
        let report = r.run(auto(10), false, 100, Duration::ZERO).await.unwrap();
        assert_eq!(report.reinjected, 2, "{report:?}");
        assert_eq!(r.cursors.lock()["p"].offsets[&0], 2, "stops at the entry a later run may take");
        let report = r.run(auto(10), false, 100, Duration::ZERO).await.unwrap();
        assert_eq!((report.reinjected, report.matched), (0, 1), "only offset 3, replayed, is read again: {report:?}");
        let report = r.run(auto(100), false, 100, Duration::ZERO).await.unwrap();
        assert_eq!(report.reinjected, 1, "{report:?}");
        assert_eq!(r.cursors.lock()["p"].offsets[&0], 4);
        append(&log, DLQ_TOPIC, &[(None, entry("p", 1))]);
        let report = r.run(auto(100), false, 100, Duration::ZERO).await.unwrap();
        assert_eq!((report.reinjected, report.matched), (1, 1), "only the new entry is read: {report:?}");
        // A run that takes up to its limit stops the cursor at the first entry left.
        append(&log, DLQ_TOPIC, &[(None, entry("p", 1)), (None, entry("p", 1))]);
        let report = r.run(auto(100), false, 1, Duration::ZERO).await.unwrap();
        assert!(report.more && report.reinjected == 1, "{report:?}");
        assert_eq!(r.cursors.lock()["p"].offsets[&0], 6);
        // A purge makes `_dlq` anew: the cursor of the old one does not apply.
        let old = log.topic(DLQ_TOPIC).unwrap().created_ms();
        while flowgate_core::time::now_ms() <= old {
            tokio::task::yield_now().await;
        }
        log.delete_topic(DLQ_TOPIC).unwrap();
        log.create_topic(DLQ_TOPIC, 1).unwrap();
        // (Other failure times: an entry equal to one replayed at the same place would
        // count as replayed.)
        append(&log, DLQ_TOPIC, &[(None, entry("p", 2)), (None, entry("p", 2))]);
        let report = r.run(auto(100), false, 100, Duration::ZERO).await.unwrap();
        assert_eq!(report.reinjected, 2, "{report:?}");
        assert_eq!(r.cursors.lock()["p"].offsets[&0], 2);
        append(&log, DLQ_TOPIC, &[(None, entry("p", 3)), (None, entry("p", 3))]);
        append(&log, DLQ_TOPIC, &[(None, entry("p", 3)), (None, entry("p", 3)), (None, entry("p", 3))]);
        append(&log, DLQ_TOPIC, &[(None, entry("p", 3)), (None, entry("p", 3)), (None, entry("p", 3))]);
        // A request without a cursor reads everything and moves none.
        let report = r.replay(&ReplayRequest { wait_ms: Some(0), ..ReplayRequest::default() }).await.unwrap();
        assert_eq!((report.matched, report.reinjected), (10, 8), "{report:?}");
        assert_eq!(r.cursors.lock()["p"].offsets[&0], 2);
    }

    #[test]
    fn events_come_back_as_they_were_stored() {
        assert_eq!(event_bytes(br#"{"a":1,"event":{"z":1, "a":[2.50]}}"#).unwrap(), br#"{"z":1, "a":[2.50]}"#);
        assert_eq!(event_bytes(br#"{"event":"not json \u00ff"}"#).unwrap(), "not json \u{ff}".as_bytes());
        assert_eq!(event_bytes(br#"{"event":null}"#), None);
        assert_eq!(event_bytes(br#"{"pipeline":"p"}"#), None);
        assert_eq!(event_bytes(b"garbage"), None);
    }

    fn stored(event: &[u8]) -> Vec<u8> {
        use super::super::dead_letters::{Category, Entry, FailedAt};
        Entry {
            pipeline: "p",
            at: FailedAt::Sink("api"),
            category: Category::Rejected,
            error: "no",
            code: None,
            attempts: 1,
            first_failure_ms: 0,
            last_failure_ms: 0,
            topic: "in",
            partition: 0,
            offset: 0,
            last_offset: None,
            timestamp: 0,
            event: Some(event),
        }
        .encode()
    }

    #[test]
    fn text_is_kept_as_text_and_other_bytes_as_base64_at_most_doubling_an_entry() {
        let text = stored(b"plain text, not json");
        assert!(std::str::from_utf8(&text).unwrap().contains(r#""event":"plain text, not json""#));
        let control = vec![1u8; 1000];
        let entry = stored(&control);
        assert!(std::str::from_utf8(&entry).unwrap().contains(r#""event_encoding":"base64""#));
        assert!(entry.len() < 2 * control.len(), "{}", entry.len());
        assert_eq!(event_bytes(&entry).unwrap(), control);
        assert_eq!(event_bytes(&stored(&[0xff, 0xfe, b'{'])).unwrap(), vec![0xff, 0xfe, b'{']);
    }

    proptest::proptest! {
        #[test]
        fn any_event_comes_back_from_its_entry_byte_for_byte(event in proptest::collection::vec(proptest::prelude::any::<u8>(), 1..300)) {
            let entry = stored(&event);
            proptest::prop_assert!(serde_json::from_slice::<serde_json::Value>(&entry).is_ok());
            proptest::prop_assert!(entry.len() <= 2 * event.len() + 400);
            let back = event_bytes(&entry);
            // JSON events come back as stored; `null` is no event.
            if event.trim_ascii() != b"null" {
                proptest::prop_assert_eq!(back.as_deref(), Some(&event[..]));
            }
        }
    }
}
