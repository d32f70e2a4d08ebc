//! A partition: an ordered, append-only sequence of batches in segment files.
//!
//! Appends take the partition's writer lock for one positional write per batch; reads
//! take no lock beyond a snapshot of the segment list, and see only batches that were
//! completely written. Durability is tracked as an offset: every record below
//! [`Partition::durable_offset`] has been fsynced.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use flowgate_core::batch::{set_base_offset, BatchHeader, BatchView, HEADER_LEN};
use parking_lot::{Mutex, RwLock};
use tokio::sync::Notify;

use crate::config::{FsyncPolicy, LogConfig};
use crate::error::{LogError, Result};
use crate::flusher::Flusher;
use crate::index::write_file_atomic;
use crate::producers::{ProducerState, SequenceCheck, SequenceRule};
use crate::segment::{file_stem, IndexCursor, Segment};
use crate::settings::Retention;

/// Where an appended batch landed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AppendOutcome {
    /// Offset of the batch's first record.
    pub first_offset: u64,
    /// Records in the batch.
    pub record_count: u32,
    /// True when the batch was a retry of one already stored; nothing was written.
    pub duplicate: bool,
}

impl AppendOutcome {
    /// The offset after the batch's last record: wait for durability up to here.
    pub fn end_offset(&self) -> u64 {
        self.first_offset.saturating_add(u64::from(self.record_count))
    }
}

/// Whole batches read from a partition.
#[derive(Clone, Debug, Default)]
pub struct ReadResult {
    /// Concatenated whole batches; the first one contains the requested offset.
    pub batches: Vec<u8>,
    /// First offset the partition still holds.
    pub log_start_offset: u64,
    /// Offset the next record will get.
    pub log_end_offset: u64,
}

/// A partition's numbers, for listings.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct PartitionInfo {
    /// Partition number.
    pub partition: u32,
    /// First offset held.
    pub start_offset: u64,
    /// Next offset to assign.
    pub end_offset: u64,
    /// Bytes on disk in segment files.
    pub size_bytes: u64,
    /// Segment files.
    pub segments: usize,
    /// Events retention deleted before every consumer that reports its committed offset
    /// ([`Partition::set_consumer_offset`]) had read them, since start.
    pub unread_deleted_events: u64,
}

struct Writer {
    active: Arc<Segment>,
    cursor: IndexCursor,
    position: u64,
    next_offset: u64,
    producers: ProducerState,
    created_ms: i64,
}

/// One partition of a topic.
pub struct Partition {
    id: u32,
    dir: PathBuf,
    config: Arc<LogConfig>,
    flusher: Arc<Flusher>,
    writer: Mutex<Writer>,
    segments: RwLock<Vec<Arc<Segment>>>,
    start_offset: AtomicU64,
    end_offset: AtomicU64,
    durable_offset: AtomicU64,
    dirty: AtomicBool,
    sync_failure: Mutex<Option<String>>,
    fail_fsyncs: AtomicBool,
    consumers: Mutex<HashMap<String, u64>>,
    unread_deleted: AtomicU64,
    durable_notify: Notify,
    data_notify: Notify,
}

impl std::fmt::Debug for Partition {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Partition").field("dir", &self.dir).field("end_offset", &self.end_offset()).finish()
    }
}

fn list_segment_bases(dir: &Path) -> Result<Vec<u64>> {
    let mut bases = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(LogError::io("list", dir))? {
        let entry = entry.map_err(LogError::io("list", dir))?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if let Some(stem) = name.strip_suffix(".log") {
            if let Ok(base) = stem.parse::<u64>() {
                bases.push(base);
            }
        } else if name.ends_with(".tmp") {
            // An atomic write that did not finish; the real file is intact or rebuilt.
            let _ = std::fs::remove_file(entry.path());
        }
    }
    bases.sort_unstable();
    Ok(bases)
}

pub(crate) fn sync_dir(dir: &Path) -> Result<()> {
    std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(LogError::io("fsync directory", dir))
}

