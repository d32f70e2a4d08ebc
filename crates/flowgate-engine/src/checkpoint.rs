//! Checkpoints: a pipeline's committed offset for one source partition, with the state
//! of its processors and sinks as of that offset, in
//! `<data_dir>/pipelines/<pipeline>/<topic>-<partition>.ckpt`, replaced atomically
//! (write, fsync, rename, fsync directory).
//!
//! Format: one line of JSON — `{"version":1,"offset":N,"sinks":[…],"processor_bytes":[…]}`
//! — then each processor's state as raw bytes, back to back, of the lengths listed,
//! then a CRC32C (u32, little-endian) of everything before it.
//!
//! A checkpoint that cannot be read is never treated as absent: the partition refuses to
//! start with an error that names the file and what to do (put back what was there, or
//! move the file away to restart the partition from the pipeline's `start`), because
//! starting over silently would lose processor state and re-deliver or skip events.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The format version this build writes and reads.
const VERSION: u32 = 1;

/// What is committed.
#[derive(Clone, Debug, Default)]
pub struct Checkpoint {
    /// The next offset to read.
    pub offset: u64,
    /// State of each processor, by position (empty: stateless).
    pub processors: Vec<Vec<u8>>,
    /// State of each sink, by position.
    pub sinks: Vec<serde_json::Value>,
}

#[derive(Serialize, Deserialize)]
struct Header {
    version: u32,
    offset: u64,
    sinks: Vec<serde_json::Value>,
    processor_bytes: Vec<usize>,
}

/// The checkpoint file of one (pipeline, topic, partition).
#[derive(Clone, Debug)]
pub struct CheckpointFile {
    path: PathBuf,
}

impl Checkpoint {
    /// Writes the checkpoint in its file format, piece by piece (processor state can be
    /// large; it is not copied into one buffer first).
    pub fn write_to(&self, out: &mut impl Write) -> std::io::Result<()> {
        let header = Header {
            version: VERSION,
            offset: self.offset,
            sinks: self.sinks.clone(),
            processor_bytes: self.processors.iter().map(Vec::len).collect(),
        };
        let mut head = serde_json::to_vec(&header).expect("header serializes");
        head.push(b'\n');
        out.write_all(&head)?;
        let mut crc = crc32c::crc32c(&head);
        for p in &self.processors {
            out.write_all(p)?;
            crc = crc32c::crc32c_append(crc, p);
        }
        out.write_all(&crc.to_le_bytes())
    }

    /// Serializes the checkpoint in its file format.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.write_to(&mut out).expect("writing to a Vec cannot fail");
        out
    }

    /// Parses the file format; the error says what is wrong.
    pub fn from_bytes(bytes: &[u8]) -> Result<Checkpoint, String> {
        if bytes.len() < 5 {
            return Err("too short".into());
        }
        let (body, crc) = bytes.split_at(bytes.len() - 4);
        if crc32c::crc32c(body) != u32::from_le_bytes(crc.try_into().expect("4 bytes")) {
            return Err("checksum mismatch".into());
        }
        let newline = body.iter().position(|&b| b == b'\n').ok_or("no header line")?;
        let header: Header = serde_json::from_slice(&body[..newline]).map_err(|e| format!("header: {e}"))?;
        if header.version != VERSION {
            return Err(format!(
                "format version {} is not the version this build reads ({VERSION}); was it written by another flowgate release?",
                header.version
            ));
        }
        let mut rest = &body[newline + 1..];
        let mut processors = Vec::with_capacity(header.processor_bytes.len());
        for len in header.processor_bytes {
            if rest.len() < len {
                return Err("processor state truncated".into());
            }
            processors.push(rest[..len].to_vec());
            rest = &rest[len..];
        }
        if !rest.is_empty() {
            return Err(format!("{} bytes after the last processor state", rest.len()));
        }
        Ok(Checkpoint { offset: header.offset, processors, sinks: header.sinks })
    }
}

impl CheckpointFile {
    /// The file for this place.
    pub fn new(data_dir: &Path, pipeline: &str, topic: &str, partition: u32) -> CheckpointFile {
        CheckpointFile { path: data_dir.join("pipelines").join(pipeline).join(format!("{topic}-{partition}.ckpt")) }
    }

