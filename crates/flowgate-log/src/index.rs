//! The two sparse indexes of a segment, kept in memory and written to files when the
//! segment is sealed.
//!
//! - Offset index (`.index`): entries of (relative offset u32, file position u32), 8 bytes
//!   each, little-endian, one every `index_interval_bytes` of batches. An entry points at
//!   the start of a batch whose base offset is `segment base + relative offset`.
//! - Time index (`.timeindex`): entries of (timestamp i64, relative offset u32, file
//!   position u32), 16 bytes each. An entry says: the batch at this position is where the
//!   segment's running maximum timestamp first reached `timestamp`. Entries are sparse, so
//!   a lookup starts at the last entry below the target and scans forward.
//!
//! Both files are derived data: a missing or inconsistent index is rebuilt by scanning
//! the segment.

use std::path::Path;

use crate::error::{LogError, Result};

/// One offset index entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OffsetEntry {
    /// Offset relative to the segment's base offset.
    pub relative_offset: u32,
    /// Byte position of the batch in the segment file.
    pub position: u32,
}

/// One time index entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TimeEntry {
    /// Running maximum timestamp of the segment at this batch.
    pub timestamp: i64,
    /// Offset relative to the segment's base offset.
    pub relative_offset: u32,
    /// Byte position of the batch in the segment file.
    pub position: u32,
}

/// The sparse offset index of one segment.
#[derive(Clone, Debug, Default)]
pub struct OffsetIndex {
    entries: Vec<OffsetEntry>,
}

impl OffsetIndex {
    /// Adds an entry; relative offsets and positions must grow.
    pub fn push(&mut self, entry: OffsetEntry) {
        debug_assert!(self.entries.last().is_none_or(|l| l.relative_offset < entry.relative_offset));
        self.entries.push(entry);
    }

    /// The entries.
    pub fn entries(&self) -> &[OffsetEntry] {
        &self.entries
    }

    /// Position of the last indexed batch that starts at or before `relative_offset`
    /// (0 when none does).
    pub fn lookup(&self, relative_offset: u32) -> u32 {
        let idx = self.entries.partition_point(|e| e.relative_offset <= relative_offset);
        if idx == 0 {
            0
        } else {
            self.entries[idx - 1].position
        }
    }

    /// Serializes to the `.index` file format.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.entries.len() * 8);
        for e in &self.entries {
            out.extend_from_slice(&e.relative_offset.to_le_bytes());
            out.extend_from_slice(&e.position.to_le_bytes());
        }
        out
    }

    /// Parses an `.index` file, checking that it is consistent with a segment of
    /// `segment_len` bytes. `None` means: rebuild it.
    pub fn from_bytes(bytes: &[u8], segment_len: u64) -> Option<OffsetIndex> {
        if !bytes.len().is_multiple_of(8) {
            return None;
        }
        let mut entries = Vec::with_capacity(bytes.len() / 8);
        for chunk in bytes.chunks_exact(8) {
            let e = OffsetEntry {
                relative_offset: u32::from_le_bytes(chunk[0..4].try_into().ok()?),
                position: u32::from_le_bytes(chunk[4..8].try_into().ok()?),
            };
            if let Some(last) = entries.last() {
                let last: &OffsetEntry = last;
                if e.relative_offset <= last.relative_offset || e.position <= last.position {
                    return None;
                }
            }
            if u64::from(e.position) >= segment_len {
                return None;
            }
            entries.push(e);
        }
        Some(OffsetIndex { entries })
    }
}

/// The sparse time index of one segment.
#[derive(Clone, Debug, Default)]
pub struct TimeIndex {
    entries: Vec<TimeEntry>,
}

impl TimeIndex {
    /// Adds an entry; timestamps, offsets and positions must grow.
    pub fn push(&mut self, entry: TimeEntry) {
        self.entries.push(entry);
    }

    /// The entries.
    pub fn entries(&self) -> &[TimeEntry] {
        &self.entries
    }