impl Partition {
    /// Opens (or creates) the partition in `dir`, recovering its active segment.
    pub(crate) fn open(id: u32, dir: PathBuf, config: Arc<LogConfig>, flusher: Arc<Flusher>) -> Result<Partition> {
        if !dir.is_dir() {
            std::fs::create_dir_all(&dir).map_err(LogError::io("create directory", &dir))?;
            // A new partition must survive a power loss with its topic.
            if let Some(parent) = dir.parent() {
                sync_dir(parent)?;
            }
        }
        let bases = list_segment_bases(&dir)?;
        let interval = config.index_interval_bytes;
        let mut segments = Vec::with_capacity(bases.len().max(1));
        for pair in bases.windows(2) {
            segments.push(Arc::new(Segment::open_sealed(&dir, pair[0], pair[1], interval)?));
        }
        let active_base = bases.last().copied().unwrap_or(0);
        let snapshot_path = dir.join(format!("{}.producers", file_stem(active_base)));
        let mut producers = std::fs::read(&snapshot_path)
            .ok()
            .and_then(|b| ProducerState::from_snapshot(&b, config.max_producers_per_partition))
            .unwrap_or_else(|| ProducerState::new(config.max_producers_per_partition));
        let (active, recovered) = Segment::recover_active(&dir, active_base, interval, &mut |b| {
            let p = b.view.header.producer;
            if p.producer_id != 0 {
                producers.record(p.producer_id, p.sequence, b.view.base_offset(), b.view.header.record_count);
            }
        })?;
        if let Some(cut) = &recovered.cut {
            tracing::warn!(
                segment = %active.path().display(),
                cut_at = cut.position,
                bytes_cut = cut.end - cut.position,
                reason = %cut.reason,
                "recovery cut a torn or damaged tail back to the last good batch"
            );
        }
        let active = Arc::new(active);
        active.sync()?;
        // The active segment may have just been created (a new partition, or a crash
        // right after a roll): its directory entry must be durable too.
        sync_dir(&dir)?;
        let position = active.readable_len();
        let next_offset = active.next_offset();
        segments.push(active.clone());
        let start = segments.first().map_or(0, |s| s.base_offset());
        Ok(Partition {
            id,
            dir,
            config,
            flusher,
            writer: Mutex::new(Writer {
                active,
                cursor: recovered.cursor,
                position,
                next_offset,
                producers,
                created_ms: flowgate_core::time::now_ms(),
            }),
            segments: RwLock::new(segments),
            start_offset: AtomicU64::new(start),
            end_offset: AtomicU64::new(next_offset),
            durable_offset: AtomicU64::new(next_offset),
            dirty: AtomicBool::new(false),
            sync_failure: Mutex::new(None),
            fail_fsyncs: AtomicBool::new(false),
            consumers: Mutex::new(HashMap::new()),
            unread_deleted: AtomicU64::new(0),
            durable_notify: Notify::new(),
            data_notify: Notify::new(),
        })
    }

    /// The partition number.
    pub fn id(&self) -> u32 {
        self.id
    }

    /// The partition's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// First offset still held.
    pub fn start_offset(&self) -> u64 {
        self.start_offset.load(Ordering::Acquire)
    }

    /// Offset the next record will get.
    pub fn end_offset(&self) -> u64 {
        self.end_offset.load(Ordering::Acquire)
    }

    /// Every record below this offset is on stable storage.
    pub fn durable_offset(&self) -> u64 {
        self.durable_offset.load(Ordering::Acquire)
    }

    /// Numbers for listings.
    pub fn info(&self) -> PartitionInfo {
        let segments = self.segments.read();
        PartitionInfo {
            partition: self.id,
            start_offset: self.start_offset(),
            end_offset: self.end_offset(),
            size_bytes: segments.iter().map(|s| s.readable_len()).sum(),
            segments: segments.len(),
            unread_deleted_events: self.unread_deleted_events(),
        }
    }

    /// Records that `consumer` (a pipeline, by name) has committed every offset below
    /// `offset` of this partition. Retention still deletes what the consumer has not
    /// read when the limits say so, but counts it, logs a warning naming the consumer,
    /// and shows it in [`PartitionInfo::unread_deleted_events`]. The latest call wins
    /// (a consumer rewound to earlier offsets reports the earlier offset).
    pub fn set_consumer_offset(&self, consumer: &str, offset: u64) {
        let mut consumers = self.consumers.lock();
        match consumers.get_mut(consumer) {
            Some(o) => *o = offset,
            None => {
                consumers.insert(consumer.to_owned(), offset);
            }
        }
    }

