//! One segment: a file of consecutive record batches named after its base offset
//! (`00000000000000000000.log`), with its offset and time indexes.
//!
//! Only the partition's writer appends, under the partition's writer lock. Readers read
//! concurrently with positional reads up to [`Segment::readable_len`], which the writer
//! advances only after a batch is completely written, so a reader never sees a torn batch.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

use parking_lot::RwLock;

use crate::error::{LogError, Result};
use crate::index::{write_file_atomic, OffsetEntry, OffsetIndex, TimeEntry, TimeIndex};
use crate::scan::{scan_segment, Damage, ScanMode, ScannedBatch};

/// File name stem of the segment with this base offset.
pub fn file_stem(base_offset: u64) -> String {
    format!("{base_offset:020}")
}

/// Keeps the index density: decides, batch by batch, which batches get index entries.
#[derive(Clone, Debug)]
pub struct IndexCursor {
    interval: u64,
    bytes_since_entry: u64,
    running_max: i64,
    running_max_at: Option<(u32, u32)>,
    last_time_entry_position: Option<u32>,
}

impl IndexCursor {
    /// A cursor for an empty segment.
    pub fn new(interval: u64) -> IndexCursor {
        IndexCursor {
            interval: interval.max(1),
            bytes_since_entry: 0,
            running_max: i64::MIN,
            running_max_at: None,
            last_time_entry_position: None,
        }
    }

    /// Accounts for a batch of `len` bytes at `position` and adds the index entries due.
    pub fn on_batch(
        &mut self,
        position: u32,
        relative_offset: u32,
        len: u64,
        max_timestamp: i64,
        index: &mut OffsetIndex,
        time_index: &mut TimeIndex,
    ) {
        if position > 0 && self.bytes_since_entry >= self.interval {
            index.push(OffsetEntry { relative_offset, position });
            self.bytes_since_entry = 0;
        }
        self.bytes_since_entry += len;
        if max_timestamp > self.running_max {
            self.running_max = max_timestamp;
            self.running_max_at = Some((relative_offset, position));
            let due = match self.last_time_entry_position {
                None => true,
                Some(last) => u64::from(position - last) >= self.interval,
            };
            if due {
                time_index.push(TimeEntry { timestamp: max_timestamp, relative_offset, position });
                self.last_time_entry_position = Some(position);
            }
        }
    }

    /// Adds the final time entry so the sealed index records the segment's maximum.
    pub fn seal(&self, time_index: &mut TimeIndex) {
        if let Some((relative_offset, position)) = self.running_max_at {
            if time_index.entries().last().is_none_or(|e| e.timestamp < self.running_max) {
                time_index.push(TimeEntry { timestamp: self.running_max, relative_offset, position });
            }
        }
    }
}

/// A segment file and its indexes.
#[derive(Debug)]
pub struct Segment {
    base_offset: u64,
    path: PathBuf,
    file: File,
    readable_len: AtomicU64,
    next_offset: AtomicU64,
    max_timestamp: AtomicI64,
    index: RwLock<OffsetIndex>,
    time_index: RwLock<TimeIndex>,
}

/// What recovery did to an active segment.
#[derive(Clone, Debug)]
pub struct Recovered {
    /// Where the cut was made and why; `None` when the segment was intact.
    pub cut: Option<Damage>,
    /// Index state to continue appending with.
    pub cursor: IndexCursor,
}

impl Segment {
    fn paths(dir: &Path, base_offset: u64) -> (PathBuf, PathBuf, PathBuf) {
        let stem = file_stem(base_offset);
        (dir.join(format!("{stem}.log")), dir.join(format!("{stem}.index")), dir.join(format!("{stem}.timeindex")))
    }

    fn open_file(path: &Path, create: bool) -> Result<File> {
        OpenOptions::new()
            .read(true)
            .write(true)
            .create(create)
            .truncate(false)
            .open(path)
            .map_err(LogError::io(if create { "create segment" } else { "open segment" }, path))
    }

    /// A segment with empty indexes, to be filled by a scan or by appends.
    fn unindexed(base_offset: u64, path: PathBuf, file: File, readable_len: u64, next_offset: u64) -> Segment {
        Segment {
            base_offset,
            path,
            file,
            readable_len: AtomicU64::new(readable_len),
            next_offset: AtomicU64::new(next_offset),
            max_timestamp: AtomicI64::new(i64::MIN),
            index: RwLock::new(OffsetIndex::default()),
            time_index: RwLock::new(TimeIndex::default()),
        }
    }

    /// Creates a new, empty segment in `dir`.
    pub fn create(dir: &Path, base_offset: u64) -> Result<Segment> {
        let (path, _, _) = Segment::paths(dir, base_offset);
        let file = Segment::open_file(&path, true)?;
        file.set_len(0).map_err(LogError::io("truncate", &path))?;
        Ok(Segment::unindexed(base_offset, path, file, 0, base_offset))
    }

