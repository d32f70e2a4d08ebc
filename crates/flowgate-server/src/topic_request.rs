//! Parsers of the topic API's untrusted input: the JSON bodies of `POST /v1/topics` and
//! `PATCH /v1/topics/{topic}`, the query of `GET /v1/topics/{topic}/events`, and the
//! settings of CREATE_TOPIC and ALTER_TOPIC of either API. Pure functions without I/O,
//! so the listeners, property tests and a fuzz target (`fuzz/`) share exactly this code.

use flowgate_core::Codec;
use flowgate_log::settings::check_number;
use flowgate_log::{Change, SettingsChange};
use flowgate_protocol::{Setting, SettingUpdate};
use serde_json::{Map, Value};

/// Largest body of a topic request: a name and a few settings fit many times over.
pub const MAX_BODY_BYTES: usize = 64 * 1024;

/// Events one read answers at most.
pub const MAX_READ_LIMIT: usize = 10_000;

/// What `POST /v1/topics` asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CreateBody {
    /// Topic name (checked by the log).
    pub name: String,
    /// Partitions; `None` for `log.default_partitions`.
    pub partitions: Option<u32>,
    /// The topic's own settings.
    pub settings: Vec<SettingUpdate>,
}

/// The fields a create body may have besides the settings.
const CREATE_FIELDS: &str = "name, partitions, retention_ms, retention_bytes, compression";

/// Parses the body of `POST /v1/topics`: `{"name": "orders", "partitions": 4,
/// "retention_ms": 3600000, "retention_bytes": null, "compression": "zstd"}` (all but the
/// name optional; a setting left out or null follows the default).
pub fn parse_create(body: &[u8]) -> Result<CreateBody, String> {
    let fields = object(body)?;
    let mut create = CreateBody { name: String::new(), partitions: None, settings: Vec::new() };
    let mut named = false;
    for (field, value) in &fields {
        match field.as_str() {
            "name" => {
                create.name = value.as_str().ok_or("name must be a string")?.to_owned();
                named = true;
            }
            "partitions" => {
                create.partitions = Some(
                    value
                        .as_u64()
                        .and_then(|n| u32::try_from(n).ok())
                        .filter(|n| *n > 0)
                        .ok_or("partitions must be a whole number from 1 to 10000")?,
                )
            }
            other => match setting_named(other) {
                Some(setting) => {
                    if let Some(value) = setting_value(setting, value)? {
                        create.settings.push(SettingUpdate { setting, value: Some(value) });
                    }
                }
                None => return Err(format!("unknown field '{other}'; the fields are {CREATE_FIELDS}")),
            },
        }
    }
    if !named {
        return Err("name is missing: send {\"name\": \"<topic>\", …}".to_owned());
    }
    Ok(create)
}

/// Parses the body of `PATCH /v1/topics/{topic}`, a JSON merge patch of the settings:
/// a setting with a value sets it, one with null returns it to the default, one left out
/// stays as it is.
pub fn parse_alter(body: &[u8]) -> Result<Vec<SettingUpdate>, String> {
    let fields = object(body)?;
    let mut updates = Vec::with_capacity(Setting::ALL.len());
    for (field, value) in &fields {
        match setting_named(field) {
            Some(setting) => updates.push(SettingUpdate { setting, value: setting_value(setting, value)? }),
            None if field == "partitions" => return Err(PARTITIONS_FIXED.to_owned()),
            None => {
                return Err(format!(
                    "unknown setting '{field}'; the settings are retention_ms, retention_bytes and compression"
                ))
            }
        }
    }
    Ok(updates)
}

/// Why a topic's partition count cannot change.
pub const PARTITIONS_FIXED: &str = "the partition count is fixed when a topic is created: a key's partition is \
     xxh3_64(key) % partitions, so more partitions would move keys and break their order; create a new topic \
     with more partitions and copy the events into it (a pipeline with a topic sink)";

/// The settings of a create or alter request as a change to a topic's settings, each
/// value checked: numbers at most 2^53 − 1, codec ids that exist, each setting once.
pub fn to_change(updates: &[SettingUpdate]) -> Result<SettingsChange, flowgate_log::LogError> {
    let mut change = SettingsChange::default();
    let mut seen = Vec::with_capacity(updates.len());
    for u in updates {
        if seen.contains(&u.setting) {
            return Err(flowgate_log::LogError::InvalidSetting {
                setting: u.setting.name(),
                reason: "it is given twice".to_owned(),
            });
        }
        seen.push(u.setting);
        match (u.setting, u.value) {
            (Setting::RetentionMs, value) => change.retention_ms = number_change(Setting::RetentionMs, value)?,
            (Setting::RetentionBytes, value) => change.retention_bytes = number_change(Setting::RetentionBytes, value)?,
            (Setting::Compression, None) => change.compression = Change::Unset,
            (Setting::Compression, Some(id)) => {
                let codec = u8::try_from(id).ok().and_then(Codec::from_id).ok_or_else(|| {
                    flowgate_log::LogError::InvalidSetting {
                        setting: "compression",
                        reason: format!("codec id {id} does not exist; the codecs are 0 none, 1 lz4, 2 zstd"),
                    }
                })?;
                change.compression = Change::Set(codec);
            }
        }
    }
    Ok(change)
}

