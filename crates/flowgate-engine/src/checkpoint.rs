//! Checkpoints: a pipeline's committed offset for one source partition, with the state
//! of its processors and sinks as of that offset, in
//! `<data_dir>/pipelines/<pipeline>/<topic>-<partition>.ckpt`, replaced atomically
//! (write, fsync, rename, fsync directory).
//!
//! Format: one line of JSON — `{"version":1,"offset":N,"sinks":[…],"processor_bytes":[…]}`
//! — then each processor's state as raw bytes, back to back, of the lengths listed,
//! then a CRC32C (u32, little-endian) of everything before it.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

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
            version: 1,
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
        let header: Header = serde_json::from_slice(&body[..newline]).map_err(|e| e.to_string())?;
        let mut rest = &body[newline + 1..];
        let mut processors = Vec::new();
        for len in header.processor_bytes {
            if rest.len() < len {
                return Err("processor state truncated".into());
            }
            processors.push(rest[..len].to_vec());
            rest = &rest[len..];
        }
        Ok(Checkpoint { offset: header.offset, processors, sinks: header.sinks })
    }
}

impl CheckpointFile {
    /// The file for this place.
    pub fn new(data_dir: &Path, pipeline: &str, topic: &str, partition: u32) -> CheckpointFile {
        CheckpointFile { path: data_dir.join("pipelines").join(pipeline).join(format!("{topic}-{partition}.ckpt")) }
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
}
