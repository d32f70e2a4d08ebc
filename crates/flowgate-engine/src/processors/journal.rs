//! A state journal: an append-only file of fixed-size entries beside a partition's
//! checkpoint, holding a processor state that is a queue in arrival order (dedup's ids).
//! A checkpoint then writes only what arrived since the last one and names the live
//! part of the file, instead of copying the whole state every time.
//!
//! # On disk
//! `<dir>/g<generation>.journal`: entries of `entry_len` bytes back to back, nothing
//! else. Entry `i` (an absolute index, counted since the generation's state began) is at
//! byte `(i - base) * entry_len`. A checkpoint holds a [`JournalRef`]: the generation,
//! its `base`, and the live range `first..end`. Entries past `end` (written before a
//! crash that came before the checkpoint) are never read, and the next commit writes
//! over them. Entries before `first` (expired) are dead; once the dead part is as large
//! as the live part, a commit compacts: it writes the live entries to a new generation,
//! and the old file is deleted after the checkpoint that names the new one is stored.
//! So every entry is written at most about twice, and the file holds at most about twice
//! the live state plus one interval's arrivals.
//!
//! # Durability
//! [`Journal::commit`] returns once what it wrote is on stable storage (and a new
//! file's directory entry too), so the checkpoint that names it may be stored. Files the
//! stored checkpoint does not name are deleted only after it is stored
//! ([`Journal::checkpoint_stored`]): a crash at any point leaves the file of the last
//! stored checkpoint whole.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// Dead entries below which a commit never compacts (it would rewrite a small state
/// often for nothing).
const MIN_COMPACT_ENTRIES: u64 = 8 * 1024;

/// Generations and entry indices stay below this (2^48: a trillion commits or entries),
/// so a damaged reference is refused and no arithmetic on them overflows.
pub const MAX_INDEX: u64 = 1 << 48;

/// Where a checkpointed state lives in its journal.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct JournalRef {
    /// The file's generation.
    pub generation: u64,
    /// The absolute index of the file's first entry.
    pub base: u64,
    /// The first live entry.
    pub first: u64,
    /// One past the last live entry.
    pub end: u64,
}

impl JournalRef {
    /// Bytes of [`JournalRef::encode`].
    pub const LEN: usize = 32;

    /// `generation, base, first, end` as little-endian u64s.
    pub fn encode(&self, out: &mut Vec<u8>) {
        for n in [self.generation, self.base, self.first, self.end] {
            out.extend_from_slice(&n.to_le_bytes());
        }
    }

    /// Reads [`JournalRef::encode`]'s bytes; refuses a range that is not one.
    pub fn decode(bytes: &[u8]) -> anyhow::Result<JournalRef> {
        anyhow::ensure!(bytes.len() == Self::LEN, "a journal reference is {} bytes, not {}", Self::LEN, bytes.len());
        let n = |i: usize| u64::from_le_bytes(bytes[i * 8..i * 8 + 8].try_into().expect("8 bytes"));
        let r = JournalRef { generation: n(0), base: n(1), first: n(2), end: n(3) };
        anyhow::ensure!(r.base <= r.first && r.first <= r.end, "the journal reference's range {r:?} is not one");
        anyhow::ensure!(
            r.generation < MAX_INDEX && r.end < MAX_INDEX,
            "the journal reference {r:?} is past what a journal reaches"
        );
        Ok(r)
    }

    /// Live entries.
    pub fn len(&self) -> u64 {
        self.end - self.first
    }

    /// True when no entry is live.
    pub fn is_empty(&self) -> bool {
        self.end == self.first
    }
}

/// The journal of one processor of one partition; owns every file in its directory.
#[derive(Debug)]
pub struct Journal {
    dir: PathBuf,
    entry_len: usize,
    generation: u64,
    base: u64,
    /// Entries below this absolute index are on stable storage in the current file.
    written: u64,
    file: Option<File>,
    /// Files other than the current generation's may be in the directory.
    stale_files: bool,
    buf: Vec<u8>,
}