    /// Position from which a scan for the first record with timestamp ≥ `timestamp` must
    /// start: every batch before it has only smaller timestamps.
    pub fn scan_start(&self, timestamp: i64) -> u32 {
        let idx = self.entries.partition_point(|e| e.timestamp < timestamp);
        if idx == 0 {
            0
        } else {
            self.entries[idx - 1].position
        }
    }

    /// Serializes to the `.timeindex` file format.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.entries.len() * 16);
        for e in &self.entries {
            out.extend_from_slice(&e.timestamp.to_le_bytes());
            out.extend_from_slice(&e.relative_offset.to_le_bytes());
            out.extend_from_slice(&e.position.to_le_bytes());
        }
        out
    }

    /// Parses a `.timeindex` file; `None` means: rebuild it.
    pub fn from_bytes(bytes: &[u8], segment_len: u64) -> Option<TimeIndex> {
        if !bytes.len().is_multiple_of(16) {
            return None;
        }
        let mut entries: Vec<TimeEntry> = Vec::with_capacity(bytes.len() / 16);
        for chunk in bytes.chunks_exact(16) {
            let e = TimeEntry {
                timestamp: i64::from_le_bytes(chunk[0..8].try_into().ok()?),
                relative_offset: u32::from_le_bytes(chunk[8..12].try_into().ok()?),
                position: u32::from_le_bytes(chunk[12..16].try_into().ok()?),
            };
            if let Some(last) = entries.last() {
                if e.timestamp <= last.timestamp || e.position < last.position {
                    return None;
                }
            }
            if u64::from(e.position) >= segment_len {
                return None;
            }
            entries.push(e);
        }
        Some(TimeIndex { entries })
    }
}

/// Writes `bytes` to `path` atomically and durably (temp file, fsync, rename, fsync of
/// the directory).
pub(crate) fn write_file_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let tmp = path.with_extension(format!("{}.tmp", path.extension().and_then(|e| e.to_str()).unwrap_or("")));
    let mut f = std::fs::File::create(&tmp).map_err(LogError::io("create", &tmp))?;
    f.write_all(bytes).map_err(LogError::io("write", &tmp))?;
    f.sync_data().map_err(LogError::io("fsync", &tmp))?;
    std::fs::rename(&tmp, path).map_err(LogError::io("rename", path))?;
    // The rename is durable only once the directory is.
    match path.parent() {
        Some(dir) => crate::partition::sync_dir(dir),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offset_lookup_finds_the_batch_at_or_before() {
        let mut idx = OffsetIndex::default();
        idx.push(OffsetEntry { relative_offset: 0, position: 0 });
        idx.push(OffsetEntry { relative_offset: 100, position: 5000 });
        idx.push(OffsetEntry { relative_offset: 250, position: 9000 });
        assert_eq!(idx.lookup(0), 0);
        assert_eq!(idx.lookup(99), 0);
        assert_eq!(idx.lookup(100), 5000);
        assert_eq!(idx.lookup(1000), 9000);
        let back = OffsetIndex::from_bytes(&idx.to_bytes(), 10_000).unwrap();
        assert_eq!(back.entries(), idx.entries());
        assert!(OffsetIndex::from_bytes(&idx.to_bytes(), 9000).is_none(), "position past the end");
        assert!(OffsetIndex::from_bytes(&idx.to_bytes()[..7], 10_000).is_none());
    }

    #[test]
    fn time_scan_start_is_before_the_first_reaching_entry() {
        let mut idx = TimeIndex::default();
        idx.push(TimeEntry { timestamp: 10, relative_offset: 0, position: 0 });
        idx.push(TimeEntry { timestamp: 20, relative_offset: 5, position: 100 });
        idx.push(TimeEntry { timestamp: 30, relative_offset: 9, position: 200 });
        assert_eq!(idx.scan_start(5), 0);
        assert_eq!(idx.scan_start(20), 0);
        assert_eq!(idx.scan_start(21), 100);
        assert_eq!(idx.scan_start(99), 200);
        let back = TimeIndex::from_bytes(&idx.to_bytes(), 300).unwrap();
        assert_eq!(back.entries(), idx.entries());
    }
}
