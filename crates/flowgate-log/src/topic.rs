//! A topic: a name, a fixed number of partitions, and its metadata file
//! (`topic.json`: `{"partitions": N, "created_ms": T}`).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::config::LogConfig;
use crate::error::{LogError, Result};
use crate::flusher::Flusher;
use crate::index::write_file_atomic;
use crate::partition::{Partition, PartitionInfo};

/// The longest topic name.
pub const MAX_TOPIC_NAME: usize = 200;

/// Checks a topic name: 1 to 200 characters of `[A-Za-z0-9._-]`, not starting with `.`.
pub fn validate_topic_name(name: &str) -> Result<()> {
    let reason = if name.is_empty() {
        Some("it is empty")
    } else if name.len() > MAX_TOPIC_NAME {
        Some("it is longer than 200 characters")
    } else if name.starts_with('.') {
        Some("it starts with '.'")
    } else if !name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-')) {
        Some("only letters, digits, '.', '_' and '-' are allowed")
    } else {
        None
    };
    match reason {
        Some(reason) => Err(LogError::InvalidTopicName { name: name.to_owned(), reason }),
        None => Ok(()),
    }
}

#[derive(Serialize, Deserialize)]
struct TopicMeta {
    partitions: u32,
    created_ms: i64,
}

/// A topic's numbers, for listings.
#[derive(Clone, Debug, Serialize)]
pub struct TopicInfo {
    /// Topic name.
    pub name: String,
    /// Per partition numbers.
    pub partitions: Vec<PartitionInfo>,
}

/// A topic and its partitions.
#[derive(Debug)]
pub struct Topic {
    name: String,
    dir: PathBuf,
    partitions: Vec<Arc<Partition>>,
    round_robin: AtomicU32,
    created_ms: i64,
}

impl Topic {
    pub(crate) fn create(
        dir: PathBuf,
        name: &str,
        partitions: u32,
        config: &Arc<LogConfig>,
        flusher: &Arc<Flusher>,
    ) -> Result<Topic> {
        std::fs::create_dir_all(&dir).map_err(LogError::io("create directory", &dir))?;
        let meta = TopicMeta { partitions, created_ms: flowgate_core::time::now_ms() };
        let json = serde_json::to_vec(&meta).expect("topic metadata serializes");
        write_file_atomic(&dir.join("topic.json"), &json)?;
        if let Some(parent) = dir.parent() {
            crate::partition::sync_dir(parent)?;
        }
        Topic::open(dir, name, config, flusher)
    }

    pub(crate) fn open(dir: PathBuf, name: &str, config: &Arc<LogConfig>, flusher: &Arc<Flusher>) -> Result<Topic> {
        let meta_path = dir.join("topic.json");
        let bytes = std::fs::read(&meta_path).map_err(LogError::io("read", &meta_path))?;
        let meta: TopicMeta = serde_json::from_slice(&bytes)
            .map_err(|e| LogError::BadMetadata { path: meta_path.clone(), reason: e.to_string() })?;
        if meta.partitions == 0 {
            return Err(LogError::BadMetadata { path: meta_path, reason: "0 partitions".into() });
        }
        let partitions = (0..meta.partitions)
            .map(|p| Partition::open(p, dir.join(p.to_string()), config.clone(), flusher.clone()).map(Arc::new))
            .collect::<Result<Vec<_>>>()?;
        Ok(Topic {
            name: name.to_owned(),
            dir,
            partitions,
            round_robin: AtomicU32::new(0),
            created_ms: meta.created_ms,
        })
    }

    /// The topic's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The topic's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// When the topic was created (ms since the epoch): tells a topic from one deleted
    /// and created again under its name, whose offsets start over.
    pub fn created_ms(&self) -> i64 {
        self.created_ms
    }

    /// Number of partitions.
    pub fn partition_count(&self) -> u32 {
        self.partitions.len() as u32
    }

    /// The partitions.
    pub fn partitions(&self) -> &[Arc<Partition>] {
        &self.partitions
    }

    /// Partition `id`.
    pub fn partition(&self, id: u32) -> Result<&Arc<Partition>> {
        self.partitions.get(id as usize).ok_or_else(|| LogError::UnknownPartition {
            topic: self.name.clone(),
            partition: id,
            partitions: self.partition_count(),
        })
    }

    /// The partition for events without a key: round robin, one step per call, so a
    /// caller asks once per batch and the batch stays together.
    pub fn next_round_robin(&self) -> u32 {
        self.round_robin.fetch_add(1, Ordering::Relaxed) % self.partition_count()
    }

    /// Numbers for listings.
    pub fn info(&self) -> TopicInfo {
        TopicInfo { name: self.name.clone(), partitions: self.partitions.iter().map(|p| p.info()).collect() }
    }
}