fn number_change(setting: Setting, value: Option<u64>) -> Result<Change<u64>, flowgate_log::LogError> {
    match value {
        None => Ok(Change::Unset),
        Some(v) => check_number(setting.name(), v).map(|()| Change::Set(v)),
    }
}

fn object(body: &[u8]) -> Result<Map<String, Value>, String> {
    if body.len() > MAX_BODY_BYTES {
        return Err(format!("the body is over {MAX_BODY_BYTES} bytes"));
    }
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(fields)) => Ok(fields),
        Ok(_) => Err("the body must be a JSON object".to_owned()),
        Err(e) => Err(format!("the body is not JSON: {e}")),
    }
}

fn setting_named(name: &str) -> Option<Setting> {
    Setting::ALL.into_iter().find(|s| s.name() == name)
}

/// A setting's JSON value: `None` for null (the default), else its wire value (the codec
/// id for compression). Range checks are [`to_change`]'s.
fn setting_value(setting: Setting, value: &Value) -> Result<Option<u64>, String> {
    let name = setting.name();
    match (setting, value) {
        (_, Value::Null) => Ok(None),
        (Setting::Compression, Value::String(codec)) => match Codec::parse(codec) {
            Some(c) => Ok(Some(c as u64)),
            None => {
                Err(format!("compression '{codec}' does not exist; use none, lz4 or zstd, or null for the default"))
            }
        },
        (Setting::Compression, _) => Err("compression must be none, lz4 or zstd, or null for the default".to_owned()),
        (_, Value::Number(n)) => match n.as_u64() {
            Some(v) => Ok(Some(v)),
            None if n.as_i64().is_some() => Err(format!("{name} must not be negative (0 means no limit); got {n}")),
            None => Err(format!("{name} must be a whole number from 0 to 9007199254740991; got {n}")),
        },
        _ => Err(format!("{name} must be a number (0 means no limit), or null for the default")),
    }
}

/// Where a read starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReadFrom {
    /// The first offset held.
    Earliest,
    /// The log end: nothing yet.
    Latest,
    /// This offset.
    Offset(u64),
}

/// How a read answers each event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReadFormat {
    /// `offset`, `timestamp`, `key` (as text) and `payload`.
    Payload,
    /// The whole stored event, as `flowgate tail --format json` prints it.
    Envelope,
}

/// The query of `GET /v1/topics/{topic}/events`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReadParams {
    /// Where to start.
    pub from: ReadFrom,
    /// Events at most (1 to [`MAX_READ_LIMIT`]; larger asks are cut to it).
    pub limit: usize,
    /// The partition.
    pub partition: u32,
    /// How each event is answered.
    pub format: ReadFormat,
    /// Only the events with this key.
    pub key: Option<Vec<u8>>,
}