    /// Every consumer that reported a committed offset, with that offset, by name.
    pub fn consumers(&self) -> Vec<(String, u64)> {
        let mut consumers: Vec<(String, u64)> = self.consumers.lock().iter().map(|(c, &o)| (c.clone(), o)).collect();
        consumers.sort_unstable();
        consumers
    }

    /// When the oldest segment was last written (ms since the epoch): the age retention
    /// goes by.
    pub fn oldest_segment_written_ms(&self) -> Result<i64> {
        let oldest = self.segments.read().first().cloned();
        oldest.map_or(Ok(0), |s| s.written_ms())
    }

    /// Forgets a consumer (a pipeline removed from the config).
    pub fn remove_consumer(&self, consumer: &str) {
        self.consumers.lock().remove(consumer);
    }

    /// Events retention deleted before a consumer had read them, since start.
    pub fn unread_deleted_events(&self) -> u64 {
        self.unread_deleted.load(Ordering::Relaxed)
    }

    /// Makes every later fsync of this partition fail (or succeed again), as a failing
    /// disk would. For tests of the fencing rules; never called by the engine.
    #[doc(hidden)]
    pub fn inject_fsync_failures(&self, on: bool) {
        self.fail_fsyncs.store(on, Ordering::Release);
    }

    /// Fsyncs a segment of this partition; a failure fences the partition.
    fn sync_segment(&self, segment: &Segment) -> Result<()> {
        #[cfg(all(feature = "failpoints", debug_assertions))]
        crate::failpoints::before_fsync();
        let result = if self.fail_fsyncs.load(Ordering::Acquire) {
            Err(LogError::Io {
                action: "fsync",
                path: segment.path().to_path_buf(),
                source: std::io::Error::other("injected fsync failure"),
            })
        } else {
            segment.sync()
        };
        if let Err(e) = &result {
            self.fence(e);
        }
        result
    }

    /// After a failed fsync the page cache cannot be trusted to hold the data: refuse
    /// further appends and fail every waiter rather than ack a maybe-lost write.
    fn fence(&self, e: &LogError) {
        let mut failure = self.sync_failure.lock();
        if failure.is_none() {
            tracing::error!(partition = %self.dir.display(), error = %e,
                "fsync failed; the partition refuses appends until restart");
            *failure = Some(e.to_string());
        }
        drop(failure);
        self.durable_notify.notify_waiters();
    }

    /// Refuses an append when the partition is fenced by a failed fsync.
    pub fn check_writable(&self) -> Result<()> {
        match self.sync_failure.lock().clone() {
            Some(reason) => Err(LogError::Io {
                action: "append after a failed fsync to",
                path: self.dir.clone(),
                source: std::io::Error::other(reason),
            }),
            None => Ok(()),
        }
    }

    /// Appends one encoded, already validated batch (its base offset is assigned here)
    /// with a single write. The bytes are in the segment file when this returns, so a
    /// killed process loses nothing; call [`Partition::wait_durable`] before
    /// acknowledging when the policy is `always`.
    ///
    /// A batch from an idempotent producer whose sequence is already stored is not
    /// written again: the outcome carries the offsets it got the first time.
    pub fn append(&self, batch: &mut [u8]) -> Result<AppendOutcome> {
        self.append_with(batch, SequenceRule::Contiguous)
    }

