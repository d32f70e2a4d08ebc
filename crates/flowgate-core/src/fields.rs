//! An event's key, time and client id read from its own JSON, for the producers that
//! cannot set them per record (HTTP and NDJSON ingest, `flowgate send`): one
//! implementation, so every path stores the same values for the same event.
//!
//! [`FieldSpec::extract`] reads an event (untrusted bytes) in one pass without building
//! it: it walks the top-level object, and only the objects a dotted path reaches into,
//! borrowing the raw text of the values it wants and skipping every other value. It
//! validates the whole event as [`serde_json`] does, so it can stand in for a validity
//! check. A string is copied only when it holds escapes.
//!
//! What a field may hold:
//!
//! | field | accepted | stored |
//! |---|---|---|
//! | key, client id | a string; a number | the string's UTF-8 bytes; the number's text as written (`42`, `1.5e3`) |
//! | timestamp, unit `ms`/`s`/`us` | a number | ms since the epoch ([`crate::timestamp::number_to_ms`]) |
//! | timestamp, unit `rfc3339` | a string | ms since the epoch ([`crate::timestamp::parse_rfc3339`]) |
//!
//! A field that is absent, or `null`, gives nothing (the caller then stores no key, the
//! ingest time, no client id). Any other value is a [`FieldError`].

use std::borrow::Cow;
use std::fmt;

use serde::de::{self, DeserializeSeed, Deserializer as _, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde_json::value::RawValue;

use crate::timestamp::{self, TimestampUnit};

/// Longest field path, in bytes.
pub const MAX_PATH_BYTES: usize = 256;

/// Most names a field path may hold.
pub const MAX_PATH_SEGMENTS: usize = 16;

/// Where a value sits in an event: field names joined by `.`, each name one level deeper
/// (`device.id` is the field `id` of the object in the top-level field `device`), as in
/// pipeline processors. A field whose own name holds a `.` cannot be named.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldPath {
    text: Box<str>,
    segments: Box<[Box<str>]>,
}

impl FieldPath {
    /// A path from its text: 1 to [`MAX_PATH_BYTES`] bytes, at most
    /// [`MAX_PATH_SEGMENTS`] names, none empty.
    pub fn parse(text: &str) -> Result<FieldPath, String> {
        if text.is_empty() {
            return Err("is empty; name a field, such as `device` or `meta.device`".into());
        }
        if text.len() > MAX_PATH_BYTES {
            return Err(format!("is {} bytes long; a field path has at most {MAX_PATH_BYTES}", text.len()));
        }
        let segments: Box<[Box<str>]> = text.split('.').map(Box::from).collect();
        if segments.len() > MAX_PATH_SEGMENTS {
            return Err(format!("has {} levels; a field path has at most {MAX_PATH_SEGMENTS}", segments.len()));
        }
        if segments.iter().any(|s| s.is_empty()) {
            return Err("has an empty name (a leading, trailing or doubled `.`)".into());
        }
        Ok(FieldPath { text: text.into(), segments })
    }

    /// The path as written.
    pub fn as_str(&self) -> &str {
        &self.text
    }
}

impl fmt::Display for FieldPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

/// Which fields to read from each event.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FieldSpec {
    /// The key's field.
    pub key: Option<FieldPath>,
    /// The event time's field.
    pub timestamp: Option<FieldPath>,
    /// How the event time is written.
    pub timestamp_unit: TimestampUnit,
    /// The client id's field.
    pub client_id: Option<FieldPath>,
}

/// What one event's fields hold; `None` where a field is absent or `null`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Fields<'a> {
    /// The key.
    pub key: Option<Cow<'a, [u8]>>,
    /// The event time, ms since the epoch.
    pub timestamp: Option<i64>,
    /// The client id.
    pub client_id: Option<Cow<'a, [u8]>>,
}

/// Which part of an event was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FieldProblem {
    /// The event is not one well-formed JSON object.
    NotAnObject,
    /// The key field holds neither a string nor a number.
    Key,
    /// The timestamp field does not hold a time in range in the configured unit.
    Timestamp,
    /// The client id field holds neither a string nor a number.
    ClientId,
}

/// Why an event's fields could not be read; the event should be refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldError {
    /// What was wrong.
    pub problem: FieldProblem,
    /// For people: the field, its value (cut short) and what it should be.
    pub message: String,
}

