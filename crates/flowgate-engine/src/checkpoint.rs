//! Checkpoints: a pipeline's committed offset for one source partition, with the state
//! of its processors and sinks as of that offset, in
//! `<data_dir>/pipelines/<pipeline>/<topic>-<partition>.json`, replaced atomically
//! (write, fsync, rename, fsync directory).

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// What is committed.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Checkpoint {
    /// The next offset to read.
    pub offset: u64,
    /// State of each processor, by position.
    pub processors: Vec<serde_json::Value>,
    /// State of each sink, by position.
    pub sinks: Vec<serde_json::Value>,
}

/// The checkpoint file of one (pipeline, topic, partition).
#[derive(Clone, Debug)]
pub struct CheckpointFile {
    path: PathBuf,
}

impl CheckpointFile {
    /// The file for this place.
    pub fn new(data_dir: &Path, pipeline: &str, topic: &str, partition: u32) -> CheckpointFile {
        CheckpointFile { path: data_dir.join("pipelines").join(pipeline).join(format!("{topic}-{partition}.json")) }
    }

    /// The last committed checkpoint, if any.
    pub fn load(&self) -> anyhow::Result<Option<Checkpoint>> {
        match std::fs::read(&self.path) {
            Ok(bytes) => Ok(Some(serde_json::from_slice(&bytes).map_err(|e| {
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
        let tmp = self.path.with_extension("json.tmp");
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&serde_json::to_vec(checkpoint)?)?;
        f.sync_data()?;
        std::fs::rename(&tmp, &self.path)?;
        std::fs::File::open(dir)?.sync_all()?;
        Ok(())
    }
}