    /// [`Partition::append`], checking an idempotent producer's sequence by `rule`.
    pub fn append_with(&self, batch: &mut [u8], rule: SequenceRule) -> Result<AppendOutcome> {
        let header = BatchHeader::parse(batch)?;
        if header.total_len() != batch.len() {
            return Err(LogError::InvalidBatch(flowgate_core::BatchError::BadLength(batch.len() as u64)));
        }
        let producer = header.producer;
        let len = batch.len() as u64;
        let mut w = self.writer.lock();
        self.check_writable()?;
        if producer.producer_id != 0 {
            let (producer_id, sequence, partition) = (producer.producer_id, producer.sequence, self.id);
            match w.producers.check_with(producer_id, sequence, rule) {
                SequenceCheck::New => {}
                SequenceCheck::Duplicate { first_offset, record_count } => {
                    return Ok(AppendOutcome { first_offset, record_count, duplicate: true });
                }
                SequenceCheck::StoredLongAgo { last_sequence } => {
                    return Err(LogError::DuplicateSequence { producer_id, sequence, last_sequence });
                }
                SequenceCheck::OutOfOrder { expected } => {
                    return Err(LogError::OutOfOrderSequence { producer_id, sequence, expected, partition });
                }
                SequenceCheck::UnknownProducer => {
                    return Err(LogError::UnknownProducer { producer_id, sequence, partition });
                }
            }
        }
        self.maybe_roll(&mut w, len)?;
        let base = w.next_offset;
        set_base_offset(batch, base);
        let position = w.position;
        if let Err(e) = w.active.write_at(batch, position) {
            // Leave no partial batch behind for recovery to trip over.
            let _ = std::fs::OpenOptions::new().write(true).open(w.active.path()).and_then(|f| f.set_len(position));
            return Err(e);
        }
        let next = base.checked_add(u64::from(header.record_count)).ok_or(LogError::OffsetsExhausted)?;
        let Writer { active, cursor, .. } = &mut *w;
        active.publish(cursor, position, len, base, next, header.max_timestamp);
        w.position = position + len;
        w.next_offset = next;
        if producer.producer_id != 0 {
            w.producers.record(producer.producer_id, producer.sequence, base, header.record_count);
        }
        self.end_offset.store(next, Ordering::Release);
        self.dirty.store(true, Ordering::Release);
        drop(w);
        self.data_notify.notify_waiters();
        Ok(AppendOutcome { first_offset: base, record_count: header.record_count, duplicate: false })
    }

    /// The last sequence this partition stored from idempotent producer `producer_id`,
    /// if it remembers the producer (see `log.max_producers_per_partition`).
    pub fn producer_last_sequence(&self, producer_id: u64) -> Option<u64> {
        self.writer.lock().producers.last_sequence(producer_id)
    }

    fn maybe_roll(&self, w: &mut Writer, incoming: u64) -> Result<()> {
        if w.position == 0 {
            return Ok(());
        }
        let full = w.position.saturating_add(incoming) > self.config.segment_bytes;
        let old = self.config.segment_ms > 0
            && flowgate_core::time::now_ms().saturating_sub(w.created_ms)
                >= i64::try_from(self.config.segment_ms).unwrap_or(i64::MAX);
        if !(full || old) {
            return Ok(());
        }
        // Under every policy, `never` included, a sealed segment is fsynced: the segment
        // is never written again, and a failure fences the partition like any fsync.
        self.sync_segment(&w.active)?;
        self.durable_offset.fetch_max(w.next_offset, Ordering::AcqRel);
        self.durable_notify.notify_waiters();
        w.active.seal(&w.cursor)?;
        let base = w.next_offset;
        let snapshot = self.dir.join(format!("{}.producers", file_stem(base)));
        write_file_atomic(&snapshot, &w.producers.to_snapshot())?;
        let segment = Arc::new(Segment::create(&self.dir, base)?);
        if let Err(e) = sync_dir(&self.dir) {
            self.fence(&e);
            return Err(e);
        }
        self.segments.write().push(segment.clone());
        w.active = segment;
        w.cursor = IndexCursor::new(self.config.index_interval_bytes);
        w.position = 0;
        w.created_ms = flowgate_core::time::now_ms();
        tracing::debug!(dir = %self.dir.display(), base, "rolled to a new segment");
        Ok(())
    }

    /// Forces everything appended so far to stable storage and advances the durable
    /// offset. Called by the flusher; cheap when nothing was appended since last time.
    pub fn sync(&self) -> Result<()> {
        if !self.dirty.swap(false, Ordering::AcqRel) {
            return Ok(());
        }
        let (segment, end) = {
            let w = self.writer.lock();
            (w.active.clone(), w.next_offset)
        };
        self.sync_segment(&segment)?;
        self.durable_offset.fetch_max(end, Ordering::AcqRel);
        self.durable_notify.notify_waiters();
        Ok(())
    }