impl FieldError {
    /// The reason as the ingest metrics label it: `invalid_json`, `bad_key`,
    /// `bad_timestamp` or `bad_client_id`.
    pub fn reason(&self) -> &'static str {
        match self.problem {
            FieldProblem::NotAnObject => "invalid_json",
            FieldProblem::Key => "bad_key",
            FieldProblem::Timestamp => "bad_timestamp",
            FieldProblem::ClientId => "bad_client_id",
        }
    }
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for FieldError {}

/// Slots of the values [`FieldSpec::extract`] looks for.
const KEY: usize = 0;
const TIMESTAMP: usize = 1;
const CLIENT_ID: usize = 2;

/// The raw value found for each slot.
type Found<'a> = [Option<&'a RawValue>; 3];

/// The path of each slot, as names.
type Wanted<'w> = [Option<&'w [Box<str>]>; 3];

impl FieldSpec {
    /// True when no field is read.
    pub fn is_empty(&self) -> bool {
        self.key.is_none() && self.timestamp.is_none() && self.client_id.is_none()
    }

    /// Reads the configured fields of one event, which must be one JSON object.
    pub fn extract<'a>(&self, event: &'a [u8]) -> Result<Fields<'a>, FieldError> {
        let wanted: Wanted<'_> =
            [&self.key, &self.timestamp, &self.client_id].map(|p| p.as_ref().map(|p| &p.segments[..]));
        let found = scan(event, &wanted).map_err(|e| FieldError {
            problem: FieldProblem::NotAnObject,
            message: format!("not a JSON object: {e}"),
        })?;
        let key = match (&self.key, found[KEY]) {
            (Some(path), Some(raw)) => {
                text_or_number(raw).map_err(|kind| bad(FieldProblem::Key, "key", path, raw, kind))?
            }
            _ => None,
        };
        let client_id = match (&self.client_id, found[CLIENT_ID]) {
            (Some(path), Some(raw)) => {
                text_or_number(raw).map_err(|kind| bad(FieldProblem::ClientId, "client id", path, raw, kind))?
            }
            _ => None,
        };
        let timestamp = match (&self.timestamp, found[TIMESTAMP]) {
            (Some(path), Some(raw)) => time(raw, self.timestamp_unit).map_err(|why| FieldError {
                problem: FieldProblem::Timestamp,
                message: format!("timestamp field `{path}` ({}): {why}", snippet(raw.get())),
            })?,
            _ => None,
        };
        Ok(Fields { key, timestamp, client_id })
    }
}

fn bad(problem: FieldProblem, what: &str, path: &FieldPath, raw: &RawValue, kind: &str) -> FieldError {
    FieldError {
        problem,
        message: format!("{what} field `{path}` is {kind} ({}); it must be a string or a number", snippet(raw.get())),
    }
}

/// The start of a value, for messages: at most 40 characters.
fn snippet(text: &str) -> Cow<'_, str> {
    match text.char_indices().nth(40) {
        None => Cow::Borrowed(text),
        Some((end, _)) => Cow::Owned(format!("{}…", &text[..end])),
    }
}

/// What kind of JSON value a raw value is, for messages.
fn kind_of(raw: &RawValue) -> &'static str {
    match raw.get().as_bytes().first() {
        Some(b'{') => "an object",
        Some(b'[') => "an array",
        Some(b't' | b'f') => "a boolean",
        Some(b'"') => "a string",
        _ => "a number",
    }
}

/// A string's bytes or a number's text; `None` for `null`.
fn text_or_number(raw: &RawValue) -> Result<Option<Cow<'_, [u8]>>, &'static str> {
    let text = raw.get();
    match text.as_bytes().first() {
        Some(b'n') => Ok(None),
        Some(b'"') => Ok(Some(match string(text).ok_or(NOT_CHARACTERS)? {
            Cow::Borrowed(s) => Cow::Borrowed(s.as_bytes()),
            Cow::Owned(s) => Cow::Owned(s.into_bytes()),
        })),
        Some(b'-' | b'0'..=b'9') => Ok(Some(Cow::Borrowed(text.as_bytes()))),
        _ => Err(kind_of(raw)),
    }
}

/// What a string is whose `\\u` escapes name no character (a lone surrogate).
const NOT_CHARACTERS: &str = "a string with an escape that is no character (a lone surrogate)";

/// The value of a raw JSON string, borrowed unless it holds escapes; `None` when an
/// escape names no character (the event scan skips strings without checking that).
fn string(raw: &str) -> Option<Cow<'_, str>> {
    let inner = &raw[1..raw.len() - 1];
    if !inner.contains('\\') {
        return Some(Cow::Borrowed(inner));
    }
    serde_json::from_str::<String>(raw).ok().map(Cow::Owned)
}

