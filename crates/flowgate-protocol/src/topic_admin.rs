//! The bodies of topic administration (protocol version 3): settings carried by
//! CREATE_TOPIC and ALTER_TOPIC, and the answers ALTERED and DESCRIBED.

use crate::codec::{put_str, ProtocolError, Reader};

/// Bytes of one setting in a request or an answer: id, action or source, value.
const SETTING_LEN: usize = 10;
/// Fewest bytes of one partition in DESCRIBED (no consumers).
const PARTITION_MIN_LEN: usize = 38;
/// Fewest bytes of one consumer in DESCRIBED (an empty name).
const CONSUMER_MIN_LEN: usize = 10;

/// A topic setting.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Setting {
    /// Sealed segments last written longer ago than this many ms are deleted (0: never).
    RetentionMs = 1,
    /// Old sealed segments are deleted while a partition holds more than this many bytes
    /// without them (0: no limit).
    RetentionBytes = 2,
    /// The codec of batches the server encodes for the topic, by codec id (0 none, 1
    /// lz4, 2 zstd).
    Compression = 3,
}

impl Setting {
    /// Every setting, in id order.
    pub const ALL: [Setting; 3] = [Setting::RetentionMs, Setting::RetentionBytes, Setting::Compression];

    /// The setting with this id.
    pub fn from_id(id: u8) -> Option<Setting> {
        Setting::ALL.into_iter().find(|s| *s as u8 == id)
    }

    /// Its name in the CLI, the HTTP API and the docs.
    pub fn name(self) -> &'static str {
        match self {
            Setting::RetentionMs => "retention_ms",
            Setting::RetentionBytes => "retention_bytes",
            Setting::Compression => "compression",
        }
    }
}

/// One setting of a CREATE_TOPIC or ALTER_TOPIC: a value of the topic's own, or `None`
/// to follow the default again.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SettingUpdate {
    /// Which setting.
    pub setting: Setting,
    /// The topic's own value, or `None` for the default.
    pub value: Option<u64>,
}

/// Where a setting's effective value comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SettingSource {
    /// The default (the engine's config).
    Default = 0,
    /// The topic's own.
    Topic = 1,
    /// Neither: the topic's settings file is unreadable, and retention deletes nothing
    /// of the topic until its settings are written again (value 0).
    Suspended = 2,
}

impl SettingSource {
    fn from_id(id: u8) -> Option<SettingSource> {
        [SettingSource::Default, SettingSource::Topic, SettingSource::Suspended].into_iter().find(|s| *s as u8 == id)
    }

    /// Its name in listings: `default`, `topic` or `suspended`.
    pub fn name(self) -> &'static str {
        match self {
            SettingSource::Default => "default",
            SettingSource::Topic => "topic",
            SettingSource::Suspended => "suspended",
        }
    }
}

/// A setting's effective value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SettingValue {
    /// Which setting.
    pub setting: Setting,
    /// Where the value comes from.
    pub source: SettingSource,
    /// The value (for compression, the codec id).
    pub value: u64,
}

/// A consumer of a partition (a pipeline) and the offset it committed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConsumerOffset {
    /// The consumer's name.
    pub name: String,
    /// Every offset below this is committed.
    pub committed_offset: u64,
}

/// A partition in DESCRIBED.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PartitionDetail {
    /// First offset held.
    pub start_offset: u64,
    /// Next offset to assign.
    pub end_offset: u64,
    /// Bytes of segment files.
    pub size_bytes: u64,
    /// Segment files.
    pub segments: u32,
    /// When the oldest segment was last written (ms since the epoch): the age retention
    /// goes by.
    pub oldest_segment_ms: i64,
    /// The consumers that committed offsets of the partition, by name.
    pub consumers: Vec<ConsumerOffset>,
}

/// A topic in DESCRIBED.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TopicDescription {
    /// Name.
    pub name: String,
    /// When the topic was created (ms since the epoch).
    pub created_ms: i64,
    /// Each setting's effective value and its source.
    pub settings: Vec<SettingValue>,
    /// Why the topic's settings file could not be read, if it could not.
    pub settings_error: Option<String>,
    /// Partitions, by number.
    pub partitions: Vec<PartitionDetail>,
}