    /// Opens a sealed segment whose successor starts at `next_offset`. Uses its index
    /// files when they are consistent, and rebuilds them by scanning when not.
    pub fn open_sealed(dir: &Path, base_offset: u64, next_offset: u64, index_interval: u64) -> Result<Segment> {
        let (path, index_path, time_path) = Segment::paths(dir, base_offset);
        let file = Segment::open_file(&path, false)?;
        let len = file.metadata().map_err(LogError::io("stat", &path))?.len();
        let index = std::fs::read(&index_path).ok().and_then(|b| OffsetIndex::from_bytes(&b, len));
        let time_index = std::fs::read(&time_path).ok().and_then(|b| TimeIndex::from_bytes(&b, len));
        let segment = Segment::unindexed(base_offset, path.clone(), file, len, next_offset);
        match (index, time_index) {
            (Some(index), Some(time_index)) if len == 0 || !time_index.entries().is_empty() => {
                let max = time_index.entries().last().map_or(i64::MIN, |e| e.timestamp);
                segment.max_timestamp.store(max, Ordering::Relaxed);
                *segment.index.write() = index;
                *segment.time_index.write() = time_index;
            }
            _ => {
                tracing::info!(segment = %path.display(), "rebuilding missing or inconsistent index");
                let cursor = segment.rebuild_indexes(index_interval, ScanMode::ContinuePastDamage, &mut |_| {})?.cursor;
                cursor.seal(&mut segment.time_index.write());
                segment.write_indexes()?;
            }
        }
        Ok(segment)
    }