/// The event time in a raw value; `None` for `null`.
fn time(raw: &RawValue, unit: TimestampUnit) -> Result<Option<i64>, String> {
    let text = raw.get();
    let first = text.as_bytes().first();
    if first == Some(&b'n') {
        return Ok(None);
    }
    let parsed = match (unit, first) {
        (TimestampUnit::Rfc3339, Some(b'"')) => match string(text) {
            Some(s) => timestamp::parse_rfc3339(&s),
            None => return Err(format!("is {NOT_CHARACTERS}")),
        },
        (TimestampUnit::Rfc3339, _) => {
            return Err(format!(
                "is {}; timestamp_unit rfc3339 takes a string such as \"2026-11-24T10:00:00Z\"",
                kind_of(raw)
            ))
        }
        (_, Some(b'-' | b'0'..=b'9')) => timestamp::number_to_ms(text, unit),
        (unit, _) => return Err(format!("is {}; timestamp_unit {unit} takes a JSON number", kind_of(raw))),
    };
    parsed.map(Some).map_err(|e| e.to_string())
}

/// The raw values at the `wanted` paths in `event`, which must be one JSON object.
fn scan<'a>(event: &'a [u8], wanted: &Wanted<'_>) -> Result<Found<'a>, serde_json::Error> {
    let mut found: Found<'a> = [None; 3];
    let active = (0..3).filter(|&i| wanted[i].is_some()).fold(0u8, |m, i| m | 1 << i);
    let mut de = serde_json::Deserializer::from_slice(event);
    // `deserialize_map` refuses anything but an object at the top.
    (&mut de).deserialize_map(Level { wanted, depth: 0, active, found: &mut found })?;
    de.end()?;
    Ok(found)
}

/// The slots whose bit is set in `mask`.
fn slots(mask: u8) -> impl Iterator<Item = usize> {
    (0..3).filter(move |i| mask & (1 << i) != 0)
}

/// One object on the way to the wanted values: the paths of the slots in `active`
/// matched every name above `depth`.
struct Level<'w, 'o, 'a> {
    wanted: &'w Wanted<'w>,
    depth: usize,
    active: u8,
    found: &'o mut Found<'a>,
}

impl<'de> Visitor<'de> for Level<'_, '_, 'de> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let (wanted, depth, active) = (self.wanted, self.depth, self.active);
        while let Some(matched) = map.next_key_seed(KeyMatch { wanted, depth, active })? {
            if matched == 0 {
                map.next_value::<IgnoredAny>()?;
                continue;
            }
            let ending =
                slots(matched).filter(|&i| wanted[i].is_some_and(|p| p.len() == depth + 1)).fold(0, |m, i| m | 1 << i);
            let deeper = matched & !ending;
            // With duplicate names the last one wins, as when the event is parsed whole.
            for i in slots(deeper) {
                self.found[i] = None;
            }
            if deeper == 0 {
                let raw: &'de RawValue = map.next_value()?;
                for i in slots(ending) {
                    self.found[i] = Some(raw);
                }
            } else if ending == 0 {
                map.next_value_seed(Level { wanted, depth: depth + 1, active: deeper, found: &mut *self.found })?;
            } else {
                // One path ends here and another goes on into the same value (`a` and
                // `a.b`): keep it whole, then look inside it.
                let raw: &'de RawValue = map.next_value()?;
                for i in slots(ending) {
                    self.found[i] = Some(raw);
                }
                let mut inner = serde_json::Deserializer::from_str(raw.get());
                let level = Level { wanted, depth: depth + 1, active: deeper, found: &mut *self.found };
                (&mut inner).deserialize_any(level).map_err(de::Error::custom)?;
            }
        }
        Ok(())
    }

    // Below the top, a value that is not an object holds none of the wanted fields.
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(())
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<(), E> {
        Ok(())
    }

    fn visit_i64<E: de::Error>(self, _: i64) -> Result<(), E> {
        Ok(())
    }

    fn visit_u64<E: de::Error>(self, _: u64) -> Result<(), E> {
        Ok(())
    }

    fn visit_f64<E: de::Error>(self, _: f64) -> Result<(), E> {
        Ok(())
    }

    fn visit_str<E: de::Error>(self, _: &str) -> Result<(), E> {
        Ok(())
    }

    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        Ok(())
    }
}

