//! The log: a data directory of topics, the flusher thread, and topic administration.
//!
//! Layout: `<data_dir>/topics/<topic>/topic.json` and `<data_dir>/topics/<topic>/<partition>/`
//! holding the segment files (`docs/log-format.md`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Weak};
use std::thread::JoinHandle;

use parking_lot::{Mutex, RwLock};

use crate::config::{FsyncPolicy, LogConfig};
use crate::error::{LogError, Result};
use crate::flusher::{Flusher, FsyncHook};
use crate::partition::Partition;
use crate::settings::{SettingsChange, TopicSettings};
use crate::topic::{validate_topic_name, Topic, TopicInfo};

/// Hooks through which the log reports to the layer above (metrics), without knowing it.
#[derive(Clone, Default)]
pub struct LogObserver {
    /// Called with each fsync's duration.
    pub on_fsync: Option<FsyncHook>,
}

struct Inner {
    dir: PathBuf,
    topics_dir: PathBuf,
    config: Arc<LogConfig>,
    topics: RwLock<BTreeMap<String, Arc<Topic>>>,
    flusher: Arc<Flusher>,
    flusher_thread: Mutex<Option<JoinHandle<()>>>,
    create_lock: Mutex<()>,
}

/// A data directory of topics. Cheap to clone.
#[derive(Clone)]
pub struct Log {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Log {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Log").field("dir", &self.inner.dir).finish()
    }
}

impl Log {
    /// Opens the data directory (creating it if needed), recovering every partition.
    pub fn open(dir: impl AsRef<Path>, config: LogConfig) -> Result<Log> {
        Log::open_with(dir, config, LogObserver::default())
    }

    /// Like [`Log::open`], with hooks for metrics.
    pub fn open_with(dir: impl AsRef<Path>, config: LogConfig, observer: LogObserver) -> Result<Log> {
        let dir = dir.as_ref().to_path_buf();
        let topics_dir = dir.join("topics");
        if !topics_dir.is_dir() {
            std::fs::create_dir_all(&topics_dir).map_err(LogError::io("create data directory", &topics_dir))?;
            crate::partition::sync_dir(&dir)?;
        }
        let config = Arc::new(config);
        let flusher = Flusher::new();
        if let Some(hook) = observer.on_fsync {
            flusher.set_fsync_hook(hook);
        }
        let mut topics = BTreeMap::new();
        for entry in std::fs::read_dir(&topics_dir).map_err(LogError::io("list", &topics_dir))? {
            let entry = entry.map_err(LogError::io("list", &topics_dir))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if validate_topic_name(&name).is_err() {
                continue;
            }
            if !entry.path().join("topic.json").exists() {
                if holds_data(&entry.path()) {
                    // Never opened, never deleted: create_topic refuses this name until
                    // someone restores topic.json or moves the directory.
                    tracing::error!("{}", LogError::OrphanTopicDirectory { path: entry.path() });
                }
                continue;
            }
            let topic = Topic::open(entry.path(), &name, &config, &flusher)?;
            topics.insert(name, Arc::new(topic));
        }
        let inner = Arc::new(Inner {
            dir,
            topics_dir,
            config: config.clone(),
            topics: RwLock::new(topics),
            flusher: flusher.clone(),
            flusher_thread: Mutex::new(None),
            create_lock: Mutex::new(()),
        });
        let weak: Weak<Inner> = Arc::downgrade(&inner);
        let interval = (config.fsync == FsyncPolicy::Interval).then(|| config.fsync_interval());
        let thread = std::thread::Builder::new()
            .name("flowgate-flusher".into())
            .spawn(move || {
                flusher.run(interval, move || match weak.upgrade() {
                    Some(inner) => inner.topics.read().values().flat_map(|t| t.partitions().to_vec()).collect(),
                    None => Vec::new(),
                })
            })
            .map_err(LogError::io("start flusher thread", &inner.dir))?;
        *inner.flusher_thread.lock() = Some(thread);
        Ok(Log { inner })
    }

    /// The data directory.
    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    /// The settings.
    pub fn config(&self) -> &LogConfig {
        &self.inner.config
    }

