//! A topic's own settings — retention and the codec of the batches the server encodes
//! for it — and their file, `settings.json` beside `topic.json`.
//!
//! A setting a topic does not set follows the default (the `[log]` config for
//! retention; for compression, whatever the writer would use without it). The file is
//! JSON with a CRC32C of the settings, so a torn or damaged file is told from a good
//! one; `docs/log-format.md` says what happens then.

use std::io::Read;
use std::path::Path;

use flowgate_core::Codec;
use serde::{Deserialize, Serialize};

use crate::config::LogConfig;
use crate::error::{LogError, Result};

/// The settings file in a topic's directory.
pub const SETTINGS_FILE: &str = "settings.json";

/// Largest value of a numeric setting: 2^53 − 1, the largest integer every JSON reader
/// (JavaScript's numbers included) holds exactly, about 285,000 years in ms and 8 PiB.
pub const MAX_SETTING_VALUE: u64 = (1 << 53) - 1;

/// A settings file past this is not read: it cannot be one the log wrote.
const MAX_FILE_BYTES: u64 = 64 * 1024;

/// The version of the file format this code writes and reads.
const FORMAT_VERSION: u32 = 1;

/// What a topic sets for itself; `None` follows the default.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TopicSettings {
    /// Delete sealed segments last written more than this many ms ago (0 = never by age).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retention_ms: Option<u64>,
    /// Delete old sealed segments while a partition holds more than this many bytes
    /// without them (0 = no limit). Per partition, as `log.retention_bytes`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retention_bytes: Option<u64>,
    /// The codec of every batch the server encodes for this topic (client-encoded
    /// batches keep their own).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compression: Option<Codec>,
}

/// A change to one setting.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Change<T> {
    /// Leave it as it is.
    #[default]
    Keep,
    /// Set the topic's own value.
    Set(T),
    /// Drop the topic's own value: follow the default again.
    Unset,
}

impl<T: Copy> Change<T> {
    fn apply(self, current: Option<T>) -> Option<T> {
        match self {
            Change::Keep => current,
            Change::Set(v) => Some(v),
            Change::Unset => None,
        }
    }
}

/// A change to a topic's settings, setting by setting.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SettingsChange {
    /// `retention_ms`.
    pub retention_ms: Change<u64>,
    /// `retention_bytes`.
    pub retention_bytes: Change<u64>,
    /// `compression`.
    pub compression: Change<Codec>,
}

impl SettingsChange {
    /// True when every setting is given (set or unset), so the result does not depend on
    /// what the topic had.
    pub fn sets_everything(&self) -> bool {
        !matches!(self.retention_ms, Change::Keep)
            && !matches!(self.retention_bytes, Change::Keep)
            && !matches!(self.compression, Change::Keep)
    }
}

/// The retention limits of one partition.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Retention {
    /// Bytes a partition keeps at least before its oldest segments go (0 = no limit).
    pub bytes: u64,
    /// Age past which a sealed segment goes (0 = never).
    pub ms: u64,
}

impl TopicSettings {
    /// True when the topic sets nothing of its own.
    pub fn is_empty(&self) -> bool {
        *self == TopicSettings::default()
    }

    /// Checks every value: numbers at most [`MAX_SETTING_VALUE`].
    pub fn validate(&self) -> Result<()> {
        for (setting, value) in [("retention_ms", self.retention_ms), ("retention_bytes", self.retention_bytes)] {
            if let Some(v) = value {
                check_number(setting, v)?;
            }
        }
        Ok(())
    }

    /// These settings with `change` applied.
    pub fn apply(&self, change: &SettingsChange) -> TopicSettings {
        TopicSettings {
            retention_ms: change.retention_ms.apply(self.retention_ms),
            retention_bytes: change.retention_bytes.apply(self.retention_bytes),
            compression: change.compression.apply(self.compression),
        }
    }

    /// The limits retention applies: the topic's own, else the log's.
    pub fn retention(&self, config: &LogConfig) -> Retention {
        Retention {
            bytes: self.retention_bytes.unwrap_or(config.retention_bytes),
            ms: self.retention_ms.unwrap_or(config.retention_ms),
        }
    }

