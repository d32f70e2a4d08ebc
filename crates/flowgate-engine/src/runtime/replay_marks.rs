//! Which dead-letter entries have been replayed: `<data dir>/dlq/replayed`, an
//! append-only file of fixed 24-byte records — `_dlq` partition (u32), offset (u64) and
//! the entry's fingerprint (u64), little endian, then a CRC-32C of those 20 bytes.
//!
//! A record is written and synced after the replay records it accounts for are durable
//! in the replay topic, so a crash in between leaves entries replayed but not marked;
//! [`super::replay`] marks them from the replay topic before it replays anything. A torn
//! tail (a crash during a write) is cut off when the file is opened, and a damaged record
//! (a bad checksum) is skipped: the entries they named are found again in the replay
//! topic the same way, while it still holds them.

use std::collections::HashSet;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use super::replay_record::EntryRef;

/// Bytes per record.
const RECORD: usize = 24;

/// The replayed marks, in memory and on disk.
#[derive(Debug)]
pub struct Marks {
    path: PathBuf,
    file: File,
    marked: HashSet<EntryRef>,
}

fn encode(r: &EntryRef) -> [u8; RECORD] {
    let mut out = [0u8; RECORD];
    out[..4].copy_from_slice(&r.partition.to_le_bytes());
    out[4..12].copy_from_slice(&r.offset.to_le_bytes());
    out[12..20].copy_from_slice(&r.fingerprint.to_le_bytes());
    let crc = crc32c::crc32c(&out[..20]);
    out[20..].copy_from_slice(&crc.to_le_bytes());
    out
}

fn decode(bytes: &[u8]) -> Option<EntryRef> {
    let bytes: &[u8; RECORD] = bytes.try_into().ok()?;
    let crc = u32::from_le_bytes(bytes[20..].try_into().ok()?);
    if crc32c::crc32c(&bytes[..20]) != crc {
        return None;
    }
    Some(EntryRef {
        partition: u32::from_le_bytes(bytes[..4].try_into().ok()?),
        offset: u64::from_le_bytes(bytes[4..12].try_into().ok()?),
        fingerprint: u64::from_le_bytes(bytes[12..20].try_into().ok()?),
    })
}

impl Marks {
    /// Opens (or creates) the file in `dir`, cutting off a torn tail and skipping
    /// damaged records.
    pub fn open(dir: &Path) -> std::io::Result<Marks> {
        std::fs::create_dir_all(dir)?;
        let path = dir.join("replayed");
        let mut file = OpenOptions::new().read(true).append(true).create(true).open(&path)?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)?;
        let mut marked = HashSet::new();
        // Records are of one size: a damaged one is skipped (the marks after it stand),
        // and only a torn tail, shorter than a record, is cut.
        let whole = bytes.len() - bytes.len() % RECORD;
        let mut damaged = 0usize;
        for chunk in bytes[..whole].chunks(RECORD) {
            match decode(chunk) {
                Some(r) => {
                    marked.insert(r);
                }
                None => damaged += 1,
            }
        }
        if damaged > 0 {
            tracing::warn!(path = %path.display(), damaged,
                "the replayed-marks file has damaged records; skipped (entries they named are marked \
                 again from the replay topics while those still hold them)");
        }
        if whole < bytes.len() {
            tracing::warn!(path = %path.display(), cut = bytes.len() - whole,
                "the replayed-marks file has a torn tail; cut back to its last whole record");
            file.set_len(whole as u64)?;
            file.sync_all()?;
        }
        Ok(Marks { path, file, marked })
    }

    /// Whether the entry has been replayed.
    pub fn contains(&self, r: &EntryRef) -> bool {
        self.marked.contains(r)
    }

    /// Every mark.
    pub fn all(&self) -> impl Iterator<Item = &EntryRef> {
        self.marked.iter()
    }

    /// Marks entries durably (one write, then a sync); on an error none counts as
    /// marked here, and whatever reached the disk is found at the next open.
    pub fn add(&mut self, refs: &[EntryRef]) -> std::io::Result<()> {
        let fresh: Vec<&EntryRef> = refs.iter().filter(|r| !self.marked.contains(r)).collect();
        if fresh.is_empty() {
            return Ok(());
        }
        let mut bytes = Vec::with_capacity(fresh.len().saturating_mul(RECORD));
        for r in &fresh {
            bytes.extend_from_slice(&encode(r));
        }
        let written = self.file.write_all(&bytes).and_then(|()| self.file.sync_data());
        if let Err(e) = written {
            // A partial write would put later records out of step: reopen, which cuts it.
            if let Ok(again) = Marks::open(self.path.parent().unwrap_or(Path::new("."))) {
                *self = again;
            }
            return Err(e);
        }
        self.marked.extend(fresh.into_iter().copied());
        Ok(())
    }
}