    /// The topic, if it exists.
    pub fn topic(&self, name: &str) -> Option<Arc<Topic>> {
        self.inner.topics.read().get(name).cloned()
    }

    /// The topic, created with the default partition count if it does not exist and
    /// auto-creation is on.
    pub fn topic_or_create(&self, name: &str) -> Result<Arc<Topic>> {
        if let Some(t) = self.topic(name) {
            return Ok(t);
        }
        if !self.inner.config.auto_create_topics {
            return Err(LogError::UnknownTopic(name.to_owned()));
        }
        match self.create_topic(name, self.inner.config.default_partitions) {
            Ok(t) => Ok(t),
            Err(LogError::TopicExists(_)) => self.topic(name).ok_or_else(|| LogError::UnknownTopic(name.into())),
            Err(e) => Err(e),
        }
    }

    /// Creates a topic with `partitions` partitions and no settings of its own.
    pub fn create_topic(&self, name: &str, partitions: u32) -> Result<Arc<Topic>> {
        self.create_topic_with(name, partitions, &TopicSettings::default())
    }

    /// Creates a topic with `partitions` partitions and its own `settings`.
    pub fn create_topic_with(&self, name: &str, partitions: u32, settings: &TopicSettings) -> Result<Arc<Topic>> {
        validate_topic_name(name)?;
        settings.validate()?;
        if partitions == 0 || partitions > 10_000 {
            return Err(LogError::InvalidTopicName { name: name.into(), reason: "partitions must be 1 to 10000" });
        }
        let _guard = self.inner.create_lock.lock();
        if self.topic(name).is_some() {
            return Err(LogError::TopicExists(name.to_owned()));
        }
        let held: u64 = self.inner.topics.read().values().map(|t| u64::from(t.partition_count())).sum();
        let max = self.inner.config.max_partitions;
        if held.saturating_add(u64::from(partitions)) > max {
            return Err(LogError::PartitionLimit { held, asked: partitions, max });
        }
        let dir = self.inner.topics_dir.join(name);
        if dir.exists() {
            if holds_data(&dir) {
                // topic.json lost (a power failure before its directory entry was durable,
                // or a hand edit) while the data survived: deleting it would lose events.
                return Err(LogError::OrphanTopicDirectory { path: dir });
            }
            // Left over from an interrupted create: no segment holds a byte.
            std::fs::remove_dir_all(&dir).map_err(LogError::io("remove stale directory", &dir))?;
        }
        let topic = Arc::new(Topic::create(dir, name, partitions, settings, &self.inner.config, &self.inner.flusher)?);
        self.inner.topics.write().insert(name.to_owned(), topic.clone());
        tracing::info!(topic = name, partitions, settings = %settings, "created topic");
        Ok(topic)
    }

    /// Changes a topic's settings; returns them before and after. The new settings are
    /// durable when this returns, and appends and retention use them from then on. A
    /// topic whose settings file was unreadable gets a new one only from a change that
    /// gives every setting ([`SettingsChange::sets_everything`]); any other change is
    /// refused, as its earlier settings are unknown.
    pub fn alter_topic(&self, name: &str, change: &SettingsChange) -> Result<(TopicSettings, TopicSettings)> {
        let _guard = self.inner.create_lock.lock();
        let topic = self.topic(name).ok_or_else(|| LogError::UnknownTopic(name.to_owned()))?;
        let before = topic.settings();
        let after = before.apply(change);
        let damaged = topic.settings_error();
        let repair = damaged.is_some();
        if let Some(damage) = damaged.filter(|_| !change.sets_everything()) {
            // The earlier settings are unknown: a file holding only this change would
            // let retention resume with the defaults in place of the lost limits.
            return Err(LogError::InvalidSetting {
                setting: "settings",
                reason: format!(
                    "the topic's settings file is unreadable ({damage}), so its earlier settings are unknown; \
                     give every setting (retention_ms, retention_bytes, compression; null for the default) to \
                     write a new file"
                ),
            });
        }
        if after == before && !repair {
            tracing::info!(topic = name, "topic settings unchanged");
            return Ok((before, after));
        }
        topic.store_settings(after)?;
        tracing::info!(topic = name, changed = %before.describe_change(&after), repaired_file = repair,
            "changed topic settings");
        Ok((before, after))
    }