impl Journal {
    /// A journal in `dir` (made on first commit) of entries of `entry_len` bytes. Nothing
    /// on disk is read or changed until [`Journal::restore`] or [`Journal::commit`].
    pub fn new(dir: PathBuf, entry_len: usize) -> Journal {
        assert!(entry_len > 0, "entries have bytes");
        Journal { dir, entry_len, generation: 0, base: 0, written: 0, file: None, stale_files: true, buf: Vec::new() }
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn path(&self, generation: u64) -> PathBuf {
        self.dir.join(format!("g{generation}.journal"))
    }

    /// Calls `each` with every live entry `r` names, in order, and makes the next commit
    /// go on from there. Errors name the file: a state that cannot be read whole is
    /// never taken for a smaller one.
    pub fn restore(&mut self, r: &JournalRef, mut each: impl FnMut(&[u8])) -> anyhow::Result<()> {
        let path = self.path(r.generation);
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(|e| anyhow::anyhow!("cannot open the state journal {}: {e}", path.display()))?;
        let entry_len = self.entry_len as u64;
        let (from, to) = ((r.first - r.base).saturating_mul(entry_len), (r.end - r.base).saturating_mul(entry_len));
        let size = file.metadata()?.len();
        anyhow::ensure!(
            size >= to,
            "the state journal {} holds {size} bytes, fewer than the {to} its checkpoint names: it was cut short \
             or replaced",
            path.display()
        );
        let mut chunk = vec![0u8; (1 << 20) / self.entry_len * self.entry_len];
        let mut at = from;
        while at < to {
            let n = usize::try_from((to - at).min(chunk.len() as u64)).expect("at most the chunk");
            file.read_exact_at(&mut chunk[..n], at)
                .map_err(|e| anyhow::anyhow!("cannot read the state journal {}: {e}", path.display()))?;
            chunk[..n].chunks_exact(self.entry_len).for_each(&mut each);
            at += n as u64;
        }
        self.generation = r.generation;
        self.base = r.base;
        self.written = r.end;
        self.file = Some(file);
        self.stale_files = true;
        Ok(())
    }

    /// Makes the live entries `first..end` durable and returns their reference for the
    /// checkpoint. `fill(from, out)` appends to `out` the encoded entries `from..end`
    /// (`from >= first`); only those not yet written are asked for, unless the journal
    /// compacts into a new file.
    pub fn commit(
        &mut self,
        first: u64,
        end: u64,
        mut fill: impl FnMut(u64, &mut Vec<u8>),
    ) -> std::io::Result<JournalRef> {
        let dead = first.saturating_sub(self.base);
        let compact = self.file.is_none() || first < self.base || (dead >= MIN_COMPACT_ENTRIES && dead >= end - first);
        self.buf.clear();
        if compact {
            self.make_dir()?;
            // Past every file in the directory: never over one a stored checkpoint may
            // name (one this journal did not restore, e.g. after its checkpoint was moved
            // away, or a run that discarded the state crashed before its checkpoint).
            let generation = self.generation.max(self.highest_on_disk()?) + 1;
            let path = self.path(generation);
            let file = std::fs::OpenOptions::new().write(true).create_new(true).open(&path)?;
            fill(first, &mut self.buf);
            self.check_filled(first, end)?;
            file.write_all_at(&self.buf, 0)?;
            file.sync_data()?;
            // The checkpoint will name this file: its directory entry must last too.
            File::open(&self.dir)?.sync_all()?;
            (self.generation, self.base, self.file, self.stale_files) = (generation, first, Some(file), true);
        } else {
            let from = self.written.max(first);
            if from < end {
                fill(from, &mut self.buf);
                self.check_filled(from, end)?;
                let at = (from - self.base).saturating_mul(self.entry_len as u64);
                let file = self.file.as_ref().expect("an open journal");
                file.write_all_at(&self.buf, at)?;
                file.sync_data()?;
            }
        }
        self.written = end;
        self.shrink_buffer();
        Ok(JournalRef { generation: self.generation, base: self.base, first, end })
    }

    /// Makes the directory, and makes each directory it adds last (its parent's entry
    /// fsynced), so the files a checkpoint names are found after a power loss.
    fn make_dir(&self) -> std::io::Result<()> {
        let mut missing = Vec::new();
        let mut at = self.dir.as_path();
        while !at.exists() {
            missing.push(at.to_owned());
            match at.parent() {
                Some(parent) => at = parent,
                None => break,
            }
        }
        std::fs::create_dir_all(&self.dir)?;
        for dir in missing.iter().rev() {
            if let Some(parent) = dir.parent() {
                File::open(parent)?.sync_all()?;
            }
        }
        Ok(())
    }

    /// The highest generation of a file in the directory (0 when there is none).
    fn highest_on_disk(&self) -> std::io::Result<u64> {
        let mut highest = 0;
        for entry in std::fs::read_dir(&self.dir)? {
            let name = entry?.file_name();
            let generation = name.to_str().and_then(|n| n.strip_prefix('g')?.strip_suffix(".journal")?.parse().ok());
            highest = highest.max(generation.unwrap_or(0));
        }
        Ok(highest.min(MAX_INDEX - 2))
    }

    fn check_filled(&self, from: u64, end: u64) -> std::io::Result<()> {
        let expected = (end - from).saturating_mul(self.entry_len as u64);
        if self.buf.len() as u64 != expected {
            return Err(std::io::Error::other(format!(
                "a journal commit got {} bytes for {} entries of {} bytes",
                self.buf.len(),
                end - from,
                self.entry_len
            )));
        }
        Ok(())
    }

    fn shrink_buffer(&mut self) {
        // One interval's arrivals are kept for the next; a compaction's copy is not.
        if self.buf.capacity() > 4 << 20 {
            self.buf = Vec::new();
        }
    }

    /// Called once the checkpoint naming the last commit is stored: deletes the files it
    /// does not name (older generations, or one a crash left before its checkpoint).
    pub fn checkpoint_stored(&mut self) {
        if !self.stale_files || self.file.is_none() {
            return;
        }
        let keep = format!("g{}.journal", self.generation);
        let Ok(entries) = std::fs::read_dir(&self.dir) else { return };
        for entry in entries.flatten() {
            if entry.file_name().to_str() != Some(keep.as_str()) {
                if let Err(e) = std::fs::remove_file(entry.path()) {
                    tracing::warn!(path = %entry.path().display(), error = %e, "cannot delete an old state journal");
                }
            }
        }
        self.stale_files = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entries(from: u64, to: u64) -> impl FnMut(u64, &mut Vec<u8>) {
        move |start, out: &mut Vec<u8>| {
            assert!(start >= from);
            for i in start..to {
                out.extend_from_slice(&i.to_le_bytes());
            }
        }
    }

    fn read(dir: &Path, r: &JournalRef) -> Vec<u64> {
        let mut j = Journal::new(dir.to_owned(), 8);
        let mut got = Vec::new();
        j.restore(r, |e| got.push(u64::from_le_bytes(e.try_into().unwrap()))).unwrap();
        got
    }

    fn files(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> =
            std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
        names.sort();
        names
    }

    #[test]
    fn commits_append_only_what_arrived_and_a_checkpoint_reads_exactly_its_range() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j");
        let mut j = Journal::new(path.clone(), 8);
        let r1 = j.commit(0, 10, entries(0, 10)).unwrap();
        assert_eq!(r1, JournalRef { generation: 1, base: 0, first: 0, end: 10 });
        // Five expired, seven arrived: only the seven are asked for.
        let r2 = j.commit(5, 17, entries(10, 17)).unwrap();
        assert_eq!((r2.generation, r2.first, r2.end), (1, 5, 17));
        assert_eq!(std::fs::metadata(path.join("g1.journal")).unwrap().len(), 17 * 8);
        assert_eq!(read(&path, &r1), (0..10).collect::<Vec<_>>(), "an older checkpoint still reads its own");
        assert_eq!(read(&path, &r2), (5..17).collect::<Vec<_>>());
    }

    #[test]
    fn a_crash_before_the_checkpoint_leaves_the_last_one_whole_and_its_tail_is_written_over() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j");
        let mut j = Journal::new(path.clone(), 8);
        let stored = j.commit(0, 10, entries(0, 10)).unwrap();
        j.checkpoint_stored();
        // Written, but the process died before the checkpoint naming it was stored.
        j.commit(0, 20, |from, out: &mut Vec<u8>| {
            (from..20).for_each(|i| out.extend_from_slice(&(i + 1000).to_le_bytes()))
        })
        .unwrap();
        drop(j);
        let mut again = Journal::new(path.clone(), 8);
        let mut got = Vec::new();
        again.restore(&stored, |e| got.push(u64::from_le_bytes(e.try_into().unwrap()))).unwrap();
        assert_eq!(got, (0..10).collect::<Vec<_>>());
        let next = again.commit(0, 12, entries(10, 12)).unwrap();
        assert_eq!(read(&path, &next), (0..12).collect::<Vec<_>>(), "the orphaned tail was written over");
    }

