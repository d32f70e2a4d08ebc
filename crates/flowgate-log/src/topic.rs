//! A topic: a name, a fixed number of partitions, its metadata file (`topic.json`:
//! `{"partitions": N, "created_ms": T}`) and its own settings ([`crate::settings`]).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, AtomicU8, Ordering};
use std::sync::Arc;

use flowgate_core::Codec;
use parking_lot::{Mutex, RwLock};
use serde::{Deserialize, Serialize};

use crate::config::LogConfig;
use crate::error::{LogError, Result};
use crate::flusher::Flusher;
use crate::index::write_file_atomic;
use crate::partition::{Partition, PartitionInfo};
use crate::settings::{Loaded, Retention, TopicSettings};

/// [`Topic::compression`] when the topic sets none.
const NO_CODEC: u8 = u8::MAX;

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
    settings: RwLock<Loaded>,
    /// Held while retention deletes under the current limits and while the limits
    /// change, so a change waits for a deletion under the old ones. Apart from
    /// `settings`, whose readers (metrics, describe) must never wait for a deletion.
    retention_pass: Mutex<()>,
    /// The topic's own codec ([`NO_CODEC`] for none), read by every append the server
    /// encodes without taking a lock.
    compression: AtomicU8,
}

fn codec_byte(codec: Option<Codec>) -> u8 {
    codec.map_or(NO_CODEC, |c| c as u8)
}

impl Topic {
    pub(crate) fn create(
        dir: PathBuf,
        name: &str,
        partitions: u32,
        settings: &TopicSettings,
        config: &Arc<LogConfig>,
        flusher: &Arc<Flusher>,
    ) -> Result<Topic> {
        std::fs::create_dir_all(&dir).map_err(LogError::io("create directory", &dir))?;
        // Before topic.json: a topic that opens always has its settings.
        crate::settings::store(&dir, settings)?;
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
        // Interrupted atomic writes; the real files are intact (or were never there).
        for tmp in ["topic.json.tmp", "settings.json.tmp"] {
            let _ = std::fs::remove_file(dir.join(tmp));
        }
        let settings = crate::settings::load(&dir);
        if let Some(reason) = &settings.error {
            tracing::error!(
                topic = name,
                file = %dir.join(crate::settings::SETTINGS_FILE).display(),
                reason = %reason,
                "the topic's settings file is unreadable: retention deletes nothing of this topic and its \
                 batches use the default codec until `flowgate topics alter` writes new settings"
            );
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
            compression: AtomicU8::new(codec_byte(settings.settings.compression)),
            settings: RwLock::new(settings),
            retention_pass: Mutex::new(()),
        })
    }

    /// The topic's own settings (none of them while its settings file is unreadable).
    pub fn settings(&self) -> TopicSettings {
        self.settings.read().settings
    }

    /// Why the topic's settings file could not be read at start, if it could not.
    /// Meanwhile retention deletes nothing of the topic, and the next change of its
    /// settings writes a new file.
    pub fn settings_error(&self) -> Option<String> {
        self.settings.read().error.clone()
    }

    /// The codec the topic sets for the batches the server encodes for it, if any.
    pub fn compression(&self) -> Option<Codec> {
        Codec::from_id(self.compression.load(Ordering::Relaxed))
    }

    /// The limits retention applies to each partition: the topic's own, else the log's;
    /// `None` while its settings file is unreadable (nothing is deleted on a guess).
    pub fn retention(&self, config: &LogConfig) -> Option<Retention> {
        let loaded = self.settings.read();
        loaded.error.is_none().then(|| loaded.settings.retention(config))
    }

    /// Runs `enforce` with [`Topic::retention`]'s limits while they hold: a settings
    /// change waits for it to end, so once a change is acknowledged no deletion under
    /// the old limits is still under way. `None` (nothing run) while the settings file
    /// is unreadable.
    pub fn under_retention<R>(&self, config: &LogConfig, enforce: impl FnOnce(Retention) -> R) -> Option<R> {
        let _pass = self.retention_pass.lock();
        let limits = self.retention(config)?;
        Some(enforce(limits))
    }

    /// Stores new settings (the file first, then what appends and retention read).
    /// The caller serializes changes.
    pub(crate) fn store_settings(&self, settings: TopicSettings) -> Result<()> {
        settings.validate()?;
        let _pass = self.retention_pass.lock();
        crate::settings::store(&self.dir, &settings)?;
        self.compression.store(codec_byte(settings.compression), Ordering::Relaxed);
        *self.settings.write() = Loaded { settings, error: None };
        Ok(())
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