    /// `name=value` for each setting that differs between `self` and `after` (`default`
    /// for one that follows the default), for log lines.
    pub fn describe_change(&self, after: &TopicSettings) -> String {
        fn show<T: std::fmt::Display>(v: Option<T>) -> String {
            v.map_or_else(|| "default".to_owned(), |v| v.to_string())
        }
        let mut parts = Vec::new();
        if self.retention_ms != after.retention_ms {
            parts.push(format!("retention_ms {} -> {}", show(self.retention_ms), show(after.retention_ms)));
        }
        if self.retention_bytes != after.retention_bytes {
            parts.push(format!("retention_bytes {} -> {}", show(self.retention_bytes), show(after.retention_bytes)));
        }
        if self.compression != after.compression {
            parts.push(format!("compression {} -> {}", show(self.compression), show(after.compression)));
        }
        if parts.is_empty() {
            "nothing".to_owned()
        } else {
            parts.join(", ")
        }
    }

    /// The bytes of the settings file.
    pub(crate) fn to_file(self) -> Vec<u8> {
        let settings = serde_json::to_string(&self).expect("settings serialize");
        let crc = flowgate_core::batch::crc32c_bytes(settings.as_bytes());
        format!("{{\"version\":{FORMAT_VERSION},\"settings\":{settings},\"crc32c\":{crc}}}\n").into_bytes()
    }

    /// Parses and checks the bytes of a settings file.
    pub fn from_file(bytes: &[u8]) -> std::result::Result<TopicSettings, String> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Stored {
            version: u32,
            settings: TopicSettings,
            crc32c: u32,
        }
        let stored: Stored = serde_json::from_slice(bytes).map_err(|e| format!("not a settings file: {e}"))?;
        if stored.version != FORMAT_VERSION {
            return Err(format!(
                "format version {} is not {FORMAT_VERSION}; a newer flowgate wrote it",
                stored.version
            ));
        }
        // The checksum covers the settings as this code serializes them, so whitespace
        // does not matter but every value does.
        let canonical = serde_json::to_string(&stored.settings).expect("settings serialize");
        let crc = flowgate_core::batch::crc32c_bytes(canonical.as_bytes());
        if crc != stored.crc32c {
            return Err(format!("checksum mismatch (stored {}, computed {crc}): the file is damaged", stored.crc32c));
        }
        stored.settings.validate().map_err(|e| e.to_string())?;
        Ok(stored.settings)
    }
}

impl std::fmt::Display for TopicSettings {
    /// `retention_ms=3600000, compression=zstd`: the settings the topic sets, or `none`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut parts = Vec::with_capacity(3);
        if let Some(v) = self.retention_ms {
            parts.push(format!("retention_ms={v}"));
        }
        if let Some(v) = self.retention_bytes {
            parts.push(format!("retention_bytes={v}"));
        }
        if let Some(c) = self.compression {
            parts.push(format!("compression={c}"));
        }
        if parts.is_empty() {
            f.write_str("none")
        } else {
            f.write_str(&parts.join(", "))
        }
    }
}

/// Checks one numeric setting's value.
pub fn check_number(setting: &'static str, value: u64) -> Result<()> {
    if value > MAX_SETTING_VALUE {
        return Err(LogError::InvalidSetting {
            setting,
            reason: format!("{value} is over the largest allowed value, {MAX_SETTING_VALUE} (2^53 - 1)"),
        });
    }
    Ok(())
}

/// A topic's settings as read from its directory: its own, or why they could not be read.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Loaded {
    pub settings: TopicSettings,
    pub error: Option<String>,
}

/// Reads `dir/settings.json`. No file means no settings of its own (a topic created
/// before topics had settings, or one that never set any). A file that cannot be read,
/// parsed or verified gives [`Loaded::error`] and is left as it is.
pub(crate) fn load(dir: &Path) -> Loaded {
    let path = dir.join(SETTINGS_FILE);
    let bytes = match read_bounded(&path) {
        Ok(Some(bytes)) => bytes,
        Ok(None) => return Loaded::default(),
        Err(reason) => return Loaded { settings: TopicSettings::default(), error: Some(reason) },
    };
    match TopicSettings::from_file(&bytes) {
        Ok(settings) => Loaded { settings, error: None },
        Err(reason) => Loaded { settings: TopicSettings::default(), error: Some(reason) },
    }
}

fn read_bounded(path: &Path) -> std::result::Result<Option<Vec<u8>>, String> {
    let file = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("cannot open it: {e}")),
    };
    let mut bytes = Vec::new();
    file.take(MAX_FILE_BYTES + 1).read_to_end(&mut bytes).map_err(|e| format!("cannot read it: {e}"))?;
    if bytes.len() as u64 > MAX_FILE_BYTES {
        return Err(format!("it is larger than {MAX_FILE_BYTES} bytes"));
    }
    Ok(Some(bytes))
}