    /// Puts every record below `end_offset` on stable storage whatever the fsync policy
    /// (with `always`, by joining the flusher's group commit). For writers whose own
    /// progress is fsynced — a pipeline's checkpoint must not get ahead of the outputs it
    /// accounts for, even under `interval` or `never`.
    pub async fn make_durable(self: &Arc<Self>, end_offset: u64) -> Result<()> {
        if self.config.fsync == FsyncPolicy::Always || self.durable_offset() >= end_offset {
            return self.wait_durable(end_offset).await;
        }
        let partition = self.clone();
        tokio::task::spawn_blocking(move || partition.sync()).await.map_err(|e| LogError::Io {
            action: "fsync",
            path: self.dir.clone(),
            source: std::io::Error::other(e.to_string()),
        })??;
        if let Some(reason) = self.sync_failure.lock().clone() {
            return Err(LogError::Io {
                action: "fsync",
                path: self.dir.clone(),
                source: std::io::Error::other(reason),
            });
        }
        Ok(())
    }

    /// Waits until every record below `end_offset` meets the configured durability:
    /// at once for `interval` and `never` (the write already happened), after the
    /// flusher's next fsync for `always`.
    pub async fn wait_durable(self: &Arc<Self>, end_offset: u64) -> Result<()> {
        if self.config.fsync != FsyncPolicy::Always {
            return Ok(());
        }
        if self.durable_offset() >= end_offset {
            return Ok(());
        }
        self.flusher.request(self.clone());
        loop {
            let notified = self.durable_notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.durable_offset() >= end_offset {
                return Ok(());
            }
            if let Some(reason) = self.sync_failure.lock().clone() {
                return Err(LogError::Io {
                    action: "fsync",
                    path: self.dir.clone(),
                    source: std::io::Error::other(reason),
                });
            }
            notified.await;
        }
    }