    /// Opens the active (last) segment after a restart: verifies every batch, cuts a torn
    /// or damaged tail back to the last good batch, and rebuilds its indexes.
    /// `on_batch` sees every good batch (to rebuild producer state).
    pub fn recover_active(
        dir: &Path,
        base_offset: u64,
        index_interval: u64,
        on_batch: &mut dyn FnMut(&ScannedBatch<'_>),
    ) -> Result<(Segment, Recovered)> {
        let (path, _, _) = Segment::paths(dir, base_offset);
        let file = Segment::open_file(&path, true)?;
        let segment = Segment::unindexed(base_offset, path.clone(), file, 0, base_offset);
        let recovered = segment.rebuild_indexes(index_interval, ScanMode::StopAtDamage, on_batch)?;
        if let Some(cut) = &recovered.cut {
            segment.file.set_len(cut.position).map_err(LogError::io("truncate", &path))?;
            segment.file.sync_all().map_err(LogError::io("fsync", &path))?;
        }
        Ok((segment, recovered))
    }

    fn rebuild_indexes(
        &self,
        index_interval: u64,
        mode: ScanMode,
        on_batch: &mut dyn FnMut(&ScannedBatch<'_>),
    ) -> Result<Recovered> {
        let mut index = OffsetIndex::default();
        let mut time_index = TimeIndex::default();
        let mut cursor = IndexCursor::new(index_interval);
        let mut max_ts = i64::MIN;
        let base = self.base_offset;
        // Index only batches whose offsets follow the ones indexed before: past damage
        // (checking mode) a batch's base offset is not verified and may be anything.
        let mut next_expected = base;
        let outcome = scan_segment(&self.path, base, mode, |b| {
            let Some(rel) = b
                .view
                .base_offset()
                .checked_sub(base)
                .filter(|_| b.view.base_offset() >= next_expected)
                .and_then(|rel| u32::try_from(rel).ok())
            else {
                return;
            };
            next_expected = b.view.base_offset().saturating_add(u64::from(b.view.header.record_count));
            max_ts = max_ts.max(b.view.header.max_timestamp);
            cursor.on_batch(
                b.position as u32,
                rel,
                b.view.bytes.len() as u64,
                b.view.header.max_timestamp,
                &mut index,
                &mut time_index,
            );
            on_batch(&b);
        })?;
        *self.index.write() = index;
        *self.time_index.write() = time_index;
        self.max_timestamp.store(max_ts, Ordering::Relaxed);
        let cut = match mode {
            ScanMode::StopAtDamage => {
                self.readable_len.store(outcome.valid_len, Ordering::Release);
                self.next_offset.store(outcome.next_offset, Ordering::Release);
                outcome.damage.into_iter().next()
            }
            ScanMode::ContinuePastDamage => {
                for d in &outcome.damage {
                    tracing::error!(segment = %self.path.display(), position = d.position, end = d.end, reason = %d.reason,
                        "sealed segment is damaged; run `flowgate log check`");
                }
                None
            }
        };
        Ok(Recovered { cut, cursor })
    }

    /// The offset of the segment's first record.
    pub fn base_offset(&self) -> u64 {
        self.base_offset
    }

    /// The segment file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Bytes of complete batches a reader may read.
    pub fn readable_len(&self) -> u64 {
        self.readable_len.load(Ordering::Acquire)
    }

    /// The offset after the segment's last record.
    pub fn next_offset(&self) -> u64 {
        self.next_offset.load(Ordering::Acquire)
    }

    /// The largest record timestamp in the segment (`i64::MIN` if empty).
    pub fn max_timestamp(&self) -> i64 {
        self.max_timestamp.load(Ordering::Acquire)
    }

    /// Writes `bytes` at `position`. Only the partition's writer calls this.
    pub(crate) fn write_at(&self, bytes: &[u8], position: u64) -> Result<()> {
        self.file.write_all_at(bytes, position).map_err(LogError::io("write", &self.path))
    }

    /// Publishes a written batch to readers and updates the indexes.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn publish(
        &self,
        cursor: &mut IndexCursor,
        position: u64,
        len: u64,
        base_offset: u64,
        next_offset: u64,
        max_timestamp: i64,
    ) {
        // The writer keeps a segment under 4 GiB of batches, so offsets inside it fit
        // (a batch holds at least one byte per record).
        let rel = u32::try_from(base_offset.saturating_sub(self.base_offset)).unwrap_or(u32::MAX);
        {
            let mut index = self.index.write();
            let mut time_index = self.time_index.write();
            cursor.on_batch(position as u32, rel, len, max_timestamp, &mut index, &mut time_index);
        }
        self.max_timestamp.fetch_max(max_timestamp, Ordering::AcqRel);
        self.next_offset.store(next_offset, Ordering::Release);
        self.readable_len.store(position + len, Ordering::Release);
    }

    /// Reads up to `buf.len()` bytes at `position`, never past the readable end.
    pub fn read_at(&self, buf: &mut [u8], position: u64) -> Result<usize> {
        let end = self.readable_len();
        if position >= end {
            return Ok(0);
        }
        let want = buf.len().min(usize::try_from(end - position).unwrap_or(usize::MAX));
        self.file.read_exact_at(&mut buf[..want], position).map_err(LogError::io("read", &self.path))?;
        Ok(want)
    }

    /// Position of the last indexed batch at or before `offset`.
    pub fn index_lookup(&self, offset: u64) -> u64 {
        let rel = offset.saturating_sub(self.base_offset).min(u64::from(u32::MAX)) as u32;
        u64::from(self.index.read().lookup(rel))
    }

    /// Position to start scanning from for the first record with timestamp ≥ `ts`.
    pub fn time_lookup(&self, ts: i64) -> u64 {
        u64::from(self.time_index.read().scan_start(ts))
    }

    /// Forces the segment's data to stable storage.
    pub fn sync(&self) -> Result<()> {
        self.file.sync_data().map_err(LogError::io("fsync", &self.path))
    }

    /// When the segment file was last written, in ms since the epoch (its modification
    /// time, kept by the filesystem across restarts). Retention ages segments by this,
    /// never by the event timestamps clients chose.
    pub fn written_ms(&self) -> Result<i64> {
        let modified = self
            .file
            .metadata()
            .and_then(|m| m.modified())
            .map_err(LogError::io("read the modification time of", &self.path))?;
        Ok(match modified.duration_since(std::time::UNIX_EPOCH) {
            Ok(d) => i64::try_from(d.as_millis()).unwrap_or(i64::MAX),
            Err(_) => 0,
        })
    }

    /// Seals the segment: final time entry and index files written. The caller fsyncs
    /// the data first.
    pub(crate) fn seal(&self, cursor: &IndexCursor) -> Result<()> {
        cursor.seal(&mut self.time_index.write());
        self.write_indexes()
    }

    fn write_indexes(&self) -> Result<()> {
        let (_, index_path, time_path) = Segment::paths(self.path.parent().unwrap_or(Path::new(".")), self.base_offset);
        write_file_atomic(&index_path, &self.index.read().to_bytes())?;
        write_file_atomic(&time_path, &self.time_index.read().to_bytes())
    }

    /// Deletes the segment's files. Readers holding it keep reading the open file.
    pub(crate) fn delete_files(&self) -> Result<()> {
        let dir = self.path.parent().unwrap_or(Path::new("."));
        let stem = file_stem(self.base_offset);
        for ext in ["log", "index", "timeindex", "producers"] {
            let p = dir.join(format!("{stem}.{ext}"));
            match std::fs::remove_file(&p) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(LogError::Io { action: "delete", path: p, source: e }),
            }
        }
        Ok(())
    }
}