    #[test]
    fn a_mostly_dead_journal_compacts_and_the_old_file_goes_only_after_the_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j");
        let mut j = Journal::new(path.clone(), 8);
        let total = 3 * MIN_COMPACT_ENTRIES;
        let old = j.commit(0, total, entries(0, total)).unwrap();
        j.checkpoint_stored();
        // Two thirds expired: the live third goes to a new file.
        let first = 2 * MIN_COMPACT_ENTRIES;
        let new = j.commit(first, total + 5, entries(first, total + 5)).unwrap();
        assert_eq!((new.generation, new.base, new.first), (2, first, first));
        assert_eq!(files(&path), ["g1.journal", "g2.journal"], "the old file stays until the checkpoint is stored");
        assert_eq!(read(&path, &old).len() as u64, total);
        j.checkpoint_stored();
        assert_eq!(files(&path), ["g2.journal"]);
        assert_eq!(read(&path, &new), (first..total + 5).collect::<Vec<_>>());
        assert_eq!(std::fs::metadata(path.join("g2.journal")).unwrap().len(), (total + 5 - first) * 8);
    }

    #[test]
    fn a_journal_that_restored_nothing_starts_past_every_file_there() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j");
        let mut first = Journal::new(path.clone(), 8);
        let named = first.commit(0, 10, entries(0, 10)).unwrap();
        // A run that did not restore it (its checkpoint moved away, or the state
        // discarded) and crashed before storing a checkpoint of its own.
        let mut other = Journal::new(path.clone(), 8);
        let fresh = other
            .commit(0, 3, |from, out: &mut Vec<u8>| (from..3).for_each(|_| out.extend_from_slice(&[9; 8])))
            .unwrap();
        assert_eq!(fresh.generation, 2);
        assert_eq!(read(&path, &named), (0..10).collect::<Vec<_>>(), "the file a checkpoint may name is untouched");
    }

    #[test]
    fn a_journal_shorter_than_its_checkpoint_says_is_an_error_never_a_smaller_state() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j");
        let mut j = Journal::new(path.clone(), 8);
        let r = j.commit(0, 10, entries(0, 10)).unwrap();
        std::fs::OpenOptions::new().write(true).open(path.join("g1.journal")).unwrap().set_len(40).unwrap();
        let err = Journal::new(path.clone(), 8).restore(&r, |_| {}).unwrap_err();
        assert!(err.to_string().contains("cut short"), "{err}");
        std::fs::remove_file(path.join("g1.journal")).unwrap();
        let err = Journal::new(path, 8).restore(&r, |_| {}).unwrap_err();
        assert!(err.to_string().contains("cannot open the state journal"), "{err}");
        assert!(JournalRef::decode(&[0; 31]).is_err());
        let mut bad = Vec::new();
        JournalRef { generation: 1, base: 5, first: 4, end: 9 }.encode(&mut bad);
        assert!(JournalRef::decode(&bad).is_err(), "first below base");
        for r in [
            JournalRef { generation: u64::MAX, base: 0, first: 0, end: 1 },
            JournalRef { generation: 1, base: 0, first: 0, end: u64::MAX },
        ] {
            let mut bytes = Vec::new();
            r.encode(&mut bytes);
            assert!(JournalRef::decode(&bytes).is_err(), "{r:?}");
        }
    }
}
