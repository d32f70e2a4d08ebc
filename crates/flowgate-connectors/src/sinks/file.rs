//! `file`: NDJSON files, rolled by size and age, optionally zstd-compressed once closed.
//!
//! Each source partition writes its own series, `<topic>-<partition>-<seq>.ndjson`, in
//! the sink's directory. The checkpoint records the open file's sequence number and
//! length. On recovery the sink touches only what that checkpoint accounts for:
//!
//! - the file it names is cut back to the length it names, so the events replayed from
//!   the checkpoint are written exactly once;
//! - files of the series written after it are renamed aside
//!   (`<name>.after-checkpoint-<unix ms>`, with a warning), never deleted: their events
//!   are written again by the replay;
//! - with no checkpoint at all (a new pipeline, a renamed one, a checkpoint moved away)
//!   nothing is cut, moved or deleted: the sink starts a new series after the highest
//!   sequence number present and leaves earlier files alone.
//!
//! A write keeps its lines in a buffer until it is flushed to the file; a flush that
//! fails cuts the file back to what was written before it and keeps the buffer, so the
//! runtime's retry of the same batch continues where the failure stopped, with no torn
//! line and no line twice.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context;
use flowgate_engine::sink::BoxFuture;
use flowgate_engine::{Sink, SinkEvent, SinkPlace, WriteOutcome};

use serde::{Deserialize, Serialize};

use super::registry::{BuildContext, SinkConnector};
use super::resume::Unfinished;

/// `type = "file"`: NDJSON files, one directory per pipeline sink, one file series per
/// source partition.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// Directory (relative paths are under the data directory).
    pub path: String,
    /// Roll to a new file past this size (at least 1024).
    #[serde(default = "default_rotate_bytes")]
    pub rotate_bytes: u64,
    /// Roll to a new file after this long (0 = never).
    #[serde(default)]
    pub rotate_ms: u64,
    /// `none` or `zstd` for closed files.
    #[serde(default = "default_compression")]
    pub compression: String,
}

fn default_rotate_bytes() -> u64 {
    128 << 20
}

fn default_compression() -> String {
    "none".into()
}

impl SinkConnector for FileSink {
    const TYPE: &'static str = "file";
    type Config = FileConfig;

    fn validate(c: &FileConfig) -> anyhow::Result<()> {
        anyhow::ensure!(!c.path.is_empty(), "`path` is empty");
        anyhow::ensure!(c.rotate_bytes >= 1024, "`rotate_bytes` must be at least 1024");
        anyhow::ensure!(matches!(c.compression.as_str(), "none" | "zstd"), "`compression` must be none or zstd");
        Ok(())
    }

    /// The directory, normalized so that `out`, `./out/` and `<data_dir>/out` are one
    /// claim: two sinks writing one series would cut each other's files on recovery.
    fn output_claim(c: &FileConfig, data_dir: &Path) -> Option<String> {
        Some(format!("directory {}", super::normalize(&data_dir.join(&c.path)).display()))
    }

    fn build(c: FileConfig, cx: &BuildContext<'_>) -> anyhow::Result<Box<dyn Sink>> {
        let dir = cx.data_dir.join(&c.path);
        Ok(Box::new(FileSink::new(dir, cx.place, c.rotate_bytes, c.rotate_ms, c.compression == "zstd")?))
    }
}

/// Buffered lines are written to the file past this many bytes.
const FLUSH_BYTES: usize = 256 * 1024;

/// Suffix of files moved aside on recovery.
const ASIDE: &str = ".after-checkpoint-";

/// Writes NDJSON files.
pub struct FileSink {
    dir: PathBuf,
    prefix: String,
    rotate_bytes: u64,
    rotate_ms: u64,
    compress: bool,
    /// Sequence number of the file being written.
    seq: u64,
    /// The file being written (opened lazily).
    file: Option<File>,
    /// Bytes in the file.
    file_len: u64,
    /// Lines for the file not written to it yet.
    pending: Vec<u8>,
    /// A failed flush may have left a partial tail past `file_len`: cut it first.
    cut_first: bool,
    /// A closed file whose compression has not finished yet.
    to_compress: Option<u64>,
    /// Files were created or renamed since the directory was last fsynced.
    dir_dirty: bool,
    opened: Instant,
    /// The batch a failed write stopped in, and how many of its events are in `pending`
    /// or the files already.
    unfinished: Option<Unfinished<usize>>,
}

