//! Topic administration, the same over the binary protocol and the HTTP API: creating a
//! topic with settings of its own, changing them, and describing a topic (each
//! setting's effective value and where it comes from, partitions, segments, consumers).
//! The JSON of a description is built here too, for `GET /v1/topics/{topic}` and
//! `flowgate topics describe --json` alike.

use std::sync::Arc;

use flowgate_core::Codec;
use flowgate_log::{LogError, TopicSettings};
use flowgate_protocol::{
    ConsumerOffset, PartitionDetail, Setting, SettingSource, SettingUpdate, SettingValue, TopicDescription,
};
use serde_json::{json, Value};

use crate::shared::Shared;
use crate::topic_request::to_change;

/// An operation of the topic API, the `op` label of its rejections.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    /// Creating a topic.
    Create,
    /// Changing its settings.
    Alter,
    /// Describing it.
    Describe,
    /// Reading its events over HTTP.
    Read,
}

impl Op {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Op::Create => "create",
            Op::Alter => "alter",
            Op::Describe => "describe",
            Op::Read => "read",
        }
    }
}

/// Counts a request refused for what it asked (`flowgate_topic_api_rejected_total`);
/// failures of the engine itself (I/O) are not the sender's and are not counted.
pub fn count_rejection(shared: &Shared, op: Op, e: &LogError) {
    let reason = match e {
        LogError::UnknownTopic(_) => "unknown_topic",
        LogError::UnknownPartition { .. } => "unknown_partition",
        LogError::TopicExists(_) => "topic_exists",
        LogError::InvalidTopicName { .. } => "invalid_topic_name",
        LogError::InvalidSetting { .. } => "invalid_setting",
        LogError::PartitionLimit { .. } => "partition_limit",
        LogError::OffsetOutOfRange { .. } => "offset_out_of_range",
        _ => return,
    };
    shared.ingest.metrics().topic_api_rejected(op, reason);
}

/// The codec of batches the listeners build for topics that set none.
fn default_codec(shared: &Shared) -> Codec {
    shared.ingest.appender().codec()
}

/// The engine's own topics (dead letters and their replays) follow the config's
/// settings: a short retention given to one, at creation or later, would delete dead
/// letters nobody has looked at.
fn refuse_engine_topic(name: &str) -> Result<(), LogError> {
    if flowgate_engine::runtime::replay::is_engine_topic(name) {
        return Err(LogError::InvalidTopicName {
            name: name.to_owned(),
            reason: "it is the engine's (dead letters and their replays): it takes no settings of its own, it \
                     follows the config's",
        });
    }
    Ok(())
}

/// Creates `name` with `partitions` partitions (`log.default_partitions` when `None`)
/// and `updates` as its own settings.
pub async fn create(
    shared: &Arc<Shared>,
    name: &str,
    partitions: Option<u32>,
    updates: &[SettingUpdate],
) -> Result<(), LogError> {
    let settings = TopicSettings::default().apply(&to_change(updates)?);
    if !settings.is_empty() {
        // Made without settings (as `flowgate dlq purge` does), it is what the engine
        // would make.
        refuse_engine_topic(name)?;
    }
    let log = shared.ingest.log().clone();
    let partitions = partitions.unwrap_or(log.config().default_partitions);
    let name = name.to_owned();
    // Creating files and fsyncing them: off the listeners' threads.
    blocking(move || log.create_topic_with(&name, partitions, &settings).map(|_| ())).await
}

/// Changes `name`'s settings by `updates`; returns every setting's effective value
/// before and after.
pub async fn alter(
    shared: &Arc<Shared>,
    name: &str,
    updates: &[SettingUpdate],
) -> Result<(Vec<SettingValue>, Vec<SettingValue>), LogError> {
    let change = to_change(updates)?;
    refuse_engine_topic(name)?;
    let log = shared.ingest.log().clone();
    let topic = log.topic(name).ok_or_else(|| LogError::UnknownTopic(name.to_owned()))?;
    let suspended = topic.settings_error().is_some();
    let name = name.to_owned();
    let (before, after) = blocking(move || log.alter_topic(&name, &change)).await?;
    let codec = default_codec(shared);
    let config = shared.ingest.log().config();
    Ok((values(&before, suspended, config, codec), values(&after, false, config, codec)))
}

async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, LogError> + Send + 'static,
) -> Result<T, LogError> {
    tokio::task::spawn_blocking(work).await.map_err(|e| LogError::Io {
        action: "change topic",
        path: Default::default(),
        source: std::io::Error::other(e.to_string()),
    })?
}