    /// Waits up to `timeout` for the end offset to pass `offset`. Returns the end offset.
    pub async fn wait_for_data(&self, offset: u64, timeout: Duration) -> u64 {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.data_notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let end = self.end_offset();
            if end > offset {
                return end;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return self.end_offset();
            }
        }
    }

    fn segments_snapshot(&self) -> Vec<Arc<Segment>> {
        self.segments.read().clone()
    }

    /// Reads whole batches starting with the one that holds `offset`, about `max_bytes`
    /// of them (at least one batch whatever its size, if any is there).
    pub fn read(&self, offset: u64, max_bytes: usize) -> Result<ReadResult> {
        let start = self.start_offset();
        let end = self.end_offset();
        let mut result = ReadResult { batches: Vec::new(), log_start_offset: start, log_end_offset: end };
        if offset < start || offset > end {
            return Err(LogError::OffsetOutOfRange { requested: offset, start, end });
        }
        if offset == end {
            return Ok(result);
        }
        if let Some((segment, pos, header)) = self.locate(offset)? {
            let readable = segment.readable_len();
            let first_len = header.total_len();
            let want = max_bytes.max(first_len).min((readable - pos) as usize);
            result.batches.resize(want, 0);
            let got = segment.read_at(&mut result.batches, pos)?;
            result.batches.truncate(got);
            // Cut at the last whole batch.
            let mut whole = 0usize;
            while let Some(total) = BatchHeader::peek_total_len(&result.batches[whole..]) {
                let total = total as usize;
                if whole + total > result.batches.len() {
                    break;
                }
                whole += total;
            }
            result.batches.truncate(whole);
        }
        Ok(result)
    }

    /// The segment, position and header of the stored batch that holds `offset`.
    fn locate(&self, offset: u64) -> Result<Option<(Arc<Segment>, u64, BatchHeader)>> {
        let segments = self.segments_snapshot();
        let first = segments.partition_point(|s| s.base_offset() <= offset).saturating_sub(1);
        let mut header = [0u8; HEADER_LEN];
        for segment in &segments[first..] {
            let readable = segment.readable_len();
            let mut pos = segment.index_lookup(offset);
            // Skip the batches that end before `offset`.
            while pos < readable {
                segment.read_at(&mut header, pos)?;
                let h = BatchHeader::parse(&header)?;
                if h.last_offset() >= offset {
                    return Ok(Some((segment.clone(), pos, h)));
                }
                pos += h.total_len() as u64;
            }
        }
        Ok(None)
    }

    /// The first timestamp of the stored batch that holds `offset` (its header alone is
    /// read), or `None` when no stored batch holds it.
    pub fn batch_timestamp_at(&self, offset: u64) -> Result<Option<i64>> {
        Ok(self.locate(offset)?.map(|(_, _, header)| header.first_timestamp))
    }

    /// The offset of the first record whose timestamp is at or after `timestamp_ms`,
    /// or `None` if every stored record is earlier.
    pub fn offset_for_timestamp(&self, timestamp_ms: i64) -> Result<Option<u64>> {
        let segments = self.segments_snapshot();
        let mut scratch = Vec::new();
        let mut buf = Vec::new();
        for segment in segments.iter().filter(|s| s.max_timestamp() >= timestamp_ms) {
            let readable = segment.readable_len();
            let mut pos = segment.time_lookup(timestamp_ms);
            let mut prefix = [0u8; HEADER_LEN];
            while pos < readable {
                segment.read_at(&mut prefix, pos)?;
                let h = BatchHeader::parse(&prefix)?;
                let total = h.total_len();
                if h.max_timestamp >= timestamp_ms {
                    buf.resize(total, 0);
                    segment.read_at(&mut buf, pos)?;
                    let (view, _) = BatchView::parse(&buf)?;
                    for record in view.records(&mut scratch)? {
                        let record = record?;
                        if record.timestamp >= timestamp_ms {
                            return Ok(Some(view.base_offset() + u64::from(record.offset_delta)));
                        }
                    }
                }
                pos += total as u64;
            }
        }
        Ok(None)
    }

    /// Deletes whole sealed segments past the `retention` limits (the topic's). Returns
    /// the number of segments and bytes deleted.
    ///
    /// Age is the time since the segment file was last written (its modification time),
    /// not the events' timestamps: a replay of week-old events is new data. Deleting
    /// offsets a registered consumer has not committed is counted, logged as a warning
    /// and shown in [`PartitionInfo::unread_deleted_events`].
    pub fn enforce_retention(&self, now_ms: i64, retention: Retention) -> Result<(usize, u64)> {
        let (retention_bytes, retention_ms) = (retention.bytes, retention.ms);
        let max_age = i64::try_from(retention_ms).unwrap_or(i64::MAX);
        let mut deleted = (0usize, 0u64);
        let mut segments = self.segments.write();
        let mut total: u64 = segments.iter().map(|s| s.readable_len()).sum();
        while segments.len() > 1 {
            let oldest = &segments[0];
            let size = oldest.readable_len();
            let by_bytes = retention_bytes > 0 && total.saturating_sub(size) >= retention_bytes;
            let by_age = retention_ms > 0 && now_ms.saturating_sub(oldest.written_ms()?) > max_age;
            if !(by_bytes || by_age) {
                break;
            }
            let (base, end) = (oldest.base_offset(), segments[1].base_offset());
            self.count_unread(base, end, by_bytes, by_age);
            let oldest = segments.remove(0);
            self.start_offset.store(end, Ordering::Release);
            oldest.delete_files()?;
            total = total.saturating_sub(size);
            deleted.0 += 1;
            deleted.1 += size;
            tracing::info!(segment = %oldest.path().display(), bytes = size, by_bytes, by_age, "retention deleted a segment");
        }
        drop(segments);
        if deleted.0 > 0 {
            sync_dir(&self.dir)?;
        }
        Ok(deleted)
    }

    /// Counts and reports the offsets in `[base, end)` that some consumer has not
    /// committed, as retention is about to delete them.
    fn count_unread(&self, base: u64, end: u64, by_bytes: bool, by_age: bool) {
        let consumers = self.consumers.lock();
        let mut unread_by_any = 0u64;
        for (consumer, &committed) in consumers.iter() {
            let unread = end.saturating_sub(committed.max(base));
            if unread > 0 {
                unread_by_any = unread_by_any.max(unread);
                tracing::warn!(
                    partition = %self.dir.display(),
                    consumer = %consumer,
                    committed,
                    deleted_from = base,
                    deleted_to = end,
                    unread_events = unread,
                    by_bytes,
                    by_age,
                    "retention deleted events a consumer has not read; raise the topic's retention \
                     (flowgate topics alter, or log.retention_ms and log.retention_bytes for topics \
                     without their own), or make the consumer keep up"
                );
            }
        }
        self.unread_deleted.fetch_add(unread_by_any, Ordering::Relaxed);
    }

    /// Seals nothing, but syncs data and writes the active segment's index files, so a
    /// clean restart has less to rebuild. Called at shutdown.
    pub fn close(&self) -> Result<()> {
        self.dirty.store(true, Ordering::Release);
        self.sync()
    }
}