/// One file of this sink's series found in the directory.
#[derive(Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Found {
    seq: u64,
    compressed: bool,
    path: PathBuf,
}

impl FileSink {
    /// A sink writing into `dir` for one source partition.
    pub fn new(
        dir: PathBuf,
        place: &SinkPlace,
        rotate_bytes: u64,
        rotate_ms: u64,
        compress: bool,
    ) -> anyhow::Result<FileSink> {
        std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
        Ok(FileSink {
            dir,
            prefix: format!("{}-{}-", place.topic, place.partition),
            rotate_bytes,
            rotate_ms,
            compress,
            seq: 0,
            file: None,
            file_len: 0,
            pending: Vec::new(),
            cut_first: false,
            to_compress: None,
            dir_dirty: false,
            opened: Instant::now(),
            unfinished: None,
        })
    }

    fn path(&self, seq: u64) -> PathBuf {
        self.dir.join(format!("{}{seq:06}.ndjson", self.prefix))
    }

    fn len(&self) -> u64 {
        self.file_len.saturating_add(self.pending.len() as u64)
    }

    /// This partition's files in the directory (`.ndjson` or `.ndjson.zst`), by sequence.
    /// Removes temporaries an interrupted compression or recovery left (their source is
    /// still there).
    fn existing(&self) -> anyhow::Result<Vec<Found>> {
        let mut out = Vec::new();
        let list = std::fs::read_dir(&self.dir).with_context(|| format!("cannot list {}", self.dir.display()))?;
        for entry in list {
            let path = entry?.path();
            let Some(name) = path.file_name().and_then(|n| n.to_str()) else { continue };
            let Some(rest) = name.strip_prefix(&self.prefix) else { continue };
            let temporary = rest.strip_suffix(".ndjson.zst.tmp").or_else(|| rest.strip_suffix(".ndjson.tmp"));
            // Only this partition's own: `a-1-` is also the start of topic `a-1`'s names.
            if temporary.is_some_and(|d| !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit())) {
                std::fs::remove_file(&path).with_context(|| format!("cannot remove {}", path.display()))?;
                continue;
            }
            let (digits, compressed) = match rest.strip_suffix(".ndjson.zst") {
                Some(d) => (d, true),
                None => match rest.strip_suffix(".ndjson") {
                    Some(d) => (d, false),
                    None => continue,
                },
            };
            if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
                continue;
            }
            if let Ok(seq) = digits.parse::<u64>() {
                out.push(Found { seq, compressed, path });
            }
        }
        out.sort();
        Ok(out)
    }

    fn open(&mut self) -> anyhow::Result<()> {
        self.finish_compression()?;
        let path = self.path(self.seq);
        let existed = path.exists();
        let file = OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(false)
            .open(&path)
            .with_context(|| format!("cannot open {}", path.display()))?;
        self.file_len = file.metadata()?.len();
        self.dir_dirty |= !existed;
        self.opened = Instant::now();
        self.file = Some(file);
        Ok(())
    }

    /// Writes the buffered lines at the end of the file. On failure the file is cut back
    /// (now, or before the next flush if that fails too) and the lines stay buffered.
    fn flush_pending(&mut self) -> anyhow::Result<()> {
        let Some(file) = self.file.as_ref() else { return Ok(()) };
        if self.cut_first {
            file.set_len(self.file_len).context("cannot cut a partly written line")?;
            self.cut_first = false;
        }
        if self.pending.is_empty() {
            return Ok(());
        }
        if let Err(e) = file.write_all_at(&self.pending, self.file_len) {
            self.cut_first = file.set_len(self.file_len).is_err();
            return Err(e).with_context(|| format!("cannot write to {}", self.path(self.seq).display()));
        }
        self.file_len = self.file_len.saturating_add(self.pending.len() as u64);
        self.pending.clear();
        if self.pending.capacity() > 4 * FLUSH_BYTES {
            self.pending.shrink_to(FLUSH_BYTES);
        }
        Ok(())
    }

    /// Closes the current file and moves to the next sequence number.
    fn roll(&mut self) -> anyhow::Result<()> {
        self.flush_pending()?;
        if let Some(file) = self.file.as_ref() {
            file.sync_data().with_context(|| format!("cannot fsync {}", self.path(self.seq).display()))?;
        }
        let next = self.seq.checked_add(1).context("file sequence number overflows")?;
        self.file = None;
        if self.compress {
            self.to_compress = Some(self.seq);
        }
        self.seq = next;
        self.file_len = 0;
        self.open()
    }

    fn finish_compression(&mut self) -> anyhow::Result<()> {
        if let Some(seq) = self.to_compress {
            compress_file(&self.path(seq))?;
            self.dir_dirty = true;
            self.to_compress = None;
        }
        Ok(())
    }

    fn roll_due_by_age(&self) -> bool {
        self.rotate_ms > 0
            && self.len() > 0
            && u64::try_from(self.opened.elapsed().as_millis()).unwrap_or(u64::MAX) >= self.rotate_ms
    }

    /// Buffers `events[*done..]`, flushing and rolling as due; `done` counts the events
    /// that are in the buffer or the files.
    fn write_from(&mut self, events: &[SinkEvent], done: &mut usize) -> anyhow::Result<()> {
        if self.file.is_none() {
            self.open()?;
        }
        if self.len() >= self.rotate_bytes {
            self.roll()?;
        }
        while let Some(e) = events.get(*done) {
            self.pending.extend_from_slice(&e.payload);
            self.pending.push(b'\n');
            *done += 1;
            if self.len() >= self.rotate_bytes {
                self.roll()?;
            } else if self.pending.len() >= FLUSH_BYTES {
                self.flush_pending()?;
            }
        }
        if self.roll_due_by_age() {
            self.roll()?;
        }
        Ok(())
    }

    /// Cuts the file the checkpoint names back to the length it names (decompressing it
    /// first if it was rolled and compressed after the checkpoint).
    fn restore_named(&mut self, seq: u64, len: u64) -> anyhow::Result<()> {
        let plain = self.path(seq);
        let packed = plain.with_extension("ndjson.zst");
        if plain.exists() {
            if packed.exists() {
                // Compressed after the checkpoint, its source not yet removed.
                move_aside(&packed)?;
            }
        } else if packed.exists() {
            // Rolled and compressed after the checkpoint: bring back the part it names.
            let tmp = plain.with_extension("ndjson.tmp");
            let mut out = File::create(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
            let decoder = zstd::Decoder::new(File::open(&packed)?)?;
            std::io::copy(&mut decoder.take(len), &mut out)
                .with_context(|| format!("cannot decompress {}", packed.display()))?;
            out.sync_data()?;
            std::fs::rename(&tmp, &plain)?;
            move_aside(&packed)?;
        }
        if plain.exists() {
            let f = OpenOptions::new().write(true).open(&plain)?;
            let actual = f.metadata()?.len();
            if actual > len {
                tracing::info!(file = %plain.display(), from = actual, to = len, "cutting sink file back to its checkpoint");
                f.set_len(len)?;
                f.sync_data()?;
            } else if actual < len {
                tracing::warn!(file = %plain.display(), len = actual, checkpointed = len,
                    "sink file is shorter than its checkpoint says: lines written before the checkpoint are missing");
            }
        } else if len > 0 {
            tracing::warn!(file = %plain.display(), checkpointed = len,
                "the file the checkpoint names is missing: its lines are lost; writing goes on in a new file");
        }
        Ok(())
    }

    fn recover_state(&mut self, state: &serde_json::Value) -> anyhow::Result<()> {
        let checkpoint = parse_state(state)?;
        self.file = None;
        self.pending.clear();
        self.file_len = 0;
        self.cut_first = false;
        self.to_compress = None;
        self.unfinished = None;
        let existing = self.existing()?;
        match checkpoint {
            None => {
                self.seq = match existing.last() {
                    Some(last) => last.seq.checked_add(1).context("file sequence number overflows")?,
                    None => 0,
                };
                if !existing.is_empty() {
                    tracing::warn!(dir = %self.dir.display(), prefix = %self.prefix, files = existing.len(), first_new = self.seq,
                        "no checkpoint accounts for the files already here: leaving them as they are and starting a new \
                         series after them (events are written from where the pipeline starts reading)");
                }
            }
            Some((seq, len)) => {
                let mut moved = 0;
                for found in existing.iter().filter(|f| f.seq > seq) {
                    move_aside(&found.path)?;
                    moved += 1;
                }
                if moved > 0 {
                    tracing::warn!(dir = %self.dir.display(), prefix = %self.prefix, files = moved, checkpointed_seq = seq,
                        "files written after the checkpoint were renamed aside (*{ASIDE}*); their events are written again");
                }
                self.restore_named(seq, len)?;
                // A file closed before the checkpoint whose compression was cut short.
                for found in existing.iter().filter(|f| f.seq < seq && !f.compressed) {
                    if self.compress || existing.iter().any(|g| g.seq == found.seq && g.compressed) {
                        compress_file(&found.path)?;
                    }
                }
                self.seq = seq;
                self.open()?;
            }
        }
        sync_dir(&self.dir)?;
        self.dir_dirty = false;
        Ok(())
    }
}