impl<'de> DeserializeSeed<'de> for Level<'_, '_, 'de> {
    type Value = ();

    fn deserialize<D: serde::Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_any(self)
    }
}

/// Reads one object key and answers which active paths name it at this depth, without
/// keeping it (an escaped key is compared in the parser's scratch buffer).
struct KeyMatch<'w> {
    wanted: &'w Wanted<'w>,
    depth: usize,
    active: u8,
}

impl<'de> Visitor<'de> for KeyMatch<'_> {
    type Value = u8;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an object key")
    }

    fn visit_str<E: de::Error>(self, key: &str) -> Result<u8, E> {
        Ok(slots(self.active)
            .filter(|&i| self.wanted[i].and_then(|p| p.get(self.depth)).is_some_and(|name| &**name == key))
            .fold(0, |m, i| m | 1 << i))
    }
}

impl<'de> DeserializeSeed<'de> for KeyMatch<'_> {
    type Value = u8;

    fn deserialize<D: serde::Deserializer<'de>>(self, deserializer: D) -> Result<u8, D::Error> {
        deserializer.deserialize_str(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::Value;

    fn spec(key: Option<&str>, ts: Option<&str>, unit: TimestampUnit, client_id: Option<&str>) -> FieldSpec {
        let path = |p: Option<&str>| p.map(|p| FieldPath::parse(p).unwrap());
        FieldSpec { key: path(key), timestamp: path(ts), timestamp_unit: unit, client_id: path(client_id) }
    }

    fn key_of(spec: &FieldSpec, event: &str) -> Result<Option<Vec<u8>>, &'static str> {
        spec.extract(event.as_bytes()).map(|f| f.key.map(Cow::into_owned)).map_err(|e| e.reason())
    }

    #[test]
    fn paths_are_checked() {
        assert_eq!(FieldPath::parse("device").unwrap().as_str(), "device");
        assert_eq!(FieldPath::parse("meta.device.id").unwrap().segments.len(), 3);
        for bad in ["", ".", "a.", ".a", "a..b"] {
            assert!(FieldPath::parse(bad).is_err(), "{bad:?}");
        }
        assert!(FieldPath::parse(&"a".repeat(257)).unwrap_err().contains("256"));
        assert!(FieldPath::parse(&["a"; 17].join(".")).unwrap_err().contains("16"));
    }

    #[test]
    fn keys_are_strings_or_number_text() {
        let s = spec(Some("k"), None, TimestampUnit::Ms, None);
        assert_eq!(key_of(&s, r#"{"a":[1,{"k":"no"}],"k":"dev-1"}"#), Ok(Some(b"dev-1".to_vec())));
        assert_eq!(key_of(&s, r#"{"k":42}"#), Ok(Some(b"42".to_vec())));
        assert_eq!(key_of(&s, r#"{"k":-1.5e3}"#), Ok(Some(b"-1.5e3".to_vec())));
        assert_eq!(key_of(&s, r#"{"k":"tab\there \u00e9"}"#), Ok(Some("tab\there é".as_bytes().to_vec())));
        assert_eq!(key_of(&s, r#"{"\u006b":"escaped name"}"#), Ok(Some(b"escaped name".to_vec())));
        assert_eq!(key_of(&s, r#"{"k":"first","k":"last"}"#), Ok(Some(b"last".to_vec())));
        assert_eq!(key_of(&s, r#"{"other":1}"#), Ok(None));
        assert_eq!(key_of(&s, r#"{"k":null}"#), Ok(None));
        // A lone surrogate passes the event scan but is no character: refused, never
        // stored as some other key.
        for bad in [r#"{"k":{"a":1}}"#, r#"{"k":[1]}"#, r#"{"k":true}"#, r#"{"k":"\ud800a"}"#, r#"{"k":"\udc00"}"#] {
            assert_eq!(key_of(&s, bad), Err("bad_key"), "{bad}");
        }
        let c = spec(None, Some("t"), TimestampUnit::Rfc3339, Some("id"));
        assert_eq!(c.extract(br#"{"id":"\ud800"}"#).unwrap_err().reason(), "bad_client_id");
        assert_eq!(c.extract(br#"{"t":"\ud800"}"#).unwrap_err().reason(), "bad_timestamp");
        for broken in ["[1]", "{", r#"{"k":"a"} x"#, r#"{"k":"a",}"#, "", "\"k\""] {
            assert_eq!(key_of(&s, broken), Err("invalid_json"), "{broken}");
        }
        let err = s.extract(br#"{"k":{"a":"a very long value that goes on and on and on"}}"#).unwrap_err();
        assert_eq!(
            err.message,
            r#"key field `k` is an object ({"a":"a very long value that goes on and…); it must be a string or a number"#
        );
    }

    #[test]
    fn dotted_paths_reach_into_objects_only() {
        let s = spec(Some("meta.device"), Some("meta"), TimestampUnit::Ms, Some("meta.id"));
        // `meta` is the timestamp's field and holds the others: it is an object, not a time.
        let err = s.extract(br#"{"meta":{"device":"d","id":7}}"#).unwrap_err();
        assert_eq!(err.reason(), "bad_timestamp");
        let s = spec(Some("meta.device"), Some("ts"), TimestampUnit::Ms, Some("meta.id"));
        let f = s.extract(br#"{"meta":{"x":[{"device":"no"}],"device":"d","id":7},"ts":5}"#).unwrap();
        assert_eq!(
            (f.key.as_deref(), f.timestamp, f.client_id.as_deref()),
            (Some(&b"d"[..]), Some(5), Some(&b"7"[..]))
        );
        // A later `meta` that is no object holds no device.
        let f = s.extract(br#"{"meta":{"device":"d"},"meta":[1]}"#).unwrap();
        assert_eq!(f.key, None);
        let s = spec(Some("a"), None, TimestampUnit::Ms, Some("a.b"));
        assert_eq!(s.extract(br#"{"a":{"b":"inner"}}"#).unwrap_err().reason(), "bad_key");
        let s = spec(Some("a.b"), None, TimestampUnit::Ms, Some("a"));
        let f = s.extract(br#"{"a":"x"}"#).unwrap();
        assert_eq!((f.key, f.client_id.as_deref()), (None, Some(&b"x"[..])));
        let s = spec(Some("a.b"), None, TimestampUnit::Ms, Some("a.b"));
        let f = s.extract(br#"{"a":{"b":"both"}}"#).unwrap();
        assert_eq!((f.key.as_deref(), f.client_id.as_deref()), (Some(&b"both"[..]), Some(&b"both"[..])));
    }

    #[test]
    fn timestamps_in_each_unit() {
        let at = |unit, event: &str| spec(None, Some("t"), unit, None).extract(event.as_bytes()).map(|f| f.timestamp);
        use TimestampUnit::*;
        assert_eq!(at(Ms, r#"{"t":1764547200000}"#), Ok(Some(1_764_547_200_000)));
        assert_eq!(at(S, r#"{"t":1764547200.25}"#), Ok(Some(1_764_547_200_250)));
        assert_eq!(at(Us, r#"{"t":1764547200000999}"#), Ok(Some(1_764_547_200_000)));
        assert_eq!(at(Rfc3339, r#"{"t":"2025-12-01T02:00:00+02:00"}"#), Ok(Some(1_764_547_200_000)));
        assert_eq!(at(Rfc3339, r#"{"t":"2025-12-01T00:00:00\u005a"}"#), Ok(Some(1_764_547_200_000)));
        assert_eq!(at(Ms, r#"{"t":null}"#), Ok(None));
        for (unit, event) in [
            (Ms, r#"{"t":1e300}"#),
            (Ms, r#"{"t":-1e30}"#),
            (Ms, r#"{"t":"9999999999999999999"}"#),
            (Rfc3339, r#"{"t":"not a date"}"#),
            (Rfc3339, r#"{"t":1764547200000}"#),
            (S, r#"{"t":{"s":1}}"#),
        ] {
            let err = at(unit, event).unwrap_err();
            assert_eq!(err.reason(), "bad_timestamp", "{event}");
            assert!(err.message.starts_with("timestamp field `t`"), "{}", err.message);
        }
    }

    /// What the fields hold, found by parsing the event whole: the reference the
    /// one-pass scan must agree with.
    fn reference(spec: &FieldSpec, event: &str) -> Result<Fields<'static>, &'static str> {
        let doc: Value = serde_json::from_str(event).map_err(|_| "invalid_json")?;
        if !doc.is_object() {
            return Err("invalid_json");
        }
        let get = |path: &Option<FieldPath>| {
            let mut v = &doc;
            for name in path.as_ref()?.segments.iter() {
                v = v.as_object()?.get(&**name)?;
            }
            (!v.is_null()).then_some(v)
        };
        let bytes = |v: &Value, reason| match v {
            Value::String(s) => Ok(Cow::Owned(s.clone().into_bytes())),
            Value::Number(n) => Ok(Cow::Owned(n.to_string().into_bytes())),
            _ => Err(reason),
        };
        let key = get(&spec.key).map(|v| bytes(v, "bad_key")).transpose()?;
        let client_id = get(&spec.client_id).map(|v| bytes(v, "bad_client_id")).transpose()?;
        let timestamp = get(&spec.timestamp)
            .map(|v| match (spec.timestamp_unit, v) {
                (TimestampUnit::Rfc3339, Value::String(s)) => timestamp::parse_rfc3339(s).map_err(|_| "bad_timestamp"),
                (TimestampUnit::Rfc3339, _) => Err("bad_timestamp"),
                (unit, Value::Number(n)) => timestamp::number_to_ms(&n.to_string(), unit).map_err(|_| "bad_timestamp"),
                _ => Err("bad_timestamp"),
            })
            .transpose()?;
        Ok(Fields { key, timestamp, client_id })
    }

    /// JSON text (integers only, so that a number's text is what serde_json prints).
    fn json_value() -> impl Strategy<Value = String> {
        let leaf = prop_oneof![
            Just("null".to_owned()),
            Just("true".to_owned()),
            (0u64..2_000_000_000_000).prop_map(|n| n.to_string()),
            Just("\"2025-12-01T00:00:00Z\"".to_owned()),
            "[a-c\\\\\"é]{0,4}".prop_map(|s| serde_json::to_string(&s).unwrap()),
        ];
        leaf.prop_recursive(3, 24, 4, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..4).prop_map(|v| format!("[{}]", v.join(","))),
                proptest::collection::vec((prop_oneof![Just("a"), Just("b"), Just("c"), Just("\\u0061")], inner), 0..4)
                    .prop_map(|fields| {
                        let fields: Vec<String> = fields.iter().map(|(k, v)| format!("\"{k}\" : {v}")).collect();
                        format!("{{ {} }}", fields.join(","))
                    }),
            ]
        })
    }

    proptest! {
        #[test]
        fn the_scan_agrees_with_parsing_the_whole_event(
            event in json_value(),
            key in proptest::option::of(prop_oneof![Just("a"), Just("b"), Just("a.b"), Just("a.a.c")]),
            ts in proptest::option::of(prop_oneof![Just("c"), Just("b.c"), Just("a")]),
            client_id in proptest::option::of(prop_oneof![Just("b"), Just("c.a"), Just("a.b")]),
            unit in prop_oneof![Just(TimestampUnit::Ms), Just(TimestampUnit::S), Just(TimestampUnit::Rfc3339)],
        ) {
            let spec = spec(key, ts, unit, client_id);
            let ours = spec.extract(event.as_bytes()).map_err(|e| e.reason());
            let expected = reference(&spec, &event);
            prop_assert_eq!(
                ours.map(|f| (f.key.map(Cow::into_owned), f.timestamp, f.client_id.map(Cow::into_owned))),
                expected.map(|f| (f.key.map(Cow::into_owned), f.timestamp, f.client_id.map(Cow::into_owned))),
                "{}", event
            );
        }

        #[test]
        fn any_bytes_give_fields_or_an_error(event in proptest::collection::vec(any::<u8>(), 0..200)) {
            check_any(&event)?;
        }

        #[test]
        fn broken_events_give_fields_or_an_error(
            value in json_value(),
            at in any::<proptest::sample::Index>(),
            byte in any::<u8>(),
            cut in any::<bool>(),
        ) {
            let mut event = format!(r#"{{"a":{value},"b":{{"c":{value}}}}}"#).into_bytes();
            let i = at.index(event.len());
            if cut {
                event.truncate(i);
            } else {
                event[i] = byte;
            }
            check_any(&event)?;
        }
    }

    /// Whatever parses whole is read; whatever does not even parse when skipped
    /// (strings are then not checked for UTF-8) is refused as not an object.
    fn check_any(event: &[u8]) -> Result<(), TestCaseError> {
        let spec = spec(Some("a"), Some("b.c"), TimestampUnit::Rfc3339, Some("a.b"));
        let problem = spec.extract(event).err().map(|e| e.problem);
        let object = event.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'{');
        if object && serde_json::from_slice::<Value>(event).is_ok() {
            prop_assert_ne!(problem, Some(FieldProblem::NotAnObject));
        }
        if !object || serde_json::from_slice::<IgnoredAny>(event).is_err() {
            prop_assert_eq!(problem, Some(FieldProblem::NotAnObject));
        }
        Ok(())
    }
}