    /// Where the file is.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The error for state in this checkpoint that `what` (a processor or sink, e.g.
    /// `processor 2 (aggregate)`) could not restore: it names the file and what to do,
    /// so the partition stops instead of starting over without its state.
    pub fn restore_error(&self, what: &str, error: anyhow::Error) -> anyhow::Error {
        anyhow::anyhow!(
            "checkpoint {}: {what} cannot restore its state: {error:#}; this partition does not start without \
             it. Fix the config to match the checkpoint, or move the file away to restart the partition from \
             the pipeline's `start` (that state is then lost)",
            self.path.display()
        )
    }

    /// The last committed checkpoint, if any.
    pub fn load(&self) -> anyhow::Result<Option<Checkpoint>> {
        match std::fs::read(&self.path) {
            Ok(bytes) => Ok(Some(Checkpoint::from_bytes(&bytes).map_err(|e| {
                anyhow::anyhow!(
                    "checkpoint {} is unreadable ({e}); move it away to restart from the start policy",
                    self.path.display()
                )
            })?)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(anyhow::anyhow!("cannot read checkpoint {}: {e}", self.path.display())),
        }
    }

    /// Commits a checkpoint durably.
    pub fn store(&self, checkpoint: &Checkpoint) -> anyhow::Result<()> {
        let dir = self.path.parent().expect("checkpoint path has a parent");
        std::fs::create_dir_all(dir)?;
        let tmp = self.path.with_extension("ckpt.tmp");
        let mut f = std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(&tmp)?);
        checkpoint.write_to(&mut f)?;
        let f = f.into_inner().map_err(|e| e.into_error())?;
        f.sync_data()?;
        std::fs::rename(&tmp, &self.path)?;
        std::fs::File::open(dir)?.sync_all()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_detects_damage() {
        let c = Checkpoint {
            offset: 42,
            processors: vec![vec![], vec![1, 2, 3, b'\n'], vec![9; 100]],
            sinks: vec![serde_json::json!({"seq": 1, "len": 10}), serde_json::Value::Null],
        };
        let bytes = c.to_bytes();
        let back = Checkpoint::from_bytes(&bytes).unwrap();
        assert_eq!(back.offset, 42);
        assert_eq!(back.processors, c.processors);
        assert_eq!(back.sinks, c.sinks);
        let mut damaged = bytes.clone();
        damaged[bytes.len() / 2] ^= 1;
        assert!(Checkpoint::from_bytes(&damaged).is_err());
        assert!(Checkpoint::from_bytes(&bytes[..bytes.len() - 1]).is_err());
    }

    fn sealed(body: &[u8]) -> Vec<u8> {
        let mut out = body.to_vec();
        out.extend_from_slice(&crc32c::crc32c(body).to_le_bytes());
        out
    }

    #[test]
    fn another_version_or_trailing_bytes_are_refused() {
        let newer = sealed(b"{\"version\":2,\"offset\":1,\"sinks\":[],\"processor_bytes\":[]}\n");
        assert!(Checkpoint::from_bytes(&newer).unwrap_err().contains("version 2"));
        let trailing = sealed(b"{\"version\":1,\"offset\":1,\"sinks\":[],\"processor_bytes\":[1]}\nab");
        assert!(Checkpoint::from_bytes(&trailing).unwrap_err().contains("after the last"));
        let file = CheckpointFile::new(Path::new("/data"), "p", "t", 3);
        let e = file.restore_error("processor 2 (aggregate)", anyhow::anyhow!("boom")).to_string();
        assert!(e.contains("/data/pipelines/p/t-3.ckpt") && e.contains("move the file away"), "{e}");
    }

    proptest::proptest! {
        #[test]
        fn any_checkpoint_round_trips(
            offset in proptest::prelude::any::<u64>(),
            processors in proptest::collection::vec(proptest::collection::vec(proptest::prelude::any::<u8>(), 0..64), 0..5),
        ) {
            let c = Checkpoint { offset, processors, sinks: vec![serde_json::json!({"len": u64::MAX})] };
            let back = Checkpoint::from_bytes(&c.to_bytes()).unwrap();
            proptest::prop_assert_eq!(back.offset, c.offset);
            proptest::prop_assert_eq!(back.processors, c.processors);
            proptest::prop_assert_eq!(back.sinks, c.sinks);
        }
    }
}
