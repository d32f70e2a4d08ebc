//! A partition: an ordered, append-only sequence of batches in segment files.
//!
//! Appends take the partition's writer lock for one positional write per batch; reads
//! take no lock beyond a snapshot of the segment list, and see only batches that were
//! completely written. Durability is tracked as an offset: every record below
//! [`Partition::durable_offset`] has been fsynced.

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
use crate::producers::{ProducerState, SequenceCheck};
use crate::segment::{file_stem, IndexCursor, Segment};

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
        self.first_offset + u64::from(self.record_count)
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
        std::fs::create_dir_all(&dir).map_err(LogError::io("create directory", &dir))?;
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
        let header = BatchHeader::parse(batch)?;
        if header.total_len() != batch.len() {
            return Err(LogError::InvalidBatch(flowgate_core::BatchError::BadLength(batch.len() as u64)));
        }
        if let Some(reason) = self.sync_failure.lock().clone() {
            return Err(LogError::Io {
                action: "append after a failed fsync to",
                path: self.dir.clone(),
                source: std::io::Error::other(reason),
            });
        }
        let producer = header.producer;
        let len = batch.len() as u64;
        let mut w = self.writer.lock();
        if producer.producer_id != 0 {
            match w.producers.check(producer.producer_id, producer.sequence) {
                SequenceCheck::New => {}
                SequenceCheck::Duplicate { first_offset, record_count } => {
                    return Ok(AppendOutcome { first_offset, record_count, duplicate: true });
                }
                SequenceCheck::TooOld => {
                    return Err(LogError::DuplicateSequence {
                        producer_id: producer.producer_id,
                        sequence: producer.sequence,
                    });
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
        let next = base + u64::from(header.record_count);
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

    fn maybe_roll(&self, w: &mut Writer, incoming: u64) -> Result<()> {
        if w.position == 0 {
            return Ok(());
        }
        let full = w.position + incoming > self.config.segment_bytes;
        let old = self.config.segment_ms > 0
            && flowgate_core::time::now_ms().saturating_sub(w.created_ms) >= self.config.segment_ms as i64;
        if !(full || old) {
            return Ok(());
        }
        let sync = self.config.fsync != FsyncPolicy::Never;
        w.active.seal(&w.cursor, sync)?;
        if sync {
            self.durable_offset.fetch_max(w.next_offset, Ordering::AcqRel);
            self.durable_notify.notify_waiters();
        }
        let base = w.next_offset;
        let snapshot = self.dir.join(format!("{}.producers", file_stem(base)));
        write_file_atomic(&snapshot, &w.producers.to_snapshot())?;
        let segment = Arc::new(Segment::create(&self.dir, base)?);
        if sync {
            sync_dir(&self.dir)?;
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
        if let Err(e) = segment.sync() {
            // After a failed fsync the page cache cannot be trusted to hold the data:
            // refuse further appends and fail every waiter rather than ack a maybe-lost write.
            *self.sync_failure.lock() = Some(e.to_string());
            self.durable_notify.notify_waiters();
            return Err(e);
        }
        self.durable_offset.fetch_max(end, Ordering::AcqRel);
        self.durable_notify.notify_waiters();
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
                    break;
                }
                pos += h.total_len() as u64;
            }
            if pos >= readable {
                continue;
            }
            let first_len = BatchHeader::parse(&header)?.total_len();
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
            return Ok(result);
        }
        Ok(result)
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

    /// Deletes whole sealed segments past the retention limits. Returns the number of
    /// segments and bytes deleted.
    pub fn enforce_retention(&self, now_ms: i64) -> Result<(usize, u64)> {
        let (retention_bytes, retention_ms) = (self.config.retention_bytes, self.config.retention_ms);
        let mut deleted = (0usize, 0u64);
        let mut segments = self.segments.write();
        let mut total: u64 = segments.iter().map(|s| s.readable_len()).sum();
        while segments.len() > 1 {
            let oldest = &segments[0];
            let size = oldest.readable_len();
            let by_bytes = retention_bytes > 0 && total - size >= retention_bytes;
            let by_age = retention_ms > 0 && oldest.max_timestamp() < now_ms.saturating_sub(retention_ms as i64);
            if !(by_bytes || by_age) {
                break;
            }
            let oldest = segments.remove(0);
            self.start_offset.store(segments[0].base_offset(), Ordering::Release);
            oldest.delete_files()?;
            total -= size;
            deleted.0 += 1;
            deleted.1 += size;
            tracing::info!(segment = %oldest.path().display(), bytes = size, by_bytes, by_age, "retention deleted a segment");
        }
        Ok(deleted)
    }

    /// Seals nothing, but syncs data and writes the active segment's index files, so a
    /// clean restart has less to rebuild. Called at shutdown.
    pub fn close(&self) -> Result<()> {
        self.dirty.store(true, Ordering::Release);
        self.sync()
    }
}
