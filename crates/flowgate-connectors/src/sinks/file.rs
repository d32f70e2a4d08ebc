//! `file`: NDJSON files, rolled by size and age, optionally zstd-compressed once closed.
//!
//! Each source partition writes its own series, `<topic>-<partition>-<seq>.ndjson`, in
//! the sink's directory. The checkpoint records the open file's sequence number and
//! length; on recovery the file is cut back to that length and later files are removed,
//! so the events replayed from the checkpoint are written exactly once.

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use flowgate_engine::sink::BoxFuture;
use flowgate_engine::{Sink, SinkEvent, SinkPlace};

/// Writes NDJSON files.
pub struct FileSink {
    dir: PathBuf,
    prefix: String,
    rotate_bytes: u64,
    rotate_ms: u64,
    compress: bool,
    seq: u64,
    len: u64,
    opened: Instant,
    writer: Option<BufWriter<File>>,
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
        std::fs::create_dir_all(&dir).map_err(|e| anyhow::anyhow!("cannot create {}: {e}", dir.display()))?;
        Ok(FileSink {
            dir,
            prefix: format!("{}-{}-", place.topic, place.partition),
            rotate_bytes,
            rotate_ms,
            compress,
            seq: 0,
            len: 0,
            opened: Instant::now(),
            writer: None,
        })
    }

    fn path(&self, seq: u64) -> PathBuf {
        self.dir.join(format!("{}{seq:06}.ndjson", self.prefix))
    }

    /// Sequence numbers of this partition's files in the directory (`.ndjson` or `.ndjson.zst`).
    fn existing(&self) -> anyhow::Result<Vec<(u64, PathBuf)>> {
        let mut out = Vec::new();
        for entry in std::fs::read_dir(&self.dir)? {
            let path = entry?.path();
            let Some(name) = path.file_name().and_then(|n| n.to_str()) else { continue };
            let Some(rest) = name.strip_prefix(&self.prefix) else { continue };
            let digits = rest.trim_end_matches(".zst").trim_end_matches(".ndjson");
            if let Ok(seq) = digits.parse::<u64>() {
                out.push((seq, path.clone()));
            }
        }
        out.sort();
        Ok(out)
    }

    fn open(&mut self) -> anyhow::Result<()> {
        let path = self.path(self.seq);
        let file = OpenOptions::new().create(true).append(true).open(&path)?;
        self.len = file.metadata()?.len();
        self.opened = Instant::now();
        self.writer = Some(BufWriter::with_capacity(256 * 1024, file));
        Ok(())
    }

    fn close_current(&mut self) -> anyhow::Result<()> {
        if let Some(mut w) = self.writer.take() {
            w.flush()?;
            w.get_ref().sync_data()?;
            drop(w);
            if self.compress {
                compress_file(&self.path(self.seq))?;
            }
        }
        Ok(())
    }

    fn rotate_if_due(&mut self) -> anyhow::Result<()> {
        let by_size = self.len >= self.rotate_bytes;
        let by_age = self.rotate_ms > 0 && self.opened.elapsed().as_millis() as u64 >= self.rotate_ms && self.len > 0;
        if by_size || by_age {
            self.close_current()?;
            self.seq += 1;
            self.open()?;
        }
        Ok(())
    }
}

fn compress_file(path: &Path) -> anyhow::Result<()> {
    let input = File::open(path)?;
    let target = path.with_extension("ndjson.zst");
    let output = File::create(&target)?;
    let mut encoder = zstd::Encoder::new(output, 3)?;
    std::io::copy(&mut std::io::BufReader::new(input), &mut encoder)?;
    let output = encoder.finish()?;
    output.sync_data()?;
    std::fs::remove_file(path)?;
    Ok(())
}

impl Sink for FileSink {
    fn write<'a>(&'a mut self, events: &'a [SinkEvent]) -> BoxFuture<'a, anyhow::Result<()>> {
        Box::pin(async move {
            if self.writer.is_none() {
                self.open()?;
            }
            for e in events {
                let w = self.writer.as_mut().expect("opened above");
                w.write_all(&e.payload)?;
                w.write_all(b"\n")?;
                self.len += e.payload.len() as u64 + 1;
                if self.len >= self.rotate_bytes {
                    self.rotate_if_due()?;
                }
            }
            self.rotate_if_due()
        })
    }

    fn commit(&mut self) -> BoxFuture<'_, anyhow::Result<serde_json::Value>> {
        Box::pin(async move {
            if let Some(w) = self.writer.as_mut() {
                w.flush()?;
                w.get_ref().sync_data()?;
            }
            Ok(serde_json::json!({"seq": self.seq, "len": self.len}))
        })
    }

    fn recover<'a>(&'a mut self, state: &'a serde_json::Value) -> BoxFuture<'a, anyhow::Result<()>> {
        Box::pin(async move {
            let (seq, len) = match (state["seq"].as_u64(), state["len"].as_u64()) {
                (Some(s), Some(l)) => (s, l),
                // Nothing was ever committed: whatever is here will be written again.
                _ => (0, 0),
            };
            for (s, path) in self.existing()? {
                if s > seq || (s == seq && len == 0) {
                    std::fs::remove_file(&path)?;
                }
            }
            self.seq = seq;
            let path = self.path(seq);
            let compressed = path.with_extension("ndjson.zst");
            if !path.exists() && compressed.exists() {
                // Rolled and compressed after the checkpoint: bring it back to cut it.
                let bytes = zstd::decode_all(File::open(&compressed)?)?;
                std::fs::write(&path, bytes)?;
                std::fs::remove_file(&compressed)?;
            }
            if path.exists() {
                let f = OpenOptions::new().write(true).open(&path)?;
                if f.metadata()?.len() > len {
                    tracing::info!(file = %path.display(), len, "cutting sink file back to its checkpoint");
                    f.set_len(len)?;
                    f.sync_data()?;
                }
            }
            self.open()
        })
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

    fn read_all(dir: &Path) -> Vec<String> {
        let mut files: Vec<PathBuf> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()).collect();
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

    #[tokio::test]
    async fn rolls_by_size_compresses_and_recovers_exactly_to_the_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        let place = SinkPlace { pipeline: "p".into(), topic: "t".into(), partition: 0 };
        let mut sink = FileSink::new(dir.path().to_path_buf(), &place, 1024, 0, true).unwrap();
        sink.recover(&serde_json::Value::Null).await.unwrap();
        sink.write(&events(0..200)).await.unwrap();
        let state = sink.commit().await.unwrap();
        // Written after the checkpoint, then a crash: these must vanish on recovery.
        sink.write(&events(200..400)).await.unwrap();
        sink.commit().await.unwrap();
        drop(sink);
        let files = std::fs::read_dir(dir.path()).unwrap().count();
        assert!(files > 3, "200-byte rolls must have happened: {files} files");
        let mut sink = FileSink::new(dir.path().to_path_buf(), &place, 1024, 0, true).unwrap();
        sink.recover(&state).await.unwrap();
        sink.write(&events(200..250)).await.unwrap();
        sink.commit().await.unwrap();
        let lines = read_all(dir.path());
        let expected: Vec<String> = (0..250).map(|i| format!("{{\"n\":{i}}}")).collect();
        assert_eq!(lines, expected);
        assert!(std::fs::read_dir(dir.path()).unwrap().any(|e| e.unwrap().path().to_string_lossy().ends_with(".zst")));
    }
}