/// Parses the query parameters of a read (each as given, `None` when absent).
pub fn parse_read(
    from: Option<&str>,
    limit: Option<&str>,
    partition: Option<&str>,
    format: Option<&str>,
    key: Option<&str>,
) -> Result<ReadParams, String> {
    let from = match from {
        None | Some("earliest") => ReadFrom::Earliest,
        Some("latest") => ReadFrom::Latest,
        Some(s) => ReadFrom::Offset(s.parse().map_err(|_| "from must be an offset, 'earliest' or 'latest'")?),
    };
    let limit = match limit {
        None => 100,
        // Digits only; more than a u64 holds is as much a "more than the most" as any.
        Some(s) if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) => s
            .parse::<u64>()
            .map_or(MAX_READ_LIMIT, |n| usize::try_from(n).unwrap_or(MAX_READ_LIMIT))
            .clamp(1, MAX_READ_LIMIT),
        Some(_) => return Err(format!("limit must be a number of events from 1 to {MAX_READ_LIMIT}")),
    };
    let partition = match partition {
        None => 0,
        Some(s) => s.parse().map_err(|_| "partition must be a partition number (0, 1, …)")?,
    };
    let format = match format {
        None | Some("payload") => ReadFormat::Payload,
        Some("envelope") => ReadFormat::Envelope,
        Some(_) => return Err("format must be 'payload' (the default) or 'envelope'".to_owned()),
    };
    Ok(ReadParams { from, limit, partition, format, key: key.map(|k| k.as_bytes().to_vec()) })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn create_bodies() {
        let c = parse_create(
            br#"{"name":"t","partitions":3,"retention_ms":1000,"compression":"zstd","retention_bytes":null}"#,
        )
        .unwrap();
        assert_eq!(c.name, "t");
        assert_eq!(c.partitions, Some(3));
        let mut settings = c.settings.clone();
        settings.sort_by_key(|u| u.setting as u8);
        assert_eq!(
            settings,
            [
                SettingUpdate { setting: Setting::RetentionMs, value: Some(1000) },
                SettingUpdate { setting: Setting::Compression, value: Some(Codec::Zstd as u64) },
            ]
        );
        for (body, error) in [
            (&br#"{"partitions":3}"#[..], "name is missing"),
            (br#"{"name":"t","partitions":0}"#, "partitions must be"),
            (br#"{"name":"t","partitions":-1}"#, "partitions must be"),
            (br#"{"name":"t","retention_ms":-5}"#, "must not be negative"),
            (br#"{"name":"t","retention_ms":1.5}"#, "whole number"),
            (br#"{"name":"t","retention_ms":1e300}"#, "whole number"),
            (br#"{"name":"t","retention_ms":"1h"}"#, "must be a number"),
            (br#"{"name":"t","compression":"brotli"}"#, "'brotli' does not exist"),
            (br#"{"name":"t","retention":5}"#, "unknown field 'retention'"),
            (br#"["t"]"#, "JSON object"),
            (br#"{"name":"t""#, "not JSON"),
        ] {
            let err = parse_create(body).unwrap_err();
            assert!(err.contains(error), "{}: {err}", String::from_utf8_lossy(body));
        }
    }

    #[test]
    fn alter_bodies_are_merge_patches() {
        let updates = parse_alter(br#"{"retention_ms":null,"retention_bytes":5}"#).unwrap();
        let change = to_change(&updates).unwrap();
        assert_eq!(change.retention_ms, Change::Unset);
        assert_eq!(change.retention_bytes, Change::Set(5));
        assert_eq!(change.compression, Change::Keep);
        assert_eq!(to_change(&parse_alter(b"{}").unwrap()).unwrap(), SettingsChange::default());
        assert!(parse_alter(br#"{"partitions":8}"#).unwrap_err().contains("fixed when a topic is created"));
        assert!(parse_alter(br#"{"name":"x"}"#).unwrap_err().contains("unknown setting 'name'"));
        let err = to_change(&parse_alter(br#"{"retention_bytes":9007199254740992}"#).unwrap()).unwrap_err();
        assert!(err.to_string().contains("retention_bytes") && err.to_string().contains("2^53"), "{err}");
    }

    #[test]
    fn wire_settings_are_checked() {
        let dup = [SettingUpdate { setting: Setting::RetentionMs, value: Some(1) }; 2];
        assert!(to_change(&dup).unwrap_err().to_string().contains("twice"));
        let codec = [SettingUpdate { setting: Setting::Compression, value: Some(7) }];
        assert!(to_change(&codec).unwrap_err().to_string().contains("codec id 7"));
        let huge = [SettingUpdate { setting: Setting::Compression, value: Some(u64::MAX) }];
        assert!(to_change(&huge).is_err());
    }

    #[test]
    fn read_queries() {
        let p = parse_read(None, None, None, None, None).unwrap();
        assert_eq!(
            p,
            ReadParams { from: ReadFrom::Earliest, limit: 100, partition: 0, format: ReadFormat::Payload, key: None }
        );
        let p = parse_read(Some("17"), Some("99999999999999999999"), Some("2"), Some("envelope"), Some("k")).unwrap();
        assert_eq!(p.from, ReadFrom::Offset(17));
        assert_eq!(p.limit, MAX_READ_LIMIT, "a large limit is cut");
        assert_eq!((p.partition, p.format, p.key), (2, ReadFormat::Envelope, Some(b"k".to_vec())));
        assert_eq!(parse_read(None, Some("0"), None, None, None).unwrap().limit, 1);
        assert!(parse_read(Some("-1"), None, None, None, None).unwrap_err().contains("from must be"));
        assert!(parse_read(None, Some("-1"), None, None, None).unwrap_err().contains("limit must be"));
        assert!(parse_read(None, None, Some("4294967296"), None, None).unwrap_err().contains("partition"));
        assert!(parse_read(None, None, None, Some("xml"), None).unwrap_err().contains("format must be"));
    }

    proptest! {
        #[test]
        fn bodies_never_panic_and_settings_stay_bounded(body in proptest::collection::vec(any::<u8>(), 0..200)) {
            if let Ok(c) = parse_create(&body) {
                prop_assert!(c.settings.len() <= Setting::ALL.len());
            }
            if let Ok(updates) = parse_alter(&body) {
                prop_assert!(updates.len() <= Setting::ALL.len());
                let _ = to_change(&updates);
            }
        }

        #[test]
        fn every_number_is_accepted_or_refused_by_its_bound(v in any::<u64>(), negative in any::<i64>()) {
            let body = format!(r#"{{"retention_ms":{v}}}"#);
            let result = to_change(&parse_alter(body.as_bytes()).unwrap());
            prop_assert_eq!(result.is_ok(), v <= flowgate_log::settings::MAX_SETTING_VALUE);
            let body = format!(r#"{{"retention_bytes":{negative}}}"#);
            prop_assert_eq!(parse_alter(body.as_bytes()).is_ok(), negative >= 0);
        }

        #[test]
        fn queries_never_panic(a in ".{0,30}", b in ".{0,30}", c in ".{0,30}", d in ".{0,30}") {
            if let Ok(p) = parse_read(Some(&a), Some(&b), Some(&c), Some(&d), Some(&a)) {
                prop_assert!((1..=MAX_READ_LIMIT).contains(&p.limit));
            }
        }
    }
}