/// The checkpointed `(seq, len)`; `None` when there is no state. Anything else is an
/// error rather than "no state": treating a damaged state as none would start over.
fn parse_state(state: &serde_json::Value) -> anyhow::Result<Option<(u64, u64)>> {
    if state.is_null() {
        return Ok(None);
    }
    match (state.get("seq").and_then(|v| v.as_u64()), state.get("len").and_then(|v| v.as_u64())) {
        (Some(seq), Some(len)) => Ok(Some((seq, len))),
        _ => anyhow::bail!(
            "the file sink's checkpointed state {state} is not {{\"seq\": N, \"len\": N}}; the checkpoint is damaged \
             or belongs to another sink type: move it away to start a new file series beside the existing files"
        ),
    }
}

fn sync_dir(dir: &Path) -> anyhow::Result<()> {
    File::open(dir).and_then(|d| d.sync_all()).with_context(|| format!("cannot fsync directory {}", dir.display()))
}

/// Renames `path` to `<path>.after-checkpoint-<unix ms>` (never over an existing file).
fn move_aside(path: &Path) -> anyhow::Result<()> {
    let stamp = flowgate_core::time::now_ms();
    let mut n = 0u32;
    loop {
        let mut name = path.as_os_str().to_owned();
        name.push(format!("{ASIDE}{stamp}"));
        if n > 0 {
            name.push(format!("-{n}"));
        }
        let target = PathBuf::from(name);
        if !target.exists() {
            std::fs::rename(path, &target)
                .with_context(|| format!("cannot rename {} to {}", path.display(), target.display()))?;
            tracing::warn!(from = %path.display(), to = %target.display(), "sink file written after the checkpoint moved aside");
            return Ok(());
        }
        n = n.checked_add(1).context("no free name to move a file aside")?;
    }
}