/// Writes `dir/settings.json` atomically (temporary file, fsync, rename, fsync of the
/// directory); settings with nothing of their own remove the file instead.
pub(crate) fn store(dir: &Path, settings: &TopicSettings) -> Result<()> {
    let path = dir.join(SETTINGS_FILE);
    if settings.is_empty() {
        match std::fs::remove_file(&path) {
            Ok(()) => return crate::partition::sync_dir(dir),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(LogError::Io { action: "remove", path, source: e }),
        }
    }
    crate::index::write_file_atomic(&path, &settings.to_file())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn codec() -> impl Strategy<Value = Option<Codec>> {
        prop_oneof![Just(None), Just(Some(Codec::None)), Just(Some(Codec::Lz4)), Just(Some(Codec::Zstd))]
    }

    fn settings() -> impl Strategy<Value = TopicSettings> {
        (proptest::option::of(0..=MAX_SETTING_VALUE), proptest::option::of(0..=MAX_SETTING_VALUE), codec()).prop_map(
            |(retention_ms, retention_bytes, compression)| TopicSettings { retention_ms, retention_bytes, compression },
        )
    }

    proptest! {
        #[test]
        fn files_round_trip(s in settings()) {
            prop_assert_eq!(TopicSettings::from_file(&s.to_file()), Ok(s));
        }

        #[test]
        fn any_changed_byte_is_caught_or_harmless(s in settings(), at in any::<prop::sample::Index>(), to in any::<u8>()) {
            let mut file = s.to_file();
            let i = at.index(file.len());
            prop_assume!(file[i] != to);
            file[i] = to;
            // Either refused, or a change that kept the same settings (whitespace).
            if let Ok(read) = TopicSettings::from_file(&file) {
                prop_assert_eq!(read, s);
            }
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = TopicSettings::from_file(&bytes);
        }

        #[test]
        fn every_cut_is_caught(s in settings(), at in any::<prop::sample::Index>()) {
            let file = s.to_file();
            // Cut anywhere before the closing brace: a torn write.
            let cut = at.index(file.len() - 1);
            prop_assert!(TopicSettings::from_file(&file[..cut]).is_err());
        }
    }

    #[test]
    fn values_past_the_bound_are_refused_in_files_and_requests() {
        let big = TopicSettings { retention_ms: Some(MAX_SETTING_VALUE + 1), ..Default::default() };
        assert!(big.validate().unwrap_err().to_string().contains("retention_ms"));
        assert!(TopicSettings::from_file(&big.to_file()).unwrap_err().contains("largest allowed"));
    }

    #[test]
    fn files_from_a_newer_format_or_with_unknown_fields_are_refused() {
        let s = TopicSettings { retention_ms: Some(5), ..Default::default() };
        let newer = String::from_utf8(s.to_file()).unwrap().replace("\"version\":1", "\"version\":2");
        assert!(TopicSettings::from_file(newer.as_bytes()).unwrap_err().contains("newer flowgate"));
        let unknown = br#"{"version":1,"settings":{"retention_days":5},"crc32c":0}"#;
        assert!(TopicSettings::from_file(unknown).unwrap_err().contains("retention_days"));
    }

    #[test]
    fn changes_keep_set_and_unset() {
        let s = TopicSettings { retention_ms: Some(1), retention_bytes: Some(2), compression: None };
        let change = SettingsChange {
            retention_ms: Change::Unset,
            retention_bytes: Change::Keep,
            compression: Change::Set(Codec::Zstd),
        };
        let after = s.apply(&change);
        assert_eq!(
            after,
            TopicSettings { retention_ms: None, retention_bytes: Some(2), compression: Some(Codec::Zstd) }
        );
        assert_eq!(s.describe_change(&after), "retention_ms 1 -> default, compression default -> zstd");
        assert_eq!(after.to_string(), "retention_bytes=2, compression=zstd");
        assert_eq!(TopicSettings::default().to_string(), "none");
    }

    #[test]
    fn a_missing_file_is_no_settings_and_a_damaged_one_an_error() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(load(dir.path()), Loaded::default());
        let s = TopicSettings { retention_bytes: Some(77), ..Default::default() };
        store(dir.path(), &s).unwrap();
        assert_eq!(load(dir.path()).settings, s);
        std::fs::write(dir.path().join(SETTINGS_FILE), b"{\"version\":1,\"sett").unwrap();
        let loaded = load(dir.path());
        assert_eq!(loaded.settings, TopicSettings::default());
        assert!(loaded.error.unwrap().contains("not a settings file"));
        store(dir.path(), &TopicSettings::default()).unwrap();
        assert!(!dir.path().join(SETTINGS_FILE).exists());
    }
}