/// Every setting's effective value: the topic's own, else the default; retention
/// `suspended` (value 0) while the topic's settings file is unreadable.
fn values(
    settings: &TopicSettings,
    suspended: bool,
    config: &flowgate_log::LogConfig,
    codec: Codec,
) -> Vec<SettingValue> {
    let number = |setting: Setting, own: Option<u64>, default: u64| match (suspended, own) {
        (true, _) => SettingValue { setting, source: SettingSource::Suspended, value: 0 },
        (false, Some(value)) => SettingValue { setting, source: SettingSource::Topic, value },
        (false, None) => SettingValue { setting, source: SettingSource::Default, value: default },
    };
    let compression = match settings.compression {
        Some(c) => SettingValue { setting: Setting::Compression, source: SettingSource::Topic, value: c as u64 },
        None => SettingValue { setting: Setting::Compression, source: SettingSource::Default, value: codec as u64 },
    };
    vec![
        number(Setting::RetentionMs, settings.retention_ms, config.retention_ms),
        number(Setting::RetentionBytes, settings.retention_bytes, config.retention_bytes),
        compression,
    ]
}

/// `name`'s settings, partitions, segments and consumers.
pub fn describe(shared: &Shared, name: &str) -> Result<TopicDescription, LogError> {
    let log = shared.ingest.log();
    let topic = log.topic(name).ok_or_else(|| LogError::UnknownTopic(name.to_owned()))?;
    let settings_error = topic.settings_error();
    let settings = values(&topic.settings(), settings_error.is_some(), log.config(), default_codec(shared));
    let partitions = topic
        .partitions()
        .iter()
        .map(|p| {
            let info = p.info();
            Ok(PartitionDetail {
                start_offset: info.start_offset,
                end_offset: info.end_offset,
                size_bytes: info.size_bytes,
                segments: u32::try_from(info.segments).unwrap_or(u32::MAX),
                oldest_segment_ms: p.oldest_segment_written_ms()?,
                consumers: p
                    .consumers()
                    .into_iter()
                    .map(|(name, committed_offset)| ConsumerOffset { name, committed_offset })
                    .collect(),
            })
        })
        .collect::<Result<Vec<_>, LogError>>()?;
    Ok(TopicDescription {
        name: topic.name().to_owned(),
        created_ms: topic.created_ms(),
        settings,
        settings_error,
        partitions,
    })
}

/// A setting's value as JSON: a codec by name, numbers as they are.
pub fn value_json(v: &SettingValue) -> Value {
    match v.setting {
        Setting::Compression => {
            json!(u8::try_from(v.value)
                .ok()
                .and_then(Codec::from_id)
                .map_or_else(|| v.value.to_string(), |c| c.to_string()))
        }
        _ => json!(v.value),
    }
}

/// Settings as JSON: `{"retention_ms": {"value": 1000, "source": "topic"}, …}`.
pub fn settings_json(values: &[SettingValue]) -> Value {
    let fields = values
        .iter()
        .map(|v| (v.setting.name().to_owned(), json!({"value": value_json(v), "source": v.source.name()})))
        .collect::<serde_json::Map<_, _>>();
    Value::Object(fields)
}

/// A topic's description as JSON (`GET /v1/topics/{topic}`, `flowgate topics describe
/// --json`): settings, partitions with their offsets, segments and consumers, the totals,
/// and each consumer's lag over all partitions.
pub fn description_json(d: &TopicDescription) -> Value {
    let mut consumers: std::collections::BTreeMap<&str, (u64, usize)> = Default::default();
    let partitions: Vec<Value> = d
        .partitions
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let partition_consumers: Vec<Value> = p
                .consumers
                .iter()
                .map(|c| {
                    let lag = p.end_offset.saturating_sub(c.committed_offset);
                    let total = consumers.entry(&c.name).or_default();
                    total.0 = total.0.saturating_add(lag);
                    total.1 += 1;
                    json!({"name": c.name, "committed_offset": c.committed_offset, "lag": lag})
                })
                .collect();
            json!({
                "partition": i,
                "start_offset": p.start_offset,
                "end_offset": p.end_offset,
                "events": p.end_offset.saturating_sub(p.start_offset),
                "size_bytes": p.size_bytes,
                "segments": p.segments,
                "oldest_segment_ms": p.oldest_segment_ms,
                "consumers": partition_consumers,
            })
        })
        .collect();
    let sum = |f: fn(&PartitionDetail) -> u64| d.partitions.iter().map(f).fold(0u64, u64::saturating_add);
    json!({
        "name": d.name,
        "created_ms": d.created_ms,
        "settings": settings_json(&d.settings),
        "settings_error": d.settings_error,
        "partitions": partitions,
        "events": sum(|p| p.end_offset.saturating_sub(p.start_offset)),
        "size_bytes": sum(|p| p.size_bytes),
        "segments": sum(|p| u64::from(p.segments)),
        "consumers": consumers
            .into_iter()
            .map(|(name, (lag, partitions))| json!({"name": name, "lag": lag, "partitions": partitions}))
            .collect::<Vec<_>>(),
    })
}