/// Compresses a closed file to `<path>.zst` through a temporary, then removes the
/// source. Safe to call again after it failed part way, or after it finished.
fn compress_file(path: &Path) -> anyhow::Result<()> {
    if !path.exists() {
        return Ok(());
    }
    let target = path.with_extension("ndjson.zst");
    let tmp = path.with_extension("ndjson.zst.tmp");
    let input = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let output = File::create(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
    let mut encoder = zstd::Encoder::new(output, 3)?;
    std::io::copy(&mut std::io::BufReader::new(input), &mut encoder)
        .with_context(|| format!("cannot compress {}", path.display()))?;
    let mut output = encoder.finish()?;
    output.flush()?;
    output.sync_data()?;
    std::fs::rename(&tmp, &target)?;
    if let Some(dir) = path.parent() {
        sync_dir(dir)?;
    }
    std::fs::remove_file(path)?;
    Ok(())
}

impl Sink for FileSink {
    fn write<'a>(&'a mut self, events: &'a [SinkEvent]) -> BoxFuture<'a, anyhow::Result<WriteOutcome>> {
        Box::pin(async move {
            let mut done = match self.unfinished.take() {
                Some(u) => u.resume(events, &self.prefix).unwrap_or(0),
                None => 0,
            };
            let result = self.write_from(events, &mut done);
            if result.is_err() && done > 0 {
                self.unfinished = Some(Unfinished::new(events, done));
            }
            result.map(|()| WriteOutcome::delivered())
        })
    }

    fn commit(&mut self) -> BoxFuture<'_, anyhow::Result<serde_json::Value>> {
        Box::pin(async move {
            self.flush_pending()?;
            if let Some(file) = self.file.as_ref() {
                file.sync_data().with_context(|| format!("cannot fsync {}", self.path(self.seq).display()))?;
            }
            if self.dir_dirty {
                sync_dir(&self.dir)?;
                self.dir_dirty = false;
            }
            Ok(serde_json::json!({"seq": self.seq, "len": self.file_len}))
        })
    }

    fn recover<'a>(&'a mut self, state: &'a serde_json::Value) -> BoxFuture<'a, anyhow::Result<()>> {
        Box::pin(async move { self.recover_state(state) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn events(range: std::ops::Range<u64>) -> Vec<SinkEvent> {
        range
            .map(|i| SinkEvent {
                partition: 0,
                offset: i,
                timestamp: 0,
                key: None,
                payload: Bytes::from(format!("{{\"n\":{i}}}")),
            })
            .collect()
    }

    /// Every line of the series files (`.ndjson`, `.ndjson.zst`), in file order.
    fn read_all(dir: &Path) -> Vec<String> {
        let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| {
                let name = p.to_string_lossy();
                name.ends_with(".ndjson") || name.ends_with(".ndjson.zst")
            })
            .collect();
        files.sort();
        let mut lines = Vec::new();
        for f in files {
            let bytes = std::fs::read(&f).unwrap();
            let text = if f.extension().is_some_and(|e| e == "zst") {
                String::from_utf8(zstd::decode_all(&bytes[..]).unwrap()).unwrap()
            } else {
                String::from_utf8(bytes).unwrap()
            };
            lines.extend(text.lines().map(String::from));
        }
        lines
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> =
            std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        names.sort();
        names
    }

    fn lines(range: std::ops::Range<u64>) -> Vec<String> {
        range.map(|i| format!("{{\"n\":{i}}}")).collect()
    }

    fn place() -> SinkPlace {
        SinkPlace { pipeline: "p".into(), topic: "t".into(), partition: 0 }
    }

    #[tokio::test]
    async fn recovery_removes_only_its_own_partitions_temporaries() {
        let dir = tempfile::tempdir().unwrap();
        // Topic `a-1` partition 0 shares the name prefix `a-1-` with topic `a` partition 1.
        let others = dir.path().join("a-1-0-00000000000000000001.ndjson.zst.tmp");
        let own = dir.path().join("a-1-00000000000000000003.ndjson.tmp");
        std::fs::write(&others, b"being compressed by the other sink").unwrap();
        std::fs::write(&own, b"left by an interrupted compression").unwrap();
        let place = SinkPlace { pipeline: "p".into(), topic: "a".into(), partition: 1 };
        let mut sink = FileSink::new(dir.path().to_path_buf(), &place, 1024, 0, true).unwrap();
        sink.recover(&serde_json::Value::Null).await.unwrap();
        assert!(others.exists(), "another sink's temporary must be left alone");
        assert!(!own.exists(), "this partition's leftover temporary is removed");
    }

    #[tokio::test]
    async fn rolls_by_size_compresses_and_recovers_exactly_to_the_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        let mut sink = FileSink::new(dir.path().to_path_buf(), &place(), 1024, 0, true).unwrap();
        sink.recover(&serde_json::Value::Null).await.unwrap();
        sink.write(&events(0..200)).await.unwrap();
        let state = sink.commit().await.unwrap();
        // Written after the checkpoint, then a crash: these must leave the series.
        sink.write(&events(200..400)).await.unwrap();
        sink.commit().await.unwrap();
        drop(sink);
        let files = std::fs::read_dir(dir.path()).unwrap().count();
        assert!(files > 3, "200-byte rolls must have happened: {files} files");
        let mut sink = FileSink::new(dir.path().to_path_buf(), &place(), 1024, 0, true).unwrap();
        sink.recover(&state).await.unwrap();
        sink.write(&events(200..250)).await.unwrap();
        sink.commit().await.unwrap();
        assert_eq!(read_all(dir.path()), lines(0..250));
        assert!(names(dir.path()).iter().any(|n| n.ends_with(".ndjson.zst")));
        // Nothing was deleted: what was cut from the series is kept aside, complete.
        let aside: Vec<String> = names(dir.path()).into_iter().filter(|n| n.contains(ASIDE)).collect();
        assert!(!aside.is_empty());
    }

    #[tokio::test]
    async fn without_a_checkpoint_earlier_files_are_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let mut sink = FileSink::new(dir.path().to_path_buf(), &place(), 1024, 0, false).unwrap();
        sink.recover(&serde_json::Value::Null).await.unwrap();
        sink.write(&events(0..100)).await.unwrap();
        sink.commit().await.unwrap();
        drop(sink);
        let before: Vec<(String, Vec<u8>)> =
            names(dir.path()).into_iter().map(|n| (n.clone(), std::fs::read(dir.path().join(&n)).unwrap())).collect();
        // The checkpoint is gone (pipeline renamed, checkpoint moved away): start again.
        let mut sink = FileSink::new(dir.path().to_path_buf(), &place(), 1024, 0, false).unwrap();
        sink.recover(&serde_json::Value::Null).await.unwrap();
        sink.write(&events(0..10)).await.unwrap();
        sink.commit().await.unwrap();
        for (name, bytes) in &before {
            assert_eq!(&std::fs::read(dir.path().join(name)).unwrap(), bytes, "{name} must be untouched");
        }
        let mut expected = lines(0..100);
        expected.extend(lines(0..10));
        assert_eq!(read_all(dir.path()), expected, "the new series comes after the old one");
    }

    #[tokio::test]
    async fn a_damaged_state_is_an_error_not_a_fresh_start() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("t-0-000000.ndjson"), "{\"n\":0}\n").unwrap();
        let mut sink = FileSink::new(dir.path().to_path_buf(), &place(), 1024, 0, false).unwrap();
        for bad in [serde_json::json!({"seq": -1, "len": 0}), serde_json::json!({"seq": 0}), serde_json::json!("x")] {
            let err = sink.recover(&bad).await.unwrap_err();
            assert!(err.to_string().contains("move it away"), "{err}");
        }
        assert_eq!(read_all(dir.path()), lines(0..1));
        // A sequence number at the end of the range: refused when it would overflow.
        let mut sink = FileSink::new(dir.path().to_path_buf(), &place(), 1024, 0, false).unwrap();
        sink.recover(&serde_json::json!({"seq": u64::MAX, "len": u64::MAX})).await.unwrap();
        let err = sink.write(&events(0..200)).await.unwrap_err();
        assert!(format!("{err:#}").contains("overflows"), "{err:#}");
    }

    #[tokio::test]
    async fn a_failed_flush_is_retried_without_a_torn_or_repeated_line() {
        let dir = tempfile::tempdir().unwrap();
        let mut sink = FileSink::new(dir.path().to_path_buf(), &place(), 1 << 30, 0, false).unwrap();
        sink.recover(&serde_json::Value::Null).await.unwrap();
        sink.write(&events(0..10)).await.unwrap();
        sink.commit().await.unwrap();
        // A real fault: the file handle goes read-only, so the flush fails.
        let good = sink.file.replace(File::open(sink.path(sink.seq)).unwrap()).unwrap();
        let batch: Vec<SinkEvent> = (10..30_000)
            .map(|i| SinkEvent {
                partition: 0,
                offset: i,
                timestamp: 0,
                key: None,
                payload: Bytes::from(format!("{{\"n\":{i}}}")),
            })
            .collect();
        sink.write(&batch).await.unwrap_err();
        sink.write(&batch).await.unwrap_err();
        sink.file = Some(good);
        sink.write(&batch).await.unwrap();
        sink.commit().await.unwrap();
        assert_eq!(read_all(dir.path()), lines(0..30_000));
    }
}