/// Reads the settings of a CREATE_TOPIC (only when any are left) or an ALTER_TOPIC:
/// count u8, then per setting id u8, action u8 (0 default, 1 the value), value u64.
pub(crate) fn read_updates(r: &mut Reader<'_>) -> Result<Vec<SettingUpdate>, ProtocolError> {
    let n = r.u8("setting count")? as usize;
    if n > Setting::ALL.len() {
        return Err(ProtocolError::BadSetting("more settings than there are"));
    }
    let mut updates: Vec<SettingUpdate> = Vec::with_capacity(n);
    for _ in 0..n {
        let setting = Setting::from_id(r.u8("setting")?).ok_or(ProtocolError::BadSetting("unknown setting id"))?;
        let value = match (r.u8("setting action")?, r.u64("setting value")?) {
            (0, _) => None,
            (1, v) => Some(v),
            _ => return Err(ProtocolError::BadSetting("action is neither 0 (default) nor 1 (value)")),
        };
        if updates.iter().any(|u| u.setting == setting) {
            return Err(ProtocolError::BadSetting("a setting appears twice"));
        }
        updates.push(SettingUpdate { setting, value });
    }
    Ok(updates)
}

pub(crate) fn put_updates(out: &mut Vec<u8>, updates: &[SettingUpdate]) {
    let n = updates.len().min(Setting::ALL.len());
    out.push(n as u8);
    for u in &updates[..n] {
        out.push(u.setting as u8);
        out.push(u8::from(u.value.is_some()));
        out.extend_from_slice(&u.value.unwrap_or(0).to_le_bytes());
    }
}

/// Reads effective settings: count u8, then per setting id u8, source u8, value u64.
pub(crate) fn read_values(r: &mut Reader<'_>) -> Result<Vec<SettingValue>, ProtocolError> {
    let n = r.u8("setting count")? as usize;
    let mut values = Vec::with_capacity(n.min(r.remaining() / SETTING_LEN));
    for _ in 0..n {
        let setting = Setting::from_id(r.u8("setting")?).ok_or(ProtocolError::BadSetting("unknown setting id"))?;
        let source =
            SettingSource::from_id(r.u8("setting source")?).ok_or(ProtocolError::BadSetting("unknown source"))?;
        values.push(SettingValue { setting, source, value: r.u64("setting value")? });
    }
    Ok(values)
}

pub(crate) fn put_values(out: &mut Vec<u8>, values: &[SettingValue]) {
    let n = values.len().min(u8::MAX as usize);
    out.push(n as u8);
    for v in &values[..n] {
        out.push(v.setting as u8);
        out.push(v.source as u8);
        out.extend_from_slice(&v.value.to_le_bytes());
    }
}

/// Reads DESCRIBED's body.
pub(crate) fn read_description(r: &mut Reader<'_>) -> Result<TopicDescription, ProtocolError> {
    let name = r.str("topic name")?.to_owned();
    let created_ms = r.u64("created_ms")? as i64;
    let settings = read_values(r)?;
    let settings_error = Some(r.str("settings error")?).filter(|e| !e.is_empty()).map(str::to_owned);
    let n = r.u32("partition count")? as usize;
    let mut partitions = Vec::with_capacity(n.min(r.remaining() / PARTITION_MIN_LEN));
    for _ in 0..n {
        let start_offset = r.u64("start_offset")?;
        let end_offset = r.u64("end_offset")?;
        let size_bytes = r.u64("size_bytes")?;
        let segments = r.u32("segments")?;
        let oldest_segment_ms = r.u64("oldest_segment_ms")? as i64;
        let c = r.u16("consumer count")? as usize;
        let mut consumers = Vec::with_capacity(c.min(r.remaining() / CONSUMER_MIN_LEN));
        for _ in 0..c {
            let name = r.str("consumer name")?.to_owned();
            consumers.push(ConsumerOffset { name, committed_offset: r.u64("committed_offset")? });
        }
        partitions.push(PartitionDetail {
            start_offset,
            end_offset,
            size_bytes,
            segments,
            oldest_segment_ms,
            consumers,
        });
    }
    Ok(TopicDescription { name, created_ms, settings, settings_error, partitions })
}

pub(crate) fn put_description(out: &mut Vec<u8>, d: &TopicDescription) {
    put_str(out, &d.name);
    out.extend_from_slice(&d.created_ms.to_le_bytes());
    put_values(out, &d.settings);
    put_str(out, d.settings_error.as_deref().unwrap_or(""));
    out.extend_from_slice(&u32::try_from(d.partitions.len()).unwrap_or(u32::MAX).to_le_bytes());
    for p in d.partitions.iter().take(u32::MAX as usize) {
        out.extend_from_slice(&p.start_offset.to_le_bytes());
        out.extend_from_slice(&p.end_offset.to_le_bytes());
        out.extend_from_slice(&p.size_bytes.to_le_bytes());
        out.extend_from_slice(&p.segments.to_le_bytes());
        out.extend_from_slice(&p.oldest_segment_ms.to_le_bytes());
        let c = p.consumers.len().min(u16::MAX as usize);
        out.extend_from_slice(&(c as u16).to_le_bytes());
        for consumer in &p.consumers[..c] {
            put_str(out, &consumer.name);
            out.extend_from_slice(&consumer.committed_offset.to_le_bytes());
        }
    }
}