    /// Deletes a topic and its data.
    pub fn delete_topic(&self, name: &str) -> Result<()> {
        let _guard = self.inner.create_lock.lock();
        let topic = self.inner.topics.write().remove(name).ok_or_else(|| LogError::UnknownTopic(name.into()))?;
        // Rename first so a crash midway never leaves a half-deleted topic that opens.
        let doomed = self.inner.dir.join(format!(".deleted-{}-{}", name, flowgate_core::time::now_ms()));
        std::fs::rename(topic.dir(), &doomed).map_err(LogError::io("rename", topic.dir()))?;
        crate::partition::sync_dir(&self.inner.topics_dir)?;
        std::fs::remove_dir_all(&doomed).map_err(LogError::io("delete", &doomed))?;
        tracing::info!(topic = name, "deleted topic");
        Ok(())
    }

    /// Every topic.
    pub fn topics(&self) -> Vec<Arc<Topic>> {
        self.inner.topics.read().values().cloned().collect()
    }

    /// Numbers of every topic.
    pub fn topic_infos(&self) -> Vec<TopicInfo> {
        self.topics().iter().map(|t| t.info()).collect()
    }

    /// Applies retention to every partition, each topic by its own limits
    /// ([`Topic::retention`]). Returns segments and bytes deleted.
    pub fn enforce_retention(&self) -> Result<(usize, u64)> {
        let now = flowgate_core::time::now_ms();
        let mut total = (0, 0);
        for topic in self.topics() {
            for p in topic.partitions() {
                // Each partition under the limits of the moment: a change acknowledged
                // mid-pass applies to the partitions after it.
                let config = &self.inner.config;
                let Some(result) = topic.under_retention(config, |limits| p.enforce_retention(now, limits)) else {
                    break;
                };
                let (n, b) = result?;
                total.0 += n;
                total.1 += b;
            }
        }
        Ok(total)
    }

    /// Records that `consumer` (a pipeline, by name) has committed every offset below
    /// `offset` in `topic`'s `partition`. Retention counts, logs and reports
    /// ([`crate::PartitionInfo::unread_deleted_events`], [`Log::unread_deleted_events`])
    /// every event it deletes below a registered consumer's committed offset. Unknown
    /// topics and partitions are ignored (the topic may have been deleted).
    pub fn set_consumer_offset(&self, consumer: &str, topic: &str, partition: u32, offset: u64) {
        if let Some(p) = self.topic(topic).and_then(|t| t.partition(partition).ok().cloned()) {
            p.set_consumer_offset(consumer, offset);
        }
    }

    /// Events retention deleted before a consumer had read them, over every partition,
    /// since start.
    pub fn unread_deleted_events(&self) -> u64 {
        self.partitions().iter().map(|p| p.unread_deleted_events()).sum()
    }

    /// Every partition of every topic.
    pub fn partitions(&self) -> Vec<Arc<Partition>> {
        self.topics().iter().flat_map(|t| t.partitions().to_vec()).collect()
    }

    /// Stops the flusher and fsyncs every partition. Appends after this may not be
    /// durable; call it last.
    pub fn close(&self) -> Result<()> {
        self.inner.flusher.stop();
        if let Some(thread) = self.inner.flusher_thread.lock().take() {
            let _ = thread.join();
        }
        for p in self.partitions() {
            p.close()?;
        }
        Ok(())
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.flusher.stop();
    }
}

/// True when a topic directory holds any segment with at least one byte.
fn holds_data(topic_dir: &Path) -> bool {
    let Ok(partitions) = std::fs::read_dir(topic_dir) else {
        // Unreadable: assume it holds data rather than risk deleting it.
        return true;
    };
    partitions.filter_map(|e| e.ok()).any(|p| match std::fs::read_dir(p.path()) {
        Ok(files) => files
            .filter_map(|f| f.ok())
            .any(|f| f.file_name().to_string_lossy().ends_with(".log") && f.metadata().map_or(true, |m| m.len() > 0)),
        Err(_) => p.path().is_dir(),
    })
}