impl Marks {
    /// How many marks there are.
    pub fn count(&self) -> usize {
        self.marked.len()
    }

    /// Keeps only the marks `keep` says may still name an entry, rewriting the file (a
    /// new file, synced, then renamed over the old one: a crash leaves one or the
    /// other). Returns how many were dropped.
    pub fn retain(&mut self, keep: impl Fn(&EntryRef) -> bool) -> std::io::Result<usize> {
        let kept: HashSet<EntryRef> = self.marked.iter().filter(|r| keep(r)).copied().collect();
        let dropped = self.marked.len() - kept.len();
        if dropped == 0 {
            return Ok(0);
        }
        let tmp = self.path.with_extension("compacting");
        let mut bytes = Vec::with_capacity(kept.len().saturating_mul(RECORD));
        for r in &kept {
            bytes.extend_from_slice(&encode(r));
        }
        let mut file = File::create(&tmp)?;
        file.write_all(&bytes)?;
        file.sync_all()?;
        std::fs::rename(&tmp, &self.path)?;
        if let Some(dir) = self.path.parent() {
            File::open(dir)?.sync_all()?;
        }
        self.file = OpenOptions::new().read(true).append(true).open(&self.path)?;
        self.marked = kept;
        Ok(dropped)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(offset: u64) -> EntryRef {
        EntryRef { partition: 1, offset, fingerprint: offset.wrapping_mul(31) }
    }

    #[test]
    fn stale_marks_are_dropped_for_good_and_the_rest_stand() {
        let dir = tempfile::tempdir().unwrap();
        let mut m = Marks::open(dir.path()).unwrap();
        m.add(&(0..10).map(r).collect::<Vec<_>>()).unwrap();
        assert_eq!(m.retain(|e| e.offset >= 4).unwrap(), 4);
        m.add(&[r(20)]).unwrap();
        let again = Marks::open(dir.path()).unwrap();
        assert_eq!(again.count(), 7);
        assert!(again.contains(&r(4)) && again.contains(&r(20)) && !again.contains(&r(3)));
    }

    #[test]
    fn marks_survive_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let mut marks = Marks::open(dir.path()).unwrap();
        marks.add(&[r(1), r(2)]).unwrap();
        marks.add(&[r(2), r(3)]).unwrap();
        let marks = Marks::open(dir.path()).unwrap();
        assert!(marks.contains(&r(1)) && marks.contains(&r(2)) && marks.contains(&r(3)));
        assert!(!marks.contains(&r(4)));
        assert!(!marks.contains(&EntryRef { fingerprint: 0, ..r(1) }), "another entry at the same place");
        assert_eq!(std::fs::metadata(dir.path().join("replayed")).unwrap().len(), 3 * RECORD as u64, "no duplicates");
    }

    #[test]
    fn a_torn_tail_is_cut_and_writing_goes_on_after_it() {
        let dir = tempfile::tempdir().unwrap();
        Marks::open(dir.path()).unwrap().add(&[r(1), r(2)]).unwrap();
        let path = dir.path().join("replayed");
        let mut bytes = std::fs::read(&path).unwrap();
        bytes.extend_from_slice(&encode(&r(3))[..10]);
        std::fs::write(&path, &bytes).unwrap();
        let mut marks = Marks::open(dir.path()).unwrap();
        assert!(marks.contains(&r(2)) && !marks.contains(&r(3)));
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 2 * RECORD as u64);
        marks.add(&[r(4)]).unwrap();
        let marks = Marks::open(dir.path()).unwrap();
        assert!(marks.contains(&r(4)), "records after the cut are read");
    }

    #[test]
    fn a_corrupt_record_is_skipped_and_the_marks_after_it_stand() {
        let dir = tempfile::tempdir().unwrap();
        Marks::open(dir.path()).unwrap().add(&[r(1), r(2), r(3)]).unwrap();
        let path = dir.path().join("replayed");
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[RECORD + 5] ^= 0xff;
        std::fs::write(&path, &bytes).unwrap();
        let marks = Marks::open(dir.path()).unwrap();
        assert!(marks.contains(&r(1)) && marks.contains(&r(3)));
        assert!(!marks.contains(&r(2)), "a record with a bad checksum is not believed");
        let empty = tempfile::tempdir().unwrap();
        std::fs::write(empty.path().join("replayed"), [0u8; 7]).unwrap();
        assert_eq!(Marks::open(empty.path()).unwrap().all().count(), 0);
    }
}
